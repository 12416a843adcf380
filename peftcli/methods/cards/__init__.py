"""The methods' cards: for each method, a torch-free module with its recipe keys (``Config``,
pydantic), its description (``PEFT_TYPE``, ``PAPER``, ``SUMMARY``, ``PADDING_FREE``,
``CANNOT_MERGE``) and ``base_quantization``: what the recipe schema and ``peft methods`` need,
so they load in milliseconds, without torch. ``peftcli.methods.cards.<name>`` is the card of the
method module ``peftcli.methods.<name>``, which re-exports every name of it
(:func:`peftcli.methods.check` makes sure).
"""

from __future__ import annotations


def any_quantization(quantization: str) -> str:
    """``base_quantization`` of a method that trains on a base loaded as the recipe says:
    ``quantization`` unchanged."""
    return quantization
