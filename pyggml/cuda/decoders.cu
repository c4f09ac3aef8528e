// Weight decoders and the decode products' inner loops: one weight of any type (dequant), the
// groups of 8 int8 or float products a lane takes per step, and the chunked path's whole blocks.
// Compiled after common.cu, as one module (module.py, CUDA_SOURCES).

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

// Q4_0 and Q8_0 rows as the GPU keeps them (layout.py, to_gpu_layout): blocks in groups of
// GROUP_BLOCKS, each group the 8 blocks' fp16 scales (16 bytes), then their codes (16 or 32 bytes
// a block), so that every block's codes are 16-byte aligned.
template <int T> struct Grouped {
    static_assert(T == T_Q4_0 || T == T_Q8_0, "Grouped: only Q4_0 and Q8_0 rows are regrouped");
    static constexpr int CODES = T == T_Q4_0 ? 16 : 32, BYTES = GROUP_BLOCKS * (2 + CODES);
};
template <int T>
__device__ __forceinline__ u16 block_scale(const u8* __restrict__ row, int b) {
    return *(const u16*)(row + (b / GROUP_BLOCKS) * Grouped<T>::BYTES + 2 * (b % GROUP_BLOCKS));
}
template <int T>
__device__ __forceinline__ const u8* block_codes(const u8* __restrict__ row, int b) {
    return row + (b / GROUP_BLOCKS) * Grouped<T>::BYTES + 2 * GROUP_BLOCKS + Grouped<T>::CODES * (b % GROUP_BLOCKS);
}

