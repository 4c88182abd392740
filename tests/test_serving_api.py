"""The service's endpoints as plain Python (visrec.serving.api) on the tiny exported models: no server."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from visrec.serving.api import MULTIPART_OVERHEAD, RecognitionAPI, ServeSettings, check_label, labels_for_upload
from visrec.serving.errors import BadRequest, NotFound, PayloadTooLarge

MB = 1024 * 1024


def write_params(tmp_path: Path, exported_models=None, **serve) -> Path:
    params = tmp_path / "params.yaml"
    sections: dict = {"serve": {"upload_dir": str(tmp_path / "uploads"), **serve}}
    if exported_models is not None:
        extractor, detector = exported_models
        sections["recognition"] = {"extractor": str(extractor), "detector": str(detector),
                                   "gallery": str(tmp_path / "gallery"), "score_threshold": 0.0}
    params.write_text(yaml.safe_dump(sections))
    return params


def test_settings_take_the_upload_limit_from_params_and_env(tmp_path):
    params = write_params(tmp_path, max_upload_mb=2)
    settings = ServeSettings.from_env({"VISREC_PARAMS": str(params)})
    assert settings.max_bytes == 2 * MB
    routes = settings.routes()
    assert routes["/recognize"].max_body == 2 * MB + MULTIPART_OVERHEAD  # the guard's limit follows params
    assert routes["/gallery/add"].admin and routes["/gallery/remove"].admin and not routes["/recognize"].admin
    settings = ServeSettings.from_env({"VISREC_PARAMS": str(params), "VISREC_MAX_UPLOAD_MB": "1"})
    assert settings.routes()["/embed"].max_body == MB + MULTIPART_OVERHEAD
    with pytest.raises(ValueError, match="VISREC_WORKERS"):
        ServeSettings.from_env({"VISREC_PARAMS": str(params), "VISREC_WORKERS": "1.5"})


def test_workers_share_the_model_threads(tmp_path):
    """N workers on the cores of one: each worker's models get recognition.num_threads / N threads."""
    params = write_params(tmp_path, workers=2, request_threads=3)
    settings = ServeSettings.from_env({"VISREC_PARAMS": str(params)})
    assert (settings.workers, settings.request_threads, settings.config.recognition.num_threads) == (2, 3, 1)
    settings = ServeSettings.from_env({"VISREC_PARAMS": str(params), "VISREC_WORKERS": "1"})
    assert (settings.workers, settings.config.recognition.num_threads) == (1, 2)
    params = write_params(tmp_path, workers=2, model_threads=2)
    assert ServeSettings.from_env({"VISREC_PARAMS": str(params)}).config.recognition.num_threads == 2
    params = write_params(tmp_path, request_threads=0)
    with pytest.raises(ValueError, match="serve.request_threads must be at least 1"):
        ServeSettings.from_env({"VISREC_PARAMS": str(params)})


def test_labels_are_checked():
    assert check_label("Black-footed albatross") == "Black-footed albatross"
    for bad, words in (("x" * 201, "201 characters long, the limit is 200"), ("a\x00b", r"U\+0000"),
                       ("two\nlines", r"U\+000A"), ("  ", "non-empty")):
        with pytest.raises(BadRequest, match=words):
            check_label(bad)
    assert labels_for_upload(2, label="a") == ["a", "a"]
    assert labels_for_upload(2, labels=["a", 3]) == ["a", "3"]
    for kwargs in ({}, {"label": "a", "labels": ["a", "b"]}, {"labels": ["a"]}, {"labels": "abc"},
                   {"labels": ["a", {"b": 1}]}, {"label": ["x"]}, {"labels": ["ok", "bad\r"]}):
        with pytest.raises(BadRequest):
            labels_for_upload(2, **kwargs)


def test_image_arrays_refuses_what_is_not_an_image_batch():
    from visrec.serving.api import image_arrays

    validate = image_arrays(4)
    assert validate(np.zeros((2, 4, 4, 3)).tolist()).shape == (2, 4, 4, 3)
    assert validate([]).shape == (0, 4, 4, 3)
    for bad, words in (([[[{"a": 1}]]], "list of numbers"), ("abc", "list of numbers"), ([[1], [2, 3]], "numbers"),
                       ([1.0, 2.0], "shape"), (np.zeros((1, 5, 4, 3)).tolist(), "shape")):
        with pytest.raises(ValueError, match=words):
            validate(bad)


def png_file(tmp_path: Path, name: str, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buffer, format="PNG")
    path = tmp_path / name
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture()
def api(exported_models, tiny_cub, tmp_path):
    from visrec.inference.extractor_runtime import Extractor
    from visrec.inference.gallery_ops import GalleryItem, build_gallery

    root, _ = tiny_cub
    first = sorted((root / "images").rglob("*.jpg"))[0]
    build_gallery(Extractor(exported_models[0]), [GalleryItem(first, "seed")], "FLAT",
                  progress=False).save(tmp_path / "gallery")
    params = write_params(tmp_path, exported_models, champion=False, adaptive_batching=False)
    return RecognitionAPI(ServeSettings.from_env({"VISREC_PARAMS": str(params)}))


def test_uploads_are_named_by_content_and_format_and_deleted_with_their_entries(api, tmp_path):
    uploads = tmp_path / "uploads"
    same = png_file(tmp_path, "evil.sh", 1)  # PNG bytes under a misleading name
    other = png_file(tmp_path, "x.html", 2)
    added = api.gallery_add([same, other], labels=["a", "b"])
    files = sorted(p.name for p in uploads.iterdir())
    assert len(files) == 2 and all(name.endswith(".png") and len(name) == 24 + 4 for name in files)
    again = api.gallery_add([same], label="a again")  # the same bytes: one stored file
    assert len(list(uploads.iterdir())) == 2
    api.gallery_remove(label="a")
    assert len(list(uploads.iterdir())) == 2  # "a again" still refers to the same file
    api.gallery_remove(ids=again["ids"])
    assert len(list(uploads.iterdir())) == 1
    api.gallery_remove(ids=[added["ids"][1]])
    assert list(uploads.iterdir()) == []


def test_interrupted_saves_and_orphans_are_cleaned_at_start(api, tmp_path):
    api.gallery_add([png_file(tmp_path, "a.png", 3)], label="kept")
    uploads = tmp_path / "uploads"
    kept = sorted(uploads.iterdir())
    (uploads / ".tmp-0123.png.77").write_bytes(b"half a file")
    (uploads / "feedbeef.jpg").write_bytes(b"no entry refers to me")
    RecognitionAPI(api.settings)  # a restarted worker
    assert sorted(uploads.iterdir()) == kept


def test_remove_errors_name_no_python_arguments(api):
    with pytest.raises(NotFound) as info:
        api.gallery_remove(ids=[12345])
    assert "12345" in str(info.value) and "missing_ok" not in str(info.value)
    with pytest.raises(NotFound):
        api.gallery_remove(label="never added")
    with pytest.raises(BadRequest):
        api.gallery_remove()
    with pytest.raises(PayloadTooLarge):
        api.gallery_remove(ids=list(range(20_000)))


def test_info_shows_no_internals(api):
    info = api.gallery_info()
    assert info["count"] == 1 and "worker" in info and "version" in info and "champion" in info
    assert not any(isinstance(v, str) and ("/" in v or "\\" in v) for v in info.values()), json.dumps(info)
    assert not any(k in info for k in ("path", "worker_pid", "num_threads", "extra"))


def test_embed_pads_batches_to_a_few_shapes_and_answers_the_same(api, tmp_path):
    shapes = []
    extractor = api.live.system.extractor
    original = extractor.embed_batch
    extractor.embed_batch = lambda batch: (shapes.append(batch.shape[0]), original(batch))[1]
    image = png_file(tmp_path, "q.png", 4)
    one = asyncio.run(api.embed(image))["embedding"]
    arrays = np.random.default_rng(0).integers(0, 256, (3, extractor.size, extractor.size, 3)).astype(np.float32)
    vectors = api.embed_arrays(arrays)
    assert shapes == [1, 4] and vectors.shape == (3, extractor.dim)
    np.testing.assert_allclose(vectors[0], api.embed_arrays(arrays[:1])[0], atol=1e-5)
    assert len(one) == extractor.dim
    assert api.embed_arrays(np.zeros((0, extractor.size, extractor.size, 3))).shape == (0, extractor.dim)
    nan = np.full((1, extractor.size, extractor.size, 3), np.nan)
    assert np.all(np.isfinite(api.embed_arrays(nan)))
    with pytest.raises(BadRequest, match="shape"):
        api.embed_arrays(np.array("abc"))
    with pytest.raises(BadRequest, match="shape"):
        api.embed_arrays(np.zeros((1, 3, 3, 3)))


def test_every_model_call_runs_on_one_thread(api, tmp_path):
    """Paddle keeps oneDNN caches per calling thread: calls from a pool of request threads
    multiplied them (worker RSS 2.2 GB instead of 0.56 GB at 16 clients)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    extractor = api.live.system.extractor
    threads = set()
    original = extractor.embed_batch
    extractor.embed_batch = lambda batch: (threads.add(threading.get_ident()), original(batch))[1]
    image = png_file(tmp_path, "q.png", 5)
    arrays = np.zeros((2, extractor.size, extractor.size, 3), dtype=np.float32)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: api.embed_arrays(arrays) if i % 2 else api.recognize(image), range(8)))
    assert len(threads) == 1 and threading.get_ident() not in threads
