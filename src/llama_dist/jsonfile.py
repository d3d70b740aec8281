"""Reading the small JSON files a run depends on (model configs, sidecars, indexes), with one
error that names the file and what to do, instead of a bare decoder traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_json_object(path: str | os.PathLike, *, fix: str) -> dict[str, Any]:
    """The JSON object in `path`; a ValueError naming the file, the problem and `fix` (what
    the user should do) when it cannot be read, is not JSON or is not an object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{path} is not a JSON text file ({e.reason} at byte {e.start}); {fix}"
        ) from e
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); {fix}"
        ) from e
    except OSError as e:
        raise ValueError(f"{path} cannot be read ({e.strerror or e}); {fix}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


def model_config_dict(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's model_config.json (or another llama_dist model config file)."""
    return read_json_object(
        path,
        fix="it is damaged; restore it from the run's config or an intact copy of the checkpoint",
    )
