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
    InputError,
    Interrupted,
    PeraDeployError,
    classify_os_error,
)

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


def rank_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Which rank a LoRA export keeps: the same options on export-lora, combine and export-gguf."""
    for option in reversed([
        click.option("--rank", type=int, default=None, help="Keep the best rank-K approximation, per module."),
        click.option("--tol", type=float, default=None,
                     help="Per module, the smallest rank whose relative Frobenius error is at most T."),
        click.option("--max-rank", type=int, default=None, help="Cap every module's rank at M."),
    ]):
        f = option(f)
    return f


def lora_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """How to write a plain LoRA: the same options on export-lora and combine."""
    for option in reversed([
        rank_options,
        click.option("--pad/--no-pad", default=True, show_default=True,
                     help="Pad all modules to one rank (scaling exactly 1 in PEFT, vLLM and llama.cpp); --no-pad "
                     "writes each at its own rank with rank_pattern / alpha_pattern."),
        click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
                     show_default=True, help="Storage dtype of the LoRA factors."),
        click.option("--base", type=click.Path(path_type=Path), default=None,
                     help="Name modules as this base model's transformers class does (what PEFT matches), and check "
                     "shapes."),
    ]):
        f = option(f)
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


force_option = click.option(
    "--force", is_flag=True,
    help="Replace OUTPUT if it is an earlier output of pera-deploy (or an empty folder); nothing else is replaced.")


def writer_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """What every writer takes from the driver: --dry-run and --progress/--no-progress."""
    f = click.option("--progress/--no-progress", default=None,
                     help="Progress on stderr (default: on a terminal; never with --json).")(f)
    f = click.option("--dry-run", is_flag=True,
                     help="Print what would be written (files, sizes, ranks, modules, checks, what --force would "
                     "replace) and write nothing; bad input still exits 2.")(f)
    return f


def _progress(progress: bool | None) -> bool | None:
    """--progress as the driver takes it: never under --json (stdout holds one JSON object,
    and a caller reading it wants no bar on stderr either)."""
    return False if click.get_current_context().meta.get(JSON_KEY) else progress


def _render_with(command: str) -> Callable[[Any], str]:
    """The registered writer's renderer, for its report."""
    from .driver import exporter

    return lambda report: exporter(command).render(report)


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


def parse_weights(text: str | None) -> list[float] | None:
    """--weights 0.7,0.3 → [0.7, 0.3]; anything else is an InputError naming it."""
    if text is None:
        return None
    values = []
    for part in text.split(","):
        try:
            values.append(float(part))
        except ValueError:
            raise InputError(f"--weights {text!r}: {part.strip()!r} is not a number") from None
    return values


def _adapters_and_base(paths: tuple[Path, ...], adapter_opts: tuple[Path, ...],
                       base_opt: Path | None) -> tuple[list[Path], Path]:
    """ADAPTER... BASE, or --adapter ... --base ..., or a mix: the adapters and the base."""
    positional = list(paths)
    base = base_opt if base_opt is not None else (positional.pop() if positional else None)
    adapters = [*adapter_opts, *positional]
    if base is None or not adapters:
        raise click.UsageError("give the adapter(s) and the base: ADAPTER... BASE, or --adapter PATH --base BASE")
    return adapters, base


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
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path), metavar="ADAPTER... BASE")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="The merged model folder to write.")
@click.option("--adapter", "adapter_opts", multiple=True, type=click.Path(path_type=Path), metavar="PATH",
              help="An adapter, as an option (repeatable); the positional form ADAPTER... BASE works too.")
@click.option("--base", "base_opt", type=click.Path(path_type=Path), default=None,
              help="The base model folder, as an option (then every positional path is an adapter).")
@click.option("--weights", default=None, metavar="W1,W2,...",
              help="Merge the adapters' weighted sum Σ wᵢ ΔWᵢ (one weight per adapter; negative subtracts); "
              "several adapters default to all 1.")
