// pyggml's CUDA kernels, compiled once by cupy (NVRTC) and cached on disk; backend.py drives them.
//
// Weights stay in their GGUF block layout in device memory (the file's bytes, row after row);
// every kernel that reads a weight dequantizes it on the fly. Type codes: pyggml/tensor.py.
//
// Decode (one token) matrix-vector products: a warp owns two output rows and walks them together,
// each lane taking 8 weights of every 256 (a quarter of a 32-weight block), several groups in
// flight at once. The quantized types multiply int8 activations (blocks of 32 with a float scale,
// the same rounding as the CPU kernels) with __dp4a; the float types multiply float activations.
// What happens to the two results (store, add to the residual, SwiGLU, RoPE into the KV cache)
// is the kernel's MODE, so one launch does the product and its epilogue.
#include <cuda_fp16.h>

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef long long i64;

#define QK 32
#define QK_K 256
#define NEG_INF __int_as_float(0xff800000)

enum { T_F32 = 0, T_F16 = 1, T_BF16 = 2, T_Q4_0 = 3, T_Q5_0 = 4, T_Q8_0 = 5, T_Q6_K = 6 };
enum { MODE_STORE = 0, MODE_ADD = 1, MODE_SILU = 2, MODE_QKV = 3 };

__device__ __forceinline__ float f16(u16 bits) { return __half2float(__ushort_as_half(bits)); }
__device__ __forceinline__ u16 ld16(const u8* p) { return *(const u16*)p; }  // p is 2-byte aligned
__device__ __forceinline__ u32 ld32(const u8* p) {  // 4 bytes from a 2-byte aligned address
    const u16* h = (const u16*)p;
    return (u32)h[0] | ((u32)h[1] << 16);
}
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Bit k (k < 4) of t moves to bit 0 of byte k: 4 high bits of Q5_0 become byte-wise bits.
__device__ __forceinline__ u32 spread4(u32 t) { return (t * 0x00204081u) & 0x01010101u; }

// ------------------------------------------------------------------------------------- decode
// One weight of row `row` at column i, any type (the slow, general path).
template <int T>
__device__ __forceinline__ float dequant(const u8* __restrict__ row, int i) {
    if (T == T_F32) return ((const float*)row)[i];
    if (T == T_F16) return f16(((const u16*)row)[i]);
    if (T == T_BF16) return __uint_as_float((u32)((const u16*)row)[i] << 16);
    const int b = i / QK, j = i % QK;
    if (T == T_Q4_0) {
        const u8* blk = row + b * 18;
        const int q = blk[2 + (j & 15)];
        return f16(ld16(blk)) * (float)((j < 16 ? (q & 15) : (q >> 4)) - 8);
    }
    if (T == T_Q5_0) {
        const u8* blk = row + b * 22;
        const u32 qh = ld32(blk + 2);
        const int q = blk[6 + (j & 15)];
        const int n = (j < 16 ? (q & 15) : (q >> 4)) | (((qh >> j) & 1) << 4);
        return f16(ld16(blk)) * (float)(n - 16);
    }
    if (T == T_Q8_0) {
        const u8* blk = row + b * 34;
        return f16(ld16(blk)) * (float)(signed char)blk[2 + j];
    }
    // Q6_K: super-blocks of 256: ql[128] qh[64] scales[16] d; two halves of 128, each 4 groups of 32
    const u8* blk = row + (i / QK_K) * 210;
    const int k = i % QK_K, half = k / 128, g = (k % 128) / 32, l = k % 32;
    const u8* ql = blk + 64 * half;
    const int h = blk[128 + 32 * half + l];
    const int lo = (g & 1) ? ql[l + 32] : ql[l];
    const int q = ((g < 2 ? (lo & 15) : (lo >> 4)) | (((h >> (2 * g)) & 3) << 4)) - 32;
    const int scale = (signed char)blk[192 + 8 * half + l / 16 + 2 * g];
    return f16(ld16(blk + 208)) * (float)(scale * q);
}

