"""The `pera-deploy` command: parse, call the API, print text or --json. No policy lives here.

Exit status (errors.py): 0 success, 1 a numerical check failed, 2 bad input, 3 internal
error, 4 the environment failed (disk full, permission, I/O error on output). Failures,
usage errors included, print one line on stderr; --debug adds the traceback (and library
warnings) and keeps the exit status. With --json, stdout holds one JSON object on success
and on failure alike (--help and --version: their text inside one). A signal that arrives
once the output is in place leaves the run a success (scoped.py, "stop signals"). Heavy
imports happen inside the commands, so `--help` answers at once.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
import traceback
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any, Callable, NoReturn

import click

from . import __version__, scoped
from .errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_OK,
    CheckFailed,
    InternalError,
    Interrupted,
    PeraDeployError,
    classify_os_error,
)
from .export.command import LOAD, PRECISION, Command, Param, parse_weights

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C

JSON_KEY = "pera_deploy.json"
DEBUG_KEY = "pera_deploy.debug"
FLAGS = {"--json": JSON_KEY, "--debug": DEBUG_KEY}


def _flags(args: list[str]) -> dict[str, bool]:
    """--json and --debug wherever they are on the command line (up to a `--`), read before
    click parses it: a line click cannot parse gets its one JSON object too, and --help its
    JSON form."""
    options = args[:args.index("--")] if "--" in args else args
    return {key: flag in options for flag, key in FLAGS.items()}


debug_option = click.option(
    "--debug", is_flag=True, expose_value=False,
    help="On failure, also print the traceback (the exit status stays the same), and library warnings.",
)
json_option = click.option(
    "--json", is_flag=True, expose_value=False,
    help="Print one JSON object on stdout, on success and on failure (with exit_code and error); --help too.",
)


def adapter_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """How to read the adapter: the same options on every command that takes one."""
    f = click.option("--config", "config", type=click.Path(path_type=Path), default=None, metavar="FILE",
                     help="An adapter_config.json for adapter tensors that come without one.")(f)
    f = click.option(
        "--missing-coefficients", type=click.Choice(["zero", "one"]), default=None,
        help="How to read layers saved with no coefficient tensor (otherwise refused as ambiguous): "
        "'zero' = a plain LoRA, 'one' = an expansion with every coefficient 1.",
    )(f)
    f = click.option("--adapter-name", default=None, metavar="NAME",
                     help="Which adapter of a PEFT folder holding several (a sub-folder name).")(f)
    f = click.option("--format", "format_", default=None, metavar="FORMAT",
                     help="Adapter format, instead of detecting it (see `pera-deploy formats`).")(f)
    return f


jobs_option = click.option(
    "--jobs", "-j", type=click.IntRange(min=1), default=None, metavar="N",
    help="Threads that share out the arithmetic (default: the cores available); the output is byte-identical "
    "whatever N is.")

precision_option = click.option(
    "--precision", type=click.Choice(["float32", "float64"]), default=None, hidden=True, expose_value=False,
    callback=lambda ctx, param, value: _no_precision(value),
    help="No longer used: every merged element is computed exactly and rounded once.")


def _no_precision(value: str | None) -> None:
    if value is not None:
        click.echo("pera-deploy: warning: --precision no longer does anything: every merged element is W0 + ΔW "
                   "computed exactly and rounded once to the output dtype", err=True)


def _progress(progress: bool | None) -> bool | None:
    """--progress as the driver takes it: never under --json (stdout holds one JSON object,
    and a caller reading it wants no bar on stderr either)."""
    return False if click.get_current_context().meta.get(JSON_KEY) else progress


def _load_options(format_: str | None, adapter_name: str | None, missing_coefficients: str | None,
                  config: Path | None) -> dict[str, Any]:
    return {"format": format_, "adapter_name": adapter_name, "missing_coefficients": missing_coefficients,
            "config": config}


def _echo(text: str, err: bool = False) -> None:
    """Print a line of the outcome. If the reader of the stream is gone (a closed pipe), the
    outcome and its exit status stand: the stream is pointed at /dev/null, so the interpreter's
    own flush at exit does not fail on it again (as Python's documentation advises)."""
    try:
        click.echo(text, err=err)
    except BrokenPipeError:
        stream = sys.stderr if err else sys.stdout
        with suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)


