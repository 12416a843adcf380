"""peftcli: parameter-efficient fine-tuning of causal language models from YAML recipes."""

__version__ = "0.1.0"
