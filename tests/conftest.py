from __future__ import annotations

import pytest

from uniter_ds.model import UniterConfig

# Module fixtures that train a run (or prepare data) once for several tests: under pytest-xdist
# (`bash launch/dev.sh test` runs two test processes) the tests that read one stay in one process.
SHARED_FIXTURES = ("straight_run", "checkpoints", "straight_16_steps", "damaged", "inputs")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        shared = [name for name in SHARED_FIXTURES if name in getattr(item, "fixturenames", ())]
        if shared:
            item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}.{shared[0]}"))


@pytest.fixture
def tiny_config() -> UniterConfig:
    # No dropout: the tests compare exact outputs.
    return UniterConfig.from_preset("tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


