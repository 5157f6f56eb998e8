"""Semantic checks: what the schema cannot say (references, uniqueness, ranges, address syntax).

Each check yields ConfigProblems with a key path only; the loader adds file and line. Checks never
stop at the first problem so that one `fastgw check` run lists everything that is wrong.
"""
from __future__ import annotations

import importlib.util
import ipaddress
import json
import re
from typing import Iterable, Iterator

import msgspec

from fastgw.config.errors import ConfigProblem
from fastgw.config.model import Config, Limits, Route, Service
from fastgw.tls import ServerTls, TlsFileError, client_context

# RFC 9110 §5.6.2: token = 1*tchar. Patterns here end in \Z: `$` also matches before a final
# newline, so "x-user\n" would pass for a token.
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# RFC 9110 §5.5: a field value never holds CR, LF or NUL (they would end the field or the head and
# let a value write fields of its own); the other C0 controls and DEL are refused too, HTAB allowed.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# The request-target (RFC 9112 §3.2) and Host (RFC 9110 §7.2) hold no whitespace at all.
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_-]+\Z")
# A DNS label; "_" is tolerated because container and service-discovery names use it.
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*\.?\Z")
_HOST_PATTERN = re.compile(rf"^(?:\*\.)?{_LABEL}(?:\.{_LABEL})*(?::\d{{1,5}})?\Z")
_BIND = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:\[\]]+)):(?P<port>\d{1,5})\Z")
_WILDCARDS = {"0.0.0.0", "::"}


def parse_bind(value: str) -> tuple[str, int]:
    """Split `host:port` or `[v6addr]:port` into (host, port); host loses its brackets."""
    m = _BIND.match(value)
    if not m:
        hint = " (put an IPv6 address in brackets: [::1]:8080)" if value.count(":") > 1 else ""
        raise ValueError(f"{value!r} is not host:port{hint}")
    port = int(m["port"])
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} in {value!r} is outside 1..65535")
    if m["v6"] is not None:
        try:
            ipaddress.IPv6Address(m["v6"])
        except ValueError:
            raise ValueError(f"{m['v6']!r} in {value!r} is not an IPv6 address") from None
        return m["v6"], port
    host = m["host"]
    # All-numeric dotted names would be taken for IPv4 by the resolver, so they must be valid IPv4.
    if re.fullmatch(r"[\d.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in {value!r} is not an IPv4 address") from None
    elif not _HOSTNAME.match(host):
        raise ValueError(f"{host!r} in {value!r} is not a host name or IP address")
    return host, port


def key_path(path: str, key: str) -> str:
    """`path.key`, or `path["key"]` for a key that is not a plain word (as the loader writes paths)."""
    return f"{path}.{key}" if _PLAIN_KEY.match(key) else f"{path}[{json.dumps(key)}]"


def header_name_problems(path: str, name: object) -> Iterator[ConfigProblem]:
    """A field name is a token (RFC 9110 §5.1, §5.6.2)."""
    if isinstance(name, str) and not _TOKEN.match(name):
        yield ConfigProblem(path, f"{name!r} is not a valid header name (RFC 9110 §5.1: a token)")


def header_value_problems(path: str, value: object, *, no_space: bool = False) -> Iterator[ConfigProblem]:
    """No control characters in what is written into an HTTP head (RFC 9110 §5.5); `no_space` for a
    request-target or Host, which have no whitespace either."""
    if isinstance(value, str) and (_CONTROL_OR_SPACE if no_space else _CONTROL).search(value):
        what = "spaces or control characters" if no_space else "control characters (CR, LF, NUL, ...)"
        yield ConfigProblem(path, f"{value!r} has {what}: they would be written into the HTTP head")


def _header_map_problems(path: str, headers: dict, *, names_only: bool = False) -> Iterator[ConfigProblem]:
    """name -> value maps; `names_only` when the values are header names as well (rename)."""
    for name, value in headers.items():
        where = key_path(path, name)
        yield from header_name_problems(where, name)
        yield from header_name_problems(where, value) if names_only else header_value_problems(where, value)


