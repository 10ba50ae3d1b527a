"""Calibrated one-shot pruning: SparseGPT, Wanda, conv column order, refit, BN, determinism.

SparseGPT is exercised through the code ``nmcli prune --method sparsegpt`` runs: ``SOLVERS["sparsegpt"]``
(in each of its memory branches) and ``solve_layer``, checked against hand-computed cases and an
independent reference written here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nmcli.algorithms.sparsegpt as sparsegpt_module
from nmcli.algorithms.config import CalibrationConfig
from nmcli.algorithms.solve import SOLVERS, solve_layer, wanda_mask
from nmcli.algorithms.statistics import Segment, conv_columns, from_matrix, to_matrix
from nmcli.errors import InputError
from nmcli.formats.checkpoint import SourceRef
from nmcli.models.batchnorm import recalibrate_batchnorm
from nmcli.models.data import Batch
from nmcli.models.layers import CONV, LINEAR, LayerCandidate
from nmcli.nm.masks import is_compliant
from nmcli.nm.pattern import Pattern
from nmcli.pipelines.inmemory import prune_model

P24 = Pattern(2, 4)


def reference_sparsegpt(
    weight: torch.Tensor, gram: torch.Tensor, prunen: int, prunem: int, percdamp: float, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SparseGPT N:M loop as the paper's reference code writes it (prunen weights pruned of every prunem)."""
    W = weight.clone().double()
    H = gram.clone().double()
    columns = W.shape[1]
    damp = percdamp * torch.mean(torch.diag(H))
    H[range(columns), range(columns)] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    H = torch.linalg.cholesky(H, upper=True)
    Hinv = H
    mask = torch.zeros_like(W, dtype=torch.bool)  # True = pruned
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if i % prunem == 0:
                tmp = W1[:, i : (i + prunem)] ** 2 / (torch.diag(Hinv1)[i : (i + prunem)].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return ~mask, W


def _random_problem(rows: int, cols: int, samples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    # correlated inputs, so the OBS update matters
    x = torch.randn(samples, cols, generator=g, dtype=torch.float64) @ torch.randn(
        cols, cols, generator=g, dtype=torch.float64
    )
    return weight, x.t() @ x / samples


def _output_error(dense: torch.Tensor, pruned: torch.Tensor, gram: torch.Tensor) -> float:
    """``||(W - W~) X||^2`` from ``gram = X^T X``, written out term by term."""
    delta = dense.to(torch.float64) - pruned.to(torch.float64)
    return float(torch.einsum("ri,ij,rj->", delta, gram, delta))


def _sparsegpt(
    weight: torch.Tensor, gram: torch.Tensor, pattern: Pattern, cfg: CalibrationConfig
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """``SOLVERS["sparsegpt"]``'s slices stitched together: ``(mask, weights, ||(W - W~) X||^2, ||W X||^2)``."""
    mask = torch.zeros(weight.shape, dtype=torch.bool)
    new = torch.full(weight.shape, float("nan"), dtype=torch.float64)
    num = den = 0.0
    for rows, m, n, a, b in SOLVERS["sparsegpt"](weight, gram.clone(), pattern, cfg):
        assert torch.isnan(new[rows]).all()  # every row exactly once
        mask[rows], new[rows] = m, n
        num, den = num + a, den + b
    assert not torch.isnan(new).any()
    return mask, new, num, den


# The solver's memory branches: everything in memory; the Gram matrix waiting in a temporary file
# and factorized in place; and that with slices of 5 rows (the CG refit's slices: 5 // 8 -> 1 row).
MEMORY = ("in-memory", "spilled", "spilled-sliced")


@pytest.fixture(params=MEMORY)
def memory(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    # the algorithm checked exactly against the float64 reference; the float32 default is checked below
    monkeypatch.setattr(sparsegpt_module, "SOLVE_DTYPE", torch.float64)
    if request.param != "in-memory":
        monkeypatch.setattr(sparsegpt_module, "SPILL_BYTES", 0)
    if request.param == "spilled-sliced":
        monkeypatch.setattr(sparsegpt_module, "ROW_CHUNK_BYTES", 1)  # one row per slice
    return str(request.param)


@pytest.mark.parametrize(
    ("rows", "cols", "block", "pattern"), [(16, 32, 8, P24), (8, 64, 128, Pattern(1, 4)), (6, 48, 16, Pattern(4, 8))]
)
def test_sparsegpt_equals_the_reference_algorithm(
    memory: str, rows: int, cols: int, block: int, pattern: Pattern
) -> None:
    weight, gram = _random_problem(rows, cols, 200)
    cfg = CalibrationConfig(spec="", damp=0.01, block_size=block, refit_iterations=0)
    mask, updated, num, den = _sparsegpt(weight, gram, pattern, cfg)
    ref_mask, ref_weight = reference_sparsegpt(weight, gram, pattern.m - pattern.n, pattern.m, 0.01, block)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(updated, ref_weight, atol=1e-9, rtol=0)
    assert is_compliant(updated, pattern, 1)
    assert torch.equal(updated != 0, mask)
    assert num == pytest.approx(_output_error(weight, updated, gram), rel=1e-12)
    assert den == pytest.approx(_output_error(weight, torch.zeros_like(weight), gram), rel=1e-12)
    # the OBS update beats plain masking of the same mask
    plain = torch.where(mask, weight, torch.zeros(()))
    assert num < _output_error(weight, plain, gram)


@pytest.mark.parametrize(
    ("rows", "cols", "block", "pattern"), [(16, 32, 8, P24), (8, 64, 128, Pattern(1, 4)), (6, 48, 16, Pattern(4, 8))]
)
@pytest.mark.parametrize("refit", [0, 10])
def test_the_float32_default_keeps_the_reference_masks(
    rows: int, cols: int, block: int, pattern: Pattern, refit: int
) -> None:
    """What ``prune`` runs (float32 products, float64 sums): the reference's masks, its weights to float32
    precision, the refit's within the same."""
    assert sparsegpt_module.SOLVE_DTYPE is torch.float32
    weight, gram = _random_problem(rows, cols, 200)
    cfg = CalibrationConfig(spec="", damp=0.01, block_size=block, refit_iterations=refit)
    mask, updated, num, _ = _sparsegpt(weight, gram, pattern, cfg)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sparsegpt_module, "SOLVE_DTYPE", torch.float64)
        exact_mask, exact, exact_num, _ = _sparsegpt(weight, gram, pattern, cfg)
    assert torch.equal(mask, exact_mask)
    torch.testing.assert_close(updated, exact, atol=1e-4, rtol=1e-4)
    assert num == pytest.approx(exact_num, rel=1e-4)


def test_refit_reaches_the_least_squares_optimum_per_row(memory: str) -> None:
    weight, gram = _random_problem(5, 16, 100, seed=1)
    no_refit = _sparsegpt(weight, gram, P24, CalibrationConfig(spec="", block_size=16, refit_iterations=0))
    mask, refit, num, _ = _sparsegpt(weight, gram, P24, CalibrationConfig(spec="", block_size=16, refit_iterations=50))
    assert torch.equal(mask, no_refit[0])  # the same masks: only the kept weights move
    system = gram + 0.01 * gram.diagonal().mean() * torch.eye(16, dtype=torch.float64)
    for r in range(5):
        kept = mask[r].nonzero().flatten()
        exact = torch.linalg.solve(system[kept][:, kept], (weight[r] @ system)[kept])
        torch.testing.assert_close(refit[r, kept], exact, atol=1e-9, rtol=1e-9)
        assert bool((refit[r][~mask[r]] == 0).all())
    assert num == pytest.approx(_output_error(weight, refit, gram), rel=1e-12)
    assert num <= no_refit[2]  # the refit never makes the layer's output error worse


@pytest.mark.parametrize("refit", [0, 50])
def test_sparsegpt_one_of_two_by_hand(memory: str, refit: int) -> None:
    # H = [[1, r], [r, 1]], r = 1/2, no damping: the upper factor of H^-1 is
    # [[1/sqrt(1 - r^2), -r/sqrt(1 - r^2)], [0, 1]], so the scores are w0^2 (1 - r^2) and w1^2.
    gram = torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    weight = torch.tensor([[0.8, 1.0], [1.0, 0.8]], dtype=torch.float64)
    cfg = CalibrationConfig(spec="", damp=0.0, refit_iterations=refit)
    mask, new, num, den = _sparsegpt(weight, gram, Pattern(1, 2), cfg)
    # row 0: scores 0.48 < 1, w0 pruned; its error 0.8 sqrt(1 - r^2) times -r / sqrt(1 - r^2) moves
    # into w1: 1 + 0.8 r = 1.4, the optimum. Row 1: scores 0.75 > 0.64, w1 pruned, nothing to its
    # right to update (the greedy pass keeps w0 = 1); the refit reaches the optimum 1 + 0.8 r.
    assert mask.tolist() == [[False, True], [True, False]]
    expected = [[0.0, 1.4], [1.4 if refit else 1.0, 0.0]]
    torch.testing.assert_close(new, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=0)
    # ||(W - W~) X||^2 = d H d: row 0 d = [0.8, -0.4]: 0.48; row 1 d = [0, 0.8]: 0.64, refit [-0.4, 0.8]: 0.48
    assert num == pytest.approx(0.48 + (0.48 if refit else 0.64), abs=1e-12)
    assert den == pytest.approx(2 * 2.44, abs=1e-12)  # w H w = 0.64 + 0.8 + 1 per row


@pytest.mark.parametrize("refit", [0, 50])
@pytest.mark.parametrize("dead", [False, True])
def test_sparsegpt_with_uncorrelated_inputs_is_magnitude_pruning(memory: str, refit: int, dead: bool) -> None:
    # A diagonal H of equal entries: the scores are w^2 and no error reaches another column. An input
    # that never fires (H_00 = 0) counts as the mean of the others: judged by magnitude, not zeroed.
    gram = torch.eye(8, dtype=torch.float64) * 2
    if dead:
        gram[0, 0] = 0
    weight = torch.tensor([[4.0, -1.0, 3.0, 2.0, 0.5, -6.0, 0.25, 7.0], [-1.0, 2.0, -3.0, 4.0, 1.0, 1.0, 1.0, 1.0]])
    mask, new, _, _ = _sparsegpt(weight, gram, P24, CalibrationConfig(spec="", refit_iterations=refit))
    expected = [[4.0, 0.0, 3.0, 0.0, 0.0, -6.0, 0.0, 7.0], [0.0, 0.0, -3.0, 4.0, 1.0, 1.0, 0.0, 0.0]]
    assert torch.equal(new, torch.tensor(expected, dtype=torch.float64))
    assert torch.equal(mask, new != 0)


@pytest.mark.parametrize("kind", [LINEAR, CONV])
def test_solve_layer_runs_sparsegpt_on_the_layer_matrix(kind: str) -> None:
    torch.manual_seed(0)
    if kind == LINEAR:
        weight = nn.Linear(32, 6).weight.detach()
        columns = torch.randn(64, 32)
    else:
        conv = nn.Conv2d(8, 6, 3, padding=1)
        weight = conv.weight.detach()
        columns = conv_columns(conv, torch.randn(4, 8, 5, 5))
    segment = Segment(slice(None))
    segment.add(columns[:40])
    segment.add(columns[40:])  # accumulated over batches
    gram = columns.double().t() @ columns.double() / columns.shape[0]
    cand = LayerCandidate("m", "m.weight", kind, tuple(weight.shape), 1, True, "")
    cfg = CalibrationConfig(spec="", block_size=16, refit_iterations=0)
    outcome = solve_layer(weight, cand, [segment], P24, "sparsegpt", cfg)
    ref_mask, ref_weight = reference_sparsegpt(to_matrix(weight, kind), gram, 2, 4, 0.01, 16)
    assert torch.equal(outcome.mask, from_matrix(ref_mask, kind, weight.shape))
    assert outcome.weight.dtype == weight.dtype and outcome.weight.shape == weight.shape
    torch.testing.assert_close(outcome.weight, from_matrix(ref_weight.float(), kind, weight.shape), atol=1e-6, rtol=0)
    ratio = _output_error(ref_weight, to_matrix(weight, kind), gram) / _output_error(
        to_matrix(weight, kind), torch.zeros_like(to_matrix(weight, kind)), gram
    )
    # each batch's Gram matrix is float32 (summed in float64): ~1e-7 relative to the float64 reference
    assert outcome.recon_error == pytest.approx(ratio, rel=1e-6)
    assert is_compliant(outcome.weight, P24, 1)


def test_wanda_scores_by_hand() -> None:
    # two inputs columns with norms 1 and 10: |w| * ||x|| = [4*1, 1*10, 3*1, 2*1] -> keep columns 1 and 0
    weight = torch.tensor([[4.0, 1.0, 3.0, 2.0]], dtype=torch.float64)
    x = torch.tensor([[1.0, 10.0, 1.0, 1.0]], dtype=torch.float64)
    mask = wanda_mask(weight, x.t() @ x, P24)
    assert mask.tolist() == [[True, True, False, False]]


def test_conv_columns_are_channel_contiguous_at_every_kernel_position() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 4, (3, 2), stride=(1, 2), padding=(1, 1), dilation=(2, 1))
    x = torch.randn(2, 8, 7, 9)
    cols = conv_columns(conv, x)  # [patches, kh*kw*C]
    matrix = to_matrix(conv.weight.detach(), CONV)  # [out, kh*kw*C]
    out = (cols @ matrix.t()).reshape(2, -1, 4) + conv.bias.detach()
    expected = conv(x).detach().permute(0, 2, 3, 1).reshape(2, -1, 4)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # the column index is k * C + c: a group of 4 columns is 4 channels at one kernel position
    w = torch.zeros(4, 8, 3, 2)
    w[:, 4:8, 1, 0] = 1.0
    assert torch.equal(to_matrix(w, CONV)[:, 2 * 8 + 4 : 2 * 8 + 8], torch.ones(4, 4))
    assert torch.equal(from_matrix(to_matrix(w, CONV), CONV, w.shape), w)


def _conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 8),
    ).eval()  # fmt: skip


