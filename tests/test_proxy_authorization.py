"""Proxy-Authorization goes to the upstream as the client sent it (as nginx and HAProxy pass it),
unless an authentication plugin of the route reads its credential from it: that plugin consumes
it (RFC 9110 §11.7.2) and the upstream never sees it."""
from __future__ import annotations

import time

import jwt

from fastgw.plugins.credentials import hash_key
from upstreams import HOST, gateway_config, get_request, route

BASIC = "Basic Zm9vOmJhcg=="
SECRET = "s" * 32
CONSUMERS = [{"name": "acme", "credentials": {"api_keys": [hash_key("acme-key")],
                                              "jwt": [{"issuer": "https://auth.test", "subject": "acme"}]}}]


def config(upstream, plugins=(), **route_keys):
    cfg = gateway_config({"up": {"targets": [{"address": f"{HOST}:{upstream.port}"}]}},
                         [route("api", ["/**"], "up", plugins=list(plugins), **route_keys)])
    cfg["consumers"] = CONSUMERS
    return cfg


def send(gw, *headers, path="/x"):
    with gw.connect() as conn:
        return conn.request(get_request(path, "api.test", headers))


def test_forwarded_byte_for_byte_on_a_plain_route(gateway, upstream):
    gw = gateway(config(upstream))
    assert send(gw, ("Proxy-Authorization", BASIC), ("X-Normal", "n")).status == 200
    assert f"\r\nProxy-Authorization: {BASIC}\r\n".encode() in upstream.requests[-1].raw_head
    assert send(gw, ("proxy-authorization", "Bearer abc.def-ghi")).status == 200
    assert b"\r\nproxy-authorization: Bearer abc.def-ghi\r\n" in upstream.requests[-1].raw_head
    # Repeated: every field, in order.
    assert send(gw, ("Proxy-Authorization", "Basic one"), ("Proxy-Authorization", "Basic two")).status == 200
    assert upstream.requests[-1].header_all("proxy-authorization") == ["Basic one", "Basic two"]
    # Still hop-by-hop when Connection names it (RFC 9110 §7.6.1); Proxy-Connection never goes.
    assert send(gw, ("Connection", "Proxy-Authorization"), ("Proxy-Authorization", BASIC),
                ("Proxy-Connection", "keep-alive")).status == 200
    names = upstream.requests[-1].header_names()
    assert "proxy-authorization" not in names and "proxy-connection" not in names


def test_a_plugin_reading_another_header_leaves_it(gateway, upstream):
    gw = gateway(config(upstream, [{"key_auth": {}}]))
    assert send(gw, ("X-Api-Key", "acme-key"), ("Proxy-Authorization", BASIC)).status == 200
    seen = upstream.requests[-1]
    assert seen.header("proxy-authorization") == BASIC and seen.header("x-consumer-name") == "acme"


def test_key_auth_from_proxy_authorization_consumes_it(gateway, upstream):
    gw = gateway(config(upstream, [{"key_auth": {"header": "proxy-authorization"}}]))
    for name in ("Proxy-Authorization", "PROXY-AUTHORIZATION"):
        assert send(gw, (name, "acme-key"), ("X-Normal", "n")).status == 200
        seen = upstream.requests[-1]
        assert seen.header("proxy-authorization") is None and b"acme-key" not in seen.raw_head
        assert seen.header("x-consumer-name") == "acme" and seen.header("x-normal") == "n"
    before = len(upstream.requests)
    assert send(gw, ("Proxy-Authorization", "wrong")).status == 401
    assert len(upstream.requests) == before


def test_jwt_from_proxy_authorization_consumes_it(gateway, upstream):
    gw = gateway(config(upstream, [{"jwt": {"algorithms": ["HS256"], "secret": SECRET,
                                            "header": "Proxy-Authorization"}}]))
    token = jwt.encode({"iss": "https://auth.test", "sub": "acme", "exp": int(time.time()) + 300},
                       SECRET, algorithm="HS256")
    for _ in range(2):                                    # verified, then from the token cache
        assert send(gw, ("Proxy-Authorization", f"Bearer {token}"), ("Authorization", BASIC)).status == 200
        seen = upstream.requests[-1]
        assert seen.header("proxy-authorization") is None and token.encode() not in seen.raw_head
        assert seen.header("authorization") == BASIC and seen.header("x-consumer-name") == "acme"


def test_not_shared_by_the_cache_without_authentication(gateway, upstream):
    """The upstream may answer by it: a request carrying it is neither served from nor stored in
    the cache of a route no plugin authenticates on (as with Authorization)."""
    gw = gateway(config(upstream, [{"cache": {"ttl": "60s"}}]))
    assert send(gw, ("Proxy-Authorization", "Basic alice")).header("x-cache") is None
    assert send(gw, ("Proxy-Authorization", "Basic bob")).header("x-cache") is None
    assert [r.header("proxy-authorization") for r in upstream.requests] == ["Basic alice", "Basic bob"]
    assert send(gw).header("x-cache") == "MISS"
    assert send(gw).header("x-cache") == "HIT"
    assert len(upstream.requests) == 3
