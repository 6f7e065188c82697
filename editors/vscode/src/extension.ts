// The VS Code side: an inline completion provider, a status bar item and commands.
// All decisions (what to send, when, what to show) live in completer.ts and friends,
// which do not import `vscode` and are tested against a real server.
import * as vscode from "vscode";
import { KodkodClient } from "./client";
import { Completer, Status } from "./completer";
import { resolveConfig } from "./config";
import { bestSnippet, identifiersNearCursor, Snippet } from "./request";

const TOKEN_KEY = "kodkod.token";
const HEALTH_EVERY_MS = 60_000;
const DECLARATION_BUDGET_MS = 100; // never hold a suggestion back longer for context

let client: KodkodClient | undefined;

export async function activate(context: vscode.ExtensionContext): Promise<Completer> {
  let token = await context.secrets.get(TOKEN_KEY);
  const rebuild = () => {
    const cfg = vscode.workspace.getConfiguration("kodkod");
    const r = resolveConfig(cfg.get<string>("endpoint"), token);
    client = new KodkodClient(r.endpoint, r.token);
    completer.debounce.minMs = cfg.get<number>("debounce.minMs") ?? 50;
    completer.debounce.maxMs = cfg.get<number>("debounce.maxMs") ?? 300;
  };
  const bar = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Right, 100);
  bar.command = "kodkod.status";
  const show = (s: Status) => {
    if (s.kind === "loading") {
      bar.text = "$(loading~spin) kodkod";
      bar.tooltip = "kodkod: waiting for the server";
    } else if (s.kind === "error") {
      bar.text = "$(warning) kodkod";
      bar.tooltip = `kodkod: ${s.message}`;
    } else {
      bar.text = s.latencyMs === undefined ? "$(check) kodkod" : `$(check) kodkod ${s.latencyMs} ms`;
      bar.tooltip = `kodkod: ready (${client?.endpoint})`;
    }
  };
  const completer = new Completer(() => client!, show);
  rebuild();
  show(completer.status);
  bar.show();

  // Documents the user had open recently (most recent first), for context snippets.
  const recent: vscode.TextDocument[] = [];
  const touch = (doc?: vscode.TextDocument) => {
    if (!doc || doc.uri.scheme !== "file") return;
    const i = recent.indexOf(doc);
    if (i >= 0) recent.splice(i, 1);
    recent.unshift(doc);
    recent.length = Math.min(recent.length, 10);
  };
  touch(vscode.window.activeTextEditor?.document);

  const health = async () => {
    try {
      await client!.health(AbortSignal.timeout(5000));
      if (completer.status.kind === "error") show((completer.status = { kind: "ready" }));
    } catch (e) {
      completer.status = { kind: "error", message: (e as Error).message, errorKind: "health" };
      show(completer.status);
    }
  };
  void health();
  const timer = setInterval(health, HEALTH_EVERY_MS);

  let manualPending = false;
  const provider: vscode.InlineCompletionItemProvider = {
    async provideInlineCompletionItems(document, position, ctx, cancel) {
      const cfg = vscode.workspace.getConfiguration("kodkod");
      if ((cfg.get<string[]>("disabledLanguages") ?? []).includes(document.languageId)) return undefined;
      const manual = ctx.triggerKind === vscode.InlineCompletionTriggerKind.Invoke || manualPending;
      manualPending = false;
      if (!manual && cfg.get<string>("triggerMode") === "manual") return undefined;
      const text = document.getText();
      const offset = document.offsetAt(position);
      const prefix = text.slice(0, offset);
      const s = await completer.provide(
        {
          doc: document.uri.toString(),
          offset,
          prefix,
          suffix: text.slice(offset),
          language: document.languageId,
          filepath: vscode.workspace.asRelativePath(document.uri),
          manual,
          context: async () => ({
            declarations: await declarations(document, position, prefix),
            recent: recentSnippets(recent, document, prefix),
          }),
        },
        cancel,
      );
      if (!s || cancel.isCancellationRequested) return undefined;
      completer.viewed(s.id);
      const item = new vscode.InlineCompletionItem(s.text, new vscode.Range(position, position), {
        title: "kodkod: accepted",
        command: "kodkod.accepted",
        arguments: [s.id],
      });
      return [item];
    },
  };

  const lastShownId = () => completer.shownId;
  context.subscriptions.push(
    bar,
    { dispose: () => clearInterval(timer) },
    vscode.languages.registerInlineCompletionItemProvider({ pattern: "**" }, provider),
    vscode.window.onDidChangeActiveTextEditor((e) => touch(e?.document)),
    vscode.workspace.onDidChangeConfiguration((e) => e.affectsConfiguration("kodkod") && rebuild()),
    vscode.commands.registerCommand("kodkod.accepted", (id: string) => completer.accepted(id)),
    vscode.commands.registerCommand("kodkod.trigger", async () => {
      manualPending = true;
      await vscode.commands.executeCommand("editor.action.inlineSuggest.trigger");
    }),
    vscode.commands.registerCommand("kodkod.acceptNextWord", async () => {
      const id = lastShownId();
      await vscode.commands.executeCommand("editor.action.inlineSuggest.acceptNextWord");
      if (id) completer.accepted(id, true);
    }),
    vscode.commands.registerCommand("kodkod.acceptNextLine", async () => {
      const id = lastShownId();
      await vscode.commands.executeCommand("editor.action.inlineSuggest.acceptNextLine");
      if (id) completer.accepted(id, true);
    }),
    vscode.commands.registerCommand("kodkod.dismiss", async () => {
      completer.dismissed();
      await vscode.commands.executeCommand("editor.action.inlineSuggest.hide");
    }),
    vscode.commands.registerCommand("kodkod.setToken", async () => {
      const value = await vscode.window.showInputBox({ prompt: "kodkod token (empty: none)", password: true });
      if (value === undefined) return;
      if (value) await context.secrets.store(TOKEN_KEY, value);
      else await context.secrets.delete(TOKEN_KEY);
      token = value || undefined;
      rebuild();
      await health();
    }),
    vscode.commands.registerCommand("kodkod.status", async () => {
      await health();
      const s = completer.status;
      const msg = s.kind === "error" ? s.message : `kodkod: ready at ${client!.endpoint}`;
      if (s.kind === "error") void vscode.window.showErrorMessage(msg);
      else void vscode.window.showInformationMessage(msg);
    }),
  );
  return completer;
}