def _batches(shape: tuple[int, ...], n: int = 3, seed: int = 0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [Batch((torch.randn(*shape, generator=g),)) for _ in range(n)]


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_calibrated_conv_model_is_nm_along_channels(method: str) -> None:
    model = _conv_model()
    batches = _batches((4, 4, 6, 6))
    cfg = CalibrationConfig(spec="tensors:x", bn_recalibrate=False)
    result = prune_model(model, P24, source=SourceRef("py:x:y"), method=method, calibration=cfg, batches=batches)
    ckpt = result.checkpoint
    for layer in ckpt.meta.layers:
        weight = ckpt.tensors[layer.param]
        assert is_compliant(weight, P24, 1), layer.param  # N:M along C at every kernel position
        assert torch.equal(weight != 0, ckpt.masks[layer.param] & (weight != 0))
    errors = [r.recon_error for r in result.layers if r.status == "pruned"]
    assert all(e is not None and 0 <= e < 1 for e in errors)
    # the input model is untouched (inplace=False)
    assert torch.equal(model[0].weight, _conv_model()[0].weight)


def test_sparsegpt_beats_magnitude_on_layer_error() -> None:
    model = _conv_model()
    batches = _batches((8, 4, 6, 6))
    cfg = CalibrationConfig(spec="tensors:x", bn_recalibrate=False)
    runs = {
        m: prune_model(model, P24, source=SourceRef("py:x:y"), method=m, calibration=cfg, batches=batches)
        for m in ("magnitude", "sparsegpt")
    }
    for mag, sgpt in zip(runs["magnitude"].layers, runs["sparsegpt"].layers, strict=True):
        if mag.status == "pruned":
            assert sgpt.recon_error is not None and mag.recon_error is not None
            assert sgpt.recon_error <= mag.recon_error + 1e-12, mag.param


def test_same_masks_and_weights_with_one_and_two_threads() -> None:
    threads = torch.get_num_threads()
    outputs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            model = _conv_model()
            cfg = CalibrationConfig(spec="tensors:x")
            result = prune_model(model, P24, source=SourceRef("py:x:y"), method="sparsegpt", calibration=cfg,
                                 batches=_batches((8, 4, 6, 6)))  # fmt: skip
            outputs.append(result.checkpoint)
    finally:
        torch.set_num_threads(threads)
    one, two = outputs
    for name, mask in one.masks.items():
        assert torch.equal(mask, two.masks[name]), name
    for name, value in one.tensors.items():
        assert torch.equal(value, two.tensors[name]), name


def test_batchnorm_recalibration_is_the_cumulative_average() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, momentum=0.01), nn.Dropout(0.5)).eval()
    batches = _batches((5, 4), n=4)
    recalibrate_batchnorm(model, batches)
    with torch.no_grad():
        feats = torch.cat([model[0](b.args[0]) for b in batches])
    bn = model[1]
    # the mean of batch means (equal batch sizes) and the mean of unbiased batch variances
    means = feats.reshape(4, 5, 3).mean(1)
    variances = feats.reshape(4, 5, 3).var(1, unbiased=True)
    torch.testing.assert_close(bn.running_mean, means.mean(0))
    torch.testing.assert_close(bn.running_var, variances.mean(0))
    assert bn.momentum == 0.01 and not model.training and not bn.training and not model[2].training


