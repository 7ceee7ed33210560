"""Avatar photo uploads: read a multipart body within limits, check types and pixel counts.

Every check happens before a photo is decoded: bytes are counted while streaming (413 past the
limit, nothing more is read), the type is sniffed from magic bytes (415 for anything that is
not JPEG/PNG/WebP/BMP/GIF), and the pixel count comes from the header (413 for decompression
bombs: a small file that would decode to gigabytes). Decoding then goes through
`iwarp.media.read_image`, which applies EXIF orientation and its own pixel guard.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from aiohttp import BodyPartReader, web
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


@dataclass
class UploadLimits:
    max_bytes: int = 10 * 1024 * 1024  # per photo
    max_photos: int = 8
    max_pixels: int = 25_000_000  # per photo; a 24 MP camera still fits


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
    data: bytes


async def read_photos(request: web.Request, limits: UploadLimits) -> list[Photo]:
    """The `file` parts of a multipart/form-data request, each within `limits.max_bytes`."""
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
    reader = await request.multipart()
    photos: list[Photo] = []
    while True:
        part = await reader.next()
        if part is None:
            break
        if not isinstance(part, BodyPartReader) or part.name != "file":
            continue  # unknown fields are ignored, not an error
        if len(photos) >= limits.max_photos:
            raise UploadError(
                f"more than {limits.max_photos} photos in one avatar",
                f"send 1 to {limits.max_photos} photos",
                413,
            )
        chunks = []
        size = 0
        while chunk := await part.read_chunk(64 * 1024):
            size += len(chunk)
            if size > limits.max_bytes:
                raise UploadError(
                    f"photo {part.filename or len(photos) + 1} is larger than "
                    f"{limits.max_bytes // 1024} KiB",
                    "resize or recompress it",
                    413,
                )
            chunks.append(chunk)
        photos.append(Photo(part.filename or f"photo {len(photos) + 1}", b"".join(chunks)))
    if not photos:
        raise UploadError("no photos in the upload", "send one or more fields named 'file'", 400)
    return photos


def decode_photo(photo: Photo, limits: UploadLimits) -> np.ndarray:
    """Type and pixel checks, then decode (blocking: run it in an executor)."""
    kind = sniff_type(photo.data[:16])
    if kind is None:
        raise UploadError(f"{photo.filename} is not an image", _PHOTO_HINT, 415)
    with tempfile.NamedTemporaryFile(suffix=f".{kind}") as tmp:
        tmp.write(photo.data)
        tmp.flush()
        try:
            with Image.open(tmp.name) as im:  # reads the header only
                w, h = im.size
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise UploadError(f"{photo.filename} is not a readable image", _PHOTO_HINT, 415) from e
        if w * h > limits.max_pixels:
            raise UploadError(
                f"{photo.filename} is {w}x{h} pixels, more than "
                f"{limits.max_pixels / 1e6:.0f} megapixels",
                "resize it; very large images are refused before decoding",
                413,
            )
        try:
            image = read_image(Path(tmp.name), max_pixels=limits.max_pixels)
        except InputError as e:
            # read_image's message names the temporary file: say the user's file name instead.
            raise UploadError(
                f"{photo.filename} is corrupt or truncated", f"re-export it; {_PHOTO_HINT}", 415
            ) from e
    return image
