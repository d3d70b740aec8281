"""Records of JSON and JSONL data files, each with where it came from (for errors)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def read_records(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """(where, record) of each record of a JSONL file (one JSON value per line) or a JSON
    file holding a list; `where` names the file and line (or record index). An unparsable
    JSONL line is yielded as its ValueError, so a caller can skip it like any bad record."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}: not valid JSON ({e}); use a list of records or JSONL"
            ) from None
        if not isinstance(data, list):
            raise ValueError(
                f"{path}: a JSON data file must hold a list of records, got "
                f"{type(data).__name__}; use [ {{...}}, ... ] or one record per line (JSONL)"
            )
        for i, record in enumerate(data):
            yield f"{path} record {i}", record
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path}:{lineno}", ValueError(f"not valid JSON ({e})")
