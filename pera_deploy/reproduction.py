"""`pera-deploy reproduce OUTPUT`: re-derive an output from its manifest, and compare.

An output's manifest records the API call that wrote it (`options`: every argument, the
inputs' paths as they were given; recording.recorded) and the sha256 of every input file. reproduce
calls the same function again with them, into a private temporary folder that it removes
afterwards (on an error or a stop signal too), and compares what that wrote with OUTPUT:

* **every file byte for byte.** A safetensors file or a GGUF that differs is named with its
  first differing tensor (and element), or its header key.
* **the records** (the manifest, and `bundle.json`, which records the same things) field by
  field where their bytes differ: each check by its verdict and each figure of
  `publish.manifest.FIGURES` to FIGURE_TOLERANCE, since those are measured through BLAS and
  LAPACK, whose last bits depend on the machine; every other field exactly. A GGUF carries
  its manifest without them (`recipe`), so it is compared byte for byte like any file.
* **inputs that moved.** `--adapter`, `--base`, `--check-against` and `--config` give an input's
  new place. It must still hold the files the manifest records (their sha256), under the
  name it had (names are part of the output: cards, records, the GGUF header); where the
  re-derived records then say the new path, it stands for the recorded one.

Exit 0 when every file is what the recorded call writes; 1 when a file differs (or a check of
the re-derivation fails); 2 when OUTPUT is not a pera-deploy output, its manifest is damaged,
of another schema or version, or an input is missing or no longer has its recorded sha256.
Nothing is written but the report: not in OUTPUT, not beside it, not in the sha256 cache
(every input is hashed afresh: a check trusts no earlier run). Only a SIGKILL, which no
process can catch, leaves the private folder ($TMPDIR/pera-deploy-reproduce-*). What git and the Hub's
downloader add to a published folder (IGNORED) is not part of the output.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

from . import __version__
from .checks.base import Report
from .core.adapter import PeraAdapter
from .errors import CheckFailed, InputError, environment_failure
from .export.recording import recorded_names
from .formats import load_adapter
from .io.digests import Digests
from .io.safetensors_stream import TensorEntry, itemsize, read_header
from .io.schema import shown
from .io.strict_json import parse_json, read_json
from .publish.manifest import (
    GGUF_MANIFEST_KEY,
    INPUT_RECORDS,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    RECORD_FILES,
    check_schema,
    record_differences,
)
from .publish.output_folder import scratch_outputs

# Which argument of those functions is which input, and the option of reproduce that moves it.
INPUT_ARGUMENTS = {"adapter": "--adapter", "adapters": "--adapter", "checkpoint": "--adapter", "base": "--base",
                   "merged": "--base", "model": "--base", "check_against": "--check-against", "config": "--config"}
# Top-level entries of a published folder that are not part of the output: git's, and the
# Hugging Face downloader's (`hf download --local-dir` keeps its metadata in .cache/huggingface).
IGNORED = frozenset({".git", ".gitattributes", ".cache"})
CHUNK = 16 << 20


@dataclass
class ReproduceCheck:
    """OUTPUT against its re-derivation, file by file."""

    output: str
    command: str
    files: list[str] = field(default_factory=list)  # compared (relative to OUTPUT)
    differences: list[str] = field(default_factory=list)  # "FILE: what differs", in file order
    notes: list[str] = field(default_factory=list)
    kind: str = "reproduce"

    @property
    def passed(self) -> bool:
        return bool(self.files) and not self.differences

    def failure(self) -> str | None:
        if self.passed:
            return None
        if not self.differences:
            return f"{self.output}: nothing was compared"
        more = f" ({len(self.differences)} differences)" if len(self.differences) > 1 else ""
        return f"{self.output} is not what its manifest's {self.command} gives: {self.differences[0]}{more}"

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "output": self.output, "command": self.command, "files": self.files,
                "differences": self.differences, "notes": self.notes}


def reproduce_output(output: Path, commands: Mapping[str, Callable[..., Report]], *,
                     adapters: Sequence[str | Path] = (), base: str | Path | None = None,
                     check_against: str | Path | None = None, config: str | Path | None = None) -> Report:
    """Re-derive `output` from its manifest and compare (see the module docstring); raises
    CheckFailed, carrying the report, when a file differs."""
    where, manifest = read_recorded(output)
    command = manifest["command"]
    function = commands.get(command)
    if function is None:
        raise InputError(f"{where}: command {shown(command)} is not one pera-deploy writes: the manifest is damaged")
    arguments = recorded_arguments(function, manifest["options"], where)
    moved = {"--adapter": [str(a) for a in adapters], "--base": base, "--check-against": check_against,
             "--config": config}
    arguments, pairs = substitute(arguments, moved, command, where)
    require_inputs(arguments, where)
    check = ReproduceCheck(str(output), command)
    # every input hashed afresh, and no digest cache written: a check trusts no earlier run,
    # and reproduce writes nothing but its report
    digests = Digests(use_cache=False)
    scratch = _scratch_folder()
    try:
        target = scratch / Path(arguments.pop("output")).name
        try:
            with scratch_outputs():
                derived = function(output=target, digests=digests, **arguments).manifest
        except CheckFailed as exc:  # a check of the re-derivation failed: say first if an input changed
            derived = getattr(exc.report, "manifest", None) or {}
            check.differences.append(f"a check of the re-derivation failed: {exc}")
        changed = input_changes(manifest, derived)
        if changed:
            raise InputError(f"{changed[0]}, so {output} cannot be re-derived from it")
        if not check.differences:
            compare_outputs(output, target, check, pairs)
    finally:
        digests.close()
        shutil.rmtree(scratch, ignore_errors=True)
    report = Report("reproduce", None, [check], {})
    if not report.passed:
        raise CheckFailed(report.failure() or "a file differs", report)
    return report


# -- the recorded call --------------------------------------------------------------------------------------------


def read_recorded(output: Path) -> tuple[Path | str, dict[str, Any]]:
    """(where the manifest is, the manifest) of an output, or an InputError naming it."""
    if output.is_dir() and not output.is_symlink():
        where: Path | str = output / MANIFEST
        path = output / MANIFEST
        if path.is_symlink() or not path.is_file():
            raise InputError(f"{output}: not an output of pera-deploy (no {MANIFEST})")
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise InputError(f"{path}: too large to be a pera-deploy manifest")
        manifest = read_json(path)
    elif output.is_file():
        where, manifest = f"{output} (its {GGUF_MANIFEST_KEY} key)", _gguf_manifest(output)
    elif output.exists() or output.is_symlink():
        raise InputError(f"{output}: not an output of pera-deploy (neither a folder nor a file)")
    else:
        raise InputError(f"{output}: not found")
    check_schema(manifest, where)
    if manifest["pera_deploy_version"] != __version__:
        raise InputError(f"{where}: written by pera-deploy {manifest['pera_deploy_version']}; this is {__version__}, and "
                         f"only the same version promises the same bytes (pip install "
                         f"'pera-deploy=={manifest['pera_deploy_version']}')")
    return where, manifest


def _gguf_manifest(path: Path) -> dict[str, Any]:
    """The manifest a GGUF written by pera-deploy carries in its header."""
    from .export.gguf import require_gguf

    gguf = require_gguf()
    try:
        fields = gguf.GGUFReader(path).fields
    except Exception:  # noqa: BLE001  gguf raises whatever its parser meets
        raise InputError(f"{path}: not an output of pera-deploy (neither a folder nor a GGUF file)") from None
    field_ = fields.get(GGUF_MANIFEST_KEY)
    if field_ is None:
        written = " (a GGUF of pera-deploy from before GGUF files carried it)" if "pera_deploy.version" in fields else ""
        raise InputError(f"{path}: not an output pera-deploy can re-derive: no {GGUF_MANIFEST_KEY} key{written}")
    try:
        text = field_.contents() if field_.types == [gguf.GGUFValueType.STRING] else None
    except Exception:  # noqa: BLE001  a value gguf cannot decode
        text = None
    if not isinstance(text, str):
        raise InputError(f"{path}: its {GGUF_MANIFEST_KEY} key is not a string: the manifest is damaged")
    manifest = parse_json(text, f"{path} ({GGUF_MANIFEST_KEY})")
    if not isinstance(manifest, dict):
        raise InputError(f"{path}: its {GGUF_MANIFEST_KEY} is not a JSON object: the manifest is damaged")
    return typing.cast(dict[str, Any], manifest)


def recorded_arguments(function: Callable[..., Any], options: dict[str, Any], where: Path | str) -> dict[str, Any]:
    """The recorded options as arguments of `function`, each checked against its parameter's
    type (and the load options against load_adapter's): a damaged manifest is bad input
    naming the option, never a crash inside the command."""
    hints = {**typing.get_type_hints(load_adapter, localns={"PeraAdapter": PeraAdapter}),
             **typing.get_type_hints(function)}
    parameters = recorded_names(function)
    for name in options:
        if name not in parameters:
            raise InputError(f"{where}: options.{name}: {function.__name__} takes no such argument: the manifest is damaged")
    arguments = {}
    for name in parameters:
        if name not in options:
            raise InputError(f"{where}: options.{name} is missing: the manifest is damaged")
        value = options[name]
        if value is None and name in INPUT_ARGUMENTS and not _accepts(hints[name], None):
            raise InputError(f"{where}: options.{name} is null: the output was made from an adapter passed in memory, "
                             "which no file records, so it cannot be re-derived")
        if not _accepts(hints[name], value):
            raise InputError(f"{where}: options.{name} {shown(value)} is not what {function.__name__} takes: the "
                             "manifest is damaged")
        if name == "output" and not _plain_name(value):
            raise InputError(f"{where}: options.output {shown(value)} is not the name of a file or folder (the output "
                             "is recorded by its name): the manifest is damaged")
        arguments[name] = value
    return arguments


def _plain_name(value: Any) -> bool:
    """One path component, as recording.recorded records an output: the re-derivation is written
    under that name inside the private folder, and nowhere else (not "..", not the folder itself)."""
    return isinstance(value, str) and value not in ("", "..") and Path(value).name == value and "\0" not in value


def _accepts(hint: Any, value: Any) -> bool:
    """Whether a JSON value fits a parameter's annotation: a path or an adapter as its string."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(h, value) for h in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint in (str, Path, PeraAdapter):
        return isinstance(value, str)
    args = typing.get_args(hint)
    if origin in (list, tuple, typing.Sequence, Sequence) or getattr(origin, "__name__", "") == "Sequence":
        return isinstance(value, list) and all(_accepts(args[0] if args else Any, item) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(_accepts(args[1] if args else Any, item) for item in value.values())
    return False


def substitute(arguments: dict[str, Any], moved: dict[str, Any], command: str,
               where: Path | str) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """The arguments with the inputs given at a new place, and (new path, recorded path) pairs."""
    arguments = copy.deepcopy(arguments)
    pairs: list[tuple[str, str]] = []
    for flag, given in moved.items():
        if given is None or given == []:
            continue
        name = next((n for n, f in INPUT_ARGUMENTS.items() if f == flag and arguments.get(n) is not None), None)
        if name is None:
            raise InputError(f"{flag}: the {command} recorded in {where} read no such input")
        recorded = arguments[name]
        if flag != "--adapter":
            arguments[name] = _moved(flag, str(given), recorded, pairs)
        elif isinstance(recorded, dict):
            for spec in given:
                key, sep, path = spec.partition("=")
                if not sep or key not in recorded:
                    raise InputError(f"--adapter {spec}: give NAME=PATH with one of the names {where} records "
                                     f"({', '.join(recorded)})")
                recorded[key] = _moved(flag, path, recorded[key], pairs)
        else:
            olds = recorded if isinstance(recorded, list) else [recorded]
            if len(given) != len(olds):
                raise InputError(f"--adapter: the {command} recorded in {where} read {len(olds)} adapter(s); give "
                                 f"{len(olds)} --adapter, in the recorded order")
            new = [_moved(flag, path, old, pairs) for path, old in zip(given, olds)]
            arguments[name] = new if isinstance(recorded, list) else new[0]
    return arguments, pairs


def _moved(flag: str, path: str, recorded: str, pairs: list[tuple[str, str]]) -> str:
    """`path` in place of the recorded input, which it must stand for by name."""
    if Path(path).name != Path(recorded).name:
        raise InputError(f"{flag} {path}: the manifest records this input as {recorded}, and its name is part of the "
                         f"output (cards, records); give it under the name {Path(recorded).name!r}")
    pairs += [(path, recorded), (str(Path(path)), str(Path(recorded)))]
    return path


def require_inputs(arguments: dict[str, Any], where: Path | str) -> None:
    """Every input the call reads must be there; a missing one is named with the option that
    gives its new place."""
    for name, flag in INPUT_ARGUMENTS.items():
        value = arguments.get(name)
        paths = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
        for path in paths:
            if path is not None and not os.path.lexists(path):
                raise InputError(f"{path}: the input ({name}) recorded in {where} is not there; if it has moved, "
                                 f"give its new place with {flag}")


def _mapping(pairs: list[tuple[str, str]]) -> Callable[[str], str]:
    """A re-derived string with every new input path put back as recorded (longest first)."""
    ordered = sorted({p for p in pairs if p[0] != p[1]}, key=lambda p: -len(p[0]))

    def mapped(text: str) -> str:
        for new, old in ordered:
            text = text.replace(new, old)
        return text

    return mapped


# -- re-deriving --------------------------------------------------------------------------------------------------


def _scratch_folder() -> Path:
    """The private folder the re-derivation is written into: in $TMPDIR, never in or beside OUTPUT."""
    try:
        return Path(tempfile.mkdtemp(prefix="pera-deploy-reproduce-"))
    except OSError as exc:
        raise environment_failure(exc, tempfile.gettempdir()) from None


def _files(record: Any, label: str) -> dict[str, dict[str, Any]]:
    """label → the files dict of every input record inside `record` (members of a sum, adapters by name)."""
    found: dict[str, dict[str, Any]] = {}
    if not isinstance(record, dict):
        return found
    if isinstance(record.get("files"), dict):
        found[label] = record["files"]
    for member in record.get("combination") or []:
        if isinstance(member, dict):
            found.update(_files(member, f"{label} {member.get('name')}"))
    return found


def input_changes(recorded: dict[str, Any], derived: dict[str, Any]) -> list[str]:
    """Input files whose sha256 is not the recorded one (or that are new, or gone), one line each."""
    changes = []
    for key in INPUT_RECORDS:
        if key not in recorded:
            continue
        pairs = ({name: (rec, (derived.get(key) or {}).get(name)) for name, rec in recorded[key].items()}
                 if key == "adapters" and isinstance(recorded[key], dict) else {"": (recorded[key], derived.get(key))})
        for name, (rec, der) in pairs.items():
            label = f"adapter {name}" if name else key.replace("_", " ")
            was, now = _files(rec, label), _files(der, label)
            for what, files in was.items():
                again = now.get(what, {})
                for file, digest in files.items():
                    if file not in again:
                        changes.append(f"input {what}: {file} is no longer read (the manifest records its sha256)")
                    elif again[file] != digest:
                        changes.append(f"input {what}: {file} no longer has the sha256 the manifest records "
                                       f"({str(digest)[:12]}..., now {again[file][:12]}...)")
                changes += [f"input {what}: {file} is read now, and the manifest does not record it"
                            for file in again if file not in files]
    return changes


# -- comparing ----------------------------------------------------------------------------------------------------


def _listing(root: Path) -> dict[str, str]:
    """Relative path → "file", "link" or "folder", for everything under `root` (links not followed)."""
    if not root.is_dir():
        return {"": "file"}
    found = {}
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        if rel == Path("."):
            dirs[:] = [d for d in dirs if d not in IGNORED]
            files = [f for f in files if f not in IGNORED]
        for name in sorted(dirs):
            path = Path(folder) / name
            found[(rel / name).as_posix()] = "link" if path.is_symlink() else "folder"
        dirs[:] = sorted(d for d in dirs if not (Path(folder) / d).is_symlink())
        for name in sorted(files):
            found[(rel / name).as_posix()] = "link" if (Path(folder) / name).is_symlink() else "file"
    return found


def compare_outputs(output: Path, derived: Path, check: ReproduceCheck, pairs: list[tuple[str, str]]) -> None:
    """Every file of OUTPUT against the re-derived one (differences appended to `check`);
    `pairs` are the (new path, recorded path) of the inputs given at a new place."""
    mapped = _mapping(pairs)
    moved = [os.path.realpath(new) for new, _ in pairs]
    was, now = _listing(output), _listing(derived)
    for rel in sorted(was.keys() | now.keys()):
        shown_as = rel or output.name
        check.files.append(shown_as)
        if rel not in now:
            check.differences.append(f"{shown_as}: not written by the recorded call (only in the output)")
        elif rel not in was:
            check.differences.append(f"{shown_as}: missing (the recorded call writes it)")
        elif was[rel] != now[rel]:
            check.differences.append(f"{shown_as}: a {was[rel]} in the output, the recorded call writes a {now[rel]}")
        elif was[rel] == "file":
            problem = compare_file(output / rel if rel else output, derived / rel if rel else derived, mapped)
            if problem:
                check.differences.append(f"{shown_as}: {problem}")
        elif was[rel] == "link":
            problem = _compare_link(output / rel, derived / rel, mapped, moved, check.notes)
            if problem:
                check.differences.append(f"{shown_as}: {problem}")


def _compare_link(was: Path, now: Path, mapped: Callable[[str], str], moved: list[str],
                  notes: list[str]) -> str | None:
    """A link (--base-files symlink) names the input file it leads to by its real path: the
    same, or the file of the same name in an input given in the recorded one's place."""
    a, b = os.readlink(was), os.readlink(now)
    if a == b or mapped(b) == a:
        return None
    if Path(a).name == Path(b).name and any(b.startswith(real.rstrip("/") + "/") for real in moved):
        notes.append(f"{was.name}: leads to the file of that name in the input given at its new place")
        return None
    return f"a link to {a}; the recorded call links to {b}"


def same_file(a: Path, b: Path) -> bool:
    """Whether two files hold the same bytes (read in chunks: a shard can be several GB)."""
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(CHUNK), fb.read(CHUNK)
            if x != y:
                return False
            if not x:
                return True


def compare_file(was: Path, now: Path, mapped: Callable[[str], str]) -> str | None:
    """None when the file is what the recorded call writes; else what differs, in one line."""
    if same_file(was, now):
        return None
    if was.name in RECORD_FILES:
        try:
            recorded = parse_json(was.read_bytes(), was)
        except InputError as exc:
            return f"not a record any more ({str(exc).removeprefix(f'{was}: ')})"
        found = record_differences(recorded, parse_json(now.read_bytes(), now), mapped)
        return _first(found)
    if was.suffix == ".safetensors":
        return safetensors_difference(was, now)
    if was.suffix == ".gguf":
        return gguf_difference(was, now, mapped)
    return _byte_difference(was, now)


def _first(found: list[str]) -> str | None:
    if not found:
        return None
    return found[0] + (f" (and {len(found) - 1} more)" if len(found) > 1 else "")


def _byte_difference(a: Path, b: Path) -> str:
    x, y = a.read_bytes(), b.read_bytes()
    at = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
    sizes = f"; {len(x)} bytes, {len(y)} re-derived" if len(x) != len(y) else ""
    return f"differs from byte {at}{sizes}"


def safetensors_difference(was: Path, now: Path) -> str:
    """The first tensor (and element) in which two safetensors files differ, or their header."""
    try:
        entries, metadata = read_header(was)
    except InputError as exc:
        return f"not a valid safetensors file any more ({str(exc).removeprefix(f'{was}: ')})"
    again, metadata_again = read_header(now)
    names, names_again = [e.name for e in entries], [e.name for e in again]
    if names != names_again:
        extra = next((n for n in names if n not in names_again), None)
        missing = next((n for n in names_again if n not in names), None)
        return (f"holds tensor {extra}, which the recorded call does not write" if extra else
                f"lacks tensor {missing}" if missing else "holds its tensors in another order")
    for a, b in zip(entries, again):
        if (a.dtype, a.shape) != (b.dtype, b.shape):
            return f"tensor {a.name} is {a.dtype} {list(a.shape)}; the recorded call writes {b.dtype} {list(b.shape)}"
        element = _first_element(a, b)
        if element is not None:
            return f"tensor {a.name} differs{element}"
    if metadata != metadata_again:
        key = next(k for k in sorted(metadata.keys() | metadata_again.keys()) if metadata.get(k) != metadata_again.get(k))
        return f"metadata {key} is {shown(metadata.get(key))}; the recorded call writes {shown(metadata_again.get(key))}"
    return "the same tensors and metadata, laid out otherwise (header)"


def _first_element(a: TensorEntry, b: TensorEntry) -> str | None:
    """None when two tensors of one dtype and shape have the same bytes, else ' at element [i, j]'."""
    size = itemsize(a.dtype)
    with open(a.file, "rb") as fa, open(b.file, "rb") as fb:
        for start in range(0, a.nbytes, CHUNK - CHUNK % size):
            n = min(CHUNK - CHUNK % size, a.nbytes - start)
            x, y = os.pread(fa.fileno(), n, a.begin + start), os.pread(fb.fileno(), n, b.begin + start)
            if x != y:
                byte = start + next(i for i, (p, q) in enumerate(zip(x, y)) if p != q)
                index = _unravel(byte // size, a.shape)
                return f" at element [{', '.join(map(str, index))}]"
    return None


def _unravel(flat: int, shape: tuple[int, ...]) -> list[int]:
    index = []
    for dim in reversed(shape):
        index.append(flat % dim if dim else 0)
        flat //= dim if dim else 1
    return index[::-1]


def gguf_difference(was: Path, now: Path, mapped: Callable[[str], str]) -> str | None:
    """The first header key or tensor in which two GGUF files differ; the manifest they carry
    compared as a record (an input given elsewhere is said there by its new path)."""
    from .export.gguf import require_gguf

    gguf = require_gguf()
    try:
        reader = gguf.GGUFReader(was)
    except Exception:  # noqa: BLE001  gguf raises whatever its parser meets
        return "not a valid GGUF file any more"
    again = gguf.GGUFReader(now)
    keys, keys_again = list(reader.fields), list(again.fields)
    if keys != keys_again:
        extra = next((k for k in keys if k not in keys_again), None)
        missing = next((k for k in keys_again if k not in keys), None)
        return (f"header key {extra} is not written by the recorded call" if extra else
                f"header key {missing} is missing" if missing else "its header keys are in another order")
    for key in keys:
        value, value_again = reader.fields[key].contents(), again.fields[key].contents()
        if key == GGUF_MANIFEST_KEY and isinstance(value, str) and isinstance(value_again, str):
            found = record_differences(parse_json(value, f"{was} ({key})"), parse_json(value_again, now), mapped)
            if found:
                return f"header {key}: {_first(found)}"
        elif value != value_again:
            return f"header {key} is {shown(value)}; the recorded call writes {shown(value_again)}"
    tensors, tensors_again = reader.tensors, again.tensors
    if [t.name for t in tensors] != [t.name for t in tensors_again]:
        return "holds other tensors than the recorded call writes"
    for a, b in zip(tensors, tensors_again):
        x, y = a.data, b.data
        if (a.tensor_type, list(x.shape)) != (b.tensor_type, list(y.shape)):
            return f"tensor {a.name} is {a.tensor_type.name} {list(x.shape)}; the recorded call writes " \
                   f"{b.tensor_type.name} {list(y.shape)}"
        if x.tobytes() != y.tobytes():
            flat = int((x.reshape(-1).view("u1").reshape(x.size, -1) != y.reshape(-1).view("u1").reshape(y.size, -1))
                       .any(axis=1).argmax()) if x.size else 0
            return f"tensor {a.name} differs at element [{', '.join(map(str, _unravel(flat, tuple(x.shape))))}]"
    return None  # the same keys (the manifest's paths mapped back) and tensors: the rest of the layout follows