def test_calibrated_method_without_data_is_an_input_error() -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(InputError, match="--calib"):
        prune_model(model, P24, source=SourceRef("py:x:y"), method="sparsegpt")
    with pytest.raises(InputError, match="unknown pruning method"):
        prune_model(model, P24, source=SourceRef("py:x:y"), method="obs")


def test_keep_dense_after_sparsegpt_holds_updated_kept_and_original_pruned() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    original = model[0].weight.detach().clone()
    cfg = CalibrationConfig(spec="tensors:x")
    result = prune_model(model, P24, source=SourceRef("py:x:y"), method="sparsegpt", calibration=cfg,
                         batches=_batches((32, 16)), keep_dense=True)  # fmt: skip
    ckpt = result.checkpoint
    mask, dense, effective = ckpt.masks["0.weight"], ckpt.dense["0.weight"], ckpt.tensors["0.weight"]
    assert torch.equal(dense[~mask], original[~mask])
    assert torch.equal(dense[mask], effective[mask])
    assert not torch.equal(effective[mask], original[mask])  # the kept weights were updated


def test_layers_the_data_never_reaches_fall_back_to_magnitude() -> None:
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.used = nn.Linear(8, 8)
            self.unused = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    result = prune_model(TwoHeads().eval(), P24, source=SourceRef("py:x:y"), method="wanda",
                         calibration=CalibrationConfig(spec="tensors:x"), batches=_batches((4, 8)))  # fmt: skip
    notes = {r.param: r.note for r in result.layers}
    assert "magnitude" in notes["unused.weight"] and notes["used.weight"] == ""
    assert result.layers[0].recon_error is not None


