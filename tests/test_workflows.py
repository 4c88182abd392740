"""visrec.workflows: what the CLI, the stages and the Airflow DAGs call (DVC stages, promotion, gallery update)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from visrec.data.cub import read_cub
from visrec.imaging import load_image
from visrec.index.factory import gallery_version, is_milvus, open_gallery
from visrec.index.gallery import Gallery
from visrec.inference.extractor_runtime import Extractor
from visrec.inference.gallery_ops import GalleryItem, build_gallery
from visrec.workflows.gallery import update_served_gallery, validate_gallery_images
from visrec.workflows.pipeline import notify_service_reload, run_dvc_stage, stage_graph
from visrec.workflows.promotion import decide, promotion_gate

DVC = str(Path(sys.executable).parent / "dvc")

# ----------------------------------------------------------------------------- run_dvc_stage


@pytest.fixture()
def dvc_repo(tmp_path):
    subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  boom:\n    cmd: echo 'something broke' >&2; exit 3\n"
        "  ok:\n    cmd: echo hi > out.txt\n    outs:\n      - out.txt\n")
    return tmp_path


def test_failed_dvc_stage_is_named_in_the_error(dvc_repo):
    with pytest.raises(RuntimeError, match=r"DVC stage 'boom' failed \(exit \d+\):.*(something broke|exited with 3)"):
        run_dvc_stage("boom", dvc_repo)


def test_dvc_stage_runs_then_is_skipped_when_unchanged(dvc_repo):
    run_dvc_stage("ok", dvc_repo)
    assert (dvc_repo / "out.txt").read_text() == "hi\n"
    mtime = (dvc_repo / "out.txt").stat().st_mtime_ns
    run_dvc_stage("ok", dvc_repo)  # cached: not rerun
    assert (dvc_repo / "out.txt").stat().st_mtime_ns == mtime


def test_stage_graph_is_read_from_dvc_yaml(tmp_path):
    (tmp_path / "params.yaml").write_text("paths: {a: data/a, b: data/b}\n")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "make_a": {"cmd": "x", "deps": ["src/a.py"], "outs": ["${paths.a}"]},
        "make_b": {"cmd": "x", "deps": ["${paths.a}/part.txt"], "outs": [{"${paths.b}": {"persist": True}}]},
        "report": {"cmd": "x", "deps": ["${paths.a}", "${paths.b}"], "metrics": ["data/report.json"]},
        "alone": {"cmd": "x", "deps": ["src/c.py"], "outs": ["data/c"]}}}, sort_keys=False))
    # report needs make_a too, but through make_b: only the direct need is listed
    assert stage_graph(tmp_path) == {"make_a": [], "make_b": ["make_a"], "report": ["make_b"], "alone": []}


def test_stage_graph_of_this_repo_is_the_pipeline():
    graph = stage_graph(Path(__file__).resolve().parents[1])
    assert graph == {"download": [], "scenes": [], "split": ["download"], "validate": ["split"],
                     "train_extractor": ["validate"], "train_detector": ["scenes", "validate"],
                     "export": ["train_extractor", "train_detector"], "build_index": ["export"],
                     "evaluate": ["build_index"]}


# ----------------------------------------------------------------------------- promotion gate


@pytest.mark.parametrize("candidate, champion, promoted, reason", [
    ({"recall_at_1": 0.5, "det_AP50": 0.8}, None, True, "no champion yet"),
    ({"recall_at_1": 0.5, "det_AP50": 0.8}, {"recall_at_1": 0.5, "det_AP50": 0.7}, True, "det_AP50 (0.8000 vs 0.7000)"),
    ({"recall_at_1": 0.4, "det_AP50": 0.9}, {"recall_at_1": 0.5, "det_AP50": 0.7}, False, "recall_at_1 0.4000 < "),
    ({"recall_at_1": None, "det_AP50": 0.9}, {"recall_at_1": 0.5, "det_AP50": 0.7}, False, "candidate has no value"),
    ({"recall_at_1": 0.1, "det_AP50": 0.9}, {"recall_at_1": None, "det_AP50": 0.7}, True, "det_AP50"),
])
def test_one_promotion_rule(candidate, champion, promoted, reason):
    decision = decide(candidate, champion)
    assert decision.promoted is promoted and reason in decision.reason


def test_a_champion_recorded_under_the_old_key_still_gates():
    from visrec.workflows.promotion import recorded_metrics

    assert recorded_metrics({"recall@1": 0.5, "det_AP50": 0.8}) == {"recall_at_1": 0.5, "det_AP50": 0.8}
    assert recorded_metrics({"recall_at_1": 0.6, "recall@1": 0.5}) == {"recall_at_1": 0.6}


@pytest.fixture()
def candidate_repo(pipeline_repo):
    return pipeline_repo[0]


def write_candidate(repo: Path, recall: float, ap50: float) -> None:
    metrics = repo / "data" / "metrics"
    metrics.mkdir(parents=True, exist_ok=True)
    (metrics / "evaluate.json").write_text(json.dumps({"recall@1": recall, "mAP": 0.1}))
    (metrics / "train_detector.json").write_text(json.dumps({"det_AP50": ap50, "det_mAP": 0.2}))


def test_missing_champion_promotes_and_publishes_export_and_gallery(candidate_repo):
    from visrec.workflows.champion import champion_record, current_champion

    write_candidate(candidate_repo, 0.5, 0.8)
    result = promotion_gate(candidate_repo)
    assert result["promoted"] and result["champion"] == {} and "no champion" in result["reason"]
    assert result["candidate"] == {"recall_at_1": 0.5, "det_AP50": 0.8}
    root = candidate_repo / "data" / "champion"
    assert current_champion(root) == result["published"]
    live = root / "current"
    assert (live / "export" / "extractor" / "model.json").is_file() and (live / "export" / "detector").is_dir()
    assert len(Gallery.load(live / "gallery")) == len(Gallery.load(candidate_repo / "data" / "gallery"))
    record = champion_record(root)
    assert record["recall_at_1"] == 0.5 and record["det_AP50"] == 0.8 and record["gate"] == "files"
    assert record["promoted_at"] and "git_commit" in record and record["previous"] is None
    assert sorted(p.name for p in root.iterdir()) == sorted(["current", result["published"]])  # no temp dirs left


def test_better_candidate_replaces_champion(candidate_repo):
    from visrec.workflows.champion import champion_record

    write_candidate(candidate_repo, 0.5, 0.8)
    first = promotion_gate(candidate_repo)["published"]
    write_candidate(candidate_repo, 0.5, 0.85)  # equal recall, better AP50
    result = promotion_gate(candidate_repo)
    assert result["promoted"] and result["champion"]["recall_at_1"] == 0.5
    record = champion_record(candidate_repo / "data" / "champion")
    assert record["name"] == result["published"] != first and record["previous"] == first
    assert record["det_AP50"] == 0.85


@pytest.mark.parametrize("recall, ap50, worse", [(0.4, 0.9, "recall_at_1"), (0.9, 0.7, "det_AP50")])
def test_worse_candidate_keeps_champion(candidate_repo, recall, ap50, worse):
    from visrec.workflows.champion import champion_record

    write_candidate(candidate_repo, 0.5, 0.8)
    first = promotion_gate(candidate_repo)["published"]
    write_candidate(candidate_repo, recall, ap50)
    result = promotion_gate(candidate_repo)
    assert not result["promoted"] and worse in result["reason"] and "published" not in result
    record = champion_record(candidate_repo / "data" / "champion")
    assert record["name"] == first and record["recall_at_1"] == 0.5


def test_missing_candidate_metrics_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluate.json"):
        promotion_gate(tmp_path)


# ----------------------------------------------------------------------------- gallery update


@pytest.fixture(params=["faiss", "milvus"])
def gallery_env(request, exported_models, tiny_cub, tmp_path):
    """A FLAT gallery of classes 1-4 and a params.yaml pointing at it and the tiny extractor; on
    ``milvus``, moved to the session's Milvus Lite server by `visrec gallery migrate --to milvus`."""
    root, _ = tiny_cub
    meta = read_cub(root)
    extractor_dir = exported_models[0]
    items = [GalleryItem(meta.root / im.rel_path, f"class {im.class_id}") for im in meta.images if im.class_id <= 4]
    gallery_path = tmp_path / "gallery"
    build_gallery(Extractor(extractor_dir), items, "FLAT", progress=False).save(gallery_path)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "recognition": {"extractor": str(extractor_dir), "detector": None, "gallery": str(gallery_path)},
        "index": {"index_type": "FLAT"},
        "validate": {"min_width": 32, "min_height": 32},
    }), encoding="utf-8")
    # The new class: class 8's images, copied into an upload folder with a label file.
    new_dir = tmp_path / "new"
    (new_dir / "imgs").mkdir(parents=True)
    rows = []
    for im in [im for im in meta.images if im.class_id == 8][:3]:
        dest = new_dir / "imgs" / Path(im.rel_path).name
        dest.write_bytes((meta.root / im.rel_path).read_bytes())
        rows.append(f"imgs/{dest.name}\tBrand new bird\n")
    label_file = new_dir / "labels.txt"
    label_file.write_text("".join(rows), encoding="utf-8")
    if request.param == "milvus":
        from typer.testing import CliRunner

        from visrec.cli import app

        config = yaml.safe_load(params.read_text(encoding="utf-8"))
        config["index"].update(backend="milvus", milvus={"uri": request.getfixturevalue("milvus_uri")})
        params.write_text(yaml.safe_dump(config), encoding="utf-8")
        faiss_hits = Gallery.load(gallery_path).search(Extractor(extractor_dir).embed(
            [load_image(items[0].path)]), top_k=len(items))[0]
        migrated = CliRunner().invoke(app, ["gallery", "migrate", "--to", "milvus", "--params", str(params)])
        assert migrated.exit_code == 0, migrated.output
        result = json.loads(migrated.output)
        assert result["entries"] == len(items) and result["next_id"] == len(items)
        gallery = open_gallery(gallery_path)
        assert is_milvus(gallery_path) and gallery.fingerprint == Extractor(extractor_dir).fingerprint
        milvus_hits = gallery.search(Extractor(extractor_dir).embed([load_image(items[0].path)]), top_k=len(items))[0]
        assert [(h.id, h.label, dict(h.metadata)) for h in milvus_hits] == \
            [(h.id, h.label, dict(h.metadata)) for h in faiss_hits]
        assert [h.score for h in milvus_hits] == pytest.approx([h.score for h in faiss_hits], abs=1e-5)
        again = CliRunner().invoke(app, ["gallery", "migrate", "--to", "milvus", "--params", str(params)])
        assert again.exit_code == 1 and "already serves a Milvus gallery" in again.output
    return params, gallery_path, new_dir, label_file, len(items)


