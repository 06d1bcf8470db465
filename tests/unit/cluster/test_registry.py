"""cluster/registry: the CLI end to end, immutable versions (same content -> same version, numbers never reused),
aliases and their history, ``models:/`` URIs and their errors, pins refusing deletes, the folder digest, two
processes registering into one file, and the modules' examples."""

from __future__ import annotations

import doctest
import hashlib
import inspect
import json
import multiprocessing
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import cluster.registry as registry_pkg
from cluster.registry import (
    ModelURI,
    Pin,
    Registry,
    RegistryError,
    SqliteRegistry,
    VersionInUse,
    api,
    default_path,
    digest,
    folder_sha256,
    is_model_uri,
    open_registry,
    parse_uri,
    store,
    uri,
)
from cluster.registry import __main__ as cli_mod
from cluster.registry.__main__ import main

REPO = Path(__file__).resolve().parents[3]


# ---- helpers ---------------------------------------------------------------------------------------------------
@pytest.fixture
def make_folder(tmp_path: Path) -> Callable[..., Path]:
    """A tiny model folder: a config, a 'weights' file, a nested tokenizer file; ``salt`` changes the weights."""
    def make(name: str, salt: str = "") -> Path:
        folder = tmp_path / name
        (folder / "tok").mkdir(parents=True)
        (folder / "config.json").write_text('{"hidden_size": 8}')
        (folder / "model.safetensors").write_bytes(b"\x00\x01weights" + salt.encode())
        (folder / "tok" / "tokenizer.json").write_text("{}")
        return folder
    return make


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "reg" / "registry.db"


@pytest.fixture
def reg(db: Path) -> SqliteRegistry:
    return SqliteRegistry(db)


def cli(capsys: pytest.CaptureFixture[str], db: Path, *args: str) -> tuple[str, str]:
    main(["--db", str(db), *args])
    out = capsys.readouterr()
    return out.out, out.err


def cli_fails(capsys: pytest.CaptureFixture[str], db: Path, *args: str, code: int = 2) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["--db", str(db), *args])
    assert exc.value.code == code
    return capsys.readouterr().err


