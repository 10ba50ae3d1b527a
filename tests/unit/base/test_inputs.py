"""Input specs (``--input-shape``): parsing, printing and example inputs."""

from __future__ import annotations

import pytest
import torch

from nmcli.errors import InputError
from nmcli.inputs import InputSpec, InputTensor, example_inputs, parse_input_spec


def test_single_unnamed_float_input() -> None:
    spec = parse_input_spec("1x3x224x224")
    assert spec.tensors == (InputTensor("", (1, 3, 224, 224), torch.float32),)
    assert str(spec) == "1x3x224x224" and not spec.named and spec.batch_size == 1


def test_named_inputs_with_dtypes() -> None:
    spec = parse_input_spec(" input_ids:2x128:int64, attention_mask:2x128:int64 ")
    assert [t.name for t in spec.tensors] == ["input_ids", "attention_mask"]
    assert all(t.shape == (2, 128) and t.dtype == torch.int64 for t in spec.tensors)
    assert spec.named and spec.batch_size == 2
    assert str(spec) == "input_ids:2x128:int64,attention_mask:2x128:int64"


@pytest.mark.parametrize(
    ("text", "dtype"), [("x:1x8", torch.float32), ("x:1x8:fp16", torch.float16), ("x:1x8:bf16", torch.bfloat16)]
)
def test_dtype_aliases(text: str, dtype: torch.dtype) -> None:
    (tensor,) = parse_input_spec(text).tensors
    assert tensor.dtype == dtype


@pytest.mark.parametrize(
    "text", ["1x3x224x224", "input_ids:1x128:int64,attention_mask:1x128:int64", "x:4x8:float16", "pixels:1x3x32x32"]
)
def test_str_round_trips(text: str) -> None:
    spec = parse_input_spec(text)
    assert parse_input_spec(str(spec)) == spec


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty --input-shape"),
        ("   ", "empty --input-shape"),
        ("1x3xfoo", "malformed input shape"),
        ("1,,2", "malformed input shape"),
        (":1x3", "malformed input shape"),
        ("a:b:c:d", "malformed input shape"),
        ("x:1x3:complex7", "unknown dtype 'complex7'"),
        ("1x0x3", "has a zero dimension"),
    ],
)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_input_spec(text)


def test_with_batch_changes_only_the_leading_dim() -> None:
    spec = parse_input_spec("a:1x16:int64,b:1x3x4")
    assert str(spec.with_batch(8)) == "a:8x16:int64,b:8x3x4:float32"


def test_example_inputs_positional() -> None:
    args, kwargs = example_inputs(parse_input_spec("2x3x8x8"), dtype=torch.float16)
    assert kwargs == {} and len(args) == 1
    assert args[0].shape == (2, 3, 8, 8) and args[0].dtype == torch.float16
    again, _ = example_inputs(parse_input_spec("2x3x8x8"), dtype=torch.float16)
    assert torch.equal(args[0], again[0])  # seeded


def test_example_inputs_named_tokens_and_masks() -> None:
    spec = parse_input_spec("input_ids:1x16:int64,attention_mask:1x16:int64,token_type_ids:1x16:int64")
    args, kwargs = example_inputs(spec, batch_size=4, vocab_size=50)
    assert args == () and list(kwargs) == ["input_ids", "attention_mask", "token_type_ids"]
    ids = kwargs["input_ids"]
    assert ids.shape == (4, 16) and ids.dtype == torch.int64 and int(ids.min()) >= 0 and int(ids.max()) < 50
    assert bool(kwargs["attention_mask"].eq(1).all()) and bool(kwargs["token_type_ids"].eq(0).all())


def test_input_spec_is_hashable_and_comparable() -> None:
    a = InputSpec((InputTensor("", (1, 4)),))
    assert a == parse_input_spec("1x4") and hash(a) == hash(parse_input_spec("1x4"))