def semantic_problems(config: Config, plugin_problems: Iterable[ConfigProblem] = ()) -> list[ConfigProblem]:
    """Every problem of a decoded config that the model alone shows; `plugin_problems`, found by
    the layer that knows the plugins (fastgw/runtime/load.py), are listed in their place."""
    otel_problem = otel_missing() if config.tracing.otlp_endpoint else None
    return [
        *_listener_problems(config),
        *_service_problems(config),
        *_route_problems(config),
        *_head_problems(config),
        *_consumer_problems(config),
        *_client_problems(config),
        *_dns_problems(config.dns),
        *plugin_problems,
        *_failing([
            ("log.access.sample", 0.0 <= config.log.access.sample <= 1.0, "must be between 0 and 1"),
            ("tracing.sample_ratio", 0.0 <= config.tracing.sample_ratio <= 1.0, "must be between 0 and 1"),
            ("tracing.otlp_endpoint", not otel_problem, otel_problem),
            ("workers", config.workers == "auto" or 1 <= config.workers <= 1024,
             "must be 'auto' or a number from 1 to 1024"),
            ("cluster.redis", config.cluster is None or _installed("redis"),
             "cluster mode needs the redis package: pip install 'fastgw[cluster]'"),
            ("cluster.redis", config.cluster is None or config.cluster.redis.startswith(("redis://", "rediss://", "unix://")),
             "must be a redis://host:port/db URL (rediss:// for TLS, unix:// for a socket)"),
        ]),
    ]


def _failing(checks: Iterable[tuple[str, bool, str]], severity: str = "error") -> Iterator[ConfigProblem]:
    """Table-driven checks: one (key path, condition that must hold, message) row per rule."""
    for path, ok, message in checks:
        if not ok:
            yield ConfigProblem(path, message, severity=severity)


def _bind_problem(path: str, value: str) -> ConfigProblem | None:
    try:
        parse_bind(value)
    except ValueError as e:
        return ConfigProblem(path, str(e))
    return None


# Fields the proxy consumes or rewrites itself: a route cannot match on them (hosts: does Host).
_UNMATCHABLE = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "te",
                "trailer", "upgrade", "proxy-connection", "x-forwarded-for", "x-forwarded-proto",
                "x-forwarded-host", "traceparent", "x-request-id", "expect"}


def _condition_problems(path: str, headers: dict[str, str]) -> Iterator[ConfigProblem]:
    for name in headers:
        lower = name.lower()
        yield from _failing([
            (f"{path}.headers", bool(_TOKEN.match(name)), f"{name!r} is not a valid header name"),
            (f"{path}.headers", lower not in _UNMATCHABLE,
             f"cannot match on {name!r}: the proxy handles that field itself"
             + (" (use match.hosts)" if lower == "host" else "")),
        ])


_API_KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}\Z")
_SCRYPT_HASH = re.compile(r"^scrypt\$\d+\$\d+\$\d+\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+\Z")


def _client_problems(config: Config) -> Iterator[ConfigProblem]:
    for name, client in config.clients.items():
        yield from _condition_problems(f"clients.{name}.match", client.match.headers)
        yield from _failing([(f"clients.{name}.match", bool(client.match.headers or client.match.query),
                              "a profile needs at least one header or query condition")])
    for i, consumer in enumerate(config.consumers):
        if consumer.profile is not None:
            yield from _failing([(f"consumers[{i}].profile", consumer.profile in config.clients,
                                  f"unknown client profile {consumer.profile!r}")])


def _consumer_problems(config: Config) -> Iterator[ConfigProblem]:
    yield from _duplicates(((f"consumers[{i}].name", c.name) for i, c in enumerate(config.consumers)),
                           "consumer name")
    for i, consumer in enumerate(config.consumers):
        creds = consumer.credentials
        yield from _failing(
            [(f"consumers[{i}].credentials.api_keys[{j}]", bool(_API_KEY_HASH.match(key)),
              "must be a hash from `fastgw hash key` (sha256:<64 hex digits>), never the key itself")
             for j, key in enumerate(creds.api_keys)]
            + [(f"consumers[{i}].credentials.basic[{j}].password_hash", bool(_SCRYPT_HASH.match(b.password_hash)),
                "must be a hash from `fastgw hash password` (scrypt$n$r$p$salt$hash)")
               for j, b in enumerate(creds.basic)])