def _report(flags: dict[str, Any], exc: BaseException, code: int, kind: str, message: str) -> int:
    """One line on stderr (plus the traceback with --debug) and the JSON result with --json;
    returns the exit status. The outcome is settled first: a signal from here on is recorded,
    so what is printed is what happened. A line break in the message (a file name can hold
    one) is shown escaped, so the line stays one line."""
    scoped.settle()
    message = message.replace("\r", "\\r").replace("\n", "\\n")
    if flags.get(JSON_KEY):
        report = getattr(exc, "report", None)
        data = report.to_dict() if report is not None else {}
        data.update({"exit_code": code, "error": {"kind": kind, "message": message}})
        _echo(json.dumps(data, indent=2, default=str))
    if flags.get(DEBUG_KEY):
        traceback.print_exception(exc)
    label = {"check_failed": "check failed", "bad_input": "error", "environment_error": "error", "usage": "error",
             "interrupted": "interrupted"}.get(kind, "internal error")
    hint = " (run with --debug for the traceback)" if code == EXIT_INTERNAL and not flags.get(DEBUG_KEY) else ""
    _echo(f"pera-deploy: {label}: {message}{hint}", err=True)
    return code


def _first_line(exc: BaseException, limit: int = 500) -> str:
    """An unexpected exception as one line: its type and the first line of its message
    (libraries put whole graphs and file contents in theirs; --debug shows everything)."""
    first = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:limit]}{'...' if len(first) > limit else ''}"


def _fail(ctx: click.Context, exc: BaseException, code: int, kind: str, message: str) -> NoReturn:
    ctx.exit(_report(ctx.meta, exc, code, kind, message))


def _interrupted(flags: dict[str, Any], exc: KeyboardInterrupt | Interrupted) -> int:
    """A stop signal raised before the run settled: nothing was published (an output in place
    settles the run, and signals after that are only recorded)."""
    if isinstance(exc, Interrupted):
        name = signal.Signals(exc.signum).name
        return _report(flags, exc, 128 + exc.signum, "interrupted", f"stopped by {name}; nothing was written")
    return _report(flags, exc, EXIT_INTERRUPTED, "interrupted", "stopped by Ctrl-C; nothing was written")


