"""The one setup path from a recipe to a model ready to train: ``peft train``, ``peft validate``
``--smoke`` and ``peft eval`` all go through it, in this order:

    precision -> resolve the base -> tokenizer -> data (so a bad data file is reported before
    the model loads) -> packed rows (``data.packing``) -> model (+ tokenizer fitted to it, base
    fingerprint) -> method -> parameter counts

(:func:`load`), then, once the caller has placed the model where it will run, the loss path
(:func:`choose_loss_path`). The precision is the base dtype and autocast (``model.dtype``,
``train.mixed_precision``, ``auto`` resolved for this machine by
:func:`peftcli.precision.choose`); :func:`enable_gradient_checkpointing` is the memory setting.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from peftcli import data, guard, methods, models, packing, precision
from peftcli.errors import UserError
from peftcli.loss import model_device, prepare_padding_free
from peftcli.precision import AUTOCAST_DTYPES, Precision
from peftcli.recipe import ModelConfig, Recipe


@dataclass
class Prepared:
    """A recipe's base, data and method, loaded and applied (:func:`load`).

    ``base_path``: the resolved base dir / hub id; ``datasets``: :class:`peftcli.data.Datasets`;
    ``eval_examples``: the eval examples the run scores (``train.eval_max_samples`` of them);
    ``method``: the method module; ``targets``: the module names it wrapped; ``fingerprint``:
    :func:`peftcli.models.fingerprint` of the base before the method; ``trainable`` / ``total``:
    parameter counts (:func:`parameter_counts`); ``mixed``: the resolved mixed precision
    (``precision.autocast``); ``packing``: the packed train rows with ``data.packing``
    (:func:`peftcli.packing.pack`), else None; ``precision``: the base dtype and autocast chosen,
    and why (:func:`peftcli.precision.choose`).
    """

    recipe: Recipe
    base_path: str
    tokenizer: object = field(repr=False)
    datasets: data.Datasets = field(repr=False)
    eval_examples: list[dict] = field(repr=False)
    model: nn.Module = field(repr=False)
    method: object = field(repr=False)
    targets: list[str]
    fingerprint: str
    trainable: int
    total: int
    mixed: str
    packing: packing.Packing | None = None
    precision: Precision | None = None

    @property
    def train_units(self) -> int:
        """What a micro-batch counts, in the train set: packed rows with ``data.packing``, else examples."""
        return len(self.packing.rows) if self.packing else len(self.datasets.train)

    @property
    def base_params(self) -> int:
        """The frozen base's parameter count (the method's parameters are the trainable ones)."""
        return self.total - self.trainable


def linear_storage(model: nn.Module, chosen: Precision) -> Precision:
    """``chosen``, without its ``linear_dtype`` where a method module reads a base weight itself
    (DoRA's weight norm would then see bf16-rounded weights)."""
    if chosen.linear_dtype is not None and any(hasattr(m, "lora_magnitude_vector") for m in model.modules()):
        return dataclasses.replace(chosen, linear_dtype=None)
    return chosen


def store_linear_weights(prepared: Prepared) -> None:
    """The prepared model's frozen Linear weights in its ``precision.linear_dtype``, if any
    (:func:`peftcli.models.store_linear_weights`). Called once the loss path is chosen (its
    checks run on the float32 weights under autocast, the same matmuls); from then on the model
    runs under the run's autocast only."""
    if prepared.precision is not None and prepared.precision.linear_dtype:
        models.store_linear_weights(prepared.model, getattr(torch, prepared.precision.linear_dtype))


def load(recipe: Recipe, check_base: Callable[[nn.Module], object] | None = None, sharded: bool = False) -> Prepared:
    """Load what ``recipe`` names and apply its method, on the CPU (4/8-bit weights where
    bitsandbytes places them at load), the base in the dtype :func:`peftcli.precision.choose`
    picks for the device the run trains on.

    Args:
        check_base: called with the loaded base before the method is applied (``--resume``
            refuses a checkpoint of another base there).
        sharded: the model will be sharded (``train.distributed: fsdp``): a 4-bit base stores
            its packed bytes as bfloat16, which FSDP shards as it shards a float weight
            (bitsandbytes' ``quant_storage``; the quantisation state stays on each module).
    Raises:
        UserError: ``data.packing`` with a method that adds virtual tokens, a bad data file (both
            before the model loads), a base that cannot be loaded, a method that cannot apply to
            it, or what ``check_base`` raises; a bad ``PEFTCLI_CPU_BF16``.
    """
    m, t = recipe.model, recipe.train
    chosen = precision.choose(m.dtype, t.mixed_precision, quantization=m.quantization)
    method = methods.get(recipe.method.name)
    refusal = packing.refuse_method(recipe.method.name, method) if recipe.data.packing else None
    if refusal:
        raise UserError(refusal)
    base_path, tok = load_tokenizer(m)
    ds = data.build(recipe.data, tok, t.seed)
    packed = packing.pack(ds.train, recipe.data.max_seq_len) if recipe.data.packing else None
    model = models.load_model(base_path, m.quantization, chosen.dtype, m.double_quant, m.trust_remote_code,
                              quant_storage="bfloat16" if sharded else "uint8")
    tok = models.fit_tokenizer(tok, model)
    if check_base is not None:
        check_base(model)
    fingerprint = models.fingerprint(model)
    targets = method.apply(model, recipe.method, tokenizer=tok)  # writes the model's default target_modules into recipe.method
    chosen = linear_storage(model, chosen)
    trainable, total = parameter_counts(model)
    return Prepared(recipe=recipe, base_path=base_path, tokenizer=tok, datasets=ds,
                    eval_examples=ds.eval[: t.eval_max_samples] if t.eval_max_samples else ds.eval,
                    model=model, method=method, targets=targets, fingerprint=fingerprint,
                    trainable=trainable, total=total, mixed=chosen.autocast, packing=packed, precision=chosen)


def fit_micro_batch(recipe: Recipe, n_train: int, say: Callable[[str], None]) -> None:
    """A micro-batch larger than the train set holds the whole set: ``train.micro_batch_size``
    is lowered to ``n_train`` (train examples, or packed rows with ``data.packing``:
    :attr:`Prepared.train_units`) and ``say`` gets a note (the resolved recipe, recipe.yaml and
    summary.json then show the size used)."""
    t = recipe.train
    if 0 < n_train < t.micro_batch_size:
        what = "packed row" if recipe.data.packing else "train example"
        say(f"note: train.micro_batch_size {t.micro_batch_size} is more than the {n_train} {what}"
            f"{'s' * (n_train != 1)}; micro-batches hold {n_train}")
        t.micro_batch_size = n_train


def load_tokenizer(model_config: ModelConfig) -> tuple[str, object]:
    """The first step of every setup: (the resolved base dir / hub id, its tokenizer). The
    tokenizer is all reading the data needs, so the data is checked before any model loads.

    Raises:
        UserError: the base cannot be resolved, or has no tokenizer.
    """
    base_path = models.resolve(model_config.name_or_path)
    return base_path, models.load_tokenizer(base_path, model_config.trust_remote_code)


def choose_loss_path(model: nn.Module, recipe: Recipe, method, examples: list[dict], pad_id: int, mixed: str,
                     autocast=None, console=None, packed: packing.Packing | None = None) -> guard.LossPath:
    """The loss path this run trains and evaluates on, proven on its first micro-batch
    (:func:`peftcli.guard.choose_loss_path`): padding-free rows where the recipe
    (``data.padding_free``), the method and the model allow them, else right-padded rows.
    Runs on the model's device: place the model first.

    Args:
        examples: the tokenized train examples; mixed: the resolved mixed precision.
        autocast: the run's autocast context factory (default: torch.autocast for ``mixed`` on
            the model's device, or none).
        console: where the note that padding-free rows are off goes (a rich Console; None: nowhere).
        packed: the packed rows of ``examples`` (``data.packing``): the check runs on the first
            packed micro-batch, and packing needs the padding-free path to agree.
    Raises:
        UserError: from :func:`peftcli.guard.choose_loss_path` (the method is off the forward's way);
            ``data.packing`` on a model that attends across examples in a padding-free row, or whose
            padding-free path differs from its own forward (the guard's difference in the message).
    """
    dtype = AUTOCAST_DTYPES.get(mixed)
    if autocast is None:
        device = model_device(model).type
        autocast = (lambda: torch.autocast(device, dtype=dtype)) if dtype else nullcontext
    # preference pairs train on right-padded rows (peftcli.preference); the check runs on their chosen halves
    padding_free = recipe.data.padding_free and method.PADDING_FREE and recipe.train.objective == "sft"
    if padding_free and not prepare_padding_free(model):
        if packed is not None:
            raise UserError(f"data.packing: {type(model).__name__} attends across examples in a padding-free row, so packed "
                            "examples would see each other; set data.packing: false")
        if console is not None:
            console.print("note: this model class attends across examples in a padding-free row; using padded rows")
        padding_free = False
    t = recipe.train
    first = (packing.micro_batches(packed.rows, t.micro_batch_size, t.seed, 0) if packed is not None
             else data.batches(examples, t.micro_batch_size, t.seed, 0))[0]
    path = guard.choose_loss_path(model, [examples[i] for i in first], pad_id, padding_free, autocast, dtype)
    if packed is not None and not path.padding_free:
        fast = next((c for c in path.tried if c["path"] == "fast"), None)
        differ = f"differ from {type(model).__name__}'s own forward by {guard.format_diff(fast)}" if fast else "are off"
        raise UserError(f"data.packing: padding-free rows {differ} (tolerance {path.tolerance[0]:.0e}·max(1, loss) nats, "
                        f"{path.tolerance[1]:.0e} relative), so packed rows would not train like unpacked ones; "
                        f"set data.packing: false (it then trains on the {path.name} path)")
    return path


def loss_path(prepared: Prepared, autocast=None, console=None) -> guard.LossPath:
    """:func:`choose_loss_path` for a prepared run (its model, recipe, method, train examples, pad
    id and mixed precision). Place the model where it will run first."""
    p = prepared
    return choose_loss_path(p.model, p.recipe, p.method, p.datasets.train, p.tokenizer.pad_token_id, p.mixed,
                            autocast, console, p.packing)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count 2 values per byte (whatever
    dtype the bytes are stored as)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 * p.element_size() if hasattr(p, "quant_state") else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def enable_gradient_checkpointing(model: nn.Module, reentrant: bool = False) -> None:
    """Recompute block activations in the backward pass (transformers' activation checkpointing).

    With a frozen base, no input of a checkpointed block requires grad, and reentrant
    checkpointing would then drop the adapter's gradients silently (CASES C6); making the input
    embeddings' output require grad keeps them, for either flavour and whether the method was
    applied before or after this call. (Recent transformers do this themselves for the reentrant
    flavour; doing it here too keeps the guarantee independent of the version.)
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
