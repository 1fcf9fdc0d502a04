"""The tuner's records, kept between runs in ``onnxsparse-tune.json`` of the cache folder.

A record is found again only under the same key: a digest of everything a candidate's figures depend
on (the input model's bytes and its data files, the pipeline, the budget, the metric's code, the data
files and their settings, this tool's and onnxruntime's versions). Inputs or a metric given as
Python objects cannot be fingerprinted: such a run reuses nothing. A failed build is never reused (a
full disk or a killed worker says nothing of the next run); timings are reused only on the machine
that measured them (see search.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnxruntime as ort

from ..calibration import input_files
from ..errors import InputDataError, OutputPathError
from ..files import describe_os_error
from ..pipeline import paths_in
from ..version import __version__
from .records import FAILED, Record

log = logging.getLogger(__name__)

CACHE_FILE = "onnxsparse-tune.json"
FORMAT = 1


class RecordCache:
    """Records by key; written through at every change (a killed search keeps what it measured)."""

    def __init__(self, folder: Path, fingerprint: str | None) -> None:
        self.path = folder / CACHE_FILE
        self.fingerprint = fingerprint or os.urandom(16).hex()  # unknown: a key nothing matches
        self._keys: dict[str, str] = {}  # pipeline -> key, for put_record
        self._records: dict[str, dict[str, Any]] = self._read()

    def _read(self) -> dict[str, dict[str, Any]]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            data = None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("records"), dict):
            log.warning("tune: %s is not a cache this version reads: starting a new one", self.path)
            return {}
        return data["records"]

    def key(self, pipeline: str) -> str:
        key = hashlib.blake2b(f"{self.fingerprint}\n{pipeline}".encode(), digest_size=10).hexdigest()
        self._keys[pipeline] = key
        return key

    def reusable(self, key: str) -> Record | None:
        """The record under ``key`` when its model is still on disk (marked reused), else None."""
        found = self.get(key)
        if found is None or not Path(found.file).exists():
            return None
        found.reused = True
        return found

    def get(self, key: str) -> Record | None:
        data = self._records.get(key)
        if not isinstance(data, dict) or data.get("status") == FAILED:
            return None
        known = {f.name for f in dataclasses.fields(Record)}
        try:
            return Record(**{k: v for k, v in data.items() if k in known})
        except TypeError:  # a record without its required fields
            return None

    def put(self, key: str, record: Record) -> None:
        self._records[key] = dataclasses.asdict(record)
        staged = self.path.with_name(self.path.name + ".tmp")
        try:
            staged.write_text(json.dumps({"format": FORMAT, "records": self._records}, indent=1), encoding="utf-8")
            staged.replace(self.path)
        except OSError as error:
            raise OutputPathError(f"{self.path}: the tuner's cache cannot be written ({describe_os_error(error)})") from error

    def put_record(self, record: Record) -> None:
        self.put(self._keys.get(record.pipeline) or self.key(record.pipeline), record)


def fingerprint(model: Path, data_files: Sequence[Path], inputs: Any, calibration: Any, metric: Any, settings: tuple[Any, ...]) -> str | None:
    """The digest every key of a run starts from, or None when something it depends on cannot be
    fingerprinted (inputs or a metric given as Python objects)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(model.read_bytes())
    for path in data_files:
        digest.update(_stamp(path))
    for spec in (inputs, calibration):
        files = _files(spec)
        if files is None:
            return None
        for path in files:
            digest.update(_stamp(path))
    code = _metric_code(metric)
    if code is None:
        return None
    digest.update(code)
    digest.update(repr((settings, __version__, ort.__version__)).encode())
    return digest.hexdigest()


def _stamp(path: Path) -> bytes:
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()


def _files(spec: Any) -> list[Path] | None:
    """The files an input spec reads (as resolve_inputs finds them); None for Python objects."""
    if spec is None:
        return []
    paths = paths_in(spec)
    return [path for item in paths for path in input_files(item)] if paths else None


def metric_file(metric: Any) -> Path | None:
    """A ``file.py:function`` metric's file (read by the run, never written over); else None."""
    if isinstance(metric, str) and metric.rpartition(":")[0].endswith(".py"):
        return Path(metric.rpartition(":")[0])
    return None


def _metric_code(metric: Any) -> bytes | None:
    """What the metric's result depends on: its file's bytes (``file.py:fn``, or ``module:fn``'s
    module); None for a function object (its closure and defaults cannot be fingerprinted)."""
    if metric is None:
        return b"no metric"
    if not isinstance(metric, str):
        return None
    where, _, name = metric.rpartition(":")
    path = metric_file(metric)
    if path is None:
        try:
            spec = importlib.util.find_spec(where)
        except (ImportError, ValueError) as error:
            raise InputDataError(f"--metric {metric}: cannot import {where} ({error})") from error
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            return None
        path = Path(spec.origin)
    try:
        return path.read_bytes() + name.encode()
    except OSError as error:
        raise InputDataError(f"--metric {metric}: {path} cannot be read ({describe_os_error(error)})") from error
