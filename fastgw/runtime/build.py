"""Config -> runtime tables: the Router with its RouteEntry objects and the Services.

The one module that knows every package below the server (README.md, "Layers"): the config's
model, the data plane's types, the plugins and the handlers meet here and nowhere else.

Everything that can be decided once per config load is decided here (lower-cased header names,
response bytes of `respond` routes, rewrite templates bound to capture slots, method bits), so
the data plane does no per-request work that depends only on the config.
"""
from __future__ import annotations

import asyncio
import gc
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import formatdate
from http import HTTPStatus
from urllib.parse import urlsplit

import msgspec

from fastgw._core.balancer import ZonePreferring, make_balancer
from fastgw._core.router import (ROUTE_ECHO_KIND, ROUTE_HANDLER_KIND, ROUTE_PROXY_KIND, ROUTE_RESPOND_KIND,
                                 HeaderEdits, PathRule, PatternError, RouteEntry, Router, compile_conditions,
                                 parse_pattern)
from fastgw._core.shm import analytics_key
from fastgw._core.upstream import Service
from fastgw._core.uri import canonical_host, canonical_path
from fastgw.config.errors import CompileError
from fastgw.config.model import Config, HeaderEdits as HeaderEditsSpec, Route
from fastgw.handlers.aggregate import Aggregator
from fastgw.handlers.grpc_route import GrpcClients, GrpcRouteHandler
from fastgw.handlers.loopback import LoopbackClient, internal_routes
from fastgw.handlers.shape import Shape
from fastgw.plugins.registry import build_chains
from fastgw.tls import client_context


@dataclass
class Runtime:
    """The tables one config compiles to; a reload builds a new one and swaps it in whole."""

    config: Config
    router: object            # fastgw._core.router.Router
    services: dict            # name -> fastgw._core.upstream.Service
    compiled: dict = field(default_factory=dict)   # route name -> CompiledRoute (reused by reloads)
    plugins: dict = field(default_factory=dict)    # plugin instances by their config entry (reused too)
    grpc_clients: object = None                    # fastgw.handlers.grpc_route.GrpcClients (reused too)
    loopback: object = None                        # fastgw.handlers.loopback.LoopbackClient, or None

    def route_table(self) -> list[dict]:
        rows = []
        for route in sorted(self.config.routes, key=_route_order_key(self.config.routes)):
            rows.append({
                "name": route.name,
                "priority": route.priority,
                "hosts": list(route.match.hosts) or ["*"],
                "paths": list(route.match.paths) or ["/**"],
                "methods": list(route.match.methods) or ["*"],
                "target": (f"respond {route.respond.status}" if route.respond is not None
                           else f"service {route.service}"),
            })
        return rows

    def explain(self, method: str, url: str) -> dict | None:
        """The route `method url` hits, as the data plane sees it: Host and path made canonical
        first (ValueError for what it answers 400)."""
        parts = urlsplit(url if "://" in url else "http://" + url)   # "/p" -> no host
        host = canonical_host(parts.netloc.encode()).decode()
        path = canonical_path((parts.path or "/").encode()).decode()
        found = self.router.lookup(method.upper(), host, path)
        if found is None:
            return None
        rule, params = found
        upstream_path = self.router.upstream_path(method.upper(), host, path)
        query = rule.route.query_rewrite.decode() if rule.route.query_rewrite is not None else (
            "?" + parts.query if parts.query else "")
        return {
            "route": rule.route.name,
            "service": rule.route.service.name if rule.route.service is not None else None,
            "upstream_path": upstream_path + query,
            "params": params,
        }

    def targets(self):
        for service in self.services.values():
            yield from service.targets
            yield from service.backups

    def close(self, successor: "Runtime | None" = None) -> None:
        """Retire the targets (close idle pooled connections, and busy ones when their exchange
        ends) that `successor` did not take over."""
        kept = {id(t) for t in successor.targets()} if successor is not None else set()
        for target in self.targets():
            if id(target) not in kept:
                target.retire()
        kept_plugins = {id(p) for p in successor.plugins.values()} if successor is not None else set()
        for plugin in self.plugins.values():
            if id(plugin) not in kept_plugins and hasattr(plugin, "close"):
                plugin.close()
        if self.loopback is not None:
            self.loopback.close()
        if self.grpc_clients is not None and self.grpc_clients.clients:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return                            # never used outside a worker's loop
            loop.create_task(self.grpc_clients.close_unused(
                successor.grpc_clients if successor is not None else None))