def _usage_error(flags: dict[str, Any], exc: click.ClickException) -> int:
    """A command line click cannot parse: one line and exit 2, as any other bad input."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    ctx = getattr(exc, "ctx", None)
    message += f"; see '{ctx.command_path if ctx is not None else 'pera-deploy'} --help'"
    return _report(flags, exc, EXIT_BAD_INPUT, "usage", message)


def _print_info(ctx: click.Context, key: str, text: str) -> NoReturn:
    """--help and --version: their text, or under --json one JSON object holding it."""
    scoped.settle()
    _echo(json.dumps({key: text, "exit_code": EXIT_OK}, indent=2) if ctx.meta.get(JSON_KEY) else text)
    ctx.exit(EXIT_OK)


def _show_help(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        _print_info(ctx, "help", ctx.get_help())


def _show_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        _print_info(ctx, "version", __version__ if ctx.meta.get(JSON_KEY) else f"pera-deploy, version {__version__}")


def _help_option(option: click.Option | None) -> click.Option | None:
    if option is not None:
        option.callback = _show_help
    return option


class _Command(click.Command):
    """A command whose --help is one JSON object under --json."""

    def get_help_option(self, ctx: click.Context) -> click.Option | None:
        return _help_option(super().get_help_option(ctx))


class _Group(click.Group):
    """The program: every failure one stderr line, the --json result and an exit status.

    `main` reads --json and --debug from the whole line first, arms the stop signals (see
    scoped.stop_signals) and, unless --debug, keeps library warnings and log records off
    stderr; then parses the line and runs the command. Usage errors, --help and --version
    follow the same contract as the commands' own results and failures.
    """

    command_class = _Command

    def get_help_option(self, ctx: click.Context) -> click.Option | None:
        return _help_option(super().get_help_option(ctx))

    # The writers' commands come from export/registry.py, built when one is asked for: listing
    # them (--help) imports none of their modules.
    def list_commands(self, ctx: click.Context) -> list[str]:
        from .export.registry import COMMAND_LINES

        return sorted({*self.commands, *COMMAND_LINES})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        from .export.registry import COMMAND_LINES

        if cmd_name not in self.commands and cmd_name in COMMAND_LINES:
            self.add_command(writer_command(cmd_name))
        return self.commands.get(cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from .export.registry import COMMAND_LINES

        names = [n for n in self.list_commands(ctx) if n in COMMAND_LINES or not self.commands[n].hidden]
        limit = formatter.width - 6 - max(map(len, names))
        # a writer not built yet: its summary, shortened as click shortens a command's help
        rows = [(n, (self.commands.get(n) or click.Command(n, help=COMMAND_LINES[n])).get_short_help_str(limit))
                for n in names]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta.update(_flags(args))  # ctx.meta is shared by the group and its command
        return super().parse_args(ctx, args)

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        args = list(sys.argv[1:] if args is None else args)
        prog_name = "pera-deploy"  # what every message calls the program, however it was started
        flags = _flags(args)
        with ExitStack() as stack:
            stack.enter_context(scoped.stop_signals())
            stack.enter_context(scoped.no_torch_cache_folder())
            if not flags[DEBUG_KEY]:
                stack.enter_context(scoped.quiet_libraries())
            try:
                self._main_shell_completion(extra, prog_name, complete_var)
                code = self._outcome(args, prog_name, flags, extra)
            except (KeyboardInterrupt, Interrupted) as exc:  # before the line was parsed, or a command began
                code = _interrupted(flags, exc)
        if standalone_mode:
            sys.exit(code)
        return code

    def _outcome(self, args: list[str], prog_name: str, flags: dict[str, bool], extra: dict[str, Any]) -> int:
        try:
            with self.make_context(prog_name, args, **extra) as ctx:
                self.invoke(ctx)
            return EXIT_OK
        except click.exceptions.Exit as exc:
            return int(exc.exit_code)
        except click.ClickException as exc:
            return _usage_error(flags, exc)
        except click.exceptions.Abort:  # click's own prompts, on Ctrl-C (pera-deploy has none)
            return _interrupted(flags, KeyboardInterrupt())

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except PeraDeployError as exc:  # in the CLI's words, which the API rewords for Python callers
            _fail(ctx, exc, exc.exit_code, exc.kind, exc.cli_message or str(exc))
        except OSError as exc:
            error = classify_os_error(exc)
            _fail(ctx, exc, error.exit_code, error.kind, str(error))
        except (KeyboardInterrupt, Interrupted) as exc:
            ctx.exit(_interrupted(ctx.meta, exc))
        except Exception as exc:  # a bug: say so in one line; --debug shows where
            _fail(ctx, exc, EXIT_INTERNAL, "internal_error", _first_line(exc))
        except BaseException as exc:  # a library's own BaseException (torch's CheckpointException is one)
            if isinstance(exc, (SystemExit, GeneratorExit)):
                raise
            _fail(ctx, exc, EXIT_INTERNAL, "internal_error", _first_line(exc))


@click.group(cls=_Group, no_args_is_help=False,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_show_version,
              help="Show the version and exit.")
@json_option
@debug_option
def main() -> None:
    """Deploy PERA adapters: merge them into their base model, check the result, inspect them.

    \b
    A PERA adapter's update is ΔW = s·B̂Â, where B̂ and Â extend the LoRA factors with
    their pairwise (polynomial) products. pera-deploy folds that update into the base
    weights exactly, streaming one tensor at a time, and proves the result matches the
    unmerged model.

    \b
    Start with:
      pera-deploy inspect ADAPTER
      pera-deploy merge ADAPTER BASE -o MERGED
      pera-deploy verify MERGED --adapter ADAPTER --base BASE
      pera-deploy export-lora ADAPTER -o LORA        (serve PERA with any LoRA runtime)
      pera-deploy export-gguf ADAPTER --base BASE -o A.gguf   (a llama.cpp LoRA)
      pera-deploy export-onnx BASE --adapter ADAPTER -o ONNX
      pera-deploy unmerge MERGED --adapter ADAPTER -o BASE
      pera-deploy extract CHECKPOINT -o ADAPTER      (from DeepSpeed, Lightning, DCP, HF Trainer)
      pera-deploy bundle BASE -o BUNDLE --adapter a=A1 --adapter b=A2
      pera-deploy combine A1 A2 -o LORA --weights 0.7,0.3
      pera-deploy reproduce OUTPUT                   (re-derive any output from its manifest)
      pera-deploy formats                            (the adapter formats and checkpoints it reads)

    \b
    Exit status: 0 success, 1 a numerical check failed, 2 bad input, 3 internal error,
    4 the environment failed (disk full, permission denied, I/O error on output).
    With --json (anywhere on the line) every command prints one JSON object on stdout, on
    failure too; so do --help and --version.
    """


def _run(call: Callable[[], Any], render: Callable[[Any], str],
         to_dict: Callable[[Any], dict[str, Any]] = lambda r: r.to_dict()) -> None:
    """Call the API; print its result as text or JSON. A failed check still prints the
    report's text summary (the error line follows on stderr). The outcome is settled before
    anything is printed: a signal that arrives while printing does not add a second one."""
    as_json = bool(click.get_current_context().meta.get(JSON_KEY))
    try:
        result = call()
    except CheckFailed as exc:
        scoped.settle()
        if not as_json and exc.report is not None:
            _echo(render(exc.report))
        raise
    scoped.settle()
    from .export.contract import Plan

    if isinstance(result, Plan):  # a writer's --dry-run: its plan, whatever the command
        render, to_dict = Plan.render, Plan.to_dict
    _echo(json.dumps({**to_dict(result), "exit_code": EXIT_OK}, indent=2, default=str) if as_json else render(result))


# -- the writers' commands, built from their declarations (export/command.py) -----------------------------

_PATH = click.Path(path_type=Path)
_TYPES: dict[str, Any] = {"path": _PATH, "text": None, "int": int, "float": float}


Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _click_parameter(param: Param) -> Decorator:
    """The click decorator for one declared parameter."""
    kind = param.kind
    type_ = click.Choice(list(kind)) if isinstance(kind, tuple) else _TYPES.get(kind)
    if not param.flags:
        return click.argument(param.name, type=type_, nargs=-1 if param.multiple else 1,
                              required=param.required if param.multiple else True, metavar=param.metavar)
    given: dict[str, Any] = {"is_flag": True} if kind == "flag" else {}
    # click 8.3 takes an explicit default=None as a value, which meets `required`; a --x/--no-x
    # switch needs it, or it defaults to False (None: neither given, the writer decides)
    if param.default is not None or kind == "switch":
        given["default"] = param.default
    return click.option(*param.flags, param.name, type=None if kind in ("flag", "switch") else type_,
                        required=param.required, multiple=param.multiple, metavar=param.metavar,
                        show_default=param.show_default, help=param.help, **given)


def _force_option(folder: bool) -> Decorator:
    replaced = "an earlier output of pera-deploy (or an empty folder)" if folder else "a file pera-deploy wrote"
    return click.option("--force", is_flag=True, help=f"Replace OUTPUT if it is {replaced}; nothing else is replaced.")


dry_run_option = click.option(
    "--dry-run", is_flag=True, help="Print what would be written (files, sizes, ranks, modules, checks, what --force "
    "would replace) and write nothing; bad input still exits 2.")
progress_option = click.option("--progress/--no-progress", default=None,
                               help="Progress on stderr (default: on a terminal; never with --json).")


def writer_command(name: str) -> click.Command:
    """The command `name` of export/registry.py, from its writer's declaration: its own
    parameters, then the ones every writer takes, all handed to its API function."""
    from .export.driver import exporter

    writer = exporter(name)
    spec = writer.command
    if spec is None:
        raise InternalError(f"{name}: its writer declares no command line")
    shared: dict[str, Decorator] = {LOAD: adapter_options, PRECISION: precision_option}
    decorators = [shared[p] if isinstance(p, str) else _click_parameter(p) for p in spec.params]
    decorators += [*([jobs_option] if spec.jobs else []), _force_option(writer.folder), dry_run_option,
                   progress_option, json_option, debug_option]

    def callback(*, format_: str | None, adapter_name: str | None, missing_coefficients: str | None,
                 config: Path | None, force: bool, dry_run: bool, progress: bool | None, **params: Any) -> None:
        _run_writer(name, spec, params, _load_options(format_, adapter_name, missing_coefficients, config), force=force,
                    dry_run=dry_run, progress=_progress(progress))

    run: Callable[..., Any] = callback
    for decorate in reversed(decorators):
        run = decorate(run)
    return click.command(name, cls=_Command, help=spec.help)(run)


def _run_writer(name: str, spec: Command, params: dict[str, Any], load: dict[str, Any], *, force: bool, dry_run: bool,
                progress: bool | None) -> None:
    """Call the writer's API function with what its command line asked for. The inputs its
    call names are hashed from the start, while the rest of the tool is still being imported
    (a dry run hashes, and caches, nothing); the report renders as its writer renders it."""
    from .export.driver import exporter
    from .io.digests import Digests, likely_inputs

    started = time.perf_counter()
    call = spec.arguments(params)
    digests = Digests()
    if call.prefetch and not dry_run:
        from .formats.peft_folder import check_adapter_name

        check_adapter_name(load["adapter_name"])  # first: a path there would have a sibling folder's files read
        *adapters, base = call.prefetch
        for path in adapters:
            digests.prefetch(likely_inputs(path / load["adapter_name"] if load["adapter_name"] else path, base))

    def result() -> Any:
        from . import api

        made = getattr(api, call.function)(**call.arguments, force=force, dry_run=dry_run, progress=progress,
                                           digests=digests, **load)
        for warning in spec.warnings(made) if spec.warnings is not None else ():
            _echo(f"pera-deploy: warning: {warning}", err=True)
        return made

    def render(report: Any) -> str:
        text = exporter(report.command).render(report)
        timed = spec.timed and report.command == name and report.passed  # (not a variant's: keep-branch's ends in a command)
        return text + (f" in {time.perf_counter() - started:.1f} s" if timed else "")

    try:
        _run(result, render, to_dict=lambda report: {**report.to_dict(), "seconds": time.perf_counter() - started})
    finally:
        digests.close()


def all_commands() -> dict[str, click.Command]:
    """Every command, the writers' built: what tests and the docs check walk."""
    ctx = click.Context(main)
    return {name: command for name in main.list_commands(ctx) if (command := main.get_command(ctx, name))}


