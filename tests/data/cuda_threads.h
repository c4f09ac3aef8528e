// A threaded CPU emulation of enough CUDA to run whole kernels with g++ (tests/test_cuda_mmq_emulated.py):
// one std::thread per CUDA thread, a barrier per warp for the collective operations (shuffles, and
// mma.sync with the PTX ISA's fragment layouts), blocks one after another.
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <barrier>
#include <thread>
#include <vector>
#include <memory>
#include <string>
#include <atomic>
#define __device__
#define __global__
#define __host__
#define __constant__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(n)
#define __align__(n) alignas(n)
#define __shared__ static
typedef unsigned char u8; typedef unsigned short u16; typedef unsigned int u32; typedef long long i64;
struct float2 { float x, y; };
inline float2 make_float2(float a, float b) { return {a, b}; }
struct alignas(8) int2 { int x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct Dim { unsigned x, y, z; };
thread_local Dim threadIdx;
Dim blockIdx, gridDim, blockDim;
struct __half { _Float16 v; };
inline float __half2float(__half h) { return (float)h.v; }
inline __half __ushort_as_half(u16 u) { __half h; memcpy(&h, &u, 2); return h; }
struct alignas(16) uint4 { u32 x, y, z, w; };
struct alignas(8) uint2 { u32 x, y; };
template <class A, class B> inline A bit_as(B b) { static_assert(sizeof(A) == sizeof(B)); A a; memcpy(&a, &b, sizeof a); return a; }
inline float __uint_as_float(u32 u) { return bit_as<float>(u); }
inline u32 __float_as_uint(float f) { return bit_as<u32>(f); }
inline float __int_as_float(int i) { return bit_as<float>(i); }
inline __half __float2half_rn(float f) { __half h; h.v = (_Float16)f; return h; }
inline u32 __byte_perm(u32 x, u32 y, u32 s) { u8 b[8]; memcpy(b, &x, 4); memcpy(b + 4, &y, 4); u32 r = 0; for (int i = 0; i < 4; i++) r |= (u32)b[(s >> 4*i) & 7] << 8*i; return r; }
inline u32 __vsub4(u32 a, u32 b) { u32 r = 0; for (int i = 0; i < 4; i++) r |= (u32)((u8)((a >> 8*i) - (b >> 8*i))) << 8*i; return r; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

template <class T> inline T __ldcg(const T* p) { return *(volatile const T*)p; }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
std::barrier<>* block_bar;
inline void __syncthreads() { block_bar->arrive_and_wait(); }

struct Warp { std::unique_ptr<std::barrier<>> bar; u32 vals[32]; int regs[32][6]; };
thread_local Warp* my_warp;
inline void warp_sync() { my_warp->bar->arrive_and_wait(); }
template <class T> inline T shfl(T v, int src) {
  static_assert(sizeof(T) == 4, "4-byte shuffles");
  const int lane = threadIdx.x & 31;
  u32 bits; memcpy(&bits, &v, 4); my_warp->vals[lane] = bits; warp_sync();
  u32 r = my_warp->vals[src & 31]; warp_sync(); T out; memcpy(&out, &r, 4); return out;
}
template <class T> inline T __shfl_xor_sync(unsigned, T v, int o) { return shfl(v, (threadIdx.x & 31) ^ o); }

inline int byte_of(int reg, int k) { return (int)(signed char)(reg >> (8 * k)); }
// mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32: A (16 x 32) in a0..a3, B (32 x 8) in b0, b1, C (16 x 8) in c.
// Lane = 4 * group + t: a0 = row group, k 4t..4t+3; a1 = row group + 8, same k; a2, a3: k + 16.
// b0 = column group, k 4t..4t+3; b1: k + 16. c0, c1 = row group, columns 2t, 2t + 1; c2, c3: row group + 8.
inline void mma_k32(int (&c)[4], int a0, int a1, int a2, int a3, int b0, int b1) {
  const int lane = threadIdx.x & 31;
  int* r = my_warp->regs[lane];
  r[0] = a0; r[1] = a1; r[2] = a2; r[3] = a3; r[4] = b0; r[5] = b1;
  warp_sync();
  for (int i = 0; i < 4; i++) {
    const int row = lane / 4 + 8 * (i / 2), col = 2 * (lane % 4) + i % 2;
    int sum = 0;
    for (int k = 0; k < 32; k++) {
      const int a = byte_of(my_warp->regs[(row % 8) * 4 + (k % 16) / 4][(row / 8) + 2 * (k / 16)], k % 4);
      const int b = byte_of(my_warp->regs[col * 4 + (k % 16) / 4][4 + k / 16], k % 4);
      sum += a * b;
    }
    c[i] += sum;
  }
  warp_sync();
}
// mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32: a0 = row group, k 4t..4t+3; a1 = row group + 8; b0 = column group.
inline void mma_k16(int (&c)[4], int a0, int a1, int b0) {
  const int lane = threadIdx.x & 31;
  int* r = my_warp->regs[lane];
  r[0] = a0; r[1] = a1; r[4] = b0;
  warp_sync();
  for (int i = 0; i < 4; i++) {
    const int row = lane / 4 + 8 * (i / 2), col = 2 * (lane % 4) + i % 2;
    int sum = 0;
    for (int k = 0; k < 16; k++)
      sum += byte_of(my_warp->regs[(row % 8) * 4 + k / 4][row / 8], k % 4) * byte_of(my_warp->regs[col * 4 + k / 4][4], k % 4);
    c[i] += sum;
  }
  warp_sync();
}

// The drivers' files: all the bytes of one, and bytes written to one.
inline std::vector<u8> read_file(const std::string& p) {
  FILE* f = fopen(p.c_str(), "rb"); std::vector<u8> v; int c; while ((c = fgetc(f)) != EOF) v.push_back((u8)c); fclose(f); return v; }
inline void write_file(const std::string& p, const void* data, size_t n) { FILE* f = fopen(p.c_str(), "wb"); fwrite(data, 1, n, f); fclose(f); }

// Blocks run one after another, in order or (blocks_in_reverse) the other way round: a kernel must
// not depend on the order, and a test can show that it does not.
bool blocks_in_reverse = false;
template <class F> void launch(Dim grid, Dim block, F body) {
  gridDim = grid; blockDim = block;
  for (unsigned bz = 0; bz < grid.z; bz++) for (unsigned by = 0; by < grid.y; by++) for (unsigned i = 0; i < grid.x; i++) {
    const unsigned bx = blocks_in_reverse ? grid.x - 1 - i : i;
    blockIdx = {bx, by, bz};
    std::barrier<> bb(block.x); block_bar = &bb;
    std::vector<Warp> warps(block.x / 32);
    for (auto& w : warps) w.bar = std::make_unique<std::barrier<>>(32);
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < block.x; t++) ts.emplace_back([&, t] { threadIdx = {t, 0, 0}; my_warp = &warps[t / 32]; body(); });
    for (auto& th : ts) th.join();
  }
}
#define QK 32
#define QK_K 256
