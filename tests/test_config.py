"""Config loading: formats, ${ENV}, durations/sizes, schema errors pinned to file:line: path, and
every semantic check."""
from __future__ import annotations

import copy
import json
import textwrap

import msgspec
import pytest
import yaml

from fastgw.config.errors import ConfigError
from fastgw.config.load import DEFAULT_NAME
from fastgw.runtime.load import load_config
from fastgw.config.model import Duration, Size
from fastgw.config.validate import parse_bind

BASE = {
    "version": 1,
    "listeners": [{"name": "public", "bind": "127.0.0.1:8080"}],
    "services": {
        "users": {"targets": [{"address": "127.0.0.1:9001", "weight": 3}]},
        "echo": {"kind": "echo"},
    },
    "routes": [
        {"name": "users", "match": {"paths": ["/users/{id}"], "methods": ["GET"]}, "service": "users"},
        {"name": "gone", "match": {"paths": ["/old/**"]}, "respond": {"status": 410, "json": {"error": "gone"}}},
        {"name": "echo", "match": {"paths": ["/echo/**"]}, "service": "echo"},
    ],
}


def write(tmp_path, text, name="gateway.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def write_data(tmp_path, data, name="gateway.yaml"):
    return write(tmp_path, yaml.safe_dump(data, sort_keys=False), name)


def problems_of(path):
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def only_problem(path):
    problems = problems_of(path)
    assert len(problems) == 1, problems
    return problems[0]


def test_base_config_is_valid(tmp_path):
    loaded = load_config(write_data(tmp_path, BASE))
    assert loaded.warnings == []
    assert [r.name for r in loaded.config.routes] == ["users", "gone", "echo"]


# --- durations and sizes -------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [("250ms", 0.25), ("5s", 5.0), ("2m", 120.0), ("1h", 3600.0),
                                           ("1.5s", 1.5), (3, 3.0), (0.5, 0.5)])
def test_valid_durations(tmp_path, text, seconds):
    data = copy.deepcopy(BASE)
    data["routes"][0]["timeout"] = text
    timeout = load_config(write_data(tmp_path, data)).config.routes[0].timeout
    assert isinstance(timeout, Duration) and timeout == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5x", "-1s", "ms", "5 sec", -1, True])
def test_invalid_durations(tmp_path, text):
    data = copy.deepcopy(BASE)
    data["routes"][0]["timeout"] = text
    problem = only_problem(write_data(tmp_path, data))
    assert problem.path == "routes[0].timeout"
    assert "invalid duration" in problem.message
    assert problem.line is not None


@pytest.mark.parametrize("text, size", [(512, 512), ("512", 512), ("64KiB", 65536), ("10MiB", 10 << 20),
                                        ("1GiB", 1 << 30), ("1KB", 1000), ("2MB", 2_000_000), ("7B", 7)])
def test_valid_sizes(tmp_path, text, size):
    data = copy.deepcopy(BASE)
    data["routes"][0]["max_body_bytes"] = text
    value = load_config(write_data(tmp_path, data)).config.routes[0].max_body_bytes
    assert isinstance(value, Size) and value == size


@pytest.mark.parametrize("text", ["1.5MiB", "10 mb", "KiB", -1, 1.5, False])
def test_invalid_sizes(tmp_path, text):
    data = copy.deepcopy(BASE)
    data["routes"][0]["max_body_bytes"] = text
    problem = only_problem(write_data(tmp_path, data))
    assert problem.path == "routes[0].max_body_bytes"


# --- ${ENV} substitution -------------------------------------------------------------------------

ENV_CONFIG = """\
    listeners:
      - name: public
        bind: ${FG_HOST:-127.0.0.1}:${FG_PORT}
    admin:
      bind: 127.0.0.1:9901
      token: ${FG_TOKEN}
    """


def test_env_set_and_default(tmp_path, monkeypatch):
    monkeypatch.setenv("FG_PORT", "8081")
    monkeypatch.setenv("FG_TOKEN", "s3cret")
    monkeypatch.delenv("FG_HOST", raising=False)
    path = write(tmp_path, ENV_CONFIG)
    loaded = load_config(path)
    assert loaded.config.listeners[0].bind == "127.0.0.1:8081"
    assert loaded.config.admin.token == "s3cret"
    assert "${FG_TOKEN}" in loaded.source  # the secret is never written back into the source


