"""Read a user's dataset from JSONL, CSV, Parquet or a ``datasets`` ``save_to_disk`` directory.

Every problem with a file is a :class:`~hfedmoe.errors.DataError` whose message starts with the
file and the 1-based position of the bad record: ``line N`` for JSONL and CSV (physical lines,
the CSV header is line 1), ``row N`` for Parquet and Arrow shards. Checked: unreadable file or
line (bad JSON, bad UTF-8, a record that is not an object, a CSV row with the wrong number of
fields), empty file, missing column, missing/NaN/non-integral label, a label of an unknown type
(bool, list, object) and labels of mixed types (``int`` in one row, ``str`` in another).

Files are chosen by suffix: ``.jsonl``/``.ndjson``/``.json`` (all read as JSON Lines: one object
per line, blank lines skipped), ``.csv`` (UTF-8, header row), ``.parquet``/``.pq``.

Labels are ``int`` or ``str``. CSV has no types, so a CSV label column whose every value is an
integer literal is read as integers, otherwise as strings; ``nan``/``NaN`` in CSV is a NaN label.
Integral floats (Parquet written from a pandas column that once held NaN) are read as integers.

A ``save_to_disk`` directory is read with pyarrow alone (its shards are Arrow IPC streams listed
in ``state.json``), so the ``datasets`` package is not needed at run time. For a saved
``DatasetDict`` the ``train`` split is used (or the only split, if there is one).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hfedmoe.data.dataset import PairDataset, RawLabel, TextDataset, encode_labels
from hfedmoe.errors import DataError

__all__ = ["Record", "detect_format", "load_pair_file", "load_text_file", "read_labels",
           "read_records"]

_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv",
            ".parquet": "parquet", ".pq": "parquet"}
_INT_RE = re.compile(r"[+-]?\d+")


@dataclass(frozen=True)
class Record:
    """One input record and where it came from (for error messages)."""

    file: Path
    where: str  # "line 7" or "row 7"
    values: dict[str, Any]

    def error(self, msg: str) -> DataError:
        """A DataError naming this record's file and position."""
        return DataError(f"{self.file}: {self.where}: {msg}")


def detect_format(path: str | Path) -> str:
    """``"jsonl"``, ``"csv"``, ``"parquet"`` or ``"arrow"`` (a save_to_disk directory)."""
    p = Path(path)
    if p.is_dir():
        return "arrow"
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    fmt = _FORMATS.get(p.suffix.lower())
    if fmt is None:
        raise DataError(f"{p}: unknown dataset format {p.suffix!r}; "
                        f"expected one of {sorted(_FORMATS)} or a save_to_disk directory")
    return fmt


def read_records(path: str | Path, required: Sequence[str],
                 optional: Sequence[str] = ()) -> list[Record]:
    """Read every record of a dataset file, keeping only the named columns.

    Args:
        path: A ``.jsonl``/``.csv``/``.parquet`` file or a ``save_to_disk`` directory.
        required: Columns every record must have.
        optional: Columns kept when the file has them (JSONL: when the first record has the key;
            then every record must have it).

    Returns:
        The records in file order; never empty.

    Raises:
        DataError: The file is unreadable, empty or lacks a column; the message names the file
            and the 1-based line or row.
    """
    p = Path(path)
    fmt = detect_format(p)
    reader = {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet,
              "arrow": _read_arrow_dir}[fmt]
    records = reader(p, list(required), list(optional))
    if not records:
        unit = "line" if fmt in ("jsonl", "csv") else "row"
        first = 2 if fmt == "csv" else 1
        raise DataError(f"{p}: {unit} {first}: no records (the file is empty)")
    return records


def _missing(file: Path, where: str, col: str, have: Sequence[str]) -> DataError:
    return DataError(f"{file}: {where}: missing column {col!r}; columns are: "
                     f"{', '.join(map(str, have)) or '(none)'}")


def _read_jsonl(p: Path, required: list[str], optional: list[str]) -> list[Record]:
    out: list[Record] = []
    wanted: list[str] | None = None
    with p.open("rb") as fh:
        for n, raw in enumerate(fh, start=1):
            where = f"line {n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{p}: {where}: not valid UTF-8 ({exc.reason})") from exc
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}: {where}: not valid JSON ({exc.msg} at column "
                                f"{exc.colno})") from exc
            if not isinstance(obj, dict):
                raise DataError(f"{p}: {where}: expected a JSON object, got "
                                f"{type(obj).__name__}")
            if wanted is None:
                wanted = required + [c for c in optional if c in obj]
            for col in wanted:
                if col not in obj:
                    raise _missing(p, where, col, list(obj))
            out.append(Record(p, where, {c: obj[c] for c in wanted}))
    return out


