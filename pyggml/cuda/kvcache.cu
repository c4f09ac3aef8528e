// The KV cache's rows in their stored types: sizes, loading a lane's share raw and decoding it,
// encoding as ggml's reference quantizers do, and the batch write (kv_write). Compiled after ops.cu;
// attention.cu reads rows through these (module.py, CUDA_SOURCES).

// ------------------------------------------------------------------------------ KV cache rows
// A row of the KV cache is one head's key or value at one position: head_dim values stored as the
// cache's KV type (KV_F32, KV_F16, KV_Q8_0, KV_Q4_0: prepended by backend.py from
// pyggml/model/kvtypes.py): floats, halves, or ggml's blocks of 32 along the head (q8_0: fp16 d then
// 32 int8, x = q*d; q4_0: fp16 d then 16 bytes, byte j holding element j in its low nibble and j+16
// in its high one, x = (q-8)*d). Writes round as ggml's reference quantizers (KVType.encode: the
// divisions, products and sums below are the _rn intrinsics so that no FMA contraction changes a
// code); reads decode as KVType.decode, in float.
template <int KV> struct no_kv_type { static constexpr bool value = false; };

template <int KV>
__device__ __forceinline__ int kv_row_bytes(int head_dim) {
    if constexpr (KV == KV_F32) return 4 * head_dim;
    else if constexpr (KV == KV_F16) return 2 * head_dim;
    else if constexpr (KV == KV_Q8_0) return head_dim / QK * 34;
    else if constexpr (KV == KV_Q4_0) return head_dim / QK * 18;
    else {
        static_assert(no_kv_type<KV>::value, "kv_row_bytes: no KV type of this code");
        return 0;
    }
}

// Element i of a stored row (the general path).
template <int KV>
__device__ __forceinline__ float kv_elem(const u8* __restrict__ row, int i) {
    if constexpr (KV == KV_F32) return ((const float*)row)[i];
    else if constexpr (KV == KV_F16) return f16(((const u16*)row)[i]);
    else if constexpr (KV == KV_Q8_0) {
        const u8* blk = row + (i / QK) * 34;
        return (float)(signed char)blk[2 + i % QK] * f16(ld16(blk));
    } else {
        const u8* blk = row + (i / QK) * 18;
        const int j = i % QK;
        const int q = j < 16 ? (blk[2 + j] & 15) : (blk[2 + j - 16] >> 4);
        return (float)(q - 8) * f16(ld16(blk));
    }
}

template <int PER>
__device__ __forceinline__ void load_dims(const float* __restrict__ row, int lane, int head_dim, float (&x)[PER]) {
    const int d0 = lane * PER;
    if (d0 + PER <= head_dim && head_dim % PER == 0) {
        if constexpr (PER >= 4) {
#pragma unroll
            for (int c = 0; c < PER / 4; c++) {
                const float4 a = ((const float4*)(row + d0))[c];
                x[4 * c] = a.x; x[4 * c + 1] = a.y; x[4 * c + 2] = a.z; x[4 * c + 3] = a.w;
            }
        } else if constexpr (PER == 2) {
            const float2 a = *(const float2*)(row + d0);
            x[0] = a.x; x[1] = a.y;
        } else {
            x[0] = row[d0];
        }
    } else {
#pragma unroll
        for (int e = 0; e < PER; e++) x[e] = d0 + e < head_dim ? row[d0 + e] : 0.f;
    }
}

// A lane's share of a stored row as loaded, not yet decoded: load_keys fetches a whole batch of keys
// before it converts any, so that the batch costs one memory latency (decoding each row as it
// arrived made the loads wait one after another: 7B q4_0 weights, f16 cache at 4096 keys, 3735 us
// a token against 2823 for an f32 cache).
template <int KV, int PER> struct RawRow {
    static constexpr int N = KV == KV_F32 ? PER : (KV == KV_F16 ? (PER + 1) / 2 : (PER + 3) / 4);
    u32 w[N];
    u32 d;  // a block's scale bits (q8_0, q4_0)
};

