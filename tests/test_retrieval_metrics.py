"""Retrieval metrics against a brute-force reference and hand-computed numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from visrec.metrics.retrieval import per_class_recall, recall_at_k_curve, retrieval_metrics


# --------------------------------------------------------------------------- reference
def reference_metrics(q, ql, g, gl, qids=None, gids=None, ks=(1, 5)):
    """Straight-from-the-definition loops, written independently of the implementation."""
    per_query = []
    for i in range(len(q)):
        ranking = []
        for j in range(len(g)):
            if qids is not None and qids[i] == gids[j]:
                continue  # the query's own image is not part of its ranking
            sim = sum(float(a) * float(b) for a, b in zip(q[i], g[j]))
            ranking.append((-sim, j))
        ranking.sort()  # descending similarity, then lower gallery index first
        rel = [1 if gl[j] == ql[i] else 0 for _, j in ranking]
        n_rel = sum(rel)
        if n_rel == 0:
            per_query.append(None)
            continue
        hits = 0
        precisions_at_hits = []
        for pos, r in enumerate(rel, start=1):
            if r:
                hits += 1
                precisions_at_hits.append((hits / pos, pos))
        ap = sum(p for p, _ in precisions_at_hits) / n_rel
        map_r = sum(p for p, pos in precisions_at_hits if pos <= n_rel) / n_rel
        recalls = {k: 1.0 if any(rel[:k]) else 0.0 for k in ks}
        per_query.append({"ap": ap, "map_r": map_r, "recalls": recalls})
    valid = [x for x in per_query if x is not None]
    out = {f"recall@{k}": sum(x["recalls"][k] for x in valid) / len(valid) for k in ks}
    out["mAP"] = sum(x["ap"] for x in valid) / len(valid)
    out["MAP@R"] = sum(x["map_r"] for x in valid) / len(valid)
    out["num_queries"] = len(q)
    out["num_valid_queries"] = len(valid)
    return out


def assert_metrics_equal(got, want):
    assert set(want) <= set(got)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


def unit_rows(rng, n, dim):
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


KS = (1, 2, 5, 10)


# --------------------------------------------------------------------------- vs reference
@pytest.mark.parametrize("seed", range(5))
def test_separate_query_and_gallery_matches_reference(seed):
    rng = np.random.default_rng(seed)
    q, g = unit_rows(rng, 23, 8), unit_rows(rng, 41, 8)
    ql, gl = rng.integers(0, 6, size=23), rng.integers(0, 6, size=41)
    got = retrieval_metrics(q, ql, g, gl, ks=KS, chunk_size=7)
    assert_metrics_equal(got, reference_metrics(q, ql, g, gl, ks=KS))


@pytest.mark.parametrize("seed", range(5))
def test_query_equals_gallery_with_self_removal_matches_reference(seed):
    rng = np.random.default_rng(100 + seed)
    x = unit_rows(rng, 37, 6)
    labels = rng.integers(0, 8, size=37)  # repeated labels, some classes may be singletons
    ids = np.arange(1000, 1037)
    got = retrieval_metrics(x, labels, x, labels, query_ids=ids, gallery_ids=ids, ks=KS, chunk_size=5)
    want = reference_metrics(x, labels, x, labels, ids, ids, ks=KS)
    assert_metrics_equal(got, want)


def test_self_removal_removes_every_gallery_item_with_the_query_id():
    # Gallery holds several items per id (e.g. crops of one image): all go.
    rng = np.random.default_rng(7)
    q, g = unit_rows(rng, 10, 5), unit_rows(rng, 30, 5)
    ql, gl = rng.integers(0, 3, size=10), rng.integers(0, 3, size=30)
    qids, gids = np.arange(10), rng.integers(0, 10, size=30)
    got = retrieval_metrics(q, ql, g, gl, query_ids=qids, gallery_ids=gids, ks=KS)
    assert_metrics_equal(got, reference_metrics(q, ql, g, gl, qids, gids, ks=KS))


def test_self_match_is_removed_not_left_in_the_ranking():
    # Without removal each query finds itself first (recall@1 = 1); with removal
    # the nearest *other* image decides. Zeroing the similarity and keeping the item
    # (PaddleClas) would still count it as a relevant item at the bottom of the list.
    x = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = np.array([0, 0, 1])
    ids = np.array([10, 11, 12])
    kept = retrieval_metrics(x, labels, x, labels, ks=(1,))
    removed = retrieval_metrics(x, labels, x, labels, query_ids=ids, gallery_ids=ids, ks=(1,), return_per_query=True)
    assert kept["recall@1"] == 1.0
    # Query 0 (label 0): others are x1 (cos 0, label 0) and x2 (cos -1): hit at rank 1.
    # Query 1 (label 0): x0 (cos 0, index 0) ties x2 (cos 0, index 2): x0 first: hit.
    # Query 2 (label 1): no other label-1 image: excluded.
    assert removed["num_valid_queries"] == 2
    assert removed["recall@1"] == 1.0
    assert removed["per_query"]["num_relevant"].tolist() == [1, 1, 0]


@pytest.mark.parametrize("seed", range(3))
def test_strings_as_labels_and_ids(seed):
    rng = np.random.default_rng(200 + seed)
    x = unit_rows(rng, 20, 4)
    labels = np.array([f"class_{i}" for i in rng.integers(0, 4, size=20)])
    ids = np.array([f"img_{i:03d}" for i in range(20)])
    got = retrieval_metrics(x, labels, x, labels, query_ids=ids, gallery_ids=ids, ks=KS)
    assert_metrics_equal(got, reference_metrics(x, labels, x, labels, ids, ids, ks=KS))


# --------------------------------------------------------------------------- ties
def test_ties_break_by_lower_gallery_index():
    query = np.array([[1.0, 0.0]])
    # Items 1, 2, 3 are identical (similarity 1.0); item 0 is orthogonal.
    gallery = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    labels = np.array(["A", "B", "A", "B"])
    res = retrieval_metrics(query, ["A"], gallery, labels, ks=(1, 2), return_per_query=True)
    # Ranking: 1(B) 2(A) 3(B) 0(A) -> relevant at ranks 2 and 4.
    assert res["per_query"]["first_relevant_rank"].tolist() == [2]
    assert res["recall@1"] == 0.0 and res["recall@2"] == 1.0
    assert res["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2)  # 0.5
    assert res["MAP@R"] == pytest.approx((0 + 1 / 2) / 2)  # R=2: P(2)*rel(2) / 2 = 0.25

    # Swap the labels of the tied items: now the relevant one has the lowest index.
    res = retrieval_metrics(query, ["A"], gallery, np.array(["A", "A", "B", "B"]), ks=(1,))
    assert res["recall@1"] == 1.0


@pytest.mark.parametrize("seed", range(4))
def test_many_ties_match_reference(seed):
    # Entries of +-0.5 in 4-D give unit vectors whose dot products are exact
    # (-1, -0.5, 0, 0.5, 1) in any summation order: ties are exact, not near.
    rng = np.random.default_rng(300 + seed)
    x = rng.choice([-0.5, 0.5], size=(40, 4))
    labels = rng.integers(0, 5, size=40)
    ids = np.arange(40)
    got = retrieval_metrics(x, labels, x, labels, query_ids=ids, gallery_ids=ids, ks=KS, chunk_size=3)
    assert_metrics_equal(got, reference_metrics(x, labels, x, labels, ids, ids, ks=KS))
    got = retrieval_metrics(x[:15], labels[:15], x[15:], labels[15:], ks=KS)
    assert_metrics_equal(got, reference_metrics(x[:15], labels[:15], x[15:], labels[15:], ks=KS))


# --------------------------------------------------------------------------- hand example
def test_hand_computed_example():
    # Gallery (label): g0=(1,0) B, g1=(0.6,0.8) A, g2=(0,1) A, g3=(0.8,0.6) B.
    # q0=(1,0) label A: cos g0 1.0, g3 0.8, g1 0.6, g2 0.0 -> ranking B B A A
    #   rel 0 0 1 1: recall@1 0, recall@2 0, recall@3 1; AP = (1/3 + 2/4)/2 = 5/12;
    #   R=2: MAP@R = (P(1)*0 + P(2)*0)/2 = 0.
    # q1=(0.8,0.6) label B: cos g3 1.0, g1 0.96, g0 0.8, g2 0.6 -> ranking B A B A
    #   rel 1 0 1 0: recall@1 1; AP = (1/1 + 2/3)/2 = 5/6; MAP@R = (1*1 + 0.5*0)/2 = 1/2.
    # q2=(0,1) label C: no gallery item of class C -> excluded (counted in num_queries).
    # Averages over q0, q1: recall@1 = 1/2, recall@2 = 1/2, recall@3 = 1,
    #   mAP = (5/12 + 5/6)/2 = 0.625, MAP@R = (0 + 1/2)/2 = 0.25.
    gallery = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.8, 0.6]])
    gallery_labels = ["B", "A", "A", "B"]
    queries = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])
    query_labels = ["A", "B", "C"]
    res = retrieval_metrics(queries, query_labels, gallery, gallery_labels, ks=(1, 2, 3), return_per_query=True)
    assert res["recall@1"] == pytest.approx(0.5)
    assert res["recall@2"] == pytest.approx(0.5)
    assert res["recall@3"] == pytest.approx(1.0)
    assert res["mAP"] == pytest.approx(0.625)
    assert res["MAP@R"] == pytest.approx(0.25)
    assert res["num_queries"] == 3
    assert res["num_valid_queries"] == 2
    pq = res["per_query"]
    assert pq["valid"].tolist() == [True, True, False]
    assert pq["first_relevant_rank"].tolist() == [3, 1, 0]
    np.testing.assert_allclose(pq["average_precision"][:2], [5 / 12, 5 / 6])
    assert math.isnan(pq["average_precision"][2])
    assert pq["recall@1"].tolist() == [False, True, False]


def test_perfect_and_worst_rankings():
    # Two tight clusters far apart: every query retrieves its whole class first.
    x = np.array([[1.0, 0.0], [0.99, 0.141], [0.0, 1.0], [0.141, 0.99]])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = [0, 0, 1, 1]
    ids = [0, 1, 2, 3]
    res = retrieval_metrics(x, labels, x, labels, query_ids=ids, gallery_ids=ids, ks=(1,))
    assert res["recall@1"] == res["mAP"] == res["MAP@R"] == 1.0
    # Each class is a pair of opposite vectors: the only relevant item (cos -1) is
    # always ranked last, behind the two orthogonal items of the other class.
    x = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    res = retrieval_metrics(x, labels, x, labels, query_ids=ids, gallery_ids=ids, ks=(1, 2, 3))
    assert res["recall@1"] == res["recall@2"] == 0.0 and res["recall@3"] == 1.0
    assert res["mAP"] == pytest.approx(1 / 3) and res["MAP@R"] == 0.0


# --------------------------------------------------------------------------- exclusions
def test_singleton_classes_are_excluded_after_self_removal():
    rng = np.random.default_rng(11)
    x = unit_rows(rng, 9, 4)
    labels = np.array([0, 0, 0, 1, 1, 2, 3, 4, 4])  # classes 2 and 3 have one image
    ids = np.arange(9)
    res = retrieval_metrics(x, labels, x, labels, query_ids=ids, gallery_ids=ids, ks=(1,), return_per_query=True)
    assert res["num_queries"] == 9
    assert res["num_valid_queries"] == 7
    assert res["per_query"]["valid"].tolist() == [True] * 5 + [False, False] + [True] * 2
    assert_metrics_equal(res, reference_metrics(x, labels, x, labels, ids, ids, ks=(1,)))
    # Excluded, not counted as misses: recall@1 is the hit rate over the 7 valid queries.
    pq = res["per_query"]
    assert res["recall@1"] == pytest.approx(pq["recall@1"].sum() / 7)


def test_no_valid_query_raises():
    x = np.eye(3)
    with pytest.raises(ValueError, match="no query has a relevant"):
        retrieval_metrics(x, [0, 1, 2], x, [0, 1, 2], query_ids=[0, 1, 2], gallery_ids=[0, 1, 2])


# --------------------------------------------------------------------------- chunking
@pytest.mark.parametrize("seed", range(3))
def test_chunk_size_does_not_change_results(seed):
    rng = np.random.default_rng(400 + seed)
    x = unit_rows(rng, 150, 16)
    labels = rng.integers(0, 20, size=150)
    ids = np.arange(150)
    results = [
        retrieval_metrics(x, labels, x, labels, query_ids=ids, gallery_ids=ids, ks=KS,
                          chunk_size=c, return_per_query=True)
        for c in (1, 7, 64, 150, 10_000)
    ]
    first = results[0]
    for other in results[1:]:
        for key in ("recall@1", "recall@2", "recall@5", "recall@10", "mAP", "MAP@R", "num_valid_queries"):
            assert other[key] == first[key], key
        for key, arr in first["per_query"].items():
            np.testing.assert_array_equal(other["per_query"][key], arr, err_msg=key)


# --------------------------------------------------------------------------- curve, per class
def test_recall_curve_is_monotone_and_matches_reference():
    rng = np.random.default_rng(21)
    x = unit_rows(rng, 30, 5)
    labels = rng.integers(0, 6, size=30)
    ids = np.arange(30)
    curve = recall_at_k_curve(x, labels, x, labels, query_ids=ids, gallery_ids=ids, ks=range(1, 31))
    assert list(curve) == list(range(1, 31))
    values = list(curve.values())
    assert values == sorted(values)
    assert values[-1] == 1.0  # k >= ranking length: every valid query has its hit
    want = reference_metrics(x, labels, x, labels, ids, ids, ks=range(1, 31))
    for k, v in curve.items():
        assert v == pytest.approx(want[f"recall@{k}"], abs=1e-12)


def test_per_class_recall():
    # Class 0: queries 0 and 1; class 1: query 2; class 2: query 3 (a singleton).
    x = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [0.6, 0.8]])
    labels = np.array([0, 0, 1, 2])
    gallery = np.array([[1.0, 0.0], [0.0, 1.0]])
    gallery_labels = np.array([0, 1])
    res = retrieval_metrics(x, labels, gallery, gallery_labels, ks=(1,), return_per_query=True)
    # q0 -> g0 (label 0): hit. q1 -> g1 (label 1): miss. q2 (cos 0.8 vs 0.6) -> g0: miss.
    # q3 (label 2): no relevant item -> class 2 left out.
    assert per_class_recall(res["per_query"], labels) == {0: 0.5, 1: 0.0}
    assert per_class_recall(res["per_query"], labels, k=2) == {0: 1.0, 1: 1.0}
    # Mean over classes weighted by valid queries equals the overall recall@1.
    assert res["recall@1"] == pytest.approx(1 / 3)


# --------------------------------------------------------------------------- input errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"query_feats": np.ones((2, 3)), "gallery_feats": np.ones((2, 4))}, "same dimension"),
        ({"query_labels": [0, 1, 2]}, "query_labels"),
        ({"query_ids": [0, 1]}, "both query_ids and gallery_ids"),
        ({"ks": (0,)}, "positive integers"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"query_feats": np.array([[np.nan, 0.0], [0.0, 1.0]])}, "NaN"),
        ({"gallery_feats": np.ones(4)}, "2-D"),
        ({"gallery_labels": ["0", "1"]}, "both be numbers or both be strings"),
    ],
)
def test_bad_input_raises_clear_error(kwargs, match):
    args = {
        "query_feats": np.eye(2),
        "query_labels": [0, 1],
        "gallery_feats": np.eye(2),
        "gallery_labels": [0, 1],
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(**args)
