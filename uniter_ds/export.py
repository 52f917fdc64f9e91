"""Export trained weights for fine-tuning, and import what users already have.

``uniter-ds export CHECKPOINT --out DIR`` reads a DeepSpeed checkpoint of any ZeRO stage (shards are
consolidated on the CPU, no launcher, by checkpoint_files.py, which runs no code from the files) or a plain
state dict, and writes ``DIR/hf`` (config.json + model.safetensors, tokenizer files, a model card) and/or ``DIR/uniter``
(one .pt with the original UNITER names + the original-style json config). Everything is written into
``DIR.tmp``, reloaded and compared with the source weights on a probe batch, and only then renamed to
``DIR``: a failure leaves no output folder.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .checkpoint_files import CheckpointFileError, load_pt, zero_fp32_state
from .model import (
    UniterConfig,
    UniterForPretraining,
    UniterModel,
    build_batch,
    load_original_state_dict,
    to_original_state_dict,
)
from .model.config import UNITER_FIELDS
from .model.modeling import tied_parameter_names
from .run_layout import find_resume_point, passed_over

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
logger = logging.getLogger(__name__)


class ExportError(ValueError):
    pass


@dataclass
class Source:
    """Weights (fp32, this model's names) and what is known about how they were trained."""

    state: dict[str, torch.Tensor]
    config: UniterConfig
    step: int | None = None
    experiment: dict[str, Any] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    origin: str = ""
    passed_over: list[str] = field(default_factory=list)  # newer checkpoints not taken, and why


def _experiment_model_config(experiment: dict[str, Any]) -> UniterConfig:
    model = experiment.get("model", {})
    if model.get("config_file"):
        return UniterConfig.from_dict(UniterConfig.from_json_file(model["config_file"]).to_dict()
                                      | model.get("overrides", {}))
    return UniterConfig.from_preset(model.get("preset", "base"), **model.get("overrides", {}))


def read_deepspeed_checkpoint(path: Path) -> Source:
    """A run directory, its ``checkpoints`` folder, or one checkpoint (tag) folder."""
    if (path / "checkpoints").is_dir():  # a run directory
        path = path / "checkpoints"
    try:
        folder = find_resume_point(path)
    except FileNotFoundError as error:  # a tag folder given, incomplete or damaged
        raise ExportError(str(error)) from None
    if folder is None:
        reasons = passed_over(path, None)
        raise ExportError(f"{path}: no complete, undamaged checkpoint found (a checkpoint folder has complete.json)"
                          + (f": {'; '.join(reasons)}" if reasons else ""))
    model_files = sorted(folder.glob("*mp_rank_00_model_states.pt"))
    if not model_files:
        raise ExportError(f"{folder}: no mp_rank_00_model_states.pt: not a DeepSpeed checkpoint, or an incomplete one")
    try:
        meta = load_pt(model_files[0])
        experiment = meta.get("config") or {}
        if not experiment:
            raise ExportError(f"{folder}: the checkpoint carries no experiment config (not written by uniter-ds "
                              f"pretrain)")
        stage = int(meta.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
        state = zero_fp32_state(folder, meta) if stage >= 1 else meta["module"]
    except CheckpointFileError as error:
        raise ExportError(str(error)) from None
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise ExportError(f"{model_files[0]}: not a DeepSpeed model-states file written by uniter-ds pretrain "
                          f"({type(error).__name__}: {error})") from None
    state = {k: v.float() for k, v in state.items()}
    result_file = folder.parent.parent / "result.json"
    eval_metrics = json.loads(result_file.read_text()).get("eval", {}) if result_file.exists() else {}
    return Source(state, _experiment_model_config(experiment), meta.get("step"), experiment, eval_metrics,
                  str(folder), passed_over(folder.parent, folder))


def read_state_dict_file(path: Path, config_file: Path | None) -> Source:
    if config_file is None:
        raise ExportError(f"{path}: a plain state dict needs --config (a UNITER json config)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = load_pt(path)
    except CheckpointFileError as error:
        raise ExportError(str(error)) from None
    except Exception as error:  # noqa: BLE001 - safetensors raises its own kinds for a damaged file
        raise ExportError(f"{path}: cannot be read ({error})") from error
    if "module" in state and isinstance(state["module"], dict):
        state = state["module"]
    config = UniterConfig.from_json_file(config_file)
    model = UniterForPretraining(config)
    if any(".attention.self." in k for k in state):  # original names
        report = load_original_state_dict(model, state, strict=False)
        if report.missing:
            raise ExportError(f"{path}: missing weights {report.missing}")
        state = model.state_dict()
    return Source({k: v.float() for k, v in state.items()}, config, origin=str(path))


def read_source(checkpoint: str | Path, config_file: str | Path | None = None) -> Source:
    path = Path(checkpoint)
    if not path.exists():
        raise ExportError(f"{path}: does not exist")
    if path.is_file():
        return read_state_dict_file(path, Path(config_file) if config_file else None)
    return read_deepspeed_checkpoint(path)


def build_from(source: Source) -> UniterForPretraining:
    model = UniterForPretraining(source.config)
    missing, unexpected = model.load_state_dict(source.state, strict=False)
    tied = {n for group in tied_parameter_names(model) for n in group}
    if unexpected or set(missing) - tied:
        raise ExportError(f"{source.origin}: weights do not match the model: missing {sorted(set(missing) - tied)}, "
                          f"unexpected {sorted(unexpected)}")
    return model.eval()


def probe_batch(config: UniterConfig, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(5, config.vocab_size, (n,), generator=g) for n in (7, 12, 4)]
    feats = [torch.rand(n, config.img_dim, generator=g) for n in (5, 3, 9)]
    pos = [torch.rand(n, config.img_pos_dim, generator=g) for n in (5, 3, 9)]
    return build_batch(ids, feats, pos)


TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "vocab.txt")


def _training_datasets(experiment: dict[str, Any]) -> list[tuple[str, Any]]:
    """Each training dataset's origin (its folder, or folder URL) and manifest, resolved as the ranks
    resolved them (folders, globs, brace ranges, URLs); a dataset that is gone is left out."""
    from .data import DataError, resolve_sources

    found = []
    for dataset in experiment.get("data", {}).get("train", []):
        try:
            shards = resolve_sources(dataset.get("paths", []))
        except (DataError, OSError) as error:
            logger.warning("export: training data %s not readable here (%s)", dataset.get("paths"), error)
            continue
        found.append((shards[0].origin, shards[0].manifest))
    return found


def _file_beside(origin: str, name: str) -> bytes | None:
    """A file beside a dataset's shards (a local folder or a URL); None when there is none."""
    from .data import DataError
    from .data import sources as remote

    local = remote.local_path(origin)
    if local is not None:
        return (local / name).read_bytes() if (local / name).is_file() else None
    try:
        return remote.read_bytes(origin.rstrip("/") + "/" + name)
    except DataError:
        return None


def _export_tokenizer(datasets: list[tuple[str, Any]], out: Path) -> dict[str, Any] | None:
    """The training data's tokenizer as a Hugging Face tokenizer in ``out`` (``AutoTokenizer`` loads it):
    the tokenizer folder a conversion saved (``DATASET/tokenizer``), or a WordPiece tokenizer over the
    dataset's ``vocab.txt`` with its casing; local or remote datasets alike. Checked against the ids the
    captions were written with. Returns the manifest's tokenizer description, or None when the data
    is not readable here."""
    import dataclasses
    import tempfile

    from transformers import AutoTokenizer, BertTokenizer

    for origin, manifest in datasets:
        info = manifest.tokenizer
        raw = json.loads(json.dumps(dataclasses.asdict(info)))
        (out / "tokenizer_info.json").write_text(json.dumps(raw, indent=2) + "\n")
        saved = {name: _file_beside(origin, f"tokenizer/{name}") for name in TOKENIZER_FILES}
        vocab = _file_beside(origin, "vocab.txt")
        if saved["tokenizer_config.json"] is not None:
            with tempfile.TemporaryDirectory() as folder:
                for name, data in saved.items():
                    if data is not None:
                        (Path(folder) / name).write_bytes(data)
                tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        elif vocab is not None:
            words = vocab.decode().splitlines()
            tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)},
                                      do_lower_case=info.guess_lowercase(), unk_token="[UNK]")
        else:
            return raw | {"exported": False}
        expected = {"cls": info.cls_id, "sep": info.sep_id, "mask": info.mask_id, "pad": info.pad_id}
        got = {"cls": tokenizer.cls_token_id, "sep": tokenizer.sep_token_id, "mask": tokenizer.mask_token_id,
               "pad": tokenizer.pad_token_id}
        if got != expected:
            raise ExportError(f"{origin}: the tokenizer's special token ids {got} differ from the ids the "
                              f"captions were written with {expected} (manifest.json)")
        tokenizer.save_pretrained(str(out))
        return raw | {"exported": True}
    return None