// -------------------------------------------------------------------- the matvec inner loops
// Input of a product, in both forms: int8 blocks (q, d) for the quantized weights, float (f) for
// the float weights. A lane handles "group" g: 8 weights of block g/4 (quantized) or columns
// 8g..8g+7 (float types).
struct Input {
    const int* __restrict__ q;    // int8 activations, 4 per int
    const float* __restrict__ d;  // one scale per 32
    const float* __restrict__ f;  // float activations
};

struct XQ { int a, b, ones; float d; };   // activations of one group, int8
struct XF { float4 a, b; };               // activations of one group, float

// Quantized types: a lane's share of one block, fetched raw, then combined with its activations.
template <int T> struct WQ;
template <> struct WQ<T_Q4_0> { u32 v; u16 d; };
template <> struct WQ<T_Q5_0> { u32 v, qh; u16 d; };
template <> struct WQ<T_Q8_0> { u32 v0, v1; u16 d; };

template <int T>
__device__ __forceinline__ XQ load_xq(const Input& in, int g) {
    const int b = g >> 2, j = g & 3;
    XQ x;
    if (T == T_Q8_0) {  // weights 8j..8j+7 of the block
        x.a = in.q[b * 8 + 2 * j];
        x.b = in.q[b * 8 + 2 * j + 1];
    } else {            // nibble layout: weights 4j..4j+3 (low nibbles) and 16+4j..16+4j+3 (high)
        x.a = in.q[b * 8 + j];
        x.b = in.q[b * 8 + 4 + j];
    }
    x.d = in.d[b];
    x.ones = __dp4a(x.a, 0x01010101, __dp4a(x.b, 0x01010101, 0));  // sum of the 8 int8 values
    return x;
}

template <int T>
__device__ __forceinline__ WQ<T> load_wq(const u8* __restrict__ row, int g) {
    const int b = g >> 2, j = g & 3;
    WQ<T> w;
    if constexpr (T == T_Q4_0) {
        const u8* blk = row + b * 18;
        w.d = ld16(blk);
        w.v = ld32(blk + 2 + 4 * j);
    } else if constexpr (T == T_Q5_0) {
        const u8* blk = row + b * 22;
        w.d = ld16(blk);
        w.qh = ld32(blk + 2);
        w.v = ld32(blk + 6 + 4 * j);
    } else {
        const u8* blk = row + b * 34;
        w.d = ld16(blk);
        w.v0 = ld32(blk + 2 + 8 * j);
        w.v1 = ld32(blk + 6 + 8 * j);
    }
    return w;
}

template <int T>
__device__ __forceinline__ float dot_q(const WQ<T>& w, const XQ& x, int g) {
    int s;
    if constexpr (T == T_Q4_0) {
        s = __dp4a((int)(w.v & 0x0F0F0F0Fu), x.a, __dp4a((int)((w.v >> 4) & 0x0F0F0F0Fu), x.b, 0)) - 8 * x.ones;
    } else if constexpr (T == T_Q5_0) {
        const int j = g & 3;
        const u32 lo = (w.v & 0x0F0F0F0Fu) | (spread4((w.qh >> (4 * j)) & 15) << 4);
        const u32 hi = ((w.v >> 4) & 0x0F0F0F0Fu) | (spread4((w.qh >> (16 + 4 * j)) & 15) << 4);
        s = __dp4a((int)lo, x.a, __dp4a((int)hi, x.b, 0)) - 16 * x.ones;
    } else {
        s = __dp4a((int)w.v0, x.a, __dp4a((int)w.v1, x.b, 0));
    }
    return f16(w.d) * x.d * (float)s;
}

// Float types: 8 consecutive weights of a row (rows are 16-byte aligned: cols % 8 == 0).
template <int T> struct WF;
template <> struct WF<T_F32> { float4 a, b; };
template <> struct WF<T_F16> { uint4 v; };
template <> struct WF<T_BF16> { uint4 v; };

