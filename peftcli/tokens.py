"""Special tokens: the one place that decides BOS, EOS, end-of-turn and the ids generation stops at.

Data (label masks), ``peft generate``, ``peft eval`` (exact match) and ``peft merge`` (its
``generation_config``) all ask :func:`special_tokens`, so they cannot disagree (CASES C17, C18):

- the end-of-turn token is read from the chat template itself: a two-turn conversation is
  rendered and the first token after the assistant's text is taken when it is a special (added)
  token — ``<|im_end|>``, ``<end_of_turn>``, ``<|eot_id|>``, ``<|end|>``, the EOS, or one no list
  names. Only without a template is it looked up by name;
- the stop ids are EOS, end-of-turn and every ``eos_token_id`` of the model's generation config;
- the tokenizer's own additions (BOS before, EOS after, with ``add_eos_token``) are measured on
  a probe text, so a sequence gets its BOS once and never an EOS between prompt and answer.

``data.chat_template`` picks a template by name from :data:`CHAT_TEMPLATES` (written here, after
each family's documented turn format) or takes a Jinja string (:func:`use_chat_template`).
"""

from __future__ import annotations

from dataclasses import dataclass

from peftcli.errors import UserError

# Jinja as transformers renders it (trim_blocks, lstrip_blocks; special tokens such as
# bos_token / eos_token are template variables). Newlines are written as '\n' inside string
# literals because trim_blocks drops a newline that follows a block tag.
CHAT_TEMPLATES = {
    # ChatML (OpenAI; Qwen, SmolLM): <|im_start|>role\ncontent<|im_end|>\n
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    # Llama 3: <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>, after the BOS
    "llama3": (
        "{% if bos_token %}{{ bos_token }}{% endif %}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    # Gemma: <start_of_turn>user|model\ncontent<end_of_turn>\n after the BOS; Gemma has no system
    # role, so a system message is put at the start of the next user turn
    "gemma": (
        "{% if bos_token %}{{ bos_token }}{% endif %}{% set ns = namespace(system='') %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}"
        "{% elif message['role'] == 'user' %}"
        "{{ '<start_of_turn>user\\n' + ns.system + message['content'] + '<end_of_turn>\\n' }}{% set ns.system = '' %}"
        "{% else %}{{ '<start_of_turn>model\\n' + message['content'] + '<end_of_turn>\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
    # Mistral instruct: <s>[INST] user [/INST] answer</s>; the turn ends with the EOS; a system
    # message is put at the start of the next user turn
    "mistral": (
        "{% if bos_token %}{{ bos_token }}{% endif %}{% set ns = namespace(system='') %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\\n\\n' %}"
        "{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
        "{% set ns.system = '' %}"
        "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    # Phi-3: <|role|>\ncontent<|end|>\n
    "phi3": (
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
    ),
}
# the tokens each named template needs as single tokens of the vocabulary
TEMPLATE_TOKENS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "mistral": (),
    "phi3": ("<|user|>", "<|assistant|>", "<|end|>"),
}
# end-of-turn names, used only for a tokenizer without a chat template
KNOWN_END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")
_PROBE = "peftcli answer probe"  # the assistant text rendered to find what closes a turn
TEMPLATE_HINT = f"set data.chat_template ({', '.join(CHAT_TEMPLATES)}, or a Jinja string)"


@dataclass(frozen=True)
class SpecialTokens:
    """The special token ids of one tokenizer (+ chat template + generation config).

    bos_id / eos_id: the tokenizer's BOS / EOS (None when it has none). end_of_turn_id: the token
    the chat template closes an assistant turn with (may be the EOS; None when there is no
    template or its turns end in plain text). stop_ids: every id generation stops at (EOS,
    end-of-turn, the generation config's ``eos_token_id``), in that order, no repeats.
    prefix_ids / suffix_ids: what ``tokenizer(text)`` puts before / after the text's own tokens
    (e.g. ``(bos,)`` / ``(eos,)`` with ``add_eos_token``).
    """

    bos_id: int | None
    eos_id: int | None
    end_of_turn_id: int | None
    stop_ids: tuple[int, ...]
    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]


def special_tokens(tokenizer, generation_config=None) -> SpecialTokens:
    """BOS, EOS, end-of-turn and stop ids of ``tokenizer`` (its current chat template) and the
    model's ``generation_config`` (a ``transformers.GenerationConfig`` or None)."""
    eot = _end_of_turn(tokenizer)
    configured = getattr(generation_config, "eos_token_id", None)
    configured = [configured] if isinstance(configured, int) else list(configured or [])
    stops = [i for i in [tokenizer.eos_token_id, eot, *configured] if i is not None]
    prefix, suffix = _added_around(tokenizer)
    return SpecialTokens(bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id, end_of_turn_id=eot,
                         stop_ids=tuple(dict.fromkeys(stops)), prefix_ids=prefix, suffix_ids=suffix)


def encode_start(tokenizer, text: str, special: SpecialTokens) -> list[int]:
    """Token ids of ``text`` as the start of a sequence: the tokenizer's prefix (its BOS) once —
    not again when ``text`` already begins with it — and never its suffix (an appended EOS
    belongs at the end of the answer, not after the prompt)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = list(special.prefix_ids)
    return ids if ids[: len(prefix)] == prefix else prefix + ids


def _added_around(tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ids ``tokenizer(text)`` adds before the text, ids it adds after), measured on a probe."""
    bare = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    full = tokenizer(_PROBE)["input_ids"]
    for k in range(len(full) - len(bare) + 1):
        if full[k : k + len(bare)] == bare:
            return tuple(full[:k]), tuple(full[k + len(bare):])
    return (), ()


def _marker_ids(tokenizer) -> set[int]:
    """Ids of the tokens that can mark a turn: the special and added tokens."""
    return set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))


