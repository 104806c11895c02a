"""Shared fixtures: every model and adapter is built once per session from fixtures/build_fixtures.py."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from fixtures.build_fixtures import PEFT_LORAS, build_all
from pera_deploy.cli import main

VECTORS = Path(__file__).parent / "vectors"


@pytest.fixture(scope="session", autouse=True)
def digest_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep the tests' sha256 cache out of the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("digest-cache")
    os.environ["PERA_DEPLOY_CACHE_DIR"] = str(folder)
    return folder


class Fixtures(dict):
    """name → folder; a fixture only PEFT writes (and so torch) skips the test that asks for
    it where PEFT is not installed (the torch-free install)."""

    def __missing__(self, name: str) -> Path:
        if name in PEFT_LORAS:
            pytest.skip(f"fixture {name} is written by PEFT, which needs torch (pip install -e '.[test]')")
        raise KeyError(name)


@pytest.fixture(scope="session")
def fx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name → folder of every fixture model and adapter."""
    return Fixtures(build_all(tmp_path_factory.mktemp("fixtures")))


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, fx: dict[str, Path]) -> dict[str, Path]:
    """Every training container, trained once per session by its framework (about a minute):
    name -> the path a user would give pera-deploy (test_training_checkpoints.py,
    test_hardening_deepspeed.py)."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("lightning")
    from fixtures.training_checkpoints import build_training_checkpoints

    return build_training_checkpoints(tmp_path_factory.mktemp("trained"), fx["llama-base"])


class Cli:
    """Runs `pera-deploy` in-process; stdout and stderr are kept apart as a pipeline sees them."""

    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: object):
        return self.runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    def json(self, *args: object) -> dict:
        result = self(*args, "--json")
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)


@pytest.fixture
def cli() -> Cli:
    return Cli()


@pytest.fixture
def corrupt_lora_factors(monkeypatch):
    """Make every LoRA export store lora_B 1% off in one module: its factor check must catch it."""
    import pera_deploy.export.lora as lora

    real = lora.lora_state_dict

    def off_by_a_percent(export, dtype):
        state = real(export, dtype)
        key = next(k for k in state if k.endswith("lora_B.weight"))
        state[key] = state[key] * 1.01
        return state

    monkeypatch.setattr(lora, "lora_state_dict", off_by_a_percent)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 40 KB tmpfs: too small for any fixture output. Needs root (CI runs as root here)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)
