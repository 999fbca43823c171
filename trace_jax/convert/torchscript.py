"""The tensors of a TorchScript archive (OpenAI's ``clip.load`` ``.pt`` files), read without running its code.

``torch.jit.load`` executes the archive: it compiles the TorchScript in ``code/`` and its unpickler
rebuilds objects (``__setstate__`` methods included) from whatever ``data.pkl`` names. A downloaded
checkpoint should only contribute numbers, so this module reads the zip itself:

* ``<archive>/data.pkl`` goes through :class:`RestrictedUnpickler`, whose ``find_class`` admits only
  tensor rebuilds (``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter``), the storage types
  (``torch.FloatStorage``, ``torch.HalfStorage``, ...), ``collections.OrderedDict``, TorchScript's
  list builders (``torch.jit._pickle``), and the archive's own ``__torch__.*`` classes, which are
  replaced by :class:`ScriptObject`, a plain holder of the pickled state (no method of the archive
  runs). Any other global is refused with an error naming it.
* ``persistent_load`` reads each storage from ``<archive>/data/<key>`` as a NumPy array (torch is not
  needed), as torch's own ``weights_only`` loader does.
* The state-dict names come from walking the module tree: a module's parameters and buffers are the
  ``__parameters__`` / ``__buffers__`` lists of its class in ``<archive>/code/`` (read as text, never
  executed), so plain tensor attributes stay out, as in ``ScriptModule.state_dict()``.
"""
from __future__ import annotations

import collections
import io
import pickle
import re
import zipfile
from typing import Any

import numpy as np

# storage class name -> NumPy dtype name (bfloat16 through ml_dtypes, which jax depends on)
STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
}


class UnsafeArchiveError(ValueError):
  """The archive's pickle asks for something other than tensors and plain containers."""


def is_torchscript(path: str) -> bool:
  """True for a zip holding a TorchScript archive (``*/constants.pkl`` or ``*/code/``), not a
  ``torch.save`` file (which has ``data.pkl`` but no code)."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


class ScriptObject:
  """Stand-in for an instance of a ``__torch__.*`` class: stores what the pickle gives, runs nothing."""
  qualified_name = "__torch__"
  args: tuple = ()
  state: Any = None  # NEWOBJ makes instances without __init__; BUILD may never come

  def __init__(self, *args):  # REDUCE: cls(*args)
    self.args, self.state = args, None

  def __setstate__(self, state):  # BUILD: the attribute dict (or a __getstate__ value)
    self.state = state

  def attributes(self) -> dict:
    return self.state if isinstance(self.state, dict) else {}

  def __repr__(self):
    return f"<{self.qualified_name}>"


class _StorageType:
  """What ``find_class('torch', 'FloatStorage')`` returns: only a dtype, never torch's class."""

  def __init__(self, name: str):
    self.name, self.dtype = name, _dtype(STORAGE_DTYPES[name])


def _dtype(name: str) -> np.dtype:
  if name == "bfloat16":
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
  """torch._utils._rebuild_tensor_v2 on a NumPy storage: a strided view, bounds-checked, copied."""
  del requires_grad, backward_hooks, metadata  # autograd state: irrelevant for weights
  if not isinstance(storage, np.ndarray) or storage.ndim != 1:
    raise UnsafeArchiveError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  offset = int(storage_offset)
  if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
    raise ValueError(f"malformed tensor: size {size}, stride {stride}, offset {offset}")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.shape[0]:
    raise ValueError(f"tensor of size {size} (stride {stride}, offset {offset}) reaches past its "
                     f"storage of {storage.shape[0]} elements")
  view = np.lib.stride_tricks.as_strided(storage[offset:], size, [s * storage.itemsize for s in stride],
                                         writeable=False)
  return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  del requires_grad, backward_hooks, state
  return data


def _first(data, *_):
  """torch.jit._pickle.build_*list(data) and restore_type_tag(value, type): the value itself."""
  return data


ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch.jit._pickle", n): _first for n in (
        "build_intlist", "build_doublelist", "build_boollist", "build_tensorlist", "build_genericlist",
        "restore_type_tag")},
}