@adapter_options
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto", show_default=True,
              help="Storage dtype of the output's float tensors; auto keeps each tensor's own.")
@precision_option
@click.option("--max-shard-size", default=None, metavar="SIZE",
              help="Re-shard the output (e.g. 2GB, 500MB); by default the base's shard layout is kept.")
@click.option("--untie-embeddings", is_flag=True,
              help="Allow merging into a tied embedding by giving the tied pair separate weights.")
@click.option("--check-forward", is_flag=True,
              help="Also run the merged and the unmerged model on seeded inputs and compare outputs.")
@click.option("--full-check", is_flag=True,
              help="Recompute every merged element independently (by default a sample: about 1/8 of the "
              "rows of a large weight, with rows from every block the merge wrote, and every row of a weight "
              "of at most 2^17 elements; about 1.5x the merge's time).")
@click.option("--keep-branch", is_flag=True,
              help="Do not merge: write OUTPUT/base (the base, untouched) and OUTPUT/adapter (the adapter as an "
              "exact plain PEFT LoRA) for multi-adapter serving with PEFT or vLLM.")
@click.option("--base-files", type=click.Choice(["copy", "hardlink", "symlink"]), default="copy", show_default=True,
              help="With --keep-branch: how OUTPUT/base holds the base's files.")
@jobs_option
@force_option
@writer_options
@json_option
@debug_option
def merge(paths: tuple[Path, ...], output: Path, adapter_opts: tuple[Path, ...], base_opt: Path | None,
          weights: str | None, format_: str | None, adapter_name: str | None,
          missing_coefficients: str | None, config: Path | None, dtype: str,
          max_shard_size: str | None, untie_embeddings: bool, check_forward: bool, full_check: bool,
          keep_branch: bool, base_files: str, jobs: int | None, force: bool, dry_run: bool,
          progress: bool | None) -> None:
    """Merge the PERA adapter ADAPTER into the model folder BASE, writing a new model folder.

    Several adapters are merged as their weighted sum (--weights, default all 1), exactly, in
    the same single pass and single rounding as one.

    \b
    The output is a plain Hugging Face model folder: the base's shards and index (each merged
    element W0 + ΔW evaluated in float64 and rounded once, correctly, the same bytes on any
    machine; every other tensor bit-identical), its config, tokenizer and generation files,
    and pera_deploy_manifest.json with the sha256 of the inputs, each merged layer and the
    check results. It appears only once every check has passed.

    \b
    With --keep-branch nothing is merged: OUTPUT/base is the base as it is and
    OUTPUT/adapter the exact plain LoRA (see export-lora), the pair multi-adapter servers load.

    \b
    Examples:
      pera-deploy merge fixtures/examples/llama-pera fixtures/examples/llama-base -o merged
      pera-deploy merge fixtures/examples/llama-pera fixtures/examples/llama-pera-2 fixtures/examples/llama-base \\
          -o merged-sum --weights 0.7,0.3
      pera-deploy merge fixtures/examples/llama-pera fixtures/examples/llama-base -o served --keep-branch
    """
    adapters, base = _adapters_and_base(paths, adapter_opts, base_opt)
    weight_list = parse_weights(weights)
    load = _load_options(format_, adapter_name, missing_coefficients, config)
    adapter: Any = adapters[0] if len(adapters) == 1 else list(adapters)
    if keep_branch:
        if len(adapters) > 1 or weight_list is not None:
            raise InputError("--keep-branch writes one adapter; for several, see `pera-deploy bundle`")
        given = [flag for flag, on in (("--dtype", dtype != "auto"), ("--max-shard-size", max_shard_size is not None),
                                       ("--untie-embeddings", untie_embeddings), ("--check-forward", check_forward),
                                       ("--full-check", full_check),
                                       ("--jobs", jobs is not None)) if on]
        if given:
            raise InputError(f"{', '.join(given)} do(es) not apply with --keep-branch: the base is written untouched")
        from .api import keep_branch as run_keep_branch

        _run(lambda: run_keep_branch(adapter, base, output, base_files=base_files, force=force, dry_run=dry_run,
                                     progress=_progress(progress), **load), _render_with("merge --keep-branch"))
        return
    _merge_timed(adapters, base, dry_run, load, lambda digests: dict(
        adapter=adapter, base=base, output=output, weights=weight_list, dtype=dtype, max_shard_size=max_shard_size,
        untie_embeddings=untie_embeddings, check_forward_pass=check_forward, full_check=full_check, force=force,
        dry_run=dry_run, progress=_progress(progress), digests=digests, jobs=jobs, **load))


