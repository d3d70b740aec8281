"""Data: the Llama 2 chat format and the datasets built on it."""

from llama_dist.data.chat import ChatSegment, ChatTokens, encode_dialog, render_dialog

__all__ = ["ChatSegment", "ChatTokens", "encode_dialog", "render_dialog"]
