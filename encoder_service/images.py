"""Decoding untrusted image bytes safely: size and pixel limits, EXIF
orientation, alpha flattened onto white, first frame of animations."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from clipsearch.errors import InvalidArgument
from clipsearch.image_formats import ACCEPTED_DESCRIPTION, PIL_FORMATS


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
            image = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
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
        raise InvalidArgument(f"cannot identify the image format; send {ACCEPTED_DESCRIPTION}") from None
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


# -- decoding on the model's device (GPU) -----------------------------------------
# PIL decodes about 2,000 JPEGs/s on 16 cores; nvJPEG decodes a batch of them on
# the GPU several times faster. On that path the CPU only checks each image's
# header (format, size limits, EXIF orientation); the bytes go to the device,
# are decoded there as one batch, then resized, cropped and normalized there.

@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG whose header passed the checks, left encoded for batched device decoding."""

    data: bytes
    orientation: int  # EXIF orientation, 1 = as stored


def inspect_jpeg(data: bytes, *, max_bytes: int, max_pixels: int) -> EncodedJpeg | None:
    """An EncodedJpeg when ``data`` is a JPEG within the limits; None for other formats.

    Only the header is read. Raises InvalidArgument for what the header already shows.
    """
    if not data:
        raise InvalidArgument("image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise InvalidArgument(f"image is {len(data)} bytes; the limit is {max_bytes} bytes")
    if not data.startswith(b"\xff\xd8"):
        return None
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as image:
            width, height = image.size
            orientation = int(image.getexif().get(0x0112, 1) or 1)
            mode = image.mode
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidArgument(f"image data is corrupt or truncated: {exc}") from None
    if width * height > max_pixels:
        raise InvalidArgument(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels")
    if mode not in ("RGB", "L", "YCbCr"):
        return None  # CMYK and friends: the CPU path converts them
    return EncodedJpeg(data, orientation if 1 <= orientation <= 8 else 1)


def apply_orientation(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """``pixels`` (C, H, W) turned upright, as PIL's ImageOps.exif_transpose does."""
    if orientation == 2:
        return pixels.flip(2)
    if orientation == 3:
        return pixels.flip(1).flip(2)
    if orientation == 4:
        return pixels.flip(1)
    if orientation == 5:
        return pixels.transpose(1, 2)
    if orientation == 6:
        return pixels.transpose(1, 2).flip(2)
    if orientation == 7:
        return pixels.transpose(1, 2).flip(1).flip(2)
    if orientation == 8:
        return pixels.transpose(1, 2).flip(1)
    return pixels


class TensorPreprocess:
    """open_clip's default image preprocessing (shortest-side bicubic resize,
    center crop, normalize) on uint8 (C, H, W) tensors, on any device."""

    def __init__(self, config: dict, device: torch.device):
        size = config.get("size", 224)
        self.size = int(size[0] if isinstance(size, (list, tuple)) else size)
        self.mean = torch.tensor(config.get("mean"), device=device).view(3, 1, 1)
        self.std = torch.tensor(config.get("std"), device=device).view(3, 1, 1)
        self.device = device

    @staticmethod
    def supports(config: dict) -> bool:
        return (config.get("resize_mode", "shortest") == "shortest"
                and config.get("interpolation", "bicubic") == "bicubic"
                and config.get("mean") is not None and config.get("std") is not None)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as TF

        resized = TF.resize(pixels, [self.size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        cropped = TF.center_crop(resized, [self.size, self.size])
        return (cropped.float() / 255.0 - self.mean) / self.std


def decode_jpegs(images: list[EncodedJpeg], device: torch.device, preprocess: TensorPreprocess
                 ) -> list[torch.Tensor | InvalidArgument]:
    """Decodes a batch on ``device`` (nvJPEG on CUDA); one tensor or error per image.

    A corrupt image fails the batched call, so the batch is then decoded one by
    one to find it; the others still succeed.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(image.data), dtype=torch.uint8) for image in images]
    try:
        decoded: list = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        decoded = []
        for tensor in encoded:
            try:
                decoded.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as exc:
                decoded.append(InvalidArgument(f"image data is corrupt or truncated: {exc}"))
    return [
        pixels if isinstance(pixels, InvalidArgument) else preprocess(apply_orientation(pixels, image.orientation))
        for image, pixels in zip(images, decoded)
    ]
