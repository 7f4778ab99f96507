"""Replacing a submodule of a torch model by its dotted name (``layer1.0.conv1``)."""
from __future__ import annotations

from torch import nn


def replace_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where ``model.get_submodule(name)`` is (``name`` must not be empty)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
