"""``train.teacher_worker``: the frozen teacher in a process of its own, one micro-batch ahead of the student.

On CPU a KD step runs the teacher's forward and then the student's forward, backward and update, one after the
other. The teacher's part does not depend on the student, so a second process can run it for the next micro-batch
while the training process works on the current one: with a core each, a step takes about the longer of the two
instead of their sum (benchmarks/results/shapes-demo-tuning.md, round 4). The worker runs what
:meth:`koala.distill.trainer.Distiller.teacher_forward` runs -- the same module (its weights shared, not copied),
dtype, feature hooks, SDPA backend and thread count -- so a run trains the same weights with and without it.

The worker is started with ``spawn`` and gets the teacher before any hook is registered on it; tensors travel
through shared memory (torch.multiprocessing). It ignores SIGINT / SIGTERM (the training process stops it after
its checkpoint) and exits when the training process closes the pipe or dies.
"""

from __future__ import annotations

import atexit
import gc
import signal
import traceback

import torch
import torch.multiprocessing as mp

from ..errors import KoalaError
from ..utils.attention import attention_context
from ..utils.compile import compile_module
from .hooks import FeatureRecorder


def _serve(*args) -> None:
    """The worker process's target: :func:`_serve_requests`, then the heap frozen, so that the interpreter's exit
    skips a last garbage collection over everything torch and diffusers created (about a second)."""
    try:
        _serve_requests(*args)
    finally:
        gc.freeze()


def _serve_requests(
    conn,
    family_name: str,
    names: list[str],
    dtype,
    threads: int,
    attention: str,
    compile_scope: str | None,
    compile_backend: str,
) -> None:
    """The worker process: receive the teacher, then ``(noisy, t, cond)`` after ``(noisy, t, cond)``, sending
    back ``("ok", (output, features))`` or ``("error", traceback)``; stop on ``None`` or a closed pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        from ..families import get_family

        torch.set_num_threads(threads)
        teacher = conn.recv()
        family = get_family(family_name)
        recorder = FeatureRecorder(teacher, names, "teacher")
        if compile_scope:  # hooks first, compile second (as the trainer does)
            compile_module(teacher, compile_scope, compile_backend)
    except Exception:  # noqa: BLE001 - reported to the training process
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        noisy, t, cond = msg
        try:
            with torch.no_grad(), recorder.capture(), attention_context(attention):
                out = family.forward(teacher, noisy, t, cond, dtype=dtype)
            conn.send(("ok", (out, recorder.pop())))
        except Exception:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))


def _failed(trace: str) -> KoalaError:
    return KoalaError(
        f"the teacher worker process (train.teacher_worker) failed:\n{trace}", option="train.teacher_worker"
    )


class TeacherWorker:
    """A teacher process. :meth:`submit` inputs in order, :meth:`result` returns ``(output, features)`` for the
    oldest submitted input (first in, first out); :meth:`close` stops the process."""

    def __init__(
        self,
        teacher: torch.nn.Module,
        family_name: str,
        names: list[str],
        dtype: torch.dtype,
        threads: int | None = None,
        attention: str = "auto",
        compile_scope: str | None = None,
        compile_backend: str = "inductor",
    ):
        if next(teacher.parameters()).device.type != "cpu":
            raise KoalaError(
                "train.teacher_worker runs the teacher in a second CPU process; on a GPU keep it in the "
                "training process (train.teacher_worker=false)",
                option="train.teacher_worker",
            )
        if any(m._forward_hooks for m in teacher.modules()):
            raise RuntimeError("start the teacher worker before registering hooks on the teacher")
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._pending = 0  # inputs sent whose result has not been read
        # not daemonic: torch.compile's inductor may start compile workers of its own. The teacher goes through
        # the pipe, not the process arguments: a child that fails while starting then breaks the pipe instead of
        # leaving this process blocked on writing them (multiprocessing's spawn keeps the other end open meanwhile)
        self.process = ctx.Process(
            target=_serve,
            name="koala-teacher",
            daemon=False,
            args=(
                child,
                family_name,
                list(names),
                dtype,
                threads or torch.get_num_threads(),
                attention,
                compile_scope,
                compile_backend,
            ),
        )
        self.process.start()
        child.close()
        # closed before multiprocessing joins its children at exit (atexit runs last-registered first), also when
        # the caller never calls close()
        atexit.register(self.close)
        try:
            self._conn.send(teacher)  # its tensors are shared, not copied (torch.multiprocessing)
        except (BrokenPipeError, ConnectionResetError, OSError) as err:
            raise self._died() from err

    def submit(self, noisy: torch.Tensor, t: torch.Tensor, cond: dict) -> None:
        try:
            self._conn.send((noisy, t, cond))
        except (BrokenPipeError, OSError) as err:
            raise self._died() from err
        self._pending += 1

    def result(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not self._pending:
            raise RuntimeError("TeacherWorker.result() without a submitted input")
        while not self._conn.poll(1.0):
            if not self.process.is_alive():
                raise self._died()
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError) as err:
            raise self._died() from err
        self._pending -= 1
        if status != "ok":
            raise _failed(value)
        return value

    def _died(self) -> KoalaError:
        self.process.join(timeout=1)
        try:  # a worker that failed to start sends its traceback, then ends
            if self._conn.poll(0):
                status, value = self._conn.recv()
                if status == "error":
                    return _failed(value)
        except (EOFError, OSError):
            pass
        return KoalaError(
            f"the teacher worker process (train.teacher_worker) ended unexpectedly (exit code "
            f"{self.process.exitcode}; its error, if any, is above). Out of memory? Or, calling koala "
            "from a script: the worker is started with 'spawn', which imports the script again, so "
            'keep its top-level code under `if __name__ == "__main__":`. Or run with '
            "train.teacher_worker=false",
            option="train.teacher_worker",
        )

    def close(self, timeout: float = 30.0) -> None:
        """Stop the process (results still pending are dropped)."""
        atexit.unregister(self.close)
        if self._conn.closed:
            return
        if self.process.is_alive():
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(5)
        self._conn.close()
        self._pending = 0
