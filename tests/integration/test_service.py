"""The BentoML service (bento/service.py) for real: `bentoml serve` on 127.0.0.1 with the tiny models."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
import yaml
from PIL import Image

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BENTOML = Path(sys.executable).with_name("bentoml")


class ServerURL(str):
    """The base URL, carrying the params file the server was started with."""

    params: Path

    def __new__(cls, url: str, params: Path) -> "ServerURL":
        obj = super().__new__(cls, url)
        obj.params = params
        return obj


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def gallery_images(tiny_cub):
    """(path, label) of 2 images per test class; the first one of each class goes in the gallery."""
    from visrec.data.cub import read_cub
    from visrec.data.split_list import read_split_list
    from visrec.evaluation.system_eval import class_label

    root, split = tiny_cub
    meta = read_cub(root)
    test_ids = {e.unique_id for e in read_split_list(split / "test_list.txt")}
    by_class: dict[str, list[Path]] = {}
    for im in meta.images:
        if im.image_id in test_ids:
            by_class.setdefault(class_label(meta.classes[im.class_id]), []).append(meta.root / im.rel_path)
    return {label: paths[:2] for label, paths in sorted(by_class.items())}


@pytest.fixture(scope="module", params=["1", "0"], ids=["batching-on", "batching-off"])
def server(request, exported_models, gallery_images, tmp_path_factory):
    from visrec.inference.extractor_runtime import Extractor
    from visrec.inference.gallery_ops import GalleryItem, build_gallery

    extractor_dir, detector_dir = exported_models
    labels = list(gallery_images)
    items = [GalleryItem(gallery_images[label][0], label) for label in labels[:-1]]  # last class: added later
    tmp = tmp_path_factory.mktemp("service")
    build_gallery(Extractor(extractor_dir), items, "FLAT", progress=False).save(tmp / "gallery")
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump({"recognition": {
        "extractor": str(extractor_dir), "detector": str(detector_dir), "gallery": str(tmp / "gallery"),
        "score_threshold": 0.0}}))
    with serving(tmp, params, {"VISREC_MAX_UPLOAD_MB": "1",
                               "VISREC_ADAPTIVE_BATCHING": request.param}) as url:  # both paths of /embed
        served = ServerURL(url, params)
        served.batching = request.param == "1"
        yield served


@contextlib.contextmanager
def serving(tmp: Path, params: Path, extra_env: dict[str, str]):
    """`bentoml serve` on 127.0.0.1 at a free port; yields its URL once /readyz answers, then
    stops it (and the workers BentoML starts in a session of their own)."""
    port = free_port()
    # One worker unless a test asks for more: memory and batching are then one process's to check.
    env = {**os.environ, "VISREC_PARAMS": str(params), "VISREC_ADMIN_TOKEN": TOKEN,
           "BENTOML_HOME": str(tmp / "bentoml_home"), "VISREC_WORKERS": "1", **extra_env}
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen([str(BENTOML), "serve", "bento.service:VisrecRecognition", "--host", "127.0.0.1",
                             "--port", str(port)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"bentoml serve exited with {proc.returncode}:\n{(tmp / 'server.log').read_text()[-4000:]}")
            try:
                if requests.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready after 90 s:\n{(tmp / 'server.log').read_text()[-4000:]}")
            time.sleep(0.5)
        yield url
    finally:
        try:
            workers = psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            workers = []
        proc.terminate()  # SIGTERM stops the server and its worker
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        for worker in workers:
            with contextlib.suppress(psutil.Error):
                worker.wait(timeout=10)
            with contextlib.suppress(psutil.Error):
                worker.kill()
        log.close()


@contextlib.contextmanager
def tiny_service(exported_models, tiny_cub, tmp: Path, serve: dict, extra_env: dict[str, str] | None = None):
    """A server over a one-entry gallery with the tiny models and this ``serve`` section; yields its URL."""
    from visrec.inference.extractor_runtime import Extractor
    from visrec.inference.gallery_ops import GalleryItem, build_gallery

    root, _ = tiny_cub
    first = sorted((root / "images").rglob("*.jpg"))[0]
    build_gallery(Extractor(exported_models[0]), [GalleryItem(first, "seed")], "FLAT",
                  progress=False).save(tmp / "gallery")
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump({
        "recognition": {"extractor": str(exported_models[0]), "detector": str(exported_models[1]),
                        "gallery": str(tmp / "gallery"), "score_threshold": 0.0},
        "serve": {"upload_dir": str(tmp / "uploads"), "champion": False, **serve}}))
    with serving(tmp, params, extra_env or {}) as url:
        yield url


def recognize(url: str, data: bytes, name: str = "query.jpg", **fields) -> requests.Response:
    return requests.post(f"{url}/recognize", files={"image": (name, data)},
                         data={k: json.dumps(v) for k, v in fields.items()}, timeout=60)


def test_health(server):
    assert requests.get(f"{server}/livez", timeout=10).status_code == 200
    assert requests.get(f"{server}/readyz", timeout=10).status_code == 200
    info = requests.get(f"{server}/gallery/info", timeout=10).json()
    assert info["index_type"] == "FLAT" and info["count"] >= 1


def hits(results: list[dict]) -> dict[str, float]:
    """Best score per label over every result box's top-k."""
    best: dict[str, float] = {}
    for result in results:
        for hit in result["topk"]:
            best[hit["label"]] = max(best.get(hit["label"], -2.0), hit["score"])
    return best


