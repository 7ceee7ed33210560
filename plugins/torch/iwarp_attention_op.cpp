/*
 * The fused attention kernel as a PyTorch op:
 *
 *   torch.ops.iwarp.attention(q, k, v, mask=None, scale=0.0, kernel=0) -> Tensor
 *     q (B, Nq, d), k (B, Nk, d), v (B, Nk, dv): CUDA, float32, float16 or bfloat16 (one dtype)
 *     mask (B, Nk) or (1, Nk): bool (True = attend) or float (nonzero = attend), or None
 *     scale <= 0: 1/sqrt(d); kernel: 0 auto (tensor cores for fp16/bf16 on sm_80+), 1 SIMT,
 *     2 tensor cores (iwarp_kernel)
 *     -> (B, Nq, dv), same dtype as q; rows with every key masked are zeros
 *   torch.ops.iwarp.attention_out(q, k, v, mask, scale, out, kernel=0) -> out  (writes into `out`)
 *   torch.ops.iwarp.selected_kernel(q, v, kernel=0) -> int   which kernel runs q/v's shape here
 *                                                            (1 SIMT, 2 tensor cores, -1 none)
 *
 * Same semantics as iwarp.model.warp.attention (F.scaled_dot_product_attention with a bool
 * mask), one kernel, no (Nq x Nk) matrix in memory. Runs on the current CUDA stream, so it can
 * be captured in a CUDA graph. Built by torch.utils.cpp_extension together with
 * plugins/kernels/iwarp_attention.cu (iwarp/model/fused_attention.py).
 */
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "iwarp_attention.h"

#include <optional>

namespace
{

void check_inputs(at::Tensor const& q, at::Tensor const& k, at::Tensor const& v, std::optional<at::Tensor> const& mask)
{
    TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "iwarp::attention: q, k, v must be 3-D");
    TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
        "iwarp::attention: float32, float16 or bfloat16 inputs, got ", q.scalar_type());
    TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
        "iwarp::attention: q, k, v must have one dtype");
    TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "iwarp::attention: batch sizes differ");
    TORCH_CHECK(k.size(2) == q.size(2), "iwarp::attention: q and k widths differ");
    TORCH_CHECK(v.size(1) == k.size(1), "iwarp::attention: k and v token counts differ");
    TORCH_CHECK(q.size(2) <= IWARP_ATTENTION_MAX_HEAD_DIM, "iwarp::attention: d > ", IWARP_ATTENTION_MAX_HEAD_DIM);
    TORCH_CHECK(v.size(2) <= IWARP_ATTENTION_MAX_VALUE_DIM, "iwarp::attention: dv > ", IWARP_ATTENTION_MAX_VALUE_DIM);
    if (mask.has_value())
    {
        TORCH_CHECK(mask->dim() == 2 && mask->size(1) == k.size(1)
                && (mask->size(0) == q.size(0) || mask->size(0) == 1),
            "iwarp::attention: mask must be (B, Nk) or (1, Nk)");
    }
}

iwarp_dtype kernel_dtype(at::ScalarType t)
{
    return t == at::kHalf ? IWARP_DTYPE_FLOAT16 : t == at::kBFloat16 ? IWARP_DTYPE_BFLOAT16 : IWARP_DTYPE_FLOAT32;
}

