"""export-onnx for ONNX Runtime GenAI: `onnxruntime_genai.Model(folder)` runs the folder as
written, merged and with swappable adapters, and generates what PyTorch generates.

The reference is the unmerged PyTorch model (the base with each PERA branch live); greedy
tokens must be identical and the first step's logits within 1e-4 relative (the float32
graph is one float32 evaluation order away from PyTorch: a few 1e-7 measured).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # these tests run models: the check extra
pytest.importorskip("onnx")  # the `onnx` extra: these tests skip cleanly without it
pytest.importorskip("optimum.exporters.onnx")
og = pytest.importorskip("onnxruntime_genai")
sentencepiece = pytest.importorskip("sentencepiece")
pytestmark = pytest.mark.slow

from pera_deploy.checks.reference_model import PeraBranch, load_unmerged_model  # noqa: E402
from pera_deploy.formats import load_adapter  # noqa: E402
from pera_deploy.io.hf_model import load_model  # noqa: E402
from tests.helpers import docs_example, refused  # noqa: E402

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


def test_a_decoder_without_its_tokenizer_is_exported_for_onnx_runtime_alone(cli, fx, tmp_path):
    """A base with no tokenizer exported for plain ONNX Runtime before genai_config.json existed:
    by default it still does, and the report and the manifest say why GenAI is left out;
    --genai makes that bad input, with nothing written."""
    base = shutil.copytree(fx["llama-base"], tmp_path / "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (base / name).unlink()
    why = (f"{base}: no tokenizer.json (nor a tokenizer.model to make it from) and no tokenizer_config.json: "
           "ONNX Runtime GenAI reads the model's tokenizer")
    out = tmp_path / "out"
    result = cli("export-onnx", base, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert f"no genai_config.json for ONNX Runtime GenAI: {why}" in result.stdout
    manifest = json.loads((out / "pera_deploy_manifest.json").read_text())
    assert manifest["genai_config"] is None and manifest["genai_skipped"].startswith(why)
    assert (out / "model.onnx").is_file() and not (out / "genai_config.json").exists()

    refused(cli("export-onnx", base, "-o", tmp_path / "asked", "--genai"), f"--genai: {why}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-tokenizer", "out"]  # no folder, no temporary box
    plain = cli("export-onnx", base, "-o", tmp_path / "plain", "--no-genai", "--json")
    assert plain.exit_code == 0, plain.stderr
    report = json.loads(plain.stdout)
    assert report["genai_config"] is None and report["genai_skipped"] == "--no-genai"
    assert not (tmp_path / "plain" / "genai_config.json").exists()


def sentencepiece_only(tmp_path: Path) -> Path:
    """The small Llama with its SentencePiece tokenizer.model and tokenizer_config.json but no
    tokenizer.json, as many Llama-family checkpoints are published."""
    base = shutil.copytree(BASE, tmp_path / "spm-only")
    (base / "tokenizer.json").unlink()
    return base


TEXTS = [PROMPT, "Rain 1987 and snow, then: the river? ünïcode ✓ falls back to bytes", "a\ttab and\nnew line"]
# Runs of spaces: transformers reads them as its converter wrote them, but og 0.18 adds a second "▁"
# before a leading space and SentencePiece splits double spaces its own way, with the fixture's own
# tokenizer.json as with the converted one: so only the written file is compared with transformers here
SPACES = "  two  spaces and  more"


def test_a_sentencepiece_base_gets_tokenizer_json_and_genai_config(cli, tmp_path):
    """tokenizer.json is made from tokenizer.model by transformers' converter, so og.Model runs
    the folder: og's tokenizer gives the ids transformers and SentencePiece give (without the
    BOS og's encode does not add), those of the fixture's own tokenizer.json, and decodes
    them back."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    base = sentencepiece_only(tmp_path)
    out = tmp_path / "out"
    result = cli("export-onnx", base, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "with genai_config.json for ONNX Runtime GenAI; tokenizer.json made from tokenizer.model" in result.stdout
    manifest = json.loads((out / "pera_deploy_manifest.json").read_text())
    assert manifest["genai_config"] == "genai_config.json" and manifest["genai_skipped"] is None
    assert manifest["tokenizer_made_from"] == "tokenizer.model"
    assert not (base / "tokenizer.json").exists()  # written into the output only

    tokenizer = og.Tokenizer(og.Model(str(out)))
    reference = AutoTokenizer.from_pretrained(base)
    written, fixture = Tokenizer.from_file(str(out / "tokenizer.json")), Tokenizer.from_file(str(BASE / "tokenizer.json"))
    spm = sentencepiece.SentencePieceProcessor(model_file=str(base / "tokenizer.model"))
    bos = json.loads((base / "config.json").read_text())["bos_token_id"]
    for text in TEXTS:
        ids = [int(i) for i in tokenizer.encode(text)]
        with_bos = reference(text)["input_ids"]
        assert with_bos == [bos, *ids], text
        assert ids == spm.encode(text) == written.encode(text, add_special_tokens=False).ids, text
        assert written.encode(text).ids == fixture.encode(text).ids == with_bos, text
        assert tokenizer.decode([bos, *ids]) == spm.decode(ids), text  # og strips the first space after BOS only
    assert written.encode(SPACES).ids == fixture.encode(SPACES).ids == reference(SPACES)["input_ids"]


def test_genai_refuses_a_tokenizer_model_transformers_cannot_convert(cli, tmp_path):
    base = sentencepiece_only(tmp_path)
    (base / "tokenizer.model").write_bytes(b"not a SentencePiece model")
    refused(cli("export-onnx", base, "-o", tmp_path / "out", "--genai"),
            f"--genai: {base / 'tokenizer.model'}: transformers cannot make tokenizer.json from it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spm-only"]


def test_readme_genai_example_runs_as_written(cli, tmp_path, monkeypatch):
    """docs/runtimes/onnx.md's ORT GenAI example: the export-onnx line, then its Python, as written."""
    namespace = docs_example(cli, tmp_path, monkeypatch, "docs/runtimes/onnx.md", "## ONNX Runtime GenAI",
                             "pera-deploy export-onnx")
    assert len(namespace["tokens"]) == 24  # the example generated up to max_length
