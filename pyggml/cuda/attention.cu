// Attention over the KV cache: one token's decode step (attn_partial: key ranges merged by the last
// block of each head), a prompt batch of one sequence (attn_prompt), a batch of tokens of several
// sequences (attn_seqs). Compiled after kvcache.cu (module.py, CUDA_SOURCES).

// Decode attention for the n = io[1]+1 keys in the cache. The keys are cut into n_active ranges
// (attn_ranges), one block of ATT_WARPS warps per (head, range); blocks past n_active return at
// once. A key is read by a group of G lanes, each holding KP neighbouring dimensions of it (AttShare:
// 8 lanes, 16 for heads over 128), so that one load of a warp covers 32 / G neighbouring rows, a
// score is summed over log2(G) shuffles and its softmax step is taken once for 32 / G keys. (Before,
// one key a warp, 4 dimensions a lane: 87 warp instructions per (head, key) at 7B f16, issue-bound at
// 1.80 TB/s and 38.7 us a layer at 4096 keys, session 22's ncu on an H200.) Group g of warp w takes
// keys w*KW+g, then STRIDE = ATT_WARPS*KW further, ..., KB of them a batch: their K and V rows are
// loaded raw before any is used (one memory latency per batch; KB as many as ~64 registers hold) and
// decoded as they are used; only a range's last batch checks the range's end. Scores are in log2
// units (q pre-scaled by log2 e, exp2 after). Each group keeps its running (max, sum, output); the
// groups of a warp merge by shuffles, then the warps in shared memory. With n_active == 1 the block
// writes the normalised output (and its int8 blocks) itself. Otherwise each block leaves its (max,
// sum, unnormalised output) in `part` and counts itself in cnt[head]; the last block of the head
// merges the ranges (merge_ranges). head_dim <= 256.
#define ATT_WARPS 16
#define ATT_RANGE 128  // keys per range when attn_ranges counts the ranges

// How the decode attention shares a key among lanes, from PER = attn_per_lane(head_dim) (head_dim / 32
// rounded up to a power of two): KP dimensions a lane, G lanes a key, KW keys a warp at once; KB keys
// a group loads at once, as many raw rows as ~64 registers hold (48 with blocks: their encoding and
// decoding need more), at most 8.
template <int PER, int TK, int TV> struct AttShare {
    static constexpr int P2 = 32 * PER;
    static constexpr int KP = P2 <= 128 ? P2 / 8 : 16;
    static constexpr int G = P2 / KP;
    static constexpr int KW = 32 / G;
    static constexpr bool BLOCKS = TK >= KV_Q8_0 || TV >= KV_Q8_0;
    static constexpr int RR = RawRow<TK, KP>::N + RawRow<TV, KP>::N + (TK >= KV_Q8_0) + (TV >= KV_Q8_0);
    static constexpr int KB_REGS = (BLOCKS ? 48 : 64) / RR;
    static constexpr int KB = KB_REGS < 1 ? 1 : (KB_REGS > 8 ? 8 : KB_REGS);
};

// One range up to 2 * ATT_RANGE keys (a warp's second batch costs less than merging ranges), else
// min(n_split, ceil(n / ATT_RANGE)). backend.py (attn_splits) keeps n_split at most SMs / heads, so
// the blocks in use run in one wave. 7B graph replay, us per token, before (ranges of 128, up to 16
// a head) -> after: q4_0 at n = 129: 1791 -> 1734, 256: 1831 -> 1791, 513: 1991 -> 1906,
// 1025: 2198 -> 2042, 2048: 2521 -> 2267, 4096: 2923 -> 2753; f16 at 129: 3560 -> 3517,
// 1025: 3956 -> 3805, 4096: 4689 -> 4477; equal up to 128 and from 257 to 512 keys (measured with
// one key a warp). The grid keeps ATT_SPLITS blocks a head (gridDim.y), the ones past n_active
// returning at once: with only n_split a head, the next product launched earlier and its first loads
// slowed the step down (f16 at n = 65: 3457 -> 3491).
__device__ __forceinline__ int attn_ranges(int n, int n_split) {
    return n <= 2 * ATT_RANGE ? 1 : min(n_split, (n + ATT_RANGE - 1) / ATT_RANGE);
}

