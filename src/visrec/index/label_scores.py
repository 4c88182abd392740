"""Label-level scores from a box's nearest gallery neighbours.

Nearest neighbour lets one stray gallery image decide; with a few images per label, the mean
of a label's best ``m`` similarities is steadier (measured on real CUB photos, 5 gallery photos
per species: top-1 0.606 -> 0.636 with m = 2, whole photos on both sides). A label with fewer
than ``m`` entries in the whole gallery averages over the entries it has, so a label with one
photo is not penalised for it. Entries of a label that fall outside the ``k`` retrieved
neighbours count as the lowest retrieved score: they are at most that similar.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from visrec.index.centroids import LabelCentroids
from visrec.index.gallery_api import Hit


def label_hits(hits: Sequence[Hit], label_counts: Mapping[str, int], top_m: int) -> list[Hit]:
    """One hit per label, best first: ``score`` is the label's score, ``id`` its nearest entry.

    ``hits`` are one query's neighbours, best first (as ``Gallery.search`` returns them).
    ``top_m`` = 1 gives plain nearest-neighbour scores.
    """
    if top_m < 1:
        raise ValueError(f"recognition.class_top_m must be >= 1, got {top_m}")
    if not hits:
        return []
    floor = hits[-1].score
    per_label: dict[str, list[Hit]] = {}
    for hit in hits:
        per_label.setdefault(hit.label, []).append(hit)
    scored = []
    for label, group in per_label.items():
        m = max(1, min(top_m, int(label_counts.get(label, len(group)))))
        scores = [h.score for h in group[:m]] + [floor] * max(0, m - len(group))
        best = group[0]
        scored.append(Hit(best.id, label, sum(scores) / m, best.metadata))
    scored.sort(key=lambda h: -h.score)  # stable: ties keep the order of their nearest entries
    return scored


def with_context(object_hits: Sequence[Hit], object_floor: float, context_hits: Sequence[Hit],
                 context_floor: float, weight: float) -> list[Hit]:
    """An object's label scores blended with its photo's: ``(1 - weight) * object + weight * context``
    per label, best first. A label missing from one side's neighbours counts as that side's
    ``floor`` (its lowest retrieved score: the label is at most that similar). The ``id`` and
    metadata stay the object's nearest entry of the label when it has one."""
    objects = {h.label: h for h in object_hits}
    contexts = {h.label: h for h in context_hits}
    blended = []
    for label in objects.keys() | contexts.keys():
        own, context = objects.get(label), contexts.get(label)
        score = ((1.0 - weight) * (own.score if own else object_floor)
                 + weight * (context.score if context else context_floor))
        nearest = own or context
        blended.append(Hit(nearest.id, label, score, nearest.metadata))
    blended.sort(key=lambda h: -h.score)
    return blended


def with_centroids(rows: Sequence[Sequence[Hit]], floors: Sequence[float], queries: np.ndarray,
                   centroids: LabelCentroids, weight: float) -> list[list[Hit]]:
    """Label scores blended with the query's cosine to each label's centroid:
    ``(1 - weight) * label score + weight * centroid cosine``, best first.

    ``rows`` are the :func:`label_hits` of ``queries`` (the boxes of one photo, searched together).
    Every row gets every label any row found, so the boxes of a photo are scored on the same
    labels: a label outside a row's neighbours scores that row's ``floor`` (its lowest retrieved
    similarity) on the first part. Its ``id`` and metadata are then the nearest entry another row
    found. A label the centroid table lacks (added elsewhere since) keeps its label score."""
    nearest: dict[str, Hit] = {}
    for row in rows:
        for hit in row:
            if hit.label not in nearest or hit.score > nearest[hit.label].score:
                nearest[hit.label] = hit
    labels = list(nearest)
    cosines = centroids.similarities(queries, labels)
    blended_rows = []
    for row, floor, cosine in zip(rows, floors, cosines, strict=True):
        own = {hit.label: hit for hit in row}
        blended = []
        for label, centroid in zip(labels, cosine.tolist(), strict=True):
            hit = own.get(label)
            score = hit.score if hit is not None else float(floor)
            if centroid == centroid:  # not NaN
                score = (1.0 - weight) * score + weight * centroid
            source = hit or nearest[label]
            blended.append(Hit(source.id, label, score, source.metadata))
        blended.sort(key=lambda h: -h.score)
        blended_rows.append(blended)
    return blended_rows
