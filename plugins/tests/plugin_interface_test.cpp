/*
 * The IWarpAttention plugin library, loaded the way TensorRT loads it (dlopen + getCreators) and
 * driven through the real TensorRT interfaces (NvInferRuntime.h of a TensorRT install or of the
 * TensorRT 11.1 open-source headers). Needs neither libnvinfer nor a GPU:
 *
 *   iwarp_plugin_test LIBRARY                 creator, fields, capabilities, output types and
 *                                             shapes, formats, workspace, serialise -> recreate,
 *                                             clone, attachToContext, bad input refused
 *   iwarp_plugin_test LIBRARY --enqueue [S:D:DV ...]
 *                                             also IPluginV3OneRuntime::enqueue on device
 *                                             buffers (a CUDA GPU): fp32/fp16/bf16, masks with
 *                                             NaN/Inf in the masked slots, vs a CPU reference,
 *                                             and the time of each S:D:DV shape (S sources at
 *                                             256 px: 1024 queries, 1024 S + 32 keys; widths D,
 *                                             DV), fp16 and fp32; bench/device_check.py passes
 *                                             the shipped weights' shapes
 *
 * Prints one line per check (flushed, so a crash keeps the lines before it) and
 * "N passed, M failed"; exits non-zero when a check failed.
 */
#include <NvInferRuntime.h>

#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace
{

int gPassed = 0;
int gFailed = 0;

void check(bool ok, std::string const& what)
{
    std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
    std::fflush(stdout);
    (ok ? gPassed : gFailed)++;
}

// ---- a logger for setLoggerFinder: collects the plugin's messages ----------------------------
class CollectingLogger : public ILogger
{
public:
    void log(Severity severity, char const* msg) noexcept override
    {
        if (severity <= Severity::kWARNING)
        {
            messages.emplace_back(msg);
        }
    }
    std::vector<std::string> messages;
};

class Finder : public ILoggerFinder
{
public:
    explicit Finder(ILogger* logger)
        : mLogger(logger)
    {
    }
    ILogger* findLogger() override
    {
        return mLogger;
    }

private:
    ILogger* mLogger;
};

// ---- shape expressions: what TensorRT's builder hands to getOutputShapes ----------------------
class ConstExprImpl : public apiv::VDimensionExpr
{
public:
    explicit ConstExprImpl(int64_t v)
        : mValue(v)
    {
    }
    bool isConstant() const override
    {
        return true;
    }
    int64_t getConstantValue() const override
    {
        return mValue;
    }
    bool isSizeTensor() const override
    {
        return false;
    }

private:
    int64_t mValue;
};

class ConstExpr : public IDimensionExpr
{
public:
    explicit ConstExpr(int64_t v)
        : mImplObj(v)
    {
        mImpl = &mImplObj;
    }

private:
    ConstExprImpl mImplObj;
};

class ExprBuilderImpl : public apiv::VExprBuilder
{
public:
    IDimensionExpr const* constant(int64_t value) override
    {
        mOwned.emplace_back(new ConstExpr(value));
        return mOwned.back().get();
    }
    IDimensionExpr const* operation(DimensionOperation, IDimensionExpr const&, IDimensionExpr const&) override
    {
        return nullptr; // the plugin needs no arithmetic on shapes
    }
    IDimensionExpr const* declareSizeTensor(int32_t, IDimensionExpr const&, IDimensionExpr const&) override
    {
        return nullptr;
    }

private:
    std::vector<std::unique_ptr<ConstExpr>> mOwned;
};

class ExprBuilder : public IExprBuilder
{
public:
    ExprBuilder()
    {
        mImpl = &mImplObj;
    }

private:
    ExprBuilderImpl mImplObj;
};

Dims dims(std::initializer_list<int64_t> values)
{
    Dims d{};
    d.nbDims = static_cast<int32_t>(values.size());
    int i = 0;
    for (int64_t v : values)
    {
        d.d[i++] = v;
    }
    return d;
}

PluginTensorDesc desc(Dims const& d, DataType t, TensorFormat f = TensorFormat::kLINEAR)
{
    PluginTensorDesc x{};
    x.dims = d;
    x.type = t;
    x.format = f;
    x.scale = 1.0F;
    return x;
}

DynamicPluginTensorDesc dyn(Dims const& d, DataType t, TensorFormat f = TensorFormat::kLINEAR)
{
    DynamicPluginTensorDesc x{};
    x.desc = desc(d, t, f);
    x.min = d;
    x.opt = d;
    x.max = d;
    return x;
}

std::string metadataOf(IPluginV3* plugin)
{
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    char const* m = build ? build->getMetadataString() : nullptr;
    return m ? m : "";
}

// ---- the device part (--enqueue) ------------------------------------------------------------

uint16_t toHalf(float f)
{
    // round-to-nearest-even float -> IEEE half (normal range; the test values are small)
    uint32_t x;
    std::memcpy(&x, &f, 4);
    uint32_t const sign = (x >> 16) & 0x8000u;
    int32_t exp = static_cast<int32_t>((x >> 23) & 0xff) - 127 + 15;
    uint32_t mant = x & 0x7fffffu;
    if (((x >> 23) & 0xff) == 0xff)
    {
        return static_cast<uint16_t>(sign | 0x7c00u | (mant ? 0x200u : 0u));
    }
    if (exp <= 0)
    {
        return static_cast<uint16_t>(sign);
    }
    if (exp >= 31)
    {
        return static_cast<uint16_t>(sign | 0x7c00u);
    }
    uint32_t h = sign | (static_cast<uint32_t>(exp) << 10) | (mant >> 13);
    uint32_t const rest = mant & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u)))
    {
        ++h;
    }
    return static_cast<uint16_t>(h);
}

