// HTTP to a kodkod (or any Tabby) server. Uses the global fetch (Node 18+, VS Code's
// extension host) so the bundle has no dependencies. Every failure becomes a
// KodkodError whose message says what the user should look at.
import type { TabbyRequest } from "./request";

export type ErrorKind = "unreachable" | "unauthorized" | "http" | "aborted";

export class KodkodError extends Error {
  constructor(
    public kind: ErrorKind,
    message: string,
    public status?: number,
  ) {
    super(message);
  }
}

export interface Completion {
  id: string;
  text: string;
}

export type EventType = "view" | "select" | "dismiss";

export class KodkodClient {
  constructor(
    public endpoint: string,
    public token?: string,
  ) {}

  private async post(path: string, body: unknown, signal?: AbortSignal): Promise<Response> {
    return this.send(path, { method: "POST", body: JSON.stringify(body), signal });
  }

  private async send(path: string, init: RequestInit): Promise<Response> {
    const headers: Record<string, string> = { "Content-Type": "application/json" };
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    let res: Response;
    try {
      res = await fetch(this.endpoint + path, { ...init, headers });
    } catch (e) {
      if (init.signal?.aborted) throw new KodkodError("aborted", "request aborted");
      const cause = (e as { cause?: { code?: string; message?: string } }).cause;
      const why = cause?.code ?? cause?.message ?? String(e);
      throw new KodkodError("unreachable", `kodkod server unreachable at ${this.endpoint} (${why})`);
    }
    if (res.status === 401) {
      throw new KodkodError(
        "unauthorized",
        this.token
          ? `kodkod server at ${this.endpoint} rejected the token (401): set another with "kodkod: Set token" or KODKOD_TOKEN`
          : `kodkod server at ${this.endpoint} needs a token (401): set it with "kodkod: Set token" or KODKOD_TOKEN`,
        401,
      );
    }
    if (!res.ok) {
      let detail = "";
      try {
        detail = (await res.text()).slice(0, 200);
      } catch {
        // the body is only a detail of the message
      }
      throw new KodkodError("http", `kodkod server at ${this.endpoint} answered ${res.status} ${detail}`.trim(), res.status);
    }
    return res;
  }

  async complete(body: TabbyRequest, signal?: AbortSignal): Promise<Completion> {
    const res = await this.post("/v1/completions", body, signal);
    let json: { id: string; choices: { index: number; text: string }[] };
    try {
      json = (await res.json()) as typeof json;
    } catch (e) {
      if (signal?.aborted) throw new KodkodError("aborted", "request aborted");
      throw e;
    }
    return { id: json.id, text: json.choices[0]?.text ?? "" };
  }

  async health(signal?: AbortSignal): Promise<Record<string, unknown>> {
    const res = await this.send("/v1/health", { method: "GET", signal });
    return (await res.json()) as Record<string, unknown>;
  }

  // Acceptance statistics. `line` marks a partial accept (next word / next line).
  async event(type: EventType, completionId: string, opts: { line?: boolean; elapsed?: number } = {}): Promise<void> {
    const path = opts.line ? "/v1/events?select_kind=line" : "/v1/events";
    const body: Record<string, unknown> = { type, completion_id: completionId, choice_index: 0 };
    if (opts.elapsed !== undefined) body.elapsed = Math.round(opts.elapsed);
    await this.post(path, body);
  }
}
