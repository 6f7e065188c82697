"""The `kodkod` command: one entry point, one module per subcommand.

Each subcommand lives in `server/commands/<name>.py` and defines
`add_arguments(parser)` and `run(args) -> int`. A `KodkodError` that a command raises
ends it with its one-line message, never a traceback. Modules are imported only when
their command runs, so `kodkod --help` stays fast and a broken optional
dependency only breaks the command that needs it.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from server.errors import KodkodError

# name -> (module, one-line help). Order is the order `--help` shows.
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("server.commands.serve", "run the completion server"),
    "generate": ("server.commands.generate", "generate text from a prompt and stream it"),
    "complete": ("server.commands.complete", "complete FILE:LINE:COL as the server would (--explain shows why)"),
    "download": ("server.commands.download", "fetch, import and convert a known model"),
    "convert": ("server.commands.convert", "quantize a Hugging Face model directory to EXL2"),
    "import-gguf": ("server.commands.import_gguf", "turn a GGUF file into a Hugging Face model directory"),
    "ppl": ("server.commands.ppl", "measure a model's perplexity on a text file"),
    "eval": ("server.commands.eval", "fill-in-the-middle quality on HumanEval (pass@1, exact match)"),
    "bench": ("server.commands.bench", "benchmarks: `bench http URL` replays keystroke traces, `bench engine` times the engine"),
    "doctor": ("server.commands.doctor", "show GPU, CUDA, compiler and kernel status, and self-test the kernels"),
    "build-kernels": ("server.commands.build_kernels", "compile the CUDA kernels now (for images built without a GPU)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kodkod",
        description="kodkod: a self-hosted, Tabby-compatible code completion server.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            p.set_defaults(_missing=True)
            continue
        module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    if getattr(args, "_missing", False):
        print(f"kodkod: the '{args.command}' command is not available in this build", file=sys.stderr)
        return 2
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("\nkodkod: interrupted", file=sys.stderr)
        return 130
    except KodkodError as exc:
        print(f"kodkod {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
