"""The ``peft`` command: a thin Typer shell — parse, call, print.

User errors (:class:`peftcli.errors.UserError`) become one line on stderr and exit code 2;
anything else is an internal error (exit 1 with its traceback).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from peftcli.errors import Interrupted, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Parameter-efficient fine-tuning of causal language models from YAML recipes.")
out = Console()
err = Console(stderr=True, soft_wrap=True)  # log lines stay whole when piped


def _version(value: bool):
    if value:
        from peftcli import __version__

        print(f"peft (peftcli) {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version")):
    """Parameter-efficient fine-tuning of causal language models from YAML recipes."""


def _quiet_libraries() -> None:
    """Only errors from the libraries, without importing any of them (a command that never loads
    a model, or fails on its recipe, answers in a fraction of a second): transformers reads
    ``TRANSFORMERS_VERBOSITY`` when it is first imported, and :mod:`peftcli.models` turns its
    progress bars off when it loads a model."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    for name in ("transformers", "bitsandbytes", "accelerate", "datasets", "torch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    transformers = sys.modules.get("transformers")
    if transformers is not None:  # imported already (the CLI called in-process, as the tests do)
        transformers.logging.set_verbosity_error()


def user_errors(fn):
    """Turn a UserError into one line on stderr and exit 2 (an Interrupted into its message and
    128 + signal). Under several processes only the first prints: they all stop the same way."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _quiet_libraries()
        say = os.environ.get("RANK", "0") == "0"
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            if say:
                print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            raise typer.Exit(2) from None
        except Interrupted as e:
            if say:
                print(str(e), file=sys.stderr)
            raise typer.Exit(128 + e.signum) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise typer.Exit(130) from None
        except Exception as e:
            if "LOCAL_RANK" in os.environ and _lost_a_peer(e):
                # another process of the run died (killed, out of memory): the launcher says which, in one line
                raise typer.Exit(1) from None
            raise

    return wrapper


def _lost_a_peer(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed because another process of the run went away
    (gloo: the connection reset or closed by the peer; NCCL: a remote error or a timeout)."""
    name, text = type(e).__name__, str(e)
    return name in ("DistBackendError", "DistNetworkError") or (
        isinstance(e, RuntimeError) and any(s in text for s in ("Connection reset by peer", "Connection closed by peer",
                                                                  "gloo/transport", "NCCL error", "remote process exited")))


