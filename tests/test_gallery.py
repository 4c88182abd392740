"""The gallery contract on both backends (Faiss files, Milvus Lite on 127.0.0.1: the ``backend``
fixture), Faiss's own storage (versions, crash safety), and gallery list files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from visrec.index import (Gallery, GalleryMismatchError, GalleryNotFoundError, UnknownIdError,
                          read_list_file, write_list_file)
from visrec.index.factory import gallery_version, open_gallery
from visrec.index.faiss_index import auto_nlist
from visrec.index.listfile import parse_list_lines

TYPES = ["HNSW32", "IVF", "FLAT"]
BACKENDS = ["faiss", "milvus"]
EVERY = [(b, t) for b in BACKENDS for t in TYPES]
DIM, CLASSES, PER_CLASS = 64, 40, 5
REPO = Path(__file__).resolve().parents[1]


class Backend:
    """Builds galleries on one backend; opening and versions go through the neutral factory."""

    def __init__(self, name: str, milvus_uri: str | None = None) -> None:
        self.name = name
        self.settings = None
        if milvus_uri is not None:
            from visrec.index.milvus_store import MilvusSettings

            self.settings = MilvusSettings(uri=milvus_uri, alias_prefix="test")

    def __repr__(self) -> str:
        return self.name

    def gallery_class(self):
        if self.name == "faiss":
            return Gallery
        from visrec.index.milvus_gallery import MilvusGallery

        return MilvusGallery

    def from_vectors(self, x, labels, metadata=None, **kwargs):
        extra = {"settings": self.settings} if self.settings else {}
        return self.gallery_class().build(x, labels, metadata, **extra, **kwargs)

    def create(self, dim, index_type, **kwargs):
        extra = {"settings": self.settings} if self.settings else {}
        return self.gallery_class().create(dim, index_type, **extra, **kwargs)

    @staticmethod
    def load(path, **kwargs):
        return open_gallery(path, **kwargs)

    @staticmethod
    def version(path):
        return gallery_version(path)


@pytest.fixture(params=BACKENDS)
def backend(request) -> Backend:
    """A gallery backend; ``milvus`` talks to the session's Milvus Lite server (conftest)."""
    if request.param == "milvus":
        return Backend("milvus", request.getfixturevalue("milvus_uri"))
    return Backend("faiss")


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((CLASSES, DIM))
    x = np.repeat(centres, PER_CLASS, axis=0) + 0.5 * rng.standard_normal((CLASSES * PER_CLASS, DIM))
    return unit(x), [f"class {i // PER_CLASS}" for i in range(CLASSES * PER_CLASS)]


def build(index_type: str, data, backend: Backend | None = None, **params) -> Gallery:
    x, labels = data
    return (backend or Backend("faiss")).from_vectors(x, labels, [{"path": f"img/{i}.jpg"} for i in range(len(x))],
                                                      index_type=index_type, fingerprint="extractor-A", **params)


def all_result_ids(gallery: Gallery, queries: np.ndarray, k: int = 10) -> set[int]:
    return {h.id for row in gallery.search(queries, k) for h in row}


# ----------------------------------------------------------------------------- search / mutation
@pytest.mark.parametrize(("backend", "index_type"), EVERY, indirect=["backend"])
def test_each_vector_finds_itself(backend, index_type, data):
    gallery = build(index_type, data, backend)
    x, labels = data
    assert len(gallery) == len(x) and gallery.next_id == len(x)
    hits = gallery.search(x, 3)
    assert [row[0].id for row in hits] == list(range(len(x)))
    assert [row[0].label for row in hits] == labels
    assert hits[7][0].path == "img/7.jpg"
    assert all(abs(row[0].score - 1.0) < 1e-4 for row in hits)  # cosine of a vector with itself


@pytest.mark.parametrize(("backend", "index_type"), EVERY, indirect=["backend"])
def test_add_then_found_top1(backend, index_type, data):
    gallery = build(index_type, data, backend)
    new = unit(np.random.default_rng(1).standard_normal((3, DIM)))
    ids = gallery.add(new * 7.0, "元气森林 can", [{"path": "new.jpg"}] * 3)  # unnormalised on purpose
    assert ids == [200, 201, 202]
    for i, row in zip(ids, gallery.search(new, 1), strict=True):
        assert (row[0].id, row[0].label) == (i, "元气森林 can")


