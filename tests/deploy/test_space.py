"""The Hugging Face Spaces deploy as the README tells it: the Space's files, and every name the steps use."""
from __future__ import annotations

import re
import subprocess

from tests.conftest import ROOT
from tests.deploy.dockerfile import copy_sources, stages


def spaces_section() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Docker and Hugging Face Spaces")
    return readme[start:readme.index("\n## ", start + 1)]


def test_space_sh_makes_a_space_repository(tmp_path):
    out = tmp_path / "space"
    r = subprocess.run(["sh", str(ROOT / "deploy" / "space.sh"), str(out)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    readme = (out / "README.md").read_text()
    front = readme.split("---\n")[1]
    meta = dict(line.split(": ", 1) for line in front.strip().splitlines())
    assert readme.startswith("---\n") and meta["sdk"] == "docker"
    assert meta["app_port"] == stages()[1][-1].env()["PORT"]  # the port the image listens on
    assert "# kodkod" in readme  # the README itself follows
    for src in copy_sources() | {"Dockerfile", ".dockerignore"}:
        assert (out / src).exists(), f"the Space lacks {src}, which the image needs"
    assert not (out / "tests").exists() and not (out / ".venv").exists()
    binaries = [p for p in out.rglob("*") if p.is_file() and b"\0" in p.read_bytes()[:8000]]
    assert not binaries, f"Spaces refuse binary files pushed without LFS: {binaries}"


def test_every_name_in_the_spaces_steps_exists():
    from server.config import ServerConfig

    text = spaces_section()
    args, sts = stages()
    final = sts[-1]
    build_args = set(args) | {a.split("=")[0] for st in sts for a in st.all("ARG")}
    env = final.env()
    fields = {f"KODKOD_{f.upper()}" for f in ServerConfig.model_fields}
    editor = {"KODKOD_ENDPOINT", "KODKOD_TOKEN"}  # read by editors/vscode and editors/neovim
    for name in set(re.findall(r"\bKODKOD_[A-Z_]+\b", text)):
        assert name in fields | editor | set(env), f"the README names {name}, which nothing reads"
    for name in editor:
        assert name in (ROOT / "editors" / "neovim" / "lua" / "kodkod" / "init.lua").read_text()
        assert name in (ROOT / "editors" / "vscode" / "src" / "config.ts").read_text()
    for name in ("FLAVOUR", "BAKE_MODEL"):
        assert f"`{name}`" in text and name in build_args
    assert re.search(r"`FLAVOUR` = `cuda`", text) and "build-cuda" in {s.name for s in sts}
    assert re.search(r"`BAKE_MODEL` = `1`", text) and 'if [ "$BAKE_MODEL" = "1" ]' in " ".join(final.all("RUN"))
    assert "`app_port: 8080`" in text and env["PORT"] == "8080" and final.all("EXPOSE") == ["8080"]
    assert "`/data`" in text and env["KODKOD_HOME"] == "/data"
    assert "/opt/kodkod" in text and env["KODKOD_BAKED_HOME"] == "/opt/kodkod"
    assert "sh deploy/space.sh /tmp/kodkod-space" in text and (ROOT / "deploy" / "space.sh").is_file()
    assert "/healthz" in text and "/healthz" in final.all("HEALTHCHECK")[0]
    for flag in re.findall(r"--build-arg (\w+)=", text):
        assert flag in build_args
    for setting in ("kodkod.endpoint", "kodkod: Set token"):
        assert setting in text
        assert setting in (ROOT / "editors" / "vscode" / "package.json").read_text()
