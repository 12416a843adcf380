"""Held-out metrics: loss per supervised token, perplexity, greedy exact match and (with labels)
classification accuracy, base vs adapted."""

from __future__ import annotations

import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from peftcli import artifacts, data, models, prepare, tokens
from peftcli.errors import UserError
from peftcli.phases import SILENT, Phases
from peftcli.recipe import DataSource, Recipe, load_recipe
from peftcli.rundir import RunDir


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy (``temperature`` 0, the default) or sampled from the
    softmax of the logits divided by ``temperature``, kept to the smallest set of tokens whose
    probabilities add up to ``top_p`` (nucleus sampling, Holtzman et al. 2020, "The Curious Case
    of Neural Text Degeneration", section 3.1). ``seed`` seeds the draw: the same seed, prompt and
    model give the same tokens (None: a fresh seed each time).

    Raises (:meth:`check`):
        UserError: ``temperature`` < 0, ``top_p`` outside (0, 1], or ``top_p`` with greedy decoding.
    """

    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None

    def check(self) -> Sampling:
        if not self.temperature >= 0:  # also catches nan
            raise UserError(f"--temperature: must be 0 (greedy) or more, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UserError(f"--top-p: must be in (0, 1], got {self.top_p}")
        if self.top_p is not None and self.temperature == 0:
            raise UserError("--top-p: only with sampling; give --temperature above 0 (0 is greedy)")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


def prompt_token_ids(tokenizer, prompt: str | list[int], special: tokens.SpecialTokens) -> list[int]:
    """The ids generation starts from: ``prompt`` itself when it is ids (e.g.
    :func:`peftcli.data.prompt_ids`), else its text with the tokenizer's BOS once and no EOS
    (:func:`peftcli.tokens.encode_start`)."""
    return prompt if isinstance(prompt, list) else tokens.encode_start(tokenizer, prompt, special)


@torch.no_grad()
def generate_ids(model: nn.Module, tokenizer, prompts: list[str | list[int]], max_new_tokens: int,
                 use_cache: bool = True, sampling: Sampling = GREEDY, streamer=None) -> list[list[int]]:
    """New token ids after each of ``prompts`` (a left-padded batch), each cut before its first
    stop id: every stop id of :func:`peftcli.tokens.special_tokens` — EOS, the chat template's
    end-of-turn token and the model's generation-config EOS ids (CASES C17).

    Prompts are as :func:`prompt_token_ids` takes them. ``sampling`` picks greedy or sampled
    decoding (transformers' ``generate``: ``do_sample``, ``temperature``, ``top_p``; a sampled
    call with a seed runs under a forked RNG, so it neither reads nor moves the global one).
    ``streamer`` (one prompt only) gets the tokens as they are generated, e.g. a
    ``transformers.TextStreamer``.
    """
    special = tokens.special_tokens(tokenizer, getattr(model, "generation_config", None))
    ids = [prompt_token_ids(tokenizer, p, special) for p in prompts]
    width = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])  # (B, T) left-padded
    attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    device = next(model.parameters()).device
    draw = ({"do_sample": False, "temperature": None, "top_p": None} if sampling.greedy else
            {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p or 1.0})
    with _seeded(sampling.seed, device):
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=list(special.stop_ids) or None,
                             use_cache=use_cache, top_k=None, streamer=streamer, **draw)
    return [_until_stop(row[width:].tolist(), special.stop_ids) for row in out]


def generate(model: nn.Module, tokenizer, prompts: list[str | list[int]], max_new_tokens: int,
             use_cache: bool = True, sampling: Sampling = GREEDY) -> list[str]:
    """The continuations of :func:`generate_ids` (greedy by default), decoded without special
    tokens."""
    return [tokenizer.decode(x, skip_special_tokens=True)
            for x in generate_ids(model, tokenizer, prompts, max_new_tokens, use_cache, sampling)]


def answer_text(tokenizer, ids: list[int], stop_ids: tuple[int, ...]) -> str:
    """Generated ``ids`` (e.g. a reply stopped half-way) as text: up to (without) the first stop
    id, special tokens dropped."""
    return tokenizer.decode(_until_stop(ids, stop_ids), skip_special_tokens=True)


@contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Within: torch's RNG (the CPU's, and ``device``'s when it is a GPU) starts from ``seed``;
    after: it is as before. No seed: nothing changes."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _until_stop(ids: list[int], stop_ids: tuple[int, ...]) -> list[int]:
    """``ids`` up to (without) the first stop id."""
    return next((ids[:i] for i, t in enumerate(ids) if t in stop_ids), ids)


GENERATE_TOKENS, GENERATE_ROWS = 4096, 64  # a generation batch's budget: rows x (prompt + new tokens), and its rows


def generation_batch_size(prompt_lengths: list[int], max_new_tokens: int) -> int:
    """Rows per batch of greedy scoring: as many as fit :data:`GENERATE_TOKENS` (the longest
    prompt plus the new tokens, per row), between 1 and :data:`GENERATE_ROWS`. On a CPU a
    decoding step's fixed cost is shared by the batch: the embedded model scored its 100 short
    held-out prompts 1.6x as fast in one batch as in batches of 16 (measured, one thread)."""
    return max(1, min(GENERATE_ROWS, GENERATE_TOKENS // (max(prompt_lengths) + max_new_tokens)))


def exact_match(model: nn.Module, tokenizer, rows: list[dict], fmt: str, batch_size: int | None = None,
                phases: Phases = SILENT, name: str = "") -> dict:
    """Share of rows with a reference whose greedy answer equals it (both stripped); progress as
    the phase ``"{name} exact match"`` of ``phases``. ``batch_size``: rows per generation batch
    (default :func:`generation_batch_size` for these prompts).

    Returns {"exact_match": fraction in [0, 1] or None, "n_references": count, "samples": first 3
    (prompt, reference, answer)}.
    """
    special = tokens.special_tokens(tokenizer)
    pairs = [(data.prompt_ids(r, fmt, tokenizer, special), ref) for r in rows if (ref := data.reference(r, fmt)) is not None]
    if not pairs:
        return {"exact_match": None, "n_references": 0, "samples": []}
    hits, samples = 0, []
    if batch_size is None:
        longest_ref = max(len(tokenizer(ref, add_special_tokens=False).input_ids) for _, ref in pairs)
        batch_size = generation_batch_size([len(p) for p, _ in pairs], min(longest_ref + 8, 256))
    with phases.phase(f"{name} exact match".strip(), len(pairs), "rows") as advance:
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            longest = max(len(tokenizer(ref, add_special_tokens=False).input_ids) for _, ref in chunk)
            answers = generate(model, tokenizer, [p for p, _ in chunk], max_new_tokens=min(longest + 8, 256))
            for (_, ref), ans in zip(chunk, answers):
                hits += ans.strip() == ref.strip()
                if len(samples) < 3:
                    samples.append({"reference": ref, "answer": ans.strip()})
            advance(len(chunk))
    return {"exact_match": hits / len(pairs), "n_references": len(pairs), "samples": samples}


@torch.no_grad()
def answer_logprobs(model: nn.Module, examples: list[dict], pad_id: int, micro_batch_size: int = 16,
                    advance=None) -> list[float]:
    """Log-probability (nats, summed) of each example's supervised tokens given the tokens before them.

    Args:
        examples: tokenised rows (``input_ids``, ``labels``; -100 where not scored).
        advance: told each micro-batch's example count as it is done (a progress bar), when given.
    Returns:
        one float per example, in order.
    """
    body, head = models.decoder_body(model), model.get_output_embeddings()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(examples), micro_batch_size):
        batch = {k: v.to(device) for k, v in data.collate(examples[i:i + micro_batch_size], pad_id).items()}
        hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
        targets = batch["labels"][:, 1:]
        mask = targets != data.IGNORE_INDEX  # (B, T-1)
        logp = -F.cross_entropy(head(hidden[:, :-1][mask]).float(), targets[mask], reduction="none")
        sums = torch.zeros(len(targets), dtype=torch.float64, device=device).index_add_(0, mask.nonzero()[:, 0], logp.double())
        out += sums.tolist()
        if advance is not None:
            advance(len(targets))
    return out


def _normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def match_label(answer: str, labels: list[str]) -> str | None:
    """The label a free-text answer gives: the one label its normalised text (lower case,
    punctuation dropped) starts with; None when no label or several match."""
    text = _normalise(answer)
    hits = [label for label in labels if text == _normalise(label) or text.startswith(_normalise(label) + " ")]
    return hits[0] if len(hits) == 1 else None


def classify(model: nn.Module, tokenizer, rows: list[dict], fmt: str, labels: list[str], max_seq_len: int = data.DEFAULT_MAX_SEQ_LEN,
             batch_size: int = 16, phases: Phases = SILENT, name: str = "") -> dict:
    """Label accuracy of a classifier-by-generation, measured two ways on rows whose reference
    answer is one of ``labels``:

    - ``label_accuracy``: the label whose tokens (answer + EOS, tokenised as in training) have
      the highest summed log-probability after the prompt — no generation, no parsing;
    - ``generation_accuracy``: the greedy answer mapped to a label by :func:`match_label`;
      answers that name no label (``unmatched``) count as wrong.

    Progress: the phases ``"{name} label likelihood"`` and ``"{name} label answers"`` of ``phases``.

    Raises:
        UserError: a row's reference is not one of the labels; fewer than 2 labels.
    """
    if len(labels) < 2:
        raise UserError(f"--labels: give at least 2 labels, got {labels}")
    wanted = {_normalise(label): label for label in labels}
    refs = []
    for n, row in enumerate(rows, start=1):
        ref = _normalise(data.reference(row, fmt) or "")
        if ref not in wanted:
            raise UserError(f"eval row {n}: answer {data.reference(row, fmt)!r} is not one of the labels {labels}")
        refs.append(wanted[ref])
    special = tokens.special_tokens(tokenizer)
    examples = [data.tokenize_row(data.with_answer(row, fmt, label), fmt, tokenizer, max_seq_len, False, special)
                for row in rows for label in labels]
    if any(e is None for e in examples):
        raise UserError(f"eval rows: a prompt is longer than max_seq_len {max_seq_len}")
    with phases.phase(f"{name} label likelihood".strip(), len(examples), "examples") as advance:
        logprobs = answer_logprobs(model, examples, tokenizer.pad_token_id, batch_size, advance)
    scores = torch.tensor(logprobs).view(len(rows), len(labels))
    by_likelihood = [labels[i] for i in scores.argmax(1).tolist()]
    longest = max(len(tokenizer(label, add_special_tokens=False).input_ids) for label in labels)
    prompts = [data.prompt_ids(row, fmt, tokenizer, special) for row in rows]
    answers = []
    with phases.phase(f"{name} label answers".strip(), len(prompts), "rows") as advance:
        for i in range(0, len(prompts), batch_size):
            answers += generate(model, tokenizer, prompts[i:i + batch_size], max_new_tokens=longest + 4)
            advance(len(prompts[i:i + batch_size]))
    by_generation = [match_label(a, labels) for a in answers]
    n = len(rows)
    return {"labels": labels, "n_labelled": n,
            "label_accuracy": sum(p == r for p, r in zip(by_likelihood, refs)) / n,
            "generation_accuracy": sum(p == r for p, r in zip(by_generation, refs)) / n,
            "unmatched": sum(p is None for p in by_generation),
            "predicted": {label: by_likelihood.count(label) for label in labels}}


def score(model: nn.Module, tokenizer, examples: list[dict], rows: list[dict], fmt: str, micro_batch_size: int = 8,
          labels: list[str] | None = None, max_seq_len: int = data.DEFAULT_MAX_SEQ_LEN, generate_answers: bool = True,
          phases: Phases = SILENT, name: str = "", recipe: Recipe | None = None) -> dict:
    """Loss (nats per supervised token), perplexity and exact match of one model (float32, eval mode),
    each a phase of ``phases`` named after the model (``name``: "base", "adapted"). On preference
    pairs these score the chosen answers, and ``"preference"`` holds the pairs' metrics
    (:func:`preference_scores`)."""
    from peftcli.guard import choose_loss_path
    from peftcli.loss import eval_loss, make_collate

    model.eval()
    result = {"loss": None, "perplexity": None, "supervised_tokens": 0}
    if examples:
        # the fast loss only where it equals the model's own on these rows (peftcli.guard)
        path = choose_loss_path(model, examples, tokenizer.pad_token_id, padding_free=False, gradients=False)
        with phases.phase(f"{name} loss".strip(), len(examples), "examples") as advance:
            out = eval_loss(model, examples, make_collate(False, tokenizer.pad_token_id), micro_batch_size, nullcontext,
                            path.loss_sum, advance)
        result.update(loss=out["eval_loss"], perplexity=out["eval_ppl"], supervised_tokens=out["eval_tokens"],
                      loss_path=path.as_json(), loss_path_line=path.describe())
    if fmt == data.PREFERENCE and examples:
        result["preference"] = preference_scores(model, tokenizer, examples, recipe, micro_batch_size, phases, name)
    if generate_answers:
        result.update(exact_match(model, tokenizer, rows, fmt, phases=phases, name=name))
    else:
        result.update(exact_match=None, n_references=0, samples=[])
    if labels:
        result["classification"] = classify(model, tokenizer, rows, fmt, labels, max_seq_len, phases=phases, name=name)
    return result


def preference_scores(model: nn.Module, tokenizer, examples: list[dict], recipe: Recipe | None, micro_batch_size: int = 8,
                      phases: Phases = SILENT, name: str = "") -> dict:
    """Held-out preference metrics of one model on pair examples
    (:func:`peftcli.preference.eval_preference`, the run's objective and its beta / orpo_lambda;
    DPO where the recipe trained no preference objective): ``eval_logp_accuracy`` (the fraction
    of pairs whose chosen answer the model finds more likely than the rejected one: the number to
    compare base and adapted by), ``eval_accuracy`` (chosen reward above rejected; a base's DPO
    rewards are 0), ``eval_loss``, ``eval_margin``, ``eval_pairs``."""
    from peftcli.preference import PreferenceLoss, collate_pairs, eval_preference

    t = recipe.train if recipe is not None else None
    objective = t.objective if t is not None and t.objective != "sft" else "dpo"
    loss_fn = PreferenceLoss(model, objective, t.beta if t else 0.1, t.orpo_lambda if t else 0.1)
    collate = lambda chunk: collate_pairs(chunk, tokenizer.pad_token_id)  # noqa: E731
    with phases.phase(f"{name} preference".strip(), len(examples), "pairs") as advance:
        return eval_preference(loss_fn, examples, collate, micro_batch_size, nullcontext, advance)


def _eval_data(recipe: Recipe | None, data_path: str | None, fmt: str | None, tokenizer, max_samples: int | None,
               max_seq_len: int, system_prompt: str | None):
    """(examples, rows, format) from --data, else from the recipe's eval file / eval split."""
    if data_path:
        source = DataSource(path=data_path, format=fmt or "alpaca")
        rows = data.add_system_prompt(data.load_rows(source, "--data")[:max_samples], source.format, system_prompt)
        examples, _ = data.tokenize_rows(rows, source.format, tokenizer, max_seq_len, False, data_path,
                                         text_overlap=recipe.data.text_overlap if recipe else 0)
        return examples, rows, source.format
    if recipe is None:
        raise UserError("no eval data: pass --data PATH [--format F]")
    if recipe.data.eval is None and recipe.data.eval_split is None:
        raise UserError("the recipe has no data.eval or data.eval_split: pass --data PATH [--format F]")
    ds = data.build(recipe.data, tokenizer, recipe.train.seed)
    rows = ds.eval_rows[:max_samples] if max_samples else ds.eval_rows
    examples = ds.eval[:max_samples] if max_samples else ds.eval
    return examples, rows, ds.eval_format


def evaluate(target: str, data_path: str | None = None, fmt: str | None = None, max_samples: int | None = None,
             labels: list[str] | None = None, generate_answers: bool = True, score_base: bool = True,
             phases: Phases = SILENT, say=None) -> dict:
    """Score the base model and the adapted one on held-out data.

    ``target`` is a run dir, an adapter dir, or a recipe (whose ``output.dir`` holds the run;
    with no adapter there yet, only the base is scored). The setup path's order: the adapter's
    files, the tokenizer and the eval data are read before any model loads, so a bad file is
    reported at once; the base is scored and freed before the adapted model loads.

    With ``labels`` (e.g. ["negative", "positive"]) each model is also scored as a classifier
    (:func:`classify`: label likelihood and greedy answer), under ``"classification"``.
    ``generate_answers=False`` skips the greedy exact match (loss only: fast on long answers);
    ``score_base=False`` scores only the adapted model (``"base"`` is None). ``phases`` shows the
    progress of each model's loss, exact match, ... (:class:`peftcli.phases.Phases`); ``say`` (a
    callable taking one line) gets the precision both models load in, and why, before they load
    (:func:`peftcli.artifacts.load_precision`: ``model.dtype: auto`` resolved for this machine).

    Returns {"base": metrics, "adapted": metrics or None, "data": str, "rows": n, "precision":
    {"dtype", "reason", "warning"}}.
    Raises:
        UserError: nothing at ``target``, no eval data, adapter/base mismatch, a bad ``PEFTCLI_CPU_BF16``.
    """
    recipe, files = _eval_target(target)
    model_cfg = files.model_config if files is not None else recipe.model
    chosen = artifacts.load_precision(model_cfg, recipe)
    # the setup path's order (peftcli.prepare): the tokenizer, then the data, then the models
    _, tokenizer = prepare.load_tokenizer(model_cfg)
    system_prompt = data.use_recipe_chat(tokenizer, recipe)  # the template the run trained with
    max_len = recipe.data.max_seq_len if recipe else data.DEFAULT_MAX_SEQ_LEN
    examples, rows, eval_fmt = _eval_data(recipe, data_path, fmt, tokenizer, max_samples, max_len, system_prompt)
    if not rows:
        raise UserError("eval data is empty")
    result = {"data": data_path or "recipe eval set", "rows": len(rows), "format": eval_fmt, "base": None, "adapted": None,
              "precision": {k: v for k, v in chosen.as_json().items() if k != "mixed_precision"}}  # eval does not autocast
    if say is not None:
        for line in chosen.lines(autocast=False):
            say(line)
    if score_base or files is None:
        base, tokenizer, _ = models.load_base(**{**model_cfg.model_dump(), "dtype": chosen.dtype})
        data.use_recipe_chat(tokenizer, recipe)
        result["base"] = score(base, tokenizer, examples, rows, eval_fmt, labels=labels, max_seq_len=max_len,
                               generate_answers=generate_answers, phases=phases, name="base", recipe=recipe)
        del base
    if files is not None:
        loaded = artifacts.load_adapted(files)
        data.use_recipe_chat(loaded.tokenizer, recipe)
        result["adapted"] = score(loaded.model, loaded.tokenizer, examples, rows, eval_fmt, labels=labels,
                                  max_seq_len=max_len, generate_answers=generate_answers, phases=phases, name="adapted",
                                  recipe=recipe)
        result["adapter"] = str(loaded.adapter_dir)
    return result


def _eval_target(target: str) -> tuple[Recipe | None, artifacts.AdapterFiles | None]:
    """The recipe and the adapter's files ``peft eval TARGET`` scores: a recipe (its run dir's
    adapter when there is one yet), a run dir or an adapter dir.

    Raises:
        UserError: nothing at ``target``, or what :func:`peftcli.artifacts.read_adapter` raises.
    """
    path = Path(target)
    if path.is_file():
        recipe = load_recipe(path)
        run = RunDir(recipe.output.dir)
        has_adapter = (run.adapter / artifacts.CONFIG_NAME).is_file()
        return recipe, artifacts.read_adapter(run.path) if has_adapter else None
    if path.is_dir():
        files = artifacts.read_adapter(path)
        return files.recipe, files
    raise UserError(f"{target}: no such run dir, adapter dir or recipe")
