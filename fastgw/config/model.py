"""The configuration schema: msgspec Structs that mirror README.md's "Configuration" key for key.

Only the keys that the gateway implements are modelled; anything else is an unknown field and
therefore an error, so a config never silently asks for a feature that does nothing. Durations
(`250ms`, `5s`, `2m`) decode to `Duration` (seconds, a float) and sizes (`512`, `64KiB`) to `Size`
(bytes, an int) through `dec_hook`.
"""
from __future__ import annotations

import math
import re
from typing import Any, Literal, Union

import msgspec


class Duration(float):
    """Seconds. Written as a number of seconds or `<n>ms|s|m|h`."""


class Size(int):
    """Bytes. Written as a number of bytes or `<n>B|KiB|MiB|GiB|KB|MB|GB`."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3,
               "KB": 1000, "MB": 1000**2, "GB": 1000**3}


def parse_duration(value: Any) -> Duration:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf:
        return Duration(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return Duration(float(m.group(1)) * _DURATION_UNITS[m.group(2)])
    raise ValueError(f"invalid duration {value!r}: write it like 250ms, 5s, 2m or 1h")


def parse_size(value: Any) -> Size:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return Size(value)
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return Size(int(m.group(1)) * _SIZE_UNITS[m.group(2)])
    raise ValueError(f"invalid size {value!r}: write it like 512, 64KiB or 10MiB")


def dec_hook(type_: type, value: Any) -> Any:
    if type_ is Duration:
        return parse_duration(value)
    if type_ is Size:
        return parse_size(value)
    raise NotImplementedError(f"no decoder for {type_!r}")


def schema_hook(type_: type) -> dict:
    if type_ is Duration:
        return {"anyOf": [{"type": "number", "minimum": 0},
                          {"type": "string", "pattern": _DURATION.pattern}],
                "description": "seconds, or a string like 250ms, 5s, 2m, 1h"}
    if type_ is Size:
        return {"anyOf": [{"type": "integer", "minimum": 0},
                          {"type": "string", "pattern": _SIZE.pattern}],
                "description": "bytes, or a string like 512, 64KiB, 10MiB"}
    raise NotImplementedError(f"no schema for {type_!r}")


class _Base(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, kw_only=True):
    pass


# --- listeners -----------------------------------------------------------------------------------

class Limits(_Base):
    max_header_bytes: Size = 32 * 1024       # whole request head -> 431
    max_headers: int = 100                         # -> 431
    max_url_bytes: Size = 8 * 1024           # -> 414
    max_body_bytes: Size = 10 * 1024 * 1024  # -> 413 (a route may override)
    header_timeout: Duration = 10.0        # slow head -> 408 and close
    body_timeout: Duration = 30.0          # no request body byte for this long -> 408 and close
    idle_timeout: Duration = 60.0          # keep-alive idle
    max_connections: int = 10000                   # beyond: accept and close immediately


class Certificate(_Base):
    cert: str                                      # PEM chain (relative paths: to the config file)
    key: str
    sni: list[str] = []                            # server names it is for ("*.example.com" too)


class Tls(_Base):
    """TLS on an `https` listener: terminated here with `certificates` (the first without `sni` is
    the default), optionally verifying client certificates (mTLS); or, with `passthrough`, not
    terminated at all — the ClientHello's server name picks a service and the bytes go through."""
    certificates: list[Certificate] = []
    client_ca: Union[str, None] = None             # CA file that client certificates must chain to
    client_auth: Literal["none", "optional", "required"] = "none"
    min_version: Literal["1.2", "1.3"] = "1.2"
    passthrough: bool = False
    sni_routes: dict[str, str] = {}                # passthrough: "api.example.com" / "*.example.com" -> service


class ProxyProtocol(_Base):
    """A PROXY v1/v2 header is read only from the balancers in `trusted`; other peers are
    refused (`reject`) or read as if the listener had no PROXY protocol (`plain`)."""
    trusted: list[str]                             # CIDRs, v4 and v6
    untrusted: Literal["reject", "plain"] = "reject"


class Listener(_Base):
    name: str
    bind: str                                      # host:port, [v6]:port
    protocol: Literal["http", "https", "tcp"] = "http"   # tcp: Layer 4, bytes to `service`
    service: Union[str, None] = None               # tcp (and passthrough's default): where bytes go
    tls: Union[Tls, None] = None
    proxy_protocol: Union[bool, ProxyProtocol] = False   # true: from any peer; {trusted: [CIDR]}
    # %2F, %5C or a raw backslash in a path: 400 (reject), or forwarded as they are (keep)
    escaped_slashes: Literal["reject", "keep"] = "reject"
    limits: Limits = msgspec.field(default_factory=Limits)


