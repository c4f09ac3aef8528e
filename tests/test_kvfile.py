"""--kv-file: a new path is created with pyggml's header; an existing file is reused only when it is
pyggml's KV file of the same shape; anything else (the model file itself, any other file) is refused
untouched; a cache larger than the disk's free space is refused before anything is written."""
import shutil
from collections import namedtuple

import numpy as np
import pytest
from click.testing import CliRunner

from pyggml import Llama
from pyggml.cli import main
from pyggml.kvfile import HEADER_BYTES, KVFileError, open_kv_file
from pyggml.synthetic import Shape, write_random_model
from pyggml.gguf import GGMLType

SHAPE = Shape(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, vocab=300, ctx=64)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("kv") / "m.gguf"
    write_random_model(path, SHAPE, GGMLType.F32, seed=1)
    return path


def test_created_then_reused_for_the_same_shape(tmp_path):
    p = tmp_path / "kv.bin"
    a = open_kv_file(p, (2, 3, 4))
    a[:] = 7
    del a
    assert p.stat().st_size == HEADER_BYTES + 2 * 3 * 4 * 4
    b = open_kv_file(p, (2, 3, 4))
    assert (b == 7).all()
    with pytest.raises(KVFileError, match="another model, context size or cache type"):
        open_kv_file(p, (2, 3, 5))


def test_the_model_file_and_other_files_are_refused_untouched(model, tmp_path):
    before = model.read_bytes()
    with pytest.raises(KVFileError, match="not a pyggml KV cache file"):
        Llama(model, n_ctx=32, kv_path=model)
    assert model.read_bytes() == before
    other = tmp_path / "notes.txt"
    other.write_text("precious")
    r = CliRunner().invoke(main, ["run", "-m", str(model), "-p", "hi", "-n", "2", "--kv-file", str(other)])
    assert r.exit_code == 1 and "Traceback" not in r.output and "refusing to overwrite" in r.output
    assert other.read_text() == "precious"


def test_a_cache_larger_than_the_free_disk_is_refused_before_writing(tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(1 << 40, 0, 1 << 20))
    p = tmp_path / "big.bin"
    with pytest.raises(KVFileError, match="GiB free"):
        open_kv_file(p, (1024, 1024))
    assert not p.exists()


def test_a_reused_cache_file_gives_the_same_results(model, tmp_path):
    kv = tmp_path / "kv.bin"
    first = Llama(model, n_ctx=32, kv_path=kv).eval([1, 5, 9])
    again = Llama(model, n_ctx=32, kv_path=kv).eval([1, 5, 9])
    np.testing.assert_array_equal(first, again)
