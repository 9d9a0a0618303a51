"""Probes of set-aside accelerators, and moving the workers back to one that passes.

A set-aside kind (edged.health) is probed when its time comes: a fresh
sandboxed worker, in no slot and taking no frames, loads the model on it and
runs the self-test beside the serving workers, on a thread of its own (never
on the main loop, whose timers keep running). When it passes, fresh workers
on that kind, each self-tested, replace the serving ones as a reload does: the
old ones take no new frames and retire when their frames are answered, so no
frame is lost or answered twice. A failed probe doubles the wait, up to
`accelerator.health.probe_max_s`.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from edged import config, selftest
from edged.errors import EdgedError, ModelError

if TYPE_CHECKING:
    from edged.supervision import Workers
    from edged.workers import WorkerHandle

logger = logging.getLogger(__name__)

PROBE_INDEX = 99  # the index a probe worker logs under (it holds no slot)


class Prober:
    """One probe at a time, for the Workers it serves (it uses their spawn, self-test and slots, under their lock)."""

    def __init__(self, workers: Workers) -> None:
        self.w = workers
        self._thread: threading.Thread | None = None

    def due(self, now: float) -> None:
        """Start a probe of the best set-aside kind that is due (one at a time, on a thread of its own)."""
        w = self.w
        if w.stopping or (self._thread is not None and self._thread.is_alive()):
            return
        serving = w.health.current()
        due = [a.kind for a in w.health.due(now) if a.kind in w.health.preferred_over(serving)]
        if due:
            self._thread = threading.Thread(target=self._run, args=(due[0],), name=f"probe-{due[0]}", daemon=True)
            self._thread.start()

    def _run(self, kind: str) -> None:
        """A fresh sandboxed worker loads the model on `kind` and self-tests, in no slot; on a pass, fail back."""
        w = self.w
        cfg, text, expected, gen = w.cfg, w.config_text, w.expected, w.generation
        logger.info("probing accelerator %s", kind)
        ok, why = False, ""
        try:
            h = w._spawn(PROBE_INDEX, cfg, text, [kind])
            try:
                v = w.judge.verdict(h, cfg, expected) if expected is not None else None
                ok, why = v is None or v.passed, v.reason if v is not None else ""
            finally:
                h.stop()
            if ok:
                ok, why = self._move_back(kind, cfg, text, expected, gen)
        except EdgedError as exc:
            why = str(exc)
        except Exception as exc:  # top of the probe thread: a bug here must not stop later probes
            logger.exception("probe of %s failed", kind)
            why = f"{type(exc).__name__}: {exc}"
        if not ok:
            with w.cond:
                a = w.health.probe_failed(kind)
            if a is not None:
                logger.warning("probe of %s failed (%s); next probe in %.0f s", kind, why, a.interval)
        w.wake()

    def _move_back(self, kind: str, cfg: config.Config, text: str, expected: selftest.Expected | None,
                   gen: int) -> tuple[bool, str]:
        """Fresh workers on `kind`, each self-tested, replace the serving ones as a reload does (no frame lost)."""
        w = self.w
        fresh: list[WorkerHandle] = []
        try:
            for i in range(cfg.worker_count):
                h = w._spawn(i, cfg, text, [kind])
                fresh.append(h)
                v = w.judge.verdict(h, cfg, expected) if expected is not None else None
                if v is not None and not v.passed:
                    raise ModelError(f"self-test failed: {v.reason}")
        except EdgedError as exc:
            for h in fresh:
                h.stop()
            return False, f"moving back failed: {exc}"
        with w.cond:
            if w.stopping or gen != w.generation or w.cfg is not cfg:
                stale, old = fresh, []
            else:
                stale = []
                a = w.health.restore(kind)
                old = [s.handle for s in w.slots if s.handle is not None]
                for h in old:
                    h.retiring = True
                for slot, h in zip(w.slots, fresh, strict=False):
                    slot.handle, slot.next_start = h, None
                w._adopt(fresh[0])
                w.cond.notify_all()
        for h in stale:
            h.stop()
        if stale:
            return False, "the config was reloaded during the probe"
        since = round(time.time() - a.since, 1) if a is not None else None
        logger.warning("accelerator %s restored after a passing probe (set aside %s s); %d worker(s) moved back",
                       kind, since, len(fresh))
        w.on_event({"event": "restored", "ts": round(time.time(), 3), "accelerator": kind, "model": cfg.model_name,
                    "set_aside_s": since})
        threading.Thread(target=w._retire, args=(old,), name="retire", daemon=True).start()
        return True, ""
