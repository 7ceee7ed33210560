"""Clients that misbehave on purpose, to measure how the server cuts them off
(`bench/soak.py` and `tests/test_serve_limits.py` both drive it with these)."""

from __future__ import annotations

import asyncio
import time


async def trickle_request_head(
    port: int,
    *,
    padding: int = 40,
    interval_s: float = 1.0,
    local_address: str | None = None,
) -> float:
    """Sends an HTTP request head one byte per `interval_s` and never ends it (a slowloris
    client): seconds until the server closed the connection or answered, inf when the whole
    head (`padding` bytes of header value) went out and it was still open. `local_address`
    binds the client's end (one loopback address per kind of client in a soak)."""
    local_addr = (local_address, 0) if local_address else None
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=local_addr)
    t0 = time.monotonic()
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * padding
    try:
        for byte in head:
            writer.write(bytes([byte]))
            await writer.drain()
            if await _ended(reader, interval_s):
                return time.monotonic() - t0
        return float("inf")
    except ConnectionError:
        return time.monotonic() - t0
    finally:
        writer.close()


async def _ended(reader: asyncio.StreamReader, timeout: float) -> bool:
    """True when the server closed the connection or began an answer (a 408) within
    `timeout`; a request head never ended gets nothing else."""
    try:
        data = await asyncio.wait_for(reader.read(1), timeout)
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return data == b"" or data.startswith(b"H")
