"""Serverless extras on remote functions: ``.map`` / ``.starmap`` and durable calls.

``map_calls`` keeps a bounded number of calls in flight (backpressure for millions of
inputs), yields results as they are ready (in input order, or as they complete), and
shows a rich progress bar when stdout is a terminal. It works in every mode: a driver on
a node, a task, or the serverless client.

``FunctionCall`` is a durable call (``f.spawn(...)``): its record and result live on the
head agent, owned by the head rather than by the session that made it, so it survives
the client disconnecting or exiting; ``FunctionCall.from_id(id)`` finds it again.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from strato.runtime import messages as m
from strato.runtime.core import ObjectRef, current

DEFAULT_MAX_IN_FLIGHT = 1000


def _core():
    core = current()
    if core is None:
        from strato.exceptions import RuntimeNotInitializedError
        raise RuntimeNotInitializedError("strato is not initialized: call strato.init() first")
    return core


def map_calls(submit: Callable[[tuple], ObjectRef], arg_tuples: Iterable[tuple], *,
              name: str, total: int | None, order_outputs: bool = True,
              return_exceptions: bool = False, max_in_flight: int | None = None,
              progress: bool | None = None) -> Iterator[Any]:
    """Submit ``submit(args)`` for every tuple, at most ``max_in_flight`` at once, and
    yield the results as they are ready; an error raises (or is yielded with
    ``return_exceptions``). Closing the iterator early cancels the calls in flight."""
    limit = max_in_flight or DEFAULT_MAX_IN_FLIGHT
    if limit < 1:
        raise ValueError(f"max_in_flight must be >= 1, got {limit}")
    core = _core()
    inputs = iter(arg_tuples)
    inflight: deque[ObjectRef] = deque()
    done: deque[ObjectRef] = deque()   # ready, not yielded yet (unordered)
    exhausted = False
    bar = _ProgressBar(name, total) if (progress if progress is not None
                                        else sys.stdout.isatty()) else None
    try:
        while True:
            while not exhausted and len(inflight) < limit:
                try:
                    args = next(inputs)
                except StopIteration:
                    exhausted = True
                    break
                inflight.append(submit(args))
            if not inflight and not done:
                return
            if order_outputs:
                ref = inflight.popleft()
            else:
                if not done:
                    ready = core._wait_ready(list(inflight), 1, None, need_local=True)
                    ids = {r.id for r in ready}
                    done.extend(r for r in inflight if r.id in ids)
                    inflight = deque(r for r in inflight if r.id not in ids)
                ref = done.popleft()
            value = _result(core, ref, return_exceptions)
            if bar is not None:
                bar.advance()
            yield value
    finally:
        for ref in (*inflight, *done):
            core.send((m.CANCEL, ref.id, False))
        if bar is not None:
            bar.close()


def _result(core, ref: ObjectRef, return_exceptions: bool):
    if not return_exceptions:
        return core.get([ref], None)[0]
    try:
        return core.get([ref], None)[0]
    except Exception as exc:
        return exc


def _total(iterables: tuple) -> int | None:
    try:
        return min(len(it) for it in iterables) if iterables else None
    except TypeError:
        return None


class _ProgressBar:
    def __init__(self, name: str, total: int | None):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TimeElapsedColumn(),
                                  TimeRemainingColumn(), transient=False)
        self._task = self._progress.add_task(f"{name}.map", total=total)
        self._progress.start()

    def advance(self) -> None:
        self._progress.advance(self._task)

    def close(self) -> None:
        self._progress.stop()


def map_method(remote: Callable, name: str, iterables: tuple, **options) -> Iterator[Any]:
    """``.map(*iterables)`` of anything with ``.remote`` (functions, actor methods)."""
    if not iterables:
        raise TypeError(f"{name}.map() needs at least one iterable")
    return map_calls(lambda args: remote(*args), zip(*iterables), name=name,
                     total=_total(iterables), **options)


def starmap_method(remote: Callable, name: str, iterable: Iterable, **options) -> Iterator[Any]:
    """``.starmap(iterable)``: each item is a tuple of arguments."""
    return map_calls(lambda args: remote(*args), iterable, name=name,
                     total=_total((iterable,)), **options)


# ---------------------------------------------------------------------- durable calls
class FunctionCall:
    """A durable call made with ``f.spawn(...)``: its result is kept on the head (24 h
    by default, ``.options(retention_s=...)``) even when this process disconnects or
    exits. ``id`` names it; ``FunctionCall.from_id(id)`` in another session finds it."""

    def __init__(self, call_id: bytes, node: bytes, name: str = ""):
        self._call_id = call_id
        self._node = node
        self.name = name

    @property
    def id(self) -> str:
        return self._call_id.hex()

    @classmethod
    def from_id(cls, call_id: str) -> FunctionCall:
        """The durable call ``call_id`` (``DurableCallNotFoundError`` if the head has no
        such call: never made, or dropped after its retention)."""
        try:
            raw = bytes.fromhex(call_id)
        except (TypeError, ValueError):
            raise ValueError(f"not a durable call id: {call_id!r}") from None
        info = _core().rpc("durable_call", raw)
        return cls(info["call_id"], info["node"], info["name"])

    def get(self, timeout: float | None = None):
        """The call's value (waits for it); its error re-raises with the remote traceback."""
        ref = ObjectRef(self._call_id, self._node)
        return _core().get([ref], timeout)[0]

    def cancel(self, force: bool = False) -> None:
        _core().send((m.CANCEL, self._call_id, force))

    def __reduce__(self):
        return (FunctionCall, (self._call_id, self._node, self.name))

    def __repr__(self) -> str:
        return f"FunctionCall({self.name or 'call'}, {self.id})"
