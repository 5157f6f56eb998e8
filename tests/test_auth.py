"""The built-in access plugins through the gateway: key_auth, basic_auth, acl, ip_filter (with
trusted proxies, X-Forwarded-For and PROXY protocol), cors and request_id."""
from __future__ import annotations

import base64
import concurrent.futures
import socket
import time

import pytest
import yaml

from fastgw._core.proxyproto import build_proxy_header
from fastgw.plugins.credentials import hash_key, hash_password
from upstreams import HOST, free_port, gateway_config, parse_responses, route

CONSUMERS = [
    {"name": "acme", "groups": ["partners"],
     "credentials": {"api_keys": [hash_key("acme-key")],
                     "basic": [{"username": "acme", "password_hash": hash_password("s3cret")}]}},
    {"name": "bob", "groups": ["public"], "credentials": {"api_keys": [hash_key("bob-key")]}},
]


# key_auth from a header, ip_filter and acl run as data-plane checks (fastgw/_core/native.pyx)
# when a route has nothing else; next to a plugin without one (request_id) the whole chain runs in
# Python: both paths must decide alike.
PATHS = {"native": [], "python": [{"request_id": {"echo_downstream": False}}]}


def auth_config(upstream, plugins, *, consumers=CONSUMERS, listener=None):
    config = gateway_config({"up": {"targets": [{"address": f"{HOST}:{upstream.port}"}]}},
                            [route("api", ["/api/**"], "up"), route("open", ["/open/**"], "up")])
    config["routes"][0]["plugins"] = plugins
    config["consumers"] = consumers
    config["listeners"][0].update(listener or {})
    return config


def basic(user, password):
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


# --- key_auth ------------------------------------------------------------------------------------

def test_key_auth_header_query_cookie_and_hidden_credentials(gateway, upstream):
    gw = gateway(auth_config(upstream, [{"key_auth": {"header": "x-api-key", "query": "apikey", "cookie": "k",
                                                      "hide_credentials": True}}]))
    resp = gw.request("GET", "/api/x")
    assert resp.status == 401 and resp.header("www-authenticate") == 'Key realm="fastgw"'
    assert resp.json()["error"]["code"] == "unauthorized" and resp.json()["error"]["request_id"]
    assert gw.request("GET", "/api/x", headers={"x-api-key": "wrong"}).status == 401
    assert upstream.requests == []
    assert gw.request("GET", "/api/x", headers={"x-api-key": "acme-key"}).status == 200
    seen = upstream.requests[-1]
    assert seen.header("x-consumer-name") == "acme" and seen.header("x-api-key") is None
    assert gw.request("GET", "/api/x?a=1&apikey=bob-key&b=2").status == 200
    assert upstream.requests[-1].query == "a=1&b=2" and upstream.requests[-1].header("x-consumer-name") == "bob"
    assert gw.request("GET", "/api/x", headers={"cookie": "z=1; k=acme-key; y=2"}).status == 200
    assert upstream.requests[-1].header("cookie") == "z=1; y=2"
    # The client cannot pretend to be a consumer, and the access log names the real one.
    gw.request("GET", "/api/x", headers={"x-api-key": "bob-key", "x-consumer-name": "acme"})
    assert upstream.requests[-1].header("x-consumer-name") == "bob"
    assert [line["consumer"] for line in gw.access_log_lines(6)] == [None, None, "acme", "bob", "acme", "bob"]


def test_a_revoked_key_is_refused_after_reload_though_it_was_verified_before(gateway, upstream):
    """The data plane remembers verified keys (native.pyx); a reload that removes one forgets it."""
    config = auth_config(upstream, [{"key_auth": {}}])
    config["admin"] = {"bind": f"{HOST}:{free_port()}", "token": "t"}
    gw = gateway(config)
    for _ in range(3):
        assert gw.request("GET", "/api/x", headers={"x-api-key": "bob-key"}).status == 200
    config["consumers"] = CONSUMERS[:1]
    gw.config_path.write_text(yaml.safe_dump(config))
    assert gw.admin("POST", "/reload").status == 200
    assert gw.request("GET", "/api/x", headers={"x-api-key": "bob-key"}).status == 401
    assert gw.request("GET", "/api/x", headers={"x-api-key": "acme-key"}).status == 200


