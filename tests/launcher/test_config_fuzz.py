"""Fuzzing the cluster-YAML loader (what `strato up FILE` reads): malformed YAML, wrong
types at every key of the examples, huge values, alias bombs, Python tags and seeded
random mutations. Each case either loads into a usable config or raises ``ConfigError``
whose every line says ``FILE[:LINE]: where: what`` (the key path, or the line and column
of a YAML syntax error); never any other exception, never a traceback, never minutes."""

from __future__ import annotations

import copy
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from strato.cli.main import cli
from strato.exceptions import ConfigError
from strato.launcher.config import (
    ClusterConfig,
    ProviderConfig,
    load_config,
    load_config_from_dict,
)
from strato.launcher.config.report import format_path

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = [REPO / "cluster.example.yaml", *sorted((REPO / "examples/clusters").glob("*.yaml"))]
SEED = 20240607
RANDOM_CASES = 300
SLOW = 2.0  # seconds: no single case may take longer (alias bombs, huge files)

# The wrong values every key gets in turn.
WRONG_VALUES: list[tuple[str, Any]] = [
    ("list", ["fuzz", 1]), ("dict", {"fuzz": 1}), ("string", "fuzz"), ("negative", -7),
    ("huge", 10**100), ("float", 2.5), ("null", None), ("bool", True),
]

VALID = """\
cluster_name: fuzz
provider:
  type: local
available_node_types:
  head:
    resources: {CPU: 1}
head_node_type: head
"""


# ---------------------------------------------------------------- the oracle
def _problem_lines(err: ConfigError) -> list[str]:
    return str(err).splitlines()


def check(path: Path, *, names: tuple[Any, ...] | None = None) -> ClusterConfig | ConfigError:
    """Load ``path``: a usable config, or a ``ConfigError`` whose lines all read
    ``FILE[:LINE]: ...`` (any other exception propagates and fails the test)."""
    start = time.monotonic()
    try:
        config = load_config(path)
    except ConfigError as err:
        took = time.monotonic() - start
        assert took < SLOW, f"{path.name}: {took:.1f}s to refuse"
        lines = _problem_lines(err)
        assert lines, "an empty ConfigError"
        for line in lines:
            assert line.startswith(f"{path}:"), line[:300]
            assert len(line) < 1000, f"an unreadable line of {len(line)} chars: {line[:200]}"
            assert "Traceback" not in line and "<unicode string>" not in line, line
        if names is not None:
            assert names_path(str(err), names), f"no line names {format_path(names)}:\n{err}"
        return err
    took = time.monotonic() - start
    assert took < SLOW, f"{path.name}: {took:.1f}s to load"
    use(config)
    return config


def use(config: ClusterConfig) -> None:
    """What the launcher derives from a config right away must work on a loaded one."""
    config.to_dict()
    for name in config.available_node_types:
        config.node_type_spec(name)
        config.launch_hash(name)
        config.worker_setup(name)
        config.runtime_python_for(name)
    config.head_setup()
    config.copy_filter()


def names_path(message: str, path: tuple[Any, ...]) -> bool:
    """Some line of ``message`` is about ``path`` or its parent, or names it."""
    for n in (len(path), len(path) - 1):
        where = re.escape(format_path(path[:n]))
        if n and re.search(rf"(: {where}[:.\[])|( {where}\b)", message):
            return True
    return False


def yaml_error_at(err: ConfigError | ClusterConfig, line: int | None = None) -> str:
    """The single ``(yaml)`` problem of ``err``, checked to carry its line and column."""
    assert isinstance(err, ConfigError), "loaded although the YAML is broken"
    (problem,) = _problem_lines(err)
    m = re.match(r".*?:(\d+): \(yaml\): (.*)$", problem)
    assert m, problem
    if line is not None:
        assert int(m.group(1)) == line, problem
    return m.group(2)


@pytest.fixture
def load(tmp_path: Path):
    counter = iter(range(10**6))

    def load(content: str | bytes, **kw: Any) -> ClusterConfig | ConfigError:
        path = tmp_path / f"case{next(counter)}.yaml"
        if isinstance(content, str):
            content = content.encode()
        path.write_bytes(content)
        return check(path, **kw)
    return load


