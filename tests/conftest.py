import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite tokenises afresh (a user's token cache under ~/.cache/peftcli could hide a change of
# the masking); tests/test_token_cache.py turns the cache on in a temporary peft home.
os.environ.setdefault("PEFTCLI_TOKEN_CACHE", "0")
# The suite's references are CPU float32 (bit-identical resume, 1e-5 parities), and its tests build
# CPU inputs: it runs on the CPU even where a GPU is visible. The GPU paths are checked by
# bench/gpu_check.py on a CUDA machine.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama + tokenizer (pad = EOS) saved as a transformers dir."""
    from tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tok():
    """tiny's byte-level BPE tokenizer (pad = EOS, like SmolLM2), one per test module."""
    from tiny import tiny_tokenizer

    return tiny_tokenizer(pad="eos")
