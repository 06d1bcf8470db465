"""``models:/`` URIs, MLflow's syntax: ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``models:/NAME/latest``.

Pure parsing, no database: the app builder tells a registry source from a folder with `is_model_uri` before it
opens anything. MLflow's stage names (``/Production``, ``/Staging``) are deprecated there and refused here:
aliases replace them. ``latest`` is the highest version that exists (it moves on every register), so a
deployment that must not move pins a number or an alias.

Example:
    >>> parse_uri("models:/tiny-code-llama/3")
    ModelURI(name='tiny-code-llama', version=3, alias=None)
    >>> str(parse_uri("models:/tiny-code-llama@production"))
    'models:/tiny-code-llama@production'
    >>> parse_uri("models:/tiny-code-llama/latest").latest
    True
    >>> try:
    ...     parse_uri("models:/tiny-code-llama/0")
    ... except RegistryError as err:
    ...     print(err)
    'models:/tiny-code-llama/0': version must be a positive integer (1, 2, ...) or 'latest', not '0'
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME = "models:/"
# The same rule as a served model's name (cluster/config.py _NAME), so a registered name can be served as is;
# it also keeps '/' and '@' out, which the URI syntax needs.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ALIAS_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
# 'latest' already means "highest version" in a URI; an alias of that name would shadow or be shadowed by it.
RESERVED_ALIASES = frozenset({"latest"})
_VERSION = re.compile(r"^[1-9][0-9]{0,17}$")  # no sign, no leading zero: one spelling per version


class RegistryError(ValueError):
    """A registry lookup or change that cannot be done; the message names the missing or offending thing."""


@dataclass(frozen=True)
class ModelURI:
    """A parsed ``models:/`` URI: a version number, an alias, or neither (``latest``)."""

    name: str
    version: int | None = None
    alias: str | None = None

    @property
    def latest(self) -> bool:
        return self.version is None and self.alias is None

    def __str__(self) -> str:
        if self.alias is not None:
            return f"{SCHEME}{self.name}@{self.alias}"
        return f"{SCHEME}{self.name}/{'latest' if self.version is None else self.version}"


def is_model_uri(source: str) -> bool:
    """Whether a config's ``source`` names a registry version rather than a folder or ``package:``."""
    return source.startswith("models:")


def check_model_name(name: str) -> str:
    if not MODEL_NAME.match(name):
        raise RegistryError(f"model name {name!r} must be 1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit")
    return name


def check_alias_name(alias: str) -> str:
    if not ALIAS_NAME.match(alias):
        raise RegistryError(f"alias {alias!r} must match {ALIAS_NAME.pattern} (a letter, then up to 63 of "
                            "A-Z a-z 0-9 _ -)")
    if alias in RESERVED_ALIASES:
        raise RegistryError(f"alias {alias!r} is reserved: models:/NAME/{alias} already means the highest version")
    return alias


def parse_version(text: str) -> int:
    """A version number as typed: ``1``, ``2``, ...; ``0``, ``-1``, ``01`` and ``v1`` are refused."""
    if not _VERSION.match(text):
        raise RegistryError(f"version must be a positive integer (1, 2, ...), not {text!r}")
    return int(text)


def parse_uri(uri: str) -> ModelURI:
    """``models:/NAME/VERSION``, ``models:/NAME/latest`` or ``models:/NAME@ALIAS``; anything else raises
    `RegistryError` saying which part is wrong."""
    if not uri.startswith(SCHEME) or uri.startswith(SCHEME + "/"):
        # 'models://x' would be MLflow's form with a registry profile; there is one registry here.
        raise RegistryError(f"{uri!r} is not a registry URI: expected models:/NAME/VERSION, models:/NAME/latest "
                            "or models:/NAME@ALIAS")
    rest = uri[len(SCHEME):]
    if not rest:
        raise RegistryError(f"{uri!r}: empty model name (models:/NAME/VERSION)")
    if "@" in rest:
        name, _, alias = rest.partition("@")
        if not alias:
            raise RegistryError(f"{uri!r}: empty alias after '@' (models:/NAME@ALIAS)")
        if "/" in alias or "@" in alias:
            raise RegistryError(f"{uri!r}: nothing may follow the alias (models:/NAME@ALIAS)")
        return ModelURI(_uri_name(uri, name), alias=_uri_alias(uri, alias))
    parts = rest.split("/")
    if len(parts) != 2:
        raise RegistryError(f"{uri!r}: expected models:/NAME/VERSION, models:/NAME/latest or models:/NAME@ALIAS "
                            f"({'no version or alias' if len(parts) < 2 else 'too many path parts'})")
    name, version = parts
    if not version:
        raise RegistryError(f"{uri!r}: empty version (models:/NAME/VERSION or models:/NAME/latest)")
    if version == "latest":
        return ModelURI(_uri_name(uri, name))
    if not _VERSION.match(version):
        raise RegistryError(f"{uri!r}: version must be a positive integer (1, 2, ...) or 'latest', not {version!r}")
    return ModelURI(_uri_name(uri, name), version=int(version))


def _uri_name(uri: str, name: str) -> str:
    if not name:
        raise RegistryError(f"{uri!r}: empty model name (models:/NAME/VERSION)")
    try:
        return check_model_name(name)
    except RegistryError as err:
        raise RegistryError(f"{uri!r}: {err}") from None


def _uri_alias(uri: str, alias: str) -> str:
    try:
        return check_alias_name(alias)
    except RegistryError as err:
        raise RegistryError(f"{uri!r}: {err}") from None
