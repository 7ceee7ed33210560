"""The IWarpAttention TensorRT plugin library: build it (`iwarp build-plugin`), find it, load it.

Search order for the library (`find_plugin_library`), never a hard-coded absolute path:
  1. $IWARP_PLUGIN_PATH (the .so itself, or a folder holding it);
  2. the build cache: $IWARP_CACHE/plugin/build (where `iwarp build-plugin` builds);
  3. next to the installed package: <iwarp package>/lib (where `iwarp build-plugin --install`
     copies it, so a wheel-less deployment can ship it).
`load_plugin` registers it with `trt.get_plugin_registry().load_library(path)`; the library
exports getCreators()/setLoggerFinder(), TensorRT's plugin-library contract.

Building needs cmake, nvcc and the TensorRT C++ headers (no pip wheel ships them: the TensorRT
tar/deb packages do; point --tensorrt-root / $TensorRT_ROOT at them). The plugin calls no
libnvinfer symbol, so headers alone build it: without an install, the TensorRT 11.1 headers of
NVIDIA's open-source release kept beside the checkout (`../shared/third_party/tensorrt-11.1`, or
$IWARP_TENSORRT_HEADERS) are used (CI, the GPU check). Without any headers, `--kernels-only`
still compiles and checks the CUDA kernel.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from iwarp.errors import IwarpError
from iwarp.options import option
from iwarp.paths import PACKAGE_DIR, user_cache_dir

PLUGIN_NAME = "IWarpAttention"
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ""
LIBRARY_NAME = (
    "iwarp_attention_plugin.dll" if sys.platform == "win32" else "libiwarp_attention_plugin.so"
)
DEFAULT_CUDA_ARCHS = "80-real;86-real;89-real;90"
_HEADER_HINTS = (
    "/usr/include/x86_64-linux-gnu",
    "/usr/include/aarch64-linux-gnu",
    "/usr/local/TensorRT",
    "/opt/tensorrt",
)


class PluginError(IwarpError):
    """The plugin cannot be built, found or loaded."""


def plugin_build_dir() -> Path:
    return user_cache_dir() / "plugin" / "build"


def installed_library() -> Path:
    return PACKAGE_DIR / "lib" / LIBRARY_NAME


def source_root() -> Path:
    """The folder with CMakeLists.txt and plugins/: $IWARP_PLUGIN_SOURCE (plugins/ itself or the
    checkout) or the source checkout this package runs from (an editable install)."""
    env = os.environ.get("IWARP_PLUGIN_SOURCE")
    candidates = [Path(env), Path(env).parent] if env else []
    candidates.append(PACKAGE_DIR.parent)
    for root in candidates:
        if (root / "CMakeLists.txt").is_file() and (root / "plugins" / "kernels").is_dir():
            return root
    raise PluginError(
        "the plugin sources (CMakeLists.txt, plugins/) are not next to this iwarp "
        "(a wheel install has no plugins/ folder)",
        "build from a source checkout (pip install -e .) or set IWARP_PLUGIN_SOURCE=<checkout>",
    )


def find_plugin_library() -> Path | None:
    """The plugin library by the search order of the module docstring, or None."""
    env = os.environ.get("IWARP_PLUGIN_PATH")
    if env:
        p = Path(env)
        p = p / LIBRARY_NAME if p.is_dir() else p
        if not p.is_file():
            raise PluginError(
                f"IWARP_PLUGIN_PATH={env} is not the plugin library",
                f"point it at {LIBRARY_NAME} or unset it",
            )
        return p
    for p in (plugin_build_dir() / LIBRARY_NAME, installed_library()):
        if p.is_file():
            return p
    return None


def _registry_creator(registry, name: str = PLUGIN_NAME):
    for attr in ("get_creator", "get_plugin_creator"):
        fn = getattr(registry, attr, None)
        if fn is None:
            continue
        try:
            creator = fn(name, PLUGIN_VERSION, PLUGIN_NAMESPACE)
        except (TypeError, RuntimeError):
            creator = None
        if creator is not None:
            return creator
    return None


_LOADED: dict[str, Path] = {}


def load_plugin(path: str | Path | None = None) -> Path:
    """Registers the plugin library with TensorRT (once per process); returns its path."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise PluginError(
            "TensorRT is not installed", "pip install 'iwarp[tensorrt]' (or NVIDIA's packages)"
        ) from exc
    lib = Path(path) if path else find_plugin_library()
    if lib is None:
        raise PluginError(
            f"the {PLUGIN_NAME} plugin library ({LIBRARY_NAME}) was not found",
            "run 'iwarp build-plugin' (needs cmake, nvcc and the TensorRT headers), set "
            "IWARP_PLUGIN_PATH, or build without it: 'iwarp build --no-plugin'",
        )
    lib = lib.resolve()
    if str(lib) in _LOADED:
        return lib
    registry = trt.get_plugin_registry()
    if _registry_creator(registry) is None:
        handle = registry.load_library(str(lib))
        if handle is None or _registry_creator(registry) is None:
            raise PluginError(
                f"TensorRT did not register {PLUGIN_NAME} from {lib}",
                "rebuild it against this TensorRT version ('iwarp build-plugin --clean')",
            )
    _LOADED[str(lib)] = lib
    return lib


