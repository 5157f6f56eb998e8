"""The Cython router against a small pure-Python reference model (hypothesis), plus the rules a
user relies on: specificity, priorities, hosts, methods, captures, rewrites, normalisation."""
import re

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastgw._core.router import parse_pattern
from fastgw._core.uri import canonical_host, canonical_path
from fastgw.runtime.build import compile_config
from fastgw.config.model import Config, dec_hook


def runtime(routes, previous=None):
    config = msgspec.convert({
        "listeners": [{"name": "t", "bind": "127.0.0.1:1"}],
        "services": {"s": {"targets": [{"address": "127.0.0.1:9"}]}},
        "routes": [{"service": "s", **r} for r in routes],
    }, Config, dec_hook=dec_hook)
    return compile_config(config, previous=previous)


def hit(rt, path, method="GET", host="", headers=None):
    """The route the data plane picks: it makes Host and path canonical first."""
    found = rt.router.lookup(method, canonical_host(host.encode()), canonical_path(path.encode()), headers)
    return None if found is None else found[0].route.name


# --- reference model ---------------------------------------------------------------------------

def _ranks(pattern, path):
    """Per-segment ranks (0 literal, 1 param, 2 tail) if `pattern` matches `path`, else None."""
    segs = [] if path == "/" else path[1:].split("/")
    parts = parse_pattern(pattern)
    ranks = _segment_ranks(parts, segs)
    if ranks is None and len(segs) > 1 and segs[-1] == "":
        # "/a/" also matches as "/a": after an exact "" segment, before any tail
        ranks = _segment_ranks(parts, segs[:-1])
        return None if ranks is None or (parts and parts[-1][0] == "tail") else ranks + [1]
    return ranks


def _segment_ranks(parts, segs):
    ranks = []
    for i, (kind, value) in enumerate(parts):
        if kind == "tail":
            return ranks + [2]
        if i >= len(segs):
            return None
        if kind == "lit" and segs[i] != value:
            return None
        if kind == "param" and segs[i] == "":
            return None
        ranks.append(0 if kind == "lit" else 1)
    return ranks if len(parts) == len(segs) else None


def _conditions_hold(conditions, headers):
    for name, want in conditions.items():
        value = next((v for k, v in headers.items() if k.lower() == name), None)
        if value is None or not (re.search(want[1:], value) if want.startswith("~") else value == want):
            return False
    return True


def reference(routes, method, host, path, headers=None):
    """Highest priority; then the most specific path, segment by segment from the left
    (exact > param > tail); then more header conditions; then file order."""
    headers = headers or {}
    path = re.sub("/+", "/", path)           # the data plane merges repeated slashes

    def table_match(rules):
        found = []
        for index, r in enumerate(routes):
            if r not in rules:
                continue
            methods = r["match"].get("methods")
            if methods and method not in methods and not (method == "HEAD" and "GET" in methods):
                continue
            conditions = r["match"].get("headers", {})
            if not _conditions_hold(conditions, headers):
                continue
            for pattern in r["match"]["paths"]:
                ranks = _ranks(pattern, path)
                if ranks is not None:
                    found.append((-r.get("priority", 0), ranks, -len(conditions), index, r["name"]))
        return min(found)[4] if found else None

    host = host.lower()
    bare = host.rsplit(":", 1)[0] if ":" in host else host
    exact = [r for r in routes if host in r["match"].get("hosts", [])] or \
        [r for r in routes if bare in r["match"].get("hosts", [])]
    tables = [exact] if host else []
    if host:
        suffixes = sorted({h[1:] for r in routes for h in r["match"].get("hosts", [])
                           if h.startswith("*.")}, key=len, reverse=True)
        for suffix in suffixes:
            if bare.endswith(suffix) and len(bare) > len(suffix):
                tables.append([r for r in routes if "*" + suffix in r["match"].get("hosts", [])])
    tables.append([r for r in routes if not r["match"].get("hosts")])
    for rules in tables:
        name = table_match(rules)
        if name is not None:
            return name
    return None


segment = st.sampled_from(["a", "b", "c"])
pattern_part = st.one_of(segment, st.just("{p}"), st.just("{q}"))


@st.composite
def patterns(draw):
    parts = draw(st.lists(pattern_part, max_size=3))
    out = []
    for p in parts:
        if p.startswith("{"):
            p = "{%s%d}" % (p[1], len(out))
        out.append(p)
    if draw(st.booleans()):
        out.append("**" if draw(st.booleans()) else "{rest...}")
    return "/" + "/".join(out)


@st.composite
def route_sets(draw):
    n = draw(st.integers(1, 8))
    use_priority = draw(st.booleans())
    routes = []
    for i in range(n):
        match = {"paths": draw(st.lists(patterns(), min_size=1, max_size=2, unique=True))}
        methods = draw(st.sampled_from([[], ["GET"], ["POST"], ["GET", "POST"]]))
        if methods:
            match["methods"] = methods
        hosts = draw(st.sampled_from([[], ["x.com"], ["*.com"], ["x.com", "*.y.com"]]))
        if hosts:
            match["hosts"] = hosts
        headers = draw(st.sampled_from(HEADER_CONDITIONS))
        if headers:
            match["headers"] = headers
        route = {"name": f"r{i}", "match": match}
        if use_priority:
            route["priority"] = draw(st.integers(0, 2))
        routes.append(route)
    return routes


