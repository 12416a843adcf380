"""LoRA: low-rank adaptation of Linear layers (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

    x ↦ W x + (alpha / r) · B A x          (§4.1; rsLoRA: alpha / √r, Kalajdzievski 2023, §3)

W (out × in) stays frozen; A (r × in) is Kaiming-uniform, B (out × r) starts at zero so the
adapted model starts equal to the base (§4.1). Each target ``nn.Linear`` (or bitsandbytes 4/8-bit
Linear, which subclass it, or transformers' ``Conv1D`` of GPT-2, which stores W transposed) is
replaced in its parent by a :class:`LoRALinear` that holds it as ``base_layer`` — the module
names therefore match Hugging Face peft's, and so do the saved keys
(``base_model.model.<module>.lora_A.weight``). A and B have the same shapes for a Conv1D base;
only merging writes W back in the Conv1D's (in × out) layout.

Options:

- ``dora: true`` — DoRA (Liu et al. 2024, https://arxiv.org/abs/2402.09353, §4.1 eq. 5): the
  layer is a :class:`DoRALinear`, which adds a trainable magnitude per output row to the LoRA
  parts; saved as ``...lora_magnitude_vector`` with ``use_dora: true``, as HF peft does.
- ``init: gaussian`` — A ~ N(0, (1/r)²), B = 0 (HF peft's ``init_lora_weights="gaussian"``).
- ``init: pissa`` — PiSSA (Meng et al. 2024, https://arxiv.org/abs/2404.02948, §3): A and B
  start as the principal part of W and the base weight becomes the residual. The adapter is
  *saved* as a plain rank-2r LoRA relative to the original W (see :func:`state_dict`), so the
  files need no modified base, in our loader and in HF peft alike.
- ``target_parameters`` — LoRA on ``nn.Parameter`` weights such as the fused experts of MoE
  blocks (:mod:`peftcli.methods.lora_params`, HF peft's ``target_parameters`` layout); no
  dropout there, ``dropout`` applies to the ``target_modules`` Linear layers.
- ``lr_ratio`` — LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354, §3-4): the B's
  train at ``lr_ratio`` × the learning rate of the A's (:func:`lr_groups`); the files are unchanged.
"""

from __future__ import annotations

import difflib
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from peftcli import models
from peftcli.errors import UserError
from peftcli.methods import common, lora_params
from peftcli.methods.cards.lora import CANNOT_MERGE, FOUR_BIT, PADDING_FREE, PAPER, PEFT_TYPE, SUMMARY, Config, base_quantization  # noqa: F401  (its card)
from peftcli.methods.common import KEY_PREFIX
from peftcli.methods.lora_kernel import lora_branch
from peftcli.models import dequantized_weight, is_linear

INITS = ("zeros", "gaussian", "pissa")