# ---- the CLI, end to end ---------------------------------------------------------------------------------------
def test_cli_round_trip(capsys: pytest.CaptureFixture[str], db: Path, make_folder: Callable[..., Path]) -> None:
    a, b = make_folder("a"), make_folder("b", salt="v2")
    out, err = cli(capsys, db, "register", "tiny", str(a), "--description", "first", "--tag", "dataset=code-v3",
                   "--metric", "eval_loss=1.92", "--alias", "production")
    assert out.strip() == "models:/tiny/1" and "registered models:/tiny/1" in err
    out, _ = cli(capsys, db, "register", "tiny", str(b), "--alias", "canary", "--tag", "k=v=w")
    assert out.strip() == "models:/tiny/2"

    out, _ = cli(capsys, db, "list")
    row = out.splitlines()[1].split()
    assert row[:3] == ["tiny", "2", "2"] and "canary->2," in row and "production->1" in row
    out, _ = cli(capsys, db, "list", "tiny")
    lines = out.splitlines()
    sha1, sha2 = folder_sha256(a), folder_sha256(b)
    assert lines[1].split()[:2] == ["1", sha1[:12]] and "production" in lines[1] and "dataset=code-v3" in lines[1]
    assert lines[2].split()[:2] == ["2", sha2[:12]] and "canary" in lines[2] and "k=v=w" in lines[2]

    shown = json.loads(cli(capsys, db, "show", "tiny/1")[0])
    assert shown["uri"] == "models:/tiny/1" and shown["sha256"] == sha1 and shown["source"] == str(a.resolve())
    assert (shown["description"], shown["tags"], shown["metrics"]) == ("first", {"dataset": "code-v3"},
                                                                        {"eval_loss": 1.92})
    assert shown["aliases"] == ["production"] and shown["pins"] == []
    assert shown["created_at"].endswith("Z")
    assert json.loads(cli(capsys, db, "show", "tiny@canary")[0])["version"] == 2
    assert json.loads(cli(capsys, db, "show", "tiny/latest")[0])["version"] == 2
    whole = json.loads(cli(capsys, db, "show", "tiny")[0])
    assert [v["version"] for v in whole["versions"]] == [1, 2]
    assert whole["aliases"] == {"canary": 2, "production": 1}

    # promote the canary, then roll back by the history
    _, err = cli(capsys, db, "alias", "tiny", "production", "@canary")
    assert "1 -> 2" in err
    assert json.loads(cli(capsys, db, "resolve", "models:/tiny@production")[0])["version"] == 2
    out, _ = cli(capsys, db, "history", "tiny", "production")
    assert [line.split()[-1] for line in out.splitlines()] == ["1", "2"]
    cli(capsys, db, "alias", "tiny", "production", "1")
    out, _ = cli(capsys, db, "history", "tiny")
    assert [line.split()[1:] for line in out.splitlines()] == [
        ["production", "1"], ["canary", "2"], ["production", "2"], ["production", "1"]]

    for text, version, alias in (("models:/tiny/1", 1, None), ("models:/tiny@canary", 2, "canary"),
                                 ("models:/tiny/latest", 2, None)):
        r = json.loads(cli(capsys, db, "resolve", text)[0])
        assert r == {"uri": f"models:/tiny/{version}", "model": "tiny", "version": version,
                     "sha256": sha1 if version == 1 else sha2, "source": str((a if version == 1 else b).resolve()),
                     "alias": alias}

    # tags and metrics added later; values with '=' survive
    cli(capsys, db, "tag", "tiny", "2", "owner=team-a", "note=x=y")
    cli(capsys, db, "metric", "tiny", "2", "eval_loss=1.5", "pass_at_1=0.25")
    shown = json.loads(cli(capsys, db, "show", "tiny/2")[0])
    assert shown["tags"] == {"k": "v=w", "note": "x=y", "owner": "team-a"}
    assert shown["metrics"] == {"eval_loss": 1.5, "pass_at_1": 0.25}
    assert "is not NAME=NUMBER" in cli_fails(capsys, db, "metric", "tiny", "2", "eval_loss=low")

    # alias delete, then deletes: the aliased version needs --force, the pinned one refuses even with it
    _, err = cli(capsys, db, "alias", "tiny", "canary", "--delete")
    assert "pointed at 2" in err
    assert "no alias 'canary'; aliases: production -> 1" in cli_fails(capsys, db, "resolve", "models:/tiny@canary")
    SqliteRegistry(db).pin("default", "tiny-code-llama", "tiny", 2)
    err = cli_fails(capsys, db, "delete", "tiny", "2", "--force")
    assert "app 'default' as 'tiny-code-llama'" in err and "force does not override a pin" in err
    assert json.loads(cli(capsys, db, "show", "tiny/2")[0])["pins"][0]["app"] == "default"
    err = cli_fails(capsys, db, "delete", "tiny", "1")
    assert "aliases point at it: production" in err and "--force" in err
    _, err = cli(capsys, db, "delete", "tiny", "1", "--force")
    assert "deleted models:/tiny/1" in err and "production" in err
    assert "no version 1; versions: 2" in cli_fails(capsys, db, "show", "tiny/1")
    out, _ = cli(capsys, db, "history", "tiny", "production")
    assert out.splitlines()[-1].split()[-1] == "(deleted)"


def test_cli_argument_errors(capsys: pytest.CaptureFixture[str], db: Path, make_folder: Callable[..., Path]) -> None:
    cli(capsys, db, "register", "tiny", str(make_folder("a")))
    assert "takes no VERSION" in cli_fails(capsys, db, "alias", "tiny", "production", "1", "--delete")
    assert "needs a VERSION" in cli_fails(capsys, db, "alias", "tiny", "production")
    assert "version must be a positive integer" in cli_fails(capsys, db, "delete", "tiny", "0")
    assert "is not KEY=VALUE" in cli_fails(capsys, db, "tag", "tiny", "1", "novalue")
    assert "reserved" in cli_fails(capsys, db, "alias", "tiny", "latest", "1")
    assert "is not a folder" in cli_fails(capsys, db, "register", "tiny", str(db.parent / "nowhere"))
    assert "model name 'a b'" in cli_fails(capsys, db, "register", "a b", str(make_folder("b")))


