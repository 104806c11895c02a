"""The one driver every writer runs through (the writers fill in export/contract.Exporter).

For every writer, once: the option checks and the target check (an output over an input,
or over anything --force may not replace, is refused before anything is read), loading,
the plan, then either the plan itself (--dry-run: nothing written, no temporary folder, no
lock, no digest computed or cached) or the digests, the offline scope and `publish`, which
stages the folder or file, records the manifest (the options dataclass, field by field) and
renames it into place only once every check passed.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from ..checks.base import Report
from ..errors import InputError, InternalError, in_python_terms
from ..io.digests import Digests
from ..io.paths import looks_like_adapter, looks_like_model_folder
from ..publish import publish
from ..publish.manifest import MANIFEST
from ..publish.output_folder import listing
from ..scoped import offline
from .contract import Exporter, Plan, PlannedFile, WriteContext, WriterOptions
from .recording import plain, recorded_names
from .registry import WRITERS, located

# The writers on the driver: command → "module:attribute" of its Exporter (export/registry.py).
EXPORTERS = {name: ":".join(located(writer.exporter)) for name, writer in WRITERS.items()}


def exporter(command: str) -> Exporter[Any, Any]:
    """The registered writer for `command`."""
    import importlib

    module, _, name = EXPORTERS[command].partition(":")
    found: Exporter[Any, Any] = getattr(importlib.import_module(module), name)
    return found


def drive(command: str, function: Callable[..., Any], opts: WriterOptions, *, force: bool = False, dry_run: bool = False,
          progress: bool | None = None, digests: Digests | None = None, jobs: int = 1) -> Report | Plan:
    """Run the writer `command` with `opts`: its plan with `dry_run`, else its published report.
    `function` is the API function reproduce calls again: the manifest records its arguments.
    `jobs` threads may share the writer's arithmetic (its bytes are the same for any number)."""
    writer = exporter(command)
    writer.validate(opts)
    target = Path(opts.output)
    writer.check(target, force, writer.given(opts))
    with offline():
        plan = _planned(writer, opts, target, force)
    writer.check(target, force, plan.inputs)  # with every file the plan found
    if dry_run:
        return plan
    with digests_scope(digests) as hasher, offline():
        hasher.prefetch(plan.digest_files)
        options = {**record(command, function, opts), **plan.resolved}
        context = WriteContext(hasher, progress, options, jobs)
        return publish(target, command, lambda staging: writer.write(plan, staging, context), options=options,
                       inputs=plan.inputs, digests=hasher, force=force, folder=writer.folder, check=writer.check)


def _planned(writer: Exporter[Any, Any], opts: WriterOptions, target: Path, force: bool) -> Plan:
    """The writer's plan, with what the driver knows: the command, the target, the manifest
    file of a folder, and what --force would replace there."""
    try:
        loaded = writer.load(opts)
    except InputError as exc:
        raise swapped_arguments(writer.name, _given_adapters(opts), _given_models(opts), exc) or exc from None
    plan = writer.plan(opts, loaded)
    files = [*plan.files, *([PlannedFile(MANIFEST)] if writer.folder else [])]
    return replace(plan, files=files, command=writer.name, target=target, folder=writer.folder,
                   replaces=_replaced(target, force))


def _replaced(target: Path, force: bool) -> list[str]:
    """What --force would replace at `target` (the check has refused whatever it may not)."""
    if not force or not (target.exists() or target.is_symlink()):
        return []
    if target.is_dir() and not target.is_symlink():
        names = sorted(p.name for p in target.iterdir())
        return [f"{target}: {listing(names)}"] if names else []
    return [str(target)]


def record(command: str, function: Callable[..., Any], opts: WriterOptions) -> dict[str, Any]:
    """The manifest's `options`: every field of the options dataclass, as JSON (the output by
    its name: where it lies is no property of it), so that `reproduce` can call the writer
    again with them, in the order of the API function's arguments, which must be the same
    names. (Not dataclasses.asdict, which deep-copies a loaded adapter.)"""
    order = recorded_names(function)
    names = [f.name for f in fields(opts)]
    if sorted(order) != sorted(names):
        raise InternalError(f"{command}: its options dataclass has {sorted(names)}, its API function records "
                            f"{sorted(order)}")
    return {name: Path(opts.output).name if name == "output" else plain(getattr(opts, name)) for name in order}