# ---------------------------------------------------------------------------------------------
# the layers


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update (Hu et al. 2021, §4.1).

    ``forward``: (..., in_features) -> (..., out_features) =
    ``base_layer(x) + scaling · lora_B(lora_A(dropout(x)))``.

    Args:
        base_layer: the frozen ``nn.Linear`` (or bitsandbytes ``Linear4bit``/``Linear8bitLt``, or
            a transformers ``Conv1D``).
        r: rank (> 0).
        alpha: scale numerator.
        dropout: dropout probability on the LoRA branch input (default 0).
        rslora: use alpha/√r instead of alpha/r (Kalajdzievski 2023, §3).
        init: ``"zeros"`` (default: Kaiming-uniform A, zero B), ``"gaussian"`` (A ~ N(0, 1/r²),
            zero B) or ``"pissa"`` (:func:`init_pissa`: replaces ``base_layer``'s weight by the
            residual).

    The LoRA weights are float32 whatever the base dtype (QLoRA keeps adapters in 16/32-bit,
    Dettmers et al. 2023, §3); their output is cast to the base output's dtype. With PiSSA the
    initial A and B are kept as the non-persistent buffers ``init_A`` (r, in) and ``init_B``
    (out, r), which saving needs (see :func:`state_dict`); they are None otherwise.

    Raises:
        ValueError: r < 1, or an unknown ``init``.
        UserError: ``init="pissa"`` on a quantised base, or with r > min(in, out).
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 init: str = "zeros"):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        if init not in INITS:
            raise ValueError(f"LoRA init must be one of {INITS}, got {init!r}")
        self.base_layer = base_layer
        self.in_features, self.out_features = models.linear_features(base_layer)
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base_layer.weight.device
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.register_buffer("init_A", None, persistent=False)
        self.register_buffer("init_B", None, persistent=False)
        self.fused_backward = True  # with gradients on, lora_kernel.LoRABranch; False: the plain formula (peftcli.guard)
        if init == "pissa":
            init_pissa(self)
        else:
            (init_lora_A if init == "zeros" else init_gaussian_A)(self.lora_A.weight)
            init_lora_B(self.lora_B.weight)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight as the base stores it, (out_features, in_features) ((in, out) for a
        Conv1D), for code that reads ``.weight``."""
        return self.base_layer.weight

    def delta_weight(self) -> torch.Tensor:
        """scaling · B A, float32, shape (out_features, in_features)."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def merged_weight(self) -> torch.Tensor:
        """W + scaling · B A, float32 (out_features, in_features); a 4/8-bit W is dequantised."""
        weight = dequantized_weight(self.base_layer)
        return weight + self.delta_weight().to(weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.fused_backward and torch.is_grad_enabled():
            # training: the memory-lean branch (x saved once, only the dropped positions kept for backward)
            p = getattr(self.dropout, "p", 0.0) if self.training else 0.0
            update = lora_branch(x, self.lora_A.weight, self.lora_B.weight, self.scaling, p)
            return result + update.to(result.dtype)
        update = self.lora_B(self.lora_A(self.dropout(x.to(self.lora_A.weight.dtype))))
        return result + (self.scaling * update).to(result.dtype)


class DoRALinear(nn.Module):
    """A LoRA layer with its output rows re-normalised to a learned magnitude (DoRA, Liu et al.
    2024, https://arxiv.org/abs/2402.09353, §4.1 eq. 5):

        W' = m ⊙ (W + s·B A) / ‖W + s·B A‖_r

    where ‖·‖_r is the L2 norm of each output row of the (out, in) weight, so m and the norm are
    (out_features,); m is trainable and starts at ‖W + s·B A‖_r (= ‖W‖_r for zero B), so the
    layer starts equal to its LoRA layer. The norm is a constant in the backward pass (§4.3):
    m, A and B get gradients, the norm does not.

    ``forward``: (..., in_features) -> (..., out_features), with g = m / ‖W + s·B A‖_r and
    x' = dropout(x):

        y = base_layer(x) + (g - 1) ⊙ W x' + g ⊙ s·B A x'

    which is W' x + bias without dropout. With dropout, the dropped input feeds the whole
    DoRA correction (the rescaled base term too), as in HF peft; the bias is never rescaled.

    Args:
        lora: the :class:`LoRALinear` to extend (after its initialisation, so the magnitude
            starts from its W and B A). Its base layer, A, B, dropout, scale and PiSSA buffers
            are taken over; the LoRALinear itself is not kept.

    The magnitude is float32 like A and B; W is read dequantised (float32) for a 4/8-bit base.
    """

    def __init__(self, lora: LoRALinear):
        super().__init__()
        self.base_layer, self.lora_A, self.lora_B, self.dropout = lora.base_layer, lora.lora_A, lora.lora_B, lora.dropout
        self.in_features, self.out_features = lora.in_features, lora.out_features
        self.r, self.alpha, self.rslora, self.scaling = lora.r, lora.alpha, lora.rslora, lora.scaling
        self.register_buffer("init_A", lora.init_A, persistent=False)
        self.register_buffer("init_B", lora.init_B, persistent=False)
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm(dequantized_weight(self.base_layer)))  # (out,)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight as the base stores it, (out_features, in_features) ((in, out) for a
        Conv1D), for code that reads ``.weight``."""
        return self.base_layer.weight

    def delta_weight(self) -> torch.Tensor:
        """scaling · B A, float32, shape (out_features, in_features)."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    @torch.no_grad()
    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """‖W + s·B A‖ over each output row, (out_features,), without gradient (§4.3).
        ``weight``: the base weight (out_features, in_features), float32."""
        return torch.linalg.norm(weight + self.delta_weight().to(weight.device), dim=1)

    def merged_weight(self) -> torch.Tensor:
        """m ⊙ (W + s·B A) / ‖W + s·B A‖_r, float32 (out_features, in_features)."""
        weight = dequantized_weight(self.base_layer)
        weight = weight + self.delta_weight().to(weight.device)
        return (self.lora_magnitude_vector.to(weight.device) / torch.linalg.norm(weight, dim=1)).unsqueeze(1) * weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        x = self.dropout(x.to(self.lora_A.weight.dtype))
        weight = dequantized_weight(self.base_layer)  # (out, in) float32
        g = self.lora_magnitude_vector / self.weight_norm(weight)  # (out,)
        update = (g - 1) * F.linear(x, weight) + g * self.scaling * self.lora_B(self.lora_A(x))
        return result + update.to(result.dtype)


