"""Output tensors to result JSON bodies: top-k, SSD detections, raw outputs.

Pure functions over a loaded runtime.Model; run in the worker.
"""
from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from edged import userfiles
from edged.errors import ModelError
from edged.runtime import Model, dequantize

_ID_LINE = re.compile(r"^\s*(\d+)[\s:,]+(.+?)\s*$")


def load_labels(path: str | None) -> dict[int, str]:
    """Labels as plain lines (line i = class i) or as 'id label' lines.

    The file must be a regular file of at most userfiles.LABELS_MAX_BYTES.
    """
    if not path:
        return {}
    try:
        data = userfiles.read_bytes(path, userfiles.LABELS_MAX_BYTES)
    except userfiles.FileRefused as exc:
        raise ModelError(f"labels {exc}") from None
    lines = data.decode("utf-8-sig", errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    filled = [ln for ln in lines if ln.strip()]
    matches = [_ID_LINE.match(ln) for ln in filled]
    if filled and all(matches):
        return {int(m.group(1)): m.group(2) for m in matches if m}
    # plain lines: line i is class i, blank lines included (they are classes without a name)
    return {i: ln.strip() for i, ln in enumerate(lines) if ln.strip()}


def _label(labels: dict[int, str], i: int) -> str:
    return labels.get(i, str(i))


def classify(model: Model, labels: dict[int, str], top_k: int) -> dict[str, Any]:
    info = model.outputs[0]
    # dequantizing keeps the order (scale >= 0; 0 = not quantized): find the top k on the raw values and
    # dequantize only those. Every class at least as good as the k-th is a candidate, so ties at the cut
    # go by class id.
    monotonic = info.scale >= 0
    raw = (model.output(0) if monotonic else model.dequantized(0)).reshape(-1)
    k = max(1, min(top_k, raw.size))
    kth = np.partition(raw, raw.size - k)[raw.size - k]
    idx = np.flatnonzero(raw >= kth)
    scores = (dequantize(info, raw[idx]) if monotonic else raw[idx]).astype(np.float64)
    order = np.lexsort((idx, -scores))[:k]  # best first; equal scores by class id
    return {"classes": [{"id": int(idx[j]), "label": _label(labels, int(idx[j])), "score": round(float(scores[j]), 4)}
                        for j in order]}


def detection_outputs(model: Model) -> tuple[int, int, int, int | None]:
    """Indices of (boxes, classes, scores, count) among the outputs of TFLite_Detection_PostProcess."""
    outs = model.outputs
    boxes = [i for i, o in enumerate(outs) if len(o.shape) == 3 and o.shape[-1] == 4]
    count = [i for i, o in enumerate(outs) if int(np.prod(o.shape)) == 1]
    pairs = [i for i, o in enumerate(outs) if len(o.shape) == 2 and i not in count]
    if len(boxes) != 1 or len(pairs) != 2:
        raise ModelError(f"model {model.name} does not look like an SSD with TFLite_Detection_PostProcess "
                         f"(outputs {[list(o.shape) for o in outs]}); use task: raw")
    named = {i: outs[i].name.lower() for i in pairs}
    cls_i = next((i for i in pairs if "class" in named[i]), pairs[0])
    score_i = next((i for i in pairs if "score" in named[i]), pairs[1] if cls_i == pairs[0] else pairs[0])
    return boxes[0], cls_i, score_i, count[0] if count else None


def detect(
    model: Model, labels: dict[int, str], threshold: float, layout: tuple[int, int, int, int | None]
) -> dict[str, Any]:
    b_i, c_i, s_i, n_i = layout
    boxes = model.dequantized(b_i).reshape(-1, 4)
    classes = model.dequantized(c_i).reshape(-1)
    scores = model.dequantized(s_i).reshape(-1)
    n = len(scores) if n_i is None else min(len(scores), int(model.dequantized(n_i).reshape(-1)[0]))
    dets = []
    for j in range(n):
        score = float(scores[j])
        if not score >= threshold:
            continue
        cid = int(classes[j])
        box = [round(min(1.0, max(0.0, float(v))), 4) for v in boxes[j]]
        dets.append({"id": cid, "label": _label(labels, cid), "score": round(score, 4), "box": box})
    dets.sort(key=lambda d: -float(d["score"]))  # type: ignore[arg-type]  # the score is the float set above
    return {"detections": dets}


def raw(model: Model) -> dict[str, Any]:
    outputs = []
    for i, info in enumerate(model.outputs):
        data = model.dequantized(i)
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            flat: list[Any] = [x if math.isfinite(x) else None for x in data.reshape(-1).tolist()]
        elif data.dtype.kind == "f":
            flat = data.astype(np.float64).reshape(-1).tolist()
        else:
            flat = data.reshape(-1).tolist()
        outputs.append({"name": info.name, "shape": list(info.shape), "dtype": info.dtype, "data": flat})
    return {"outputs": outputs}


def body(model: Any, task: str, labels: dict[int, str], top_k: int, score_threshold: float,
         det_layout: Any = None) -> dict[str, Any]:
    """The result body of one invoke for the configured task (the worker and the bench alike)."""
    if task == "classify":
        return classify(model, labels, top_k)
    if task == "detect":
        return detect(model, labels, score_threshold, det_layout)
    return raw(model)
