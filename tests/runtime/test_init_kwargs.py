"""``strato.init`` keywords: unknown ones are refused before anything starts; Ray-only
ones are accepted so Ray code runs unchanged, with one note."""

from __future__ import annotations

import pytest

import strato
from strato.runtime import api

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_cpu": 2}, "'num_cpu'; did you mean 'num_cpus'?"),
    ({"adress": "auto"}, "'adress'; did you mean 'address'?"),
    ({"frobnicate": 1}, "unexpected keyword argument 'frobnicate'"),
    ({"working_dir": "."}, "init(working_dir=...) needs cluster=..."),
])
def test_unknown_keyword_is_a_type_error_and_starts_nothing(kwargs, message, tmp_path):
    if strato.is_initialized():
        strato.shutdown()
    with pytest.raises(TypeError) as info:
        strato.init(temp_dir=str(tmp_path / "rt"), **kwargs)
    assert message in str(info.value)
    assert not strato.is_initialized()
    assert not (tmp_path / "rt").exists()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_cpus": 2}, "init(cluster=...): num_cpus= configures a node"),
    ({"address": "auto"}, "pass address= (a cluster this machine is part of) or cluster="),
    ({"num_cpu": 2}, "'num_cpu'; did you mean 'num_cpus'?"),
])
def test_client_keywords_are_checked_before_anything_is_contacted(kwargs, message, tmp_path,
                                                                    monkeypatch):
    """A client starts no node: node keywords are refused before the config is read."""
    if strato.is_initialized():
        strato.shutdown()
    monkeypatch.setenv("STRATO_HOME", str(tmp_path / "home"))
    with pytest.raises(TypeError) as info:
        strato.init(cluster=str(tmp_path / "missing.yaml"), **kwargs)
    assert message in str(info.value)
    assert not strato.is_initialized()
    assert not (tmp_path / "home").exists()


def test_ray_only_keywords_are_noted_once(strato_local_fn, capsys, monkeypatch):
    monkeypatch.setattr(api, "_noted_ray_only", set())
    strato = strato_local_fn(num_cpus=1, include_dashboard=False, logging_level="INFO")
    assert strato.get(strato.put(3)) == 3
    err = capsys.readouterr().err
    assert err.count("ignoring Ray-only argument(s) include_dashboard, logging_level") == 1
    strato_local_fn(num_cpus=1, include_dashboard=False)  # noted before: silent now
    assert "Ray-only" not in capsys.readouterr().err
