"""Run one completed program against its tests, in a sandboxed subprocess.

The program is code a model wrote, so each run gets, in a fresh `python -I`:
- a throwaway working directory (deleted afterwards), the only place it may write;
- resource limits: CPU seconds, address space (memory), file size, no core dumps;
- a wall-clock timeout, after which its whole process group is killed;
- no network: a new network namespace where the OS allows it (root, or user
  namespaces), and in every case an audit hook that refuses sockets;
- an audit hook (PEP 578; Python code cannot remove one) that refuses fork/exec/
  subprocesses, ctypes, and opening a file for writing (or removing, renaming,
  chmod-ing one) outside the working directory.

Whatever the program does, only its own run fails: `run_program` returns a
`RunResult` and never raises for the program's sake.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 1024

# The trusted part, run before the program: limits, network namespace, audit hook.
# It reads the program from ./program.py and runs it as __main__.
_RUNNER = r'''
import ctypes, os, resource, sys
work = os.path.realpath(os.getcwd())
cpu_s, mem_mb = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
resource.setrlimit(resource.RLIMIT_AS, (mem_mb << 20, mem_mb << 20))
resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
try:  # a network namespace of its own has no interface but a down loopback: no network at all
    ctypes.CDLL(None, use_errno=True).unshare(0x40000000)  # CLONE_NEWNET
except Exception:
    pass
source = open("program.py", encoding="utf-8").read()

BLOCKED = {"os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "os.spawn", "os.system", "os.kill",
           "os.killpg", "subprocess.Popen", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
           "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "os.putenv",
           "os.unsetenv", "os.chdir", "os.chroot", "resource.setrlimit"}
WRITE_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link",
                "os.symlink", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def inside(path):
    if isinstance(path, int):
        return True  # a file descriptor it already holds
    p = os.path.realpath(os.fsdecode(path))
    return p == work or p.startswith(work + os.sep)

def hook(event, args):
    if event in BLOCKED:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in str(mode) for c in "wax+")) or bool(flags & WRITE_FLAGS)
        if writing and path is not None and not inside(path):
            raise PermissionError(f"sandbox: writing outside the working directory: {path!r}")
    elif event in WRITE_EVENTS:
        for a in args[:2]:
            if isinstance(a, (str, bytes, os.PathLike)) and not inside(a):
                raise PermissionError(f"sandbox: {event} outside the working directory: {a!r}")

code = compile(source, "program.py", "exec")
sys.addaudithook(hook)
exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
'''


@dataclass
class RunResult:
    passed: bool
    status: str  # "passed", "failed", "timeout", "error"
    detail: str  # the last line of stderr, or why it did not run
    seconds: float


def run_program(program: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                memory_mb: int = DEFAULT_MEMORY_MB) -> RunResult:
    """Run `program` (a complete Python file: solution, tests, the call of the check) in the sandbox.
    It passes when it exits with status 0 within the limits."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kodkod-sandbox-") as work:
        with open(os.path.join(work, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        cpu_s = max(1, int(timeout_s + 0.999))
        env = {"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
               "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", "-c", _RUNNER, str(cpu_s), str(memory_mb)],
                cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, start_new_session=True)  # its own process group, killed as one
        except OSError as exc:
            return RunResult(False, "error", f"cannot start python: {exc}", time.monotonic() - start)
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return RunResult(False, "timeout", f"over {timeout_s:g} s", time.monotonic() - start)
        finally:
            _kill_group(proc)  # anything it left behind in its group goes too
    seconds = time.monotonic() - start
    if proc.returncode == 0:
        return RunResult(True, "passed", "", seconds)
    lines = [l for l in err.decode("utf-8", "replace").splitlines() if l.strip()]
    detail = lines[-1][:300] if lines else f"exit status {proc.returncode}"
    if proc.returncode == -signal.SIGXCPU:  # its CPU-time limit: a time limit too
        return RunResult(False, "timeout", f"over {cpu_s} s of CPU time", seconds)
    if proc.returncode < 0:
        detail = f"killed by signal {-proc.returncode} ({signal.Signals(-proc.returncode).name})"
    return RunResult(False, "failed", detail, seconds)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
