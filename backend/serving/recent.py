"""The few things a server keeps between requests (project setups, parsed configs, the
decoded image of the task being labelled and its detections), bounded: the least recently
used go first, so no client can grow the server's memory."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class Recent(Generic[V]):
    """The `size` most recently used entries, shared by the request threads."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
            return self._items.get(key)

    def put(self, key: Hashable, value: V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def get_or_make(self, key: Hashable, make: Callable[[], V]) -> V:
        """The entry, made outside the lock when missing (two threads may both make it;
        either result serves)."""
        found = self.get(key)
        if found is None:
            found = make()
            self.put(key, found)
        return found