# ---------------------------------------------------------------- malformed YAML
SYNTAX = {
    "bad_indent": ("provider:\n  type: local\n    region: x\n", 3),
    "dedent_in_block": ("available_node_types:\n    head:\n      a: 1\n  b: 2\n", 4),
    "tab_indent": ("provider:\n\ttype: local\n", 2),
    "tab_after_value": ("provider:\n  type: local\n  region: a\t\n\tb: c\n", 3),
    "unclosed_double_quote": ('cluster_name: "abc\nprovider:\n  type: local\n', 4),
    "unclosed_single_quote": ("cluster_name: 'abc\nprovider: {type: local}\n", 3),
    "unclosed_bracket": ("setup_commands: [a, b\nprovider: {type: local}\n", 2),
    "unclosed_brace": ("provider: {type: local\n", 2),
    "stray_colon": ("cluster_name: a: b\n", 1),
    "stray_close": ("setup_commands: a]\nx: ]\n", None),
    "undefined_alias": ("provider: *nope\n", 1),
    "duplicate_anchor_use": ("a: &x 1\nb: *y\n", 2),
    "two_documents": ("cluster_name: a\n---\ncluster_name: b\n", 2),
    "directive_only": ("%YAML 1.1\n", None),
    "bad_escape": ('cluster_name: "\\q"\n', 1),
    "long_key": ("x" * 2000 + ": 1\n", None),
    "nul_byte": ("cluster_name: a\x00b\n", 1),
    "control_chars": ("provider:\n  type: lo\x07cal\n", 2),
}


@pytest.mark.parametrize("name", sorted(SYNTAX))
def test_yaml_syntax_errors_say_line_and_column(load, name: str) -> None:
    text, line = SYNTAX[name]
    message = yaml_error_at(load(text), line)
    assert "column" in message, message
    assert "\n" not in message


@pytest.mark.parametrize("content, line", [
    (b"cluster_name: \xff\xfe\n", 1),
    (b"provider:\n  type: local\n  region: caf\xe9\n", 3),
    ("cluster_name: x\n".encode("utf-16"), 1),
    (bytes(random.Random(SEED).randrange(256) for _ in range(4096)), None),
], ids=["ff", "latin1", "utf16", "random-bytes"])
def test_binary_and_invalid_utf8_are_refused_with_a_reason(load, content: bytes,
                                                           line: int | None) -> None:
    err = load(content)
    assert isinstance(err, ConfigError)
    assert "not UTF-8" in str(err) and "column" in str(err), str(err)
    if line is not None:
        assert f":{line}: " in str(err), str(err)


def test_printable_garbage_never_escapes(load) -> None:
    rng = random.Random(SEED)
    alphabet = "ab: -[]{},&*!|>'\"%@`#?\t\n\r\\\u00e9\u2603\U0001f600"
    for _ in range(40):
        load("".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 200))))


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n", "~\n", "null\n",
                                  "--- \n...\n"])
def test_an_empty_file_says_so(load, text: str) -> None:
    err = load(text)
    assert isinstance(err, ConfigError) and "empty" in str(err), err


@pytest.mark.parametrize("text, got", [
    ("- provider\n- head\n", "a list"), ("hello\n", "'hello'"), ("42\n", "42"),
    ("true\n", "true"), ("2.5\n", "2.5"), ("!!set {a, b}\n", "set"),
])
def test_a_top_level_that_is_not_a_mapping(load, text: str, got: str) -> None:
    err = load(text)
    assert isinstance(err, ConfigError)
    assert "top level must be a mapping" in str(err) and got in str(err), err


def test_duplicate_keys_name_the_key_and_both_lines(load) -> None:
    err = load(VALID + "cluster_name: again\n")
    assert isinstance(err, ConfigError)
    assert re.search(r":8: cluster_name: duplicate key", str(err)), err
    err = load(VALID.replace("resources: {CPU: 1}", "resources: {CPU: 1, CPU: 2}"))
    assert isinstance(err, ConfigError) and "head.resources.CPU: duplicate key" in str(err)