def test_gallery_image_is_recognised_as_its_label(server, gallery_images, exported_models):
    # The tiny model has random weights: every image embeds almost alike, so several gallery
    # entries tie near 1.0 and top-1 is not meaningful. What is checked: the label's own image
    # scores ~1 (same image, whole-image box), and the service answers exactly what the
    # in-process RecognitionSystem answers for the same bytes and params.
    from visrec.config import load_config
    from visrec.imaging import load_image
    from visrec.inference.pipeline import RecognitionSystem

    label, paths = next(iter(gallery_images.items()))
    resp = recognize(server, paths[0].read_bytes(), top_k=10, return_topk=True)
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert results and all(len(r["bbox"]) == 4 for r in results)
    assert hits(results)[label] > 0.999
    system = RecognitionSystem.from_config(load_config(server.params).recognition)
    expected = system.predict(load_image(paths[0]), top_k=10, return_topk=True)
    assert [(r["bbox"], r["rec_docs"]) for r in results] == [(r["bbox"], r["rec_docs"]) for r in expected]
    np.testing.assert_allclose([r["rec_scores"] for r in results], [r["rec_scores"] for r in expected], atol=1e-5)


def test_embed_returns_a_dim_length_vector(server, gallery_images):
    path = next(iter(gallery_images.values()))[0]
    resp = requests.post(f"{server}/embed", files={"image": ("a.jpg", path.read_bytes())}, timeout=60)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert len(body["embedding"]) == body["dim"] == 32 and body["fingerprint"]
    assert abs(np.linalg.norm(body["embedding"]) - 1.0) < 1e-3
    again = requests.post(f"{server}/embed", files={"image": ("a.jpg", path.read_bytes())}, timeout=60).json()
    np.testing.assert_allclose(again["embedding"], body["embedding"], atol=1e-5)


