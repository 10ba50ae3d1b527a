"""A checkpoint's tensors under the names of the model rebuilt for it, and back.

``nmcli prune hf:DIR --model-class base`` of a folder saved by a class with a head (``BertForMaskedLM``,
``BertForSequenceClassification``: ``bert.encoder...``, ``classifier.weight``) builds the base model
(``BertModel``: ``encoder...``, no head), as ``from_pretrained`` would load it. A sharded checkpoint
directory keeps its files' names, so its tensors, masks and layer entries carry the ``bert.`` prefix
that the rebuilt model's names lack. :class:`StoredNames` maps between the two: what is read is put
under the model's names (the head, which the base model has no place for, left out), and what is
written goes back under the stored names, so an output keeps its input's names.

Torch-free at import (``inspect`` of checkpoints never imports torch).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TypeVar

from nmcli.formats.checkpoint import LayerEntry

if TYPE_CHECKING:
    import torch
    from torch import nn

V = TypeVar("V")


@dataclass(frozen=True)
class StoredNames:
    """How a model's names map to the names its checkpoint stores them under: ``prefix + name``.

    ``prefix`` is the model's ``base_model_prefix`` and a dot (``"bert."``) for a transformers base
    model rebuilt from files saved with a head; else empty (the names are the same).
    """

    prefix: str = ""

    @classmethod
    def of(cls, model: nn.Module, stored: Iterable[str]) -> StoredNames:
        """The mapping between ``model`` and the stored tensor names ``stored``: its ``base_model_prefix``
        when none of the model's own names carry it and some stored names do."""
        base = str(getattr(model, "base_model_prefix", "") or "")
        if not base:
            return cls()
        dotted = base + "."
        if any(name.startswith(dotted) for name in model.state_dict()):
            return cls()
        return cls(dotted) if any(name.startswith(dotted) for name in stored) else cls()

    def stored(self, name: str) -> str:
        """The stored name of the model's ``name``."""
        return self.prefix + name

    def model(self, name: str) -> str:
        """The model's name for the stored ``name`` (unchanged when it lacks the prefix)."""
        return name[len(self.prefix) :] if self.prefix and name.startswith(self.prefix) else name

    def model_state(self, state: Mapping[str, V]) -> dict[str, V]:
        """``state`` under the model's names, without the stored entries outside the base model (a head)."""
        if not self.prefix:
            return dict(state)
        return {self.model(k): v for k, v in state.items() if k.startswith(self.prefix)}

    def stored_state(self, state: Mapping[str, V]) -> dict[str, V]:
        """The model's ``state`` under the stored names."""
        return dict(self.stored_items(state.items()))

    def stored_items(self, items: Iterable[tuple[str, V]]) -> Iterator[tuple[str, V]]:
        """``(name, value)`` pairs of the model, streamed under the stored names."""
        for name, value in items:
            yield self.stored(name), value

    def model_layers(self, layers: Iterable[LayerEntry]) -> list[LayerEntry]:
        """A checkpoint's layer entries under the model's names."""
        return [replace(e, param=self.model(e.param), module=self.model(e.module)) for e in layers]


def state_for_model(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's ``state`` made to fit ``model`` the way ``from_pretrained`` loads files: under the
    model's names (:class:`StoredNames`), without the stored values of buffers the model computes itself,
    and with every name of a tied parameter given the tensor stored under one of them."""
    fitted = _without_transient_buffers(model, StoredNames.of(model, state).model_state(state))
    _fill_tied(model, fitted)
    return fitted


def _without_transient_buffers(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the model's non-persistent buffers, which older files store and today's class
    computes itself (BERT's ``embeddings.position_ids``: ``from_pretrained`` ignores it the same way)."""
    persistent = set(model.state_dict())
    transient = {name for name, _ in model.named_buffers() if name not in persistent}
    return {k: v for k, v in state.items() if k not in transient} if transient & set(state) else state


def _fill_tied(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give every name of a shared (tied) parameter the tensor that ``state`` stores under one of them.

    Hugging Face directories store a tied LM head once (``save_pretrained`` drops the alias).
    """
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    for names in groups.values():
        stored = [name for name in names if name in state]
        for name in names if stored else ():
            state.setdefault(name, state[stored[0]])


__all__ = ["StoredNames", "state_for_model"]
