"""Memory-mapped safetensors reading and streaming writing.

We parse the (tiny, documented) safetensors header ourselves instead of going through `safetensors.numpy`
because that API has no bfloat16 and materialises whole tensors; a memory map lets the loader copy only the
slice each device needs, so peak host memory stays about one tensor shard, not the model.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

from retro_jax.user_errors import UserError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(UserError):  # a UserError is a ValueError; the CLI prints it as one line
  """A checkpoint that does not match the model; the message names the tensor."""


def _read_header(path: str) -> tuple[dict, int]:
  with open(path, "rb") as f:
    (size,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(size))
  header.pop("__metadata__", None)
  return header, 8 + size


class SafetensorsDir:
  """All tensors of an HF model directory: one `model.safetensors`, or shards listed by the index json."""

  def __init__(self, model_dir: str):
    index_path = os.path.join(model_dir, INDEX_NAME)
    if os.path.exists(index_path):
      with open(index_path, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(model_dir, SINGLE_NAME)):
      files = [SINGLE_NAME]
    else:
      raise CheckpointError(
          f"no {SINGLE_NAME} or {INDEX_NAME} in {model_dir!r} (only safetensors checkpoints are loaded; "
          "pickled .bin files are refused on purpose)")
    self._where: dict[str, tuple[str, dict, int]] = {}
    for name in files:
      path = os.path.join(model_dir, name)
      if not os.path.exists(path):
        raise CheckpointError(f"{INDEX_NAME} lists {name!r}, which is missing from {model_dir!r}")
      header, data_start = _read_header(path)
      for key, info in header.items():
        self._where[key] = (path, info, data_start)

  def keys(self) -> set[str]:
    return set(self._where)

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._where[key][1]["shape"])

  def get(self, key: str) -> np.ndarray:
    """A read-only memory map of one tensor (no bytes are read until sliced)."""
    path, info, data_start = self._where[key]
    if info["dtype"] not in _DTYPES:
      raise CheckpointError(f"{key}: unsupported safetensors dtype {info['dtype']}")
    begin, _ = info["data_offsets"]
    shape = tuple(info["shape"])
    if not shape or 0 in shape:
      return np.zeros(shape, _DTYPES[info["dtype"]])
    return np.memmap(path, dtype=_DTYPES[info["dtype"]], mode="r", offset=data_start + begin, shape=shape)


def _write_file(path: str, tensors: list[tuple[str, np.ndarray]]) -> None:
  header, offset = {}, 0
  for key, arr in tensors:
    header[key] = {"dtype": _CODES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
  header["__metadata__"] = {"format": "pt"}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the spec aligns the data start to 8 bytes
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for _, arr in tensors:
      f.write(np.ascontiguousarray(arr).tobytes())


def write_safetensors_dir(out_dir: str, tensors: Iterable[tuple[str, np.ndarray]],
                          max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Writes shards of at most `max_shard_bytes` (plus the index json when there is more than one).

  `tensors` is consumed lazily and each shard is written as soon as it is full, so exporting a sharded model
  holds at most one shard on the host.
  """
  os.makedirs(out_dir, exist_ok=True)
  shards: list[list[tuple[str, np.ndarray]]] = []

  def chunks() -> Iterator[list[tuple[str, np.ndarray]]]:
    current, size = [], 0
    for key, arr in tensors:
      if current and size + arr.nbytes > max_shard_bytes:
        yield current
        current, size = [], 0
      current.append((key, arr))
      size += arr.nbytes
    if current:
      yield current

  temp_names, weight_map, total = [], {}, 0
  for i, shard in enumerate(chunks()):
    name = f"shard-{i:05d}.tmp"
    _write_file(os.path.join(out_dir, name), shard)
    temp_names.append(name)
    shards.append([(k, None) for k, _ in shard])  # keep keys only
    total += sum(a.nbytes for _, a in shard)
  if len(temp_names) == 1:
    final = [SINGLE_NAME]
  else:
    final = [f"model-{i + 1:05d}-of-{len(temp_names):05d}.safetensors" for i in range(len(temp_names))]
  for temp, name, shard in zip(temp_names, final, shards):
    os.replace(os.path.join(out_dir, temp), os.path.join(out_dir, name))
    weight_map.update({k: name for k, _ in shard})
  if len(final) > 1:
    with open(os.path.join(out_dir, INDEX_NAME), "w", encoding="utf-8") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return final
