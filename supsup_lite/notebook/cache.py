"""Load-or-train for the notebooks: trained banks cached under the ignored ``runs/cache/``, and a runtime clock.

A notebook wraps each expensive training in :func:`load_or_train`::

    bank = load_or_train("02-gg-bank", settings=dict(tasks=cfg.tasks, batches=cfg.batches, seed=0),
                         train=lambda: train_bank(...))

The cache file is keyed by everything that changes what ``train()`` returns: the name, the ``settings`` the
notebook passes (every value that reaches the training call), the scale, the device type, the torch version and
a hash of the package's source (so editing a kernel retrains instead of loading stale masks). At ``smoke`` scale
it always trains and writes nothing; ``SUPSUP_RETRAIN=1`` forces training and overwrites the file.

File layout: one line of JSON (format, version, key, settings, seconds, CRC32 of the payload), a newline, then the
payload written by ``torch.save``. A file whose header, key or checksum does not match is reported and retrained,
never trusted. The payload is unpickled with ``weights_only=False`` (it holds package objects such as a
``MaskBank``), which is safe only for files this module wrote: never copy someone else's ``runs/cache`` in.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..config import device, project_root, scale_name
from ..core.files import write_atomically

T = TypeVar("T")
FORMAT = "supsup-lite-cache"
VERSION = 1
RETRAIN = "SUPSUP_RETRAIN"


def cache_dir() -> Path:
    """``<project>/runs/cache`` (git-ignored)."""
    return project_root() / "runs" / "cache"


def source_fingerprint() -> str:
    """SHA-256 (first 16 hex digits) of every ``.py`` file of the package outside ``notebook/``."""
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        if "notebook" in path.relative_to(package).parts:
            continue
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def cache_key(name: str, settings: Mapping[str, Any]) -> str:
    """The key of ``name`` trained with ``settings`` here: 16 hex digits over name, settings (canonical JSON),
    scale, device type, torch version and :func:`source_fingerprint`."""
    identity = {"name": name, "settings": settings, "scale": scale_name(), "device": device().type,
                "torch": torch.__version__, "source": source_fingerprint()}
    try:
        canonical = json.dumps(identity, sort_keys=True)
    except TypeError as error:
        raise TypeError(f"settings of {name!r} must be JSON values (numbers, strings, lists, dicts); {error}. "
                        "Pass the numbers that reach the training call, not objects") from None
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _read(path: Path, key: str) -> tuple[Any, dict[str, Any]]:
    """The payload and header of a cache file, or ``ValueError`` saying what is wrong with it."""
    raw = path.read_bytes()
    header_line, sep, payload = raw.partition(b"\n")
    try:
        header = json.loads(header_line)
    except ValueError:
        raise ValueError("its header is not JSON") from None
    if not sep or header.get("format") != FORMAT or header.get("version") != VERSION:
        raise ValueError(f"it is not a {FORMAT} file of version {VERSION}")
    if header.get("key") != key:
        raise ValueError(f"its key {header.get('key')!r} is not {key!r}")
    if zlib.crc32(payload) != header.get("crc32"):
        raise ValueError("its payload fails the CRC32 check (truncated or edited)")
    return torch.load(io.BytesIO(payload), map_location=device(), weights_only=False), header


def load_or_train(name: str, *, settings: Mapping[str, Any], train: Callable[[], T]) -> T:
    """``train()``'s result, loaded from ``runs/cache/<name>-<key>.pt`` when a valid file exists, else trained
    and saved there (see the module docstring for the key and the rules). Prints which one happened."""
    if not name or any(c in name for c in "/\\ "):
        raise ValueError(f"name={name!r} must be a non-empty file-name stem without slashes or spaces, "
                         "e.g. '02-gg-bank'")
    key = cache_key(name, settings)
    path = cache_dir() / f"{name}-{key}.pt"
    smoke = scale_name() == "smoke"
    forced = os.environ.get(RETRAIN, "").strip() not in ("", "0")
    if not smoke and not forced and path.exists():
        try:
            value, header = _read(path, key)
        except ValueError as problem:
            print(f"{name}: ignoring the cached {path.name} ({problem}); training again")
        else:
            print(f"{name}: loaded from runs/cache/{path.name} (trained in {header['seconds']:.0f} s; "
                  f"set {RETRAIN}=1 to train again)")
            return value
    start = time.perf_counter()
    value = train()
    seconds = time.perf_counter() - start
    if smoke:
        return value
    buffer = io.BytesIO()
    torch.save(value, buffer)
    payload = buffer.getvalue()
    header = {"format": FORMAT, "version": VERSION, "key": key, "name": name, "settings": settings,
              "seconds": seconds, "crc32": zlib.crc32(payload)}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda file: file.write(json.dumps(header, sort_keys=True).encode() + b"\n" + payload))
    print(f"{name}: trained in {seconds:.0f} s, cached as runs/cache/{path.name}")
    return value


class NotebookClock:
    """Wall time since the notebook's first cell; :meth:`report` prints it with the scale and torch threads."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def report(self) -> float:
        """Print and return the seconds elapsed."""
        seconds = time.perf_counter() - self.start
        print(f"total runtime of this notebook: {seconds:.0f} s ({seconds / 60:.1f} min) at scale "
              f"{scale_name()!r}, {torch.get_num_threads()} torch thread(s), device {device().type}")
        return seconds
