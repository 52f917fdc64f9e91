"""IPOT against POT's exact solver, marginals, and where the gradient goes."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from uniter_ds.model import ipot_plan, wra_distance
from uniter_ds.model.ot import cosine_cost


def _masks(sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    max_m, max_n = max(m for m, _ in sizes), max(n for _, n in sizes)
    rows = torch.arange(max_m) < torch.tensor([m for m, _ in sizes]).unsqueeze(1)
    cols = torch.arange(max_n) < torch.tensor([n for _, n in sizes]).unsqueeze(1)
    return rows, cols


def _random_problem(sizes: list[tuple[int, int]], seed: int):
    """Costs uniform in [0, 2] (the range of 1 - cosine); padded entries hold garbage that must not matter."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = _masks(sizes)
    return 2 * torch.rand(len(sizes), rows.size(1), cols.size(1), generator=g), rows, cols


def _grounded_problem(sizes: list[tuple[int, int]], seed: int):
    """1 - cosine between word and region states that share latent classes: what WRA actually sees."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = _masks(sizes)
    prototypes = torch.randn(8, 64, generator=g)

    def states(count: int, length: int) -> torch.Tensor:
        classes = torch.randint(0, 8, (len(sizes), length), generator=g)
        return prototypes[classes] + 0.7 * torch.randn(len(sizes), length, 64, generator=g)

    return cosine_cost(states(len(sizes), rows.size(1)), states(len(sizes), cols.size(1))), rows, cols


def _check_against_emd(cost, rows, cols, plan, tolerance: float) -> list[float]:
    naive_errors = []
    for b in range(cost.size(0)):
        m, n = int(rows[b].sum()), int(cols[b].sum())
        real = cost[b, :m, :n]
        exact = ot.emd2(np.full(m, 1 / m), np.full(n, 1 / n), real.double().numpy())
        approx = float((real * plan[b, :m, :n]).sum())
        assert abs(approx - exact) / exact < tolerance, (m, n, approx, exact)
        naive_errors.append(abs(float(real.mean()) - exact) / exact)
        # Uniform marginals over the real positions, nothing on padding.
        np.testing.assert_allclose(plan[b, :m, :n].sum(1).numpy(), 1 / m, atol=1e-3)
        np.testing.assert_allclose(plan[b, :m, :n].sum(0).numpy(), 1 / n, atol=1e-3)
        assert plan[b, m:].abs().sum() == 0 and plan[b, :, n:].abs().sum() == 0
    return naive_errors


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ipot_matches_exact_emd_on_word_region_costs(seed):
    """The paper's setting (beta 0.5, 50 iterations, k 1) on realistic sizes, padded together."""
    sizes = [(5, 7), (12, 36), (20, 10), (3, 3), (30, 50), (60, 100), (2, 40)]
    cost, rows, cols = _grounded_problem(sizes, seed)
    naive_errors = _check_against_emd(cost, rows, cols, ipot_plan(cost, rows, cols), tolerance=0.02)
    # The test has power: the uniform plan (no optimisation at all) is far outside the tolerance.
    assert float(np.median(naive_errors)) > 0.3


@pytest.mark.parametrize("seed", [0, 1])
def test_ipot_converges_to_exact_emd_on_uniform_random_costs(seed):
    # Unstructured costs are the hard case: 50 iterations reach 2% up to ~30 x 50 ...
    small = [(5, 7), (12, 36), (20, 10), (3, 3), (30, 50), (2, 40)]
    cost, rows, cols = _random_problem(small, seed)
    _check_against_emd(cost, rows, cols, ipot_plan(cost, rows, cols), tolerance=0.025)
    # ... and at 60 x 100 it takes more proximal steps (50 steps: ~4% above exact), as IPOT should.
    cost, rows, cols = _random_problem([(60, 100), (40, 36)], seed)
    _check_against_emd(cost, rows, cols, ipot_plan(cost, rows, cols, iterations=200), tolerance=0.01)


def test_ipot_plan_does_not_depend_on_padding():
    cost, rows, cols = _random_problem([(6, 9), (15, 20)], seed=4)
    alone = ipot_plan(cost[:1, :6, :9], rows[:1, :6], cols[:1, :9])
    batched = ipot_plan(cost, rows, cols)
    torch.testing.assert_close(batched[0, :6, :9], alone[0], atol=1e-6, rtol=1e-5)


def test_gradient_flows_to_the_cost_only():
    cost, rows, cols = _random_problem([(4, 6), (7, 5)], seed=5)
    cost = cost.requires_grad_(True)
    plan = ipot_plan(cost, rows, cols)
    assert not plan.requires_grad
    (cost * plan).sum().backward()
    # d/dC sum(C * T) with T held constant is T itself: no term from differentiating the plan.
    torch.testing.assert_close(cost.grad, plan)


def test_wra_distance_reaches_the_states_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    text = torch.randn(2, 8, 16, generator=g, requires_grad=True)
    regions = torch.randn(2, 10, 16, generator=g, requires_grad=True)
    text_mask = torch.arange(8) < torch.tensor([[5], [8]])
    region_mask = torch.arange(10) < torch.tensor([[10], [4]])
    distance = wra_distance(text, regions, text_mask, region_mask)
    distance.sum().backward()
    assert distance.shape == (2,) and torch.all(distance > 0)
    assert text.grad[0, 5:].abs().sum() == 0 and regions.grad[1, 4:].abs().sum() == 0
    assert text.grad[0, :5].abs().sum() > 0 and regions.grad[1, :4].abs().sum() > 0
    alone = wra_distance(text[:1, :5], regions[:1], text_mask[:1, :5], region_mask[:1])
    torch.testing.assert_close(alone[0], distance[0], atol=1e-6, rtol=0)


def test_compiled_ipot_gives_the_eager_plan_in_fewer_kernels():
    """``compiled=True`` (model.compile / bench --compile): one graph for the 50 iterations, reused for
    a new shape (dynamic), the eager plan to fp32 rounding; the eager loop is ~450 kernel calls."""
    import torch._inductor.metrics as inductor_metrics
    from torch.profiler import ProfilerActivity, profile

    torch._dynamo.reset()  # count this test's compilation, not reuse of an earlier test's graph
    inductor_metrics.reset()
    for sizes, seed in (([(6, 9), (15, 20), (30, 70)], 6), ([(40, 12), (3, 90)], 7)):
        cost, rows, cols = _grounded_problem(sizes, seed)
        torch.testing.assert_close(ipot_plan(cost, rows, cols, compiled=True), ipot_plan(cost, rows, cols),
                                   atol=1e-7, rtol=1e-5)
    assert 0 < inductor_metrics.generated_kernel_count <= 150  # one graph, ~2 fused kernels per iteration
    with profile(activities=[ProfilerActivity.CPU]) as eager:
        ipot_plan(cost, rows, cols)
    assert sum(event.name in ("aten::bmm", "aten::mul", "aten::div", "aten::add") for event in eager.events()) > 400
    text, regions = torch.randn(2, 5, 16, requires_grad=True), torch.randn(2, 7, 16)
    masks = torch.ones(2, 5, dtype=torch.bool), torch.ones(2, 7, dtype=torch.bool)
    compiled_grad, eager_grad = (torch.autograd.grad(wra_distance(text, regions, *masks, compiled=c).sum(), text)[0]
                                 for c in (True, False))
    torch.testing.assert_close(compiled_grad, eager_grad, atol=1e-6, rtol=1e-5)