def test_update_gallery_adds_a_new_class(gallery_env):
    params, gallery_path, new_dir, label_file, before = gallery_env
    old_version = gallery_version(gallery_path)
    result = update_served_gallery(params, new_dir, label_file)
    assert result["added"] == 3 and result["count"] == before + 3 and result["labels"] == ["Brand new bird"]
    assert gallery_version(gallery_path) != old_version
    extractor = Extractor(yaml.safe_load(params.read_text())["recognition"]["extractor"])
    gallery = open_gallery(gallery_path, expected_fingerprint=extractor.fingerprint)
    assert len(gallery) == before + 3 and "Brand new bird" in gallery.labels()
    assert gallery.version == result["version"]
    first = new_dir / label_file.read_text().split("\t")[0]
    # The tiny random-weight extractor maps every image to almost the same unit vector (cosine
    # > 0.9999999 between any two), so which label wins top-1 is decided by float noise: check
    # that the new image is found by its own label at score ~1, as good as any other hit.
    hits = gallery.search(extractor.embed([load_image(first)]), top_k=len(gallery))[0]
    new_hits = [h for h in hits if h.label == "Brand new bird"]
    assert {h.id for h in new_hits} == set(result["ids"])
    assert new_hits[0].score == pytest.approx(1.0, abs=1e-3)
    assert new_hits[0].score == pytest.approx(hits[0].score, abs=1e-5)
    assert any(h.metadata["path"] == str(first) for h in new_hits)