def test_env_default_also_replaces_empty(tmp_path, monkeypatch):
    monkeypatch.setenv("FG_HOST", "")
    monkeypatch.setenv("FG_PORT", "8081")
    monkeypatch.setenv("FG_TOKEN", "x")
    assert load_config(write(tmp_path, ENV_CONFIG)).config.listeners[0].bind == "127.0.0.1:8081"


def test_env_value_cannot_change_structure(tmp_path, monkeypatch):
    monkeypatch.setenv("FG_PORT", "8081")
    monkeypatch.setenv("FG_TOKEN", "a: b\n- [c, {d: e}]\n#")
    assert load_config(write(tmp_path, ENV_CONFIG)).config.admin.token == "a: b\n- [c, {d: e}]\n#"


def test_env_missing_names_file_line_and_path(tmp_path, monkeypatch):
    monkeypatch.delenv("FG_PORT", raising=False)
    monkeypatch.delenv("FG_TOKEN", raising=False)
    path = write(tmp_path, ENV_CONFIG)
    problems = problems_of(path)
    assert [(p.file, p.line, p.path) for p in problems] == [
        (path, 3, "listeners[0].bind"), (path, 6, "admin.token")]
    assert "FG_PORT" in problems[0].message and "FG_TOKEN" in problems[1].message


def test_env_escape(tmp_path, monkeypatch):
    monkeypatch.setenv("FG_PORT", "8081")
    path = write(tmp_path, ENV_CONFIG.replace("${FG_TOKEN}", "'$${NOT_A_VAR}x'"))
    assert load_config(path).config.admin.token == "${NOT_A_VAR}x"


# --- schema errors with lines and paths ----------------------------------------------------------

def test_unknown_key_reports_its_line_and_path(tmp_path):
    path = write(tmp_path, """\
        version: 1
        listeners:
          - name: public
            bind: 127.0.0.1:8080
        services:
          users:
            targets:
              - address: 127.0.0.1:9001
        routes:
          - name: a
            match: {paths: [/a]}
            service: users
          - name: b
            mathc: {paths: [/b]}
            service: users
        """)
    problem = only_problem(path)
    assert str(problem) == f"{path}:14: routes[1].mathc: unknown key 'mathc'; did you mean 'match'?"


def test_unknown_top_level_key(tmp_path):
    path = write_data(tmp_path, {**BASE, "rotues": []})
    problem = only_problem(path)
    assert problem.path == "rotues"
    assert open(path).read().splitlines()[problem.line - 1] == "rotues: []"
    assert "did you mean 'routes'?" in problem.message


def test_wrong_type_in_nested_list(tmp_path):
    path = write(tmp_path, """\
        listeners: [{name: public, bind: "127.0.0.1:8080"}]
        services: {echo: {kind: echo}}
        routes:
          - {name: a, match: {paths: [/a]}, service: echo}
          - {name: b, match: {paths: [/b]}, service: echo}
          - name: c
            match:
              paths:
                - 42
            service: echo
        """)
    problem = only_problem(path)
    assert (problem.line, problem.path, problem.message) == (9, "routes[2].match.paths[0]", "expected str, got int")


def test_error_inside_a_named_service_names_the_service(tmp_path):
    path = write(tmp_path, """\
        listeners: [{name: public, bind: "127.0.0.1:8080"}]
        services:
          users: {targets: [{address: "127.0.0.1:1"}]}
          orders:
            targets:
              - {address: "127.0.0.1:2", weight: heavy}
        routes: [{name: a, service: users}, {name: b, service: orders}]
        """)
    problem = only_problem(path)
    assert (problem.line, problem.path) == (6, "services.orders.targets[0].weight")


def test_several_schema_errors_are_reported_together(tmp_path):
    path = write(tmp_path, """\
        listeners: [{name: public, bind: "127.0.0.1:8080", limit: {}}]
        services: {echo: {kind: echo, targest: []}}
        routes:
          - {name: a, service: echo, priority: high}
          - {name: b, service: echo, respond: {headers: {x-n: 1}}}
        log: {level: loud}
        """)
    found = {(p.line, p.path) for p in problems_of(path)}
    assert found == {(1, "listeners[0].limit"), (2, "services.echo.targest"), (4, "routes[0].priority"),
                     (5, "routes[1].respond.headers.x-n"), (6, "log.level")}


def test_enum_error_lists_choices(tmp_path):
    data = copy.deepcopy(BASE)
    data["log"] = {"level": "loud"}
    problem = only_problem(write_data(tmp_path, data))
    assert problem.path == "log.level"
    assert all(level in problem.message for level in ("debug", "info", "warning", "error"))


