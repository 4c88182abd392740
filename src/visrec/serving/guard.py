"""The request guard: an ASGI middleware that refuses a bad request before the framework reads it.

BentoML parses a request's body itself (the whole multipart form spooled to temporary files,
then each file read whole into memory and written again) before an API method sees it, and
answers 500 for client mistakes its parser does not expect. So everything a client controls
about the *shape* of a request is checked here, while the bytes arrive:

* **Size**: body bytes are counted as they are received, chunked or not: past the route's
  limit the request is refused (413) and nothing more is read. A declared ``Content-Length``
  over the limit is refused before any byte is read.
* **Admin routes**: the token is checked before a byte of the body is read (401 / 403).
* **Routes and methods**: a known path with the wrong method is 405; the content type must be
  the route's (multipart/form-data for uploads, JSON for the rest): 415 otherwise.
* **Multipart forms** are parsed alongside (python-multipart's streaming parser sees the part
  headers only): every part must be a field the route takes, file fields must carry files (a
  text ``image=http://...`` is refused, so the server never fetches a URL for a client), text
  fields must not be files, each file field takes at most its number of files (``image``:
  exactly one) and each text field appears once, within a size, and file names are short.

Every refusal is a JSON ``{"error": ...}`` with a 4xx status naming the rule. When a refusal
comes mid-body the framework's own handling of the interrupted read is replaced by it (its
response is dropped, its traceback log silenced).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParser, parse_options_header

from visrec.serving.errors import (
    BadRequest, MethodNotAllowed, PayloadTooLarge, ServiceError, UnsupportedMediaType, send_error,
)

logger = logging.getLogger(__name__)

MAX_FILENAME_CHARS = 128
MAX_TEXT_FIELD_BYTES = 64 * 1024
MAX_PART_HEADER_BYTES = 8 * 1024


class RequestRejected(Exception):
    """Raised from the guard's ``receive`` into the framework when a request is refused mid-body."""

    def __init__(self, error: ServiceError) -> None:
        super().__init__(str(error))
        self.error = error


