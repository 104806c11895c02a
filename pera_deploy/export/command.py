"""A writer's command line, declared as data beside its Exporter (export/contract.py).

`cli.py` turns a `Command` into the click command: its own parameters in the order given,
then what every writer takes (`--jobs` where the writer shares its arithmetic, `--force`,
`--dry-run`, `--progress/--no-progress`, `--json`, `--debug`), with the adapter options
(`--format`, `--config`, `--adapter-name`, `--missing-coefficients`) where `LOAD` stands. So
a new writer is its module and its line in export/registry.py: no click code of its own,
and no option that one writer spells differently from another.

The parsed parameters are handed to the writer's API function (`pera_deploy.api`) by their
names, each through its `parse` (a string "0.7,0.3" into weights), unless the `Command` has
its own `call`, which picks the API function and its arguments itself (merge's ADAPTER...
BASE and --keep-branch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError

# Markers in `Command.params`: where a shared group of parameters goes.
LOAD = "load"  # --format, --adapter-name, --missing-coefficients, --config (every command that reads adapters)
PRECISION = "precision"  # the hidden, deprecated --precision (merge, unmerge): a warning, nothing else

Kind = str | tuple[str, ...]  # "path", "text", "int", "float", "flag", "switch" (--x/--no-x), or its choices


@dataclass(frozen=True)
class Param:
    """One parameter of a writer's command line. `name` is the API function's argument it
    fills; `flags` empty makes it a positional argument (`multiple`: any number of them)."""

    name: str
    flags: tuple[str, ...] = ()
    help: str = ""
    kind: Kind = "text"
    default: Any = None
    required: bool = False
    multiple: bool = False
    metavar: str | None = None
    show_default: bool = False
    parse: Callable[[Any], Any] | None = None  # the parsed value as the API function takes it


@dataclass(frozen=True)
class Call:
    """What a command line asks for: the API function (by its name in pera_deploy.api), its
    arguments, and `prefetch`: the adapters and, last, the model folder, whose files' digests
    may be computed while the tool is still importing (merge's)."""

    function: str
    arguments: dict[str, Any]
    prefetch: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Command:
    """A writer's command line: its --help text, its parameters, and the API function it
    calls (`api`, with the parsed parameters by name; or `call`, which decides)."""

    help: str
    params: tuple[Param | str, ...]
    api: str
    call: Callable[[dict[str, Any]], Call] | None = None
    jobs: bool = False  # takes --jobs (threads sharing the arithmetic)
    warnings: Callable[[Any], list[str]] | None = None  # a plan's or report's warnings, printed on stderr
    timed: bool = False  # its text result ends with the time the command took

    def arguments(self, params: dict[str, Any]) -> Call:
        """The API call these parsed parameters ask for."""
        parsed = {p.name: p.parse(params[p.name]) if p.parse is not None and params[p.name] is not None
                  else params[p.name] for p in self.params if isinstance(p, Param)}
        if self.jobs:
            parsed["jobs"] = params["jobs"]
        return self.call(parsed) if self.call is not None else Call(self.api, parsed)


# -- parameters several writers share ----------------------------------------------------------------


def parse_weights(text: str | None) -> list[float] | None:
    """--weights 0.7,0.3 → [0.7, 0.3] (None: not given); anything else is an InputError naming it."""
    if text is None:
        return None
    values = []
    for part in text.split(","):
        try:
            values.append(float(part))
        except ValueError:
            raise InputError(f"--weights {text!r}: {part.strip()!r} is not a number") from None
    return values


def named_paths(specs: tuple[str, ...], *, names_required: bool = True) -> dict[str, Path]:
    """--adapter NAME=PATH (repeated) → {NAME: PATH}; without `names_required`, a bare PATH is
    named by its last component."""
    named: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            if names_required:
                raise InputError(f"--adapter {spec!r}: expected NAME=PATH")
            name, path = Path(spec).name, spec
        if name in named:
            raise InputError(f"--adapter {name}: the name is given twice")
        named[name] = Path(path)
    return named


def output(help: str) -> Param:
    """-o/--output, which every writer requires."""
    return Param("output", ("-o", "--output"), help, "path", required=True)


WEIGHTS = Param("weights", ("--weights",), "One weight per adapter (default all 1; negative subtracts an adapter).",
                metavar="W1,W2,...", parse=parse_weights)
RANK = (
    Param("rank", ("--rank",), "Keep the best rank-K approximation, per module.", "int"),
    Param("tol", ("--tol",), "Per module, the smallest rank whose relative Frobenius error is at most T.", "float"),
    Param("max_rank", ("--max-rank",), "Cap every module's rank at M.", "int"),
)
NAMED_BY_BASE = Param("base", ("--base",), "Name modules as this base model's transformers class does (what PEFT "
                      "matches), and check shapes.", "path")
LORA = (
    *RANK,
    Param("pad", ("--pad/--no-pad",), "Pad all modules to one rank (scaling exactly 1 in PEFT, vLLM and llama.cpp); "
          "--no-pad writes each at its own rank with rank_pattern / alpha_pattern.", "switch", True, show_default=True),
    Param("dtype", ("--dtype",), "Storage dtype of the LoRA factors.", ("float32", "float16", "bfloat16"), "float32",
          show_default=True),
    NAMED_BY_BASE,
)
