"""PyTorch front end of the spatial-SVD decomposition (reference §2.4).

The math is :mod:`amct_core.decompose`; this module only finds the ``nn.Conv2d`` layers,
hands their kernels to the core as arrays and builds ``nn.Sequential(first, last)`` from the
factors, keeping device, dtype, memory format, bias and padding mode.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from amct_core.decompose import (
    ConvLayerInfo,
    DecomposeMode,
    DecomposeRecord,
    factorize_kernel,
    read_decompose_info,
    select_mode,
    split_conv_attributes,
    write_decompose_info,
)
from amct_core.decompose.spatial_svd import factor_shapes
from amct_core.errors import AmctTypeError, ModelMismatchError
from amct_core.logger import get_logger
from amct_pytorch.module_tree import replace_submodule

_SUPPORTED_DTYPES = (torch.float16, torch.float32, torch.float64)
_CHECKED_FIELDS = ("in_channels", "out_channels", "kernel_size", "stride", "dilation", "groups")


def _check_model(model: object, api: str) -> None:
    if not isinstance(model, nn.Module):
        raise AmctTypeError(f"{api}: 'model' must be a torch.nn.Module, got "
                            f"{type(model).__name__}")
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise AmctTypeError(f"{api}: 'model' is wrapped in {type(model).__name__}; call {api} "
                            f"on the bare model (model.module) before wrapping it, and build "
                            f"the optimizer afterwards.")


def _conv_names(model: nn.Module) -> dict[int, list[str]]:
    """Map id(conv) to every name it is registered under (shared modules have several)."""
    names: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Conv2d):
            names.setdefault(id(module), []).append(name)
    return names


def _layer_info(name: str, conv: nn.Conv2d) -> ConvLayerInfo:
    return ConvLayerInfo(name=name, in_channels=conv.in_channels, out_channels=conv.out_channels,
                         kernel_size=tuple(conv.kernel_size), stride=tuple(conv.stride),
                         dilation=tuple(conv.dilation), groups=conv.groups)


def _is_channels_last(weight: torch.Tensor) -> bool:
    return (weight.is_contiguous(memory_format=torch.channels_last)
            and not weight.is_contiguous())


def _new_conv(conv: nn.Conv2d, shape: tuple[int, ...], attributes: dict,
              bias: bool) -> nn.Conv2d:
    layer = nn.Conv2d(shape[1], shape[0], kernel_size=tuple(shape[2:]),
                      stride=attributes["stride"], padding=attributes["padding"],
                      dilation=attributes["dilation"], groups=1, bias=bias,
                      padding_mode=conv.padding_mode, device=conv.weight.device,
                      dtype=conv.weight.dtype)
    layer.train(conv.training)
    return layer


def _build_pair(conv: nn.Conv2d, mode: DecomposeMode, first_shape: tuple[int, ...],
                last_shape: tuple[int, ...],
                factors: tuple[nn.Parameter, nn.Parameter] | None = None) -> nn.Sequential:
    """Two new convs shaped for ``mode``; the bias goes on the last one only.

    With ``factors`` the convs take those weight parameters and the original bias; without,
    they keep PyTorch's default initialisation. The memory format follows the original.
    """
    first_attrs, last_attrs = split_conv_attributes(mode, conv.stride, conv.padding,
                                                    conv.dilation)
    first = _new_conv(conv, first_shape, first_attrs, bias=False)
    last = _new_conv(conv, last_shape, last_attrs, bias=conv.bias is not None)
    if factors is not None:
        first.weight, last.weight = factors
        if conv.bias is not None:
            with torch.no_grad():
                last.bias.copy_(conv.bias)
            last.bias.requires_grad_(conv.bias.requires_grad)
    pair = nn.Sequential(first, last)
    if _is_channels_last(conv.weight):
        pair = pair.to(memory_format=torch.channels_last)
    return pair


def _to_parameter(values, like: torch.Tensor) -> nn.Parameter:
    """A parameter on ``like``'s device and dtype, clamped to the dtype's finite range."""
    tensor = torch.from_numpy(values)
    limit = torch.finfo(like.dtype).max
    tensor = tensor.clamp(-limit, limit).to(device=like.device, dtype=like.dtype)
    return nn.Parameter(tensor, requires_grad=like.requires_grad)


def _swap_in(model: nn.Module, names_and_modules: list[tuple[str, nn.Module]]) -> nn.Module:
    """Put the new modules in place; a model that is itself the conv is returned new."""
    for name, new in names_and_modules:
        if name == "":
            model = new
        else:
            replace_submodule(model, name, new)
    return model


def _child_names(name: str) -> list[str]:
    return [f"{name}.0", f"{name}.1"] if name else ["0", "1"]


def _finish(model: nn.Module, replacements: list[tuple[str, nn.Module]],
            records: list[DecomposeRecord], api: str) -> tuple[nn.Module, dict[str, list[str]]]:
    """Swap the new modules in, log each change and the end of ``api``."""
    model = _swap_in(model, replacements)
    changes = {record.layer.name: _child_names(record.layer.name) for record in records}
    logger = get_logger()
    for old, new in changes.items():
        logger.info("Decompose: '%s' -> %s", old, new)
    logger.info("%s complete.", api)
    return model, changes


def auto_decomposition(model: nn.Module,
                       decompose_info_path: str | os.PathLike | None = None
                       ) -> tuple[nn.Module, dict[str, list[str]]]:
    """Decompose every eligible ``nn.Conv2d`` of ``model`` (subclasses included).

    Each decomposed conv becomes ``nn.Sequential(first, last)``, so ``conv2`` turns into
    ``conv2.0`` and ``conv2.1``, with factor weights from the spatial SVD and the rank from the
    EVBMF rank rule. The model is changed in place, except when it is itself a Conv2d, in
    which case the new Sequential is returned. Call it before building the optimizer and
    before wrapping the model in DistributedDataParallel.

    Args:
        model: the trained model.
        decompose_info_path: where to write the decomposition information file (JSON), which
            ``decompose_network`` reads; nothing is written when None.

    Returns:
        ``(model, changes)``, ``changes`` mapping each decomposed conv's name to its two new
        names, e.g. ``{'conv2': ['conv2.0', 'conv2.1']}``.
    """
    _check_model(model, "auto_decomposition")
    logger = get_logger()
    logger.info("auto_decomposition start.")
    names_by_module = _conv_names(model)
    modules = {id(m): m for _, m in model.named_modules(remove_duplicate=False)}
    factors_by_weight: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}
    records: list[DecomposeRecord] = []
    replacements: list[tuple[str, nn.Module]] = []
    for module_id, names in names_by_module.items():
        conv = modules[module_id]
        for name in names:
            logger.info("Processing: '%s'", name)
        name = names[0]
        weight = conv.weight
        if weight.dtype not in _SUPPORTED_DTYPES:
            logger.warning("Unsupported data type %s of layer '%s', ignored.", weight.dtype, name)
            continue
        mode = select_mode(conv.out_channels, conv.in_channels, conv.kernel_size, conv.stride,
                           conv.dilation, conv.groups)
        if mode == DecomposeMode.UNCHANGE:
            continue
        if not bool(torch.isfinite(weight).all()):
            logger.warning("Weight of layer '%s' contains NaN or Inf, ignored.", name)
            continue
        if id(weight) in factors_by_weight:
            first_weight, last_weight = factors_by_weight[id(weight)]
        else:
            with torch.no_grad():
                array = weight.detach().to("cpu").contiguous().numpy()
            factors = factorize_kernel(array, mode)
            logger.debug("Layer '%s': mode %s, rank %d (EVBMF rank %s)", name, mode.name,
                         factors.rank, factors.evbmf_rank)
            if factors.evbmf_rank == 0:
                logger.warning("EVBMF estimated rank 0 for layer '%s'; the rank rule keeps "
                               "rank %d.", name, factors.rank)
            first_weight = _to_parameter(factors.first, weight)
            last_weight = _to_parameter(factors.last, weight)
            factors_by_weight[id(weight)] = (first_weight, last_weight)
        pair = _build_pair(conv, mode, tuple(first_weight.shape), tuple(last_weight.shape),
                           (first_weight, last_weight))
        for alias in names:
            replacements.append((alias, pair))
            records.append(DecomposeRecord(layer=_layer_info(alias, conv), mode=mode,
                                           first_shape=tuple(first_weight.shape),
                                           last_shape=tuple(last_weight.shape)))
    if not records:
        message = "No tensor meets decomposition conditions."
        if decompose_info_path is not None:
            message += " Decomposition information file is not saved."
        logger.info(message)
    elif decompose_info_path is not None:
        saved = write_decompose_info(decompose_info_path, records)
        logger.info("Decomposition information file is saved to: %s", saved)
    return _finish(model, replacements, records, "auto_decomposition")


def _mismatch(field: str, name: str, expected: object, actual: object) -> ModelMismatchError:
    return ModelMismatchError(
        f"{field} of layer '{name}' does not match the original model, please check the model "
        f"definition and the decomposition information file. The file says {expected!r}, the "
        f"model has {actual!r}.")


def decompose_network(model: nn.Module, decompose_info_path: str | os.PathLike
                      ) -> tuple[nn.Module, dict[str, list[str]]]:
    """Rebuild the decomposed structure recorded in ``decompose_info_path``.

    Nothing is computed: the new convs keep PyTorch's default initialisation, ready for
    ``load_state_dict`` of the weights saved after ``auto_decomposition``. The whole file is
    checked against the model before anything changes, so a mismatch leaves the model as it
    was.

    Returns:
        ``(model, changes)`` as ``auto_decomposition`` returns them.
    """
    _check_model(model, "decompose_network")
    logger = get_logger()
    logger.info("decompose_network start.")
    records = read_decompose_info(decompose_info_path)
    named = dict(model.named_modules(remove_duplicate=False))
    for record in records:
        name = record.layer.name
        if name not in named:
            raise ModelMismatchError(f"Cannot find layer '{name}' in model.")
        conv = named[name]
        if not isinstance(conv, nn.Conv2d):
            raise ModelMismatchError(f"Layer '{name}' should be a torch.nn.Conv2d object, got "
                                     f"{type(conv).__name__}.")
        expected = record.layer.to_json()
        for field in _CHECKED_FIELDS:
            actual = getattr(conv, field)
            actual = list(actual) if isinstance(actual, tuple) else actual
            if actual != expected[field]:
                raise _mismatch(field, name, expected[field], actual)
        shapes = factor_shapes((conv.out_channels, conv.in_channels, *conv.kernel_size),
                               record.mode, record.rank)
        if shapes != (record.first_shape, record.last_shape):
            raise _mismatch("decom_nodes", name, [record.first_shape, record.last_shape],
                            list(shapes))
    pairs: dict[int, nn.Sequential] = {}
    shared_factors: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}
    replacements: list[tuple[str, nn.Module]] = []
    for record in records:
        conv = named[record.layer.name]
        if id(conv) not in pairs:
            pair = _build_pair(conv, record.mode, record.first_shape, record.last_shape)
            key = id(conv.weight)
            if key in shared_factors:
                pair[0].weight, pair[1].weight = shared_factors[key]
            else:
                shared_factors[key] = (pair[0].weight, pair[1].weight)
            pairs[id(conv)] = pair
        replacements.append((record.layer.name, pairs[id(conv)]))
    return _finish(model, replacements, records, "decompose_network")
