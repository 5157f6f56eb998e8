"""The CLI as a user runs it: a real `python -m fastgw` subprocess, checking exit codes and output."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

VALID = textwrap.dedent("""\
    listeners: [{name: public, bind: "127.0.0.1:8080"}]
    services: {echo: {kind: echo}}
    routes:
      - {name: echo, match: {paths: ["/echo/**"]}, service: echo}
    """)

# A typo in a key, and a reference to a service that does not exist.
INVALID_SCHEMA = VALID + "  - name: bad\n    mathc: {paths: [/x]}\n"
INVALID_SEMANTIC = VALID + "  - name: bad\n    service: nope\n"


def fastgw(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # Run from tmp_path so file names in messages are the relative names the user typed.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("FASTGW_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "fastgw", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def configs(tmp_path):
    for name, text in [("ok.yaml", VALID), ("schema.yaml", INVALID_SCHEMA), ("semantic.yaml", INVALID_SEMANTIC),
                       ("warn.yaml", VALID.replace("echo: {kind: echo}", "echo: {kind: echo}, spare: {kind: echo}"))]:
        (tmp_path / name).write_text(text)
    return tmp_path


def test_check_valid(configs):
    result = fastgw("check", "-c", "ok.yaml", cwd=configs)
    assert (result.returncode, result.stdout) == (0, "ok.yaml: ok\n")


def test_check_valid_with_warning(configs):
    result = fastgw("check", "-c", "warn.yaml", cwd=configs)
    assert result.returncode == 0
    assert result.stdout.splitlines() == [
        "warn.yaml:2: services.spare: warning: service 'spare' is not used by any route", "warn.yaml: ok"]


@pytest.mark.parametrize("name, expected", [
    ("schema.yaml", "schema.yaml:6: routes[1].mathc: unknown key 'mathc'; did you mean 'match'?"),
    ("semantic.yaml", "semantic.yaml:6: routes[1].service: unknown service 'nope' (defined: echo)"),
])
def test_check_invalid(configs, name, expected):
    result = fastgw("check", "-c", name, cwd=configs)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [expected]
    assert re.fullmatch(r"[\w.]+:\d+: [\w.\[\]]+: .+", expected)


def test_check_missing_file(configs):
    result = fastgw("check", "-c", "nope.yaml", cwd=configs)
    assert result.returncode == 1
    assert result.stdout.startswith("nope.yaml: cannot read the file")


@pytest.mark.parametrize("args", [["check"], ["check", "-c"], ["frobnicate"], [], ["check", "-c", "x", "--bogus"]])
def test_usage_errors_exit_2(configs, args):
    result = fastgw(*args, cwd=configs)
    assert result.returncode == 2
    assert "usage:" in result.stderr


def test_check_json_valid(configs):
    result = fastgw("check", "-c", "warn.yaml", "--json", cwd=configs)
    assert result.returncode == 0
    report = json.loads(result.stdout)
    assert report["valid"] is True and report["errors"] == []
    assert report["warnings"] == [{"file": "warn.yaml", "line": 2, "path": "services.spare",
                                   "message": "service 'spare' is not used by any route"}]


def test_check_json_invalid(configs):
    result = fastgw("check", "-c", "schema.yaml", "--json", cwd=configs)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["valid"] is False and report["warnings"] == []
    assert report["errors"] == [{"file": "schema.yaml", "line": 6, "path": "routes[1].mathc",
                                 "message": "unknown key 'mathc'; did you mean 'match'?"}]


def test_schema_is_json_with_listeners(configs):
    result = fastgw("schema", cwd=configs)
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert "listeners" in schema["$defs"]["Config"]["properties"]
    assert "listeners" in result.stdout


def test_version_line(configs):
    result = fastgw("version", cwd=configs)
    assert result.returncode == 0
    assert re.fullmatch(r"fastgw \d+\.\d+\.\d+\S* \(core: (compiled|missing)\) uvloop \S+ httptools \S+ "
                        r"msgspec \S+ python \d+\.\d+\.\d+\S*\n", result.stdout)


ROUTES_YAML = """\
listeners: [{name: p, bind: "127.0.0.1:8181"}]
services:
  users: {targets: [{address: "127.0.0.1:9001"}]}
routes:
  - name: files
    match: {paths: ["/files/{rest...}"]}
    service: users
    rewrite: {strip_prefix: /files}
  - name: users-v2
    match: {hosts: [api.example.com], paths: ["/v2/users/{id}"], methods: [GET]}
    priority: 10
    service: users
    rewrite: {path: "/users/{id}"}
  - name: gone
    match: {paths: ["/old/**"]}
    respond: {status: 410, json: {error: gone}}
"""


def test_routes_prints_the_table_in_match_order(tmp_path):
    (tmp_path / "r.yaml").write_text(ROUTES_YAML)
    out = fastgw("routes", "-c", "r.yaml", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    names = [line.split()[0] for line in out.stdout.splitlines()[1:]]
    assert names == ["users-v2", "files", "gone"]           # priority 10 first, then file order
    assert "respond 410" in out.stdout and "/v2/users/{id}" in out.stdout


@pytest.mark.parametrize("request_line, route, upstream_path", [
    ("GET http://api.example.com/v2/users/7?x=1", "users-v2", "/users/7?x=1"),
    ("GET /files/a/b.txt", "files", "/a/b.txt"),
])
def test_routes_match_explains_a_request(tmp_path, request_line, route, upstream_path):
    (tmp_path / "r.yaml").write_text(ROUTES_YAML)
    out = fastgw("routes", "-c", "r.yaml", "--match", request_line, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert f"route: {route}" in out.stdout
    assert f"upstream_path: {upstream_path}" in out.stdout


def test_routes_match_without_a_route_exits_1(tmp_path):
    (tmp_path / "r.yaml").write_text(ROUTES_YAML)
    out = fastgw("routes", "-c", "r.yaml", "--match", "POST http://api.example.com/v2/users/7",
                 cwd=tmp_path)
    assert out.returncode == 1 and "no route" in out.stdout
