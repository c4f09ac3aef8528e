// The decode products (mmv): the wide path of the low-bit types, and the one kernel whose MODE
// picks the epilogue (store, add to the residual and fold the next norm, SwiGLU, RoPE into the KV
// cache). Compiled after decoders.cu (module.py, CUDA_SOURCES).

// ------------------------------------------------------------------------ the wide path
// Q4_1, Q5_1, Q2_K-Q6_K, IQ4_NL, IQ4_XS: a lane takes a "unit" of 32 weights of a row at a
// time: one block of 32, or in the K types one 16-byte run of the low-bit codes, whose low and high
// nibbles (Q6_K: the two nibbles of ql) are 16 consecutive weights each of two different 32s. A
// unit is two halves of 16 weights, each 16 consecutive int8 activations (one 16-byte load) and one
// activation scale; the weights' bytes come in 16-byte (Q4_K, Q5_K) or 4-byte loads, and their
// scales once per unit, so a lane issues a few loads per 32 weights instead of per 8.
struct XW { int lo[4], hi[4]; float dlo, dhi; int slo, shi; };  // activations of a unit's halves

// Where unit u's halves start (element index) for type T.
template <int T>
__device__ __forceinline__ void unit_halves(int u, int& elo, int& ehi) {
    if constexpr (T == T_Q4_K || T == T_Q5_K) {  // chunk k of super-block sb: sub-blocks 2c (low), 2c+1 (high)
        const int sb = u >> 3, k = u & 7;
        elo = 256 * sb + 64 * (k >> 1) + 16 * (k & 1);
        ehi = elo + 32;
    } else if constexpr (T == T_Q6_K) {  // ql bytes 16k..: half h, groups g and g + 2 of 32, from l0
        const int sb = u >> 3, k = u & 7, h = k >> 2, kk = k & 3;
        elo = 256 * sb + 128 * h + 32 * (kk >> 1) + 16 * (kk & 1);
        ehi = elo + 64;
    } else {  // one block of 32
        elo = 32 * u;
        ehi = elo + 16;
    }
}

template <int T>
__device__ __forceinline__ XW load_xw(const Input& in, int u) {
    int elo, ehi;
    unit_halves<T>(u, elo, ehi);
    const int4 a = *(const int4*)(in.q + elo / 4), b = *(const int4*)(in.q + ehi / 4);
    XW x;
    x.lo[0] = a.x; x.lo[1] = a.y; x.lo[2] = a.z; x.lo[3] = a.w;
    x.hi[0] = b.x; x.hi[1] = b.y; x.hi[2] = b.z; x.hi[3] = b.w;
    x.dlo = in.d[elo / QK];
    x.dhi = in.d[ehi / QK];
    x.slo = x.shi = 0;
    if constexpr (T == T_Q4_1 || T == T_Q5_1 || T == T_Q4_K || T == T_Q5_K || T == T_Q2_K) {  // mins multiply the sums
#pragma unroll
        for (int m = 0; m < 4; m++) {
            x.slo = __dp4a(x.lo[m], 0x01010101, x.slo);
            x.shi = __dp4a(x.hi[m], 0x01010101, x.shi);
        }
    }
    return x;
}

// A unit's raw weight bytes: q (4 words of low bits), h (Q5: 5th bits; Q6_K: 2 high bits; Q2_K, Q3_K:
// the low bits of the high half), hm (Q3_K's hmask bytes of the unit), scales.
struct WW { u32 q[4], h[4], hm[8]; u16 d, m; int slo, shi; };

