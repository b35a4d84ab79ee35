"""Read an offline W&B run back: its config and summary, decoded from the run's `.wandb` transaction log.

wandb ≥ 0.19 writes offline runs through its Go core and no longer ships a Python reader for the
`.wandb` file, so the framing is read here (LevelDB log format: 7-byte file header `:W&B` + magic +
version; 32 KiB blocks of records with a 4-byte CRC-32, 2-byte length and 1-byte type: full, first,
middle, last) and each record is decoded with wandb's own protobuf, `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7
FILE_IDENT = b":W&B"
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbLogError(ValueError):
    pass


def iter_chunks(data: bytes):
    """Payloads of the log's logical records, reassembled across blocks; the CRC is checked."""
    if data[:4] != FILE_IDENT:
        raise WandbLogError("not a W&B transaction log (no ':W&B' header)")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's tail is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        payload = data[pos + HEADER : pos + HEADER + length]
        if crc == 0 and length == 0 and kind == 0:
            pos += left  # zero padding up to the next block
            continue
        if zlib.crc32(bytes([kind]) + payload) & 0xFFFFFFFF != crc:
            raise WandbLogError(f"CRC mismatch at byte {pos}")
        pos += HEADER + length
        if kind == FULL:
            yield payload
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            yield pending + payload
            pending = b""
        else:
            raise WandbLogError(f"unknown record type {kind} at byte {pos}")


def read_offline_run(run_dir: str | Path, timeout: float = 30.0) -> dict[str, Any]:
    """{"run": {id, project, group, display_name, tags}, "config": {...}, "summary": {...}} of an offline run.

    wandb's core process may still be writing the log after `run.finish()` returns, so the file is
    re-read until its closing `exit` record is there (at most `timeout` seconds).
    """
    files = sorted(Path(run_dir).glob("*.wandb"))
    if not files:
        raise WandbLogError(f"no .wandb file in {run_dir}")
    deadline = time.monotonic() + timeout
    while True:
        try:
            out, complete = _decode(files[0].read_bytes())
        except WandbLogError:
            if time.monotonic() > deadline:
                raise
            complete = False  # a record half-written right now fails its CRC
        if complete:
            return out
        if time.monotonic() > deadline:
            raise WandbLogError(f"{files[0]} has no exit record after {timeout:.0f} s: the run is incomplete")
        time.sleep(0.1)


def _decode(data: bytes) -> tuple[dict[str, Any], bool]:
    from wandb.proto import wandb_internal_pb2

    out: dict[str, Any] = {"run": {}, "config": {}, "summary": {}}
    complete = False
    for chunk in iter_chunks(data):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out["run"] = {
                "id": run.run_id,
                "project": run.project,
                "group": run.run_group,
                "name": run.display_name,
                "tags": list(run.tags),
            }
            _apply(out["config"], run.config.update)
            _apply(out["summary"], run.summary.update)
        elif kind == "config":
            _apply(out["config"], record.config.update)
        elif kind == "summary":
            _apply(out["summary"], record.summary.update)
        elif kind == "exit":
            complete = True
    return out, complete


def _apply(target: dict[str, Any], items) -> None:
    for item in items:
        keys = list(item.nested_key) or [item.key]
        node = target
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = json.loads(item.value_json)
