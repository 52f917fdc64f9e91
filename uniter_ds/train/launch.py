"""``uniter-ds pretrain``: check the experiment config here, then start the ``deepspeed`` launcher.

A bad key or value fails in this process, before any rank is spawned. Everything after the options
below is the launcher's business: one node (``--num-gpus``), several (``--hostfile``, ``--num-nodes``),
or one node of a multi-node job without ssh (``--no-ssh --node-rank R --master-addr A``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..model.options import option_problems
from .config import check_with_deepspeed, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="experiment config (YAML or JSON)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue from the run's latest complete checkpoint, or from PATH")
    parser.add_argument("--num-gpus", type=int, help="ranks per node (default: the GPUs present, or 2 CPU ranks)")
    parser.add_argument("--num-nodes", type=int, help="nodes of the hostfile to use (default: all)")
    parser.add_argument("--hostfile", help="DeepSpeed hostfile: lines 'worker-0 slots=8'")
    parser.add_argument("--master-addr", help="the address of the first node (rank 0), which the others reach")
    parser.add_argument("--master-port", type=int, help="the port rank 0 listens on (DeepSpeed's default: 29500)")
    parser.add_argument("--no-ssh", action="store_true", help="start only this node's ranks (no pdsh/ssh)")
    parser.add_argument("--node-rank", type=int, help="with --no-ssh: this node's rank")
    parser.add_argument("--dry-run", action="store_true", help="print the launcher command, start nothing")


def deepspeed_executable() -> str:
    """The ``deepspeed`` launcher of this interpreter's environment first: another venv's on PATH would
    start the ranks with that venv's Python and its copy of this package."""
    beside = Path(sys.executable).with_name("deepspeed")
    return str(beside) if beside.exists() else shutil.which("deepspeed") or "deepspeed"


