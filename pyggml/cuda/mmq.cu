// Products of a batch of tokens on the int8 tensor cores (mma.sync m16n8k32, s8 x s8 -> s32), straight
// from the weights' blocks: the decode steps of several sequences at once, and prompts of up to 64 tokens.
// Compiled last, in the same module (module.py, CUDA_SOURCES; it uses the decoders' helpers: f16, ld32, spread4,
// iq4_values, scale_min_k4); backend.py's _mmq launches it.
//
// The activations are int8 blocks of 32 (quantize_q8s: the decode products' rounding) with their
// scale and, for the weight types with a min, the scaled sums of each half block, in one of two layouts
// (FRAG, chosen by products.py for the batch: module.mmq_fragment_layout): plain, or laid out for the
// fragments (see MQX).
// A warp owns 16 weight rows (32 for 32+ tokens: mq_shape). Lane (g = lane / 4, c = lane % 4) holds,
// of every 32-weight group of rows g and g + 8, weights 4c..4c+3 and 16+4c..16+4c+3: the mma's A
// fragment, which is also how the 4-bit types lay out their nibbles (byte j holds weights j and j + 16).
// Each group is one mma per 8 tokens (NT tiles of 8 tokens: up to 64 a block), its int32 sums scaled
// into float accumulators.
// Types whose scales cover 16 weights (Q2_K, Q3_K, Q6_K) take two m16n8k16 mmas, one per half.
// The weights are read once for all the block's tokens, a few groups at once (mq_step). Grid: x = tiles of
// 16 * MT * MQ_WARPS rows, y = ranges of the K groups (with more than one, each writes its partial sums and
// mmq_reduce adds them in order: the result does not depend on timing), z = chunks of 64 tokens.
#define MQ_WARPS 4

struct MQW { int lo, hi; float d0, d1, m0, m1; };  // one row's fragment of a group: value = d * q + m, per half

template <int T> struct mq_traits { static constexpr bool split = false, min = false; };
template <> struct mq_traits<T_Q4_1> { static constexpr bool split = false, min = true; };
template <> struct mq_traits<T_Q5_1> { static constexpr bool split = false, min = true; };
template <> struct mq_traits<T_Q4_K> { static constexpr bool split = false, min = true; };
template <> struct mq_traits<T_Q5_K> { static constexpr bool split = false, min = true; };
template <> struct mq_traits<T_Q2_K> { static constexpr bool split = true, min = true; };
template <> struct mq_traits<T_Q3_K> { static constexpr bool split = true, min = false; };
template <> struct mq_traits<T_Q6_K> { static constexpr bool split = true, min = false; };

__device__ __forceinline__ MQW mq_same(int lo, int hi, float d, float m) { return MQW{lo, hi, d, d, m, m}; }

