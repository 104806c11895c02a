"""Property-based fuzzing of the numerics (Hypothesis): extreme values, not broken files.

Each example takes the fixture PEFT-style PERA adapter, scales its factors and coefficients
(1e18, 1e38, subnormals, zero, mixed), stores them in another dtype, puts extreme values in
`lora_alpha`, `rank_pattern` and `alpha_pattern`, and runs merge, export-lora, combine (with
extreme --weights), export-gguf, unmerge, verify or inspect with extreme --rank / --tol /
--max-rank / --dtype values. The contract:

* the exit status is 0, 1 or 2: never 3 (a bug) nor 4 (the disk is fine);
* a failure prints one line on stderr, no traceback, and writes nothing;
* exit 1 (a check failed) only where a stored value can truly lose the update: factors in
  float16, or inputs in the subnormal range; and its line measures finite numbers (a check
  whose measure is NaN cannot fail, and is not one);
* merge and verify agree: the output of every merge that passed passes `verify` (and, in the
  merge's own dtype, `unmerge --check-against` the base).

A few dozen examples per run, derandomized so CI is repeatable; more, and random, with

    PERA_DEPLOY_FUZZ_EXAMPLES=2000 PERA_DEPLOY_FUZZ_RANDOM=1 python -m pytest tests/test_fuzz_numerics.py

Every crash it found is a named regression test in test_hardening_numerics.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("PERA_DEPLOY_FUZZ_EXAMPLES", "100"))
RANDOM = os.environ.get("PERA_DEPLOY_FUZZ_RANDOM") == "1"

FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])

# Each list leads with ordinary values, repeated so that about half of the examples get
# through to the arithmetic; the extreme ones follow.
SCALES = [1.0] * 8 + [0.0, 1e-3, 1e3, 1e9, 1e18, 1e19, 1e30, 1e38, -1e18, 1e-20, 1e-38, 1e-40, 1e-45]
DTYPES = ["float32"] * 4 + ["float16", "bfloat16", "float64"]
ALPHAS = [8] * 8 + [1e39, 1e300, 1e-300, 5e-324, 3.4e38, 1e38, 1e6, 0.5, -8, 0, 1e19]
RANK_PATTERNS = [4] * 4 + [2, 1e9, 0, -1, 4.0]
ALPHA_PATTERNS = [16] * 2 + [1e39, 1e300, 1e-300, 1e6, 1e19, 0.5, 0, -1]
WEIGHTS = ["1", "0.5", "-1", "2"] * 2 + ["0", "1e308", "-1e308", "1e-320", "inf", "nan", "-0", "1e39", "3.4e38",
                                         "1e18", "1e-40"]
RANKS = ["1", "2", "3", "14"] * 2 + ["0", "-1", "1000000000000"]
TOLS = ["0.01", "0.1", "0.5"] * 2 + ["0", "0.999999", "1", "nan", "inf", "-0.0", "1e-300", "-1e-300"]


@st.composite
def adapter_mutation(draw: Any) -> dict[str, Any]:
    def sometimes(strategy: Any, default: Any) -> Any:
        return draw(st.one_of(st.just(default), st.just(default), strategy))

    return {
        "scale_A": draw(st.sampled_from(SCALES)),
        "scale_B": draw(st.sampled_from(SCALES)),
        "scale_h": draw(st.sampled_from([1.0] * 4 + [0.0, 1e18, 1e38, 1e-40, -1.0])),
        "dtype": draw(st.sampled_from(DTYPES)),
        "element": sometimes(st.tuples(st.sampled_from(["lora_A", "lora_B", "pera_h_A"]),
                                       st.sampled_from([3e38, -3e38, 1e-45, 6e4, 7e4, 1e19, 0.0])), None),
        "alpha": draw(st.sampled_from(ALPHAS)),
        "rslora": draw(st.booleans()),
        "rank_pattern": sometimes(st.fixed_dictionaries({"q_proj": st.sampled_from(RANK_PATTERNS)}), {}),
        "alpha_pattern": sometimes(st.fixed_dictionaries({"v_proj": st.sampled_from(ALPHA_PATTERNS)}), {}),
    }


def make_adapter(source: Path, folder: Path, m: dict[str, Any]) -> Path:
    import numpy as np

    from pera_deploy.core.dtypes import NUMPY, OUTPUT_CODES
    from pera_deploy.io.safetensors_stream import save_tensors
    from tests.helpers import stored_tensors

    shutil.copytree(source, folder)
    path = folder / "adapter_model.safetensors"
    scale = {"lora_A": m["scale_A"], "lora_B": m["scale_B"], "pera_h_A": m["scale_h"]}
    dtype = NUMPY[{**OUTPUT_CODES, "float64": "F64"}[m["dtype"]]]
    tensors = {}
    for key, t in stored_tensors(path).items():
        role = next((r for r in scale if f".{r}" in key), None)
        value = t.astype(np.float64) * scale[role] if role else t.astype(np.float64)
        if role and m["element"] and m["element"][0] == role:
            value.reshape(-1)[0] = m["element"][1]
        with np.errstate(over="ignore"):
            tensors[key] = np.ascontiguousarray(value.astype(dtype))
    save_tensors(path, tensors)
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(lora_alpha=m["alpha"], use_rslora=m["rslora"], rank_pattern=m["rank_pattern"],
                  alpha_pattern=m["alpha_pattern"])
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def rank_options() -> Any:
    return st.one_of(st.just([]), st.just([]), st.tuples(st.just("--rank"), st.sampled_from(RANKS)).map(list),
                     st.tuples(st.just("--tol"), st.sampled_from(TOLS)).map(list),
                     st.tuples(st.just("--max-rank"), st.sampled_from(RANKS)).map(list))


@st.composite
def command(draw: Any) -> tuple[str, list[str]]:
    which = draw(st.sampled_from(["merge", "merge", "export-lora", "combine", "combine", "export-gguf", "unmerge",
                                  "verify", "inspect"]))
    options: list[str] = []
    if which == "merge":  # (--precision is gone: a no-op that warns, issue 20)
        options += ["--dtype", draw(st.sampled_from(["auto", "auto", "float16", "bfloat16", "float32"]))]
    elif which in ("unmerge", "verify"):
        pass
    elif which == "inspect":
        options += draw(st.sampled_from([[], ["--json"]]))
    else:
        options += draw(rank_options())
        dtypes = ["float32", "float16"] if which == "export-gguf" else ["float32", "float32", "float16", "bfloat16"]
        options += ["--dtype", draw(st.sampled_from(dtypes))]
    if which in ("combine", "merge") and draw(st.booleans()):
        first = draw(st.sampled_from(WEIGHTS))
        second = draw(st.sampled_from(WEIGHTS + [f"-{first}".replace("--", "")]))  # x, -x: a zero update
        options += ["--weights", f"{first},{second}", "--second", draw(st.sampled_from(["same", "other"]))]
    return which, options


def tiny(m: dict[str, Any], options: list[str]) -> bool:
    """Inputs in the subnormal range, where storing a value can truly lose it."""
    values = [m["scale_A"], m["scale_B"], m["scale_h"], m["alpha"]]
    values += [float(v) for v in re.findall(r"[-+]?[0-9.]+e-[0-9]+", " ".join(options))]
    values += [v for p in (m["rank_pattern"], m["alpha_pattern"]) for v in p.values()]
    if m["element"]:
        values.append(m["element"][1])
    return any(v != 0 and abs(v) < 1e-15 for v in values) or m["dtype"] == "float16"


def check_contract(result: Any, out: Path, root: Path, what: Any) -> None:
    assert result.exit_code in (0, 1, 2), (result.exit_code, result.stderr[-2000:], what)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, what
    if result.exit_code != 0:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, (result.stderr[-2000:], what)
        assert not out.exists(), what
        assert [p.name for p in root.iterdir() if p.name.startswith(".")] == [], what


def api_options(options: list[str]) -> dict[str, Any]:
    """--rank 2 --dtype float16 → rank=2, dtype="float16" (the options an export was given)."""
    kinds = {"--rank": int, "--max-rank": int, "--tol": float, "--dtype": str}
    return {flag[2:].replace("-", "_"): kinds[flag](options[i + 1]) for i, flag in enumerate(options) if flag in kinds}


def lora_errors(layer: Any, lora_b: Any, lora_a: Any, scale: float) -> tuple[float, float, float]:
    """‖ΔW − scale·B·A‖ of a stored LoRA module, densely in float64 (independently of the
    factored measures the checks use), the noise scale Σ_k ‖column_k‖·‖row_k‖ of ΔW's own
    factors, and ‖ΔW‖."""
    import numpy as np

    left, right = layer.expanded_factors()
    delta = left @ right
    error = float(np.linalg.norm(delta - scale * (lora_b.astype(np.float64) @ lora_a.astype(np.float64))))
    noise = float((np.linalg.norm(left, axis=0) * np.linalg.norm(right, axis=1)).sum())
    return error, noise, float(np.linalg.norm(delta))


def check_export(adapter: Any, out: Path, code: int, options: list[str], retry: Any) -> None:
    """The LoRA an export wrote reproduces ΔW as its manifest says (each module within its
    reported truncation error, plus what rounding its factors to their dtype may cost), and
    one that failed its check truly could not: its float64 factors meet the prediction, the
    stored ones do not. Measured densely, apart from the exporter's own check."""
    import numpy as np

    from pera_deploy.checks.numerics import UNIT_ROUNDOFF, unit_roundoff
    from pera_deploy.core.dtypes import OUTPUT_CODES
    from pera_deploy.core.rounding import FORMATS, round_to
    from pera_deploy.errors import CheckFailed
    from tests.helpers import stored_tensors

    slack = 1e-12  # of the noise scale: far above float64's evaluation noise, far below any real error
    if code == 0:
        state = stored_tensors(out / "adapter_model.safetensors")
        config = json.loads((out / "adapter_config.json").read_text())
        manifest = json.loads((out / "pera_deploy_manifest.json").read_text())
        reported = {row["module"]: row["rel_error"] for row in manifest["lora"]["modules"]}
        for module, layer in adapter.layers.items():
            b, a = (state[f"base_model.model.{module}.{f}.weight"] for f in ("lora_B", "lora_A"))
            rank = config["rank_pattern"].get(module, config["r"])
            scale = config["alpha_pattern"].get(module, config["lora_alpha"]) / rank
            error, noise, norm = lora_errors(layer, b, a, scale)
            storage = 2.01 * unit_roundoff(b) * float(np.linalg.norm(b.astype(np.float64))) * \
                float(np.linalg.norm(a.astype(np.float64))) * scale
            assert error <= reported[module] * norm * (1 + 1e-6) + storage + slack * noise, (module, error, norm)
        return
    try:
        retry()
    except CheckFailed as failed:
        plan = failed.report.plan
    else:
        raise AssertionError("the API passed what the command line failed")
    code_ = OUTPUT_CODES[options[options.index("--dtype") + 1]]
    truly = False
    for m in plan.modules:
        layer = adapter.layers[m.source]
        exact, noise, norm = lora_errors(layer, m.lora_B, m.lora_A, 1.0)
        assert exact <= m.rel_error * norm * (1 + 1e-6) + slack * noise, (m.module, "prediction", exact, norm)
        b, a = round_to(m.lora_B, FORMATS[code_]), round_to(m.lora_A, FORMATS[code_])
        stored = lora_errors(layer, b, a, 1.0)[0]
        storage = 2.01 * UNIT_ROUNDOFF[code_] * float(np.linalg.norm(b.astype(np.float64))) * \
            float(np.linalg.norm(a.astype(np.float64)))
        truly |= stored > m.rel_error * norm + storage + slack * noise
    assert truly, "the check failed, yet every stored module reproduces ΔW"


