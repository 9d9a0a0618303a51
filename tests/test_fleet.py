"""A fleet on separate hosts that loses a member mid-stream (issue 20).

Five network namespaces this module creates and removes (tests/netns.py):
Mosquitto in one, three `edged run` members of one shared-subscription group
in three more, and the requester, `edged send --fleet --count N --rate R`, in
the fifth; every host reaches only the broker, over a veth link on a private
address. Each case runs one stream twice: without re-sends (the figures:
sent, answered, answered twice, unanswered, when the broker noticed, time to
the last answer) and with `--retries` (every frame answered).

- kill: a member SIGKILLed mid-stream. Its kernel closes its sockets; the
  broker notices at once and ends its group session.
- kill-busy: the same, but the member's worker is stopped (SIGSTOP) first,
  until the member holds its Receive Maximum of frames: those go with it.
- cut: a member's link taken down mid-stream (no FIN, no RST). The broker
  notices only at its keepalive timeout (1.5 x mqtt.keepalive).
- term: a member SIGTERMed mid-stream: it leaves the group first and leaves
  no frame behind.
- term-busy: the same while it holds its Receive Maximum and the broker has
  queued more for it (its worker stopped, then continued after the SIGTERM):
  it serves those too before it closes the group's connection.
- term-race: term-busy with the broker stopped from before the SIGTERM until
  the member has answered what it held, so its PUBACKs reach the broker
  behind its UNSUBSCRIBE: it still serves what the broker sends after the
  UNSUBACK.
- return: a member SIGKILLed and started again mid-stream: it rejoins and
  takes its share again.

What a case asserts: every frame published after the broker logged the
member's group connection gone is answered (the broker's log line is seen
here after the broker acted on it, so "after" holds); no frame is answered
twice without re-sends (Mosquitto does not redeliver; a member answers once);
with re-sends, every frame is answered. The figures are printed
(`pytest -s tests/test_fleet.py`) for the README and the closing note.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

import netns
from conftest import ROOT, Daemon, edged_cmd, until
from edged.broker import Broker

REASON = netns.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"separate hosts need network namespaces: {REASON}")

RAW = np.zeros((1, 8, 8, 1), np.uint8).tobytes()  # a raw frame of the bundled digits model
GROUP, FLEET = "g", "fleet"
KEEPALIVE = 5  # the lowest mqtt.keepalive allows: the broker notices a cut link within 7.5 s
RATE = 30.0  # frames per second into the fleet
# seconds of stream: a cut member is noticed 1.5 x keepalive after its last packet, and Mosquitto 2.0 checks
# keepalives only every 6 s (src/keepalive.c): up to ~14 s here; its stream outlasts that by some seconds
SECONDS = {"kill": 10.0, "kill-busy": 10.0, "term": 10.0, "term-busy": 10.0, "term-race": 10.0, "return": 12.0,
           "cut": 22.0}
FAULT_AT = 2.0  # seconds of stream served before member 3 is hit
TIMEOUT, RETRIES = 3.0, 6  # re-sends cover 18 s: more than the ~14 s a cut member holds its share
FIGURES: list[dict[str, Any]] = []


class Member(Daemon):
    """`edged run` inside host i's namespace, a member of the group."""

    def __init__(self, tmp: Path, broker: Broker, hosts: netns.Hosts, i: int) -> None:
        super().__init__(tmp, broker, {
            "mqtt": {"host": hosts.broker_address(i), "port": broker.port, "keepalive": KEEPALIVE,
                     "reconnect_max_s": 2, "share": {"group": GROUP, "prefix": FLEET}},
            "queue": {"drain_timeout_s": 10}})
        self.ns = hosts.host(i)
        self.i = i

    def start(self, wait: bool = True) -> Member:
        self.proc = subprocess.Popen([*netns.Hosts.exec_prefix(self.ns), *edged_cmd("run", "-c", str(self.cfg_path))],
                                     env=self.env, stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        if wait:
            self.wait_joined()
        return self

    @property
    def share_id(self) -> str:
        return f"edged-{self.device_id}-share"

    def share(self) -> dict[str, Any] | None:
        st = self.status()
        return (st or {}).get("mqtt", {}).get("share")

    def wait_joined(self, timeout: float = 60) -> None:
        def joined() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"member {self.i} exited {self.proc.returncode}: {self.log()[-1500:]}")
            sh = self.share()
            return bool(sh and sh["subscribed"])

        until(joined, timeout, f"member {self.i} in the group", 0.1, detail=lambda: self.log()[-1500:])

    def taken(self) -> int:
        sh = self.share()
        return int(sh["taken"]) if sh else 0


