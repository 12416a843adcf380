"""A method switched off: the base model's own function, computed by the adapted model itself.

:func:`switched_off` is the reference model of DPO (Rafailov et al. 2023, §4: π_ref is the model
before preference tuning), here the base with the method's contribution removed, with no second
copy of the weights in memory (as TRL does with HF peft's ``disable_adapter``). Two kinds of
method part are switched:

- a wrapper that holds the frozen module it wraps as ``base_layer`` and has weights of its own
  (LoRA / DoRA / QLoRA layers, LoRA on parameters, IA3, bottleneck adapters) computes
  ``base_layer(x)`` instead of its forward; a PiSSA layer, whose base holds the residual
  W − s·B₀A₀ (Meng et al. 2024, §3), adds s·B₀A₀ x back, so it computes the original W x;
- a part whose hooks act on the decoder body (the prompt and prefix encoders of prompt tuning,
  p-tuning and prefix tuning: :func:`switchable` marks them) lets the body's inputs through
  unchanged while :func:`is_off`: no virtual tokens, no prefix, masks and positions as given.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch.nn.functional as F
from torch import nn

SWITCH = "method_switched_off"  # the attribute a hook-driven method part carries (False: on)


def switchable(part: nn.Module) -> nn.Module:
    """Mark a hook-driven method part (a prompt or prefix encoder) as one :func:`switched_off`
    turns off; its hooks ask :func:`is_off`. Returns ``part``."""
    setattr(part, SWITCH, False)
    return part


def is_off(part) -> bool:
    """Whether the method part ``part`` is switched off now (its hooks then pass inputs through)."""
    return bool(getattr(part, SWITCH, False))


def _is_wrapper(module: nn.Module) -> bool:
    """A method layer: it holds a ``base_layer`` module and parameters of its own outside it."""
    base = getattr(module, "base_layer", None)
    return isinstance(base, nn.Module) and any(not n.startswith("base_layer.") for n, _ in module.named_parameters())


def _base_forward(layer: nn.Module):
    """What ``layer`` computes with the method off: ``base_layer(x)``; with PiSSA's initial
    ``init_A`` (r, in) / ``init_B`` (out, r) buffers, ``base_layer(x) + scaling · B₀ A₀ x``."""
    init_A, init_B = getattr(layer, "init_A", None), getattr(layer, "init_B", None)
    if init_A is None:
        return layer.base_layer.__call__  # a bound method: assigning a Module would register a submodule instead

    def pissa_base(x):
        result = layer.base_layer(x)
        principal = F.linear(F.linear(x.to(init_A.dtype), init_A), init_B)  # (..., out)
        return result + (layer.scaling * principal).to(result.dtype)

    return pissa_base


@contextmanager
def switched_off(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, ``model`` computes what its base computed before the method was applied
    (every method of the registry; see the module docstring); on leaving it, the method is on
    again, whatever happened inside. Gradients are the caller's concern (DPO's reference runs
    under ``torch.no_grad``).

    ``forward``: the model's own, unchanged signature; yields ``model``.
    """
    wrappers = [m for m in model.modules() if _is_wrapper(m)]
    parts = [m for m in model.modules() if hasattr(m, SWITCH)]
    own = [m.__dict__.get("forward") for m in wrappers]  # an instance forward someone set (accelerate hooks) is kept
    try:
        for m in wrappers:
            m.forward = _base_forward(m)
        for p in parts:
            setattr(p, SWITCH, True)
        yield model
    finally:
        for m, forward in zip(wrappers, own):
            if forward is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = forward
        for p in parts:
            setattr(p, SWITCH, False)
