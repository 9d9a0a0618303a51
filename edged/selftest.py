"""The known-answer self-test: a worker answers known frames before it takes real ones.

Two halves, one format:

- In the worker (numpy; after warm-up, before the sandbox): `payloads()` gives the
  self-test frames (`model.selftest.frames`, or one deterministic raw tensor built
  from the input's shape and dtype), `run()` invokes the model on each and returns
  the outputs as they came out (quantized integers, or floats), sampled with a
  fixed stride when a model's outputs are larger than the report allows. It goes
  to the supervisor in `Ready.selftest`.
- In the supervisor (no numpy): `Expected` says what the answers must be
  (`model.selftest.expect`, else a record made on the CPU the first time this
  model, by sha256, was served, kept in `state_dir/selftest/`), and `check()`
  compares a started worker's answers with them, per task: classify, the same
  top-1 (or, where the expected top two are within tolerance, one of them) and
  every score within `tolerance` quantization steps; detect, every expected
  box matched by label and IoU >= 0.5 with its score within tolerance, and no
  extra box above the threshold; raw, every element within tolerance. Float
  outputs count steps of 1e-3 of the expected output's largest magnitude.

The API other owners use (model updates, probes):

    verdict = selftest.check(handle, expected, tolerance, score_threshold)
    verdict.passed, verdict.max_diff, verdict.reason

with `handle` a started WorkerHandle (its `info["selftest"]` holds the answers)
and `expected` from `Expected.load(cfg)` / `Expected.record(cfg, handle)`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edged import protocol
from edged.errors import ConfigError

logger = logging.getLogger(__name__)

IOU_MIN = 0.5  # detect: a box matches the expected one at this overlap or more
FLOAT_STEP = 1e-3  # float outputs: one "step" is this share of the expected output's largest magnitude
MAX_FRAMES = 16


# ---- the worker's half ---------------------------------------------------------------------------------------------
def default_frame(shape: tuple[int, ...], dtype: str) -> bytes:
    """A deterministic raw tensor for the input: a multiplicative hash of the index, scaled to the dtype."""
    import numpy as np

    n = int(np.prod(shape))
    v = ((np.arange(n, dtype=np.uint64) * np.uint64(2654435761)) >> np.uint64(7)) % np.uint64(256)
    dt = np.dtype(dtype)
    if dt.kind == "f":
        arr = (v.astype(np.float64) / 127.5 - 1.0).astype(dt)
    elif dt == np.int8:
        arr = (v.astype(np.int16) - 128).astype(np.int8)
    else:
        arr = v.astype(dt)
    return arr.reshape(shape).tobytes()


def payloads(files: tuple[str, ...], shape: tuple[int, ...], dtype: str) -> list[bytes]:
    """The self-test frames: the configured files, read now (before the sandbox), else the default frame."""
    if not files:
        return [default_frame(shape, dtype)]
    out = []
    for f in files[:MAX_FRAMES]:
        try:
            out.append(Path(f).read_bytes())
        except OSError as exc:
            raise ConfigError(f"model.selftest.frames: {f}: {exc.strerror}") from None
    return out


def run(model: Any, pre: Any, frames: list[bytes]) -> dict[str, Any]:
    """Invoke the model on each frame; the report for Ready.selftest (outputs, ms, frames digest)."""
    import numpy as np

    t0 = time.perf_counter()
    model.set_batch(1)
    per_output = max(1, protocol.SELFTEST_MAX_VALUES // (len(frames) * max(1, len(model.outputs))))
    rows = []
    for payload in frames:
        dst = model.input_view()
        try:
            pre.fill(dst, memoryview(payload))
        finally:
            del dst
        model.invoke()
        row = []
        for i in range(len(model.outputs)):
            a = np.asarray(model.output(i)).reshape(-1)
            a = a[:: max(1, -(-a.size // per_output))]
            if a.dtype.kind == "f":
                row.append(np.nan_to_num(a.astype(np.float64), nan=1e300, posinf=1e300, neginf=-1e300).tolist())
            else:
                row.append(a.astype(np.int64).tolist())
        rows.append(row)
    digest = hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in frames)).hexdigest()
    return {"outputs": rows, "ms": round((time.perf_counter() - t0) * 1e3, 3), "frames": digest}


# ---- the supervisor's half -----------------------------------------------------------------------------------------
def model_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Verdict:
    passed: bool
    max_diff: float  # in quantization steps (float outputs: in steps of FLOAT_STEP of the range)
    reason: str = ""
    at: float = 0.0  # wall-clock time of the check
    ms: float = 0.0  # what running the frames cost the worker

    def report(self) -> dict[str, Any]:
        """The per-worker `selftest` of status."""
        return {"result": "pass" if self.passed else "fail", "max_diff": round(self.max_diff, 3),
                "at": round(self.at, 3), "ms": self.ms, **({"reason": self.reason} if self.reason else {})}


@dataclass(frozen=True)
class Expected:
    """What the self-test must answer, and where that came from (a file, a record, a fresh CPU run)."""

    outputs: list[list[list[float]]]
    frames: str | None  # digest of the frames the outputs belong to (None: not known, from an expect file)
    source: str

    @staticmethod
    def store_path(cfg: Any, sha: str) -> Path:
        return Path(cfg.state_dir) / "selftest" / f"{sha}.json"

    @classmethod
    def load(cls, cfg: Any, sha: str) -> Expected | None:
        """model.selftest.expect (a bad file is exit 78), else the record for this model, else None."""
        st = cfg.model.selftest
        if st.expect:
            try:
                doc = json.loads(Path(st.expect).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{cfg.source} model.selftest.expect: cannot read {st.expect}: {exc}") from None
            outs = doc.get("outputs") if isinstance(doc, dict) else None
            if not _valid_outputs(outs):
                raise ConfigError(f"{cfg.source} model.selftest.expect: {st.expect} has no valid \"outputs\" "
                                  "(a list per frame of a list per output of numbers, as the records in "
                                  "state_dir/selftest hold)")
            assert outs is not None  # _valid_outputs said so
            return cls(outs, doc.get("frames") if isinstance(doc.get("frames"), str) else None, st.expect)
        path = cls.store_path(cfg, sha)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.warning("self-test record %s unreadable (%s): recording it again on the CPU", path, exc)
            return None
        if not isinstance(doc, dict) or doc.get("model_sha256") != sha or not _valid_outputs(doc.get("outputs")) \
                or not isinstance(doc.get("frames"), str):
            logger.warning("self-test record %s is not a record of this model: recording it again on the CPU", path)
            return None
        return cls(doc["outputs"], doc["frames"], str(path))

    @classmethod
    def record(cls, cfg: Any, sha: str, handle: Any) -> Expected:
        """The answers of a CPU worker become the expected ones; kept in state_dir (in memory if it is not writable)."""
        rep = handle.info.get("selftest") or {}
        path = cls.store_path(cfg, sha)
        doc = {"model_sha256": sha, "model": cfg.model.path, "frames": rep.get("frames"), "outputs": rep.get("outputs"),
               "recorded": round(time.time(), 3), "accelerator": handle.accelerator,
               "backend": handle.info.get("model", {}).get("backend")}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(doc), encoding="utf-8")
            os.replace(tmp, path)
            where = str(path)
            logger.info("self-test: expected outputs of %s recorded on the CPU into %s", cfg.model_name, path)
        except OSError as exc:
            where = "memory"
            logger.warning("self-test: cannot keep the expected outputs in %s (%s); kept in memory until the next "
                           "start", path.parent, exc.strerror or exc)
        return cls(doc["outputs"], doc["frames"], where)


def _valid_outputs(v: Any) -> bool:
    return (isinstance(v, list) and 0 < len(v) <= MAX_FRAMES and all(
        isinstance(o, list) and o and all(isinstance(d, list) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in d) for d in o) for o in v))


def check(handle: Any, expected: Expected, tolerance: float = 2.0, score_threshold: float = 0.5,
          report: dict[str, Any] | None = None) -> Verdict:
    """Did this started worker answer the self-test as expected? Never raises on what the worker sent.

    `report`: answers of an in-service self-test (protocol.SelfTestReport); default: those of its start.
    """
    rep = handle.info.get("selftest") if report is None else report
    now = time.time()
    if not isinstance(rep, dict):
        return Verdict(False, math.inf, "the worker sent no self-test answers", now)
    ms = float(rep.get("ms", 0.0))
    if expected.frames is not None and rep.get("frames") != expected.frames:
        return Verdict(False, math.inf, "the self-test frames differ from those the expected outputs belong to",
                       now, ms)
    model = handle.info.get("model") or {}
    try:
        passed, diff, reason = compare(str(handle.info.get("task")), model.get("outputs") or [], expected.outputs,
                                       rep.get("outputs"), tolerance, score_threshold)
    except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError) as exc:
        return Verdict(False, math.inf, f"self-test answers not comparable: {exc}", now, ms)
    return Verdict(passed, diff, reason, now, ms)


def compare(task: str, desc: list[dict[str, Any]], expected: list[Any], got: Any, tolerance: float,
            score_threshold: float) -> tuple[bool, float, str]:
    """(passed, max_diff in steps, reason) for one set of answers against the expected ones."""
    if not isinstance(got, list) or len(got) != len(expected):
        return (
            False,
            math.inf,
            f"{len(got) if isinstance(got, list) else 0} frame(s) answered, {len(expected)} expected",
        )
    worst = 0.0
    for n, (exp_f, got_f) in enumerate(zip(expected, got, strict=False)):
        if not isinstance(got_f, list) or len(got_f) != len(exp_f) or len(exp_f) != len(desc):
            return False, math.inf, f"frame {n}: {len(got_f)} outputs, {len(exp_f)} expected"
        for i, (e, g) in enumerate(zip(exp_f, got_f, strict=False)):
            if len(e) != len(g):
                return False, math.inf, f"frame {n} output {i}: {len(g)} values, {len(e)} expected"
        if task == "classify":
            ok, diff, why = _classify(desc[0], exp_f[0], got_f[0], tolerance)
        elif task == "detect":
            ok, diff, why = _detect(desc, exp_f, got_f, tolerance, score_threshold)
        else:
            ok, diff, why = True, 0.0, ""
            for i, (e, g) in enumerate(zip(exp_f, got_f, strict=False)):
                d = _steps(desc[i], e, g)
                diff = max(diff, d)
                if d > tolerance and ok:
                    ok, why = False, f"output {i} differs by {d:.1f} steps (tolerance {tolerance:g})"
        worst = max(worst, diff)
        if not ok:
            return False, worst, f"frame {n}: {why}"
    return True, worst, ""


def _step(desc: dict[str, Any], e: list[float]) -> float:
    """The size of one step of this output, in its raw values: 1 for quantized, else FLOAT_STEP of the range."""
    if desc.get("quantization") or not str(desc.get("dtype", "")).startswith("float"):
        return 1.0
    return FLOAT_STEP * max(max((abs(x) for x in e), default=0.0), 1e-6)


def _steps(desc: dict[str, Any], e: list[float], g: list[float]) -> float:
    step = _step(desc, e)
    return max((abs(a - b) for a, b in zip(e, g, strict=False)), default=0.0) / step


def _classify(desc: dict[str, Any], e: list[float], g: list[float], tol: float) -> tuple[bool, float, str]:
    diff = _steps(desc, e, g)
    step = _step(desc, e)
    sign = -1.0 if (desc.get("quantization") or [1.0])[0] < 0 else 1.0  # a negative scale reverses the order
    top_e = max(range(len(e)), key=lambda j: sign * e[j])
    top_g = max(range(len(g)), key=lambda j: sign * g[j])
    near = {j for j in range(len(e)) if abs(e[j] - e[top_e]) <= tol * step}  # the expected near-ties
    if top_g != top_e and top_g not in near:
        return False, diff, f"top-1 is class {top_g}, expected {top_e}"
    if diff > tol:
        return False, diff, f"scores differ by up to {diff:.1f} steps (tolerance {tol:g})"
    return True, diff, ""


def _layout(desc: list[dict[str, Any]]) -> tuple[int, int, int, int | None]:
    """(boxes, classes, scores, count) among SSD post-process outputs, as postprocess.detection_outputs finds them."""
    def size(d: dict[str, Any]) -> int:
        return math.prod(int(x) for x in d.get("shape") or [1])

    boxes = [i for i, d in enumerate(desc) if len(d["shape"]) == 3 and d["shape"][-1] == 4]
    count = [i for i, d in enumerate(desc) if size(d) == 1]
    pairs = [i for i, d in enumerate(desc) if len(d["shape"]) == 2 and i not in count]
    if len(boxes) != 1 or len(pairs) != 2:
        raise ValueError("not an SSD post-process output set")
    named = {i: str(desc[i].get("name", "")).lower() for i in pairs}
    cls_i = next((i for i in pairs if "class" in named[i]), pairs[0])
    score_i = next((i for i in pairs if "score" in named[i]), pairs[1] if cls_i == pairs[0] else pairs[0])
    return boxes[0], cls_i, score_i, count[0] if count else None


def _deq(desc: dict[str, Any], v: list[float]) -> list[float]:
    q = desc.get("quantization")
    return [(x - q[1]) * q[0] for x in v] if q else list(v)


def _iou(a: list[float], b: list[float]) -> float:
    ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ih * iw
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else (1.0 if a == b else 0.0)


def _detections(desc: list[dict[str, Any]], outs: list[list[float]], layout: tuple[int, int, int, int | None],
                threshold: float) -> list[tuple[list[float], int, float]]:
    b_i, c_i, s_i, n_i = layout
    flat = _deq(desc[b_i], outs[b_i])
    boxes = [flat[k : k + 4] for k in range(0, len(flat) - 3, 4)]
    classes, scores = _deq(desc[c_i], outs[c_i]), _deq(desc[s_i], outs[s_i])
    n = min(len(boxes), len(classes), len(scores))
    if n_i is not None:
        n = min(n, int(_deq(desc[n_i], outs[n_i])[0]))
    return [(boxes[j], int(classes[j]), scores[j]) for j in range(max(0, n)) if scores[j] >= threshold]


def _detect(desc: list[dict[str, Any]], e: list[list[float]], g: list[list[float]], tol: float,
            threshold: float) -> tuple[bool, float, str]:
    layout = _layout(desc)
    s_desc = desc[layout[2]]
    step = (s_desc.get("quantization") or [None])[0] or FLOAT_STEP  # scores are 0..1: a float step is 1e-3
    margin = tol * step
    exp = _detections(desc, e, layout, threshold)
    got = _detections(desc, g, layout, max(0.0, threshold - margin))
    used: set[int] = set()
    worst = 0.0
    for box, label, score in exp:
        best = max((j for j in range(len(got)) if j not in used and got[j][1] == label),
                   key=lambda j: _iou(box, got[j][0]), default=None)
        if best is None or _iou(box, got[best][0]) < IOU_MIN:
            return False, max(worst, score / step), f"expected a {label} at {[round(x, 3) for x in box]}: not found"
        used.add(best)
        worst = max(worst, abs(got[best][2] - score) / step)
    extra = [d for j, d in enumerate(got) if j not in used and d[2] >= threshold + margin]
    if extra:
        return False, max(worst, extra[0][2] / step), f"an unexpected {extra[0][1]} with score {extra[0][2]:.3f}"
    if worst > tol:
        return False, worst, f"scores differ by up to {worst:.1f} steps (tolerance {tol:g})"
    return True, worst, ""
