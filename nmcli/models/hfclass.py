"""Which transformers class to build for an ``hf:`` source: the model the files hold, never a random head.

``config.json``'s ``architectures`` may name a class whose weights the files do not hold (a
sentence-transformers folder names ``MPNetForMaskedLM`` but stores only the encoder): transformers
would initialise the missing head randomly and nmcli would prune and save it. ``--model-class``:

- ``auto`` (default): the ``architectures`` class when the files hold all its weights; else (and
  always for a sentence-transformers folder, which has ``modules.json``) the base model
  (``AutoModel``) when every stored tensor fits it; else exit 2 naming the missing weights.
- ``base``: ``AutoModel``; ``CLASS``: that transformers class. Either must find all its weights.

Folders without safetensors weights (and hub ids not yet downloaded) are not checked.

The flag picks the class of the ``hf:`` sources a command builds (MODEL, ``--arch``, ``--teacher``).
An nmcli checkpoint records the class it was pruned as and is rebuilt with it: the flag may repeat
that class, and one that contradicts it is exit 2 (:func:`check_recorded_class`), as an ``--arch``
whose tensors do not fit is; given with ``--arch hf:DIR`` it is the class of that folder, which
overrides the recorded source. Given where no ``hf:`` source takes it, it is exit 2
(:func:`not_an_hf_source`). Torch-free at import: checks on checkpoints need no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from nmcli.errors import SourceError
from nmcli.formats.checkpoint import SourceRef
from nmcli.formats.safetensors import read_header
from nmcli.formats.sharded import weight_files
from nmcli.nm.codec import INDICES_PREFIX, VALUES_PREFIX

if TYPE_CHECKING:
    from torch import nn

AUTO, BASE = "auto", "base"
_FIX = "give --model-class base, or --model-class CLASS naming a class whose weights the files hold"


def stored_keys(ident: str) -> set[str] | None:
    """The tensor names of a local HF directory's safetensors files, or None when there are none to read."""
    folder = Path(ident)
    if not folder.is_dir():
        return None
    files = weight_files(folder)
    if files is None:
        return None
    names = {info.name for f in files for info in read_header(folder / f, f).tensors}
    # a compressed sharded checkpoint stores a pruned weight as its values and indices (nm.codec)
    decoded = {n[len(VALUES_PREFIX) :] for n in names if n.startswith(VALUES_PREFIX)}
    return {n for n in names if not n.startswith((VALUES_PREFIX, INDICES_PREFIX))} | decoded


def _meta_model(transformers: Any, cls: Any, config: Any) -> nn.Module:
    import torch

    with torch.device("meta"):
        if cls is transformers.AutoModel:
            return transformers.AutoModel.from_config(config, trust_remote_code=False)
        return cls(config)


def _fit(model: nn.Module, stored: set[str]) -> tuple[list[str], list[str]]:
    """``(missing, unexpected)``: the model's weights the files lack (a tied group counts once) and the
    stored tensors the model has no place for; ``base_model_prefix`` matches either way."""
    prefix = str(getattr(model, "base_model_prefix", "") or "")

    def forms(name: str) -> list[str]:
        short = name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else name
        return [short, f"{prefix}.{short}"] if prefix else [name]

    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    persistent = set(model.state_dict())
    for name, buf in model.named_buffers(remove_duplicate=False):
        if name in persistent:
            groups.setdefault(id(buf), []).append(name)
    tied = _tied_names(model)
    missing = []
    placed: set[str] = set()
    for names in groups.values():
        found = [key for name in names for key in forms(name) if key in stored]
        placed.update(found)
        if not found and not all(name in tied for name in names):
            missing.append(names[0])
    return sorted(missing), sorted(stored - placed)


def _truly_missing(model: nn.Module, missing: list[str], unexpected: list[str], stored: set[str]) -> list[str]:
    """The missing weights that would be built at random: every one outside the base model (a head:
    ``lm_head``, ``cls.predictions``), and those inside it that no unplaced stored tensor stands for.

    A weight inside the base model that the files store under other names (MoE experts that
    transformers fuses and renames on load: ``layers.0.mlp.experts.gate_up_proj`` from
    ``layers.0.block_sparse_moe.experts.0.w1.weight``) is transformers' conversion to make: its
    nearest module below the root that holds stored tensors also holds unplaced ones. A module with
    nothing stored below the root (a base model's pooler that a masked-LM folder never held) would be
    random.
    """
    from torch import nn

    prefix = str(getattr(model, "base_model_prefix", "") or "")
    has_base = bool(prefix) and isinstance(getattr(model, prefix, None), nn.Module)

    def inner(name: str) -> str:
        return name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else name

    def under(module: str, names: set[str]) -> bool:
        return any(n.startswith(module + ".") for n in names)

    all_stored, unplaced = {inner(n) for n in stored}, {inner(n) for n in unexpected}
    out = []
    for name in missing:
        if has_base and not name.startswith(prefix + "."):
            out.append(name)
            continue
        module = inner(name).rpartition(".")[0]
        while module and not under(module, all_stored):
            module = module.rpartition(".")[0]
        if not module or not under(module, unplaced):
            out.append(name)
    return out


