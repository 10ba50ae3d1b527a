"""SparseGPT N:M (Frantar and Alistarh, 2023): masks from the inverse Hessian and the OBS update of the kept weights."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from nmcli.algorithms.config import CalibrationConfig, Solved
from nmcli.errors import InputError
from nmcli.nm.masks import nm_mask
from nmcli.nm.pattern import Pattern

# Rows of one weight matrix solved at a time: every solver treats rows independently, so bounding
# the rows bounds the float64 working copies (weights, OBS updates, CG vectors) to about this many
# bytes each, whatever the layer's size (a 32000 x 2048 lm_head would need 0.5 GB per copy).
ROW_CHUNK_BYTES = 64 << 20
_REFIT_COPIES = 8  # the conjugate-gradient refit holds about 6 slice-sized tensors: slices 8x smaller


def _row_step(cols: int, scale: int = 1) -> int:
    """Rows per slice of a ``cols``-wide float64 matrix: ``ROW_CHUNK_BYTES / scale`` bytes, at least one row."""
    return max(1, ROW_CHUNK_BYTES // (8 * max(cols, 1) * scale))


def row_chunks(matrix: torch.Tensor, scale: int = 1) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(rows, float64 copy of those rows)`` of ``matrix`` ``[rows, cols]``, in order.

    ``scale`` divides the slice size, for solvers that hold that many copies of a slice at once.
    """
    rows, cols = matrix.shape
    step = _row_step(int(cols), scale)
    for start in range(0, rows, step):
        chunk = slice(start, min(start + step, rows))
        yield chunk, matrix[chunk].to(torch.float64, copy=True)  # a copy even when float64: solvers write into it


