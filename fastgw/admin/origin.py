"""Which requests the admin API answers at all: those addressed to it, from its own origin, with
JSON bodies — with or without a token (defence in depth).

A web page can reach a loopback admin API: the browser sends a cross-site POST with a `text/plain`
body without asking first (a CORS "simple request", which the server must refuse itself), and DNS
rebinding points the page's own name at 127.0.0.1 so that even reading the answers is same-origin
to the browser. Hence three rules:

- Host (RFC 9110 §7.2) must name the admin: a loopback name, the bind address, a name listed in
  `admin.allowed_hosts`, or the IP address the connection came in on. A rebound name is the
  attacker's own and is none of these. The port is not compared (a proxy in front may change it).
- Origin (RFC 6454 §7), when sent, must be this request's own scheme://Host: any other page,
  `null` included, is another origin.
- A body must be `application/json`, which no page can send cross-site without a preflight.

The probes (`GET /status`, `GET /status/ready`) answer any Host: load balancers and kubelets send
`Host: <pod ip>:port`, and the probes show no configuration.
"""
from __future__ import annotations

import ipaddress
import re
import socket

from fastgw.admin.http import AdminRequest, HTTPError

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARDS = frozenset({"0.0.0.0", "::"})
PROBES = frozenset({("status",), ("status", "ready")})
# host = IP-literal / IPv4address / reg-name, then an optional port (RFC 3986 §3.2.2, §3.2.3).
_HOST = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9_.-]+))(?::(?P<port>\d{1,5}))?\Z")
_ORIGIN = re.compile(r"^(?P<scheme>https?)://(?P<host>[^/?#@]+)\Z", re.I)
_DEFAULT_PORTS = {"http": 80, "https": 443}


def host_name(text: str) -> str:
    """A host as compared: lower case, no brackets, no trailing dot (`localhost.` is localhost)."""
    return text.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")


def _split_host(value: str) -> tuple[str, int | None] | None:
    m = _HOST.match(value.strip())
    if m is None:
        return None
    return host_name(m["v6"] or m["name"]), int(m["port"]) if m["port"] else None


class SameOrigin:
    """The admin's own names, from its bind address and `admin.allowed_hosts`."""

    def __init__(self, bind_host: str, allowed_hosts: list[str]):
        names = set(LOOPBACK_NAMES) | {host_name(h) for h in allowed_hosts}
        bind_host = host_name(bind_host)
        if bind_host in WILDCARDS:
            names.add(host_name(socket.gethostname()))   # `http://thismachine:9901/`
        else:
            names.add(bind_host)
        self.names = frozenset(names)

    def __call__(self, req: AdminRequest) -> None:
        host = req.headers.get("host")
        if host is not None:
            split = _split_host(host)
            if split is None or not self._own(split[0], req.local) and tuple(req.segments) not in PROBES:
                raise HTTPError(403, "forbidden", f"Host {host!r} is not this admin API's address: "
                                                  "add the name to admin.allowed_hosts")
        origin = req.headers.get("origin")
        if origin is not None and not _same_origin(origin, host):
            raise HTTPError(403, "forbidden", f"cross-origin request from {origin!r} refused")
        media_type = req.headers.get("content-type", "").partition(";")[0].strip().lower()
        if req.body and media_type != "application/json":
            raise HTTPError(415, "unsupported_media_type", "the body must be Content-Type: application/json")

    def _own(self, name: str, local: str) -> bool:
        if name in self.names:
            return True
        try:
            return ipaddress.ip_address(name) == ipaddress.ip_address(local)
        except ValueError:
            return False


def _same_origin(origin: str, host: str | None) -> bool:
    """`Origin: http://h:p` names the same host and port as `Host: h:p` (default ports by scheme)."""
    m = _ORIGIN.match(origin.strip())
    if m is None or host is None:
        return False
    theirs, ours = _split_host(m["host"]), _split_host(host)
    if theirs is None or ours is None:
        return False
    default = _DEFAULT_PORTS[m["scheme"].lower()]
    return theirs[0] == ours[0] and (theirs[1] or default) == (ours[1] or default)
