"""Sampling from a Llama with a KV cache: greedy, top-k and nucleus (top-p), batched.

Prompts of different lengths share one batch by left padding: each row's padding is a
document of its own (`document_ids` 0, the prompt 1), so no prompt or generated token attends
to it, and rotary positions start at 0 at each row's first real token. Every row then
generates into the same cache slot at each step. The padded batch yields the logits of each
prompt run alone, up to rounding.

`decode` is the step loop itself, one list of new tokens per step; `generate` collects it,
`stream` yields one prompt's tokens as they come, and `llama_dist.generation_dist` drives it
on a sharded model with its own cache and a collective stop.

Command line: `python launch/generate.py --checkpoint PATH --tokenizer tokenizer.model
--prompt "text" [--prompt ...] [--chat]`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from llama_dist.checkpoint import load_model_checkpoint
from llama_dist.data.chat import encode_dialog
from llama_dist.models.config import LlamaConfig
from llama_dist.models.hf_adapter import load_hf_folder
from llama_dist.models.llama import KVCache, Llama
from llama_dist.tokenizer import Tokenizer

# Any valid id: padded slots are masked out of attention and their logits are never read.
_PAD_ID = 0
_PAD_DOCUMENT, _PROMPT_DOCUMENT = 0, 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_sampling(*, temperature: float, top_p: float, top_k: int) -> None:
    """ValueError naming the fix for a temperature, top_p or top_k `sample_next` refuses."""
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy decoding)")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]; 1 samples from the whole vocabulary")
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise ValueError(f"top_k={top_k!r} must be an int (the number of tokens kept; 0: all)")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0; 0 disables the top-k cut")


def check_generate_args(
    cfg: LlamaConfig,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
) -> None:
    """ValueError naming the fix for arguments `generate` cannot run with a model of `cfg`."""
    if not prompts:
        raise ValueError("no prompts given; pass a list of token-id lists")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"prompts {empty} are empty; start each prompt with at least bos")
    vocab = cfg.vocab_size
    for i, prompt in enumerate(prompts):
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(
                f"prompt {i} has token ids {bad[:5]} outside the model's vocabulary "
                f"[0, {vocab}); encode with the tokenizer the model was trained with"
            )
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"the longest prompt ({longest} tokens) plus max_new_tokens={max_new_tokens} exceeds "
            f"the model's max_seq_len={cfg.max_seq_len}; shorten the prompt or generate "
            "fewer tokens"
        )
    check_sampling(temperature=temperature, top_p=top_p, top_k=top_k)


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (bsz,) from logits (bsz, vocab_size): argmax when temperature is 0, else
    a sample from the `top_k` most likely tokens (0: all; more than the vocabulary: all), cut
    further to the smallest set of most likely tokens whose probability reaches top_p."""
    check_sampling(temperature=temperature, top_p=top_p, top_k=top_k)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        # Exactly k tokens stay, even when others tie with the k-th.
        values, indices = logits.topk(top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter_(-1, indices, values)
    probs = torch.softmax(logits, dim=-1)
    if top_p >= 1:
        # Skips the cut, which rounding in the cumulative sum could apply to the least likely.
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # A token stays if the tokens more likely than it hold less than top_p: the most likely
    # token always stays, so a tiny top_p is greedy. After a top-k cut the mass is that of the
    # renormalised k tokens.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)  # renormalises
    return order.gather(-1, choice).squeeze(-1)


def _last_logits(logits: torch.Tensor) -> torch.Tensor:
    """(bsz, vocab) of the last position; a vocabulary-sharded DTensor (tensor parallel with
    loss parallelism) is gathered after the slice, so only one position travels."""
    last = logits[:, -1]
    return last.full_tensor() if isinstance(last, DTensor) else last


@torch.no_grad()
def decode(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    *,
    kv_cache: KVCache,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int = 0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    sync_tokens: Callable[[torch.Tensor], torch.Tensor] | None = None,
    all_done: Callable[[bool], bool] | None = None,
) -> Iterator[list[int | None]]:
    """Each step's new token of every row, None for a row that has already produced `eos_id`.

    The arguments are `generate`'s, checked by the caller (`check_generate_args`), with
    max_new_tokens > 0 and an empty `kv_cache` for len(prompts) rows of the longest prompt plus
    max_new_tokens slots. Two hooks serve sharded models, whose forwards are collective:
    `sync_tokens` replaces the sampled tokens (bsz,), e.g. by those of the first rank of a
    tensor-parallel group; `all_done(done_here)` says whether every rank is done, so that a
    rank whose rows have finished keeps stepping with the others (default: done_here).
    """
    assert max_new_tokens > 0 and kv_cache.length == 0
    device = model.tok_embeddings.weight.device
    bsz = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    longest = int(lengths.max())

    # (bsz, longest), each prompt at the right end
    num_pad = longest - lengths
    tokens = torch.full((bsz, longest), _PAD_ID, dtype=torch.long, device=device)
    for i, prompt in enumerate(prompts):
        tokens[i, int(num_pad[i]) :] = torch.tensor(prompt, dtype=torch.long, device=device)
    padded = bool(num_pad.any())
    if padded:
        slots = torch.arange(longest, device=device)
        # Padding gets position 0; it is masked out, so its positions do not matter.
        position_ids = (slots[None, :] - num_pad[:, None]).clamp(min=0)
        document_ids = torch.where(
            slots[None, :] < num_pad[:, None], _PAD_DOCUMENT, _PROMPT_DOCUMENT
        )
        logits = model(
            tokens, position_ids=position_ids, document_ids=document_ids, kv_cache=kv_cache
        )
    else:
        # Equal lengths: the default positions and SDPA's own causal mask are right.
        logits = model(tokens, kv_cache=kv_cache)

    next_position = lengths[:, None]  # (bsz, 1)
    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        next_tokens = sample_next(
            _last_logits(logits),
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            generator=generator,
        )
        if sync_tokens is not None:
            next_tokens = sync_tokens(next_tokens)
        yield [
            None if finished else token
            for token, finished in zip(next_tokens.tolist(), done.tolist(), strict=True)
        ]
        if eos_id is not None:
            done |= next_tokens == eos_id
        if step == max_new_tokens - 1:
            break
        done_here = bool(done.all())
        if done_here if all_done is None else all_done(done_here):
            break
        # New tokens continue their row's document (the prompt) in the cache.
        position_ids = next_position if padded else None
        logits = model(next_tokens[:, None], position_ids=position_ids, kv_cache=kv_cache)
        next_position = next_position + 1


def generate(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """The new tokens of each prompt (lists of token ids, e.g. starting with bos).

    temperature 0 decodes greedily; otherwise sampling from the `top_k` most likely tokens
    (0: no cut) and within them the `top_p` nucleus, drawing from `generator` (on the model's
    device) for reproducible samples. A row stops after it produces `eos_id`, which ends its
    list; others run to `max_new_tokens`.
    """
    check_generate_args(
        model.cfg,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
    )
    results: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0:
        return results
    longest = max(len(p) for p in prompts)
    cache = model.new_kv_cache(len(prompts), longest + max_new_tokens)
    steps = decode(
        model,
        prompts,
        kv_cache=cache,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        eos_id=eos_id,
        generator=generator,
    )
    for new in steps:
        for row, token in zip(results, new, strict=True):
            if token is not None:
                row.append(token)
    return results


def stream(
    model: Llama,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """`generate` of one prompt, each new token yielded as soon as it is sampled (eos last)."""
    check_generate_args(
        model.cfg,
        [prompt],
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
    )
    if max_new_tokens == 0:
        return
    cache = model.new_kv_cache(1, len(prompt) + max_new_tokens)
    steps = decode(
        model,
        [prompt],
        kv_cache=cache,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        eos_id=eos_id,
        generator=generator,
    )
    for (token,) in steps:
        if token is None:
            return
        yield token


def load_for_generation(
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[Llama, LlamaConfig]:
    """(model in eval mode, its config) from a llama_dist checkpoint folder (or a run folder
    of step-N checkpoints) or an HF `LlamaForCausalLM` folder (one with a config.json)."""
    path = Path(path)
    if (path / "config.json").is_file():
        cfg, state_dict = load_hf_folder(path)
    else:
        cfg, state_dict = load_model_checkpoint(path)
    with torch.device("meta"):
        model = Llama(cfg)
    model.to_empty(device=device)
    model.to(dtype=dtype)
    model.load_state_dict(state_dict, strict=True)
    # After the cast: the rotary tables stay in fp32.
    model.reset_rope()
    return model.eval(), cfg


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="generate.py",
        description="Continue prompts with a llama_dist or HF Llama checkpoint.",
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="llama_dist checkpoint folder (or run folder of step-N checkpoints) or HF folder",
    )
    parser.add_argument(
        "--tokenizer", required=True, metavar="PATH", help="the SentencePiece tokenizer.model"
    )
    parser.add_argument(
        "--prompt",
        action="append",
        required=True,
        metavar="TEXT",
        help="a prompt; repeat for a batch",
    )
    parser.add_argument("--max-new-tokens", type=int, default=100, metavar="N")
    parser.add_argument(
        "--temperature", type=float, default=0.8, help="0 decodes greedily (default: 0.8)"
    )
    parser.add_argument(
        "--top-p", type=float, default=0.9, help="nucleus sampling mass (default: 0.9)"
    )
    parser.add_argument(
        "--top-k", type=int, default=0, help="sample among the k most likely (default: 0, all)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument(
        "--chat",
        action="store_true",
        help="wrap each prompt as a user message in the Llama 2 chat template",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="default: cuda if available, else cpu",
    )
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(prompt, continuation) for each --prompt."""
    tokenizer = Tokenizer(args.tokenizer)
    model, cfg = load_for_generation(args.checkpoint, device=args.device, dtype=_DTYPES[args.dtype])
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} pieces but the model only "
            f"vocab_size={cfg.vocab_size}; pass the tokenizer the model was trained with"
        )
    if args.chat:
        prompts = [
            encode_dialog(tokenizer, [{"role": "user", "content": text}]).ids
            for text in args.prompt
        ]
    else:
        prompts = [tokenizer.encode(text, bos=True) for text in args.prompt]
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    continuations = complete(
        model,
        tokenizer,
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        generator=generator,
    )
    return list(zip(args.prompt, continuations, strict=True))


def complete(
    model: Llama,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> list[str]:
    """The decoded continuation of each tokenized prompt, stopping at the tokenizer's eos."""
    outputs = generate(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        eos_id=tokenizer.eos_id,
        generator=generator,
    )
    return [tokenizer.decode(ids) for ids in outputs]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        results = run(args)
    except ValueError as err:
        print(f"generate.py: error: {err}", file=sys.stderr)
        return 2
    for prompt, continuation in results:
        print(prompt)
        print(f"> {continuation}")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