def test_bad_image_refuses_the_whole_update(gallery_env):
    params, gallery_path, new_dir, label_file, before = gallery_env
    (new_dir / "imgs" / "broken.jpg").write_bytes(b"not a jpeg")
    cv2.imwrite(str(new_dir / "imgs" / "tiny.png"), np.zeros((8, 8, 3), np.uint8))
    with label_file.open("a", encoding="utf-8") as f:
        f.write("imgs/broken.jpg\tBrand new bird\nimgs/tiny.png\tBrand new bird\nimgs/missing.jpg\tX\n")
    old_version = gallery_version(gallery_path)
    with pytest.raises(ValueError, match=r"(?s)3 problem.*broken.jpg.*decode.*tiny.png.*8x8.*missing.jpg.*not found"):
        update_served_gallery(params, new_dir, label_file)
    assert gallery_version(gallery_path) == old_version
    assert len(open_gallery(gallery_path)) == before


def test_a_rerun_build_adds_only_what_is_missing(gallery_env):
    """Builds add a chunk at a time; an interrupted Milvus build is reopened by its key and the
    rerun embeds only the entries it lacks (a Faiss build lives in memory: it starts over)."""
    from visrec.config import load_config
    from visrec.index.factory import create_gallery
    from visrec.inference.gallery_ops import fill_gallery, items_from_list

    params, _, new_dir, label_file, _ = gallery_env
    cfg = load_config(params)
    extractor = Extractor(cfg.recognition.extractor)
    items = items_from_list(label_file, root=new_dir)

    def gallery():
        return create_gallery(cfg.index, extractor.dim, fingerprint=extractor.fingerprint, resume_key="rerun_test")

    interrupted = gallery()
    assert fill_gallery(interrupted, extractor, items[:1], progress=False, chunk=1) == 1
    rerun = gallery()
    added = fill_gallery(rerun, extractor, items, progress=False, chunk=2)
    try:
        assert added == (len(items) - 1 if cfg.index.backend == "milvus" else len(items))
        assert len(rerun) == len(items) and sorted(m["path"] for _, _, m in rerun.entries()) == \
            sorted(str(i.path) for i in items)
    finally:
        rerun.release()


