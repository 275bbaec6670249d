"""Web dashboard over run directories: a live server (polls data.json) or one self-contained HTML file.

    serve_dashboard([Path("runs/a"), Path("runs/b")], port=8765)   # blocks; open http://127.0.0.1:8765
    write_html([Path("runs/a")], Path("report.html"))             # data and scripts inline, no network

A path is a run directory (holds metrics.jsonl, alarms.jsonl or config.yaml) or a folder of run directories
(re-scanned on every request, so runs started later appear). The page is plain HTML + inline SVG drawn by
static/dashboard.js; nothing is loaded from the internet. Each run's verdict (the badge) is computed here, in
`run_verdict`, from its alarms and the shared health bands; the page only shows it.

Exposure: the page has no authentication. Binding to anything but a loopback address prints a warning on
stderr, and every request must carry a Host header naming this server (see `HostCheck`): a web page elsewhere
cannot use DNS rebinding to read the metrics through the user's browser. Run paths in the payload are relative
to the watched folders, so the page does not reveal the machine's directory layout.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import json
import math
import os
import re
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path

import yaml

from sslkit.errors import UserError
from sslkit.monitor.alarms import HEALTH_BANDS, crossed, default_alarms, health_band, lookup_metric

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


# ------------------------------------------------------------------------------------------ verdict

STOP_ACTIONS = ("stop", "stop_keep_healthy")


def latest_values(columns: dict[str, list]) -> dict[str, float]:
    """Last non-null value of every column (probe metrics are logged only every probe_every steps)."""
    out = {}
    for key, values in columns.items():
        last = next((v for v in reversed(values) if v is not None), None)
        if last is not None:
            out[key] = float(last)
    return out


def metric_health(latest: dict[str, float]) -> dict[str, str]:
    """'collapsed' / 'healthy' / 'between' for the latest value of every metric that has a health band."""
    out = {}
    for band in HEALTH_BANDS:
        v = latest.get(band.key)
        if v is None:
            continue
        lo, hi = band.healthy
        if band.is_collapsed(v):
            out[band.key] = "collapsed"
        elif (lo is None or v >= lo) and (hi is None or v <= hi):
            out[band.key] = "healthy"
        else:
            out[band.key] = "between"
    return out


def _past_rule(rule: dict, value: float) -> str | None:
    """'below X' / 'above X' when `value` is past the rule's threshold (the alarms' own test), else None."""
    hit = crossed(rule.get("below"), rule.get("above"), value)
    return f"{hit[0]} {hit[1]:g}" if hit else None


def run_verdict(columns: dict[str, list], alarms: list[dict], rules: list[dict]) -> dict:
    """The one verdict the page shows for a run: {"status", "label", "reasons", "watch"}.

    status is the worst of:
      stopped  an alarm with a stopping action fired (the engine stopped the run);
      warn     an alarm fired with action warn, or the latest value of a metric lies in its collapsed band
               (HEALTH_BANDS, the red shading of the charts), or past the threshold of one of the run's alarm
               rules (the dashed line), even before the rule's patience ran out;
      healthy  none of these, with at least one step logged ('waiting' before the first step).
    Every red band and crossed threshold on the page is therefore a reason listed here. "watch" lists every metric
    whose latest value is outside its healthy range without being collapsed (the amber values): they do not change
    the status, but the badge names them, so it lists every metric outside its band.
    """
    stop, warn = [], []
    for a in alarms:
        line = a.get("message") or f"step {a.get('step')}: {a.get('metric')} alarm ({a.get('action')})"
        (stop if a.get("action") in STOP_ACTIONS else warn).append(f"alarm: {line}")
    latest = latest_values(columns)
    flagged = set()
    for key, state in metric_health(latest).items():
        if state == "collapsed":
            band = health_band(key)
            side = f"below {band.below:g}" if band.below is not None else f"above {band.above:g}"
            warn.append(f"{key} = {latest[key]:.3g}, {side}: collapsed range")
            flagged.add(key)
    for rule in rules:
        found = lookup_metric(str(rule.get("metric", "")), latest)  # the column the alarm tracker would watch
        key = found[0] if found else None
        past = _past_rule(rule, latest[key]) if key is not None and key not in flagged else None
        if past:
            warn.append(f"{key} = {latest[key]:.3g}, {past}: alarm threshold ({rule.get('action', 'warn')})")
            flagged.add(key)
    if stop:
        status = "stopped"
    elif warn:
        status = "warn"
    else:
        status = "healthy" if columns.get("step") else "waiting"
    labels = {"stopped": "stopped", "warn": "warning", "healthy": "healthy", "waiting": "no data yet"}
    return {"status": status, "label": labels[status], "reasons": stop + warn,
            "watch": [_outside_band(key, latest[key]) for key, state in metric_health(latest).items()
                      if state == "between" and key not in flagged]}


def _outside_band(key: str, value: float) -> str:
    lo, hi = health_band(key).healthy
    span = f">= {lo:g}" if hi is None else f"<= {hi:g}" if lo is None else f"{lo:g}..{hi:g}"
    return f"{key} = {value:.3g}: outside its healthy range {span}, not collapsed (amber: watch it)"


# ------------------------------------------------------------------------------------------ paths shown


def display_root(paths: list[Path]) -> Path | None:
    """Folder the page shows run paths relative to: the deepest folder holding every watched path (a watched
    run directory counts as its parent, so its own name stays visible). None when there is no common folder."""
    roots = [os.path.abspath(p.parent if is_run_dir(p) else p) for p in map(Path, paths)]
    try:
        return Path(os.path.commonpath(roots)) if roots else None
    except ValueError:   # different drives
        return None


def display_path(run: Path, root: Path | None) -> str:
    """run relative to root, in POSIX form ('exp1', 'sweep/exp1'); the run's own name when it is not below root."""
    try:
        rel = Path(os.path.abspath(run)).relative_to(root) if root is not None else Path(run.name)
    except ValueError:
        rel = Path(run.name)
    return rel.as_posix() if rel.parts else Path(os.path.abspath(run)).name


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

    def run_payload(self, run: Path, root: Path | None = None) -> dict:
        """One run: name, path (relative to `root`), config name, alarm rules, metrics as columns, alarm events,
        the latest health of banded metrics and the run's verdict."""
        metrics = self._tail(run / "metrics.jsonl")
        alarms = [{k: _finite(v) for k, v in a.items()} for a in self._tail(run / "alarms.jsonl")]
        config_name, rules = self._config(run)
        columns = columns_of(metrics)
        return {"name": run.name, "path": display_path(run, root), "config_name": config_name,
                "alarm_rules": rules, "n_steps": len(metrics), "columns": columns, "alarms": alarms,
                "health": metric_health(latest_values(columns)), "verdict": run_verdict(columns, alarms, rules)}

    def payload(self, live: bool) -> dict:
        """Everything the page needs, JSON-safe: runs, and the health bands the charts shade."""
        with self._lock:
            root = display_root(self.paths)
            runs = [self.run_payload(r, root) for r in discover_runs(self.paths)]
        now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        bands = [b.to_dict() for b in HEALTH_BANDS]
        return {"generated": now, "live": live, "bands": bands, "runs": runs}


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