class QuietRejections(logging.Filter):
    """Drops the framework's traceback log of a read the guard interrupted (it logs a line itself)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        while exc is not None:
            if isinstance(exc, RequestRejected):
                return False
            exc = exc.__cause__ or exc.__context__
        return True


@dataclass(frozen=True)
class FormSpec:
    """The multipart form a route takes: file fields (name -> most files) and text fields."""

    files: Mapping[str, int]
    fields: frozenset[str] = frozenset()
    required: frozenset[str] = frozenset()  # file fields that must carry at least one file

    def describe(self) -> str:
        files = [f"'{k}' (a file)" if n == 1 else f"'{k}' (1 to {n} files)" for k, n in self.files.items()]
        return ", ".join([*files, *(f"'{k}'" for k in sorted(self.fields))])


@dataclass(frozen=True)
class Route:
    methods: frozenset[str]
    max_body: int
    admin: bool = False
    form: FormSpec | None = None  # None: a JSON body (or none)
    json: bool = True  # without a form: the body, if any, must be application/json


@dataclass
class _FormObserver:
    """Feeds a multipart body to a streaming parser that only looks at part headers and sizes."""

    spec: FormSpec
    boundary: bytes
    counts: dict[str, int] = field(default_factory=dict)
    error: ServiceError | None = None

    def __post_init__(self) -> None:
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._header_bytes = 0
        self._text_bytes = 0
        self._current: str | None = None
        self._is_file = False
        self._done = False
        self.parser = MultipartParser(self.boundary, callbacks={
            "on_part_begin": self._part_begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value_cb, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_end": self._end})

    def _fail(self, error: ServiceError) -> None:
        if self.error is None:
            self.error = error

    def _part_begin(self) -> None:
        self._headers, self._header_name, self._header_value = {}, b"", b""
        self._header_bytes = self._text_bytes = 0
        self._current = None

    def _grow(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > MAX_PART_HEADER_BYTES:
            self._fail(BadRequest(f"a multipart part's headers exceed {MAX_PART_HEADER_BYTES} bytes"))

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._grow(end - start)
        self._header_name += data[start:end]

    def _header_value_cb(self, data: bytes, start: int, end: int) -> None:
        self._grow(end - start)
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if b"name" not in options:
            return self._fail(BadRequest("every multipart part needs a Content-Disposition header with a name"))
        name = options[b"name"].decode("latin-1")
        shown = name if len(name) <= 64 and name.isprintable() else name[:64].encode("unicode_escape").decode()
        is_file = b"filename" in options
        if name in self.spec.files:
            if not is_file:
                return self._fail(BadRequest(
                    f"'{shown}' must be a file upload (a multipart part with a filename); this server does not "
                    "fetch URLs or read paths sent as text"))
            filename = options[b"filename"].decode("latin-1")
            if len(filename) > MAX_FILENAME_CHARS:
                return self._fail(BadRequest(
                    f"'{shown}': the file name is {len(filename)} characters long, the limit is {MAX_FILENAME_CHARS}"))
            if "\x00" in filename:
                return self._fail(BadRequest(f"'{shown}': the file name contains a NUL character"))
            self.counts[name] = self.counts.get(name, 0) + 1
            most = self.spec.files[name]
            if self.counts[name] > most:
                status = BadRequest if most == 1 else PayloadTooLarge
                return self._fail(status(f"'{shown}' takes exactly one file, got more" if most == 1 else
                                         f"'{shown}' takes at most {most} files in one call"))
        elif name in self.spec.fields:
            if is_file:
                return self._fail(BadRequest(f"'{shown}' is a text field, not a file upload"))
            self.counts[name] = self.counts.get(name, 0) + 1
            if self.counts[name] > 1:
                return self._fail(BadRequest(f"'{shown}' was given more than once"))
        else:
            return self._fail(BadRequest(f"unknown form field '{shown}': this endpoint takes {self.spec.describe()}"))
        self._current, self._is_file = name, is_file

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current is not None and not self._is_file:
            self._text_bytes += end - start
            if self._text_bytes > MAX_TEXT_FIELD_BYTES:
                self._fail(PayloadTooLarge(f"form field '{self._current}' is longer than "
                                           f"{MAX_TEXT_FIELD_BYTES} bytes"))

    def _end(self) -> None:
        self._done = True

    def feed(self, chunk: bytes) -> None:
        if self.error is None and chunk:
            try:
                self.parser.write(chunk)
            except Exception as exc:  # python-multipart's parse errors: a malformed body
                self._fail(BadRequest(f"malformed multipart body: {exc}"))

    def finish(self) -> None:
        if self.error is not None:
            return
        if not self._done:
            return self._fail(BadRequest("malformed multipart body: it ends before its closing boundary"))
        missing = [k for k in sorted(self.spec.required) if not self.counts.get(k)]
        if missing:
            self._fail(BadRequest(f"missing file field '{missing[0]}': this endpoint takes {self.spec.describe()}"))


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or ():
        if key == name:
            return value
    return None


class RequestGuard:
    """ASGI middleware: see the module doc. ``routes`` maps exact paths to their rules; other
    paths pass with ``default_max_body``. ``authorize(authorization_header)`` raises a
    :class:`ServiceError` (401/403) for admin routes."""

    def __init__(self, app, routes: Mapping[str, Route], default_max_body: int,
                 authorize: Callable[[str | None], None] | None = None) -> None:
        self.app = app
        self.routes = dict(routes)
        self.default_max_body = int(default_max_body)
        self.authorize = authorize

    async def __call__(self, scope, receive, send) -> None:
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        route = self.routes.get(scope.get("path", ""))
        try:
            observer = self._admit(scope, route)
        except ServiceError as exc:
            logger.info("refused %s %s: %d %s", scope.get("method"), scope.get("path"), exc.status, exc)
            return await send_error(send, exc)
        limit = route.max_body if route is not None else self.default_max_body
        state = {"received": 0, "error": None, "started": False, "sent_ours": False}

        async def guarded_receive():
            message = await receive()
            if state["error"] is not None:
                raise RequestRejected(state["error"])
            if message.get("type") == "http.request":
                chunk = message.get("body", b"")
                state["received"] += len(chunk)
                if state["received"] > limit:
                    state["error"] = PayloadTooLarge(f"request body too large: more than {limit} bytes, the limit "
                                                     f"for {scope.get('path')}")
                elif observer is not None:
                    observer.feed(chunk)
                    if not message.get("more_body", False):
                        observer.finish()
                    state["error"] = observer.error
                if state["error"] is not None:
                    raise RequestRejected(state["error"])
            return message

        async def guarded_send(message) -> None:
            if state["error"] is not None and not state["started"]:
                return  # the app's answer to an interrupted read: ours replaces it
            if message.get("type") == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except RequestRejected:
            pass
        except Exception:
            if state["error"] is None or state["started"]:
                raise
        if state["error"] is not None and not state["started"]:
            exc = state["error"]
            logger.info("refused %s %s after %d body bytes: %d %s", scope.get("method"), scope.get("path"),
                        state["received"], exc.status, exc)
            await send_error(send, exc)

    def _admit(self, scope, route: Route | None) -> _FormObserver | None:
        """Checks made from the request line and headers alone; returns the form observer, if any."""
        if route is None:
            return None
        if scope.get("method") not in route.methods:
            raise MethodNotAllowed(f"{scope.get('method')} is not allowed on {scope.get('path')}: use "
                                   f"{', '.join(sorted(route.methods))}",
                                   headers={"Allow": ", ".join(sorted(route.methods))})
        if route.admin:
            if self.authorize is None:
                raise ServiceError("no admin authorisation configured")
            auth = _header(scope, b"authorization")
            self.authorize(auth.decode("latin-1") if auth is not None else None)
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > route.max_body:
            raise PayloadTooLarge(f"request body too large: {int(declared)} bytes, the limit for "
                                  f"{scope.get('path')} is {route.max_body} bytes")
        ctype, options = parse_options_header(_header(scope, b"content-type") or b"")
        if route.form is not None:
            if ctype != b"multipart/form-data":
                raise UnsupportedMediaType(f"{scope.get('path')} takes multipart/form-data (file uploads: "
                                           f"{route.form.describe()}), got {ctype.decode('latin-1') or 'no type'}")
            boundary = options.get(b"boundary")
            if not boundary or len(boundary) > 200:
                raise BadRequest("multipart/form-data without a valid boundary parameter")
            return _FormObserver(route.form, boundary)
        if route.json and ctype not in (b"", b"application/json") and scope.get("method") != "GET":
            raise UnsupportedMediaType(f"{scope.get('path')} takes application/json, got {ctype.decode('latin-1')}")
        return None
