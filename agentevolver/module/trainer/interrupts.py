"""Ctrl-C during training: held over a checkpoint save, and otherwise taken at the phase boundaries of a step."""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """A SIGINT inside the block is held until the block ends, then raised as KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


class SigintAtSafePoints:
    """Inside the block, Ctrl-C only sets a flag; `check()` (called between the phases of a step) raises it as
    KeyboardInterrupt. The stop then lands at a known point whatever the main thread was blocked in (a
    ray.get does not always surface a KeyboardInterrupt: a run under load once finished normally after a
    Ctrl-C during its rollout), and a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _on_sigint(self, signum: int, frame: object) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def __enter__(self) -> SigintAtSafePoints:  # noqa: PYI034
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
