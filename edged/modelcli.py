"""`edged model keygen | push | status | rollback`: the operator's side of model updates.

push builds and signs a bundle (edged.bundle), publishes it to P/model/update
at QoS 1 and waits for the daemon's P/model/state naming this bundle: exit 0
applied, 1 rejected or rolled back, 69 when the broker or the daemon does not
answer. status and rollback talk to the local daemon over its status socket.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from edged import config
from edged.errors import ConfigError, UnavailableError

logger = logging.getLogger(__name__)

EXT = {".jpg": "jpg", ".jpeg": "jpeg", ".png": "png", ".bmp": "bmp", ".raw": "raw", ".bin": "raw"}


def cmd_keygen(args: argparse.Namespace) -> int:
    from edged import bundle

    if os.path.exists(args.keyfile):
        raise ConfigError(f"{args.keyfile}: exists; refusing to overwrite a key")
    pub = bundle.keygen(args.keyfile)
    print(f"private key {args.keyfile} (keep it off the devices); public key {pub} "
          "(model.update.public_key on each device)")
    return 0


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the {what}: {exc.strerror}") from None


def build_from_args(args: argparse.Namespace) -> bytes:
    from edged import bundle

    key = bundle.load_private_key(args.key)
    model = _read(args.model, "model")
    labels = _read(args.labels, "labels") if args.labels else None
    tests = []
    expects: list[Any] = []
    if args.selftest_expect:
        try:
            expects = json.loads(_read(args.selftest_expect, "self-test expectations"))
        except ValueError:
            raise ConfigError(f"{args.selftest_expect}: not JSON") from None
        if not isinstance(expects, list) or not all(isinstance(e, dict) for e in expects):
            raise ConfigError(f"{args.selftest_expect}: must be a JSON list of objects, one per --selftest-frame")
    frames = args.selftest_frame or []
    if expects and len(expects) != len(frames):
        raise ConfigError(f"{args.selftest_expect}: {len(expects)} entries for {len(frames)} --selftest-frame")
    for i, f in enumerate(frames):
        ext = EXT.get(Path(f).suffix.lower())
        if ext is None:
            raise ConfigError(f"{f}: a self-test frame must be .jpg, .png, .bmp or .raw")
        tests.append((ext, _read(f, "self-test frame"), expects[i] if expects else {}))
    name = Path(args.model).name
    name = name[:-7] if name.endswith(".tflite") else name
    return bundle.build(model, args.serial, key, name=name, task=args.task, labels=labels, selftest=tests)


def cmd_push(args: argparse.Namespace) -> int:
    from edged.mqtt import new_client

    cfg = config.load(args.config or config.default_path(os.environ))
    payload = build_from_args(args)
    digest = hashlib.sha256(payload).hexdigest()
    if args.out:
        Path(args.out).write_bytes(payload)
    prefix = cfg.prefix
    got: dict[str, Any] = {}
    done = threading.Event()
    subscribed = threading.Event()
    client = new_client(cfg, f"edged-push-{uuid.uuid4().hex[:8]}")

    def on_connect(c: Any, u: Any, flags: Any, rc: Any, props: Any = None) -> None:
        if not rc.is_failure:
            c.subscribe(f"{prefix}/model/state", qos=1)

    def on_subscribe(c: Any, u: Any, mid: Any, codes: Any, props: Any = None) -> None:
        subscribed.set()

    def on_message(c: Any, u: Any, msg: Any) -> None:
        try:
            st = json.loads(msg.payload)
        except ValueError:
            return
        last = st.get("last_update") if isinstance(st, dict) else None
        if isinstance(last, dict) and last.get("bundle") == digest and not msg.retain:
            got.update(st)
            done.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    try:
        client.connect(cfg.mqtt.host, cfg.mqtt.port, keepalive=30)
    except OSError as exc:
        raise UnavailableError(f"broker {cfg.mqtt.host}:{cfg.mqtt.port}: {exc}") from None
    client.loop_start()
    try:
        if not subscribed.wait(10):
            raise UnavailableError(f"broker {cfg.mqtt.host}:{cfg.mqtt.port} did not answer")
        info = client.publish(f"{prefix}/model/update", payload, qos=1, retain=args.retain)
        info.wait_for_publish(30)
        if not info.is_published():
            raise UnavailableError(f"broker {cfg.mqtt.host}:{cfg.mqtt.port} did not take the bundle")
        print(f"published serial {args.serial} ({len(payload)} bytes, bundle sha256 {digest[:16]}...) to "
              f"{prefix}/model/update{' (retained)' if args.retain else ''}", file=sys.stderr)
        if not done.wait(args.timeout):
            raise UnavailableError(f"no answer on {prefix}/model/state within {args.timeout:g} s "
                                   "(is the daemon running, with model.update.enabled?)")
    finally:
        client.loop_stop()
        client.disconnect()
    last = got.get("last_update") or {}
    print(json.dumps(got, indent=2))
    if last.get("result") == "applied":
        return 0
    print(f"edged model push: {last.get('result')}: {last.get('reason')}", file=sys.stderr)
    return 1


def _socket(args: argparse.Namespace) -> str:
    return args.socket or config.load(args.config or config.default_path(os.environ)).status.socket


def cmd_status(args: argparse.Namespace) -> int:
    from edged import status

    st = status.query(_socket(args)).get("model_update") or {}
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    if not st.get("enabled"):
        print("model updates are off (model.update.enabled: false)")
        return 0
    cur = st.get("current") or {}
    print(f"current   serial {cur.get('serial')}  {cur.get('name')}  sha256 {str(cur.get('sha256'))[:16]}  "
          f"since {_ts(cur.get('since'))}" + ("  (model.path)" if cur.get("config") else ""))
    for p in st.get("previous") or ():
        print(f"previous  serial {p.get('serial')}  {p.get('name')}  sha256 {str(p.get('sha256'))[:16]}")
    lu = st.get("last_update")
    if lu:
        print(f"last      serial {lu.get('serial')}  {lu.get('result')}  {_ts(lu.get('ts'))}"
              + (f"  {lu.get('reason')}" if lu.get("reason") else ""))
    if st.get("probation_left_s"):
        print(f"probation {st['probation_left_s']:.0f} s left")
    if st.get("warning"):
        print(f"warning   {st['warning']}")
    return 0


def _ts(t: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if isinstance(t, (int, float)) else "-"


def cmd_rollback(args: argparse.Namespace) -> int:
    from edged import status

    answer = status.command(_socket(args), "model-rollback")
    if answer.get("ok"):
        print(f"rolled back from serial {answer.get('from')} to serial {answer.get('to')} ({answer.get('name')})")
        return 0
    print(f"edged model rollback: {answer.get('error')}", file=sys.stderr)
    return 1


def add_parser(sub: Any, add: Any) -> None:
    m = sub.add_parser("model", help="signed model updates over MQTT")
    msub = m.add_subparsers(dest="model_cmd", required=True)
    k = msub.add_parser("keygen", help="make an ed25519 signing key (KEYFILE) and its public key (KEYFILE.pub)")
    k.add_argument("keyfile")
    k.set_defaults(fn=cmd_keygen)
    p = msub.add_parser("push", help="sign MODEL into a bundle, publish it, wait for the daemon's verdict")
    p.add_argument("-c", "--config", help="config file (default $EDGED_CONFIG, else /etc/edged/edged.yaml)")
    p.add_argument("model")
    p.add_argument("--serial", type=int, required=True, help="greater than the serving one")
    p.add_argument("--labels")
    p.add_argument("--task", default="classify", choices=("classify", "detect", "raw"))
    p.add_argument("--key", required=True, help="the private key from edged model keygen")
    p.add_argument("--retain", action="store_true", help="retained: devices away now apply it when they return")
    p.add_argument("--selftest-frame", action="append", help="a frame the daemon runs before it switches")
    p.add_argument("--selftest-expect", help="JSON list, one object per frame: {\"top\": ID} or {\"outputs\": ...}")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for P/model/state")
    p.add_argument("--out", help="also write the bundle to this file")
    p.set_defaults(fn=cmd_push)
    for name, fn, help_ in (("status", cmd_status, "the store: current, previous, last update"),
                            ("rollback", cmd_rollback, "serve the previous model again")):
        s = msub.add_parser(name, help=help_)
        s.add_argument("-c", "--config", help="config file (default $EDGED_CONFIG, else /etc/edged/edged.yaml)")
        s.add_argument("--socket", help="status socket path (default: status.socket from the config)")
        if name == "status":
            s.add_argument("--json", action="store_true")
        s.set_defaults(fn=fn)
