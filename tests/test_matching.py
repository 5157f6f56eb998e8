"""Header, query and client-profile matchers, API versioning patterns and deprecation headers,
through the gateway's listening socket with real upstreams."""
from __future__ import annotations

import subprocess
import sys
from email.utils import parsedate_to_datetime

import pytest
import yaml

from upstreams import RecordingUpstream, describe_request, gateway_config, route, target_service


def named(name):
    return RecordingUpstream(name=name, handler=lambda req: describe_request(req, name))


@pytest.fixture
def three(start_upstream):
    return [start_upstream(named(n)) for n in ("v1", "v2", "v3")]


def services(ups):
    return {u.name: target_service(u.port) for u in ups}


def server(gw, path, headers=None):
    resp = gw.request("GET", path, headers=headers or {})
    assert resp.status == 200, resp.body[:300]
    return resp.json()["server"]


def test_versioning_by_path_header_media_type_and_query(gateway, three):
    config = gateway_config(services(three), [
        # By path: /v1/... and /v2/... with the prefix stripped.
        route("path-v1", ["/v1/users/{id}"], "v1", rewrite={"path": "/users/{id}"}),
        route("path-v2", ["/v2/users/{id}"], "v2", rewrite={"path": "/users/{id}"}),
        # By header or media type: the same path; the route with more conditions is tried first
        # whatever the file order, so the unversioned default can come first.
        route("default", ["/users/{id}"], "v1"),
        route("header-v2", ["/users/{id}"], "v2", match_headers={"accept-version": "2"}),
        route("media-v3", ["/users/{id}"], "v3",
              match_headers={"accept": r"~application/vnd\.acme\.v3\+json"}),
        # By query parameter.
        route("query-v3", ["/users/{id}"], "v3", match_query={"api-version": "~^3(\\.\\d+)?$"}),
    ])
    for r in config["routes"]:
        for key in ("headers", "query"):
            if f"match_{key}" in r:
                r["match"][key] = r.pop(f"match_{key}")
    gw = gateway(config)
    assert server(gw, "/v1/users/7") == "v1"
    assert server(gw, "/v2/users/7") == "v2"
    assert three[1].requests[-1].path == "/users/7"
    assert server(gw, "/users/7") == "v1"
    assert server(gw, "/users/7", {"Accept-Version": "2"}) == "v2"
    assert server(gw, "/users/7", {"Accept-Version": "1"}) == "v1"
    assert server(gw, "/users/7", {"Accept": "application/vnd.acme.v3+json"}) == "v3"
    assert server(gw, "/users/7", {"Accept": "application/json"}) == "v1"
    assert server(gw, "/users/7?api-version=3.1") == "v3"
    assert server(gw, "/users/7?api-version=2") == "v1"
    assert server(gw, "/users/7?other=1&api-version=3") == "v3"
    assert server(gw, "/users/7?api%2Dversion=3") == "v3"          # percent-decoded names


def test_client_profiles_classify_once_and_route(gateway, three):
    config = gateway_config(services(three), [
        {**route("mobile", ["/home"], "v2"), "match": {"paths": ["/home"], "profile": "mobile"}},
        {**route("devices", ["/home"], "v3"), "match": {"paths": ["/home"], "profile": ["iot", "tv"]}},
        route("web", ["/home"], "v1"),
    ])
    config["clients"] = {
        "mobile": {"match": {"headers": {"user-agent": "~(?i)(android|iphone|ipad)"}}},
        "iot": {"match": {"headers": {"x-device-class": "iot"}}},
        "tv": {"match": {"query": {"device": "tv"}}},
    }
    gw = gateway(config)
    assert server(gw, "/home", {"User-Agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0)"}) == "v2"
    assert server(gw, "/home", {"User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Firefox/120"}) == "v1"
    assert server(gw, "/home", {"X-Device-Class": "iot"}) == "v3"
    assert server(gw, "/home?device=tv") == "v3"
    assert server(gw, "/home") == "v1"
    profiles = [line["profile"] for line in gw.access_log_lines(5)]
    assert profiles == ["mobile", None, "iot", "tv", None]


def test_deprecation_headers(gateway, three):
    config = gateway_config(services(three), [
        route("users-v1", ["/v1/users/{id}"], "v1",
              deprecation={"date": "2026-01-01T00:00:00Z", "sunset": "2027-06-30T00:00:00Z",
                           "link": "https://docs.example.com/migrate-v2"}),
        route("old", ["/old"], "v1", deprecation={}),
        route("users-v2", ["/v2/users/{id}"], "v2"),
    ])
    gw = gateway(config)
    resp = gw.request("GET", "/v1/users/1")
    assert resp.header("deprecation") == "@1767225600"
    assert parsedate_to_datetime(resp.header("sunset")).isoformat() == "2027-06-30T00:00:00+00:00"
    assert resp.header("link") == ('<https://docs.example.com/migrate-v2>; rel="deprecation"; '
                                   'type="text/html", <https://docs.example.com/migrate-v2>; '
                                   'rel="sunset"; type="text/html"')
    assert gw.request("GET", "/old").header("deprecation") == "true"
    assert gw.request("GET", "/v2/users/1").header("deprecation") is None


def test_check_reports_matcher_problems(tmp_path, three):
    config = gateway_config(services(three), [
        {**route("bad", ["/x"], "v1"), "match": {"paths": ["/x"], "headers": {"Host": "a"},
                                                 "query": {"v": "~("}, "profile": "tablet"}},
    ])
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "fastgw", "check", "-c", str(path)],
                         capture_output=True, text=True).stdout
    assert "routes[0].match.headers: cannot match on 'Host'" in out
    assert "routes[0].match.profile: unknown client profile 'tablet'" in out


def test_normalised_path_is_matched_and_forwarded(gateway, three):
    config = gateway_config(services(three), [
        route("admin", ["/admin/**"], "v2"),
        route("public", ["/public/**"], "v1"),
    ])
    gw = gateway(config)
    for raw in ("/public/../admin/users", "/%61dmin/users", "/public/./../%61dmin/./users"):
        conn = gw.connect()
        conn.send(f"GET {raw} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        resp = conn.read_response()
        assert resp.status == 200 and resp.json()["server"] == "v2", raw
        assert resp.json()["path"] == "/admin/users", raw
    assert gw.request("GET", "/public/x").json()["path"] == "/public/x"
