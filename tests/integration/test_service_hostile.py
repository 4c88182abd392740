"""The service under hostile and careless clients (issue #18): `bentoml serve` on 127.0.0.1, tiny models."""

from __future__ import annotations

import http.server
import io
import json
import socket
import threading
import time

import numpy as np
import psutil
import pytest
import requests
from PIL import Image

from .test_service import AUTH, tiny_service

pytestmark = pytest.mark.integration
MB = 1024 * 1024


def png(seed: int = 0, size: tuple[int, int] = (40, 30)) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def hostile(exported_models, tiny_cub, tmp_path_factory):
    """(url, tmp dir): serve.max_upload_mb 1 from params (no env override), admin token set."""
    tmp = tmp_path_factory.mktemp("hostile")
    with tiny_service(exported_models, tiny_cub, tmp, {"max_upload_mb": 1}) as url:
        yield url, tmp


def worker_rss(url: str) -> int:
    """RSS of the process listening on the server's port (BentoML's worker)."""
    port = int(url.rsplit(":", 1)[1])
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "_bentoml_impl.worker.service" in cmd or ("bentoml" in cmd and "--fd" in cmd):
            try:
                return proc.memory_info().rss
            except psutil.Error:
                continue
    raise AssertionError(f"no worker process found for port {port}")


