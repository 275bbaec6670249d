"""Experiment trackers against the real libraries: a local MLflow tracking store (SQLite), W&B offline runs
read back from their transaction log, TensorBoard event files; failures and resume."""

from __future__ import annotations

import json
import math
import socket
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from sslkit.config import LoggingConfig, MlflowConfig, WandbConfig
from sslkit.errors import ConfigError
from sslkit.monitor.alarms import AlarmEvent
from sslkit.monitor.trackers import (
    STATE_FILE,
    Trackers,
    check_logging_config,
    flatten_params,
    mlflow_key,
    numeric_scalars,
)

CONFIG = {
    "train": {"max_steps": 5, "precision": "fp32", "grad_clip": 1.0},
    "data": {"roi": [32, 32, 32], "cache_dir": ""},
    "model": {"name": "swin_unetr", "args": {}},
    "objectives": [{"name": "byol", "weight": 1.0}],
}


def step_metrics(step: int) -> dict:
    """A metrics.jsonl-like record: numbers, a tensor, an int, and entries no backend may log."""
    return {"step": step, "micro_step": 2 * step, "loss": 1.0 / step, "loss/byol": 0.5 / step,
            "monitor/embedding_std": torch.tensor(0.1 * step), "lr": np.float32(1e-3),
            "note": "text", "healthy": True, "missing": None}


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory) -> Path:
    """One SQLite tracking store for the module: creating its tables runs MLflow's ~100 database migrations
    (seconds), so the tests share it and keep apart by experiment."""
    return tmp_path_factory.mktemp("mlflow-store")


@pytest.fixture
def logging_cfg(mlflow_store, request):
    """LoggingConfig for `backends`, MLflow on the shared store in an experiment named after the test."""

    def make(backends: list[str], uri: str | None = None) -> LoggingConfig:
        return LoggingConfig(backends=backends,
                             mlflow=MlflowConfig(tracking_uri=uri or f"sqlite:///{mlflow_store / 'mlflow.db'}",
                                                 experiment=request.node.name),
                             wandb=WandbConfig(project="sslkit-test", mode="offline"))

    return make


@pytest.fixture(autouse=True)
def isolated_trackers(tmp_path, monkeypatch):
    """No tracker may read the user's settings or write outside the test's folders."""
    for var in ("MLFLOW_TRACKING_URI", "WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(var, raising=False)
    for var, sub in (("WANDB_DATA_DIR", "wandb-data"), ("WANDB_CACHE_DIR", "wandb-cache"),
                     ("WANDB_CONFIG_DIR", "wandb-config")):
        monkeypatch.setenv(var, str(tmp_path / sub))


def warning_lines(text: str) -> list[str]:
    """The lines of captured stderr, which must all be sslkit warnings: the trackers print nothing else."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert all(ln.startswith("sslkit: warning: ") for ln in lines), lines
    return lines


# ------------------------------------------------------------------------------------------ readers


def read_wandb_records(path: Path) -> list:
    """The protobuf records of a W&B transaction log (run-<id>.wandb), checksums verified.

    Layout (LevelDB log format): a 7-byte header ':W&B', magic 0xBEE1 (uint16 LE), version 0; then 32 KiB
    blocks of chunks, each `crc32(type byte, data) uint32 | length uint16 | type uint8 | data` with type
    1 full, 2 first, 3 middle, 4 last; a block tail shorter than a chunk header is zero padding. A chunk cut
    short at the end of the file (wandb-core still writing) ends the read.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):
            break  # a chunk still being written
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue  # zero padding
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad checksum at byte {pos}"
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def finished_wandb_records(path: Path, timeout_s: float = 30.0) -> list:
    """The records of a finished run's transaction log. wandb-core (a separate process) may write the log's
    tail after `run.finish()` has returned, so wait until the exit record is on disk."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_wandb_records(path) if path.stat().st_size > 7 else []
        if of_kind(records, "exit") or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def wandb_run_logs(folder: Path, run_id: str) -> list[Path]:
    """Transaction logs of W&B run `run_id` under folder/wandb, oldest first (a resume adds one)."""
    return sorted((folder / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))


def wandb_items(items) -> dict:
    return {(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in items}


def of_kind(records, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def tensorboard_scalars(tb_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], list[tuple[int, str]]]:
    """{tag: [(step, value)]} and the alarm texts [(step, text)] as TensorBoard itself reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    texts = [(e.step, e.tensor_proto.string_val[0].decode()) for tag in acc.Tags()["tensors"]
             if tag.startswith("alarms") for e in acc.Tensors(tag)]
    return scalars, texts


