"""Data: load rows from a file, render prompts, tokenise with label masks, batch and collate.

The flow, top to bottom:

    load_rows(source)        JSON / JSONL / CSV / Parquet -> list of row dicts, fields checked
    render_prompt, reference the text shown before the answer, and the answer itself
    prompt_ids               the prompt's token ids, as generation gets them
    tokenize_row(s)          -> {"input_ids", "labels"}; labels are -100 where nothing is learned
    build(cfg, tokenizer)    train + eval examples for a recipe
    batches, collate         seeded micro-batch order; right-padded tensors

Labels follow the Hugging Face convention: ``labels[i]`` is the target for token ``i`` (not
shifted here; the loss shifts). A row that leaves no supervised token (an empty answer, or a
prompt that fills ``max_seq_len``) is dropped and counted in :class:`DataStats`.

Special tokens come from :func:`peftcli.tokens.special_tokens`: a sequence holds the tokenizer's
BOS once (for chat rows: exactly what the template renders, as ``apply_chat_template(tokenize=True)``),
a supervised answer ends with EOS (chat: with the template's end-of-turn token), and no EOS sits
between prompt and answer even when the tokenizer appends one to every text (CASES C17, C18).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import inspect
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from peftcli import parallel, token_cache, tokens
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
    "text": ("text",),
}
TEXT_FIELDS = ("instruction", "input", "output", "prompt", "completion", "text")

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


def load_rows(source: DataSource) -> list[dict]:
    """Read every row of ``source.path`` and check it has the fields ``source.format`` needs.

    The file type comes from the extension: ``.jsonl`` (one object per line), ``.json`` (a list
    of objects, or JSON lines), ``.csv`` (header row; every cell read as text, an empty cell is
    ``""``), ``.parquet``. JSON is parsed with the ``json`` module so errors name the line;
    CSV and Parquet are read with ``datasets`` (in memory, cache in a temporary dir, no network).
    Text fields that hold a number are turned into text (``15`` -> ``"15"``); ``null`` -> ``""``.

    Returns:
        the rows, in file order.

    Raises:
        UserError: missing file ("FILE: data file not found"), unknown extension, bytes that
            are not UTF-8, malformed JSON ("FILE:LINE: malformed JSON: ..."), no rows
            ("FILE: no rows"), or a row without a needed field
            ("FILE:LINE (row N): missing field 'output' for format alpaca").
    """
    path = Path(source.path)
    if not path.is_file():
        raise UserError(f"{path}: data file not found")
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        rows, lines = _read_json(path)
    elif suffix == ".csv":
        rows, lines = _read_csv(path), None
    elif suffix == ".parquet":
        rows, lines = _read_with_datasets("parquet", path), None
    else:
        raise UserError(f"{path}: unknown data file type {suffix or '(none)'!r} (use .jsonl, .json, .csv or .parquet)")
    if not rows:
        raise UserError(f"{path}: no rows")
    for n, row in enumerate(rows, start=1):
        where = f"{path}:{lines[n - 1]} (row {n})" if lines else f"{path} (row {n})"
        _check_row(row, source.format, where)
    return rows


def _decode(path: Path, data: bytes) -> str:
    """UTF-8 text of a file (a leading byte-order mark is dropped).

    Raises:
        UserError: naming the file and the line of the first undecodable byte.
    """
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x}); re-save the file as UTF-8") from None


def _read_json(path: Path) -> tuple[list[dict], list[int]]:
    """Rows and their line numbers from a JSON list (``[...]``) or JSON lines.

    Raises:
        UserError: "FILE:LINE: malformed JSON: ..." or "FILE:LINE: expected a JSON object".
    """
    text = _decode(path, path.read_bytes())
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        # a JSON list gives no per-row line; rows are named by position only
        for n, item in enumerate(items, start=1):
            if not isinstance(item, dict):
                raise UserError(f"{path} (row {n}): expected a JSON object, got {type(item).__name__}")
        return items, []
    rows, lines = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(item, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(item).__name__}")
        rows.append(item)
        lines.append(lineno)
    return rows, lines


def _read_csv(path: Path) -> list[dict]:
    """CSV rows with every column read as text (so "15" stays "15", an empty cell is "")."""
    header = next(csv.reader(_decode(path, path.read_bytes()).splitlines()), None)
    if not header:
        return []
    import datasets

    features = datasets.Features({name: datasets.Value("string") for name in header})
    return _read_with_datasets("csv", path, features=features, keep_default_na=False)


def _read_with_datasets(builder: str, path: Path, **kwargs) -> list[dict]:
    """Rows of a CSV/Parquet file through ``datasets.load_dataset``, kept in memory; the Arrow
    cache goes to a temporary dir that is removed afterwards (nothing left in ~/.cache)."""
    import datasets

    with tempfile.TemporaryDirectory(prefix="peftcli-data-") as cache, _quiet_datasets():
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache,
                                       keep_in_memory=True, **kwargs)
        except Exception as e:  # pandas / pyarrow parse errors come in many types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{path}: cannot read {builder.upper()} file ({first})") from None
        return ds.to_list()


@contextlib.contextmanager
def _quiet_datasets():
    """Hide ``datasets``' progress bars while reading a small local file."""
    from datasets.utils import logging as ds_logging

    was_on = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            ds_logging.enable_progress_bar()


