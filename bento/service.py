"""The visrec recognition service (BentoML 1.4): a thin shell over ``visrec.serving``.

    VISREC_PARAMS=params.yaml VISREC_ADMIN_TOKEN=... \
        bentoml serve bento.service:VisrecRecognition --host 127.0.0.1 --port 3000

* ``POST /recognize``      image [+ top_k, threshold, return_topk] -> {"results": [{bbox, rec_docs, rec_scores}]}
* ``POST /embed``          image -> {"embedding": [...], "dim": D, "fingerprint": "..."} (adaptively batched)
* ``POST /embed_batch``    ``batchable=True``: arrays ``[N, S, S, 3]`` -> embeddings, for array clients
* ``POST /gallery/add``    images + label (one for all) or labels (a JSON list)      [admin]
* ``POST /gallery/remove`` {"ids": [...]} or {"label": "..."}                          [admin]
* ``GET  /gallery/info``   the live gallery's summary; ``/livez``, ``/readyz``, ``/metrics`` (BentoML's)

Endpoints are ``visrec.serving.api.RecognitionAPI``; settings (params file, limits, admin token)
``visrec.serving.api.ServeSettings``; the request guard (sizes, token and form shape, before a
body is read) ``visrec.serving.guard``; header size and unknown paths ``visrec.serving.http``.
Every refusal is a 4xx JSON ``{"error": "..."}``: see docs/deploy.md.
"""

import logging
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
from pydantic import BeforeValidator
from starlette.responses import JSONResponse

with bentoml.importing():
    from fastapi import FastAPI

    from visrec.serving import root_logging_kept

    with root_logging_kept():  # Paddle installs an INFO root handler at import
        from visrec.serving import http as http_limits
        from visrec.serving.api import (
            API_ROUTES, INFRA_PREFIXES, INFRA_ROUTES, RecognitionAPI, ServeSettings, image_arrays,
        )
        from visrec.serving.errors import ServiceError
        from visrec.serving.guard import QuietRejections, RequestGuard

SETTINGS = ServeSettings.from_env()  # read once: BentoML fixes workers and middleware at start-up
http_limits.install(SETTINGS.max_header_bytes, exact=API_ROUTES + INFRA_ROUTES, prefixes=INFRA_PREFIXES)
logging.getLogger("bentoml._internal.server.http_app").addFilter(QuietRejections())
# Shape checked (a 400) before BentoML's own validator and before batching: see image_arrays
ImageArrays = Annotated[np.ndarray, bentoml.validators.DType("float32"),
                        BeforeValidator(image_arrays(SETTINGS.extractor_size()))]

info_app = FastAPI(title="visrec gallery (read-only)")
EMBED_BATCH_SIZE = bentoml.metrics.Histogram(
    name="visrec_embed_batch_size", documentation="images per extractor call of /embed (adaptive batching)",
    buckets=(1, 2, 4, 8, 16, 32, 64))


def _error(exc: ServiceError, ctx: Any = None) -> JSONResponse:
    """The 4xx/5xx JSON answer for a typed error (an API that takes ``ctx`` must set its status too)."""
    if ctx is not None:
        ctx.response.status_code = exc.status
    return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=exc.headers)


@bentoml.asgi_app(info_app, path="/gallery")
@bentoml.service(name="visrec", traffic={"timeout": 120}, workers=SETTINGS.workers,
                 threads=SETTINGS.request_threads)
class VisrecRecognition:
    def __init__(self) -> None:
        self.api = RecognitionAPI(SETTINGS, on_batch=EMBED_BATCH_SIZE.observe)

    @bentoml.api(route="/recognize")
    def recognize(self, image: Path, top_k: int | None = None, threshold: float | None = None,
                  return_topk: bool = False) -> dict[str, Any]:
        """Recognise the objects in an uploaded image: boxes, labels, cosine scores."""
        try:
            # A ready JSON response: BentoML's own output path builds a pydantic schema per call
            # (~5 % of a worker's time under load; docs/results.md).
            return JSONResponse(self.api.recognize(image, top_k, threshold, return_topk))
        except ServiceError as exc:
            return _error(exc)

    @bentoml.api(route="/embed")
    async def embed(self, image: Path) -> dict[str, Any]:
        """The embedding of a whole uploaded image (adaptively batched with concurrent calls)."""
        try:
            return JSONResponse(await self.api.embed(image))
        except ServiceError as exc:
            return _error(exc)

    @bentoml.api(route="/embed_batch", batchable=True, batch_dim=0, max_batch_size=32, max_latency_ms=2000)
    def embed_batch(self, images: ImageArrays) -> np.ndarray:
        """``[N, S, S, 3]`` RGB arrays at the extractor's input size ``S`` -> ``[N, D]`` embeddings."""
        try:
            return self.api.embed_arrays(images)
        except ServiceError as exc:
            raise bentoml.exceptions.InvalidArgument(str(exc)) from None

    @bentoml.api(route="/gallery/add")
    def gallery_add(self, images: list[Path], ctx: bentoml.Context, label: str | int | float | None = None,
                    labels: list[str] | None = None) -> dict[str, Any]:
        """Add uploaded images under ``label`` (all) or ``labels`` (a JSON list, one per image). Admin only."""
        try:
            SETTINGS.authorize(ctx.request.headers.get("authorization"))  # the guard checked it first
            return self.api.gallery_add(images, label, labels)
        except ServiceError as exc:
            return _error(exc, ctx)

    @bentoml.api(route="/gallery/remove")
    def gallery_remove(self, ctx: bentoml.Context, ids: list[int] | None = None,
                       label: str | None = None) -> dict[str, Any]:
        """Remove entries by ``ids`` or every entry of ``label``. Admin only."""
        try:
            SETTINGS.authorize(ctx.request.headers.get("authorization"))
            return self.api.gallery_remove(ids, label)
        except ServiceError as exc:
            return _error(exc, ctx)

    @info_app.get("/info")
    def gallery_info(self) -> dict[str, Any]:
        """The live gallery: size, labels, index type, extractor fingerprint, version."""
        return self.api.gallery_info()


VisrecRecognition.add_asgi_middleware(RequestGuard, routes=SETTINGS.routes(), default_max_body=1024 * 1024,
                                      authorize=SETTINGS.authorize)
