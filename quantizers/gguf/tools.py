"""llama.cpp's own tools (llama-quantize, llama-imatrix, llama-perplexity) and its library (libllama, with the
sdist's own ctypes bindings, `llama_cpp.llama_cpp`), built once per version into the bitalloc cache from the llama.cpp
sources vendored in the `llama-cpp-python` sdist: the tools and the in-process evaluator run the same compiled code.

The build is not native: `-DGGML_NATIVE=OFF` with AVX2/FMA/F16C, because a native build on a CPU with AMX faults
("Illegal instruction") on quantized models; on a CPU with AVX-512 the extensions it has are added (AVX-512F with
CD/VL/DQ/BW, then VBMI, VNNI, BF16: 1.2-1.6x llama.cpp's forward on an AVX-512 EPYC), never AMX, and the cache
folder is named by them, so a folder is only used where its code runs. Shared libraries beside the tools, found
through an `$ORIGIN` run path. Builds take 3-5 minutes on 2 cores; concurrent jobs wait on one lock.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from bitalloc.errors import BitallocError
from bitalloc.paths import cache_dir

LLAMA_CPP_PYTHON = "0.3.36"
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
LIBRARY = "libllama.so"
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
               "-DBUILD_SHARED_LIBS=ON", "-DCMAKE_BUILD_RPATH=$ORIGIN", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF")


AVX512 = {  # ggml's option -> the CPU flags (/proc/cpuinfo) its code needs
    "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "GGML_AVX512_VBMI": ("avx512vbmi",),
    "GGML_AVX512_VNNI": ("avx512_vnni",),
    "GGML_AVX512_BF16": ("avx512_bf16",),
}


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa_options() -> tuple[str, ...]:
    """The AVX-512 options of `AVX512` this CPU runs (none without AVX-512F and its companions)."""
    have = cpu_flags()
    if not set(AVX512["GGML_AVX512"]) <= have:
        return ()
    return tuple(option for option, needs in AVX512.items() if set(needs) <= have)


def build_dir() -> Path:
    """Where this version's tools and converter live, for this CPU's instruction set (`BITALLOC_LLAMA_CPP` overrides,
    e.g. a shared build)."""
    override = os.environ.get("BITALLOC_LLAMA_CPP")
    if override:
        return Path(override)
    isa = "+".join(o.removeprefix("GGML_AVX512").lstrip("_").lower() or "avx512" for o in isa_options())
    return cache_dir("llama.cpp", LLAMA_CPP_PYTHON + (f"-{isa}" if isa else ""))


def _built(folder: Path) -> bool:
    return (all((folder / "bin" / t).is_file() for t in TOOLS + (LIBRARY,))
            and (folder / "gguf-py").is_dir() and (folder / "python" / "llama_cpp").is_dir())


def check_buildable() -> None:
    """Refuse at once where the tools are neither built nor buildable here (no cmake or C++ compiler)."""
    if not _built(build_dir()):
        _program("cmake")
        _program("c++")


def tool(name: str, announce=lambda line: print(line, file=sys.stderr)) -> Path:
    """The path of one of `TOOLS` (or `LIBRARY`), building them first if this version is not in the cache."""
    folder = build_dir()
    if not _built(folder):
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not _built(folder):
                announce(f"building llama.cpp (llama-cpp-python {LLAMA_CPP_PYTHON}'s sources) into {folder}: "
                         f"first use only, 3-5 minutes on 2 cores")
                _build(folder)
    return folder / "bin" / name


def _program(name: str) -> str:
    """A build program on PATH or beside this Python (pip's cmake in a virtual environment)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        raise BitallocError("llama.cpp", f"{name} is needed to build llama.cpp's tools and is not installed; "
                                         f"./dev test installs it, or: apt-get install cmake g++")
    return found


def _build(folder: Path) -> None:
    cmake = _program("cmake")
    _program("c++")
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp], "downloading the llama-cpp-python sdist")
        archive = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        source = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = Path(tmp) / "build"
        _run([cmake, "-S", str(source), "-B", str(build), *CMAKE_FLAGS, *(f"-D{o}=ON" for o in isa_options())],
             "configuring llama.cpp")
        _run([cmake, "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", *TOOLS, "llama"],
             "building llama.cpp")
        (folder / "bin").mkdir(exist_ok=True)
        for path in [build / "bin" / name for name in TOOLS] + sorted((build / "bin").glob("lib*.so*")):
            shutil.copy2(path, folder / "bin" / path.name, follow_symlinks=False)  # the .so links stay links
        bindings = next(Path(tmp).glob("llama_cpp_python-*/llama_cpp"))
        shutil.copytree(bindings, folder / "python" / "llama_cpp", dirs_exist_ok=True)
        shutil.copytree(source / "gguf-py", folder / "gguf-py", dirs_exist_ok=True)
        shutil.copy2(source / "convert_hf_to_gguf.py", folder / "convert_hf_to_gguf.py")
        if (source / "conversion").is_dir():
            shutil.copytree(source / "conversion", folder / "conversion", dirs_exist_ok=True)


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise BitallocError("llama.cpp", f"{what} failed (exit {done.returncode}): {tail[0]}")


def run(name: str, args: list[str], what: str) -> str:
    """Run a tool; its output on success, else a one-line error with its last line."""
    done = subprocess.run([str(tool(name)), *args], capture_output=True, text=True)
    if done.returncode:
        lines = [l for l in (done.stderr + done.stdout).splitlines() if l.strip()]
        errors = [l for l in lines if "error" in l.lower()] or lines[-1:] or ["no output"]
        raise BitallocError("llama.cpp", f"{name} {what} failed (exit {done.returncode}): {errors[-1].strip()}")
    return done.stdout + done.stderr
