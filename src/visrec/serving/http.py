"""Limits below the ASGI application: header size and the set of paths the server answers.

Two things cannot be done by an ASGI middleware inside the framework:

* **Header size.** uvicorn's httptools parser buffers the request line and headers without a
  limit before the application is called (a 100 MB header was read whole, four at once
  pushed a worker past 1 GB). h11 has a limit (``h11_max_incomplete_event_size``) but answers
  400, and BentoML 1.4 passes no HTTP option to uvicorn at all.
* **Unknown paths.** BentoML's metrics middleware, the outermost layer, labels every request
  with its raw path: each unique unknown URL adds series to ``/metrics`` for good (5,000 of
  them grew it from 184 KB to 20 MB and its answer time to 8 s).

So :class:`LimitedHttpToolsProtocol`, uvicorn's httptools protocol with a cap on the bytes
received before a request's headers are complete (431 past it, memory bounded by the cap plus
one socket read), wraps the application in :class:`KnownPaths`, which answers 404 itself for
any path outside the allowed set, before BentoML counts it. :func:`install` makes it the
protocol uvicorn's ``http="auto"`` resolves to; call it at import of the service module,
which BentoML's worker imports before it creates its uvicorn server.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from visrec.serving.errors import HeadersTooLarge, NotFound, error_body, send_error

logger = logging.getLogger(__name__)

DEFAULT_MAX_HEADER_BYTES = 64 * 1024


class KnownPaths:
    """ASGI wrapper: 404 (JSON) for paths that are neither in ``exact`` nor under a ``prefixes`` entry."""

    def __init__(self, app, exact: Iterable[str], prefixes: Iterable[str] = ()) -> None:
        self.app = app
        self.exact = frozenset(exact)
        self.prefixes = tuple(prefixes)

    def allowed(self, path: str) -> bool:
        return path in self.exact or path.startswith(self.prefixes)

    async def __call__(self, scope, receive, send) -> None:
        if scope.get("type") == "http" and not self.allowed(scope.get("path", "")):
            return await send_error(send, NotFound("no such endpoint: see /docs.json for the API"))
        await self.app(scope, receive, send)


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header-size cap (431) and :class:`KnownPaths` in front.

    Class attributes set by :func:`install` (one configuration per worker process)."""

    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    known_paths: tuple[frozenset[str], tuple[str, ...]] | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pending_header_bytes = 0
        self._in_headers = True  # a connection starts with a request line and headers
        self._heads = 0  # request heads and messages completed on this connection
        if self.known_paths is not None:
            self.app = KnownPaths(self.app, *self.known_paths)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._heads += 1
        self._pending_header_bytes = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_headers = True  # the next bytes on this connection are a new request's head
        self._pending_header_bytes = 0
        self._heads += 1

    def data_received(self, data: bytes) -> None:
        # Bytes received while a request head is incomplete are counted; once they pass the cap
        # the connection is answered 431 and closed (the parser never sees more than the cap
        # plus one read). A read in which a head or a message completed (it may carry body bytes,
        # or the end of a body and the start of the next head) is not counted.
        if self._in_headers and self._pending_header_bytes > self.max_header_bytes:
            return self._refuse_headers()
        heads = self._heads
        super().data_received(data)
        if (self._in_headers and self._heads == heads and self.transport is not None
                and not self.transport.is_closing()):
            self._pending_header_bytes += len(data)
            if self._pending_header_bytes > self.max_header_bytes:
                self._refuse_headers()

    def _refuse_headers(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        error = HeadersTooLarge(f"request line and headers exceed {self.max_header_bytes} bytes")
        body = error_body(str(error))
        self.logger.warning("refused a request from %s: %s", self.client, error)
        self.transport.write(b"".join([
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n", b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n", b"connection: close\r\n\r\n", body]))
        self.transport.close()


def install(max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES, exact: Iterable[str] | None = None,
            prefixes: Iterable[str] = ()) -> None:
    """Make uvicorn's ``http="auto"`` (what BentoML's worker uses) resolve to
    :class:`LimitedHttpToolsProtocol` with these limits; ``exact``/``prefixes`` None: all paths."""
    import uvicorn.config

    LimitedHttpToolsProtocol.max_header_bytes = int(max_header_bytes)
    LimitedHttpToolsProtocol.known_paths = (None if exact is None else (frozenset(exact), tuple(prefixes)))
    uvicorn.config.HTTP_PROTOCOLS["auto"] = f"{__name__}:LimitedHttpToolsProtocol"


__all__ = ["DEFAULT_MAX_HEADER_BYTES", "KnownPaths", "LimitedHttpToolsProtocol", "install"]
