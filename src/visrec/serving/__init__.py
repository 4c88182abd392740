"""Serving helpers shared by the BentoML service (``bento/service.py``): upload decoding, auth.

Both are plain Python so they are unit-tested without starting a server.
"""

from __future__ import annotations

import hmac
import json

from visrec.serving.images import BadImageError, configure_pil, decode_upload

__all__ = ["BadImageError", "BodySizeLimit", "check_admin", "configure_pil", "decode_upload", "labels_for_upload"]

ADMIN_TOKEN_ENV = "VISREC_ADMIN_TOKEN"


def check_admin(expected_token: str | None, authorization: str | None) -> tuple[int, str]:
    """Authorise a gallery mutation: ``(200, "")`` if allowed, else ``(status, message)``.

    No configured token (unset or empty) disables mutations (403) rather than leaving them
    open; a missing, malformed or wrong ``Authorization: Bearer <token>`` header is 401.
    The comparison is constant-time.
    """
    if not expected_token:
        return 403, (f"gallery changes are disabled on this server: set {ADMIN_TOKEN_ENV} in the server's "
                     "environment and send 'Authorization: Bearer <token>'")
    if not authorization:
        return 401, "missing 'Authorization: Bearer <token>' header"
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return 401, "the Authorization header must be 'Bearer <token>'"
    if not hmac.compare_digest(token.strip().encode("utf-8"), expected_token.encode("utf-8")):
        return 401, "invalid admin token"
    return 200, ""


def labels_for_upload(count: int, label: object = None, labels: list | None = None) -> list[str]:
    """One label per uploaded image, from ``label`` (for all) or ``labels`` (one each, in order).

    Raises ValueError naming the problem: neither or both given, a count mismatch, an empty label.
    """
    if (label is None) == (labels is None):
        raise ValueError("give exactly one of 'label' (for every image) or 'labels' (a JSON list, one per image)")
    names = [str(label)] * count if labels is None else [str(x) for x in labels]
    if len(names) != count:
        raise ValueError(f"{len(names)} labels for {count} images: give one label per image")
    if any(not name.strip() for name in names):
        raise ValueError("labels must be non-empty strings")
    return names


class BodySizeLimit:
    """ASGI middleware: refuse a request whose declared ``Content-Length`` exceeds a limit (413).

    The multipart parser writes a whole upload to temporary files before the API sees it, so
    the per-file check in the API alone would let a client fill the disk; this answers from the
    header, before the body is read. ``limits`` maps exact paths to their own limits (e.g. a
    multi-file endpoint); other paths get ``default_limit``. A chunked body (no Content-Length)
    passes through: the API's per-file size check still applies to it.
    """

    def __init__(self, app, default_limit: int, limits: dict[str, int] | None = None) -> None:
        self.app = app
        self.default_limit = int(default_limit)
        self.limits = dict(limits or {})

    async def __call__(self, scope, receive, send) -> None:
        if scope.get("type") == "http":
            limit = self.limits.get(scope.get("path", ""), self.default_limit)
            declared = dict(scope.get("headers") or []).get(b"content-length", b"")
            if declared.isdigit() and int(declared) > limit:
                body = json.dumps({"error": f"request body too large: {int(declared)} bytes, the limit for "
                                            f"{scope.get('path')} is {limit} bytes"}).encode()
                await send({"type": "http.response.start", "status": 413,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()),
                                        (b"connection", b"close")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
