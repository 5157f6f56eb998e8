"""Answers the gateway makes itself for a route (`respond`, the `echo` service) are the route's
answers like proxied ones: its `response_headers`, `deprecation` headers and response-phase
plugins (CORS) apply to them. Through the listening socket, raw bytes in, the answer's head read."""
from __future__ import annotations

import pytest

from fastgw.plugins.credentials import hash_key
from upstreams import HOST, free_port, get_request, route

ORIGIN = "https://app.example.com"
EDITS = {"set": {"x-edited": "yes", "cache-control": "no-store"}, "add": {"x-added": "1"},
         "remove": ["x-secret"], "rename": {"x-before": "x-after"}}
DEPRECATION = {"date": "2026-01-01T00:00:00Z", "sunset": "2027-06-30T00:00:00Z",
               "link": "https://docs.example.com/migrate"}
CORS = {"cors": {"origins": [ORIGIN], "methods": ["GET", "POST"], "expose_headers": ["x-edited"]}}
RESPOND = {"status": 410, "json": {"error": "gone"}, "headers": {"x-secret": "s3", "X-Before": "b"}}


@pytest.fixture(scope="module")
def gw(module_harness):
    routes = [
        route("gone", ["/gone"], respond=RESPOND, response_headers=EDITS, deprecation=DEPRECATION,
              plugins=[CORS]),
        route("echoed", ["/echo/**"], "echo", response_headers=EDITS, deprecation=DEPRECATION,
              plugins=[CORS]),
        route("edits-only", ["/edits"], respond=RESPOND, response_headers=EDITS, deprecation=DEPRECATION),
        route("echo-edits-only", ["/echo-edits/**"], "echo", response_headers=EDITS),
        route("plain", ["/plain"], respond=RESPOND),
        route("guarded", ["/guarded"], respond={"status": 200, "body": "in"}, response_headers=EDITS,
              plugins=[CORS, {"key_auth": {}}]),
    ]
    config = {"version": 1, "listeners": [{"name": "public", "bind": f"{HOST}:{free_port()}"}],
              "services": {"echo": {"kind": "echo"}}, "routes": routes,
              "consumers": [{"name": "acme", "credentials": {"api_keys": [hash_key("acme-key")]}}]}
    return module_harness.gateway(config)


def ask(gw, method, path, *headers):
    with gw.connect() as conn:
        return conn.request(get_request(path, "api.test", headers, method=method),
                            head_request=method == "HEAD")


def assert_route_headers(resp):
    """The route's response_headers and deprecation, as a proxied answer of it would carry them."""
    assert resp.header("x-edited") == "yes" and resp.header("cache-control") == "no-store"
    assert resp.header("x-added") == "1"
    assert resp.header("deprecation") == "@1767225600"
    assert resp.header("sunset") == "Wed, 30 Jun 2027 00:00:00 GMT"
    assert 'rel="deprecation"' in resp.header("link") and 'rel="sunset"' in resp.header("link")


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_respond_route_gets_response_headers_deprecation_and_cors(gw, method):
    resp = ask(gw, method, "/gone", ("Origin", ORIGIN))
    assert resp.status == 410
    assert_route_headers(resp)
    assert resp.header("x-secret") is None                          # removed
    assert resp.header("x-before") is None and resp.header("x-after") == "b"   # renamed
    assert resp.header("access-control-allow-origin") == ORIGIN
    assert resp.header("access-control-expose-headers") == "x-edited"
    assert resp.header("vary") == "Origin"
    assert resp.header("content-type") == "application/json"
    assert resp.header("content-length") == str(len(b'{"error":"gone"}'))
    assert resp.body == (b"" if method == "HEAD" else b'{"error":"gone"}')


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_echo_route_gets_response_headers_deprecation_and_cors(gw, method):
    resp = ask(gw, method, "/echo/x?a=1", ("Origin", ORIGIN))
    assert resp.status == 200
    assert_route_headers(resp)
    assert resp.header("access-control-allow-origin") == ORIGIN
    assert resp.header("access-control-expose-headers") == "x-edited"
    assert resp.header("content-type") == "application/json"
    if method == "GET":
        assert resp.json()["path"] == "/echo/x" and resp.json()["headers"]["origin"] == ORIGIN
    else:
        assert resp.body == b"" and int(resp.header("content-length")) > 0


