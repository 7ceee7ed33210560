"""The TensorRT plugin and the PyTorch op, compiled against the real headers (no GPU here).

* The plugin is compiled against TensorRT's real C++ headers: a user's install
  ($TensorRT_ROOT) or the TensorRT 11.1 headers of NVIDIA's open-source release kept beside the
  checkout (../shared/third_party/tensorrt-11.1, or $IWARP_TENSORRT_HEADERS). Then
  `iwarp build-plugin`'s code (CMake) builds the library and the interface test program
  (plugins/tests/plugin_interface_test.cpp), which dlopens the library as TensorRT does and
  checks creator, fields, capabilities, output types and shapes, formats, serialise -> recreate,
  clone and attachToContext through the real interfaces. The library must need no libnvinfer.
* `-DIWARP_STATIC_REGISTRATION` compiles (REGISTER_TENSORRT_PLUGIN inside `namespace iwarp`).
* The PyTorch op is syntax-checked against the CPU wheel's headers plus the CUDA toolkit's
  (the one generated c10 CUDA config header the CPU wheel lacks is supplied in a temp folder).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from iwarp.engine_build import plugin as plugin_mod

REPO = Path(__file__).resolve().parents[1]
PLUGIN_SRC = REPO / "plugins" / "tensorrt" / "IWarpAttentionPlugin.cpp"
TEST_SRC = REPO / "plugins" / "tests" / "plugin_interface_test.cpp"
KERNELS = REPO / "plugins" / "kernels"
OP_SRC = REPO / "plugins" / "torch" / "iwarp_attention_op.cpp"


def _cuda_include() -> Path | None:
    nvcc = shutil.which("nvcc")
    candidates = [Path(nvcc).resolve().parent.parent / "include"] if nvcc else []
    candidates += [Path("/usr/local/cuda/include")]
    for c in candidates:
        if (c / "cuda_runtime_api.h").is_file():
            return c
    return None


CUDA_INCLUDE = _cuda_include()
TRT_INCLUDE = plugin_mod.find_tensorrt_headers()
needs_cuda_headers = pytest.mark.skipif(
    CUDA_INCLUDE is None or shutil.which("g++") is None,
    reason="CUDA toolkit headers (cuda_runtime_api.h) or g++ not installed",
)
needs_trt_headers = pytest.mark.skipif(
    TRT_INCLUDE is None,
    reason="TensorRT headers not found: no TensorRT install ($TensorRT_ROOT) and neither "
    "../shared/third_party/tensorrt-11.1 beside the checkout nor $IWARP_TENSORRT_HEADERS",
)
needs_build_tools = pytest.mark.skipif(
    plugin_mod.find_nvcc() is None or shutil.which("cmake") is None,
    reason="nvcc or cmake not installed",
)


def _compile(extra: list[str], out: list[str]) -> subprocess.CompletedProcess:
    cmd = ["g++", "-std=c++17", "-Wall", "-Wextra", "-Werror", *extra]
    cmd += ["-isystem", str(TRT_INCLUDE), "-isystem", str(CUDA_INCLUDE), f"-I{KERNELS}"]
    cmd += [str(PLUGIN_SRC), *out]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@needs_cuda_headers
@needs_trt_headers
def test_plugin_compiles_against_real_headers():
    result = _compile(["-fsyntax-only"], [])
    assert result.returncode == 0, result.stderr[-4000:]


@needs_cuda_headers
@needs_trt_headers
def test_static_registration_compiles(tmp_path):
    """REGISTER_TENSORRT_PLUGIN pastes its argument into a variable name: it is used inside
    `namespace iwarp`, and the object then calls getPluginRegistry() (libnvinfer)."""
    obj = tmp_path / "plugin_static.o"
    result = _compile(["-DIWARP_STATIC_REGISTRATION", "-fPIC", "-c"], ["-o", str(obj)])
    assert result.returncode == 0, result.stderr[-4000:]
    if shutil.which("nm"):
        undefined = subprocess.run(
            ["nm", "-u", "-C", str(obj)], capture_output=True, text=True
        ).stdout
        assert "getPluginRegistry" in undefined  # the registrar is really compiled in


@pytest.fixture(scope="module")
def plugin_build(tmp_path_factory) -> plugin_mod.PluginBuild:
    """`iwarp build-plugin`'s build (CMake: kernel, plugin, interface test program)."""
    if TRT_INCLUDE is None:
        pytest.skip(needs_trt_headers.kwargs["reason"])
    build_dir = tmp_path_factory.mktemp("plugin_build")
    options = plugin_mod.BuildPluginOptions(build_dir=str(build_dir), cuda_archs="90")
    return plugin_mod.build_plugin(options, show_progress=False)


