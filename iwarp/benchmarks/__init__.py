"""Benchmarks that run against the product from outside it (`iwarp bench-webrtc`).

Kept out of `iwarp.streaming` so the server package holds only the server; `bench/` has the
scripts that wrap these.
"""
