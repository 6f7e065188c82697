"""`kodkod complete FILE:LINE:COL`: complete at a position exactly as the server would."""
from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("position", metavar="FILE:LINE:COL", help="file and 1-based line and column of the cursor")
    p.add_argument("--model", help="model directory or known model name (default: the default model)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], help="where the model runs (default auto)")
    p.add_argument("--language", help="VS Code languageId (default: from the file name)")
    p.add_argument("--max-tokens", type=int, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--config", help="TOML config file, as for `kodkod serve`")
    p.add_argument("--explain", action="store_true", help="show the prompt, the stop rules and every decision")


def split_position(text: str, line: int, col: int) -> tuple[str, str]:
    """Prefix and suffix of `text` at 1-based (line, col); col past the end clamps to the line end."""
    lines = text.splitlines(keepends=True) or [""]
    if not 1 <= line <= len(lines) + 1:
        raise ValueError(f"line {line} is outside the file (1..{len(lines)})")
    before = "".join(lines[: line - 1])
    cur = lines[line - 1] if line <= len(lines) else ""
    body = cur.rstrip("\r\n")
    if col < 1:
        raise ValueError("columns start at 1")
    c = min(col - 1, len(body))
    return before + cur[:c], cur[c:] + "".join(lines[line:])


def run(args) -> int:
    from pathlib import Path

    from server.config import ConfigError, load_config

    file, sep, rest = args.position.rpartition(":")
    file2, sep2, line_s = file.rpartition(":")
    try:
        path, line, col = Path(file2), int(line_s), int(rest)
        if not sep or not sep2:
            raise ValueError
    except ValueError:
        print(f"kodkod complete: expected FILE:LINE:COL, not {args.position!r}", file=sys.stderr)
        return 2
    try:
        text = path.read_text(encoding="utf-8")
        prefix, suffix = split_position(text, line, col)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        print(f"kodkod complete: {path}: {exc}", file=sys.stderr)
        return 2
    try:
        config = load_config({"model": args.model, "device": args.device}, config_file=args.config)
    except ConfigError as exc:
        print(f"kodkod complete: {exc}", file=sys.stderr)
        return 2

    from server.commands.common import load_engine
    from server.commands.serve import resolve_model
    from server.completion import CompletionService
    from server.errors import ApiError
    from server.schemas import CompletionRequest

    engine = load_engine(resolve_model(config.model, config.home), device=config.device, dtype=config.dtype)
    language = args.language or _language_for(path)
    req = CompletionRequest(language=language, segments={"prefix": prefix, "suffix": suffix, "filepath": str(path)},
                            max_tokens=args.max_tokens, temperature=args.temperature, seed=0)
    service = CompletionService(engine, config)
    try:
        service.validate(req)
    except ApiError as exc:
        print(f"kodkod complete: {exc.message}", file=sys.stderr)
        return 1
    info, plan = service._prepare(req)
    ids, params = plan[0]
    raw, finish = "", None
    for ev in engine.generate(ids, params):
        raw += ev.text
        finish = ev.finish_reason or finish
    final, decisions = service.finish_text(raw, info)
    if args.explain:
        p = info.prompt
        out = sys.stdout
        print(f"# language: {language} -> {getattr(info.lang, 'name', info.lang)}", file=out)
        print(f"# prompt: {len(p.ids)} tokens, multiline={getattr(p, 'multiline', None)}", file=out)
        for d in getattr(p, "decisions", []) or []:
            print(f"#   prompt: {d}", file=out)
        print(f"# stop strings: {list(params.stop_strings)!r}", file=out)
        print(f"# stop tokens: {list(params.stop_token_ids)!r}", file=out)
        print("# ---- prompt text ----", file=out)
        print(getattr(p, "text", ""), file=out)
        print(f"# ---- raw model output (finish: {finish}) ----", file=out)
        print(repr(raw), file=out)
        for d in decisions:
            print(f"#   post-process: {d}", file=out)
        print("# ---- completion ----", file=out)
    sys.stdout.write(final + ("\n" if not final.endswith("\n") else ""))
    return 0


_EXT = {".py": "python", ".js": "javascript", ".jsx": "javascriptreact", ".ts": "typescript",
        ".tsx": "typescriptreact", ".go": "go", ".rs": "rust", ".java": "java", ".c": "c", ".h": "c",
        ".cpp": "cpp", ".cc": "cpp", ".hpp": "cpp", ".cs": "csharp", ".rb": "ruby", ".php": "php",
        ".lua": "lua", ".sh": "shellscript", ".kt": "kotlin"}


def _language_for(path) -> str | None:
    return _EXT.get(path.suffix.lower())
