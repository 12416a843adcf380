"""LoRA on an ``nn.Parameter`` (``method.target_parameters``): the fused expert weights of
mixture-of-experts blocks (Mixtral, Qwen3-MoE: ``experts.gate_up_proj`` (E, 2I, H) and
``experts.down_proj`` (E, H, I)), or any 2-D weight that is not an ``nn.Linear`` (a router).

Per expert e, with W_e (out × in) the matrix the expert applies as ``F.linear(x, W_e)``:

    W_e ↦ W_e + (alpha / r) · B_e A_e          (Hu et al. 2021, §4.1, one low-rank update per expert)

The update is added to the weight at forward time: :class:`LoRAParameter` wraps the module that
owns the parameter and calls it through ``torch.func.functional_call`` with the parameter
replaced by W + ΔW, so the model's own code (and its expert kernels) runs unchanged. There is no
dropout: dropout acts on the input of a LoRA branch, and here the update is folded into a weight
shared by all the experts' inputs (HF peft refuses ``lora_dropout`` with ``target_parameters``
for the same reason); ``method.dropout`` applies to the ``target_modules`` Linear layers only.

The layout is Hugging Face peft's ``ParamWrapper`` (peft 0.21, ``tuners/lora/layer.py``), so the
files are interchangeable: ``lora_A.weight`` (r·E, in) holds A_e in rows e·r … e·r + r − 1;
``lora_B.weight`` (out, r·E) holds B_e in columns e, e + E, … (HF's ``reshape(out, r, E)``). A 3-D
parameter is read as (E, out, in) (``is_transposed`` on the owner: (E, in, out)); a 2-D one is
(out, in) with E = 1. Two parameters of one module are two nested wrappers, the first in the
module's registration order innermost, so the keys read ``...experts.base_layer.lora_A.weight``
(gate_up_proj) and ``...experts.lora_A.weight`` (down_proj), as HF peft writes them.
"""

from __future__ import annotations

import difflib
import math

import torch
from torch import nn

from peftcli.errors import UserError
from peftcli.models import block_index


class LoRAParameter(nn.Module):
    """A module with one of its parameters adapted by a per-expert low-rank update.

    ``forward(*args, **kwargs)``: ``base_layer(*args, **kwargs)`` computed with
    ``parameter_name`` replaced by W + :meth:`delta_weight` (same shape and dtype as W).

    Args:
        base_layer: the module that owns the parameter, or another :class:`LoRAParameter` that
            wraps it (a second parameter of the same module).
        parameter_name: the parameter's name on the owner, e.g. ``"gate_up_proj"``.
        r, alpha, rslora: rank, scale numerator, alpha/√r instead of alpha/r.
        init: ``"zeros"`` (Kaiming-uniform A, zero B) or ``"gaussian"`` (A ~ N(0, 1/r²), zero B).

    ``lora_A`` (r·E, in) and ``lora_B`` (out, r·E) are float32 ``nn.Linear`` weights whatever the
    base dtype (the layout of HF peft's ``ParamWrapper``).

    Raises:
        UserError: the parameter is not 2-D or 3-D, or not floating point (a quantised weight).
    """

    def __init__(self, base_layer: nn.Module, parameter_name: str, r: int, alpha: float, rslora: bool = False,
                 init: str = "zeros"):
        super().__init__()
        from peftcli.methods.lora import init_lora_A, init_lora_B  # lora imports this module

        self.base_layer, self.parameter_name = base_layer, parameter_name
        param = self.owner.get_parameter(parameter_name)
        if param.ndim not in (2, 3) or not param.is_floating_point():
            raise UserError(f"method.target_parameters: {parameter_name} is a {param.ndim}-D {param.dtype} tensor; "
                            "LoRA adapts 2-D or 3-D floating-point weights only")
        self.transposed = param.ndim == 3 and bool(getattr(self.owner, "is_transposed", False))
        self.num_experts = param.shape[0] if param.ndim == 3 else 1
        out_dim, in_dim = param.shape[-2:]
        self.out_features, self.in_features = (in_dim, out_dim) if self.transposed else (out_dim, in_dim)
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        rows = r * self.num_experts
        self.lora_A = nn.Linear(self.in_features, rows, bias=False, device=param.device, dtype=torch.float32)
        self.lora_B = nn.Linear(rows, self.out_features, bias=False, device=param.device, dtype=torch.float32)
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / r)  # HF peft's "gaussian": std 1/r, not 1/(r·E)
        else:
            init_lora_A(self.lora_A.weight)
        init_lora_B(self.lora_B.weight)

    @property
    def owner(self) -> nn.Module:
        """The module that holds the parameter (below any nested LoRAParameter)."""
        module = self.base_layer
        while isinstance(module, LoRAParameter):
            module = module.base_layer
        return module

    def _path(self) -> str:
        """The parameter's path from ``base_layer``: ``base_layer.`` once per nested wrapper."""
        depth, module = 0, self.base_layer
        while isinstance(module, LoRAParameter):
            depth, module = depth + 1, module.base_layer
        return "base_layer." * depth + self.parameter_name

    def delta_weight(self) -> torch.Tensor:
        """scaling · B_e A_e for every expert, float32, in the parameter's own layout:
        (E, out, in), (E, in, out) for a transposed owner, (out, in) for a 2-D parameter."""
        E = self.num_experts
        A = self.lora_A.weight.float().reshape(E, self.r, self.in_features)  # (E, r, in)
        B = self.lora_B.weight.float().reshape(self.out_features, self.r, E).permute(2, 0, 1)  # (E, out, r)
        delta = self.scaling * (B @ A)  # (E, out, in)
        if self.transposed:
            delta = delta.transpose(1, 2)
        return delta if E > 1 or self.owner.get_parameter(self.parameter_name).ndim == 3 else delta[0]

    def forward(self, *args, **kwargs):
        weight = self.owner.get_parameter(self.parameter_name)
        adapted = weight + self.delta_weight().to(weight.dtype)
        return torch.func.functional_call(self.base_layer, {self._path(): adapted}, args, kwargs, strict=False)