# ---------------------------------------------------------------------------------------------
# initialisation


def init_lora_A(weight: torch.Tensor) -> None:
    """Kaiming-uniform with a=√5, as nn.Linear's default (Hu et al. 2021, §4.1: "random Gaussian"
    in the paper; the reference implementation uses this uniform)."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def init_lora_B(weight: torch.Tensor) -> None:
    """Zeros, so B·A = 0 and training starts from the base model (Hu et al. 2021, §4.1)."""
    nn.init.zeros_(weight)


def init_gaussian_A(weight: torch.Tensor) -> None:
    """N(0, std = 1/r) for A of shape (r, in), as HF peft's ``init_lora_weights="gaussian"``."""
    nn.init.normal_(weight, std=1 / weight.shape[0])


@torch.no_grad()
def init_pissa(layer: LoRALinear) -> None:
    """PiSSA (Meng et al. 2024, §3): start A and B at the principal part of W and keep only the
    residual in the frozen base, so the layer's output is unchanged.

    With W = U diag(S) Vᵀ (out × in, float32) and s the LoRA scale:

        A = diag(√(S_r / s)) V_rᵀ   (r, in)       B = U_r diag(√(S_r / s))   (out, r)
        s·B A = U_r diag(S_r) V_rᵀ                W_res = W − s·B A

    as HF peft's ``pissa_init`` (exact SVD). The residual gets its own storage (a weight tied to
    the input embedding is never changed) in the base dtype; A and B are also kept as
    ``layer.init_A`` / ``layer.init_B`` for saving.

    Raises:
        UserError: a 4/8-bit base (the residual needs a full-precision weight), or r > min(in, out).
    """
    base = layer.base_layer
    if models.is_quantized_linear(base):
        raise UserError("method.init: pissa needs a full-precision base (it replaces W by the residual W - scale·B·A, "
                        "which a 4/8-bit weight cannot hold); use init zeros or gaussian with a quantised base")
    if layer.r > min(layer.in_features, layer.out_features):
        raise UserError(f"method.init: pissa needs r <= min(in, out) = {min(layer.in_features, layer.out_features)}, got r = {layer.r}")
    W = dequantized_weight(base)  # (out, in) float32
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    sqrt_S = torch.sqrt(S[: layer.r] / layer.scaling)  # (r,)
    A = torch.diag(sqrt_S) @ Vh[: layer.r]  # (r, in)
    B = U[:, : layer.r] @ torch.diag(sqrt_S)  # (out, r)
    layer.lora_A.weight.copy_(A)
    layer.lora_B.weight.copy_(B)
    layer.init_A, layer.init_B = A.clone(), B.clone()
    residual = W - layer.scaling * B @ A  # (out, in)
    if models.is_conv1d(base):
        residual = residual.T.contiguous()  # stored (in, out)
    base.weight = nn.Parameter(residual.to(base.weight.dtype), requires_grad=False)


# ---------------------------------------------------------------------------------------------
# finding targets

DEFAULT_ROLES = {"query", "value"}  # W_q and W_v (Hu et al. 2021, §7.1, Table 5)
# model types whose default in HF peft (peft.utils.constants, 0.21.2) is another set of roles;
# followed, so that a default means the same layers in both
HF_DEFAULT_ROLES = {"phi": {"query", "value", "ffn_in", "ffn_out"}}

