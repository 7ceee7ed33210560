/*
 * iwarp fused attention kernel (see iwarp_attention.h for the contract).
 *
 * Design (flash-attention style, CUDA cores, fp32 accumulation):
 *   - One block = 4 warps = 128 threads, owning ROWS = 4 * R query rows of one batch entry
 *     (R = 8 rows per warp when dv <= 192, else R = 4, to bound the accumulator registers).
 *   - The block's Q rows live in shared memory for the whole kernel, pre-multiplied by
 *     scale * log2(e) so the softmax uses exp2f.
 *   - The key axis is walked in tiles of 32 keys. Per tile:
 *       1. the K tile (32 x d, float, row stride d4 + 1 so that lane j reading row j is
 *          bank-conflict free) and the 32 mask flags are loaded into shared memory;
 *       2. lane j of every warp computes the R scores q_r . k_j (Q read as float4 broadcasts);
 *       3. online softmax per row with warp shuffles: running max m, running sum l, the
 *          accumulators rescaled by exp2(m_old - m_new); masked keys get p = 0;
 *       4. the V tile (32 x dv, zero-padded to VC * 32 columns) replaces the K tile in the same
 *          shared buffer; each lane accumulates columns lane, lane + 32, ... (VC of them) for its
 *          warp's R rows, p_j broadcast by __shfl_sync.
 *     The scores exist only in registers: the Nq x Nk matrix is never written.
 *   - Split-K: when batch * query blocks would not fill the GPU (batch 1 at 256^2 has only 32-64
 *     query blocks), the key tiles are split over gridDim.z blocks that write unnormalised
 *     partial rows plus (m, l) to the workspace; a second kernel combines them.
 *   - Shared memory: ROWS * d4 + 32 + 32 * max(d4 + 1, VC * 32) floats, e.g. 86 KB for
 *     d = 256, dv = 515 (R = 4) and 21 KB for d = 64, dv = 131 (R = 8).
 */
#include "iwarp_attention.h"

#ifndef IWARP_CPU_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define IWARP_DYNAMIC_SMEM(type, name)                                                                                 \
    extern __shared__ __align__(16) unsigned char iwarp_smem_raw[];                                                    \
    type* name = reinterpret_cast<type*>(iwarp_smem_raw)
#define IWARP_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif

#include <math.h>
#include <string.h>

#include <atomic>