__device__ __forceinline__ XF load_xf(const Input& in, int g) {
    const float4* p = (const float4*)(in.f + 8 * g);
    XF x;
    x.a = p[0];
    x.b = p[1];
    return x;
}

template <int T>
__device__ __forceinline__ WF<T> load_wf(const u8* __restrict__ row, int g) {
    WF<T> w;
    if constexpr (T == T_F32) {
        const float4* p = (const float4*)(row + 32 * g);
        w.a = p[0];
        w.b = p[1];
    } else {
        w.v = *(const uint4*)(row + 16 * g);
    }
    return w;
}

__device__ __forceinline__ float dot4(float4 a, float4 b) { return a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w; }
__device__ __forceinline__ float2 h2f(u32 bits) { return __half22float2(*(const __half2*)&bits); }
__device__ __forceinline__ float2 b2f(u32 bits) { return make_float2(__uint_as_float(bits << 16), __uint_as_float(bits & 0xFFFF0000u)); }

template <int T>
__device__ __forceinline__ float dot_f(const WF<T>& w, const XF& x) {
    if constexpr (T == T_F32) {
        return dot4(w.a, x.a) + dot4(w.b, x.b);
    } else {
        const float2 p0 = T == T_F16 ? h2f(w.v.x) : b2f(w.v.x), p1 = T == T_F16 ? h2f(w.v.y) : b2f(w.v.y);
        const float2 p2 = T == T_F16 ? h2f(w.v.z) : b2f(w.v.z), p3 = T == T_F16 ? h2f(w.v.w) : b2f(w.v.w);
        return p0.x * x.a.x + p0.y * x.a.y + p1.x * x.a.z + p1.y * x.a.w +
               p2.x * x.b.x + p2.y * x.b.y + p3.x * x.b.z + p3.y * x.b.w;
    }
}

// Dot products of two rows with the input, summed over the warp. U groups per lane in flight.
// One group of 8 weights, whatever the type: the quantized types pair int8 activations with block
// fragments, the float types float activations with 8 consecutive weights.
__device__ constexpr bool is_float_type(int T) { return T == T_F32 || T == T_F16 || T == T_BF16; }

template <int T>
__device__ __forceinline__ auto load_x(const Input& in, int g) {
    if constexpr (is_float_type(T)) return load_xf(in, g);
    else return load_xq<T>(in, g);
}

template <int T>
__device__ __forceinline__ auto load_w(const u8* __restrict__ row, int g) {
    if constexpr (is_float_type(T)) return load_wf<T>(row, g);
    else return load_wq<T>(row, g);
}

template <int T, class W, class X>
__device__ __forceinline__ float dot_group(const W& w, const X& x, int g) {
    if constexpr (is_float_type(T)) return dot_f<T>(w, x);
    else return dot_q<T>(w, x, g);
}

// The KS warps of a row pair take interleaved stripes of 32*U groups (ks = this warp's stripe).
template <int T, int U, int KS>
__device__ __forceinline__ float2 dot_rows(const u8* __restrict__ r0, const u8* __restrict__ r1, const Input& in, int cols, int ks) {
    const int lane = threadIdx.x & 31;
    const int ng = cols / 8;
    float a0 = 0.f, a1 = 0.f;
    for (int g0 = lane + 32 * U * ks; g0 < ng; g0 += 32 * U * KS) {
        decltype(load_x<T>(in, 0)) x[U];
        decltype(load_w<T>(r0, 0)) w0[U], w1[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int g = g0 + 32 * u;
            if (g < ng) { x[u] = load_x<T>(in, g); w0[u] = load_w<T>(r0, g); w1[u] = load_w<T>(r1, g); }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int g = g0 + 32 * u;
            if (g < ng) { a0 += dot_group<T>(w0[u], x[u], g); a1 += dot_group<T>(w1[u], x[u], g); }
        }
    }
    return make_float2(a0, a1);
}

