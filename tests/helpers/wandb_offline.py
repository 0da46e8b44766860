"""Read an offline W&B run file (``run-<id>.wandb``) without network or the W&B service.

The file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of fragments, each with a
4-byte CRC, a 2-byte little-endian length and a 1-byte type (1 full, 2 first, 3 middle, 4 last),
whose payloads are ``wandb_internal_pb2.Record`` protobufs.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7


def records(path: Path) -> list[pb.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if length == 0 and kind == 0:
            pos += left  # zero padding to the end of the block
            continue
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending + payload)
            out.append(rec)
            pending = b""
        else:
            pending += payload
    return out


def finished_records(path: Path, timeout: float = 30.0) -> list[pb.Record]:
    """:func:`records` once the file holds its closing ``exit`` record: W&B's service process can
    still be writing the file when ``wandb.finish()`` returns (seen about once in a dozen runs
    as a file without its history yet). Fails after ``timeout`` seconds without it."""
    deadline = time.monotonic() + timeout
    while True:
        out = records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in out):
            return out
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout} s"
        time.sleep(0.1)


def config_and_history(path: Path) -> tuple[dict, set[str]]:
    """The run's config (key -> value) and every key ever logged to its history, once the run
    has finished writing the file (:func:`finished_records`)."""
    config, keys = {}, set()
    for rec in finished_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "config":
            for item in rec.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "run":
            for item in rec.run.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "history":
            keys |= {item.key or "/".join(item.nested_key) for item in rec.history.item}
    return config, keys


def wandb_group(path: Path) -> str:
    """The run's group (set at ``wandb.init``)."""
    for rec in records(path):
        if rec.WhichOneof("record_type") == "run":
            return rec.run.run_group
    raise AssertionError(f"no run record in {path}")
