"""Every YAML block in the README passes `fastgw check` as written.

A block is a whole config unless the line before its fence marks it as a fragment:

- `<!-- fragment -->`: top-level keys, merged into a minimal config (one listener);
- `<!-- fragment: listeners -->` / `routes` / `services`: items of that list or mapping;
- `<!-- fragment: route -->`: keys of one route (its `plugins:`, say).

Services and client profiles a fragment names but does not define are added (plain proxy services,
profiles matched by a header), and the files it
names (certificates, keys, CA bundles, gRPC descriptor sets) are made for the check, so that what is
checked is the documentation's own text.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from certs import make_ca_and_certs
from upstreams import free_port

README = Path(__file__).resolve().parent.parent / "README.md"
FENCE = re.compile(r"^```yaml\n(.*?)^```", re.S | re.M)
MARK = re.compile(r"^<!-- fragment(?::\s*(\w+))? -->$")


def _blocks():
    text = README.read_text()
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = MARK.match(before)
        kind = (mark.group(1) or "config") if mark else "whole"
        yield pytest.param(kind, m.group(1), id=f"README.md:{line}")


def _wrap(kind: str, doc):
    """The config `fastgw check` reads for a block of this kind."""
    if kind == "whole":
        return doc
    config = {"version": 1, "listeners": [{"name": "readme", "bind": f"127.0.0.1:{free_port()}"}]}
    if kind == "config":
        for key, value in doc.items():
            if key == "listeners":
                config["listeners"] += value
            else:
                config[key] = value
    elif kind in ("listeners", "routes"):
        config[kind] = (config.get(kind) or []) + doc
    elif kind == "services":
        config["services"] = doc
    elif kind == "route":
        config["routes"] = [{"name": "readme", "service": "readme", **doc}]
    else:
        raise AssertionError(f"unknown fragment kind {kind!r}")
    services = config.setdefault("services", {})
    for name in _named_services(config):
        services.setdefault(name, {"targets": [{"address": "127.0.0.1:9"}]})
    clients = config.setdefault("clients", {})
    for name in _named_profiles(config):
        clients.setdefault(name, {"match": {"headers": {"x-readme-profile": name}}})
    return config


def _named_profiles(config) -> set[str]:
    names = set()
    for route in config.get("routes") or []:
        names.update(route.get("profiles") or {})
        profile = (route.get("match") or {}).get("profile")
        names.update([profile] if isinstance(profile, str) else profile or [])
    return names


def _named_services(config) -> set[str]:
    names = set()
    for route in config.get("routes") or []:
        names.add(route.get("service"))
        names.add((route.get("grpc") or {}).get("service"))
        names.update(b.get("service") for b in (route.get("aggregate") or {}).get("backends", []))
        names.update(s.get("service") for s in route.get("split") or [])
    for listener in config.get("listeners") or []:
        names.add(listener.get("service"))
        names.update(((listener.get("tls") or {}).get("sni_routes") or {}).values())
    return {n for n in names if n}


def _make_files(config, workdir: Path) -> None:
    """Certificates, keys, CA files and descriptor sets the config names, made for real."""
    for listener in config.get("listeners") or []:
        tls = listener.get("tls") or {}
        for entry in tls.get("certificates") or []:
            ca, certs = make_ca_and_certs(workdir, ["readme.test"], prefix=Path(entry["cert"]).stem)
            cert, key = certs["readme.test"]
            for name, source in ((entry["cert"], cert), (entry["key"], key)):
                (workdir / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(source, workdir / name)
            if tls.get("client_ca"):
                (workdir / tls["client_ca"]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ca, workdir / tls["client_ca"])
    for service in (config.get("services") or {}).values():
        descriptors = ((service or {}).get("grpc") or {}).get("descriptors")
        if descriptors:
            from grpc_fixtures import build_inventory_descriptors
            (workdir / descriptors).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(build_inventory_descriptors(workdir / "protoc"), workdir / descriptors)


@pytest.mark.parametrize("kind, text", list(_blocks()))
def test_readme_yaml_block_passes_check(kind, text, tmp_path):
    config = _wrap(kind, yaml.safe_load(text))
    _make_files(config, tmp_path)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False) if kind != "whole" else text)
    env = {"PATH": "/usr/bin:/bin", "FASTGW_ADMIN_TOKEN": "readme-token"}
    done = subprocess.run([sys.executable, "-m", "fastgw", "check", "-c", str(path)], capture_output=True,
                          text=True, env=env, cwd=README.parent, timeout=60)
    assert done.returncode == 0, f"fastgw check refused the README's block:\n{done.stdout}{done.stderr}\n{text}"
