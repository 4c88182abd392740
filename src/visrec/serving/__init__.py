"""Serving: what the BentoML shell (``bento/service.py``) passes its calls to.

* :mod:`visrec.serving.api`: the endpoints as plain Python, and the service's settings
* :mod:`visrec.serving.guard`: the request guard (sizes, token, form shape) before a body is read
* :mod:`visrec.serving.http`: header-size cap and known paths, below the ASGI application
* :mod:`visrec.serving.live`: the served models and gallery, following promotions and changes
* :mod:`visrec.serving.images`: upload decoding; :mod:`visrec.serving.errors`: typed HTTP errors

All plain Python, unit-tested without starting a server.
"""

from __future__ import annotations

import hmac

from visrec.serving.images import BadImageError, configure_pil, decode_upload

__all__ = ["BadImageError", "check_admin", "configure_pil", "decode_upload", "root_logging_kept"]

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


class root_logging_kept:  # noqa: N801 (a context manager used like a function)
    """``with root_logging_kept(): import paddle...``: undo the root log handlers and level that
    imports install (Paddle adds an INFO-level root handler), so the server's own logging
    configuration stays the one in force."""

    def __enter__(self):
        import logging

        self._root = logging.getLogger()
        self._state = (list(self._root.handlers), self._root.level)
        return self

    def __exit__(self, *exc) -> bool:
        for handler in [h for h in self._root.handlers if h not in self._state[0]]:
            self._root.removeHandler(handler)
        self._root.setLevel(self._state[1])
        return False
