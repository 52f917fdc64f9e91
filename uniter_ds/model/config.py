"""UNITER model configuration: a Hugging Face ``PretrainedConfig`` (model_type ``uniter``), validated
at construction.

The field names follow the original UNITER / BERT json configs (``uniter-base.json``), so a config
written by the original code loads here unchanged, and one written here loads there. This file has no
import from ``uniter_ds``: it travels with exported weights, where ``AutoConfig`` loads it as remote code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

# The model's own fields and their defaults (UNITER-base's, text side as bert-base-cased).
UNITER_FIELDS: dict[str, Any] = {
    "vocab_size": 28996, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 2,
    "initializer_range": 0.02, "layer_norm_eps": 1e-12, "img_dim": 2048, "img_label_dim": 1601, "img_pos_dim": 7,
}
# Keys a config file may carry besides those: Hugging Face's own (written by save_pretrained, or by the
# original code's transformers), accepted on load. Anything else is refused by name: a misspelt override
# must not pass silently.
_HF_KEYS = {
    "_name_or_path", "architectures", "auto_map", "chunk_size_feed_forward", "dtype", "torch_dtype", "id2label",
    "label2id", "num_labels", "is_encoder_decoder", "model_type", "output_attentions", "output_hidden_states",
    "problem_type", "return_dict", "tie_word_embeddings", "transformers_version", "classifier_dropout",
    "pad_token_id", "bos_token_id", "eos_token_id",
}


class UniterConfig(PretrainedConfig):
    model_type = "uniter"

    def __init__(
        self,
        vocab_size: int = 28996,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-12,
        img_dim: int = 2048,
        img_label_dim: int = 1601,
        img_pos_dim: int = 7,
        classifier_dropout: float | None = None,
        tie_word_embeddings: bool = True,  # the MLM decoder is the word embedding table
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.img_dim = img_dim
        self.img_label_dim = img_label_dim
        self.img_pos_dim = img_pos_dim
        self.classifier_dropout = classifier_dropout
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(**kwargs)
        self._check()

    def _check(self) -> None:
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

    def model_fields(self) -> dict[str, Any]:
        """The architecture alone (no Hugging Face bookkeeping): what the original code's json holds."""
        return {name: getattr(self, name) for name in UNITER_FIELDS}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UniterConfig) and self.model_fields() == other.model_fields()

    __hash__ = None  # mutable, compared by value

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> UniterConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], source: str = "config", **kwargs: Any) -> Any:
        """As ``PretrainedConfig.from_dict``, but a key that is neither a model field nor one of Hugging
        Face's own is an error naming it (``source``: where the values came from, for the message)."""
        unknown = sorted(set(config_dict) - set(UNITER_FIELDS) - _HF_KEYS)
        if unknown:
            raise ValueError(f"{source}: unknown UniterConfig key(s) {unknown}; known keys are "
                             f"{sorted(UNITER_FIELDS)}")
        return super().from_dict(dict(config_dict), **kwargs)

    @classmethod
    def from_json_file(cls, path: str | Path) -> UniterConfig:
        with open(path) as f:
            return cls.from_dict(json.load(f), source=str(path))

    def to_json_file(self, path: str | Path, use_diff: bool = False) -> None:
        """Every field, not only those that differ from the defaults (the original code reads this file too)."""
        super().to_json_file(path, use_diff=use_diff)


# Text side as bert-base-cased / bert-large-cased; image side as the released UNITER checkpoints.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=128, img_dim=64, img_label_dim=41,
    ),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}
