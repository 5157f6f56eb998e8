"""ConfigStore: the document behind the admin API — edits, validation with `fastgw check`'s
messages, atomic persistence, `${ENV}` kept on write-back, redaction, diff. Real files, no mocks."""
from __future__ import annotations

import json
import os
import re
import stat

import pytest
import yaml

from fastgw.config.errors import ConfigError, ConfigWriteError, ConflictError
from fastgw.config.load import DEFAULT_NAME
from fastgw.runtime.load import CHECKS, load_config
from fastgw.config.store import REDACTED, ConfigStore, serialise

API_KEY = "sha256:" + "ab" * 32
PASSWORD_HASH = "scrypt$16384$8$1$c2FsdA==$aGFzaA=="

DOC = {
    "version": 1,
    "listeners": [{"name": "public", "bind": "127.0.0.1:8080"}],
    "admin": {"bind": "127.0.0.1:9901", "token": "s3cret-admin-token"},
    "services": {
        "users": {"targets": [{"address": "127.0.0.1:9001", "weight": 3},
                              {"address": "127.0.0.1:9002"}]},
        "echo": {"kind": "echo"},
    },
    "routes": [
        {"name": "users", "match": {"paths": ["/users/{id}"]}, "service": "users"},
        {"name": "echo", "match": {"paths": ["/echo/**"]}, "service": "echo"},
    ],
    "consumers": [{"name": "acme", "groups": ["partners"],
                   "credentials": {"api_keys": [API_KEY],
                                   "basic": [{"username": "acme", "password_hash": PASSWORD_HASH}]}}],
}


def store_for(tmp_path, doc=DOC, name="gateway.yaml") -> ConfigStore:
    path = tmp_path / name
    path.write_text(json.dumps(doc, indent=2) if name.endswith(".json")
                    else yaml.safe_dump(doc, sort_keys=False))
    return ConfigStore(load_config(str(path)), CHECKS)


def apply(store: ConfigStore, document: dict) -> int:
    return store.commit(store.validate(document))


def check_messages(path: str) -> list[str]:
    """What `fastgw check` prints for the file at `path`."""
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [str(p) for p in info.value.problems]


# --- edits -----------------------------------------------------------------------------------------

def test_edits_return_new_documents_and_leave_the_current_one_alone(tmp_path):
    store = store_for(tmp_path)
    before = store.document
    store.with_object("routes", "users", {"service": "echo"})
    store.without_object("services", "users")
    store.with_target_patch("users", "127.0.0.1:9001", {"weight": 9})
    store.document["services"].clear()           # the document given out is a copy
    assert store.document == before == DOC


def test_put_route_replaces_in_place_and_appends_new_ones(tmp_path):
    store = store_for(tmp_path)
    doc = store.with_object("routes", "users", {"match": {"paths": ["/u"]}, "service": "users"})
    assert [r["name"] for r in doc["routes"]] == ["users", "echo"]   # position kept: it is match order
    assert doc["routes"][0] == {"name": "users", "match": {"paths": ["/u"]}, "service": "users"}
    doc = store.with_object("routes", "new", {"name": "new", "match": {"paths": ["/n"]}, "service": "echo"})
    assert [r["name"] for r in doc["routes"]] == ["users", "echo", "new"]
    with pytest.raises(ValueError, match="URL names 'other'"):
        store.with_object("routes", "other", {"name": "new", "service": "echo"})
    assert apply(store, doc) == 2
    assert [r.name for r in store.loaded.config.routes] == ["users", "echo", "new"]


def test_put_and_delete_service_and_consumer(tmp_path):
    store = store_for(tmp_path)
    doc = store.with_object("services", "spare", {"targets": [{"address": "127.0.0.1:9100"}]})
    assert doc["services"]["spare"] == {"targets": [{"address": "127.0.0.1:9100"}]}
    doc = store.with_object("consumers", "beta", {"groups": ["free"]})
    assert doc["consumers"][-1] == {"name": "beta", "groups": ["free"]}
    assert store.without_object("consumers", "acme")["consumers"] == []
    assert "echo" not in store.without_object("services", "echo")["services"]
    for kind, name in [("services", "nope"), ("routes", "nope"), ("consumers", "nope")]:
        with pytest.raises(LookupError):
            store.without_object(kind, name)
        with pytest.raises(LookupError):
            store.get_object(kind, name)


