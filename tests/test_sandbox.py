"""edged.sandbox against the real kernel: every case runs in a fresh child
Python (harden + install_filter are one-way), the parent judges by exit
status, stdout and /proc."""
from __future__ import annotations

import ctypes
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODELS = Path("/work/shared/models")
SIGSYS = -signal.SIGSYS  # Popen.returncode of a child killed by seccomp

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from edged.sandbox import SandboxError, allowed_syscalls, seccomp_mode  # noqa: E402 (after the sys.path line)

PRELUDE = "import os, sys\nfrom edged import sandbox\n"


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_child(code: str, *, pass_fds: tuple[int, ...] = (), args: tuple[str, ...] = (),
              timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code), *args],
                          cwd=REPO, env=_child_env(), pass_fds=pass_fds, capture_output=True,
                          text=True, timeout=timeout, check=False)


def script(before: str, after: str, mode: str = "kill", keep: str = "()", memory: str = "None") -> str:
    """before, then harden() and install_filter(mode), then after."""
    return (textwrap.dedent(before) + f"\nsandbox.harden(memory_limit_bytes={memory}, keep_fds={keep})\n"
            f"sandbox.install_filter({mode!r})\n" + textwrap.dedent(after))


FORBIDDEN = {
    "socket": ("import socket", "socket.socket()"),
    "open": ("", "open(sys.executable, 'rb')"),
    "execv": ("", "os.execv(sys.executable, [sys.executable, '-c', 'pass'])"),
    "fork": ("", "os.fork()"),
    "subprocess": ("import subprocess", "subprocess.run(['true'])"),
}


@pytest.mark.parametrize("case", sorted(FORBIDDEN))
def test_install_filter_forbidden_call_killed_with_sigsys(case: str) -> None:
    before, call = FORBIDDEN[case]
    r = run_child(script(before, f"print('armed', flush=True)\n{call}\nprint('survived', flush=True)\n"))
    assert r.returncode == SIGSYS, (r.returncode, r.stdout, r.stderr)
    assert r.stdout.split() == ["armed"]  # alive under the filter until that very call


def test_install_filter_log_mode_forbidden_call_survives() -> None:
    r = run_child(script("import socket", "s = socket.socket()\nprint('survived', s.fileno() >= 0)\n", "log"))
    assert r.returncode == 0, r.stderr
    assert "survived True" in r.stdout


