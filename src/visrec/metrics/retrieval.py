"""Retrieval metrics for embeddings: recall@k, mAP and MAP@R (numpy only).

Similarity is the dot product, i.e. cosine similarity for L2-normalised features.

Conventions (all deliberate, all tested):

* **Ranking and ties.** Each query ranks the gallery by descending similarity with a
  stable sort, so equal similarities keep gallery order: the lower gallery index
  ranks first. Similarities are computed in float64 so that float32 rounding does
  not create or break ties.
* **Query = gallery protocol.** When ``query_ids``/``gallery_ids`` are given, the
  gallery items whose id equals the query's id are *removed* from that query's
  ranking (PaddleClas zeroes the self-similarity but leaves the item in the ranking,
  where it can still rank and count as relevant; we do not).
* **Queries without a relevant item** (same label) in their ranking, e.g. the only
  image of its class once it is removed from its own ranking: they are counted in
  ``num_queries`` but excluded from every average and from ``num_valid_queries``.
  PaddleClas effectively counts them as misses for recall; excluding them keeps
  recall, mAP and MAP@R over the same set of queries and keeps a class that has one
  image from lowering the score of a perfect model.
* **Memory.** The similarity matrix is computed ``chunk_size`` query rows at a time;
  each chunk is fully sorted and reduced to a few numbers per query before the next.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

logger = logging.getLogger(__name__)

# Norms farther than this from 1 mean the caller forgot to normalise: the dot
# product is then not the cosine similarity the metrics are meant to rank by.
_NORM_TOLERANCE = 1e-3


def _as_features(name: str, x: Any) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(
            f"{name} must be a non-empty 2-D array (num_items, dim); got shape {arr.shape}"
        )
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must be numeric; got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf values: check the feature extractor output")
    return arr


def _as_vector(name: str, x: Any, length: int, feats_name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1 or arr.shape[0] != length:
        raise ValueError(
            f"{name} must be a 1-D array with one entry per row of {feats_name} "
            f"({length}); got shape {arr.shape}"
        )
    return arr


def _encode_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map two arrays of labels/ids (any dtype) to shared integer codes.

    Integer codes make the per-chunk equality matrices cheap even for string labels.
    """
    if np.issubdtype(a.dtype, np.number) != np.issubdtype(b.dtype, np.number):
        # np.concatenate would turn 3 into "3" and match it silently: refuse instead.
        raise ValueError(
            f"query and gallery labels/ids must both be numbers or both be strings; "
            f"got dtypes {a.dtype} and {b.dtype}"
        )
    try:
        _, codes = np.unique(np.concatenate([a, b]), return_inverse=True)
    except TypeError as exc:  # mixed, unorderable types such as int and str
        raise ValueError(
            f"labels/ids of query and gallery must be of one comparable type: {exc}"
        ) from exc
    codes = codes.reshape(-1)
    return codes[: len(a)], codes[len(a) :]


def _check_ks(ks: Iterable[int]) -> list[int]:
    ks_list = sorted({int(k) for k in ks})
    if not ks_list or ks_list[0] < 1:
        raise ValueError(f"ks must be a non-empty collection of positive integers; got {list(ks)}")
    return ks_list


def _warn_if_not_normalised(name: str, feats: np.ndarray) -> None:
    norms = np.linalg.norm(feats, axis=1)
    if np.any(np.abs(norms - 1.0) > _NORM_TOLERANCE):
        logger.warning(
            "%s are not L2-normalised (norms %.4g..%.4g): ranking by raw dot product, "
            "not cosine similarity; normalise features first",
            name,
            float(norms.min()),
            float(norms.max()),
        )