def _fmt_list(values: list[Any]) -> str:
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


@main.command()
@click.argument("adapter", type=click.Path(path_type=Path))
@adapter_options
@json_option
@debug_option
def inspect(adapter: Path, format_: str | None, adapter_name: str | None, missing_coefficients: str | None,
            config: Path | None) -> None:
    """Describe a PERA adapter: format, r, R', scaling, coefficient layout, modules, size and ‖ΔW‖ per layer.

    ADAPTER is a folder or a file (with --config when it comes without its adapter_config.json).
    An output of pera-deploy that is no adapter (a merged folder, a bundle, an ONNX export) is
    described from its pera_deploy_manifest.json: the command, its inputs, options and checks.

    \b
    Example:
      pera-deploy inspect fixtures/examples/llama-pera
    """
    from .api import inspect_adapter

    def render(info: dict[str, Any]) -> str:
        if "layers" not in info:  # an output of pera-deploy that is no adapter: its manifest
            return "\n".join(_output_lines(info))
        lines = [
            f"adapter      {info['path']}" + (f" (adapter {info['adapter_name']!r})" if info["adapter_name"] else ""),
            f"format       {info['format']}"
            + ("  (a plain LoRA: every PERA coefficient is zero)" if info["plain_lora"] else ""),
            f"base model   {info['base_model_name_or_path'] or 'not recorded'}",
            f"r            {_fmt_list(info['r'])}    R' = r + r(r+1)/2 = {_fmt_list(info['R_prime'])}",
            f"scaling      {_fmt_list(info['scaling'])}",
            f"coefficients {_fmt_list(info['coefficient_layouts'])}",
            f"targets      {info['target_modules']}",
            f"modules      {info['modules']}    parameters {info['parameters']:,}",
        ]
        if info["extra_tensors"]:
            lines.append(f"full tensors {_fmt_list(info['extra_tensors'])}")
        lines += [f"note         {n}" for n in info["notes"]]
        if info.get("made_by"):
            made = info["made_by"]
            lines.append(f"made by      pera-deploy {made['pera_deploy_version']} {made['command']} "
                         f"({made['manifest']})")
            lines += [f"  {line}" for line in _output_lines(made)[2:-1]]
        source = info.get("source") or {}
        if source:
            lines.append(f"container    {source.get('container')}")
            for key, label in (("naming", "naming"), ("adapter_name", "adapter name"), ("zero_stage", "ZeRO stage"),
                               ("ranks", "ranks"), ("step", "step"), ("weights", "weights")):
                if source.get(key) is not None:
                    lines.append(f"  {label:<15}{source[key]}")
            if source.get("prefixes_stripped"):
                lines.append(f"  {'stripped':<15}{', '.join(source['prefixes_stripped'])}")
            for what, where in (source.get("settings") or {}).items():
                lines.append(f"  {what:<15}from {where}")
            if "tensors_taken" in source:
                lines.append(f"  {'tensors':<15}{source['tensors_taken']} taken, {source['tensors_ignored']} ignored")
        lines.append("")
        width = max(len(layer["module"]) for layer in info["layers"])
        lines.append(f"{'module':<{width}}  {'r':>3} {'R′':>4} {'in×out':>11} {'scaling':>8}  {'layout':<13} ‖ΔW‖")
        for layer in info["layers"]:
            shape = f"{layer['in_features']}×{layer['out_features']}"
            lines.append(
                f"{layer['module']:<{width}}  {layer['r']:>3} {layer['R_prime']:>4} {shape:>11} "
                f"{layer['scaling']:>8.4g}  {layer['coefficient_layout']:<13} {layer['delta_norm']:.6g}"
            )
        return "\n".join(lines)

    _run(lambda: inspect_adapter(adapter, **_load_options(format_, adapter_name, missing_coefficients, config)),
         render, to_dict=dict)


