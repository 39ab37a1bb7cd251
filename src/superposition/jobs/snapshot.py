"""model_snapshot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import models


def model_snapshot(name: str, entry: dict[str, Any], out_json: str, cache_dir: str) -> dict[str, Any]:
    spec = models.ModelSpec.from_config(name, entry)
    return models.snapshot(spec, Path(out_json).parent, cache_dir)
