"""API keys: the key file's records, how a secret is checked, and which models and limits a key has.

The file (JSON, written only by ``python -m cluster.keys``; mode 0600) holds per key an id, a random salt and
``sha256(salt || secret)``: never the secret. A secret is ``sk-mf-<id>.<43 url-safe chars>`` (256 random
bits): the id in it finds the record without trying every salt, and 256 bits make a fast salted hash as
safe as a slow one (no dictionary to attack; the salt stops precomputed tables and equal hashes between
files). Rotation keeps the previous hash for a grace period, so clients can move over without an outage.

Example:
    >>> secret, rec = new_key("team-a", models=("tiny-*",), limits=Limits(rpm=60, tpm=10_000), now=0.0)
    >>> table = KeyTable([rec])
    >>> grant = table.check(secret, now=1.0)
    >>> grant.key_id, grant.may_use("tiny-code-llama"), grant.may_use("other")
    ('team-a', True, False)
    >>> table.check(secret[:-1] + ("A" if secret[-1] != "A" else "B"), now=1.0)
    Traceback (most recent call last):
    ...
    deployments.messages.ServeError: invalid API key: unknown key or wrong secret
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from deployments.messages import ErrorInfo, ServeError

PREFIX = "sk-mf-"
KEY_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
PERIODS = ("hour", "day", "week", "month")
FILE_VERSION = 1


@dataclass(frozen=True)
class Limits:
    """Per minute: requests and tokens (prompt + completion); None: unlimited."""

    rpm: int | None = None
    tpm: int | None = None

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be a positive integer or null, not {v!r}")


@dataclass(frozen=True)
class Quota:
    """At most ``tokens`` tokens per calendar ``period`` (UTC), then 429 ``insufficient_quota``."""

    tokens: int
    period: str = "month"

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, int) or self.tokens < 1:
            raise ValueError(f"quota tokens must be a positive integer, not {self.tokens!r}")
        if self.period not in PERIODS:
            raise ValueError(f"quota period must be one of {', '.join(PERIODS)}, not {self.period!r}")


@dataclass(frozen=True)
class KeyRecord:
    """One key as stored. ``models``: names or globs (fnmatch, case-sensitive) the key may use.
    ``model_limits``: glob -> Limits that also apply to the models matching it (first match)."""

    id: str
    salt: str  # hex
    hash: str  # hex sha256(salt || secret)
    models: tuple[str, ...] = ("*",)
    limits: Limits = field(default_factory=Limits)
    model_limits: tuple[tuple[str, Limits], ...] = ()
    quota: Quota | None = None
    expires_at: float | None = None  # unix time
    revoked: bool = False
    created_at: float = 0.0
    previous: tuple[str, str, float] | None = None  # (salt, hash, valid until): the secret before a rotation

    def __post_init__(self) -> None:
        if not KEY_ID.match(self.id):
            raise ValueError(f"key id {self.id!r} must be 1-64 characters of A-Z a-z 0-9 _ -")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["models"] = list(self.models)
        d["model_limits"] = {glob: asdict(lim) for glob, lim in self.model_limits}
        d["previous"] = list(self.previous) if self.previous else None
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> KeyRecord:
        unknown = set(d) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"key {d.get('id')!r}: unknown fields {sorted(unknown)}")
        prev = d.get("previous")
        return cls(id=d["id"], salt=d["salt"], hash=d["hash"], models=tuple(d.get("models", ("*",))),
                   limits=Limits(**(d.get("limits") or {})),
                   model_limits=tuple((g, Limits(**lim)) for g, lim in (d.get("model_limits") or {}).items()),
                   quota=Quota(**d["quota"]) if d.get("quota") else None, expires_at=d.get("expires_at"),
                   revoked=bool(d.get("revoked", False)), created_at=float(d.get("created_at", 0.0)),
                   previous=(prev[0], prev[1], float(prev[2])) if prev else None)


@dataclass(frozen=True)
class Grant:
    """What a checked key may do: the principal the pipeline carries (its id, never its secret)."""

    key_id: str
    models: tuple[str, ...]
    limits: Limits
    model_limits: tuple[tuple[str, Limits], ...] = ()
    quota: Quota | None = None

    def may_use(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)

    def model_scope(self, model: str) -> tuple[str, Limits] | None:
        """The first (glob, per-model limits) whose glob matches ``model``, if any."""
        return next(((g, lim) for g, lim in self.model_limits if model and fnmatch.fnmatchcase(model, g)), None)

    def limits_for(self, model: str) -> Limits | None:
        """The per-model limits that apply to ``model`` (first matching glob), if any."""
        scope = self.model_scope(model)
        return scope[1] if scope else None

    @property
    def limited(self) -> bool:
        return bool(self.limits.rpm or self.limits.tpm or self.quota or self.model_limits)


def digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


def new_secret(key_id: str) -> str:
    return f"{PREFIX}{key_id}.{secrets.token_urlsafe(32)}"


def new_key(key_id: str, now: float | None = None, **fields: Any) -> tuple[str, KeyRecord]:
    """A fresh secret and its record (the secret exists only in the return value)."""
    secret, salt = new_secret(key_id), secrets.token_hex(16)
    return secret, KeyRecord(key_id, salt, digest(salt, secret), created_at=time.time() if now is None else now,
                             **fields)


def rotated(rec: KeyRecord, grace_s: float, now: float | None = None) -> tuple[str, KeyRecord]:
    """A new secret for ``rec``; the old one stays valid for ``grace_s`` seconds (0: not at all)."""
    now = time.time() if now is None else now
    secret, salt = new_secret(rec.id), secrets.token_hex(16)
    previous = (rec.salt, rec.hash, now + grace_s) if grace_s > 0 else None
    return secret, replace(rec, salt=salt, hash=digest(salt, secret), previous=previous)


def unauthorized(message: str) -> ServeError:
    return ServeError(ErrorInfo(401, message, code="invalid_api_key"))


def key_id_of(secret: str) -> str | None:
    """The id a secret names (not proof of anything: only ``KeyTable.check`` is)."""
    if not secret.startswith(PREFIX):
        return None
    key_id, dot, rest = secret[len(PREFIX):].partition(".")
    return key_id if dot and rest and KEY_ID.match(key_id) else None


class KeyTable:
    """The keys of one file, by id."""

    def __init__(self, records: Iterable[KeyRecord] = ()) -> None:
        self.records = {r.id: r for r in records}

    def check(self, secret: str, now: float | None = None) -> Grant:
        """The key's grant, or 401 ``invalid_api_key`` (unknown, wrong secret, revoked, expired). A refusal of
        a key that exists carries its id (``ServeError.key_id``) for the audit log; never the secret."""
        now = time.time() if now is None else now
        key_id = key_id_of(secret)
        rec = self.records.get(key_id) if key_id else None
        if rec is None or not self._secret_matches(rec, secret, now):
            raise unauthorized("invalid API key: unknown key or wrong secret")
        if rec.revoked:
            raise _with_key(unauthorized(f"API key {rec.id!r} has been revoked"), rec.id)
        if rec.expires_at is not None and now >= rec.expires_at:
            raise _with_key(unauthorized(f"API key {rec.id!r} has expired"), rec.id)
        return Grant(rec.id, rec.models, rec.limits, rec.model_limits, rec.quota)

    @staticmethod
    def _secret_matches(rec: KeyRecord, secret: str, now: float) -> bool:
        if hmac.compare_digest(digest(rec.salt, secret), rec.hash):
            return True
        prev = rec.previous
        return prev is not None and now < prev[2] and hmac.compare_digest(digest(prev[0], secret), prev[1])


def _with_key(err: ServeError, key_id: str) -> ServeError:
    err.key_id = key_id  # type: ignore[attr-defined]
    return err


def load(path: str | os.PathLike) -> KeyTable:
    """The file's keys; ValueError naming the problem for a malformed file."""
    try:
        doc = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"key file {path}: not JSON ({err})") from None
    if not isinstance(doc, dict) or doc.get("version") != FILE_VERSION or not isinstance(doc.get("keys"), list):
        raise ValueError(f"key file {path}: expected {{'version': {FILE_VERSION}, 'keys': [...]}}")
    records = [KeyRecord.from_json(k) for k in doc["keys"]]
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError(f"key file {path}: repeated key ids")
    return KeyTable(records)


def save(path: str | os.PathLike, table: KeyTable) -> None:
    """Atomically (a reader sees the old file or the new one, never half), readable by the owner only."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"version": FILE_VERSION, "keys": [r.to_json() for r in table.records.values()]}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
