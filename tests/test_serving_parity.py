"""What a merged folder serves, next to base + LoRA serving (PEFT with the exact LoRA export).

A bf16 merge stores W0 + ΔW rounded once to bfloat16 (2⁻⁹ relative per element); serving
base + LoRA keeps ΔW apart, in the factors. So their logits differ by that one rounding,
carried through the model: a few units of 2⁻⁹ relative (4.9e-3 measured on the example,
whose logits are at most 1.66). `--dtype float32` keeps the merged weights in float32 and
removes it: what is left is float32 evaluation order (8.5e-7 measured). Both computed in
float32, so the comparison sees the stored weights and not bf16 arithmetic.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures.build_fixtures import corpus

torch = pytest.importorskip("torch")  # these tests run models: the check extra
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parent.parent / "fixtures" / "examples"
BF16_U = 2.0 ** -9


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from click.testing import CliRunner
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pera_deploy.cli import main

    out = tmp_path_factory.mktemp("parity")
    adapter, base = EXAMPLES / "small-llama-pera", EXAMPLES / "small-llama-base"
    run = CliRunner()
    for args in (["merge", adapter, base, "-o", out / "bf16"],
                 ["merge", adapter, base, "-o", out / "f32", "--dtype", "float32"],
                 ["export-lora", adapter, "--base", base, "-o", out / "lora"]):
        result = run.invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.stderr
    tok = AutoTokenizer.from_pretrained(base)
    batch = [torch.tensor([tok(t)["input_ids"]]) for t in corpus()[:16]]

    def logits(model):
        with torch.no_grad():
            return torch.cat([model(ids).logits[0].float() for ids in batch])

    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)  # noqa: E731
    reference = logits(peft.PeftModel.from_pretrained(load(base), out / "lora"))
    return reference, {name: logits(load(out / name)) for name in ("bf16", "f32")}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_float32_merge_serves_what_base_plus_lora_serves(served):
    reference, merged = served
    assert rel(merged["f32"], reference) <= 1e-5  # float32 evaluation order only
    assert torch.equal(merged["f32"].argmax(-1), reference.argmax(-1))


def test_bf16_merge_is_one_bf16_rounding_of_the_weights_away(served):
    reference, merged = served
    error = rel(merged["bf16"], reference)
    assert BF16_U / 8 < error <= 5 * BF16_U, error  # a real rounding, and no more than a few units of it
    top = merged["bf16"].topk(2, -1).values
    ties = (top[:, 0] - top[:, 1]) < 5 * BF16_U * reference.abs().max()
    agree = merged["bf16"].argmax(-1) == reference.argmax(-1)
    assert bool((agree | ties).all())  # top tokens differ only where the two best are within the rounding
