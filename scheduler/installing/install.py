"""Obtaining a llama-server binary: find one, or build one from llama.cpp source.

The source (``scheduler/installing/llama_source.py``) is extracted into the cache and built
with CMake, only the ``llama-server`` target. Cache layout, under :func:`corral_cache_dir`::

    llama.cpp/<version>/src/                   extracted llama.cpp tree
    llama.cpp/<version>/build-<variant>/       CMake build dir, kept: rebuilds are incremental
    llama.cpp/<version>/build-<variant>.log    output of the last configure + build
    llama.cpp/<version>/<variant>/bin/llama-server

Everything here blocks (downloads, builds); async callers use ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO

from scheduler.errors import BinaryNotFound, CorralError
from scheduler.installing.llama_source import PACKAGE, PINNED_VERSION, Progress, fetch_source
from scheduler.process.children import signal_group

log = logging.getLogger(__name__)

VARIANTS = ("cpu", "cuda")
BINARY_NAME = "llama-server"

_NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    # Corral talks plain HTTP to it on loopback and fetches models itself: no TLS needed.
    "-DLLAMA_OPENSSL=OFF",
    # The binary lives in a per-machine cache, so tuning it to this CPU costs nothing.
    # With CUDA this also makes ggml target the GPUs present at build time ("native").
    "-DGGML_NATIVE=ON",
    # ggml's AMX matmul crashes (SIGSEGV in ggml_backend_amx_mul_mat) on CPUs that
    # advertise AMX, as the Sapphire Rapids VMs here do. GGML_NATIVE's -march=native
    # turns the AMX code on whatever GGML_AMX_* say; explicit -mno-* flags win over
    # -march in GCC and Clang, so the AVX-512 kernels are used instead.
    "-DGGML_AMX_TILE=OFF",
    "-DGGML_AMX_INT8=OFF",
    "-DGGML_AMX_BF16=OFF",
    f"-DCMAKE_C_FLAGS={_NO_AMX}",
    f"-DCMAKE_CXX_FLAGS={_NO_AMX}",
)

VERSION_TIMEOUT_S = 10.0
LOG_TAIL_LINES = 30

Source = Literal["configured", "env", "PATH", "cache"]


def print_progress(line: str) -> None:
    """Default progress sink: the CLI shows build output as it happens."""
    print(line, file=sys.stderr, flush=True)


# --- locations -------------------------------------------------------------------------


def corral_cache_dir() -> Path:
    explicit = os.environ.get("CORRAL_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "corral"


def version_dir(version: str = PINNED_VERSION) -> Path:
    return corral_cache_dir() / "llama.cpp" / version


def cached_binary(version: str = PINNED_VERSION, variant: str | None = None) -> Path:
    """Where the built binary for ``version``/``variant`` lives (it may not exist)."""
    return version_dir(version) / _check_variant(variant or default_variant()) / "bin" / BINARY_NAME


def find_nvcc() -> Path | None:
    found = shutil.which("nvcc")
    if found:
        return Path(found)
    fallback = Path("/usr/local/cuda/bin/nvcc")
    return fallback if _is_executable(fallback) else None


def gpu_driver_present() -> bool:
    """True when an NVIDIA kernel driver is visible.

    nvcc alone is not enough: toolkits get installed on GPU-less hosts (the machine
    Corral was developed on is one), and a CUDA build there fails at configure time
    (with GGML_NATIVE ggml asks for the "native" GPU architecture), while a CUDA binary
    cannot run without the driver's ``libcuda.so`` anyway.
    """
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def default_variant() -> str:
    """``CORRAL_LLAMA_VARIANT`` if set, else ``cuda`` when nvcc and a GPU driver exist."""
    forced = os.environ.get("CORRAL_LLAMA_VARIANT", "").strip().lower()
    if forced:
        return _check_variant(forced)
    return "cuda" if find_nvcc() is not None and gpu_driver_present() else "cpu"


def _check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise CorralError(
            f"unknown llama-server variant {variant!r}; expected one of {', '.join(VARIANTS)}"
        )
    return variant


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


# --- finding an existing binary --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BinaryLocation:
    path: Path
    source: Source


def locate_llama_server(configured: Path | None = None) -> BinaryLocation | None:
    """Find llama-server and say where it came from.

    Order: the configured path, ``$CORRAL_LLAMA_SERVER``, ``llama-server`` on PATH, the
    cached build of the pinned version (preferred variant first). An explicitly named
    binary that is missing raises rather than falling through: silently running some
    other llama-server than the one the user asked for is worse than failing.
    """
    if configured is not None:
        path = configured.expanduser()
        if not _is_executable(path):
            raise BinaryNotFound(
                f"configured llama-server {path} does not exist or is not executable "
                "(check [llama_server] binary in the config)"
            )
        return BinaryLocation(path, "configured")

    from_env = os.environ.get("CORRAL_LLAMA_SERVER")
    if from_env:
        path = Path(from_env).expanduser()
        if not _is_executable(path):
            raise BinaryNotFound(
                f"CORRAL_LLAMA_SERVER={from_env} does not exist or is not executable"
            )
        return BinaryLocation(path, "env")

    on_path = shutil.which(BINARY_NAME)
    if on_path:
        return BinaryLocation(Path(on_path), "PATH")

    preferred = default_variant()
    for variant in (preferred, *(v for v in VARIANTS if v != preferred)):
        candidate = cached_binary(PINNED_VERSION, variant)
        if _is_executable(candidate):
            return BinaryLocation(candidate, "cache")
    return None


def find_llama_server(configured: Path | None = None) -> Path | None:
    """The llama-server to run, or None when there is none (see :func:`locate_llama_server`)."""
    found = locate_llama_server(configured)
    return found.path if found else None


def binary_version(path: Path) -> str | None:
    """The line of ``path --version`` that names the version, e.g. ``version: 1 (abc123)``."""
    try:
        done = subprocess.run(
            [str(path), "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=VERSION_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("%s --version failed: %s", path, exc)
        return None
    # llama-server prints build info on stderr; look at both in case that changes.
    for line in (done.stderr + "\n" + done.stdout).splitlines():
        if "version" in line.lower():
            return line.strip()
    return None


# --- installing ------------------------------------------------------------------------


def install_llama_server(
    version: str = PINNED_VERSION,
    variant: str | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Make sure the cached llama-server for ``version``/``variant`` exists; return its path.

    A no-op when it already exists (unless ``force``). Otherwise downloads and extracts
    the source if it is not already extracted, then configures (first time or ``force``)
    and builds only the ``llama-server`` target, streaming CMake's output to ``progress``.
    Concurrent installs of the same version are serialised by a lock file.
    """
    variant = _check_variant(variant or default_variant())
    target = cached_binary(version, variant)
    if not force and _is_executable(target):
        return target

    emit = progress or print_progress
    root = version_dir(version)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        # Another process may have finished the same install while we waited.
        if not force and _is_executable(target):
            return target
        if not (root / "src" / "CMakeLists.txt").is_file():
            fetch_source(version, root / "src", emit)
        built = _build(root, version, variant, force, emit)
        _install_atomically(built, target)
    emit(f"installed {target}")
    return target


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _install_atomically(built: Path, target: Path) -> None:
    # Copy to a temporary name, then rename: an interrupted copy must never leave a
    # truncated file at the path that find_llama_server trusts.
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{BINARY_NAME}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        shutil.copyfile(built, tmp)
        tmp.chmod(0o755)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


