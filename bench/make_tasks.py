"""Generate the bundled task data: short instruction tasks whose answers are checked by exact match.

    python bench/make_tasks.py        # rewrites peftcli/recipes/data/tasks/{train,heldout}.jsonl
                                      # and their short-prompt copies in .../data/quick/

Deterministic (one seeded ``random.Random``, standard library only): running it again writes
byte-identical files. Each row is Alpaca-format ``{"instruction", "input", "output"}``; the
output is a few tokens, so a small model that learns the task (and learns to stop) gets it
exactly right. The held-out rows share no (instruction, input) pair with the train rows.

``quick/`` holds the same rows in ``completion`` format with a short prompt (the instruction and
the input on two lines, about 24 tokens a row instead of the Alpaca template's 67): the five-minute
demo (``peftcli/recipes/quick-lora.yaml``) trains on it, since step time grows with tokens.

``preference/`` holds preference pairs (``format: preference``: ``prompt``, ``chosen``,
``rejected``) for ``peftcli/recipes/dpo.yaml``, made from the first N_PREFERENCE train rows and
every held-out row: the short prompt, the right answer as ``chosen`` and, as ``rejected``, a
wrong answer of the kind a model that only copies from the input gives (:func:`wrong_answer`:
the numbers unsorted, a smaller number, the words in lowercase, the last term repeated, the
sentence's other noun), drawn from a second seeded generator so the task files stay the same.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20240601
N_TRAIN, N_HELDOUT = 2000, 100
N_PREFERENCE = 1000  # train pairs (the held-out pairs: every held-out row)
DATA = Path(__file__).resolve().parent.parent / "peftcli" / "recipes" / "data"
OUT, QUICK, PREFERENCE = DATA / "tasks", DATA / "quick", DATA / "preference"

WORDS = """
apple river garden window candle pencil basket button castle cloud forest guitar hammer island
jacket kitten ladder lemon mirror needle orange pocket rabbit saddle tiger tunnel violin wagon
yellow zipper anchor bottle carpet dragon engine feather ginger harbor jungle kettle lantern
magnet nickel orchard parrot rocket silver tomato valley walnut meadow planet bridge butter
camera desert falcon glove helmet iron jelly kayak lizard marble napkin ocean pepper quartz
ribbon shadow thunder umbrella velvet whistle winter summer spring autumn pillow copper cotton
coffee garlic honey saucer puzzle salmon spider turtle sugar wheat blanket breeze canyon cherry
""".split()
SUBJECTS = "the cat|my brother|a small dog|the old man|our teacher|the farmer|a young girl|the pilot".split("|")
VERBS = "found|painted|carried|opened|lost|cleaned|bought|dropped|fixed|hid".split("|")


def sort_numbers(rng: random.Random) -> tuple[str, str, str]:
    numbers = rng.sample(range(1, 100), rng.randint(3, 4))
    return ("Sort these numbers in ascending order.", ", ".join(map(str, numbers)),
            ", ".join(map(str, sorted(numbers))))


def largest_number(rng: random.Random) -> tuple[str, str, str]:
    numbers = rng.sample(range(1, 100), rng.randint(3, 5))
    return "Which number is the largest?", ", ".join(map(str, numbers)), str(max(numbers))


def uppercase_words(rng: random.Random) -> tuple[str, str, str]:
    words = " ".join(rng.sample(WORDS, 2))
    return "Write these words in uppercase.", words, words.upper()


def next_in_sequence(rng: random.Random) -> tuple[str, str, str]:
    start, step = rng.randint(1, 99), rng.randint(2, 12)
    terms = [start + step * i for i in range(5)]
    return "What comes next in the sequence?", ", ".join(map(str, terms[:4])), str(terms[4])


def last_word(rng: random.Random) -> tuple[str, str, str]:
    obj = rng.choice(WORDS)
    sentence = f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} the {rng.choice(WORDS)} near the {obj}."
    return "What is the last word of this sentence?", sentence, obj


TASKS = [sort_numbers, largest_number, uppercase_words, next_in_sequence, last_word]


def generate(rng: random.Random, n: int, taken: set) -> list[dict]:
    """``n`` rows, the tasks in turn, none whose (instruction, input) is in ``taken`` (updated)."""
    rows, tries = [], 0
    while len(rows) < n:
        tries += 1
        assert tries < 100 * n, "too few distinct rows: widen the task generators"
        instruction, inp, output = TASKS[len(rows) % len(TASKS)](rng)
        if (instruction, inp) in taken:
            continue
        taken.add((instruction, inp))
        rows.append({"instruction": instruction, "input": inp, "output": output})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def short_prompt(row: dict) -> dict:
    """The row in ``completion`` format: the instruction and the input on their own lines."""
    return {"prompt": f"{row['instruction']}\n{row['input']}\n", "completion": row["output"]}


def wrong_answer(row: dict, rng: random.Random) -> str:
    """A wrong answer to ``row`` that copies from its input, per task: the numbers as given (or
    reversed when already sorted), another of the numbers, the words unchanged (lowercase), the
    last term repeated, the sentence's first noun (another word when it is the last one too)."""
    instruction, inp, right = row["instruction"], row["input"], row["output"]
    if instruction.startswith("Sort"):
        numbers = inp.split(", ")
        return inp if inp != right else ", ".join(reversed(numbers))
    if instruction.startswith("Which number"):
        return rng.choice([n for n in inp.split(", ") if n != right])
    if instruction.startswith("Write these words"):
        return inp
    if instruction.startswith("What comes next"):
        return inp.split(", ")[-1]
    noun = inp.split(" the ")[1].removesuffix(" near")  # "<Subject> <verb> the NOUN near the OBJECT."
    return noun if noun != right else rng.choice([w for w in WORDS if w != right])


def preference_pair(row: dict, rng: random.Random) -> dict:
    """The row as a preference pair: its short prompt, the right answer chosen, a wrong one rejected."""
    pair = {"prompt": short_prompt(row)["prompt"], "chosen": row["output"], "rejected": wrong_answer(row, rng)}
    assert pair["chosen"] != pair["rejected"], row
    return pair


def main() -> None:
    rng, taken = random.Random(SEED), set()
    heldout = generate(rng, N_HELDOUT, taken)
    train = generate(rng, N_TRAIN, taken)
    write_jsonl(OUT / "train.jsonl", train)
    write_jsonl(OUT / "heldout.jsonl", heldout)
    write_jsonl(QUICK / "train.jsonl", [short_prompt(r) for r in train])
    write_jsonl(QUICK / "heldout.jsonl", [short_prompt(r) for r in heldout])
    wrong = random.Random(SEED + 1)
    write_jsonl(PREFERENCE / "train.jsonl", [preference_pair(r, wrong) for r in train[:N_PREFERENCE]])
    write_jsonl(PREFERENCE / "heldout.jsonl", [preference_pair(r, wrong) for r in heldout])
    print(f"wrote {len(train)} rows to {OUT / 'train.jsonl'} and {len(heldout)} to {OUT / 'heldout.jsonl'}; "
          f"{N_PREFERENCE} + {len(heldout)} preference pairs to {PREFERENCE}")


if __name__ == "__main__":
    main()
