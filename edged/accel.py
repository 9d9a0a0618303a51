"""Accelerator choice: try each preferred kind in order, keep the reason for every skip.

NAME:  a named external delegate of accelerator.delegates ({library, options}), like coral.
coral: a TFLite external delegate, libedgetpu by default (accelerator.coral.library;
       its options plus "device": usb, pci, usb:N, pci:N). The report says how many
       of the model's ops the delegate took (partial delegation leaves the rest on the CPU).
gpu:   LiteRT's GPU accelerator (CompiledModel, WebGPU over Vulkan).
cpu:   the runtime's default XNNPACK path with model.threads.
Runs in the worker (it loads native libraries); the supervisor only reads the report.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from edged.config import Config
from edged.errors import ModelError
from edged.runtime import GpuModel, Model, load_delegate, needs_edgetpu

logger = logging.getLogger(__name__)


@dataclass
class Choice:
    model: Model
    kind: str
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        """What was chosen and why the others were not; for a delegate, how much of the model it took.

        delegated_ops/total_ops are None when no delegate was applied (cpu) or
        the runtime cannot list its nodes; partial is True when some ops stay on the CPU.
        """
        return {"chosen": self.kind, "skipped": [{"kind": k, "reason": r} for k, r in self.skipped],
                "model": self.model.path, "backend": self.model.backend,
                "delegated_ops": self.model.delegated_ops, "total_ops": self.model.total_ops,
                "partial": self.model.partial}


def _coral(cfg: Config, path: str, device: str | None) -> Model:
    coral = cfg.accelerator.coral
    opts = dict(coral.options)
    dev = device or coral.device
    if dev:
        opts["device"] = dev
    return _external(cfg, path, coral.library, opts)


def _external(cfg: Config, path: str, library: str, options: dict[str, str]) -> Model:
    """The model on a TFLite external delegate (libedgetpu, or a named one of accelerator.delegates)."""
    delegate = load_delegate(library, options)
    model = Model(path, threads=cfg.model.threads, delegates=[delegate])
    if model.delegated_ops == 0:
        logger.warning("%s took none of the %s ops of %s: the CPU runs all of it", library,
                       model.total_ops, model.name)
    elif model.partial:
        logger.warning("%s took %s of %s ops of %s; the rest run on the CPU", library,
                       model.delegated_ops, model.total_ops, model.name)
    return model


def choose(cfg: Config, coral_device: str | None = None, kinds: list[str] | None = None) -> Choice:
    """Load the model on the first accelerator that works, of `kinds` (default: accelerator.prefer), in order."""
    path = cfg.model.path
    edgetpu = needs_edgetpu(path)
    skipped: list[tuple[str, str]] = []
    named = cfg.accelerator.delegates
    for kind in cfg.accelerator.prefer if kinds is None else kinds:
        try:
            if kind == "coral":
                return Choice(_coral(cfg, path, coral_device), "coral", skipped)
            if kind in named:
                return Choice(_external(cfg, path, named[kind].library, dict(named[kind].options)), kind, skipped)
            if kind == "gpu":
                if edgetpu:
                    skipped.append(("gpu", "the model is compiled for the Edge TPU"))
                    continue
                model = GpuModel(path, threads=cfg.model.threads, fp32=cfg.accelerator.gpu.precision == "fp32")
                if model.partial:
                    logger.warning("the GPU does not run all of %s: some ops stay on the CPU", model.name)
                return Choice(model, "gpu", skipped)
            if kind == "cpu":
                if edgetpu:
                    if cfg.model.cpu_fallback:
                        skipped.append(("cpu", f"{path} needs an Edge TPU; using model.cpu_fallback"))
                        return Choice(Model(cfg.model.cpu_fallback, threads=cfg.model.threads), "cpu", skipped)
                    skipped.append(("cpu", "the model is compiled for the Edge TPU"))
                    continue
                return Choice(Model(path, threads=cfg.model.threads), "cpu", skipped)
            skipped.append((kind, "not an accelerator of this config"))
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
