"""The edge judges exactly what the backend receives: request paths and Host values that a backend
reads as a protected resource never reach it through a public route.

The backend for paths is a real `python -m http.server` (it percent-decodes, merges slashes and
resolves dot segments itself); every variant of a protected path must be refused (400) or meet the
protected route's authentication (401), and the protected file must never come back.
"""
from __future__ import annotations

import pytest

from fastgw.plugins.credentials import hash_key
from upstreams import (HOST, RecordingUpstream, StaticFileServer, assert_error, gateway_config, get_request,
                       route)

SECRET = b"TOPSECRET-ADMIN"
PRIVATE = b"TOPSECRET-PRIVATE"
REPORT = b"TOPSECRET-REPORT"
KEY = "the-right-key"
CONSUMERS = [{"name": "ops", "credentials": {"api_keys": [hash_key(KEY)]}}]
KEY_AUTH = [{"key_auth": {"header": "x-api-key"}}]


def _static(tmp_path):
    return StaticFileServer(tmp_path / "www", {
        "admin/secret.txt": SECRET,
        "private/index.html": PRIVATE,
        "reports/q1.txt": REPORT,
        "api/v1/internal/data.txt": SECRET,
        "public.txt": b"hello",
    })


@pytest.fixture
def edge(gateway, start_upstream, tmp_path):
    static = start_upstream(_static(tmp_path))
    config = gateway_config({"static": {"targets": [{"address": f"{HOST}:{static.port}"}]}}, [
        route("admin", ["/admin/**"], "static", plugins=KEY_AUTH),
        route("private", ["/private"], "static", plugins=KEY_AUTH),
        route("reports", ["/reports/**"], "static", methods=["GET"], plugins=KEY_AUTH),
        # A regex route with a higher priority than the exact public route below it.
        route("internal", ["~^/api/v[0-9]+/internal(/|$)"], "static", priority=10, plugins=KEY_AUTH),
        route("api-public", ["/api/v1/internal/data.txt"], "static"),
        route("public", ["/**"], "static"),
    ])
    config["consumers"] = CONSUMERS
    return gateway(config)


def _send(gw, target: str, *, method: str = "GET", host: str = "edge.test", headers=()):
    with gw.connect() as conn:
        return conn.request(get_request(target, host=host, method=method, headers=headers),
                            head_request=method == "HEAD")


def test_the_protected_paths_need_the_key(edge):
    assert _send(edge, "/public.txt").body == b"hello"
    assert_error(_send(edge, "/admin/secret.txt"), 401)
    assert _send(edge, "/admin/secret.txt", headers=[("x-api-key", KEY)]).body == SECRET


@pytest.mark.parametrize("target", [
    "//admin/secret.txt",
    "///admin//secret.txt",
    "/./admin/secret.txt",
    "/x/../admin/secret.txt",
    "/%61dmin/secret.txt",
    "/%2e/admin/secret.txt",
    "/x/%2e%2e/admin/secret.txt",
    "/admin;x=1/secret.txt",
    "/private/",
    "/private;x",
    "/private/.",
    "/api/v1/internal/data.txt",         # the regex route's priority 10 beats the exact route's 0
    "/api/v1//internal/data.txt",
    "http://edge.test//admin/secret.txt",
    "HTTP://edge.test/admin/secret.txt",
    "https://edge.test/%61dmin/secret.txt",
])
def test_variants_of_a_protected_path_meet_its_authentication(edge, target):
    resp = _send(edge, target)
    assert_error(resp, 401)
    assert SECRET not in resp.body and PRIVATE not in resp.body


@pytest.mark.parametrize("target, message", [
    ("/admin%2Fsecret.txt", "encoded '/'"),
    ("/admin%2fsecret.txt", "encoded '/'"),
    ("/%2Fadmin/secret.txt", "encoded '/'"),
    ("/x/..%2Fadmin/secret.txt", "encoded '/'"),
    ("/admin%5Csecret.txt", "encoded '/' or '\\'"),
    ("/admin\\secret.txt", "'\\' in path"),
    ("/x/..;/admin/secret.txt", "dot segment with parameters"),
    ("/admin/secret.txt%00", "encoded NUL"),
    ("/admin/%zz", "invalid percent-encoding"),
    ("http://user@edge.test/admin/secret.txt", "userinfo"),
    ("http:///admin/secret.txt", "invalid request target"),
    ("ftp://edge.test/admin/secret.txt", "invalid request target"),
])
def test_ambiguous_paths_are_refused(edge, target, message):
    resp = _send(edge, target)
    err = assert_error(resp, 400, "bad_request")
    assert message in err["message"]
    assert SECRET not in resp.body


@pytest.mark.parametrize("request_line", [
    b"GET /ADMIN/secret.txt HTTP/1.1",              # a case-sensitive backend: no such file
    b"GET /admin/SECRET.TXT HTTP/1.1",
    b"GET /admin/secret.txt%20 HTTP/1.1",
    b"GET /admin/secret.txt%09 HTTP/1.1",
    b"GET /admin /secret.txt HTTP/1.1",
    b"GET /admin/secret.txt\t HTTP/1.1",
    b"GET\t/admin/secret.txt HTTP/1.1",
    b"GET /admin/secret.txt?%2F.. HTTP/1.1",
    b"GET /public.txt/../admin/secret.txt HTTP/1.1",
    b"GET /public.txt/%2e%2E/admin/secret.txt HTTP/1.1",
])
def test_no_spelling_brings_the_secret_back_without_the_key(edge, request_line):
    with edge.connect() as conn:
        conn.send(request_line + b"\r\nHost: edge.test\r\nConnection: close\r\n\r\n")
        raw = conn.read_until_close()
    assert raw.startswith(b"HTTP/1.1 ") and SECRET not in raw, raw[:200]


