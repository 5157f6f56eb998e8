"""What a change through the admin API may not do that a file on disk may.

Whoever can reach the admin API can change routing, but must not gain more than that: running
code, reading the gateway's environment or choosing which files it reads and writes stays with
whoever writes the config file. So, comparing the changed document with the current one:

- a `python: {module: ...}` plugin names a module already imported from a config read from disk
  (at start or by a reload from disk): checking a change never imports anything new;
- a `${VAR}` reference (which the loader would expand from the environment) is the one the file
  already has at that place: a new reference is refused, never expanded (`$${` is a literal `${`);
- a file name (certificates, keys, CAs, gRPC descriptors, JWT keys) is one the current config
  already reads, and `log.access.path` stays as it is (or becomes `-` / null: stdout / off).
"""
from __future__ import annotations

from typing import Any, Iterator

from fastgw.config.errors import ConfigProblem
from fastgw.config.load import format_path, has_env_reference

# File names in plugin settings, by plugin (the loader resolves the same ones).
PLUGIN_FILES = {"jwt": ("public_keys", "jwks_ca"), "oauth2_introspection": ("endpoint_ca",)}
NO_FILE = ("-", None)


def python_modules(config) -> set[str]:
    """The modules of the `python` plugins of a decoded config."""
    entries = [*config.plugins, *(e for route in config.routes for e in route.plugins)]
    return {_module(e["python"]) for e in entries
            if isinstance(e, dict) and isinstance(e.get("python"), dict) and _module(e["python"])}


def change_problems(new: dict, current: dict, modules: set[str]) -> list[ConfigProblem]:
    """Problems (key paths only) of `new`, a document sent to the admin API."""
    return [*_module_problems(new, modules), *_reference_problems(new, current, []),
            *_file_problems(new, current)]


def _module(settings: dict) -> str:
    spec = settings.get("module")
    return spec.partition(":")[0] if isinstance(spec, str) else ""


def _plugin_entries(doc: dict) -> Iterator[tuple[list, str, Any]]:
    """([key path], plugin name, settings) of every plugin entry, global and per route."""
    lists = [(["plugins"], doc.get("plugins"))]
    routes = doc.get("routes")
    if isinstance(routes, list):
        lists += [(["routes", i, "plugins"], r.get("plugins")) for i, r in enumerate(routes) if isinstance(r, dict)]
    for path, entries in lists:
        for j, entry in enumerate(entries if isinstance(entries, list) else []):
            if isinstance(entry, dict) and len(entry) == 1:
                (name, settings), = entry.items()
                yield [*path, j, name], name, settings


def _module_problems(doc: dict, modules: set[str]) -> Iterator[ConfigProblem]:
    for path, name, settings in _plugin_entries(doc):
        if name != "python" or not isinstance(settings, dict):
            continue
        module = _module(settings)
        if module and not has_env_reference(module) and module not in modules:
            yield ConfigProblem(format_path([*path, "module"]),
                                f"module {module!r} was not loaded from the config file: a python "
                                "plugin is added in the file (and a reload), not through the admin API")


def _reference_problems(new: Any, old: Any, path: list) -> Iterator[ConfigProblem]:
    """Strings with `${VAR}` that differ from the value at the same place in the current document
    (named routes and consumers are matched by name, the rest by position)."""
    if isinstance(new, str):
        if has_env_reference(new) and new != old:
            yield ConfigProblem(format_path(path), f"{new!r}: ${{VAR}} is expanded only in files read "
                                "from disk, not in changes through the admin API (write $${ for a literal ${)")
    elif isinstance(new, dict):
        for key, value in new.items():
            yield from _reference_problems(value, old.get(key) if isinstance(old, dict) else None, [*path, key])
    elif isinstance(new, list):
        olds = old if isinstance(old, list) else []
        by_name = {o.get("name"): o for o in olds if isinstance(o, dict)}
        for i, value in enumerate(new):
            if isinstance(value, dict) and "name" in value:
                counterpart = by_name.get(value["name"])
            else:
                counterpart = olds[i] if i < len(olds) else None
            yield from _reference_problems(value, counterpart, [*path, i])


def _file_names(doc: dict) -> Iterator[tuple[list, Any]]:
    """([key path], value) of every setting that names a file the gateway reads."""
    listeners = doc.get("listeners")
    for i, listener in enumerate(listeners if isinstance(listeners, list) else []):
        tls = listener.get("tls") if isinstance(listener, dict) else None
        if not isinstance(tls, dict):
            continue
        yield ["listeners", i, "tls", "client_ca"], tls.get("client_ca")
        certificates = tls.get("certificates")
        for j, cert in enumerate(certificates if isinstance(certificates, list) else []):
            if isinstance(cert, dict):
                for key in ("cert", "key"):
                    yield ["listeners", i, "tls", "certificates", j, key], cert.get(key)
    services = doc.get("services")
    for name, service in (services.items() if isinstance(services, dict) else ()):
        if not isinstance(service, dict):
            continue
        tls, grpc = service.get("tls"), service.get("grpc")
        for key in ("ca", "client_cert", "client_key"):
            yield ["services", name, "tls", key], tls.get(key) if isinstance(tls, dict) else None
        yield ["services", name, "grpc", "descriptors"], grpc.get("descriptors") if isinstance(grpc, dict) else None
    for path, plugin, settings in _plugin_entries(doc):
        for key in PLUGIN_FILES.get(plugin, ()):
            value = settings.get(key) if isinstance(settings, dict) else None
            for j, item in enumerate(value) if isinstance(value, list) else [(None, value)]:
                yield [*path, key, *([] if j is None else [j])], item


def _access_log(doc: dict) -> Any:
    log = doc.get("log")
    access = log.get("access") if isinstance(log, dict) else None
    return access.get("path", "-") if isinstance(access, dict) else "-"


def _file_problems(new: dict, current: dict) -> Iterator[ConfigProblem]:
    known = {value for _, value in _file_names(current) if value is not None}
    for path, value in _file_names(new):
        if value is not None and value not in known:
            yield ConfigProblem(format_path(path), f"{value!r} is not a file the running config reads: "
                                "file names are set in the config file, not through the admin API")
    access = _access_log(new)
    if access not in NO_FILE and access != _access_log(current):
        yield ConfigProblem("log.access.path", f"{access!r}: the access log file is set in the config "
                            "file, not through the admin API (- or null are allowed)")
