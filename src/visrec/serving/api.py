"""The recognition service's endpoints as plain Python: what ``bento/service.py`` passes calls to.

Each method takes what the HTTP layer parsed (uploaded files as paths, form values) and
returns a JSON-ready dict, or raises a :class:`visrec.serving.errors.ServiceError` that carries
its HTTP status. Unit-tested without a server; the BentoML shell only maps errors to responses.

:class:`ServeSettings` gathers everything the service is configured with: the params file
(``VISREC_PARAMS``), its ``serve`` section, and the environment overrides
(``VISREC_MAX_UPLOAD_MB``, ``VISREC_MAX_PIXELS``, ``VISREC_ADAPTIVE_BATCHING``,
``VISREC_WORKERS``, ``VISREC_ADMIN_TOKEN``). The request guard's limits come from the same
settings as the handlers', so they cannot disagree.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import unicodedata
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from visrec.config import Config, load_config
from visrec.serving import check_admin
from visrec.serving.errors import BadRequest, Forbidden, PayloadTooLarge, Unauthorized, Unavailable
from visrec.serving.guard import FormSpec, Route
from visrec.serving.images import BadImageError, DecodedImage, ImageTooLarge, configure_pil, decode_image

logger = logging.getLogger(__name__)

PARAMS_ENV = "VISREC_PARAMS"
MAX_UPLOAD_ENV = "VISREC_MAX_UPLOAD_MB"
MAX_PIXELS_ENV = "VISREC_MAX_PIXELS"
ADMIN_TOKEN_ENV = "VISREC_ADMIN_TOKEN"
WORKERS_ENV = "VISREC_WORKERS"
BATCHING_ENV = "VISREC_ADAPTIVE_BATCHING"  # 0/false: /embed calls the extractor one request at a time

MAX_TOP_K = 100
MAX_FILES_PER_ADD = 16
MAX_LABEL_CHARS = 200
MAX_IDS_PER_REMOVE = 10_000
MULTIPART_OVERHEAD = 1024 * 1024  # form fields and part headers around the file bytes
# The batch sizes the extractor is called with: a batch is padded up to the next one, so the
# model sees a handful of input shapes however requests happen to be grouped.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)

# Paths the server answers (anything else: 404 before BentoML's metrics count it).
API_ROUTES = ("/recognize", "/embed", "/embed_batch", "/gallery/add", "/gallery/remove", "/gallery/info")
INFRA_ROUTES = ("/", "/livez", "/readyz", "/healthz", "/metrics", "/docs.json", "/schema.json")
INFRA_PREFIXES = ("/static_content/", "/assets/")


def _env_number(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {raw!r}")
    return value


@dataclass(frozen=True)
class ServeSettings:
    params: Path
    config: Config
    admin_token: str | None
    workers: int
    max_bytes: int  # per uploaded image
    max_pixels: int
    adaptive_batching: bool
    request_threads: int = 4
    max_header_bytes: int = 64 * 1024

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServeSettings:
        """The params file's ``serve`` section with the environment's overrides (read once, at import)."""
        env = os.environ if environ is None else environ
        params = Path(env.get(PARAMS_ENV) or "params.yaml")
        config = load_config(params)
        serve = config.serve
        workers = _env_number(env, WORKERS_ENV, serve.workers)
        if workers != int(workers):
            raise ValueError(f"{WORKERS_ENV} must be a positive integer, got {env.get(WORKERS_ENV)!r}")
        for key in ("model_threads", "request_threads"):
            value = getattr(serve, key)
            if value is not None and value < 1:
                raise ValueError(f"serve.{key} must be at least 1, got {value}")
        # Each worker's models get their share of the threads one worker would use: N workers
        # on the cores of one must not oversubscribe them.
        model_threads = serve.model_threads or max(1, config.recognition.num_threads // int(workers))
        config = dataclasses.replace(config, recognition=dataclasses.replace(config.recognition,
                                                                             num_threads=model_threads))
        batching = env.get(BATCHING_ENV)
        return cls(params=params, config=config, admin_token=env.get(ADMIN_TOKEN_ENV) or None, workers=int(workers),
                   request_threads=serve.request_threads,
                   max_bytes=int(_env_number(env, MAX_UPLOAD_ENV, config.serve.max_upload_mb) * 1024 * 1024),
                   max_pixels=int(_env_number(env, MAX_PIXELS_ENV, config.serve.max_pixels)),
                   adaptive_batching=(config.serve.adaptive_batching if batching is None
                                      else batching.strip().lower() not in ("0", "false", "no", "off")))

    def extractor_size(self) -> int | None:
        """The served extractor's input size (model.json), or None when no model is there yet."""
        from visrec.inference.export import read_model_json
        from visrec.workflows.champion import served_recognition

        try:
            settings, _ = served_recognition(self.config, self.params.resolve().parent)
            return int(read_model_json(settings.extractor)["input_size"][0])
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            return None

    def routes(self) -> dict[str, Route]:
        """The request guard's rules, one per API route."""
        one_image = self.max_bytes + MULTIPART_OVERHEAD
        post = frozenset({"POST"})
        return {
            "/recognize": Route(post, one_image, form=FormSpec(
                {"image": 1}, frozenset({"top_k", "threshold", "return_topk"}), frozenset({"image"}))),
            "/embed": Route(post, one_image, form=FormSpec({"image": 1}, required=frozenset({"image"}))),
            "/embed_batch": Route(post, one_image),
            "/gallery/add": Route(post, self.max_bytes * MAX_FILES_PER_ADD + MULTIPART_OVERHEAD, admin=True,
                                  form=FormSpec({"images": MAX_FILES_PER_ADD}, frozenset({"label", "labels"}),
                                                frozenset({"images"}))),
            "/gallery/remove": Route(post, MULTIPART_OVERHEAD, admin=True),
            "/gallery/info": Route(frozenset({"GET"}), 0),
        }

    def authorize(self, authorization: str | None) -> None:
        """Admin calls: raise Forbidden (no token configured) or Unauthorized (missing/wrong)."""
        status, message = check_admin(self.admin_token, authorization)
        if status == 403:
            raise Forbidden(message)
        if status != 200:
            raise Unauthorized(message, headers={"WWW-Authenticate": "Bearer"})