float fromHalf(uint16_t h)
{
    uint32_t const sign = (h & 0x8000u) << 16;
    uint32_t const exp = (h >> 10) & 0x1f;
    uint32_t const mant = h & 0x3ffu;
    uint32_t x;
    if (exp == 0)
    {
        float const v = std::ldexp(static_cast<float>(mant), -24);
        return sign ? -v : v;
    }
    if (exp == 31)
    {
        x = sign | 0x7f800000u | (mant << 13);
    }
    else
    {
        x = sign | ((exp - 15 + 127) << 23) | (mant << 13);
    }
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

uint16_t toBf16(float f)
{
    uint32_t x;
    std::memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u)
    {
        return static_cast<uint16_t>((x >> 16) | 0x40u);
    }
    x += 0x7fffu + ((x >> 16) & 1u);
    return static_cast<uint16_t>(x >> 16);
}

float fromBf16(uint16_t b)
{
    uint32_t const x = static_cast<uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

size_t elemSize(DataType t)
{
    return t == DataType::kFLOAT ? 4 : 2;
}

std::vector<uint8_t> encode(std::vector<float> const& v, DataType t)
{
    std::vector<uint8_t> out(v.size() * elemSize(t));
    for (size_t i = 0; i < v.size(); ++i)
    {
        if (t == DataType::kFLOAT)
        {
            std::memcpy(out.data() + 4 * i, &v[i], 4);
        }
        else
        {
            uint16_t const h = t == DataType::kHALF ? toHalf(v[i]) : toBf16(v[i]);
            std::memcpy(out.data() + 2 * i, &h, 2);
        }
    }
    return out;
}

std::vector<float> decode(std::vector<uint8_t> const& raw, DataType t, size_t n)
{
    std::vector<float> out(n);
    for (size_t i = 0; i < n; ++i)
    {
        if (t == DataType::kFLOAT)
        {
            std::memcpy(&out[i], raw.data() + 4 * i, 4);
        }
        else
        {
            uint16_t h;
            std::memcpy(&h, raw.data() + 2 * i, 2);
            out[i] = t == DataType::kHALF ? fromHalf(h) : fromBf16(h);
        }
    }
    return out;
}

struct DeviceBuffer
{
    void* ptr = nullptr;
    explicit DeviceBuffer(size_t bytes)
    {
        if (bytes > 0 && cudaMalloc(&ptr, bytes) != cudaSuccess)
        {
            ptr = nullptr;
        }
    }
    ~DeviceBuffer()
    {
        if (ptr)
        {
            cudaFree(ptr);
        }
    }
    DeviceBuffer(DeviceBuffer const&) = delete;
    DeviceBuffer& operator=(DeviceBuffer const&) = delete;
};

// One enqueue through the runtime interface against a float64 reference. `poison`: masked
// slots of k and v hold NaN/Inf, which must not reach the output.
void enqueueCase(IPluginV3* plugin, DataType type, int B, int Nq, int Nk, int d, int dv, bool masked, bool poison,
    bool timeIt)
{
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    std::mt19937 rng(static_cast<unsigned>(B * 131 + Nq * 7 + Nk + d + dv));
    std::normal_distribution<float> normal(0.0F, 1.0F);
    std::uniform_real_distribution<float> uni(0.0F, 1.0F);
    size_t const nq = static_cast<size_t>(B) * Nq * d;
    size_t const nk = static_cast<size_t>(B) * Nk * d;
    size_t const nv = static_cast<size_t>(B) * Nk * dv;
    size_t const no = static_cast<size_t>(B) * Nq * dv;
    std::vector<float> q(nq), k(nk), v(nv), mask(static_cast<size_t>(B) * Nk, 1.0F);
    for (auto& x : q)
        x = normal(rng);
    for (auto& x : k)
        x = normal(rng);
    for (auto& x : v)
        x = normal(rng);
    if (masked)
    {
        for (auto& m : mask)
            m = uni(rng) < 0.3F ? 0.0F : 1.0F;
        mask[0] = 1.0F;
    }
    // The reference sees the clean values; the device sees NaN/Inf in masked slots.
    std::vector<double> ref(no, 0.0);
    double const scale = 1.0 / std::sqrt(static_cast<double>(d));
    for (int b = 0; b < B; ++b)
    {
        for (int i = 0; i < Nq; ++i)
        {
            std::vector<double> logit(Nk, -INFINITY);
            double top = -INFINITY;
            for (int j = 0; j < Nk; ++j)
            {
                if (mask[static_cast<size_t>(b) * Nk + j] == 0.0F)
                    continue;
                double s = 0;
                for (int c = 0; c < d; ++c)
                {
                    auto const qi = static_cast<size_t>((b * Nq + i)) * d + c;
                    auto const kj = static_cast<size_t>((b * Nk + j)) * d + c;
                    float const qv = type == DataType::kFLOAT ? q[qi]
                        : type == DataType::kHALF             ? fromHalf(toHalf(q[qi]))
                                                              : fromBf16(toBf16(q[qi]));
                    float const kv = type == DataType::kFLOAT ? k[kj]
                        : type == DataType::kHALF             ? fromHalf(toHalf(k[kj]))
                                                              : fromBf16(toBf16(k[kj]));
                    s += static_cast<double>(qv) * kv;
                }
                logit[j] = s * scale;
                top = std::max(top, logit[j]);
            }
            double total = 0;
            std::vector<double> acc(dv, 0.0);
            for (int j = 0; j < Nk; ++j)
            {
                if (!std::isfinite(logit[j]))
                    continue;
                double const p = std::exp(logit[j] - top);
                total += p;
                for (int c = 0; c < dv; ++c)
                {
                    auto const vj = static_cast<size_t>((b * Nk + j)) * dv + c;
                    float const vv = type == DataType::kFLOAT ? v[vj]
                        : type == DataType::kHALF             ? fromHalf(toHalf(v[vj]))
                                                              : fromBf16(toBf16(v[vj]));
                    acc[c] += p * vv;
                }
            }
            for (int c = 0; c < dv; ++c)
                ref[static_cast<size_t>((b * Nq + i)) * dv + c] = total > 0 ? acc[c] / total : 0.0;
        }
    }
    if (poison)
    {
        for (int b = 0; b < B; ++b)
            for (int j = 0; j < Nk; ++j)
                if (mask[static_cast<size_t>(b) * Nk + j] == 0.0F)
                {
                    for (int c = 0; c < d; ++c)
                        k[static_cast<size_t>((b * Nk + j)) * d + c] = (c % 2) ? NAN : INFINITY;
                    for (int c = 0; c < dv; ++c)
                        v[static_cast<size_t>((b * Nk + j)) * dv + c] = (c % 2) ? NAN : -INFINITY;
                }
    }
    auto hq = encode(q, type), hk = encode(k, type), hv = encode(v, type);
    DeviceBuffer dq(hq.size()), dk(hk.size()), dvb(hv.size()), dm(mask.size() * 4), dout(no * elemSize(type));
    DynamicPluginTensorDesc in[4] = {dyn(dims({B, Nq, d}), type), dyn(dims({B, Nk, d}), type),
        dyn(dims({B, Nk, dv}), type), dyn(dims({B, Nk}), DataType::kFLOAT)};
    DynamicPluginTensorDesc out[1] = {dyn(dims({B, Nq, dv}), type)};
    size_t const wsBytes = build->getWorkspaceSize(in, 4, out, 1);
    DeviceBuffer ws(wsBytes);
    char name[160];
    std::snprintf(name, sizeof(name), "enqueue %s B=%d Nq=%d Nk=%d d=%d dv=%d%s%s",
        type == DataType::kFLOAT ? "fp32" : type == DataType::kHALF ? "fp16" : "bf16", B, Nq, Nk, d, dv,
        masked ? " masked" : "", poison ? " (NaN/Inf in masked slots)" : "");
    if (!dq.ptr || !dk.ptr || !dvb.ptr || !dm.ptr || !dout.ptr || (wsBytes && !ws.ptr))
    {
        check(false, std::string(name) + ": cudaMalloc failed");
        return;
    }
    cudaMemcpy(dq.ptr, hq.data(), hq.size(), cudaMemcpyHostToDevice);
    cudaMemcpy(dk.ptr, hk.data(), hk.size(), cudaMemcpyHostToDevice);
    cudaMemcpy(dvb.ptr, hv.data(), hv.size(), cudaMemcpyHostToDevice);
    cudaMemcpy(dm.ptr, mask.data(), mask.size() * 4, cudaMemcpyHostToDevice);
    cudaMemset(dout.ptr, 0xff, no * elemSize(type)); // NaN: every element must be written
    PluginTensorDesc inDesc[4] = {in[0].desc, in[1].desc, in[2].desc, in[3].desc};
    PluginTensorDesc outDesc[1] = {out[0].desc};
    void const* inputs[4] = {dq.ptr, dk.ptr, dvb.ptr, dm.ptr};
    void* outputs[1] = {dout.ptr};
    cudaStream_t stream = nullptr;
    cudaStreamCreate(&stream);
    bool ok = runtime->onShapeChange(inDesc, 4, outDesc, 1) == 0;
    ok = ok && runtime->enqueue(inDesc, outDesc, inputs, outputs, ws.ptr, stream) == 0;
    ok = ok && cudaStreamSynchronize(stream) == cudaSuccess;
    std::vector<uint8_t> raw(no * elemSize(type));
    cudaMemcpy(raw.data(), dout.ptr, raw.size(), cudaMemcpyDeviceToHost);
    auto const got = decode(raw, type, no);
    double maxErr = 0, maxRef = 1e-12;
    bool finite = true;
    for (size_t i = 0; i < no; ++i)
    {
        finite = finite && std::isfinite(got[i]);
        maxErr = std::max(maxErr, std::fabs(got[i] - ref[i]));
        maxRef = std::max(maxRef, std::fabs(ref[i]));
    }
    double const rel = maxErr / maxRef;
    double const tol = type == DataType::kFLOAT ? 1e-4 : type == DataType::kHALF ? 5e-3 : 3e-2;
    char line[320];
    std::snprintf(line, sizeof(line), "%s: rel. error %.2e (tol %.0e)%s", name, rel, tol, finite ? "" : ", NOT FINITE");
    if (ok && timeIt)
    {
        cudaEvent_t t0, t1;
        cudaEventCreate(&t0);
        cudaEventCreate(&t1);
        for (int i = 0; i < 5; ++i)
            runtime->enqueue(inDesc, outDesc, inputs, outputs, ws.ptr, stream);
        int const iters = 50;
        cudaEventRecord(t0, stream);
        for (int i = 0; i < iters; ++i)
            runtime->enqueue(inDesc, outDesc, inputs, outputs, ws.ptr, stream);
        cudaEventRecord(t1, stream);
        cudaEventSynchronize(t1);
        float ms = 0;
        cudaEventElapsedTime(&ms, t0, t1);
        std::snprintf(line + std::strlen(line), sizeof(line) - std::strlen(line), ", %.4f ms/enqueue", ms / iters);
        cudaEventDestroy(t0);
        cudaEventDestroy(t1);
    }
    cudaStreamDestroy(stream);
    check(ok && finite && rel < tol, line);
}

} // namespace

