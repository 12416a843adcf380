"""The method library: one module per method, registered by its recipe name.

Every method module provides the surface :class:`Method` lists. Its recipe keys and description
(the :data:`CARD_MEMBERS`) live in its card, the torch-free module
``peftcli.methods.cards.<name>`` that the method module re-exports: the registry imports every
card at once (:data:`CARDS`: the recipe schema, ``peft methods``) and a method module only when
it is first used (:data:`METHODS`, :func:`get`), checking it then (:func:`check`). So a command
that only reads recipes never imports torch. What every method repeats is in the toolkit
:mod:`peftcli.methods.common`.
"""

from __future__ import annotations

import importlib
import inspect
import types
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Protocol, Union, get_args, get_origin, get_type_hints

from pydantic import BaseModel

if TYPE_CHECKING:  # the annotations of the Protocol's functions; never imported here at run time
    import torch
    from torch import nn

NAMES = ("lora", "qlora", "adapter", "ia3", "prefix_tuning", "prompt_tuning", "p_tuning")
"""The registered methods, in ``peft methods`` order: ``method.name`` X is the module
``peftcli.methods.X``, with its card ``peftcli.methods.cards.X``."""

CARDS: dict[str, types.ModuleType] = {name: importlib.import_module(f"peftcli.methods.cards.{name}") for name in NAMES}
"""name -> the method's card module (torch-free)."""

CARD_MEMBERS = ("Config", "PEFT_TYPE", "PAPER", "SUMMARY", "PADDING_FREE", "CANNOT_MERGE", "base_quantization")
"""What a card holds; the method module re-exports each (the same objects)."""


