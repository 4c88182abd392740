"""The visrec recognition service (BentoML 1.4).

    VISREC_PARAMS=params.yaml VISREC_ADMIN_TOKEN=... \
        bentoml serve bento.service:VisrecRecognition --host 127.0.0.1 --port 3000

Endpoints (images are multipart file uploads, field ``image`` / ``images``):

* ``POST /recognize``     image [+ top_k, threshold, return_topk] -> {"results": [{bbox, rec_docs, rec_scores}]}
* ``POST /embed``         image -> {"embedding": [...], "dim": D, "fingerprint": "..."}; with
                          ``serve.adaptive_batching`` the extractor call goes through ``/embed_batch``
                          (``batchable=True``) and concurrent requests are batched; off by default,
                          since here it was 3-16x slower than calling the extractor directly
* ``POST /gallery/add``   images + label (one for all) or labels (a JSON list)      [admin]
* ``POST /gallery/remove`` {"ids": [...]} or {"label": "..."}                          [admin]
* ``GET  /gallery/info``  the live gallery's summary
* ``GET  /livez``, ``GET /readyz`` (BentoML's own)

Admin calls need ``Authorization: Bearer $VISREC_ADMIN_TOKEN``; with the variable unset they
are disabled (403), never open. ``VISREC_PARAMS`` [params.yaml] names the params file: its
``recognition`` section names models and gallery, its ``serve`` section the upload limits
(``VISREC_MAX_UPLOAD_MB`` and ``VISREC_MAX_PIXELS`` override them).

Gallery changes are copy-on-write: load the live gallery from disk, change the copy, publish it
with the (atomic) ``Gallery.save``, then swap the reference. A request in flight keeps the
gallery object it started with, so it never sees half a change. Every worker polls
``Gallery.current_version`` (one readlink) before each request and reloads when it moved, so
changes made by any worker, or by ``visrec gallery`` on the same directory, are served without
a restart. A file lock in the gallery directory serialises read-modify-save across workers.

Bad uploads (empty, not an image, truncated, too many bytes, too many pixels) get a 4xx JSON
body ``{"error": "..."}`` naming the problem; see ``visrec.serving.images``.
"""

import json
import logging
import os
import threading
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
    from visrec.index.gallery import Gallery, UnknownIdError, update_lock
    from visrec.inference.pipeline import RecognitionSystem
    from visrec.serving import BodySizeLimit, check_admin, configure_pil
    from visrec.serving.images import BadImageError, decode_upload

for _handler in [h for h in _root.handlers if h not in _root_state[0]]:
    _root.removeHandler(_handler)
_root.setLevel(_root_state[1])

logger = logging.getLogger("bentoml.visrec")  # under "bentoml": its handlers, format and INFO level

PARAMS_ENV = "VISREC_PARAMS"
MAX_UPLOAD_ENV = "VISREC_MAX_UPLOAD_MB"
MAX_PIXELS_ENV = "VISREC_MAX_PIXELS"
ADMIN_TOKEN_ENV = "VISREC_ADMIN_TOKEN"
BATCHING_ENV = "VISREC_ADAPTIVE_BATCHING"  # 0/false: /embed calls the extractor one request at a time
MAX_TOP_K = 100
MAX_FILES_PER_ADD = 16
MULTIPART_OVERHEAD = 1024 * 1024  # form fields and part headers around the file bytes

info_app = FastAPI(title="visrec gallery (read-only)")


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