template <int T>
__device__ __forceinline__ WW load_ww(const u8* __restrict__ row, int u) {
    WW w;
    if constexpr (T == T_Q4_1 || T == T_Q5_1 || T == T_IQ4_NL) {
        constexpr int BS = T == T_Q4_1 ? 20 : (T == T_Q5_1 ? 24 : 18), QS = T == T_Q4_1 ? 4 : (T == T_Q5_1 ? 8 : 2);
        const u8* blk = row + u * BS;
        w.d = ld16(blk);
        if constexpr (T != T_IQ4_NL) w.m = ld16(blk + 2);
        if constexpr (T == T_Q5_1) w.h[0] = ld32(blk + 4);
#pragma unroll
        for (int m = 0; m < 4; m++) w.q[m] = T == T_IQ4_NL ? ld32(blk + QS + 4 * m) : *(const u32*)(blk + QS + 4 * m);
    } else if constexpr (T == T_IQ4_XS) {
        const int ib = u & 7;
        const u8* blk = row + (u >> 3) * 136;
        w.d = ld16(blk);
        w.slo = (((blk[4 + ib / 2] >> (4 * (ib & 1))) & 15) | (((ld16(blk + 2) >> (2 * ib)) & 3) << 4)) - 32;
        const uint2 a = *(const uint2*)(blk + 8 + 16 * ib), b = *(const uint2*)(blk + 16 + 16 * ib);
        w.q[0] = a.x; w.q[1] = a.y; w.q[2] = b.x; w.q[3] = b.y;
    } else if constexpr (T == T_Q4_K || T == T_Q5_K) {
        const int k = u & 7, c = k >> 1;
        const u8* blk = row + (u >> 3) * (T == T_Q4_K ? 144 : 176);
        const uint4 head = *(const uint4*)blk;  // d, dmin, scales[12]
        const uint4 qs = *(const uint4*)(blk + (T == T_Q4_K ? 16 : 48) + 16 * k);
        w.q[0] = qs.x; w.q[1] = qs.y; w.q[2] = qs.z; w.q[3] = qs.w;
        w.d = (u16)(head.x & 0xFFFFu);
        w.m = (u16)(head.x >> 16);
        int s0, m0, s1, m1;
        scale_min_k4_regs(2 * c, head.y, head.z, head.w, s0, m0);
        scale_min_k4_regs(2 * c + 1, head.y, head.z, head.w, s1, m1);
        w.slo = s0 | (m0 << 8);
        w.shi = s1 | (m1 << 8);
        if constexpr (T == T_Q5_K) {
            const uint4 qh = *(const uint4*)(blk + 16 + 16 * (k & 1));
            w.h[0] = qh.x; w.h[1] = qh.y; w.h[2] = qh.z; w.h[3] = qh.w;
        }
    } else if constexpr (T == T_Q2_K || T == T_Q3_K) {  // block bi: 32 bytes of qs (2 bits at shift 2(bi % 4))
        const int bi = u & 7, h = bi >> 2;
        const u8* blk = row + (u >> 3) * (T == T_Q2_K ? 84 : 110);
        const u8* qs = blk + (T == T_Q2_K ? 16 : 32) + 32 * h;
#pragma unroll
        for (int m = 0; m < 4; m++) {
            w.q[m] = ld32(qs + 4 * m);
            w.h[m] = ld32(qs + 16 + 4 * m);
        }
        if constexpr (T == T_Q2_K) {  // scale nibble (low), min nibble (high) of each half
            w.d = ld16(blk + 80);
            w.m = ld16(blk + 82);
            w.slo = blk[2 * bi];
            w.shi = blk[2 * bi + 1];
        } else {
#pragma unroll
            for (int m = 0; m < 8; m++) w.hm[m] = ld32(blk + 4 * m);
            w.d = ld16(blk + 108);
            const u8* sc = blk + 96;
            const int ia = 2 * bi, ib = 2 * bi + 1;
            w.slo = ((ia < 8 ? (sc[ia] & 15) : (sc[ia - 8] >> 4)) | (((sc[8 + ia % 4] >> (2 * (ia / 4))) & 3) << 4)) - 32;
            w.shi = ((ib < 8 ? (sc[ib] & 15) : (sc[ib - 8] >> 4)) | (((sc[8 + ib % 4] >> (2 * (ib / 4))) & 3) << 4)) - 32;
        }
    } else if constexpr (T == T_Q6_K) {
        const int k = u & 7, h = k >> 2, kk = k & 3, g = kk >> 1, l0 = 16 * (kk & 1);
        const u8* blk = row + (u >> 3) * 210;
#pragma unroll
        for (int m = 0; m < 4; m++) {
            w.q[m] = ld32(blk + 16 * k + 4 * m);
            w.h[m] = ld32(blk + 128 + 32 * h + l0 + 4 * m);
        }
        w.d = ld16(blk + 208);
        w.slo = (signed char)blk[192 + 8 * h + 2 * g + (kk & 1)];
        w.shi = (signed char)blk[192 + 8 * h + 2 * (g + 2) + (kk & 1)];
    } else {
        static_assert(no_decoder<T>::value, "load_ww: no wide path for this weight type code");
    }
    return w;
}

