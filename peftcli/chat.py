"""``peft chat``: a small interactive loop over an adapted model, and the prompt display that
``peft generate --show-prompt`` shares.

Each turn the whole conversation (the system message, every earlier user message and reply,
the new message) is rendered with the run's chat template (:func:`peftcli.data.prompt_ids`,
the ids training's prompts have), and the reply is streamed as it is generated
(:class:`_Printer`, a ``transformers.TextStreamer``). A run that did not train on chat rows
(alpaca, completion, text) has no turn format, so there each message is a fresh prompt in the
run's own format (:func:`peftcli.data.generation_prompt`) and no history is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from transformers import TextStreamer

from peftcli import data, tokens
from peftcli.errors import UserError
from peftcli.evaluate import GREEDY, Sampling, answer_text, generate_ids, prompt_token_ids

HELP = "/reset clears the history, /exit (or Ctrl-D) quits, Ctrl-C stops a reply"


def prompt_block(tokenizer, ids: list[int]) -> str:
    """The exact text the model receives: ``ids`` decoded with their special tokens, between two
    marker lines that give the token count."""
    return f"--- prompt ({len(ids)} tokens) ---\n{tokenizer.decode(ids, skip_special_tokens=False)}\n--- end of prompt ---"


def context_length(model, tokenizer) -> int | None:
    """The most tokens (prompt + reply) the model takes: its config's ``max_position_embeddings``,
    else the tokenizer's ``model_max_length`` when it is a real limit; None when neither says."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if n is None and getattr(tokenizer, "model_max_length", None) and tokenizer.model_max_length < 10**7:
        n = tokenizer.model_max_length
    return n


class Conversation:
    """The messages of one chat and the prompt ids of its next reply.

    Args:
        tokenizer: with the run's chat template already set (:func:`peftcli.data.use_recipe_chat`).
        recipe: the run's recipe, or None (an adapter HF peft saved).
        system: the system message (None: the run's data.system_prompt).
        special: the tokenizer's special tokens (:func:`peftcli.tokens.special_tokens`).
        context: the model's context in tokens (None: no limit known).
        reserve: tokens kept free for the reply (``--max-new-tokens``).

    History is kept (``keeps_history``) for a chat-format run, and for an adapter with no recipe
    whose tokenizer has a chat template; otherwise each message is a fresh prompt.

    Raises:
        UserError: ``system`` for a conversation with no system message (a non-chat run);
            ``reserve`` not below ``context``.
    """

    def __init__(self, tokenizer, recipe, system: str | None, special: tokens.SpecialTokens,
                 context: int | None, reserve: int):
        fmt = recipe.data.train.format if recipe else ("chat" if getattr(tokenizer, "chat_template", None) else "text")
        self.tokenizer, self.recipe, self.special, self.format = tokenizer, recipe, special, fmt
        self.keeps_history = fmt in data.CHAT_FORMATS
        if system is not None and not self.keeps_history:
            raise UserError(f"--system: only a chat run's prompt has a system message (this one: {fmt})")
        self.system = system if system is not None else (recipe.data.system_prompt if recipe else None)
        if context is not None and reserve >= context:
            raise UserError(f"--max-new-tokens {reserve}: the model's context is {context} tokens; give fewer")
        self.context, self.reserve = context, reserve
        self.turns: list[tuple[str, str]] = []  # (user message, reply), oldest first

    def reset(self) -> None:
        self.turns = []

    def add(self, message: str, reply: str) -> None:
        if self.keeps_history:
            self.turns.append((message, reply))

    def messages(self, message: str) -> list[dict]:
        """The conversation as chat messages, ending with ``message`` as the user's."""
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        past = [{"role": role, "content": text} for turn in self.turns for role, text in zip(("user", "assistant"), turn)]
        return [*system, *past, {"role": "user", "content": message}]

    def prompt(self, message: str) -> tuple[list[int], int]:
        """(prompt ids of the reply to ``message``, how many of the oldest turns were dropped from
        the history so that the prompt and ``reserve`` new tokens fit in the context).

        Raises:
            UserError: ``message`` alone is over the context; the template cannot render it.
        """
        dropped = 0
        while True:
            ids = self._ids(message)
            if self.context is None or len(ids) + self.reserve <= self.context:
                return ids, dropped
            if not self.turns:
                raise UserError(f"this message is {len(ids)} prompt tokens; with {self.reserve} new tokens that is over "
                                f"the model's context of {self.context}: shorten it (or lower --max-new-tokens)")
            self.turns.pop(0)
            dropped += 1

    def _ids(self, message: str) -> list[int]:
        if not self.keeps_history:
            return prompt_token_ids(self.tokenizer, data.generation_prompt(message, self.recipe, self.tokenizer),
                                    self.special)
        # an empty assistant message last: the prompt is everything before it, with the generation prompt
        row = {"messages": [*self.messages(message), {"role": "assistant", "content": ""}]}
        return data.prompt_ids(row, "chat", self.tokenizer, self.special)


