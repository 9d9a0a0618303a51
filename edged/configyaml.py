"""The config file as YAML: a bounded composer, and the node tree turned into the config's dataclasses.

BoundedLoader refuses anchors and aliases and caps nesting and node count
while PyYAML composes; Loader walks the node tree against the dataclasses
of edged.config (it reads their field metadata: choices, bounds, paths),
collecting every error with its file, line and dotted key.
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from edged import userfiles
from edged.errors import ConfigError

MAX_DEPTH = 32       # the schema is 4 levels deep (accelerator.coral.options.KEY)
MAX_NODES = 20_000   # the shipped config has ~100


class Refused(yaml.YAMLError, ConfigError):
    """YAML that is well-formed but not accepted in a config (aliases, too deep, too many nodes); it is
    raised inside PyYAML's composer, so it is a YAMLError to it, and a ConfigError to us."""

    def __init__(self, mark: yaml.Mark, problem: str) -> None:
        super().__init__(problem)
        self.problem_mark = mark
        self.problem = problem


class BoundedLoader(yaml.SafeLoader):
    """PyYAML's composer, refusing anchors and aliases and capping depth and node count.

    Composing recurses once per nesting level (2,000 levels were a RecursionError) and an
    alias makes one node appear many times in the tree (a 1 KiB alias bomb took the
    supervisor to 979 MiB): both are refused at the first event that would go too far.
    """

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise Refused(event.start_mark, f"YAML aliases (*{event.anchor}) are not allowed in an edged config")  # type: ignore[arg-type]
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise Refused(event.start_mark, f"YAML anchors (&{anchor}) are not allowed in an edged config")
        self._nodes += 1
        if self._nodes > MAX_NODES:
            raise Refused(event.start_mark, f"more than {MAX_NODES} values in one config")
        if self._depth >= MAX_DEPTH:
            raise Refused(event.start_mark, f"nested deeper than {MAX_DEPTH} levels")
        self._depth += 1
        try:
            node = super().compose_node(parent, index)  # type: ignore[arg-type]  # PyYAML's stubs say int
            assert node is not None  # an event was peeked: there is a node
            return node
        finally:
            self._depth -= 1


