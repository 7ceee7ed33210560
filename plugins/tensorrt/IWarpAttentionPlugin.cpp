/*
 * TensorRT IPluginV3 "IWarpAttention": see IWarpAttentionPlugin.h for the contract.
 */
#include "IWarpAttentionPlugin.h"

#include "iwarp_attention.h"

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <sstream>

#if defined(_WIN32)
#define IWARP_PLUGIN_EXPORT __declspec(dllexport)
#else
#define IWARP_PLUGIN_EXPORT __attribute__((visibility("default")))
#endif

using nvinfer1::DataType;
using nvinfer1::DimsExprs;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::IPluginCapability;
using nvinfer1::IPluginV3;
using nvinfer1::PluginCapabilityType;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;
using nvinfer1::PluginTensorDesc;
using nvinfer1::TensorFormat;

namespace
{

constexpr int32_t kNbInputs = 4;
constexpr int32_t kNbOutputs = 1;
// The workspace is sized for a GPU of up to this many SMs (H100: 132, B200: 148), so an engine
// built on one GPU never under-allocates on a bigger one; the kernel then clamps its split-K
// factor to the workspace it is given.
constexpr int kWorkspaceSmCap = 256;

// ---- logging through the logger TensorRT hands to setLoggerFinder() -------------------------
std::mutex gLoggerMutex;
nvinfer1::ILoggerFinder* gLoggerFinder = nullptr;

void logMessage(nvinfer1::ILogger::Severity severity, std::string const& message) noexcept
{
    try
    {
        nvinfer1::ILogger* logger = nullptr;
        {
            std::lock_guard<std::mutex> lock(gLoggerMutex);
            if (gLoggerFinder != nullptr)
            {
                logger = gLoggerFinder->findLogger();
            }
        }
        std::string const text = std::string("[IWarpAttention] ") + message;
        if (logger != nullptr)
        {
            logger->log(severity, text.c_str());
        }
        else if (severity <= nvinfer1::ILogger::Severity::kWARNING)
        {
            std::fprintf(stderr, "%s\n", text.c_str());
        }
    }
    catch (...)
    {
    }
}

void logError(std::string const& message) noexcept
{
    logMessage(nvinfer1::ILogger::Severity::kERROR, message);
}

bool isFloatType(DataType t) noexcept
{
    return t == DataType::kFLOAT || t == DataType::kHALF || t == DataType::kBF16;
}

iwarp_dtype kernelType(DataType t) noexcept
{
    switch (t)
    {
    case DataType::kHALF: return IWARP_DTYPE_FLOAT16;
    case DataType::kBF16: return IWARP_DTYPE_BFLOAT16;
    default: return IWARP_DTYPE_FLOAT32;
    }
}

} // namespace

namespace iwarp
{

// ---- IWarpAttentionPlugin -------------------------------------------------------------------

IWarpAttentionPlugin::IWarpAttentionPlugin(float scale)
    : mScale(scale)
{
    std::ostringstream meta;
    meta << kPluginName << " v" << kPluginVersion << " scale=" << mScale;
    mMetadata = meta.str();
}

IPluginCapability* IWarpAttentionPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept
{
    switch (type)
    {
    case PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* IWarpAttentionPlugin::clone() noexcept
{
    try
    {
        return new IWarpAttentionPlugin(mScale);
    }
    catch (...)
    {
        logError("clone failed: out of memory");
        return nullptr;
    }
}

char const* IWarpAttentionPlugin::getPluginName() const noexcept
{
    return kPluginName;
}

char const* IWarpAttentionPlugin::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* IWarpAttentionPlugin::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

int32_t IWarpAttentionPlugin::getNbOutputs() const noexcept
{
    return kNbOutputs;
}

int32_t IWarpAttentionPlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    if (nbOutputs != kNbOutputs || nbInputs != kNbInputs || !isFloatType(inputTypes[0]))
    {
        logError("expects 4 inputs (q, k, v, mask) of float32/float16/bfloat16 and 1 output");
        return -1;
    }
    outputTypes[0] = inputTypes[0];
    return 0;
}

int32_t IWarpAttentionPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
    nvinfer1::IExprBuilder& /*exprBuilder*/) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs)
    {
        logError("expects 4 inputs and 1 output");
        return -1;
    }
    if (inputs[0].nbDims != 3 || inputs[1].nbDims != 3 || inputs[2].nbDims != 3 || inputs[3].nbDims != 2)
    {
        logError("expects q (B, Nq, d), k (B, Nk, d), v (B, Nk, dv), mask (B, Nk)");
        return -1;
    }
    outputs[0].nbDims = 3;
    outputs[0].d[0] = inputs[0].d[0]; // B
    outputs[0].d[1] = inputs[0].d[1]; // Nq
    outputs[0].d[2] = inputs[2].d[2]; // dv
    return 0;
}

