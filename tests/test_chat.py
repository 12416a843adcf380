"""peft generate's sampling and --show-prompt, peft chat (history, /reset, Ctrl-C, the context),
and peft eval's progress, on a tiny random Llama with a LoRA adapter (issue 17, items 4 and 5)."""

import json
import re
import shutil
import time
from io import StringIO

import pytest
import torch
from helpers import method_recipe, perturb, saved_adapter, write_jsonl
from rich.console import Console
from tiny import tiny_llama
from typer.testing import CliRunner

from peftcli import artifacts, chat, data, tokens
from peftcli.cli import app
from peftcli.evaluate import Sampling, generate_ids
from peftcli.phases import Phases
from peftcli.recipe import dump, validate

SYSTEM = {"role": "system", "content": "Be brief."}


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    """One LoRA adapter (lora_B redrawn, so it changes the output) as a bare adapter dir (no
    recipe, as HF peft saves one) and in two run dirs: a chat run (system prompt "Be brief.",
    the tokenizer's ChatML template) and an alpaca run."""
    tmp = tmp_path_factory.mktemp("chat")
    recipe = method_recipe("lora", tiny_dir, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    saved_adapter(recipe, tmp / "adapter", lambda model: perturb(model, ["lora_B"], scale=0.5))
    for fmt, keys in [("chat", {"system_prompt": SYSTEM["content"]}), ("alpaca", {})]:
        run = tmp / f"run-{fmt}"
        shutil.copytree(tmp / "adapter", run / "adapter")
        r = validate({"model": {"name_or_path": str(tiny_dir), "dtype": "float32"}, "method": recipe.method.model_dump(),
                      "data": {"train": {"path": "unused.jsonl", "format": fmt}, **keys}, "output": {"dir": str(run)}})
        (run / "recipe.yaml").write_text(dump(r))
    return tmp


@pytest.fixture(scope="module")
def chat_model(runs):
    """(model, tokenizer) of the chat run, the run's template set."""
    loaded = artifacts.load_adapted(runs / "run-chat")
    data.use_recipe_chat(loaded.tokenizer, loaded.recipe)
    return loaded.model, loaded.tokenizer


def cut(ids: list[int], stops) -> list[int]:
    """``ids`` before the first stop id."""
    return next((ids[:i] for i, t in enumerate(ids) if t in stops), ids)


def greedy_reply(model, tok, ids: list[int], new: int) -> str:
    """Reference: transformers' own greedy generate, cut at the first stop id, decoded."""
    stops = tokens.special_tokens(tok, model.generation_config).stop_ids
    out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=new, do_sample=False,
                         eos_token_id=list(stops), pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    return tok.decode(cut(out, stops), skip_special_tokens=True)


def template_ids(tok, messages: list[dict]) -> list[int]:
    """Reference: HF's apply_chat_template over ``messages``, with the generation prompt."""
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]


def block(tok, ids: list[int]) -> str:
    """What --show-prompt prints for prompt ``ids`` (built here from the ids' own decode)."""
    return f"--- prompt ({len(ids)} tokens) ---\n{tok.decode(ids, skip_special_tokens=False)}\n--- end of prompt ---\n"


def invoke(*args, stdin: str | None = None):
    result = CliRunner().invoke(app, [str(a) for a in args], input=stdin)
    assert result.exit_code == 0, result.output
    return result


# ---------------------------------------------------------------------------------------------
# sampling


def test_sampling_with_a_seed_repeats_matches_transformers_and_differs_from_greedy(tok):
    model = tiny_llama(tok)
    ids = tok("the quick brown fox", add_special_tokens=False).input_ids
    sampled = Sampling(temperature=1.5, top_p=0.9, seed=7)
    rng = torch.get_rng_state()
    first = generate_ids(model, tok, [ids], 16, sampling=sampled)
    assert generate_ids(model, tok, [ids], 16, sampling=sampled) == first  # same seed, same tokens
    assert torch.equal(torch.get_rng_state(), rng)  # a seeded call neither reads nor moves the global RNG
    # reference: transformers' sampler itself from the same seed, temperature and top-p, no top-k
    stops = tokens.special_tokens(tok, model.generation_config).stop_ids
    torch.manual_seed(7)
    ref = model.generate(input_ids=torch.tensor([ids]), do_sample=True, temperature=1.5, top_p=0.9, top_k=0,
                         max_new_tokens=16, eos_token_id=list(stops), pad_token_id=tok.pad_token_id)[0, len(ids):]
    assert first == [cut(ref.tolist(), stops)]
    greedy = generate_ids(model, tok, [ids], 16)
    assert first != greedy and generate_ids(model, tok, [ids], 16, sampling=Sampling(1.5, 0.9, seed=8)) != first
    # a nucleus so small it holds only the most likely token is greedy decoding (hand reasoning)
    assert generate_ids(model, tok, [ids], 16, sampling=Sampling(temperature=1.0, top_p=1e-9, seed=3)) == greedy