def test_missing_required_key(tmp_path):
    path = write(tmp_path, "listeners:\n  - name: public\n")
    problem = only_problem(path)
    assert (problem.line, problem.path, problem.message) == (2, "listeners[0]", "missing required key 'bind'")


def test_yaml_syntax_error_line(tmp_path):
    path = write(tmp_path, """\
        version: 1
        listeners:
          - name: a
            bind: 127.0.0.1:80
           foo: 1
        """)
    problem = only_problem(path)
    assert problem.line == 5 and "YAML syntax error" in problem.message


@pytest.mark.parametrize("name, text, line", [
    ("bad.toml", 'version = 1\n[[listeners]]\nname = "a"\nbind = \n', 4),
    ("bad.json", '{\n"version": 1,\n"listeners": [\n}\n', 4),
])
def test_toml_and_json_syntax_error_lines(tmp_path, name, text, line):
    problem = only_problem(write(tmp_path, text, name))
    assert problem.line == line and "syntax error" in problem.message


@pytest.mark.parametrize("text, message", [
    ("", "the file is empty"),
    ("# only a comment\n", "the file is empty"),
    ("- a\n- b\n", "the top level must be a mapping"),
])
def test_empty_or_non_mapping_file(tmp_path, text, message):
    assert message in only_problem(write(tmp_path, text)).message


def test_missing_file_names_it(tmp_path):
    path = str(tmp_path / "nope.yaml")
    problem = only_problem(path)
    assert problem.file == path and "cannot read" in problem.message


# --- formats -------------------------------------------------------------------------------------

TOML_BASE = """\
version = 1

[[listeners]]
name = "public"
bind = "127.0.0.1:8080"

[services.users]
targets = [{address = "127.0.0.1:9001", weight = 3}]

[services.echo]
kind = "echo"

[[routes]]
name = "users"
service = "users"
match = {paths = ["/users/{id}"], methods = ["GET"]}

[[routes]]
name = "gone"
[routes.match]
paths = ["/old/**"]
[routes.respond]
status = 410
json = {error = "gone"}

[[routes]]
name = "echo"
service = "echo"
match = {paths = ["/echo/**"]}
"""


def test_toml_and_json_load_to_the_same_config(tmp_path):
    from_yaml = load_config(write_data(tmp_path, BASE)).config
    from_json = load_config(write(tmp_path, json.dumps(BASE, indent=2), "gateway.json")).config
    from_toml = load_config(write(tmp_path, TOML_BASE, "gateway.toml")).config
    assert from_yaml == from_json == from_toml


def test_unknown_extension_is_read_as_yaml(tmp_path):
    assert load_config(write_data(tmp_path, BASE, "gateway.conf")).config.routes[0].name == "users"


def test_toml_error_line(tmp_path):
    path = write(tmp_path, TOML_BASE.replace('name = "gone"', 'name = "gone"\nprioriti = 1'), "gateway.toml")
    problem = only_problem(path)
    assert (problem.line, problem.path) == (20, "routes[1].prioriti")


def test_json_error_line_with_tabs(tmp_path):
    data = copy.deepcopy(BASE)
    data["routes"][2]["match"]["paths"] = ["/echo/**", 7]
    path = write(tmp_path, json.dumps(data, indent="\t"), "gateway.json")
    problem = only_problem(path)
    text = open(path).read().splitlines()
    assert problem.path == "routes[2].match.paths[1]"
    assert text[problem.line - 1].strip() == "7"


# --- semantic checks -----------------------------------------------------------------------------

def _add_listener(name, bind):
    return lambda c: c["listeners"].append({"name": name, "bind": bind})