def _route_order_key(routes: list[Route]):
    index = {id(r): i for i, r in enumerate(routes)}
    return lambda r: (-r.priority, index[id(r)])


def compile_config(config: Config, slots: dict | None = None, previous: Runtime | None = None) -> Runtime:
    """Build runtime tables; raise CompileError listing every problem with its key path.

    `slots` (from the supervisor) numbers routes and targets in the shared-memory segment;
    without it (`fastgw check`, `fastgw routes`) nothing is counted. With `previous` (a reload),
    what did not change is taken over instead of rebuilt: a service with the same spec whole,
    targets whose connection settings did not change with their pooled connections (so a reload
    does not make every worker reconnect), and the compiled entries of unchanged routes (so one
    changed route in 10,000 costs a trie rebuild, not 10,000 route compilations)."""
    # Building allocates many long-lived objects at once: the cyclic GC would scan the growing
    # tables again and again (a third of the time at 10,000 routes) and find nothing to free.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _compile(config, slots, previous)
    finally:
        if enabled:
            gc.enable()


def _compile(config: Config, slots: dict | None, previous: Runtime | None) -> Runtime:
    problems: list[tuple[str, str]] = []
    route_slots = slots["routes"] if slots else {}
    services = _compile_services(config, slots["targets"] if slots else {}, previous)

    # Method bits are kept from the previous table so that unchanged routes' masks stay valid.
    method_bits: dict[bytes, int] = dict(previous.router.method_bits) if previous is not None else {}
    for route in config.routes:
        # Routes from google.api.http annotations match the methods the annotations name.
        methods = _ANNOTATION_METHODS if route.grpc is not None and route.grpc.method is None \
            else route.match.methods
        for method in _with_head(methods):
            method_bits.setdefault(method.upper().encode(), 1 << len(method_bits))
    if len(method_bits) > 63 and previous is not None:
        return _compile(config, slots, None)          # stale bits from old configs: start afresh
    if len(method_bits) > 63:
        problems.append(("routes", "more than 63 distinct methods across routes"))

    profiles = []
    for name, client in config.clients.items():
        try:
            profiles.append((name, _conditions(client.match.headers, client.match.query, None)))
        except re.error as exc:
            problems.append((f"clients.{name}.match", f"invalid regex: {exc}"))

    chains, plugin_instances = build_chains(
        config, previous.plugins if previous is not None else {},
        {name: c.chain for name, c in previous.compiled.items()} if previous is not None else {})
    compiled: dict[str, CompiledRoute] = {}
    before = previous.compiled if previous is not None else {}
    handlers = _Handlers(config, services, previous)
    entries = []
    for i, route in enumerate(config.routes):
        service = services.get(route.service) if route.service else None
        slot = route_slots.get(route.name, -1)
        chain = chains[route.name]
        done = before.get(route.name)
        # Handler routes hold the services they call: compiled afresh with them.
        if done is None or done.index != i or done.service is not service or done.slot != slot \
                or done.spec != route or done.chain is not chain or _has_handler(route):
            done = _compile_route(route, i, service, slot, chain, method_bits, problems, handlers)
        compiled[route.name] = done
        entries.extend(done.rules)
    if problems:
        raise CompileError(problems)
    return Runtime(config=config, router=Router.build(entries, method_bits, profiles),
                   services=services, compiled=compiled, plugins=plugin_instances,
                   grpc_clients=handlers.grpc_clients, loopback=handlers.loopback_client)


_ANNOTATION_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def _has_handler(route: Route) -> bool:
    return route.aggregate is not None or route.grpc is not None