def _read_csv(p: Path, required: list[str], optional: list[str]) -> list[Record]:
    data = p.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{p}: line {line}: not valid UTF-8 ({exc.reason})") from exc
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{p}: line 1: no header (the file is empty)") from None
    except csv.Error as exc:
        raise DataError(f"{p}: line 1: unreadable CSV header ({exc})") from exc
    for col in required:
        if col not in header:
            raise _missing(p, "line 1 (header)", col, header)
    cols = required + [c for c in optional if c in header]
    pos = {c: header.index(c) for c in cols}
    out: list[Record] = []
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataError(f"{p}: line {start}: unreadable CSV ({exc})") from exc
        where = f"line {start}"
        start = reader.line_num + 1
        if not row:  # a blank line
            continue
        if len(row) != len(header):
            raise DataError(f"{p}: {where}: expected {len(header)} fields, got {len(row)}")
        out.append(Record(p, where, {c: row[i] for c, i in pos.items()}))
    return out


def _pyarrow() -> Any:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError as exc:  # pragma: no cover - pyarrow is in the [data] extra
        raise DataError("reading Parquet/Arrow needs pyarrow: pip install 'hfedmoe[data]'") from exc
    return pyarrow


def _table_records(file: Path, table: Any, required: list[str], optional: list[str],
                   first_row: int = 1, label: str = "row") -> list[Record]:
    names = list(table.column_names)
    for col in required:
        if col not in names:
            raise _missing(file, f"{label} {first_row}", col, names)
    cols = required + [c for c in optional if c in names]
    columns = {c: table.column(c).to_pylist() for c in cols}
    return [Record(file, f"{label} {first_row + i}", {c: columns[c][i] for c in cols})
            for i in range(table.num_rows)]


def _read_parquet(p: Path, required: list[str], optional: list[str]) -> list[Record]:
    pa = _pyarrow()
    try:
        table = pa.parquet.read_table(p)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{p}: row 1: unreadable Parquet file ({exc})") from exc
    return _table_records(p, table, required, optional)


