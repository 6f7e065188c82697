"""End-to-end latency of one completion through HTTP: `kodkod serve` on a model, Tabby requests.

python benchmarks/http_latency.py MODEL_DIR [--tokens 1500] [--new 32] [--requests 30] [--backend cuda]
Starts a real server on 127.0.0.1, sends sequential requests whose raw prompt is --tokens tokens
long in the model's own tokenizer (random words; each request's prompt differs, so no KV reuse
helps), asks for --new tokens
(greedy, no stop rules), and prints p50/p95 of the request latency measured by the client.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time

import httpx
from tokenizers import Tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--tokens", type=int, default=1500)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out")
    args = ap.parse_args()
    port = free_port()
    env = dict(os.environ, KODKOD_HOME=os.environ.get("KODKOD_HOME", "/tmp/kodkod-http"))
    cmd = [sys.executable, "-c", "import sys; from server.cli import main; sys.exit(main())", "serve",
           "--model", args.model, "--port", str(port), "--backend", args.backend]
    server = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        with httpx.Client(timeout=60) as client:
            while time.time() < deadline:
                try:
                    if client.get(f"{url}/healthz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None:
                    raise SystemExit("the server exited")
                time.sleep(0.5)
            rng = random.Random(0)
            tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))
            times, generated = [], []
            for i in range(args.requests + 3):
                words = " ".join(f"t{rng.randrange(1, 30000)}" for _ in range(args.tokens))
                words = tok.decode(tok.encode(words).ids[: args.tokens])  # exactly about --tokens tokens
                body = {"language": "python", "debug_options": {"raw_prompt": words},
                        "max_tokens": args.new, "temperature": 0}
                t0 = time.perf_counter()
                r = client.post(f"{url}/v1/completions", json=body)
                dt = time.perf_counter() - t0
                r.raise_for_status()
                if i >= 3:  # the first requests warm up the client and the server's Python paths
                    times.append(dt)
                    generated.append(len(r.json()["choices"][0]["text"].split()))
        res = {"prompt_tokens": args.tokens, "max_tokens": args.new, "requests": len(times),
               "p50_ms": round(statistics.median(times) * 1e3, 1),
               "p95_ms": round(sorted(times)[int(0.95 * (len(times) - 1))] * 1e3, 1),
               "mean_words_out": round(statistics.mean(generated), 1)}
        print(json.dumps(res))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
