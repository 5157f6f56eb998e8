"""The `cache` plugin through the gateway's socket: hits, freshness, Cache-Control, vary,
coalescing, stale_if_error, the memory bound, purge through the admin API."""
from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import json
import time

import pytest

from upstreams import HOST, RecordingUpstream, Reply, free_port, gateway_config, proxy_config, route


def counting(headers=(), delay=0.0, status=200, size=0):
    """An upstream handler whose body says how many requests it has answered."""
    counter = itertools.count(1)

    def handler(req):
        if delay:
            time.sleep(delay)
        n = next(counter)
        body = json.dumps({"n": n, "path": req.target, "pad": "x" * size}).encode()
        return Reply(status, [("Content-Type", "application/json"), *headers], body)
    return handler


def cached_config(port, admin=False, **cache):
    config = proxy_config(port, plugins=[{"cache": {"ttl": "30s", **cache}}])
    if admin:
        config["admin"] = {"bind": f"{HOST}:{free_port()}"}
    return config


def test_second_request_is_a_hit(gateway, start_upstream):
    upstream = start_upstream(RecordingUpstream(counting([("Cache-Control", "public")])))
    gw = gateway(cached_config(upstream.port))
    first = gw.request("GET", "/p?x=1")
    second = gw.request("GET", "/p?x=1")
    head = gw.request("HEAD", "/p?x=1")
    other = gw.request("GET", "/p?x=2")
    assert first.header("x-cache") == "MISS" and first.json()["n"] == 1
    assert second.header("x-cache") == "HIT" and second.body == first.body
    assert second.header("age") == "0" and second.header("cache-control") == "public"
    assert second.header("x-request-id") != first.header("x-request-id")
    assert head.header("x-cache") == "HIT" and head.body == b"" and \
        int(head.header("content-length")) == len(first.body)
    assert other.header("x-cache") == "MISS" and other.json()["n"] == 2
    assert len(upstream.requests) == 2
    assert gw.request("POST", "/p?x=1").header("x-cache") is None        # only GET/HEAD


def test_freshness_ttl_and_cache_control(gateway, start_upstream):
    def handler(req):
        cc = {"/nostore": "no-store", "/private": "private", "/short": "max-age=1",
              "/shared": "max-age=100, s-maxage=1"}.get(req.path)
        return Reply(200, [("Content-Type", "text/plain")] + ([("Cache-Control", cc)] if cc else []),
                     f"{req.path} {len(upstream.requests)}".encode())
    upstream = start_upstream(RecordingUpstream(handler))
    gw = gateway(cached_config(upstream.port, ttl="600ms"))
    for path in ("/nostore", "/private"):
        assert [gw.request("GET", path).header("x-cache") for _ in range(2)] == ["MISS", "MISS"]
    for path in ("/plain", "/short", "/shared"):
        assert [gw.request("GET", path).header("x-cache") for _ in range(2)] == ["MISS", "HIT"]
    time.sleep(0.8)
    assert gw.request("GET", "/plain").header("x-cache") == "MISS"       # the plugin's ttl is over
    assert gw.request("GET", "/short").header("x-cache") == "HIT"        # max-age=1 wins over ttl
    assert gw.request("GET", "/shared").header("x-cache") == "HIT"       # s-maxage=1 wins over max-age
    time.sleep(0.4)
    assert gw.request("GET", "/short").header("x-cache") == "MISS"
    assert gw.request("GET", "/shared").header("x-cache") == "MISS"


def test_vary_headers_and_cookies(gateway, start_upstream):
    upstream = start_upstream(RecordingUpstream(lambda req: Reply(
        200, [("Content-Type", "text/plain")] + ([("Set-Cookie", "s=1")] if req.path == "/cookie" else []),
        (req.header("accept-language") or "none").encode())))
    gw = gateway(cached_config(upstream.port, vary=["Accept-Language"]))
    de = [gw.request("GET", "/v", headers={"Accept-Language": "de"}) for _ in range(2)]
    fr = [gw.request("GET", "/v", headers={"Accept-Language": "fr"}) for _ in range(2)]
    assert [r.header("x-cache") for r in de + fr] == ["MISS", "HIT", "MISS", "HIT"]
    assert de[1].body == b"de" and fr[1].body == b"fr"
    assert [gw.request("GET", "/cookie").header("x-cache") for _ in range(2)] == ["MISS", "MISS"]


def test_concurrent_misses_make_one_upstream_call(gateway, start_upstream):
    upstream = start_upstream(RecordingUpstream(counting(delay=0.5)))
    gw = gateway(cached_config(upstream.port))
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: gw.request("GET", "/slow"), range(10)))
    assert len(upstream.requests) == 1
    assert all(a.status == 200 and a.json()["n"] == 1 for a in answers)
    assert sorted(a.header("x-cache") for a in answers) == ["HIT"] * 9 + ["MISS"]


def test_stale_if_error(gateway, start_upstream):
    failing = {"on": False}
    upstream = start_upstream(RecordingUpstream(lambda req: Reply(503, [], b"down") if failing["on"]
                                                else counting()(req)))
    gw = gateway(cached_config(upstream.port, ttl="300ms", stale_if_error="5s"))
    fresh = gw.request("GET", "/s")
    time.sleep(0.4)
    failing["on"] = True
    stale = gw.request("GET", "/s")
    assert stale.status == 200 and stale.header("x-cache") == "STALE" and stale.body == fresh.body
    upstream.stop()                                                    # connection refused now
    refused = gw.request("GET", "/s")
    assert refused.status == 200 and refused.header("x-cache") == "STALE"
    assert gw.request("GET", "/never-cached").status == 502