@app.command()
@user_errors
def train(
    recipe: Path = typer.Argument(..., help="recipe YAML"),
    set_: List[str] = typer.Option([], "--set", help="override a key: --set train.max_steps=3"),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", help="run dir (default: the recipe's output.dir)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the run dir's latest checkpoint"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier run's checkpoints and adapter in the run dir"),
    skip_corrupt: bool = typer.Option(False, "--skip-corrupt",
                                      help="with --resume: pass over corrupt checkpoints to the newest intact one"),
    smoke: bool = typer.Option(False, "--smoke", help="CI check: a few steps on a few rows, then verify loss and adapter round-trip"),
    num_processes: int = typer.Option(1, "--num-processes", min=1,
                                      help="processes on this machine (started with torch's elastic launcher); "
                                           "train.distributed says how they share the work (ddp or fsdp)"),
    nnodes: int = typer.Option(1, "--nnodes", min=1, help="machines taking part, each running --num-processes"),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="this machine's number, 0 .. --nnodes - 1 (0 writes the run dir)"),
    master_addr: Optional[str] = typer.Option(None, "--master-addr", help="with --nnodes > 1: the address of node 0"),
    master_port: int = typer.Option(29500, "--master-port", help="with --nnodes > 1: a free TCP port on node 0"),
):
    """Train a recipe; writes the run dir (adapter/, metrics.jsonl, summary.json, loss.png)."""
    from peftcli import launch as launcher
    from peftcli import recipe as recipes
    from peftcli import smoke as smoke_check
    from peftcli import sources

    nodes = launcher.Nodes(nnodes, node_rank, master_addr, master_port)
    nodes.check()
    if (num_processes > 1 or nnodes > 1) and "LOCAL_RANK" not in os.environ:
        # a bad recipe or a missing data file fails here, once, not in N processes
        r = recipes.load_recipe(recipe, list(set_), output_dir)
        sources.check_paths(r.data)
        if smoke and r.train.distributed == "fsdp":
            raise UserError("--smoke with train.distributed: fsdp: the smoke checks run the trained model in one "
                            "process; run the smoke check on one process (drop --num-processes / --nnodes)")
        from peftcli import sharding

        sharding.check(r.train.distributed, r.model.quantization, num_processes * nnodes, r.train.objective,
                       r.train.neftune_alpha)
        launcher.check_devices(num_processes)
        raise typer.Exit(launcher.launch(num_processes, nodes))
    r = smoke_check.load_recipe(recipe, set_, output_dir) if smoke else recipes.load_recipe(recipe, set_, output_dir)
    if smoke and resume:
        raise UserError("--smoke and --resume: a smoke run always starts fresh; drop --resume")
    sources.check_paths(r.data)  # before torch is imported: a misspelt path answers at once
    from peftcli.trainer import train as run_training  # torch and transformers: only for a recipe that loads
    # a smoke run replaces the smoke run before it (a CI job's repeat), never a real run
    overwrite = overwrite or (smoke and smoke_check.replaces(r.output.dir))
    result = run_training(r, resume=resume, console=err, overwrite=overwrite, skip_corrupt=skip_corrupt)
    if os.environ.get("RANK", "0") != "0":
        return  # the first process reports
    if smoke:
        report = smoke_check.check(result)
        smoke_check.write_report(result.run_dir, report)
        for line in report.lines:
            err.print(line)
        if not report.ok:
            raise typer.Exit(1)
    out.print(str(result.run_dir))


def _fmt(v, pct=False):
    if v is None:
        return "-"
    return f"{100 * v:.1f}%" if pct else f"{v:.4f}"


@app.command("eval")
@user_errors
def eval_(
    target: str = typer.Argument(..., help="run dir, adapter dir or recipe"),
    data: Optional[str] = typer.Option(None, "--data", help="eval file (default: the recipe's eval set)"),
    fmt: Optional[str] = typer.Option(None, "--format", help="alpaca | completion | chat | sharegpt | text | tokenized | preference"),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", min=1),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    labels: Optional[str] = typer.Option(None, "--labels", help="classification: comma-separated label answers, "
                                                                "e.g. negative,positive (scored by likelihood and by greedy answer)"),
    no_exact_match: bool = typer.Option(False, "--no-exact-match", help="skip greedy generation (loss only; fast on long answers)"),
    no_base: bool = typer.Option(False, "--no-base", help="score only the adapted model (e.g. when the base was scored once already)"),
):
    """Held-out loss, perplexity and exact match (and label accuracy with --labels): base vs adapted.

    Progress goes to stderr: a bar per phase on a terminal, one line per phase otherwise."""
    from peftcli.evaluate import evaluate
    from peftcli.phases import Phases

    label_list = [x.strip() for x in labels.split(",") if x.strip()] if labels else None
    result = evaluate(target, data, fmt, max_samples, label_list, generate_answers=not no_exact_match, score_base=not no_base,
                      phases=Phases(err), say=lambda line: err.print(line, highlight=False, markup=False, soft_wrap=True))
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"{result['rows']} rows of {result['data']} ({result['format']})")
    table.add_column("model")
    pairs = result["format"] == "preference"  # and the preference accuracy: chosen more likely than rejected
    cols = ["loss", "perplexity", "exact match"] + (["label acc. (likelihood)", "label acc. (greedy)"] if label_list else []) \
        + (["pref. acc. (logp)", "pref. acc. (reward)"] if pairs else [])
    for col in cols:
        table.add_column(col, justify="right")
    for name in ("base", "adapted"):
        m = result.get(name)
        if m:
            c = m.get("classification") or {}
            extra = [_fmt(c.get("label_accuracy"), pct=True), _fmt(c.get("generation_accuracy"), pct=True)] if label_list else []
            if pairs:
                pref = m.get("preference") or {}
                extra += [_fmt(pref.get("eval_logp_accuracy"), pct=True), _fmt(pref.get("eval_accuracy"), pct=True)]
            table.add_row(name, _fmt(m["loss"]), _fmt(m["perplexity"]), _fmt(m["exact_match"], pct=True), *extra)
    out.print(table)
    for name in ("base", "adapted"):
        if (result.get(name) or {}).get("loss_path_line"):
            out.print(f"{name}: {result[name]['loss_path_line']}", highlight=False, markup=False)