template <int T>
__device__ __forceinline__ float dot_ww(const WW& w, const XW& x, int u) {
    int slo = 0, shi = 0;
    if constexpr (T == T_Q6_K) {  // codes: nibble | 2 high bits << 4, minus 32; low half: groups g, high: g + 2
        const int g = ((u & 7) & 3) >> 1;
#pragma unroll
        for (int m = 0; m < 4; m++) {
            const u32 lo = (w.q[m] & 0x0F0F0F0Fu) | (((w.h[m] >> (2 * g)) & 0x03030303u) << 4);
            const u32 hi = ((w.q[m] >> 4) & 0x0F0F0F0Fu) | (((w.h[m] >> (2 * g + 4)) & 0x03030303u) << 4);
            slo = __dp4a((int)__vsub4(lo, 0x20202020u), x.lo[m], slo);
            shi = __dp4a((int)__vsub4(hi, 0x20202020u), x.hi[m], shi);
        }
        return f16(w.d) * ((float)(w.slo * slo) * x.dlo + (float)(w.shi * shi) * x.dhi);
    } else if constexpr (T == T_Q2_K || T == T_Q3_K) {
        const int bi = u & 7, sh = 2 * (bi & 3);
#pragma unroll
        for (int m = 0; m < 4; m++) {
            u32 lo = (w.q[m] >> sh) & 0x03030303u, hi = (w.h[m] >> sh) & 0x03030303u;
            if constexpr (T == T_Q3_K) {  // the hmask bit 4h + j set: q = low bits, clear: low bits - 4
                const int bit = 4 * (bi >> 2) + (bi & 3);
                lo = __vsub4(lo | (((w.hm[m] >> bit) & 0x01010101u) << 2), 0x04040404u);
                hi = __vsub4(hi | (((w.hm[4 + m] >> bit) & 0x01010101u) << 2), 0x04040404u);
            }
            slo = __dp4a((int)lo, x.lo[m], slo);
            shi = __dp4a((int)hi, x.hi[m], shi);
        }
        if constexpr (T == T_Q3_K) return f16(w.d) * x.dlo * (float)(w.slo * slo + w.shi * shi);
        else return x.dlo * (f16(w.d) * (float)((w.slo & 15) * slo + (w.shi & 15) * shi) -
                             f16(w.m) * (float)((w.slo >> 4) * x.slo + (w.shi >> 4) * x.shi));
    } else {
        const int bit = T == T_Q5_K ? 2 * ((u & 7) >> 1) : 0;  // Q5_K: the sub-blocks' qh bits
#pragma unroll
        for (int m = 0; m < 4; m++) {
            u32 lo = w.q[m] & 0x0F0F0F0Fu, hi = (w.q[m] >> 4) & 0x0F0F0F0Fu;
            if constexpr (T == T_Q5_1) {
                lo |= spread4((w.h[0] >> (4 * m)) & 15) << 4;
                hi |= spread4((w.h[0] >> (16 + 4 * m)) & 15) << 4;
            } else if constexpr (T == T_Q5_K) {
                lo |= ((w.h[m] >> bit) & 0x01010101u) << 4;
                hi |= ((w.h[m] >> (bit + 1)) & 0x01010101u) << 4;
            }
            if constexpr (T == T_IQ4_NL || T == T_IQ4_XS) {
                lo = (u32)iq4_values(lo);
                hi = (u32)iq4_values(hi);
            }
            slo = __dp4a((int)lo, x.lo[m], slo);
            shi = __dp4a((int)hi, x.hi[m], shi);
        }
    }
    if constexpr (T == T_Q4_1 || T == T_Q5_1)  // x = d*q + m, one block
        return x.dlo * (f16(w.d) * (float)(slo + shi) + f16(w.m) * (float)(x.slo + x.shi));
    else if constexpr (T == T_IQ4_NL) return f16(w.d) * x.dlo * (float)(slo + shi);
    else if constexpr (T == T_IQ4_XS) return f16(w.d) * (float)w.slo * x.dlo * (float)(slo + shi);
    else {  // Q4_K, Q5_K: x = d*sc*q - dmin*m per sub-block
        const float d = f16(w.d), dmin = f16(w.m);
        return x.dlo * (d * (float)(w.slo & 255) * (float)slo - dmin * (float)(w.slo >> 8) * (float)x.slo) +
               x.dhi * (d * (float)(w.shi & 255) * (float)shi - dmin * (float)(w.shi >> 8) * (float)x.shi);
    }
}

