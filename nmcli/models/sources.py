"""Model sources: every form of MODEL, ``--arch`` and ``--teacher`` in DESIGN.md section 1.

| form                         | meaning                                                          |
|------------------------------|------------------------------------------------------------------|
| ``file.safetensors``         | an nmcli checkpoint, or a plain state dict (needs ``--arch``)     |
| ``file.pt`` / ``.pth``       | TorchScript; a state dict (needs ``--arch``); a pickled module    |
|                              | (only with ``--trust``: unpickling runs the file's code)          |
| ``file.pt2``                 | a ``torch.export`` ExportedProgram                                |
| ``hf:ID_OR_DIR``             | a transformers model (class from ``config.architectures``)        |
| ``torchvision:NAME[:WEIGHTS]`` | ``torchvision.models.get_model(NAME, weights=WEIGHTS)``         |
| ``timm:NAME``                | ``timm.create_model(NAME)``                                       |
| ``py:package.module:factory``| ``factory()`` returns the module (``py:path/file.py:factory`` too)|

A checkpoint records its source; :func:`model_from_checkpoint` rebuilds the architecture from it
(``--arch`` overrides) and loads the checkpoint's tensors.
"""

from __future__ import annotations

import contextlib
import copy
import pickle
import sys
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nmcli import trust as trust_store
from nmcli.errors import BackendUnavailableError, NmcliError, NoArchitectureError, SourceError, TrustRequiredError
from nmcli.formats.checkpoint import Checkpoint, SourceRef
from nmcli.formats.open import PREFIXES, SAFETENSORS_FORMS, CheckpointSource, Form, classify, open_checkpoint
from nmcli.formats.safetensors import sha256_file
from nmcli.formats.sharded import check_hf_directory
from nmcli.formats.torchfiles import (
    find_state_dict,
    is_exported_program,
    is_torchscript_archive,
    load_exported_program,
    looks_pickled,
    strip_wrapper_prefixes,
    traced_inputs,
)
from nmcli.inputs import InputSpec, parse_input_spec
from nmcli.models.hfclass import AUTO, check_recorded_class, choose_hf_class, not_an_hf_source
from nmcli.models.hub import check_hub_id
from nmcli.models.layers import first_linear_input
from nmcli.models.statenames import state_for_model
from nmcli.usercode import import_factory, torch_quiet, user_code

_EMPTY = "empty model source: give a file (.safetensors, .pt, .pth, .pt2) or an hf:, torchvision:, timm:, py: source"
EXTRAS_HINT = {
    "transformers": "pip install 'nmcli[hf]'",
    "torchvision": "pip install 'nmcli[vision]'",
    "timm": "pip install 'nmcli[vision]'",
}


@dataclass
class LoadedModel:
    """A model and where it came from.

    Attributes:
        model: the module, in eval mode, on the CPU.
        source: the root source (for a checkpoint: the source it was pruned from).
        kind: ``checkpoint``, ``state_dict``, ``torchscript``, ``pickle``, ``exported``, ``hf``,
            ``torchvision``, ``timm`` or ``py``.
        name: a short name for default output files (``resnet`` -> ``resnet-2of4.safetensors``).
        path: the local file or folder given, if any (outputs go beside it, never onto it).
        checkpoint: the nmcli/1 checkpoint when the model was read from one.
        input_spec: the input spec stored in the checkpoint, or guessed for transformers models.
    """

    model: nn.Module
    source: SourceRef
    kind: str
    name: str
    path: Path | None = None
    checkpoint: Checkpoint | None = None
    input_spec: InputSpec | None = None


def _missing_backend(package: str, spec: str) -> BackendUnavailableError:
    return BackendUnavailableError(
        f"{spec} needs the {package} package, which is not installed: {EXTRAS_HINT[package]}"
    )


def _abs_if_local(path_part: str) -> str:
    if not path_part:  # Path("") is the current folder: an empty spec stays empty
        return path_part
    return str(Path(path_part).expanduser().resolve()) if Path(path_part).expanduser().exists() else path_part


