"""Where a config problem is and how it reads: key paths with file lines (YAML parsed
with each key's line), the report that collects errors, warnings and notes, and the
words used for values and pydantic errors."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import yaml
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.parser import ParserError
from yaml.scanner import ScannerError

from strato.exceptions import ConfigError
from strato.providers import PROVIDER_TYPES

KeyPath = tuple[Any, ...]  # keys (str, or whatever YAML made of them) and list indexes
_PLAIN_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")

# Bounds on what a cluster YAML may be (real ones are a few KB, a few hundred values,
# a dozen levels deep): beyond them the file is refused, quickly, instead of parsed.
MAX_DEPTH = 100  # levels of nesting as written
MAX_VALUES = 20_000  # values (scalars, lists, mappings) as written
MAX_EXPANDED = 100_000  # values once aliases and merge keys (<<) are expanded


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
def _construct_undefined(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if node.tag.startswith("tag:yaml.org,2002:python/"):
        tag = "!!" + node.tag.removeprefix("tag:yaml.org,2002:")
        raise ConstructorError(None, None, f"the tag {tag} is refused: it would build a "
                               "Python object, and a cluster config is plain data",
                               node.start_mark)
    raise ConstructorError(None, None, f"unknown tag {node.tag!r}", node.start_mark)


_TAG_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false",
              "timestamp": "a date (YYYY-MM-DD) or a time", "binary": "base64 data",
              "null": "null"}


class _LineLoader(yaml.SafeLoader):
    """SafeLoader; we compose the node tree first to read each key's line. It refuses
    documents nested deeper than ``MAX_DEPTH`` or with more than ``MAX_VALUES`` values
    while composing (before either costs time or recursion), Python tags with a reason,
    and turns a scalar its constructor cannot build into an error at its line."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0
        self._values = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        self._values += 1
        if self._values > MAX_VALUES:
            raise ComposerError(None, None, f"more than {MAX_VALUES} values; a cluster "
                                "config has a few hundred", self.peek_event().start_mark)
        if self._depth >= MAX_DEPTH:
            raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels",
                                self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, IndexError,
                OverflowError) as e:  # what PyYAML's scalar constructors raise on bad text
            raise ConstructorError(None, None, _unbuildable(node, e), node.start_mark) \
                from None


_LineLoader.add_constructor(None, _construct_undefined)


def _unbuildable(node: yaml.Node, e: Exception) -> str:
    kind = node.tag.rsplit(":", 1)[-1]
    value = node.value if isinstance(node.value, str) else None
    what = f"cannot read {describe(value)}" if value is not None else "cannot read this"
    reason = ""
    if value is not None and "digits" in str(e):
        reason = f" ({len(value)} characters; numbers here have at most 4300 digits)"
    elif kind == "timestamp" and isinstance(e, ValueError):
        reason = f" ({e})"
    return f"{what} as {_TAG_WORDS.get(kind, kind)}{reason}"


def parse_yaml(text: str) -> tuple[Any, dict[KeyPath, int], list[tuple[KeyPath, str]]]:
    """Parse ``text``; return the data, a key path -> line table, and problems.

    Problems are YAML errors at ``("<yaml>",)``, with the line in the table and the
    column in the message; the data is then None."""
    lines: dict[KeyPath, int] = {}
    problems: list[tuple[KeyPath, str]] = []
    where = ("<yaml>",)
    loader = None
    try:
        loader = _LineLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None, lines, problems
        _record_lines(node, (), lines, problems, _Walk())  # before construct: merges
        return loader.construct_document(node), lines, problems  # mutate nodes
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        lines[where] = mark.line + 1 if mark is not None else 1
        problems.append((where, _yaml_message(e)))
    except yaml.reader.ReaderError as e:  # a character YAML does not allow
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        lines[where] = line
        problems.append((where, f"YAML error, column {column}: character "
                                f"#x{e.character:04x} is not allowed in YAML ({e.reason})"))
    except yaml.YAMLError as e:
        problems.append((where, "YAML error: " + _one_line(str(e))))
    except RecursionError:  # bounded above; a last guard, never a traceback
        problems.append((where, "YAML error: the document is nested too deeply"))
    finally:
        if loader is not None:
            loader.dispose()
    return None, lines, problems


