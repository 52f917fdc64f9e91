"""State-dict conversion between this model and the original UNITER layout, and BERT initialisation.

The original layout (``UniterForPretraining`` of the authors' code, listed in
``tests/data/uniter-base-state-dict.txt``) names each of query/key/value separately and uses
BERT's module names; this model fuses query/key/value into one ``qkv`` projection and uses shorter
names. The table below is the whole difference. A Hugging Face BERT checkpoint uses the original
names too (with ``bert.`` where UNITER has ``uniter.``), so BERT initialisation goes through the
same table.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import UniterConfig
from .modeling import tied_parameter_names

logger = logging.getLogger(__name__)

# (this model's name, the original name) as key prefixes; {n} stands for a layer or module index.
_RENAMES: list[tuple[str, str]] = [
    ("uniter.encoder.layers.{n}.attn.out.", "uniter.encoder.layer.{n}.attention.output.dense."),
    ("uniter.encoder.layers.{n}.attn_norm.", "uniter.encoder.layer.{n}.attention.output.LayerNorm."),
    ("uniter.encoder.layers.{n}.ffn_in.", "uniter.encoder.layer.{n}.intermediate.dense."),
    ("uniter.encoder.layers.{n}.ffn_out.", "uniter.encoder.layer.{n}.output.dense."),
    ("uniter.encoder.layers.{n}.ffn_norm.", "uniter.encoder.layer.{n}.output.LayerNorm."),
    ("uniter.pooler.", "uniter.pooler.dense."),
    ("mlm_head.transform.0.", "cls.predictions.transform.dense."),
    ("mlm_head.transform.2.", "cls.predictions.transform.LayerNorm."),
    ("mlm_head.decoder.", "cls.predictions.decoder."),
    ("mlm_head.bias", "cls.predictions.bias"),
    ("mrfr_head.transform.{n}.", "feat_regress.net.{n}."),
    ("mrfr_head.regress.", "feat_regress."),
    # Before the transform rule: from the original side, net.3 must not read as transform.3.
    ("mrc_head.classifier.", "region_classifier.net.3."),
    ("mrc_head.transform.{n}.", "region_classifier.net.{n}."),
    ("itm_head.", "itm_output."),
]


def _compile(source: str, target: str) -> tuple[re.Pattern[str], str]:
    return re.compile(re.escape(source).replace(r"\{n\}", r"(\d+)")), target.replace("{n}", r"\1")


_TO_ORIGINAL = [_compile(ours, orig) for ours, orig in _RENAMES]
_FROM_ORIGINAL = [_compile(orig, ours) for ours, orig in _RENAMES]
_QKV = re.compile(r"uniter\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)")
_QKV_ORIGINAL = re.compile(r"uniter\.encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)")
_QKV_PARTS = ("query", "key", "value")


@dataclass
class LoadReport:
    """Keys the target model expected but did not get, and keys given that it has no place for."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"missing keys ({len(self.missing)}): {', '.join(self.missing) or '-'}",
                 f"unexpected keys ({len(self.unexpected)}): {', '.join(self.unexpected) or '-'}"]
        return "\n".join(lines)


def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, replacement in rules:
        match = pattern.match(key)
        if match:
            return match.expand(replacement) + key[match.end():]
    return key


def _prefixed(model: nn.Module) -> tuple[dict[str, Tensor], bool]:
    """The model's state dict in the pretraining key space (``uniter.`` prefix on the encoder)."""
    state = model.state_dict()
    has_heads = any(k.startswith("uniter.") for k in state)
    return (state if has_heads else {"uniter." + k: v for k, v in state.items()}), has_heads


def to_original_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """This model's weights under the original UNITER names and shapes.

    A :class:`UniterModel` gives the ``uniter.*`` keys only; a :class:`UniterForPretraining` adds the
    heads. Tied weights appear under both of their names, as in the original checkpoints.
    """
    state, _ = _prefixed(model)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        match = _QKV.fullmatch(key)
        if match:
            layer, kind = match.groups()
            for part, chunk in zip(_QKV_PARTS, value.chunk(3, dim=0)):
                out[f"uniter.encoder.layer.{layer}.attention.self.{part}.{kind}"] = chunk.clone()
        else:
            out[_rename(key, _TO_ORIGINAL)] = value
    return out


