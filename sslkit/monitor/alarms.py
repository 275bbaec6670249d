"""Threshold alarms over per-step metrics, with patience, and the built-in non-finite-loss alarm.

An alarm rule (AlarmConfig) names a metric, a `below` and/or `above` threshold, a patience and an action:
  warn               log the event and carry on
  stop               the engine stops the run (after writing a final checkpoint)
  stop_keep_healthy  the engine stops and keeps only checkpoints from before the violation began
                     (AlarmEvent.since_step is the first violating step)
A rule fires once, after `patience` consecutive violating steps; it re-arms when the metric is back in range.
A non-finite loss (`loss` or any `loss/<objective>`) is always recorded (a `warn`): the engine has already skipped
that optimizer step or stopped the run, as `train.nonfinite` says, so the weights never saw it.

Metric names are looked up as given, then with a `monitor/` prefix: `embedding_std` finds
`monitor/embedding_std`; `grad_norm` finds the engine's `grad_norm`.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass
from pathlib import Path

from sslkit.config import AlarmConfig

ACTIONS = ("warn", "stop", "stop_keep_healthy")
NONFINITE_LOSS = "loss"


@dataclass
class AlarmEvent:
    """One firing of an alarm, as written to alarms.jsonl."""

    step: int
    metric: str
    value: float
    threshold: float | None
    action: str
    message: str
    since_step: int | None = None   # first step of the violating streak

    @property
    def stops(self) -> bool:
        """True when the engine should stop the run."""
        return self.action in ("stop", "stop_keep_healthy")

    def to_dict(self) -> dict:
        """JSON-able record; non-finite values become strings ('nan', 'inf') so the line stays valid JSON."""
        d = asdict(self)
        for k in ("value", "threshold"):
            v = d[k]
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = str(v)
        return d


@dataclass(frozen=True)
class HealthBand:
    """Healthy and collapsed ranges of one metric. The chart shading, the summary colours, the run's verdict and
    the default alarm all read this one table, so the page cannot show a red band under a HEALTHY badge.

    key: full metric key as logged ('monitor/embedding_std', 'probe/spread'); alarm_metric: the name a default
    rule uses (alarm lookup resolves 'x' to 'monitor/x' too); below / above: the collapse threshold (a value
    below `below` or above `above` is collapsed); healthy: (lo, hi) shaded green, None for an open end;
    patience: steps (for probe metrics: probe evaluations) before the default alarm fires.
    """

    key: str
    alarm_metric: str
    below: float | None = None
    above: float | None = None
    healthy: tuple[float | None, float | None] = (None, None)
    patience: int = 5

    def is_collapsed(self, value: float) -> bool:
        """True when value is past the collapse threshold (NaN never is)."""
        return (self.below is not None and value < self.below) or (self.above is not None and value > self.above)

    def to_dict(self) -> dict:
        """JSON-able form for the dashboard page."""
        return {"key": self.key, "below": self.below, "above": self.above, "healthy": list(self.healthy)}


# Bank metrics are statistics of the objective's embeddings (projector outputs, centred near 0 when healthy).
# Probe metrics are statistics of the encoder's pooled deepest features on the fixed probe crops. Those share a
# large mean direction (raw mean cosine 0.88-0.99 in a healthy encoder), so they are judged by their spread
# around their own mean and the rank of that spread; sslkit/monitor/probe_stats.py gives the measurements.
# The raw probe statistics older runs logged (probe/embedding_std, probe/mean_cosine, probe/rankme) have no band.
HEALTH_BANDS: tuple[HealthBand, ...] = (
    HealthBand("monitor/embedding_std", "embedding_std", below=0.1, healthy=(0.5, 1.5), patience=5),
    HealthBand("monitor/rankme_ratio", "rankme_ratio", below=0.05, healthy=(0.2, 1.0), patience=5),
    HealthBand("monitor/mean_cosine", "mean_cosine", above=0.95, healthy=(-0.2, 0.3), patience=10),
    HealthBand("probe/spread", "probe/spread", below=0.05, healthy=(0.1, 1.0), patience=1),
    HealthBand("probe/centred_rankme", "probe/centred_rankme", below=1.5, healthy=(2.0, None), patience=1),
    # NaN / inf embeddings (a diverging run): any is a warning, and never enters the statistics above
    HealthBand("monitor/nonfinite_embeddings", "monitor/nonfinite_embeddings", above=0.0, healthy=(None, 0.0),
               patience=1),
    HealthBand("probe/nonfinite_embeddings", "probe/nonfinite_embeddings", above=0.0, healthy=(None, 0.0),
               patience=1),
)


def health_band(key: str) -> HealthBand | None:
    """The band of a full metric key, or None."""
    return next((b for b in HEALTH_BANDS if b.key == key), None)


def default_alarms() -> list[AlarmConfig]:
    """Rules used when a recipe lists none: one `warn` per health band, at its collapse threshold.
    The non-finite-loss record is always on regardless."""
    return [AlarmConfig(metric=b.alarm_metric, below=b.below, above=b.above, patience=b.patience, action="warn")
            for b in HEALTH_BANDS]


def as_number(v) -> float | None:
    """float of a Python/NumPy number or a one-element tensor; None for anything else (bool, str, ...)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, numbers.Real):
        return float(v)
    if hasattr(v, "numel") and hasattr(v, "item") and v.numel() == 1:
        return float(v.item())
    return None


def lookup_metric(name: str, metrics: dict) -> tuple[str, float] | None:
    """Find `name` (or `monitor/<name>`) in metrics; (key, value) or None when absent or not a number."""
    for key in (name, f"monitor/{name}"):
        v = as_number(metrics.get(key))
        if v is not None:
            return key, v
    return None


def crossed(below, above, value: float) -> tuple[str, float] | None:
    """('below'|'above', threshold) that `value` is past, else None: the one rule for an alarm's thresholds,
    shared by the alarms and the dashboard (thresholds that are not numbers are ignored; NaN crosses nothing)."""
    lo, hi = as_number(below), as_number(above)
    if lo is not None and value < lo:
        return "below", lo
    if hi is not None and value > hi:
        return "above", hi
    return None


def violated_threshold(rule: AlarmConfig, value: float) -> tuple[str, float] | None:
    """('below'|'above', threshold) that `value` violates under `rule`, else None. NaN violates nothing."""
    return crossed(rule.below, rule.above, value)


def nonfinite_losses(metrics: dict) -> dict[str, float]:
    """Loss entries (`loss`, `loss/...`) whose value is NaN or infinite."""
    out = {}
    for k, v in metrics.items():
        v = as_number(v) if (k == "loss" or k.startswith("loss/")) else None
        if v is not None and not math.isfinite(v):
            out[k] = v
    return out


class AlarmTracker:
    """Patience counters for a list of rules; `check` returns the events that fire at this step."""

    def __init__(self, rules: list[AlarmConfig], log_path: Path | None = None):
        for r in rules:
            if r.action not in ACTIONS:
                raise ValueError(f"alarm on '{r.metric}': action '{r.action}' is not one of {', '.join(ACTIONS)}")
            if r.below is None and r.above is None:
                raise ValueError(f"alarm on '{r.metric}': needs a 'below' or an 'above' threshold")
        self.rules = list(rules)
        self.log_path = log_path
        self.counters = [0] * len(self.rules)      # consecutive violating steps per rule
        self.since = [None] * len(self.rules)      # first step of the current streak
        self.fired = [False] * len(self.rules)     # fired during the current streak
        self.loss_fired = False
        self.last_healthy_step: int | None = None  # last step at which no rule was violated
        self.history: list[AlarmEvent] = []

    # ------------------------------------------------------------------------------------------ checking

    def check(self, step: int, metrics: dict) -> list[AlarmEvent]:
        """Update counters with this step's metrics; return (and log) the events that fire now."""
        events = self._check_loss(step, metrics)
        violating = bool(events)
        for i, rule in enumerate(self.rules):
            ev, bad = self._check_rule(i, rule, step, metrics)
            violating |= bad
            if ev is not None:
                events.append(ev)
        if not violating:
            self.last_healthy_step = step
        for ev in events:
            self._log(ev)
        self.history.extend(events)
        return events

    def _check_loss(self, step: int, metrics: dict) -> list[AlarmEvent]:
        bad = nonfinite_losses(metrics)
        if not bad:
            self.loss_fired = False
            return []
        if self.loss_fired:
            return []
        self.loss_fired = True
        key, value = next(iter(bad.items()))
        msg = f"step {step}: {key} is {value} (non-finite loss); the optimizer step was not applied (train.nonfinite)"
        return [AlarmEvent(step, key, value, None, "warn", msg, since_step=step)]

    def _check_rule(self, i: int, rule: AlarmConfig, step: int, metrics: dict) -> tuple[AlarmEvent | None, bool]:
        """(event or None, whether the rule is violated at this step). A missing/NaN metric leaves counters as is."""
        found = lookup_metric(rule.metric, metrics)
        if found is None or math.isnan(found[1]):
            return None, self.counters[i] > 0
        key, value = found
        hit = violated_threshold(rule, value)
        if hit is None:
            self.counters[i], self.since[i], self.fired[i] = 0, None, False
            return None, False
        if self.counters[i] == 0:
            self.since[i] = step
        self.counters[i] += 1
        if self.fired[i] or self.counters[i] < max(1, rule.patience):
            return None, True
        self.fired[i] = True
        side, threshold = hit
        msg = (f"step {step}: {key} = {value:.4g} {side} {threshold:g} for {self.counters[i]} steps "
               f"(since step {self.since[i]}); action {rule.action}")
        return AlarmEvent(step, key, value, threshold, rule.action, msg, since_step=self.since[i]), True

    def _log(self, event: AlarmEvent) -> None:
        if self.log_path is None:
            return
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event.to_dict()) + "\n")

    # ---------------------------------------------------------------------------------------- resume

    def state_dict(self) -> dict:
        """JSON-able counters, so a resumed run continues its streaks."""
        return {"counters": list(self.counters), "since": list(self.since), "fired": list(self.fired),
                "loss_fired": self.loss_fired, "last_healthy_step": self.last_healthy_step,
                "rules": [asdict(r) for r in self.rules]}

    def load_state_dict(self, d: dict) -> None:
        """Restore counters; ignored (reset) when the rules changed since the checkpoint."""
        if d.get("rules") != [asdict(r) for r in self.rules]:
            return
        self.counters = list(d["counters"])
        self.since = list(d["since"])
        self.fired = list(d["fired"])
        self.loss_fired = bool(d.get("loss_fired", False))
        self.last_healthy_step = d.get("last_healthy_step")