def free_port() -> int:
    """A TCP port free on this host now (for a job's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_options(args: argparse.Namespace, on_gpu: bool) -> list[str]:
    """``deepspeed`` and its placement options (also used by ``uniter-ds bench --num-gpus``)."""
    command = [deepspeed_executable()]
    if args.hostfile:
        command += ["--hostfile", args.hostfile]
    if args.num_nodes is not None:
        command += ["--num_nodes", str(args.num_nodes)]
    num_gpus = args.num_gpus
    if num_gpus is None and not on_gpu:
        num_gpus = 2
    if num_gpus is not None:
        command += ["--num_gpus", str(num_gpus)]
    if getattr(args, "master_addr", None):
        command += ["--master_addr", args.master_addr]
    if args.master_port:
        command += ["--master_port", str(args.master_port)]
    elif not (args.hostfile or args.num_nodes or getattr(args, "no_ssh", False)):
        # One node: a port free now, not DeepSpeed's fixed 29500 (a second job on the machine would die on it).
        # Across nodes every node must be given the same port: --master-port.
        command += ["--master_port", str(free_port())]
    if getattr(args, "no_ssh", False):
        if args.node_rank is None:
            raise ValueError("--no-ssh needs --node-rank")
        command += ["--no_ssh", "--node_rank", str(args.node_rank)]
    return command


def launcher_command(args: argparse.Namespace, on_gpu: bool) -> list[str]:
    command = launcher_options(args, on_gpu)
    command += ["--module", "uniter_ds.train.pretrain", "--config", str(args.config)]
    for assignment in args.set:
        command += ["--set", assignment]
    if args.resume is not None:
        command += ["--resume", args.resume]
    return command


def _unlike_manifest(shard) -> str | None:
    """How a local shard differs from its manifest entry (missing, or another size); None if it does not.
    Remote shards are not fetched to check."""
    if shard.is_remote:
        return None
    size = shard.size_on_disk
    if size == shard.bytes:
        return None
    return f"{shard.path} ({'missing' if size is None else f'{size} bytes'}, the manifest says {shard.bytes} bytes)"


def launch_job(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.set)  # raises ConfigError naming the key
    ds_path = Path(config.deepspeed_config)
    if not ds_path.exists():
        raise ValueError(f"config key 'deepspeed_config': {ds_path} does not exist")
    try:
        ds = json.loads(ds_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"config key 'deepspeed_config': {ds_path} is not valid JSON ({error})") from None
    check_with_deepspeed(config, ds, ds_path)
    import torch

    for key, why in option_problems(config.model.options(), cuda_available=torch.cuda.is_available()):
        raise ValueError(f"config key {key!r}: {why}")
    from ..data import DataError, resolve_sources
    from .sources import JOB_SOURCES_ENV, JobSources, check_against_model, dataset_keys, to_json

    # Every dataset is resolved here as the ranks will resolve it (folders, globs, brace ranges, URLs
    # with their manifests), checked against the model, and its local shards against their manifest:
    # a wrong path or a misfit fails before any rank starts.
    section = config.model
    if section.config_file and not Path(section.config_file).is_file():
        raise ValueError(f"config key 'model.config_file': {section.config_file} does not exist")
    init_path = section.init_from.split(":", 1)[1] if section.init_from else None
    if init_path and not Path(init_path).exists():
        raise ValueError(f"config key 'model.init_from': {init_path} does not exist")
    try:
        model = section.uniter_config()
    except (TypeError, ValueError) as error:
        raise ValueError(f"config key 'model': {error}") from None
    resolved = JobSources({}, [])
    for key, name, paths, _ in dataset_keys(config):
        try:
            shards = resolve_sources(paths)
        except DataError as error:
            raise ValueError(f"config key '{key}': {error}") from None
        if name is None:
            resolved.val = shards
        else:
            resolved.train[name] = shards
        damaged = [problem for problem in map(_unlike_manifest, shards) if problem]
        if damaged and config.data.on_error == "raise":
            raise ValueError(f"config key '{key}': {len(damaged)} shard(s) unlike their manifest: {damaged[0]}"
                             f"{' ...' if len(damaged) > 1 else ''} (data.on_error: skip trains on without them, "
                             f"counted)")
        for shard in damaged:
            print(f"uniter-ds pretrain: warning: {key}: shard {shard}: skipped and counted when read", file=sys.stderr)
    try:
        check_against_model(config, resolved, model)
    except DataError as error:
        raise ValueError(str(error)) from None
    if args.resume not in (None, "latest") and not Path(args.resume).exists():
        raise ValueError(f"--resume {args.resume}: does not exist (a checkpoint folder, or a run's checkpoints "
                         f"folder; --resume alone continues the run directory's latest)")
    from ..run_layout import lock_holder

    run_dir = Path(config.run_dir)
    holder = lock_holder(run_dir)
    if holder:
        raise ValueError(f"config key 'run_dir': {run_dir} is in use by a live job ({holder}); wait for it to end, "
                         f"stop it, or give this job another run_dir")
    from .extensions import extensions_dir, stale_locks, stale_message

    stale = stale_locks()
    if stale:
        raise ValueError(stale_message(stale))
    on_gpu = torch.cuda.is_available()
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))  # this environment's builds, not a shared folder
    if not on_gpu:
        env.setdefault("DS_ACCELERATOR", "cpu")
    command = launcher_command(args, on_gpu)
    print(" ".join(command), flush=True)
    if args.dry_run:
        return 0
    # The ranks take the datasets as resolved here (train/sources.py): nothing is fetched twice.
    with tempfile.TemporaryDirectory(prefix="uniter-ds-job-") as folder:
        env[JOB_SOURCES_ENV] = str(Path(folder) / "sources.json")
        Path(env[JOB_SOURCES_ENV]).write_text(to_json(config, resolved))
        code = subprocess.call(command, env=env)
    if code != 0 and lock_holder(run_dir):
        # The runner died (e.g. killed) while its ranks live on: say so, and return only when they are
        # gone, so that a resume started right after this command cannot run beside them.
        print(f"uniter-ds: the deepspeed runner ended ({code}) while the job's ranks still run "
              f"({lock_holder(run_dir)}); waiting for them to end (stop them to stop waiting)", file=sys.stderr,
              flush=True)
        while lock_holder(run_dir):
            time.sleep(2)
    return code
