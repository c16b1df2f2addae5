"""The server's memory budget (--max-buffer-mb): one count of the bytes it holds for requests and answers.

`MemoryBudget` counts what edits hold from the moment their request is read until their answer is handed
to gRPC: the images as they travelled (render and original) and the answer. The originals cache has its own
share of the budget (--original-cache-mb, evicting within it), so requests get the rest (`requests_bytes`).
A unary request that does not fit is refused at once (RESOURCE_EXHAUSTED naming --max-buffer-mb); a
stream waits (reading nothing more) until there is room; a single request larger than the whole share is
refused either way. It lives on the server's event loop (no lock: every call comes from the loop).

`trim_allocator` hands freed memory back to the system: requests refused with an exception stay alive in
reference cycles until Python's cycle collector runs, and glibc keeps the heap pages of large freed buffers
(gRPC's receive slices, protobuf and numpy copies) in its arenas; without it the server's RSS stays near
its peak long after the requests are gone. It runs when the budget falls back to zero (at most once a
second) and every few seconds (`trim_periodically`: what gRPC refuses itself, such as messages over the size
limit, never reaches the budget).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import gc
import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

MiB = 1 << 20
DEFAULT_FRACTION = 0.25
"""The default --max-buffer-mb: this fraction of the machine's memory ..."""
DEFAULT_CAP_MB = 8192
"""... at most this many MiB."""


def machine_memory_bytes() -> int:
    """Physical memory of this machine (or of its cgroup, when that is smaller)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def default_max_buffer_mb() -> int:
    """--max-buffer-mb when not given: DEFAULT_FRACTION of the machine's memory, at most DEFAULT_CAP_MB."""
    return max(64, min(DEFAULT_CAP_MB, int(machine_memory_bytes() * DEFAULT_FRACTION) // MiB))


def default_original_cache_mb(max_buffer_mb: int) -> int:
    """--original-cache-mb when not given: a quarter of the budget, at most 1024 MiB."""
    return min(1024, max_buffer_mb // 4)


class MemoryBudget:
    """Bytes held for edits, at most `capacity`; waiters are served in order (on the event loop only)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self.peak = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._trimmer = AllocatorTrimmer()

    def fits_at_all(self, size: int) -> bool:
        return size <= self.capacity

    def try_reserve(self, size: int) -> bool:
        """Hold `size` bytes if they fit now (and nobody waits before); False otherwise."""
        if self._waiters or self.used + size > self.capacity:
            return False
        self._take(size)
        return True

    async def reserve(self, size: int) -> None:
        """Hold `size` bytes (at most `capacity`), waiting in line until they fit."""
        if self.try_reserve(size):
            return
        waiter = asyncio.get_running_loop().create_future()
        entry = (size, waiter)
        self._waiters.append(entry)
        try:
            await waiter
        except asyncio.CancelledError:
            if entry in self._waiters:
                self._waiters.remove(entry)
            elif waiter.done() and not waiter.cancelled():
                self.release(size)  # granted as the wait was cancelled: give it back
            self._wake()
            raise

    def release(self, size: int) -> None:
        self.used -= size
        self._wake()
        if self.used == 0:
            self._trimmer.maybe_trim()

    def _take(self, size: int) -> None:
        self.used += size
        self.peak = max(self.peak, self.used)

    def _wake(self) -> None:
        while self._waiters and self.used + self._waiters[0][0] <= self.capacity:
            size, waiter = self._waiters.popleft()
            if waiter.done():  # cancelled
                continue
            self._take(size)
            waiter.set_result(None)


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None (another C library)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def trim_allocator() -> None:
    """Collect Python's garbage cycles, then return the C allocator's free pages to the system (glibc's
    malloc_trim; nothing more elsewhere). The cycles matter: a refused call's exception holds its frames, and
    with them the request's images, until the cycle collector runs, which few allocations may not trigger."""
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)


class AllocatorTrimmer:
    """`trim_allocator` off the event loop (it walks the heap: milliseconds), at most once per `every_s`."""

    def __init__(self, every_s: float = 1.0):
        self.every_s = every_s
        self._last = -float("inf")
        self._running = False

    def maybe_trim(self) -> None:
        now = time.monotonic()
        if self._running or now - self._last < self.every_s:
            return
        self._last, self._running = now, True
        try:
            future = asyncio.get_running_loop().run_in_executor(None, trim_allocator)
        except RuntimeError:  # no loop running: trim here
            trim_allocator()
            self._running = False
            return
        future.add_done_callback(lambda _f: setattr(self, "_running", False))


async def trim_periodically(every_s: float) -> None:
    """Trim the allocator every `every_s` seconds (requests gRPC refuses before the service sees them, such as
    messages over the size limit, leave their receive buffers freed but held too)."""
    while True:
        await asyncio.sleep(every_s)
        await asyncio.get_running_loop().run_in_executor(None, trim_allocator)
