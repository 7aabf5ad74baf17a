"""Task specs and results pickle as plain tuples of their fields (every hop of every call
carries them): a field added to the dataclass but not to ``__reduce__`` would be lost
silently, so every field must survive a round trip."""

from __future__ import annotations

import dataclasses
import pickle

from strato.runtime.spec import ACTOR_CALL, ReturnValue, TaskSpec


def _distinct(field: dataclasses.Field, i: int):
    return {"kind": ACTOR_CALL, "max_retries": 7, "attempt": 3, "seq": 11}.get(
        field.name, (field.name, i))


def test_every_task_spec_field_survives_pickling():
    fields = dataclasses.fields(TaskSpec)
    spec = TaskSpec(**{f.name: _distinct(f, i) for i, f in enumerate(fields)})
    back = pickle.loads(pickle.dumps(spec, protocol=5))
    for f in fields:
        assert getattr(back, f.name) == getattr(spec, f.name), f.name


def test_every_return_value_field_survives_pickling():
    for contained in (None, [(b"o" * 16, b"n" * 16)]):
        ret = ReturnValue(b"i" * 16, b"data", b"n" * 16, 4, True, contained)
        back = pickle.loads(pickle.dumps(ret, protocol=5))
        for f in dataclasses.fields(ReturnValue):
            assert getattr(back, f.name) == getattr(ret, f.name), f.name
