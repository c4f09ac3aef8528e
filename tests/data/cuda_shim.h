// Just enough of CUDA's device vocabulary (one thread, x86 semantics of __dp4a, __vsub4, __byte_perm)
// to compile matvec.cu's wide-path device functions with g++: tests/test_cuda_emulated.py.
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <cmath>
#define __device__
#define __constant__
#define __forceinline__ inline
#define __restrict__
#define __align__(n) alignas(n)
typedef unsigned char u8; typedef unsigned short u16; typedef unsigned int u32; typedef long long i64;
struct int4 { int x, y, z, w; }; struct uint4 { u32 x, y, z, w; }; struct uint2 { u32 x, y; };
struct float2 { float x, y; }; inline float2 make_float2(float a, float b) { return {a, b}; }
#define QK 32
#define QK_K 256
inline int __dp4a(int a, int b, int c) { for (int i = 0; i < 4; i++) c += (int)(signed char)(a >> (8*i)) * (int)(signed char)(b >> (8*i)); return c; }
inline u32 __vsub4(u32 a, u32 b) { u32 r = 0; for (int i = 0; i < 4; i++) r |= (u32)((u8)((a >> 8*i) - (b >> 8*i))) << 8*i; return r; }
inline u32 __byte_perm(u32 x, u32 y, u32 s) { u8 b[8]; memcpy(b, &x, 4); memcpy(b + 4, &y, 4); u32 r = 0; for (int i = 0; i < 4; i++) r |= (u32)b[(s >> 4*i) & 7] << 8*i; return r; }
inline float f16(u16 h) { // IEEE half -> float
  u32 s = (h >> 15) & 1, e = (h >> 10) & 31, m = h & 1023; float v;
  if (e == 0) v = ldexpf((float)m, -24); else if (e == 31) v = m ? NAN : INFINITY; else v = ldexpf((float)(m | 1024), (int)e - 25);
  return s ? -v : v; }
inline u16 ld16(const u8* p) { u16 v; memcpy(&v, p, 2); return v; }
inline u32 ld32(const u8* p) { u32 v; memcpy(&v, p, 4); return v; }
inline u32 spread4(u32 t) { return (t * 0x00204081u) & 0x01010101u; }
template <int T> struct no_decoder { static constexpr bool value = false; };
struct { int x; } threadIdx;
struct Input { const int* q; const float* d; const float* f; };