class _Handlers:
    """What handler routes (aggregation, gRPC) of one config share: the loopback client into the
    data plane and the gRPC clients, both made on first need."""

    def __init__(self, config: Config, services: dict, previous: Runtime | None):
        self.config, self.services = config, services
        self._loopback = None
        self._previous_grpc = previous.grpc_clients if previous is not None else None
        self._grpc_clients = None

    def loopback(self):
        if self._loopback is None:
            self._loopback = LoopbackClient(internal_routes(self.services))
        return self._loopback

    @property
    def grpc_clients(self):
        return self._grpc_clients

    @property
    def loopback_client(self):
        return self._loopback

    def grpc(self, name: str):
        """(Descriptors, GrpcClient) of gRPC service `name`."""
        if self._grpc_clients is None:
            self._grpc_clients = GrpcClients(self._previous_grpc)
        metadata = frozenset(h.lower() for r in self.config.routes
                             if r.grpc is not None and r.grpc.service == name for h in r.grpc.metadata)
        return self._grpc_clients.get(name, self.config.services[name], metadata)


def _shapes(route: Route, where: str, problems: list) -> dict | None:
    shapes = {}
    for name, spec in route.profiles.items():
        try:
            shapes[name] = Shape(spec.allow, spec.deny, spec.rename)
        except ValueError as exc:
            problems.append((f"{where}.profiles.{name}", str(exc)))
    return shapes or None


def _aggregator(route: Route, where: str, shapes, handlers: _Handlers, problems: list):
    try:
        return Aggregator(route.aggregate, handlers.loopback(), shapes, route.timeout,
                          set(handlers.services))
    except ValueError as exc:
        key, _, message = str(exc).partition(": ")
        problems.append((f"{where}.aggregate.{key}", message))
        return None


def _grpc_handlers(route: Route, where: str, handlers: _Handlers, problems: list) -> list:
    """[(path pattern or None for the route's own paths, HTTP method or None, handler)]."""
    # handlers.grpc needs the grpc extra (grpcio, protobuf): imported only for a route that has `grpc`.
    from fastgw.handlers.grpc import GrpcConfigError

    spec = route.grpc
    service = handlers.services[spec.service]
    timeout = route.timeout or handlers.config.services[spec.service].timeouts.read
    try:
        descriptors, client = handlers.grpc(spec.service)
        if spec.method is not None:
            return [(None, None, GrpcRouteHandler(
                service, client, descriptors.method(spec.method), body_field=None, response_body=None,
                params={}, stream=spec.stream, timeout=timeout))]
        rules = descriptors.http_rules()
        if not rules:
            raise GrpcConfigError(f"{spec.service}'s descriptors have no google.api.http annotations: "
                                  "name the method")
        return [(rule.pattern, rule.http_method, GrpcRouteHandler(
            service, client, descriptors.method(rule.grpc_method), body_field=rule.body,
            response_body=rule.response_body, params=rule.params, stream=spec.stream, timeout=timeout))
            for rule in rules]
    except GrpcConfigError as exc:
        problems.append((f"{where}.grpc", str(exc)))
        return []


@dataclass
class CompiledRoute:
    """A route as compiled, and what it was compiled from: reusable while all of it holds."""
    spec: Route
    index: int
    service: object               # the Service object its entry points to
    slot: int
    chain: object                 # its plugin Chain, or None
    rules: list                   # [(PathRule, [host patterns])]


def _with_head(methods) -> set[str]:
    """A route that allows GET allows HEAD (RFC 9110 §9.3.2): a HEAD must never pass a GET-only
    route's plugins by falling through to another route."""
    names = {m.upper() for m in methods}
    return names | {"HEAD"} if "GET" in names else names


