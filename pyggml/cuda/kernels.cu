// pyggml's CUDA kernels, compiled once by cupy (NVRTC) and cached on disk; backend.py drives them.
//
// Weights stay in their GGUF block layout in device memory (the file's bytes, row after row);
// every kernel that reads a weight dequantizes it on the fly. Type codes: pyggml/quant/registry.py.
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

// The weight type codes (T_F32, T_Q4_K, ...) and IQ4NL_VALUES are not written here: backend.py
// prepends them, generated from the weight-type registry (pyggml/quant/registry.py).
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
// Programmatic dependent launch (sm_90+): the decode graph launches each kernel while the one
// before it still runs. pdl_trigger lets the next kernel's blocks start; pdl_wait blocks until the
// previous kernel has finished and its writes are visible, so every kernel calls it before it reads
// or writes anything another kernel of the step touches. Launched the ordinary way, both are no-ops.
// (Tried before the wait, all slower or no gain: prefetching every product's weight rows to L2
// (2-15% slower), only wo's while attention runs (f16 +60 us per 7B token), the KV cache to L2;
// loading the first step's weights into registers with a peeled loop, or double-buffered, or for
// the int8 products; copying a float product's first steps into shared memory (cp.async), +6 to
// +190 us per f16 token. What helps: attention loading its first keys and values into registers
// before the wait, and the float products their first step (mmv), each triggering at its start.)
// Waiting instead on a counter that every block of the previous product bumps after its stores
// was slower: +4 to +6 us a 7B f16 layer of four chained products. So was running the attention in
// the output projection's blocks, which then waited on a count of finished heads (one kernel
// fewer a layer): 7B f16 3418 -> 3502 us a token, q4_0 1698 -> 1744. Asking only a warp's next
// step of weight rows into L2 before the wait: f16 3421 -> 3591.
__device__ __forceinline__ void pdl_trigger() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Bit k (k < 4) of t moves to bit 0 of byte k: 4 high bits of Q5_0 become byte-wise bits.
__device__ __forceinline__ u32 spread4(u32 t) { return (t * 0x00204081u) & 0x01010101u; }

// ------------------------------------------------------------------------------------- decode
template <int T> struct no_decoder { static constexpr bool value = false; };