class _Printer(TextStreamer):
    """A TextStreamer that writes the reply's text through ``write`` (not print) and keeps its
    token ids (``ids``), so a reply stopped half-way is known as far as it went."""

    def __init__(self, tokenizer, write: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.write, self.ids = write, []

    def put(self, value):
        if not self.next_tokens_are_prompt:
            self.ids += value.reshape(-1).tolist()
        super().put(value)

    def on_finalized_text(self, text: str, stream_end: bool = False):
        self.write(text + ("\n" if stream_end else ""))


def reply(model, tokenizer, ids: list[int], max_new_tokens: int, sampling: Sampling, use_cache: bool,
          write: Callable[[str], None]) -> tuple[str, bool]:
    """Generate the reply to prompt ``ids``, streaming its text to ``write`` as it comes.

    Returns (the reply's text up to its first stop id, without special tokens; whether Ctrl-C
    stopped it). A KeyboardInterrupt during generation ends the reply where it is, nothing more.
    """
    printer = _Printer(tokenizer, write)
    try:
        generate_ids(model, tokenizer, [ids], max_new_tokens, use_cache, sampling, streamer=printer)
        stopped = False
    except KeyboardInterrupt:
        printer.end()
        stopped = True
    stops = tokens.special_tokens(tokenizer, getattr(model, "generation_config", None)).stop_ids
    return answer_text(tokenizer, printer.ids, stops), stopped


def run(model, tokenizer, conversation: Conversation, read: Callable[[], str | None], write: Callable[[str], None],
        note: Callable[[str], None], max_new_tokens: int = 256, sampling: Sampling = GREEDY,
        use_cache: bool = True, show_prompt: bool = False) -> None:
    """The loop: read a message (``read`` returns None at the end of input), reply to it.

    ``write`` gets the replies' text, ``note`` every other line (notes, errors of one turn,
    ``show_prompt``'s :func:`prompt_block`). ``/reset`` clears the history, ``/exit`` or the end
    of input ends the loop; a message that cannot be sent (too long, a template that cannot
    render it) is reported in one line and the loop goes on. A sampling seed seeds torch once, at
    the start: the same seed and the same messages replay the same session.
    """
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
        sampling = replace(sampling, seed=None)
    if not conversation.keeps_history:
        note(f"note: this run trained on {conversation.format} rows, not chat: each message is a fresh prompt "
             "and no history is kept")
    while (line := read()) is not None:
        message = line.strip()
        if message in ("/exit", "/quit"):
            break
        if message == "/reset":
            conversation.reset()
            note("(history cleared)")
            continue
        if not message:
            continue
        if message.startswith("/") and " " not in message:
            note(f"unknown command {message} ({HELP})")
            continue
        try:
            ids, dropped = conversation.prompt(message)
        except UserError as e:
            note(f"error: {' '.join(str(e).split())}")
            continue
        if dropped:
            note(f"(dropped the oldest {dropped} turn{'s' * (dropped > 1)}: the conversation is over the model's "
                 f"context of {conversation.context} tokens)")
        if show_prompt:
            note(prompt_block(tokenizer, ids))
        text, stopped = reply(model, tokenizer, ids, max_new_tokens, sampling, use_cache, write)
        if stopped:
            note("(reply stopped)")
        conversation.add(message, text)