// Dot products of two rows with the input over the wide path: U units per lane in flight, their
// activations and both rows' weight bytes loaded before any is multiplied.
template <int T, int U, int KS>
__device__ __forceinline__ float2 dot_rows_wide(const u8* __restrict__ r0, const u8* __restrict__ r1, const Input& in, int cols, int ks) {
    const int lane = threadIdx.x & 31;
    const int nu = cols / 32;
    float a0 = 0.f, a1 = 0.f;
    for (int u0 = lane + 32 * U * ks; u0 < nu; u0 += 32 * U * KS) {
        XW x[U];
        WW w0[U], w1[U];
#pragma unroll
        for (int j = 0; j < U; j++) {
            const int u = u0 + 32 * j;
            if (u < nu) { x[j] = load_xw<T>(in, u); w0[j] = load_ww<T>(r0, u); w1[j] = load_ww<T>(r1, u); }
        }
#pragma unroll
        for (int j = 0; j < U; j++) {
            const int u = u0 + 32 * j;
            if (u < nu) { a0 += dot_ww<T>(w0[j], x[j], u); a1 += dot_ww<T>(w1[j], x[j], u); }
        }
    }
    return make_float2(a0, a1);
}

// The general path (Q6_K, and float rows that are not 16-byte aligned): one weight per lane.
template <int T>
__device__ __forceinline__ float2 dot_rows_any(const u8* __restrict__ r0, const u8* __restrict__ r1, const float* __restrict__ x, int cols) {
    float a0 = 0.f, a1 = 0.f;
    for (int i = threadIdx.x & 31; i < cols; i += 32) {
        a0 += dequant<T>(r0, i) * x[i];
        a1 += dequant<T>(r1, i) * x[i];
    }
    return make_float2(a0, a1);
}

// Rotate the adjacent pair (a, b) at dimension `dd` of a head by position `pos` (RoPE, GGML "normal" mode).
// The angle is formed and reduced to [-pi, pi] in double, then rotated with the fast float sincos
// (absolute error < 4e-7 there): double-precision sincos made the QKV product's epilogue heavy.
__device__ __forceinline__ void rope_pair(float& a, float& b, int dd, i64 pos, const double* __restrict__ inv_freq, int n_rot) {
    if (dd >= n_rot) return;
    const double theta = (double)pos * inv_freq[dd / 2];
    const double two_pi = 6.283185307179586;
    float s, c;
    __sincosf((float)(theta - rint(theta / two_pi) * two_pi), &s, &c);
    const float fa = a, fb = b;
    a = fa * c - fb * s;
    b = fa * s + fb * c;
}

