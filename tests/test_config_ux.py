"""What an operator meets in the first hour: duplicate keys, every problem in one `check` run,
plugin config errors as precise as core ones, and the CLI shortcuts. Each test runs the real CLI."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def fastgw(*args: str, cwd: Path, env: dict | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    if "FASTGW_CONFIG" not in (env or {}):
        environ.pop("FASTGW_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "fastgw", *args], cwd=cwd, env=environ, input=stdin,
                          capture_output=True, text=True, timeout=60)


def check(tmp_path: Path, text: str, name: str = "gateway.yaml") -> subprocess.CompletedProcess:
    (tmp_path / name).write_text(textwrap.dedent(text))
    return fastgw("check", "-c", name, cwd=tmp_path)


# --- duplicate keys ------------------------------------------------------------------------------

def test_duplicate_service_and_route_keys_are_refused_naming_both_lines(tmp_path):
    result = check(tmp_path, """\
        listeners: [{name: public, bind: "127.0.0.1:8080"}]
        services:
          users: {kind: echo}
          orders: {kind: echo}
          users: {targets: [{address: "127.0.0.1:9001"}]}
        routes:
          - name: users
            match: {paths: [/users]}
            service: users
            service: orders
        """)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "gateway.yaml:5: services.users: duplicate key (first at line 3)",
        "gateway.yaml:10: routes[0].service: duplicate key (first at line 9)",
    ]


def test_duplicate_keys_in_json_are_refused(tmp_path):
    result = check(tmp_path, """\
        {"listeners": [{"name": "public", "bind": "127.0.0.1:8080"}],
         "services": {"echo": {"kind": "echo"}},
         "routes": [{"name": "echo", "match": {"paths": ["/e"]}, "service": "echo",
                     "service": "echo"}]}
        """, name="gateway.json")
    assert result.returncode == 1
    assert result.stdout.splitlines() == ["gateway.json:4: routes[0].service: duplicate key (first at line 3)"]


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    result = check(tmp_path, """\
        listeners: [{name: public, bind: "127.0.0.1:8080"}]
        services:
          echo: &base {kind: echo}
        routes:
          - <<: {name: x, service: echo}
            name: echo
            match: {paths: [/e]}
        """)
    assert (result.returncode, result.stdout) == (0, "gateway.yaml: ok\n"), result.stdout
