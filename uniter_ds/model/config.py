"""UNITER model configuration: a typed dataclass, validated at construction.

The field names follow the original UNITER / BERT json configs (``uniter-base.json``), so a config
written by the original code loads here unchanged, and one written here loads there.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Fields of the original config files that this model does not use; accepted on load, then dropped.
_IGNORED_ORIGINAL_KEYS = {"architectures", "model_type", "transformers_version", "torch_dtype", "dtype"}


@dataclass
class UniterConfig:
    vocab_size: int = 28996
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    img_dim: int = 2048
    img_label_dim: int = 1601
    img_pos_dim: int = 7

    def __post_init__(self) -> None:
        positive_ints = (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "img_dim", "img_label_dim", "img_pos_dim",
        )
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"UniterConfig.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.type_vocab_size, int) or self.type_vocab_size < 2:
            raise ValueError(
                f"UniterConfig.type_vocab_size must be >= 2 (type 0 = text, type 1 = image), "
                f"got {self.type_vocab_size!r}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"UniterConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"UniterConfig.{name} must be in [0, 1), got {value!r}")
        for name in ("initializer_range", "layer_norm_eps"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"UniterConfig.{name} must be a positive number, got {value!r}")
        if self.hidden_act != "gelu":
            raise ValueError(f"UniterConfig.hidden_act: only 'gelu' (erf form) is supported, got {self.hidden_act!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> UniterConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> UniterConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known - _IGNORED_ORIGINAL_KEYS)
        if unknown:
            raise ValueError(f"{source}: unknown UniterConfig key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_json_file(cls, path: str | Path) -> UniterConfig:
        with open(path) as f:
            return cls.from_dict(json.load(f), source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


# Text side as bert-base-cased / bert-large-cased; image side as the released UNITER checkpoints.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=128, img_dim=64, img_label_dim=41,
    ),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