@needs_build_tools
@needs_trt_headers
def test_plugin_library_needs_no_libnvinfer(plugin_build):
    lib = plugin_build.library
    assert lib is not None and lib.is_file()
    assert plugin_build.tensorrt_include == TRT_INCLUDE
    if not (shutil.which("nm") and shutil.which("readelf") and sys.platform.startswith("linux")):
        pytest.skip("nm/readelf (binutils) not installed")
    syms = subprocess.run(
        ["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True
    ).stdout
    names = {line.split()[-1] for line in syms.splitlines() if line.strip()}
    assert {"getCreators", "setLoggerFinder"} <= names
    assert not any("IWarpAttentionPlugin" in n for n in names)  # C++ classes stay hidden
    needed = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True).stdout
    assert "nvinfer" not in needed
    undefined = subprocess.run(
        ["nm", "-D", "--undefined-only", "-C", str(lib)], capture_output=True, text=True
    ).stdout
    assert "nvinfer1::" not in undefined and "getPluginRegistry" not in undefined


@needs_build_tools
@needs_trt_headers
def test_plugin_interfaces_through_dlopen(plugin_build):
    """The C++ test program loads the library and checks it through TensorRT's interfaces."""
    program = plugin_build.build_dir / "iwarp_plugin_test"
    assert program.is_file(), "the CMake build made no iwarp_plugin_test"
    result = subprocess.run(
        [str(program), str(plugin_build.library)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[-1].endswith("0 failed") and int(lines[-1].split()[0]) >= 25, lines[-1]
    assert not any(line.startswith("FAIL") for line in lines)


@needs_build_tools
@needs_trt_headers
def test_interface_test_program_fails_on_a_wrong_library(plugin_build, tmp_path):
    """The program can fail: a library without the plugin's entry points is refused."""
    program = plugin_build.build_dir / "iwarp_plugin_test"
    result = subprocess.run(
        [str(program), str(tmp_path / "missing.so")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0 and "FAIL dlopen" in result.stdout


def test_bundled_headers_env_override(tmp_path, monkeypatch):
    """$IWARP_TENSORRT_HEADERS points the search at another copy of the headers; an explicit
    root that lacks them is not silently replaced."""
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "NvInferRuntime.h").write_text("// test\n")
    for name in ("TensorRT_ROOT", "TENSORRT_ROOT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(plugin_mod, "_HEADER_HINTS", ())
    monkeypatch.setenv(plugin_mod.BUNDLED_HEADERS_ENV, str(tmp_path))
    assert plugin_mod.find_tensorrt_headers() == (tmp_path / "include").resolve()
    assert plugin_mod.find_tensorrt_headers(tmp_path / "nowhere") is None
    monkeypatch.setenv(plugin_mod.BUNDLED_HEADERS_ENV, str(tmp_path / "nowhere"))
    assert plugin_mod.find_tensorrt_headers() is None


@needs_cuda_headers
def test_torch_op_compiles(tmp_path):
    torch = pytest.importorskip("torch")
    from torch.utils.cpp_extension import include_paths

    shim = tmp_path / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = ["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror"]
    for inc in [*include_paths(), str(tmp_path), str(CUDA_INCLUDE)]:
        cmd += ["-isystem", inc]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd += [f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{KERNELS}", str(OP_SRC)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