namespace iwarp_detail
{

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTileKeys = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
constexpr int kMaxDevices = 64;

__device__ __forceinline__ float to_float(float x)
{
    return x;
}
__device__ __forceinline__ float to_float(__half x)
{
    return __half2float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x)
{
    return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x)
{
    return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x)
{
    return __float2bfloat16_rn(x);
}

__device__ __forceinline__ float warp_max(float x)
{
    for (int offset = 16; offset > 0; offset >>= 1)
    {
        x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
    }
    return x;
}

__device__ __forceinline__ float warp_sum(float x)
{
    for (int offset = 16; offset > 0; offset >>= 1)
    {
        x += __shfl_xor_sync(kFullMask, x, offset);
    }
    return x;
}

struct Shape
{
    int batch;
    int nq;
    int nk;
    int d;
    int dv;
    int d4;      // d rounded up to a multiple of 4 (float4 reads of Q)
    int kstride; // d4 + 1: odd, so lanes reading different K rows hit different banks
    float qscale;
    int mask_type;
    int mask_batch_stride; // Nk, or 0 when the mask is broadcast over the batch
    int num_splits;
    int tiles_per_split;
};

// Whether key `key` of batch item `b` takes part: in range and not masked out. One copy for both
// kernels' shape structs (Shape, TcShape), which name these fields alike.
template <typename ShapeT>
__device__ __forceinline__ bool key_allowed(void const* mask, ShapeT const& s, int b, int key)
{
    if (key >= s.nk)
    {
        return false;
    }
    size_t const idx = static_cast<size_t>(b) * s.mask_batch_stride + key;
    if (s.mask_type == IWARP_MASK_FLOAT32)
    {
        return static_cast<float const*>(mask)[idx] != 0.0f;
    }
    if (s.mask_type == IWARP_MASK_BOOL)
    {
        return static_cast<uint8_t const*>(mask)[idx] != 0;
    }
    return true;
}

template <typename T, int R, int VC>
__global__ void __launch_bounds__(kThreads) attention_kernel(T const* __restrict__ q, T const* __restrict__ k,
    T const* __restrict__ v, void const* __restrict__ mask, T* __restrict__ out, float* __restrict__ workspace,
    Shape s)
{
    constexpr int kRows = kWarps * R;
    constexpr int kVStride = VC * 32;
    IWARP_DYNAMIC_SMEM(float, smem);
    float* q_s = smem;                  // [kRows][d4]
    float* mask_s = q_s + kRows * s.d4; // [32]
    float* kv_s = mask_s + kTileKeys;   // K tile [32][kstride], then V tile [32][kVStride]

    int const tid = static_cast<int>(threadIdx.x);
    int const lane = tid & 31;
    int const warp = tid >> 5;
    int const b = static_cast<int>(blockIdx.y);
    int const split = static_cast<int>(blockIdx.z);
    int const q0 = static_cast<int>(blockIdx.x) * kRows;

    // The block's queries, scaled into the log2 domain, zero rows/columns past the end.
    for (int r = warp; r < kRows; r += kWarps)
    {
        int const qi = q0 + r;
        T const* src = q + (static_cast<size_t>(b) * s.nq + qi) * s.d;
        for (int c = lane; c < s.d4; c += 32)
        {
            q_s[r * s.d4 + c] = (qi < s.nq && c < s.d) ? to_float(src[c]) * s.qscale : 0.0f;
        }
    }

    float m[R];
    float l[R];
    float acc[R][VC];
#pragma unroll
    for (int r = 0; r < R; ++r)
    {
        m[r] = -INFINITY;
        l[r] = 0.0f;
#pragma unroll
        for (int c = 0; c < VC; ++c)
        {
            acc[r][c] = 0.0f;
        }
    }

    int const num_tiles = (s.nk + kTileKeys - 1) / kTileKeys;
    int const t_begin = split * s.tiles_per_split;
    int const t_end = min(num_tiles, t_begin + s.tiles_per_split);
    float const* q_warp = q_s + warp * R * s.d4;
    T const* k_batch = k + static_cast<size_t>(b) * s.nk * s.d;
    T const* v_batch = v + static_cast<size_t>(b) * s.nk * s.dv;

    for (int t = t_begin; t < t_end; ++t)
    {
        int const k0 = t * kTileKeys;
        __syncthreads(); // Q stored (first tile) / previous V tile consumed

        for (int j = warp; j < kTileKeys; j += kWarps)
        {
            int const key = k0 + j;
            // A masked key is skipped, never read: its slot may hold NaN/Inf (unused cache rows),
            // and 0 * NaN would poison the row.
            bool const used = key_allowed(mask, s, b, key);
            T const* src = k_batch + static_cast<size_t>(key) * s.d;
            for (int c = lane; c < s.d4; c += 32)
            {
                kv_s[j * s.kstride + c] = (used && c < s.d) ? to_float(src[c]) : 0.0f;
            }
        }
        if (tid < kTileKeys)
        {
            mask_s[tid] = key_allowed(mask, s, b, k0 + tid) ? 1.0f : 0.0f;
        }
        __syncthreads();

        // Scores of this warp's R rows against key k0 + lane.
        float score[R];
#pragma unroll
        for (int r = 0; r < R; ++r)
        {
            score[r] = 0.0f;
        }
        float const* k_row = kv_s + lane * s.kstride;
        for (int c = 0; c < s.d4; c += 4)
        {
            float const k0v = k_row[c];
            float const k1v = k_row[c + 1];
            float const k2v = k_row[c + 2];
            float const k3v = k_row[c + 3];
#pragma unroll
            for (int r = 0; r < R; ++r)
            {
                float4 const qv = *reinterpret_cast<float4 const*>(q_warp + r * s.d4 + c);
                score[r] = fmaf(qv.x, k0v, score[r]);
                score[r] = fmaf(qv.y, k1v, score[r]);
                score[r] = fmaf(qv.z, k2v, score[r]);
                score[r] = fmaf(qv.w, k3v, score[r]);
            }
        }

        // Online softmax (log2 domain). m is uniform across the warp, so the branch is too.
        bool const allowed = mask_s[lane] != 0.0f;
        float p[R];
#pragma unroll
        for (int r = 0; r < R; ++r)
        {
            float const x = allowed ? score[r] : -INFINITY;
            float const m_new = fmaxf(m[r], warp_max(x));
            float alpha = 1.0f;
            if (m_new == -INFINITY)
            {
                p[r] = 0.0f; // nothing attended yet in this row
            }
            else
            {
                p[r] = exp2f(x - m_new);     // 0 for masked keys
                alpha = exp2f(m[r] - m_new); // 0 when m[r] was -inf
            }
            l[r] = l[r] * alpha + warp_sum(p[r]);
            m[r] = m_new;
#pragma unroll
            for (int c = 0; c < VC; ++c)
            {
                acc[r][c] *= alpha;
            }
        }
        __syncthreads(); // every warp is done with the K tile

        for (int j = warp; j < kTileKeys; j += kWarps)
        {
            int const key = k0 + j;
            bool const used = mask_s[j] != 0.0f; // masked: zeros instead of the slot's values
            T const* src = v_batch + static_cast<size_t>(key) * s.dv;
            for (int c = lane; c < kVStride; c += 32)
            {
                kv_s[j * kVStride + c] = (used && c < s.dv) ? to_float(src[c]) : 0.0f;
            }
        }
        __syncthreads();

#pragma unroll 4
        for (int j = 0; j < kTileKeys; ++j)
        {
            float pj[R];
#pragma unroll
            for (int r = 0; r < R; ++r)
            {
                pj[r] = __shfl_sync(kFullMask, p[r], j);
            }
            float const* v_row = kv_s + j * kVStride + lane;
#pragma unroll
            for (int c = 0; c < VC; ++c)
            {
                float const vv = v_row[c * 32];
#pragma unroll
                for (int r = 0; r < R; ++r)
                {
                    acc[r][c] = fmaf(pj[r], vv, acc[r][c]);
                }
            }
        }
    }

    // Epilogue: no barrier or shuffle below, so rows past the end may simply be skipped.
    size_t const rows_total = static_cast<size_t>(s.batch) * s.nq;
#pragma unroll
    for (int r = 0; r < R; ++r)
    {
        int const qi = q0 + warp * R + r;
        if (qi >= s.nq)
        {
            continue;
        }
        size_t const row = static_cast<size_t>(b) * s.nq + qi;
        if (s.num_splits == 1)
        {
            float const inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
            T* dst = out + row * s.dv;
#pragma unroll
            for (int c = 0; c < VC; ++c)
            {
                int const col = lane + c * 32;
                if (col < s.dv)
                {
                    dst[col] = from_float<T>(acc[r][c] * inv);
                }
            }
        }
        else
        {
            size_t const prow = static_cast<size_t>(split) * rows_total + row;
            float* dst = workspace + prow * s.dv;
#pragma unroll
            for (int c = 0; c < VC; ++c)
            {
                int const col = lane + c * 32;
                if (col < s.dv)
                {
                    dst[col] = acc[r][c];
                }
            }
            if (lane == 0)
            {
                float* ml = workspace + static_cast<size_t>(s.num_splits) * rows_total * s.dv;
                ml[prow * 2] = m[r];
                ml[prow * 2 + 1] = l[r];
            }
        }
    }
}

// One warp per (batch, query) row: merges the splits' partial rows with weights exp2(m_s - M).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    combine_kernel(float const* __restrict__ workspace, T* __restrict__ out, int rows_total, int dv, int num_splits)
{
    int const lane = static_cast<int>(threadIdx.x) & 31;
    int const row = static_cast<int>(blockIdx.x) * kWarps + (static_cast<int>(threadIdx.x) >> 5);
    if (row >= rows_total)
    {
        return;
    }
    float const* ml = workspace + static_cast<size_t>(num_splits) * rows_total * dv;
    float m_max = -INFINITY;
    for (int sp = 0; sp < num_splits; ++sp)
    {
        m_max = fmaxf(m_max, ml[(static_cast<size_t>(sp) * rows_total + row) * 2]);
    }
    float weight[IWARP_ATTENTION_MAX_SPLITS];
    float total = 0.0f;
#pragma unroll
    for (int sp = 0; sp < IWARP_ATTENTION_MAX_SPLITS; ++sp)
    {
        weight[sp] = 0.0f;
        if (sp < num_splits)
        {
            size_t const prow = static_cast<size_t>(sp) * rows_total + row;
            float const ms = ml[prow * 2];
            float const ls = ml[prow * 2 + 1];
            weight[sp] = (ms == -INFINITY) ? 0.0f : exp2f(ms - m_max);
            total += weight[sp] * ls;
        }
    }
    float const inv = total > 0.0f ? 1.0f / total : 0.0f;
    for (int col = lane; col < dv; col += 32)
    {
        float o = 0.0f;
#pragma unroll
        for (int sp = 0; sp < IWARP_ATTENTION_MAX_SPLITS; ++sp)
        {
            if (sp < num_splits)
            {
                o = fmaf(weight[sp], workspace[(static_cast<size_t>(sp) * rows_total + row) * dv + col], o);
            }
        }
        out[static_cast<size_t>(row) * dv + col] = from_float<T>(o * inv);
    }
}

// ---- host side ----------------------------------------------------------------------------------

inline int value_chunks(int dv)
{
    return (dv + 31) / 32;
}

// Register budget: R * VC accumulators per thread.
inline int rows_per_warp(int dv)
{
    return value_chunks(dv) <= 6 ? 8 : 4;
}

inline int rows_per_block(int dv)
{
    return kWarps * rows_per_warp(dv);
}

// The VC the kernel is instantiated with for a value width.
inline int value_chunks_bucket(int dv)
{
    int const vc = value_chunks(dv);
    int const buckets[] = {1, 2, 3, 4, 5, 6, 8, 12, 17};
    for (int bkt : buckets)
    {
        if (vc <= bkt)
        {
            return bkt;
        }
    }
    return -1;
}

inline int round_up4(int x)
{
    return (x + 3) & ~3;
}

inline size_t smem_bytes_for(int d, int dv)
{
    int const d4 = round_up4(d);
    int const vstride = value_chunks_bucket(dv) * 32;
    int const kv = kTileKeys * ((d4 + 1) > vstride ? (d4 + 1) : vstride);
    return static_cast<size_t>(rows_per_block(dv) * d4 + kTileKeys + kv) * sizeof(float);
}

struct DeviceInfo
{
    int sm_count;
    int smem_optin;
    int cc_major; // tensor-core kernel: 8 (Ampere) and newer
};

inline cudaError_t device_info(DeviceInfo* info)
{
    static std::atomic<int> cached_sm[kMaxDevices];
    static std::atomic<int> cached_smem[kMaxDevices];
    static std::atomic<int> cached_cc[kMaxDevices];
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess)
    {
        return err;
    }
    if (device >= 0 && device < kMaxDevices && cached_sm[device].load() > 0)
    {
        info->sm_count = cached_sm[device].load();
        info->smem_optin = cached_smem[device].load();
        info->cc_major = cached_cc[device].load();
        return cudaSuccess;
    }
    err = cudaDeviceGetAttribute(&info->sm_count, cudaDevAttrMultiProcessorCount, device);
    if (err == cudaSuccess)
    {
        err = cudaDeviceGetAttribute(&info->smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    }
    if (err == cudaSuccess)
    {
        err = cudaDeviceGetAttribute(&info->cc_major, cudaDevAttrComputeCapabilityMajor, device);
    }
    if (err == cudaSuccess && device >= 0 && device < kMaxDevices)
    {
        cached_smem[device].store(info->smem_optin);
        cached_cc[device].store(info->cc_major);
        cached_sm[device].store(info->sm_count);
    }
    return err;
}

template <typename T, int R, int VC>
cudaError_t launch(iwarp_attention_params const& p, cudaStream_t stream, DeviceInfo const& dev)
{
    constexpr int kRows = kWarps * R;
    Shape s;
    s.batch = p.batch;
    s.nq = p.num_queries;
    s.nk = p.num_keys;
    s.d = p.head_dim;
    s.dv = p.value_dim;
    s.d4 = round_up4(p.head_dim);
    s.kstride = s.d4 + 1;
    float const scale = p.scale > 0.0f ? p.scale : 1.0f / sqrtf(static_cast<float>(p.head_dim));
    s.qscale = scale * kLog2e;
    s.mask_type = p.mask == nullptr ? IWARP_MASK_NONE : p.mask_type;
    s.mask_batch_stride = p.mask_broadcast ? 0 : p.num_keys;

    size_t const smem = smem_bytes_for(p.head_dim, p.value_dim);
    if (smem > static_cast<size_t>(dev.smem_optin))
    {
        return cudaErrorInvalidValue;
    }

    int const num_tiles = (p.num_keys + kTileKeys - 1) / kTileKeys;
    int splits = p.num_splits > 0
        ? p.num_splits
        : iwarp_attention_choose_splits(p.batch, p.num_queries, p.num_keys, p.value_dim, dev.sm_count);
    splits = splits < IWARP_ATTENTION_MAX_SPLITS ? splits : IWARP_ATTENTION_MAX_SPLITS;
    splits = splits < num_tiles ? splits : num_tiles;
    size_t const per_split = iwarp_attention_workspace_size(p.batch, p.num_queries, p.value_dim, 2) / 2;
    if (splits > 1 && (p.workspace == nullptr || per_split == 0))
    {
        splits = 1;
    }
    else if (splits > 1 && p.workspace_bytes < per_split * static_cast<size_t>(splits))
    {
        splits = static_cast<int>(p.workspace_bytes / per_split);
    }
    if (splits < 1)
    {
        splits = 1;
    }
    s.tiles_per_split = splits > 1 ? (num_tiles + splits - 1) / splits : (num_tiles > 0 ? num_tiles : 1);
    if (splits > 1)
    {
        splits = (num_tiles + s.tiles_per_split - 1) / s.tiles_per_split; // no empty split
    }
    s.num_splits = splits;

    auto kernel = &attention_kernel<T, R, VC>;
    if (smem > 48 * 1024)
    {
        static std::atomic<int> configured[kMaxDevices];
        int device = 0;
        cudaGetDevice(&device);
        bool const cacheable = device >= 0 && device < kMaxDevices;
        if (!cacheable || configured[device].load() == 0)
        {
            cudaError_t const err
                = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dev.smem_optin);
            if (err != cudaSuccess)
            {
                return err;
            }
            if (cacheable)
            {
                configured[device].store(1);
            }
        }
    }

