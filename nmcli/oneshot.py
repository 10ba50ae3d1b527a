"""Calibrated one-shot pruning: SparseGPT and Wanda, block by block with error propagation.

DESIGN.md section 3b. The model's repeated blocks (the ``nn.ModuleList`` of transformer layers)
are pruned one after the other: the inputs of the first block are captured on the calibration
data, each block's prunable layers collect their input statistics (``X^T X``) with forward hooks,
the layers are pruned, and the block runs again on its **pruned** weights to produce the next
block's inputs. Only one block's activations and statistics are alive at a time. A model without
such blocks (CNNs) is pruned stage by stage (its Sequential/ModuleList children, in the order
they run), one pass of the whole, partly pruned, model per stage. Layers outside the blocks are
pruned last, on one pass of the whole pruned model.

N:M groups follow DESIGN.md section 3 exactly. Every weight is viewed as a matrix ``[rows, cols]``
whose columns are the reduction axis, ordered so that each group of M consecutive columns is one
N:M group: Linear as is, transformers ``Conv1D`` transposed, and ConvNd ``[out, C, *k]`` as
``[out, k..., C]`` flattened, so channels are contiguous at every kernel position (the layout
TensorRT accelerates); the unfolded conv inputs are ordered the same way.

All statistics and the SparseGPT solve run in float64, in a fixed batch order, so the masks and
weights do not depend on the thread count.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from nmcli.batchnorm import has_batchnorm, model_call_kwargs, recalibrate_batchnorm
from nmcli.data import Batch, check_batch_fits, load_data
from nmcli.errors import DataError, InputError
from nmcli.patterns import CONV, HF_CONV1D, LINEAR, MHA, LayerCandidate, Pattern, nm_mask

DEFAULT_CALIB_SAMPLES = 128
DEFAULT_DAMP = 0.01
DEFAULT_BLOCK_SIZE = 128
CALIB_BATCH_SIZE = 16
DEFAULT_REFIT_ITERATIONS = 50
# Layer kinds whose inputs the hooks can collect; others (3-D expert stacks) fall back to magnitude.
CALIBRATED_KINDS = frozenset({LINEAR, CONV, HF_CONV1D, MHA})

ProgressCallback = Callable[[int, int, str], None]


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


@dataclass
class OneShotResult:
    """Per-parameter outcomes of a calibrated prune, and notes for the summary."""

    outcomes: dict[str, LayerOutcome] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    bn_recalibrated: bool = False


class BlockIO(Protocol):
    """Where the blocks' weights live when the model is not in memory (:mod:`nmcli.sharded`).

    With a ``BlockIO`` the blocks start on the meta device: :meth:`load` materializes one block's
    weights before it is calibrated, :meth:`done` writes its pruned weights (``outcomes`` holds the
    masks of every layer pruned so far) and frees it again. Everything outside the blocks must be
    materialized by the caller; layers outside the blocks are pruned on passes of the model whose
    blocks replay the last block's outputs.
    """

    def load(self, block: str) -> None: ...

    def done(self, block: str, outcomes: Mapping[str, LayerOutcome]) -> None: ...


# --------------------------------------------------------------------------------------------
# Calibration data


def calibration_batches(
    cfg: CalibrationConfig,
    *,
    source_spec: str,
    input_shape: Sequence[int] | None,
) -> list[Batch]:
    """The first ``cfg.samples`` examples of a seeded shuffle of ``cfg.spec``, in batches (targets dropped).

    Raises:
        DataError: the spec is unreadable or holds no examples.
    """
    try:
        data = load_data(cfg.spec, source_spec=source_spec, input_shape=input_shape, max_length=cfg.max_length)
    except DataError as exc:
        raise DataError(str(exc).replace("--data", "--calib", 1)) from exc
    batches: list[Batch] = []
    if data.map_style:
        n = len(data)
        if n == 0:
            raise DataError(f"--calib {cfg.spec} holds no examples")
        generator = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(n, generator=generator)[: cfg.samples].tolist()
        for start in range(0, len(order), cfg.batch_size):
            batches.append(_without_targets(data.take(order[start : start + cfg.batch_size])))
        return batches
    taken = 0
    for batch in data.iter_batches():
        batch = _without_targets(batch)
        room = cfg.samples - taken
        if batch.size > room:
            batch = Batch(tuple(a[:room] for a in batch.args), {k: v[:room] for k, v in batch.kwargs.items()})
        batches.append(batch)
        taken += batch.size
        if taken >= cfg.samples:
            break
    if not batches:
        raise DataError(f"--calib {cfg.spec} produced no batches")
    return batches


def _without_targets(batch: Batch) -> Batch:
    kwargs = {k: v for k, v in batch.kwargs.items() if k != "labels"}
    return Batch(batch.args, kwargs, None)


# --------------------------------------------------------------------------------------------
# Weights as matrices whose columns are N:M groups


def to_matrix(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """``weight`` as ``[rows, cols]`` with the reduction axis last and every group of M columns one N:M group."""
    if kind == HF_CONV1D:
        return weight.t()
    if kind == CONV:
        return weight.movedim(1, -1).reshape(weight.shape[0], -1)
    return weight


def from_matrix(matrix: torch.Tensor, kind: str, shape: Sequence[int]) -> torch.Tensor:
    """The inverse of :func:`to_matrix`."""
    if kind == HF_CONV1D:
        return matrix.t().contiguous()
    if kind == CONV:
        moved = (shape[0], *shape[2:], shape[1])
        return matrix.reshape(moved).movedim(-1, 1).contiguous()
    return matrix.contiguous()


def conv_columns(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """The unfolded inputs of a ConvNd as ``[patches, k... x C]``, matching :func:`to_matrix`'s column order."""
    dims = x.dim() - 2
    if x.dim() == dims + 1:  # unbatched input
        x = x.unsqueeze(0)
    pad = module._reversed_padding_repeated_twice
    mode = "constant" if module.padding_mode == "zeros" else str(module.padding_mode)
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    for i in range(dims):
        span = (kernel[i] - 1) * dilation[i] + 1
        x = x.unfold(2 + i, span, stride[i])
        if dilation[i] > 1:
            x = x[..., :: dilation[i]]
    # [B, C, L1..Ln, K1..Kn] -> [B, L..., K..., C]
    channels = x.shape[1]
    order = [0, *range(2, 2 + dims), *range(2 + dims, 2 + 2 * dims), 1]
    return x.permute(order).reshape(-1, int(math.prod(kernel)) * channels)


