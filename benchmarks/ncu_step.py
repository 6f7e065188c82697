"""One eager fast-path decode step of a small random model, for ncu (run on the GPU machine).

ncu --kernel-name regex:"gemv|attention" --launch-skip 12 --launch-count 5 python benchmarks/ncu_step.py
With --spin S it decodes for S seconds instead (to read the clocks under load).
"""
import sys
import tempfile
import time

import torch

from engine import GenerationParams, load_model
from engine.convert.synthetic import random_model

with tempfile.TemporaryDirectory() as tmp:
    eng = load_model(random_model(f"{tmp}/m", "0.5b", device="cuda", layers=4), device="cuda",
                     backend="cuda", progress=False)
    prompt = list(range(1, 1537))
    eng.sampler.start(GenerationParams(), prompt, 0)
    eng.decoder.prefill(prompt, 0)
    if "--spin" in sys.argv:
        end = time.time() + float(sys.argv[-1])
        while time.time() < end:
            eng.decoder.decode()
            eng.sampler.token.item()
    else:
        with torch.inference_mode():
            for _ in range(3):
                eng.decoder._step()
        torch.cuda.synchronize()
