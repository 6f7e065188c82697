"""HF model directory -> EXL2 model directory.

Passes (GPTQ mode):
1. measurement: the calibration text runs through the original model block by
   block; for every linear layer the relative output error of each candidate bit
   mix is measured (allocate.measure) and the mix per layer is chosen for the
   target bits per weight (allocate.allocate);
2. quantisation: block by block, the Hessian H = sum x^T x of each linear's
   inputs is accumulated from the outputs of the already-quantised blocks before
   it, each linear is quantised with GPTQ (act-order, error feedback, per-group
   scale search), its dequantised weight replaces the original, and the block is
   run again to give the next block its inputs. The head follows, at --head-bits.

`fast` skips calibration: RTN with the scale search, no permutation, mixes
chosen on weight-space error.

Resumable: everything finished so far lives in OUT/.kodkod-work (settings,
measurement, one checkpoint file per block, the hidden states after the last
finished block); a rerun with the same settings continues from there.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from . import allocate as alloc
from .quant import QuantResult, gptq, hessian, make_groups, rtn
from .sensitivity import output_fisher
from .writer import _atomic_save, write_model_dir

VERSION = "kodkod-0.2"
WORK = ".kodkod-work"


class ConvertError(ValueError):
    pass


def _linears(module: torch.nn.Module, prefix: str) -> list[tuple[str, torch.nn.Module]]:
    from engine.model import Linear

    return [(f"{prefix}.{name}", m) for name, m in module.named_modules() if isinstance(m, Linear)]


class _Capture:
    """Forward hooks that collect each linear's inputs during one block forward."""

    def __init__(self, linears):
        self.linears = linears
        self.inputs: dict[str, torch.Tensor] = {}
        self.handles = []

    def __enter__(self):
        for key, m in self.linears:
            self.handles.append(m.register_forward_hook(self._hook(key)))
        return self

    def _hook(self, key):
        def hook(mod, args, out):
            self.inputs[key] = args[0].detach()
        return hook

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def shared(self):
        """Group keys whose input is the very same tensor (q/k/v, gate/up): yields (keys, x)."""
        by_ptr: dict[tuple, list[str]] = {}
        for key, x in self.inputs.items():
            by_ptr.setdefault((x.data_ptr(), tuple(x.shape)), []).append(key)
        for keys in by_ptr.values():
            yield keys, self.inputs[keys[0]]
        self.inputs = {}


class _Stop(Exception):
    pass


def _input_of(module: torch.nn.Module, run: Callable[[], Any]) -> torch.Tensor:
    """The input `module` receives during `run()`; the forward stops right there."""
    got = []

    def hook(mod, args):
        got.append(args[0])
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        run()
    except _Stop:
        pass
    finally:
        handle.remove()
    if not got:
        raise RuntimeError(f"{type(module).__name__} was not called")
    return got[0]


def _quantize_block(block, named: dict[str, torch.nn.Module], states: list[torch.Tensor], pos: torch.Tensor,
                    quantize: Callable[[list[str], torch.Tensor], None]) -> list[torch.Tensor]:
    """GPTQ one block in execution order ("true sequential"): q/k/v, then o, then the MLP's
    input projections, then its output projection. Each group's Hessian comes from inputs
    computed with every linear before it already quantised, and each activation is computed
    once. `quantize(keys, H)` must replace those linears' weights. Returns the block outputs."""
    from engine.model import GatedMLP

    key_of = {id(m): k for k, m in named.items()}
    attn, mlp = block.self_attn, block.mlp
    o_proj = attn.o_proj
    last = mlp.down_proj if isinstance(mlp, GatedMLP) else mlp.c_proj

    def keys_in(module, but):
        return [key_of[id(m)] for m in module.modules() if id(m) in key_of and m is not but]

    lengths = [x.shape[0] for x in states]
    a = [block.input_layernorm(x) for x in states]
    quantize(keys_in(attn, o_proj), hessian(a))
    o_in = []
    for ai in a:
        p = pos[: ai.shape[0]]
        cos, sin = block._rope(p)
        o_in.append(_input_of(o_proj, lambda: attn(ai, cos, sin, p)))
    del a
    quantize([key_of[id(o_proj)]], hessian(o_in))
    # Everything past attention works on all rows at once: bigger matrix products.
    x = torch.cat([x + o_proj(oi) for x, oi in zip(states, o_in)])
    del o_in
    m = block.post_attention_layernorm(x)
    quantize(keys_in(mlp, last), hessian([m]))
    d_in = _input_of(last, lambda: mlp(m))
    del m
    quantize([key_of[id(last)]], hessian([d_in]))
    x = x + last(d_in)
    return list(x.split(lengths))


def _settings_hash(s: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:16]


