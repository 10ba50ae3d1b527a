"""A checkpoint's names and the rebuilt model's: a BERT base model from files saved with a head (``bert.``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nmcli.formats.checkpoint import LayerEntry
from nmcli.models.statenames import StoredNames, state_for_model
from tests.conftest import save_tiny_bert

transformers = pytest.importorskip("transformers", reason="transformers is not installed (hf extra)")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("names") / "classifier", "BertForSequenceClassification")


def _base(folder: Path) -> torch.nn.Module:
    return transformers.BertModel(transformers.AutoConfig.from_pretrained(folder))


def test_a_base_model_reads_and_writes_the_names_of_files_saved_with_a_head(classifier: Path) -> None:
    stored = load_file(str(classifier / "model.safetensors"))
    model = _base(classifier)
    names = StoredNames.of(model, stored)
    assert names.prefix == "bert."
    own = names.model_state(stored)
    assert set(own) == set(model.state_dict())  # the head (classifier.*) left out, nothing missing
    model.load_state_dict(own, strict=True)
    written = names.stored_state(model.state_dict())
    assert set(stored) - set(written) == {"classifier.weight", "classifier.bias"}
    for name, value in written.items():
        assert torch.equal(value, stored[name]), name
    assert dict(names.stored_items([("encoder.layer.0.output.dense.weight", 1)])) == {
        "bert.encoder.layer.0.output.dense.weight": 1
    }


def test_layer_entries_are_renamed_to_the_modules_of_the_model(classifier: Path) -> None:
    model = _base(classifier)
    entry = LayerEntry(
        "bert.encoder.layer.1.output.dense.weight", "bert.encoder.layer.1.output.dense", 2, 4, 1, (32, 64)
    )
    (renamed,) = StoredNames("bert.").model_layers([entry])
    modules = dict(model.named_modules())
    assert renamed.param in model.state_dict() and renamed.module in modules
    assert (renamed.n, renamed.m, renamed.axis, renamed.shape) == (2, 4, 1, (32, 64))


def test_names_a_model_already_has_are_kept(classifier: Path) -> None:
    stored = load_file(str(classifier / "model.safetensors"))
    with_head = transformers.BertForSequenceClassification(transformers.AutoConfig.from_pretrained(classifier))
    assert StoredNames.of(with_head, stored) == StoredNames()  # its own names carry bert.
    unprefixed = {k.removeprefix("bert."): v for k, v in stored.items()}
    assert StoredNames.of(_base(classifier), unprefixed) == StoredNames()  # files saved by the base model
    same = StoredNames()
    assert same.model_state(stored) == stored and same.stored("a.weight") == same.model("a.weight") == "a.weight"


def test_state_for_model_fits_a_prefixed_state_strictly(classifier: Path) -> None:
    stored = load_file(str(classifier / "model.safetensors"))
    model = _base(classifier)
    model.load_state_dict(state_for_model(model, stored), strict=True)
    weight = model.get_parameter("encoder.layer.0.output.dense.weight")
    torch.testing.assert_close(weight, stored["bert.encoder.layer.0.output.dense.weight"])
