"""Data: load rows from a file, render prompts, tokenise with label masks, batch and collate.

The flow, top to bottom:

    load_rows(source)        a source's rows (peftcli.sources: files, dirs, hub cache), fields checked
                             (chat_messages: chat and sharegpt rows as template messages)
    render_prompt, reference the text shown before the answer, and the answer itself
    prompt_ids               the prompt's token ids, as generation gets them
    tokenize_examples        a row -> its {"input_ids", "labels"} examples (a text row: one per
                             window, text_windows); labels are -100 where nothing is learned
    tokenize_rows            every row, with DataStats: what was dropped or cut, by reason
    build(cfg, tokenizer)    train + eval examples for a recipe
    batches, collate         seeded micro-batch order; right-padded tensors

Labels follow the Hugging Face convention: ``labels[i]`` is the target for token ``i`` (not
shifted here; the loss shifts). A row that leaves no supervised token (an empty answer, or a
prompt that fills ``max_seq_len``) is dropped, and a row cut at ``max_seq_len`` kept; both are
counted by reason in :class:`DataStats`. Text is split into windows, never cut.

Special tokens come from :func:`peftcli.tokens.special_tokens`: a sequence holds the tokenizer's
BOS once (for chat rows: exactly what the template renders, as ``apply_chat_template(tokenize=True)``),
a supervised answer ends with EOS (chat: with the template's end-of-turn token), and no EOS sits
between prompt and answer even when the tokenizer appends one to every text (CASES C17, C18).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import operator
import os
import sys
from dataclasses import dataclass, field, fields

import torch

from peftcli import parallel, sources, token_cache, tokens
from peftcli.errors import UserError
from peftcli.recipe import DataConfig, DataSource, Recipe
from peftcli.tokens import SpecialTokens

IGNORE_INDEX = -100
# tokens per example where no recipe says (data.max_seq_len's default)
DEFAULT_MAX_SEQ_LEN: int = DataConfig.model_fields["max_seq_len"].default

# the fields each format needs in every row (alpaca's "input" is optional)
REQUIRED_FIELDS = {
    "alpaca": ("instruction", "output"),
    "completion": ("prompt", "completion"),
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "text": ("text",),
    "tokenized": ("input_ids",),
    "preference": ("prompt", "chosen", "rejected"),
}
TEXT_FIELDS = ("instruction", "input", "output", "prompt", "completion", "text")
CHAT_FORMATS = ("chat", "sharegpt")  # rendered with the chat template; labels on assistant turns
NO_PROMPT_FORMATS = ("text", "tokenized")  # every token is the answer: no prompt, no reference
PREFERENCE = "preference"  # (prompt, chosen, rejected) pairs for train.objective dpo / orpo
# role names as datasets spell them (case ignored) -> the chat template's: ShareGPT's
# human/gpt (and its chatgpt/bing/bard), Gemma's model
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant", "tool": "tool"}

# Taori et al. 2023, Stanford Alpaca (github.com/tatsu-lab/stanford_alpaca, train.py
# PROMPT_DICT), with the newline after "### Response:" as in tloen/alpaca-lora's templates.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


# ---------------------------------------------------------------------------------------------
# loading


def load_rows(source: DataSource, key: str = "data.train") -> list[dict]:
    """Read every row of ``source`` (:func:`peftcli.sources.load`: files, ``save_to_disk`` dirs,
    cached hub datasets; ``columns`` applied) and check it has the fields ``source.format`` needs.

    Text fields that hold a number are turned into text (``15`` -> ``"15"``); ``null`` -> ``""``.
    ``key``: the source's recipe key, named in errors about the source.

    Returns:
        the rows, in file order.

    Raises:
        UserError: from :func:`peftcli.sources.load`, or a row without a needed field
            ("FILE:LINE (row N): missing field 'output' for format alpaca").
    """
    loaded = sources.load(source, key)
    for n, row in enumerate(loaded.rows, start=1):
        _check_row(row, source.format, loaded.where(n))
    return loaded.rows


def _check_row(row: dict, fmt: str, where: str) -> None:
    """Check (and normalise in place) the fields ``fmt`` needs: text fields become ``str``; chat and
    sharegpt rows get ``messages`` of ``{role, content}`` with the template's role names and text
    content (:func:`chat_messages`); tokenized rows' ``input_ids`` / ``labels`` are checked.

    Raises:
        UserError: "WHERE: missing field 'F' for format FMT", or a field of the wrong kind.
    """
    for name in REQUIRED_FIELDS[fmt]:
        if name not in row:
            raise UserError(f"{where}: missing field {name!r} for format {fmt}")
    if fmt == PREFERENCE:
        _check_preference(row, where)
        return
    for name in TEXT_FIELDS:
        if name in row:
            row[name] = _as_text(row[name], f"{where}: field {name!r}")
    if fmt in CHAT_FORMATS:
        name = "messages" if fmt == "chat" else "conversations"
        row["messages"] = _normalise_turns(row[name], f"{where}: {name}")
    if fmt == "tokenized":
        _check_tokenized(row, where)


def _check_preference(row: dict, where: str) -> None:
    """Normalise a preference row in place: ``prompt`` text (numbers as text) or a non-empty list of
    chat messages (:func:`_normalise_turns`; rendered with the chat template); ``chosen`` and
    ``rejected`` text, given as a string, an assistant message ``{role: assistant, content}``, or
    a list of one such message (TRL's conversational layout).

    Raises:
        UserError: "WHERE: field 'chosen' must be text or one assistant message ...", or a bad
            prompt message list.
    """
    prompt = row["prompt"]
    row["prompt"] = _normalise_turns(prompt, f"{where}: prompt") if isinstance(prompt, list) \
        else _as_text(prompt, f"{where}: field 'prompt'")
    for name in ("chosen", "rejected"):
        value = row[name]
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, dict):
            turn = _normalise_turns([value], f"{where}: {name}")[0]
            if turn["role"] != "assistant":
                raise UserError(f"{where}: field {name!r} is a {turn['role']} message; it must be the assistant's reply")
            value = turn["content"]
        if isinstance(value, list):
            raise UserError(f"{where}: field {name!r} must be text or one assistant message, got a list of {len(value)}")
        row[name] = _as_text(value, f"{where}: field {name!r}")


def chat_messages(row: dict, fmt: str, where: str = "row") -> list[dict]:
    """A chat or sharegpt row's conversation as chat-template messages: ``{role, content}`` with
    role names mapped (:data:`ROLES`: human -> user, gpt -> assistant, ...) and content as text
    (a list of OpenAI text parts is joined). A sharegpt row reads ``messages`` once it has them
    (:func:`_check_row`, :func:`add_system_prompt`), else its ``conversations``.

    Raises:
        UserError: "WHERE: messages[I] has unknown role 'R' (known: ...)", a turn without a role or
            content, or content that is not text (see :func:`_content_text`).
    """
    name = "messages" if fmt == "chat" or "messages" in row else "conversations"
    return _normalise_turns(row[name], f"{where}: {name}")


def _normalise_turns(turns, what: str) -> list[dict]:
    """``{role, content}`` messages from ``{role, content}`` or ShareGPT ``{from, value}`` turns;
    other keys of a turn (``name``, ``tool_calls``, ...) are kept for the template. ``what``
    names the list in errors ("FILE:LINE (row N): conversations")."""
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{what} must be a non-empty list of {{role, content}} (or {{from, value}}) objects")
    messages = []
    for i, turn in enumerate(turns):
        role_key, content_key = ("from", "value") if isinstance(turn, dict) and turn.get("from") is not None \
            else ("role", "content")
        if not isinstance(turn, dict) or not isinstance(turn.get(role_key), str) or content_key not in turn:
            raise UserError(f"{what}[{i}] needs a 'role' and a 'content' (or a 'from' and a 'value')")
        role = ROLES.get(turn[role_key].strip().lower())
        if role is None:
            raise UserError(f"{what}[{i}] has unknown role {turn[role_key]!r} (known: {', '.join(ROLES)})")
        rest = {k: v for k, v in turn.items() if k not in ("from", "value", "role", "content")}
        messages.append({**rest, "role": role, "content": _content_text(turn[content_key], f"{what}[{i}]")})
    return messages


def _content_text(content, where: str) -> str:
    """A message's content as text: a string (or number) as is, a list of OpenAI text parts
    (``[{"type": "text", "text": ...}]``) joined with nothing between them, as a list-aware chat
    template renders them.

    Raises:
        UserError: "WHERE.content[J] is of type 'image_url'; only text parts ... can be trained ...".
    """
    if not isinstance(content, list):
        return _as_text(content, f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise UserError(f"{where}.content[{j}] is of type {kind!r}; only text parts "
                            "({\"type\": \"text\", \"text\": ...}) can be trained: remove the other parts or the row")
        texts.append(part["text"])
    return "".join(texts)


def _check_tokenized(row: dict, where: str) -> None:
    """``input_ids``: a non-empty list of ints >= 0; ``labels`` (optional): ints, -100 or >= 0, as
    many as ``input_ids``. (The tokenizer's vocabulary size is checked when tokenising.)

    Raises:
        UserError: naming the field and the first bad entry.
    """
    ids, labels = row["input_ids"], row.get("labels")
    if not isinstance(ids, list) or not ids:
        raise UserError(f"{where}: field 'input_ids' must be a non-empty list of token ids")
    _check_ints(ids, f"{where}: input_ids", allowed=())
    if labels is not None:
        if not isinstance(labels, list) or len(labels) != len(ids):
            got = f"{len(labels)} labels" if isinstance(labels, list) else type(labels).__name__
            raise UserError(f"{where}: field 'labels' must be a list as long as input_ids ({len(ids)}), got {got}")
        _check_ints(labels, f"{where}: labels", allowed=(IGNORE_INDEX,))


def _check_ints(values: list, what: str, allowed: tuple[int, ...]) -> None:
    """Raise UserError naming the first entry of ``values`` that is not an int >= 0 (or in ``allowed``)."""
    for j, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int) or (v < 0 and v not in allowed):
            extra = f" or {allowed[0]}" if allowed else ""
            raise UserError(f"{what}[{j}] is {v!r}; expected a token id (an int >= 0{extra})")


def _as_text(value, what: str) -> str:
    """``None`` -> ``""``, numbers and booleans -> their text, strings unchanged.

    Raises:
        UserError: a list or object where text is expected.
    """
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float, bool)):
        return str(value)
    raise UserError(f"{what} must be text, got {type(value).__name__}")


# ---------------------------------------------------------------------------------------------
# prompts and answers


def render_prompt(row: dict, fmt: str, tokenizer) -> str:
    """The text the model sees before its answer (what generation starts from).

    alpaca: the Stanford Alpaca template (Taori et al. 2023), with the "### Input:" block only
    when the row's input is not empty; completion: ``row["prompt"]``; chat / sharegpt: the
    tokenizer's chat template over the messages (:func:`chat_messages`) before the last assistant
    message, plus the generation prompt; text / tokenized: ``""``.
    """
    if fmt == "alpaca":
        template = ALPACA_WITH_INPUT if (row.get("input") or "").strip() else ALPACA_NO_INPUT
        return template.format(instruction=row["instruction"], input=row.get("input") or "")
    if fmt == "completion":
        return row["prompt"]
    if fmt == PREFERENCE:
        chat = isinstance(row["prompt"], list)
        return render_chat(tokenizer, row["prompt"], add_generation_prompt=True) if chat else row["prompt"]
    if fmt in CHAT_FORMATS:
        messages = chat_messages(row, fmt)
        last = _assistant_turns(messages)[-1:] or [len(messages)]
        return render_chat(tokenizer, messages[: last[0]], add_generation_prompt=True)
    if fmt in NO_PROMPT_FORMATS:
        return ""
    raise ValueError(f"unknown data format {fmt!r}")


def prompt_ids(row: dict, fmt: str, tokenizer, special: SpecialTokens | None = None) -> list[int]:
    """Token ids generation starts from, exactly the prompt part of the training ids.

    chat / sharegpt: the rendered template tokenized without additions (= ``apply_chat_template(
    ..., add_generation_prompt=True, tokenize=True)``; the template places any BOS); other formats:
    :func:`render_prompt` with the tokenizer's BOS once and never its appended EOS.
    """
    text = render_prompt(row, fmt, tokenizer)
    if fmt in CHAT_FORMATS or (fmt == PREFERENCE and isinstance(row["prompt"], list)):
        return _ids(tokenizer, text)
    return tokens.encode_start(tokenizer, text, special or tokens.special_tokens(tokenizer))


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The tokenizer's chat template over ``messages`` (as text).

    Raises:
        UserError: the tokenizer has no chat template, or the template cannot render the
            conversation (e.g. it raises on a system message); both name data.chat_template.
    """
    import jinja2

    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"format chat: the tokenizer has no chat template; {tokens.TEMPLATE_HINT}")
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError) as e:
        why = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"format chat: the chat template cannot render this conversation ({why}); "
                        f"{tokens.TEMPLATE_HINT} that renders it, or change the messages") from None


