"""export-onnx for ONNX Runtime GenAI: `onnxruntime_genai.Model(folder)` runs the folder as
written, merged and with swappable adapters, and generates what PyTorch generates.

The reference is the unmerged PyTorch model (the base with each PERA branch live); greedy
tokens must be identical and the first step's logits within 1e-4 relative (the float32
graph is one float32 evaluation order away from PyTorch: a few 1e-7 measured).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # these tests run models: the check extra
pytest.importorskip("onnx")  # the `onnx` extra: these tests skip cleanly without it
pytest.importorskip("optimum.exporters.onnx")
og = pytest.importorskip("onnxruntime_genai")
pytestmark = pytest.mark.slow

from pera_deploy.checks.reference_model import PeraBranch, load_unmerged_model  # noqa: E402
from pera_deploy.formats import load_adapter  # noqa: E402
from pera_deploy.io.hf_model import load_model  # noqa: E402
from tests.helpers import readme_example, refused  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "fixtures" / "examples"
BASE, PERA, PERA2 = EXAMPLES / "small-llama-base", EXAMPLES / "small-llama-pera", EXAMPLES / "small-llama-pera-2"
PROMPT = "The quick model reads the river"
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    from click.testing import CliRunner

    from pera_deploy.cli import main

    root = tmp_path_factory.mktemp("genai")
    runs = {
        "merged": ["export-onnx", BASE, "--adapter", PERA, "-o", root / "merged"],
        "branch": ["export-onnx", BASE, "--branch", "--adapter", f"pera={PERA}", "--adapter", f"second={PERA2}",
                   "-o", root / "branch"],
    }
    for args in runs.values():
        result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.stderr
    return {name: root / name for name in runs}


def torch_greedy(model: torch.nn.Module, ids: list[int]) -> tuple[list[int], np.ndarray]:
    """Greedy decoding by hand (no generate() defaults in the way): the new tokens, and the
    logits of the last prompt position."""
    tokens, first = list(ids), None
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = model(torch.tensor([tokens])).logits[0, -1]
            first = logits.numpy().copy() if first is None else first
            tokens.append(int(logits.argmax()))
    return tokens[len(ids):], first


def genai_greedy(model, ids: list[int], adapters=None, active: str | None = None) -> tuple[list[int], np.ndarray]:
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(ids) + NEW_TOKENS)
    generator = og.Generator(model, params)
    if active is not None:
        generator.set_active_adapter(adapters, active)
    generator.append_tokens(ids)
    first = np.array(generator.get_logits()).reshape(-1)
    while not generator.is_done():
        generator.generate_next_token()
    return list(generator.get_sequence(0))[len(ids):], first


def prompt_ids(folder: Path) -> list[int]:
    """The prompt's ids as GenAI's tokenizer reads the exported files (the same as transformers
    and SentencePiece), after BOS: og's encode adds no special tokens."""
    import sentencepiece
    from transformers import AutoTokenizer

    ids = [int(i) for i in og.Tokenizer(og.Model(str(folder))).encode(PROMPT)]
    assert ids == AutoTokenizer.from_pretrained(BASE)(PROMPT, add_special_tokens=False)["input_ids"]
    assert ids == sentencepiece.SentencePieceProcessor(model_file=str(BASE / "tokenizer.model")).encode(PROMPT)
    return [json.loads((BASE / "config.json").read_text())["bos_token_id"], *ids]


def assert_same(got: tuple[list[int], np.ndarray], want: tuple[list[int], np.ndarray], what: str) -> None:
    (tokens, logits), (ref_tokens, ref_logits) = got, want
    assert tokens == ref_tokens, what
    rel = float(np.abs(logits - ref_logits).max() / np.abs(ref_logits).max())
    print(f"{what}: {len(tokens)} tokens identical, first-step logits rel {rel:.2g}")
    assert rel <= 1e-4, (what, rel)


