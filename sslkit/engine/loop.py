"""The one training loop of pretraining and fine-tuning (DESIGN.md, "One loop").

The loop owns what both have in common: step counters and elapsed time, the non-finite policy, metrics.jsonl, the
trackers (TensorBoard / MLflow / W&B) and the progress bar, the checkpoint cadence and which checkpoints pruning must keep (the last healthy one, the
best one), stopping on a signal, and the trainer state every checkpoint carries. A `Task` supplies the rest:

    task.restore(state)                      resume its own state from the checkpoint the run continues from
    task.step_zero()                         metrics of step 0, before any update (task probe, references)
    task.optimizer_step(policy)              one optimizer step (all its micro-batches) -> StepOutcome
    task.end_step(step, outcome)             after the update: EMA, monitor, validation -> StepReport
    task.save(step, trainer_state, protect)  write the checkpoint of `step` (collective)
    task.finish(result)                      exports and summaries once the loop ends -> files for the trackers

Counters travel in every checkpoint's trainer.json; a resumed run continues them exactly.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field

from sslkit import run as R
from sslkit.engine import distributed as D
from sslkit.engine.distributed import read_scalars


# ------------------------------------------------------------------------------------------------ policy


class NonfinitePolicy:
    """`train.nonfinite`: what a NaN / inf loss or gradient norm does. `skip` drops that optimizer step (the weights,
    the EMA teacher and the optimizer state stay as they were; the lr schedule moves on) and stops the run after
    `R.MAX_SKIPPED_IN_A_ROW` in a row; `stop` ends the run at the first one. Weights that already hold NaN / inf
    always stop it."""

    def __init__(self, mode: str):
        self.mode = mode
        self.in_a_row = 0

    def verdict(self, bad: bool, poisoned: bool = False) -> str | None:
        """None: go on (apply a finite step, skip a bad one); else why the run stops. Collective callers pass
        flags already agreed across ranks."""
        if poisoned:
            return "the weights themselves hold NaN / inf"
        if not bad:
            return None
        if self.mode == "stop":
            return "train.nonfinite: stop"
        if self.in_a_row + 1 >= R.MAX_SKIPPED_IN_A_ROW:
            return f"{self.in_a_row + 1} non-finite steps in a row"
        return None


@dataclass
class StepOutcome:
    """One optimizer step as the task ran it. `logs` values may be tensors: the loop reads them in one go."""
    applied: bool                      # the update reached the weights (False: skipped as non-finite)
    logs: dict = field(default_factory=dict)
    stop: str | None = None            # the non-finite policy ended the run: why (the update was not applied)
    samples: int = 0                   # samples this step trained on (all ranks)


@dataclass
class StepReport:
    """What the task says after a step: metrics for the row, alarm events, and checkpoint wishes."""
    metrics: dict = field(default_factory=dict)
    events: list = field(default_factory=list)
    stop: bool = False                 # an alarm (or the task) ends the run after this step
    checkpoint: bool = False           # write a checkpoint at this step whatever the cadence
    healthy: bool = False              # this step's checkpoint, if written, is a healthy one
    best: float | None = None          # a new best value of the task's selection metric at this step


@dataclass
class Counters:
    """Where the loop stands; travels in every checkpoint (trainer.json) but `in_a_row` (reset on resume)."""
    step: int = 0
    elapsed: float = 0.0
    skipped: int = 0                   # optimizer steps dropped for a non-finite loss / gradient
    healthy: str | None = None         # the last checkpoint saved while the monitor raised no alarm
    best: dict | None = None           # {"step", "value", "checkpoint"}: the best step by the task's metric

    def state(self) -> dict:
        return {"step": self.step, "elapsed": self.elapsed, "skipped_steps": self.skipped, "healthy": self.healthy,
                "best": self.best}

    @classmethod
    def from_state(cls, s: dict) -> "Counters":
        return cls(int(s["step"]), float(s.get("elapsed", 0.0)), int(s.get("skipped_steps", 0)), s.get("healthy"),
                   s.get("best"))


@dataclass
class LoopResult:
    steps: int                         # optimizer steps completed
    finished: bool                     # reached the last step
    stopped_by_signal: str | None = None
    stopped_by_alarm: bool = False
    nonfinite: str | None = None       # the one line a non-finite stop printed
    fallback: object = None            # the last checkpoint written, when the final weights could not be (non-finite)
    last: dict = field(default_factory=dict)
    counters: Counters = field(default_factory=Counters)


def say(bar, text: str) -> None:
    """A line on stderr that does not tear the progress bar."""
    if bar is not None:
        bar.write(text, file=sys.stderr)
    else:
        print(text, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ the loop


class Loop:
    """Drives one task over `total_steps` optimizer steps in the run directory `run` (rank 0 owns its files)."""

    def __init__(self, task, run: R.RunDir, cfg, total_steps: int, progress: bool, desc: str, postfix=None):
        """`cfg`: the run's config (its `train` and `logging` sections are read; `to_dict()` goes to the trackers)."""
        from sslkit.monitor.trackers import Trackers

        self.task, self.run_dir, self.t, self.total = task, run, cfg.train, total_steps
        self.rank = D.rank()
        self.policy = NonfinitePolicy(cfg.train.nonfinite)
        self.n = Counters()
        self.postfix = postfix or (lambda row: {"loss": f"{row.get('loss', math.nan):.4f}"})
        self.resumed = run.resume_from is not None
        self.unsaved, self.last_written = False, run.resume_from   # the last checkpoint save refused / written
        if self.resumed:
            self.n = Counters.from_state(task.restore(run.resume_from))
        self.trackers = self.metrics = self.bar = None
        if self.rank == 0:
            self.trackers = Trackers.open(cfg.logging, run.root, run.root.name, cfg.to_dict(),
                                          resume_step=self.n.step if self.resumed else None)
            self.metrics = R.JsonlWriter(run.root / "metrics.jsonl")
            self.bar = _progress_bar(desc, total_steps, self.n.step) if progress else None

    # one step --------------------------------------------------------------------------------------------

    def run(self) -> LoopResult:
        result = LoopResult(self.n.step, False, counters=self.n)
        try:
            if not self.resumed:
                zero = self.task.step_zero()
                if zero:
                    self._log({"step": 0, **zero}, [])
            t_last = time.perf_counter()
            while self.n.step < self.total:
                outcome = self.task.optimizer_step(self.policy)
                if outcome.stop:
                    result.nonfinite = self._nonfinite_line(self.n.step + 1, outcome.stop)
                    break
                self._count(outcome.applied)
                now = time.perf_counter()
                dt, t_last = now - t_last, now
                self.n.elapsed += dt
                report = self.task.end_step(self.n.step, outcome)
                row = self._row(outcome, report, dt)
                if self.rank == 0:
                    self._log(row, report.events)
                result.last = row
                if D.broadcast_flag(report.stop):  # every rank leaves the loop together
                    result.stopped_by_alarm = True
                    break
                if D.any_flag(self.task.stop_requested() is not None):
                    result.stopped_by_signal = self.task.stop_requested() or "a signal on another rank"
                if self._due(report) or result.stopped_by_signal:
                    self._save(report)
                if result.stopped_by_signal:
                    break
            result.finished = self.n.step >= self.total and not (result.stopped_by_alarm or result.nonfinite)
            if result.finished and self.unsaved:  # the final weights hold NaN / inf: never export them
                result.finished, result.fallback = False, self.last_written
                result.nonfinite = self._unsaved_line()
        except BaseException as e:  # the trackers learn that the run failed (or was interrupted), then it propagates
            if self.trackers is not None:
                self.trackers.close("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            self._close_outputs()
        result.steps = self.n.step
        if result.nonfinite and self.rank == 0:
            say(None, result.nonfinite)
        if self.n.skipped and self.rank == 0:
            say(None, f"sslkit: warning: {self.n.skipped} of {self.n.step} optimizer steps were skipped (non-finite "
                      "loss or gradient norm; counted in metrics.jsonl as skipped_steps)")
        artifacts = self.task.finish(result) or []
        if self.trackers is not None:
            for path in artifacts:
                self.trackers.log_artifact(path)
            self.trackers.close("KILLED" if result.stopped_by_signal else "FINISHED" if result.finished else "FAILED")
        return result

    def _count(self, applied: bool) -> None:
        self.n.step += 1
        if applied:
            self.policy.in_a_row = 0
        else:
            self.n.skipped += 1
            self.policy.in_a_row += 1

    def _row(self, outcome: StepOutcome, report: StepReport, dt: float) -> dict:
        n = self.n
        done = n.step / max(self.total, 1)
        row = {"step": n.step, **read_scalars(outcome.logs), **report.metrics, "skipped_steps": n.skipped,
               "samples_per_s": outcome.samples / max(dt, 1e-9), "step_time": dt, "time": n.elapsed,
               "eta_s": n.elapsed / done * (1 - done) if done else None}
        if report.best is not None:
            n.best = {"step": n.step, "value": float(report.best), "checkpoint": None}
        return row

    def _due(self, report: StepReport) -> bool:
        every = self.t.ckpt_every
        return report.checkpoint or self.n.step == self.total or bool(every and self.n.step % every == 0)

    def _save(self, report: StepReport) -> None:
        n, name = self.n, R.step_dir_name(self.n.step)
        if report.healthy:
            n.healthy = name
        if n.best is not None and n.best["step"] == n.step:
            n.best["checkpoint"] = name
        protect = {c for c in (n.healthy, (n.best or {}).get("checkpoint")) if c}
        written = self.task.save(n.step, n.state(), protect)
        self.unsaved = written is None
        self.last_written = written or self.last_written
        if written is None:  # the task refused (non-finite weights): the marks must not name a missing folder
            n.healthy = None if n.healthy == name else n.healthy
            if n.best is not None and n.best["checkpoint"] == name:
                n.best["checkpoint"] = None

    # outputs ---------------------------------------------------------------------------------------------

    def _log(self, row: dict, events) -> None:
        self.metrics.write(row)
        if self.trackers is not None:
            self.trackers.log_metrics(row["step"], row)
        if self.bar is not None and row["step"] > 0:
            self.bar.set_postfix(self.postfix(row), refresh=False)
            self.bar.update(row["step"] - self.bar.n)  # one refresh per step, showing this step's figures
        for e in events:
            say(self.bar, f"ALARM [{e.action}] {e.message}")
            if self.trackers is not None:
                self.trackers.log_alarm(e)

    def _close_outputs(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def _unsaved_line(self) -> str:
        where = (f"the encoder of the last finite checkpoint, {self.last_written}, is exported instead"
                 if self.last_written else "no finite checkpoint was written, so no encoder is exported")
        return (f"sslkit: stopped at step {self.n.step}: the final weights hold NaN / inf values and were not "
                f"checkpointed ({self.n.skipped} steps skipped on the way); {where}")

    def _nonfinite_line(self, step: int, why: str) -> str:
        """The one line a run stopped by a non-finite loss / gradient prints (step: the one not applied)."""
        last = R.newest_valid_checkpoint(self.run_dir.checkpoints) if self.rank == 0 else None
        where = f"last finite checkpoint: {last}" if last else "no checkpoint was written yet"
        healthy = f"; last healthy: checkpoints/{self.n.healthy}" if self.n.healthy else ""
        return f"sslkit: stopped at step {step}: non-finite loss or gradient norm ({why}); {where}{healthy}"


def _progress_bar(desc: str, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0)
