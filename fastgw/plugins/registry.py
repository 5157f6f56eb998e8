"""Finding plugins by name, checking their config, and building each route's chain.

A plugin entry in the config is a one-key mapping, `{name: config}`. The name is a built-in, a
name registered by an installed package under the `fastgw.plugins` entry-point group, or
`python` with `{module: "pkg.mod:Class", config: {...}}`.
"""
from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any, Iterator

import msgspec

from fastgw.api import PHASES, Plugin, PluginContext
from fastgw.config.model import dec_hook
from fastgw.plugins.chain import Chain

BUILTIN = {
    "request_id": "fastgw.plugins.request_id:RequestId",
    "ip_filter": "fastgw.plugins.ip_filter:IpFilter",
    "cors": "fastgw.plugins.cors:Cors",
    "key_auth": "fastgw.plugins.key_auth:KeyAuth",
    "basic_auth": "fastgw.plugins.basic_auth:BasicAuth",
    "jwt": "fastgw.plugins.jwt_auth:JwtAuth",
    "oauth2_introspection": "fastgw.plugins.introspection:Introspection",
    "acl": "fastgw.plugins.acl:Acl",
    "mtls_auth": "fastgw.plugins.mtls_auth:MtlsAuth",
    "rate_limit": "fastgw.plugins.rate_limit:RateLimit",
    "cache": "fastgw.plugins.cache:Cache",
}


class PythonPluginConfig(msgspec.Struct, forbid_unknown_fields=True):
    module: str                                    # "pkg.mod:Class"
    config: dict[str, Any] = {}


def load_class(spec: str) -> type[Plugin]:
    """`pkg.mod:Class` -> the class; ValueError saying what is wrong."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{spec!r} is not 'package.module:Class'")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load {spec!r}: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, Plugin)):
        raise ValueError(f"{spec!r} is not a fastgw.Plugin subclass")
    if cls.phase not in PHASES:
        raise ValueError(f"{spec!r} has phase {cls.phase!r}: must be one of {', '.join(PHASES)}")
    return cls


def plugin_class(name: str) -> type[Plugin]:
    if name in BUILTIN:
        return load_class(BUILTIN[name])
    for ep in entry_points(group="fastgw.plugins"):
        if ep.name == name:
            return load_class(ep.value)
    raise ValueError(f"unknown plugin {name!r} (built in: {', '.join(sorted(BUILTIN))}, python; "
                     f"or one registered under the fastgw.plugins entry points)")


def resolve(entry: Any) -> tuple[str, type[Plugin], Any]:
    """One config entry -> (name, class, decoded config). ValueError / msgspec.ValidationError."""
    if not isinstance(entry, dict) or len(entry) != 1:
        raise ValueError("a plugin is written as a one-key mapping, like {key_auth: {header: x-api-key}}")
    (name, raw), = entry.items()
    if name == "python":
        spec = msgspec.convert(raw or {}, PythonPluginConfig)
        cls, raw = load_class(spec.module), spec.config
    else:
        cls = plugin_class(name)
    return name, cls, msgspec.convert(raw or {}, cls.Config, dec_hook=dec_hook)


def plugin_problems(config) -> Iterator[tuple[str, str]]:
    """(key path, message) for every plugin entry that cannot be used as written."""
    lists = [("plugins", config.plugins)] + [(f"routes[{i}].plugins", r.plugins) for i, r in enumerate(config.routes)]
    for where, entries in lists:
        for j, entry in enumerate(entries):
            path = f"{where}[{j}]"
            if isinstance(entry, dict) and len(entry) == 1:
                path += "." + next(iter(entry))
            try:
                _, cls, decoded = resolve(entry)
            except (ValueError, msgspec.ValidationError) as exc:
                yield path, str(exc)
                continue
            for sub, message in cls.check(decoded, config) if hasattr(cls, "check") else ():
                yield (f"{path}.{sub}" if sub else path), message


def build_chains(config, previous_instances: dict, previous_chains: dict) -> tuple[dict, dict]:
    """{route name: Chain or None} and the plugin instances by (name, config). An instance whose
    entry did not change is taken over from the previous config (its caches survive a reload), and
    so is a chain whose instances are all the same."""
    context = PluginContext(config.consumers, config.cluster)
    instances: dict = {}

    def instance(entry, route: str = "") -> Plugin:
        # Plugins whose state is per route (rate limits) get an instance per route; the others
        # are shared by every entry written the same (one JWKS cache for all routes).
        scoped = route if isinstance(entry, dict) and "rate_limit" in entry else ""
        key = msgspec.json.encode(entry) + scoped.encode()
        found = instances.get(key) or previous_instances.get(key)
        if found is None:
            _, cls, decoded = resolve(entry)
            found = cls(decoded)
            if scoped:
                found.scope_to(scoped)
            found.setup(context)
        elif found not in instances.values():
            found.setup(context)                   # consumers may have changed
        instances[key] = found
        return found

    global_plugins = [instance(e) for e in config.plugins]
    chains = {}
    for route in config.routes:
        plugins = global_plugins + [instance(e, route.name) for e in route.plugins]
        if not plugins:
            chains[route.name] = None
            continue
        order = sorted(range(len(plugins)), key=lambda k: (PHASES.index(plugins[k].phase), -plugins[k].priority, k))
        ordered = tuple(plugins[k] for k in order)
        old = previous_chains.get(route.name)
        chains[route.name] = old if old is not None and old.plugins == ordered else Chain(ordered)
    return chains, instances
