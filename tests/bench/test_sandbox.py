"""The sandbox: a completion that loops forever, allocates without bound, forks, writes outside
its directory or opens a socket fails its own task, and nothing else."""
from __future__ import annotations

import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from server.bench.sandbox import run_program

SMALL = dict(timeout_s=3.0, memory_mb=256)


def test_a_correct_program_passes():
    r = run_program("def f(x):\n    return x + 1\nassert f(1) == 2\n", **SMALL)
    assert r.passed and r.status == "passed"


def test_a_failing_assertion_fails():
    r = run_program("assert 1 == 2, 'wrong'\n", **SMALL)
    assert not r.passed and r.status == "failed" and "AssertionError" in r.detail


def test_an_infinite_loop_times_out_and_is_killed():
    t = time.monotonic()
    r = run_program("while True:\n    pass\n", timeout_s=1.5, memory_mb=256)
    assert r.status == "timeout" and not r.passed
    assert time.monotonic() - t < 6


def test_unbounded_allocation_fails_with_memory_error():
    r = run_program("x = []\nwhile True:\n    x.append(bytearray(1 << 24))\n", **SMALL)
    assert not r.passed
    assert "MemoryError" in r.detail or r.status == "timeout"


def test_fork_and_subprocess_are_refused():
    for src in ("import os\nos.fork()\n", "import subprocess\nsubprocess.run(['true'])\n",
                "import os\nos.system('true')\n", "import ctypes\nctypes.CDLL(None).fork()\n"):
        r = run_program(src, **SMALL)
        assert not r.passed and "PermissionError" in r.detail, (src, r)


def test_writes_outside_its_directory_are_refused(tmp_path):
    target = tmp_path / f"escape-{uuid.uuid4().hex}.txt"
    for src in (f"open({str(target)!r}, 'w').write('x')\n",
                f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\n",
                f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')\n",
                f"import os\nos.remove({str(tmp_path)!r})\n"):
        r = run_program(src, **SMALL)
        assert not r.passed and "PermissionError" in r.detail, (src, r)
    assert not target.exists()
    # ...while its own directory is writable
    assert run_program("open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'\n",
                       **SMALL).passed


def test_no_network():
    src = "import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 9))\n"
    r = run_program(src, **SMALL)
    assert not r.passed and "PermissionError" in r.detail


def test_each_hazard_fails_only_its_own_run():
    """Good and hostile programs side by side, in parallel: the good ones still pass."""
    good = "assert sum(range(10)) == 45\n"
    hostile = {
        "loop": "while True:\n    pass\n",
        "memory": "x = []\nwhile True:\n    x.append(bytearray(1 << 24))\n",
        "fork": "import os\nos.fork()\n",
        "write": "open('/tmp/kodkod-sandbox-escape-%s', 'w').write('x')\n" % uuid.uuid4().hex,
    }
    jobs = [("good-%d" % i, good) for i in range(4)] + list(hostile.items())
    with ThreadPoolExecutor(4) as pool:
        results = dict(zip([n for n, _ in jobs], pool.map(lambda j: run_program(j[1], timeout_s=2.0, memory_mb=256), jobs)))
    assert all(results[f"good-{i}"].passed for i in range(4))
    assert not any(results[n].passed for n in hostile)
    assert results["loop"].status == "timeout"
    assert not any(p.startswith("kodkod-sandbox-escape") for p in os.listdir("/tmp"))
