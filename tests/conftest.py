"""Load every harness module under tests/harness as a pytest plugin (fixtures in one place)."""

from pathlib import Path

pytest_plugins = sorted(
    f"tests.harness.{p.stem}"
    for p in (Path(__file__).parent / "harness").glob("*.py")
    if p.stem != "__init__"
)
