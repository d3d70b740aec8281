"""Training metrics shared by every loop: MFU, throughput, logging."""

from llama_dist.metrics.mfu import PEAK_FLOPS, mfu, peak_flops

__all__ = ["PEAK_FLOPS", "mfu", "peak_flops"]