    T const* q = static_cast<T const*>(p.q);
    T const* k = static_cast<T const*>(p.k);
    T const* v = static_cast<T const*>(p.v);
    T* out = static_cast<T*>(p.out);
    float* ws = static_cast<float*>(p.workspace);
    dim3 const grid(static_cast<unsigned>((p.num_queries + kRows - 1) / kRows), static_cast<unsigned>(p.batch),
        static_cast<unsigned>(splits));
    IWARP_LAUNCH(kernel, grid, dim3(kThreads), smem, stream, q, k, v, p.mask, out, ws, s);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || splits == 1)
    {
        return err;
    }
    int const rows_total = p.batch * p.num_queries;
    auto combine = &combine_kernel<T>;
    dim3 const cgrid(static_cast<unsigned>((rows_total + kWarps - 1) / kWarps));
    IWARP_LAUNCH(combine, cgrid, dim3(kThreads), 0, stream, static_cast<float const*>(ws), out, rows_total,
        p.value_dim, splits);
    return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch(iwarp_attention_params const& p, cudaStream_t stream, DeviceInfo const& dev)
{
    switch (value_chunks_bucket(p.value_dim))
    {
    case 1: return launch<T, 8, 1>(p, stream, dev);
    case 2: return launch<T, 8, 2>(p, stream, dev);
    case 3: return launch<T, 8, 3>(p, stream, dev);
    case 4: return launch<T, 8, 4>(p, stream, dev);
    case 5: return launch<T, 8, 5>(p, stream, dev);
    case 6: return launch<T, 8, 6>(p, stream, dev);
    case 8: return launch<T, 4, 8>(p, stream, dev);
    case 12: return launch<T, 4, 12>(p, stream, dev);
    case 17: return launch<T, 4, 17>(p, stream, dev);
    default: return cudaErrorInvalidValue;
    }
}