def add_system_prompt(rows: list[dict], fmt: str, system_prompt: str | None) -> list[dict]:
    """``rows`` with ``system_prompt`` as the first message of every chat / sharegpt conversation
    that has no system message (rows that have one keep theirs; the others get ``messages``, see
    :func:`chat_messages`); other formats and None: unchanged."""
    if system_prompt is None or fmt not in CHAT_FORMATS:
        return rows
    system = {"role": "system", "content": system_prompt}
    out = []
    for r in rows:
        messages = chat_messages(r, fmt)
        out.append(r if any(m["role"] == "system" for m in messages) else {**r, "messages": [system, *messages]})
    return out


def use_recipe_chat(tokenizer, recipe: Recipe | None) -> str | None:
    """Give ``tokenizer`` the chat template a run trained with (its recipe's data.chat_template;
    none recorded, or no recipe, keeps the tokenizer's) and return the run's data.system_prompt
    (None without a recipe)."""
    tokens.use_chat_template(tokenizer, recipe.data.chat_template if recipe else None)
    return recipe.data.system_prompt if recipe else None


def generation_prompt(prompt: str, recipe: Recipe | None, tokenizer, system: str | None = None,
                      raw: bool = False) -> str | list[int]:
    """What ``peft generate`` sends for ``prompt``: the prompt in the run's training format.

    The tokenizer first gets the run's chat template (:func:`use_recipe_chat`; generation's stop
    ids read it too). Then: ``raw``, a ``text`` or ``tokenized`` run or no recipe (an adapter HF
    peft saved) -> ``prompt`` as is (text); alpaca / completion -> the prompt ids of a row with
    ``prompt`` as its instruction / prompt; chat / sharegpt -> the ids of a user turn, after the
    system message ``system`` (default: the run's data.system_prompt). Ids are :func:`prompt_ids`.

    Raises:
        UserError: ``system`` given for a run that is not a chat run, or with ``raw``.
    """
    run_system = use_recipe_chat(tokenizer, recipe)
    fmt = recipe.data.train_format if recipe else "text"
    if system is not None and (raw or fmt not in CHAT_FORMATS):
        raise UserError(f"--system: only a chat run's prompt has a system message (this one: {'--raw' if raw else fmt})")
    if raw or fmt in NO_PROMPT_FORMATS:
        return prompt
    if fmt == PREFERENCE and preference_prompts(recipe) == "chat":  # the pairs' prompts were chat messages
        return prompt_ids({"prompt": [{"role": "user", "content": prompt}], "chosen": "", "rejected": ""}, fmt, tokenizer)
    rows = add_system_prompt([_prompt_row(prompt, fmt)], fmt, system if system is not None else run_system)
    return prompt_ids(rows[0], fmt, tokenizer)


