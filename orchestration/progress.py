"""A compact progress display for sweeps: one line per trial event (a packed trial's end:
one line per point), epochs throttled."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from ray.tune import Callback

from modloss.names import curve
from orchestration.tracking import error_text, point_name, trial_points, trial_status

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

__all__ = ["ProgressPrinter"]


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


class ProgressPrinter(Callback):
    """Prints trial starts and ends, and each trial's epochs at most every ``interval`` s,
    each line prefixed with the time since the start and the points done out of ``total``
    (the sweep's points; by default those of the trials created so far) and running (a
    trial is one point, or with ``pack: true`` the points of its pack).

    Ray pickles callbacks with the experiment, so this holds no stream: it writes to
    whatever ``sys.stdout`` is when it prints.
    """

    def __init__(self, interval: float = 10.0, total: int | None = None) -> None:
        self.interval = interval
        self.total = total
        self._start = time.monotonic()
        self._last: dict[str, float] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"interval": self.interval, "total": self.total}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def _print(self, trials: list[Trial], text: str, now: tuple[Trial, str] | None = None) -> None:
        """``now``: the trial this reports and the status it is getting (Ray calls
        on_trial_start and on_trial_complete before it sets RUNNING or TERMINATED)."""

        def status(t: Trial) -> str:
            return now[1] if now is not None and t is now[0] else t.status

        def points(*statuses: str) -> int:
            chosen = [t for t in trials if not statuses or status(t) in statuses]
            return sum(len(trial_points(t)) for t in chosen)

        done, running = points("TERMINATED", "ERROR"), points("RUNNING")
        elapsed = time.monotonic() - self._start
        print(
            f"[{elapsed:7.1f}s {done}/{self.total or points()} done, {running} running] {text}",
            file=sys.stdout,
            flush=True,
        )

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any):
        size = len(trial_points(trial))
        text = f"start    {trial}" + (f" ({size} points)" if size > 1 else "")
        self._print(trials, text, now=(trial, "RUNNING"))

    def on_trial_result(
        self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any
    ):
        points = trial_points(trial, result)
        epoch, epochs, now = result.get("epoch"), points[0][0]["epochs"], time.monotonic()
        if result.get("summary") or epoch is None:
            return
        last = self._last.get(trial.trial_id)
        if last is not None and now - last < self.interval and epoch != epochs:
            return
        self._last[trial.trial_id] = now
        shown = " ".join(
            f"{k} {_fmt(result[k])}"
            for k in (curve("train_loss"), curve("val_error"), "val_error")
            if k in result
        )
        if len(points) > 1:  # the pack's val_error is its best point's
            live = sum(report.get("status") == "running" for _, report in points)
            shown += f" (best of {len(points)} points, {live} training)"
        self._print(trials, f"epoch    {trial} {epoch}/{epochs} {shown}")

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any):
        packed = "pack" in trial.config
        for config, last in trial_points(trial):
            status = trial_status("TERMINATED", last, config["epochs"])
            shown = " ".join(
                f"{k} {_fmt(last[k])}"
                for k in ("best_epoch", "val_error", "test_error")
                if last.get(k) is not None
            )
            name = f"{trial}/{point_name(config)}" if packed else str(trial)
            self._print(trials, f"{status:<8} {name} {shown}", now=(trial, "TERMINATED"))

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any):
        self._print(trials, f"retry    {trial} (failure {trial.num_failures})")

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any):
        last_line = error_text(trial).strip().splitlines()[-1:] or ["unknown error"]
        self._print(trials, f"failed   {trial}: {last_line[0]}")