@app.command()
@user_errors
def merge(
    target: str = typer.Argument(..., help="run dir or adapter dir"),
    output: Path = typer.Option(..., "-o", "--output", help="dir for the merged transformers model"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 (default: the base's)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier peft merge into the -o dir: only "
                                   "the files it wrote (listed in its peft_merge.json); your other files there stay"),
):
    """Fold the adapter into the base weights; writes a transformers model dir.

    The -o dir must be new, empty, or (with --overwrite) one peft merged into before."""
    from peftcli.merge import merge_adapter

    path = merge_adapter(target, output, dtype, log=err.print, overwrite=overwrite)
    out.print(f"merged model written to {path}")


@app.command()
@user_errors
def export(
    target: str = typer.Argument(..., help="run dir or adapter dir"),
    gguf: Path = typer.Option(..., "--gguf", help="the GGUF file to write (for llama.cpp, Ollama, ...)"),
    dtype: str = typer.Option("f16", "--dtype", help="f16 | f32 | q8_0: the matrices' type (norms and biases stay f32)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --gguf file"),
):
    """Fold the adapter into the base and write one GGUF file: weights, tokenizer, chat template.

    Llama-style bases (llama, mistral, qwen2); other families are refused before loading."""
    from peftcli.export import export_gguf

    path = export_gguf(target, gguf, dtype, overwrite=overwrite, log=err.print)
    out.print(f"GGUF written to {path}")


# the options `peft generate` and `peft chat` share
MAX_NEW_TOKENS = typer.Option(64, "--max-new-tokens", min=1, help="the most tokens a reply has")
NO_CACHE = typer.Option(False, "--no-cache", help="recompute the whole sequence each step (no KV cache)")
SYSTEM = typer.Option(None, "--system", help="chat runs: the system message (default: the run's data.system_prompt)")
TEMPERATURE = typer.Option(0.0, "--temperature", help="0: greedy, the default; above 0: sample (higher: more varied)")
TOP_P = typer.Option(None, "--top-p", help="with --temperature: sample from the smallest set of tokens whose "
                                           "probabilities add up to P, in (0, 1]")
SEED = typer.Option(None, "--seed", help="seed of the sampling: the same seed gives the same text (default: a "
                                         "fresh one, printed)")
SHOW_PROMPT = typer.Option(False, "--show-prompt", help="print the exact text the model receives (its special "
                                                        "tokens included) on stderr first")


def _sampling(temperature: float, top_p: float | None, seed: int | None):
    """The checked sampling flags; sampling without --seed gets a fresh seed, said on stderr, so
    the answer can be repeated."""
    import secrets
    from dataclasses import replace

    from peftcli.evaluate import Sampling

    sampling = Sampling(temperature, top_p, seed).check()
    if sampling.greedy or seed is not None:
        return sampling
    seed = secrets.randbelow(2**31)
    err.print(f"sampling with seed {seed} (--seed {seed} repeats it)", highlight=False, markup=False)
    return replace(sampling, seed=seed)


@app.command()
@user_errors
def generate(
    target: str = typer.Argument(..., help="run dir or adapter dir"),
    prompt: str = typer.Argument(...),
    max_new_tokens: int = MAX_NEW_TOKENS,
    raw: bool = typer.Option(False, "--raw", help="send the prompt as is, not in the run's train format"),
    no_cache: bool = NO_CACHE,
    system: Optional[str] = SYSTEM,
    temperature: float = TEMPERATURE,
    top_p: Optional[float] = TOP_P,
    seed: Optional[int] = SEED,
    show_prompt: bool = SHOW_PROMPT,
):
    """Generate with the adapted model: greedy, or sampled with --temperature.

    The prompt is put in the run's training format (alpaca template, the chat template the run
    trained with and its system prompt, ...); a ``text``-format run, or an adapter with no recipe
    (e.g. saved by HF peft), gets it as is. Generation stops at EOS and at the chat template's
    end-of-turn token."""
    if not prompt.strip():
        raise UserError("generate: the prompt is empty")
    sampling = _sampling(temperature, top_p, seed)
    from peftcli import artifacts, data, tokens
    from peftcli.chat import prompt_block
    from peftcli.evaluate import generate as generate_text
    from peftcli.evaluate import prompt_token_ids

    loaded = artifacts.load_adapted(target)
    model, tok = loaded.model, loaded.tokenizer
    text = data.generation_prompt(prompt, loaded.recipe, tok, system=system, raw=raw)
    ids = prompt_token_ids(tok, text, tokens.special_tokens(tok, model.generation_config))
    if show_prompt:
        print(prompt_block(tok, ids), file=sys.stderr, flush=True)
    out.print(generate_text(model, tok, [ids], max_new_tokens, use_cache=not no_cache, sampling=sampling)[0],
              highlight=False, markup=False)


def _read_message() -> str | None:
    """The next line of stdin (None at its end); on a terminal with a prompt and line editing,
    and Ctrl-C there gives an empty line and a hint instead of quitting."""
    if not sys.stdin.isatty():
        return sys.stdin.readline() or None
    try:
        return input(">>> ")
    except EOFError:
        print(file=sys.stderr)
        return None
    except KeyboardInterrupt:
        print("\n(/exit or Ctrl-D quits)", file=sys.stderr)
        return ""


@app.command()
@user_errors
def chat(
    target: str = typer.Argument(..., help="run dir or adapter dir"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, help="the most tokens a reply has"),
    no_cache: bool = NO_CACHE,
    system: Optional[str] = SYSTEM,
    temperature: float = TEMPERATURE,
    top_p: Optional[float] = TOP_P,
    seed: Optional[int] = SEED,
    show_prompt: bool = SHOW_PROMPT,
):
    """Chat with the adapted model: one message a line on stdin, replies streamed to stdout.

    Each turn the whole conversation is rendered with the run's chat template and system prompt
    (an adapter with no recipe: the tokenizer's template); the oldest turns are dropped, with a
    note, when it outgrows the model's context. A run that did not train on chat rows gets each
    message as a fresh prompt in its own format (no history). /reset clears the history, /exit
    or Ctrl-D quits, Ctrl-C stops a reply."""
    sampling = _sampling(temperature, top_p, seed)
    from peftcli import artifacts, data, tokens
    from peftcli import chat as chat_loop

    loaded = artifacts.load_adapted(target)
    model, tok = loaded.model, loaded.tokenizer
    data.use_recipe_chat(tok, loaded.recipe)
    conversation = chat_loop.Conversation(tok, loaded.recipe, system, tokens.special_tokens(tok, model.generation_config),
                                          chat_loop.context_length(model, tok), max_new_tokens)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401 - line editing and history in input()
        except ImportError:
            pass
        err.print(f"chat with {loaded.adapter_dir} ({chat_loop.HELP})", highlight=False, markup=False)
    chat_loop.run(model, tok, conversation, _read_message, write, lambda line: print(line, file=sys.stderr, flush=True),
                  max_new_tokens, sampling, use_cache=not no_cache, show_prompt=show_prompt)


@app.command()
@user_errors
def validate(
    recipe: Path = typer.Argument(...),
    set_: List[str] = typer.Option([], "--set"),
):
    """Resolve a recipe; list matched modules, trainable parameters and a peak-memory estimate."""
    from peftcli import recipe as recipes
    from peftcli import sources

    r = recipes.load_recipe(recipe, set_)
    sources.check_paths(r.data)  # before torch is imported
    from peftcli import memory, methods, prepare  # torch and transformers: only for a recipe that loads
    p = prepare.load(r)  # data is read before the model loads, as in train
    prepare.fit_micro_batch(r, p.train_units, out.print)
    out.print(recipes.dump(r), highlight=False, markup=False)  # resolved: the method's default targets filled in
    s = p.datasets.train_stats
    out.print(f"data: {s.describe()}, {len(p.datasets.eval)} eval examples", highlight=False, soft_wrap=True)
    for line in p.datasets.mixing:
        out.print(line, highlight=False, markup=False)
    if p.packing:
        out.print(p.packing.describe())
    out.print(f"base: {p.base_path}")
    for line in p.precision.lines():
        out.print(line, highlight=False, markup=False, soft_wrap=True)
    out.print(f"matched {len(p.targets)} modules: {', '.join(p.targets[:6])}{' ...' if len(p.targets) > 6 else ''}")
    out.print(f"trainable parameters: {p.trainable:,} = {100 * p.trainable / p.base_params:.3f}% of the base's {p.base_params:,}")
    out.print(f"trainable by kind: {methods.kinds_line(p.model)}")
    path = prepare.loss_path(p, console=out)
    out.print(path.describe(), highlight=False, markup=False)
    peak, n_tokens = memory.estimate(p, path)
    out.print(f"peak memory estimate: {peak / 2**30:.2f} GiB (one dry step on the largest micro-batch, "
              f"{n_tokens} tokens{' padding-free' if path.padding_free else ' padded'})")


@app.command("methods")
@user_errors
def methods_():
    """List the method library."""
    from peftcli.methods import CARDS

    table = Table()
    for col in ("name", "trains", "merges", "paper"):
        table.add_column(col)
    for name, m in CARDS.items():  # the cards: no method module (nor torch) is imported
        table.add_row(name, m.SUMMARY, "yes" if m.CANNOT_MERGE is None else "no", m.PAPER)
    out.print(table)


@app.command("recipes")
@user_errors
def recipes_(folder: Optional[Path] = typer.Option(None, "--dir", help="list the recipes in this folder instead")):
    """List the bundled recipes (inside the package; a recipes/ folder here is not read unless --dir names it)."""
    from peftcli.bundled import recipes

    for name, method, path in recipes(folder):
        out.print(f"{name:24} {method:14} {path}", soft_wrap=True, highlight=False)


@app.command()
@user_errors
def schema():
    """Print the recipe JSON Schema (for editor completion, e.g. yaml-language-server)."""
    from peftcli.recipe import Recipe

    print(json.dumps(Recipe.model_json_schema(), indent=2))


@app.command()
@user_errors
def init(name: str = typer.Argument(..., help="bundled recipe name (see `peft recipes`)"), dest: Path = typer.Argument(...)):
    """Copy a bundled recipe to start from; its data paths are made absolute (the task data
    inside the installed package), so the copy works from any directory."""
    from peftcli.bundled import copy_recipe

    dest = copy_recipe(name, dest)
    out.print(f"wrote {dest}")


def run() -> None:
    """The ``peft`` console script: the Typer app, with a usage error (an unknown option, a
    missing or extra argument, ``--set KEY VALUE`` without ``=``) as one line on stderr and exit
    2, like every other user error."""
    try:
        from typer._click import exceptions as cx  # recent typer vendors its own click
    except ImportError:
        from click import exceptions as cx

    try:
        code = app(standalone_mode=False, prog_name="peft")
    except cx.NoArgsIsHelpError as e:  # bare `peft` / `peft train`: the help, as before
        e.show()
        code = e.exit_code
    except cx.UsageError as e:
        command = e.ctx.command_path if e.ctx is not None else "peft"
        hint = "; --set takes KEY=VALUE in one argument" if "--set" in sys.argv and "extra argument" in e.format_message() else ""
        print(f"error: {' '.join(e.format_message().split())}{hint} (see: {command} --help)", file=sys.stderr)
        code = 2
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    run()
