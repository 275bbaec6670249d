"""The Monitor: rolling embedding bank, per-step collapse metrics, alarms, the probe set, TensorBoard.

Engine usage (rank 0):
    mon = Monitor(cfg.monitor, run_dir)
    for each micro-batch:   mon.observe(out.embeddings, teacher_embeddings)
    after optimizer step:   m = mon.end_step(step, extra)          # 'monitor/...' metrics
                            events = mon.check_alarms(step, {**extra, **m})
                            if any(e.stops for e in events): stop
    every probe_every:      m.update(mon.probe(encoder, crops, step))   # 'probe/...' metrics
    checkpoint:             state["monitor"] = mon.state_dict();  mon.load_state_dict(...) on resume
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sslkit.config import MonitorConfig
from sslkit.monitor.alarms import AlarmEvent, AlarmTracker, default_alarms
from sslkit.monitor.metrics import as_embedding_matrix, collapse_statistics, teacher_student_cosine
from sslkit.monitor.probe_stats import probe_feature_statistics

ALARMS_FILE = "alarms.jsonl"


class Monitor:
    """Collapse metrics over a rolling bank of the last `bank_size` embeddings, plus alarms.

    With `cfg.enabled` False, observe/end_step do nothing, but the non-finite-loss stop still fires.
    An empty `cfg.alarms` list means `default_alarms()`.
    """

    def __init__(self, cfg: MonitorConfig, run_dir: Path | str | None):
        self.cfg = cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        log_path = None
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.run_dir / ALARMS_FILE
            log_path.touch()
        rules = list(cfg.alarms) if cfg.alarms else default_alarms()
        self.alarms = AlarmTracker(rules, log_path)
        self.bank: torch.Tensor | None = None          # (n <= bank_size, D) float32, on the embeddings' device
        self._step_z: list[torch.Tensor] = []
        self._step_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []  # (student, teacher) with equal shapes
        self._last_probe: torch.Tensor | None = None   # previous probe embeddings, for drift
        self.last_probe_step: int | None = None

    # ----------------------------------------------------------------------------------------- per step

    def observe(self, embeddings: torch.Tensor | None, teacher_embeddings: torch.Tensor | None = None) -> None:
        """Record one micro-batch of embeddings (B, D) (and the paired teacher embeddings, if any)."""
        if not self.cfg.enabled or embeddings is None:
            return
        z = _prepare(embeddings)
        self._step_z.append(z)
        if teacher_embeddings is not None:
            t = _prepare(teacher_embeddings).to(z.device)
            if t.shape == z.shape:
                self._step_pairs.append((z, t))

    def end_step(self, step: int, extra: dict[str, float] | None = None) -> dict[str, float]:
        """Fold this step's embeddings into the bank and return the 'monitor/...' metrics ({} if none seen)."""
        if not self.cfg.enabled or not self._step_z:
            self._reset_step()
            return {}
        z = torch.cat(self._step_z)  # (sum B, D)
        finite = torch.isfinite(z).all(dim=1)  # a NaN / inf embedding never enters the bank (it would poison it)
        metrics = {"monitor/nonfinite_embeddings": float((~finite).sum())} if not bool(finite.all()) else {}
        if bool(finite.any()):
            self._push_bank(z[finite])
        if self.bank is not None and self.bank.shape[0] >= 2:
            metrics.update(collapse_statistics(self.bank, prefix="monitor/"))
            metrics["monitor/bank_fill"] = float(self.bank.shape[0])
        if self._step_pairs:
            zs = torch.cat([p[0] for p in self._step_pairs])
            zt = torch.cat([p[1] for p in self._step_pairs])
            ok = torch.isfinite(zs).all(1) & torch.isfinite(zt).all(1)
            if bool(ok.any()):
                metrics["monitor/teacher_student_cos"] = teacher_student_cosine(zs[ok], zt[ok])
        self._reset_step()
        return metrics

    def check_alarms(self, step: int, metrics: dict[str, float]) -> list[AlarmEvent]:
        """Alarm events that fire at this step (each appended once to alarms.jsonl)."""
        return self.alarms.check(step, metrics)

    @property
    def last_healthy_step(self) -> int | None:
        """Last step at which no alarm rule was violated (for stop_keep_healthy)."""
        return self.alarms.last_healthy_step

    def _push_bank(self, z: torch.Tensor) -> None:
        if self.bank is None or self.bank.shape[1] != z.shape[1]:
            self.bank = z[-self.cfg.bank_size:].clone()
        else:
            self.bank = torch.cat([self.bank.to(z.device), z])[-self.cfg.bank_size:].clone()

    def _reset_step(self) -> None:
        self._step_z, self._step_pairs = [], []

    # -------------------------------------------------------------------------------------------- probe

    def probe(self, encoder: nn.Module, crops: torch.Tensor, step: int | None = None) -> dict[str, float]:
        """'probe/...' statistics of the encoder's pooled features on fixed crops (N, C_in, *spatial): spread,
        centred_rankme and centred_rankme_ratio (sslkit.monitor.probe_stats), plus 'probe/drift_cos':
        mean cosine of each crop's embedding to its embedding at the previous probe (1 = unchanged).
        `step` is informational (kept as `last_probe_step`)."""
        self.last_probe_step = step
        z = probe_embeddings(encoder, crops).float().cpu()
        if not bool(torch.isfinite(z).all()):  # a diverged encoder: say so instead of failing in an eigensolver
            return {"probe/nonfinite_embeddings": float((~torch.isfinite(z).all(1)).sum())}
        metrics = probe_feature_statistics(z, prefix="probe/")
        if self._last_probe is not None and self._last_probe.shape == z.shape:
            metrics["probe/drift_cos"] = teacher_student_cosine(z, self._last_probe)
        self._last_probe = z
        return metrics

    # ------------------------------------------------------------------------------------------- resume

    def state_dict(self) -> dict:
        """Bank and previous probe (tensors) and alarm counters (JSON-able)."""
        bank = self.bank.cpu() if self.bank is not None else None
        return {"bank": bank, "last_probe": self._last_probe, "alarms": self.alarms.state_dict()}

    def load_state_dict(self, d: dict) -> None:
        """Restore what state_dict() returned."""
        bank = d.get("bank")
        self.bank = bank.float().cpu()[-self.cfg.bank_size:].clone() if bank is not None else None
        probe = d.get("last_probe")
        self._last_probe = probe.float().cpu() if probe is not None else None
        if "alarms" in d:
            self.alarms.load_state_dict(d["alarms"])


