// The completion loop, free of the `vscode` module so that it can be tested in plain
// Node: cache, debounce, one request in flight at a time, status, view/select/dismiss.
import { CompletionCache } from "./cache";
import { KodkodClient, KodkodError } from "./client";
import { AdaptiveDebounce, atLineEnd, sleep } from "./debounce";
import { buildRequest, RequestInput } from "./request";

export type Status =
  | { kind: "ready"; latencyMs?: number }
  | { kind: "loading" }
  | { kind: "error"; message: string; errorKind: string };

// The part of VS Code's CancellationToken we use.
export interface CancelToken {
  isCancellationRequested: boolean;
  onCancellationRequested(listener: () => void): { dispose(): void };
}

export interface Query extends RequestInput {
  doc: string; // the document's URI
  offset: number; // the cursor's offset in the document
  manual?: boolean; // asked for by the user: no debounce
  // Context that costs time to gather (declarations, snippets of other files): asked
  // for only when a request is actually sent, after the debounce and the cache.
  context?: () => Promise<Pick<RequestInput, "declarations" | "recent">>;
}

export interface Suggestion {
  id: string;
  text: string;
  cached: boolean;
}

export class Completer {
  cache = new CompletionCache();
  debounce = new AdaptiveDebounce();
  status: Status = { kind: "ready" };
  stats = { requests: 0, cacheHits: 0, aborted: 0, debounced: 0 };
  private inflight?: AbortController;
  private shown?: { id: string; at: number };

  get shownId(): string | undefined {
    return this.shown?.id;
  }

  constructor(
    public getClient: () => KodkodClient,
    public onStatus: (s: Status) => void = () => {},
    public now: () => number = () => Date.now(),
  ) {}

  private setStatus(s: Status): void {
    this.status = s;
    this.onStatus(s);
  }

  // A suggestion for the cursor, or undefined (superseded, cancelled, failed, empty).
  async provide(q: Query, token?: CancelToken): Promise<Suggestion | undefined> {
    // A new keystroke makes the previous request stale: abort it now, so that the
    // server stops generating for it (it sees the connection close).
    this.inflight?.abort();
    const ctl = new AbortController();
    this.inflight = ctl;
    const sub = token?.onCancellationRequested(() => ctl.abort());
    try {
      const hit = this.cache.get(q.doc, q.offset, q.prefix, q.suffix);
      if (hit) {
        this.stats.cacheHits++;
        return hit.text ? { id: hit.id, text: hit.text, cached: true } : undefined;
      }
      const line = q.prefix.slice(q.prefix.lastIndexOf("\n") + 1);
      const nl = q.suffix.indexOf("\n");
      const lineRest = nl < 0 ? q.suffix : q.suffix.slice(0, nl);
      const wait = q.manual ? 0 : this.debounce.delay(this.now(), atLineEnd(line, lineRest));
      try {
        if (token?.isCancellationRequested) ctl.abort();
        await sleep(wait, ctl.signal);
      } catch {
        this.stats.debounced++;
        return undefined;
      }
      const t0 = this.now();
      const extra = q.context ? await q.context() : {};
      if (ctl.signal.aborted) {
        this.stats.debounced++;
        return undefined;
      }
      this.stats.requests++;
      this.setStatus({ kind: "loading" });
      const res = await this.getClient().complete(buildRequest({ ...q, ...extra }), ctl.signal);
      this.cache.set(q.doc, q.offset, q.prefix, q.suffix, res.id, res.text);
      this.setStatus({ kind: "ready", latencyMs: this.now() - t0 });
      return res.text ? { id: res.id, text: res.text, cached: false } : undefined;
    } catch (e) {
      if (e instanceof KodkodError && e.kind === "aborted") {
        this.stats.aborted++;
        // The request that replaced this one sets the status; a cancelled one leaves
        // "loading" behind only if nothing replaced it.
        if (this.inflight === ctl) this.setStatus({ kind: "ready" });
        return undefined;
      }
      const message = e instanceof Error ? e.message : String(e);
      this.setStatus({ kind: "error", message, errorKind: e instanceof KodkodError ? e.kind : "internal" });
      return undefined;
    } finally {
      sub?.dispose();
      if (this.inflight === ctl) this.inflight = undefined;
    }
  }

  // Acceptance statistics: a suggestion was shown, accepted (whole or in part), or
  // replaced by something else without being accepted (a dismiss). Sending them never
  // fails the editor: a lost event is only a lost statistic.
  viewed(id: string): void {
    if (this.shown?.id === id) return; // the same suggestion, typed through
    if (this.shown) this.report("dismiss", this.shown.id);
    this.shown = { id, at: this.now() };
    this.report("view", id);
  }

  accepted(id: string, partial = false): void {
    const elapsed = this.shown?.id === id ? this.now() - this.shown.at : undefined;
    if (!partial) this.shown = undefined;
    this.report("select", id, { line: partial, elapsed });
  }

  dismissed(): void {
    if (this.shown) this.report("dismiss", this.shown.id);
    this.shown = undefined;
  }

  pendingEvents: Promise<void>[] = [];
  private report(type: "view" | "select" | "dismiss", id: string, opts: { line?: boolean; elapsed?: number } = {}): void {
    const p = this.getClient()
      .event(type, id, opts)
      .catch(() => {});
    // kept (bounded) so that tests can wait for the events to arrive
    this.pendingEvents.push(p);
    if (this.pendingEvents.length > 32) this.pendingEvents.shift();
  }
}