def test_deleting_a_used_service_is_reported_by_validation(tmp_path):
    store = store_for(tmp_path)
    with pytest.raises(ConfigError, match=r"routes\[0\]\.service: unknown service 'users'"):
        store.validate(store.without_object("services", "users"))


def test_targets_add_patch_remove(tmp_path):
    store = store_for(tmp_path)
    doc = store.with_target("users", {"address": "127.0.0.1:9003", "weight": 2})
    assert doc["services"]["users"]["targets"][-1] == {"address": "127.0.0.1:9003", "weight": 2}
    with pytest.raises(ConflictError):
        store.with_target("users", {"address": "127.0.0.1:9001"})
    with pytest.raises(ValueError, match="address"):
        store.with_target("users", {"weight": 1})
    with pytest.raises(LookupError):
        store.with_target("nope", {"address": "127.0.0.1:1"})

    doc = store.with_target_patch("users", "127.0.0.1:9001", {"weight": 5, "drain": True})
    assert doc["services"]["users"]["targets"][0] == {"address": "127.0.0.1:9001", "weight": 5, "drain": True}
    apply(store, doc)
    assert store.loaded.config.services["users"].targets[0].drain is True
    # Undraining goes back to the default instead of writing `drain: false` into the file.
    doc = store.with_target_patch("users", "127.0.0.1:9001", {"drain": False})
    assert doc["services"]["users"]["targets"][0] == {"address": "127.0.0.1:9001", "weight": 5}
    with pytest.raises(ValueError, match="drain and/or weight; not address"):
        store.with_target_patch("users", "127.0.0.1:9001", {"address": "127.0.0.1:1"})
    with pytest.raises(ValueError):
        store.with_target_patch("users", "127.0.0.1:9001", {})
    with pytest.raises(LookupError):
        store.with_target_patch("users", "127.0.0.1:1", {"weight": 1})

    doc = store.without_target("users", "127.0.0.1:9002")
    assert [t["address"] for t in doc["services"]["users"]["targets"]] == ["127.0.0.1:9001"]
    with pytest.raises(LookupError):
        store.without_target("users", "127.0.0.1:9002" + "0")


# --- validation: the messages of `fastgw check` ----------------------------------------------------

@pytest.mark.parametrize("name", ["gateway.yaml", "gateway.json"])
def test_validation_errors_are_those_of_check_on_the_file_that_would_be_written(tmp_path, name):
    store = store_for(tmp_path, name=name)
    # A schema error in a target and a typo'd key in a route (msgspec's pass), ...
    doc = store.with_object("routes", "bad", {"match": {"paths": ["/b"]}, "service": "echo", "timout": "1s"})
    doc["services"]["users"]["targets"][0]["weight"] = "heavy"
    with pytest.raises(ConfigError) as schema:
        store.validate(doc)
    # ... and semantic errors (a dangling service, a duplicate name) plus a warning.
    doc = store.with_object("routes", "users", {"service": "nope"})
    doc["routes"].append({"name": "echo", "service": "echo"})
    with pytest.raises(ConfigError) as semantic:
        store.validate(doc)
    assert len(schema.value.problems) == 2 and len(semantic.value.problems) == 3
    # The same documents written to a file and checked give the same lines.
    fmt = "json" if name.endswith(".json") else "yaml"
    written = tmp_path / "written" / name
    written.parent.mkdir()
    for info, document in [(schema, store.with_object("routes", "bad", {
                                "match": {"paths": ["/b"]}, "service": "echo", "timout": "1s"})),
                           (semantic, doc)]:
        if info is schema:
            document["services"]["users"]["targets"][0]["weight"] = "heavy"
        got = [str(p) for p in info.value.problems]
        assert all(p.startswith(f"{store.path}:") for p in got)
        written.write_text(serialise(document, fmt))
        assert got == [m.replace(str(written), store.path) for m in check_messages(str(written))]


def test_validation_error_names_line_and_key(tmp_path):
    store = store_for(tmp_path)
    doc = store.with_object("routes", "users", {"service": "nope"})
    with pytest.raises(ConfigError) as info:
        store.validate(doc)
    (problem,) = [p for p in info.value.problems if p.severity == "error"]
    line = serialise(doc, "yaml").splitlines().index("  service: nope") + 1     # the key's own line
    assert str(problem).startswith(f"{store.path}:{line}: routes[0].service: unknown service 'nope'")


# --- persistence -----------------------------------------------------------------------------------

