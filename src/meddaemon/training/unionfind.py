"""Union-find over the integers 0..n-1: the connected groups of "same patient" and "near-duplicate"."""

from __future__ import annotations

from collections.abc import Iterable


class DisjointSets:
    def __init__(self, size: int) -> None:
        self._parent = list(range(size))

    def find(self, item: int) -> int:
        parent = self._parent
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    def union(self, items: Iterable[int]) -> None:
        """Put all of ``items`` in one set."""
        items = list(items)
        for other in items[1:]:
            self._parent[self.find(other)] = self.find(items[0])

    def groups(self) -> list[list[int]]:
        """Every set, as its members in increasing order, ordered by their smallest member."""
        by_root: dict[int, list[int]] = {}
        for item in range(len(self._parent)):
            by_root.setdefault(self.find(item), []).append(item)
        return list(by_root.values())
