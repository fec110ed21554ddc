"""CUDA graphs for small batches on the torch runtime (GPU).

At batch 1-8 a CUDA model call is bound by kernel launches, not by math. Each
(batch, length) bucket's forward is captured once at startup into a CUDA graph
and replayed: the batch is copied into the bucket's static input (padded with
zero rows, and texts with zero tokens after their end-of-text token, which a
causal tower never looks back at), the graph replays, and the first rows of the
static output are the batch's vectors. Larger batches run eagerly.

``capture=False`` runs the same bucketed, padded path without graphs (on the
CPU too): tests check it against the unpadded model. No gRPC here.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import torch

log = logging.getLogger(__name__)

LENGTH_BUCKETS = (16, 32, 77)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two up to ``max_batch`` (and ``max_batch`` itself)."""
    sizes, size = [], 1
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return tuple(sizes + [max_batch]) if max_batch > 0 else ()


def _bucket(value: int, buckets: tuple[int, ...]) -> int | None:
    return next((b for b in buckets if b >= value), None)


class _Graph:
    """One captured forward over a static input (or, without capture, the same call eagerly)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor, capture: bool):
        self.fn, self.input, self.graph = fn, example, None
        if capture:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):  # warm-up: allocator, cuBLAS handles, autotuning
                    fn(self.input)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.output = fn(self.input)

    def run(self, batch: torch.Tensor) -> np.ndarray:
        rows = batch.shape[0]
        self.input.zero_()
        self.input[:rows, : batch.shape[1]].copy_(batch, non_blocking=True)
        if self.graph is None:
            return self.fn(self.input)[:rows].float().cpu().numpy()
        self.graph.replay()
        return self.output[:rows].float().cpu().numpy()


class GraphedTowers:
    """Bucketed small-batch calls of a ClipModel's trimmed text tower and image tower."""

    def __init__(self, clip_model, max_batch: int = 8, *, capture: bool | None = None,
                 length_buckets: tuple[int, ...] = LENGTH_BUCKETS):
        device = clip_model.device
        capture = device.type == "cuda" if capture is None else capture
        self.batches = batch_buckets(max_batch)
        self.lengths = tuple(sorted({min(b, clip_model.context_length) for b in length_buckets}))
        self.text: dict[tuple[int, int], _Graph] = {}
        self.image: dict[int, _Graph] = {}
        model, size = clip_model.model, clip_model.image_size

        def image_fn(pixels: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.normalize(model.encode_image(pixels).float(), dim=-1)

        with torch.inference_mode():
            for batch in self.batches:
                if clip_model.text_tower is not None:
                    for length in self.lengths:
                        example = torch.zeros(batch, length, dtype=torch.long, device=device)
                        self.text[batch, length] = _Graph(clip_model._text, example, capture)
                example = torch.zeros(batch, 3, size, size, dtype=clip_model.dtype, device=device)
                self.image[batch] = _Graph(image_fn, example, capture)
        log.info("%s %d text and %d image buckets (batches %s, lengths %s)",
                 "captured CUDA graphs for" if capture else "bucketed calls without graphs for",
                 len(self.text), len(self.image), self.batches, self.lengths)

    def encode_tokens(self, tokens: torch.Tensor) -> np.ndarray | None:
        """Unit vectors for trimmed tokens, or None when no bucket fits (run it eagerly)."""
        batch, length = _bucket(tokens.shape[0], self.batches), _bucket(tokens.shape[1], self.lengths)
        graph = self.text.get((batch, length)) if batch and length else None
        return None if graph is None else graph.run(tokens)

    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray | None:
        batch = _bucket(pixels.shape[0], self.batches)
        graph = self.image.get(batch) if batch else None
        return None if graph is None else graph.run(pixels)
