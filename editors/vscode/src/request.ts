// The Tabby request body: windows of prefix and suffix around the cursor plus context
// segments. The limits are Tabby's own clients' (20 lines each side, 5 declarations,
// 500-character snippets) so that kodkod sees what any Tabby client would send.
export const MAX_LINES = 20;
export const MAX_DECLARATIONS = 5;
export const MAX_SNIPPET_CHARS = 500;

export interface Snippet {
  filepath: string;
  body: string;
  score?: number;
}

export interface TabbyRequest {
  language?: string;
  segments: {
    prefix: string;
    suffix?: string;
    filepath?: string;
    declarations?: { filepath: string; body: string }[];
    relevant_snippets_from_recently_opened_files?: { filepath: string; body: string; score: number }[];
  };
  temperature?: number;
  max_tokens?: number;
}

export interface RequestInput {
  prefix: string; // all text before the cursor
  suffix: string; // all text after the cursor
  language?: string;
  filepath?: string;
  declarations?: Snippet[];
  recent?: Snippet[];
  maxTokens?: number;
  temperature?: number;
}

// The last `n` lines of the text (the cursor's partial line counts as one).
export function lastLines(text: string, n: number): string {
  let at = text.length;
  for (let i = 0; i < n; i++) {
    const nl = text.lastIndexOf("\n", at - 1);
    if (nl < 0) return text;
    at = nl;
  }
  return text.slice(at + 1);
}

// The first `n` lines of the text (the rest of the cursor's line counts as one).
export function firstLines(text: string, n: number): string {
  let at = -1;
  for (let i = 0; i < n; i++) {
    at = text.indexOf("\n", at + 1);
    if (at < 0) return text;
  }
  return text.slice(0, at + 1);
}

export function buildRequest(input: RequestInput): TabbyRequest {
  const segments: TabbyRequest["segments"] = {
    prefix: lastLines(input.prefix, MAX_LINES),
    suffix: firstLines(input.suffix, MAX_LINES),
  };
  if (input.filepath) segments.filepath = input.filepath;
  const decls = (input.declarations ?? []).slice(0, MAX_DECLARATIONS);
  if (decls.length) {
    segments.declarations = decls.map((d) => ({ filepath: d.filepath, body: d.body.slice(0, MAX_SNIPPET_CHARS) }));
  }
  const recent = (input.recent ?? []).slice(0, MAX_DECLARATIONS);
  if (recent.length) {
    segments.relevant_snippets_from_recently_opened_files = recent.map((s) => ({
      filepath: s.filepath,
      body: s.body.slice(0, MAX_SNIPPET_CHARS),
      score: s.score ?? 0,
    }));
  }
  const body: TabbyRequest = { segments };
  if (input.language) body.language = input.language;
  if (input.maxTokens) body.max_tokens = input.maxTokens;
  if (input.temperature !== undefined) body.temperature = input.temperature;
  return body;
}

const IDENT = /[A-Za-z_][A-Za-z0-9_]*/g;

// Identifiers on the lines just before the cursor, nearest first: the symbols whose
// definitions are worth sending as `declarations`.
export function identifiersNearCursor(prefix: string, lines = 3, max = 8): string[] {
  const window = lastLines(prefix, lines);
  const found = window.match(IDENT) ?? [];
  const out: string[] = [];
  for (let i = found.length - 1; i >= 0 && out.length < max; i--) {
    const id = found[i];
    if (id.length > 1 && !out.includes(id)) out.push(id);
  }
  return out;
}

// The window of another file that shares most identifiers with the code before the
// cursor (Jaccard similarity over 10-line windows), as a snippet for
// `relevant_snippets_from_recently_opened_files`; undefined when nothing is shared.
export function bestSnippet(filepath: string, text: string, prefix: string, windowLines = 10): Snippet | undefined {
  const query = new Set(lastLines(prefix, windowLines).match(IDENT) ?? []);
  if (!query.size) return undefined;
  const lines = text.split("\n");
  let best: Snippet | undefined;
  // windows overlap by half so that a definition cut by one is whole in the next
  const step = Math.max(1, Math.floor(windowLines / 2));
  for (let start = 0; start < lines.length; start += step) {
    const body = lines.slice(start, start + windowLines).join("\n");
    const ids = new Set(body.match(IDENT) ?? []);
    let shared = 0;
    for (const id of ids) if (query.has(id)) shared++;
    const score = shared / (query.size + ids.size - shared || 1);
    if (shared && (!best || score > (best.score ?? 0))) best = { filepath, body: body.slice(0, MAX_SNIPPET_CHARS), score };
    if (start + windowLines >= lines.length) break;
  }
  return best;
}
