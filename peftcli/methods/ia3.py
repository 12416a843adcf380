"""(IA)³: learned rescaling vectors (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning
is Better and Cheaper than In-Context Learning", §3.3, https://arxiv.org/abs/2205.05638).

    attention keys, values:   y ↦ l ⊙ (W x + b)          l: (out_features,)
    feed-forward:             x ↦ W (l ⊙ x) + b          l: (in_features,)

The paper rescales the keys, the values and the feed-forward intermediate activation (the
input of the FFN's output projection). Each target ``nn.Linear`` (or transformers ``Conv1D``)
is wrapped in place by an :class:`IA3Linear` holding it as ``base_layer``; a module listed in
``feedforward_modules`` scales its input, every other target its output. The vectors start at
ones, so the adapted model starts equal to the base (§3.3).

When the recipe leaves ``target_modules`` / ``feedforward_modules`` null (the default),
:func:`default_targets` finds the keys, values and FFN output projection of this model from its
structure: on GPT-2 ``target_modules: [c_attn, mlp.c_proj]``, ``feedforward_modules:
[mlp.c_proj]`` — the fused query/key/value output (so the queries are rescaled too) and the FFN
output projection's input, as HF peft's defaults there.

Files are Hugging Face peft's IA3 format: one key per target,
``base_model.model.<module>.ia3_l``, shaped (out_features, 1) for an output vector and
(1, in_features) for an input vector (HF's layout; in memory the vector is 1-D).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from peftcli import models
from peftcli.errors import UserError
from peftcli.methods import common
from peftcli.methods.cards.ia3 import CANNOT_MERGE, PADDING_FREE, PAPER, PEFT_TYPE, SUMMARY, Config, base_quantization  # noqa: F401  (its card)
from peftcli.methods.common import KEY_PREFIX
from peftcli.methods.lora import find_targets, linear_names, module_names

DEFAULT_ROLES = {"key", "value", "ffn_out"}  # Liu et al. 2022, §3.3: keys, values, the FFN activation
# model types whose default in HF peft (peft.utils.constants, 0.21.2) rescales other attention
# projections; followed, so that a default means the same layers in both
HF_DEFAULT_ROLES = {
    **dict.fromkeys(("gemma", "gemma2", "gemma3_text", "gpt_neo", "gptj", "phi", "qwen2", "qwen3"),
                    {"query", "value", "ffn_out"}),
    "opt": {"query", "key", "ffn_out"},
}


# ---------------------------------------------------------------------------------------------
# the layer


class IA3Linear(nn.Module):
    """A frozen Linear whose output (or, for a feed-forward module, input) is rescaled by a
    learned vector (Liu et al. 2022, §3.3).

    ``forward``: (..., in_features) -> (..., out_features) =
    ``base_layer(x) * ia3_l`` (output scaling, ``ia3_l``: (out_features,)) or
    ``base_layer(x * ia3_l)`` (input scaling, ``ia3_l``: (in_features,)).

    Args:
        base_layer: the frozen ``nn.Linear`` (or bitsandbytes ``Linear4bit``/``Linear8bitLt``, or
            a transformers ``Conv1D``).
        is_feedforward: scale the input instead of the output (default False).

    ``ia3_l`` is float32 whatever the base dtype and starts at ones; the product is taken in
    float32 and cast back to the activation's dtype, as HF peft does.
    """

    def __init__(self, base_layer: nn.Linear, is_feedforward: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = models.linear_features(base_layer)
        self.is_feedforward = is_feedforward
        size = self.in_features if is_feedforward else self.out_features
        self.ia3_l = nn.Parameter(torch.ones(size, device=base_layer.weight.device, dtype=torch.float32))

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight as the base stores it, (out_features, in_features) ((in, out) for a
        Conv1D), for code that reads ``.weight``."""
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_feedforward:
            return self.base_layer((x.to(self.ia3_l.dtype) * self.ia3_l).to(x.dtype))
        result = self.base_layer(x)
        return (result * self.ia3_l).to(result.dtype)


# ---------------------------------------------------------------------------------------------
# the method surface


