"""Keystroke-trace latency benchmark: replay typing against a running server, as an editor does.

A trace retypes a region of a real source file (from Python's standard library and
the project's dependencies: Python, C, C++, JavaScript) one character at a time,
with human-like gaps between keystrokes (log-normal, a pause now and then, longer
at line ends). As Tabby's clients do, a completion request goes out when the
user has paused for the debounce interval, and the moment the next key is typed
the request still in flight is aborted (its connection closed). Requests stream
(`"stream": true`), so the time to the first event is seen too.

Then a saturation phase: several clients (distinct users, so nobody supersedes
anybody) send requests back to back for a bounded time; completions per second
is the server's throughput.

Everything is bounded: a trace has a fixed number of keystrokes, every request a
timeout, the saturation phase a request count and a time limit. Traffic goes
only to the URL given (loopback in tests).
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Files typed by default: (language id, a file that ships with Python or a dependency).
def default_sources() -> list[tuple[str, Path]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found: list[tuple[str, Path]] = [("python", stdlib / "textwrap.py"), ("python", stdlib / "json" / "decoder.py")]
    try:
        import numpy
        found.append(("c", Path(numpy.__file__).parent / "_core" / "include" / "numpy" / "npy_math.h"))
    except ImportError:
        pass
    try:
        import torch
        inc = Path(torch.__file__).parent / "include" / "c10" / "util"
        found.append(("cpp", inc / "Exception.h"))
    except ImportError:
        pass
    try:
        import matplotlib
        found.append(("javascript", Path(matplotlib.__file__).parent / "backends" / "web_backend" / "js" / "mpl.js"))
    except ImportError:
        pass
    return [(lang, p) for lang, p in found if p.is_file()]


@dataclass
class TypingModel:
    """Seconds between keystrokes: log-normal around `median_s`; a pause of `pause_s` (uniform range)
    with probability `pause_p`, and twice as likely after a newline."""
    median_s: float = 0.12
    sigma: float = 0.5
    pause_p: float = 0.08
    pause_s: tuple[float, float] = (0.4, 1.5)

    def gap(self, rng: random.Random, after: str) -> float:
        p = self.pause_p * (2 if after == "\n" else 1)
        if rng.random() < p:
            return rng.uniform(*self.pause_s)
        return rng.lognormvariate(math.log(self.median_s), self.sigma)


@dataclass
class Trace:
    language: str
    path: str
    before: str        # the file before the typed region
    typed: str         # what the user types, in order
    after: str         # the file after the region (the suffix)
    times: list[float]  # when each character is typed, seconds from the trace's start


def make_trace(language: str, path: Path, chars: int, rng: random.Random, typing: TypingModel) -> Trace:
    """A region of about `chars` characters starting at a line start, typed with `typing`'s gaps."""
    text = path.read_text(encoding="utf-8", errors="replace")
    starts = [i + 1 for i, c in enumerate(text) if c == "\n" and i + 1 < len(text) - chars]
    start = rng.choice(starts) if starts else 0
    end = min(len(text), start + chars)
    nl = text.find("\n", end)
    end = nl if nl != -1 and nl - end < 80 else end  # end at a line end when one is near
    typed = text[start:end]
    t, times = 0.0, []
    for i, ch in enumerate(typed):
        times.append(t)
        t += typing.gap(rng, ch)
    return Trace(language, str(path), text[:start], typed, text[end:], times)


def _clip_lines(text: str, n: int, from_end: bool) -> str:
    """What Tabby's clients send: at most n lines of prefix (the last) and of suffix (the first)."""
    lines = text.split("\n")
    return "\n".join(lines[-n:] if from_end else lines[:n])


@dataclass
class RequestRecord:
    trace: int
    sent: float
    status: str                    # "completed", "cancelled", "error"
    latency_s: float | None = None  # to the end of the stream (completed only)
    first_event_s: float | None = None
    events: int = 0
    http_status: int | None = None
    error: str | None = None