def test_commit_writes_atomically_and_keeps_the_previous_text_and_mode(tmp_path):
    store = store_for(tmp_path)
    path = tmp_path / "gateway.yaml"
    path.chmod(0o600)                            # it holds secrets: must stay private, .bak too
    before = path.read_text()
    loaded = store.validate(store.with_target("users", {"address": "127.0.0.1:9003"}))
    assert store.commit(loaded) == 2 and store.version == 2 and store.loaded is loaded
    assert path.read_text() == loaded.source
    assert yaml.safe_load(path.read_text())["services"]["users"]["targets"][-1] == {"address": "127.0.0.1:9003"}
    [backup] = backups(tmp_path)
    assert backup.read_text() == before
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gateway.yaml", backup.name]  # no temp left

    second = store.validate(store.without_target("users", "127.0.0.1:9003"))
    store.commit(second)
    assert backups(tmp_path)[-1].read_text() == loaded.source   # the newest backup = the version before


def backups(directory, name="gateway.yaml") -> list:
    """The backups beside `name`, oldest first (FILE.bak.<UTC time> sorts by time)."""
    found = sorted(directory.glob(f"{name}.bak.*"))
    assert all(re.fullmatch(re.escape(name) + r"\.bak\.\d{8}T\d{6}\.\d{6}Z", p.name) for p in found)
    return found


@pytest.mark.parametrize("keep", [5, 2, 0])
def test_admin_backups_keeps_the_newest_n(tmp_path, keep):
    doc = {**DOC, "admin": {**DOC["admin"], "backups": keep}}
    store = store_for(tmp_path, doc)
    path = tmp_path / "gateway.yaml"
    texts = [path.read_text()]
    for weight in range(2, keep + 4):                    # N+2 changes (and one more)
        apply(store, store.with_target_patch("users", "127.0.0.1:9001", {"weight": weight}))
        texts.append(path.read_text())
    found = backups(tmp_path)
    assert len(found) == keep                            # exactly N, the oldest removed
    assert [p.read_text() for p in found] == texts[-1 - keep:-1]   # the newest = before the last change
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["gateway.yaml", *(p.name for p in found)])


def test_admin_backups_is_checked(tmp_path):
    path = tmp_path / "gateway.yaml"
    text = yaml.safe_dump({**DOC, "admin": {**DOC["admin"], "backups": -1}}, sort_keys=False)
    path.write_text(text)
    line = text.splitlines().index("  backups: -1") + 1
    assert check_messages(str(path)) == [f"{path}:{line}: admin.backups: must be a number from 0 to 1000"]


def assert_failed_write_changes_nothing(store: ConfigStore, path) -> None:
    before, loaded_before = path.read_text(), store.loaded
    loaded = store.validate(store.with_target("users", {"address": "127.0.0.1:9003"}))
    with pytest.raises(ConfigWriteError, match="cannot write the config file"):
        store.commit(loaded)
    assert path.read_text() == before
    assert store.version == 1 and store.loaded is loaded_before
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".fastgw-")]


def test_failed_write_backup_unwritable_changes_nothing(tmp_path):
    # A name with no room for ".bak.<time>" (NAME_MAX is 255): fails even for root, unlike a
    # read-only directory.
    name = "g" * 240 + ".yaml"
    store = store_for(tmp_path, name=name)
    assert_failed_write_changes_nothing(store, tmp_path / name)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_failed_write_read_only_directory_changes_nothing(tmp_path):
    store = store_for(tmp_path)
    tmp_path.chmod(0o500)
    try:
        assert_failed_write_changes_nothing(store, tmp_path / "gateway.yaml")
    finally:
        tmp_path.chmod(0o700)


def test_symlinked_config_is_written_through(tmp_path):
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    store_for(real_dir)
    link = tmp_path / "gateway.yaml"
    link.symlink_to(real_dir / "gateway.yaml")
    store = ConfigStore(load_config(str(link)), CHECKS)
    apply(store, store.with_target("users", {"address": "127.0.0.1:9003"}))
    assert link.is_symlink() and "127.0.0.1:9003" in (real_dir / "gateway.yaml").read_text()
    assert len(backups(real_dir)) == 1


