"""The config document behind the admin API: edits, validation, atomic persistence.

Edits work on the document as written in the file (before `${ENV}` substitution), so a secret
given as `${VAR}` stays a reference when the file is written back. A changed document is
serialised in the file's format and loaded exactly like `fastgw check` loads a file, so an invalid
change is reported with the same `file:line: key: message` lines, against the file that would have
been written. Writing back does not keep YAML comments or layout (the document is dumped anew);
the previous text is kept in `FILE.bak.<UTC time>`, the last `admin.backups` of them. TOML files are read but never written (there is no TOML
writer in the standard library): admin changes to a TOML-configured gateway are refused. Without a
file (the embedded default) changes are allowed but kept in memory only.
"""
from __future__ import annotations

import copy
import datetime
import difflib
import json
import os
import re
import stat
import tempfile

import yaml

from fastgw.config.api_rules import change_problems, python_modules
from fastgw.config.errors import ConfigError, ConfigWriteError, ConflictError
from fastgw.config.load import DEFAULT_NAME, Checks, LoadedConfig, load_config, load_text, pin_problems
from fastgw.config.model import Admin
from fastgw.log import log

REDACTED = "<redacted>"
SECRET_KEYS = {"token", "secret", "password", "password_hash", "client_secret", "api_keys"}
DEFAULT_BACKUPS = Admin().backups        # a config without `admin:` (changes through cluster sync)
LIST_KINDS = ("routes", "consumers")        # lists of objects with a `name`
TARGET_PATCH_KEYS = {"weight", "drain"}
# Header maps (edits, `respond.headers`, match conditions) whose entries are redacted by the
# header's name: credentials sent to upstreams or matched on.
HEADER_MAPS = {"set", "add", "headers"}
_CREDENTIAL_HEADER = re.compile(r"^(?:(?:proxy-)?authorization|cookie|set-cookie|.*-(?:key|token|secret|password))\Z",
                                re.I)
# A URL with userinfo (RFC 3986 §3.2.1: `redis://:password@host`), or a query parameter named like a
# credential (`?access_token=...`).
_CREDENTIAL_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://(?:[^/?#]*@|[^#]*[?&][^=&#]*"
                             r"(?:token|key|secret|password|sig|auth)[^=&#]*=)", re.I)
# A value made only of `${VAR}` / `${VAR:-default}` references names secrets without holding them.
_ENV_ONLY = re.compile(r"^(?:\$\{[A-Za-z_][A-Za-z0-9_]*(?::-[^}]*)?\})+$")