bool IWarpAttentionPlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || pos < 0 || pos >= kNbInputs + kNbOutputs)
    {
        return false;
    }
    PluginTensorDesc const& desc = inOut[pos].desc;
    if (desc.format != TensorFormat::kLINEAR)
    {
        return false;
    }
    switch (pos)
    {
    case 0: return isFloatType(desc.type);                // q: float32, float16 or bfloat16
    case 3: return desc.type == DataType::kFLOAT;         // mask: always float32
    default: return desc.type == inOut[0].desc.type;     // k, v, out: as q
    }
}

int32_t IWarpAttentionPlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs)
    {
        logError("expects 4 inputs and 1 output");
        return -1;
    }
    int64_t const d = in[0].desc.dims.d[2];
    int64_t const dk = in[1].desc.dims.d[2];
    int64_t const dv = in[2].desc.dims.d[2];
    if (d > IWARP_ATTENTION_MAX_HEAD_DIM || dv > IWARP_ATTENTION_MAX_VALUE_DIM || (d > 0 && dk > 0 && d != dk))
    {
        std::ostringstream msg;
        msg << "unsupported widths: d=" << d << " (k: " << dk << ", max " << IWARP_ATTENTION_MAX_HEAD_DIM
            << "), dv=" << dv << " (max " << IWARP_ATTENTION_MAX_VALUE_DIM << ")";
        logError(msg.str());
        return -1;
    }
    (void) out;
    // Say which kernel the engine will run (on this GPU, for this type and widths).
    iwarp_attention_params p{};
    p.batch = 1;
    p.num_queries = 1;
    p.head_dim = static_cast<int>(d > 0 ? d : 1);
    p.value_dim = static_cast<int>(dv > 0 ? dv : 1);
    p.dtype = kernelType(in[0].desc.type);
    int const kernel = iwarp_attention_selected_kernel(&p);
    std::ostringstream msg;
    msg << "d=" << d << ", dv=" << dv << ": "
        << (kernel == IWARP_KERNEL_TENSOR_CORES ? "tensor-core kernel (mma.sync, fp32 accumulate)"
                : kernel == IWARP_KERNEL_SIMT   ? "SIMT kernel (CUDA cores, fp32 accumulate)"
                                                : "no kernel for this type on this device");
    logMessage(nvinfer1::ILogger::Severity::kINFO, msg.str());
    return 0;
}

size_t IWarpAttentionPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    if (nbInputs != kNbInputs)
    {
        return 0;
    }
    int64_t const maxBatch = inputs[0].max.d[0];
    int64_t const maxQueries = inputs[0].max.d[1];
    int64_t const valueDim = inputs[2].max.d[2];
    if (maxBatch <= 0 || maxQueries <= 0 || valueDim <= 0 || maxBatch * maxQueries > INT32_MAX)
    {
        return 0;
    }
    return iwarp_attention_workspace_bound(static_cast<int>(maxBatch), static_cast<int>(maxQueries),
        static_cast<int>(valueDim), kWorkspaceSmCap);
}

char const* IWarpAttentionPlugin::getTimingCacheID() noexcept
{
    return mMetadata.c_str();
}

char const* IWarpAttentionPlugin::getMetadataString() noexcept
{
    return mMetadata.c_str();
}

int32_t IWarpAttentionPlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs)
    {
        return -1;
    }
    bool const ok = in[0].dims.nbDims == 3 && in[1].dims.nbDims == 3 && in[2].dims.nbDims == 3
        && in[3].dims.nbDims == 2 && out[0].dims.nbDims == 3 && in[0].dims.d[2] == in[1].dims.d[2]
        && in[1].dims.d[1] == in[2].dims.d[1] && in[3].dims.d[1] == in[1].dims.d[1]
        && (in[3].dims.d[0] == in[0].dims.d[0] || in[3].dims.d[0] == 1) && in[1].dims.d[0] == in[0].dims.d[0]
        && in[2].dims.d[0] == in[0].dims.d[0];
    if (!ok)
    {
        logError("inconsistent shapes: want q (B,Nq,d), k (B,Nk,d), v (B,Nk,dv), mask (B|1,Nk)");
        return -1;
    }
    return 0;
}

