"""The data of a reward-model job: preference sources mixed by ratio, a held-out share of
each, and the loader of one data-parallel rank.

The paper trains each RM on a mix (llama2.md, "Reward models"): the Helpfulness RM on all Meta
Helpfulness data plus an equal share sampled from Meta Safety and open-source data, the Safety
RM on all Meta Safety and Anthropic Harmless data mixed 90/10 with helpfulness data. Here a mix
is `data.sources`, each source a list of files and a `ratio`:

- An epoch holds `pairs_per_epoch` training pairs, source s contributing ratio_s / sum(ratios)
  of them. Left at null, it is the largest mix that repeats no pair (the source that runs out
  first is taken whole, the others sampled), which is how the paper's mixes read; set, a source
  with fewer pairs than its share is repeated (whole passes plus a sample).
- Each epoch samples afresh, by (seed, epoch, source), and shuffles the mix.
- `valid_fraction` of every source is held out (a source may set its own; a source with
  ratio 0 and valid_fraction 1 is a test set only), and evaluated as its own row of the
  paper's Table 8.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from llama_dist.data.epochs import EpochLoader, rank_chunks
from llama_dist.data.preference import OVERLONG, PreferenceDataset, collate_preferences
from llama_dist.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SHORTHAND = "data"  # the source `data.paths` makes


@dataclass
class PreferenceSource:
    paths: list[str] = field(default_factory=list)  # JSON / JSONL preference files
    ratio: float = 1.0  # share of the training mix, relative to the other sources' ratios
    valid_fraction: float | None = None  # held out for evaluation; null: data.valid_fraction


@dataclass
class RewardDataConfig:
    """Preference files, how they are mixed and how long a sequence may be."""

    # name -> source; the names label the evaluation rows (e.g. helpful, safety). Written in a
    # config file (conf/reward_safety.yaml); on the command line, existing sources' fields can
    # be overridden, and `paths` gives one more source.
    sources: dict[str, PreferenceSource] = field(default_factory=dict)
    # Files of one more source, named "data", with ratio 1 (a job on a single source).
    paths: list[str] = field(default_factory=list)
    max_len: int = 4096  # most tokens of prompt + response
    overlong: str = "truncate"  # truncate: cut the prompt's start, never a response | drop
    min_prompt_tokens: int = 16  # a truncated pair keeps at least this much of its prompt
    skip_invalid: bool = False  # count and report malformed records instead of failing
    valid_fraction: float = 0.05  # held out per source for accuracy tables
    pairs_per_epoch: int | None = None  # null: the largest mix that repeats no pair
    seed: int = 1234  # held-out choice, per-epoch samples and shuffles

    def validate(self) -> RewardDataConfig:
        """Check the settings and that the files exist; moves `paths` into `sources`."""
        if self.paths:
            if SHORTHAND in self.sources:
                raise ValueError(
                    f"data.paths adds a source named {SHORTHAND!r}, but data.sources has one; "
                    "rename that source or list its files there"
                )
            self.sources[SHORTHAND] = PreferenceSource(paths=list(self.paths))
            self.paths = []
        if not self.sources:
            raise ValueError(
                "no preference data: set data.paths=[FILE.jsonl, ...], or write a mix of "
                "data.sources (name -> paths, ratio) in a config such as conf/reward_safety.yaml"
            )
        if self.overlong not in OVERLONG:
            raise ValueError(f"data.overlong={self.overlong!r} must be one of {OVERLONG}")
        if not isinstance(self.max_len, int) or self.max_len < 2:
            raise ValueError(f"data.max_len={self.max_len!r} must be an integer >= 2")
        for name, source in self.sources.items():
            where = f"data.sources.{name}"
            if not source.paths:
                raise ValueError(f"{where}.paths is empty; list its preference files")
            for path in source.paths:
                if not Path(path).is_file():
                    raise ValueError(f"{where}: preference file {path} does not exist")
            if not source.ratio >= 0:
                raise ValueError(f"{where}.ratio={source.ratio} must be >= 0")
            if not 0.0 <= self.held_out(name) <= 1.0:
                raise ValueError(f"{where}.valid_fraction={self.held_out(name)} must be in [0, 1]")
            if source.ratio > 0 and self.held_out(name) == 1.0:
                raise ValueError(
                    f"{where} holds everything out (valid_fraction 1) but has ratio "
                    f"{source.ratio}; give it ratio 0 to make it a test set"
                )
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"data.valid_fraction={self.valid_fraction} must be in [0, 1)")
        if not any(s.ratio > 0 for s in self.sources.values()):
            raise ValueError("every source has ratio 0; at least one must be trained on")
        if self.pairs_per_epoch is not None and self.pairs_per_epoch < 1:
            raise ValueError(f"data.pairs_per_epoch={self.pairs_per_epoch} must be >= 1 or null")
        return self

    def held_out(self, name: str) -> float:
        own = self.sources[name].valid_fraction
        return self.valid_fraction if own is None else own


class RewardData:
    """The pairs of every source, tokenised, split into training and held-out pairs, and the
    mixed order of each epoch as (source index, pair index) items."""

    def __init__(self, cfg: RewardDataConfig, tokenizer: Tokenizer) -> None:
        cfg.validate()
        self.cfg = cfg
        self.names = list(cfg.sources)
        self.datasets: list[PreferenceDataset] = []
        self.train_ids: list[np.ndarray] = []
        self.valid_ids: list[np.ndarray] = []
        for s, name in enumerate(self.names):
            source = cfg.sources[name]
            data = PreferenceDataset(
                source.paths,
                tokenizer,
                max_len=cfg.max_len,
                overlong=cfg.overlong,
                min_prompt_tokens=cfg.min_prompt_tokens,
                skip_invalid=cfg.skip_invalid,
            )
            perm = np.random.default_rng([cfg.seed, s]).permutation(len(data))
            num_valid = round(cfg.held_out(name) * len(perm))
            if cfg.held_out(name) and num_valid == 0:
                num_valid = 1
            train = np.sort(perm[num_valid:])
            if source.ratio > 0 and len(train) == 0:
                raise ValueError(
                    f"data.sources.{name}: holding out {cfg.held_out(name)} of its "
                    f"{len(data)} pairs leaves none to train on; lower its valid_fraction"
                )
            self.datasets.append(data)
            self.train_ids.append(train)
            self.valid_ids.append(np.sort(perm[:num_valid]))
        self.shares = self._shares()
        self.summary = {
            "pairs_per_epoch": sum(self.shares),
            **{f"{n}_train_pairs": len(t) for n, t in zip(self.names, self.train_ids, strict=True)},
            **{f"{n}_valid_pairs": len(v) for n, v in zip(self.names, self.valid_ids, strict=True)},
            **{f"{n}_per_epoch": k for n, k in zip(self.names, self.shares, strict=True)},
        }
        self._epoch: dict[int, list[tuple[int, int]]] = {}

    def _shares(self) -> list[int]:
        ratios = np.array([self.cfg.sources[n].ratio for n in self.names], dtype=np.float64)
        weights = ratios / ratios.sum()
        sizes = np.array([len(t) for t in self.train_ids])
        total = self.cfg.pairs_per_epoch
        if total is None:
            # The largest mix in which no source gives more pairs than it has.
            used = weights > 0
            largest = float(np.min(sizes[used] / weights[used]))
            shares = [min(round(largest * w), n) for w, n in zip(weights, sizes, strict=True)]
        else:
            shares = [round(total * w) for w in weights]
        if sum(shares) == 0:
            raise ValueError("the mix gives no training pair per epoch; add data")
        return shares

    def epoch_items(self, epoch: int) -> list[tuple[int, int]]:
        """The training pairs of `epoch`, as (source, pair index), mixed and shuffled."""
        if epoch not in self._epoch:
            items: list[tuple[int, int]] = []
            for s, (ids, share) in enumerate(zip(self.train_ids, self.shares, strict=True)):
                if share == 0:
                    continue
                rng = np.random.default_rng([self.cfg.seed, epoch, s])
                whole, rest = divmod(share, len(ids))
                picked = [ids] * whole + [ids[rng.permutation(len(ids))[:rest]]]
                items += [(s, int(i)) for i in np.concatenate(picked)]
            order = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(items))
            # Only the newest epoch is kept: a loader moves forwards.
            self._epoch = {epoch: [items[i] for i in order]}
        return self._epoch[epoch]

    def batch(self, items: list[tuple[int, int]], *, pad_to_multiple_of: int = 1):
        pairs = [self.datasets[s][i] for s, i in items]
        return collate_preferences(pairs, pad_to_multiple_of=pad_to_multiple_of)


class PreferenceLoader(EpochLoader):
    """Training micro-batches of preference pairs (`EpochLoader`): `micro_batch` pairs are
    2 x micro_batch sequences. The position is saved as `consumed_pairs`."""

    def __init__(
        self,
        data: RewardData,
        *,
        global_batch: int,
        micro_batch: int,
        dp_rank: int,
        dp_size: int,
        pad_to_multiple_of: int = 1,
    ) -> None:
        super().__init__(
            data.epoch_items,
            functools.partial(data.batch, pad_to_multiple_of=pad_to_multiple_of),
            global_batch=global_batch,
            micro_batch=micro_batch,
            dp_rank=dp_rank,
            dp_size=dp_size,
            state_key="consumed_pairs",
            unit="pairs",
        )


def valid_pair_batches(
    data: RewardData,
    source: int,
    *,
    micro_batch: int,
    dp_rank: int,
    dp_size: int,
    pad_to_multiple_of: int = 1,
) -> Iterator[dict[str, torch.Tensor]]:
    """The held-out pairs of `source`, this rank's share; `pair_mask` marks real pairs (every
    rank yields the same number of batches)."""
    items = [(source, int(i)) for i in data.valid_ids[source]]
    for chunk, real in rank_chunks(
        items, micro_batch=micro_batch, dp_rank=dp_rank, dp_size=dp_size
    ):
        batch = data.batch(chunk, pad_to_multiple_of=pad_to_multiple_of)
        batch["pair_mask"] = torch.tensor(real)
        yield batch