# ---------------------------------------------------------------------------------------------
# finding and wrapping


def _matches(key: str, targets: list[str]) -> bool:
    return any(key == t or key.endswith("." + t) for t in targets)


def find_parameters(model: nn.Module, targets: list[str], layers: list[int] | None = None,
                    all_experts: bool = False) -> list[str]:
    """Paths (``<module>.<parameter>``) of the parameters to adapt, in model order, with HF peft's
    rule: a path equal to an entry or ending in ``"." + entry``. Only a module's own parameters
    count (``recurse=False``); ``nn.Linear`` weights are for ``target_modules``. ``all_experts``
    adds every 3-D parameter (the fused experts that ``all-linear`` covers, as HF peft does; a
    router, 2-D, is left alone). ``layers`` keeps those inside the given block indices.

    Raises:
        UserError: an entry matched nothing (naming the near miss), or a match is a Linear weight.
    """
    found = []
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            key = f"{module_name}.{param_name}" if module_name else param_name
            hit = _matches(key, targets) or (all_experts and param.ndim == 3)
            if hit and layers is not None:
                hit = block_index(key) in layers
            if not hit:
                continue
            if isinstance(module, nn.Linear) or not module_name:
                raise UserError(f"method.target_parameters: {key} belongs to a {type(module).__name__}; "
                                "name Linear layers in method.target_modules")
            found.append(key)
    unmatched = [t for t in targets if not any(_matches(k, [t]) for k in found)]
    if unmatched:
        names = sorted({p for _, m in model.named_modules() if not isinstance(m, (nn.Linear, nn.Embedding))
                        for p, w in m.named_parameters(recurse=False) if w.ndim >= 2})
        near = difflib.get_close_matches(unmatched[0].rsplit(".", 1)[-1], names, n=1, cutoff=0.6)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise UserError(f"method.target_parameters: {unmatched[0]!r} matched no parameter ({hint}"
                        f"2-D/3-D parameters outside Linear layers here: {', '.join(names)})")
    return found


def wrap(model: nn.Module, sizes: dict[str, tuple[int, float]], rslora: bool, init: str) -> None:
    """Replace each owner module of the parameter paths in ``sizes`` (path -> (r, alpha), in model
    order) by :class:`LoRAParameter` wrappers, nested when one module has several targets (the
    first in the module's registration order innermost)."""
    for path, (r, alpha) in sizes.items():
        module_name, _, param_name = path.rpartition(".")
        current = model.get_submodule(module_name)
        model.set_submodule(module_name, LoRAParameter(current, param_name, r, alpha, rslora, init).train(current.training))


def param_layers(model: nn.Module) -> dict[str, LoRAParameter]:
    """module path -> LoRAParameter for every wrapper, nested ones too (``...experts.base_layer``)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRAParameter)}


def adapted_parameters(model: nn.Module) -> list[str]:
    """The adapted parameter paths as the model had them before wrapping, e.g.
    ``model.layers.0.mlp.experts.gate_up_proj`` (what ``target_parameters`` matches exactly)."""
    return sorted(f"{n.replace('.base_layer', '')}.{m.parameter_name}" for n, m in param_layers(model).items())


def merge(model: nn.Module) -> None:
    """Fold every update into its parameter (W + ΔW summed in float32, rounded once to W's dtype)
    and put the owner module back in place of its wrappers."""
    layers = param_layers(model)
    nested = {id(m.base_layer) for m in layers.values()}
    outer = {n: m for n, m in layers.items() if id(m) not in nested}
    for name, wrapper in outer.items():
        owner, layer = wrapper.owner, wrapper
        with torch.no_grad():
            while isinstance(layer, LoRAParameter):
                weight = owner.get_parameter(layer.parameter_name)
                weight.copy_((weight.float() + layer.delta_weight()).to(weight.dtype))
                layer = layer.base_layer
        model.set_submodule(name, owner)