// Q4_0 and Q8_0 rows whose length is a multiple of 16 bytes: each lane loads 16 bytes of the row at
// a time (one coalesced 128-bit load, however the 18- or 34-byte blocks fall) and multiplies them
// with activations laid out like the weight bytes: `xa` holds, at the byte position of every weight
// byte, the int8 activation that byte multiplies (for Q4_0 two planes, `plane` bytes apart: the low
// nibble's and the high nibble's), and zero under the scale bytes, so a 4-byte word of any chunk is
// one __dp4a. A 16-byte chunk touches at most two blocks; each word belongs to the block its first
// byte is in (a word that starts on a scale holds that block's qs, one that ends on a scale the
// previous block's), so a lane keeps two integer sums per row and applies the two blocks' scales.
template <int T, int U, int KS>
__device__ __forceinline__ float2 dot_rows_chunk(const u8* __restrict__ r0, const u8* __restrict__ r1, const u8* __restrict__ xa,
                                                 i64 plane, const float* __restrict__ xd, int row_bytes, int ks) {
    constexpr int BS = T == T_Q4_0 ? 18 : 34;
    const int lane = threadIdx.x & 31;
    const int nc = row_bytes / 16;
    float a0 = 0.f, a1 = 0.f;
    for (int c0 = lane + 32 * U * ks; c0 < nc; c0 += 32 * U * KS) {
        uint4 w0[U], w1[U], xl[U], xh[U];
        u16 d0f[U], d0l[U], d1f[U], d1l[U];
        float dxf[U], dxl[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int c = c0 + 32 * u;
            if (c < nc) {
                const int bf = 16 * c / BS, bl = (16 * c + 12) / BS;
                w0[u] = *(const uint4*)(r0 + 16 * c);
                w1[u] = *(const uint4*)(r1 + 16 * c);
                xl[u] = *(const uint4*)(xa + 16 * c);
                if (T == T_Q4_0) xh[u] = *(const uint4*)(xa + plane + 16 * c);
                d0f[u] = ld16(r0 + bf * BS);
                d0l[u] = ld16(r0 + bl * BS);
                d1f[u] = ld16(r1 + bf * BS);
                d1l[u] = ld16(r1 + bl * BS);
                dxf[u] = xd[bf];
                dxl[u] = xd[bl];
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int c = c0 + 32 * u;
            if (c >= nc) continue;
            const int bf = 16 * c / BS;
            const u32 wa[4] = {w0[u].x, w0[u].y, w0[u].z, w0[u].w}, wb[4] = {w1[u].x, w1[u].y, w1[u].z, w1[u].w};
            const u32 xs[4] = {xl[u].x, xl[u].y, xl[u].z, xl[u].w};
            int s0f = 0, s0l = 0, s1f = 0, s1l = 0;
#pragma unroll
            for (int m = 0; m < 4; m++) {
                int t0, t1;
                if (T == T_Q4_0) {
                    const u32 xhi = m == 0 ? xh[u].x : (m == 1 ? xh[u].y : (m == 2 ? xh[u].z : xh[u].w));
                    const int ones = __dp4a((int)xs[m], 0x01010101, __dp4a((int)xhi, 0x01010101, 0));
                    t0 = __dp4a((int)(wa[m] & 0x0F0F0F0Fu), (int)xs[m], __dp4a((int)((wa[m] >> 4) & 0x0F0F0F0Fu), (int)xhi, 0)) - 8 * ones;
                    t1 = __dp4a((int)(wb[m] & 0x0F0F0F0Fu), (int)xs[m], __dp4a((int)((wb[m] >> 4) & 0x0F0F0F0Fu), (int)xhi, 0)) - 8 * ones;
                } else {
                    t0 = __dp4a((int)wa[m], (int)xs[m], 0);
                    t1 = __dp4a((int)wb[m], (int)xs[m], 0);
                }
                if ((16 * c + 4 * m) / BS == bf) { s0f += t0; s1f += t1; } else { s0l += t0; s1l += t1; }
            }
            a0 += f16(d0f[u]) * dxf[u] * (float)s0f + f16(d0l[u]) * dxl[u] * (float)s0l;
            a1 += f16(d1f[u]) * dxf[u] * (float)s1f + f16(d1l[u]) * dxl[u] * (float)s1l;
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
__device__ __forceinline__ void rope_pair(float& a, float& b, int dd, i64 pos, const double* __restrict__ inv_freq, int n_rot) {
    if (dd >= n_rot) return;
    double s, c;
    sincos((double)pos * inv_freq[dd / 2], &s, &c);
    const float fa = a, fb = b, fc = (float)c, fs = (float)s;
    a = fa * fc - fb * fs;
    b = fa * fs + fb * fc;
}

// One launch = one product and its epilogue. Each warp owns a "pair" p:
//   STORE/ADD: rows 2p, 2p+1 of w0 (n0 rows) -> out[row] = / += dot
//   SILU:      row p of w0 (gate) and of w1 (up) -> out[p] = silu(gate) * up
//   QKV:       rows rb+2p, rb+2p+1 (< re) of [w0 (n0 rows: q); w1 (n1: k); w2 (n1: v)]: RoPE on q and k,
//              q -> out, k and v -> the layer's cache at position io[1] (kc, vc: (n_kv, n_ctx, head_dim))
struct Epilogue {
    float* out;
    float* kc;
    float* vc;
    const i64* io;               // (token, position)
    const double* inv_freq;
    int head_dim, n_rot, n_ctx;
};

enum { PATH_GROUP = 0, PATH_CHUNK = 1, PATH_ANY = 2 };

template <int T, int MODE, int U, int PATH, int KS>
__global__ void __launch_bounds__(256) mmv(const u8* __restrict__ w0, const u8* __restrict__ w1, const u8* __restrict__ w2,
        i64 ld, int n0, int n1, int cols, int rb, int re, const int* xq, const float* xd, const float* xf, const u8* xa, i64 plane,
        float* out, float* kc, float* vc, const i64* io, const double* inv_freq, int head_dim, int n_rot, int n_ctx) {
    const Input in{xq, xd, xf};
    const Epilogue ep{out, kc, vc, io, inv_freq, head_dim, n_rot, n_ctx};
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    const int p = blockIdx.x * (8 / KS) + warp / KS, ks = warp % KS;  // 8 warps: 8/KS row pairs, KS warps each
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
    float2 s = make_float2(0.f, 0.f);
    if (valid) {
        if constexpr (PATH == PATH_ANY) s = dot_rows_any<T>(r0, r1, in.f, cols);
        else if constexpr (PATH == PATH_CHUNK && (T == T_Q4_0 || T == T_Q8_0)) s = dot_rows_chunk<T, U, KS>(r0, r1, xa, plane, in.d, (int)ld, ks);
        else s = dot_rows<T, U, KS>(r0, r1, in, cols, ks);
    }
    s.x = warp_sum(s.x);
    s.y = warp_sum(s.y);
    if constexpr (KS > 1) {  // add up the stripes of each pair
        __shared__ float2 part[8];
        if (lane == 0) part[warp] = s;
        __syncthreads();
        if (ks == 0) for (int k = 1; k < KS; k++) { s.x += part[warp + k].x; s.y += part[warp + k].y; }
    }
    if (!valid || ks != 0 || lane != 0) return;
    if (MODE == MODE_STORE) {
        ep.out[row] = s.x;
        if (row + 1 < n0) ep.out[row + 1] = s.y;
    } else if (MODE == MODE_ADD) {
        ep.out[row] += s.x;
        if (row + 1 < n0) ep.out[row + 1] += s.y;
    } else if (MODE == MODE_SILU) {
        ep.out[p] = s.x / (1.f + expf(-s.x)) * s.y;
    } else {
        const i64 pos = ep.io[1];
        const int r = row < n0 ? row : (row < n0 + n1 ? row - n0 : row - n0 - n1);
        const int dd = r % ep.head_dim, head = r / ep.head_dim;
        if (row < n0 + n1) rope_pair(s.x, s.y, dd, pos, ep.inv_freq, ep.n_rot);
        float* dst = row < n0 ? ep.out + r : (row < n0 + n1 ? ep.kc : ep.vc) + ((i64)head * ep.n_ctx + pos) * ep.head_dim + dd;
        dst[0] = s.x;
        dst[1] = s.y;
    }
}

// ------------------------------------------------------------------------- small decode ops
// x (n) -> int8 blocks of 32: d = amax/127, q = round-half-away(x/d). One warp per block.
// Element i of the input also goes where the chunked products read it (dot_rows_chunk): a4 (Q4_0:
// two planes, `plane` bytes apart) and a8 (Q8_0); the scale positions there stay zero.
struct Arranged { u8* a4; i64 plane; u8* a8; };

__device__ __forceinline__ void quantize_block(float v, int i, signed char* __restrict__ q, float* __restrict__ d, Arranged ar) {
    const float amax = warp_max(fabsf(v));
    const float dd = amax / 127.f;
    const float inv = dd == 0.f ? 0.f : 1.f / dd;
    const float t = v * inv;
    const signed char qi = (signed char)copysignf(floorf(fabsf(t) + 0.5f), t);
    const int b = i / QK, j = i % QK;
    q[i] = qi;
    if ((threadIdx.x & 31) == 0) d[b] = dd;
    if (ar.a4 != nullptr) ar.a4[(j < 16 ? 0 : ar.plane) + b * 18 + 2 + (j & 15)] = (u8)qi;
    if (ar.a8 != nullptr) ar.a8[b * 34 + 2 + j] = (u8)qi;
}

extern "C" __global__ void quantize_q8(const float* __restrict__ x, int n, signed char* __restrict__ q, float* __restrict__ d,
                                       u8* a4, i64 plane, u8* a8) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i - (threadIdx.x & 31) >= n) return;  // whole warps only: n % 32 == 0
    quantize_block(x[i], i, q, d, Arranged{a4, plane, a8});
}

// RMSNorm of `rows` rows of n, one block per row; with q != nullptr also the int8 blocks of the result.
extern "C" __global__ void rmsnorm(const float* __restrict__ x, const float* __restrict__ w, float eps, int n,
                                   float* __restrict__ out, signed char* __restrict__ q, float* __restrict__ d,
                                   u8* a4, i64 plane, u8* a8) {
    __shared__ float part[32];
    const float* xr = x + (i64)blockIdx.x * n;
    float ss = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) ss += xr[i] * xr[i];
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x / 32] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        float t = threadIdx.x < blockDim.x / 32 ? part[threadIdx.x] : 0.f;
        t = warp_sum(t);
        if (threadIdx.x == 0) part[0] = t;
    }
    __syncthreads();
    const float scale = rsqrtf(part[0] / n + eps);
    float* o = out + (i64)blockIdx.x * n;
    for (int i0 = 0; i0 < n; i0 += blockDim.x) {  // blockDim.x is a multiple of 32, so warps stay whole
        const int i = i0 + threadIdx.x;
        const float v = i < n ? xr[i] * scale * w[i] : 0.f;
        if (i < n) o[i] = v;
        if (q != nullptr && i0 + (threadIdx.x & ~31) < n) quantize_block(v, i, q, d, Arranged{a4, plane, a8});  // one row
    }
}

