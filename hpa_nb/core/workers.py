"""Per-image work on every core: `Workers` maps a function over items in worker processes and yields the results
in the items' order, so a writer downstream writes exactly what one process would have written.

- **Order and errors.** Results come back in order; an exception a worker raised (a bad image's ValueError naming
  it) is raised again here at that item's turn, exactly where one process would have raised it.
- **Bounded memory.** At most `in_flight` items (default 2 per worker) are submitted ahead of the one awaited.
- **A worker that dies** (killed, out of memory) stops the map with one line (`WorkerLost`) instead of hanging. The
  line names the item that worker held: each task marks a shared slot with its worker's pid when it starts and
  clears it when it ends, and a worker the broken pool itself terminates marks its slot as such; the slot still
  holding a pid after the pool is down is the dead worker's.
- **No orphans.** Each worker watches this process (a pidfd) and exits the moment it ends, however it ends; the
  fork server, which its children keep alive, ends after them. So a SIGKILL of this process leaves none behind.
- **Freed memory is kept.** An image's arrays are tens of MiB each, which glibc maps fresh for every allocation and
  returns on every free, so each image pays again for the kernel to fault in and zero its pages, and two processes
  doing so side by side slow each other. `keep_freed_memory` (every worker, and this process on entry) has glibc keep
  what is freed for the next image instead: ``python -m hpa_nb bench cells`` measures what it changes.
- **Start-up.** The fork server imports `preload` once (TensorFlow, say); each worker then starts as a fork of
  it. `Workers` starts every worker on entry, so a projection timed afterwards measures work, not start-up.

With one worker nothing is started: the function runs in this process, as it always did.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import select
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Iterator, Sequence

logger = logging.getLogger(__name__)


class WorkerLost(ValueError):
    """A worker process died mid-task; a ValueError, so the command line prints it as one line."""


def available_cores() -> int:
    """The cores this process may run on (its affinity, which a container or `taskset` narrows), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve(workers: int | None) -> int:
    """`workers` as given (None: every core this process may use); refuses fewer than 1."""
    if workers is None:
        return available_cores()
    if workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    return int(workers)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (glibc's malloc.h)
_KEEP_BYTES = 1 << 30  # allocations up to this size come from the heap, and up to this much freed stays there
_KEPT: bool | None = None  # whether this process keeps freed memory; None: not tried yet


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve allocations of up to 1 GiB (a 2048 px RGBY float32 image is 64 MiB) from its heap
    and keep up to 1 GiB of what is freed there, instead of mapping fresh pages for each and unmapping them again: the
    process holds on to about its peak, and the next image no longer pays for page faults. Once per process; False
    where there is no glibc."""
    global _KEPT
    if _KEPT is None:  # tried once: without glibc, not again at every pool
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _KEPT = bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES) and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
        except (OSError, AttributeError):  # not glibc (macOS, musl): its own malloc stays as it is
            _KEPT = False
    return _KEPT


_SLOTS: Any = None  # in a worker: the pool's shared slots, one per item in flight
_CURRENT: list[int] = []  # in a worker: the slot of the item it is working on


def _start_worker(main_pid: int, slots: Any) -> None:
    """A worker's initializer: keep the slots, mark a termination by the pool, and exit with the main process."""
    global _SLOTS
    _SLOTS = slots
    keep_freed_memory()
    signal.signal(signal.SIGTERM, _terminated)
    _exit_with(main_pid)


def _terminated(*_: Any) -> None:
    """SIGTERM, which a broken pool sends its surviving workers: not the death to report, so say so in the slot."""
    if _CURRENT:
        _SLOTS[_CURRENT[0]] = -os.getpid()
    os._exit(1)


def _run(function: Callable[[Any], Any], item: Any, slot: int) -> Any:
    """One task in a worker: its slot holds this worker's pid while it runs."""
    _SLOTS[slot] = os.getpid()
    _CURRENT[:] = [slot]
    try:
        return function(item)
    finally:
        _CURRENT.clear()
        _SLOTS[slot] = 0


def _exit_with(main_pid: int) -> None:
    """Exit as soon as the process that made the pool ends. A worker's parent is the fork server, which outlives that
    process while any worker holds its pipe, so the parent's death signal would never come."""
    try:
        watched = os.pidfd_open(main_pid)
    except ProcessLookupError:  # it ended before this worker started
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd (not Linux 5.3+): look once a second instead
        watched = None

    def watch() -> None:
        if watched is not None:
            select.select([watched], [], [])
        else:
            while _alive(main_pid):
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="hpa_nb-exit-with-main", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ready(_: int) -> int:
    return os.getpid()


class Workers:
    """``with Workers(n, preload=[...]) as workers: for result in workers.map(function, items): ...``."""

    def __init__(self, workers: int | None = None, preload: Sequence[str] = (), in_flight: int | None = None) -> None:
        self.count = resolve(workers)
        self.preload, self.in_flight = list(preload), in_flight or 2 * self.count
        self.pool: ProcessPoolExecutor | None = None
        self.slots: Any = None

    def __enter__(self) -> "Workers":
        keep_freed_memory()  # one worker works in this process
        if self.count > 1:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(self.preload)
            self.slots = context.Array("q", self.in_flight, lock=False)
            self.pool = ProcessPoolExecutor(
                self.count, mp_context=context, initializer=_start_worker, initargs=(os.getpid(), self.slots)
            )
            try:  # every worker up before any work is timed
                pids = list(self.pool.map(_ready, range(self.count)))
            except BrokenProcessPool as exc:
                self.close()
                raise WorkerLost(f"a worker process could not start: {exc}") from None
            logger.debug(f"workers: {self.count} processes up (pids {', '.join(map(str, sorted(set(pids))))})")
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def map(
        self, function: Callable[[Any], Any], items: Iterable[Any], describe: Callable[[Any], str] = str
    ) -> Iterator[Any]:
        """``function(item)`` for each item, in order; `describe(item)` names the item a dead worker held."""
        if self.pool is None:
            yield from map(function, items)
            return
        pending: collections.deque = collections.deque()
        remaining = enumerate(items)

        def submit() -> None:  # at most in_flight pending, numbered in a row: their slots never clash
            for number, item in remaining:
                slot = number % self.in_flight
                self.slots[slot] = 0
                pending.append((item, slot, self.pool.submit(_run, function, item, slot)))
                return

        for _ in range(self.in_flight):
            submit()
        while pending:
            item, slot, future = pending.popleft()
            try:
                result = future.result()
            except BrokenProcessPool:
                self.close()  # every worker down: the slots are final
                held = [
                    describe(each)
                    for each, each_slot, _ in [(item, slot, future), *pending]
                    if self.slots[each_slot] > 0
                ]
                where = f"working on {' and '.join(held)}" if held else f"before {describe(item)} was done"
                raise WorkerLost(
                    f"a worker process died while {where} (killed, or out of memory): run again with fewer workers"
                ) from None
            submit()
            yield result
