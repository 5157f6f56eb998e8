"""Load a config file: parse it (YAML, TOML or JSON), substitute `${ENV}`, decode it with msgspec,
run the semantic checks, and the plugins' and the compiler's through `Checks` (given by
fastgw/runtime/load.py), and pin every problem to `file:line: key.path`.
"""
from __future__ import annotations

import difflib
import functools
import json
import os
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Iterator, Protocol

import msgspec
import yaml

from fastgw.config.errors import ConfigError, ConfigProblem
from fastgw.config.model import Admin, Config, dec_hook
from fastgw.config.validate import semantic_problems

DEFAULT_NAME = "<embedded default.yaml>"
# libyaml's loader when PyYAML was built with it (10x faster on big route tables); same results.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _FlaggingLoader(_YAML_LOADER):
    """Notes whether any mapping repeats a key (PyYAML keeps the last silently); the keys and
    their lines are then found in the node tree, which is only composed when one does."""
    has_duplicates = False

    def construct_mapping(self, node, deep=False):
        keys = [(k.tag, k.value) for k, _ in node.value if isinstance(k, yaml.ScalarNode) and k.tag != _MERGE_TAG]
        if len(keys) != len(set(keys)):
            self.has_duplicates = True
        return super().construct_mapping(node, deep)


@dataclass(frozen=True)
class LoadedConfig:
    config: Config
    path: str | None            # None for the embedded default
    source: str                 # the file's text, as read (secrets unsubstituted)
    warnings: list[ConfigProblem]
    document: dict | None = None    # the parsed file before ${ENV} substitution
    fmt: str = "yaml"               # yaml | json | toml


class Checks(Protocol):
    """What the layers above config add to a load (fastgw/runtime/load.py implements it): the
    plugins' settings and entries, which only the plugin registry knows, and whether the runtime
    tables build. config imports nothing of those layers (README.md, "Layers")."""

    def plugin_config(self, name: str) -> type:
        """The struct an entry `{name: settings}` decodes to (`python`: its module and config);
        ValueError for a plugin that cannot be found."""

    def python_plugin_config(self, module: str) -> type:
        """The config struct of the class a `python` entry names; ValueError if it cannot load."""

    def plugin_problems(self, config: Config) -> list[ConfigProblem]:
        """Plugin entries that cannot be used as written."""

    def build_problems(self, config: Config) -> list[ConfigProblem]:
        """Errors building the runtime tables, or warnings about routes never matched."""


def load_config(path: str | None = None, *, checks: Checks) -> LoadedConfig:
    """Load and validate a config; raise ConfigError listing every problem found."""
    if path is None:
        path = os.environ.get("FASTGW_CONFIG") or None
    if path is None:
        text = resources.files("fastgw").joinpath("default.yaml").read_text("utf-8")
        return load_text(text, DEFAULT_NAME, "yaml", path=None, checks=checks)
    return load_text(_read(path), path, _format_of(path), path=path, checks=checks)


def load_text(text: str, name: str, fmt: str, path: str | None = None, *, checks: Checks) -> LoadedConfig:
    """Load a config from its text; problems are reported against `name`."""
    src = _Source(name, text, fmt)
    document = src.parse()
    data, missing = _substitute_env(document)
    decoded = _decode(data)
    config, problems = decoded.config, [*missing, *decoded.problems]
    if config is not None:
        _resolve_files(config, os.path.dirname(os.path.abspath(path)) if path else None)
        plugin_problems, broken_plugins = _plugin_config_problems(config, checks)
        later = semantic_problems(config, checks.plugin_problems(config))
        # The compiler assumes references resolve, so it only sees configs that passed the checks.
        if not any(p.severity == "error" for p in later):
            later += checks.build_problems(config)
        if decoded.broken or src.duplicates:  # "unused", "shadowed": unknown while the file is unclear
            later = [p for p in later if p.severity == "error"]
        later, plugin_problems = ([ConfigProblem(decoded.original(p.path), p.message, severity=p.severity)
                                   for p in found] for found in (later, plugin_problems))
        unusable = [p.path for p in missing] + decoded.broken + list(map(decoded.original, broken_plugins))
        problems += plugin_problems + [p for p in later if not decoded.follows_from_broken(p, unusable)]
    # Duplicate keys carry their own lines: the key path alone would find the first occurrence.
    problems = src.duplicates + [src.pin(p) for p in problems]
    errors = [p for p in problems if p.severity == "error"]
    warnings = [p for p in problems if p.severity != "error"]
    if errors:
        raise ConfigError(errors + warnings)
    return LoadedConfig(config, path, src.text, warnings, document, fmt)