@contextmanager
def digests_scope(given: Digests | None) -> Iterator[Digests]:
    """The caller's digest hasher (the CLI starts one before torch loads), or one of our own."""
    if given is not None:
        yield given
        return
    own = Digests()
    try:
        yield own
    finally:
        own.close()


# -- two arguments swapped (issue 24) ---------------------------------------------------------------------

# How verify takes its adapter and its model folder (a writer's Exporter says it for itself:
# Exporter.order): the CLI's usage, the same filled in with the paths given (A the adapter, M
# the model folder), and the API call. {M} and {A} are the paths (shell-quoted for the CLI,
# repr for Python).
ORDER = {
    "verify --base": ("pera-deploy verify MERGED --adapter ADAPTER --base BASE",
                      "pera-deploy verify MERGED --adapter {A} --base {M}", "verify(merged, {A}, {M})"),
    "verify": ("pera-deploy verify MERGED --adapter ADAPTER --base BASE",
               "pera-deploy verify {M} --adapter {A} --base BASE", "verify({M}, {A}, base)"),
}
# The options fields that name adapters and model folders, and how the CLI calls each field.
ADAPTER_FIELDS = ("adapter", "adapters", "checkpoint")
MODEL_FIELDS = {"base": "BASE", "merged": "MERGED", "model": "MODEL"}


def _given_adapters(opts: WriterOptions) -> list[Any]:
    found: list[Any] = []
    for name in ADAPTER_FIELDS:
        value = getattr(opts, name, None)
        found += list(value.values()) if isinstance(value, dict) else \
            list(value) if isinstance(value, (list, tuple)) else [value]
    return found


def _given_models(opts: WriterOptions) -> dict[str, Any]:
    return {name: getattr(opts, name, None) for name in MODEL_FIELDS}


def swapped_arguments(command: str, adapters: list[Any], models: dict[str, Any], exc: InputError) -> InputError | None:
    """The error for an adapter that could not be read because it is a model folder: the
    model folder and the adapter swapped (the path given as the base, merged or model folder
    is an adapter), with the order the command takes them and the call filled in; or a model
    folder given as the adapter. None when no path given as an adapter is a model folder."""
    import shlex

    for adapter in adapters:
        if not isinstance(adapter, (str, Path)) or (model_words := looks_like_model_folder(Path(adapter))) is None:
            continue
        for field, model in models.items():
            if not isinstance(model, (str, Path)) or (adapter_words := looks_like_adapter(Path(model))) is None:
                continue
            order = ORDER.get(f"{command} --base" if command == "verify" and field == "base" else command) or \
                (exporter(command).order if command in WRITERS else None)
            if order is None:
                continue
            usage, cli_call, python_call = order
            cli_role, python_role = (f"the {MODEL_FIELDS[field].lower()}" if field == "base" else MODEL_FIELDS[field],
                                     field)
            right = {"A": str(model), "M": str(adapter)}  # the order the command takes them
            head = (f"{adapter}, given as the adapter, is a model folder ({model_words}), and {model}, given as "
                    f"{{role}}, is an adapter ({adapter_words}): they are swapped; ")
            return InputError(
                head.format(role=cli_role) + f"`{usage}`, here `"
                + cli_call.format(**{k: shlex.quote(v) for k, v in right.items()}) + "`",
                python=head.format(role=python_role) + "call `"
                + python_call.format(**{k: repr(v) for k, v in right.items()}) + "`")
        message = str(exc).removeprefix(f"{adapter}: ")
        head = f"{adapter}, given as the adapter, is a model folder ({model_words}), not a PERA adapter: "
        return InputError(head + message, python=head + in_python_terms(message))
    return None
