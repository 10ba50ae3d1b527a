"""Meta-device model skeletons of HF directories, and the map from module names to file keys."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every ``nn.Parameter`` registered inside the block is created on the meta device (buffers stay real)."""
    from torch import nn

    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None and param.device.type != "meta":
            moved = self._parameters[name]
            assert moved is not None
            self._parameters[name] = type(moved)(moved.to("meta"), requires_grad=moved.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_skeleton(folder: Path, model_class: str = "auto") -> nn.Module:
    """The architecture of an HF directory (the class ``--model-class`` picks), parameters on the meta device, eval mode."""
    from nmcli.models.sources import build_model

    with parameters_on_meta():
        model, _ = build_model(f"hf:{folder}", pretrained=False, model_class=model_class)
    return model.eval()


def file_keys(model: nn.Module, stored: Mapping[str, Any]) -> dict[str, str]:
    """Each parameter and persistent buffer of ``model`` -> its name in the files (``base_model_prefix`` either way).

    Tied parameters (one tensor under two names) map once, under the name the files hold.
    """
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in model.named_buffers() if n in model.state_dict()]
    mapping: dict[str, str] = {}
    for name in names:
        for key in (name, f"{prefix}.{name}", name[len(prefix) + 1 :] if name.startswith(prefix + ".") else None):
            if key and key in stored:
                mapping[name] = key
                break
    return mapping
