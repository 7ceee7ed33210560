"""Unit tests of the streaming building blocks: jitter-buffer adapter, frame ids, metrics,
upload sniffing. No server, no model."""

from __future__ import annotations

import asyncio
import fractions
import statistics
import time

import numpy as np
import pytest

pytest.importorskip("aiortc")
pytest.importorskip("aiohttp")

import av
from aiortc import MediaStreamTrack, RTCPeerConnection, rtcrtpreceiver
from aiortc.codecs import vpx
from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtp import RtpPacket

from iwarp.media import read_image, synthetic_driving_frames
from iwarp.paths import DEFAULT_AVATAR
from iwarp.streaming import frameid, lowlatency, rtc
from iwarp.streaming.metrics import Registry, parse_samples
from iwarp.streaming.uploads import sniff_type


def _packet(seq: int, ts: int, marker: bool, data: bytes = b"x") -> RtpPacket:
    p = RtpPacket(payload_type=96, marker=int(marker), sequence_number=seq, timestamp=ts)
    p._data = data  # what the receiver sets after depayloading
    return p


def _feed(buffer: JitterBuffer, packets: list[RtpPacket]) -> list[bytes | None]:
    out = []
    for p in packets:
        _, frame = buffer.add(p)
        out.append(frame.data if frame is not None else None)
    return out


# -- jitter buffer ----------------------------------------------------------------------------


def test_stock_buffer_holds_a_frame_until_the_next_one_starts():
    """The behaviour the adapter removes, checked against aiortc's real JitterBuffer."""
    stock = JitterBuffer(capacity=128, is_video=True)
    packets = [_packet(0, 1000, False, b"a"), _packet(1, 1000, True, b"b"), _packet(2, 4000, False)]
    assert _feed(stock, packets) == [None, None, b"ab"]


def test_low_latency_buffer_releases_on_marker():
    low = lowlatency.LowLatencyJitterBuffer(capacity=128, is_video=True)
    packets = [
        _packet(0, 1000, False, b"a"),
        _packet(1, 1000, True, b"b"),
        _packet(2, 4000, True, b"c"),
    ]
    assert _feed(low, packets) == [None, b"ab", b"c"]


def test_low_latency_buffer_waits_for_reordered_packets():
    low = lowlatency.LowLatencyJitterBuffer(capacity=128, is_video=True)
    assert _feed(low, [_packet(10, 0, False, b"a")]) == [None]
    # The marked last packet overtakes the middle one: the frame is not complete yet.
    assert _feed(low, [_packet(12, 0, True, b"c")]) == [None]
    assert _feed(low, [_packet(11, 0, False, b"b")]) == [b"abc"]


def test_low_latency_buffer_drops_empty_frames_and_handles_missing_marker():
    low = lowlatency.LowLatencyJitterBuffer(capacity=128, is_video=True)
    # A padding-only "frame" (no payload) is never handed to the decoder.
    assert _feed(low, [_packet(0, 100, True, b"")]) == [None]
    assert _feed(low, [_packet(1, 200, True, b"x")]) == [b"x"]
    # A frame whose last packet lost its marker is released when the next frame starts.
    assert _feed(low, [_packet(2, 300, False, b"p"), _packet(3, 400, False, b"q")]) == [None, b"p"]


def test_low_latency_buffer_leaves_audio_alone():
    packets = [_packet(i, 160 * i, True, bytes([i])) for i in range(8)]
    stock = _feed(JitterBuffer(capacity=16, prefetch=4), packets)
    low = _feed(lowlatency.LowLatencyJitterBuffer(capacity=16, prefetch=4), packets)
    assert low == stock


def test_install_replaces_the_receivers_buffer_class():
    lowlatency.uninstall()
    assert rtcrtpreceiver.JitterBuffer is JitterBuffer
    lowlatency.install()
    lowlatency.install()  # idempotent
    assert lowlatency.installed()
    assert rtcrtpreceiver.JitterBuffer is lowlatency.LowLatencyJitterBuffer


class _Ticker(MediaStreamTrack):
    """10 fps frames stamped with their number, recording when each was produced."""

    kind = "video"

    def __init__(self) -> None:
        super().__init__()
        self.n = 0
        self.sent: dict[int, float] = {}
        self.start = time.monotonic()
        self.image = np.full((128, 128, 3), 90, np.uint8)

    async def recv(self) -> av.VideoFrame:
        await asyncio.sleep(max(0.0, self.start + self.n / 10 - time.monotonic()))
        rgb = frameid.stamp_id(self.image.copy(), self.n)
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts, frame.time_base = self.n * 9000, fractions.Fraction(1, 90000)
        self.sent[self.n] = time.monotonic()
        self.n += 1
        return frame


