/*
 * A small CPU stand-in for the parts of CUDA that iwarp_attention.cu uses, so that the real kernel
 * source can be compiled by g++ (-std=c++20 -DIWARP_CPU_EMULATION) and tested on a machine
 * without a GPU.
 *
 * Every CUDA thread of a block runs as one std::thread; __syncthreads() is a block-wide
 * std::barrier, warp shuffles exchange values through a per-warp slot array between two warp
 * barriers, dynamic shared memory is one buffer per block (filled with NaN bytes, so a read of
 * shared memory that was never written poisons the result). Blocks run one after another.
 *
 * Test-only: slow (one OS thread per CUDA thread) and no substitute for a run on a GPU (no
 * timing, no memory model beyond the barriers), but it executes the kernel's indexing, tiling,
 * masking, online softmax and split-K combine exactly as written.
 */
#ifndef IWARP_CUDA_CPU_EMULATION_H
#define IWARP_CUDA_CPU_EMULATION_H

#ifndef __cplusplus
#error "cuda_cpu_emulation.h needs C++20"
#endif

#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

/* ---- runtime API subset ------------------------------------------------------------------- */
enum cudaError
{
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorLaunchFailure = 719
};
typedef enum cudaError cudaError_t;
typedef struct CUstream_st* cudaStream_t;

enum cudaDeviceAttr
{
    cudaDevAttrMultiProcessorCount = 16,
    cudaDevAttrComputeCapabilityMajor = 75,
    cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
};
enum cudaFuncAttribute
{
    cudaFuncAttributeMaxDynamicSharedMemorySize = 8
};

struct dim3
{
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1)
        : x(x_)
        , y(y_)
        , z(z_)
    {
    }
};

struct alignas(16) float4
{
    float x, y, z, w;
};

typedef _Float16 __half;
struct __half2
{
    __half x, y;
};
/* bfloat16: the upper 16 bits of a float32, rounded to nearest even. */
struct __nv_bfloat16
{
    uint16_t bits;
};
struct __nv_bfloat162
{
    __nv_bfloat16 x, y;
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace iwarp_emu
{
/* Emulated device properties; tests may change them (e.g. a small SM count to force splits). */
inline int g_sm_count = 4;
inline int g_smem_optin = 227 * 1024;
inline int g_cc_major = 0; /* 0: no tensor cores (the SIMT kernel); tests set 8 */

struct Warp
{
    explicit Warp(std::ptrdiff_t n)
        : bar(n)
    {
    }
    std::barrier<> bar;
    uint64_t slots[32];
    uint32_t mma_a[32][4]; /* the lanes' mma fragments, exchanged as the tensor core does */
    uint32_t mma_b[32][2];
};

struct Block
{
    Block(std::ptrdiff_t nthreads, size_t smem_bytes)
        : bar(nthreads)
        , smem((smem_bytes + 15) / 16 + 1)
    {
        std::memset(static_cast<void*>(smem.data()), 0xff, smem.size() * sizeof(float4));
        for (std::ptrdiff_t w = 0; w < (nthreads + 31) / 32; ++w)
        {
            std::ptrdiff_t n = nthreads - w * 32 < 32 ? nthreads - w * 32 : 32;
            warps.emplace_back(new Warp(n));
        }
    }
    std::barrier<> bar;
    std::vector<float4> smem;
    std::vector<std::unique_ptr<Warp>> warps;
};

inline thread_local Block* tl_block = nullptr;
inline thread_local Warp* tl_warp = nullptr;
} // namespace iwarp_emu

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

inline void __syncthreads()
{
    iwarp_emu::tl_block->bar.arrive_and_wait();
}

namespace iwarp_emu
{
template <typename T>
inline T shuffle(T value, int src_lane)
{
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 8 bytes");
    Warp* w = tl_warp;
    int const lane = static_cast<int>(threadIdx.x) & 31;
    uint64_t bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    w->slots[lane] = bits;
    w->bar.arrive_and_wait();
    uint64_t got = w->slots[src_lane & 31];
    w->bar.arrive_and_wait();
    T out;
    std::memcpy(&out, &got, sizeof(T));
    return out;
}
} // namespace iwarp_emu

template <typename T>
inline T __shfl_sync(unsigned /*mask*/, T value, int src_lane, int /*width*/ = 32)
{
    return iwarp_emu::shuffle(value, src_lane);
}

template <typename T>
inline T __shfl_xor_sync(unsigned /*mask*/, T value, int lane_mask, int /*width*/ = 32)
{
    int const lane = static_cast<int>(threadIdx.x) & 31;
    return iwarp_emu::shuffle(value, lane ^ lane_mask);
}

inline int min(int a, int b)
{
    return a < b ? a : b;
}

inline float __half2float(__half h)
{
    return static_cast<float>(h);
}
inline __half __float2half_rn(float f)
{
    return static_cast<__half>(f);
}
inline __half2 __floats2half2_rn(float lo, float hi)
{
    return __half2{static_cast<__half>(lo), static_cast<__half>(hi)};
}
inline float __bfloat162float(__nv_bfloat16 b)
{
    uint32_t const x = static_cast<uint32_t>(b.bits) << 16;
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f)
{
    uint32_t x;
    std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u)
    {
        return __nv_bfloat16{static_cast<uint16_t>((x >> 16) | 0x40u)}; // quiet NaN
    }
    x += 0x7fffu + ((x >> 16) & 1u);
    return __nv_bfloat16{static_cast<uint16_t>(x >> 16)};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi)
{
    return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}