def _merge_timed(adapters: list[Path], base: Path, dry_run: bool, load: dict[str, Any],
                 arguments: Callable[[Any], dict[str, Any]]) -> None:
    """api.merge with `arguments(digests)`, the inputs hashed from the start (while the rest of
    the tool is still being imported), and the time the command took in its report."""
    from .io.digests import Digests, likely_inputs

    started = time.perf_counter()
    # the adapter name checked first: a path there would have a sibling folder's files read
    from .formats.peft_folder import check_adapter_name

    check_adapter_name(load["adapter_name"])
    digests = Digests()
    for path in adapters if not dry_run else ():  # a dry run hashes (and caches) nothing
        digests.prefetch(likely_inputs(path / load["adapter_name"] if load["adapter_name"] else path, base))

    def render(report: Any) -> str:  # the writer's report, and the time the command took
        text = _render_with("merge")(report)
        return text + (f" in {time.perf_counter() - started:.1f} s" if report.passed else "")

    try:
        from .api import merge as run_merge

        _run(lambda: run_merge(**arguments(digests)), render,
             to_dict=lambda report: {**report.to_dict(), "seconds": time.perf_counter() - started})
    finally:
        digests.close()


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


@main.command("export-lora")
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="The LoRA adapter folder to write.")
@adapter_options
@lora_options
@force_option
@writer_options
@json_option
@debug_option
def export_lora(adapter: Path, output: Path, format_: str | None, adapter_name: str | None,
                missing_coefficients: str | None, config: Path | None, rank: int | None, tol: float | None,
                max_rank: int | None, pad: bool, dtype: str, base: Path | None, force: bool, dry_run: bool,
                progress: bool | None) -> None:
    """Write a PERA adapter as a plain PEFT LoRA adapter, which every LoRA runtime serves.

    \b
    ΔW = (s·B̂)·Â exactly, so lora_B = s·B̂ and lora_A = Â is an exact LoRA of rank
    R' = r + r(r+1)/2 (44 for r = 8). --rank / --tol / --max-rank keep instead the best
    approximation per module (a truncated SVD computed from the factors) and report its
    relative error per module and in total. Each module's stored factors are checked
    against ΔW before the folder is published.

    \b
    Examples:
      pera-deploy export-lora fixtures/examples/llama-pera -o lora-exact
      pera-deploy export-lora fixtures/examples/llama-pera -o lora-r8 --rank 8
    """
    from .api import export_lora as run_export

    def call() -> Any:
        return _warned(run_export(adapter, output, rank=rank, tol=tol, max_rank=max_rank, pad=pad, dtype=dtype,
                                  base=base, force=force, dry_run=dry_run, progress=_progress(progress),
                                  **_load_options(format_, adapter_name, missing_coefficients, config)))

    _run(call, _render_with("export-lora"))


def _warned(result: Any) -> Any:
    """A LoRA export's warnings on stderr (a plan's, or the report's), then the result."""
    lora = result.summary if hasattr(result, "summary") else result.manifest["lora"]
    for warning in lora["warnings"]:
        _echo(f"pera-deploy: warning: {warning}", err=True)
    return result