def _prepare(z: torch.Tensor) -> torch.Tensor:
    """Detached float32 (B, D) copy on the embeddings' own device (statistics run there; no host sync)."""
    return as_embedding_matrix(z).float()


@torch.no_grad()
def probe_embeddings(encoder: nn.Module, crops: torch.Tensor, chunk: int = 2) -> torch.Tensor:
    """Pooled deepest-stage features (N, C) of `crops` (N, C_in, *spatial), in eval mode, no grad.

    Each module's train/eval mode is restored afterwards. Crops go through in chunks to bound memory.
    """
    modes = {m: m.training for m in encoder.modules()}
    param = next(encoder.parameters(), None)
    device = param.device if param is not None else crops.device
    encoder.eval()
    try:
        outs = []
        for part in crops.split(chunk):
            feats = encoder(part.to(device))
            deep = feats[-1] if isinstance(feats, (list, tuple)) else feats
            outs.append(deep.flatten(2).mean(-1) if deep.ndim > 2 else deep)  # (b, C, *sp) -> (b, C)
        return torch.cat(outs)
    finally:
        for m, mode in modes.items():
            m.training = mode


def probe_statistics(encoder: nn.Module, crops: torch.Tensor) -> dict[str, float]:
    """'probe/...' collapse statistics of an encoder on fixed crops (for `sslkit probe`)."""
    return probe_feature_statistics(probe_embeddings(encoder, crops), prefix="probe/")