# --------------------------------------------------------------------------- building


@dataclass
class PluginBuild:
    build_dir: Path
    library: Path | None  # None for --kernels-only
    kernels: Path
    tensorrt_include: Path | None
    cuda_archs: str
    seconds: float


def find_nvcc() -> Path | None:
    found = shutil.which("nvcc")
    if found:
        return Path(found)
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env) and (Path(os.environ[env]) / "bin" / "nvcc").is_file():
            return Path(os.environ[env]) / "bin" / "nvcc"
    default = Path("/usr/local/cuda/bin/nvcc")
    return default if default.is_file() else None


BUNDLED_HEADERS_ENV = "IWARP_TENSORRT_HEADERS"


def bundled_tensorrt_headers() -> Path | None:
    """The TensorRT 11.1 headers kept for machines without TensorRT (NvInferRuntime.h's folder):
    $IWARP_TENSORRT_HEADERS, else `../shared/third_party/tensorrt-11.1` beside the checkout."""
    env = os.environ.get(BUNDLED_HEADERS_ENV)
    if env:
        root = Path(env)
    else:
        try:
            root = source_root().parent / "shared" / "third_party" / "tensorrt-11.1"
        except PluginError:
            return None
    for inc in (root, root / "include"):
        if (inc / "NvInferRuntime.h").is_file():
            return inc.resolve()
    return None


def find_tensorrt_headers(root: str | Path | None = None) -> Path | None:
    """The folder holding NvInferRuntime.h: `root`, $TensorRT_ROOT, a system install, then the
    bundled TensorRT 11.1 headers (`bundled_tensorrt_headers`)."""
    if root:  # what the user named, or nothing
        roots: list[str | Path | None] = [root]
    else:
        roots = [
            os.environ.get("TensorRT_ROOT"),  # noqa: SIM112 (CMake's spelling)
            os.environ.get("TENSORRT_ROOT"),
            *_HEADER_HINTS,
        ]
    found = _headers_in(roots)
    return found if found is not None or root else bundled_tensorrt_headers()


def _headers_in(roots: list[str | Path | None]) -> Path | None:
    for r in roots:
        if not r:
            continue
        for inc in (Path(r), Path(r) / "include"):
            if (inc / "NvInferRuntime.h").is_file():
                return inc
    return None


def default_cuda_archs() -> str:
    """This machine's GPU when PyTorch sees one (a fast build), else the portable list."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return f"{major}{minor}"
    except ImportError:
        pass
    return DEFAULT_CUDA_ARCHS


@dataclass
class BuildPluginOptions:
    """`iwarp build-plugin`: `build_plugin`'s arguments as command-line options."""

    tensorrt_root: str | None = option(None, help="TensorRT folder with include/NvInferRuntime.h")
    cuda_archs: str | None = option(
        None, flag="--cuda-arch", help="CMAKE_CUDA_ARCHITECTURES (default: this GPU or 80-90)"
    )
    kernels_only: bool = option(False, help="only the CUDA kernel library")
    build_dir: str | None = option(None, help="cmake build folder (default: the user cache)")
    jobs: int = option(2, help="parallel compile jobs")
    clean: bool = option(False, help="start from an empty build folder")
    install: bool = option(False, help="copy the library into the package")