# ------------------------------------------------------------------------------------------ exposure

WILDCARD_HOSTS = ("", "0.0.0.0", "::")
_HOST_HEADER = re.compile(r"^(\[[0-9a-f:.]+(?:%[\w.-]+)?\]|[^\s:/@\[\]]+)(?::(\d{1,5}))?$", re.IGNORECASE)


def as_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address written in `text` ('127.0.0.1', '::1', '[::1]', 'fe80::1%eth0'); IPv4-mapped IPv6
    addresses become IPv4. None when `text` is a name."""
    try:
        ip = ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped if mapped is not None else ip


def resolve(name: str) -> set:
    """Addresses `name` resolves to through the local resolver (empty when it does not resolve)."""
    try:
        infos = socket.getaddrinfo(name, None)
    except (OSError, UnicodeError):
        return set()
    return {ip for ip in (as_ip(info[4][0]) for info in infos) if ip is not None}


def is_loopback_host(host: str) -> bool:
    """True for 'localhost', a loopback address, or a name that resolves to loopback addresses only."""
    if host.lower().rstrip(".") == "localhost":
        return True
    ip = as_ip(host)
    if ip is not None:
        return ip.is_loopback
    addresses = resolve(host) if host not in WILDCARD_HOSTS else set()
    return bool(addresses) and all(a.is_loopback for a in addresses)


def exposure_warning(host: str, port: int) -> str | None:
    """One line for stderr when `host` is not a loopback address (None when it is)."""
    if is_loopback_host(host):
        return None
    where = "all interfaces" if host in WILDCARD_HOSTS else host
    return (f"sslkit dashboard: warning: listening on {where} port {port} without authentication; anyone who "
            f"can reach this port can read these runs' metrics (prefer --host 127.0.0.1 and "
            f"ssh -L {port}:127.0.0.1:{port})")


def parse_host_header(value: str | None) -> str | None:
    """Host part of a Host header, lower case, brackets and trailing dot removed ('[::1]:80' -> '::1');
    None when missing or malformed."""
    m = _HOST_HEADER.match((value or "").strip())
    if m is None or (m.group(2) is not None and not 0 < int(m.group(2)) < 65536):
        return None
    return m.group(1).strip("[]").rstrip(".").lower()


def machine_names() -> set[str]:
    """This machine's host name and fully qualified name, lower case (what `hostname` / DNS call it)."""
    names = set()
    for get in (socket.gethostname, socket.getfqdn):
        try:
            name = get().rstrip(".").lower()
        except OSError:
            continue
        if name:
            names.add(name)
    return names


