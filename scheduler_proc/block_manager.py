"""The paged KV block manager: fixed-size pages with reference counts, and the prefix cache over them.

Prefix caching keys every full page by a hash of its tokens chained with its parent page's hash, so one key stands
for the whole token prefix up to that page's end and a lookup walks a prompt's keys until the first miss. A page
keeps its key (and its KV) after its last holder lets go: it waits, evictable, in least-recently-used order, and is
taken back by the next request that matches it or, when no clean page is left, reused for new tokens (its key
dropped then). Pages without a key return to the clean free list.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from typing import TYPE_CHECKING, Iterable, Optional

if TYPE_CHECKING:
    from scheduler_proc.request import Request

ROOT_HASH = b""


def page_key(parent: bytes, tokens: Iterable[int]) -> bytes:
    """The cache key of a full page: 16 bytes of BLAKE2b over the parent's key and the page's token ids (a
    collision would silently serve another prompt's KV, so not Python's 64-bit hash)."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = False):
        self.num_pages, self.page_size = num_pages, page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_pages
        self.free_pages: deque[int] = deque(range(num_pages))  # no cached content
        # page -> None: unheld pages with a key, least recent first
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.page_keys: list[Optional[bytes]] = [None] * num_pages
        self.cached: dict[bytes, int] = {}  # key -> page
        self.query_tokens = 0  # prompt tokens looked up in the cache, and those found (vLLM's counters)
        self.hit_tokens = 0

    @property
    def num_free(self) -> int:
        """Pages a request can be given now: clean ones and evictable cached ones."""
        return len(self.free_pages) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self.cached)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def allocate(self, n: int) -> Optional[list[int]]:
        """n pages for new tokens, or None (and nothing taken) when fewer are free."""
        if n > self.num_free:
            return None
        pages = []
        for _ in range(n):
            if self.free_pages:
                p = self.free_pages.popleft()
            else:
                p, _ = self.evictable.popitem(last=False)
                key = self.page_keys[p]
                assert key is not None  # an evictable page holds cached content
                del self.cached[key]
                self.page_keys[p] = None
            self.ref_counts[p] = 1
            pages.append(p)
        return pages

    def share(self, pages: list[int]) -> None:
        for p in pages:
            if self.ref_counts[p] == 0:
                del self.evictable[p]
            self.ref_counts[p] += 1

    def release(self, pages: list[int]) -> None:
        """Let go of pages. Pass a request's pages last-first: the deepest pages of a prefix then sit nearest the
        front of the LRU order and are evicted before the shared roots."""
        for p in pages:
            if self.ref_counts[p] <= 0:
                raise RuntimeError(f"KV page {p} released more often than it was taken")
            self.ref_counts[p] -= 1
            if self.ref_counts[p] == 0:
                if self.page_keys[p] is not None:
                    self.evictable[p] = None
                else:
                    self.free_pages.append(p)

    # ---------------------------------------------------------------- prefix cache
    def match(self, keys: list[bytes]) -> list[int]:
        """The cached pages of the longest prefix of keys (not yet shared: call share())."""
        pages = []
        for key in keys:
            p = self.cached.get(key)
            if p is None:
                break
            pages.append(p)
        return pages

    def register(self, page: int, key: bytes) -> None:
        """Offer a full page (its KV written, or being written by a step planned before any reader) to the cache.
        A key already cached elsewhere keeps its page: the duplicate stays private and is freed clean."""
        if self.enable_prefix_caching and key not in self.cached and self.page_keys[page] is None:
            self.cached[key] = page
            self.page_keys[page] = key

    def forget(self, pages: list[int]) -> None:
        """Drop the keys of pages whose KV cannot be trusted (their step failed)."""
        for p in pages:
            key = self.page_keys[p]
            if key is None:
                continue
            del self.cached[key]
            self.page_keys[p] = None
            if self.ref_counts[p] == 0:
                del self.evictable[p]
                self.free_pages.append(p)

    # ---------------------------------------------------------------- a request's pages and prefix keys
    def keys(self, r: "Request", num_pages: int) -> list[bytes]:
        """The cache keys of r's first num_pages full pages (computed once, kept on the request)."""
        ps = self.page_size
        while len(r.page_keys) < num_pages:
            i = len(r.page_keys)
            r.page_keys.append(page_key(r.page_keys[-1] if i else ROOT_HASH, r.token_slice(i * ps, (i + 1) * ps)))
        return r.page_keys[:num_pages]

    def reuse_cached_prefix(self, r: "Request") -> None:
        """Start a request that holds no pages on the cached pages of its longest cached prefix."""
        if not self.enable_prefix_caching or r.pages:
            return
        # At least one token is left to compute: the step that computes it yields the logits to sample from.
        pages = self.match(self.keys(r, (r.num_tokens - 1) // self.page_size))
        self.share(pages)
        r.pages, r.num_registered = pages, len(pages)
        r.num_computed = len(pages) * self.page_size
        if not r.num_preemptions:
            r.num_cached_tokens = r.num_computed

    def count_lookup(self, r: "Request") -> None:
        """Count r's prompt in the hit-rate counters, once, when it is first admitted (a request may look up its
        prefix several times before it fits, and again after a preemption)."""
        self.query_tokens += len(r.prompt_ids)
        self.hit_tokens += r.num_cached_tokens

    def filled_keys(self, r: "Request", start: int, end: int, pending: int) -> list[bytes]:
        """Keys of the full pages that a chunk of r completes (none for a chained decode: its token is unknown)."""
        ps = self.page_size
        first, full = start // ps, min(end, r.num_tokens) // ps
        return self.keys(r, full)[first:] if not pending and full > first else []

    def next_page_in(self, r: "Request", keys: set[bytes]) -> bool:
        """Whether the first page r would compute (a full page of its prompt) has one of keys."""
        i = len(r.pages)
        return i < (r.num_tokens - 1) // self.page_size and self.keys(r, i + 1)[i] in keys

    def register_full_pages(self, r: "Request", num_known: int) -> None:
        """Offer r's pages that the step being planned fills to the cache: any later plan may read them, since
        every rank runs plans in order."""
        full = num_known // self.page_size
        if not self.enable_prefix_caching or full <= r.num_registered:
            return
        for i, key in enumerate(self.keys(r, full)[r.num_registered:], r.num_registered):
            self.register(r.pages[i], key)
        r.num_registered = full

    def drop_pages(self, r: "Request") -> None:
        self.release(r.pages[::-1])
        r.pages, r.num_computed, r.num_registered = [], 0, 0

    def grow(self, r: "Request", num_tokens: int) -> bool:
        """Give r pages for its first num_tokens tokens; False (nothing taken) when too few are free."""
        need = self.pages_for(num_tokens) - len(r.pages)
        if need <= 0:
            return True
        pages = self.allocate(need)
        if pages is None:
            return False
        r.pages.extend(pages)
        return True