def _tied_names(model: nn.Module) -> set[str]:
    """Parameter names transformers ties to another weight when loading (``_tied_weights_keys``), all modules."""
    tied: set[str] = set()
    for module_name, module in model.named_modules():
        keys = getattr(module, "_tied_weights_keys", None) or ()
        for key in keys:
            tied.add(f"{module_name}.{key}" if module_name else str(key))
    return tied


def choose_hf_class(transformers: Any, ident: str, config: Any, model_class: str = AUTO) -> Any:
    """The transformers class to build for ``ident`` (``AutoModel`` for the base model).

    Raises:
        SourceError: ``model_class`` names no transformers class, or the chosen class needs weights
            the files do not hold (exit 2, naming them and ``--model-class``).
    """
    archs = getattr(config, "architectures", None) or []
    named = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
    sentence = (Path(ident) / "modules.json").is_file()
    if model_class == BASE:
        choices = [transformers.AutoModel]
    elif model_class == AUTO:
        choices = [transformers.AutoModel] if sentence or named is None else [named, transformers.AutoModel]
    else:
        cls = getattr(transformers, model_class, None)
        if not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
            raise not_a_class(model_class)
        choices = [cls]
    stored = stored_keys(ident)
    if stored is None:
        return choices[0]
    first_missing: list[str] = []
    what = ""
    for i, cls in enumerate(choices):
        model = _meta_model(transformers, cls, config)
        missing, unexpected = _fit(model, stored)
        missing = _truly_missing(model, missing, unexpected, stored)
        if not missing and not (i > 0 and unexpected):  # the base model as a fallback must take every tensor
            return cls
        first_missing = first_missing or missing or unexpected
        what = what or type(model).__name__
    shown = ", ".join(first_missing[:4]) + (f" and {len(first_missing) - 4} more" if len(first_missing) > 4 else "")
    fix = _FIX if model_class == AUTO else (
        "give --model-class auto, or --model-class CLASS naming a class whose weights the files hold"
    )  # fmt: skip
    raise SourceError(
        f"{ident}: {what} needs weights the files do not hold ({shown}); building it would prune their random "
        f"initialisation: {fix}"
    )


def not_a_class(model_class: str) -> SourceError:
    """The refusal of a ``--model-class`` value that names no transformers model class."""
    return SourceError(
        f"--model-class {model_class!r} is not a transformers model class: give auto, base or a class such as BertModel"
    )


def not_an_hf_source(spec: str, model_class: str) -> SourceError:
    """The refusal of a ``--model-class`` given for ``spec``, which is not an ``hf:`` source."""
    return SourceError(
        f"--model-class {model_class!r} picks the transformers class of an hf: source, and {spec} is not one: "
        "drop --model-class"
    )


def check_recorded_class(what: str, source: SourceRef, model_class: str, *, arch_hint: bool = True) -> None:
    """Refuse a ``--model-class`` that contradicts the class the checkpoint ``what`` records (``source``).

    ``auto`` (the default) and the recorded class itself pass; the checkpoint is rebuilt as it records.
    ``arch_hint``: the command takes ``--arch`` (then name it as the way to build another class).

    Raises:
        SourceError: any other class (exit 2), naming the recorded one.
    """
    recorded = source.model_class or AUTO
    if model_class in (AUTO, recorded):
        return
    if not model_class.strip():  # not a class at all: say so before comparing it with the recorded one
        raise not_a_class(model_class)
    built_from = source.arch or source.spec
    if not built_from.startswith("hf:"):
        raise SourceError(
            f"--model-class {model_class!r} picks the transformers class of an hf: source, and {what} was pruned "
            f"from {built_from}, which is not one: drop --model-class"
        )
    hint = f", or give it with --arch hf:DIR to rebuild from that folder as {model_class!r}" if arch_hint else ""
    raise SourceError(
        f"--model-class {model_class!r} contradicts {what}, which records the class it was pruned as "
        f"(--model-class {recorded}) and is rebuilt as that: drop --model-class{hint}"
    )