// Scale and min j (< 8) of a Q4_K / Q5_K super-block: 6 bits each, packed in 12 bytes.
__device__ __forceinline__ void scale_min_k4(int j, const u8* __restrict__ q, int& sc, int& m) {
    if (j < 4) {
        sc = q[j] & 63;
        m = q[j + 4] & 63;
    } else {
        sc = (q[j + 4] & 15) | ((q[j - 4] >> 6) << 4);
        m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// One weight of row `row` at column i, any computable type (the slow, general path). Every type
// code has its branch; a code without one does not compile.
template <int T>
__device__ __forceinline__ float dequant(const u8* __restrict__ row, int i) {
    if constexpr (T == T_F32) return ((const float*)row)[i];
    else if constexpr (T == T_F16) return f16(((const u16*)row)[i]);
    else if constexpr (T == T_BF16) return __uint_as_float((u32)((const u16*)row)[i] << 16);
    else if constexpr (T == T_Q4_0 || T == T_Q4_1 || T == T_IQ4_NL) {  // d, [m], qs[16]
        const int b = i / QK, j = i % QK;
        const u8* blk = row + b * (T == T_Q4_1 ? 20 : 18);
        const u8* qs = blk + (T == T_Q4_1 ? 4 : 2);
        const int q = j < 16 ? (qs[j] & 15) : (qs[j - 16] >> 4);
        if constexpr (T == T_Q4_0) return f16(ld16(blk)) * (float)(q - 8);
        else if constexpr (T == T_Q4_1) return f16(ld16(blk)) * (float)q + f16(ld16(blk + 2));
        else return f16(ld16(blk)) * (float)IQ4NL_VALUES[q];
    } else if constexpr (T == T_Q5_0 || T == T_Q5_1) {  // d, [m], qh, qs[16]
        const int b = i / QK, j = i % QK, lead = T == T_Q5_1 ? 4 : 2;
        const u8* blk = row + b * (T == T_Q5_1 ? 24 : 22);
        const u32 qh = ld32(blk + lead);
        const int q = blk[lead + 4 + (j & 15)];
        const int n = (j < 16 ? (q & 15) : (q >> 4)) | (((qh >> j) & 1) << 4);
        if constexpr (T == T_Q5_0) return f16(ld16(blk)) * (float)(n - 16);
        else return f16(ld16(blk)) * (float)n + f16(ld16(blk + 2));
    } else if constexpr (T == T_Q8_0) {
        const u8* blk = row + (i / QK) * 34;
        return f16(ld16(blk)) * (float)(signed char)blk[2 + i % QK];
    } else if constexpr (T == T_Q6_K) {
        // super-blocks of 256: ql[128] qh[64] scales[16] d; two halves of 128, each 4 groups of 32
        const u8* blk = row + (i / QK_K) * 210;
        const int k = i % QK_K, half = k / 128, g = (k % 128) / 32, l = k % 32;
        const u8* ql = blk + 64 * half;
        const int h = blk[128 + 32 * half + l];
        const int lo = (g & 1) ? ql[l + 32] : ql[l];
        const int q = ((g < 2 ? (lo & 15) : (lo >> 4)) | (((h >> (2 * g)) & 3) << 4)) - 32;
        const int scale = (signed char)blk[192 + 8 * half + l / 16 + 2 * g];
        return f16(ld16(blk + 208)) * (float)(scale * q);
    } else if constexpr (T == T_Q2_K) {
        // scales[16] (low 4 bits: scale, high: min), qs[64], d, dmin; halves of 128, 4 shifts of 32
        const u8* blk = row + (i / QK_K) * 84;
        const int k = i % QK_K, half = k / 128, j = (k % 128) / 32, l = k % 32;
        const int sc = blk[8 * half + 2 * j + l / 16];
        const int q = (blk[16 + 32 * half + l] >> (2 * j)) & 3;
        return f16(ld16(blk + 80)) * (float)(sc & 15) * (float)q - f16(ld16(blk + 82)) * (float)(sc >> 4);
    } else if constexpr (T == T_Q3_K) {
        // hmask[32], qs[64], scales[12] (16 x 6 bits, minus 32), d; halves of 128, 4 shifts of 32
        const u8* blk = row + (i / QK_K) * 110;
        const int k = i % QK_K, half = k / 128, j = (k % 128) / 32, l = k % 32;
        const int si = 8 * half + 2 * j + l / 16;
        const u8* sc = blk + 96;
        const int lo = si < 8 ? (sc[si] & 15) : (sc[si - 8] >> 4);
        const int s = (lo | (((sc[8 + si % 4] >> (2 * (si / 4))) & 3) << 4)) - 32;
        const int q = ((blk[32 + 32 * half + l] >> (2 * j)) & 3) - ((blk[l] >> (4 * half + j)) & 1 ? 0 : 4);
        return f16(ld16(blk + 108)) * (float)s * (float)q;
    } else if constexpr (T == T_Q4_K || T == T_Q5_K) {
        // d, dmin, scales[12], [qh[32]], qs[128]: 4 chunks of 64, low nibbles then high ones
        const u8* blk = row + (i / QK_K) * (T == T_Q4_K ? 144 : 176);
        const int k = i % QK_K, c = k / 64, hi = (k % 64) / 32, l = k % 32;
        int sc, m;
        scale_min_k4(2 * c + hi, blk + 4, sc, m);
        const u8 b = blk[(T == T_Q4_K ? 16 : 48) + 32 * c + l];
        int q = hi ? (b >> 4) : (b & 15);
        if constexpr (T == T_Q5_K) q += ((blk[16 + l] >> (2 * c + hi)) & 1) << 4;
        return f16(ld16(blk)) * (float)sc * (float)q - f16(ld16(blk + 2)) * (float)m;
    } else if constexpr (T == T_IQ4_XS) {
        // d, scales_h (u16), scales_l[4], qs[128]: 8 blocks of 32 with 6-bit scales (minus 32)
        const u8* blk = row + (i / QK_K) * 136;
        const int k = i % QK_K, ib = k / 32, j = k % 32;
        const int ls = ((blk[4 + ib / 2] >> (4 * (ib % 2))) & 15) | (((ld16(blk + 2) >> (2 * ib)) & 3) << 4);
        const u8 b = blk[8 + 16 * ib + (j & 15)];
        return f16(ld16(blk)) * (float)(ls - 32) * (float)IQ4NL_VALUES[j < 16 ? (b & 15) : (b >> 4)];
    } else {
        static_assert(no_decoder<T>::value, "dequant: no decoder for this weight type code");
        return 0.f;
    }
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
    } else if constexpr (T == T_Q8_0) {
        const u8* blk = row + b * 34;
        w.d = ld16(blk);
        w.v0 = ld32(blk + 2 + 8 * j);
        w.v1 = ld32(blk + 6 + 8 * j);
    } else {
        static_assert(no_decoder<T>::value, "load_wq: no int8 path for this weight type code");
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
    } else if constexpr (T == T_Q8_0) {
        s = __dp4a((int)w.v0, x.a, __dp4a((int)w.v1, x.b, 0));
    } else {
        static_assert(no_decoder<T>::value, "dot_q: no int8 path for this weight type code");
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
// The weights of one step of a lane: groups g0, g0 + 32, ... (U of them, below ng) of both rows.
template <int T, int U, class W>
__device__ __forceinline__ void load_step(const u8* __restrict__ r0, const u8* __restrict__ r1, int ng, int g0, W (&w0)[U], W (&w1)[U]) {
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int g = g0 + 32 * u;
        if (g < ng) { w0[u] = load_w<T>(r0, g); w1[u] = load_w<T>(r1, g); }
    }
}

// A warp's first step: mmv loads it before it waits for the kernel before it (the weights do not
// depend on that kernel), and dot_rows starts from it.
template <int T, int U, class W>
__device__ __forceinline__ void first_step(const u8* __restrict__ r0, const u8* __restrict__ r1, int cols, int ks, W (&w0)[U], W (&w1)[U]) {
    load_step<T, U>(r0, r1, cols / 8, (threadIdx.x & 31) + 32 * U * ks, w0, w1);
}

template <int T, bool GROUP> struct FirstStep { typedef int type; };  // what mmv holds of the first step
template <int T> struct FirstStep<T, true> { typedef decltype(load_w<T>(nullptr, 0)) type; };

// With HAVE_FIRST, w0 and w1 hold the first step already (first_step); else dot_rows loads every step.
template <int T, int U, int KS, bool HAVE_FIRST, class W>
__device__ __forceinline__ float2 dot_rows(const u8* __restrict__ r0, const u8* __restrict__ r1, const Input& in, int cols, int ks,
                                           W (&w0)[U], W (&w1)[U]) {
    const int lane = threadIdx.x & 31;
    const int ng = cols / 8, first = lane + 32 * U * ks;
    float a0 = 0.f, a1 = 0.f;
    for (int g0 = first; g0 < ng; g0 += 32 * U * KS) {
        decltype(load_x<T>(in, 0)) x[U];
        if constexpr (HAVE_FIRST) {  // one branch around the step's weight loads (one per group: f16 4494 us a token)
            if (g0 != first) load_step<T, U>(r0, r1, ng, g0, w0, w1);
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int g = g0 + 32 * u;
                if (g < ng) x[u] = load_x<T>(in, g);
            }
        } else {  // weights and activations group by group (Q5_0 4281 us a token the other way, 4016 this way)
#pragma unroll
            for (int u = 0; u < U; u++) {
                const int g = g0 + 32 * u;
                if (g < ng) { x[u] = load_x<T>(in, g); w0[u] = load_w<T>(r0, g); w1[u] = load_w<T>(r1, g); }
            }
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

// 4-bit indices (one per byte of q, each < 16) -> the IQ4_NL values they name, as 4 int8s.
__device__ __forceinline__ int iq4_values(u32 q) {
    const u32* t = (const u32*)IQ4NL_VALUES;
    const u32 sel = (q & 7u) | ((q >> 4) & 0x70u) | ((q >> 8) & 0x700u) | ((q >> 12) & 0x7000u);
    const u32 lo = __byte_perm(t[0], t[1], sel), hi = __byte_perm(t[2], t[3], sel);
    const u32 pick = ((q >> 3) & 0x01010101u) * 0xFFu;  // bytes whose index is >= 8
    return (int)((hi & pick) | (lo & ~pick));
}

// scale_min_k4 on the 12 scale bytes held in registers: a = bytes 0-3, b = 4-7, c = 8-11.
__device__ __forceinline__ void scale_min_k4_regs(int j, u32 a, u32 b, u32 c, int& sc, int& m) {
    const int sh = 8 * (j & 3);
    const int ya = (a >> sh) & 255, yb = (b >> sh) & 255;
    if (j < 4) {
        sc = ya & 63;
        m = yb & 63;
    } else {
        const int yc = (c >> sh) & 255;
        sc = (yc & 15) | ((ya >> 6) << 4);
        m = (yc >> 4) | ((yb >> 6) << 4);
    }
}

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
//   with q != nullptr, y's int8 blocks (and arranged copies) for an int8 product.
// (Folding SwiGLU's int8 quantization too, whose 32-row groups come from four blocks, through a
// global counter per group: 100 us per 7B token slower than its own kernel.)
struct Fold {
    const float* nw;
    float* y;
    signed char* q;
    float* d;
    u8* a4;
    i64 plane;
    u8* a8;
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
    if (f.q != nullptr) quantize_block(v, i, f.q, f.d, Arranged{f.a4, f.plane, f.a8});
}

enum { PATH_GROUP = 0, PATH_CHUNK = 1, PATH_ANY = 2, PATH_WIDE = 3 };

#define ADD_WARPS 16  // an ADD product with KS == 1: 32 rows per block, one group to fold

// nss != nullptr: the input is a deferred RMSNorm's y (see Fold), and nss the sums of squares of
// its ceil(cols / 32) groups; the dot products are scaled by rsqrt(mean square + eps).

template <int T, int MODE, int U, int PATH, int KS>
__global__ void __launch_bounds__(MODE == MODE_ADD && KS == 1 ? 32 * ADD_WARPS : 256) mmv(const u8* __restrict__ w0, const u8* __restrict__ w1, const u8* __restrict__ w2,
        i64 ld, int n0, int n1, int cols, int rb, int re, const int* xq, const float* xd, const float* xf, const u8* xa, i64 plane,
        const float* nss, float eps, float* out, u8* kc, u8* vc, const i64* io, const double* inv_freq, int head_dim,
        int n_rot, int n_ctx, int kv_codes, float* stage, const float* bias, float* raw_qk, const float* fnw, float* fy, signed char* fq, float* fd, u8* fa4, i64 fplane, u8* fa8, float* fss) {
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
        else if constexpr (PATH == PATH_CHUNK && (T == T_Q4_0 || T == T_Q8_0)) s = dot_rows_chunk<T, U, KS>(r0, r1, xa, plane, in.d, (int)ld, ks);
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
    const Fold fold{fnw, fy, fq, fd, fa4, fplane, fa8, fss};
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

// ------------------------------------------------------------------------- small decode ops
extern "C" __global__ void quantize_q8(const float* __restrict__ x, int n, signed char* __restrict__ q, float* __restrict__ d,
                                       u8* a4, i64 plane, u8* a8) {
    pdl_trigger();
    pdl_wait();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i - (threadIdx.x & 31) >= n) return;  // whole warps only: n % 32 == 0
    quantize_block(x[i], i, q, d, Arranged{a4, plane, a8});
}

// The rest of a decode step's QKV product when q and k have per-head RMSNorms (qwen3): warp h of the
// n_heads + n_kv_heads heads takes the head's rows from raw (the product's, biases added: q heads,
// then k heads), normalises them with the weight qw or kw, rotates them (RoPE) and stores q into q_out,
// k as the epilogue would (store_kv_pair: the cache or the stage).
extern "C" __global__ void qk_norm_rope(const float* __restrict__ raw, int n_heads, int n_kv, const float* __restrict__ qw,
        const float* __restrict__ kw, float eps, float* q_out, u8* kc, float* stage, const i64* io, const double* inv_freq,
        int head_dim, int n_rot, int n_ctx, int kv_codes) {
    pdl_trigger();
    pdl_wait();
    const int h = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x & 31;
    if (h >= n_heads + n_kv) return;
    const bool is_k = h >= n_heads;
    const float* x = raw + (i64)h * head_dim;
    const float* w = is_k ? kw : qw;
    float ss = 0.f;
    for (int i = lane; i < head_dim; i += 32) ss += x[i] * x[i];
    const float scale = rsqrtf(warp_sum(ss) / head_dim + eps);
    const Epilogue ep{q_out, kc, nullptr, io, inv_freq, head_dim, n_rot, n_ctx, kv_codes, stage, nullptr, nullptr};
    const i64 pos = io[1];
    const int r0 = (is_k ? h - n_heads : h) * head_dim;
    for (int dd = 2 * lane; dd < head_dim; dd += 64) {
        float a = x[dd] * scale * w[dd], b = x[dd + 1] * scale * w[dd + 1];
        rope_pair(a, b, dd, pos, inv_freq, n_rot);
        if (is_k) {
            store_kv_pair(ep, true, r0 + dd, n_kv * head_dim, pos, a, b);
        } else {
            q_out[r0 + dd] = a;
            q_out[r0 + dd + 1] = b;
        }
    }
}

// RMSNorm of `rows` rows of n (a prompt batch), one block per row.
extern "C" __global__ void rmsnorm(const float* __restrict__ x, const float* __restrict__ w, float eps, int n, float* __restrict__ out) {
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
    for (int i = threadIdx.x; i < n; i += blockDim.x) o[i] = xr[i] * scale * w[i];
}

// RMSNorm of one row (a decode step), spread over blocks of 256: each block sums the squares of the
// whole row (16 KB at most, from L2), then normalises its own 256 elements and, with q != nullptr
// (n % 32 == 0), quantizes them to int8 blocks for the next product.
extern "C" __global__ void __launch_bounds__(256) rmsnorm_row(const float* __restrict__ x, const float* __restrict__ w, float eps,
        int n, float* __restrict__ out, signed char* __restrict__ q, float* __restrict__ d, u8* a4, i64 plane, u8* a8) {
    __shared__ float part[8];
    pdl_trigger();
    const int i = blockIdx.x * 256 + threadIdx.x;
    const float wi = i < n ? w[i] : 0.f;  // the norm's weight is constant: read it before the wait
    pdl_wait();
    float ss = 0.f;
    if (n % 4 == 0) {
        const float4* x4 = (const float4*)x;
#pragma unroll 4
        for (int k = threadIdx.x; k < n / 4; k += 256) {
            const float4 v = x4[k];
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
    } else {
#pragma unroll 4
        for (int k = threadIdx.x; k < n; k += 256) ss += x[k] * x[k];
    }
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x / 32] = ss;
    __syncthreads();
    float total = 0.f;
#pragma unroll
    for (int k = 0; k < 8; k++) total += part[k];
    const float v = i < n ? x[i] * rsqrtf(total / n + eps) * wi : 0.f;
    if (i < n) out[i] = v;
    if (q != nullptr && i - (int)(threadIdx.x & 31) < n) quantize_block(v, i, q, d, Arranged{a4, plane, a8});
}

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
        if constexpr (PER == 8) {
            const float4 a = ((const float4*)(row + d0))[0], b = ((const float4*)(row + d0))[1];
            x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w; x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
        } else if constexpr (PER == 4) {
            const float4 a = *(const float4*)(row + d0);
            x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
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
    if constexpr (KV == KV_F32) {
        const float* p = (const float*)row + d0;
        if constexpr (PER == 8) {
            const uint4 a = ((const uint4*)p)[0], b = ((const uint4*)p)[1];
            r.w[0] = a.x; r.w[1] = a.y; r.w[2] = a.z; r.w[3] = a.w; r.w[4] = b.x; r.w[5] = b.y; r.w[6] = b.z; r.w[7] = b.w;
        } else if constexpr (PER == 4) {
            const uint4 a = *(const uint4*)p;
            r.w[0] = a.x; r.w[1] = a.y; r.w[2] = a.z; r.w[3] = a.w;
        } else if constexpr (PER == 2) {
            const uint2 a = *(const uint2*)p;
            r.w[0] = a.x; r.w[1] = a.y;
        } else {
            r.w[0] = *(const u32*)p;
        }
    } else if constexpr (KV == KV_F16) {
        const u8* p = row + 2 * d0;
        if constexpr (PER == 8) {
            const uint4 a = *(const uint4*)p;
            r.w[0] = a.x; r.w[1] = a.y; r.w[2] = a.z; r.w[3] = a.w;
        } else if constexpr (PER == 4) {
            const uint2 a = *(const uint2*)p;
            r.w[0] = a.x; r.w[1] = a.y;
        } else if constexpr (PER == 2) {
            r.w[0] = *(const u32*)p;
        } else {
            r.w[0] = *(const u16*)p;
        }
    } else if constexpr (KV == KV_Q8_0 || KV == KV_Q4_0) {
        constexpr int BS = KV == KV_Q8_0 ? 34 : 18;
        const u8* blk = row + (d0 / QK) * BS;
        const u8* qs = blk + 2 + (KV == KV_Q8_0 ? d0 % QK : (d0 % QK) & 15);  // 2-byte aligned
        r.d = ld16(blk);
        if constexpr (PER >= 4) r.w[0] = ld32(qs);
        if constexpr (PER == 8) r.w[1] = ld32(qs + 4);
        if constexpr (PER == 2) r.w[0] = ld16(qs);
        if constexpr (PER == 1) r.w[0] = qs[0];
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

// The floats of a raw share (a zeroed one gives zeros).
template <int KV, int PER>
__device__ __forceinline__ void decode_raw(const RawRow<KV, PER>& r, int d0, float (&x)[PER]) {
    if constexpr (KV == KV_F32) {
#pragma unroll
        for (int e = 0; e < PER; e++) x[e] = __uint_as_float(r.w[e]);
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
    } else if constexpr (KV == KV_Q8_0) {
        const float d = f16((u16)r.d);
#pragma unroll
        for (int e = 0; e < PER; e++) x[e] = byte_value(r.w[e / 4] ^ 0x80808080u, e % 4, 8388736.f) * d;  // q + 128 - 128
    } else {
        const float d = f16((u16)r.d);
        const int sh = d0 % QK < 16 ? 0 : 4;  // elements 16..31 of a block are the high nibbles
#pragma unroll
        for (int e = 0; e < PER; e++) x[e] = byte_value((r.w[e / 4] >> sh) & 0x0F0F0F0Fu, e % 4, 8388616.f) * d;  // q - 8
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

// Decode attention for the n = io[1]+1 keys in the cache. The keys are cut into n_active ranges
// (attn_ranges), one block of ATT_WARPS warps per (head, range); blocks past n_active return at
// once. Lane l holds dimensions l*PER .. l*PER+PER-1 of the head (PER = head_dim / 32 rounded up to
// a power of two). Warp w takes keys w, w+ATT_WARPS, ... of the range, KB at a time: it loads their
// K and V rows together, raw (one memory latency per batch, not per key; KB is as many as ~64
// registers hold: 32/PER f32 rows, twice as many f16 ones), decodes each as it uses it, reduces the
// KB scores across the lanes at once and folds them into its running (max, sum, output); then the
// warps merge. With n_active == 1 the block writes the normalised output (and its
// int8 blocks) itself. Otherwise each block leaves its (max, sum, unnormalised output) in `part` and
// counts itself in cnt[head]; the last block of the head merges the ranges (merge_ranges).
// head_dim <= 256. 16 warps, not 8: a 7B head's range of up to 128 keys is one batch per warp
// (graph replay at 66 keys 3556 -> 3541 us per f16 token).
#define ATT_WARPS 16
#define ATT_RANGE 128  // keys per range when attn_ranges counts the ranges

// One range up to 2 * ATT_RANGE keys (a warp's second batch costs less than merging ranges), else
// min(n_split, ceil(n / ATT_RANGE)). backend.py (attn_splits) keeps n_split at most SMs / heads, so
// the blocks in use run in one wave. 7B graph replay, us per token, before (ranges of 128, up to 16
// a head) -> after: q4_0 at n = 129: 1791 -> 1734, 256: 1831 -> 1791, 513: 1991 -> 1906,
// 1025: 2198 -> 2042, 2048: 2521 -> 2267, 4096: 2923 -> 2753; f16 at 129: 3560 -> 3517,
// 1025: 3956 -> 3805, 4096: 4689 -> 4477; equal up to 128 and from 257 to 512 keys. The grid keeps
// ATT_SPLITS blocks a head (gridDim.y), the ones past n_active returning at once: with only n_split
// a head, the next product launched earlier and its first loads slowed the step down (f16 at
// n = 65: 3457 -> 3491).
__device__ __forceinline__ int attn_ranges(int n, int n_split) {
    return n <= 2 * ATT_RANGE ? 1 : min(n_split, (n + ATT_RANGE - 1) / ATT_RANGE);
}

// A lane's raw share of row t (fetch_row), also where its dimensions straddle the end of an odd
// head size: f32 and f16 values then come one by one (a float read from f16 storage is a half again).
template <int KV, int PER>
__device__ __forceinline__ void fetch_any(const u8* __restrict__ row, int lane, int head_dim, RawRow<KV, PER>& r) {
    const int d0 = lane * PER;
    if (d0 + PER <= head_dim && head_dim % PER == 0) {
        fetch_row<KV, PER>(row, d0, r);
    } else if constexpr (KV == KV_F32 || KV == KV_F16) {
        zero_raw(r);
#pragma unroll
        for (int e = 0; e < PER; e++) {
            const float x = d0 + e < head_dim ? kv_elem<KV>(row, d0 + e) : 0.f;
            if constexpr (KV == KV_F32) r.w[e] = __float_as_uint(x);
            else r.w[e / 2] |= (u32)__half_as_ushort(__float2half_rn(x)) << (16 * (e % 2));
        }
    } else {
        zero_raw(r);  // blocks of 32: a lane's dimensions never straddle the end
    }
}

// Keys and values tb, tb + ATT_WARPS, ... (KB of them) below t1, but for `skip`, raw (zero past t1):
// every load of the batch is issued before any is used.
template <int PER, int KB, int TK, int TV>
__device__ __forceinline__ void load_keys(const u8* __restrict__ K, const u8* __restrict__ V, int rbk, int rbv, int tb, int t1,
                                          int skip, int lane, int head_dim, RawRow<TK, PER> (&k)[KB], RawRow<TV, PER> (&v)[KB]) {
#pragma unroll
    for (int j = 0; j < KB; j++) {
        const int t = tb + ATT_WARPS * j;
        if (t < t1 && t != skip) {
            fetch_any<TK, PER>(K + (i64)t * rbk, lane, head_dim, k[j]);
            fetch_any<TV, PER>(V + (i64)t * rbv, lane, head_dim, v[j]);
        } else {
            zero_raw(k[j]);
            zero_raw(v[j]);
        }
    }
}

// The row of this step's token (position n-1) that the QKV product just formed, raw: f32 and f16
// rows it stored in the cache; q8_0 and q4_0 rows it left as floats in `staged`, which are encoded
// here (the attention uses the codes, as any later read does) and, by the one block that `store`s,
// written to the cache.
template <int KV, int PER>
__device__ __forceinline__ void new_row(u8* __restrict__ row, const float* __restrict__ staged, bool store, int lane, int head_dim,
                                        RawRow<KV, PER>& r) {
    if constexpr (KV == KV_Q8_0 || KV == KV_Q4_0) {
        float x[PER];
        load_dims<PER>(staged, lane, head_dim, x);
        encode_row<KV, PER>(x, row, store, lane, head_dim, &r);
    } else {
        fetch_any<KV, PER>(row, lane, head_dim, r);
    }
}

// The last block of a head merges its n_active ranges (<= 32) from `part` (read from L2: the other
// blocks wrote them): the first warp turns each range's (max, sum) into one weight, then thread d
// forms output dimension d (blockDim >= head_dim) and, with q != nullptr, its int8 blocks.
__device__ __forceinline__ void merge_ranges(const float* p, int n_active, int head_dim, float* __restrict__ out,
                                             signed char* __restrict__ q, float* __restrict__ d, int base, Arranged ar) {
    __shared__ float weight[32];
    const int stride = head_dim + 2, tid = threadIdx.x;
    if (tid < 32) {
        const float m = tid < n_active ? __ldcg(p + tid * stride) : NEG_INF;
        const float M = warp_max(m);
        const float e = tid < n_active ? expf(m - M) : 0.f;
        const float L = warp_sum(e * (tid < n_active ? __ldcg(p + tid * stride + 1) : 0.f));
        weight[tid] = e / L;
    }
    __syncthreads();
    if (tid >= head_dim) return;  // whole warps when head_dim % 32 == 0
    float v = 0.f;
#pragma unroll 4
    for (int s = 0; s < n_active; s++) v += weight[s] * __ldcg(p + s * stride + 2 + tid);
    out[tid] = v;
    if (q != nullptr) quantize_block(v, base + tid, q, d, ar);
}

// kc, vc: the layer's cache of this slot (n_kv, n_ctx, row) as the KV types TK, TV; staged: the QKV
// product's q8_0 / q4_0 rows of this token as floats ((2, n_kv, head_dim): keys, then values), which
// the first head of each KV group's block with position n-1 stores (new_row).
template <int PER, int TK, int TV>
__global__ void __launch_bounds__(32 * ATT_WARPS) attn_partial(const float* __restrict__ q, u8* __restrict__ kc,
        u8* __restrict__ vc, const float* __restrict__ staged, const i64* __restrict__ io, int n_ctx, int head_dim, int group,
        float scale, float* __restrict__ part, int* __restrict__ cnt, float* __restrict__ out, signed char* __restrict__ oq,
        float* __restrict__ od, u8* a4, i64 plane, u8* a8, int n_split) {
    // keys a warp loads at once: as many raw rows as ~64 registers hold (48 with blocks: their
    // encoding and decoding need more), at most 16 (hd <= 32); past that they spill
    constexpr int RR = RawRow<TK, PER>::N + RawRow<TV, PER>::N + (TK >= KV_Q8_0) + (TV >= KV_Q8_0);
    constexpr int KB_REGS = (TK >= KV_Q8_0 || TV >= KV_Q8_0 ? 48 : 64) / RR, KB_MAX = PER == 1 ? 16 : 24;
    constexpr int KB = KB_REGS < KB_MAX ? KB_REGS : KB_MAX;
    __shared__ float sm[ATT_WARPS], sl[ATT_WARPS], sacc[ATT_WARPS][256];
    pdl_trigger();
    const int h = blockIdx.x, s = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    const int n = (int)io[1] + 1;  // io is written before the step starts
    const int n_active = attn_ranges(n, n_split);
    if (s >= n_active) return;
    const int chunk = (n + n_active - 1) / n_active;
    const int t0 = s * chunk, t1 = min(n, t0 + chunk);
    const int kvh = h / group, rbk = kv_row_bytes<TK>(head_dim), rbv = kv_row_bytes<TV>(head_dim), d0 = lane * PER;
    u8* K = kc + (i64)kvh * n_ctx * rbk;
    u8* V = vc + (i64)kvh * n_ctx * rbv;
    // The rows stay raw in registers (halves, codes) and are decoded as they are used. The first
    // batch is loaded after the wait: loading it before (all but position n-1, which the product
    // before this kernel writes) gave wrong f16 rows at head_dim 8 on an H200 under programmatic
    // launch (session 15: 0.8 of the largest logit at the second step; f32 and head_dim 64 unaffected).
    RawRow<TK, PER> k[KB];
    RawRow<TV, PER> v[KB];
    pdl_wait();
    load_keys<PER, KB, TK, TV>(K, V, rbk, rbv, t0 + warp, t1, n - 1, lane, head_dim, k, v);
    // position n-1, in whichever of the warp's batches holds it
    auto new_key = [&](int tb) {
#pragma unroll
        for (int j = 0; j < KB; j++) {
            const int t = tb + ATT_WARPS * j;
            if (t == n - 1 && t < t1) {  // the same for the whole warp
                const float* sk = staged + (i64)kvh * head_dim;
                new_row<TK, PER>(K + (i64)t * rbk, sk, h % group == 0, lane, head_dim, k[j]);
                new_row<TV, PER>(V + (i64)t * rbv, sk + (i64)gridDim.x / group * head_dim, h % group == 0, lane, head_dim, v[j]);
            }
        }
    };
    new_key(t0 + warp);
    float qv[PER], acc[PER];
    load_dims<PER>(q + h * head_dim, lane, head_dim, qv);
#pragma unroll
    for (int e = 0; e < PER; e++) { qv[e] *= scale; acc[e] = 0.f; }
    float m = NEG_INF, l = 0.f;
    for (int tb = t0 + warp; tb < t1; tb += ATT_WARPS * KB) {
        float sc[KB];
        if (tb != t0 + warp) {
            load_keys<PER, KB, TK, TV>(K, V, rbk, rbv, tb, t1, n - 1, lane, head_dim, k, v);
            if (tb + ATT_WARPS * KB > n - 1) new_key(tb);
        }
        // the KB sums interleaved, the keys past the range masked after: a warp_sum per key under
        // its condition ran one after another (7B f16 at 66 keys: graph replay 3574 -> 3556 us)
        float mb = m;
#pragma unroll
        for (int j = 0; j < KB; j++) {
            float kf[PER];
            decode_raw<TK, PER>(k[j], d0, kf);
            float a = 0.f;
#pragma unroll
            for (int e = 0; e < PER; e++) a += qv[e] * kf[e];
            sc[j] = a;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
            for (int j = 0; j < KB; j++) sc[j] += __shfl_xor_sync(0xffffffffu, sc[j], o);
        }
#pragma unroll
        for (int j = 0; j < KB; j++) {
            if (tb + ATT_WARPS * j >= t1) sc[j] = NEG_INF;
            mb = fmaxf(mb, sc[j]);
        }
        const float c = expf(m - mb);  // 0 on the first batch (m = -inf)
        l *= c;
#pragma unroll
        for (int e = 0; e < PER; e++) acc[e] *= c;
#pragma unroll
        for (int j = 0; j < KB; j++) {
            if (tb + ATT_WARPS * j < t1) {
                const float p = expf(sc[j] - mb);
                l += p;
                float vf[PER];
                decode_raw<TV, PER>(v[j], d0, vf);
#pragma unroll
                for (int e = 0; e < PER; e++) acc[e] += p * vf[e];
            }
        }
        m = mb;
    }
    // merge the warps
    if (lane == 0) { sm[warp] = m; sl[warp] = l; }
#pragma unroll
    for (int e = 0; e < PER; e++) if (lane * PER + e < head_dim) sacc[warp][lane * PER + e] = acc[e];
    __syncthreads();
    const int tid = threadIdx.x;  // one thread per output dimension from here
    float M = NEG_INF;
#pragma unroll
    for (int w = 0; w < ATT_WARPS; w++) M = fmaxf(M, sm[w]);
    float L = 0.f, val = 0.f;
#pragma unroll
    for (int w = 0; w < ATT_WARPS; w++) {
        const float f = sm[w] > NEG_INF ? expf(sm[w] - M) : 0.f;  // a warp with no keys has m = -inf
        L += sl[w] * f;
        if (tid < head_dim) val += sacc[w][tid] * f;
    }
    const Arranged ar{a4, plane, a8};
    if (n_active == 1) {
        if (tid >= head_dim) return;  // whole warps when head_dim % 32 == 0
        val /= L;
        out[h * head_dim + tid] = val;
        if (oq != nullptr) quantize_block(val, h * head_dim + tid, oq, od, ar);
        return;
    }
    const int stride = head_dim + 2;
    float* ph = part + (i64)h * gridDim.y * stride;
    if (tid < head_dim) ph[s * stride + 2 + tid] = val;
    if (tid == 0) { ph[s * stride] = M; ph[s * stride + 1] = L; }
    __threadfence();
    __shared__ int last;
    __syncthreads();
    if (tid == 0) last = atomicAdd(cnt + h, 1) == n_active - 1;
    __syncthreads();
    if (!last) return;
    if (tid == 0) cnt[h] = 0;  // for the next step
    __threadfence();
    merge_ranges(ph, n_active, head_dim, out + h * head_dim, oq, od, h * head_dim, ar);
}

// ---------------------------------------------------------------------- gathers and batches
// out[i, :] = row ids[i] of w, dequantized; ids are int64 (for one token: io[0]).
template <int T>
__global__ void get_rows(const u8* __restrict__ w, i64 ld, const i64* __restrict__ ids, int cols, float* __restrict__ out) {
    pdl_trigger();
    pdl_wait();
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

// Causal attention of a prompt batch: n_tok queries (q: (n_tok, n_heads, head_dim)) at positions
// start.. of one sequence over its stored keys and values (kc, vc: (n_kv, n_ctx, row) as TK, TV),
// flash-attention style: a block takes PQ_WARPS * PQ_ROWS queries of one head and walks the keys
// 0..start+n_tok-1 in tiles of PQ_KEYS, decoded into shared memory, each query keeping its running
// (max, sum, output) in registers (an online softmax), so no score matrix is formed. Warp w owns
// queries PQ_ROWS*w .. of the tile; for the scores lane l takes key l of the tile, for the output
// dimensions l, l + 32, ... (PER of them: head_dim <= 32 * PER). Dynamic shared memory: the
// queries (scaled), a K tile with rows padded by one float (lane l reads row l: no bank conflicts)
// and a V tile: 4 * (PQ_WARPS * PQ_ROWS * head_dim + PQ_KEYS * (2 * head_dim + 1)) bytes.
#define PQ_WARPS 4
#define PQ_ROWS 8
#define PQ_KEYS 32
template <int PER, int TK, int TV>
__global__ void __launch_bounds__(32 * PQ_WARPS) attn_prompt(const float* __restrict__ q, const u8* __restrict__ kc,
        const u8* __restrict__ vc, int n_tok, int start, int n_heads, int n_kv, int n_ctx, int head_dim, float scale,
        float* __restrict__ out) {
    constexpr int BQ = PQ_WARPS * PQ_ROWS;
    extern __shared__ float smem[];
    const int hd = head_dim, kstride = hd + 1;
    float* Qs = smem;                 // (BQ, hd)
    float* Ks = Qs + BQ * hd;         // (PQ_KEYS, hd + 1)
    float* Vs = Ks + PQ_KEYS * kstride;  // (PQ_KEYS, hd)
    const int h = blockIdx.y, q0 = blockIdx.x * BQ, tid = threadIdx.x, warp = tid / 32, lane = tid & 31;
    const int kvh = h / (n_heads / n_kv), rbk = kv_row_bytes<TK>(hd), rbv = kv_row_bytes<TV>(hd);
    const u8* K = kc + (i64)kvh * n_ctx * rbk;
    const u8* V = vc + (i64)kvh * n_ctx * rbv;
    for (int i = tid; i < BQ * hd; i += blockDim.x) {
        const int r = i / hd;
        Qs[i] = q0 + r < n_tok ? q[((i64)(q0 + r) * n_heads + h) * hd + i % hd] * scale : 0.f;
    }
    float m[PQ_ROWS], l[PQ_ROWS], o[PQ_ROWS][PER];
#pragma unroll
    for (int i = 0; i < PQ_ROWS; i++) {
        m[i] = NEG_INF;
        l[i] = 0.f;
#pragma unroll
        for (int e = 0; e < PER; e++) o[i][e] = 0.f;
    }
    const int last = start + min(n_tok, q0 + BQ) - 1;  // the last key a query of the tile sees
    const float* qr = Qs + warp * PQ_ROWS * hd;
    for (int kb = 0; kb <= last; kb += PQ_KEYS) {
        __syncthreads();  // the last tile is read (and the queries written)
        for (int i = tid; i < PQ_KEYS * hd; i += blockDim.x) {
            const int r = i / hd, d = i % hd;
            const bool in = kb + r <= last;
            Ks[r * kstride + d] = in ? kv_elem<TK>(K + (i64)(kb + r) * rbk, d) : 0.f;
            Vs[i] = in ? kv_elem<TV>(V + (i64)(kb + r) * rbv, d) : 0.f;
        }
        __syncthreads();
        float s[PQ_ROWS];
#pragma unroll
        for (int i = 0; i < PQ_ROWS; i++) s[i] = 0.f;
        const float* kr = Ks + lane * kstride;
#pragma unroll 4
        for (int d = 0; d < hd; d++) {
            const float kd = kr[d];
#pragma unroll
            for (int i = 0; i < PQ_ROWS; i++) s[i] += qr[i * hd + d] * kd;
        }
        const int key = kb + lane;
#pragma unroll
        for (int i = 0; i < PQ_ROWS; i++) {
            // a query sees keys up to its position; key 0 is in the first tile, so m is finite after it
            // (queries past n_tok see zero rows past `last`: finite, and not written)
            if (key > start + q0 + warp * PQ_ROWS + i) s[i] = NEG_INF;
            const float mn = fmaxf(m[i], warp_max(s[i]));
            const float c = expf(m[i] - mn);  // 0 on the first tile (m = -inf)
            s[i] = expf(s[i] - mn);
            l[i] = l[i] * c + s[i];  // this lane's share of the sum
            m[i] = mn;
#pragma unroll
            for (int e = 0; e < PER; e++) o[i][e] *= c;
        }
        for (int k = 0; k < PQ_KEYS; k++) {
            float vv[PER];
#pragma unroll
            for (int e = 0; e < PER; e++) vv[e] = lane + 32 * e < hd ? Vs[k * hd + lane + 32 * e] : 0.f;
#pragma unroll
            for (int i = 0; i < PQ_ROWS; i++) {
                const float p = __shfl_sync(0xffffffffu, s[i], k);
#pragma unroll
                for (int e = 0; e < PER; e++) o[i][e] += p * vv[e];
            }
        }
    }
#pragma unroll
    for (int i = 0; i < PQ_ROWS; i++) {
        const float L = warp_sum(l[i]);
        const int t = q0 + warp * PQ_ROWS + i;
        if (t >= n_tok) continue;
#pragma unroll
        for (int e = 0; e < PER; e++) {
            const int d = lane + 32 * e;
            if (d < hd) out[((i64)t * n_heads + h) * hd + d] = o[i][e] / L;
        }
    }
}

extern "C" __global__ void silu_mul(const float* g, const float* u, i64 n, float* out) {
    pdl_trigger();
    pdl_wait();
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        out[i] = g[i] / (1.f + expf(-g[i])) * u[i];
}

// Attention of a batch of tokens of several sequences (a server's decode step): token t = blockIdx.y,
// head h = blockIdx.x attends to positions 0..pos[t] of slot seq[t] of k, v (n_seq, n_kv, n_ctx, row),
// stored as TK, TV. Each of the block's SEQ_WARPS warps takes every SEQ_WARPS-th key with an online
// softmax (lane l holds dimensions l*PER.., as attn_partial; head_dim <= 256), then the warps' partial
// results are merged in shared memory.
#define SEQ_WARPS 4
template <int PER, int TK, int TV>
__global__ void __launch_bounds__(32 * SEQ_WARPS) attn_seqs(const float* __restrict__ q,
        const u8* __restrict__ kc, const u8* __restrict__ vc, const i64* __restrict__ seq,
        const i64* __restrict__ pos, int n_heads, int n_kv, int n_ctx, int head_dim, float scale, float* __restrict__ out) {
    __shared__ float sm[SEQ_WARPS], sl[SEQ_WARPS], sacc[SEQ_WARPS][256];
    const int h = blockIdx.x, t = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    const int n = (int)pos[t] + 1;
    const i64 slot = (seq[t] * n_kv + h / (n_heads / n_kv)) * (i64)n_ctx;
    const int rbk = kv_row_bytes<TK>(head_dim), rbv = kv_row_bytes<TV>(head_dim);
    const u8* K = kc + slot * rbk;
    const u8* V = vc + slot * rbv;
    float qv[PER], acc[PER];
    load_dims<PER>(q + ((i64)t * n_heads + h) * head_dim, lane, head_dim, qv);
#pragma unroll
    for (int e = 0; e < PER; e++) {
        qv[e] *= scale;
        acc[e] = 0.f;
    }
    float m = NEG_INF, l = 0.f;
    for (int p = warp; p < n; p += SEQ_WARPS) {
        float kr[PER], vr[PER];
        load_row<TK, PER>(K + (i64)p * rbk, lane, head_dim, kr);
        load_row<TV, PER>(V + (i64)p * rbv, lane, head_dim, vr);
        float s = 0.f;
#pragma unroll
        for (int e = 0; e < PER; e++) s += qv[e] * kr[e];
        s = warp_sum(s);
        const float mn = fmaxf(m, s);
        const float c = expf(m - mn), w = expf(s - mn);  // c = 0 on the first key (m = -inf)
        l = l * c + w;
#pragma unroll
        for (int e = 0; e < PER; e++) acc[e] = acc[e] * c + w * vr[e];
        m = mn;
    }
    if (lane == 0) { sm[warp] = m; sl[warp] = l; }
#pragma unroll
    for (int e = 0; e < PER; e++) if (lane * PER + e < head_dim) sacc[warp][lane * PER + e] = acc[e];
    __syncthreads();
    if (warp != 0) return;
    float M = NEG_INF;
    for (int w = 0; w < SEQ_WARPS; w++) M = fmaxf(M, sm[w]);
    float L = 0.f, f[SEQ_WARPS];
    for (int w = 0; w < SEQ_WARPS; w++) {
        f[w] = sm[w] == NEG_INF ? 0.f : expf(sm[w] - M);  // a warp with no keys (n < SEQ_WARPS) adds nothing
        L += sl[w] * f[w];
    }
    for (int d = lane; d < head_dim; d += 32) {
        float o = 0.f;
        for (int w = 0; w < SEQ_WARPS; w++) o += sacc[w][d] * f[w];
        out[((i64)t * n_heads + h) * head_dim + d] = o / L;
    }
}