def find_targets(model: nn.Module, target_modules: str | list[str], layers: list[int] | None = None) -> list[str]:
    """Names of the modules ``target_modules`` selects, with Hugging Face peft's matching rules:
    a list matches a module whose name equals an entry or ends with ``"." + entry``; a string is
    a regex that must match the whole module path; ``"all-linear"`` is every Linear except the
    output head (HF peft's ``all-linear``: ``nn.Linear``, its bitsandbytes subclasses and
    ``Conv1D``). ``layers`` keeps only modules inside those block indices.

    Raises:
        UserError: nothing matched, or an entry of a list matched nothing (a typo; the message
            lists the Linear names that exist), a match is not a Linear, or ``layers`` names a
            block the model does not have.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if not name:
            continue
        if target_modules == "all-linear":
            hit = is_linear(module) and module is not head
        elif isinstance(target_modules, str):
            hit = re.fullmatch(target_modules, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in target_modules)
        if hit and layers is not None:
            hit = models.block_index(name) in layers
        if hit:
            if not is_linear(module):
                raise UserError(f"method.target_modules: {name} is a {type(module).__name__}, LoRA wraps Linear (or Conv1D) layers "
                                f"only (name its weights in method.target_parameters, e.g. {_param_hint(module, name)})")
            names.append(name)
    if layers is not None:
        blocks = sorted({i for n, _ in model.named_modules() if (i := models.block_index(n)) is not None})
        missing = sorted(set(layers) - set(blocks))
        if missing:
            span = f"blocks {blocks[0]}-{blocks[-1]}" if blocks else "no numbered blocks"
            raise UserError(f"method.layers: {missing} not in this model ({span})")
    unmatched = [] if isinstance(target_modules, str) else [
        t for t in target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if not names or unmatched:
        linear = linear_names(model)
        what = target_modules if not names else unmatched[0]
        near = difflib.get_close_matches(str(what).rsplit(".", 1)[-1], linear, n=1, cutoff=0.6)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise UserError(f"method.target_modules: {what!r} matched no module ({hint}Linear names here: {', '.join(linear)})")
    return names


def linear_names(model: nn.Module) -> list[str]:
    """The sorted last name parts of every Linear in ``model`` (for error messages)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear(m)})


def module_names(model: nn.Module, paths: list[str], within: list[str] | None = None) -> list[str]:
    """The shortest ``target_modules`` entries that select ``paths`` under :func:`find_targets`'
    rule (equal, or ending with ``"." + entry``) and no module outside ``within`` (default:
    ``paths``): each path's last name part, or more parts where that would select another module
    too (GPT-2's ``mlp.c_proj``, not its ``attn.c_proj``). In order of first appearance."""
    inside = set(paths if within is None else within)
    names = [n for n, _ in model.named_modules() if n]
    fits: dict[str, bool] = {}
    out: list[str] = []
    for path in paths:
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            entry = ".".join(parts[-k:])
            if entry not in fits:
                fits[entry] = all(n in inside for n in names if n == entry or n.endswith("." + entry))
            if fits[entry]:
                break
        if entry not in out:
            out.append(entry)
    return out


def pattern_matches(key: str, path: str) -> bool:
    """Whether a ``rank_pattern`` / ``alpha_pattern`` key selects ``path`` (a module path, or a
    ``target_parameters`` path such as ``model.layers.0.mlp.experts.gate_up_proj``): HF peft's
    rule (``peft.utils.other.get_pattern_key``): the key, a regex, matches the end of the path,
    starting at its beginning or just after a dot — ``q_proj`` selects ``...self_attn.q_proj``,
    not ``...self_attn.xq_proj``."""
    return re.fullmatch(rf"(?:.*\.)?(?:{key})", path) is not None


def ranks(cfg: Config, paths: list[str]) -> dict[str, tuple[int, float]]:
    """path -> (r, alpha) for each path :func:`apply` adapts: the value of the first key of
    ``cfg.rank_pattern`` (``cfg.alpha_pattern``), in their order, that :func:`pattern_matches` the
    path, else ``cfg.r`` (``cfg.alpha``) — as HF peft sizes each layer.

    Raises:
        UserError: a pattern key selects none of ``paths`` (a typo; HF peft only warns).
    """
    for field in ("rank_pattern", "alpha_pattern"):
        for key in getattr(cfg, field):
            if not any(pattern_matches(key, p) for p in paths):
                near = sorted({p.rsplit(".", 1)[-1] for p in paths})
                raise UserError(f"method.{field}: {key!r} matches none of the adapted modules or parameters "
                                f"(their last names: {', '.join(near)})")

    def first(patterns: dict, path: str, default):
        return next((v for k, v in patterns.items() if pattern_matches(k, path)), default)

    return {p: (first(cfg.rank_pattern, p, cfg.r), first(cfg.alpha_pattern, p, cfg.alpha)) for p in paths}


