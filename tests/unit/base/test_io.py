"""nmcli.io: outputs are regular files written through a temp file; OS errors are OutputWriteError."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nmcli.errors import OutputExistsError, OutputWriteError
from nmcli.io import atomic_output, atomic_write_bytes, check_output_path, temp_prefix, write_errno, writing


def test_device_output_refused_even_with_force() -> None:
    with pytest.raises(OutputExistsError, match="is a character device, not a regular file"):
        check_output_path("/dev/full", force=True)
    assert Path("/dev/full").is_char_device()


def test_fifo_output_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OutputExistsError, match="is a FIFO"):
        atomic_write_bytes(fifo, b"x", force=True)
    assert fifo.is_fifo() and os.listdir(tmp_path) == ["pipe"]


def test_symlink_to_device_refused(tmp_path: Path) -> None:
    link = tmp_path / "out.safetensors"
    link.symlink_to("/dev/null")
    with pytest.raises(OutputExistsError, match="character device"):
        check_output_path(link, force=True)


def test_name_too_long_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(OutputWriteError, match="file name too long") as info:
        check_output_path(tmp_path / ("a" * 300 + ".safetensors"), force=False)
    assert "\n" not in str(info.value) and os.listdir(tmp_path) == []


def test_temp_names_fit_for_long_output_names(tmp_path: Path) -> None:
    out = tmp_path / ("b" * 250)
    assert len(temp_prefix(out)) < 130
    atomic_write_bytes(out, b"data")
    assert out.read_bytes() == b"data" and os.listdir(tmp_path) == [out.name]


def test_writing_names_the_output_not_the_temp_file(tmp_path: Path) -> None:
    out = tmp_path / "o.bin"
    with pytest.raises(OutputWriteError, match=rf"cannot write {out}: no space left on device"), writing(out):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / ".o.bin.x.tmp"))


def test_permission_error_on_another_file_is_not_an_output_error(tmp_path: Path) -> None:
    other = OSError(errno.EACCES, "Permission denied", "/somewhere/else/input.bin")
    assert write_errno(other, tmp_path / "o.bin") is None
    assert write_errno(OSError(errno.EACCES, "Permission denied"), tmp_path / "o.bin") == errno.EACCES
    assert write_errno(OSError(errno.ENOENT, "x"), tmp_path / "o.bin") is None


_EFBIG_CHILD = """
import sys
from nmcli.io import atomic_write_bytes
from nmcli.errors import OutputWriteError
try:
    atomic_write_bytes(sys.argv[1], b"x" * 100_000)
except OutputWriteError as exc:
    print(exc)
    sys.exit(2)
"""


def _small_fsize() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, 10_000))


def test_real_efbig_is_output_write_error_and_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "big.bin"
    proc = subprocess.run(
        [sys.executable, "-c", _EFBIG_CHILD, str(out)], preexec_fn=_small_fsize, capture_output=True, text=True
    )
    assert proc.returncode == 2, proc.stderr
    assert f"cannot write {out}: file too large" in proc.stdout
    assert os.listdir(tmp_path) == []


def test_interrupt_removes_the_temp_file(tmp_path: Path) -> None:
    out = tmp_path / "o.bin"
    with pytest.raises(KeyboardInterrupt), atomic_output(out) as tmp:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []
