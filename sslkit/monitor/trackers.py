"""Experiment trackers: one fan-out logger over TensorBoard, MLflow and Weights & Biases.

Both training loops log through `Trackers` on rank 0:

    check_logging_config(cfg.logging)                       # when the recipe is read; opens nothing
    trackers = Trackers.open(cfg.logging, run_dir, run_dir.name, cfg.to_dict(), resume_step=start or None)
    every optimizer step:  trackers.log_metrics(step, record)  # the metrics.jsonl record
    on an alarm:           trackers.log_alarm(event)           # AlarmEvent or its to_dict()
    at the end:            trackers.log_artifact(run_dir / "encoder.safetensors"); trackers.close("FINISHED")

Backends (`logging.backends`, any subset):
  tensorboard  SummaryWriter under <run_dir>/tb; scalars, alarms as text under the tag "alarms"; no artifacts.
               On resume the writer purges events at steps > resume_step, so replayed steps replace old ones.
  mlflow       MlflowClient against `logging.mlflow.tracking_uri` ("" : MLflow's own default, which honours
               MLFLOW_TRACKING_URI). Experiment by name, created if missing (for a local sqlite URI its
               artifacts go to <db folder>/mlartifacts instead of the working directory). The resolved config
               as params with dotted keys, values cut to MLflow's limit; alarms as tags "alarm.<step>.<metric>".
               Metrics are sent by a worker thread, so a slow or stalled store never holds up the loop.
  wandb        wandb.init in `logging.wandb.mode` (offline by default), files under `dir` or <run_dir>, silent,
               no console capture. Every key is plotted against the logged "step" (define_metric), so a
               resumed run may repeat steps; alarms as W&B alerts; artifacts as W&B artifacts.

Never lose work: a backend that fails to start or raises later prints one line,
`sslkit: warning: <backend> logging disabled: <reason>`, and is dropped; the others go on and the caller
never sees an exception. mlflow and wandb are imported only when their backend is asked for.

Resume: the ids of the MLflow run and the W&B run are kept in <run_dir>/trackers.json (written atomically);
`Trackers.open(..., resume_step=k)` continues those runs when the tracking URI / project still match.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import queue
import re
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sslkit.errors import ConfigError, closest
from sslkit.monitor.alarms import as_number

BACKENDS = ("tensorboard", "mlflow", "wandb")
WANDB_MODES = ("offline", "online", "disabled")
STATUSES = ("FINISHED", "FAILED", "KILLED")
STATE_FILE = "trackers.json"
STEP_KEY = "step"                      # the x-axis; never logged as a metric of its own except in W&B
MLFLOW_PARAM_VALUE_LIMIT = 6000        # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH (3.x)
MLFLOW_TAG_VALUE_LIMIT = 8000          # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
MLFLOW_BATCH = {"metrics": 1000, "params": 100}   # MlflowClient.log_batch limits per request
WANDB_EXIT_CODES = {"FINISHED": 0, "FAILED": 1, "KILLED": 130}
MODEL_SUFFIXES = {".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".onnx"}
SERVER_PROBE_TIMEOUT_S = 5.0
WORKER_MERGE = 64                      # queued MLflow items sent in one request at most


# --------------------------------------------------------------------------------------------- config


def check_logging_config(cfg) -> None:
    """Validate a LoggingConfig without importing or opening anything; ConfigError names the bad key."""
    for i, name in enumerate(cfg.backends):
        if name not in BACKENDS:
            near = closest(name, BACKENDS)
            hint = f"; did you mean '{near}'?" if near else f"; valid: {', '.join(BACKENDS)}"
            raise ConfigError(f"logging.backends[{i}]: unknown backend '{name}'{hint}")
    repeated = sorted({n for n in cfg.backends if list(cfg.backends).count(n) > 1})
    if repeated:
        raise ConfigError(f"logging.backends: '{repeated[0]}' is listed more than once")
    if cfg.wandb.mode not in WANDB_MODES:
        raise ConfigError(f"logging.wandb.mode: '{cfg.wandb.mode}' is not one of {', '.join(WANDB_MODES)}")
    if "mlflow" in cfg.backends and not cfg.mlflow.experiment:
        raise ConfigError("logging.mlflow.experiment: must not be empty")
    if "wandb" in cfg.backends and not cfg.wandb.project:
        raise ConfigError("logging.wandb.project: must not be empty")


# --------------------------------------------------------------------------------------------- helpers


def warn(message: str) -> None:
    """One line on stderr, `sslkit: warning: <message>`."""
    print(f"sslkit: warning: {message}", file=sys.stderr, flush=True)


def _reason(exc: BaseException) -> str:
    """`Type: first line of the message`, short enough for one warning line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class MissingPackage(ImportError):
    """A backend's package is not installed."""

    def __init__(self, package: str):
        super().__init__(f"the '{package}' package is not installed (pip install 'sslkit[trackers]')")


