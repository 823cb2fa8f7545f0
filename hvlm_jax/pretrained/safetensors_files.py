"""The tensors of a checkpoint directory's safetensors files, read by slice (numpy, no torch).

`model.safetensors`, or the shards listed by `model.safetensors.index.json`. Headers are read
and checked up front (a truncated or corrupt file fails here, before anything is placed);
`read(name, index)` then memory-maps only the rows a device needs.
"""
from __future__ import annotations

import contextlib
import json
import os

import numpy as np
from safetensors import safe_open

from hvlm_jax.pretrained.hf import PretrainedError

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


class SafetensorsCheckpoint(contextlib.AbstractContextManager):
  """name -> (file, shape, dtype) of every tensor; use as a context manager (keeps handles)."""

  def __init__(self, path: str):
    self.path = path
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f).get("weight_map", {})
      files = sorted({os.path.join(path, v) for v in weight_map.values()})
    elif os.path.isfile(os.path.join(path, SINGLE)):
      files = [os.path.join(path, SINGLE)]
    else:
      raise PretrainedError(f"{path} has neither {SINGLE} nor {INDEX} (save_pretrained writes "
                            "them with safe_serialization, the default).")
    self._stack = contextlib.ExitStack()
    self._handles, self.files, self.shapes, self.dtypes = {}, {}, {}, {}
    for file in files:
      handle = self._open(file)
      for name in handle.keys():
        sl = handle.get_slice(name)
        self.files[name], self._handles[name] = file, handle
        self.shapes[name] = tuple(sl.get_shape())
        self.dtypes[name] = sl.get_dtype()

  def _open(self, file: str):
    if not os.path.isfile(file):
      raise PretrainedError(f"Safetensors file {file} (listed in {INDEX}) does not exist.")
    try:
      handle = self._stack.enter_context(safe_open(file, framework="numpy"))
      expected = _data_end(file)
    except Exception as e:  # safetensors raises its own error types for corrupt headers.
      raise PretrainedError(f"{file} is not a valid safetensors file (truncated or corrupt: "
                            f"{str(e).strip().rstrip('.')}).") from None
    size = os.path.getsize(file)
    if size < expected:
      raise PretrainedError(f"{file} is truncated: its header describes {expected} bytes but "
                            f"the file has {size}.")
    return handle

  def __exit__(self, *exc):
    self._stack.close()

  def names(self) -> list[str]:
    return sorted(self.shapes)

  def read(self, name: str, index: tuple | None = None) -> np.ndarray:
    """Tensor `name` (torch layout), or only `index` (a tuple of slices) of it."""
    sl = self._handles[name].get_slice(name)
    return np.asarray(sl[:] if index is None else sl[index])


def _data_end(file: str) -> int:
  """Bytes the header says the file holds: 8 + header length + the largest data offset."""
  with open(file, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
  ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
  return 8 + n + max(ends, default=0)
