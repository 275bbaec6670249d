"""The study's statistics: mean and sample std over seeds, the seed-paired difference to scratch with its percentile
bootstrap interval (scipy.stats.bootstrap), each arm's mean rank over budgets, and whether the task probe ranked the
arms as fine-tuning did (Spearman's rank correlation per budget)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sslkit.downstream.study.grid import SCRATCH


def mean_std(values) -> tuple[float, float, int]:
    """(mean, sample std with ddof=1 (nan for one value), n) over the finite values."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size)


def bootstrap_ci(values, level: float = 0.95, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values`: scipy.stats.bootstrap with `resamples` resamples drawn
    by np.random.default_rng(seed). (nan, nan) for no values; (v, v) when every value is v (no spread to resample).
    With n <= 3 values the 95 % interval is [min, max]: the all-minimum resample has probability >= 1/27 > 2.5 %."""
    from scipy.stats import bootstrap

    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return math.nan, math.nan
    if np.all(v == v[0]):
        return float(v[0]), float(v[0])
    res = bootstrap((v,), np.mean, confidence_level=level, n_resamples=resamples, method="percentile",
                    random_state=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


@dataclass
class PairedDifference:
    encoder: str
    budget: int
    seeds: list[int]
    diffs: list[float]           # Dice(encoder, s) - Dice(scratch, s), per seed
    mean: float
    ci: tuple[float, float]
    level: float

    @property
    def within_noise(self) -> bool:
        return len(self.diffs) < 2 or self.ci[0] <= 0.0 <= self.ci[1]

    def sentence(self, unit: str) -> str:
        n = len(self.diffs)
        head = (f"{self.budget} {unit}: {self.encoder} - scratch = {self.mean:+.4f} mean Dice over {n} seed"
                f"{'s' if n != 1 else ''}")
        if n < 2:
            return head + "; one seed gives no estimate of the noise."
        ci = f"{self.level:.0%} interval [{self.ci[0]:+.4f}, {self.ci[1]:+.4f}]"
        if self.within_noise:
            return f"{head} ({ci}): within noise, the interval holds 0."
        better = "better" if self.mean > 0 else "worse"
        return f"{head} ({ci}): beyond noise, the pretrained encoder is {better} than scratch."


def paired_differences(rows: list[dict], level: float = 0.95, resamples: int = 10_000,
                       seed: int = 0) -> list[PairedDifference]:
    """Per pretrained arm and budget: the seed-paired differences of mean Dice to scratch."""
    by = {(r["encoder"], r["budget"], r["seed"]): r["mean_dice"] for r in rows}
    out = []
    arms = sorted({r["encoder"] for r in rows} - {SCRATCH}, key=[r["encoder"] for r in rows].index)
    for arm in arms:
        for b in sorted({r["budget"] for r in rows}):
            seeds = sorted(s for (e, bb, s) in by if e == arm and bb == b and (SCRATCH, b, s) in by)
            d = [by[(arm, b, s)] - by[(SCRATCH, b, s)] for s in seeds]
            d_ok = [x for x in d if np.isfinite(x)]
            if not d_ok:
                continue
            out.append(PairedDifference(arm, b, seeds, d, float(np.mean(d_ok)),
                                        bootstrap_ci(d_ok, level, resamples, seed), level))
    return out


def budget_means(rows: list[dict], key: str = "mean_dice") -> dict[tuple[str, int], float]:
    """{(arm, budget): mean of `key` over its seeds}."""
    out = {}
    for arm, b in {(r["encoder"], r["budget"]) for r in rows}:
        m, _, n = mean_std([r[key] for r in rows if r["encoder"] == arm and r["budget"] == b])
        if n:
            out[(arm, b)] = m
    return out


def mean_ranks(rows: list[dict]) -> dict[str, float]:
    """Each arm's rank by mean Dice (1 = best; ties share the mean rank) at every budget all arms finished,
    averaged over those budgets."""
    from scipy.stats import rankdata

    means = budget_means(rows)
    arms = sorted({a for a, _ in means})
    ranks: dict[str, list[float]] = {a: [] for a in arms}
    for b in sorted({b for _, b in means}):
        if all((a, b) in means for a in arms):
            for a, r in zip(arms, rankdata([-means[(a, b)] for a in arms])):
                ranks[a].append(float(r))
    return {a: float(np.mean(v)) for a, v in ranks.items() if v}


@dataclass
class ProbeAgreement:
    """Spearman's rank correlation between a task-probe figure of each arm (the study uses its gain over the
    encoder's random-init line) and its fine-tuned mean Dice, per budget and their mean: +1 when the probe ranked
    the arms exactly as fine-tuning did."""
    per_budget: dict[int, float]
    mean: float
    arms: list[str]


def probe_agreement(rows: list[dict], probe: dict[str, float]) -> ProbeAgreement | None:
    """None unless at least 3 arms have a probe figure and fine-tuned cells at some budget."""
    from scipy.stats import spearmanr

    means = budget_means(rows)
    arms = sorted(a for a in probe if probe[a] is not None and np.isfinite(probe[a]))
    per = {}
    for b in sorted({b for _, b in means}):
        have = [a for a in arms if (a, b) in means]
        if len(have) >= 3:
            rho = spearmanr([probe[a] for a in have], [means[(a, b)] for a in have]).statistic
            per[b] = float(rho)
    finite = [v for v in per.values() if np.isfinite(v)]
    if not per:
        return None
    return ProbeAgreement(per, float(np.mean(finite)) if finite else math.nan, arms)
