"""Source-code knowledge for completions: languages, FIM prompts, post-processing.

No engine, no HTTP: token counts go through a tokenizer object passed in.
"""
from .data import LANGUAGES, Language, resolve_language
from .fim import FimTemplate, fim_template_for
from .postprocess import Completion, postprocess
from .prompt import Prompt, build_prompt
from .segments import Segments, Snippet

__all__ = ["Snippet", "Segments", "Language", "FimTemplate", "Prompt", "Completion",
           "resolve_language", "fim_template_for", "build_prompt", "postprocess", "LANGUAGES"]
