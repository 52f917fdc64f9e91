"""What shapes a task's data loader: the keys under ``data:`` of an experiment config, with their one set
of defaults and their one validation.

Plain Python (no torch): the experiment config extends :class:`LoaderSettings` (``train/config.py``'s
``DataSection``), and the loader takes a :class:`LoaderConfig`, the same settings plus the run's seed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

SPLITS = ("exact", "resampled")
ON_ERROR = ("raise", "skip")
MASKING = ("conditional", "joint")
LAYOUTS = ("padded", "packed")
BATCHING = ("budget", "rows")


@dataclass
class LoaderSettings:
    token_budget: int = 8192  # text + regions incl. padding, per micro-batch
    num_workers: int = 2  # DataLoader worker processes per task stream and rank
    # "resampled": an endless stream, each worker drawing shards with replacement (the reference's
    # sampler); "exact": one epoch, every pair once across all ranks and workers, reshuffled each epoch.
    split: str = "resampled"
    shuffle_buffer: int = 1000  # pairs
    pool_budgets: int = 16  # the batcher sorts a pool of this many budgets' worth of tokens at a time
    min_pool_tokens: int = 2**18  # ... and at least this many (about the reference's 8192-pair pool)
    max_text_len: int | None = 60  # longer captions are dropped (and counted), as in the reference
    on_error: str = "raise"  # "raise", or "skip" (skip and count)
    mask_prob: float = 0.15  # each word (MLM) or region (MRM) is chosen with this probability
    itm_neg_prob: float = 0.5  # an ITM pair gets another image with this probability
    masking: str = "conditional"  # "conditional" (one modality masked per batch) or "joint" (the ablation)
    pad_to_multiple_of: int = 1
    # "padded": each micro-batch is [samples, longest sample]; "packed": the encoder runs the samples packed
    # into rows of pack_row_len tokens (at least the longest sample), attending within each sample only.
    layout: str = "padded"
    pack_row_len: int = 256
    # "budget": micro-batches of similar-length samples, <= token_budget tokens padded; "rows" (packed
    # layout only): exactly token_budget // pack_row_len rows filled best-fit from a pool of mixed lengths,
    # so every micro-batch has one shape (1-3% padding).
    batching: str = "budget"
    cache_dir: str | None = None  # remote shards are downloaded here once (default: $UNITER_DS_SHARD_CACHE)

    @property
    def row_len(self) -> int | None:
        """The packed layout's row length; None for the padded layout."""
        return self.pack_row_len if self.layout == "packed" else None

    def problems(self) -> list[tuple[str, str]]:
        """(key, what is wrong) for every invalid setting; empty when all are valid."""
        found = []
        for key, value, allowed in (("split", self.split, SPLITS), ("on_error", self.on_error, ON_ERROR),
                                    ("masking", self.masking, MASKING), ("layout", self.layout, LAYOUTS),
                                    ("batching", self.batching, BATCHING)):
            if value not in allowed:
                found.append((key, f"{value!r} is not one of {list(allowed)}"))
        for key, value, lowest in (("token_budget", self.token_budget, 1), ("pack_row_len", self.pack_row_len, 1),
                                   ("pool_budgets", self.pool_budgets, 1), ("min_pool_tokens", self.min_pool_tokens, 1),
                                   ("pad_to_multiple_of", self.pad_to_multiple_of, 1),
                                   ("num_workers", self.num_workers, 0), ("shuffle_buffer", self.shuffle_buffer, 0)):
            if value < lowest:
                found.append((key, f"must be {'> 0' if lowest else '>= 0'}, got {value}"))
        if self.max_text_len is not None and self.max_text_len < 1:
            found.append(("max_text_len", f"must be >= 1 or null, got {self.max_text_len}"))
        if not 0 < self.mask_prob < 1:
            found.append(("mask_prob", f"a probability in (0, 1), got {self.mask_prob}"))
        if not 0 <= self.itm_neg_prob <= 1:
            found.append(("itm_neg_prob", f"a probability in [0, 1], got {self.itm_neg_prob}"))
        if self.batching == "rows" and self.layout != "packed":
            found.append(("batching", "'rows' fills the packed layout's rows: set data.layout: packed"))
        elif self.batching == "rows" and self.token_budget < self.pack_row_len:
            found.append(("token_budget", f"{self.token_budget} holds no row of data.pack_row_len "
                                          f"{self.pack_row_len} tokens (data.batching: rows)"))
        return found


@dataclass
class LoaderConfig(LoaderSettings):
    """The settings of one loader, with the seed of its run (the data order is a function of the seed,
    the epoch, the task and the worker)."""

    seed: int = 0

    def __post_init__(self) -> None:
        if found := self.problems():
            raise ValueError("LoaderConfig: " + "; ".join(f"{key}: {why}" for key, why in found))

    @classmethod
    def of(cls, settings: LoaderSettings, seed: int) -> LoaderConfig:
        """The loader settings of ``settings`` (an experiment config's data section) with ``seed``."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(LoaderSettings)}, seed=seed)