def _saved_split_dir(d: Path) -> Path:
    dict_file = d / "dataset_dict.json"
    if not dict_file.exists():
        return d
    try:
        splits = json.loads(dict_file.read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{dict_file}: line 1: unreadable dataset_dict.json ({exc})") from exc
    if "train" in splits:
        return d / "train"
    if len(splits) == 1:
        return d / splits[0]
    raise DataError(f"{dict_file}: line 1: no 'train' split to read; splits are: {splits}")


def _read_arrow_dir(d: Path, required: list[str], optional: list[str]) -> list[Record]:
    pa = _pyarrow()
    split = _saved_split_dir(d)
    state_file = split / "state.json"
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        shards = [split / f["filename"] for f in state["_data_files"]]
    except FileNotFoundError as exc:
        raise DataError(f"{d}: not a save_to_disk directory (no state.json)") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{state_file}: line 1: unreadable state.json ({exc})") from exc
    if state.get("_indices_data_files"):
        raise DataError(f"{state_file}: line 1: indices mappings are not supported; "
                        "save the dataset after flatten_indices()")
    out: list[Record] = []
    for shard in shards:
        try:
            with pa.memory_map(str(shard), "r") as src:
                table = pa.ipc.open_stream(src).read_all()
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{shard}: row 1: unreadable Arrow shard ({exc})") from exc
        out.extend(_table_records(shard, table, required, optional))
    return out


# ---------------------------------------------------------------------------------------------
# Value checks


def _text(rec: Record, col: str) -> str:
    v = rec.values[col]
    if v is None:
        raise rec.error(f"missing value in column {col!r}")
    if not isinstance(v, str):
        raise rec.error(f"column {col!r} must be a string, got {type(v).__name__} {v!r}")
    return v


def _label(rec: Record, col: str) -> RawLabel:
    v = rec.values[col]
    if v is None or (isinstance(v, str) and not v.strip()):
        raise rec.error(f"missing label in column {col!r}")
    if isinstance(v, bool):
        raise rec.error(f"unknown label type bool ({v!r}) in column {col!r}; use int or str")
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        if math.isnan(v):
            raise rec.error(f"label is NaN in column {col!r}")
        if not v.is_integer():
            raise rec.error(f"label {v!r} in column {col!r} is not an integer or a string")
        return int(v)
    if isinstance(v, str):
        if rec.file.suffix.lower() == ".csv" and v.strip().lower() == "nan":
            raise rec.error(f"label is NaN in column {col!r}")
        return v
    raise rec.error(f"unknown label type {type(v).__name__} in column {col!r}; use int or str")


def read_labels(records: Sequence[Record], col: str) -> list[RawLabel]:
    """Check and return the label of every record (all ``int`` or all ``str``)."""
    raw = [_label(r, col) for r in records]
    if records[0].file.suffix.lower() == ".csv" and all(_INT_RE.fullmatch(v.strip())
                                                        for v in raw if isinstance(v, str)):
        return [int(v) for v in raw]
    kind = type(raw[0])
    for rec, v in zip(records, raw, strict=True):
        if type(v) is not kind:
            raise rec.error(f"mixed label types: {type(v).__name__} {v!r} here, but "
                            f"{kind.__name__} at {records[0].where}")
    return raw


def load_text_file(path: str | Path, text_column: str = "text",
                   label_column: str = "label") -> TextDataset:
    """Load a classification dataset from a file or a save_to_disk directory.

    Args:
        path: The file or directory.
        text_column: Column holding the input text.
        label_column: Column holding the label (``int`` or ``str``).

    Returns:
        The dataset in file order, with the sorted label vocabulary.

    Raises:
        DataError: A bad file, naming the file and the line/row.
    """
    records = read_records(path, [text_column, label_column])
    texts = [_text(r, text_column) for r in records]
    ids, names = encode_labels(read_labels(records, label_column))
    return TextDataset(tuple(texts), ids, names)


def _response(rec: Record, col: str) -> str:
    text = _text(rec, col)
    if not text.strip():
        raise rec.error(f"empty response in column {col!r}: the loss is taken on the "
                        "response, so every pair needs one")
    return text


def _missing_pair_columns(path: str | Path, prompt_column: str, response_column: str,
                          text_column: str) -> None:
    """Raise the reader's missing-column error (file, line, the file's columns) with what
    causal-LM data needs."""
    plain = (f", or a {text_column!r} column for plain text (data.text_column)"
             if text_column else "")
    try:
        read_records(path, [prompt_column, response_column])
    except DataError as exc:
        raise DataError(f"{exc} (causal-LM data needs the columns {prompt_column!r} and "
                        f"{response_column!r}: data.prompt_column, data.response_column"
                        f"{plain})") from None
    raise AssertionError("the columns were missing a moment ago")  # pragma: no cover


def load_pair_file(path: str | Path, prompt_column: str = "prompt",
                   response_column: str = "response",
                   label_column: str = "label", text_column: str = "") -> PairDataset:
    """Load prompt/response pairs, or plain text, from a file or a save_to_disk directory.

    Pairs need both ``prompt_column`` and ``response_column``. A file that has neither but has
    ``text_column`` (when given) is plain text: every text is a response with an empty prompt,
    so the loss is taken on all of it. The label column (the domain) is optional: when present
    it groups the examples (for partitioning, the stratified test split and the per-domain
    evaluation); otherwise every example is in the single group ``"all"``.

    Raises:
        DataError: A bad file, a missing column, or an empty response (or text), naming the
            file and the line/row.
    """
    records = read_records(path, [], optional=[prompt_column, response_column, label_column]
                           + ([text_column] if text_column else []))
    have = records[0].values
    if text_column and text_column in have and not (prompt_column in have
                                                    or response_column in have):
        prompts = [""] * len(records)
        responses = [_response(r, text_column) for r in records]
    else:
        if prompt_column not in have or response_column not in have:
            _missing_pair_columns(path, prompt_column, response_column, text_column)
        prompts = [_text(r, prompt_column) for r in records]
        responses = [_response(r, response_column) for r in records]
    if label_column in have:
        ids, names = encode_labels(read_labels(records, label_column))
    else:
        ids, names = (0,) * len(records), ("all",)
    return PairDataset(tuple(prompts), tuple(responses), ids, names)