export function deactivate(): void {}

// Definitions of the symbols just before the cursor, from the language's own
// definition provider, within a small time budget.
async function declarations(document: vscode.TextDocument, position: vscode.Position, prefix: string): Promise<Snippet[]> {
  const ids = identifiersNearCursor(prefix);
  if (!ids.length) return [];
  const lineText = document.lineAt(position.line).text;
  const work = (async () => {
    const out: Snippet[] = [];
    for (const id of ids) {
      const col = lineText.lastIndexOf(id);
      if (col < 0 || out.length >= 5) continue;
      const locs = await vscode.commands.executeCommand<(vscode.Location | vscode.LocationLink)[]>(
        "vscode.executeDefinitionProvider",
        document.uri,
        new vscode.Position(position.line, col),
      );
      for (const loc of locs ?? []) {
        const uri = "targetUri" in loc ? loc.targetUri : loc.uri;
        const range = "targetRange" in loc ? loc.targetRange : loc.range;
        if (uri.toString() === document.uri.toString() && range.contains(position)) continue;
        const target = await vscode.workspace.openTextDocument(uri);
        const end = Math.min(target.lineCount - 1, range.start.line + 10);
        const body = target.getText(new vscode.Range(range.start.line, 0, end, 0));
        out.push({ filepath: vscode.workspace.asRelativePath(uri), body });
        break;
      }
    }
    return out;
  })().catch(() => [] as Snippet[]);
  const late = new Promise<Snippet[]>((r) => setTimeout(() => r([]), DECLARATION_BUDGET_MS));
  return Promise.race([work, late]);
}

function recentSnippets(recent: vscode.TextDocument[], current: vscode.TextDocument, prefix: string): Snippet[] {
  const out: Snippet[] = [];
  for (const doc of recent) {
    if (doc === current || doc.isClosed || doc.getText().length > 500_000) continue;
    const s = bestSnippet(vscode.workspace.asRelativePath(doc.uri), doc.getText(), prefix);
    if (s) out.push(s);
  }
  return out.sort((a, b) => (b.score ?? 0) - (a.score ?? 0)).slice(0, 3);
}