def is_feedforward(name: str, feedforward_modules: str | list[str]) -> bool:
    """HF peft's rule (``IA3Model._check_target_module_feedforward``): a regex must match the
    whole module path; a list entry matches a path that ends with it."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, name) is not None
    return any(name.endswith(entry) for entry in feedforward_modules)


def default_targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """(target_modules, feedforward_modules) for a recipe that sets neither: the attention keys
    and values and the feed-forward output projection of every decoder block, whose input is
    rescaled (Liu et al. 2022, §3.3), found from the model's structure
    (:func:`peftcli.models.linear_roles`): a fused query/key/value Linear is a target where the
    family fuses them. Where HF peft's own default for the model type rescales other attention
    projections (:data:`HF_DEFAULT_ROLES`, e.g. queries and values on Qwen2, Gemma, Phi), HF
    peft's is used. Fused MoE experts are no Linear: there the feed-forward part is left out,
    as HF peft's Mixtral default does. Short names, as :func:`~peftcli.methods.lora.module_names`.

    Raises:
        UserError: no key/value projection is found, or a feed-forward block whose Linears all
        map the hidden size to itself (its output projection cannot be told from its shapes).
    """
    roles = models.linear_roles(model)
    want = HF_DEFAULT_ROLES.get(getattr(getattr(model, "config", None), "model_type", None), DEFAULT_ROLES)
    targets = [path for path, r in roles.items() if r & want]
    if not any(roles[path] & {"query", "key", "value"} for path in targets):
        raise UserError("method.target_modules: no attention key/value projection found in this model; set it "
                        f"(Linear names here: {', '.join(linear_names(model)) or 'none'})")
    feedforward = [path for path in targets if "ffn_out" in roles[path]]
    square = [path for path, r in roles.items() if r == {"ffn"}]
    if square and not feedforward:
        raise UserError(f"method.feedforward_modules: cannot tell the feed-forward output projection from its shapes "
                        f"({square[0]} maps the hidden size to itself); set method.target_modules and feedforward_modules")
    attention = [path for path in targets if path not in feedforward]
    return module_names(model, attention, within=targets) + module_names(model, feedforward), module_names(model, feedforward)


def feedforward_among(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """``feedforward_modules`` for a recipe that sets ``target_modules`` only: the feed-forward
    output projections (:func:`peftcli.models.linear_roles`) among the targets (HF peft would
    take its per-model list, the same layers where it has one). For a list, the entries of the
    list that select only such projections.

    Raises:
        UserError: a list entry selects a feed-forward output projection and another module too.
    """
    roles = models.linear_roles(model)
    selected = find_targets(model, target_modules)
    feedforward = [path for path in selected if "ffn_out" in roles.get(path, ())]
    if isinstance(target_modules, str):
        return module_names(model, feedforward)
    names = []
    for entry in target_modules:
        hits = [path for path in selected if path == entry or path.endswith("." + entry)]
        if hits and all(path in feedforward for path in hits):
            names.append(entry)
        elif any(path in feedforward for path in hits):
            raise UserError(f"method.feedforward_modules: target {entry!r} selects feed-forward output projections and "
                            "other modules; set method.feedforward_modules (e.g. mlp.NAME)")
    return names


def resolve_defaults(model: nn.Module, cfg: Config) -> None:
    """Fill a null ``target_modules`` / ``feedforward_modules`` of ``cfg`` for ``model``
    (:func:`default_targets`, :func:`feedforward_among`), in place.

    Raises:
        UserError: as :func:`default_targets`; or the user's ``feedforward_modules`` list is not
        within the default targets.
    """
    if cfg.target_modules is not None and cfg.feedforward_modules is not None:
        return
    if cfg.target_modules is None:
        targets, feedforward = default_targets(model)
    else:
        targets, feedforward = cfg.target_modules, feedforward_among(model, cfg.target_modules)
    try:
        if cfg.feedforward_modules is None:
            cfg.feedforward_modules = feedforward
        cfg.target_modules = targets
    except ValueError as e:  # pydantic's ValidationError: the subset rule
        raise UserError(f"method.feedforward_modules: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def apply(model: nn.Module, cfg: Config, tokenizer=None) -> list[str]:
    """Freeze every base parameter and wrap each target Linear in an :class:`IA3Linear`
    (input scaling where the path is a feed-forward module).

    Null ``target_modules`` / ``feedforward_modules`` (the defaults) are resolved here
    (:func:`resolve_defaults`) and written into ``cfg``, so the run's ``recipe.yaml`` and adapter
    files record the explicit lists. ``tokenizer`` is not used.

    Returns the wrapped module names. Raises UserError when ``target_modules`` matches nothing
    or matches a module that is not a Linear, or the defaults cannot be resolved.
    """
    resolve_defaults(model, cfg)
    targets = find_targets(model, cfg.target_modules)
    common.freeze_base(model)
    for name in targets:
        common.replace(model, name, IA3Linear(model.get_submodule(name), is_feedforward(name, cfg.feedforward_modules)))
    return targets


def ia3_layers(model: nn.Module) -> dict[str, IA3Linear]:
    """name -> IA3Linear for every wrapped layer of ``model``."""
    return common.layers_of(model, IA3Linear)


def _file_shape(layer: IA3Linear) -> tuple[int, int]:
    """HF peft's layout of the vector: (1, in_features) for input scaling, else (out_features, 1)."""
    return (1, layer.in_features) if layer.is_feedforward else (layer.out_features, 1)


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The vectors in HF peft key naming and layout: ``base_model.model.<module>.ia3_l`` of
    shape (out_features, 1), or (1, in_features) for a feed-forward module."""
    return {f"{KEY_PREFIX}{name}.ia3_l": layer.ia3_l.detach().cpu().reshape(_file_shape(layer)).contiguous()
            for name, layer in ia3_layers(model).items()}


def load_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy saved vectors (HF peft naming; ``.default`` adapter names accepted) into the wrapped
    model.

    Raises:
        UserError: a wrapped layer has no saved vector, a saved key matches no layer, or a shape
        differs from HF's layout for that layer (an adapter for another model, or one that scales
        the input where this config scales the output).
    """
    layers = ia3_layers(model)
    got = {k.removeprefix(KEY_PREFIX).removesuffix(".default"): v for k, v in sd.items()}
    want = {f"{name}.ia3_l": layer for name, layer in layers.items()}
    common.check_keys(got, want)
    with torch.no_grad():
        for k, layer in want.items():
            common.check_shape(k, got[k], _file_shape(layer))
            layer.ia3_l.copy_(got[k].flatten().to(layer.ia3_l.dtype))


