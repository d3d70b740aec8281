"""Generation with a sharded policy, as RLHF needs between its training steps.

Every rank calls together; each data-parallel rank brings its own prompts (any number, of any
lengths), the ranks of one tensor-parallel group the same ones. Two ways:

(a) `generate_distributed(model, ...)` on the training model as it is. Its forwards are
    collective: under FSDP every decode step all-gathers every layer, so the ranks step
    together until all of them are done (an all-reduce of their done flags), those finished
    early feeding tokens that are thrown away. This is the slow path the Llama 2 paper
    measured at about 20x the time of generation with consolidated weights.
(b) `with consolidated_for_generation(model, mesh) as gen_model:` then
    `generate_distributed(gen_model, ...)`. The copy holds the weights gathered over the
    data-parallel axes only: unsharded when tp = 1, so every rank decodes on its own, with no
    collective at all; still sharded over tp otherwise (no rank ever holds more than its tp
    shard of the full model), with TP's two all-reduces per block and none over data
    parallelism. It is built without sequence parallelism (a decode step has one token, which
    cannot be split over tp ranks) and without loss parallelism, in the dtype FSDP computes
    in (bf16 on GPUs by default), and freed when the context closes.

Under tensor parallelism the KV cache holds the local kv heads (n_kv_heads / tp), since each
rank's wk and wv produce only those.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate

from llama_dist.generate import check_generate_args, decode
from llama_dist.models.llama import KVCache, Llama
from llama_dist.parallel.tp import apply_tp

# A placeholder prompt for a rank without prompts of its own: it must still join every
# collective forward. Its tokens are thrown away.
_IDLE_PROMPT = [0]


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype `model` computes in: FSDP's mixed-precision param_dtype when it has one,
    else that of its parameters."""
    if isinstance(model, FSDPModule):
        # FSDP2 has no public getter for its policy (torch 2.13).
        param_dtype = model._get_fsdp_state()._mp_policy.param_dtype
        if param_dtype is not None:
            return param_dtype
    return next(model.parameters()).dtype


def local_kv_heads(model: Llama) -> int:
    """The kv heads each rank's attention computes: n_kv_heads over the tensor-parallel
    shards of wk (FSDP's shards are gathered before the forward, so they do not count)."""
    wk = next(iter(model.layers.values())).attention.wk.weight
    heads = model.cfg.num_kv_heads
    if isinstance(wk, DTensor):
        mesh = wk.device_mesh
        for i, (name, placement) in enumerate(
            zip(mesh.mesh_dim_names or (), wk.placements, strict=True)
        ):
            if name == "tp" and placement.is_shard(0):
                heads //= mesh.size(i)
    return heads


def _sharded_axes(model: nn.Module) -> set[str]:
    """Names of the mesh axes (of size > 1) that some parameter is spread over."""
    axes: set[str] = set()
    for param in model.parameters():
        if isinstance(param, DTensor):
            mesh = param.device_mesh
            names = mesh.mesh_dim_names or tuple(f"dim{i}" for i in range(mesh.ndim))
            axes |= {name for i, name in enumerate(names) if mesh.size(i) > 1}
    return axes


def _gather_checks(group: dist.ProcessGroup, value: object) -> list[object]:
    gathered: list[object] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def lockstep_group(model: nn.Module, mesh: DeviceMesh | None) -> dist.ProcessGroup | None:
    """The ranks whose forwards of `model` are collective, so that they must run the same
    number of them: every rank when a parameter is sharded over a data-parallel axis, else
    the tensor-parallel group when tp > 1, else none (a rank of its own)."""
    if mesh is None:
        return None
    if _sharded_axes(model) - {"tp"}:
        return dist.group.WORLD
    if mesh["tp"].size() > 1:
        return mesh["tp"].get_group()
    return None


