"""Shared fixtures: a real Mosquitto on a free loopback port (edged.broker), a real `edged run`
process, an MQTT v5 client that sends frames and collects results, and the one way tests wait
(`until`: a condition with a deadline)."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edged.broker import Broker, free_port

__all__ = ["Broker", "free_port"]  # the tests' broker is the package's own (edged/broker.py)

ROOT = Path(__file__).resolve().parents[1]
# the lent GPU machine gets the models in a folder of its own: EDGED_SHARED_MODELS points there
SHARED = Path(os.environ.get("EDGED_SHARED_MODELS") or ROOT.parent / "shared" / "models")
BUNDLED = ROOT / "edged" / "models"
DATA = Path(__file__).resolve().parent / "data"


def shared(name: str) -> Path:
    """A file from ../shared/models, or skip the test saying what is missing."""
    p = SHARED / name
    if not p.exists():
        pytest.skip(f"{p} is absent: the shared test models live beside the checkout in ../shared/models")
    return p


T = TypeVar("T")


def until(pred: Callable[[], T], timeout: float, what: str, interval: float = 0.05,
          detail: Callable[[], str] | None = None) -> T:
    """Wait until pred() returns something truthy and return it; past `timeout` seconds, an
    AssertionError naming `what` (and detail(), e.g. a log tail). The one way tests wait: on a
    condition with a deadline, never a fixed sleep. pred may raise to give up early."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}"
                                 + (f": {detail()}" if detail is not None else ""))
        time.sleep(interval)


def throughout(check: Callable[[], object], seconds: float, what: str, interval: float = 0.2) -> int:
    """Assert that check() stays truthy for `seconds`: an invariant over a window of time (still
    starting, no restarts) where the window itself is what a test is about. Returns the checks made."""
    end = time.monotonic() + seconds
    n = 0
    while True:
        assert check(), f"{what} stopped holding after {n} checks"
        n += 1
        if time.monotonic() >= end:
            return n
        time.sleep(interval)


def edged_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "edged", *args]


class Daemon:
    """`edged run` as a real process with a config written into tmp_path."""

    def __init__(self, tmp: Path, broker: Broker, overrides: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None, device_id: str | None = None) -> None:
        self.device_id = device_id or "t-" + uuid.uuid4().hex[:6]
        self.dir = tmp
        self.prefix = f"test/{self.device_id}"
        cfg: dict[str, Any] = {
            "device_id": self.device_id,
            "mqtt": {"host": "127.0.0.1", "port": broker.port, "topic_prefix": self.prefix},
            "model": {"path": str(BUNDLED / "digits.tflite"), "labels": str(BUNDLED / "digits_labels.txt"),
                      "task": "classify", "top_k": 3},
            "status": {"socket": str(tmp / f"{self.device_id}.sock"), "interval": 1},
            "state_dir": str(tmp / "state"),
        }
        for key, val in (overrides or {}).items():
            if isinstance(val, dict) and isinstance(cfg.get(key), dict):
                cfg[key] = {**cfg[key], **val}
            else:
                cfg[key] = val
        self.config = cfg
        self.cfg_path = tmp / f"{self.device_id}.yaml"
        self.cfg_path.write_text(yaml.safe_dump(cfg))
        # this checkout first; a PYTHONPATH already set (packages carried to a lent machine) stays after it
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        self.env = dict(os.environ, PYTHONPATH=path, **(env or {}))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = tmp / f"{self.device_id}.log"

    def start(self, wait: bool = True) -> Daemon:
        self.proc = subprocess.Popen(edged_cmd("run", "-c", str(self.cfg_path)), env=self.env,
                                     stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        if wait:
            self.wait_state("online")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def status(self) -> dict[str, Any] | None:
        from edged.status import query
        from edged.errors import UnavailableError

        try:
            return query(str(self.config["status"]["socket"]), timeout=5)
        except UnavailableError:
            return None

    def wait_state(self, state: str, timeout: float = 30) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited {self.proc.returncode}: {self.log()[-1500:]}")
            st = self.status()
            return st if st and st.get("state") == state else None

        return until(reached, timeout, f"the daemon {state}", 0.1, detail=lambda: self.log()[-1500:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        return self.proc.returncode


class FrameIO:
    """Sending frames and waiting for their results; needs self.c (paho), self.prefix, self.cv, self.results."""

    c: mqtt.Client
    prefix: str
    cv: threading.Condition
    results: dict[str, dict[str, Any]]

    def send(self, payload: bytes, frame_id: str, stream: str = "cam1", qos: int = 1,
             content_type: str | None = None, expiry: int | None = None) -> mqtt.MQTTMessageInfo:
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("frame_id", frame_id)]
        if content_type:
            props.ContentType = content_type
        if expiry is not None:
            props.MessageExpiryInterval = expiry
        return self.c.publish(f"{self.prefix}/in/{stream}", payload, qos=qos, properties=props)

    def wait(self, ids: list[str], timeout: float = 30) -> dict[str, dict[str, Any] | None]:
        deadline = time.monotonic() + timeout
        with self.cv:
            while not all(i in self.results for i in ids):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cv.wait(left)
            return {i: self.results.get(i) for i in ids}



class Client(FrameIO):
    """MQTT v5 test client: send frames with a frame_id, gather results by frame_id."""

    def __init__(self, broker: Broker, prefix: str) -> None:
        self.prefix = prefix
        self.results: dict[str, dict[str, Any]] = {}
        self.count = 0
        self.status_msgs: list[dict[str, Any]] = []
        self.events: list[
            dict[str, Any]
        ] = []  # P/events, with "_rx" (monotonic time received) and "_n" (results before)
        self.cv = threading.Condition()
        self._subs = threading.Semaphore(0)
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-" + uuid.uuid4().hex[:8],
                             protocol=mqtt.MQTTv5)
        self.c.max_inflight_messages_set(1000)
        self.c.on_message = self._on_message
        self.c.on_subscribe = lambda *a: self._subs.release()
        self.c.connect("127.0.0.1", broker.port)
        self.c.loop_start()
        for topic in (f"{prefix}/out/#", f"{prefix}/status", f"{prefix}/events"):
            self.c.subscribe(topic, qos=1)
        for _ in range(3):
            assert self._subs.acquire(timeout=10), "broker did not confirm subscriptions"

    def _on_message(self, c: Any, u: Any, msg: Any) -> None:
        body = json.loads(msg.payload)
        with self.cv:
            if msg.topic.endswith("/status"):
                self.status_msgs.append(body)
            elif msg.topic == f"{self.prefix}/events":
                self.events.append(dict(body, _rx=time.monotonic(), _n=self.count))
            else:
                self.count += 1
                self.results[str(body.get("frame_id"))] = dict(body, _topic=msg.topic)
            self.cv.notify_all()

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with Broker(tmp_path) as b:
        yield b


@pytest.fixture
def daemon_factory(tmp_path: Path, broker: Broker) -> Iterator[Any]:
    started: list[Daemon] = []

    def make(overrides: dict[str, Any] | None = None, start: bool = True, **kw: Any) -> Daemon:
        d = Daemon(tmp_path, kw.pop("broker", broker), overrides, **kw)
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        d.stop(signal.SIGKILL, 5)


@pytest.fixture
def client_factory(broker: Broker) -> Iterator[Any]:
    made: list[Client] = []

    def make(prefix: str, b: Broker | None = None) -> Client:
        c = Client(b or broker, prefix)
        made.append(c)
        return c

    yield make
    for c in made:
        with contextlib.suppress(Exception):
            c.close()