def default_targets(model: nn.Module) -> list[str]:
    """``target_modules`` for a recipe that sets none: the attention query and value projections
    of every decoder block (Hu et al. 2021, §7.1: adapting W_q and W_v together is best for a
    given number of parameters), found from the model's structure
    (:func:`peftcli.models.linear_roles`), so a fused query/key/value Linear (GPT-2's ``c_attn``,
    ``query_key_value``, ``qkv_proj``) is the target where the family fuses them. Where HF peft's
    own default for the model type differs (:data:`HF_DEFAULT_ROLES`: Phi adds ``fc1``, ``fc2``),
    HF peft's is used. Returned as the short names of :func:`module_names`.

    Raises:
        UserError: no such projection can be found (listing the Linear names there are).
    """
    roles = models.linear_roles(model)
    want = HF_DEFAULT_ROLES.get(getattr(getattr(model, "config", None), "model_type", None), DEFAULT_ROLES)
    paths = [path for path, r in roles.items() if r & want]
    if not paths:
        raise UserError("method.target_modules: no attention query/value projection found in this model; set it "
                        f"(Linear names here: {', '.join(linear_names(model)) or 'none'})")
    return module_names(model, paths)


# ---------------------------------------------------------------------------------------------
# the method surface


def _param_hint(module: nn.Module, name: str) -> str:
    params = [p for p, w in module.named_parameters(recurse=False) if w.ndim >= 2]
    return f"{name.rsplit('.', 1)[-1]}.{params[0]}" if params else "experts.gate_up_proj"


def apply(model: nn.Module, cfg: Config, tokenizer=None) -> list[str]:
    """Freeze every base parameter and wrap each target Linear in a :class:`LoRALinear` (a
    :class:`DoRALinear` with ``cfg.dora``), initialised as ``cfg.init`` says; then each
    ``target_parameters`` match (and, for ``all-linear``, every fused 3-D expert weight) in a
    :class:`~peftcli.methods.lora_params.LoRAParameter`.

    ``target_modules: null`` (the default) is resolved here by :func:`default_targets` and
    written into ``cfg``, so the run's ``recipe.yaml`` and adapter files record the explicit list;
    ``target_modules: []`` with ``target_parameters`` adapts the parameters only. ``tokenizer``
    is not used.

    Each layer's r and alpha are ``cfg.r`` and ``cfg.alpha`` but where ``rank_pattern`` /
    ``alpha_pattern`` say otherwise (:func:`ranks`).

    Returns the wrapped module names, then the adapted parameter paths. Raises UserError when
    ``target_modules``, ``target_parameters`` or a pattern key matches nothing (or, as null, no
    query/value projection is found), or for ``init: pissa`` on a quantised base.
    """
    if cfg.target_modules is None:
        cfg.target_modules = default_targets(model)
    only_params = cfg.target_modules == [] and cfg.target_parameters
    targets = [] if only_params else find_targets(model, cfg.target_modules, cfg.layers)
    params = lora_params.find_parameters(model, cfg.target_parameters, cfg.layers, cfg.target_modules == "all-linear")
    sizes = ranks(cfg, targets + params)
    common.freeze_base(model)
    for name in targets:
        layer = LoRALinear(model.get_submodule(name), *sizes[name], cfg.dropout, cfg.rslora, cfg.init)
        common.replace(model, name, DoRALinear(layer) if cfg.dora else layer)
    lora_params.wrap(model, {p: sizes[p] for p in params}, cfg.rslora, cfg.init)
    return targets + params


def lora_layers(model: nn.Module) -> dict[str, LoRALinear | DoRALinear]:
    """name -> LoRALinear or DoRALinear for every wrapped layer of ``model``."""
    return common.layers_of(model, LoRALinear, DoRALinear)


