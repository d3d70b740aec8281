"""Exit codes of the training entry points (launch/pretrain.py, sft.py, reward.py), which
`python -m llama_dist.torchrun` passes on.

0  the run reached its last step
1  a crash (a traceback)
2  a user's mistake: one line on stderr, before any work
3  stopped on request before its last step (SIGTERM, SIGINT, SIGUSR1, train.stop_after),
   with a checkpoint of the step it stopped at: the same command resumes it
"""

EXIT_USER_ERROR = 2
EXIT_STOPPED = 3

__all__ = ["EXIT_STOPPED", "EXIT_USER_ERROR"]
