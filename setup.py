"""Builds mistral_ext._C by driving CMake (CMakeLists.txt is the one list of what is compiled) with ninja.

Environment:
  MISTRAL_EXT_CUDA=0|1        force the CUDA kernels off or on (default: on when torch has CUDA and nvcc exists)
  MISTRAL_EXT_CUDA_ARCHS=...  CUDA architectures, default "80;90"
  MISTRAL_EXT_EMU=0|1         force the emulated CUDA kernels (mistral_ext._emu, for tests) off or on (default: on
                              when the CUDA headers are found)
  MAX_JOBS=N                  parallel compile jobs (default: CPU count)
  MISTRAL_EXT_BUILD_DIR=...   CMake build folder, kept between builds (default: build/cmake-<python tag>)
"""

import importlib.util
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def read_version() -> str:
    scope: dict = {}
    exec((ROOT / "mistral_ext" / "version.py").read_text(), scope)
    return scope["__version__"]


def cuda_switch(name: str) -> str:
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return "AUTO"
    if value in ("1", "on", "true", "yes"):
        return "ON"
    if value in ("0", "off", "false", "no"):
        return "OFF"
    raise SystemExit(f"{name} must be 0, 1 or auto, got {value!r}")


def cuda_headers_found() -> bool:
    """Where CMakeLists.txt looks for cuda_bf16.h (the emulation module needs only the CUDA headers)."""
    roots = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    spec = importlib.util.find_spec("torch")
    if spec and spec.origin:
        roots.append(str(Path(spec.origin).parent.parent / "nvidia" / "cu13"))
    return any(root and (Path(root) / "include" / "cuda_bf16.h").exists() for root in roots)


def extensions() -> list:
    exts = [CMakeExtension("mistral_ext._C")]
    emu = cuda_switch("MISTRAL_EXT_EMU")
    if emu == "ON" or (emu == "AUTO" and cuda_headers_found()):
        exts.append(CMakeExtension("mistral_ext._emu"))
    return exts


def build_tool(name: str) -> str:
    spec = importlib.util.spec_from_file_location("build_tools", ROOT / "build_tools.py")
    tools = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tools)
    found = tools.build_tool(name)
    if not found:
        raise SystemExit(f"mistral_ext: {name} not found: pip install -r requirements/build.txt")
    return found


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if ext.name != "mistral_ext._C":
            return  # one CMake build makes every module, into the same folder
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        tag = f"{sys.implementation.cache_tag}-{sysconfig.get_platform()}"
        build_dir = Path(os.environ.get("MISTRAL_EXT_BUILD_DIR", ROOT / "build" / f"cmake-{tag}"))
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake, ninja = build_tool("cmake"), build_tool("ninja")
        print(f"mistral_ext: building with {cmake} and {ninja}", flush=True)
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DMISTRAL_EXT_CUDA={cuda_switch('MISTRAL_EXT_CUDA')}",
            f"-DMISTRAL_EXT_EMU={cuda_switch('MISTRAL_EXT_EMU')}",
            f"-DMISTRAL_EXT_VERSION={read_version()}",
        ]
        if "MISTRAL_EXT_CUDA_ARCHS" in os.environ:
            configure.append(f"-DMISTRAL_EXT_CUDA_ARCHS={os.environ['MISTRAL_EXT_CUDA_ARCHS']}")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(configure)
        subprocess.check_call([cmake, "--build", str(build_dir), "-j", jobs])


setup(
    name="mistral_ext",
    version=read_version(),
    description="A fast, self-contained inference engine for the Mistral 7B architecture (C++/CUDA torch extension)",
    packages=find_packages(include=["mistral_ext", "mistral_ext.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "sentencepiece>=0.2", "tokenizers>=0.20", "gguf>=0.17", "jinja2>=3", "numpy",
                      "protobuf", "starlette>=0.37", "uvicorn>=0.29"],
    entry_points={"console_scripts": ["mistral-ext=mistral_ext.cli:main"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
