"""Calibrated one-shot pruning (nmcli/oneshot.py): SparseGPT, Wanda, conv column order, refit, BN, determinism."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nmcli.algorithms.sparsegpt as sparsegpt_module
from nmcli.algorithms.config import CalibrationConfig
from nmcli.algorithms.solve import SOLVERS, wanda_mask
from nmcli.algorithms.sparsegpt import error_terms, reconstruction_error, refit_kept, sparsegpt
from nmcli.algorithms.statistics import conv_columns, from_matrix, to_matrix
from nmcli.errors import InputError
from nmcli.formats.checkpoint import SourceRef
from nmcli.models.batchnorm import recalibrate_batchnorm
from nmcli.models.data import Batch
from nmcli.models.layers import CONV, LINEAR
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


@pytest.mark.parametrize(
    ("rows", "cols", "block", "pattern"), [(16, 32, 8, P24), (8, 64, 128, Pattern(1, 4)), (6, 48, 16, Pattern(4, 8))]
)
def test_sparsegpt_equals_the_reference_algorithm(rows: int, cols: int, block: int, pattern: Pattern) -> None:
    weight, gram = _random_problem(rows, cols, 200)
    mask, updated = sparsegpt(weight, gram, pattern, damp=0.01, block_size=block)
    ref_mask, ref_weight = reference_sparsegpt(weight, gram, pattern.m - pattern.n, pattern.m, 0.01, block)
    assert torch.equal(mask, ref_mask)
    torch.testing.assert_close(updated, ref_weight, atol=1e-5, rtol=0)
    assert is_compliant(updated, pattern, 1)
    # the OBS update beats plain masking of the same mask
    plain = torch.where(mask, weight, torch.zeros(()))
    assert reconstruction_error(weight, updated, gram) < reconstruction_error(weight, plain, gram)


def test_refit_reaches_the_least_squares_optimum_per_row() -> None:
    weight, gram = _random_problem(5, 16, 100, seed=1)
    mask, _ = sparsegpt(weight, gram, P24, damp=0.01, block_size=16)
    refit = refit_kept(weight, gram, mask, damp=0.01, iterations=50)
    system = gram + 0.01 * gram.diagonal().mean() * torch.eye(16, dtype=torch.float64)
    for r in range(5):
        kept = mask[r].nonzero().flatten()
        exact = torch.linalg.solve(system[kept][:, kept], (weight[r] @ system)[kept])
        torch.testing.assert_close(refit[r, kept], exact, atol=1e-9, rtol=1e-9)
        assert bool((refit[r][~mask[r]] == 0).all())


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
    weight, gram = _random_problem(12, 32, 200, seed=3)
    weight_before, gram_before = weight.clone(), gram.clone()
    cfg = CalibrationConfig(spec="", refit_iterations=refit)

    def solved() -> tuple[torch.Tensor, torch.Tensor]:
        mask, new = torch.zeros(weight.shape, dtype=torch.bool), torch.zeros(weight.shape, dtype=torch.float64)
        for rows, m, n, num, den in SOLVERS["sparsegpt"](weight, gram.clone(), P24, cfg):
            assert (num, den) == error_terms(weight[rows], n, gram)  # measured on the undamped gram
            mask[rows], new[rows] = m, n
        return mask, new

    whole_mask, whole = solved()
    monkeypatch.setattr(sparsegpt_module, "ROW_CHUNK_BYTES", 5 * 32 * 8)  # slices of 5 rows
    monkeypatch.setattr(sparsegpt_module, "SPILL_BYTES", 0)  # the Gram matrix waits in a file during the masks
    sliced_mask, sliced = solved()
    assert torch.equal(whole_mask, sliced_mask)
    torch.testing.assert_close(sliced, whole, atol=1e-9, rtol=0)  # CG stops per slice: near-equal
    assert torch.equal(weight, weight_before) and torch.equal(gram, gram_before)
    ref_mask, _ = sparsegpt(weight, gram, P24, damp=cfg.damp, block_size=cfg.block_size)
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