def _duplicates(items: Iterable[tuple[str, object]], what: str) -> Iterator[ConfigProblem]:
    """A problem for every (path, key) whose key was already seen, naming the first occurrence."""
    first: dict[object, str] = {}
    for path, key in items:
        if key in first:
            yield ConfigProblem(path, f"duplicate {what} {key!r} (first used at {first[key]})")
        else:
            first[key] = path


def _listener_problems(config: Config) -> Iterator[ConfigProblem]:
    if not config.listeners:
        yield ConfigProblem("listeners", "at least one listener is required")
    yield from _duplicates(((f"listeners[{i}].name", l.name) for i, l in enumerate(config.listeners)),
                           "listener name")
    binds = [(f"listeners[{i}].bind", l.bind) for i, l in enumerate(config.listeners)]
    if config.admin is not None:
        binds.append(("admin.bind", config.admin.bind))
    yield from _bind_conflicts(binds)
    for i, listener in enumerate(config.listeners):
        yield from _limit_problems(f"listeners[{i}].limits", listener.limits)
        yield from _layer4_problems(config, f"listeners[{i}]", listener)
        yield from _proxy_protocol_problems(f"listeners[{i}].proxy_protocol", listener.proxy_protocol)
    if config.admin is not None:
        yield from _admin_problems(config.admin.bind, config.admin.token)
        yield from _failing([("admin.backups", 0 <= config.admin.backups <= 1000, "must be a number from 0 to 1000")])
        for i, name in enumerate(config.admin.allowed_hosts):
            yield from _failing([(f"admin.allowed_hosts[{i}]", _is_host(name),
                                  f"{name!r} is not a host name or IP address (no port)")])


def _proxy_protocol_problems(path: str, proxy) -> Iterator[ConfigProblem]:
    for j, cidr in enumerate(getattr(proxy, "trusted", ())):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            yield ConfigProblem(f"{path}.trusted[{j}]", f"{cidr!r} is not an IPv4 or IPv6 network (CIDR)")


