"""model_download (hub models, on the submit host: the network) and model_snapshot (anywhere: no network)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import models
from ..provenance import read_json, write_json


def model_download(name: str, entry: dict[str, Any], out_json: str) -> dict[str, Any]:
    record = models.download(models.ModelSpec.from_config(name, entry))
    write_json(out_json, record)
    print(f"{name}: {record['id']}@{record['revision']} (commit {record['commit']}) in {record['path']}")
    return record


def model_snapshot(name: str, entry: dict[str, Any], out_json: str, cache_dir: str,
                   download_json: str | None = None) -> dict[str, Any]:
    spec = models.ModelSpec.from_config(name, entry)
    downloaded = read_json(download_json) if download_json else None
    return models.snapshot(spec, Path(out_json).parent, cache_dir, downloaded)
