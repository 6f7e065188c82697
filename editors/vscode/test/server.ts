// Starts a real kodkod server on 127.0.0.1 with the tiny fixture model, as the Python
// live tests do. KODKOD_BIN overrides the server command (default: the repository's
// .venv/bin/kodkod); tests skip with the reason when it is missing.
import { spawn, ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { createServer } from "node:net";
import * as path from "node:path";

// out/test-build/test/server.js -> the repository root is five levels up
const REPO = path.resolve(__dirname, "../../../../..");
export const KODKOD_BIN = process.env.KODKOD_BIN ?? path.join(REPO, ".venv/bin/kodkod");
export const MODEL = process.env.KODKOD_TEST_MODEL ?? path.join(REPO, "../shared/fixtures/exl2/llama-tiny-4.0bpw");
export const TOKEN = "editor-test-token";

export function missing(): string | undefined {
  if (!existsSync(KODKOD_BIN)) return `no kodkod server at ${KODKOD_BIN} (run make install-dev)`;
  if (!existsSync(MODEL)) return `no fixture model at ${MODEL}`;
  return undefined;
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
    s.on("error", reject);
  });
}

export interface Live {
  url: string;
  proc: ChildProcess;
  stop(): Promise<void>;
  metric(name: string, labels?: string): Promise<number>;
}

export async function startServer(opts: { token?: string } = {}): Promise<Live> {
  const port = await freePort();
  const args = ["serve", "--model", MODEL, "--host", "127.0.0.1", "--port", String(port), "--device", "cpu"];
  if (opts.token) args.push("--token", opts.token);
  const env = { ...process.env, KODKOD_MAX_TOKENS: "512", KODKOD_HOME: mkdtempSync(path.join(tmpdir(), "kodkod-home-")) };
  const proc = spawn(KODKOD_BIN, args, { env, stdio: ["ignore", "ignore", "pipe"] });
  let log = "";
  proc.stderr!.on("data", (d) => (log = (log + d).slice(-4000)));
  const url = `http://127.0.0.1:${port}`;
  // bounded wait: the tiny model loads in a few seconds on CPU
  for (let i = 0; i < 240; i++) {
    if (proc.exitCode !== null) throw new Error(`kodkod serve exited ${proc.exitCode}:\n${log}`);
    try {
      const r = await fetch(`${url}/healthz`);
      if (r.ok) break;
    } catch {
      // not listening yet
    }
    if (i === 239) {
      proc.kill();
      throw new Error(`kodkod serve did not come up in 60 s:\n${log}`);
    }
    await new Promise((r) => setTimeout(r, 250));
  }
  return {
    url,
    proc,
    async stop() {
      if (proc.exitCode !== null) return;
      const done = new Promise((r) => proc.once("exit", r));
      proc.kill("SIGTERM");
      const t = setTimeout(() => proc.kill("SIGKILL"), 5000);
      await done;
      clearTimeout(t);
    },
    // A Prometheus counter's value (0 when the series does not exist yet).
    async metric(name: string, labels = "") {
      const text = await (await fetch(`${url}/metrics`)).text();
      const want = labels ? `${name}{${labels}}` : name;
      for (const line of text.split("\n")) {
        if (line.startsWith(want + " ")) return Number(line.slice(want.length + 1));
      }
      return 0;
    },
  };
}