# --------------------------------------------------------------------------------------------
# Input statistics


_GRAM_SLICE_BYTES = 32 << 20  # float64 activations converted at a time when accumulating X^T X


class _Segment:
    """``X^T X`` (float64) of the inputs feeding rows ``rows`` of one weight matrix."""

    def __init__(self, rows: slice) -> None:
        self.rows = rows
        self.gram: torch.Tensor | None = None
        self.count = 0

    def add(self, columns: torch.Tensor) -> None:
        """Add ``X^T X`` of ``columns`` ``[..., cols]``, a slice of rows at a time.

        The float64 copy of a whole batch's activations would be large (8192 tokens x 5632 inputs
        of a 1B model's down projection: 369 MB, plus a product the size of the Gram matrix), so
        slices of ``_GRAM_SLICE_BYTES`` are converted and multiplied into the Gram matrix in place.
        """
        flat = columns.detach().reshape(-1, columns.shape[-1])
        if flat.shape[0] == 0:
            return
        width = flat.shape[1]
        if self.gram is None:
            self.gram = torch.zeros(width, width, dtype=torch.float64, device=flat.device)
        step = max(1, _GRAM_SLICE_BYTES // (8 * max(width, 1)))
        for start in range(0, flat.shape[0], step):
            cols = flat[start : start + step].to(torch.float64)
            self.gram.addmm_(cols.t(), cols)
        self.count += flat.shape[0]

    def take(self, device: torch.device | str) -> torch.Tensor:
        """The averaged Gram matrix ``X^T X / count`` on ``device``; the segment lets go of it."""
        assert self.gram is not None
        gram, self.gram = self.gram, None
        return gram.to(device).div_(max(self.count, 1))


class _Collector:
    """Forward hooks that accumulate the input statistics of a set of layers."""

    def __init__(self, model: nn.Module, layers: Sequence[LayerCandidate]) -> None:
        self.token_mask: torch.Tensor | None = None
        self.segments: dict[str, list[_Segment]] = {}
        self._handles: list[Any] = []
        modules = dict(model.named_modules())
        by_module: dict[str, list[LayerCandidate]] = {}
        for cand in layers:
            by_module.setdefault(cand.module, []).append(cand)
        for module_name, cands in by_module.items():
            module = modules[module_name]
            if cands[0].kind not in CALIBRATED_KINDS:
                continue
            if cands[0].kind == MHA:
                self._hook_attention(module, cands)
            else:
                cand = cands[0]
                self.segments[cand.param] = [_Segment(slice(None))]
                self._handles.append(module.register_forward_hook(self._linear_hook(cand)))

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Drop padded positions (attention mask 0) from token inputs ``[B, T, ...]``."""
        mask = self.token_mask
        if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            return x[mask.to(torch.bool)]
        return x

    def _linear_hook(self, cand: LayerCandidate) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0]
            if cand.kind == CONV and isinstance(module, nn.modules.conv._ConvNd):
                columns = conv_columns(module, x)
            else:
                columns = self._tokens(x).reshape(-1, x.shape[-1])
            self.segments[cand.param][0].add(columns)

        return hook

    def _hook_attention(self, module: nn.Module, cands: list[LayerCandidate]) -> None:
        embed = int(getattr(module, "embed_dim", 0))
        sources: dict[str, list[tuple[slice, int]]] = {
            "in_proj_weight": [(slice(0, embed), 0), (slice(embed, 2 * embed), 1), (slice(2 * embed, 3 * embed), 2)],
            "q_proj_weight": [(slice(None), 0)],
            "k_proj_weight": [(slice(None), 1)],
            "v_proj_weight": [(slice(None), 2)],
        }
        routes: list[tuple[str, int, int]] = []
        for cand in cands:
            attr = cand.param.rsplit(".", 1)[-1]
            parts = sources.get(attr, [])
            self.segments[cand.param] = [_Segment(rows) for rows, _ in parts]
            routes.extend((cand.param, i, which) for i, (_, which) in enumerate(parts))
        batch_first = bool(getattr(module, "batch_first", False))

        def pre_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            names = ("query", "key", "value")
            inputs = [args[i] if i < len(args) else kwargs.get(names[i]) for i in range(3)]
            mask = kwargs.get("key_padding_mask")
            for param, index, which in routes:
                x = inputs[which]
                if not isinstance(x, torch.Tensor):
                    continue
                if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and x.dim() == 3 and which > 0:
                    keep = ~(mask if batch_first else mask.t())
                    if tuple(keep.shape) == tuple(x.shape[:2]):
                        x = x[keep]
                self.segments[param][index].add(x.reshape(-1, x.shape[-1]))

        self._handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


# --------------------------------------------------------------------------------------------
# The methods, on one matrix


def wanda_mask(weight: torch.Tensor, gram: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Wanda: keep the N largest ``|W_ij| * ||X_j||_2`` of every group of M columns (``weight`` ``[rows, cols]``)."""
    column_norms = gram.diagonal().clamp_min(0).sqrt()
    score = weight.to(torch.float64).abs() * column_norms.unsqueeze(0)
    return nm_mask(score, pattern, 1)


# Rows of one weight matrix solved at a time: every solver treats rows independently, so bounding
# the rows bounds the float64 working copies (weights, OBS updates, CG vectors) to about this many
# bytes each, whatever the layer's size (a 32000 x 2048 lm_head would need 0.5 GB per copy).
_ROW_CHUNK_BYTES = 64 << 20
_REFIT_COPIES = 8  # the conjugate-gradient refit holds about 6 slice-sized tensors: slices 8x smaller


def _row_step(cols: int, scale: int = 1) -> int:
    """Rows per slice of a ``cols``-wide float64 matrix: ``_ROW_CHUNK_BYTES / scale`` bytes, at least one row."""
    return max(1, _ROW_CHUNK_BYTES // (8 * max(cols, 1) * scale))


def _row_chunks(matrix: torch.Tensor, scale: int = 1) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(rows, float64 copy of those rows)`` of ``matrix`` ``[rows, cols]``, in order.

    ``scale`` divides the slice size, for solvers that hold that many copies of a slice at once.
    """
    rows, cols = matrix.shape
    step = _row_step(int(cols), scale)
    for start in range(0, rows, step):
        chunk = slice(start, min(start + step, rows))
        yield chunk, matrix[chunk].to(torch.float64, copy=True)  # a copy even when float64: solvers write into it


def sparsegpt(
    weight: torch.Tensor, gram: torch.Tensor, pattern: Pattern, *, damp: float, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT N:M (Frantar & Alistarh, 2023) on ``weight`` ``[rows, cols]`` with input Gram matrix ``X^T X``.

    Columns are processed left to right in blocks of ``block_size`` (rounded down to a multiple of
    M). At the first column of every group of M, each row keeps the N columns with the largest
    ``w^2 / [H^-1]_jj^2`` (ties: lower index); every pruned or kept column's error is then spread
    over the remaining columns with the Cholesky factor of the dampened inverse Hessian (the OBS
    update). Inputs that never fire (zero Hessian diagonal) get the mean diagonal, so their weights
    are judged by magnitude rather than zeroed. Runs in float64, a slice of rows at a time.

    Returns:
        ``(mask, updated)``: the boolean keep-mask and the updated weights (zero where pruned), float64.
    """
    inverse_upper = _dampened_inverse_cholesky(gram, damp)
    mask = torch.zeros(weight.shape, dtype=torch.bool, device=weight.device)
    updated = torch.empty(weight.shape, dtype=torch.float64, device=weight.device)
    for rows, part in _row_chunks(weight.detach()):
        mask[rows], updated[rows] = _sparsegpt_rows(part, inverse_upper, pattern, block_size)
    return mask, updated


def _sparsegpt_rows(
    w: torch.Tensor, inverse_upper: torch.Tensor, pattern: Pattern, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sparsegpt` on rows ``w`` (float64, updated in place and returned) given the factor of the inverse Hessian."""
    rows, cols = w.shape
    m = pattern.m
    block = max(m, (block_size // m) * m)
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = inverse_upper[i1:i2, i1:i2]
        hdiag = hinv1.diagonal()
        for i in range(i2 - i1):
            if i % m == 0:
                score = w1[:, i : i + m].pow(2) / hdiag[i : i + m].pow(2).unsqueeze(0)
                mask[:, i1 + i : i1 + i + m] = nm_mask(score, pattern, 1)
            col = w1[:, i]
            q = torch.where(mask[:, i1 + i], col, torch.zeros((), dtype=col.dtype, device=col.device))
            q1[:, i] = q
            err = (col - q) / hdiag[i]
            w1[:, i:] -= err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i1:i2] = q1
        if i2 < cols:
            w[:, i2:].addmm_(err1, inverse_upper[i1:i2, i2:], alpha=-1)
    return mask, w


def refit_kept(
    weight: torch.Tensor, gram: torch.Tensor, mask: torch.Tensor, *, damp: float, iterations: int
) -> torch.Tensor:
    """The kept weights that minimize SparseGPT's damped objective for a fixed mask, by conjugate gradients.

    The objective is ``||W X - W~ X||^2 + d ||W - W~||^2`` (``H = X^T X``, ``d = damp * mean(diag H)``,
    the damping SparseGPT's inverse Hessian uses): each row ``r`` solves
    ``(H + d I)_KK w_K = ((H + d I) w_r)_K`` on its kept columns ``K``; the CG iterations on the masked
    system run for a slice of rows together as one ``[rows, cols] @ [cols, cols]`` product. SparseGPT's
    greedy OBS update only approximates this optimum, column by column. Starts from ``weight``
    masked, runs ``iterations`` steps (fewer when every row of the slice has converged). Float64 in,
    float64 out.
    """
    system = gram.clone()
    system.diagonal().add_(damp * float(gram.diagonal().mean()))
    out = torch.empty(weight.shape, dtype=torch.float64, device=weight.device)
    for rows, part in _row_chunks(weight, _REFIT_COPIES):
        out[rows] = _refit_rows(part, system, mask[rows], iterations)
    return out


def _refit_rows(weight: torch.Tensor, system: torch.Tensor, mask: torch.Tensor, iterations: int) -> torch.Tensor:
    """:func:`refit_kept` of rows ``weight`` (float64) with the damped system ``H + d I`` given."""
    keep = mask.to(weight.dtype)
    w = weight * keep
    if iterations <= 0:
        return w
    residual = (weight @ system).mul_(keep)
    residual.sub_((w @ system).mul_(keep))
    direction = residual.clone()
    norm = (residual * residual).sum(1, keepdim=True)
    stop = float(norm.max()) * 1e-20
    tiny = torch.finfo(weight.dtype).tiny
    for _ in range(iterations):  # in place: w, residual, direction, product and one temporary
        if float(norm.max()) <= stop:
            break
        product = (direction @ system).mul_(keep)
        alpha = norm / (direction * product).sum(1, keepdim=True).clamp_min(tiny)
        w.add_(alpha * direction)
        residual.sub_(product.mul_(alpha))
        new_norm = (residual * residual).sum(1, keepdim=True)
        direction.mul_(new_norm / norm.clamp_min(tiny)).add_(residual)
        norm = new_norm
    return w.mul_(keep)


def _dampened_inverse_cholesky(
    gram: torch.Tensor, damp: float, *, reload: Callable[[], torch.Tensor] | None = None
) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``; the damping grows x10 until H is definite.

    ``H`` is ``gram`` with every zero diagonal entry (an input that never fires) set to the mean
    of the others. One working copy of ``H`` is factorized, inverted and factorized again in
    place: ``H``'s size once beside ``gram``, not three times. With ``reload`` (a function giving
    ``gram`` back, e.g. from a file), ``gram`` itself is that working copy: it is consumed, and
    ``reload`` feeds any retry with more damping.
    """
    diag = gram.diagonal()
    dead = diag <= 0
    alive_mean = float(diag[~dead].mean()) if bool((~dead).any()) else 1.0
    factor = damp if damp > 0 else 0.0
    info = torch.zeros((), dtype=torch.int32, device=gram.device)
    for attempt in range(8):
        fresh = reload if reload is not None else lambda: gram.to(torch.float64).clone()
        h = gram if reload is not None and attempt == 0 else fresh()
        h[dead, dead] = alive_mean
        mean_diag = float(h.diagonal().mean())
        h.diagonal().add_(factor * mean_diag)
        torch.linalg.cholesky_ex(h, out=(h, info))
        if int(info) == 0:
            torch.cholesky_inverse(h, out=h)
            torch.linalg.cholesky_ex(h, upper=True, out=(h, info))
            if int(info) == 0:
                return h
        del h
        factor = max(factor * 10, 1e-6)
    raise InputError(
        "the calibration inputs give a Hessian that stays singular even with heavy damping: "
        "use more --calib-samples or a larger --damp"
    )


def error_terms(dense: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor) -> tuple[float, float]:
    """``(||(W - W~) X||^2, ||W X||^2)`` on the calibration inputs, from their Gram matrix ``X^T X`` (matrices ``[rows, cols]``)."""
    d = dense.to(torch.float64)
    delta = d - pruned.to(torch.float64)
    return float(((delta @ gram) * delta).sum()), float(((d @ gram) * d).sum())


def reconstruction_error(dense: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor) -> float:
    """``||W X - W~ X||^2 / ||W X||^2`` on the calibration inputs."""
    num, den = error_terms(dense, pruned, gram)
    return num / den if den > 0 else 0.0


# What a solver yields for each slice of rows: (rows, keep-mask, new weights float64, and the slice's
# ``error_terms``: ||(W - W~) X||^2 and ||W X||^2).
Solved = Iterator[tuple[slice, torch.Tensor, torch.Tensor, float, float]]
Solver = Callable[[torch.Tensor, torch.Tensor, Pattern, "CalibrationConfig"], Solved]


def _masked(part: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, part, torch.zeros((), dtype=part.dtype, device=part.device))


def _solve_magnitude(part: torch.Tensor, gram: torch.Tensor, pattern: Pattern, cfg: CalibrationConfig) -> Solved:
    for rows, dense in _row_chunks(part):
        mask = nm_mask(dense, pattern, 1)
        new = _masked(dense, mask)
        yield rows, mask, new, *error_terms(dense, new, gram)


def _solve_wanda(part: torch.Tensor, gram: torch.Tensor, pattern: Pattern, cfg: CalibrationConfig) -> Solved:
    for rows, dense in _row_chunks(part):
        mask = wanda_mask(dense, gram, pattern)
        new = _masked(dense, mask)
        yield rows, mask, new, *error_terms(dense, new, gram)


def _solve_sparsegpt(part: torch.Tensor, gram: torch.Tensor, pattern: Pattern, cfg: CalibrationConfig) -> Solved:
    """SparseGPT's masks, then (``refit_iterations``) the kept weights refit on the damped objective.

    Two passes over the rows so that the inverse Hessian's factor and the damped system are never
    held together: the masks first, the factor freed, then the refit with ``gram``'s diagonal
    damped in place for each slice of rows and restored before the slice is yielded (its errors
    are measured on the undamped ``gram``).
    """
    big = gram.device.type == "cpu" and gram.numel() * gram.element_size() >= _SPILL_BYTES
    if cfg.refit_iterations <= 0 and not big:
        inverse_upper = _dampened_inverse_cholesky(gram, cfg.damp)
        for rows, dense in _row_chunks(part):
            mask, new = _sparsegpt_rows(dense.clone(), inverse_upper, pattern, cfg.block_size)
            yield rows, mask, new, *error_terms(dense, new, gram)
        return
    if cfg.refit_iterations <= 0:  # the updated rows wait (float64) until the Gram matrix is back
        spilled = _Spilled(gram)
        try:
            inverse_upper = _dampened_inverse_cholesky(gram, cfg.damp, reload=spilled.load)
            del gram
            solved = [
                (rows, *_sparsegpt_rows(d, inverse_upper, pattern, cfg.block_size)) for rows, d in _row_chunks(part)
            ]
            del inverse_upper
            gram = spilled.load()
        finally:
            spilled.close()
        for rows, mask, new in solved:
            yield rows, mask, new, *error_terms(part[rows], new, gram)
        return
    # The factor is used while the masks are chosen, the Gram matrix only afterwards: a large one
    # waits in a temporary file meanwhile and is itself factorized in place (a 1.1B Llama's down
    # projection: 254 MB each), so only one of the two is ever in memory.
    if big:
        spilled = _Spilled(gram)
        try:
            inverse_upper = _dampened_inverse_cholesky(gram, cfg.damp, reload=spilled.load)
            del gram
            masks = [_sparsegpt_rows(d, inverse_upper, pattern, cfg.block_size)[0] for _, d in _row_chunks(part)]
            del inverse_upper
            gram = spilled.load()
        finally:
            spilled.close()
    else:
        inverse_upper = _dampened_inverse_cholesky(gram, cfg.damp)
        masks = [_sparsegpt_rows(d, inverse_upper, pattern, cfg.block_size)[0] for _, d in _row_chunks(part)]
        del inverse_upper
    diagonal = gram.diagonal()
    undamped = diagonal.clone()
    damping = cfg.damp * float(undamped.mean())
    for (rows, dense), mask in zip(
        _row_chunks(part, _REFIT_COPIES), _resliced(masks, part, _REFIT_COPIES), strict=True
    ):
        diagonal.add_(damping)
        try:
            new = _refit_rows(dense, gram, mask, cfg.refit_iterations)
        finally:
            diagonal.copy_(undamped)
        yield rows, mask, new, *error_terms(dense, new, gram)


_SPILL_BYTES = 64 << 20  # Gram matrices this large wait in a temporary file during the SparseGPT pass


class _Spilled:
    """A CPU tensor's bytes in a temporary file, read back exactly by :meth:`load` (any number of times)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        import tempfile

        self.shape, self.dtype = tuple(tensor.shape), tensor.dtype
        self.file = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        self.file.write(tensor.contiguous().numpy().data)

    def load(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype)
        view = out.numpy().data.cast("B")
        self.file.seek(0)
        done = 0
        while done < len(view):
            got = self.file.readinto(view[done:])
            if not got:
                raise OSError(f"a temporary file of {len(view)} bytes gave back {done}")
            done += got
        return out

    def close(self) -> None:
        self.file.close()


def _resliced(masks: Sequence[torch.Tensor], part: torch.Tensor, scale: int) -> Iterator[torch.Tensor]:
    """The row masks of ``_row_chunks(part)`` (concatenated) cut again as ``_row_chunks(part, scale)`` cuts rows."""
    whole = torch.cat(list(masks)) if masks else torch.zeros(part.shape, dtype=torch.bool)
    rows, cols = part.shape
    step = _row_step(int(cols), scale)
    for start in range(0, rows, step):
        yield whole[start : start + step]


# The one registry of pruning methods: each solves one weight matrix ``[rows, cols]`` (columns in
# N:M groups) from its inputs' Gram matrix, a slice of rows at a time (:data:`Solved`).
SOLVERS: dict[str, Solver] = {
    "magnitude": _solve_magnitude,
    "wanda": _solve_wanda,
    "sparsegpt": _solve_sparsegpt,
}
# Methods that need calibration data.
CALIBRATED = frozenset({"wanda", "sparsegpt"})


def solve_layer(
    weight: torch.Tensor,
    cand: LayerCandidate,
    segments: Sequence[_Segment],
    pattern: Pattern,
    method: str,
    cfg: CalibrationConfig,
) -> LayerOutcome:
    """Prune one weight with ``method`` from its input statistics (magnitude when none reached it)."""
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
            matrix[seg.rows], seg.take(matrix.device), pattern, cfg
        ):
            seg_masks[rows], seg_updated[rows] = mask.cpu(), new.to(weight.dtype)
            num, den = num + seg_num, den + seg_den
    full_mask = from_matrix(masks, cand.kind, cand.shape)
    new_weight = from_matrix(updated, cand.kind, cand.shape)
    return LayerOutcome(full_mask, new_weight, num / den if den > 0 else 0.0)


# --------------------------------------------------------------------------------------------
# Blocks and stages


def find_blocks(model: nn.Module, layers: Sequence[LayerCandidate]) -> tuple[str, list[str]] | None:
    """The model's repeated blocks: the ``nn.ModuleList`` of same-class modules holding the most prunable layers.

    Returns ``(list_name, [block names])``, or None when the model has no such list.
    """
    best: tuple[int, str, list[str]] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        names = [f"{name}.{i}" if name else str(i) for i in range(len(module))]
        covered = sum(1 for cand in layers if any(_inside(cand.module, block) for block in names))
        if covered and (best is None or covered > best[0]):
            best = (covered, name, names)
    return None if best is None else (best[1], best[2])


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def find_stages(model: nn.Module, layers: Sequence[LayerCandidate]) -> list[str]:
    """Module names to prune one after another when the model has no repeated blocks.

    Containers (Sequential, ModuleList, ModuleDict), and the model itself, are opened up; every
    other module holding a prunable layer is one stage (a residual block, a conv, a Linear).
    """
    stages: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if not any(_inside(cand.module, name) for cand in layers):
                continue
            if isinstance(child, _CONTAINERS):
                visit(name, child)
            else:
                stages.append(name)

    visit("", model)
    # layers held directly by the model object (not in a child) form a last stage
    if any(cand.module == "" for cand in layers):
        stages.append("")
    return stages


def _inside(module_name: str, block: str) -> bool:
    return block == "" or module_name == block or module_name.startswith(block + ".")


def _run(model: nn.Module, batch: Batch, collector: _Collector | None, extra: dict[str, Any]) -> Any:
    if collector is not None:
        collector.token_mask = batch.kwargs.get("attention_mask")
    return model(*batch.args, **batch.kwargs, **extra)


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


@dataclass
class _BlockInput:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    token_mask: torch.Tensor | None


def _capture_block_inputs(model: nn.Module, block: nn.Module, batches: Sequence[Batch]) -> list[_BlockInput]:
    captured: list[_BlockInput] = []
    current: dict[str, Any] = {}

    def pre_hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append(_BlockInput(args, dict(kwargs), current.get("mask")))
        raise _StopForward

    handle = block.register_forward_pre_hook(pre_hook, with_kwargs=True)
    extra = model_call_kwargs(model)
    try:
        for batch in batches:
            current["mask"] = batch.kwargs.get("attention_mask")
            try:
                model(*batch.args, **batch.kwargs, **extra)
            except _StopForward:
                continue
    finally:
        handle.remove()
    return captured


def _primary_output(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    value = getattr(out, "last_hidden_state", None)
    return value if isinstance(value, torch.Tensor) else None


def _next_input(inp: _BlockInput, hidden: torch.Tensor) -> _BlockInput:
    if inp.args:
        return _BlockInput((hidden, *inp.args[1:]), inp.kwargs, inp.token_mask)
    kwargs = dict(inp.kwargs)
    kwargs["hidden_states"] = hidden
    return _BlockInput((), kwargs, inp.token_mask)


# --------------------------------------------------------------------------------------------
# The engine


class _Pruner:
    """Prunes groups of layers from collected statistics and writes the results into the model."""

    def __init__(
        self,
        model: nn.Module,
        pattern: Pattern,
        method: str,
        cfg: CalibrationConfig,
        total: int,
        progress: ProgressCallback | None,
    ) -> None:
        self.model, self.pattern, self.method, self.cfg = model, pattern, method, cfg
        self.total, self.progress = total, progress
        self.result = OneShotResult()

    def prune(self, layers: Sequence[LayerCandidate], collector: _Collector) -> None:
        for cand in layers:
            param = self.model.get_parameter(cand.param)  # looked up now: a BlockIO replaces a block's parameters
            outcome = solve_layer(
                param.detach(), cand, collector.segments.get(cand.param, []), self.pattern, self.method, self.cfg
            )
            with torch.no_grad():
                param.copy_(torch.where(outcome.mask.to(param.device), outcome.weight.to(param.device), 0))
            # the effective weight now lives in the model: no second copy of it is kept
            outcome.mask, outcome.weight = outcome.mask.cpu(), param.detach()
            self.result.outcomes[cand.param] = outcome
            if self.progress is not None:
                self.progress(len(self.result.outcomes), self.total, cand.param)


def prune_calibrated(
    model: nn.Module,
    layers: Sequence[LayerCandidate],
    pattern: Pattern,
    method: str,
    batches: Sequence[Batch],
    cfg: CalibrationConfig,
    progress: ProgressCallback | None = None,
    block_io: BlockIO | None = None,
) -> OneShotResult:
    """Prune ``layers`` of ``model`` in place with a calibrated method, block by block with error propagation.

    Args:
        model: the dense model (eval mode); its pruned weights are overwritten with the result.
        layers: the eligible layers to prune.
        pattern: the N:M pattern.
        method: ``sparsegpt``, ``wanda`` or ``magnitude`` (magnitude masks; statistics only for the report).
        batches: the calibration batches.
        cfg: damping, block size, device, BatchNorm recalibration.
        progress: called as ``progress(done, total, param)`` after each layer.
        block_io: the blocks are on the meta device and loaded, written and freed one at a time
            through it (the model must have chainable blocks and no BatchNorm; the model is not moved).

    Returns:
        Per-layer masks, weights and reconstruction errors, and notes on how the model was traversed.

    Raises:
        InputError: with ``block_io``, the model has no blocks that can be chained.
        DataError: the first batch does not fit the model (checked before any layer is pruned).
    """
    device = torch.device(cfg.device)
    was_training = model.training
    model.eval()
    if block_io is None:
        model.to(device)
    if block_io is not None:  # the streamed prune's memory is the point of streaming
        map_large_allocations()
    moved = [b.to(device) for b in batches]
    pruner = _Pruner(model, pattern, method, cfg, len(layers), progress)
    try:
        with torch.no_grad():
            blocks = find_blocks(model, layers)
            if moved:  # streamed blocks are on the meta device: run only as far as the first one
                streamed = blocks is not None and block_io is not None
                first = dict(model.named_modules())[blocks[1][0]] if streamed and blocks is not None else None
                check_batch_fits(
                    model, moved[0], f"--calib {cfg.spec}", extra=model_call_kwargs(model), stop_before=first
                )
            done: set[str] = set()
            outputs: list[Any] | None = [] if block_io is not None else None
            if blocks is not None and _prune_blocks(model, blocks[1], layers, moved, pruner, done, block_io, outputs):
                pruner.result.notes.append(
                    f"{method}: calibrated block by block over the {len(blocks[1])} blocks of {blocks[0]}, "
                    f"each block's inputs produced by the pruned blocks before it"
                )
            elif block_io is not None:
                raise InputError(
                    "the model has no repeated blocks whose inputs can be captured and chained, so it cannot be "
                    "calibrated block by block from its shards: load it whole (give -o FILE.safetensors)"
                )
            rest = [cand for cand in layers if cand.param not in done]
            if rest and block_io is not None and blocks is not None and outputs is not None:
                with _replaying(model, blocks[0], outputs, moved):
                    _prune_stages(model, rest, moved, pruner, done, cfg)
            elif rest:
                _prune_stages(model, rest, moved, pruner, done, cfg)
            if block_io is None and cfg.bn_recalibrate and has_batchnorm(model):
                recalibrate_batchnorm(model, moved)
                pruner.result.bn_recalibrated = True
    finally:
        if block_io is None:
            model.to("cpu")
        model.train(was_training)
    return pruner.result


class _Replay(nn.Module):
    """Stands in for every block on the final passes of a streamed prune: returns the last block's output."""

    def __init__(self, outputs: Sequence[Any]) -> None:
        super().__init__()
        self.outputs = outputs
        self.index = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.outputs[self.index]


def _first_tensor(args: Sequence[Any], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


@contextlib.contextmanager
def _replaying(model: nn.Module, list_name: str, outputs: Sequence[Any], batches: Sequence[Batch]) -> Iterator[None]:
    """The blocks of ``list_name`` replaced by :class:`_Replay`; each call of the model on one of ``batches``
    replays that batch's output of the last (pruned) block, so the layers after the blocks see exactly
    what they would see on the pruned model, with no block in memory."""
    container = model.get_submodule(list_name)
    assert isinstance(container, nn.ModuleList)
    originals = list(container)
    replay = _Replay(outputs)
    firsts = [_first_tensor(b.args, b.kwargs) for b in batches]

    def pick(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        first = _first_tensor(args, kwargs)
        matches = [i for i, f in enumerate(firsts) if f is first]
        if not matches:
            raise InputError("a pass of the model on inputs other than the calibration batches (a bug)")
        replay.index = matches[0]

    for i in range(len(container)):
        container[i] = replay
    handle = model.register_forward_pre_hook(pick, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for i, block in enumerate(originals):
            container[i] = block


def _prune_blocks(
    model: nn.Module,
    block_names: list[str],
    layers: Sequence[LayerCandidate],
    batches: Sequence[Batch],
    pruner: _Pruner,
    done: set[str],
    block_io: BlockIO | None = None,
    outputs: list[Any] | None = None,
) -> bool:
    """Block-by-block pruning; False (nothing pruned) when the blocks cannot be chained.

    With ``block_io`` each block is loaded before and written and freed after it is pruned;
    ``outputs``, when given, receives the last block's outputs on every batch.
    """
    modules = dict(model.named_modules())
    inputs = _capture_block_inputs(model, modules[block_names[0]], batches)
    if len(inputs) != len(batches):
        return False
    for name in block_names:
        block = modules[name]
        if block_io is not None:
            block_io.load(name)
        in_block = [cand for cand in layers if _inside(cand.module, name)]
        for group in _sequential_groups(model, block, in_block, inputs[0]):
            collector = _Collector(model, group)
            try:
                for inp in inputs:
                    collector.token_mask = inp.token_mask
                    block(*inp.args, **inp.kwargs)
            finally:
                collector.remove()
            pruner.prune(group, collector)
            done.update(cand.param for cand in group)
            del collector
            trim_heap()
        next_inputs = []
        for inp in inputs:
            out = block(*inp.args, **inp.kwargs)
            hidden = _primary_output(out)
            first = inp.args[0] if inp.args else inp.kwargs.get("hidden_states")
            if hidden is None or not isinstance(first, torch.Tensor) or hidden.shape != first.shape:
                raise InputError(
                    f"block {name} does not return its hidden states in the shape it takes them: "
                    "report this model to nmcli"
                )
            next_inputs.append(_next_input(inp, hidden))
            if outputs is not None and name == block_names[-1]:
                outputs.append(out)
            del out
        if block_io is not None:
            block_io.done(name, pruner.result.outcomes)
        inputs = next_inputs
        trim_heap()
    return True


_LIBC: list[Any] = []
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_MMAP_THRESHOLD_BYTES = 4 << 20


def _glibc() -> Any:
    if not _LIBC:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.append(libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None)
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]


def map_large_allocations() -> None:
    """Serve allocations of 4 MB and more with their own memory maps, returned to the OS when freed (glibc).

    glibc raises its mmap threshold adaptively up to 32 MB and serves smaller blocks from the heap,
    which the calibrated prune's tensors of a few to tens of MB (activations, statistics, row slices)
    fragment: a 1.1B model's streamed prune held 0.6-0.9 GB of heap (``/proc/PID/smaps``) and
    peaked at 2.2-2.5 GB. A fixed threshold keeps every such tensor out of the heap. Process-wide;
    a no-op without glibc.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)


def trim_heap() -> None:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _sequential_groups(
    model: nn.Module, block: nn.Module, layers: Sequence[LayerCandidate], sample: _BlockInput
) -> list[list[LayerCandidate]]:
    """The block's layers in the order they run, grouped by shared input (q, k and v read the same tensor).

    Each group is pruned before the next one collects its statistics, so the attention output
    projection sees the pruned q/k/v and the MLP's down projection the pruned up projection
    (SparseGPT's "true sequential" order). Layers that never run form a last group.
    """
    modules = dict(model.named_modules())
    seen: list[tuple[str, Any]] = []
    handles = []
    for module_name in dict.fromkeys(cand.module for cand in layers):

        def hook(mod: nn.Module, args: tuple[Any, ...], name: str = module_name) -> None:
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            key = (x.data_ptr(), tuple(x.shape)) if x is not None else None
            if all(name != done for done, _ in seen):
                seen.append((name, key))

        handles.append(modules[module_name].register_forward_pre_hook(hook))
    try:
        block(*sample.args, **sample.kwargs)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[LayerCandidate]] = []
    keys: list[Any] = []
    for module_name, key in seen:
        members = [cand for cand in layers if cand.module == module_name]
        if key is not None and keys and keys[-1] == key:
            groups[-1].extend(members)
        else:
            groups.append(members)
            keys.append(key)
    ran = {module_name for module_name, _ in seen}
    rest = [cand for cand in layers if cand.module not in ran]
    return [*groups, rest] if rest else groups


def _prune_stages(
    model: nn.Module,
    layers: Sequence[LayerCandidate],
    batches: Sequence[Batch],
    pruner: _Pruner,
    done: set[str],
    cfg: CalibrationConfig,
) -> None:
    """Stage by stage: one pass of the whole (partly pruned) model per stage, in execution order."""
    stages = _execution_order(model, find_stages(model, layers), batches[0])
    extra = model_call_kwargs(model)
    recalibrate = cfg.bn_recalibrate and has_batchnorm(model)
    for stage in stages:
        in_stage = [cand for cand in layers if _inside(cand.module, stage) and cand.param not in done]
        if not in_stage:
            continue
        collector = _Collector(model, in_stage)
        try:
            for batch in batches:
                _run(model, batch, collector, extra)
        finally:
            collector.remove()
        pruner.prune(in_stage, collector)
        done.update(cand.param for cand in in_stage)
        if recalibrate:
            recalibrate_batchnorm(model, batches)
    if pruner.result.notes:
        pruner.result.notes.append(f"{len(layers)} layer(s) outside the blocks pruned on passes of the whole model")
    else:
        pruner.result.notes.append(
            f"{pruner.method}: no repeated blocks found: calibrated stage by stage ({len(stages)} stages, "
            "one pass of the whole partly pruned model each)"
        )


def _execution_order(model: nn.Module, stages: list[str], batch: Batch) -> list[str]:
    """``stages`` sorted by when they first run on ``batch`` (stages that never run keep their place, last)."""
    modules = dict(model.named_modules())
    first_seen: dict[str, int] = {}
    handles = []
    for stage in stages:
        if stage == "":
            continue

        def hook(mod: nn.Module, args: Any, name: str = stage) -> None:
            first_seen.setdefault(name, len(first_seen))

        handles.append(modules[stage].register_forward_pre_hook(hook))
    try:
        model(*batch.args, **batch.kwargs, **model_call_kwargs(model))
    finally:
        for handle in handles:
            handle.remove()
    return sorted(stages, key=lambda s: (s not in first_seen, first_seen.get(s, 0)))
