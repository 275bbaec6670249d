"""The one training loop (sslkit.engine.loop): its non-finite policy, and what a run whose final weights cannot be
checkpointed does."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_raw, write_cfg
from sslkit import run as R
from sslkit.engine.loop import NonfinitePolicy, read_scalars


def test_nonfinite_policy():
    skip, stop = NonfinitePolicy("skip"), NonfinitePolicy("stop")
    assert skip.verdict(False) is None and skip.verdict(True) is None
    assert stop.verdict(False) is None and stop.verdict(True) == "train.nonfinite: stop"
    assert skip.verdict(False, poisoned=True) == "the weights themselves hold NaN / inf"
    skip.in_a_row = R.MAX_SKIPPED_IN_A_ROW - 1
    assert skip.verdict(True) == f"{R.MAX_SKIPPED_IN_A_ROW} non-finite steps in a row"


def test_read_scalars_reads_tensors_in_one_go():
    out = read_scalars({"a": torch.tensor(1.5), "b": 2, "c": None, "d": torch.tensor([3.0])})
    assert out == {"a": 1.5, "b": 2, "d": 3.0}


def test_final_weights_nonfinite_export_the_last_finite_checkpoint_and_exit_3(demo_dir, scan_cache, tmp_path,
                                                                              monkeypatch, capsys):
    """Before: the run said "done", exit 0, and exported the final weights that no checkpoint could hold. Now it
    names the last finite checkpoint, exports that encoder, and exits 3."""
    from sslkit.cli import main
    from sslkit.engine import trainer
    from sslkit.engine.export import encoder_state
    from sslkit.plan import read_weights

    real = trainer.PretrainTask.end_step

    def poison_at_the_last_step(self, step, outcome):
        if step == self.cfg.train.max_steps:  # a head overflows after the last update, past the step's own checks
            next(self.model.objectives.parameters()).data.fill_(float("inf"))
        return real(self, step, outcome)

    monkeypatch.setattr(trainer.PretrainTask, "end_step", poison_at_the_last_step)
    cfg = write_cfg(tiny_raw(demo_dir, scan_cache, train={"max_steps": 3}), tmp_path / "c.yaml")
    capsys.readouterr()
    code = main(["pretrain", "--cfg", str(cfg), "--run-dir", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 3
    lines = [ln for ln in err.splitlines() if "NaN / inf" in ln and "exported instead" in ln]
    assert len(lines) == 1 and "step_00000002" in lines[0], err[-2000:]
    kept = R.list_checkpoints(tmp_path / "run" / R.CHECKPOINTS)
    assert [p.name for p in kept] == ["step_00000001", "step_00000002"]
    exported, plan = read_weights(tmp_path / "run" / "encoder.safetensors")
    want, _ = encoder_state(kept[-1])
    assert exported.keys() == want.keys() and all(torch.equal(exported[k], want[k]) for k in want)
    assert plan["source"]["step"] == 2
    assert all(bool(torch.isfinite(v).all()) for v in exported.values())


@pytest.mark.parametrize("mode", ["stop"])
def test_nonfinite_stop_names_one_step(mode, demo_dir, scan_cache, tmp_path, monkeypatch, capsys):
    """With train.nonfinite: stop the run's lines name one step: the one not applied."""
    from sslkit.cli import main
    from sslkit.engine import trainer

    calls = [0]
    forward = trainer.SSLModel.forward

    def nan_at_second(self, batch):
        out = forward(self, batch)
        calls[0] += 1
        if calls[0] == 2:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer.SSLModel, "forward", nan_at_second)
    cfg = write_cfg(tiny_raw(demo_dir, scan_cache, train={"max_steps": 3, "nonfinite": mode}), tmp_path / "c.yaml")
    capsys.readouterr()
    assert main(["pretrain", "--cfg", str(cfg), "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 3
    out = capsys.readouterr()
    text = out.out + out.err
    import re

    steps = set(re.findall(r"step (\d+)", text))
    assert steps == {"2"}, text[-2000:]
