"""lm-evaluation-harness model over a llama_dist checkpoint, in one process.

`LlamaDistLM` is registered with the harness as "llama_dist": after this module is imported,
`--model llama_dist --model_args checkpoint=DIR,tokenizer=PATH` evaluates a pretraining, SFT or
RLHF checkpoint folder (or a run folder of step-N checkpoints, or an HF Llama folder) with the
llama_dist SentencePiece tokenizer. `python -m llama_dist.evaluation` is the harness's command
line with the import done first.

The three request types follow the harness's own HF model (`lm_eval.models.huggingface.HFLM`)
so that scores are comparable with it: the same context truncation, the same rolling windows,
the same stop-sequence handling. What differs is the engine: batches by length through the
llama_dist model, and generation through `llama_dist.generate.decode` with its KV cache.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from tqdm import tqdm

from llama_dist.generate import check_sampling, decode, load_for_generation
from llama_dist.tokenizer import Tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Any id: right padding of a loglikelihood batch sits after every real token, so the causal
# mask keeps it out of their attention, and its logits are never read.
_PAD_ID = 0

# (cache key, context ids, continuation ids), as TemplateLM.loglikelihood builds them.
TokenRequest = tuple[Any, list[int], list[int]]


def resolve_tokenizer(checkpoint: str | os.PathLike, tokenizer: str | None) -> Path:
    """The tokenizer.model to use: `tokenizer` if given, else one inside the checkpoint
    folder (HF folders often carry it). ValueError naming the fix when there is none."""
    if tokenizer:
        return Path(tokenizer)
    inside = Path(checkpoint) / "tokenizer.model"
    if inside.is_file():
        return inside
    raise ValueError(
        f"checkpoint {str(checkpoint)!r} has no tokenizer.model and no tokenizer was given; "
        "pass the SentencePiece model it was trained with, e.g. --model_args "
        f"checkpoint={checkpoint},tokenizer=PATH/tokenizer.model"
    )


def _as_bool(value: bool | str) -> bool:
    """model_args arrive as strings from the command line ("True", "false", ...)."""
    if isinstance(value, bool):
        return value
    lowered = str(value).lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError(f"expected a boolean, got {value!r}")


@register_model("llama_dist")
class LlamaDistLM(TemplateLM):
    """A llama_dist Llama as an lm-eval model.

    model_args: `checkpoint` (required), `tokenizer` (default: tokenizer.model inside the
    checkpoint folder), `batch_size` (requests per forward, default 8), `max_length` (context
    window, default the model's max_seq_len), `max_gen_toks` (default 256, as HFLM),
    `add_bos_token` (default True: llama_dist documents start with bos, and HFLM adds it too
    with a Llama tokenizer; it leads contexts of loglikelihood and generation requests),
    `device`, `dtype`, `seed` (sampling).

    One difference from HFLM, on purpose: rolling loglikelihood encodes the text without bos,
    since the first window's prefix token is bos already (HFLM with add_bos_token scores bos
    after bos); with add_bos_token=False HFLM's windows are these.
    """

    def __init__(
        self,
        checkpoint: str,
        tokenizer: str | None = None,
        batch_size: int | str | None = 8,
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        add_bos_token: bool | str = True,
        device: str | None = None,
        dtype: str = "float32",
        seed: int | str = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        # The harness passes max_batch_size (for "auto" batch sizes) to every model.
        unknown = sorted(set(kwargs) - {"max_batch_size"})
        if unknown:
            raise ValueError(
                f"unknown model_args {unknown} for the llama_dist model; it takes checkpoint, "
                "tokenizer, batch_size, max_length, max_gen_toks, add_bos_token, device, dtype "
                "and seed"
            )
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {sorted(_DTYPES)}")
        # The harness passes its --batch_size and --device to every model (None when not
        # given; "auto" or "auto:N" for models that size batches, which this one does not).
        if batch_size is None or (isinstance(batch_size, str) and batch_size.startswith("auto")):
            batch_size = 8
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        tokenizer_path = resolve_tokenizer(checkpoint, tokenizer)
        self._tok = Tokenizer(tokenizer_path)
        self.model, self.cfg = load_for_generation(
            checkpoint, device=self.device, dtype=_DTYPES[dtype]
        )
        if self.cfg.output_dim is not None:
            raise ValueError(
                f"checkpoint {checkpoint!r} is a reward model (output_dim={self.cfg.output_dim}); "
                "evaluate a language model (pretraining, SFT or PPO policy checkpoint)"
            )
        if self._tok.vocab_size > self.cfg.vocab_size:
            raise ValueError(
                f"tokenizer {str(tokenizer_path)!r} has {self._tok.vocab_size} pieces but the "
                f"model only vocab_size={self.cfg.vocab_size}; pass the tokenizer the model was "
                "trained with"
            )
        self._max_length = int(max_length) if max_length else self.cfg.max_seq_len
        if not 1 < self._max_length <= self.cfg.max_seq_len:
            raise ValueError(
                f"max_length={max_length} must be in [2, max_seq_len={self.cfg.max_seq_len}]"
            )
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = _as_bool(add_bos_token)
        self._seed = int(seed)
        self._generator = torch.Generator(device=self.device).manual_seed(self._seed)
        self.checkpoint = str(checkpoint)
        self.tokenizer_path = str(tokenizer_path)

    # The harness's view of the tokenizer -------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        # The context of an empty-context request and of the first rolling window, as HFLM
        # uses the tokenizer's bos.
        return self._tok.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        # Keys the harness's request cache: the tokenizer's content, not its file name.
        return f"sentencepiece-{self._tok.sha256[:16]}"

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self._tok.encode(string, bos=bos)

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        return self._tok.decode(list(tokens))

    # loglikelihood -----------------------------------------------------------------------------
    @torch.no_grad()
    def _loglikelihood_tokens(
        self,
        requests: Sequence[TokenRequest],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding gives it) for
        each request, in request order. The input is context + continuation minus its last
        token, cut on the left to max_length (HFLM's truncation); requests run longest first in
        right-padded batches, so a batch's padding is small and an out-of-memory shows at once.
        """
        batch_size = override_bs or self.batch_size
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            inputs, continuations = [], []
            for i in batch:
                _, context, continuation = requests[i]
                if not continuation:
                    raise ValueError(f"request {requests[i][0]!r} has an empty continuation")
                if not context:
                    raise ValueError(
                        f"request {requests[i][0]!r} has an empty context; the harness "
                        "gives it the prefix token"
                    )
                inputs.append((context + continuation)[-(self.max_length + 1) :][:-1])
                continuations.append(continuation)
            longest = max(len(x) for x in inputs)
            tokens = torch.full((len(batch), longest), _PAD_ID, dtype=torch.long)
            for row, x in enumerate(inputs):
                tokens[row, : len(x)] = torch.tensor(x, dtype=torch.long)
            logprobs = F.log_softmax(self.model(tokens.to(self.device)).float(), dim=-1)
            for row, (i, x, continuation) in enumerate(
                zip(batch, inputs, continuations, strict=True)
            ):
                # The continuation's tokens are the last len(continuation) targets of the row
                # (a continuation longer than the window is scored on what fits).
                num = min(len(continuation), len(x))
                target = torch.tensor(continuation[-num:], device=self.device)
                row_logprobs = logprobs[row, len(x) - num : len(x)]  # (num, vocab)
                greedy = bool((row_logprobs.argmax(dim=-1) == target).all())
                total = float(row_logprobs.gather(-1, target[:, None]).sum())
                results[i] = (total, greedy)
                key = requests[i][0]
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, (total, greedy))
                progress.update(1)
        progress.close()
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(
        self, requests: Sequence[Any], disable_tqdm: bool = False
    ) -> list[float]:
        """Log-likelihood of each whole string: max_length windows in which every token is
        scored once with as much context as fits (the harness's rolling windows, prefixed
        with bos), summed over the windows."""
        results = []
        for request in tqdm(requests, disable=disable_tqdm or self.rank != 0):
            (string,) = request.args
            windows = [
                lm_utils.make_disjoint_window(window)
                for window in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string, add_special_tokens=False),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            scores = self._loglikelihood_tokens(
                [(None, context, continuation) for context, continuation in windows],
                disable_tqdm=True,
            )
            total = sum(score for score, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            results.append(total)
        return results

    # generate_until ----------------------------------------------------------------------------
    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """Continuations stopped at the first of the request's `until` strings (and eos), at
        most `max_gen_toks` tokens, from the context cut on the left to leave room for them.
        Greedy unless gen_kwargs ask for sampling (do_sample or temperature > 0; top_p, top_k).
        Requests with the same gen_kwargs share batches, longest context first."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        progress = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0)
        for indices in groups.values():
            gen_kwargs = dict(requests[indices[0]].args[1])
            until, max_gen_toks, sampling = self._generation_settings(gen_kwargs)
            max_context = self.max_length - max_gen_toks
            if max_context < 1:
                raise ValueError(
                    f"max_gen_toks={max_gen_toks} leaves no room for a context in "
                    f"max_length={self.max_length}; generate fewer tokens"
                )
            encoded = {
                i: self.tok_encode(requests[i].args[0])[-max_context:] or [self.prefix_token_id]
                for i in indices
            }
            ordered = sorted(indices, key=lambda i: -len(encoded[i]))
            for start in range(0, len(ordered), self.batch_size):
                batch = ordered[start : start + self.batch_size]
                texts = self._generate_batch(
                    [encoded[i] for i in batch],
                    until=until,
                    max_new_tokens=max_gen_toks,
                    **sampling,
                )
                for i, text in zip(batch, texts, strict=True):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    progress.update(1)
        progress.close()
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _generation_settings(
        self, gen_kwargs: dict[str, Any]
    ) -> tuple[list[str], int, dict[str, Any]]:
        """(stop strings, max new tokens, sample_next's settings) from a request's gen_kwargs,
        read as HFLM reads them: `until` a string or a list; sampling only with do_sample
        (then temperature defaults to 1, as in transformers), otherwise greedy whatever the
        temperature. eos always stops, by its id."""
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = [stop for stop in kwargs.pop("until") if stop]
        max_gen_toks = int(kwargs.pop("max_gen_toks"))
        if max_gen_toks < 1:
            raise ValueError(f"gen_kwargs max_gen_toks={max_gen_toks} must be >= 1")
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 1.0)) if do_sample else 0.0
        top_p = float(kwargs.pop("top_p", None) or 1.0)
        top_k = int(kwargs.pop("top_k", None) or 0)
        check_sampling(temperature=temperature, top_p=top_p, top_k=top_k)
        return until, max_gen_toks, {"temperature": temperature, "top_p": top_p, "top_k": top_k}

    @torch.no_grad()
    def _generate_batch(
        self,
        prompts: list[list[int]],
        *,
        until: list[str],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
    ) -> list[str]:
        """Each prompt's continuation up to its first stop string, decoding stopped once every
        row has produced eos or a stop string."""
        rows: list[list[int]] = [[] for _ in prompts]
        stopped = [False] * len(prompts)
        cache = self.model.new_kv_cache(len(prompts), max(map(len, prompts)) + max_new_tokens)
        steps: Iterator[list[int | None]] = decode(
            self.model,
            prompts,
            kv_cache=cache,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            eos_id=self.eot_token_id,
            generator=self._generator,
        )
        for new in steps:
            for r, token in enumerate(new):
                if token is None or stopped[r]:
                    continue
                if token == self.eot_token_id:
                    stopped[r] = True
                    continue
                rows[r].append(token)
                text = self.tok_decode(rows[r])
                if any(stop and stop in text for stop in until):
                    stopped[r] = True
            if all(stopped):
                break
        texts = []
        for row in rows:
            text = self.tok_decode(row)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            texts.append(text)
        return texts
