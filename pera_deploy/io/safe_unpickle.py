"""Reading training checkpoints without executing anything they name.

Training frameworks pickle much more than tensors: optimizer state, `argparse.Namespace` or
Lightning `AttributeDict` hyper-parameters, DeepSpeed's loss scaler and stage enum, numpy
scalars. `torch.load(weights_only=True)` refuses all of those, and a plain `torch.load`
runs whatever the pickle names. This unpickler sits in between, under `torch.load`'s own
zip and storage handling (so storages are still memory-mapped):

* torch's tensor rebuilders, dtypes, `torch.Size` and the handful of builtins that
  `weights_only` itself allows are the real thing;
* every other class a pickle names becomes an inert stand-in: it is never imported, never
  called, its state is kept as plain data (`Inert`);
* a pickle that *calls* something other than those rebuilders (a function such as
  `os.system`, `builtins.eval`, `subprocess.check_output`, `functools.partial`, anything
  from a module that runs programs or code) is refused, naming the file and the global.
  Calls to class-like names elsewhere (an `Enum` member, a numpy scalar, a `Path`) only
  make inert data and are accepted.

Nothing from the checkpoint is imported or executed in any case.
"""

from __future__ import annotations

import _compat_pickle
import pickle
import types
from pathlib import Path
from typing import Any

from ..errors import InputError

# Modules whose globals are never mere data: calling anything from them could run code,
# programs or I/O. A pickle that calls into them is refused.
DANGEROUS_MODULES = (
    "os", "posix", "nt", "subprocess", "sys", "builtins", "__builtin__", "importlib", "runpy", "pickle", "_pickle",
    "shutil", "socket", "ctypes", "code", "codeop", "pty", "commands", "marshal", "types", "functools", "operator",
    "multiprocessing", "asyncio", "threading", "signal", "webbrowser", "platform", "pdb", "timeit", "tempfile",
    "io", "_io", "shelve", "dill", "torch", "numpy.testing", "numpy.lib.npyio", "numpy.f2py",
    "pydoc", "site", "distutils", "setuptools", "pip", "zipimport", "trace", "cProfile", "profile", "glob",
)
# Calls that only build plain data, kept as inert values rather than refused.
INERT_CALLS = {
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "copyreg._reconstructor", "collections.defaultdict", "builtins.frozenset", "builtins.slice",
    "builtins.range", "builtins.object", "datetime.datetime", "datetime.date", "datetime.time",
    "datetime.timedelta", "datetime.timezone",
}