template <int KV, int PER>
__device__ __forceinline__ void zero_raw(RawRow<KV, PER>& r) {
#pragma unroll
    for (int i = 0; i < RawRow<KV, PER>::N; i++) r.w[i] = 0;
    r.d = 0;
}

// Dimensions d0 .. d0+PER-1 of a stored row, raw (head_dim % PER == 0, d0 + PER <= head_dim): f32 and
// f16 rows in one load of 4*PER or 2*PER bytes, the blocks in one of PER code bytes and one of the scale.
template <int KV, int PER>
__device__ __forceinline__ void fetch_row(const u8* __restrict__ row, int d0, RawRow<KV, PER>& r) {
    if constexpr (KV == KV_F32 || KV == KV_F16) {
        constexpr int BYTES = (KV == KV_F32 ? 4 : 2) * PER;  // one lane's share
        const u8* p = row + (KV == KV_F32 ? 4 : 2) * d0;
        if constexpr (BYTES >= 16) {
#pragma unroll
            for (int c = 0; c < BYTES / 16; c++) {
                const uint4 a = ((const uint4*)p)[c];
                r.w[4 * c] = a.x; r.w[4 * c + 1] = a.y; r.w[4 * c + 2] = a.z; r.w[4 * c + 3] = a.w;
            }
        } else if constexpr (BYTES == 8) {
            const uint2 a = *(const uint2*)p;
            r.w[0] = a.x; r.w[1] = a.y;
        } else if constexpr (BYTES == 4) {
            r.w[0] = *(const u32*)p;
        } else {
            r.w[0] = *(const u16*)p;
        }
    } else if constexpr (KV == KV_Q8_0 || KV == KV_Q4_0) {
        constexpr int BS = KV == KV_Q8_0 ? 34 : 18;
        const u8* blk = row + (d0 / QK) * BS;
        const u8* qs = blk + 2 + (KV == KV_Q8_0 ? d0 % QK : (d0 % QK) & 15);  // 2-byte aligned
        r.d = ld16(blk);
        if constexpr (PER >= 8) {  // aligned words, shifted into place: one load a word, not two
            constexpr int N = RawRow<KV, PER>::N;
            const u32* a = (const u32*)((unsigned long long)qs & ~3ull);
            const int sh = 8 * (int)((unsigned long long)qs & 3);  // 0 or 16
            u32 w[N + 1];
#pragma unroll
            for (int i = 0; i < N; i++) w[i] = a[i];
            w[N] = sh ? a[N] : 0u;  // the word holding the last two bytes (within the allocation: aligned)
#pragma unroll
            for (int i = 0; i < N; i++) r.w[i] = __funnelshift_r(w[i], w[i + 1], sh);
        } else if constexpr (PER == 4) {
            r.w[0] = ld32(qs);
        } else if constexpr (PER == 2) {
            r.w[0] = ld16(qs);
        } else {
            r.w[0] = qs[0];
        }
    } else {
        static_assert(no_kv_type<KV>::value, "fetch_row: no KV type of this code");
    }
}

// Byte k of w (0..255) minus (bias - 2^23), exactly: the byte becomes the low mantissa byte of 2^23
// (one byte permute and one add; the integer-to-float conversion runs at a quarter of the FMA rate,
// and a q8_0 / q4_0 cache converts every value it reads).
__device__ __forceinline__ float byte_value(u32 w, int k, float bias) {
    return __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7540 | k)) - bias;
}