def _model_card(source: Source, heads: bool, dtype: str, tokenizer: dict[str, Any] | None,
                training_data: list[tuple[str, Any]]) -> str:
    """README.md with Hugging Face model-card metadata (library, tags, datasets, held-out metrics)."""
    experiment, config = source.experiment, source.config
    datasets = [manifest.name for _, manifest in training_data]
    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "feature-extraction",
                            "tags": ["uniter", "uniter-ds", "vision-language", "image-text", "custom_code"]}
    if datasets:
        meta["datasets"] = sorted(set(datasets))
    if source.eval_metrics:
        metrics = [{"type": k, "name": k, "value": round(float(v), 6)} for k, v in sorted(source.eval_metrics.items())]
        meta["model-index"] = [{"name": "uniter", "results": [{
            "task": {"type": "image-text-pretraining", "name": "held-out pretraining tasks"}, "metrics": metrics}]}]
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# UNITER ({'with pretraining heads' if heads else 'encoder'})", "",
             "Exported by uniter-ds from " + (source.origin or "a state dict") + ".", "",
             f"- architecture: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
             f"{config.num_attention_heads} heads; image features {config.img_dim}-d, "
             f"{config.img_label_dim} detector classes",
             f"- weights: {dtype}; training step: {source.step if source.step is not None else 'unknown'}"]
    if tokenizer:
        lines.append(f"- tokenizer: {tokenizer['name']} (vocab sha256 {tokenizer['vocab_sha256'][:16]}...)"
                     + ("" if tokenizer.get("exported") else "; NOT included: the training data carries no vocabulary"))
    if experiment:
        train = experiment.get("data", {}).get("train", [])
        lines.append("- data: " + "; ".join(f"{d['name']} {d['paths']} tasks {d['tasks']}" for d in train))
    if source.eval_metrics:
        lines += ["", "## Held-out evaluation at the end of training", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in sorted(source.eval_metrics.items())]
    lines += ["", "## Load", "", "With `transformers` alone (the modeling code travels in this folder):", "",
              "```python", "from transformers import AutoModel, AutoTokenizer",
              'model = AutoModel.from_pretrained("PATH/hf", trust_remote_code=True)',
              'tokenizer = AutoTokenizer.from_pretrained("PATH/hf")',
              "out = model(input_ids=..., attention_mask=..., img_feat=..., img_pos=..., img_attention_mask=...)",
              "out.last_hidden_state, out.pooler_output", "```", "",
              "`AutoModelForSequenceClassification` (with `num_labels=...`) gives a classifier over the pooled "
              "state that `transformers.Trainer` fine-tunes; with uniter-ds installed, "
              "`uniter_ds.model.UniterModel.from_pretrained` loads the same folder."]
    if experiment:
        lines += ["", "## Training config", "", "```yaml", yaml.safe_dump(experiment, sort_keys=False).strip(), "```"]
    return "\n".join(lines) + "\n"