def _rank_chunk(
    sim: np.ndarray, relevant: np.ndarray, removed: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-query first relevant rank, relevant count, AP and MAP@R for one chunk.

    ``sim`` (rows x gallery) is modified in place. Removed items get -inf so that the
    stable sort sends them after every kept item; they are also made non-relevant, so
    they never count, whatever the ranking length.
    """
    if removed is not None:
        sim[removed] = -np.inf
        relevant &= ~removed
    # Stable sort on the negated similarity: descending order, ties by gallery index.
    order = np.argsort(-sim, axis=1, kind="stable")
    rel_sorted = np.take_along_axis(relevant, order, axis=1)
    del order

    n_rows = sim.shape[0]
    num_relevant = rel_sorted.sum(axis=1)
    rows, cols = np.nonzero(rel_sorted)  # row-major: columns ascend within each row
    del rel_sorted
    positions = cols + 1  # 1-based rank of each relevant item
    row_start = np.concatenate([[0], np.cumsum(num_relevant)[:-1]])
    hit_number = np.arange(len(rows)) - row_start[rows] + 1  # i-th relevant item of its row
    precision = hit_number / positions

    first_rank = np.zeros(n_rows, dtype=np.int64)
    has_rel = num_relevant > 0
    first_rank[has_rel] = positions[row_start[has_rel]]

    safe_r = np.maximum(num_relevant, 1)
    ap = np.bincount(rows, weights=precision, minlength=n_rows) / safe_r
    within_r = positions <= num_relevant[rows]
    map_at_r = np.bincount(rows, weights=precision * within_r, minlength=n_rows) / safe_r
    return first_rank, num_relevant, ap, map_at_r


def retrieval_metrics(
    query_feats: Any,
    query_labels: Any,
    gallery_feats: Any,
    gallery_labels: Any,
    query_ids: Any = None,
    gallery_ids: Any = None,
    ks: Iterable[int] = (1, 5),
    chunk_size: int = 1024,
    return_per_query: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Recall@k, mAP and MAP@R of ranking ``gallery_feats`` for each query.

    Returns ``{"recall@<k>" for k in ks, "mAP", "MAP@R", "num_queries",
    "num_valid_queries"}`` with metrics as fractions in [0, 1] averaged over the
    valid queries (those with at least one relevant item in their ranking). With
    ``return_per_query=True`` the dict also has ``"per_query"``: numpy arrays, one
    entry per query, ``label``, ``valid``, ``num_relevant``, ``first_relevant_rank``
    (1-based, 0 when no relevant item), ``average_precision``, ``map_at_r`` and one
    boolean ``recall@<k>`` per k (False for invalid queries: mask with ``valid``).

    Raises ValueError on malformed input or when no query has a relevant item.
    """
    q = _as_features("query_feats", query_feats)
    g = _as_features("gallery_feats", gallery_feats)
    if q.shape[1] != g.shape[1]:
        raise ValueError(
            f"query_feats and gallery_feats must have the same dimension; "
            f"got {q.shape[1]} and {g.shape[1]}"
        )
    ql_raw = _as_vector("query_labels", query_labels, q.shape[0], "query_feats")
    gl_raw = _as_vector("gallery_labels", gallery_labels, g.shape[0], "gallery_feats")
    if (query_ids is None) != (gallery_ids is None):
        raise ValueError(
            "pass both query_ids and gallery_ids (query=gallery protocol) or neither"
        )
    ks_list = _check_ks(ks)
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive integer; got {chunk_size}")
    chunk_size = int(chunk_size)

    _warn_if_not_normalised("query_feats", q)
    _warn_if_not_normalised("gallery_feats", g)
    ql, gl = _encode_pair(ql_raw, gl_raw)
    qid = gid = None
    if query_ids is not None:
        qid_raw = _as_vector("query_ids", query_ids, q.shape[0], "query_feats")
        gid_raw = _as_vector("gallery_ids", gallery_ids, g.shape[0], "gallery_feats")
        qid, gid = _encode_pair(qid_raw, gid_raw)

    n_q = q.shape[0]
    first_rank = np.zeros(n_q, dtype=np.int64)
    num_relevant = np.zeros(n_q, dtype=np.int64)
    ap = np.zeros(n_q, dtype=np.float64)
    map_at_r = np.zeros(n_q, dtype=np.float64)
    starts = range(0, n_q, chunk_size)
    for start in tqdm(
        starts, desc="retrieval metrics", unit="chunk", leave=False,
        disable=not progress or len(starts) < 2,
    ):
        stop = min(start + chunk_size, n_q)
        sim = q[start:stop] @ g.T
        relevant = ql[start:stop, None] == gl[None, :]
        removed = None if qid is None else qid[start:stop, None] == gid[None, :]
        (
            first_rank[start:stop],
            num_relevant[start:stop],
            ap[start:stop],
            map_at_r[start:stop],
        ) = _rank_chunk(sim, relevant, removed)

    valid = num_relevant > 0
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise ValueError(
            "no query has a relevant (same-label) gallery item, so retrieval metrics are "
            "undefined: check that query and gallery labels share classes"
        )
    if n_valid < n_q:
        logger.info(
            "%d of %d queries have no relevant gallery item and are excluded from the averages",
            n_q - n_valid,
            n_q,
        )

    result: dict[str, Any] = {}
    recall_hits: dict[str, np.ndarray] = {}
    for k in ks_list:
        hits = valid & (first_rank <= k)
        recall_hits[f"recall@{k}"] = hits
        result[f"recall@{k}"] = float(hits.sum() / n_valid)
    result["mAP"] = float(ap[valid].mean())
    result["MAP@R"] = float(map_at_r[valid].mean())
    result["num_queries"] = int(n_q)
    result["num_valid_queries"] = n_valid
    if return_per_query:
        result["per_query"] = {
            "label": ql_raw,
            "valid": valid,
            "num_relevant": num_relevant,
            "first_relevant_rank": first_rank,
            "average_precision": np.where(valid, ap, np.nan),
            "map_at_r": np.where(valid, map_at_r, np.nan),
            **recall_hits,
        }
    return result


def recall_at_k_curve(
    query_feats: Any,
    query_labels: Any,
    gallery_feats: Any,
    gallery_labels: Any,
    query_ids: Any = None,
    gallery_ids: Any = None,
    ks: Iterable[int] = range(1, 51),
    chunk_size: int = 1024,
) -> dict[int, float]:
    """Recall@k for every k in ``ks`` (same conventions as ``retrieval_metrics``)."""
    ks_list = _check_ks(ks)
    metrics = retrieval_metrics(
        query_feats, query_labels, gallery_feats, gallery_labels,
        query_ids=query_ids, gallery_ids=gallery_ids, ks=ks_list, chunk_size=chunk_size,
    )
    return {k: metrics[f"recall@{k}"] for k in ks_list}


def per_class_recall(
    per_query: dict[str, np.ndarray], labels: Sequence[Any] | np.ndarray, k: int = 1
) -> dict[Any, float]:
    """Recall@k of each query class, from ``retrieval_metrics(..., return_per_query=True)``.

    ``labels`` are the query labels, in query order. Only valid queries count; a class
    none of whose queries has a relevant item is left out (its recall is undefined).
    Keys are plain Python values (``int``/``str``), sorted, ready for a CSV.
    """
    if k < 1:
        raise ValueError(f"k must be a positive integer; got {k}")
    labels_arr = np.asarray(labels)
    valid = np.asarray(per_query["valid"], dtype=bool)
    first_rank = np.asarray(per_query["first_relevant_rank"])
    if labels_arr.ndim != 1 or labels_arr.shape[0] != valid.shape[0]:
        raise ValueError(
            f"labels must have one entry per query ({valid.shape[0]}); got shape {labels_arr.shape}"
        )
    hits = valid & (first_rank >= 1) & (first_rank <= k)
    out: dict[Any, float] = {}
    for label in np.unique(labels_arr[valid]):
        in_class = valid & (labels_arr == label)
        out[label.item()] = float(hits[in_class].sum() / in_class.sum())
    return out