def test_linear_kind_constant_is_identity_view() -> None:
    w = torch.arange(8.0).reshape(2, 4)
    assert to_matrix(w, LINEAR) is w
    assert F.linear(torch.ones(1, 4), from_matrix(w, LINEAR, w.shape)).shape == (1, 2)


@pytest.mark.parametrize("refit", [0, 50])
def test_row_slices_change_nothing_and_leave_the_inputs_alone(monkeypatch: pytest.MonkeyPatch, refit: int) -> None:
    monkeypatch.setattr(sparsegpt_module, "SOLVE_DTYPE", torch.float64)
    weight, gram = _random_problem(12, 32, 200, seed=3)
    weight_before, gram_before = weight.clone(), gram.clone()
    cfg = CalibrationConfig(spec="", refit_iterations=refit)

    def solved() -> tuple[torch.Tensor, torch.Tensor]:
        mask, new = torch.zeros(weight.shape, dtype=torch.bool), torch.zeros(weight.shape, dtype=torch.float64)
        for rows, m, n, num, den in SOLVERS["sparsegpt"](weight, gram, P24, cfg):
            # measured on the undamped gram, which is back to its values whenever a slice is yielded
            assert torch.equal(gram, gram_before)
            assert num == pytest.approx(_output_error(weight[rows], n, gram), rel=1e-12)
            assert den == pytest.approx(_output_error(weight[rows], torch.zeros_like(n), gram), rel=1e-12)
            mask[rows], new[rows] = m, n
        return mask, new

    whole_mask, whole = solved()
    monkeypatch.setattr(sparsegpt_module, "ROW_CHUNK_BYTES", 5 * 32 * 8)  # slices of 5 rows
    sliced_mask, sliced = solved()
    assert torch.equal(whole_mask, sliced_mask)
    torch.testing.assert_close(sliced, whole, atol=1e-9, rtol=0)  # CG stops per slice: near-equal
    assert torch.equal(weight, weight_before)
    ref_mask, _ = reference_sparsegpt(weight, gram, 2, 4, cfg.damp, cfg.block_size)
    assert torch.equal(whole_mask, ref_mask)


def test_spilled_gram_retries_a_singular_factorization_from_its_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 8, generator=g, dtype=torch.float64)
    x = torch.cat([x, x], dim=1)  # duplicated inputs: singular without damping, retried with more
    gram = x.t() @ x / 64
    weight = torch.randn(6, 16, generator=g, dtype=torch.float64)
    cfg = CalibrationConfig(spec="", damp=0.0)

    def run() -> list[tuple[torch.Tensor, torch.Tensor, float, float]]:
        return [(m, n, a, b) for _, m, n, a, b in SOLVERS["sparsegpt"](weight, gram.clone(), P24, cfg)]

    for refit in (0, 50):
        cfg = CalibrationConfig(spec="", damp=0.0, refit_iterations=refit)
        monkeypatch.setattr(sparsegpt_module, "SPILL_BYTES", 64 << 20)
        kept = run()
        monkeypatch.setattr(sparsegpt_module, "SPILL_BYTES", 0)  # factorized in place, retried from the file
        for (m1, n1, a1, b1), (m2, n2, a2, b2) in zip(kept, run(), strict=True):
            assert torch.equal(m1, m2) and torch.equal(n1, n2) and (a1, b1) == (a2, b2)