def test_memory_bound_evicts_the_least_recently_used(gateway, start_upstream):
    upstream = start_upstream(RecordingUpstream(counting(size=1000)))
    gw = gateway(cached_config(upstream.port, max_bytes="3500", max_entry_bytes="1500"))
    for path in ("/a", "/b", "/c"):
        assert gw.request("GET", path).header("x-cache") == "MISS"
    assert gw.request("GET", "/a").header("x-cache") == "HIT"          # /a is now the most recent
    assert gw.request("GET", "/d").header("x-cache") == "MISS"         # evicts /b, the oldest
    assert gw.request("GET", "/b").header("x-cache") == "MISS"
    assert gw.request("GET", "/a").header("x-cache") == "HIT"
    big = start_upstream(RecordingUpstream(counting(size=5000)))
    gw2 = gateway(cached_config(big.port, max_bytes="10000", max_entry_bytes="2000"))
    assert [gw2.request("GET", "/big").header("x-cache") for _ in range(2)] == ["MISS", "MISS"]


def test_purge_by_key_and_prefix(gateway, start_upstream):
    upstream = start_upstream(RecordingUpstream(counting()))
    gw = gateway(cached_config(upstream.port, admin=True))
    for path in ("/products/1?x=1", "/products/2", "/other"):
        gw.request("GET", path, headers={"Host": "api.example.com"})
    purge = lambda body: gw.admin("POST", "/cache/purge", body)       # noqa: E731
    assert purge({"key": "GET api.example.com /products/1?x=1"}).json() == {"purged": 1}
    assert gw.request("GET", "/products/1?x=1", headers={"Host": "api.example.com"}).header("x-cache") == "MISS"
    assert gw.request("GET", "/products/2", headers={"Host": "api.example.com"}).header("x-cache") == "HIT"
    assert purge({"host": "api.example.com", "path_prefix": "/products/"}).json() == {"purged": 2}
    assert gw.request("GET", "/products/2", headers={"Host": "api.example.com"}).header("x-cache") == "MISS"
    assert gw.request("GET", "/other", headers={"Host": "api.example.com"}).header("x-cache") == "HIT"
    assert purge({"path": "/x"}).status == 400
    metrics = gw.admin("GET", "/metrics").body.decode()
    assert 'fastgw_cache_requests_total{route="all",result="hit"} 2' in metrics, metrics
    assert 'fastgw_cache_requests_total{route="all",result="miss"} 5' in metrics


def test_consumers_have_their_own_entries(gateway, start_upstream):
    upstream = start_upstream(RecordingUpstream(lambda req: Reply(
        200, [("Content-Type", "text/plain")], (req.header("x-consumer-name") or "-").encode())))
    config = proxy_config(upstream.port, plugins=[{"key_auth": {"header": "x-api-key"}}, {"cache": {"ttl": "30s"}}])
    config["consumers"] = [{"name": n, "credentials": {"api_keys": ["sha256:" + hashlib.sha256(n.encode()).hexdigest()]}}
                           for n in ("alice", "bob")]
    gw = gateway(config)
    a = [gw.request("GET", "/me", headers={"x-api-key": "alice"}) for _ in range(2)]
    b = [gw.request("GET", "/me", headers={"x-api-key": "bob"}) for _ in range(2)]
    assert [r.body for r in a + b] == [b"alice", b"alice", b"bob", b"bob"]
    assert [r.header("x-cache") for r in a + b] == ["MISS", "HIT", "MISS", "HIT"]
    assert gw.request("GET", "/me").status == 401                      # auth still runs before the cache
    # Without an auth plugin, a request with credentials is never answered from the shared cache.
    plain = start_upstream(RecordingUpstream(counting()))
    gw2 = gateway(cached_config(plain.port))
    answers = [gw2.request("GET", "/x", headers={"Authorization": "Bearer t"}) for _ in range(2)]
    assert [r.header("x-cache") for r in answers] == [None, None] and len(plain.requests) == 2


def test_aggregated_route_is_cached(gateway, start_upstream):
    backend = start_upstream(RecordingUpstream(counting()))
    config = gateway_config({"b": {"targets": [{"address": f"{HOST}:{backend.port}"}]}}, [
        route("page", ["/page/{id}"], aggregate={"backends": [{"service": "b", "path": "/x/{id}", "into": "x"}]},
              plugins=[{"cache": {"ttl": "30s"}}])])
    gw = gateway(config)
    first, second = gw.request("GET", "/page/1"), gw.request("GET", "/page/1")
    assert first.header("x-cache") == "MISS" and second.header("x-cache") == "HIT"
    assert second.json() == first.json() == {"x": {"n": 1, "path": "/x/1", "pad": ""}}
    assert len(backend.requests) == 1


def test_invalid_cache_config_is_refused(gateway):
    with pytest.raises(RuntimeError, match="max_entry_bytes"):
        gateway(cached_config(free_port(), max_bytes="1KiB", max_entry_bytes="2KiB"))