// Decode attention, split over the keys: block (h, s) takes keys [s*chunk, (s+1)*chunk) of the
// n = io[1]+1 in the cache, one warp per key at a time with an online softmax, and writes its
// partial (max, sum, unnormalised output) for attn_combine. head_dim <= 256.
#define ATT_WARPS 4
extern "C" __global__ void __launch_bounds__(128) attn_partial(const float* __restrict__ q, const float* __restrict__ kc,
        const float* __restrict__ vc, const i64* __restrict__ io, int n_ctx, int head_dim, int group, float scale,
        float* __restrict__ part) {
    const int h = blockIdx.x, s = blockIdx.y, n_split = gridDim.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    const int n = (int)io[1] + 1;
    const int chunk = (n + n_split - 1) / n_split;
    const int t0 = s * chunk, t1 = min(n, t0 + chunk);
    const int per = (head_dim + 31) / 32;
    float qv[8], acc[8];
    for (int e = 0; e < 8; e++) {
        const int dd = lane + 32 * e;
        qv[e] = (e < per && dd < head_dim) ? q[h * head_dim + dd] * scale : 0.f;
        acc[e] = 0.f;
    }
    const float* K = kc + (i64)(h / group) * n_ctx * head_dim;
    const float* V = vc + (i64)(h / group) * n_ctx * head_dim;
    float m = NEG_INF, l = 0.f;
    for (int t = t0 + warp; t < t1; t += ATT_WARPS) {
        float sc = 0.f;
        for (int e = 0; e < per; e++) {
            const int dd = lane + 32 * e;
            if (dd < head_dim) sc += qv[e] * K[(i64)t * head_dim + dd];
        }
        sc = warp_sum(sc);
        const float mn = fmaxf(m, sc), c = expf(m - mn), pr = expf(sc - mn);
        l = l * c + pr;
        for (int e = 0; e < per; e++) {
            const int dd = lane + 32 * e;
            acc[e] = acc[e] * c + (dd < head_dim ? pr * V[(i64)t * head_dim + dd] : 0.f);
        }
        m = mn;
    }
    // combine the warps of this block
    __shared__ float sm[ATT_WARPS], sl[ATT_WARPS], sacc[ATT_WARPS][256];
    if (lane == 0) { sm[warp] = m; sl[warp] = l; }
    for (int e = 0; e < per; e++) {
        const int dd = lane + 32 * e;
        if (dd < head_dim) sacc[warp][dd] = acc[e];
    }
    __syncthreads();
    float M = NEG_INF;
    for (int w = 0; w < ATT_WARPS; w++) M = fmaxf(M, sm[w]);
    float* out = part + ((i64)h * n_split + s) * (head_dim + 2);
    for (int dd = threadIdx.x; dd < head_dim; dd += blockDim.x) {
        float v = 0.f;
        for (int w = 0; w < ATT_WARPS; w++) if (sm[w] > NEG_INF) v += sacc[w][dd] * expf(sm[w] - M);
        out[2 + dd] = v;
    }
    if (threadIdx.x == 0) {
        float L = 0.f;
        for (int w = 0; w < ATT_WARPS; w++) if (sm[w] > NEG_INF) L += sl[w] * expf(sm[w] - M);
        out[0] = M;
        out[1] = L;
    }
}

