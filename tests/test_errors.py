"""One exception tree: every exception class the package defines is an EdgedError, and public functions
translate the errors of the libraries below them (httpx's mapping test is the model)."""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import edged
from edged import config, errors
from edged.errors import ConfigError, EdgedError, UnavailableError


def _modules() -> list[str]:
    return [f"edged.{m.name}" for m in pkgutil.iter_modules(edged.__path__) if m.name not in ("__main__",)]


def test_every_exception_class_in_the_package_is_under_edgederror() -> None:
    outside = []
    for name in _modules():
        mod = importlib.import_module(name)
        for _n, obj in inspect.getmembers(mod, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == name and not issubclass(obj, EdgedError):
                outside.append(f"{name}.{obj.__name__}")
    assert not outside, outside


def test_errors_docstring_draws_every_class() -> None:
    doc = errors.__doc__ or ""
    for _n, obj in inspect.getmembers(errors, inspect.isclass):
        if issubclass(obj, EdgedError):
            assert obj.__name__ in doc, obj


@pytest.mark.parametrize("text", ["mqtt: [", "mqtt: {port: x}", "- a\n- b", "\x00", "a: &x [*x]"])
def test_config_parse_user_mistakes_raise_configerror_only(text: str) -> None:
    with pytest.raises(ConfigError):
        config.parse(text)


def test_config_load_unreadable_file_is_configerror(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        config.load(tmp_path / "missing.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError):
        config.load(tmp_path / "bin.yaml")


def test_send_frame_without_broker_is_unavailable(tmp_path: Path) -> None:
    from edged.send import send_frame

    cfg = config.parse("mqtt: {host: 127.0.0.1, port: 9}\n", str(tmp_path / "c.yaml"), tmp_path)
    with pytest.raises(UnavailableError):
        send_frame(cfg, b"x", timeout=2)


def test_send_frame_tls_with_missing_ca_is_configerror(tmp_path: Path) -> None:
    from edged.send import send_frame

    cfg = config.parse("mqtt: {port: 9, tls: {ca: nowhere.pem}}\n", str(tmp_path / "c.yaml"), tmp_path)
    with pytest.raises(ConfigError, match="mqtt.tls"):
        send_frame(cfg, b"x", timeout=2)


def test_send_frame_unreadable_password_file_is_configerror(tmp_path: Path) -> None:
    from edged.send import send_frame

    cfg = config.parse("mqtt: {port: 9, username: u, password_file: nope}\n", str(tmp_path / "c.yaml"), tmp_path)
    with pytest.raises(ConfigError, match="password_file"):
        send_frame(cfg, b"x", timeout=2)


def test_mqtt_publish_translates_paho_refusals(tmp_path: Path) -> None:
    from edged.errors import MqttError
    from edged.ioloop import IoLoop
    from edged.mqtt import MqttLink

    cfg = config.parse("mqtt: {port: 9}\n", str(tmp_path / "c.yaml"), tmp_path)
    link = MqttLink(cfg, lambda inc: None, loop=IoLoop())
    with pytest.raises(MqttError):
        link.publish("a/+/b", b"x")
    with pytest.raises(MqttError):
        link.publish("t" * 70000, b"x")