namespace iwarp_emu
{
template <typename T>
inline float element(uint32_t reg, int upper);
template <>
inline float element<__half>(uint32_t reg, int upper)
{
    uint16_t const bits = static_cast<uint16_t>(upper ? reg >> 16 : reg & 0xffffu);
    __half h;
    std::memcpy(&h, &bits, 2);
    return static_cast<float>(h);
}
template <>
inline float element<__nv_bfloat16>(uint32_t reg, int upper)
{
    return __bfloat162float(__nv_bfloat16{static_cast<uint16_t>(upper ? reg >> 16 : reg & 0xffffu)});
}

/* mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: D = A (16x16) B (16x8) + C, rebuilt from the
 * 32 lanes' fragments with PTX's documented layout (group g = lane / 4, t = lane % 4):
 *   A: a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9], a3 = A[g+8][2t+8, 2t+9]
 *   B: b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]
 *   C/D: c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]
 * (lower 16 bits = the first element of each pair). */
template <typename T>
inline void mma_m16n8k16(float c[4], uint32_t const a[4], uint32_t const b[2])
{
    Warp* w = tl_warp;
    int const lane = static_cast<int>(threadIdx.x) & 31;
    for (int i = 0; i < 4; ++i)
        w->mma_a[lane][i] = a[i];
    w->mma_b[lane][0] = b[0];
    w->mma_b[lane][1] = b[1];
    w->bar.arrive_and_wait();
    float A[16][16];
    float B[16][8];
    for (int l = 0; l < 32; ++l)
    {
        int const g = l >> 2;
        int const t = l & 3;
        for (int e = 0; e < 2; ++e)
        {
            A[g][2 * t + e] = element<T>(w->mma_a[l][0], e);
            A[g + 8][2 * t + e] = element<T>(w->mma_a[l][1], e);
            A[g][2 * t + 8 + e] = element<T>(w->mma_a[l][2], e);
            A[g + 8][2 * t + 8 + e] = element<T>(w->mma_a[l][3], e);
            B[2 * t + e][g] = element<T>(w->mma_b[l][0], e);
            B[2 * t + 8 + e][g] = element<T>(w->mma_b[l][1], e);
        }
    }
    w->bar.arrive_and_wait();
    int const g = lane >> 2;
    int const t = lane & 3;
    for (int e = 0; e < 4; ++e)
    {
        int const row = g + (e >> 1) * 8;
        int const col = 2 * t + (e & 1);
        float acc = c[e];
        for (int k = 0; k < 16; ++k)
            acc += A[row][k] * B[k][col];
        c[e] = acc;
    }
}
} // namespace iwarp_emu

#define IWARP_DYNAMIC_SMEM(type, name) type* name = reinterpret_cast<type*>(iwarp_emu::tl_block->smem.data())

inline cudaError_t cudaGetDevice(int* device)
{
    *device = 0;
    return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/)
{
    // Compute capability: 0 by default (no tensor cores: the SIMT kernel), tests may set 8.
    *value = attr == cudaDevAttrMultiProcessorCount ? iwarp_emu::g_sm_count
        : attr == cudaDevAttrComputeCapabilityMajor ? iwarp_emu::g_cc_major
                                                    : iwarp_emu::g_smem_optin;
    return cudaSuccess;
}
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int)
{
    return cudaSuccess;
}
inline cudaError_t cudaGetLastError()
{
    return cudaSuccess;
}
inline char const* cudaGetErrorString(cudaError_t e)
{
    return e == cudaSuccess ? "no error" : "emulated CUDA error";
}

namespace iwarp_emu
{
/* Runs kernel<<<grid, block, smem>>>(args...) on the CPU, block after block. */
template <typename... KArgs, typename... Args>
cudaError_t launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, Args... args)
{
    std::ptrdiff_t const nthreads = static_cast<std::ptrdiff_t>(block.x) * block.y * block.z;
    if (nthreads <= 0 || nthreads > 1024 || smem_bytes > static_cast<size_t>(g_smem_optin))
    {
        return cudaErrorInvalidValue;
    }
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx)
            {
                Block blk(nthreads, smem_bytes);
                std::vector<std::thread> threads;
                threads.reserve(static_cast<size_t>(nthreads));
                for (std::ptrdiff_t t = 0; t < nthreads; ++t)
                {
                    threads.emplace_back(
                        [&, t]()
                        {
                            tl_block = &blk;
                            tl_warp = blk.warps[static_cast<size_t>(t / 32)].get();
                            unsigned const ut = static_cast<unsigned>(t);
                            threadIdx = dim3(ut % block.x, (ut / block.x) % block.y, ut / (block.x * block.y));
                            blockIdx = dim3(bx, by, bz);
                            blockDim = block;
                            gridDim = grid;
                            kernel(args...);
                        });
                }
                for (auto& th : threads)
                {
                    th.join();
                }
            }
    return cudaSuccess;
}
} // namespace iwarp_emu

#define IWARP_LAUNCH(kernel, grid, block, smem, stream, ...) ((void)(stream), iwarp_emu::launch(kernel, grid, block, smem, __VA_ARGS__))

#endif /* IWARP_CUDA_CPU_EMULATION_H */
