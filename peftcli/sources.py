"""Sources: read a recipe's data source into raw rows, and mix several sources by weight.

A source (``data.train`` / ``data.eval``, :class:`peftcli.recipe.DataSource`) is one of:

    .jsonl / .json           one object per line, or a JSON list; parsed with ``json`` so errors
                             name the line ("FILE:LINE: malformed JSON: ...")
    .csv                     header row; every cell read as text ("15" stays "15", empty -> "");
                             parsed with ``csv`` so errors name the line (a row of the wrong width too)
    .parquet                 through ``datasets`` (the Arrow cache in a temporary dir)
    .txt                     the whole file is ONE row ``{"text": <file contents>}``: a document,
                             which ``format: text`` cuts into windows of ``max_seq_len`` tokens
    .arrow                   a ``datasets`` Arrow file (``Dataset.from_file``, memory-mapped)
    a directory              a ``datasets.save_to_disk`` dir: a Dataset, or a DatasetDict whose
                             ``split`` (default ``train``) is read; memory-mapped
    a hub dataset id         e.g. ``tatsu-lab/alpaca``: read only from the local datasets cache
                             (``datasets.config.HF_DATASETS_CACHE``), offline; never downloaded

Every file is read as strict UTF-8 (a leading byte-order mark is dropped). ``columns`` then
renames the file's columns to the format's field names; other fields keep their names. The
rows come back raw: checking them against the format is :mod:`peftcli.data`'s job. Nothing is
written under ``~/.cache``: the Parquet reader's Arrow cache is a temporary dir, and the
other kinds are memory-mapped where they lie.

:func:`mix` combines several sources' (tokenised) examples by their ``weight``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from peftcli.errors import UserError
from peftcli.recipe import DataSource

FILE_KINDS = (".jsonl", ".json", ".csv", ".parquet", ".txt", ".arrow")
# a hub dataset id: "name" or "owner/name" (letters, digits, - _ .)
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


@dataclass
class Rows:
    """The raw rows of one source, and how messages name a row.

    ``name`` is the source's path; ``lines[i]`` is row ``i``'s line in the file
    (JSON lines only, else None).
    """

    rows: list[dict]
    name: str
    lines: list[int] | None = None

    def where(self, n: int) -> str:
        """How a message names row ``n`` (1-based): ``FILE:LINE (row N)`` or ``FILE (row N)``."""
        return f"{self.name}:{self.lines[n - 1]} (row {n})" if self.lines else f"{self.name} (row {n})"


def check_path(source: DataSource, key: str = "data.train") -> Path:
    """``source.path`` as a Path, checked without reading it (cheap: ``peft train`` runs it before
    importing torch, so a misspelt path answers at once): a file, a dir, or a name that can be a
    hub dataset id (whether it is cached is :func:`load`'s to find out).

    Raises:
        UserError: "FILE: data file not found" (a missing path with a data-file extension); "KEY.path
            X: neither a regular file nor a dir" / "...: not a file or dir, and not a hub dataset id".
    """
    path = Path(source.path)
    if path.is_file() or path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{_path_key(key)} {path}: neither a regular file nor a dir; give a data file or a dir")
    if path.suffix.lower() in FILE_KINDS:
        raise UserError(f"{path}: data file not found")
    if not HUB_ID.fullmatch(source.path):
        raise UserError(f"{_path_key(key)} {source.path}: not a file or dir, and not a hub dataset id")
    return path


def check_paths(cfg) -> None:
    """:func:`check_path` on every train and eval source of a recipe's ``data`` section (a
    :class:`peftcli.recipe.DataConfig`).

    Raises:
        UserError: the first source whose path is not there, as :func:`check_path` says it.
    """
    for key, source in keyed(cfg.train, "data.train") + keyed(cfg.eval, "data.eval"):
        check_path(source, key)


def keyed(given, key: str) -> list[tuple[str, DataSource]]:
    """(recipe key, source) of each source in ``data.train`` / ``data.eval`` (one, a list, or None):
    ``data.train`` for a single source, ``data.train[1]`` in a list."""
    if given is None:
        return []
    return [(f"{key}[{n}]", s) for n, s in enumerate(given)] if isinstance(given, list) else [(key, given)]


def load(source: DataSource, key: str = "data.train") -> Rows:
    """Read every row of ``source`` (see the module docstring for the kinds), ``columns`` applied.

    ``key`` is the recipe key of the source (``data.train``, ``data.train[1]``, ``data.eval``;
    or a command-line option such as ``--data``), named in errors about the source itself.

    Returns:
        the rows in file order, each a dict (fields as in the file, text or nested lists/dicts).

    Raises:
        UserError, one line each: a file path that does not exist ("FILE: data file not
            found"); a path that is neither a file, a dir nor a cached hub dataset ("KEY.path X:
            not a file or dir, and not in the local datasets cache (...)"); a file of an
            unknown type or a dir that is not a ``save_to_disk`` dir; bytes that are not
            UTF-8 ("FILE:LINE: not UTF-8 text"); malformed JSON ("FILE:LINE: malformed JSON:
            ..."); no rows ("FILE: no rows"); an unknown ``split`` (naming the splits there) or
            a ``split`` on a source without splits; a ``columns`` entry naming a column the
            source lacks (naming the columns there).
    """
    path = check_path(source, key)
    if path.is_file():
        _no_split(source, key, "a file")
        rows, lines = _read_file(path)
    elif path.is_dir():
        rows, lines = _read_saved(path, source, key), None
    else:
        rows, lines = _read_hub(source, key), None
    if not rows:
        raise UserError(f"{path}: no rows")
    return Rows(rows=_rename(rows, source, key), name=str(path), lines=lines)


# ---------------------------------------------------------------------------------------------
# files


def _read_file(path: Path) -> tuple[list[dict], list[int] | None]:
    """(rows, line of each row or None) of a data file, by its extension."""
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_with_datasets("parquet", path), None
    if suffix == ".txt":
        text = _decode(path, path.read_bytes())
        return ([{"text": text}] if text.strip() else []), None
    if suffix == ".arrow":
        return _read_arrow(path), None
    raise UserError(f"{path}: unknown data file type {suffix or '(none)'!r} (use {', '.join(FILE_KINDS)}, "
                    "a datasets save_to_disk dir, or a cached hub dataset id)")


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


def _read_csv(path: Path) -> tuple[list[dict], list[int]]:
    """Rows of a CSV file and the line each starts on: a header row, then one row per record,
    every cell read as text ("15" stays "15", an empty cell is ""); parsed with the ``csv``
    module, strictly, so that errors name the line.

    Raises:
        UserError: "FILE:LINE: 1 cell where the header has 2 (question, answer)" for a row with
            cells missing or extra (never read as an empty answer), or a CSV syntax error.
    """
    reader = csv.reader(_decode(path, path.read_bytes()).splitlines(keepends=True), strict=True)
    rows, lines, header, start = [], [], None, 1
    try:
        for record in reader:
            if record and header is None:
                header = record
            elif record:
                if len(record) != len(header):
                    raise UserError(f"{path}:{start}: {len(record)} cell{'s' * (len(record) != 1)} where the header has "
                                    f"{len(header)} ({', '.join(header)}); quote a cell that holds a comma")
                rows.append(dict(zip(header, record)))
                lines.append(start)
            start = reader.line_num + 1
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: malformed CSV: {e}") from None
    return rows, lines


def _read_with_datasets(builder: str, path: Path, **kwargs) -> list[dict]:
    """Rows of a Parquet file through ``datasets.load_dataset``, kept in memory; the Arrow
    cache goes to a temporary dir that is removed afterwards (nothing left in ~/.cache)."""
    import datasets

    with tempfile.TemporaryDirectory(prefix="peftcli-data-") as cache, _quiet_datasets():
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache,
                                       keep_in_memory=True, **kwargs)
        except Exception as e:  # pandas / pyarrow parse errors come in many types
            raise UserError(f"{path}: cannot read {builder.upper()} file ({_first_line(e)})") from None
        return ds.to_list()


def _read_arrow(path: Path) -> list[dict]:
    """Rows of a ``datasets`` Arrow file (as ``Dataset.to_file``/``save_to_disk`` write them),
    memory-mapped."""
    import datasets

    try:
        return datasets.Dataset.from_file(str(path)).to_list()
    except Exception as e:  # pyarrow's errors for a file that is not an Arrow stream
        raise UserError(f"{path}: cannot read Arrow file ({_first_line(e)}); write it with datasets "
                        "(Dataset.save_to_disk) or use .parquet") from None


# ---------------------------------------------------------------------------------------------
# save_to_disk dirs and the hub cache


def _read_saved(path: Path, source: DataSource, key: str) -> list[dict]:
    """Rows of a ``datasets.save_to_disk`` dir (memory-mapped): a Dataset, or one split of a
    DatasetDict.

    Raises:
        UserError: the dir is not a save_to_disk dir; an unknown split; a split on a Dataset.
    """
    import datasets

    if (path / "dataset_dict.json").is_file():
        with _quiet_datasets():
            saved = datasets.load_from_disk(str(path))
        return _split_of(saved, source, key).to_list()
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        _no_split(source, key, "a saved Dataset (not a DatasetDict)")
        with _quiet_datasets():
            return datasets.load_from_disk(str(path)).to_list()
    raise UserError(f"{_path_key(key)} {path}: a dir, but not a datasets save_to_disk dir (no dataset_dict.json or "
                    "state.json in it); give a data file or a dir written by Dataset.save_to_disk")


def _read_hub(source: DataSource, key: str) -> list[dict]:
    """Rows of a hub dataset from the local datasets cache only (the split ``source.split``,
    default train), memory-mapped; offline: nothing is downloaded or looked up.

    The cache is where ``datasets.load_dataset(ID)`` left it (``HF_DATASETS_CACHE``, by default
    ``~/.cache/huggingface/datasets``): ``<owner>___<name>/<config>/<version>/<hash>/``, read by
    ``datasets``' own cached-dataset builder, the one ``load_dataset`` uses offline.

    Raises:
        UserError: not cached (one line, naming the cache dir); several configs cached; an
            unknown split.
    """
    import datasets
    from datasets.packaged_modules.cache.cache import Cache

    cache_dir = str(datasets.config.HF_DATASETS_CACHE)
    try:
        with _offline(), _quiet_datasets():
            builder = Cache(cache_dir=cache_dir, dataset_name=source.path.split("/")[-1], repo_id=source.path,
                            version="auto", hash="auto")
            splits = list(builder.info.splits or {})
            split = source.split or "train"
            if split not in splits:
                raise UserError(f"{key}.split {split!r}: {source.path} has the splits {', '.join(splits) or '(none)'}")
            return builder.as_dataset(split=split).to_list()
    except (FileNotFoundError, ValueError) as e:
        why = "" if "Couldn't find cache" in str(e) else f"; {_first_line(e)}"
        raise UserError(f"{_path_key(key)} {source.path}: not a file or dir, and not in the local datasets cache "
                        f"({cache_dir}; no downloads at run time: load it once with datasets.load_dataset"
                        f"({source.path!r}) where the hub can be reached){why}") from None


def _split_of(saved, source: DataSource, key: str):
    """The ``source.split`` (default train) of a DatasetDict.

    Raises:
        UserError: an unknown split, naming the ones there.
    """
    split = source.split or "train"
    if split not in saved:
        raise UserError(f"{key}.split {split!r}: {source.path} has the splits {', '.join(saved) or '(none)'}")
    return saved[split]


def _no_split(source: DataSource, key: str, what: str) -> None:
    """Refuse a ``split`` on a source that has none (a file, a saved Dataset)."""
    if source.split is not None:
        raise UserError(f"{key}.split: {source.path} is {what} and has no splits; remove split")


@contextlib.contextmanager
def _offline():
    """``datasets`` and ``huggingface_hub`` offline for the call (the env and their read-once flags)."""
    import datasets
    import huggingface_hub.constants as hub

    names = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    env = {n: os.environ.get(n) for n in names}
    flags = (datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE)
    os.environ.update({n: "1" for n in names})
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = flags
        for n, v in env.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


@contextlib.contextmanager
def _quiet_datasets():
    """Hide ``datasets``' progress bars and notices while reading a local source."""
    from datasets.utils import logging as ds_logging

    was_on, level = ds_logging.is_progress_bar_enabled(), ds_logging.get_verbosity()
    ds_logging.disable_progress_bar()
    ds_logging.set_verbosity_error()
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)
        if was_on:
            ds_logging.enable_progress_bar()


def _path_key(key: str) -> str:
    """How errors name a source's path: ``data.train.path``, or an option as it is (``--data``)."""
    return key if key.startswith("-") else f"{key}.path"


def _first_line(e: Exception) -> str:
    """An exception's first line of text (its type's name when it has none)."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


# ---------------------------------------------------------------------------------------------
# columns


def _rename(rows: list[dict], source: DataSource, key: str) -> list[dict]:
    """``rows`` with each ``source.columns`` entry (format field -> file column) applied: the
    file's column takes the field's name (replacing a column of that name); a row without the
    column is left as it is (the format check names it).

    Raises:
        UserError: a mapped column that no row has, naming the columns there.
    """
    if not source.columns:
        return rows
    there = list(dict.fromkeys(k for row in rows for k in row))
    for field, column in source.columns.items():
        if column not in there:
            raise UserError(f"{key}.columns.{field}: no column {column!r} in {source.path} "
                            f"(columns there: {', '.join(there)})")
    moves = {column: field for field, column in source.columns.items() if column != field}
    return [_renamed(row, moves) for row in rows]


def _renamed(row: dict, moves: dict[str, str]) -> dict:
    """``row`` with each column ``c`` it has renamed to ``moves[c]``."""
    out = {k: v for k, v in row.items() if k not in moves}
    out.update({field: row[column] for column, field in moves.items() if column in row})
    return out


# ---------------------------------------------------------------------------------------------
# mixing


def mix(parts: list[list], weights: list[float], seed: int) -> list:
    """Several sources' examples as one list, each source used ``weight`` times.

    Source ``k`` with ``n`` examples and weight ``w`` contributes ``floor(w)`` copies of all its
    examples, then ``floor((w - floor(w)) * n)`` of them drawn without replacement by a
    ``random.Random`` seeded with ``(seed, k)`` (kept in their order): weight 1 uses every
    example once, 2 twice, 0.5 a seeded half, 2.5 all twice and a seeded half once more. The
    draw is made once per run, so every epoch sees the same examples. Sources follow one another
    in ``parts`` order (the trainer shuffles each epoch).

    Args:
        parts: one list of examples (any objects) per source.
        weights: one weight > 0 per source.
        seed: train.seed.

    Returns:
        ``sum(drawn(len(p), w) for p, w in zip(parts, weights))`` examples.
    """
    mixed = []
    for k, (part, weight) in enumerate(zip(parts, weights, strict=True)):
        whole, frac = divmod(weight, 1)
        mixed += list(part) * int(whole)
        rng = random.Random(f"peftcli-mix:{seed}:{k}")
        mixed += [part[i] for i in sorted(rng.sample(range(len(part)), math.floor(frac * len(part))))]
    return mixed


def drawn(n: int, weight: float) -> int:
    """How many examples :func:`mix` takes from a source of ``n`` with ``weight``."""
    whole, frac = divmod(weight, 1)
    return int(whole) * n + math.floor(frac * n)


def mix_line(name: str, n: int, weight: float) -> str:
    """The console line for one mixed source of ``n`` (tokenised) examples, e.g. ``a.jsonl: 500
    of 1000 examples drawn (weight 0.5), 500 not used``, ``b.csv: 1000 examples x 2 = 2000
    (weight 2)``, ``c.jsonl: 1000 examples (weight 1)``."""
    count = drawn(n, weight)
    if weight < 1:
        return f"{name}: {count} of {n} examples drawn (weight {weight:g}), {n - count} not used"
    if weight == 1:
        return f"{name}: {n} examples (weight 1)"
    return f"{name}: {n} examples x {weight:g} = {count} (weight {weight:g})"


def mix_lines(names: list[str], sizes: list[int], weights: list[float]) -> list[str]:
    """What the console shows of a mix: a head line with the examples per epoch, then one
    indented :func:`mix_line` per source; none for one source of weight 1 (nothing mixed)."""
    if weights == [1]:
        return []
    total = sum(drawn(n, w) for n, w in zip(sizes, weights))
    head = f"mixing {len(names)} source{'s' * (len(names) != 1)}: {total} train examples per epoch"
    return [head] + [f"  {mix_line(*source)}" for source in zip(names, sizes, weights)]
