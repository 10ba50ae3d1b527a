"""Model sources: every form of MODEL that installs here offline, and their errors."""

from __future__ import annotations

import importlib.util
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fixtures.models import tiny_cnn, tiny_mlp
from nmcli.errors import BackendUnavailableError, SourceError, TrustRequiredError
from nmcli.formats.checkpoint import SourceRef
from nmcli.formats.safetensors import sha256_file
from nmcli.models.layers import HF_CONV1D, LINEAR, find_layers
from nmcli.models.sources import (
    build_model,
    default_output_path,
    load_model,
    load_source_model,
    model_from_checkpoint,
    normalize_spec,
    source_ref,
)
from nmcli.nm.pattern import Pattern
from nmcli.pipelines.inmemory import prune_model
from nmcli.trust import remember
from tests.conftest import MODELS_PY, py_source

P24 = Pattern(2, 4)
X = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))


def _same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor = X) -> bool:
    with torch.no_grad():
        return torch.allclose(a(x), b(x), atol=1e-6)


# --------------------------------------------------------------------------------------------
# hf:


@pytest.fixture(scope="module")
def minilm(minilm_dir: Path) -> nn.Module:
    pytest.importorskip("transformers")
    loaded = load_model(f"hf:{minilm_dir}")
    assert loaded.kind == "hf" and loaded.path == minilm_dir
    return loaded.model


def test_hf_minilm_directory(minilm: nn.Module, minilm_dir: Path) -> None:
    assert type(minilm).__name__ == "BertModel" and not minilm.training
    layers = find_layers(minilm, P24)
    encoder = [c for c in layers if c.param.startswith("encoder.") and c.eligible]
    assert len(encoder) == 36 and all(c.kind == LINEAR and c.axis == 1 for c in encoder)
    # The pretrained weights were loaded, not a random init.
    from safetensors import safe_open

    with safe_open(str(minilm_dir / "model.safetensors"), "pt") as fh:
        key = next(k for k in fh.keys() if k.endswith("encoder.layer.0.attention.self.query.weight"))  # noqa: SIM118
        stored = fh.get_tensor(key)
    assert torch.equal(minilm.state_dict()["encoder.layer.0.attention.self.query.weight"], stored)


def test_hf_source_records_the_weights_sha256(minilm_dir: Path) -> None:
    ref = source_ref(f"hf:{minilm_dir}")
    assert ref.spec == f"hf:{minilm_dir.resolve()}"
    assert ref.sha256 == sha256_file(minilm_dir / "model.safetensors")


def test_hf_input_spec_is_guessed(minilm_dir: Path) -> None:
    loaded = load_model(f"hf:{minilm_dir}")
    assert str(loaded.input_spec) == "input_ids:1x128:int64,attention_mask:1x128:int64"


def test_hf_tiny_gpt2_conv1d(tiny_gpt2_dir: Path) -> None:
    loaded = load_model(f"hf:{tiny_gpt2_dir}")
    assert type(loaded.model).__name__ == "GPT2LMHeadModel"
    conv1d = [c for c in find_layers(loaded.model, P24) if c.kind == HF_CONV1D]
    assert len(conv1d) == 8 and all(c.axis == 0 and c.eligible for c in conv1d)
    assert {c.shape for c in conv1d} == {(32, 96), (32, 32), (32, 128), (128, 32)}


def test_hf_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="needs a model id"):
        load_model("hf:")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SourceError, match="transformers could not load it"):
        load_model(f"hf:{tmp_path}")
    with pytest.raises(SourceError, match=r"for a transformers model write hf:"):
        load_model(str(tmp_path))


# --------------------------------------------------------------------------------------------
# py:


def test_py_module_path() -> None:
    loaded = load_model("py:fixtures.models:tiny_mlp")
    assert loaded.kind == "py" and loaded.name == "tiny_mlp"
    assert _same_outputs(loaded.model, tiny_mlp())
    assert loaded.source.sha256 == sha256_file(MODELS_PY)


def test_py_file_path() -> None:
    loaded = load_model(py_source("tiny_cnn"))
    assert loaded.kind == "py" and loaded.source.spec == f"py:{MODELS_PY}:tiny_cnn"
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), tiny_cnn().eval()(x))


def test_py_relative_file_path_is_made_absolute(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(MODELS_PY.parent)
    assert normalize_spec("py:models.py:tiny_mlp") == f"py:{MODELS_PY}:tiny_mlp"


def test_py_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="has no callable 'nope'"):
        load_model(py_source("nope"))
    with pytest.raises(SourceError, match="module 'no_such_module_xyz' not found"):
        load_model("py:no_such_module_xyz:build")
    with pytest.raises(SourceError, match="malformed source"):
        load_model("py:fixtures.models")
    with pytest.raises(SourceError, match="does not exist"):
        load_model(f"py:{tmp_path / 'missing.py'}:build")
    bad = tmp_path / "bad.py"
    bad.write_text("def not_a_module():\n    return 3\n\ndef raises():\n    raise ValueError('no')\n")
    with pytest.raises(SourceError, match=r"returned an int, not a torch\.nn\.Module"):
        load_model(f"py:{bad}:not_a_module")
    with pytest.raises(SourceError, match="the factory raised ValueError: no"):
        load_model(f"py:{bad}:raises")
    broken = tmp_path / "broken.py"
    broken.write_text("import this_does_not_exist_either\n")
    with pytest.raises(SourceError, match="not found"):
        load_model(f"py:{broken}:build")


