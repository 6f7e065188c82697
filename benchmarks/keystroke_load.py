"""Keystroke load and idle-connection load against a kodkod server (issue 15). Not a test.

    python benchmarks/keystroke_load.py load --model ../shared/fixtures/exl2/llama-tiny-fp16 --minutes 3
    python benchmarks/keystroke_load.py idle --model ../shared/fixtures/exl2/llama-tiny-fp16 --connections 20000

`load` replays what 20 editors send while people type: each editor types a character every
50-170 ms (with an occasional pause of 1-3 s), asks for a completion at every keystroke, and
drops (closes) its previous request when the next keystroke comes, as Tabby's agent does; each
editor has its own `user`, so the server also supersedes its older request. When the time is
up every editor sends one last request and waits for it: those are the "final" requests, the
ones a person would see. It reports the status counts, p50/p95 of completed requests, the p95
of a `/healthz` probe sent every 250 ms throughout, and the server's RSS before and after.

`idle` opens N connections that send nothing or a never-ending head (from several client
processes, since one process may have at most `ulimit -n` sockets) and probes `/healthz` on a
fresh connection every 100 ms all the while: it reports the worst and p95 probe latency.

With `--model` the script starts `kodkod serve` on the CPU on a free port (config through
KODKOD_* variables: `--env KEY=VALUE`) and measures that process; with `--url` it uses a
running server (no RSS then). Traffic goes to 127.0.0.1 only. Results are printed and, with
`--out`, written as JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import multiprocessing
import os
import random
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = '''import json
from pathlib import Path


def load_settings(path: Path) -> dict:
    """Read the settings file, or the defaults when there is none."""
    if not path.exists():
        return {"theme": "dark", "tab_size": 4}
    with path.open() as f:
        data = json.load(f)
    for key, value in data.items():
        if isinstance(value, str):
            data[key] = value.strip()
    return data


class Cache:
    def __init__(self, size: int = 128):
        self.size = size
        self.items = {}

    def get(self, key):
        return self.items.get(key)

    def put(self, key, value):
        if len(self.items) >= self.size:
            self.items.pop(next(iter(self.items)))
        self.items[key] = value
'''


def pct(values, q):
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q / 100 * len(values)))] * 1000, 1)


def rss_mb(pid):
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


# ---------------------------------------------------------------- the server
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model, env_pairs, log_dir: Path, root: Path = ROOT):
    port = free_port()
    env = {**os.environ, "KODKOD_HOME": str(log_dir)}
    for pair in env_pairs:
        k, _, v = pair.partition("=")
        env[k] = v
    log = open(log_dir / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--model", str(model), "--device", "cpu",
                             "--host", "127.0.0.1", "--port", str(port)], cwd=root, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: see {log_dir / 'server.log'}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not start in 120 s")
        time.sleep(0.2)


def _probe(url, every_s, stop, out):
    """A process of its own, so that the load's client does not delay the probe: GET /healthz on a
    fresh connection every `every_s` until `stop`; sends (latencies, failures) back on `out`.
    A plain socket, so that the time is the server's (an HTTP client's setup costs milliseconds)."""
    host, port = url.removeprefix("http://").split(":")
    request = f"GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    lat, fails = [], []
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            with socket.create_connection((host, int(port)), timeout=5) as s:
                s.sendall(request)
                answer = b""
                while chunk := s.recv(4096):
                    answer += chunk
            ok = answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"status":"ok"}')
            (lat if ok else fails).append(time.monotonic() - t0)
        except OSError:
            fails.append(time.monotonic() - t0)
        stop.wait(max(0.0, every_s - (time.monotonic() - t0)))
    out.send((lat, fails))


class Prober:
    def __init__(self, url, every_s):
        ctx = multiprocessing.get_context("fork")
        self.stop = ctx.Event()
        self.recv, send = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_probe, args=(url, every_s, self.stop, send), daemon=True)
        self.proc.start()

    def finish(self):
        self.stop.set()
        lat, fails = self.recv.recv()
        self.proc.join(10)
        return lat, fails


# ---------------------------------------------------------------- load: 20 editors typing
class Stats:
    def __init__(self):
        self.status = collections.Counter()
        self.final = collections.Counter()
        self.latency = []  # completed (200) requests, seconds
        self.sent = 0


def body(editor, pos, max_tokens):
    text = SAMPLE[editor * 37 % len(SAMPLE):] + SAMPLE
    cut = 40 + pos % (len(text) - 80)
    return {"language": "python", "user": f"editor-{editor}", "max_tokens": max_tokens,
            "segments": {"prefix": text[:cut], "suffix": text[cut:cut + 200], "filepath": f"e{editor}/app.py"}}


async def one(client, url, payload, stats: Stats, final=False):
    stats.sent += 1
    t0 = time.monotonic()
    r = None
    try:
        r = await client.post(f"{url}/v1/completions", json=payload)
        key = str(r.status_code)
    except asyncio.CancelledError:
        stats.status["dropped by the editor"] += 1
        raise
    except httpx.TimeoutException:
        key = "client timeout"
    except httpx.HTTPError as exc:
        key = f"error {type(exc).__name__}"
    stats.status[key] += 1
    if final:
        stats.final[key] += 1
    if r is not None and r.status_code == 200:
        stats.latency.append(time.monotonic() - t0)
    return key


async def editor(i, url, until, stats: Stats, max_tokens, rng, keep=False):
    limits = httpx.Limits(max_connections=None if keep else 100)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        pos, inflight, kept = rng.randrange(500), None, []
        while time.monotonic() < until:
            pause = rng.uniform(1, 3) if rng.random() < 0.04 else rng.uniform(0.05, 0.17)
            await asyncio.sleep(pause)
            pos += 1
            if inflight is not None and not inflight.done():
                if keep:  # the server supersedes it (same `user`); its answer is still read
                    kept = [t for t in kept if not t.done()] + [inflight]
                else:  # the next keystroke: the editor drops the older request
                    inflight.cancel()
            inflight = asyncio.create_task(one(client, url, body(i, pos, max_tokens), stats))
        # the last keystroke: its request is the one the person waits for
        await asyncio.sleep(rng.uniform(0.05, 0.17))
        if inflight is not None and not inflight.done():
            inflight.cancel()
        await one(client, url, body(i, pos + 1, max_tokens), stats, final=True)
        await asyncio.gather(*kept, return_exceptions=True)


async def run_load(url, minutes, editors, max_tokens, seed, keep=False):
    stats = Stats()
    until = time.monotonic() + minutes * 60
    t0 = time.monotonic()
    await asyncio.gather(*(editor(i, url, until, stats, max_tokens, random.Random(seed + i), keep)
                           for i in range(editors)))
    return stats, time.monotonic() - t0


def server_for(args, work: str):
    """The server to measure: one started on --model (its log in the work folder), or --url as it is.
    Returns (process or None, url, pid or None, work folder)."""
    log_dir = Path(args.work or work)
    log_dir.mkdir(parents=True, exist_ok=True)
    if not args.model:
        return None, args.url, None, log_dir
    proc, url = start_server(args.model, args.env, log_dir, Path(args.server_root))
    return proc, url, proc.pid, log_dir


def cmd_load(args):
    proc, url, pid, log_dir = server_for(args, "/tmp/kodkod-keystroke")
    try:
        with httpx.Client(timeout=60) as c:  # warm up: the first requests build caches
            for k in range(10):
                c.post(f"{url}/v1/completions", json=body(k, k, args.max_tokens))
        time.sleep(1)
        rss_before = rss_mb(pid)
        prober = Prober(url, 0.25)
        stats, elapsed = arun(run_load(url, args.minutes, args.editors, args.max_tokens, args.seed, args.keep))
        health, health_fails = prober.finish()
        time.sleep(args.settle_s)
        rss_after = rss_mb(pid)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
    cancelled = {l.split('"')[1]: float(l.split()[-1]) for l in metrics.splitlines()
                 if l.startswith("kodkod_cancellations_total{")}
    result = {
        "minutes": args.minutes, "editors": args.editors, "editors_drop_requests": not args.keep,
        "max_tokens": args.max_tokens, "server": args.env,
        "requests_sent": stats.sent, "requests_per_s": round(stats.sent / elapsed, 1),
        "status": dict(stats.status.most_common()), "final_requests": dict(stats.final.most_common()),
        "completed_p50_ms": pct(stats.latency, 50), "completed_p95_ms": pct(stats.latency, 95),
        "healthz_p95_ms": pct(health, 95), "healthz_max_ms": pct(health, 100), "healthz_failed": len(health_fails),
        "rss_before_mb": rss_before, "rss_after_mb": rss_after,
        "server_cancellations": cancelled,
    }
    report(result, args.out)


# ---------------------------------------------------------------- idle: many connections
def _hold(url, n, stalled_every, ready, done, errors):
    """A client process: open n connections (every `stalled_every`-th sends half a head), hold them."""
    host, port = url.removeprefix("http://").split(":")
    socks = []
    try:
        for i in range(n):
            try:
                s = socket.create_connection((host, int(port)), timeout=10)
                if stalled_every and i % stalled_every == 0:
                    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                socks.append(s)
            except OSError:
                errors.value += 1
        ready.value += 1
        done.wait()
    finally:
        for s in socks:
            s.close()


def wait_for(cond, hold_s):
    while not cond():
        time.sleep(0.05)
    time.sleep(hold_s)  # and a while after all are open


def cmd_idle(args):
    proc, url, pid, log_dir = server_for(args, "/tmp/kodkod-idle")
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    procs = -(-args.connections // max(1, soft - 100))  # one process may hold soft - 100 sockets
    per = -(-args.connections // procs)
    ctx = multiprocessing.get_context("fork")
    ready, errors, done = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Event()
    rss_before = rss_mb(pid)
    t0 = time.monotonic()
    workers = [ctx.Process(target=_hold, args=(url, min(per, args.connections - k * per), args.stalled_every,
                                               ready, done, errors)) for k in range(procs)]
    for w in workers:
        w.start()
    try:
        prober = Prober(url, 0.1)
        wait_for(lambda: ready.value == procs, args.hold_s)
        lat, fails = prober.finish()
        opened_s = time.monotonic() - t0
        rss_peak = rss_mb(pid)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        done.set()
        for w in workers:
            w.join(30)
        if proc is not None:
            time.sleep(1)
            proc.terminate()
            proc.wait(10)
    drops = {l.split('"')[1]: float(l.split()[-1]) for l in metrics.splitlines()
             if l.startswith("kodkod_connection_drops_total{")}
    log_lines = sum(1 for _ in open(log_dir / "server.log")) if args.model else None
    result = {"connections": args.connections, "client_processes": procs, "connect_errors": errors.value,
              "seconds_to_open": round(opened_s - args.hold_s, 1), "held_s": args.hold_s,
              "healthz_probes": len(lat) + len(fails),
              "healthz_failed": len(fails), "healthz_p95_ms": pct(lat, 95), "healthz_max_ms": pct(lat, 100),
              "server_drops": drops, "rss_before_mb": rss_before, "rss_peak_mb": rss_peak,
              "server_log_lines": log_lines, "server": args.env}
    report(result, args.out)


def arun(coro):
    try:
        import uvloop  # the client keeps up better with it (a dependency of the server)
        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def report(result, out):
    print(json.dumps(result, indent=2))
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("load", "idle"):
        s = sub.add_parser(name)
        where = s.add_mutually_exclusive_group(required=True)
        where.add_argument("--model", help="start `kodkod serve` on the CPU with this model directory")
        where.add_argument("--url", help="a running server (127.0.0.1 only)")
        s.add_argument("--env", action="append", default=[], metavar="KODKOD_X=V", help="server configuration")
        s.add_argument("--work", help="folder for the server's home and log")
        s.add_argument("--out", help="write the result as JSON here")
        s.add_argument("--server-root", default=str(ROOT), help="the kodkod checkout whose server to start "
                       "(another commit's, to compare)")
    load, idle = sub.choices["load"], sub.choices["idle"]
    load.add_argument("--minutes", type=float, default=3.0)
    load.add_argument("--editors", type=int, default=20)
    load.add_argument("--max-tokens", type=int, default=16)
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--keep", action="store_true", help="editors do not drop their older request: they leave "
                      "it to the server to supersede (same `user`) and read its answer")
    load.add_argument("--settle-s", type=float, default=5.0, help="wait before the last RSS reading")
    idle.add_argument("--connections", type=int, default=20_000)
    idle.add_argument("--hold-s", type=float, default=15.0, help="keep probing this long after all are open")
    idle.add_argument("--stalled-every", type=int, default=2, help="every k-th connection sends half a head")
    args = p.parse_args(argv)
    if args.url and not args.url.startswith(("http://127.", "http://localhost")):
        p.error("--url: loopback only")
    (cmd_load if args.cmd == "load" else cmd_idle)(args)


if __name__ == "__main__":
    main()