@pytest.mark.parametrize("tag", [
    "!!python/object/apply:os.system ['touch {marker}']",
    "!!python/object/new:os.system ['touch {marker}']",
    "!!python/object:os.PathLike {{}}",
    "!!python/name:os.system",
    "!!python/module:os",
    "!!python/tuple [1, 2]",
    "!!python/str x",
])
def test_python_tags_are_refused(load, tmp_path: Path, tag: str) -> None:
    marker = tmp_path / "pwned"
    text = VALID + "setup_commands: " + tag.format(marker=marker) + "\n"
    message = yaml_error_at(load(text), 8)
    assert "python" in message and "refused" in message, message
    assert not marker.exists()


@pytest.mark.parametrize("value, words", [
    ("!!int abc", "integer"), ('!!int ""', "integer"), ("!!float abc", "number"),
    ("!!bool maybe", "true or false"), ("!!timestamp soon", "date"),
    ("2001-02-30", "date"), ("2001-13-01 10:00:00", "date"), ("!!binary 'a'", "base64"),
    ("!!str {a: 1}", "scalar"), ("!!map [1]", "mapping"), ("!unknown x", "tag"),
    ("{[a]: 1}", "unhashable"), ("{<<: 5}", "merging"), ("1" * 5000, "digits"),
], ids=lambda v: v if len(v) < 30 else f"{v[:5]}...")
def test_values_yaml_cannot_build_are_errors_with_their_line(load, value: str,
                                                             words: str) -> None:
    message = yaml_error_at(load(VALID + f"cluster_name2: {value}\n"), 8)
    assert words in message, message


# ---------------------------------------------------------------- bombs and sizes
def _laughs(levels: int, width: int = 10) -> str:
    out = ['l0: &l0 ["lol", "lol"]']
    for i in range(1, levels):
        out.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(out) + "\n"


def test_billion_laughs_is_refused_quickly(load) -> None:
    for text in (_laughs(10),  # a list: 10**9 strings once expanded
                 VALID + "provider2: {type: local, x: " + _laughs(9).replace("\n", ", ")
                 .replace("l0: ", "{l0: ").rstrip(", ") + "}}\n"):
        err = load(text)
        assert isinstance(err, ConfigError) and "alias" in str(err), err


def test_merge_key_bomb_is_refused_quickly(load) -> None:
    lines = ["m0: &m0 {a0: 1}", "m1: &m1 {<<: *m0, a1: 1}"]
    for i in range(2, 60):  # each level merges the two before: Fibonacci-sized keys
        lines.append(f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 2}], a{i}: 1}}")
    err = load("\n".join(lines) + "\n")
    assert isinstance(err, ConfigError) and "alias" in str(err), err


@pytest.mark.parametrize("text", [
    "setup_commands: &a [*a]\n",
    "provider: &p {type: local, me: *p}\n",
])
def test_a_recursive_alias_is_refused(load, text: str) -> None:
    err = load(VALID.replace("provider:\n  type: local\n", "") + text)
    assert isinstance(err, ConfigError) and "contains itself" in str(err), err


def test_legitimate_anchors_and_merges_still_load(load) -> None:
    text = """\
provider: {type: local}
head_node_type: head
_common: &common
  resources: {CPU: 2}
available_node_types:
  head: {<<: *common, max_workers: 0}
  worker: {<<: *common, min_workers: 1}
setup_commands: &cmds [echo a, echo b]
head_setup_commands: *cmds
"""
    config = load(text)
    assert isinstance(config, ConfigError)  # _common is an unknown key, said where
    assert "_common: unknown key" in str(config)
    config = load(text.replace("_common: &common\n  resources: {CPU: 2}\n", "")
                  .replace("head: {<<: *common,", "head: &common {resources: {CPU: 2},")
                  .replace("{<<: *common, min", "{<<: *common, max_workers: 2, min"))
    assert isinstance(config, ClusterConfig), config
    assert config.available_node_types["worker"].resources == {"CPU": 2}
    assert config.head_setup() == ["echo a", "echo b", "echo a", "echo b"]


