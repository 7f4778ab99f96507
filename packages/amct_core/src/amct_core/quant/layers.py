"""What a front end tells the core about each layer it can quantize."""
from __future__ import annotations

from dataclasses import dataclass

#: Neutral layer kinds. The kind decides the defaults and constraints of the config:
#: conv and conv_transpose weights are channel-wise by default, linear weights per tensor
#: (reference §3.2), avgpool has activations only.
LAYER_KINDS = ("conv", "conv_transpose", "linear", "avgpool")


@dataclass(frozen=True)
class QuantLayer:
    """One quantizable layer as a front end sees it.

    ``name`` is the key of the layer in the JSON config and the record file (the module name
    in PyTorch, the node name in ONNX). ``layer_type`` is the framework's type name
    (``Conv2d``, ``Linear`` ... or ``Conv``, ``Gemm`` ...), used by ``skip_layer_types`` and
    ``override_layer_types``. ``kind`` is one of :data:`LAYER_KINDS`.
    """

    name: str
    layer_type: str
    kind: str

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"layer {self.name!r}: kind {self.kind!r} is not one of "
                             f"{', '.join(LAYER_KINDS)}")

    @property
    def has_weight(self) -> bool:
        return self.kind != "avgpool"
