/*
 * iwarp fused attention: softmax(Q K^T * scale, key mask) V' in one pass.
 *
 * The single attention call of implicit warping (iwarp/model/warp.py::attention): queries of the
 * driving frame against every token of every cached source image plus the learned extra tokens,
 * with V' = [V | P | K] so that A V, A P and A K come out of one call. The (queries x keys)
 * matrix is never written to memory.
 *
 * No TensorRT or PyTorch dependency: the TensorRT plugin (plugins/tensorrt) and the PyTorch op
 * (plugins/torch) both call iwarp_attention_forward().
 *
 * Tensors (all contiguous, row-major):
 *   q     (B, Nq, d)    float32, float16 or bfloat16
 *   k     (B, Nk, d)    same type as q
 *   v     (B, Nk, dv)   same type as q; dv is any width 1..IWARP_ATTENTION_MAX_VALUE_DIM
 *   mask  (B, Nk)       or (1, Nk) with mask_broadcast = 1; float32 (nonzero = attend) or
 *                       bool/uint8 (nonzero = attend); or none (every key attends)
 *   out   (B, Nq, dv)   same type as q
 * Accumulation is always float32. float16/bfloat16 run on tensor cores (mma.sync, sm_80+);
 * float32 (and float16 before sm_80) on CUDA cores. Masked keys are skipped, never read: NaN/Inf
 * in their slots of k and v does not reach the output.
 * A query row whose keys are all masked (or Nk = 0) gets zeros, as the exported ONNX graph does
 * (its IsNaN -> Where after the softmax); every element of `out` is written.
 *
 * Compiled by nvcc for the GPU, or by a host C++20 compiler with -DIWARP_CPU_EMULATION (see
 * cuda_cpu_emulation.h), which runs the very same kernel source on the CPU for the tests.
 */
#ifndef IWARP_ATTENTION_H
#define IWARP_ATTENTION_H

#include <stddef.h>
#include <stdint.h>

#ifdef IWARP_CPU_EMULATION
#include "cuda_cpu_emulation.h"
#else
#include <cuda_runtime_api.h>
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define IWARP_ATTENTION_VERSION "1"
/* Largest supported query/key width d and value width dv (V' = [V | P | K] of the paper
 * config: 256 + 3 + 256 = 515). Larger values return cudaErrorInvalidValue. */
#define IWARP_ATTENTION_MAX_HEAD_DIM 256
#define IWARP_ATTENTION_MAX_VALUE_DIM 544
/* Upper bound of the split-K factor (the key axis split over several blocks, then combined). */
#define IWARP_ATTENTION_MAX_SPLITS 8

typedef enum iwarp_dtype
{
    IWARP_DTYPE_FLOAT32 = 0,
    IWARP_DTYPE_FLOAT16 = 1,
    IWARP_DTYPE_BFLOAT16 = 2 /* tensor-core kernel only (sm_80 and newer) */
} iwarp_dtype;

typedef enum iwarp_mask_type
{
    IWARP_MASK_NONE = 0,    /* every key attends */
    IWARP_MASK_FLOAT32 = 1, /* float32 (B, Nk): nonzero = attend (the TensorRT plugin's form) */
    IWARP_MASK_BOOL = 2     /* bool / uint8 (B, Nk): nonzero = attend (the PyTorch op's form) */
} iwarp_mask_type;

typedef enum iwarp_kernel
{
    IWARP_KERNEL_AUTO = 0,        /* tensor cores for float16/bfloat16 on sm_80+, else SIMT */
    IWARP_KERNEL_SIMT = 1,        /* CUDA cores, float32 accumulate (float32, float16) */
    IWARP_KERNEL_TENSOR_CORES = 2 /* mma.sync m16n8k16, float32 accumulate (float16, bfloat16) */
} iwarp_kernel;

typedef struct iwarp_attention_params
{
    int batch;       /* B */
    int num_queries; /* Nq */
    int num_keys;    /* Nk (0 allowed: output is zeros) */
    int head_dim;    /* d, 1..IWARP_ATTENTION_MAX_HEAD_DIM */
    int value_dim;   /* dv, 1..IWARP_ATTENTION_MAX_VALUE_DIM */
    float scale;     /* logit scale; <= 0 means 1 / sqrt(d) */
    iwarp_dtype dtype;
    iwarp_mask_type mask_type;
    int mask_broadcast; /* 1: mask is (1, Nk), shared by the whole batch */
    void const* q;
    void const* k;
    void const* v;
    void const* mask;
    void* out;
    /* Scratch for split-K partial results (float32). May be NULL / 0: then no split is used.
     * iwarp_attention_workspace_size() gives what the heuristic wants for a shape. */
    void* workspace;
    size_t workspace_bytes;
    /* 0: choose the split count with the heuristic; 1: never split; n > 1: use n (clamped to
     * IWARP_ATTENTION_MAX_SPLITS, the number of key tiles and the workspace). */
    int num_splits;
    /* iwarp_kernel: which kernel runs it (AUTO: the faster one the device allows). */
    int kernel;
} iwarp_attention_params;

/* Launches the attention (and, when the key axis is split, the combine kernel) on `stream`.
 * Returns cudaSuccess, cudaErrorInvalidValue for unsupported arguments, or the launch error. */
cudaError_t iwarp_attention_forward(iwarp_attention_params const* params, cudaStream_t stream);

/* The split count the heuristic picks for a shape on a GPU with `sm_count` multiprocessors. */
int iwarp_attention_choose_splits(int batch, int num_queries, int num_keys, int value_dim, int sm_count);

/* Workspace bytes for `num_splits` (0 for num_splits <= 1). */
size_t iwarp_attention_workspace_size(int batch, int num_queries, int value_dim, int num_splits);

/* A workspace size that is enough for every shape with batch <= max_batch and
 * num_queries <= max_queries on a GPU with `sm_count` multiprocessors (the TensorRT plugin's
 * getWorkspaceSize). */
size_t iwarp_attention_workspace_bound(int max_batch, int max_queries, int value_dim, int sm_count);

/* The kernel (iwarp_kernel) that iwarp_attention_forward runs for these params on the current
 * device; -1 when none can (e.g. bfloat16 before sm_80). Reads only the shape/dtype fields. */
int iwarp_attention_selected_kernel(iwarp_attention_params const* params);

/* Dynamic shared memory the SIMT kernel needs for (d, dv), in bytes. */
size_t iwarp_attention_smem_bytes(int head_dim, int value_dim);

#ifdef __cplusplus
}
#endif

#endif /* IWARP_ATTENTION_H */
