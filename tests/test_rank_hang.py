"""A rank that hangs or dies in a 2-process (gloo) run: the survivor stops within train.collective_timeout with a
message naming the stuck rank and the last good checkpoint, the launcher exits non-zero and no process is left."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from koala.distill.hang import Heartbeat, hang_message, is_collective_failure

TIMEOUT = 5  # train.collective_timeout of the launched run, seconds
# torch elastic's launcher, once one worker failed, sends the others SIGTERM and 30 s later SIGKILL (a stopped
# process does not act on SIGTERM): the launcher ends within TIMEOUT + 30 s + start-up, far inside this deadline
DEADLINE = 180


def _launch(port: int, out, *extra) -> list[str]:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(port), "-m", "koala.cli", "distill", "--config", "tiny"]
    return [*launch, f"train.output_dir={out}", *extra]


def _worker(launcher: psutil.Process, rank: int) -> psutil.Process | None:
    for p in launcher.children(recursive=True):
        try:
            if p.environ().get("RANK") == str(rank):
                return p
        except psutil.Error:
            continue
    return None


def _steps_logged(out) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGSTOP", "SIGKILL"])
def test_a_stopped_or_killed_rank_ends_the_run(sig, tiny_pipe_dir, tmp_path):
    out = tmp_path / "run"
    port = {"SIGSTOP": 29561, "SIGKILL": 29563}[sig]
    cmd = _launch(
        port,
        out,
        f"teacher.pipeline={tiny_pipe_dir}",
        "train.max_steps=100000",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=1",
        "train.log_every=1",
        "train.progress=false",
        "train.log_with=none",
        "validation.every=0",
        f"train.collective_timeout={TIMEOUT}",
    )
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    log_path = tmp_path / "log.txt"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    launcher, stuck = psutil.Process(proc.pid), None
    try:
        start = time.monotonic()
        while _steps_logged(out) < 3:  # a checkpoint (step 2) exists and the run is under way
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() - start < DEADLINE, "the run did not start"
            time.sleep(0.2)
        workers = launcher.children(recursive=True)
        stuck = _worker(launcher, 1)
        assert stuck is not None and len(workers) >= 2
        stuck.send_signal(getattr(signal, sig))
        rc = proc.wait(timeout=DEADLINE)
        log = log_path.read_text()
        assert rc != 0, log[-3000:]
        if sig == "SIGSTOP":
            assert "rank 0/2: a collective failed (no answer within train.collective_timeout=5 s)" in log, log[-3000:]
            assert "rank 1 stopped responding" in log
            assert "(override train.collective_timeout=...)" in log  # the CLI names the setting
            assert f"the last good checkpoint is {out}/checkpoints/step-" in log
        elif "rank 0/2: a collective failed" in log:  # rank 0 saw the loss before the launcher stopped it
            assert "rank 0/2: a collective failed (a process left the run); the other process is rank 1" in log
            assert f"the last good checkpoint is {out}/checkpoints/step-" in log
        else:  # the launcher stopped rank 0 first (torch elastic ends the group when a worker dies): its report
            assert "Signal 9 (SIGKILL) received by PID" in log, log[-3000:]
        assert not [p.pid for p in workers if _alive(p)]  # no process is left
    finally:
        if stuck is not None and _alive(stuck):
            stuck.send_signal(signal.SIGCONT)
            stuck.kill()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class _Store:
    """A dict with the store calls Heartbeat uses (set, check, get, multi_get)."""

    def __init__(self):
        self.d = {}

    def set(self, k, v):
        self.d[k] = str(v).encode()

    def check(self, keys):
        return all(k in self.d for k in keys)

    def get(self, k):
        return self.d[k]

    def multi_get(self, keys):
        return [self.d[k] for k in keys]


def test_heartbeat_names_the_rank_whose_counter_stopped():
    store = _Store()
    mine = Heartbeat(0, 3, 0.05, store=store)
    others = [Heartbeat(r, 3, 0.05, store=store) for r in (1, 2)]
    time.sleep(0.4)
    assert mine.stuck_ranks() == []
    others[1].close()  # rank 2 stops beating (what SIGSTOP does to its thread)
    time.sleep(0.5)
    assert mine.stuck_ranks() == [2]
    others[0].close(), mine.close()
    # no store (a single process, or a process group without one): it cannot tell
    assert Heartbeat(0, 2, 0.05, store=None).stuck_ranks() is None
    gloo = RuntimeError("[third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv")
    assert is_collective_failure(gloo)
    assert not is_collective_failure(RuntimeError("the teacher worker timed out"))  # not a collective
    assert not is_collective_failure(ValueError("gloo timed out"))
    msg = hang_message(gloo, 0, 4, None, 5)
    assert "cannot tell which rank" in msg and "train.collective_timeout=5 s" in msg
    assert "rank 1 is" not in hang_message(gloo, 0, 2, [1], 5) and "rank 1 stopped" in hang_message(gloo, 0, 2, [1], 5)
