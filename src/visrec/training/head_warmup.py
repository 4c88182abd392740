"""Head warm-up before fine-tuning a pretrained backbone (LP-FT, Kumar et al., 2022).

A new head (random class weights or proxies) sends the backbone noisy gradients in the
first steps of fine-tuning, which distort the pretrained features. Training neck + head
first, on backbone features computed once, removes that: on the real CUB subset (Lite0,
ProxyAnchorLoss) recall@1 on unseen classes no longer dips below the zero-shot model in
the first epoch. Cheap: one no-grad pass over the training set, then steps that touch
only the small layers.
"""

from __future__ import annotations

import logging

import numpy as np
import paddle
from tqdm import tqdm

from visrec.training.embedding import embed_dataset
from visrec.models.extractor import RecModel
from visrec.models.losses import CombinedLoss

logger = logging.getLogger(__name__)


def backbone_features(model: RecModel, dataset, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The backbone's pooled features of every ``dataset`` item (its own transforms), in eval mode."""
    model.eval()

    def backbone_fn(batch: np.ndarray) -> np.ndarray:
        with paddle.no_grad():
            return model.backbone(paddle.to_tensor(batch)).numpy()

    feats, labels, _ = embed_dataset(backbone_fn, dataset, batch_size, desc="head warm-up: backbone features")
    return feats, labels


def warm_up_head(model: RecModel, dataset, loss: CombinedLoss, steps: int, lr: float,
                 batch_size: int, seed: int = 0) -> list[float]:
    """Train ``model.neck`` and ``model.head`` for ``steps`` AdamW steps at ``lr`` (batches of
    ``batch_size`` drawn at random) on the backbone features of ``dataset`` (the training set,
    one augmented pass); the backbone is untouched. Returns the loss of each step."""
    if steps < 0:
        raise ValueError(f"extractor.head_warmup_steps must be >= 0 (0 turns the warm-up off), got {steps}")
    if steps == 0:
        return []
    params = [p for layer in (model.neck, model.head) if layer is not None
              for p in layer.parameters() if not p.stop_gradient]
    if not params:
        raise ValueError("head_warmup_steps is set but the model has no neck or head weights to warm up "
                         "(neck and head are null): set extractor.head_warmup_steps=0")
    feats, labels = backbone_features(model, dataset, batch_size)
    optimizer = paddle.optimizer.AdamW(learning_rate=lr, parameters=params, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="head warm-up", leave=False):
        pick = rng.choice(len(labels), size=min(batch_size, len(labels)), replace=False)
        batch_labels = paddle.to_tensor(labels[pick])
        total, _ = loss(model.forward_from_backbone(paddle.to_tensor(feats[pick]), batch_labels), batch_labels)
        total.backward()
        optimizer.step()
        optimizer.clear_grad()
        losses.append(float(total))
    logger.info("head warm-up: %d steps on %d cached backbone features, loss %.3f -> %.3f",
                steps, len(labels), losses[0], np.mean(losses[-10:]))
    return losses
