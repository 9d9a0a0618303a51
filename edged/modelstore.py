"""The versioned model store under `state_dir/models`: versions, the current pointer, the update record.

    state_dir/models/
      v00000007-1a2b3c4d5e6f/      one version: <name>.tflite, labels.txt (if any), meta.json
      state.json                   {"current", "previous", "last_update", "refused"}: the pointer

Every write is atomic: a version is written into `.tmp-*` (each file fsynced,
then the directory), renamed into place, and the models directory fsynced;
state.json is written beside itself, fsynced, renamed over, and the directory
fsynced. A power cut at any point leaves state.json naming a version that is
whole (old or new); leftovers of a cut (`.tmp-*`, a version no pointer names)
are cleared at the next open. A state.json that cannot be read, or a current
version whose model file is missing or does not match its sha256, makes the
store "empty": the config's model.path serves, with a warning.

Entries (current, previous) are dicts: serial, sha256, name, task, path,
labels, since; serial 0 (`"config": true`) is the config's own model.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from edged import faults
from edged.bundle import Bundle
from edged.errors import EdgedError

logger = logging.getLogger(__name__)

REFUSED_KEEP = 16  # digests of bundles rolled back, refused when offered again (a retained bundle would loop)


class StoreError(EdgedError):
    """The store cannot be written (state_dir missing, full, read-only)."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_atomic(path: Path, data: bytes, kill_step: str | None = None) -> None:
    """tmp beside it, fsync, rename over, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    _write_file(tmp, data)
    if kill_step:
        faults.kill_point(kill_step)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def sha256_file(path: str) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


class ModelStore:
    def __init__(self, state_dir: str, keep: int, config_entry: dict[str, Any]) -> None:
        self.root = Path(state_dir) / "models"
        self.keep = max(1, keep)
        self.config_entry = dict(config_entry, serial=0, config=True)
        self.current: dict[str, Any] = self.config_entry
        self.previous: list[dict[str, Any]] = []
        self.last_update: dict[str, Any] | None = None
        self.refused: list[str] = []
        self.warning: str | None = None

    # ---- reading ------------------------------------------------------------------------------------------------
    def open(self) -> None:
        """Read the pointer; clear leftovers of an interrupted apply. Never raises: at worst, the config model."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"state_dir: cannot create {self.root}: {exc.strerror}") from None
        path = self.root / "state.json"
        state: dict[str, Any] = {}
        if path.exists():
            try:
                state = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(state, dict):
                    raise ValueError("not an object")
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                self._warn(f"{path} is unreadable ({exc}): serving model.path {self.config_entry['path']}")
                state = {}
        cur = state.get("current")
        if isinstance(cur, dict) and not cur.get("config"):
            why = self._invalid(cur)
            if why:
                self._warn(f"{path}: the current model (serial {cur.get('serial')}) {why}: serving model.path "
                           f"{self.config_entry['path']}")
                cur = None
        self.current = cur if isinstance(cur, dict) and not cur.get("config") else self.config_entry
        prev_raw = state.get("previous")
        prev: list[Any] = prev_raw if isinstance(prev_raw, list) else []
        self.previous = [p if not p.get("config") else self.config_entry for p in prev
                         if isinstance(p, dict) and (p.get("config") or not self._invalid(p))]
        if self.current is not self.config_entry and not any(p.get("config") for p in self.previous):
            self.previous.append(self.config_entry)
        lu = state.get("last_update")
        self.last_update = lu if isinstance(lu, dict) else None
        self.refused = [s for s in state.get("refused", []) if isinstance(s, str)][-REFUSED_KEEP:]
        self._sweep()

    def _warn(self, msg: str) -> None:
        logger.warning("%s", msg)
        self.warning = msg

    def _invalid(self, e: dict[str, Any]) -> str | None:
        """Why a stored version cannot serve, or None: its files are there and the model is what it says."""
        path = e.get("path")
        if not isinstance(path, str) or not path.startswith(str(self.root) + "/"):
            return "names no file in the store"
        sha = sha256_file(path)
        if sha is None:
            return f"is missing ({path})"
        if sha != e.get("sha256"):
            return f"does not match its sha256 ({path})"
        labels = e.get("labels")
        if labels is not None and not (isinstance(labels, str) and os.path.isfile(labels)):
            return "has lost its labels file"
        if e.get("task") not in ("classify", "detect", "raw"):
            return "names no task"
        return None

    def _sweep(self) -> None:
        """Delete what no pointer names: interrupted writes, versions beyond `keep`."""
        named = {Path(e["path"]).parent.name for e in [self.current, *self.previous] if not e.get("config")}
        try:
            entries = list(self.root.iterdir())
        except OSError:
            return
        for p in entries:
            if p.is_file() and p.name.startswith(".") and p.name.endswith(".tmp"):  # a pointer write, cut
                p.unlink(missing_ok=True)
                logger.info("model store: removed %s (an interrupted write)", p.name)
            elif p.is_dir() and (p.name.startswith(".tmp-") or (p.name.startswith("v") and p.name not in named)):
                shutil.rmtree(p, ignore_errors=True)
                logger.info("model store: removed %s (no longer named)", p.name)

    # ---- queries ------------------------------------------------------------------------------------------------
    def serial(self) -> int:
        return int(self.current.get("serial", 0))

    def state_doc(self) -> dict[str, Any]:
        """P/model/state: INTERFACE's shape."""
        def pub(e: dict[str, Any]) -> dict[str, Any]:
            return {k: e.get(k) for k in ("serial", "sha256", "name", "since", "task")} | \
                ({"config": True} if e.get("config") else {})
        return {"current": pub(self.current), "previous": [pub(p) for p in self.previous],
                "last_update": self.last_update}

    # ---- writing ------------------------------------------------------------------------------------------------
    def write_version(self, b: Bundle) -> dict[str, Any]:
        """The bundle's files as a new version, atomically; returns its entry (not yet current)."""
        final = self.root / f"v{b.serial:08d}-{b.sha256[:12]}"
        tmp = self.root / f".tmp-{final.name}-{os.getpid()}"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            _write_file(tmp / f"{b.name}.tflite", b.model)
            if b.labels is not None:
                _write_file(tmp / "labels.txt", b.labels)
            meta = {"serial": b.serial, "sha256": b.sha256, "name": b.name, "task": b.task,
                    "bundle": b.digest, "created": b.created}
            _write_file(tmp / "meta.json", json.dumps(meta).encode())
            fsync_dir(tmp)
            faults.kill_point("after_write")
            if final.exists():  # an earlier apply of this very version, cut before its pointer moved
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(self.root)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError(f"cannot write the model into {self.root}: {exc.strerror or exc}") from None
        return {"serial": b.serial, "sha256": b.sha256, "name": b.name, "task": b.task, "bundle": b.digest,
                "path": str(final / f"{b.name}.tflite"),
                "labels": str(final / "labels.txt") if b.labels is not None else None, "since": None}

    def commit(self, new: dict[str, Any], last_update: dict[str, Any]) -> None:
        """Make `new` current (the old current first in previous), trim to `keep`, record the update."""
        new = dict(new, since=round(time.time(), 3))
        prev = [self.current] + [p for p in self.previous if p.get("sha256") != new.get("sha256")
                                 or p.get("config") != new.get("config")]
        self._set(new, prev, last_update, kill_step="before_rename")

    def rollback(self, last_update_fn: Any) -> dict[str, Any] | None:
        """previous[0] becomes current; the one left is refused from now on. None when there is nothing."""
        if not self.previous:
            return None
        back, rest = self.previous[0], self.previous[1:]
        failed = self.current
        refused = [*self.refused, failed["bundle"]] if failed.get("bundle") else self.refused
        self.refused = refused[-REFUSED_KEEP:]
        back = dict(back, since=round(time.time(), 3))
        self._set(back, rest, last_update_fn(failed, back))
        return back

    def record(self, last_update: dict[str, Any]) -> None:
        """A rejection: only last_update changes."""
        self._set(self.current, self.previous, last_update)

    def _set(self, current: dict[str, Any], previous: list[dict[str, Any]], last_update: dict[str, Any],
             kill_step: str | None = None) -> None:
        # keep: versions in the store, the current one included (the config's model costs no space)
        stored = 1 if not current.get("config") else 0
        kept = []
        for p in previous:
            if p.get("config"):
                kept.append(self.config_entry)
            elif stored < self.keep:
                kept.append(p)
                stored += 1
        doc = {"current": current, "previous": kept, "last_update": last_update, "refused": self.refused}
        try:
            write_atomic(self.root / "state.json", json.dumps(doc, indent=1).encode(), kill_step)
        except OSError as exc:
            raise StoreError(f"cannot write {self.root / 'state.json'}: {exc.strerror or exc}") from None
        self.current, self.previous, self.last_update = current, kept, last_update
        self._sweep()
