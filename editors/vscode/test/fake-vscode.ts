// The small part of the `vscode` module that extension.ts uses, enough to activate the
// extension in plain Node and drive its provider and commands.
type Listener<T> = (e: T) => unknown;
const disposable = { dispose() {} };

export class Position {
  constructor(
    public line: number,
    public character: number,
  ) {}
}
export class Range {
  start: Position;
  end: Position;
  constructor(a: Position | number, b: Position | number, c?: number, d?: number) {
    this.start = typeof a === "number" ? new Position(a, b as number) : a;
    this.end = typeof a === "number" ? new Position(c!, d!) : (b as Position);
  }
  contains(p: Position) {
    return p.line >= this.start.line && p.line <= this.end.line;
  }
}
export class InlineCompletionItem {
  constructor(
    public insertText: string,
    public range?: Range,
    public command?: { command: string; arguments?: unknown[] },
  ) {}
}
export enum StatusBarAlignment {
  Left = 1,
  Right = 2,
}
export enum InlineCompletionTriggerKind {
  Invoke = 0,
  Automatic = 1,
}

export const state = {
  config: {} as Record<string, unknown>,
  provider: undefined as any,
  commands: new Map<string, (...a: any[]) => any>(),
  executed: [] as string[],
  bar: { text: "", tooltip: "", command: "", show() {}, dispose() {} },
  inputBox: undefined as string | undefined,
  messages: [] as string[],
  configListeners: [] as Listener<{ affectsConfiguration(s: string): boolean }>[],
};

export const window = {
  activeTextEditor: undefined,
  createStatusBarItem: () => state.bar,
  onDidChangeActiveTextEditor: () => disposable,
  showInputBox: async () => state.inputBox,
  showErrorMessage: async (m: string) => void state.messages.push(`error: ${m}`),
  showInformationMessage: async (m: string) => void state.messages.push(`info: ${m}`),
};

export const workspace = {
  getConfiguration: (section: string) => ({ get: (k: string) => state.config[`${section}.${k}`] }),
  onDidChangeConfiguration: (l: Listener<{ affectsConfiguration(s: string): boolean }>) => {
    state.configListeners.push(l);
    return disposable;
  },
  asRelativePath: (uri: { path: string }) => uri.path.replace(/^\//, ""),
  openTextDocument: async () => {
    throw new Error("not in the fake");
  },
};

export const languages = {
  registerInlineCompletionItemProvider: (_sel: unknown, p: unknown) => {
    state.provider = p;
    return disposable;
  },
};

export const commands = {
  registerCommand: (name: string, f: (...a: any[]) => any) => {
    state.commands.set(name, f);
    return disposable;
  },
  executeCommand: async (name: string, ...args: any[]) => {
    state.executed.push(name);
    if (name === "vscode.executeDefinitionProvider") return [];
    return state.commands.get(name)?.(...args);
  },
};

// A text document as the provider sees one.
export function doc(path: string, text: string, languageId = "python") {
  const uri = { scheme: "file", path, toString: () => `file://${path}` };
  const lines = text.split("\n");
  return {
    uri,
    languageId,
    isClosed: false,
    lineCount: lines.length,
    getText: () => text,
    lineAt: (n: number) => ({ text: lines[n] }),
    offsetAt: (p: Position) => lines.slice(0, p.line).reduce((n, l) => n + l.length + 1, 0) + p.character,
  };
}
