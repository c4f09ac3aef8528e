import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest

import pyggml

REPO_ROOT = Path(__file__).resolve().parent.parent

try:
    import pyggml.convert  # noqa: F401 - installed: pyproject maps convert/ to pyggml.convert
except ModuleNotFoundError:  # a bare source checkout: make the same mapping by hand, for every test module
    _spec = importlib.util.spec_from_file_location(
        "pyggml.convert", REPO_ROOT / "convert" / "__init__.py", submodule_search_locations=[str(REPO_ROOT / "convert")]
    )
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["pyggml.convert"] = _module
    _spec.loader.exec_module(_module)
    pyggml.convert = _module


def random_q6_k(rng: np.random.Generator, rows: int, cols: int, d_low: float, d_high: float) -> np.ndarray:
    """Random Q6_K rows (pyggml cannot encode Q6_K): any codes and scales, fp16 d uniform in [d_low, d_high]."""
    raw = rng.integers(0, 256, (rows, cols // 256, 210), dtype=np.uint8)
    raw[:, :, 208:210] = rng.uniform(d_low, d_high, raw.shape[:2]).astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


def test_models_dir() -> Path:
    return Path(os.environ.get("PYGGML_TEST_MODELS", REPO_ROOT.parent / "shared" / "models"))


@pytest.fixture(scope="session")
def models_dir() -> Path:
    d = test_models_dir()
    if not d.is_dir():
        pytest.skip(f"test models not found at {d} (set PYGGML_TEST_MODELS)")
    return d


BUNDLED_STORIES = REPO_ROOT / "models" / "stories260K"  # the demo model shipped in the repository (MIT)


def stories_path() -> Path:
    """stories260K from PYGGML_TEST_MODELS when it has it, else the copy bundled in the repository."""
    d = test_models_dir() / "stories260K-hf"
    return d if (d / "model.safetensors").is_file() else BUNDLED_STORIES


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    d = stories_path()
    if not (d / "model.safetensors").is_file():
        pytest.skip(f"{d} has no model.safetensors")
    return d


@pytest.fixture(scope="session")
def stories_f32(stories_dir, tmp_path_factory) -> Path:
    """stories260K converted to an f32 GGUF once per test session."""
    from pyggml.convert import convert_hf_to_gguf

    return convert_hf_to_gguf(stories_dir, tmp_path_factory.mktemp("stories") / "stories260K-f32.gguf", outtype="f32")