def normalize_spec(spec: str) -> str:
    """The spec with local paths made absolute, so a checkpoint's source resolves from any folder."""
    if spec.startswith("hf:"):
        return "hf:" + _abs_if_local(spec[3:])
    if spec.startswith("py:"):
        module, sep, factory = spec[3:].rpartition(":")
        if module.endswith(".py"):
            return f"py:{_abs_if_local(module)}{sep}{factory}"
        return spec
    if spec.startswith(PREFIXES):
        return spec
    return _abs_if_local(spec)


def _source_file(spec: str) -> Path | None:
    """The local file whose sha256 identifies the source, if there is one (found without importing anything)."""
    if spec.startswith("hf:"):
        folder = Path(spec[3:])
        if folder.is_dir():
            for name in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "config.json"):
                if (folder / name).is_file():
                    return folder / name
        return None
    if spec.startswith("py:"):
        files = trust_store.spec_files(spec)
        return files[-1] if files else None
    if spec.startswith(PREFIXES):
        return None
    path = Path(spec)
    return path if path.is_file() else None


def source_ref(spec: str, arch: str | None = None, model_class: str = "auto") -> SourceRef:
    """A :class:`SourceRef` for ``spec`` with the sha256 of its source file (and an ``hf:`` source's
    ``--model-class`` when it is not ``auto``)."""
    spec = normalize_spec(spec)
    file = _source_file(spec)
    return SourceRef(
        spec=spec,
        sha256=sha256_file(file) if file else None,
        arch=normalize_spec(arch) if arch else None,
        model_class=model_class if model_class != "auto" and spec.startswith("hf:") else None,
    )