@pytest.mark.parametrize("path", ["/gone", "/echo/x"])
def test_disallowed_origin_gets_no_allow_origin_but_the_route_headers(gw, path):
    resp = ask(gw, "GET", path, ("Origin", "https://evil.example.net"))
    assert resp.status in (200, 410)
    assert resp.header("access-control-allow-origin") is None
    assert resp.header("access-control-expose-headers") is None
    assert_route_headers(resp)


@pytest.mark.parametrize("path", ["/gone", "/echo/x"])
def test_preflight_on_a_local_route(gw, path):
    resp = ask(gw, "OPTIONS", path, ("Origin", ORIGIN), ("Access-Control-Request-Method", "POST"))
    assert resp.status == 204
    assert resp.header("access-control-allow-origin") == ORIGIN
    assert resp.header("access-control-allow-methods") == "GET, POST"
    bad = ask(gw, "OPTIONS", path, ("Origin", "https://evil.example.net"),
              ("Access-Control-Request-Method", "POST"))
    assert bad.status == 403 and bad.header("access-control-allow-origin") is None


def test_edits_without_plugins(gw):
    """No plugin at all on the route: the edits still apply (respond and echo)."""
    resp = ask(gw, "GET", "/edits")
    assert resp.status == 410 and resp.body == b'{"error":"gone"}'
    assert_route_headers(resp)
    assert resp.header("x-secret") is None and resp.header("x-after") == "b"
    echoed = ask(gw, "GET", "/echo-edits/y")
    assert echoed.status == 200 and echoed.json()["path"] == "/echo-edits/y"
    assert echoed.header("x-edited") == "yes" and echoed.header("x-added") == "1"


def test_plain_respond_route_is_unchanged(gw):
    resp = ask(gw, "GET", "/plain")
    assert resp.status == 410 and resp.body == b'{"error":"gone"}'
    assert resp.header("x-secret") == "s3" and resp.header("x-before") == "b"
    assert resp.header("x-edited") is None and resp.header("deprecation") is None
    assert resp.header("date") is not None


def test_plugin_refusal_gets_cors_but_not_the_route_headers(gw):
    """A 401 from an authentication plugin is the gateway's refusal, not the route's answer: CORS
    labels it (the browser may read why, as with Kong's cors before auth), the route's
    response_headers do not apply. Let through, the same route's answer gets both."""
    denied = ask(gw, "GET", "/guarded", ("Origin", ORIGIN))
    assert denied.status == 401 and denied.header("access-control-allow-origin") == ORIGIN
    assert denied.header("x-edited") is None
    allowed = ask(gw, "GET", "/guarded", ("Origin", ORIGIN), ("X-Api-Key", "acme-key"))
    assert allowed.status == 200 and allowed.body == b"in"
    assert allowed.header("access-control-allow-origin") == ORIGIN and allowed.header("x-edited") == "yes"


def test_request_id_plugin_on_made_answers_gives_one_field(gateway):
    """request_id (echo_downstream) on an echo route: its answer, and a plugin's refusal on the
    same route, carry X-Request-Id once, the client's value."""
    config = {"version": 1, "listeners": [{"name": "public", "bind": f"{HOST}:{free_port()}"}],
              "services": {"echo": {"kind": "echo"}},
              "routes": [route("echoed", ["/**"], "echo", plugins=[{"request_id": {}}, {"key_auth": {}}])],
              "consumers": [{"name": "acme", "credentials": {"api_keys": [hash_key("acme-key")]}}]}
    gw = gateway(config)
    for headers, status in [((("X-Api-Key", "acme-key"),), 200), ((), 401)]:
        resp = ask(gw, "GET", "/e", ("X-Request-Id", "abc-123"), *headers)
        assert resp.status == status
        assert resp.header_all("x-request-id") == ["abc-123"], resp.headers
