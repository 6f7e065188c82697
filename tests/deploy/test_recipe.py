"""The cpu image's install and start steps, run outside Docker as the image runs them.

No Docker engine runs here, so this does by hand what `docker build` and `docker run` would:
the Dockerfile's sources copied as its COPY lines say, the wheel built as its wheel stage
builds it, `deploy/install.sh VENV cpu WHEELS` run in a fresh virtual environment, then the
final stage's ENTRYPOINT + CMD started with its ENV, as uid 1000, with KODKOD_HOME at a
temporary /data. Cheap by design (docs/deploy.md): the fresh environment sees this one's
packages through a directory of links (kodkod's editable install left out), and pip runs
with PIP_NO_INDEX=1, so a lock pin that this environment does not have fails instead of
downloading. The one addition to the image's environment: KODKOD_MODEL at the tiny fixture.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import ROOT, fixture_dir
from tests.deploy.dockerfile import stages
from tests.deploy.test_dockerignore import ignored, patterns

ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0
UID = 1000 if ROOT_USER else os.getuid()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_image_user() -> dict:
    """subprocess arguments that run a command as uid 1000 when the tests run as root."""
    return {"user": 1000, "group": 1000, "extra_groups": []} if ROOT_USER else {}


def base_python() -> str:
    """This Python's interpreter, or one of the same version that uid 1000 can run (a root-only
    pyenv is not one)."""
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    for exe in (getattr(sys, "_base_executable", sys.executable), shutil.which(version, path="/usr/local/bin:/usr/bin")):
        try:
            if exe and subprocess.run([exe, "-c", "import venv"], capture_output=True, timeout=60,
                                      **as_image_user()).returncode == 0:
                return exe
        except OSError:  # not allowed to run it
            continue
    pytest.fail(f"no {version} here that uid 1000 can run")


@pytest.fixture(scope="module")
def workdir():
    d = Path(tempfile.mkdtemp(prefix="kodkod-recipe-"))
    d.chmod(0o755)  # uid 1000 must reach the environment inside
    yield d
    shutil.rmtree(d, ignore_errors=True)


def copy_context(dest: Path, sources: list[str]) -> None:
    """COPY as Docker does it: from the build context, which .dockerignore has filtered."""
    pats = patterns()
    for src in sources:
        for path in ([ROOT / src] if (ROOT / src).is_file() else sorted((ROOT / src).rglob("*"))):
            rel = path.relative_to(ROOT).as_posix()
            if path.is_file() and not ignored(rel, pats):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest / rel)


def pip_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


@pytest.fixture(scope="module")
def image_venv(workdir) -> Path:
    """/opt/venv of the cpu image, made by the image's own steps (offline)."""
    _, sts = stages()
    wheel_stage = next(s for s in sts if s.name == "wheel")
    # the wheel stage: COPY its sources, then build the wheel the way its RUN does
    srcs = [w for a in wheel_stage.all("COPY") for w in a.split()[:-1]]
    src = workdir / "src"
    copy_context(src, srcs)
    (build_run,) = wheel_stage.all("RUN")
    assert "pip wheel --no-cache-dir --no-deps --no-build-isolation -w /wheels ." in build_run
    wheels = workdir / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-cache-dir", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(wheels), "."], cwd=src, env=pip_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    # the build-cpu stage: a venv, then deploy/install.sh (copied from the context as well)
    cpu = next(s for s in sts if s.name == "build-cpu")
    (install_run,) = cpu.all("RUN")
    assert install_run == "python -m venv /opt/venv && sh /src/deploy/install.sh /opt/venv cpu /wheels"
    copy_context(src, ["deploy", "constraints.txt"])
    venv = workdir / "venv"
    subprocess.run([base_python(), "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    view = workdir / "view"  # this environment's packages, without kodkod itself
    view.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        if entry.name.startswith(("kodkod", "__editable__")) or entry.suffix == ".pth":
            continue
        (view / entry.name).symlink_to(entry)
    venv_site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; "
                                     "print(sysconfig.get_paths()['purelib'])"],
                                    capture_output=True, text=True, check=True).stdout.strip())
    (venv_site / "zz-kodkod-recipe-view.pth").write_text(f"{view}\n")
    r = subprocess.run(["sh", str(src / "deploy" / "install.sh"), str(venv), "cpu", str(wheels)], cwd=workdir,
                       env=pip_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, ("the image's install step failed (a lock pin this environment lacks? "
                               "`make install` installs the locks)\n" + r.stdout + r.stderr)
    return venv


def image_env(venv: Path, data: Path, port: int, baked: Path) -> dict[str, str]:
    """The final stage's ENV, with /opt/venv, /data and the port made local."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KODKOD_", "PIP_"))}
    env.pop("PORT", None)
    for k, v in stages()[1][-1].env().items():
        v = v.replace("/opt/venv", str(venv)).replace("${PATH}", os.environ["PATH"])
        env[k] = {"/data": str(data), "/opt/kodkod": str(baked)}.get(v, v)
    env["PORT"] = str(port)
    env["HOME"] = str(data.parent / "home")
    return env


def test_the_cpu_image_installs_starts_and_completes(image_venv, workdir):
    final = stages()[1][-1]
    data, home, baked = workdir / "data", workdir / "home", workdir / "opt-kodkod"
    for d in (data, home, baked):
        d.mkdir()
    if ROOT_USER:
        os.chown(data, 1000, 1000)
        os.chown(home, 1000, 1000)
    port = free_port()
    env = image_env(image_venv, data, port, baked)
    assert env["KODKOD_HOME"] == str(data) and env["PATH"].startswith(f"{image_venv}/bin")
    env["KODKOD_MODEL"] = str(fixture_dir("llama-tiny-4.0bpw"))  # no download in tests
    cmd = final.exec_form("ENTRYPOINT") + final.exec_form("CMD")
    exe = shutil.which(cmd[0], path=env["PATH"])
    assert exe == str(image_venv / "bin" / "kodkod"), exe
    # the code that runs is the wheel's, not this checkout's
    where = subprocess.run([str(image_venv / "bin" / "python"), "-c", "import server, csrc, engine.kernels as k; "
                            "print(server.__file__); print(k.build_key('7.5'))"], cwd=home, env=env,
                           capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    assert where.stdout.startswith(str(image_venv)), where.stdout
    proc = subprocess.Popen([exe, *cmd[1:]], cwd=home, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **as_image_user())
    try:
        health = json.loads(final.all("HEALTHCHECK")[0].split(" CMD ", 1)[1])
        deadline = time.monotonic() + 90
        while subprocess.run(health, env=env, capture_output=True, timeout=10).returncode != 0:
            assert proc.poll() is None, f"kodkod serve exited ({proc.returncode}):\n{proc.stdout.read()}"
            assert time.monotonic() < deadline, "no /healthz within 90 s"
            time.sleep(0.3)
        host = "127.0.0.1"
        body = {"language": "python", "segments": {"prefix": "def add(a, b):\n    return ", "suffix": "\n"}}
        req = urllib.request.Request(f"http://{host}:{port}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200
            out = json.loads(resp.read())
        assert out["id"].startswith("cmpl-") and isinstance(out["choices"][0]["text"], str)
        status = Path(f"/proc/{proc.pid}/status")
        if status.exists():
            uid = next(line.split()[1] for line in status.read_text().splitlines() if line.startswith("Uid:"))
            assert int(uid) == UID
        assert (data / "logs" / "events.jsonl").is_file()  # written as the image's user, into /data
    finally:
        proc.terminate()
        try:
            out = proc.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0]
    assert "Traceback" not in out, out
    assert f"on http://0.0.0.0:{port}" in out, out  # KODKOD_HOST and PORT from the image's ENV


def serve_once(env: dict[str, str], timeout: float = 60) -> tuple[int, str, float]:
    """The image's start command, `kodkod serve`, to its end."""
    t0 = time.monotonic()
    r = subprocess.run(["kodkod", "serve"], cwd=env["HOME"], env=env, capture_output=True, text=True,
                       timeout=timeout, **as_image_user())
    return r.returncode, r.stderr, time.monotonic() - t0


def test_an_unwritable_data_fails_fast_in_one_line(image_venv, workdir):
    data = workdir / "data-readonly"
    data.mkdir()
    if not ROOT_USER:
        data.chmod(0o555)
    env = image_env(image_venv, data, free_port(), workdir / "nothing")
    env["HOME"] = str(workdir)
    code, err, took = serve_once(env)
    assert code == 2 and "Traceback" not in err, err
    assert f"KODKOD_HOME {data} is not writable by uid {UID}" in err and "mount a volume" in err, err
    assert took < 30 and "loading" not in err


def test_a_taken_port_fails_fast_in_one_line(image_venv, workdir):
    data = workdir / "data-port"
    data.mkdir()
    if ROOT_USER:
        os.chown(data, 1000, 1000)
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = image_env(image_venv, data, port, workdir / "nothing")
        env["HOME"] = str(workdir)
        env["KODKOD_MODEL"] = str(fixture_dir("llama-tiny-4.0bpw"))
        code, err, took = serve_once(env)
    assert code == 2 and "Traceback" not in err, err
    assert f"port {port} on 0.0.0.0 is already in use" in err, err
    assert took < 30 and "loading" not in err  # said before the model loads
