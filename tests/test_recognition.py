"""The recognition system: extractor wrapper, pipeline, threshold calibration, visualisation, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from visrec.cli import app
from visrec.config import RecognitionConfig
from visrec.data.cub import read_cub
from visrec.data.split_list import read_split_list
from visrec.imaging import load_image
from visrec.evaluation.system_eval import (
    choose_threshold,
    class_label,
    open_set_metrics,
    split_for_system,
)
from visrec.index.gallery import Gallery, GalleryMismatchError, Hit
from visrec.index.listfile import write_list_file
from visrec.inference.extractor_runtime import Extractor
from visrec.inference.gallery_ops import GalleryItem, build_gallery
from visrec.inference.pipeline import RecognitionSystem
from visrec.inference.visualize import draw_results, save_visualization

UNICODE_LABEL = "元气森林 sparkling water"


def rec_config(exported, gallery: Path, detector: bool = True, **extra) -> RecognitionConfig:
    extractor_dir, detector_dir = exported
    return RecognitionConfig(extractor=str(extractor_dir), detector=str(detector_dir) if detector else None,
                             gallery=str(gallery), **extra)


@pytest.fixture(scope="module")
def test_images(tiny_cub):
    root, split = tiny_cub
    meta = read_cub(root)
    test_ids = {e.unique_id for e in read_split_list(split / "test_list.txt")}
    return [im for im in meta.images if im.image_id in test_ids], meta


@pytest.fixture(scope="module")
def whole_image_gallery(exported_models, test_images, tmp_path_factory):
    """Every test image, whole, labelled by class name (names hold spaces); saved to disk."""
    images, meta = test_images
    extractor = Extractor(exported_models[0])
    items = [GalleryItem(meta.root / im.rel_path, class_label(meta.classes[im.class_id])) for im in images]
    gallery = build_gallery(extractor, items, "FLAT", progress=False)
    path = tmp_path_factory.mktemp("gallery") / "gallery"
    gallery.save(path)
    return path, items


# ----------------------------------------------------------------------------- extractor


def test_extractor_embeds_normalised_vectors_in_batches(exported_models, test_images):
    images, meta = test_images
    extractor = Extractor(exported_models[0], batch_size=3)
    pictures = [load_image(meta.root / im.rel_path) for im in images[:7]]
    vectors = extractor.embed(pictures)
    assert vectors.shape == (7, extractor.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    one_by_one = np.concatenate([extractor.embed([p]) for p in pictures])
    np.testing.assert_allclose(vectors, one_by_one, atol=1e-5)  # batching changes nothing
    assert extractor.embed([]).shape == (0, extractor.dim)


def test_extractor_refuses_a_detector_export(exported_models):
    with pytest.raises(ValueError, match="not an extractor"):
        Extractor(exported_models[1])


# ----------------------------------------------------------------------------- pipeline


def test_gallery_image_is_recognised_as_its_label_without_detector(exported_models, whole_image_gallery):
    path, items = whole_image_gallery
    # class_top_m 1 and no centroids: nearest neighbour, so a gallery image's own entry (similarity 1) decides
    system = RecognitionSystem.from_config(rec_config(exported_models, path, detector=False, score_threshold=0.0,
                                                      class_top_m=1, centroid_weight=0.0))
    for item in items[:5]:
        image = load_image(item.path)
        results = system.predict(image)
        assert len(results) == 1
        result = results[0]
        assert set(result) == {"bbox", "rec_docs", "rec_scores"}
        assert result["bbox"] == [0, 0, image.shape[1], image.shape[0]]  # the whole image is the object
        assert result["rec_docs"] == item.label and result["rec_scores"] == pytest.approx(1.0, abs=1e-3)


def test_pipeline_with_detector_output_format_and_topk(exported_models, whole_image_gallery):
    path, items = whole_image_gallery
    system = RecognitionSystem.from_config(rec_config(exported_models, path, det_threshold=0.0,
                                                      score_threshold=-1.0, nms_iou=0.9, class_top_m=1))
    image = load_image(items[0].path)
    results = system.predict(image, top_k=3, return_topk=True)
    assert 1 <= len(results) <= system.settings.max_det + 1
    height, width = image.shape[:2]
    scores = [r["rec_scores"] for r in results]
    assert scores == sorted(scores, reverse=True)
    for r in results:
        x1, y1, x2, y2 = r["bbox"]
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        assert isinstance(r["rec_docs"], str) and len(r["topk"]) == 3
        assert r["topk"][0]["label"] == r["rec_docs"] and all(isinstance(c["id"], int) for c in r["topk"])
    # the whole-image box is one of the candidates, and it matches its own gallery entry exactly
    assert any(r["bbox"] == [0, 0, width, height] and r["rec_docs"] == items[0].label for r in results)
    json.dumps(results)  # plain JSON types only


def test_threshold_comes_from_params_then_gallery_then_default(exported_models, whole_image_gallery, tmp_path):
    path, _ = whole_image_gallery
    gallery = Gallery.load(path)
    extractor = Extractor(exported_models[0])
    assert RecognitionSystem(extractor, gallery, settings=RecognitionConfig(default_threshold=0.3)).threshold == 0.3
    gallery.meta_extra["threshold"] = 0.61
    assert RecognitionSystem(extractor, gallery).threshold == pytest.approx(0.61)
    assert RecognitionSystem(extractor, gallery, settings=RecognitionConfig(score_threshold=0.9)).threshold == 0.9
    # above every score: nothing is recognised, and that is an empty list, not an error
    system = RecognitionSystem(extractor, gallery, settings=RecognitionConfig(score_threshold=1.01))
    assert system.predict(load_image(gallery.metadata_of(0)["path"])) == []


def test_results_are_deduplicated_by_class_agnostic_nms(exported_models, whole_image_gallery):
    path, _ = whole_image_gallery
    system = RecognitionSystem(Extractor(exported_models[0]), Gallery.load(path),
                               settings=RecognitionConfig(nms_iou=0.3))
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=np.float32)
    hits = [[Hit(1, "a", 0.7)], [Hit(2, "b", 0.9)], [Hit(3, "c", 0.2)]]
    results = system._select(boxes, hits, threshold=0.5, return_topk=False)
    assert [r["rec_docs"] for r in results] == ["b"]  # "a" overlaps the better "b"; "c" is under the threshold


def test_gallery_made_by_another_extractor_is_refused(exported_models, tmp_path):
    extractor = Extractor(exported_models[0])
    other = Gallery.build(np.eye(extractor.dim, dtype=np.float32)[:3], ["x", "y", "z"], index_type="FLAT",
                          fingerprint="0123456789abcdef")
    with pytest.raises(GalleryMismatchError, match="the gallery was built by extractor 0123456789abcdef.*rebuild"):
        RecognitionSystem(extractor, other)
    other.save(tmp_path / "g")
    with pytest.raises(GalleryMismatchError, match="rebuild"):
        RecognitionSystem.from_config(rec_config(exported_models, tmp_path / "g", detector=False))


def test_empty_gallery_is_a_clear_error(exported_models, test_images):
    images, meta = test_images
    extractor = Extractor(exported_models[0])
    gallery = Gallery.create(extractor.dim, "FLAT", fingerprint=extractor.fingerprint)
    system = RecognitionSystem(extractor, gallery)
    with pytest.raises(ValueError, match="gallery is empty"):
        system.predict(load_image(meta.root / images[0].rel_path))


def test_real_cub_photo_gives_the_documented_format(exported_models, cub_subset, tmp_path):
    meta = read_cub(cub_subset)
    photos = [meta.root / im.rel_path for im in meta.images[:3]]
    extractor = Extractor(exported_models[0])
    gallery = build_gallery(extractor, [GalleryItem(p, "Black footed Albatross") for p in photos], "FLAT",
                            progress=False)
    system = RecognitionSystem(extractor, gallery, settings=RecognitionConfig(score_threshold=0.0))
    from visrec.inference.detector_runtime import Detector

    system.detector = Detector(exported_models[1], score_threshold=0.0)
    results = system.predict(load_image(photos[0]))
    assert results and all(set(r) == {"bbox", "rec_docs", "rec_scores"} for r in results)
    assert all(len(r["bbox"]) == 4 and isinstance(r["rec_scores"], float) for r in results)


# ----------------------------------------------------------------------------- calibration


def brute_force_threshold(correct, scores, known):
    best_t, best_acc = None, -1.0
    for t in sorted(set(scores.tolist()) | {scores.max() + 1}):
        acc = np.mean([(k and c and s >= t) or (not k and s < t) for c, s, k in zip(correct, scores, known)])
        if acc > best_acc + 1e-12:
            best_t, best_acc = t, acc
    return best_t, best_acc


@pytest.mark.parametrize("seed", range(5))
def test_choose_threshold_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 40
    known = rng.random(n) < 0.7
    correct = known & (rng.random(n) < 0.8)
    scores = np.round(np.where(known, rng.normal(0.7, 0.1, n), rng.normal(0.5, 0.1, n)), 2)  # ties on purpose
    threshold, accuracy = choose_threshold(correct, scores, known)
    _, best = brute_force_threshold(correct, scores, known)
    assert accuracy == pytest.approx(best)
    right = np.where(known, correct & (scores >= threshold), scores < threshold)
    assert right.mean() == pytest.approx(accuracy)


def test_open_set_metrics_on_a_hand_made_case():
    labels = ["a", "b", "x", "y"]
    truth = ["a", "c", "u1", "u2"]
    scores = np.array([0.9, 0.8, 0.3, 0.7])
    known = np.array([True, True, False, False])
    m = open_set_metrics(labels, scores, truth, known, threshold=0.5)
    assert m["known_accepted_correct"] == 0.5  # "a" right and accepted, "b" wrong
    assert m["unknown_rejected"] == 0.5  # 0.3 rejected, 0.7 accepted
    assert m["open_set_accuracy"] == 0.5


def test_split_for_system_is_deterministic_and_disjoint(test_images):
    images, meta = test_images
    ids = {im.image_id for im in images}
    a = split_for_system(meta, ids, 2, 0.25, 0.5, seed=1)
    b = split_for_system(meta, ids, 2, 0.25, 0.5, seed=1)
    assert a == b
    gallery_paths = {item.path for item in a.gallery}
    assert not gallery_paths & {q.path for q in a.queries}
    assert len(a.gallery) == 2 * 4 and len(a.queries) == len(images) - 8
    assert len(a.held_out) == 1 and all(q.known == (q.label not in a.held_out) for q in a.queries)
    assert {q.part for q in a.queries} == {"calibration", "report"}
    with pytest.raises(ValueError, match="gallery_per_class"):
        split_for_system(meta, ids, 8, 0.25, 0.5)


def test_class_label_is_readable():
    assert class_label("001.Black_footed_Albatross") == "Black footed Albatross"
    assert class_label("Blue Jay") == "Blue Jay"


# ----------------------------------------------------------------------------- visualisation


def test_visualisation_draws_unicode_labels(tmp_path):
    image = np.full((120, 160, 3), 200, dtype=np.uint8)
    results = [{"bbox": [10, 20, 100, 110], "rec_docs": UNICODE_LABEL, "rec_scores": 0.87},
               {"bbox": [0, 0, 160, 120], "rec_docs": "Black footed Albatross", "rec_scores": 0.5}]
    drawn = draw_results(image, results)
    assert drawn.shape == image.shape and (drawn != image).any()
    path = save_visualization(image, results, tmp_path / "vis.png")
    assert load_image(path).shape == image.shape


# ----------------------------------------------------------------------------- CLI


@pytest.fixture()
def cli_env(exported_models, test_images, tmp_path):
    """A params file pointing at the tiny exports and a gallery under tmp_path, plus a list file."""
    images, meta = test_images
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "recognition": {"extractor": str(exported_models[0]), "detector": None,
                        "gallery": str(tmp_path / "gallery"), "score_threshold": 0.0},
        "index": {"index_type": "HNSW32"},
    }), encoding="utf-8")
    first_class = [im for im in images if im.class_id == images[0].class_id]
    rows = [(str(meta.root / im.rel_path), "Black footed Albatross") for im in first_class[:2]]
    rows.append((str(meta.root / first_class[2].rel_path), UNICODE_LABEL))
    list_file = write_list_file(tmp_path / "gallery.txt", rows)
    return params, list_file, rows


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_cli_build_recognize_add_remove_info(cli_env, test_images, tmp_path):
    params, list_file, rows = cli_env
    images, meta = test_images
    built = invoke("gallery", "build", list_file, "--params", params)
    assert built.exit_code == 0, built.output
    assert json.loads(built.stdout)["count"] == 3

    unicode_image = rows[2][0]
    out = invoke("recognize", unicode_image, "--params", params, "--visualize", tmp_path / "vis")
    assert out.exit_code == 0, out.output
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["results"][0]["rec_docs"] == UNICODE_LABEL
    assert (tmp_path / "vis" / f"{Path(unicode_image).stem}.png").exists()

    other = [im for im in images if im.class_id != images[0].class_id][0]
    new_list = write_list_file(tmp_path / "new.txt", [(str(meta.root / other.rel_path), "New class")])
    added = invoke("gallery", "add", new_list, "--params", params)
    assert added.exit_code == 0, added.output and json.loads(added.stdout)["count"] == 4
    found = json.loads(invoke("recognize", meta.root / other.rel_path, "--params", params).stdout)
    assert found["results"][0]["rec_docs"] == "New class"

    removed = invoke("gallery", "remove", "--label", "New class", "--params", params)
    assert removed.exit_code == 0 and json.loads(removed.stdout)["removed"] == 1
    gone = json.loads(invoke("recognize", meta.root / other.rel_path, "--params", params).stdout)
    assert all(r["rec_docs"] != "New class" for r in gone["results"])

    info = invoke("gallery", "info", "--labels", "--params", params)
    details = json.loads(info.stdout)
    assert details["count"] == 3 and details["label_counts"] == {"Black footed Albatross": 2, UNICODE_LABEL: 1}

    embedded = json.loads(invoke("extract", unicode_image, "--params", params).stdout)
    assert embedded["dim"] == len(embedded["embedding"])


def test_cli_errors_are_one_line_and_lose_nothing(cli_env, tmp_path):
    params, list_file, _ = cli_env
    assert invoke("gallery", "build", list_file, "--params", params).exit_code == 0
    before = json.loads(invoke("gallery", "info", "--params", params).stdout)

    def fails(*args: str, match: str) -> None:
        result = invoke(*args)
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith("error:") and match in result.stderr and "Traceback" not in result.stderr

    fails("recognize", tmp_path / "missing.jpg", "--params", params, match="does not exist")
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("hello")
    fails("recognize", not_image, "--params", params, match="could not be read")
    bad_list = tmp_path / "bad.txt"
    bad_list.write_text(f"{tmp_path / 'nowhere.jpg'}\tGhost\n", encoding="utf-8")
    fails("gallery", "add", bad_list, "--params", params, match="not found")
    fails("gallery", "remove", "--label", "Nobody", "--params", params, match="no gallery entry")
    fails("gallery", "remove", "--params", params, match="--ids or --label")
    assert json.loads(invoke("gallery", "info", "--params", params).stdout)["count"] == before["count"]

    mismatched = Gallery.build(np.eye(32, dtype=np.float32)[:2], ["a", "b"], index_type="FLAT",
                               fingerprint="ffffffffffffffff")
    mismatched.save(tmp_path / "gallery")
    fails("recognize", list_file, "--params", params, match="rebuild")


def test_degenerate_embeddings_are_refused_naming_the_image(exported_models, test_images, monkeypatch):
    from visrec.inference.gallery_ops import embed_items

    images, meta = test_images
    extractor = Extractor(exported_models[0])
    monkeypatch.setattr(extractor, "embed_batch", lambda batch: np.zeros((len(batch), extractor.dim), np.float32))
    item = GalleryItem(meta.root / images[0].rel_path, "x")
    with pytest.raises(ValueError, match=f"no usable embedding.*{images[0].rel_path.split('/')[-1]}"):
        embed_items(extractor, [item], progress=False)


def test_gallery_views_decode_each_file_once_and_match_direct_embedding(exported_models, test_images, monkeypatch):
    """embed_items prefetches batches on a second thread and decodes a file once for all its views;
    the vectors are what the extractor gives for the same crops one call at a time."""
    from visrec.inference import gallery_ops

    images, meta = test_images
    extractor = Extractor(exported_models[0], batch_size=3)
    paths = [meta.root / image.rel_path for image in images[:5]]
    items = [item for path in paths for item in (GalleryItem(path, "x"), GalleryItem(path, "x", (2, 3, 40, 30)))]
    decoded = []
    real_load = gallery_ops.load_image
    monkeypatch.setattr(gallery_ops, "load_image", lambda path: decoded.append(path) or real_load(path))
    vectors = gallery_ops.embed_items(extractor, items, batch_size=4, progress=False)
    assert sorted(decoded) == sorted(paths)  # batches of 4 views, 2 files each: every file decoded once
    direct = [extractor.embed([real_load(i.path) if i.box is None else extractor.crop(real_load(i.path), i.box)])[0]
              for i in items]
    np.testing.assert_allclose(vectors, np.stack(direct), atol=1e-5)


def test_cascade_detects_only_when_the_whole_image_is_not_recognised_confidently():
    """recognition.detect_unless_whole_margin: the whole image is embedded and searched first; the
    detector runs (and its crops join, before the whole box) unless that view's best label passes
    the score threshold and leads the runner-up by the margin, searched in the gallery the
    caller serves."""
    from visrec.index.gallery import Gallery
    from visrec.inference.pipeline import RecognitionSystem, Timings

    unit = np.eye(4, dtype=np.float32)
    whole_vector = unit[0] * 0.8 + unit[1] * 0.6

    class CountingDetector:
        calls = 0

        def detect_arrays(self, images, score_threshold=None):  # as Detector: the threshold on its own score
            CountingDetector.calls += 1
            dets = np.array([[5, 5, 30, 30, 0.9], [10, 10, 20, 20, 0.3]], np.float32)
            return [dets[dets[:, 4] >= (score_threshold or 0.0)] for _ in images]

    class BoxExtractor:  # the whole image -> whole_vector, any crop -> axis 2
        calls = []

        def embed_boxes(self, image, boxes):
            BoxExtractor.calls.append(len(boxes))
            whole = [float(b[2] - b[0]) == image.shape[1] and float(b[3] - b[1]) == image.shape[0] for b in boxes]
            return np.stack([whole_vector if w else unit[2] for w in whole]).astype(np.float32)

    def gallery_of(vectors, labels):
        gallery = Gallery.create(4, "FLAT")
        gallery.add(np.asarray(vectors, np.float32), labels)
        return gallery

    clear = gallery_of([whole_vector, unit[2]], ["seen whole", "bird"])  # whole: 1.0 vs 0.0
    ambiguous = gallery_of([unit[0], unit[1]], ["a", "b"])  # whole: 0.8 vs 0.6
    weak = gallery_of([unit[0], unit[2]], ["a", "bird"])  # whole: 0.8 vs 0.0

    def describe(gallery, served=None, **settings):
        system = RecognitionSystem.__new__(RecognitionSystem)
        system.detector, system.extractor, system.timings = CountingDetector(), BoxExtractor(), Timings()
        system.settings, system.gallery = RecognitionConfig(**settings), gallery
        CountingDetector.calls, BoxExtractor.calls = 0, []
        boxes, features, whole_last = system.describe(np.zeros((40, 60, 3), np.uint8), served)
        assert whole_last == (len(boxes) > 1 and system.settings.whole_image_box)  # the whole image comes last
        return boxes.tolist(), features, CountingDetector.calls, BoxExtractor.calls

    whole = [0.0, 0.0, 60.0, 40.0]
    boxes, features, detected, calls = describe(clear, detect_unless_whole_margin=0.5)
    assert boxes == [whole] and detected == 0 and calls == [1]
    boxes, features, detected, calls = describe(ambiguous, detect_unless_whole_margin=0.5)  # leads by 0.2 only
    assert boxes == [[5, 5, 30, 30], whole] and detected == 1 and calls == [1, 1]  # det 0.3 < det_threshold
    np.testing.assert_allclose(features, [unit[2], whole_vector], atol=1e-6)
    assert describe(weak, detect_unless_whole_margin=0.5, score_threshold=0.7)[2] == 0
    assert describe(weak, detect_unless_whole_margin=0.5, score_threshold=0.9)[2] == 1  # under the threshold
    # the decision searches the gallery passed in (a request's snapshot), not the system's own
    assert describe(ambiguous, clear, detect_unless_whole_margin=0.5)[2] == 0
    assert describe(clear, ambiguous, detect_unless_whole_margin=0.5)[2] == 1
    # off: every box in one extractor call, as PP-ShiTu
    boxes, _, detected, calls = describe(clear, detect_unless_whole_margin=None)
    assert boxes == [[5, 5, 30, 30], whole] and detected == 1 and calls == [2]
    boxes, _, detected, calls = describe(clear, detect_unless_whole_margin=0.5, whole_image_box=False)
    assert boxes == [[5, 5, 30, 30]] and detected == 1  # no whole image to start from: no cascade


def four_label_gallery(seed: int, queries: int):
    """A FLAT gallery of 12 random unit vectors under 4 labels, and random unit queries."""
    from visrec.index.gallery import Gallery

    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(12, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = [f"label {i % 4}" for i in range(12)]
    gallery = Gallery.create(8, "FLAT")
    gallery.add(vectors, labels)
    asked = rng.normal(size=(queries, 8)).astype(np.float32)
    return gallery, vectors, labels, asked / np.linalg.norm(asked, axis=1, keepdims=True)


def test_whole_context_blends_each_object_with_its_photo():
    """recognition.whole_context: a detection's label scores become (1 - w) x its own + w x the
    whole image's (a label missing from one side's neighbours counts as that side's lowest
    retrieved score); the whole image is then no result of its own. 0 keeps PP-ShiTu's results."""
    from visrec.index.label_scores import label_hits, with_context
    from visrec.inference.pipeline import Described, RecognitionSystem, Timings

    gallery, _, _, queries = four_label_gallery(seed=0, queries=3)
    rows = gallery.search(queries, 5)  # 5 of 12 neighbours: some labels are missing from a row
    per_row = [label_hits(row, gallery.label_counts(), 2) for row in rows]

    blended = with_context(per_row[0], rows[0][-1].score, per_row[2], rows[2][-1].score, 0.3)
    own = {h.label: h.score for h in per_row[0]}
    context = {h.label: h.score for h in per_row[2]}
    for hit in blended:  # brute-force reference
        expected = 0.7 * own.get(hit.label, rows[0][-1].score) + 0.3 * context.get(hit.label, rows[2][-1].score)
        assert hit.score == pytest.approx(expected, abs=1e-6)
    assert [h.score for h in blended] == sorted((h.score for h in blended), reverse=True)
    assert {h.label for h in blended} == set(own) | set(context)

    system = RecognitionSystem.__new__(RecognitionSystem)
    system.timings, system.gallery = Timings(), gallery
    boxes = np.array([[5, 5, 30, 30], [40, 10, 60, 35], [0, 0, 64, 48]], np.float32)  # 2 objects + the whole image

    def results(weight):
        system.settings = RecognitionConfig(whole_context=weight, class_top_m=2, search_k=5, nms_iou=1.0,
                                            centroid_weight=0.0)
        return system.recognize(Described(boxes, queries, True), top_k=3, threshold=-2.0, return_topk=True)

    separate = results(0.0)
    assert sorted(r["bbox"] for r in separate) == sorted(boxes.astype(int).tolist())
    combined = results(0.3)
    assert sorted(r["bbox"] for r in combined) == sorted(boxes[:2].astype(int).tolist())  # no whole-image result
    for result, own_row, floor in ((r, per_row[i], rows[i][-1].score) for i, r in
                                   ((boxes[:2].astype(int).tolist().index(r["bbox"]), r) for r in combined)):
        best = with_context(own_row, floor, per_row[2], rows[2][-1].score, 0.3)[0]
        assert result["rec_docs"] == best.label and result["rec_scores"] == pytest.approx(best.score, abs=1e-5)
    system.settings = RecognitionConfig(whole_context=0.3, centroid_weight=0.0)
    assert len(system.recognize(Described(boxes[2:], queries[2:], False), threshold=-2.0)) == 1
    # a last box that is not the whole image (whole_image_box: false) is a result of its own, however
    # large: describe says which box is the photo, the geometry does not
    system.settings = RecognitionConfig(whole_context=0.3, centroid_weight=0.0, nms_iou=1.0)
    unmarked = system.recognize(Described(boxes, queries, False), top_k=3, threshold=-2.0)
    assert sorted(r["bbox"] for r in unmarked) == sorted(boxes.astype(int).tolist())
    with pytest.raises(ValueError, match="whole_context"):
        system.settings = RecognitionConfig(whole_context=1.5)
    with pytest.raises(ValueError, match="centroid_weight"):
        system.settings = RecognitionConfig(centroid_weight=-0.1)


