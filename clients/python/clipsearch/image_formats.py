"""The image formats clipsearch accepts: exactly those the encoder decodes.

Uploads are checked against these before they are stored, folders are scanned
for these file extensions, and the encoder opens only these Pillow formats, so
an image that passes one check passes them all.
"""

from __future__ import annotations

import os

# Pillow format names, as passed to ``PIL.Image.open(..., formats=...)``.
PIL_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF")

ACCEPTED_DESCRIPTION = "JPEG, PNG, WebP, BMP or GIF"

FILE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})

# The extension a stored object of each content type gets.
EXTENSION_BY_CONTENT_TYPE: dict[str, str] = {"image/jpeg": ".jpg", "image/png": ".png", "image/webp": ".webp",
                                             "image/bmp": ".bmp", "image/gif": ".gif"}

# Leading bytes of each format (WebP, a RIFF container, is checked on its own).
_MAGIC_BYTES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"BM", "image/bmp"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)


def is_image_file_name(name: str) -> bool:
    """True when the file name ends in an accepted image extension, in any case."""
    return os.path.splitext(name)[1].lower() in FILE_EXTENSIONS


def sniff_content_type(data: bytes) -> str | None:
    """The MIME type of an accepted image format from its magic bytes, or None."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for magic, content_type in _MAGIC_BYTES:
        if data.startswith(magic):
            return content_type
    return None