async def _one_way_latency(seconds: float = 2.5) -> float:
    """Median send -> decoded latency of a real aiortc pair on loopback, at 10 fps."""
    sender = RTCPeerConnection(rtc.rtc_configuration())
    receiver = RTCPeerConnection(rtc.rtc_configuration())
    ticker = _Ticker()
    sender.addTrack(ticker)
    latencies: list[float] = []

    async def consume(track: MediaStreamTrack) -> None:
        while True:
            frame = await track.recv()
            n = frameid.read_id(frame.to_ndarray(format="rgb24"))
            if n is not None and n in ticker.sent and n >= 5:  # skip connection warm-up
                latencies.append(time.monotonic() - ticker.sent[n])

    tasks = []
    receiver.on("track", lambda t: tasks.append(asyncio.ensure_future(consume(t))))
    await sender.setLocalDescription(await sender.createOffer())
    await receiver.setRemoteDescription(sender.localDescription)
    await receiver.setLocalDescription(await receiver.createAnswer())
    await sender.setRemoteDescription(receiver.localDescription)
    await asyncio.sleep(seconds)
    for t in tasks:
        t.cancel()
    await sender.close()
    await receiver.close()
    assert len(latencies) >= 5, "no frames crossed the loopback connection"
    return statistics.median(latencies)


def test_adapter_removes_one_frame_interval_in_a_real_receiver():
    rtc.use_loopback_candidates(only=True)
    try:
        lowlatency.uninstall()
        stock = asyncio.run(asyncio.wait_for(_one_way_latency(), 30))
        lowlatency.install()
        low = asyncio.run(asyncio.wait_for(_one_way_latency(), 30))
    finally:
        lowlatency.install()
    # At 10 fps the stock buffer holds each frame ~100 ms for the next one to begin.
    assert stock > 0.08, f"stock receive latency {stock * 1e3:.0f} ms"
    assert low < stock - 0.05, f"adapter {low * 1e3:.0f} ms vs stock {stock * 1e3:.0f} ms"


# -- frame ids --------------------------------------------------------------------------------


def test_frame_id_round_trip_and_rejects_garbage():
    frame = np.full((256, 256, 3), 128, np.uint8)
    for n in (0, 1, 1234, 65535, 70000):
        assert frameid.read_id(frameid.stamp_id(frame.copy(), n)) == n % 65536
    assert frameid.read_id(np.full((256, 256, 3), 128, np.uint8)) is None
    noise = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    assert frameid.read_id(noise) is None


def _vp8_pass(frames: list[np.ndarray], bitrate: int) -> list[np.ndarray]:
    vpx.DEFAULT_BITRATE = bitrate
    encoder, decoder = vpx.Vp8Encoder(), vpx.Vp8Decoder()
    out = []
    for i, rgb in enumerate(frames):
        vf = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        vf.pts, vf.time_base = i * 3000, fractions.Fraction(1, 90000)
        payloads, ts = encoder.encode(vf)
        data = b"".join(vpx.vp8_depayload(p) for p in payloads)
        from aiortc.jitterbuffer import JitterFrame

        out += [f.to_ndarray(format="rgb24") for f in decoder.decode(JitterFrame(data, ts))]
    return out


@pytest.mark.parametrize("out_size", [256, 64])
def test_frame_id_survives_two_vp8_passes_and_a_resize(out_size):
    """Driving frame -> VP8 -> server copies the band onto the output -> VP8 -> read."""
    old = vpx.DEFAULT_BITRATE
    try:
        face = synthetic_driving_frames(read_image(DEFAULT_AVATAR), 20, 256)
        ids = [7 * i + 300 for i in range(20)]
        sent = [frameid.stamp_id(f.copy(), n) for f, n in zip(face, ids, strict=True)]
        uplink = _vp8_pass(sent, rtc.VIDEO_MIN_BITRATE)
        outputs = [
            frameid.copy_band(u, np.full((out_size, out_size, 3), 60, np.uint8)) for u in uplink
        ]
        downlink = _vp8_pass(outputs, rtc.VIDEO_MIN_BITRATE)
        assert [frameid.read_id(f) for f in downlink] == ids
    finally:
        vpx.DEFAULT_BITRATE = old


# -- metrics, uploads, settings ----------------------------------------------------------------


def test_metrics_text_format():
    m = Registry()
    c = m.counter("x_total", "things")
    c.inc(3)
    m.gauge("g", "a gauge", lambda: 2.5)
    h = m.histogram("lat_seconds", "latency", buckets=(0.1, 1.0))
    for v in (0.05, 0.5, 5.0):
        h.observe(v)
    text = m.render()
    assert "# TYPE x_total counter" in text and "# TYPE lat_seconds histogram" in text
    s = parse_samples(text)
    assert s["x_total"] == 3 and s["g"] == 2.5
    assert s['lat_seconds_bucket{le="0.1"}'] == 1
    assert s['lat_seconds_bucket{le="1"}'] == 2
    assert s['lat_seconds_bucket{le="+Inf"}'] == 3 and s["lat_seconds_count"] == 3


def test_sniff_type():
    assert sniff_type(b"\xff\xd8\xff\xe0") == "jpeg"
    assert sniff_type(b"\x89PNG\r\n\x1a\n....") == "png"
    assert sniff_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "webp"
    assert sniff_type(b"<html>") is None
    assert sniff_type(b"") is None


def test_bitrate_constants_are_set_and_checked():
    rtc.set_video_bitrate()
    assert vpx.DEFAULT_BITRATE == rtc.VIDEO_BITRATE
    assert vpx.Vp8Encoder().target_bitrate == rtc.VIDEO_BITRATE
    with pytest.raises(ValueError):
        rtc.set_video_bitrate(default=100, minimum=200, maximum=300)
