"""Pretraining data configuration: which token datasets are read and how they are packed.

Kept free of megatron-core and numpy imports so a config can be built and validated cheaply;
`llama_dist.data.indexed.PretrainData` opens the datasets it names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class DataConfig:
    """Token datasets (Megatron `PREFIX.bin` + `PREFIX.idx`) blended into fixed-length samples.

    Each source is a stream of documents, each ending with an EOS; every epoch shuffles the
    training documents and cuts the shuffled stream into samples of seq_len + 1 tokens
    (Megatron's GPTDataset), so documents are packed across sample boundaries and no token is
    padding. `validate()` checks what can be checked without opening the files;
    `PretrainData` checks the files themselves.
    """

    paths: list[str] = field(default_factory=list)  # dataset prefixes, without .bin/.idx
    # Blend weights, one per path, normalised to sum to 1. None weights each source by its
    # number of training samples, i.e. every source is read once per epoch of the whole
    # mixture, as if the datasets had been concatenated.
    weights: list[float] | None = None
    seq_len: int = 2048  # tokens per training sequence (each sample holds seq_len + 1)
    # Share of each source's tokens held out for validation: its last whole documents (at
    # least one sample's worth), so validation text is never trained on.
    valid_fraction: float = 0.01
    # Attend only within a document, and restart rotary positions at each document start.
    document_mask: bool = False
    seed: int = 1234  # seeds the per-epoch shuffles
    eos_id: int | None = None  # document separator; None: from PREFIX.meta.json, else 2 (Llama)
    # Where the per-epoch sample indices (and the token range of data without a sidecar) are
    # cached: built once by rank 0, memory-mapped by every rank, so it must be a folder every
    # rank sees. None: RUN_DIR/data_cache. Entries are keyed by the data files, seed and
    # seq_len, so one folder beside the data can serve many runs.
    cache_dir: str | None = None
    # How long the other ranks wait for rank 0 to build the indices at a job's first start
    # (one 2T-token dataset: ~20 minutes, see benchmarks/results/data_startup_cpu.md), apart
    # from train.collective_timeout_s.
    build_timeout_s: float = 3600.0

    def validate(self) -> DataConfig:
        if not self.paths:
            raise ValueError(
                "data.paths is empty; list the dataset prefixes written by "
                "launch/prepare_data.py (PREFIX for PREFIX.bin and PREFIX.idx)"
            )
        if self.weights is not None:
            if len(self.weights) != len(self.paths):
                raise ValueError(
                    f"data.weights has {len(self.weights)} entries for {len(self.paths)} "
                    "data.paths; give one weight per path, or none to weight by size"
                )
            if any(not w >= 0 for w in self.weights):
                raise ValueError(f"data.weights={list(self.weights)} must all be >= 0")
            if not sum(self.weights) > 0:
                raise ValueError(
                    f"data.weights={list(self.weights)} are all zero; give at least one "
                    "source a positive weight"
                )
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            # Megatron's sample index takes windows of at least two inputs.
            raise ValueError(f"data.seq_len={self.seq_len!r} must be an integer >= 2")
        if not 0.0 <= self.valid_fraction < 0.5:
            raise ValueError(
                f"data.valid_fraction={self.valid_fraction} must be in [0, 0.5); "
                "use 0 for no validation split, e.g. 0.01 for 1%"
            )
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"data.seed={self.seed!r} must be an integer >= 0")
        if self.eos_id is not None and self.eos_id < 0:
            raise ValueError(
                f"data.eos_id={self.eos_id} must be >= 0, or None to read it from the data"
            )
        if not self.build_timeout_s > 0:
            raise ValueError(
                f"data.build_timeout_s={self.build_timeout_s} must be > 0 (seconds the ranks "
                "wait for rank 0 to build the sample indices)"
            )
        if self.cache_dir is not None and not str(self.cache_dir).strip():
            raise ValueError(
                "data.cache_dir is empty; give a folder every rank sees, or leave it unset "
                "for RUN_DIR/data_cache"
            )
        return self

    def cache_folder(self, run_dir: str | Path) -> Path:
        """The resolved cache folder of a run in `run_dir`."""
        return Path(self.cache_dir) if self.cache_dir is not None else Path(run_dir) / "data_cache"