def preference_prompts(recipe: Recipe) -> str:
    """How a preference run's train rows gave their prompts: ``"chat"`` (every prompt a list of
    messages, rendered with the chat template) or ``"text"`` (every prompt text), read from the
    run's train sources, so generation sends a prompt the way the run trained on them.

    Raises:
        UserError: the train data is no longer there to tell, or it mixes the two (``--raw`` then
        sends a prompt as written).
    """
    kinds = set()
    for key, source in sources.keyed(recipe.data.train, "data.train"):
        try:
            rows = load_rows(source, key)
        except UserError as e:
            raise UserError(f"generate: this preference run's prompts are read from its train data to render them "
                            f"as it trained, and that failed ({e}); pass --raw with the prompt as the model should see it") from None
        kinds |= {"chat" if isinstance(r.get("prompt"), list) else "text" for r in rows}
    if len(kinds) != 1:
        raise UserError("generate: this preference run trained on both chat and text prompts; pass --raw with the prompt "
                        "as the model should see it")
    return kinds.pop()


def _prompt_row(prompt: str, fmt: str) -> dict:
    """A row of format ``fmt`` (alpaca, completion, chat or sharegpt: as ``messages``; preference:
    a text prompt) asking ``prompt``, with an empty answer."""
    if fmt in CHAT_FORMATS:
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]}
    return {"alpaca": {"instruction": prompt, "input": "", "output": ""},
            "completion": {"prompt": prompt, "completion": ""},
            PREFERENCE: {"prompt": prompt, "chosen": "", "rejected": ""}}[fmt]  # a text prompt, as completion


def reference(row: dict, fmt: str) -> str | None:
    """The expected answer for exact-match scoring: alpaca ``output``, completion
    ``completion``, chat / sharegpt the last assistant message's content; ``None`` for text and
    tokenized (and for a conversation without an assistant message)."""
    if fmt == "alpaca":
        return row["output"]
    if fmt == "completion":
        return row["completion"]
    if fmt == PREFERENCE:
        return row["chosen"]
    if fmt in CHAT_FORMATS:
        messages = chat_messages(row, fmt)
        turns = _assistant_turns(messages)
        return messages[turns[-1]]["content"] if turns else None
    return None


def with_answer(row: dict, fmt: str, answer: str) -> dict:
    """A copy of ``row`` whose expected answer (see :func:`reference`) is ``answer``: alpaca
    ``output``, completion ``completion``, chat / sharegpt the last assistant message of its
    ``messages`` (appended when the conversation has none).

    Raises:
        ValueError: ``text`` and ``tokenized`` rows have no separate answer.
    """
    if fmt == "alpaca":
        return {**row, "output": answer}
    if fmt == "completion":
        return {**row, "completion": answer}
    if fmt in CHAT_FORMATS:
        messages = chat_messages(row, fmt)
        turns = _assistant_turns(messages)
        if turns:
            messages = messages[: turns[-1] + 1]
            messages[-1]["content"] = answer
        else:
            messages.append({"role": "assistant", "content": answer})
        return {**row, "messages": messages}
    raise ValueError(f"format {fmt} has no answer field")


