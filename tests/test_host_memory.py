"""Freed host memory stays in the process when asked, and goes back to the kernel otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llama_dist.host_memory import ENV

PROBE = r"""
import json, sys
import torch
from llama_dist.host_memory import keep_freed_host_memory

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024

kept = keep_freed_host_memory()
before = rss()
t = torch.ones(6 * 2**20)  # 24 MiB: over glibc's default mmap threshold, under 32 MiB
held = rss()
del t
print(json.dumps({"kept": kept, "grew": held - before, "returned": held - rss()}))
"""


def _probe(choice: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if choice is not None:
        env[ENV] = choice
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt, Linux only")
def test_freed_tensor_memory_is_kept_unless_the_environment_says_system():
    mib = 2**20
    kept = _probe(None)
    assert kept["kept"] is True
    assert kept["grew"] > 20 * mib
    assert kept["returned"] < 2 * mib  # the 24 MiB stay resident, for the next step

    system = _probe("system")
    assert system["kept"] is False
    assert system["grew"] > 20 * mib
    assert system["returned"] > 20 * mib  # glibc's default: mmapped, unmapped on free