def test_head_meets_the_authentication_of_a_get_only_route(edge):
    assert_error(_send(edge, "/reports/q1.txt"), 401)
    resp = _send(edge, "/reports/q1.txt", method="HEAD")
    assert resp.status == 401 and resp.body == b""
    ok = _send(edge, "/reports/q1.txt", method="HEAD", headers=[("x-api-key", KEY)])
    assert ok.status == 200 and ok.header("content-length") == str(len(REPORT))
    # Other methods still fall to the catch-all (http.server answers 501 for POST)
    assert _send(edge, "/reports/q1.txt", method="POST").status == 501


def test_keep_escaped_slashes_forwards_them_unchanged(gateway, upstream):
    config = gateway_config({"up": {"targets": [{"address": f"{HOST}:{upstream.port}"}]}},
                            [route("all", ["/**"], "up")])
    config["listeners"][0]["escaped_slashes"] = "keep"
    gw = gateway(config)
    assert gw.request("GET", "/a%2fb%5Cc/d?q=%2F").status == 200
    assert upstream.requests[-1].target == "/a%2Fb%5Cc/d?q=%2F"
    assert gw.request("GET", "/a\\b//c").status == 200
    assert upstream.requests[-1].target == "/a\\b/c"


def test_the_upstream_gets_the_path_the_router_matched(gateway, upstream):
    gw = gateway(gateway_config({"up": {"targets": [{"address": f"{HOST}:{upstream.port}"}]}},
                                [route("all", ["/**"], "up")]))
    for raw, sent in [("//a///b/./c/../d?x=1//2", "/a/b/d?x=1//2"), ("/%7Euser/%c3%a9", "/~user/%C3%A9"),
                      ("http://Edge.Test./p", "/p")]:
        assert gw.request("GET", raw).status == 200
        assert upstream.requests[-1].target == sent


# --- Host ----------------------------------------------------------------------------------------

@pytest.fixture
def hosts(gateway, start_upstream):
    secure = start_upstream(RecordingUpstream(name="secure"))
    public = start_upstream(RecordingUpstream(name="public"))
    config = gateway_config({"secure": {"targets": [{"address": f"{HOST}:{secure.port}"}]},
                             "public": {"targets": [{"address": f"{HOST}:{public.port}"}]}}, [
        route("secure", ["/**"], "secure", hosts=["secure.example.com"], plugins=KEY_AUTH),
        route("public", ["/**"], "public"),
    ])
    config["consumers"] = CONSUMERS
    return gateway(config), secure, public


def _raw_host_request(gw, host_line: bytes, target: bytes = b"/me"):
    with gw.connect() as conn:
        return conn.request(b"GET " + target + b" HTTP/1.1\r\nHost: " + host_line + b"\r\n\r\n")


@pytest.mark.parametrize("host", [b"secure.example.com", b"SECURE.example.COM", b"secure.example.com.",
                                  b"secure.example.com.:80", b"secure.example.com:"])
def test_spellings_of_a_protected_host_meet_its_authentication(hosts, host):
    gw, secure, public = hosts
    assert_error(_raw_host_request(gw, host), 401)
    resp = _raw_host_request(gw, host + b"\r\nx-api-key: " + KEY.encode())
    assert resp.status == 200 and resp.json()["server"] == "secure"
    assert public.requests == []
    assert secure.requests[-1].header("host").split(":")[0] == "secure.example.com"


@pytest.mark.parametrize("host, message", [
    (b"secure.example.com ", "whitespace"),
    (b"secure.example.com\t", "whitespace"),
    (b"secure.example.com@evil", "userinfo"),
    (b"user@secure.example.com", "userinfo"),
    (b"secure.example.com..", "empty label"),
    (b"secure.example.com:8o", "invalid character"),
    (b"secure.example.com:80:80", "invalid port"),
    (b"secure%2eexample.com", "invalid character"),
    (b"secure.example.com/x", "invalid character"),
])
def test_ambiguous_hosts_are_refused(hosts, host, message):
    gw, secure, public = hosts
    err = assert_error(_raw_host_request(gw, host), 400, "bad_request")
    assert message in err["message"]
    assert public.requests == [] and secure.requests == []


def test_an_absolute_form_authority_is_the_host(hosts):
    gw, secure, public = hosts
    # RFC 9112 §3.2.2: the target's authority replaces Host, with the same rules
    assert_error(_raw_host_request(gw, b"public.example.com", b"http://secure.example.com./me"), 401)
    assert_error(_raw_host_request(gw, b"public.example.com", b"http://user@secure.example.com/me"), 400)
    assert _raw_host_request(gw, b"secure.example.com", b"http://other.example.com/me").json()["server"] == "public"
    assert public.requests[-1].header("host") == "other.example.com"
    assert all(r.header("host") != "secure.example.com" for r in public.requests)