@pytest.mark.parametrize("path", list(PATHS))
def test_key_auth_and_acl_groups(gateway, upstream, path):
    gw = gateway(auth_config(upstream, [{"key_auth": {}}, {"acl": {"allow_groups": ["partners"]}}, *PATHS[path]]))
    assert gw.request("GET", "/api/x", headers={"x-api-key": "acme-key"}).status == 200
    resp = gw.request("GET", "/api/x", headers={"x-api-key": "bob-key"})
    assert resp.status == 403 and "bob" in resp.json()["error"]["message"]
    assert gw.request("GET", "/api/x").status == 401                 # key_auth runs before acl
    deny = gateway(auth_config(upstream, [{"basic_auth": {}}, {"acl": {"deny_groups": ["partners"]}}],
                               listener={"bind": f"{HOST}:{free_port()}"}))
    assert deny.request("GET", "/api/x", headers=basic("acme", "s3cret")).status == 403


# --- basic_auth ----------------------------------------------------------------------------------

def test_basic_auth_checks_scrypt_off_the_loop_and_remembers_success(gateway, upstream):
    gw = gateway(auth_config(upstream, [{"basic_auth": {"realm": "api"}}]))
    resp = gw.request("GET", "/api/x")
    assert resp.status == 401 and resp.header("www-authenticate") == 'Basic realm="api", charset="UTF-8"'
    assert gw.request("GET", "/api/x", headers=basic("acme", "nope")).status == 401
    assert gw.request("GET", "/api/x", headers=basic("nobody", "s3cret")).status == 401
    assert gw.request("GET", "/api/x", headers={"authorization": "Basic !!notbase64"}).status == 401
    # Several scrypt checks in flight; a route without plugins still answers at once.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        checks = [pool.submit(gw.request, "GET", "/api/x", headers=basic("acme", "s3cret")) for _ in range(3)]
        started = time.monotonic()
        assert gw.request("GET", "/open/x").status == 200
        open_took = time.monotonic() - started
        assert [f.result().status for f in checks] == [200] * 3
    assert open_took < 0.05, open_took
    assert upstream.requests[-1].header("x-consumer-name") == "acme"
    started = time.monotonic()
    for _ in range(20):                                              # remembered: no scrypt each time
        assert gw.request("GET", "/api/x", headers=basic("acme", "s3cret")).status == 200
    assert (time.monotonic() - started) / 20 < 0.02


# --- ip_filter -----------------------------------------------------------------------------------

