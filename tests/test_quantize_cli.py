"""`pyggml quantize` / `convert` / `inspect`: bytes against the gguf package, fallbacks, errors, packaging."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pyggml.cli import main
from pyggml.gguf import GGMLType, GGUFFile
from pyggml.quantize import QuantizeError, default_output_path, quantize_file
from pyggml.synthetic import Shape, write_random_model

gguf = pytest.importorskip("gguf")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def f16_model(tmp_path_factory):
    """A tiny random model with an untied output head and a 96-wide FFN (not a multiple of 32)."""
    path = tmp_path_factory.mktemp("m") / "rand-f16.gguf"
    write_random_model(path, Shape(64, 2, 4, 2, 96 + 4, 300, ctx=64), GGMLType.F16, seed=3)
    return path


@pytest.mark.parametrize("name", ["q4_0", "q5_0", "q8_0"])
def test_quantized_bytes_equal_gguf_package(f16_model, tmp_path, name):
    out = tmp_path / f"m-{name}.gguf"
    report = quantize_file(f16_model, name, out)
    src, dst = GGUFFile(f16_model), GGUFFile(out)
    qtype = getattr(gguf.GGMLQuantizationType, name.upper())
    assert dst.metadata["general.file_type"] == {"q4_0": 2, "q5_0": 8, "q8_0": 7}[name]
    assert dst.metadata["general.quantization_version"] == 2
    assert [k for k in dst.metadata if k not in ("general.file_type", "general.quantization_version")] == \
        [k for k in src.metadata if k not in ("general.file_type", "general.quantization_version")]
    fell_back = {f[0] for f in report.fallbacks}
    assert fell_back == {"blk.0.ffn_down.weight", "blk.1.ffn_down.weight"}
    for t in src:
        x = src.tensor(t.name).astype(np.float32)
        got = dst.tensors[t.name]
        if len(t.shape) == 1:
            assert got.ggml_type is GGMLType.F32 and np.array_equal(dst.tensor(t.name), x)
        elif t.name in fell_back:
            assert got.ggml_type is GGMLType.F16 and np.array_equal(dst.tensor(t.name), src.tensor(t.name))
        else:
            assert got.ggml_type.name == name.upper()
            assert dst.tensor(t.name).tobytes() == gguf.quants.quantize(x, qtype).tobytes(), t.name
    r = gguf.GGUFReader(out)
    assert len(r.tensors) == len(src.tensors)


def test_output_tensor_type_and_requantize_guard(f16_model, tmp_path):
    out = tmp_path / "m-q4_0.gguf"
    quantize_file(f16_model, "q4_0", out, output_type="q8_0")
    f = GGUFFile(out)
    assert f.tensors["output.weight"].ggml_type is GGMLType.Q8_0
    assert f.tensors["token_embd.weight"].ggml_type is GGMLType.Q4_0
    with pytest.raises(QuantizeError, match="already Q4_0"):
        quantize_file(out, "q8_0", tmp_path / "again.gguf")
    quantize_file(out, "q8_0", tmp_path / "again.gguf", allow_requantize=True)
    with pytest.raises(QuantizeError, match="overwrite"):
        quantize_file(out, "q8_0", out, allow_requantize=True)


def test_f32_round_trip_is_exact(f16_model, tmp_path):
    f32 = quantize_file(f16_model, "f32", tmp_path / "a.gguf").out_path
    back = quantize_file(f32, "f16", tmp_path / "b.gguf").out_path
    a, b = GGUFFile(f16_model), GGUFFile(back)
    for t in a:
        assert b.tensor(t.name).tobytes() == a.tensor(t.name).tobytes() or len(t.shape) == 1


def test_interrupted_quantize_leaves_nothing(f16_model, tmp_path):
    def interrupt(name, i, n):
        if i == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_file(f16_model, "q4_0", tmp_path / "x.gguf", progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_default_output_name():
    assert default_output_path(Path("d/stories260K-f16.gguf"), "q4_0") == Path("d/stories260K-q4_0.gguf")
    assert default_output_path(Path("model.gguf"), "q8_0") == Path("model-q8_0.gguf")


def test_cli_quickstart(stories_dir, tmp_path):
    runner = CliRunner()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        r = runner.invoke(main, ["convert", str(stories_dir), "-o", "stories260K-f16.gguf"])
        assert r.exit_code == 0, r.output
        r = runner.invoke(main, ["quantize", "stories260K-f16.gguf", "q4_0"])
        assert r.exit_code == 0, r.output
        assert "fallback: blk.0.ffn_down.weight" in r.output and "bpw" in r.output
        assert (tmp_path / "stories260K-q4_0.gguf").is_file()
        r = runner.invoke(main, ["inspect", "stories260K-q4_0.gguf"])
        assert r.exit_code == 0, r.output
        assert "llama.block_count" in r.output and "blk.4.ffn_down.weight" in r.output and "(512 items)" in r.output
    finally:
        os.chdir(cwd)


def test_cli_bad_input_is_a_clean_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(40))
    runner = CliRunner()
    for args in (["inspect", str(bad)], ["quantize", str(bad), "q4_0"]):
        r = runner.invoke(main, args)
        assert r.exit_code == 1 and "bad magic" in r.output and "Traceback" not in r.output
    r = runner.invoke(main, ["convert", str(tmp_path), "-o", str(tmp_path / "x.gguf")])
    assert r.exit_code == 1 and "config.json" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_help_does_not_import_numba():
    code = "import sys, pyggml.cli; assert 'numba' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_wheel_ships_convert_inside_pyggml(tmp_path):
    """convert/ installs as pyggml.convert, never as a top-level `convert` package."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
                   check=True, cwd=tmp_path)
    wheel = next(tmp_path.glob("pyggml-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "pyggml/convert/__init__.py" in names and "pyggml/convert/archs.py" in names
    assert not any(n.startswith("convert/") for n in names)
    sources = {str(p.relative_to(REPO)) for ext in ("*.py", "*.cu") for p in (REPO / "pyggml").rglob(ext)}
    assert sources <= set(names), f"missing from the wheel: {sorted(sources - set(names))}"
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)], check=True)
    code = "import pyggml.convert, pyggml.gguf; from pyggml.convert import convert_hf_to_gguf; print(pyggml.convert.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(target)},
                         check=True, capture_output=True, text=True).stdout
    assert out.strip().startswith(str(target))
