"""The mainbody detector: one class ("foreground"), anchor-free, FCOS/GFL family.

``backbone.forward_stages`` (strides 8/16/32) -> ``FPN`` (lateral 1x1, top-down sum,
depthwise-separable smoothing) -> ``SharedHead`` (depthwise-separable convs shared by
every level, BatchNorm per level) -> per location one logit and four distances
(left, top, right, bottom) from the location to the box sides, in input pixels.

Training: ``assign_targets`` (numpy) picks the positive locations of each ground-truth
box (the box's size picks the pyramid levels, centre sampling picks the locations);
``DetectionLoss`` is quality focal loss (the classification target of a positive is the
IoU of its predicted box) + GIoU on the positives' boxes. No centre-ness branch: the
IoU-aware score already ranks well-placed boxes first.

Inference: ``MainbodyDetector.predict`` returns decoded boxes and scores for every
location (dense, before NMS); thresholding, NMS and the mapping back to original
coordinates live in ``visrec.inference.detection_post`` so that the dygraph and exported
paths share them.

Members: a detector may hold several FPN + head pairs ("members") on its one backbone, each
trained on its own data (``visrec.training.detector`` trains them one by one, e.g. on
generated scenes of different styles). ``predict`` averages them location by location: the
score is the members' mean, the box their score-weighted mean. Training sees the first member.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from visrec.models.layers import ConvBNAct, DepthwiseSeparable
from visrec.models.registry import build_backbone

logger = logging.getLogger(__name__)

PRIOR_PROB = 0.01  # initial foreground probability: keeps the focal loss of negatives small at the start
MAX_LOG_DISTANCE = 8.0  # exp(8) x stride: far beyond any input size, only guards against overflow


def upsample2x(x: paddle.Tensor) -> paddle.Tensor:
    """Nearest-neighbour x2 upsampling by reshape + expand.

    Not ``F.interpolate``: in Paddle 3.3 its PIR attributes break Paddle Inference with
    oneDNN ("ArrayAttribute<DoubleAttribute>") and, with ``scale_factor``, paddle2onnx 2.1.
    """
    _, channels, height, width = x.shape
    y = paddle.expand(x.reshape([-1, channels, height, 1, width, 1]), [-1, channels, height, 2, width, 2])
    return y.reshape([-1, channels, 2 * height, 2 * width])


class FPN(nn.Layer):
    """Feature pyramid: lateral 1x1 convs, top-down nearest upsampling + sum, DW-separable smoothing."""

    def __init__(self, in_channels: Sequence[int], out_channels: int):
        super().__init__()
        self.lateral = nn.LayerList([ConvBNAct(c, out_channels, 1) for c in in_channels])
        self.smooth = nn.LayerList([DepthwiseSeparable(out_channels, out_channels, 1) for _ in in_channels])
        self.out_channels = out_channels

    def forward(self, feats: list[paddle.Tensor]) -> list[paddle.Tensor]:
        maps = [lateral(f) for lateral, f in zip(self.lateral, feats)]
        for i in range(len(maps) - 1, 0, -1):
            maps[i - 1] = maps[i - 1] + upsample2x(maps[i])
        return [smooth(m) for smooth, m in zip(self.smooth, maps)]


class SharedHead(nn.Layer):
    """Head convs shared by every level (same weights), BatchNorm per level (statistics differ).

    Outputs per level ``[N, H*W]`` logits and ``[N, H*W, 4]`` distances ``exp(s_l * x) * stride``
    with a learnt per-level scale ``s_l``.
    """

    def __init__(self, channels: int, num_convs: int, strides: Sequence[int]):
        super().__init__()
        self.strides = [int(s) for s in strides]
        self.dw = nn.LayerList([nn.Conv2D(channels, channels, 3, padding=1, groups=channels, bias_attr=False)
                                for _ in range(num_convs)])
        self.pw = nn.LayerList([nn.Conv2D(channels, channels, 1, bias_attr=False) for _ in range(num_convs)])
        self.norms = nn.LayerList([
            nn.LayerList([nn.BatchNorm2D(channels) for _ in range(2 * num_convs)]) for _ in self.strides])
        bias = -math.log((1 - PRIOR_PROB) / PRIOR_PROB)
        self.cls = nn.Conv2D(channels, 1, 3, padding=1, weight_attr=nn.initializer.Normal(0.0, 0.01),
                             bias_attr=nn.initializer.Constant(bias))
        self.reg = nn.Conv2D(channels, 4, 3, padding=1, weight_attr=nn.initializer.Normal(0.0, 0.01),
                             bias_attr=nn.initializer.Constant(0.0))
        self.scales = nn.ParameterList([
            self.create_parameter([1], default_initializer=nn.initializer.Constant(1.0)) for _ in self.strides])

    def forward(self, feats: list[paddle.Tensor]) -> tuple[paddle.Tensor, paddle.Tensor]:
        logits, distances = [], []
        for level, (x, stride) in enumerate(zip(feats, self.strides)):
            norms = self.norms[level]
            for i, (dw, pw) in enumerate(zip(self.dw, self.pw)):
                x = F.relu(norms[2 * i](dw(x)))
                x = F.relu(norms[2 * i + 1](pw(x)))
            cls = self.cls(x).flatten(2).transpose([0, 2, 1])  # [N, HW, 1]
            reg = self.reg(x).flatten(2).transpose([0, 2, 1])  # [N, HW, 4]
            logits.append(cls.squeeze(-1))
            distances.append(paddle.exp(paddle.clip(reg * self.scales[level], max=MAX_LOG_DISTANCE)) * stride)
        return paddle.concat(logits, axis=1), paddle.concat(distances, axis=1)


def make_points(height: int, width: int, strides: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Location centres ``[P, 2]`` (x, y in input pixels) and their strides ``[P]``, level by level, row-major."""
    points, point_strides = [], []
    for stride in strides:
        h, w = math.ceil(height / stride), math.ceil(width / stride)
        ys, xs = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
        points.append(np.stack([(xs.ravel() + 0.5) * stride, (ys.ravel() + 0.5) * stride], axis=1))
        point_strides.append(np.full(h * w, stride, dtype=np.float32))
    return np.concatenate(points), np.concatenate(point_strides)