@main.command("export-gguf")
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option("--base", required=True, type=click.Path(path_type=Path),
              help="The base model folder the adapter is for: its architecture names the tensors and orders the q/k "
              "rows; the adapter's shapes are checked against it.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="The .gguf file to write.")
@adapter_options
@rank_options
@click.option("--pad/--no-pad", default=True, show_default=True,
              help="Pad all modules to one rank, so llama.cpp's alpha / rank is exactly 1; --no-pad keeps each "
              "module's rank and folds rank / r into its lora_b instead.")
@click.option("--dtype", default="float32", show_default=True, metavar="float32|float16|q8_0",
              help="Storage type of lora_a and lora_b: GGUF F32, F16, or Q8_0 as llama.cpp's converter writes it "
              "(blocks of 32 along each row; rows of another length, such as lora_b's, in F16).")
@click.option("--force", is_flag=True,
              help="Replace OUTPUT if it is a GGUF written by pera-deploy; nothing else is replaced.")
@writer_options
@json_option
@debug_option
def export_gguf(adapter: Path, base: Path, output: Path, format_: str | None, adapter_name: str | None,
                missing_coefficients: str | None, config: Path | None, rank: int | None, tol: float | None,
                max_rank: int | None, pad: bool, dtype: str, force: bool, dry_run: bool, progress: bool | None) -> None:
    """Write a PERA adapter as a llama.cpp LoRA adapter file (GGUF), for `llama-cli --lora`.

    \b
    The tensors are the exact plain LoRA of export-lora (lora_B = s·B̂, lora_A = Â, rank
    R' = 44 for r = 8; or --rank / --tol / --max-rank), named as llama.cpp names the base's
    tensors (blk.0.attn_q.weight.lora_a / .lora_b, from the gguf package's name map), with
    q/k rows in llama.cpp's rotary order and adapter.lora.alpha = the rank, so llama.cpp's
    scale alpha / rank is 1: tensor for tensor what llama.cpp's convert_lora_to_gguf.py
    writes from `export-lora --base BASE`. The file is read back and every tensor checked,
    and ΔW as llama.cpp computes it, before it appears. Bases: Llama, Mistral, Qwen2, Qwen3.
    Needs the gguf extra: pip install 'pera-deploy[gguf]'.

    \b
    Examples:
      pera-deploy export-gguf fixtures/examples/small-llama-pera --base fixtures/examples/small-llama-base \\
          -o small-llama-pera.gguf
      pera-deploy export-gguf fixtures/examples/small-llama-pera --base fixtures/examples/small-llama-base \\
          -o small-llama-pera-r8-f16.gguf --rank 8 --dtype float16
    \b
    Then, with the base converted by llama.cpp's convert_hf_to_gguf.py:
      llama-cli -m small-llama-base.gguf --lora small-llama-pera.gguf
    """
    from .api import export_gguf as run_export

    _run(lambda: _warned(run_export(adapter, output, base=base, rank=rank, tol=tol, max_rank=max_rank, pad=pad,
                                    dtype=dtype, force=force, dry_run=dry_run, progress=_progress(progress),
                                    **_load_options(format_, adapter_name, missing_coefficients, config))),
         _render_with("export-gguf"))


@main.command()
@click.argument("adapters", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="ADAPTER...")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="The LoRA adapter folder to write.")
@click.option("--weights", default=None, metavar="W1,W2,...",
              help="One weight per adapter (default all 1; negative subtracts an adapter).")
