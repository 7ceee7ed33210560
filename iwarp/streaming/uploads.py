"""Avatar photo uploads: read a multipart body within limits, check types and pixel counts.

Every check happens before a photo is decoded: bytes are counted while streaming (413 past the
limit, nothing more is read), the type is sniffed from the first bytes of each part (415 for
anything that is not JPEG/PNG/WebP/BMP/GIF, before the rest is read), and the pixel count comes
from the header, per photo and for the whole upload (413 for decompression bombs: a small file
that would decode to gigabytes). Parts are streamed to files in a temporary folder, never held
in memory, so concurrent uploads cost disk, not RAM. Decoding then goes through
`iwarp.media.read_image`, which applies EXIF orientation and downscales to `max_side` as it
decodes (JPEGs at a reduced DCT scale), so what the encoder and `--store` get is bounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from PIL import Image, UnidentifiedImageError

from iwarp.errors import InputError
from iwarp.media import read_image
from iwarp.streaming.httperrors import ApiError

_MAGIC = {
    b"\xff\xd8\xff": "jpeg",
    b"\x89PNG\r\n\x1a\n": "png",
    b"GIF87a": "gif",
    b"GIF89a": "gif",
    b"BM": "bmp",
}
_PHOTO_HINT = "upload JPEG or PNG photos of a face"
_CHUNK = 64 * 1024


@dataclass
class UploadLimits:
    max_bytes: int = 10 * 1024 * 1024  # per photo
    max_photos: int = 8
    max_pixels: int = 25_000_000  # per photo, from its header; a 24 MP camera still fits
    max_request_pixels: int = 64_000_000  # all photos of one upload, from their headers
    # Photos are downscaled to this longest side while decoding: plenty for a face crop at the
    # model's 256 px, and it bounds what is decoded, encoded and written to --store.
    max_side: int = 1536
    max_in_flight: int = 4  # uploads being received or waiting for the encoder at once
    max_in_flight_per_address: int = 2  # of those, from one client address


class UploadError(ApiError):
    """An upload refused for its size, type or content; `status` is the HTTP code."""


def sniff_type(head: bytes) -> str | None:
    """Image type from the first bytes, or None for anything else."""
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


@dataclass
class Photo:
    filename: str
    path: Path  # the part's bytes, in the request's temporary folder
    width: int
    height: int


def _malformed(exc: Exception) -> UploadError:
    reason = str(exc) or type(exc).__name__
    return UploadError(
        f"malformed multipart body ({reason})",
        "send multipart/form-data with a boundary, one field 'file' per photo",
        400,
    )


async def read_photos(request: web.Request, limits: UploadLimits, folder: Path) -> list[Photo]:
    """The `file` parts of a multipart/form-data request, each written to a file in `folder`
    and checked (bytes, type, header pixels) before the next one is read."""
    if not request.content_type.startswith("multipart/"):
        raise UploadError(
            f"expected multipart/form-data, got {request.content_type or 'no content type'}",
            "send the photos as form fields named 'file'",
            415,
        )
    total_limit = limits.max_photos * limits.max_bytes + 64 * 1024  # + multipart overhead
    if request.content_length is not None and request.content_length > total_limit:
        raise UploadError(
            f"upload is {request.content_length} bytes, more than {total_limit} allowed",
            f"send at most {limits.max_photos} photos of {limits.max_bytes // 1024} KiB each",
            413,
        )
    body = _BodyBudget(request, total_limit, limits)
    photos: list[Photo] = []
    try:
        reader = await request.multipart()
        while True:
            part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise UploadError(
                    "nested multipart parts are not accepted",
                    "send one field 'file' per photo, directly in the form",
                    400,
                )
            if part.name != "file":
                # Unknown fields are ignored, not an error; read here, within the budget
                # (left to the reader, a field would be read to its end, however long).
                while await part.read_chunk(_CHUNK):
                    body.check()
                continue
            if len(photos) >= limits.max_photos:
                raise UploadError(
                    f"more than {limits.max_photos} photos in one avatar",
                    f"send 1 to {limits.max_photos} photos",
                    413,
                )
            photo = await _save_part(part, len(photos), limits, folder, body)
            photos.append(photo)
            pixels = sum(p.width * p.height for p in photos)
            if pixels > limits.max_request_pixels:
                raise UploadError(
                    f"the photos add up to {pixels / 1e6:.0f} megapixels, more than "
                    f"{limits.max_request_pixels / 1e6:.0f} in one upload",
                    "send fewer or smaller photos",
                    413,
                )
    except (ValueError, AssertionError, LookupError, HttpProcessingError) as exc:
        # aiohttp's multipart parser reports a bad boundary or part headers this way
        # (HttpProcessingError: control bytes or a space in a part's header).
        raise _malformed(exc) from exc
    if not photos:
        raise UploadError("no photos in the upload", "send one or more fields named 'file'", 400)
    return photos


class _BodyBudget:
    """The upload's size limit counted on the bytes read, not on `Content-Length`: a chunked
    body has none, and a non-photo field is not bounded by the per-photo limit."""

    def __init__(self, request: web.Request, limit: int, limits: UploadLimits) -> None:
        self.content = request.content
        self.limit = limit
        self.limits = limits

    def check(self) -> None:
        if self.content.total_bytes > self.limit:
            raise UploadError(
                f"upload is more than {self.limit} bytes, the most allowed",
                f"send at most {self.limits.max_photos} photos of "
                f"{self.limits.max_bytes // 1024} KiB each, and nothing else",
                413,
            )


async def _save_part(
    part: BodyPartReader, index: int, limits: UploadLimits, folder: Path, body: _BodyBudget
) -> Photo:
    name = part.filename or f"photo {index + 1}"
    path = folder / f"part{index}"
    size = 0
    head = b""  # the first bytes, to sniff the type before reading the rest
    with path.open("wb") as out:
        while chunk := await part.read_chunk(_CHUNK):
            if len(head) < 16:
                head += chunk[: 16 - len(head)]
                if len(head) == 16 and sniff_type(head) is None:
                    raise UploadError(f"{name} is not an image", _PHOTO_HINT, 415)
            size += len(chunk)
            body.check()
            if size > limits.max_bytes:
                raise UploadError(
                    f"photo {name} is larger than {limits.max_bytes // 1024} KiB",
                    "resize or recompress it",
                    413,
                )
            out.write(chunk)
    if sniff_type(head) is None:
        raise UploadError(f"{name} is not an image", _PHOTO_HINT, 415)
    width, height = _header_size(path, name, limits)
    return Photo(name, path, width, height)


def _header_size(path: Path, name: str, limits: UploadLimits) -> tuple[int, int]:
    """Width and height from the header alone (Image.open decodes nothing)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except Image.DecompressionBombError as e:
        # Pillow refuses over ~179 MP by itself: the same answer as our own, lower limit.
        raise UploadError(
            f"{name} has too many pixels to decode safely",
            f"resize it below {limits.max_pixels / 1e6:.0f} megapixels",
            413,
        ) from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise UploadError(f"{name} is not a readable image", _PHOTO_HINT, 415) from e
    if w * h > limits.max_pixels:
        raise UploadError(
            f"{name} is {w}x{h} pixels, more than {limits.max_pixels / 1e6:.0f} megapixels",
            "resize it; very large images are refused before decoding",
            413,
        )
    return w, h


def decode_photo(photo: Photo, limits: UploadLimits) -> np.ndarray:
    """Decode (blocking: run it in the upload executor), downscaled to `limits.max_side`."""
    try:
        return read_image(photo.path, max_pixels=limits.max_pixels, max_side=limits.max_side)
    except InputError as e:
        # read_image's message names the temporary file: say the user's file name instead.
        raise UploadError(
            f"{photo.filename} is corrupt or truncated", f"re-export it; {_PHOTO_HINT}", 415
        ) from e
