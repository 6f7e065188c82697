// The client's pure parts: no server needed.
import { test } from "node:test";
import assert from "node:assert/strict";
import { resolveConfig, DEFAULT_ENDPOINT } from "../src/config";
import { buildRequest, bestSnippet, firstLines, identifiersNearCursor, lastLines } from "../src/request";
import { AdaptiveDebounce, atLineEnd, sleep } from "../src/debounce";
import { CompletionCache } from "../src/cache";

test("endpoint and token: settings, then environment, then default", () => {
  const env = { KODKOD_ENDPOINT: "http://env:1/", KODKOD_TOKEN: "envtok" };
  assert.deepEqual(resolveConfig("http://set:2/", "stored", env), { endpoint: "http://set:2", token: "stored", endpointSource: "settings" });
  assert.deepEqual(resolveConfig("", undefined, env), { endpoint: "http://env:1", token: "envtok", endpointSource: "env" });
  assert.deepEqual(resolveConfig(undefined, undefined, {}), { endpoint: DEFAULT_ENDPOINT, token: undefined, endpointSource: "default" });
});

test("request: 20-line windows and Tabby segments", () => {
  const before = Array.from({ length: 30 }, (_, i) => `b${i}`).join("\n") + "\n    x = ";
  const after = "1\n" + Array.from({ length: 30 }, (_, i) => `a${i}`).join("\n");
  const body = buildRequest({
    prefix: before,
    suffix: after,
    language: "python",
    filepath: "pkg/m.py",
    declarations: Array.from({ length: 7 }, (_, i) => ({ filepath: `d${i}.py`, body: "y".repeat(900) })),
    recent: [{ filepath: "r.py", body: "z", score: 0.5 }],
    temperature: 0,
  });
  assert.equal(body.segments.prefix, lastLines(before, 20));
  assert.equal(body.segments.prefix.split("\n").length, 20);
  assert.ok(body.segments.prefix.endsWith("b29\n    x = "));
  assert.equal(body.segments.suffix!.split("\n").length, 21); // 20 lines, each with its newline
  assert.ok(body.segments.suffix!.startsWith("1\na0\n"));
  assert.equal(body.segments.filepath, "pkg/m.py");
  assert.equal(body.segments.declarations!.length, 5);
  assert.equal(body.segments.declarations![0].body.length, 500);
  assert.deepEqual(body.segments.relevant_snippets_from_recently_opened_files, [{ filepath: "r.py", body: "z", score: 0.5 }]);
  assert.equal(body.language, "python");
  assert.equal(body.temperature, 0);
  assert.equal(firstLines("a\nb", 5), "a\nb");
  assert.equal(lastLines("only", 3), "only");
});

test("identifiers near the cursor, nearest first; best snippet of another file", () => {
  assert.deepEqual(identifiersNearCursor("import os\nresult = compute_total(items, ta"), ["ta", "items", "compute_total", "result", "os", "import"]);
  const other = "def unrelated():\n    pass\n" + "\n".repeat(20) + "def compute_total(items, tax):\n    return sum(items) * tax\n";
  const s = bestSnippet("o.py", other, "total = compute_total(items, tax)\n");
  assert.ok(s && s.body.includes("def compute_total"), JSON.stringify(s));
  assert.equal(bestSnippet("o.py", "nothing shared here", "alpha beta"), undefined);
});

test("adaptive debounce: short after a pause or at a line end, longer while typing fast", () => {
  const d = new AdaptiveDebounce(50, 300);
  assert.equal(d.delay(1000, false), 50); // first key: nothing before it
  assert.equal(d.delay(1080, false), 160); // typing at 80 ms a key: wait two gaps
  assert.equal(d.delay(1160, true), 50); // at a line end: at once
  assert.equal(d.delay(2000, false), 50); // after a pause
  const fast = new AdaptiveDebounce(50, 300);
  let t = 0;
  let last = 0;
  for (let i = 0; i < 10; i++) last = fast.delay((t += 200), false);
  assert.equal(last, 300); // slow-ish steady typing is capped at maxMs
  assert.ok(atLineEnd("    ", ""));
  assert.ok(atLineEnd("def f(x):", ""));
  assert.ok(atLineEnd("f(", ")"));
  assert.ok(!atLineEnd("pri", ""));
  assert.ok(!atLineEnd("x = ", "foo()"));
});

test("sleep rejects as soon as its signal aborts", async () => {
  const ctl = new AbortController();
  const t0 = Date.now();
  const p = sleep(5000, ctl.signal);
  setTimeout(() => ctl.abort(), 20);
  await assert.rejects(p);
  assert.ok(Date.now() - t0 < 1000);
});

test("cache: exact hits, typing through a suggestion, LRU eviction", () => {
  const c = new CompletionCache(2);
  c.set("doc", 10, "0123456789", "\nrest", "id1", "hello()");
  assert.deepEqual(c.get("doc", 10, "0123456789", "\nrest"), { id: "id1", text: "hello()", typed: 0 });
  // typed "hel": the rest is served
  assert.deepEqual(c.get("doc", 13, "0123456789hel", "\nrest"), { id: "id1", text: "lo()", typed: 3 });
  // typed something else, another document, or a changed suffix: a miss
  assert.equal(c.get("doc", 13, "0123456789hex", "\nrest"), undefined);
  assert.equal(c.get("other", 10, "0123456789", "\nrest"), undefined);
  assert.equal(c.get("doc", 10, "0123456789", "\nREST"), undefined);
  // typed all of it: nothing left to show, ask again
  assert.equal(c.get("doc", 17, "0123456789hello()", "\nrest"), undefined);
  c.set("doc", 20, "p2", "", "id2", "a");
  c.get("doc", 10, "0123456789", "\nrest"); // id1 is now the most recently used
  c.set("doc", 30, "p3", "", "id3", "b"); // evicts id2
  assert.equal(c.size, 2);
  assert.equal(c.get("doc", 20, "p2", ""), undefined);
  assert.ok(c.get("doc", 10, "0123456789", "\nrest"));
  assert.ok(c.get("doc", 30, "p3", ""));
});
