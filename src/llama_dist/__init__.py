"""llama_dist: train Llama 2 models with PyTorch-native parallelism."""

__version__ = "0.1.0"
