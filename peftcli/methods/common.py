"""The toolkit of the method modules: what every method repeats, written once.

A method module (see :class:`peftcli.methods.Method`) uses these for the steps every method
takes the same way: freezing the base (:func:`freeze_base`), swapping a module in place
(:func:`replace`), listing its own layers (:func:`layers_of`), checking and copying saved
weights (:func:`check_keys`, :func:`copy_weights`), claiming an ``adapter_config.json``
(:func:`reads_peft_type`), refusing a merge (:func:`refuse_merge`), and the defaults of the
surface a method may re-export (:func:`no_file_fields`, :func:`one_lr_group`). The decoder body of a model is found by
:func:`peftcli.models.decoder_body` (no method keeps its own lookup).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from peftcli import models
from peftcli.errors import UserError

KEY_PREFIX = "base_model.model."  # HF peft's prefix of every module path in a saved adapter file


def freeze_base(model: nn.Module) -> None:
    """Set ``requires_grad = False`` on every parameter of ``model`` (done before a method adds
    its trainable parts, so only those train)."""
    for p in model.parameters():
        p.requires_grad_(False)


def replace(model: nn.Module, name: str, wrapper: nn.Module) -> nn.Module:
    """Put ``wrapper`` in ``model`` at the dotted path ``name`` (it usually holds the module
    there as ``base_layer``), in the train/eval mode that module was in (so, e.g., LoRA dropout
    stays off on a model in eval mode). Returns ``wrapper``."""
    wrapper.train(model.get_submodule(name).training)
    model.set_submodule(name, wrapper)
    return wrapper


def layers_of(model: nn.Module, *types: type) -> dict[str, nn.Module]:
    """name -> module for every module of ``model`` that is an instance of one of ``types`` (a
    method's own wrapper classes), in ``named_modules`` order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, types)}


def check_keys(got: Iterable[str], want: Iterable[str], what: str = "this model", prefix: str = "") -> None:
    """Refuse saved weights whose keys are not exactly the ones the adapted model needs.

    Args:
        got: the keys in the file (after the method's own renaming, e.g. without ``KEY_PREFIX``).
        want: the keys the adapted model needs.
        what: what they must fit, for the message (``"this model"``, ``"prompt tuning"``).
        prefix: put before the key named in the message.

    Raises:
        UserError: ``adapter weights do not fit {what}: unexpected {key}`` (the first, sorted, key
        of ``got`` not in ``want``), else ``... missing {key}`` (the first key of ``want`` not in
        ``got``).
    """
    got, want = set(got), set(want)
    unknown, missing = sorted(got - want), sorted(want - got)
    if unknown or missing:
        which = f"unexpected {prefix}{unknown[0]}" if unknown else f"missing {prefix}{missing[0]}"
        raise UserError(f"adapter weights do not fit {what}: {which}")


def check_shape(key: str, saved: torch.Tensor, want: tuple[int, ...], needs: str = "the model needs",
                why: str = "") -> None:
    """Refuse a saved tensor whose shape is not ``want``.

    Raises:
        UserError: ``adapter weight {key} has shape {saved.shape}, {needs} {want}{why}``.
    """
    if tuple(saved.shape) != tuple(want):
        raise UserError(f"adapter weight {key} has shape {tuple(saved.shape)}, {needs} {tuple(want)}{why}")


def copy_weights(params: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], needs: str = "the model needs",
                 prefix: str = "") -> None:
    """Copy ``saved[key]`` into ``params[key]`` for every key of ``params`` (without gradient,
    cast to the parameter's dtype and device), after :func:`check_shape` on each.

    Raises:
        UserError: a shape differs (the key shown with ``prefix`` before it); a key of ``params``
        missing from ``saved`` is the caller's :func:`check_keys`.
    """
    with torch.no_grad():
        for key, param in params.items():
            check_shape(prefix + key, saved[key], param.shape, needs)
            param.copy_(saved[key].to(param.dtype))


def wraps_conv1d(model: nn.Module) -> bool:
    """True when a module of ``model`` holds a transformers ``Conv1D`` (weight stored (in, out),
    GPT-2) as its ``base_layer``: what HF peft's LoRA and IA3 record as ``fan_in_fan_out: true``.
    A Conv1D that transformers quantised is a bitsandbytes Linear of (out, in): False."""
    return any(models.is_conv1d(getattr(m, "base_layer", None)) for m in model.modules())


def peft_type(cfg: dict) -> str:
    """The ``peft_type`` of an ``adapter_config.json`` dict, upper case (``""`` when absent)."""
    return str(cfg.get("peft_type", "")).upper()


def reads_peft_type(name: str) -> Callable[[dict], bool]:
    """A method's ``reads_adapter`` for a method that reads every adapter of HF peft type
    ``name`` (e.g. ``"IA3"``): the returned function is ``cfg -> peft_type(cfg) == name``."""

    def reads_adapter(cfg: dict) -> bool:
        """Whether this method reads the ``adapter_config.json`` dict ``cfg``: its ``peft_type`` is
        this method's."""
        return peft_type(cfg) == name

    return reads_adapter


def refuse_merge(name: str, reason: str) -> UserError:
    """The error a method that cannot merge raises from ``merge``:
    ``method {name} cannot be merged: {reason}`` (``reason``: its ``CANNOT_MERGE``)."""
    return UserError(f"method {name} cannot be merged: {reason}")


def no_file_fields(model: nn.Module) -> dict:
    """``file_fields`` of a method whose ``adapter_config.json`` fields do not depend on what
    ``apply`` wrapped: ``{}``."""
    return {}


def one_lr_group(model: nn.Module, cfg) -> list[tuple[float, list[nn.Parameter]]]:
    """``lr_groups`` of a method that trains every part at one learning rate: ``[(1.0, the
    trainable parameters of model)]`` (``cfg`` is not read)."""
    return [(1.0, [p for p in model.parameters() if p.requires_grad])]