class Fleet:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.hosts = netns.Hosts(4)  # hosts 1-3: members; host 4: the requester
        try:
            self.broker = Broker(tmp, ["log_type all"], netns=self.hosts.broker, host="0.0.0.0").start()
            self.members = [Member(tmp, self.broker, self.hosts, i) for i in (1, 2, 3)]
            for m in self.members:
                m.start(wait=False)
            for m in self.members:
                m.wait_joined()
        except BaseException:
            self.close()
            raise
        (tmp / "raw.bin").write_bytes(RAW)
        cfg = {"device_id": "requester", "mqtt": {"host": self.hosts.broker_address(4), "port": self.broker.port,
                                                  "share": {"group": GROUP, "prefix": FLEET}}}
        self.req_cfg = tmp / "requester.yaml"
        self.req_cfg.write_text(yaml.safe_dump(cfg))

    def broker_log(self) -> str:
        return self.broker.log.read_text(errors="replace")

    def heal(self) -> None:
        """Every member up, linked and in the group again before the next case."""
        for m in self.members:
            self.hosts.mend(m.i)
            if m.proc is None or m.proc.poll() is not None:
                m.start(wait=False)
        for m in self.members:
            m.wait_joined()

    def requester(self, seconds: float, retries: int, report: Path) -> subprocess.Popen[bytes]:
        count = int(RATE * seconds)
        cmd = [*self.hosts.exec_prefix(self.hosts.host(4)), *edged_cmd(
            "send", "-c", str(self.req_cfg), "--fleet", "--stream", "cam", "--count", str(count),
            "--rate", str(RATE), "--timeout", str(TIMEOUT), "--retries", str(retries), "--linger", "1",
            "--report", str(report), str(self.tmp / "raw.bin"))]
        return subprocess.Popen(cmd, env=self.members[0].env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=open(self.tmp / "requester.err", "ab"))

    def close(self) -> None:
        for m in getattr(self, "members", []):
            m.stop(signal.SIGKILL, 5)
        if getattr(self, "broker", None) is not None:
            self.broker.close()
        self.hosts.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Any:
    f = Fleet(tmp_path_factory.mktemp("fleet"))
    yield f
    f.close()
    if FIGURES:
        print(f"\nfleet figures (3 members, Mosquitto 2.0.11, keepalive {KEEPALIVE} s, {RATE:g} frames/s):")
        for row in FIGURES:
            print("  " + json.dumps(row))


def run_case(fleet: Fleet, case: str, retries: int) -> dict[str, Any]:
    """One stream through the whole fleet with member 3 hit mid-stream; the figures of that stream."""
    fleet.heal()
    victim = fleet.members[2]
    mark = len(fleet.broker_log())
    report = fleet.tmp / f"{case}-{retries}.json"
    before = sum(m.taken() for m in fleet.members)
    seconds = SECONDS[case]
    req = fleet.requester(seconds, retries, report)
    worker = None
    broker_stopped = False
    try:
        # mid-stream: FAULT_AT seconds of it taken by the group
        until(lambda: sum(m.taken() for m in fleet.members) - before >= RATE * FAULT_AT, 30,
              "the start of the stream served", 0.05)
        if case in ("kill-busy", "term-busy", "term-race"):  # a member that stalls holding frames
            worker = victim.status()["workers"][0]["pid"]
            os.kill(worker, signal.SIGSTOP)
            until(lambda: (victim.share() or {}).get("outstanding", 0) >= 2, 10, "member 3 holding 2 frames", 0.02)
            if case in ("term-busy", "term-race"):  # and the broker queueing its share behind those
                others = sum(m.taken() for m in fleet.members[:2])
                until(lambda: sum(m.taken() for m in fleet.members[:2]) >= others + 8, 10, "frames queued for it",
                      0.02)
        t_fault = time.monotonic()
        if case in ("kill", "kill-busy", "return"):
            victim.proc.send_signal(signal.SIGKILL)
        elif case == "term-race":
            # the member's PUBACKs go out behind its UNSUBSCRIBE, before the broker reads either: the broker
            # answers UNSUBACK first, then fills the freed Receive Maximum slots from its queue
            os.kill(fleet.broker.pid, signal.SIGSTOP)
            broker_stopped = True
            victim.proc.send_signal(signal.SIGTERM)
            until(lambda: "fleet: leaving" in victim.log(), 10, "member 3 leaving the group", 0.02)
            os.kill(worker, signal.SIGCONT)
            worker = None
            until(lambda: (victim.share() or {}).get("outstanding", 1) == 0, 10, "member 3 answering what it held",
                  0.02)
            os.kill(fleet.broker.pid, signal.SIGCONT)
            broker_stopped = False
        elif case in ("term", "term-busy"):
            victim.proc.send_signal(signal.SIGTERM)
            if worker is not None:  # it goes on once the member has begun to leave, its frames in hand
                until(lambda: "fleet: leaving" in victim.log(), 10, "member 3 leaving the group", 0.02)
                os.kill(worker, signal.SIGCONT)
                worker = None
        else:
            fleet.hosts.cut(victim.i)
        # the broker's word that the member's group session is gone (keepalive timeout for a cut link)
        gone = f"Client {victim.share_id} "

        def noticed() -> bool:
            return any(gone in line and ("disconnect" in line or "closed its connection" in line)
                       for line in fleet.broker_log()[mark:].splitlines())

        until(noticed, 1.5 * KEEPALIVE + 15, f"the broker noticing member 3 gone ({case})", 0.05)
        t_notice = time.monotonic()
        rejoined_taken = None
        if case in ("term", "term-busy", "term-race"):
            assert victim.proc.wait(20) == 0, victim.log()[-1500:]
            assert "nothing left behind" in victim.log(), victim.log()[-1500:]
        if case == "return":
            victim.proc.wait(10)
            victim.start(wait=False)
            victim.wait_joined(30)
        rc = req.wait(seconds + (retries + 2) * TIMEOUT + 30)
        if case == "return":
            rejoined_taken = victim.taken()
    finally:
        if broker_stopped:
            os.kill(fleet.broker.pid, signal.SIGCONT)
        if worker is not None:  # the stopped worker of the member we killed: ours, ended by its pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
        if req.poll() is None:
            req.kill()
            req.wait(5)
    rep = json.loads(report.read_text())
    s, t0 = rep["summary"], rep["t0_monotonic"]
    after = [f for f in rep["frames"] if t0 + f["sent_at"] > t_notice]
    late = [f for f in after if f["answered_at"] is None]
    row = {"case": case, "retries": retries, **{k: s[k] for k in (
        "sent", "answered", "answered_twice", "unanswered", "resent", "answered_after_resend", "error_answers")},
        "noticed_after_s": round(t_notice - t_fault, 2), "stream_s": seconds, "last_answer_s": s["last_answer_s"],
        "sent_after_notice": len(after), "unanswered_sent_after_notice": len(late),
        "rejoined_member_took": rejoined_taken}
    FIGURES.append(row)
    print(json.dumps(row))
    assert (rc == 0) == (s["unanswered"] == 0), (rc, s)
    assert s["error_answers"] == 0, row
    assert len(after) >= RATE * 2, f"the stream ended before it could show what comes after the notice: {row}"
    assert not late, f"frames published after the broker noticed member 3 gone went unanswered: {late[:5]}"
    if retries:
        assert s["unanswered"] == 0, row
    else:
        assert s["answered_twice"] == 0, row  # Mosquitto does not redeliver, and a member answers once
    return row