def read_admin_access(path: str) -> Admin:
    """The `admin:` section of a config file, for `fastgw reload`, which needs only its address
    and token: just those two values are taken from the environment, so the caller does not need
    every `${VAR}` that the rest of the file uses."""
    src = _Source(path, _read(path), _format_of(path))
    admin = src.parse().get("admin")
    wanted = {key: admin[key] for key in ("bind", "token") if key in admin} if isinstance(admin, dict) else {}
    values, missing = _substitute_env({"admin": wanted})
    if missing:
        raise ConfigError([src.pin(p) for p in missing])
    try:
        return _convert(values["admin"], Admin)
    except msgspec.ValidationError as e:
        segments, message = _explain(values["admin"], str(e), Admin)
        raise ConfigError([src.pin(ConfigProblem(format_path(["admin", *segments]), message))]) from None


# File names in plugin configs, by plugin: resolved like the TLS ones.
_PLUGIN_FILES = {"jwt": ("public_keys", "jwks_ca"), "oauth2_introspection": ("endpoint_ca",)}


def _resolve_files(config: Config, base_dir: str | None) -> None:
    """Relative file names (certificates, keys, CAs) are relative to the config file's directory:
    made absolute here, in the decoded config only (the document written back keeps them as
    written), so every process reads the same files whatever its working directory."""
    if base_dir is None:
        return

    def absolute(name):
        if isinstance(name, list):
            return [absolute(n) for n in name]
        return name if not isinstance(name, str) or os.path.isabs(name) else os.path.join(base_dir, name)
    for listener in config.listeners:
        if listener.tls is not None:
            listener.tls.client_ca = absolute(listener.tls.client_ca)
            for cert in listener.tls.certificates:
                cert.cert, cert.key = absolute(cert.cert), absolute(cert.key)
    for service in config.services.values():
        tls = service.tls
        tls.ca, tls.client_cert, tls.client_key = absolute(tls.ca), absolute(tls.client_cert), absolute(tls.client_key)
        if service.grpc is not None:
            service.grpc.descriptors = absolute(service.grpc.descriptors)
    for entries in [config.plugins, *(route.plugins for route in config.routes)]:
        for entry in entries:
            if isinstance(entry, dict) and len(entry) == 1:
                (name, settings), = entry.items()
                for key in _PLUGIN_FILES.get(name, ()):
                    if isinstance(settings, dict) and key in settings:
                        settings[key] = absolute(settings[key])


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a BOM from Windows editors
            return f.read()
    except OSError as e:
        raise ConfigError([ConfigProblem("", f"cannot read the file: {e.strerror or e}", file=path)]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([ConfigProblem("", f"not UTF-8 text: {e.reason}", file=path)]) from None


def _format_of(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    return {".toml": "toml", ".json": "json"}.get(ext, "yaml")  # .yaml, .yml and anything else


# --- key paths -----------------------------------------------------------------------------------

# A key path is a list of segments: str for mapping keys, int for list indices. msgspec writes a
# dict key it failed on as `[...]`, parsed to Ellipsis until _resolve_dict_keys finds the real key.
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_PATH_TOKEN = re.compile(r'\.?([^.\[\]"]+)|\[(\d+)\]|\[("(?:[^"\\]|\\.)*")\]|\[(\.\.\.)\]')


def format_path(segments: list) -> str:
    """`routes[2].match.paths[0]`; keys that are not plain words are quoted: `headers["x.y"]`."""
    out = ""
    for seg in segments:
        if isinstance(seg, int):
            out += f"[{seg}]"
        elif _PLAIN_KEY.match(seg):
            out += f".{seg}" if out else seg
        else:
            out += f"[{json.dumps(seg)}]"
    return out


def parse_path(path: str) -> list:
    """Inverse of format_path; also reads msgspec's `$.a[...].b` (`[...]` becomes Ellipsis)."""
    segments: list = []
    for key, index, quoted, dots in _PATH_TOKEN.findall(path.removeprefix("$")):
        if index:
            segments.append(int(index))
        elif quoted:
            segments.append(json.loads(quoted))
        elif dots:
            segments.append(...)
        else:
            segments.append(key)
    return segments


# --- parsing and line positions ------------------------------------------------------------------

class _Source:
    """The text of one config file, its parsed data, and where each key path sits in it."""

    def __init__(self, name: str, text: str, fmt: str):
        self.name, self.text, self.fmt = name, text, fmt
        self.duplicates: list[ConfigProblem] = []   # filled by parse(); TOML refuses them itself

    def parse(self) -> dict:
        if not self.text.strip():
            raise self._error("the file is empty")
        has_duplicates = False
        try:
            if self.fmt == "toml":
                data = tomllib.loads(self.text)
            elif self.fmt == "json":
                def pairs(items: list) -> dict:
                    nonlocal has_duplicates
                    has_duplicates |= len({k for k, _ in items}) != len(items)
                    return dict(items)
                data = json.loads(self.text, object_pairs_hook=pairs)
            else:
                loader = _FlaggingLoader(self.text)
                try:
                    data = loader.get_single_data()
                    has_duplicates = loader.has_duplicates
                finally:
                    loader.dispose()
        except yaml.YAMLError as e:
            raise self._yaml_error(e) from None
        except tomllib.TOMLDecodeError as e:
            m = re.search(r"\(at line (\d+), column \d+\)", str(e))
            message = re.sub(r"\s*\(at line.*\)$", "", str(e))
            raise self._error(f"TOML syntax error: {message}", int(m[1]) if m else None) from None
        except json.JSONDecodeError as e:
            raise self._error(f"JSON syntax error: {e.msg}", e.lineno) from None
        if data is None:  # only comments
            raise self._error("the file is empty")
        if not isinstance(data, dict):
            raise self._error("the top level must be a mapping (listeners:, services:, routes:, ...)", 1)
        if has_duplicates and self._tree is not None:
            self.duplicates = [ConfigProblem(format_path(segments), f"duplicate key (first at line {first})",
                                             self.name, line)
                               for segments, line, first in _duplicate_keys(self._tree, [])]
        return data

    def _error(self, message: str, line: int | None = None) -> ConfigError:
        return ConfigError([ConfigProblem("", message, file=self.name, line=line)])

    def _yaml_error(self, error: yaml.YAMLError) -> ConfigError:
        """`file:line:column: YAML syntax error: ...`, saying so when a tab is the cause: YAML
        forbids tabs in indentation, and editors make them hard to see."""
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        message = f"YAML syntax error: {getattr(error, 'problem', None) or error}"
        context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
        if context and context_mark is not None and mark is not None and context_mark.line != mark.line:
            message += f" ({context} that starts at line {context_mark.line + 1})"
        if mark is None:
            return ConfigError([ConfigProblem("", message, file=self.name)])
        text = self.text.splitlines()[mark.line] if mark.line < len(self.text.splitlines()) else ""
        indent = text[:len(text) - len(text.lstrip(" \t"))]
        if text[mark.column:mark.column + 1] == "\t" or "\t" in indent[:mark.column + 1]:
            message += ": a tab (YAML indents with spaces only)"
        return ConfigError([ConfigProblem("", message, file=self.name, line=mark.line + 1, column=mark.column + 1)])

    def pin(self, problem: ConfigProblem) -> ConfigProblem:
        """The problem with this file's name and the line of its key path."""
        line = self.line_of(parse_path(problem.path)) if problem.path else None
        return ConfigProblem(problem.path, problem.message, self.name, line, problem.severity)

    def line_of(self, segments: list) -> int | None:
        """1-based line of the deepest node along `segments` that exists in the file."""
        if self._tree is None:
            return _search_line(self.text, segments)
        return _node_line(self._tree, segments)

    @functools.cached_property
    def _tree(self) -> yaml.Node | None:
        """The YAML node tree (with line marks), composed only when a problem needs a line."""
        if self.fmt == "toml":
            return None
        # JSON is flow-style YAML, so the composer gives exact lines for it too; tabs are
        # insignificant whitespace in JSON (never inside strings) but illegal in YAML.
        text = self.text.replace("\t", " ") if self.fmt == "json" else self.text
        try:
            return yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.YAMLError:
            return None


def _duplicate_keys(node: yaml.Node, segments: list) -> Iterator[tuple[list, int, int]]:
    """(key path, line, line of the first occurrence) of every repeated key, in file order."""
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _duplicate_keys(item, [*segments, i])
    elif isinstance(node, yaml.MappingNode):
        first: dict = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE_TAG:
                line = key.start_mark.line + 1
                if (key.tag, key.value) in first:
                    yield [*segments, key.value], line, first[key.tag, key.value]
                else:
                    first[key.tag, key.value] = line
            yield from _duplicate_keys(value, [*segments, key.value])


def _node_line(node: yaml.Node, segments: list) -> int | None:
    line = None
    for seg in segments:
        if isinstance(node, yaml.MappingNode) and isinstance(seg, str):
            found = next(((k, v) for k, v in node.value if k.value == seg), None)
            if found is None:
                break
            line, node = found[0].start_mark.line + 1, found[1]  # the key's line: `limits:` not its block
        elif isinstance(node, yaml.SequenceNode) and isinstance(seg, int) and seg < len(node.value):
            node = node.value[seg]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _search_line(text: str, segments: list) -> int | None:
    """Best effort for TOML (and JSON that YAML cannot read): find each key name in order, each
    after the previous one; list index n skips n further `[[...key]]` array-table headers."""
    pos, line, key = 0, None, ""
    for seg in segments:
        if isinstance(seg, int):
            header = re.compile(rf"^[ \t]*\[\[[^\]]*\b{re.escape(key)}\s*\]\]", re.M)
            for _ in range(seg):
                m = header.search(text, pos)
                if m is None:
                    return line  # an inline array: the key's line is the best we know
                pos, line = m.end(), text.count("\n", 0, m.start()) + 1
            continue
        key = seg
        m = re.compile(rf'(?:^|[\s{{,.\[])(?P<key>"?{re.escape(key)}"?)\s*[=:\].]', re.M).search(text, pos)
        if m is None:
            return line
        pos, line = m.end(), text.count("\n", 0, m.start("key")) + 1
    return line


# --- ${ENV} substitution -------------------------------------------------------------------------

_ENV = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def has_env_reference(text: str) -> bool:
    """Whether loading would replace part of `text` from the environment (`$${` is literal)."""
    return any(m[1] for m in _ENV.finditer(text))


def pin_problems(problems: list[ConfigProblem], text: str, name: str, fmt: str) -> list[ConfigProblem]:
    """`problems` (key paths only) with the file name and the lines of their keys in `text`."""
    src = _Source(name, text, fmt)
    return [src.pin(p) for p in problems]


def _substitute_env(data: Any) -> tuple[Any, list[ConfigProblem]]:
    """Replace `${VAR}` / `${VAR:-default}` in string values (not keys), after parsing, so a
    secret's text can never change the document's structure. `$${` is a literal `${`. An unset
    variable is a problem, and its value is left empty so the other checks can still run."""
    missing: list[ConfigProblem] = []

    def substitute(text: str, segments: list) -> str:
        def one(m: re.Match) -> str:
            if m[0] == "$${":
                return "${"
            name, default = m[1], m[2]
            value = os.environ.get(name)
            if not value and default is not None:  # like the shell: a default also replaces ""
                value = default
            if value is None:
                missing.append(ConfigProblem(format_path(segments),
                                             f"environment variable {name} is not set "
                                             f"(write ${{{name}:-default}} to give a default)"))
                return ""
            return value
        return _ENV.sub(one, text)

    def walk(value: Any, segments: list) -> Any:
        if isinstance(value, str):
            return substitute(value, segments)
        if isinstance(value, dict):
            return {k: walk(v, [*segments, k]) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, [*segments, i]) for i, v in enumerate(value)]
        return value

    return walk(data, []), missing


# --- schema decoding -----------------------------------------------------------------------------

_AT = re.compile(r"^(?P<message>.*?) - at (?:`key` in )?`(?P<path>[^`]*)`$", re.S)


def _convert(data: Any, root: type = Config) -> Any:
    return msgspec.convert(data, root, dec_hook=dec_hook)


@dataclass
class _Decoded:
    """What could be decoded. A listener, service, route (or top-level key) with a schema error is
    left out, so the later checks still run on the rest of the file."""
    config: Config | None
    problems: list[ConfigProblem]
    broken: list[str]                     # key paths of the parts left out
    kept: dict[str, list[int]]            # list key -> original index of each item kept
    names: set[str]                       # names of the services, clients, ... left out

    def original(self, path: str) -> str:
        """A key path in the cut-down config, with list indices as in the file."""
        segments = parse_path(path)
        if len(segments) < 2 or segments[0] not in self.kept or not isinstance(segments[1], int):
            return path
        segments[1] = self.kept[segments[0]][segments[1]]
        return format_path(segments)

    def follows_from_broken(self, problem: ConfigProblem, unusable: list[str]) -> bool:
        """A consequence of a problem already reported: at, under or above a part left out or a
        value whose variable is unset, or about a name that was left out (`unknown service 'x'`)."""
        def related(path: str, other: str) -> bool:
            return path == other or path.startswith((f"{other}.", f"{other}["))
        path = problem.path
        return (bool(path) and any(related(path, u) or related(u, path) for u in unusable)
                or any(repr(name) in problem.message for name in self.names))


def _decode(data: dict) -> _Decoded:
    try:
        return _Decoded(_convert(data), [], [], {}, set())
    except msgspec.ValidationError:
        pass
    # msgspec stops at its first error. Decoding each listener, service and route on its own
    # reports one error per item, so a file with several typos is fixed in one round.
    problems, failed = [], []
    for location, piece, segments_fix in _pieces(data):
        try:
            _convert(piece)
        except msgspec.ValidationError as e:
            path, message = _explain(piece, str(e))
            problems.append(ConfigProblem(format_path(segments_fix(path)), message))
            failed.append(location)
    partial, kept = dict(data), {}
    for location in failed:
        if len(location) == 1:
            partial.pop(location[0], None)
        elif isinstance(location[1], str):
            partial[location[0]] = {k: v for k, v in partial[location[0]].items() if k != location[1]}
    for key in {loc[0] for loc in failed if len(loc) == 2 and isinstance(loc[1], int)}:
        kept[key] = [i for i in range(len(data[key])) if [key, i] not in failed]
        partial[key] = [data[key][i] for i in kept[key]]
    try:
        config = _convert(partial)
    except msgspec.ValidationError:
        config = None   # the pieces decode alone but not together: only their problems are known
    names = {loc[1] for loc in failed if len(loc) == 2 and isinstance(loc[1], str)}
    return _Decoded(config, problems, [format_path(loc) for loc in failed], kept, names)


def _plugin_config_problems(config: Config, checks: Checks) -> tuple[list[ConfigProblem], list[str]]:
    """Each plugin entry's settings decoded against the plugin's own config struct, explained like
    the core keys; and the paths of the entries that failed. Entries whose plugin cannot be found
    are left to the plugin registry's checks, which say why."""
    problems, failed = [], []
    lists = [(["plugins"], config.plugins)] + [(["routes", i, "plugins"], r.plugins) for i, r in enumerate(config.routes)]
    for where, entries in lists:
        for j, entry in enumerate(entries):
            if not isinstance(entry, dict) or len(entry) != 1:
                continue
            (name, settings), = entry.items()
            prefix = [*where, j, name]
            root = None
            try:
                root = checks.plugin_config(name)
                # `python` names its class in the entry: its own keys are checked first, then `config:`.
                if name == "python":
                    spec = _convert(settings or {}, root)
                    own = checks.python_plugin_config(spec.module)
                    prefix, settings, root = [*prefix, "config"], spec.config, own
                _convert(settings or {}, root)
            except msgspec.ValidationError as e:
                segments, message = _explain(settings or {}, str(e), root)
                problems.append(ConfigProblem(format_path([*prefix, *segments]), message))
                failed.append(format_path([*where, j, name]))
            except ValueError:  # after ValidationError, its subclass
                continue
    return problems, failed


def _pieces(data: dict) -> Iterator[tuple[list, dict, Callable[[list], list]]]:
    """(where in the file, document fragment, function mapping the fragment's key path back to
    the whole file's)."""
    fields = {f.encode_name: f.type for f in msgspec.inspect.type_info(Config).fields}
    for key, value in data.items():
        if isinstance(fields.get(key), msgspec.inspect.ListType) and isinstance(value, list):
            for i, item in enumerate(value):
                yield [key, i], {key: [item]}, lambda p, i=i: [p[0], i, *p[2:]]
        elif isinstance(fields.get(key), msgspec.inspect.DictType) and isinstance(value, dict):
            for name, item in value.items():
                yield [key, name], {key: {name: item}}, lambda p: p
        else:
            yield [key], {key: value}, lambda p: p


def _explain(piece: Any, error: str, root: type = Config) -> tuple[list, str]:
    """msgspec's `Expected `int`, got `str` - at `$.a[0].b`` -> (key path, readable message);
    `piece` is what was decoded as a `root` (the Config, or a plugin's config)."""
    m = _AT.match(error)
    # msgspec leaves out " - at `$`" for errors at the top level, like an unknown top-level key.
    message, path = (m["message"], m["path"]) if m else (error, "$")
    segments = _resolve_dict_keys(piece, parse_path(path), error, root)
    if unknown := re.match(r"Object contains unknown field `(.*)`$", message):
        field = unknown[1]
        message = f"unknown key {field!r}{_suggest(field, _type_at(segments, root))}"
        segments = [*segments, field]
    elif missing := re.match(r"Object missing required field `(.*)`$", message):
        message = f"missing required key {missing[1]!r}"
    elif enum := re.match(r"Invalid enum value (.*)$", message):
        choices = _literal_values(_type_at(segments, root))
        message = f"invalid value {enum[1]}" + (f"; expected one of: {choices}" if choices else "")
    elif "`key` in" in error:
        message = "keys here must be strings: " + message.replace("`", "")
    else:
        message = message.replace("`", "")
        message = message[:1].lower() + message[1:]
    return segments, message


def _resolve_dict_keys(piece: Any, segments: list, error: str, root: type) -> list:
    """msgspec names a failing dict entry `[...]`. Find it by decoding the fragment with that dict
    cut down to one entry at a time: the entry that reproduces the same error is the culprit."""
    segments = list(segments)
    for i, seg in enumerate(segments):
        if seg is not ...:
            continue
        container = _get(piece, segments[:i])
        for key in container if isinstance(container, dict) else ():
            trial = _replace(piece, segments[:i], {key: container[key]})
            try:
                _convert(trial, root)
            except msgspec.ValidationError as e:
                if str(e) == error:
                    segments[i], piece = key, trial
                    break
        else:
            return segments[:i]  # not found: point at the dict itself
    return segments


def _get(data: Any, segments: list) -> Any:
    for seg in segments:
        data = data[seg]
    return data


def _replace(data: Any, segments: list, new: Any) -> Any:
    """A copy of `data` with the value at `segments` replaced (only the path is copied)."""
    if not segments:
        return new
    head, rest = segments[0], segments[1:]
    copy = list(data) if isinstance(data, list) else dict(data)
    copy[head] = _replace(data[head], rest, new)
    return copy


def _type_at(segments: list, root: type) -> Any:
    """The msgspec.inspect type at a key path of `root` (None if the path leaves the schema)."""
    t: Any = msgspec.inspect.type_info(root)
    for seg in segments:
        if isinstance(t, msgspec.inspect.UnionType):  # Optional[Struct]: follow the struct
            t = next((x for x in t.types if isinstance(x, msgspec.inspect.StructType)), None)
        if isinstance(t, msgspec.inspect.StructType):
            t = next((f.type for f in t.fields if f.encode_name == seg), None)
        elif isinstance(t, (msgspec.inspect.ListType, msgspec.inspect.DictType)):
            t = t.item_type if isinstance(t, msgspec.inspect.ListType) else t.value_type
        else:
            return None
    if isinstance(t, msgspec.inspect.UnionType):
        t = next((x for x in t.types if isinstance(x, msgspec.inspect.StructType)), t)
    return t


def _suggest(field: str, struct: Any) -> str:
    if not isinstance(struct, msgspec.inspect.StructType):
        return ""
    names = [f.encode_name for f in struct.fields]
    close = difflib.get_close_matches(field, names, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; allowed keys: {', '.join(names)}"


def _literal_values(t: Any) -> str:
    types = t.types if isinstance(t, msgspec.inspect.UnionType) else (t,)
    values = [v for x in types if isinstance(x, msgspec.inspect.LiteralType) for v in x.values]
    return ", ".join(map(str, values))
