"""Wall-clock budgets for work that may not terminate (Torch-Pruning's graph walks can loop forever).

A `Budget` raises `BudgetExceeded` *inside* the guarded code when time runs out, so a hung pure-Python
loop is interrupted instead of blocking the caller:

- on the main thread, with no other interval timer or SIGALRM handler in use, through
  `signal.setitimer(ITIMER_REAL)` (this also interrupts `time.sleep` and other blocking calls);
- elsewhere (worker threads, or when SIGALRM is taken), through a watcher thread that injects the
  exception with `PyThreadState_SetAsyncExc` (delivered at the next bytecode, not inside a C call).

Either way the exception is re-raised every `repeat_s` seconds until the block exits, because some
libraries swallow exceptions with a bare `except:` (Torch-Pruning does around the model's forward).
"""

from __future__ import annotations

import ctypes
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["Budget", "BudgetExceeded"]


class BudgetExceeded(BaseException):
    """Raised inside the guarded block when its budget is spent (a BaseException, like KeyboardInterrupt)."""


class Budget:
    """A deadline plus the name of the phase currently running, for error messages.

    Use `with budget.guard():` around the work and set `budget.phase` as the work advances.
    """

    def __init__(self, seconds: float, repeat_s: float = 0.25) -> None:
        self.seconds = float(seconds)
        self.repeat_s = float(repeat_s)
        self.phase = "starting"
        self.start = time.monotonic()
        self.fired = False

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @contextmanager
    def guard(self) -> Iterator[Budget]:
        """Run the block under the budget; raises `BudgetExceeded` in it when the deadline passes."""
        self.start = time.monotonic()
        if self.seconds <= 0:
            self.fired = True
            raise BudgetExceeded
        if _can_use_sigalrm():
            with self._sigalrm():
                yield self
        else:
            with self._async_exc():
                yield self

    # -- main thread: SIGALRM -------------------------------------------------------------------
    @contextmanager
    def _sigalrm(self) -> Iterator[None]:
        armed = [True]

        def handler(signum: int, frame: FrameType | None) -> None:
            if armed[0]:
                self.fired = True
                raise BudgetExceeded

        previous = signal.getsignal(signal.SIGALRM)

        def disarm() -> None:
            signal.setitimer(signal.ITIMER_REAL, 0.0, 0.0)
            armed[0] = False
            signal.signal(signal.SIGALRM, previous)

        try:  # armed inside the try: an interrupt while arming still disarms
            with _sigint_deferred():
                signal.signal(signal.SIGALRM, handler)
                signal.setitimer(signal.ITIMER_REAL, self.seconds, self.repeat_s)
            yield
        finally:
            _until_done(disarm)

    # -- any thread: asynchronous exception from a watcher thread ----------------------------------
    @contextmanager
    def _async_exc(self) -> Iterator[None]:
        target = threading.get_ident()
        lock = threading.Lock()
        done = threading.Event()
        injected = [False]

        def watch() -> None:
            wait = self.seconds
            while not done.wait(wait):
                with lock:
                    if done.is_set():
                        return
                    self.fired = True
                    injected[0] = True
                    _set_async_exc(target, BudgetExceeded)
                wait = self.repeat_s

        def stop() -> None:  # and no exception left pending for this thread
            with lock:
                done.set()
                if injected[0]:
                    _set_async_exc(target, None)

        watcher = threading.Thread(target=watch, name="wt-budget", daemon=True)
        try:  # started inside the try: an interrupt while starting still stops it
            with _sigint_deferred():
                watcher.start()
            yield
        finally:
            _until_done(stop)
            if watcher.ident is not None:
                _until_done(watcher.join)


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) back while a timer is armed, so that it arrives after, when cleanup is certain
    (main thread, POSIX; elsewhere Ctrl-C is not delivered to this thread anyway)."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _until_done(step: Callable[[], None]) -> None:
    """Run a cleanup step to completion: the budget's own exception (the alarm may go off meanwhile) retries
    it, and a Ctrl-C arriving meanwhile is re-raised once the step has finished, never left half done."""
    interrupted: KeyboardInterrupt | None = None
    while True:
        try:
            step()
            break
        except BudgetExceeded:
            continue
        except KeyboardInterrupt as e:
            interrupted = e
    if interrupted is not None:
        raise interrupted


def _can_use_sigalrm() -> bool:
    """SIGALRM is usable only on the main thread, and only if nobody else is using the timer or the signal."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        return False
    if signal.getitimer(signal.ITIMER_REAL) != (0.0, 0.0):
        return False
    return signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, signal.SIG_IGN, None)


def _set_async_exc(thread_id: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc else None)
