"""Training FLOPs per token, by the convention of ../shared/docs/llama2.md ("MFU convention")."""

from __future__ import annotations

from llama_dist.models.config import LlamaConfig


def flops_per_token(cfg: LlamaConfig, seq_len: int) -> int:
    """Model FLOPs to train on one token at sequence length `seq_len` (forward + backward).

    6 * (N - N_embedding) + 12 * L * H * Q * T, with
    - 6 * (N - N_embedding): every parameter is used in one multiply-add (2 FLOPs) forward and
      two backward (input and weight gradients). The embedding lookup is a gather, not a
      matmul, so it is left out; the output projection is a matmul and counts at its own
      width (vocab_size rows for an LM, `output_dim` rows for a reward model's scalar head).
    - 12 * L * H * Q * T: attention scores (q k^T) and their weighted sum (p v), 2 matmuls of
      2 * H * Q * T FLOPs each per token and layer forward, times 3 for forward + backward.
      Counted over the full T x T square, as the convention does, not only the causal half.
    Recomputation is not counted (that would be hardware FLOPs utilisation).
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len} must be positive")
    non_embedding = cfg.num_params(exclude_embedding=True)
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len
    return 6 * non_embedding + attention
