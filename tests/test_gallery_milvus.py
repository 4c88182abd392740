"""What only the Milvus backend has: the alias switch, pinned readers, pruning, the change
journal, resumable builds, clear errors. (The shared contract: tests/test_gallery.py.)
Milvus Lite runs on 127.0.0.1 for the session (conftest ``milvus_uri``); nothing is mocked."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from visrec.index import Gallery
from visrec.index.factory import gallery_version, is_milvus, open_gallery
from visrec.index.milvus_gallery import MilvusGallery
from visrec.index.milvus_store import POINTER_FILE, TOKEN_ENV, MilvusSettings, connect, versions_of

DIM = 16


@pytest.fixture()
def settings(milvus_uri) -> MilvusSettings:
    return MilvusSettings(uri=milvus_uri, alias_prefix="milvus_only", keep_versions=2)


def vectors(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_alias_switch_pins_readers_and_prunes_old_collections(settings, tmp_path):
    root, x = tmp_path / "g", vectors(20, 0)
    MilvusGallery.build(x, "old", index_type="FLAT", settings=settings, fingerprint="A").save(root)
    reader = open_gallery(root)  # resolved the alias once: a consistent snapshot
    before = gallery_version(root)

    MilvusGallery.build(x[:5], "new", index_type="FLAT", settings=settings, fingerprint="A").save(root)
    assert gallery_version(root) != before
    assert {h.label for h in reader.search(x, 3)[0]} == {"old"} and len(reader) == 20
    fresh = open_gallery(root)
    assert fresh.labels() == {"new"} and len(fresh) == 5

    for seed in (1, 2):
        MilvusGallery.build(vectors(3, seed), "newer", index_type="FLAT", settings=settings).save(root)
    client = connect(settings.uri)
    kept = versions_of(client, fresh.alias)
    assert len(kept) == 2 and open_gallery(root).collection == max(kept, key=kept.get)
    pointer = json.loads((root / POINTER_FILE).read_text(encoding="utf-8"))
    assert pointer["alias"] == fresh.alias and TOKEN_ENV not in json.dumps(pointer)


def test_discard_changes_undoes_adds_and_removals_but_not_ids(settings, tmp_path):
    x = vectors(10, 3)
    gallery = MilvusGallery.build(x, [f"item {i}" for i in range(10)], index_type="HNSW32", settings=settings)
    gallery.save(tmp_path / "g")
    live = open_gallery(tmp_path / "g")
    live.remove([1, 2])
    live.remove_label("item 7")
    assert live.add(vectors(2, 4), "intruder") == [10, 11]
    live.discard_changes()
    again = open_gallery(tmp_path / "g")
    assert len(again) == 10 and again.labels() == {f"item {i}" for i in range(10)}
    assert [row[0].id for row in again.search(x, 1)] == list(range(10))
    assert again.next_id == 12 and again.add(x[:1], "later") == [12]  # 10 and 11 stay used


def test_interrupted_build_resumes_with_the_same_key(settings):
    first = MilvusGallery.create(DIM, "FLAT", settings=settings, fingerprint="A", resume_key="list_abc")
    first.add(vectors(4, 5), "done before the crash")
    resumed = MilvusGallery.create(DIM, "FLAT", settings=settings, fingerprint="A", resume_key="list_abc")
    assert resumed.collection == first.collection and len(resumed) == 4 and resumed.next_id == 4
    other = MilvusGallery.create(DIM, "FLAT", settings=settings, fingerprint="B", resume_key="list_abc")
    assert len(other) == 0  # another extractor's leftovers are not resumed
    other.release()
    with pytest.raises(ValueError, match="resume_key"):
        MilvusGallery.create(DIM, "FLAT", settings=settings, resume_key="no spaces")


def test_faiss_and_milvus_never_share_a_directory(settings, tmp_path):
    x = vectors(6, 6)
    Gallery.build(x, "faiss", index_type="FLAT").save(tmp_path / "g")
    with pytest.raises(ValueError, match="migrate --to milvus"):
        MilvusGallery.build(x, "m", index_type="FLAT", settings=settings).save(tmp_path / "g")
    MilvusGallery.build(x, "m", index_type="FLAT", settings=settings).save(tmp_path / "m")
    with pytest.raises(ValueError, match="serves a Milvus gallery"):
        Gallery.build(x, "faiss", index_type="FLAT").save(tmp_path / "m")
    assert is_milvus(tmp_path / "m") and not is_milvus(tmp_path / "g")


def test_missing_alias_and_bad_settings_are_named(settings, tmp_path):
    gallery = MilvusGallery.build(vectors(3, 7), "x", index_type="FLAT", settings=settings)
    gallery.save(tmp_path / "g")
    connect(settings.uri).drop_alias(gallery.alias)
    with pytest.raises(FileNotFoundError, match="alias .* does not exist.*rebuild"):
        open_gallery(tmp_path / "g")
    with pytest.raises(ValueError, match="alias_prefix"):
        MilvusSettings(uri=settings.uri, alias_prefix="9-bad")
    with pytest.raises(ValueError, match=f"credentials.*{TOKEN_ENV}"):
        MilvusSettings(uri="https://root:Milvus@milvus.example:19530")
    with pytest.raises(ValueError, match=r"end in \.db"):
        MilvusSettings(uri="data/milvus")


def test_a_lite_data_dir_held_by_another_process_names_the_fix(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pymilvus import MilvusClient
        MilvusClient({str(tmp_path / 'lite.db')!r}).list_collections()
        print("HELD", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "HELD"
        with pytest.raises(ConnectionError, match="one process at a time.*milvus_lite server"):
            connect(str(tmp_path / "lite.db"))
    finally:
        holder.kill()
        holder.wait()


def test_compose_file_for_a_milvus_server_parses(repo_root: Path):
    import yaml

    compose = yaml.safe_load((repo_root / "deploy" / "milvus-compose.yaml").read_text(encoding="utf-8"))
    services = compose["services"]
    assert {"etcd", "minio", "standalone"} <= set(services)
    standalone = services["standalone"]
    assert "19530:19530" in [str(p) for p in standalone["ports"]]
    assert set(standalone["depends_on"]) >= {"etcd", "minio"}
    assert standalone["image"].startswith("milvusdb/milvus:v")
