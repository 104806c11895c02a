"""Unpickling without executing anything a pickle names.

Training frameworks pickle much more than tensors: optimizer state, `argparse.Namespace` or
Lightning `AttributeDict` hyper-parameters, DeepSpeed's loss scaler and stage enum, numpy
scalars. `SafeUnpickler` never imports anything a pickle names:

* the globals a reader knows (`known`: for torch.save files, io/torch_save.py's stand-ins for
  torch's tensor rebuilders, dtypes and storages, which describe tensors and run nothing of
  torch's) are those stand-ins;
* with `strict` (adapters, base shards: what torch's `weights_only` reads), any other global
  is refused (`Unsupported`);
* otherwise (training checkpoints) every other class a pickle names becomes an inert
  stand-in: it is never imported, never called, its state is kept as plain data (`Inert`);
  a pickle that *calls* something other than those (a function such as `os.system`,
  `builtins.eval`, `subprocess.check_output`, `functools.partial`, anything from a module
  that runs programs or code) is refused, naming the global (`Refused`). Calls to
  class-like names elsewhere (an `Enum` member, a numpy scalar, a `Path`) only make inert
  data and are accepted, as are the names a reader lists in `inert_calls`.

Before any of it, `check_pickle_nesting` follows the opcodes and refuses containers nested
deeper than MAX_NESTING (or holding themselves). Nothing from a pickle is imported or run.
"""

from __future__ import annotations

import _compat_pickle
import pickle
from pathlib import Path
from typing import Any, Callable, Collection, Mapping

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


class Unsupported(Exception):
    """A strict unpickler met a global it does not know: `name`."""

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

    def fields(self) -> dict[str, Any]:
        """The attributes pickle gave it: a dataclass's or a plain object's `__dict__` state, with
        the slots of a (dict, slots) pair; {} when its state is something else (a tuple)."""
        state = self.__dict__.get("state")
        if isinstance(state, tuple) and len(state) == 2 and all(isinstance(s, (dict, type(None))) for s in state):
            return {**(state[0] or {}), **(state[1] or {})}
        return dict(state) if isinstance(state, dict) else {}

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


def inert_name(value: Any) -> str | None:
    """The global an inert object (or stand-in class) stands for; None for anything else."""
    cls = value if isinstance(value, _InertMeta) else type(value)
    return cls.__inert_name__ if isinstance(cls, _InertMeta) else None


def _stand_in(module: str, name: str, callable_as_data: bool) -> type:
    qualified = f"{module}.{name}"
    return _InertMeta(name.split(".")[-1], (Inert,), {"__inert_name__": qualified,
                                                       "__inert_callable__": callable_as_data, "__module__": __name__})


def _callable_as_data(module: str, name: str) -> bool:
    """A class-like name outside the dangerous modules (an Enum, a dataclass, a Path) only
    makes data when called; a function-like name (lower case) is a call we refuse."""
    dangerous = any(module == m or module.startswith(m + ".") for m in DANGEROUS_MODULES)
    return f"{module}.{name}" in INERT_CALLS or (not dangerous and name.split(".")[-1][:1].isupper())


class SafeUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose find_class never imports: see the module's docstring."""

    _stand_ins: dict[tuple[str, bool], type] = {}

    def __init__(self, file: Any, known: Mapping[str, Any], *, strict: bool, inert_calls: Collection[str] = (),
                 persistent_load: Callable[[Any], Any] | None = None) -> None:
        super().__init__(file)
        self.known = known
        self.strict = strict
        self.inert_calls = inert_calls
        if persistent_load is not None:
            self.persistent_load = persistent_load  # type: ignore[method-assign]

    def find_class(self, module: str, name: str) -> Any:
        # Protocol 2 pickles (torch.save's) name Python 2 modules; the base class maps them back
        # to Python 3 names before importing, and so must we (`__builtin__.set` is `builtins.set`).
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        qualified = f"{module}.{name}"
        if qualified in self.known:
            return self.known[qualified]
        if self.strict:
            raise Unsupported(qualified)
        callable_as_data = qualified in self.inert_calls or _callable_as_data(module, name)
        key = (qualified, callable_as_data)
        if key not in self._stand_ins:
            self._stand_ins[key] = _stand_in(module, name, callable_as_data)
        return self._stand_ins[key]


