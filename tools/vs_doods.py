"""edged side by side with DOODS2: same model, same JPEG, same machine, same run, interleaved rounds.

    .venv/bin/python tools/vs_doods.py --peer-dir /work/peer/doods2 --peer-venv /work/peer/doods2-venv \
        [--size 517x606] [--rounds 3] [--requests 300] [--json vs_doods.json]

The peer is given, never fetched: --peer-dir is a checkout of snowzach/doods2 (its main.py), --peer-venv
a virtual environment with what its image runs (tensorflow 2.14, fastapi, uvicorn, opencv). Nothing of
the peer's code lives here; this tool only writes its config.yaml (into a temp folder) and talks to it.

Servers, one at a time, in an order that turns each round (A,B,C / C,B,A / ...), so a noisy neighbour
hits each alike:
- doods2: `python main.py -c CONFIG api` on a loopback port, the tflite detector on the SSD;
  requests are POST /detect with the base64 JPEG (its README's Detect Request), `detect: {"*": 50}`.
- edged (one entry per --edged NAME=WORKERSxTHREADS; default "default=1x1" and "best=2x1"):
  `python -m edged run` with task detect and score_threshold 0.5, against a Mosquitto of our own
  (edged.broker); frames are MQTT v5 QoS 1 publishes with a frame_id user property, one stream per
  client, results read from P/out/<stream>.

Each server is started cold in each round: cold start is process start to READY (DOODS2: its HTTP
port answers; edged: sd_notify READY=1 on a NOTIFY_SOCKET of ours) and to the first answer. Then a
warm-up, (a) one request at a time (closed loop, one client): req/s, p50/p95/p99 ms; (b) --clients
closed-loop clients at once: req/s, p50/p99 ms; then the PSS (psutil memory_full_info) of the
server's process tree: DOODS2's, edged's supervisor + workers (the broker's PSS is reported apart).
Figures are medians over rounds. The first answer of every server is checked: both must find the
same labels at >= 50 % (kite and person on the shared beach image), or the run exits 1.

The JPEG: --image (default ../shared/models/kite_and_cold.jpg, 1352x900); --size WxH center-crops it
to that aspect and resizes it (Lanczos, quality 90) in memory, e.g. the issue's 517x606.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = Path(os.environ.get("EDGED_SHARED_MODELS") or ROOT.parent / "shared" / "models")
MODEL = MODELS / "coco_ssd_mobilenet_v1_1.0_quant_2018_06_29_detect.tflite"
# The SSD's labelmap has a "???" background line 0, but its postprocess answers class 0 = person: both servers
# read coco_labels.txt (the labelmap without that line, "n/a" for the unused ids), DOODS2 with labelsStartFromZero
LABELS = MODELS / "coco_labels.txt"
IMAGE = MODELS / "kite_and_cold.jpg"
MIN_SCORE = 0.5


@dataclass
class ServerSpec:
    name: str
    kind: str  # "doods2" | "edged"
    workers: int = 1
    threads: int = 1


def parse_edged(text: str) -> ServerSpec:
    """NAME=WORKERSxTHREADS, e.g. best=2x1."""
    name, sep, shape = text.partition("=")
    w, x, t = shape.partition("x")
    if not sep or not x or not name or not w.isdigit() or not t.isdigit() or int(w) < 1 or int(t) < 1:
        raise argparse.ArgumentTypeError(f"--edged wants NAME=WORKERSxTHREADS (e.g. best=2x1), not {text!r}")
    return ServerSpec(f"edged-{name}", "edged", int(w), int(t))


def parse_size(text: str) -> tuple[int, int]:
    w, x, h = text.partition("x")
    if not x or not w.isdigit() or not h.isdigit() or not 16 <= int(w) <= 8192 or not 16 <= int(h) <= 8192:
        raise argparse.ArgumentTypeError(f"--size wants WxH between 16 and 8192, not {text!r}")
    return int(w), int(h)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peer-dir", type=Path, required=True, help="a checkout of snowzach/doods2 (main.py)")
    ap.add_argument("--peer-venv", type=Path, required=True, help="its venv (bin/python with tensorflow 2.14)")
    ap.add_argument("--image", type=Path, default=IMAGE)
    ap.add_argument("--size", type=parse_size, default=None, help="center-crop and resize the JPEG to WxH")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=300, help="requests per mode per server per round")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--edged", type=parse_edged, action="append", default=None,
                    help="NAME=WORKERSxTHREADS, repeatable (default: default=1x1 best=2x1)")
    ap.add_argument("--profile", default=None, metavar="SERVER",
                    help="after the rounds, py-spy the named server (doods2, edged-default, ...) under --clients load")
    ap.add_argument("--profile-s", type=int, default=20)
    ap.add_argument("--profile-dir", type=Path, default=Path(tempfile.gettempdir()) / "vs_doods_profile")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.requests < 10 or args.clients < 1 or args.warmup < 0:
        ap.error("--rounds >= 1, --requests >= 10, --clients >= 1, --warmup >= 0")
    args.edged = args.edged or [parse_edged("default=1x1"), parse_edged("best=2x1")]
    if args.profile is not None and args.profile not in {"doods2", *(s.name for s in args.edged)}:
        ap.error(f"--profile names doods2 or one of {', '.join(s.name for s in args.edged)}")
    return args


def jpeg_bytes(path: Path, size: tuple[int, int] | None) -> bytes:
    data = path.read_bytes()
    if size is None:
        return data
    from PIL import Image

    w, h = size
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        scale = min(im.width / w, im.height / h)
        cw, ch = round(w * scale), round(h * scale)
        left, top = (im.width - cw) // 2, (im.height - ch) // 2
        out = im.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        out.save(buf, "JPEG", quality=90)
        return buf.getvalue()


def pct(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def labels_of(dets: list[tuple[str, float]]) -> list[str]:
    return sorted({label for label, score in dets if score >= MIN_SCORE})


def tree_pss(pid: int) -> float:
    """PSS in MiB of a process and its descendants."""
    import psutil

    p = psutil.Process(pid)
    procs = [p, *p.children(recursive=True)]
    total = 0
    for q in procs:
        try:
            total += q.memory_full_info().pss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def tree_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) of a process and its live descendants."""
    import psutil

    if pid is None:
        return 0.0
    total = 0.0
    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    for q in procs:
        try:
            t = q.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def proc_cpu(pid: int) -> float:
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return t.user + t.system


