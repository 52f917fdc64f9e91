from __future__ import annotations

import pytest

from uniter_ds.model import UniterConfig


@pytest.fixture
def tiny_config() -> UniterConfig:
    # No dropout: the tests compare exact outputs.
    return UniterConfig.from_preset("tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