class Admin(_Base):
    bind: str = "127.0.0.1:9901"
    token: Union[str, None] = None
    allowed_hosts: list[str] = []                  # Host names besides loopback and the bind address
    backups: int = 5                               # FILE.bak.<time> copies kept by admin changes (0: none)


# --- services ------------------------------------------------------------------------------------

class TargetDns(_Base):
    """A target given as a DNS name (fastgw/server/dns.py): one target per address it resolves to."""
    name: str
    port: Union[int, None] = None                  # A/AAAA: required; SRV: each record's own port
    type: Literal["A", "AAAA", "SRV"] = "A"
    refresh: Union[Duration, None] = None          # re-resolve this often instead of on the TTL


class Target(_Base):
    address: Union[str, None] = None               # ip:port, or name:port (resolved like dns: {type: A})
    dns: Union[TargetDns, None] = None             # instead of address
    weight: int = 1
    drain: bool = False                            # takes no new requests; in-flight ones finish
    backup: bool = False                           # takes traffic only when no primary is up
    zone: Union[str, None] = None                  # locality: preferred when it is the service's zone


class UpstreamTls(_Base):
    """For `scheme: https` services: the targets' certificates are verified by default."""
    verify: bool = True
    ca: Union[str, None] = None                    # CA file (default: the system's)
    sni: Union[str, None] = None                   # server name sent and verified (default: the target host)
    client_cert: Union[str, None] = None           # PEM with our certificate, for targets that want mTLS
    client_key: Union[str, None] = None


class Timeouts(_Base):
    connect: Duration = 5.0
    read: Duration = 60.0                  # inactivity while waiting for upstream bytes
    write: Duration = 60.0                 # inactivity while the upstream does not drain


class Pool(_Base):
    max_idle_per_target: int = 128
    idle_timeout: Duration = 60.0
    max_connections_per_target: int = 0            # 0 = unlimited


class Balance(_Base):
    algorithm: Literal["round_robin", "weighted_round_robin", "least_conn", "p2c_ewma",
                       "consistent_hash", "random", "nearest"] = "p2c_ewma"
    hash_on: Union[str, None] = None               # consistent_hash: ip | path | header:N | cookie:N | query:N | consumer
    bounded_load: Union[float, None] = None        # consistent_hash: cap a target at this x the mean load


class ActiveHealth(_Base):
    """Checks run by the supervisor, once per host (not per worker); the result is in shared
    memory, so every worker agrees."""
    type: Literal["http", "tcp", "grpc"] = "http"
    path: str = "/healthz"
    interval: Duration = 2.0
    timeout: Duration = 1.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    expect_status: list[int] = msgspec.field(default_factory=lambda: [200])
    grpc_service: str = ""                         # grpc: the service name asked about ("" = the server)


class PassiveHealth(_Base):
    consecutive_failures: int = 5                  # connect failures, resets, timeouts and 5xx
    ejection_time: Duration = 30.0                 # times the number of earlier ejections, at most 10x
    max_ejected_percent: int = 50


class Health(_Base):
    active: Union[ActiveHealth, None] = None
    passive: Union[PassiveHealth, None] = None


class Retries(_Base):
    """Other targets tried after a failed try (`attempts` of them at most). A connect failure
    reached no one, so any method is retried (when the request is held whole); a reset, a listed
    5xx status or a per-try timeout (retried when 504 is listed) only for idempotent methods
    (RFC 9110 §9.2.2). `budget_ratio` caps retries in flight at that share of the requests in
    flight (at least 3), per worker."""
    attempts: int = 1
    retry_on: list[Union[Literal["connect_failure", "reset"], int]] = msgspec.field(
        default_factory=lambda: ["connect_failure", "reset"])
    per_try_timeout: Union[Duration, None] = None
    budget_ratio: Union[float, None] = None


class CircuitBreaker(_Base):
    """Per target: opens when at least `min_requests` results in `window` failed in
    `failure_ratio` or more; open, the target gets nothing for `open_for`; then
    `half_open_requests` trial requests decide between closed (all succeed) and open again."""
    window: Duration = 10.0
    min_requests: int = 20
    failure_ratio: float = 0.5
    open_for: Duration = 15.0
    half_open_requests: int = 3


class Locality(_Base):
    zone: str                                      # this gateway's zone
    spill_over_below: float = 0.7                  # use every zone while less of ours is up


