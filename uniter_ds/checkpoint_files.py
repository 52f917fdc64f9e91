"""Checkpoint files read as data: no code runs from a ``.pt`` file, whoever made it.

A ``.pt`` file is a pickle, and unpickling calls whatever the file names: a checkpoint downloaded from
someone else can run code the moment it is loaded. Every ``.pt`` this package reads goes through
:func:`load_pt`: ``torch.load(weights_only=True)``, torch's restricted unpickler, which builds tensors,
containers and plain values and refuses every other name, plus exactly the few types DeepSpeed's and
this package's checkpoints hold (:func:`allowed_types`: numpy arrays of a data state or an RNG, DeepSpeed's
loss scaler, ZeRO stage and fragment address). A file naming anything else is refused, naming the file
and what it names, before anything in it is built.

DeepSpeed reads its own files with ``weights_only=False``; :func:`guard_deepspeed_loads` routes an engine's
reads through :func:`load_pt` for resume, and :func:`zero_fp32_state` consolidates ZeRO shards into one
fp32 state dict for export without DeepSpeed's ``zero_to_fp32`` (which unpickles as well). docs/SECURITY.md
says what stays the user's to trust.
"""

from __future__ import annotations

import functools
import math
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch


class CheckpointFileError(ValueError):
    """A checkpoint file that is refused (it names code) or cannot be read; the message names the file."""


@functools.cache
def allowed_types() -> tuple[Any, ...]:
    """What the checkpoints of uniter-ds and DeepSpeed hold beyond tensors and plain values, and nothing more:
    numpy arrays (data states and numpy's RNG state; rebuilt from their bytes, never calling anything else),
    and DeepSpeed's loss scaler, ZeRO stage enum and fragment address (plain value holders)."""
    import numpy as np

    reconstruct = (np._core.multiarray._reconstruct if hasattr(np, "_core")  # numpy 2
                   else np.core.multiarray._reconstruct)
    allowed: list[Any] = [reconstruct, np.ndarray, np.dtype, *{type(np.dtype(t)) for t in np.typecodes["All"]}]
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return (*allowed, LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)


def _names_outside(path: Path) -> list[str]:
    """The global names a pickle in ``path`` would import that are not allowed (read from its opcodes,
    nothing built)."""
    allowed = {f"{t.__module__}.{t.__qualname__}" for t in allowed_types()}
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 -- a file too damaged to list is reported by the caller's error
        return []
    return sorted(set(names) - allowed)


