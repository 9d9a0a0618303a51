"""Model update bundles: building, signing, verifying and unpacking. The only module that imports `cryptography`.

A bundle is one MQTT payload:

    b"EDGEDMB1" | ed25519 signature (64 bytes) | body

The signature covers the magic and the body (everything but itself). The body
is a gzip-compressed tar of `manifest.json`, `model.tflite`, optionally
`labels.txt` and self-test frames `selftest/N.<ext>`. The manifest holds the
format, the integer `serial`, the task, the model's name and sha256, and the
self-test's expected outputs.

Unpacking treats the payload as hostile even when signed: the size cap comes
first, then the signature over the whole payload, and only then is anything in
it read. The gzip stream is inflated with a hard output limit (a decompression
bomb stops there), the tar is read from memory with at most MAX_MEMBERS
entries, each of which must be a regular file with one of the names above (no
`..`, no absolute path, no link, no device), and the manifest must agree with
the files (the model's sha256, the labels, the self-test frames).
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: cryptography costs the supervisor ~6 MiB and ~30 ms at start
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edged.errors import ConfigError, EdgedError

MAGIC = b"EDGEDMB1"
SIG_LEN = 64
HEADER = len(MAGIC) + SIG_LEN
FORMAT = 1
MAX_MEMBERS = 64
INFLATE_FACTOR = 2  # the unpacked bundle may be at most this many times model.update.max_mb
TASKS = ("classify", "detect", "raw")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
FRAME_RE = re.compile(r"selftest/[0-9]{1,3}\.(jpg|jpeg|png|bmp|raw)")


class BundleError(EdgedError):
    """A bundle refused; `kind` is the reason's short name (signature, size, format, unsafe, ...)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Bundle:
    """What a verified bundle holds."""

    serial: int
    task: str
    name: str
    model: bytes
    sha256: str  # of the model file
    labels: bytes | None = None
    selftest: tuple[tuple[str, bytes, dict[str, Any]], ...] = ()  # (member name, frame bytes, expected)
    digest: str = ""  # sha256 of the whole payload: which bundle this was
    created: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


# ---- keys -----------------------------------------------------------------------------------------------------------
def keygen(path: str) -> str:
    """Write a new ed25519 private key to `path` (mode 0600, PEM) and its public key to `path.pub`; return that."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    p = Path(path)
    import os

    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(priv)
    pub_path = Path(str(p) + ".pub")
    pub_path.write_bytes(pub)
    return str(pub_path)


def load_private_key(path: str) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the signing key: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path}: not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an ed25519 private key")
    return key


def load_public_key(path: str, where: str = "model.update.public_key") -> Ed25519PublicKey:
    """The daemon's trust anchor; ConfigError naming `where` when it is not an ed25519 public key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise ConfigError(f"{where}: {path} is not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{where}: {path} is not an ed25519 public key")
    return key


# ---- building -------------------------------------------------------------------------------------------------------
def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    tf.addfile(info, io.BytesIO(data))


def build(model: bytes, serial: int, key: Ed25519PrivateKey, *, name: str, task: str = "classify",
          labels: bytes | None = None, selftest: list[tuple[str, bytes, dict[str, Any]]] | None = None) -> bytes:
    """A signed bundle. selftest: (extension, frame bytes, expected) per frame (see `check_expect`)."""
    if task not in TASKS:
        raise BundleError("format", f"task must be one of {', '.join(TASKS)}")
    if not NAME_RE.fullmatch(name):
        raise BundleError("format", f"model name {name!r}: letters, digits, '.', '_', '-' only")
    frames = []
    for i, (ext, data, expect) in enumerate(selftest or ()):
        frames.append((f"selftest/{i}.{ext.lstrip('.').lower()}", data, expect))
    manifest = {"format": FORMAT, "serial": int(serial), "task": task, "name": name,
                "sha256": hashlib.sha256(model).hexdigest(), "labels": labels is not None,
                "selftest": [{"frame": n, "expect": e} for n, _, e in frames], "created": round(time.time(), 3)}
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "manifest.json", json.dumps(manifest).encode())
        _add(tf, "model.tflite", model)
        if labels is not None:
            _add(tf, "labels.txt", labels)
        for n, data, _ in frames:
            _add(tf, n, data)
    co = zlib.compressobj(6, zlib.DEFLATED, 31)  # gzip framing
    body = co.compress(raw.getvalue()) + co.flush()
    return MAGIC + key.sign(MAGIC + body) + body


# ---- verifying and unpacking ----------------------------------------------------------------------------------------
def verify(payload: bytes, key: Ed25519PublicKey, max_bytes: int) -> bytes:
    """Size, then the signature over the whole payload; return the body. Nothing in it is read before that."""
    if len(payload) > max_bytes:
        raise BundleError("size", f"bundle of {len(payload)} bytes is over model.update.max_mb ({max_bytes} bytes)")
    if len(payload) <= HEADER:
        raise BundleError("format", f"bundle of {len(payload)} bytes is too short to hold a signature")
    from cryptography.exceptions import InvalidSignature

    sig, body = payload[len(MAGIC):HEADER], payload[HEADER:]
    try:
        key.verify(sig, payload[:len(MAGIC)] + body)
    except InvalidSignature:
        raise BundleError("signature", "bad signature: not signed by model.update.public_key, or altered") from None
    if payload[:len(MAGIC)] != MAGIC:  # signed, so it is ours; a later format would be refused here
        raise BundleError("format", "not an edged model bundle (magic)")
    return body


