r"""Records in and out: JSONL read with file:line errors, JSONL written atomically, and the query sources.

Query sources, config section `data` (QuerySource; the SAMI config's DataSection adds the splits):
    source      "builtin:dialogue", "builtin:summarisation"   our own query sets (sami_kernels/data/queries)
                "path/to/file.jsonl"                           one JSON object per line
                "hf:<name>"                                    datasets.load_dataset(<name>, <config>, split=<split>,
                                                               data_files=<data_files>), e.g. "hf:json" with
                                                               data_files reads local JSON lines through datasets.
                                                               datasets >= 4 runs no loading scripts: a Hub dataset
                                                               that is one (openai/summarize_from_feedback) is read
                                                               from its Parquet export, "hf:parquet" with hf://
                                                               data_files (examples/configs/sami_tldr.yaml)
    config      the dataset's config name ("comparisons"); split, data_files: as load_dataset takes them. These
                three are for hf: sources (split keeps its default elsewhere).
    field       where a record holds its query: dict keys joined by dots ("info.post"); default "query"
    extractor   a named recipe for a paper's dataset, which fixes the field and cuts the query out of it:
                  hh-first-human-turn  Anthropic/hh-rlhf: field "chosen", a whole transcript
                                       "\n\nHuman: ...\n\nAssistant: ...\n\nHuman: ..."; the query is the text of
                                       its first Human turn. dedup_key default: the query text.
                  tldr-post            openai/summarize_from_feedback, config "comparisons": field "info.post", the
                                       Reddit post alone (the SAMI reference's summarisation prompt shows the post
                                       only: no title, no subreddit). dedup_key default: "info.id", as the
                                       reference de-duplicates (the comparisons repeat each post many times).
                A field given with an extractor must be the extractor's own.
    dedup_key   a record whose key was seen before is dropped (the first kept, order kept). A field path; true:
                the query text; false: no de-duplication; null (default): the extractor's default, none without one.
Every record must hold a non-empty string at the field (queries are stripped of surrounding whitespace) and a
value at the dedup key; a missing one names the config key, the source, the record (counted from 1: non-blank
JSONL lines, dataset rows) and the keys found where the path broke off.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

BUILTIN_QUERIES = Path(__file__).parents[1] / "data" / "queries"
FIRST_HUMAN_TURN = re.compile(r"\s*Human:(.*?)(?:\n\nAssistant:|\n\nHuman:|\Z)", re.DOTALL)


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


def first_human_turn(transcript: str) -> str:
    """The text of an hh-rlhf transcript's first Human turn; "" when the transcript does not open with one."""
    match = FIRST_HUMAN_TURN.match(transcript)
    return match.group(1).strip() if match else ""


@dataclasses.dataclass(frozen=True)
class Extractor:
    field: str  # the dotted path of the text the query is cut from
    cut: Callable[[str], str]  # that text -> the query ("" when there is none)
    dedup_key: str | bool  # a dotted path, True: the query text, False: no de-duplication


EXTRACTORS = {
    "hh-first-human-turn": Extractor(field="chosen", cut=first_human_turn, dedup_key=True),
    "tldr-post": Extractor(field="info.post", cut=str.strip, dedup_key="info.id"),
}


@dataclasses.dataclass
class QuerySource:
    """Where the queries come from (the module docstring); bad keys raise ValueError when it is made."""

    source: str = "builtin:dialogue"
    field: str | None = None  # None: "query", or the extractor's field
    split: str = "train"
    data_files: str | list[str] | None = None
    config: str | None = None
    extractor: str | None = None
    dedup_key: str | bool | None = None  # None: the extractor's default

    def __post_init__(self) -> None:
        self.extraction()
        if not self.source.startswith("hf:"):
            given = [key for key in ("config", "data_files") if getattr(self, key) is not None]
            if given:
                raise ValueError(f"data.{given[0]}: only hf:<name> sources take it; data.source is {self.source!r}")
        elif not self.source.removeprefix("hf:"):
            raise ValueError("data.source: 'hf:' needs a dataset name or loader, e.g. 'hf:Anthropic/hh-rlhf'")

    def extraction(self) -> Extractor:
        """The field, the cut and the dedup key these keys ask for."""
        for key in ("field", "dedup_key"):
            path = getattr(self, key)
            if isinstance(path, str) and not all(path.split(".")):
                raise ValueError(f"data.{key}: expected dict keys joined by dots, e.g. 'info.post'; got {path!r}")
        if self.extractor is None:
            return Extractor(self.field or "query", str.strip, self.dedup_key or False)
        if self.extractor not in EXTRACTORS:
            raise ValueError(f"data.extractor: unknown extractor {self.extractor!r}; known: {sorted(EXTRACTORS)}")
        extractor = EXTRACTORS[self.extractor]
        if self.field is not None and self.field != extractor.field:
            raise ValueError(
                f"data.field {self.field!r} conflicts with data.extractor {self.extractor!r}, which reads "
                f"{extractor.field!r}: give one of the two"
            )
        return extractor if self.dedup_key is None else dataclasses.replace(extractor, dedup_key=self.dedup_key)


