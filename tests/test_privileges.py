"""Workers of a daemon started as root run unprivileged (issue 17, point 8).

sandbox.harden() ends with drop_privileges(): every thread of the worker leaves uid 0 for
`sandbox.user` (default nobody) and holds no capability. Judged from outside, by the parent
reading /proc/<pid>/task/*/status of a live child, and end to end on the workers of a real
`edged run`. The drop can only be seen from a process that starts as root: these tests need
root, which `make test` has (it installs packages); elsewhere they say why they cannot run.
"""
from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import BUNDLED, ROOT

from edged import config
from edged.errors import ConfigError

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the drop from root can only be seen when started as root")
NOBODY = pwd.getpwnam("nobody")


def _other_user() -> pwd.struct_passwd:
    """A system user other than root and nobody (Debian: daemon, uid 1)."""
    for name in ("daemon", "bin", "sys"):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        if pw.pw_uid not in (0, NOBODY.pw_uid):
            return pw
    pytest.fail("no system user besides root and nobody on this host")


def _task_status(pid: int) -> dict[str, dict[str, str]]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        fields = {}
        for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        out[tid] = fields
    return out


def _assert_unprivileged(pid: int, pw: pwd.struct_passwd) -> None:
    tasks = _task_status(pid)
    assert tasks
    for tid, f in tasks.items():
        assert f["Uid"].split() == [str(pw.pw_uid)] * 4, (tid, f["Uid"])
        assert f["Gid"].split() == [str(pw.pw_gid)] * 4, (tid, f["Gid"])
        for cap in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
            assert int(f[cap], 16) == 0, (tid, cap, f[cap])
        assert "0" not in f["Groups"].split(), (tid, f["Groups"])


CHILD = """
import json, os, sys, threading
from edged import sandbox
threading.Thread(target=threading.Event().wait, daemon=True, name="like-xnnpack").start()  # before the drop
sandbox.harden(memory_limit_bytes=None, user={user!r})
try:
    os.setuid(0)
    back = "regained root"
except PermissionError:
    back = "refused"
sandbox.install_filter("kill")
print(json.dumps({{"setuid0": back, "threads": threading.active_count()}}), flush=True)
os.read(0, 1)  # stay alive while the parent looks at /proc
"""


def _child(user: str | None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(CHILD.format(user=user))], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@needs_root
@pytest.mark.parametrize("user", [None, "other"])
def test_harden_as_root_every_thread_unprivileged_and_cannot_return(user):
    pw = NOBODY if user is None else _other_user()
    p = _child(None if user is None else pw.pw_name)
    try:
        line = p.stdout.readline()
        assert line, p.stderr.read() if p.poll() is not None else "no output"
        report = json.loads(line)
        assert report == {"setuid0": "refused", "threads": 2}, report
        _assert_unprivileged(p.pid, pw)
        main = _task_status(p.pid)[str(p.pid)]
        assert int(main["CapBnd"], 16) == 0, main["CapBnd"]  # emptied before the uid changed
    finally:
        p.stdin.close()
        p.wait(10)
    assert p.returncode == 0, p.stderr.read()


@needs_root
@pytest.mark.parametrize("user, words", [("root", "it is uid 0"), ("no-such-user-e17", "no such user")])
def test_harden_refuses_root_or_unknown_user(user, words):
    code = (f"from edged import sandbox\ntry:\n    sandbox.harden(memory_limit_bytes=None, user={user!r})\n"
            "except sandbox.SandboxError as exc:\n    print('refused:', exc)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), check=False)
    assert r.returncode == 0 and r.stdout.startswith("refused:") and words in r.stdout, (r.stdout, r.stderr)


@pytest.mark.parametrize("user, words", [("root", "is uid 0"), ("no-such-user-e17", "no such user")])
def test_parse_sandbox_user_must_exist_and_not_be_root(user, words):
    with pytest.raises(ConfigError) as info:
        config.parse(f"sandbox:\n  user: {user}\n", "/srv/edged.yaml", Path("/srv"))
    assert str(info.value).startswith("edged.yaml:2 sandbox.user: ") and words in str(info.value)
    assert config.parse("sandbox:\n  user: nobody\n", "/srv/edged.yaml", Path("/srv")).sandbox.user == "nobody"


def _serve_one(d, client_factory) -> dict:
    c = client_factory(d.prefix)
    c.send((BUNDLED / "digits_sample.png").read_bytes(), "p1")
    res = c.wait(["p1"], 30)["p1"]
    assert res is not None and "error" not in res and res["classes"][0]["label"] == "7", res
    st = d.status()
    assert st and st["workers"], st
    return st


@needs_root
def test_root_daemon_workers_run_as_nobody_without_capabilities_and_serve(daemon_factory, client_factory):
    d = daemon_factory({"accelerator": {"workers": 2}})
    st = _serve_one(d, client_factory)
    assert len(st["workers"]) == 2
    for w in st["workers"]:
        assert w["sandboxed"] and w["rss_bytes"] > 0, w  # the root supervisor still reads the worker's /proc
        _assert_unprivileged(int(w["pid"]), NOBODY)
    daemon_task = _task_status(d.proc.pid)[str(d.proc.pid)]
    assert daemon_task["Uid"].split()[0] == "0"  # only the workers changed


@needs_root
def test_root_daemon_workers_run_as_sandbox_user(daemon_factory, client_factory):
    pw = _other_user()
    d = daemon_factory({"sandbox": {"user": pw.pw_name}})
    st = _serve_one(d, client_factory)
    for w in st["workers"]:
        _assert_unprivileged(int(w["pid"]), pw)


KEEPCAPS_CHILD = """
import ctypes, json, os
from edged import privileges
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(8, 1, 0, 0, 0) == 0  # PR_SET_KEEPCAPS: the permitted set survives leaving uid 0
os.setresgid({gid}, {gid}, {gid})
os.setresuid({uid}, {uid}, {uid})
hdr = privileges._CapHeader(privileges._CAP_VERSION_3, 0)
data = (privileges._CapData * 2)()
assert libc.capget(ctypes.byref(hdr), data) == 0
for d in data:
    d.effective = d.permitted  # a non-root process that holds capabilities (as with AmbientCapabilities=)
assert libc.capset(ctypes.byref(hdr), data) == 0
before = privileges.capabilities()["CapEff"]
became = privileges.drop_privileges()
after = privileges.capabilities()
print(json.dumps({{"before": before, "became": became, "eff": after["CapEff"], "prm": after["CapPrm"]}}))
"""


@needs_root
def test_drop_privileges_non_root_with_capabilities_clears_them():
    code = KEEPCAPS_CHILD.format(uid=NOBODY.pw_uid, gid=NOBODY.pw_gid)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd="/", check=False)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["before"] != 0, report  # the setup did leave capabilities to drop
    assert report == {"before": report["before"], "became": None, "eff": 0, "prm": 0}, report