def numeric_scalars(metrics: dict) -> dict[str, float]:
    """The numeric entries of a metrics record as floats (tensors of one element included; bools, strings,
    None and the `step` key left out). NaN and +-inf are kept: each backend records them its own way."""
    out = {}
    for key, value in metrics.items():
        number = as_number(value)
        if number is not None and key != STEP_KEY:
            out[str(key)] = number
    return out


def flatten_params(config: Any, max_len: int = MLFLOW_PARAM_VALUE_LIMIT, prefix: str = "") -> dict[str, str]:
    """A nested config as flat `{dotted.key: text}`: mappings and lists of mappings recurse (list items by
    index, `objectives.0.name`), other lists and scalars become JSON text (strings stay bare), cut to max_len.
    An empty mapping is kept as '{}' so the key still shows."""
    if isinstance(config, dict) and (config or not prefix):
        out: dict[str, str] = {}
        for key, value in config.items():
            out.update(flatten_params(value, max_len, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(config, (list, tuple)) and config and all(isinstance(v, dict) for v in config):
        out = {}
        for i, value in enumerate(config):
            out.update(flatten_params(value, max_len, f"{prefix}.{i}"))
        return out
    text = config if isinstance(config, str) else json.dumps(config, default=str)
    return {prefix: text[:max_len]}


def mlflow_key(name: str) -> str:
    """A metric/param/tag name MLflow accepts: characters outside [/\\w.\\- :] become '_', and the name must
    stay a normalised relative path (no empty, '.' or '..' segments)."""
    name = re.sub(r"[^/\w.\- :]", "_", str(name))
    parts = [p for p in name.split("/") if p]
    parts = ["_" * len(p) if p in (".", "..") else p for p in parts]
    key = "/".join(parts) or "_"
    assert posixpath.normpath(key) == key
    return key


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temporary file in the same folder, flushed to disk, then rename it over `path`."""
    from sslkit.run import atomic_write_json

    atomic_write_json(path, obj, indent=2, fsync=True)


def read_tracker_state(run_dir: Path) -> dict:
    """The ids stored by the last `Trackers.open` in run_dir ({} when none or unreadable)."""
    try:
        state = json.loads((Path(run_dir) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _event_dict(event) -> dict:
    return event.to_dict() if hasattr(event, "to_dict") else dict(event)


def _alarm_text(event: dict) -> str:
    if event.get("message"):
        return str(event["message"])
    return f"{event.get('metric')}={event.get('value')} (threshold {event.get('threshold')})"


@contextmanager
def _quiet_loggers(*names: str):
    """Raise these stdlib loggers to WARNING for the block (MLflow announces its database migrations at INFO)."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# --------------------------------------------------------------------------------------------- backends


class _TensorBoard:
    """Scalars and alarm texts in a SummaryWriter under <run_dir>/tb."""

    name = "tensorboard"

    def __init__(self, run_dir: Path, resume_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise MissingPackage("tensorboard") from None
        # purge_step: TensorBoard hides events of earlier sessions at steps >= purge_step, so the steps a
        # resumed run repeats after its checkpoint replace the ones logged before the interruption.
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=purge)

    def state(self) -> dict | None:
        return None

    def log_metrics(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def log_alarm(self, event: dict) -> None:
        self.writer.add_text("alarms", _alarm_text(event), int(event.get("step", 0)))

    def log_artifact(self, path: Path, name: str) -> None:
        pass  # TensorBoard has no artifact store

    def flush(self) -> None:
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


def _probe_server(uri: str) -> None:
    """Fail fast when an http(s) tracking server does not answer: MLflow's own client retries for minutes.
    Any HTTP answer (even 401/404) counts as reachable."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=SERVER_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return
    except (urllib.error.URLError, OSError) as exc:
        why = getattr(exc, "reason", exc)
        raise ConnectionError(f"tracking server {uri} is not reachable ({why})") from None


def _sqlite_artifact_root(uri: str) -> str | None:
    """<db folder>/mlartifacts as a file URI for a local sqlite tracking URI, else None (server decides)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = uri[len("sqlite:///"):].split("?", 1)[0]
    if not db or db == ":memory:":
        return None
    return (Path(db).resolve().parent / "mlartifacts").as_uri()


class _MLflow:
    """One MLflow run through MlflowClient: params at open, metrics by step, alarms as tags, artifacts.

    Metrics and alarm tags go through a queue to one worker thread, so the training loop does not wait on
    the store (a local SQLite commit costs tens of ms; a remote server that stops answering is retried by
    MLflow for minutes). A failure in the worker is raised by the next call from the loop, which drops the
    backend; artifacts and close wait for the queue first.
    """

    name = "mlflow"

    def __init__(self, cfg, run_dir: Path, run_name: str, config: dict, previous: dict | None,
                 resume_step: int | None):
        try:
            from mlflow.entities import Metric, Param, RunTag
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise MissingPackage("mlflow") from None
        self._Metric, self._Param, self._RunTag = Metric, Param, RunTag
        uri = cfg.tracking_uri or None
        if uri and uri.startswith(("http://", "https://")):
            _probe_server(uri)
        with _quiet_loggers("mlflow.store.db.utils", "alembic"):
            self.client = MlflowClient(tracking_uri=uri)
            self.tracking_uri = str(self.client.tracking_uri)
            self.experiment_id = self._experiment(cfg.experiment)
            run = self._previous_run(previous) if resume_step is not None else None
            if run is None:
                run = self.client.create_run(self.experiment_id, run_name=cfg.run_name or run_name,
                                             tags={"sslkit.run_dir": str(Path(run_dir).resolve())})
                self.run_id, existing = run.info.run_id, {}
            else:
                self.run_id, existing = run.info.run_id, run.data.params
                self.client.update_run(self.run_id, status="RUNNING")
                self.client.set_tag(self.run_id, "sslkit.resumed_at_step", str(resume_step))
            try:
                self._log_params(flatten_params(config), existing)
            except Exception:
                self.client.set_terminated(self.run_id, "FAILED")
                raise
        self._queue: queue.Queue = queue.Queue()
        self._error: Exception | None = None
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="sslkit-mlflow", daemon=True)
        self._worker.start()

    def _experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        return self.client.create_experiment(name, artifact_location=_sqlite_artifact_root(self.tracking_uri))

    def _previous_run(self, previous: dict | None):
        """The stored run when it lives on this tracking URI and in this experiment, else None."""
        if not previous or previous.get("tracking_uri") != self.tracking_uri:
            return None
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(previous["run_id"])
        except (MlflowException, KeyError):
            return None
        return run if run.info.experiment_id == self.experiment_id else None

    def _log_params(self, params: dict[str, str], existing: dict[str, str]) -> None:
        """New params are logged; MLflow params are immutable, so a value changed on resume becomes the tag
        `resumed.<key>` instead."""
        items = [(mlflow_key(k), v) for k, v in params.items()]
        new = [self._Param(k, v) for k, v in items if k not in existing]
        changed = [self._RunTag(f"resumed.{k}", v[:MLFLOW_TAG_VALUE_LIMIT]) for k, v in items
                   if k in existing and existing[k] != v]
        size = MLFLOW_BATCH["params"]
        for i in range(0, len(new), size):
            self.client.log_batch(self.run_id, params=new[i:i + size])
        for i in range(0, len(changed), size):
            self.client.log_batch(self.run_id, tags=changed[i:i + size])

    def state(self) -> dict:
        return {"tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id, "run_id": self.run_id}

    def _work(self) -> None:
        """Worker: send what is queued (up to WORKER_MERGE items per request); after a failure keep taking
        items off the queue, unsent, so flush never hangs."""
        stop = False
        while not stop:
            items = [self._queue.get()]
            while items[-1] is not None and len(items) < WORKER_MERGE:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = items[-1] is None
            jobs = [item for item in items if item is not None]
            try:
                if jobs and self._error is None:
                    self._send([m for ms, _ in jobs for m in ms], [t for _, ts in jobs for t in ts])
            except Exception as exc:
                self._error = exc
            finally:
                for _ in items:
                    self._queue.task_done()

    def _send(self, metrics: list, tags: list) -> None:
        size, tag_size = MLFLOW_BATCH["metrics"], MLFLOW_BATCH["params"]
        for i in range(0, len(metrics), size):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + size])
        for i in range(0, len(tags), tag_size):
            self.client.log_batch(self.run_id, tags=tags[i:i + tag_size])

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def log_metrics(self, step: int, scalars: dict[str, float]) -> None:
        self._raise_failure()
        now = int(time.time() * 1000)
        self._queue.put(([self._Metric(mlflow_key(k), v, now, int(step)) for k, v in scalars.items()], []))

    def log_alarm(self, event: dict) -> None:
        self._raise_failure()
        key = mlflow_key(f"alarm.{event.get('step', 0)}.{event.get('metric', 'alarm')}")
        self._queue.put(([], [self._RunTag(key, _alarm_text(event)[:MLFLOW_TAG_VALUE_LIMIT])]))

    def log_artifact(self, path: Path, name: str) -> None:
        """Stored as artifact `name` (a relative path; its folders become the artifact folder)."""
        self.flush()
        folder, _, filename = name.rpartition("/")
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=name)
        elif filename == path.name:
            self.client.log_artifact(self.run_id, str(path), artifact_path=folder or None)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                staged = Path(tmp) / filename
                _link_or_copy(path, staged)
                self.client.log_artifact(self.run_id, str(staged), artifact_path=folder or None)

    def flush(self) -> None:
        """Wait until the worker has sent everything queued; raise its failure if it had one."""
        self._queue.join()
        self._raise_failure()

    def close(self, status: str) -> None:
        """Send what is queued, stop the worker, end the run (FAILED if the worker failed; then raise)."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._worker.join()
        self.client.set_terminated(self.run_id, "FAILED" if self._error is not None else status)
        self._raise_failure()


class _Wandb:
    """One W&B run (offline unless configured): config at init, metrics against `step`, alerts, artifacts."""

    name = "wandb"

    def __init__(self, cfg, run_dir: Path, run_name: str, config: dict, previous: dict | None,
                 resume_step: int | None):
        try:
            import wandb
        except ImportError:
            raise MissingPackage("wandb") from None
        self._wandb = wandb
        self.project, self.entity = cfg.project, cfg.entity or None
        folder = Path(cfg.dir) if cfg.dir else Path(run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        resume_id = self._previous_id(previous) if resume_step is not None else None
        settings = wandb.Settings(silent=True, console="off", reinit="create_new")
        self.run = wandb.init(project=self.project, entity=self.entity, name=run_name, dir=str(folder),
                              mode=cfg.mode, id=resume_id, resume="allow" if resume_id else None,
                              config=None if resume_id else config, settings=settings)
        if resume_id:
            self.run.config.update(config, allow_val_change=True)
        self.run.define_metric(STEP_KEY)
        self.run.define_metric("*", step_metric=STEP_KEY)
        self.run_name = run_name

    def _previous_id(self, previous: dict | None) -> str | None:
        if not previous or previous.get("project") != self.project or previous.get("entity") != self.entity:
            return None
        return previous.get("run_id")

    def state(self) -> dict:
        return {"project": self.project, "entity": self.entity, "run_id": self.run.id}

    def log_metrics(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log({**scalars, STEP_KEY: int(step)})

    def log_alarm(self, event: dict) -> None:
        level = self._wandb.AlertLevel.ERROR if event.get("action", "warn") != "warn" else self._wandb.AlertLevel.WARN
        title = f"sslkit alarm: {event.get('metric', 'alarm')} at step {event.get('step', '?')}"
        self.run.alert(title=title, text=_alarm_text(event), level=level)

    def log_artifact(self, path: Path, name: str) -> None:
        """A W&B artifact `<run name>-<file name>`, type 'model' for weight files, else 'file'."""
        kind = "model" if path.suffix in MODEL_SUFFIXES or path.is_dir() else "file"
        label = re.sub(r"[^\w.\-]", "-", f"{self.run_name}-{name.replace('/', '-')}")[:128]
        artifact = self._wandb.Artifact(label, type=kind)
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path), name=name)
        self.run.log_artifact(artifact)

    def flush(self) -> None:
        pass

    def close(self, status: str) -> None:
        self.run.finish(exit_code=WANDB_EXIT_CODES[status])


# --------------------------------------------------------------------------------------------- fan-out


class Trackers:
    """Fan-out to the configured backends; no method raises because of a backend (see the module doc)."""

    def __init__(self, backends: list, run_dir: Path | None = None):
        self._backends = list(backends)
        self.run_dir = run_dir
        self.closed = False

    @classmethod
    def open(cls, logging_cfg, run_dir: Path | str, run_name: str, config: dict,
             resume_step: int | None = None) -> "Trackers":
        """Start every backend in `logging_cfg.backends` for the run in run_dir. With resume_step set, continue
        the MLflow / W&B runs recorded in <run_dir>/trackers.json. The ids go (back) to trackers.json."""
        check_logging_config(logging_cfg)
        run_dir = Path(run_dir)
        previous = read_tracker_state(run_dir) if resume_step is not None else {}
        backends = []
        for name in logging_cfg.backends:
            if name == "wandb" and logging_cfg.wandb.mode == "disabled":
                continue
            try:
                backends.append(cls._start(name, logging_cfg, run_dir, run_name, config, previous, resume_step))
            except Exception as exc:
                warn(f"{name} logging disabled: {_reason(exc)}")
        trackers = cls(backends, run_dir)
        trackers._save_state(previous)
        return trackers

    @staticmethod
    def _start(name, cfg, run_dir, run_name, config, previous, resume_step):
        if name == "tensorboard":
            return _TensorBoard(run_dir, resume_step)
        if name == "mlflow":
            return _MLflow(cfg.mlflow, run_dir, run_name, config, previous.get("mlflow"), resume_step)
        if name == "wandb":
            return _Wandb(cfg.wandb, run_dir, run_name, config, previous.get("wandb"), resume_step)
        raise ConfigError(f"logging.backends: unknown backend '{name}'")

    @property
    def names(self) -> list[str]:
        """The backends still logging."""
        return [b.name for b in self._backends]

    def _save_state(self, previous: dict) -> None:
        """Ids of the runs just opened, over those of backends that did not open this time."""
        current = {b.name: b.state() for b in self._backends if b.state() is not None}
        if not current and not previous:
            return
        try:
            write_json_atomic(self.run_dir / STATE_FILE, {**previous, **current})
        except OSError as exc:
            warn(f"tracker ids not saved to {self.run_dir / STATE_FILE}: {_reason(exc)}")

    def _each(self, call) -> None:
        """call(backend) on every backend; one that raises is reported once, closed as FAILED and dropped."""
        for backend in list(self._backends):
            try:
                call(backend)
            except Exception as exc:
                self._drop(backend, exc)

    def _drop(self, backend, exc: Exception) -> None:
        warn(f"{backend.name} logging disabled: {_reason(exc)}")
        self._backends.remove(backend)
        try:
            backend.close("FAILED")
        except Exception:
            pass  # already reported; a second line would only repeat the failure

    def log_metrics(self, step: int, metrics: dict) -> None:
        """Every numeric entry of `metrics` (the metrics.jsonl record) at optimizer step `step`."""
        scalars = numeric_scalars(metrics)
        if scalars and not self.closed:
            self._each(lambda b: b.log_metrics(int(step), scalars))

    def log_alarm(self, event) -> None:
        """An alarm (AlarmEvent or its dict): TensorBoard text, MLflow tag, W&B alert."""
        if not self.closed:
            record = _event_dict(event)
            self._each(lambda b: b.log_alarm(record))

    def log_artifact(self, path: Path | str, name: str | None = None) -> None:
        """A file (or folder) of the run, e.g. the exported encoder and its plan, stored as `name`
        (default: its own name). A missing path is one warning; no backend is dropped for it."""
        path = Path(path)
        if self.closed:
            return
        if not path.exists():
            warn(f"artifact {path} not found; not logged")
            return
        stored = name or path.name
        self._each(lambda b: b.log_artifact(path, stored))

    def flush(self) -> None:
        self._each(lambda b: b.flush())

    def close(self, status: str = "FINISHED") -> None:
        """End every run with status FINISHED, FAILED or KILLED. A second call does nothing."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        if self.closed:
            return
        self._each(lambda b: b.close(status))
        self._backends.clear()
        self.closed = True

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close("KILLED")
        else:
            self.close("FAILED")
