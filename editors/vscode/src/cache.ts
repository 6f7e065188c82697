// An LRU cache of completions keyed on document, cursor offset and the text around the
// cursor. It also serves a suggestion the user is typing through: if they type the
// first characters of a cached suggestion, the rest of it is returned at once, with no
// request and no flicker. Keys hold only the text near the cursor (KEY_CHARS each side)
// so that a hundred entries of a large file stay small.
export const KEY_CHARS = 2000;

interface Entry {
  doc: string;
  offset: number;
  prefixTail: string;
  suffixHead: string;
  id: string;
  text: string;
}

export interface Hit {
  id: string;
  text: string; // what is left to insert at the cursor
  typed: number; // characters of the suggestion already typed
}

export class CompletionCache {
  // A Map iterates in insertion order: the first key is the least recently used.
  private entries = new Map<string, Entry>();

  constructor(public capacity = 100) {}

  get size(): number {
    return this.entries.size;
  }

  private static key(doc: string, offset: number, prefixTail: string, suffixHead: string): string {
    return JSON.stringify([doc, offset, prefixTail, suffixHead]);
  }

  set(doc: string, offset: number, prefix: string, suffix: string, id: string, text: string): void {
    const e: Entry = { doc, offset, prefixTail: prefix.slice(-KEY_CHARS), suffixHead: suffix.slice(0, KEY_CHARS), id, text };
    const k = CompletionCache.key(doc, offset, e.prefixTail, e.suffixHead);
    this.entries.delete(k);
    this.entries.set(k, e);
    while (this.entries.size > this.capacity) this.entries.delete(this.entries.keys().next().value as string);
  }

  get(doc: string, offset: number, prefix: string, suffix: string): Hit | undefined {
    const suffixHead = suffix.slice(0, KEY_CHARS);
    for (const [k, e] of this.entries) {
      if (e.doc !== doc || e.suffixHead !== suffixHead) continue;
      const typed = offset - e.offset;
      // typed through: the text typed since the request is the start of the suggestion
      if (typed < 0 || typed >= e.text.length && !(typed === 0 && e.text === "")) continue;
      const want = e.prefixTail + e.text.slice(0, typed);
      if (!prefix.endsWith(want.slice(-KEY_CHARS))) continue;
      this.entries.delete(k); // most recently used now
      this.entries.set(k, e);
      return { id: e.id, text: e.text.slice(typed), typed };
    }
    return undefined;
  }
}
