"""The inference worker: a fresh child process that owns the interpreter.

``python -m edged.worker FD`` talks to the supervisor over the socket FD
(edged.protocol). It loads the model on the chosen accelerator, warms up,
then sheds privileges and installs the seccomp filter (edged.sandbox), and
serves frames that sit in shared-memory pool segments handed to it as fds.
"""
from __future__ import annotations

import dataclasses
import logging
import mmap
import os
import socket
import sys
import time
from typing import Any

from edged import protocol

logger = logging.getLogger("edged.worker")
HOOK = b"EDGED-TEST-FAULT:"
LOAD_HANG = "EDGED-TEST-HANG-ON-LOAD"  # with the hooks on, a model file named so never finishes loading


class ChannelLogHandler(logging.Handler):
    """Sends log records to the supervisor, which logs them as its own."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock

    def emit(self, record: logging.LogRecord) -> None:
        try:
            protocol.send(self.sock, protocol.Log(record.levelno, self.format(record)[:4000]))
        except OSError:
            pass


class Worker:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = protocol.Reader(sock)
        self.hooks = False  # EDGED_TEST_HOOKS=1: frames starting with HOOK act out a fault (tests only)
        self.segments: dict[int, mmap.mmap] = {}

    def init(self, msg: protocol.Init) -> None:
        from pathlib import Path

        from edged import accel, config, postprocess, preprocess

        cfg = config.parse(msg.config_text, msg.config_name, Path(msg.config_base))
        if msg.model_path:
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=msg.model_path))
        if msg.model_task:  # a model from an update brings its own task and labels
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, task=msg.model_task,
                                                                     labels=msg.model_labels))
        self.cfg = cfg
        if self.hooks and LOAD_HANG in Path(cfg.model.path).name:
            from edged import faults

            faults.act(self.sock, 0, "hang")  # a model load that never ends (a hung mount, a stuck delegate)
        choice = accel.choose(cfg, msg.coral_device, msg.accelerators)
        self.model = choice.model
        from edged import selftest

        st_frames = selftest.payloads(cfg.model.selftest.frames, self.model.input.shape, self.model.input.dtype)
        # what follows invokes the model (warm-up, self-test): the supervisor gives it twice the frame deadline
        protocol.send(self.sock, protocol.Loaded(choice.kind, 3 + len(st_frames)))
        self.labels = postprocess.load_labels(cfg.model.labels)
        self.task = cfg.model.task
        self.det_layout = postprocess.detection_outputs(self.model) if self.task == "detect" else None
        mean, std, source = preprocess.model_normalization(self.model.path, self.model.input,
                                                           cfg.model.mean, cfg.model.std)
        if self.model.input.dtype.startswith("float"):
            logger.info("float input: (pixel - %s) / %s, from %s", mean, std, source)
        # decoding one frame may take a tenth of the frame timeout: a costly frame is refused, not timed out
        self.pre = preprocess.Preprocessor(self.model.input, mean, std,
                                           decode_cpu_s=cfg.sandbox.frame_timeout_s / 10)
        self.post = postprocess
        self.model.warm_up()
        self._warm_decoders()
        self.batch_max, self.batch_wait = 1, 0.0
        want = msg.batch_max
        if want > 1:
            why = (f"models on the {choice.kind} accelerator run one frame per invoke" if choice.kind != "cpu"
                   else self.model.batch_refusal(want))
            if why:
                logger.warning("model.batch_max %d: batching off for %s: %s", want, self.model.name, why)
            else:
                self.batch_max, self.batch_wait = want, msg.batch_wait_ms / 1e3
                logger.info("batching up to %d frames, waiting at most %.1f ms", want, self.batch_wait * 1e3)
        self.selftest_frames = st_frames  # kept for the in-service self-test (protocol.SelfTest)
        report = selftest.run(self.model, self.pre, st_frames)  # the supervisor compares (edged.selftest.check)
        sandboxed = False
        if msg.sandbox:
            from edged import sandbox

            # every mapped pool segment keeps one fd (mmap dups it): leave room for all of them
            keep = [self.sock.fileno()]
            if choice.kind != "cpu":
                keep += sandbox.device_fds()  # the driver's open device nodes: closing them breaks it
            sandbox.harden(memory_limit_bytes=msg.memory_limit or None, max_open_files=msg.max_fds + len(keep),
                           keep_fds=keep, user=self.cfg.sandbox.user)
            extra: tuple[str, ...] = sandbox.GPU_EXTRA if choice.kind == "gpu" else ()
            if self.batch_max > 1:
                extra += sandbox.BATCH_EXTRA  # waiting for a batch to fill: poll on the control socket
            sandbox.install_filter(msg.sandbox_mode, extra=extra)
            sandboxed = True
        profile = ("gpu" if choice.kind == "gpu" else "default") if sandboxed else "off"
        protocol.send(self.sock, protocol.Ready(model=self.model.describe(), accelerator=choice.report(),
                                                task=self.task, batch=self.batch_max, sandboxed=sandboxed,
                                                sandbox_profile=profile, selftest=report))

    def _warm_decoders(self) -> None:
        """Decode one tiny image of each format so no decoder code loads lazily under seccomp."""
        import io

        import numpy as np
        from PIL import Image

        if self.pre.layout is None:
            return
        dst = np.zeros(self.model.input.shape, self.model.input.dtype)
        for fmt in ("JPEG", "PNG", "BMP"):
            buf = io.BytesIO()
            Image.new("RGB", (17, 13), (10, 20, 30)).save(buf, fmt)
            self.pre.fill(dst, memoryview(buf.getvalue()))

    def next(self, timeout: float | None = None) -> protocol.Message | None:
        """The supervisor's next message (None: none began within timeout)."""
        raw = self.reader.read() if timeout is None else self.reader.read_within(timeout)
        return None if raw is None else protocol.decode(raw, protocol.TO_WORKER)

    def serve(self) -> None:
        while True:
            msg = self.next()
            assert msg is not None
            if isinstance(msg, protocol.FrameJob) and self.batch_max > 1:
                if not self.gather([msg]):
                    return
            elif not self.handle(msg):
                return

    def gather(self, batch: list[protocol.FrameJob]) -> bool:
        """Collect frames already sent, or sent within batch_wait, up to batch_max; run them; False on stop."""
        deadline = time.monotonic() + self.batch_wait
        go_on = True
        while len(batch) < self.batch_max:
            msg = self.next(max(0.0, deadline - time.monotonic()))
            if msg is None:
                break
            if isinstance(msg, protocol.FrameJob):
                batch.append(msg)
            elif not self.handle(msg):
                go_on = False
                break
        if len(batch) == 1:
            self.frame(batch[0])
        else:
            self.frames(batch)
        return go_on

    def handle(self, msg: protocol.Message) -> bool:
        """One message; False when the supervisor said stop."""
        if isinstance(msg, protocol.FrameJob):
            self.frame(msg)
        elif isinstance(msg, protocol.SegmentAdd):
            fd = self.reader.take_fd()
            try:  # read-only: the pool hands out sealed, read-only fds (edged.memfd)
                self.segments[msg.id] = mmap.mmap(fd, msg.size, access=mmap.ACCESS_READ)
            finally:
                os.close(fd)
        elif isinstance(msg, protocol.SegmentDrop):
            seg = self.segments.pop(msg.id, None)
            if seg is not None:
                seg.close()
        elif isinstance(msg, protocol.Ping):
            protocol.send(self.sock, protocol.Pong(msg.n))
        elif isinstance(msg, protocol.SelfTest):
            from edged import selftest  # loaded at init, before the filter

            protocol.send(self.sock, protocol.SelfTestReport(selftest.run(self.model, self.pre, self.selftest_frames)))
        elif isinstance(msg, protocol.Stop):
            return False
        return True

    def frame(self, msg: protocol.FrameJob) -> None:
        seq = msg.seq
        t0 = time.perf_counter()
        try:
            self.model.set_batch(1)
            dst = self.model.input_view()
            try:
                self.fill(dst, msg)
            finally:
                del dst
            t1 = time.perf_counter()
            self.model.invoke()
            t2 = time.perf_counter()
            body = self.postprocess(self.model)
            protocol.send(self.sock, protocol.Result(seq, body, round((t1 - t0) * 1e3, 3), round((t2 - t1) * 1e3, 3)))
        except Exception as exc:  # top of the frame: answer it
            self.refuse(seq, exc)

    def frames(self, batch: list[protocol.FrameJob]) -> None:
        """Several frames in one invoke; a bad frame is answered alone and its row left blank."""
        from edged.runtime import RowView

        t0 = time.perf_counter()
        try:
            self.model.set_batch(len(batch))
        except Exception as exc:
            for msg in batch:
                self.refuse(msg.seq, exc)
            return
        rows: list[tuple[int, protocol.FrameJob, float]] = []
        dst = self.model.input_view()
        try:
            for row, msg in enumerate(batch):
                t = time.perf_counter()
                try:
                    self.fill(dst[row : row + 1], msg)
                    rows.append((row, msg, time.perf_counter() - t))
                except Exception as exc:
                    dst[row : row + 1] = 0
                    self.refuse(msg.seq, exc)
        finally:
            del dst
        if not rows:
            return
        t1 = time.perf_counter()
        try:
            self.model.invoke()
        except Exception as exc:
            for _row, msg, _p in rows:
                self.refuse(msg.seq, exc)
            return
        inv = round((time.perf_counter() - t1) * 1e3, 3)
        wait = (t1 - t0) - sum(p for _r, _m, p in rows)  # resize and the other rows' decoding
        for row, msg, p in rows:
            try:
                body = self.postprocess(RowView(self.model, row))
            except Exception as exc:
                self.refuse(msg.seq, exc)
                continue
            protocol.send(self.sock, protocol.Result(msg.seq, body, round((p + wait) * 1e3, 3), inv, len(batch)))

    def fill(self, dst: Any, msg: protocol.FrameJob) -> None:
        seg = self.segments[msg.segment]
        view = memoryview(seg)[msg.offset : msg.offset + msg.length]
        if self.hooks and bytes(view[: len(HOOK)]) == HOOK:
            from edged import faults  # imported before the filter (run_channel): no file is opened here

            faults.act(self.sock, msg.seq, bytes(view[len(HOOK) :]).decode("ascii", "replace"),
                       os.path.basename(self.model.path).removesuffix(".tflite"))
        try:
            self.pre.fill(dst, view, msg.content_type)
        finally:
            view.release()

    def postprocess(self, model: Any) -> dict[str, Any]:
        m = self.cfg.model
        return self.post.body(model, self.task, self.labels, m.top_k, m.score_threshold, self.det_layout)

    def refuse(self, seq: int, exc: Exception) -> None:
        """Answer one frame with an error; never formats a traceback (it would read files: SIGSYS)."""
        from edged.errors import EdgedError, FrameError

        if isinstance(exc, FrameError):
            code, text = exc.code, exc.message
        else:
            code, text = (
                "inference_failed",
                f"{type(exc).__name__}: {exc}" if not isinstance(exc, EdgedError) else str(exc),
            )
        protocol.send(self.sock, protocol.Result(seq, error_code=code, error_message=text[:300]))


