// The small kernels of a step: int8 quantization of activations, RMSNorm, QK norm with RoPE, rows
// of the embedding, a weight as fp16 for the prompt's tensor-core products, RoPE, SwiGLU.
// Compiled after matvec.cu (module.py, CUDA_SOURCES).

// ------------------------------------------------------------------------- small decode ops
extern "C" __global__ void quantize_q8(const float* __restrict__ x, int n, signed char* __restrict__ q, float* __restrict__ d) {
    pdl_trigger();
    pdl_wait();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i - (threadIdx.x & 31) >= n) return;  // whole warps only: n % 32 == 0
    quantize_block(x[i], i, q, d);
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
        int n, float* __restrict__ out, signed char* __restrict__ q, float* __restrict__ d) {
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
    if (q != nullptr && i - (int)(threadIdx.x & 31) < n) quantize_block(v, i, q, d);
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

extern "C" __global__ void silu_mul(const float* g, const float* u, i64 n, float* out) {
    pdl_trigger();
    pdl_wait();
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        out[i] = g[i] / (1.f + expf(-g[i])) * u[i];
}

