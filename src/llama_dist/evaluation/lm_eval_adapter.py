"""lm-evaluation-harness model over a llama_dist checkpoint, in one process or sharded.

`LlamaDistLM` is registered with the harness as "llama_dist": after this module is imported,
`--model llama_dist --model_args checkpoint=DIR,tokenizer=PATH` evaluates a pretraining, SFT or
RLHF checkpoint folder (or a run folder of step-N checkpoints, or an HF Llama folder) with the
llama_dist SentencePiece tokenizer. `python -m llama_dist.evaluation` is the harness's command
line with the import done first.

The three request types follow the harness's own HF model (`lm_eval.models.huggingface.HFLM`)
so that scores are comparable with it: the same context truncation, the same rolling windows,
the same stop-sequence handling. What differs is the engine: batches by length through the
llama_dist model, and generation through `llama_dist.generation_dist` with its KV cache.

Under torchrun (more than one process) the model is sharded as in training: FSDP over the
data-parallel ranks and tensor parallelism over `tp` (model_args `tp`, `dp_replicate`), read
shard by shard from the checkpoint, so no process holds the whole model. Every rank runs the
harness on all requests (its view is one process: rank 0 of 1); this adapter deals each batch
of requests over the data-parallel ranks, longest first, runs its share (the ranks of a tp
group the same share, as TP needs), and gathers the results, so every rank returns all of
them and computes the same metrics. Ranks whose forwards are collective (FSDP) run equally
many of them, one with nothing left feeding a one-token placeholder. `LlamaDistLM.from_model`
wraps a model already built and sharded, e.g. the pretraining loop's for its periodic
evaluation.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from llama_dist.checkpoint.init import load_initial_weights, source_config
from llama_dist.data.chat import E_INST, render_dialog
from llama_dist.generate import check_sampling, load_for_generation
from llama_dist.generation_dist import (
    consolidated_for_generation,
    generate_distributed,
    lockstep_group,
)
from llama_dist.models.config import LlamaConfig
from llama_dist.models.llama import Llama
from llama_dist.parallel import ParallelConfig, build_llama, build_mesh, dp_rank_and_size
from llama_dist.parallel.mesh import init_distributed
from llama_dist.tokenizer import Tokenizer

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The same, as ParallelConfig.param_dtype names them (FSDP computes in it).
_PARAM_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# Any id: right padding of a loglikelihood batch sits after every real token, so the causal
# mask keeps it out of their attention, and its logits are never read.
_PAD_ID = 0

# The chat format's text (apply_chat_template) carries what text cannot: where a segment
# encoded with bos begins, and which segments end with eos. Private-use characters, which no
# tokenizer piece holds and str.strip does not remove.
_CHAT, _SEGMENT, _EOS = "\ue000", "\ue001", "\ue002"
CHAT_TEMPLATE_NAME = "llama-2-chat (llama_dist.data.chat)"
_ANSWER_WITHOUT_SPACE = re.compile(re.escape(E_INST) + r"(?=\S)")

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


def check_language_model(cfg: LlamaConfig, where: str) -> None:
    if cfg.output_dim is not None:
        raise ValueError(
            f"{where} is a reward model (output_dim={cfg.output_dim}); evaluate a language "
            "model (pretraining, SFT or PPO policy checkpoint)"
        )


def load_sharded(
    checkpoint: str | os.PathLike,
    cfg: LlamaConfig,
    *,
    tp: int,
    dp_replicate: int,
    dtype: str,
    device: torch.device,
) -> tuple[Llama, DeviceMesh]:
    """The model at `checkpoint` (of config `cfg`), sharded over every rank (FSDP over the
    data-parallel ranks, TP over `tp`) and filled shard by shard; every rank calls this.
    Without sequence or loss parallelism: decoding feeds one token per step, which cannot be
    split over tp ranks, and the harness reads whole log-probability rows."""
    parallel = ParallelConfig(
        dp_replicate=dp_replicate,
        tp=tp,
        sequence_parallel=False,
        loss_parallel=False,
        param_dtype=_PARAM_DTYPES[dtype],
    ).validate(dist.get_world_size(), cfg)
    mesh = build_mesh(parallel, device=device.type)
    model = build_llama(cfg, parallel, mesh, device=device)
    load_initial_weights(model, checkpoint)
    model.requires_grad_(False)
    return model.eval(), mesh


def _distributed_world() -> bool:
    """Whether this process is one of several (under torchrun, or a group already joined)."""
    if dist.is_initialized():
        return dist.get_world_size() > 1
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@register_model("llama_dist")
class LlamaDistLM(TemplateLM):
    """A llama_dist Llama as an lm-eval model.

    model_args: `checkpoint` (required), `tokenizer` (default: tokenizer.model inside the
    checkpoint folder), `batch_size` (requests per forward on each data-parallel rank,
    default 8), `max_length` (context window, default the model's max_seq_len),
    `max_gen_toks` (default 256, as HFLM), `add_bos_token` (default True: llama_dist documents
    start with bos, and HFLM adds it too with a Llama tokenizer; it leads contexts of
    loglikelihood and generation requests), `device`, `dtype`, `seed` (sampling), and under
    torchrun `tp` (tensor-parallel degree, default 1) and `dp_replicate` (HSDP replicas,
    default 1); the remaining ranks shard the model with FSDP.

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
        tp: int | str = 1,
        dp_replicate: int | str = 1,
        **kwargs: Any,
    ) -> None:
        # The harness passes max_batch_size (for "auto" batch sizes) to every model.
        unknown = sorted(set(kwargs) - {"max_batch_size"})
        if unknown:
            raise ValueError(
                f"unknown model_args {unknown} for the llama_dist model; it takes checkpoint, "
                "tokenizer, batch_size, max_length, max_gen_toks, add_bos_token, device, dtype, "
                "seed, tp and dp_replicate"
            )
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not one of {sorted(_DTYPES)}")
        tokenizer_path = resolve_tokenizer(checkpoint, tokenizer)
        tok = Tokenizer(tokenizer_path)
        cfg = source_config(checkpoint)
        check_language_model(cfg, f"checkpoint {str(checkpoint)!r}")  # before any loading
        if _distributed_world():
            # The local rank picks the GPU: "cuda:0" (the harness's --device) means "cuda".
            dev = init_distributed(device=(device or "auto").split(":")[0])
            model, mesh = load_sharded(
                checkpoint, cfg, tp=int(tp), dp_replicate=int(dp_replicate), dtype=dtype, device=dev
            )
        else:
            if int(tp) != 1 or int(dp_replicate) != 1:
                raise ValueError(
                    f"tp={tp} and dp_replicate={dp_replicate} need several processes; run "
                    "under torchrun --nproc_per_node N, or leave them at 1"
                )
            dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            model, _ = load_for_generation(checkpoint, device=dev, dtype=_DTYPES[dtype])
            mesh = None
        self._setup(
            model,
            tok,
            mesh=mesh,
            sequence_parallel=False,
            batch_size=batch_size,
            max_length=max_length,
            max_gen_toks=max_gen_toks,
            add_bos_token=add_bos_token,
            seed=seed,
        )
        self.checkpoint = str(checkpoint)
        self.tokenizer_path = str(tokenizer_path)

    @classmethod
    def from_model(
        cls,
        model: Llama,
        tokenizer: Tokenizer,
        *,
        mesh: DeviceMesh | None = None,
        sequence_parallel: bool = False,
        batch_size: int = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        add_bos_token: bool = True,
        seed: int = 0,
    ) -> LlamaDistLM:
        """The harness model over `model` as it is (plain, or sharded on `mesh` as
        `build_llama` shards it; every rank of the mesh then runs the harness together).
        `sequence_parallel`: the model was built with it (tp > 1); its inputs are then padded
        to a multiple of tp and generation goes through a copy gathered over the
        data-parallel ranks (still sharded over tp), built per generation call."""
        check_language_model(model.cfg, "the model")
        lm = cls.__new__(cls)
        lm._setup(
            model,
            tokenizer,
            mesh=mesh,
            sequence_parallel=sequence_parallel,
            batch_size=batch_size,
            max_length=max_length,
            max_gen_toks=max_gen_toks,
            add_bos_token=add_bos_token,
            seed=seed,
        )
        lm.checkpoint = "(the model in memory)"
        lm.tokenizer_path = str(tokenizer.path)
        return lm

    def _setup(
        self,
        model: Llama,
        tokenizer: Tokenizer,
        *,
        mesh: DeviceMesh | None,
        sequence_parallel: bool,
        batch_size: int | str | None,
        max_length: int | str | None,
        max_gen_toks: int | str,
        add_bos_token: bool | str,
        seed: int | str,
    ) -> None:
        TemplateLM.__init__(self)
        # The harness passes its --batch_size to every model (None when not given; "auto"
        # or "auto:N" for models that size batches, which this one does not).
        if batch_size is None or (isinstance(batch_size, str) and batch_size.startswith("auto")):
            batch_size = 8
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.model, self.cfg, self._tok, self._mesh = model, model.cfg, tokenizer, mesh
        if self._tok.vocab_size > self.cfg.vocab_size:
            raise ValueError(
                f"tokenizer {str(tokenizer.path)!r} has {self._tok.vocab_size} pieces but the "
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
        self._device = model.tok_embeddings.weight.device
        if mesh is None:
            self._dp_rank, self._dp_size, self._tp = 0, 1, 1
        else:
            self._dp_rank, self._dp_size = dp_rank_and_size(mesh)
            self._tp = mesh["tp"].size()
        self._sequence_parallel = sequence_parallel and self._tp > 1
        if self._sequence_parallel:
            # Inputs are padded to a multiple of tp, which must still fit in max_seq_len.
            self._max_length = min(self._max_length, self.cfg.max_seq_len // self._tp * self._tp)
        # Seeded per data-parallel rank: the ranks sample different requests.
        self._generator = torch.Generator(device=self._device).manual_seed(
            self._seed + 1_000_003 * self._dp_rank
        )
        self._lockstep = lockstep_group(model, mesh)
        self._progress_rank = dist.get_rank() if dist.is_initialized() else 0

    # Splitting requests over the data-parallel ranks ------------------------------------------
    def _my_share(self, order: list[int]) -> list[int]:
        """This data-parallel rank's requests of `order` (longest first): every dp_size-th,
        so every rank gets long and short ones alike."""
        return order[self._dp_rank :: self._dp_size]

    def _num_batches(self, num_requests: int, batch_size: int) -> int:
        """How many batches this rank runs: its own, or the most of any rank whose forwards
        are collective with its own."""
        mine = -(-num_requests // batch_size)
        if self._lockstep is None:
            return mine
        most = torch.tensor([mine], device=self._device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=self._lockstep)
        return int(most.item())

    def _gather(self, results: dict[int, Any], total: int) -> list[Any]:
        """Every rank's results (index -> result) in request order, on every rank."""
        if self._dp_size > 1:
            shares: list[dict[int, Any] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(shares, results)
            # The ranks of a tp group computed the same share: any one of them will do.
            results = {i: r for share in shares for i, r in share.items()}  # type: ignore[union-attr]
        assert len(results) == total, (len(results), total)
        return [results[i] for i in range(total)]

    def _logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
        """(bsz, seqlen, vocab) fp32 log-probabilities of the next token at each position of
        `tokens` (bsz, seqlen). With sequence parallelism the batch is right-padded to a
        multiple of tp, which the causal mask keeps out of the real positions."""
        seqlen = tokens.shape[1]
        if self._sequence_parallel and seqlen % self._tp:
            pad = self._tp - seqlen % self._tp
            tokens = F.pad(tokens, (0, pad), value=_PAD_ID)
        logits = self.model(tokens.to(self._device))
        if isinstance(logits, DTensor):  # vocab-sharded (loss parallelism)
            logits = logits.full_tensor()
        return F.log_softmax(logits[:, :seqlen].float(), dim=-1)

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
        if string.startswith(_CHAT):  # apply_chat_template's text, perhaps continued
            ids = []
            for part in string[len(_CHAT) :].split(_SEGMENT):
                # An answer follows "[/INST]" after a space, as SFT trains it; the harness's
                # chat requests join the answer without one (target_delimiter "").
                part = _ANSWER_WITHOUT_SPACE.sub(E_INST + " ", part)
                ended = part.endswith(_EOS)
                ids += self._tok.encode(part.removesuffix(_EOS), bos=True, eos=ended)
            return ids
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self._tok.encode(string, bos=bos)

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        # Ids past the tokenizer's pieces (a model vocabulary padded to a round size) have
        # no text.
        return self._tok.decode([t for t in tokens if t < self._tok.vocab_size])

    # Chat models (--apply_chat_template) ----------------------------------------------------
    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The name the harness records for the chat format (there is one: Llama 2's)."""
        return CHAT_TEMPLATE_NAME if chat_template else None

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """`chat_history` in the Llama 2 chat format the SFT and RLHF stages train on
        (`llama_dist.data.chat`): `tok_encode` of the text gives `encode_dialog`'s ids, each
        segment with bos and each answered one with eos, and a continuation appended to the
        text continues the last segment (the answer to its prompt). With
        add_generation_prompt=False the last message is the assistant's start (a task's
        gen_prefix), continuing the last prompt without eos."""
        history = [{"role": m["role"], "content": m["content"]} for m in chat_history]
        prefill = None
        if not add_generation_prompt and history and history[-1]["role"] == "assistant":
            prefill = history.pop()["content"]
        segments = render_dialog(history)
        if segments[-1].eos:
            raise ValueError(
                "the chat history ends with an answer; the last message must be the user's "
                "(or, with add_generation_prompt=False, the assistant's start)"
            )
        parts = [segment.text + (_EOS if segment.eos else "") for segment in segments]
        if prefill is not None:
            parts[-1] += f" {prefill.strip()}"
        return _CHAT + _SEGMENT.join(parts)

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
        inputs: list[list[int]] = []
        for key, context, continuation in requests:
            if not continuation:
                raise ValueError(f"request {key!r} has an empty continuation")
            if not context:
                raise ValueError(
                    f"request {key!r} has an empty context; the harness gives it the prefix token"
                )
            inputs.append((context + continuation)[-(self.max_length + 1) :][:-1])
        order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
        mine = self._my_share(order)
        results: dict[int, tuple[float, bool]] = {}
        progress = tqdm(total=len(mine), disable=disable_tqdm or self._progress_rank != 0)
        for b in range(self._num_batches(len(mine), batch_size)):
            batch = mine[b * batch_size : (b + 1) * batch_size]
            if not batch:  # nothing left here; the collective forward still needs this rank
                self._logprobs(torch.full((1, 1), _PAD_ID, dtype=torch.long))
                continue
            longest = len(inputs[batch[0]])
            tokens = torch.full((len(batch), longest), _PAD_ID, dtype=torch.long)
            for row, i in enumerate(batch):
                tokens[row, : len(inputs[i])] = torch.tensor(inputs[i], dtype=torch.long)
            logprobs = self._logprobs(tokens)
            for row, i in enumerate(batch):
                # The continuation's tokens are the last len(continuation) targets of the row
                # (a continuation longer than the window is scored on what fits).
                x, continuation = inputs[i], requests[i][2]
                num = min(len(continuation), len(x))
                target = torch.tensor(continuation[-num:], device=logprobs.device)
                row_logprobs = logprobs[row, len(x) - num : len(x)]  # (num, vocab)
                greedy = bool((row_logprobs.argmax(dim=-1) == target).all())
                results[i] = (float(row_logprobs.gather(-1, target[:, None]).sum()), greedy)
                progress.update(1)
        progress.close()
        gathered = self._gather(results, len(requests))
        for (key, _, _), result in zip(requests, gathered, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return gathered

    def loglikelihood_rolling(
        self, requests: Sequence[Any], disable_tqdm: bool = False
    ) -> list[float]:
        """Log-likelihood of each whole string: max_length windows in which every token is
        scored once with as much context as fits (the harness's rolling windows, prefixed
        with bos), summed over the windows. The windows of all strings share batches."""
        windows: list[TokenRequest] = []
        owner: list[int] = []
        for n, request in enumerate(requests):
            (string,) = request.args
            for window in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string, add_special_tokens=False),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            ):
                context, continuation = lm_utils.make_disjoint_window(window)
                windows.append((None, context, continuation))
                owner.append(n)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for n, (score, _) in zip(owner, scores, strict=True):
            totals[n] += score
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # generate_until ----------------------------------------------------------------------------
    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """Continuations stopped at the first of the request's `until` strings (and eos), at
        most `max_gen_toks` tokens, from the context cut on the left to leave room for them.
        Greedy unless gen_kwargs ask for sampling (do_sample or temperature > 0; top_p, top_k).
        Requests with the same gen_kwargs share batches, longest context first."""
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        results: dict[int, str] = {}
        # This rank's share; the others' are of about the same size.
        progress = tqdm(disable=disable_tqdm or self._progress_rank != 0)
        with self._generation_model() as gen_model:
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
                mine = self._my_share(sorted(indices, key=lambda i: -len(encoded[i])))
                for b in range(self._num_batches(len(mine), self.batch_size)):
                    batch = mine[b * self.batch_size : (b + 1) * self.batch_size]
                    texts = self._generate_batch(
                        gen_model,
                        [encoded[i] for i in batch],
                        until=until,
                        max_new_tokens=max_gen_toks,
                        **sampling,
                    )
                    results.update(zip(batch, texts, strict=True))
                    progress.update(len(batch))
        progress.close()
        gathered = self._gather(results, len(requests))
        for request, text in zip(requests, gathered, strict=True):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return gathered

    def _generation_model(self) -> Any:
        """The model to decode with: the model itself, or with sequence parallelism (which
        cannot split a one-token step) a copy gathered over the data-parallel ranks only."""
        if self._sequence_parallel:
            return consolidated_for_generation(self.model, self._mesh)
        return contextlib.nullcontext(self.model)

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

    def _generate_batch(
        self,
        model: Llama,
        prompts: list[list[int]],
        *,
        until: list[str],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
    ) -> list[str]:
        """Each prompt's continuation up to its first stop string (none: this rank joins the
        collective steps of the others); a row stops at eos or once its text holds a stop
        string, decoding once every row has stopped."""

        def stopped(tokens: list[int]) -> bool:
            text = self.tok_decode(tokens)
            return any(stop in text for stop in until)

        rows = generate_distributed(
            model,
            prompts,
            mesh=self._mesh,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            eos_id=self.eot_token_id,
            generator=self._generator,
            stop=stopped if until else None,
        )
        texts = []
        for row in rows:
            if row and row[-1] == self.eot_token_id:
                row = row[:-1]
            text = self.tok_decode(row)
            for stop in until:
                text = text.split(stop)[0]
            texts.append(text)
        return texts