def test_cli_db_from_env_and_after_subcommand(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              make_folder: Callable[..., Path]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MODELFLEET_REGISTRY", raising=False)
    assert default_path() == Path("registry.db")
    main(["register", "tiny", str(make_folder("a"))])
    assert (tmp_path / "registry.db").exists()
    monkeypatch.setenv("MODELFLEET_REGISTRY", str(tmp_path / "env.db"))
    main(["register", "other", str(make_folder("b"))])
    assert [m.name for m in SqliteRegistry(tmp_path / "env.db").models()] == ["other"]
    main(["list", "--db", str(tmp_path / "registry.db")])  # --db after the subcommand wins over the env
    assert "tiny" in capsys.readouterr().out


def test_cli_verify_sees_a_folder_edited_in_place(capsys: pytest.CaptureFixture[str], db: Path,
                                                  make_folder: Callable[..., Path]) -> None:
    a = make_folder("a")
    cli(capsys, db, "register", "tiny", str(a))
    assert "matches" in cli(capsys, db, "verify", "tiny", "1")[1]
    (a / "model.safetensors").write_bytes(b"tampered")
    assert "no longer holds" in cli_fails(capsys, db, "verify", "tiny", "1", code=1)


# ---- immutability ----------------------------------------------------------------------------------------------
def test_same_content_is_the_same_version(reg: SqliteRegistry, make_folder: Callable[..., Path]) -> None:
    a = make_folder("a")
    v1, created = reg.register("tiny", a, description="first", tags={"t": "1"})
    assert (v1.version, created) == (1, True)
    copy = make_folder("copy")  # other place, same bytes
    again, created = reg.register("tiny", copy, description="ignored", metrics={"eval_loss": 2.0})
    assert (again.version, created, again.sha256) == (1, False, v1.sha256)
    assert again.source == str(a.resolve()) and again.description == "first"  # the first registration's
    assert (again.tags, again.metrics) == ({"t": "1"}, {"eval_loss": 2.0})  # additions merge in
    assert [v.version for v in reg.versions("tiny")] == [1]
    # another model may hold the same content under its own numbering
    assert reg.register("other", a)[0].version == 1


def test_changed_content_is_a_new_version(reg: SqliteRegistry, make_folder: Callable[..., Path]) -> None:
    a = make_folder("a")
    v1, _ = reg.register("tiny", a)
    (a / "model.safetensors").write_bytes(b"retrained")
    v2, created = reg.register("tiny", a)
    assert (v2.version, created) == (2, True) and v2.sha256 != v1.sha256
    assert reg.get_version("tiny", 1).sha256 == v1.sha256  # version 1's record is untouched
    assert reg.verify("tiny", 2) and not reg.verify("tiny", 1)  # ... though its folder now holds other bytes


def test_force_new_and_numbers_never_reused(reg: SqliteRegistry, make_folder: Callable[..., Path]) -> None:
    a = make_folder("a")
    reg.register("tiny", a)
    v2, created = reg.register("tiny", a, force_new=True)
    assert (v2.version, created) == (2, True) and v2.sha256 == reg.get_version("tiny", 1).sha256
    assert reg.register("tiny", a)[0].version == 2  # the newest holder of that content
    reg.delete_version("tiny", 2)
    v3, _ = reg.register("tiny", make_folder("b", salt="x"))
    assert v3.version == 3  # 2 is gone for good: models:/tiny/2 can never name other weights
    assert reg.resolve("models:/tiny/latest").version == 3


def test_sha_and_source_cannot_be_rewritten(reg: SqliteRegistry, db: Path, make_folder: Callable[..., Path]) -> None:
    reg.register("tiny", make_folder("a"))
    with sqlite3.connect(db) as raw:
        for column, value in (("sha256", "0" * 64), ("source", "/elsewhere"), ("version", 7)):
            with pytest.raises(sqlite3.IntegrityError, match="immutable"):
                raw.execute(f"UPDATE versions SET {column} = ?", (value,))
        raw.execute("UPDATE versions SET description = 'fixed typo'")  # the free text is not the content
    assert reg.get_version("tiny", 1).description == "fixed typo"


def test_register_refuses_bad_input(reg: SqliteRegistry, tmp_path: Path, make_folder: Callable[..., Path]) -> None:
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(RegistryError, match="no files"):
        reg.register("tiny", tmp_path / "empty")
    a = make_folder("a")
    for kwargs, match in ((dict(metrics={"loss": float("nan")}), "finite"), (dict(metrics={"loss": True}), "finite"),
                          (dict(tags={"": "x"}), "non-empty"), (dict(tags={"k": 1}), "strings"),
                          (dict(alias="9lives"), "alias '9lives'")):
        with pytest.raises(RegistryError, match=match):
            reg.register("tiny", a, **kwargs)
    with pytest.raises(RegistryError, match="model name"):
        reg.register("-tiny", a)
    assert reg.models() == []  # nothing half-made by the refusals


# ---- aliases ---------------------------------------------------------------------------------------------------
def test_alias_moves_and_history(reg: SqliteRegistry, make_folder: Callable[..., Path]) -> None:
    reg.register("tiny", make_folder("a"), alias="production")
    reg.register("tiny", make_folder("b", salt="2"), alias="canary")
    assert reg.set_alias("tiny", "production", 2).version == 2
    assert reg.set_alias("tiny", "production", 2).version == 2  # no-op: not a history row
    reg.delete_alias("tiny", "canary")
    history = [(h.alias, h.version) for h in reg.alias_history("tiny")]
    assert history == [("production", 1), ("canary", 2), ("production", 2), ("canary", None)]
    assert [h.version for h in reg.alias_history("tiny", "production")] == [1, 2]
    assert [(a.alias, a.version) for a in reg.aliases("tiny")] == [("production", 2)]
    assert reg.get_version("tiny", 2).aliases == ("production",)
    with pytest.raises(RegistryError, match="model 'tiny' has no version 9; versions: 1, 2"):
        reg.set_alias("tiny", "production", 9)
    with pytest.raises(RegistryError, match="has no alias 'canary'; aliases: production -> 2"):
        reg.delete_alias("tiny", "canary")


@pytest.mark.parametrize("alias", ["production", "canary", "a", "A1_b-2", "x" * 64])
def test_alias_names_allowed(alias: str) -> None:
    assert uri.check_alias_name(alias) == alias


@pytest.mark.parametrize("alias", ["", "1a", "_a", "-a", "a.b", "a b", "a/b", "x" * 65, "latest", "prod@1"])
def test_alias_names_refused(alias: str) -> None:
    with pytest.raises(RegistryError):
        uri.check_alias_name(alias)


def test_model_name_rule_is_the_served_name_rule() -> None:
    from cluster.config import _NAME

    assert uri.MODEL_NAME.pattern == _NAME


# ---- URIs ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("models:/tiny/1", ModelURI("tiny", 1)),
    ("models:/tiny-code-llama.v2/12", ModelURI("tiny-code-llama.v2", 12)),
    ("models:/tiny/latest", ModelURI("tiny")),
    ("models:/tiny@production", ModelURI("tiny", alias="production")),
])
def test_uri_parse_and_round_trip(text: str, expected: ModelURI) -> None:
    assert parse_uri(text) == expected and str(expected) == text
    assert is_model_uri(text)