@adapter_options
@lora_options
@force_option
@writer_options
@json_option
@debug_option
def combine(adapters: tuple[Path, ...], output: Path, weights: str | None, format_: str | None,
            adapter_name: str | None, missing_coefficients: str | None, config: Path | None, rank: int | None,
            tol: float | None, max_rank: int | None, pad: bool, dtype: str, base: Path | None, force: bool,
            dry_run: bool, progress: bool | None) -> None:
    """Write the weighted sum of several adapters (PERA or LoRA) as one plain PEFT LoRA.

    \b
    Σ wᵢ ΔWᵢ is exactly the LoRA whose factors are the stacked wᵢ·sᵢ·B̂ᵢ and Âᵢ (rank ΣR′ᵢ):
    that is what is written, with no approximation, unless --rank, --tol or --max-rank ask
    for the best approximation of the sum per module (a factored SVD; each module's error
    is reported). Modules targeted by only some adapters are fine.

    \b
    Example:
      pera-deploy combine fixtures/examples/llama-pera fixtures/examples/llama-pera-2 -o combined \\
          --weights 0.7,0.3
    """
    from .api import combine as run_combine

    _run(lambda: _warned(run_combine(list(adapters), output, weights=parse_weights(weights), rank=rank, tol=tol,
                                     max_rank=max_rank, pad=pad, dtype=dtype, base=base, force=force,
                                     dry_run=dry_run, progress=_progress(progress),
                                     **_load_options(format_, adapter_name, missing_coefficients, config))),
         _render_with("combine"))


@main.command()
@click.argument("merged", type=click.Path(path_type=Path))
@click.option("--adapter", "adapter", required=True, type=click.Path(path_type=Path), help="The adapter that was merged.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="The recovered model folder to write.")
@adapter_options
@click.option("--check-against", type=click.Path(path_type=Path), default=None,
              help="The original base: compare the recovered weights with it (exit 1 if clearly further off than "
              "the merge's rounding explains).")
@precision_option
@click.option("--full-check", is_flag=True,
              help="Recompute every recovered element independently (default: a sample of rows).")
@jobs_option
@force_option
@writer_options
@json_option
@debug_option
def unmerge(merged: Path, adapter: Path, output: Path, format_: str | None, adapter_name: str | None,
            missing_coefficients: str | None, config: Path | None, check_against: Path | None,
            full_check: bool, jobs: int | None, force: bool, dry_run: bool, progress: bool | None) -> None:
    """Take a PERA update back out of a merged model: W0 = W' − ΔW, streamed like a merge.

    \b
    The merge rounded W0 + ΔW once to its dtype, and that cannot be undone: each recovered
    weight can be off by about two roundings (in bfloat16, 2·2⁻⁸ relative per element).
    With --check-against the recovered model is compared with the original base and the
    figures reported. Tensors the merge replaced (modules_to_save, trained biases) cannot be
    recovered; they are kept as merged and listed.

    \b
    Example:
      pera-deploy unmerge merged --adapter fixtures/examples/llama-pera -o recovered \\
          --check-against fixtures/examples/llama-base
    """
    from .api import unmerge as run_unmerge

    _run(lambda: run_unmerge(merged, adapter, output, check_against=check_against, full_check=full_check,
                             force=force, dry_run=dry_run, progress=_progress(progress), jobs=jobs,
                             **_load_options(format_, adapter_name, missing_coefficients, config)),
         _render_with("unmerge"))


@main.command("export-onnx")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="The ONNX folder to write.")
@click.option("--adapter", "adapter_specs", multiple=True, metavar="[NAME=]PATH",
              help="A PERA adapter: merged into MODEL before export, or with --branch, one swappable adapter file "
              "NAME.onnx_adapter (repeat for several).")
@click.option("--branch", is_flag=True,
              help="Export MODEL (the base) with a swappable PERA branch at every targeted layer instead of merging.")
@click.option("--task", default=None, help="Optimum task (default: from the config's architecture; decoders with past).")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: Optimum's for the architecture).")
@click.option("--genai/--no-genai", default=None,
              help="Write genai_config.json for ONNX Runtime GenAI. Default: where GenAI can run the export "
                   "(a decoder of a type it runs, with tokenizer.json or a SentencePiece tokenizer.model to make it "
                   "from); elsewhere the graph alone, the report saying why. --genai: elsewhere is an error.")
