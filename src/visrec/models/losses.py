"""Training losses: classification (on logits) and batch-hard metric losses (on features).

``build_loss`` turns a list of specs such as
``[{"name": "CELoss", "weight": 1.0, "epsilon": 0.1},
{"name": "TripletAngularMarginLoss", "weight": 1.0, "margin": 0.5}]`` into one
``CombinedLoss``, as PaddleClas combines a classification and a metric-learning loss.

Batch-hard anchors (both triplet losses): an anchor needs at least one positive (another
item with its label) and one negative (an item with another label). Anchors lacking
either, such as the only image of its class in the batch, are left out of the mean
rather than counted as zero, so a sampler's leftovers do not dilute the loss. A batch
with no valid anchor gives a zero loss that is still connected to the features.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import paddle
import paddle.nn.functional as F
from paddle import nn

logger = logging.getLogger(__name__)

# Stands in for "no candidate" when masking a max/min: never selected while a real
# candidate exists, whatever the feature scale. Anchors without candidates are given
# zero weight, and where() sends no gradient to the masked side, so no inf or NaN
# reaches the loss or the gradients.
_MASK_VALUE = float("inf")


def _flat_labels(labels: paddle.Tensor, batch_size: int) -> paddle.Tensor:
    labels = labels.reshape([-1])
    if labels.shape[0] != batch_size:
        raise ValueError(
            f"labels must have one entry per batch item ({batch_size}); got shape {labels.shape}"
        )
    return labels


def _check_features(features: paddle.Tensor) -> None:
    if features.ndim != 2:
        raise ValueError(f"features must be a 2-D tensor (batch, dim); got shape {features.shape}")


def _pair_masks(labels: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Boolean (N, N) masks: positives (same label, not self) and negatives."""
    same = labels.unsqueeze(1) == labels.unsqueeze(0)
    not_self = paddle.eye(labels.shape[0], dtype="int32") == 0
    return same & not_self, ~same


def _masked_mean(values: paddle.Tensor, valid: paddle.Tensor) -> paddle.Tensor:
    """Mean of ``values`` over ``valid`` anchors.

    With no valid anchor it is 0, and still a function of ``values`` (hence of the
    features), so ``backward()`` works and gives zero gradients.
    """
    weights = valid.astype(values.dtype)
    return (values * weights).sum() / paddle.clip(weights.sum(), min=1.0)


class CELoss(nn.Layer):
    """Cross-entropy on logits with label smoothing ``epsilon``.

    The target is ``(1 - epsilon) * one_hot + epsilon / num_classes``; ``epsilon=0``
    is plain cross-entropy. Mean over the batch.
    """

    input_key: ClassVar[str] = "logits"

    def __init__(self, epsilon: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"CELoss epsilon must be in [0, 1); got {epsilon}")
        self.epsilon = float(epsilon)

    def forward(self, logits: paddle.Tensor, labels: paddle.Tensor) -> paddle.Tensor:
        if logits.ndim != 2:
            raise ValueError(f"logits must be a 2-D tensor (batch, classes); got shape {logits.shape}")
        labels = _flat_labels(labels, logits.shape[0]).astype("int64")
        num_classes = logits.shape[1]
        # take_along_axis would silently accept -1 as "last class": check explicitly.
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(
                f"CELoss labels must be class indices in [0, {num_classes}); got "
                f"{int(labels.min())}..{int(labels.max())}: remap labels to 0..num_classes-1"
            )
        log_probs = F.log_softmax(logits, axis=1)
        nll = -paddle.take_along_axis(log_probs, labels.unsqueeze(1), axis=1).squeeze(1)
        if self.epsilon == 0.0:
            return nll.mean()
        uniform = -log_probs.mean(axis=1)  # cross-entropy against the uniform target
        return ((1.0 - self.epsilon) * nll + self.epsilon * uniform).mean()