def load_pt(path: str | Path, map_location: Any = "cpu", *, mmap: bool = False) -> Any:
    """``torch.load`` that runs no code (see the module docstring); errors name the file."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(list(allowed_types())):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        names = _names_outside(path) or [str(error).splitlines()[0][:200]]
        raise CheckpointFileError(
            f"{path}: refused: it names {', '.join(names)}, which loading would import and call; a checkpoint "
            f"holds tensors and plain values, so this file was not loaded (docs/SECURITY.md)") from None
    except FileNotFoundError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise CheckpointFileError(f"{path}: cannot be read ({type(error).__name__}: {str(error)[:300]})") from error


def guard_deepspeed_loads(engine: Any) -> None:
    """Make a DeepSpeed engine read checkpoint files through :func:`load_pt` (its own engine unpickles
    them whole): model states, ZeRO optimizer shards, everything ``load_checkpoint`` reads."""
    engine.checkpoint_engine.load = lambda path, map_location=None: load_pt(path, map_location)


# ---------------------------------------------------------------------------------------------
# ZeRO shards -> one fp32 state dict (what zero_to_fp32 does, through load_pt)
# ---------------------------------------------------------------------------------------------


def _rank_of(path: Path) -> int:
    match = re.search(r"zero_pp_rank_(\d+)_", path.name)
    return int(match.group(1)) if match else -1


def _optimizer_shards(folder: Path) -> list[dict[str, Any]]:
    files = sorted(folder.glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=_rank_of)
    if not files:
        raise CheckpointFileError(f"{folder}: no *_optim_states.pt files: not a ZeRO checkpoint, or an incomplete one")
    shards = []
    for rank, file in enumerate(files):
        if _rank_of(file) != rank:
            raise CheckpointFileError(f"{folder}: the optimizer shard of rank {rank} is missing (found {file.name})")
        state = load_pt(file, mmap=True)
        try:
            optimizer = state["optimizer_state_dict"]
            optimizer.pop("optimizer_state_dict", None)  # Adam's moments: not needed for the weights
            shards.append(optimizer)
        except (KeyError, TypeError, AttributeError):
            raise CheckpointFileError(f"{file}: no optimizer_state_dict: not a DeepSpeed ZeRO optimizer "
                                      f"shard") from None
    count = shards[0].get("partition_count")
    count = max(count) if isinstance(count, list) else count
    if count != len(files):
        raise CheckpointFileError(f"{folder}: the shards say {count} ranks wrote them, {len(files)} are here")
    return shards


def _zero12_params(shards: list[dict[str, Any]], param_shapes: list[dict[str, Any]], folder: Path
                   ) -> dict[str, torch.Tensor]:
    """ZeRO-1/2: each param group is one flat fp32 vector cut into equal rank pieces; params lie in order,
    each followed by its alignment padding where recorded, the whole padded to 2 x world."""
    world = len(shards)
    groups = [shard["single_partition_of_fp32_groups"] for shard in shards]
    paddings = shards[0].get("param_alignment_paddings")
    state = {}
    for index, shapes in enumerate(param_shapes):
        flat = torch.cat([groups[rank][index] for rank in range(world)])
        offset = 0
        for position, (name, shape) in enumerate(shapes.items()):
            size = math.prod(shape)
            if offset + size > flat.numel():
                raise CheckpointFileError(f"{folder}: param group {index} holds {flat.numel()} values, fewer than its "
                                          f"parameters need ({name} ends at {offset + size})")
            state[name] = flat.narrow(0, offset, size).view(tuple(shape)).clone()
            offset += size + (paddings[index][position] if paddings is not None else 0)
        align = 2 * world
        if math.ceil(offset / align) != math.ceil(flat.numel() / align):
            raise CheckpointFileError(f"{folder}: param group {index}: the parameters take {offset} values, the "
                                      f"shards hold {flat.numel()}: shards of another model or world size?")
    return state


def _zero3_params(shards: list[dict[str, Any]], param_shapes: list[dict[str, Any]], folder: Path
                  ) -> dict[str, torch.Tensor]:
    """ZeRO-3: every parameter is cut into world equal pieces (the last padded); rank r's flat vector holds
    its piece of each parameter in order."""
    world = len(shards)
    flats = [torch.cat(list(shard["fp32_flat_groups"])) for shard in shards]
    state, offset = {}, 0
    for name, shape in ((n, s) for shapes in param_shapes for n, s in shapes.items()):
        size = math.prod(shape)
        piece = math.ceil(size / world)
        if offset + piece > flats[0].numel():
            raise CheckpointFileError(f"{folder}: the ZeRO-3 shards end before {name}: shards of another model?")
        state[name] = torch.cat([flat.narrow(0, offset, piece) for flat in flats])[:size].view(tuple(shape)).clone()
        offset += piece
    if offset != flats[0].numel():
        raise CheckpointFileError(f"{folder}: the parameters take {offset} values per rank, the shards hold "
                                  f"{flats[0].numel()}: shards of another model or world size?")
    return state


def zero_fp32_state(folder: Path, model_states: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The fp32 weights of a ZeRO-1/2/3 checkpoint folder (its optimizer shards' master copies), buffers
    from ``model_states`` (rank 0's model-states file), tied weights restored."""
    shards = _optimizer_shards(folder)
    stage = int(shards[0].get("zero_stage", 0))
    try:
        param_shapes = model_states["param_shapes"]
        buffers = {name: value.float() if value.is_floating_point() else value
                   for name, value in model_states["module"].items() if name in model_states["buffer_names"]}
        if model_states.get("frozen_param_shapes"):
            raise CheckpointFileError(f"{folder}: holds frozen parameters, which uniter-ds training never makes")
        merge = _zero3_params if stage == 3 else _zero12_params
        state = buffers | merge(shards, param_shapes, folder)
        for alias, source in model_states["shared_params"].items():
            if source in state:
                state[alias] = state[source]
    except (KeyError, TypeError, AttributeError, IndexError, RuntimeError) as error:
        raise CheckpointFileError(f"{folder}: not a DeepSpeed ZeRO-{stage} checkpoint this reader knows "
                                  f"({type(error).__name__}: {error})") from None
    return state