class Method(Protocol):
    """What a method module provides (a module satisfies this Protocol; its functions take no
    ``self``). Every member is required; :mod:`peftcli.methods.common` has defaults a module can
    re-export (``file_fields = common.no_file_fields``, ``reads_adapter =
    common.reads_peft_type(PEFT_TYPE)``, ``lr_groups = common.one_lr_group``); the
    :data:`CARD_MEMBERS` come from its card."""

    Config: type[BaseModel]
    """The pydantic schema of its recipe keys; its ``name`` field (a ``Literal`` of the name the
    method is registered under) is the discriminator of the recipe's ``method`` union."""

    PEFT_TYPE: str
    """The HF peft ``peft_type`` its ``adapter_config.json`` carries (``"LORA"``); ours where HF
    peft has no such method (``"BOTTLENECK"``)."""

    PAPER: str
    """The source: authors, year, title (``peft methods`` prints it)."""

    SUMMARY: str
    """What trains, in one line (``peft methods`` prints it)."""

    PADDING_FREE: bool
    """True when the method keeps each row's token sequence unchanged, so padding-free
    (packed) rows work; False for methods that add virtual tokens per row."""

    CANNOT_MERGE: str | None
    """None when :meth:`merge` folds the method into the base weights; else the one reason it
    cannot, which ``peft merge`` and :meth:`merge` say."""

    def apply(self, model: nn.Module, cfg: BaseModel, tokenizer=None) -> list[str]:
        """Freeze every base parameter of ``model`` and add the method's trainable parts, in
        place, as ``cfg`` says. Options the recipe left null (e.g. default targets) are resolved
        and written into ``cfg``. ``tokenizer``: the base's tokenizer, for methods that need one
        (prompt tuning's text init). Returns the names of the modules it wrapped or hooked.

        Raises:
            UserError: the method cannot apply to this model as configured (one line).
        """

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The trainable weights of an applied ``model`` (CPU, contiguous), in the key naming of
        its file format (HF peft's where there is one)."""

    def load_state_dict(self, model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
        """Copy ``sd`` (as :meth:`state_dict` writes it, or HF peft's file) into an applied
        ``model``.

        Raises:
            UserError: a key too many or missing, or a shape that differs
            (``adapter weights do not fit ...``, :func:`peftcli.methods.common.check_keys`).
        """

    def adapter_config(self, cfg: BaseModel) -> dict:
        """The ``adapter_config.json`` fields of ``cfg`` (``peft_type`` included, no base
        model), in HF peft's naming where it has the method."""

    def config_from_adapter(self, d: dict) -> BaseModel:
        """The method's ``Config`` from an ``adapter_config.json`` dict (one without our
        ``peftcli`` block, e.g. written by HF peft).

        Raises:
            UserError: a field missing, or an option the method does not implement.
        """

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the method into the base weights of an applied ``model`` (plain layers put
        back); returns ``model``.

        Raises:
            UserError: always where :attr:`CANNOT_MERGE` is set, with it in the message.
        """

    def file_fields(self, model: nn.Module) -> dict:
        """``adapter_config.json`` fields that depend on what :meth:`apply` wrapped on
        ``model`` (LoRA: the explicit target list, ``fan_in_fan_out``), written over the
        :meth:`adapter_config` ones when saving; ``{}`` for most methods."""

    def lr_groups(self, model: nn.Module, cfg: BaseModel) -> list[tuple[float, list[nn.Parameter]]]:
        """The trainable parameters of an applied ``model`` as optimizer groups, each with its
        learning rate as a multiple of ``train.lr`` (the schedule then scales every group alike):
        ``[(1.0, every trainable parameter)]`` for most methods
        (:func:`peftcli.methods.common.one_lr_group`); LoRA with ``lr_ratio`` (LoRA+, Hayou et al.
        2024): ``[(1.0, the A's), (lr_ratio, the B's)]``. The first group is at 1.0 (the rate the
        log shows); every trainable parameter is in exactly one group."""

    def base_quantization(self, quantization: str) -> str:
        """The ``model.quantization`` the method trains on, given the recipe's (``none``,
        ``nf4``, ``fp4``, ``int8``): most methods return it unchanged
        (:func:`peftcli.methods.cards.any_quantization`); qlora needs a 4-bit base (``none``
        resolves to ``nf4``).

        Raises:
            ValueError: a quantisation the method cannot train on (the recipe reports it as a
            one-line error).
        """

    def reads_adapter(self, cfg: dict) -> bool:
        """Whether this method loads the ``adapter_config.json`` dict ``cfg`` (one whose
        ``peftcli`` block names no method): by its ``peft_type``, and for ``LORA`` files the
        recorded base (4-bit: ``qlora``, else ``lora``). Exactly one registered method reads a
        file of a supported type."""


def _fits(value, hint) -> bool:
    """Whether ``value`` is of the annotated type ``hint`` (plain classes, ``X | None``,
    ``type[X]``)."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_fits(value, h) for h in get_args(hint))
    if origin is type:
        return isinstance(value, type) and issubclass(value, get_args(hint)[0])
    if hint is type(None):
        return value is None
    return isinstance(value, hint)


_SKIP = {"self", "return"}


def check(name: str, module) -> None:
    """Check that ``module`` provides the :class:`Method` surface, registered as ``name``:
    every data member present and of its annotated type (``Config`` a pydantic model whose
    ``name`` defaults to ``name``), every function present, callable, and taking the
    Protocol's parameters by those names.

    Raises:
        TypeError: naming the module and the first member missing or of the wrong kind.
    """
    where = getattr(module, "__name__", name)
    hints = get_type_hints(Method, globalns=globals())
    for member, hint in hints.items():
        if not hasattr(module, member):
            raise TypeError(f"method module {where} has no {member} (the Method surface needs it)")
        if not _fits(getattr(module, member), hint):
            raise TypeError(f"method module {where}: {member} is {getattr(module, member)!r}, not {hint}")
    field = module.Config.model_fields.get("name")
    if field is None or field.default != name:
        raise TypeError(f"method module {where}: Config.name must default to {name!r} (its registered name)")
    for member, proto in inspect.getmembers(Method, inspect.isfunction):
        if member.startswith("_"):
            continue
        fn = getattr(module, member, None)
        if fn is None:
            raise TypeError(f"method module {where} has no {member}() (the Method surface needs it)")
        if not callable(fn):
            raise TypeError(f"method module {where}: {member} is not a function")
        want = [p for p in inspect.signature(proto).parameters if p not in _SKIP]
        params = inspect.signature(fn).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            lacking = [p for p in want if p not in params]
            if lacking:
                raise TypeError(f"method module {where}: {member}() takes no {lacking[0]!r} "
                                f"(the Method surface calls {member}({', '.join(want)}))")
    card = CARDS.get(name)
    if card is None:
        raise TypeError(f"method module {where}: no card peftcli.methods.cards.{name}")
    for member in CARD_MEMBERS:
        if getattr(module, member) is not getattr(card, member):
            raise TypeError(f"method module {where}: {member} is not its card's ({card.__name__}.{member}); "
                            f"re-export it from there")


class Registry(Mapping):
    """name -> method module, each imported (and :func:`check`-ed) when first looked up; the
    names themselves (``list(METHODS)``, ``name in METHODS``) import nothing."""

    def __init__(self, names: tuple[str, ...]):
        self._names = names
        self._loaded: dict[str, Method] = {}

    def __getitem__(self, name: str) -> Method:
        if name not in self._loaded:
            if name not in self._names:
                raise KeyError(name)
            module = importlib.import_module(f"peftcli.methods.{name}")
            check(name, module)  # a module that lacks a member fails here, where it is first used
            self._loaded[name] = module
        return self._loaded[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


METHODS: Mapping[str, Method] = Registry(NAMES)
METHOD_CONFIGS = {name: card.Config for name, card in CARDS.items()}


def get(name: str) -> Method:
    """The method module registered as ``name`` (imported on first use).

    Raises:
        KeyError: unknown name (the recipe schema rejects those before this is reached).
    """
    return METHODS[name]


KINDS = ("attention", "mlp", "experts", "router", "prompt", "other")
_ATTENTION = ("attn", "attention")
_MLP = ("mlp", "feed_forward", "ffn", "fc1", "fc2", "gate_proj", "up_proj", "down_proj")
_MOE_BLOCK = ("mlp", "block_sparse_moe", "moe", "feed_forward")


def parameter_kind(path: str) -> str:
    """Which part of a decoder block a parameter path belongs to, by its module names:
    ``experts`` (inside a fused or listed ``experts`` module, e.g. ``mlp.experts.lora_A.weight``),
    ``router`` (an MoE block's ``gate``/``router``), ``attention``, ``mlp``, ``prompt`` (a prompt
    method's encoder or virtual tokens), or ``other`` (embeddings, norms, the head)."""
    parts = path.lower().split(".")
    if parts[0] in ("prompt_encoder", "prefix_encoder"):  # the prompt methods' own modules
        return "prompt"
    if "experts" in parts:
        return "experts"
    if "router" in parts or ("gate" in parts and any(p in _MOE_BLOCK for p in parts)):
        return "router"
    if any(w in p for p in parts for w in _ATTENTION):
        return "attention"
    if any(p.startswith(w) for p in parts for w in _MLP):
        return "mlp"
    return "other"


def trainable_by_kind(model) -> dict[str, int]:
    """Trainable parameter counts by :func:`parameter_kind`, e.g. ``{"attention": 8192, "experts":
    24576}`` (kinds with none left out, in :data:`KINDS` order)."""
    counts = dict.fromkeys(KINDS, 0)
    for name, p in model.named_parameters():
        if p.requires_grad:
            counts[parameter_kind(name)] += p.numel()
    return {k: n for k, n in counts.items() if n}


def kinds_line(model) -> str:
    """:func:`trainable_by_kind` as one line: ``attention 8,192 · experts 24,576``."""
    return " · ".join(f"{k} {n:,}" for k, n in trainable_by_kind(model).items())
