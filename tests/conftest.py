import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama + tokenizer (pad = EOS) saved as a transformers dir."""
    from tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")
