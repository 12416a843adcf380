"""``peft export RUN --gguf OUT.gguf``: the merged model as one GGUF file, read back by transformers'
GGUF reader (the reference: it undoes llama.cpp's layout on its own, ``LlamaTensorProcessor``)."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch
from helpers import logits, method_recipe, peft_in_process, perturb, saved_adapter
from tiny import CHATML, save_tiny, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer
from zoo import save_family, tiny_config

from peftcli import export, merge, models
from peftcli.errors import UserError

IDS = torch.tensor([[1, 17, 42, 99, 7, 250, 3], [1, 5, 6, 200, 201, 2, 8]])
SAMPLE = "Below is an instruction: sort the letters of 'fox', then add 12 + 7 = ? <|im_end|>"
# max |Δlogit| / max |logit| of the file read back against the merged model (float32), per dtype:
# f32 is the same numbers (only float32 summation order may differ); f16 rounds each weight to a
# relative 2^-11; q8_0 to half a step of max|block| / 127 (measured on the tiny Llama: f32 0,
# f16 4.9e-4, q8_0 2.1e-2; the bounds leave room)
TOLERANCE = {"f32": 1e-5, "f16": 1e-2, "q8_0": 5e-2}


def lora_run(base_dir: Path, run_dir: Path, **keys) -> Path:
    """A LoRA adapter (default: on every linear layer) of the base at ``base_dir``, B random (as if
    trained), saved as ``run_dir/adapter``."""
    recipe = method_recipe("lora", base_dir, r=4, alpha=8, **{"target_modules": "all-linear", **keys})
    saved_adapter(recipe, run_dir / "adapter", lambda model: perturb(model, ["lora_B"]))
    return run_dir


def export_to(run: Path, out: Path, dtype: str) -> Path:
    return export.export_gguf(run, out, dtype, log=lambda line: None)


def read_back(path: Path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def relative_diff(model, reference: torch.Tensor) -> float:
    return ((logits(model, IDS) - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(scope="module")
def llama(tiny_dir, tmp_path_factory):
    """(run dir, the merged model in float32, its exported files by dtype)."""
    root = tmp_path_factory.mktemp("export")
    run = lora_run(tiny_dir, root / "run")
    merged = merge.merge_in_memory(run, "float32").model
    files = {dtype: export_to(run, root / f"model-{dtype}.gguf", dtype) for dtype in export.GGUF_DTYPES}
    return run, merged, files


# ---------------------------------------------------------------------------------------------
# the weights and logits, per dtype


@pytest.mark.parametrize("dtype", export.GGUF_DTYPES)
def test_logits_of_the_file_read_back_match_the_merged_model(llama, tiny_dir, dtype):
    _, merged, files = llama
    reference = logits(merged, IDS)
    base = logits(AutoModelForCausalLM.from_pretrained(tiny_dir), IDS)
    assert (reference - base).abs().max() > 1e-2  # the adapter changes the model: the merge is in the file
    assert relative_diff(read_back(files[dtype]), reference) <= TOLERANCE[dtype]


def test_f32_weights_come_back_bit_for_bit(llama):
    _, merged, files = llama
    back = read_back(files["f32"]).state_dict()
    for name, weight in merged.state_dict().items():
        assert torch.equal(back[name], weight), name  # Q/K permuted and un-permuted: the identity


def test_f16_rounds_each_matrix_once_and_keeps_norms_f32(llama):
    _, merged, files = llama
    back = read_back(files["f16"]).state_dict()
    for name, weight in merged.state_dict().items():
        expected = weight if weight.ndim == 1 else weight.half().float()  # hand computation: one rounding
        assert torch.equal(back[name], expected), name


def test_q8_0_error_is_within_half_a_step_of_each_block(llama):
    _, merged, files = llama
    back = read_back(files["q8_0"]).state_dict()
    for name, weight in merged.state_dict().items():
        if weight.ndim == 1:
            assert torch.equal(back[name], weight), name  # norms stay f32
            continue
        blocks = weight.reshape(-1, 32)
        step = blocks.abs().amax(dim=1, keepdim=True) / 127  # Q8_0: x ≈ d·q, d = max|x| / 127 (stored f16)
        error = (back[name].reshape(-1, 32) - blocks).abs()
        assert (error <= 0.6 * step + 1e-8).all(), name  # half a step, plus d's own f16 rounding (127·2^-11 steps)
        assert error.max() > 0  # really quantised


def test_file_layout_names_types_and_hyperparameters(llama):
    _, merged, files = llama
    for dtype, path in files.items():
        reader = gguf.GGUFReader(path)
        tensors = {t.name: t for t in reader.tensors}
        assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.attn_q.weight",
                "blk.1.attn_k.weight", "blk.1.attn_v.weight", "blk.1.attn_output.weight", "blk.1.ffn_gate.weight",
                "blk.1.ffn_up.weight", "blk.1.ffn_down.weight", "blk.1.attn_norm.weight",
                "blk.1.ffn_norm.weight"} == {n for n in tensors if not n.startswith("blk.0.")}
        matrix = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[dtype]
        assert tensors["blk.0.ffn_down.weight"].tensor_type.name == matrix
        assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
        config = merged.config

        def field(key, reader=reader):
            return reader.fields[key].contents()

        assert field("general.architecture") == "llama"
        assert field("llama.attention.head_count") == 4 and field("llama.attention.head_count_kv") == 2
        assert field("llama.block_count") == 2 and field("llama.context_length") == 256
        assert field("llama.embedding_length") == 64 and field("llama.feed_forward_length") == 128
        assert field("llama.rope.dimension_count") == 16
        assert field("llama.rope.freq_base") == pytest.approx(config.rope_parameters["rope_theta"])
        assert field("llama.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)


def test_q_and_k_rows_are_in_llama_cpp_rotary_order(llama):
    _, merged, files = llama
    tensors = {t.name: t for t in gguf.GGUFReader(files["f32"]).tensors}
    attn = merged.model.layers[0].self_attn
    for name, hf, n_head in [("attn_q", attn.q_proj.weight, 4), ("attn_k", attn.k_proj.weight, 2)]:
        stored = torch.from_numpy(tensors[f"blk.0.{name}.weight"].data.copy())
        d = hf.shape[0] // n_head
        for h in range(n_head):  # hand computation: llama.cpp pairs (2i, 2i+1) what HF splits as (i, i + d/2)
            for i in range(d // 2):
                for j in range(2):
                    assert torch.equal(stored[h * d + 2 * i + j], hf[h * d + j * (d // 2) + i])


# ---------------------------------------------------------------------------------------------
# the tokenizer and chat template


def test_tokenizer_read_back_encodes_the_same_ids(llama, tiny_dir):
    _, _, files = llama
    ours = models.load_tokenizer(str(tiny_dir))
    for path in files.values():
        back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        assert back(SAMPLE)["input_ids"] == ours(SAMPLE)["input_ids"]
        assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (ours.bos_token_id, ours.eos_token_id,
                                                                             ours.pad_token_id)
        assert back.chat_template == CHATML
        chat = [{"role": "user", "content": "sort 3, 1"}]
        assert back.apply_chat_template(chat, add_generation_prompt=True) == \
            ours.apply_chat_template(chat, add_generation_prompt=True)


def test_end_of_turn_and_token_types(llama):
    _, _, files = llama
    reader = gguf.GGUFReader(files["f16"])
    tok = tiny_tokenizer()
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert reader.fields["tokenizer.ggml.eot_token_id"].contents() == im_end
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert types[im_end] == gguf.TokenType.CONTROL
    assert {types[i] for i in tok("the quick brown fox")["input_ids"]} == {gguf.TokenType.NORMAL}
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt2"


def test_the_embedded_models_own_pipeline_reads_the_export(llama, tmp_path):
    """models.convert_gguf, the path the embedded SmolLM2 arrives by, converts our file too."""
    _, merged, files = llama
    out = models.convert_gguf(files["f32"], tmp_path / "converted")
    assert relative_diff(AutoModelForCausalLM.from_pretrained(out), logits(merged, IDS)) <= TOLERANCE["f32"]


# ---------------------------------------------------------------------------------------------
# other Llama-style families and a tied head


def save_variant(path: Path, family: str, **overrides) -> Path:
    """A tiny random ``family`` base (zoo config + ``overrides``) with random biases where it has them."""
    tok = tiny_tokenizer()
    config = tiny_config(family, tok)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    perturb(model, [".bias"], seed=3)  # Qwen2's q/k/v biases start at zero, which would hide a lost one
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("family, overrides, arch", [
    ("qwen2", {"tie_word_embeddings": True}, "qwen2"),
    ("mistral", {"sliding_window": None}, "llama"),
])
def test_other_llama_style_families_round_trip(tmp_path, family, overrides, arch):
    run = lora_run(save_variant(tmp_path / "base", family, **overrides), tmp_path / "run")
    merged = merge.merge_in_memory(run, "float32").model
    path = export_to(run, tmp_path / "m.gguf", "f32")
    assert gguf.GGUFReader(path).fields["general.architecture"].contents() == arch
    assert relative_diff(read_back(path), logits(merged, IDS)) <= TOLERANCE["f32"]


def test_a_tied_head_is_not_written_and_reloads_tied(tmp_path):
    run = lora_run(save_tiny(tmp_path / "tied", tie_word_embeddings=True), tmp_path / "run", target_modules=["q_proj"])
    path = export_to(run, tmp_path / "m.gguf", "f32")
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(path).tensors}
    back = read_back(path)
    assert back.config.tie_word_embeddings
    assert relative_diff(back, logits(merge.merge_in_memory(run, "float32").model, IDS)) <= TOLERANCE["f32"]


def test_a_4bit_base_is_dequantised_then_written(tiny_dir, tmp_path):
    """QLoRA: the file holds dequant(W_nf4) + scale·B·A (as peft merge), said in the summary line."""
    run = tmp_path / "run"
    recipe = method_recipe("qlora", tiny_dir, quantization="nf4", r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    saved_adapter(recipe, run / "adapter", lambda model: perturb(model, ["lora_B"]))
    lines = []
    path = export.export_gguf(run, tmp_path / "m.gguf", "f32", log=lines.append)
    assert "the nf4 base was dequantised, not re-quantised" in lines[0]
    assert relative_diff(read_back(path), logits(merge.merge_in_memory(run, "float32").model, IDS)) <= TOLERANCE["f32"]


# ---------------------------------------------------------------------------------------------
# refusals: one line, exit 2, before the load


@pytest.mark.parametrize("config, what", [
    (dict(model_type="mistral", sliding_window=64), "sliding attention window of 64"),
    (dict(model_type="llama", attention_bias=True), "attention or MLP biases"),
    (dict(model_type="llama", rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 64}), "rope type llama3"),
    (dict(model_type="qwen2", use_sliding_window=True, sliding_window=64), "use_sliding_window"),
])
def test_variants_the_file_cannot_describe_are_refused(config, what):
    from transformers import AutoConfig

    model_type = config.pop("model_type")
    with pytest.raises(UserError, match=what):
        export.gguf_architecture(AutoConfig.for_model(model_type, **tiny_config_kwargs(), **config))


def tiny_config_kwargs() -> dict:
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256)


def test_a_sentencepiece_tokenizer_is_refused():
    from tokenizers import Tokenizer
    from tokenizers import models as tk_models
    from transformers import PreTrainedTokenizerFast

    spm = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tk_models.BPE(vocab={"<unk>": 0, "a": 1}, merges=[],
                                                                            byte_fallback=True, unk_token="<unk>")))
    with pytest.raises(UserError, match="SentencePiece-style BPE"):
        export.gguf_vocab(spm, 2)


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture
def no_load(monkeypatch):
    """A refusal must come before the merge loads the base."""
    def fail(*args, **kwargs):
        raise AssertionError("the base was loaded before the refusal")
    monkeypatch.setattr(export, "merge_in_memory", fail)


def test_unsupported_family_is_one_line_before_loading(tmp_path, capsys, no_load):
    run = tmp_path / "run"
    base = save_family(tmp_path / "gpt2", "gpt2")
    saved_adapter(method_recipe("lora", base, r=4, alpha=8, target_modules=["c_attn"]), run / "adapter")
    code, err = peft_in_process(["export", run, "--gguf", tmp_path / "m.gguf"], capsys)
    one_line_error(code, err, "the gpt2 family is not exported", "supported: llama, mistral, qwen2")
    assert not (tmp_path / "m.gguf").exists()


def test_a_method_that_cannot_merge_is_refused(tiny_dir, tmp_path, capsys, no_load):
    saved_adapter(method_recipe("prompt_tuning", tiny_dir, num_virtual_tokens=2), tmp_path / "run" / "adapter")
    code, err = peft_in_process(["export", tmp_path / "run", "--gguf", tmp_path / "m.gguf"], capsys)
    one_line_error(code, err, "method prompt_tuning cannot be merged")


def test_missing_run_bad_dtype_and_a_dir_as_output(llama, tmp_path, capsys, no_load):
    run, _, _ = llama
    code, err = peft_in_process(["export", tmp_path / "nope", "--gguf", tmp_path / "m.gguf"], capsys)
    one_line_error(code, err, "no such run dir")
    code, err = peft_in_process(["export", run, "--gguf", tmp_path / "m.gguf", "--dtype", "q4_0"], capsys)
    one_line_error(code, err, "--dtype q4_0", "f16, f32, q8_0")
    code, err = peft_in_process(["export", run, "--gguf", tmp_path], capsys)
    one_line_error(code, err, "is a directory")
    code, err = peft_in_process(["export", run], capsys)
    one_line_error(code, err, "--gguf")


def test_an_existing_file_is_replaced_only_with_overwrite(llama, tmp_path, capsys, monkeypatch):
    run, _, files = llama
    out = tmp_path / "mine.gguf"
    out.write_bytes(b"my own file")
    with monkeypatch.context() as patch:
        patch.setattr(export, "merge_in_memory", lambda *a, **k: pytest.fail("loaded before refusing"))
        code, err = peft_in_process(["export", run, "--gguf", out], capsys)
    one_line_error(code, err, "exists; pass --overwrite")
    assert out.read_bytes() == b"my own file"

    code, err = peft_in_process(["export", run, "--gguf", out, "--overwrite", "--dtype", "f32"], capsys)
    assert code == 0, err
    assert out.read_bytes() == files["f32"].read_bytes()  # the same export, byte for byte
    assert [p.name for p in tmp_path.iterdir()] == ["mine.gguf"]  # no temporary left beside it


# ---------------------------------------------------------------------------------------------
# the embedded model


@pytest.mark.slow
def test_embedded_smollm2_with_a_lora_exports_and_reads_back(tmp_path):
    run = tmp_path / "run"
    recipe = method_recipe("lora", "smollm2-135m", r=8, alpha=16, target_modules="all-linear")
    saved_adapter(recipe, run / "adapter", lambda model: perturb(model, ["lora_B"], scale=0.01))
    merged = merge.merge_in_memory(run, "float32")
    ids = torch.tensor([merged.tokenizer(SAMPLE)["input_ids"]])
    reference = logits(merged.model, ids)
    path = export.export_gguf(run, tmp_path / "smollm2.gguf", "f16", log=lambda line: None)
    with models.gguf_read_once():  # the 49k-token vocab parsed once, not per reader (as convert_gguf does)
        back = read_back(path)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    diff = ((logits(back, ids) - reference).abs().max() / reference.abs().max()).item()
    assert diff <= TOLERANCE["f16"], diff
    assert tok(SAMPLE)["input_ids"] == merged.tokenizer(SAMPLE)["input_ids"]
    assert tok.chat_template == merged.tokenizer.chat_template