def _output_lines(made: dict[str, Any]) -> list[str]:
    """An output of pera-deploy as its manifest describes it (publish.manifest.describe_output)."""
    def record(value: Any) -> str:
        if isinstance(value, list):
            return "; ".join(record(v) for v in value)
        if not isinstance(value, dict) or not ("source" in value or "sha256" in value):
            return "; ".join(f"{name}: {record(v)}" for name, v in value.items()) if isinstance(value, dict) \
                else str(value)
        facts = [value["format"]] if value.get("format") else []
        facts += [f"r {_fmt_list(value['r'])}"] if value.get("r") else []
        facts += [f"{value['modules']} modules"] if value.get("modules") else []
        facts += [f"weight {value['weight']:g}"] if value.get("weight") is not None else []
        facts += [f"sha256 {value['sha256'][:12]}…"] if value.get("sha256") else []
        return f"{value.get('source', '?')} ({', '.join(facts)})"

    lines = [f"output       {made['path']}: {made['what']}",
             f"made by      pera-deploy {made['pera_deploy_version']} {made['command']}"]
    lines += [f"{name:<12} {record(value)}" for name, value in made["inputs"].items()]
    options = ", ".join(f"{k}={v}" for k, v in made["options"].items())
    lines.append(f"options      {options or 'the defaults'}")
    checks = ", ".join(f"{kind}: {'passed' if ok else 'FAILED' if ok is False else '?'}"
                       for kind, ok in made["checks"].items())
    lines.append(f"checks       {checks or 'none recorded'}")
    lines.append(f"manifest     {made['manifest']}")
    return lines


