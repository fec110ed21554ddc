"""Page sizes of list calls, as AIP-158 asks: 0 means the default, and a size
above the maximum is lowered to it rather than refused."""

from __future__ import annotations

from clipsearch.errors import InvalidArgument


def clamp_page_size(value: int, default: int, maximum: int) -> int:
    """``default`` for 0, ``maximum`` for anything above it; a negative size is an InvalidArgument."""
    if value < 0:
        raise InvalidArgument(
            f"page_size must not be negative, got {value}; send 0 for the default of {default}, "
            f"or up to {maximum}",
            field="page_size",
        )
    return min(value or default, maximum)
