"""Decoding untrusted image bytes safely: size and pixel limits, EXIF
orientation, alpha flattened onto white, first frame of animations."""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from clipsearch.errors import InvalidArgument

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, target_size: int | None = None) -> Image.Image:
    """An RGB PIL image from encoded bytes, or InvalidArgument saying what is wrong.

    ``target_size`` lets JPEG decode at a reduced scale (DCT scaling) when the
    image is much larger than the model needs; the result is never smaller than it.
    """
    if not data:
        raise InvalidArgument("image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise InvalidArgument(f"image is {len(data)} bytes; the limit is {max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidArgument(
                    f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels"
                )
            if target_size and image.format == "JPEG":
                image.draft("RGB", (target_size, target_size))
            image.load()
    except InvalidArgument:
        raise
    except UnidentifiedImageError:
        raise InvalidArgument(
            f"cannot identify the image format; accepted formats are {', '.join(ACCEPTED_FORMATS)}"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidArgument(f"image rejected as a decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidArgument(f"image data is corrupt or truncated: {exc}") from None
    return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited over white."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