def _assistant_turns(messages: list[dict]) -> list[int]:
    """Indices of the assistant messages."""
    return [i for i, m in enumerate(messages) if m["role"] == "assistant"]


def _nothing_to_answer(row: dict, fmt: str) -> str | None:
    """Why a prompt/answer row has no answer text to learn (a key of :data:`DROP_REASONS`), or
    None when it has some."""
    if fmt in CHAT_FORMATS:
        messages = chat_messages(row, fmt)
        turns = _assistant_turns(messages)
        if not turns:
            return "no_assistant_turn"
        return None if any(messages[i]["content"].strip() for i in turns) else "empty_answer"
    if fmt == PREFERENCE:
        return None if row["chosen"].strip() and row["rejected"].strip() else "empty_answer"
    return None if reference(row, fmt).strip() else "empty_answer"


# ---------------------------------------------------------------------------------------------
# tokenisation and label masks


def tokenize_row(row: dict, fmt: str, tokenizer, max_seq_len: int, train_on_prompt: bool,
                 special: SpecialTokens | None = None) -> dict | None:
    """Token ids and labels of one row that makes one example (see :func:`tokenize_examples`).

    Returns:
        ``{"input_ids": list[int], "labels": list[int]}``, or ``None`` when the row is dropped.

    Raises:
        ValueError: a text row longer than ``max_seq_len`` (it makes several windows: use
            :func:`tokenize_examples`).
    """
    examples = tokenize_examples(row, fmt, tokenizer, max_seq_len, train_on_prompt, special)
    if len(examples) > 1:
        raise ValueError(f"this text row makes {len(examples)} windows of {max_seq_len} tokens; use tokenize_examples")
    return examples[0] if examples else None


def tokenize_examples(row: dict, fmt: str, tokenizer, max_seq_len: int, train_on_prompt: bool,
                      special: SpecialTokens | None = None, text_overlap: int = 0) -> list[dict]:
    """The training examples of one row: token ids and labels.

    alpaca / completion: :func:`prompt_ids` (BOS once, no EOS) ``+ ids(answer) + [EOS]``; prompt
    and answer are tokenised apart so the boundary is exact (the same split generation sees),
    and the EOS is supervised so the model learns to stop. chat / sharegpt: the chat template
    over the whole conversation (:func:`chat_messages`), tokenised once as
    ``apply_chat_template(tokenize=True)`` does, labels cut at the assistant replies; only
    assistant content and the end-of-turn token right after it (``<|im_end|>``,
    ``<end_of_turn>``, ``<|eot_id|>``, ...) are supervised; system/user turns and the
    ``<|im_start|>assistant\\n`` header are not. A template whose turns end in no special token
    gets an EOS after each reply, so the model still learns to stop. With ``train_on_prompt``
    everything is supervised. These are cut to ``max_seq_len`` tokens from the right.

    text: BOS once at the start of the document, EOS at its end, every token supervised, split
    into windows of ``max_seq_len`` (:func:`text_windows`, with ``text_overlap``): no token is
    dropped. tokenized: ``input_ids`` as given (nothing added), ``labels`` as given (default: the
    ids; ``train_on_prompt`` supervises their -100 positions too), cut at ``max_seq_len``.

    ``special``: :func:`peftcli.tokens.special_tokens` of ``tokenizer`` (computed when None).

    Returns:
        examples ``{"input_ids": list[int], "labels": list[int]}`` (same length, labels unshifted,
        ``-100`` where not supervised): one per row, one per window for text, none when the
        row is dropped (:func:`tokenize_rows` counts why).

    Raises:
        UserError: the chat template cannot render the row; a tokenized id outside the vocabulary.
    """
    special = special or tokens.special_tokens(tokenizer)
    return _tokenize(row, fmt, tokenizer, max_seq_len, train_on_prompt, special, text_overlap)[0]


def _tokenize(row: dict, fmt: str, tokenizer, max_seq_len: int, train_on_prompt: bool,
              special: SpecialTokens, text_overlap: int = 0) -> tuple[list[dict], str]:
    """(examples, what happened): "ok"; "cut" (kept, cut at ``max_seq_len``); "windows" (a text
    split into several windows); or why the row is dropped (a key of :data:`DROP_REASONS`, no
    examples)."""
    if fmt == "text":
        return _text_examples(row["text"], tokenizer, max_seq_len, text_overlap, special)
    if fmt == PREFERENCE:
        return _preference_example(row, tokenizer, max_seq_len, special)
    if fmt == "tokenized":
        input_ids, labels = _tokenized_ids(row, len(tokenizer), train_on_prompt)
    else:
        if why := _nothing_to_answer(row, fmt):
            return [], why
        input_ids, labels = _encode(row, fmt, tokenizer, train_on_prompt, special)
    if all(label == IGNORE_INDEX for label in labels[:max_seq_len]):
        return [], "prompt_over_max_seq_len" if any(label != IGNORE_INDEX for label in labels) else "no_labels"
    example = {"input_ids": input_ids[:max_seq_len], "labels": labels[:max_seq_len]}
    return [example], "cut" if len(input_ids) > max_seq_len else "ok"


def _preference_example(row: dict, tokenizer, max_seq_len: int, special: SpecialTokens) -> tuple[list[dict], str]:
    """A preference row's one example and what happened ("ok", "cut", or why it is dropped):

        input_ids / labels                    prompt + chosen + end     (the chosen sequence)
        rejected_input_ids / rejected_labels  prompt + rejected + end   (the rejected sequence)

    Both start with the same prompt tokens (:func:`prompt_ids`: a text prompt as the completion
    format renders it, BOS once, no EOS; a message list through the chat template with the
    generation prompt), labels -100 on them; each response is tokenised apart and supervised with
    its end (:func:`_response_ids`: EOS, or the template's end-of-turn token), as sft supervises an
    answer. Each sequence is cut to ``max_seq_len`` from the right; a prompt that leaves no
    response token in either is dropped ("prompt_over_max_seq_len").
    """
    if why := _nothing_to_answer(row, PREFERENCE):
        return [], why
    prompt = prompt_ids(row, PREFERENCE, tokenizer, special)
    if len(prompt) >= max_seq_len:
        return [], "prompt_over_max_seq_len"
    example, cut = {}, False
    for name, key in (("chosen", ""), ("rejected", "rejected_")):
        response = _response_ids(row, name, tokenizer, special)
        ids = prompt + response
        cut = cut or len(ids) > max_seq_len
        example[f"{key}input_ids"] = ids[:max_seq_len]
        example[f"{key}labels"] = ([IGNORE_INDEX] * len(prompt) + response)[:max_seq_len]
    return [example], "cut" if cut else "ok"


