"""CASES C17-C19: special tokens from one source (peftcli.tokens.special_tokens), for several kinds
of chat tokenizer built here, not one instance."""

import json

import pytest
import torch
import yaml
from helpers import write_jsonl, write_recipe
from test_cli_errors import _one_line_error
from tiny import save_tiny, tiny_llama, tiny_tokenizer
from transformers import GenerationConfig
from typer.testing import CliRunner

from peftcli import data, evaluate, tokens
from peftcli.cli import app
from peftcli.errors import UserError
from peftcli.recipe import validate

CUSTOM = ("{% for m in messages %}{{ '<turn>' + m['role'] + ': ' + m['content'] + '</turn>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<turn>assistant: ' }}{% endif %}")
# kind: (extra special tokens, data.chat_template (None: tiny's own ChatML), end-of-turn token)
KINDS = {
    "chatml": ((), None, "<|im_end|>"),
    "gemma": (("<start_of_turn>", "<end_of_turn>"), "gemma", "<end_of_turn>"),
    "llama3": (("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "llama3", "<|eot_id|>"),
    "phi3": (("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), "phi3", "<|end|>"),
    "mistral": ((), "mistral", "</s>"),  # the turn ends with the EOS itself
    "custom": (("<turn>", "</turn>"), CUSTOM, "</turn>"),  # a marker no name list knows
}
RENDERS_BOS = ["gemma", "llama3", "mistral"]
CHAT = {"messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hello world"},
                     {"role": "user", "content": "Count."}, {"role": "assistant", "content": "0123"}]}
ROWS = {"alpaca": {"instruction": "Say hi.", "input": "", "output": "hello world"},
        "completion": {"prompt": "Say hi:", "completion": " hello world"},
        "text": {"text": "hello world"},
        "chat": CHAT}


def chat_tokenizer(kind: str, add_bos: bool = False, add_eos: bool = False):
    """tiny's byte-level BPE with the kind's special tokens and chat template."""
    extra, template, _ = KINDS[kind]
    tok = tokens.use_chat_template(tiny_tokenizer(extra_specials=extra), template)
    tok.add_bos_token, tok.add_eos_token = add_bos, add_eos
    return tok


def eot_id(kind: str, tok) -> int:
    return tok.convert_tokens_to_ids(KINDS[kind][2])


def supervised_runs(example: dict) -> list[list[int]]:
    """The maximal runs of supervised label ids."""
    runs, current = [], []
    for label in example["labels"] + [data.IGNORE_INDEX]:
        if label != data.IGNORE_INDEX:
            current.append(label)
        elif current:
            runs, current = runs + [current], []
    return runs


def drop_chat_template(model_dir):
    """Remove the chat template from a saved tokenizer dir (a model with none); returns the dir."""
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    return model_dir


def generate_calls(model, monkeypatch) -> list[dict]:
    """Record the keyword arguments of every ``model.generate`` call (the call still runs)."""
    calls, real = [], model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(kw) or real(**kw))
    return calls


def unpadded(call: dict) -> list[int]:
    """The first prompt of a recorded generate call, left padding removed."""
    return call["input_ids"][0][call["attention_mask"][0].bool()].tolist()


# ---------------------------------------------------------------------------------------------
# C17 end-of-turn is not EOS


@pytest.mark.parametrize("kind", KINDS)
def test_C17_end_of_turn_is_read_from_the_rendered_template(kind):
    tok = chat_tokenizer(kind)
    eot = eot_id(kind, tok)
    special = tokens.special_tokens(tok, GenerationConfig(eos_token_id=[tok.eos_token_id, 7]))
    assert special.end_of_turn_id == eot and special.eos_id == tok.eos_token_id
    assert special.stop_ids == tuple(dict.fromkeys([tok.eos_token_id, eot, 7]))  # EOS, end-of-turn, config's
    assert (KINDS[kind][2] in tokens.KNOWN_END_OF_TURN) == (kind not in ("mistral", "custom"))


@pytest.mark.parametrize("kind", KINDS)
def test_C17_chat_labels_end_with_the_end_of_turn_token(kind):
    tok = chat_tokenizer(kind)
    example = data.tokenize_row(CHAT, "chat", tok, 512, False)
    # the ids are the template's own tokenisation
    assert example["input_ids"] == tok.apply_chat_template(CHAT["messages"], tokenize=True)["input_ids"]
    runs = supervised_runs(example)
    assert len(runs) == 2  # the two assistant replies, nothing else
    for run, answer in zip(runs, ["hello world", "0123"]):
        assert run[-1] == eot_id(kind, tok)
        assert tok.decode(run[:-1]).strip() == answer


def test_C17_template_without_an_end_of_turn_token_learns_an_eos():
    # turns that end in plain text: an EOS after each reply, so the model still learns to stop
    tok = tokens.use_chat_template(tiny_tokenizer(), "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}"
                                                     "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    assert tokens.special_tokens(tok).end_of_turn_id is None
    runs = supervised_runs(data.tokenize_row(CHAT, "chat", tok, 512, False))
    assert [tok.decode(r[:-1]).strip() for r in runs] == ["hello world", "0123"]
    assert all(r[-1] == tok.eos_token_id for r in runs)


@pytest.mark.parametrize("kind", KINDS)
def test_C17_generate_and_exact_match_stop_at_every_stop_id(kind, monkeypatch):
    tok = chat_tokenizer(kind)
    model = tiny_llama(tok)
    calls = generate_calls(model, monkeypatch)
    evaluate.generate(model, tok, [data.prompt_ids(CHAT, "chat", tok)], 3)
    evaluate.exact_match(model, tok, [CHAT], "chat")
    stops = {tok.eos_token_id, eot_id(kind, tok), *tokens.special_tokens(tok, model.generation_config).stop_ids}
    assert len(calls) == 2 and all(set(c["eos_token_id"]) == stops for c in calls)


def test_C17_decoded_answer_is_cut_at_the_first_stop_id():
    tok = chat_tokenizer("gemma")
    eot = eot_id("gemma", tok)
    hello = tok("hello", add_special_tokens=False).input_ids
    assert evaluate._until_stop(hello + [eot] + hello, (tok.eos_token_id, eot)) == hello


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A tiny Llama whose tokenizer has the ChatML tokens but no chat template, chat-tuned with
    data.chat_template: chatml and a system prompt through `peft train` on one short example."""
    tmp = tmp_path_factory.mktemp("chat_run")
    model_dir = drop_chat_template(save_tiny(tmp / "model"))
    rows = write_jsonl(tmp / "chat.jsonl", [{"messages": CHAT["messages"][1:3]}])
    source = {"path": str(rows), "format": "chat"}
    recipe = {"model": {"name_or_path": str(model_dir), "dtype": "float32"},
              "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0,
                         "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj", "lm_head"]},
              "data": {"train": source, "eval": source, "chat_template": "chatml", "system_prompt": "Be brief.",
                       "pad_to_multiple_of": 1},
              "train": {"max_steps": 30, "micro_batch_size": 1, "lr": 1e-2, "scheduler": "constant", "log_every": 10,
                        "eval_every": 0, "save_every": 0, "mixed_precision": "no"},
              "output": {"dir": str(tmp / "run")}}
    result = CliRunner().invoke(app, ["train", str(write_recipe(tmp / "recipe.yaml", recipe))])
    assert result.exit_code == 0, result.output
    return tmp


def test_C17_chat_tuned_run_stops_at_end_of_turn_in_generate_eval_and_merge(chat_run, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftcli import artifacts

    run = chat_run / "run"
    recorded = yaml.safe_load((run / "recipe.yaml").read_text())["data"]
    assert recorded["chat_template"] == "chatml" and recorded["system_prompt"] == "Be brief."

    # peft generate: the recorded template and system prompt, stopped at <|im_end|>
    result = CliRunner().invoke(app, ["generate", str(run), "Say hi.", "--max-new-tokens", "20"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "hello world"
    # the case is real: stopping at EOS alone runs on past the end-of-turn token
    loaded = artifacts.load_adapted(run)
    model, tok = loaded.model, loaded.tokenizer
    data.use_recipe_chat(tok, loaded.recipe)  # the recorded chatml template
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    prompt = data.prompt_ids(data.add_system_prompt([{"messages": CHAT["messages"][1:3]}], "chat", "Be brief.")[0],
                             "chat", tok)
    assert prompt == tok.apply_chat_template([{"role": "system", "content": "Be brief."}, CHAT["messages"][1]],
                                             add_generation_prompt=True, tokenize=True)["input_ids"]
    out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, len(prompt):].tolist()
    assert eot in out and len(out) > out.index(eot) + 1

    # peft eval: exact match 1.0 on the row it learned
    result = CliRunner().invoke(app, ["eval", str(run), "--json", "--no-base"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["adapted"]["exact_match"] == 1.0

    # peft merge: generation_config lists every stop id, the tokenizer carries the template, and
    # a plain transformers generate on the merged dir stops at the end of the turn
    merged = chat_run / "merged"
    result = CliRunner().invoke(app, ["merge", str(run), "-o", str(merged)])
    assert result.exit_code == 0, result.output
    config = GenerationConfig.from_pretrained(merged)
    assert set(config.eos_token_id) == {tok.eos_token_id, eot}
    merged_tok = AutoTokenizer.from_pretrained(merged)
    assert merged_tok.chat_template == tokens.CHAT_TEMPLATES["chatml"]
    merged_model = AutoModelForCausalLM.from_pretrained(merged).eval()
    new = merged_model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt):]
    assert new[-1].item() == eot and merged_tok.decode(new[:-1]) == "hello world"


# ---------------------------------------------------------------------------------------------
# C18 BOS and EOS exactly once


@pytest.mark.parametrize("kind", RENDERS_BOS)
def test_C18_one_bos_in_training_ids_and_generate_prompts(kind, monkeypatch):
    tok = chat_tokenizer(kind, add_bos=True)
    bos = tok.bos_token_id
    assert tok("hello").input_ids[0] == bos  # the tokenizer adds a BOS ...
    assert tok.apply_chat_template(CHAT["messages"], tokenize=False).startswith(tok.bos_token)  # ... so does the template
    ids = data.tokenize_row(CHAT, "chat", tok, 512, False)["input_ids"]
    assert ids.count(bos) == 1 and ids == tok.apply_chat_template(CHAT["messages"], tokenize=True)["input_ids"]
    prompt = data.prompt_ids(CHAT, "chat", tok)
    assert prompt == tok.apply_chat_template(CHAT["messages"][:-1], add_generation_prompt=True, tokenize=True)["input_ids"]
    assert prompt.count(bos) == 1
    # what reaches model.generate, through exact match and through a rendered text prompt
    model = tiny_llama(tok)
    calls = generate_calls(model, monkeypatch)
    evaluate.exact_match(model, tok, [CHAT], "chat")
    evaluate.generate(model, tok, [data.render_prompt(CHAT, "chat", tok)], 2)
    assert [unpadded(c) for c in calls] == [prompt, prompt]


@pytest.mark.parametrize("fmt", ["alpaca", "completion", "text"])
def test_C18_one_bos_in_every_format(fmt, monkeypatch):
    tok = chat_tokenizer("chatml", add_bos=True)
    bos = tok.bos_token_id
    example = data.tokenize_row(ROWS[fmt], fmt, tok, 512, False)
    assert example["input_ids"][0] == bos and example["input_ids"].count(bos) == 1
    if fmt != "text":
        prompt = data.prompt_ids(ROWS[fmt], fmt, tok)
        assert example["input_ids"][: len(prompt)] == prompt and prompt.count(bos) == 1
        model = tiny_llama(tok)
        calls = generate_calls(model, monkeypatch)
        evaluate.exact_match(model, tok, [ROWS[fmt]], fmt)
        assert unpadded(calls[0]) == prompt


@pytest.mark.parametrize("fmt", ["alpaca", "completion", "text", "chat"])
def test_C18_eos_appending_tokenizer_gives_one_eos_at_the_end_of_the_answer(fmt):
    tok = chat_tokenizer("chatml", add_bos=True, add_eos=True)
    eos = tok.eos_token_id
    assert tok("hello").input_ids[-1] == eos  # the tokenizer appends an EOS to every text
    example = data.tokenize_row(ROWS[fmt], fmt, tok, 512, False)
    ids, labels = example["input_ids"], example["labels"]
    if fmt == "chat":  # the template ends each turn with <|im_end|>, and no EOS is added
        assert ids == tok.apply_chat_template(CHAT["messages"], tokenize=True)["input_ids"] and eos not in ids
    else:
        assert ids.count(eos) == 1 and ids[-1] == eos and labels[-1] == eos
    if fmt != "text":
        assert eos not in data.prompt_ids(ROWS[fmt], fmt, tok)  # none between prompt and answer


def test_C18_eos_appending_tokenizer_with_a_template_that_ends_turns_with_eos():
    tok = chat_tokenizer("mistral", add_bos=True, add_eos=True)
    ids = data.tokenize_row(CHAT, "chat", tok, 512, False)["input_ids"]
    assert ids == tok.apply_chat_template(CHAT["messages"], tokenize=True)["input_ids"]
    assert ids.count(tok.eos_token_id) == 2 and ids[-1] == tok.eos_token_id  # one per reply, the template's own
    prompt = data.prompt_ids(CHAT, "chat", tok)  # up to the last reply: the first reply's EOS only
    assert prompt == tok.apply_chat_template(CHAT["messages"][:-1], add_generation_prompt=True, tokenize=True)["input_ids"]
    assert prompt.count(tok.eos_token_id) == 1


# ---------------------------------------------------------------------------------------------
# C19 chat data the template cannot render

REJECTS_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                  "{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
BAD_TEMPLATES = {"no template": None, "rejects the system role": REJECTS_SYSTEM}


def _chat_recipe(tmp_path, model_dir, **data_keys) -> dict:
    rows = write_jsonl(tmp_path / "chat.jsonl", [CHAT])
    return {"model": {"name_or_path": str(model_dir), "dtype": "float32"}, "method": {"name": "lora", "r": 4, "alpha": 8},
            "data": {"train": {"path": str(rows), "format": "chat"}, **data_keys},
            "train": {"max_steps": 1, "mixed_precision": "no"}, "output": {"dir": str(tmp_path / "run")}}


@pytest.mark.parametrize("case", BAD_TEMPLATES)
def test_C19_chat_the_template_cannot_render_is_one_line_naming_data_chat_template(case, tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = BAD_TEMPLATES[case]
    model_dir = drop_chat_template(save_tiny(tmp_path / "model"))
    tok.save_pretrained(model_dir)  # the model's tokenizer has the bad template (or none)
    recipe = validate(_chat_recipe(tmp_path, "unused"))
    with pytest.raises(UserError) as err:
        data.build(recipe.data, tok, 0)
    message = str(err.value)
    assert "data.chat_template" in message and "\n" not in message and "(row 1)" in message
    assert ("System role not supported" in message) == (case != "no template")
    # the fix the message names works
    recipe.data.chat_template = "chatml"
    assert data.build(recipe.data, tok, 0).train_stats.kept == 1

    # through the CLI: exit 2, one line, no traceback
    path = write_recipe(tmp_path / "recipe.yaml", _chat_recipe(tmp_path, model_dir))
    _one_line_error(CliRunner().invoke(app, ["train", str(path)]), "data.chat_template", "(row 1)")
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.parametrize("value, needle", [
    ("chatlm", "data.chat_template: unknown template name 'chatlm'"),
    ("llama3", "data.chat_template: llama3 needs <|start_header_id|>"),  # markers the tokenizer lacks
    ("{% for m in messages %}", "data.chat_template: not a valid Jinja template"),
])
def test_C19_bad_chat_template_values_exit_2(value, needle, tmp_path, tiny_dir):
    path = write_recipe(tmp_path / "recipe.yaml", _chat_recipe(tmp_path, tiny_dir, chat_template=value))
    result = CliRunner().invoke(app, ["train", str(path)])
    _one_line_error(result, needle)
    if value == "llama3":
        assert "choose one that fits (chatml, mistral)" in result.output


def test_system_prompt_needs_chat_rows(tmp_path):
    recipe = _chat_recipe(tmp_path, "unused", system_prompt="Be brief.")
    recipe["data"]["train"]["format"] = "alpaca"
    with pytest.raises(UserError, match="system_prompt needs chat rows"):
        validate(recipe)


def test_system_prompt_is_the_first_message_unless_the_row_has_one():
    rows = [{"messages": CHAT["messages"][1:3]}, CHAT]
    out = data.add_system_prompt(rows, "chat", "Answer in French.")
    assert out[0]["messages"][0] == {"role": "system", "content": "Answer in French."}
    assert out[1] == CHAT  # it has a system message already


# ---------------------------------------------------------------------------------------------
# peft generate's prompt (data.generation_prompt)


def _run_recipe(fmt: str, **data_keys):
    return validate({"method": {"name": "lora"}, "data": {"train": {"path": "unused.jsonl", "format": fmt}, **data_keys}})


@pytest.mark.parametrize("fmt", ["alpaca", "completion", "chat", "text"])
def test_generation_prompt_is_the_prompt_part_of_the_training_ids(fmt):
    tok = chat_tokenizer("chatml", add_bos=True)
    recipe = _run_recipe(fmt, **({"system_prompt": "Be brief."} if fmt == "chat" else {}))
    got = data.generation_prompt("Say hi.", recipe, tok)
    if fmt == "text":
        assert got == "Say hi."  # a text run has no prompt format: sent as typed
        return
    row = {"alpaca": {"instruction": "Say hi.", "output": "hello world"},
           "completion": {"prompt": "Say hi.", "completion": "hello world"},
           "chat": CHAT | {"messages": CHAT["messages"][:3]}}[fmt]  # the run's system prompt, the user turn, an answer
    example = data.tokenize_row(row, fmt, tok, 512, False)
    first_supervised = next(i for i, label in enumerate(example["labels"]) if label != data.IGNORE_INDEX)
    assert got == example["input_ids"][:first_supervised]  # training's own ids: generation starts where the answer did
    if fmt == "chat":  # and the tokenizer's template, as HF renders it
        assert got == tok.apply_chat_template(CHAT["messages"][:2], add_generation_prompt=True, tokenize=True)["input_ids"]


def test_generation_prompt_takes_a_system_message_only_in_a_chat_run():
    tok = chat_tokenizer("chatml")
    chat = _run_recipe("chat", system_prompt="Be brief.")
    want = tok.apply_chat_template([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Say hi."}],
                                   add_generation_prompt=True, tokenize=True)["input_ids"]
    assert data.generation_prompt("Say hi.", chat, tok, system="Be terse.") == want  # replaces the run's
    assert data.generation_prompt("Say hi.", chat, tok, raw=True) == "Say hi."
    for recipe, raw, this in [(chat, True, "--raw"), (_run_recipe("alpaca"), False, "alpaca"), (None, False, "text")]:
        with pytest.raises(UserError) as err:
            data.generation_prompt("Say hi.", recipe, tok, system="Be terse.", raw=raw)
        assert str(err.value) == f"--system: only a chat run's prompt has a system message (this one: {this})"