@torch.no_grad()
def generate_distributed(
    model: Llama,
    prompts: Sequence[Sequence[int]],
    *,
    mesh: DeviceMesh | None,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    stop: Callable[[list[int]], bool] | None = None,
) -> list[list[int]]:
    """`llama_dist.generate.generate` of this rank's `prompts` (possibly none) on a sharded
    model or the `consolidated_for_generation` copy of one; every rank of `mesh` calls it
    (`mesh=None`: a plain model in a single process).

    The ranks whose forwards are collective (`lockstep_group`) step together until every one
    of them is done, so they must agree on max_new_tokens; the ranks of a tp group must also
    pass the same prompts and settings. When sampling, the tokens of each tp group's first
    rank are used, so its `generator` decides. A model with sequence parallelism cannot
    decode (one token per step); generate through `consolidated_for_generation` instead.

    A row ends at eos (kept as its last token) or once `stop(tokens so far)` holds, e.g. a
    stop string in its text; nothing is added to it after that.
    """
    lockstep = lockstep_group(model, mesh)
    tp = 1 if mesh is None else mesh["tp"].size()

    idle = len(prompts) == 0
    rows = [_IDLE_PROMPT] if idle else prompts
    error = None
    try:
        check_generate_args(
            model.cfg,
            rows,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
        )
    except ValueError as e:
        error = str(e)
    if lockstep is not None:
        # Every rank of the group raises together: one rank leaving alone would leave the
        # others waiting in a collective forever.
        gathered = _gather_checks(lockstep, (error, max_new_tokens))
        errors = [f"rank {r}: {e}" for r, (e, _) in enumerate(gathered) if e is not None]
        if errors:
            raise ValueError("; ".join(errors))
        lengths = sorted({n for _, n in gathered})
        if len(lengths) > 1:
            raise ValueError(
                f"ranks asked for max_new_tokens {lengths}; ranks that step together must pass "
                "the same max_new_tokens"
            )
    elif error is not None:
        raise ValueError(error)
    if tp > 1:
        settings = (list(map(list, prompts)), temperature, top_p, top_k, eos_id)
        peers = _gather_checks(mesh["tp"].get_group(), settings)
        if any(peer != settings for peer in peers):
            raise ValueError(
                "the ranks of a tensor-parallel group passed different prompts or sampling "
                "settings; give every rank of a tp group the prompts of its data-parallel rank"
            )

    if max_new_tokens == 0:
        return [[] for _ in prompts]
    device = model.tok_embeddings.weight.device
    longest = max(len(p) for p in rows)
    cache = KVCache(
        [layer.layer_id for layer in model.layers.values()],
        len(rows),
        longest + max_new_tokens,
        local_kv_heads(model),
        model.cfg.head_dim,
        dtype=compute_dtype(model),
        device=device,
    )
    results: list[list[int]] = [[] for _ in rows]
    finished = [idle] * len(rows)

    def all_done(_eos_everywhere_here: bool) -> bool:
        # `finished` covers eos and `stop`, and the idle row; decode's flag knows only eos.
        if lockstep is None:
            return all(finished)
        flag = torch.tensor([int(not all(finished))], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=lockstep)
        return not flag.item()

    sync_tokens = None
    if tp > 1 and temperature > 0:
        tp_group = mesh["tp"].get_group()

        # Greedy tokens agree anyway (every tp rank holds the same gathered logits); samples
        # agree only if the generators do, and tp ranks fed different tokens compute garbage.
        def sync_tokens(tokens: torch.Tensor) -> torch.Tensor:
            dist.broadcast(tokens, group=tp_group, group_src=0)
            return tokens

    self_check = _embedding_check(model, mesh) if tp > 1 else contextlib.nullcontext()
    with self_check:
        steps = decode(
            model,
            rows,
            kv_cache=cache,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            eos_id=eos_id,
            generator=generator,
            sync_tokens=sync_tokens,
            all_done=all_done,
        )
        for new in steps:
            for r, token in enumerate(new):
                if token is None or finished[r]:
                    finished[r] = True
                    continue
                results[r].append(token)
                if token == eos_id or (stop is not None and stop(results[r])):
                    finished[r] = True
    return [] if idle else results


