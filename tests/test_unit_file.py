"""systemd/edged.service: directives by value, systemd-analyze verify and security.

The exposure score alone hides typos (an unknown key is ignored with a
warning, and `verify` still exits 0), so the directives are also asserted
from the text.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "edged.service"
MAX_EXPOSURE = 2.0

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (apt-get install systemd)",
)


def directives(section: str = "Service") -> dict[str, list[str]]:
    """Key -> values in order, for one [section] (comments and blanks skipped)."""
    out: dict[str, list[str]] = {}
    current = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            continue
        if current == section:
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def last(key: str, section: str = "Service") -> str:
    values = directives(section).get(key)
    assert values, f"{key}= missing from [{section}]"
    return values[-1]


def words(key: str) -> set[str]:
    """Space-separated values of a list directive, all of its lines together."""
    return {w for v in directives().get(key, []) for w in v.split()}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("WatchdogSec", "30"),
        ("ExecStart", "/usr/local/bin/edged run -c /etc/edged/edged.yaml"),
        ("Restart", "on-failure"),
        ("RestartPreventExitStatus", "78"),
        ("TimeoutStopSec", "30"),
        ("User", "edged"),
        ("Group", "edged"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("CapabilityBoundingSet", ""),
        ("AmbientCapabilities", ""),
        ("SystemCallArchitectures", "native"),
        ("DevicePolicy", "closed"),
        ("RuntimeDirectory", "edged"),
        ("RuntimeDirectoryMode", "0750"),
        ("StateDirectory", "edged"),
        ("UMask", "0027"),
        ("ProtectProc", "invisible"),
        ("MemoryDenyWriteExecute", "yes"),
        ("LockPersonality", "yes"),
        ("RestrictNamespaces", "yes"),
        ("RestrictRealtime", "yes"),
        ("RestrictSUIDSGID", "yes"),
        ("KillMode", "mixed"),
    ],
)
def test_unit_directive_has_expected_value(key: str, value: str) -> None:
    assert last(key) == value


def test_unit_exec_reload_sends_hup_to_main_pid() -> None:
    assert re.fullmatch(r"\S*kill -(HUP|SIGHUP|s HUP) \$MAINPID", last("ExecReload"))


def test_unit_syscall_filter_allows_seccomp_for_worker() -> None:
    first = directives()["SystemCallFilter"][0].split()
    assert "@system-service" in first
    assert "seccomp" in first, "worker's own filter load fails with ECANCELED"
    for deny in directives()["SystemCallFilter"][1:]:
        assert deny.startswith("~") and "seccomp" not in deny


def test_unit_address_families_cover_mqtt_and_unix_sockets() -> None:
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= words("RestrictAddressFamilies")


def test_unit_device_acl_covers_coral_and_gpu() -> None:
    allowed = {v.split()[0] for v in directives()["DeviceAllow"]}
    assert "/dev/apex_0" in allowed
    assert "char-usb_device" in allowed
    assert allowed & {"/dev/dri/renderD128", "char-drm"}


def test_unit_has_no_supplementary_groups_that_may_be_missing() -> None:
    # A group missing on the host fails the start with 216/GROUP; install.sh
    # adds the user to the device groups that exist instead.
    assert "SupplementaryGroups" not in directives()


def test_unit_installs_into_multi_user_target() -> None:
    assert last("WantedBy", "Install") == "multi-user.target"


@needs_analyze
def test_unit_verify_reports_no_unknown_keys_or_errors() -> None:
    r = subprocess.run(
        ["systemd-analyze", "verify", "--recursive-errors=no", "--man=no", str(UNIT)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # The one tolerated complaint: the daemon is not installed on this machine.
    lines = [
        ln
        for ln in (r.stdout + r.stderr).splitlines()
        if ln.strip() and not re.search(r"Command /usr/local/bin/edged is not executable", ln)
    ]
    assert not lines, "\n".join(lines)


@needs_analyze
def test_unit_security_exposure_is_low() -> None:
    r = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for \S+:\s*([0-9.]+)", r.stdout + r.stderr)
    assert m, f"no score in output: {(r.stdout + r.stderr)[-500:]}"
    assert float(m.group(1)) <= MAX_EXPOSURE
