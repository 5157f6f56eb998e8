"""The admin API refuses what a web page could send it: cross-site requests (a foreign Origin),
DNS-rebinding requests (a Host that is not the admin's own) and bodies that are not JSON, with or
without an admin token. Each test drives a real gateway's admin listener."""
from __future__ import annotations

import json
import socket

import pytest
import yaml

from upstreams import HOST, assert_error, free_port, http_request, proxy_config

EVIL_ORIGIN = "https://evil.example"


def admin_config(upstream_port: int, **admin) -> dict:
    config = proxy_config(upstream_port)
    config["admin"] = {"bind": f"{HOST}:{free_port()}", **admin}
    return config


def send(gw, method: str, path: str, body: bytes | None = None, **headers):
    """A request with exactly these headers (Host too, when given); the token when one is set."""
    if gw.admin_token:
        headers.setdefault("Authorization", f"Bearer {gw.admin_token}")
    headers = {k.replace("_", "-"): v for k, v in headers.items()}
    return http_request(gw.admin_port, method, path, headers=headers, body=body, timeout=30)


def refused(resp, status: int, code: str) -> None:
    """The proxy's JSON error shape, with this status and code."""
    assert resp.status == status, resp.body[:300]
    assert resp.header("content-type") == "application/json", resp.headers
    assert resp.json()["error"]["status"] == status and resp.json()["error"]["code"] == code


def targets_on_disk(gw) -> list[str]:
    return [t["address"] for t in yaml.safe_load(gw.config_path.read_text())["services"]["up"]["targets"]]


NEW_TARGET = json.dumps({"address": "127.0.0.1:1"}).encode()


@pytest.mark.parametrize("token", [None, "t0ken"])
def test_cross_site_and_rebinding_requests_change_nothing(gateway, upstream, token):
    gw = gateway(admin_config(upstream.port, **({"token": token} if token else {})))
    own = f"{HOST}:{gw.admin_port}"
    before = gw.config_path.read_text()
    attempts = [
        # The request: a page's text/plain POST, through a rebound name.
        dict(Host=f"rebind.evil.example:{gw.admin_port}", Origin=EVIL_ORIGIN, Content_Type="text/plain"),
        # Each part on its own.
        dict(Host=f"rebind.evil.example:{gw.admin_port}", Content_Type="application/json"),
        dict(Host=f"REBIND.Evil.Example:{gw.admin_port}", Content_Type="application/json"),
        dict(Host=own, Origin=EVIL_ORIGIN, Content_Type="application/json"),
        dict(Host=own, Origin="null", Content_Type="application/json"),
        # A page on another local port is another origin.
        dict(Host=own, Origin=f"http://{HOST}:{free_port()}", Content_Type="application/json"),
    ]
    for headers in attempts:
        refused(send(gw, "POST", "/services/up/targets", NEW_TARGET, **headers), 403, "forbidden")
    # Two Host fields (the admin's own, then the rebound one) are not the admin's own either.
    with socket.create_connection((HOST, gw.admin_port), timeout=10) as s:
        s.sendall(b"GET /config HTTP/1.1\r\nHost: %s\r\nHost: rebind.evil.example\r\n\r\n" % own.encode())
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 403") and b"listeners" not in answer
    # Not JSON: 415, from the admin's own origin too.
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                         None):
        headers = dict(Host=own, Origin=f"http://{own}")
        if content_type:
            headers["Content_Type"] = content_type
        refused(send(gw, "POST", "/services/up/targets", NEW_TARGET, **headers), 415,
                     "unsupported_media_type")
    assert gw.config_path.read_text() == before and targets_on_disk(gw) == [f"{HOST}:{upstream.port}"]
    assert gw.admin("GET", "/status").json()["config_version"] == 1
    # Reading the config through a rebound name: refused, nothing of the config in the answer.
    for method in ("GET", "HEAD"):
        resp = send(gw, method, "/config", Host=f"rebind.evil.example:{gw.admin_port}")
        assert resp.status == 403 and b"listeners" not in resp.body
    # The admin's own origin works: the page's fetches, curl (no Origin), localhost, JSON with charset.
    for headers in (dict(Host=own, Origin=f"http://{own}", Content_Type="application/json"),
                    dict(Host=f"localhost:{gw.admin_port}", Content_Type="application/json; charset=utf-8")):
        resp = send(gw, "POST", "/services/up/targets", NEW_TARGET, **headers)
        assert resp.status == 200, resp.body
        assert send(gw, "DELETE", "/services/up/targets/127.0.0.1:1", **headers).status == 200
    assert send(gw, "GET", "/config", Host=f"[::1]:{gw.admin_port}").status == 200
    assert send(gw, "GET", "/config", Host=f"localhost.:{gw.admin_port}").status == 200


def test_probes_answer_any_host(gateway, upstream):
    """A kubelet or load balancer probes with `Host: <pod ip>:port`; the probes expose no config."""
    gw = gateway(admin_config(upstream.port, token="t0ken"))
    for path in ("/status", "/status/ready"):
        resp = send(gw, "GET", path, Host=f"10.1.2.3:{gw.admin_port}", Authorization="")
        assert resp.status == 200, resp.body
    # Everything else still checks the Host, the dashboard too.
    refused(send(gw, "GET", "/", Host=f"10.1.2.3:{gw.admin_port}"), 403, "forbidden")
    refused(send(gw, "GET", "/metrics", Host=f"10.1.2.3:{gw.admin_port}"), 403, "forbidden")


def test_allowed_hosts_adds_the_names_an_operator_uses(gateway, upstream):
    gw = gateway(admin_config(upstream.port, token="t0ken", allowed_hosts=["gw.internal", "10.9.8.7"]))
    for host in ("gw.internal", f"gw.internal:{gw.admin_port}", "GW.Internal", "10.9.8.7", f"{HOST}:{gw.admin_port}"):
        assert send(gw, "GET", "/config", Host=host).status == 200, host
    refused(send(gw, "GET", "/config", Host="other.internal"), 403, "forbidden")
    # A page served from an allowed name is same-origin only on that name and port.
    own = f"gw.internal:{gw.admin_port}"
    assert send(gw, "GET", "/config", Host=own, Origin=f"http://{own}").status == 200
    refused(send(gw, "GET", "/config", Host=own, Origin="http://gw.internal:1"), 403, "forbidden")

