"""visrec.workflows.champion and visrec.serving.live: publishing the champion, serving it, following it,
with the pipeline's gallery on either backend (Faiss files; Milvus Lite on 127.0.0.1, moved there by
``copy_to_milvus`` as `visrec gallery migrate` does)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from visrec.config import config_from_dict
from visrec.imaging import load_image
from visrec.index.factory import copy_to_milvus, is_milvus
from visrec.index.factory import open_gallery as load_gallery
from visrec.inference.extractor_runtime import Extractor
from visrec.serving.errors import NotFound
from visrec.inference.gallery_ops import GalleryItem
from visrec.workflows.champion import (
    champion_record,
    current_champion,
    publish_champion,
    served_recognition,
)
from visrec.serving.live import LiveRecognition


@pytest.fixture(params=["faiss", "milvus"])
def pipeline_outputs(request, pipeline_repo):
    """The pipeline's outputs (see conftest) and a config naming them relative to the repo."""
    repo, images = pipeline_repo
    if request.param == "milvus":
        from visrec.index.milvus_store import MilvusSettings

        copy_to_milvus(repo / "data" / "gallery", MilvusSettings(uri=request.getfixturevalue("milvus_uri")))
    cfg = config_from_dict({"recognition": {"extractor": "data/export/extractor", "detector": "data/export/detector",
                                            "gallery": "data/gallery", "score_threshold": 0.0}})
    return repo, cfg, images


def publish(repo: Path, **record) -> str:
    return publish_champion(repo / "data" / "export", repo / "data" / "gallery", repo / "data" / "champion",
                            {"recall@1": 0.5, **record})


def test_served_recognition_is_the_latest_export_until_a_champion_is_published(pipeline_outputs):
    repo, cfg, _ = pipeline_outputs
    rec, name = served_recognition(cfg, repo)
    assert name is None and rec.gallery == str(repo / "data" / "gallery")
    published = publish(repo)
    rec, name = served_recognition(cfg, repo)
    assert name == published and rec.extractor == str(repo / "data" / "champion" / "current" / "export" / "extractor")
    assert rec.gallery == str(repo / "data" / "champion" / "current" / "gallery")
    assert is_milvus(rec.gallery) == is_milvus(repo / "data" / "gallery")  # a champion keeps its backend
    off = config_from_dict({**json.loads(json.dumps(cfg.to_dict())), "serve": {"champion": False}})
    assert served_recognition(off, repo)[1] is None  # serve.champion: false pins the latest export


def test_live_changes_survive_a_promotion(pipeline_outputs, tmp_path):
    """Additions are re-embedded by the new champion; removals of base entries stay removed;
    an addition whose image is gone is dropped and reported."""
    repo, cfg, images = pipeline_outputs
    publish(repo)
    live_gallery = repo / "data" / "champion" / "current" / "gallery"
    gallery = load_gallery(live_gallery)
    extractor = Extractor(repo / "data" / "champion" / "current" / "export" / "extractor")
    gone = tmp_path / "gone.jpg"
    shutil.copy(images[5][1], gone)
    kept = [GalleryItem(images[4][0], "new bird")]
    gallery.add(extractor.embed([load_image(images[4][0]), load_image(gone)]), ["new bird", "vanished bird"],
                [{"path": str(images[4][0]), "source": "api"}, {"path": str(gone), "source": "api"}])
    gallery.remove_label("class 2")
    gallery.save(live_gallery)
    gone.unlink()

    second = publish(repo, recall_at_1=0.6)
    record = champion_record(repo / "data" / "champion")
    assert record["name"] == second and record["additions_reembedded"] == 1
    assert record["removed_again"] == 2 and record["additions_lost_count"] == 1
    assert "gone.jpg (vanished bird)" in record["additions_lost"][0]
    new = load_gallery(repo / "data" / "champion" / "current" / "gallery")
    assert new.labels() == {"class 1", "class 3", "new bird"}
    # (the tiny random extractor maps all images close together: look the entry up by label)
    hits = new.search(extractor.embed([load_image(kept[0].path)]), top_k=len(new))[0]
    hit = next(h for h in hits if h.label == "new bird")
    assert hit.metadata["path"] == str(images[4][0]) and hit.score == pytest.approx(1.0, abs=1e-4)


def test_a_failed_publication_leaves_the_champion_live(pipeline_outputs):
    repo, _, _ = pipeline_outputs
    first = publish(repo)
    shutil.rmtree(repo / "data" / "export" / "detector")
    with pytest.raises(FileNotFoundError, match="detector"):
        publish(repo)
    assert current_champion(repo / "data" / "champion") == first
    assert sorted(p.name for p in (repo / "data" / "champion").iterdir()) == sorted(["current", first])