def _response_ids(row: dict, name: str, tokenizer, special: SpecialTokens) -> list[int]:
    """The token ids of a preference row's ``chosen`` or ``rejected`` reply after its prompt, with
    the end the model learns to stop at. A text prompt: the reply's ids and EOS (the completion
    format's answer). A message prompt: the chat template's rendering of the prompt plus the reply
    as the assistant's, less the prompt's rendering (with the generation prompt) and trailing
    whitespace, i.e. the reply and its end-of-turn marker (an EOS after it when the template ends
    turns with no special token), tokenised apart so both replies follow identical prompt tokens.

    Raises:
        UserError: the template does not render the conversation as the extension of its prompt.
    """
    eos = [special.eos_id] if special.eos_id is not None else []
    if not isinstance(row["prompt"], list):
        return _ids(tokenizer, row[name]) + eos
    prompt = render_chat(tokenizer, row["prompt"], add_generation_prompt=True)
    full = render_chat(tokenizer, row["prompt"] + [{"role": "assistant", "content": row[name]}])
    if not full.startswith(prompt):
        raise UserError("chat template: a prompt and its reply do not render as the extension of the prompt with the "
                        f"generation prompt, so the {name} reply cannot be located for label masking; "
                        f"{tokens.TEMPLATE_HINT} that does")
    end = eos if special.end_of_turn_id is None else []
    return _ids(tokenizer, full[len(prompt):].rstrip()) + end


def _text_examples(text: str, tokenizer, max_seq_len: int, overlap: int, special: SpecialTokens) -> tuple[list[dict], str]:
    """A text row's windows and what happened ("ok", "windows" or "empty_text")."""
    if not text.strip():
        return [], "empty_text"
    eos = [special.eos_id] if special.eos_id is not None else []
    windows = text_windows(tokens.encode_start(tokenizer, text, special) + eos, max_seq_len, overlap)
    return windows, "windows" if len(windows) > 1 else "ok"


def text_windows(ids: list[int], max_seq_len: int, overlap: int = 0) -> list[dict]:
    """A document's token ids cut into windows of at most ``max_seq_len`` tokens, every token used.

    Window ``k`` starts at ``k * (max_seq_len - overlap)``; each window after the first begins
    with the last ``overlap`` tokens of the one before, as context only: their labels are -100,
    so every token is a supervised label exactly once. A window's first token has nothing before
    it in that window, so it is never predicted: with ``overlap`` 0 the first token of every
    window is context only; with ``overlap`` >= 1 every token after the document's first is
    predicted once, from at least ``overlap`` tokens before it. A new window is started only while
    tokens remain, so the last one may be shorter.

    Returns:
        ``[{"input_ids", "labels"}, ...]``, ``1 + ceil(max(0, len(ids) - max_seq_len) /
        (max_seq_len - overlap))`` windows.

    Raises:
        ValueError: ``overlap`` not in ``[0, max_seq_len)`` (the recipe schema refuses it first).
    """
    if not 0 <= overlap < max_seq_len:
        raise ValueError(f"overlap {overlap} must be in [0, max_seq_len {max_seq_len})")
    windows = []
    for start in range(0, max(len(ids) - overlap, 1), max_seq_len - overlap):
        window = ids[start : start + max_seq_len]
        repeated = overlap if start else 0
        windows.append({"input_ids": window, "labels": [IGNORE_INDEX] * repeated + window[repeated:]})
    return windows


def _tokenized_ids(row: dict, vocab_size: int, train_on_prompt: bool) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a tokenized row (already checked by :func:`_check_row`).

    Raises:
        UserError: an id or label outside ``[0, vocab_size)`` (-100 allowed in labels).
    """
    input_ids = list(row["input_ids"])
    labels = list(row["labels"]) if row.get("labels") is not None else list(input_ids)
    for name, values in (("input_ids", input_ids), ("labels", labels)):
        for j, v in enumerate(values):
            if v >= vocab_size:
                raise UserError(f"{name}[{j}] = {v} is outside the tokenizer's vocabulary (ids 0..{vocab_size - 1}); "
                                "tokenize the data with this model's tokenizer")
    if train_on_prompt:
        labels = [i if label == IGNORE_INDEX else label for i, label in zip(input_ids, labels)]
    return input_ids, labels


def _encode(row: dict, fmt: str, tokenizer, train_on_prompt: bool, special: SpecialTokens) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a prompt/answer row (alpaca, completion, chat, sharegpt), before truncation."""
    input_ids, labels = [], []
    for ids, supervised in _segments(row, fmt, tokenizer, special):
        input_ids += ids
        labels += ids if (supervised or train_on_prompt) else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def _segments(row: dict, fmt: str, tokenizer, special: SpecialTokens) -> list[tuple[list[int], bool]]:
    """The row as consecutive token pieces, each marked supervised or not."""
    if fmt in CHAT_FORMATS:
        return _chat_segments(chat_messages(row, fmt), tokenizer, special)
    eos = [special.eos_id] if special.eos_id is not None else []
    return [(prompt_ids(row, fmt, tokenizer, special), False), (_ids(tokenizer, reference(row, fmt)) + eos, True)]


