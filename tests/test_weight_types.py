"""The weight-type registry: every ggml type id is known to the format layer with the `gguf` package's
geometry; every computable type has a codec, a CPU path and a CUDA branch; a file with a type pyggml
cannot compute is inspected in full, and a model using one fails at load naming tensor and type."""
import re

import numpy as np
import pytest
from click.testing import CliRunner

from pyggml import Llama
from pyggml.cli import main
from pyggml.cuda.module import cuda_source
from pyggml.gguf import GGMLType, GGUFFile
from pyggml.gguf.constants import TYPE_TRAITS, TensorNames
from pyggml.gguf.writer import TensorPlan, write_gguf
from pyggml.kernels import cpu
from pyggml.quant import codecs, registry
from pyggml.synthetic import Shape, llama_metadata, random_weight, synthetic_vocab, tensor_shapes

SHAPE = Shape(dim=256, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=256, vocab=260, ctx=32)


def test_every_type_id_has_the_gguf_package_geometry():
    gguf = pytest.importorskip("gguf")
    for t, tr in TYPE_TRAITS.items():
        theirs = gguf.GGMLQuantizationType(int(t))
        assert theirs.name == t.name and gguf.GGML_QUANT_SIZES[theirs] == (tr.block_size, tr.type_size)


def test_every_computable_type_has_codec_cpu_and_gpu_paths():
    """Walk the registry: a numpy decoder, a CPU kernel code and a CUDA dequant branch for each type."""
    src = cuda_source()
    assert "enum { T_" not in src  # the codes come from the registry, not a second table
    defines = registry.cuda_type_defines()
    for t in registry.COMPUTABLE_TYPES:
        code = registry.KERNEL_TYPE_CODES[t]
        assert f"#define T_{t.name} {code}\n" in defines
        assert t in cpu.SUPPORTED_TYPES
        assert re.search(rf"T == T_{t.name}\b", src), f"the CUDA source has no branch for {t.name}"
        tr = TYPE_TRAITS[t]
        raw = np.zeros((2, tr.type_size * (256 // tr.block_size)), np.uint8)
        assert codecs.dequantize(raw, t).shape == (2, 256)
    assert sorted(registry.KERNEL_TYPE_CODES.values()) == list(range(len(registry.COMPUTABLE_TYPES)))


def _model_with(path, t: GGMLType, name: str = "blk.0.ffn_up.weight", load=None):
    """A random f32 model whose tensor `name` is stored as type t: load() (default: random bytes)."""
    meta = llama_metadata(SHAPE, "odd-type", GGMLType.F32)
    meta.update(synthetic_vocab(SHAPE.vocab))
    plans = []
    for n, s in tensor_shapes(SHAPE).items():
        if n == name:
            tr = TYPE_TRAITS[t]
            raw = np.random.default_rng(0).integers(0, 256, (s[0], s[1] // tr.block_size * tr.type_size), dtype=np.uint8)
            plans.append(TensorPlan(n, s, t, load or (lambda raw=raw: raw)))
        else:
            plans.append(TensorPlan(n, s, GGMLType.F32, lambda n=n, s=s: random_weight(n, s, 3)))
    write_gguf(path, meta, plans)
    return path


@pytest.mark.parametrize("t", [GGMLType.IQ2_XXS, GGMLType.IQ1_M, GGMLType.TQ2_0, GGMLType.Q8_K], ids=lambda t: t.name)
def test_uncomputable_type_is_inspected_and_refused_at_load(tmp_path, t):
    path = _model_with(tmp_path / "odd.gguf", t)
    assert GGUFFile(path).tensors["blk.0.ffn_up.weight"].ggml_type is t
    r = CliRunner().invoke(main, ["inspect", str(path)])
    assert r.exit_code == 0, r.output
    assert re.search(rf"blk\.0\.ffn_up\.weight\s+{t.name}\*", r.output) and TensorNames.OUTPUT_NORM in r.output
    assert f"can read but not compute with {t.name}" in r.output
    with pytest.raises(registry.UnsupportedWeightType, match=rf"tensor 'blk\.0\.ffn_up\.weight'.*{t.name}"):
        Llama(path, n_ctx=16)
    r = CliRunner().invoke(main, ["run", "-m", str(path), "-p", "hi", "-n", "1"])
    assert r.exit_code == 1 and "Traceback" not in r.output and f"{t.name}" in r.output


def test_a_computable_type_in_the_same_place_loads_and_runs(tmp_path):
    name, shape = "blk.0.ffn_up.weight", (SHAPE.ffn_dim, SHAPE.dim)
    path = _model_with(tmp_path / "q4k.gguf", GGMLType.Q4_K, name,
                       lambda: codecs.quantize(random_weight(name, shape, 3), GGMLType.Q4_K, approximate=True))
    llm = Llama(path, n_ctx=16)
    assert np.isfinite(llm.eval([1, 2, 3])).all()


def test_inspect_escapes_control_characters_and_bounds_lines(tmp_path):
    """Keys, strings and tensor names from a file reach the terminal escaped and cut: no raw escape
    sequences, no line padded to a giant key."""
    meta = llama_metadata(SHAPE, "evil\x1b]0;pwned\x07", GGMLType.F32)
    meta.update(synthetic_vocab(SHAPE.vocab))
    meta["x" * 60_000] = "\x1b[2J" * 1000
    plans = [TensorPlan("t\x1b[2J" + "y" * 5000, (32,), GGMLType.F32, lambda: np.zeros(32, np.float32))]
    path = tmp_path / "evil.gguf"
    write_gguf(path, meta, plans)
    r = CliRunner().invoke(main, ["inspect", str(path)])
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output and "\x07" not in r.output and "\\x1b" in r.output
    assert max(len(line) for line in r.output.splitlines()) < 400