// Merge the splits of each head: out[h*head_dim + d]; with q != nullptr (head_dim % 32 == 0) also
// the int8 blocks of the output for the next product.
extern "C" __global__ void attn_combine(const float* __restrict__ part, int n_split, int head_dim, float* __restrict__ out,
                                       signed char* __restrict__ q, float* __restrict__ d, u8* a4, i64 plane, u8* a8) {
    const int h = blockIdx.x;
    const float* p = part + (i64)h * n_split * (head_dim + 2);
    float M = NEG_INF;
    for (int s = 0; s < n_split; s++) M = fmaxf(M, p[s * (head_dim + 2)]);
    float L = 0.f;
    for (int s = 0; s < n_split; s++) {
        const float m = p[s * (head_dim + 2)];
        if (m > NEG_INF) L += p[s * (head_dim + 2) + 1] * expf(m - M);
    }
    for (int i0 = 0; i0 < head_dim; i0 += blockDim.x) {
        const int dd = i0 + threadIdx.x;
        float v = 0.f;
        if (dd < head_dim) {
            for (int s = 0; s < n_split; s++) {
                const float m = p[s * (head_dim + 2)];
                if (m > NEG_INF) v += p[s * (head_dim + 2) + 2 + dd] * expf(m - M);
            }
            v /= L;
            out[h * head_dim + dd] = v;
        }
        if (q != nullptr && i0 + (threadIdx.x & ~31) < head_dim) quantize_block(v, h * head_dim + dd, q, d, Arranged{a4, plane, a8});
    }
}