@pytest.mark.parametrize("text, match", [
    ("models:/", "empty model name"),
    ("models:/a", "no version or alias"),
    ("models:/a/", "empty version"),
    ("models:/a/b/c", "too many path parts"),
    ("models:/a@", "empty alias"),
    ("models:/@prod", "empty model name"),
    ("models:/a@prod/1", "nothing may follow the alias"),
    ("models:/a@latest", "reserved"),
    ("models:/a@1x", "alias '1x'"),
    ("models:/a/0", "positive integer"),
    ("models:/a/-1", "positive integer"),
    ("models:/a/01", "positive integer"),
    ("models:/a/v1", "positive integer"),
    ("models:/a/Production", "positive integer"),  # MLflow's deprecated stages: aliases instead
    ("models://profile/a/1", "not a registry URI"),
    ("models:a/1", "not a registry URI"),
    ("runs:/abc/model", "not a registry URI"),
    ("s3://bucket/a", "not a registry URI"),
    ("models:/a b/1", "model name 'a b'"),
])
def test_uri_parse_errors(text: str, match: str) -> None:
    with pytest.raises(RegistryError, match=match) as exc:
        parse_uri(text)
    assert repr(text) in str(exc.value) or text.startswith("models:/a b")  # the message quotes what was given
    assert isinstance(exc.value, ValueError)


def test_is_model_uri_tells_registry_sources_from_folders() -> None:
    assert not is_model_uri("models/tiny-code-llama") and not is_model_uri("package:my_models.tiny")
    assert is_model_uri("models:/tiny/1") and is_model_uri("models:oops")  # the latter fails in parse_uri, loudly