def adapter_config(cfg: Config) -> dict:
    """The HF peft ``IA3Config`` fields for ``adapter_config.json`` (without the base model)."""
    return {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "target_modules": cfg.target_modules,
        "feedforward_modules": cfg.feedforward_modules,
        "exclude_modules": None,
        "init_ia3_weights": True,
        "fan_in_fan_out": False,  # true for Conv1D targets: set by file_fields, as HF peft does
        "modules_to_save": None,
        "inference_mode": True,
    }


def config_from_adapter(d: dict) -> Config:
    """Our config from an HF peft IA3 ``adapter_config.json`` dict (e.g. an adapter HF peft trained).

    Raises:
        UserError: options we do not implement (exclude_modules, modules_to_save), or
        feedforward_modules not within target_modules.
    """
    if d.get("exclude_modules") or d.get("modules_to_save"):
        raise UserError("adapter_config.json: exclude_modules / modules_to_save are not supported for IA3")
    def listed(value):  # none: the default for the model, resolved by apply
        return list(value) if isinstance(value, (list, tuple, set)) else value

    try:
        return Config(target_modules=listed(d.get("target_modules") or None),
                      feedforward_modules=listed(d.get("feedforward_modules")))
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        raise UserError(f"adapter_config.json: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def file_fields(model: nn.Module) -> dict:
    """The ``adapter_config.json`` field that depends on what :func:`apply` wrapped:
    ``fan_in_fan_out``, true once a wrapped layer is a transformers ``Conv1D`` (GPT-2), as HF
    peft records it (:func:`~peftcli.methods.common.wraps_conv1d`)."""
    return {"fan_in_fan_out": common.wraps_conv1d(model)}


reads_adapter = common.reads_peft_type(PEFT_TYPE)
lr_groups = common.one_lr_group


def merge(model: nn.Module) -> nn.Module:
    """Fold every vector into its base weight and put a plain ``nn.Linear`` back (a ``Conv1D``
    where the base's files hold one):

        output scaling:  W' = l[:, None] · W,  b' = l · b
        input scaling:   W' = W · l[None, :],  b' = b

    computed in float32 and rounded once to the output dtype; a 4/8-bit base is dequantised
    first (the weights the vectors were trained against), so the merged Linear is full precision
    (float32 for a quantised base, else the base dtype). The merged Linear always gets its own
    storage (a tied weight is never written in place). Returns ``model``.
    """
    from peftcli.models import dequantized_weight

    for name, layer in ia3_layers(model).items():
        base = layer.base_layer
        w = dequantized_weight(base)  # (out, in) float32
        vec = layer.ia3_l.detach().float().to(w.device)  # l: (in,) or (out,)
        dtype = torch.float32 if models.is_quantized_linear(base) else base.weight.dtype
        weight = w * vec[None, :] if layer.is_feedforward else w * vec[:, None]
        bias = None if base.bias is None else base.bias.detach().float() * (1 if layer.is_feedforward else vec)
        model.set_submodule(name, models.plain_linear(weight, bias, base, dtype))
    return model