def test_env_references_survive_write_back(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTGW_TEST_ADMIN_TOKEN", "from-the-environment")
    doc = {**DOC, "admin": {"bind": "127.0.0.1:9901", "token": "${FASTGW_TEST_ADMIN_TOKEN}"}}
    store = store_for(tmp_path, doc)
    assert store.loaded.config.admin.token == "from-the-environment"
    apply(store, store.with_target("users", {"address": "127.0.0.1:9003"}))
    text = (tmp_path / "gateway.yaml").read_text()
    assert "${FASTGW_TEST_ADMIN_TOKEN}" in text and "from-the-environment" not in text
    assert store.loaded.config.admin.token == "from-the-environment"
    assert store.document["admin"]["token"] == "${FASTGW_TEST_ADMIN_TOKEN}"
    assert store.redacted()["admin"]["token"] == "${FASTGW_TEST_ADMIN_TOKEN}"   # a reference is no secret


def test_read_file_sees_an_external_edit_and_adopt_does_not_rewrite(tmp_path):
    store = store_for(tmp_path)
    path = tmp_path / "gateway.yaml"
    edited = {**DOC, "log": {"level": "debug"}}
    path.write_text("# edited by hand\n" + yaml.safe_dump(edited, sort_keys=False))
    loaded = store.read_file()
    assert loaded.config.log.level == "debug" and store.version == 1   # read, not committed
    assert store.adopt(loaded) == 2 and store.loaded is loaded
    assert path.read_text().startswith("# edited by hand\n")           # not rewritten
    assert not backups(tmp_path)
    path.write_text("listeners: [{name: x}]\n")
    with pytest.raises(ConfigError, match="missing required key 'bind'"):
        store.read_file()
    assert store.loaded is loaded


def test_toml_file_is_read_but_changes_are_refused(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text('[[listeners]]\nname = "public"\nbind = "127.0.0.1:8080"\n'
                    '[services.echo]\nkind = "echo"\n'
                    '[[routes]]\nname = "echo"\nservice = "echo"\n[routes.match]\npaths = ["/echo/**"]\n')
    before = path.read_text()
    store = ConfigStore(load_config(str(path)), CHECKS)
    assert not store.persistable and "TOML" in store.why_not
    doc = store.with_object("routes", "x", {"match": {"paths": ["/x"]}, "service": "echo"})
    with pytest.raises(ConfigWriteError, match="writing TOML back is not supported"):
        store.validate(doc)
    with pytest.raises(ConfigWriteError, match="TOML"):
        store.commit(store.loaded)
    assert path.read_text() == before and store.version == 1
    assert store.adopt(store.read_file()) == 2                         # reload still works


def test_embedded_default_changes_are_kept_in_memory(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTGW_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    store = ConfigStore(load_config(None), CHECKS)
    assert store.path is None and not store.persistable
    assert store.why_not == "no config file: changes are kept in memory only"
    with pytest.raises(ConfigError) as info:
        store.validate(store.with_object("routes", "echo", {"service": "nope"}))
    assert str(info.value.problems[0]).startswith(f"{DEFAULT_NAME}:")
    loaded = store.validate(store.with_object("routes", "more", {"match": {"paths": ["/more"]}, "service": "echo"}))
    assert store.commit(loaded) == 2 and store.loaded.config.routes[-1].name == "more"
    assert list(tmp_path.iterdir()) == []


# --- redaction and diff ----------------------------------------------------------------------------

def test_secrets_are_redacted_and_round_trip(tmp_path):
    store = store_for(tmp_path)
    shown = store.redacted()
    assert shown["admin"]["token"] == REDACTED
    creds = shown["consumers"][0]["credentials"]
    assert creds == {"api_keys": [REDACTED], "basic": [{"username": "acme", "password_hash": REDACTED}]}
    assert store.get_object("consumers", "acme")["credentials"] == creds
    assert store.redacted({"x": {"client_secret": "a", "password": "b", "secret": "${S:-x}"}}) == \
        {"x": {"client_secret": REDACTED, "password": REDACTED, "secret": "${S:-x}"}}
    assert store.redacted({"token": "pre-${T}"}) == {"token": REDACTED}   # part literal: still secret

    # GET then PUT, even with routes and consumers reordered, gives back the real values.
    shown["routes"].reverse()
    assert store.with_document(shown)["admin"]["token"] == "s3cret-admin-token"
    assert store.with_document(shown)["consumers"] == DOC["consumers"]
    consumer = store.get_object("consumers", "acme")
    consumer["groups"] = ["gold"]
    doc = store.with_object("consumers", "acme", consumer)
    assert doc["consumers"][0]["credentials"] == DOC["consumers"][0]["credentials"]
    apply(store, doc)
    assert store.loaded.config.consumers[0].credentials.api_keys == [API_KEY]

    with pytest.raises(ValueError, match="no current value"):
        store.with_document({**shown, "consumers": [{"name": "new", "credentials": {"api_keys": [REDACTED]}}]})
    with pytest.raises(ValueError, match="no current value"):
        store.with_object("consumers", "new", {"credentials": {"api_keys": [REDACTED]}})


def test_diff_names_what_changed(tmp_path):
    store = store_for(tmp_path)
    new = store.with_object("routes", "extra", {"match": {"paths": ["/x"]}, "service": "echo"})
    new = {**new, "log": {"level": "debug"}, "admin": {"bind": "127.0.0.1:9901", "token": "other"}}
    new["services"]["users"]["targets"][0]["weight"] = 1
    del new["services"]["echo"]
    new["consumers"] = []
    diff = store.diff(store.document, new)
    assert diff["services"] == {"added": [], "removed": ["echo"], "changed": ["users"]}
    assert diff["routes"] == {"added": ["extra"], "removed": [], "changed": []}
    assert diff["consumers"] == {"added": [], "removed": ["acme"], "changed": []}
    assert diff["settings"] == {"changed": ["admin.token", "log"]}
    assert "+- name: extra" in diff["text"] and "s3cret" not in diff["text"] and "other" not in diff["text"]
    assert store.diff(store.document, store.document)["text"] == ""


def test_diff_settings_are_leaf_paths(tmp_path):
    store = store_for(tmp_path, {**DOC, "log": {"level": "info", "access": {"format": "json"}}})
    new = store.document
    new["log"]["level"] = "debug"
    new["workers"] = 2
    assert store.diff(store.document, new)["settings"]["changed"] == ["log.level", "workers"]


# --- model: consumers, tracing, drain, workers ----------------------------------------------------

def problems_of(store: ConfigStore, doc: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        store.validate(doc)
    return [f"{p.path}: {p.message}" for p in info.value.problems if p.severity == "error"]


def test_consumer_checks(tmp_path):
    store = store_for(tmp_path)
    doc = store.with_object("consumers", "beta", {"credentials": {
        "api_keys": ["plain-key"], "basic": [{"username": "b", "password_hash": "hunter2"}]}})
    doc["consumers"].append({"name": "acme"})
    assert problems_of(store, doc) == [
        "consumers[2].name: duplicate consumer name 'acme' (first used at consumers[0].name)",
        "consumers[1].credentials.api_keys[0]: must be a hash from `fastgw hash key` "
        "(sha256:<64 hex digits>), never the key itself",
        "consumers[1].credentials.basic[0].password_hash: must be a hash from `fastgw hash password` "
        "(scrypt$n$r$p$salt$hash)",
    ]
    ok = store.with_object("consumers", "beta", {"credentials": {"jwt": [{"issuer": "https://i", "subject": "b"}]}})
    assert store.validate(ok).config.consumers[1].credentials.jwt[0].subject == "b"


def test_tracing_drain_workers(tmp_path):
    store = store_for(tmp_path)
    doc = {**store.document, "workers": "auto", "drain": {"delay": "2s", "timeout": "1m"},
           "tracing": {"propagate": "w3c", "sample_ratio": 0.25}}
    config = store.validate(doc).config
    assert (config.workers, config.drain.delay, config.drain.timeout) == ("auto", 2.0, 60.0)
    assert config.tracing.sample_ratio == 0.25 and config.tracing.otlp_endpoint is None
    assert store.validate({**doc, "workers": 1024}).config.workers == 1024
    assert store.validate(store.document).config.drain.timeout == 30.0       # the defaults
    for workers in (0, 1025):
        assert problems_of(store, {**doc, "workers": workers}) == \
            ["workers: must be 'auto' or a number from 1 to 1024"]
    assert problems_of(store, {**doc, "workers": "many"})[0].startswith("workers: ")
    assert problems_of(store, {**doc, "tracing": {"sample_ratio": 1.5}}) == \
        ["tracing.sample_ratio: must be between 0 and 1"]
    assert problems_of(store, {**doc, "tracing": {"propagate": "b3"}}) == \
        ["tracing.propagate: invalid value 'b3'; expected one of: w3c"]
    assert problems_of(store, {**doc, "drain": {"timeout": "soon"}})[0].startswith("drain.timeout: invalid duration")
