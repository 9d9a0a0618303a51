"""Unit tests of edged.config, plus `edged check/--version/status` run as real subprocesses.

The loader must turn every user mistake into one ConfigError line that names the file, the
line and the dotted key; the CLI turns that into exit 78 and one line on stderr.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings

from conftest import BUNDLED, ROOT
from edged import __version__, config
from edged.errors import ConfigError

SHIPPED = ROOT / "configs" / "edged.yaml"


def parse(text: str, tmp: Path | None = None) -> config.Config:
    base = tmp or Path("/srv/edged")
    return config.parse(text, str(base / "edged.yaml"), base)


def config_error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return str(info.value)


# -- errors: every one at once, file:line and dotted key, one line ---------------------------

def test_parse_several_mistakes_reports_every_error_with_line_and_key():
    text = (
        "bogus: 1\n"                      # 1 unknown top-level key
        "mqtt:\n"
        "  colour: blue\n"                # 3 unknown nested key
        "  port: abc\n"                   # 4 wrong type
        "  qos: 5\n"                      # 5 bad choice
        "  keepalive: 1\n"                # 6 below minimum
        "accelerator:\n"
        "  prefer: [coral, tpu]\n"        # 8 bad choice in a list
        "  coral:\n"
        "    speed: max\n"                # 10 unknown key three levels down
        "sandbox:\n"
        "  memory_limit_mb: 8\n"          # 12 below minimum
        "logging:\n"
        "  level: verbose\n"              # 14 bad choice
    )
    msg = config_error(text)
    expected = ["edged.yaml:1 bogus:", "edged.yaml:3 mqtt.colour:", "edged.yaml:4 mqtt.port:",
                "edged.yaml:5 mqtt.qos:", "edged.yaml:6 mqtt.keepalive:", "edged.yaml:8 accelerator.prefer[1]:",
                "edged.yaml:10 accelerator.coral.speed:", "edged.yaml:12 sandbox.memory_limit_mb:",
                "edged.yaml:14 logging.level:"]
    for fragment in expected:
        assert fragment in msg, (fragment, msg)
    assert "\n" not in msg


@pytest.mark.parametrize("text, fragment, expect", [
    ("colour: blue\n", "edged.yaml:1 colour:", "unknown key"),
    ("model:\n  path: m.tflite\n  lables: l.txt\n", "edged.yaml:3 model.lables:", "unknown key"),
    ("mqtt:\n  port: '1883x'\n", "edged.yaml:2 mqtt.port:", "must be an integer"),
    ("mqtt:\n  port: true\n", "edged.yaml:2 mqtt.port:", "must be an integer"),
    ("model:\n  threads: 2.5\n", "edged.yaml:2 model.threads:", "must be an integer"),
    ("sandbox:\n  enabled: 'yes please'\n", "edged.yaml:2 sandbox.enabled:", "must be true or false"),
    ("mqtt:\n  host: [a, b]\n", "edged.yaml:2 mqtt.host:", "must be a string"),
    ("mqtt: 3\n", "edged.yaml:1 mqtt:", "must be a mapping"),
    ("accelerator:\n  prefer: cpu\n", "edged.yaml:2 accelerator.prefer:", "must be a list"),
    ("model:\n  task: segment\n", "edged.yaml:2 model.task:", "must be one of classify, detect, raw"),
    ("mqtt:\n  qos: 3\n", "edged.yaml:2 mqtt.qos:", "must be one of 0, 1, 2"),
    ("queue:\n  policy: lifo\n", "edged.yaml:2 queue.policy:", "must be one of drop_oldest, reject"),
    ("model:\n  top_k: 0\n", "edged.yaml:2 model.top_k:", "must be >= 1"),
    ("pool:\n  max_mb: -4\n", "edged.yaml:2 pool.max_mb:", "must be >= 1"),
    ("mqtt:\n  port: null\n", "edged.yaml:2 mqtt.port:", "must not be empty"),
    ("- a\n- b\n", "edged.yaml:1 (top level):", "must be a mapping"),
])
def test_parse_single_mistake_names_line_key_and_expectation(text, fragment, expect):
    msg = config_error(text)
    assert msg.startswith(fragment), msg
    assert expect in msg and "\n" not in msg


def test_parse_cross_field_mistakes_name_the_key():
    assert "mqtt.tls" in config_error("mqtt:\n  tls: {cert: c.pem}\n")
    assert "mqtt.topic_prefix" in config_error("mqtt:\n  topic_prefix: '/'\n")
    assert "model.score_threshold" in config_error("model:\n  task: detect\n  score_threshold: 2\n")


@pytest.mark.parametrize("text", [
    "mqtt:\n  host: [a, b\n  port: 1\n",
    "mqtt:\n  host: 'unterminated\n",
    "model:\n  path: x\n labels: y\n",
    "a: 1\n---\nb: 2\n",
])
def test_parse_yaml_syntax_error_reports_file_and_line(text):
    msg = config_error(text)
    assert re.match(r"edged\.yaml:\d+: not valid YAML: \S", msg), msg
    assert "\n" not in msg


def test_load_missing_file_raises_configerror_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="nothere.yaml"):
        config.load(tmp_path / "nothere.yaml")


# -- bugs: user mistakes that escape as other exceptions (tracebacks in `edged check`) -------------

TAG_BUGS = "_Loader.scalar calls SafeConstructor.construct_object unguarded: explicit tags and " \
           "impossible dates raise ConstructorError/ValueError/KeyError/AttributeError, not ConfigError"


@pytest.mark.parametrize("text, key", [
    ("device_id: 2024-13-45\n", "device_id"),          # looks like a date: ValueError: month must be in 1..12
    ("mqtt:\n  port: !foo 3\n", "mqtt.port"),           # unknown tag: ConstructorError
    ("mqtt:\n  port: !!binary xyz\n", "mqtt.port"),     # bad base64: ConstructorError
    ("mqtt:\n  port: !!int x\n", "mqtt.port"),          # ValueError
    ("mqtt:\n  host: !!bool maybe\n", "mqtt.host"),     # KeyError
    ("mqtt:\n  host: !!timestamp x\n", "mqtt.host"),    # AttributeError
])
def test_parse_bad_tagged_or_date_scalar_raises_configerror(text, key):
    msg = config_error(text)
    assert f"edged.yaml:{text.count(chr(10))} {key}:" in msg


def test_parse_nul_byte_in_path_raises_configerror():
    assert "model.path" in config_error('model:\n  path: "a\\0b.tflite"\n')


def test_load_non_utf8_file_raises_configerror(tmp_path):
    p = tmp_path / "edged.yaml"
    p.write_bytes(b"device_id: caf\xe9\n")
    with pytest.raises(ConfigError, match="edged.yaml"):
        config.load(p)


@pytest.mark.parametrize("text", ["device_id: a\x07b\n", '"foo\\nbar": 1\n'])
def test_parse_control_characters_error_stays_one_line(text):
    msg = config_error(text)
    assert msg.startswith("edged.yaml") and "\n" not in msg


# -- values ---------------------------------------------------------------------------------------

def test_load_relative_paths_resolve_against_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "etc" / "edged"
    folder.mkdir(parents=True)
    cfg_path = folder / "edged.yaml"
    cfg_path.write_text(
        "model:\n"
        "  path: models/m.tflite\n"
        "  labels: ../labels.txt\n"
        "  cpu_fallback: /abs/cpu.tflite\n"
        "mqtt:\n"
        "  password_file: secret\n"
        "  tls: {ca: ca.crt, cert: c.crt, key: c.key}\n"
        "status:\n"
        "  socket: run/edged.sock\n"
        "  prometheus_file: ./edged.prom\n"
    )
    monkeypatch.chdir(tmp_path)  # somewhere else: the working directory must not matter
    cfg = config.load("etc/edged/edged.yaml")
    folder = folder.resolve()
    assert cfg.model.path == str(folder / "models" / "m.tflite")
    assert cfg.model.labels == str(folder.parent / "labels.txt")
    assert cfg.model.cpu_fallback == "/abs/cpu.tflite"
    assert cfg.mqtt.password_file == str(folder / "secret")
    assert cfg.mqtt.tls is not None
    assert (cfg.mqtt.tls.ca, cfg.mqtt.tls.cert, cfg.mqtt.tls.key) == \
        (str(folder / "ca.crt"), str(folder / "c.crt"), str(folder / "c.key"))
    assert cfg.status.socket == str(folder / "run" / "edged.sock")
    assert cfg.status.prometheus_file == str(folder / "edged.prom")
    assert cfg.source == "etc/edged/edged.yaml"


def test_parse_null_optional_keys_give_none():
    cfg = parse(
        "model:\n  labels: null\n  cpu_fallback: ~\n"
        "mqtt:\n  tls: null\n  share: null\n  username: null\n  client_id:\n  password_file: null\n"
        "status:\n  prometheus_file: null\n"
    )
    assert cfg.model.labels is None and cfg.model.cpu_fallback is None
    assert cfg.mqtt.tls is None and cfg.mqtt.share is None and cfg.mqtt.username is None
    assert cfg.mqtt.client_id is None and cfg.mqtt.password_file is None
    assert cfg.status.prometheus_file is None
    assert cfg.client_id == f"edged-{cfg.device_id}"


def test_parse_null_section_gives_section_defaults():
    cfg = parse("mqtt: null\nsandbox:\naccelerator:\n  coral:\n")
    assert cfg.mqtt == config.MqttConfig() and cfg.sandbox == config.SandboxConfig()
    assert cfg.accelerator.coral == config.CoralConfig()


def test_parse_empty_text_gives_defaults_with_hostname_device_id():
    cfg = parse("")
    assert cfg.device_id and "." not in cfg.device_id
    assert cfg.accelerator.prefer == ("cpu",) and cfg.model.task == "classify"


def test_parse_typed_values_are_converted():
    cfg = parse(
        "device_id: 42\n"                          # a number where a string goes: kept as written
        "mqtt:\n  port: 8883\n  reconnect_max_s: 5\n  share: {group: g1, prefix: fleet}\n"
        "model:\n  score_threshold: 1\n  mean: 0\n"
        "accelerator:\n  prefer: [coral, gpu, cpu]\n  coral:\n    options: {usb_max_bulk_in_queue_length: 32}\n"
    )
    assert cfg.device_id == "42"
    assert cfg.mqtt.port == 8883 and cfg.mqtt.reconnect_max_s == 5.0 and isinstance(cfg.mqtt.reconnect_max_s, float)
    assert cfg.mqtt.share == config.ShareConfig(group="g1", prefix="fleet")
    assert cfg.model.score_threshold == 1.0 and cfg.model.mean == 0.0
    assert cfg.accelerator.prefer == ("coral", "gpu", "cpu")
    assert cfg.accelerator.coral.options == {"usb_max_bulk_in_queue_length": "32"}


@pytest.mark.parametrize("prefix, device_id, expected", [
    ("edged/{device_id}", "cam-7", "edged/cam-7"),
    ("site/{device_id}/x/", "cam-7", "site/cam-7/x"),
    ("fixed/topic", "cam-7", "fixed/topic"),
    ("{device_id}", "pi4", "pi4"),
])
def test_config_prefix_substitutes_device_id(prefix, device_id, expected):
    cfg = parse(f"device_id: {device_id}\nmqtt:\n  topic_prefix: '{prefix}'\n")
    assert cfg.prefix == expected


def test_config_prefix_default_uses_device_id():
    assert parse("device_id: dev1\n").prefix == "edged/dev1"


def test_parse_without_model_path_defaults_to_bundled_model():
    cfg = parse("device_id: dev1\n")
    assert Path(cfg.model.path).is_file(), cfg.model.path
    assert Path(cfg.model.path).resolve() == (BUNDLED / "digits.tflite").resolve()


def test_load_shipped_config_loads_and_its_model_exists():
    cfg = config.load(SHIPPED)
    assert Path(cfg.model.path).is_file(), cfg.model.path
    assert Path(cfg.model.path).resolve() == (BUNDLED / "digits.tflite").resolve()
    assert cfg.model.labels is not None and Path(cfg.model.labels).is_file()
    assert cfg.model_name == "digits"
    assert cfg.prefix == "edged/edged-dev"


# -- fuzz -----------------------------------------------------------------------------------------

def _schema_keys() -> tuple[list[str], list[str]]:
    top = [f.name for f in dataclasses.fields(config.Config) if f.name != "source"]
    nested: set[str] = set()
    for cls in (config.MqttConfig, config.ModelConfig, config.AccelConfig, config.SandboxConfig,
                config.PoolConfig, config.QueueConfig, config.StatusConfig, config.LoggingConfig,
                config.TlsConfig, config.ShareConfig, config.CoralConfig):
        nested.update(f.name for f in dataclasses.fields(cls))
    return top, sorted(nested)


TOP_KEYS, NESTED_KEYS = _schema_keys()
ODD_SCALARS = ["1", "-3", "0x1f", "1e3", ".nan", "-.inf", "true", "no", "null", "~", "''", '"a\\tb"', "[1, 2]",
               "{a: b}", "[]", "{}", "2001-01-01", "2024-13-45", "12:30:00", "!!str 5", "!!int x", "!!float y",
               "!foo 3", "!!binary aGk=", "&a x", "*a", "*nope", "|", ">-", "- x", "? x", "'", "\"", "#c", "%", "@",
               "`", "\t", "<<: *a", "!!python/object:os.system ls", "!!set {a}", "!!omap [a: 1]"]
yaml_ish_line = st.builds(
    lambda indent, key, sep, value: " " * indent + key + sep + value,
    st.sampled_from([0, 0, 2, 2, 4, 1, 3]),
    st.one_of(st.sampled_from(TOP_KEYS), st.sampled_from(NESTED_KEYS), st.sampled_from(["- ", "? ", "x", ""])),
    st.sampled_from([": ", ": ", ":", " : ", ":\n", ""]),
    st.one_of(st.sampled_from(ODD_SCALARS), st.text(max_size=8)),
)
yaml_ish_text = st.one_of(st.text(max_size=200), st.lists(yaml_ish_line, max_size=14).map("\n".join))


def _parse_or_configerror(text: str) -> None:
    try:
        parse(text)
    except ConfigError as exc:
        msg = str(exc)
        assert msg.strip() and "\n" not in msg, msg


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@example("device_id: 2024-13-45\n")
@example("mqtt:\n  port: !foo 3\n")
@given(yaml_ish_text)
def test_parse_fuzzed_yaml_text_raises_only_configerror(text):
    _parse_or_configerror(text)


# Printable text only: control characters, NUL and line separators have their own tests above.
printable = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=12)
leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(), printable)
value = st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                    st.dictionaries(st.one_of(st.sampled_from(NESTED_KEYS), printable),
                                                                    inner, max_size=4)), max_leaves=12)
section = st.one_of(leaf, st.dictionaries(st.one_of(st.sampled_from(NESTED_KEYS), printable), value, max_size=6))
config_dict = st.dictionaries(st.one_of(st.sampled_from(TOP_KEYS), printable), section, max_size=6)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(config_dict)
def test_parse_fuzzed_dict_dumped_to_yaml_raises_only_configerror(d: dict[str, Any]):
    _parse_or_configerror(yaml.safe_dump(d))


# -- `edged` as a subprocess ----------------------------------------------------------------------

def run_edged(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("EDGED_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "edged", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=str(ROOT))


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def _write_corrupt_model(path: Path) -> None:
    rng = np.random.default_rng(1234)
    path.write_bytes(rng.bytes(4) + b"TFL3" + rng.bytes(4096))  # the flatbuffer identifier, then noise


@pytest.mark.parametrize("case", ["unknown_key", "wrong_type", "missing_model", "corrupt_model"])
def test_cli_check_bad_config_or_model_exits_78_with_one_line(tmp_path, case):
    model = BUNDLED / "digits.tflite"
    body = {
        "unknown_key": f"model:\n  path: {model}\n  colour: red\n",
        "wrong_type": f"model:\n  path: {model}\n  threads: many\n",
        "missing_model": "model:\n  path: models/nothere.tflite\n",
        "corrupt_model": "model:\n  path: corrupt.tflite\n",
    }[case]
    _write_corrupt_model(tmp_path / "corrupt.tflite")
    cfg = tmp_path / "edged.yaml"
    cfg.write_text(body + "accelerator:\n  prefer: [cpu]\n")
    line = assert_one_line_error(run_edged("check", "-c", str(cfg)), 78)
    expect = {"unknown_key": "edged.yaml:3 model.colour", "wrong_type": "edged.yaml:3 model.threads",
              "missing_model": str(tmp_path.resolve() / "models" / "nothere.tflite"),
              "corrupt_model": "corrupt.tflite"}[case]
    assert expect in line, line
    assert line.startswith("edged check: ")


def test_cli_check_date_like_device_id_exits_78_with_one_line(tmp_path):
    cfg = tmp_path / "edged.yaml"
    cfg.write_text(f"device_id: 2024-13-45\nmodel:\n  path: {BUNDLED / 'digits.tflite'}\n")
    assert "device_id" in assert_one_line_error(run_edged("check", "-c", str(cfg)), 78)


def test_cli_check_shipped_config_exits_0_and_prints_accelerator():
    proc = run_edged("check", "-c", str(SHIPPED))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    accel = [ln for ln in proc.stdout.splitlines() if ln.startswith("accelerator")]
    assert len(accel) == 1 and accel[0].split()[1] == "cpu", proc.stdout
    assert "digits.tflite" in proc.stdout and "[1, 8, 8, 1] uint8" in proc.stdout


def test_cli_version_prints_version():
    proc = run_edged("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"edged {__version__}"


def test_cli_status_no_daemon_exits_69_with_one_line():
    line = assert_one_line_error(run_edged("status", "--socket", "/nonexistent"), 69)
    assert "/nonexistent" in line


@pytest.mark.parametrize("path", sorted((ROOT / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_load_every_shipped_config_is_valid(path):
    cfg = config.load(path)
    assert cfg.accelerator.prefer and cfg.model.task in ("classify", "detect", "raw")


def test_share_receive_maximum_defaults_to_two_frames_per_worker_and_is_checked(tmp_path):
    from edged.fleet import receive_maximum

    cfg = parse("mqtt:\n  share: {group: g1, prefix: fleet}\naccelerator:\n  workers: 3\n")
    assert cfg.mqtt.keepalive == 10 and cfg.mqtt.share.receive_maximum is None
    assert receive_maximum(cfg) == 3 * cfg.queue.inflight_per_worker == 6
    cfg = parse("mqtt:\n  share: {group: g1, prefix: fleet, receive_maximum: 4}\n")
    assert receive_maximum(cfg) == 4
    with pytest.raises(ConfigError, match=r"mqtt.share.receive_maximum: must be >= 1"):
        parse("mqtt:\n  share: {group: g1, prefix: fleet, receive_maximum: 0}\n")
    with pytest.raises(ConfigError, match=r"mqtt.share.window"):
        parse("mqtt:\n  share: {group: g1, prefix: fleet, window: 4}\n")