def all_layers(model: nn.Module) -> dict[str, nn.Module]:
    """name -> layer for every LoRA layer: the Linear ones and the ``target_parameters`` wrappers."""
    return {**lora_layers(model), **lora_params.param_layers(model)}


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights in HF peft key naming: ``base_model.model.<module>.lora_A.weight``
    (r, in), ``...lora_B.weight`` (out, r) and, for DoRA, ``...lora_magnitude_vector`` (out,).

    A PiSSA layer computes W_res x + s·B A x with W_res = W − s·B₀A₀, so relative to the
    original W its update is s·(B A − B₀A₀) = s·[B | −B₀] [A ; A₀]: it is saved as that rank-2r
    LoRA (``lora_A`` (2r, in) = [A ; A₀], ``lora_B`` (out, 2r) = [B | −B₀]) — HF peft's
    "PiSSA to LoRA" conversion (``path_initial_model_for_weight_conversion``) — and
    :func:`adapter_config` doubles r and alpha to keep the scale. The files then work with the
    unmodified base; a DoRA magnitude is unaffected, since W' is the same matrix.

    A ``target_parameters`` wrapper saves the same two keys under its module path, in HF peft's
    ``ParamWrapper`` layout (:mod:`peftcli.methods.lora_params`): ``lora_A`` (r·E, in),
    ``lora_B`` (out, r·E); a second wrapper on one module is ``<module>.base_layer.lora_A.weight``.
    """
    out = {}
    for name, layer in all_layers(model).items():
        A, B = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
        if getattr(layer, "init_A", None) is not None:  # PiSSA
            A, B = torch.cat([A, layer.init_A]), torch.cat([B, -layer.init_B], dim=1)
        out[f"{KEY_PREFIX}{name}.lora_A.weight"] = A.cpu().contiguous()
        out[f"{KEY_PREFIX}{name}.lora_B.weight"] = B.cpu().contiguous()
        if isinstance(layer, DoRALinear):
            out[f"{KEY_PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector.detach().cpu().contiguous()
    return out


def load_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy saved LoRA weights (HF peft naming; ``.default`` adapter names accepted) into the
    wrapped model.

    A PiSSA layer (rank r) reads our rank-2r form (:func:`state_dict`): A, B and the initial
    A₀, B₀ are split out of it; its residual base stays the one :func:`init_pissa` computed from
    this base. It also reads HF peft's unconverted PiSSA files (rank r, ``init_lora_weights:
    "pissa"``), which are relative to that same residual.

    Raises:
        UserError: a wrapped layer has no saved weights, a saved key matches no layer, or a
        shape differs (an adapter for another model or rank).
    """
    layers = all_layers(model)
    want = set()
    for name, layer in layers.items():
        want |= {f"{name}.lora_A.weight", f"{name}.lora_B.weight"}
        if isinstance(layer, DoRALinear):
            want.add(f"{name}.lora_magnitude_vector")
    got = {k.removeprefix(KEY_PREFIX).replace(".default.", "."): v for k, v in sd.items()}
    common.check_keys(got, want)
    with torch.no_grad():
        for name, layer in layers.items():
            A, B = got[f"{name}.lora_A.weight"], got[f"{name}.lora_B.weight"]
            if getattr(layer, "init_A", None) is not None and A.shape[0] == 2 * layer.r:  # our PiSSA form [A ; A₀], [B | −B₀]
                A, init_A = A.split(layer.r)
                B, minus_init_B = B.split(layer.r, dim=1)
                layer.init_A.copy_(init_A)
                layer.init_B.copy_(-minus_init_B)
            params = {f"{name}.lora_A.weight": layer.lora_A.weight, f"{name}.lora_B.weight": layer.lora_B.weight}
            saved = {f"{name}.lora_A.weight": A, f"{name}.lora_B.weight": B}
            if isinstance(layer, DoRALinear):
                key = f"{name}.lora_magnitude_vector"
                params[key], saved[key] = layer.lora_magnitude_vector, got[key]
            common.copy_weights(params, saved)


