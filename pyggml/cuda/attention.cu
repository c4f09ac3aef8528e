// Attention over the KV cache: one token's decode step (attn_partial: key ranges merged by the last
// block of each head), a prompt batch of one sequence (attn_prompt), a batch of tokens of several
// sequences (attn_seqs). Compiled after kvcache.cu (module.py, CUDA_SOURCES).

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
                                             signed char* __restrict__ q, float* __restrict__ d, int base) {
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
    if (q != nullptr) quantize_block(v, base + tid, q, d);
}

// kc, vc: the layer's cache of this slot (n_kv, n_ctx, row) as the KV types TK, TV; staged: the QKV
// product's q8_0 / q4_0 rows of this token as floats ((2, n_kv, head_dim): keys, then values), which
// the first head of each KV group's block with position n-1 stores (new_row).
template <int PER, int TK, int TV>
__global__ void __launch_bounds__(32 * ATT_WARPS) attn_partial(const float* __restrict__ q, u8* __restrict__ kc,
        u8* __restrict__ vc, const float* __restrict__ staged, const i64* __restrict__ io, int n_ctx, int head_dim, int group,
        float scale, float* __restrict__ part, int* __restrict__ cnt, float* __restrict__ out, signed char* __restrict__ oq,
        float* __restrict__ od, int n_split) {
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
