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


# --- every problem in one run --------------------------------------------------------------------

def test_check_reports_environment_schema_and_references_in_one_run(tmp_path):
    result = check(tmp_path, """\
        listeners: [{name: public, bind: "${GW_TEST_UNSET_BIND}"}]
        services:
          echo: {kind: echo}
          broken: {kind: echo, timeouts: {connect: fast}}
        routes:
          - name: a
            match: {paths: [/a]}
            service: broken
          - name: b
            mathc: {paths: [/b]}
            service: echo
          - name: c
            match: {paths: [/c]}
            service: nope
        """)
    assert result.returncode == 1
    # No follow-on errors: not "'' is not host:port" for the unset variable, not "unknown
    # service 'broken'" for route a (its service has its own error), nothing about route b.
    assert result.stdout.splitlines() == [
        "gateway.yaml:1: listeners[0].bind: environment variable GW_TEST_UNSET_BIND is not set "
        "(write ${GW_TEST_UNSET_BIND:-default} to give a default)",
        "gateway.yaml:4: services.broken.timeouts.connect: invalid duration 'fast': write it like 250ms, "
        "5s, 2m or 1h",
        "gateway.yaml:10: routes[1].mathc: unknown key 'mathc'; did you mean 'match'?",
        "gateway.yaml:14: routes[2].service: unknown service 'nope' (defined: echo)",
    ]


def test_a_route_after_a_broken_one_keeps_its_index(tmp_path):
    result = check(tmp_path, """\
        listeners: [{name: public, bind: "127.0.0.1:8080"}]
        services: {echo: {kind: echo}}
        routes:
          - {name: a, match: {paths: [/a]}, service: echo, priority: high}
          - {name: b, match: {paths: [/b], methods: ["G T"]}, service: echo}
        """)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "gateway.yaml:4: routes[0].priority: expected int, got str",
        "gateway.yaml:5: routes[1].match.methods[0]: 'G T' is not a valid HTTP method token",
    ]


# --- plugin config errors ------------------------------------------------------------------------

def test_plugin_config_errors_name_the_key_its_line_and_the_choices(tmp_path):
    result = check(tmp_path, """\
        listeners: [{name: public, bind: "127.0.0.1:8080"}]
        services: {echo: {kind: echo}}
        plugins:
          - request_id:
              zzz: 1
        routes:
          - {name: a, match: {paths: [/a]}, service: echo}
          - {name: b, match: {paths: [/b]}, service: echo}
          - name: c
            match: {paths: [/c]}
            service: echo
            plugins:
              - key_auth:
                  hide_credentials: true
                  headr: x-key
              - rate_limit:
                  limit: lots
        """)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "gateway.yaml:5: plugins[0].request_id.zzz: unknown key 'zzz'; allowed keys: header, echo_downstream",
        "gateway.yaml:15: routes[2].plugins[0].key_auth.headr: unknown key 'headr'; did you mean 'header'?",
        "gateway.yaml:17: routes[2].plugins[1].rate_limit.limit: expected int, got str",
    ]


def test_yaml_syntax_errors_give_line_and_column_and_name_a_tab(tmp_path):
    tab = check(tmp_path, 'listeners: [{name: public, bind: "127.0.0.1:8080"}]\nservices:\n  echo: {kind: echo}\n'
                          '  \tspare: {kind: echo}\n')
    assert tab.returncode == 1
    assert tab.stdout.splitlines() == [
        "gateway.yaml:4:3: YAML syntax error: found character that cannot start any token: "
        "a tab (YAML indents with spaces only)"]
    unclosed = check(tmp_path, 'listeners: [{name: public, bind: "127.0.0.1:8080"}\nservices: {}\n')
    assert unclosed.stdout.splitlines() == [
        "gateway.yaml:2:1: YAML syntax error: did not find expected ',' or ']' "
        "(while parsing a flow sequence that starts at line 1)"]
