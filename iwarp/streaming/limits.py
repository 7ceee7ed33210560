"""Per-address accounting and read deadlines for `iwarp serve`.

Client ids (`X-Iwarp-Client`) are whatever the client sends, so limits keyed on them alone
bound nothing: a client rotating ids took every session slot and evicted everyone's avatars.
The remote address is not the client's choice; `address_key` is what per-address limits
count (an IPv6 client usually holds a whole /64, so that is one address here). Behind a
reverse proxy or load balancer every request comes from the proxy: with the proxy's address
among `trusted_proxies` (`--trusted-proxy`), the client is the last `X-Forwarded-For` hop
that is not a trusted proxy (the hops before it are the client's to write, so never those).

Slow clients: a request's head must arrive within the read timeout (aiohttp's keep-alive
timer, which also closes a connection that sends nothing, set by `create_app`), and a body
must keep up a minimum average rate once the read timeout has passed (`body_deadline`), so a
trickled upload cannot hold an upload slot for as long as it likes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(texts: Sequence[str]) -> tuple[Network, ...]:
    """'10.0.0.5', '10.0.0.0/8', '::1' -> networks; ValueError naming a bad one."""
    networks = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{text!r} is not an IP address or network") from None
    return tuple(networks)


def _within(address: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def address_key(request: web.Request, trusted_proxies: Sequence[Network] = ()) -> str:
    """The client's address as the limits count it: the IPv4 address, or the IPv6 /64 (via
    `X-Forwarded-For` when the request comes from one of `trusted_proxies`)."""
    remote = request.remote or ""
    if trusted_proxies and _within(remote, trusted_proxies):
        hops = ",".join(request.headers.getall("X-Forwarded-For", [])).split(",")
        for hop in reversed([h.strip() for h in hops if h.strip()]):
            if not _within(hop, trusted_proxies):
                # Written by our proxy: the address it was connected from (if it is one;
                # else the proxy's own address stays the key).
                with contextlib.suppress(ValueError):
                    remote = str(ipaddress.ip_address(hop))
                break
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return remote  # a Unix socket or an unknown peer: one key for all of them
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def body_deadline(read_timeout: float, min_rate: float) -> Callable[..., Awaitable]:
    """Middleware: a request whose body has not fully arrived by `read_timeout` s plus one
    second per `min_rate` bytes received gets 408 and its connection closed (the handler is
    cancelled wherever it waits: upload slots and temporary files are freed by its own
    cleanup). Requests without a body, or once it is all in, are not watched."""

    @web.middleware
    async def deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
        content = request.content
        if content.is_eof():
            return await handler(request)
        loop = asyncio.get_running_loop()
        start = loop.time()
        timer: asyncio.TimerHandle | None = None
        late = False

        def due() -> float:
            return start + read_timeout + content.total_bytes / min_rate

        try:
            async with asyncio.timeout(None) as timeout:

                def check() -> None:
                    nonlocal timer, late
                    timer = None
                    if content.is_eof():
                        return  # all of it arrived: the rest is the handler's own time
                    if loop.time() >= due():
                        late = True
                        timeout.reschedule(loop.time())
                    else:
                        timer = loop.call_at(due(), check)

                timer = loop.call_at(due(), check)
                try:
                    return await handler(request)
                finally:
                    if timer is not None:
                        timer.cancel()
        except TimeoutError:
            if not late:
                raise  # the handler's own timeout, not ours
        seconds = loop.time() - start
        response = web.json_response(
            {
                "error": f"the request body arrived too slowly ({content.total_bytes} bytes in "
                f"{seconds:.0f} s)",
                "hint": f"send at least {min_rate / 1024:g} KiB/s after the first "
                f"{read_timeout:g} s",
            },
            status=408,
        )
        response.force_close()
        return response

    return deadline