class Refused(Exception):
    """The pickle tried to call `name`."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class Inert:
    """Something a checkpoint named, kept as data: the global's name, the arguments it was
    built with, and the state and items pickle gave it. Nothing of it ever runs."""

    __inert_name__ = "?"
    __inert_callable__ = False

    def __new__(cls, *args: Any, **kwargs: Any) -> Inert:  # NEWOBJ: cls.__new__(cls, *args)
        obj = object.__new__(cls)
        obj.__dict__["args"] = args
        return obj

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value: Any) -> None:
        self.__dict__.setdefault("list", []).append(value)

    def extend(self, values: Any) -> None:
        self.__dict__.setdefault("list", []).extend(values)

    def __repr__(self) -> str:
        return f"<inert {self.__inert_name__}>"


class _InertMeta(type):
    """The metaclass of stand-ins: pickle's REDUCE calls a global; for a stand-in that call
    either makes inert data or is refused. NEWOBJ (`cls.__new__`) never gets here."""

    __inert_name__: str
    __inert_callable__: bool

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if not cls.__inert_callable__:
            raise Refused(cls.__inert_name__)
        obj: Any = object.__new__(cls)  # type: ignore[arg-type]
        obj.__dict__["args"] = args
        return obj


def _stand_in(module: str, name: str) -> type:
    qualified = f"{module}.{name}"
    top = name.split(".")[-1]
    dangerous = any(module == m or module.startswith(m + ".") for m in DANGEROUS_MODULES)
    # A class-like name outside the dangerous modules (an Enum, a dataclass, a Path) only
    # makes data when called; a function-like name (lower case) is a call we refuse.
    callable_as_data = qualified in INERT_CALLS or (not dangerous and top[:1].isupper())
    return _InertMeta(top, (Inert,), {"__inert_name__": qualified, "__inert_callable__": callable_as_data,
                                      "__module__": __name__})


def _allowed() -> dict[str, Any]:
    """What torch's own weights_only unpickler allows: tensor rebuilders, storages, dtypes,
    torch.Size, OrderedDict and a few builtins (set, bytearray, complex, codecs.encode)."""
    from torch import _weights_only_unpickler

    return dict(_weights_only_unpickler._get_allowed_globals())


def _checked_rebuild_from_type(allowed: dict[str, Any]) -> Any:
    """torch._tensor._rebuild_from_type_v2 calls the tensor subclass it is given: only for
    torch.Tensor and Parameter (as weights_only does)."""
    import torch

    real = allowed["torch._tensor._rebuild_from_type_v2"]

    def rebuild(func: Any, new_type: Any, args: Any, state: Any) -> Any:
        if new_type not in (torch.Tensor, torch.nn.Parameter):
            raise Refused(f"torch._tensor._rebuild_from_type_v2 of {getattr(new_type, '__inert_name__', new_type)}")
        return real(func, new_type, args, state)

    return rebuild


class SafeUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose find_class never imports: see the module's docstring.

    `extra` allows more real classes for one reader (DCP's metadata dataclasses)."""

    _allowed: dict[str, Any] | None = None
    _stand_ins: dict[str, type] = {}

    def __init__(self, file: Any, *, extra: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.extra = extra or {}

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 2 pickles (torch.save's) name Python 2 modules; the base class maps them back
        # to Python 3 names before importing, and so must we (`__builtin__.set` is `builtins.set`).
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        cls = type(self)
        if cls._allowed is None:
            allowed = _allowed()
            allowed["torch._tensor._rebuild_from_type_v2"] = _checked_rebuild_from_type(allowed)
            cls._allowed = allowed
        qualified = f"{module}.{name}"
        if qualified in cls._allowed:
            return cls._allowed[qualified]
        if qualified in self.extra:
            return self.extra[qualified]
        if qualified not in cls._stand_ins:
            cls._stand_ins[qualified] = _stand_in(module, name)
        return cls._stand_ins[qualified]


# torch.load takes a "pickle module": anything with Unpickler and load.
safe_pickle_module = types.ModuleType("pera_deploy_safe_pickle")
safe_pickle_module.Unpickler = SafeUnpickler  # type: ignore[attr-defined]
safe_pickle_module.load = lambda file, **kw: SafeUnpickler(file, **kw).load()  # type: ignore[attr-defined]
safe_pickle_module.__name__ = "pickle"  # torch.load checks the module's name for some messages only


def refuse_compressed_entries(path: Path) -> None:
    """torch.save stores every entry of its zip container uncompressed, which is what lets a
    storage be memory-mapped. A compressed entry is not torch's doing, cannot be mapped, and
    would be inflated whole into memory before anything could check it: a 1 MB file can
    declare gigabytes (a zip bomb). So it is refused, naming the entry and its declared size,
    before torch opens the file."""
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            return  # a legacy (pre-1.6) pickle: read as a stream, nothing to inflate
        with zipfile.ZipFile(path) as container:
            for entry in container.infolist():
                if entry.compress_type != zipfile.ZIP_STORED:
                    raise InputError(f"{path}: entry {entry.filename} is compressed ({entry.file_size:,} bytes "
                                     f"declared from {entry.compress_size:,}); torch.save never compresses, so it is "
                                     "refused rather than inflated into memory")
    except zipfile.BadZipFile as exc:
        raise InputError(f"{path}: truncated or corrupt checkpoint ({exc})") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, expected a checkpoint file") from None
    except (FileNotFoundError, PermissionError) as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None


def load_checkpoint(path: Path, mmap: bool = True) -> Any:
    """Whatever a training checkpoint holds, tensors real (memory-mapped where the file allows)
    and every other object inert; an InputError naming the file for anything refused or broken."""
    import torch

    refuse_compressed_entries(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=safe_pickle_module,
                              mmap=mmap)
        except RuntimeError as exc:
            if not mmap or "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=safe_pickle_module)
    except Refused as exc:
        raise InputError(f"{path}: refused: the pickle calls {exc.name}, which pera-deploy never runs "
                         "(only torch's tensor rebuilders are)") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, expected a checkpoint file") from None
    except (FileNotFoundError, PermissionError) as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    except Exception as exc:  # noqa: BLE001  only torch's loader ran, on the user's bytes
        first = (str(exc).splitlines() or [""])[0][:200]
        raise InputError(f"{path}: truncated or corrupt checkpoint ({type(exc).__name__}: {first})") from None


def loads_safely(data: bytes, where: Path | str, allowed: dict[str, Any] | None = None) -> Any:
    """A plain pickle (no torch zip container: DCP's .metadata), read the same safe way, with
    `allowed` naming the extra classes this kind of file may build for real."""
    import io

    try:
        return SafeUnpickler(io.BytesIO(data), extra=allowed).load()
    except Refused as exc:
        raise InputError(f"{where}: refused: the pickle calls {exc.name}, which pera-deploy never runs") from None
    except Exception as exc:  # noqa: BLE001
        first = (str(exc).splitlines() or [""])[0][:200]
        raise InputError(f"{where}: truncated or corrupt ({type(exc).__name__}: {first})") from None