def adapter_config(cfg: Config) -> dict:
    """The HF peft ``LoraConfig`` fields for ``adapter_config.json`` (without the base model).

    ``init: pissa`` is written as the plain LoRA it is saved as (:func:`state_dict`): r doubled,
    alpha doubled (×√2 with rslora) so the scale is unchanged, the ``rank_pattern`` and
    ``alpha_pattern`` values too, ``init_lora_weights: true`` — as HF peft writes a converted PiSSA
    adapter. (``"pissa"`` there would make HF peft turn the base into a residual again on load.)
    The ``peftcli`` block keeps the recipe's own r, patterns and init.
    """
    r, alpha, rank_pattern, alpha_pattern = cfg.r, cfg.alpha, cfg.rank_pattern, cfg.alpha_pattern
    if cfg.init == "pissa":
        factor = math.sqrt(2) if cfg.rslora else 2
        r, alpha = 2 * r, alpha * factor
        rank_pattern = {k: 2 * v for k, v in rank_pattern.items()}
        alpha_pattern = {k: v * factor for k, v in alpha_pattern.items()}
    return {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.target_modules,
        "layers_to_transform": cfg.layers,
        "use_rslora": cfg.rslora,
        "bias": "none",
        "fan_in_fan_out": False,  # true for Conv1D targets: set by file_fields, as HF peft does
        "init_lora_weights": "gaussian" if cfg.init == "gaussian" else True,
        "modules_to_save": None,
        "use_dora": cfg.dora,
        "inference_mode": True,
    }


def file_fields(model: nn.Module) -> dict:
    """The ``adapter_config.json`` fields that name what :func:`apply` wrapped on ``model``, for
    :func:`peftcli.artifacts.save_adapter` to write over :func:`adapter_config`'s recipe form:

    - ``target_modules``: the explicit sorted list of wrapped Linear paths, never ``all-linear``
      or a regex (HF peft expands those its own way: on an MoE model its ``all-linear`` adds the
      router, ours does not), and ``layers_to_transform: null`` since the list says it;
    - ``target_parameters``: the adapted parameter paths (null when none);
    - ``lora_dropout: 0`` when there are any: HF peft refuses dropout beside target_parameters,
      and dropout never changes inference. The recipe's dropout stays in the ``peftcli`` block,
      which our loader reads;
    - ``fan_in_fan_out``: true once a wrapped layer is a transformers ``Conv1D`` (GPT-2: W stored
      (in, out)), as HF peft records it (:func:`~peftcli.methods.common.wraps_conv1d`; a Conv1D
      that transformers quantised is a bitsandbytes Linear of (out, in): false, as in HF peft).
      The saved weights' shapes do not change.
    """
    params = lora_params.adapted_parameters(model)
    fields = {"target_modules": sorted(lora_layers(model)), "layers_to_transform": None,
              "target_parameters": params or None, "fan_in_fan_out": common.wraps_conv1d(model)}
    if params:
        fields["lora_dropout"] = 0.0
    return fields


# HF peft's init_lora_weights values we read: any init whose base is the unmodified W, and exact PiSSA
_HF_INITS = {True: "zeros", False: "zeros", "gaussian": "gaussian", "pissa": "pissa"}


def config_from_adapter(d: dict) -> Config:
    """Our config from an HF peft ``adapter_config.json`` dict (e.g. an adapter HF peft trained).

    ``init_lora_weights: "pissa"`` (HF peft's unconverted PiSSA, relative to the residual base)
    gives ``init: pissa``, so loading recomputes the residual from the base, as HF peft does.
    ``rank_pattern`` / ``alpha_pattern`` are read as they are (HF peft writes them for its
    transformers-5 MoE conversion: the fused ``gate_up_proj`` gets 2r and 2·alpha).

    Raises:
        UserError: options we do not implement (bias training, modules_to_save, other inits such
        as ``pissa_niter_K``, whose randomised SVD cannot be reproduced).
    """
    if d.get("bias", "none") != "none" or d.get("modules_to_save"):
        raise UserError("adapter_config.json: bias / modules_to_save are not supported yet")
    init = d.get("init_lora_weights", True)
    if not isinstance(init, (bool, str)) or init not in _HF_INITS:
        raise UserError(f"adapter_config.json: init_lora_weights {init!r} is not supported (true, false, gaussian, pissa)")
    parameters = list(d.get("target_parameters") or [])
    targets = d.get("target_modules") or ([] if parameters else None)  # none: the model's default, resolved by apply
    return Config(
        r=d["r"], alpha=d.get("lora_alpha", 8), dropout=d.get("lora_dropout", 0.0),
        rank_pattern=d.get("rank_pattern") or {}, alpha_pattern=d.get("alpha_pattern") or {},
        target_modules=list(targets) if isinstance(targets, (list, tuple, set)) else targets, target_parameters=parameters,
        layers=d.get("layers_to_transform"), rslora=bool(d.get("use_rslora", False)),
        dora=bool(d.get("use_dora", False)), init=_HF_INITS[init],
    )