def decode_boxes(points: paddle.Tensor, distances: paddle.Tensor) -> paddle.Tensor:
    """Points [P, 2] + distances [N, P, 4] (l, t, r, b) -> boxes [N, P, 4] (x1, y1, x2, y2)."""
    return paddle.concat([points - distances[..., :2], points + distances[..., 2:]], axis=-1)


def average_members(boxes: Sequence[paddle.Tensor], scores: Sequence[paddle.Tensor]) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Members' dense boxes [N, P, 4] and scores [N, P] -> one set: mean score, score-weighted box.

    Weighted by score because a member that sees nothing at a location (score ~0) has no
    opinion on the box there; a plain mean would drag every box towards its guess.
    """
    if len(boxes) == 1:
        return boxes[0], scores[0]
    stacked_scores = paddle.stack(list(scores))  # [M, N, P]
    weights = stacked_scores / paddle.clip(stacked_scores.sum(axis=0, keepdim=True), min=1e-9)
    box = (paddle.stack(list(boxes)) * weights.unsqueeze(-1)).sum(axis=0)
    return box, stacked_scores.mean(axis=0)


class MainbodyDetector(nn.Layer):
    def __init__(self, backbone: nn.Layer, strides: Sequence[int], neck_channels: int, head_convs: int,
                 members: int = 1):
        super().__init__()
        strides = [int(s) for s in strides]
        if neck_channels < 1 or head_convs < 0:
            raise ValueError(f"neck_channels must be >= 1 and head_convs >= 0, got {neck_channels} and {head_convs}")
        if members < 1:
            raise ValueError(f"a detector needs at least one FPN + head member, got members={members}")
        own = list(getattr(backbone, "feature_strides", []))
        if own != strides:
            raise ValueError(
                f"the backbone's feature strides are {own} but the detector expects {strides}: "
                "set detector.strides to match, or build the backbone for them "
                "(pplcnetv2_base needs last_stride: 2 for 8/16/32)")
        if any(b != 2 * a for a, b in zip(strides, strides[1:])):
            raise ValueError(f"detector strides must double level to level (e.g. [8, 16, 32]), got {strides}")
        self.backbone = backbone
        self.strides = strides
        self.neck = FPN(backbone.feature_channels, neck_channels)
        self.head = SharedHead(neck_channels, head_convs, strides)
        # members 2.. (the first keeps the names neck / head: one-member checkpoints load as before)
        self.extra_necks = nn.LayerList([FPN(backbone.feature_channels, neck_channels) for _ in range(members - 1)])
        self.extra_heads = nn.LayerList([SharedHead(neck_channels, head_convs, strides) for _ in range(members - 1)])
        self._points: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        # Set while a frozen backbone's stage outputs come from elsewhere (an exported copy of it,
        # visrec.training.frozen_backbone): eager Paddle spends ~90 % of a training step there.
        self.stage_features: Any = None

    def points(self, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        key = (int(height), int(width))
        if key not in self._points:
            self._points[key] = make_points(*key, self.strides)
        return self._points[key]

    def stages(self, x: paddle.Tensor) -> list[paddle.Tensor]:
        # Only in eager mode: an export traced during training (an epoch callback) must see the real backbone.
        fast = self.stage_features is not None and paddle.in_dynamic_mode()
        return self.stage_features(x) if fast else self.backbone.forward_stages(x)

    @classmethod
    def from_members(cls, trained: Sequence["MainbodyDetector"]) -> "MainbodyDetector":
        """A detector on the backbone of ``trained[0]`` (shared, not copied) whose members are the
        first member of each of ``trained`` (detectors of the same shape, e.g. trained one by one)."""
        first = trained[0]
        model = cls(first.backbone, first.strides, first.neck.out_channels, len(first.head.dw), members=len(trained))
        for index, detector in enumerate(trained):
            model.set_member(index, detector)
        return model

    @property
    def members(self) -> list[tuple[FPN, SharedHead]]:
        return [(self.neck, self.head), *zip(self.extra_necks, self.extra_heads)]

    def set_member(self, index: int, trained: "MainbodyDetector") -> None:
        """Member ``index`` takes the FPN + head of ``trained`` (a one-member detector of the same shape)."""
        if not 0 <= index < len(self.members):
            raise IndexError(f"member {index} of a {len(self.members)}-member detector")
        neck, head = self.members[index]
        neck.set_state_dict(trained.neck.state_dict())
        head.set_state_dict(trained.head.state_dict())

    def forward(self, x: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Raw outputs of the first member (what training trains): logits [N, P] and distances [N, P, 4]."""
        return self.head(self.neck(self.stages(x)))

    def saliency(self, stages: list[paddle.Tensor]) -> paddle.Tensor:
        """``[N, 1, h, w]`` channel mean of the backbone's deepest activations (its head conv's where
        it has one): a pretrained backbone's own "where is the object" map, which training a frozen
        backbone's detector (the default) does not touch."""
        last = stages[-1]
        if hasattr(self.backbone, "head_activation"):
            last = self.backbone.head_activation(last)
        return last.mean(axis=1, keepdim=True)

    def predict(self, x: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
        """Dense decoded boxes [N, P, 4] (x1 y1 x2 y2, input pixels), scores [N, P] (the members
        averaged) and the backbone's saliency [N, 1, h, w] (stride 32), from one backbone pass."""
        stages = self.stages(x)
        points = paddle.to_tensor(self.points(x.shape[2], x.shape[3])[0])
        boxes, scores = [], []
        for neck, head in self.members:
            logits, distances = head(neck(stages))
            boxes.append(decode_boxes(points, distances))
            scores.append(F.sigmoid(logits))
        box, score = average_members(boxes, scores)
        return box, score, self.saliency(stages)

    def rep(self) -> None:
        if hasattr(self.backbone, "rep"):
            self.backbone.rep()

    def freeze_backbone(self) -> None:
        """Train only the FPN and head: the (pretrained) backbone keeps its weights and BN statistics.

        Saves the backward pass through the backbone, most of a step's cost, and keeps
        ImageNet features intact on a small training set.
        """
        for param in self.backbone.parameters():
            param.stop_gradient = True
        self._frozen_backbone = True
        self.backbone.eval()

    @property
    def backbone_frozen(self) -> bool:
        return getattr(self, "_frozen_backbone", False)

    def train(self):
        super().train()
        if getattr(self, "_frozen_backbone", False):
            self.backbone.eval()  # frozen BN statistics: batch statistics would drift from ImageNet's
        return self


def check_input_size(size: int, strides: Sequence[int]) -> None:
    if size < 1 or size % max(strides):
        raise ValueError(f"detector input size {size} must be a positive multiple of the largest stride "
                         f"{max(strides)} (e.g. 96, 128, 160)")


def build_detector(cfg: Any) -> MainbodyDetector:
    """Build from a ``DetectorConfig`` (or any object/dict with backbone, strides, neck_channels, head_convs,
    and optionally members: 1 unless given, e.g. by a finished run's ``model_config.json``)."""
    get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    spec = dict(get("backbone") or {})
    if "name" not in spec:
        raise ValueError(f"detector.backbone must be a dict with a 'name', e.g. {{'name': 'mobilenet_v1', "
                         f"'scale': 0.25}}; got {spec!r}")
    name = spec.pop("name")
    backbone = build_backbone(name, **spec)
    spec.pop("pretrained", None)
    model = MainbodyDetector(backbone, get("strides", [8, 16, 32]), int(get("neck_channels", 48)),
                             int(get("head_convs", 2)), int(get("members", 1)))
    logger.info("MainbodyDetector: backbone %s %s, FPN %d ch, head %d convs, strides %s, %d member(s)",
                name, spec, model.neck.out_channels, len(model.head.dw), model.strides, len(model.members))
    return model


# ----------------------------------------------------------------------- targets


def assign_targets(points: np.ndarray, point_strides: np.ndarray, gt_boxes: np.ndarray,
                   strides: Sequence[int], size_ranges: Sequence[Sequence[float]],
                   center_radius: float) -> np.ndarray:
    """For one image: the index of the ground-truth box each location learns, or -1 (background).

    A location is a positive of box g when (1) its level's size range holds g's longer side,
    (2) it lies inside g and (3) within ``center_radius x stride`` of g's centre (both axes).
    A location claimed by several boxes takes the smallest. A box left with no location
    (smaller than a cell) takes the location nearest its centre on its levels, so every
    box is learnt.
    """
    gt_boxes = np.asarray(gt_boxes, dtype=np.float32).reshape(-1, 4)
    num_points = points.shape[0]
    assigned = np.full(num_points, -1, dtype=np.int64)
    if gt_boxes.shape[0] == 0:
        return assigned
    if len(size_ranges) != len(strides):
        raise ValueError(f"{len(size_ranges)} size ranges for {len(strides)} strides: give one [lo, hi] per stride")
    lo_of_stride = {int(s): float(r[0]) for s, r in zip(strides, size_ranges)}
    hi_of_stride = {int(s): float(r[1]) for s, r in zip(strides, size_ranges)}
    lo = np.array([lo_of_stride[int(s)] for s in point_strides], dtype=np.float32)[:, None]
    hi = np.array([hi_of_stride[int(s)] for s in point_strides], dtype=np.float32)[:, None]

    x1, y1, x2, y2 = (gt_boxes[:, i][None, :] for i in range(4))
    px, py = points[:, 0:1], points[:, 1:2]
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    side = np.maximum(x2 - x1, y2 - y1)
    radius = center_radius * point_strides[:, None]
    on_level = (side >= lo) & (side <= hi)  # [P, M]
    inside = (px > x1) & (px < x2) & (py > y1) & (py < y2)
    central = (np.abs(px - cx) < radius) & (np.abs(py - cy) < radius)
    candidate = on_level & inside & central

    area = ((x2 - x1) * (y2 - y1))[0]
    cost = np.where(candidate, area[None, :], np.inf)
    best = cost.argmin(axis=1)
    has = np.isfinite(cost[np.arange(num_points), best])
    assigned[has] = best[has]

    for g in np.nonzero(~candidate.any(axis=0))[0]:
        levels = on_level[:, g] if on_level[:, g].any() else np.ones(num_points, dtype=bool)
        dist = np.hypot(points[:, 0] - cx[0, g], points[:, 1] - cy[0, g]) / point_strides
        dist[~levels] = np.inf
        assigned[int(dist.argmin())] = g
    return assigned


def build_targets(points: np.ndarray, point_strides: np.ndarray, gt_boxes: np.ndarray, counts: np.ndarray,
                  strides: Sequence[int], size_ranges: Sequence[Sequence[float]],
                  center_radius: float) -> tuple[np.ndarray, np.ndarray]:
    """A batch: padded boxes [B, M, 4] + counts [B] -> positive mask [B, P] and target boxes [B, P, 4]."""
    batch, num_points = gt_boxes.shape[0], points.shape[0]
    positive = np.zeros((batch, num_points), dtype=bool)
    targets = np.zeros((batch, num_points, 4), dtype=np.float32)
    for b in range(batch):
        boxes = gt_boxes[b, : int(counts[b])]
        assigned = assign_targets(points, point_strides, boxes, strides, size_ranges, center_radius)
        pos = assigned >= 0
        positive[b] = pos
        targets[b, pos] = boxes[assigned[pos]]
    return positive, targets


# -------------------------------------------------------------------------- loss


def paired_iou_giou(pred: paddle.Tensor, target: paddle.Tensor, eps: float = 1e-7) -> tuple[paddle.Tensor, paddle.Tensor]:
    """IoU and GIoU of matching rows of two [K, 4] ``x1 y1 x2 y2`` box sets."""
    area_p = (pred[:, 2] - pred[:, 0]).clip(min=0) * (pred[:, 3] - pred[:, 1]).clip(min=0)
    area_t = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    lt = paddle.maximum(pred[:, :2], target[:, :2])
    rb = paddle.minimum(pred[:, 2:], target[:, 2:])
    wh = (rb - lt).clip(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = area_p + area_t - inter + eps
    iou = inter / union
    enclose_wh = (paddle.maximum(pred[:, 2:], target[:, 2:]) - paddle.minimum(pred[:, :2], target[:, :2])).clip(min=0)
    enclose = enclose_wh[:, 0] * enclose_wh[:, 1] + eps
    return iou, iou - (enclose - union) / enclose


class DetectionLoss:
    """Quality focal loss (IoU-valued targets) + ``giou_weight`` x GIoU loss, both per positive."""

    def __init__(self, strides: Sequence[int], size_ranges: Sequence[Sequence[float]],
                 center_radius: float = 2.5, qfl_beta: float = 2.0, giou_weight: float = 2.0):
        self.strides = [int(s) for s in strides]
        self.size_ranges = [list(map(float, r)) for r in size_ranges]
        if len(self.size_ranges) != len(self.strides) or any(len(r) != 2 or r[0] > r[1] for r in self.size_ranges):
            raise ValueError(f"size_ranges must be one [lo, hi] (lo <= hi) per stride {self.strides}, "
                             f"got {size_ranges}")
        if center_radius <= 0:
            raise ValueError(f"center_radius must be > 0 (in strides), got {center_radius}")
        self.center_radius = float(center_radius)
        self.qfl_beta = float(qfl_beta)
        self.giou_weight = float(giou_weight)

    def __call__(self, model: MainbodyDetector, images: paddle.Tensor, gt_boxes: np.ndarray,
                 counts: np.ndarray) -> tuple[paddle.Tensor, dict[str, float]]:
        logits, distances = model(images)
        points, point_strides = model.points(images.shape[2], images.shape[3])
        positive, targets = build_targets(points, point_strides, gt_boxes, counts, self.strides,
                                          self.size_ranges, self.center_radius)
        return self.loss(logits, distances, points, positive, targets)

    def loss(self, logits: paddle.Tensor, distances: paddle.Tensor, points: np.ndarray,
             positive: np.ndarray, targets: np.ndarray) -> tuple[paddle.Tensor, dict[str, float]]:
        batch, num_points = positive.shape
        flat_pos = np.nonzero(positive.reshape(-1))[0]
        num_pos = max(int(flat_pos.size), 1)
        logits = logits.reshape([-1])
        quality = np.zeros(batch * num_points, dtype=np.float32)
        if flat_pos.size:
            index = paddle.to_tensor(flat_pos)
            boxes = decode_boxes(paddle.to_tensor(points), distances).reshape([-1, 4])
            pred = paddle.gather(boxes, index)
            target = paddle.to_tensor(targets.reshape(-1, 4)[flat_pos])
            iou, giou = paired_iou_giou(pred, target)
            giou_loss = (1.0 - giou).sum() / num_pos
            quality[flat_pos] = iou.detach().numpy().clip(0.0, 1.0)
        else:
            giou_loss = distances.sum() * 0.0  # keeps the graph connected on an all-background batch
        score_target = paddle.to_tensor(quality)
        prob = F.sigmoid(logits)
        bce = F.binary_cross_entropy_with_logits(logits, score_target, reduction="none")
        cls_loss = (bce * (prob - score_target).abs().pow(self.qfl_beta)).sum() / num_pos
        total = cls_loss + self.giou_weight * giou_loss
        parts = {"qfl": float(cls_loss), "giou": float(giou_loss), "pos_per_image": flat_pos.size / max(batch, 1)}
        return total, parts
