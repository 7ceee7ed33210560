/*
 * TensorRT plugin "IWarpAttention" (version "1", namespace ""): the fused attention of implicit
 * warping as one layer, running plugins/kernels/iwarp_attention.cu.
 *
 * Inputs (linear format):
 *   0 q    (B, Nq, d)   float32, float16 or bfloat16 (the last two run on tensor cores)
 *   1 k    (B, Nk, d)   same type as q
 *   2 v    (B, Nk, dv)  same type as q (dv = value width; [V | P | K] with the residual branch)
 *   3 mask (B, Nk)      float32, nonzero = attend; (1, Nk) broadcasts over the batch
 * Output:
 *   0 out  (B, Nq, dv)  same type as q; rows with every key masked are zeros
 * Field (PluginField / ONNX attribute): scale (float32; <= 0 means 1/sqrt(d)).
 * All dimensions may be dynamic (B, Nq, Nk); d <= 256 and dv <= 544.
 *
 * Interfaces: IPluginV3 with IPluginV3OneCore/Build/Runtime, created by IPluginCreatorV3One.
 * The library exports getCreators() and setLoggerFinder(), which is what
 * IPluginRegistry::loadLibrary (Python: trt.get_plugin_registry().load_library(path)) looks for.
 * Building with -DIWARP_STATIC_REGISTRATION also registers the creator when the library is
 * dlopen'ed (REGISTER_TENSORRT_PLUGIN inside namespace iwarp; needs linking libnvinfer).
 */
#ifndef IWARP_ATTENTION_PLUGIN_H
#define IWARP_ATTENTION_PLUGIN_H

#include <NvInferRuntime.h>

#include <cstdint>
#include <string>
#include <vector>

namespace iwarp
{

constexpr char const* kPluginName = "IWarpAttention";
constexpr char const* kPluginVersion = "1";
constexpr char const* kPluginNamespace = "";

class IWarpAttentionPlugin final : public nvinfer1::IPluginV3,
                                   public nvinfer1::IPluginV3OneCore,
                                   public nvinfer1::IPluginV3OneBuild,
                                   public nvinfer1::IPluginV3OneRuntime
{
public:
    explicit IWarpAttentionPlugin(float scale);
    ~IWarpAttentionPlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;
    char const* getTimingCacheID() noexcept override;
    char const* getMetadataString() noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    float mScale;
    std::string mMetadata;
    std::vector<nvinfer1::PluginField> mFieldsToSerialize;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

class IWarpAttentionPluginCreator final : public nvinfer1::IPluginCreatorV3One
{
public:
    IWarpAttentionPluginCreator();
    ~IWarpAttentionPluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

} // namespace iwarp

#endif // IWARP_ATTENTION_PLUGIN_H