# --------------------------------------------------------------------------------------------
# Files: TorchScript, state dicts + --arch, pickles, ExportedProgram


def test_torchscript(tmp_path: Path) -> None:
    path = tmp_path / "mlp.pt"
    torch.jit.script(tiny_mlp()).save(str(path))
    loaded = load_model(str(path))
    assert loaded.kind == "torchscript" and loaded.name == "mlp" and loaded.path == path
    assert loaded.source.sha256 == sha256_file(path)
    assert _same_outputs(loaded.model, tiny_mlp())
    assert [c.param for c in find_layers(loaded.model, P24) if c.eligible] == ["0.weight", "2.weight", "4.weight"]


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors"])
def test_state_dict_with_arch(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"weights{suffix}"
    state = tiny_mlp().state_dict()
    for value in state.values():
        value.mul_(2)  # different from the factory's own init
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    with pytest.raises(SourceError, match="pass --arch SPEC"):
        load_model(str(path))
    loaded = load_model(str(path), arch=py_source("tiny_mlp"))
    assert loaded.kind == "state_dict" and loaded.source.arch == py_source("tiny_mlp")
    assert loaded.source.sha256 == sha256_file(path)
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, state[name])


def test_wrapped_state_dict_with_arch(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": tiny_mlp().state_dict()}, path)
    loaded = load_model(str(path), arch=py_source("tiny_mlp"))
    assert _same_outputs(loaded.model, tiny_mlp())


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dict_that_does_not_fit_arch(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"mlp{suffix}"
    state = tiny_mlp().state_dict()
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    with pytest.raises(SourceError, match=r"does not fit the architecture \(missing .*unexpected .*\): check --arch"):
        load_model(str(path), arch=py_source("tiny_cnn"))


def test_state_dict_with_wrong_shapes(tmp_path: Path) -> None:
    path = tmp_path / "mlp.pt"
    state = tiny_mlp().state_dict()
    state["0.weight"] = torch.zeros(128, 32)
    torch.save(state, path)
    with pytest.raises(SourceError, match=r"shape 0.weight \(128, 32\) vs \(128, 64\)"):
        load_model(str(path), arch=py_source("tiny_mlp"))


def test_pickled_module_needs_trust(tmp_path: Path) -> None:
    path = tmp_path / "mlp.pt"
    torch.save(tiny_mlp(), path)
    with pytest.raises(TrustRequiredError, match="pass --trust"):
        load_model(str(path))
    loaded = load_model(str(path), trust=True)
    assert loaded.kind == "pickle" and "trusted" not in loaded.source.to_json()
    assert _same_outputs(loaded.model, tiny_mlp())


def test_exported_program(tmp_path: Path) -> None:
    path = tmp_path / "mlp.pt2"
    torch.export.save(torch.export.export(tiny_mlp().eval(), (X,)), str(path))
    loaded = load_model(str(path))
    assert loaded.kind == "exported"
    assert _same_outputs(loaded.model, tiny_mlp())
    layers = find_layers(loaded.model, P24)
    assert [(c.shape, c.axis, c.eligible) for c in layers] == [
        ((128, 64), 1, True),
        ((64, 128), 1, True),
        ((10, 64), 1, True),
    ]


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        load_model(str(tmp_path / "missing.pt"))
    noise = tmp_path / "noise.pt"
    noise.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(SourceError, match="is not a torch"):
        load_model(str(noise))
    bad_pt2 = tmp_path / "noise.pt2"
    bad_pt2.write_bytes(b"not a zip")
    with pytest.raises(SourceError, match=r"not a (readable )?torch\.export program"):
        load_model(str(bad_pt2))
    odd = tmp_path / "model.onnx"
    odd.write_bytes(b"x")
    with pytest.raises(SourceError, match=r"unknown model file type .\.onnx."):
        load_model(str(odd))
    with pytest.raises(SourceError, match="is a directory"):
        load_model(str(tmp_path))
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.ones(3), tensor)
    with pytest.raises(SourceError, match="not a state dict"):
        load_model(str(tensor))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_pickle_that_is_not_a_model(tmp_path: Path) -> None:
    path = tmp_path / "obj.pt"
    with open(path, "wb") as fh:
        pickle.dump({"a": [1, 2, 3]}, fh)
    with pytest.raises(SourceError):
        load_model(str(path), trust=True)


# --------------------------------------------------------------------------------------------
# torchvision / timm: optional; not installable against the CPU torch here -> exit code 3


@pytest.mark.parametrize(("package", "spec"), [("torchvision", "torchvision:resnet18"), ("timm", "timm:resnet18")])
def test_missing_vision_backend_is_exit_3(package: str, spec: str) -> None:
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here: the missing-backend path cannot be shown")
    with pytest.raises(BackendUnavailableError, match=r"pip install 'nmcli\[vision\]'") as info:
        load_model(spec)
    assert info.value.exit_code == 3


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None, reason="torchvision is not installed")
def test_torchvision_model() -> None:
    loaded = load_model("torchvision:resnet18")
    assert loaded.kind == "torchvision" and any(c.eligible for c in find_layers(loaded.model, P24))


