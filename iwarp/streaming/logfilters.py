"""Log lines that a client can cause, bounded: a peer or a script must not be able to flood
the server's log (issue 27: garbage VP8 from one peer wrote 10,526 warnings in seconds, and
every malformed request line a 10-line traceback, before any auth).

`install()` (called by `create_app`) attaches two filters:
- `OneLineBadRequests` on aiohttp's server logger: a request that aiohttp could not parse is
  the client's mistake, not the server's, so it becomes one INFO line with the parser's reason
  instead of an ERROR with a traceback;
- `RateLimit` on that logger, on every aiortc and aioice logger, and on `REQUESTS_LOGGER`
  (the server's refusals and errors): at most `burst` lines per message template in each
  `period`, and the next line let through says how many were left out.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

# Where the server logs what requests cause (refusals, client errors, its own 500s).
REQUESTS_LOGGER = "iwarp.streaming.requests"
_LIBRARIES = ("aiortc", "aioice")
_MAX_KEYS = 1000  # message templates tracked at once; templates are code, so few in practice


@dataclass
class _Window:
    start: float
    passed: int = 0
    left_out: int = 0


class RateLimit(logging.Filter):
    """At most `burst` records per `period` seconds for each (logger, message template,
    `flood_key` extra); the rest are dropped and counted, and the first record of the next
    period says how many. Thread-safe (aiortc logs from its decoder threads)."""

    def __init__(self, burst: int = 5, period: float = 60.0) -> None:
        super().__init__()
        self.burst = burst
        self.period = period
        self._windows: dict[tuple[object, ...], _Window] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg), getattr(record, "flood_key", None))
        now = time.monotonic()
        with self._lock:
            window = self._windows.get(key)
            if window is None or now - window.start >= self.period:
                left_out = window.left_out if window is not None else 0
                if window is None and len(self._windows) >= _MAX_KEYS:
                    self._windows.clear()
                window = self._windows[key] = _Window(now)
                if left_out:
                    # Appended outside the %-template: the record's args still apply.
                    note = f" ({left_out} similar lines left out in {self.period:g} s)"
                    record.msg = str(record.msg) + note.replace("%", "%%")
            if window.passed >= self.burst:
                window.left_out += 1
                return False
            window.passed += 1
        return True

    def reset(self) -> None:
        with self._lock:
            self._windows.clear()


class OneLineBadRequests(logging.Filter):
    """aiohttp's "Error handling request" with a parser error -> one INFO line, no traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError | RequestPayloadError):
            reason = getattr(exc, "message", "") or str(exc) or type(exc).__name__
            args = record.args if isinstance(record.args, tuple) else ()
            record.msg = "malformed HTTP request from %s: %s"
            record.args = (args[0] if args else "?", " ".join(str(reason).split())[:200])
            record.exc_info = None
            record.exc_text = None
            record.levelno = min(record.levelno, logging.INFO)
            record.levelname = logging.getLevelName(record.levelno)
        return True


_rate_limit = RateLimit()
_bad_requests = OneLineBadRequests()


def reset_counts() -> None:
    """Forgets what was counted: every message has its full allowance again (for tests, which
    share one process and so one count)."""
    _rate_limit.reset()


def install() -> None:
    """Attaches the filters; idempotent. Call after aiortc is imported (its loggers exist)."""
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in _LIBRARIES]
    for name in [*names, "aiohttp.server", REQUESTS_LOGGER]:
        logger = logging.getLogger(name)
        if name == "aiohttp.server" and _bad_requests not in logger.filters:
            logger.addFilter(_bad_requests)  # first: the rate limit then sees the new template
        if _rate_limit not in logger.filters:
            logger.addFilter(_rate_limit)
