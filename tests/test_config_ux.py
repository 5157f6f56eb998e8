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


# --- the command line ----------------------------------------------------------------------------

VALID = """\
    listeners: [{name: public, bind: "127.0.0.1:8080"}]
    services: {echo: {kind: echo}}
    routes:
      - {name: echo, match: {paths: ["/echo/**"]}, service: echo}
    """


def test_reload_reads_only_the_admin_address_and_token_from_the_file(gateway, upstream, tmp_path):
    from upstreams import HOST, free_port, proxy_config

    config = proxy_config(upstream.port)
    config["services"]["up"]["targets"][0]["address"] = "${GW_TEST_BACKEND}"
    config["admin"] = {"bind": f"{HOST}:{free_port()}", "token": "${GW_TEST_ADMIN_TOKEN}"}
    gw = gateway(config, env={"GW_TEST_BACKEND": f"{HOST}:{upstream.port}", "GW_TEST_ADMIN_TOKEN": "tok-1"})
    gw.admin_token = "tok-1"
    caller = {k: v for k, v in os.environ.items() if k not in ("GW_TEST_BACKEND", "FASTGW_ADMIN_TOKEN")}
    result = subprocess.run([sys.executable, "-m", "fastgw", "reload", "-c", str(gw.config_path)], cwd=tmp_path,
                            env={**caller, "PYTHONPATH": str(REPO), "GW_TEST_ADMIN_TOKEN": "tok-1"},
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "reloaded: config version 2\n", "")
    assert gw.admin("GET", "/status").json()["config_version"] == 2
    # The token's own variable is needed, and its absence is said like any unset variable.
    result = subprocess.run([sys.executable, "-m", "fastgw", "reload", "-c", str(gw.config_path)], cwd=tmp_path,
                            env={**caller, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
    token_line = gw.config_path.read_text().splitlines().index("  token: ${GW_TEST_ADMIN_TOKEN}") + 1
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{gw.config_path}:{token_line}: admin.token: environment variable GW_TEST_ADMIN_TOKEN is not set "
        "(write ${GW_TEST_ADMIN_TOKEN:-default} to give a default)"]


def test_version_flag(tmp_path):
    flag, command = fastgw("--version", cwd=tmp_path), fastgw("version", cwd=tmp_path)
    assert (flag.returncode, flag.stderr) == (0, "")
    assert flag.stdout == command.stdout and flag.stdout.startswith("fastgw ")


def test_check_defaults_to_fastgw_config(tmp_path):
    (tmp_path / "from-env.yaml").write_text(textwrap.dedent(VALID))
    result = fastgw("check", cwd=tmp_path, env={"FASTGW_CONFIG": "from-env.yaml"})
    assert (result.returncode, result.stdout) == (0, "from-env.yaml: ok\n")


def test_check_reads_standard_input(tmp_path):
    good = fastgw("check", "-c", "-", cwd=tmp_path, stdin=textwrap.dedent(VALID))
    assert (good.returncode, good.stdout) == (0, "<stdin>: ok\n")
    bad = fastgw("check", "-c", "-", cwd=tmp_path, stdin=textwrap.dedent(VALID).replace("service: echo", "service: nope"))
    assert bad.returncode == 1
    assert bad.stdout.splitlines() == ["<stdin>:4: routes[0].service: unknown service 'nope' (defined: echo)",
                                       "<stdin>:2: services.echo: warning: service 'echo' is not used by any route"]
    as_json = fastgw("check", "-c", "-", cwd=tmp_path, stdin='{"listeners": [{"name": "p", "bind": "127.0.0.1:1"}],\n'
                                                               '\t"services": {"echo": {"kind": "echo"}}}\n')
    assert as_json.stdout.splitlines() == ["<stdin>:2: services.echo: warning: service 'echo' is not used by any route",
                                           "<stdin>: ok"]


def test_python_plugin_config_errors_are_explained_against_its_class(tmp_path):
    result = check(tmp_path, """\
        listeners: [{name: public, bind: "127.0.0.1:8080"}]
        services: {echo: {kind: echo}}
        routes:
          - name: a
            match: {paths: [/a]}
            service: echo
            plugins:
              - python:
                  module: "tests.plugins_for_tests:Mark"
                  config: {label: x, priorty: 1}
              - python: {modul: "tests.plugins_for_tests:Mark"}
        """)
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "gateway.yaml:10: routes[0].plugins[0].python.config.priorty: unknown key 'priorty'; "
        "did you mean 'priority'?",
        "gateway.yaml:11: routes[0].plugins[1].python.modul: unknown key 'modul'; did you mean 'module'?",
    ]
