"""The config file: frozen dataclasses that validate themselves.

Every section of INTERFACE.md is a dataclass; unknown keys and wrong types are
errors that name the file, the line and the dotted key, all reported at once:
``edged.yaml:12 mqtt.port: must be an integer``. Relative paths are relative
to the config file's folder.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edged.errors import ConfigError

DEFAULT_CONFIG = "/etc/edged/edged.yaml"
BUNDLED_MODEL = Path(__file__).resolve().parent / "models" / "digits.tflite"


def _f(default: Any = dataclasses.MISSING, *, choices: tuple[Any, ...] = (), lo: float | None = None,
       path: bool = False, factory: Any = dataclasses.MISSING) -> Any:
    meta = {"choices": choices, "lo": lo, "path": path}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TlsConfig:
    ca: str | None = _f(None, path=True)
    cert: str | None = _f(None, path=True)
    key: str | None = _f(None, path=True)
    insecure: bool = False


@dataclass(frozen=True)
class ShareConfig:
    group: str = "edged"
    prefix: str = "edged/fleet"


@dataclass(frozen=True)
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = _f(1883, lo=1)
    topic_prefix: str = "edged/{device_id}"
    client_id: str | None = None
    keepalive: int = _f(30, lo=5)
    session_expiry: int = _f(3600, lo=0)
    qos: int = _f(1, choices=(0, 1, 2))
    username: str | None = None
    password_file: str | None = _f(None, path=True)
    tls: TlsConfig | None = None
    share: ShareConfig | None = None
    result_buffer: int = _f(1000, lo=1)
    reconnect_max_s: float = _f(30.0, lo=1)
    response_topics: tuple[str, ...] = ("#",)  # topic filters a frame's Response Topic must match


@dataclass(frozen=True)
class UpdateConfig:
    """model.update: signed model bundles over MQTT (edged.updates)."""

    enabled: bool = False
    public_key: str | None = _f(None, path=True)
    max_mb: float = _f(64.0, lo=0.001)
    keep: int = _f(3, lo=1)
    probation_s: float = _f(300.0, lo=0)


@dataclass(frozen=True)
class ModelConfig:
    path: str = _f(str(BUNDLED_MODEL), path=True)
    labels: str | None = _f(str(BUNDLED_MODEL.with_name("digits_labels.txt")), path=True)
    task: str = _f("classify", choices=("classify", "detect", "raw"))
    threads: int = _f(1, lo=1)
    top_k: int = _f(5, lo=1)
    score_threshold: float = _f(0.5, lo=0)
    mean: float = 127.5
    std: float = _f(127.5, lo=1e-9)
    cpu_fallback: str | None = _f(None, path=True)
    batch_max: int = _f(1, lo=1)  # >1: up to this many waiting frames in one invoke (resizable-batch CPU models)
    batch_wait_ms: float = _f(0.0, lo=0)  # how long a worker waits for a batch to fill (0: only frames already there)
    update: UpdateConfig = _f(factory=UpdateConfig)


@dataclass(frozen=True)
class CoralConfig:
    device: str = "usb"
    devices: tuple[str, ...] = ()  # several Edge TPUs: one worker each (overrides accelerator.workers)
    library: str = "libedgetpu.so.1"
    options: dict[str, str] = _f(factory=dict)


@dataclass(frozen=True)
class GpuConfig:
    precision: str = _f("fp16", choices=("fp16", "fp32"))


@dataclass(frozen=True)
class AccelConfig:
    prefer: tuple[str, ...] = _f(("cpu",), choices=("coral", "gpu", "cpu"))
    workers: int = _f(1, lo=1)
    coral: CoralConfig = _f(factory=CoralConfig)
    gpu: GpuConfig = _f(factory=GpuConfig)


@dataclass(frozen=True)
class SandboxConfig:
    enabled: bool = True
    in_process: bool = False  # debugging only: the worker runs as a thread of the daemon (needs enabled: false)
    mode: str = _f("kill", choices=("kill", "log"))
    memory_limit_mb: int = _f(1024, lo=16)
    frame_timeout_s: float = _f(10.0, lo=0.1)
    heartbeat_s: float = _f(2.0, lo=0.1)
    start_timeout_s: float = _f(120.0, lo=1)  # a worker not ready by then (start, restart, reload) is abandoned
    max_restarts: int = _f(10, lo=1)
    restart_window_s: float = _f(60.0, lo=1)
    backoff_max_s: float = _f(5.0, lo=0)


@dataclass(frozen=True)
class PoolConfig:
    initial_mb: float = _f(1.0, lo=0)
    max_mb: float = _f(256.0, lo=1)
    segment_mb: float = _f(4.0, lo=0.0625)
    idle_release_s: float = _f(10.0, lo=0)
    frag_threshold: float = _f(0.5, lo=0)


@dataclass(frozen=True)
class QueueConfig:
    max_per_stream: int = _f(256, lo=1)
    max_streams: int = _f(256, lo=1)  # streams that may hold queued frames at once
    policy: str = _f("drop_oldest", choices=("drop_oldest", "reject"))
    max_frame_bytes: int = _f(32 << 20, lo=1)
    inflight_per_worker: int = _f(2, lo=1)
    drain_timeout_s: float = _f(10.0, lo=0)


@dataclass(frozen=True)
class StatusConfig:
    socket: str = _f("/run/edged/edged.sock", path=True)
    interval: float = _f(10.0, lo=0)
    prometheus_file: str | None = _f(None, path=True)
    prometheus_port: int | None = _f(None, lo=1)  # an HTTP /metrics listener; off by default
    prometheus_bind: str = "127.0.0.1"


@dataclass(frozen=True)
class HomeAssistantConfig:
    enabled: bool = False
    discovery_prefix: str = "homeassistant"
    streams: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoggingConfig:
    level: str = _f("INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


@dataclass(frozen=True)
class Config:
    device_id: str = ""
    mqtt: MqttConfig = _f(factory=MqttConfig)
    model: ModelConfig = _f(factory=ModelConfig)
    accelerator: AccelConfig = _f(factory=AccelConfig)
    sandbox: SandboxConfig = _f(factory=SandboxConfig)
    pool: PoolConfig = _f(factory=PoolConfig)
    queue: QueueConfig = _f(factory=QueueConfig)
    status: StatusConfig = _f(factory=StatusConfig)
    logging: LoggingConfig = _f(factory=LoggingConfig)
    homeassistant: HomeAssistantConfig = _f(factory=HomeAssistantConfig)
    state_dir: str = _f("/var/lib/edged", path=True)  # the model store, self-test records
    source: str = field(default="", compare=False)

    @property
    def prefix(self) -> str:
        return self.mqtt.topic_prefix.replace("{device_id}", self.device_id).rstrip("/")

    @property
    def client_id(self) -> str:
        return self.mqtt.client_id or f"edged-{self.device_id}"

    @property
    def worker_count(self) -> int:
        """One worker per listed Edge TPU when Coral is preferred, else accelerator.workers."""
        coral = self.accelerator.coral
        if coral.devices and "coral" in self.accelerator.prefer:
            return len(coral.devices)
        return self.accelerator.workers

    def coral_device(self, index: int) -> str | None:
        """The Edge TPU worker `index` opens (None: accelerator.coral.device)."""
        devices = self.accelerator.coral.devices
        return devices[index % len(devices)] if devices else None

    @property
    def model_name(self) -> str:
        name = Path(self.model.path).name
        return name[: -len(".tflite")] if name.endswith(".tflite") else name


def default_path(env: typing.Mapping[str, str]) -> str:
    return env.get("EDGED_CONFIG") or DEFAULT_CONFIG


class _Loader:
    """Turns a YAML node tree into dataclasses, collecting every error."""

    def __init__(self, fname: str, base: Path) -> None:
        self.fname = fname
        self.base = base
        self.errors: list[str] = []

    def err(self, node: yaml.Node | None, key: str, msg: str) -> None:
        line = f":{node.start_mark.line + 1}" if node is not None else ""
        shown = key if key.isprintable() else repr(key)
        self.errors.append(" ".join(f"{self.fname}{line} {shown}: {msg}".split()))

    def build(self, cls: type, node: yaml.Node | None, key: str) -> Any:
        if node is None or (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")):
            return cls()
        if not isinstance(node, yaml.MappingNode):
            self.err(node, key or "(top level)", "must be a mapping")
            return cls()
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
        values: dict[str, Any] = {}
        for knode, vnode in node.value:
            name = str(knode.value)
            dotted = f"{key}.{name}" if key else name
            if name not in fields:
                self.err(knode, dotted, f"unknown key (known: {', '.join(fields)})")
                continue
            values[name] = self.value(hints[name], fields[name], vnode, dotted)
        try:
            return cls(**{k: v for k, v in values.items() if v is not _BAD})
        except TypeError as exc:  # pragma: no cover - fields are all defaulted
            self.err(node, key, str(exc))
            return cls()

    def value(self, hint: Any, f: dataclasses.Field, node: yaml.Node, key: str) -> Any:
        optional = False
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            optional, hint = True, args[0]
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
            if optional:
                return None
            if dataclasses.is_dataclass(hint):
                return hint()  # a section whose keys are all commented out: its defaults
            self.err(node, key, "must not be empty")
            return _BAD
        if dataclasses.is_dataclass(hint):
            return self.build(hint, node, key)
        meta = {"choices": (), "lo": None, "path": False, **f.metadata}
        origin = typing.get_origin(hint)
        if origin is tuple:
            if not isinstance(node, yaml.SequenceNode):
                self.err(node, key, "must be a list")
                return _BAD
            items = [self.scalar(str, meta, n, f"{key}[{i}]") for i, n in enumerate(node.value)]
            return _BAD if _BAD in items else tuple(items)
        if origin is dict:
            if not isinstance(node, yaml.MappingNode):
                self.err(node, key, "must be a mapping")
                return _BAD
            return {str(k.value): str(v.value) for k, v in node.value}
        return self.scalar(hint, meta, node, key)

    def scalar(self, hint: type, meta: typing.Mapping[str, Any], node: yaml.Node, key: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            self.err(node, key, f"must be {_NAMES[hint]}")
            return _BAD
        try:
            raw = yaml.constructor.SafeConstructor().construct_object(node)
        except (yaml.YAMLError, ValueError, TypeError, KeyError, AttributeError):
            self.err(node, key, f"cannot read {node.value!r} (tag {node.tag})")
            return _BAD
        if hint is float and isinstance(raw, int) and not isinstance(raw, bool):
            raw = float(raw)
        if hint is str and isinstance(raw, (int, float)) and not isinstance(raw, bool) and not meta["choices"]:
            raw = str(node.value)
        if not isinstance(raw, hint) or (hint is int and isinstance(raw, bool)):
            self.err(node, key, f"must be {_NAMES[hint]}, got {node.value!r}")
            return _BAD
        if meta["choices"] and raw not in meta["choices"]:
            self.err(node, key, f"must be one of {', '.join(map(str, meta['choices']))}, got {raw!r}")
            return _BAD
        if meta["lo"] is not None and raw < meta["lo"]:
            self.err(node, key, f"must be >= {meta['lo']}, got {raw!r}")
            return _BAD
        if meta["path"] and raw:
            try:
                raw = str((self.base / os.path.expanduser(raw)).resolve())
            except (ValueError, OSError) as exc:
                self.err(node, key, f"not a usable path ({exc})")
                return _BAD
        return raw


_BAD = object()
_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def parse(text: str, fname: str = "<config>", base: Path | None = None) -> Config:
    """Parse and validate config text; raise ConfigError listing every problem."""
    short = Path(fname).name
    try:
        node = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(f"{short}{where}: not valid YAML: {problem}") from None
    loader = _Loader(short, base or Path.cwd())
    cfg = loader.build(Config, node, "")
    if loader.errors:
        raise ConfigError("; ".join(loader.errors))
    if not cfg.device_id:
        cfg = dataclasses.replace(cfg, device_id=socket.gethostname().split(".")[0] or "edged")
    if "{device_id}" not in cfg.mqtt.topic_prefix and not cfg.mqtt.topic_prefix.strip("/"):
        raise ConfigError(f"{short} mqtt.topic_prefix: must not be empty")
    for i, filt in enumerate(cfg.mqtt.response_topics):
        if not _valid_filter(filt):
            raise ConfigError(f"{short} mqtt.response_topics[{i}]: {filt!r} is not an MQTT topic filter")
    if cfg.mqtt.tls is not None and bool(cfg.mqtt.tls.cert) != bool(cfg.mqtt.tls.key):
        raise ConfigError(f"{short} mqtt.tls: cert and key go together")
    if cfg.sandbox.in_process and cfg.sandbox.enabled:
        raise ConfigError(f"{short} sandbox.in_process: needs sandbox.enabled: false (the daemon itself cannot be "
                          "filtered)")
    if cfg.model.update.enabled and not cfg.model.update.public_key:
        raise ConfigError(f"{short} model.update.public_key: required when model.update.enabled is true")
    if cfg.model.task != "raw" and cfg.model.task == "detect" and cfg.model.score_threshold > 1:
        raise ConfigError(f"{short} model.score_threshold: must be <= 1")
    _check_homeassistant(cfg, short)
    return dataclasses.replace(cfg, source=str(fname))


def _valid_filter(filt: str) -> bool:
    """An MQTT topic filter: `+` alone in its level, `#` alone and last."""
    if not filt or "\0" in filt:
        return False
    levels = filt.split("/")
    for i, level in enumerate(levels):
        if ("+" in level and level != "+") or ("#" in level and (level != "#" or i != len(levels) - 1)):
            return False
    return True


def _topic_problem(topic: str, *, level: bool = False) -> str | None:
    """Why `topic` cannot be a topic name edged publishes to (level: a single topic level), or None."""
    if not topic:
        return "must not be empty"
    if len(topic.encode()) > (128 if level else 1024):
        return f"is longer than {128 if level else 1024} bytes"
    if any(c in topic for c in "+#\0") or not topic.isprintable():
        return "must not contain +, #, NUL or control characters"
    if level and "/" in topic:
        return "must not contain /"
    if not level and (topic.startswith("/") or topic.endswith("/") or "//" in topic):
        return "must not start or end with / or have an empty level"
    return None


def _check_homeassistant(cfg: Config, short: str) -> None:
    ha = cfg.homeassistant
    why = _topic_problem(ha.discovery_prefix)
    if why:
        raise ConfigError(f"{short} homeassistant.discovery_prefix: {why}")
    ours = [cfg.prefix] + ([cfg.mqtt.share.prefix.rstrip("/")] if cfg.mqtt.share is not None else [])
    for p in ours:
        d = ha.discovery_prefix
        if d == p or d.startswith(p + "/") or p.startswith(d + "/"):
            raise ConfigError(f"{short} homeassistant.discovery_prefix: {d!r} overlaps edged's own topics ({p}/...)")
    for i, s in enumerate(ha.streams):
        why = _topic_problem(s, level=True)
        if why:
            raise ConfigError(f"{short} homeassistant.streams[{i}]: {why}")
    if len(set(ha.streams)) != len(ha.streams):
        raise ConfigError(f"{short} homeassistant.streams: a stream is listed twice")
    if len(ha.streams) > 64:
        raise ConfigError(f"{short} homeassistant.streams: at most 64 streams")


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start})") from None
    return parse(text, str(p), p.resolve().parent)