def mlflow_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# ------------------------------------------------------------------------------------------ pure parts


def test_check_logging_config_names_the_key_and_imports_nothing(monkeypatch, tmp_path, capfd):
    for module in ("mlflow", "wandb", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, module, None)  # any import of them would now fail
    check_logging_config(LoggingConfig(backends=["tensorboard", "mlflow", "wandb"]))
    check_logging_config(LoggingConfig(backends=[]))
    with pytest.raises(ConfigError, match=r"logging\.backends\[1\]: unknown backend 'mlfow'; did you mean 'mlflow'"):
        check_logging_config(LoggingConfig(backends=["tensorboard", "mlfow"]))
    with pytest.raises(ConfigError, match=r"did you mean 'tensorboard'"):
        check_logging_config(LoggingConfig(backends=["tensorbord"]))
    with pytest.raises(ConfigError, match=r"logging\.backends: 'wandb' is listed more than once"):
        check_logging_config(LoggingConfig(backends=["wandb", "wandb"]))
    with pytest.raises(ConfigError, match=r"logging\.wandb\.mode: 'onlin' is not one of"):
        check_logging_config(LoggingConfig(backends=["wandb"], wandb=WandbConfig(mode="onlin")))
    with pytest.raises(ConfigError, match=r"logging\.backends\[0\]"):
        Trackers.open(LoggingConfig(backends=["comet"]), Path("/nonexistent"), "x", {})
    disabled = Trackers.open(LoggingConfig(backends=["wandb"], wandb=WandbConfig(mode="disabled")), tmp_path, "x", {})
    assert disabled.names == [] and warning_lines(capfd.readouterr().err) == []
    assert not (tmp_path / STATE_FILE).exists()


def test_flatten_params_dotted_keys_lists_and_truncation():
    config = {"train": {"lr": 0.0001, "betas": [0.9, 0.999], "amp": True, "name": "adamw", "none": None},
              "model": {"args": {}}, "objectives": [{"name": "byol", "w": 1.0}, {"name": "mae"}],
              "empty_list": [], "long": "x" * 50}
    assert flatten_params(config, max_len=20) == {
        "train.lr": "0.0001", "train.betas": "[0.9, 0.999]", "train.amp": "true", "train.name": "adamw",
        "train.none": "null", "model.args": "{}", "objectives.0.name": "byol", "objectives.0.w": "1.0",
        "objectives.1.name": "mae", "empty_list": "[]", "long": "x" * 20}


def test_mlflow_key_keeps_valid_names_and_repairs_others():
    assert mlflow_key("monitor/embedding_std") == "monitor/embedding_std"
    assert mlflow_key("loss/byol") == "loss/byol"
    assert mlflow_key("probe/knn@5") == "probe/knn_5"
    assert mlflow_key("/a//b/") == "a/b"
    assert mlflow_key("a/../b") == "a/__/b"


def test_numeric_scalars_keeps_numbers_and_non_finite_values():
    got = numeric_scalars({**step_metrics(2), "bad": float("nan"), "big": float("inf")})
    assert set(got) == {"micro_step", "loss", "loss/byol", "monitor/embedding_std", "lr", "bad", "big"}
    assert got["monitor/embedding_std"] == pytest.approx(0.2)
    assert math.isnan(got["bad"]) and got["big"] == math.inf


# ------------------------------------------------------------------------------------------ backends