@main.command()
@click.argument("merged", type=click.Path(path_type=Path))
@click.option("--adapter", "adapter", type=click.Path(path_type=Path), multiple=True,
              help="The adapter that was merged (not for a bundle); repeated for a merge of several, checked as "
              "their weighted sum.")
@click.option("--weights", default=None, metavar="W1,W2,...",
              help="With several --adapter: the weights they were merged with (merge --weights; default all 1).")
@click.option("--base", "base", type=click.Path(path_type=Path), default=None,
              help="The base model it was merged into (not for a bundle).")
@adapter_options
@click.option("--forward/--no-forward", default=True, show_default=True,
              help="Also compare outputs of the merged and the unmerged model on seeded inputs.")
@click.option("--seed", default=0, show_default=True, help="Seed for the forward check's inputs (0 to 2**32 - 1).")
@click.option("--runtime", type=click.Choice(["transformers", "onnxruntime", "ort-genai", "llama.cpp", "vllm"]),
              default=None, help="Run MERGED (any artifact: merged, LoRA, --keep-branch, bundle, ONNX folder or GGUF "
              "file) in this runtime, greedily, and compare tokens and logits step by step with the unmerged model.")
@click.option("--prompts", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="With --runtime: prompts, one a line (default: a few fixed ones), tokenized by --base's tokenizer.")
@click.option("--max-new-tokens", type=int, default=None, metavar="N",
              help="With --runtime: tokens generated and compared per prompt (default 16).")
@click.option("--use", default=None, metavar="NAME",
              help="With --runtime: the adapter of a bundle or a branch ONNX folder (NAME.onnx_adapter) to run.")
@click.option("--base-gguf", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="With --runtime llama.cpp: the base model as a GGUF (llama.cpp's convert_hf_to_gguf.py of --base).")
@click.option("--record", is_flag=True,
              help="With --runtime: when the check passes, add its report to the artifact's pera_deploy_manifest.json "
              "(or bundle.json) under runtime_checks; without it verify writes nothing.")