# ---- unknown names say what exists -----------------------------------------------------------------------------
def test_unknown_things_are_named(reg: SqliteRegistry, db: Path, make_folder: Callable[..., Path]) -> None:
    with pytest.raises(RegistryError, match=r"no model 'tiny' in registry .*; models: \(none\)"):
        reg.resolve("models:/tiny/1")
    reg.register("tiny", make_folder("a"), alias="production")
    reg.register("tiny", make_folder("b", salt="2"))
    reg.register("other", make_folder("c", salt="3"))
    cases = {
        "models:/nope/1": "no model 'nope' in registry " + str(db) + "; models: other, tiny",
        "models:/tiny/7": "model 'tiny' has no version 7; versions: 1, 2",
        "models:/tiny@canary": "model 'tiny' has no alias 'canary'; aliases: production -> 1",
        "models:/other@canary": "model 'other' has no alias 'canary'; aliases: (none)",
    }
    for text, message in cases.items():
        with pytest.raises(RegistryError) as exc:
            reg.resolve(text)
        assert str(exc.value) == message
    for call in (lambda: reg.get_version("tiny", 3), lambda: reg.set_tags("tiny", 3, {"a": "b"}),
                 lambda: reg.pin("app", "tiny", "tiny", 3), lambda: reg.delete_version("tiny", 3)):
        with pytest.raises(RegistryError, match="no version 3; versions: 1, 2"):
            call()
    with pytest.raises(RegistryError, match="no model 'nope'"):
        reg.versions("nope")
    reg.delete_version("other", 1)
    with pytest.raises(RegistryError, match=r"model 'other' has no versions \(models:/other/latest\)"):
        reg.resolve("models:/other/latest")


def test_resolve_returns_what_the_uri_names(reg: SqliteRegistry, make_folder: Callable[..., Path]) -> None:
    a, b = make_folder("a"), make_folder("b", salt="2")
    reg.register("tiny", a, alias="production")
    reg.register("tiny", b)
    r = reg.resolve("models:/tiny@production")
    assert (r.model, r.version, r.sha256, r.source, r.alias) == ("tiny", 1, folder_sha256(a), str(a.resolve()),
                                                                 "production")
    assert r.uri == "models:/tiny/1"
    assert reg.resolve(ModelURI("tiny")).version == 2 and reg.resolve("models:/tiny/latest").alias is None


# ---- pins and deletes ------------------------------------------------------------------------------------------
def test_delete_refused_while_pinned_even_with_force(reg: SqliteRegistry, make_folder: Callable[..., Path]) -> None:
    reg.register("tiny", make_folder("a"))
    reg.register("tiny", make_folder("b", salt="2"))
    p = reg.pin("default", "tiny-code-llama", "tiny", 1)
    reg.pin("batch", "tiny", "tiny", 1)
    assert reg.pins_of("tiny", 1) == [reg.pins_of("tiny")[0], reg.pins_of("tiny")[1]]
    assert [(q.app, q.served_name) for q in reg.pins_of("tiny", 1)] == [("batch", "tiny"),
                                                                        ("default", "tiny-code-llama")]
    assert p in reg.pins_of("tiny", 1)
    with pytest.raises(VersionInUse) as exc:
        reg.delete_version("tiny", 1, force=True)
    assert "app 'batch' as 'tiny'" in str(exc.value) and "app 'default' as 'tiny-code-llama'" in str(exc.value)
    assert {q.app for q in exc.value.pins} == {"batch", "default"}
    # re-pinning a served name moves it; unpinning an app frees what it held
    reg.pin("default", "tiny-code-llama", "tiny", 2)
    assert [q.app for q in reg.pins_of("tiny", 1)] == ["batch"]
    assert [(q.served_name, q.version) for q in reg.unpin_app("batch")] == [("tiny", 1)]
    assert reg.unpin_app("batch") == []
    assert reg.delete_version("tiny", 1).version == 1
    with pytest.raises(VersionInUse, match="default"):
        reg.delete_version("tiny", 2)


def test_stale_pins_are_removed_live_ones_refuse(reg: SqliteRegistry, make_folder: Callable[..., Path]) -> None:
    reg.register("tiny", make_folder("a"))
    reg.pin("gone-app", "tiny", "tiny", 1)
    reg.pin("live-app", "tiny", "tiny", 1)
    asked: list[Pin] = []

    def still_served(pin: Pin) -> bool:
        asked.append(pin)
        return pin.app == "live-app"

    with pytest.raises(VersionInUse) as exc:
        reg.delete_version("tiny", 1, still_served=still_served)
    assert {p.app for p in asked} == {"gone-app", "live-app"}
    assert [p.app for p in exc.value.pins] == ["live-app"] and "gone-app" not in str(exc.value)
    assert [p.app for p in reg.pins_of("tiny", 1)] == ["live-app"]  # the stale one is gone even so
    reg.delete_version("tiny", 1, still_served=lambda pin: False)
    assert reg.pins_of("tiny") == [] and reg.versions("tiny") == []