def _single_token(tokenizer, text: str) -> int | None:
    """The id of ``text`` when it is one added/special token of the vocabulary, else None."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 and ids[0] in _marker_ids(tokenizer) else None


def _end_of_turn(tokenizer) -> int | None:
    """The token right after an assistant turn's text in the rendered template (when it is a
    special/added token); without a template, the first of :data:`KNOWN_END_OF_TURN` the
    tokenizer has."""
    if not getattr(tokenizer, "chat_template", None):
        found = [_single_token(tokenizer, name) for name in KNOWN_END_OF_TURN]
        return next((i for i in found if i is not None), None)
    turns = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": _PROBE}]
    for messages in (turns, [{"role": "system", "content": "be brief"}, *turns]):
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # noqa: BLE001 - a template may reject either conversation; try the next
            continue
        if _PROBE not in text:
            continue
        after = text[text.rindex(_PROBE) + len(_PROBE):].lstrip()
        ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        return ids[0] if ids and ids[0] in _marker_ids(tokenizer) else None
    return None


def use_chat_template(tokenizer, spec: str | None):
    """Set ``tokenizer.chat_template`` from ``data.chat_template``: None keeps the tokenizer's
    own, a name of :data:`CHAT_TEMPLATES` or a Jinja string replaces it. Returns ``tokenizer``.

    Raises:
        UserError: a named template whose marker tokens the tokenizer lacks (naming the ones
            that fit), or a Jinja string that does not parse.
    """
    if spec is None:
        return tokenizer
    if spec in CHAT_TEMPLATES:
        missing = [t for t in TEMPLATE_TOKENS[spec] if _single_token(tokenizer, t) is None]
        if spec == "mistral" and tokenizer.eos_token is None:
            missing.append("an EOS token")
        if missing:
            fits = [n for n, need in TEMPLATE_TOKENS.items() if all(_single_token(tokenizer, t) is not None for t in need)]
            raise UserError(f"data.chat_template: {spec} needs {', '.join(missing)}, which this tokenizer does not have "
                            f"as a token; choose one that fits ({', '.join(fits) or 'none of the named ones'}) or give a "
                            "Jinja string")
        template = CHAT_TEMPLATES[spec]
    else:
        template = spec
        import jinja2

        try:
            jinja2.Environment().parse(template)
        except jinja2.TemplateSyntaxError as e:
            raise UserError(f"data.chat_template: not a valid Jinja template (line {e.lineno}: {e.message})") from None
    tokenizer.chat_template = template
    return tokenizer