def test_install_filter_running_child_status_shows_filter_on_every_thread() -> None:
    code = script("""
        import threading, time
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()  # exists before the filter
    """, "print('ready', flush=True)\ntime.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], cwd=REPO, env=_child_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready", p.stderr.read() if p.stderr else ""
        status = dict(line.split(":", 1) for line in Path(f"/proc/{p.pid}/status").read_text().splitlines())
        assert status["Seccomp"].strip() == "2"
        assert status["NoNewPrivs"].strip() == "1"
        assert seccomp_mode(p.pid) == 2
        tids = os.listdir(f"/proc/{p.pid}/task")
        assert len(tids) == 2
        for tid in tids:  # TSYNC: the thread started before the filter has it too
            assert "Seccomp:\t2" in Path(f"/proc/{p.pid}/task/{tid}/status").read_text()
    finally:
        p.kill()
        p.communicate(timeout=10)


def test_install_filter_thread_started_before_filter_forbidden_call_kills_process() -> None:
    code = script("""
        import socket, threading
        go = threading.Event()
        def late():
            go.wait()
            socket.socket()
        t = threading.Thread(target=late)
        t.start()
    """, "go.set()\nt.join()\nprint('survived', flush=True)\n")
    r = run_child(code)
    assert r.returncode == SIGSYS, (r.returncode, r.stderr)
    assert "survived" not in r.stdout


def test_install_filter_new_thread_works_clone3_gets_enosys() -> None:
    code = script("""
        import ctypes, threading
        libc = ctypes.CDLL(None, use_errno=True)
    """, """
        out = []
        t = threading.Thread(target=lambda: out.append(21 * 2))
        t.start()
        t.join()
        rc = libc.syscall(435, None, 0)  # clone3
        print(out[0], rc, ctypes.get_errno(), flush=True)
    """)
    r = run_child(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["42", "-1", str(errno.ENOSYS)]


def test_install_filter_abort_dies_of_sigabrt_not_sigsys() -> None:
    r = run_child(script("import ctypes\nlibc = ctypes.CDLL(None)", "libc.abort()\n"))
    assert r.returncode == -signal.SIGABRT


def test_install_filter_unknown_mode_raises_sandboxerror() -> None:
    r = run_child("""
        try:
            sandbox.install_filter("audit")
        except sandbox.SandboxError as exc:
            print("refused:", exc)
    """)
    assert r.returncode == 0 and "refused" in r.stdout


def test_harden_inherited_fds_closed_limits_set() -> None:
    stray_r, stray_w = os.pipe()
    keep_r, keep_w = os.pipe()
    try:
        code = """
            import resource
            stray, keep = int(sys.argv[1]), int(sys.argv[2])
            sandbox.harden(memory_limit_bytes=1 << 30, max_open_files=32, keep_fds=(keep,))
            try:
                os.fstat(stray)
                print("stray open")
            except OSError:
                print("stray closed")
            os.fstat(keep)
            print(sorted(int(n) for n in os.listdir("/proc/self/fd")))
            print(resource.getrlimit(resource.RLIMIT_CORE), resource.getrlimit(resource.RLIMIT_NOFILE),
                  resource.getrlimit(resource.RLIMIT_DATA))
        """
        r = run_child(code, pass_fds=(stray_r, keep_r), args=(str(stray_r), str(keep_r)))
    finally:
        for fd in (stray_r, stray_w, keep_r, keep_w):
            os.close(fd)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "stray closed"
    left = json.loads(lines[1])
    assert keep_r in left and stray_r not in left and len(left) <= 5  # 0, 1, 2, keep + listdir's own
    assert lines[2] == f"(0, 0) (32, 32) ({1 << 30}, {1 << 30})"


def test_harden_keep_fd_not_open_raises_sandboxerror() -> None:
    r = run_child("""
        try:
            sandbox.harden(memory_limit_bytes=None, keep_fds=(987,))
        except sandbox.SandboxError as exc:
            print("refused:", exc)
    """)
    assert "refused: fd 987" in r.stdout, r.stderr


def test_harden_memory_limit_exhausted_raises_memoryerror() -> None:
    code = script("", """
        held = []
        try:
            while True:
                held.append(bytearray(256 * 1024))
        except MemoryError:
            n = len(held)
            held.clear()
            print("MemoryError after", n // 4, "MiB", flush=True)
    """, memory="256 << 20")
    r = run_child(code)
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert "MemoryError after" in r.stdout


def test_harden_thread_heap_shrink_under_filter_survives() -> None:
    # glibc opens /proc/sys/vm/overcommit_memory the first time a thread's heap
    # shrinks; harden() makes that happen before the filter.
    code = script("""
        import ctypes, threading
        libc = ctypes.CDLL(None)
        malloc, free = libc.malloc, libc.free
        malloc.restype, malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
        free.argtypes = (ctypes.c_void_p,)
        def churn():
            blocks = [malloc(96 * 1024) for _ in range(64)]
            for b in reversed(blocks):
                free(b)
    """, "t = threading.Thread(target=churn)\nt.start()\nt.join()\nprint('ok', flush=True)\n")
    r = run_child(code)
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert r.stdout.strip() == "ok"


def test_install_filter_memfd_over_socketpair_mmapped_and_shared() -> None:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    code = script("""
        import array, mmap, socket
        sock = socket.socket(fileno=int(sys.argv[1]))  # probes the fd: before the filter
    """, """
        data, anc, flags, _ = sock.recvmsg(64, socket.CMSG_SPACE(4))
        fds = array.array("i")
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % 4])
        seg = mmap.mmap(fds[0], int(data), flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        os.close(fds[0])
        seen = bytes(seg[:4])
        seg[:4] = b"pong"
        seg.close()
        sock.sendall(seen)
    """, keep="(sock.fileno(),)")
    memfd = os.memfd_create("edged-test")
    try:
        os.ftruncate(memfd, 1 << 20)
        os.pwrite(memfd, b"ping", 0)
        p = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(code), str(child.fileno())],
                             cwd=REPO, env=_child_env(), pass_fds=(child.fileno(),), stderr=subprocess.PIPE)
        child.close()
        parent.sendmsg(
            [str(1 << 20).encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, memfd.to_bytes(4, sys.byteorder))]
        )
        parent.settimeout(30)
        seen = parent.recv(4)
        _, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        assert seen == b"ping"
        assert os.pread(memfd, 4, 0) == b"pong"
    finally:
        os.close(memfd)
        parent.close()