@torch.no_grad()
def _outputs(model: torch.nn.Module, batch) -> torch.Tensor:
    encoder = model.uniter if isinstance(model, UniterForPretraining) else model
    return encoder(batch).sequence_output.float()


def export(checkpoint: str | Path, out: str | Path, *, fmt: str = "both", dtype: str = "fp32", heads: bool = False,
           config_file: str | Path | None = None, overwrite: bool = False,
           max_shard_bytes: int = 5 * 2**30, training_data: list[tuple[str, Any]] | None = None) -> dict[str, Any]:
    """Trained weights -> ``out/hf`` and/or ``out/uniter``, verified by reloading. ``training_data``: each
    training dataset's (origin, manifest) where the caller resolved them already (a pretraining job's
    end); else they are resolved from the checkpoint's config."""
    if fmt not in ("hf", "uniter", "both"):
        raise ExportError(f"--format must be hf, uniter or both, got {fmt!r}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {list(DTYPES)}, got {dtype!r}")
    out = Path(out)
    _check_out(out, overwrite)
    source = read_source(checkpoint, config_file)
    full = build_from(source)
    model: torch.nn.Module = full if heads else _encoder_of(full)
    tmp = _partial_folder(out, Path(source.origin))
    warnings: list[str] = [f"not the newest checkpoint: {reason}" for reason in source.passed_over]
    try:
        batch = probe_batch(source.config)
        reference = _outputs(model, batch)
        tolerance = 1e-5 if dtype == "fp32" else 5e-2
        written: dict[str, str] = {}
        if fmt in ("hf", "both"):
            hf = tmp / "hf"
            model.to(DTYPES[dtype]).save_pretrained(hf, max_shard_size=max_shard_bytes)
            model.float()
            if training_data is None:
                training_data = _training_datasets(source.experiment)  # remote manifests: fetched once
            tokenizer = _export_tokenizer(training_data, hf)
            if tokenizer is None:
                warnings.append("no tokenizer exported: the training data is not readable from here (its manifest "
                                "names the tokenizer)")
            elif not tokenizer["exported"]:
                warnings.append("no tokenizer exported: the training data carries no vocabulary (convert with "
                                "--vocab or --tokenizer to include one)")
            (hf / "README.md").write_text(_model_card(source, heads, dtype, tokenizer, training_data))
            reloaded = (UniterForPretraining if heads else UniterModel).from_pretrained(hf).float().eval()
            _check(reference, _outputs(reloaded, batch), tolerance, "hf")
            written["hf"] = str(out / "hf")
        if fmt in ("uniter", "both"):
            folder = tmp / "uniter"
            folder.mkdir()
            state = {k: v.to(DTYPES[dtype]) for k, v in to_original_state_dict(model).items()}
            name = _original_name(source.config)
            torch.save(state, folder / f"{name}.pt")
            # Every architecture key, the image dims included: the original code reads the json's keys
            # as they are, and uniter-ds import-uniter reads them back.
            config = source.config.model_fields()
            (folder / f"{name}.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            if not heads:
                warnings.append("the original-layout checkpoint has no itm_output: the original retrieval "
                                "fine-tuning (train_itm.py) initialises its rank head from it and would start "
                                "that head from random weights; export with --heads for retrieval")
            reloaded = (UniterForPretraining if heads else UniterModel)(source.config).eval()
            report = load_original_state_dict(reloaded, torch.load(folder / f"{name}.pt", weights_only=True))
            assert not report.missing and not report.unexpected
            _check(reference, _outputs(reloaded.float(), batch), tolerance, "uniter")
            written["uniter"] = str(out / "uniter" / f"{name}.pt")
        _replace_with(out, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for warning in warnings:
        logger.warning("export %s: %s", out, warning)
    return {"out": str(out), "written": written, "step": source.step, "dtype": dtype, "heads": heads,
            "warnings": warnings}


# In OUT.tmp while an export or import writes it: the only kind of folder either ever deletes unasked.
PARTIAL_MARKER = ".uniter-ds-partial"


def _check_out(out: Path, overwrite: bool) -> None:
    """Before anything is read: an ``--out`` that is a file, or that exists without ``--overwrite``."""
    if out.is_file():
        raise ExportError(f"--out {out}: is a file; expected a folder to write (nothing was changed)")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists (pass --overwrite to replace it)")


def _partial_folder(out: Path, source: Path) -> Path:
    """``OUT.tmp``, made anew and marked as ours. Refused: an ``OUT`` (or ``OUT.tmp``) that is, contains or lies
    inside the source (``--overwrite`` would delete what is being read), and an ``OUT.tmp`` this package did
    not make (someone's folder, not ours to delete)."""
    tmp = out.with_name(out.name + ".tmp")
    read = source.resolve()
    for target in (out, tmp):
        where = target.resolve()
        relation = ("is" if where == read else "contains" if read.is_relative_to(where)
                    else "lies inside" if where.is_relative_to(read) else None)
        if relation:
            raise ExportError(f"--out {out}: {target} {relation} the source {source}; write the export elsewhere "
                              f"(nothing was changed)")
    if tmp.exists() or tmp.is_symlink():
        if not (tmp.is_dir() and not tmp.is_symlink() and (tmp / PARTIAL_MARKER).is_file()):
            raise ExportError(f"{tmp} exists and is not a folder an interrupted export left (no {PARTIAL_MARKER} in "
                              f"it): move it away (nothing was changed)")
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / PARTIAL_MARKER).write_text(f"being written for {out}; an interrupted export or import leaves it\n")
    return tmp


def _replace_with(out: Path, tmp: Path) -> None:
    """The finished ``tmp`` becomes ``out`` (an existing ``out`` is replaced: ``--overwrite`` was given)."""
    (tmp / PARTIAL_MARKER).unlink()
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)


