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
