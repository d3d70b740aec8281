"""The training loops, side by side, and the parts they share.

    pretrain.py   next-token pretraining on indexed corpora
    step.py       the shared step: token-weighted accumulation, evaluation, throughput,
                  signals, loop counters

Each loop is one readable function that calls shared parts; none subclasses another.
"""