def _convert(
    in_dir: str | Path,
    out_dir: str | Path,
    bits: float = 4.0,
    head_bits: int = 6,
    calibration: str | Path | None = None,
    fast: bool = False,
    rows: int = 64,
    length: int = 512,
    measure_rows: int | None = None,
    device: str = "cpu",
    shard_mb: int = 8192,
    progress: bool = True,
    log: Callable[[str], None] = print,
    keep_work: bool = False,
    allocation: dict[str, str] | None = None,
) -> Path:
    from tqdm import tqdm

    from engine import load_model

    from .calibration import calibration_rows

    in_dir, out = Path(in_dir), Path(out_dir)
    if not 2.0 <= bits <= 8.0:
        raise ConvertError(f"--bits must be between 2.0 and 8.0 (got {bits})")
    alloc.head_mix(head_bits)  # validates
    if rows < 1 or length < 16 or (measure_rows is not None and measure_rows < 1):
        raise ConvertError(f"need --rows >= 1, --length >= 16 and --measure-rows >= 1 "
                           f"(got {rows}, {length}, {measure_rows})")
    if out.resolve() == in_dir.resolve():
        raise ConvertError("the output directory must differ from the input directory")
    t_start = time.time()
    eng = load_model(in_dir, device=device, dtype=torch.float32)  # GPTQ needs fp32, on the GPU too
    if eng.quantized:
        raise ConvertError(f"{in_dir} is already quantized (EXL2); convert needs an fp16/bf16/fp32 model")
    model, cfg = eng.model, eng.config
    dev = next(model.parameters()).device
    raw_cfg = json.loads((in_dir / "config.json").read_text())

    settings = {"version": VERSION, "bits": bits, "head_bits": head_bits, "fast": fast,
                "calibration": str(calibration) if calibration else None,
                "rows": rows, "length": length, "measure_rows": measure_rows,
                "allocation": hashlib.sha256(json.dumps(allocation, sort_keys=True).encode()).hexdigest()
                if allocation else None,
                "source": str(in_dir.resolve())}
    work = out / WORK
    state_path = work / "state.json"
    state: dict[str, Any] = {}
    if state_path.is_file():
        state = json.loads(state_path.read_text())
        if state.get("settings_hash") != _settings_hash(settings):
            log(f"{work}: left by a conversion with other settings; starting over")
            shutil.rmtree(work)
            state = {}
        elif state.get("blocks_done"):
            log(f"resuming: {state['blocks_done']} of {cfg.num_layers} blocks already done")
    work.mkdir(parents=True, exist_ok=True)
    state.setdefault("settings_hash", _settings_hash(settings))
    state.setdefault("blocks_done", 0)

    def save_state():
        tmp = work / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, state_path)

    save_state()
    layers = list(model.layers)
    block_linears = [_linears(b, f"model.layers.{i}") for i, b in enumerate(layers)]

    # ---- calibration data
    calib: list[list[int]] = []
    if not fast:
        calib = calibration_rows(eng.tokenizer.encode, rows, length, calibration)
        log(f"calibration: {len(calib)} rows x {length} tokens "
            f"({'built-in: Python stdlib top-level modules' if calibration is None else calibration})")
    pos = torch.arange(length, device=dev)

    def embed(ids_rows):
        return [model.embed_tokens[torch.tensor(r, device=dev)].float() for r in ids_rows]

    # ---- pass 1: measurement and allocation (or a given allocation: {layer key: Mix name})
    if "allocation" not in state and allocation is not None:
        names = {c.name(): i for i, c in enumerate(alloc.CANDIDATES)}
        keys = [key for lins in block_linears for key, _ in lins]
        if set(allocation) != set(keys) or any(v not in names for v in allocation.values()):
            raise ConvertError("the given allocation does not fit this model")
        state["allocation"] = dict(allocation)
        state["allocation_index"] = {k: names[v] for k, v in allocation.items()}
        save_state()
    if "allocation" not in state:
        measurements: list[alloc.Measurement] = []
        if fast:
            for i, lins in enumerate(tqdm(block_linears, desc="measure (weights)", unit="block", disable=not progress)):
                for key, m in lins:
                    measurements.append(alloc.measure(key, m.weight.float().cpu(), None, None))
        else:
            mrows = calib[: measure_rows or max(4, len(calib) // 4)]
            all_linears = [kl for lins in block_linears for kl in lins]
            with tqdm(total=len(mrows), desc="sensitivity", unit="row", disable=not progress) as sbar:
                fisher = output_fisher(model, mrows, all_linears, sbar)
            states = embed(mrows)
            sample_per_row = max(8, 2048 // len(mrows))
            g = torch.Generator().manual_seed(0)
            for i, block in enumerate(tqdm(layers, desc="measure", unit="block", disable=not progress)):
                xs: dict[str, list[torch.Tensor]] = {}
                diag: dict[str, torch.Tensor] = {}
                with torch.inference_mode(), _Capture(block_linears[i]) as cap:
                    nxt = []
                    for x in states:
                        nxt.append(block(x, pos[: x.shape[0]]))
                        for keys, inp in cap.shared():
                            idx = torch.randperm(inp.shape[0], generator=g)[:sample_per_row]
                            for key in keys:
                                xs.setdefault(key, []).append(inp[idx].float().cpu())
                                d = (inp.float() ** 2).sum(0).cpu()
                                diag[key] = diag[key] + d if key in diag else d
                    states = nxt
                for key, m in block_linears[i]:
                    measurements.append(alloc.measure(key, m.weight.float().cpu(), torch.cat(xs[key]), diag[key],
                                                      fisher=fisher[key]))
            del states
        choice = alloc.allocate(measurements, bits)
        state["allocation"] = {k: alloc.CANDIDATES[c].name() for k, c in choice.items()}
        state["allocation_index"] = choice
        save_state()
    choice = state["allocation_index"]

    # ---- pass 2: quantisation, block by block
    hmix = alloc.head_mix(head_bits)
    states_path = work / "states.pt"
    if not fast:
        if state["blocks_done"] and states_path.is_file():
            states = torch.load(states_path)
        else:
            state["blocks_done"] = 0
            states = embed(calib)
    start = state["blocks_done"]
    # blocks done earlier get their quantised weights back (needed for nothing but the head in
    # fast mode; GPTQ resumes from the saved hidden states)
    bar = tqdm(total=cfg.num_layers + 1, initial=start, desc="quantize", unit="layer", disable=not progress)
    for i in range(start, cfg.num_layers):
        block = layers[i]
        lins = block_linears[i]
        results: dict[str, QuantResult] = {}
        named = dict(lins)

        def quantize(keys, h=None):
            """GPTQ with Hessian h (RTN without one); the dequantised weight replaces the original."""
            for key in keys:
                m = named[key]
                groups = make_groups(alloc.CANDIDATES[choice[key]], m.weight.shape[1])
                r = rtn(m.weight.float(), groups) if h is None else gptq(m.weight.float(), groups, h)
                m.weight.data = r.weight(m.weight.shape[0]).to(m.weight.dtype)
                results[key] = r

        if fast:
            quantize(list(named))
        else:
            with torch.inference_mode():
                states = _quantize_block(block, named, states, pos, quantize)
        tensors: dict[str, torch.Tensor] = {}
        for key, r in results.items():
            for s, t in r.tensors().items():
                tensors[f"{key}.{s}"] = t
        if not fast:
            torch.save(states, states_path.with_suffix(".tmp"))
            os.replace(states_path.with_suffix(".tmp"), states_path)
        _atomic_save(tensors, work / f"block-{i:04d}.safetensors")
        state["blocks_done"] = i + 1
        save_state()
        bar.update(1)

    # ---- the head
    head_file = work / "head.safetensors"
    if not head_file.is_file():
        w = model.lm_head.weight.float()
        groups = make_groups(hmix, w.shape[1])
        if fast:
            r = rtn(w, groups)
        else:
            with torch.inference_mode():
                h = hessian([model.norm(x) for x in states])
            r = gptq(w, groups, h)
        _atomic_save({f"lm_head.{s}": t for s, t in r.tensors().items()}, head_file)
    bar.update(1)
    bar.close()

    # ---- assemble the output directory
    from safetensors.torch import load_file

    from engine.loader import TensorStore

    store = TensorStore(in_dir)
    out_tensors: dict[str, torch.Tensor] = {}
    for i in range(cfg.num_layers):
        out_tensors.update(load_file(str(work / f"block-{i:04d}.safetensors")))
    out_tensors.update(load_file(str(head_file)))
    quantized = {k[: -len(".q_weight")] for k in out_tensors if k.endswith(".q_weight")}
    for name in store.names():
        base = name.rsplit(".", 1)[0]
        if name == "lm_head.weight" or (name.endswith(".weight") and base in quantized):
            continue
        t = store.get(name)
        out_tensors[name] = t.to(torch.float16) if t.is_floating_point() else t
    qcfg = {"quant_method": "exl2", "version": "0.3.2", "bits": bits, "head_bits": head_bits,
            "calibration": {"rows": len(calib), "length": length,
                            "dataset": "(none: --fast)" if fast else (str(calibration) if calibration else "(python-stdlib)")},
            "converter": VERSION, "fast": fast}
    write_model_dir(out, in_dir, raw_cfg, out_tensors, qcfg, shard_bytes=shard_mb << 20)
    summary = {"allocation": state["allocation"], "seconds": round(time.time() - t_start, 1)}
    (out / "kodkod-convert.json").write_text(json.dumps(summary, indent=1))
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    log(f"wrote {out} ({bits} bpw, head {head_bits} bits) in {time.time() - t_start:.0f} s")
    return out


@functools.wraps(_convert)
def convert(*args, **kwargs) -> Path:
    # Tiny weights times tiny errors make denormals, which are very slow on CPU. The
    # setting is process-wide, so it is put back afterwards: other code (and hypothesis)
    # relies on IEEE subnormals.
    torch.set_flush_denormal(True)
    try:
        return _convert(*args, **kwargs)
    finally:
        torch.set_flush_denormal(False)