def test_add_then_remove_a_class_through_the_api(server, gallery_images):
    label = list(gallery_images)[-1]  # not in the initial gallery
    query = gallery_images[label][0].read_bytes()
    before = recognize(server, query, top_k=50, return_topk=True).json()["results"]
    assert label not in hits(before)

    resp = requests.post(f"{server}/gallery/add", headers=AUTH, timeout=60,
                         files=[("images", ("n.jpg", query))], data={"label": label})
    assert resp.status_code == 200, resp.text
    ids = resp.json()["ids"]
    after = recognize(server, query, top_k=50, return_topk=True).json()["results"]
    assert hits(after)[label] > 0.999  # its own image: score ~1 (see the note above on top-1)

    resp = requests.post(f"{server}/gallery/remove", headers=AUTH, json={"label": label}, timeout=60)
    assert resp.status_code == 200 and resp.json()["removed"] == len(ids), resp.text
    assert label not in hits(recognize(server, query, top_k=50, return_topk=True).json()["results"])
    resp = requests.post(f"{server}/gallery/remove", headers=AUTH, json={"ids": ids}, timeout=60)
    assert resp.status_code == 404 and "no gallery entries with id" in resp.json()["error"]
    assert "missing_ok" not in resp.json()["error"]  # no Python argument hints for a client


def test_mutations_need_the_admin_token(server, gallery_images):
    data = next(iter(gallery_images.values()))[0].read_bytes()
    count = requests.get(f"{server}/gallery/info", timeout=10).json()["count"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        resp = requests.post(f"{server}/gallery/add", headers=headers, timeout=60,
                             files=[("images", ("x.jpg", data))], data={"label": "intruder"})
        assert resp.status_code == 401, resp.text
        assert "error" in resp.json()
        resp = requests.post(f"{server}/gallery/remove", headers=headers, json={"label": "intruder"}, timeout=60)
        assert resp.status_code == 401
    assert requests.get(f"{server}/gallery/info", timeout=10).json()["count"] == count


def _bomb_png() -> bytes:
    data = bytearray(png(Image.new("RGB", (2, 2))))
    data[16:24] = struct.pack(">II", 100_000, 100_000)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def test_bad_inputs_get_4xx_and_the_server_stays_up(server, gallery_images):
    good = next(iter(gallery_images.values()))[0].read_bytes()
    bad = {
        "zero bytes": (b"", 400, "zero bytes"),
        "random bytes": (np.random.default_rng(0).bytes(4000), 400, "not an image"),
        "truncated jpeg": (good[: len(good) // 2], 400, "truncated"),
        "too large upload": (b"\xff\xd8" + bytes(1024 * 1024 + 10), 413, "upload too large"),  # file check
        "huge body": (bytes(3 * 1024 * 1024), 413, "request body too large"),  # Content-Length check
        "decompression bomb": (_bomb_png(), 413, "too large"),
    }
    for name, (data, status, words) in bad.items():
        for endpoint in ("recognize", "embed"):
            resp = requests.post(f"{server}/{endpoint}", files={"image": ("f.jpg", data)}, timeout=60)
            assert resp.status_code == status, (name, endpoint, resp.status_code, resp.text)
            assert words in resp.json()["error"], (name, resp.text)
        assert recognize(server, good).status_code == 200, name  # still serving
    resp = requests.post(f"{server}/recognize", files={"image": ("f.jpg", good)}, data={"top_k": "0"}, timeout=60)
    assert resp.status_code == 400 and "top_k" in resp.json()["error"]
    resp = requests.post(f"{server}/recognize", data={"top_k": "3"}, timeout=60)  # a urlencoded form: no image
    assert resp.status_code == 415 and "multipart/form-data" in resp.json()["error"]
    rgba = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 50, 4), dtype=np.uint8), "RGBA")
    for image in (rgba, rgba.convert("L"), rgba.convert("CMYK")):
        fmt = "JPEG" if image.mode == "CMYK" else "PNG"
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        resp = recognize(server, buffer.getvalue())
        assert resp.status_code == 200, (image.mode, resp.text)