def _check_row(row: dict, fmt: str, where: str) -> None:
    """Check (and normalise in place) the fields ``fmt`` needs: text fields become ``str``.

    Raises:
        UserError: "WHERE: missing field 'F' for format FMT", or a field of the wrong kind.
    """
    for field in REQUIRED_FIELDS[fmt]:
        if field not in row:
            raise UserError(f"{where}: missing field {field!r} for format {fmt}")
    for field in TEXT_FIELDS:
        if field in row:
            row[field] = _as_text(row[field], f"{where}: field {field!r}")
    if fmt == "chat":
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                raise UserError(f"{where}: messages[{i}] needs a 'role' and a 'content'")
            m["content"] = _as_text(m["content"], f"{where}: messages[{i}].content")


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
    when the row's input is not empty; completion: ``row["prompt"]``; chat: the tokenizer's
    chat template over the messages before the last assistant message, plus the generation
    prompt; text: ``""``.
    """
    if fmt == "alpaca":
        template = ALPACA_WITH_INPUT if (row.get("input") or "").strip() else ALPACA_NO_INPUT
        return template.format(instruction=row["instruction"], input=row.get("input") or "")
    if fmt == "completion":
        return row["prompt"]
    if fmt == "chat":
        last = _assistant_turns(row["messages"])[-1:] or [len(row["messages"])]
        return render_chat(tokenizer, row["messages"][: last[0]], add_generation_prompt=True)
    if fmt == "text":
        return ""
    raise ValueError(f"unknown data format {fmt!r}")


def prompt_ids(row: dict, fmt: str, tokenizer, special: SpecialTokens | None = None) -> list[int]:
    """Token ids generation starts from, exactly the prompt part of the training ids.

    chat: the rendered template tokenized without additions (= ``apply_chat_template(...,
    add_generation_prompt=True, tokenize=True)``; the template places any BOS); other formats:
    :func:`render_prompt` with the tokenizer's BOS once and never its appended EOS.
    """
    text = render_prompt(row, fmt, tokenizer)
    if fmt == "chat":
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
    """``rows`` with ``system_prompt`` as the first message of every chat conversation that has no
    system message (rows that have one keep theirs); other formats and None: unchanged."""
    if system_prompt is None or fmt != "chat":
        return rows
    system = {"role": "system", "content": system_prompt}
    return [r if any(m["role"] == "system" for m in r["messages"]) else {**r, "messages": [system, *r["messages"]]}
            for r in rows]


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
    ids read it too). Then: ``raw``, a ``text``-format run or no recipe (an adapter HF peft
    saved) -> ``prompt`` as is (text); alpaca / completion -> the prompt ids of a row with
    ``prompt`` as its instruction / prompt; chat -> the ids of a user turn, after the system
    message ``system`` (default: the run's data.system_prompt). Ids are :func:`prompt_ids`.

    Raises:
        UserError: ``system`` given for a run that is not a chat run, or with ``raw``.
    """
    run_system = use_recipe_chat(tokenizer, recipe)
    fmt = recipe.data.train.format if recipe else "text"
    if system is not None and (raw or fmt != "chat"):
        raise UserError(f"--system: only a chat run's prompt has a system message (this one: {'--raw' if raw else fmt})")
    if raw or fmt == "text":
        return prompt
    rows = add_system_prompt([_prompt_row(prompt, fmt)], fmt, system if system is not None else run_system)
    return prompt_ids(rows[0], fmt, tokenizer)