@dataclass
class BenchSettings:
    traces: int = 4
    chars: int = 200
    speed: float = 1.0             # > 1 types faster than the typing model
    debounce_s: float = 0.15
    max_tokens: int | None = None  # None: the server's default
    timeout_s: float = 30.0
    saturation_requests: int = 32
    saturation_seconds: float = 60.0
    concurrency: int = 4
    seed: int = 0
    token: str | None = None
    progress: bool = True
    typing: TypingModel = field(default_factory=TypingModel)


def _body(trace: Trace, pos: int, settings: BenchSettings, user: str) -> dict:
    prefix = trace.before + trace.typed[:pos]
    body = {"language": trace.language, "user": user, "stream": True, "temperature": 0.0, "seed": 0,
            "segments": {"prefix": _clip_lines(prefix, 20, True), "suffix": _clip_lines(trace.after, 20, False),
                         "filepath": Path(trace.path).name}}
    if settings.max_tokens:
        body["max_tokens"] = settings.max_tokens
    return body


async def _one_request(client, body: dict, rec: RequestRecord, t0: float) -> None:
    """Send one streamed completion request and fill `rec` (cancellation propagates: the caller aborts)."""
    async with client.stream("POST", "/v1/completions", json=body) as r:
        rec.http_status = r.status_code
        if r.status_code != 200:
            rec.status, rec.error = "error", (await r.aread()).decode("utf-8", "replace")[:200]
            return
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if rec.first_event_s is None:
                rec.first_event_s = time.monotonic() - t0
            if data == "[DONE]":
                break
            rec.events += 1
            ev = json.loads(data)
            if ev.get("error"):
                rec.status, rec.error = "error", ev["error"].get("type")
                return
    rec.status, rec.latency_s = "completed", time.monotonic() - t0


async def replay(client, trace: Trace, index: int, settings: BenchSettings, bar=None) -> list[RequestRecord]:
    """Type `trace` in real time (scaled by speed); a request after each pause of at least the
    debounce interval, aborted by the next keystroke."""
    records: list[RequestRecord] = []
    start = time.monotonic()
    pending: asyncio.Task | None = None
    times = [t / settings.speed for t in trace.times]
    for i in range(len(times)):
        # the key i is typed now; it aborts the request still in flight
        await asyncio.sleep(max(0.0, start + times[i] - time.monotonic()))
        if pending is not None and not pending.done():
            pending.cancel()
            try:
                await pending
            except asyncio.CancelledError:
                pass
        if bar is not None:
            bar.update(1)
        nxt = start + times[i + 1] if i + 1 < len(times) else None
        fire = start + times[i] + settings.debounce_s
        if nxt is not None and nxt < fire:
            continue  # typed again within the debounce interval: no request
        await asyncio.sleep(max(0.0, fire - time.monotonic()))
        rec = RequestRecord(trace=index, sent=time.monotonic() - start, status="cancelled")
        records.append(rec)
        pending = asyncio.create_task(_one_request(client, _body(trace, i + 1, settings, f"trace-{index}"),
                                                   rec, time.monotonic()))
        if nxt is None:  # the last keystroke: wait for the answer
            try:
                await asyncio.wait_for(pending, settings.timeout_s)
            except asyncio.TimeoutError:
                rec.status, rec.error = "error", "timeout"
    return records