def test_genai_config_names_the_graphs_inputs_and_outputs(exported):
    import onnx

    for folder in exported.values():
        config = json.loads((folder / "genai_config.json").read_text())
        graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        inputs, outputs = {i.name for i in graph.graph.input}, {o.name for o in graph.graph.output}
        decoder = config["model"]["decoder"]
        layers = decoder["num_hidden_layers"]
        for key, name in decoder["inputs"].items():
            names = [name % i for i in range(layers)] if "%d" in name else [name]
            assert set(names) <= inputs, key
        for key, name in decoder["outputs"].items():
            names = [name % i for i in range(layers)] if "%d" in name else [name]
            assert set(names) <= outputs, key
        base = json.loads((BASE / "config.json").read_text())
        assert decoder["head_size"] == base["hidden_size"] // base["num_attention_heads"] == 64
        assert decoder["num_key_value_heads"] == base["num_key_value_heads"]
        assert config["model"]["vocab_size"] == base["vocab_size"]
        assert config["model"]["context_length"] == base["max_position_embeddings"]
        assert config["search"]["past_present_share_buffer"] is False
        assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()
        manifest = json.loads((folder / "pera_deploy_manifest.json").read_text())
        assert manifest["genai_config"] == "genai_config.json"


def test_merged_folder_generates_what_the_unmerged_model_does(exported):
    ids = prompt_ids(exported["merged"])
    model, branch = load_unmerged_model(BASE, load_adapter(PERA), torch.float32)
    with branch:
        want = torch_greedy(model, ids)
    assert_same(genai_greedy(og.Model(str(exported["merged"])), ids), want, "merged")


def test_branch_folder_generates_with_no_adapter_and_with_each(exported):
    folder = exported["branch"]
    ids = prompt_ids(folder)
    model = load_model(BASE, torch.float32)
    runtime = og.Model(str(folder))
    adapters = og.Adapters(runtime)
    for name in ("pera", "second"):
        adapters.load(str(folder / f"{name}.onnx_adapter"), name)
    assert_same(genai_greedy(runtime, ids), torch_greedy(model, ids), "no adapter")
    base_tokens = torch_greedy(model, ids)[0]
    for name, source in (("pera", PERA), ("second", PERA2)):
        with PeraBranch(model, load_adapter(source)):
            want = torch_greedy(model, ids)
        assert_same(genai_greedy(runtime, ids, adapters, name), want, f"adapter {name}")
        assert want[0] != base_tokens  # the adapter changes what is generated: the comparison has teeth


def test_no_genai_and_models_genai_cannot_run(cli, fx, tmp_path):
    out = tmp_path / "plain"
    result = cli("export-onnx", BASE, "--adapter", PERA, "-o", out, "--no-genai", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["genai_config"] is None and not (out / "genai_config.json").exists()
    # an encoder is no decoder: nothing to write by default, and asking for it is bad input
    refused(cli("export-onnx", fx["bert-base"], "-o", tmp_path / "bert", "--genai"), "ONNX Runtime GenAI runs decoders")
    assert not (tmp_path / "bert").exists()


def test_a_decoder_without_its_tokenizer_is_refused_before_writing(cli, tmp_path):
    import shutil

    base = tmp_path / "no-tokenizer"
    shutil.copytree(BASE, base)
    (base / "tokenizer.json").unlink()
    refused(cli("export-onnx", base, "-o", tmp_path / "out"), str(base), "no tokenizer.json", "--no-genai")
    assert not (tmp_path / "out").exists()
    result = cli("export-onnx", base, "-o", tmp_path / "out", "--no-genai")  # the way out the line offers
    assert result.exit_code == 0, result.stderr


def test_readme_genai_example_runs_as_written(cli, tmp_path, monkeypatch):
    """The README's ORT GenAI example: the export-onnx line, then its Python, as written."""
    namespace = readme_example(cli, tmp_path, monkeypatch, "### ONNX Runtime GenAI", "pera-deploy export-onnx")
    assert len(namespace["tokens"]) == 24  # the example generated up to max_length