@contextlib.contextmanager
def _embedding_check(model: Llama, mesh: DeviceMesh) -> Iterator[None]:
    """Refuse a model with sequence parallelism, told apart by its embedding returning a
    slice of the sequence. All tp ranks agree first (a rank can hold the whole sequence of
    one token), so they raise together."""
    tp_group = mesh["tp"].get_group()

    def check(_module, inputs, output):
        # The prefill decides; later steps need no check.
        handle.remove()
        (tokens,) = inputs
        split = torch.tensor([int(output.shape[1] != tokens.shape[1])], device=tokens.device)
        dist.all_reduce(split, op=dist.ReduceOp.MAX, group=tp_group)
        if split.item():
            raise ValueError(
                "the model was parallelized with sequence parallelism, which cannot split a "
                "decode step's single token over tp ranks; generate through "
                "consolidated_for_generation(model, mesh), or build the model with "
                "sequence_parallel=False"
            )

    handle = model.tok_embeddings.register_forward_hook(check)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
@torch.no_grad()
def consolidated_for_generation(
    model: Llama, mesh: DeviceMesh, *, dtype: torch.dtype | None = None
) -> Iterator[Llama]:
    """A copy of the sharded `model` for a generation phase, gathered over the data-parallel
    axes of `mesh` only, in eval mode; its memory is freed when the context closes.

    Built on the meta device, with tensor parallelism over mesh["tp"] when tp > 1 (no
    sequence or loss parallelism), then materialised and filled one parameter at a time, so
    besides its own shard of the policy a rank holds only the copy (its tp shard of the full
    model) and one gathered parameter. `dtype`: default the dtype FSDP computes in (its
    mixed-precision param_dtype, e.g. bf16) or else the parameters'. The copy follows
    `model`'s weights at entry; later updates to `model` do not reach it.
    """
    if model.output.weight.shape[0] != model.cfg.vocab_size:
        raise ValueError(
            f"the model's output projection has {model.output.weight.shape[0]} rows, not the "
            f"vocab_size={model.cfg.vocab_size} of a language-model head (e.g. a reward "
            "model); only a policy with next-token logits can generate"
        )
    dtype = compute_dtype(model) if dtype is None else dtype
    sources = dict(model.named_parameters())
    device = next(iter(sources.values())).device
    tp = mesh["tp"].size()
    with torch.device("meta"):
        # Cast on meta, before TP turns the parameters into DTensors; nothing is allocated.
        gen_model = Llama(model.cfg).to(dtype)
    if tp > 1:
        apply_tp(gen_model, mesh["tp"], sequence_parallel=False, loss_parallel=False)
    gen_model.to_empty(device=device)
    for name, param in gen_model.named_parameters():
        src = sources[name]
        if isinstance(src, DTensor):
            names = src.device_mesh.mesh_dim_names or ()
            # Gathered over every axis but tp, whose shard stays: it is the copy's shard too.
            placements = [
                placement if axis == "tp" else Replicate()
                for axis, placement in zip(names, src.placements, strict=True)
            ]
            local = src.redistribute(src.device_mesh, placements).to_local()
        else:
            local = src.detach()
        target = param.to_local() if isinstance(param, DTensor) else param
        assert target.shape == local.shape, (name, target.shape, local.shape)
        target.copy_(local)
        del local
    # After the cast: the rotary tables stay in fp32.
    gen_model.reset_rope()
    gen_model.set_attention_backend(model.attention_backend)
    gen_model.eval()
    try:
        yield gen_model
    finally:
        _release(gen_model)


def _release(model: Llama) -> None:
    """Free the copy's tensors even while callers still reference the module (a `with ... as`
    name outlives its block), and make any later use fail clearly."""
    for module in model.modules():
        # New meta tensors in place of the old ones, rather than to_empty(device="meta"),
        # which swaps tensor contents and refuses tensors that something holds a weakref to.
        for name, param in list(module.named_parameters(recurse=False)):
            meta = torch.empty(param.shape, dtype=param.dtype, device="meta")
            setattr(module, name, nn.Parameter(meta, requires_grad=False))
        for name, buffer in list(module.named_buffers(recurse=False)):
            setattr(module, name, torch.empty(buffer.shape, dtype=buffer.dtype, device="meta"))

    def refuse(*_args, **_kwargs):
        raise RuntimeError(
            "this model was a consolidated_for_generation copy and was freed when its context "
            "closed; consolidate again for the next generation phase"
        )

    model.register_forward_pre_hook(refuse)