class ServiceGrpc(_Base):
    descriptors: str                               # FileDescriptorSet (protoc --include_imports
                                                   # --descriptor_set_out); relative: to the config file


class Service(_Base):
    kind: Literal["proxy", "echo"] = "proxy"       # echo: built-in, answers with the request as JSON
    scheme: Literal["http", "https", "grpc"] = "http"
    grpc: Union[ServiceGrpc, None] = None          # scheme grpc: the services' descriptors
    targets: list[Target] = []
    balance: Balance = msgspec.field(default_factory=Balance)
    locality: Union[Locality, None] = None
    slow_start: Union[Duration, None] = None       # a target back up ramps its share over this
    health: Health = msgspec.field(default_factory=Health)
    circuit_breaker: Union[CircuitBreaker, None] = None
    retries: Retries = msgspec.field(default_factory=Retries)
    send_proxy_protocol: Union[Literal["v1", "v2"], None] = None   # Layer 4: tell targets the client
    timeouts: Timeouts = msgspec.field(default_factory=Timeouts)
    pool: Pool = msgspec.field(default_factory=Pool)
    tls: UpstreamTls = msgspec.field(default_factory=UpstreamTls)


# --- routes --------------------------------------------------------------------------------------

class Match(_Base):
    hosts: list[str] = []                          # exact, or "*.example.com"
    paths: list[str] = []                          # "/exact", "/users/{id}", "/files/{rest...}", "/static/**"
    methods: list[str] = []                        # empty = any
    headers: dict[str, str] = {}                   # name -> exact value, or "~regex"
    query: dict[str, str] = {}                     # parameter -> exact value, or "~regex"
    profile: Union[str, list[str], None] = None    # client profile name(s) (see `clients`)


class ClientMatch(_Base):
    headers: dict[str, str] = {}
    query: dict[str, str] = {}


class Client(_Base):
    """A client profile: the first profile (in file order) whose conditions all hold names the
    request's client; consumers[].profile overrides it once the caller is identified."""
    match: ClientMatch = msgspec.field(default_factory=ClientMatch)


class Deprecation(_Base):
    date: Union[str, None] = None                  # when it was deprecated (RFC 3339) -> Deprecation: @<epoch>
    sunset: Union[str, None] = None                # when it goes away (RFC 3339) -> Sunset (RFC 8594)
    link: Union[str, None] = None                  # migration guide -> Link: <...>; rel="deprecation"


class Rewrite(_Base):
    path: Union[str, None] = None                  # template using captured params
    strip_prefix: Union[str, None] = None
    host: Union[str, None] = None
    query: Union[str, None] = None                 # replaces the query string when set


class HeaderEdits(_Base):
    set: dict[str, str] = {}
    add: dict[str, str] = {}
    remove: list[str] = []
    rename: dict[str, str] = {}


class Respond(_Base):
    status: int = 200
    headers: dict[str, str] = {}
    json: Any = msgspec.UNSET                      # JSON body
    body: Union[str, None] = None                  # text body


class AggregateBackend(_Base):
    service: str
    path: str                                      # "/prices/{id}" (route params), "/stock/{product.sku}"
                                                   # (a field of the backend whose `into` is product)
    method: str = "GET"
    into: Union[str, None] = None                  # key of its result in the answer; absent = merged flat
    allow: list[str] = []                          # dotted field paths kept (default: all)
    deny: list[str] = []                           # dotted field paths removed
    rename: dict[str, str] = {}                    # dotted path -> new field name
    optional: bool = False                         # failing leaves its key out (X-Fastgw-Completed: false)
    headers: list[str] = []                        # client headers passed on besides the default ones
    pass_query: bool = False                       # append the client's query string
    pass_body: bool = False                        # send the client's body


class Aggregate(_Base):
    timeout: Union[Duration, None] = None          # for all calls together (default: route timeout, 10s)
    max_body_bytes: Size = 1024 * 1024             # per backend answer; larger is that backend failing
    backends: list[AggregateBackend] = []


class Shape(_Base):
    allow: list[str] = []                          # dotted field paths kept
    deny: list[str] = []
    rename: dict[str, str] = {}


class GrpcRoute(_Base):
    service: str                                   # a service with scheme grpc
    method: Union[str, None] = None                # "pkg.Service/Method"; None: google.api.http routes it
    stream: Literal["json_array", "ndjson"] = "json_array"   # server-streaming answers
    metadata: list[str] = []                       # request headers sent as metadata (besides the defaults)