def run_example(fx: dict[str, Path], cli: Any, m: dict[str, Any], which: str, options: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        adapter = make_adapter(fx["llama-peft"], root / "adapter", m)
        base = fx["llama-base"]
        out = root / ("out.gguf" if which == "export-gguf" else "out")
        options = list(options)
        adapters = [adapter]
        if "--second" in options:
            i = options.index("--second")
            adapters.append(adapter if options[i + 1] == "same" else fx["llama-pera-2"])
            del options[i:i + 2]
        if which == "combine" and len(adapters) == 1:
            adapters.append(fx["llama-pera-2"])
        args = {
            "merge": ["merge", *adapters, "--base", base, "-o", out],
            "export-lora": ["export-lora", adapter, "-o", out],
            "combine": ["combine", *adapters, "-o", out],
            "export-gguf": ["export-gguf", adapter, "--base", base, "-o", out],
            "unmerge": ["unmerge", base, "--adapter", adapter, "-o", out],
            "verify": ["verify", base, "--adapter", adapter, "--base", base, "--no-forward"],  # the base as merged
            "inspect": ["inspect", adapter],
        }[which] + options
        what = (m, which, options)
        result = cli(*args)
        check_contract(result, out, root, what)
        if result.exit_code == 1 and which == "verify":  # the base is no merge: unless ΔW rounds away, a true failure
            assert "merged weight" in result.stderr and not re.search(r"\bnan\b|\binf\b", result.stderr), what
            return
        if result.exit_code == 1:
            assert which != "merge" and which != "unmerge", (result.stderr, what)  # their checks recompute their own work
            assert tiny(m, options) or "float16" in options, (result.stderr, what)
            numbers = re.findall(r"only to (\S+) \(allowed (\S+)\)", result.stderr)
            assert numbers and all(math.isfinite(float(x)) for pair in numbers for x in pair), (result.stderr, what)
        if which == "inspect" and "--json" in options:
            assert result.exit_code != 0 or isinstance(json.loads(result.stdout), dict), what
        if result.exit_code == 2 or which in ("export-gguf", "unmerge", "verify", "inspect"):
            return
        import pera_deploy
        from pera_deploy.export.contract import load_weighted

        weights = [float(w) for w in options[options.index("--weights") + 1].split(",")] if "--weights" in options \
            else None
        update = load_weighted(adapters, weights if which == "merge" else weights or [1.0] * len(adapters), {})
        if which in ("export-lora", "combine"):
            def again() -> Any:
                return pera_deploy.combine(adapters, root / "again", weights=weights, **api_options(options)) \
                    if which == "combine" else pera_deploy.export_lora(adapter, root / "again", **api_options(options))

            check_export(update, out, result.exit_code, options, again)
            return
        # merge and verify decide alike: what the merge wrote, verify passes (through the API,
        # which takes a weighted sum as the merge built it)
        report = pera_deploy.verify(out, update, base, forward=False, progress=False)
        assert report.passed, (report.failure(), what)
        if "auto" in options and len(adapters) == 1:
            back = root / "back"
            unmerged = cli("unmerge", out, "--adapter", adapter, "-o", back, "--check-against", base)
            assert unmerged.exit_code == 0, (unmerged.stderr[-2000:], what)


@FUZZ
@given(m=adapter_mutation(), cmd=command())
def test_extreme_values_keep_the_contract(fx, cli, m, cmd):
    which, options = cmd
    run_example(fx, cli, m, which, options)