class TripletLossV2(nn.Layer):
    """Batch-hard triplet loss on Euclidean distance.

    For each anchor: hardest positive = farthest same-label item (not itself), hardest
    negative = nearest other-label item; loss = mean(relu(d_ap - d_an + margin)) over
    valid anchors. Features are L2-normalised first when ``normalize_feature``.
    """

    input_key: ClassVar[str] = "features"

    def __init__(self, margin: float = 0.5, normalize_feature: bool = True) -> None:
        super().__init__()
        self.margin = float(margin)
        self.normalize_feature = bool(normalize_feature)

    def forward(self, features: paddle.Tensor, labels: paddle.Tensor) -> paddle.Tensor:
        _check_features(features)
        labels = _flat_labels(labels, features.shape[0])
        x = F.normalize(features, axis=1) if self.normalize_feature else features
        sq_norm = (x * x).sum(axis=1, keepdim=True)
        sq_dist = sq_norm + sq_norm.t() - 2.0 * paddle.matmul(x, x, transpose_y=True)
        # The clamp keeps sqrt's gradient finite where a distance is (numerically) zero.
        dist = paddle.sqrt(paddle.clip(sq_dist, min=1e-12))

        pos, neg = _pair_masks(labels)
        mask_value = paddle.full_like(dist, _MASK_VALUE)
        d_ap = paddle.where(pos, dist, -mask_value).max(axis=1)
        d_an = paddle.where(neg, dist, mask_value).min(axis=1)
        valid = pos.any(axis=1) & neg.any(axis=1)
        hinge = F.relu(d_ap - d_an + self.margin)
        return _masked_mean(hinge, valid)


class TripletAngularMarginLoss(nn.Layer):
    """Batch-hard triplet loss on cosine similarity, with optional absolute terms.

    Hardest positive = lowest cosine among same-label others (``s_ap``), hardest
    negative = highest cosine among other labels (``s_an``). Loss =
    ``mean(relu(s_an - s_ap + margin)) + absolute_loss_weight *
    (mean(relu(ap_value - s_ap)) + mean(relu(s_an - an_value)))`` over valid anchors.
    Unlike the PaddleClas reference, a satisfied absolute term contributes 0, not a
    constant 1.
    """

    input_key: ClassVar[str] = "features"

    def __init__(
        self,
        margin: float = 0.5,
        normalize_feature: bool = True,
        absolute_loss_weight: float = 1.0,
        ap_value: float = 0.9,
        an_value: float = 0.5,
    ) -> None:
        super().__init__()
        if absolute_loss_weight < 0:
            raise ValueError(
                f"absolute_loss_weight must be >= 0 (0 disables the absolute terms); got {absolute_loss_weight}"
            )
        self.margin = float(margin)
        self.normalize_feature = bool(normalize_feature)
        self.absolute_loss_weight = float(absolute_loss_weight)
        self.ap_value = float(ap_value)
        self.an_value = float(an_value)

    def forward(self, features: paddle.Tensor, labels: paddle.Tensor) -> paddle.Tensor:
        _check_features(features)
        labels = _flat_labels(labels, features.shape[0])
        x = F.normalize(features, axis=1) if self.normalize_feature else features
        sim = paddle.matmul(x, x, transpose_y=True)

        pos, neg = _pair_masks(labels)
        mask_value = paddle.full_like(sim, _MASK_VALUE)
        s_ap = paddle.where(pos, sim, mask_value).min(axis=1)
        s_an = paddle.where(neg, sim, -mask_value).max(axis=1)
        valid = pos.any(axis=1) & neg.any(axis=1)

        loss = _masked_mean(F.relu(s_an - s_ap + self.margin), valid)
        if self.absolute_loss_weight > 0:
            absolute = _masked_mean(F.relu(self.ap_value - s_ap), valid) + _masked_mean(
                F.relu(s_an - self.an_value), valid
            )
            loss = loss + self.absolute_loss_weight * absolute
        return loss


