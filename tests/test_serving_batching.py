"""visrec.serving.batching: BentoML's CorkDispatcher run in-process over numpy batches."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from visrec.serving.batching import AdaptiveBatcher


def test_concurrent_calls_are_grouped_and_each_gets_its_own_rows():
    calls: list[int] = []
    lock = threading.Lock()

    def double(batch: np.ndarray) -> np.ndarray:
        with lock:
            calls.append(batch.shape[0])
        time.sleep(0.02)  # a model call: later arrivals queue up meanwhile
        return batch * 2

    batcher = AdaptiveBatcher(double, max_batch_size=8, max_latency_ms=5000)

    async def main():
        inputs = [np.full((1, 3), i, np.float32) for i in range(40)]
        outputs = await asyncio.gather(*(batcher(x) for x in inputs))
        return inputs, outputs

    inputs, outputs = asyncio.run(main())
    for x, y in zip(inputs, outputs, strict=True):
        np.testing.assert_array_equal(y, x * 2)  # rows go back to their own caller
    assert sum(calls) == 40 and max(calls) <= 8
    assert max(calls) > 1 and len(calls) < 40  # really batched
    assert batcher.batch_sizes == calls


def test_multi_row_requests_keep_their_rows_together():
    batcher = AdaptiveBatcher(lambda b: b + 1, max_batch_size=16, max_latency_ms=5000)

    async def main():
        return await asyncio.gather(*(batcher(np.arange(n * 2).reshape(n, 2)) for n in (1, 3, 2)))

    for n, out in zip((1, 3, 2), asyncio.run(main()), strict=True):
        np.testing.assert_array_equal(out, np.arange(n * 2).reshape(n, 2) + 1)


def test_errors_reach_every_caller_of_the_batch():
    def broken(batch):
        raise RuntimeError("model exploded")

    batcher = AdaptiveBatcher(broken, max_batch_size=4, max_latency_ms=5000)

    async def main():
        return await asyncio.gather(*(batcher(np.zeros((1, 2))) for _ in range(3)), return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "model exploded" in str(r) for r in results)


def test_bad_settings_and_empty_batches_are_refused():
    with pytest.raises(ValueError, match="max_batch_size"):
        AdaptiveBatcher(lambda b: b, max_batch_size=0)
    with pytest.raises(ValueError, match="at least one row"):
        asyncio.run(AdaptiveBatcher(lambda b: b)(np.zeros((0, 3))))
