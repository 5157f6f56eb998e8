"""The `fastgw` command line: run, check, routes, reload, schema, version.

The top of the package layers (README.md, "Layers"): it wires the admin API to the server. What
needs the compiled core (the runtime build, the server) is imported by the command that needs it,
so that `schema` and `version` work on a source checkout whose core is not built (`version` says
`core: missing`).
"""
from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.metadata
import json
import os
import platform
import sys
import urllib.error
import urllib.request
from importlib.machinery import EXTENSION_SUFFIXES

import msgspec

from fastgw import __version__
from fastgw.config.errors import ConfigError, ConfigProblem
from fastgw.config.load import LoadedConfig, pin_problems, read_admin_access
from fastgw.config.model import Config, schema_hook
from fastgw.log import configure_log, log
from fastgw.plugins.credentials import hash_key, hash_password
from fastgw.server.dns import unresolvable

STDIN_NAME = "<stdin>"                        # how messages name a config read from `-c -`


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.command(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastgw", description="API gateway and load balancer")
    parser.add_argument("--version", action=_VersionAction, help="print versions (as `fastgw version`)")
    sub = parser.add_subparsers(metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="start the gateway (the embedded default config without -c)")
    run.add_argument("-c", "--config", help="config file (default: $FASTGW_CONFIG, else built-in)")
    run.add_argument("--workers", type=_workers, help="worker processes: a number or 'auto'")
    run.set_defaults(command=_run)

    check = sub.add_parser("check", help="validate a config file")
    check.add_argument("-c", "--config", default=os.environ.get("FASTGW_CONFIG") or None,
                       help="config file, - for standard input (default: $FASTGW_CONFIG)")
    check.add_argument("--json", action="store_true", help="machine-readable result")
    check.set_defaults(command=_check, usage_error=check.error)

    routes = sub.add_parser("routes", help="print the compiled route table")
    routes.add_argument("-c", "--config", required=True)
    routes.add_argument("--match", metavar="'METHOD URL'", help="show which route a request hits")
    routes.set_defaults(command=_routes)

    reload = sub.add_parser("reload", help="make the running gateway re-read its config file")
    reload.add_argument("-c", "--config", help="take the admin address and token from this config file")
    reload.add_argument("--admin", metavar="URL", help="admin API URL (default http://127.0.0.1:9901)")
    reload.add_argument("--token", help="admin token (default: the file's admin.token, else $FASTGW_ADMIN_TOKEN)")
    reload.add_argument("--timeout", type=float, default=60.0)
    reload.set_defaults(command=_reload)

    hashing = sub.add_parser("hash", help="hash an API key or a password for consumers[].credentials")
    hashing.add_argument("kind", choices=["key", "password"])
    hashing.add_argument("secret", nargs="?", help="the key or password (default: read a line from stdin)")
    hashing.set_defaults(command=_hash)

    sub.add_parser("schema", help="print the config JSON Schema").set_defaults(command=_schema)
    sub.add_parser("version", help="print versions").set_defaults(command=_version)
    return parser


class _VersionAction(argparse.Action):
    """`fastgw --version`: the same line as `fastgw version`."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.exit(_version(namespace))


def _hash(args: argparse.Namespace) -> int:
    secret = args.secret if args.secret is not None else sys.stdin.readline().rstrip("\r\n")
    if not secret:
        print("fastgw hash: nothing to hash", file=sys.stderr)
        return 2
    print(hash_key(secret) if args.kind == "key" else hash_password(secret))
    return 0


def _workers(value: str) -> int | str:
    if value == "auto":
        return value
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise argparse.ArgumentTypeError(f"expected a number >= 1 or 'auto', got {value!r}")


def _runtime_load():
    """fastgw.runtime.load: a config load with every check, the compiler's too."""
    # Needs the compiled core (see the module's docstring).
    from fastgw.runtime import load

    return load


def _load_or_report(path: str | None) -> LoadedConfig | None:
    """Load the config; on problems print them to stderr and return None. Warnings go to stderr."""
    try:
        loaded = _runtime_load().load_config(path)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return None
    for warning in loaded.warnings:
        print(warning, file=sys.stderr)
    return loaded


def _run(args: argparse.Namespace) -> int:
    """The config's problems are gateway messages here: in $FASTGW_LOG_FORMAT's format when the
    file cannot be used (its `log.format` is unknown), in its own when it can."""
    try:
        loaded = _runtime_load().load_config(args.config)
    except ConfigError as e:
        for problem in e.problems:
            log(str(problem), problem.severity)
        return 1
    configure_log(loaded.config.log)
    for warning in loaded.warnings:
        log(str(warning), "warning")
    # Needs the compiled core (see the module's docstring).
    from fastgw.admin.api import start_admin
    from fastgw.server.supervisor import serve

    return serve(loaded, workers=args.workers, start_admin=start_admin)


def _reload(args: argparse.Namespace) -> int:
    """POST /reload on the admin API: the running gateway re-reads, validates and applies its file."""
    url, admin = args.admin, None
    if args.config:
        try:
            admin = read_admin_access(args.config)
        except ConfigError as e:
            for problem in e.problems:
                print(problem, file=sys.stderr)
            return 1
    if url is None:
        host, _, port = (admin.bind if admin else "127.0.0.1:9901").rpartition(":")
        host = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)
        url = f"http://{host}:{port}"
    request = urllib.request.Request(url.rstrip("/") + "/reload", data=b"", method="POST")
    token = args.token or (admin and admin.token) or os.environ.get("FASTGW_ADMIN_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as e:
        body = json.loads(e.read() or b"{}").get("error", {})
        for line in body.get("problems") or [body.get("message", f"HTTP {e.code}")]:
            print(line, file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as e:
        print(f"fastgw reload: cannot reach the admin API at {url}: {getattr(e, 'reason', e)}",
              file=sys.stderr)
        return 1
    print(f"reloaded: config version {answer['config_version']}")
    return 0


def _check(args: argparse.Namespace) -> int:
    if args.config is None:
        args.usage_error("name the file with -c FILE (or set FASTGW_CONFIG)")
    name = STDIN_NAME if args.config == "-" else args.config
    try:
        loaded = _load_for_check(args.config)
        problems = loaded.warnings + _unresolvable_names(loaded, name)
    except ConfigError as e:
        problems = e.problems
    errors = [p for p in problems if p.severity == "error"]
    warnings = [p for p in problems if p.severity != "error"]
    if args.json:
        print(json.dumps({"valid": not errors, "errors": [_problem_json(p) for p in errors],
                          "warnings": [_problem_json(p) for p in warnings]}, indent=2))
    else:
        for problem in problems:
            print(problem)
        if not errors:
            print(f"{name}: ok")
    return 1 if errors else 0


def _load_for_check(path: str) -> LoadedConfig:
    """`-` is standard input: JSON if it starts with `{`, else YAML (TOML needs a file name)."""
    if path != "-":
        return _runtime_load().load_config(path)
    text = sys.stdin.read()
    return _runtime_load().load_text(text, STDIN_NAME, "json" if text.lstrip().startswith("{") else "yaml")


def _unresolvable_names(loaded: LoadedConfig, name: str) -> list[ConfigProblem]:
    """Warnings for target names that do not resolve now: not errors, since a name may resolve
    by the time the gateway runs (and until then its target is `unresolved`)."""
    found = asyncio.run(unresolvable(loaded.config))
    return pin_problems([ConfigProblem(path, message, severity="warning") for path, message in found],
                        loaded.source, name, loaded.fmt)


def _problem_json(problem: ConfigProblem) -> dict:
    return {"file": problem.file, "line": problem.line, "path": problem.path, "message": problem.message}


def _routes(args: argparse.Namespace) -> int:
    loaded = _load_or_report(args.config)
    if loaded is None:
        return 1
    # Needs the compiled core (see the module's docstring).
    from fastgw.runtime.build import compile_config

    runtime = compile_config(loaded.config)
    if args.match is None:
        _print_table(runtime.route_table())
        return 0
    method, _, url = args.match.strip().partition(" ")
    if not url:  # a bare URL means GET
        method, url = "GET", method
    try:
        hit = runtime.explain(method, url.strip())
    except ValueError as exc:
        print(f"400 bad request: {exc}")
        return 1
    if hit is None:
        print("no route")
        return 1
    for key in ("route", "service", "upstream_path", "params"):
        value = hit[key]
        print(f"{key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0


def _print_table(rows: list[dict]) -> None:
    columns = ("name", "priority", "hosts", "paths", "methods", "target")

    def cell(value: object) -> str:
        if isinstance(value, (list, tuple)):
            return ",".join(map(str, value)) or "*"  # an empty match list means "any"
        return "-" if value is None else str(value)

    table = [list(columns)] + [[cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        print("  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip())


def _schema(_: argparse.Namespace) -> int:
    print(json.dumps(msgspec.json.schema(Config, schema_hook=schema_hook), indent=2))
    return 0


def _version(_: argparse.Namespace) -> int:
    parts = [f"fastgw {_dist_version('fastgw')} (core: {_core_state()})"]
    parts += [f"{name} {_dist_version(name)}" for name in ("uvloop", "httptools", "msgspec")]
    parts.append(f"python {platform.python_version()}")
    print(" ".join(parts))
    return 0


def _dist_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        if name == "fastgw":  # a source checkout that was never installed
            return __version__
        return "missing"


def _core_state() -> str:
    """"compiled" only if every listed data-plane module loads as a native extension: a pure
    Python fallback (or a stale .py next to a missing .so) must not pass for the real thing."""
    try:
        names = getattr(importlib.import_module("fastgw._core"), "MODULES", ())
        modules = [importlib.import_module(f"fastgw._core.{name}") for name in names]
    except ImportError:
        return "missing"
    native = all((m.__file__ or "").endswith(tuple(EXTENSION_SUFFIXES)) for m in modules)
    return "compiled" if modules and native else "missing"