@precision_option
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
@json_option
@debug_option
def verify(merged: Path, adapter: tuple[Path, ...], weights: str | None, base: Path | None, format_: str | None,
           adapter_name: str | None,
           missing_coefficients: str | None, config: Path | None, forward: bool, seed: int, runtime: str | None,
           prompts: Path | None, max_new_tokens: int | None, use: str | None, base_gguf: Path | None, record: bool,
           progress: bool | None) -> None:
    """Check a merged model folder against its base and the adapter (exit 1 if it does not match).

    \b
    Weights: every merged tensor must equal W0 + ΔW up to one rounding to its dtype, element
    by element; every other tensor must be identical to the base.
    Forward: the merged model and the unmerged model (base + live PERA branch) run on the
    same seeded inputs in float32; the max relative output difference must be within 4x
    what random noise of one rounding (at the merged file's dtypes) causes in the unmerged
    model, and at least 1e-4. Max abs/rel difference and top-1 agreement are reported.
    Both models run a layer at a time, their weights read as each layer runs, so memory is
    about one layer's in float32, not the model's.

    \b
    MERGED may also be a bundle (`pera-deploy bundle`): each adapter is then checked against
    its recorded source (sha256), and base + its LoRA against base + the PERA adapter.

    \b
    --runtime runs MERGED as it is served (transformers + PEFT, ONNX Runtime, ORT GenAI,
    llama.cpp, vLLM), generating greedily on a few prompts; the unmerged model (PyTorch,
    float32) is run on the same tokens. Each step's logits must be within a tolerance set
    by the artifact's dtype and its token the reference's choice, except at near ties.
    Exit 1 names the prompt, step, and expected and actual token; exit 2 when the runtime
    is not installed, naming the package. The report gives the runtime's version, the
    KV-cache dtype and, per prompt, the steps compared and the worst logit difference.

    \b
    Examples:
      pera-deploy verify merged --adapter fixtures/examples/llama-pera --base fixtures/examples/llama-base
      pera-deploy verify merged-sum --adapter fixtures/examples/llama-pera --adapter fixtures/examples/llama-pera-2 \
          --weights 0.7,0.3 --base fixtures/examples/llama-base
      pera-deploy verify bundle
      pera-deploy verify onnx --runtime ort-genai --adapter ADAPTER --base BASE
    """
    from .api import verify as run_verify

    def render(report: Any) -> str:
        from .checks.lines import forward_line, weights_line

        if report.check("runtime") is not None:
            return _runtime_lines(report.check("runtime"), report.manifest.get("recorded_in"))
        if report.check("bundle base") is not None:  # a failed check says what failed
            return "\n".join(
                f"{c.kind}: FAILED — {c.failure()}" if not c.passed else
                f"{c.kind}: ok" + (
                    f" — source unchanged: {c.source_unchanged}; base + LoRA vs base + PERA: " + (
                        f"max rel diff {c.max_rel_diff:.2g} (tolerance {c.tolerance:.0e})" if c.forward else
                        "not run (--no-forward)") if hasattr(c, "source") else "")
                for c in report.checks)
        weights, fwd = report.check("weights"), report.check("forward")
        lines = [f"weights: {'ok' if weights.passed else 'FAILED'} — {weights_line(weights.to_dict())}"]
        if fwd:
            lines.append(f"forward: {'ok' if fwd.passed else 'FAILED'} — {forward_line(fwd)}")
        return "\n".join(lines)

    _run(lambda: run_verify(merged, list(adapter) or None, base, weights=parse_weights(weights), forward=forward,
                            seed=seed, progress=progress, runtime=runtime,
                            prompts=prompts, max_new_tokens=max_new_tokens, use=use, base_gguf=base_gguf,
                            record=record, **_load_options(format_, adapter_name, missing_coefficients, config)),
         render)


def _runtime_lines(check: Any, recorded_in: str | None) -> str:
    """verify --runtime's text: what ran, the tolerance, each prompt's figures, the notes."""
    lines = [f"runtime: {'ok' if check.passed else 'FAILED'} — {check.version}: {check.artifact}"]
    if check.findings:
        return "\n".join([*lines, *(f"  {finding}" for finding in check.findings)])
    lines.append(f"  artifact {check.dtype}, computed in {check.compute_dtype}, KV cache {check.kv_cache}; {check.compared} "
                 f"tolerance {check.tolerance:.2g} relative (noise floor {check.noise_floor:.2g})")
    if "max_lora_rank" in check.details:
        lines.append(f"  vLLM: rank {check.details['rank']}, needs --max-lora-rank {check.details['max_lora_rank']}")
    for p in check.prompts:
        label = repr(p.text) if p.text is not None else f"ids {p.ids}"
        ties = f", {len(p.near_ties)} near tie(s)" if p.near_ties else ""
        lines.append(f"  prompt {p.prompt} {label}: {p.steps} steps, worst {check.compared} difference "
                     f"{p.max_rel_diff:.2g} relative (step {p.worst_step}){ties}; tokenizer: {p.tokenizer}")
    lines.extend(f"  note: {note}" for note in check.notes)
    if recorded_in:
        lines.append(f"recorded in {recorded_in}")
    return "\n".join(lines)