// ---- tensor-core kernel (FP16 / BF16, sm_80 and newer) ------------------------------------------
//
// Flash-attention style on mma.sync.m16n8k16 tiles with FP32 accumulation:
//   - a block = 4 warps = 64 query rows (16 per warp) x one range of value columns (<= 128);
//     wide values (dv' = 320 of the shipped model, up to 544) are split over column blocks that
//     each recompute the scores (cheap: d is 64) so that the accumulators stay in registers;
//   - K/V tiles of 32 keys stream through a two-stage cp.async pipeline (16-byte copies when rows
//     are 16-byte aligned, plain loads otherwise, e.g. an odd value width);
//   - S = Q K^T and O += P V on tensor cores; the online softmax works on the mma accumulator
//     layout (row g and g + 8 of each warp tile, reduced over the 4 lanes of a row group);
//   - masked keys (and keys past the end) are never read: their K and V rows are zeros in shared
//     memory and their scores -inf, so NaN/Inf in unused slots cannot reach the output;
//   - split-K as the SIMT kernel: unnormalised rows + (m, l) in the workspace, combine_kernel.
// The CPU emulation runs this kernel too: cuda_cpu_emulation.h rebuilds each mma from the
// documented fragment layout across the warp's lanes, and cp.async becomes a plain copy.
namespace tc
{

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = kWarps * 16;
constexpr int kKeys = 32;
constexpr int kMaxCols = 128;
constexpr int kPad = 8; // halves of row padding: rows stay 16-byte aligned, fewer bank conflicts

struct TcShape
{
    int batch, nq, nk, d, dv;
    int d16;      // d rounded up to 16 (the mma k-step)
    int qstride;  // d16 + kPad
    int vstride;  // block columns + kPad
    int col_blocks;
    int num_splits;
    int tiles_per_split;
    float qscale; // scale * log2(e)
    int mask_type;
    int mask_batch_stride;
    int k_vec; // 16-byte cp.async for K rows
    int v_vec; // ... and for V rows
};

template <typename T>
struct Mma;

template <>
struct Mma<__half>
{
    static __device__ __forceinline__ void run(float c[4], uint32_t const a[4], uint32_t const b[2])
    {
#ifdef IWARP_CPU_EMULATION
        iwarp_emu::mma_m16n8k16<__half>(c, a, b);
#else
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi)
    {
        __half2 h = __floats2half2_rn(lo, hi); // .x = lo: the lower 16 bits (smaller k index)
        uint32_t bits;
        memcpy(&bits, &h, sizeof(bits));
        return bits;
    }
    static __device__ __forceinline__ __half from(float x)
    {
        return __float2half_rn(x);
    }
};

template <>
struct Mma<__nv_bfloat16>
{
    static __device__ __forceinline__ void run(float c[4], uint32_t const a[4], uint32_t const b[2])
    {
#ifdef IWARP_CPU_EMULATION
        iwarp_emu::mma_m16n8k16<__nv_bfloat16>(c, a, b);
#else
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
    }
    static __device__ __forceinline__ uint32_t pack(float lo, float hi)
    {
        __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        uint32_t bits;
        memcpy(&bits, &h, sizeof(bits));
        return bits;
    }
    static __device__ __forceinline__ __nv_bfloat16 from(float x)
    {
        return __float2bfloat16_rn(x);
    }
};

#ifdef IWARP_CPU_EMULATION
inline void cp_async16(void* smem, void const* gmem)
{
    memcpy(smem, gmem, 16); // synchronous: the barrier after the wait orders it all the same
}
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait()
{
}
#else
__device__ __forceinline__ void cp_async16(void* smem, void const* gmem)
{
    unsigned const s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}

__device__ __forceinline__ void cp_async_commit()
{
    asm volatile("cp.async.commit_group;\n" ::);
}

template <int N>
__device__ __forceinline__ void cp_async_wait()
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#endif

// One K/V tile (keys k0 .. k0 + 31, the block's value columns) into shared memory.
template <typename T, int NT>
__device__ __forceinline__ void load_tile(T const* __restrict__ k_batch, T const* __restrict__ v_batch,
    void const* __restrict__ mask, TcShape const& s, int b, int k0, int col0, T* k_s, T* v_s, int* mask_s)
{
    constexpr int kCols = NT * 8;
    int const tid = static_cast<int>(threadIdx.x);
    if (tid < kKeys)
    {
        mask_s[tid] = key_allowed(mask, s, b, k0 + tid) ? 1 : 0;
    }
    T const zero = Mma<T>::from(0.0f);
    // K: 32 rows x d16 columns, in chunks of 8 halves.
    int const k_chunks = s.d16 / 8;
    for (int idx = tid; idx < kKeys * k_chunks; idx += kThreads)
    {
        int const j = idx / k_chunks;
        int const c = (idx - j * k_chunks) * 8;
        int const key = k0 + j;
        T* dst = k_s + j * s.qstride + c;
        bool const used = key_allowed(mask, s, b, key);
        T const* src = k_batch + static_cast<size_t>(key) * s.d + c;
        if (used && s.k_vec && c + 8 <= s.d)
        {
            cp_async16(dst, src);
        }
        else
        {
#pragma unroll
            for (int e = 0; e < 8; ++e)
            {
                dst[e] = (used && c + e < s.d) ? src[e] : zero;
            }
        }
    }
    // V: 32 rows x the block's kCols columns.
    constexpr int v_chunks = kCols / 8;
    for (int idx = tid; idx < kKeys * v_chunks; idx += kThreads)
    {
        int const j = idx / v_chunks;
        int const c = (idx - j * v_chunks) * 8;
        int const key = k0 + j;
        int const col = col0 + c;
        T* dst = v_s + j * s.vstride + c;
        bool const used = key_allowed(mask, s, b, key);
        T const* src = v_batch + static_cast<size_t>(key) * s.dv + col;
        if (used && s.v_vec && col + 8 <= s.dv)
        {
            cp_async16(dst, src);
        }
        else
        {
#pragma unroll
            for (int e = 0; e < 8; ++e)
            {
                dst[e] = (used && col + e < s.dv) ? src[e] : zero;
            }
        }
    }
}

template <typename T, int NT>
__global__ void __launch_bounds__(kThreads) attention_tc_kernel(T const* __restrict__ q, T const* __restrict__ k,
    T const* __restrict__ v, void const* __restrict__ mask, T* __restrict__ out, float* __restrict__ workspace,
    TcShape s)
{
#if defined(IWARP_CPU_EMULATION) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
    constexpr int kCols = NT * 8;
    IWARP_DYNAMIC_SMEM(T, smem);
    T* q_s = smem;                                // [kRows][qstride]
    T* k_s0 = q_s + kRows * s.qstride;            // 2 x [kKeys][qstride]
    T* v_s0 = k_s0 + 2 * kKeys * s.qstride;       // 2 x [kKeys][vstride]
    int* mask_s0 = reinterpret_cast<int*>(v_s0 + 2 * kKeys * s.vstride); // 2 x [kKeys]
    uint16_t const* v_raw0 = reinterpret_cast<uint16_t const*>(v_s0);

    int const tid = static_cast<int>(threadIdx.x);
    int const lane = tid & 31;
    int const warp = tid >> 5;
    int const g = lane >> 2;  // row group: rows g and g + 8 of the warp's 16
    int const tig = lane & 3; // thread in group: columns tig * 2, tig * 2 + 1
    int const qblock = static_cast<int>(blockIdx.x) / s.col_blocks;
    int const cblock = static_cast<int>(blockIdx.x) - qblock * s.col_blocks;
    int const b = static_cast<int>(blockIdx.y);
    int const split = static_cast<int>(blockIdx.z);
    int const q0 = qblock * kRows;
    int const col0 = cblock * kCols;
    T const zero = Mma<T>::from(0.0f);

    T const* k_batch = k + static_cast<size_t>(b) * s.nk * s.d;
    T const* v_batch = v + static_cast<size_t>(b) * s.nk * s.dv;
    int const num_tiles = (s.nk + kKeys - 1) / kKeys;
    int const t_begin = split * s.tiles_per_split;
    int const t_end = min(num_tiles, t_begin + s.tiles_per_split);

    if (t_begin < t_end)
    {
        load_tile<T, NT>(k_batch, v_batch, mask, s, b, t_begin * kKeys, col0, k_s0, v_s0, mask_s0);
    }
    cp_async_commit();
    // The block's queries (zero rows past the end, zero columns past d), plain loads: once.
    for (int idx = tid; idx < kRows * s.d16; idx += kThreads)
    {
        int const r = idx / s.d16;
        int const c = idx - r * s.d16;
        int const qi = q0 + r;
        q_s[r * s.qstride + c] = (qi < s.nq && c < s.d) ? q[(static_cast<size_t>(b) * s.nq + qi) * s.d + c] : zero;
    }

    float m[2] = {-INFINITY, -INFINITY};
    float l[2] = {0.0f, 0.0f}; // this thread's part of the row sums (reduced at the end)
    float o[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n)
    {
        o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    }
    uint32_t const* q_row0 = reinterpret_cast<uint32_t const*>(q_s + (warp * 16 + g) * s.qstride);
    uint32_t const* q_row8 = reinterpret_cast<uint32_t const*>(q_s + (warp * 16 + g + 8) * s.qstride);

    for (int t = t_begin; t < t_end; ++t)
    {
        int const stage = (t - t_begin) & 1;
        if (t + 1 < t_end)
        {
            int const next = stage ^ 1;
            load_tile<T, NT>(k_batch, v_batch, mask, s, b, (t + 1) * kKeys, col0, k_s0 + next * kKeys * s.qstride,
                v_s0 + next * kKeys * s.vstride, mask_s0 + next * kKeys);
            cp_async_commit();
            cp_async_wait<1>();
        }
        else
        {
            cp_async_wait<0>();
        }
        __syncthreads(); // tile t (and, first time, Q) visible to every warp

        T const* k_s = k_s0 + stage * kKeys * s.qstride;
        uint16_t const* v_raw = v_raw0 + stage * kKeys * s.vstride;
        int const* mask_s = mask_s0 + stage * kKeys;

        // S (16 x 32 per warp) = Q K^T.
        float sc[4][4];
#pragma unroll
        for (int n = 0; n < 4; ++n)
        {
            sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.0f;
        }
        for (int kk = 0; kk < s.d16; kk += 16)
        {
            uint32_t a[4];
            int const w = (kk >> 1) + tig; // 32-bit word of column kk + tig * 2
            a[0] = q_row0[w];
            a[1] = q_row8[w];
            a[2] = q_row0[w + 4];
            a[3] = q_row8[w + 4];
#pragma unroll
            for (int n = 0; n < 4; ++n)
            {
                uint32_t const* k_row = reinterpret_cast<uint32_t const*>(k_s + (n * 8 + g) * s.qstride);
                uint32_t const bfrag[2] = {k_row[w], k_row[w + 4]};
                Mma<T>::run(sc[n], a, bfrag);
            }
        }

        // Online softmax in the log2 domain; rows g (elements 0, 1) and g + 8 (elements 2, 3).
        float row_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < 4; ++n)
        {
#pragma unroll
            for (int e = 0; e < 4; ++e)
            {
                int const key = n * 8 + tig * 2 + (e & 1);
                sc[n][e] = mask_s[key] ? sc[n][e] * s.qscale : -INFINITY;
                row_max[e >> 1] = fmaxf(row_max[e >> 1], sc[n][e]);
            }
        }
        float alpha[2];
#pragma unroll
        for (int h = 0; h < 2; ++h)
        {
            row_max[h] = fmaxf(row_max[h], __shfl_xor_sync(kFullMask, row_max[h], 1));
            row_max[h] = fmaxf(row_max[h], __shfl_xor_sync(kFullMask, row_max[h], 2));
            float const m_new = fmaxf(m[h], row_max[h]);
            alpha[h] = (m_new == -INFINITY) ? 1.0f : exp2f(m[h] - m_new); // 0 when m[h] was -inf
            m[h] = m_new;
        }
        float p_sum[2] = {0.0f, 0.0f};
#pragma unroll
        for (int n = 0; n < 4; ++n)
        {
#pragma unroll
            for (int e = 0; e < 4; ++e)
            {
                float const mh = m[e >> 1];
                float const p = (mh == -INFINITY || sc[n][e] == -INFINITY) ? 0.0f : exp2f(sc[n][e] - mh);
                sc[n][e] = p;
                p_sum[e >> 1] += p;
            }
        }
        l[0] = l[0] * alpha[0] + p_sum[0];
        l[1] = l[1] * alpha[1] + p_sum[1];
#pragma unroll
        for (int n = 0; n < NT; ++n)
        {
            o[n][0] *= alpha[0];
            o[n][1] *= alpha[0];
            o[n][2] *= alpha[1];
            o[n][3] *= alpha[1];
        }

        // O += P V: the score accumulators of key tiles 2 ks and 2 ks + 1 are the A fragment.
#pragma unroll
        for (int ks = 0; ks < 2; ++ks)
        {
            uint32_t a[4];
            a[0] = Mma<T>::pack(sc[2 * ks][0], sc[2 * ks][1]);
            a[1] = Mma<T>::pack(sc[2 * ks][2], sc[2 * ks][3]);
            a[2] = Mma<T>::pack(sc[2 * ks + 1][0], sc[2 * ks + 1][1]);
            a[3] = Mma<T>::pack(sc[2 * ks + 1][2], sc[2 * ks + 1][3]);
            int const key = ks * 16 + tig * 2;
            uint16_t const* v0 = v_raw + key * s.vstride + g;
#pragma unroll
            for (int n = 0; n < NT; ++n)
            {
                uint32_t const bfrag[2] = {
                    static_cast<uint32_t>(v0[n * 8]) | (static_cast<uint32_t>(v0[s.vstride + n * 8]) << 16),
                    static_cast<uint32_t>(v0[8 * s.vstride + n * 8])
                        | (static_cast<uint32_t>(v0[9 * s.vstride + n * 8]) << 16)};
                Mma<T>::run(o[n], a, bfrag);
            }
        }
        __syncthreads(); // every warp is done with this stage before it is refilled
    }