def _encoder_of(full: UniterForPretraining) -> UniterModel:
    encoder = UniterModel(full.config)
    encoder.load_state_dict(full.uniter.state_dict())
    return encoder.eval()


def _original_name(config: UniterConfig) -> str:
    for preset in ("base", "large"):
        reference = UniterConfig.from_preset(preset)
        if (config.hidden_size, config.num_hidden_layers) == (reference.hidden_size, reference.num_hidden_layers):
            return f"uniter-{preset}"
    return "uniter"


def _check(reference: torch.Tensor, reloaded: torch.Tensor, tolerance: float, fmt: str) -> None:
    difference = float((reference - reloaded).abs().max())
    if not difference <= tolerance:
        raise ExportError(f"export verification failed for {fmt}: outputs of the reloaded weights differ by "
                          f"{difference:.3g} (> {tolerance})")


def import_uniter(file: str | Path, config_file: str | Path, out: str | Path, *, overwrite: bool = False) -> dict:
    """An original UNITER checkpoint (pretrained or ``*-init.pt``) -> a folder ``from_pretrained`` loads and
    ``pretrain`` can start from (``model.init_from: hf:OUT``). Every missing/unexpected key is reported."""
    file, out = Path(file), Path(out)
    _check_out(out, overwrite)
    try:
        state = load_pt(file)
    except CheckpointFileError as error:
        raise ExportError(str(error)) from None
    raw = json.loads(Path(config_file).read_text())
    config = UniterConfig.from_dict({k: v for k, v in raw.items() if k in UNITER_FIELDS}, source=str(config_file))
    model = UniterForPretraining(config)
    report = load_original_state_dict(model, state, strict=False)
    tmp = _partial_folder(out, file)
    try:
        model.save_pretrained(tmp)
        (tmp / "import_report.json").write_text(json.dumps({"source": str(file), "missing": report.missing,
                                                            "unexpected": report.unexpected}, indent=2) + "\n")
        _replace_with(out, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "missing": report.missing, "unexpected": report.unexpected}


def load_encoder(path: str | Path, config_file: str | Path | None = None) -> UniterModel:
    """The encoder of anything this project writes: a ``save_pretrained``/export folder (``config.json``
    + safetensors), a run's export (``RUN/export/hf``), a run directory or DeepSpeed checkpoint folder,
    or a state dict file (with ``config_file``)."""
    path = Path(path)
    for folder in (path, path / "hf", path / "export" / "hf"):
        if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
            return UniterModel.from_pretrained(folder).eval()
    return _encoder_of(build_from(read_source(path, config_file))).eval()