// Lane c's fragment of group kb (32 weights) of a row: every type that mma_kernels() instantiates has
// its branch; a code without one does not compile.
template <int T>
__device__ __forceinline__ MQW mq_load(const u8* __restrict__ row, int kb, int c) {
    if constexpr (T == T_Q4_0) {
        const u32 v = *(const u32*)(block_codes<T>(row, kb) + 4 * c);
        const u32 lo = v & 0x0F0F0F0Fu, hi = (v >> 4) & 0x0F0F0F0Fu;
        return mq_same(__vsub4(lo, 0x08080808u), __vsub4(hi, 0x08080808u), f16(block_scale<T>(row, kb)), 0.f);
    } else if constexpr (T == T_IQ4_NL) {
        const u8* blk = row + kb * 18;
        const u32 v = ld32(blk + 2 + 4 * c);
        return mq_same(iq4_values(v & 0x0F0F0F0Fu), iq4_values((v >> 4) & 0x0F0F0F0Fu), f16(ld16(blk)), 0.f);
    } else if constexpr (T == T_Q4_1) {
        const u8* blk = row + kb * 20;
        const u32 v = ld32(blk + 4 + 4 * c);
        return mq_same(v & 0x0F0F0F0Fu, (v >> 4) & 0x0F0F0F0Fu, f16(ld16(blk)), f16(ld16(blk + 2)));
    } else if constexpr (T == T_Q5_0 || T == T_Q5_1) {
        const int lead = T == T_Q5_1 ? 4 : 2;
        const u8* blk = row + kb * (T == T_Q5_1 ? 24 : 22);
        const u32 qh = ld32(blk + lead), v = ld32(blk + lead + 4 + 4 * c);
        const u32 lo = (v & 0x0F0F0F0Fu) | (spread4((qh >> (4 * c)) & 15) << 4);
        const u32 hi = ((v >> 4) & 0x0F0F0F0Fu) | (spread4((qh >> (16 + 4 * c)) & 15) << 4);
        if constexpr (T == T_Q5_0) return mq_same(__vsub4(lo, 0x10101010u), __vsub4(hi, 0x10101010u), f16(ld16(blk)), 0.f);
        else return mq_same(lo, hi, f16(ld16(blk)), f16(ld16(blk + 2)));
    } else if constexpr (T == T_Q8_0) {
        const u8* codes = block_codes<T>(row, kb);
        return mq_same(*(const u32*)(codes + 4 * c), *(const u32*)(codes + 16 + 4 * c), f16(block_scale<T>(row, kb)), 0.f);
    } else if constexpr (T == T_Q4_K || T == T_Q5_K) {
        // group j of the super-block: the low (j even) or high nibbles of 32 bytes; Q5_K's bit j of qh
        const u8* blk = row + (kb >> 3) * (T == T_Q4_K ? 144 : 176);
        const int j = kb & 7;
        int sc, m;
        scale_min_k4(j, blk + 4, sc, m);
        const u8* qs = blk + (T == T_Q4_K ? 16 : 48) + 32 * (j >> 1);
        const int sh = 4 * (j & 1);
        u32 lo = (ld32(qs + 4 * c) >> sh) & 0x0F0F0F0Fu, hi = (ld32(qs + 16 + 4 * c) >> sh) & 0x0F0F0F0Fu;
        if constexpr (T == T_Q5_K) {
            lo |= ((ld32(blk + 16 + 4 * c) >> j) & 0x01010101u) << 4;
            hi |= ((ld32(blk + 32 + 4 * c) >> j) & 0x01010101u) << 4;
        }
        return mq_same(lo, hi, f16(ld16(blk)) * (float)sc, -f16(ld16(blk + 2)) * (float)m);
    } else if constexpr (T == T_Q6_K) {
        // half h = j / 4 of 128, shift group s = j % 4: low 4 bits from ql (+32 bytes for odd s, high
        // nibbles for s >= 2), 2 high bits from qh; one int8 scale per 16
        const u8* blk = row + (kb >> 3) * 210;
        const int j = kb & 7, h = j >> 2, s = j & 3;
        const u8* ql = blk + 64 * h + 32 * (s & 1);
        const u8* qh = blk + 128 + 32 * h;
        const int sh = 4 * (s >> 1);
        const u32 lo = ((ld32(ql + 4 * c) >> sh) & 0x0F0F0F0Fu) | (((ld32(qh + 4 * c) >> (2 * s)) & 0x03030303u) << 4);
        const u32 hi = ((ld32(ql + 16 + 4 * c) >> sh) & 0x0F0F0F0Fu) | (((ld32(qh + 16 + 4 * c) >> (2 * s)) & 0x03030303u) << 4);
        const float d = f16(ld16(blk + 208));
        const signed char* sc = (const signed char*)blk + 192 + 8 * h + 2 * s;
        return MQW{(int)__vsub4(lo, 0x20202020u), (int)__vsub4(hi, 0x20202020u), d * sc[0], d * sc[1], 0.f, 0.f};
    } else if constexpr (T == T_Q3_K) {
        // hmask[32], qs[64], scales[12] (16 x 6 bits, minus 32), d: 2 bits from qs, minus 4 where the hmask bit is clear
        const u8* blk = row + (kb >> 3) * 110;
        const int j = kb & 7, h = j >> 2, s = j & 3, bit = 4 * h + s;
        const u8* qs = blk + 32 + 32 * h;
        const u32 lo = (ld32(qs + 4 * c) >> (2 * s)) & 0x03030303u, hi = (ld32(qs + 16 + 4 * c) >> (2 * s)) & 0x03030303u;
        const u32 mlo = ((ld32(blk + 4 * c) >> bit) & 0x01010101u) ^ 0x01010101u;
        const u32 mhi = ((ld32(blk + 16 + 4 * c) >> bit) & 0x01010101u) ^ 0x01010101u;
        const u8* scb = blk + 96;
        float ds[2];
        for (int k = 0; k < 2; k++) {
            const int si = 8 * h + 2 * s + k;
            const int low = si < 8 ? (scb[si] & 15) : (scb[si - 8] >> 4);
            ds[k] = (float)((low | (((scb[8 + si % 4] >> (2 * (si / 4))) & 3) << 4)) - 32);
        }
        const float d = f16(ld16(blk + 108));
        return MQW{(int)__vsub4(lo, mlo << 2), (int)__vsub4(hi, mhi << 2), d * ds[0], d * ds[1], 0.f, 0.f};
    } else if constexpr (T == T_Q2_K) {
        // scales[16] (low 4 bits: scale, high: min), qs[64], d, dmin; 2 bits a weight
        const u8* blk = row + (kb >> 3) * 84;
        const int j = kb & 7, h = j >> 2, s = j & 3;
        const u8* qs = blk + 16 + 32 * h;
        const u32 lo = (ld32(qs + 4 * c) >> (2 * s)) & 0x03030303u, hi = (ld32(qs + 16 + 4 * c) >> (2 * s)) & 0x03030303u;
        const int s0 = blk[8 * h + 2 * s], s1 = blk[8 * h + 2 * s + 1];
        const float d = f16(ld16(blk + 80)), dmin = f16(ld16(blk + 82));
        return MQW{(int)lo, (int)hi, d * (float)(s0 & 15), d * (float)(s1 & 15), -dmin * (float)(s0 >> 4), -dmin * (float)(s1 >> 4)};
    } else if constexpr (T == T_IQ4_XS) {
        const u8* blk = row + (kb >> 3) * 136;
        const int ib = kb & 7;
        const int ls = ((blk[4 + ib / 2] >> (4 * (ib % 2))) & 15) | (((ld16(blk + 2) >> (2 * ib)) & 3) << 4);
        const u32 v = ld32(blk + 8 + 16 * ib + 4 * c);
        return mq_same(iq4_values(v & 0x0F0F0F0Fu), iq4_values((v >> 4) & 0x0F0F0F0Fu), f16(ld16(blk)) * (float)(ls - 32), 0.f);
    } else {
        static_assert(no_decoder<T>::value, "mq_load: no fragment loader for this weight type code");
        return MQW{};
    }
}

