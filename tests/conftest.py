import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_models_dir() -> Path:
    return Path(os.environ.get("PYGGML_TEST_MODELS", REPO_ROOT.parent / "shared" / "models"))


@pytest.fixture(scope="session")
def models_dir() -> Path:
    d = test_models_dir()
    if not d.is_dir():
        pytest.skip(f"test models not found at {d} (set PYGGML_TEST_MODELS)")
    return d


@pytest.fixture(scope="session")
def stories_dir(models_dir) -> Path:
    d = models_dir / "stories260K-hf"
    if not (d / "model.safetensors").is_file():
        pytest.skip(f"{d} has no model.safetensors")
    return d