SEMANTIC_ERRORS = [
    # (what to change in BASE, expected key path, part of the message)
    (lambda c: c.update(listeners=[]), "listeners", "at least one listener"),
    (_add_listener("public", "127.0.0.1:8081"), "listeners[1].name", "duplicate listener name"),
    (_add_listener("other", "127.0.0.1:8080"), "listeners[1].bind", "conflicts with listeners[0].bind"),
    (_add_listener("other", "0.0.0.0:8080"), "listeners[1].bind", "conflicts with listeners[0].bind"),
    (lambda c: c["listeners"][0].update(bind="localhost"), "listeners[0].bind", "not host:port"),
    (lambda c: c["listeners"][0].update(bind="::1:8080"), "listeners[0].bind", "brackets"),
    (lambda c: c.update(admin={"bind": "127.0.0.1:8080"}), "admin.bind", "conflicts with listeners[0].bind"),
    (lambda c: c.update(admin={"bind": "0.0.0.0:9901"}), "admin.token", "not a loopback address"),
    (lambda c: c["routes"][1].update(name="users"), "routes[1].name", "duplicate route name"),
    (lambda c: c["routes"][0].update(respond={"status": 200}), "routes[0]", "exactly one of"),
    (lambda c: c["routes"][0].pop("service"), "routes[0]", "exactly one of"),
    (lambda c: c["routes"][0].update(service="nope"), "routes[0].service", "unknown service 'nope'"),
    (lambda c: c["services"]["users"].update(targets=[]), "services.users.targets", "at least one target"),
    (lambda c: c["services"]["echo"].update(targets=[{"address": "127.0.0.1:1"}]),
     "services.echo.targets", "takes no targets"),
    (lambda c: c["services"]["users"]["targets"][0].update(address="users"),
     "services.users.targets[0].address", "not host:port"),
    (lambda c: c["services"]["users"]["targets"][0].update(weight=-1),
     "services.users.targets[0].weight", "must not be negative"),
    (lambda c: c["services"]["users"].update(timeouts={"connect": 0}),
     "services.users.timeouts.connect", "greater than 0"),
    (lambda c: c["routes"][0]["match"].update(methods=["GET", "GE T"]),
     "routes[0].match.methods[1]", "not a valid HTTP method"),
    (lambda c: c["routes"][0]["match"].update(hosts=["exa mple.com"]),
     "routes[0].match.hosts[0]", "not a host name"),
    (lambda c: c["routes"][0]["match"].update(hosts=["api.*.com"]), "routes[0].match.hosts[0]", "not a host name"),
    (lambda c: c["routes"][0].update(timeout=0), "routes[0].timeout", "greater than 0"),
    (lambda c: c["routes"][1]["respond"].update(status=700), "routes[1].respond.status", "between 200 and 599"),
    (lambda c: c["routes"][1]["respond"].update(status=101), "routes[1].respond.status", "between 200 and 599"),
    (lambda c: c["routes"][1]["respond"].update(body="x"), "routes[1].respond", "not both"),
    *[(lambda c, k=k, v=v: c["listeners"][0].update(limits={k: v}), f"listeners[0].limits.{k}", message)
      for k, v, message in [("max_headers", 0, "at least 1"), ("max_url_bytes", 15, "at least 16"),
                            ("max_header_bytes", "1000B", "at least 1KiB"), ("header_timeout", "0s", "greater"),
                            ("idle_timeout", 0, "greater"), ("max_connections", 0, "at least 1")]],
    (lambda c: c.update(log={"access": {"sample": 1.5}}), "log.access.sample", "between 0 and 1"),
    (lambda c: c.update(workers=0), "workers", "must be 'auto' or a number from 1 to 1024"),
    (lambda c: c.update(workers=5000), "workers", "must be 'auto' or a number from 1 to 1024"),
]


@pytest.mark.parametrize("change, path, message", SEMANTIC_ERRORS)
def test_semantic_error(tmp_path, change, path, message):
    data = copy.deepcopy(BASE)
    change(data)
    file = write_data(tmp_path, data)
    errors = [p for p in problems_of(file) if p.severity == "error"]
    assert [(p.path, message in p.message) for p in errors] == [(path, True)], errors
    assert errors[0].file == file and errors[0].line is not None


@pytest.mark.parametrize("change, path, message", [
    (lambda c: c["services"].update(spare={"targets": [{"address": "127.0.0.1:9"}]}),
     "services.spare", "not used by any route"),
    (lambda c: c["services"]["users"]["targets"][0].update(weight=0), "services.users.targets", "weight 0"),
])
def test_semantic_warning(tmp_path, change, path, message):
    data = copy.deepcopy(BASE)
    change(data)
    warnings = load_config(write_data(tmp_path, data)).warnings
    assert [(w.path, w.severity, message in w.message) for w in warnings] == [(path, "warning", True)]
    assert warnings[0].line is not None


@pytest.mark.parametrize("value, host, port", [
    ("0.0.0.0:8080", "0.0.0.0", 8080), ("[::1]:9901", "::1", 9901), ("[::]:1", "::", 1),
    ("users.internal:9001", "users.internal", 9001), ("localhost:65535", "localhost", 65535),
    ("my_service:80", "my_service", 80),
])
def test_parse_bind_valid(value, host, port):
    assert parse_bind(value) == (host, port)


