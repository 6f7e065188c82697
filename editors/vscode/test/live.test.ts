// The completion loop against a real kodkod server on 127.0.0.1 with the tiny fixture model.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { KodkodClient } from "../src/client";
import { CancelToken, Completer, Query, Status } from "../src/completer";
import { freePort, Live, missing, startServer, TOKEN } from "./server";

const skip = missing();
if (skip) console.log(`# skipping the live vscode client tests: ${skip}`);

const PREFIX = "def fib(n):\n    ";
// greedy, so that the tiny model's answer is the same each time
const Q: Query = { doc: "file:///t.py", offset: PREFIX.length, prefix: PREFIX, suffix: "\n", language: "python", temperature: 0, manual: true };
// about a second of decoding on the tiny model: still running when we abort it
const LONG: Query = { ...Q, doc: "file:///long.py", maxTokens: 500 };

function fakeToken(): CancelToken & { cancel(): void } {
  const listeners: (() => void)[] = [];
  return {
    isCancellationRequested: false,
    onCancellationRequested(l) {
      listeners.push(l);
      return { dispose: () => listeners.splice(listeners.indexOf(l), 1) };
    },
    cancel() {
      this.isCancellationRequested = true;
      for (const l of [...listeners]) l();
    },
  };
}

// bounded wait for a server-side counter to reach a value
async function until(get: () => Promise<number>, want: number, ms = 5000): Promise<number> {
  let v = await get();
  for (const t0 = Date.now(); v < want && Date.now() - t0 < ms; v = await get()) await new Promise((r) => setTimeout(r, 50));
  return v;
}

describe("vscode client against a live server", { skip }, () => {
  let live: Live;
  const statuses: Status[] = [];
  const mk = (token: string | undefined = TOKEN, url?: string) =>
    new Completer(() => new KodkodClient(url ?? live.url, token), (s) => statuses.push(s));
  const cancels = () => live.metric("kodkod_cancellations_total", 'reason="disconnected"');
  // the server ends a request whose client went away as "disconnected", or as "superseded" when the
  // same editor's next request reaches it before it notices the disconnect (a race on a busy machine)
  const cancelsOrSupersedes = async () =>
    (await cancels()) + (await live.metric("kodkod_cancellations_total", 'reason="superseded"'));
  const served = () => live.metric("kodkod_http_requests_total", 'method="POST",route="/v1/completions",status="200"');

  before(async () => {
    live = await startServer({ token: TOKEN });
  });
  after(async () => {
    await live?.stop();
  });

  test("a completion, then the rest of it served from the cache while typing through it", async () => {
    const c = mk();
    const s = await c.provide(Q);
    assert.ok(s && s.text.length >= 3 && !s.cached, JSON.stringify(s));
    assert.ok(s.id.startsWith("cmpl-"));
    assert.equal(c.status.kind, "ready");
    assert.equal(typeof (c.status as { latencyMs?: number }).latencyMs, "number");
    const before = await served();
    for (let typed = 1; typed < Math.min(s.text.length, 6); typed++) {
      const p = PREFIX + s.text.slice(0, typed);
      const hit = await c.provide({ ...Q, prefix: p, offset: p.length, manual: false });
      assert.deepEqual(hit, { id: s.id, text: s.text.slice(typed), cached: true });
    }
    assert.equal(c.stats.requests, 1);
    assert.equal(await served(), before); // no request reached the server
    // context is gathered only for a request that is sent
    let gathered = 0;
    const context = async () => (gathered++, { declarations: [{ filepath: "m.py", body: "def helper(): pass" }] });
    const p1 = PREFIX + s.text.slice(0, 1);
    assert.ok((await c.provide({ ...Q, prefix: p1, offset: p1.length, context }))!.cached);
    assert.equal(gathered, 0);
    const p2 = PREFIX + "\u00b6";
    await c.provide({ ...Q, prefix: p2, offset: p2.length, context });
    assert.equal(gathered, 1);
    assert.equal(c.stats.requests, 2);
    // typing something else asks the server again
    const p = PREFIX + "\u00a7";
    await c.provide({ ...Q, prefix: p, offset: p.length });
    assert.equal(c.stats.requests, 3);
  });

  test("a new request aborts the one in flight: the server cancels it", async () => {
    const c = mk();
    const c0 = await cancelsOrSupersedes();
    const first = c.provide(LONG);
    await new Promise((r) => setTimeout(r, 150)); // the first is decoding now
    const second = c.provide({ ...Q, doc: "file:///other.py" });
    assert.equal(await first, undefined);
    assert.ok(await second);
    assert.equal(c.stats.aborted, 1);
    assert.equal(await until(cancelsOrSupersedes, c0 + 1), c0 + 1);
  });

  test("VS Code's cancellation token aborts the request", async () => {
    const c = mk();
    const c0 = await cancels();
    const tok = fakeToken();
    const p = c.provide({ ...LONG, doc: "file:///cancel.py" }, tok);
    setTimeout(() => tok.cancel(), 150);
    const t0 = Date.now();
    assert.equal(await p, undefined);
    assert.ok(Date.now() - t0 < 1000);
    assert.equal(c.stats.aborted, 1);
    assert.equal(await until(cancels, c0 + 1), c0 + 1);
    assert.equal(c.status.kind, "ready");
  });

  test("debounce: keystrokes in quick succession send one request", async () => {
    const c = mk();
    const before = await served();
    const results = [];
    let p = PREFIX;
    for (const ch of "abcd") {
      p += ch;
      results.push(c.provide({ ...Q, doc: "file:///deb.py", prefix: p, offset: p.length, manual: false }));
      await new Promise((r) => setTimeout(r, 20));
    }
    const out = await Promise.all(results);
    assert.deepEqual(out.slice(0, 3), [undefined, undefined, undefined]);
    assert.equal(c.stats.debounced, 3);
    assert.equal(c.stats.requests, 1);
    assert.equal(await served(), before + 1);
  });

  test("errors: a rejected token, a missing token, an unreachable server", async () => {
    const bad = mk("wrong");
    assert.equal(await bad.provide(Q), undefined);
    assert.equal(bad.status.kind, "error");
    assert.match((bad.status as { message: string }).message, /rejected the token \(401\)/);
    const none = mk("");
    await none.provide(Q);
    assert.match((none.status as { message: string }).message, /needs a token \(401\)/);
    // a port nobody listens on (just freed)
    const closed = `http://127.0.0.1:${await freePort()}`;
    const away = mk(TOKEN, closed);
    await away.provide(Q);
    assert.equal(away.status.kind, "error");
    assert.equal((away.status as { message: string }).message, `kodkod server unreachable at ${closed} (ECONNREFUSED)`);
    await assert.rejects(new KodkodClient(live.url, "wrong").health(), /rejected the token/);
    assert.ok((await new KodkodClient(live.url, TOKEN).health()).model);
  });

  test("view, select and dismiss events reach the server", async () => {
    const c = mk();
    const ev = (type: string) => live.metric("kodkod_events_total", `type="${type}"`);
    const [v0, s0, d0] = [await ev("view"), await ev("select"), await ev("dismiss")];
    const a = await c.provide({ ...Q, doc: "file:///ev.py" });
    c.viewed(a!.id);
    c.viewed(a!.id); // shown again while typing through: one view
    c.accepted(a!.id);
    c.viewed("cmpl-00000000-0000-4000-8000-000000000000");
    c.dismissed();
    await Promise.all(c.pendingEvents);
    assert.equal(await ev("view"), v0 + 2);
    assert.equal(await ev("select"), s0 + 1);
    assert.equal(await ev("dismiss"), d0 + 1);
  });
});
