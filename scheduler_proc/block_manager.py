"""The paged KV block manager: fixed-size pages, a free list and reference counts (a page shared by several
requests, e.g. through a cached prefix, returns to the free list only when its last holder lets go)."""
from __future__ import annotations

from collections import deque
from typing import Optional


class BlockManager:
    def __init__(self, num_pages: int, page_size: int):
        self.num_pages, self.page_size = num_pages, page_size
        self.ref_counts = [0] * num_pages
        self.free_pages: deque = deque(range(num_pages))

    @property
    def num_free(self) -> int:
        return len(self.free_pages)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self.free_pages)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def allocate(self, n: int) -> Optional[list]:
        """n fresh pages, or None (and nothing taken) when fewer are free."""
        if n > len(self.free_pages):
            return None
        pages = [self.free_pages.popleft() for _ in range(n)]
        for p in pages:
            self.ref_counts[p] = 1
        return pages

    def share(self, pages: list) -> None:
        for p in pages:
            self.ref_counts[p] += 1

    def release(self, pages: list) -> None:
        for p in pages:
            if self.ref_counts[p] <= 0:
                raise RuntimeError(f"KV page {p} released more often than it was taken")
            self.ref_counts[p] -= 1
            if self.ref_counts[p] == 0:
                self.free_pages.append(p)