# Containers nested deeper than this in any pickle pera-deploy reads are refused before it is
# unpickled: real checkpoints nest a dozen levels; a 50,000-deep dict overflows every recursive
# reader, and a deep tuple used as a key overflows the C stack while it is being hashed.
MAX_NESTING = 100


class TooDeep(Exception):
    """The pickle nests containers deeper than MAX_NESTING, or holds a container inside itself."""


class _Node:
    """A container a pickle builds, as far as nesting goes: its depth, and what holds it. A
    frozen node is an immutable one (a tuple of immutables, a scalar): its depth is final,
    and nothing needs to know what holds it."""

    __slots__ = ("depth", "frozen", "parents")

    def __init__(self, depth: int = 1, frozen: bool = False) -> None:
        self.depth = depth
        self.frozen = frozen
        self.parents: list[_Node] = []


_FROZEN = [_Node(depth, frozen=True) for depth in range(MAX_NESTING + 1)]
_LEAF = _FROZEN[0]  # every scalar, string and global: nothing nests inside them


class _Damaged(Exception):
    """The opcodes do something the unpickler refuses (fill a tuple, pop past a MARK): it will
    stop there too."""


def _hold(parent: _Node, child: _Node, limit: int) -> None:
    """`parent` now holds `child`: raise its depth, and that of everything holding it."""
    if parent.frozen:
        raise _Damaged  # a tuple, a string, a number: filling one fails
    if not child.frozen:
        child.parents.append(parent)
    if child.depth < parent.depth:
        return
    if child.depth >= limit:
        raise TooDeep
    if not parent.parents:  # nothing holds it yet: nothing else to raise
        parent.depth = child.depth + 1
        return
    work = [(parent, child.depth + 1)]
    while work:
        node, depth = work.pop()
        if depth <= node.depth:
            continue
        if depth > limit:
            raise TooDeep
        node.depth = depth
        work.extend((above, depth + 1) for above in node.parents)


def _built(children: list[_Node], immutable: bool, limit: int) -> _Node:
    """The node of an object built holding `children` (a tuple when `immutable`)."""
    if immutable and all(child.frozen for child in children):
        depth = 1 + max((child.depth for child in children), default=0)
        if depth > min(limit, MAX_NESTING):
            raise TooDeep
        return _FROZEN[depth]
    node = _Node()
    for child in children:
        _hold(node, child, limit)
    return node


(_STOP, _EMPTY, _MARK, _FILL_TO_MARK, _BUILD_TO_MARK, _DROP_TO_MARK, _FILL, _PUT, _MEMOIZE, _GET, _DUP, _POP,
 _NOTHING, _PUSH_LEAF, _BUILD) = range(15)
