"""`launch/pretrain.py` with a crash injected from outside the training loop.

    torchrun ... tests/train/faulty_pretrain.py <the overrides of launch/pretrain.py>

On the first attempt (TORCHELASTIC_RESTART_COUNT 0), once step KILL_STEP has ended and every
save in flight is complete, rank KILL_RANK kills itself with SIGKILL, as a crashed node would.
The hook wraps `train.common.end_of_step` before the loop module imports it, so the production
loop carries no fault-injection code.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path

import torch.distributed as dist

import llama_dist.train.common as common

KILL_STEP_ENV, KILL_RANK_ENV = "LLAMA_DIST_TEST_KILL_STEP", "LLAMA_DIST_TEST_KILL_RANK"
PRETRAIN = Path(__file__).resolve().parents[2] / "launch" / "pretrain.py"


def install(kill_step: int, kill_rank: int) -> None:
    original = common.end_of_step

    def end_of_step(training: common.Training, **kwargs):
        result = original(training, **kwargs)
        if training.state.step == kill_step:
            training.checkpoints.wait()  # collective: every rank, before one of them dies
            if dist.get_rank() == kill_rank:
                os.kill(os.getpid(), signal.SIGKILL)
        return result

    common.end_of_step = end_of_step


if __name__ == "__main__":
    if "llama_dist.train.pretrain" in sys.modules:
        raise RuntimeError("the loop was imported before the fault hook could wrap its step")
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        install(int(os.environ[KILL_STEP_ENV]), int(os.environ.get(KILL_RANK_ENV, "0")))
    sys.argv[0] = str(PRETRAIN)
    runpy.run_path(str(PRETRAIN), run_name="__main__")
