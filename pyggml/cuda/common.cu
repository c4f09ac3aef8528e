// pyggml's CUDA kernels, compiled once by cupy (NVRTC) and cached on disk; backend.py drives them.
// The source is these files in this order, one module (module.py, CUDA_SOURCES): common.cu (types,
// helpers, programmatic launch), decoders.cu, matvec.cu, ops.cu, kvcache.cu, attention.cu, mmq.cu.
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