def load_queries(source: str | QuerySource, **keys) -> list[str]:
    """The queries of a QuerySource (e.g. the config's data section), or of one made from `source` and `keys`, in
    source order, de-duplicated (see the module docstring)."""
    spec = source if isinstance(source, QuerySource) else QuerySource(source, **keys)
    extraction = spec.extraction()
    records, where = read_records(spec, extraction)
    queries, seen = [], set()
    for number, record in enumerate(records, 1):
        query = record_query(record, number, where, spec.extractor, extraction.field, extraction.cut)
        key = record_key(record, number, where, query, extraction.dedup_key)
        if key not in seen:
            queries.append(query)
            seen.add(key)
    return queries


def read_records(spec: QuerySource, extraction: Extractor) -> tuple[list[dict], str]:
    """(the source's records, how errors name the source)."""
    if spec.source.startswith("builtin:"):
        path = BUILTIN_QUERIES / f"{spec.source.removeprefix('builtin:')}.jsonl"
        if not path.exists():
            names = sorted(p.stem for p in BUILTIN_QUERIES.glob("*.jsonl"))
            raise ValueError(f"data.source: no built-in query set {spec.source!r}; built-in sets: {names}")
        return read_jsonl(path), str(path)
    if spec.source.startswith("hf:"):
        return read_dataset(spec, extraction), spec.source
    if not Path(spec.source).exists():
        raise ValueError(f"data.source: {spec.source!r} is not 'builtin:<name>', 'hf:<name>' or an existing JSONL file")
    return read_jsonl(spec.source), spec.source


def read_dataset(spec: QuerySource, extraction: Extractor) -> list[dict]:
    """The rows of a `datasets` dataset as dicts, only the columns the field and the dedup key start with."""
    try:
        import datasets
    except ImportError:
        raise ImportError("data.source 'hf:...' needs the datasets package: pip install datasets") from None
    try:
        dataset = datasets.load_dataset(
            spec.source.removeprefix("hf:"), spec.config, split=spec.split, data_files=spec.data_files
        )
    except ValueError as error:  # an unknown config or split; datasets' message lists the known ones
        raise ValueError(
            f"data.source {spec.source} (data.config {spec.config!r}, data.split {spec.split!r}): {error}"
        ) from None
    paths = {"field": extraction.field, "dedup_key": extraction.dedup_key}
    columns = {key: path.split(".")[0] for key, path in paths.items() if isinstance(path, str)}
    for key, column in columns.items():
        if column not in dataset.column_names:
            raise ValueError(
                f"data.{key}: {spec.source} has no column {column!r} (columns: {dataset.column_names})"
                + (f"; data.extractor {spec.extractor!r} reads {paths[key]!r}" if spec.extractor else "")
            )
    return dataset.select_columns(sorted(set(columns.values()))).to_list()


def record_query(record: dict, number: int, where: str, extractor: str | None, field: str, cut) -> str:
    text = value_at(record, field, number, where, "data.field", "non-empty string field")
    query = cut(text) if isinstance(text, str) else ""
    if query:
        return query
    shown = repr(str(text)[:80])
    if extractor is None:
        raise ValueError(f"data.field: {where}: record {number} has no non-empty string field {field!r} ({shown})")
    raise ValueError(f"data.extractor {extractor!r}: {where}: record {number}: no query in its {field!r} ({shown})")


def record_key(record: dict, number: int, where: str, query: str, dedup_key: str | bool):
    """What makes the record a duplicate of an earlier one: the query text (True), the value at a path as JSON, or
    the record's own number (False: none is a duplicate)."""
    if isinstance(dedup_key, bool):
        return query if dedup_key else number
    return json.dumps(value_at(record, dedup_key, number, where, "data.dedup_key", "field"), sort_keys=True)


def value_at(record: dict, path: str, number: int, where: str, key: str, what: str):
    """record["a"]["b"] for path "a.b"; a missing (or null) value raises ValueError naming the config key, the record
    and the keys found where the path broke off."""
    value, reached = record, []
    for name in path.split("."):
        if not isinstance(value, dict) or value.get(name) is None:
            at = ".".join(reached)
            if isinstance(value, dict):
                found = f"keys of {at!r}: {sorted(value)}" if at else f"keys: {sorted(value)}"
            else:
                found = f"{at!r} is a {type(value).__name__}, not a mapping"
            raise ValueError(f"{key}: {where}: record {number} has no {what} {path!r} ({found})")
        value = value[name]
        reached.append(name)
    return value