def test_a_failed_change_leaves_the_saved_gallery(gallery_env):
    from visrec.workflows.gallery import change_gallery

    _, gallery_path, _, _, before = gallery_env
    old_version = gallery_version(gallery_path)

    def fail(gallery):
        gallery.remove(gallery.ids()[:2])
        raise RuntimeError("half-way")

    seen = []
    with pytest.raises(RuntimeError, match="half-way"):
        change_gallery(gallery_path, fail, after_save=seen.append)
    assert seen == []  # nothing was saved, so nothing runs after a save
    assert gallery_version(gallery_path) == old_version and len(open_gallery(gallery_path)) == before
    removed, gallery = change_gallery(gallery_path, lambda g: g.remove(g.ids()[:2]),
                                      after_save=lambda g: seen.append(gallery_version(gallery_path)))
    assert removed == 2 and len(open_gallery(gallery_path)) == before - 2 == len(gallery)
    assert seen == [gallery_version(gallery_path)] != [old_version]  # ran on the saved version


def test_validate_gallery_images_flags_empty_label(tiny_cub):
    root, _ = tiny_cub
    image = next((root / "images").rglob("*.jpg"))
    assert validate_gallery_images([GalleryItem(image, "ok")], 32, 32) == []
    problems = validate_gallery_images([GalleryItem(image, " ")], 32, 32)
    assert len(problems) == 1 and "empty label" in problems[0]
    assert "min_size" in validate_gallery_images([GalleryItem(image, "ok")], 10_000, 32)[0]


# ----------------------------------------------------------------------------- service


def test_notify_without_service_is_skipped():
    assert notify_service_reload(None).endswith("skipped")
    line = notify_service_reload("http://127.0.0.1:9", timeout=1)  # discard port: nothing answers
    assert line.startswith("no running service at http://127.0.0.1:9; skipped")


def test_notify_reads_the_served_gallery_version():
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server API)
            body = json.dumps({"version": "abc123", "count": 7, "champion": "c000001-aa"}).encode()
            self.send_response(200 if self.path == "/gallery/info" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/"
        assert notify_service_reload(url, expected_version="abc123", expected_champion="c000001-aa") == \
            f"service at {url} serves champion c000001-aa, gallery version abc123 (7 entries)"
        assert "expected gallery version zzz" in notify_service_reload(url, expected_version="zzz")
        assert "NOT the new champion c000002-bb" in notify_service_reload(url, expected_champion="c000002-bb")
    finally:
        server.shutdown()
        server.server_close()
