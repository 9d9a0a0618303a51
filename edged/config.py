"""The config file: frozen dataclasses that validate themselves.

Every section of INTERFACE.md is a dataclass; unknown keys and wrong types are
errors that name the file, the line and the dotted key, all reported at once:
``edged.yaml:12 mqtt.port: must be an integer``. Relative paths are relative
to the config file's folder.

The file is hostile input like any other: it is read up to 1 MiB, YAML
anchors and aliases are refused (an alias bomb of 1 KiB expands to GiBs),
nesting deeper than 32 levels and more than 20,000 nodes are refused, all
before any of it is turned into values (edged.configyaml, which also turns
the node tree into these dataclasses). Checks across keys and against this
host (topics, users, the status socket, secrets' modes) are in
edged.configchecks; warnings go into ``Config.warnings``, for the CLI to print.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edged import configchecks, topics, userfiles
from edged.configyaml import BoundedLoader, Loader, Refused
from edged.errors import ConfigError

DEFAULT_CONFIG = "/etc/edged/edged.yaml"
BUNDLED_MODEL = Path(__file__).resolve().parent / "models" / "digits.tflite"




def _f(default: Any = dataclasses.MISSING, *, choices: tuple[Any, ...] = (), lo: float | None = None,
       hi: float | None = None, path: bool = False, regular: bool = False, factory: Any = dataclasses.MISSING) -> Any:
    # regular: a file the daemon reads or replaces; naming an existing non-regular file is an error
    # hi: the largest value (default _HI: what deque sizes, sleeps and mmap lengths take without overflowing)
    meta = {"choices": choices, "lo": lo, "hi": hi, "path": path or regular, "regular": regular}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TlsConfig:
    ca: str | None = _f(None, regular=True)
    cert: str | None = _f(None, regular=True)
    key: str | None = _f(None, regular=True)
    insecure: bool = False


@dataclass(frozen=True)
class ShareConfig:
    group: str = "edged"
    prefix: str = "edged/fleet"
    # frames of the group in flight to this member (its own connection's Receive Maximum): also the most a
    # member can take with it when it dies. null: two per worker (queue.inflight_per_worker x workers)
    receive_maximum: int | None = _f(None, lo=1)


@dataclass(frozen=True)
class MqttConfig:
    host: str = "127.0.0.1"
    port: int = _f(1883, lo=1, hi=65535)
    topic_prefix: str = "edged/{device_id}"
    client_id: str | None = None
    keepalive: int = _f(10, lo=5, hi=65535)  # MQTT: two bytes; a fleet member cut off without a TCP close is
    # noticed after about 1.5x this
    session_expiry: int = _f(3600, lo=0, hi=0xFFFFFFFF)  # MQTT: four bytes
    qos: int = _f(1, choices=(0, 1, 2))
    username: str | None = None
    password_file: str | None = _f(None, regular=True)
    tls: TlsConfig | None = None
    share: ShareConfig | None = None
    result_buffer: int = _f(1000, lo=1)
    reconnect_max_s: float = _f(30.0, lo=1)
    response_topics: tuple[str, ...] = ("#",)  # topic filters a frame's Response Topic must match


@dataclass(frozen=True)
class UpdateConfig:
    """model.update: signed model bundles over MQTT (edged.updates)."""

    enabled: bool = False
    public_key: str | None = _f(None, regular=True)
    max_mb: float = _f(64.0, lo=0.001)
    keep: int = _f(3, lo=1)
    probation_s: float = _f(300.0, lo=0)


@dataclass(frozen=True)
class SelftestConfig:
    """The known-answer self-test (edged.selftest): its frames, its expected outputs, the tolerance."""

    frames: tuple[str, ...] = _f((), path=True)  # files (images or raw tensors); empty: one built from the input
    expect: str | None = _f(None, path=True)  # a JSON file of expected outputs; null: recorded from the CPU
    # quantization steps (float outputs: steps of 1e-3 of the output's range). null: per kind, see tolerance_for
    tolerance: float | None = _f(None, lo=0)
    interval_s: float = _f(600.0, lo=0)  # serving workers run it again this often, between frames (0: never)

    def tolerance_for(self, kind: str) -> float:
        """The tolerance for a worker on `kind`: the configured one, else 2 steps on the CPU (against its own
        record) and 16 on an accelerator (another implementation against the CPU's record: LiteRT's own CPU
        kernel sets differ by up to 12 steps on MobileNet v2, a GPU's fp16 path by 3 on the built frame)."""
        if self.tolerance is not None:
            return self.tolerance
        return 2.0 if kind == "cpu" else 16.0


@dataclass(frozen=True)
class ModelConfig:
    path: str = _f(str(BUNDLED_MODEL), regular=True)
    labels: str | None = _f(str(BUNDLED_MODEL.with_name("digits_labels.txt")), regular=True)
    task: str = _f("classify", choices=("classify", "detect", "raw"))
    threads: int = _f(1, lo=1)
    top_k: int = _f(5, lo=1)
    score_threshold: float = _f(0.5, lo=0)
    mean: float = 127.5
    std: float = _f(127.5, lo=1e-9)
    cpu_fallback: str | None = _f(None, regular=True)
    batch_max: int = _f(1, lo=1)  # >1: up to this many waiting frames in one invoke (resizable-batch CPU models)
    batch_wait_ms: float = _f(0.0, lo=0)  # how long a worker waits for a batch to fill (0: only frames already there)
    update: UpdateConfig = _f(factory=UpdateConfig)
    selftest: SelftestConfig = _f(factory=SelftestConfig)


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
class DelegateConfig:
    """A named TFLite external delegate (accelerator.delegates.NAME), usable in accelerator.prefer."""

    library: str = ""
    options: dict[str, str] = _f(factory=dict)


@dataclass(frozen=True)
class HealthConfig:
    failures: int = _f(3, lo=1)  # failures of one accelerator within window_s before it is set aside
    window_s: float = _f(300.0, lo=1)
    probe_s: float = _f(60.0, lo=0.1)  # first probe of a set-aside accelerator; doubles up to probe_max_s
    probe_max_s: float = _f(3600.0, lo=0.1)


BUILTIN_KINDS = ("coral", "gpu", "cpu")


@dataclass(frozen=True)
class AccelConfig:
    prefer: tuple[str, ...] = ("cpu",)  # coral, gpu, cpu or a name of accelerator.delegates (checked in parse)
    workers: int = _f(1, lo=1)
    coral: CoralConfig = _f(factory=CoralConfig)
    gpu: GpuConfig = _f(factory=GpuConfig)
    delegates: dict[str, DelegateConfig] = _f(factory=dict)
    health: HealthConfig = _f(factory=HealthConfig)


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
    user: str | None = None  # a daemon started as root runs its workers as this user (None: nobody)


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
    max_frame_bytes: int = _f(32 << 20, lo=1, hi=268435455)  # MQTT's largest packet
    inflight_per_worker: int = _f(2, lo=1)
    drain_timeout_s: float = _f(10.0, lo=0)


@dataclass(frozen=True)
class StatusConfig:
    socket: str = _f("/run/edged/edged.sock", path=True)
    interval: float = _f(10.0, lo=0)
    prometheus_file: str | None = _f(None, regular=True)
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
    state_dir: str = _f("/var/lib/edged", path=True)  # what edged keeps across restarts (self-test records)
    source: str = field(default="", compare=False, metadata={"internal": True})
    warnings: tuple[str, ...] = field(default=(), compare=False, metadata={"internal": True})

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
        return name.removesuffix(".tflite")


def default_path(env: typing.Mapping[str, str]) -> str:
    return env.get("EDGED_CONFIG") or DEFAULT_CONFIG


def parse(text: str, fname: str = "<config>", base: Path | None = None) -> Config:
    """Parse and validate config text; raise ConfigError listing every problem."""
    short = Path(fname).name
    if len(text) > userfiles.CONFIG_MAX_BYTES:
        raise ConfigError(f"{short}: {len(text)} characters, more than the {userfiles.CONFIG_MAX_BYTES} allowed")
    composer: BoundedLoader | None = None
    try:
        composer = BoundedLoader(text)  # the reader checks the characters here
        node = composer.get_single_node()
    except Refused as exc:
        raise ConfigError(f"{short}:{exc.problem_mark.line + 1}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(exc, "problem", None) or exc).split())
        raise ConfigError(f"{short}{where}: not valid YAML: {problem}") from None
    finally:
        if composer is not None:
            composer.dispose()
    loader = Loader(short, base or Path.cwd(), BUILTIN_KINDS)
    cfg = loader.build(Config, node, "")  # a value in error is left at its default: the checks below still run
    if not cfg.device_id:
        cfg = dataclasses.replace(cfg, device_id=socket.gethostname().split(".")[0] or "edged")
    configchecks.check(cfg, loader)
    for i, filt in enumerate(cfg.mqtt.response_topics):
        why = topics.filter_problem(filt)
        if why:
            loader.errors.append(f"{short} mqtt.response_topics[{i}]: {filt[:64]!r} {why}")
    for check in (_check_homeassistant, _check_accelerators):
        try:
            check(cfg, short)
        except ConfigError as exc:
            loader.errors.append(str(exc))
    if loader.errors:
        raise ConfigError("; ".join(loader.errors))
    return dataclasses.replace(cfg, source=str(fname), warnings=tuple(configchecks.warnings(cfg, loader)))


def _check_homeassistant(cfg: Config, short: str) -> None:
    ha = cfg.homeassistant
    why = topics.prefix_problem(ha.discovery_prefix)
    if why:
        raise ConfigError(f"{short} homeassistant.discovery_prefix: {why}")
    ours = [cfg.prefix] + ([cfg.mqtt.share.prefix.rstrip("/")] if cfg.mqtt.share is not None else [])
    for p in ours:
        d = ha.discovery_prefix
        if d == p or d.startswith(p + "/") or p.startswith(d + "/"):
            raise ConfigError(f"{short} homeassistant.discovery_prefix: {d!r} overlaps edged's own topics ({p}/...)")
    for i, s in enumerate(ha.streams):
        why = topics.level_problem(s)
        if why:
            raise ConfigError(f"{short} homeassistant.streams[{i}]: {why}")
    if len(set(ha.streams)) != len(ha.streams):
        raise ConfigError(f"{short} homeassistant.streams: a stream is listed twice")
    if len(ha.streams) > 64:
        raise ConfigError(f"{short} homeassistant.streams: at most 64 streams")


def _check_accelerators(cfg: Config, short: str) -> None:
    """accelerator.prefer names built-in kinds or named delegates; a delegate names its library."""
    acc = cfg.accelerator
    for name, d in acc.delegates.items():
        if name in BUILTIN_KINDS or not name or not all(c.isalnum() or c in "_-" for c in name) or len(name) > 32:
            raise ConfigError(f"{short} accelerator.delegates.{name}: a delegate's name is letters, digits, - or _ "
                              f"(at most 32) and not one of {', '.join(BUILTIN_KINDS)}")
        if not d.library:
            raise ConfigError(f"{short} accelerator.delegates.{name}.library: must name the delegate's library")
    if not acc.prefer:
        raise ConfigError(f"{short} accelerator.prefer: must name at least one accelerator")
    if len(set(acc.prefer)) != len(acc.prefer):
        raise ConfigError(f"{short} accelerator.prefer: names an accelerator twice")
    if len(cfg.model.selftest.frames) > 16:
        raise ConfigError(f"{short} model.selftest.frames: at most 16 frames")
    if acc.health.probe_max_s < acc.health.probe_s:
        raise ConfigError(f"{short} accelerator.health.probe_max_s: must be >= probe_s")


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file: a regular file of at most CONFIG_MAX_BYTES."""
    p = Path(path)
    try:
        data = userfiles.read_bytes(p, userfiles.CONFIG_MAX_BYTES)
    except userfiles.FileRefused as exc:
        raise ConfigError(f"{exc.path}: cannot read config: {exc.why}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start})") from None
    return parse(text, str(p), p.resolve().parent)
