"""UNITER pretraining with DeepSpeed: the entry point the ``deepspeed`` launcher starts on every rank.

    deepspeed --num_gpus 8 --module uniter_ds.train.pretrain --config launch/uniter-base.yaml
    uniter-ds pretrain --config launch/uniter-base.yaml --num-gpus 8      # validates, then the same

One (dataset, task) stream per optimizer step (or per micro-batch), drawn identically on every rank;
each stream has its own loader. :func:`run` is the whole job on one rank; its pieces live in engine.py
(model, DeepSpeed), feed.py (data), step.py (a step and its log window), checkpointing.py,
evaluate.py and tracking.py. Nothing but the command line and the launcher imports this module.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from deepspeed.accelerator import get_accelerator

from .. import run_layout
from ..checkpoint_files import CheckpointFileError
from ..data import DataError
from ..data.reader import Shard
from .checkpointing import DiskFull, Start, resume_from, save_run
from .config import ExperimentConfig, load_config
from .distributed import init_distributed
from .engine import build_model, is_rank0, start_engine
from .evaluate import Evaluation
from .feed import DataFeed, data_metrics, stop_on_faults
from .scheduler import Stream, TaskScheduler
from .sources import check_against_model, job_sources
from .step import LogWindow, train_step
from .tracking import Progress, Tracker, keep_steps_up_to, track_run

logger = logging.getLogger("uniter_ds.pretrain")


def run(config: ExperimentConfig, resume: str | None = None) -> dict[str, Any]:
    rank, world, device = init_distributed()  # this rank's GPU is selected before anything is built
    comm_device = device if get_accelerator().communication_backend_name() == "nccl" else torch.device("cpu")
    run_dir = claim_run_directory(config, rank, world)
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = build_model(config)
    streams = [Stream(d.name, task) for d in config.data.train for task in d.tasks]
    train_shards, val_shards = datasets_for(config, model)
    scheduler = TaskScheduler({Stream(d.name, t): ratio for d in config.data.train for t, ratio in d.tasks.items()},
                              seed=config.seed, per_micro_batch=config.task_draw == "micro_batch")
    engine = start_engine(config, model, world, device.type == "cuda")
    torch.manual_seed(config.seed + 1000 * rank)  # dropout streams differ per rank
    start = resume_from(engine, scheduler, run_dir / "checkpoints", resume, rank)
    feed = DataFeed(config, streams, rank, world, start.data_state, train_shards)
    tracker = track_run(config, run_dir, rank, world, device, engine, model, start, train_shards, val_shards)
    try:
        last_step = min(config.optim.total_steps, config.stop_at_step or config.optim.total_steps)
        window = LogWindow([s.name for s in streams], device, comm_device, start.step + 1)
        progress = Progress(rank, config, start.step, last_step)
        if start.data_state is not None:  # resumed: the steps after the checkpoint are logged again
            keep_steps_up_to(run_dir / f"rank{rank}.jsonl", start.step)
        # Line-buffered: a rank killed mid-run keeps every step it logged (a block buffer lost the last ones).
        rank_log = open(run_dir / f"rank{rank}.jsonl", "a", buffering=1)  # noqa: SIM115 - open for the whole run
        checkpoint, eval_metrics, data_totals = None, {}, {}
        val = Evaluation(config, val_shards, sorted({s.task for s in streams}), device, tracker, rank)
        engine.train()
        for step in range(start.step, last_step):
            step_streams = scheduler.for_step(step, config.optim.grad_accum)
            batches = [feed.next(s) for s in step_streams]
            train_step(engine, batches, step_streams, device, comm_device, window.sums, window.names)
            start.first_step_done(step + 1, rank)
            done = step + 1
            window.add(batches)
            rank_log.write(json.dumps({"step": done, "streams": [s.name for s in step_streams],
                                       "pairs": [b.meta["pairs"] for b in batches]}) + "\n")
            if done % config.tracking.log_every == 0 or done == last_step:
                first, metrics = window.first_step, window.close(engine, done)
                data_totals = data_metrics(feed, comm_device)
                tracker.log_metrics(metrics | data_totals, done)
                stop_on_faults(metrics | data_totals, config, first, done, done == last_step, checkpoint)
                progress.report(done, metrics, window.seconds)
            progress.update()
            if config.eval.every and done % config.eval.every == 0 and done < last_step:
                eval_metrics = val(engine, done)
            if config.checkpoint.every and done % config.checkpoint.every == 0 and done < last_step:
                checkpoint = save_run(engine, config, scheduler, feed, done)
        rank_log.close()
        progress.close()
        export = None
        if last_step > start.step:
            eval_metrics = val(engine, last_step) if config.eval.at_end else eval_metrics
            if config.checkpoint.at_end or config.export_at_end:
                checkpoint = save_run(engine, config, scheduler, feed, last_step)
            if config.export_at_end and rank == 0:
                export = export_weights(checkpoint, run_dir, tracker, train_shards)
        elif rank == 0:
            logger.info("nothing to train: the run is already at step %d", start.step)
        dist.barrier()
        tracker.finish()
    except BaseException as error:  # the MLflow run must not stay RUNNING after a crash or Ctrl-C
        tracker.finish("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    return write_result(config, run_dir, rank, last_step, eval_metrics, checkpoint, export, tracker, data_totals,
                        start)


# ---------------------------------------------------------------------------------------------
# The run's pieces, in the order run() calls them
# ---------------------------------------------------------------------------------------------


_HELD_LOCKS: list[Any] = []  # a run directory's lock lives as long as its file stays open: this process's life


def claim_run_directory(config: ExperimentConfig, rank: int, world: int) -> Path:
    """Rank 0 locks the run directory (one live job per directory) and writes the config into it; every
    rank stops alike when another job holds it."""
    run_dir = Path(config.run_dir)
    busy = [None]
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            _HELD_LOCKS.append(run_layout.lock_run_directory(run_dir))
        except run_layout.RunDirectoryBusy as error:
            busy = [str(error)]
        else:
            (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    if dist.is_initialized() and world > 1:
        dist.broadcast_object_list(busy, src=0)
    if busy[0]:
        raise run_layout.RunDirectoryBusy(busy[0])
    dist.barrier()
    return run_dir


def datasets_for(config: ExperimentConfig, model: torch.nn.Module) -> tuple[dict[str, list[Shard]], list[Shard]]:
    """Each training dataset's shards and the held-out set's, as resolved once at the job's start
    (sources.py), checked against the model before any step."""
    resolved = job_sources(config)
    check_against_model(config, resolved, model.config)
    return resolved.train, resolved.val


def export_weights(checkpoint: Path, run_dir: Path, tracker: Tracker, train_shards: dict[str, list[Shard]]) -> Path:
    """The same path as `uniter-ds export`: consolidated fp32 weights, verified by reloading (with the
    tokenizer of the training data as the job resolved it)."""
    from ..export import export

    training_data = [(shards[0].origin, shards[0].manifest) for shards in train_shards.values()]
    exported = Path(export(checkpoint, run_dir / "export", heads=True, overwrite=True,
                           training_data=training_data)["out"])
    tracker.log_artifacts(exported, "export")
    return exported


def write_result(config: ExperimentConfig, run_dir: Path, rank: int, last_step: int, eval_metrics: dict[str, float],
                 checkpoint: Path | None, export: Path | None, tracker: Tracker, data_totals: dict[str, float],
                 start: Start) -> dict[str, Any]:
    """The run's summary (rank 0 writes it as result.json)."""
    result = {"run_dir": str(run_dir), "last_step": last_step, "eval": eval_metrics,
              "checkpoint": str(checkpoint) if checkpoint else None, "export": str(export) if export else None,
              "mlflow": tracker.tracking_uri, "mlflow_run_id": tracker.run_id, "tracking": tracker.stats,
              "data": {k.removeprefix("data/"): v for k, v in data_totals.items()}}
    if "first_step" in start.clock:
        result["resume"] = {"from_step": start.step, "data_resume": config.data.resume,
                            "seconds_to_first_step": start.clock["first_step"] - start.clock["began"],
                            "seconds_loading_checkpoint": start.clock["loaded"] - start.clock["began"]}
    if rank == 0:
        (run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_eval(metrics: dict[str, float]) -> str:
    """``val/itm/acc=0.9120 (0.50)``: each accuracy and recall beside its chance level."""
    def chance(name: str) -> float | None:
        if name.endswith("/acc"):
            return metrics.get(name + "_chance")
        if name.startswith("val/retrieval/"):
            return metrics.get("val/retrieval/r" + name.rsplit("_r", 1)[1] + "_chance")
        return None

    parts = []
    for name, value in sorted(metrics.items()):
        if name.endswith("_chance"):
            continue
        level = chance(name)
        parts.append(f"{name}={value:.4f}" + (f" ({level:.2f})" if level is not None else ""))
    return ", ".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="experiment config (YAML or JSON)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="resume from the run's latest complete checkpoint, or from PATH")
    parser.add_argument("--deepspeed_config", help="overrides the config's deepspeed_config")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return parser.parse_args(argv)


NAMED_FAULTS = (DataError, FloatingPointError, run_layout.RunDirectoryBusy, DiskFull, CheckpointFileError)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.set) + ([f"deepspeed_config={args.deepspeed_config}"] if args.deepspeed_config else [])
    config = load_config(args.config, overrides)
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        result = run(config, args.resume)
    except NAMED_FAULTS as error:  # their message is the report: no traceback
        logger.error("rank %s stopped: %s", os.environ.get("RANK", "0"), error)
        return 1
    if is_rank0():
        print(f"run directory: {result['run_dir']}")
        print(f"final checkpoint: {result['checkpoint']}")
        print(f"exported weights: {result['export']}")
        print(f"metrics: {Path(result['run_dir']) / 'metrics.jsonl'}; MLflow: {result['mlflow']} "
              f"(run {result['mlflow_run_id']})")
        if result["eval"]:
            print("held-out evaluation (chance in brackets): " + format_eval(result["eval"]))
        if result["data"]:
            data = result["data"]
            print(f"data: {data['images']:.0f} images read; {data['skipped_images']:.0f} skipped, "
                  f"{data['lost_images']:.0f} lost in {data['corrupt_shards']:.0f} corrupt shard(s) "
                  f"({data['skip_fraction']:.2%}); {data['dropped_long_captions']:.0f} captions over "
                  f"data.max_text_len dropped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