def _compile_route(route: Route, i: int, service, slot: int, chain, method_bits: dict,
                   problems: list, handlers: _Handlers) -> CompiledRoute:
    where = f"routes[{i}]"
    match = route.match
    wanted_profiles = [match.profile] if isinstance(match.profile, str) else match.profile
    try:
        conditions = _conditions(match.headers, match.query, wanted_profiles)
    except re.error as exc:
        problems.append((f"{where}.match", f"invalid regex: {exc}"))
        conditions = None
    try:
        response_edits = _edits(route.response_headers, HeaderEdits, _deprecation_headers(route.deprecation))
    except ValueError as exc:
        problems.append((f"{where}.deprecation", str(exc)))
        response_edits = None
    shapes = _shapes(route, where, problems)
    if route.respond is not None:
        kind = ROUTE_RESPOND_KIND
    elif _has_handler(route):
        kind = ROUTE_HANDLER_KIND
    elif service is not None and service.kind == ROUTE_ECHO_KIND:
        kind = ROUTE_ECHO_KIND
    else:
        kind = ROUTE_PROXY_KIND
    rewrite = route.rewrite
    entry_args = dict(
        name=route.name, index=i, priority=route.priority, kind=kind, service=service,
        methods_mask=sum(method_bits.get(m.encode(), 0) for m in _with_head(match.methods)),
        host_rewrite=rewrite.host.encode() if rewrite and rewrite.host else None,
        strip_prefix=_strip_prefix(rewrite),
        query_rewrite=_query(rewrite),
        request_edits=_edits(route.request_headers, HeaderEdits),
        response_edits=response_edits,
        conditions=conditions,
        timeout=route.timeout or 0.0,
        max_body=route.max_body_bytes if route.max_body_bytes is not None else -1,
        metric_slot=slot,
        plugins=chain.route_filters() if chain is not None else None,
        shapes=shapes,
        analytics_route=analytics_key("route", route.name),
        analytics_service=analytics_key("service", route.service) if route.service else 0,
    )
    if route.respond is not None:
        status, head, body, fields = respond_bytes(route.respond)
        entry_args.update(respond_status=status, respond_head=head, respond_body=body,
                          respond_fields=fields)
    if route.aggregate is not None:
        entry_args["handler"] = _aggregator(route, where, shapes, handlers, problems)
    patterns = [(j, pattern, None) for j, pattern in enumerate(match.paths or ["/**"])]
    if route.grpc is not None:
        grpc = _grpc_handlers(route, where, handlers, problems)
        if grpc and grpc[0][0] is None:
            entry_args["handler"] = grpc[0][2]
        elif grpc:
            # One entry per annotated method: its path, its HTTP method, its handler.
            patterns = [(j, pattern, RouteEntry(**{**entry_args, "handler": handler, "methods_mask": sum(
                method_bits.setdefault(m.encode(), 1 << len(method_bits)) for m in _with_head([method]))}))
                        for j, (pattern, method, handler) in enumerate(grpc)]
    entry = RouteEntry(**entry_args)
    rules = []
    for j, pattern, own_entry in patterns:
        try:
            rule = PathRule(own_entry or entry, pattern, rewrite.path if rewrite else None)
        except (PatternError, ValueError) as exc:
            problems.append((f"{where}.match.paths[{j}]", str(exc)))
            continue
        except Exception as exc:          # re.error from a bad ~regex
            problems.append((f"{where}.match.paths[{j}]", f"invalid regex: {exc}"))
            continue
        rules.append((rule, list(match.hosts)))
    return CompiledRoute(route, i, service, slot, chain, rules)


def _conditions(headers, query, profiles):
    return compile_conditions(headers, query, profiles)