class ProxyAnchorLoss(nn.Layer):
    """Proxy-Anchor (Kim et al., 2020) on the cosines between embeddings and class proxies.

    Reads ``outputs["logits"]`` from ``ProxyHead`` (plain cosines, scale 1): ``[N, C]``.
    Each proxy is an anchor. For the proxies with a positive in the batch,
    ``log(1 + sum_pos exp(-alpha (cos - delta)))``; for every proxy,
    ``log(1 + sum_neg exp(alpha (cos + delta)))``. The first term is averaged over the
    proxies with positives, the second over all proxies. Every embedding in the batch
    interacts with every proxy, so it learns fast from few images per class; the proxies
    want a higher learning rate than the backbone (``backbone_lr_mult`` well below 1).
    """

    input_key: ClassVar[str] = "logits"

    def __init__(self, alpha: float = 32.0, delta: float = 0.1) -> None:
        super().__init__()
        if alpha <= 0:
            raise ValueError(f"ProxyAnchorLoss alpha must be > 0, got {alpha}")
        self.alpha, self.delta = float(alpha), float(delta)

    def forward(self, cosines: paddle.Tensor, labels: paddle.Tensor) -> paddle.Tensor:
        if cosines is None or cosines.ndim != 2:
            raise ValueError("ProxyAnchorLoss needs [N, classes] cosines in outputs['logits']: "
                             "set extractor.head to {name: ProxyHead}")
        # A scaled or margin head (ArcMarginHead, FCHead ...) gives values far outside [-1, 1].
        if float(cosines.abs().max()) > 1.0 + 1e-4:
            raise ValueError("ProxyAnchorLoss needs plain cosines (|value| <= 1) but the head gives larger "
                             "logits: set extractor.head to {name: ProxyHead}")
        num_classes = cosines.shape[1]
        labels = _flat_labels(labels, cosines.shape[0])
        positive = F.one_hot(labels.astype("int64"), num_classes).astype(cosines.dtype)
        pos_exp = paddle.exp(-self.alpha * (cosines - self.delta)) * positive
        neg_exp = paddle.exp(self.alpha * (cosines + self.delta)) * (1.0 - positive)
        with_positive = (positive.sum(axis=0) > 0).astype(cosines.dtype)
        pos_term = (paddle.log1p(pos_exp.sum(axis=0)) * with_positive).sum() / paddle.clip(with_positive.sum(), min=1)
        neg_term = paddle.log1p(neg_exp.sum(axis=0)).sum() / num_classes
        return pos_term + neg_term


LOSSES: dict[str, type[nn.Layer]] = {
    "CELoss": CELoss,
    "ProxyAnchorLoss": ProxyAnchorLoss,
    "TripletLossV2": TripletLossV2,
    "TripletAngularMarginLoss": TripletAngularMarginLoss,
}


class CombinedLoss(nn.Layer):
    """Weighted sum of named losses; each reads ``outputs[loss.input_key]``."""

    def __init__(self, names: list[str], weights: list[float], losses: list[nn.Layer]) -> None:
        super().__init__()
        if not (len(names) == len(weights) == len(losses)) or not losses:
            raise ValueError("CombinedLoss needs one name and one weight per loss, and at least one loss")
        self.names = list(names)
        self.weights = [float(w) for w in weights]
        self.losses = nn.LayerList(losses)

    def forward(
        self, outputs: dict[str, paddle.Tensor], labels: paddle.Tensor
    ) -> tuple[paddle.Tensor, dict[str, float]]:
        """Return the weighted total and each part's unweighted value as a float."""
        total = None
        parts: dict[str, float] = {}
        for name, weight, loss in zip(self.names, self.weights, self.losses):
            key = loss.input_key
            if key not in outputs:
                raise ValueError(
                    f"{name} needs outputs[{key!r}], but the model outputs only {sorted(outputs)}"
                )
            value = loss(outputs[key], labels)
            parts[name] = float(value)
            total = weight * value if total is None else total + weight * value
        return total, parts


def build_loss(specs: list[dict[str, Any]]) -> CombinedLoss:
    """Build a ``CombinedLoss`` from specs ``{"name": ..., "weight": ..., **loss_kwargs}``.

    ``weight`` defaults to 1.0. A name used twice gets a ``_2``, ``_3`` ... suffix in
    the reported parts.
    """
    if not specs:
        raise ValueError(f"build_loss needs at least one loss spec; available losses: {sorted(LOSSES)}")
    names: list[str] = []
    weights: list[float] = []
    losses: list[nn.Layer] = []
    for spec in specs:
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError(f"each loss spec must be a dict with a 'name' key; got {spec!r}")
        kwargs = dict(spec)
        name = kwargs.pop("name")
        weight = kwargs.pop("weight", 1.0)
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; available losses: {sorted(LOSSES)}")
        if not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"loss {name!r} weight must be a number >= 0; got {weight!r}")
        try:
            loss = LOSSES[name](**kwargs)
        except TypeError as exc:
            raise ValueError(f"bad options for loss {name!r} {kwargs}: {exc}") from exc
        part_name = name
        suffix = 2
        while part_name in names:
            part_name = f"{name}_{suffix}"
            suffix += 1
        names.append(part_name)
        weights.append(float(weight))
        losses.append(loss)
    logger.debug("built loss %s", list(zip(names, weights)))
    return CombinedLoss(names, weights, losses)