# --- build -----------------------------------------------------------------------------


def build_jobs() -> int:
    explicit = os.environ.get("CORRAL_BUILD_JOBS")
    if explicit and explicit.isdigit() and int(explicit) > 0:
        return int(explicit)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cmake_configure_args(
    src: Path, build_dir: Path, variant: str, version: str = PINNED_VERSION
) -> list[str]:
    args = ["cmake", "-S", str(src), "-B", str(build_dir), *CMAKE_FLAGS]
    # The sdist has no .git, so llama.cpp would report "commit unknown"; name the source
    # instead so that `--version` tells which package a binary was built from.
    args.append(f"-DLLAMA_BUILD_COMMIT={PACKAGE}-{version}")
    if variant == "cuda":
        args.append("-DGGML_CUDA=ON")
    # Escape hatch for what we cannot guess, e.g. -DCMAKE_CUDA_ARCHITECTURES=89 on a
    # build host without the target GPU.
    args += shlex.split(os.environ.get("CORRAL_CMAKE_ARGS", ""))
    return args


def _build(root: Path, version: str, variant: str, reconfigure: bool, progress: Progress) -> Path:
    src, build_dir, log_path = (
        root / "src",
        root / f"build-{variant}",
        root / f"build-{variant}.log",
    )
    cmake = shutil.which("cmake")
    if cmake is None:
        raise CorralError(
            "cmake not found: building llama-server needs cmake (>= 3.14) and a C/C++ "
            "compiler; or install llama-server yourself and set CORRAL_LLAMA_SERVER"
        )
    env = os.environ.copy()
    nvcc = find_nvcc()
    if variant == "cuda" and nvcc is not None and not env.get("CUDACXX"):
        # CMake only searches PATH for nvcc; /usr/local/cuda/bin often is not on it.
        env["CUDACXX"] = str(nvcc)

    with log_path.open("w", encoding="utf-8") as log_file:
        if reconfigure or not (build_dir / "CMakeCache.txt").is_file():
            configure = cmake_configure_args(src, build_dir, variant, version)
            configure[0] = cmake
            _run_streamed(configure, env, log_file, log_path, progress, "configure")
        build = [
            cmake, "--build", str(build_dir), "--target", BINARY_NAME,
            "--config", "Release", "-j", str(build_jobs()),
        ]  # fmt: skip
        _run_streamed(build, env, log_file, log_path, progress, "build")

    built = build_dir / "bin" / BINARY_NAME
    if _is_executable(built):
        return built
    # llama.cpp puts binaries in build/bin; look further only in case that ever changes.
    for candidate in build_dir.rglob(BINARY_NAME):
        if _is_executable(candidate):
            return candidate
    raise CorralError(f"build finished but no {BINARY_NAME} was produced under {build_dir}")


def _run_streamed(
    argv: list[str],
    env: dict[str, str],
    log_file: TextIO,
    log_path: Path,
    progress: Progress,
    step: str,
) -> None:
    tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
    progress("$ " + shlex.join(argv))
    log_file.write("$ " + shlex.join(argv) + "\n")
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            errors="replace",
            bufsize=1,
            # Own process group, so an interrupted build can take make and every
            # compiler with it instead of leaving them running.
            start_new_session=True,
        )
    except OSError as exc:
        raise CorralError(f"cannot run {argv[0]}: {exc}") from exc
    with proc:
        assert proc.stdout is not None  # guaranteed by stdout=PIPE
        try:
            for raw in proc.stdout:
                line = raw.rstrip("\n")
                tail.append(line)
                log_file.write(raw)
                progress(line)
        except BaseException:
            signal_group(proc.pid, signal.SIGKILL)
            raise
    if proc.returncode != 0:
        raise CorralError(
            f"llama-server {step} failed (exit {proc.returncode}); full log: {log_path}\n"
            + "\n".join(tail)
        )
