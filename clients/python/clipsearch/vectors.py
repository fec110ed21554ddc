"""Packing of float32 matrices into ``clipsearch.common.v1.VectorMatrix``."""

from __future__ import annotations

import numpy as np

from clipsearch.common.v1 import common_pb2
from clipsearch.errors import InvalidArgument

FLOAT32_LE = np.dtype("<f4")


def pack_matrix(matrix: np.ndarray) -> common_pb2.VectorMatrix:
    matrix = np.asarray(matrix)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-d matrix, got shape {matrix.shape}")
    rows, dim = matrix.shape
    data = np.ascontiguousarray(matrix, dtype=FLOAT32_LE).tobytes()
    return common_pb2.VectorMatrix(data=data, dim=dim, rows=rows)


def unpack_matrix(message: common_pb2.VectorMatrix, field: str = "vectors") -> np.ndarray:
    """The (rows, dim) float32 array in ``message``; InvalidArgument when malformed."""
    if message.dim == 0:
        raise InvalidArgument(f"{field}.dim must be > 0", field=f"{field}.dim")
    expected = message.rows * message.dim * 4
    if len(message.data) != expected:
        raise InvalidArgument(
            f"{field}.data has {len(message.data)} bytes but rows={message.rows} x dim={message.dim} "
            f"float32 needs {expected}",
            field=f"{field}.data",
        )
    array = np.frombuffer(message.data, dtype=FLOAT32_LE).reshape(message.rows, message.dim)
    return array.astype(np.float32, copy=False)


def pack_vector(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=FLOAT32_LE).tobytes()


def unpack_vector(data: bytes, dim: int | None = None, field: str = "vector") -> np.ndarray:
    if len(data) % 4 or (dim is not None and len(data) != dim * 4):
        want = f"{dim * 4} bytes ({dim} float32)" if dim is not None else "a multiple of 4 bytes"
        raise InvalidArgument(f"{field} has {len(data)} bytes; expected {want}", field=field)
    return np.frombuffer(data, dtype=FLOAT32_LE).astype(np.float32)