def _compile_services(config: Config, target_slots: dict, previous: Runtime | None) -> dict:
    services = {}
    reusable = _reusable_targets(config, previous)
    for name, spec in config.services.items():
        if previous is not None and previous.config.services.get(name) == spec and \
                all(target_slots.get((name, t.address), -1) == t.metric_slot
                    for t in [*previous.services[name].targets, *previous.services[name].backups]):
            services[name] = previous.services[name]       # unchanged: the same object
            continue
        service = Service(
            name, ROUTE_ECHO_KIND if spec.kind == "echo" else ROUTE_PROXY_KIND,
            connect_timeout=spec.timeouts.connect, read_timeout=spec.timeouts.read,
            write_timeout=spec.timeouts.write, idle_timeout=spec.pool.idle_timeout,
            max_idle=spec.pool.max_idle_per_target,
            max_connections=spec.pool.max_connections_per_target)
        for target in spec.targets:
            if target.address is None:    # a DNS name that resolves to nothing (server/dns.py)
                service.unresolved = True
                continue
            if target.drain:              # a drained target takes no new requests
                continue
            kept = reusable.get((name, target.address, target.weight))
            if kept is not None and kept.server_name == (_server_name(target) or kept.host):
                service.keep_target(kept, target.backup)
            else:
                service.add_target(target.address, target.weight,
                                   target_slots.get((name, target.address), -1), target.backup,
                                   _server_name(target))
        service.balancer = _balancer(spec, service.targets)
        # Backups share the load round robin among themselves when no primary is up.
        service.backup_balancer = make_balancer("round_robin", list(service.backups)) \
            if service.backups else None
        service.hash_on = _hash_on(spec.balance.hash_on)
        retries = spec.retries
        service.retries = retries.attempts
        service.retry_connect = "connect_failure" in retries.retry_on
        service.retry_reset = "reset" in retries.retry_on
        service.retry_statuses = frozenset(r for r in retries.retry_on if isinstance(r, int))
        service.per_try_timeout = retries.per_try_timeout or 0.0
        service.budget_ratio = retries.budget_ratio if retries.budget_ratio is not None else -1.0
        service.send_proxy_protocol = {"v1": 1, "v2": 2}.get(spec.send_proxy_protocol, 0)
        if spec.scheme == "https":
            service.ssl_context = client_context(spec.tls)
            service.tls_server_name = spec.tls.sni
        if spec.circuit_breaker is not None:
            breaker = spec.circuit_breaker
            service.circuit_window = breaker.window
            service.circuit_min_requests = breaker.min_requests
            service.circuit_failure_ratio = breaker.failure_ratio
            service.circuit_open_for = breaker.open_for
            service.circuit_trials = breaker.half_open_requests
        if spec.health.passive is not None:
            service.passive_failures = spec.health.passive.consecutive_failures
            service.ejection_time = spec.health.passive.ejection_time
            service.max_ejected_percent = spec.health.passive.max_ejected_percent
        services[name] = service
    return services


def _server_name(target) -> str | None:
    """A target resolved from a DNS name is verified (TLS) under that name, not its address."""
    return target.dns.name if target.dns is not None else None


def _balancer(spec, targets: list):
    """The service's balancer; with `locality`, one that prefers the targets of our zone."""
    def make(chosen):
        return make_balancer(spec.balance.algorithm, list(chosen), spec.balance.bounded_load or 0.0,
                             spec.slow_start or 0.0)

    everyone = make(targets)
    if spec.locality is None:
        return everyone
    zone_of = {t.address: t.zone for t in spec.targets}
    local = [t for t in targets if zone_of.get(t.address) == spec.locality.zone]
    if not local or len(local) == len(targets):
        return everyone
    return ZonePreferring(make(local), everyone, spec.locality.spill_over_below)


def shadowed_routes(runtime: Runtime) -> list[tuple[str, str]]:
    """Routes that another route beats on every request they match: (key path, message).

    Each path pattern of a route without header/query/profile conditions is probed with a
    request made of its literals and of values no literal equals (for params and tails, a tail
    both empty and not), for each of its methods and hosts. If some other route answers every
    probe, it answers everything the pattern matches: a param or tail that took a value no
    literal has takes any value. Regex patterns are not judged."""
    router = runtime.router
    index = {route.name: i for i, route in enumerate(runtime.config.routes)}
    out = []
    for route in runtime.config.routes:
        match = route.match
        if match.headers or match.query or match.profile or not runtime.compiled.get(route.name):
            continue
        winners = set()
        for rule, hosts in runtime.compiled[route.name].rules:
            if rule.pattern.startswith("~"):
                winners = None
                break
            probes = [(m, h, p) for m in (match.methods or ["\x01ANY"]) for h in _probe_hosts(hosts)
                      for p in _probe_paths(rule.pattern)]
            for method, host, path in probes:
                found = router.lookup(method, host, path)
                winner = found[0].route.name if found is not None else None
                if winner is None or winner == route.name:
                    winners = None
                    break
                winners.add(winner)
            if winners is None:
                break
        if winners:
            names = " and ".join(f"{w!r} (routes[{index[w]}])" for w in sorted(winners, key=index.get))
            out.append((f"routes[{index[route.name]}]",
                        f"route {route.name!r} is never matched: {names} "
                        f"{'answers' if len(winners) == 1 else 'answer'} every request it would "
                        "(priority first, then exact > param > tail, then file order)"))
    return out


def _probe_hosts(hosts: list[str]) -> list[str]:
    if not hosts:
        return ["\x01.invalid"]
    return [("\x01" + h[1:]) if h.startswith("*.") else h for h in hosts]


