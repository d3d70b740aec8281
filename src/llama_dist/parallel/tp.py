"""Tensor and sequence parallelism with DTensor (Megatron-LM's layout, Korthikanti et al.).

Column-wise wq/wk/wv/w1/w3 and row-wise wo/w2 keep each rank's heads and FFN slice local, so
a block costs one all-reduce (or, with sequence parallelism, one all-gather + one
reduce-scatter) before attention and one before the MLP. The embedding is row-wise (vocab
sharded), the output projection column-wise (vocab sharded), which loss parallelism consumes
without gathering the logits.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
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


def apply_tp(
    model: nn.Module,
    tp_mesh: DeviceMesh,
    *,
    sequence_parallel: bool,
    loss_parallel: bool,
) -> None:
    """Shard a `Llama` over `tp_mesh` in place.

    With `loss_parallel` the model returns logits as a DTensor sharded on the vocabulary;
    compute the loss under `torch.distributed.tensor.parallel.loss_parallel()`.
    """
    seq = Shard(1) if sequence_parallel else Replicate()
    parallelize_module(
        model,
        tp_mesh,
        {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=seq),
            "output": ColwiseParallel(
                input_layouts=seq,
                output_layouts=Shard(-1) if loss_parallel else Replicate(),
                use_local_output=not loss_parallel,
            ),
        },
    )
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