int32_t IWarpAttentionPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* /*outputDesc*/,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    iwarp_attention_params p{};
    p.batch = static_cast<int>(inputDesc[0].dims.d[0]);
    p.num_queries = static_cast<int>(inputDesc[0].dims.d[1]);
    p.head_dim = static_cast<int>(inputDesc[0].dims.d[2]);
    p.num_keys = static_cast<int>(inputDesc[1].dims.d[1]);
    p.value_dim = static_cast<int>(inputDesc[2].dims.d[2]);
    p.scale = mScale;
    p.dtype = kernelType(inputDesc[0].type);
    p.mask_type = IWARP_MASK_FLOAT32;
    p.mask_broadcast = (inputDesc[3].dims.d[0] == 1 && p.batch > 1) ? 1 : 0;
    p.q = inputs[0];
    p.k = inputs[1];
    p.v = inputs[2];
    p.mask = inputs[3];
    p.out = outputs[0];
    p.workspace = workspace;
    // What getWorkspaceSize reserved for the profile's largest shape covers this (smaller) one.
    p.workspace_bytes = workspace == nullptr
        ? 0
        : iwarp_attention_workspace_bound(p.batch, p.num_queries, p.value_dim, kWorkspaceSmCap);
    p.num_splits = 0;
    cudaError_t const err = iwarp_attention_forward(&p, stream);
    if (err != cudaSuccess)
    {
        std::ostringstream msg;
        msg << "kernel launch failed (B=" << p.batch << ", Nq=" << p.num_queries << ", Nk=" << p.num_keys
            << ", d=" << p.head_dim << ", dv=" << p.value_dim << "): " << cudaGetErrorString(err);
        logError(msg.str());
        return -1;
    }
    return 0;
}

IPluginV3* IWarpAttentionPlugin::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept
{
    return clone();
}

PluginFieldCollection const* IWarpAttentionPlugin::getFieldsToSerialize() noexcept
{
    mFieldsToSerialize.clear();
    mFieldsToSerialize.emplace_back("scale", &mScale, PluginFieldType::kFLOAT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFieldsToSerialize.size());
    mFieldCollection.fields = mFieldsToSerialize.data();
    return &mFieldCollection;
}

// ---- IWarpAttentionPluginCreator ------------------------------------------------------------

IWarpAttentionPluginCreator::IWarpAttentionPluginCreator()
{
    mFields.emplace_back("scale", nullptr, PluginFieldType::kFLOAT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

char const* IWarpAttentionPluginCreator::getPluginName() const noexcept
{
    return kPluginName;
}

char const* IWarpAttentionPluginCreator::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* IWarpAttentionPluginCreator::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

PluginFieldCollection const* IWarpAttentionPluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

IPluginV3* IWarpAttentionPluginCreator::createPlugin(
    char const* /*name*/, PluginFieldCollection const* fc, nvinfer1::TensorRTPhase /*phase*/) noexcept
{
    try
    {
        float scale = 0.0F; // <= 0: 1/sqrt(d), decided by the kernel
        for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
        {
            PluginField const& f = fc->fields[i];
            if (f.name == nullptr || std::strcmp(f.name, "scale") != 0 || f.data == nullptr || f.length < 1)
            {
                continue; // plugin_version / plugin_namespace and unknown fields
            }
            if (f.type == PluginFieldType::kFLOAT32)
            {
                scale = *static_cast<float const*>(f.data);
            }
            else if (f.type == PluginFieldType::kFLOAT64)
            {
                scale = static_cast<float>(*static_cast<double const*>(f.data));
            }
            else
            {
                logError("field 'scale' must be float32");
                return nullptr;
            }
        }
        if (!std::isfinite(scale))
        {
            logError("field 'scale' is not finite");
            return nullptr;
        }
        return new IWarpAttentionPlugin(scale);
    }
    catch (...)
    {
        logError("createPlugin failed");
        return nullptr;
    }
}

} // namespace iwarp

// ---- library entry points (IPluginRegistry::loadLibrary) ------------------------------------

extern "C" IWARP_PLUGIN_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    std::lock_guard<std::mutex> lock(gLoggerMutex);
    gLoggerFinder = finder;
}

extern "C" IWARP_PLUGIN_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static iwarp::IWarpAttentionPluginCreator creator;
    static nvinfer1::IPluginCreatorInterface* const creators[] = {&creator};
    nbCreators = 1;
    return creators;
}

#ifdef IWARP_STATIC_REGISTRATION
// The macro pastes its argument into a variable name (pluginRegistrar##name), so it needs the
// unqualified class name: used inside the namespace. It calls getPluginRegistry() (libnvinfer).
namespace iwarp
{
REGISTER_TENSORRT_PLUGIN(IWarpAttentionPluginCreator);
} // namespace iwarp
#endif
