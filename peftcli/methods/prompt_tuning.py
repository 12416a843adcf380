"""Prompt tuning: trainable virtual token embeddings in front of every input (Lester et al. 2021,
"The Power of Scale for Parameter-Efficient Prompt Tuning", §2, https://arxiv.org/abs/2104.08691).

    inputs_embeds ↦ [P ; E(x)]          P: (n, hidden) trainable, E: the frozen input embedding

The base stays frozen; only the n × hidden prompt P trains (§2). P is initialised (§2.2, §3.2):
``random`` — uniform in [-0.5, 0.5] (the paper's random init); ``vocab`` — the embeddings of n
token ids drawn uniformly from the vocabulary (HF peft's SAMPLE_VOCAB); ``text`` — the
embeddings of ``init_text``, tokenised with the base's tokenizer (the one ``apply`` is given)
as HF peft's TEXT init does (special tokens included) and repeated or cut to n rows. ``random`` and ``vocab`` draw from
torch's global generator, which ``peft train`` seeds with ``train.seed``.

The mechanism (shared with ``p_tuning``, see :class:`VirtualTokens`) hooks the decoder body
(:func:`peftcli.models.decoder_body`: the module the model's own forward runs the tokens
through, e.g. ``model.model.decoder`` of an OPT), so the trainer, ``eval`` and ``generate`` run the
model unchanged: the body sees [virtual][padding][tokens] (virtual tokens first, before any left
padding, as in HF peft) and returns hidden states for the real positions only. Labels therefore
need no -100 extension; HF peft's convention (labels extended by n ignored positions) gives the
same loss.

Files are Hugging Face peft's PROMPT_TUNING format: one tensor ``prompt_embeddings`` (n, hidden).
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn

from peftcli.errors import UserError
from peftcli.methods import common, off
from peftcli.methods.cards.prompt_tuning import CANNOT_MERGE, PADDING_FREE, PAPER, PEFT_TYPE, SUMMARY, Config, base_quantization  # noqa: F401  (its card)
from peftcli.models import decoder_body, decoder_body_name

EMBEDDINGS_KEY = "prompt_embeddings"  # HF peft's key for every prompt-learning adapter file
HF_INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


# ---------------------------------------------------------------------------------------------
# the hooks shared by the prompt-learning methods


class VirtualTokens:
    """Forward hooks that put ``n`` virtual token embeddings in front of every sequence the
    decoder body processes, and take their positions out of what it returns.

    ``prompt()`` returns the virtual tokens, (n, hidden). On a call without a cache or with an
    empty one (a training or eval forward, a generation's first step, every step of generation
    without cache) the pre-hook sets

        inputs_embeds  = [prompt ; embed(input_ids)]          (B, n + T, hidden)
        attention_mask = [1 … 1 ; attention_mask]             (B, n + T)

    and the post-hook cuts the first n positions off ``last_hidden_state`` (and off
    ``hidden_states`` and the query axis of ``attentions`` when returned), so the output head,
    the loss and ``generate`` see exactly the T input positions. On a call whose cache is not
    empty (later generation steps: the virtual tokens are already in the cache) only the mask is
    extended by n ones. In both cases ``position_ids`` are recomputed from the extended mask
    (cumsum − 1 over real positions, the last q_len columns), whatever the caller passed, so a
    left-padded row is numbered as if it were unpadded and greedy output is the same with the
    KV cache on and off. A ``cache_position`` argument (older transformers) is set to
    past_len + arange(q_len).

    Gradient checkpointing works (transformers checkpoints the layers inside the body; the prompt
    requires grad, so reentrant checkpointing needs no input-grad hook). Limitations: a 4-D
    attention mask (static or compiled caches) is refused; position ids the caller passes are
    replaced (packed sequences with restarting positions are not kept); the body's output given
    as a tuple has only its first element (the hidden states) cut.
    """

    def __init__(self, prompt: Callable[[], torch.Tensor], n: int, embed: nn.Module):
        self.prompt, self.n, self.embed = prompt, n, embed  # embed: the model's input embedding
        self._strip = False  # set by the pre-hook for the post-hook of the same call

    def before(self, body: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if off.is_off(self.prompt):  # the method switched off (peftcli.methods.off): the body's own call
            self._strip = False
            return args, kwargs
        kwargs = _as_kwargs(body, args, kwargs)
        ids, embeds, mask = kwargs.get("input_ids"), kwargs.get("inputs_embeds"), kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError("prompt methods need a 2-D attention mask (static or compiled caches are not supported)")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        self._strip = past == 0
        x = embeds if embeds is not None else ids
        batch = x.shape[0]
        if self._strip:
            if embeds is None:
                embeds = self.embed(ids)  # (B, T, H)
            prompt = self.prompt().to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)  # (B, n, H)
            kwargs["input_ids"], kwargs["inputs_embeds"] = None, torch.cat([prompt, embeds], dim=1)  # (B, n+T, H)
            x = kwargs["inputs_embeds"]
        q_len = x.shape[1]
        if mask is not None:
            mask = torch.cat([mask.new_ones(batch, self.n), mask], dim=1)  # (B, n + T); later steps (B, past + q_len)
            kwargs["attention_mask"] = mask
        kwargs["position_ids"] = positions(mask, past, q_len, x.device)
        if kwargs.get("cache_position") is not None:
            kwargs["cache_position"] = torch.arange(past, past + q_len, device=x.device)
        return (), kwargs

    def after(self, body: nn.Module, args: tuple, kwargs: dict, output):
        if not self._strip:
            return output
        self._strip = False
        n = self.n
        if isinstance(output, tuple):
            return (output[0][:, n:],) + output[1:]
        output.last_hidden_state = output.last_hidden_state[:, n:]  # (B, T, H)
        if output.get("hidden_states") is not None:
            output.hidden_states = tuple(h[:, n:] for h in output.hidden_states)
        if output.get("attentions") is not None:
            output.attentions = tuple(a[:, :, n:] for a in output.attentions)  # queries cut, keys kept
        return output


def positions(mask: torch.Tensor | None, past: int, q_len: int, device) -> torch.Tensor:
    """Position ids of the q_len positions being computed: past + arange(q_len) without a mask;
    with a (B, past + q_len) mask, the number of unmasked positions before each one (cumsum − 1;
    a padding position repeats its predecessor's number), last q_len columns. Shape (1 or B, q_len)."""
    if mask is None:
        return torch.arange(past, past + q_len, device=device).unsqueeze(0)
    return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]