# --------------------------------------------------------------------------------------------
# Checkpoints rebuild their architecture


def test_checkpoint_rebuilds_from_its_source(tmp_path: Path) -> None:
    loaded = load_model(py_source("tiny_mlp"))
    result = prune_model(loaded.model, P24, source=loaded.source, keep_dense=True)
    sparse = model_from_checkpoint(result.checkpoint)
    assert torch.equal(sparse.state_dict()["0.weight"], result.checkpoint.tensors["0.weight"])
    dense = model_from_checkpoint(result.checkpoint, weights="dense")
    assert _same_outputs(dense, tiny_mlp())


def test_build_model_without_pretrained_weights(tiny_gpt2_dir: Path) -> None:
    model, kind = build_model(f"hf:{tiny_gpt2_dir}", pretrained=False)
    assert kind == "hf" and type(model).__name__ == "GPT2LMHeadModel"


def test_default_output_paths(tmp_path: Path) -> None:
    assert default_output_path("models/resnet.pt", "2of4") == Path("models/resnet-2of4.safetensors")
    assert default_output_path("torchvision:resnet18", "2of4") == Path("resnet18-2of4.safetensors")
    assert default_output_path("py:pkg.mod:build", "1of4") == Path("build-1of4.safetensors")
    (tmp_path / "bert").mkdir()
    assert default_output_path(f"hf:{tmp_path}/bert/", "2of4") == tmp_path / "bert-2of4.safetensors"
    assert default_output_path("m.safetensors", "", ".onnx") == Path("m.onnx")


def test_a_recorded_pickle_source_is_unpickled_again_only_while_the_store_trusts_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    path = tmp_path / "mlp.pt"
    torch.save(tiny_mlp(), path)
    ref = SourceRef.from_json({**source_ref(str(path)).to_json(), "trusted": True})  # the file's say-so: nothing
    with pytest.raises(TrustRequiredError, match=r"add --trust to run it.*or --arch SPEC"):
        load_source_model(ref)
    assert remember(path)  # the user named it with --trust once
    assert load_source_model(ref).kind == "pickle"
    torch.save(nn.Sequential(nn.Linear(64, 10)), path)  # same path, different file: trust does not carry over
    with pytest.raises(TrustRequiredError):
        load_source_model(ref)
    assert load_source_model(ref, trust=True).kind == "pickle"


_LEGIT_MLP = "from torch import nn\n\n\ndef build():\n    return nn.Sequential(nn.Linear(8, 4))\n"


def test_a_recorded_py_source_runs_only_with_trust_or_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    marker = tmp_path / "IMPORTED"
    code = tmp_path / "trust_arch_a.py"
    code.write_text(_LEGIT_MLP + f"\nimport pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n")
    ref = source_ref(f"py:{code}:build")
    with pytest.raises(TrustRequiredError, match=r"records its source as 'py:.*say-so"):
        load_source_model(ref)
    assert not marker.exists()
    assert load_source_model(ref, trust=True).kind == "py" and marker.exists()
    assert remember(code)
    assert load_source_model(ref).kind == "py"  # (imported once per process: the marker is not rewritten)


def test_a_store_trusted_dotted_source_is_compiled_from_its_text_not_a_planted_pyc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attacker ships a copy of a file the user trusted plus a ``__pycache__`` .pyc of other code
    with the copy's mtime and size: a plain import would run the .pyc."""
    import py_compile
    import subprocess
    import sys

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PYC_RAN"
    module = tmp_path / "trust_pyc_mod.py"
    legit = _LEGIT_MLP
    evil = _LEGIT_MLP + f"import pathlib; pathlib.Path({str(marker)!r}).write_text('x')\n"
    module.write_text(evil)
    py_compile.compile(str(module), cfile=importlib.util.cache_from_source(str(module)))
    stat = module.stat()
    module.write_text(legit + "#" * (len(evil) - len(legit) - 1) + "\n")  # same size, same mtime
    os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    probe = f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import trust_pyc_mod"
    subprocess.run(
        [sys.executable, "-c", probe], check=True, timeout=60, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    )
    assert marker.exists()  # the planted .pyc is what a plain import runs
    marker.unlink()
    assert remember(module)
    loaded = load_source_model(SourceRef(spec="py:trust_pyc_mod:build"))
    assert loaded.kind == "py" and not marker.exists()
    sys.modules.pop("trust_pyc_mod", None)
