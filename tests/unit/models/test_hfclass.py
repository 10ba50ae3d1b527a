"""``--model-class`` against what a checkpoint records, and where no ``hf:`` source takes it (nmcli.models.hfclass)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nmcli.errors import SourceError
from nmcli.formats.checkpoint import SourceRef
from nmcli.models.hfclass import check_recorded_class, not_an_hf_source

BASE = SourceRef(spec="hf:/m/classifier", model_class="base")
AUTO = SourceRef(spec="hf:/m/classifier")


@pytest.mark.parametrize(("ref", "given"), [(BASE, "auto"), (BASE, "base"), (AUTO, "auto")])
def test_the_default_or_the_recorded_class_passes(ref: SourceRef, given: str) -> None:
    check_recorded_class("c.safetensors", ref, given)


def test_a_contradicting_class_names_the_recorded_one_and_the_ways_out() -> None:
    with pytest.raises(SourceError) as err:
        check_recorded_class("c.safetensors", BASE, "BertForMaskedLM")
    message = str(err.value)
    assert "'BertForMaskedLM' contradicts c.safetensors" in message and "(--model-class base)" in message
    assert "drop --model-class" in message and "--arch hf:DIR" in message
    with pytest.raises(SourceError) as err:
        check_recorded_class("c.safetensors", AUTO, "base", arch_hint=False)
    assert "(--model-class auto)" in str(err.value) and "--arch" not in str(err.value)


def test_a_checkpoint_of_another_source_takes_no_class() -> None:
    ref = SourceRef(spec="torchvision:resnet18")
    with pytest.raises(SourceError, match=r"pruned from torchvision:resnet18, which is not one: drop --model-class"):
        check_recorded_class("r.safetensors", ref, "base")
    plain = SourceRef(spec="/m/sd.safetensors", arch="hf:/m/bert", model_class="base")  # a state dict in an hf: arch
    check_recorded_class("s.safetensors", plain, "base")


def test_the_refusal_for_other_sources_quotes_the_value() -> None:
    assert str(not_an_hf_source("model.onnx", "")) == (
        "--model-class '' picks the transformers class of an hf: source, and model.onnx is not one: drop --model-class"
    )


def test_the_checks_import_no_torch() -> None:
    code = "import sys, nmcli.models.hfclass, nmcli.models.statenames; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