@pytest.mark.parametrize("depth", [150, 10_000])
def test_deep_nesting_is_refused(load, depth: int) -> None:
    for text in (VALID + "setup_commands: " + "[" * depth + "]" * depth + "\n",
                 VALID + "provider2: " + "{a: " * depth + "1" + "}" * depth + "\n"):
        message = yaml_error_at(load(text), 8)
        assert "nested" in message, message


def test_moderate_nesting_still_loads(load) -> None:
    deep = "{a: " * 40 + "1" + "}" * 40
    config = load(VALID.replace("type: local", f"type: local\n  deep: {deep}"))
    assert isinstance(config, ClusterConfig), config


def test_a_huge_file_is_refused_before_parsing(load) -> None:
    err = load(VALID + "cluster_name2: " + "x" * (10 * 1024 * 1024) + "\n")
    assert isinstance(err, ConfigError) and "MiB" in str(err), err
    assert len(str(err)) < 500


def test_too_many_values_are_refused_quickly(load) -> None:
    err = load(VALID + "worker_setup_commands: [" + "a," * 200_000 + "a]\n")
    assert isinstance(err, ConfigError) and "values" in str(err), err


def test_big_but_sane_values_load(load) -> None:
    config = load(VALID + "setup_commands: [" + ", ".join(["echo hi"] * 2000) + "]\n"
                  + "head_setup_commands: ['" + "x" * 500_000 + "']\n")
    assert isinstance(config, ClusterConfig), config


@pytest.mark.parametrize("key, value", [
    ("cluster_name", "x" * 10_000_000), ("max_workers", 10**5000), ("cluster_name", 10**5000),
    ("upscaling_speed", float("inf")), ("idle_timeout_minutes", float("nan")),
    ("setup_commands", ["y" * 1_000_000]), ("x" * 100_000, 1),
], ids=["long-name", "huge-int", "huge-int-name", "inf", "nan", "long-command", "long-key"])
def test_huge_values_from_a_dict_read_short(key: str, value: Any) -> None:
    data = yaml.safe_load(VALID) | {key: value}
    try:
        load_config_from_dict(data, source="spec")
    except ConfigError as err:
        assert len(str(err)) < 1000, str(err)[:300]
        assert all(line.startswith("spec: ") for line in str(err).splitlines()), str(err)[:300]


@pytest.mark.parametrize("key, value", [
    ("idle_timeout_minutes", ".inf"), ("upscaling_speed", ".nan"),
    ("autoscaler", "{tick_seconds: .inf}"), ("autostop", ".inf"),
    ("autoscaler", "{tick_seconds: 1e300}"), ("max_workers", "1000000000"),
])
def test_infinite_and_absurd_durations_are_refused(load, key: str, value: str) -> None:
    load(VALID + f"{key}: {value}\n", names=(key,))


def test_unknown_keys_at_every_level(load) -> None:
    err = load(VALID.replace("type: local", "type: local\n  spot_notice2: x")
               .replace("resources:", "resourcez: 1\n    resources:")
               + "clustername: y\nauth: {ssh_usr: z}\nautoscaler: {tick: 1}\n")
    assert isinstance(err, ConfigError)
    text = str(err)
    assert "available_node_types.head.resourcez: unknown key; did you mean 'resources'" in text
    assert "clustername: unknown key; did you mean 'cluster_name'" in text
    assert "auth.ssh_usr: unknown key" in text and "autoscaler.tick: unknown key" in text


@pytest.mark.parametrize("key", ["1", "null", "1.5", "true", "2001-01-01", "[a, b]",
                                 "{a: 1}", '"x y"', "''"])
def test_odd_keys_are_named(load, key: str) -> None:
    for text in (VALID + f"? {key}\n: 1\n",
                 VALID.replace("  head:\n", f"  head:\n    ? {key}\n    : 1\n"),
                 VALID.replace("available_node_types:\n",
                               f"available_node_types:\n  ? {key}\n  : {{resources: {{}}}}\n")):
        load(text)


