"""``python -m cluster.registry``: register model folders as immutable versions, move aliases, resolve URIs.

The file is ``--db PATH``, else ``$MODELFLEET_REGISTRY``, else ``registry.db`` in the working directory. Data
(URIs, tables, JSON) goes to stdout, what happened to stderr::

    python -m cluster.registry --db reg.db register tiny models/tiny-code-llama --metric eval_loss=1.92 \\
        --tag dataset=code-v3 --alias canary          # prints models:/tiny/1
    python -m cluster.registry --db reg.db list                  # models; `list tiny`: its versions
    python -m cluster.registry --db reg.db alias tiny production @canary   # or a number, or latest
    python -m cluster.registry --db reg.db history tiny production         # where it pointed, for a rollback
    python -m cluster.registry --db reg.db show tiny@production            # JSON, with the pins
    python -m cluster.registry --db reg.db resolve models:/tiny@production # JSON: version, sha256, source
    python -m cluster.registry --db reg.db delete tiny 1        # refused while pinned or aliased (--force: aliases)

Example:
    >>> import tempfile, contextlib, io, json
    >>> from pathlib import Path
    >>> tmp = Path(tempfile.mkdtemp())
    >>> _ = (tmp / "m").mkdir(), (tmp / "m" / "config.json").write_text("{}")
    >>> db = str(tmp / "reg.db")
    >>> out, err = io.StringIO(), io.StringIO()
    >>> with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    ...     main(["--db", db, "register", "tiny", str(tmp / "m"), "--alias", "production"])
    ...     main(["--db", db, "resolve", "models:/tiny@production"])
    >>> lines = out.getvalue().splitlines()
    >>> lines[0], json.loads("".join(lines[1:]))["version"]
    ('models:/tiny/1', 1)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cluster.registry import default_path
from cluster.registry.api import ModelVersion, Pin, iso
from cluster.registry.store import SqliteRegistry
from cluster.registry.uri import RegistryError, parse_uri, parse_version


def key_value(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` (the value may hold ``=``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def metric(text: str) -> tuple[str, float]:
    """``NAME=NUMBER``."""
    name, value = key_value(text)
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=NUMBER") from None


def version_number(text: str) -> int:
    try:
        return parse_version(text)
    except RegistryError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def ref_uri(name: str, ref: str) -> str:
    """A version as typed after a model name, ``3``, ``latest`` or ``@canary``, as a ``models:/`` URI."""
    return f"models:/{name}@{ref[1:]}" if ref.startswith("@") else f"models:/{name}/{ref}"


def version_json(v: ModelVersion, pins: list[Pin]) -> dict[str, Any]:
    return {"uri": v.uri, **asdict(v), "created_at": iso(v.created_at), "aliases": list(v.aliases),
            "pins": [{**asdict(p), "pinned_at": iso(p.pinned_at)} for p in pins]}


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False))


def _list(reg: SqliteRegistry, name: str | None) -> None:
    if name is None:
        print(f"{'model':<32} {'versions':>8} {'latest':>6} {'created':<20}  aliases")
        for m in reg.models():
            aliases = ", ".join(f"{a}->{v}" for a, v in m.aliases.items())
            print(f"{m.name:<32} {len(m.versions):>8} {m.versions[-1] if m.versions else '-':>6} "
                  f"{iso(m.created_at):<20}  {aliases}".rstrip())
        return
    print(f"{'version':>7} {'sha256':<12} {'created':<20} {'aliases':<24} tags")
    for v in reg.versions(name):
        tags = " ".join(f"{k}={val}" for k, val in v.tags.items())
        print(f"{v.version:>7} {v.sha256[:12]:<12} {iso(v.created_at):<20} {','.join(v.aliases) or '-':<24} "
              f"{tags}".rstrip())


def _show(reg: SqliteRegistry, what: str) -> None:
    cut = next((i for i, ch in enumerate(what) if ch in "/@"), None)
    if cut is not None:
        r = reg.resolve(ref_uri(what[:cut], what[cut:] if what[cut] == "@" else what[cut + 1:]))
        _print_json(version_json(reg.get_version(r.model, r.version), reg.pins_of(r.model, r.version)))
        return
    versions = reg.versions(what)  # raises, naming the models there are, when unknown
    model = next(m for m in reg.models() if m.name == what)
    _print_json({"model": model.name, "created_at": iso(model.created_at), "aliases": dict(model.aliases),
                 "versions": [version_json(v, reg.pins_of(v.model, v.version)) for v in versions],
                 "alias_history": [{"alias": h.alias, "version": h.version, "moved_at": iso(h.moved_at)}
                                   for h in reg.alias_history(model.name)]})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m cluster.registry", description=__doc__.split("\n\n")[0])
    p.add_argument("--db", type=Path, default=None, help="the registry file (default: $MODELFLEET_REGISTRY, "
                   "else ./registry.db)")
    # --db after the subcommand too; SUPPRESS keeps a subparser's absent --db from hiding the main one's.
    db = argparse.ArgumentParser(add_help=False)
    db.add_argument("--db", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("register", parents=[db], help="register a folder as a version (same content: same one)")
    c.add_argument("name")
    c.add_argument("folder", type=Path)
    c.add_argument("--description", default="")
    c.add_argument("--tag", type=key_value, action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--metric", type=metric, action="append", default=[], metavar="NAME=NUMBER")
    c.add_argument("--alias", help="point this alias at the version (e.g. canary, production)")
    c.add_argument("--force-new", action="store_true", help="a new version even if the content is registered")
    c = sub.add_parser("list", parents=[db], help="the models, or one model's versions")
    c.add_argument("name", nargs="?")
    c = sub.add_parser("show", parents=[db], help="JSON of NAME, NAME/VERSION, NAME/latest or NAME@ALIAS")
    c.add_argument("what")
    c = sub.add_parser("history", parents=[db], help="alias moves, oldest first")
    c.add_argument("name")
    c.add_argument("alias", nargs="?")
    c = sub.add_parser("alias", parents=[db], help="move an alias to VERSION (a number, latest or @ALIAS)")
    c.add_argument("name")
    c.add_argument("alias")
    c.add_argument("version", nargs="?")
    c.add_argument("--delete", action="store_true", help="remove the alias instead")
    c = sub.add_parser("delete", parents=[db], help="delete a version (refused while pinned or aliased)")
    c.add_argument("name")
    c.add_argument("version", type=version_number)
    c.add_argument("--force", action="store_true", help="delete the aliases pointing at it too (never a pin)")
    for name, kind, meta in (("tag", key_value, "KEY=VALUE"), ("metric", metric, "NAME=NUMBER")):
        c = sub.add_parser(name, parents=[db], help=f"add {name}s to a version")
        c.add_argument("name")
        c.add_argument("version", type=version_number)
        c.add_argument("values", type=kind, nargs="+", metavar=meta)
    c = sub.add_parser("resolve", parents=[db], help="JSON of what a models:/ URI names now")
    c.add_argument("uri")
    c = sub.add_parser("verify", parents=[db], help="re-hash a version's folder; exit 1 if it changed")
    c.add_argument("name")
    c.add_argument("version", type=version_number)
    args = p.parse_args(argv)
    reg = SqliteRegistry(args.db or default_path())
    try:
        if args.cmd == "register":
            v, created = reg.register(args.name, args.folder, description=args.description, tags=dict(args.tag),
                                      metrics=dict(args.metric), alias=args.alias, force_new=args.force_new)
            print(v.uri)
            print(f"registered {v.uri} (sha256 {v.sha256[:12]})" if created else
                  f"{v.uri} already holds this content (sha256 {v.sha256[:12]}, from {v.source}); "
                  "--force-new makes a new version", file=sys.stderr)
        elif args.cmd == "list":
            _list(reg, args.name)
        elif args.cmd == "show":
            _show(reg, args.what)
        elif args.cmd == "history":
            for h in reg.alias_history(args.name, args.alias):
                print(f"{iso(h.moved_at)}  {h.alias:<24} {'(deleted)' if h.version is None else h.version}")
        elif args.cmd == "alias" and args.delete:
            if args.version is not None:
                p.error("alias --delete takes no VERSION")
            gone = reg.delete_alias(args.name, args.alias)
            print(f"deleted alias {args.alias!r} of {args.name!r} (it pointed at {gone.version})", file=sys.stderr)
        elif args.cmd == "alias":
            if args.version is None:
                p.error("alias needs a VERSION (a number, latest or @ALIAS), or --delete")
            target = reg.resolve(parse_uri(ref_uri(args.name, args.version)))
            before = {a.alias: a.version for a in reg.aliases(args.name)}.get(args.alias)
            a = reg.set_alias(args.name, args.alias, target.version)
            print(f"alias {a.alias!r} of {a.model!r}: {before or '(new)'} -> {a.version}", file=sys.stderr)
        elif args.cmd == "delete":
            gone = reg.delete_version(args.name, args.version, force=args.force)
            print(f"deleted {gone.uri} (sha256 {gone.sha256[:12]})"
                  + (f"; and its aliases {', '.join(gone.aliases)}" if gone.aliases else ""), file=sys.stderr)
        elif args.cmd == "tag":
            reg.set_tags(args.name, args.version, dict(args.values))
        elif args.cmd == "metric":
            reg.set_metrics(args.name, args.version, dict(args.values))
        elif args.cmd == "resolve":
            r = reg.resolve(args.uri)
            _print_json({"uri": r.uri, **asdict(r)})
        elif args.cmd == "verify":
            v = reg.get_version(args.name, args.version)
            if not reg.verify(args.name, args.version):
                p.exit(1, f"{v.uri}: {v.source} no longer holds the registered content (sha256 {v.sha256[:12]})\n")
            print(f"{v.uri}: {v.source} matches sha256 {v.sha256[:12]}", file=sys.stderr)
    except RegistryError as err:
        p.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main()