def run_build_plugin(o: BuildPluginOptions) -> int:
    """`iwarp build-plugin`: builds, then says what and for which GPUs."""
    result = build_plugin(o)
    what = result.library or result.kernels
    print(f"built {what} in {result.seconds:.0f} s (CUDA architectures {result.cuda_archs})")
    return 0


def build_plugin(o: BuildPluginOptions, show_progress: bool = True) -> PluginBuild:
    """Configures and builds CMakeLists.txt into the cache build folder (or `o.build_dir`)."""
    tensorrt_root, kernels_only = o.tensorrt_root, o.kernels_only
    cmake = shutil.which("cmake")
    if cmake is None:
        raise PluginError(
            "cmake not found", "install it (apt-get install cmake, or pip install cmake)"
        )
    nvcc = find_nvcc()
    if nvcc is None:
        raise PluginError(
            "nvcc (the CUDA toolkit) not found",
            "install the CUDA toolkit and put nvcc on PATH, or set CUDA_HOME",
        )
    include = None
    if not kernels_only:
        include = find_tensorrt_headers(tensorrt_root)
        if include is None:
            where = f" in {tensorrt_root}" if tensorrt_root else ""
            raise PluginError(
                f"TensorRT C++ headers (NvInferRuntime.h) not found{where}",
                "the tensorrt pip wheels ship no headers: install the TensorRT tar/deb package "
                "and pass --tensorrt-root DIR (or set TensorRT_ROOT, or IWARP_TENSORRT_HEADERS "
                "to the TensorRT 11.1 headers); --kernels-only builds the CUDA kernel alone",
            )
    src = source_root()
    out = Path(o.build_dir) if o.build_dir else plugin_build_dir()
    if o.clean and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    archs = o.cuda_archs or default_cuda_archs()
    configure = [
        cmake,
        "-S",
        str(src),
        "-B",
        str(out),
        "-DCMAKE_BUILD_TYPE=Release",
        f"-DCMAKE_CUDA_COMPILER={nvcc}",
        f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
        f"-DIWARP_KERNELS_ONLY={'ON' if kernels_only else 'OFF'}",
    ]
    if include is not None:
        configure.append(
            f"-DTensorRT_ROOT={include.parent if include.name == 'include' else include}"
        )
    t0 = time.perf_counter()
    _run(configure, "configure", show_progress)
    _run([cmake, "--build", str(out), "-j", str(max(1, o.jobs))], "build", show_progress)
    library = None if kernels_only else out / LIBRARY_NAME
    if library is not None and not library.is_file():
        raise PluginError(
            f"the build finished without {library.name}",
            f"see the cmake output above; the TensorRT headers used were {include}",
        )
    if o.install and library is not None:
        dst = installed_library()
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(library, dst)
        library = dst
    return PluginBuild(
        out, library, out / "libiwarp_attention_kernels.a", include, archs, time.perf_counter() - t0
    )


_PERCENT = re.compile(r"^\[\s*(\d+)%\]")


def _run(cmd: list[str], step: str, show_progress: bool) -> None:
    """Runs cmake, showing its progress lines; the tail of the log when it fails."""
    lines: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        lines.append(line)
        if show_progress and (
            _PERCENT.match(line) or "iwarp:" in line or "Error" in line or "warning" in line
        ):
            print(f"iwarp build-plugin: {line}", file=sys.stderr, flush=True)
    if proc.wait() != 0:
        tail = "\n".join(lines[-40:])
        raise PluginError(
            f"cmake {step} failed (exit {proc.returncode}):\n{tail}",
            "see the output above; 'iwarp build-plugin --clean' starts from scratch",
        )
