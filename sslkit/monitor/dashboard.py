"""Web dashboard over run directories: a live server (polls data.json) or one self-contained HTML file.

    serve_dashboard([Path("runs/a"), Path("runs/b")], port=8765)   # blocks; open http://127.0.0.1:8765
    write_html([Path("runs/a")], Path("report.html"))             # data and scripts inline, no network

A path is a run directory (holds metrics.jsonl, alarms.jsonl or config.yaml) or a folder of run directories
(re-scanned on every request, so runs started later appear). The page is plain HTML + inline SVG drawn by
static/dashboard.js; nothing is loaded from the internet.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import threading
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path

import yaml

from sslkit.errors import UserError
from sslkit.monitor.alarms import default_alarms

RUN_FILES = ("metrics.jsonl", "alarms.jsonl", "config.yaml")


# ------------------------------------------------------------------------------------------ reading runs


def is_run_dir(path: Path) -> bool:
    """A run directory holds at least one of metrics.jsonl, alarms.jsonl, config.yaml."""
    return path.is_dir() and any((path / f).is_file() for f in RUN_FILES)


def discover_runs(paths: list[Path]) -> list[Path]:
    """Run directories named by `paths` (each a run dir or a folder of run dirs), in order, without repeats."""
    out: list[Path] = []
    for p in map(Path, paths):
        found = [p] if is_run_dir(p) else sorted(c for c in p.iterdir() if is_run_dir(c)) if p.is_dir() else []
        out.extend(f for f in found if f not in out)
    return out


def check_paths(paths: list[Path]) -> None:
    """UserError naming the first path that does not exist."""
    for p in map(Path, paths):
        if not p.exists():
            raise UserError(f"{p}: no such run directory")


class JsonlTail:
    """Incremental reader of a growing JSON-lines file; a half-written last line waits for the next read."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.records: list[dict] = []
        self._partial = b""

    def read(self) -> list[dict]:
        """All complete records so far (re-reads from the start if the file was truncated or replaced)."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            self.offset, self.records, self._partial = 0, [], b""
            return self.records
        if size < self.offset:
            self.offset, self.records, self._partial = 0, [], b""
        if size > self.offset:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read(size - self.offset)
            self.offset = size
            lines = (self._partial + chunk).split(b"\n")
            self._partial = lines.pop()
            self.records.extend(r for r in map(_parse_line, lines) if r is not None)
        return self.records


def _parse_line(line: bytes) -> dict | None:
    line = line.strip()
    if not line:
        return None
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def _finite(v):
    """JSON-safe value: non-finite floats become None (JSON.parse rejects NaN); numbers stay numbers."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def columns_of(records: list[dict]) -> dict[str, list]:
    """Columnar numeric view of metric records: {key: [value or None per record]}; 'step' always present."""
    keys: dict[str, None] = {"step": None}
    for r in records:
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.setdefault(k, None)
    cols = {k: [] for k in keys}
    for i, r in enumerate(records):
        for k in keys:
            v = r.get(k, i if k == "step" else None)
            cols[k].append(_finite(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None)
    return cols


def config_summary(config_path: Path) -> tuple[str, list[dict]]:
    """(display name, alarm rules) from a run's config.yaml; defaults when missing or unreadable."""
    try:
        raw = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        raw = {}
    if not isinstance(raw, dict):
        raw = {}
    name = raw.get("name") or raw.get("recipe") or ""
    if not name:
        model = (raw.get("model") or {}).get("name", "") if isinstance(raw.get("model"), dict) else ""
        objs = [o.get("name", "?") if isinstance(o, dict) else str(o) for o in raw.get("objectives") or []]
        name = " · ".join(x for x in (model, " + ".join(objs)) if x)
    monitor = raw.get("monitor") if isinstance(raw.get("monitor"), dict) else {}
    rules = monitor.get("alarms") or [asdict(a) for a in default_alarms()]
    rules = [r for r in rules if isinstance(r, dict)]
    return str(name), rules


class RunData:
    """Thread-safe cache of every watched run; `payload()` is what data.json returns."""

    def __init__(self, paths: list[Path]):
        self.paths = [Path(p) for p in paths]
        self._tails: dict[Path, JsonlTail] = {}
        self._configs: dict[Path, tuple[float, tuple[str, list[dict]]]] = {}
        self._lock = threading.Lock()

    def _tail(self, path: Path) -> list[dict]:
        if path not in self._tails:
            self._tails[path] = JsonlTail(path)
        return self._tails[path].read()

    def _config(self, run: Path) -> tuple[str, list[dict]]:
        path = run / "config.yaml"
        mtime = path.stat().st_mtime if path.exists() else -1.0
        cached = self._configs.get(run)
        if cached is None or cached[0] != mtime:
            cached = (mtime, config_summary(path))
            self._configs[run] = cached
        return cached[1]

    def run_payload(self, run: Path) -> dict:
        """One run: name, path, config name, alarm rules, metrics as columns, alarm events."""
        metrics = self._tail(run / "metrics.jsonl")
        alarms = [{k: _finite(v) for k, v in a.items()} for a in self._tail(run / "alarms.jsonl")]
        config_name, rules = self._config(run)
        return {"name": run.name, "path": str(run), "config_name": config_name, "alarm_rules": rules,
                "n_steps": len(metrics), "columns": columns_of(metrics), "alarms": alarms}

    def payload(self, live: bool) -> dict:
        """Everything the page needs, JSON-safe."""
        with self._lock:
            runs = [self.run_payload(r) for r in discover_runs(self.paths)]
        now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        return {"generated": now, "live": live, "runs": runs}


# ------------------------------------------------------------------------------------------ the page


def _asset(name: str) -> str:
    return resources.files("sslkit.monitor").joinpath("static", name).read_text(encoding="utf-8")


def render_page(data: dict | None) -> str:
    """The HTML page with CSS and JS inline; `data` embedded (snapshot) or None (page polls data.json)."""
    html = _asset("dashboard.html")
    html = html.replace("/*__SSLKIT_CSS__*/", _asset("dashboard.css"))
    html = html.replace("/*__SSLKIT_JS__*/", _asset("dashboard.js"))
    blob = "null" if data is None else json.dumps(data, allow_nan=False, separators=(",", ":"))
    blob = blob.replace("</", "<\\/").replace("<!--", "<\\!--")  # cannot end the <script> early
    return html.replace("__SSLKIT_DATA__", blob)


def write_html(run_dirs: list[Path], out_html: Path) -> Path:
    """Write one self-contained HTML file (data, CSS and scripts inline) for the given runs."""
    check_paths(run_dirs)
    runs = discover_runs(run_dirs)
    if not runs:
        raise UserError(f"{', '.join(map(str, run_dirs))}: no run directories (metrics.jsonl) found")
    out_html = Path(out_html)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    out_html.write_text(render_page(RunData(runs).payload(live=False)), encoding="utf-8")
    return out_html


# ------------------------------------------------------------------------------------------ the server


def _handler(data: RunData, page: str):
    """Request handler class bound to one RunData: '/' -> page, '/data.json' -> payload."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server API)
            route = self.path.split("?", 1)[0]
            if route in ("/", "/index.html"):
                self._send(200, "text/html; charset=utf-8", page.encode("utf-8"))
            elif route == "/data.json":
                body = json.dumps(data.payload(live=True), allow_nan=False).encode("utf-8")
                self._send(200, "application/json", body)
            else:
                self._send(404, "text/plain", b"not found")

        def _send(self, code: int, ctype: str, body: bytes):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):  # quiet: no line per request
            pass

    return Handler


def make_server(run_dirs: list[Path], host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """A ready (not yet serving) threaded HTTP server for the dashboard; port 0 picks a free port."""
    check_paths(run_dirs)
    server = ThreadingHTTPServer((host, port), _handler(RunData(run_dirs), render_page(None)))
    server.daemon_threads = True
    return server


def serve_dashboard(run_dirs: list[Path], host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the live dashboard until interrupted (Ctrl-C)."""
    try:
        server = make_server(run_dirs, host, port)
    except OSError as e:
        raise UserError(f"dashboard: cannot listen on {host}:{port}: {e.strerror or e}") from None
    print(f"sslkit dashboard: http://{host}:{server.server_address[1]}/  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def dashboard_main(run_dirs: list[Path], port: int = 8765, html_out: Path | None = None,
                   host: str = "127.0.0.1") -> int:
    """`sslkit dashboard RUN... [--port P] [--html OUT]`: write a snapshot file or serve live. Returns 0."""
    run_dirs = [Path(p) for p in run_dirs]
    if html_out is not None:
        out = write_html(run_dirs, Path(html_out))
        print(f"wrote {out}")
        return 0
    serve_dashboard(run_dirs, host=host, port=port)
    return 0
