"""Which torch modules post-training quantization handles (reference §3.5).

``nn.Linear``, ``nn.Conv2d`` (padding_mode ``zeros``), ``nn.Conv3d`` (dilation_d = 1),
``nn.ConvTranspose2d`` (``zeros``) and ``nn.AvgPool2d``, subclasses included. A module called
more than once in a forward pass, or whose weight is shared with another layer, is not
quantized (the reference skips shared layers too).
"""
from __future__ import annotations

from torch import nn

from amct_core.quant.layers import QuantLayer

#: (module class, layer type written in configs, neutral kind), most specific first.
_SUPPORTED: tuple[tuple[type[nn.Module], str, str], ...] = (
    (nn.ConvTranspose2d, "ConvTranspose2d", "conv_transpose"),
    (nn.Conv2d, "Conv2d", "conv"),
    (nn.Conv3d, "Conv3d", "conv"),
    (nn.Linear, "Linear", "linear"),
    (nn.AvgPool2d, "AvgPool2d", "avgpool"),
)

#: The ONNX op each supported module exports to.
ONNX_OPS = {"Conv2d": ("Conv",), "Conv3d": ("Conv",), "ConvTranspose2d": ("ConvTranspose",),
            "Linear": ("Gemm", "MatMul"), "AvgPool2d": ("AveragePool",)}


def layer_type_of(module: nn.Module) -> tuple[str, str] | None:
    """Return (layer type, kind) of a supported module, else None."""
    for cls, layer_type, kind in _SUPPORTED:
        if isinstance(module, cls):
            return layer_type, kind
    return None


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a module of a supported type still cannot be quantized, or None when it can."""
    padding_mode = getattr(module, "padding_mode", "zeros")
    if padding_mode != "zeros":
        return f"padding_mode {padding_mode!r} (only 'zeros' is supported)"
    if isinstance(module, nn.Conv3d) and module.dilation[0] != 1:
        return f"dilation_d {module.dilation[0]} (only 1 is supported)"
    weight = getattr(module, "weight", None)
    if weight is not None and not weight.dtype.is_floating_point:
        return f"weight dtype {weight.dtype}"
    return None


def candidate_layers(model: nn.Module) -> list[QuantLayer]:
    """Supported modules of ``model`` in ``named_modules`` order (constraints not yet checked
    against the traced graph)."""
    layers = []
    for name, module in model.named_modules():
        found = layer_type_of(module)
        if found is not None and name:
            layers.append(QuantLayer(name=name, layer_type=found[0], kind=found[1]))
    return layers
