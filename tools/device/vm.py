"""The emulated device: boot it under qemu-system-aarch64 (TCG), run commands in it over ssh.

The image (tools/device/build_image.sh) is booted with snapshot=on, so every
boot starts from the same pristine device and nothing is written back. The
network is qemu's user-mode stack with restrict=on: the device reaches
nothing outside; the host reaches its sshd and its Mosquitto through two
ports forwarded on 127.0.0.1 only.
"""
from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

logger = logging.getLogger(__name__)


class DeviceError(Exception):
    """The device did not boot, or a command in it failed."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Device:
    """One boot of the cached image: 512 MB, 2 Cortex-A72 CPUs."""

    def __init__(self, cache: Path, rundir: Path, *, memory_mb: int = 512, cpus: int = 2) -> None:
        self.cache, self.rundir = cache, rundir
        self.memory_mb, self.cpus = memory_mb, cpus
        self.ssh_port, self.mqtt_port = free_port(), free_port()
        self.console = rundir / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.boot_s = 0.0

    def boot(self, timeout: float = 300) -> float:
        c = self.cache
        fwd = f"hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22,hostfwd=tcp:127.0.0.1:{self.mqtt_port}-:1883"
        cmd = ["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a72", "-smp", str(self.cpus),
               "-m", str(self.memory_mb), "-display", "none", "-monitor", "none", "-no-reboot",
               "-serial", f"file:{self.console}",
               "-kernel", str(c / "vmlinuz"), "-initrd", str(c / "initrd.img"),
               "-append", "root=/dev/vda rw console=ttyAMA0 panic=-1 loglevel=4",
               "-drive", f"file={c / 'rootfs.img'},if=none,format=raw,id=hd,snapshot=on",
               "-device", "virtio-blk-device,drive=hd",
               "-netdev", f"user,id=net0,restrict=on,{fwd}", "-device", "virtio-net-device,netdev=net0",
               "-device", "virtio-rng-device"]
        logger.info("booting: %s", shlex.join(cmd))
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=open(self.rundir / "qemu.log", "wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DeviceError(
                    f"qemu exited with {self.proc.returncode}; see {self.rundir}/qemu.log, {self.console}"
                )
            r = self.ssh("systemctl is-system-running --wait >/dev/null 2>&1; echo up", timeout=60, check=False)
            if r.returncode == 0 and r.stdout.strip().endswith("up"):
                self.boot_s = time.monotonic() - t0
                return self.boot_s
            time.sleep(2)
        raise DeviceError(f"no ssh into the device within {timeout:.0f} s; see {self.console}")

    def _ssh_base(self) -> list[str]:
        return ["ssh", "-i", str(self.cache / "id_ed25519"), "-p", str(self.ssh_port),
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=15",
                "-o", "ControlMaster=auto", "-o", f"ControlPath={self.rundir}/ssh-%p.sock",
                "-o", "ControlPersist=900", "root@127.0.0.1"]

    def ssh(self, command: str, *, timeout: float = 600, check: bool = True, stdin: bytes | None = None
            ) -> subprocess.CompletedProcess[str]:
        logger.debug("device$ %s", command)
        try:
            r = subprocess.run([*self._ssh_base(), command], input=stdin.decode("latin-1") if stdin else None,
                               capture_output=True, text=True, timeout=timeout, check=False,
                               stdin=None if stdin else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise DeviceError(f"device command timed out after {timeout:.0f} s: {command}") from exc
        if check and r.returncode != 0:
            raise DeviceError(
                f"device command failed ({r.returncode}): {command}\n{r.stdout[-2000:]}{r.stderr[-2000:]}"
            )
        return r

    def put_tar(self, tar_bytes: bytes, dest: str) -> None:
        """Unpack a tar archive (bytes) at dest inside the device."""
        cmd = [*self._ssh_base(), f"mkdir -p {shlex.quote(dest)} && tar -x -C {shlex.quote(dest)}"]
        r = subprocess.run(cmd, input=tar_bytes, capture_output=True, timeout=600, check=False)
        if r.returncode != 0:
            raise DeviceError(f"copy into {dest} failed: {r.stderr.decode(errors='replace')[-2000:]}")

    def shutdown(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.ssh("systemctl poweroff", timeout=20, check=False)
        except DeviceError:
            pass  # the connection goes down with the device
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        subprocess.run([*self._ssh_base()[:-1], "-O", "exit", "root@127.0.0.1"], capture_output=True, check=False)
