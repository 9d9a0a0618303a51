"""Model updates over MQTT: taking a bundle from P/model/update, applying it, probation, rollback.

The flow of one bundle, on the one "model-update" thread (the I/O loop only
hands the payload over; at most one waits, a newer one replaces it):

1. edged.bundle.unpack: size cap, ed25519 signature over the whole payload,
   then the body (bounded inflate, safe member names, manifest).
2. Refusals that need the store: the model already serving (same sha256: a
   no-op), a model rolled back before, a serial not greater than the serving one.
3. edged.modelstore.write_version: the files, atomically, as a new version.
4. Self-test on a fresh sandboxed worker on the configured accelerators (a
   candidate beside the serving workers, edged.switching.Switcher.candidate):
   the known-answer self-test of edged.selftest (expected outputs recorded on
   the CPU by the model's sha256, so on a CPU-only device it proves the model
   loads and answers, not that it is right), then the bundle's own frames
   through the whole frame path, checked against the bundle's expected answers.
   The candidate that passed is the worker that then serves.
5. The store's pointer moves (commit), then edged.switching swaps the serving
   workers as a reload does (fresh workers first, the old ones retire after
   their in-flight frames: no frame lost, none answered twice).
6. P/model/state (retained) and P/events say what happened; probation starts:
   a worker of the new model that dies or hangs within model.update.probation_s
   rolls the model back (the store's previous version, or the config's model).

Manual rollback (`edged model rollback`) comes over the status socket and runs
on the same thread. With model.update.enabled false nothing is subscribed and
the store is not read: model.path serves.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from edged import bundle, faults, protocol
from edged.config import Config
from edged.errors import EdgedError, ModelError, WorkerError
from edged.modelstore import ModelStore, StoreError, sha256_file
from edged.supervision import Workers
from edged.switching import SelftestFailed
from edged.workerinit import ModelSpec
from edged.workers import WorkerHandle

logger = logging.getLogger(__name__)

SELFTEST_SEGMENT = 1 << 30  # a segment id the pool never hands out
CONTENT_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "bmp": "image/bmp",
                 "raw": "application/octet-stream"}

Publish = Callable[[str, bytes, int, bool], bool]


def spec_of(entry: dict[str, Any]) -> ModelSpec | None:
    return None if entry.get("config") else ModelSpec(entry["path"], entry.get("labels"), entry["task"])


class ModelUpdates:
    def __init__(self, cfg: Config, workers: Workers, publish: Publish) -> None:
        self.cfg = cfg
        self.workers = workers
        self.publish = publish
        self.prefix = cfg.prefix
        u = cfg.model.update
        self.enabled = u.enabled
        self.max_bytes = int(u.max_mb * (1 << 20))
        self.key = bundle.load_public_key(u.public_key, f"{cfg.source} model.update.public_key") \
            if u.enabled and u.public_key else None
        m = cfg.model
        self.store = ModelStore(cfg.state_dir, u.keep, {
            "sha256": sha256_file(m.path), "name": cfg.model_name, "task": m.task, "path": m.path,
            "labels": m.labels, "since": None})
        self._jobs: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._pending: bytes | None = None  # the newest bundle not yet taken by the thread
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._logged_off = False
        self.probation: dict[str, Any] | None = None  # {"until", "generation", "serial"}
        self.applied: dict[str, Any] | None = None  # timings of the last apply
        self.busy = False

    @property
    def topic(self) -> str:
        return f"{self.prefix}/model/update"

    # ---- start ----------------------------------------------------------------------------------------------
    def open(self) -> ModelSpec | None:
        """Before the workers start: the store's current model (None: the config's)."""
        if not self.enabled:
            logger.info("model updates are off (model.update.enabled: false): %s is not read", self.topic)
            return None
        try:
            self.store.open()
        except StoreError as exc:
            from edged.errors import ConfigError

            raise ConfigError(f"{self.cfg.source} state_dir: {exc}") from None
        cur = self.store.current
        if not cur.get("config"):
            logger.info("model store: serving serial %s (%s, sha256 %s...)", cur["serial"], cur["name"],
                        cur["sha256"][:12])
        return spec_of(cur)

    def start_failed(self, exc: EdgedError) -> None:
        """The store's current model did not load at start: back to the previous one (the caller starts again)."""
        failed = self.store.current
        logger.warning("model store: serial %s does not load (%s): rolling back", failed.get("serial"), exc)
        self.store.rollback(lambda f, b: self._last(f, "rolled_back", f"did not load at start: {exc}"))

    def start(self) -> None:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="model-update", daemon=True)
            self._thread.start()

    def connected(self) -> None:
        """On the I/O loop, at each connect: the retained state again (it may have changed while away)."""
        if self.enabled:
            self._publish_state()

    # ---- messages in --------------------------------------------------------------------------------------------
    def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        """On the I/O loop: hand the payload to the update thread; only the newest one waits."""
        if not self.enabled:
            if not self._logged_off:
                self._logged_off = True
                logger.warning("a message on %s ignored: model updates are off", topic)
            return
        if not payload:  # a retained bundle being cleared
            logger.info("model update: empty message on %s (a retained bundle cleared): ignored", topic)
            return
        with self._lock:
            replaced = self._pending is not None
            self._pending = bytes(payload)
        if replaced:
            logger.warning("model update: a newer bundle arrived before the last was taken; the older is dropped")
        else:
            self._jobs.put(("bundle", None))
        logger.info("model update: %d bytes on %s%s", len(payload), topic, " (retained)" if retained else "")

    def request_rollback(self, timeout: float = 120.0) -> dict[str, Any]:
        """From the status socket: roll back now; wait for the answer."""
        if not self.enabled:
            return {"ok": False, "error": "model updates are off (model.update.enabled: false)"}
        done: queue.Queue[dict[str, Any]] = queue.Queue(1)
        self._jobs.put(("rollback", done))
        try:
            return done.get(timeout=timeout)
        except queue.Empty:
            return {"ok": False, "error": f"no answer within {timeout:.0f} s; see the daemon's log"}

    # ---- the update thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            kind, arg = self._jobs.get()
            self.busy = True
            try:
                if kind == "bundle":
                    self._apply_pending()
                elif kind == "rollback":
                    arg.put(self.rollback("asked by edged model rollback"))
                elif kind == "probation":
                    self.rollback(arg, automatic=True)
            except Exception:  # top of the update thread: what serves keeps serving
                logger.exception("model update failed")
            finally:
                self.busy = False

    def _apply_pending(self) -> None:
        """The newest bundle, taken and applied in this frame: once it returns, nothing holds the payload
        (a loop variable in _run would keep a refused 5 MB bundle in RSS until the next one came)."""
        with self._lock:
            payload, self._pending = self._pending, None
        if payload is not None:
            self.apply(payload)

    def apply(self, payload: bytes) -> None:
        t0 = time.monotonic()
        try:
            b = bundle.unpack(payload, self.key, self.max_bytes)  # type: ignore[arg-type]
        except bundle.BundleError as exc:
            # nothing in it can be trusted (no serial), but which payload it was lets `edged model push` know
            self._reject(None, exc.kind, str(exc), hashlib.sha256(payload).hexdigest())
            return
        cur = self.store.current
        if b.sha256 == cur.get("sha256"):
            logger.info("model update: serial %d is the model already serving (sha256 %s...): nothing to do",
                        b.serial, b.sha256[:12])
            if (self.store.last_update or {}).get("bundle") != b.digest:  # say so once, not at every reconnect
                last = self._last(b, "applied", "already serving this model (no-op)")
                self.store.record(last)
                self._publish_state()
            return
        if b.digest in self.store.refused:
            self._reject(b, "rolled_back_before", "this bundle was rolled back on this device before "
                                                  "(push it again with a new serial to retry)")
            return
        if b.serial <= self.store.serial():
            self._reject(b, "serial", f"serial {b.serial} is not greater than the serving serial "
                                      f"{self.store.serial()} (replay?)")
            return
        try:
            entry = self.store.write_version(b)
        except StoreError as exc:
            self._reject(b, "store", str(exc))
            return
        spec = spec_of(entry)
        assert spec is not None
        t_written = time.monotonic()
        why, probe = self._probe(spec, b)
        if why is not None or probe is None:
            self._reject(b, *(why or ("load", "no worker")))  # its record sweeps the version no pointer names
            return
        t_tested = time.monotonic()
        try:
            self.store.commit(entry, self._last(b, "applied", None))
        except StoreError as exc:
            probe.stop()
            self._reject(b, "store", str(exc))
            return
        try:
            self.workers.switch.swap_model(spec, [probe])  # the tested worker serves: no second load
        except (ModelError, WorkerError) as exc:  # passed the probe, then failed: back to what served
            logger.error("model update: serial %d passed its self-test but its workers did not start: %s",
                         b.serial, exc)
            failed = f"workers did not start: {exc}"  # bound here: `exc` is gone once the except block ends
            self.store.rollback(lambda f, bk: self._last(b, "rejected", failed))
            self._event("model_rejected", b, reason=failed, kind="load")
            self._publish_state()
            return
        faults.kill_point("after_switch")
        t_swapped = time.monotonic()
        self.applied = {"serial": b.serial, "verify_write_s": round(t_written - t0, 3),
                        "selftest_s": round(t_tested - t_written, 3), "swap_s": round(t_swapped - t_tested, 3),
                        "total_s": round(t_swapped - t0, 3)}
        probation = self.cfg.model.update.probation_s
        if probation > 0:
            self.probation = {"until": time.monotonic() + probation, "generation": self.workers.generation,
                              "serial": b.serial}
        logger.info("model update: serial %d (%s) applied in %.2f s (verify+write %.2f, self-test %.2f, swap %.2f); "
                    "probation %.0f s", b.serial, b.name, t_swapped - t0, t_written - t0, t_tested - t_written,
                    t_swapped - t_tested, probation)
        self._event("model_applied", b, previous=self.store.previous[0].get("serial") if self.store.previous else None)
        self._publish_state()

    def _probe(self, spec: ModelSpec, b: bundle.Bundle) -> tuple[tuple[str, str] | None, WorkerHandle | None]:
        """A fresh sandboxed worker on the new model, beside the serving ones: does it load, and answer its
        self-test? ((kind, reason), None) if not; (None, the worker) if so, to serve as it is."""
        cfg = self.workers.cfg
        got: queue.Queue[Any] = queue.Queue()
        try:  # loads, and passes the known-answer self-test (edged.selftest: the CPU run is the reference)
            h = self.workers.switch.candidate(spec)
        except SelftestFailed as exc:
            return ("selftest", str(exc)), None
        except (ModelError, WorkerError) as exc:
            return ("load", f"the model does not load: {exc}"), None
        h.probe_sink = got.put
        passed = False
        fd = -1
        try:
            frames: list[tuple[bytes, str, dict[str, Any] | None]] = []
            for name, data, expect in b.selftest:  # the bundle's own frames and expected answers, end to end
                frames.append((data, CONTENT_TYPES[name.rsplit(".", 1)[1]], expect))
            if not frames:
                passed = True
                return None, h
            total = sum(len(f[0]) for f in frames)
            size = max(4096, (total + 4095) // 4096 * 4096)
            fd = os.memfd_create("edged-selftest", os.MFD_CLOEXEC)
            os.ftruncate(fd, size)
            os.pwrite(fd, b"".join(f[0] for f in frames), 0)
            h.send(protocol.SegmentAdd(SELFTEST_SEGMENT, size), (fd,))
            off = 0
            for seq, (data, ctype, _e) in enumerate(frames, 1):
                h.send(protocol.FrameJob(seq, SELFTEST_SEGMENT, off, len(data), ctype))
                off += len(data)
            deadline = time.monotonic() + cfg.sandbox.frame_timeout_s * len(frames) + 5
            answers: dict[int, protocol.Result] = {}
            while len(answers) < len(frames):
                try:
                    msg = got.get(timeout=max(0.01, deadline - time.monotonic()))
                except queue.Empty:
                    return ("selftest", f"the self-test got no answer within {cfg.sandbox.frame_timeout_s:g} s a "
                                        "frame"), None
                if msg is None:
                    return ("selftest", f"the worker {h.exit_description()} during the self-test"), None
                if isinstance(msg, protocol.Result):
                    answers[msg.seq] = msg
            for seq, (_d, _c, want) in enumerate(frames, 1):
                r = answers[seq]
                if r.error_code:
                    return ("selftest", f"self-test frame {seq} answered {r.error_code}: {r.error_message}"), None
                why = bundle.check_expect(b.task, r.body or {}, want) if want else None
                if why:
                    return ("selftest", f"self-test frame {seq}: {why}"), None
            logger.info("model update: serial %d passed the bundle's own self-test (%d frame(s))", b.serial,
                        len(frames))
            h.send(protocol.SegmentDrop(SELFTEST_SEGMENT))
            passed = True
            return None, h
        finally:
            if fd >= 0:
                os.close(fd)
            if not passed:
                h.stop(grace=2.0)

    # ---- probation and rollback --------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Main loop: a worker of the model on probation died or was killed: roll it back."""
        p = self.probation
        if p is None:
            return
        if now > p["until"]:
            logger.info("model update: serial %s passed its probation", p["serial"])
            self.probation = None
            return
        if self.workers.generation != p["generation"]:
            self.probation = None  # a reload or rollback since: that generation is not ours to judge
            return
        for s in self.workers.slots:
            if s.restart_times or (s.handle is not None and s.handle.state == "dead"):
                self.probation = None
                reason = f"worker {s.index} {s.last_exit or 'failed'} within probation_s"
                logger.error("model update: serial %s: %s; rolling back", p["serial"], reason)
                self._jobs.put(("probation", reason))
                return

    def rollback(self, reason: str, automatic: bool = False) -> dict[str, Any]:
        """The previous version serves again (the store first, so a cut here still leaves a whole model)."""
        if not self.store.previous:
            return {"ok": False, "error": "nothing to roll back to: the config's model is serving"}
        failed = self.store.current
        self.probation = None
        try:
            back = self.store.rollback(lambda f, bk: self._last(f, "rolled_back", reason))
        except StoreError as exc:
            return {"ok": False, "error": str(exc)}
        assert back is not None
        try:
            self.workers.switch.swap_model(spec_of(back))
        except (ModelError, WorkerError) as exc:
            logger.error("rollback to serial %s: its workers did not start: %s", back.get("serial"), exc)
            return {"ok": False, "error": f"the previous model's workers did not start: {exc}"}
        logger.warning("model rolled back from serial %s to serial %s (%s): %s", failed.get("serial"),
                       back.get("serial"), back.get("name"), reason)
        self._event("rolled_back", None, serial=failed.get("serial"), sha256=failed.get("sha256"),
                    to_serial=back.get("serial"), reason=reason, automatic=automatic)
        self._publish_state()
        return {"ok": True, "from": failed.get("serial"), "to": back.get("serial"), "name": back.get("name")}

    # ---- what we say -------------------------------------------------------------------------------------------
    def _last(self, b: Any, result: str, reason: str | None) -> dict[str, Any]:
        if isinstance(b, dict):
            serial, sha, digest = b.get("serial"), b.get("sha256"), None
        else:
            serial, sha, digest = (b.serial, b.sha256, b.digest) if b is not None else (None, None, None)
        return {"serial": serial, "sha256": sha, "bundle": digest, "result": result, "reason": reason,
                "ts": round(time.time(), 3)}

    def _reject(self, b: bundle.Bundle | None, kind: str, reason: str, digest: str | None = None) -> None:
        logger.warning("model update rejected (%s): %s", kind, reason)
        last = self._last(b, "rejected", reason)
        last["kind"] = kind
        if digest:
            last["bundle"] = digest
        try:
            self.store.record(last)
        except StoreError as exc:
            logger.error("%s", exc)
            self.store.last_update = last
        self._event("model_rejected", b, reason=reason, kind=kind)
        self._publish_state()

    def _event(self, name: str, b: bundle.Bundle | None, **details: Any) -> None:
        ev: dict[str, Any] = {"event": name, "ts": round(time.time(), 3)}
        if b is not None:
            ev.update(serial=b.serial, sha256=b.sha256, name=b.name)
        ev.update(details)
        self.publish(f"{self.prefix}/events", json.dumps(ev).encode(), 1, False)

    def _publish_state(self) -> None:
        self.publish(f"{self.prefix}/model/state", json.dumps(self.store.state_doc()).encode(), 1, True)

    def status(self) -> dict[str, Any]:
        """For the status JSON (`model_update`)."""
        if not self.enabled:
            return {"enabled": False}
        p = self.probation
        return {"enabled": True, **self.store.state_doc(), "busy": self.busy, "warning": self.store.warning,
                "probation_left_s": round(max(0.0, p["until"] - time.monotonic()), 1) if p else None,
                "last_apply_timing": self.applied}