// A lane's raw share (dimensions d0 ..) of a row (fetch_row); where they straddle the end of an odd
// head size (not `whole`), f32 and f16 values come one by one (a float read from f16 storage is a
// half again).
template <int KV, int PER>
__device__ __forceinline__ void fetch_any(const u8* __restrict__ row, int d0, bool whole, int head_dim, RawRow<KV, PER>& r) {
    if (whole) {
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

// A group's keys t, t + STRIDE, ... (KB of them), raw; with MASK, zero from t1 on. Every load of
// the batch is issued before any is used.
template <int KP, int KB, int STRIDE, bool MASK, int TK, int TV>
__device__ __forceinline__ void load_batch(const u8* __restrict__ K, const u8* __restrict__ V, int rbk, int rbv, int t, int t1,
                                           int d0, bool whole, int head_dim, RawRow<TK, KP> (&k)[KB], RawRow<TV, KP> (&v)[KB]) {
#pragma unroll
    for (int j = 0; j < KB; j++) {
        const int tj = t + STRIDE * j;
        if (!MASK || tj < t1) {
            fetch_any<TK, KP>(K + (i64)tj * rbk, d0, whole, head_dim, k[j]);
            fetch_any<TV, KP>(V + (i64)tj * rbv, d0, whole, head_dim, v[j]);
        } else {
            zero_raw(k[j]);
            zero_raw(v[j]);
        }
    }
}

// Position n-1 in a batch: for the q8_0 / q4_0 types its row as this kernel encoded it (nk, nv), in
// place of what the cache held when it was loaded.
template <int KP, int KB, int STRIDE, int TK, int TV>
__device__ __forceinline__ void put_new_row(RawRow<TK, KP> (&k)[KB], RawRow<TV, KP> (&v)[KB], const RawRow<TK, KP>& nk,
                                            const RawRow<TV, KP>& nv, int t, int last) {
#pragma unroll
    for (int j = 0; j < KB; j++) {
        if (t + STRIDE * j == last) {
            if constexpr (TK >= KV_Q8_0) k[j] = nk;
            if constexpr (TV >= KV_Q8_0) v[j] = nv;
        }
    }
}

// A batch of a group's keys (t, t + STRIDE, ...) folded into its running (m, l, acc): each score
// summed over the group's G lanes; with MASK, keys from t1 on weigh nothing (a group with no key yet
// keeps m = -inf). Scores and m are in log2 units.
template <int KP, int KB, int G, int STRIDE, bool MASK, int TK, int TV>
__device__ __forceinline__ void fold_batch(const RawRow<TK, KP> (&k)[KB], const RawRow<TV, KP> (&v)[KB], const float (&qv)[KP],
                                           int d0, int t, int t1, float& m, float& l, float (&acc)[KP]) {
    float sc[KB];
#pragma unroll
    for (int j = 0; j < KB; j++) {
        float kf[KP];
        const float dk = decode_codes<TK, KP>(k[j], d0, kf);  // a block's scale once, not per value
        float a = 0.f;
#pragma unroll
        for (int e = 0; e < KP; e++) a = fmaf(qv[e], kf[e], a);
        sc[j] = a * dk;
    }
#pragma unroll
    for (int o = G / 2; o > 0; o >>= 1) {
#pragma unroll
        for (int j = 0; j < KB; j++) sc[j] += __shfl_xor_sync(0xffffffffu, sc[j], o);
    }
    float mb = m;
#pragma unroll
    for (int j = 0; j < KB; j++) {
        if (MASK && t + STRIDE * j >= t1) sc[j] = NEG_INF;
        mb = fmaxf(mb, sc[j]);
    }
    if (MASK && mb == NEG_INF) return;  // none of this group's keys yet
    const float c = exp2f(m - mb);  // 0 while m = -inf
    l *= c;
#pragma unroll
    for (int e = 0; e < KP; e++) acc[e] *= c;
#pragma unroll
    for (int j = 0; j < KB; j++) {
        const float p = exp2f(sc[j] - mb);  // 0 for a masked key (its row is zero)
        l += p;
        float vf[KP];
        const float pv = p * decode_codes<TV, KP>(v[j], d0, vf);
#pragma unroll
        for (int e = 0; e < KP; e++) acc[e] = fmaf(pv, vf[e], acc[e]);
    }
    m = mb;
}

// The groups of a warp merged (shuffles over the lanes G, 2G, ... apart): afterwards every group
// holds the warp's (m, l, acc).
template <int KP, int G>
__device__ __forceinline__ void merge_groups(float& m, float& l, float (&acc)[KP]) {
#pragma unroll
    for (int o = G; o < 32; o <<= 1) {
        const float om = __shfl_xor_sync(0xffffffffu, m, o), ol = __shfl_xor_sync(0xffffffffu, l, o);
        const float M = fmaxf(m, om);
        const float f = m == NEG_INF ? 0.f : exp2f(m - M), of = om == NEG_INF ? 0.f : exp2f(om - M);
        l = l * f + ol * of;
#pragma unroll
        for (int e = 0; e < KP; e++) acc[e] = acc[e] * f + __shfl_xor_sync(0xffffffffu, acc[e], o) * of;
        m = M;
    }
}

// Keys t0 .. t1-1 of one head (K, V: its rows) for warp `warp` of WARPS: group g of the warp takes keys
// t0 + warp*KW + g, then every STRIDE = WARPS*KW, KB of them a batch, whole batches without the
// range-end checks, then the last one masked. Ends with the warp's (m, l, acc) in every group (scores in
// log2 units: q pre-scaled by log2 e). With NEW, the row of position `last` (when in range) is nk / nv,
// not what the cache held when it was loaded (q8_0 / q4_0 rows encoded by attn_partial itself).
template <int PER, int WARPS, bool NEW, int TK, int TV>
__device__ __forceinline__ void attend_keys(const u8* __restrict__ K, const u8* __restrict__ V, int rbk, int rbv, int t0, int t1,
                                            int warp, int lane, int head_dim, const float (&qv)[AttShare<PER, TK, TV>::KP],
                                            const RawRow<TK, AttShare<PER, TK, TV>::KP>& nk,
                                            const RawRow<TV, AttShare<PER, TK, TV>::KP>& nv, int last, float& m, float& l,
                                            float (&acc)[AttShare<PER, TK, TV>::KP]) {
    using S = AttShare<PER, TK, TV>;
    constexpr int KP = S::KP, G = S::G, KB = S::KB, STRIDE = WARPS * S::KW, SPAN = STRIDE * KB;
    const int gl = lane % G, d0 = gl * KP, first = warp * S::KW + lane / G;  // the group's first key of a batch
    const bool whole = d0 + KP <= head_dim && head_dim % KP == 0;
    RawRow<TK, KP> k[KB];
    RawRow<TV, KP> v[KB];
#pragma unroll
    for (int e = 0; e < KP; e++) acc[e] = 0.f;
    m = NEG_INF;
    l = 0.f;
    int tb = t0;
    for (; tb + SPAN <= t1; tb += SPAN) {  // whole batches
        load_batch<KP, KB, STRIDE, false, TK, TV>(K, V, rbk, rbv, tb + first, t1, d0, whole, head_dim, k, v);
        if (NEW && last >= tb && last < tb + SPAN) put_new_row<KP, KB, STRIDE, TK, TV>(k, v, nk, nv, tb + first, last);
        fold_batch<KP, KB, G, STRIDE, false, TK, TV>(k, v, qv, d0, tb + first, t1, m, l, acc);
    }
    if (tb < t1) {  // the range's last keys
        load_batch<KP, KB, STRIDE, true, TK, TV>(K, V, rbk, rbv, tb + first, t1, d0, whole, head_dim, k, v);
        if (NEW && last >= tb) put_new_row<KP, KB, STRIDE, TK, TV>(k, v, nk, nv, tb + first, last);
        fold_batch<KP, KB, G, STRIDE, true, TK, TV>(k, v, qv, d0, tb + first, t1, m, l, acc);
    }
    merge_groups<KP, G>(m, l, acc);
}

// The last block of a head merges its n_active ranges (<= 32) from `part` (read from L2: the other
// blocks wrote them; their maxima in log2 units): the first warp turns each range's (max, sum) into
// one weight, then thread d forms output dimension d (blockDim >= head_dim) and, with q != nullptr,
// its int8 blocks.
__device__ __forceinline__ void merge_ranges(const float* p, int n_active, int head_dim, float* __restrict__ out,
                                             signed char* __restrict__ q, float* __restrict__ d, int base) {
    __shared__ float weight[32];
    const int stride = head_dim + 2, tid = threadIdx.x;
    if (tid < 32) {
        const float m = tid < n_active ? __ldcg(p + tid * stride) : NEG_INF;
        const float M = warp_max(m);
        const float e = tid < n_active ? exp2f(m - M) : 0.f;
        const float L = warp_sum(e * (tid < n_active ? __ldcg(p + tid * stride + 1) : 0.f));
        weight[tid] = e / L;
    }
    __syncthreads();
    if (tid >= head_dim) return;  // whole warps when head_dim % 32 == 0
    float v = 0.f;
#pragma unroll 4
    for (int s = 0; s < n_active; s++) v += weight[s] * __ldcg(p + s * stride + 2 + tid);
    out[tid] = v;
    if (q != nullptr) quantize_block(v, base + tid, q, d);
}

// Position n-1's rows for a q8_0 / q4_0 cache: the QKV product left them in `staged` as floats ((2,
// n_kv, head_dim): keys, then values); each warp of the last range's blocks encodes this lane's share
// (nk, nv: what a later read of the cache gives), and the first group of the first warp of the KV
// group's first head stores the rows. f32 / f16 rows the product stored in the cache itself.
template <int KP, int TK, int TV>
__device__ __forceinline__ void encode_new_rows(u8* __restrict__ krow, u8* __restrict__ vrow, const float* __restrict__ staged,
                                                int n_kv, int kvh, bool store, int gl, int head_dim, RawRow<TK, KP>& nk,
                                                RawRow<TV, KP>& nv) {
    if constexpr (TK >= KV_Q8_0) {
        float x[KP];
        load_dims<KP>(staged + (i64)kvh * head_dim, gl, head_dim, x);
        encode_row<TK, KP>(x, krow, store, gl, head_dim, &nk);
    }
    if constexpr (TV >= KV_Q8_0) {
        float x[KP];
        load_dims<KP>(staged + (i64)(n_kv + kvh) * head_dim, gl, head_dim, x);
        encode_row<TV, KP>(x, vrow, store, gl, head_dim, &nv);
    }
}

// kc, vc: the layer's cache of this slot (n_kv, n_ctx, row) as the KV types TK, TV; staged: the QKV
// product's q8_0 / q4_0 rows of this token as floats (encode_new_rows).
template <int PER, int TK, int TV>
__global__ void __launch_bounds__(32 * ATT_WARPS) attn_partial(const float* __restrict__ q, u8* __restrict__ kc,
        u8* __restrict__ vc, const float* __restrict__ staged, const i64* __restrict__ io, int n_ctx, int head_dim, int group,
        float scale, float* __restrict__ part, int* __restrict__ cnt, float* __restrict__ out, signed char* __restrict__ oq,
        float* __restrict__ od, int n_split) {
    using S = AttShare<PER, TK, TV>;
    constexpr int KP = S::KP, G = S::G;
    __shared__ float sm[ATT_WARPS], sl[ATT_WARPS], sacc[ATT_WARPS][256];
    pdl_trigger();
    const int h = blockIdx.x, s = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    const int n = (int)io[1] + 1;  // io is written before the step starts
    const int n_active = attn_ranges(n, n_split);
    if (s >= n_active) return;
    const int chunk = (n + n_active - 1) / n_active;
    const int t0 = s * chunk, t1 = min(n, t0 + chunk);
    const int kvh = h / group, rbk = kv_row_bytes<TK>(head_dim), rbv = kv_row_bytes<TV>(head_dim);
    const int gl = lane % G, d0 = gl * KP;
    const bool last_range = s == n_active - 1;
    u8* K = kc + (i64)kvh * n_ctx * rbk;
    u8* V = vc + (i64)kvh * n_ctx * rbv;
    // The rows are loaded after the wait: loading before it (all but position n-1, which the product
    // before this kernel writes) gave wrong f16 rows at head_dim 8 on an H200 under programmatic
    // launch (session 15: 0.8 of the largest logit at the second step; f32 and head_dim 64 unaffected).
    RawRow<TK, KP> nk;
    RawRow<TV, KP> nv;
    pdl_wait();
    if (S::BLOCKS && last_range)  // the same for the whole block
        encode_new_rows<KP, TK, TV>(K + (i64)(n - 1) * rbk, V + (i64)(n - 1) * rbv, staged, gridDim.x / group, kvh,
                                    h % group == 0 && warp == 0 && lane < G, gl, head_dim, nk, nv);
    float qv[KP], acc[KP], m, l;
    load_dims<KP>(q + h * head_dim, gl, head_dim, qv);
    const float qs = scale * 1.4426950408889634f;  // log2 e: scores in log2 units
#pragma unroll
    for (int e = 0; e < KP; e++) qv[e] *= qs;
    attend_keys<PER, ATT_WARPS, S::BLOCKS, TK, TV>(K, V, rbk, rbv, t0, t1, warp, lane, head_dim, qv, nk, nv,
                                                   last_range ? n - 1 : -1, m, l, acc);
    // merge the warps
    if (lane == 0) { sm[warp] = m; sl[warp] = l; }
    if (lane < G) {
#pragma unroll
        for (int e = 0; e < KP; e++) if (d0 + e < head_dim) sacc[warp][d0 + e] = acc[e];
    }
    __syncthreads();
    const int tid = threadIdx.x;  // one thread per output dimension from here
    float M = NEG_INF;
#pragma unroll
    for (int w = 0; w < ATT_WARPS; w++) M = fmaxf(M, sm[w]);
    float L = 0.f, val = 0.f;
#pragma unroll
    for (int w = 0; w < ATT_WARPS; w++) {
        const float f = sm[w] > NEG_INF ? exp2f(sm[w] - M) : 0.f;  // a warp with no keys has m = -inf
        L += sl[w] * f;
        if (tid < head_dim) val += sacc[w][tid] * f;
    }
    if (n_active == 1) {
        if (tid >= head_dim) return;  // whole warps when head_dim % 32 == 0
        val /= L;
        out[h * head_dim + tid] = val;
        if (oq != nullptr) quantize_block(val, h * head_dim + tid, oq, od);
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
    merge_ranges(ph, n_active, head_dim, out + h * head_dim, oq, od, h * head_dim);
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

// Attention of a batch of tokens of several sequences (a server's decode step): token t = blockIdx.y,
// head h = blockIdx.x attends to positions 0..pos[t] of slot seq[t] of k, v (n_seq, n_kv, n_ctx, row),
// stored as TK, TV (kv_write has stored this step's rows). The block's SEQ_WARPS warps share the keys
// as attn_partial's do (attend_keys: groups of lanes per key, batches), then their partial results are
// merged in shared memory. head_dim <= 256.
#define SEQ_WARPS 4
template <int PER, int TK, int TV>
__global__ void __launch_bounds__(32 * SEQ_WARPS) attn_seqs(const float* __restrict__ q,
        const u8* __restrict__ kc, const u8* __restrict__ vc, const i64* __restrict__ seq,
        const i64* __restrict__ pos, int n_heads, int n_kv, int n_ctx, int head_dim, float scale, float* __restrict__ out) {
    using S = AttShare<PER, TK, TV>;
    constexpr int KP = S::KP, G = S::G;
    __shared__ float sm[SEQ_WARPS], sl[SEQ_WARPS], sacc[SEQ_WARPS][256];
    const int h = blockIdx.x, t = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    const int n = (int)pos[t] + 1, gl = lane % G, d0 = gl * KP;
    const i64 slot = (seq[t] * n_kv + h / (n_heads / n_kv)) * (i64)n_ctx;
    const int rbk = kv_row_bytes<TK>(head_dim), rbv = kv_row_bytes<TV>(head_dim);
    const u8* K = kc + slot * rbk;
    const u8* V = vc + slot * rbv;
    float qv[KP], acc[KP], m, l;
    load_dims<KP>(q + ((i64)t * n_heads + h) * head_dim, gl, head_dim, qv);
    const float qs = scale * 1.4426950408889634f;  // log2 e: scores in log2 units
#pragma unroll
    for (int e = 0; e < KP; e++) qv[e] *= qs;
    RawRow<TK, KP> nk;  // no row of this step to put in: kv_write stored them
    RawRow<TV, KP> nv;
    attend_keys<PER, SEQ_WARPS, false, TK, TV>(K, V, rbk, rbv, 0, n, warp, lane, head_dim, qv, nk, nv, -1, m, l, acc);
    if (lane == 0) { sm[warp] = m; sl[warp] = l; }
    if (lane < G) {
#pragma unroll
        for (int e = 0; e < KP; e++) if (d0 + e < head_dim) sacc[warp][d0 + e] = acc[e];
    }
    __syncthreads();
    if (warp != 0) return;
    float M = NEG_INF;
    for (int w = 0; w < SEQ_WARPS; w++) M = fmaxf(M, sm[w]);
    float L = 0.f, f[SEQ_WARPS];
    for (int w = 0; w < SEQ_WARPS; w++) {
        f[w] = sm[w] == NEG_INF ? 0.f : exp2f(sm[w] - M);  // a warp with no keys (n < its first) adds nothing
        L += sl[w] * f[w];
    }
    for (int d = lane; d < head_dim; d += 32) {
        float o = 0.f;
        for (int w = 0; w < SEQ_WARPS; w++) o += sacc[w][d] * f[w];
        out[((i64)t * n_heads + h) * head_dim + d] = o / L;
    }
}