@pytest.mark.parametrize("retries", [0, RETRIES], ids=["figures", "retries"])
def test_member_sigkilled_mid_stream(fleet: Fleet, retries: int) -> None:
    row = run_case(fleet, "kill", retries)
    # what went with it: its frames in flight (Receive Maximum 2) and any the broker had queued for it
    assert retries or row["unanswered"] <= 10, row


@pytest.mark.parametrize("retries", [0, RETRIES], ids=["figures", "retries"])
def test_member_sigkilled_holding_frames_loses_at_most_those(fleet: Fleet, retries: int) -> None:
    row = run_case(fleet, "kill-busy", retries)
    if not retries:  # the two frames it held are gone with its session (Mosquitto redelivers nothing)
        assert 2 <= row["unanswered"] <= 10, row
    else:
        assert row["answered_after_resend"] >= 2, row


@pytest.mark.parametrize("retries", [0, RETRIES], ids=["figures", "retries"])
def test_member_link_cut_mid_stream(fleet: Fleet, retries: int) -> None:
    row = run_case(fleet, "cut", retries)
    # 1.5 x keepalive after the member's last packet, on Mosquitto 2.0's 6-second keepalive sweep
    assert row["noticed_after_s"] <= 1.5 * KEEPALIVE + 7 + 2, row


@pytest.mark.parametrize("retries", [0, RETRIES], ids=["figures", "retries"])
def test_member_sigtermed_mid_stream_leaves_nothing_behind(fleet: Fleet, retries: int) -> None:
    row = run_case(fleet, "term", retries)
    assert row["unanswered"] == 0 and row["answered_twice"] == 0, row


def test_member_sigtermed_holding_frames_serves_all_the_broker_sent_it(fleet: Fleet) -> None:
    row = run_case(fleet, "term-busy", 0)
    assert row["unanswered"] == 0 and row["answered_twice"] == 0, row
    # the broker had queued frames for it behind the two it held: they came after the UNSUBSCRIBE, and were served
    came = re.findall(r"nothing left behind \((\d+) frame\(s\) came after the UNSUBSCRIBE", fleet.members[2].log())
    assert came and int(came[-1]) >= 1, fleet.members[2].log()[-1500:]


@pytest.mark.parametrize("retries", [0, RETRIES], ids=["figures", "retries"])
def test_member_returning_takes_its_share_again(fleet: Fleet, retries: int) -> None:
    row = run_case(fleet, "return", retries)
    assert row["rejoined_member_took"] and row["rejoined_member_took"] >= 10, row


def test_member_sigtermed_whose_acks_go_out_behind_its_unsubscribe_leaves_nothing_behind(fleet: Fleet) -> None:
    """The race the CI run of 12-01 17:53 lost 4 frames to: the member answered what it held while its
    UNSUBSCRIBE travelled, the UNSUBACK came back with nothing outstanding, and the frames the broker sent
    into the slots those PUBACKs freed came after it, to a member that had closed. Here the broker is
    stopped so that the order is always that one."""
    row = run_case(fleet, "term-race", 0)
    assert row["unanswered"] == 0 and row["answered_twice"] == 0, row
