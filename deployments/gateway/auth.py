"""The authentication stage: the caller's API key -> its ``Grant`` (id, models, limits), or 401.

Keys come from the key file (``deployments/gateway/keys.py``; written by ``python -m cluster.keys``). Every
process that answers HTTP (router replicas, model replicas on the direct path) checks the file's identity
(inode, size, mtime) at most every ``reload_s`` and reloads it when it changed, so a created, revoked or
rotated key takes effect within about a second everywhere, without restarting anything. A file that stops
parsing is logged and the previous table kept (a half-edited file must not open or close the gate).

The key is accepted as ``Authorization: Bearer <key>`` (what the official clients send) or ``x-api-key``.
Nothing here logs a header or a secret; a refusal names the key's id only once the secret proved it.

Example:
    >>> import asyncio, tempfile, os
    >>> from deployments.gateway import keys
    >>> secret, rec = keys.new_key("ci")
    >>> path = os.path.join(tempfile.mkdtemp(), "keys.json"); keys.save(path, keys.KeyTable([rec]))
    >>> auth = KeyAuthenticator(path)
    >>> asyncio.run(auth.authenticate("r1", {"authorization": f"Bearer {secret}"}, "/v1/models")).key_id
    'ci'
    >>> asyncio.run(auth.authenticate("r2", {}, "/v1/models"))
    Traceback (most recent call last):
    ...
    deployments.messages.ServeError: missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key'
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping

from deployments.gateway import keys
from deployments.gateway.keys import Grant, KeyTable
from deployments.messages import ErrorInfo, ServeError

logger = logging.getLogger("ray.serve")

PUBLIC_ROUTES = frozenset({"/health"})


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The secret a request carries (lower-case header names), or None."""
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return headers.get("x-api-key", "").strip() or None


class KeyAuthenticator:
    """``Pipeline``'s Authenticator for a key file; ``public``: routes that answer without a key."""

    def __init__(self, path: str, reload_s: float = 1.0, public: Iterable[str] = PUBLIC_ROUTES) -> None:
        self.path, self.reload_s, self.public = path, reload_s, frozenset(public)
        self.table: KeyTable | None = None
        self._identity: tuple[int, int, int] | None = None
        self._checked = 0.0
        self.reloads = 0
        self._maybe_reload(force=True)

    def _maybe_reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < self.reload_s:
            return
        self._checked = now
        try:
            st = os.stat(self.path)
        except OSError as err:
            if self.table is not None or force:
                logger.error("API key file %s cannot be read (%s): %s", self.path, type(err).__name__,
                             "keeping the keys loaded before" if self.table is not None else "no key is valid")
            return
        identity = (st.st_ino, st.st_size, st.st_mtime_ns)
        if identity == self._identity:
            return
        try:
            table = keys.load(self.path)
        except (ValueError, KeyError, TypeError, OSError) as err:
            logger.error("API key file %s is invalid (%s); %s", self.path, err,
                         "keeping the keys loaded before" if self.table is not None else "no key is valid")
            return
        self.table, self._identity = table, identity
        self.reloads += 1
        logger.info("API keys loaded from %s: %d keys", self.path, len(table.records))

    async def authenticate(self, request_id: str, headers: Mapping[str, str], route: str) -> Grant | None:
        if route in self.public:
            return None
        self._maybe_reload()
        secret = presented_key(headers)
        if secret is None:
            raise missing_key()
        if self.table is None:
            raise keys.unauthorized("invalid API key: no keys are loaded on this server")
        return self.table.check(secret)


def missing_key() -> ServeError:
    return ServeError(ErrorInfo(401, "missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key'",
                                code="invalid_api_key", extra_headers=(("WWW-Authenticate", "Bearer"),)))


def forbidden(grant: Grant, model: str) -> ServeError:
    """403: the key is valid but may not use ``model`` (said whether or not the model exists, so a key
    cannot probe which models a cluster serves)."""
    err = ServeError(ErrorInfo(403, f"API key {grant.key_id!r} may not use model {model!r}", param="model",
                               code="model_not_allowed"))
    err.key_id = grant.key_id  # type: ignore[attr-defined]
    return err


def visible(grant: object, models: Iterable[str]) -> list[str]:
    """The models a caller may see (``/v1/models``): all without a key, else those its key allows."""
    return [m for m in models if not isinstance(grant, Grant) or grant.may_use(m)]


def check_model(grant: object, model: object) -> None:
    """Raise 403 when an authenticated caller names a model its key does not allow."""
    if isinstance(grant, Grant) and isinstance(model, str) and not grant.may_use(model):
        raise forbidden(grant, model)
