"""Huge pages for host tensors: asked for by the entry points, in time to take effect."""

from __future__ import annotations

import os
import subprocess
import sys

from llama_dist import host_memory

# What launch/pretrain.py imports before run_entry_point asks for huge pages, then four
# tensors of 4 MiB. torch page-aligns the allocations it advises the kernel to back with huge
# pages; glibc's own large blocks start 64 bytes into a page (its header, then the alignment
# torch asks for), so the page offset tells the two paths apart.
PROBE = """
import torch
from llama_dist.config import register_configs
from llama_dist.train import common, pretrain
from llama_dist.host_memory import use_huge_pages
register_configs()
asked = use_huge_pages()
tensors = [torch.empty(1 << 20) for _ in range(4)]
print(asked, [t.data_ptr() % 4096 == 0 for t in tensors])
"""


def probe(env_value: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != host_memory.ENV}
    if env_value is not None:
        env[host_memory.ENV] = env_value
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_entry_points_get_huge_pages_unless_the_environment_says_no():
    assert probe(None) == "True [True, True, True, True]"
    asked, aligned = probe("0").split(" ", 1)
    assert asked == "False"
    assert aligned == "[False, False, False, False]"


def test_a_users_setting_is_kept(monkeypatch):
    monkeypatch.setenv(host_memory.ENV, "0")
    assert host_memory.use_huge_pages() is False
    assert os.environ[host_memory.ENV] == "0"
    monkeypatch.delenv(host_memory.ENV)
    assert host_memory.use_huge_pages() is True
    assert os.environ[host_memory.ENV] == "1"
