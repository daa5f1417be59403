"""Checkpoints of one node: its whole state after a round, written atomically, read by --resume.

A checkpoint is two files in ``<machine folder>/checkpoints/``: ``node_<uid>-r<round>.safetensors``
(every tensor of the state) and ``node_<uid>.json`` (the round, the structure the tensors
fit into, and the round's results record). Each is written to a temporary file and renamed;
the JSON is renamed last and names its tensor file, so a node killed at any moment leaves
either the previous checkpoint or the new one, never a mix. Older tensor files are removed
once the new JSON is in place. Nothing is pickled: structure is JSON, tensors safetensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the node; the message names the file."""


def pack(obj: Any, tensors: dict[str, torch.Tensor], path: str = "s") -> Any:
    """`obj` (dicts, lists, tuples, numbers, strings, None and tensors) as JSON data, its
    tensors moved into `tensors` under their path and replaced by ``{"__tensor__": path}``."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"{path}: only str and int keys can be checkpointed")
        return {"__dict__": [[k, pack(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [pack(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{path}: cannot checkpoint a {type(obj).__name__}")


def unpack(data: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `pack`."""
    if isinstance(data, dict):
        if "__tensor__" in data:
            return tensors[data["__tensor__"]]
        if "__dict__" in data:
            return {k: unpack(v, tensors) for k, v in data["__dict__"]}
        if "__list__" in data:
            items = [unpack(v, tensors) for v in data["__list__"]]
            return tuple(items) if data.get("tuple") else items
    return data


def folder_of(machine_dir: str | Path) -> Path:
    return Path(machine_dir) / CHECKPOINTS


def write_checkpoint(machine_dir: str | Path, uid: int, round_: int, state: dict[str, Any],
                     record: dict[str, Any]) -> Path:
    """Write node `uid`'s `state` after `round_` (and that round's results record)."""
    folder = folder_of(machine_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = pack(state, tensors)
    name = f"node_{uid}-r{round_}.safetensors"
    tmp = folder / f".{name}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, folder / name)
    meta = {"uid": uid, "round": round_, "tensors": name, "state": skeleton, "record": record}
    head = folder / f"node_{uid}.json"
    tmp = folder / f".node_{uid}.json.tmp"
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, head)
    for old in folder.glob(f"node_{uid}-r*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return head


def read_checkpoint(machine_dir: str | Path, uid: int) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
    """(round, state, record) of node `uid`'s last checkpoint, or None when it has none."""
    head = folder_of(machine_dir) / f"node_{uid}.json"
    if not head.exists():
        return None
    try:
        meta = json.loads(head.read_text())
        tensors = load_file(str(folder_of(machine_dir) / meta["tensors"]))
        return int(meta["round"]), unpack(meta["state"], tensors), dict(meta.get("record") or {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{head}: cannot read node {uid}'s checkpoint: {e}") from None


def repair_results(path: str | Path) -> int | None:
    """Cut a results file back to its last complete record (a node killed while writing
    leaves half a line); return the round of that record, or None when there is none."""
    path = Path(path)
    if not path.exists():
        return None
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    last = None
    for line in data[:keep].splitlines():
        if line.strip():
            try:
                last = int(json.loads(line)["round"])
            except (ValueError, KeyError, TypeError):
                break
    if keep != len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
    return last
