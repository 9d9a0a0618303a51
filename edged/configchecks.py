"""Config checks across keys and against this host, after the file was read into dataclasses.

MQTT topic parts (device_id, topic_prefix, the share group and prefix) as
topic levels and names (edged.topics); strings sent in CONNECT without NUL or
control characters; sandbox.user an existing user other than root;
status.socket a socket or nothing; and warnings for secrets any user can read
or replace. Errors go to the loader (file, line and key, all at once).
"""
from __future__ import annotations

import os
import pwd
import socket
import stat
from typing import TYPE_CHECKING, Protocol

from edged import topics, userfiles

if TYPE_CHECKING:
    from edged.config import Config


class Loader(Protocol):
    """What config's loader offers here: where a key was, and a place for errors."""

    fname: str
    lines: dict[str, int]

    def err_at(self, line: str, key: str, msg: str) -> None: ...

    def where(self, key: str) -> str: ...


def check(cfg: Config, loader: Loader) -> None:
    """Checks that need more than one key or the host (topics, users, paths): errors into loader."""
    err, at = loader.err_at, loader.where
    why = topics.level_problem(cfg.device_id)
    if why:
        origin = "" if "device_id" in loader.lines else f" (from the hostname {socket.gethostname()!r}; set device_id)"
        err(at("device_id"), "device_id", why + origin)
    elif "{device_id}" not in cfg.mqtt.topic_prefix and not cfg.mqtt.topic_prefix.strip("/"):
        err(at("mqtt.topic_prefix"), "mqtt.topic_prefix", "must not be empty")
    else:
        why = topics.prefix_problem(cfg.prefix)
        if why:
            err(at("mqtt.topic_prefix"), "mqtt.topic_prefix", why)
    for key, text in (("mqtt.host", cfg.mqtt.host), ("mqtt.client_id", cfg.mqtt.client_id),
                      ("mqtt.username", cfg.mqtt.username)):
        why = topics.text_problem(text) if text is not None else None
        if key == "mqtt.host" and not why and not cfg.mqtt.host.strip():
            why = "must not be empty"
        if why:  # a NUL makes the broker drop the connection, and edged would retry for ever
            err(at(key), key, why)
    if cfg.mqtt.share is not None:
        why = topics.level_problem(cfg.mqtt.share.group)
        if why:
            err(at("mqtt.share.group"), "mqtt.share.group", why)
        why = topics.prefix_problem(cfg.mqtt.share.prefix)
        if why:
            err(at("mqtt.share.prefix"), "mqtt.share.prefix", why)
    if cfg.mqtt.tls is not None and bool(cfg.mqtt.tls.cert) != bool(cfg.mqtt.tls.key):
        err(at("mqtt.tls"), "mqtt.tls", "cert and key go together")
    if cfg.sandbox.in_process and cfg.sandbox.enabled:
        err(at("sandbox.in_process"), "sandbox.in_process",
            "needs sandbox.enabled: false (the daemon itself cannot be filtered)")
    if cfg.model.update.enabled and not cfg.model.update.public_key:
        err(at("model.update.public_key"), "model.update.public_key", "required when model.update.enabled is true")
    if cfg.model.task == "detect" and cfg.model.score_threshold > 1:
        err(at("model.score_threshold"), "model.score_threshold", "must be <= 1")
    if cfg.sandbox.user is not None:
        try:
            if pwd.getpwnam(cfg.sandbox.user).pw_uid == 0:
                err(at("sandbox.user"), "sandbox.user", f"{cfg.sandbox.user!r} is uid 0: workers must not run as root")
        except (KeyError, ValueError):
            err(at("sandbox.user"), "sandbox.user", f"no such user {cfg.sandbox.user!r} on this host")
    sock = cfg.status.socket
    try:
        mode = os.lstat(sock).st_mode
    except (OSError, ValueError):
        mode = None
    if mode is not None and not stat.S_ISSOCK(mode):
        err(at("status.socket"), "status.socket",
            f"{sock} is {userfiles.kind(mode)}, not a socket: edged replaces only a socket there")


# Files whose content is a secret: anyone who reads them can act as this daemon on the broker.
_SECRETS = (("mqtt.password_file", lambda c: c.mqtt.password_file),
            ("mqtt.tls.key", lambda c: c.mqtt.tls.key if c.mqtt.tls else None))


def warnings(cfg: Config, loader: Loader) -> list[str]:
    out = []
    for key, get in _SECRETS:
        path = get(cfg)
        why = userfiles.exposure(path) if path else None
        if why:
            out.append(f"{loader.fname}{loader.where(key)} {key}: {why}; chmod o-rwx it")
    return out