// x (n) -> int8 blocks of 32: d = amax/127, q = round-half-away(x/d). One warp per block.
__device__ __forceinline__ void quantize_block(float v, int i, signed char* __restrict__ q, float* __restrict__ d) {
    const float amax = warp_max(fabsf(v));
    const float dd = amax / 127.f;
    const float inv = dd == 0.f ? 0.f : 1.f / dd;
    const float t = v * inv;
    const signed char qi = (signed char)copysignf(floorf(fabsf(t) + 0.5f), t);
    q[i] = qi;
    if ((threadIdx.x & 31) == 0) d[i / QK] = dd;
}

// One launch = one product and its epilogue. Each warp owns a "pair" p:
//   STORE/ADD: rows 2p, 2p+1 of w0 (n0 rows) -> out[row] = / += dot
//   SILU:      row p of w0 (gate) and of w1 (up) -> out[p] = silu(gate) * up
//   QKV:       rows rb+2p, rb+2p+1 (< re) of [w0 (n0 rows: q); w1 (n1: k); w2 (n1: v)]: RoPE on q and k,
//              q -> out, k and v -> the layer's cache at position io[1] (kc, vc: (n_kv, n_ctx, row) of
//              the KV types kv_codes & 255 (keys), kv_codes >> 8 (values)). f32 and f16 rows are stored
//              here; a q8_0 or q4_0 row needs its whole blocks of 32, so its floats go to `stage`
//              ((2, n_kv, head_dim): keys, then values) and the attention kernel encodes them (attn_partial).
struct Epilogue {
    float* out;
    u8* kc;
    u8* vc;
    const i64* io;               // (token, position)
    const double* inv_freq;
    int head_dim, n_rot, n_ctx, kv_codes;
    float* stage;
    const float* bias;           // != nullptr: [q; k; v] biases (qwen2), added to the rows first
    float* raw_qk;               // != nullptr: q and k rows go here as they are; qk_norm_rope finishes them
};

// Row r (even) of k (is_k) or v, the pair (x, y) at position pos: f32 and f16 into the cache, q8_0 and
// q4_0 into the stage (n1: the k rows there, before the v rows).
__device__ __forceinline__ void store_kv_pair(const Epilogue& ep, bool is_k, int r, int n1, i64 pos, float x, float y) {
    const int dd = r % ep.head_dim, head = r / ep.head_dim;
    const int code = is_k ? ep.kv_codes & 255 : ep.kv_codes >> 8;
    const i64 at = ((i64)head * ep.n_ctx + pos) * ep.head_dim + dd;  // element of the cache
    if (code == KV_F32) {
        float* dst = (float*)(is_k ? ep.kc : ep.vc) + at;
        dst[0] = x;
        dst[1] = y;
    } else if (code == KV_F16) {
        __half* dst = (__half*)(is_k ? ep.kc : ep.vc) + at;
        dst[0] = __float2half_rn(x);
        dst[1] = __float2half_rn(y);
    } else {
        float* dst = ep.stage + (is_k ? 0 : n1) + r;
        dst[0] = x;
        dst[1] = y;
    }
}

// What an ADD product prepares for the next product, so that no RMSNorm kernel runs in between:
// the next RMSNorm, deferred. Its blocks hold one 32-row group each (ADD_WARPS warps, one per row
// pair) and fold it from shared memory:
//   ss[group] = sum of squares of the group's new residual rows;
//   y = residual * nw, not yet divided by the rms: the next product scales its dot products by
//   rsqrt(mean square + eps) (mmv's nss), the same thing since a product is linear;
//   with q != nullptr, y's int8 blocks for an int8 product.
// (Folding SwiGLU's int8 quantization too, whose 32-row groups come from four blocks, through a
// global counter per group: 100 us per 7B token slower than its own kernel.)
struct Fold {
    const float* nw;
    float* y;
    signed char* q;
    float* d;
    float* ss;
};

// Group g of the residual (lane i holds row 32g+i, 0 past n): ss, y and the int8 blocks.
__device__ __forceinline__ void fold_group(const Fold& f, float v, int g, int n) {
    const int i = g * QK + (threadIdx.x & 31);
    const float sq = warp_sum(v * v);
    if ((threadIdx.x & 31) == 0) f.ss[g] = sq;
    if (i < n) {
        v *= f.nw[i];
        f.y[i] = v;
    }
    if (f.q != nullptr) quantize_block(v, i, f.q, f.d);
}

