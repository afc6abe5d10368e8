"""Records in and out: JSONL read with file:line errors, JSONL written atomically, and the query sources.

Query sources (config `data.source`):
    "builtin:dialogue", "builtin:summarisation"   our own query sets (sami_kernels/data/queries)
    "path/to/file.jsonl"                           one JSON object per line, the query under `data.field`
    "hf:<name>"                                    datasets.load_dataset(<name>, split=data.split,
                                                   data_files=data.data_files), field `data.field`
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

BUILTIN_QUERIES = Path(__file__).parents[1] / "data" / "queries"


def read_jsonl(path) -> list[dict]:
    """Every line of a JSONL file as a dict; a malformed line raises ValueError naming file and line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    return records


def write_jsonl(path, records: Iterable[dict]) -> None:
    """All records or nothing: written to a temporary file in the same directory, fsync'ed, renamed into place."""
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_text(path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def field_values(records: list[dict], field: str, where: str) -> list[str]:
    """records[k][field] as non-empty strings; a missing or empty field names its record."""
    values = []
    for number, record in enumerate(records, 1):
        value = record.get(field)
        if not isinstance(value, str) or not value.strip():
            keys = sorted(record) if isinstance(record, dict) else []
            raise ValueError(f"{where}: record {number} has no non-empty string field {field!r} (keys: {keys})")
        values.append(value.strip())
    return values


def load_queries(source: str, *, field: str = "query", split: str = "train", data_files=None) -> list[str]:
    """Queries from a built-in set, a JSONL file or a Hugging Face `datasets` dataset (see the module docstring)."""
    if source.startswith("builtin:"):
        path = BUILTIN_QUERIES / f"{source.removeprefix('builtin:')}.jsonl"
        if not path.exists():
            names = sorted(p.stem for p in BUILTIN_QUERIES.glob("*.jsonl"))
            raise ValueError(f"data.source: no built-in query set {source!r}; built-in sets: {names}")
        return field_values(read_jsonl(path), "query", str(path))
    if source.startswith("hf:"):
        try:
            import datasets
        except ImportError:
            raise ImportError("data.source 'hf:...' needs the datasets package: pip install datasets") from None
        dataset = datasets.load_dataset(source.removeprefix("hf:"), split=split, data_files=data_files)
        if field not in dataset.column_names:
            raise ValueError(f"data.field: {source} has no column {field!r} (columns: {dataset.column_names})")
        return field_values([{field: v} for v in dataset[field]], field, source)
    if not Path(source).exists():
        raise ValueError(f"data.source: {source!r} is not 'builtin:<name>', 'hf:<name>' or an existing JSONL file")
    return field_values(read_jsonl(source), field, source)