@click.option("--engine", type=click.Choice(["optimum", "genai"]), default="optimum", show_default=True,
              help="optimum: Optimum's exporter (encoders too, --branch). genai: ONNX Runtime GenAI's own model builder "
                   "on the merged model (decoders it builds; float32 or int4), in the genai extra's "
                   "environment (transformers 5).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "int4"]), default="float32", show_default=True,
              help="float16 converts the float32 graph (and adapter files) after export; checked with a wider tolerance. "
                   "int4 (MatMulNBits): --engine genai only.")
@adapter_options
@writer_options
@force_option
@json_option
@debug_option
def export_onnx(model: Path, output: Path, adapter_specs: tuple[str, ...], branch: bool, task: str | None,
                opset: int | None, genai: bool | None, engine: str, dtype: str, format_: str | None,
                adapter_name: str | None, missing_coefficients: str | None, config: Path | None, force: bool, dry_run: bool,
                progress: bool | None) -> None:
    """Export to ONNX, checked with ONNX Runtime against the unmerged PyTorch model.

    \b
    MODEL alone is a (merged) model folder, exported as it is. With one --adapter, MODEL is
    the base: the adapter is merged on the fly (nothing but the ONNX folder is left behind).
    With --branch, MODEL is the base and every --adapter NAME=PATH becomes NAME.onnx_adapter:
    the graph computes x·W0ᵀ + (x·Âᵀ)·(s·B̂)ᵀ at each targeted layer, with the factors as
    inputs of rank 0 by default (so with no adapter it is the base model), and ONNX Runtime
    swaps adapters per request (RunOptions.add_active_adapter). Decoders get the KV-cache
    graph. Every graph is run in ONNX Runtime (prefill and one decoding step for decoders)
    and compared with PyTorch, output by output: float32 within 1e-4 relative, float16
    within 1e-2, or exit 1. Decoders get genai_config.json beside the graph and tokenizer,
    so onnxruntime_genai.Model(ONNX) runs the folder as written (og.Adapters loads the
    .onnx_adapter files); a SentencePiece tokenizer.model without tokenizer.json gets the
    tokenizer.json transformers makes from it. A folder GenAI cannot run (no tokenizer, a
    model type it does not run) is exported without genai_config.json, and the report says why.

    \b
    Examples:
      pera-deploy export-onnx fixtures/examples/llama-base --adapter fixtures/examples/llama-pera -o onnx-merged
      pera-deploy export-onnx fixtures/examples/llama-base --branch -o onnx-branch \\
          --adapter pera=fixtures/examples/llama-pera --adapter second=fixtures/examples/llama-pera-2
    """
    from .api import export_onnx as run_export

    adapters: dict[str, Any] = {}
    for spec in adapter_specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        if name in adapters:
            raise InputError(f"--adapter {name}: the name is given twice")
        adapters[name] = Path(path)

    _run(lambda: run_export(model, output, adapters=adapters, branch=branch, task=task, opset=opset, dtype=dtype,
                            genai=genai, engine=engine, force=force, dry_run=dry_run, progress=_progress(progress),
                            **_load_options(format_, adapter_name, missing_coefficients, config)),
         _render_with("export-onnx --engine genai" if engine == "genai" else "export-onnx"))


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="The adapter folder to write.")
@adapter_options
@click.option("--base", type=click.Path(path_type=Path), default=None,
              help="Name modules as this base model's transformers class does (what PEFT matches), and check shapes.")