def host_busy() -> float:
    """CPU seconds the whole host has spent busy (all cores)."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def wait_for(cond: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: the server exited {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout:g} s")
        time.sleep(0.005)


# ---- servers: start() -> (ready_s, first_answer_s); request(client) -> detections; pids; stop()

class Doods2:
    def __init__(self, spec: ServerSpec, args: argparse.Namespace, tmp: Path, jpeg: bytes) -> None:
        from edged.broker import free_port

        self.spec, self.args, self.tmp = spec, args, tmp
        self.port = free_port()
        self.cfg = tmp / "doods2.yaml"
        self.cfg.write_text(json.dumps({  # JSON is YAML
            "server": {"host": "127.0.0.1", "port": self.port},
            "doods": {"detectors": [{"name": "default", "type": "tflite", "modelFile": str(MODEL),
                                     "labelFile": str(LABELS), "labelsStartFromZero": True}]}}))
        self.body = json.dumps({"detector_name": "default", "data": base64.b64encode(jpeg).decode(),
                                "detect": {"*": MIN_SCORE * 100}}).encode()
        self.proc: subprocess.Popen[bytes] | None = None
        self.conns: dict[int, http.client.HTTPConnection] = {}

    def start(self) -> tuple[float, float, list[tuple[str, float]]]:
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")  # as its Dockerfile
        env.pop("PYTHONPATH", None)
        t0 = time.monotonic()
        exe = str(self.args.peer_venv / "bin" / "python")
        self.proc = subprocess.Popen([exe, "main.py", "-c", str(self.cfg), "api"], cwd=self.args.peer_dir, env=env,
                                     stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=open(self.tmp / "doods2.log", "ab"))
        wait_for(lambda: _listening(self.port), 120, "doods2 READY (port)", self.proc)
        ready = time.monotonic() - t0
        dets = self.request(0)
        return ready, time.monotonic() - t0, dets

    def fresh(self) -> None:
        """Before a slice: uvicorn closes a keep-alive connection idle for 5 s (while the others were measured)."""
        for c in self.conns.values():
            c.close()
        self.conns.clear()

    def request(self, client: int) -> list[tuple[str, float]]:
        conn = self.conns.get(client)
        if conn is None:
            conn = self.conns[client] = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("POST", "/detect", self.body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        got = resp.read()
        if resp.getheader("connection", "").lower() == "close":
            conn.close()
            del self.conns[client]
        if resp.status != 200:
            raise RuntimeError(f"doods2 answered {resp.status}: {got[:200]!r}")
        body = json.loads(got)
        return [(d["label"], d["confidence"] / 100) for d in body.get("detections") or []]

    def pids(self) -> tuple[int, int | None]:
        assert self.proc is not None
        return self.proc.pid, None

    def stop(self) -> None:
        self.fresh()
        _stop(self.proc)
        self.proc = None


class Edged:
    def __init__(self, spec: ServerSpec, args: argparse.Namespace, tmp: Path, jpeg: bytes) -> None:
        import yaml

        from edged.broker import Broker

        self.spec, self.args, self.jpeg = spec, args, jpeg
        self.tmp = tmp / spec.name
        self.tmp.mkdir()
        self.broker = Broker(self.tmp).start()
        self.prefix = "vs/vs"
        self.cfg = self.tmp / "edged.yaml"
        self.cfg.write_text(yaml.safe_dump({
            "device_id": "vs",
            "mqtt": {"host": "127.0.0.1", "port": self.broker.port, "topic_prefix": "vs/{device_id}"},
            "model": {"path": str(MODEL), "labels": str(LABELS), "task": "detect", "score_threshold": MIN_SCORE,
                      "threads": spec.threads},
            "accelerator": {"workers": spec.workers},
            "status": {"socket": str(self.tmp / "s.sock"), "interval": 0},
            "state_dir": str(self.tmp / "state")}))
        self.proc: subprocess.Popen[bytes] | None = None
        self.clients: dict[int, _MqttClient] = {}
        self.notify: socket.socket | None = None

    def start(self) -> tuple[float, float, list[tuple[str, float]]]:
        sock_path = self.tmp / "notify.sock"
        sock_path.unlink(missing_ok=True)
        ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        ns.bind(str(sock_path))
        ns.settimeout(0.05)
        client = self._client(0)  # connected before the daemon: the first answer is not lost
        env = dict(os.environ, NOTIFY_SOCKET=str(sock_path))
        t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "edged", "run", "-c", str(self.cfg)], cwd=ROOT, env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(self.tmp / "edged.log", "ab"))
        seen = b""

        def ready() -> bool:
            nonlocal seen
            try:
                seen += ns.recv(4096) + b"\n"
            except TimeoutError:
                pass
            return b"READY=1" in seen

        try:
            wait_for(ready, 120, "edged READY=1", self.proc)
        except BaseException:
            ns.close()
            raise
        self.notify = ns  # open until stop(): the daemon's STOPPING=1 finds a listener (a handful of datagrams)
        t_ready = time.monotonic() - t0
        dets = client.request(self.jpeg)
        return t_ready, time.monotonic() - t0, dets

    def fresh(self) -> None:
        """MQTT connections stay up between slices (keepalive pings): nothing to renew."""

    def _client(self, n: int) -> _MqttClient:
        c = self.clients.get(n)
        if c is None:
            c = self.clients[n] = _MqttClient(self.broker.port, self.prefix, f"c{n}")
        return c

    def request(self, client: int) -> list[tuple[str, float]]:
        return self._client(client).request(self.jpeg)

    def pids(self) -> tuple[int, int | None]:
        assert self.proc is not None
        return self.proc.pid, self.broker.pid

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None
        if self.notify is not None:
            self.notify.close()
            self.notify = None
        for c in self.clients.values():
            c.close()
        self.clients.clear()

    def close(self) -> None:
        self.broker.close()


class _MqttClient:
    """One closed-loop MQTT client: publish a frame to P/in/<stream>, wait for its answer on P/out/<stream>."""

    def __init__(self, port: int, prefix: str, stream: str) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.Properties, self.PUBLISH = Properties, PacketTypes.PUBLISH
        self.topic = f"{prefix}/in/{stream}"
        self.cv = threading.Condition()
        self.answers: dict[str, dict[str, Any]] = {}
        self.seq = 0
        subscribed = threading.Event()
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.c.on_connect = lambda cl, *a: cl.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.c.on_subscribe = lambda *a: subscribed.set()
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.c.subscribe(f"{prefix}/out/{stream}", 1)
        if not subscribed.wait(10):
            raise RuntimeError("broker did not confirm the subscription")

    def _on_message(self, cl: Any, u: Any, msg: Any) -> None:
        body = json.loads(msg.payload)
        with self.cv:
            self.answers[str(body.get("frame_id"))] = body
            self.cv.notify_all()

    def request(self, payload: bytes, timeout: float = 30) -> list[tuple[str, float]]:
        self.seq += 1
        fid = str(self.seq)
        p = self.Properties(self.PUBLISH)
        p.UserProperty = [("frame_id", fid)]
        self.c.publish(self.topic, payload, qos=1, properties=p)
        deadline = time.monotonic() + timeout
        with self.cv:
            while fid not in self.answers:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"edged: no answer to frame {fid} within {timeout:g} s")
                self.cv.wait(left)
            body = self.answers.pop(fid)
        if body.get("error"):
            raise RuntimeError(f"edged answered an error: {body['error']}")
        return [(d["label"], d["score"]) for d in body.get("detections") or []]

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# ---- modes

def closed_loop(request: Callable[[int], Any], clients: int, total: int) -> dict[str, float]:
    """`clients` threads, each sending its next request when the last is answered, `total` requests in all."""
    lat: list[float] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    left = [total]

    def run(n: int) -> None:
        while True:
            with lock:
                if left[0] <= 0 or errors:
                    return
                left[0] -= 1
            t = time.monotonic()
            try:
                request(n)
            except BaseException as exc:  # handed to the caller
                errors.append(exc)
                return
            with lock:
                lat.append((time.monotonic() - t) * 1e3)

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in range(clients)]
    t0 = time.monotonic()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.monotonic() - t0
    if errors:
        raise errors[0]
    return {"rps": len(lat) / wall, "p50": pct(lat, 50), "p95": pct(lat, 95), "p99": pct(lat, 99)}


def measured(server: Doods2 | Edged, clients: int, total: int) -> dict[str, float]:
    """closed_loop plus CPU per request: the server's (its process tree; edged: supervisor + workers), its broker's,
    this client process's; and the cores the rest of the host used meanwhile (other people's jobs)."""
    pid, broker = server.pids()
    me = psutil_process()

    def snap() -> tuple[float, ...]:
        t = me.cpu_times()
        return (tree_cpu(pid), tree_cpu(broker), t.user + t.system, tree_cpu(me.pid), host_busy(), time.monotonic(),
                proc_cpu(pid))

    server.fresh()
    c0 = snap()
    out = closed_loop(server.request, clients, total)
    d = [b - a for a, b in zip(c0, snap(), strict=True)]
    out["server_cpu_ms"] = d[0] / total * 1e3
    out["main_cpu_ms"] = d[6] / total * 1e3  # edged: the supervisor alone; DOODS2: its only process
    out["broker_cpu_ms"] = d[1] / total * 1e3
    out["client_cpu_ms"] = d[2] / total * 1e3
    out["others_cores"] = max(0.0, d[4] - d[3]) / d[5]  # tree_cpu(me): this process, every server, every broker
    return out


def psutil_process() -> Any:
    import psutil

    return psutil.Process()


def order_of(specs: list[ServerSpec], r: int) -> list[ServerSpec]:
    """Round r's order: rotated by r, reversed on odd rounds (A,B,C / C,A,B reversed / ...)."""
    order = specs[r % len(specs):] + specs[:r % len(specs)]
    return order[::-1] if r % 2 else order


