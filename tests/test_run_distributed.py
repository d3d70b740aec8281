"""The test launcher itself: a crash in teardown, after every rank wrote its result, does not
fail a run; a crash before does, and so does an exception on any rank."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llama_dist.testing.distributed import run_distributed


def sum_of_ranks_then_abort_in_teardown() -> int:
    total = torch.tensor([dist.get_rank() + 1])
    dist.all_reduce(total)
    # As gloo's threads sometimes do at exit: the process dies after its work is done.
    dist.destroy_process_group = lambda *args, **kwargs: os.abort()
    return int(total)


def abort_on_rank_1() -> int:
    if dist.get_rank() == 1:
        os.abort()
    return 0


def raise_on_rank_1() -> int:
    if dist.get_rank() == 1:
        raise ValueError("bad input on rank 1")
    return 0


def test_a_crash_in_teardown_keeps_the_results():
    assert run_distributed(sum_of_ranks_then_abort_in_teardown, 2) == 3


def test_a_crash_before_the_result_fails_the_run():
    with pytest.raises(mp.ProcessExitedException, match="SIGABRT"):
        run_distributed(abort_on_rank_1, 2)


def test_an_exception_on_one_rank_fails_the_run_with_its_traceback():
    with pytest.raises(RuntimeError, match=r"(?s)rank 1:.*ValueError: bad input on rank 1"):
        run_distributed(raise_on_rank_1, 2)