def _as_kwargs(body: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The call's positional arguments moved into ``kwargs`` by the name of the forward's parameter."""
    if not args:
        return dict(kwargs)
    names = list(inspect.signature(body.forward).parameters)
    return {**dict(zip(names, args)), **kwargs}


def attach(model: nn.Module, encoder: nn.Module, n: int) -> list[str]:
    """Register ``encoder`` (whose ``forward()`` returns the (n, hidden) virtual tokens) as
    ``model.prompt_encoder`` and hook the decoder body with a :class:`VirtualTokens`.
    Returns the hooked module's name.

    Raises:
        UserError: the model already has a prompt encoder, or no decoder body taking ``inputs_embeds``.
    """
    if hasattr(model, "prompt_encoder"):
        raise UserError("this model already has a prompt method applied")
    body = decoder_body(model)
    if "inputs_embeds" not in inspect.signature(body.forward).parameters:
        raise UserError(f"prompt methods need a decoder body that takes inputs_embeds; {type(body).__name__} does not")
    model.prompt_encoder = off.switchable(encoder.train(model.training))  # in the model's mode, as every method's parts
    hooks = VirtualTokens(encoder, n, model.get_input_embeddings())
    body.register_forward_pre_hook(hooks.before, with_kwargs=True)
    body.register_forward_hook(hooks.after, with_kwargs=True)
    return [decoder_body_name(model)]


def token_dim(model: nn.Module) -> int:
    """The width of the model's input embeddings."""
    return model.get_input_embeddings().weight.shape[1]


# ---------------------------------------------------------------------------------------------
# the prompt


class PromptEmbedding(nn.Module):
    """The trainable prompt of prompt tuning (Lester et al. 2021, §2): ``embedding.weight``
    (n, hidden), float32; ``forward()`` -> (n, hidden). Named as HF peft's ``PromptEmbedding``."""

    def __init__(self, n: int, dim: int, device=None):
        super().__init__()
        self.embedding = nn.Embedding(n, dim, device=device, dtype=torch.float32)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


@torch.no_grad()
def init_prompt(weight: torch.Tensor, model: nn.Module, cfg: Config, tokenizer=None) -> None:
    """Fill the (n, hidden) prompt per ``cfg.init`` (Lester et al. 2021, §3.2); ``text`` tokenises
    ``cfg.init_text`` with ``tokenizer`` (the base's).

    Raises:
        UserError: ``text`` without a tokenizer, or a text that tokenises to nothing.
    """
    n = weight.shape[0]
    embed = model.get_input_embeddings()
    if cfg.init == "random":
        nn.init.uniform_(weight, -0.5, 0.5)
        return
    if cfg.init == "vocab":
        ids = torch.randint(0, embed.weight.shape[0], (n,))
    else:
        ids = torch.tensor(text_token_ids(tokenizer, cfg.init_text, n))
    weight.copy_(embed(ids.to(embed.weight.device)).float())


def text_token_ids(tokenizer, text: str, n: int) -> list[int]:
    """The ids ``tokenizer`` gives ``text`` (special tokens included, as HF peft's TEXT init),
    repeated or cut to n.

    Raises:
        UserError: no tokenizer (None), or ``text`` tokenises to nothing.
    """
    if tokenizer is None:
        raise UserError("method.init: text needs the base model's tokenizer, and prompt_tuning.apply was given none "
                        "(pass tokenizer=)")
    ids = tokenizer(text)["input_ids"]
    if not ids:
        raise UserError("method.init_text: tokenises to nothing")
    return (ids * (n // len(ids) + 1))[:n]


# ---------------------------------------------------------------------------------------------
# the method surface


def apply(model: nn.Module, cfg: Config, tokenizer=None) -> list[str]:
    """Freeze every base parameter, add an initialised :class:`PromptEmbedding` as
    ``model.prompt_encoder`` and hook the decoder body (see :class:`VirtualTokens`).
    ``tokenizer``: the base's, needed by ``init: text`` only.

    Returns the hooked module's name. Raises UserError for a model without a decoder body, a
    second prompt method, or a text init without a tokenizer.
    """
    common.freeze_base(model)
    embed = model.get_input_embeddings()
    prompt = PromptEmbedding(cfg.num_virtual_tokens, token_dim(model), device=embed.weight.device)
    init_prompt(prompt.embedding.weight, model, cfg, tokenizer)
    return attach(model, prompt, cfg.num_virtual_tokens)


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """HF peft's file: ``{"prompt_embeddings": (n, hidden)}``, float32."""
    return {EMBEDDINGS_KEY: model.prompt_encoder.embedding.weight.detach().float().cpu().contiguous()}


def load_state_dict(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy a saved prompt into the hooked model.

    Raises:
        UserError: keys other than ``prompt_embeddings``, or a shape other than (n, hidden).
    """
    weight = model.prompt_encoder.embedding.weight
    common.check_keys(sd, {EMBEDDINGS_KEY}, "prompt tuning")
    check_shape(sd[EMBEDDINGS_KEY], weight.shape)
    with torch.no_grad():
        weight.copy_(sd[EMBEDDINGS_KEY].to(weight.dtype))


def check_shape(saved: torch.Tensor, want: torch.Size) -> None:
    """Refuse a saved ``prompt_embeddings`` whose shape is not ``want`` (num_virtual_tokens, hidden).

    Raises:
        UserError: naming both shapes.
    """
    common.check_shape(EMBEDDINGS_KEY, saved, want, needs="this model and config need",
                       why=" (num_virtual_tokens, hidden size)")


def adapter_config(cfg: Config) -> dict:
    """The HF peft ``PromptTuningConfig`` fields for ``adapter_config.json`` (without the base model).

    HF peft's TEXT init needs a ``tokenizer_name_or_path``, which the method config does not
    know; the HF fields then say RANDOM (no init runs when HF loads the saved embeddings) and the
    ``peftcli`` block keeps ``init: text``.
    """
    return {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "num_transformer_submodules": 1,
        "prompt_tuning_init": "RANDOM" if cfg.init == "text" else HF_INITS[cfg.init],
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
        "modules_to_save": None,
        "inference_mode": True,
    }


def config_from_adapter(d: dict) -> Config:
    """Our config from an HF peft PROMPT_TUNING ``adapter_config.json`` dict. The init is
    irrelevant when loading (the saved embeddings replace it); ``random`` is used.

    Raises:
        UserError: no num_virtual_tokens, or an encoder-decoder adapter (two transformer submodules).
    """
    check_prompt_learning_config(d)
    return Config(num_virtual_tokens=d["num_virtual_tokens"])


def check_prompt_learning_config(d: dict) -> None:
    """The fields every HF prompt-learning adapter we read must have.

    Raises:
        UserError: no positive num_virtual_tokens, modules_to_save, or two transformer submodules.
    """
    n = d.get("num_virtual_tokens")
    if not isinstance(n, int) or n < 1:
        raise UserError(f"adapter_config.json: num_virtual_tokens must be a positive integer, got {n!r}")
    if (d.get("num_transformer_submodules") or 1) != 1:
        raise UserError("adapter_config.json: num_transformer_submodules 2 (an encoder-decoder adapter) is not supported")
    if d.get("modules_to_save"):
        raise UserError("adapter_config.json: modules_to_save is not supported for prompt methods")


file_fields = common.no_file_fields
reads_adapter = common.reads_peft_type(PEFT_TYPE)
lr_groups = common.one_lr_group


def merge(model: nn.Module) -> nn.Module:
    """Not possible (:data:`CANNOT_MERGE`).

    Raises:
        UserError: always, with :data:`CANNOT_MERGE`.
    """
    raise common.refuse_merge("prompt_tuning", CANNOT_MERGE)
