"""A generation stage's progress log: resumable, append-only, published atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..data import write_jsonl, write_text


class StageFile:
    """A stage's progress as an append-only log (stage<k>.log.jsonl): one line per finished unit of work (its record
    if kept, the counts it adds). Each batch is appended in one write and fsync'ed, so saving costs what the batch
    adds, and a kill loses at most the batch being written (a torn last line is ignored). `publish` writes the
    stage's outputs, stage<k>.jsonl and stage<k>.counts.json, atomically from the log."""

    def __init__(self, out: Path, stage: str):
        self.path, self.counts_path = out / f"stage{stage}.jsonl", out / f"stage{stage}.counts.json"
        self.log_path = out / f"stage{stage}.log.jsonl"
        self.records: list[dict] = []
        self.counts: dict[str, int] = {}
        self.done: set[str] = set()
        self.pending: list[dict] = []
        lines = self.log_path.read_text(encoding="utf-8").splitlines() if self.log_path.exists() else []
        for k, line in enumerate(lines):
            try:
                event = json.loads(line)
            except json.JSONDecodeError:  # torn by a kill mid-append: that batch was never reported done
                write_text(self.log_path, "".join(x + "\n" for x in lines[:k]))  # so appends follow whole lines
                break
            self._apply(event)

    def _apply(self, event: dict) -> None:
        if "unit" in event:
            self.done.add(event["unit"])
        if "record" in event:
            self.records.append(event["record"])
        for key, n in event.get("count", {}).items():
            self.counts[key] = self.counts.get(key, 0) + n

    def log(self, event: dict) -> None:
        self._apply(event)
        self.pending.append(event)

    def add(self, unit: str, record: dict | None, reason: str | None = None) -> None:
        """A generated item: kept (its record) or dropped for `reason`."""
        key = "kept" if record is not None else f"dropped: {reason}"
        self.log(
            {"unit": unit, "count": {"generated": 1, key: 1}, **({"record": record} if record is not None else {})}
        )

    def save(self) -> None:
        if not self.pending:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in self.pending))
            f.flush()
            os.fsync(f.fileno())
        self.pending = []

    def publish(self) -> dict:
        self.save()
        write_jsonl(self.path, self.records)
        write_text(self.counts_path, json.dumps({"counts": self.counts}, indent=1) + "\n")
        return self.counts