def _from_py(spec: str) -> nn.Module:
    factory = import_factory(spec)
    try:
        with user_code(spec):
            model = factory()
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(f"{spec}: the factory raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise SourceError(f"{spec}: the factory returned {_a(type(model).__name__)}, not a torch.nn.Module")
    return model


def _a(noun: str) -> str:
    """``noun`` with its indefinite article: ``an int``, ``a list``."""
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _from_hf(spec: str, pretrained: bool = True, model_class: str = "auto") -> nn.Module:
    try:
        import transformers
    except ImportError as exc:
        raise _missing_backend("transformers", spec) from exc
    ident = spec[3:]
    # transformers' own "Loading weights" bars would break the one-JSON-object/one-line contract.
    transformers.utils.logging.disable_progress_bar()
    if not ident:
        raise SourceError("hf: needs a model id or a local directory, e.g. hf:./my-model")
    check_hub_id(spec, ident)
    if Path(ident).is_dir():  # transformers follows the indexes' file names: each is checked first
        check_hf_directory(Path(ident))
    try:
        with user_code(spec):
            return _hf_model(transformers, ident, pretrained, model_class)
    except NmcliError:  # nmcli's own check of the folder (class choice, a truncated shard): its own words
        raise
    except Exception as exc:
        hint = (
            "" if Path(ident).is_dir() else "; offline, give a local directory (hf:./path) saved with save_pretrained"
        )
        raise SourceError(
            f"{spec}: transformers could not load it ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}){hint}"
        ) from exc


def _hf_model(transformers: Any, ident: str, pretrained: bool, model_class: str = "auto") -> nn.Module:
    """The transformers model of ``ident``: the class :func:`nmcli.models.hfclass.choose_hf_class` picks."""
    # trust_remote_code=False: a directory's auto_map names Python files in it; nmcli never runs them.
    config = transformers.AutoConfig.from_pretrained(ident, trust_remote_code=False)
    cls = choose_hf_class(transformers, ident, config, model_class)
    if pretrained:
        return cls.from_pretrained(ident, trust_remote_code=False)
    return cls.from_config(config) if cls is transformers.AutoModel else cls(config)


def _from_torchvision(spec: str, pretrained: bool = True) -> nn.Module:
    try:
        import torchvision
    except Exception as exc:  # ImportError, or a torchvision built for another torch
        raise _missing_backend("torchvision", spec) from exc
    name, _, weights = spec[len("torchvision:") :].partition(":")
    try:
        with user_code(spec):
            return torchvision.models.get_model(name, weights=(weights or None) if pretrained else None)
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(
            f"{spec}: torchvision could not build it ({exc}); list names with torchvision.models.list_models()"
        ) from exc


def _from_timm(spec: str, pretrained: bool = True) -> nn.Module:
    try:
        import timm
    except Exception as exc:
        raise _missing_backend("timm", spec) from exc
    try:
        with user_code(spec):
            return timm.create_model(spec[len("timm:") :])
    except SourceError:
        raise
    except Exception as exc:
        raise SourceError(f"{spec}: timm could not build it ({exc})") from exc


def _state_dict_of(obj: Any) -> dict[str, torch.Tensor] | None:
    """The state dict in a loaded torch file (training-checkpoint wrappers and prefixes: nmcli.formats.torchfiles)."""
    try:
        state, _ = find_state_dict(obj)
    except SourceError:
        return None
    return strip_wrapper_prefixes(state)[0]


def _read_torch_file(path: Path, trust: bool) -> tuple[str, Any]:
    """Classify a ``.pt``/``.pth`` file: ``("torchscript", module)``, ``("exported", module)`` (a
    ``torch.export`` archive saved as ``.pt``), ``("state_dict", dict)`` or ``("pickle", module)``."""
    if is_exported_program(path):
        try:
            return "exported", load_exported_program(path).module()
        except Exception as exc:
            raise SourceError(f"{path} is not a readable torch.export program ({type(exc).__name__}: {exc})") from exc
    if is_torchscript_archive(path):
        try:
            return "torchscript", torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise SourceError(f"{path}: a TorchScript archive that torch.jit.load cannot read ({exc})") from exc
    if not looks_pickled(path):
        raise SourceError(
            f"{path} is not a torch file (neither a torch zip archive nor a pickle): it may be corrupt; re-create it"
        )
    try:
        with torch_quiet():
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust:
            raise TrustRequiredError(
                f"{path} is a pickled Python object, and unpickling runs the file's code: pass --trust if you "
                "trust its author, or save a state dict or TorchScript instead"
            ) from exc
        try:
            with torch_quiet(), user_code(str(path)):
                obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except SourceError:
            raise
        except Exception as exc2:
            raise SourceError(f"{path}: unpickling failed ({type(exc2).__name__}: {exc2})") from exc2
        if isinstance(obj, nn.Module):
            return "pickle", obj
        state = _state_dict_of(obj)
        if state is not None:
            return "state_dict", state
        raise SourceError(f"{path} holds a {type(obj).__name__}, not an nn.Module or a state dict") from exc
    except Exception as exc:
        raise SourceError(
            f"{path} is not a readable torch file ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    state = _state_dict_of(obj)
    if state is None:
        raise SourceError(f"{path} holds a {type(obj).__name__}, not a state dict, module or TorchScript archive")
    return "state_dict", state


def _no_architecture(spec: str) -> NoArchitectureError:
    return NoArchitectureError(
        f"{spec} is a plain state dict with no architecture: pass --arch SPEC (e.g. py:mypkg.models:build), "
        "or prune it with --infer-layers"
    )


def build_model(
    spec: str, *, trust: bool = False, pretrained: bool = True, model_class: str = "auto"
) -> tuple[nn.Module, str]:
    """Build the model that ``spec`` names, with its own weights: ``(module, kind)``.

    ``model_class`` (``--model-class``) picks the transformers class of an ``hf:`` source
    (:mod:`nmcli.models.hfclass`); given for any other source it is refused (exit 2).

    Plain state dicts are not models: they raise :class:`SourceError` asking for ``--arch``.
    ``pretrained=False`` skips weight downloads where the source allows (hf, torchvision), for
    when the caller loads weights itself.
    """
    kind = classify(spec)
    if kind.form is Form.EMPTY:
        raise SourceError(_EMPTY)
    if model_class != AUTO and kind.prefix != "hf:":
        raise not_an_hf_source(spec, model_class)
    if kind.prefix == "py:":
        return _from_py(spec), "py"
    if kind.prefix == "hf:":
        return _from_hf(spec, pretrained, model_class), "hf"
    if kind.prefix == "torchvision:":
        return _from_torchvision(spec, pretrained), "torchvision"
    if kind.prefix == "timm:":
        return _from_timm(spec, pretrained), "timm"
    path = Path(spec) if kind.path is None else kind.path
    if kind.form is Form.MISSING:
        raise SourceError(
            f"{spec} does not exist: give a file (.safetensors, .pt, .pth, .pt2) or hf:, torchvision:, timm:, py: source"
        )
    if kind.is_directory:
        if kind.is_hf_directory:
            raise SourceError(f"{spec} is a directory: for a transformers model write hf:{spec}")
        raise SourceError(f"{spec} is a directory, not a model file")
    if kind.form in SAFETENSORS_FORMS:
        raise _no_architecture(spec)
    if kind.form is Form.EXPORTED:
        if not zipfile.is_zipfile(path):
            raise SourceError(
                f"{spec} is not a torch.export program (not a zip archive): it may be corrupt; re-create it"
            )
        try:
            with torch_quiet():
                return torch.export.load(str(path)).module(), "exported"
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise SourceError(f"{spec} is not a readable torch.export program ({type(exc).__name__}: {first})") from exc
    if kind.form is Form.TORCH_FILE:
        loaded_kind, obj = _read_torch_file(path, trust)
        if loaded_kind == "state_dict":
            raise _no_architecture(spec)
        return obj, loaded_kind
    raise SourceError(
        f"{spec}: unknown model file type {path.suffix.lower()!r}: use .safetensors, .pt, .pth or .pt2, or a prefixed source"
    )


class _LazyState(Mapping[str, torch.Tensor]):
    """The state dict of an open safetensors file, read one tensor at a time (shapes from the header)."""

    def __init__(self, reader: CheckpointSource) -> None:
        self._reader = reader
        self._names = reader.state_names
        self._known = set(self._names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._known:
            raise KeyError(name)
        return self._reader.tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def shape_of(self, name: str) -> tuple[int, ...]:
        return self._reader.shape(name)


def _shape_of(state: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    return state.shape_of(name) if isinstance(state, _LazyState) else tuple(state[name].shape)


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``model`` strictly, turning a mismatch into a clear :class:`SourceError`."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {_shape_of(state, k)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and _shape_of(state, k) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        if wrong:
            parts.append(f"shape {', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}")
        raise SourceError(f"{what} does not fit the architecture ({'; '.join(parts)}): check --arch")
    with torch.no_grad():
        for key, value in own.items():
            value.copy_(state[key].to(value.dtype))


def eval_mode(model: nn.Module) -> nn.Module:
    """``model.eval()``; a ``torch.export`` module (which refuses ``eval()``) is returned as exported."""
    try:
        return model.eval()
    except NotImplementedError:
        return model


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters stay leaves (a ScriptModule's deepcopy under autograd
    makes them non-leaf), without torch's pytree deprecation warning for a ``torch.export`` module."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(model)


def _refusal(recorded: str) -> TrustRequiredError:
    """The one-line refusal to run a checkpoint's recorded source ``recorded`` without the user's say-so."""
    return TrustRequiredError(
        f"the checkpoint records its source as {recorded}: that is code (a py: factory or a pickle), and nmcli "
        "will not run code on a file's say-so: add --trust to run it if you trust the checkpoint's author, "
        "or --arch SPEC to rebuild from a source you name"
    )


def _recorded_trust(spec: str, trust: bool) -> bool:
    """The ``trust`` to build a checkpoint's recorded source ``spec`` with.

    ``--trust`` on the command line, or every file of ``spec`` in the user's trust store by its
    current sha256 (:mod:`nmcli.trust`); a ``trusted`` flag in the checkpoint counts for nothing.
    Only a file that may be a pickle gains from the store: a recorded ``.safetensors`` (another
    checkpoint) never passes trust on to its own recorded source.

    Raises:
        TrustRequiredError: ``spec`` is a ``py:`` source (code by definition) that is not trusted.
    """
    if trust:
        return True
    if spec.startswith("py:"):
        if trust_store.spec_trusted(spec):
            return True
        module = spec[3:].rpartition(":")[0]
        if module.endswith(".py") and not Path(module).expanduser().exists():
            return False  # a moved file runs nothing: the build reports it missing (pass --arch)
        raise _refusal(repr(spec))
    if spec.startswith(PREFIXES):
        return False
    path = Path(spec)
    return path.suffix.lower() in trust_store.PICKLE_SUFFIXES and trust_store.is_trusted(path)


def _dotted_py(spec: str) -> bool:
    """A ``py:package.module:factory`` spec (imported through ``sys.path``, not from a file path)."""
    return spec.startswith("py:") and not spec[3:].rpartition(":")[0].endswith(".py")


@contextlib.contextmanager
def _source_only(active: bool) -> Iterator[None]:
    """While ``active``: import Python modules from their ``.py`` text, never a ``__pycache__`` file
    beside them (whose code need not match the sha256-checked source), and write no bytecode.

    For a dotted ``py:`` source trusted through the store (``py:file.py`` sources are always
    compiled from their text, see :func:`import_module`). Modules first imported inside the block
    are compiled afresh, which costs time, so only store-trusted rebuilds use it."""
    if not active:
        yield
        return
    saved = sys.pycache_prefix, sys.dont_write_bytecode
    import tempfile

    with tempfile.TemporaryDirectory(prefix="nmcli-pycache-") as empty:
        sys.pycache_prefix, sys.dont_write_bytecode = empty, True
        try:
            yield
        finally:
            sys.pycache_prefix, sys.dont_write_bytecode = saved


def _rebuild(ref: SourceRef, arch: str | None, trust: bool, model_class: str = AUTO) -> nn.Module:
    """The architecture of a checkpoint: from the user's ``--arch`` (built as any source they name),
    else from the recorded source, which runs code only with ``--trust`` or the trust store.

    An ``hf:`` architecture is built as the transformers class prune's ``--model-class`` chose
    (recorded in the source), so the tensors find the names they were saved under; ``model_class``
    is the user's ``--model-class`` (:func:`_class_for`)."""
    cls = _class_for(ref, arch, model_class)
    if arch:
        spec, may, recorded = arch, trust, False
    else:
        spec = ref.arch or ref.spec
        may, recorded = _recorded_trust(spec, trust), True
    try:
        with _source_only(recorded and may and not trust and _dotted_py(spec)):
            model, _ = build_model(spec, trust=may, pretrained=False, model_class=cls)
    except TrustRequiredError:
        if recorded:
            raise _refusal(repr(spec)) from None
        raise
    except NoArchitectureError:
        if not recorded:
            raise
        raise NoArchitectureError(
            f"the checkpoint was pruned from the plain state dict {spec} (--infer-layers), which holds no "
            "architecture to rebuild: pass --arch SPEC naming the model's class (e.g. py:mypkg.models:build)"
        ) from None
    except NmcliError as exc:
        raise type(exc)(
            f"cannot rebuild the architecture from {spec!r} ({exc}); pass --arch SPEC if the source moved"
        ) from exc
    return model


def rebuild_architecture(
    ref: SourceRef, *, arch: str | None = None, trust: bool = False, model_class: str = AUTO
) -> nn.Module:
    """A checkpoint's architecture without its weights: ``arch`` when given, else the recorded source
    (whose code runs only with ``trust`` or the trust store); ``model_class`` as in :func:`_class_for`.
    Under :func:`~nmcli.models.skeleton.parameters_on_meta` its parameters are on the meta device."""
    return _rebuild(ref, arch, trust, model_class)


def _class_for(ref: SourceRef, arch: str | None, model_class: str) -> str:
    """The ``--model-class`` to build a checkpoint's architecture with.

    With the user's ``arch``: their ``model_class`` (``auto``: the recorded class when ``arch`` is an
    ``hf:`` folder too), as ``--arch`` overrides the recorded source. Without it: the recorded class,
    which ``model_class`` may only repeat.

    Raises:
        SourceError: ``model_class`` contradicts the recorded class (:func:`~nmcli.models.hfclass.check_recorded_class`).
    """
    if arch:
        if model_class != AUTO:
            return model_class
        return (ref.model_class or AUTO) if arch.startswith("hf:") else AUTO
    check_recorded_class("the checkpoint", ref, model_class)
    return ref.model_class or AUTO


def load_source_model(
    ref: SourceRef, *, arch: str | None = None, trust: bool = False, model_class: str = AUTO
) -> LoadedModel:
    """The model a checkpoint was pruned from, with the source's own (dense) weights.

    A plain state-dict source is loaded into its recorded ``--arch`` (``arch`` overrides it);
    any other source is loaded as it is, or from ``arch`` when the source moved. ``ref`` is what a
    checkpoint records, so its code runs only with ``trust`` or while the trust store holds its
    files' current sha256 (:func:`_recorded_trust`); ``arch`` and ``model_class`` are the user's own
    (:func:`_class_for`).

    Raises:
        TrustRequiredError: the recorded source is code and neither ``trust`` nor the store allows it.
    """
    cls = _class_for(ref, arch, model_class)
    if ref.arch:
        build = arch or ref.arch
        arch_trust = trust if arch else _recorded_trust(ref.arch, trust)
        recorded = f"{ref.spec!r} with --arch {ref.arch!r}" if not arch else repr(ref.spec)
        try:
            with _source_only(not arch and arch_trust and not trust and _dotted_py(ref.arch)):
                return _load_model(ref.spec, build, _recorded_trust(ref.spec, trust), arch_trust, cls)
        except TrustRequiredError:
            raise _refusal(recorded) from None
    if arch:
        return load_model(arch, trust=trust, model_class=cls)
    may = _recorded_trust(ref.spec, trust)
    try:
        with _source_only(may and not trust and _dotted_py(ref.spec)):
            return load_model(ref.spec, trust=may, model_class=cls)
    except TrustRequiredError:
        raise _refusal(repr(ref.spec)) from None


def model_from_checkpoint(
    ckpt: Checkpoint,
    *,
    arch: str | None = None,
    trust: bool = False,
    weights: str = "effective",
    model_class: str = AUTO,
) -> nn.Module:
    """Rebuild the checkpoint's architecture and load its tensors (under the model's names:
    :func:`~nmcli.models.statenames.state_for_model`).

    Args:
        ckpt: the checkpoint.
        arch: a source spec that overrides the stored source (moved or missing source).
        trust: allow unpickling a pickled-module source.
        weights: ``effective`` (the sparse model) or ``dense`` (the stored dense weights where the
            checkpoint has them, effective elsewhere).
        model_class: the user's ``--model-class`` (:func:`_class_for`).
    """
    model = _rebuild(ckpt.meta.source, arch, trust, model_class)
    state = dict(ckpt.tensors)
    if weights == "dense":
        state.update(ckpt.dense)
    load_weights(model, state_for_model(model, state), f"the checkpoint's tensors ({ckpt.meta.source.spec})")
    return eval_mode(model)


def _short_name(spec: str) -> str:
    if spec.startswith(("torchvision:", "timm:")):
        return spec.split(":")[1]
    if spec.startswith("hf:"):
        return Path(spec[3:].rstrip("/")).name or "model"
    if spec.startswith("py:"):
        return spec.rpartition(":")[2]
    return Path(spec).stem


def guess_input_spec(model: nn.Module) -> InputSpec | None:
    """The default input spec of transformers models (token ids and mask of 1x128), the recorded
    one of a ``torch.export`` program with one tensor input, ``1 x in_features`` for a model whose
    first layer is a Linear and that runs on it (:func:`nmcli.models.layers.first_linear_input`), else None."""
    config = getattr(model, "config", None)
    if config is not None and getattr(model, "main_input_name", None) == "input_ids":
        return parse_input_spec("input_ids:1x128:int64,attention_mask:1x128:int64")
    spec = exported_input_spec(model)
    if spec is None and fixed_graph_kind(model) is None and (features := first_linear_input(model)) is not None:
        spec = parse_input_spec(f"1x{features}")  # a Linear-first model that ran on 1 x in_features
    return spec


def fixed_graph_kind(model: nn.Module) -> str | None:
    """``"TorchScript"`` for a ScriptModule (or a module holding one), ``"torch.export"`` for an
    ExportedProgram's module, else None: models whose graph was fixed when they were saved. They run
    and export, but cannot be re-parametrized (SR-STE) or switched to training mode."""
    if any(isinstance(m, torch.jit.ScriptModule) for m in model.modules()):
        return "TorchScript"
    if isinstance(model, torch.fx.GraphModule) and hasattr(model, "_in_spec"):
        return "torch.export"
    return None


def exported_input_spec(model: nn.Module) -> InputSpec | None:
    """The input a ``torch.export`` module (``ExportedProgram.module()``) was exported with, when it
    takes one tensor: its shape (a dynamic dimension at its example size) and dtype; else None.

    Such a module checks its inputs against that shape, so it is the only one it runs on (bar
    dynamic dimensions).
    """
    if not isinstance(model, torch.fx.GraphModule) or fixed_graph_kind(model) != "torch.export":
        return None
    values = [node.meta.get("val") for node in model.graph.nodes if node.op == "placeholder"]
    if len(values) != 1 or not isinstance(values[0], torch.Tensor):
        return None
    dims = [d if isinstance(d, int) else getattr(getattr(d, "node", None), "hint", None) for d in values[0].shape]
    if not dims or not all(isinstance(d, int) and d > 0 for d in dims):
        return None
    text = "x".join(str(d) for d in dims)
    dtype = str(values[0].dtype).removeprefix("torch.")
    try:
        return parse_input_spec(text if dtype == "float32" else f"input:{text}:{dtype}")
    except NmcliError:  # a dtype --input-shape cannot name
        return None


def load_model(spec: str, *, arch: str | None = None, trust: bool = False, model_class: str = "auto") -> LoadedModel:
    """Load any MODEL form, with ``--arch`` for plain state dicts (or to override a checkpoint's source).

    ``spec`` and ``arch`` are the caller's own choice (the command line); an nmcli checkpoint's
    recorded source is rebuilt only with ``trust`` or from the trust store (:func:`model_from_checkpoint`).

    Raises:
        SourceError: missing/corrupt file, unknown factory, state dict without ``--arch`` or not fitting it.
        TrustRequiredError: a pickled module without ``trust``, or a checkpoint whose recorded source is code.
        CheckpointError: an nmcli checkpoint that fails validation.
        BackendUnavailableError: the package behind ``hf:``/``torchvision:``/``timm:`` is missing.
    """
    return _load_model(spec, arch, trust, trust, model_class)


def _load_model(spec: str, arch: str | None, trust: bool, arch_trust: bool, model_class: str = AUTO) -> LoadedModel:
    """:func:`load_model`, with ``trust`` for unpickling ``spec`` and ``arch_trust`` for building ``arch``
    (and for a checkpoint's recorded source when there is no ``arch``). ``model_class`` is the class of an
    ``hf:`` ``spec`` or ``arch``; a checkpoint without ``arch`` is rebuilt as it records, which it may only repeat."""
    kind = classify(spec)
    if kind.form is Form.EMPTY:
        raise SourceError(_EMPTY)
    path, name = kind.path, _short_name(spec)
    if path is not None and (kind.is_checkpoint or kind.form is Form.STATE_DICT):
        with open_checkpoint(kind) as reader:
            if reader.is_nmcli:
                if not arch and reader.meta is not None:  # before anything is loaded
                    check_recorded_class(spec, reader.meta.source, model_class)
                ckpt = reader.load()  # a sharded directory is loaded whole: it must fit in memory
                if kind.form is Form.SHARDED_CHECKPOINT:  # rebuilt from its own config.json
                    own = arch or f"hf:{path.resolve()}"
                    model = model_from_checkpoint(ckpt, arch=own, trust=arch_trust, model_class=model_class)
                else:
                    may = arch_trust if arch else trust
                    model = model_from_checkpoint(ckpt, arch=arch, trust=may, model_class=model_class)
                input_spec = parse_input_spec(ckpt.meta.input_spec) if ckpt.meta.input_spec else guess_input_spec(model)
                return LoadedModel(model, ckpt.meta.source, "checkpoint", name, path, ckpt, input_spec)
            if not arch:
                raise _no_architecture(spec)
            model, _ = build_model(normalize_spec(arch), trust=arch_trust, pretrained=False, model_class=model_class)
            try:  # one tensor at a time: peak memory stays near one copy of the model
                load_weights(model, _LazyState(reader), spec)
            except NmcliError:
                raise
            except Exception as exc:  # a file whose data section cannot be read
                raise SourceError(f"{spec} could not be read ({exc}): it may be truncated or corrupt") from exc
        ref = _state_dict_ref(spec, path, arch, model_class)
        return LoadedModel(eval_mode(model), ref, "state_dict", name, path, None, guess_input_spec(model))
    if path is not None and kind.form is Form.TORCH_FILE and arch:
        loaded_kind, obj = _read_torch_file(path, trust)
        if loaded_kind == "state_dict":
            model, _ = build_model(normalize_spec(arch), trust=arch_trust, pretrained=False, model_class=model_class)
            load_weights(model, obj, spec)
            ref = _state_dict_ref(spec, path, arch, model_class)
            return LoadedModel(eval_mode(model), ref, "state_dict", name, path, None, guess_input_spec(model))
    model, built = build_model(normalize_spec(spec), trust=trust, model_class=model_class)
    ref = source_ref(spec, model_class=model_class if built == "hf" else "auto")
    input_spec = traced_input_spec(path) if built == "torchscript" and path is not None else None
    return LoadedModel(eval_mode(model), ref, built, name, path, None, input_spec or guess_input_spec(model))


def _state_dict_ref(spec: str, path: Path, arch: str, model_class: str) -> SourceRef:
    """The source of a plain state dict loaded into ``arch`` (with the class of an ``hf:`` one)."""
    arch = normalize_spec(arch)
    cls = model_class if model_class != AUTO and arch.startswith("hf:") else None
    return SourceRef(spec=normalize_spec(spec), sha256=sha256_file(path), arch=arch, model_class=cls)


def traced_input_spec(path: Path) -> InputSpec | None:
    """The input a traced TorchScript archive was traced with (one tensor), from the archive's
    ``traced_inputs.pkl`` read without running code (:func:`nmcli.formats.torchfiles.traced_inputs`)."""
    found = traced_inputs(path)
    if found is None or len(found) != 1 or not found[0].shape or min(found[0].shape) <= 0:
        return None
    text, dtype = "x".join(str(d) for d in found[0].shape), found[0].dtype
    try:
        return parse_input_spec(text if dtype == "float32" else f"input:{text}:{dtype}")
    except NmcliError:  # a dtype --input-shape cannot name
        return None


def default_output_path(spec: str, tag: str, suffix: str = ".safetensors") -> Path:
    """The default output for ``spec``: beside a local input, else in the current folder.

    ``default_output_path("models/resnet.pt", "2of4")`` is ``models/resnet-2of4.safetensors``.
    """
    local = spec[3:] if spec.startswith("hf:") else (None if spec.startswith(PREFIXES) else spec)
    if local is not None:
        path = Path(local.rstrip("/"))
        folder = path.parent
        stem = path.name if path.is_dir() else path.stem
    else:
        folder, stem = Path("."), _short_name(spec).replace("/", "_")
    return folder / f"{stem}-{tag}{suffix}" if tag else folder / f"{stem}{suffix}"
