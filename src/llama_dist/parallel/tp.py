"""Tensor and sequence parallelism with DTensor (Megatron-LM's layout, Korthikanti et al.).

Column-wise wq/wk/wv/w1/w3 and row-wise wo/w2 keep each rank's heads and FFN slice local, so
a block costs one all-reduce (or, with sequence parallelism, one all-gather + one
reduce-scatter) before attention and one before the MLP. The embedding is row-wise (vocab
sharded), the output projection column-wise (vocab sharded), which loss parallelism consumes
without gathering the logits. A head that is not the vocabulary (a reward model's scalar score,
`LlamaConfig.output_dim`) is replicated instead: one row cannot be split, and it is tiny.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


def _replicate_norm(norm: nn.Module, mesh: DeviceMesh) -> None:
    """Without sequence parallelism norms see the full, replicated activations. Their weights
    still become Replicate DTensors so every parameter is a DTensor: gradient clipping and
    foreach optimizers then see one kind of tensor."""

    def to_dtensor(_module, inputs, device_mesh):
        return tuple(DTensor.from_local(x, device_mesh, [Replicate()]) for x in inputs)

    def to_local(_module, output, _device_mesh):
        return output.to_local()

    distribute_module(norm, mesh, input_fn=to_dtensor, output_fn=to_local)


def _replicate_head(output: nn.Module, mesh: DeviceMesh, input_layout: Placement) -> None:
    """A head too narrow to shard (e.g. one reward score) as a replicated linear layer.

    It receives the whole sequence (gathered from the sequence-parallel shards first) and
    returns a plain tensor, equal on every rank. Its weight gradient needs no reduction: every
    rank of a tp group computes the same loss on the same batch.
    """

    def gather_sequence(_module, inputs, device_mesh):
        (x,) = inputs
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, device_mesh, [input_layout])
        return (x.redistribute(device_mesh, [Replicate()]),)

    def to_local(_module, output, _device_mesh):
        return output.to_local()

    distribute_module(output, mesh, input_fn=gather_sequence, output_fn=to_local)


def apply_tp(
    model: nn.Module,
    tp_mesh: DeviceMesh,
    *,
    sequence_parallel: bool,
    loss_parallel: bool,
) -> None:
    """Shard a `Llama` over `tp_mesh` in place.

    With `loss_parallel` the model returns logits as a DTensor sharded on the vocabulary;
    compute the loss under `torch.distributed.tensor.parallel.loss_parallel()`. A model whose
    head is not the vocabulary (`cfg.output_dim` set) returns its full outputs as a plain
    tensor on every rank, whatever `loss_parallel` says.
    """
    seq = Shard(1) if sequence_parallel else Replicate()
    plan = {"tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq)}
    lm_head = model.cfg.is_lm_head
    if lm_head:
        plan["output"] = ColwiseParallel(
            input_layouts=seq,
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        )
    parallelize_module(model, tp_mesh, plan)
    # The head's logits are vocab-sharded (or gathered): the loss is computed from them.
    model.fused_loss = False
    if not lm_head:
        _replicate_head(model.output, tp_mesh, seq)
    if sequence_parallel:
        parallelize_module(model.norm, tp_mesh, SequenceParallel())
    else:
        _replicate_norm(model.norm, tp_mesh)

    for block in model.layers.values():
        plan = {
            # Attention and MLP need the whole sequence: gather it (SP) before the projections.
            "attention": PrepareModuleInput(
                input_layouts=(seq, None, None, None),
                desired_input_layouts=(Replicate(), None, None, None),
            ),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=seq),
            "feed_forward": PrepareModuleInput(
                input_layouts=(seq,), desired_input_layouts=(Replicate(),)
            ),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=seq),
            "feed_forward.w3": ColwiseParallel(),
        }
        if sequence_parallel:
            plan["attention_norm"] = SequenceParallel()
            plan["ffn_norm"] = SequenceParallel()
        parallelize_module(block, tp_mesh, plan)
        if not sequence_parallel:
            _replicate_norm(block.attention_norm, tp_mesh)
            _replicate_norm(block.ffn_norm, tp_mesh)
