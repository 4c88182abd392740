"""The visrec recognition service (BentoML 1.4).

    VISREC_PARAMS=params.yaml VISREC_ADMIN_TOKEN=... \
        bentoml serve bento.service:VisrecRecognition --host 127.0.0.1 --port 3000

Endpoints (images are multipart file uploads, field ``image`` / ``images``):

* ``POST /recognize``     image [+ top_k, threshold, return_topk] -> {"results": [{bbox, rec_docs, rec_scores}]}
* ``POST /embed``         image -> {"embedding": [...], "dim": D, "fingerprint": "..."}; with
                          ``serve.adaptive_batching`` concurrent requests are grouped into one
                          extractor call by BentoML's adaptive dispatcher, run in-process
                          (``visrec.serving.batching``)
* ``POST /embed_batch``   ``batchable=True``: arrays ``[N, S, S, 3]`` -> embeddings, for array clients
* ``POST /gallery/add``   images + label (one for all) or labels (a JSON list)      [admin]
* ``POST /gallery/remove`` {"ids": [...]} or {"label": "..."}                          [admin]
* ``GET  /gallery/info``  the live gallery's summary
* ``GET  /livez``, ``GET /readyz`` (BentoML's own)

Admin calls need ``Authorization: Bearer $VISREC_ADMIN_TOKEN``; with the variable unset they
are disabled (403), never open. ``VISREC_PARAMS`` [params.yaml] names the params file: its
``recognition`` section names models and gallery, its ``serve`` section the upload limits
(``VISREC_MAX_UPLOAD_MB`` and ``VISREC_MAX_PIXELS`` override them).

What is served: the promoted champion (``paths.champion``, published by the promotion gate)
when ``serve.champion`` is on and one exists, else the pipeline's latest export. Every worker
follows promotions and gallery changes on disk without a restart, and gallery changes are
copy-on-write, so a request never sees half a change: see ``visrec.serving.live``. Images added
through ``/gallery/add`` are kept under ``serve.upload_dir`` so a new champion can re-embed them.

Bad uploads (empty, not an image, truncated, too many bytes, too many pixels) get a 4xx JSON
body ``{"error": "..."}`` naming the problem; see ``visrec.serving.images``.
"""

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from starlette.responses import JSONResponse

# Paddle installs an INFO-level root log handler at import: undo that after our imports, so
# BentoML's logging configuration is the one in force (and faiss/paddle INFO chatter stays out).
_root = logging.getLogger()
_root_state = (list(_root.handlers), _root.level)

with bentoml.importing():
    import cv2
    from fastapi import FastAPI

    from visrec.config import load_config
    from visrec.index.gallery import UnknownIdError
    from visrec.serving import BodySizeLimit, check_admin, configure_pil, labels_for_upload
    from visrec.serving.batching import AdaptiveBatcher, BatcherOverloaded
    from visrec.serving.live import LiveRecognition
    from visrec.serving.images import BadImageError, decode_upload

for _handler in [h for h in _root.handlers if h not in _root_state[0]]:
    _root.removeHandler(_handler)
_root.setLevel(_root_state[1])

logger = logging.getLogger("bentoml.visrec")  # under "bentoml": its handlers, format and INFO level

PARAMS_ENV = "VISREC_PARAMS"
MAX_UPLOAD_ENV = "VISREC_MAX_UPLOAD_MB"
MAX_PIXELS_ENV = "VISREC_MAX_PIXELS"
ADMIN_TOKEN_ENV = "VISREC_ADMIN_TOKEN"
WORKERS_ENV = "VISREC_WORKERS"
BATCHING_ENV = "VISREC_ADAPTIVE_BATCHING"  # 0/false: /embed calls the extractor one request at a time
MAX_TOP_K = 100
MAX_FILES_PER_ADD = 16
MULTIPART_OVERHEAD = 1024 * 1024  # form fields and part headers around the file bytes

info_app = FastAPI(title="visrec gallery (read-only)")
# Rows per extractor call of /embed's in-process adaptive batching (served at /metrics).
EMBED_BATCH_SIZE = bentoml.metrics.Histogram(
    name="visrec_embed_batch_size", documentation="images per extractor call of /embed (adaptive batching)",
    buckets=(1, 2, 4, 8, 16, 32, 64))


def error(status: int, message: str, ctx: Any = None) -> JSONResponse:
    """A 4xx/5xx JSON body ``{"error": message}``.

    An API that takes ``ctx`` must pass it: BentoML then copies ``ctx.response.status_code``
    onto whatever response the API returns, so it has to carry the status too.
    """
    if ctx is not None:
        ctx.response.status_code = status
    return JSONResponse({"error": message}, status_code=status)


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {raw!r}")
    return value


def _workers() -> int:
    """Worker processes (VISREC_WORKERS, default 1): each loads its own models and follows the same
    champion and gallery on disk. Read at import: BentoML fixes the worker count when it starts."""
    workers = int(_env_number(WORKERS_ENV, 1))
    if workers < 1 or workers != _env_number(WORKERS_ENV, 1):
        raise ValueError(f"{WORKERS_ENV} must be a positive integer, got {os.environ.get(WORKERS_ENV)!r}")
    return workers


