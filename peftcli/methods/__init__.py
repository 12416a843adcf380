"""The method library: one module per method, registered by its recipe name.

Every method module exposes the same small surface:

- ``Config``: pydantic schema of its recipe keys (``name`` is the discriminator);
- ``PEFT_TYPE``, ``PAPER``, ``SUMMARY``, ``CAN_MERGE``, ``PADDING_FREE`` (works on padding-free rows);
- ``apply(model, cfg) -> list[str]``: freeze the base, inject trainable parts, return what it wrapped;
- ``state_dict(model)`` / ``load_state_dict(model, sd)``: trainable weights in HF peft key naming;
- ``adapter_config(cfg) -> dict`` and ``config_from_adapter(dict) -> Config``: adapter_config.json;
- ``merge(model) -> model`` where ``CAN_MERGE``; else ``CANNOT_MERGE_BECAUSE`` says why;
- optional ``file_fields(model) -> dict``: adapter_config.json fields that depend on what ``apply``
  wrapped (LoRA: the explicit ``target_modules`` / ``target_parameters``), written over the
  ``adapter_config`` ones when saving.
"""

from types import ModuleType

from peftcli.methods import adapter, ia3, lora, p_tuning, prefix_tuning, prompt_tuning, qlora

METHODS: dict[str, ModuleType] = {
    "lora": lora,
    "qlora": qlora,
    "adapter": adapter,
    "ia3": ia3,
    "prefix_tuning": prefix_tuning,
    "prompt_tuning": prompt_tuning,
    "p_tuning": p_tuning,
}
METHOD_CONFIGS = {name: module.Config for name, module in METHODS.items()}


def get(name: str) -> ModuleType:
    """The method module registered as ``name``.

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
