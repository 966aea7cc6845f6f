"""A larger first garbage-collector threshold while a relay runs.

Why: a relay allocates a dozen container objects per event (the ``Event``, its state, payload
and metadata, outcomes), and a whole batch stays alive until it is settled. With CPython's default
first threshold (700 allocations) a batch of 500 events triggers several young collections that
find nothing to free, promote the batch into the older generations, and so trigger full
collections that walk every object of the process (SQLAlchemy's and the application's modules
included). Measured with ``bench/relay.py`` (batch 500, memory provider): 64-70 µs of relay CPU
per event at 700 against 42-47 µs at 10,000 — about a fifth of the relay's throughput. Memory cost:
at most that many more young objects wait for their collection.

The threshold is process-wide, so it is raised while at least one relay of the process runs and
put back when the last one stops (unless something else changed it meanwhile).
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

__all__ = ["DEFAULT_GC_THRESHOLD", "young_gc_threshold"]

#: The first threshold a running relay asks for (CPython's default is 700).
DEFAULT_GC_THRESHOLD = 10_000

_lock = threading.Lock()
_users = 0
_saved: tuple[int, int, int] | None = None
_ours: int | None = None


@contextlib.contextmanager
def young_gc_threshold(threshold: int | None) -> Iterator[None]:
    """Raise the collector's first threshold to ``threshold`` inside the block (``None``: no-op).

    A threshold already higher (or 0, automatic collection off) is left as it is.
    """
    if threshold is None:
        yield
        return
    _acquire(threshold)
    try:
        yield
    finally:
        _release()


def _acquire(threshold: int) -> None:
    global _users, _saved, _ours
    with _lock:
        _users += 1
        if _users > 1:
            return
        current = gc.get_threshold()
        if current[0] == 0 or current[0] >= threshold:
            _saved = _ours = None
            return
        _saved, _ours = current, threshold
        gc.set_threshold(threshold, current[1], current[2])


def _release() -> None:
    global _users, _saved, _ours
    with _lock:
        _users -= 1
        if _users > 0:
            return
        if _saved is not None and gc.get_threshold()[0] == _ours:
            gc.set_threshold(*_saved)
        _saved = _ours = None
