"""Worker handles: the supervisor's side of each inference worker process.

A WorkerHandle spawns ``python -m edged.worker`` (a fresh interpreter, not a
fork of the threaded supervisor), hands it the config, waits for it to load
the model, then sends it frames and pool segments and reads its results on the
supervisor's I/O loop (or, without one, on a thread of its own). It never
parses frame bytes.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any
from collections.abc import Callable

from edged.inflight import InFlight
from edged import protocol
from edged.errors import ModelError, WorkerError
from edged.ioloop import IoLoop
from edged.notify import NOTIFY_ENV_VARS
from edged.workerlogs import LogGate, read_stderr

logger = logging.getLogger(__name__)
wlog = logging.getLogger("edged.worker")

SERVING = (protocol.Result, protocol.Pong, protocol.SelfTestReport, protocol.Log)  # what a ready worker may send
READY_CAP = 1 << 20  # the biggest message before the model is known (its ready report)


def reply_cap(model: dict[str, Any]) -> int:
    """The biggest reply a worker may send for this model: a raw model's outputs as JSON floats, with room."""
    elements = 0
    for out in model.get("outputs") or ():
        n = 1
        for dim in out.get("shape") or () if isinstance(out, dict) else ():
            n *= max(1, int(dim)) if isinstance(dim, int) else 1
        elements += n
    return min(protocol.MAX_MESSAGE, READY_CAP + 32 * elements)


