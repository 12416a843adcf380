"""Prefix tuning: trainable key/value prefixes for every attention layer (Li & Liang 2021,
"Prefix-Tuning: Optimizing Continuous Prompts for Generation", §4.1-4.3,
https://arxiv.org/abs/2101.00190).

    layer l attends over  [P_k^l ; K^l]  and  [P_v^l ; V^l]     P_k^l, P_v^l: (kv_heads, n, head_dim)

Every layer sees ``n`` extra key/value positions in front of the real tokens (§4.1); the base
stays frozen. The prefix is one matrix P of shape (n, num_layers · 2 · kv_heads · head_dim), HF
peft's layout: row j holds, for each layer l, the key (slot 2l) then the value (slot 2l + 1) of
virtual token j, each (kv_heads, head_dim). ``projection: true`` is the reparameterisation of
§4.3: P = MLP(E) with E an (n, kv_heads · head_dim) embedding and the MLP
Linear(kv_heads · head_dim, encoder_hidden_size) → tanh → Linear(encoder_hidden_size, width),
as HF peft's ``prefix_projection``; it is used in training only and *folded away*: the saved
adapter holds the computed P, and a loaded adapter is the plain P again.

Mechanism (composition, no subclassing): a forward pre-hook on the decoder body
(:func:`peftcli.models.decoder_body`: the module the model's own forward runs the tokens
through, e.g. ``model.model.decoder`` of an OPT). When a call has no KV cache, or an empty one,
the hook fills a ``DynamicCache`` (the caller's empty one, in place, or a new one) with the
per-layer prefixes expanded to the batch (gradients flow into P), and prepends ``n`` ones to a
2-D attention mask. The model then counts the cached prefix as past tokens, so without explicit
``position_ids`` the real tokens sit at positions n, n+1, ... (HF peft's convention), and
explicit ``position_ids`` (``generate`` passes them, from the attention mask) are shifted by
``n`` on every call, as HF peft does. With a cache that already holds the prefix (decode steps)
only the mask is extended. So greedy generation is identical with ``use_cache`` on and off: off,
``generate`` calls the body with the whole sequence and no cache each step and the prefix is
added each time; a forward hook then drops the cache the body returns, so the next step starts
clean again.

Files are HF peft's PREFIX_TUNING format: one tensor ``prompt_embeddings`` of shape
(n, num_layers · 2 · kv_heads · head_dim). Head counts and sizes come from the model config:
``num_key_value_heads`` (grouped-query attention) and ``head_dim`` when the config has one, else
hidden_size / num_attention_heads.

Limitation: gradient checkpointing cannot carry a KV cache through the recomputed layers
(transformers drops the cache there), so training with it on is refused with a UserError.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from peftcli.errors import UserError
from peftcli.methods import common, off
from peftcli.methods.cards.prefix_tuning import CANNOT_MERGE, PADDING_FREE, PAPER, PEFT_TYPE, SUMMARY, Config, base_quantization  # noqa: F401  (its card)
from peftcli.models import decoder_body, decoder_body_name, one_token_forward

ENCODER = "prefix_encoder"  # the attribute of the model that holds the PrefixEncoder
WEIGHT_KEY = "prompt_embeddings"  # HF peft's key


# ---------------------------------------------------------------------------------------------
# shapes


def attention_shape(model: nn.Module) -> tuple[int, int, int]:
    """(num_layers, kv_heads, head_dim) of a decoder's key/value cache.

    Measured: the key cache a one-token forward (no grad, eval mode) builds, (1, kv_heads, 1,
    head_dim) per layer — what attention really concatenates the prefix with, whatever the config
    says (Falcon's ``multi_query`` keeps one key/value head while ``num_kv_heads`` says 4). A
    model whose cache has no per-layer keys falls back to the config: ``head_dim`` (it need not be
    hidden / heads, else hidden_size / num_attention_heads) and ``num_key_value_heads`` (else the
    attention heads).

    Raises:
        UserError: neither gives the shape, or the layers' key/value shapes differ.
    """
    measured = _cache_shapes(model)
    if measured:
        shapes = set(measured)
        layers = len(measured)
    else:
        config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        try:
            layers = config.num_hidden_layers
            shapes = {_kv_shape(c) for c in _layer_configs(config, layers)}
        except AttributeError as e:
            raise UserError(f"prefix_tuning: the model config has no {e.name} (a decoder with standard attention is needed)") from None
    if len(shapes) != 1:
        raise UserError(f"prefix_tuning: the layers' key/value shapes differ ({sorted(shapes)}), which is not supported")
    kv_heads, head_dim = shapes.pop()
    return layers, kv_heads, head_dim


def _cache_shapes(model: nn.Module) -> list[tuple[int, int]] | None:
    """(kv_heads, head_dim) of each layer's key cache after a one-token forward, or None where the
    model builds no such cache (or the forward cannot run on one token)."""
    try:
        cache = one_token_forward(model, use_cache=True).past_key_values
        keys = [layer.keys for layer in getattr(cache, "layers", None) or []]
    except Exception:  # noqa: BLE001 - any failure here means: read the config instead
        return None
    if not keys or any(not isinstance(k, torch.Tensor) or k.dim() != 4 or k.shape[2] != 1 for k in keys):
        return None
    return [(int(k.shape[1]), int(k.shape[3])) for k in keys]


def _layer_configs(config, layers: int) -> list:
    """Each layer's view of the config (transformers' ``per_layer_config`` where a model has one)."""
    view = getattr(config, "per_layer_config", None)
    return [view[i] for i in range(layers)] if view is not None else [config]


def _kv_shape(config) -> tuple[int, int]:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return kv_heads, head_dim


# ---------------------------------------------------------------------------------------------
# the prefix


class PrefixEncoder(nn.Module):
    """The prefix P: (n, num_layers · 2 · kv_heads · head_dim), trained directly or through an
    MLP (Li & Liang 2021, §4.3).

    ``forward()`` -> P: ``embedding.weight`` (plain), or
    ``transform(embedding.weight)`` with ``embedding.weight``: (n, kv_heads · head_dim) and
    ``transform`` = Linear(kv_heads · head_dim, encoder_hidden_size) → Tanh →
    Linear(encoder_hidden_size, width) (projection).

    Args:
        num_virtual_tokens: n.
        num_layers, kv_heads, head_dim: the decoder's attention shape (see :func:`attention_shape`).
        projection: use the MLP (default False).
        encoder_hidden_size: the MLP's hidden width (default kv_heads · head_dim).

    The parameters are float32 and start as HF peft's: ``nn.Embedding``'s N(0, 1) and
    ``nn.Linear``'s Kaiming-uniform. :meth:`fold` replaces the MLP by its output.
    """

    def __init__(self, num_virtual_tokens: int, num_layers: int, kv_heads: int, head_dim: int,
                 projection: bool = False, encoder_hidden_size: int | None = None):
        super().__init__()
        self.num_virtual_tokens, self.num_layers, self.kv_heads, self.head_dim = num_virtual_tokens, num_layers, kv_heads, head_dim
        self.width = num_layers * 2 * kv_heads * head_dim
        self.folded = False  # True once a projection was replaced by its (frozen) output
        if projection:
            token_dim = kv_heads * head_dim
            hidden = encoder_hidden_size or token_dim
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, self.width))
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, self.width)
            self.transform = None

    def forward(self) -> torch.Tensor:
        """P: (n, num_layers · 2 · kv_heads · head_dim)."""
        e = self.embedding.weight
        return e if self.transform is None else self.transform(e)

    def fold(self, prefix: torch.Tensor) -> None:
        """Drop the MLP and hold ``prefix`` (n, width) as a plain, frozen prefix: what a saved
        projection adapter is once loaded (the MLP's parameters are not saved)."""
        device = self.embedding.weight.device
        self.transform = None
        self.embedding = nn.Embedding(self.num_virtual_tokens, self.width, device=device)
        with torch.no_grad():
            self.embedding.weight.copy_(prefix.to(device, torch.float32))
        self.embedding.weight.requires_grad_(False)
        self.folded = True

    def key_values(self, batch_size: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values), each (batch, kv_heads, n, head_dim), in ``dtype``; HF peft's
        layout of P (slot 2l: keys of layer l, slot 2l + 1: its values)."""
        n = self.num_virtual_tokens
        p = self().to(dtype).view(n, 2 * self.num_layers, self.kv_heads, self.head_dim)  # (n, 2L, kv, d)
        p = p.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch_size, -1, -1, -1)  # (2L, B, kv, n, d)
        return [(p[2 * i], p[2 * i + 1]) for i in range(self.num_layers)]


def encoder_of(model: nn.Module) -> PrefixEncoder:
    """The :class:`PrefixEncoder` :func:`apply` attached to ``model``.

    Raises:
        UserError: ``model`` has no prefix (prefix_tuning was not applied).
    """
    encoder = getattr(model, ENCODER, None)
    if not isinstance(encoder, PrefixEncoder):
        raise UserError("prefix_tuning: the model has no prefix (apply the method first)")
    return encoder


# ---------------------------------------------------------------------------------------------
# the hooks


class PrefixHooks:
    """The decoder body's forward pre-hook (inject the prefix) and forward hook (drop a cache
    the caller did not ask for). See the module docstring for the conventions."""

    def __init__(self, body: nn.Module, encoder: PrefixEncoder, model: nn.Module):
        self.body, self.encoder = body, encoder
        self.config, self.embed = getattr(body, "config", model.config), model.get_input_embeddings()
        self.params = list(inspect.signature(body.forward).parameters)
        # transformers >= 5 names the cache ``cache`` (``past_key_values`` is a deprecated alias)
        self.cache_kw = "cache" if "cache" in self.params else "past_key_values"
        self.drop_cache = False

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if off.is_off(self.encoder):  # the method switched off (peftcli.methods.off): the body's own call
            self.drop_cache = False
            return args, kwargs
        if args:  # bind positional arguments to their names, so every input is in kwargs
            kwargs = {**dict(zip(self.params, args)), **kwargs}
        cache = kwargs.pop("past_key_values", None) if self.cache_kw != "past_key_values" else None
        cache = kwargs.get(self.cache_kw) if cache is None else cache
        n = self.encoder.num_virtual_tokens
        self.drop_cache = False

        mask = kwargs.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                raise UserError("prefix_tuning needs a 2-D attention mask (batch, tokens) or none")
            kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)  # (B, n + T)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + n  # real tokens come after the prefix

        if cache is None or cache.get_seq_length() == 0:
            self._check_trainable()
            inputs = kwargs.get("input_ids")
            inputs = kwargs.get("inputs_embeds") if inputs is None else inputs
            cache = self._prefilled(cache, inputs.shape[0], inputs.device)
            use_cache = kwargs.get("use_cache")
            self.drop_cache = not (getattr(self.config, "use_cache", True) if use_cache is None else use_cache)
        kwargs[self.cache_kw] = cache
        return (), kwargs

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output):
        if self.drop_cache and getattr(output, self.cache_kw, None) is not None:
            # use_cache off: the next call starts without a cache, and gets the prefix again
            setattr(output, self.cache_kw, None)
        return output

    def _prefilled(self, cache, batch_size: int, device: torch.device):
        """``cache`` (or a new DynamicCache) holding the prefix of every layer, expanded to the batch."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config) if cache is None else cache
        kv = self.encoder.key_values(batch_size, self._dtype(device))  # L × ((B, kv, n, d), (B, kv, n, d))
        for layer, (keys, values) in enumerate(kv):
            cache.update(keys, values, layer)
        return cache

    def _dtype(self, device: torch.device) -> torch.dtype:
        """The compute dtype: autocast's where it is on, else the base's (its input embedding's)."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.embed.weight.dtype

    def _check_trainable(self) -> None:
        """Refuse, in one line, a training forward whose prefix would silently not train."""
        checkpointing = self.body.training and torch.is_grad_enabled() and any(
            getattr(m, "gradient_checkpointing", False) for m in self.body.modules())
        if checkpointing:
            raise UserError("prefix_tuning cannot train with gradient checkpointing: the recomputed layers drop the "
                            "key/value cache that carries the prefix; set train.gradient_checkpointing: false")
        if self.encoder.folded and self.body.training and torch.is_grad_enabled():
            raise UserError("prefix_tuning: a saved projection adapter holds the folded prefix only (not the MLP), "
                            "so it cannot be trained further; train again, or use projection: false")


# ---------------------------------------------------------------------------------------------
# the method surface


def _body(model: nn.Module) -> nn.Module:
    """The decoder body (:func:`peftcli.models.decoder_body`), which must take a key/value cache.

    Raises:
        UserError: no decoder body, or one without a cache argument.
    """
    body = decoder_body(model)
    params = inspect.signature(body.forward).parameters
    if "cache" not in params and "past_key_values" not in params:
        raise UserError(f"prefix_tuning: {type(body).__name__} takes no key/value cache, so it cannot take a prefix")
    return body


def apply(model: nn.Module, cfg: Config, tokenizer=None) -> list[str]:
    """Freeze every base parameter, attach a :class:`PrefixEncoder` as ``model.prefix_encoder``
    and hook the decoder body so every call gets the prefix. ``tokenizer`` is not used.

    Returns the hooked module's name (the decoder body). Raises UserError when the model has no
    decoder body taking a KV cache, an unsupported attention layout, or a prefix already.
    """
    if hasattr(model, ENCODER):
        raise UserError("prefix_tuning: the model has a prefix already")
    body = _body(model)
    layers, kv_heads, head_dim = attention_shape(model)
    common.freeze_base(model)
    device = model.get_input_embeddings().weight.device
    encoder = PrefixEncoder(cfg.num_virtual_tokens, layers, kv_heads, head_dim, cfg.projection,
                            cfg.encoder_hidden_size).to(device).train(model.training)
    setattr(model, ENCODER, off.switchable(encoder))
    hooks = PrefixHooks(body, encoder, model)
    encoder._handles = (body.register_forward_pre_hook(hooks.pre, with_kwargs=True),
                        body.register_forward_hook(hooks.post, with_kwargs=True))
    return [decoder_body_name(model)]


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"prompt_embeddings": P}``, P: (n, num_layers · 2 · kv_heads · head_dim) float32, the
    prefix as computed (through the MLP when ``projection`` is on), as HF peft saves it."""
    with torch.no_grad():
        return {WEIGHT_KEY: encoder_of(model)().detach().float().cpu().contiguous()}