def _yaml_message(e: yaml.MarkedYAMLError) -> str:
    """``YAML syntax error, column 3: <problem> (<context> at line L, column C)``."""
    syntax = isinstance(e, ScannerError | ParserError)
    text = "YAML syntax error" if syntax else "YAML error"
    problem = (e.problem or e.context or "invalid YAML").removeprefix("but ")
    context = e.context if e.problem else None
    if "'\\t'" in problem:
        problem += "; YAML indents with spaces, not tabs"
    mark = e.problem_mark or e.context_mark
    if mark is not None:
        text += f", column {mark.column + 1}"
    text += f": {_one_line(problem)}"
    if context:
        cmark = e.context_mark
        at = f" at line {cmark.line + 1}, column {cmark.column + 1}" \
            if cmark is not None and cmark is not mark else ""
        text += f" ({_one_line(context)}{at})"
    return text


def _one_line(text: str) -> str:
    return " ".join(text.split())


class _Walk:
    """What ``_record_lines`` has seen: values visited (aliases count each time they are
    used) and the nodes on the current path (a node inside itself is a cycle)."""

    def __init__(self) -> None:
        self.visits = 0
        self.open: set[int] = set()


def _record_lines(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int],
                  problems: list[tuple[KeyPath, str]], walk: _Walk, *,
                  merged: bool = False, level: int = 0) -> None:
    """Each key's line, and the duplicate keys; refuses alias bombs (more than
    ``MAX_EXPANDED`` values expanded), recursive aliases and nesting past twice
    ``MAX_DEPTH`` through aliases, so nothing later walks such a structure."""
    walk.visits += 1
    if walk.visits > MAX_EXPANDED:
        raise ComposerError(None, None, f"more than {MAX_EXPANDED} values once aliases "
                            "are expanded (an alias bomb?)", node.start_mark)
    if level > 2 * MAX_DEPTH:
        raise ComposerError(None, None, f"nested deeper than {2 * MAX_DEPTH} levels once "
                            "aliases are expanded", node.start_mark)
    if not isinstance(node, yaml.MappingNode | yaml.SequenceNode):
        return
    if id(node) in walk.open:
        raise ComposerError(None, None, "this value contains itself (through an alias)",
                            node.start_mark)
    walk.open.add(id(node))
    try:
        _record_children(node, path, lines, problems, walk, merged, level + 1)
    finally:
        walk.open.discard(id(node))


def _record_children(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int],
                     problems: list[tuple[KeyPath, str]], walk: _Walk, merged: bool,
                     level: int) -> None:
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
            _record_lines(value_node, sub, lines, problems, walk, merged=merged, level=level)
        for m in merges:  # explicit keys win over keys merged in with <<
            for mapping in (m.value if isinstance(m, yaml.SequenceNode) else [m]):
                _record_lines(mapping, path, lines, problems, walk, merged=True, level=level)
    else:
        for i, item in enumerate(node.value):
            if merged:
                lines.setdefault((*path, i), item.start_mark.line + 1)
            else:
                lines[(*path, i)] = item.start_mark.line + 1
            _record_lines(item, (*path, i), lines, problems, walk, merged=merged, level=level)


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
    if kind == "finite_number":
        return f"expected a finite number{got}"
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
    """``available_node_types.gpu.resources``, ``setup_commands[2]``, ``["odd key"]``."""
    if path == ("<yaml>",):
        return "(yaml)"
    out = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        elif isinstance(part, str) and _PLAIN_KEY_RE.match(part) and len(part) <= 64:
            out += f".{part}" if out else part
        elif isinstance(part, str):
            out += f"[{json.dumps(part if len(part) <= 40 else part[:37] + '...')}]"
        else:  # a key YAML made a number, null, a date...
            out += f"[{describe(part)}]"
    return out or "(top level)"


def describe(value: Any) -> str:
    """A value as a message shows it: short, whatever its size."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, set | frozenset):
        return "a set"
    if isinstance(value, int) and value.bit_length() > 128:
        return f"an integer of {int(value.bit_length() * 0.30103)}+ digits"
    text = repr(value[:41] if isinstance(value, str | bytes) else value)
    return text if len(text) <= 40 else text[:37] + "..."


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
