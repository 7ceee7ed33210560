#!/usr/bin/env python
"""WebRTC round-trip latency of a running `iwarp serve`, from 1..N concurrent aiortc clients.

    iwarp serve --backend torch &                 # in another terminal
    python bench/latency.py --url http://127.0.0.1:8080 --clients 1,2,4 --seconds 20 --json

Each client streams a real clip (default: clips/liveportrait/driving/d3.mp4 from the shared
data, else a generated one) at its frame rate, 256x256. Every sent frame carries its number in
a band of black/white blocks along its bottom edge; the client asks the server (`echo_id` in
its offer) to copy that band onto the animated frame made from it, reads it back, and so knows
each returned frame's send time. Reports round trip p50/p95/p99, output fps, frames
sent/received/dropped; `--json` prints one JSON object per run (one run per --clients entry),
`--plot` writes a PNG. Same as `iwarp bench --webrtc`. See iwarp/benchmarks/webrtc.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a plain checkout
    from iwarp.benchmarks.webrtc import main
    from iwarp.errors import IwarpError

    try:
        sys.exit(main())
    except IwarpError as exc:
        print(f"bench/latency.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