def cold_starts(servers: dict[str, Doods2 | Edged], specs: list[ServerSpec], args: argparse.Namespace,
                out: dict[str, list[dict[str, Any]]]) -> None:
    """Each server alone (PSS splits pages shared between processes: edged instances share numpy and LiteRT), in
    each round: started cold, its first answer, a warm-up in both modes, then the PSS of its tree, then stopped."""
    for r in range(args.rounds):
        for s in order_of(specs, r):
            srv = servers[s.name]
            try:
                ready, first, dets = srv.start()
                closed_loop(srv.request, 1, args.warmup)
                closed_loop(srv.request, args.clients, args.warmup)
                pid, broker = srv.pids()
                pss, broker_pss = tree_pss(pid), tree_pss(broker) if broker else None
            finally:
                srv.stop()
            out[s.name].append({"ready_s": ready, "first_answer_s": first, "labels": labels_of(dets),
                                "top": max(dets, key=lambda d: d[1])[0] if dets else None,
                                "pss_mib": pss, "broker_pss_mib": broker_pss})
            print(f"cold start {r + 1} {s.name}: READY {ready:.2f} s, first answer {first:.2f} s, "
                  f"{labels_of(dets)}; PSS after warm-up {pss:.1f} MiB", flush=True)


def load_rounds(servers: dict[str, Doods2 | Edged], specs: list[ServerSpec], args: argparse.Namespace,
                out: dict[str, dict[str, list[dict[str, float]]]]) -> None:
    """Every server up at once (idle ones cost nothing measurable); per round, mode (a) on each server in that
    round's order, then mode (b): adjacent slices, so a burst of someone else's work hits each alike."""
    for r in range(args.rounds):
        for mode, clients in (("serial", 1), ("concurrent", args.clients)):
            for s in order_of(specs, r):
                m = measured(servers[s.name], clients, args.requests)
                out[s.name][mode].append(m)
                print(f"round {r + 1} {mode} {s.name}: {m['rps']:.1f} req/s, p50 {m['p50']:.1f} ms, p99 "
                      f"{m['p99']:.1f} ms, server CPU {m['server_cpu_ms']:.1f} ms/req, others "
                      f"{m['others_cores']:.2f} cores", flush=True)