def _normalize_key(key: str) -> str:
    """Accept the variants seen in the wild: ``module.``/``model.`` prefixes, BERT's ``bert.`` prefix,
    bare BertModel keys, and the old TF-port LayerNorm names ``gamma``/``beta``."""
    for prefix in ("module.", "model."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    if key.startswith("bert."):
        key = "uniter." + key[len("bert."):]
    elif key.split(".")[0] in ("embeddings", "encoder", "pooler", "img_embeddings"):
        key = "uniter." + key
    key = re.sub(r"(LayerNorm|layer_norm)\.gamma$", r"\1.weight", key)
    return re.sub(r"(LayerNorm|layer_norm)\.beta$", r"\1.bias", key)


def from_original_state_dict(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, list[str]], list[str]]:
    """Original names -> this model's (pretraining key space).

    Returns the converted dict, where each converted key came from (the given names), and the given
    keys that could not be placed (incomplete query/key/value triples).
    """
    normalized = {_normalize_key(k): k for k in state}
    # Hugging Face's BertLMPredictionHead exposes its bias under two names; keep one.
    if "cls.predictions.decoder.bias" in normalized and "cls.predictions.bias" in normalized:
        del normalized["cls.predictions.decoder.bias"]
    out: dict[str, Tensor] = {}
    origin: dict[str, list[str]] = {}
    qkv: dict[tuple[str, str], dict[str, str]] = {}
    for key, given in normalized.items():
        if key == "cls.predictions.decoder.bias":
            key = "cls.predictions.bias"
        match = _QKV_ORIGINAL.fullmatch(key)
        if match:
            layer, part, kind = match.groups()
            qkv.setdefault((layer, kind), {})[part] = given
            continue
        new = _rename(key, _FROM_ORIGINAL)
        out[new], origin[new] = state[given], [given]
    leftover = []
    for (layer, kind), parts in qkv.items():
        if len(parts) == 3:
            new = f"uniter.encoder.layers.{layer}.attn.qkv.{kind}"
            out[new] = torch.cat([state[parts[p]] for p in _QKV_PARTS])
            origin[new] = [parts[p] for p in _QKV_PARTS]
        else:
            leftover += sorted(parts.values())
    return out, origin, leftover


def load_original_state_dict(model: nn.Module, state: dict[str, Tensor], strict: bool = True) -> LoadReport:
    """Load original-layout weights into ``model`` (a UniterModel or UniterForPretraining).

    A shape mismatch is an error naming the key. Missing keys (in this model's names) and unexpected
    keys (in the checkpoint's names) are reported; with ``strict`` either is an error. Tied weights are
    satisfied by either of their names and stay tied.
    """
    converted, origin, leftover = from_original_state_dict(state)
    _, has_heads = _prefixed(model)
    if not has_heads:  # an encoder-only model: its keys have no ``uniter.`` prefix
        converted = {(k[len("uniter."):] if k.startswith("uniter.") else "<head>" + k): v
                     for k, v in converted.items()}
        origin = {(k[len("uniter."):] if k.startswith("uniter.") else "<head>" + k): v for k, v in origin.items()}
    own = model.state_dict()
    for key, value in converted.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(f"shape mismatch for {key!r} (from {', '.join(origin[key])}): checkpoint has "
                             f"{tuple(value.shape)}, the model expects {tuple(own[key].shape)}")
    provided = set(converted) & set(own)
    missing = set(own) - provided
    for group in tied_parameter_names(model):
        if group & provided:
            missing -= group
    unexpected = [name for key in set(converted) - set(own) for name in origin[key]] + leftover
    report = LoadReport(missing=sorted(missing), unexpected=sorted(unexpected))
    if strict and (report.missing or report.unexpected):
        raise ValueError(f"checkpoint does not match the model:\n{report}")
    loadable = {k: v for k, v in converted.items() if k in own}
    # Tied names: load each shared tensor once, from whichever name the checkpoint provided.
    for group in tied_parameter_names(model):
        for extra in sorted(group & set(loadable))[1:]:
            del loadable[extra]
    model.load_state_dict(loadable, strict=False)
    return report


def _read_weights(folder: Path) -> dict[str, Tensor]:
    safetensors_file, bin_file = folder / "model.safetensors", folder / "pytorch_model.bin"
    if safetensors_file.exists():
        from safetensors.torch import load_file

        return load_file(str(safetensors_file))
    if bin_file.exists():
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin")


_BERT_MUST_MATCH = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "max_position_embeddings", "type_vocab_size")


def load_bert_weights(model: nn.Module, folder: str | Path) -> LoadReport:
    """Initialise the text side (and the encoder) of ``model`` from a Hugging Face BERT folder,
    as the paper did. ``BertModel`` and ``BertForPreTraining`` weights are both accepted; the MLM
    head is taken from ``cls.predictions`` when present. Everything else is reported by name."""
    folder = Path(folder)
    config: UniterConfig = model.config
    config_file = folder / "config.json"
    if config_file.exists():
        bert_config = json.loads(config_file.read_text())
        for key in _BERT_MUST_MATCH:
            if key in bert_config and bert_config[key] != getattr(config, key):
                raise ValueError(f"{config_file}: {key} is {bert_config[key]}, "
                                 f"but the UNITER config has {getattr(config, key)}")
    state = _read_weights(folder)
    # Buffers of the HF module, not weights.
    state = {k: v for k, v in state.items() if not k.endswith(("position_ids", "token_type_ids"))}
    report = load_original_state_dict(model, state, strict=False)
    logger.info("initialised from BERT at %s\n%s", folder, report)
    return report