int main(int argc, char** argv)
{
    if (argc < 2)
    {
        std::fprintf(stderr, "usage: %s LIBRARY [--enqueue [SOURCES:D:DV ...]]\n", argv[0]);
        return 2;
    }
    bool const enqueue = argc > 2 && std::strcmp(argv[2], "--enqueue") == 0;
    void* handle = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    check(handle != nullptr, std::string("dlopen (every symbol resolved without libnvinfer): ") + (handle ? "" : dlerror()));
    if (!handle)
    {
        std::printf("%d passed, %d failed\n", gPassed, gFailed);
        return 1;
    }
    using GetCreators = IPluginCreatorInterface* const* (*) (int32_t&);
    using SetLoggerFinder = void (*)(ILoggerFinder*);
    auto getCreators = reinterpret_cast<GetCreators>(dlsym(handle, "getCreators"));
    auto setLoggerFinder = reinterpret_cast<SetLoggerFinder>(dlsym(handle, "setLoggerFinder"));
    check(getCreators && setLoggerFinder, "exports getCreators and setLoggerFinder");
    if (!getCreators || !setLoggerFinder)
    {
        std::printf("%d passed, %d failed\n", gPassed, gFailed);
        return 1;
    }
    CollectingLogger logger;
    Finder finder(&logger);
    setLoggerFinder(&finder);

    int32_t nb = 0;
    IPluginCreatorInterface* const* creators = getCreators(nb);
    check(nb == 1 && creators && creators[0], "one creator");
    InterfaceInfo const info = creators[0]->getInterfaceInfo();
    check(std::strcmp(info.kind, "PLUGIN CREATOR_V3ONE") == 0 && info.major == 1,
        std::string("creator interface ") + info.kind);
    auto* creator = static_cast<IPluginCreatorV3One*>(creators[0]);
    check(std::strcmp(creator->getPluginName(), "IWarpAttention") == 0 && std::strcmp(creator->getPluginVersion(), "1") == 0
            && std::strcmp(creator->getPluginNamespace(), "") == 0,
        "creator name IWarpAttention, version 1, namespace \"\"");
    PluginFieldCollection const* names = creator->getFieldNames();
    check(names && names->nbFields == 1 && std::strcmp(names->fields[0].name, "scale") == 0
            && names->fields[0].type == PluginFieldType::kFLOAT32 && names->fields[0].length == 1,
        "one field: scale (float32, length 1)");

    // What the ONNX parser passes: the node's attributes, plugin_version/namespace included.
    float scale = 0.125F;
    PluginField fields[3] = {PluginField("plugin_version", "1", PluginFieldType::kCHAR, 1),
        PluginField("plugin_namespace", "", PluginFieldType::kCHAR, 0),
        PluginField("scale", &scale, PluginFieldType::kFLOAT32, 1)};
    PluginFieldCollection fc{3, fields};
    IPluginV3* plugin = creator->createPlugin("attn", &fc, TensorRTPhase::kBUILD);
    check(plugin != nullptr, "createPlugin (build phase)");
    if (!plugin)
    {
        std::printf("%d passed, %d failed\n", gPassed, gFailed);
        return 1;
    }
    auto* core = static_cast<IPluginV3OneCore*>(plugin->getCapabilityInterface(PluginCapabilityType::kCORE));
    auto* build = static_cast<IPluginV3OneBuild*>(plugin->getCapabilityInterface(PluginCapabilityType::kBUILD));
    auto* runtime = static_cast<IPluginV3OneRuntime*>(plugin->getCapabilityInterface(PluginCapabilityType::kRUNTIME));
    check(core && build && runtime, "core, build and runtime capability interfaces");
    check(std::strcmp(core->getInterfaceInfo().kind, "PLUGIN_V3ONE_CORE") == 0
            && std::strcmp(build->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD") == 0
            && std::strcmp(runtime->getInterfaceInfo().kind, "PLUGIN_V3ONE_RUNTIME") == 0,
        "capability interface kinds");
    check(std::strcmp(core->getPluginName(), "IWarpAttention") == 0 && std::strcmp(core->getPluginVersion(), "1") == 0,
        "core: name and version");
    check(build->getNbOutputs() == 1, "one output");

    DataType const floatTypes[3] = {DataType::kFLOAT, DataType::kHALF, DataType::kBF16};
    bool typesOk = true;
    for (DataType t : floatTypes)
    {
        DataType in[4] = {t, t, t, DataType::kFLOAT};
        DataType out = DataType::kINT8;
        typesOk = typesOk && build->getOutputDataTypes(&out, 1, in, 4) == 0 && out == t;
    }
    check(typesOk, "output type follows q (float32, float16, bfloat16)");
    size_t const logged = logger.messages.size();
    DataType badIn[4] = {DataType::kINT32, DataType::kINT32, DataType::kINT32, DataType::kFLOAT};
    DataType badOut = DataType::kFLOAT;
    check(build->getOutputDataTypes(&badOut, 1, badIn, 4) != 0 && logger.messages.size() > logged,
        "int32 inputs refused, with a message through the ILogger of setLoggerFinder");

    ExprBuilder exprs;
    IDimensionExpr const* B = exprs.constant(2);
    IDimensionExpr const* Nq = exprs.constant(1024);
    IDimensionExpr const* Nk = exprs.constant(1056);
    IDimensionExpr const* d = exprs.constant(64);
    IDimensionExpr const* dvx = exprs.constant(320);
    DimsExprs inExprs[4];
    inExprs[0].nbDims = 3;
    inExprs[0].d[0] = B;
    inExprs[0].d[1] = Nq;
    inExprs[0].d[2] = d;
    inExprs[1].nbDims = 3;
    inExprs[1].d[0] = B;
    inExprs[1].d[1] = Nk;
    inExprs[1].d[2] = d;
    inExprs[2].nbDims = 3;
    inExprs[2].d[0] = B;
    inExprs[2].d[1] = Nk;
    inExprs[2].d[2] = dvx;
    inExprs[3].nbDims = 2;
    inExprs[3].d[0] = B;
    inExprs[3].d[1] = Nk;
    DimsExprs outExprs[1];
    int32_t const shapeStatus = build->getOutputShapes(inExprs, 4, nullptr, 0, outExprs, 1, exprs);
    check(shapeStatus == 0 && outExprs[0].nbDims == 3 && outExprs[0].d[0]->getConstantValue() == 2
            && outExprs[0].d[1]->getConstantValue() == 1024 && outExprs[0].d[2]->getConstantValue() == 320,
        "output shape (B, Nq, dv) = (2, 1024, 320)");
    inExprs[3].nbDims = 3;
    check(build->getOutputShapes(inExprs, 4, nullptr, 0, outExprs, 1, exprs) != 0, "a 3-D mask refused");

    // supportsFormatCombination: q float32/float16/bfloat16; k, v, out as q; mask float32; linear.
    auto combo = [&](DataType qt, DataType kt, DataType mt, DataType ot, TensorFormat f, int pos)
    {
        DynamicPluginTensorDesc io[5] = {dyn(dims({1, 4, 8}), qt, f), dyn(dims({1, 6, 8}), kt),
            dyn(dims({1, 6, 5}), kt), dyn(dims({1, 6}), mt), dyn(dims({1, 4, 5}), ot)};
        return build->supportsFormatCombination(pos, io, 4, 1);
    };
    bool formatsOk = true;
    for (DataType t : floatTypes)
    {
        for (int pos = 0; pos < 5; ++pos)
        {
            formatsOk = formatsOk && combo(t, t, DataType::kFLOAT, t, TensorFormat::kLINEAR, pos);
        }
    }
    check(formatsOk, "float32, float16 and bfloat16 (linear, mask float32) supported");
    check(!combo(DataType::kINT8, DataType::kINT8, DataType::kFLOAT, DataType::kINT8, TensorFormat::kLINEAR, 0)
            && !combo(DataType::kHALF, DataType::kFLOAT, DataType::kFLOAT, DataType::kHALF, TensorFormat::kLINEAR, 1)
            && !combo(DataType::kHALF, DataType::kHALF, DataType::kHALF, DataType::kHALF, TensorFormat::kLINEAR, 3)
            && !combo(DataType::kHALF, DataType::kHALF, DataType::kFLOAT, DataType::kFLOAT, TensorFormat::kLINEAR, 4)
            && !combo(DataType::kHALF, DataType::kHALF, DataType::kFLOAT, DataType::kHALF, TensorFormat::kCHW2, 0),
        "int8, mixed q/k types, a half mask, a float output for half q and non-linear formats refused");

    DynamicPluginTensorDesc cin[4] = {dyn(dims({1, 1024, 64}), DataType::kHALF), dyn(dims({1, 3104, 64}), DataType::kHALF),
        dyn(dims({1, 3104, 320}), DataType::kHALF), dyn(dims({1, 3104}), DataType::kFLOAT)};
    DynamicPluginTensorDesc cout[1] = {dyn(dims({1, 1024, 320}), DataType::kHALF)};
    check(build->configurePlugin(cin, 4, cout, 1) == 0, "configurePlugin at the shipped shape (d 64, dv 320)");
    size_t const ws = build->getWorkspaceSize(cin, 4, cout, 1);
    check(ws > 0 && ws < (size_t{1} << 30), "workspace for split-K: " + std::to_string(ws) + " bytes");
    DynamicPluginTensorDesc wide[4] = {cin[0], cin[1], dyn(dims({1, 3104, 560}), DataType::kHALF), cin[3]};
    check(build->configurePlugin(wide, 4, cout, 1) != 0, "value width 560 (> 544) refused");

    PluginTensorDesc sin[4] = {cin[0].desc, cin[1].desc, cin[2].desc, cin[3].desc};
    PluginTensorDesc sout[1] = {cout[0].desc};
    check(runtime->onShapeChange(sin, 4, sout, 1) == 0, "onShapeChange: consistent shapes");
    sin[3].dims.d[1] = 3000;
    check(runtime->onShapeChange(sin, 4, sout, 1) != 0, "onShapeChange: mask length != keys refused");

    // Serialise -> recreate (runtime phase), as an engine does.
    PluginFieldCollection const* saved = runtime->getFieldsToSerialize();
    bool const oneField = saved && saved->nbFields == 1 && std::strcmp(saved->fields[0].name, "scale") == 0
        && saved->fields[0].type == PluginFieldType::kFLOAT32 && saved->fields[0].length == 1
        && *static_cast<float const*>(saved->fields[0].data) == 0.125F;
    check(oneField, "getFieldsToSerialize: scale = 0.125 (float32)");
    IPluginV3* again = oneField ? creator->createPlugin("attn", saved, TensorRTPhase::kRUNTIME) : nullptr;
    check(again && metadataOf(again) == metadataOf(plugin), "recreated from the serialised fields: " + metadataOf(plugin));
    IPluginV3* copy = plugin->clone();
    check(copy && copy != plugin && metadataOf(copy) == metadataOf(plugin), "clone: a new object, same fields");
    IPluginV3* attached = runtime->attachToContext(nullptr);
    check(attached && attached != plugin && metadataOf(attached) == metadataOf(plugin), "attachToContext: a clone");

    float nan = NAN;
    PluginField badScale("scale", &nan, PluginFieldType::kFLOAT32, 1);
    PluginFieldCollection badFc{1, &badScale};
    check(creator->createPlugin("attn", &badFc, TensorRTPhase::kBUILD) == nullptr, "a NaN scale refused");
    int32_t intScale = 1;
    PluginField intField("scale", &intScale, PluginFieldType::kINT32, 1);
    PluginFieldCollection intFc{1, &intField};
    check(creator->createPlugin("attn", &intFc, TensorRTPhase::kBUILD) == nullptr, "an int32 scale refused");

    if (enqueue)
    {
        int devices = 0;
        if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0)
        {
            check(false, "--enqueue: no CUDA device");
        }
        else
        {
            // Default scale (0: 1/sqrt(d)), as the rewrite writes it when d is unknown.
            float zero = 0.0F;
            PluginField f0("scale", &zero, PluginFieldType::kFLOAT32, 1);
            PluginFieldCollection fc0{1, &f0};
            IPluginV3* p0 = creator->createPlugin("attn", &fc0, TensorRTPhase::kRUNTIME);
            enqueueCase(p0, DataType::kFLOAT, 2, 100, 90, 64, 320, true, true, false);
            enqueueCase(p0, DataType::kHALF, 2, 100, 90, 64, 73, true, true, false);
            enqueueCase(p0, DataType::kBF16, 1, 130, 200, 64, 79, true, true, false);
            enqueueCase(p0, DataType::kHALF, 1, 64, 64, 40, 544, true, false, false);
            // The timed shapes (S:D:DV) at 256 px: 1024 queries, 1024 keys per source + 32 extra.
            for (int i = 3; i < argc; ++i)
            {
                int sources = 0, d = 0, dv = 0;
                if (std::sscanf(argv[i], "%d:%d:%d", &sources, &d, &dv) != 3 || sources < 1 || d < 1 || dv < 1)
                {
                    check(false, std::string("timed shape ") + argv[i] + ": not SOURCES:D:DV");
                    continue;
                }
                enqueueCase(p0, DataType::kHALF, 1, 1024, 1024 * sources + 32, d, dv, false, false, true);
                enqueueCase(p0, DataType::kFLOAT, 1, 1024, 1024 * sources + 32, d, dv, false, false, true);
            }
            delete p0;
        }
    }

    delete attached;
    delete copy;
    delete again;
    delete plugin;
    std::printf("%d passed, %d failed\n", gPassed, gFailed);
    return gFailed == 0 ? 0 : 1;
}
