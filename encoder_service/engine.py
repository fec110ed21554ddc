"""The encoder engine: one open_clip model behind two dynamic batchers (texts,
images), with image fetching/decoding/preprocessing on a thread pool.

No gRPC here; errors are ``clipsearch.errors`` exceptions.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from clipsearch.admission import Admission
from clipsearch.errors import ClipsearchError, InvalidArgument, NotFound, Unavailable
from clipsearch.s3 import is_missing_error, make_s3_client, parse_s3_uri
from encoder_service.batcher import DynamicBatcher
from encoder_service.images import EncodedJpeg, TensorPreprocess, decode_image, decode_jpegs, inspect_jpeg
from encoder_service.model import ClipModel, ModelLoadError, load_model

log = logging.getLogger(__name__)


def _setting(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass
class EncoderConfig:
    model: str = _setting("ViT-B-32", "open_clip model name, or a folder with open_clip_config.json + weights")
    pretrained: str = _setting("openai", "pretrained tag (e.g. openai), a checkpoint file path, or none (random)")
    device: str = _setting("auto", "auto (CUDA when present), cpu, cuda or cuda:N")
    precision: str = _setting("auto", "auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16")
    runtime: str = _setting("auto", "auto (onnx on CPU, torch on CUDA), torch, or onnx (ONNX Runtime, CPU only)")
    onnx_quantize: str = _setting("none", "none or int8: int8 weights for the onnx runtime (see README, Encoder)")
    onnx_cache_dir: str = _setting("", "where ONNX exports are cached by model fingerprint "
                                       "(default: ~/.cache/clipsearch/onnx)")
    cuda_graph_max_batch: int = _setting(
        8, "torch on CUDA: batches up to this size replay CUDA graphs captured at startup (0 = off)")
    model_cache_dir: str = _setting("", "where downloaded weights are cached (default: open_clip's cache)")
    max_batch_size: int = _setting(64, "most items in one model call")
    max_queue_delay_ms: float = _setting(
        0.0, "extra time an item may wait for its batch to fill; 0 = none: items that arrive while the model "
        "is busy form the next batch")
    max_queue_size: int = _setting(2048, "items waiting beyond this get RESOURCE_EXHAUSTED")
    max_in_flight_mb: int = _setting(
        512, "budget of request payloads and decoded pixels held by admitted requests, in MiB; a request that "
        "would pass it gets RESOURCE_EXHAUSTED with a retry hint (0 = no budget)")
    max_queue_wait_ms: float = _setting(
        0.0, "most time the work queued ahead plus a request's own may be expected to take; longer gets "
        "RESOURCE_EXHAUSTED with a retry hint (0 = only the caller's deadline bounds it)")
    max_items_per_request: int = _setting(256, "most texts or images in one request")
    max_text_chars: int = _setting(2000, "longest text accepted, in characters")
    max_image_bytes: int = _setting(20 * 1024 * 1024, "largest encoded image accepted, in bytes")
    max_image_pixels: int = _setting(40_000_000, "largest image accepted, in pixels (stops decompression bombs)")
    preprocess_workers: int = _setting(0, "threads decoding and preprocessing images (0 = one per core)")
    image_decode: str = _setting(
        "auto", "where JPEGs are decoded and preprocessed: auto (on the GPU when the model is on one), cpu, "
        "or device (the model's device)")
    s3_endpoint_url: str = _setting("", "S3 endpoint for s3:// image URIs (MinIO, tests); empty = AWS")


@dataclass
class ImageSource:
    """One image to embed: encoded bytes or an s3:// URI."""

    data: bytes | None = None
    uri: str | None = None


@dataclass
class ImageEmbeddings:
    vectors: np.ndarray  # (n, dim); zero rows where the item failed
    errors: list[ClipsearchError | None] = field(default_factory=list)  # None where the item succeeded


def _expires(timeout: float | None) -> float | None:
    """The ``time.monotonic()`` deadline ``timeout`` seconds from now (None = none)."""
    return None if timeout is None else time.monotonic() + timeout


