"""Greedy exact match is batched by a token budget; the answers are the ones row by row."""

from tiny import SORT_ROWS, tiny_llama, tiny_tokenizer

from peftcli import evaluate


def test_generation_batch_size_fills_the_token_budget_within_its_row_limits():
    assert evaluate.generation_batch_size([20, 24], 16) == evaluate.GENERATE_ROWS  # 4096 // 40 = 102 -> 64
    assert evaluate.generation_batch_size([70, 90], 10) == 4096 // 100
    assert evaluate.generation_batch_size([5000], 8) == 1


def test_batched_exact_match_answers_as_one_row_at_a_time(monkeypatch):
    tok = tiny_tokenizer()
    model = tiny_llama(tok, seed=3).eval()
    rows = SORT_ROWS[:20]
    answers = []
    real = evaluate.generate
    monkeypatch.setattr(evaluate, "generate", lambda m, t, prompts, **k: answers.append(real(m, t, prompts, **k)) or answers[-1])
    batched = evaluate.exact_match(model, tok, rows, "alpaca")
    assert len(answers) == 1 and len(answers[0]) == len(rows)  # one batch here
    one_by_one = evaluate.exact_match(model, tok, rows, "alpaca", batch_size=1)
    assert [a for batch in answers[1:] for a in batch] == answers[0]  # the reference: unpadded, row by row
    assert batched == one_by_one
