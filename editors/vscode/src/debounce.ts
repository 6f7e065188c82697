// Adaptive debounce: how long to wait after a keystroke before asking the server.
// While the user types fast, a request would be stale before it returns, so we wait
// about twice their usual gap between keys (up to maxMs). After a pause, or where a
// line has just been finished or opened, they are likely waiting for a suggestion,
// so we wait only minMs.
export class AdaptiveDebounce {
  private lastKey?: number;
  private avgGap?: number; // moving average of the gaps between keystrokes while typing

  constructor(
    public minMs = 50,
    public maxMs = 300,
  ) {}

  // Record a keystroke at `now` (ms) and give the delay before requesting.
  delay(now: number, atLineEnd: boolean): number {
    const gap = this.lastKey === undefined ? Infinity : now - this.lastKey;
    this.lastKey = now;
    if (gap >= this.maxMs) return this.minMs; // a pause: the user is waiting
    this.avgGap = this.avgGap === undefined ? gap : 0.7 * this.avgGap + 0.3 * gap;
    if (atLineEnd) return this.minMs;
    return Math.min(this.maxMs, Math.max(this.minMs, 2 * this.avgGap));
  }
}

// Whether the cursor stands where a suggestion is wanted at once: at the start of a
// fresh line (only indentation before it) or right after a character that opens a
// block or ends a statement.
export function atLineEnd(linePrefix: string, lineSuffix: string): boolean {
  if (lineSuffix.trim() !== "" && !/^[)\]}"'`]*\s*$/.test(lineSuffix)) return false;
  return linePrefix.trim() === "" || /[:{(\[,;=]\s*$/.test(linePrefix);
}

// Resolves after `ms`, or rejects as soon as `signal` aborts (the timer is cleared).
export function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    if (signal.aborted) return reject(new Error("aborted"));
    const timer = setTimeout(() => {
      signal.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    const onAbort = () => {
      clearTimeout(timer);
      reject(new Error("aborted"));
    };
    signal.addEventListener("abort", onAbort, { once: true });
  });
}