def _prompt_row(prompt: str, fmt: str) -> dict:
    """A row of format ``fmt`` (alpaca, completion or chat) asking ``prompt``, with an empty answer."""
    return {"alpaca": {"instruction": prompt, "input": "", "output": ""},
            "completion": {"prompt": prompt, "completion": ""},
            "chat": {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]},
            }[fmt]


def reference(row: dict, fmt: str) -> str | None:
    """The expected answer for exact-match scoring: alpaca ``output``, completion
    ``completion``, chat the last assistant message's content; ``None`` for text (and for a
    chat without an assistant message)."""
    if fmt == "alpaca":
        return row["output"]
    if fmt == "completion":
        return row["completion"]
    if fmt == "chat":
        turns = _assistant_turns(row["messages"])
        return row["messages"][turns[-1]]["content"] if turns else None
    return None


def with_answer(row: dict, fmt: str, answer: str) -> dict:
    """A copy of ``row`` whose expected answer (see :func:`reference`) is ``answer``: alpaca
    ``output``, completion ``completion``, chat the last assistant message (appended when the
    conversation has none).

    Raises:
        ValueError: ``text`` rows have no separate answer.
    """
    if fmt == "alpaca":
        return {**row, "output": answer}
    if fmt == "completion":
        return {**row, "completion": answer}
    if fmt == "chat":
        messages = [dict(m) for m in row["messages"]]
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


def _answer_is_empty(row: dict, fmt: str) -> bool:
    """True when the row has no answer text to learn (blank answer / text / assistant turns)."""
    if fmt == "text":
        return not row["text"].strip()
    if fmt == "chat":
        return not any(row["messages"][i]["content"].strip() for i in _assistant_turns(row["messages"]))
    return not reference(row, fmt).strip()


# ---------------------------------------------------------------------------------------------
# tokenisation and label masks


def tokenize_row(row: dict, fmt: str, tokenizer, max_seq_len: int, train_on_prompt: bool,
                 special: SpecialTokens | None = None) -> dict | None:
    """Token ids and labels of one row.

    alpaca / completion: :func:`prompt_ids` (BOS once, no EOS) ``+ ids(answer) + [EOS]``; prompt
    and answer are tokenised apart so the boundary is exact (the same split generation sees),
    and the EOS is supervised so the model learns to stop. text: BOS once, every token + EOS
    supervised. chat: the chat template over the whole conversation, tokenised once as
    ``apply_chat_template(tokenize=True)`` does, labels cut at the assistant replies; only
    assistant content and the end-of-turn token right after it (``<|im_end|>``,
    ``<end_of_turn>``, ``<|eot_id|>``, ...) are supervised; system/user turns and the
    ``<|im_start|>assistant\\n`` header are not. A template whose turns end in no special token
    gets an EOS after each reply, so the model still learns to stop. With ``train_on_prompt``
    everything is supervised.

    ``special``: :func:`peftcli.tokens.special_tokens` of ``tokenizer`` (computed when None).

    Truncated to ``max_seq_len`` tokens from the right.

    Returns:
        ``{"input_ids": list[int], "labels": list[int]}`` (same length, labels unshifted,
        ``-100`` where not supervised), or ``None`` when the answer is blank or no supervised
        token survives truncation.
    """
    return _tokenize(row, fmt, tokenizer, max_seq_len, train_on_prompt, special or tokens.special_tokens(tokenizer))[0]