@force_option
@writer_options
@json_option
@debug_option
def extract(checkpoint: Path, output: Path, format_: str | None, adapter_name: str | None,
            missing_coefficients: str | None, config: Path | None, base: Path | None, force: bool, dry_run: bool,
            progress: bool | None) -> None:
    """Write the PERA adapter found in a training checkpoint as a canonical PEFT-style PERA folder.

    \b
    CHECKPOINT is anything pera-deploy reads (see `pera-deploy formats`): a DeepSpeed folder
    (ZeRO 0-3, the root with `latest` or one global_stepN), a Lightning .ckpt, a
    torch.distributed.checkpoint folder, an HF Trainer checkpoint-N, a state dict file, or an
    adapter folder. OUTPUT gets adapter_model.safetensors and adapter_config.json (peft_type
    PERA), the tensors bit for bit as taken, the scaling of every module kept, and where they
    came from (container, step, tensor count, sha256 of the source files) in the config and the
    manifest. It is read back and compared before it is published.

    \b
    Examples:
      pera-deploy extract checkpoints/ -o adapter            (DeepSpeed: the folder with 'latest')
      pera-deploy extract lightning_logs/step1.ckpt -o adapter --config adapter_config.json
    """
    from .api import extract as run_extract

    _run(lambda: run_extract(checkpoint, output, base=base, force=force, dry_run=dry_run, progress=_progress(progress),
                             **_load_options(format_, adapter_name, missing_coefficients, config)),
         _render_with("extract"))


@main.command()
@click.argument("base", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="The bundle folder to write.")
@click.option("--adapter", "adapter_specs", multiple=True, required=True, metavar="NAME=PATH",
              help="An adapter and the name it is served under (repeat for each).")
@click.option("--base-files", type=click.Choice(["copy", "hardlink", "symlink"]), default="copy", show_default=True,
              help="How BUNDLE/base holds the base's files.")
@click.option("--onnx", is_flag=True, help="Also BUNDLE/onnx: one branch graph and NAME.onnx_adapter per adapter.")
@click.option("--task", default=None, help="With --onnx: the Optimum task (default: from the architecture).")
@click.option("--genai/--no-genai", default=None,
              help="With --onnx: genai_config.json for ONNX Runtime GenAI, as export-onnx: by default where GenAI "
                   "can run the graph (else the report says why not); --genai: elsewhere is an error.")
@adapter_options
@writer_options
@force_option
@json_option
@debug_option
def bundle(base: Path, output: Path, adapter_specs: tuple[str, ...], base_files: str, onnx: bool, task: str | None,
           genai: bool | None, format_: str | None, adapter_name: str | None, missing_coefficients: str | None,
           config: Path | None, force: bool, dry_run: bool, progress: bool | None) -> None:
    """Package one base and several PERA (or LoRA) adapters for PEFT, vLLM and ONNX Runtime.

    \b
    BUNDLE/base/            the base (--base-files copy, hardlink or symlink)
    BUNDLE/adapters/NAME/   each adapter as an exact plain PEFT LoRA named for the base
    BUNDLE/onnx/            with --onnx: one branch graph, NAME.onnx_adapter each
                            (and genai_config.json for decoders: ONNX Runtime GenAI)
    BUNDLE/bundle.json      sources, sha256, ranks, modules, ‖ΔW‖, checks, vLLM's --max-lora-rank
    BUNDLE/README.md        how to serve it, with these names

    \b
    Example:
      pera-deploy bundle fixtures/examples/llama-base -o bundle \\
          --adapter pera=fixtures/examples/llama-pera --adapter second=fixtures/examples/llama-pera-2
    """
    from .api import bundle as run_bundle

    adapters: dict[str, Any] = {}
    for spec in adapter_specs:
        name, sep, path = spec.partition("=")
        if not sep:
            raise InputError(f"--adapter {spec!r}: expected NAME=PATH")
        if name in adapters:
            raise InputError(f"--adapter {name}: the name is given twice")
        adapters[name] = Path(path)
    _run(lambda: run_bundle(base, output, adapters, base_files=base_files, onnx=onnx, task=task, genai=genai,
                            force=force, dry_run=dry_run, progress=_progress(progress),
                            **_load_options(format_, adapter_name, missing_coefficients, config)),
         _render_with("bundle"))


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
