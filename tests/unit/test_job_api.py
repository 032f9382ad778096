"""The job API: spawning is checked against the child's `Params` by mypy and at run time; the registry
refuses a job whose policy is incomplete."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mypy import api as mypy_api
from pydantic import BaseModel

from ai_worker.tasks.context import TaskContext
from ai_worker.tasks.model import TaskDoc
from ai_worker.tasks.registry import Job, JobRegistry


class AParams(BaseModel):
    a: int


class BParams(BaseModel):
    b: int


class A(Job[AParams, TaskContext]):
    task_type = "a"
    Params = AParams
    stage = "posts"

    async def run(self, ctx: TaskContext, params: AParams) -> dict[str, Any]:
        return {}


class Steps:
    async def still_owned(self, task: TaskDoc, worker_id: str) -> bool:
        return True

    async def save_step(self, task: TaskDoc, worker_id: str, name: str, value: Any) -> bool:
        return True


def context() -> TaskContext:
    task = TaskDoc.model_validate({"_id": "t1", "type": "a", "world_id": "w1", "status": "in_progress"})
    return TaskContext(task=task, worker_id="w", max_attempts=2, steps=Steps(), is_cancelled=lambda: False)


def test_spawn_refuses_params_of_another_job_at_run_time() -> None:
    ctx = context()
    ctx.spawn(A, "ok", AParams(a=1))
    with pytest.raises(TypeError, match="A takes AParams, not BParams"):
        ctx.spawn(A, "wrong", BParams(b=1))  # type: ignore[misc]
    assert [(c.type, c.key, c.parameters) for c in ctx.children] == [("a", "ok", {"a": 1})]


def test_spawn_refuses_a_duplicate_key() -> None:
    ctx = context()
    ctx.spawn(A, "k", AParams(a=1))
    with pytest.raises(ValueError, match="duplicate child key"):
        ctx.spawn(A, "k", AParams(a=2))


def test_mypy_rejects_params_of_another_job(tmp_path: Path) -> None:
    snippet = tmp_path / "snippet.py"
    snippet.write_text(
        "from typing import Any\n\n"
        "from pydantic import BaseModel\n\n"
        "from ai_worker.tasks.context import TaskContext\n"
        "from ai_worker.tasks.registry import Job\n\n\n"
        "class AParams(BaseModel):\n    a: int\n\n\n"
        "class BParams(BaseModel):\n    b: int\n\n\n"
        "class A(Job[AParams, TaskContext]):\n"
        "    task_type = 'a'\n    Params = AParams\n    stage = 'posts'\n\n"
        "    async def run(self, ctx: TaskContext, params: AParams) -> dict[str, Any]:\n"
        "        ctx.spawn(A, 'ok', AParams(a=1))\n"
        "        ctx.spawn(A, 'wrong', BParams(b=1))\n"
        "        return {}\n")
    out, _, status = mypy_api.run(["--strict", "--no-error-summary", "--cache-dir", str(tmp_path / "cache"),
                                   str(snippet)])
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert status == 1 and len(errors) == 1, out
    wrong_line = snippet.read_text().splitlines().index("        ctx.spawn(A, 'wrong', BParams(b=1))") + 1
    assert errors[0].startswith(f"{snippet}:{wrong_line}:") and "spawn" in errors[0], out


def test_the_registry_checks_a_jobs_policy() -> None:
    class NoStage(Job[AParams, TaskContext]):
        task_type = "no_stage"
        Params = AParams

        async def run(self, ctx: TaskContext, params: AParams) -> dict[str, Any]:
            return {}

    class Finishing(NoStage):
        task_type = "finishing_job"
        stage = "finishing"

    class NoAttempts(NoStage):
        task_type = "no_attempts"
        stage = "posts"
        max_attempts = 0

    registry = JobRegistry()
    for job in (NoStage, Finishing, NoAttempts):
        with pytest.raises(ValueError, match=job.__name__):
            registry.register(job)
    registry.register(A)
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(A)
