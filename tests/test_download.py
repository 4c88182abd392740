"""Download, extraction and materialisation of CUB_200_2011, against a local HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import shutil
import socket
import sys
import tarfile
import threading
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from visrec.config import DataConfig, SyntheticConfig
from visrec.data.cub import CUB_DIRNAME, DataLayoutError
from visrec.data.download import DownloadError, download_file, extract_archive, materialize

REAL_SUBSET = Path("/work/shared/data/cub_subset/CUB_200_2011")
CLASSES = {1: "001.Alpha_bird", 2: "002.Beta_bird"}


# ----------------------------------------------------------------------------- fixtures


def _write_cub(root: Path, skip: tuple[str, ...] = ()) -> Path:
    """A 2 classes x 2 images CUB_200_2011 folder, plus extras the copy should skip."""
    rng = np.random.default_rng(0)
    rows = {"images.txt": [], "image_class_labels.txt": [], "bounding_boxes.txt": [],
            "train_test_split.txt": []}
    image_id = 0
    for class_id, name in CLASSES.items():
        (root / "images" / name).mkdir(parents=True)
        for k in range(2):
            image_id += 1
            rel = f"{name}/{name[4:]}_{k}.jpg"
            img = rng.integers(0, 255, size=(24, 32, 3), dtype=np.uint8)
            assert cv2.imwrite(str(root / "images" / rel), img)
            rows["images.txt"].append(f"{image_id} {rel}")
            rows["image_class_labels.txt"].append(f"{image_id} {class_id}")
            rows["bounding_boxes.txt"].append(f"{image_id} 2.0 3.0 20.0 15.0")
            rows["train_test_split.txt"].append(f"{image_id} {k % 2}")
    rows["classes.txt"] = [f"{cid} {name}" for cid, name in CLASSES.items()]
    for fname, lines in rows.items():
        if fname not in skip:
            (root / fname).write_text("\n".join(lines) + "\n")
    (root / "attributes").mkdir()
    (root / "attributes" / "certainties.txt").write_text("1 not visible\n")
    (root / "README").write_text("tiny test copy\n")
    return root


def _make_tgz(folder: Path, archive: Path, arcname: str = CUB_DIRNAME) -> bytes:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=arcname)
        # The official archive also has attributes.txt beside the folder.
        data = b"1 has_bill_shape::curved\n"
        info = tarfile.TarInfo("attributes.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return archive.read_bytes()


@pytest.fixture()
def tiny_cub(tmp_path: Path) -> Path:
    return _write_cub(tmp_path / "src" / CUB_DIRNAME)


@pytest.fixture()
def tiny_tgz(tiny_cub: Path, tmp_path: Path) -> Path:
    archive = tmp_path / "archives" / "CUB_200_2011.tgz"
    archive.parent.mkdir()
    _make_tgz(tiny_cub, archive)
    return archive


class _Server:
    """Serves ``payload`` at /CUB_200_2011.tgz; other paths are 404."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.honour_range = True
        self.requests: list[dict[str, str]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.requests.append(dict(self.headers.items()))
                if self.path != "/CUB_200_2011.tgz":
                    self.send_error(404, "Not Found")
                    return
                body, status, extra = server.payload, 200, {}
                rng = self.headers.get("Range")
                if rng and server.honour_range:
                    start = int(rng.removeprefix("bytes=").rstrip("-"))
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                    extra["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
                    body = body[start:]
                self.send_response(status)
                self.send_header("Content-Type", "application/x-tar")
                self.send_header("Content-Length", str(len(body)))
                for key, value in extra.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/CUB_200_2011.tgz"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture()
def server(tiny_tgz: Path):
    srv = _Server(tiny_tgz.read_bytes())
    yield srv
    srv.close()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- download_file


def test_download_ok_and_md5_verified(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "dl" / "CUB_200_2011.tgz"
    out = download_file(server.url, dest, _md5(server.payload), timeout_s=5, progress=False)
    assert out == dest
    assert dest.read_bytes() == server.payload
    assert not dest.with_name(dest.name + ".part").exists()
    assert "Range" not in server.requests[0]


def test_existing_file_with_right_md5_is_not_downloaded_again(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "CUB_200_2011.tgz"
    dest.write_bytes(server.payload)
    download_file(server.url, dest, _md5(server.payload), timeout_s=5, progress=False)
    assert server.requests == []


def test_existing_file_with_wrong_md5_is_replaced(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "CUB_200_2011.tgz"
    dest.write_bytes(b"stale")
    download_file(server.url, dest, _md5(server.payload), timeout_s=5, progress=False)
    assert dest.read_bytes() == server.payload
    assert len(server.requests) == 1


def test_checksum_mismatch_raises_and_leaves_no_file(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "CUB_200_2011.tgz"
    wrong = "0" * 32
    with pytest.raises(DownloadError) as err:
        download_file(server.url, dest, wrong, timeout_s=5, progress=False)
    msg = str(err.value)
    assert wrong in msg and _md5(server.payload) in msg and "retry" in msg
    assert not dest.exists()
    assert not dest.with_name(dest.name + ".part").exists()


def test_resume_sends_range_and_appends(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "CUB_200_2011.tgz"
    half = len(server.payload) // 2
    dest.with_name(dest.name + ".part").write_bytes(server.payload[:half])
    download_file(server.url, dest, _md5(server.payload), timeout_s=5, progress=False)
    assert server.requests[0].get("Range") == f"bytes={half}-"
    assert _md5(dest.read_bytes()) == _md5(server.payload)


def test_server_ignoring_range_restarts_from_zero(server: _Server, tmp_path: Path) -> None:
    server.honour_range = False
    dest = tmp_path / "CUB_200_2011.tgz"
    half = len(server.payload) // 2
    dest.with_name(dest.name + ".part").write_bytes(server.payload[:half])
    download_file(server.url, dest, _md5(server.payload), timeout_s=5, progress=False)
    assert server.requests[0].get("Range") == f"bytes={half}-"
    assert dest.read_bytes() == server.payload  # not half + whole


def test_complete_part_answered_416_is_accepted(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "CUB_200_2011.tgz"
    dest.with_name(dest.name + ".part").write_bytes(server.payload)
    download_file(server.url, dest, _md5(server.payload), timeout_s=5, progress=False)
    assert server.requests[0].get("Range") == f"bytes={len(server.payload)}-"
    assert dest.read_bytes() == server.payload


def test_offline_gives_one_line_naming_url_and_data_source(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/CUB_200_2011.tgz?download=1"
    with pytest.raises(DownloadError) as err:
        download_file(url, tmp_path / "x.tgz", None, timeout_s=2, progress=False)
    msg = str(err.value)
    assert "\n" not in msg
    assert url in msg and "data.source" in msg
    assert not (tmp_path / "x.tgz").exists()


def test_http_404_raises_download_error(server: _Server, tmp_path: Path) -> None:
    url = server.url.replace("CUB_200_2011.tgz", "missing.tgz")
    with pytest.raises(DownloadError) as err:
        download_file(url, tmp_path / "x.tgz", None, timeout_s=5, progress=False)
    msg = str(err.value)
    assert "404" in msg and url in msg and "\n" not in msg
    assert not (tmp_path / "x.tgz").exists()


# ----------------------------------------------------------------------------- extract_archive


def test_extract_returns_cub_folder(tiny_tgz: Path, tmp_path: Path) -> None:
    root = extract_archive(tiny_tgz, tmp_path / "out", progress=False)
    assert root == tmp_path / "out" / CUB_DIRNAME
    assert (root / "images.txt").is_file()


def test_extract_finds_repacked_folder_under_another_name(tiny_cub: Path, tmp_path: Path) -> None:
    archive = tmp_path / "birds.tar.gz"
    _make_tgz(tiny_cub, archive, arcname="birds")
    root = extract_archive(archive, tmp_path / "out", progress=False)
    assert root == tmp_path / "out" / "birds"


def test_extract_refuses_path_traversal(tmp_path: Path) -> None:
    archive = tmp_path / "evil.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    with pytest.raises(DownloadError, match="outside"):
        extract_archive(archive, tmp_path / "out", progress=False)
    assert not (tmp_path / "evil.txt").exists()


def test_extract_truncated_archive_raises(tiny_tgz: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.tgz"
    broken.write_bytes(tiny_tgz.read_bytes()[:200])
    with pytest.raises(DownloadError, match="cannot extract"):
        extract_archive(broken, tmp_path / "out", progress=False)


# ----------------------------------------------------------------------------- materialize


def _assert_tiny_raw(meta, raw: Path) -> None:
    assert meta.root == raw / CUB_DIRNAME
    assert len(meta.images) == 4 and meta.classes == CLASSES
    assert all((raw / CUB_DIRNAME / img.rel_path).is_file() for img in meta.images)
    # Only the CUB folder ends in raw: no staging leftovers, no top-level attributes.txt.
    assert sorted(p.name for p in raw.iterdir()) == [CUB_DIRNAME]


def test_materialize_from_local_tgz(tiny_tgz: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    meta = materialize(DataConfig(source=str(tiny_tgz)), raw, tmp_path / "dl", progress=False)
    _assert_tiny_raw(meta, raw)
    assert not (tmp_path / "dl").exists()  # a local archive is not copied to the cache


@pytest.mark.parametrize("use_parent", [False, True], ids=["folder", "parent"])
def test_materialize_from_folder_links_files(tiny_cub: Path, tmp_path: Path, use_parent: bool) -> None:
    raw = tmp_path / "raw"
    source = tiny_cub.parent if use_parent else tiny_cub
    meta = materialize(DataConfig(source=str(source)), raw, tmp_path / "dl", progress=False)
    _assert_tiny_raw(meta, raw)
    first = meta.images[0].rel_path
    assert (raw / CUB_DIRNAME / first).samefile(tiny_cub / first)  # hard link, no second copy
    assert not (raw / CUB_DIRNAME / "attributes").exists()
    assert not (raw / CUB_DIRNAME / "README").exists()


def test_materialize_from_folder_copies_when_links_fail(
    tiny_cub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_link(src: str, dst: str) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    raw = tmp_path / "raw"
    meta = materialize(DataConfig(source=str(tiny_cub)), raw, tmp_path / "dl", progress=False)
    first = meta.images[0].rel_path
    assert not (raw / CUB_DIRNAME / first).samefile(tiny_cub / first)
    assert (raw / CUB_DIRNAME / first).read_bytes() == (tiny_cub / first).read_bytes()


def test_materialize_cub_downloads_once_into_cache(server: _Server, tmp_path: Path) -> None:
    cfg = DataConfig(source="cub", url=server.url, md5=_md5(server.payload), timeout_s=5)
    raw, downloads = tmp_path / "raw", tmp_path / "downloads"
    meta = materialize(cfg, raw, downloads, progress=False)
    _assert_tiny_raw(meta, raw)
    assert (downloads / "CUB_200_2011.tgz").read_bytes() == server.payload
    materialize(cfg, raw, downloads, progress=False)
    assert len(server.requests) == 1  # the rerun used the cached archive


def test_failed_materialize_keeps_previous_raw(tiny_cub: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    materialize(DataConfig(source=str(tiny_cub)), raw, tmp_path / "dl", progress=False)
    marker = raw / "marker.txt"
    marker.write_text("previous good data")

    bad_folder = _write_cub(tmp_path / "bad" / CUB_DIRNAME, skip=("bounding_boxes.txt",))
    bad_tgz = tmp_path / "bad.tgz"
    _make_tgz(bad_folder, bad_tgz)
    with pytest.raises(DataLayoutError, match="bounding_boxes.txt"):
        materialize(DataConfig(source=str(bad_tgz)), raw, tmp_path / "dl", progress=False)
    with pytest.raises(DownloadError, match="does not exist"):
        materialize(DataConfig(source=str(tmp_path / "nowhere")), raw, tmp_path / "dl", progress=False)

    assert marker.read_text() == "previous good data"
    assert (raw / CUB_DIRNAME / "images.txt").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".raw")] == []


def test_materialize_unknown_source_message(tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as err:
        materialize(DataConfig(source="cub200"), tmp_path / "raw", tmp_path / "dl", progress=False)
    msg = str(err.value)
    assert "'synthetic'" in msg and "'cub'" in msg and "cub200" in msg
    assert not (tmp_path / "raw").exists()


def test_materialize_synthetic_calls_generate(
    tiny_cub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def fake_generate(dest_parent: Path, cfg: SyntheticConfig, progress: bool = True) -> Path:
        calls.append((dest_parent, cfg, progress))
        shutil.copytree(tiny_cub, dest_parent / CUB_DIRNAME)
        return dest_parent / CUB_DIRNAME

    monkeypatch.setitem(sys.modules, "visrec.data.synthetic",
                        types.SimpleNamespace(generate=fake_generate))
    cfg = DataConfig(source="synthetic", synthetic=SyntheticConfig(num_classes=2))
    raw = tmp_path / "raw"
    meta = materialize(cfg, raw, tmp_path / "dl", progress=False)
    assert len(calls) == 1 and calls[0][1] is cfg.synthetic and calls[0][2] is False
    assert meta.root == raw / CUB_DIRNAME and len(meta.images) == 4


def test_materialize_synthetic_real_generator(tmp_path: Path) -> None:
    pytest.importorskip("visrec.data.synthetic", reason="visrec.data.synthetic not written yet")
    syn = SyntheticConfig(num_classes=2, images_per_class=2, image_size=64, clutter_shapes=1, workers=1)
    meta = materialize(DataConfig(source="synthetic", synthetic=syn), tmp_path / "raw",
                       tmp_path / "dl", progress=False)
    assert len(meta.classes) == 2 and len(meta.images) == 4


def test_materialize_real_cub_subset(tmp_path: Path) -> None:
    if not (REAL_SUBSET / "images.txt").is_file():
        pytest.skip(f"real CUB subset not found at {REAL_SUBSET}")
    raw = tmp_path / "raw"
    meta = materialize(DataConfig(source=str(REAL_SUBSET)), raw, tmp_path / "dl", progress=False)
    assert len(meta.images) == 2889 and len(meta.classes) == 50
    assert meta.root == raw / CUB_DIRNAME
    assert (raw / CUB_DIRNAME / meta.images[-1].rel_path).is_file()