@pytest.mark.parametrize(("backend", "index_type"), EVERY, indirect=["backend"])
def test_remove_by_id_and_label(backend, index_type, data):
    gallery = build(index_type, data, backend)
    x, _ = data
    assert gallery.remove([3, 4, 150]) == 3
    assert gallery.remove_label("class 10") == PER_CLASS
    assert gallery.remove_label("no such class") == 0
    gone = {3, 4, 150, *range(50, 55)}
    assert len(gallery) == len(x) - len(gone)
    assert not gone & all_result_ids(gallery, x, 10)
    survivors = [i for i in range(len(x)) if i not in gone]
    assert [row[0].id for row in gallery.search(x[survivors], 1)] == survivors
    assert "class 10" not in gallery.labels()


@pytest.mark.parametrize(("backend", "index_type"), EVERY, indirect=["backend"])
def test_ids_never_reused(backend, index_type, data, tmp_path):
    gallery = build(index_type, data, backend)
    gallery.remove([198, 199])
    assert gallery.add(data[0][:2], ["a", "b"]) == [200, 201]
    gallery.save(tmp_path / "g")
    loaded = backend.load(tmp_path / "g")
    loaded.remove([200, 201])
    assert loaded.add(data[0][:1], "c") == [202]
    assert loaded.info()["next_id"] == 203


@pytest.fixture(scope="module")
def unstructured() -> tuple[np.ndarray, np.ndarray]:
    """I.i.d. random vectors: no neighbourhood structure, so approximate search misses often."""
    rng = np.random.default_rng(3)
    return unit(rng.standard_normal((1500, DIM))), unit(rng.standard_normal((40, DIM)))


def brute_force(x: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ x.T), axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize(("backend", "index_type"), EVERY, indirect=["backend"])
def test_small_gallery_answers_exactly_on_every_index(backend, index_type, unstructured):
    """Below ``exact_below`` entries the answer is brute force's whatever the index type and
    its search knobs, so two engines holding the same vectors answer the same."""
    x, queries = unstructured
    gallery = backend.from_vectors(x, [f"c{i % 30}" for i in range(len(x))], index_type=index_type,
                                   **({"ef_search": 10} if index_type == "HNSW32" else {}),
                                   **({"nprobe": 1} if index_type == "IVF" else {}))
    _, ids = gallery.search_arrays(queries, 10)
    np.testing.assert_array_equal(ids, brute_force(x, queries, 10))


@pytest.mark.parametrize("index_type", ["HNSW32", "IVF"])
def test_large_gallery_search_stays_approximate(index_type, unstructured):
    """The control: with ``exact_below`` under the gallery's size the same narrow search knobs
    miss neighbours (Faiss), so the exact answers above come from the rule, not from luck."""
    x, queries = unstructured
    knobs = {"ef_search": 10} if index_type == "HNSW32" else {"nprobe": 1}
    gallery = Gallery.build(x, [f"c{i % 30}" for i in range(len(x))], index_type=index_type,
                            exact_below=len(x), **knobs)
    _, ids = gallery.search_arrays(queries, 10)
    assert (ids != brute_force(x, queries, 10)).any()
    gallery.tune(exact_below=len(x) + 1)
    np.testing.assert_array_equal(gallery.search_arrays(queries, 10)[1], brute_force(x, queries, 10))