def test_centroid_weight_blends_each_label_with_its_centroid():
    """recognition.centroid_weight: a box's label score becomes (1 - w) x its best-m mean + w x its
    cosine to the label's unit mean vector; every box of a photo is scored on every label any of
    them found (a label outside a box's neighbours counts that box's lowest retrieved score)."""
    from visrec.index.label_scores import label_hits
    from visrec.inference.pipeline import RecognitionSystem, Timings

    gallery, vectors, labels, queries = four_label_gallery(seed=1, queries=2)
    centroids = {label: vectors[[i for i, lab in enumerate(labels) if lab == label]].mean(0) for label in set(labels)}
    centroids = {label: c / np.linalg.norm(c) for label, c in centroids.items()}

    system = RecognitionSystem.__new__(RecognitionSystem)
    system.timings, system.gallery = Timings(), gallery
    system.settings = RecognitionConfig(class_top_m=2, search_k=4, centroid_weight=0.4)
    neighbours, blended = system._label_scores(queries, gallery, 4)
    found = {h.label for row in neighbours for h in row}
    for row, hits, query in zip(neighbours, blended, queries, strict=True):
        own = {h.label: h.score for h in label_hits(row, gallery.label_counts(), 2)}
        assert {h.label for h in hits} == found  # both boxes scored on the same labels
        for hit in hits:  # brute-force reference
            expected = 0.6 * own.get(hit.label, row[-1].score) + 0.4 * float(query @ centroids[hit.label])
            assert hit.score == pytest.approx(expected, abs=1e-5)
            assert gallery.label_of(hit.id) == hit.label
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    system.settings = RecognitionConfig(class_top_m=2, search_k=4, centroid_weight=0.0)
    plain = system._label_scores(queries, gallery, 4)[1]
    assert plain == [label_hits(row, gallery.label_counts(), 2) for row in neighbours]
