"""Typed errors of the serving layer: each carries its HTTP status and a message safe to show a client.

Handlers raise them; the HTTP shell (``bento/service.py``, :mod:`visrec.serving.guard`) maps
``exc.status`` to the response status and ``str(exc)`` to the JSON body ``{"error": ...}``. No
status is ever chosen from the text of a message.
"""

from __future__ import annotations

import json


class ServiceError(Exception):
    """A request the service refuses; ``status`` is its HTTP status."""

    status = 500

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})

    def __str__(self) -> str:
        return self.message


class BadRequest(ServiceError, ValueError):
    status = 400


class Unauthorized(ServiceError):
    status = 401


class Forbidden(ServiceError):
    status = 403


class NotFound(ServiceError):
    status = 404


class MethodNotAllowed(ServiceError):
    status = 405


class Conflict(ServiceError):
    status = 409


class PayloadTooLarge(ServiceError):
    status = 413


class UnsupportedMediaType(ServiceError):
    status = 415


class UnprocessableContent(ServiceError):
    status = 422


class HeadersTooLarge(ServiceError):
    status = 431


class Unavailable(ServiceError):
    status = 503


def error_body(message: str) -> bytes:
    """The JSON body of every error answer: ``{"error": message}``."""
    return json.dumps({"error": message}, ensure_ascii=False).encode("utf-8")


async def send_error(send, exc: ServiceError) -> None:
    """Send ``exc`` as a complete ASGI HTTP response (JSON body, connection closed)."""
    body = error_body(str(exc))
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close"),
               *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items())]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