enum { PATH_GROUP = 0, PATH_CHUNK = 1, PATH_ANY = 2, PATH_WIDE = 3 };

#define ADD_WARPS 16  // an ADD product with KS == 1: 32 rows per block, one group to fold

// nss != nullptr: the input is a deferred RMSNorm's y (see Fold), and nss the sums of squares of
// its ceil(cols / 32) groups; the dot products are scaled by rsqrt(mean square + eps).

template <int T, int MODE, int U, int PATH, int KS>
__global__ void __launch_bounds__(MODE == MODE_ADD && KS == 1 ? 32 * ADD_WARPS : 256) mmv(const u8* __restrict__ w0, const u8* __restrict__ w1, const u8* __restrict__ w2,
        i64 ld, int n0, int n1, int cols, int rb, int re, const int* xq, const float* xd, const float* xf,
        const float* nss, float eps, float* out, u8* kc, u8* vc, const i64* io, const double* inv_freq, int head_dim,
        int n_rot, int n_ctx, int kv_codes, float* stage, const float* bias, float* raw_qk, const float* fnw, float* fy, signed char* fq, float* fd, float* fss) {
    const Input in{xq, xd, xf};
    const Epilogue ep{out, kc, vc, io, inv_freq, head_dim, n_rot, n_ctx, kv_codes, stage, bias, raw_qk};
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    constexpr int W = MODE == MODE_ADD && KS == 1 ? ADD_WARPS : 8;  // warps per block
    const int p = blockIdx.x * (W / KS) + warp / KS, ks = warp % KS;  // W/KS row pairs, KS warps each
    const u8 *r0 = w0, *r1 = w0;
    int row = 2 * p;
    bool valid;
    if (MODE == MODE_SILU) {
        valid = p < n0;
        if (valid) { r0 = w0 + p * ld; r1 = w1 + p * ld; }
    } else if (MODE == MODE_QKV) {
        row = rb + 2 * p;
        valid = row < re;
        if (valid) {
            r0 = row < n0 ? w0 + row * ld : (row < n0 + n1 ? w1 + (row - n0) * ld : w2 + (row - n0 - n1) * ld);
            r1 = r0 + ld;
        }
    } else {
        valid = row < n0;
        if (valid) {
            r0 = w0 + row * ld;
            r1 = row + 1 < n0 ? r0 + ld : r0;  // an odd last row computes itself twice
        }
    }
    // Float weights: the first step is loaded before the wait, and the next kernel may launch at once,
    // so its blocks do the same as this one's last ones finish (7B f16 graph replay 3471 -> 3424 us;
    // the same made Q5_0's group path 4016 -> 4340 us, and the chunked path q4_0 1696 -> 1729,
    // q8_0 2251 -> 2558).
    constexpr bool EARLY = PATH == PATH_GROUP && is_float_type(T);
    typename FirstStep<T, PATH == PATH_GROUP>::type w0s[U], w1s[U];
    if constexpr (EARLY) {
        if (valid) first_step<T, U>(r0, r1, cols, ks, w0s, w1s);
        pdl_trigger();
    }
    pdl_wait();
    // A deferred norm's sums of squares, one per 32 columns. The int8 paths load the first 128 now and
    // add them up after the products. The float paths read them all after the products: f16 needs 80
    // registers a thread instead of 89, so 3 blocks of 256 threads fit an SM instead of 2 (7B f16 graph
    // replay 3483 -> 3446 us). All paths late: q4_0 1697 -> 1721 us, q8_0 2273 -> 2284.
    const int n_groups = (cols + QK - 1) / QK;
    float nsv[4] = {0.f, 0.f, 0.f, 0.f};
    if constexpr (!EARLY) {
#pragma unroll
        for (int j = 0; j < 4; j++) nsv[j] = nss != nullptr && lane + 32 * j < n_groups ? nss[lane + 32 * j] : 0.f;
    }
    float2 s = make_float2(0.f, 0.f);
    if (valid) {
        if constexpr (PATH == PATH_ANY) s = dot_rows_any<T>(r0, r1, in.f, cols);
        else if constexpr (PATH == PATH_CHUNK && (T == T_Q4_0 || T == T_Q8_0)) s = dot_rows_chunk<T, U, KS>(r0, r1, in, cols, ks);
        else if constexpr (PATH == PATH_WIDE) s = dot_rows_wide<T, U, KS>(r0, r1, in, cols, ks);
        else s = dot_rows<T, U, KS, EARLY>(r0, r1, in, cols, ks, w0s, w1s);
    }
    // the other products: after the products, not at the start: 7B graph replay f16 3576 -> 3560 us, q4_0 1747 -> 1744
    if constexpr (!EARLY) pdl_trigger();
    s.x = warp_sum(s.x);
    s.y = warp_sum(s.y);
    if constexpr (KS > 1) {  // add up the stripes of each pair
        __shared__ float2 part[W];
        if (lane == 0) part[warp] = s;
        __syncthreads();
        if (ks == 0) for (int k = 1; k < KS; k++) { s.x += part[warp + k].x; s.y += part[warp + k].y; }
    }
    if (nss != nullptr) {
        float t = nsv[0] + nsv[1] + nsv[2] + nsv[3];
        for (int k = lane + (EARLY ? 0 : 128); k < n_groups; k += 32) t += nss[k];
        const float scale = rsqrtf(warp_sum(t) / cols + eps);
        s.x *= scale;
        s.y *= scale;
    }
    const Fold fold{fnw, fy, fq, fd, fss};
    __shared__ float vals[MODE == MODE_ADD ? 2 * W : 1];  // ADD: the block's new residual rows
    if (valid && ks == 0 && lane == 0) {
        if (MODE == MODE_STORE) {
            ep.out[row] = s.x;
            if (row + 1 < n0) ep.out[row + 1] = s.y;
        } else if (MODE == MODE_ADD) {
            const float x0 = ep.out[row] + s.x, x1 = row + 1 < n0 ? ep.out[row + 1] + s.y : 0.f;
            ep.out[row] = x0;
            if (row + 1 < n0) ep.out[row + 1] = x1;
            vals[2 * (warp / KS)] = x0;
            vals[2 * (warp / KS) + 1] = x1;
        } else if (MODE == MODE_SILU) {
            ep.out[p] = s.x / (1.f + expf(-s.x)) * s.y;
        } else {
            if (ep.bias != nullptr) {
                s.x += ep.bias[row];
                s.y += ep.bias[row + 1];
            }
            const i64 pos = ep.io[1];
            const int r = row < n0 ? row : (row < n0 + n1 ? row - n0 : row - n0 - n1);
            if (ep.raw_qk != nullptr && row < n0 + n1) {  // per-head norms first: qk_norm_rope goes on
                ep.raw_qk[row] = s.x;
                ep.raw_qk[row + 1] = s.y;
            } else if (row < n0) {
                rope_pair(s.x, s.y, r % ep.head_dim, pos, ep.inv_freq, ep.n_rot);
                ep.out[r] = s.x;
                ep.out[r + 1] = s.y;
            } else {
                const bool is_k = row < n0 + n1;
                if (is_k) rope_pair(s.x, s.y, r % ep.head_dim, pos, ep.inv_freq, ep.n_rot);
                store_kv_pair(ep, is_k, r, n1, pos, s.x, s.y);
            }
        }
    }
    if constexpr (MODE == MODE_ADD && KS == 1) {
        if (fold.nw != nullptr) {  // the block's 32 rows are group blockIdx.x
            __syncthreads();
            const int i = blockIdx.x * QK + lane;
            if (warp == 0) fold_group(fold, i < n0 ? vals[lane] : 0.f, blockIdx.x, n0);
        }
    }
}