class RestrictedUnpickler(pickle.Unpickler):
  """Unpickles only tensors, plain containers and ``__torch__`` attribute holders (module doc)."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str, what: str):
    super().__init__(file)
    self.archive, self.prefix, self.byteorder, self.what = archive, prefix, byteorder, what
    self.classes: dict[str, type] = {}
    self.storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str):
    if (module, name) in ALLOWED:
      fn = ALLOWED[(module, name)]
      return lambda *a, **k: fn(*a, **k)  # a fresh function: a BUILD on it cannot alter ours
    if module == "torch" and name in STORAGE_DTYPES:
      return _StorageType(name)
    if module == "__torch__" or module.startswith("__torch__."):
      qual = f"{module}.{name}"
      if qual not in self.classes:  # a fresh attribute holder per TorchScript class: nothing runs
        self.classes[qual] = type(name, (ScriptObject,), {"qualified_name": qual})
      return self.classes[qual]
    raise UnsafeArchiveError(
        f"{self.what}: refusing to load: its pickle asks for the global {module}.{name}, which is "
        f"neither a tensor nor a plain container (loading it could run code from the file)")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
      raise UnsafeArchiveError(f"{self.what}: unexpected persistent id {pid!r} (only tensor storages "
                               f"are read)")
    _, stype, key, _location, numel = pid
    if key not in self.storages:
      entry = f"{self.prefix}data/{key}"
      try:
        raw = self.archive.read(entry)
      except KeyError:
        raise ValueError(f"{self.what}: storage {entry} is missing from the archive") from None
      dtype = stype.dtype if self.byteorder == "little" or stype.dtype.itemsize == 1 \
          else stype.dtype.newbyteorder(">")
      if len(raw) < int(numel) * dtype.itemsize:
        raise ValueError(f"{self.what}: storage {entry} holds {len(raw)} bytes, "
                         f"{int(numel)} x {dtype.itemsize} expected")
      self.storages[key] = np.frombuffer(raw, dtype, count=int(numel)).astype(dtype.newbyteorder("="))
    return self.storages[key]


def _class_tables(archive: zipfile.ZipFile, prefix: str) -> dict[str, tuple[bool, list[str]]]:
  """{qualified class name: (is a Module, parameter + buffer names)} from ``code/**/*.py`` (text only).

  ``code/__torch__/a/b.py`` defines the classes ``__torch__.a.b.<Name>``; a module class reads
  ``class Name(Module):`` followed by ``__parameters__ = ["w", ]`` and ``__buffers__ = [...]``.
  """
  tables = {}
  code = f"{prefix}code/"
  for entry in archive.namelist():
    if not (entry.startswith(code) and entry.endswith(".py")):
      continue
    module = entry[len(code):-len(".py")].replace("/", ".")
    text = archive.read(entry).decode("utf-8", errors="replace")
    for m in re.finditer(r"^class (\w+)\(([\w.]*)\):\n((?:(?:[ \t]+[^\n]*)?\n)*)", text, re.M):
      name, base, body = m.groups()
      names = []
      for attr in ("__parameters__", "__buffers__"):
        decl = re.search(rf"^[ \t]+{attr} = \[([^\]]*)\]", body, re.M)
        if decl:
          names += [a or b for a, b in re.findall(r"\"([^\"]*)\"|'([^']*)'", decl.group(1))]
      tables[f"{module}.{name}"] = (base == "Module", names)
  return tables


def _walk(obj: ScriptObject, prefix: str, tables: dict, out: dict, seen: set) -> None:
  """Parameters and buffers of a module object and its submodules, named as ``state_dict()``."""
  if id(obj) in seen:  # a module shared under two names: state_dict lists it under the first
    return
  seen.add(id(obj))
  attrs = obj.attributes()
  is_module, names = tables.get(obj.qualified_name, (None, None))
  if names is None:  # class not found in code/: every tensor attribute (the converter's key check
    names = [k for k, v in attrs.items() if isinstance(v, np.ndarray)]  # names any extra one)
  for k in names:
    if isinstance(attrs.get(k), np.ndarray):  # an Optional parameter may be None
      out[prefix + k] = attrs[k]
  for k, v in attrs.items():
    if isinstance(v, ScriptObject) and tables.get(v.qualified_name, (True, None))[0] is not False:
      _walk(v, f"{prefix}{k}.", tables, out, seen)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """{state_dict key: NumPy array (its stored dtype)} of a TorchScript archive, without running it.

  Raises UnsafeArchiveError (a ValueError) naming any global other than tensors and plain
  containers, and ValueError for a malformed archive.
  """
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    raise ValueError(f"{path}: not a TorchScript archive ({e})") from None
  with archive:
    names = archive.namelist()
    pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
      raise ValueError(f"{path}: expected one <archive>/data.pkl in the zip; found {pkls or 'none'}")
    prefix = pkls[0][:-len("data.pkl")]
    byteorder = "little"
    if f"{prefix}byteorder" in names:
      byteorder = archive.read(f"{prefix}byteorder").decode().strip()
      if byteorder not in ("little", "big"):
        raise ValueError(f"{path}: unknown byte order {byteorder!r}")
    what = f"{path} ({pkls[0]})"
    up = RestrictedUnpickler(io.BytesIO(archive.read(pkls[0])), archive, prefix, byteorder, what)
    try:
      root: Any = up.load()
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError) as e:
      raise ValueError(f"{what}: malformed pickle ({type(e).__name__}: {e})") from None
    tables = _class_tables(archive, prefix)
  if isinstance(root, ScriptObject):
    out: dict[str, np.ndarray] = {}
    _walk(root, "", tables, out, set())
    return out
  if isinstance(root, dict) and all(isinstance(v, np.ndarray) for v in root.values()):
    return dict(root)  # a bare state dict in an archive
  raise ValueError(f"{what}: the pickle holds a {type(root).__name__}, not a module or a state dict")
