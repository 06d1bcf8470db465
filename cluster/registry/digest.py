"""The sha256 of a model folder: what makes a registered version's content checkable and its identity stable.

What is hashed: every regular file under the folder, at any depth, hidden ones (``.gitattributes``, ``.cache``)
included; nothing is skipped. Symbolic links are followed (a Hugging Face cache snapshot is links into
``blobs/``, and what serves is the content, not the link); a link that loops back to a folder already being
walked is refused rather than followed forever. Per file, in the order of the relative POSIX paths (``/``
separated, compared as UTF-8 bytes, so the digest does not depend on the platform or the directory order), the
outer hash takes ``<relative path> NUL <sha256 of the content, hex> LF``. Hashing each file on its own keeps the
framing unambiguous (no path/content boundary to forge) and lets files be read in 1 MiB chunks. Names and
contents only: modes, owners, times and empty folders do not count, so a copy (``cp -r``, ``rsync``, another
machine) hashes the same. Anything that is neither a file nor a folder (a socket, a device, a dangling link)
raises `RegistryError`.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> a, b = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
    >>> for root in (a, b):
    ...     _ = (root / "config.json").write_text("{}")
    >>> folder_sha256(a) == folder_sha256(b)
    True
    >>> _ = (b / "config.json").write_text('{"changed": 1}')
    >>> folder_sha256(a) == folder_sha256(b)
    False
    >>> len(folder_sha256(a))
    64
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from cluster.registry.uri import RegistryError

CHUNK = 1 << 20


def folder_files(folder: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """``(relative POSIX path, path)`` of each regular file under ``folder``, sorted as hashed."""
    root = Path(folder)
    if not root.is_dir():
        raise RegistryError(f"{str(root)!r} is not a folder")
    found: list[tuple[str, Path]] = []
    # Real paths of the folders on the current walk: a link back to one of them would recurse forever.
    _walk(root, "", {os.path.realpath(root)}, found)
    # Sorted on the encoded bytes, not on str, so that the order is the same on every platform and locale.
    found.sort(key=lambda item: item[0].encode("utf-8", "surrogateescape"))
    return found


def _walk(folder: Path, prefix: str, ancestors: set[str], found: list[tuple[str, Path]]) -> None:
    with os.scandir(folder) as entries:
        for entry in entries:
            rel, path = prefix + entry.name, Path(entry.path)
            try:
                mode = os.stat(path).st_mode  # follows links: a link counts as what it points at
            except OSError as err:
                raise RegistryError(f"cannot hash {str(path)!r}: {err.strerror or err}") from None
            if stat.S_ISREG(mode):
                found.append((rel, path))
            elif stat.S_ISDIR(mode):
                real = os.path.realpath(path)
                if real in ancestors:
                    raise RegistryError(f"cannot hash {str(path)!r}: a link back to a folder above it")
                _walk(path, rel + "/", ancestors | {real}, found)
            else:
                raise RegistryError(f"cannot hash {str(path)!r}: neither a file nor a folder")


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        # Chunks, not f.read(): model weights are gigabytes.
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def folder_sha256(folder: str | os.PathLike[str]) -> str:
    """The folder's digest, 64 hex digits (see the module docstring for exactly what goes in)."""
    outer = hashlib.sha256()
    for rel, path in folder_files(folder):
        outer.update(rel.encode("utf-8", "surrogateescape") + b"\0" + file_sha256(path).encode() + b"\n")
    return outer.hexdigest()
