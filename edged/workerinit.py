"""What a worker is started from: the config text, the model it serves, and the one Init message.

Workers start from the config held in memory (the text last loaded, read by
read_config_text), never from the file as it is now. A model from the update
store (edged.updates) serves instead of the config's: ModelSpec names it and
with_model() fills it into the config. init_message() builds the first message
a worker gets, for the daemon's supervision, the bench and tools alike.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from edged import config, protocol
from edged.errors import ConfigError


def read_config_text(cfg: config.Config) -> str:
    try:
        return Path(cfg.source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{cfg.source}: cannot read config: {exc}") from None


def init_message(cfg: config.Config, config_text: str, coral_device: str | None = None, *,
                 sandbox: bool | None = None, model_path: str | None = None,
                 accelerators: list[str] | None = None, model: ModelSpec | None = None) -> protocol.Init:
    """What a worker is told at start: the one builder, for the daemon and the bench alike."""
    src = Path(cfg.source)
    return protocol.Init(config_text=config_text, config_name=str(src), config_base=str(src.resolve().parent),
                         sandbox=cfg.sandbox.enabled if sandbox is None else sandbox, sandbox_mode=cfg.sandbox.mode,
                         memory_limit=cfg.sandbox.memory_limit_mb << 20, batch_max=cfg.model.batch_max,
                         batch_wait_ms=cfg.model.batch_wait_ms,
                         max_fds=32 + int(cfg.pool.max_mb / max(cfg.pool.segment_mb, 0.0625)) + 1,
                         log_level=logging.getLevelName(cfg.logging.level), coral_device=coral_device,
                         model_path=model.path if model else model_path, model_task=model.task if model else None,
                         model_labels=model.labels if model else None, accelerators=accelerators)


@dataclass(frozen=True)
class ModelSpec:
    """A model other than the config's (from the update store): its file, labels and task."""

    path: str
    labels: str | None
    task: str


def with_model(cfg: config.Config, model: ModelSpec | None) -> config.Config:
    """The config as the workers serve it: model.path, .labels and .task those of `model` (None: as written)."""
    if model is None:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=model.path, labels=model.labels,
                                                              task=model.task))