def _tokenize(row: dict, fmt: str, tokenizer, max_seq_len: int, train_on_prompt: bool,
              special: SpecialTokens) -> tuple[dict | None, str]:
    """(example or None, what happened): "ok", "truncated" (kept, cut to ``max_seq_len``),
    "empty" (blank answer) or "too_long" (no supervised token within ``max_seq_len``)."""
    if _answer_is_empty(row, fmt):
        return None, "empty"
    input_ids, labels = _encode(row, fmt, tokenizer, train_on_prompt, special)
    if all(label == IGNORE_INDEX for label in labels[:max_seq_len]):
        return None, "too_long"
    example = {"input_ids": input_ids[:max_seq_len], "labels": labels[:max_seq_len]}
    return example, "truncated" if len(input_ids) > max_seq_len else "ok"


def _encode(row: dict, fmt: str, tokenizer, train_on_prompt: bool, special: SpecialTokens) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of the whole row, before truncation."""
    input_ids, labels = [], []
    for ids, supervised in _segments(row, fmt, tokenizer, special):
        input_ids += ids
        labels += ids if (supervised or train_on_prompt) else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def _segments(row: dict, fmt: str, tokenizer, special: SpecialTokens) -> list[tuple[list[int], bool]]:
    """The row as consecutive token pieces, each marked supervised or not."""
    eos = [special.eos_id] if special.eos_id is not None else []
    if fmt == "text":
        return [(tokens.encode_start(tokenizer, row["text"], special) + eos, True)]
    if fmt == "chat":
        return _chat_segments(row, tokenizer, special)
    return [(prompt_ids(row, fmt, tokenizer, special), False), (_ids(tokenizer, reference(row, fmt)) + eos, True)]


def _ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` alone, without the tokenizer's additions (BOS, EOS)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _chat_segments(row: dict, tokenizer, special: SpecialTokens) -> list[tuple[list[int], bool]]:
    """The conversation's token pieces, each marked assistant reply or not.

    A fast tokenizer tokenises the rendered text once (so the ids are those of
    ``apply_chat_template(tokenize=True)``, whatever the merges across piece boundaries) and a
    token belongs to the piece its first character is in; a slow one tokenises piece by piece.
    Without an end-of-turn token in the template, an EOS follows each reply.
    """
    pieces = _chat_pieces(row, tokenizer)
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


def _chat_pieces(row: dict, tokenizer) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_assistant_reply) pieces.

    Each assistant reply's span is found by rendering growing prefixes of the conversation:
    ``messages[:i]`` with the generation prompt ends where reply ``i`` starts, and
    ``messages[:i+1]`` ends after its end-of-turn marker (trailing whitespace such as ChatML's
    newline is left to the next, unsupervised piece). The template itself adds any BOS.

    Raises:
        UserError: the chat template does not render a conversation as the extension of its
            prefixes (so reply spans cannot be found), or from :func:`render_chat`.
    """
    messages = row["messages"]
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


