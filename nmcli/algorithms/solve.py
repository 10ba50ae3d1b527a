"""One layer's calibrated solve: magnitude, Wanda or SparseGPT, chosen by ``--method``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from nmcli.algorithms.config import CALIBRATED_KINDS, CalibrationConfig, LayerOutcome, Solved, Solver
from nmcli.algorithms.parallel import SERIAL, Workers
from nmcli.algorithms.sparsegpt import SOLVE_DTYPE, error_terms, row_slices, solve_rows, solve_sparsegpt
from nmcli.algorithms.statistics import Segment, from_matrix, to_matrix
from nmcli.models.layers import LayerCandidate
from nmcli.nm.masks import nm_mask
from nmcli.nm.pattern import Pattern


def wanda_mask(weight: torch.Tensor, gram: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Wanda: keep the N largest ``|W_ij| * ||X_j||_2`` of every group of M columns (``weight`` ``[rows, cols]``)."""
    column_norms = gram.diagonal().clamp_min(0).sqrt()
    score = weight.to(torch.float64).abs() * column_norms.unsqueeze(0)
    return nm_mask(score, pattern, 1)


def _masked(part: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, part, torch.zeros((), dtype=part.dtype, device=part.device))


def _magnitude_mask(weight: torch.Tensor, gram: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    return nm_mask(weight, pattern, 1)


def _mask_only(choose: Callable[[torch.Tensor, torch.Tensor, Pattern], torch.Tensor]) -> Solver:
    """A solver that keeps the weights ``choose(weights, gram, pattern)`` masks, unchanged (magnitude, Wanda)."""

    def solve(
        part: torch.Tensor, gram: torch.Tensor, pattern: Pattern, cfg: CalibrationConfig, workers: Workers = SERIAL
    ) -> Solved:
        gram = gram.to(SOLVE_DTYPE)

        def task(rows: slice) -> tuple[slice, torch.Tensor, torch.Tensor, float, float]:
            dense = solve_rows(part, rows)
            mask = choose(dense, gram, pattern)
            new = _masked(dense, mask)
            return rows, mask, new, *error_terms(dense, new, gram)

        return workers.map(task, row_slices(part))

    return solve


# The one registry of pruning methods: each solves one weight matrix ``[rows, cols]`` (columns in
# N:M groups) from its inputs' Gram matrix, a slice of rows at a time (:data:`Solved`).
SOLVERS: dict[str, Solver] = {
    "magnitude": _mask_only(_magnitude_mask),
    "wanda": _mask_only(wanda_mask),
    "sparsegpt": solve_sparsegpt,
}
# Methods that need calibration data.
CALIBRATED = frozenset({"wanda", "sparsegpt"})


def solve_layer(
    weight: torch.Tensor,
    cand: LayerCandidate,
    segments: Sequence[Segment],
    pattern: Pattern,
    method: str,
    cfg: CalibrationConfig,
    workers: Workers = SERIAL,
) -> LayerOutcome:
    """Prune one weight with ``method`` from its input statistics (magnitude when none reached it).

    Slices of the weight's rows are solved on ``workers`` (the same result with any number of them).
    """
    if cand.kind not in CALIBRATED_KINDS:
        mask = nm_mask(weight, pattern, cand.axis)
        return LayerOutcome(mask, weight, None, f"{cand.kind} weights are pruned by magnitude (no calibrated solver)")
    if not segments or any(seg.gram is None for seg in segments):
        mask = nm_mask(weight, pattern, cand.axis)
        return LayerOutcome(mask, weight, None, "no calibration input reached it: magnitude")
    matrix = to_matrix(weight.detach(), cand.kind)
    masks = torch.zeros(matrix.shape, dtype=torch.bool)
    updated = torch.empty(matrix.shape, dtype=weight.dtype, device=matrix.device)
    num = den = 0.0
    for seg in segments:
        seg_masks, seg_updated = masks[seg.rows], updated[seg.rows]
        # the statistics are used once: only the solver holds them, and frees them with this layer
        for rows, mask, new, seg_num, seg_den in SOLVERS[method](
            matrix[seg.rows], seg.take(matrix.device), pattern, cfg, workers
        ):
            seg_masks[rows], seg_updated[rows] = mask.cpu(), new.to(weight.dtype)
            num, den = num + seg_num, den + seg_den
    full_mask = from_matrix(masks, cand.kind, cand.shape)
    new_weight = from_matrix(updated, cand.kind, cand.shape)
    return LayerOutcome(full_mask, new_weight, num / den if den > 0 else 0.0)