class ConfigStore:
    """The current config (`loaded`, numbered by `version`) and the edits the admin API makes
    to it. Edits return new documents; `validate` then `commit` makes one current."""

    def __init__(self, loaded: LoadedConfig, checks: Checks):
        self.loaded = loaded
        # Every config the store takes is checked like the file at start (fastgw/runtime/load.py).
        self.checks = checks
        self.version = 1
        # Python plugin modules imported from configs read from disk: the only ones a change
        # through the admin API may name (fastgw/config/api_rules.py).
        self.modules = python_modules(loaded.config)

    # --- what is current -------------------------------------------------------------------------

    @property
    def path(self) -> str | None:
        return self.loaded.path

    @property
    def document(self) -> dict:
        return copy.deepcopy(self.loaded.document)

    @property
    def persistable(self) -> bool:
        return self.path is not None and self.loaded.fmt != "toml"

    @property
    def why_not(self) -> str | None:
        """Why changes are not written to a file (None when they are)."""
        if self.path is None:
            return "no config file: changes are kept in memory only"
        if self.loaded.fmt == "toml":
            return (f"{self.path}: writing TOML back is not supported; convert the file to YAML or "
                    "JSON to change the config through the admin API")
        return None

    # --- loading and committing ------------------------------------------------------------------

    def read_file(self) -> LoadedConfig:
        """The file as it is on disk now (SIGHUP, POST /reload); raises ConfigError. The operator
        wrote it, so the python plugin modules it names may be named by admin changes too."""
        if self.path is None:
            return self.loaded
        loaded = load_config(self.path, checks=self.checks)
        self.modules |= python_modules(loaded.config)
        return loaded

    def check_change(self, document: dict) -> dict:
        """`document`, sent to the admin API, if it only does what such a change may (no new
        code, `${VAR}` or file names); raises ConfigError without loading or importing anything."""
        problems = change_problems(document, self.loaded.document, self.modules)
        if problems:
            fmt = "json" if self.loaded.fmt == "json" else "yaml"
            raise ConfigError(pin_problems(problems, serialise(document, fmt), self.path or DEFAULT_NAME, fmt))
        return document

    def validate(self, document: dict) -> LoadedConfig:
        """Load `document` as the file that would be written; raises ConfigError, or
        ConfigWriteError for a TOML file (there is no file that would be written)."""
        if self.loaded.fmt == "toml":
            raise ConfigWriteError(self.why_not)
        text = serialise(document, self.loaded.fmt)
        return load_text(text, self.path or DEFAULT_NAME, self.loaded.fmt, path=self.path, checks=self.checks)

    def commit(self, loaded: LoadedConfig) -> int:
        """Write `loaded` to the config file atomically, then make it current; on
        ConfigWriteError nothing changed (file, version and current config)."""
        if self.loaded.fmt == "toml":
            raise ConfigWriteError(self.why_not)
        if self.path is not None:
            admin = loaded.config.admin
            _write_atomically(self.path, loaded.source, admin.backups if admin is not None else DEFAULT_BACKUPS)
        return self.adopt(loaded)

    def adopt(self, loaded: LoadedConfig) -> int:
        """Make `loaded` current without writing it (it was read from the file)."""
        self.loaded = loaded
        self.version += 1
        return self.version

    # --- edits: each returns a new document --------------------------------------------------------

    def get_object(self, kind: str, name: str) -> dict:
        return redact(_find(self.loaded.document, kind, name)[1])

    def list_objects(self, kind: str) -> dict | list:
        """Every object of `kind` as `get_object` shows it: services by name, routes and
        consumers as a list in file order (route order is match order)."""
        value = self.loaded.document.get(kind)
        return redact(value if value is not None else ({} if kind == "services" else []))

    def with_object(self, kind: str, name: str, obj: dict) -> dict:
        if not isinstance(obj, dict):
            raise ValueError(f"a {kind[:-1]} must be a JSON object")
        doc = self.document
        if kind == "services":
            doc.setdefault("services", {})
            if not isinstance(doc["services"], dict):
                raise ValueError("services must be a mapping")
            doc["services"][name] = _unredact(obj, doc["services"].get(name))
            return doc
        if obj.get("name", name) != name:
            raise ValueError(f"the body names {obj['name']!r} but the URL names {name!r}")
        obj = {"name": name, **obj}               # the name first, as people write it
        items = doc.setdefault(kind, [])
        if not isinstance(items, list):
            raise ValueError(f"{kind} must be a list")
        for i, item in enumerate(items):
            if isinstance(item, dict) and item.get("name") == name:
                items[i] = _unredact(obj, item)     # replaced in place: route order is match order
                return doc
        items.append(_unredact(obj, None))          # new: a <redacted> here has nothing to keep
        return doc

    def without_object(self, kind: str, name: str) -> dict:
        doc = self.document
        container, _ = _find(doc, kind, name)
        if kind == "services":
            del container[name]
        else:
            container[:] = [i for i in container if not (isinstance(i, dict) and i.get("name") == name)]
        return doc

    def with_target(self, service: str, target: dict) -> dict:
        doc = self.document
        targets = _targets(doc, service)
        if not isinstance(target, dict) or not isinstance(target.get("address"), str):
            raise ValueError("a target needs an address: {\"address\": \"host:port\"}")
        if any(t.get("address") == target["address"] for t in targets):
            raise ConflictError(f"service {service!r} already has target {target['address']}")
        targets.append(target)
        return doc

    def with_target_patch(self, service: str, address: str, patch: dict) -> dict:
        unknown = set(patch) - TARGET_PATCH_KEYS if isinstance(patch, dict) else set()
        if not isinstance(patch, dict) or not patch or unknown:
            raise ValueError(f"a target PATCH sets {' and/or '.join(sorted(TARGET_PATCH_KEYS))}"
                             + (f"; not {', '.join(sorted(unknown))}" if unknown else ""))
        doc = self.document
        target = _target(doc, service, address)
        for key, value in patch.items():
            if key == "drain" and value is False:
                target.pop("drain", None)             # re-enabled: back to the default
            else:
                target[key] = value
        return doc

    def without_target(self, service: str, address: str) -> dict:
        doc = self.document
        targets = _targets(doc, service)
        _target(doc, service, address)
        targets[:] = [t for t in targets if t.get("address") != address]
        return doc

    def with_document(self, document: dict) -> dict:
        """PUT /config: `<redacted>` values take the current value at the same key path, so
        the document from GET /config can be edited and sent back."""
        if not isinstance(document, dict):
            raise ValueError("the config must be a JSON object")
        return _unredact(copy.deepcopy(document), self.loaded.document)

    # --- views -----------------------------------------------------------------------------------

    def redacted(self, document: dict | None = None) -> dict:
        return redact(self.loaded.document if document is None else document)

    def diff(self, old: dict, new: dict) -> dict:
        out: dict = {}
        for kind in ("services", *LIST_KINDS):
            before, after = _by_name(old, kind), _by_name(new, kind)
            out[kind] = {"added": sorted(after.keys() - before.keys()),
                         "removed": sorted(before.keys() - after.keys()),
                         "changed": sorted(k for k in before.keys() & after.keys() if before[k] != after[k])}
        named = ("services", *LIST_KINDS)
        out["settings"] = {"changed": _changed_paths({k: v for k, v in old.items() if k not in named},
                                                     {k: v for k, v in new.items() if k not in named})}
        fmt = "json" if self.loaded.fmt == "json" else "yaml"
        out["text"] = "".join(difflib.unified_diff(
            serialise(redact(old), fmt).splitlines(True), serialise(redact(new), fmt).splitlines(True),
            "running", "proposed"))
        return out


