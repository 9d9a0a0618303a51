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


class ChannelLogHandler(logging.Handler):
    """Sends log records to the supervisor, which logs them as its own."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock

    def emit(self, record: logging.LogRecord) -> None:
        try:
            protocol.send(self.sock, {"t": "log", "lvl": record.levelno, "msg": self.format(record)})
        except OSError:
            pass


class Worker:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = protocol.Reader(sock)
        self.segments: dict[int, mmap.mmap] = {}

    def init(self, msg: dict[str, Any]) -> None:
        from edged import accel, config, postprocess, preprocess

        cfg = config.parse(msg["config_text"], msg["config_name"], __import__("pathlib").Path(msg["config_base"]))
        if msg.get("model_path"):
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=msg["model_path"]))
        self.cfg = cfg
        choice = accel.choose(cfg, msg.get("coral_device"))
        self.model = choice.model
        self.labels = postprocess.load_labels(cfg.model.labels)
        self.task = cfg.model.task
        self.det_layout = postprocess.detection_outputs(self.model) if self.task == "detect" else None
        self.pre = preprocess.Preprocessor(self.model.input, cfg.model.mean, cfg.model.std)
        self.post = postprocess
        self.model.warm_up()
        self._warm_decoders()
        info = {"model": self.model.describe(), "accelerator": choice.report(), "task": self.task}
        sandboxed = False
        if msg.get("sandbox"):
            from edged import sandbox

            # every mapped pool segment keeps one fd (mmap dups it): leave room for all of them
            keep = [self.sock.fileno()]
            if choice.kind in ("gpu", "coral"):
                keep += sandbox.device_fds()  # the driver's open device nodes: closing them breaks it
            sandbox.harden(memory_limit_bytes=int(msg["memory_limit"]) if msg.get("memory_limit") else None,
                           max_open_files=int(msg.get("max_fds", 256)) + len(keep), keep_fds=keep)
            sandbox.install_filter(msg.get("sandbox_mode", "kill"),
                                   extra=sandbox.GPU_EXTRA if choice.kind == "gpu" else ())
            sandboxed = True
        info["sandboxed"] = sandboxed
        info["sandbox_profile"] = ("gpu" if choice.kind == "gpu" else "default") if sandboxed else "off"
        protocol.send(self.sock, {"t": "ready", **info})

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

    def serve(self) -> None:
        while True:
            msg = self.reader.read()
            t = msg["t"]
            if t == "f":
                self.frame(msg)
            elif t == "seg":
                fd = self.reader.take_fd()
                self.segments[int(msg["id"])] = mmap.mmap(fd, int(msg["size"]))
                os.close(fd)
            elif t == "unseg":
                seg = self.segments.pop(int(msg["id"]), None)
                if seg is not None:
                    seg.close()
            elif t == "ping":
                protocol.send(self.sock, {"t": "pong", "n": msg.get("n")})
            elif t == "stop":
                return

    def frame(self, msg: dict[str, Any]) -> None:
        from edged.errors import EdgedError, FrameError

        seq = msg["s"]
        t0 = time.perf_counter()
        try:
            seg = self.segments[int(msg["g"])]
            off, n = int(msg["o"]), int(msg["n"])
            view = memoryview(seg)[off : off + n]
            try:
                dst = self.model.input_view()
                self.pre.fill(dst, view, msg.get("c"))
                del dst
            finally:
                view.release()
            t1 = time.perf_counter()
            self.model.invoke()
            t2 = time.perf_counter()
            if self.task == "classify":
                body = self.post.classify(self.model, self.labels, self.cfg.model.top_k)
            elif self.task == "detect":
                body = self.post.detect(self.model, self.labels, self.cfg.model.score_threshold, self.det_layout)
            else:
                body = self.post.raw(self.model)
            protocol.send(self.sock, {"t": "r", "s": seq, "b": body, "p": round((t1 - t0) * 1e3, 3),
                                      "i": round((t2 - t1) * 1e3, 3)})
        except FrameError as exc:
            protocol.send(self.sock, {"t": "r", "s": seq, "e": {"code": exc.code, "message": exc.message}})
        except Exception as exc:  # top of the frame: answer it; formatting a traceback would read files (SIGSYS)
            text = f"{type(exc).__name__}: {exc}" if not isinstance(exc, EdgedError) else str(exc)
            protocol.send(self.sock, {"t": "r", "s": seq, "e": {"code": "inference_failed", "message": text[:300]}})


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
    try:
        init = w.reader.read()
        if not in_process:
            root.setLevel(int(init.get("log_level", logging.INFO)))
        try:
            w.init(init)
        except Exception as exc:  # top of the worker: every load failure goes back as one line
            from edged.errors import ConfigError, ModelError

            kind = "model" if isinstance(exc, (ModelError, ConfigError)) else "internal"
            protocol.send(sock, {"t": "fatal", "kind": kind, "message": str(exc) or type(exc).__name__})
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