@pytest.mark.parametrize("index_type", ["HNSW32", "FLAT"])
def test_label_centroids_follow_every_change(backend, index_type, data):
    """Each label's centroid is the unit mean of its vectors, recomputed after adds and removals."""
    x, labels = data
    gallery = build(index_type, data, backend)

    def reference(keep: list[int], extra: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        groups: dict[str, list[np.ndarray]] = {}
        for i in keep:
            groups.setdefault(labels[i], []).append(x[i])
        for label, vector in (extra or {}).items():
            groups.setdefault(label, []).append(vector)
        return {label: unit(np.mean(v, axis=0)) for label, v in groups.items()}

    probes = unit(np.random.default_rng(6).standard_normal((4, DIM)))

    def check(expected: dict[str, np.ndarray]) -> None:
        names = [*expected, *({"class 7", "no such label"} - set(expected))]
        found = gallery.label_centroids().similarities(probes, names)
        for column, label in enumerate(names):
            if label in expected:
                np.testing.assert_allclose(found[:, column], probes @ expected[label], atol=1e-5)
            else:
                assert np.isnan(found[:, column]).all()  # no vectors: no centroid

    asked: list[list[str]] = []
    fetch = gallery.label_vectors
    gallery.label_vectors = lambda wanted: asked.append(list(wanted)) or fetch(wanted)  # a spy
    check(reference(list(range(len(x)))))
    check(reference(list(range(len(x)))))
    assert len(asked) == 1  # computed once, then kept
    new = unit(np.random.default_rng(4).standard_normal((1, DIM)))
    gallery.add(new, "class 3")
    gallery.remove([15, 16])  # two of class 3's five
    gallery.remove_label("class 7")
    check(reference([i for i in range(len(x)) if i not in (15, 16) and labels[i] != "class 7"], {"class 3": new[0]}))
    # Milvus fetches only the changed labels again; Faiss (in memory) recomputes all in one pass
    assert len(asked) == 2 and (backend.name == "faiss" or set(asked[1]) == {"class 3", "class 7"})


def test_remove_unknown_id_changes_nothing(backend, data):
    gallery = build("FLAT", data, backend)
    with pytest.raises(UnknownIdError, match=r"no id\(s\) \[999\].*nothing was removed"):
        gallery.remove([1, 999])
    assert 1 in gallery and len(gallery) == 200
    assert gallery.remove([1, 999], missing_ok=True) == 1


@pytest.mark.parametrize("exact_below", [0, 10_000], ids=["graph", "exact"])
def test_hnsw_compaction_preserves_ids(data, exact_below):
    x, _ = data
    gallery = build("HNSW32", data, compact_fraction=0.2, exact_below=exact_below)
    gallery.remove(range(0, 30))  # 30 <= 0.2 * 200: tombstones only
    assert gallery.info()["tombstones"] == 30 and gallery.info()["internal_size"] == 200
    assert not set(range(30)) & all_result_ids(gallery, x, 10)
    gallery.remove(range(30, 50))  # 50 > 40: rebuild from the 150 survivors
    info = gallery.info()
    assert info["tombstones"] == 0 and info["internal_size"] == 150 and info["count"] == 150
    assert [row[0].id for row in gallery.search(x[50:], 1)] == list(range(50, 200))
    assert gallery.add(x[:1], "again") == [200]
    assert gallery.search(x[:1], 1)[0][0].id == 200


def test_few_survivors_return_short_lists(backend, data):
    x, _ = data
    gallery = build("FLAT", data, backend)
    gallery.remove(range(3, 200))
    rows = gallery.search(x[:5], 10)
    assert all(sorted(h.id for h in row) == [0, 1, 2] for row in rows)
    scores, ids = gallery.search_arrays(x[:1], 10)
    assert (ids[0, 3:] == -1).all() and np.isneginf(scores[0, 3:]).all()


def test_remove_label_with_any_characters(backend):
    odd = ['quote " and \\ slash', "元气森林 can", "tab\there", "it's", "Ünïcödé · 🐦"]
    gallery = backend.from_vectors(unit(np.random.default_rng(5).standard_normal((2 * len(odd), 16))), odd * 2,
                                   index_type="FLAT")
    for n, label in enumerate(odd, start=1):
        assert gallery.remove_label(label) == 2
        assert len(gallery) == 2 * (len(odd) - n) and label not in gallery.labels()


@pytest.mark.parametrize("exact_below", [0, 10_000], ids=["graph", "exact"])
def test_hnsw_few_survivors_returns_short_lists(data, exact_below):
    x, _ = data
    gallery = build("HNSW32", data, compact_fraction=0.99, exact_below=exact_below)
    gallery.remove(range(3, 200))
    assert gallery.info()["tombstones"] == 197  # search must skip -1 ids from the selector
    rows = gallery.search(x[:5], 10)
    assert all(sorted(h.id for h in row) == [0, 1, 2] for row in rows)
    scores, ids = gallery.search_arrays(x[:1], 10)
    assert (ids[0, 3:] == -1).all() and np.isneginf(scores[0, 3:]).all()


def test_empty_gallery_and_ivf_too_small():
    empty = Gallery.create(8, "FLAT")
    assert empty.search(np.ones(8), 3) == [[]]
    with pytest.raises(ValueError, match="FLAT"):
        Gallery.build(np.ones((1, 8)), ["only"], index_type="IVF")
    assert auto_nlist(200) == 5 and auto_nlist(10) == 1
    with pytest.raises(ValueError, match="unknown index_type"):
        Gallery.create(8, "LSH")
    with pytest.raises(ValueError, match="unknown parameter"):
        Gallery.create(8, "HNSW32", ef_serch=10)


BAD_ADDS = {
    "wrong dim": lambda x: (x[:2, :10], ["a", "b"], None),
    "nan": lambda x: (np.where(np.arange(DIM) == 0, np.nan, x[:2]), ["a", "b"], None),
    "inf": lambda x: (np.where(np.arange(DIM) == 3, np.inf, x[:2]), ["a", "b"], None),
    "zero vector": lambda x: (np.vstack([x[0], np.zeros(DIM)]), ["a", "b"], None),
    "empty": lambda x: (np.zeros((0, DIM)), [], None),
    "label count": lambda x: (x[:2], ["a"], None),
    "empty label": lambda x: (x[:2], ["a", " "], None),
    "strings": lambda x: ([["1"] * DIM], ["a"], None),
    "reserved metadata key": lambda x: (x[:1], ["a"], [{"label": "x"}]),
    "non-json metadata": lambda x: (x[:1], ["a"], [{"path": object()}]),
}


@pytest.mark.parametrize(("backend", "index_type"), [*(("faiss", t) for t in TYPES), ("milvus", "FLAT")],
                         indirect=["backend"])
@pytest.mark.parametrize("case", BAD_ADDS)
def test_bad_add_raises_and_changes_nothing(backend, index_type, case, data):
    gallery = build(index_type, data, backend)
    x, _ = data
    before = gallery.search_arrays(x, 5), gallery.info()
    with pytest.raises(ValueError):
        gallery.add(*BAD_ADDS[case](x))
    after = gallery.search_arrays(x, 5), gallery.info()
    assert before[1] == after[1]
    np.testing.assert_array_equal(before[0][1], after[0][1])


def test_bad_queries_raise_clearly(backend, data):
    gallery = build("FLAT", data, backend)
    with pytest.raises(ValueError, match="dim 10 but the gallery has dim 64.*rebuild"):
        gallery.search(np.ones((1, 10)), 1)
    with pytest.raises(ValueError, match="NaN"):
        gallery.search(np.full(DIM, np.nan), 1)
    with pytest.raises(ValueError, match="empty"):
        gallery.search(np.zeros((0, DIM)), 1)
    with pytest.raises(ValueError, match="top_k"):
        gallery.search(data[0][:1], 0)


# ----------------------------------------------------------------------------- persistence
@pytest.mark.parametrize(("backend", "index_type"), EVERY, indirect=["backend"])
def test_save_load_roundtrip(backend, index_type, data, tmp_path):
    params = {"compact_fraction": 0.5} if index_type == "HNSW32" else {}
    gallery = build(index_type, data, backend, **params)
    odd = ["Black footed Albatross", "元气森林", "Crème brûlée (Ø 8cm)", 'quote " and \\ slash']
    gallery.add(unit(np.random.default_rng(2).standard_normal((4, DIM))), odd,
                [{"path": f"imgs/{name}.jpg", "source": "shelf 3"} for name in odd])
    gallery.remove([5, 6])  # HNSW: tombstones survive the round trip
    gallery.meta_extra["threshold"] = 0.42
    version = gallery.save(tmp_path / "g")
    assert backend.version(tmp_path / "g") == version

    loaded = backend.load(tmp_path / "g", expected_fingerprint="extractor-A")
    queries = np.vstack([data[0], unit(np.random.default_rng(3).standard_normal((20, DIM)))])
    for a, b in zip(gallery.search_arrays(queries, 5), loaded.search_arrays(queries, 5), strict=True):
        np.testing.assert_array_equal(a, b)
    assert {loaded.label_of(i) for i in range(200, 204)} == set(odd)
    assert loaded.metadata_of(201)["path"] == "imgs/元气森林.jpg"
    info = loaded.info()
    assert info["extra"] == {"threshold": 0.42} and info["fingerprint"] == "extractor-A"
    assert info["count"] == 202 and info["next_id"] == 204 and info["version"] == gallery.version
    assert info["tombstones"] == (2 if index_type == "HNSW32" and backend.name == "faiss" else 0)
    if backend.name == "milvus":
        pointer = (tmp_path / "g" / "milvus.json").read_text(encoding="utf-8")
        assert "token" not in pointer and json.loads(pointer)["alias"] == loaded.alias
        return
    files = tmp_path / "g" / version
    assert "元气森林" in (files / "labels.jsonl").read_text(encoding="utf-8")  # ensure_ascii=False
    meta = json.loads((files / "meta.json").read_text(encoding="utf-8"))
    assert meta["metric"] == "IP" and meta["dim"] == DIM and meta["index_type"] == index_type
    assert not list(files.glob("*.pkl"))


def test_versions_change_and_are_pruned(data, tmp_path):
    gallery = build("FLAT", data)
    names = [gallery.save(tmp_path / "g") for _ in range(4)]
    assert len(set(names)) == 4 and Gallery.current_version(tmp_path / "g") == names[-1]
    assert sorted(p.name for p in (tmp_path / "g").glob("v*")) == names[-2:]
    assert Gallery.current_version(tmp_path / "nothing") is None
    assert len({json.loads((tmp_path / "g" / n / "meta.json").read_text())["version"] for n in names[-2:]}) == 2


def test_fingerprint_mismatch_is_refused(backend, data, tmp_path):
    build("FLAT", data, backend).save(tmp_path / "g")
    with pytest.raises(GalleryMismatchError, match="extractor-A.*extractor-B.*rebuild.*visrec gallery build"):
        backend.load(tmp_path / "g", expected_fingerprint="extractor-B")
    with pytest.raises(ValueError, match="dim 64.*dim 128"):
        backend.load(tmp_path / "g", expected_dim=128)


def test_missing_or_foreign_paths(tmp_path):
    with pytest.raises(GalleryNotFoundError, match="no gallery at .*nope.*visrec gallery build") as err:
        Gallery.load(tmp_path / "nope")
    assert isinstance(err.value, FileNotFoundError)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(GalleryNotFoundError, match="is not a gallery"):
        Gallery.load(tmp_path / "other")
    with pytest.raises(ValueError, match="non-empty directory that is not a gallery"):
        Gallery.create(4, "FLAT").save(tmp_path / "other")


def test_materialised_current_dir_still_loads_and_saves(data, tmp_path):
    """A copy that follows symlinks (cp -rL, DVC checkout) turns ``current`` into a real dir."""
    gallery = build("FLAT", data)
    gallery.save(tmp_path / "g")
    shutil.copytree(tmp_path / "g", tmp_path / "copy", symlinks=False)
    assert not (tmp_path / "copy" / "current").is_symlink()
    copy = Gallery.load(tmp_path / "copy")
    assert len(copy) == 200 and Gallery.current_version(tmp_path / "copy") == "current"
    copy.remove([0])
    version = copy.save()
    assert (tmp_path / "copy" / "current").is_symlink() and Gallery.current_version(tmp_path / "copy") == version
    assert len(Gallery.load(tmp_path / "copy")) == 199


# ----------------------------------------------------------------------------- crash safety
CHILD = textwrap.dedent("""
    import os, sys, time
    import faiss, numpy as np
    from visrec.index import Gallery

    path, point = sys.argv[1], sys.argv[2]
    gallery = Gallery.load(path)
    gallery.add(np.random.default_rng(9).standard_normal((5, gallery.dim)), "half-saved")

    def stall(real):
        def wrapper(*args, **kwargs):
            if point == "write_index":
                real(*args, **kwargs)  # the index file is written; labels/meta are not yet
            print("MARK", flush=True)
            time.sleep(120)
        return wrapper

    if point == "write_index":
        faiss.write_index = stall(faiss.write_index)
    else:  # version directory complete and renamed, link not yet swapped
        os.symlink = stall(os.symlink)
    gallery.save(path)
""")


def run_child(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen([sys.executable, "-c", *args], env=env, text=True, **kwargs)


@pytest.mark.parametrize("index_type", ["HNSW32", "FLAT"])
@pytest.mark.parametrize("point", ["write_index", "symlink"])
def test_kill_mid_save_keeps_old_gallery(point, index_type, data, tmp_path):
    root = tmp_path / "g"
    gallery = build(index_type, data)
    old_version = gallery.save(root)
    expected = gallery.search_arrays(data[0], 3)

    child = run_child([CHILD, str(root), point], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == "MARK"  # the child is inside save()
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    leftovers = [p.name for p in root.iterdir() if p.name not in (old_version, "current", ".lock")]
    assert leftovers, "the child should have left a half-finished save behind"

    assert Gallery.current_version(root) == old_version
    loaded = Gallery.load(root)
    assert len(loaded) == 200 and "half-saved" not in loaded.labels()
    for a, b in zip(expected, loaded.search_arrays(data[0], 3), strict=True):
        np.testing.assert_array_equal(a, b)

    loaded.add(data[0][:1], "after crash")  # the next save cleans up and publishes normally
    new_version = loaded.save()
    assert sorted(p.name for p in root.iterdir()) == sorted([".lock", "current", old_version, new_version])
    assert len(Gallery.load(root)) == 201


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from visrec.index import Gallery

    path, saves = sys.argv[1], int(sys.argv[2])
    gallery = Gallery.load(path)
    rng = np.random.default_rng(0)
    for i in range(saves):
        gallery.add(rng.standard_normal((1, gallery.dim)), f"item {i}")
        gallery.save(path, keep_versions=2)
    print("DONE", flush=True)
""")


def test_concurrent_reader_never_sees_a_broken_gallery(data, tmp_path):
    root = tmp_path / "g"
    build("FLAT", data).save(root)
    writer = run_child([WRITER, str(root), "25"], stdout=subprocess.PIPE)
    counts, deadline = [], time.monotonic() + 60
    while writer.poll() is None and time.monotonic() < deadline:
        gallery = Gallery.load(root)
        assert len(gallery) == gallery.next_id  # labels, index and meta from the same version
        counts.append(len(gallery))
    assert writer.wait(timeout=60) == 0
    assert counts == sorted(counts) and all(200 <= c <= 225 for c in counts)
    assert counts, "the reader should have loaded at least once while the writer ran"
    assert len(Gallery.load(root)) == 225


# ----------------------------------------------------------------------------- list files
def test_list_file_splits_on_first_delimiter(tmp_path):
    list_file = tmp_path / "gallery.txt"
    list_file.write_bytes("\ufeff# comment\n\nimgs/a.jpg\tBlack footed Albatross\r\n"
                          "imgs/b c.jpg\t元气森林\n imgs/d.jpg \tlabel\twith tab \n".encode())
    entries = read_list_file(list_file)
    assert [(e.path, e.label) for e in entries] == [
        (tmp_path / "imgs/a.jpg", "Black footed Albatross"),
        (tmp_path / "imgs/b c.jpg", "元气森林"),
        (tmp_path / "imgs/d.jpg", "label\twith tab"),
    ]
    spaced = parse_list_lines(["x/1.jpg Black footed Albatross\n"], root="/data", delimiter=" ")
    assert spaced[0] == (Path("/data/x/1.jpg"), "Black footed Albatross")


@pytest.mark.parametrize(("line", "problem"), [("imgs/a.jpg Albatross", "no <TAB> delimiter"),
                                                ("imgs/a.jpg\t  ", "empty label"),
                                                ("\tAlbatross", "empty path")])
def test_list_file_bad_line_names_file_and_line(tmp_path, line, problem):
    list_file = tmp_path / "list.txt"
    list_file.write_text(f"# header\nok.jpg\tok\n{line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"list\.txt:3: {problem}.*relative/path<TAB>label"):
        read_list_file(list_file)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_list_file(tmp_path / "missing.txt")


def test_unicode_labels_roundtrip_list_file_and_gallery(backend, tmp_path):
    pairs = [("a/1.jpg", "Black footed Albatross"), ("b/2.jpg", "元气森林"), ("c/3.jpg", "Ünïcödé · 🐦")]
    write_list_file(tmp_path / "list.txt", pairs)
    entries = read_list_file(tmp_path / "list.txt", root="/images")
    assert [e.label for e in entries] == [label for _, label in pairs]
    vectors = unit(np.random.default_rng(4).standard_normal((3, 16)))
    gallery = backend.from_vectors(vectors, [e.label for e in entries], [{"path": str(e.path)} for e in entries],
                                   index_type="FLAT")
    gallery.save(tmp_path / "g")
    hits = backend.load(tmp_path / "g").search(vectors, 1)
    assert [(h[0].label, h[0].path) for h in hits] == [(label, f"/images/{p}") for p, label in pairs]
    with pytest.raises(ValueError, match="delimiter"):
        write_list_file(tmp_path / "bad.txt", [("a\tb.jpg", "x")])


def test_gallery_without_current_link_loads_the_newest_version(tmp_path):
    """DVC skips symlinks: a gallery restored from its cache has versions but no 'current'."""
    rng = np.random.default_rng(0)
    gallery = Gallery.build(rng.normal(size=(4, 8)).astype("float32"), ["a", "b", "c", "d"], index_type="FLAT")
    gallery.save(tmp_path / "g")
    gallery.remove_label("d")
    gallery.save(tmp_path / "g")
    (tmp_path / "g" / "current").unlink()
    loaded = Gallery.load(tmp_path / "g")
    assert loaded.labels() == {"a", "b", "c"}
