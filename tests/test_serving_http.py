"""Header-size cap and known paths (visrec.serving.http) on a real uvicorn server with a stand-in app."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest
import requests
import uvicorn

from visrec.serving import http as http_limits


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


class Limited(http_limits.LimitedHttpToolsProtocol):
    max_header_bytes = 8 * 1024
    known_paths = (frozenset({"/known"}), ("/static/",))


@pytest.fixture(scope="module")
def url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=Limited, log_level="error",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def raw_request(url: str, head: bytes, body_chunks=()) -> bytes:
    host, port = url.rsplit(":", 1)
    with socket.create_connection(("127.0.0.1", int(port)), timeout=10) as sock:
        with contextlib.suppress(OSError):  # the server may close while we still send
            sock.sendall(head)
            for chunk in body_chunks:
                sock.sendall(chunk)
        data = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                data += chunk
    return data


def test_small_headers_pass_and_unknown_paths_are_404_json(url):
    assert requests.get(f"{url}/known", timeout=5).text == "ok"
    assert requests.get(f"{url}/static/x.css", timeout=5).status_code == 200
    resp = requests.get(f"{url}/nope-{time.time()}", timeout=5)
    assert resp.status_code == 404 and "error" in resp.json()


def test_a_huge_header_is_431_without_reading_it_all(url):
    big = b"x" * (4 * 1024 * 1024)
    chunks = [b"X-Big: " + big[:65536]] + [big[i:i + 65536] for i in range(65536, len(big), 65536)]
    answer = raw_request(url, b"GET /known HTTP/1.1\r\nHost: a\r\n", chunks)
    assert answer.startswith(b"HTTP/1.1 431") and b'"error"' in answer
    assert requests.get(f"{url}/known", timeout=5).text == "ok"  # still serving


def test_a_large_body_after_small_headers_is_not_mistaken_for_headers(url):
    body = b"y" * 200_000
    head = b"POST /known HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    assert raw_request(url, head + body).startswith(b"HTTP/1.1 200")
    # a body spread over many reads, the last of which ends the message: not a head either
    resp = requests.post(f"{url}/known", files={"image": ("f.jpg", bytes(1024 * 1024))}, timeout=10)
    assert resp.status_code == 200


def test_install_makes_auto_resolve_to_the_limited_protocol(monkeypatch):
    import uvicorn.config

    monkeypatch.setitem(uvicorn.config.HTTP_PROTOCOLS, "auto", uvicorn.config.HTTP_PROTOCOLS["auto"])
    monkeypatch.setattr(http_limits.LimitedHttpToolsProtocol, "max_header_bytes", 1)
    monkeypatch.setattr(http_limits.LimitedHttpToolsProtocol, "known_paths", None)
    http_limits.install(1234, exact=["/a"], prefixes=["/b/"])
    config = uvicorn.Config(app)
    config.load()
    assert config.http_protocol_class is http_limits.LimitedHttpToolsProtocol
    assert http_limits.LimitedHttpToolsProtocol.max_header_bytes == 1234
