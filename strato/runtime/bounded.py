"""Containers that forget their oldest entries, for state a long-lived cluster would
otherwise only ever add to (dead nodes, cancelled tasks, finished actors)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class BoundedSet:
    """A set that keeps at most ``maxlen`` members, forgetting the oldest added first."""

    def __init__(self, items: Iterable = (), maxlen: int = 10_000):
        self.maxlen = maxlen
        self._items: OrderedDict = OrderedDict()
        for item in items:
            self.add(item)

    def add(self, item) -> None:
        self._items[item] = None
        self._items.move_to_end(item)
        while len(self._items) > self.maxlen:
            self._items.popitem(last=False)

    def discard(self, item) -> None:
        self._items.pop(item, None)

    def __contains__(self, item) -> bool:
        return item in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self):
        return iter(self._items)