def load_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Load a saved prefix (HF peft's ``prompt_embeddings``). A model with a projection MLP
    has it folded away: the loaded prefix replaces it (see :meth:`PrefixEncoder.fold`).

    Raises:
        UserError: keys other than ``prompt_embeddings``, or a shape that does not fit this model
        (another base, or another num_virtual_tokens).
    """
    encoder = encoder_of(model)
    common.check_keys(sd, {WEIGHT_KEY})
    prefix = sd[WEIGHT_KEY]
    common.check_shape(WEIGHT_KEY, prefix, (encoder.num_virtual_tokens, encoder.width),
                       why=f" (num_virtual_tokens, num_layers·2·kv_heads·head_dim = {encoder.num_layers}·2·"
                           f"{encoder.kv_heads}·{encoder.head_dim})")
    if encoder.transform is not None:
        encoder.fold(prefix)
        return
    with torch.no_grad():
        encoder.embedding.weight.copy_(prefix.to(encoder.embedding.weight.device, torch.float32))


def adapter_config(cfg: Config) -> dict:
    """The HF peft ``PrefixTuningConfig`` fields for ``adapter_config.json`` (without the base).

    ``prefix_projection`` is false whatever ``projection`` was: the file holds the folded prefix
    and no MLP, so HF peft loads it as a plain prefix (for inference and for further training).
    ``token_dim``, ``num_attention_heads`` and ``num_layers`` are left null: HF peft derives them
    from the base config (kv_heads · head_dim, kv_heads, layers). The recipe's own keys are kept
    in the ``peftcli`` block.
    """
    return {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "num_transformer_submodules": 1,
        "prefix_projection": False,
        "encoder_hidden_size": cfg.encoder_hidden_size,
        "token_dim": None,
        "num_attention_heads": None,
        "num_layers": None,
        "init_weights": None,
        "modules_to_save": None,
        "inference_mode": True,
    }


def config_from_adapter(d: dict) -> Config:
    """Our config from an HF peft PREFIX_TUNING ``adapter_config.json`` dict.

    Raises:
        UserError: an encoder-decoder adapter (two transformer submodules) or modules_to_save.
    """
    if (d.get("num_transformer_submodules") or 1) != 1:
        raise UserError("adapter_config.json: prefix tuning for encoder-decoder models is not supported")
    if d.get("modules_to_save"):
        raise UserError("adapter_config.json: modules_to_save is not supported for PREFIX_TUNING")
    if not d.get("num_virtual_tokens"):
        raise UserError("adapter_config.json: no num_virtual_tokens")
    return Config(num_virtual_tokens=int(d["num_virtual_tokens"]), projection=bool(d.get("prefix_projection")),
                  encoder_hidden_size=d.get("encoder_hidden_size"))


file_fields = common.no_file_fields
reads_adapter = common.reads_peft_type(PEFT_TYPE)
lr_groups = common.one_lr_group


def merge(model: nn.Module) -> nn.Module:
    """Prefix tuning cannot merge (:data:`CANNOT_MERGE`).

    Raises:
        UserError: always, with :data:`CANNOT_MERGE`.
    """
    raise common.refuse_merge("prefix_tuning", CANNOT_MERGE)