MAPPINGS = {
    "mmap_prot_exec": "mmap.mmap(fd, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC)",
    "mprotect_exec": ("m = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE)\n"
                      "addr = ctypes.addressof(ctypes.c_char.from_buffer(m))\n"
                      "libc.mprotect(ctypes.c_void_p(addr), 4096, mmap.PROT_READ | mmap.PROT_EXEC)"),
    "anonymous_shared": "mmap.mmap(-1, 4096)",  # MAP_SHARED|MAP_ANONYMOUS would escape RLIMIT_DATA
}


@pytest.mark.parametrize("case", sorted(MAPPINGS))
def test_install_filter_forbidden_mapping_killed_with_sigsys(case: str) -> None:
    memfd = os.memfd_create("edged-test")
    try:
        os.ftruncate(memfd, 4096)
        code = script("import ctypes, mmap\nlibc = ctypes.CDLL(None)\nfd = int(sys.argv[1])",
                      "print('armed', flush=True)\n" + MAPPINGS[case] + "\nprint('survived', flush=True)\n",
                      keep="(fd,)")
        r = run_child(code, pass_fds=(memfd,), args=(str(memfd),))
    finally:
        os.close(memfd)
    assert r.returncode == SIGSYS, (r.returncode, r.stdout, r.stderr)
    assert r.stdout.split() == ["armed"]


INFER_CHILD = """
    import io, json
    import numpy as np
    from PIL import Image
    from ai_edge_litert.interpreter import Interpreter

    model_path, image_path = sys.argv[1], sys.argv[2]
    it = Interpreter(model_path=model_path, num_threads=2)
    it.allocate_tensors()
    inp = it.get_input_details()[0]
    outs = it.get_output_details()
    it.set_tensor(inp["index"], np.zeros(inp["shape"], inp["dtype"]))
    it.invoke()
    Image.init()
    for fmt in ("JPEG", "PNG", "BMP"):
        buf = io.BytesIO()
        Image.new("RGB", (9, 7), (1, 2, 3)).save(buf, fmt)
        Image.open(io.BytesIO(buf.getvalue())).convert("RGB").resize((4, 4), Image.BILINEAR)
    frames = {"bmp": open(image_path, "rb").read()}
    src = Image.open(io.BytesIO(frames["bmp"])).convert("RGB")
    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        src.save(buf, fmt, quality=95)
        frames[fmt.lower()] = buf.getvalue()
    status = os.open("/proc/self/status", os.O_RDONLY)  # read after the filter: proves it is on
    h, w = int(inp["shape"][1]), int(inp["shape"][2])

    sandbox.harden(memory_limit_bytes=512 << 20, keep_fds=(status,))
    sandbox.install_filter("kill")

    results = {}
    for kind, data in frames.items():
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (w, h))
        img = img.convert("RGB").resize((w, h), Image.BILINEAR)
        it.set_tensor(inp["index"], np.asarray(img, dtype=np.uint8)[None])
        it.invoke()
        res = [it.get_tensor(o["index"]) for o in outs]
        if len(res) == 1:
            scale = outs[0]["quantization"][0]
            scores = res[0].reshape(-1).astype(np.float64) * scale
            top = np.argsort(scores)[::-1][:3]
            results[kind] = [[int(i), float(scores[i])] for i in top]
        else:
            results[kind] = [[int(c), float(s)] for c, s in zip(res[1][0], res[2][0])]
        it.reset_all_variables()
    seccomp = [ln for ln in os.read(status, 4096).decode().splitlines() if ln.startswith("Seccomp:")]
    sys.stdout.write(json.dumps({"seccomp": seccomp[0].split()[1], "results": results}) + "\\n")
    sys.stdout.flush()
    sys.exit(0)
"""


def _check_mnv2(top3: list[list[float]]) -> bool:
    return any(c == 286 and s > 0.5 for c, s in top3)


