"""Embedding a whole dataset in batches, with any embed function (dygraph or exported)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from tqdm import tqdm


def embed_dataset(
    embed_fn: Callable[[np.ndarray], np.ndarray],
    dataset,
    batch_size: int = 64,
    progress: bool = True,
    desc: str = "embedding",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run ``embed_fn`` over ``dataset`` (items: CHW image, label, unique id) in order.

    ``embed_fn`` takes an NCHW float32 batch and returns ``[N, D]`` numpy features
    (L2-normalised ones for retrieval). Returns (features, labels, unique ids).
    """
    feats, labels, ids = [], [], []
    for start in tqdm(range(0, len(dataset), batch_size), desc=desc, disable=not progress, leave=False):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = np.stack([it[0] for it in items]).astype("float32")
        feats.append(np.asarray(embed_fn(batch), dtype="float32"))
        labels.extend(int(it[1]) for it in items)
        ids.extend(int(it[2]) for it in items)
    return np.concatenate(feats), np.asarray(labels), np.asarray(ids)


def dygraph_embed_fn(model) -> Callable[[np.ndarray], np.ndarray]:
    """An embed function over a dygraph RecModel (eval mode, no grad)."""
    import paddle

    def embed(batch: np.ndarray) -> np.ndarray:
        model.eval()
        with paddle.no_grad():
            return model.embed(paddle.to_tensor(batch)).numpy()

    return embed
