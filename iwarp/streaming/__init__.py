"""Streaming: the WebRTC server (`iwarp serve`), its browser page and its Python client.

Modules, one concern each (see README.md in this folder for endpoints, auth and measurements):

    server.py      aiohttp app: routes, auth middleware, error mapping, `serve()`
    session.py     one RTCPeerConnection per session, the registry and its limits
    tracks.py      the processing track: newest frame only, model off the event loop
    lowlatency.py  jitter-buffer adapter: release a video frame on its RTP marker bit
    rtc.py         aiortc settings: bitrate, ICE without STUN, loopback candidates
    uploads.py     avatar photo uploads: size, count, type and pixel limits
    metrics.py     Prometheus text exposition
    frameid.py     the frame-id band that the latency benchmark reads back
    engine.py      the frame-engine interface (local Animator, or iwarp.cluster's Ray engine)
    client.py      the pure-Python aiortc client: `ServerApi` (HTTP), `open_peer` (the WebRTC
                   call), `StreamingClient` (iwarp.benchmarks, tests, `iwarp cam`'s remote engine)
    static/        the page: index.html, app.js, style.css

`iwarp.cam` and `iwarp.benchmarks` use the client side (client, rtc, frameid), `iwarp.cluster`
implements the `engine.py` interface; nothing else in iwarp imports this package, and
aiortc/aiohttp are imported only by these modules (docs/ARCHITECTURE.md, checked by
tests/test_architecture.py).
"""
