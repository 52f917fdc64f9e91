"""Word-region alignment: batched, masked optimal transport by IPOT (Xie et al. 2018).

IPOT solves min_T <C, T> over plans with uniform marginals by proximal point iterations: each outer
step runs Sinkhorn-like scaling on Q = exp(-C / beta) * T_prev, so the plan converges to the exact
optimum (not to an entropic approximation) as the iterations go on. UNITER uses beta = 0.5,
50 outer iterations and k = 1 scaling step, with no gradient through the plan.

Everything is batched with a fixed iteration count: no data-dependent control flow, no host sync.
Padded rows/columns get zero marginal mass, hence zero plan entries.

Eagerly, the 50 iterations are ~450 small kernels (two batched mat-vecs and seven elementwise ops
each), every one a launch on a GPU. ``compiled=True`` runs them through ``torch.compile`` (one graph
for the whole loop, dynamic shapes): the elementwise ops fuse into the mat-vec reductions.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


def cosine_cost(text: Tensor, regions: Tensor) -> Tensor:
    """1 - cosine similarity, [B, m, d] x [B, n, d] -> [B, m, n]."""
    text = F.normalize(text, dim=-1, eps=1e-5)
    regions = F.normalize(regions, dim=-1, eps=1e-5)
    return 1.0 - text @ regions.transpose(1, 2)


@torch.no_grad()
def ipot_plan(
    cost: Tensor,
    row_mask: Tensor,
    col_mask: Tensor,
    beta: float = 0.5,
    iterations: int = 50,
    inner_steps: int = 1,
    round_to_marginals: bool = True,
    compiled: bool = False,
) -> Tensor:
    """Transport plan [B, m, n] between uniform marginals over the real rows and columns.

    cost: [B, m, n]; row_mask [B, m] / col_mask [B, n]: True on real positions.
    Computed in fp32 whatever the input dtype. ``round_to_marginals`` adds an exact projection onto
    the uniform marginals after the last iteration (the reference implementation stops without it).
    """
    cost = cost.float()
    rows, cols = row_mask.float(), col_mask.float()
    pair_mask = rows.unsqueeze(2) * cols.unsqueeze(1)
    # Uniform marginals over the real positions; padding carries no mass.
    row_mass = rows / rows.sum(1, keepdim=True).clamp(min=1)
    col_mass = cols / cols.sum(1, keepdim=True).clamp(min=1)
    # On padded entries the denominators below are 0; adding 1 there keeps the scaling at 0/1 = 0.
    row_pad, col_pad = 1.0 - rows, 1.0 - cols

    kernel = torch.exp(-cost / beta) * pair_mask
    iterate = _compiled_iterations() if compiled else _iterations
    plan = iterate(kernel, pair_mask, row_mass, col_mass, row_pad, col_pad, iterations, inner_steps)
    if round_to_marginals:
        plan = _round_to_marginals(plan, row_mass, col_mass)
    return plan


def _iterations(kernel: Tensor, plan: Tensor, row_mass: Tensor, col_mass: Tensor, row_pad: Tensor,
                col_pad: Tensor, iterations: int, inner_steps: int) -> Tensor:
    """IPOT's proximal steps: Sinkhorn scaling of Q = kernel * previous plan, ``inner_steps`` per step."""
    col_scale = col_mass
    for _ in range(iterations):
        q = kernel * plan
        for _ in range(inner_steps):
            row_scale = row_mass / (torch.bmm(q, col_scale.unsqueeze(2)).squeeze(2) + row_pad)
            col_scale = col_mass / (torch.bmm(q.transpose(1, 2), row_scale.unsqueeze(2)).squeeze(2) + col_pad)
        plan = row_scale.unsqueeze(2) * q * col_scale.unsqueeze(1)
    return plan


@functools.cache
def _compiled_iterations():  # -> the compiled _iterations, made at its first use (compiling costs seconds)
    return torch.compile(_iterations, dynamic=True)


def _round_to_marginals(plan: Tensor, row_mass: Tensor, col_mass: Tensor) -> Tensor:
    """Make the plan exactly feasible (Altschuler, Weed & Rigollet 2017, Algorithm 2).

    After 50 IPOT steps with k = 1 the column sums are exact but the row sums can be off by ~1%;
    shrink the rows and columns that carry too much, then spread the missing mass as a rank-one
    correction. The plan changes by at most the marginal error, and every padded entry stays 0.
    """
    tiny = torch.finfo(plan.dtype).tiny
    row_sum = plan.sum(2)
    plan = plan * torch.clamp(row_mass / row_sum.clamp(min=tiny), max=1.0).unsqueeze(2)
    col_sum = plan.sum(1)
    plan = plan * torch.clamp(col_mass / col_sum.clamp(min=tiny), max=1.0).unsqueeze(1)
    row_deficit = (row_mass - plan.sum(2)).clamp(min=0)
    col_deficit = (col_mass - plan.sum(1)).clamp(min=0)
    total = row_deficit.sum(1, keepdim=True).clamp(min=tiny).unsqueeze(2)
    return plan + row_deficit.unsqueeze(2) * col_deficit.unsqueeze(1) / total


def wra_distance(
    text_states: Tensor,
    region_states: Tensor,
    text_mask: Tensor,
    region_mask: Tensor,
    beta: float = 0.5,
    iterations: int = 50,
    inner_steps: int = 1,
    compiled: bool = False,
) -> Tensor:
    """Per-sample OT distance sum_ij C_ij T_ij [B]; the gradient reaches the states through C only."""
    cost = cosine_cost(text_states.float(), region_states.float())
    pair_mask = text_mask.unsqueeze(2) & region_mask.unsqueeze(1)
    cost = cost.masked_fill(~pair_mask, 0.0)
    plan = ipot_plan(cost.detach(), text_mask, region_mask, beta, iterations, inner_steps, compiled=compiled)
    return (cost * plan).sum(dim=(1, 2))