async def saturate(client, traces: list[Trace], settings: BenchSettings) -> dict:
    """`concurrency` clients send requests back to back until `saturation_requests` have been sent or
    `saturation_seconds` have passed; returns completions per second."""
    rng = random.Random(settings.seed + 1)
    sent = 0
    done: list[RequestRecord] = []
    deadline = time.monotonic() + settings.saturation_seconds

    async def worker(w: int) -> None:
        nonlocal sent
        while sent < settings.saturation_requests and time.monotonic() < deadline:
            sent += 1
            tr = rng.choice(traces)
            rec = RequestRecord(trace=-1, sent=0.0, status="cancelled")
            try:
                await asyncio.wait_for(_one_request(client, _body(tr, rng.randrange(1, len(tr.typed) + 1),
                                                                  settings, f"saturate-{w}"), rec, time.monotonic()),
                                       max(0.1, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                rec.status, rec.error = "error", "timeout"
            done.append(rec)

    t0 = time.monotonic()
    await asyncio.gather(*(worker(w) for w in range(settings.concurrency)))
    elapsed = time.monotonic() - t0
    ok = [r for r in done if r.status == "completed"]
    return {"requests": len(done), "completed": len(ok), "seconds": round(elapsed, 3),
            "requests_per_s": len(ok) / elapsed if elapsed > 0 else None,
            "errors": sorted({r.error or str(r.http_status) for r in done if r.status == "error"}),
            "latency_s": [r.latency_s for r in ok]}


async def read_metrics(client) -> dict[str, float]:
    """The server's Prometheus counters we need (0 when a server does not have them)."""
    try:
        r = await client.get("/metrics")
        text = r.text if r.status_code == 200 else ""
    except Exception:
        text = ""
    out = {"tokens": 0.0, "tokens_after_cancel": 0.0, "cancellations": 0.0}
    names = {"kodkod_tokens_generated_total": "tokens", "kodkod_tokens_after_cancel_total": "tokens_after_cancel"}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        if parts[0] in names:
            out[names[parts[0]]] = float(parts[1])
        elif parts[0].startswith("kodkod_cancellations_total{"):  # summed over the reasons
            out["cancellations"] += float(parts[1])
    return out


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))]


async def run_bench(url: str, settings: BenchSettings, sources=None) -> dict:
    import httpx
    from tqdm import tqdm

    rng = random.Random(settings.seed)
    sources = sources or default_sources()
    if not sources:
        raise SystemExit("kodkod bench http: no source files to type")
    traces = [make_trace(*sources[i % len(sources)], settings.chars, rng, settings.typing)
              for i in range(settings.traces)]
    headers = {"Authorization": f"Bearer {settings.token}"} if settings.token else {}
    timeout = httpx.Timeout(settings.timeout_s, connect=10.0)
    limits = httpx.Limits(max_connections=settings.concurrency + 4)
    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout, limits=limits) as client:
        health = (await client.get("/v1/health")).raise_for_status().json()
        before = await read_metrics(client)
        records: list[RequestRecord] = []
        bar = tqdm(total=sum(len(t.typed) for t in traces), desc="typing", unit="key", disable=not settings.progress,
                   dynamic_ncols=True, file=sys.stderr)
        t0 = time.monotonic()
        for i, tr in enumerate(traces):
            records += await replay(client, tr, i, settings, bar)
        typing_s = time.monotonic() - t0
        bar.close()
        await asyncio.sleep(0.3)  # let the server finish the bookkeeping of the last cancelled job
        after = await read_metrics(client)
        sat = await saturate(client, traces, settings) if settings.saturation_requests > 0 else None
    done = [r for r in records if r.status == "completed"]
    lat = [r.latency_s for r in done]
    first = [r.first_event_s for r in done if r.first_event_s is not None]
    summary = {
        "requests": len(records), "completed": len(done),
        "cancelled": sum(r.status == "cancelled" for r in records),
        "errors": sum(r.status == "error" for r in records),
        "cancelled_fraction": (sum(r.status == "cancelled" for r in records) / len(records)) if records else None,
        "p50_s": _pct(lat, 0.5), "p95_s": _pct(lat, 0.95), "p99_s": _pct(lat, 0.99),
        "mean_s": statistics.fmean(lat) if lat else None,
        "first_event_p50_s": _pct(first, 0.5), "first_event_p95_s": _pct(first, 0.95),
        "tokens_generated": after["tokens"] - before["tokens"],
        "tokens_after_cancel": after["tokens_after_cancel"] - before["tokens_after_cancel"],
        "server_cancellations": after["cancellations"] - before["cancellations"],
        "keystrokes": sum(len(t.typed) for t in traces), "typing_s": round(typing_s, 2),
        "saturation_requests_per_s": sat["requests_per_s"] if sat else None,
    }
    return {"server": {"model": health.get("model"), "device": health.get("device"), "url": url},
            "settings": {k: v for k, v in asdict(settings).items() if k != "token"},
            "traces": [{"language": t.language, "path": t.path, "chars": len(t.typed)} for t in traces],
            "summary": summary, "saturation": sat, "requests": [asdict(r) for r in records]}