at::Tensor& attention_out_cuda(at::Tensor const& q, at::Tensor const& k, at::Tensor const& v,
    std::optional<at::Tensor> const& mask, double scale, at::Tensor& out, int64_t kernel)
{
    check_inputs(q, k, v, mask);
    TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), "iwarp::attention: CUDA tensors expected");
    c10::cuda::CUDAGuard guard(q.device());
    at::Tensor qc = q.contiguous();
    at::Tensor kc = k.contiguous();
    at::Tensor vc = v.contiguous();
    int64_t const batch = q.size(0);
    int64_t const nq = q.size(1);
    int64_t const nk = k.size(1);
    int64_t const dv = v.size(2);
    TORCH_CHECK(out.is_cuda() && out.device() == q.device() && out.scalar_type() == q.scalar_type()
            && out.is_contiguous() && out.dim() == 3 && out.size(0) == batch && out.size(1) == nq
            && out.size(2) == dv,
        "iwarp::attention_out: out must be a contiguous (B, Nq, dv) tensor like q");

    at::Tensor mask_c;
    iwarp_mask_type mask_type = IWARP_MASK_NONE;
    if (mask.has_value())
    {
        TORCH_CHECK(mask->device() == q.device(), "iwarp::attention: mask on another device");
        if (mask->scalar_type() == at::kBool || mask->scalar_type() == at::kByte)
        {
            mask_c = mask->contiguous();
            mask_type = IWARP_MASK_BOOL;
        }
        else
        {
            mask_c = mask->to(at::kFloat).contiguous();
            mask_type = IWARP_MASK_FLOAT32;
        }
    }

    int sm_count = 0;
    cudaError_t attr_err = cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, q.get_device());
    TORCH_CHECK(attr_err == cudaSuccess, "iwarp::attention: ", cudaGetErrorString(attr_err));
    // Enough for the split count either kernel's heuristic picks (it clamps to what it gets).
    size_t const ws_bytes = iwarp_attention_workspace_bound(
        static_cast<int>(batch), static_cast<int>(nq), static_cast<int>(dv), sm_count);
    at::Tensor workspace;
    if (ws_bytes > 0)
    {
        workspace = at::empty({static_cast<int64_t>((ws_bytes + 3) / 4)}, q.options().dtype(at::kFloat));
    }

    iwarp_attention_params p{};
    p.batch = static_cast<int>(batch);
    p.num_queries = static_cast<int>(nq);
    p.num_keys = static_cast<int>(nk);
    p.head_dim = static_cast<int>(q.size(2));
    p.value_dim = static_cast<int>(dv);
    p.scale = static_cast<float>(scale);
    p.dtype = kernel_dtype(q.scalar_type());
    p.mask_type = mask_type;
    p.mask_broadcast = (mask.has_value() && mask->size(0) == 1 && batch > 1) ? 1 : 0;
    p.q = qc.data_ptr();
    p.k = kc.data_ptr();
    p.v = vc.data_ptr();
    p.mask = mask_c.defined() ? mask_c.data_ptr() : nullptr;
    p.out = out.data_ptr();
    p.workspace = workspace.defined() ? workspace.data_ptr() : nullptr;
    p.workspace_bytes = ws_bytes;
    p.num_splits = 0;
    p.kernel = static_cast<int>(kernel);
    cudaError_t const err = iwarp_attention_forward(&p, c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess, "iwarp::attention: ", cudaGetErrorString(err), " (B=", batch, ", Nq=", nq,
        ", Nk=", nk, ", d=", q.size(2), ", dv=", dv, ")");
    return out;
}

at::Tensor attention_cuda(at::Tensor const& q, at::Tensor const& k, at::Tensor const& v,
    std::optional<at::Tensor> const& mask, double scale, int64_t kernel)
{
    check_inputs(q, k, v, mask);
    at::Tensor out = at::empty({q.size(0), q.size(1), v.size(2)}, q.options());
    attention_out_cuda(q, k, v, mask, scale, out, kernel);
    return out;
}

int64_t selected_kernel(at::Tensor const& q, at::Tensor const& v, int64_t kernel)
{
    TORCH_CHECK(q.dim() == 3 && v.dim() == 3 && q.is_cuda(), "iwarp::selected_kernel: 3-D CUDA q and v");
    c10::cuda::CUDAGuard guard(q.device());
    iwarp_attention_params p{};
    p.batch = static_cast<int>(q.size(0));
    p.num_queries = static_cast<int>(q.size(1));
    p.head_dim = static_cast<int>(q.size(2));
    p.value_dim = static_cast<int>(v.size(2));
    p.dtype = kernel_dtype(q.scalar_type());
    p.kernel = static_cast<int>(kernel);
    return iwarp_attention_selected_kernel(&p);
}

// Shapes only, for torch.compile / fake tensors.
at::Tensor attention_meta(at::Tensor const& q, at::Tensor const& k, at::Tensor const& v,
    std::optional<at::Tensor> const& mask, double /*scale*/, int64_t /*kernel*/)
{
    check_inputs(q, k, v, mask);
    return at::empty({q.size(0), q.size(1), v.size(2)}, q.options());
}

} // namespace

TORCH_LIBRARY(iwarp, m)
{
    m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? mask=None, float scale=0.0, int kernel=0) -> Tensor");
    m.def("attention_out(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, Tensor(a!) out, int kernel=0) "
          "-> Tensor(a!)");
    m.def("selected_kernel(Tensor q, Tensor v, int kernel=0) -> int");
}

TORCH_LIBRARY_IMPL(iwarp, CUDA, m)
{
    m.impl("attention", &attention_cuda);
    m.impl("attention_out", &attention_out_cuda);
    m.impl("selected_kernel", &selected_kernel);
}

TORCH_LIBRARY_IMPL(iwarp, Meta, m)
{
    m.impl("attention", &attention_meta);
}