// c += A (16 x 32, rows g / g + 8 in a0 a1 for k < 16, a2 a3 for k >= 16) x B (32 x 8: b0, b1)
__device__ __forceinline__ void mma_k32(int (&c)[4], int a0, int a1, int a2, int a3, int b0, int b1) {
#if __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    __trap();  // backend.py launches mmq on compute capability 8.0+ only
#endif
}

// c += A (16 x 16: a0 row g, a1 row g + 8) x B (16 x 8: b0)
__device__ __forceinline__ void mma_k16(int (&c)[4], int a0, int a1, int b0) {
#if __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};"
                 : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3]) : "r"(a0), "r"(a1), "r"(b0));
#else
    __trap();
#endif
}

// Activations of n tokens: q (n, K) int8, d and s the scales and d times the sums of each half block
// (for the types with a min). Plain (FRAG false): q's blocks as they are, d and s (n, K / 32). Laid out
// for the fragments (FRAG true): each block's 4-byte words in the order 0 4 1 5 2 6 3 7 (lane c's two
// words, one 8-byte load), d and s (K / 32, npad), npad = n rounded up to 8 (a lane's tokens 2c, 2c + 1
// adjacent: one 8- or 16-byte load).
struct MQX { const int* __restrict__ q; const float* __restrict__ d; const float2* __restrict__ s; int n, npad; };
// A lane's share of 8 tokens' group: the B fragment (token g) and the scales of tokens 2c, 2c + 1.
struct MQB { int b0, b1; float dx0, dx1; float2 s0, s1; };