// ---------------------------------------------------------------------- gathers and batches
// out[i, :] = row ids[i] of w, dequantized; ids are int64 (for one token: io[0]).
template <int T>
__global__ void get_rows(const u8* __restrict__ w, i64 ld, const i64* __restrict__ ids, int cols, float* __restrict__ out) {
    const u8* row = w + ids[blockIdx.y] * ld;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < cols; i += gridDim.x * blockDim.x)
        out[(i64)blockIdx.y * cols + i] = dequant<T>(row, i);
}

// The whole matrix as fp16 for the tensor-core product of a prompt batch (a scratch tile, reused).
template <int T>
__global__ void dequant_f16(const u8* __restrict__ w, i64 ld, int cols, __half* __restrict__ out) {
    const u8* row = w + (i64)blockIdx.y * ld;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < cols; i += gridDim.x * blockDim.x)
        out[(i64)blockIdx.y * cols + i] = __float2half(dequant<T>(row, i));
}

// RoPE in place on x (n_tok, n_heads, head_dim) at positions pos[t]; one thread per pair.
extern "C" __global__ void rope(float* __restrict__ x, const i64* __restrict__ pos, int n_tok, int n_heads, int head_dim,
                                const double* __restrict__ inv_freq, int n_rot) {
    const i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x;  // pair index
    const int pairs = head_dim / 2;
    if (i >= (i64)n_tok * n_heads * pairs) return;
    const int t = (int)(i / ((i64)n_heads * pairs));
    const int dd = (int)(i % pairs) * 2;
    float* p = x + i * 2;
    float a = p[0], b = p[1];
    rope_pair(a, b, dd, pos[t], inv_freq, n_rot);
    p[0] = a;
    p[1] = b;
}

