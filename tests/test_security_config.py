"""Configuration cannot inject bytes or code: control characters in anything that ends up in an
HTTP head are refused at load (file:line: key), and the admin API cannot import code, expand the
gateway's environment, move its files or read its secrets."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import yaml

from upstreams import HOST, free_port, proxy_config, route

# key path (as `check` prints it) -> (where in a route, or None for the whole config, the bad part)
INJECTIONS = {
    'routes[0].request_headers.set.x-a': ("request_headers", {"set": {"x-a": "1\r\nSet-Cookie: a=b"}}),
    'routes[1].request_headers.add.x-n': ("request_headers", {"add": {"x-n": "a\x00b"}}),
    'routes[2].response_headers.set.x-b': ("response_headers", {"set": {"x-b": "v\nSet-Cookie: s=1"}}),
    'routes[3].response_headers.add.x-c': ("response_headers", {"add": {"x-c": "bell\x07"}}),
    'routes[4].response_headers.set.x-del': ("response_headers", {"set": {"x-del": "a\x7f"}}),
    'routes[5].response_headers.set["bad name"]': ("response_headers", {"set": {"bad name": "v"}}),
    'routes[6].request_headers.remove[0]': ("request_headers", {"remove": ["x-a\r\nx-b"]}),
    'routes[7].request_headers.rename.x-old': ("request_headers", {"rename": {"x-old": "x:new"}}),
    'routes[8].request_headers.rename["x old"]': ("request_headers", {"rename": {"x old": "x-new"}}),
    'routes[9].respond.headers.x-r': ("respond", {"headers": {"x-r": "1\r\nSet-Cookie: session=evil"}}),
    'routes[10].respond.headers["x-r\\r\\nx"]': ("respond", {"headers": {"x-r\r\nx": "1"}}),
    'routes[11].rewrite.path': ("rewrite", {"path": "/a\r\nX-Injected: 1\r\n\r\n"}),
    'routes[12].rewrite.host': ("rewrite", {"host": "h.example\r\nX-Injected: 1"}),
    'routes[13].rewrite.query': ("rewrite", {"query": "a=1 HTTP/1.1\r\nX: 1"}),
    'routes[14].deprecation.link': ("deprecation", {"link": "https://d.example/\r\nSet-Cookie: x=1"}),
    'routes[15].plugins[0].key_auth.header': ("plugins", [{"key_auth": {"header": "x-key\r\nx"}}]),
    'routes[16].plugins[0].request_id.header': ("plugins", [{"request_id": {"header": "x request id"}}]),
    'routes[17].plugins[0].jwt.forward_claims.sub': ("plugins", [{"jwt": {"secret": "s", "algorithms": ["HS256"], "forward_claims": {"sub": "x-user\n"}}}]),
    'routes[18].plugins[0].cors.headers[0]': ("plugins", [{"cors": {"headers": ["x a"]}}]),
    'routes[19].plugins[0].cors.origins[0]': ("plugins", [{"cors": {"origins": ["https://a.example\r\nSet-Cookie: c=1"]}}]),
    'routes[20].plugins[0].basic_auth.realm': ("plugins", [{"basic_auth": {"realm": "r\"\r\nSet-Cookie: c=1"}}]),
    'routes[21].plugins[0].cache.vary[0]': ("plugins", [{"cache": {"vary": ["accept\r\n"]}}]),
}


def injected_config(upstream_port: int) -> dict:
    config = proxy_config(upstream_port)
    config["routes"] = [route(f"r{i}", [f"/r{i}"], "up", **{key: value})
                        for i, (key, value) in enumerate(INJECTIONS.values())]
    for r in config["routes"]:
        if "respond" in r:
            del r["service"]
    return config


def test_check_refuses_control_characters_in_heads(tmp_path):
    path = tmp_path / "gateway.yaml"
    text = yaml.safe_dump(injected_config(free_port()), sort_keys=False)
    path.write_text(text)
    check = subprocess.run([sys.executable, "-m", "fastgw", "check", "-c", str(path)],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode != 0, check.stdout
    out = check.stdout + check.stderr
    starts = [i + 1 for i, line in enumerate(text.splitlines()) if re.match(r"^- name: r\d+$", line)]
    for i, key in enumerate(INJECTIONS):
        m = re.search(rf"^{re.escape(str(path))}:(\d+): {re.escape(key)}: (.*)$", out, re.M)
        assert m, f"{key} not reported:\n{out}"
        # The line is inside route r{i}'s block, past its name.
        end = starts[i + 1] if i + 1 < len(starts) else len(text.splitlines()) + 1
        assert starts[i] < int(m[1]) < end, (key, m[0])

def test_admin_put_with_injected_header_is_400_and_changes_nothing(gateway, upstream):
    config = proxy_config(upstream.port, extra_routes=[
        {"name": "hello", "match": {"paths": ["/hello"]}, "respond": {"status": 200, "body": "hi"}}])
    config["admin"] = {"bind": f"{HOST}:{free_port()}"}
    gw = gateway(config)
    before = gw.config_path.read_text()
    document = gw.admin("GET", "/config").json()["config"]
    document["routes"][0]["respond"]["headers"] = {"x-r": "1\r\nSet-Cookie: session=evil"}
    for method, path in (("PUT", "/config"), ("POST", "/config/validate")):
        resp = gw.admin(method, path, document)
        if method == "PUT":
            assert resp.status == 400 and resp.json()["error"]["code"] == "invalid_config", resp.body
            problems = resp.json()["error"]["problems"]
        else:
            assert resp.status == 200 and resp.json()["valid"] is False, resp.body
            problems = resp.json()["errors"]
        assert any(re.match(rf"{re.escape(str(gw.config_path))}:\d+: routes\[0\]\.respond\.headers\.x-r: ", p)
                   for p in problems), problems
    resp = gw.admin("PUT", "/routes/hello", {"match": {"paths": ["/hello"]},
                                             "respond": {"body": "hi", "headers": {"x-r\r\nSet-Cookie": "a"}}})
    assert resp.status == 400, resp.body
    assert gw.config_path.read_text() == before
    answer = gw.request("GET", "/hello")
    assert answer.status == 200 and answer.body == b"hi" and answer.header("set-cookie") is None
    assert answer.header("x-r") is None


# --- the admin API imports no code -----------------------------------------------------------------

PLUGIN_SOURCE = '''
import pathlib
from fastgw import Plugin

pathlib.Path({marker!r}).write_text("imported")   # the side effect of importing this module


class Tag(Plugin):
    name = "tag"
    phase = "access"

    def on_request(self, req):
        req.headers.set("x-tag", {label!r})
'''


def plugin_module(directory, name: str) -> tuple[str, object]:
    """A module `name` in `directory` whose import writes `name`.imported; (module:Class, marker)."""
    marker = directory / f"{name}.imported"
    (directory / f"{name}.py").write_text(PLUGIN_SOURCE.format(marker=str(marker), label=name))
    return f"{name}:Tag", marker


def test_admin_changes_import_no_new_python_module(gateway, upstream, tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    known, known_marker = plugin_module(plugins, "fastgw_known_plugin")
    evil, evil_marker = plugin_module(plugins, "fastgw_evil_plugin")
    config = proxy_config(upstream.port, plugins=[{"python": {"module": known}}])
    config["admin"] = {"bind": f"{HOST}:{free_port()}"}
    gw = gateway(config, env={"PYTHONPATH": str(plugins)})
    assert known_marker.exists() and not evil_marker.exists()
    before = gw.config_path.read_text()
    evil_route = {"match": {"paths": ["/evil"]}, "service": "up", "plugins": [{"python": {"module": evil}}]}
    document = gw.admin("GET", "/config").json()["config"]
    document["plugins"] = [{"python": {"module": evil}}]
    for method, path, body in (("PUT", "/routes/evil", evil_route), ("PUT", "/config", document),
                               ("POST", "/config/validate", document)):
        resp = gw.admin(method, path, body)
        problems = resp.json()["errors"] if path.endswith("validate") else resp.json()["error"]["problems"]
        assert resp.status == (200 if path.endswith("validate") else 400), resp.body
        assert any("fastgw_evil_plugin" in p and "python.module" in p for p in problems), problems
    assert not evil_marker.exists(), "the admin API imported a module"
    assert gw.config_path.read_text() == before
    # A module the file loaded may be used by a change.
    resp = gw.admin("PUT", "/routes/known", {"match": {"paths": ["/known"]}, "service": "up",
                                             "plugins": [{"python": {"module": known}}]})
    assert resp.status == 200, resp.body
    assert gw.request("GET", "/known").status == 200 and upstream.requests[-1].header("x-tag") == "fastgw_known_plugin"
    # The operator's file, reloaded from disk, may name a new module: it is the operator's code.
    on_disk = yaml.safe_load(gw.config_path.read_text())
    on_disk["routes"].insert(0, {"name": "evil", **evil_route})
    gw.config_path.write_text(yaml.safe_dump(on_disk, sort_keys=False))
    assert gw.admin("POST", "/reload").status == 200
    assert evil_marker.exists()


# --- the admin API does not expand the environment -------------------------------------------------

SECRET = "TopS3cretFromTheEnvironment"


def test_admin_changes_never_expand_environment_references(gateway, upstream):
    config = proxy_config(upstream.port, request_headers={"set": {"x-upstream-pass": "${SECRET_VAR}"}})
    config["admin"] = {"bind": f"{HOST}:{free_port()}"}
    gw = gateway(config, env={"SECRET_VAR": SECRET})
    assert gw.request("GET", "/x").status == 200 and upstream.requests[-1].header("x-upstream-pass") == SECRET
    before = gw.config_path.read_text()
    leaks = [{"respond": {"body": "${SECRET_VAR}"}},
             {"respond": {"body": "x", "headers": {"x-leak": "${SECRET_VAR:-none}"}}},
             {"respond": {"json": {"token": "${HOME}"}}},
             {"service": "up", "request_headers": {"set": {"x-upstream-pass": "${SECRET_VAR}"}}}]
    for leak in leaks:
        resp = gw.admin("PUT", "/routes/leak", {"match": {"paths": ["/leak"]}, "priority": 9, **leak})
        assert resp.status == 400, resp.body
        assert "expanded only in files read from disk" in resp.json()["error"]["message"]
        assert SECRET not in resp.body.decode()
    assert gw.config_path.read_text() == before
    assert gw.admin("GET", "/routes/leak").status == 404
    # `$${` is the literal text: served as written.
    resp = gw.admin("PUT", "/routes/leak", {"match": {"paths": ["/leak"]}, "priority": 9,
                                            "respond": {"body": "$${SECRET_VAR}"}})
    assert resp.status == 200, resp.body
    assert gw.request("GET", "/leak").body == b"${SECRET_VAR}"
    # The reference the file has stays usable: the GET shape goes back as it is.
    assert gw.admin("PUT", "/config", gw.admin("GET", "/config").json()).status == 200
    assert gw.request("GET", "/x").status == 200 and upstream.requests[-1].header("x-upstream-pass") == SECRET


def test_admin_changes_cannot_choose_files(gateway, upstream, tmp_path):
    config = proxy_config(upstream.port)
    config["admin"] = {"bind": f"{HOST}:{free_port()}"}
    gw = gateway(config)
    before = gw.config_path.read_text()
    target = tmp_path / "written-by-the-admin-api.log"
    document = gw.admin("GET", "/config").json()["config"]
    document["log"]["access"]["path"] = str(target)
    resp = gw.admin("PUT", "/config", document)
    assert resp.status == 400 and any("log.access.path" in p for p in resp.json()["error"]["problems"]), resp.body
    document = gw.admin("GET", "/config").json()["config"]
    document["services"]["up"]["tls"] = {"ca": "/etc/shadow"}
    document["services"]["up"]["scheme"] = "https"
    resp = gw.admin("PUT", "/config", document)
    assert resp.status == 400 and any("services.up.tls.ca" in p for p in resp.json()["error"]["problems"]), resp.body
    assert gw.config_path.read_text() == before
    gw.request("GET", "/x")
    assert not target.exists()
    # Stdout or off is no file: allowed.
    document = gw.admin("GET", "/config").json()["config"]
    document["log"]["access"]["path"] = None
    assert gw.admin("PUT", "/config", document).status == 200


# --- GET /config shows no secret -------------------------------------------------------------------

SECRETS = {"redis": "R3disPassw0rdXyz", "jwks": "JwksPassw0rdXyz", "otlp": "OtlpPassw0rdXyz",
           "authorization": "HdrAuthS3cretXyz", "key": "HdrKeyS3cretXyz", "token": "HdrTokenS3cretXyz",
           "cookie": "CookieS3cretXyz", "admin": "AdminT0kenXyz", "jwt": "JwtHmacS3cretXyz"}


def test_get_config_redacts_every_secret_and_put_keeps_them(gateway, upstream):
    config = proxy_config(upstream.port, request_headers={"set": {
        "Authorization": f"Bearer {SECRETS['authorization']}", "x-api-key": SECRETS["key"],
        "x-session-token": SECRETS["token"], "cookie": f"sid={SECRETS['cookie']}", "x-plain": "shown"}})
    config["admin"] = {"bind": f"{HOST}:{free_port()}", "token": SECRETS["admin"]}
    config["cluster"] = {"redis": f"redis://:{SECRETS['redis']}@127.0.0.1:1/0"}
    config["tracing"] = {"otlp_endpoint": f"http://otel:{SECRETS['otlp']}@127.0.0.1:1/v1/traces"}
    config["routes"].insert(0, {"name": "jwt", "match": {"paths": ["/jwt/**"]}, "service": "up", "plugins": [
        {"jwt": {"algorithms": ["RS256"], "jwks_url": f"https://u:{SECRETS['jwks']}@127.0.0.1:1/jwks"}},
        {"jwt": {"algorithms": ["HS256"], "secret": SECRETS["jwt"]}}]})
    gw = gateway(config)
    shown = [gw.admin("GET", "/config"), gw.admin("GET", "/routes/all"), gw.admin("GET", "/routes/jwt"),
             gw.admin("POST", "/config/validate", {"version": 1})]
    for resp in shown:
        assert resp.status == 200, resp.body
        leaked = [name for name, secret in SECRETS.items() if secret in resp.body.decode()]
        assert not leaked, (leaked, resp.body[:2000])
    got = gw.admin("GET", "/config").json()
    assert got["config"]["routes"][1]["request_headers"]["set"]["x-plain"] == "shown"
    assert got["config"]["routes"][1]["request_headers"]["set"]["x-api-key"] == "<redacted>"
    # The GET shape goes back: `<redacted>` keeps the real values.
    assert gw.admin("PUT", "/config", got).status == 200
    on_disk = gw.config_path.read_text()
    assert all(secret in on_disk for secret in SECRETS.values()), on_disk
    assert gw.request("GET", "/x").status == 200
    assert upstream.requests[-1].header("authorization") == f"Bearer {SECRETS['authorization']}"
    assert upstream.requests[-1].header("x-api-key") == SECRETS["key"]