template <int T, bool FRAG>
__device__ __forceinline__ MQB mq_tokens(const MQX& x, int groups, int kb, int col_g, int col_c) {
    MQB t{0, 0, 0.f, 0.f, make_float2(0.f, 0.f), make_float2(0.f, 0.f)};
    if constexpr (FRAG) {
        if (col_g < x.n) {
            const int2 v = *(const int2*)(x.q + (i64)col_g * groups * 8 + kb * 8 + 2 * (threadIdx.x & 3));
            t.b0 = v.x;
            t.b1 = v.y;
        }
        if (col_c < x.n) {  // col_c + 1 may be padding: its sums are never stored
            const i64 at = (i64)kb * x.npad + col_c;
            const float2 dd = *(const float2*)(x.d + at);
            t.dx0 = dd.x;
            t.dx1 = dd.y;
            if constexpr (mq_traits<T>::min) {
                const float4 ss = *(const float4*)(x.s + at);
                t.s0 = make_float2(ss.x, ss.y);
                t.s1 = make_float2(ss.z, ss.w);
            }
        }
    } else {
        if (col_g < x.n) {
            const int* xr = x.q + (i64)col_g * groups * 8 + kb * 8 + (threadIdx.x & 3);
            t.b0 = xr[0];
            t.b1 = xr[4];
        }
        if (col_c < x.n) {
            t.dx0 = x.d[(i64)col_c * groups + kb];
            if constexpr (mq_traits<T>::min) t.s0 = x.s[(i64)col_c * groups + kb];
        }
        if (col_c + 1 < x.n) {
            t.dx1 = x.d[(i64)(col_c + 1) * groups + kb];
            if constexpr (mq_traits<T>::min) t.s1 = x.s[(i64)(col_c + 1) * groups + kb];
        }
    }
    return t;
}

// One group of 16 rows (a: row g, b: row g + 8) times 8 tokens into the lane's 4 accumulators:
// rows g, g + 8 x tokens 2c, 2c + 1.
template <int T>
__device__ __forceinline__ void mq_group(float (&acc)[4], const MQW& a, const MQW& b, const MQB& t) {
    if constexpr (mq_traits<T>::split) {
        int lo[4] = {0, 0, 0, 0}, hi[4] = {0, 0, 0, 0};
        mma_k16(lo, a.lo, b.lo, t.b0);
        mma_k16(hi, a.hi, b.hi, t.b1);
        acc[0] += t.dx0 * (a.d0 * (float)lo[0] + a.d1 * (float)hi[0]);
        acc[1] += t.dx1 * (a.d0 * (float)lo[1] + a.d1 * (float)hi[1]);
        acc[2] += t.dx0 * (b.d0 * (float)lo[2] + b.d1 * (float)hi[2]);
        acc[3] += t.dx1 * (b.d0 * (float)lo[3] + b.d1 * (float)hi[3]);
    } else {
        int s[4] = {0, 0, 0, 0};
        mma_k32(s, a.lo, b.lo, a.hi, b.hi, t.b0, t.b1);
        acc[0] += a.d0 * t.dx0 * (float)s[0];
        acc[1] += a.d0 * t.dx1 * (float)s[1];
        acc[2] += b.d0 * t.dx0 * (float)s[2];
        acc[3] += b.d0 * t.dx1 * (float)s[3];
    }
    if constexpr (mq_traits<T>::min) {
        acc[0] += a.m0 * t.s0.x + a.m1 * t.s0.y;
        acc[1] += a.m0 * t.s1.x + a.m1 * t.s1.y;
        acc[2] += b.m0 * t.s0.x + b.m1 * t.s0.y;
        acc[3] += b.m0 * t.s1.x + b.m1 * t.s1.y;
    }
}

