"""tools/install.sh and uninstall.sh into a staging root (ROOT=DIR): nothing on this system is touched.

Run from the checkout, as `make install` does: the installed config must name the model
inside the installed venv, not the checkout (which a device may delete afterwards).
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

PY = "/usr/bin/python3"  # the distribution's: install.sh refuses one under /root or /home (ProtectHome)


def _sh(script: str, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, ROOT=str(root), PYTHON=PY)
    env.pop("PYTHONPATH", None)
    return subprocess.run(["bash", str(ROOT / "tools" / script), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, check=False)


@pytest.mark.skipif(not Path(PY).exists(), reason=f"{PY} (a Python 3.11 outside /root and /home) is absent")
def test_install_into_staging_root_config_names_installed_model_rerun_keeps_it_uninstall_removes(tmp_path):
    root = tmp_path / "root"
    r = _sh("install.sh", root)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    conf = root / "etc/edged/edged.yaml"
    cfg = yaml.safe_load(conf.read_text())
    model, labels = cfg["model"]["path"], cfg["model"]["labels"]
    assert model.startswith("/opt/edged/venv/") and model.endswith("/edged/models/digits.tflite"), model
    assert (root / model.lstrip("/")).is_file() and (root / labels.lstrip("/")).is_file()
    assert cfg["status"]["socket"] == "/run/edged/edged.sock"
    assert (root / "etc/systemd/system/edged.service").is_file()
    assert os.readlink(root / "usr/local/bin/edged") == "/opt/edged/venv/bin/edged"
    conf.write_text(conf.read_text() + "\n# edited on the device\n")
    r = _sh("install.sh", root)  # idempotent: upgrades in place, keeps the edited config
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "kept existing" in r.stdout and conf.read_text().endswith("# edited on the device\n")
    r = _sh("uninstall.sh", root, "--purge")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert not (root / "opt/edged").exists() and not (root / "etc/edged").exists()
    assert not (root / "etc/systemd/system/edged.service").exists()
    assert not (root / "usr/local/bin/edged").is_symlink()