def profile(srv: Doods2 | Edged, args: argparse.Namespace) -> None:
    """py-spy record on the server's process and its children (edged: supervisor, workers) while `clients` clients
    load it; speedscope JSON and raw collapsed stacks (one line per stack, its sample count last)."""
    import psutil

    pid, _ = srv.pids()
    targets = {"main": pid, **{f"worker{i}": c.pid for i, c in enumerate(psutil.Process(pid).children())}}
    args.profile_dir.mkdir(parents=True, exist_ok=True)
    spy = Path(sys.executable).with_name("py-spy")
    procs = [subprocess.Popen([str(spy), "record", "--nonblocking", "-r", "200", "-d", str(args.profile_s), "-f",
                               fmt, "-o", str(args.profile_dir / f"{srv.spec.name}-{name}.{ext}"), "-p", str(p)],
                              stdout=subprocess.DEVNULL, stderr=open(args.profile_dir / f"{name}.log", "ab"))
             for name, p in targets.items() for fmt, ext in (("speedscope", "json"), ("raw", "txt"))]
    srv.fresh()
    deadline = time.monotonic() + args.profile_s + 2
    while time.monotonic() < deadline:
        closed_loop(srv.request, args.clients, args.clients * 10)
    for p in procs:
        p.wait(60)
    print(f"py-spy profiles of {srv.spec.name} ({', '.join(f'{k} {v}' for k, v in targets.items())}) in "
          f"{args.profile_dir}", flush=True)