HEADER_CONDITIONS = [{}, {}, {"x-v": "1"}, {"x-v": "2"}, {"x-v": "~^[12]$"},
                     {"x-v": "1", "x-w": "~."}]
request_headers = st.sampled_from([{}, {"X-V": "1"}, {"x-v": "2"}, {"x-v": "3"},
                                   {"x-v": "1", "X-W": "yes"}])
request_paths = st.lists(st.sampled_from(["a", "b", "c", "d", ""]), max_size=4).map(
    lambda segs: "/" + "/".join(segs))


requests_strategy = st.lists(st.tuples(
    st.sampled_from(["GET", "HEAD", "POST", "PUT"]),
    st.sampled_from(["", "x.com", "X.COM:8080", "a.y.com", "z.com"]),
    request_paths, request_headers), min_size=1, max_size=10)


@settings(max_examples=300, deadline=None)
@given(route_sets(), requests_strategy)
def test_router_agrees_with_reference_model(routes, requests):
    rt = runtime(routes)
    for method, host, path, headers in requests:
        assert hit(rt, path, method, host, headers) == reference(routes, method, host, path, headers), \
            (method, host, path, headers)


@settings(max_examples=150, deadline=None)
@given(route_sets(), route_sets(), requests_strategy)
def test_incremental_rebuild_agrees_with_reference_model(old_routes, new_routes, requests):
    """A reload compiles against the previous tables, reusing unchanged routes (same name,
    position and spec); what it builds must match exactly as a fresh build would."""
    new_routes = old_routes[: len(old_routes) // 2] + new_routes     # some unchanged, some not
    seen, merged = set(), []
    for r in new_routes:
        if r["name"] not in seen:
            seen.add(r["name"])
            merged.append(r)
    rt = runtime(merged, previous=runtime(old_routes))
    for method, host, path, headers in requests:
        assert hit(rt, path, method, host, headers) == reference(merged, method, host, path, headers), \
            (method, host, path, headers)


# --- the rules, spelled out ----------------------------------------------------------------------

def test_specificity_exact_then_param_then_tail():
    rt = runtime([
        {"name": "tail", "match": {"paths": ["/users/**"]}},
        {"name": "param", "match": {"paths": ["/users/{id}"]}},
        {"name": "exact", "match": {"paths": ["/users/me"]}},
    ])
    assert hit(rt, "/users/me") == "exact"
    assert hit(rt, "/users/42") == "param"
    assert hit(rt, "/users/42/orders") == "tail"
    assert hit(rt, "/users") == "tail"          # /** also matches zero segments


def test_priority_beats_specificity_and_file_order_breaks_ties():
    rt = runtime([
        {"name": "specific", "match": {"paths": ["/a/b"]}},
        {"name": "catch-all", "match": {"paths": ["/**"]}, "priority": 5},
        {"name": "first", "match": {"paths": ["/x"]}},
        {"name": "second", "match": {"paths": ["/x"]}},
    ])
    assert hit(rt, "/a/b") == "catch-all"
    rt = runtime([{"name": "first", "match": {"paths": ["/x"]}},
                  {"name": "second", "match": {"paths": ["/x"]}}])
    assert hit(rt, "/x") == "first"


def test_hosts_exact_wildcard_port_and_case():
    rt = runtime([
        {"name": "api", "match": {"hosts": ["api.example.com"], "paths": ["/**"]}},
        {"name": "wild", "match": {"hosts": ["*.example.com"], "paths": ["/**"]}},
        {"name": "any", "match": {"paths": ["/**"]}},
    ])
    assert hit(rt, "/", host="API.Example.com:8443") == "api"
    assert hit(rt, "/", host="www.example.com") == "wild"
    assert hit(rt, "/", host="a.b.example.com") == "wild"
    assert hit(rt, "/", host="example.com") == "any"
    assert hit(rt, "/", host="other.org") == "any"


def test_methods_filter_and_fall_through():
    rt = runtime([
        {"name": "read", "match": {"paths": ["/items/{id}"], "methods": ["GET", "HEAD"]}},
        {"name": "write", "match": {"paths": ["/items/{id}"], "methods": ["PUT"]}},
        {"name": "other", "match": {"paths": ["/items/**"]}},
    ])
    assert hit(rt, "/items/1", "GET") == "read"
    assert hit(rt, "/items/1", "PUT") == "write"
    assert hit(rt, "/items/1", "DELETE") == "other"
    assert hit(rt, "/items/1", "PURGE") == "other"   # a method no route names


def test_regex_paths_are_tried_after_the_trie():
    rt = runtime([
        {"name": "re", "match": {"paths": [r"~^/v(?P<ver>\d+)/.*$"]}},
        {"name": "exact", "match": {"paths": ["/v1/status"]}},
    ])
    assert hit(rt, "/v1/status") == "exact"
    assert hit(rt, "/v2/anything") == "re"
    assert hit(rt, "/vx/anything") is None


@pytest.mark.parametrize("rewrite, path, expected", [
    ({"path": "/users/{id}"}, "/v2/users/7", "/users/7"),
    ({"path": "/users/{id}"}, "/v2/users", "/users"),          # missing capture: dropped
    ({"path": "/u/{id}/x"}, "/v2/users/7", "/u/7/x"),
    ({"strip_prefix": "/v2"}, "/v2/users/7", "/users/7"),
    ({"strip_prefix": "/v2/"}, "/v2/users", "/users"),
    ({"strip_prefix": "/v2"}, "/v2", "/"),
])
def test_rewrite_paths(rewrite, path, expected):
    rt = runtime([{"name": "r", "match": {"paths": ["/v2/users/{id}", "/v2/users", "/v2"]},
                   "rewrite": rewrite}])
    assert rt.router.upstream_path("GET", "", path) == expected


def test_tail_capture_and_rewrite():
    rt = runtime([{"name": "files", "match": {"paths": ["/files/{rest...}"]},
                   "rewrite": {"path": "/store/{rest}"}}])
    rule, params = rt.router.lookup("GET", "", "/files/a/b.txt")
    assert params == {"rest": "a/b.txt"}
    assert rt.router.upstream_path("GET", "", "/files/a/b.txt") == "/store/a/b.txt"


@pytest.mark.parametrize("raw, normal", [
    (b"/a/./b/../c", b"/a/c"),
    (b"/../../etc/passwd", b"/etc/passwd"),
    (b"/%61dmin", b"/admin"),
    (b"/%2e%2e/admin", b"/admin"),
    (b"/caf%c3%a9", b"/caf%C3%A9"),       # other escapes are upper-cased, not decoded
    (b"//admin//secret.txt", b"/admin/secret.txt"),
    (b"/x/.%2E//admin", b"/admin"),
    (b"/a/b/..", b"/a/"),
    (b"/a/.", b"/a/"),
    (b"///", b"/"),
    (b"/a;x=1/b", b"/a;x=1/b"),           # parameters stay: the router ignores them
    (b"/plain", b"/plain"),
])
def test_canonical_path(raw, normal):
    assert canonical_path(raw) == normal


@pytest.mark.parametrize("bad", [b"/a%zz", b"/a%4", b"/a%", b"/a%2fb", b"/a%5Cb", b"/a\\b", b"/a%00",
                                 b"/..;/admin", b"/a/.;x/b", b"relative"])
def test_canonical_path_refuses(bad):
    with pytest.raises(ValueError):
        canonical_path(bad)


def test_canonical_path_keeps_escaped_slashes_when_asked():
    assert canonical_path(b"/a%2fb", True) == b"/a%2Fb"
    assert canonical_path(b"/a\\b//c", True) == b"/a\\b/c"


@pytest.mark.parametrize("raw, canonical", [
    (b"Secure.Example.COM", b"secure.example.com"),
    (b"secure.example.com.", b"secure.example.com"),
    (b"secure.example.com.:8443", b"secure.example.com:8443"),
    (b"[::ABCD]:80", b"[::abcd]:80"),
    (b"h:", b"h"),
    (b"", b""),
    (b"a_b.internal:80", b"a_b.internal:80"),
])
def test_canonical_host(raw, canonical):
    assert canonical_host(raw) == canonical


@pytest.mark.parametrize("bad", [b"secure.example.com ", b"secure.example.com\t", b"a@secure.example.com",
                                 b"secure.example.com@evil", b"a..b", b".a", b"a.com..", b"h:99999", b"h:8a",
                                 b":80", b"[::1%25eth0]", b"[::1", b"a/b", b"a%41", b"caf\xc3\xa9"])
def test_canonical_host_refuses(bad):
    with pytest.raises(ValueError):
        canonical_host(bad)


@pytest.mark.parametrize("pattern, message", [
    ("users", "must start with '/'"),
    ("/a/**/b", "last segment"),
    ("/a/{x...}/b", "last segment"),
    ("/a/{x}/{x}", "twice"),
    ("/a/x{y}", "no mixing"),
    ("/a//b", "empty segment"),
    ("/a/../b", "never matches"),
    ("/admin;x", "never matches"),
    ("/a\\b", "never matches"),
    ("/%61dmin", "write it as 'admin'"),
    ("/a%2fb", "write it as 'a%2Fb'"),
    ("/a%zz", "invalid escape"),
])
def test_bad_patterns_are_config_errors(pattern, message):
    from fastgw.config.errors import CompileError

    with pytest.raises(CompileError, match=re.escape(message)):
        runtime([{"name": "r", "match": {"paths": [pattern]}}])