class Route(_Base):
    name: str
    match: Match = msgspec.field(default_factory=Match)
    priority: int = 0
    service: Union[str, None] = None
    rewrite: Union[Rewrite, None] = None
    request_headers: Union[HeaderEdits, None] = None
    response_headers: Union[HeaderEdits, None] = None
    timeout: Union[Duration, None] = None          # time until the upstream response head arrives
    max_body_bytes: Union[Size, None] = None
    respond: Union[Respond, None] = None
    aggregate: Union[Aggregate, None] = None       # several backends, one JSON answer
    grpc: Union[GrpcRoute, None] = None            # HTTP/JSON -> gRPC
    profiles: dict[str, Shape] = {}                # client profile -> how its JSON answers are reshaped
    deprecation: Union[Deprecation, None] = None
    plugins: list[dict[str, Any]] = []             # {name: config}, see fastgw.plugins


# --- consumers (identified callers; the authentication plugins use their credentials) -------------

class BasicCredential(_Base):
    username: str
    password_hash: str                             # `fastgw hash password`: scrypt$n$r$p$salt$hash


class JwtCredential(_Base):
    issuer: Union[str, None] = None
    subject: Union[str, None] = None


class MtlsCredential(_Base):
    subject: str                                   # a verified client certificate's CN or DNS/email SAN


class Credentials(_Base):
    api_keys: list[str] = []                       # `fastgw hash key`: sha256:<64 hex>
    basic: list[BasicCredential] = []
    jwt: list[JwtCredential] = []
    mtls: list[MtlsCredential] = []


class RateLimitPlan(_Base):
    limit: int                                     # this consumer's limit, instead of the plugin's
    window: Duration = 1.0


class Consumer(_Base):
    name: str
    profile: Union[str, None] = None
    groups: list[str] = []
    credentials: Credentials = msgspec.field(default_factory=Credentials)
    rate_limit: Union[RateLimitPlan, None] = None  # used by rate_limit plugins keyed on consumer


# --- logging, tracing and the whole file ---------------------------------------------------------

class AccessLog(_Base):
    format: Literal["json", "combined"] = "json"
    path: Union[str, None] = "-"                   # "-" = stdout, null = off
    sample: float = 1.0


class Log(_Base):
    level: Literal["debug", "info", "warning", "error"] = "info"
    # The gateway's own messages on stderr; not set: $FASTGW_LOG_FORMAT, else text.
    format: Union[Literal["text", "json"], None] = None
    access: AccessLog = msgspec.field(default_factory=AccessLog)


class Tracing(_Base):
    propagate: Literal["w3c"] = "w3c"              # traceparent in, a new span id out
    sample_ratio: float = 0.0                      # of requests that arrive without a sampled parent
    otlp_endpoint: Union[str, None] = None         # OTLP/HTTP traces URL, e.g. http://collector:4318/v1/traces


class Cluster(_Base):
    """Several hosts sharing state through Redis: `scope: cluster` rate limits."""
    redis: str                                     # redis://host:port/db (rediss:// for TLS)
    key_prefix: str = "fastgw:"
    timeout: Duration = 0.5                        # one sync round trip; slower counts as Redis away
    config_sync: bool = False                      # admin changes reach every node through Redis


class Drain(_Base):
    delay: Duration = 0.0                  # not ready at once; stop accepting after this long
    timeout: Duration = 30.0               # in-flight requests get this long to finish


class Dns(_Base):
    """How target names resolve: the hosts file first, then these resolvers (default: the
    nameservers of /etc/resolv.conf). A name is re-resolved at its TTL bounded to [min_ttl, max_ttl];
    a failed re-resolution keeps the last good addresses for up to stale_ttl."""
    resolvers: list[str] = []                      # "ip" or "ip:port", "[v6]:port"
    timeout: Duration = 2.0                        # one resolution, every resolver and retry included
    min_ttl: Duration = 5.0
    max_ttl: Duration = 300.0
    stale_ttl: Duration = 3600.0


class Config(_Base):
    version: Literal[1] = 1
    workers: Union[int, Literal["auto"]] = 1       # auto = the CPUs this process may run on
    listeners: list[Listener] = []
    admin: Union[Admin, None] = None
    cluster: Union[Cluster, None] = None
    drain: Drain = msgspec.field(default_factory=Drain)
    dns: Dns = msgspec.field(default_factory=Dns)
    log: Log = msgspec.field(default_factory=Log)
    tracing: Tracing = msgspec.field(default_factory=Tracing)
    services: dict[str, Service] = {}
    plugins: list[dict[str, Any]] = []             # global: every route runs them before its own
    clients: dict[str, Client] = {}
    routes: list[Route] = []
    consumers: list[Consumer] = []