@main.command()
@click.argument("output", type=click.Path(path_type=Path))
@click.option("--adapter", "adapter_specs", multiple=True, metavar="[NAME=]PATH",
              help="Where an adapter the output was made from is now, if it has moved (repeat in the recorded "
              "order; NAME=PATH for a bundle's or an ONNX export's named adapters).")
@click.option("--base", type=click.Path(path_type=Path), default=None,
              help="Where the model folder it was made from is now (the base; unmerge's merged folder).")
@click.option("--check-against", type=click.Path(path_type=Path), default=None,
              help="Where unmerge's --check-against folder is now.")
@click.option("--config", type=click.Path(path_type=Path), default=None,
              help="Where the --config file it was made with is now.")
@json_option
@debug_option
def reproduce(output: Path, adapter_specs: tuple[str, ...], base: Path | None, check_against: Path | None,
              config: Path | None) -> None:
    """Re-derive OUTPUT from its manifest and check that every file comes out the same.

    \b
    OUTPUT is a folder (or GGUF file) pera-deploy wrote. Its manifest records the command,
    every option, the inputs' paths as given and their sha256; reproduce runs that again in a
    private temporary folder (removed afterwards; nothing is written in or beside OUTPUT) and
    compares file by file: byte for byte, a differing safetensors or GGUF file named with its
    first differing tensor. The manifest and bundle.json are compared field by field: the
    checks by their verdicts, and the figures measured through BLAS (‖ΔW‖, a reduced LoRA's
    errors) to 1e-9, as their last bits may differ between machines.

    \b
    Exit 0: every file is what the recorded command writes; 1: a file differs (or a check of
    the re-derivation failed); 2: OUTPUT is not an output of this pera-deploy version, its
    manifest is damaged, or an input is missing or no longer has its recorded sha256 (give an
    input that moved with --adapter / --base, under its recorded name).

    \b
    Examples:
      pera-deploy reproduce merged
      pera-deploy reproduce merged --adapter /new/place/llama-pera --base /new/place/llama-base
    """
    from .api import reproduce as run_reproduce

    def render(report: Any) -> str:
        check = report.check("reproduce")
        if check.passed:
            lines = [f"reproduced {output}: its {check.command} writes every file the same ({len(check.files)} compared)"]
        else:
            lines = [f"{output} is not what its manifest's {check.command} writes:"]
            lines += [f"  {difference}" for difference in check.differences[:20]]
            if len(check.differences) > 20:
                lines.append(f"  ... and {len(check.differences) - 20} more (--json lists them all)")
        lines += [f"  note: {note}" for note in check.notes]
        return "\n".join(lines)

    _run(lambda: run_reproduce(output, adapters=list(adapter_specs), base=base, check_against=check_against,
                               config=config), render)


@main.command()
@json_option
@debug_option
def formats() -> None:
    """List the adapter formats pera-deploy reads (for --format), in the order detection tries them."""
    from .formats import FORMATS

    data = {name: f.description for name, f in FORMATS.items()}
    _run(lambda: data, lambda d: "\n".join(f"{name:<10} {desc}" for name, desc in d.items()),
         to_dict=lambda d: {"formats": d})


def run() -> NoReturn:
    """The `pera-deploy` program: `main`, then an exit that skips the interpreter's last
    garbage collections (`gc.freeze`). Those walk every object torch created at import:
    measured after a merge, the exit took 0.52–0.69 s with them and 0.16–0.21 s without,
    and what they would free goes back to the system with the process anyway. Every file
    is closed, synced and renamed, and every thread joined, before `main` returns. This is
    the program's own business, so `main` does not do it: tests and other programs call it
    in-process, where frozen garbage would pile up.

    Signals are the program's business too: the stop-signal handler is armed first and never
    put back (scoped.arm_stop_signals), and once `main` has printed the result and decided
    the status, stop signals are ignored until the process ends (scoped.ignore_stop_signals).
    A signal during the interpreter's shutdown can then neither kill the process with a raw
    signal status nor print a KeyboardInterrupt traceback."""
    flags = _flags(sys.argv[1:])
    try:
        scoped.arm_stop_signals()
        code = main.main(standalone_mode=False)
    except (KeyboardInterrupt, Interrupted) as exc:  # arrived before `main` could catch it
        code = _interrupted(flags, exc)
    scoped.ignore_stop_signals()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