    // Epilogue: row sums over the 4 lanes of a row group, then the rows of this column block.
#pragma unroll
    for (int h = 0; h < 2; ++h)
    {
        l[h] += __shfl_xor_sync(kFullMask, l[h], 1);
        l[h] += __shfl_xor_sync(kFullMask, l[h], 2);
    }
    size_t const rows_total = static_cast<size_t>(s.batch) * s.nq;
#pragma unroll
    for (int h = 0; h < 2; ++h)
    {
        int const qi = q0 + warp * 16 + g + 8 * h;
        if (qi >= s.nq)
        {
            continue;
        }
        size_t const row = static_cast<size_t>(b) * s.nq + qi;
        float const inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
#pragma unroll
        for (int n = 0; n < NT; ++n)
        {
#pragma unroll
            for (int e = 0; e < 2; ++e)
            {
                int const col = col0 + n * 8 + tig * 2 + e;
                if (col >= s.dv)
                {
                    continue;
                }
                float const val = o[n][2 * h + e];
                if (s.num_splits == 1)
                {
                    out[row * s.dv + col] = Mma<T>::from(val * inv);
                }
                else
                {
                    workspace[(static_cast<size_t>(split) * rows_total + row) * s.dv + col] = val;
                }
            }
        }
        if (s.num_splits > 1 && cblock == 0 && tig == 0)
        {
            float* ml = workspace + static_cast<size_t>(s.num_splits) * rows_total * s.dv;
            size_t const prow = static_cast<size_t>(split) * rows_total + row;
            ml[prow * 2] = m[h];
            ml[prow * 2 + 1] = l[h];
        }
    }
#else
    __trap(); // built without sm_80+ code: the host side never launches it there
#endif
}

