"""``python -m cluster.keys``: create, list, update, revoke and rotate the API keys of a key file.

The file holds salted hashes only (``deployments/gateway/keys.py``); a new or rotated secret is printed once,
on stdout, and exists nowhere else. Running clusters pick changes up within ``gateway.auth.reload_s``::

    python -m cluster.keys create --file keys.json --id team-a --models 'tiny-*' --rpm 60 --tpm 20000
    python -m cluster.keys create --file keys.json --id ci --quota 1000000 --period day --expires-in 30d
    python -m cluster.keys update --file keys.json --id team-a --model-limit 'tiny-code-*:rpm=10,tpm=5000'
    python -m cluster.keys list --file keys.json
    python -m cluster.keys rotate --file keys.json --id team-a --grace 1h   # the old secret works 1 more hour
    python -m cluster.keys revoke --file keys.json --id ci

Example:
    >>> import tempfile, os, contextlib, io
    >>> path = os.path.join(tempfile.mkdtemp(), "keys.json")
    >>> out = io.StringIO()
    >>> with contextlib.redirect_stdout(out):
    ...     main(["create", "--file", path, "--id", "demo", "--rpm", "5"])
    >>> out.getvalue().startswith("sk-mf-demo.")
    True
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from deployments.gateway import keys
from deployments.gateway.keys import KeyRecord, KeyTable, Limits, Quota

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration_s(text: str) -> float:
    """``90s``, ``15m``, ``1h``, ``30d``, ``2w`` in seconds."""
    m = _DURATION.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30s, 15m, 1h, 30d, 2w")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


def timestamp(text: str) -> float:
    """An ISO date or time (``2027-01-31``, ``2027-01-31T12:00:00Z``), UTC unless it says otherwise."""
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO date or time") from None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


def model_limit(text: str) -> tuple[str, Limits]:
    """``GLOB:rpm=10,tpm=5000``."""
    glob, sep, rest = text.rpartition(":")
    try:
        values = dict(part.split("=", 1) for part in rest.split(",") if part)
        if not sep or not glob or set(values) - {"rpm", "tpm"}:
            raise ValueError
        return glob, Limits(**{k: int(v) for k, v in values.items()})
    except (ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"{text!r} is not GLOB:rpm=N,tpm=N") from None


@contextlib.contextmanager
def locked(path: Path, write: bool = True) -> Iterator[KeyTable]:
    """The file's table, under an exclusive lock (two CLIs at once do not lose each other's change); saved
    atomically on a clean exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = keys.load(path) if path.exists() else KeyTable()
        yield table
        if write:
            keys.save(path, table)


def _limits(args: argparse.Namespace, base: KeyRecord | None = None) -> dict:
    fields: dict = {}
    if args.models is not None:
        fields["models"] = tuple(m.strip() for m in args.models.split(",") if m.strip())
    lim = base.limits if base else Limits()
    if args.rpm is not None or args.tpm is not None:
        fields["limits"] = Limits(rpm=(args.rpm or None) if args.rpm is not None else lim.rpm,
                                  tpm=(args.tpm or None) if args.tpm is not None else lim.tpm)
    if args.model_limit:
        fields["model_limits"] = tuple(args.model_limit)
    if args.quota is not None:
        fields["quota"] = Quota(args.quota, args.period) if args.quota else None
    if args.expires is not None:
        fields["expires_at"] = args.expires
    elif args.expires_in is not None:
        fields["expires_at"] = time.time() + args.expires_in
    return fields


def _row(r: KeyRecord, now: float) -> str:
    state = "revoked" if r.revoked else "expired" if r.expires_at and r.expires_at <= now else "active"
    exp = datetime.fromtimestamp(r.expires_at, UTC).strftime("%Y-%m-%dT%H:%MZ") if r.expires_at else "-"
    quota = f"{r.quota.tokens}/{r.quota.period}" if r.quota else "-"
    extra = " ".join(f"{g}:{lim.rpm or '-'}/{lim.tpm or '-'}" for g, lim in r.model_limits)
    return (f"{r.id:<20} {state:<8} {','.join(r.models):<24} {r.limits.rpm or '-':>6} {r.limits.tpm or '-':>8} "
            f"{quota:>14} {exp:>17}  {extra}").rstrip()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m cluster.keys", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("create", "update", "list", "revoke", "rotate"):
        c = sub.add_parser(name)
        c.add_argument("--file", required=True, type=Path, help="the key file (gateway.auth.keys_file)")
        if name == "list":
            continue
        c.add_argument("--id", required=True, help="the key's id (1-64 of A-Z a-z 0-9 _ -)")
        if name in ("create", "update"):
            c.add_argument("--models", help="comma-separated model names or globs (default for create: '*')")
            c.add_argument("--rpm", type=int, help="requests per minute (0: unlimited)")
            c.add_argument("--tpm", type=int, help="tokens per minute, prompt + completion (0: unlimited)")
            c.add_argument("--model-limit", type=model_limit, action="append", metavar="GLOB:rpm=N,tpm=N",
                           help="limits for the models matching GLOB, on top of the key's (repeatable)")
            c.add_argument("--quota", type=int, help="tokens per --period (0: none)")
            c.add_argument("--period", choices=keys.PERIODS, default="month")
            c.add_argument("--expires", type=timestamp, help="ISO date/time the key stops working")
            c.add_argument("--expires-in", type=duration_s, help="or a duration from now: 30d, 12h")
        if name == "rotate":
            c.add_argument("--grace", type=duration_s, default=0.0, help="the old secret keeps working this long")
    args = p.parse_args(argv)
    now = time.time()
    try:
        with locked(args.file, write=args.cmd != "list") as table:
            rec = table.records.get(getattr(args, "id", ""))
            if args.cmd == "list":
                print(f"{'id':<20} {'state':<8} {'models':<24} {'rpm':>6} {'tpm':>8} {'quota':>14} {'expires':>17}")
                for r in sorted(table.records.values(), key=lambda r: r.id):
                    print(_row(r, now))
            elif args.cmd == "create":
                if rec is not None:
                    p.error(f"key {args.id!r} exists (rotate or update it)")
                secret, rec = keys.new_key(args.id, now, **_limits(args))
                table.records[rec.id] = rec
                print(secret)
                print(f"created key {rec.id!r}: the secret above is shown once, store it now", file=sys.stderr)
            elif rec is None:
                p.error(f"no key {args.id!r} in {args.file}")
            elif args.cmd == "update":
                table.records[rec.id] = replace(rec, **_limits(args, rec))
                print(f"updated key {rec.id!r}", file=sys.stderr)
            elif args.cmd == "revoke":
                table.records[rec.id] = replace(rec, revoked=True, previous=None)
                print(f"revoked key {rec.id!r}", file=sys.stderr)
            elif args.cmd == "rotate":
                secret, table.records[rec.id] = keys.rotated(rec, args.grace, now)
                print(secret)
                print(f"rotated key {rec.id!r}" + (f"; the old secret works for {args.grace:.0f} s more"
                                                   if args.grace else "; the old secret no longer works"),
                      file=sys.stderr)
    except ValueError as err:
        p.exit(2, f"error: {err}\n")


if __name__ == "__main__":
    main()
