"""KV pages with prefix reuse: a page pool that remembers what full pages hold, so a new sequence can share them.

A *full* page's content is fixed by every token before and in it, so it is named by a chained hash:
``hash(page i) = H(hash(page i-1), token ids of page i)``. A sequence whose known tokens start with pages already in
the pool takes them (reference count + 1) instead of recomputing them. Multi-turn chat gets this for free: the next
turn's prompt starts with the previous prompt and answer, whose pages the previous turn left behind.

Every page is in exactly one state:
- *empty*: holds nothing anyone can find (on the free list);
- *cached*: holds a known full page that no live sequence uses (refcount 0): free to allocate, but kept, and found
  by ``lookup``, until memory is needed; then the least recently released goes first (LRU);
- *in use*: refcount > 0 (maybe also findable by its hash, maybe shared by several sequences).

Pure bookkeeping, no torch: the scheduler owns one pool and the KV cache tensors never move.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence

PageHash = bytes


def page_hash(previous: PageHash | None, tokens: Sequence[int]) -> PageHash:
    """The name of a full page: its tokens chained onto the name of the page before it (None for the first).

    A cryptographic hash (not Python's ``hash``), so two different prefixes never share KV by accident."""
    h = hashlib.blake2b(previous or b"", digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


class PagePool:
    """Allocation, reference counts and the prefix index of ``num_pages`` KV pages.

    With ``caching=False`` nothing is ever registered, so it is a plain free list (released pages are empty).
    """

    def __init__(self, num_pages: int, caching: bool = True) -> None:
        if num_pages < 1:
            raise ValueError(f"the KV cache needs at least one page, got num_pages={num_pages}")
        self.num_pages = num_pages
        self.caching = caching
        self._refs = [0] * num_pages
        self._empty: deque[int] = deque(range(num_pages))
        self._cached: OrderedDict[int, None] = OrderedDict()  # refcount-0 pages with a hash, least recent first
        self._hash_of: dict[int, PageHash] = {}
        self._page_of: dict[PageHash, int] = {}
        self.num_evictions = 0

    # -- state --------------------------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Pages an allocation can take now: empty ones plus cached ones nobody uses."""
        return len(self._empty) + len(self._cached)

    @property
    def num_in_use(self) -> int:
        return self.num_pages - self.num_free

    @property
    def num_cached(self) -> int:
        """Unreferenced pages kept for reuse (part of ``num_free``)."""
        return len(self._cached)

    def refcount(self, page: int) -> int:
        return self._refs[page]

    def hash_of(self, page: int) -> PageHash | None:
        return self._hash_of.get(page)

    # -- allocation ---------------------------------------------------------------------------------------------------
    def allocate(self, count: int) -> list[int]:
        """``count`` pages for one sequence (refcount 1): empty ones first, then the least recently used cached."""
        if count > self.num_free:
            raise RuntimeError(f"asked for {count} KV pages but only {self.num_free} are free")
        pages = []
        for _ in range(count):
            if self._empty:
                page = self._empty.popleft()
            else:
                page, _ = self._cached.popitem(last=False)
                del self._page_of[self._hash_of.pop(page)]  # its content is about to be overwritten
                self.num_evictions += 1
            self._refs[page] = 1
            pages.append(page)
        return pages

    def share(self, page: int) -> None:
        """One more sequence uses ``page`` (found by ``lookup``); a cached page leaves the LRU."""
        if self._refs[page] == 0:
            if page not in self._cached:
                raise RuntimeError(f"KV page {page} is empty: there is nothing in it to share")
            del self._cached[page]
        self._refs[page] += 1

    def release(self, pages: Iterable[int]) -> None:
        """One sequence stops using ``pages``. Pass them last page first: the tail of a sequence is the least likely
        to be shared again, so it should be evicted before its prefix."""
        for page in pages:
            if self._refs[page] < 1:
                raise RuntimeError(f"KV page {page} freed twice")
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._hash_of:
                    self._cached[page] = None  # most recently used end
                else:
                    self._empty.append(page)

    # -- the prefix index ---------------------------------------------------------------------------------------------
    def register(self, page: int, key: PageHash) -> None:
        """``page`` (in use) now holds the full page named ``key``. When another page already holds it (two
        sequences computed the same prefix at once), the first one stays the one found; this one stays private."""
        if not self.caching or key in self._page_of or page in self._hash_of:
            return
        if self._refs[page] < 1:
            raise RuntimeError(f"KV page {page} is not in use; only a sequence's own computed page can be registered")
        self._hash_of[page] = key
        self._page_of[key] = page

    def lookup(self, keys: Iterable[PageHash]) -> list[int]:
        """The pages holding the longest run of leading ``keys`` (does not take them: see ``share``)."""
        found = []
        for key in keys:
            page = self._page_of.get(key)
            if page is None:
                break
            found.append(page)
        return found

    def clear_index(self) -> None:
        """Forget what every page holds (after a failed forward nothing in the cache can be trusted)."""
        for page in self._cached:
            self._empty.append(page)
        self._cached.clear()
        self._hash_of.clear()
        self._page_of.clear()
