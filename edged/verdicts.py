"""The known-answer self-test as supervision runs it: which answers a worker must give, and its verdict.

edged.selftest holds the test itself (the frames, the expected-outputs record,
the comparison). This owner applies it to workers: the expected outputs of a
model (its expect file, else the record kept by sha256, else a record made now
on the CPU, in a worker of its own when this one runs elsewhere) and the verdict
on a started worker's answers, logged, kept on the handle, and a failure sent
out as a `selftest_failed` event. Workers, Prober and Switcher use it alike.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from edged import config, selftest
from edged.errors import EdgedError, ModelError
from edged.workerinit import ModelSpec

if TYPE_CHECKING:
    from edged.supervision import Workers
    from edged.workers import WorkerHandle

logger = logging.getLogger(__name__)


class Judge:
    """The self-test's expected outputs and verdicts, for the Workers it serves (it spawns through them)."""

    def __init__(self, workers: Workers) -> None:
        self.w = workers

    def expected_for(self, cfg: config.Config) -> tuple[str, selftest.Expected | None]:
        """The model's sha256 and its expected self-test outputs, if known yet (a bad expect file: ConfigError)."""
        try:
            sha = selftest.model_sha256(cfg.model.path)
        except OSError as exc:
            raise ModelError(f"model {cfg.model.path}: {exc.strerror}") from None
        return sha, selftest.Expected.load(cfg, sha)

    def reference(self, h: WorkerHandle, cfg: config.Config, text: str, sha: str,
                  model: ModelSpec | str | None = "serving") -> selftest.Expected:
        """Expected outputs recorded on the CPU: this worker's when it runs there, else a CPU worker's of its own."""
        if h.accelerator == "cpu":
            return selftest.Expected.record(cfg, sha, h)
        try:
            ref = self.w._spawn(h.index, cfg, text, ["cpu"], model=model)
        except EdgedError as exc:
            logger.warning("self-test: the model does not run on the CPU here (%s); the answers of %s become the "
                           "expected ones", exc, h.accelerator)
            return selftest.Expected.record(cfg, sha, h)
        try:
            return selftest.Expected.record(cfg, sha, ref)
        finally:
            ref.stop()

    @staticmethod
    def usable(expected: selftest.Expected | None, h: WorkerHandle, cfg: config.Config) -> bool:
        """A record of other self-test frames (model.selftest.frames changed) is recorded again; an expect file is
        what the user said and stays."""
        if expected is None:
            return False
        rep = h.info.get("selftest") or {}
        return bool(cfg.model.selftest.expect) or expected.frames is None or rep.get("frames") == expected.frames

    def verdict(self, h: WorkerHandle, cfg: config.Config, expected: selftest.Expected,
                report: dict[str, Any] | None = None) -> selftest.Verdict:
        tolerance = cfg.model.selftest.tolerance_for(h.accelerator or "cpu")
        v = selftest.check(h, expected, tolerance, cfg.model.score_threshold, report)
        h.selftest = v
        if v.passed:
            logger.info("worker %d self-test passed on %s: max diff %.1f step(s), %.1f ms", h.index, h.accelerator,
                        v.max_diff, v.ms)
        else:
            logger.warning("worker %d self-test FAILED on %s: %s (expected outputs from %s)", h.index, h.accelerator,
                           v.reason, expected.source)
            self.w.on_event({"event": "selftest_failed", "ts": round(time.time(), 3), "accelerator": h.accelerator,
                           "model": cfg.model_name, "reason": v.reason, "max_diff": round(v.max_diff, 3)})
        return v