def test_generate_temperature_0_is_the_greedy_output_and_a_seed_repeats_a_sample(runs, chat_model):
    run = runs / "run-alpaca"
    loaded = artifacts.load_adapted(run)
    ids = data.generation_prompt("Sort 3, 1", loaded.recipe, loaded.tokenizer)
    want = greedy_reply(loaded.model, loaded.tokenizer, ids, 8)
    assert invoke("generate", run, "Sort 3, 1", "--max-new-tokens", 8).stdout == want + "\n"
    assert invoke("generate", run, "Sort 3, 1", "--max-new-tokens", 8, "--temperature", 0).stdout == want + "\n"
    # sampling without --seed says its seed on stderr; --seed with that number repeats the text
    fresh = invoke("generate", run, "Sort 3, 1", "--max-new-tokens", 8, "--temperature", 2)
    seed = re.fullmatch(r"sampling with seed (\d+) \(--seed \1 repeats it\)\n", fresh.stderr).group(1)
    again = invoke("generate", run, "Sort 3, 1", "--max-new-tokens", 8, "--temperature", 2, "--seed", seed)
    assert again.stdout == fresh.stdout != want + "\n" and again.stderr == ""


@pytest.mark.parametrize("run, system", [("run-chat", None), ("run-chat", "Be terse."), ("run-alpaca", None)])
def test_show_prompt_prints_the_decoded_generation_prompt(runs, chat_model, run, system):
    _, tok = chat_model
    extra = ["--system", system] if system else []
    result = invoke("generate", runs / run, "Say hi.", "--max-new-tokens", 2, "--show-prompt", *extra)
    recipe = artifacts.read_adapter(runs / run).recipe
    ids = data.generation_prompt("Say hi.", recipe, tok, system=system)
    assert result.stderr == block(tok, ids)
    if run == "run-chat":  # the run's system prompt or --system, in HF's rendering of the template
        assert ids == template_ids(tok, [{"role": "system", "content": system or "Be brief."},
                                         {"role": "user", "content": "Say hi."}])


# ---------------------------------------------------------------------------------------------
# peft chat


