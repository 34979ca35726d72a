"""Work split across processes, each writing its own resumable part (``koala eval run``, ``koala data syncap``).

Process ``rank`` of ``world_size`` takes items ``k`` with ``k % world_size == rank`` (as ``koala cache`` takes its
shards) and appends to its own part file, ``NAME.rankR-of-W.EXT`` beside ``NAME.EXT``; a reader takes the union of
the file and every part, so a run resumes whatever the world size it is started with. Processes started together
(``accelerate launch`` / ``torchrun``: ``MASTER_ADDR`` and ``WORLD_SIZE`` in the environment) meet at a gloo barrier
when their share is done and rank 0 merges; processes started on their own (``--rank`` / ``--world-size``) each
write their part and stop, and one ``--merge`` run writes the merged result.
"""

from __future__ import annotations

import glob
import os
from datetime import timedelta

from ..errors import KoalaError

# how long the first process to finish waits at the barrier for the others (a slow rank: its whole share)
BARRIER_TIMEOUT_S = int(os.environ.get("KOALA_BARRIER_TIMEOUT", 7 * 24 * 3600))


def env_rank() -> int:
    """This process's rank from the launcher's environment (``RANK``; 0 alone)."""
    return int(os.environ.get("RANK", 0))


def env_world_size() -> int:
    """The number of processes from the launcher's environment (``WORLD_SIZE``; 1 alone)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise KoalaError(f"--rank {rank} / --world-size {world_size}: need 0 <= rank < world size", option="rank")


def part_path(path: str, rank: int, world_size: int) -> str:
    """Where process ``rank`` of ``world_size`` appends what would go to ``path`` (``path`` itself alone)."""
    if world_size <= 1:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}.rank{rank}-of-{world_size}{ext}"


def part_paths(path: str) -> list[str]:
    """``path`` and every part written beside it (by any world size), those that exist, in a fixed order."""
    root, ext = os.path.splitext(path)
    parts = sorted(glob.glob(f"{glob.escape(root)}.rank*-of-*{ext}"))
    return ([path] if os.path.isfile(path) else []) + parts


def share(items: list, rank: int, world_size: int) -> list:
    """The items process ``rank`` of ``world_size`` does: ``items[k]`` with ``k % world_size == rank``."""
    return items[rank::world_size]


def rank_device(device: str | None, world_size: int) -> str | None:
    """Several processes on one machine: each on its own GPU, ``cuda:(LOCAL_RANK mod the GPU count)``, unless a
    device is named (``cuda`` alone counts as unnamed); ``device`` otherwise."""
    if world_size <= 1 or device not in (None, "cuda"):
        return device
    import torch

    if not torch.cuda.is_available():
        return device
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"


def launched_together(world_size: int) -> bool:
    """True when a launcher started ``world_size`` > 1 processes that can meet (a rendezvous address is set)."""
    return world_size > 1 and env_world_size() == world_size and bool(os.environ.get("MASTER_ADDR"))


def wait_for_all(what: str) -> None:
    """Block until every process launched together reaches this point (a gloo barrier, no accelerator needed)."""
    import torch.distributed as dist

    ours = not dist.is_initialized()
    try:
        if ours:
            dist.init_process_group("gloo", timeout=timedelta(seconds=BARRIER_TIMEOUT_S))
        dist.barrier()
    except (RuntimeError, ValueError) as err:
        raise KoalaError(
            f"{what}: another process stopped before finishing its share ({str(err).splitlines()[0][:200]}); "
            "run the same command again (every part resumes)"
        ) from None
    finally:
        if ours and dist.is_initialized():
            dist.destroy_process_group()
