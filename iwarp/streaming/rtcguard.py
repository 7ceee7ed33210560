"""Guards around aiortc 1.16 against a hostile peer: RTP only from the SSRCs its offer listed,
a bounded `pc.close()`, and a bounded number of remote ICE candidates.

SSRCs. aiortc's `RtpRouter` hands a packet with an unknown SSRC to the receiver whose payload
type matches, and the receiver then tracks that SSRC for good. A peer sending on ~400 SSRCs
(seen in a probe) makes the receiver's RTCP task build a receiver report with 400 entries;
`struct.pack` fails on the 5-bit report count, the task dies, and `RTCRtpReceiver.stop()`
waits for it forever, so `pc.close()` never returns and the session's threads and memory are
never freed. `NegotiatedSsrcRouter` (installed by `install()`, from `rtc.configure()`) drops
packets from SSRCs the offer did not list; an offer that lists none (allowed by the SDP rules)
gets at most `MAX_UNSIGNALLED_SSRCS`, the first ones seen.

Close. Whatever else may hang in aiortc's teardown, `close_peer` waits a bounded time for
`pc.close()`, then stops what it would have stopped (senders, decoder threads, DTLS and ICE
transports), each bounded too, so the session's cleanup always finishes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiortc import RTCPeerConnection, rtcdtlstransport, sdp
from aiortc.rtp import RtpPacket

log = logging.getLogger("iwarp.streaming")

# Media + RTX of one video section: what a browser or aiortc sends on when it lists none.
MAX_UNSIGNALLED_SSRCS = 4
_StockRouter = rtcdtlstransport.RtpRouter


class NegotiatedSsrcRouter(_StockRouter):
    """aiortc's RTP router that learns no SSRC outside `allowed` (None: the first
    `MAX_UNSIGNALLED_SSRCS` seen)."""

    def __init__(self) -> None:
        super().__init__()
        self.allowed: frozenset[int] | None = None
        self.dropped = 0  # packets from SSRCs that were not negotiated

    def route_rtp(self, packet: RtpPacket) -> rtcdtlstransport.RtpReceiver | None:
        if packet.ssrc not in self.ssrc_table:
            if self.allowed is not None:
                refused = packet.ssrc not in self.allowed
            else:
                refused = len(self.ssrc_table) >= MAX_UNSIGNALLED_SSRCS
            if refused:
                self.dropped += 1
                return None
        return super().route_rtp(packet)


def install() -> None:
    """Every DTLS transport created from now on routes RTP with `NegotiatedSsrcRouter`."""
    rtcdtlstransport.RtpRouter = NegotiatedSsrcRouter  # type: ignore[misc]


def offered_ssrcs(description: sdp.SessionDescription) -> frozenset[int]:
    """Every SSRC the offer's media sections list (a=ssrc, media and RTX alike)."""
    return frozenset(s.ssrc for media in description.media for s in media.ssrc)


def accept_only_offered_ssrcs(pc: RTCPeerConnection, description: sdp.SessionDescription) -> None:
    """Restricts `pc`'s RTP routers (one per DTLS transport, made by setRemoteDescription) to
    the SSRCs of `description`, the remote offer; an offer with none keeps the small cap."""
    ssrcs = offered_ssrcs(description) or None
    for transceiver in pc.getTransceivers():
        router = getattr(transceiver.receiver.transport, "_rtp_router", None)
        if isinstance(router, NegotiatedSsrcRouter):
            router.allowed = ssrcs


def remote_candidates(description: sdp.SessionDescription) -> int:
    """Distinct remote ICE candidates (address, port, protocol) over all media sections:
    each is a target the server sends STUN checks to."""
    return len(
        {
            (c.ip, c.port, c.protocol.lower())
            for media in description.media
            for c in media.ice_candidates
        }
    )


async def close_peer(pc: RTCPeerConnection, timeout: float) -> bool:
    """`pc.close()`, waited for at most `timeout` s; True when it finished. Otherwise it is
    cancelled and its remaining work done step by step, each step bounded the same way."""
    closing = asyncio.ensure_future(pc.close())
    done, _ = await asyncio.wait({closing}, timeout=timeout)
    if done:
        if not closing.cancelled() and closing.exception() is not None:
            log.warning("closing a peer connection failed: %s", closing.exception())
        return True
    closing.cancel()
    await asyncio.gather(closing, return_exceptions=True)
    for transceiver in pc.getTransceivers():
        transceiver.receiver._handle_disconnect()  # stops its decoder thread
        dtls = transceiver.receiver.transport
        for stop in (transceiver.sender.stop, dtls.stop, dtls.transport.stop):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stop(), timeout)
    pc.remove_all_listeners()
    return False
