"""SparseGPT N:M (Frantar and Alistarh, 2023): masks from the inverse Hessian and the OBS update of the kept weights."""

from __future__ import annotations

from collections.abc import Callable

import torch

from nmcli.algorithms.config import CalibrationConfig, Solved
from nmcli.algorithms.parallel import SERIAL, Workers
from nmcli.errors import InputError
from nmcli.nm.masks import TopNSelector
from nmcli.nm.pattern import Pattern

# Rows of one weight matrix solved at a time: every solver treats rows independently, so bounding
# the rows bounds the working copies (weights, OBS updates, CG vectors) to about this many
# bytes each, whatever the layer's size (a 32000 x 2048 lm_head would need 0.5 GB per copy).
# Slices are also the tasks that run side by side (:mod:`nmcli.algorithms.parallel`): their size depends on
# the matrix alone, never on the number of workers, so the results do not either.
ROW_CHUNK_BYTES = 64 << 20
# Rows per task: the column sweep costs the same Python steps for any number of rows (bigger slices),
# the refit is products only (small slices spread over more workers).
TASK_ROWS = 512
REFIT_TASK_ROWS = 128
_REFIT_COPIES = 8  # the conjugate-gradient refit holds about 6 slice-sized tensors: slices 8x smaller


def _row_step(cols: int, scale: int = 1, most: int = TASK_ROWS) -> int:
    """Rows per slice of a ``cols``-wide matrix (counted as float64): ``ROW_CHUNK_BYTES / scale`` bytes and at most ``most``."""
    return max(1, min(most, ROW_CHUNK_BYTES // (8 * max(cols, 1) * scale)))


def row_slices(matrix: torch.Tensor, scale: int = 1, most: int = TASK_ROWS) -> list[slice]:
    """The slices of rows of ``matrix`` ``[rows, cols]`` solved one at a time (one task each), in order.

    ``scale`` divides the slice size, for solvers that hold that many copies of a slice at once;
    ``most`` caps its rows.
    """
    rows, cols = matrix.shape
    step = _row_step(int(cols), scale, most)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


# The solvers' precision, as in SparseGPT's reference code: float32 products and factorizations run
# twice as fast as float64 on the CPU, and the damped Hessian keeps them accurate; sums of many terms
# (errors, the Gram matrices) and the refit's recurrences stay float64. Measured on 2:4 (issue 24): MiniLM
# held-out cosine 0.8877 as with float64 throughout; a trained tiny Llama's perplexity 8.253 vs 8.249.
SOLVE_DTYPE = torch.float32


def solve_rows(matrix: torch.Tensor, rows: slice) -> torch.Tensor:
    """A ``SOLVE_DTYPE`` copy of ``matrix[rows]`` (a copy even when of that type: solvers write into it)."""
    return matrix[rows].to(SOLVE_DTYPE, copy=True)


def _sparsegpt_rows(
    w: torch.Tensor, inverse_upper: torch.Tensor, pattern: Pattern, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT N:M (Frantar & Alistarh, 2023) on rows ``w`` ``[rows, cols]``, given the inverse Hessian's factor.

    Columns are processed left to right in blocks of ``block_size`` (rounded down to a multiple of
    M). At the first column of every group of M, each row keeps the N columns with the largest
    ``w^2 / [H^-1]_jj^2`` (ties: lower index); every pruned column's error is then spread over the
    remaining columns with ``inverse_upper``, the upper Cholesky factor of the dampened inverse
    Hessian (the OBS update). Kept columns carry no error of their own, so a group's errors follow
    from M small triangular steps, and reach the rest of the block in one product per group.

    Returns:
        ``(mask, w)``: the boolean keep-mask and ``w`` itself, updated in place, zero where pruned.
    """
    rows, cols = w.shape
    m = pattern.m
    block = max(m, (block_size // m) * m)
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    select = TopNSelector(pattern, w.dtype, w.device, rows)
    pruned_scale = torch.empty(rows, m, dtype=w.dtype, device=w.device)
    score = torch.empty(rows, m, dtype=w.dtype, device=w.device)
    keep = torch.empty(rows, m, dtype=torch.bool, device=w.device)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2]
        hinv1 = inverse_upper[i1:i2, i1:i2]
        diag = hinv1.diagonal()
        err1 = torch.empty(rows, i2 - i1, dtype=w.dtype, device=w.device)
        for j in range(0, i2 - i1, m):
            group, errors, u = w1[:, j : j + m], err1[:, j : j + m], hinv1[j : j + m, j : j + m]
            d = diag[j : j + m]
            torch.div(group.square(), d.square(), out=score)
            select(score, out=keep)
            mask[:, i1 + j : i1 + j + m] = keep
            # error of column t: (w_t - q_t) / d_t, nonzero only where pruned; w_t updated by the errors before it
            torch.logical_not(keep, out=keep)
            torch.div(keep.to(w.dtype), d, out=pruned_scale)
            torch.mul(group[:, 0], pruned_scale[:, 0], out=errors[:, 0])
            for t in range(1, m):
                torch.mul(
                    torch.addmv(group[:, t], errors[:, :t], u[:t, t], alpha=-1), pruned_scale[:, t], out=errors[:, t]
                )
            group.addmm_(errors, u.triu(1), alpha=-1).masked_fill_(keep, 0)
            if j + m < i2 - i1:
                w1[:, j + m :].addmm_(errors, hinv1[j : j + m, j + m :], alpha=-1)
        if i2 < cols:
            w[:, i2:].addmm_(err1, inverse_upper[i1:i2, i2:], alpha=-1)
    return mask, w


def _refit_rows(
    weight: torch.Tensor, gram: torch.Tensor, damping: float, mask: torch.Tensor, iterations: int
) -> torch.Tensor:
    """The kept weights of rows ``weight`` that minimize SparseGPT's damped objective for ``mask``.

    The objective is ``||W X - W~ X||^2 + d ||W - W~||^2`` (``H = X^T X`` is ``gram``, ``d`` is
    ``damping``, the damping SparseGPT's inverse Hessian uses): each row ``r`` solves
    ``(H + d I)_KK w_K = ((H + d I) w_r)_K`` on its kept columns ``K``. The conjugate-gradient
    iterations on the masked system run for all the rows together as one ``[rows, cols] @ [cols, cols]``
    product (``gram`` is only read: slices of rows run side by side); SparseGPT's greedy OBS update only
    approximates this optimum, column by column. Starts from ``weight`` masked and runs ``iterations``
    steps (fewer when every row has converged).

    The products run in ``gram``'s precision; the iterates, residuals and step sizes in float64 (a
    float32 recurrence drifts: a trained LM's held-out perplexity after 2:4 rose 0.1%).
    """
    wide = torch.float64
    keep = mask.to(wide)
    weight = weight.to(wide)
    w = weight * keep

    def system(x: torch.Tensor) -> torch.Tensor:
        return (x.to(gram.dtype) @ gram).to(wide).add_(x, alpha=damping)

    if iterations <= 0:
        return w.to(gram.dtype)
    residual = system(weight - w).mul_(keep)  # the pruned part's product: no cancellation of two large ones
    direction = residual.clone()
    norm = (residual * residual).sum(1, keepdim=True)
    stop = float(norm.max()) * 1e-20
    tiny = torch.finfo(wide).tiny
    for _ in range(iterations):  # in place: w, residual, direction, product and one temporary
        if float(norm.max()) <= stop:
            break
        product = system(direction).mul_(keep)
        alpha = norm / (direction * product).sum(1, keepdim=True).clamp_min(tiny)
        w.add_(alpha * direction)
        residual.sub_(product.mul_(alpha))
        new_norm = (residual * residual).sum(1, keepdim=True)
        direction.mul_(new_norm / norm.clamp_min(tiny)).add_(residual)
        norm = new_norm
    return w.mul_(keep).to(gram.dtype)


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
        fresh = reload if reload is not None else gram.clone
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
    """``(||(W - W~) X||^2, ||W X||^2)`` on the calibration inputs, from their Gram matrix ``X^T X`` (matrices ``[rows, cols]``).

    The products run in ``gram``'s precision, the sums in float64.
    """
    d = dense.to(gram.dtype)
    delta = d - pruned.to(gram.dtype)
    return float(((delta @ gram) * delta).sum(dtype=torch.float64)), float(((d @ gram) * d).sum(dtype=torch.float64))


def solve_sparsegpt(
    part: torch.Tensor, gram: torch.Tensor, pattern: Pattern, cfg: CalibrationConfig, workers: Workers = SERIAL
) -> Solved:
    """SparseGPT N:M on ``part`` ``[rows, cols]`` with input Gram matrix ``gram`` (``X^T X``), a slice of rows at a time.

    The masks and OBS-updated weights of :func:`_sparsegpt_rows` (``cfg.damp``, ``cfg.block_size``);
    inputs that never fire (zero Hessian diagonal) get the mean diagonal, so their weights are judged
    by magnitude rather than zeroed. With ``cfg.refit_iterations`` the kept weights are then refit on
    the damped objective (:func:`_refit_rows`). Runs in ``SOLVE_DTYPE``, the slices of rows on ``workers``
    (fixed slices: the same bits with any number of workers). ``gram`` is the solver's to consume (the
    block runner hands each layer's statistics over once); each slice's errors are measured on the
    undamped Gram matrix.

    Two passes over the rows so that the inverse Hessian's factor and the damped system are never
    held together: the masks first, the factor freed, then the refit on ``gram`` and its damping. A
    large ``gram`` (``SPILL_BYTES``) waits in a temporary file during the first pass and is itself
    factorized in place (a 1.1B Llama's down projection: 127 MB each in float32), so only one of the
    two is ever in memory.
    """
    gram = gram.to(SOLVE_DTYPE)
    refit = cfg.refit_iterations > 0
    big = gram.device.type == "cpu" and gram.numel() * gram.element_size() >= SPILL_BYTES
    if not refit and not big:  # one pass, streamed: each slice is yielded as soon as it is solved
        inverse_upper = _dampened_inverse_cholesky(gram, cfg.damp)

        def sweep(rows: slice) -> tuple[slice, torch.Tensor, torch.Tensor, float, float]:
            dense = solve_rows(part, rows)
            mask, new = _sparsegpt_rows(dense.clone(), inverse_upper, pattern, cfg.block_size)
            return rows, mask, new, *error_terms(dense, new, gram)

        yield from workers.map(sweep, row_slices(part))
        return
    # Without refit the updated rows wait until the Gram matrix is back; with it, only the masks.
    if big:
        spilled = _Spilled(gram)
        try:
            inverse_upper = _dampened_inverse_cholesky(gram, cfg.damp, reload=spilled.load)
            del gram
            solved = _solve_all_rows(part, inverse_upper, pattern, cfg.block_size, workers, keep_weights=not refit)
            del inverse_upper
            gram = spilled.load()
        finally:
            spilled.close()
    else:
        inverse_upper = _dampened_inverse_cholesky(gram, cfg.damp)
        solved = _solve_all_rows(part, inverse_upper, pattern, cfg.block_size, workers, keep_weights=False)
        del inverse_upper
    if not refit:
        for rows, mask, new in solved:
            yield rows, mask, new, *error_terms(part[rows], new, gram)
        return
    whole = torch.cat([mask for _, mask, _ in solved])
    del solved
    damping = cfg.damp * float(gram.diagonal().mean())

    def refit_slice(rows: slice) -> tuple[slice, torch.Tensor, torch.Tensor, float, float]:
        dense, mask = solve_rows(part, rows), whole[rows]
        new = _refit_rows(dense, gram, damping, mask, cfg.refit_iterations)
        return rows, mask, new, *error_terms(dense, new, gram)

    yield from workers.map(refit_slice, row_slices(part, _REFIT_COPIES, REFIT_TASK_ROWS))


def _solve_all_rows(
    part: torch.Tensor,
    inverse_upper: torch.Tensor,
    pattern: Pattern,
    block_size: int,
    workers: Workers,
    *,
    keep_weights: bool,
) -> list[tuple[slice, torch.Tensor, torch.Tensor]]:
    """:func:`_sparsegpt_rows` of every slice of ``part``: ``(rows, mask, updated)``, ``updated`` empty unless ``keep_weights``."""

    def sweep(rows: slice) -> tuple[slice, torch.Tensor, torch.Tensor]:
        mask, new = _sparsegpt_rows(solve_rows(part, rows), inverse_upper, pattern, block_size)
        return rows, mask, new if keep_weights else new.new_empty(0)

    return list(workers.map(sweep, row_slices(part)))


SPILL_BYTES = 64 << 20  # Gram matrices this large wait in a temporary file during the SparseGPT pass


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