def chunked_upload(url: str, path: str, total: int, headers: dict[str, str] | None = None,
                   chunk: int = 256 * 1024) -> tuple[bytes, int]:
    """POST ``total`` bytes of a multipart body with Transfer-Encoding: chunked; stops sending when
    the server answers or closes. Returns (the answer's first bytes, bytes sent)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock.sendall((f"POST {path} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
                  f"Content-Type: multipart/form-data; boundary=B\r\n{extra}\r\n").encode())
    head = b'--B\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
    sent, answer = 0, b""
    sock.setblocking(False)
    payload = b"x" * chunk
    try:
        while sent < total:
            data = head if sent == 0 else payload
            frame = f"{len(data):x}\r\n".encode() + data + b"\r\n"
            view = memoryview(frame)
            while view:
                try:
                    answer += sock.recv(65536)
                    if answer:
                        raise StopIteration
                except BlockingIOError:
                    pass
                try:
                    n = sock.send(view)
                    view = view[n:]
                except BlockingIOError:
                    time.sleep(0.001)
            sent += len(data)
    except (StopIteration, OSError):
        pass
    sock.setblocking(True)
    try:
        while len(answer) < 200 and (more := sock.recv(65536)):
            answer += more
    except OSError:
        pass
    sock.close()
    return answer, sent


def test_a_chunked_body_over_the_limit_is_refused_while_it_arrives(hostile):
    url, _ = hostile
    before = worker_rss(url)
    answer, sent = chunked_upload(url, "/recognize", 256 * MB)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"request body too large" in answer
    assert sent < 64 * MB, sent  # the server stopped reading near the limit (1 MiB + 1 MiB overhead)
    assert worker_rss(url) - before < 50 * MB
    answer, sent = chunked_upload(url, "/gallery/add", 64 * MB)  # no token: 401 before the body is read
    assert answer.startswith(b"HTTP/1.1 401") and sent < 16 * MB, (answer[:200], sent)


def test_a_huge_header_is_431(hostile):
    url, _ = hostile
    resp = requests.get(f"{url}/gallery/info", headers={"X-Big": "x" * (2 * MB)}, timeout=30)
    assert resp.status_code == 431 and "error" in resp.json()


def test_unknown_paths_do_not_grow_metrics(hostile):
    url, _ = hostile
    session = requests.Session()
    before = len(session.get(f"{url}/metrics", timeout=10).content)
    for i in range(1000):
        resp = session.get(f"{url}/no-such-page-{i}", timeout=10)
        assert resp.status_code == 404 and "error" in resp.json()
    after = len(session.get(f"{url}/metrics", timeout=10).content)
    assert after - before < 20_000, (before, after)


@pytest.mark.parametrize(("endpoint", "kwargs", "status", "words"), [
    ("recognize", {"files": {"file": ("a.png", png())}}, 400, "unknown form field 'file'"),
    ("recognize", {"files": {"image": (None, "hello")}}, 400, "must be a file upload"),
    ("embed", {"files": {"image": (None, "http://127.0.0.1:1/x.jpg")}}, 400, "does not fetch URLs"),
    ("embed", {"files": {"image": ("a." + "x" * 300, png())}}, 400, "file name is 302 characters"),
    ("recognize", {"files": [("image", ("a.png", png())), ("image", ("b.png", png(1)))]}, 400, "exactly one file"),
    ("recognize", {"data": b"http://127.0.0.1:1/x.jpg", "headers": {"Content-Type": "text/plain"}}, 415,
     "multipart/form-data"),
    ("embed_batch", {"json": {"images": "abc"}}, 400, ""),
    ("embed_batch", {"json": {"images": [[1, 2], [3]]}}, 400, ""),
    ("embed_batch", {"json": {"images": [[[[{"a": 1}]]]]}}, 400, "validation error"),  # found by the fuzz run
    ("gallery/remove", {"json": {"ids": "abc"}, "headers": AUTH}, 400, ""),
    ("gallery/remove", {"data": b"{not json", "headers": {**AUTH, "Content-Type": "application/json"}}, 400, ""),
])
def test_client_mistakes_are_4xx_json(hostile, endpoint, kwargs, status, words):
    url, _ = hostile
    resp = requests.post(f"{url}/{endpoint}", timeout=60, **kwargs)
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert isinstance(body, dict) and words in body["error"], body


def test_gallery_add_mistakes_and_labels(hostile):
    url, tmp = hostile
    for files, data, words in (
        ([("images", ("a.png", png()))], {"label": "x" * 10_000}, "the limit is 200"),
        ([("images", ("a.png", png()))], {"label": "nul\x00byte"}, "U+0000"),
        ([("images", ("a.png", png()))], {"label": "new\nline"}, "U+000A"),
        ([("images", ("a." + "y" * 300, png()))], {"label": "ok"}, "characters long"),
        ([("images", (None, "http://127.0.0.1:1/x"))], {"label": "ok"}, "must be a file upload"),
    ):
        resp = requests.post(f"{url}/gallery/add", headers=AUTH, files=files, data=data, timeout=60)
        assert resp.status_code == 400 and words in resp.json()["error"], resp.text
    uploads = tmp / "uploads"
    assert not uploads.exists() or not any(uploads.iterdir())  # nothing stored for refused calls


def test_stored_uploads_follow_the_gallery(hostile):
    url, tmp = hostile
    data = png(7)
    names = []
    for name in ("same.jpg", "same.sh", "same.html"):
        resp = requests.post(f"{url}/gallery/add", headers=AUTH, files={"images": (name, data)},
                             data={"label": f"stored {name}"}, timeout=60)
        assert resp.status_code == 200, resp.text
        names.append(resp.json()["labels"][0])
    files = list((tmp / "uploads").iterdir())
    assert len(files) == 1 and files[0].suffix == ".png"  # content hash + decoded format, one file
    for name in names:
        resp = requests.post(f"{url}/gallery/remove", headers=AUTH, json={"label": name}, timeout=60)
        assert resp.status_code == 200, resp.text
    assert list((tmp / "uploads").iterdir()) == []  # no entry refers to it any more


def test_info_shows_no_internals(hostile):
    url, tmp = hostile
    info = requests.get(f"{url}/gallery/info", timeout=10).json()
    text = json.dumps(info)
    assert str(tmp) not in text and "worker_pid" not in info and "path" not in info


def test_no_url_is_ever_fetched(hostile):
    """A local web server that records requests: no form or body makes the service call it."""
    url, _ = hostile
    hits: list[str] = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(png())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    target = f"http://127.0.0.1:{server.server_address[1]}/a.png"
    try:
        attempts = [
            ("recognize", {"files": {"image": (None, target)}}),
            ("embed", {"files": {"image": (None, f'"{target}"')}}),
            ("recognize", {"data": target.encode()}),
            ("embed", {"data": {"image": target}}),
            ("recognize", {"json": {"image": target}}),
            ("gallery/add", {"files": {"images": (None, target)}, "data": {"label": "u"}, "headers": AUTH}),
        ]
        for endpoint, kwargs in attempts:
            resp = requests.post(f"{url}/{endpoint}", timeout=30, **kwargs)
            assert 400 <= resp.status_code < 500 and "error" in resp.json(), (endpoint, resp.text)
    finally:
        server.shutdown()
    assert hits == []


def test_still_serving_after_all_that(hostile):
    url, _ = hostile
    resp = requests.post(f"{url}/recognize", files={"image": ("q.png", png(3))}, timeout=60)
    assert resp.status_code == 200, resp.text