// The values of a raw share before its block's scale, which is returned (1 for f32 / f16 rows): a
// sum over the share can take the scale once (a zeroed share gives zeros).
template <int KV, int PER>
__device__ __forceinline__ float decode_codes(const RawRow<KV, PER>& r, int d0, float (&x)[PER]) {
    if constexpr (KV == KV_F32) {
#pragma unroll
        for (int e = 0; e < PER; e++) x[e] = __uint_as_float(r.w[e]);
        return 1.f;
    } else if constexpr (KV == KV_F16) {
        if constexpr (PER == 1) {
            x[0] = f16((u16)r.w[0]);
        } else {
#pragma unroll
            for (int e = 0; e < PER / 2; e++) {
                const float2 f = h2f(r.w[e]);
                x[2 * e] = f.x;
                x[2 * e + 1] = f.y;
            }
        }
        return 1.f;
    } else if constexpr (KV == KV_Q8_0) {
#pragma unroll
        for (int e = 0; e < PER; e++) x[e] = byte_value(r.w[e / 4] ^ 0x80808080u, e % 4, 8388736.f);  // q + 128 - 128
        return f16((u16)r.d);
    } else {
        const int sh = d0 % QK < 16 ? 0 : 4;  // elements 16..31 of a block are the high nibbles
#pragma unroll
        for (int e = 0; e < PER; e++) x[e] = byte_value((r.w[e / 4] >> sh) & 0x0F0F0F0Fu, e % 4, 8388616.f);  // q - 8
        return f16((u16)r.d);
    }
}

// The floats of a raw share (a zeroed one gives zeros).
template <int KV, int PER>
__device__ __forceinline__ void decode_raw(const RawRow<KV, PER>& r, int d0, float (&x)[PER]) {
    const float d = decode_codes<KV, PER>(r, d0, x);
    if constexpr (KV == KV_Q8_0 || KV == KV_Q4_0) {
#pragma unroll
        for (int e = 0; e < PER; e++) x[e] *= d;
    }
}

// Dimensions lane*PER .. lane*PER+PER-1 of a stored row, decoded (zero past head_dim). A lane's
// dimensions lie in one block of 32 (PER divides 32): f16 rows take one load of 2*PER bytes, the
// blocks one of PER code bytes and one of the scale.
template <int KV, int PER>
__device__ __forceinline__ void load_row(const u8* __restrict__ row, int lane, int head_dim, float (&x)[PER]) {
    const int d0 = lane * PER;
    if (d0 + PER <= head_dim && head_dim % PER == 0) {
        RawRow<KV, PER> r;
        fetch_row<KV, PER>(row, d0, r);
        decode_raw<KV, PER>(r, d0, x);
    } else {
#pragma unroll
        for (int e = 0; e < PER; e++) x[e] = d0 + e < head_dim ? kv_elem<KV>(row, d0 + e) : 0.f;
    }
}