// Column blocks and their width (n8 tiles, even, <= 16) for a value width.
inline void column_split(int dv, int* col_blocks, int* nt)
{
    int const blocks = (dv + kMaxCols - 1) / kMaxCols;
    int const cols = (dv + blocks - 1) / blocks;
    int tiles = (cols + 7) / 8;
    tiles += tiles & 1;
    *col_blocks = (dv + tiles * 8 - 1) / (tiles * 8);
    *nt = tiles;
}

inline size_t smem_bytes(int d, int dv)
{
    int col_blocks = 0, nt = 0;
    column_split(dv, &col_blocks, &nt);
    int const d16 = (d + 15) & ~15;
    size_t const halves = static_cast<size_t>(kRows) * (d16 + kPad) + 2u * kKeys * (d16 + kPad)
        + 2u * kKeys * (nt * 8 + kPad);
    return halves * 2 + 2u * kKeys * sizeof(int);
}

inline int choose_splits(int batch, int nq, int nk, int dv, int sm_count)
{
    int col_blocks = 0, nt = 0;
    column_split(dv, &col_blocks, &nt);
    long long const q_blocks = static_cast<long long>(batch) * ((nq + kRows - 1) / kRows) * col_blocks;
    int const tiles = (nk + kKeys - 1) / kKeys;
    long long const target = 2LL * (sm_count > 0 ? sm_count : 1);
    if (q_blocks >= target || tiles < 4)
    {
        return 1;
    }
    long long splits = (target + q_blocks - 1) / q_blocks;
    splits = splits > IWARP_ATTENTION_MAX_SPLITS ? IWARP_ATTENTION_MAX_SPLITS : splits;
    splits = splits > tiles / 2 ? tiles / 2 : splits;
    return splits < 1 ? 1 : static_cast<int>(splits);
}

