"""Prometheus output of a live daemon, read by the real consumer's checker: `promtool check metrics`
(Debian's prometheus package; tools/ensure_promtool.sh installs it), for the textfile and the HTTP listener."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request

import pytest
import yaml

from conftest import BUNDLED, ROOT, edged_cmd, free_port
from test_metrics import key, parse_prometheus


@pytest.fixture(scope="module")
def promtool() -> str:
    if shutil.which("promtool") is None:
        subprocess.run([str(ROOT / "tools" / "ensure_promtool.sh")], check=False, timeout=900)
    path = shutil.which("promtool")
    assert path, "promtool is missing and tools/ensure_promtool.sh could not install it"
    return path


def promtool_check(promtool: str, text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)


def wait_for(fn, what: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {timeout} s")


def listening(port: int) -> set[str]:
    """IPv4 addresses with a socket listening on `port` (/proc/net/tcp, state 0A)."""
    found = set()
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        f = line.split()
        addr, p = f[1].split(":")
        if f[3] == "0A" and int(p, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
    return found


def test_promtool_is_live_and_refuses_what_breaks_conventions(promtool):
    bad = "# HELP edged_latency_ms latency\n# TYPE edged_latency_ms gauge\nedged_latency_ms{quantile=\"p99\"} 3\n"
    r = promtool_check(promtool, bad)
    assert r.returncode != 0 and "quantile" in (r.stdout + r.stderr)


def test_textfile_and_http_listener_pass_promtool(daemon_factory, client_factory, tmp_path, promtool):
    prom = tmp_path / "edged.prom"
    port = free_port()
    d = daemon_factory({"status": {"prometheus_file": str(prom), "prometheus_port": port, "interval": 0.5}})
    c = client_factory(d.prefix)
    sample = (BUNDLED / "digits_sample.png").read_bytes()
    for i in range(5):
        c.send(sample, f"p{i}")
    c.send(b"not an image", "bad")
    got = c.wait([f"p{i}" for i in range(5)] + ["bad"], 30)
    assert all(got.values()) and got["bad"]["error"]["code"] == "bad_payload"

    def textfile() -> str | None:
        text = prom.read_text() if prom.exists() else ""
        return text if "edged_frames_completed_total 5.0" in text else None

    text = wait_for(textfile, "textfile with 5 completed frames")
    r = promtool_check(promtool, text)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        scraped = resp.read().decode()
    r = promtool_check(promtool, scraped)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr
    v = parse_prometheus(scraped)
    assert v[key("edged_state", state="online")] == 1 and v[key("edged_state", state="degraded")] == 0
    assert v["edged_frames_received_total"] == 6 and v["edged_frames_completed_total"] == 5
    assert v[key("edged_frame_errors_total", code="bad_payload")] == 1
    assert v[key("edged_stage_latency_seconds_count", stage="inference")] == 5
    assert v[key("edged_stage_latency_seconds_bucket", le="+Inf", stage="total")] == 5
    assert 0 < v[key("edged_stage_latency_seconds_sum", stage="total")] < 5 * 30
    assert v[key("edged_accelerator_info", kind="cpu")] == 1 and v[key("edged_worker_up", worker="0")] == 1
    assert v["edged_mqtt_connected"] == 1
    # loopback only by default (status.prometheus_bind): the kernel's table of listening sockets says where
    assert listening(port) == {"127.0.0.1"}, listening(port)
    assert d.stop() == 0
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_prometheus_port_in_use_is_a_config_error(daemon_factory, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        d = daemon_factory({"status": {"prometheus_port": port}}, start=False)
        r = subprocess.run(edged_cmd("run", "-c", str(d.cfg_path)), env=d.env, capture_output=True, text=True,
                           timeout=60)
    assert r.returncode == 78, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "status.prometheus_port" in last and str(port) in last and d.cfg_path.name in last, last


def test_readme_alert_on_the_degraded_state_is_valid_and_fires(promtool, tmp_path):
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- prometheus-rules -->", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "rules.yml").write_text(block)
    annotations = yaml.safe_load(block)["groups"][0]["rules"][0]["annotations"]
    r = subprocess.run([promtool, "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    (tmp_path / "test.yml").write_text(yaml.safe_dump({
        "rule_files": ["rules.yml"], "evaluation_interval": "1m",
        "tests": [{"interval": "1m",
                   "input_series": [{"series": 'edged_state{state="degraded",instance="pi:9808"}',
                                     "values": "0 0 1x10"},
                                    {"series": 'edged_state{state="degraded",instance="pi2:9808"}',
                                     "values": "0 1 0 1 0 1 0 1 0 1 0 1"}],
                   "alert_rule_test": [
                       {"eval_time": "6m", "alertname": "EdgedDegraded", "exp_alerts": []},
                       {"eval_time": "8m", "alertname": "EdgedDegraded",
                        "exp_alerts": [{"exp_labels": {"severity": "warning", "instance": "pi:9808",
                                                       "state": "degraded"},
                                        "exp_annotations": {"summary": "edged pi:9808 is degraded",
                                                            "description": annotations["description"]}}]}]}]}))
    r = subprocess.run([promtool, "test", "rules", "test.yml"], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