def test_only_plain_data_passes(load) -> None:
    err = load(VALID.replace("resources: {CPU: 1}", "resources: {CPU: 1}\n"
                             "    node_config: {a: {1: x, null: y}, b: !!binary 'aGk='}"))
    assert isinstance(err, ConfigError)
    assert "available_node_types.head.node_config.a[1]: keys must be strings" in str(err)
    assert "node_config.a[null]: keys must be strings, got null (quote it" in str(err)
    assert "available_node_types.head.node_config.b: binary data" in str(err)
    err = load(VALID + "setup_commands: !!set {echo a, echo b}\n")
    assert isinstance(err, ConfigError) and "setup_commands: a set (!!set)" in str(err), err
    err = load(VALID + "max_workers: !!int 0x" + "f" * 5000 + "\n")
    assert isinstance(err, ConfigError)
    assert "max_workers: must be <= 100000 (got an integer of 6020+ digits)" in str(err)


def test_windows_line_endings_and_a_bom_load(load) -> None:
    assert isinstance(load(VALID.replace("\n", "\r\n")), ClusterConfig)
    assert isinstance(load("\ufeff" + VALID), ClusterConfig)


# ---------------------------------------------------------------- wrong types, systematically
def _key_paths(data: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(data, dict):
        for key, value in data.items():
            yield (*path, key)
            yield from _key_paths(value, (*path, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            yield from _key_paths(value, (*path, i))


def _set(data: Any, path: tuple[Any, ...], value: Any) -> Any:
    data = copy.deepcopy(data)
    target = data
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return data


def _get(data: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        data = data[part]
    return data


def _provider_extra(path: tuple[Any, ...]) -> bool:
    return path[0] == "provider" and path[1] not in ProviderConfig.model_fields


SYSTEMATIC = [(example, path) for example in EXAMPLES
              for path in _key_paths(yaml.safe_load(example.read_text()))]


def test_the_examples_load(load) -> None:
    for example in EXAMPLES:
        assert isinstance(load(example.read_bytes()), ClusterConfig), example


@pytest.mark.parametrize("example, path", SYSTEMATIC,
                         ids=[f"{e.stem}:{format_path(p)}" for e, p in SYSTEMATIC])
def test_every_key_with_every_wrong_type(load, example: Path, path: tuple[Any, ...]) -> None:
    data = yaml.safe_load(example.read_text())
    was = _get(data, path)
    for _, value in WRONG_VALUES:
        result = load(yaml.safe_dump(_set(data, path, value)), names=path)
        if isinstance(result, ClusterConfig) and isinstance(value, list | dict) \
                and not isinstance(was, list | dict):
            # a collection where a scalar was: only in what strato passes on untyped
            assert "node_config" in path or _provider_extra(path), \
                f"{format_path(path)} = {value!r} accepted"


# ---------------------------------------------------------------- seeded random mutations
def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(12 if depth < 3 else 9)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, 1, -1, 2**31, 2**63, -(2**63), 10**100, -(10**100)])
    if kind == 3:
        return rng.choice([0.0, -0.5, 1e-300, 1e300, float("inf"), float("-inf"),
                           float("nan")])
    if kind == 4:
        return rng.choice(["", " ", "local", "aws", "head", "A100:8", "L4", "x" * 10_000,
                           "\u2603\U0001f600", "a\nb", "${HOME}", "~/x", "-1", "yes"])
    if kind in (5, 6, 7, 8):
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(12)))
    if kind == 9:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {str(_random_value(rng, 3))[:20] if rng.random() < 0.8 else rng.randrange(9):
            _random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def _mutate_tree(rng: random.Random, data: Any) -> str:
    for _ in range(rng.randrange(1, 4)):
        paths = list(_key_paths(data))
        path = rng.choice(paths)
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        op = rng.randrange(6)
        if op == 0:
            parent[path[-1]] = _random_value(rng)
        elif op == 1 and isinstance(parent, dict):
            del parent[path[-1]]
        elif op == 2 and isinstance(parent, dict):
            parent[str(_random_value(rng, 3))[:30]] = _random_value(rng)
        elif op == 3 and isinstance(parent, dict):  # a typo in a key
            key = str(path[-1])
            i = rng.randrange(len(key) + 1)
            parent[key[:i] + rng.choice("_x-") + key[i + 1:]] = parent.pop(path[-1])
        elif op == 4:
            parent[path[-1]] = [parent[path[-1]]]
        elif op == 5 and isinstance(parent, dict):
            parent[rng.choice([1, None, 2.5, True])] = parent.pop(path[-1])
    return yaml.safe_dump(data, allow_unicode=rng.random() < 0.5)


def _mutate_text(rng: random.Random, text: str) -> bytes:
    lines = text.splitlines(keepends=True)
    for _ in range(rng.randrange(1, 6)):
        op = rng.randrange(7)
        i = rng.randrange(len(lines))
        if op == 0:
            lines[i] = "\t" + lines[i]
        elif op == 1:
            lines[i] = "  " + lines[i]
        elif op == 2:
            lines[i] = lines[i].lstrip()
        elif op == 3:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == 4 and lines[i]:
            k = rng.randrange(len(lines[i]))
            lines[i] = lines[i][:k] + rng.choice("\t:-[]{}\"'&*!|>%@`#?,\\") + lines[i][k:]
        elif op == 5:
            lines = lines[:i] or lines[:1]
        else:
            lines.insert(i, lines[rng.randrange(len(lines))])
    data = "".join(lines).encode()
    if rng.random() < 0.1:
        k = rng.randrange(len(data) + 1)
        data = data[:k] + bytes([rng.randrange(128, 256)]) + data[k:]
    return data


def test_seeded_random_mutations(load) -> None:
    rng = random.Random(SEED)
    texts = {e: e.read_text() for e in EXAMPLES}
    outcomes = {"loaded": 0, "refused": 0}
    for _ in range(RANDOM_CASES):
        example = rng.choice(EXAMPLES)
        if rng.random() < 0.5:
            case: str | bytes = _mutate_tree(rng, yaml.safe_load(texts[example]))
        else:
            case = _mutate_text(rng, texts[example])
        result = load(case)
        outcomes["loaded" if isinstance(result, ClusterConfig) else "refused"] += 1
    assert outcomes["refused"] > RANDOM_CASES // 3, outcomes  # the mutations do bite


# ---------------------------------------------------------------- the CLI, end to end
def test_strato_up_prints_the_problem_without_a_traceback(tmp_path: Path) -> None:
    """The real command, in its own process: exit 2, the problem on one line."""
    env = {**os.environ, "STRATO_HOME": str(tmp_path / "home")}
    (tmp_path / "tabs.yaml").write_text("provider:\n\ttype: local\n")
    res = subprocess.run([sys.executable, "-m", "strato.cli", "up", "-y",
                          str(tmp_path / "tabs.yaml")],
                         capture_output=True, text=True, env=env, timeout=60)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "Traceback" not in out, out
    assert out.splitlines() == [
        "strato: invalid cluster config",
        f"{tmp_path / 'tabs.yaml'}:2: (yaml): YAML syntax error, column 1: found character "
        "'\\t' that cannot start any token; YAML indents with spaces, not tabs (while "
        "scanning for the next token)"], out


@pytest.mark.parametrize("content, want", [
    (b"cluster_name: \xff\n", ":1: not UTF-8 text"),
    (b"a: &a [*a]\n", ":1: (yaml): YAML error, column 4: this value contains itself"),
    (("x: " + "[" * 5000 + "]" * 5000).encode(), ":1: (yaml): YAML error, column 103: nested"),
    (b"!!python/object/apply:os.system ['true']\n", ":1: (yaml): YAML error, column 1: the tag"),
    (_laughs(10).encode(), "(an alias bomb?)"),
    (b"", ":1: (top level): the file is empty"),
    (VALID.replace("{CPU: 1}", "[1]").encode(),
     ":6: available_node_types.head.resources: expected a mapping (got a list)"),
], ids=["not-utf8", "recursive", "deep", "python-tag", "laughs", "empty", "wrong-type"])
def test_cli_runner_bad_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              content: bytes, want: str) -> None:
    monkeypatch.setenv("STRATO_HOME", str(tmp_path / "home"))
    (tmp_path / "bad.yaml").write_bytes(content)
    result = CliRunner().invoke(cli, ["up", "-y", str(tmp_path / "bad.yaml")])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    header, problem = result.output.splitlines()
    assert header == "strato: invalid cluster config"
    assert problem.startswith(f"{tmp_path / 'bad.yaml'}:") and want in problem, problem
