"""KV cache types (f32, f16, q8_0, q4_0): the CPU kernels' writes are byte for byte the registry's
numpy encoders (ggml's rounding), attention over the stored rows equals the float reference over the
decoded rows, and a model's logits with a lower-precision cache stay within that type's error."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from pyggml import Llama
from pyggml.cli import main
from pyggml.kvfile import KVFileError
from pyggml.session import SessionError
from pyggml.gguf import GGMLType
from pyggml.kernels import kvattn
from pyggml.kernels import reference as ref
from pyggml.model.kvtypes import KV_TYPES, KVTypeError, kv_type
from pyggml.synthetic import Shape, write_random_model

TYPES = list(KV_TYPES)


def _rows(rng, n, hd):
    x = rng.standard_normal((n, hd)).astype(np.float32)
    x[0] = 0.0  # a zero block (scale 0)
    x[1] *= 1e5  # f16 overflows to inf; q blocks get large scales
    x[2] *= 1e-6  # f16 subnormals
    x[3, ::3] = -x[3, ::3]
    x[4, 5] = -0.0
    x[5] = np.float32(2.5) / 127 * np.arange(hd) % 1  # ties of q8_0 rounding
    return x


@pytest.mark.parametrize("name", TYPES)
def test_cache_writes_are_the_reference_encoding(name):
    t = kv_type(name)
    rng = np.random.default_rng(1)
    hd, n_kv, ctx, n_seq = 64, 3, 10, 2
    x = _rows(rng, 4 * n_kv, hd).reshape(4, n_kv, hd)
    slots = np.zeros((n_seq, n_kv, ctx, t.row_width(hd)), t.dtype)
    seqs, pos = np.array([1, 0, 1, 0]), np.array([3, 9, 4, 0])
    kvattn.kv_write(slots, t.code, x, seqs, pos)
    want = t.encode(x)
    for i in range(4):
        assert slots[seqs[i], :, pos[i]].tobytes() == want[i].tobytes()
    untouched = np.ones(slots.shape[:3], bool)
    untouched[seqs, :, pos] = False
    assert not slots.view(np.uint8).reshape(*slots.shape[:3], -1)[untouched].any()


def test_f16_writes_round_every_float_like_numpy():
    t = kv_type("f16")
    bits = np.random.default_rng(2).integers(0, 1 << 32, 64 * 4096, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32).reshape(-1, 1, 64)
    slots = np.zeros((1, 1, len(x), 64), np.float16)
    kvattn.kv_write(slots, t.code, x, np.zeros(len(x), np.int64), np.arange(len(x)))
    with np.errstate(over="ignore", invalid="ignore"):
        want = x[:, 0].astype(np.float16)
    assert np.array_equal(slots[0, 0].view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("tk,tv", [("f32", "f32"), ("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "f16"),
                                   ("f16", "q4_0")])
@pytest.mark.parametrize("n_head,n_kv", [(4, 4), (8, 2), (6, 1)])
def test_attention_reads_the_stored_rows(tk, tv, n_head, n_kv):
    """Tokens of two sequences at their own positions: equal to the float64 reference over the decoded
    caches (tolerance: float32 sums of <= 40 products)."""
    rng = np.random.default_rng(3)
    tk, tv = kv_type(tk), kv_type(tv)
    hd, ctx = 64, 40
    q = rng.standard_normal((5, n_head, hd)).astype(np.float32)
    k = tk.encode(rng.standard_normal((2, n_kv, ctx, hd)).astype(np.float32))
    v = tv.encode(rng.standard_normal((2, n_kv, ctx, hd)).astype(np.float32))
    seqs, pos = np.array([0, 0, 1, 1, 1]), np.array([0, 1, 20, 21, 39])
    got = kvattn.attention_seqs(q, k, v, tk.code, tv.code, seqs, pos, np.empty_like(q))
    kd, vd = tk.decode(k), tv.decode(v)
    for i, (s, p) in enumerate(zip(seqs, pos)):
        want = ref.attention(q[i : i + 1], kd[s], vd[s], int(p))
        np.testing.assert_allclose(got[i : i + 1], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("hd", [32, 64, 128])
def test_vector_row_decoding_is_the_reference_decoding(name, hd):
    """kvrows.decode_tile (the decode attention's tiles) equals KVType.decode bit for bit, zero-filling
    the tile past the rows asked for; score_rows equals a float64 dot within float32 summation."""
    from numba import njit
    from pyggml.kernels import kvrows

    if not kvrows.VECTOR_HEAD(hd):
        pytest.skip("this host's vector row path is off (PYGGML_SIMD=portable or no fp16 conversion)")
    decode = njit(lambda code, buf, o, stride, m, hd, tile: kvrows.decode_tile(code, buf, o, stride, m, hd, tile))
    score = njit(lambda q, qo, tile, hd, scale, out, oo: kvrows.score_rows(q, qo, tile, hd, scale, out, oo))
    t, rng, n = kv_type(name), np.random.default_rng(7), 40
    stored = t.encode(_rows(rng, n, hd))
    want = t.decode(stored)
    buf, rb = stored.view(np.uint8).reshape(-1), t.row_bytes(hd)
    for first, m in ((0, 16), (3, 16), (24, 16), (30, 10), (39, 1), (5, 0)):
        tile = np.full(kvrows.KEYS * hd, np.nan, np.float32)
        assert decode(t.code, buf, first * rb, rb, m, hd, tile)
        expect = np.zeros((kvrows.KEYS, hd), np.float32)
        expect[:m] = want[first:first + m]
        np.testing.assert_array_equal(tile.reshape(kvrows.KEYS, hd), expect)
    tile = rng.standard_normal(kvrows.KEYS * hd).astype(np.float32)
    q = rng.standard_normal(2 * hd).astype(np.float32)
    out = np.full(kvrows.KEYS + 3, np.nan, np.float32)
    score(q, hd, tile, hd, np.float32(0.125), out, 3)
    exact = 0.125 * (tile.reshape(kvrows.KEYS, hd).astype(np.float64) @ q[hd:].astype(np.float64))
    bound = 0.125 * hd * np.finfo(np.float32).eps * (np.abs(tile.reshape(kvrows.KEYS, hd)) @ np.abs(q[hd:]))
    assert np.all(np.abs(out[3:] - exact) <= bound) and np.isnan(out[:3]).all()


@pytest.mark.parametrize("tk,tv", [("f32", "f32"), ("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "f16")])
@pytest.mark.parametrize("hd,n_head,n_kv", [(64, 8, 1), (128, 4, 4), (32, 6, 2), (80, 3, 3), (8, 2, 1)])
def test_decode_attention_over_many_tiles(tk, tv, hd, n_head, n_kv):
    """One token each of several sequences (a decode step) over 1 .. 300 cached keys: whole tiles of 16
    keys, a partial last one, and head sizes off the vector path (80: q types refuse it, 8: scalar)."""
    tk, tv = kv_type(tk), kv_type(tv)
    if hd % tk.block or hd % tv.block:
        pytest.skip(f"{tk.name}/{tv.name} stores blocks of 32 values, not heads of {hd}")
    rng = np.random.default_rng(11)
    pos = np.array([0, 14, 15, 16, 100, 299])
    ctx, n = 300, len(pos)
    q = rng.standard_normal((n, n_head, hd)).astype(np.float32)
    k = tk.encode(rng.standard_normal((n, n_kv, ctx, hd)).astype(np.float32))
    v = tv.encode(rng.standard_normal((n, n_kv, ctx, hd)).astype(np.float32))
    seqs = np.arange(n)
    got = kvattn.attention_seqs(q, k, v, tk.code, tv.code, seqs, pos, np.empty_like(q))
    kd, vd = tk.decode(k), tv.decode(v)
    for i, (s, p) in enumerate(zip(seqs, pos)):
        want = ref.attention(q[i : i + 1], kd[s], vd[s], int(p))
        np.testing.assert_allclose(got[i : i + 1], want, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("tk,tv", [("f16", "f16"), ("q8_0", "q4_0"), ("f32", "f32")])
@pytest.mark.parametrize("hd,n_head,n_kv", [(64, 8, 2), (32, 4, 4), (8, 2, 1)])
def test_prompt_blocks_over_many_tiles(tk, tv, hd, n_head, n_kv):
    """A prompt's tokens 280 .. 300 of one sequence (a block of 16 tokens and one of 5) over 281 .. 301
    keys: the block path's transposed key tiles and value tiles, the last one partial."""
    tk, tv = kv_type(tk), kv_type(tv)
    if hd % tk.block or hd % tv.block:
        pytest.skip(f"{tk.name}/{tv.name} stores blocks of 32 values, not heads of {hd}")
    rng = np.random.default_rng(12)
    ctx, pos = 310, np.arange(280, 301)
    q = rng.standard_normal((len(pos), n_head, hd)).astype(np.float32)
    k = tk.encode(rng.standard_normal((1, n_kv, ctx, hd)).astype(np.float32))
    v = tv.encode(rng.standard_normal((1, n_kv, ctx, hd)).astype(np.float32))
    got = kvattn.attention_seqs(q, k, v, tk.code, tv.code, np.zeros(len(pos), np.int64), pos, np.empty_like(q))
    kd, vd = tk.decode(k), tv.decode(v)
    for i, p in enumerate(pos):
        want = ref.attention(q[i : i + 1], kd[0], vd[0], int(p))
        np.testing.assert_allclose(got[i : i + 1], want, rtol=1e-4, atol=2e-5)


def test_unknown_and_misfit_types_are_refused():
    with pytest.raises(KVTypeError, match="q5_1.*f32, f16, q8_0, q4_0"):
        kv_type("q5_1")
    with pytest.raises(KVTypeError, match="blocks of 32.*heads have 8"):
        kv_type("q8_0").row_width(8)


SHAPE = Shape(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, vocab=300, ctx=64)  # head_dim 32


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("kvt") / "m.gguf"
    write_random_model(path, SHAPE, GGMLType.F32, seed=4)
    return path


def test_memory_per_token_follows_the_type(model):
    sizes = {}
    for name in TYPES:
        llm = Llama(model, n_ctx=64, type_k=name, type_v=name, verbose=False)
        sizes[name] = llm.kv_cache.nbytes
        assert sizes[name] == llm.kv_cache.bytes_per_token() * 64
    assert sizes["f16"] * 2 == sizes["f32"]
    assert sizes["q8_0"] * 32 == sizes["f32"] * 34 // 4 and sizes["q4_0"] * 32 == sizes["f32"] * 18 // 4


@pytest.mark.parametrize("name,tol", [("f16", 2e-3), ("q8_0", 2e-2), ("q4_0", 2e-1)])
def test_logits_with_a_typed_cache_stay_near_f32(model, name, tol):
    """Every token's logits against an f32 cache, relative to the largest logit: f16 rows carry 2^-11
    relative error, q8_0 1/254 of a block's largest value, q4_0 1/16."""
    tokens = np.random.default_rng(5).integers(0, SHAPE.vocab, 40)
    base = Llama(model, n_ctx=64, type_k="f32", type_v="f32", verbose=False)
    a = base.model.forward(tokens, 0, base.kv_cache, all_logits=True)
    llm = Llama(model, n_ctx=64, type_k=name, type_v=name, verbose=False)
    b = llm.model.forward(tokens, 0, llm.kv_cache, all_logits=True)
    err = np.abs(a - b).max() / np.abs(a).max()
    assert err < tol, err
    # prefill at once equals token-by-token decode with the same cache type (the same rows are stored)
    step = Llama(model, n_ctx=64, type_k=name, type_v=name, verbose=False)
    for tok in tokens:
        last = step.eval([int(tok)])
    np.testing.assert_allclose(last, b[-1], rtol=1e-4, atol=1e-4 * np.abs(b[-1]).max())


def test_sessions_and_states_keep_the_type_and_refuse_another(model, tmp_path):
    tokens = [5, 17, 33, 2, 99]
    a = Llama(model, n_ctx=32, type_k="q8_0", type_v="q4_0", verbose=False)
    want = a.eval(tokens)
    path = tmp_path / "s.bin"
    a.save_state_file(path)
    b = Llama(model, n_ctx=32, type_k="q8_0", type_v="q4_0", verbose=False)
    b.load_state_file(path)
    assert b.tokens == tokens
    np.testing.assert_array_equal(b.eval([7]), a.eval([7]))
    state = a.save_state()
    assert state.kv_types == ("q8_0", "q4_0") and state.kv[0][0].dtype == np.uint8
    other = Llama(model, n_ctx=32, type_k="f16", type_v="f16", verbose=False)
    with pytest.raises(SessionError, match="q8_0/q4_0.*f16/f16"):
        other.load_state_file(path)
    with pytest.raises(SessionError, match="q8_0/q4_0"):
        other.load_state(state)
    assert want.shape == (SHAPE.vocab,)


def test_a_kv_file_holds_the_typed_cache(model, tmp_path):
    kv = tmp_path / "kv.bin"
    first = Llama(model, n_ctx=32, kv_path=kv, type_k="f16", type_v="q8_0", verbose=False).eval([1, 5, 9])
    again = Llama(model, n_ctx=32, kv_path=kv, type_k="f16", type_v="q8_0", verbose=False).eval([1, 5, 9])
    np.testing.assert_array_equal(first, again)
    with pytest.raises(KVFileError, match="cache type"):
        Llama(model, n_ctx=32, kv_path=kv, type_k="f32", type_v="q8_0", verbose=False)


def test_cli_flags(model, tmp_path):
    r = CliRunner().invoke(main, ["run", "-m", str(model), "-p", "hi", "-n", "2", "-ctk", "q5_1"])
    assert r.exit_code == 2 and "q5_1" in r.output and "f32, f16, q8_0, q4_0" in r.output
    r = CliRunner().invoke(main, ["run", "-m", str(model), "-p", "hi", "-n", "3", "--temp", "0", "-ctk", "q8_0",
                                  "-ctv", "q8_0", "-no-cnv"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["bench", "-m", str(model), "-p", "8", "-n", "4", "-r", "2", "-ctk", "f32,q4_0",
                                  "-ctv", "f16", "-o", "json"])
    assert r.exit_code == 0, r.output
    recs = json.loads(r.output[r.output.index("["):])
    per_token = {x["type_k"]: x["kv_bytes_per_token"] for x in recs}
    row = SHAPE.n_layers * SHAPE.n_kv_heads  # rows of one position: head_dim 32
    assert per_token == {"f32": row * (128 + 64), "q4_0": row * (18 + 64)}


def test_eval_appends_as_sync_context_does(model):
    """eval's append path (no copy of the context per token) gives what sync_context gives, keeps the
    token list, and refuses what does not fit without evaluating any of it."""
    from pyggml.api import ContextFullError

    a = Llama(model, n_ctx=16, n_batch=3, verbose=False)
    b = Llama(model, n_ctx=16, n_batch=3, verbose=False)
    a.eval([1, 2, 3, 4, 5])
    la = a.eval([6, 7])
    b.sync_context([1, 2, 3, 4, 5])
    lb = b.sync_context([1, 2, 3, 4, 5, 6, 7])  # the same batches: [1 2 3] [4 5] [6 7]
    np.testing.assert_array_equal(la, lb)
    assert a.tokens == b.tokens == [1, 2, 3, 4, 5, 6, 7]
    np.testing.assert_array_equal(a.eval([]), la)  # nothing new: the same logits
    with pytest.raises(ContextFullError):
        a.eval(list(range(10)))
    assert a.tokens == [1, 2, 3, 4, 5, 6, 7]
