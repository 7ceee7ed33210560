"""A frame id drawn as big black/white blocks in a band along a frame's bottom edge.

The latency benchmark needs to know which sent frame each returned frame came from. The id
cannot ride in the driving frame alone (the avatar output does not contain the driving pixels),
and RTP timestamps do not survive either: each receiver rebases them on the first frame it
decoded, and with newest-frame-only processing that first frame is not known to the client.
So a client that asks for it (`"echo_id": true` in its offer) gets the band of each driving
frame copied, resized, onto the bottom of the animated frame made from it, and reads it back.

Layout: the bottom `band_height(h)` rows hold two rows of 16 cells: the id's 16 bits (MSB
first), then their complement. A read is valid only if the two agree, so a frame damaged by the
codec is reported as unreadable, never as a wrong id. Cells are at least 16x8 pixels at 256x256
and survive two VP8 passes at 150 kbps with a wide margin (luma 16 vs 235, threshold 128).
"""

from __future__ import annotations

import cv2
import numpy as np

BITS = 16
ID_MODULO = 1 << BITS


def band_height(height: int) -> int:
    """Rows of the band: 1/16 of the frame, at least 8, even (keeps 4:2:0 chroma aligned)."""
    return max(8, (height // 16) & ~1)


def _cells(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) of each of the 2 x BITS cells, row-major."""
    hb = band_height(height)
    top = height - hb
    rows = [(top, top + hb // 2), (top + hb // 2, height)]
    xs = np.linspace(0, width, BITS + 1).round().astype(int)
    return [(y0, y1, int(xs[i]), int(xs[i + 1])) for y0, y1 in rows for i in range(BITS)]


def stamp_id(frame: np.ndarray, frame_id: int) -> np.ndarray:
    """Draws `frame_id` (mod 2**16) into the bottom band of an RGB frame, in place."""
    h, w = frame.shape[:2]
    value = frame_id % ID_MODULO
    bits = [(value >> (BITS - 1 - i)) & 1 for i in range(BITS)]
    bits += [1 - b for b in bits]
    for (y0, y1, x0, x1), bit in zip(_cells(w, h), bits, strict=True):
        frame[y0:y1, x0:x1] = 255 if bit else 0
    return frame


def read_id(frame: np.ndarray) -> int | None:
    """The id in the bottom band of an RGB frame, or None when the band does not check out."""
    h, w = frame.shape[:2]
    if h < 16 or w < BITS * 2:
        return None
    bits = []
    for y0, y1, x0, x1 in _cells(w, h):
        # The centre half of each cell: edges bleed into neighbours after lossy coding.
        dy, dx = max(1, (y1 - y0) // 4), max(1, (x1 - x0) // 4)
        cell = frame[y0 + dy : y1 - dy, x0 + dx : x1 - dx]
        bits.append(int(cell.mean() > 127.5))
    value = int("".join(map(str, bits[:BITS])), 2)
    check = int("".join(map(str, bits[BITS:])), 2)
    return value if value ^ check == ID_MODULO - 1 else None


def copy_band(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Copies the source frame's band onto the target's bottom, resized; target in place."""
    hs, ht = band_height(source.shape[0]), band_height(target.shape[0])
    band = source[source.shape[0] - hs :]
    if band.shape[:2] != (ht, target.shape[1]):
        band = cv2.resize(band, (target.shape[1], ht), interpolation=cv2.INTER_AREA)
    target[target.shape[0] - ht :] = band
    return target


def hide_band(frame: np.ndarray) -> np.ndarray:
    """Paints the band over with the row above it (for showing the frame); in place."""
    hb = band_height(frame.shape[0])
    frame[-hb:] = frame[-hb - 1]
    return frame
