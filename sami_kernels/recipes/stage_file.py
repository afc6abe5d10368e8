"""A generation stage's progress log: resumable, append-only, published atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .data import write_jsonl, write_text


class StageFile:
    """A stage's progress as an append-only log (stage<k>.log.jsonl) of events: a finished unit of work, a record
    kept, counts added. Each `save` appends the events logged since the last one as ONE line (a JSON list), in one
    write, fsync'ed: saving costs what the batch adds, and a batch is in the log whole or not at all (a line torn by a
    kill is ignored), so a resumed stage never sees half a unit of work. `publish` writes the stage's outputs,
    stage<k>.jsonl and stage<k>.counts.json, atomically from the log."""

    def __init__(self, out: Path, stage: str):
        self.stage = stage
        self.path, self.counts_path = out / f"stage{stage}.jsonl", out / f"stage{stage}.counts.json"
        self.log_path = out / f"stage{stage}.log.jsonl"
        self.records: list[dict] = []
        self.counts: dict[str, int] = {}
        self.done: set[str] = set()
        self.pending: list[dict] = []
        lines = self.log_path.read_text(encoding="utf-8").splitlines() if self.log_path.exists() else []
        for k, line in enumerate(lines):
            try:
                batch = json.loads(line)
            except json.JSONDecodeError:  # torn by a kill mid-append: that batch was never reported done
                write_text(self.log_path, "".join(x + "\n" for x in lines[:k]))  # so appends follow whole lines
                break
            for event in batch if isinstance(batch, list) else [batch]:  # a dict: one event a line (older logs)
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
            f.write(json.dumps(self.pending, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.pending = []

    def publish(self) -> dict:
        self.save()
        write_jsonl(self.path, self.records)
        write_text(self.counts_path, json.dumps({"counts": self.counts}, indent=1) + "\n")
        return self.counts