template <typename T, int NT>
cudaError_t launch_tc(iwarp_attention_params const& p, cudaStream_t stream, DeviceInfo const& dev, int col_blocks)
{
    TcShape s;
    s.batch = p.batch;
    s.nq = p.num_queries;
    s.nk = p.num_keys;
    s.d = p.head_dim;
    s.dv = p.value_dim;
    s.d16 = (p.head_dim + 15) & ~15;
    s.qstride = s.d16 + kPad;
    s.vstride = NT * 8 + kPad;
    s.col_blocks = col_blocks;
    float const scale = p.scale > 0.0f ? p.scale : 1.0f / sqrtf(static_cast<float>(p.head_dim));
    s.qscale = scale * kLog2e;
    s.mask_type = p.mask == nullptr ? IWARP_MASK_NONE : p.mask_type;
    s.mask_batch_stride = p.mask_broadcast ? 0 : p.num_keys;
    s.k_vec = (p.head_dim % 8 == 0) && (reinterpret_cast<uintptr_t>(p.k) % 16 == 0);
    s.v_vec = (p.value_dim % 8 == 0) && (reinterpret_cast<uintptr_t>(p.v) % 16 == 0);

    size_t const smem = smem_bytes(p.head_dim, p.value_dim);
    int const num_tiles = (p.num_keys + kKeys - 1) / kKeys;
    int splits = p.num_splits > 0
        ? p.num_splits
        : choose_splits(p.batch, p.num_queries, p.num_keys, p.value_dim, dev.sm_count);
    splits = splits < IWARP_ATTENTION_MAX_SPLITS ? splits : IWARP_ATTENTION_MAX_SPLITS;
    splits = splits < num_tiles ? splits : num_tiles;
    size_t const per_split = iwarp_attention_workspace_size(p.batch, p.num_queries, p.value_dim, 2) / 2;
    if (splits > 1 && (p.workspace == nullptr || per_split == 0))
    {
        splits = 1;
    }
    else if (splits > 1 && p.workspace_bytes < per_split * static_cast<size_t>(splits))
    {
        splits = static_cast<int>(p.workspace_bytes / per_split);
    }
    splits = splits < 1 ? 1 : splits;
    s.tiles_per_split = splits > 1 ? (num_tiles + splits - 1) / splits : (num_tiles > 0 ? num_tiles : 1);
    if (splits > 1)
    {
        splits = (num_tiles + s.tiles_per_split - 1) / s.tiles_per_split;
    }
    s.num_splits = splits;

    auto kernel = &attention_tc_kernel<T, NT>;
    if (smem > 48 * 1024)
    {
        cudaError_t const err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
            static_cast<int>(smem));
        if (err != cudaSuccess)
        {
            return err;
        }
    }
    dim3 const grid(static_cast<unsigned>(((p.num_queries + kRows - 1) / kRows) * col_blocks),
        static_cast<unsigned>(p.batch), static_cast<unsigned>(splits));
    float* ws = static_cast<float*>(p.workspace);
    IWARP_LAUNCH(kernel, grid, dim3(kThreads), smem, stream, static_cast<T const*>(p.q), static_cast<T const*>(p.k),
        static_cast<T const*>(p.v), p.mask, static_cast<T*>(p.out), ws, s);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess || splits == 1)
    {
        return err;
    }
    int const rows_total = p.batch * p.num_queries;
    auto combine = &combine_kernel<T>;
    dim3 const cgrid(static_cast<unsigned>((rows_total + iwarp_detail::kWarps - 1) / iwarp_detail::kWarps));
    IWARP_LAUNCH(combine, cgrid, dim3(iwarp_detail::kThreads), 0, stream, static_cast<float const*>(ws),
        static_cast<T*>(p.out), rows_total, p.value_dim, splits);
    return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_tc(iwarp_attention_params const& p, cudaStream_t stream, DeviceInfo const& dev)
{
    int col_blocks = 0, nt = 0;
    column_split(p.value_dim, &col_blocks, &nt);
    switch (nt)
    {
    case 2: return launch_tc<T, 2>(p, stream, dev, col_blocks);
    case 4: return launch_tc<T, 4>(p, stream, dev, col_blocks);
    case 6: return launch_tc<T, 6>(p, stream, dev, col_blocks);
    case 8: return launch_tc<T, 8>(p, stream, dev, col_blocks);
    case 10: return launch_tc<T, 10>(p, stream, dev, col_blocks);
    case 12: return launch_tc<T, 12>(p, stream, dev, col_blocks);
    case 14: return launch_tc<T, 14>(p, stream, dev, col_blocks);
    case 16: return launch_tc<T, 16>(p, stream, dev, col_blocks);
    default: return cudaErrorInvalidValue;
    }
}

} // namespace tc

// Which kernel runs a problem on this device: tensor cores for FP16/BF16 on sm_80+ when asked
// for (or auto) and the tile fits in shared memory; the SIMT kernel otherwise (BF16: none).
inline int select_kernel(iwarp_attention_params const& p, DeviceInfo const& dev)
{
    bool const tc_ok = p.dtype != IWARP_DTYPE_FLOAT32 && dev.cc_major >= 8
        && tc::smem_bytes(p.head_dim, p.value_dim) <= static_cast<size_t>(dev.smem_optin);
    if (p.kernel == IWARP_KERNEL_TENSOR_CORES)
    {
        return tc_ok ? IWARP_KERNEL_TENSOR_CORES : -1;
    }
    if (tc_ok && p.kernel == IWARP_KERNEL_AUTO)
    {
        return IWARP_KERNEL_TENSOR_CORES;
    }
    return p.dtype == IWARP_DTYPE_BFLOAT16 ? -1 : IWARP_KERNEL_SIMT;
}

} // namespace iwarp_detail

