"""Per-language settings, read from languages/data/*.toml once, on first use."""
from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
QUERY_DIR = Path(__file__).parent / "queries"


@dataclass(frozen=True)
class Language:
    name: str
    language_ids: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    extensions: tuple[str, ...] = ()
    line_comment: str | None = None
    block_comment: tuple[str, str] | None = None
    top_level_keywords: tuple[str, ...] = ()
    definition_keywords: tuple[str, ...] = ()
    import_patterns: tuple[str, ...] = ()
    scope_node_types: frozenset[str] = frozenset()
    block_end: tuple[str, ...] = ()
    grammar: str | None = None  # "module:function" returning a tree-sitter language pointer
    queries: str | None = None  # folder under languages/queries/
    parse_lead: str = ""  # text a fragment needs in front to parse (PHP's "<?php")
    signature_stub: str = ""  # text that closes a lone signature so it parses
    generic: bool = False

    def comment(self, line: str) -> str:
        """`line` as a comment of this language (line comment if it has one)."""
        if self.line_comment:
            return f"{self.line_comment} {line}".rstrip()
        if self.block_comment:
            return f"{self.block_comment[0]} {line} {self.block_comment[1]}"
        return f"# {line}".rstrip()

    @property
    def import_re(self) -> re.Pattern | None:
        return _compile_any(self.import_patterns)


@cache
def _compile_any(patterns: tuple[str, ...]) -> re.Pattern | None:
    return re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None


GENERIC = Language(name="generic", line_comment="#", generic=True)


def _from_toml(path: Path) -> Language:
    d = tomllib.loads(path.read_text(encoding="utf-8"))
    g = d.get("grammar", {})
    bc = d.get("block_comment")
    return Language(
        name=d["name"],
        language_ids=tuple(d.get("language_ids", [d["name"]])),
        aliases=tuple(d.get("aliases", [])),
        extensions=tuple(e.lower() for e in d.get("extensions", [])),
        line_comment=d.get("line_comment"),
        block_comment=(bc[0], bc[1]) if bc else None,
        top_level_keywords=tuple(d.get("top_level_keywords", [])),
        definition_keywords=tuple(d.get("definition_keywords", [])),
        import_patterns=tuple(d.get("import_patterns", [])),
        scope_node_types=frozenset(d.get("scope_node_types", [])),
        block_end=tuple(d.get("block_end", [])),
        grammar=g.get("function"),
        queries=g.get("queries"),
        parse_lead=g.get("parse_lead", ""),
        signature_stub=g.get("signature_stub", ""),
    )


@cache
def _load() -> tuple[dict[str, Language], dict[str, Language], dict[str, Language]]:
    by_name: dict[str, Language] = {}
    by_id: dict[str, Language] = {}
    by_ext: dict[str, Language] = {}
    for path in sorted(DATA_DIR.glob("*.toml")):
        lang = _from_toml(path)
        if lang.name in by_name:
            raise ValueError(f"{path}: language {lang.name!r} is defined twice")
        by_name[lang.name] = lang
        for key in (lang.name, *lang.language_ids, *lang.aliases):
            by_id.setdefault(key.lower(), lang)
        for ext in lang.extensions:
            by_ext.setdefault(ext, lang)
    return by_name, by_id, by_ext


class _Registry(Mapping[str, Language]):
    """name -> Language, loaded on first access."""

    def __getitem__(self, key: str) -> Language:
        return _load()[0][key]

    def __iter__(self) -> Iterator[str]:
        return iter(_load()[0])

    def __len__(self) -> int:
        return len(_load()[0])


LANGUAGES: Mapping[str, Language] = _Registry()


def resolve_language(language_id: str | None, filepath: str | None = None) -> Language:
    """VS Code languageId or alias, else the file's extension, else a generic language."""
    _, by_id, by_ext = _load()
    if language_id and language_id.strip().lower() in by_id:
        return by_id[language_id.strip().lower()]
    if filepath:
        name = filepath.replace("\\", "/").rsplit("/", 1)[-1].lower()
        # Longest extension first, so ".d.ts" or ".blade.php" could win over ".ts".
        parts = name.split(".")
        for i in range(1, len(parts)):
            ext = "." + ".".join(parts[i:])
            if ext in by_ext:
                return by_ext[ext]
        if name in by_ext:  # names like "Makefile", "Dockerfile"
            return by_ext[name]
    return GENERIC