// MT tiles of 16 rows a warp: the tokens' fragments serve all of them (2 when a block has 4+ tiles of tokens).
template <int NT> struct mq_shape { static constexpr int MT = NT >= 4 ? 2 : 1, U = NT >= 4 ? 2 : 4; };

// U groups of the warp's MT x 16 rows, their weights loaded before any is used, times NT tiles of tokens.
template <int T, int NT, bool FRAG, int U>
__device__ __forceinline__ void mq_step(float (&acc)[mq_shape<NT>::MT][NT][4], const u8* const (&wr)[mq_shape<NT>::MT][2],
                                        const MQX& x, int groups, int kb, int cols, int g, int c) {
    constexpr int MT = mq_shape<NT>::MT;
    MQW w[U][MT][2];
#pragma unroll
    for (int u = 0; u < U; u++)
#pragma unroll
        for (int m = 0; m < MT; m++) {
            w[u][m][0] = mq_load<T>(wr[m][0], kb + u, c);
            w[u][m][1] = mq_load<T>(wr[m][1], kb + u, c);
        }
#pragma unroll
    for (int u = 0; u < U; u++)
#pragma unroll
        for (int j = 0; j < NT; j++) {
            const MQB t = mq_tokens<T, FRAG>(x, groups, kb + u, cols + 8 * j + g, cols + 8 * j + 2 * c);
#pragma unroll
            for (int m = 0; m < MT; m++) mq_group<T>(acc[m][j], w[u][m][0], w[u][m][1], t);
        }
}

// Up to three matrices of one type and width multiplied by one input in one launch (Q, K, V; gate, up):
// rows [0, e0) are w0's, [e0, e1) w1's, [e1, rows) w2's, each written to its own output (n, its rows).
struct MQMats {
    const u8* w0; const u8* w1; const u8* w2;
    float* o0; float* o1; float* o2;
    int e0, e1, rows;
    __device__ __forceinline__ const u8* row(int r, i64 ld) const {
        return r < e0 ? w0 + (i64)r * ld : (r < e1 ? w1 + (i64)(r - e0) * ld : w2 + (i64)(r - e1) * ld);
    }
    __device__ __forceinline__ float& out(int r, int col) const {
        return r < e0 ? o0[(i64)col * e0 + r] : (r < e1 ? o1[(i64)col * (e1 - e0) + r - e0] : o2[(i64)col * (rows - e1) + r - e1]);
    }
};

// out = x (n, K) . W (rows, K)^T (see MQMats); with gridDim.y > 1, part gets the partial sums (gridDim.y, n, rows).
template <int T, int NT, bool FRAG>
__global__ void __launch_bounds__(32 * MQ_WARPS) mmq(const u8* w0, const u8* w1, const u8* w2, i64 ld, int e0, int e1, int rows,
        int groups, const int* __restrict__ xq, const float* __restrict__ xd, const float2* __restrict__ xs, int n, int npad,
        float* o0, float* o1, float* o2, float* __restrict__ part) {
    pdl_trigger();
    pdl_wait();
    constexpr int MT = mq_shape<NT>::MT, U = mq_shape<NT>::U;
    const MQMats mats{w0, w1, w2, o0, o1, o2, e0, e1, rows};
    const int lane = threadIdx.x & 31, g = lane >> 2, c = lane & 3;
    const int r0 = (blockIdx.x * MQ_WARPS + threadIdx.x / 32) * 16 * MT;
    const int cols = blockIdx.z * 64;
    const int k0 = (int)((i64)groups * blockIdx.y / gridDim.y), k1 = (int)((i64)groups * (blockIdx.y + 1) / gridDim.y);
    const u8* wr[MT][2];
#pragma unroll
    for (int m = 0; m < MT; m++)  // rows past the end repeat the last (never stored)
        for (int h = 0; h < 2; h++) wr[m][h] = mats.row(min(r0 + 16 * m + g + 8 * h, rows - 1), ld);
    const MQX x{xq, xd, xs, n, npad};
    float acc[MT][NT][4];
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int j = 0; j < NT; j++) acc[m][j][0] = acc[m][j][1] = acc[m][j][2] = acc[m][j][3] = 0.f;
    int kb = k0;
    // two steps unrolled: the second one's loads go out before the first one's products (H100, 7B shapes,
    // q4_0 at 64 tokens: 4096 x 4096 42.9 -> 33.9 us, 11008 x 4096 119.9 -> 84.4; 2-32 tokens unchanged)
