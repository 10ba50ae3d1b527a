"""Property-based fuzzing of bad input (issue 11): whatever the bytes or option text, a command
exits 0, 1, 2 or 3 with one error line (never 4, never a traceback), prints one JSON object under
``--json``, writes nothing on failure and leaves its inputs unchanged.

The default run is small (well under a minute); ``pytest -m slow tests/cli/test_fuzz_inputs.py``
runs the same properties on 10,000 cases in all (2,500 per property).
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (dev extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from nmcli.cli.app import app  # noqa: E402
from nmcli.commands.prune import run_prune  # noqa: E402
from nmcli.errors import InputError  # noqa: E402
from nmcli.inputs import parse_input_spec  # noqa: E402
from tests.conftest import py_source  # noqa: E402

runner = CliRunner()
DEFAULT_CASES = 30
SLOW_CASES = 2_500  # x 4 properties = 10,000 cases
_SETTINGS: dict[str, Any] = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    "database": None,
}


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    out = tmp_path_factory.mktemp("fuzz") / "base.safetensors"
    run_prune(py_source("tiny_mlp"), input_shape="4x64", output=out)
    return out.read_bytes()


def _check_contract(args: list[str], folder: Path, inputs: dict[Path, bytes]) -> int:
    """Run ``nmcli ARGS --json`` in ``folder``; assert the contract; return the exit code."""
    before = sorted(p.name for p in folder.iterdir())
    result = runner.invoke(app, [*args, "--json"])
    code = result.exit_code
    text = result.stderr
    assert code in (0, 1, 2, 3), f"exit {code} for {args}: {text[-2000:]}"
    assert "Traceback" not in text and "internal error" not in text, text[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout[-2000:]
    obj = json.loads(lines[0])
    if code == 2:
        assert obj["error"]["code"] == 2 and obj["error"]["message"]
        error_lines = [line for line in text.splitlines() if line.startswith("error:")]
        assert len(error_lines) <= 1
    for path, data in inputs.items():
        assert path.read_bytes() == data, f"{path} changed"
    if code != 0:
        assert sorted(p.name for p in folder.iterdir()) == before, "a failed command wrote a file"
    return code


# --- checkpoint bytes ------------------------------------------------------------------------


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    size = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def _join(header: dict[str, Any], body: bytes) -> bytes:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + body


_JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(min_value=-3, max_value=300), max_size=4),
)

_MUTATIONS = st.one_of(
    st.tuples(st.just("truncate"), st.floats(min_value=0.0, max_value=1.0)),
    st.tuples(st.just("flip"), st.floats(min_value=0.0, max_value=1.0), st.integers(1, 255)),
    st.tuples(
        st.just("tensor"),
        st.integers(0, 50),
        st.sampled_from(["dtype", "shape", "data_offsets"]),
        st.one_of(_JSON_VALUES, st.sampled_from(["F16", "BF16", "U8", "I64", "BOOL", "F64", "XX"])),
    ),
    st.tuples(
        st.just("layer"),
        st.integers(0, 5),
        st.sampled_from(["param", "n", "m", "axis", "shape", "module"]),
        _JSON_VALUES,
    ),
    st.tuples(
        st.just("meta"), st.sampled_from(["format", "pattern", "layers", "source", "input", "history"]), _JSON_VALUES
    ),
    st.tuples(st.just("mask"), st.integers(0, 5), st.integers(0, 255)),
)


def _mutate(data: bytes, mutation: tuple[Any, ...]) -> bytes:
    kind = mutation[0]
    if kind == "truncate":
        return data[: int(mutation[1] * len(data))]
    if kind == "flip":
        if not data:
            return data
        pos = min(int(mutation[1] * len(data)), len(data) - 1)
        return data[:pos] + bytes([data[pos] ^ mutation[2]]) + data[pos + 1 :]
    try:  # structured mutations need a parseable header; after a truncation or flip, keep the bytes
        header, body = _split(data)
        layers = json.loads(header["__metadata__"]["nmcli"])["layers"]
        names = [k for k in header if k != "__metadata__"]
        if not (isinstance(layers, list) and layers and all(isinstance(e, dict) for e in layers) and names):
            return data
        if not all(isinstance(header[k], dict) for k in names):
            return data
    except Exception:
        return data
    names = [k for k in header if k != "__metadata__"]
    meta = json.loads(header["__metadata__"]["nmcli"])
    if kind == "tensor":
        header[names[mutation[1] % len(names)]][mutation[2]] = mutation[3]
    elif kind == "layer":
        layers = meta["layers"]
        layers[mutation[1] % len(layers)][mutation[2]] = mutation[3]
    elif kind == "meta":
        meta[mutation[1]] = mutation[2]
    elif kind == "mask":  # set every bit of one byte of a mask: keeps more than N of M
        masks = [k for k in names if k.startswith("__nmcli__/mask/")]
        try:  # an earlier mutation may have broken the mask's entry: then leave the bytes alone
            start, end = (int(x) for x in header[masks[mutation[1] % len(masks)]]["data_offsets"])
        except Exception:
            return data
        pos = start + mutation[2] % max(1, end - start)
        body = body[:pos] + b"\xff" + body[pos + 1 :]
    header["__metadata__"]["nmcli"] = json.dumps(meta)
    return _join(header, body)


def _fuzz_checkpoint(base: bytes, mutations: list[tuple[Any, ...]], extra: list[str]) -> None:
    data = base
    for mutation in mutations:
        data = _mutate(data, mutation)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = folder / "fuzz.safetensors"
        path.write_bytes(data)
        _check_contract(["inspect", str(path), *extra], folder, {path: data})


_CHECKPOINT_ARGS = st.sampled_from([[], ["--strict"], ["--pattern", "1:4"]])


# --- option text -------------------------------------------------------------------------------

_PATTERN_TEXT = st.one_of(
    st.text(max_size=10),
    st.builds(lambda n, m: f"{n}:{m}", st.integers(-3, 40), st.integers(-3, 40)),
    st.sampled_from(["2:4", " 2 : 4 ", "2:4:8", "nan:4", "2:", ":4", "0:4", "4:4", "1:33", "²:4"]),
)

_SHAPE_TEXT = st.one_of(
    st.text(alphabet="0123456789x:,abint_fl6 ", max_size=40),
    st.builds(lambda dims: "x".join(str(d) for d in dims), st.lists(st.integers(-1, 10**7), min_size=1, max_size=6)),
    st.sampled_from(["100000x3x100000x100000", "0x3", "1x3x224x224", "input_ids:1x128:int64", "a:1x2:float99"]),
)

_NUMBER_TEXT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "-nan", "inf", "-inf", "1e309", "-0", "0", "1e-400", "abc", "", "0x10"]),
    st.integers(-(2**70), 2**70).map(str),
)


def _fuzz_pattern(base: bytes, text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = folder / "c.safetensors"
        path.write_bytes(base)
        code = _check_contract(["inspect", str(path), "--pattern", text], folder, {path: base})
        assert code in (0, 2)


def _fuzz_shape(text: str) -> None:
    try:
        spec = parse_input_spec(text)
    except InputError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert spec.tensors and all(d > 0 for t in spec.tensors for d in t.shape)
    assert all(math.prod(t.shape) < 2**31 for t in spec.tensors)
    assert parse_input_spec(str(spec)) == spec  # printing and parsing agree


def _fuzz_numbers(base: bytes, option: str, text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = folder / "c.safetensors"
        path.write_bytes(base)
        # --no-verify and a missing output folder keep accepted numbers cheap: the command still
        # parses and checks every option before it fails on the folder (exit 2, nothing written).
        out = folder / "missing" / "x.onnx"
        code = _check_contract(["export", str(path), option, text, "--no-verify", "-o", str(out)], folder, {path: base})
        assert code == 2


_NUMBER_OPTIONS = st.sampled_from(["--atol", "--rtol", "--opset", "--workspace"])


def _properties(cases: int) -> list[Callable[..., None]]:
    common = settings(max_examples=cases, **_SETTINGS)

    @common
    @given(mutations=st.lists(_MUTATIONS, min_size=1, max_size=3), extra=_CHECKPOINT_ARGS)
    def checkpoint(base_ckpt: bytes, mutations: list[tuple[Any, ...]], extra: list[str]) -> None:
        _fuzz_checkpoint(base_ckpt, mutations, extra)

    @common
    @given(text=_PATTERN_TEXT)
    def pattern(base_ckpt: bytes, text: str) -> None:
        _fuzz_pattern(base_ckpt, text)

    @common
    @given(text=_SHAPE_TEXT)
    def shape(base_ckpt: bytes, text: str) -> None:
        _fuzz_shape(text)

    @common
    @given(option=_NUMBER_OPTIONS, text=_NUMBER_TEXT)
    def numbers(base_ckpt: bytes, option: str, text: str) -> None:
        _fuzz_numbers(base_ckpt, option, text)

    return [checkpoint, pattern, shape, numbers]


_DEFAULT = dict(zip(("checkpoint", "pattern", "shape", "numbers"), _properties(DEFAULT_CASES), strict=True))
_SLOW = dict(zip(("checkpoint", "pattern", "shape", "numbers"), _properties(SLOW_CASES), strict=True))


@pytest.mark.parametrize("prop", sorted(_DEFAULT))
def test_fuzz(prop: str, base_ckpt: bytes) -> None:
    _DEFAULT[prop](base_ckpt)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("prop", sorted(_SLOW))
def test_fuzz_slow(prop: str, base_ckpt: bytes) -> None:
    _SLOW[prop](base_ckpt)


def test_fuzz_harness_catches_a_broken_contract(tmp_path: Path, base_ckpt: bytes) -> None:
    """The checker is not vacuous: a changed input is caught."""
    path = tmp_path / "c.safetensors"
    path.write_bytes(base_ckpt)
    with pytest.raises(AssertionError, match="changed"):
        _check_contract(["inspect", str(path)], tmp_path, {path: b"other"})
    shutil.rmtree(tmp_path / "c.safetensors", ignore_errors=True)
