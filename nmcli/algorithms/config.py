"""Calibrated pruning settings and the per-layer outcome every solver returns."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from nmcli.errors import InputError
from nmcli.models.layers import CONV, HF_CONV1D, LINEAR, MHA
from nmcli.nm.pattern import Pattern

if TYPE_CHECKING:
    from nmcli.algorithms.parallel import Workers

DEFAULT_CALIB_SAMPLES = 128
DEFAULT_DAMP = 0.01
DEFAULT_BLOCK_SIZE = 128
CALIB_BATCH_SIZE = 16
# Conjugate-gradient steps of the kept-weight refit: on MiniLM 2:4, 10 steps hold out as well as 50
# (embedding cosine 0.887-0.889 against 0.885) at a fifth of the cost (issue 24).
DEFAULT_REFIT_ITERATIONS = 10
# Layer kinds whose inputs the hooks can collect; others (3-D expert stacks) fall back to magnitude.
CALIBRATED_KINDS = frozenset({LINEAR, CONV, HF_CONV1D, MHA})


@dataclass
class CalibrationConfig:
    """Options of a calibrated prune (``nmcli prune --calib ...``)."""

    spec: str
    samples: int = DEFAULT_CALIB_SAMPLES
    max_length: int = 128
    damp: float = DEFAULT_DAMP
    block_size: int = DEFAULT_BLOCK_SIZE
    bn_recalibrate: bool = True
    device: str = "cpu"
    batch_size: int = CALIB_BATCH_SIZE
    seed: int = 0
    refit_iterations: int = DEFAULT_REFIT_ITERATIONS

    def validate(self) -> None:
        """Reject out-of-range values before any work is done.

        Raises:
            InputError: an option is out of range.
        """
        problems = []
        if self.samples < 1:
            problems.append("--calib-samples must be at least 1")
        if self.max_length < 1:
            problems.append("--max-length must be at least 1")
        if not math.isfinite(self.damp) or not 0 <= self.damp <= 10:
            problems.append(
                f"--damp {self.damp} is out of range: give a fraction of the mean Hessian diagonal in [0, 10]"
            )
        if self.block_size < 1:
            problems.append("--block-size must be at least 1")
        if problems:
            raise InputError("; ".join(problems))


@dataclass
class LayerOutcome:
    """What a one-shot method decided for one weight."""

    mask: torch.Tensor
    weight: torch.Tensor  # the method's weight (SparseGPT: updated), original dtype; after pruning, the model's own
    recon_error: float | None = None
    note: str = ""


# What a solver yields for each slice of rows: (rows, keep-mask, new weights float64, and the slice's
# ``error_terms``: ||(W - W~) X||^2 and ||W X||^2).
Solved = Iterator[tuple[slice, torch.Tensor, torch.Tensor, float, float]]
Solver = Callable[[torch.Tensor, torch.Tensor, Pattern, "CalibrationConfig", "Workers"], Solved]
