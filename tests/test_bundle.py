"""Update bundles and the model store without a daemon: real ed25519 keys, real tar/gzip bytes, a real
directory. Each hostile bundle is refused with its reason's kind; the store survives what a cut leaves."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from edged import bundle
from edged.modelstore import ModelStore
from tests.conftest import BUNDLED

MODEL = (BUNDLED / "digits.tflite").read_bytes()
CAP = 8 << 20


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Any, Any, Any]:
    pub = bundle.keygen(str(tmp_path / "k"))
    bundle.keygen(str(tmp_path / "other"))
    return (bundle.load_private_key(str(tmp_path / "k")), bundle.load_public_key(pub),
            bundle.load_private_key(str(tmp_path / "other")))


def signed(key: Any, body: bytes) -> bytes:
    return bundle.MAGIC + key.sign(bundle.MAGIC + body) + body


def tar_gz(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return gzip.compress(raw.getvalue())


def manifest(**over: Any) -> bytes:
    m = {"format": 1, "serial": 3, "task": "classify", "name": "digits",
         "sha256": hashlib.sha256(MODEL).hexdigest(), "labels": False, **over}
    return json.dumps(m).encode()


def reg(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def test_round_trip(keys: Any) -> None:
    priv, pub, _ = keys
    p = bundle.build(MODEL, 42, priv, name="digits", labels=b"0\n1\n",
                     selftest=[("bmp", b"BMxx", {"top": 1})])
    b = bundle.unpack(p, pub, CAP)
    assert (b.serial, b.name, b.task, b.model, b.labels) == (42, "digits", "classify", MODEL, b"0\n1\n")
    assert b.sha256 == hashlib.sha256(MODEL).hexdigest() and b.digest == hashlib.sha256(p).hexdigest()
    assert b.selftest == (("selftest/0.bmp", b"BMxx", {"top": 1}),)


def kind_of(payload: bytes, pub: Any, cap: int = CAP) -> str:
    with pytest.raises(bundle.BundleError) as e:
        bundle.unpack(payload, pub, cap)
    assert str(e.value)
    return e.value.kind


def test_signature_size_and_truncation_come_first(keys: Any) -> None:
    priv, pub, other = keys
    p = bundle.build(MODEL, 1, priv, name="digits")
    assert kind_of(p[:-1], pub) == "signature"
    assert kind_of(p[:bundle.HEADER + 5], pub) == "signature"
    assert kind_of(p[:10], pub) == "format"
    assert kind_of(bundle.build(MODEL, 1, other, name="digits"), pub) == "signature"
    flipped = bytearray(p)
    flipped[-3] ^= 1
    assert kind_of(bytes(flipped), pub) == "signature"
    assert kind_of(p, pub, cap=len(p) - 1) == "size"
    wrong_magic = b"EDGEDMB9" + priv.sign(b"EDGEDMB9" + p[bundle.HEADER:]) + p[bundle.HEADER:]
    assert kind_of(wrong_magic, pub) == "format"


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "/etc/passwd", "selftest/../../x", "x\\..\\y"])
def test_member_names_outside_the_bundle(keys: Any, name: str) -> None:
    priv, pub, _ = keys
    body = tar_gz([(reg("manifest.json"), manifest()), (reg("model.tflite"), MODEL), (reg(name), b"x")])
    assert kind_of(signed(priv, body), pub) == "unsafe"


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE])
def test_members_that_are_not_regular_files(keys: Any, kind: bytes) -> None:
    priv, pub, _ = keys
    link = reg("model.tflite")
    link.type = kind
    link.linkname = "/etc/shadow"
    body = tar_gz([(reg("manifest.json"), manifest()), (link, b"")])
    assert kind_of(signed(priv, body), pub) == "unsafe"


def test_decompression_bomb_and_member_count(keys: Any) -> None:
    priv, pub, _ = keys
    bomb = gzip.compress(bytes(3 * CAP))  # inflates past INFLATE_FACTOR x the cap
    assert len(bomb) < CAP
    assert kind_of(signed(priv, bomb), pub) == "unsafe"
    many = tar_gz([(reg(f"selftest/{i}.raw"), b"x") for i in range(bundle.MAX_MEMBERS + 1)])
    assert kind_of(signed(priv, many), pub) == "unsafe"


@pytest.mark.parametrize("members,why", [
    ([("model.tflite", MODEL)], "no manifest"),
    ([("manifest.json", b"{not json")], "not JSON"),
    ([("manifest.json", manifest(format=2)), ("model.tflite", MODEL)], "format"),
    ([("manifest.json", manifest(serial=0)), ("model.tflite", MODEL)], "serial"),
    ([("manifest.json", manifest(serial=True)), ("model.tflite", MODEL)], "serial"),
    ([("manifest.json", manifest(task="evil")), ("model.tflite", MODEL)], "task"),
    ([("manifest.json", manifest(name="../x")), ("model.tflite", MODEL)], "name"),
    ([("manifest.json", manifest())], "no model"),
    ([("manifest.json", manifest()), ("model.tflite", MODEL + b"x")], "sha256"),
    ([("manifest.json", manifest(labels=True)), ("model.tflite", MODEL)], "labels"),
    ([("manifest.json", manifest()), ("model.tflite", MODEL), ("notes.txt", b"hi")], "name a bundle"),
    ([("manifest.json", manifest()), ("manifest.json", manifest()), ("model.tflite", MODEL)], "twice"),
    ([("manifest.json", manifest(selftest=[{"frame": "selftest/0.bmp", "expect": {}}])), ("model.tflite", MODEL)],
     "lacks"),
])
def test_malformed_bodies(keys: Any, members: list[tuple[str, bytes]], why: str) -> None:
    priv, pub, _ = keys
    with pytest.raises(bundle.BundleError) as e:
        bundle.unpack(signed(priv, tar_gz([(reg(n), d) for n, d in members])), pub, CAP)
    assert e.value.kind == "format" and why in str(e.value), str(e.value)


def test_check_expect() -> None:
    body = {"classes": [{"id": 3, "score": 0.9}]}
    assert bundle.check_expect("classify", body, {"top": 3}) is None
    assert "expected 4" in str(bundle.check_expect("classify", body, {"top": 4}))
    assert "error" in str(bundle.check_expect("classify", {"error": {"code": "x"}}, {"top": 3}))
    raw = {"outputs": [{"data": [0.5, 0.25]}]}
    assert bundle.check_expect("raw", raw, {"outputs": [[0.5, 0.2505]]}) is None
    assert "differs" in str(bundle.check_expect("raw", raw, {"outputs": [[0.5, 0.3]]}))


# ---- the store -------------------------------------------------------------------------------------------------
def config_entry() -> dict[str, Any]:
    return {"sha256": hashlib.sha256(MODEL).hexdigest(), "name": "digits", "task": "classify",
            "path": str(BUNDLED / "digits.tflite"), "labels": None, "since": None}


def version(keys: Any, serial: int, payload: bytes) -> bundle.Bundle:
    return bundle.unpack(bundle.build(payload, serial, keys[0], name=f"m{serial}"), keys[1], CAP)


def test_store_versions_keep_and_restart(tmp_path: Path, keys: Any) -> None:
    s = ModelStore(str(tmp_path), keep=2, config_entry=config_entry())
    s.open()
    assert s.serial() == 0 and s.current.get("config")
    for n in (1, 2, 3):
        b = version(keys, n, MODEL + bytes([n]))
        s.commit(s.write_version(b), {"serial": n, "result": "applied"})
    assert s.serial() == 3
    assert [p["serial"] for p in s.previous] == [2, 0]  # keep 2 versions: 3 and 2; the config's costs nothing
    dirs = sorted(p.name for p in (tmp_path / "models").iterdir() if p.is_dir())
    assert [d[:9] for d in dirs] == ["v00000002", "v00000003"]
    again = ModelStore(str(tmp_path), keep=2, config_entry=config_entry())
    again.open()
    assert again.serial() == 3 and again.warning is None
    back = again.rollback(lambda f, b: {"result": "rolled_back", "serial": f["serial"]})
    assert back is not None and back["serial"] == 2 and again.refused


def test_store_corrupt_falls_back_to_the_config_model(tmp_path: Path, keys: Any) -> None:
    s = ModelStore(str(tmp_path), keep=3, config_entry=config_entry())
    s.open()
    b = version(keys, 5, MODEL + b"five")
    s.commit(s.write_version(b), {"serial": 5, "result": "applied"})
    Path(s.current["path"]).write_bytes(b"half a model")  # a file changed under us
    t = ModelStore(str(tmp_path), keep=3, config_entry=config_entry())
    t.open()
    assert t.current.get("config") and "does not match its sha256" in str(t.warning)
    (tmp_path / "models" / "state.json").write_text("{truncated")
    u = ModelStore(str(tmp_path), keep=3, config_entry=config_entry())
    u.open()
    assert u.current.get("config") and "unreadable" in str(u.warning)