@dataclass
class DataStats:
    """Counts for the log and summary.json.

    rows: rows read; kept: rows with at least one supervised token; dropped_empty_answer: rows
    whose answer is blank; dropped_truncated: rows whose prompt fills ``max_seq_len`` (nothing
    supervised left); supervised_tokens: labels != -100 over kept rows; truncated: kept rows
    that were cut to ``max_seq_len``.
    """

    rows: int
    kept: int
    dropped_empty_answer: int
    dropped_truncated: int
    supervised_tokens: int
    truncated: int = 0


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
            _say(f"{name}: tokenised {len(rows)} rows (cached for next time)")
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
                  name: str) -> tuple[list[dict], DataStats]:
    """Tokenise every row (see :func:`tokenize_row`), dropping and counting those with nothing
    to learn.

    The result is cached by fingerprint (:func:`cached_by_fingerprint`: a second call on the
    same rows, tokenizer and arguments reads it back); large sets are tokenised across worker
    processes in row order (:func:`peftcli.parallel.map_rows`).

    Returns:
        (examples in row order, stats).

    Raises:
        UserError: "NAME: no row has anything to learn (N rows: X empty answers (rows ...),
            Y prompts longer than max_seq_len M (rows ...))" when no row is kept; "NAME (row N):
            ..." when the chat template cannot render a row.
    """
    examples, status = [], {"ok": [], "truncated": [], "empty": [], "too_long": []}
    special = tokens.special_tokens(tokenizer)
    results = parallel.map_rows(_tokenize, rows, name, (fmt, tokenizer, max_seq_len, train_on_prompt, special), "tokenising")
    for n, (example, what) in enumerate(results, start=1):
        status[what].append(n)
        if example is not None:
            examples.append(example)
    empty, too_long = status["empty"], status["too_long"]
    stats = DataStats(rows=len(rows), kept=len(examples), dropped_empty_answer=len(empty),
                      dropped_truncated=len(too_long), truncated=len(status["truncated"]),
                      supervised_tokens=sum(sum(label != IGNORE_INDEX for label in e["labels"]) for e in examples))
    if not examples:
        raise UserError(f"{name}: no row has anything to learn ({len(rows)} rows: "
                        f"{len(empty)} empty answers{_row_list(empty)}, "
                        f"{len(too_long)} prompts longer than max_seq_len {max_seq_len}{_row_list(too_long)})")
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
    when the recipe has no eval data.
    """

    train: list[dict]
    eval: list[dict]
    eval_rows: list[dict]
    eval_format: str
    train_stats: DataStats
    eval_stats: DataStats | None


def build(cfg: DataConfig, tokenizer, seed: int) -> Datasets:
    """Load and tokenise a recipe's data.

    Train rows are the first ``cfg.max_samples`` rows of ``cfg.train`` (all when unset). Eval
    rows come from ``cfg.eval``, or from a seeded random ``cfg.eval_split`` fraction of those
    train rows (at least one row each side; both keep file order), or there are none.
    ``tokenizer`` gets ``cfg.chat_template`` (:func:`peftcli.tokens.use_chat_template`); chat
    rows get ``cfg.system_prompt`` (:func:`add_system_prompt`).

    Raises:
        UserError: from :func:`load_rows` / :func:`tokenize_rows` /
            :func:`peftcli.tokens.use_chat_template`; an ``eval_split`` of fewer than two rows.
            (``packing: true`` is refused by the recipe schema.)
    """
    tokens.use_chat_template(tokenizer, cfg.chat_template)
    rows = add_system_prompt(load_rows(cfg.train)[: cfg.max_samples], cfg.train.format, cfg.system_prompt)
    eval_rows, eval_format, eval_name = [], cfg.train.format, None
    if cfg.eval is not None:
        eval_rows, eval_format, eval_name = load_rows(cfg.eval), cfg.eval.format, cfg.eval.path
        eval_rows = add_system_prompt(eval_rows, eval_format, cfg.system_prompt)
    elif cfg.eval_split is not None:
        rows, eval_rows = _split(rows, cfg.eval_split, seed, cfg.train.path)
        eval_name = f"{cfg.train.path} (eval_split)"
    tokenize = dict(tokenizer=tokenizer, max_seq_len=cfg.max_seq_len, train_on_prompt=cfg.train_on_prompt)
    train, train_stats = tokenize_rows(rows, cfg.train.format, name=cfg.train.path, **tokenize)
    eval_examples, eval_stats = [], None
    if eval_rows:
        eval_examples, eval_stats = tokenize_rows(eval_rows, eval_format, name=eval_name, **tokenize)
    return Datasets(train=train, eval=eval_examples, eval_rows=eval_rows, eval_format=eval_format,
                    train_stats=train_stats, eval_stats=eval_stats)


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
