"""No host syncs in the training step (issue 24): at steady state each optimizer step reads the device once (its loss,
logs, gradient norm and non-finite flag, packed into one tensor), for BYOL, SimCLR, MAE, VoCo and the fine-tuning step;
the monitor, validation and probes read it only on their own steps.

Counted with the torch profiler on the CPU, per optimizer step (the task's optimizer_step and end_step):
- `aten::_local_scalar_dense`: every .item() / float(t) / bool(t) / int(t), each of which waits for the device on a
  GPU; `aten::nonzero`: boolean indexing and nonzero(), whose output shape waits for the device too;
- one per call of read_scalars with tensors: the step's one packed transfer (on the CPU `.cpu().tolist()` emits no
  such event, so it is counted where it is called).
Not counted: the data loader's work (CPU tensors on a GPU machine too) and the scalar reads inside the CPU kernels of
the fused optimizers (`aten::_fused_adamw_` reads its step counter on the host only on the CPU; on CUDA the counter
stays on the device).
"""

from __future__ import annotations

import collections

import pytest
import torch

from conftest import tiny_raw

SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero")
READ = "sslkit_test_read"
STEP = "sslkit_test_step:"
DATA = "sslkit_test_data"


def _chain(event) -> list[str]:
    names, e = [], event.cpu_parent
    while e is not None:
        names.append(e.name)
        e = e.cpu_parent
    return names


def transfers_per_step(events) -> dict[int, collections.Counter]:
    """{step: Counter of the sync events and reads inside that step}, data loading and fused kernels left out."""
    out: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for e in events:
        if e.name not in SYNC_OPS and e.name != READ:
            continue
        chain = _chain(e)
        if DATA in chain or any(n.startswith("aten::_fused_") for n in chain):
            continue
        step = next((int(n[len(STEP):]) for n in chain if n.startswith(STEP)), None)
        if step is not None:
            out[step][e.name] += 1
    return out


def _instrument(monkeypatch, task_cls, batches_attr: str, read_modules) -> None:
    """Mark each optimizer step (optimizer_step + end_step), each batch fetch and each packed read in the profile."""
    from sslkit.engine import distributed as D

    real_read = D.read_scalars

    def read(values):
        if any(torch.is_tensor(v) for v in values.values()):
            with torch.profiler.record_function(READ):
                return real_read(values)
        return real_read(values)

    for module in (D, *read_modules):
        monkeypatch.setattr(module, "read_scalars", read)
    n = [0]
    real_step, real_end, real_batches = task_cls.optimizer_step, task_cls.end_step, getattr(task_cls, batches_attr)

    def optimizer_step(self, policy):
        n[0] += 1
        with torch.profiler.record_function(f"{STEP}{n[0]}"):
            return real_step(self, policy)

    def end_step(self, step, outcome):
        with torch.profiler.record_function(f"{STEP}{n[0]}"):
            return real_end(self, step, outcome)

    def batches(self):
        it = iter(real_batches(self))
        while True:
            with torch.profiler.record_function(DATA):
                item = next(it, None)
            if item is None:
                return
            yield item

    monkeypatch.setattr(task_cls, "optimizer_step", optimizer_step)
    monkeypatch.setattr(task_cls, "end_step", end_step)
    monkeypatch.setattr(task_cls, batches_attr, batches)


def _check(counts: dict[int, collections.Counter], own_step: int) -> None:
    """Step 1 warms up; steps 2 .. own_step - 1 read the device exactly once; own_step (the monitor's / validation's
    step) reads more: the counter does see syncs."""
    steady = {s: dict(c) for s, c in counts.items() if 1 < s < own_step}
    assert steady and all(c == {READ: 1} for c in steady.values()), steady
    assert sum(counts[own_step][op] for op in SYNC_OPS) > 1, dict(counts[own_step])


PRETRAIN = {
    "byol": {},
    "simclr": {"objectives": [{"name": "simclr", "hidden_dim": 64, "out_dim": 32, "head_norm": "layer"}]},
    "mae": {"model": {"name": "vit", "args": {"patch_size": 8, "embed_dim": 24, "depth": 2, "num_heads": 2}},
            "objectives": [{"name": "mae", "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}]},
    "voco": {"objectives": [{"name": "voco", "grid": 2, "n_random": 2, "hidden_dim": 32, "out_dim": 16,
                             "head_norm": "layer"}]},
}


@pytest.mark.parametrize("objective", sorted(PRETRAIN))
def test_pretraining_step_reads_the_device_once(objective, demo_dir, scan_cache, tmp_path, monkeypatch, one_thread):
    from torch.profiler import profile

    from sslkit.config import config_from_dict
    from sslkit.engine import loop, trainer

    _instrument(monkeypatch, trainer.PretrainTask, "_loader", [loop])
    raw = tiny_raw(demo_dir, scan_cache, train={"max_steps": 3, "ckpt_every": 0}, monitor={"every": 3},
                   **PRETRAIN[objective])
    with profile() as prof:
        trainer.pretrain(config_from_dict(raw), tmp_path / "run", progress=False)
    _check(transfers_per_step(prof.events()), own_step=3)


def test_finetuning_step_reads_the_device_once(tmp_path, monkeypatch, one_thread):
    from torch.profiler import profile

    from sslkit.downstream import train
    from sslkit.engine import loop
    from test_downstream import _tiny_cfg

    _instrument(monkeypatch, train.FinetuneTask, "_batches", [loop, train])
    raw = _tiny_cfg(tmp_path)
    raw["train"].update({"max_steps": 4, "val_every": 4, "threads": 1})
    with profile() as prof:
        train.finetune(raw, tmp_path / "run", progress=False)
    _check(transfers_per_step(prof.events()), own_step=4)
