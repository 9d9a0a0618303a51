"""Config input is bounded (issue 17, point 7): YAML bombs, topic levels, file kinds and modes.

Each hostile config is refused by `edged check` / `edged run` as real subprocesses: exit 78, one
line on stderr naming the file, the line and the key, no traceback. Memory is judged by the
child's peak RSS (wait4) against the same command on a config that fails at the same stage; the
child runs under RLIMIT_DATA so that a loader that does expand a bomb fails instead of eating the
machine.
"""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import BUNDLED, ROOT, edged_cmd

from edged import config, configyaml, postprocess, runtime, topics, userfiles
from edged.errors import ConfigError, ModelError

MODEL = BUNDLED / "digits.tflite"
LABELS = BUNDLED / "digits_labels.txt"
CHILD_DATA_LIMIT = 768 << 20


def limited(argv: list[str], limit: int = CHILD_DATA_LIMIT) -> list[str]:
    """argv run under RLIMIT_DATA=limit (set by a Python that then execs it: no preexec_fn beside threads)."""
    setup = ("import os, resource, sys\n"
             f"resource.setrlimit(resource.RLIMIT_DATA, ({limit}, {limit}))\n"
             "os.execv(sys.argv[1], sys.argv[1:])\n")
    return [sys.executable, "-c", setup, *argv]


class Ran:
    def __init__(self, rc: int, stdout: str, stderr: str, seconds: float, maxrss_kib: int) -> None:
        self.returncode, self.stdout, self.stderr = rc, stdout, stderr
        self.seconds, self.maxrss_kib = seconds, maxrss_kib


