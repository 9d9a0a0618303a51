"""Replacing the serving workers as a whole: a config reload, a model swap, and the candidates a swap starts from.

Each switch starts fresh workers on the new config or model and self-tests
every one before any serves; only then do they take the slots, while the old
workers take no new frames and retire when their frames are answered, so no
frame is lost or answered twice. A fresh worker that does not start or pass
stops them all and the old ones keep serving. One switch at a time. A reload
reads the config file anew; its mqtt and status sections take effect at the
next restart. A model swap (edged.updates) serves a model from the update store
instead of the config's, and a reload keeps serving it.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from edged import config, selftest
from edged.errors import EdgedError, ModelError
from edged.health import Health
from edged.workerinit import ModelSpec, read_config_text, with_model

if TYPE_CHECKING:
    from edged.supervision import Workers
    from edged.workers import WorkerHandle

logger = logging.getLogger(__name__)


class SelftestFailed(ModelError):
    """A worker of a new model loaded but its self-test answered wrong (edged.updates: a `selftest` rejection)."""


class Switcher:
    """Reload and model swap for the Workers it serves (it uses their spawn, self-test and slots, under their lock)."""

    def __init__(self, workers: Workers) -> None:
        self.w = workers
        self._lock = threading.Lock()  # one reload or model swap at a time

    def reload(self) -> config.Config | None:
        """Load the config file anew in fresh workers, then retire the old ones: no frame lost.

        Returns the new config, or None when the reload failed and the old workers keep serving.
        """
        with self._lock:
            return self._reload()

    def _reload(self) -> config.Config | None:
        w = self.w
        try:
            new_cfg = config.load(w.cfg.source)
            config_model = new_cfg.model
            new_cfg = with_model(new_cfg, w.model)  # a model from an update keeps serving
            for warning in new_cfg.warnings:
                logger.warning("%s", warning)
            text = read_config_text(new_cfg)
            if new_cfg.mqtt != w.cfg.mqtt or new_cfg.status != w.cfg.status:
                logger.warning("reload: mqtt and status changes take effect at the next restart")
                new_cfg = dataclasses.replace(new_cfg, mqtt=w.cfg.mqtt, status=w.cfg.status)
            w.generation += 1
            sha, expected = w.judge.expected_for(new_cfg)
            kinds = [k for k in w.health.candidates() if k in new_cfg.accelerator.prefer] or None
            fresh: list[WorkerHandle] = []
            try:
                expected = self._start_tested(fresh, new_cfg, text, kinds, sha, expected, fail=ModelError)
            except EdgedError:
                for h in fresh:
                    h.stop()
                raise
        except EdgedError as exc:
            logger.error("reload failed, still serving the previous model: %s", exc)
            return None

        def commit() -> None:
            w.cfg, w.config_text, w.config_model = new_cfg, text, config_model
            w.model_sha, w.expected = sha, expected
            if new_cfg.accelerator.prefer != w.health.prefer or new_cfg.accelerator.health != w.health.cfg:
                w.health = Health(new_cfg.accelerator.prefer, new_cfg.accelerator.health)

        self._take_over(fresh, new_cfg, "reload", commit)
        return new_cfg

    def candidate(self, model: ModelSpec | None) -> WorkerHandle:
        """A started, self-tested worker on `model` in no slot (it takes no frames); its replies go to
        h.probe_sink. swap_model(model, [h]) makes it a serving worker; else the caller stops it.
        A model that does not load: ModelError; one whose self-test fails: SelftestFailed."""
        w = self.w
        cfg = with_model(dataclasses.replace(w.cfg, model=w.config_model), model)
        sha, expected = w.judge.expected_for(cfg)
        kinds = w.health.candidates() or None
        h = w._spawn(0, cfg, w.config_text, kinds, model=model)
        try:
            if not w.judge.usable(expected, h, cfg):
                expected = w.judge.reference(h, cfg, w.config_text, sha, model)
            assert expected is not None  # usable() or reference() gave one
            v = w.judge.verdict(h, cfg, expected)
        except BaseException:
            h.stop()
            raise
        if not v.passed:
            h.stop()
            raise SelftestFailed(f"the self-test on {h.accelerator} failed: {v.reason} (expected outputs from "
                                 f"{expected.source})")
        h.candidate_expected = (sha, expected)
        return h

    def swap_model(self, model: ModelSpec | None, started: list[WorkerHandle] | None = None) -> None:
        """Serve `model` (None: the config's) as a reload does: fresh self-tested workers first, then the old
        ones retire. `started`: candidates already on this model (candidate()), used first. Raises
        ModelError/WorkerError when a fresh worker does not start or pass; the old ones then keep serving."""
        w = self.w
        with self._lock:
            cfg = with_model(dataclasses.replace(w.cfg, model=w.config_model), model)
            fresh = [h for h in started or () if h.state == "ready"][: cfg.worker_count]
            try:
                sha, expected = fresh[0].candidate_expected if fresh else w.judge.expected_for(cfg)
                kinds = w.health.candidates() or None
                expected = self._start_tested(fresh, cfg, w.config_text, kinds, sha, expected, model=model,
                                              fail=SelftestFailed)
            except BaseException:
                for h in fresh:
                    h.stop()
                raise
            w.generation += 1
            for i, h in enumerate(fresh):
                h.probe_sink = None
                h.last_pong = time.monotonic()
                h.index = h.logs.index = i
                h.generation = w.generation

            def commit() -> None:
                w.model, w.cfg = model, cfg
                w.model_sha, w.expected = sha, expected

            self._take_over(fresh, cfg, "model swap", commit)

    def _start_tested(self, fresh: list[WorkerHandle], cfg: config.Config, text: str, kinds: list[str] | None,
                      sha: str, expected: selftest.Expected | None, *, model: ModelSpec | str | None = "serving",
                      fail: type[ModelError]) -> selftest.Expected | None:
        """Fill `fresh` up to cfg.worker_count with started workers, each self-tested (the expected outputs
        recorded first where none are usable); returns the expected outputs. A wrong answer raises `fail`;
        `fresh` then holds the workers started so far, for the caller to stop."""
        w = self.w
        while len(fresh) < cfg.worker_count:
            h = w._spawn(len(fresh), cfg, text, kinds, model=model)
            fresh.append(h)
            if not w.judge.usable(expected, h, cfg):
                expected = w.judge.reference(h, cfg, text, sha, model)
            assert expected is not None  # usable() or reference() gave one
            v = w.judge.verdict(h, cfg, expected)
            if not v.passed:
                raise fail(f"the self-test of {cfg.model_name} on {h.accelerator} failed: {v.reason}")
        return expected

    def _take_over(self, fresh: list[WorkerHandle], cfg: config.Config, what: str,
                   commit: Callable[[], None]) -> None:
        """Under the lock: the old workers retire, commit() sets the new state, the fresh ones take the slots.
        Then on_reload(cfg), and the old ones stop once their frames are answered."""
        w = self.w
        with w.cond:
            old = w.handles()
            for h in old:
                h.retiring = True
            commit()
            w._seat(fresh)
            w.cond.notify_all()
        logger.info("%s: now serving %s; retiring %d old worker(s)", what, fresh[0].model_name, len(old))
        if w.on_reload is not None:
            w.on_reload(cfg)
        threading.Thread(target=w._retire, args=(old,), name="retire", daemon=True).start()