class HostCheck:
    """Which Host headers the server answers: the defence against DNS rebinding, where a page on another
    site re-points its own domain name at this machine and reads the dashboard through the user's browser.
    A rebinding request always carries that foreign name in its Host header, so a request is answered only
    when the host part of its Host header is:
      * 'localhost' or a loopback address (127.0.0.0/8, ::1);
      * the bound address (`--host`), or a name in `extra`;
      * the local address the request arrived on (an IP literal that reached this socket is this machine);
      * when bound to a non-loopback address (0.0.0.0, ::, an interface): this machine's host name or fully
        qualified name (socket.gethostname / getfqdn) or an address those resolve to.
    Other names this machine may have (a DNS alias, a NAT or cloud public address) are refused: serve with
    --host <that address> or put them in `extra`. The port is not compared: SSH port forwarding changes it,
    and the protection rests on the name.
    """

    def __init__(self, bind_host: str, extra: Iterable[str] = ()):
        names = {"localhost"} | {n.strip("[]").rstrip(".").lower() for n in extra if n}
        if bind_host not in WILDCARD_HOSTS:
            names.add(bind_host.strip("[]").rstrip(".").lower())
        if not is_loopback_host(bind_host):
            names |= machine_names()
        self.names = {n for n in names if as_ip(n) is None}
        self.addresses = {as_ip(n) for n in names if as_ip(n) is not None}
        if not is_loopback_host(bind_host):
            for n in machine_names():
                self.addresses |= resolve(n)

    def allows(self, host_header: str | None, local_address: str | None = None) -> bool:
        """True when a request with this Host header, received on `local_address`, may be answered."""
        host = parse_host_header(host_header)
        if host is None:
            return False
        if host in self.names:
            return True
        ip = as_ip(host)
        if ip is None:
            return False
        return ip.is_loopback or ip in self.addresses or (local_address is not None and ip == as_ip(local_address))


# ------------------------------------------------------------------------------------------ the server


def _handler(data: RunData, page: str, hosts: HostCheck):
    """Request handler class bound to one RunData: '/' -> page, '/data.json' -> payload; 403 for a Host
    header that does not name this server."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server API)
            host = self.headers.get("Host")
            if not hosts.allows(host, self.connection.getsockname()[0]):
                msg = f"sslkit dashboard: Host {host!r} is not this server (DNS-rebinding protection)\n"
                self._send(403, "text/plain; charset=utf-8", msg.encode("utf-8"))
                return
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
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):  # quiet: no line per request
            pass

    return Handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


def make_server(run_dirs: list[Path], host: str = "127.0.0.1", port: int = 8765,
                allowed_hosts: Iterable[str] = ()) -> ThreadingHTTPServer:
    """A ready (not yet serving) threaded HTTP server for the dashboard; port 0 picks a free port.
    `allowed_hosts`: extra names the Host header may carry (e.g. a reverse proxy's name), see HostCheck."""
    check_paths(run_dirs)
    server_class = _Server6 if ":" in host else _Server
    handler = _handler(RunData(run_dirs), render_page(None), HostCheck(host, allowed_hosts))
    return server_class((host.strip("[]"), port), handler)


def serve_dashboard(run_dirs: list[Path], host: str = "127.0.0.1", port: int = 8765,
                    allowed_hosts: Iterable[str] = (),
                    on_ready: Callable[[ThreadingHTTPServer], None] | None = None) -> None:
    """Serve the live dashboard until interrupted (Ctrl-C). Prints the address on stdout and, for a
    non-loopback host, one warning line on stderr. `on_ready(server)` runs just before serving (embedding,
    tests: another thread may call server.shutdown())."""
    try:
        server = make_server(run_dirs, host, port, allowed_hosts)
    except OSError as e:
        raise UserError(f"dashboard: cannot listen on {host}:{port}: {e.strerror or e}") from None
    bound_port = server.server_address[1]
    warning = exposure_warning(host, bound_port)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    print(f"sslkit dashboard: http://{shown}:{bound_port}/  (Ctrl-C to stop)", flush=True)
    if on_ready is not None:
        on_ready(server)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def dashboard_main(run_dirs: list[Path], port: int = 8765, html_out: Path | None = None,
                   host: str = "127.0.0.1", allowed_hosts: Iterable[str] = ()) -> int:
    """`sslkit dashboard RUN... [--port P] [--host H] [--html OUT]`: write a snapshot file or serve live.
    Returns 0."""
    run_dirs = [Path(p) for p in run_dirs]
    if html_out is not None:
        out = write_html(run_dirs, Path(html_out))
        print(f"wrote {out}")
        return 0
    serve_dashboard(run_dirs, host=host, port=port, allowed_hosts=allowed_hosts)
    return 0