def run(*args: str, timeout: float = 60) -> Ran:
    """`edged ARGS` as a child; its exit status, output, wall time and peak RSS."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("EDGED_CONFIG", None)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    t0 = time.monotonic()
    proc = subprocess.Popen(limited(edged_cmd(*args)), stdout=out_w, stderr=err_w, env=env, cwd=str(ROOT))
    os.close(out_w)
    os.close(err_w)
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}

    def drain(fd: int) -> None:
        while data := os.read(fd, 65536):
            chunks[fd].append(data)

    readers = [threading.Thread(target=drain, args=(fd,), daemon=True) for fd in (out_r, err_r)]
    for r in readers:
        r.start()
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            os.wait4(proc.pid, 0)
            raise AssertionError(f"edged {' '.join(args)} still running after {timeout} s")
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait for it again
    seconds = time.monotonic() - t0
    for r in readers:
        r.join(10)
    os.close(out_r)
    os.close(err_r)
    return Ran(proc.returncode, b"".join(chunks[out_r]).decode(errors="replace"),
               b"".join(chunks[err_r]).decode(errors="replace"), seconds, usage.ru_maxrss)


def one_line_error(r: Ran, code: int = 78) -> str:
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr[-2000:]
    return lines[0]


def alias_bomb() -> str:
    """1 KiB: nine levels of nine aliases each, 9**9 strings once expanded, in a mapping (coral.options)."""
    lines = [
        "accelerator:",
        "  coral:",
        "    options:",
        '      a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
    ]
    prev = "a"
    for name in "bcdefghi":
        lines.append(f"      {name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
        prev = name
    return "\n".join(lines) + "\n"


def write(tmp: Path, text: str, name: str = "edged.yaml") -> Path:
    p = tmp / name
    p.write_text(text)
    return p


def parse_error(text: str) -> str:
    """The message of the ConfigError that parsing `text` as /srv/edged.yaml raises (none raised: the test fails)."""
    with pytest.raises(ConfigError) as info:
        config.parse(text, "/srv/edged.yaml", Path("/srv"))
    return str(info.value)


# -- YAML bombs -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Ran:
    """`edged check` on a config refused by the loader (an unknown key): the cost of getting that far."""
    cfg = write(tmp_path_factory.mktemp("base"), "colour: red\n")
    r = run("check", "-c", str(cfg))
    assert "colour" in one_line_error(r)
    return r


def test_check_alias_bomb_refused_naming_line_fast_without_memory_growth(tmp_path, baseline):
    text = alias_bomb()
    assert len(text) < 1100
    r = run("check", "-c", str(write(tmp_path, text)), timeout=60)
    line = one_line_error(r)
    assert line.startswith("edged check: edged.yaml:4: ") and "anchors" in line, line
    grown = (r.maxrss_kib - baseline.maxrss_kib) / 1024
    assert grown < 16, f"peak RSS {r.maxrss_kib} KiB vs {baseline.maxrss_kib} KiB refusing an unknown key"
    assert r.seconds < baseline.seconds + 2.0, (r.seconds, baseline.seconds)


@pytest.mark.parametrize("shape", ["flow", "block"])
def test_check_nesting_2000_levels_exits_78_naming_line_no_traceback(tmp_path, shape, baseline):
    if shape == "flow":
        text = "device_id: x\nmqtt: " + "[" * 2000 + "]" * 2000 + "\n"
    else:  # mappings, one more space per level: 1,000 levels stay under the 1 MiB cap, 2,000 would not
        text = "device_id: x\n" + "".join(" " * i + "a:\n" for i in range(1000)) + " " * 1000 + "a: 1\n"
    r = run("check", "-c", str(write(tmp_path, text)))
    line = one_line_error(r)
    where = 2 if shape == "flow" else configyaml.MAX_DEPTH + 1  # the line of the first node too deep
    assert f"edged.yaml:{where}: nested deeper than {configyaml.MAX_DEPTH} levels" in line, line
    assert (r.maxrss_kib - baseline.maxrss_kib) / 1024 < 16


def test_run_deep_yaml_exits_78_before_touching_the_broker(tmp_path):
    text = "mqtt:\n  host: 127.0.0.1\n  port: 9\nx: " + "{a: " * 2000 + "1" + "}" * 2000 + "\n"
    line = one_line_error(run("run", "-c", str(write(tmp_path, text)), timeout=30))
    assert line.startswith("edged run: edged.yaml:4: nested deeper"), line


@pytest.mark.parametrize("text, line_no, word", [
    ("mqtt:\n  host: &h 127.0.0.1\n", 2, "anchors (&h)"),
    ("mqtt:\n  host: *h\n", 2, "aliases (*h)"),
    ("accelerator:\n  prefer: &p [cpu]\n", 2, "anchors (&p)"),
    ("sandbox:\n  <<: *defaults\n", 2, "aliases (*defaults)"),
])
def test_parse_anchor_or_alias_refused_naming_line(text, line_no, word):
    msg = parse_error(text)
    assert msg.startswith(f"edged.yaml:{line_no}: YAML {word} are not allowed"), msg


def test_parse_too_many_nodes_refused():
    text = "accelerator:\n  coral:\n    devices: [" + ", ".join(["usb"] * (configyaml.MAX_NODES + 5)) + "]\n"
    with pytest.raises(ConfigError, match=f"edged.yaml:3: more than {configyaml.MAX_NODES} values"):
        config.parse(text, "/srv/edged.yaml", Path("/srv"))


def test_parse_nested_option_value_refused_not_stringified():
    with pytest.raises(ConfigError, match=r"edged.yaml:4 accelerator.coral.options: keys and values must be plain"):
        config.parse("accelerator:\n  coral:\n    options:\n      a: [1, [2, [3]]]\n", "/srv/edged.yaml", Path("/srv"))
    cfg = config.parse("accelerator:\n  coral:\n    options: {a: 1, b: true}\n", "/srv/edged.yaml", Path("/srv"))
    assert cfg.accelerator.coral.options == {"a": "1", "b": "true"}


def test_check_config_over_1_mib_refused_naming_file(tmp_path):
    p = write(tmp_path, "# padding\n" * (userfiles.CONFIG_MAX_BYTES // 10 + 10))
    line = one_line_error(run("check", "-c", str(p)))
    assert f"{p}: cannot read config: " in line and "more than the 1048576 allowed" in line, line


@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "directory"])
def test_check_config_not_a_regular_file_refused_at_once(tmp_path, kind):
    if kind == "dev_zero":
        path = "/dev/zero"
    elif kind == "fifo":
        path = str(tmp_path / "cfg.fifo")
        os.mkfifo(path)  # nobody ever writes to it: an open() without O_NONBLOCK waits for ever
    else:
        path = str(tmp_path)
    line = one_line_error(run("check", "-c", path, timeout=30))
    assert f"{path}: cannot read config: " in line and "not a regular file" in line, line


# -- MQTT topic levels ----------------------------------------------------------------------------------

# values as YAML scalars: double quotes for the escapes
@pytest.mark.parametrize("device_id, why", [
    ("cam+1", "wildcard '+'"), ("cam#", "wildcard '#'"), ("a/b", "one topic level"), ('"a\\0b"', "NUL"),
    ('"a\\x01b"', "control character"), ("x" * 200, "at most 128 bytes"),
])
def test_check_device_id_not_a_topic_level_exits_78_naming_key(tmp_path, device_id, why):
    text = f"device_id: {device_id}\nmodel:\n  path: {MODEL}\n"
    line = one_line_error(run("check", "-c", str(write(tmp_path, text))))
    assert line.startswith("edged check: edged.yaml:1 device_id: ") and why in line, line


@pytest.mark.parametrize("prefix, why", [
    ("edged/+", "wildcard '+'"), ("edged/#", "wildcard '#'"), ("site/+/{device_id}", "wildcard '+'"),
    ("$SYS/edged", "must not start with '$'"), ("$share/g/x", "must not start with '$'"),
    ("/edged/{device_id}", "must not start with '/'"), ("edged//{device_id}", "empty topic level"),
    ("edged/\\0x", "NUL"), ("edged/\\tx", "control character"), ("/", "must not be empty"),
])
def test_check_topic_prefix_not_a_topic_exits_78_naming_key(tmp_path, prefix, why):
    text = f'device_id: cam1\nmqtt:\n  topic_prefix: "{prefix}"\nmodel:\n  path: {MODEL}\n'
    line = one_line_error(run("check", "-c", str(write(tmp_path, text))))
    assert line.startswith("edged check: edged.yaml:3 mqtt.topic_prefix: ") and why in line, line


def test_run_wildcard_prefix_exits_78_instead_of_never_connecting(tmp_path):
    text = f"device_id: cam1\nmqtt:\n  host: 127.0.0.1\n  port: 9\n  topic_prefix: edged/+/x\nmodel:\n  path: {MODEL}\n"
    line = one_line_error(run("run", "-c", str(write(tmp_path, text)), timeout=30))
    assert line.startswith("edged run: edged.yaml:5 mqtt.topic_prefix: must not contain the MQTT wildcard '+'"), line


@pytest.mark.parametrize("share, key, why", [
    ("{group: a/b, prefix: fleet}", "mqtt.share.group", "one topic level"),
    ("{group: g+, prefix: fleet}", "mqtt.share.group", "wildcard '+'"),
    ("{group: g, prefix: 'fleet/#'}", "mqtt.share.prefix", "wildcard '#'"),
    ("{group: g, prefix: '$x'}", "mqtt.share.prefix", "must not start with '$'"),
])
def test_parse_share_group_and_prefix_checked_as_topics(share, key, why):
    msg = parse_error(f"device_id: d\nmqtt:\n  share: {share}\n")
    assert f"edged.yaml:3 {key}: " in msg and why in msg, msg


def test_parse_valid_topics_still_accepted():
    for prefix in (
        "edged/{device_id}",
        "site/{device_id}/x/",
        "{device_id}",
        "home/kitchen cam/{device_id}",
        "ünï/{device_id}",
    ):
        cfg = config.parse(f"device_id: pi-4_b.1\nmqtt:\n  topic_prefix: '{prefix}'\n", "/srv/e.yaml", Path("/srv"))
        assert topics.prefix_problem(cfg.prefix) is None and "pi-4_b.1" in cfg.prefix


def test_parse_every_error_reported_at_once():
    text = "device_id: a+b\nmqtt:\n  share: {group: 'x/y'}\nmodel:\n  path: /dev/zero\n"
    msg = parse_error(text)
    for fragment in ("edged.yaml:1 device_id:", "edged.yaml:3 mqtt.share.group:", "edged.yaml:5 model.path:"):
        assert fragment in msg, msg


# -- numbers a thread would choke on ------------------------------------------------------------------------

@pytest.mark.parametrize("text, key, words", [
    ("sandbox:\n  heartbeat_s: .nan\n", "sandbox.heartbeat_s", "finite"),   # NaN passes every `>= lo` check
    ("sandbox:\n  frame_timeout_s: .inf\n", "sandbox.frame_timeout_s", "finite"),
    ("model:\n  mean: -.inf\n", "model.mean", "finite"),
    ("status:\n  interval: 1.0e+300\n", "status.interval", "must be <= 1e+09"),  # Event.wait(1e300): OverflowError
    ("mqtt:\n  port: 70000\n", "mqtt.port", "must be <= 65535"),
    ("mqtt:\n  keepalive: 65536\n", "mqtt.keepalive", "must be <= 65535"),
    ("mqtt:\n  session_expiry: 4294967296\n", "mqtt.session_expiry", "must be <= 4294967295"),
    ("mqtt:\n  result_buffer: 100000000000000000000\n", "mqtt.result_buffer", "must be <= 2147483647"),
    ("queue:\n  max_frame_bytes: 268435456\n", "queue.max_frame_bytes", "must be <= 268435455"),
    ('mqtt:\n  host: "broker\\0.lan"\n', "mqtt.host", "NUL"),
    ("mqtt:\n  host: ' '\n", "mqtt.host", "must not be empty"),
    ('mqtt:\n  username: "a\\0b"\n', "mqtt.username", "NUL"),
    ('mqtt:\n  client_id: "c\\x1b[2J"\n', "mqtt.client_id", "control character"),
])
def test_parse_number_or_string_out_of_range_names_key(text, key, words):
    msg = parse_error(text)
    assert msg.startswith(f"edged.yaml:2 {key}: ") and words in msg, msg


def test_parse_edge_values_still_accepted():
    cfg = config.parse("mqtt:\n  port: 65535\n  session_expiry: 4294967295\n  username: 'a+b#c'\n"
                       "  client_id: 'dev/1+'\nmodel:\n  mean: -1000.0\n", "/srv/edged.yaml", Path("/srv"))
    assert cfg.mqtt.port == 65535 and cfg.mqtt.session_expiry == 0xFFFFFFFF and cfg.model.mean == -1000.0


def test_send_dev_zero_refused_at_frame_cap_without_reading_on(tmp_path, baseline):
    cfg = write(tmp_path, "mqtt:\n  port: 9\nqueue:\n  max_frame_bytes: 1048576\n")
    r = run("send", "-c", str(cfg), "/dev/zero", timeout=30)
    line = one_line_error(r, 66)
    assert line == "edged send: /dev/zero: more than the 1048576 bytes allowed", line
    assert (r.maxrss_kib - baseline.maxrss_kib) / 1024 < 48  # paho imported, plus 1 MiB read


# -- files the daemon reads -----------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["path", "labels", "cpu_fallback"])
def test_check_model_file_key_on_dev_zero_refused_at_once(tmp_path, key, baseline):
    model = "/dev/zero" if key == "path" else str(MODEL)
    extra = f"  {key}: /dev/zero\n" if key != "path" else ""
    text = f"model:\n  path: {model}\n{extra}"
    r = run("check", "-c", str(write(tmp_path, text)), timeout=30)
    line = one_line_error(r)
    where = 2 if key == "path" else 3
    assert f"edged.yaml:{where} model.{key}: /dev/zero is a character device, not a regular file" in line, line
    assert r.seconds < baseline.seconds + 2.0 and (r.maxrss_kib - baseline.maxrss_kib) / 1024 < 16


@pytest.mark.parametrize("key, value", [("mqtt:\n  password_file", "/dev/zero"), ("mqtt:\n  tls:\n    ca", "/dev/null"),
                                        ("status:\n  prometheus_file", "/dev/null")])
def test_parse_other_read_or_replaced_files_must_not_be_devices(key, value):
    with pytest.raises(ConfigError, match="is a character device, not a regular file"):
        config.parse(f"{key}: {value}\n", "/srv/edged.yaml", Path("/srv"))


def _in_child(code: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Python code in a child under RLIMIT_DATA: a reader that does not stop fails there, not here."""
    return subprocess.run(limited([sys.executable, "-c", code]), capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False)


