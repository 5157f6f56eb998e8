"""The change log: one line in the gateway's log per applied admin change, naming the entity and
what changed in it, e.g. `admin: PATCH service users: targets[1].weight 1 -> 5`.

Values are shown as the admin API shows them (fastgw/config/store.py, redact): a changed secret
reads `<redacted> -> <redacted>`, so the log never holds one. Lists of objects with a `name` or an
`address` (routes, consumers, targets) are compared by that identity, so removing one item is one
change, not a shift of every item after it.
"""
from __future__ import annotations

import json

from fastgw.config.store import redact

MAX_CHANGES = 5             # a line stays a line: the rest is counted ("+3 more")
MAX_VALUE = 120             # characters of one shown value
_ABSENT = object()


def entity(document: dict, kind: str, name: str):
    """The object `kind`/`name` in `document` (None when it has none)."""
    items = document.get(kind)
    if kind == "services":
        return items.get(name) if isinstance(items, dict) else None
    if isinstance(items, list):
        return next((i for i in items if isinstance(i, dict) and i.get("name") == name), None)
    return None


def describe(old, new) -> str:
    """What changed from `old` to `new` (None: the entity did not exist), in a few words."""
    if old is None:
        return "added " + _show(redact(new))
    if new is None:
        return "removed"
    changes = list(_changes(old, new, redact(old), redact(new), ""))
    shown = ", ".join(changes[:MAX_CHANGES]) or "no change"
    shown += f", +{len(changes) - MAX_CHANGES} more" if len(changes) > MAX_CHANGES else ""
    # Key names come from the request: a line break in one must not start a forged log line.
    return shown.replace("\r", "\\r").replace("\n", "\\n")


def _changes(old, new, shown_old, shown_new, path: str):
    """Leaf changes as text; `shown_*` are the redacted twins of `old`/`new`, walked alongside."""
    if old == new:
        return
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:
            yield from _changes(old.get(key, _ABSENT), new.get(key, _ABSENT), shown_old.get(key, _ABSENT),
                                shown_new.get(key, _ABSENT), f"{path}.{key}" if path else str(key))
    elif isinstance(old, list) and isinstance(new, list):
        yield from _list_changes(old, new, shown_old, shown_new, path)
    else:                                               # a key not written reads `unset`
        yield f"{path} {_show(shown_old)} -> {_show(shown_new)}"


def _list_changes(old: list, new: list, shown_old: list, shown_new: list, path: str):
    old_ids, new_ids = _identities(old), _identities(new)
    if old_ids is None or new_ids is None:              # plain values: compared by position
        pairs = [(i, i) for i in range(min(len(old), len(new)))]
        removed, added = range(len(new), len(old)), range(len(old), len(new))
    else:
        where, kept = {ident: i for i, ident in enumerate(old_ids)}, set(new_ids)
        pairs = [(where[ident], j) for j, ident in enumerate(new_ids) if ident in where]
        removed = [i for i, ident in enumerate(old_ids) if ident not in kept]
        added = [j for j, ident in enumerate(new_ids) if ident not in where]
    for i, j in pairs:
        yield from _changes(old[i], new[j], shown_old[i], shown_new[j], f"{path}[{j}]")
    for i in removed:
        yield f"{path}[{i}] removed"
    for j in added:
        yield f"{path}[{j}] added {_show(shown_new[j])}"


def _identities(items: list) -> list[str] | None:
    """The `name` (or else `address`) of every item, when each has a distinct one."""
    for key in ("name", "address"):
        ids = [str(i[key]) if isinstance(i, dict) and key in i else None for i in items]
        if items and None not in ids and len(set(ids)) == len(ids):
            return ids
    return None


def _show(value) -> str:
    if value is _ABSENT:
        return "unset"
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    return text if len(text) <= MAX_VALUE else text[:MAX_VALUE - 1] + "…"