def medians(cold: list[dict[str, Any]], load: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    med = statistics.median
    out: dict[str, Any] = {k: med(r[k] for r in cold) for k in ("ready_s", "first_answer_s", "pss_mib")}
    if cold[0]["broker_pss_mib"] is not None:
        out["broker_pss_mib"] = med(r["broker_pss_mib"] for r in cold)
    for mode, rs in load.items():
        out[mode] = {k: med(r[k] for r in rs) for k in rs[0]}
    out["labels"] = cold[0]["labels"]
    out["top"] = cold[0]["top"]
    return out


def goals(res: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Issue 23 goal 5, each as (edged figure, DOODS2 figure, ratio, holds)."""
    d = res["doods2"]
    names = [n for n in res if n != "doods2"]
    default = res[names[0]]
    best_name = max(names, key=lambda n: res[n]["concurrent"]["rps"])
    best = res[best_name]
    g: dict[str, dict[str, Any]] = {}

    def add(key: str, ours: float, theirs: float, ok: bool) -> None:
        g[key] = {"edged": round(ours, 3), "doods2": round(theirs, 3), "ratio": round(ours / theirs, 3), "holds": ok}

    add(f"{names[0]} {{c}} clients rps >= 1.25x", default["concurrent"]["rps"], d["concurrent"]["rps"],
        default["concurrent"]["rps"] >= 1.25 * d["concurrent"]["rps"])
    add(f"best ({best_name}) {{c}} clients rps >= 2.2x", best["concurrent"]["rps"], d["concurrent"]["rps"],
        best["concurrent"]["rps"] >= 2.2 * d["concurrent"]["rps"])
    add(f"best ({best_name}) total PSS <= 1/5", best["pss_mib"], d["pss_mib"], best["pss_mib"] <= d["pss_mib"] / 5)
    for n in names:
        add(f"{n} serial p50 <= 0.85x", res[n]["serial"]["p50"], d["serial"]["p50"],
            res[n]["serial"]["p50"] <= 0.85 * d["serial"]["p50"])
        for mode in ("serial", "concurrent"):
            add(f"{n} {mode} p99 <= peer's", res[n][mode]["p99"], d[mode]["p99"], res[n][mode]["p99"] <= d[mode]["p99"])
        add(f"{n} cold start (first answer) <= 1/3", res[n]["first_answer_s"], d["first_answer_s"],
            res[n]["first_answer_s"] <= d["first_answer_s"] / 3)
    return g


def table(res: dict[str, dict[str, Any]], clients: int) -> str:
    head = (f"| server | 1 at a time req/s | p50 ms | p95 ms | p99 ms | {clients} clients req/s | p50 ms | p99 ms "
            f"| PSS MiB | READY s | first answer s | labels >= {MIN_SCORE:g} |")
    rows = [head, "|" + " --- |" * (head.count("|") - 1)]
    for name, r in res.items():
        s, c = r["serial"], r["concurrent"]
        pss = f"{r['pss_mib']:.1f}" + (f" (+ broker {r['broker_pss_mib']:.1f})" if r.get("broker_pss_mib") else "")
        rows.append(f"| {name} | {s['rps']:.1f} | {s['p50']:.1f} | {s['p95']:.1f} | {s['p99']:.1f} | {c['rps']:.1f} "
                    f"| {c['p50']:.1f} | {c['p99']:.1f} | {pss} | {r['ready_s']:.2f} | {r['first_answer_s']:.2f} "
                    f"| {', '.join(r['labels'])} |")
    head = ("| server | mode | server CPU ms/req | of which supervisor | broker CPU ms/req | client CPU ms/req "
            "| other jobs on the host, cores |")
    rows += ["", head, "|" + " --- |" * (head.count("|") - 1)]
    for name, r in res.items():
        for mode, label in (("serial", "1 at a time"), ("concurrent", f"{clients} clients")):
            m = r[mode]
            sup = f"{m['main_cpu_ms']:.2f}" if name != "doods2" else "-"
            rows.append(f"| {name} | {label} | {m['server_cpu_ms']:.2f} | {sup} | {m['broker_cpu_ms']:.2f} "
                        f"| {m['client_cpu_ms']:.2f} | {m['others_cores']:.2f} |")
    return "\n".join(rows)


def goal_lines(g: dict[str, dict[str, Any]], clients: int) -> str:
    return "\n".join(f"{'HOLDS' if v['holds'] else 'MISSES'}  {k.format(c=clients)}: edged {v['edged']:g} vs doods2 "
                     f"{v['doods2']:g} (ratio {v['ratio']:g})" for k, v in g.items())


def report(args: argparse.Namespace, jpeg: bytes, cold: dict[str, list[dict[str, Any]]],
           load: dict[str, dict[str, list[dict[str, float]]]]) -> bool:
    """Print the tables and the goals, write --json; whether every server found the same labels."""
    res = {name: medians(cold[name], load[name]) for name in cold}
    like = len({tuple(r["labels"]) for rs in cold.values() for r in rs}) == 1
    g = goals(res)
    print(f"\nimage: {args.image.name}" + (f" cropped/resized to {args.size[0]}x{args.size[1]}" if args.size else "")
          + f", {len(jpeg)} bytes; {args.rounds} interleaved rounds, medians; {args.requests} requests per mode")
    print(table(res, args.clients))
    print(goal_lines(g, args.clients))
    print("same labels from every server and round:", like, flush=True)
    if args.json:
        args.json.write_text(json.dumps({"image": str(args.image), "size": args.size, "jpeg_bytes": len(jpeg),
                                         "rounds": args.rounds, "requests": args.requests, "clients": args.clients,
                                         "medians": res, "cold_starts": cold, "rounds_load": load, "goals": g,
                                         "same_labels": like}, indent=1))
    return like


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.peer_dir / "main.py").is_file() or not (args.peer_venv / "bin" / "python").exists():
        print(f"vs_doods: no DOODS2 at {args.peer_dir} (main.py) with {args.peer_venv}/bin/python", file=sys.stderr)
        return 69
    jpeg = jpeg_bytes(args.image, args.size)
    tmp = Path(tempfile.mkdtemp(prefix="vs-doods-"))
    specs = [ServerSpec("doods2", "doods2"), *args.edged]
    servers: dict[str, Doods2 | Edged] = {s.name: (Doods2 if s.kind == "doods2" else Edged)(s, args, tmp, jpeg)
                                          for s in specs}
    cold: dict[str, list[dict[str, Any]]] = {s.name: [] for s in specs}
    load: dict[str, dict[str, list[dict[str, float]]]] = {s.name: {"serial": [], "concurrent": []} for s in specs}
    try:
        cold_starts(servers, specs, args, cold)
        for s in specs:
            srv = servers[s.name]
            srv.start()
            closed_loop(srv.request, 1, args.warmup)
            closed_loop(srv.request, args.clients, args.warmup)
        load_rounds(servers, specs, args, load)
        like = report(args, jpeg, cold, load)
        if args.profile:
            profile(servers[args.profile], args)
    finally:
        for srv in servers.values():
            srv.stop()
            if isinstance(srv, Edged):
                srv.close()
    return 0 if like else 1


if __name__ == "__main__":
    raise SystemExit(main())
