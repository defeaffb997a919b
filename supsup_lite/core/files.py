"""Files the package writes and later trusts: a format name and version, CRC32 checksums, atomic writes.

Every such file (a mask bank, a run's per-batch GG counts, its ``results.json``, the NNs learner state) is
written to a temporary file beside its target and renamed over it (:func:`write_atomically`), so a kill at any
moment leaves either the old file or the new one, never half of one. Reading checks the format name, the version
and the checksums, and refuses a damaged file with a sentence naming it (:class:`DamagedFileError`).

Layouts:

* a **tensor file** (``torch.save``, read with ``weights_only=True``, so loading never runs code):
  ``{"format": kind, "version": v, <metadata keys>, <tensor key>: {name: tensor}, "crc32": {"metadata": c,
  name: c}}``, the metadata checksum over the canonical JSON of format, version and metadata
  (:func:`metadata_checksum`), one checksum per tensor over its bytes (:func:`tensor_checksum`);
* a **JSON file**: the body's keys plus ``"format"``, ``"version"`` and ``"crc32"`` (of the canonical JSON of
  everything else).
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import IO, Any, Callable, Mapping

import torch

TENSORS = "tensors"  # the default key of the tensors in a tensor file (mask banks use "packed")


class DamagedFileError(ValueError):
    """A file the package wrote is truncated, edited, of another kind, or of another format version."""


def metadata_checksum(meta: Mapping[str, Any]) -> int:
    """CRC32 of ``meta`` as canonical JSON (sorted keys)."""
    return zlib.crc32(json.dumps(meta, sort_keys=True).encode())


def tensor_checksum(tensor: torch.Tensor) -> int:
    """CRC32 of a CPU tensor's bytes."""
    return zlib.crc32(tensor.contiguous().numpy().tobytes())


def write_atomically(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(file)`` on ``<path>.tmp``, flush it to disk, then rename it over ``path``.

    Any exception (a kill, a full disk) leaves ``path`` as it was and removes the temporary file.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_tensors(path: str | os.PathLike, *, kind: str, version: int, metadata: Mapping[str, Any],
                 tensors: Mapping[str, torch.Tensor], tensor_key: str = TENSORS) -> Path:
    """Write a checked tensor file (layout in the module docstring) atomically. ``metadata``: JSON-ready values;
    ``tensors``: name → tensor (saved from the CPU). Returns the path."""
    meta = {"format": kind, "version": version, **metadata}
    cpu = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    crc32 = {"metadata": metadata_checksum(meta), **{name: tensor_checksum(t) for name, t in cpu.items()}}
    return write_atomically(path, lambda file: torch.save({**meta, tensor_key: cpu, "crc32": crc32}, file))


def read_state(path: str | os.PathLike, *, kind: str, version: int, what: str,
               error: type[Exception] = DamagedFileError, tensor_key: str = TENSORS,
               upgrade: str = "") -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Read a tensor file and check its kind, version and metadata checksum (not yet the tensors).

    Returns (metadata with format and version, the tensors as stored, the stored tensor checksums); the caller
    checks each tensor's shape and then :func:`check_tensor`. ``what`` names the file in messages (e.g. "mask
    bank"); ``upgrade`` is added to the message for another version. Raises ``FileNotFoundError`` or ``error``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise error(f"{path} is not a readable {what} (truncated or corrupted?): {err}") from err
    if not isinstance(state, dict) or state.get("format") != kind:
        raise error(f"{path} is not a supsup-lite {what} (format {kind!r} expected)")
    if state.get("version") != version:
        raise error(f"{path} has format version {state.get('version')}, this code reads {version}"
                    + (f" ({upgrade})" if upgrade else ""))
    try:
        meta = {key: value for key, value in state.items() if key not in (tensor_key, "crc32")}
        tensors, stored = dict(state[tensor_key]), dict(state["crc32"])
        intact = metadata_checksum(meta) == stored.pop("metadata")
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise error(f"{path}: the file lacks or garbles part of the {what} ({err!r})") from err
    if not intact:
        raise error(f"{path}: checksum mismatch in the metadata; the file is corrupted")
    return meta, tensors, stored


def check_tensor(path: str | os.PathLike, name: str, tensor: object, crc32: Mapping[str, Any], *,
                 error: type[Exception] = DamagedFileError) -> torch.Tensor:
    """Return ``tensor`` if it is a tensor whose checksum is ``crc32[name]``, else raise ``error``."""
    if not isinstance(tensor, torch.Tensor) or tensor_checksum(tensor) != crc32.get(name):
        raise error(f"{path}: checksum mismatch for {name!r}; the file is corrupted")
    return tensor


def load_tensors(path: str | os.PathLike, *, kind: str, version: int, what: str,
                 error: type[Exception] = DamagedFileError) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a file written by :func:`save_tensors`, every checksum verified: (metadata, name → CPU tensor)."""
    meta, tensors, crc32 = read_state(path, kind=kind, version=version, what=what, error=error)
    if set(tensors) != set(crc32):
        raise error(f"{path}: the {what} names tensors {sorted(tensors)} but checksums {sorted(crc32)}; "
                    f"the file is corrupted")
    return meta, {name: check_tensor(path, name, t, crc32, error=error) for name, t in tensors.items()}


def save_json(path: str | os.PathLike, body: Mapping[str, Any], *, kind: str, version: int) -> Path:
    """Write ``body`` (JSON-ready, without the keys format, version, crc32) as a checked JSON file, atomically."""
    clash = {"format", "version", "crc32"} & set(body)
    if clash:
        raise ValueError(f"body must not use the reserved keys {sorted(clash)}")
    meta = json.loads(json.dumps({"format": kind, "version": version, **body}))  # as a reader will see it
    text = json.dumps({**meta, "crc32": metadata_checksum(meta)}, indent=1) + "\n"
    return write_atomically(path, lambda file: file.write(text.encode()))


def load_json(path: str | os.PathLike, *, kind: str, version: int, what: str) -> dict[str, Any]:
    """Read a file written by :func:`save_json`, checksum verified; returns the body (without format, version,
    crc32). Raises ``FileNotFoundError`` or :class:`DamagedFileError`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        state = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedFileError(f"{path} is not a readable {what} (truncated or corrupted?): {err}") from err
    if not isinstance(state, dict) or state.get("format") != kind:
        raise DamagedFileError(f"{path} is not a supsup-lite {what} (format {kind!r} expected)")
    if state.get("version") != version:
        raise DamagedFileError(f"{path} has format version {state.get('version')}, this code reads {version}")
    stored = state.pop("crc32", None)
    if metadata_checksum(state) != stored:
        raise DamagedFileError(f"{path}: checksum mismatch; the {what} was edited or corrupted")
    return {key: value for key, value in state.items() if key not in ("format", "version")}