def _sparsegpt_rows(
    w: torch.Tensor, inverse_upper: torch.Tensor, pattern: Pattern, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT N:M (Frantar & Alistarh, 2023) on rows ``w`` ``[rows, cols]``, given the inverse Hessian's factor.

    Columns are processed left to right in blocks of ``block_size`` (rounded down to a multiple of
    M). At the first column of every group of M, each row keeps the N columns with the largest
    ``w^2 / [H^-1]_jj^2`` (ties: lower index); every pruned or kept column's error is then spread
    over the remaining columns with ``inverse_upper``, the upper Cholesky factor of the dampened
    inverse Hessian (the OBS update).

    Returns:
        ``(mask, w)``: the boolean keep-mask and ``w`` itself (float64), updated in place, zero where pruned.
    """
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


def _refit_rows(weight: torch.Tensor, system: torch.Tensor, mask: torch.Tensor, iterations: int) -> torch.Tensor:
    """The kept weights of rows ``weight`` (float64) that minimize SparseGPT's damped objective for ``mask``.

    The objective is ``||W X - W~ X||^2 + d ||W - W~||^2`` (``H = X^T X``, ``d = damp * mean(diag H)``,
    the damping SparseGPT's inverse Hessian uses): each row ``r`` solves
    ``(H + d I)_KK w_K = ((H + d I) w_r)_K`` on its kept columns ``K``, given ``system = H + d I``. The
    conjugate-gradient iterations on the masked system run for all the rows together as one
    ``[rows, cols] @ [cols, cols]`` product; SparseGPT's greedy OBS update only approximates this
    optimum, column by column. Starts from ``weight`` masked and runs ``iterations`` steps (fewer when
    every row has converged).
    """
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


def solve_sparsegpt(part: torch.Tensor, gram: torch.Tensor, pattern: Pattern, cfg: CalibrationConfig) -> Solved:
    """SparseGPT N:M on ``part`` ``[rows, cols]`` with input Gram matrix ``gram`` (``X^T X``), a slice of rows at a time.

    The masks and OBS-updated weights of :func:`_sparsegpt_rows` (``cfg.damp``, ``cfg.block_size``);
    inputs that never fire (zero Hessian diagonal) get the mean diagonal, so their weights are judged
    by magnitude rather than zeroed. With ``cfg.refit_iterations`` the kept weights are then refit on
    the damped objective (:func:`_refit_rows`). Runs in float64. ``gram`` may be overwritten (the
    block runner hands each layer's statistics over once); each slice's errors are measured on the
    undamped Gram matrix.

    Two passes over the rows so that the inverse Hessian's factor and the damped system are never
    held together: the masks first, the factor freed, then the refit with ``gram``'s diagonal damped
    in place for each slice of rows and restored before the slice is yielded. A large ``gram``
    (``SPILL_BYTES``) waits in a temporary file during the first pass and is itself factorized in
    place (a 1.1B Llama's down projection: 254 MB each), so only one of the two is ever in memory.
    """
    refit = cfg.refit_iterations > 0
    big = gram.device.type == "cpu" and gram.numel() * gram.element_size() >= SPILL_BYTES
    if not refit and not big:  # one pass, streamed: each slice is yielded as soon as it is solved
        inverse_upper = _dampened_inverse_cholesky(gram, cfg.damp)
        for rows, dense in row_chunks(part):
            mask, new = _sparsegpt_rows(dense.clone(), inverse_upper, pattern, cfg.block_size)
            yield rows, mask, new, *error_terms(dense, new, gram)
        return
    # Without refit the updated rows wait (float64) until the Gram matrix is back; with it, only the masks.
    if big:
        spilled = _Spilled(gram)
        try:
            inverse_upper = _dampened_inverse_cholesky(gram, cfg.damp, reload=spilled.load)
            del gram
            solved = _solve_all_rows(part, inverse_upper, pattern, cfg.block_size, keep_weights=not refit)
            del inverse_upper
            gram = spilled.load()
        finally:
            spilled.close()
    else:
        inverse_upper = _dampened_inverse_cholesky(gram, cfg.damp)
        solved = _solve_all_rows(part, inverse_upper, pattern, cfg.block_size, keep_weights=False)
        del inverse_upper
    if not refit:
        for rows, mask, new in solved:
            yield rows, mask, new, *error_terms(part[rows], new, gram)
        return
    masks = [mask for _, mask, _ in solved]
    del solved
    diagonal = gram.diagonal()
    undamped = diagonal.clone()
    damping = cfg.damp * float(undamped.mean())
    for (rows, dense), mask in zip(row_chunks(part, _REFIT_COPIES), _resliced(masks, part, _REFIT_COPIES), strict=True):
        diagonal.add_(damping)
        try:
            new = _refit_rows(dense, gram, mask, cfg.refit_iterations)
        finally:
            diagonal.copy_(undamped)
        yield rows, mask, new, *error_terms(dense, new, gram)


def _solve_all_rows(
    part: torch.Tensor, inverse_upper: torch.Tensor, pattern: Pattern, block_size: int, *, keep_weights: bool
) -> list[tuple[slice, torch.Tensor, torch.Tensor]]:
    """:func:`_sparsegpt_rows` of every slice of ``part``: ``(rows, mask, updated)``, ``updated`` empty unless ``keep_weights``."""
    solved = []
    for rows, dense in row_chunks(part):
        mask, new = _sparsegpt_rows(dense, inverse_upper, pattern, block_size)
        solved.append((rows, mask, new if keep_weights else new.new_empty(0)))
    return solved


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


def _resliced(masks: Sequence[torch.Tensor], part: torch.Tensor, scale: int) -> Iterator[torch.Tensor]:
    """The row masks of ``row_chunks(part)`` (concatenated) cut again as ``row_chunks(part, scale)`` cuts rows."""
    whole = torch.cat(list(masks)) if masks else torch.zeros(part.shape, dtype=torch.bool)
    rows, cols = part.shape
    step = _row_step(int(cols), scale)
    for start in range(0, rows, step):
        yield whole[start : start + step]