class Loader:
    """Turns a YAML node tree into dataclasses, collecting every error."""

    def __init__(self, fname: str, base: Path, builtin_kinds: tuple[str, ...] = ()) -> None:
        self.fname = fname
        self.base = base
        self.builtin_kinds = builtin_kinds
        self.errors: list[str] = []
        self.lines: dict[str, int] = {}  # dotted key -> line of its value, for checks across keys

    def err(self, node: yaml.Node | None, key: str, msg: str) -> None:
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        self.err_at(line, key, msg)

    def err_at(self, line: str, key: str, msg: str) -> None:
        shown = key if key.isprintable() else repr(key)
        self.errors.append(" ".join(f"{self.fname}{line} {shown}: {msg}".split()))

    def where(self, key: str) -> str:
        """':LINE' of a key's value, '' when the key is not in the file (a default)."""
        return f":{self.lines[key]}" if key in self.lines else ""

    def build(self, cls: type, node: yaml.Node | None, key: str) -> Any:
        if node is None or (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")):
            return cls()
        if not isinstance(node, yaml.MappingNode):
            self.err(node, key or "(top level)", "must be a mapping")
            return cls()
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
        values: dict[str, Any] = {}
        for knode, vnode in node.value:
            name = str(knode.value)
            dotted = f"{key}.{name}" if key else name
            if name not in fields:
                self.err(knode, dotted, f"unknown key (known: {', '.join(fields)})")
                continue
            values[name] = self.value(hints[name], fields[name], vnode, dotted)
        if key == "accelerator":  # its prefer list may name the delegates defined beside it
            self.check_prefer(node, values, key)
        try:
            return cls(**{k: v for k, v in values.items() if v is not _BAD})
        except TypeError as exc:  # pragma: no cover - fields are all defaulted
            self.err(node, key, str(exc))
            return cls()

    def check_prefer(self, node: yaml.MappingNode, values: dict[str, Any], key: str) -> None:
        """accelerator.prefer names built-in kinds or names of accelerator.delegates."""
        delegates = values.get("delegates")
        known = (*self.builtin_kinds, *(delegates if isinstance(delegates, dict) else ()))
        for knode, vnode in node.value:
            if str(knode.value) != "prefer" or not isinstance(vnode, yaml.SequenceNode):
                continue
            for i, item in enumerate(vnode.value):
                if isinstance(item, yaml.ScalarNode) and item.value not in known:
                    self.err(item, f"{key}.prefer[{i}]", f"must be one of {', '.join(known)}, got {item.value!r}")
                    values["prefer"] = _BAD

    def value(self, hint: Any, f: dataclasses.Field, node: yaml.Node, key: str) -> Any:
        self.lines[key] = node.start_mark.line + 1
        optional = False
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            optional, hint = True, args[0]
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
            if optional:
                return None
            if dataclasses.is_dataclass(hint):
                return typing.cast(type, hint)()  # a section whose keys are all commented out: its defaults
            self.err(node, key, "must not be empty")
            return _BAD
        if dataclasses.is_dataclass(hint):
            return self.build(typing.cast(type, hint), node, key)
        meta = {"choices": (), "lo": None, "hi": None, "path": False, "regular": False, **f.metadata}
        origin = typing.get_origin(hint)
        if origin is tuple:
            if not isinstance(node, yaml.SequenceNode):
                self.err(node, key, "must be a list")
                return _BAD
            items = [self.scalar(str, meta, n, f"{key}[{i}]") for i, n in enumerate(node.value)]
            return _BAD if _BAD in items else tuple(items)
        if origin is dict:
            if not isinstance(node, yaml.MappingNode):
                self.err(node, key, "must be a mapping")
                return _BAD
            item = typing.get_args(hint)[1]
            if dataclasses.is_dataclass(item):  # NAME: {section}
                return {str(k.value): self.build(typing.cast(type, item), v, f"{key}.{k.value}") for k, v in node.value}
            nested = [n for pair in node.value for n in pair if not isinstance(n, yaml.ScalarNode)]
            if nested:
                self.err(nested[0], key, "keys and values must be plain scalars (they are passed on as strings)")
                return _BAD
            return {str(k.value): str(v.value) for k, v in node.value}
        return self.scalar(hint, meta, node, key)

    def scalar(self, hint: type, meta: typing.Mapping[str, Any], node: yaml.Node, key: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            self.err(node, key, f"must be {_NAMES[hint]}")
            return _BAD
        try:
            raw: Any = yaml.constructor.SafeConstructor().construct_object(node)
        except (yaml.YAMLError, ValueError, TypeError, KeyError, AttributeError):
            self.err(node, key, f"cannot read {node.value!r} (tag {node.tag})")
            return _BAD
        if hint is float and isinstance(raw, int) and not isinstance(raw, bool):
            raw = float(raw)
        if hint is str and isinstance(raw, (int, float)) and not isinstance(raw, bool) and not meta["choices"]:
            raw = str(node.value)
        if not isinstance(raw, hint) or (hint is int and isinstance(raw, bool)):
            self.err(node, key, f"must be {_NAMES[hint]}, got {node.value!r}")
            return _BAD
        if meta["choices"] and raw not in meta["choices"]:
            self.err(node, key, f"must be one of {', '.join(map(str, meta['choices']))}, got {raw!r}")
            return _BAD
        return self.checked(typing.cast(Any, raw), hint, meta, node, key)

    def checked(self, raw: Any, hint: type, meta: typing.Mapping[str, Any], node: yaml.Node, key: str) -> Any:
        """A value of the right type, checked against its field's range and, for paths, resolved."""
        if hint is float and not math.isfinite(raw):  # NaN passes every comparison; inf overflows sleeps
            self.err(node, key, f"must be a finite number, got {node.value!r}")
            return _BAD
        if meta["lo"] is not None and raw < meta["lo"]:
            self.err(node, key, f"must be >= {meta['lo']}, got {raw!r}")
            return _BAD
        hi = meta["hi"] if meta["hi"] is not None else _HI.get(hint)
        if hi is not None and raw > hi:
            self.err(node, key, f"must be <= {hi:g}, got {raw!r}" if hint is float else f"must be <= {hi}, got {raw!r}")
            return _BAD
        if meta["path"] and raw:
            try:
                raw = str((self.base / os.path.expanduser(raw)).resolve())
            except (ValueError, OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python < 3.13)
                self.err(node, key, f"not a usable path ({exc})")
                return _BAD
            why = userfiles.not_regular(raw) if meta["regular"] else None
            if why:
                self.err(node, key, why)
                return _BAD
        return raw


_BAD = object()
_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
_HI: dict[type, float] = {int: 2**31 - 1, float: 1e9}
