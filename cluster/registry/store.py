"""The local model registry in one sqlite file: models, immutable versions, moving aliases, pins.

A version is a folder's content at registration: a number per model (1, 2, ...; never reused after a delete, so
``models:/m/3`` cannot come to mean other weights), the folder's sha256 and absolute real path, the time, a
description; tags and metrics may be added later. An alias points at one version and moves, each move kept in
``alias_history``; a pin says an app serves a version (the app builder writes them) and keeps it from deletion.
Several processes share the file: WAL (readers never wait), ``BEGIN IMMEDIATE`` for writes, a busy timeout.

Example:
    >>> import tempfile; from pathlib import Path
    >>> tmp = Path(tempfile.mkdtemp())
    >>> _ = (tmp / "model").mkdir(), (tmp / "model" / "config.json").write_text("{}")
    >>> reg = SqliteRegistry(tmp / "registry.db")
    >>> v, created = reg.register("tiny", tmp / "model", alias="production", metrics={"eval_loss": 1.5})
    >>> (v.version, created, v.aliases, v.metrics)
    (1, True, ('production',), {'eval_loss': 1.5})
    >>> reg.register("tiny", tmp / "model")[0].version   # the same content: the same version
    1
    >>> r = reg.resolve("models:/tiny@production")
    >>> (r.version, r.alias, r.sha256 == v.sha256)
    (1, 'production', True)
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import astuple
from pathlib import Path

from cluster.registry.api import (
    Alias,
    AliasMove,
    ModelVersion,
    Pin,
    RegisteredModel,
    ResolvedVersion,
    VersionInUse,
    check_metrics,
    check_tags,
    iso,
)
from cluster.registry.digest import folder_files, folder_sha256
from cluster.registry.uri import ModelURI, RegistryError, check_alias_name, check_model_name, parse_uri

SCHEMA_VERSION = 1
_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    f"INSERT INTO meta VALUES ('schema_version', '{SCHEMA_VERSION}')",
    # last_version only grows: deleted numbers are not handed out again.
    "CREATE TABLE models (name TEXT PRIMARY KEY, created_at REAL NOT NULL, last_version INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE versions (model TEXT NOT NULL REFERENCES models(name), version INTEGER NOT NULL CHECK (version > 0),"
    " sha256 TEXT NOT NULL, source TEXT NOT NULL, created_at REAL NOT NULL, description TEXT NOT NULL DEFAULT '',"
    " PRIMARY KEY (model, version))",
    "CREATE INDEX versions_by_sha ON versions (model, sha256)",
    # The store never updates these columns; the trigger keeps any other writer of the file from doing so.
    "CREATE TRIGGER versions_immutable BEFORE UPDATE OF model, version, sha256, source, created_at ON versions"
    " BEGIN SELECT RAISE(ABORT, 'model versions are immutable'); END",
    "CREATE TABLE tags (model TEXT NOT NULL, version INTEGER NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,"
    " PRIMARY KEY (model, version, key), FOREIGN KEY (model, version) REFERENCES versions ON DELETE CASCADE)",
    "CREATE TABLE metrics (model TEXT NOT NULL, version INTEGER NOT NULL, name TEXT NOT NULL, value REAL NOT NULL,"
    " PRIMARY KEY (model, version, name), FOREIGN KEY (model, version) REFERENCES versions ON DELETE CASCADE)",
    "CREATE TABLE aliases (model TEXT NOT NULL, alias TEXT NOT NULL, version INTEGER NOT NULL, moved_at REAL NOT NULL,"
    " PRIMARY KEY (model, alias), FOREIGN KEY (model, version) REFERENCES versions)",
    # No foreign key: the audit trail outlives the versions it mentions. version NULL: the alias was deleted.
    "CREATE TABLE alias_history (id INTEGER PRIMARY KEY AUTOINCREMENT, model TEXT NOT NULL, alias TEXT NOT NULL,"
    " version INTEGER, moved_at REAL NOT NULL)",
    "CREATE TABLE pins (app TEXT NOT NULL, served_name TEXT NOT NULL, model TEXT NOT NULL, version INTEGER NOT NULL,"
    " pinned_at REAL NOT NULL, PRIMARY KEY (app, served_name), FOREIGN KEY (model, version) REFERENCES versions)",
)


class SqliteRegistry:
    """The registry in one sqlite file, created with its schema on first use."""

    def __init__(self, path: str | os.PathLike[str], busy_timeout_s: float = 30.0) -> None:
        self.path, self.busy_timeout_s = Path(path).expanduser().absolute(), busy_timeout_s
        self._ready = False  # schema checked, WAL on: once per instance, not per call

    # ---- a connection per call: nothing left open, nothing that crosses a fork or a thread (Serve does both) ----
    @contextmanager
    def _tx(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA foreign_keys = ON")
            if not self._ready:
                self._wal(db)
                with _begin(db, write=True):  # two first users: one creates, the other waits, then finds it made
                    self._init(db)
                self._ready = True
            with _begin(db, write):
                yield db
        finally:
            db.close()

    def _wal(self, db: sqlite3.Connection) -> None:
        # WAL is stored in the file, so every later connection gets it. Switching needs the file alone for a moment
        # and sqlite answers "locked" at once there, without the busy timeout: two first users retry until it.
        deadline = time.monotonic() + self.busy_timeout_s
        while True:
            try:
                db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as err:
                if "locked" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _init(self, db: sqlite3.Connection) -> None:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone():
            for statement in _SCHEMA:
                db.execute(statement)
        found = int(db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
        if found != SCHEMA_VERSION:  # migrations go here when there is a version 2
            raise RegistryError(f"registry {self.path} has schema version {found}; this code reads {SCHEMA_VERSION}")

    # ---- lookups: a missing thing raises, naming what there is -----------------------------------------------
    def _model(self, db: sqlite3.Connection, model: str) -> sqlite3.Row:
        row = db.execute("SELECT * FROM models WHERE name = ?", (model,)).fetchone()
        if row is None:
            names = [r[0] for r in db.execute("SELECT name FROM models ORDER BY name")]
            raise RegistryError(f"no model {model!r} in registry {self.path}; models: {', '.join(names) or '(none)'}")
        return row

    def _version(self, db: sqlite3.Connection, model: str, version: int) -> sqlite3.Row:
        self._model(db, model)
        row = db.execute("SELECT * FROM versions WHERE model = ? AND version = ?", (model, version)).fetchone()
        if row is None:
            have = [str(r[0]) for r in db.execute("SELECT version FROM versions WHERE model = ? ORDER BY version",
                                                  (model,))]
            raise RegistryError(f"model {model!r} has no version {version}; versions: {', '.join(have) or '(none)'}")
        return row

    def _load(self, db: sqlite3.Connection, row: sqlite3.Row) -> ModelVersion:
        k, of = (row["model"], row["version"]), "WHERE model = ? AND version = ? ORDER BY"
        tags = dict(db.execute(f"SELECT key, value FROM tags {of} key", k))
        metrics = dict(db.execute(f"SELECT name, value FROM metrics {of} name", k))
        aliases = tuple(r[0] for r in db.execute(f"SELECT alias FROM aliases {of} alias", k))
        return ModelVersion(row["model"], row["version"], row["sha256"], row["source"], row["created_at"],
                            row["description"], tags, metrics, aliases)

    # ---- versions ------------------------------------------------------------------------------------------
    def register(self, model: str, folder: str | os.PathLike[str], *, description: str = "",
                 tags: Mapping[str, str] | None = None, metrics: Mapping[str, float] | None = None,
                 alias: str | None = None, force_new: bool = False) -> tuple[ModelVersion, bool]:
        """The version holding ``folder``'s content, and whether it is new: the same content registered again
        is the existing version (its tags and metrics gain the new ones) unless ``force_new``."""
        check_model_name(model)
        if alias is not None:
            check_alias_name(alias)
        tags, metrics = check_tags(tags or {}), check_metrics(metrics or {})
        # The real path: a link like models/current would later point at other weights.
        source = Path(folder).expanduser().resolve()
        if not folder_files(source):
            raise RegistryError(f"{str(source)!r} has no files to register")
        sha = folder_sha256(source)  # outside the transaction: hashing gigabytes must not hold the write lock
        now = time.time()
        with self._tx(write=True) as db:
            db.execute("INSERT OR IGNORE INTO models (name, created_at) VALUES (?, ?)", (model, now))
            same = None if force_new else db.execute(  # the newest holder of this content, if any
                "SELECT MAX(version) FROM versions WHERE model = ? AND sha256 = ?", (model, sha)).fetchone()[0]
            if same is not None:
                version, created = same, False
            else:
                version, created = self._model(db, model)["last_version"] + 1, True
                db.execute("UPDATE models SET last_version = ? WHERE name = ?", (version, model))
                db.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?)",
                           (model, version, sha, str(source), now, description))
            self._upsert(db, model, version, tags, metrics)
            if alias is not None:
                self._move_alias(db, model, alias, version, now)
            return self._load(db, self._version(db, model, version)), created

    def _upsert(self, db: sqlite3.Connection, model: str, version: int, tags: Mapping[str, str],
                metrics: Mapping[str, float]) -> None:
        for table, values in (("tags", tags), ("metrics", metrics)):
            db.executemany(f"INSERT OR REPLACE INTO {table} VALUES (?, ?, ?, ?)", [(model, version, *kv)
                                                                                   for kv in values.items()])

    def _history(self, db: sqlite3.Connection, model: str, alias: str, version: int | None, now: float) -> None:
        db.execute("INSERT INTO alias_history (model, alias, version, moved_at) VALUES (?, ?, ?, ?)",
                   (model, alias, version, now))

    def set_tags(self, model: str, version: int, tags: Mapping[str, str]) -> ModelVersion:
        """Add tags (a key already there takes the new value); the version's content is untouched."""
        return self._annotate(model, version, check_tags(tags), {})

    def set_metrics(self, model: str, version: int, metrics: Mapping[str, float]) -> ModelVersion:
        return self._annotate(model, version, {}, check_metrics(metrics))

    def _annotate(self, model: str, version: int, tags: Mapping[str, str], metrics: Mapping[str, float]
                  ) -> ModelVersion:
        with self._tx(write=True) as db:
            row = self._version(db, model, version)
            self._upsert(db, model, version, tags, metrics)
            return self._load(db, row)

    def models(self) -> list[RegisteredModel]:
        with self._tx() as db:
            return [RegisteredModel(
                r["name"], r["created_at"],
                tuple(v[0] for v in db.execute("SELECT version FROM versions WHERE model = ? ORDER BY version",
                                               (r["name"],))),
                dict(db.execute("SELECT alias, version FROM aliases WHERE model = ? ORDER BY alias", (r["name"],))),
            ) for r in db.execute("SELECT * FROM models ORDER BY name").fetchall()]

    def versions(self, model: str) -> list[ModelVersion]:
        with self._tx() as db:
            self._model(db, model)
            rows = db.execute("SELECT * FROM versions WHERE model = ? ORDER BY version", (model,)).fetchall()
            return [self._load(db, r) for r in rows]

    def get_version(self, model: str, version: int) -> ModelVersion:
        with self._tx() as db:
            return self._load(db, self._version(db, model, version))

    def verify(self, model: str, version: int) -> bool:
        """Whether the version's folder still holds what was registered (a folder can be edited in place)."""
        v = self.get_version(model, version)
        return folder_sha256(v.source) == v.sha256

    # ---- aliases -------------------------------------------------------------------------------------------
    def _move_alias(self, db: sqlite3.Connection, model: str, alias: str, version: int, now: float) -> Alias:
        old = db.execute("SELECT version FROM aliases WHERE model = ? AND alias = ?", (model, alias)).fetchone()
        if old is None or old[0] != version:  # a no-op move is not history
            db.execute("INSERT OR REPLACE INTO aliases VALUES (?, ?, ?, ?)", (model, alias, version, now))
            self._history(db, model, alias, version, now)
        return Alias(*db.execute("SELECT * FROM aliases WHERE model = ? AND alias = ?", (model, alias)).fetchone())

    def set_alias(self, model: str, alias: str, version: int) -> Alias:
        check_alias_name(alias)
        with self._tx(write=True) as db:
            self._version(db, model, version)
            return self._move_alias(db, model, alias, version, time.time())

    def delete_alias(self, model: str, alias: str) -> Alias:
        with self._tx(write=True) as db:
            gone = self._alias(db, model, alias)
            db.execute("DELETE FROM aliases WHERE model = ? AND alias = ?", (model, alias))
            self._history(db, model, alias, None, time.time())
            return gone

    def _alias(self, db: sqlite3.Connection, model: str, alias: str) -> Alias:
        self._model(db, model)
        rows = [Alias(*r) for r in db.execute("SELECT * FROM aliases WHERE model = ? ORDER BY alias", (model,))]
        for a in rows:
            if a.alias == alias:
                return a
        have = ", ".join(f"{a.alias} -> {a.version}" for a in rows) or "(none)"
        raise RegistryError(f"model {model!r} has no alias {alias!r}; aliases: {have}")

    def aliases(self, model: str) -> list[Alias]:
        with self._tx() as db:
            self._model(db, model)
            return [Alias(*r) for r in db.execute("SELECT * FROM aliases WHERE model = ? ORDER BY alias", (model,))]

    def alias_history(self, model: str, alias: str | None = None) -> list[AliasMove]:
        """Oldest first; the row before the last names the version a rollback goes back to."""
        with self._tx() as db:
            self._model(db, model)
            rows = db.execute("SELECT model, alias, version, moved_at FROM alias_history WHERE model = ?"
                              " AND (? IS NULL OR alias = ?) ORDER BY id", (model, alias, alias))
            return [AliasMove(*r) for r in rows]

    def resolve(self, uri: str | ModelURI) -> ResolvedVersion:
        ref = parse_uri(uri) if isinstance(uri, str) else uri
        with self._tx() as db:
            self._model(db, ref.name)
            if ref.alias is not None:
                version = self._alias(db, ref.name, ref.alias).version
            elif (version := ref.version) is None:  # latest
                version = db.execute("SELECT MAX(version) FROM versions WHERE model = ?", (ref.name,)).fetchone()[0]
                if version is None:
                    raise RegistryError(f"model {ref.name!r} has no versions (models:/{ref.name}/latest)")
            row = self._version(db, ref.name, version)
            return ResolvedVersion(row["model"], row["version"], row["sha256"], row["source"], ref.alias)

    # ---- pins and deletes ----------------------------------------------------------------------------------
    def pin(self, app: str, served_name: str, model: str, version: int) -> Pin:
        """Record that ``app`` serves ``model``/``version`` as ``served_name`` (replacing that name's pin)."""
        if not app or not served_name:
            raise RegistryError("a pin needs an app name and a served model name")
        with self._tx(write=True) as db:
            self._version(db, model, version)
            p = Pin(app, served_name, model, version, time.time())
            db.execute("INSERT OR REPLACE INTO pins VALUES (?, ?, ?, ?, ?)", astuple(p))
            return p

    def unpin_app(self, app: str) -> list[Pin]:
        """Drop every pin of ``app`` (it was deleted, or is about to be rebuilt); returns them."""
        with self._tx(write=True) as db:
            gone = self._pins(db, "app = ?", app)
            db.execute("DELETE FROM pins WHERE app = ?", (app,))
            return gone

    def pins_of(self, model: str, version: int | None = None) -> list[Pin]:
        with self._tx() as db:
            return self._pins(db, "model = ? AND (? IS NULL OR version = ?)", model, version, version)

    def _pins(self, db: sqlite3.Connection, where: str, *args: object) -> list[Pin]:
        return [Pin(*r) for r in db.execute(f"SELECT * FROM pins WHERE {where} ORDER BY app, served_name", args)]

    def delete_version(self, model: str, version: int, *, force: bool = False,
                       still_served: Callable[[Pin], bool] = lambda pin: True) -> ModelVersion:
        """Delete a version nothing serves. Each pin is put to ``still_served`` (the lead's check against the live
        Serve cluster); one it calls stale is removed, any other refuses the delete, whatever ``force`` says.
        Aliases pointing at the version refuse it too, unless ``force``, which deletes them (into the history)."""
        self.get_version(model, version)  # an unknown version fails before still_served is asked anything
        stale = [p for p in self.pins_of(model, version) if not still_served(p)]
        # still_served may be slow (a cluster query), so it runs outside any transaction; a pin re-written in the
        # meantime (another pinned_at) was not what it judged: it is kept, and refuses the delete below.
        with self._tx(write=True) as db:
            db.executemany("DELETE FROM pins WHERE app = ? AND served_name = ? AND model = ? AND version = ?"
                           " AND pinned_at = ?", [astuple(p) for p in stale])
        with self._tx(write=True) as db:
            gone = self._load(db, self._version(db, model, version))
            pins = tuple(self._pins(db, "model = ? AND version = ?", model, version))
            served = ", ".join(f"app {p.app!r} as {p.served_name!r} (pinned {iso(p.pinned_at)})" for p in pins)
            problems = [f"served by {served}; redeploy or delete those apps first (force does not override a pin)"
                        ] if pins else []
            if gone.aliases and not force:
                problems.append(f"aliases point at it: {', '.join(gone.aliases)}; move them, or pass force (--force) "
                                "to delete them too")
            if problems:
                raise VersionInUse(f"cannot delete {model}/{version}: " + "; ".join(problems), pins, gone.aliases)
            now = time.time()
            for alias in gone.aliases:
                db.execute("DELETE FROM aliases WHERE model = ? AND alias = ?", (model, alias))
                self._history(db, model, alias, None, now)
            db.execute("DELETE FROM versions WHERE model = ? AND version = ?", (model, version))
            return gone


@contextmanager
def _begin(db: sqlite3.Connection, write: bool) -> Iterator[None]:
    # IMMEDIATE takes the write lock up front, so a read-then-write (the next version number) cannot race another
    # process; a plain BEGIN gives a read one consistent snapshot across its queries.
    db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
