"""Huge pages for host tensors, asked for by the entry points.

torch's CPU allocator backs every allocation of 2 MiB or more with transparent huge pages when
THP_MEM_ALLOC_ENABLE=1, a variable it reads once, at the process's first CPU allocation. A
training step allocates and frees buffers of tens of MB (the logits and their gradient, the
embedding's gradient); glibc hands blocks that large back to the kernel when they are freed,
so every step touches them afresh, one page fault per 4 KiB page. Huge pages take 512 times
fewer. On the CPU host of `benchmarks/results/cpu_small.md` (small preset, 4 layers, 512
tokens) that is about 10% more tokens/s, for Hugging Face's model as much as for ours. GPU
runs gain on host-side tensors only.

The kernel must allow it (`/sys/kernel/mm/transparent_hugepage/enabled`: `always` or
`madvise`); with `never` the setting does nothing. `THP_MEM_ALLOC_ENABLE=0` in the environment
keeps 4 KiB pages.
"""

from __future__ import annotations

import os

ENV = "THP_MEM_ALLOC_ENABLE"


def use_huge_pages() -> bool:
    """Ask torch's CPU allocator for huge pages unless the environment says otherwise; returns
    whether they are asked for. Takes effect only before the process's first CPU tensor, so an
    entry point calls it before any work (processes it starts inherit the setting)."""
    os.environ.setdefault(ENV, "1")
    return os.environ[ENV] == "1"
