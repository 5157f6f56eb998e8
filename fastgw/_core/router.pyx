# cython: language_level=3
"""The compiled routing table: hosts -> path trie -> rules, in C.

Lookup walks one trie node per path segment (a dict lookup each), so its cost depends on the path,
not on the number of routes. At each node the order is exact segment, then `{param}`, then a
`/**` or `{rest...}` tail: that is the specificity order (exact > param > tail), decided segment by
segment from the left. Regex patterns are tried after the trie's hit of the same or a higher
priority. Paths arrive in the canonical form of `fastgw/_core/uri.pyx`; a segment's parameters
(`;x=1`, RFC 3986 §3.3) do not take part in matching it, since some backends drop them, and a
trailing `/` matches as the path without it.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memchr

from fastgw._core.buffer cimport WriteBuffer, ascii_lower
from fastgw._core.uri cimport canonical_path

import re
from urllib.parse import parse_qsl

_PARAM = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)(\.\.\.)?\}$")


class PatternError(ValueError):
    pass


def parse_pattern(str pattern):
    """Split a path pattern into segments: ("lit", text) | ("param", name) | ("tail", name|None).

    Raises PatternError with a message fit for `fastgw check`.
    """
    if not pattern.startswith("/"):
        raise PatternError(f"path pattern {pattern!r} must start with '/' (or '~' for a regex)")
    if pattern == "/":
        return []
    out = []
    names = set()
    parts = pattern[1:].split("/")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part == "**":
            if not last:
                raise PatternError(f"'**' must be the last segment of {pattern!r}")
            out.append(("tail", None))
            continue
        m = _PARAM.match(part) if part[:1] == "{" else None
        if m:
            name, rest = m.group(1), m.group(2)
            if name in names:
                raise PatternError(f"parameter {{{name}}} appears twice in {pattern!r}")
            names.add(name)
            if rest:
                if not last:
                    raise PatternError(f"{{{name}...}} must be the last segment of {pattern!r}")
                out.append(("tail", name))
            else:
                out.append(("param", name))
            continue
        if "{" in part or "}" in part or "*" in part:
            raise PatternError(
                f"segment {part!r} of {pattern!r}: a segment is literal text, one {{param}}, "
                "{rest...} or ** (no mixing)")
        _check_canonical(part, last, pattern)
        out.append(("lit", part))
    return out


def _check_canonical(str part, bint last, str pattern):
    """A literal segment must be spelled as requests are after normalisation (fastgw/_core/uri.pyx),
    or it would never match."""
    if part == "" and not last:
        raise PatternError(f"{pattern!r} has an empty segment: requests' repeated slashes are merged")
    if part in (".", "..") or ";" in part or "\\" in part:
        raise PatternError(f"segment {part!r} of {pattern!r} never matches: dot segments, parameters "
                           "(';') and backslashes are not part of a normalised path")
    if "%" in part:
        try:
            canonical = canonical_path(("/" + part).encode(), True).decode()[1:]
        except (ValueError, UnicodeDecodeError):
            raise PatternError(f"segment {part!r} of {pattern!r} never matches: invalid escape") from None
        if canonical != part:
            raise PatternError(f"segment {part!r} of {pattern!r} never matches: write it as {canonical!r}")


def parse_template(str template, tuple capture_names):
    """Compile a rewrite template like "/users/{id}" against one pattern's captures."""
    if not template.startswith("/"):
        raise PatternError(f"rewrite path {template!r} must start with '/'")
    parts = []
    pos = 0
    for m in re.finditer(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", template):
        if m.start() > pos:
            parts.append(template[pos:m.start()].encode())
        name = m.group(1)
        # A name the pattern does not capture rewrites to nothing: a route with paths
        # ["/v2/users/{id}", "/v2/users"] and rewrite "/users/{id}" sends "/v2/users" to "/users".
        parts.append(capture_names.index(name) if name in capture_names else -1)
        pos = m.end()
    if pos < len(template):
        parts.append(template[pos:].encode())
    if re.search(r"[{}]", re.sub(r"\{[A-Za-z_][A-Za-z0-9_]*\}", "", template)):
        raise PatternError(f"rewrite path {template!r} has an unbalanced or invalid {{...}}")
    return parts


def template_names(str template):
    return re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", template)


cdef class HeaderEdits:
    def __init__(self, set=None, add=None, remove=(), rename=None):
        set = {k.lower().encode(): v.encode() for k, v in (set or {}).items()}
        rename = {k.lower().encode(): v.encode() for k, v in (rename or {}).items()}
        self.drop = frozenset(set) | frozenset(n.lower().encode() for n in remove) | frozenset(rename)
        self.rename = rename
        self.append = [(k, v) for k, v in set.items()]
        self.append += [(k.encode(), v.encode()) for k, v in (add or {}).items()]

    cdef bint drops(self, bytes lower_name):
        return lower_name in self.drop

    cdef int write_renamed(self, WriteBuffer buf, bytes lower_name, bytes value) except -1:
        cdef object new_name = self.rename.get(lower_name)
        if new_name is not None:
            buf.write_bytes(new_name)
            buf.write(b": ", 2)
            buf.write_bytes(value)
            buf.write(b"\r\n", 2)
        return 0

    cdef int write_appended(self, WriteBuffer buf) except -1:
        cdef bytes name, value
        for name, value in self.append:
            buf.write_bytes(name)
            buf.write(b": ", 2)
            buf.write_bytes(value)
            buf.write(b"\r\n", 2)
        return 0


cdef int write_fields(WriteBuffer buf, list headers, HeaderEdits edits) except -1:
    """Write `headers` ([name, value, ...]) as header lines, applying `edits` (or None)."""
    cdef Py_ssize_t i
    cdef bytes name, lower
    for i in range(0, len(headers), 2):
        name = <bytes>headers[i]
        if edits is not None:
            lower = ascii_lower(name)
            if edits.drops(lower):
                edits.write_renamed(buf, lower, <bytes>headers[i + 1])
                continue
        buf.write_bytes(name)
        buf.write(b": ", 2)
        buf.write_bytes(<bytes>headers[i + 1])
        buf.write(b"\r\n", 2)
    if edits is not None:
        edits.write_appended(buf)
    return 0


cdef class RouteEntry:
    def __init__(self, *, str name, int index, int priority=0, int kind=ROUTE_PROXY, service=None,
                 methods_mask=0, host_rewrite=None, strip_prefix=None, query_rewrite=None,
                 request_edits=None, response_edits=None, double timeout=0.0,
                 long long max_body=-1, int respond_status=0, respond_head=None,
                 respond_body=None, respond_fields=None, int metric_slot=-1, conditions=None, plugins=None,
                 handler=None, shapes=None, unsigned long long analytics_route=0,
                 unsigned long long analytics_service=0):
        self.name = name
        self.index = index
        self.priority = priority
        self.kind = kind
        self.service = service
        self.methods_mask = methods_mask
        self.host_rewrite = host_rewrite
        self.strip_prefix = strip_prefix
        self.query_rewrite = query_rewrite
        self.request_edits = request_edits
        self.response_edits = response_edits
        self.timeout = timeout
        self.max_body = max_body
        self.respond_status = respond_status
        self.respond_head = respond_head
        self.respond_body = respond_body
        self.respond_fields = respond_fields
        self.metric_slot = metric_slot
        self.conditions = tuple(conditions) if conditions else None
        self.plugins = plugins
        self.handler = handler
        self.shapes = shapes or None
        self.analytics_route = analytics_route
        self.analytics_service = analytics_service

    def __repr__(self):
        return f"<RouteEntry {self.name!r}>"


cdef class PathRule:
    def __init__(self, RouteEntry route, str pattern, str rewrite_path=None):
        self.route = route
        self.pattern = pattern
        if pattern.startswith("~"):
            regex = re.compile(pattern[1:])
            self.capture_names = tuple(
                sorted(regex.groupindex, key=regex.groupindex.get)) if regex.groupindex else ()
        else:
            self.segments = parse_pattern(pattern)
            self.capture_names = tuple(name for kind, name in self.segments if kind != "lit")
        self.template = (parse_template(rewrite_path, self.capture_names)
                         if rewrite_path is not None else None)

    cdef int write_path(self, WriteBuffer buf, const char* path, Py_ssize_t n,
                        Captures* caps) except -1:
        """Write the upstream path (without query) for a request that matched this rule."""
        cdef RouteEntry route = self.route
        cdef Py_ssize_t plen, start, i
        cdef object part
        if self.template is not None:
            start = buf.length
            for part in self.template:
                if isinstance(part, bytes):
                    buf.write_bytes(<bytes>part)
                else:
                    i = <Py_ssize_t>part
                    if 0 <= i < caps.count:
                        buf.write(path + caps.start[i], caps.end[i] - caps.start[i])
            # An empty trailing capture leaves "/users/": send "/users" instead.
            if buf.length - start > 1 and buf.data[buf.length - 1] == b'/' and \
                    isinstance(self.template[len(self.template) - 1], int):
                buf.length -= 1
            return 0
        if route.strip_prefix is not None:
            plen = PyBytes_GET_SIZE(route.strip_prefix)
            if n >= plen and path[:plen] == PyBytes_AS_STRING(route.strip_prefix)[:plen] and \
                    (n == plen or path[plen] == b'/' or route.strip_prefix.endswith(b"/")):
                if n == plen:
                    buf.write(b"/", 1)
                else:
                    if path[plen] != b'/':
                        buf.write(b"/", 1)
                    buf.write(path + plen, n - plen)
                return 0
        buf.write(path, n)
        return 0

    cdef dict params(self, bytes path, Captures* caps):
        """{name: value} of the named captures of a match (handlers and Router.lookup)."""
        cdef dict params = {}
        cdef int i
        for i in range(caps.count):
            name = self.capture_names[i] if i < len(self.capture_names) else None
            if name is not None:
                params[name] = path[caps.start[i]:caps.end[i]].decode("latin-1")
        return params

    def __repr__(self):
        return f"<PathRule {self.route.name!r} {self.pattern!r}>"


cdef class PathNode:
    def __init__(self):
        self.children = {}
        self.param = None
        self.rules = []
        self.tail_rules = []

    cdef PathNode child(self, const char* seg, Py_ssize_t n):
        if not self.children:
            return None
        return self.children.get(PyBytes_FromStringAndSize(seg, n))


cdef class HostTable:
    def __init__(self):
        self.root = PathNode()
        self.regex_rules = []

    def add(self, PathRule rule):
        cdef PathNode node = self.root
        if rule.pattern.startswith("~"):
            self.regex_rules.append((re.compile(rule.pattern[1:]), rule))
            return
        for kind, value in rule.segments:
            if kind == "lit":
                key = value.encode()
                nxt = node.children.get(key)
                if nxt is None:
                    nxt = node.children[key] = PathNode()
                node = nxt
            elif kind == "param":
                if node.param is None:
                    node.param = PathNode()
                node = node.param
            else:
                node.tail_rules.append(rule)
                return
        node.rules.append(rule)

    def sort(self):
        _sort_node(self.root)
        self.regex_rules.sort(key=lambda item: _rule_order(item[1]))


def _rule_order(PathRule r):
    """Within one trie node: higher priority, then more header/query/profile conditions (the
    more specific route is tried first, whatever the file order), then file order."""
    return (-r.route.priority, -len(r.route.conditions or ()), r.route.index)


cdef void _sort_node(PathNode node):
    if len(node.rules) > 1:
        node.rules.sort(key=_rule_order)
    if len(node.tail_rules) > 1:
        node.tail_rules.sort(key=_rule_order)
    cdef PathNode child
    for child in node.children.values():
        _sort_node(child)
    if node.param is not None:
        _sort_node(node.param)


# Condition kinds: (kind, name, exact value or None, compiled regex or None)
COND_HEADER, COND_QUERY, COND_PROFILE = 0, 1, 2


def compile_conditions(dict headers, dict query, profiles):
    """Route or client-profile conditions: `~regex` values are searched (re.search), other
    values compared exactly; header names are case-insensitive."""
    out = []
    for name, value in headers.items():
        out.append((COND_HEADER, name.lower().encode(), None if value.startswith("~") else value.encode(),
                    re.compile(value[1:]) if value.startswith("~") else None))
    for name, value in query.items():
        out.append((COND_QUERY, name, None if value.startswith("~") else value,
                    re.compile(value[1:]) if value.startswith("~") else None))
    if profiles:
        out.append((COND_PROFILE, None, frozenset(profiles), None))
    return tuple(out)


cdef bint _value_holds(object value, object exact, object regex):
    if regex is not None:
        return regex.search(value.decode("latin-1") if isinstance(value, bytes) else value) is not None
    return value == exact


cdef bint _conditions_hold(tuple conditions, _Search search):
    cdef Py_ssize_t i, n
    cdef bytes name
    cdef list headers
    for kind, key, exact, regex in conditions:
        if kind == COND_PROFILE:
            if search.profile not in exact:
                return False
        elif kind == COND_HEADER:
            headers = search.headers
            n = len(headers) if headers is not None else 0
            for i in range(0, n, 2):
                name = headers[i]
                if len(name) == len(key) and ascii_lower(name) == key and \
                        _value_holds((<bytes>headers[i + 1]).strip(), exact, regex):
                    break
            else:
                return False
        else:
            if search.query_params is None:
                search.query_params = _parse_query(search.query)
            if not any(_value_holds(v, exact, regex) for v in search.query_params.get(key, ())):
                return False
    return True


def _parse_query(bytes query):
    params = {}
    if query:
        for name, value in parse_qsl(query[1:].decode("latin-1"), keep_blank_values=True):
            params.setdefault(name, []).append(value)
    return params


cdef inline PathRule _pick(list rules, _Search search):
    cdef PathRule rule
    cdef RouteEntry route
    for rule in rules:
        route = rule.route
        if (route.methods_mask == 0 or route.methods_mask & search.method_bit) and \
                (route.conditions is None or _conditions_hold(route.conditions, search)):
            return rule
    return None


cdef class _Search:
    """One walk of a path trie: the request's method, headers, query and profile, and the
    best rule found so far."""
    cdef unsigned long long method_bit
    cdef bint first_only          # one priority in the table: the first hit (most specific) wins
    cdef PathRule best
    cdef Captures best_caps
    cdef list headers             # [name, value, ...] as received
    cdef bytes query              # "?a=1&b=2" or b""
    cdef object query_params      # parsed on first use: {name: [values]}
    cdef object profile

    cdef inline bint offer(self, list rules, Captures* caps):
        """Consider the first of `rules` that allows the method. True: stop walking."""
        cdef PathRule rule = _pick(rules, self)
        if rule is not None and (self.best is None or rule.route.priority > self.best.route.priority):
            self.best = rule
            self.best_caps = caps[0]
        return self.first_only and self.best is not None


cdef _Search _search = _Search()          # one walk at a time on the loop thread


cdef bint _walk(PathNode node, const char* p, Py_ssize_t pos, Py_ssize_t n, Captures* caps,
                _Search search):
    """Depth-first: exact child, then param, then tail, so hits come most specific first.
    With several priorities in the table every branch is visited and the highest one kept."""
    cdef Py_ssize_t seg_start, seg_end
    cdef const char* slash
    cdef const char* params
    cdef PathNode nxt
    if pos >= n:
        if search.offer(node.rules, caps):
            return True
        return bool(node.tail_rules) and _offer_tail(node, n, n, caps, search)
    seg_start = pos + 1
    slash = <const char*>memchr(p + seg_start, b'/', n - seg_start)
    seg_end = (slash - p) if slash is not NULL else n
    # "/admin;x=1/..." is "/admin/..." to Tomcat and Spring: match the segment without parameters
    params = <const char*>memchr(p + seg_start, b';', seg_end - seg_start)
    nxt = node.child(p + seg_start, ((params - p) if params is not NULL else seg_end) - seg_start)
    if nxt is not None and _walk(nxt, p, seg_end, n, caps, search):
        return True
    if seg_start == n and search.offer(node.rules, caps):
        return True                               # "/private/" is "/private"
    if node.param is not None and seg_end > seg_start and caps.count < MAX_CAPTURES:
        caps.start[caps.count] = seg_start
        caps.end[caps.count] = seg_end
        caps.count += 1
        if _walk(node.param, p, seg_end, n, caps, search):
            return True
        caps.count -= 1
    return bool(node.tail_rules) and _offer_tail(node, seg_start, n, caps, search)


cdef inline bint _offer_tail(PathNode node, Py_ssize_t start, Py_ssize_t end, Captures* caps,
                             _Search search):
    """The node's `/**` or `{rest...}` rules, capturing path[start:end]."""
    if caps.count >= MAX_CAPTURES:
        return False
    caps.start[caps.count] = start
    caps.end[caps.count] = end
    caps.count += 1
    cdef bint stop = search.offer(node.tail_rules, caps)
    caps.count -= 1
    return stop


cdef PathRule _match_table(HostTable table, const char* path, Py_ssize_t n,
                           unsigned long long method_bit, Captures* caps, bint use_priorities):
    cdef _Search search = _search
    cdef PathRule found
    search.method_bit = method_bit
    search.first_only = not use_priorities
    search.best = None
    caps.count = 0
    # "/" is the root itself, not an empty segment under it
    _walk(table.root, path, 0, 0 if n == 1 else n, caps, search)
    found = search.best
    search.best = None
    if found is not None:
        caps[0] = search.best_caps
    if not table.regex_rules:
        return found
    text = PyBytes_FromStringAndSize(path, n).decode("latin-1")
    for regex, rule in table.regex_rules:        # highest priority first
        if found is not None and (<PathRule>rule).route.priority <= found.route.priority:
            break                                 # a trie hit wins its priority and the ones below
        m = regex.search(text)
        if m is None:
            continue
        if (<PathRule>rule).route.methods_mask and not ((<PathRule>rule).route.methods_mask & method_bit):
            continue
        if (<PathRule>rule).route.conditions is not None and \
                not _conditions_hold((<PathRule>rule).route.conditions, search):
            continue
        caps.count = 0
        for i in range(1, min(regex.groups, MAX_CAPTURES) + 1):
            if m.start(i) >= 0:
                caps.start[caps.count] = m.start(i)
                caps.end[caps.count] = m.end(i)
            else:
                caps.start[caps.count] = caps.end[caps.count] = 0
            caps.count += 1
        return rule
    return found


cdef class Router:
    def __init__(self):
        raise TypeError("use Router.build()")

    @staticmethod
    def build(list entries, dict method_bits, profiles=()):
        """`entries`: [(PathRule, [host patterns])] in config order; `profiles`: client
        profiles [(name, conditions)] in config order."""
        cdef Router self = Router.__new__(Router)
        self.profiles = tuple(profiles)
        self.exact_hosts = {}
        self.wildcard_hosts = []
        self.any_host = HostTable()
        self.method_bits = method_bits
        self.routes = []
        wildcards = {}
        priorities = set()
        seen = set()
        for rule, hosts in entries:
            if id(rule.route) not in seen:
                seen.add(id(rule.route))
                self.routes.append(rule.route)
            priorities.add(rule.route.priority)
            if not hosts:
                self.any_host.add(rule)
            for host in hosts:
                host = host.lower()
                if host.startswith("*."):
                    table = wildcards.setdefault(host[1:].encode(), HostTable())
                else:
                    table = self.exact_hosts.setdefault(host.encode(), HostTable())
                table.add(rule)
        self.wildcard_hosts = sorted(wildcards.items(), key=lambda kv: -len(kv[0]))
        self.has_hosts = bool(self.exact_hosts or self.wildcard_hosts)
        self.use_priorities = len(priorities) > 1
        for table in [self.any_host, *self.exact_hosts.values(), *(t for _, t in self.wildcard_hosts)]:
            table.sort()
        return self

    cdef object classify(self, list headers, bytes query):
        """The request's client profile: the first whose conditions all hold, or None."""
        cdef _Search search = _search
        search.headers, search.query, search.query_params, search.profile = headers, query, None, None
        try:
            for name, conditions in self.profiles:
                if _conditions_hold(conditions, search):
                    return name
            return None
        finally:
            search.headers = search.query_params = None

    cdef PathRule match(self, bytes method, const char* host, Py_ssize_t host_len,
                        const char* path, Py_ssize_t path_len, Captures* caps,
                        list headers=None, bytes query=b"", object profile=None):
        _search.headers, _search.query, _search.query_params, _search.profile = \
            headers, query, None, profile
        try:
            return self._match(method, host, host_len, path, path_len, caps)
        finally:
            _search.headers = _search.query_params = _search.profile = None

    cdef PathRule _match(self, bytes method, const char* host, Py_ssize_t host_len,
                         const char* path, Py_ssize_t path_len, Captures* caps):
        cdef object bit = self.method_bits.get(method)
        cdef unsigned long long method_bit = (<unsigned long long>bit) if bit is not None else (1ULL << 63)
        cdef PathRule found
        cdef HostTable table
        cdef bytes host_key, suffix
        cdef Py_ssize_t colon
        if self.has_hosts and host_len > 0:
            host_key = ascii_lower(PyBytes_FromStringAndSize(host, host_len))
            table = self.exact_hosts.get(host_key)
            if table is None:
                colon = host_key.rfind(b":")
                if colon > 0 and host_key.find(b"]", colon) < 0:
                    host_key = host_key[:colon]
                    table = self.exact_hosts.get(host_key)
            if table is not None:
                found = _match_table(table, path, path_len, method_bit, caps, self.use_priorities)
                if found is not None:
                    return found
            for suffix, table in self.wildcard_hosts:
                if host_key.endswith(suffix) and len(host_key) > len(suffix):
                    found = _match_table(table, path, path_len, method_bit, caps, self.use_priorities)
                    if found is not None:
                        return found
        return _match_table(self.any_host, path, path_len, method_bit, caps, self.use_priorities)

    def lookup(self, method, host, path, headers=None, query=b"", profile=None):
        """Python entry point (CLI, tests, benchmarks): -> (PathRule, {name: value}) or None.
        `headers`: {name: value} or [name, value, ...] (str or bytes); `query`: "?a=1"; the
        profile is classified from the headers and query unless given. Host and path are
        matched as given: the data plane makes them canonical first (fastgw._core.uri)."""
        cdef Captures caps
        cdef bytes bpath = path.encode() if isinstance(path, str) else path
        cdef bytes bhost = (host.encode() if isinstance(host, str) else host) or b""
        cdef bytes bmethod = method.encode() if isinstance(method, str) else method
        cdef list hlist = _header_list(headers)
        cdef bytes bquery = query.encode() if isinstance(query, str) else query
        if profile is None and self.profiles:
            profile = self.classify(hlist, bquery)
        rule = self.match(bmethod, bhost, len(bhost), bpath, len(bpath), &caps, hlist, bquery, profile)
        if rule is None:
            return None
        return rule, (<PathRule>rule).params(bpath, &caps)

    def classify_request(self, headers=None, query=b""):
        """Python entry point for `classify`."""
        return self.classify(_header_list(headers), query.encode() if isinstance(query, str) else query)

    def upstream_path(self, method, host, path):
        """The rewritten path a request would be sent upstream with (without query)."""
        cdef Captures caps
        cdef bytes bpath = path.encode()
        cdef bytes bhost = host.encode() if host else b""
        cdef WriteBuffer buf = WriteBuffer()
        rule = self.match(method.encode(), bhost, len(bhost), bpath, len(bpath), &caps)
        if rule is None:
            return None
        (<PathRule>rule).write_path(buf, bpath, len(bpath), &caps)
        return buf.take().decode("latin-1")


def _header_list(headers):
    if not headers:
        return []
    items = headers.items() if isinstance(headers, dict) else zip(headers[::2], headers[1::2])
    out = []
    for name, value in items:
        out.append(name.encode("latin-1") if isinstance(name, str) else name)
        out.append(value.encode("latin-1") if isinstance(value, str) else value)
    return out


# Route kinds for Python callers (compile.py); Cython code uses the enum.
ROUTE_PROXY_KIND = ROUTE_PROXY
ROUTE_RESPOND_KIND = ROUTE_RESPOND
ROUTE_ECHO_KIND = ROUTE_ECHO
ROUTE_HANDLER_KIND = ROUTE_HANDLER