class EncoderEngine:
    def __init__(self, config: EncoderConfig):
        self.config = config
        self.model: ClipModel | None = None
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
        workers = config.preprocess_workers or os.cpu_count() or 1
        self._preprocess_pool = ThreadPoolExecutor(workers, thread_name_prefix="preprocess")
        self._s3 = None
        self.tensor_preprocess: TensorPreprocess | None = None  # set when JPEGs are decoded on the device
        self.text_batcher: DynamicBatcher | None = None
        self.image_batcher: DynamicBatcher | None = None
        # Texts and images share the model thread, so one admission times both queues.
        self.admission = Admission("encoder", max_bytes=config.max_in_flight_mb * 1024 * 1024,
                                   max_wait=config.max_queue_wait_ms / 1000.0)

    # -- lifecycle ---------------------------------------------------------
    async def start(self) -> None:
        """Loads the model (off the event loop) and starts the batchers."""
        loop = asyncio.get_running_loop()
        cfg = self.config
        self.model = await loop.run_in_executor(
            self._model_thread,
            lambda: load_model(cfg.model, cfg.pretrained, device=cfg.device, cache_dir=cfg.model_cache_dir,
                               precision=cfg.precision, runtime=cfg.runtime, onnx_quantize=cfg.onnx_quantize,
                               onnx_cache_dir=cfg.onnx_cache_dir, cuda_graph_max_batch=cfg.cuda_graph_max_batch),
        )
        common = dict(
            max_batch_size=cfg.max_batch_size,
            max_queue_delay_ms=cfg.max_queue_delay_ms,
            max_queue_size=cfg.max_queue_size,
            admission=self.admission,
        )
        self.text_batcher = DynamicBatcher("text", self.model.encode_texts, self._model_thread, **common)
        if cfg.image_decode not in ("auto", "cpu", "device"):
            raise ModelLoadError(f"image_decode must be auto, cpu or device; got {cfg.image_decode!r}")
        on_device = cfg.image_decode == "device" or (cfg.image_decode == "auto" and self.model.device.type == "cuda")
        if on_device and TensorPreprocess.supports(self.model.preprocess_config):
            self.tensor_preprocess = TensorPreprocess(self.model.preprocess_config, self.model.device)
        self.image_batcher = DynamicBatcher("image", self._encode_image_batch, self._model_thread, **common)
        self.text_batcher.start()
        self.image_batcher.start()

    async def close(self) -> None:
        for batcher in (self.text_batcher, self.image_batcher):
            if batcher is not None:
                await batcher.close()
        self._model_thread.shutdown(wait=True)
        self._preprocess_pool.shutdown(wait=True)

    def loaded_model(self) -> ClipModel:
        if self.model is None:
            raise Unavailable("the model is still loading; retry shortly")
        return self.model

    # -- texts -------------------------------------------------------------
    def _check_batch(self, count: int, what: str) -> None:
        if count == 0:
            raise InvalidArgument(f"no {what} given; send at least one", field=what)
        if count > self.config.max_items_per_request:
            raise InvalidArgument(
                f"{count} {what} in one request; the limit is {self.config.max_items_per_request}. "
                "Split the request.",
                field=what,
            )

    async def embed_texts(self, texts: list[str], timeout: float | None = None) -> np.ndarray:
        """Unit vectors for ``texts``; ``timeout``: seconds the caller still waits (None = no deadline)."""
        self.loaded_model()
        self._check_batch(len(texts), "texts")
        for i, text in enumerate(texts):
            if not text.strip():
                raise InvalidArgument(f"texts[{i}] is empty", field=f"texts[{i}]")
            if len(text) > self.config.max_text_chars:
                raise InvalidArgument(
                    f"texts[{i}] has {len(text)} characters; the limit is {self.config.max_text_chars}",
                    field=f"texts[{i}]",
                )
        expires = _expires(timeout)
        with self.admission.admit("text", items=len(texts), nbytes=sum(map(len, texts)), expires=expires):
            return await self.text_batcher.submit(texts, expires)

    # -- images ------------------------------------------------------------
    def _read_uri(self, uri: str, index: int) -> bytes:
        location = parse_s3_uri(uri, field=f"images[{index}].uri")
        if not location.key:
            raise InvalidArgument(f"images[{index}].uri has no key: {uri!r}", field=f"images[{index}].uri")
        if self._s3 is None:
            self._s3 = make_s3_client(self.config.s3_endpoint_url)
        try:
            head = self._s3.head_object(Bucket=location.bucket, Key=location.key)
            if head["ContentLength"] > self.config.max_image_bytes:
                raise InvalidArgument(
                    f"{uri} is {head['ContentLength']} bytes; the limit is {self.config.max_image_bytes}"
                )
            return self._s3.get_object(Bucket=location.bucket, Key=location.key)["Body"].read()
        except ClipsearchError:
            raise
        except Exception as exc:  # botocore errors
            if is_missing_error(exc):
                raise NotFound(f"{uri} does not exist (no such bucket or key)") from None
            raise Unavailable(f"could not read {uri}: {exc}") from None

    def _prepare(self, source: ImageSource, index: int) -> torch.Tensor | EncodedJpeg:
        """Fetch (when a URI), decode and preprocess one image; runs on the pool.
        With device decoding, a JPEG is only checked here and decoded in its batch."""
        model = self.loaded_model()
        if source.uri is not None:
            data = self._read_uri(source.uri, index)
        elif source.data is not None:
            data = source.data
        else:
            raise InvalidArgument(f"images[{index}] has neither data nor uri", field=f"images[{index}]")
        if self.tensor_preprocess is not None:
            jpeg = inspect_jpeg(data, max_bytes=self.config.max_image_bytes, max_pixels=self.config.max_image_pixels)
            if jpeg is not None:
                return jpeg  # decoded on the device, in the batch
        image = decode_image(
            data,
            max_bytes=self.config.max_image_bytes,
            max_pixels=self.config.max_image_pixels,
            target_size=model.image_size,
        )
        return model.preprocess(image)

    async def embed_images(self, sources: list[ImageSource], timeout: float | None = None) -> ImageEmbeddings:
        """Vectors and per-item errors; ``timeout``: seconds the caller still waits (None = no deadline).

        Admission charges each image's payload plus its preprocessed pixels (held until
        its model call). Full-size decoded pixels and bytes read from S3 live only inside
        a preprocess worker, so at most ``preprocess_workers`` x the pixel/byte limits."""
        model = self.loaded_model()
        self._check_batch(len(sources), "images")
        expires = _expires(timeout)
        pixels = 3 * model.image_size * model.image_size * 4  # one float32 tensor per image
        nbytes = sum(len(s.data or b"") + pixels for s in sources)
        with self.admission.admit("image", items=len(sources), nbytes=nbytes, expires=expires):
            return await self._embed_images(model, sources, expires)

    async def _embed_images(self, model: ClipModel, sources: list[ImageSource],
                            expires: float | None) -> ImageEmbeddings:
        loop = asyncio.get_running_loop()
        prepared = await asyncio.gather(
            *(loop.run_in_executor(self._preprocess_pool, self._prepare, s, i) for i, s in enumerate(sources)),
            return_exceptions=True,
        )
        errors: list[ClipsearchError | None] = []
        good_pixels, good_rows = [], []
        for i, outcome in enumerate(prepared):
            if isinstance(outcome, ClipsearchError):
                errors.append(outcome)
            elif isinstance(outcome, BaseException):
                log.warning("images[%d] failed: %r", i, outcome)
                errors.append(InvalidArgument(f"image could not be processed: {outcome}"))
            else:
                errors.append(None)
                good_pixels.append(outcome)
                good_rows.append(i)
        vectors = np.zeros((len(sources), model.dim), dtype=np.float32)
        if good_pixels:
            for row, outcome in zip(good_rows, await self.image_batcher.submit_each(good_pixels, expires)):
                if isinstance(outcome, ClipsearchError):
                    errors[row] = outcome
                elif isinstance(outcome, BaseException):
                    raise outcome
                else:
                    vectors[row] = outcome
        return ImageEmbeddings(vectors, errors)

    def _encode_image_batch(self, items: list[torch.Tensor | EncodedJpeg]) -> list[np.ndarray | ClipsearchError]:
        """One model call for a batch of preprocessed tensors and device-decoded JPEGs (model thread)."""
        model = self.loaded_model()
        outcomes: list = list(items)
        jpegs = [i for i, item in enumerate(items) if isinstance(item, EncodedJpeg)]
        if jpegs:
            decoded = decode_jpegs([items[i] for i in jpegs], model.device, self.tensor_preprocess)
            for position, pixels in zip(jpegs, decoded):
                outcomes[position] = pixels
        good = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, torch.Tensor)]
        if good:
            vectors = model.encode_pixels(torch.stack([outcomes[i].to(model.device) for i in good]))
            for position, vector in zip(good, vectors):
                outcomes[position] = vector
        return outcomes