def test_live_recognition_follows_promotions_and_gallery_changes(pipeline_outputs):
    repo, cfg, images = pipeline_outputs
    live = LiveRecognition(cfg, base=repo)
    assert live.champion is None and len(live.refresh()[1]) == 6

    name = publish(repo)
    system, gallery = live.refresh()
    assert live.champion == name and system is live.system and len(gallery) == 6

    data = images[6][0].read_bytes()
    ids, gallery = live.add_images([load_image(images[6][0])], ["uploaded"], [(data, ".jpg")])
    stored = Path(gallery.metadata_of(ids[0])["path"])
    assert stored.parent == repo / "data" / "gallery_uploads" and stored.read_bytes() == data
    assert len(gallery) == 7
    assert len(load_gallery(repo / "data" / "champion" / "current" / "gallery")) == 7  # published

    removed, gallery = live.remove(label="uploaded")
    assert removed == 1 and len(live.refresh()[1]) == 6
    assert not stored.exists()  # no entry refers to the stored upload any more
    with pytest.raises(NotFound, match="uploaded"):
        live.remove(label="uploaded")  # nothing left to remove: nothing saved
    with pytest.raises(ValueError, match="exactly one"):
        live.remove()

    shutil.rmtree(repo / "data" / "champion")  # champion withdrawn: back to the latest export
    assert live.refresh()[1] is not gallery and live.champion is None


def test_cli_promote_show_and_recognize_follow_the_champion(pipeline_outputs):
    import yaml
    from typer.testing import CliRunner

    from visrec.cli import app

    repo, cfg, images = pipeline_outputs
    metrics = repo / "data" / "metrics"
    metrics.mkdir(parents=True)
    (metrics / "evaluate.json").write_text(json.dumps({"recall@1": 0.4}))
    (metrics / "train_detector.json").write_text(json.dumps({"det_AP50": 0.9}))
    params = repo / "params.yaml"
    params.write_text(yaml.safe_dump({**{k: v for k, v in cfg.to_dict().items() if k == "recognition"},
                                      "tracking": {"enabled": False}}))
    runner = CliRunner()
    shown = runner.invoke(app, ["champion", "show", "--params", str(params)])
    assert shown.exit_code == 1 and "no champion" in shown.output
    promoted = runner.invoke(app, ["champion", "promote", "--params", str(params)])
    assert promoted.exit_code == 0, promoted.output
    name = json.loads(promoted.output)["published"]
    shown = runner.invoke(app, ["champion", "show", "--params", str(params)])
    assert shown.exit_code == 0 and json.loads(shown.output)["name"] == name
    info = runner.invoke(app, ["gallery", "info", "--params", str(params)])
    assert info.exit_code == 0 and str(repo / "data" / "champion" / "current" / "gallery") in info.output


def test_a_gallery_switched_ahead_of_its_models_keeps_the_old_pair_served(pipeline_outputs):
    """On Milvus a promotion moves the gallery's alias just before the champion link: a worker
    that sees the new gallery first keeps serving the old models with the old gallery."""
    repo, cfg, images = pipeline_outputs
    publish(repo)
    live = LiveRecognition(cfg, base=repo)
    system, served = live.refresh()
    query = live.describe(load_image(images[1][0]))
    expected = system.recognize(query, gallery=served)
    ahead = load_gallery(repo / "data" / "champion" / "current" / "gallery").working_copy()
    ahead.fingerprint = "the next champion's extractor"
    ahead.save(repo / "data" / "champion" / "current" / "gallery")  # the gallery moved, the link not yet

    system, gallery = live.refresh()
    assert gallery is served and system.recognize(query, gallery=gallery) == expected
    publish(repo, recall_at_1=0.7)  # the link moves: models and gallery reload together
    assert live.refresh()[1].fingerprint == system.extractor.fingerprint != "the next champion's extractor"


def test_gallery_poll_interval_delays_only_other_writers_changes(pipeline_outputs):
    """serve.gallery_poll_s: another writer's change shows after the interval, a worker's own
    change and a promotion at once."""
    repo, cfg, images = pipeline_outputs
    polled = config_from_dict({**json.loads(json.dumps(cfg.to_dict())), "serve": {"gallery_poll_s": 3600.0}})
    live = LiveRecognition(polled, base=repo)
    served = live.refresh()[1]
    assert len(served) == 6

    other_writer = load_gallery(repo / "data" / "gallery")
    other_writer.add(live.system.extractor.embed([load_image(images[6][0])]), ["from another writer"])
    other_writer.save(repo / "data" / "gallery")
    assert live.refresh()[1] is served  # not read again within the interval

    live.add_images([load_image(images[7][0])], ["own"], [(images[7][0].read_bytes(), ".jpg")])
    assert live.system.gallery.labels() >= {"from another writer", "own"}  # changed the gallery on disk
    assert len(live.refresh()[1]) == 8

    name = publish(repo)
    assert live.refresh()[0] is live.system and live.champion == name  # promotions: one readlink, every request

    every_request = config_from_dict({**json.loads(json.dumps(cfg.to_dict())), "serve": {"gallery_poll_s": 0.0}})
    live = LiveRecognition(every_request, base=repo)
    before = len(live.refresh()[1])
    other_writer = load_gallery(repo / "data" / "champion" / "current" / "gallery")
    other_writer.remove_label("own")
    other_writer.save(repo / "data" / "champion" / "current" / "gallery")
    assert len(live.refresh()[1]) == before - 1

    with pytest.raises(ValueError, match="gallery_poll_s"):
        LiveRecognition(config_from_dict({"serve": {"gallery_poll_s": -1.0}}), base=repo)