// This lane's PER values x (dimensions lane*PER.. of a row; a block of 32 is 32/PER neighbouring
// lanes) encoded as KV: stored at `row` when `store` (dimensions past head_dim are not), and x
// replaced by its decoded values, what a later read of the row gives. Every lane of the warp calls
// it (the blocks' scales are warp shuffles).
template <int KV, int PER>
__device__ __forceinline__ void encode_row(float (&x)[PER], u8* __restrict__ row, bool store, int lane, int head_dim,
                                           RawRow<KV, PER>* raw = nullptr) {
    const int d0 = lane * PER;
    store = store && d0 < head_dim;
    if constexpr (KV == KV_F32) {
#pragma unroll
        for (int e = 0; e < PER; e++) if (store && d0 + e < head_dim) ((float*)row)[d0 + e] = x[e];
    } else if constexpr (KV == KV_F16) {
#pragma unroll
        for (int e = 0; e < PER; e++) {
            const __half h = __float2half_rn(x[e]);
            if (store && d0 + e < head_dim) ((__half*)row)[d0 + e] = h;
            x[e] = __half2float(h);
        }
    } else if constexpr (KV == KV_Q8_0 || KV == KV_Q4_0) {
        constexpr int G = 32 / PER;  // lanes of a block
        const int gl = lane % G;
        u8* blk = row + (d0 / QK) * (KV == KV_Q8_0 ? 34 : 18);
        float d;
        if constexpr (KV == KV_Q8_0) {  // d = amax / 127
            float amax = 0.f;
#pragma unroll
            for (int e = 0; e < PER; e++) amax = fmaxf(amax, fabsf(x[e]));
#pragma unroll
            for (int o = G / 2; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
            d = __fdiv_rn(amax, 127.f);
        } else {  // d = max / -8, max the value of largest |x| (the first on ties) with its sign
            float best = x[0];
            int at = d0;
#pragma unroll
            for (int e = 1; e < PER; e++) if (fabsf(x[e]) > fabsf(best)) { best = x[e]; at = d0 + e; }
#pragma unroll
            for (int o = G / 2; o > 0; o >>= 1) {
                const float ob = __shfl_xor_sync(0xffffffffu, best, o);
                const int oa = __shfl_xor_sync(0xffffffffu, at, o);
                if (fabsf(ob) > fabsf(best) || (fabsf(ob) == fabsf(best) && oa < at)) { best = ob; at = oa; }
            }
            d = __fdiv_rn(best, -8.f);
        }
        const float id = d != 0.f ? __fdiv_rn(1.f, d) : 0.f;
        const __half dh = __float2half_rn(d);
        const float ds = __half2float(dh);
        int q[PER];
#pragma unroll
        for (int e = 0; e < PER; e++) {
            if constexpr (KV == KV_Q8_0) {
                q[e] = max(-127, min(127, (int)roundf(__fmul_rn(x[e], id))));  // roundf: half away from zero
                x[e] = (float)q[e] * ds;
            } else {
                q[e] = max(0, min(15, (int)truncf(__fadd_rn(__fmul_rn(x[e], id), 8.5f))));
                x[e] = (float)(q[e] - 8) * ds;
            }
        }
        if (store && gl == 0) *(__half*)blk = dh;
        if (raw != nullptr) {  // this lane's share as fetch_row would load it (q4_0: its own nibbles)
            zero_raw(*raw);
            raw->d = __half_as_ushort(dh);
#pragma unroll
            for (int e = 0; e < PER; e++)
                raw->w[e / 4] |= (KV == KV_Q8_0 ? (u32)(q[e] & 255) : (u32)q[e] << (d0 % QK < 16 ? 0 : 4)) << (8 * (e % 4));
        }
#pragma unroll
        for (int e = 0; e < PER; e++) {
            if constexpr (KV == KV_Q8_0) {
                if (store) blk[2 + gl * PER + e] = (u8)q[e];
            } else {  // the lanes of elements 0..15 take the high nibbles from those of 16..31
                const int hi = __shfl_xor_sync(0xffffffffu, q[e], G / 2);
                if (store && gl < G / 2) blk[2 + gl * PER + e] = (u8)(q[e] | (hi << 4));
            }
        }
    } else {
        static_assert(no_kv_type<KV>::value, "encode_row: no KV type of this code");
    }
}

// Token t's rows x (n_tok, n_kv, head_dim; float) into slots (n_seq, n_kv, n_ctx, row) at slot
// seq[t], position pos[t], encoded as KV. A block per (token, head), a warp per 32 dimensions (one
// q8_0 / q4_0 block), a lane per dimension.
template <int KV>
__global__ void kv_write(u8* __restrict__ slots, const float* __restrict__ x, const i64* __restrict__ seq,
                         const i64* __restrict__ pos, int n_kv, int n_ctx, int head_dim) {
    const int t = blockIdx.x / n_kv, head = blockIdx.x % n_kv, i = threadIdx.x, warp = i / 32;
    float v[1] = {i < head_dim ? x[(i64)blockIdx.x * head_dim + i] : 0.f};
    u8* row = slots + ((seq[t] * n_kv + head) * n_ctx + pos[t]) * (i64)kv_row_bytes<KV>(head_dim);
    encode_row<KV, 1>(v, row + warp * kv_row_bytes<KV>(QK), true, i & 31, head_dim - QK * warp);
}