def _inflate(body: bytes, limit: int) -> bytes:
    d = zlib.decompressobj(wbits=31)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as exc:
        raise BundleError("format", f"bundle body is not gzip data: {exc}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise BundleError("unsafe", f"bundle unpacks to more than {limit} bytes (a decompression bomb?)")
    if not d.eof:
        raise BundleError("format", "bundle body is truncated (gzip stream ends early)")
    return out


def _members(tar_bytes: bytes) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(tar_bytes), mode="r:") as tf:
            count = 0
            while True:
                m = tf.next()
                if m is None:
                    break
                count += 1
                if count > MAX_MEMBERS:
                    raise BundleError("unsafe", f"bundle has more than {MAX_MEMBERS} members")
                name = m.name
                if name.startswith("/") or ".." in name.split("/") or "\\" in name or "\0" in name:
                    raise BundleError("unsafe", f"bundle member {name[:100]!r}: path outside the bundle")
                if not m.isreg():
                    raise BundleError("unsafe", f"bundle member {name[:100]!r}: not a regular file")
                if name not in ("manifest.json", "model.tflite", "labels.txt") and not FRAME_RE.fullmatch(name):
                    raise BundleError("format", f"bundle member {name[:100]!r}: not a name a bundle may hold")
                if name in files:
                    raise BundleError("format", f"bundle member {name!r} appears twice")
                fh = tf.extractfile(m)
                data = fh.read() if fh is not None else b""
                if len(data) != m.size:
                    raise BundleError("format", f"bundle member {name!r} is truncated")
                files[name] = data
    except tarfile.TarError as exc:
        raise BundleError("format", f"bundle body is not a tar archive: {exc}") from None
    return files


def _manifest(files: dict[str, bytes]) -> dict[str, Any]:
    try:
        man = json.loads(files["manifest.json"])
    except KeyError:
        raise BundleError("format", "bundle has no manifest.json") from None
    except (ValueError, UnicodeDecodeError):
        raise BundleError("format", "manifest.json is not JSON") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise BundleError("format", f"manifest.json: format must be {FORMAT}")
    serial = man.get("serial")
    if not isinstance(serial, int) or isinstance(serial, bool) or not 0 < serial < 2 ** 63:
        raise BundleError("format", "manifest.json: serial must be a positive integer")
    if man.get("task") not in TASKS:
        raise BundleError("format", f"manifest.json: task must be one of {', '.join(TASKS)}")
    if not isinstance(man.get("name"), str) or not NAME_RE.fullmatch(man["name"]):
        raise BundleError("format", "manifest.json: name must be letters, digits, '.', '_', '-' (at most 100)")
    if not isinstance(man.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", man["sha256"]):
        raise BundleError("format", "manifest.json: sha256 must be 64 hex digits")
    if not isinstance(man.get("selftest", []), list):
        raise BundleError("format", "manifest.json: selftest must be a list")
    return man


def unpack(payload: bytes, key: Ed25519PublicKey, max_bytes: int) -> Bundle:
    """verify(), then the body: a Bundle, or BundleError saying why not."""
    body = verify(payload, key, max_bytes)
    files = _members(_inflate(body, INFLATE_FACTOR * max_bytes))
    man = _manifest(files)
    model = files.get("model.tflite")
    if model is None:
        raise BundleError("format", "bundle has no model.tflite")
    sha = hashlib.sha256(model).hexdigest()
    if sha != man["sha256"]:
        raise BundleError("format", "model.tflite does not match the manifest's sha256")
    labels = files.get("labels.txt")
    if bool(man.get("labels")) != (labels is not None):
        raise BundleError("format", "manifest.json: labels does not match the bundle's labels.txt")
    tests = []
    for i, entry in enumerate(man.get("selftest") or ()):
        if not isinstance(entry, dict) or not isinstance(entry.get("frame"), str) \
                or not isinstance(entry.get("expect"), dict):
            raise BundleError("format", f"manifest.json: selftest[{i}] must be {{frame, expect}}")
        if entry["frame"] not in files or not FRAME_RE.fullmatch(entry["frame"]):
            raise BundleError("format", f"manifest.json: selftest[{i}] names a frame the bundle lacks")
        tests.append((entry["frame"], files[entry["frame"]], entry["expect"]))
    created = man.get("created")
    return Bundle(serial=man["serial"], task=man["task"], name=man["name"], model=model, sha256=sha,
                  labels=labels, selftest=tuple(tests), digest=hashlib.sha256(payload).hexdigest(),
                  created=float(created) if isinstance(created, (int, float)) else 0.0)


def check_expect(task: str, body: dict[str, Any], expect: dict[str, Any]) -> str | None:
    """A bundle's self-test: None when a result body matches the expected entry, else what differs.

    Expected entries: {"top": ID} (classify: the best class; detect: the best detection) and, for raw
    outputs, {"outputs": [[floats] per output], "tolerance": T} (absolute, default 1e-3).
    """
    if "error" in body:
        return f"answered an error: {body['error'].get('code')}"
    if "top" in expect:
        items = body.get("classes") if task == "classify" else body.get("detections")
        got = items[0].get("id") if items else None
        if got != expect["top"]:
            return f"best class {got}, expected {expect['top']}"
    if "outputs" in expect:
        tol = float(expect.get("tolerance", 1e-3))
        outs = body.get("outputs") or []
        for i, want in enumerate(expect["outputs"]):
            data = outs[i].get("data") if i < len(outs) else None
            if not isinstance(data, list) or len(data) != len(want):
                return f"output {i}: {0 if data is None else len(data)} values, expected {len(want)}"
            diff = max((abs(float(a) - float(b)) for a, b in zip(data, want, strict=False)), default=0.0)
            if diff > tol:
                return f"output {i} differs by {diff:.4g} (tolerance {tol:g})"
    return None
