"""nmcli's exception types: each maps to one process exit code (DESIGN.md section 1).

The core raises these; only ``nmcli.cli.app`` turns them into exit codes and red lines.
Messages say what is wrong and how to fix it, in one line.
"""

from __future__ import annotations


class NmcliError(Exception):
    """Base class of every error nmcli reports to users."""

    exit_code: int = 4


class CheckFailedError(NmcliError):
    """The command ran and found what the user asked it to detect (exit 1)."""

    exit_code = 1


class InputError(NmcliError):
    """Bad usage or bad input: pattern, path, file contents, options (exit 2)."""

    exit_code = 2


class PatternError(InputError):
    """A malformed or unsupported N:M pattern."""


class SourceError(InputError):
    """A model source that cannot be loaded (missing file, unknown factory, bad --arch)."""


class NoArchitectureError(SourceError):
    """A plain state dict (or a checkpoint pruned from one with --infer-layers) where a model is needed: --arch."""


class TrustRequiredError(SourceError):
    """A pickle that would run the file's code when loaded, given without --trust."""


class CheckpointError(InputError):
    """A missing, corrupt or incompatible nmcli/1 checkpoint."""


class OutputExistsError(InputError):
    """An output path that exists (without --force) or that names an input."""


class OutputWriteError(InputError):
    """An output the operating system would not let nmcli write: no space, quota, name too long,
    permission, read-only file system, I/O error, file too large (exit 2, not a bug of nmcli)."""


class DataError(InputError):
    """A training data spec that cannot be read or does not fit the model."""


class MismatchError(InputError):
    """Two models that cannot be compared (names, shapes or patterns differ)."""


class BackendUnavailableError(NmcliError):
    """A needed optional package or device is missing (exit 3)."""

    exit_code = 3


class ExportUnsupportedError(BackendUnavailableError):
    """torch's ONNX exporters cannot export a model that runs in torch (exit 3).

    Not exit 2: the input is valid; the backend (torch.onnx for this torch/transformers version)
    lacks what the model needs, as with a missing package. Not exit 4: it is no bug of nmcli.
    ``exporter_output`` holds what the exporters printed (kept off stdout).
    """

    exporter_output: str = ""


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGTERM, SIGHUP) that the CLI turns into KeyboardInterrupt, so the cleanup
    that Ctrl-C runs (temporary files removed, finetune's resumable save) runs for it too; the
    process then exits 128 + ``signum``."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


__all__ = [
    "BackendUnavailableError",
    "CheckFailedError",
    "CheckpointError",
    "DataError",
    "ExportUnsupportedError",
    "InputError",
    "Interrupted",
    "MismatchError",
    "NmcliError",
    "OutputExistsError",
    "OutputWriteError",
    "PatternError",
    "SourceError",
    "TrustRequiredError",
]