def test_fifty_concurrent_requests_all_succeed(server, gallery_images):
    datas = [p.read_bytes() for paths in gallery_images.values() for p in paths]

    def call(i: int) -> int:
        if i % 2:
            return requests.post(f"{server}/embed", files={"image": ("q.jpg", datas[i % len(datas)])},
                                 timeout=120).status_code
        return recognize(server, datas[i % len(datas)]).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(call, range(50)))
    assert statuses == [200] * 50
    if not server.batching:
        return  # /embed called the extractor directly: nothing was batched
    # /embed's adaptive batcher grouped concurrent calls: images embedded > extractor calls
    metrics = requests.get(f"{server}/metrics", timeout=10).text
    sums = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
            if line.startswith(("visrec_embed_batch_size_sum", "visrec_embed_batch_size_count"))]
    assert len(sums) == 2 and sums[0] > sums[1], (sums, [m for m in metrics.splitlines() if "visrec" in m])


def test_gallery_changed_on_disk_is_served_without_restart(server, gallery_images):
    """Another worker (or `visrec gallery add`) publishes a new version: the next request sees it."""
    from visrec.config import load_config
    from visrec.index.gallery import Gallery
    from visrec.inference.extractor_runtime import Extractor
    from visrec.inference.gallery_ops import GalleryItem, add_items

    rec = load_config(server.params).recognition
    label, paths = list(gallery_images.items())[-1]
    query = paths[1].read_bytes()
    gallery = Gallery.load(rec.gallery)
    ids = add_items(gallery, Extractor(rec.extractor), [GalleryItem(paths[1], "added on disk")], progress=False)
    gallery.save(rec.gallery)
    info = requests.get(f"{server}/gallery/info", timeout=10).json()
    assert info["count"] == len(gallery) and info["version"] == gallery.version
    assert hits(recognize(server, query, top_k=50, return_topk=True).json()["results"])["added on disk"] > 0.999
    resp = requests.post(f"{server}/gallery/remove", headers=AUTH, json={"ids": ids}, timeout=60)
    assert resp.status_code == 200 and resp.json()["removed"] == 1, resp.text
    assert len(Gallery.load(rec.gallery)) == len(gallery) - 1  # the service published its change


def test_add_several_images_with_one_label_each(server, gallery_images):
    labels = list(gallery_images)[:2]
    files = [("images", (f"{i}.jpg", gallery_images[label][1].read_bytes())) for i, label in enumerate(labels)]
    resp = requests.post(f"{server}/gallery/add", headers=AUTH, files=files,
                         data={"labels": json.dumps(["multi a", "multi b"])}, timeout=60)
    assert resp.status_code == 200 and resp.json()["labels"] == ["multi a", "multi b"], resp.text
    resp = requests.post(f"{server}/gallery/add", headers=AUTH, files=files, data={"labels": json.dumps(["one"])},
                         timeout=60)
    assert resp.status_code == 400 and "one label per image" in resp.json()["error"]
    resp = requests.post(f"{server}/gallery/add", headers=AUTH, timeout=60,
                         files=[("images", ("ok.jpg", files[0][1][1])), ("images", ("bad.jpg", b"junk"))],
                         data={"label": "half"})
    assert resp.status_code == 400 and "images[1]" in resp.json()["error"]  # nothing added
    for label in ("multi a", "multi b"):
        assert requests.post(f"{server}/gallery/remove", headers=AUTH, json={"label": label},
                             timeout=60).json()["removed"] == 1
    info = requests.get(f"{server}/gallery/info", timeout=10).json()
    assert info["labels"] == len(gallery_images) - 1  # back to the initial classes


def test_a_promoted_champion_is_served_without_restart(server, gallery_images, exported_models):
    """The promotion gate publishes a champion: the running service switches to it on the next
    request (notify confirms it), API additions are stored and survive the next promotion, and
    withdrawing the champion brings back the pipeline's latest export."""
    import shutil

    from visrec.inference.extractor_runtime import Extractor
    from visrec.inference.gallery_ops import GalleryItem, build_gallery
    from visrec.workflows.pipeline import notify_service_reload
    from visrec.workflows.champion import publish_champion

    base = server.params.parent  # relative paths of the server's params resolve here
    export = base / "candidate_export"
    for kind, src in zip(("extractor", "detector"), exported_models, strict=True):
        shutil.copytree(src, export / kind, dirs_exist_ok=True)
    labels = list(gallery_images)[:2]
    candidate = base / "candidate_gallery"
    shutil.rmtree(candidate, ignore_errors=True)
    build_gallery(Extractor(export / "extractor"), [GalleryItem(gallery_images[x][0], f"champion {x}") for x in labels],
                  "FLAT", progress=False).save(candidate)
    champion_root = base / "data" / "champion"
    before = requests.get(f"{server}/gallery/info", timeout=10).json()
    try:
        name = publish_champion(export, candidate, champion_root, {"recall@1": 1.0})
        info = requests.get(f"{server}/gallery/info", timeout=10).json()
        assert info["champion"] == name and info["count"] == 2, info
        assert notify_service_reload(str(server), expected_champion=name).startswith(
            f"service at {server} serves champion {name}")
        best = hits(recognize(server, gallery_images[labels[0]][0].read_bytes(), top_k=5,
                              return_topk=True).json()["results"])
        assert set(best) == {f"champion {x}" for x in labels}

        resp = requests.post(f"{server}/gallery/add", headers=AUTH, data={"label": "added to champion"},
                             files={"images": ("a.jpg", gallery_images[labels[1]][1].read_bytes())}, timeout=60)
        assert resp.status_code == 200 and resp.json()["count"] == 3, resp.text
        assert len(list((base / "data" / "gallery_uploads").iterdir())) >= 1  # kept for re-embedding

        second = publish_champion(export, candidate, champion_root, {"recall@1": 1.0})
        info = requests.get(f"{server}/gallery/info", timeout=10).json()
        assert info["champion"] == second and info["count"] == 3  # the addition was carried over
        assert "NOT the new champion" in notify_service_reload(str(server), expected_champion="c999999-x")
    finally:
        shutil.rmtree(champion_root, ignore_errors=True)
    info = requests.get(f"{server}/gallery/info", timeout=10).json()
    assert info["champion"] is None and info["count"] == before["count"]


def test_two_workers_serve_one_gallery(exported_models, gallery_images, tmp_path):
    """VISREC_WORKERS=2: a change made through one worker is served by both, with no restart."""
    from visrec.inference.extractor_runtime import Extractor
    from visrec.inference.gallery_ops import GalleryItem, build_gallery

    extractor_dir, detector_dir = exported_models
    labels = list(gallery_images)[:2]
    build_gallery(Extractor(extractor_dir), [GalleryItem(gallery_images[x][0], x) for x in labels], "FLAT",
                  progress=False).save(tmp_path / "gallery")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"recognition": {
        "extractor": str(extractor_dir), "detector": str(detector_dir), "gallery": str(tmp_path / "gallery")}}))
    with serving(tmp_path, params, {"VISREC_WORKERS": "2"}) as url:
        def answers_by_worker() -> dict[int, set]:
            """(count, version) answered by each worker. /readyz answers once one worker is up and
            the kernel spreads connections as it likes: ask in concurrent rounds until both answered."""
            seen: dict[int, set] = {}
            for _ in range(40):
                with ThreadPoolExecutor(8) as pool:
                    for info in pool.map(lambda _: requests.get(f"{url}/gallery/info", timeout=30).json(), range(16)):
                        seen.setdefault(info["worker"], set()).add((info["count"], info["version"]))
                if len(seen) == 2:
                    return seen
                time.sleep(0.25)
            pytest.fail(f"only worker(s) {sorted(seen)} answered")

        before = answers_by_worker()
        assert {count for answers in before.values() for count, _ in answers} == {2}
        resp = requests.post(f"{url}/gallery/add", headers=AUTH, data={"label": "from one worker"},
                             files={"images": ("a.jpg", gallery_images[labels[0]][1].read_bytes())}, timeout=60)
        assert resp.status_code == 200, resp.text
        expected = {(3, resp.json()["gallery_version"])}
        assert all(answers == expected for answers in answers_by_worker().values())
