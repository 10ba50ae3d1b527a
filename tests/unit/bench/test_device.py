"""--device resolution, the device guard, and the compute-capability -> 2:4 kernel rule (CPU-runnable parts).

The GPU halves of these rules are in tests/unit/bench/test_gpu.py (marker ``gpu``).
"""

from __future__ import annotations

import pytest
import torch

from nmcli.bench.device import device_guard
from nmcli.bench.sparse_kernels import no_backend_reason, semi_structured_backends
from nmcli.device import cuda_index, normalize_device, parse_device, resolve_device
from nmcli.errors import BackendUnavailableError, InputError


def test_bare_cuda_means_the_current_device() -> None:
    assert normalize_device("cuda", cuda_count=1) == "cuda:0"
    assert normalize_device("cuda", cuda_count=4, current=2) == "cuda:2"
    assert normalize_device(" CUDA ", cuda_count=2) == "cuda:0"


def test_explicit_index_is_kept_and_checked() -> None:
    assert normalize_device("cuda:1", cuda_count=2) == "cuda:1"
    assert normalize_device("cuda:0", cuda_count=2, current=1) == "cuda:0"
    with pytest.raises(InputError, match=r"torch sees 2 CUDA device\(s\), cuda:0 to cuda:1"):
        normalize_device("cuda:2", cuda_count=2)
    with pytest.raises(InputError, match="torch sees 1 CUDA device"):
        normalize_device("cuda:1", cuda_count=1)


def test_default_and_cpu() -> None:
    assert normalize_device(None, cuda_count=0) == "cpu"
    assert normalize_device(None, cuda_count=2, current=1) == "cuda:1"
    assert normalize_device("cpu", cuda_count=8) == "cpu"


def test_cuda_without_cuda_is_backend_unavailable() -> None:
    for device in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(BackendUnavailableError, match="--device cpu"):
            normalize_device(device, cuda_count=0)


@pytest.mark.parametrize("bad", ["tpu", "opencl", "cuda:", "cuda:-1", "cuda:x", "cuda0", "mps", ""])
def test_unknown_devices_are_input_errors(bad: str) -> None:
    with pytest.raises(InputError, match="unknown --device"):
        parse_device(bad)
    with pytest.raises(InputError, match="unknown --device"):
        normalize_device(bad, cuda_count=1)


def test_parse_and_index() -> None:
    assert parse_device("cpu") == ("cpu", None)
    assert parse_device("cuda") == ("cuda", None)
    assert parse_device("cuda:3") == ("cuda", 3)
    assert cuda_index("cpu") is None and cuda_index("cuda:3") == 3
    with pytest.raises(ValueError, match="not resolved"):
        cuda_index("cuda")


def test_resolve_device_here_matches_torch() -> None:
    if torch.cuda.is_available():
        assert resolve_device("cuda") == f"cuda:{torch.cuda.current_device()}"
        assert resolve_device(None).startswith("cuda:")
    else:
        assert resolve_device(None) == "cpu"
        with pytest.raises(BackendUnavailableError):
            resolve_device("cuda")
    assert resolve_device("cpu") == "cpu"


def test_cpu_guard_is_a_no_op() -> None:
    with device_guard("cpu"):
        assert torch.zeros(1).device.type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks torch without CUDA")
def test_cuda_guard_without_torch_cuda_is_a_no_op() -> None:
    # onnxruntime-gpu beside a CPU-only torch: the provider's device_id picks the GPU, torch has none to set
    with device_guard("cuda:1"):
        assert not torch.cuda.is_initialized()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_guard_sets_and_restores_the_current_device() -> None:
    before = torch.cuda.current_device()
    last = f"cuda:{torch.cuda.device_count() - 1}"
    with device_guard(last):
        assert torch.cuda.current_device() == torch.cuda.device_count() - 1
        assert torch.zeros(1, device="cuda").device == torch.device(last)
    assert torch.cuda.current_device() == before


# The rule read from torch 2.13: cuSPARSELt on >= 8.0 when torch has it; CUTLASS on 8.x only.
@pytest.mark.parametrize(
    ("capability", "cusparselt", "force_cutlass", "expected"),
    [
        ((7, 5), True, False, []),  # Turing: no 2:4 tensor cores
        ((8, 0), True, False, ["cusparselt", "cutlass"]),  # A100
        ((8, 6), False, False, ["cutlass"]),  # RTX 30xx with a torch built without cuSPARSELt
        ((8, 9), True, True, ["cutlass"]),  # L4/L40 forcing CUTLASS
        ((9, 0), True, False, ["cusparselt"]),  # H100/H200: CUTLASS's SM8x kernels do not run
        ((9, 0), False, False, []),
        ((9, 0), True, True, []),  # --cutlass on an H100 has nothing to run
        ((10, 0), True, False, ["cusparselt"]),  # Blackwell
    ],
)
def test_capability_to_kernel_rule(
    capability: tuple[int, int], cusparselt: bool, force_cutlass: bool, expected: list[str]
) -> None:
    got = semi_structured_backends(capability, cusparselt_available=cusparselt, force_cutlass=force_cutlass)
    assert got == expected
    reason = no_backend_reason(capability, cusparselt_available=cusparselt, force_cutlass=force_cutlass, gpu="GPU X")
    assert (reason is None) == bool(expected)


def test_no_backend_reasons_name_the_fix() -> None:
    old = no_backend_reason((7, 0), cusparselt_available=True, gpu="V100")
    assert old is not None and "V100 has compute capability 7.0" in old and "8.0 or later" in old
    hopper = no_backend_reason((9, 0), cusparselt_available=True, force_cutlass=True, gpu="H100")
    assert hopper is not None and "8.x only" in hopper and "cuSPARSELt" in hopper
    missing = no_backend_reason((9, 0), cusparselt_available=False, gpu="H100")
    assert missing is not None and "no cuSPARSELt" in missing


def test_one_device_rule_for_every_command() -> None:
    """bench and finetune share nmcli.device: ``auto`` is no device, a bare ``cuda`` may name the caller's GPU."""
    import nmcli.bench.device as bench_device

    assert not {"parse_device", "normalize_device", "resolve_device"} & set(
        bench_device.__all__
    )  # one rule: nmcli.device
    assert resolve_device("auto") == resolve_device(" AUTO ") == resolve_device(None)
    assert resolve_device("cpu", current=3) == "cpu"
    if torch.cuda.is_available():
        assert resolve_device("cuda", current=0) == "cuda:0"
    else:
        with pytest.raises(BackendUnavailableError, match="--device cpu"):
            resolve_device("cuda", current=0)
