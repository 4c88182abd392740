"""Classification figures on class probabilities ``[N, C]``, from a *probability function*
(NCHW float32 batch -> probabilities): the dygraph checkpoint (:func:`dygraph_probs_fn`) and an
exported model (``Predictor``) are scored by the same code, in training and in evaluation.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import paddle
from paddle.nn import functional as F

ProbsFn = Callable[[np.ndarray], np.ndarray]


def dygraph_probs_fn(model: paddle.nn.Layer) -> ProbsFn:
    """Softmax probabilities of a classifier in eval mode (the training engine restores its mode)."""

    def run(batch: np.ndarray) -> np.ndarray:
        model.eval()
        with paddle.no_grad():
            return F.softmax(model(paddle.to_tensor(batch)), axis=1).numpy()

    return run


def predict_probs(probs_fn: ProbsFn, dataset, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities ``[N, C]`` and true class ids ``[N]`` over a ClassificationDataset, in order."""
    probs, labels = [], []
    for start in range(0, len(dataset), batch_size):
        samples = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        probs.append(probs_fn(np.stack([s[0] for s in samples])))
        labels += [int(s[1]) for s in samples]
    return np.concatenate(probs), np.asarray(labels, dtype=np.int64)


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of rows whose true class is among the ``k`` highest scores (k capped at C)."""
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def confusion_matrix(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``[true class, predicted class]``."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``top1``, ``top5`` and ``loss`` (mean negative log-likelihood of the true class)."""
    nll = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))
    return {"top1": topk_accuracy(probs, labels, 1), "top5": topk_accuracy(probs, labels, 5),
            "loss": float(nll.mean())}