def check_label(label: str, where: str = "label") -> str:
    """A gallery label: 1..MAX_LABEL_CHARS characters, no control or line-break characters."""
    if not isinstance(label, str):
        raise BadRequest(f"{where} must be a string")
    if not label.strip():
        raise BadRequest(f"{where} must be a non-empty string")
    if len(label) > MAX_LABEL_CHARS:
        raise BadRequest(f"{where} is {len(label)} characters long, the limit is {MAX_LABEL_CHARS}")
    bad = next((c for c in label if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp", "Cs")), None)
    if bad is not None:
        raise BadRequest(f"{where} contains the control character U+{ord(bad):04X}: labels are printable text "
                         "on one line")
    return label


def labels_for_upload(count: int, label: object = None, labels: object = None) -> list[str]:
    """One label per uploaded image, from ``label`` (for all) or ``labels`` (one each, in order).

    Raises BadRequest naming the problem: neither or both given, a count mismatch, a bad label."""
    if (label is None) == (labels is None):
        raise BadRequest("give exactly one of 'label' (for every image) or 'labels' (a JSON list, one per image)")
    if labels is None:
        if not isinstance(label, str | int | float) or isinstance(label, bool):
            raise BadRequest("'label' must be a string")
        names = [str(label)] * count
    else:
        if not isinstance(labels, list) or not all(isinstance(x, str | int | float) for x in labels):
            raise BadRequest("'labels' must be a JSON list of strings, one per image")
        names = [str(x) for x in labels]
    if len(names) != count:
        raise BadRequest(f"{len(names)} labels for {count} images: give one label per image")
    for i, name in enumerate(names):
        check_label(name, "label" if labels is None else f"labels[{i}]")
    return names


def image_arrays(size: int | None) -> Callable[[Any], np.ndarray]:
    """A validator for ``/embed_batch``'s JSON input: a float32 ``[N, size, size, 3]`` array
    (an empty list is N = 0), else ValueError, which pydantic turns into a 400. It runs before
    BentoML's tensor validator, which lets a TypeError (an object inside the list) out as a
    500, and a batchable API must not raise for one request's content: the batch it joins
    would fail with it."""

    def validate(value: Any) -> np.ndarray:
        try:
            array = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError, OverflowError):
            raise ValueError("expected a (nested) list of numbers") from None
        if size is None:
            return array
        if array.size == 0:
            return np.zeros((0, size, size, 3), dtype=np.float32)
        if array.ndim != 4 or array.shape[1:] != (size, size, 3):
            raise ValueError(f"expected an array of shape [N, {size}, {size}, 3], got {list(array.shape)}")
        return array

    return validate


def bucket(n: int) -> int:
    """The batch size a batch of ``n`` rows is padded to (see BATCH_BUCKETS)."""
    return next((b for b in BATCH_BUCKETS if b >= n), n)


class RecognitionAPI:
    """The endpoints over a :class:`visrec.serving.live.LiveRecognition`."""

    def __init__(self, settings: ServeSettings, on_batch=None) -> None:
        from visrec.serving.batching import AdaptiveBatcher
        from visrec.serving.live import LiveRecognition

        self.settings = settings
        serve = settings.config.serve
        configure_pil(settings.max_pixels)
        self.live = LiveRecognition(settings.config, base=settings.params.resolve().parent)
        self.live.clean_uploads()
        # BentoML's adaptive batching dispatcher, run in-process (visrec.serving.batching).
        self.batcher = (AdaptiveBatcher(self._embed_preprocessed, serve.max_batch_size, serve.max_batch_latency_ms,
                                        on_batch=on_batch) if settings.adaptive_batching else None)
        self.worker = uuid.uuid4().hex[:12]  # tells workers apart in /gallery/info (not a PID)
        logger.info("visrec service ready (params %s)", settings.params)

    # ------------------------------------------------------------------ uploads

    def read_image(self, path: Path, name: str = "image") -> DecodedImage:
        """An uploaded file, size-checked before it is read, decoded (BadImageError naming ``name``)."""
        limit = self.settings.max_bytes
        size = path.stat().st_size
        if size > limit:
            raise ImageTooLarge(f"{name}: upload too large: {size} bytes, the limit is {limit} bytes "
                                f"({limit / 2**20:.1f} MiB, serve.max_upload_mb)")
        try:
            return decode_image(path.read_bytes(), limit, self.settings.max_pixels)
        except BadImageError as exc:
            raise type(exc)(f"{name}: {exc}") from None

    # ------------------------------------------------------------------ recognition

    def recognize(self, image: Path, top_k: int | None = None, threshold: float | None = None,
                  return_topk: bool = False) -> dict[str, Any]:
        if top_k is not None and not 1 <= top_k <= MAX_TOP_K:
            raise BadRequest(f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}")
        if threshold is not None and not (np.isfinite(threshold) and -1.0 <= threshold <= 1.0):
            raise BadRequest(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
        array = self.read_image(image).array
        system, gallery = self.live.refresh()
        if len(gallery) == 0:
            from visrec.serving.errors import Conflict

            raise Conflict("the gallery is empty: add images first (POST /gallery/add)")
        start = time.perf_counter()
        described = self.live.describe(array, system, gallery)
        results = system.recognize(described, gallery=gallery, top_k=top_k, threshold=threshold,
                                   return_topk=return_topk)
        return {"results": results, "gallery_version": gallery.version, "champion": self.live.champion,
                "elapsed_ms": round((time.perf_counter() - start) * 1000, 2)}

    def _embed_preprocessed(self, batch: np.ndarray) -> np.ndarray:
        """Preprocessed NCHW rows -> embeddings, padded to a bucket size (bounded input shapes)."""
        system, _ = self.live.refresh()
        n = int(batch.shape[0])
        size = bucket(n)
        if size != n:
            batch = np.concatenate([batch, np.zeros((size - n, *batch.shape[1:]), dtype=batch.dtype)])
        return self.live.run_model(system.extractor.embed_batch, batch)[:n]

    async def embed(self, image: Path) -> dict[str, Any]:
        """The embedding of a whole uploaded image (adaptively batched with concurrent calls)."""
        import anyio

        # In a thread: after a promotion, refresh() loads the new models (seconds), which must
        # not stall the event loop that every other request shares.
        system, _ = await anyio.to_thread.run_sync(self.live.refresh)
        extractor = system.extractor
        decoded = await anyio.to_thread.run_sync(self.read_image, image)
        row = (await anyio.to_thread.run_sync(extractor.preprocess, decoded.array))[None]
        if self.batcher is not None:  # grouped with concurrent requests into one extractor call
            from visrec.serving.batching import BatcherOverloaded

            try:
                vectors = await self.batcher(row)
            except BatcherOverloaded as exc:
                raise Unavailable(str(exc)) from None
        else:
            vectors = await anyio.to_thread.run_sync(self._embed_preprocessed, row)
        vector = np.asarray(vectors).reshape(-1)
        return {"embedding": [round(float(v), 7) for v in vector], "dim": int(vector.size),
                "fingerprint": extractor.fingerprint}

    def embed_arrays(self, images: Any) -> np.ndarray:
        """``[N, S, S, 3]`` RGB at the extractor's input size -> ``[N, D]`` embeddings (N may be 0;
        values are clipped to 0..255, NaN counts as 0). Raises BadRequest for another shape."""
        system, _ = self.live.refresh()
        extractor = system.extractor
        try:
            images = np.asarray(images)
        except (TypeError, ValueError):
            images = np.zeros(0)
        if (images.ndim != 4 or images.shape[1:] != (extractor.size, extractor.size, 3)
                or images.dtype.kind not in "fiub"):
            raise BadRequest(f"'images' must be a numeric array of shape [N, {extractor.size}, "
                             f"{extractor.size}, 3] (RGB, 0..255), got shape {list(images.shape)} of {images.dtype}")
        if len(images) == 0:
            return np.zeros((0, extractor.dim), dtype=np.float32)
        images = np.clip(np.nan_to_num(images.astype(np.float32, copy=False)), 0, 255).astype(np.uint8)
        batch = np.stack([extractor.preprocess(img) for img in images])
        return np.concatenate([self._embed_preprocessed(batch[i:i + 32]) for i in range(0, len(batch), 32)])

    # ------------------------------------------------------------------ gallery admin

    def gallery_add(self, images: Sequence[Path], label: object = None, labels: object = None) -> dict[str, Any]:
        """Add uploaded images (whole-image views) under ``label`` (all) or ``labels`` (one each)."""
        if not images:
            raise BadRequest("no images uploaded: send one or more files in the 'images' field")
        if len(images) > MAX_FILES_PER_ADD:
            raise PayloadTooLarge(f"too many images in one call: {len(images)}, the limit is {MAX_FILES_PER_ADD}")
        if isinstance(labels, str):  # a form field that was not valid JSON
            try:
                labels = json.loads(labels)
            except ValueError:
                raise BadRequest("'labels' must be a JSON list of strings, one per image") from None
        names = labels_for_upload(len(images), label, labels)
        decoded = []
        for i, path in enumerate(images):
            decoded.append(self.read_image(path, f"images[{i}]"))
        uploads = [(path.read_bytes(), image.extension) for path, image in zip(images, decoded, strict=True)]
        ids, gallery = self.live.add_images([d.array for d in decoded], names, uploads)
        logger.info("gallery add: %d image(s), labels %s -> ids %s", len(ids), sorted(set(names))[:10], ids)
        return {"ids": [int(i) for i in ids], "labels": [gallery.label_of(i) for i in ids], "count": len(gallery),
                "gallery_version": gallery.version}

    def gallery_remove(self, ids: Sequence[int] | None = None, label: str | None = None) -> dict[str, Any]:
        """Remove entries by ``ids`` or every entry of ``label``."""
        if ids is not None and len(ids) > MAX_IDS_PER_REMOVE:
            raise PayloadTooLarge(f"too many ids in one call: {len(ids)}, the limit is {MAX_IDS_PER_REMOVE}")
        if label is not None:
            check_label(label)
        removed, gallery = self.live.remove(ids, label)
        logger.info("gallery remove: %s -> %d entries removed", f"label {label!r}" if label else f"ids {ids}",
                    removed)
        return {"removed": removed, "count": len(gallery), "gallery_version": gallery.version}

    def gallery_info(self) -> dict[str, Any]:
        """The live gallery's public summary (no file paths, process ids or thread counts)."""
        system, gallery = self.live.refresh()
        info = gallery.info()
        public = {k: info.get(k) for k in ("count", "labels", "dim", "index_type", "metric", "version", "created",
                                            "updated", "fingerprint")}
        public.update({"extractor_fingerprint": system.extractor.fingerprint, "champion": self.live.champion,
                       "worker": self.worker})
        return json.loads(json.dumps(public, default=str))