@pytest.mark.parametrize("reader", ["needs_edgetpu", "model", "labels"])
@pytest.mark.parametrize("target", ["/dev/zero", "fifo"])
def test_model_and_label_readers_refuse_non_regular_files_at_once(tmp_path, reader, target):
    """The readers themselves, past the config check (a path swapped after `edged check`, a reload)."""
    path = target
    if target == "fifo":
        path = str(tmp_path / "m.fifo")
        os.mkfifo(path)
    call = {"needs_edgetpu": f"runtime.needs_edgetpu({path!r})", "model": f"runtime.Model({path!r})",
            "labels": f"postprocess.load_labels({path!r})"}[reader]
    code = ("from edged import runtime, postprocess\nfrom edged.errors import ModelError\n"
            f"try:\n    {call}\nexcept ModelError as exc:\n    print('refused:', exc)\n")
    r = _in_child(code, timeout=30)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stdout.startswith("refused:") and path in r.stdout and "not a regular file" in r.stdout, r.stdout


def test_load_labels_larger_than_cap_refused(tmp_path):
    p = tmp_path / "labels.txt"
    with open(p, "wb") as f:
        f.truncate(userfiles.LABELS_MAX_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(ModelError, match="more than the 16777216 allowed"):
        postprocess.load_labels(str(p))
    assert postprocess.load_labels(str(LABELS))  # the bundled ones still load


def test_needs_edgetpu_regular_file_answers_missing_file_is_modelerror():
    assert runtime.needs_edgetpu(str(MODEL)) is False
    with pytest.raises(ModelError, match="/nonexistent/model.tflite: No such file"):
        runtime.needs_edgetpu("/nonexistent/model.tflite")


def test_userfiles_first_line_bounded_and_regular(tmp_path):
    p = tmp_path / "pw"
    p.write_text("s3cret\r\nsecond\n")
    assert userfiles.first_line(p) == "s3cret"
    with pytest.raises(userfiles.FileRefused, match="not a regular file"):
        userfiles.first_line("/dev/zero")
    big = tmp_path / "big"
    big.write_bytes(b"x" * (userfiles.SECRET_MAX_BYTES + 1))
    with pytest.raises(userfiles.FileRefused, match="more than"):
        userfiles.first_line(big)


# -- secrets readable by everyone ------------------------------------------------------------------------

@pytest.mark.parametrize("mode, warned", [(0o644, True), (0o604, True), (0o602, True), (0o640, False), (0o600, False)])
def test_check_password_file_mode_warns_when_any_user_can_read(tmp_path, mode, warned):
    pw = tmp_path / "mqtt.pw"
    pw.write_text("secret\n")
    pw.chmod(mode)
    text = f"mqtt:\n  username: edged\n  password_file: mqtt.pw\nmodel:\n  path: {MODEL}\n"
    r = run("check", "-c", str(write(tmp_path, text)))
    assert r.returncode == 0, r.stderr  # a warning, not an error (README: why)
    warnings = [ln for ln in r.stderr.splitlines() if "warning" in ln]
    if warned:
        assert len(warnings) == 1, r.stderr
        assert warnings[0].startswith("edged check: warning: edged.yaml:3 mqtt.password_file: "), warnings
        assert f"mode {mode:04o}" in warnings[0] and "every user" in warnings[0]
    else:
        assert not warnings, r.stderr


def test_parse_tls_key_world_readable_or_in_world_writable_folder_warns(tmp_path):
    (tmp_path / "c.pem").write_text("cert")
    key = tmp_path / "k.pem"
    key.write_text("key")
    key.chmod(0o644)
    text = "mqtt:\n  tls: {cert: c.pem, key: k.pem}\n"
    cfg = config.parse(text, str(tmp_path / "edged.yaml"), tmp_path)
    assert len(cfg.warnings) == 1 and cfg.warnings[0].startswith("edged.yaml:2 mqtt.tls.key: "), cfg.warnings
    key.chmod(0o600)
    assert config.parse(text, str(tmp_path / "edged.yaml"), tmp_path).warnings == ()
    shared_dir = tmp_path / "drop"
    shared_dir.mkdir()
    shared_dir.chmod(0o777)  # anyone may replace the key there
    (shared_dir / "k.pem").write_text("key")
    (shared_dir / "k.pem").chmod(0o600)
    cfg = config.parse("mqtt:\n  tls: {cert: c.pem, key: drop/k.pem}\n", str(tmp_path / "edged.yaml"), tmp_path)
    assert len(cfg.warnings) == 1 and "every user may write to" in cfg.warnings[0], cfg.warnings


def test_exposure_of_sticky_tmp_not_flagged(tmp_path):
    assert stat.S_IMODE(os.stat("/tmp").st_mode) & stat.S_ISVTX
    p = Path("/tmp") / f"edged-test-{os.getpid()}.key"
    p.write_text("k")
    try:
        p.chmod(0o600)
        assert userfiles.exposure(str(p)) is None
    finally:
        p.unlink()



# -- SIGHUP with a hostile config: refused, the daemon keeps serving ----------------------------------------

def _vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _wait_log(d, needle: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = d.log()
        if needle in log:
            return log
        assert d.proc.poll() is None, f"daemon exited {d.proc.returncode}: {log[-2000:]}"
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} not logged in {timeout} s: {d.log()[-2000:]}")


def test_reload_deep_yaml_and_alias_bomb_refused_daemon_serves_on(daemon_factory, client_factory):
    d = daemon_factory()
    c = client_factory(d.prefix)
    good = d.cfg_path.read_text()
    before = _vm_hwm_kib(d.proc.pid)
    d.cfg_path.write_text(good + "x: " + "[" * 2000 + "]" * 2000 + "\n")
    d.proc.send_signal(signal.SIGHUP)
    _wait_log(d, "nested deeper than")
    d.cfg_path.write_text(good + alias_bomb())
    d.proc.send_signal(signal.SIGHUP)
    log = _wait_log(d, "YAML anchors (&a) are not allowed")
    assert "Traceback" not in log and "RecursionError" not in log, log[-3000:]
    grown = (_vm_hwm_kib(d.proc.pid) - before) / 1024
    assert grown < 32, f"the supervisor's peak RSS grew {grown:.0f} MiB refusing two configs"
    c.send((BUNDLED / "digits_sample.png").read_bytes(), "after")
    res = c.wait(["after"], 30)["after"]
    assert res is not None and res["classes"][0]["label"] == "7", res
    assert d.wait_state("online")["state"] == "online"


def test_run_logs_world_readable_password_file_warning_and_serves(tmp_path, daemon_factory, client_factory):
    pw = tmp_path / "mqtt.pw"
    pw.write_text("secret\n")
    pw.chmod(0o644)
    d = daemon_factory({"mqtt": {"username": "edged", "password_file": str(pw)}})  # our broker lets anyone in
    log = _wait_log(d, "mqtt.password_file: ")
    warning = next(ln for ln in log.splitlines() if "mqtt.password_file: " in ln)
    assert "WARNING" in warning and f"{pw} is readable by every user (mode 0644)" in warning, warning
    c = client_factory(d.prefix)
    c.send((BUNDLED / "digits_sample.png").read_bytes(), "pw1")
    assert (c.wait(["pw1"], 30)["pw1"] or {}).get("classes"), d.log()[-2000:]
