"""The global gradient norm over sharded, replicated, partial and plain gradients, on 2 gloo
ranks against the norm of the full tensors, and clipping by it."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from llama_dist.parallel.optim import clip_grad_norm_, clip_scale, grad_norm
from llama_dist.testing.distributed import run_distributed


def full_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "rows": torch.randn(6, 5, generator=g),
        "cols": torch.randn(4, 6, generator=g),
        "uneven": torch.randn(3, 2, generator=g),  # 2 rows on rank 0, 1 on rank 1
        "replicated": torch.randn(7, generator=g),
        "partial": torch.randn(5, 3, generator=g),
        "plain": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "bf16": torch.randn(8, 2, generator=g).bfloat16(),
    }


def with_grads(grads: dict[str, torch.Tensor]) -> list[nn.Parameter]:
    params = []
    for grad in grads.values():
        p = nn.Parameter(torch.zeros_like(grad))
        p.grad = grad
        params.append(p)
    return params


def sharded_grads(mesh) -> dict[str, torch.Tensor]:
    full = full_tensors()
    rank = dist.get_rank()
    # Partial: each rank holds a part; the parts sum to the full tensor.
    part = full["partial"] * (0.25 if rank == 0 else 0.75)
    return {
        "rows": distribute_tensor(full["rows"], mesh, [Shard(0)]),
        "cols": distribute_tensor(full["cols"], mesh, [Shard(1)]),
        "uneven": distribute_tensor(full["uneven"], mesh, [Shard(0)]),
        "replicated": distribute_tensor(full["replicated"], mesh, [Replicate()]),
        "partial": DTensor.from_local(part, mesh, [Partial()], run_check=False),
        "plain": full["plain"],
        "bf16": distribute_tensor(full["bf16"], mesh, [Shard(0)]),
    }


def worker() -> dict:
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    out = {"norm": grad_norm(with_grads(sharded_grads(mesh)))}
    params = with_grads(sharded_grads(mesh))
    out["clip_returned"] = clip_grad_norm_(params, 1.0)
    out["clipped"] = [
        p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for p in params
    ]
    out["no_grads"] = grad_norm([nn.Parameter(torch.ones(2))])
    return out


def test_grad_norm_of_sharded_gradients_is_that_of_the_full_tensors():
    full = full_tensors()
    expected = torch.cat([t.double().reshape(-1) for t in full.values()]).norm()
    out = run_distributed(worker, 2)
    assert out["norm"].dtype == torch.float32 and out["norm"].shape == ()
    torch.testing.assert_close(out["norm"].double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(out["clip_returned"].double(), expected, rtol=1e-6, atol=0)
    assert out["no_grads"] == 0
    # Clipping scaled every gradient by max_norm / norm (the norm is well above 1 here).
    assert expected > 2
    for got, tensor in zip(out["clipped"], full.values(), strict=True):
        want = tensor.double() / (expected.item() + 1e-6)
        tol = 1e-2 if tensor.dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_clip_scale_is_the_inverse_of_torchs_clip_coefficient():
    norm = torch.tensor(4.0)
    assert clip_scale(norm, 1.0).item() == torch.tensor((4.0 + 1e-6) / 1.0).item()
    assert clip_scale(torch.tensor(0.5), 1.0).item() == 1.0  # below max_norm: untouched
    assert torch.isnan(clip_scale(torch.tensor(float("nan")), 1.0))
