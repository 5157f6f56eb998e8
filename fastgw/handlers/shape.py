"""JSON reshaping by dotted field paths: `allow` keeps only the named fields, `deny` removes fields,
`rename` gives a field a new name in place. Used by client profiles (`routes[].profiles`, for
proxied and aggregated answers alike) and by each aggregation backend's filters.

A path walks objects by key; where it meets a list, it applies to every element, so
`items.name` keeps the name of each item. `allow: [price]` keeps the whole `price` subtree.
"""
from __future__ import annotations

from typing import Any

import msgspec

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


def _tree(paths: list[str]) -> dict:
    """["a.b", "a.c", "d"] -> {"a": {"b": {}, "c": {}}, "d": {}}; {} at a leaf means "all of it"."""
    tree: dict = {}
    for path in paths:
        node = tree
        parts = path.split(".")
        for i, part in enumerate(parts):
            if node.get(part) == {} and part in node and i < len(parts) - 1:
                break                                   # an ancestor is kept whole already
            node = node.setdefault(part, {})
        else:
            node.clear()                                # a shorter path wins: keep all below
    return tree


def _keep(value: Any, tree: dict) -> Any:
    if not tree:
        return value
    if isinstance(value, list):
        return [_keep(v, tree) for v in value]
    if isinstance(value, dict):
        return {k: _keep(v, tree[k]) for k, v in value.items() if k in tree}
    return value                                        # a scalar where an object was expected


def _drop(value: Any, tree: dict) -> Any:
    if isinstance(value, list):
        return [_drop(v, tree) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for k, v in value.items():
        sub = tree.get(k)
        if sub is None:
            out[k] = v
        elif sub:
            out[k] = _drop(v, sub)
        # sub == {}: the field itself is denied
    return out


def _rename(value: Any, parts: list[str], new: str) -> None:
    if isinstance(value, list):
        for v in value:
            _rename(v, parts, new)
    elif isinstance(value, dict):
        if len(parts) == 1:
            if parts[0] in value:
                value[new] = value.pop(parts[0])
        elif parts[0] in value:
            _rename(value[parts[0]], parts[1:], new)


class Shape:
    """One compiled allow/deny/rename set."""

    def __init__(self, allow: list[str] = (), deny: list[str] = (), rename: dict[str, str] | None = None):
        for path in [*allow, *deny, *(rename or {})]:
            if not path or any(not part for part in path.split(".")):
                raise ValueError(f"invalid field path {path!r}")
        for new in (rename or {}).values():
            if not new or "." in new:
                raise ValueError(f"rename target {new!r} must be a plain field name")
        self.allow = _tree(list(allow)) if allow else None
        self.deny = _tree(list(deny)) if deny else None
        self.rename = [(old.split("."), new) for old, new in (rename or {}).items()]

    def apply(self, value: Any) -> Any:
        """The reshaped value (a new object; `value` may be changed by renames)."""
        if self.allow is not None:
            value = _keep(value, self.allow)
        if self.deny is not None:
            value = _drop(value, self.deny)
        for parts, new in self.rename:
            _rename(value, parts, new)
        return value

    def apply_json(self, body: bytes) -> bytes:
        """JSON in, JSON out; ValueError when `body` is not JSON."""
        try:
            value = _decode(body)
        except msgspec.DecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        return _encode(self.apply(value))