@bentoml.asgi_app(info_app, path="/gallery")
@bentoml.service(name="visrec", traffic={"timeout": 120})
class VisrecRecognition:
    def __init__(self) -> None:
        params = os.environ.get(PARAMS_ENV, "params.yaml")
        config = load_config(params)
        self.settings = config.recognition
        self.max_bytes = int(_env_number(MAX_UPLOAD_ENV, config.serve.max_upload_mb) * 1024 * 1024)
        self.max_pixels = int(_env_number(MAX_PIXELS_ENV, config.serve.max_pixels))
        batching = os.environ.get(BATCHING_ENV)
        self.adaptive_batching = (config.serve.adaptive_batching if batching is None
                                  else batching.strip().lower() not in ("0", "false", "no", "off"))
        configure_pil(self.max_pixels)
        self.gallery_path = Path(self.settings.gallery)
        self._lock = threading.RLock()  # gallery reload / swap / mutation within this worker
        self._model_lock = threading.Lock()  # Paddle predictors are not thread-safe
        with self._lock:
            self._version = Gallery.current_version(self.gallery_path)
            self.system = RecognitionSystem.from_config(self.settings)
        ext = self.system.extractor
        logger.info("visrec service ready: params %s, extractor %s (dim %d, %s), detector %s, gallery %s "
                    "(%d entries, version %s)", params, ext.model_dir, ext.dim, ext.fingerprint,
                    self.settings.detector, self.gallery_path, len(self.system.gallery), self._version)

    # ------------------------------------------------------------------ helpers

    def _admin(self, ctx: bentoml.Context) -> JSONResponse | None:
        status, message = check_admin(os.environ.get(ADMIN_TOKEN_ENV), ctx.request.headers.get("authorization"))
        return None if status == 200 else error(status, message, ctx)

    def _gallery(self) -> Gallery:
        """The live gallery, reloaded first if another worker or tool published a new version."""
        with self._lock:
            version = Gallery.current_version(self.gallery_path)
            if version != self._version:
                gallery = Gallery.load(self.gallery_path, expected_fingerprint=self.system.extractor.fingerprint,
                                       num_threads=self.settings.num_threads)
                self.system.set_gallery(gallery)
                logger.info("reloaded gallery %s: version %s -> %s (%d entries)", self.gallery_path,
                            self._version, version, len(gallery))
                self._version = version
            return self.system.gallery

    def _mutate(self, change: Any) -> tuple[Any, Gallery]:
        """Apply ``change(gallery)`` to a fresh copy of the live gallery, publish it, swap it in."""
        with self._lock, update_lock(self.gallery_path):
            gallery = Gallery.load(self.gallery_path, expected_fingerprint=self.system.extractor.fingerprint,
                                   num_threads=self.settings.num_threads)
            result = change(gallery)  # raises before anything is saved if the change is invalid
            gallery.save(self.gallery_path)
            self.system.set_gallery(gallery)
            self._version = Gallery.current_version(self.gallery_path)
            return result, gallery

    def _read_upload(self, path: Path) -> np.ndarray:
        """The uploaded file as HWC uint8 RGB; size checked before reading (BadImageError)."""
        size = path.stat().st_size
        if size > self.max_bytes:
            raise BadImageError(f"upload too large: {size} bytes, the limit is {self.max_bytes} bytes "
                                f"({self.max_bytes / 2**20:.1f} MiB; {MAX_UPLOAD_ENV})")
        return decode_upload(path.read_bytes(), self.max_bytes, self.max_pixels)

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
        gallery = self._gallery()
        if len(gallery) == 0:
            return error(409, "the gallery is empty: add images first (POST /gallery/add)")
        start = time.perf_counter()
        with self._model_lock:
            boxes, features = self.system.describe(array)
        results = self.system.recognize(boxes, features, gallery=gallery, top_k=top_k, threshold=threshold,
                                        return_topk=return_topk)
        return {"results": results, "gallery_version": gallery.version,
                "elapsed_ms": round((time.perf_counter() - start) * 1000, 2)}

    @bentoml.api(route="/embed_batch", batchable=True, batch_dim=0, max_batch_size=32, max_latency_ms=2000)
    def embed_batch(self, images: np.ndarray) -> np.ndarray:
        """Adaptive-batching extractor call: ``[N, S, S, 3]`` uint8 RGB at the extractor's input
        size ``S`` -> ``[N, D]`` L2-normalised embeddings. ``/embed`` feeds it."""
        return self._embed_arrays(images)

    def _embed_arrays(self, images: np.ndarray) -> np.ndarray:
        """The extractor call itself (inside a server ``self.embed_batch`` is BentoML's proxy)."""
        extractor = self.system.extractor
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (extractor.size, extractor.size, 3):
            raise bentoml.exceptions.InvalidArgument(
                f"expected [N, {extractor.size}, {extractor.size}, 3] images, got shape {list(images.shape)}")
        images = np.clip(images, 0, 255).astype(np.uint8, copy=False)
        with self._model_lock:
            return extractor.embed(list(images))

    @staticmethod
    async def _call_batcher(proxy: Any, batch: np.ndarray, attempts: int = 4) -> Any:
        """``proxy.embed_batch(batch)``, retried on transport errors.

        BentoML 1.4.39's in-process proxy recycles its aiohttp session every 100 calls and closes
        the old one under calls still in flight, which then fail with ClientConnectionResetError /
        ServerDisconnectedError (~3% of /embed calls at concurrency 16 in bench_service.py).
        Embedding is pure, so a retry is safe.
        """
        import aiohttp

        for attempt in range(attempts):
            try:
                return await proxy.embed_batch(batch)
            except aiohttp.ClientError as exc:
                if attempt == attempts - 1:
                    raise
                logger.debug("embed_batch call failed (%s: %s); retrying", type(exc).__name__, exc)
        raise AssertionError("unreachable")

    @bentoml.api(route="/embed")
    async def embed(self, image: Path) -> dict[str, Any]:
        """The embedding of a whole uploaded image (adaptively batched with concurrent calls)."""
        import anyio

        extractor = self.system.extractor
        try:
            array = await anyio.to_thread.run_sync(self._read_upload, image)
        except BadImageError as exc:
            return self._bad_image(exc)
        # Extractor.preprocess would do this same resize; doing it here makes batchable inputs
        # one shape and keeps the in-process hop small.
        if array.shape[:2] != (extractor.size, extractor.size):
            array = cv2.resize(array, (extractor.size, extractor.size), interpolation=cv2.INTER_LINEAR)
        batch = array[None]
        proxy = getattr(self, "to_async", None)  # set by the BentoML server: calls go via the batcher
        if proxy is not None and self.adaptive_batching:
            vectors = np.asarray(await self._call_batcher(proxy, batch), dtype=np.float32)
        else:  # batching off (serve.adaptive_batching), or used as a plain object (tests, notebooks)
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
        if (label is None) == (labels is None):
            return error(400, "give exactly one of 'label' (for every image) or 'labels' (a JSON list, one per image)", ctx)
        names = [str(label)] * len(images) if labels is None else [str(x) for x in labels]
        if len(names) != len(images):
            return error(400, f"{len(names)} labels for {len(images)} images: give one label per image", ctx)
        if any(not n.strip() for n in names):
            return error(400, "labels must be non-empty strings", ctx)
        arrays = []
        for i, path in enumerate(images):
            try:
                arrays.append(self._read_upload(path))
            except BadImageError as exc:
                return self._bad_image(exc, f"images[{i}]", ctx)
        extractor = self.system.extractor
        with self._model_lock:
            vectors = extractor.embed(arrays)
        norms = np.linalg.norm(vectors, axis=1)
        if not np.all(np.isfinite(norms) & (norms > 1e-6)):
            return error(422, "the extractor gives no usable embedding for some of these images; nothing was added", ctx)
        metadata = [{"source": "api", "added": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                    for _ in images]
        ids, gallery = self._mutate(lambda g: g.add(vectors, names, metadata))
        logger.info("gallery add: %d image(s), labels %s -> ids %s", len(ids), sorted(set(names)), ids)
        return {"ids": [int(i) for i in ids], "labels": names, "count": len(gallery),
                "gallery_version": gallery.version}

    @bentoml.api(route="/gallery/remove")
    def gallery_remove(self, ctx: bentoml.Context, ids: list[int] | None = None,
                       label: str | None = None) -> dict[str, Any]:
        """Remove entries by ``ids`` or every entry of ``label``. Admin only."""
        if (denied := self._admin(ctx)) is not None:
            return denied
        if (ids is None) == (label is None):
            return error(400, "give exactly one of 'ids' (a list of gallery ids) or 'label'", ctx)
        if ids is not None and not ids:
            return error(400, "'ids' is empty", ctx)
        if label is not None and label not in self._gallery().labels():
            return error(404, f"no gallery entries with label {label!r}", ctx)

        def change(gallery: Gallery) -> int:
            if label is not None:
                removed = gallery.remove_label(label)
                if removed == 0:  # removed by someone else meanwhile
                    raise UnknownIdError(f"no gallery entries with label {label!r}")
                return removed
            return gallery.remove(ids)

        try:
            removed, gallery = self._mutate(change)
        except UnknownIdError as exc:
            return error(404, str(exc), ctx)
        logger.info("gallery remove: %s -> %d entries removed", f"label {label!r}" if label else f"ids {ids}",
                    removed)
        return {"removed": removed, "count": len(gallery), "gallery_version": gallery.version}

    @info_app.get("/info")
    def gallery_info(self) -> dict[str, Any]:
        """The live gallery: size, labels, index type, extractor fingerprint, version."""
        gallery = self._gallery()
        info = json.loads(json.dumps(gallery.info(), default=str))
        info.update({"version_dir": self._version, "extractor_fingerprint": self.system.extractor.fingerprint})
        return info


# Refuse oversized bodies from Content-Length before BentoML spools them to disk (413).
_MAX_BYTES = int(_env_number(MAX_UPLOAD_ENV, 10) * 1024 * 1024)
VisrecRecognition.add_asgi_middleware(
    BodySizeLimit, default_limit=_MAX_BYTES + MULTIPART_OVERHEAD,
    limits={"/gallery/add": _MAX_BYTES * MAX_FILES_PER_ADD + MULTIPART_OVERHEAD})