def _ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` alone, without the tokenizer's additions (BOS, EOS)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _chat_segments(messages: list[dict], tokenizer, special: SpecialTokens) -> list[tuple[list[int], bool]]:
    """The conversation's token pieces, each marked assistant reply or not.

    A fast tokenizer tokenises the rendered text once (so the ids are those of
    ``apply_chat_template(tokenize=True)``, whatever the merges across piece boundaries) and a
    token belongs to the piece its first character is in; a slow one tokenises piece by piece.
    Without an end-of-turn token in the template, an EOS follows each reply.
    """
    pieces = _chat_pieces(messages, tokenizer)
    if getattr(tokenizer, "is_fast", False):
        text, owner = "", []  # owner[c]: index of the piece character c is in
        for k, (piece, _) in enumerate(pieces):
            text += piece
            owner += [k] * len(piece)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        groups: list[tuple[int, list[int]]] = []
        for tok_id, (begin, _) in zip(enc["input_ids"], enc["offset_mapping"]):
            k = owner[min(begin, len(owner) - 1)]
            if groups and groups[-1][0] == k:
                groups[-1][1].append(tok_id)
            else:
                groups.append((k, [tok_id]))
        segments = [(ids, pieces[k][1]) for k, ids in groups]
    else:
        segments = [(_ids(tokenizer, piece), supervised) for piece, supervised in pieces]
    if special.end_of_turn_id is not None or special.eos_id is None:
        return segments
    with_eos = []
    for ids, supervised in segments:
        with_eos += [(ids, supervised)] + ([([special.eos_id], True)] if supervised else [])
    return with_eos


def _chat_pieces(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_assistant_reply) pieces.

    Each assistant reply's span is found by rendering growing prefixes of the conversation:
    ``messages[:i]`` with the generation prompt ends where reply ``i`` starts, and
    ``messages[:i+1]`` ends after its end-of-turn marker (trailing whitespace such as ChatML's
    newline is left to the next, unsupervised piece). The template itself adds any BOS.

    Raises:
        UserError: the chat template does not render a conversation as the extension of its
            prefixes (so reply spans cannot be found), or from :func:`render_chat`.
    """
    full = render_chat(tokenizer, messages)
    pieces, pos = [], 0
    for i in _assistant_turns(messages):
        start = len(render_chat(tokenizer, messages[:i], add_generation_prompt=True))
        upto = render_chat(tokenizer, messages[: i + 1])
        end = len(upto.rstrip())
        if not full.startswith(upto) or start < pos or start > end:
            raise UserError("chat template: a conversation does not render as the extension of its "
                            "first turns, so assistant replies cannot be located for label masking; "
                            f"{tokens.TEMPLATE_HINT} that does")
        pieces += [(full[pos:start], False), (full[start:end], True)]
        pos = end
    pieces.append((full[pos:], False))
    return [(text, supervised) for text, supervised in pieces if text]


# why a row is dropped -> how the console says it ({s}: plural ending, {max_seq_len}: the limit)
DROP_REASONS = {
    "empty_answer": "empty answer{s}",
    "no_assistant_turn": "conversation{s} without an assistant turn",
    "empty_text": "empty text{s}",
    "no_labels": "tokenized row{s} with every label -100",
    "prompt_over_max_seq_len": "prompt{s} over max_seq_len {max_seq_len}",
}


def _counted(n: int, label: str, max_seq_len: int = 0) -> str:
    """``n`` and ``label`` in the plural when ``n != 1``: ``_counted(2, "row{s}")`` -> "2 rows"."""
    return f"{n} {label.format(s='s' * (n != 1), max_seq_len=max_seq_len)}"


@dataclass
class DataStats:
    """Counts for the log, metrics.jsonl's data event and summary.json.

    rows: rows read; kept: rows that gave at least one example; examples: examples made (a text
    row gives one per window); dropped: rows dropped, by reason (the keys of
    :data:`DROP_REASONS`, only those that occurred); dropped_empty_answer: rows dropped with
    nothing to learn (every reason but the prompt's length); dropped_truncated: rows whose prompt
    fills ``max_seq_len`` (nothing supervised left); truncated: kept rows cut at ``max_seq_len``
    (the end of their answer, or of a tokenized row, is not learned); documents: text rows
    kept, split into ``windows`` examples (``text_overlap`` tokens repeated between
    neighbours, as context); supervised_tokens: labels != -100 over the examples.
    """

    rows: int
    kept: int
    dropped_empty_answer: int
    dropped_truncated: int
    supervised_tokens: int
    truncated: int = 0
    examples: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    documents: int = 0
    windows: int = 0
    max_seq_len: int = 0
    text_overlap: int = 0

    def dropped_rows(self) -> int:
        """Rows dropped for any reason."""
        return sum(self.dropped.values())

    def describe(self, what: str = "train") -> str:
        """The console's account of every row, e.g. "3 of 5 train rows kept -> 3 examples
        (dropped 1 empty answer, 1 prompt over max_seq_len 256; 1 kept row cut at max_seq_len
        256)", or "1 of 1 train row kept -> 37 examples (1 document -> 37 windows of max_seq_len
        256; none dropped)"."""
        parts = []
        if self.windows:
            overlap = f", each repeating {self.text_overlap} tokens of the one before" if self.text_overlap else ""
            parts.append(f"{_counted(self.documents, 'document{s}')} -> {_counted(self.windows, 'window{s}')} "
                         f"of max_seq_len {self.max_seq_len}{overlap}")
        dropped = [_counted(n, DROP_REASONS[why], self.max_seq_len) for why, n in self.dropped.items()]
        parts.append(f"dropped {', '.join(dropped)}" if dropped else "none dropped")
        if self.truncated:
            parts.append(f"{_counted(self.truncated, 'kept row{s}')} cut at max_seq_len {self.max_seq_len}")
        return (f"{self.kept} of {_counted(self.rows, what + ' row{s}')} kept -> {_counted(self.examples, 'example{s}')} "
                f"({'; '.join(parts)})")

    def __add__(self, other: DataStats) -> DataStats:
        """The counts of two sets of rows together (e.g. two sources); the limits are the recipe's,
        taken from ``self``."""
        summed = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)
                  if f.name not in ("dropped", "max_seq_len", "text_overlap")}
        dropped = {why: n for why in DROP_REASONS if (n := self.dropped.get(why, 0) + other.dropped.get(why, 0))}
        return DataStats(**summed, dropped=dropped, max_seq_len=self.max_seq_len, text_overlap=self.text_overlap)


# ---------------------------------------------------------------------------------------------
# tokenising many rows: the cache; worker processes and a progress bar (peftcli.parallel)

_cache_unwritable_said = False  # the "cannot write the token cache" note, once per process


def _say(message: str) -> None:
    """A line on stderr, from the first process only (distributed runs tokenise in each)."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


def cached_by_fingerprint(tokenize_all):
    """Wrap ``tokenize_rows`` so its result is read from :mod:`peftcli.token_cache` when the same
    rows were tokenised before with the same tokenizer and arguments, and saved there otherwise.

    The key takes every argument but ``rows``, ``tokenizer`` (both fingerprinted apart) and
    ``name`` (messages only), so a new argument joins it by being declared, plus the source of
    this module and :mod:`peftcli.tokens`. Says on stderr where the tokens came from; an
    unwritable cache dir is said once and the data is tokenised without it.
    ``PEFTCLI_TOKEN_CACHE=0`` turns it off.
    """
    signature = inspect.signature(tokenize_all)

    @functools.wraps(tokenize_all)
    def tokenize_or_read(*args, **kwargs):
        global _cache_unwritable_said
        if not token_cache.enabled():
            return tokenize_all(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        given = dict(bound.arguments)
        rows, tokenizer, name = given.pop("rows"), given.pop("tokenizer"), given.pop("name")
        given["code"] = token_cache.source_digest(__file__, tokens.__file__)
        key = token_cache.fingerprint(rows, tokenizer, given)
        found = token_cache.load(key)
        if found is not None:
            with contextlib.suppress(TypeError):  # stats of another shape: tokenise again
                examples, stats = found[0], DataStats(**found[1])
                _say(f"{name}: tokens from cache (key {key[:12]}…)")
                return examples, stats
        examples, stats = tokenize_all(*args, **kwargs)
        if DataStats(**dataclasses.asdict(stats)) != stats:  # would not read back as it is (nested dataclasses)
            return examples, stats
        try:
            token_cache.save(key, examples, dataclasses.asdict(stats))
            _say(f"{name}: tokenised {len(rows)} row{'s' * (len(rows) != 1)} (cached for next time)")
        except (OSError, UserError, ValueError, OverflowError) as e:  # UserError: a file in the way
            if not _cache_unwritable_said:
                _cache_unwritable_said = True
                why = getattr(e, "strerror", None) or str(e)
                _say(f"note: cannot write the token cache in {token_cache.cache_root()} ({why}); "
                     f"tokenising without it (PEFTCLI_TOKEN_CACHE=0 turns it off)")
        return examples, stats

    return tokenize_or_read


@cached_by_fingerprint
def tokenize_rows(rows: list[dict], fmt: str, tokenizer, max_seq_len: int, train_on_prompt: bool,
                  name: str, text_overlap: int = 0) -> tuple[list[dict], DataStats]:
    """Tokenise every row (see :func:`tokenize_examples`), dropping and counting by reason those
    with nothing to learn, and counting those cut or split into windows.

    The result is cached by fingerprint (:func:`cached_by_fingerprint`: a second call on the
    same rows, tokenizer and arguments reads it back); large sets are tokenised across worker
    processes in row order (:func:`peftcli.parallel.map_rows`).

    Returns:
        (examples in row order, a text row's windows one after another; stats).

    Raises:
        UserError: "NAME: no row has anything to learn (N rows: X empty answers (rows ...),
            Y prompts over max_seq_len M (rows ...))" (every reason that occurred) when no row
            is kept; "NAME (row N): ..." when the chat template cannot render a row or a
            tokenized id is outside the vocabulary.
    """
    examples, status = [], {}
    special = tokens.special_tokens(tokenizer)
    results = parallel.map_rows(_tokenize, rows, name, (fmt, tokenizer, max_seq_len, train_on_prompt, special, text_overlap),
                                "tokenising")
    for n, (made, what) in enumerate(results, start=1):
        status.setdefault(what, []).append(n)
        examples += made
    dropped = {why: len(status[why]) for why in DROP_REASONS if why in status}
    text_rows = len(status.get("windows", [])) + len(status.get("ok", [])) if fmt == "text" else 0
    stats = DataStats(rows=len(rows), kept=len(rows) - sum(dropped.values()), examples=len(examples),
                      dropped_empty_answer=sum(dropped.values()) - dropped.get("prompt_over_max_seq_len", 0),
                      dropped_truncated=dropped.get("prompt_over_max_seq_len", 0), truncated=len(status.get("cut", [])),
                      dropped=dropped, documents=text_rows, windows=len(examples) if fmt == "text" else 0,
                      max_seq_len=max_seq_len, text_overlap=text_overlap if fmt == "text" else 0,
                      supervised_tokens=sum(sum(label != IGNORE_INDEX for label in e[k]) for e in examples
                                            for k in ("labels", "rejected_labels") if k in e))
    if not examples:
        reasons = ", ".join(_counted(n, DROP_REASONS[why], max_seq_len) + _row_list(status[why]) for why, n in dropped.items())
        raise UserError(f"{name}: no row has anything to learn ({_counted(len(rows), 'row{s}')}: {reasons})")
    return examples, stats


def _row_list(numbers: list[int], shown: int = 5) -> str:
    """The row numbers for an error message, e.g. `` (rows 1, 4, 9)``; at most ``shown``."""
    if not numbers:
        return ""
    more = ", ..." if len(numbers) > shown else ""
    return f" (row{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers[:shown]))}{more})"


# ---------------------------------------------------------------------------------------------
# batching


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def collate(examples: list[dict], pad_id: int, multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest example, rounded up to a multiple of ``multiple_of``.

    Rounding makes lengths repeat from step to step, so the CPU/GPU kernels built for a shape are
    reused (on this project's CPU a first-seen length costs the oneDNN kernels about 4x); the extra
    positions are padding like any other and change no loss or gradient (CASES C8a).

    Returns:
        ``input_ids`` (B, T) long, padded with ``pad_id``; ``attention_mask`` (B, T) long, 1 on
        real tokens and 0 on padding; ``labels`` (B, T) long, the example labels with -100 on
        padding. A real EOS keeps its label even when ``pad_id`` is the EOS id: padding is
        known by position, never by id.
    """
    longest = _round_up(max(len(e["input_ids"]) for e in examples), multiple_of)
    input_ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[b, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        attention_mask[b, :n] = 1
        labels[b, :n] = torch.tensor(e["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_padding_free(examples: list[dict], multiple_of: int = 1, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Concatenate a micro-batch into one row with no padding (padding-free batching).

    Each example keeps its own positions (``position_ids`` restart at 0), which is how
    transformers recognises packed sequences and keeps attention within each example (its
    ``find_packed_sequence_indices``, used when no ``attention_mask`` is given). The first label of
    every example is set to -100: with labels unshifted, it would otherwise be predicted from the
    previous example's last token. The supervised targets are therefore exactly those of
    :func:`collate`, so loss and gradients are the same, without computing padded positions.

    With ``multiple_of`` > 1 the row is rounded up to a multiple of it by one filler segment of
    ``pad_id`` tokens with its own positions (so it attends only to itself) and no labels.

    Returns:
        ``input_ids``, ``position_ids``, ``labels``, each (1, N) long with N = the summed example
        lengths (rounded up); no ``attention_mask``.
    """
    input_ids, position_ids, labels = [], [], []
    for e in examples:
        n = len(e["input_ids"])
        input_ids += e["input_ids"]
        position_ids += range(n)
        labels += [IGNORE_INDEX, *e["labels"][1:]]
    filler = _round_up(len(input_ids), multiple_of) - len(input_ids)
    input_ids += [pad_id] * filler
    position_ids += range(filler)
    labels += [IGNORE_INDEX] * filler
    as_row = lambda xs: torch.tensor(xs, dtype=torch.long).unsqueeze(0)  # noqa: E731
    return {"input_ids": as_row(input_ids), "position_ids": as_row(position_ids), "labels": as_row(labels)}


def batches(examples: list, micro_batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Index lists of one epoch's micro-batches: a permutation drawn from a
    ``torch.Generator`` seeded with ``seed + epoch``, cut into chunks of ``micro_batch_size``
    (the last, shorter chunk is kept). The same (seed, epoch) always gives the same order."""
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(examples), generator=generator).tolist()
    return [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]


# ---------------------------------------------------------------------------------------------
# a recipe's data


@dataclass
class Datasets:
    """Tokenised train and eval examples for a run.

    eval_rows holds every raw eval row (for exact-match generation), including rows dropped
    from ``eval`` for having nothing to learn; ``eval`` and ``eval_stats`` are empty / None
    when the recipe has no eval data. ``train`` is the mixed list (:func:`peftcli.sources.mix`);
    ``train_stats`` counts rows before mixing, over all train sources; ``mixing`` holds the
    console lines of the mix (:func:`peftcli.sources.mix_lines`; none for one source of weight 1).
    """

    train: list[dict]
    eval: list[dict]
    eval_rows: list[dict]
    eval_format: str
    train_stats: DataStats
    eval_stats: DataStats | None
    mixing: list[str] = field(default_factory=list)


def build(cfg: DataConfig, tokenizer, seed: int) -> Datasets:
    """Load and tokenise a recipe's data.

    Each train source is read (:func:`load_rows`), cut to its first ``cfg.max_samples`` rows
    (per source; all when unset) and tokenised on its own in its own format; the sources are
    then mixed by weight (:func:`peftcli.sources.mix`, seeded with ``seed``). Eval rows come
    from ``cfg.eval`` (every eval source, tokenised apart and scored together), or from a seeded
    random ``cfg.eval_split`` fraction of each train source's rows (at least one row each side;
    both keep file order), or there are none. ``tokenizer`` gets ``cfg.chat_template``
    (:func:`peftcli.tokens.use_chat_template`); chat and sharegpt rows get ``cfg.system_prompt``
    (:func:`add_system_prompt`); text rows are split into windows overlapping by
    ``cfg.text_overlap`` tokens.

    Raises:
        UserError: from :func:`load_rows` / :func:`tokenize_rows` /
            :func:`peftcli.tokens.use_chat_template`; an ``eval_split`` of fewer than two rows.
            (``packing: true`` packs the tokenised train examples later: :func:`peftcli.packing.pack`.)
    """
    tokens.use_chat_template(tokenizer, cfg.chat_template)
    tokenize = dict(tokenizer=tokenizer, max_seq_len=cfg.max_seq_len, train_on_prompt=cfg.train_on_prompt,
                    text_overlap=cfg.text_overlap)
    train_parts, train_stats, eval_parts = [], [], []  # one entry per source
    for key, source in sources.keyed(cfg.train, "data.train"):
        rows = add_system_prompt(load_rows(source, key)[: cfg.max_samples], source.format, cfg.system_prompt)
        if cfg.eval_split is not None:
            rows, held = _split(rows, cfg.eval_split, seed, source.path)
            eval_parts.append((held, source.format, f"{source.path} (eval_split)"))
        examples, stats = tokenize_rows(rows, source.format, name=source.path, **tokenize)
        train_parts.append(examples)
        train_stats.append(stats)
    for key, source in sources.keyed(cfg.eval, "data.eval"):
        eval_parts.append((add_system_prompt(load_rows(source, key), source.format, cfg.system_prompt),
                           source.format, source.path))
    eval_examples, eval_stats = [], []
    for rows, fmt, name in eval_parts:
        examples, stats = tokenize_rows(rows, fmt, name=name, **tokenize)
        eval_examples += examples
        eval_stats.append(stats)
    weights = [s.weight for s in cfg.train_sources]
    mixing = sources.mix_lines([s.path for s in cfg.train_sources], [len(part) for part in train_parts], weights)
    eval_format = cfg.eval_sources[0].format if cfg.eval_sources else cfg.train_format  # one format (recipe check)
    return Datasets(train=sources.mix(train_parts, weights, seed), eval=eval_examples,
                    eval_rows=[r for rows, _, _ in eval_parts for r in rows], eval_format=eval_format,
                    train_stats=_total(train_stats), eval_stats=_total(eval_stats) if eval_stats else None,
                    mixing=mixing)


def _total(stats: list[DataStats]) -> DataStats:
    """Several sources' counts as one (:meth:`DataStats.__add__`); one source's unchanged."""
    return functools.reduce(operator.add, stats)


def _split(rows: list[dict], fraction: float, seed: int, name: str) -> tuple[list[dict], list[dict]]:
    """(train, eval): ``round(fraction * len)`` rows (at least 1, at most len - 1) drawn with a
    ``torch.Generator`` seeded with ``seed``; both parts keep file order.

    Raises:
        UserError: fewer than two rows to split.
    """
    if len(rows) < 2:
        raise UserError(f"{name}: data.eval_split needs at least 2 rows, got {len(rows)}")
    n_eval = min(max(round(fraction * len(rows)), 1), len(rows) - 1)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_eval])
    return ([r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held])