def _check_mnv1(top3: list[list[float]]) -> bool:
    return top3[0][0] in (282, 283, 286)


def _check_ssd(dets: list[list[float]]) -> bool:
    return any(c == 0 and s > 0.5 for c, s in dets)


CASES = {
    "mobilenet_v2_1.0_224_quant": ("cat.bmp", _check_mnv2),
    "mobilenet_v1_0.25_128_quant": ("cat.bmp", _check_mnv1),
    "coco_ssd_mobilenet_v1_1.0_quant_2018_06_29_detect": ("grace_hopper.bmp", _check_ssd),
}


@pytest.mark.parametrize("model", sorted(CASES))
def test_install_filter_inference_under_filter_gives_expected_class(model: str) -> None:
    image, check = CASES[model]
    model_path, image_path = MODELS / f"{model}.tflite", MODELS / image
    for path in (model_path, image_path):
        if not path.exists():
            pytest.skip(f"{path.name} not found in {MODELS} (the shared test models)")
    pytest.importorskip("ai_edge_litert")
    r = run_child(INFER_CHILD, args=(str(model_path), str(image_path)))
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["seccomp"] == "2"
    assert set(out["results"]) == {"bmp", "jpeg", "png"}
    for kind, got in out["results"].items():
        assert check(got), f"{model} on {image} as {kind}: {got}"


def test_allowed_syscalls_x86_64_has_none_of_the_forbidden() -> None:
    names = set(allowed_syscalls("x86_64"))
    forbidden = {"open", "openat", "openat2", "creat", "socket", "socketpair", "connect", "bind", "listen",
                 "accept", "execve", "execveat", "fork", "vfork", "clone3", "ptrace", "setuid", "setgid",
                 "setresuid", "setreuid", "setgroups", "capset", "prctl", "seccomp", "memfd_create",
                 "pkey_mprotect", "process_vm_writev", "kill", "unshare", "setns", "mount", "ioctl"}
    assert not names & forbidden
    assert {"mmap", "mprotect", "clone", "rseq", "recvmsg", "futex", "exit_group"} <= names


def test_allowed_syscalls_aarch64_uses_arch_names() -> None:
    names = set(allowed_syscalls("aarch64"))
    assert "mmap" in names and "newfstatat" in names
    assert not names & {"open", "mmap2", "futex_time64", "fstat64", "sigreturn", "recv", "send"}


@pytest.mark.parametrize("machine", ["armv7l", "arm", "armv6l"])
def test_allowed_syscalls_arm32_uses_arch_names(machine: str) -> None:
    names = set(allowed_syscalls(machine))
    assert {"mmap2", "futex_time64", "clock_gettime64", "fcntl64", "fstat64", "sigreturn"} <= names
    assert not names & {"mmap", "newfstatat", "open"}


def test_allowed_syscalls_unknown_arch_raises_sandboxerror() -> None:
    with pytest.raises(SandboxError):
        allowed_syscalls("mips")


@pytest.mark.parametrize("arch", ["x86_64", "aarch64", "armv7l"])
def test_allowed_syscalls_every_name_resolves_for_its_arch(arch: str) -> None:
    sc = pytest.importorskip("pyseccomp")
    token = {"x86_64": sc.Arch.X86_64, "aarch64": sc.Arch.AARCH64, "armv7l": sc.Arch.ARM}[arch]
    try:
        known = sc.resolve_syscall(token, "read")
    except (OSError, ValueError, ctypes.ArgumentError) as exc:  # an old libseccomp without this arch
        pytest.skip(f"libseccomp cannot resolve names for {arch}: {exc}")
    if known < 0:
        pytest.skip(f"libseccomp cannot resolve names for {arch}")
    unresolved = [n for n in allowed_syscalls(arch) if sc.resolve_syscall(token, n) < 0]
    assert not unresolved, f"not syscalls on {arch}: {unresolved}"


def test_seccomp_mode_unfiltered_child_is_zero() -> None:
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        mine = seccomp_mode()
        assert seccomp_mode(p.pid) == mine  # inherited from us: 0 unless pytest itself is filtered
    finally:
        p.kill()
        p.wait()


def test_seccomp_mode_missing_process_raises_sandboxerror() -> None:
    with pytest.raises(SandboxError):
        seccomp_mode(2**22 + 12345)
