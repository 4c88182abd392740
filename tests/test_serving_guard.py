"""The request guard (visrec.serving.guard) against a stand-in ASGI app: no BentoML, no server."""

from __future__ import annotations

import asyncio
import json

import pytest

from visrec.serving.errors import Unauthorized
from visrec.serving.guard import FormSpec, RequestGuard, Route

BOUNDARY = b"XyZ"
RECOGNIZE = Route(frozenset({"POST"}), 1000, form=FormSpec({"image": 1}, frozenset({"top_k"}), frozenset({"image"})))
ADD = Route(frozenset({"POST"}), 1000, admin=True, form=FormSpec({"images": 2}, frozenset({"label"}),
                                                                 frozenset({"images"})))
REMOVE = Route(frozenset({"POST"}), 1000, admin=True)


def part(name: str, data: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    return b"--" + BOUNDARY + b"\r\nContent-Disposition: " + disposition.encode() + b"\r\n\r\n" + data + b"\r\n"


def form(*parts: bytes) -> bytes:
    return b"".join(parts) + b"--" + BOUNDARY + b"--\r\n"


def authorize(header: str | None) -> None:
    if header != "Bearer ok":
        raise Unauthorized("invalid admin token")


class App:
    """Reads the whole body like a framework would (and answers 500 if reading it fails)."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.reads = 0

    async def __call__(self, scope, receive, send) -> None:
        body = b""
        try:
            while True:
                message = await receive()
                self.reads += 1
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
        except Exception:
            await send({"type": "http.response.start", "status": 500, "headers": []})
            await send({"type": "http.response.body", "body": b"internal error"})
            return
        self.bodies.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def call(path: str, body: bytes, *, chunks: int = 1, ctype: bytes | None = b"multipart/form-data; boundary=XyZ",
         headers: list | None = None, method: str = "POST", routes=None, length: bool = False):
    app = App()
    guard = RequestGuard(app, routes or {"/recognize": RECOGNIZE, "/gallery/add": ADD, "/gallery/remove": REMOVE},
                         default_max_body=100, authorize=authorize)
    size = max(1, -(-len(body) // chunks))
    pieces = [body[i:i + size] for i in range(0, len(body), size)] or [b""]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(pieces) - 1} for i, p in enumerate(pieces)]
    sent: list[dict] = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    hdrs = list(headers or [])
    if ctype is not None:
        hdrs.append((b"content-type", ctype))
    if length:
        hdrs.append((b"content-length", str(len(body)).encode()))
    asyncio.run(guard({"type": "http", "method": method, "path": path, "headers": hdrs}, receive, send))
    status = sent[0]["status"]
    payload = b"".join(m.get("body", b"") for m in sent[1:])
    return status, (json.loads(payload) if status != 200 else None), app, len(pieces) - len(messages)


def test_a_valid_form_passes_untouched():
    body = form(part("image", b"\x89PNG...", "a.png"), part("top_k", b"3"))
    status, _, app, _ = call("/recognize", body, chunks=7)
    assert status == 200 and app.bodies == [body]


@pytest.mark.parametrize("chunks", [1, 50])
def test_a_chunked_body_over_the_limit_is_refused_after_at_most_the_limit(chunks):
    body = form(part("image", b"x" * 5000, "a.png"))
    status, error, app, consumed = call("/recognize", body, chunks=chunks)
    assert status == 413 and "request body too large" in error["error"] and "1000" in error["error"]
    assert consumed * (len(body) / chunks) <= 1000 + len(body) / chunks + 1  # stopped reading at the limit
    assert app.bodies == []


def test_a_declared_length_over_the_limit_is_refused_before_reading():
    status, error, app, consumed = call("/recognize", form(part("image", b"x" * 5000, "a.png")), length=True)
    assert status == 413 and consumed == 0 and app.reads == 0


def test_admin_routes_check_the_token_before_reading_the_body():
    body = form(part("images", b"x" * 500, "a.png"), part("label", b"a"))
    status, error, app, consumed = call("/gallery/add", body, chunks=5)
    assert status == 401 and error == {"error": "invalid admin token"} and consumed == 0 and app.reads == 0
    status, _, app, _ = call("/gallery/add", body, headers=[(b"authorization", b"Bearer ok")])
    assert status == 200


@pytest.mark.parametrize(("parts", "words"), [
    ([part("file", b"data", "a.png")], "unknown form field 'file'"),
    ([part("image", b"http://example.com/a.jpg")], "'image' must be a file upload"),
    ([part("image", b"data", "a." + "x" * 300)], "file name is 302 characters long"),
    ([part("image", b"one", "a.png"), part("image", b"two", "b.png")], "exactly one file"),
    ([part("image", b"one", "a.png"), part("top_k", b"1", "k.txt")], "'top_k' is a text field"),
    ([part("image", b"one", "a.png"), part("top_k", b"1"), part("top_k", b"2")], "more than once"),
    ([part("top_k", b"1")], "missing file field 'image'"),
])
def test_form_shape_mistakes_are_400_naming_the_rule(parts, words):
    status, error, app, _ = call("/recognize", form(*parts), chunks=3)
    assert status == 400 and words in error["error"], error
    assert app.bodies == []  # the framework never got to parse (or fetch) anything


def test_wrong_content_type_and_method_are_4xx_json():
    status, error, *_ = call("/recognize", b"http://example.com/x.jpg", ctype=b"text/plain")
    assert status == 415 and "multipart/form-data" in error["error"]
    status, error, *_ = call("/recognize", b"image=http://x", ctype=b"application/x-www-form-urlencoded")
    assert status == 415
    status, error, *_ = call("/recognize", b"", method="GET")
    assert status == 405 and "POST" in error["error"]
    headers = [(b"authorization", b"Bearer ok")]
    status, error, *_ = call("/gallery/remove", form(part("ids", b"[1]")), headers=headers)
    assert status == 415 and "application/json" in error["error"]
    assert call("/gallery/remove", b'{"ids": [1]}', ctype=b"application/json", headers=headers)[0] == 200


def test_malformed_multipart_is_400():
    status, error, *_ = call("/recognize", b"--XyZ\r\nno headers at all")
    assert status == 400 and "malformed multipart" in error["error"]
    status, error, *_ = call("/recognize", b"x", ctype=b"multipart/form-data")
    assert status == 400 and "boundary" in error["error"]


def test_too_many_files_and_long_text_fields():
    body = form(*(part("images", b"x", f"{i}.png") for i in range(3)), part("label", b"a"))
    status, error, *_ = call("/gallery/add", body, headers=[(b"authorization", b"Bearer ok")])
    assert status == 413 and "at most 2 files" in error["error"]
    routes = {"/recognize": Route(frozenset({"POST"}), 10**6, form=RECOGNIZE.form)}
    body = form(part("image", b"x", "a.png"), part("top_k", b"1" * 70_000))
    status, error, *_ = call("/recognize", body, routes=routes)
    assert status == 413 and "'top_k' is longer" in error["error"]


def test_unrouted_paths_pass_with_the_default_limit():
    assert call("/livez", b"", ctype=None, method="GET")[0] == 200
    assert call("/other", b"x" * 101, ctype=None)[0] == 413
