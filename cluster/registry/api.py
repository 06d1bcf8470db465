"""What a registry is, apart from where it keeps things: the frozen records and the `Registry` protocol.

`store.SqliteRegistry` implements the protocol over a sqlite file; an MLflow-backed class can implement it too
(it needs only these records and `RegistryError`, nothing of sqlite). Times are Unix seconds; `iso` renders them.

Example:
    >>> v = ModelVersion("tiny", 2, "ab" * 32, "/models/tiny", 0.0, aliases=("production",))
    >>> (v.uri, iso(v.created_at))
    ('models:/tiny/2', '1970-01-01T00:00:00Z')
    >>> ResolvedVersion("tiny", 2, v.sha256, v.source, alias="production").uri
    'models:/tiny/2'
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from cluster.registry.uri import ModelURI, RegistryError


def iso(t: float) -> str:
    """A record's time as people and JSON read it: ``2027-01-31T12:00:00Z``."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class ModelVersion:
    """One immutable version: ``sha256`` and ``source`` (the folder's absolute real path) never change; tags and
    metrics only gain entries; ``aliases`` are the ones pointing at it when it was read."""

    model: str
    version: int
    sha256: str
    source: str
    created_at: float
    description: str = ""
    tags: Mapping[str, str] = field(default_factory=dict, hash=False)
    metrics: Mapping[str, float] = field(default_factory=dict, hash=False)
    aliases: tuple[str, ...] = ()

    @property
    def uri(self) -> str:
        return str(ModelURI(self.model, self.version))


@dataclass(frozen=True)
class RegisteredModel:
    """A model name, the version numbers it has now (deleted ones gone, never reused), its aliases -> version."""

    name: str
    created_at: float
    versions: tuple[int, ...]
    aliases: Mapping[str, int] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class Alias:
    """``alias`` of ``model`` points at ``version`` since ``moved_at``."""

    model: str
    alias: str
    version: int
    moved_at: float


@dataclass(frozen=True)
class AliasMove:
    """One row of an alias's history; ``version`` None: the alias was deleted then."""

    model: str
    alias: str
    version: int | None
    moved_at: float


@dataclass(frozen=True)
class Pin:
    """App ``app`` serves ``model`` version ``version`` under the name ``served_name``."""

    app: str
    served_name: str
    model: str
    version: int
    pinned_at: float


@dataclass(frozen=True)
class ResolvedVersion:
    """What a ``models:/`` URI names now; ``alias`` is the one it went through, if any."""

    model: str
    version: int
    sha256: str
    source: str
    alias: str | None = None

    @property
    def uri(self) -> str:
        return str(ModelURI(self.model, self.version))


class VersionInUse(RegistryError):
    """A delete refused: the version is pinned by an app, or (without force) an alias points at it."""

    def __init__(self, message: str, pins: tuple[Pin, ...], aliases: tuple[str, ...]) -> None:
        super().__init__(message)
        self.pins, self.aliases = pins, aliases


class Registry(Protocol):
    """What the app builder and the CLI need; `SqliteRegistry` is one, an MLflow-backed class can be another."""

    def register(self, model: str, folder: str | os.PathLike[str], *, description: str = "",
                 tags: Mapping[str, str] | None = None, metrics: Mapping[str, float] | None = None,
                 alias: str | None = None, force_new: bool = False) -> tuple[ModelVersion, bool]: ...
    def models(self) -> list[RegisteredModel]: ...
    def versions(self, model: str) -> list[ModelVersion]: ...
    def get_version(self, model: str, version: int) -> ModelVersion: ...
    def verify(self, model: str, version: int) -> bool: ...
    def set_tags(self, model: str, version: int, tags: Mapping[str, str]) -> ModelVersion: ...
    def set_metrics(self, model: str, version: int, metrics: Mapping[str, float]) -> ModelVersion: ...
    def set_alias(self, model: str, alias: str, version: int) -> Alias: ...
    def delete_alias(self, model: str, alias: str) -> Alias: ...
    def aliases(self, model: str) -> list[Alias]: ...
    def alias_history(self, model: str, alias: str | None = None) -> list[AliasMove]: ...
    def resolve(self, uri: str | ModelURI) -> ResolvedVersion: ...
    def pin(self, app: str, served_name: str, model: str, version: int) -> Pin: ...
    def unpin_app(self, app: str) -> list[Pin]: ...
    def pins_of(self, model: str, version: int | None = None) -> list[Pin]: ...
    def delete_version(self, model: str, version: int, *, force: bool = False,
                       still_served: Callable[[Pin], bool] = lambda pin: True) -> ModelVersion: ...


def check_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """Tags as stored: non-empty string keys, string values (a backend refuses the same things alike)."""
    if bad := [(k, v) for k, v in tags.items() if not isinstance(k, str) or not k or not isinstance(v, str)]:
        raise RegistryError(f"tag {bad[0][0]!r}={bad[0][1]!r}: keys are non-empty strings, values strings")
    return dict(tags)


def check_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """Metrics as stored: finite floats (NaN would not survive JSON, and cannot be compared)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if not isinstance(k, str) or not k or isinstance(v, bool) or not isinstance(v, int | float) \
                or not math.isfinite(v):
            raise RegistryError(f"metric {k!r}={v!r}: names are non-empty strings, values finite numbers")
        out[k] = float(v)
    return out
