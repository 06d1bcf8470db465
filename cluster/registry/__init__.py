"""The local model registry: immutable model versions, moving aliases, and ``models:/`` URIs (issue 15).

``uri`` parses ``models:/NAME/VERSION``, ``models:/NAME/latest`` and ``models:/NAME@ALIAS``; ``digest`` hashes a
model folder; ``api`` holds the frozen records and the `Registry` protocol; ``store`` keeps them in one sqlite
file; ``python -m cluster.registry`` is the CLI. Stdlib only: nothing here imports deployments or parallel.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "config.json").write_text("{}")
    >>> reg = open_registry(folder.parent / f"{folder.name}.db")
    >>> reg.register("tiny", folder)[0].uri
    'models:/tiny/1'
    >>> reg.resolve("models:/tiny/latest").source == str(folder.resolve())
    True
"""

from __future__ import annotations

import os
from pathlib import Path

from cluster.registry.api import (
    Alias,
    AliasMove,
    ModelVersion,
    Pin,
    RegisteredModel,
    Registry,
    ResolvedVersion,
    VersionInUse,
    iso,
)
from cluster.registry.digest import folder_sha256
from cluster.registry.store import SqliteRegistry
from cluster.registry.uri import ModelURI, RegistryError, is_model_uri, parse_uri

ENV_VAR = "MODELFLEET_REGISTRY"
DEFAULT_FILE = "registry.db"


def default_path() -> Path:
    """``$MODELFLEET_REGISTRY``, else ``registry.db`` in the working directory."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_FILE)


def open_registry(path: str | os.PathLike[str] | None = None) -> Registry:
    """The registry at ``path`` (default: `default_path`); the one place that picks a backend."""
    return SqliteRegistry(default_path() if path is None else path)


__all__ = [
    "DEFAULT_FILE", "ENV_VAR", "Alias", "AliasMove", "ModelURI", "ModelVersion", "Pin", "RegisteredModel", "Registry",
    "RegistryError", "ResolvedVersion", "SqliteRegistry", "VersionInUse", "default_path", "folder_sha256",
    "is_model_uri", "iso", "open_registry", "parse_uri",
]
