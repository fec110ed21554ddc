"""The accepted image formats are one list: what the encoder decodes is what
uploads are sniffed as and what folder scans pick up."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from clipsearch.errors import InvalidArgument
from clipsearch.image_formats import (
    ACCEPTED_DESCRIPTION, FILE_EXTENSIONS, PIL_FORMATS, is_image_file_name, sniff_content_type,
)
from encoder_service.images import decode_image

LIMITS = {"max_bytes": 1 << 20, "max_pixels": 1 << 20}


def encoded(pil_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 30, 30)).save(buffer, format=pil_format)
    return buffer.getvalue()


@pytest.mark.parametrize("pil_format", PIL_FORMATS)
def test_every_accepted_format_is_sniffed_and_decoded_by_the_encoder(pil_format):
    data = encoded(pil_format)
    assert sniff_content_type(data) == Image.MIME[pil_format]
    image = decode_image(data, **LIMITS)
    assert (image.mode, image.size) == ("RGB", (16, 12))


def test_tiff_is_neither_sniffed_nor_decoded():
    data = encoded("TIFF")
    assert sniff_content_type(data) is None
    with pytest.raises(InvalidArgument, match="cannot identify the image format") as info:
        decode_image(data, **LIMITS)
    assert ACCEPTED_DESCRIPTION in info.value.message


@pytest.mark.parametrize("data", [b"", b"hello world", b"RIFF\x00\x00\x00\x00WAVEfmt ", b"\x89PN"])
def test_other_bytes_are_not_sniffed_as_images(data):
    assert sniff_content_type(data) is None


def test_file_extensions_are_pillows_extensions_of_the_accepted_formats():
    pillow_format_of = Image.registered_extensions()
    assert {pillow_format_of[extension] for extension in FILE_EXTENSIONS} == set(PIL_FORMATS)
    assert not {".tif", ".tiff"} & FILE_EXTENSIONS


def test_the_description_names_every_format():
    assert [name for name in PIL_FORMATS if name.lower() not in ACCEPTED_DESCRIPTION.lower()] == []


def test_file_names_are_matched_on_the_suffix_in_any_case():
    assert is_image_file_name("holiday/Beach.JPG") and is_image_file_name("a.b.webp")
    assert not is_image_file_name("scan.tiff")
    assert not is_image_file_name("notes.txt")
    assert not is_image_file_name("jpg")