@pytest.mark.parametrize("value", ["8080", ":8080", "host:0", "host:65536", "::1:8080", "[nothex]:80",
                                   "300.1.1.1:80", "host:port", "bad host:80", "[::1]", "host:80:90"])
def test_parse_bind_invalid(value):
    with pytest.raises(ValueError):
        parse_bind(value)


@pytest.mark.parametrize("host", ["api.example.com", "*.example.com", "example.com:8443", "localhost",
                                  "*.example.com:443", "10.0.0.1"])
def test_valid_route_hosts(tmp_path, host):
    data = copy.deepcopy(BASE)
    data["routes"][0]["match"]["hosts"] = [host]
    load_config(write_data(tmp_path, data))


# --- the compiler's problems are pinned like the others ------------------------------------------

def test_compile_problems_get_file_and_line(tmp_path):
    data = copy.deepcopy(BASE)
    data["routes"][0]["rewrite"] = {"path": "/u/{id"}                  # unbalanced template
    data["routes"][2]["match"]["headers"] = {"x-v": "~("}              # invalid regex
    path = write_data(tmp_path, data)
    problems = problems_of(path)
    lines = open(path).read().splitlines()
    assert [p.path for p in problems] == ["routes[0].match.paths[0]", "routes[2].match"]
    assert lines[problems[0].line - 1].strip() == "- /users/{id}"
    assert lines[problems[1].line - 1].strip().startswith("match:")


def test_compiler_only_sees_semantically_valid_configs(tmp_path):
    data = copy.deepcopy(BASE)
    data["routes"][0]["service"] = "nope"
    data["routes"][2]["match"]["headers"] = {"x-v": "~("}              # found only once the rest is valid
    errors = [p for p in problems_of(write_data(tmp_path, data)) if p.severity == "error"]
    assert [p.path for p in errors] == ["routes[0].service"]


def test_check_warns_about_shadowed_routes(tmp_path):
    data = copy.deepcopy(BASE)
    data["routes"].insert(0, {"name": "catch-all", "priority": 1, "match": {"paths": ["/**"]},
                              "service": "users"})
    data["routes"].append({"name": "users-again", "match": {"paths": ["/users/{uid}"]},
                           "service": "users"})
    data["routes"].append({"name": "hosted", "match": {"paths": ["/old/x"], "hosts": ["a.com"]},
                           "service": "users"})
    path = write_data(tmp_path, data)
    warnings = load_config(path).warnings
    by_path = {w.path: w.message for w in warnings}
    assert set(by_path) == {"routes[1]", "routes[2]", "routes[3]", "routes[4]"}
    assert "'catch-all' (routes[0]) answers every request" in by_path["routes[1]"]
    assert all(w.severity == "warning" and w.line for w in warnings)
    # Without the catch-all: the later route with the same shape loses to the earlier one on GET
    # only, so it is not shadowed (it still answers POST); with equal methods it would be.
    del data["routes"][0]
    assert load_config(write_data(tmp_path, data)).warnings == []
    data["routes"][3]["match"]["methods"] = ["GET"]
    [w] = load_config(write_data(tmp_path, data)).warnings
    assert w.path == "routes[3]" and "'users' (routes[0])" in w.message


# --- where the config comes from -----------------------------------------------------------------

def test_embedded_default_loads_without_problems(monkeypatch):
    monkeypatch.delenv("FASTGW_CONFIG", raising=False)
    loaded = load_config()
    assert loaded.path is None and loaded.warnings == []
    assert loaded.config.listeners[0].bind == "127.0.0.1:8080"
    assert {r.name for r in loaded.config.routes} == {"echo", "welcome"}
    assert "fastgw is running" in loaded.source


def test_fastgw_config_env_is_honoured(tmp_path, monkeypatch):
    path = write_data(tmp_path, BASE)
    monkeypatch.setenv("FASTGW_CONFIG", path)
    loaded = load_config()
    assert loaded.path == path and loaded.config.routes[0].name == "users"


def test_default_problem_file_name_is_not_a_path():
    assert DEFAULT_NAME.startswith("<")


def test_loaded_config_is_frozen(tmp_path):
    loaded = load_config(write_data(tmp_path, BASE))
    with pytest.raises(AttributeError):
        loaded.path = "x"
    assert isinstance(loaded.config, msgspec.Struct)
