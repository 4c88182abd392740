"""Label-level scores from nearest neighbours, checked against a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest

from visrec.index.gallery import Gallery, Hit
from visrec.index.label_scores import label_hits


def brute_force(scores: np.ndarray, labels: list[str], top_m: int) -> dict[str, float]:
    """Every label's mean of its best min(m, count) similarities, over the whole gallery."""
    out = {}
    for label in set(labels):
        own = np.sort(scores[[i for i, lab in enumerate(labels) if lab == label]])[::-1]
        out[label] = float(own[:min(top_m, len(own))].mean())
    return out


@pytest.mark.parametrize("top_m", [1, 2, 3, 5])
def test_matches_brute_force_when_every_entry_is_retrieved(top_m):
    rng = np.random.default_rng(top_m)
    labels = [f"label {i % 7}" for i in range(40)] + ["single"]
    vectors = rng.normal(size=(len(labels), 16)).astype(np.float32)
    gallery = Gallery.build(vectors, labels, index_type="FLAT", fingerprint=None)
    query = rng.normal(size=(1, 16)).astype(np.float32)
    hits = gallery.search(query, len(gallery))[0]
    scored = label_hits(hits, gallery.label_counts(), top_m)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    expected = brute_force(unit @ (query[0] / np.linalg.norm(query[0])), labels, top_m)
    assert {h.label for h in scored} == set(expected)
    for hit in scored:
        assert hit.score == pytest.approx(expected[hit.label], abs=1e-5)
    assert [h.score for h in scored] == sorted((h.score for h in scored), reverse=True)
    best = {h.label: h for h in reversed(hits)}  # each label's nearest entry
    assert all(h.id == best[h.label].id for h in scored)


def test_entries_outside_the_retrieved_neighbours_count_as_the_lowest_retrieved_score():
    hits = [Hit(0, "a", 0.9), Hit(1, "b", 0.8), Hit(2, "a", 0.7), Hit(3, "c", 0.5)]
    scored = {h.label: h.score for h in label_hits(hits, {"a": 5, "b": 2, "c": 1}, top_m=3)}
    assert scored["a"] == pytest.approx((0.9 + 0.7 + 0.5) / 3)
    assert scored["b"] == pytest.approx((0.8 + 0.5) / 2)  # two entries: m is capped by the count
    assert scored["c"] == pytest.approx(0.5)  # one entry: its own score, no penalty


def test_a_label_with_several_close_entries_beats_one_stray_neighbour():
    hits = [Hit(0, "stray", 0.91), Hit(1, "right", 0.9), Hit(2, "right", 0.89), Hit(3, "stray", 0.4),
            Hit(4, "right", 0.88)]
    assert label_hits(hits, {"stray": 5, "right": 3}, top_m=1)[0].label == "stray"
    assert label_hits(hits, {"stray": 5, "right": 3}, top_m=3)[0].label == "right"


def test_empty_hits_and_bad_m():
    assert label_hits([], {}, 3) == []
    with pytest.raises(ValueError, match="class_top_m"):
        label_hits([Hit(0, "a", 1.0)], {"a": 1}, 0)


def test_label_counts_follow_add_and_remove():
    gallery = Gallery.build(np.eye(4, dtype=np.float32), ["a", "a", "b", "c"], index_type="FLAT", fingerprint=None)
    assert dict(gallery.label_counts()) == {"a": 2, "b": 1, "c": 1}
    gallery.add(np.eye(4, dtype=np.float32)[:1], ["b"])
    gallery.remove_label("a")
    assert dict(gallery.label_counts()) == {"b": 2, "c": 1}