def _probe_paths(pattern: str) -> list[str]:
    parts = []
    for kind, value in parse_pattern(pattern):
        if kind == "lit":
            parts.append(value)
        elif kind == "param":
            parts.append("\x01")
        else:                                  # a tail: one probe with it, one without
            base = "/" + "/".join(parts)
            return [base + ("/" if parts else "") + "\x01/\x01", base]
    return ["/" + "/".join(parts)]


def _hash_on(text: str | None) -> tuple | None:
    """`header:X-User` -> ("header", b"x-user"); names compared as the data plane sees them."""
    if text is None:
        return None
    kind, _, name = text.partition(":")
    return (kind, name.lower().encode() if kind == "header" else name.encode())


def _reusable_targets(config: Config, previous: Runtime | None) -> dict:
    """(service, address, weight) -> Target of `previous`, for services whose connection
    settings did not change (a target's pool was built with them)."""
    if previous is None:
        return {}
    out = {}
    for name, old_service in previous.services.items():
        old, new = previous.config.services.get(name), config.services.get(name)
        if old is None or new is None or _connection_settings(old) != _connection_settings(new):
            continue
        for target in [*old_service.targets, *old_service.backups]:
            out[(name, target.address, target.weight)] = target
    return out


def _connection_settings(spec) -> tuple:
    return (spec.kind, spec.scheme, spec.timeouts, spec.pool, spec.tls)


def _strip_prefix(rewrite) -> bytes | None:
    if rewrite is None or not rewrite.strip_prefix:
        return None
    return rewrite.strip_prefix.rstrip("/").encode() or None


def _query(rewrite) -> bytes | None:
    if rewrite is None or rewrite.query is None:
        return None
    q = rewrite.query.lstrip("?")
    return ("?" + q).encode() if q else b""


def _edits(spec: HeaderEditsSpec | None, cls, extra_set: dict | None = None):
    extra_set = extra_set or {}
    if (spec is None or not (spec.set or spec.add or spec.remove or spec.rename)) and not extra_set:
        return None
    if spec is None:
        return cls(set=extra_set)
    return cls(set={**spec.set, **extra_set}, add=spec.add, remove=spec.remove, rename=spec.rename)


def _deprecation_headers(deprecation) -> dict:
    """Deprecation (RFC 9745: `@<epoch>`; `true` when no date is given, as the drafts before
    it did), Sunset (RFC 8594, an HTTP-date) and Link rel=deprecation / rel=sunset."""
    if deprecation is None:
        return {}
    headers = {"Deprecation": f"@{int(_instant(deprecation.date, 'date').timestamp())}"
               if deprecation.date else "true"}
    links = []
    if deprecation.link:
        links.append(f'<{deprecation.link}>; rel="deprecation"; type="text/html"')
    if deprecation.sunset:
        headers["Sunset"] = formatdate(_instant(deprecation.sunset, "sunset").timestamp(), usegmt=True)
        if deprecation.link:
            links.append(f'<{deprecation.link}>; rel="sunset"; type="text/html"')
    if links:
        headers["Link"] = ", ".join(links)
    return headers


def _instant(text: str, key: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{key}: {text!r} is not an RFC 3339 date-time like 2027-06-30T00:00:00Z") from None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def respond_bytes(respond) -> tuple[int, bytes, bytes, list]:
    """Status, head (status line + headers, no Connection, no blank line), body, and the header
    fields without Content-Length as [name, value, ...] bytes (for the route's response edits and
    plugins: the head is only written as is when the route has neither)."""
    headers = {k.lower(): v for k, v in respond.headers.items()}
    if respond.json is not msgspec.UNSET:
        body = msgspec.json.encode(respond.json)
        headers.setdefault("content-type", "application/json")
    else:
        body = (respond.body or "").encode()
        if body:
            headers.setdefault("content-type", "text/plain; charset=utf-8")
    headers.pop("content-length", None)
    fields = [part.encode("latin-1") for item in headers.items() for part in item]
    headers["content-length"] = str(len(body))
    try:
        phrase = HTTPStatus(respond.status).phrase
    except ValueError:
        phrase = f"Status {respond.status}"
    head = f"HTTP/1.1 {respond.status} {phrase}\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in headers.items())
    return respond.status, head.encode("latin-1"), body, fields