def run_channel(sock: socket.socket, in_process: bool = False) -> int:
    """Serve the supervisor on `sock` until it says stop or goes away; the exit status.

    In a worker process the log records travel over the channel and the init
    message sets the level; in process (a thread of the daemon, sandbox off)
    the daemon's own logging already applies.
    """
    root = logging.getLogger()
    handler = None
    if not in_process:
        handler = ChannelLogHandler(sock)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        root.addHandler(handler)
    w = Worker(sock)
    w.hooks = os.environ.get("EDGED_TEST_HOOKS") == "1" and not in_process
    if w.hooks:
        from edged import faults  # noqa: F401  (loaded now: under the filter no module can be read)
    try:
        init = w.next()
        if not isinstance(init, protocol.Init):
            return 2
        if not in_process:
            root.setLevel(init.log_level)
        try:
            w.init(init)
        except Exception as exc:  # top of the worker: every load failure goes back as one line
            from edged.errors import ConfigError, ModelError

            kind = "model" if isinstance(exc, (ModelError, ConfigError)) else "internal"
            protocol.send(sock, protocol.Fatal(kind, (str(exc) or type(exc).__name__)[:4000]))
            return 3
        w.serve()
    except (protocol.ProtocolError, OSError):
        return 0  # the supervisor went away: nothing left to serve
    finally:
        for seg in w.segments.values():
            try:
                seg.close()
            except BufferError:  # a view still alive (a frame cut short): the mapping goes with the worker
                pass
        w.segments.clear()
    return 0


def main(argv: list[str]) -> int:
    return run_channel(socket.socket(fileno=int(argv[1])))


if __name__ == "__main__":
    os._exit(main(sys.argv) if len(sys.argv) == 2 else 2)
