"""Run under the deepspeed launcher by tests/test_train.py: train on fixed micro-batches and dump the
per-step losses and final weights. Every step has GLOBAL_MICRO micro-batches; rank r of W takes
micro-batches r*A .. r*A+A-1 with A = GLOBAL_MICRO / W accumulation steps, so any layout of ranks x
accumulation sees the same global batches. ``--also-rank0-data-alone`` then trains one rank on rank 0's
share alone: what rank 0 would compute if the gradient all-reduce were missing."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import deepspeed
import torch

from tests.helpers import collate, random_sample
from uniter_ds.train.config import load_config
from uniter_ds.train.distributed import init_distributed
from uniter_ds.train.engine import build_model, deepspeed_config, param_groups
from uniter_ds.train.scheduler import Stream
from uniter_ds.train.step import new_window, reduce_window, train_step

GLOBAL_MICRO = 2
TASKS = ["mlm", "itm", "mrfr", "mrc-kl", "mlm", "itm"]


def batches_for(step: int, config) -> list:
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for _ in range(GLOBAL_MICRO):
        size = int(torch.randint(2, 5, (1,), generator=g))
        samples = [random_sample(config, int(torch.randint(4, 12, (1,), generator=g)),
                                 int(torch.randint(3, 10, (1,), generator=g)), g) for _ in range(size)]
        out.append(collate(samples, itm_targets=[int(t) for t in torch.randint(0, 2, (size,), generator=g)]))
    return out


def train(config, rank: int, world: int, share: int) -> dict:
    """Six steps from the config's seed, this rank taking ``share`` micro-batches of each global batch."""
    config.optim.grad_accum = share
    torch.manual_seed(config.seed)
    model = build_model(config)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, config.optim.weight_decay),
                                      config=deepspeed_config(config, world, on_gpu=False))
    names = [f"eq/{t}" for t in sorted(set(TASKS))]
    window = new_window(names, torch.device("cpu"))
    losses = []
    for step, task in enumerate(TASKS):
        mine = batches_for(step, model.config)[rank * share:(rank + 1) * share]
        train_step(engine, mine, [Stream("eq", task)] * share, torch.device("cpu"), torch.device("cpu"), window,
                   names)
        losses.append(reduce_window(window, names, torch.device("cpu"))[f"train/eq/{task}/loss"])
    return {"losses": losses, "weights": {k: v.float().tolist() for k, v in engine.module.state_dict().items()},
            "world": world}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--also-rank0-data-alone", action="store_true",
                        help="then train again on rank 0's share alone (one rank)")
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    config = load_config(args.config)
    rank, world, _ = init_distributed()  # the ranks' own start (gloo on CPU ranks)
    results = {"all": train(config, rank, world, GLOBAL_MICRO // world)}
    if args.also_rank0_data_alone:
        results["rank0-alone"] = train(config, rank, world, 1)
    if rank == 0:
        Path(args.out).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