@bentoml.asgi_app(info_app, path="/gallery")
@bentoml.service(name="visrec", traffic={"timeout": 120}, workers=_workers())
class VisrecRecognition:
    def __init__(self) -> None:
        params = os.environ.get(PARAMS_ENV, "params.yaml")
        config = load_config(params)
        self.max_bytes = int(_env_number(MAX_UPLOAD_ENV, config.serve.max_upload_mb) * 1024 * 1024)
        self.max_pixels = int(_env_number(MAX_PIXELS_ENV, config.serve.max_pixels))
        batching = os.environ.get(BATCHING_ENV)
        self.adaptive_batching = (config.serve.adaptive_batching if batching is None
                                  else batching.strip().lower() not in ("0", "false", "no", "off"))
        # BentoML's adaptive batching dispatcher, run in-process (visrec.serving.batching): the
        # proxy call to the batchable endpoint below costs an HTTP hop with a JSON array per image.
        self.batcher = (AdaptiveBatcher(self._embed_arrays, config.serve.max_batch_size,
                                        config.serve.max_batch_latency_ms, on_batch=EMBED_BATCH_SIZE.observe)
                        if self.adaptive_batching else None)
        configure_pil(self.max_pixels)
        self.live = LiveRecognition(config, base=Path(params).resolve().parent)
        logger.info("visrec service ready (params %s)", params)

    # ------------------------------------------------------------------ helpers

    def _admin(self, ctx: bentoml.Context) -> JSONResponse | None:
        status, message = check_admin(os.environ.get(ADMIN_TOKEN_ENV), ctx.request.headers.get("authorization"))
        return None if status == 200 else error(status, message, ctx)

    def _read_upload(self, path: Path) -> np.ndarray:
        """The uploaded file as HWC uint8 RGB; size checked before reading (BadImageError)."""
        return self._read_upload_bytes(path)[0]

    def _read_upload_bytes(self, path: Path) -> tuple[np.ndarray, bytes]:
        """(HWC uint8 RGB image, the file's bytes); size checked before reading (BadImageError)."""
        size = path.stat().st_size
        if size > self.max_bytes:
            raise BadImageError(f"upload too large: {size} bytes, the limit is {self.max_bytes} bytes "
                                f"({self.max_bytes / 2**20:.1f} MiB; {MAX_UPLOAD_ENV})")
        data = path.read_bytes()
        return decode_upload(data, self.max_bytes, self.max_pixels), data

    @staticmethod
    def _bad_image(exc: BadImageError, name: str = "image", ctx: Any = None) -> JSONResponse:
        status = 413 if str(exc).startswith(("upload too large", "image too large")) else 400
        return error(status, f"{name}: {exc}", ctx)

    # ------------------------------------------------------------------ recognition

    @bentoml.api(route="/recognize")
    def recognize(self, image: Path, top_k: int | None = None, threshold: float | None = None,
                  return_topk: bool = False) -> dict[str, Any]:
        """Recognise the objects in an uploaded image: boxes, labels, cosine scores."""
        if top_k is not None and not 1 <= top_k <= MAX_TOP_K:
            return error(400, f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}")
        if threshold is not None and not -1.0 <= threshold <= 1.0:
            return error(400, f"threshold is a cosine similarity in [-1, 1], got {threshold}")
        try:
            array = self._read_upload(image)
        except BadImageError as exc:
            return self._bad_image(exc)
        system, gallery = self.live.refresh()
        if len(gallery) == 0:
            return error(409, "the gallery is empty: add images first (POST /gallery/add)")
        start = time.perf_counter()
        boxes, features = self.live.describe(array, system)
        results = system.recognize(boxes, features, gallery=gallery, top_k=top_k, threshold=threshold,
                                        return_topk=return_topk)
        return {"results": results, "gallery_version": gallery.version, "champion": self.live.champion,
                "elapsed_ms": round((time.perf_counter() - start) * 1000, 2)}

    @bentoml.api(route="/embed_batch", batchable=True, batch_dim=0, max_batch_size=32, max_latency_ms=2000)
    def embed_batch(self, images: np.ndarray) -> np.ndarray:
        """Adaptive-batching extractor call for clients that send decoded arrays: ``[N, S, S, 3]``
        uint8 RGB at the extractor's input size ``S`` -> ``[N, D]`` L2-normalised embeddings.
        Concurrent HTTP calls are batched by BentoML's dispatcher."""
        return self._embed_arrays(images)

    def _embed_arrays(self, images: np.ndarray) -> np.ndarray:
        """The extractor call itself (inside a server ``self.embed_batch`` is BentoML's proxy)."""
        system, _ = self.live.refresh()
        extractor = system.extractor
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (extractor.size, extractor.size, 3):
            raise bentoml.exceptions.InvalidArgument(
                f"expected [N, {extractor.size}, {extractor.size}, 3] images, got shape {list(images.shape)}")
        images = np.clip(images, 0, 255).astype(np.uint8, copy=False)
        return self.live.embed(list(images), system)

    @bentoml.api(route="/embed")
    async def embed(self, image: Path) -> dict[str, Any]:
        """The embedding of a whole uploaded image (adaptively batched with concurrent calls)."""
        import anyio

        # In a thread: after a promotion, refresh() loads the new models (seconds), which must
        # not stall the event loop that every other request shares.
        system, _ = await anyio.to_thread.run_sync(self.live.refresh)
        extractor = system.extractor
        try:
            array = await anyio.to_thread.run_sync(self._read_upload, image)
        except BadImageError as exc:
            return self._bad_image(exc)
        # Extractor.preprocess would do this same resize; doing it here makes batchable inputs
        # one shape and keeps the in-process hop small.
        if array.shape[:2] != (extractor.size, extractor.size):
            array = cv2.resize(array, (extractor.size, extractor.size), interpolation=cv2.INTER_LINEAR)
        batch = array[None]
        if self.batcher is not None:  # grouped with concurrent requests into one extractor call
            try:
                vectors = await self.batcher(batch)
            except BatcherOverloaded as exc:
                return error(503, str(exc))
        else:
            vectors = await anyio.to_thread.run_sync(self._embed_arrays, batch)
        vector = vectors.reshape(-1)
        return {"embedding": [round(float(v), 7) for v in vector], "dim": int(vector.size),
                "fingerprint": extractor.fingerprint}

    # ------------------------------------------------------------------ gallery admin

    @bentoml.api(route="/gallery/add")
    def gallery_add(self, images: list[Path], ctx: bentoml.Context, label: str | int | float | None = None,
                    labels: list[str] | None = None) -> dict[str, Any]:
        """Add uploaded images (whole-image embeddings) under ``label`` (all) or ``labels``
        (a JSON list, one per image, in upload order). Admin only."""
        if (denied := self._admin(ctx)) is not None:
            return denied
        if not images:
            return error(400, "no images uploaded: send one or more files in the 'images' field", ctx)
        if len(images) > MAX_FILES_PER_ADD:
            return error(413, f"too many images in one call: {len(images)}, the limit is {MAX_FILES_PER_ADD}", ctx)
        try:
            names = labels_for_upload(len(images), label, labels)
        except ValueError as exc:
            return error(400, str(exc), ctx)
        arrays, stored = [], []
        for i, path in enumerate(images):
            try:
                array, data = self._read_upload_bytes(path)
            except BadImageError as exc:
                return self._bad_image(exc, f"images[{i}]", ctx)
            arrays.append(array)
            stored.append(data)
        # kept (content-addressed) so that a future champion's extractor can re-embed them
        stored = [self.live.store_upload(data, path.suffix or ".img") for data, path in zip(stored, images)]
        try:
            ids, gallery = self.live.add_images(arrays, names, stored)
        except ValueError as exc:
            return error(422, str(exc), ctx)
        except RuntimeError as exc:  # a promotion raced the embedding
            return error(409, str(exc), ctx)
        logger.info("gallery add: %d image(s), labels %s -> ids %s", len(ids), sorted(set(names)), ids)
        return {"ids": [int(i) for i in ids], "labels": [gallery.label_of(i) for i in ids], "count": len(gallery),
                "gallery_version": gallery.version}

    @bentoml.api(route="/gallery/remove")
    def gallery_remove(self, ctx: bentoml.Context, ids: list[int] | None = None,
                       label: str | None = None) -> dict[str, Any]:
        """Remove entries by ``ids`` or every entry of ``label``. Admin only."""
        if (denied := self._admin(ctx)) is not None:
            return denied
        try:
            removed, gallery = self.live.remove(ids, label)
        except ValueError as exc:
            return error(400, str(exc), ctx)
        except UnknownIdError as exc:
            return error(404, str(exc), ctx)
        logger.info("gallery remove: %s -> %d entries removed", f"label {label!r}" if label else f"ids {ids}",
                    removed)
        return {"removed": removed, "count": len(gallery), "gallery_version": gallery.version}

    @info_app.get("/info")
    def gallery_info(self) -> dict[str, Any]:
        """The live gallery: size, labels, index type, extractor fingerprint, version."""
        system, gallery = self.live.refresh()
        info = json.loads(json.dumps(gallery.info(), default=str))
        info.update({"version_dir": self.live.version, "extractor_fingerprint": system.extractor.fingerprint,
                     "champion": self.live.champion, "worker_pid": os.getpid()})
        return info


# Refuse oversized bodies from Content-Length before BentoML spools them to disk (413).
_MAX_BYTES = int(_env_number(MAX_UPLOAD_ENV, 10) * 1024 * 1024)
VisrecRecognition.add_asgi_middleware(
    BodySizeLimit, default_limit=_MAX_BYTES + MULTIPART_OVERHEAD,
    limits={"/gallery/add": _MAX_BYTES * MAX_FILES_PER_ADD + MULTIPART_OVERHEAD})
