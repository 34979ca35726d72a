"""Stopping cleanly: SIGTERM / SIGUSR1 / Ctrl-C ask a long loop to save and stop at its next unit of work."""

from __future__ import annotations

PREEMPTED_EXIT = 3  # exit status of a command stopped by SIGTERM / SIGUSR1 / Ctrl-C after saving its state


class StopRequest:
    """``with StopRequest() as stop: ... if stop.requested: save and leave``.

    SIGTERM and SIGUSR1 (what cluster schedulers send before killing a job) and the first Ctrl-C set
    ``requested`` (the signal's name) instead of killing the process, so a loop can finish its unit of work and
    save; a second Ctrl-C raises KeyboardInterrupt at once. Outside the main thread (where handlers cannot be
    installed) it does nothing. The previous handlers are restored on exit."""

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, _frame):
        import signal

        name = signal.Signals(signum).name
        if self.requested and name == "SIGINT":
            raise KeyboardInterrupt
        if not self.requested:
            self.requested = name
            print(
                f"\nkoala: {name} received: finishing the current step, then saving and stopping "
                "(Ctrl-C again to stop at once)",
                flush=True,
            )

    def __enter__(self) -> "StopRequest":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> bool:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False
