"""The method library: one module per method, registered by its recipe name.

Every method module exposes the same small surface:

- ``Config``: pydantic schema of its recipe keys (``name`` is the discriminator);
- ``PEFT_TYPE``, ``PAPER``, ``SUMMARY``, ``CAN_MERGE``, ``PADDING_FREE`` (works on padding-free rows);
- ``apply(model, cfg) -> list[str]``: freeze the base, inject trainable parts, return what it wrapped;
- ``state_dict(model)`` / ``load_state_dict(model, sd)``: trainable weights in HF peft key naming;
- ``adapter_config(cfg) -> dict`` and ``config_from_adapter(dict) -> Config``: adapter_config.json;
- ``merge(model) -> model`` where ``CAN_MERGE``; else ``CANNOT_MERGE_BECAUSE`` says why.
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