def test_ip_filter_allow_and_deny(gateway, upstream):
    gw = gateway(auth_config(upstream, [{"ip_filter": {"allow": ["127.0.0.0/8", "2001:db8::/32"],
                                                       "deny": ["127.0.0.2/32"]}}]))
    assert gw.request("GET", "/api/x").status == 200
    sock = socket.create_connection((HOST, gw.port), source_address=("127.0.0.2", 0))
    sock.sendall(b"GET /api/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = b"".join(iter(lambda: sock.recv(65536), b""))
    sock.close()
    assert parse_responses(answer)[0].status == 403
    only_v6 = gateway(auth_config(upstream, [{"ip_filter": {"allow": ["2001:db8::/32"]}}],
                                  listener={"bind": f"{HOST}:{free_port()}"}))
    assert only_v6.request("GET", "/api/x").status == 403


@pytest.mark.parametrize("path", list(PATHS))
def test_ip_filter_believes_forwarded_addresses_only_from_trusted_proxies(gateway, upstream, path):
    rules = {"deny": ["203.0.113.0/24"]}
    extra = PATHS[path]
    untrusting = gateway(auth_config(upstream, [{"ip_filter": rules}, *extra]))
    # The peer (127.0.0.1) is not a trusted proxy: a spoofed X-Forwarded-For changes nothing.
    assert untrusting.request("GET", "/api/x", headers={"x-forwarded-for": "203.0.113.5"}).status == 200
    trusting = gateway(auth_config(upstream, [{"ip_filter": {**rules, "trusted_proxies": ["127.0.0.1/32"]}}, *extra],
                                   listener={"bind": f"{HOST}:{free_port()}"}))
    assert trusting.request("GET", "/api/x", headers={"x-forwarded-for": "203.0.113.5"}).status == 403
    # Read from the right: the client cannot hide behind a left-most entry it wrote itself.
    assert trusting.request("GET", "/api/x", headers={"x-forwarded-for": "203.0.113.5, 198.51.100.7"}).status == 200
    assert trusting.request("GET", "/api/x", headers={"x-forwarded-for": "198.51.100.7, 203.0.113.5"}).status == 403
    proxied = gateway(auth_config(upstream, [{"ip_filter": {**rules, "trusted_proxies": ["127.0.0.1/32"]}}, *extra],
                                  listener={"bind": f"{HOST}:{free_port()}", "proxy_protocol": True}))
    for source, status in (("203.0.113.9", 403), ("198.51.100.9", 200)):
        sock = socket.create_connection((HOST, proxied.port))
        sock.sendall(build_proxy_header(1, (source, 5000), ("10.0.0.1", 80)) +
                     b"GET /api/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
        sock.close()
        assert parse_responses(answer)[0].status == status, source


# --- cors ----------------------------------------------------------------------------------------

def test_cors_preflight_and_actual_requests(gateway, upstream):
    gw = gateway(auth_config(upstream, [
        {"cors": {"origins": ["https://app.example.com", "~https://.*\\.example\\.org"], "methods": ["GET", "POST"],
                  "headers": ["authorization", "content-type"], "expose_headers": ["x-total"],
                  "credentials": True, "max_age": "10m"}},
        {"key_auth": {}}]))
    pre = gw.request("OPTIONS", "/api/x", headers={"origin": "https://app.example.com",
                                                   "access-control-request-method": "POST",
                                                   "access-control-request-headers": "content-type"})
    assert pre.status == 204                                         # before key_auth: no key needed
    assert pre.header("access-control-allow-origin") == "https://app.example.com"
    assert pre.header("access-control-allow-credentials") == "true"
    assert pre.header("access-control-allow-methods") == "GET, POST"
    assert pre.header("access-control-allow-headers") == "authorization, content-type"
    assert pre.header("access-control-max-age") == "600" and pre.header("vary") == "Origin"
    bad = gw.request("OPTIONS", "/api/x", headers={"origin": "https://evil.example.net",
                                                   "access-control-request-method": "POST"})
    assert bad.status == 403 and bad.header("access-control-allow-origin") is None
    assert upstream.requests == []
    actual = gw.request("GET", "/api/x", headers={"origin": "https://shop.example.org", "x-api-key": "acme-key"})
    assert actual.status == 200 and actual.header("access-control-allow-origin") == "https://shop.example.org"
    assert actual.header("access-control-expose-headers") == "x-total"
    denied = gw.request("GET", "/api/x", headers={"origin": "https://app.example.com"})     # 401 is labelled too
    assert denied.status == 401 and denied.header("access-control-allow-origin") == "https://app.example.com"
    other = gw.request("GET", "/api/x", headers={"origin": "https://evil.example.net", "x-api-key": "acme-key"})
    assert other.status == 200 and other.header("access-control-allow-origin") is None


# --- request_id ----------------------------------------------------------------------------------

def test_request_id_under_a_custom_header_and_echoed(gateway, upstream):
    gw = gateway(auth_config(upstream, [{"request_id": {"header": "x-correlation-id"}}]))
    resp = gw.request("GET", "/api/x", headers={"x-request-id": "abc-123"})
    assert resp.status == 200 and resp.header("x-correlation-id") == "abc-123"
    seen = upstream.requests[-1]
    assert seen.header("x-correlation-id") == "abc-123" and seen.header("x-request-id") == "abc-123"
    fresh = gw.request("GET", "/api/y")
    assert len(fresh.header("x-correlation-id")) >= 16
    assert gw.access_log_lines(2)[-1]["request_id"] == fresh.header("x-correlation-id")