def test_a_pin_rewritten_while_judged_is_kept(reg: SqliteRegistry, make_folder: Callable[..., Path]) -> None:
    reg.register("tiny", make_folder("a"))
    reg.pin("app", "tiny", "tiny", 1)

    def redeployed_meanwhile(pin: Pin) -> bool:
        reg.pin("app", "tiny", "tiny", 1)  # the app builder pins again while the check runs
        return False

    with pytest.raises(VersionInUse, match="app 'app'"):
        reg.delete_version("tiny", 1, still_served=redeployed_meanwhile)


def test_force_deletes_aliases_into_history(reg: SqliteRegistry, make_folder: Callable[..., Path]) -> None:
    reg.register("tiny", make_folder("a"), alias="production")
    reg.set_alias("tiny", "canary", 1)
    with pytest.raises(VersionInUse) as exc:
        reg.delete_version("tiny", 1)
    assert exc.value.aliases == ("canary", "production") and exc.value.pins == ()
    assert "canary, production" in str(exc.value)
    gone = reg.delete_version("tiny", 1, force=True)
    assert gone.aliases == ("canary", "production") and reg.aliases("tiny") == []
    assert [(h.alias, h.version) for h in reg.alias_history("tiny")][-2:] == [("canary", None), ("production", None)]


# ---- the folder digest -----------------------------------------------------------------------------------------
def test_digest_is_the_documented_one(tmp_path: Path) -> None:
    files = {"b.bin": b"\x00" * 10, "a/z.txt": b"z", "a/b/.hidden": b"h", "A.json": b"{}"}
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    expected = hashlib.sha256()
    for rel in sorted(files, key=lambda r: r.encode()):
        expected.update(rel.encode() + b"\0" + hashlib.sha256(files[rel]).hexdigest().encode() + b"\n")
    assert folder_sha256(tmp_path) == expected.hexdigest()
    assert [rel for rel, _ in digest.folder_files(tmp_path)] == ["A.json", "a/b/.hidden", "a/z.txt", "b.bin"]


def test_digest_sees_names_contents_and_hidden_files_only(tmp_path: Path, make_folder: Callable[..., Path]) -> None:
    a = make_folder("a")
    base = folder_sha256(a)
    (a / "empty-dir").mkdir()
    os.chmod(a / "config.json", 0o600)
    os.utime(a / "config.json", (0, 0))
    assert folder_sha256(a) == base  # empty folders, modes and times do not count
    (a / "config.json").rename(a / "config2.json")
    renamed = folder_sha256(a)
    assert renamed != base
    (a / "config2.json").rename(a / "config.json")
    (a / ".gitattributes").write_text("")
    assert folder_sha256(a) not in (base, renamed)  # an empty hidden file counts


def test_digest_streams_across_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(10_000)
    (tmp_path / "w.bin").write_bytes(data)
    monkeypatch.setattr(digest, "CHUNK", 1000)
    assert digest.file_sha256(tmp_path / "w.bin") == hashlib.sha256(data).hexdigest()
    (tmp_path / "w.bin").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # the last chunk's last byte
    assert digest.file_sha256(tmp_path / "w.bin") != hashlib.sha256(data).hexdigest()


