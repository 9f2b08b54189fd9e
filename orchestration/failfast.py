"""Stop a sweep whose trials all fail the same way, instead of retrying each of them.

An exception raised in a Tune callback is logged and swallowed by Tune, and a ``Stopper``
ends the unstarted trials as TERMINATED (so ``--resume`` would never run them). So
:class:`FailFast` stops the sweep the way Ctrl-C does (SIGINT to the driver, which Tune
handles by saving the experiment with every unfinished trial resumable), and leaves the
reason for the driver to read with :func:`stopped`.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from ray.tune import Callback

from orchestration.tracking import error_text

__all__ = ["FailFast", "SweepStopped", "stopped"]

_stopped: list[SweepStopped] = []  # this driver's, set by FailFast


def stopped() -> SweepStopped | None:
    """Why :class:`FailFast` stopped this process's latest sweep, or None."""
    return _stopped[-1] if _stopped else None


class SweepStopped(RuntimeError):
    """Raised by :class:`FailFast` out of ``Tuner.fit``; ``error`` is the error in full."""

    def __init__(self, trials: list[str], error: str) -> None:
        super().__init__(f"trials {', '.join(trials)} ended on the same error")
        self.trials = trials
        self.error = error


def _signature(error: str) -> str:
    """The line that says what went wrong: the last non-empty line of a traceback."""
    lines = [line for line in error.strip().splitlines() if line.strip()]
    return lines[-1] if lines else error


class FailFast(Callback):
    """Ray Tune callback (driver side): once two trials have failed with the same error
    (the same last line) before any trial has succeeded, stop the sweep (see the module).
    Unstarted trials stay pending, so ``--resume`` runs them once the cause is fixed."""

    def __init__(self) -> None:
        self._seen: dict[str, set[str]] = {}
        self._succeeded = False
        _stopped.clear()  # a new (or restored) sweep

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()

    def _failed(self, trial: Any) -> None:
        error = error_text(trial)
        trials = self._seen.setdefault(_signature(error), set())
        trials.add(str(trial))
        if len(trials) >= 2 and not self._succeeded and not _stopped:
            _stopped.append(SweepStopped(sorted(trials), error))
            os.kill(os.getpid(), signal.SIGINT)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._failed(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._failed(trial)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._succeeded = True