def serialise(document: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    return yaml.dump(document, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False,
                     allow_unicode=True, default_flow_style=False)


def redact(value, key: str | None = None, secret: bool = False):
    """A copy with secret values replaced by `<redacted>`: those under secret keys, header values
    named like credentials, URLs holding credentials. `${VAR}` references are shown."""
    if isinstance(value, dict):
        headers = key in HEADER_MAPS
        return {k: redact(v, k, headers and isinstance(k, str) and bool(_CREDENTIAL_HEADER.match(k)))
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key, secret) for v in value]
    if isinstance(value, str) and not _ENV_ONLY.match(value) and (
            secret or key in SECRET_KEYS or _CREDENTIAL_URL.match(value)):
        return REDACTED
    return value


def _changed_paths(old, new, prefix: str = "") -> list[str]:
    """Dotted key paths whose value differs (`log.level`); lists and scalars compare whole."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [prefix] if old != new else []
    paths: list[str] = []
    for key in [*old, *(k for k in new if k not in old)]:
        paths += _changed_paths(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else str(key))
    return paths


def _unredact(new, old):
    """`new` with every `<redacted>` replaced by the value at the same place in `old`."""
    if new == REDACTED:
        if old is None or old == REDACTED:
            raise ValueError("a <redacted> value has no current value to keep: send the secret itself")
        return old
    if isinstance(new, dict):
        return {k: _unredact(v, old.get(k) if isinstance(old, dict) else None) for k, v in new.items()}
    if isinstance(new, list):
        if isinstance(old, list) and all(isinstance(i, dict) and "name" in i for i in new):
            # Lists of named objects (routes, consumers) may be reordered: match by name.
            by_name = {i.get("name"): i for i in old if isinstance(i, dict)}
            return [_unredact(v, by_name.get(v["name"])) for v in new]
        olds = old if isinstance(old, list) else []
        return [_unredact(v, olds[i] if i < len(olds) else None) for i, v in enumerate(new)]
    return new


def _find(doc: dict, kind: str, name: str):
    """(the container holding the object, the object); LookupError when it is not there."""
    container = doc.get(kind)
    if kind == "services":
        if isinstance(container, dict) and name in container:
            return container, container[name]
    elif isinstance(container, list):
        for item in container:
            if isinstance(item, dict) and item.get("name") == name:
                return container, item
    raise LookupError(f"no {kind[:-1]} named {name!r}")


def _by_name(doc: dict, kind: str) -> dict:
    value = doc.get(kind) or ({} if kind == "services" else [])
    if isinstance(value, dict):
        return value
    return {i.get("name"): i for i in value if isinstance(i, dict)}


def _targets(doc: dict, service: str) -> list:
    _, svc = _find(doc, "services", service)
    if not isinstance(svc, dict):
        raise ValueError(f"service {service!r} is not a mapping")
    targets = svc.setdefault("targets", [])
    if not isinstance(targets, list):
        raise ValueError(f"services.{service}.targets is not a list")
    return targets


def _target(doc: dict, service: str, address: str) -> dict:
    for t in _targets(doc, service):
        if isinstance(t, dict) and t.get("address") == address:
            return t
    raise LookupError(f"service {service!r} has no target {address}")


def _write_atomically(path: str, text: str, backups: int) -> None:
    """Temp file in the same directory, fsync, previous version to FILE.bak.<UTC time> (when
    `backups` > 0), rename, fsync dir: after a crash the file is the old or the new text, never a
    mix. A symlinked config file is written through (the link stays a link); the file and its
    backups keep the original permission bits, since the backups hold the same secrets. Then only
    the newest `backups` backups are kept."""
    real = os.path.realpath(path)
    try:
        mode = stat.S_IMODE(os.stat(real).st_mode)
        if backups:
            with open(real, "rb") as f:
                previous = f.read()
            stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
            _replace(f"{real}.bak.{stamp}", previous, mode)
        _replace(real, text.encode("utf-8"), mode)
        dir_fd = os.open(os.path.dirname(real), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise ConfigWriteError(f"{path}: cannot write the config file: {exc.strerror or exc}") from None
    _rotate_backups(real, backups)


def backup_files(real: str) -> list[str]:
    """The backups of the config file at `real` (a resolved path), oldest first: the UTC time in
    their names sorts them."""
    directory, name = os.path.split(real)
    pattern = re.compile(re.escape(name) + r"\.bak\.\d{8}T\d{6}\.\d{6}Z\Z")
    return sorted(os.path.join(directory, n) for n in os.listdir(directory) if pattern.match(n))


def _rotate_backups(real: str, keep: int) -> None:
    """Remove all but the newest `keep` backups. The change is written already: a backup that
    cannot be removed is logged, not an error."""
    try:
        old = backup_files(real)
        for backup in old[:max(0, len(old) - keep)]:
            os.unlink(backup)
    except OSError as exc:
        log(f"{real}: cannot remove an old backup: {exc.strerror or exc}", "warning")


def _replace(path: str, data: bytes, mode: int) -> None:
    """Write `data` to a temp file beside `path`, fsync it, rename it over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=".fastgw-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