def test_digest_follows_links_and_refuses_loops(tmp_path: Path, make_folder: Callable[..., Path]) -> None:
    real = make_folder("real")
    linked = tmp_path / "linked"
    linked.mkdir()
    for entry in real.iterdir():
        (linked / entry.name).symlink_to(entry)  # a HF cache snapshot: links into blobs
    assert folder_sha256(linked) == folder_sha256(real)
    (linked / "tok" / "loop").symlink_to(linked)
    with pytest.raises(RegistryError, match="link back"):
        folder_sha256(linked)
    (linked / "tok" / "loop").unlink()
    (linked / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(RegistryError, match="dangling"):
        folder_sha256(linked)
    with pytest.raises(RegistryError, match="is not a folder"):
        folder_sha256(real / "config.json")


def test_register_stores_the_real_path(reg: SqliteRegistry, tmp_path: Path, make_folder: Callable[..., Path]) -> None:
    real = make_folder("v1")
    (tmp_path / "current").symlink_to(real)
    v, _ = reg.register("tiny", tmp_path / "current")
    assert v.source == str(real.resolve())  # not the link, which may later point at other weights


def test_digest_of_a_real_model_folder_is_stable() -> None:
    folder = REPO / "models" / "tiny-code-llama-draft"
    if not folder.is_dir():
        pytest.skip("models/tiny-code-llama-draft is not checked out")
    assert folder_sha256(folder) == folder_sha256(folder) and len(folder_sha256(folder)) == 64


# ---- the file: schema, WAL, several processes ------------------------------------------------------------------
def test_schema_is_versioned_and_in_wal_mode(reg: SqliteRegistry, db: Path, make_folder: Callable[..., Path]) -> None:
    reg.models()  # first use creates it, parent folder included
    with sqlite3.connect(db) as raw:
        assert raw.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("1",)
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"meta", "models", "versions", "tags", "metrics", "aliases", "alias_history", "pins"} <= tables
        raw.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(RegistryError, match="schema version 99"):
        SqliteRegistry(db).models()


def test_a_failed_write_leaves_nothing(reg: SqliteRegistry, make_folder: Callable[..., Path]) -> None:
    reg.register("tiny", make_folder("a"))
    with pytest.raises(RegistryError):
        reg.set_tags("tiny", 1, {"ok": "1", "": "bad"})
    assert reg.get_version("tiny", 1).tags == {}


def _register_many(db: str, folders: list[str], barrier: multiprocessing.synchronize.Barrier) -> None:
    reg = SqliteRegistry(db)
    barrier.wait()  # both processes open the new file together: schema creation races too
    for folder in folders:
        reg.register("tiny", folder)


def test_two_processes_register_concurrently(tmp_path: Path, make_folder: Callable[..., Path]) -> None:
    db = tmp_path / "shared.db"
    folders = [[str(make_folder(f"p{p}-{i}", salt=f"{p}-{i}")) for i in range(5)] for p in range(2)]
    ctx = multiprocessing.get_context("spawn")  # real, separate interpreters, nothing inherited
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_register_many, args=(str(db), f, barrier)) for f in folders]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert [proc.exitcode for proc in procs] == [0, 0]
    versions = SqliteRegistry(db).versions("tiny")
    assert [v.version for v in versions] == list(range(1, 11))
    assert sorted(v.source for v in versions) == sorted(str(Path(f).resolve()) for fs in folders for f in fs)
    assert len({v.sha256 for v in versions}) == 10


# ---- the interface, the house rules, the examples --------------------------------------------------------------
def test_sqlite_registry_implements_the_protocol() -> None:
    members = [name for name, _ in inspect.getmembers(Registry, inspect.isfunction) if not name.startswith("_")]
    assert len(members) >= 15
    pin = Pin("app", "tiny", "tiny", 1, 0.0)
    for name in members:
        ours, theirs = inspect.signature(getattr(SqliteRegistry, name)), inspect.signature(getattr(Registry, name))
        assert ours.return_annotation == theirs.return_annotation, name
        assert list(ours.parameters) == list(theirs.parameters), name
        for a, b in zip(ours.parameters.values(), theirs.parameters.values(), strict=True):
            assert (a.kind, a.annotation) == (b.kind, b.annotation), (name, a.name)
            if b.default is not inspect.Parameter.empty and callable(b.default):  # still_served: two lambdas
                assert a.default(pin) is b.default(pin) is True, (name, a.name)
            else:
                assert a.default == b.default, (name, a.name)
    assert isinstance(open_registry(Path("/nonexistent/never-opened.db")), SqliteRegistry)  # opening is lazy


def test_records_are_frozen() -> None:
    p = Pin("app", "tiny", "tiny", 1, 0.0)
    with pytest.raises(AttributeError):
        p.version = 2  # type: ignore[misc]
    assert hash(api.ModelVersion("t", 1, "s", "/x", 0.0, tags={"a": "b"})) is not None


def test_registry_imports_only_the_stdlib() -> None:
    code = ("import sys, cluster.registry, cluster.registry.__main__; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'deployments', 'parallel', 'ray', 'torch', 'pydantic', 'transformers'}); print(bad); sys.exit(bool(bad))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_modules_examples_run() -> None:
    for module in (uri, digest, api, store, registry_pkg, cli_mod):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__
