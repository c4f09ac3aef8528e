"""GGUF reader/writer: round trips with the `gguf` package both ways, and hostile input."""
import struct
import tracemalloc

import numpy as np
import pytest

from pyggml.gguf import GGMLType, GGUFError, GGUFFile, TensorPlan, Typed, ValueType, write_gguf

gguf = pytest.importorskip("gguf")


def _plans(tensors: dict[str, tuple[np.ndarray, GGMLType]]):
    out = []
    for name, (arr, t) in tensors.items():
        shape = arr.shape if t in (GGMLType.F32, GGMLType.F16, GGMLType.BF16) else (*arr.shape[:-1], arr.shape[-1] // {GGMLType.Q4_0: 18, GGMLType.Q8_0: 34, GGMLType.Q5_0: 22}[t] * 32)
        out.append(TensorPlan(name, tuple(shape), t, lambda a=arr: a))
    return out


@pytest.fixture()
def sample(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {
        "token_embd.weight": (rng.standard_normal((7, 64)).astype(np.float16), GGMLType.F16),
        "blk.0.attn_norm.weight": (rng.standard_normal(64).astype(np.float32), GGMLType.F32),
        "blk.0.attn_q.weight": (rng.integers(0, 256, (64, 2 * 18), dtype=np.uint8), GGMLType.Q4_0),
        "blk.0.ffn_up.weight": (rng.integers(0, 256, (3, 2 * 34), dtype=np.uint8), GGMLType.Q8_0),
        "bf": (rng.integers(0, 65535, (2, 3, 4), dtype=np.uint16), GGMLType.BF16),
    }
    meta = {
        "general.architecture": "llama",
        "general.name": "tést ✓",
        "llama.block_count": 1,
        "llama.rope.freq_base": 10000.0,
        "neg": -5,
        "big": 2**40,
        "flag": False,
        "u8": Typed(ValueType.UINT8, 200),
        "f64": Typed(ValueType.FLOAT64, 1e300),
        "tokenizer.ggml.tokens": ["<unk>", "▁a", "", "\n"],
        "tokenizer.ggml.scores": np.array([0.0, -1.5, 2.0, 3.25], dtype=np.float32),
        "tokenizer.ggml.token_type": np.array([2, 1, 1, 6], dtype=np.int32),
        "bools": np.array([True, False, True]),
    }
    path = tmp_path / "sample.gguf"
    write_gguf(path, meta, _plans(tensors))
    return path, meta, tensors


def test_pyggml_file_reads_back_in_gguf_package(sample):
    path, meta, tensors = sample
    r = gguf.GGUFReader(path)
    for key, value in meta.items():
        got = r.fields[key].contents()
        want = value.value if isinstance(value, Typed) else value
        if isinstance(want, np.ndarray):
            assert np.array_equal(np.asarray(got), want), key
        elif isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-7), key
        else:
            assert got == want, key
    assert r.fields["u8"].types == [gguf.GGUFValueType.UINT8]
    assert r.fields["neg"].types == [gguf.GGUFValueType.INT32]
    by_name = {t.name: t for t in r.tensors}
    assert list(by_name) == list(tensors)
    for name, (arr, t) in tensors.items():
        assert int(by_name[name].tensor_type) == int(t)
        assert by_name[name].data.tobytes() == arr.tobytes(), name


def test_pyggml_file_reads_back_in_pyggml(sample):
    path, meta, tensors = sample
    f = GGUFFile(path)
    assert f.version == 3 and f.alignment == 32
    assert f.metadata["general.name"] == "tést ✓"
    assert f.fields["big"].type is ValueType.INT64
    assert f.fields["tokenizer.ggml.scores"].elem_type is ValueType.FLOAT32
    for name, (arr, t) in tensors.items():
        view = f.tensor(name)
        assert view.tobytes() == arr.tobytes()
        assert f.tensors[name].offset % 32 == 0
    assert f.tensor("blk.0.attn_q.weight").shape == (64, 36)
    assert f.tensors["blk.0.attn_q.weight"].shape == (64, 64)
    assert f.tensor("token_embd.weight").dtype == np.float16


def test_rewrite_of_read_fields_is_byte_identical(sample, tmp_path):
    path, _, _ = sample
    f = GGUFFile(path)
    plans = [TensorPlan(t.name, t.shape, t.ggml_type, lambda n=t.name: f.tensor(n)) for t in f]
    out = tmp_path / "again.gguf"
    write_gguf(out, f.fields, plans)
    assert out.read_bytes() == path.read_bytes()


def test_gguf_package_file_reads_in_pyggml(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "theirs.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_float32("x.f32", 0.25)
    w.add_int8("x.i8", -3)
    w.add_uint64("x.u64", 2**63 + 5)
    w.add_bool("x.bool", True)
    w.add_array("x.strs", ["α", "b"])
    w.add_array("x.ints", [1, 2, 3])
    a = rng.standard_normal((4, 32)).astype(np.float32)
    h = rng.standard_normal((3, 32)).astype(np.float16)
    q = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("a", a)
    w.add_tensor("h", h)
    w.add_tensor("q", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    f = GGUFFile(path)
    assert f.architecture == "llama"
    assert f.metadata["llama.block_count"] == 2 and f.metadata["llama.context_length"] == 128
    assert f.metadata["x.f32"] == 0.25 and f.metadata["x.i8"] == -3 and f.metadata["x.u64"] == 2**63 + 5
    assert f.metadata["x.bool"] is True and f.metadata["x.strs"] == ["α", "b"]
    assert list(f.metadata["x.ints"]) == [1, 2, 3]
    assert np.array_equal(f.tensor("a"), a) and np.array_equal(f.tensor("h"), h)
    assert f.tensors["q"].ggml_type is GGMLType.Q8_0 and f.tensors["q"].shape == (2, 64)
    assert f.tensor("q").tobytes() == q.tobytes()


def test_writer_leaves_no_partial_file_on_failure(tmp_path):
    good = np.zeros(32, np.float32)

    def boom():
        raise KeyboardInterrupt

    target = tmp_path / "out.gguf"
    with pytest.raises(KeyboardInterrupt):
        write_gguf(target, {"a": 1}, [TensorPlan("x", (32,), GGMLType.F32, lambda: good),
                                      TensorPlan("y", (32,), GGMLType.F32, boom)])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="gave 64 bytes"):
        write_gguf(target, {}, [TensorPlan("x", (32,), GGMLType.F32, lambda: np.zeros(16, np.float32))])
    assert list(tmp_path.iterdir()) == []


def test_writer_keeps_existing_target_on_failure(tmp_path):
    target = tmp_path / "out.gguf"
    target.write_bytes(b"old")
    with pytest.raises(TypeError):
        write_gguf(target, {}, [TensorPlan("x", (32,), GGMLType.F32, lambda: np.zeros(32, np.float64))])
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.gguf"]


# ------------------------------------------------------------------------------- hostile files
def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _file(kvs=b"", n_kv=0, infos=b"", n_tensors=0, data=b"", version=3, magic=b"GGUF", align=32):
    head = magic + struct.pack("<IQQ", version, n_tensors, n_kv) + kvs + infos
    return head + bytes(-len(head) % align) + data


def _info(name, dims, type_id, offset):
    return _s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, type_id, offset)


GOOD_KV = _s("general.architecture") + struct.pack("<I", 8) + _s("llama")
GOOD = _file(GOOD_KV, 1, _info("w", [8, 2], 0, 0), 1, bytes(64))

BAD_FILES = {
    "wrong magic": _file(magic=b"GGML"),
    "version 1": _file(version=1),
    "version 4": _file(version=4),
    "big-endian": b"GGUF" + struct.pack(">IQQ", 3, 0, 0),
    "key length 2^63": _file(struct.pack("<Q", 2**63) + b"abc", 1),
    "string value length 2^63": _file(_s("k") + struct.pack("<IQ", 8, 2**63), 1),
    "array count 2^62": _file(_s("k") + struct.pack("<IIQ", 9, 6, 2**62), 1),
    "string array count 2^62": _file(_s("k") + struct.pack("<IIQ", 9, 8, 2**62), 1),
    "nested arrays 2^62": _file(_s("k") + struct.pack("<IIQIQ", 9, 9, 1, 9, 2**62), 1),
    "unknown value type": _file(_s("k") + struct.pack("<I", 77), 1),
    "kv count 2^62": _file(n_kv=2**62),
    "tensor count 2^62": _file(n_tensors=2**62),
    "alignment 2^30": _file(_s("general.alignment") + struct.pack("<II", 4, 2**30), 1),
    "alignment 0": _file(_s("general.alignment") + struct.pack("<II", 4, 0), 1),
    "alignment 48": _file(_s("general.alignment") + struct.pack("<II", 4, 48), 1),
    "duplicate key": _file(GOOD_KV + GOOD_KV, 2),
    "tensor past end of file": _file(GOOD_KV, 1, _info("w", [8, 2], 0, 0), 1, bytes(63)),
    "tensor offset past end": _file(GOOD_KV, 1, _info("w", [8, 2], 0, 2**40), 1, bytes(64)),
    "dims overflow": _file(GOOD_KV, 1, _info("w", [2**62, 2**62], 0, 0), 1, bytes(64)),
    "zero dim": _file(GOOD_KV, 1, _info("w", [8, 0], 0, 0), 1, bytes(64)),
    "n_dims 99": _file(GOOD_KV, 1, _s("w") + struct.pack("<I", 99), 1, bytes(64)),
    "two tensors with one name": _file(GOOD_KV, 1, _info("w", [8], 0, 0) + _info("w", [8], 0, 32), 2, bytes(64)),
    "unknown type id": _file(GOOD_KV, 1, _info("w", [8, 2], 99, 0), 1, bytes(64)),
    "removed type id 4": _file(GOOD_KV, 1, _info("w", [32], 4, 0), 1, bytes(64)),
    "row not whole blocks": _file(GOOD_KV, 1, _info("w", [16, 2], 2, 0), 1, bytes(64)),
    "misaligned offset": _file(GOOD_KV, 1, _info("w", [8], 0, 4), 1, bytes(64)),
    # llama.cpp's loader: each tensor's data starts where the previous one's (padded) ends
    "overlapping tensors": _file(GOOD_KV, 1, _info("a", [16], 0, 0) + _info("b", [16], 0, 32), 2, bytes(128)),
    "tensors out of order": _file(GOOD_KV, 1, _info("a", [8], 0, 32) + _info("b", [8], 0, 0), 2, bytes(64)),
    "a gap before a tensor": _file(GOOD_KV, 1, _info("a", [8], 0, 64), 1, bytes(128)),
    "invalid utf-8 key": _file(struct.pack("<Q", 2) + b"\xff\xfe" + struct.pack("<IB", 0, 1), 1),
    "bool byte 7": _file(_s("k") + struct.pack("<IB", 7, 7), 1),
    "empty file": b"",
}


def test_good_crafted_file_parses(tmp_path):
    p = tmp_path / "good.gguf"
    p.write_bytes(GOOD)
    f = GGUFFile(p)
    assert f.tensor("w").shape == (2, 8)


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_hostile_file_raises_gguf_error_without_big_allocation(tmp_path, case):
    p = tmp_path / "bad.gguf"
    p.write_bytes(BAD_FILES[case])
    tracemalloc.start()
    try:
        with pytest.raises(GGUFError) as err:
            GGUFFile(p)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(p) in str(err.value)
    assert peak < 1 << 20, f"{case}: allocated {peak} bytes while rejecting a {p.stat().st_size}-byte file"


def test_every_truncation_of_a_real_file_raises(sample, tmp_path):
    path, _, _ = sample
    data = path.read_bytes()
    f = GGUFFile(path)
    end_of_header = f.data_offset
    cut = tmp_path / "cut.gguf"
    end_of_data = max(t.offset + t.nbytes for t in f)
    for n in list(range(0, end_of_header, 7)) + [end_of_header + 1, end_of_data - 1]:
        cut.write_bytes(data[:n])
        with pytest.raises(GGUFError):
            GGUFFile(cut)


def test_missing_file_is_gguf_error(tmp_path):
    with pytest.raises(GGUFError, match="cannot open"):
        GGUFFile(tmp_path / "nope.gguf")


@pytest.mark.parametrize("damage, message", [
    ("truncate_length", r"'tokenizer\.ggml\.tokens'\[2\] length needs 8 bytes but the file has 3 left"),
    ("huge_length", r"'tokenizer\.ggml\.tokens'\[1\] needs 1099511627776 bytes"),
    ("bad_utf8", r"'tokenizer\.ggml\.tokens'\[1\] is not valid UTF-8"),
])
def test_string_array_damage_names_the_element(tmp_path, damage, message):
    """A vocabulary is read in one loop (_Cursor.strings): a cut-off length, a length past the end
    and bytes that are not UTF-8 each fail as GGUFError naming the element."""
    tokens = ["<unk>", "▁abc", "xy"]
    good = tmp_path / "v.gguf"
    write_gguf(good, {"general.architecture": "llama", "tokenizer.ggml.tokens": tokens}, [])
    data = bytearray(good.read_bytes())
    first = data.index("▁abc".encode()) - 8  # element 1's u64 length
    if damage == "truncate_length":
        data = data[: first + 8 + len("▁abc".encode()) + 3]  # 3 of element 2's 8 length bytes
    elif damage == "huge_length":
        data[first : first + 8] = struct.pack("<Q", 1 << 40)
    else:
        data[first + 8] = 0xFF
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match=message):
        GGUFFile(bad)