extern "C" int iwarp_attention_choose_splits(int batch, int num_queries, int num_keys, int value_dim, int sm_count)
{
    using namespace iwarp_detail;
    if (batch <= 0 || num_queries <= 0 || value_dim <= 0)
    {
        return 1;
    }
    int const rows = rows_per_block(value_dim);
    long long const q_blocks = static_cast<long long>(batch) * ((num_queries + rows - 1) / rows);
    int const tiles = (num_keys + kTileKeys - 1) / kTileKeys;
    long long const target = 2LL * (sm_count > 0 ? sm_count : 1); // about two blocks per SM
    if (q_blocks >= target || tiles < 4)
    {
        return 1;
    }
    long long splits = (target + q_blocks - 1) / q_blocks;
    if (splits > IWARP_ATTENTION_MAX_SPLITS)
    {
        splits = IWARP_ATTENTION_MAX_SPLITS;
    }
    if (splits > tiles / 2)
    {
        splits = tiles / 2; // at least two key tiles per split
    }
    return splits < 1 ? 1 : static_cast<int>(splits);
}

extern "C" size_t iwarp_attention_workspace_size(int batch, int num_queries, int value_dim, int num_splits)
{
    if (num_splits <= 1 || batch <= 0 || num_queries <= 0 || value_dim <= 0)
    {
        return 0;
    }
    return static_cast<size_t>(num_splits) * batch * num_queries * (static_cast<size_t>(value_dim) + 2)
        * sizeof(float);
}

extern "C" size_t iwarp_attention_workspace_bound(int max_batch, int max_queries, int value_dim, int sm_count)
{
    using namespace iwarp_detail;
    if (max_batch <= 0 || max_queries <= 0 || value_dim <= 0)
    {
        return 0;
    }
    // Splits happen only when batch * query blocks < target = 2 * SMs, and then
    // splits * query blocks < target + query blocks < 2 * target.
    // The tensor-core kernel's blocks have 64 rows (and may be split into column blocks, which
    // only lowers its split count), the SIMT kernel's 16 or 32: bound by the larger.
    size_t const rows = 64u > static_cast<size_t>(rows_per_block(value_dim)) ? 64u
                                                                          : static_cast<size_t>(rows_per_block(value_dim));
    size_t const target = 2u * static_cast<size_t>(sm_count > 0 ? sm_count : 1);
    size_t const by_heuristic = 2u * target * rows;
    size_t const by_shape = static_cast<size_t>(IWARP_ATTENTION_MAX_SPLITS) * max_batch * max_queries;
    size_t const split_rows = by_heuristic < by_shape ? by_heuristic : by_shape;
    return split_rows * (static_cast<size_t>(value_dim) + 2) * sizeof(float);
}

extern "C" size_t iwarp_attention_smem_bytes(int head_dim, int value_dim)
{
    if (head_dim <= 0 || value_dim <= 0 || iwarp_detail::value_chunks_bucket(value_dim) < 0)
    {
        return 0;
    }
    return iwarp_detail::smem_bytes_for(head_dim, value_dim);
}

extern "C" cudaError_t iwarp_attention_forward(iwarp_attention_params const* params, cudaStream_t stream)
{
    using namespace iwarp_detail;
    if (params == nullptr)
    {
        return cudaErrorInvalidValue;
    }
    iwarp_attention_params const& p = *params;
    if (p.batch < 0 || p.num_queries < 0 || p.num_keys < 0 || p.head_dim < 1
        || p.head_dim > IWARP_ATTENTION_MAX_HEAD_DIM || p.value_dim < 1 || p.value_dim > IWARP_ATTENTION_MAX_VALUE_DIM)
    {
        return cudaErrorInvalidValue;
    }
    if (p.batch == 0 || p.num_queries == 0)
    {
        return cudaSuccess;
    }
    if (p.q == nullptr || p.out == nullptr || (p.num_keys > 0 && (p.k == nullptr || p.v == nullptr))
        || (p.mask_type != IWARP_MASK_NONE && p.mask == nullptr))
    {
        return cudaErrorInvalidValue;
    }
    DeviceInfo dev;
    cudaError_t const err = device_info(&dev);
    if (err != cudaSuccess)
    {
        return err;
    }
    int const kernel = select_kernel(p, dev);
    if (kernel == IWARP_KERNEL_TENSOR_CORES)
    {
        return p.dtype == IWARP_DTYPE_FLOAT16 ? tc::dispatch_tc<__half>(p, stream, dev)
                                              : tc::dispatch_tc<__nv_bfloat16>(p, stream, dev);
    }
    if (kernel == IWARP_KERNEL_SIMT && p.dtype == IWARP_DTYPE_FLOAT32)
    {
        return dispatch<float>(p, stream, dev);
    }
    if (kernel == IWARP_KERNEL_SIMT && p.dtype == IWARP_DTYPE_FLOAT16)
    {
        return dispatch<__half>(p, stream, dev);
    }
    return cudaErrorInvalidValue;
}

extern "C" int iwarp_attention_selected_kernel(iwarp_attention_params const* params)
{
    using namespace iwarp_detail;
    if (params == nullptr)
    {
        return -1;
    }
    DeviceInfo dev;
    if (device_info(&dev) != cudaSuccess)
    {
        return -1;
    }
    return select_kernel(*params, dev);
}

#ifdef IWARP_CPU_EMULATION
/* Test hook of the CPU emulation: the multiprocessor count and shared memory limit it reports. */
extern "C" void iwarp_emulation_set_device(int sm_count, int smem_optin)
{
    iwarp_emu::g_sm_count = sm_count;
    iwarp_emu::g_smem_optin = smem_optin;
}

/* Test hook: the compute capability major it reports (8 and up: the tensor-core kernel runs). */
extern "C" void iwarp_emulation_set_compute_capability(int major)
{
    iwarp_emu::g_cc_major = major;
}
#endif
