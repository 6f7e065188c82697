// extension.ts activated with a fake `vscode` module against a real kodkod server:
// the provider, the status bar, settings and commands.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import * as path from "node:path";
import Module from "node:module";
import * as fake from "./fake-vscode";
import { Live, missing, startServer, TOKEN } from "./server";

// `require("vscode")` inside extension.js gets the fake
const M = Module as unknown as { _resolveFilename: (req: string, ...rest: unknown[]) => string };
const resolve = M._resolveFilename;
M._resolveFilename = (req, ...rest) => (req === "vscode" ? path.join(__dirname, "fake-vscode.js") : resolve(req, ...rest));

const skip = missing();
const PREFIX = "def fib(n):\n    ";
const DOC = fake.doc("/w/fib.py", PREFIX + "\n");
const AT = new fake.Position(1, 4);

function cancel() {
  return { isCancellationRequested: false, onCancellationRequested: () => ({ dispose() {} }) };
}
const invoke = { triggerKind: fake.InlineCompletionTriggerKind.Invoke };
const auto = { triggerKind: fake.InlineCompletionTriggerKind.Automatic };

describe("the extension with a fake vscode", { skip }, () => {
  let live: Live;
  const subscriptions: { dispose(): void }[] = [];
  let secret: string | undefined = TOKEN;

  before(async () => {
    live = await startServer({ token: TOKEN });
    fake.state.config = { "kodkod.endpoint": live.url, "kodkod.triggerMode": "automatic" };
    const ext = require("../src/extension");
    const context = {
      subscriptions,
      secrets: {
        get: async () => secret,
        store: async (_k: string, v: string) => void (secret = v),
        delete: async () => void (secret = undefined),
      },
    };
    await ext.activate(context);
  });
  after(async () => {
    for (const s of subscriptions) s.dispose();
    await live?.stop();
  });

  test("the provider returns the server's suggestion; the status bar shows the latency", async () => {
    const items = await fake.state.provider.provideInlineCompletionItems(DOC, AT, invoke, cancel());
    assert.equal(items.length, 1);
    assert.ok(items[0].insertText.length > 0);
    assert.deepEqual(items[0].range.start, AT);
    assert.equal(items[0].command.command, "kodkod.accepted");
    assert.match(items[0].command.arguments[0], /^cmpl-/);
    assert.match(fake.state.bar.text, /^\$\(check\) kodkod \d+ ms$/);
    const v0 = await live.metric("kodkod_events_total", 'type="select"');
    await fake.state.commands.get("kodkod.accepted")!(items[0].command.arguments[0]);
    for (let i = 0; i < 50 && (await live.metric("kodkod_events_total", 'type="select"')) === v0; i++) await new Promise((r) => setTimeout(r, 20));
    assert.equal(await live.metric("kodkod_events_total", 'type="select"'), v0 + 1);
  });

  test("disabled languages and manual trigger mode", async () => {
    const before = await live.metric("kodkod_http_requests_total", 'method="POST",route="/v1/completions",status="200"');
    fake.state.config["kodkod.disabledLanguages"] = ["python"];
    assert.equal(await fake.state.provider.provideInlineCompletionItems(DOC, AT, invoke, cancel()), undefined);
    fake.state.config["kodkod.disabledLanguages"] = [];
    fake.state.config["kodkod.triggerMode"] = "manual";
    const other = fake.doc("/w/other.py", "import os\n\n");
    assert.equal(await fake.state.provider.provideInlineCompletionItems(other, new fake.Position(2, 0), auto, cancel()), undefined);
    assert.equal(await live.metric("kodkod_http_requests_total", 'method="POST",route="/v1/completions",status="200"'), before);
    // the trigger command asks VS Code to show suggestions; that call counts as manual
    await fake.state.commands.get("kodkod.trigger")!();
    assert.ok(fake.state.executed.includes("editor.action.inlineSuggest.trigger"));
    const items = await fake.state.provider.provideInlineCompletionItems(other, new fake.Position(2, 0), auto, cancel());
    assert.ok(Array.isArray(items));
    fake.state.config["kodkod.triggerMode"] = "automatic";
  });

  test("a token the server rejects shows in the status bar and in the check command", async () => {
    fake.state.inputBox = "not-the-token";
    await fake.state.commands.get("kodkod.setToken")!();
    assert.equal(secret, "not-the-token");
    assert.equal(fake.state.bar.text, "$(warning) kodkod");
    assert.match(fake.state.bar.tooltip, /rejected the token \(401\)/);
    await fake.state.commands.get("kodkod.status")!();
    assert.match(fake.state.messages.at(-1)!, /^error: .*rejected the token/);
    fake.state.inputBox = TOKEN;
    await fake.state.commands.get("kodkod.setToken")!();
    assert.equal(fake.state.bar.text, "$(check) kodkod");
    await fake.state.commands.get("kodkod.status")!();
    assert.equal(fake.state.messages.at(-1), `info: kodkod: ready at ${live.url}`);
  });
});
