"""A rank that hangs: the process group's timeout (``train.collective_timeout``) and which rank stopped.

A collective (DDP's gradient all-reduce, the trainer's stop-flag reduce, a barrier) waits for every process. When
one process stops answering (SIGSTOP, a stuck data loader, a frozen host) the others wait in that collective; the
process group's timeout ends the wait with a ``RuntimeError`` from the backend (gloo: ``Timed out waiting ...``),
which names no rank. :class:`Heartbeat` keeps a small counter per rank in the process group's key-value store,
bumped by a background thread every ``interval`` seconds (a thread runs on while its process waits in a collective,
and stops with a stopped or dead process). Each rank's thread also reads the others' counters, so when a collective
fails :meth:`Heartbeat.stuck_ranks` answers at once: the ranks whose counter has not moved for several intervals.
"""

from __future__ import annotations

import re
import threading
import time

import torch

_COLLECTIVE_FAILURE = re.compile(r"timed out|timeout|connection closed|connection reset|broken pipe", re.I)
_BACKEND = re.compile(r"gloo|nccl|c10d|ProcessGroup", re.I)


def is_collective_failure(err: BaseException) -> bool:
    """A collective that timed out or lost a peer (gloo / NCCL / c10d errors; not any RuntimeError that says
    "timeout")."""
    dist_error = getattr(torch.distributed, "DistError", ())
    if isinstance(err, dist_error) and _COLLECTIVE_FAILURE.search(str(err)):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and bool(_COLLECTIVE_FAILURE.search(text) and _BACKEND.search(text))


def _default_store():
    """The process group's store (every launcher gives one; None when there is no process group)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # a torch without it, or a group without a store: the message then cannot name the rank
        return None


class Heartbeat:
    """Per-rank liveness counters in the process group's store (see the module docstring)."""

    def __init__(self, rank: int, world_size: int, interval: float, store=None):
        self.rank, self.world_size, self.interval = rank, world_size, float(interval)
        self.store = store if store is not None else _default_store()
        self.seen: dict[int, tuple[bytes, float]] = {}  # rank -> (its last counter, when it last changed)
        self._stop = threading.Event()
        self._thread = None
        if self.store is not None and world_size > 1:
            self._thread = threading.Thread(target=self._run, name="koala-heartbeat", daemon=True)
            self._thread.start()

    def _key(self, rank: int) -> str:
        return f"koala/heartbeat/{rank}"

    def _run(self) -> None:
        beat = 0
        while not self._stop.is_set():
            try:
                beat += 1
                self.store.set(self._key(self.rank), str(beat))
                self._read_others()
            except Exception:  # the store went away (the run is ending): nothing more to learn
                return
            self._stop.wait(self.interval)

    def _read_others(self) -> None:
        """One ``multi_get`` once every rank has beaten (a missing key would block it), key by key before."""
        now, ranks = time.monotonic(), [r for r in range(self.world_size) if r != self.rank]
        keys = [self._key(r) for r in ranks]
        if hasattr(self.store, "multi_get") and self.store.check(keys):
            values = dict(zip(ranks, self.store.multi_get(keys)))
        else:
            values = {r: self.store.get(k) for r, k in zip(ranks, keys) if self.store.check([k])}
        for r, value in values.items():
            if r not in self.seen or self.seen[r][0] != value:
                self.seen[r] = (value, now)

    def stuck_ranks(self) -> list[int] | None:
        """Ranks whose counter has not moved for 3 intervals (or never appeared); None when this cannot tell (no
        store, or the thread stopped)."""
        if self._thread is None or not self._thread.is_alive():
            return None
        now, quiet = time.monotonic(), 3 * self.interval
        return [
            r
            for r in range(self.world_size)
            if r != self.rank and (r not in self.seen or now - self.seen[r][1] > quiet)
        ]

    def close(self) -> None:
        self._stop.set()


def heartbeat_interval(timeout: float) -> float:
    """A tenth of the collective timeout, between 0.2 s and 5 s: a stuck rank shows as stuck well within it."""
    return min(5.0, max(0.2, timeout / 10))


def hang_message(err: BaseException, rank: int, world_size: int, stuck: list[int] | None, timeout: float) -> str:
    """What the surviving rank says: which rank stopped answering (or that it cannot tell) and the backend's words."""
    timed_out = bool(re.search(r"timed out|timeout", str(err), re.I))
    what = f"no answer within train.collective_timeout={timeout:g} s" if timed_out else "a process left the run"
    if stuck:
        names = ", ".join(str(r) for r in stuck)
        who = f"rank {names} stopped responding (no heartbeat: stopped, frozen or dead)"
    elif world_size == 2:
        other = 1 - rank
        who = (
            f"the other process is rank {other}; it is alive but did not reach the same collective"
            if timed_out
            else f"the other process is rank {other}"
        )
    else:
        who = "koala cannot tell which rank: every other rank still sends its heartbeat"
    backend = " ".join(str(err).split())[:200]
    return f"rank {rank}/{world_size}: a collective failed ({what}); {who} [{backend}]"
