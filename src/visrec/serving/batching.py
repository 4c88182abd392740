"""Adaptive batching inside the worker: BentoML's own dispatcher, without its HTTP hop.

A BentoML API marked ``batchable=True`` is batched by a ``CorkDispatcher`` when HTTP clients
call it directly. Calling it from another API of the same service goes through BentoML's
in-process proxy instead: one more HTTP request per call, with the image array serialised
to JSON and back. Measured here that hop cost more than batching saved (``/embed`` 3x slower
with the default extractor, 16x with EfficientNet-Lite0 at 224 px, where a 150 k-number JSON
array per image dominated).

:class:`AdaptiveBatcher` runs the same ``CorkDispatcher`` (same latency model, same
``max_batch_size`` / ``max_latency_ms`` semantics) in the worker's event loop, fed with
numpy arrays directly: concurrent ``/embed`` requests are grouped into one extractor call
and each gets its own rows back. ``CorkDispatcher`` is BentoML-internal; the pinned version
is exercised by ``tests/test_serving_batching.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import anyio
import numpy as np

logger = logging.getLogger(__name__)


class BatcherOverloaded(RuntimeError):
    """The dispatcher dropped a request: it could not be served within ``max_latency_ms``."""


def _overloaded() -> np.ndarray:
    raise BatcherOverloaded("the server is overloaded: the request could not be batched within max_latency_ms")


class AdaptiveBatcher:
    """``await batcher(batch)`` -> ``fn(concatenated batches)`` rows for ``batch``.

    ``fn`` maps ``[N, ...]`` to ``[N, ...]`` and runs in a worker thread (one batch at a time,
    as BentoML runs a batchable API). Created lazily inside the serving event loop.
    """

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], max_batch_size: int = 32,
                 max_latency_ms: int = 1000, on_batch: Callable[[int], None] | None = None) -> None:
        if max_batch_size < 1 or max_latency_ms <= 0:
            raise ValueError(f"max_batch_size must be >= 1 and max_latency_ms > 0, got {max_batch_size}, "
                             f"{max_latency_ms}")
        self.fn = fn
        self.max_batch_size = int(max_batch_size)
        self.max_latency_ms = int(max_latency_ms)
        self._call = None
        self.on_batch = on_batch  # e.g. a Prometheus histogram's observe: rows per model call
        self.batch_sizes: list[int] = []  # the last 1,000 rows per model call

    def _dispatcher(self):
        from bentoml._internal.marshal.dispatcher import CorkDispatcher

        dispatcher = CorkDispatcher(self.max_latency_ms, self.max_batch_size, fallback=_overloaded,
                                    get_batch_size=lambda batch: int(batch.shape[0]), batch_dim=(0, 0))
        return dispatcher(self._run)

    async def _run(self, batches: Sequence[np.ndarray]) -> list[np.ndarray]:
        sizes = [int(b.shape[0]) for b in batches]
        joined = batches[0] if len(batches) == 1 else np.concatenate(batches, axis=0)
        self.batch_sizes = [*self.batch_sizes[-999:], int(joined.shape[0])]
        if self.on_batch is not None:
            self.on_batch(int(joined.shape[0]))
        out = np.asarray(await anyio.to_thread.run_sync(self.fn, joined))
        if out.shape[0] != joined.shape[0]:
            raise ValueError(f"the batched function returned {out.shape[0]} rows for {joined.shape[0]} inputs")
        bounds = np.cumsum([0, *sizes])
        return [out[bounds[i]:bounds[i + 1]] for i in range(len(sizes))]

    async def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch)
        if batch.ndim < 1 or batch.shape[0] < 1:
            raise ValueError(f"expected a batch with at least one row, got shape {batch.shape}")
        if self._call is None:
            self._call = self._dispatcher()
        result = await self._call(batch)
        if result is None:  # the dispatcher's fallback path on cancellation
            _overloaded()
        return result
