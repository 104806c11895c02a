"""sentence-transformers folders: a merged folder, a kept branch and an ONNX export each load
with `SentenceTransformer(path)` and give the unmerged model's embeddings.

The reference is the base SentenceTransformer with each PERA branch live on its transformer
(the ΔW of the contract, computed from the factors in float32). The models compute in float32
and their embeddings are normalised, so the merged model's one rounding of W0 + ΔW (2⁻²⁴
relative) and another float32 evaluation order leave a few 1e-8 (9e-8 measured); 1e-6 bounds
that with room and is 1e-3 below what the adapter itself changes (at least 1e-3, asserted).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")  # these tests run models: the check extra
st = pytest.importorskip("sentence_transformers")

from pera_deploy.checks.reference_model import PeraBranch  # noqa: E402
from pera_deploy.formats import load_adapter  # noqa: E402
from tests.helpers import docs_example, refused  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SENTENCES = ["the quick model reads the river", "hello world", "an unseen zzz token, twice: zzz"]
TOL = 1e-6


def embed(model: object, sentences: list[str] = SENTENCES) -> torch.Tensor:
    return model.encode(sentences, convert_to_tensor=True)  # type: ignore[attr-defined]


def load(path: Path, **kwargs: object) -> object:
    return st.SentenceTransformer(str(path), device="cpu", **kwargs)


def unmerged(base: Path, adapter: Path, sentences: list[str] = SENTENCES) -> tuple[torch.Tensor, torch.Tensor]:
    """(base embeddings, base + live PERA branch embeddings)."""
    model = load(base)
    plain = embed(model, sentences)
    with PeraBranch(model[0].auto_model, load_adapter(adapter)):  # type: ignore[index]
        return plain, embed(model, sentences)


def assert_same_embeddings(got: torch.Tensor, plain: torch.Tensor, reference: torch.Tensor) -> None:
    assert (reference - plain).abs().max() > 1e-3  # the adapter matters, so a dropped ΔW fails
    assert (got - reference).abs().max() <= TOL, (got - reference).abs().max()


def module_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.parent != folder}


@pytest.mark.parametrize("base", ["st-base", "st-dense-base"])
def test_merged_folder_is_the_same_sentence_transformer(fx, cli, tmp_path, base):
    out = tmp_path / "merged"
    result = cli("merge", fx["st-pera"], fx[base], "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert module_files(out) == module_files(fx[base])  # 1_Pooling/, 2_Dense/ byte for byte
    assert "1_Pooling/config.json" in json.loads(result.stdout)["side_files"]
    plain, reference = unmerged(fx[base], fx["st-pera"])
    assert_same_embeddings(embed(load(out)), plain, reference)


def test_kept_branch_loads_its_adapter_in_sentence_transformers(fx, cli, tmp_path):
    out = tmp_path / "served"
    result = cli("merge", fx["st-pera"], fx["st-dense-base"], "-o", out, "--keep-branch", "--base-files", "hardlink")
    assert result.exit_code == 0, result.stderr
    assert module_files(out / "base") == module_files(fx["st-dense-base"])
    model = load(out / "base")
    model.load_adapter(str(out / "adapter"))  # type: ignore[attr-defined]
    plain, reference = unmerged(fx["st-dense-base"], fx["st-pera"])
    assert_same_embeddings(embed(model), plain, reference)


@pytest.mark.slow
def test_onnx_folder_runs_in_sentence_transformers_onnx_backend(fx, cli, tmp_path):
    pytest.importorskip("optimum.onnxruntime")
    merged, onnx = tmp_path / "merged", tmp_path / "onnx"
    assert cli("merge", fx["st-pera"], fx["st-dense-base"], "-o", merged).exit_code == 0
    result = cli("export-onnx", merged, "-o", onnx, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["task"] == "feature-extraction"
    assert {c["output"] for c in report["checks"]["onnx_outputs"]["outputs"]} >= {"last_hidden_state"}
    assert module_files(onnx) == module_files(fx["st-dense-base"])
    plain, reference = unmerged(fx["st-dense-base"], fx["st-pera"])
    got = embed(load(onnx, backend="onnx", model_kwargs={"file_name": "model.onnx"}))
    assert_same_embeddings(got, plain, reference)


def test_readme_sentence_transformers_example_runs_as_written(cli, tmp_path, monkeypatch):
    """docs/runtimes/sentence-transformers.md: the merge line, then its Python, as written."""
    namespace = docs_example(cli, tmp_path, monkeypatch, "docs/runtimes/sentence-transformers.md", "# sentence-transformers",
                             "pera-deploy merge")
    examples = ROOT / "fixtures" / "examples"
    plain, reference = unmerged(examples / "st-base", examples / "st-pera", namespace["sentences"])
    assert_same_embeddings(torch.as_tensor(namespace["embeddings"]), plain, reference)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("case", ["escaping path", "absolute path", "link out", "not a folder", "not a list"])
def test_bad_module_folders_are_refused(fx, cli, tmp_path, case):
    base = _copy(fx["st-base"], tmp_path / "base")
    modules = json.loads((base / "modules.json").read_text())
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    needle = "modules.json"
    if case == "escaping path":
        modules[1]["path"] = "../elsewhere"
    elif case == "absolute path":
        modules[1]["path"] = str(tmp_path)
    elif case == "link out":
        (base / "1_Pooling" / "notes.txt").symlink_to(secret)
        needle = "notes.txt"
    elif case == "not a folder":
        (base / "1_Pooling" / "config.json").rename(base / "pooling.json")
        (base / "1_Pooling").rmdir()
        (base / "1_Pooling").write_text("{}")
        needle = "1_Pooling"
    else:
        modules = {"0": modules[0]}
    (base / "modules.json").write_text(json.dumps(modules))
    out = tmp_path / "merged"
    refused(cli("merge", fx["st-pera"], base, "-o", out), needle)
    assert not out.exists()