_SNI_NAME = re.compile(r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")


def _layer4_problems(config: Config, path: str, listener) -> Iterator[ConfigProblem]:
    """tcp listeners and TLS passthrough: what their bytes go to."""
    def service_problem(where: str, name: str) -> ConfigProblem | None:
        service = config.services.get(name)
        if service is None:
            return ConfigProblem(where, f"unknown service {name!r}")
        if service.kind != "proxy":
            return ConfigProblem(where, f"service {name!r} is built in ({service.kind}): bytes need targets")
        return None
    tls = listener.tls
    if listener.protocol == "https" and (tls is None or not tls.passthrough):
        yield from _tls_problems(f"{path}.tls", tls)
        if listener.service is not None:
            yield ConfigProblem(f"{path}.service", "an https listener that terminates TLS uses routes")
        return
    if listener.protocol == "http":
        if listener.service is not None:
            yield ConfigProblem(f"{path}.service", "only tcp listeners take a service (http ones use routes)")
        if tls is not None:
            yield ConfigProblem(f"{path}.tls", "an http listener has no TLS (use protocol: https)")
        return
    if tls is not None and listener.protocol == "tcp":
        yield ConfigProblem(f"{path}.tls", "a tcp listener has no TLS (protocol: https passes it through)")
    routes = tls.sni_routes if tls is not None else {}
    if listener.service is None and not routes:
        yield ConfigProblem(f"{path}.service", "a tcp listener needs the service its connections go to"
                            if listener.protocol == "tcp" else "name a default service or tls.sni_routes")
    if listener.service is not None:
        problem = service_problem(f"{path}.service", listener.service)
        if problem:
            yield problem
    for name, service in routes.items():
        where = f"{path}.tls.sni_routes.{name}"
        if not _SNI_NAME.match(name):
            yield ConfigProblem(where, "must be a lower-case host name, or *. and one (like *.example.com)")
        problem = service_problem(where, service)
        if problem:
            yield problem


def _tls_problems(path: str, tls) -> Iterator[ConfigProblem]:
    """An https listener that terminates TLS: certificates that load, mTLS that can verify."""
    if tls is None or not tls.certificates:
        yield ConfigProblem(f"{path}.certificates", "an https listener needs at least one certificate "
                            "(or tls.passthrough: true)")
        return
    if tls.sni_routes:
        yield ConfigProblem(f"{path}.sni_routes", "only for tls.passthrough")
    if tls.client_auth != "none" and not tls.client_ca:
        yield ConfigProblem(f"{path}.client_ca", f"client_auth: {tls.client_auth} needs the CA that "
                                                 "client certificates must chain to")
        return
    try:
        ServerTls(tls)
    except TlsFileError as exc:
        yield ConfigProblem(f"{path}.{exc.path}", str(exc))


def _bind_conflicts(binds: list[tuple[str, str]]) -> Iterator[ConfigProblem]:
    """Two sockets on one port clash when the hosts are equal or one is a wildcard; with
    SO_REUSEPORT the kernel would not refuse them, it would split connections between them."""
    seen: list[tuple[str, str, int]] = []
    for path, bind in binds:
        problem = _bind_problem(path, bind)
        if problem:
            yield problem
            continue
        host, port = parse_bind(bind)
        host = host.lower()
        for other_path, other_host, other_port in seen:
            if port == other_port and (host == other_host or {host, other_host} & _WILDCARDS):
                yield ConfigProblem(path, f"{bind!r} conflicts with {other_path}")
                break
        seen.append((path, host, port))


def _is_host(name: str) -> bool:
    try:
        ipaddress.ip_address(name.removeprefix("[").removesuffix("]"))
        return True
    except ValueError:
        return bool(_HOSTNAME.match(name)) and not re.fullmatch(r"[\d.]+", name)


def _admin_problems(bind: str, token: str | None) -> Iterator[ConfigProblem]:
    # The admin API can change routing, so it is only reachable from outside with a token.
    try:
        host, _ = parse_bind(bind)
    except ValueError:
        return  # already reported as a bind problem
    if token:
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host.lower() == "localhost"
    if not loopback:
        yield ConfigProblem("admin.token", f"admin.bind {bind!r} is not a loopback address: set a token")


def _limit_problems(path: str, limits: Limits) -> Iterator[ConfigProblem]:
    return _failing([
        (f"{path}.max_headers", limits.max_headers >= 1, "must be at least 1"),
        (f"{path}.max_url_bytes", limits.max_url_bytes >= 16, "must be at least 16 bytes"),
        (f"{path}.max_header_bytes", limits.max_header_bytes >= 1024, "must be at least 1KiB"),
        (f"{path}.header_timeout", limits.header_timeout > 0, "must be greater than 0"),
        (f"{path}.idle_timeout", limits.idle_timeout > 0, "must be greater than 0"),
        (f"{path}.max_connections", limits.max_connections >= 1, "must be at least 1"),
    ])


def _service_problems(config: Config) -> Iterator[ConfigProblem]:
    by_routes = {route.service for route in config.routes}
    by_routes |= {b.service for route in config.routes if route.aggregate for b in route.aggregate.backends}
    by_routes |= {route.grpc.service for route in config.routes if route.grpc}
    used = by_routes | {listener.service for listener in config.listeners if listener.protocol != "http"}
    used |= {svc for listener in config.listeners if listener.tls for svc in listener.tls.sni_routes.values()}
    for name, service in config.services.items():
        path = f"services.{name}"
        yield from _one_service(path, service)
        if service.send_proxy_protocol is not None and name in by_routes:
            # HTTP upstream connections are pooled and shared by clients: one header cannot
            # name the client of every request sent over it.
            yield ConfigProblem(f"{path}.send_proxy_protocol",
                                "only for services of tcp listeners, not services that routes use")
        # An unused pool is legal (it may be kept for a quick switch) but is often a typo.
        if name not in used:
            yield ConfigProblem(path, f"service {name!r} is not used by any route", severity="warning")


_HASH_ON = re.compile(r"^(ip|path|consumer|(header|cookie|query):[!#$%&'*+\-.^_`|~0-9A-Za-z]+)\Z")


def _balance_problems(path: str, service: Service) -> Iterator[ConfigProblem]:
    balance = service.balance
    hashing = balance.algorithm == "consistent_hash"
    yield from _failing([
        (f"{path}.balance.hash_on", balance.hash_on is None or bool(_HASH_ON.match(balance.hash_on)),
         "must be ip, path, consumer, header:NAME, cookie:NAME or query:NAME"),
        (f"{path}.balance.hash_on", hashing or balance.hash_on is None,
         "only consistent_hash uses hash_on"),
        (f"{path}.balance.hash_on", not hashing or balance.hash_on is not None,
         "consistent_hash needs hash_on (what to hash: ip, header:x-user-id, ...)"),
        (f"{path}.balance.bounded_load", balance.bounded_load is None or (hashing and balance.bounded_load >= 1.0),
         "only consistent_hash uses bounded_load, and it must be at least 1.0"),
    ])


def _health_problems(path: str, service: Service) -> Iterator[ConfigProblem]:
    active, passive = service.health.active, service.health.passive
    if active is not None:
        where = f"{path}.health.active"
        yield from _failing([
            (f"{where}.path", active.path.startswith("/"), "must start with '/'"),
            (f"{where}.interval", active.interval >= 0.05, "must be at least 50ms"),
            (f"{where}.timeout", 0 < active.timeout <= active.interval, "must be > 0 and at most the interval"),
            (f"{where}.healthy_threshold", active.healthy_threshold >= 1, "must be at least 1"),
            (f"{where}.unhealthy_threshold", active.unhealthy_threshold >= 1, "must be at least 1"),
            (f"{where}.expect_status", all(100 <= s <= 599 for s in active.expect_status) and bool(active.expect_status),
             "must list HTTP statuses (100-599)"),
            (f"{where}.type", active.type != "grpc" or _installed("grpc"),
             "gRPC health checks need grpcio: pip install 'fastgw[grpc]'"),
            (f"{where}.grpc_service", len(active.grpc_service.encode()) < 128, "must be under 128 bytes"),
        ])
    if passive is not None:
        where = f"{path}.health.passive"
        yield from _failing([
            (f"{where}.consecutive_failures", passive.consecutive_failures >= 1, "must be at least 1"),
            (f"{where}.ejection_time", passive.ejection_time > 0, "must be greater than 0"),
            (f"{where}.max_ejected_percent", 0 <= passive.max_ejected_percent <= 100, "must be 0-100"),
        ])


def _resilience_problems(path: str, service: Service) -> Iterator[ConfigProblem]:
    retries, breaker, locality = service.retries, service.circuit_breaker, service.locality
    zones = {t.zone for t in service.targets if not t.backup}
    yield from _failing([
        (f"{path}.retries.attempts", 0 <= retries.attempts <= 10, "must be between 0 and 10"),
        (f"{path}.retries.retry_on", all(isinstance(r, str) or 500 <= r <= 599 for r in retries.retry_on),
         "statuses to retry must be 5xx (500-599)"),
        (f"{path}.retries.per_try_timeout", retries.per_try_timeout is None or retries.per_try_timeout > 0,
         "must be greater than 0"),
        (f"{path}.retries.budget_ratio", retries.budget_ratio is None or 0 < retries.budget_ratio <= 1,
         "must be > 0 and at most 1"),
        (f"{path}.slow_start", service.slow_start is None or service.slow_start > 0, "must be greater than 0"),
    ])
    if breaker is not None:
        where = f"{path}.circuit_breaker"
        yield from _failing([
            (f"{where}.window", breaker.window > 0, "must be greater than 0"),
            (f"{where}.min_requests", breaker.min_requests >= 1, "must be at least 1"),
            (f"{where}.failure_ratio", 0 < breaker.failure_ratio <= 1, "must be > 0 and at most 1"),
            (f"{where}.open_for", breaker.open_for > 0, "must be greater than 0"),
            (f"{where}.half_open_requests", breaker.half_open_requests >= 1, "must be at least 1"),
        ])
    if locality is not None:
        yield from _failing([
            (f"{path}.locality.spill_over_below", 0 <= locality.spill_over_below <= 1, "must be 0-1"),
            (f"{path}.locality.zone", locality.zone in zones,
             f"no primary target is in zone {locality.zone!r} (targets[].zone)"),
        ])


def otel_missing() -> str | None:
    """Why spans cannot be exported here (fastgw/server/tracing.py), or None when the SDK is
    installed."""
    try:
        # The otel extra is optional: importing it is the test that it is there and loads.
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as exc:
        return f"OTLP export needs the otel extra (pip install 'fastgw[otel]'): {exc}"
    return None


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _upstream_tls_problems(path: str, service: Service) -> Iterator[ConfigProblem]:
    tls = service.tls
    if service.scheme != "https":
        if tls != type(tls)():
            yield ConfigProblem(f"{path}.tls", "only for scheme: https")
        return
    if bool(tls.client_cert) != bool(tls.client_key):
        yield ConfigProblem(f"{path}.tls.client_key", "client_cert and client_key go together")
        return
    try:
        client_context(tls, where=f"{path}.tls")
    except TlsFileError as exc:
        yield ConfigProblem(exc.path, str(exc))


def _one_service(path: str, service: Service) -> Iterator[ConfigProblem]:
    yield from _balance_problems(path, service)
    yield from _upstream_tls_problems(path, service)
    yield from _resilience_problems(path, service)
    yield from _failing([
        (f"{path}.targets", not service.targets or any(not t.backup for t in service.targets),
         "every target is a backup: at least one must be a primary"),
    ])
    yield from _health_problems(path, service)
    yield from _failing([
        (f"{path}.grpc", (service.scheme == "grpc") == (service.grpc is not None),
         "scheme: grpc and a `grpc: {descriptors: FILE}` section go together"),
        (f"{path}.scheme", service.scheme != "grpc" or (_installed("grpc") and _installed("google.api")),
         "HTTP/JSON to gRPC needs grpcio and protobuf: pip install 'fastgw[grpc]'"),
        (f"{path}.targets", service.kind != "proxy" or bool(service.targets),
         "a proxy service needs at least one target"),
        (f"{path}.targets", service.kind != "echo" or not service.targets,
         "an echo service answers itself and takes no targets"),
        (f"{path}.timeouts.connect", service.timeouts.connect > 0, "must be greater than 0"),
        (f"{path}.timeouts.read", service.timeouts.read > 0, "must be greater than 0"),
        (f"{path}.timeouts.write", service.timeouts.write > 0, "must be greater than 0"),
        (f"{path}.pool.max_idle_per_target", service.pool.max_idle_per_target >= 0, "must not be negative"),
        (f"{path}.pool.max_connections_per_target", service.pool.max_connections_per_target >= 0,
         "must not be negative (0 = unlimited)"),
    ])
    for i, target in enumerate(service.targets):
        tpath = f"{path}.targets[{i}]"
        yield from _target_address_problems(tpath, target)
        yield from _failing([(f"{tpath}.weight", target.weight >= 0, "must not be negative")])
    weights = [t.weight for t in service.targets]
    yield from _failing([(f"{path}.targets", not weights or any(w > 0 for w in weights),
                          "every target has weight 0: this service receives no traffic")],
                        severity="warning")


def _target_address_problems(path: str, target) -> Iterator[ConfigProblem]:
    if (target.address is None) == (target.dns is None):
        yield ConfigProblem(path, "a target has either an address (host:port) or dns: {name, port}")
        return
    if target.address is not None:
        problem = _bind_problem(f"{path}.address", target.address)
        if problem:
            yield problem
        return
    spec = target.dns
    yield from _failing([
        (f"{path}.dns.name", bool(_HOSTNAME.match(spec.name)) and not re.fullmatch(r"[\d.]+", spec.name),
         f"{spec.name!r} is not a host name"),
        (f"{path}.dns.port", spec.type == "SRV" or spec.port is not None,
         f"type {spec.type} needs a port (SRV records carry their own)"),
        (f"{path}.dns.port", spec.type != "SRV" or spec.port is None,
         "an SRV record gives the port: leave port out"),
        (f"{path}.dns.port", spec.port is None or 1 <= spec.port <= 65535, "must be in 1..65535"),
        (f"{path}.dns.refresh", spec.refresh is None or spec.refresh > 0, "must be greater than 0"),
    ])


def _dns_problems(dns) -> Iterator[ConfigProblem]:
    for i, resolver in enumerate(dns.resolvers):
        try:
            parse_resolver(resolver)
        except ValueError as exc:
            yield ConfigProblem(f"dns.resolvers[{i}]", str(exc))
    yield from _failing([
        ("dns.timeout", dns.timeout > 0, "must be greater than 0"),
        ("dns.min_ttl", dns.min_ttl > 0, "must be greater than 0"),
        ("dns.max_ttl", dns.max_ttl >= dns.min_ttl, "must not be less than dns.min_ttl"),
    ])


def parse_resolver(value: str) -> tuple[str, int]:
    """`ip`, `ip:port` or `[v6]:port` -> (ip, port); a resolver is an address, never a name."""
    try:
        return str(ipaddress.ip_address(value)), 53
    except ValueError:
        pass
    host, port = parse_bind(value)
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        raise ValueError(f"{value!r} is not an IP address (a resolver cannot be a name)") from None


def _route_problems(config: Config) -> Iterator[ConfigProblem]:
    yield from _duplicates(((f"routes[{i}].name", r.name) for i, r in enumerate(config.routes)),
                           "route name")
    for i, route in enumerate(config.routes):
        yield from _one_route(f"routes[{i}]", route, config)


def _one_route(path: str, route: Route, config: Config) -> Iterator[ConfigProblem]:
    has_service = route.service is not None
    answers = [key for key in ("service", "respond", "aggregate", "grpc") if getattr(route, key) is not None]
    yield from _failing([
        (path, len(answers) == 1, "set exactly one of `service`, `respond`, `aggregate` or `grpc`"
         + (f" (it sets {', '.join(answers)})" if answers else "")),
        (f"{path}.service", not has_service or route.service in config.services,
         f"unknown service {route.service!r} (defined: {', '.join(sorted(config.services)) or 'none'})"),
        (f"{path}.timeout", route.timeout is None or route.timeout > 0, "must be greater than 0"),
    ])
    for j, method in enumerate(route.match.methods):
        yield from _failing([(f"{path}.match.methods[{j}]", bool(_TOKEN.match(method)),
                              f"{method!r} is not a valid HTTP method token")])
    yield from _condition_problems(f"{path}.match", route.match.headers)
    profiles = [route.match.profile] if isinstance(route.match.profile, str) else route.match.profile or []
    for name in profiles:
        yield from _failing([(f"{path}.match.profile", name in config.clients,
                              f"unknown client profile {name!r} (defined: {', '.join(sorted(config.clients)) or 'none'})")])
    for j, host in enumerate(route.match.hosts):
        yield from _failing([(f"{path}.match.hosts[{j}]", bool(_HOST_PATTERN.match(host)),
                              f"{host!r} is not a host name, *.wildcard, or either with :port")])
    for name in route.profiles:
        yield from _failing([(f"{path}.profiles.{name}", name in config.clients,
                              f"unknown client profile {name!r} (defined: {', '.join(sorted(config.clients)) or 'none'})")])
    if route.aggregate is not None:
        yield from _failing([(f"{path}.aggregate.backends", bool(route.aggregate.backends),
                              "at least one backend")])
        for j, backend in enumerate(route.aggregate.backends):
            yield from _failing([
                (f"{path}.aggregate.backends[{j}].service", backend.service in config.services and
                 config.services[backend.service].scheme != "grpc",
                 f"unknown HTTP service {backend.service!r}"),
                (f"{path}.aggregate.backends[{j}].method", bool(_TOKEN.match(backend.method)),
                 f"{backend.method!r} is not a valid HTTP method token"),
                (f"{path}.aggregate.backends[{j}].path", backend.path.startswith("/"), "must start with /"),
            ])
    if route.grpc is not None:
        target = config.services.get(route.grpc.service)
        yield from _failing([
            (f"{path}.grpc.service", target is not None and target.scheme == "grpc",
             f"{route.grpc.service!r} is not a service with scheme: grpc"),
            (f"{path}.match.paths", route.grpc.method is not None or not route.match.paths,
             "without grpc.method the google.api.http annotations give the paths: set no paths"),
        ])
    if route.respond is not None:
        respond = route.respond
        yield from _failing([
            (f"{path}.respond.status", 200 <= respond.status <= 599, "must be between 200 and 599"),
            (f"{path}.respond", respond.json is msgspec.UNSET or respond.body is None,
             "set `json` or `body`, not both"),
        ])


# Plugin settings that are written into HTTP heads: (key, "name" | "value", how it is held).
_PLUGIN_HEAD_FIELDS = {
    "key_auth": [("header", "name", "one")],
    "request_id": [("header", "name", "one")],
    "jwt": [("header", "name", "one"), ("forward_claims", "name", "values")],
    "oauth2_introspection": [("header", "name", "one"), ("forward", "name", "values")],
    "cors": [("headers", "name", "list"), ("expose_headers", "name", "list"), ("methods", "name", "list"),
             ("origins", "value", "list")],
    "basic_auth": [("realm", "value", "one")],
    "cache": [("vary", "name", "list")],
    "rate_limit": [("name", "value", "one")],
}


def _head_problems(config: Config) -> Iterator[ConfigProblem]:
    """Everything the config writes into a request or response head: header edits, `respond`,
    rewrite templates, deprecation links, and the plugin settings that name headers."""
    for i, route in enumerate(config.routes):
        path = f"routes[{i}]"
        for key in ("request_headers", "response_headers"):
            edits = getattr(route, key)
            if edits is None:
                continue
            yield from _header_map_problems(f"{path}.{key}.set", edits.set)
            yield from _header_map_problems(f"{path}.{key}.add", edits.add)
            yield from _header_map_problems(f"{path}.{key}.rename", edits.rename, names_only=True)
            for j, name in enumerate(edits.remove):
                yield from header_name_problems(f"{path}.{key}.remove[{j}]", name)
        if route.respond is not None:
            yield from _header_map_problems(f"{path}.respond.headers", route.respond.headers)
        if route.rewrite is not None:
            for key in ("path", "host", "query", "strip_prefix"):
                yield from header_value_problems(f"{path}.rewrite.{key}", getattr(route.rewrite, key),
                                                 no_space=True)
        if route.deprecation is not None and route.deprecation.link is not None:
            link = route.deprecation.link
            yield from header_value_problems(f"{path}.deprecation.link", link, no_space=True)
            if "<" in link or ">" in link:      # it is written as `<link>` (RFC 8288 §3)
                yield ConfigProblem(f"{path}.deprecation.link", f"{link!r} must not contain < or >")
        if route.aggregate is not None:
            for j, backend in enumerate(route.aggregate.backends):
                yield from header_value_problems(f"{path}.aggregate.backends[{j}].path", backend.path,
                                                 no_space=True)
                for k, name in enumerate(backend.headers):
                    yield from header_name_problems(f"{path}.aggregate.backends[{j}].headers[{k}]", name)
        if route.grpc is not None:
            for j, name in enumerate(route.grpc.metadata):
                yield from header_name_problems(f"{path}.grpc.metadata[{j}]", name)
    for name, service in config.services.items():
        if service.health.active is not None:
            yield from header_value_problems(f"services.{name}.health.active.path",
                                             service.health.active.path, no_space=True)
    lists = [("plugins", config.plugins)] + [(f"routes[{i}].plugins", r.plugins) for i, r in enumerate(config.routes)]
    for where, entries in lists:
        for j, entry in enumerate(entries):
            if isinstance(entry, dict) and len(entry) == 1:
                (name, settings), = entry.items()
                if isinstance(settings, dict):
                    yield from _plugin_head_problems(f"{where}[{j}].{name}", name, settings)


def _plugin_head_problems(path: str, plugin: str, settings: dict) -> Iterator[ConfigProblem]:
    for key, kind, shape in _PLUGIN_HEAD_FIELDS.get(plugin, ()):
        value = settings.get(key)
        if shape == "one":
            items = [(f"{path}.{key}", value)]
        elif shape == "list" and isinstance(value, list):
            items = [(f"{path}.{key}[{k}]", v) for k, v in enumerate(value)]
        elif shape == "values" and isinstance(value, dict):
            items = [(key_path(f"{path}.{key}", str(k)), v) for k, v in value.items()]
        else:
            continue
        check = header_name_problems if kind == "name" else header_value_problems
        for where, item in items:
            yield from check(where, item)
