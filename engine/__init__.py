"""kodkod's inference engine: EXL2/HF model loading, the reference forward, generation.

Public face (see docs/engine-api.md): load_model, Engine, GenerationParams, TokenEvent, ModelError.
"""
from .config import ModelConfig, ModelError
from .engine import Engine, load_model
from .params import GenerationParams, TokenEvent

__all__ = ["Engine", "GenerationParams", "ModelConfig", "ModelError", "TokenEvent", "load_model"]