def test_chat_keeps_history_across_turns_reset_drops_it_and_eof_exits_0(runs, chat_model):
    model, tok = chat_model
    result = invoke("chat", runs / "run-chat", "--show-prompt", "--max-new-tokens", 6,
                    stdin="Say hi.\nCount.\n/reset\nAgain.\n")  # then end of input
    first = template_ids(tok, [SYSTEM, {"role": "user", "content": "Say hi."}])
    reply1 = greedy_reply(model, tok, first, 6)
    second = template_ids(tok, [SYSTEM, {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": reply1},
                                {"role": "user", "content": "Count."}])  # the first turn and its reply
    third = template_ids(tok, [SYSTEM, {"role": "user", "content": "Again."}])  # after /reset: only the new message
    assert result.stderr == block(tok, first) + block(tok, second) + "(history cleared)\n" + block(tok, third)
    replies = [greedy_reply(model, tok, ids, 6) for ids in (first, second, third)]
    assert result.stdout == "".join(r + "\n" for r in replies)  # streamed text = the whole reply


def test_chat_exit_command_quits_before_the_rest(runs, chat_model):
    result = invoke("chat", runs / "run-chat", "--max-new-tokens", 2, stdin="/exit\nSay hi.\n")
    assert result.stdout == "" and result.stderr == ""


def test_chat_on_an_alpaca_run_sends_each_message_as_a_fresh_prompt(runs, chat_model):
    _, tok = chat_model
    run = runs / "run-alpaca"
    result = invoke("chat", run, "--show-prompt", "--max-new-tokens", 2, stdin="Say hi.\nCount.\n")
    recipe = artifacts.read_adapter(run).recipe
    note = "note: this run trained on alpaca rows, not chat: each message is a fresh prompt and no history is kept\n"
    assert result.stderr == note + "".join(block(tok, data.generation_prompt(m, recipe, tok)) for m in ("Say hi.", "Count."))
    refused = CliRunner().invoke(app, ["chat", str(run), "--system", "Be terse."], input="Say hi.\n")
    assert refused.exit_code == 2
    assert refused.stderr == "error: --system: only a chat run's prompt has a system message (this one: alpaca)\n"


def test_chat_on_an_adapter_without_recipe_uses_the_tokenizer_template(runs, chat_model):
    model, tok = chat_model  # the tokenizer's own template is the ChatML the chat run uses
    result = invoke("chat", runs / "adapter", "--show-prompt", "--max-new-tokens", 4, stdin="Say hi.\nCount.\n")
    first = template_ids(tok, [{"role": "user", "content": "Say hi."}])  # no recipe: no system prompt
    second = template_ids(tok, [{"role": "user", "content": "Say hi."},
                                {"role": "assistant", "content": greedy_reply(model, tok, first, 4)},
                                {"role": "user", "content": "Count."}])
    assert result.stderr == block(tok, first) + block(tok, second)


def test_chat_ctrl_c_stops_the_reply_not_the_loop(chat_model):
    model, tok = chat_model
    conversation = chat.Conversation(tok, None, None, tokens.special_tokens(tok, model.generation_config), None, 6)
    written, notes, messages = [], [], iter(["Say hi.", "Count.", None])

    def write(text):
        written.append(text)
        if len(written) == 1:
            raise KeyboardInterrupt  # Ctrl-C while the first reply streams (after its first token)

    chat.run(model, tok, conversation, lambda: next(messages), write, notes.append, max_new_tokens=6)
    first = template_ids(tok, [{"role": "user", "content": "Say hi."}])
    one_token = model.generate(input_ids=torch.tensor([first]), max_new_tokens=1, do_sample=False,
                               pad_token_id=tok.pad_token_id)[0, len(first):].tolist()
    assert notes == ["(reply stopped)"]
    # the stopped reply is kept as far as it went (one token), and the loop answered the next message
    assert conversation.turns[0] == ("Say hi.", tok.decode(one_token, skip_special_tokens=True))
    second = template_ids(tok, [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": conversation.turns[0][1]},
                                {"role": "user", "content": "Count."}])
    assert conversation.turns[1] == ("Count.", greedy_reply(model, tok, second, 6))


def test_chat_drops_the_oldest_turns_when_the_conversation_is_over_the_context(chat_model):
    model, tok = chat_model
    special = tokens.special_tokens(tok, model.generation_config)
    past = [("one", "first reply"), ("two", "second reply")]
    as_messages = [{"role": r, "content": t} for turn in past for r, t in zip(("user", "assistant"), turn)]
    newest_only = template_ids(tok, [SYSTEM, *as_messages[2:], {"role": "user", "content": "three"}])
    reserve = 6
    conversation = chat.Conversation(tok, None, "Be brief.", special,
                                     len(newest_only) + reserve, reserve)
    conversation.turns = list(past)
    notes, messages = [], iter(["three", None])
    chat.run(model, tok, conversation, lambda: next(messages), lambda text: None, notes.append, max_new_tokens=reserve,
             show_prompt=True)
    assert notes[0] == f"(dropped the oldest 1 turn: the conversation is over the model's context of {len(newest_only) + reserve} tokens)"
    assert notes[1] == block(tok, newest_only).rstrip("\n")  # the system message stays; turn "one" went
    assert [t[0] for t in conversation.turns] == ["two", "three"]
    # a message that is over the context alone: one line, and the loop goes on
    conversation.reset()
    notes, messages = [], iter(["three " * 40, "three", None])
    chat.run(model, tok, conversation, lambda: next(messages), lambda text: None, notes.append, max_new_tokens=reserve)
    assert len(notes) == 1 and notes[0].startswith("error: this message is ") and "shorten it" in notes[0]
    assert [t[0] for t in conversation.turns] == ["three"]


# ---------------------------------------------------------------------------------------------
# peft eval's progress


def test_eval_progress_is_one_line_per_phase_on_stderr_and_json_stays_clean(runs, tmp_path):
    rows = write_jsonl(tmp_path / "eval.jsonl", [{"instruction": "Is it even?", "input": str(n), "output": "yes" if n % 2 == 0 else "no"}
                                                for n in range(3)])
    result = invoke("eval", runs / "run-alpaca", "--data", rows, "--format", "alpaca", "--json", "--labels", "yes,no")
    assert json.loads(result.stdout)["rows"] == 3  # stdout: the JSON object alone
    precision, *lines = result.stderr.splitlines()
    assert precision == "precision: base float32 (as set in the recipe)"  # the recipe's model.dtype: float32
    phases = [re.fullmatch(r"(.+): (\d+)/(\d+) (\w+) in \d+\.\d s", line).groups() for line in lines]
    assert phases == [(f"{model} {what}", n, n, unit) for model in ("base", "adapted") for what, n, unit in
                      [("loss", "3", "examples"), ("exact match", "3", "rows"), ("label likelihood", "6", "examples"),
                       ("label answers", "3", "rows")]]


def test_phases_show_a_bar_with_the_count_on_a_terminal():
    screen = StringIO()
    phases = Phases(Console(file=screen, force_terminal=True, color_system=None, width=100))
    with phases.phase("base loss", 4, "examples") as advance:
        time.sleep(1.1)
        advance(2)  # half done in 1.1 s: 1.1 s left, shown from this first update on
        advance(2)
    shown = screen.getvalue()
    assert "base loss" in shown and "4/4 examples" in shown
    assert re.search(r"2/4 examples \S+ left 0:00:01", shown), shown
    assert ": 4/4 examples in" not in screen.getvalue()  # the bar, not the log line