def test_three_backends_record_metrics_params_alarms_and_artifacts(tmp_path, capfd, logging_cfg,
                                                                   mlflow_store):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    cfg = logging_cfg(["tensorboard", "mlflow", "wandb"])
    encoder = tmp_path / "export" / "encoder.safetensors"
    encoder.parent.mkdir()
    encoder.write_bytes(b"\x00weights" * 100)
    plan = tmp_path / "export" / "plan.json"
    plan.write_text(json.dumps({"spacing": [1.5, 1.5, 2.0]}))

    trackers = Trackers.open(cfg, run_dir, "demo-run", CONFIG)
    assert trackers.names == ["tensorboard", "mlflow", "wandb"]
    for step in range(1, 6):
        trackers.log_metrics(step, step_metrics(step))
    trackers.log_metrics(6, {"step": 6, "loss": float("nan")})
    trackers.log_alarm(AlarmEvent(step=4, metric="embedding_std", value=0.01, threshold=0.1, action="warn",
                                  message="embedding_std 0.01 < 0.1 for 5 steps"))
    trackers.log_artifact(encoder)
    trackers.log_artifact(plan, name="encoder.plan.json")
    trackers.log_artifact(tmp_path / "export" / "absent.bin")
    trackers.close("FINISHED")
    trackers.close("FINISHED")  # a second close does nothing

    err = capfd.readouterr().err
    assert warning_lines(err) == [f"sslkit: warning: artifact {tmp_path / 'export' / 'absent.bin'} not found; "
                                  f"not logged"]
    state = json.loads((run_dir / STATE_FILE).read_text())

    # MLflow, read back through its own client
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    run = client.get_run(state["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "demo-run"
    assert client.get_experiment(run.info.experiment_id).name == cfg.mlflow.experiment
    assert mlflow_history(client, run.info.run_id, "loss/byol") == [(s, pytest.approx(0.5 / s)) for s in range(1, 6)]
    assert mlflow_history(client, run.info.run_id, "monitor/embedding_std") == \
        [(s, pytest.approx(0.1 * s)) for s in range(1, 6)]
    loss = mlflow_history(client, run.info.run_id, "loss")
    assert loss[:5] == [(s, pytest.approx(1.0 / s)) for s in range(1, 6)] and loss[5][0] == 6
    assert math.isnan(loss[5][1])
    assert set(run.data.metrics) == {"micro_step", "loss", "loss/byol", "monitor/embedding_std", "lr"}
    assert run.data.params == flatten_params(CONFIG)
    assert run.data.tags["alarm.4.embedding_std"] == "embedding_std 0.01 < 0.1 for 5 steps"
    artifacts = {a.path: a.file_size for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"encoder.safetensors": encoder.stat().st_size, "encoder.plan.json": plan.stat().st_size}
    assert run.info.artifact_uri.startswith((mlflow_store / "mlartifacts").as_uri())

    # W&B, read back from the offline run's transaction log
    logs = wandb_run_logs(run_dir, state["wandb"]["run_id"])
    assert len(logs) == 1
    records = finished_wandb_records(logs[0])
    (run_record,) = of_kind(records, "run")
    assert run_record.display_name == "demo-run" and run_record.project == "sslkit-test"
    assert {k: v for k, v in wandb_items(run_record.config.update).items() if k != "_wandb"} == CONFIG
    history = [wandb_items(h.item) for h in of_kind(records, "history")]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert [h["loss/byol"] for h in history[:5]] == pytest.approx([0.5 / s for s in range(1, 6)])
    assert [h["monitor/embedding_std"] for h in history[:5]] == pytest.approx([0.1 * s for s in range(1, 6)])
    assert math.isnan(history[5]["loss"]) and "note" not in history[0] and "healthy" not in history[0]
    step_metric = {m.glob_name or m.name: m.step_metric for m in of_kind(records, "metric")}
    assert step_metric["*"] == "step"
    (alert,) = of_kind(records, "alert")
    assert alert.text == "embedding_std 0.01 < 0.1 for 5 steps" and alert.level == "WARN"
    artifact_files = {f.path for a in of_kind(records, "artifact") for f in a.manifest.contents}
    assert artifact_files == {"encoder.safetensors", "encoder.plan.json"}
    assert of_kind(records, "exit")[0].exit_code == 0

    # TensorBoard, read back as TensorBoard reads it
    scalars, texts = tensorboard_scalars(run_dir / "tb")
    assert scalars["loss/byol"] == [(s, pytest.approx(0.5 / s)) for s in range(1, 6)]
    assert scalars["micro_step"] == [(s, 2.0 * s) for s in range(1, 6)]
    assert math.isnan(scalars["loss"][5][1]) and "step" not in scalars and "note" not in scalars
    assert texts == [(4, "embedding_std 0.01 < 0.1 for 5 steps")]


def test_mlflow_store_that_cannot_open_gives_one_warning_and_tensorboard_goes_on(tmp_path, capfd, logging_cfg):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cfg = logging_cfg(["mlflow", "tensorboard"], uri=f"sqlite:///{blocker}/mlflow.db")
    trackers = Trackers.open(cfg, tmp_path / "run", "r", CONFIG)
    for step in (1, 2, 3):
        trackers.log_metrics(step, step_metrics(step))
    trackers.close()

    (line,) = warning_lines(capfd.readouterr().err)
    assert line.startswith("sslkit: warning: mlflow logging disabled: ") and trackers.names == []
    scalars, _ = tensorboard_scalars(tmp_path / "run" / "tb")
    assert scalars["loss"] == [(s, pytest.approx(1.0 / s)) for s in (1, 2, 3)]


def test_missing_package_and_unreachable_server_each_give_one_warning(tmp_path, capfd, logging_cfg, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = logging_cfg(["wandb", "mlflow", "tensorboard"], uri=f"http://127.0.0.1:{port}")
    monkeypatch.setitem(sys.modules, "wandb", None)
    trackers = Trackers.open(cfg, tmp_path / "run", "r", CONFIG)
    assert trackers.names == ["tensorboard"]
    trackers.log_metrics(1, step_metrics(1))
    trackers.close()

    wandb_line, mlflow_line = warning_lines(capfd.readouterr().err)
    assert wandb_line == ("sslkit: warning: wandb logging disabled: MissingPackage: the 'wandb' package is not "
                          "installed (pip install 'sslkit[trackers]')")
    assert mlflow_line.startswith(f"sslkit: warning: mlflow logging disabled: ConnectionError: tracking server "
                                  f"http://127.0.0.1:{port} is not reachable (") and "refused" in mlflow_line
    assert tensorboard_scalars(tmp_path / "run" / "tb")[0]["loss"] == [(1, 1.0)]


def test_backend_failing_mid_run_is_dropped_once_and_the_others_record_everything(tmp_path, capfd, logging_cfg,
                                                                                  monkeypatch):
    from mlflow.tracking import MlflowClient

    cfg = logging_cfg(["tensorboard", "mlflow", "wandb"])
    real_log_batch = MlflowClient.log_batch

    def log_batch_failing_at_step_3(self, run_id, metrics=(), **kwargs):
        if any(m.step >= 3 for m in metrics):
            raise OSError("disk full")
        return real_log_batch(self, run_id, metrics=metrics, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch_failing_at_step_3)
    run_dir = tmp_path / "run"
    trackers = Trackers.open(cfg, run_dir, "r", CONFIG)
    for step in range(1, 6):
        trackers.log_metrics(step, step_metrics(step))
        trackers.flush()  # MLflow sends from a worker thread: wait, so its failure shows at step 3 exactly
        assert trackers.names == (["tensorboard", "mlflow", "wandb"] if step < 3 else ["tensorboard", "wandb"])
    trackers.log_alarm({"step": 5, "metric": "loss", "value": 0.2, "action": "stop", "message": "stop now"})
    trackers.close()

    assert warning_lines(capfd.readouterr().err) == ["sslkit: warning: mlflow logging disabled: OSError: disk full"]
    state = json.loads((run_dir / STATE_FILE).read_text())
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    run = client.get_run(state["mlflow"]["run_id"])
    assert run.info.status == "FAILED"
    assert [s for s, _ in mlflow_history(client, run.info.run_id, "loss")] == [1, 2]
    scalars, texts = tensorboard_scalars(run_dir / "tb")
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3, 4, 5] and texts == [(5, "stop now")]
    records = finished_wandb_records(wandb_run_logs(run_dir, state["wandb"]["run_id"])[0])
    assert [wandb_items(h.item)["loss"] for h in of_kind(records, "history")] == \
        pytest.approx([1.0 / s for s in range(1, 6)])
    assert of_kind(records, "alert")[0].level == "ERROR"


def test_resume_continues_the_same_mlflow_and_wandb_runs(tmp_path, capfd, logging_cfg):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    cfg = logging_cfg(["tensorboard", "mlflow", "wandb"])
    first = Trackers.open(cfg, run_dir, "r", CONFIG)
    for step in range(1, 5):
        first.log_metrics(step, {"loss": float(step)})
    first.close("KILLED")  # interrupted after step 4; the last checkpoint was at step 2
    ids = json.loads((run_dir / STATE_FILE).read_text())
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    assert client.get_run(ids["mlflow"]["run_id"]).info.status == "KILLED"
    killed = finished_wandb_records(wandb_run_logs(run_dir, ids["wandb"]["run_id"])[0])
    assert of_kind(killed, "exit")[0].exit_code == 130
    time.sleep(1.01 - time.time() % 1)  # W&B names offline-run folders by start second: no collision

    resumed_config = {**CONFIG, "train": {**CONFIG["train"], "max_steps": 8}}
    second = Trackers.open(cfg, run_dir, "r", resumed_config, resume_step=2)
    for step in range(3, 7):
        second.log_metrics(step, {"loss": 10.0 * step})
    second.close()
    assert warning_lines(capfd.readouterr().err) == []
    assert json.loads((run_dir / STATE_FILE).read_text()) == ids

    run = client.get_run(ids["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["sslkit.resumed_at_step"] == "2"
    assert run.data.params["train.max_steps"] == "5" and run.data.tags["resumed.train.max_steps"] == "8"
    assert mlflow_history(client, run.info.run_id, "loss") == sorted(
        [(s, float(s)) for s in range(1, 5)] + [(s, 10.0 * s) for s in range(3, 7)])
    assert len(client.search_runs([run.info.experiment_id])) == 1

    logs = wandb_run_logs(run_dir, ids["wandb"]["run_id"])
    assert len(logs) == 2  # one transaction log per session, same run id: `wandb sync` merges them
    resumed = finished_wandb_records(logs[1])
    assert [(h["step"], h["loss"]) for h in (wandb_items(r.item) for r in of_kind(resumed, "history"))] == \
        [(s, 10.0 * s) for s in range(3, 7)]
    assert wandb_items(of_kind(resumed, "config")[-1].update)["train"]["max_steps"] == 8

    scalars, _ = tensorboard_scalars(run_dir / "tb")  # steps after the checkpoint replaced, not doubled
    assert scalars["loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0), (6, 60.0)]

    fresh = Trackers.open(logging_cfg(["mlflow"]), run_dir, "r", CONFIG)  # not a resume: a new run
    fresh.close()
    assert json.loads((run_dir / STATE_FILE).read_text())["mlflow"]["run_id"] != ids["mlflow"]["run_id"]


def test_mlflow_store_that_stalls_does_not_hold_up_the_training_loop(tmp_path, capfd, logging_cfg, monkeypatch):
    import threading

    from mlflow.tracking import MlflowClient

    cfg = logging_cfg(["mlflow"])
    trackers = Trackers.open(cfg, tmp_path / "run", "r", CONFIG)
    store_answers = threading.Event()
    real_log_batch = MlflowClient.log_batch

    def stalled_log_batch(self, *args, **kwargs):
        assert store_answers.wait(timeout=60), "the loop waited for the store"
        return real_log_batch(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", stalled_log_batch)
    for step in range(1, 101):  # returns while the store holds every request
        trackers.log_metrics(step, {"loss": 1.0 / step})
    trackers.log_alarm({"step": 100, "metric": "loss", "message": "late alarm"})
    store_answers.set()
    trackers.close()

    assert warning_lines(capfd.readouterr().err) == []
    run = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri).get_run(
        json.loads((tmp_path / "run" / STATE_FILE).read_text())["mlflow"]["run_id"])
    history = mlflow_history(MlflowClient(tracking_uri=cfg.mlflow.tracking_uri), run.info.run_id, "loss")
    assert history == [(s, pytest.approx(1.0 / s)) for s in range(1, 101)]
    assert run.info.status == "FINISHED" and run.data.tags["alarm.100.loss"] == "late alarm"
