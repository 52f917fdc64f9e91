"""The model and its DeepSpeed engine: the model with its options and initial weights, AdamW's parameter
groups, and the DeepSpeed config (the file's ZeRO stage and precision, plus what the experiment config
owns: batch sizes, optimizer, schedule, clipping)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from ..checkpoint_files import load_pt
from ..model import LoadReport, UniterForPretraining, load_bert_weights, load_original_state_dict
from ..model.options import apply_options
from .config import ExperimentConfig, check_with_deepspeed
from .distributed import say_while_waiting
from .extensions import extensions_dir

logger = logging.getLogger("uniter_ds.pretrain")


def build_model(config: ExperimentConfig) -> UniterForPretraining:
    """The model of ``config.model``: its size, options (model/options.py) and initial weights."""
    section = config.model
    model = UniterForPretraining(section.uniter_config(), wra_weight=section.wra_weight, mrc_kl=section.mrc_kl)
    apply_options(model, section.options())
    if section.init_from:
        kind, path = section.init_from.split(":", 1)
        if kind == "bert":
            report = load_bert_weights(model, path)
        elif kind == "uniter":
            report = load_original_state_dict(model, load_pt(path), strict=False)
        else:
            loaded, info = UniterForPretraining.from_pretrained(
                path, wra_weight=section.wra_weight, mrc_kl=section.mrc_kl, output_loading_info=True)
            model.load_state_dict(loaded.state_dict())
            # An encoder export has no heads: they start from BERT's initialisation, and the log says so.
            report = LoadReport(missing=sorted(info["missing_keys"]), unexpected=sorted(info["unexpected_keys"]))
        if report is not None and is_rank0():
            logger.info("initialised from %s\n%s", section.init_from, report)
    return model


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices and embeddings; none on biases and LayerNorm parameters."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "LayerNorm" in name or "norm" in name.split(".")[-2] else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


OPTIMIZERS = ("torch", "deepspeed")


def optimizer_config(lr: float, betas: list[float], eps: float, weight_decay: float, on_gpu: bool,
                     implementation: str = "torch") -> dict[str, Any]:
    """AdamW for DeepSpeed's ``optimizer`` section.

    ``torch``: torch.optim.AdamW with its fused kernel (CUDA and CPU): one pass per parameter tensor
    instead of ~8 elementwise ops, and nothing to compile at start. ``deepspeed``: DeepSpeed's
    FusedAdam, a CUDA extension that nvcc builds the first time a process needs it (about a minute,
    and a process killed during that build leaves a lock behind that makes every later one wait;
    ``uniter-ds prebuild`` builds it ahead, train/extensions.py). Both compute the same AdamW step."""
    if implementation not in OPTIMIZERS:
        raise ValueError(f"optimizer implementation {implementation!r}: expected one of {', '.join(OPTIMIZERS)}")
    if implementation == "deepspeed" and not on_gpu:
        raise ValueError("optimizer implementation 'deepspeed' (FusedAdam) needs a CUDA device; use 'torch' on CPU")
    params: dict[str, Any] = {"lr": lr, "betas": list(betas), "eps": eps, "weight_decay": weight_decay,
                              "torch_adam": implementation == "torch", "adam_w_mode": True}
    if implementation == "torch":
        params["fused"] = True
    return {"type": "AdamW", "params": params}


def deepspeed_config(config: ExperimentConfig, world_size: int, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed file (ZeRO stage, precision, ...) plus what the experiment config owns."""
    path = Path(config.deepspeed_config)
    if not path.exists():
        raise FileNotFoundError(f"deepspeed_config: {path} does not exist")
    ds = json.loads(path.read_text())
    optim = config.optim
    managed = {
        # Micro-batches are sized in tokens, not samples; DeepSpeed's sample count is nominal.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": optim.grad_accum,
        "train_batch_size": optim.grad_accum * world_size,
        "gradient_clipping": optim.grad_clip,
        "optimizer": optimizer_config(optim.lr, list(optim.betas), optim.eps, optim.weight_decay, on_gpu,
                                      optim.implementation),
        "scheduler": {"type": "WarmupDecayLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": optim.lr, "warmup_num_steps": max(1, optim.warmup_steps),
            "total_num_steps": optim.total_steps, "warmup_type": "linear"}},
        "steps_per_print": 10**9,
    }
    check_with_deepspeed(config, ds, path)
    for key, value in managed.items():
        if key in ds and ds[key] != value and is_rank0():
            logger.warning("%s: %s is set by the experiment config (%s), not by this file", path, key, value)
    return ds | managed


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def start_engine(config: ExperimentConfig, model: UniterForPretraining, world_size: int,
                 on_gpu: bool) -> deepspeed.DeepSpeedEngine:
    ds_config = deepspeed_config(config, world_size, on_gpu)
    with say_while_waiting(f"DeepSpeed to set up the engine, which loads or builds its ops in {extensions_dir()} "
                           f"(a build takes ~1 min; a `lock` there that no process holds makes it wait forever: "
                           f"`uniter-ds prebuild` names it)"):
        engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config,
                                               model_parameters=param_groups(model, config.optim.weight_decay))
    return engine