def recorded_4bit(cfg: dict) -> bool:
    """Whether an ``adapter_config.json`` dict records a 4-bit base (``peftcli.model.quantization``
    ``nf4`` or ``fp4``): the base a ``qlora`` adapter was trained on."""
    return ((cfg.get("peftcli") or {}).get("model") or {}).get("quantization", "none") in FOUR_BIT




def reads_adapter(cfg: dict) -> bool:
    """Whether ``lora`` loads this ``adapter_config.json`` dict: a ``LORA`` file whose recorded
    base is not 4-bit (those are ``qlora``'s, :func:`recorded_4bit`); HF peft's files record no
    base dtype, so they are ``lora``'s."""
    return common.peft_type(cfg) == PEFT_TYPE and not recorded_4bit(cfg)


def lr_groups(model: nn.Module, cfg: Config) -> list[tuple[float, list[nn.Parameter]]]:
    """The optimizer groups of an applied ``model``: one at ``train.lr`` without
    ``cfg.lr_ratio``; with it, LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of
    Large Models", §3-4, https://arxiv.org/abs/2402.12354): ``[(1.0, A's), (lr_ratio, B's)]``.

    The paper's argument (§3, at large width n with Adam): efficient feature learning needs
    η_B = Θ(1) but η_A = Θ(1/n), so one rate for both either barely moves B or makes A unstable;
    it sets η_B = λ·η_A with λ about 16 (§4). Every B of the layers (Linear, DoRA and the
    ``target_parameters`` wrappers, whose B holds one B_e per expert, each the same role) takes
    λ. A DoRA magnitude (out,) scales the output rows directly, as B does, so it goes with B —
    HF peft's ``create_loraplus_optimizer`` (1-D parameters with B) does the same. Anything else
    trainable goes with A. (There is no LoRA on embedding layers here, which HF peft would give a
    third rate.)
    """
    if cfg.lr_ratio is None:
        return common.one_lr_group(model, cfg)
    fast = {id(layer.lora_B.weight) for layer in all_layers(model).values()}
    fast |= {id(layer.lora_magnitude_vector) for layer in lora_layers(model).values() if isinstance(layer, DoRALinear)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [(1.0, [p for p in trainable if id(p) not in fast]), (cfg.lr_ratio, [p for p in trainable if id(p) in fast])]


def merge(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and put a plain ``nn.Linear`` back (a
    ``Conv1D`` where the base's files hold one, so a GPT-2 merge reloads into GPT-2).

    The merged weight (``merged_weight``: W + scaling·B·A; for DoRA m ⊙ (W + s·B A) / ‖W + s·B A‖_r)
    is computed in float32 and rounded once to the output dtype; a 4/8-bit base is dequantised
    first (the weights the adapter was trained against, Dettmers et al. 2023, §3), so the merged
    Linear is full precision (float32 for a quantised base, else the base dtype). For PiSSA, W is
    the residual, so the sum is the original W plus the trained update. A weight shared with
    another module (tied embeddings) is never written in place: the merged Linear gets its own
    storage. The bias is kept as is. ``target_parameters`` updates are folded into their fused
    weights (:func:`peftcli.methods.lora_params.merge`). Returns ``model``.
    """
    lora_params.merge(model)
    for name, layer in lora_layers(model).items():
        base = layer.base_layer
        with torch.no_grad():
            w = layer.merged_weight()  # (out, in) float32
        dtype = torch.float32 if models.is_quantized_linear(base) else base.weight.dtype
        model.set_submodule(name, models.plain_linear(w, base.bias, base, dtype))
    return model
