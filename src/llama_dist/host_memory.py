"""Host memory that a CPU training step frees is kept for the next step.

A step allocates and frees the same buffers every time (activations, gradients, optimizer
temporaries). glibc returns blocks above its mmap threshold (128 KiB at first) and the top of
its heap to the kernel when they are freed, so the next step faults every page of them in
again and the kernel zeroes it: measured on this project's 2-core CPU host, a fresh 82 MB
tensor costs 20 ms to fill against 1 ms when its memory is reused. `keep_freed_host_memory`
raises the mmap threshold to glibc's maximum (32 MiB) and stops trimming, so blocks up to
32 MiB stay in the process. On the small preset that is about 10% more tokens/s in one
process, and 3% on `make pretrain`'s two processes (benchmarks/README.md). Unlike
transparent huge pages (`THP_MEM_ALLOC_ENABLE`, measured slower there), it can be set at any
time, and the resident size simply stays at its peak.

CPU runs ask for it in `train.common.open_run`; `LLAMA_DIST_HOST_MALLOC=system` in the
environment keeps glibc's defaults. Elsewhere than glibc (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import os

ENV = "LLAMA_DIST_HOST_MALLOC"
# mallopt(3) parameters and glibc's upper limit for the mmap threshold on 64-bit hosts.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD_MAX = 32 * 2**20
SETTINGS = (
    (M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX),
    (M_TRIM_THRESHOLD, 2**31 - 1),  # mallopt takes a C int: about 2 GiB, i.e. never
    (M_TOP_PAD, 64 * 2**20),  # grow the heap 64 MiB at a time
)


def keep_freed_host_memory() -> bool:
    """Ask glibc to keep freed host memory (see the module's text); returns whether it did.
    `LLAMA_DIST_HOST_MALLOC=system` (or any value but `keep`) leaves malloc alone."""
    choice = os.environ.get(ENV, "keep")
    if choice != "keep":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in SETTINGS)