#pragma unroll 2
    for (; kb + U <= k1; kb += U) mq_step<T, NT, FRAG, U>(acc, wr, x, groups, kb, cols, g, c);
    for (; kb < k1; kb++) mq_step<T, NT, FRAG, 1>(acc, wr, x, groups, kb, cols, g, c);
    float* p = part + (i64)blockIdx.y * n * rows;
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int j = 0; j < NT; j++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int row = r0 + 16 * m + g + 8 * (i >> 1), col = cols + 8 * j + 2 * c + (i & 1);
                if (row < rows && col < n) {
                    if (gridDim.y == 1) mats.out(row, col) = acc[m][j][i];
                    else p[(i64)col * rows + row] = acc[m][j][i];
                }
            }
}

// The outputs (see MQMats) = the sums of the ranges' partials part (splits, n, rows), in range order.
// (Adding them in the last block of each tile instead, after a count of finished ranges, was slower from
// 32 tokens on: H100, 7B shapes, 4096 x 4096 q4_0 at 32 tokens 46.5 us against 26.8.)
extern "C" __global__ void mmq_reduce(const float* __restrict__ part, int splits, int n, int e0, int e1, int rows,
                                      float* o0, float* o1, float* o2) {
    pdl_trigger();
    pdl_wait();
    const i64 size = (i64)n * rows, i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= size) return;
    float s = 0.f;
    for (int k = 0; k < splits; k++) s += part[(i64)k * size + i];
    const MQMats mats{nullptr, nullptr, nullptr, o0, o1, o2, e0, e1, rows};
    mats.out((int)(i % rows), (int)(i / rows)) = s;
}

// x (n floats, n % 32 == 0: rows of cols floats, one after another) -> int8 blocks q, scales d and s:
// d times the sums of each half block's values (the decode products' rounding: quantize_block), laid
// out as MQX describes: frag != 0 for the fragments' layout (npad: the tokens rounded up to 8).
extern "C" __global__ void quantize_q8s(const float* __restrict__ x, int n, int cols, int frag, int npad,
                                        signed char* __restrict__ q, float* __restrict__ d, float2* __restrict__ s) {
    pdl_trigger();
    pdl_wait();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i - (threadIdx.x & 31) >= n) return;  // whole warps only
    const float v = x[i];
    const float amax = warp_max(fabsf(v));
    const float dd = amax / 127.f;
    const float inv = dd == 0.f ? 0.f : 1.f / dd;
    const float t = v * inv;
    const signed char qi = (signed char)copysignf(floorf(fabsf(t) + 0.5f), t);
    const int l = threadIdx.x & 31, word = l >> 2;  // word w of the block goes to place 2w (w < 4) or 2(w - 4) + 1
    q[frag ? i - l + 4 * (word < 4 ? 2 * word : 2 * word - 7) + (l & 3) : i] = qi;
    int half = qi;
    for (int o = 8; o > 0; o >>= 1) half += __shfl_xor_sync(0xffffffffu, half, o);  // sums within each 16 lanes
    const int other = __shfl_xor_sync(0xffffffffu, half, 16);
    if (l == 0) {
        const int at = frag ? (i % cols) / QK * npad + i / cols : i / QK;
        d[at] = dd;
        s[at] = make_float2(dd * (float)half, dd * (float)other);
    }
}
