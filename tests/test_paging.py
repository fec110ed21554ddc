"""Page sizes are clamped, not refused (AIP-158)."""

from __future__ import annotations

import pytest

from clipsearch.errors import InvalidArgument
from clipsearch.paging import clamp_page_size


def test_zero_means_the_default():
    assert clamp_page_size(0, 100, 1000) == 100


def test_sizes_up_to_the_maximum_are_kept():
    assert [clamp_page_size(size, 100, 1000) for size in (1, 250, 1000)] == [1, 250, 1000]


def test_sizes_above_the_maximum_are_lowered_to_it():
    assert clamp_page_size(5000, 100, 1000) == 1000


def test_a_negative_size_says_what_to_send():
    with pytest.raises(InvalidArgument, match="send 0 for the default of 100") as info:
        clamp_page_size(-1, 100, 1000)
    assert info.value.field == "page_size"
