"""Dashboard exposure: Host-header checks (DNS rebinding), the no-authentication warning, relative run paths."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from pathlib import Path

import pytest
import yaml

from sslkit.monitor.dashboard import (
    HostCheck,
    RunData,
    exposure_warning,
    is_loopback_host,
    make_server,
    parse_host_header,
    serve_dashboard,
    write_html,
)


def write_run(run_dir: Path, steps: int = 3) -> Path:
    """A minimal run directory: a few metric lines and a config naming the model and objective."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "monitor/embedding_std": 0.8}) for s in range(1, steps + 1)]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = {"model": {"name": "swin_unetr"}, "objectives": [{"name": "byol"}],
           "data": {"datalist": str(run_dir / "datalist.json")}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    (run_dir / "alarms.jsonl").write_text("", encoding="utf-8")
    return run_dir


def get(address: str, port: int, path: str, host: str | None) -> tuple[int, bytes]:
    """GET `path` from address:port with exactly this Host header (none when host is None)."""
    conn = http.client.HTTPConnection(address, port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_host=True)
        if host is not None:
            conn.putheader("Host", host)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine that is not loopback (the source of a route outwards), if any.
    Connecting a UDP socket sends nothing; it only picks the route."""
    for target in ("192.0.2.1", "10.255.255.255", "198.51.100.1"):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.connect((target, 9))
            except OSError:
                continue
            addr = s.getsockname()[0]
            if not addr.startswith("127.") and addr != "0.0.0.0":
                return addr
    return None


@pytest.fixture
def runs(tmp_path) -> Path:
    write_run(tmp_path / "runs" / "exp_a")
    write_run(tmp_path / "runs" / "exp_b")
    return tmp_path / "runs"


class Served:
    """serve_dashboard() running in a thread; the server is captured through on_ready."""

    def __init__(self, paths, host):
        ready = threading.Event()
        box = []

        def on_ready(server):
            box.append(server)
            ready.set()

        self.thread = threading.Thread(target=serve_dashboard, args=(paths,),
                                       kwargs={"host": host, "port": 0, "on_ready": on_ready}, daemon=True)
        self.thread.start()
        assert ready.wait(30), "the dashboard server did not start"
        self.server = box[0]
        self.port = self.server.server_address[1]

    def stop(self):
        self.server.shutdown()
        self.thread.join(10)


# ------------------------------------------------------------------------------------------ unit rules


def test_host_header_parsing():
    assert parse_host_header("LocalHost:8765") == "localhost"
    assert parse_host_header("[::1]:8765") == "::1"
    assert parse_host_header("[::1]") == "::1"
    assert parse_host_header("127.0.0.1") == "127.0.0.1"
    assert parse_host_header("example.org.:80") == "example.org"
    for bad in (None, "", "a b", "host:port", "host:99999", "user@host", "::1", "host:80:81", "[::1"):
        assert parse_host_header(bad) is None, bad


def test_loopback_detection_and_warning_text():
    assert is_loopback_host("127.0.0.1") and is_loopback_host("::1") and is_loopback_host("localhost")
    assert is_loopback_host("127.0.0.2") and is_loopback_host("[::1]")
    assert not is_loopback_host("0.0.0.0") and not is_loopback_host("::") and not is_loopback_host("")
    assert not is_loopback_host("192.0.2.7")
    assert exposure_warning("127.0.0.1", 8765) is None and exposure_warning("localhost", 1) is None
    line = exposure_warning("0.0.0.0", 8765)
    assert "\n" not in line and "without authentication" in line and "all interfaces" in line


def test_host_check_on_loopback_bind():
    check = HostCheck("127.0.0.1")
    for ok in ("127.0.0.1:8765", "localhost:8765", "localhost", "[::1]:8765", "127.0.0.1", "localhost:9000"):
        assert check.allows(ok, "127.0.0.1"), ok
    for bad in ("evil.example:8765", "127.0.0.1.nip.io:8765", "localhost.evil.example", "8765", None, ""):
        assert not check.allows(bad, "127.0.0.1"), bad
    # bound to loopback, the machine's own name is not needed and not accepted
    assert "evil.example" not in check.names
    assert HostCheck("127.0.0.1", extra=["dash.internal"]).allows("dash.internal:443", "127.0.0.1")


def test_host_check_on_wildcard_bind_accepts_the_receiving_address_only():
    check = HostCheck("0.0.0.0")
    assert check.allows("192.0.2.7:8765", "192.0.2.7")            # the address the request arrived on
    assert check.allows("[::ffff:192.0.2.7]:8765", "192.0.2.7")   # same address, IPv4-mapped form
    assert not check.allows("192.0.2.8:8765", "192.0.2.7")        # some other machine's address
    assert not check.allows("evil.example:8765", "192.0.2.7")
    assert check.allows(f"{socket.gethostname()}:8765", "192.0.2.7")


# ------------------------------------------------------------------------------------------ served


def test_loopback_server_answers_its_names_and_refuses_others(runs, capsys):
    served = Served([runs], "127.0.0.1")
    try:
        port = served.port
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
            status, body = get("127.0.0.1", port, "/data.json", host)
            assert status == 200, host
            assert {r["name"] for r in json.loads(body)["runs"]} == {"exp_a", "exp_b"}
        for host in (f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", None):
            for path in ("/", "/data.json"):
                status, body = get("127.0.0.1", port, path, host)
                assert status == 403, (host, path)
                assert b"exp_a" not in body and b"DOCTYPE" not in body
        assert get("127.0.0.1", port, "/", f"localhost:{port}")[1].startswith(b"<!DOCTYPE html>")
    finally:
        served.stop()
    out, err = capsys.readouterr()
    assert err == ""                                   # loopback: no warning
    assert f"http://127.0.0.1:{port}/" in out


def test_wildcard_server_warns_once_and_checks_host(runs, capsys):
    served = Served([runs], "0.0.0.0")
    try:
        port = served.port
        assert get("127.0.0.1", port, "/data.json", f"127.0.0.1:{port}")[0] == 200
        assert get("127.0.0.1", port, "/data.json", f"{socket.gethostname()}:{port}")[0] == 200
        assert get("127.0.0.1", port, "/data.json", f"rebind.evil.example:{port}")[0] == 403
        own = non_loopback_address()
        if own is not None:   # reached through a real interface: its own address is accepted, a foreign name is not
            assert get(own, port, "/data.json", f"{own}:{port}")[0] == 200
            assert get(own, port, "/data.json", f"rebind.evil.example:{port}")[0] == 403
    finally:
        served.stop()
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1
    assert "without authentication" in err_lines[0] and str(port) in err_lines[0]


def test_payload_paths_are_relative_to_the_watched_folder(runs, tmp_path):
    payload = RunData([runs]).payload(live=True)
    assert sorted(r["path"] for r in payload["runs"]) == ["exp_a", "exp_b"]
    assert str(tmp_path) not in json.dumps(payload)
    # a run directory named directly keeps its own name; two folders are shown from their common parent
    assert [r["path"] for r in RunData([runs / "exp_a"]).payload(live=False)["runs"]] == ["exp_a"]
    other = write_run(tmp_path / "elsewhere" / "exp_c")
    both = RunData([runs, other]).payload(live=False)
    assert sorted(r["path"] for r in both["runs"]) == ["elsewhere/exp_c", "runs/exp_a", "runs/exp_b"]
    assert str(tmp_path) not in json.dumps(both)
    html = write_html([runs], tmp_path / "snap.html").read_text(encoding="utf-8")
    assert str(tmp_path) not in html and '"path":"exp_b"' in html


def test_served_data_json_has_no_absolute_paths(runs, tmp_path):
    server = make_server([runs], port=0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        status, body = get("127.0.0.1", port, "/data.json", f"127.0.0.1:{port}")
        assert status == 200
        assert str(tmp_path).encode() not in body
        assert sorted(r["path"] for r in json.loads(body)["runs"]) == ["exp_a", "exp_b"]
    finally:
        server.shutdown()
        server.server_close()
