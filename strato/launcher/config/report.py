"""Where a config problem is and how it reads: key paths with file lines (YAML parsed
with each key's line), the report that collects errors, warnings and notes, and the
words used for values and pydantic errors."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import yaml

from strato.exceptions import ConfigError
from strato.providers import PROVIDER_TYPES

KeyPath = tuple[str | int, ...]
_PLAIN_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class Report:
    """Collects errors and warnings, each placed at a key path and its file line."""

    def __init__(self, source: str, lines: dict[KeyPath, int] | None):
        self.source = source
        self.lines = lines
        self.errors: list[tuple[int, str]] = []
        self.warnings: list[tuple[int, str]] = []
        self.notes: list[tuple[int, str]] = []
        self._seen: set[str] = set()

    def _line(self, path: KeyPath) -> int | None:
        if self.lines is None:
            return None
        for n in range(len(path), 0, -1):  # a missing key: point at its parent
            line = self.lines.get(path[:n])
            if line is not None:
                return line
        return 1

    def _format(self, path: KeyPath, msg: str) -> tuple[int, str]:
        line = self._line(path)
        where = self.source if line is None else f"{self.source}:{line}"
        return (line or 0, f"{where}: {format_path(path)}: {msg}")

    def error(self, path: KeyPath, msg: str) -> None:
        item = self._format(path, msg)
        if item[1] not in self._seen:  # semantic and type checks may say the same thing
            self._seen.add(item[1])
            self.errors.append(item)

    def warn(self, path: KeyPath, msg: str) -> None:
        self.warnings.append(self._format(path, msg))

    def note(self, path: KeyPath, msg: str) -> None:
        self.notes.append(self._format(path, msg))

    def alias(self, new: KeyPath, old: KeyPath) -> None:
        """Lines of the keys at ``old`` (and below) also for ``new`` (translated keys)."""
        if self.lines is None:
            return
        for path, line in list(self.lines.items()):
            if path[:len(old)] == old:
                self.lines.setdefault((*new, *path[len(old):]), line)

    @staticmethod
    def sorted(items: list[tuple[int, str]]) -> list[str]:
        return [text for _, text in sorted(items, key=lambda it: it[0])]

    def config_error(self) -> ConfigError:
        problems = self.sorted(self.errors)
        err = ConfigError("\n".join(problems))
        err.problems = problems  # type: ignore[attr-defined]
        return err


# ---------------------------------------------------------------- YAML with lines
class _LineLoader(yaml.SafeLoader):
    """SafeLoader; we compose the node tree first to read each key's line."""


def parse_yaml(text: str) -> tuple[Any, dict[KeyPath, int], list[tuple[KeyPath, str]]]:
    """Parse ``text``; return the data, a key path -> line table, and problems."""
    lines: dict[KeyPath, int] = {}
    problems: list[tuple[KeyPath, str]] = []
    loader = _LineLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, lines, problems
        _record_lines(node, (), lines, problems)  # before construct: merges mutate nodes
        return loader.construct_document(node), lines, problems
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        if mark is not None:
            lines[("<yaml>",)] = mark.line + 1
        what = " ".join(str(s) for s in (e.context, e.problem) if s)
        problems.append((("<yaml>",), f"YAML syntax error: {what}"))
        return None, lines, problems
    except yaml.YAMLError as e:
        problems.append((("<yaml>",), f"YAML error: {e}"))
        return None, lines, problems
    finally:
        loader.dispose()


def _record_lines(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int],
                  problems: list[tuple[KeyPath, str]], *, merged: bool = False) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        merges: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                merges.append(value_node)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key = key_node.value
            sub = (*path, key)
            if key in seen and not merged:
                lines[sub] = key_node.start_mark.line + 1
                problems.append((sub, "duplicate key; the later value would silently win"))
            seen.add(key)
            if merged:
                lines.setdefault(sub, key_node.start_mark.line + 1)
            else:
                lines[sub] = key_node.start_mark.line + 1
            _record_lines(value_node, sub, lines, problems, merged=merged)
        for m in merges:  # explicit keys win over keys merged in with <<
            for mapping in (m.value if isinstance(m, yaml.SequenceNode) else [m]):
                _record_lines(mapping, path, lines, problems, merged=True)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            if merged:
                lines.setdefault((*path, i), item.start_mark.line + 1)
            else:
                lines[(*path, i)] = item.start_mark.line + 1
            _record_lines(item, (*path, i), lines, problems, merged=merged)


# ---------------------------------------------------------------- wording
def pydantic_message(err: Mapping[str, Any]) -> str:
    """Turn a pydantic error into words a YAML author knows."""
    kind, value, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    got = f" (got {describe(value)})"
    if kind == "missing":
        if tuple(err["loc"]) == ("provider", "type"):
            return f"required key missing; one of {', '.join(PROVIDER_TYPES)}"
        return "required key missing"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a mapping{got}"
    if kind == "list_type":
        return f"expected a list{got}"
    if kind.startswith("int_"):
        return f"expected an integer{got}"
    if kind.startswith("float_"):
        return f"expected a number{got}"
    if kind.startswith("bool_"):
        return f"expected true or false{got}"
    if kind.startswith("string_"):
        return f"expected a string{got}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=",
              "less_than": "<"}[kind]
        bound = next(iter(ctx.values()), "?")
        bound = f"{bound:g}" if isinstance(bound, int | float) else bound
        return f"must be {op} {bound}{got}"
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{msg}{got}"


def format_path(path: KeyPath) -> str:
    if path == ("<yaml>",):
        return "(yaml)"
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY_RE.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out or "(top level)"


def describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


