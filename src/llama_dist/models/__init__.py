"""Model definitions. Nothing here imports torch.distributed."""

from llama_dist.models.config import PRESETS, LlamaConfig, RopeScaling, get_preset
from llama_dist.models.llama import Llama

__all__ = ["PRESETS", "Llama", "LlamaConfig", "RopeScaling", "get_preset"]