// Causal softmax of scores (rows, L) in place: row r is query (r % n_tok) at position start + r % n_tok.
extern "C" __global__ void causal_softmax(float* __restrict__ s, int n_tok, int L, int start) {
    __shared__ float red[32];
    float* row = s + (i64)blockIdx.x * L;
    const int last = start + (int)(blockIdx.x % n_tok);  // keys 0..last are visible
    float m = NEG_INF;
    for (int j = threadIdx.x; j <= last && j < L; j += blockDim.x) m = fmaxf(m, row[j]);
    m = warp_max(m);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x / 32] = m;
    __syncthreads();
    m = NEG_INF;
    for (int w = 0; w < (int)blockDim.x / 32; w++) m = fmaxf(m, red[w]);
    __syncthreads();
    float sum = 0.f;
    for (int j = threadIdx.x; j < L; j += blockDim.x) {
        const float e = j <= last ? expf(row[j] - m) : 0.f;
        row[j] = e;
        sum += e;
    }
    sum = warp_sum(sum);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x / 32] = sum;
    __syncthreads();
    sum = 0.f;
    for (int w = 0; w < (int)blockDim.x / 32; w++) sum += red[w];
    const float inv = 1.f / sum;
    for (int j = threadIdx.x; j < L; j += blockDim.x) row[j] *= inv;
}

extern "C" __global__ void silu_mul(const float* g, const float* u, i64 n, float* out) {
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        out[i] = g[i] / (1.f + expf(-g[i])) * u[i];
}
