"""Accelerator choice: try each preferred kind in order, keep the reason for every skip.

coral: the external delegate libedgetpu (device usb, pci, usb:N, pci:N).
gpu:   LiteRT's GPU accelerator (WebGPU over Vulkan); probed, reported.
cpu:   the runtime's default XNNPACK path with model.threads.
Runs in the worker (it loads native libraries); the supervisor only reads the report.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
from dataclasses import dataclass, field
from typing import Any

from edged.config import Config
from edged.errors import ModelError
from edged.runtime import Model, load_delegate, needs_edgetpu

logger = logging.getLogger(__name__)


@dataclass
class Choice:
    model: Model
    kind: str
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        return {"chosen": self.kind, "skipped": [{"kind": k, "reason": r} for k, r in self.skipped],
                "model": self.model.path}


def _coral(cfg: Config, path: str, device: str | None) -> Model:
    lib = cfg.accelerator.coral.library
    try:
        # probe first: LiteRT's load_delegate leaves a noisy half-built object behind when dlopen fails
        ctypes.CDLL(lib)
    except OSError as exc:
        raise ModelError(f"no Edge TPU runtime: {lib} cannot be loaded ({exc})") from None
    opts = dict(cfg.accelerator.coral.options)
    dev = device or cfg.accelerator.coral.device
    if dev:
        opts["device"] = dev
    delegate = load_delegate(cfg.accelerator.coral.library, opts)
    return Model(path, threads=cfg.model.threads, delegates=[delegate])


def _gpu_reason(path: str) -> str:
    """Why the GPU cannot serve this model here (LiteRT's CompiledModel GPU path)."""
    if ctypes.util.find_library("vulkan") is None:
        return "no Vulkan loader (libvulkan.so.1) on this machine, so no GPU adapter"
    try:
        from ai_edge_litert.compiled_model import CompiledModel
        from ai_edge_litert.hardware_accelerator import HardwareAccelerator
    except ImportError:
        return "this runtime has no GPU accelerator (LiteRT's CompiledModel is not installed)"
    try:
        cm = CompiledModel.from_file(path, hardware_accel=HardwareAccelerator.GPU)
    except Exception as exc:  # the native layer raises bare RuntimeError/ValueError variants
        text = " ".join(str(exc).split())
        hint = " (No adapters found: Vulkan has no usable GPU)" if "adapter" not in text.lower() else ""
        return f"LiteRT GPU accelerator failed: {text[:200] or type(exc).__name__}{hint}"
    full = cm.is_fully_accelerated() if hasattr(cm, "is_fully_accelerated") else False
    return f"a GPU answered (fully accelerated: {full}) but this build serves the GPU path through CompiledModel only in a later release"


def choose(cfg: Config, coral_device: str | None = None) -> Choice:
    """Load the model on the first preferred accelerator that works."""
    path = cfg.model.path
    edgetpu = needs_edgetpu(path)
    skipped: list[tuple[str, str]] = []
    for kind in cfg.accelerator.prefer:
        try:
            if kind == "coral":
                return Choice(_coral(cfg, path, coral_device), "coral", skipped)
            if kind == "gpu":
                if edgetpu:
                    skipped.append(("gpu", "the model is compiled for the Edge TPU"))
                    continue
                skipped.append(("gpu", _gpu_reason(path)))
                continue
            if kind == "cpu":
                if edgetpu:
                    if cfg.model.cpu_fallback:
                        skipped.append(("cpu", f"{path} needs an Edge TPU; using model.cpu_fallback"))
                        return Choice(Model(cfg.model.cpu_fallback, threads=cfg.model.threads), "cpu", skipped)
                    skipped.append(("cpu", "the model is compiled for the Edge TPU"))
                    continue
                return Choice(Model(path, threads=cfg.model.threads), "cpu", skipped)
        except ModelError as exc:
            if kind == "cpu":
                raise
            skipped.append((kind, str(exc)))
            logger.info("accelerator %s skipped: %s", kind, exc)
    reasons = "; ".join(f"{k}: {r}" for k, r in skipped)
    if edgetpu:
        hint = " (or set model.cpu_fallback to a CPU build of the model)" if not cfg.model.cpu_fallback else ""
        raise ModelError(f"model {path} is compiled for the Edge TPU (edgetpu-custom-op) and needs a Coral "
                         f"Edge TPU, but none could be used{hint} [{reasons}]")
    raise ModelError(f"model {path}: no accelerator in accelerator.prefer could serve it [{reasons}]")