_IMMUTABLE = {"TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "FROZENSET", "BINPERSID"}  # BINPERSID: a storage, from its id
_CALLS = {"REDUCE", "NEWOBJ", "NEWOBJ_EX"}
_KINDS: dict[str, int] = {}


def _opcode_kinds() -> dict[str, int]:
    """Opcode name → what it does to nesting (see `check_pickle_nesting`)."""
    import pickletools

    kinds = {}
    for op in pickletools.opcodes:
        name, before, after = op.name, len(op.stack_before), len(op.stack_after)
        kinds[name] = (
            _STOP if name == "STOP" else _EMPTY if name.startswith("EMPTY_") else _MARK if name == "MARK"
            else _FILL_TO_MARK if name in ("APPENDS", "SETITEMS", "ADDITEMS")
            else _BUILD_TO_MARK if name in ("LIST", "TUPLE", "DICT", "FROZENSET", "INST", "OBJ")
            else _DROP_TO_MARK if name == "POP_MARK"
            else _FILL if name in ("APPEND", "SETITEM", "BUILD")
            else _PUT if name in ("PUT", "BINPUT", "LONG_BINPUT") else _MEMOIZE if name == "MEMOIZE"
            else _GET if name in ("GET", "BINGET", "LONG_BINGET") else _DUP if name == "DUP"
            else _POP if name == "POP" else _NOTHING if name == "READONLY_BUFFER" or not (before or after)
            else _BUILD + before if before  # REDUCE, NEWOBJ(_EX), TUPLE1-3, BINPERSID, STACK_GLOBAL: holds its operands
            else _PUSH_LEAF
        )
    return kinds


def check_pickle_nesting(data: bytes, limit: int = MAX_NESTING) -> None:
    """Follow one pickle's opcodes (nothing is built or imported) and raise TooDeep if the
    objects it would build nest deeper than `limit`, a container inside itself included.

    Depth is counted conservatively (an object a call builds holds its arguments), and kept
    true when a container is filled after something already holds it (memo references).
    Whatever the opcodes cannot be followed past (a damaged pickle) is left to the unpickler,
    which stops at the same place."""
    import pickletools

    if not _KINDS:
        _KINDS.update(_opcode_kinds())
    kinds = _KINDS
    stack: list[_Node] = []
    marks: list[int] = []  # where each MARK left the stack, as the unpickler keeps them
    memo: dict[Any, _Node] = {}

    def take(n: int) -> list[_Node]:
        """The top `n` objects, above the last MARK (as the unpickler, which fails otherwise)."""
        at = len(stack) - n
        if at < (marks[-1] if marks else 0):
            raise _Damaged  # the unpickler's "stack underflow"
        items = stack[at:]
        del stack[at:]
        return items

    def to_mark() -> list[_Node]:
        at = marks.pop()  # IndexError on a damaged pickle
        items = stack[at:]
        del stack[at:]
        return items

    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            kind = kinds[name]
            if kind == _PUSH_LEAF:
                stack.append(_LEAF)
            elif kind >= _BUILD:
                operands = take(kind - _BUILD)
                if name in _CALLS:
                    operands = operands[1:]  # what a call builds holds its arguments, not the callable
                stack.append(_built(operands, name in _IMMUTABLE, limit))
            elif kind == _PUT:
                memo[arg] = stack[-1]
            elif kind == _GET:
                stack.append(memo[arg])
            elif kind == _EMPTY:
                stack.append(_FROZEN[1] if name == "EMPTY_TUPLE" else _Node())
            elif kind == _FILL:
                children = take(len(op.stack_before) - 1)
                for child in children:
                    _hold(stack[-1], child, limit)
            elif kind == _MARK:
                marks.append(len(stack))
            elif kind == _FILL_TO_MARK:
                children = to_mark()
                for child in children:
                    _hold(stack[-1], child, limit)
            elif kind == _BUILD_TO_MARK:
                stack.append(_built(to_mark(), name in _IMMUTABLE, limit))
            elif kind == _MEMOIZE:
                memo[len(memo)] = stack[-1]
            elif kind == _DUP:
                stack.append(stack[-1])
            elif kind == _POP:
                if len(stack) > (marks[-1] if marks else 0):
                    stack.pop()
                else:
                    marks.pop()
            elif kind == _DROP_TO_MARK:
                to_mark()
            elif kind == _STOP:
                return
    except TooDeep:
        raise
    except Exception:  # noqa: BLE001  a damaged pickle: the unpickler will say so, at the same opcode
        return


def check_nesting(data: bytes, where: Path | str) -> None:
    """`check_pickle_nesting`, its refusal one line naming `where`."""
    try:
        check_pickle_nesting(data)
    except TooDeep:
        raise InputError(f"{where}: its containers nest more than {MAX_NESTING} levels deep (or hold themselves); "
                         "refused before unpickling") from None