class WorkerHandle:
    """One worker process; `on_message(handle, msg)` gets its results and pongs, `on_exit(handle)` its death.

    Everything the worker sends is decoded by edged.protocol and must be a
    well-formed message of the serving phase (Result, Pong, Log); anything
    else, a descriptor, or a message over the reply cap ends the worker.
    """

    def __init__(self, index: int, init: protocol.Init,
                 on_message: Callable[[WorkerHandle, protocol.Result | protocol.Pong], None],
                 on_exit: Callable[[WorkerHandle], None], generation: int = 0, loop: IoLoop | None = None) -> None:
        self.index = index
        self.init_msg = init
        self.on_message = on_message
        self.on_exit = on_exit
        self.generation = generation
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.state = "starting"
        self.info: dict[str, Any] = {}
        self.segments: set[int] = set()
        self.inflight = InFlight()  # seq -> Frame, guarded by the supervisor's lock
        self.last_pong = time.monotonic()
        self.retiring = False
        self.kill_cause: tuple[str, int | None] | None = None  # why the supervisor killed it, and the frame
        self.invoke_timeout_s: float | None = None  # after Loaded: each warm-up/self-test invoke within this
        self.loaded_kind: str | None = None  # the accelerator the worker said it loaded the model on
        self.on_selftest: Callable[[WorkerHandle, dict[str, Any]], None] | None = None  # in-service answers
        self.selftest_sent: float | None = None
        self.last_selftest = time.monotonic()  # when a SelfTest went out that is not answered yet
        self.selftest: Any = None  # the supervisor's edged.selftest.Verdict on this worker's self-test
        self.inference_ms = 0.0  # summed inference time of the results it sent (per-accelerator telemetry)
        self.served = 0  # results (and error results) this worker sent
        self.batched = 0  # of those, results of frames that shared an invoke with others
        self.window = 2  # frames handed to it ahead of time (the supervisor sets it once the worker is ready)
        self.probe_sink: Callable[[Any], None] | None = None  # a candidate's replies (edged.updates), not frames
        self.candidate_expected: Any = None  # a candidate's (model sha256, expected self-test outputs)
        self.logs = LogGate(index)
        self._send_lock = threading.Lock()
        self._watched = False  # its channel is on the I/O loop
        self._ending = False  # the reaper (_end) was started: once per handle
        self._reader: threading.Thread | None = None
        self.loop = loop  # results are read on this I/O loop; without one, on a thread of the handle's own

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def model_name(self) -> str:
        path = str(self.info.get("model", {}).get("path", ""))
        name = os.path.basename(path)
        return name[:-7] if name.endswith(".tflite") else name

    @property
    def accelerator(self) -> str | None:
        chosen = self.info.get("accelerator", {}).get("chosen")
        return chosen if isinstance(chosen, str) else None

    def start(self, timeout: float = 120.0) -> dict[str, Any]:
        """Spawn the worker and block until it has loaded the model; raise ModelError/WorkerError."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._spawn_worker(child)
        self.logs.pid = self.pid
        self.sock = parent
        reader = protocol.Reader(parent, max_message=READY_CAP, accept_fds=False)
        try:
            parent.settimeout(timeout)
            protocol.send(parent, self.init_msg)
            while True:
                msg = protocol.decode(reader.read(), protocol.FROM_WORKER)
                if isinstance(msg, protocol.Log):
                    self.logs.emit(msg.level, msg.msg)
                    continue
                if isinstance(msg, protocol.Loaded) and self.loaded_kind is None:
                    # loading may take long (a firmware upload); warm-up and self-test are a few invokes: all
                    # of them within twice the frame deadline
                    self.loaded_kind = msg.accelerator
                    if self.invoke_timeout_s is not None:
                        parent.settimeout(2 * self.invoke_timeout_s)
                    continue
                break
            parent.settimeout(None)
        except TimeoutError:
            self.kill()
            what = (f"hung in warm-up or self-test on {self.loaded_kind}" if self.loaded_kind
                    else f"did not load the model within {timeout:.0f} s")
            err = WorkerError(f"worker {self.index} {what}; exit status {self._reap()}")
            err.cause = "hang" if self.loaded_kind else "load"  # type: ignore[attr-defined]
            raise err from None
        except (OSError, protocol.ProtocolError) as exc:
            self.kill()
            where = f" (after loading the model on {self.loaded_kind})" if self.loaded_kind else ""
            err = WorkerError(f"worker {self.index} did not start{where}: {exc}; exit status {self._reap()}")
            err.cause = "crash" if self.loaded_kind else "load"  # type: ignore[attr-defined]
            raise err from None
        if isinstance(msg, protocol.Fatal):
            self.kill()
            if msg.kind == "model":
                raise ModelError(msg.message)
            raise WorkerError(f"worker {self.index} failed to start: {msg.message}")
        if not isinstance(msg, protocol.Ready):
            self.kill()
            raise WorkerError(f"worker {self.index} sent {msg.TAG!r} instead of ready")
        self.info = protocol.as_dict(msg)
        del self.info["t"]
        reader.max_message = reply_cap(msg.model)
        self.state = "ready"
        self.last_pong = time.monotonic()
        if self.loop is not None:
            loop = self.loop
            self._watched = True
            loop.call_soon(loop.watch, parent, lambda: self._on_readable(reader))
        else:
            self._reader = threading.Thread(target=self._read_loop, args=(reader,),
                                            name=f"worker-{self.index}-reader", daemon=True)
            self._reader.start()
        return self.info

    def _spawn_worker(self, child: socket.socket) -> None:
        """Start the worker on its end of the channel (here: a fresh interpreter) and let go of that end."""
        # the worker must not talk to systemd: only the supervisor vouches for the pipeline
        env = {k: v for k, v in os.environ.items() if k not in NOTIFY_ENV_VARS}
        env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        try:
            # its stderr is read by us, line by line, not shared with ours: a worker cannot write our log
            self.proc = subprocess.Popen([sys.executable, "-m", "edged.worker", str(child.fileno())],
                                         pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, env=env,
                                         stderr=subprocess.PIPE)
        finally:
            child.close()
        threading.Thread(target=read_stderr, args=(self.proc.stderr, self.logs), name=f"worker-{self.index}-stderr",
                         daemon=True).start()

    def _handle(self, raw: dict[str, Any]) -> None:
        msg = protocol.decode(raw, SERVING)
        if isinstance(msg, protocol.Log):
            self.logs.emit(msg.level, msg.msg)
        elif self.kill_cause is not None:
            return  # killed (a failed self-test, its accelerator set aside): nothing more of it is published
        elif isinstance(msg, protocol.SelfTestReport):
            if self.selftest_sent is None:
                raise protocol.ProtocolError(f"worker {self.index} sent self-test answers nobody asked for")
            self.selftest_sent = None
            if self.on_selftest is not None:
                self.on_selftest(self, msg.report)
        else:
            self.on_message(self, msg)  # type: ignore[arg-type]

    def _read_loop(self, reader: protocol.Reader) -> None:
        try:
            while True:
                self._handle(reader.read())
        except (OSError, protocol.ProtocolError) as exc:
            if self.state not in ("stopping", "stopped"):
                logger.debug("worker %s channel closed: %s", self.pid, exc)
        except Exception:  # a bug in our handling must not leave frames unanswered
            logger.exception("worker %s reader failed", self.pid)
        self._end()

    def _on_readable(self, reader: protocol.Reader) -> None:
        """On the I/O loop: take what the channel holds; at its end, hand the rest to a thread."""
        try:
            for msg in reader.read_available():
                self._handle(msg)
            if reader.failed is None:
                return
            raise reader.failed
        except (OSError, protocol.ProtocolError) as exc:
            if self.state not in ("stopping", "stopped"):
                logger.debug("worker %s channel closed: %s", self.pid, exc)
        except Exception:  # a bug in our handling must not leave frames unanswered
            logger.exception("worker %s reader failed", self.pid)
        assert self.loop is not None
        self.loop.watch(reader.sock, None)
        self._start_reaper()

    def _start_reaper(self) -> None:
        """On the I/O loop: reap the worker and report its end, once (reaping may wait: not on the loop)."""
        if self._ending:
            return
        self._ending = True
        threading.Thread(target=self._end, name=f"worker-{self.index}-reaper", daemon=True).start()

    def _end(self) -> None:
        self._reap(wait=5.0)
        self.on_exit(self)
        self._close()  # the channel's fd, now rather than whenever the handle is collected

    def send(self, msg: protocol.Message, fds: tuple[int, ...] = ()) -> bool:
        sock = self.sock
        if sock is None or self.state in ("dead", "stopped"):
            return False
        try:
            with self._send_lock:
                protocol.send(sock, msg, fds)
            return True
        except OSError:
            return False

    def ensure_segment(self, seg_id: int, fd: int, size: int) -> bool:
        if seg_id in self.segments:
            return True
        if self.send(protocol.SegmentAdd(seg_id, size), (fd,)):
            self.segments.add(seg_id)
            return True
        return False

    def send_frame(self, seq: int, pool: Any, block: Any, length: int, content_type: str | None = None) -> bool:
        """Hand the worker a frame that sits in `block` of `pool`: its segment first (once), then the job."""
        seg = pool.segment(block.segment)
        if seg is None or not self.ensure_segment(block.segment, *seg):
            return False
        return self.send(protocol.FrameJob(seq, block.segment, block.offset, length, content_type))

    def drop_segment(self, seg_id: int) -> None:
        if seg_id in self.segments:
            self.segments.discard(seg_id)
            self.send(protocol.SegmentDrop(seg_id))

    def ping(self) -> None:
        self.send(protocol.Ping())

    def kill_for(self, cause: str, seq: int | None = None) -> None:
        """Kill it, remembering why (a frame's timeout, missed heartbeats) for whoever answers its frames."""
        self.kill_cause = (cause, seq)
        self.kill()

    def stop(self, grace: float = 3.0) -> None:
        """Ask the worker to exit; SIGTERM, then SIGKILL after the grace period."""
        self.state = "stopping"
        self.send(protocol.Stop())
        if self.proc is not None:
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close()
        self.state = "stopped"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._close()

    def _close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            if self.loop is not None and self.loop.running():
                # the loop forgets the socket before its fd number can be reused
                self.loop.call_soon(self._release, sock)
            else:
                sock.close()

    def _release(self, sock: socket.socket) -> None:
        assert self.loop is not None
        self.loop.watch(sock, None)
        sock.close()
        if self._watched:
            self._start_reaper()  # closed before the loop read its end (a kill from the loop itself): end it here

    def _reap(self, wait: float = 2.0) -> int | None:
        if self.proc is None:
            return None
        try:
            return self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.wait(5)

    def exit_description(self) -> str:
        rc = self.proc.returncode if self.proc else None
        if rc is None:
            return "channel closed"
        if rc < 0:
            try:
                return f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                return f"killed by signal {-rc}"
        return f"exited with status {rc}"


class InProcessWorkerHandle(WorkerHandle):
    """`sandbox.in_process`: the same worker loop and channel, on a thread of the daemon.

    For debugging (a debugger and profiler see the interpreter) and for
    measuring what the process boundary costs. It gives up what the process
    gave: no seccomp, no rlimits, a native crash takes the daemon down, and a
    frame stuck in native code cannot be stopped (its thread is abandoned and
    a new one started).
    """

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._thread: threading.Thread | None = None
        self._status: int | None = None

    @property
    def pid(self) -> int | None:
        return os.getpid()

    def _spawn_worker(self, child: socket.socket) -> None:
        from edged import worker

        def run() -> None:
            try:
                self._status = worker.run_channel(child, in_process=True)
            finally:
                child.close()  # the supervisor's reader sees the end of the channel

        self._thread = threading.Thread(target=run, name=f"worker-{self.index}", daemon=True)
        self._thread.start()

    def start(self, timeout: float = 120.0) -> dict[str, Any]:
        info = super().start(timeout)
        info["sandbox_profile"] = "in_process"
        return info

    def stop(self, grace: float = 3.0) -> None:
        self.state = "stopping"
        self.send(protocol.Stop())
        if self._thread is not None:
            self._thread.join(grace)
        self._close()
        self.state = "stopped"

    def kill(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            logger.warning("worker %d runs in process: closing its channel; a frame stuck in native code keeps "
                           "its thread", self.index)
        self._close()

    def _reap(self, wait: float = 2.0) -> int | None:
        if self._thread is not None:
            self._thread.join(wait)
        return self._status

    def exit_description(self) -> str:
        if self._thread is not None and self._thread.is_alive():
            return "abandoned (in-process worker)"
        return f"worker thread ended with status {self._status}" if self._status is not None else "channel closed"
