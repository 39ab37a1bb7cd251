"""Provenance records carried by every artifact, atomic HDF5/JSON writing, and consumer-side checks."""

from __future__ import annotations

import contextlib
import csv
import errno
import functools
import hashlib
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import h5py
import numpy as np

from . import __version__


# Numeric artifact datasets carry HDF5's Fletcher-32 checksum: a flipped or zeroed byte fails the read (an error
# naming the file, see open_h5) instead of returning wrong numbers; HDF5 keeps no checksum otherwise.
CHECKSUM = {"fletcher32": True}


class ProvenanceError(ValueError):
    """An artifact does not belong to what its consumer expects (other model, width, corpus, layer...)."""


class ArtifactWriteError(OSError):
    """An artifact could not be written (disk full, file-size limit or quota, read-only or forbidden folder)."""


# The write failures a user can fix where the results live, and what to tell them.
_WRITE_FAILURES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file exceeds the file-size limit (ulimit -f, or the job's limit)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "the operation is not permitted",
}


def code_version() -> str:
    return f"superposition {__version__}"


def environment() -> dict[str, str]:
    """Versions of the code and libraries, read from package metadata (importing torch here costs seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {
        "code_version": code_version(),
        "python": platform.python_version(),
        "torch": installed("torch"),
        "transformers": installed("transformers"),
    }


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; it replaces ``path`` only if the block finishes.

    Nothing half-written is ever left under the final name.
    """
    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, final)
    except OSError as err:
        cause = _WRITE_FAILURES.get(err.errno)
        if cause is None or isinstance(err, ArtifactWriteError):
            raise
        raise ArtifactWriteError(err.errno, f"cannot write {final}: {cause} ({err.strerror}); nothing was written "
                                            f"under that name. Free space or fix the folder, then run snakemake again",
                                 str(final)) from err
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        elif tmp.exists():
            tmp.unlink()


def write_h5(path: str | os.PathLike, datasets: Mapping[str, Any], record: Mapping[str, Any], *,
             compress: Iterable[str] = ()) -> None:
    """An HDF5 artifact, written atomically: ``datasets`` by their path in the file ("G", "closed_form/deltas"),
    ``record`` (its provenance) as the file's attributes. Numeric datasets carry the Fletcher-32 checksum, lists
    of str become string datasets, the ``compress`` ones are gzipped."""
    compress = set(compress)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for name, data in datasets.items():
                if isinstance(data, (list, tuple)) and all(isinstance(item, str) for item in data) and data:
                    f.create_dataset(name, data=list(data), dtype=h5py.string_dtype())
                    continue
                array = np.asarray(data)
                options = dict(CHECKSUM) if array.size else {}  # filters need a chunked, non-empty dataset
                if name in compress and array.size:
                    options["compression"] = "gzip"
                f.create_dataset(name, data=array, **options)
            set_attrs(f, dict(record))


def write_json(path: str | os.PathLike, payload: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=False,
                                  default=functools.partial(_json_default, where=str(path))) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ProvenanceError(f"{path}: not valid JSON ({err})") from err


def _json_default(value: Any, where: str = "a value") -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{where}: a value of type {type(value).__name__} is not JSON serialisable")


def set_attrs(obj: h5py.Group | h5py.Dataset, record: dict[str, Any]) -> None:
    """Store a provenance dict as HDF5 attributes (nested values as JSON strings)."""
    for key, value in record.items():
        if value is None:
            obj.attrs[key] = "null"
        elif isinstance(value, (dict, list, tuple, np.ndarray)):
            obj.attrs[key] = json.dumps(value, default=functools.partial(_json_default, where=f"attribute {key!r}"))
        elif isinstance(value, np.generic):
            obj.attrs[key] = value.item()
        elif isinstance(value, str):
            obj.attrs[key] = str(value)
        else:
            obj.attrs[key] = value


def get_attrs(obj: h5py.Group | h5py.Dataset) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, str):
            if value == "null":
                value = None
            elif value[:1] in "[{":
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


@contextlib.contextmanager
def open_h5(path: str | os.PathLike, what: str, rule: str) -> Iterator[h5py.File]:
    """Open an artifact for reading; a missing, truncated or corrupt file, or a dataset that cannot be read
    (damaged, or missing from a file of another layout) inside the block, is an error naming the file and the
    rule that rebuilds it."""
    try:
        handle = h5py.File(path, "r")
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file {path} does not exist") from None
    except OSError as err:
        raise ProvenanceError(f"{what} file {path} is corrupt or truncated ({err}); delete it and run snakemake "
                              f"again: the {rule} rule rebuilds it") from err
    try:
        with handle:
            yield handle
    except (OSError, KeyError) as err:
        raise ProvenanceError(f"{what} file {path} is damaged: reading it failed ({type(err).__name__}: {err}); "
                              f"delete it and run snakemake again: the {rule} rule rebuilds it") from err


def check_artifact(attrs: dict[str, Any], path: str | os.PathLike, what: str, rule: str,
                   model: str | Mapping[str, Any], **expected: Any) -> None:
    """The check every reader makes: the artifact is of the consumer's model (its name, and its revision when the
    consumer passes ``models.identity(manifest)``) and has the expected fields (layer, d_m, ...). A mismatch names
    the file, the field, both values and the rule that rebuilds it."""
    wanted = dict(model) if isinstance(model, Mapping) else {"model": model}
    wanted.update(expected)
    for key, want in wanted.items():
        have = attrs.get(key)
        if have != want:
            raise ProvenanceError(f"{path}: this {what} has {key} = {have!r} but {want!r} was expected (it was made "
                                  f"for another model, revision or layer): delete it and rerun the {rule} rule")


def write_table(path, rows: Iterable[dict[str, Any]], cols: Sequence[str]) -> None:
    """A TSV artifact, atomically: a header of ``cols``, one line per row (missing values empty, floats to 8 digits)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
            writer.writerow(cols)
            for row in rows:
                writer.writerow([_fmt(row.get(c)) for c in cols])


def read_table(path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.8g}"
    return str(value)