// One weight of row `row` at column i, any computable type (the slow, general path). Every type
// code has its branch; a code without one does not compile.
template <int T>
__device__ __forceinline__ float dequant(const u8* __restrict__ row, int i) {
    if constexpr (T == T_F32) return ((const float*)row)[i];
    else if constexpr (T == T_F16) return f16(((const u16*)row)[i]);
    else if constexpr (T == T_BF16) return __uint_as_float((u32)((const u16*)row)[i] << 16);
    else if constexpr (T == T_Q4_0) {
        const int b = i / QK, j = i % QK;
        const u8 c = block_codes<T>(row, b)[j & 15];
        return f16(block_scale<T>(row, b)) * (float)((j < 16 ? (c & 15) : (c >> 4)) - 8);
    } else if constexpr (T == T_Q4_1 || T == T_IQ4_NL) {  // d, [m], qs[16]
        const int b = i / QK, j = i % QK;
        const u8* blk = row + b * (T == T_Q4_1 ? 20 : 18);
        const u8* qs = blk + (T == T_Q4_1 ? 4 : 2);
        const int q = j < 16 ? (qs[j] & 15) : (qs[j - 16] >> 4);
        if constexpr (T == T_Q4_1) return f16(ld16(blk)) * (float)q + f16(ld16(blk + 2));
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
        return f16(block_scale<T>(row, i / QK)) * (float)(signed char)block_codes<T>(row, i / QK)[i % QK];
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

// Q5_0 (the quantized type of the group path): a lane's share of one block, fetched raw, then
// combined with its activations (the nibble layout: weights 4j..4j+3 in the low nibbles, 16+4j..16+4j+3
// in the high ones).
template <int T> struct WQ;
template <> struct WQ<T_Q5_0> { u32 v, qh; u16 d; };
template <int T>
__device__ __forceinline__ XQ load_xq(const Input& in, int g) {
    const int b = g >> 2, j = g & 3;
    XQ x;
    x.a = in.q[b * 8 + j];
    x.b = in.q[b * 8 + 4 + j];
    x.d = in.d[b];
    x.ones = __dp4a(x.a, 0x01010101, __dp4a(x.b, 0x01010101, 0));  // sum of the 8 int8 values
    return x;
}

template <int T>
__device__ __forceinline__ WQ<T> load_wq(const u8* __restrict__ row, int g) {
    const int b = g >> 2, j = g & 3;
    WQ<T> w;
    if constexpr (T == T_Q5_0) {
        const u8* blk = row + b * 22;
        w.d = ld16(blk);
        w.qh = ld32(blk + 2);
        w.v = ld32(blk + 6 + 4 * j);
    } else {
        static_assert(no_decoder<T>::value, "load_wq: no int8 path for this weight type code");
    }
    return w;
}

template <int T>
__device__ __forceinline__ float dot_q(const WQ<T>& w, const XQ& x, int g) {
    int s;
    if constexpr (T == T_Q5_0) {
        const int j = g & 3;
        const u32 lo = (w.v & 0x0F0F0F0Fu) | (spread4((w.qh >> (4 * j)) & 15) << 4);
        const u32 hi = ((w.v >> 4) & 0x0F0F0F0Fu) | (spread4((w.qh >> (16 + 4 * j)) & 15) << 4);
        s = __dp4a((int)lo, x.a, __dp4a((int)hi, x.b, 0)) - 16 * x.ones;
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

// Q4_0 and Q8_0 rows, grouped (block_scale, block_codes): a lane takes whole blocks, their codes in
// one (Q4_0) or two (Q8_0) aligned 16-byte loads, and the block's 32 int8 activations in two. The
// blocks of a row are spread over the lanes (b = lane, lane + 32, ...), so that a warp's loads of
// codes are 8 consecutive blocks' codes: whole 128- or 256-byte runs, the scales' 16 bytes between them.
// A Q4_0 nibble q goes into a byte's top half with the top bit flipped: the int8 16 * (q - 8) (one
// LOP3), so the offset 8 is in the weights and the sum is 16 times the block's (exact: below 2^24).
__device__ __forceinline__ int nibbles_x16(u32 w) {
#ifdef __CUDA_ARCH__  // (a & b) ^ c in one LOP3, the mask in a register: written plainly, ptxas makes two
    u32 r;
    asm("lop3.b32 %0, %1, %2, %3, 0x6A;" : "=r"(r) : "r"(w), "r"(0xF0F0F0F0u), "r"(0x80808080u));
    return (int)r;
#else
    return (int)((w & 0xF0F0F0F0u) ^ 0x80808080u);
#endif
}

template <int T>
__device__ __forceinline__ int dot_block(const uint4* c, const int4& xl, const int4& xh) {
    const int xs[8] = {xl.x, xl.y, xl.z, xl.w, xh.x, xh.y, xh.z, xh.w};
    int s = 0;
    if constexpr (T == T_Q4_0) {  // low nibbles: activations 0-15, high nibbles: 16-31
        const u32 w[4] = {c[0].x, c[0].y, c[0].z, c[0].w};
#pragma unroll
        for (int m = 0; m < 4; m++) s = __dp4a(nibbles_x16(w[m] << 4), xs[m], __dp4a(nibbles_x16(w[m]), xs[4 + m], s));
    } else {
        const u32 w[8] = {c[0].x, c[0].y, c[0].z, c[0].w, c[1].x, c[1].y, c[1].z, c[1].w};
#pragma unroll
        for (int m = 0; m < 8; m++) s = __dp4a((int)w[m], xs[m], s);
    }
    return s;
}

template <int T, int U, int KS>
__device__ __forceinline__ float2 dot_rows_chunk(const u8* __restrict__ r0, const u8* __restrict__ r1, const Input& in, int cols, int ks) {
    constexpr int NC = Grouped<T>::CODES / 16;  // 16-byte loads of a block's codes
    const int lane = threadIdx.x & 31;
    const int nb = cols / QK;
    const int4* __restrict__ xq = (const int4*)in.q;
    float a0 = 0.f, a1 = 0.f;
    for (int b0 = lane + 32 * U * ks; b0 < nb; b0 += 32 * U * KS) {
        uint4 c0[U][NC], c1[U][NC];
        int4 xl[U], xh[U];
        u16 d0[U], d1[U];
        float dx[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int b = b0 + 32 * u;
            if (b < nb) {
                const uint4* p0 = (const uint4*)block_codes<T>(r0, b);
                const uint4* p1 = (const uint4*)block_codes<T>(r1, b);
#pragma unroll
                for (int k = 0; k < NC; k++) { c0[u][k] = p0[k]; c1[u][k] = p1[k]; }
                d0[u] = block_scale<T>(r0, b);
                d1[u] = block_scale<T>(r1, b);
                xl[u] = xq[2 * b];
                xh[u] = xq[2 * b + 1];
                dx[u] = in.d[b];
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (b0 + 32 * u >= nb) continue;
            a0 += f16(d0[u]) * dx[u] * (float)dot_block<T>(c0[u], xl[u], xh[u]);
            a1 += f16(d1[u]) * dx[u] * (float)dot_block<T>(c1[u], xl[u], xh[u]);
        }
    }
    constexpr float unit = T == T_Q4_0 ? 1.f / 16 : 1.f;
    return make_float2(a0 * unit, a1 * unit);
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

