"""`ai-worker cost` against the figures of bench/cost_per_world.py (bench/results/cost_per_world.json: worlds
of 25 characters / 150 posts generated on the provider simulator at the registry's prices)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from ai_worker.cli import app
from ai_worker.config import Settings

ROOT = Path(__file__).resolve().parents[2]
BENCH = {r["option"]: r for r in json.loads((ROOT / "bench" / "results" / "cost_per_world.json").read_text())}
OPTIONS: dict[str, tuple[list[str], dict[str, str]]] = {
    "default": ([], {}),
    "gemini": (["--image-model", "google/gemini-2.5-flash-image"], {}),
    "enhance": ([], {"IMAGE_PROMPT_ENHANCE": "true"}),
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No setting from the environment running the tests, and no database, broker or API key."""
    names = {(f.alias or name).upper() for name, f in Settings.model_fields.items()}
    for name in list(os.environ):
        if name.upper() in names | {"MINIO_SECURE", "MODEL_REGISTRY_FILE"}:
            monkeypatch.delenv(name)
    monkeypatch.setenv("COLUMNS", "200")


def cost(monkeypatch: pytest.MonkeyPatch, option: str, *extra: str) -> dict[str, Any]:
    args, env = OPTIONS[option]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(app, ["cost", "--users", "25", "--posts", "150", *args, *extra, "--json"])
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.output)
    return data


@pytest.mark.parametrize("option", list(OPTIONS))
def test_cost_matches_the_bench(monkeypatch: pytest.MonkeyPatch, option: str) -> None:
    bench = BENCH[option]
    got = cost(monkeypatch, option)
    # The same prediction the bench made (same registry) ...
    assert (bench["users"], bench["posts"]) == (got["users"], got["posts"]) == (25, 150)
    for key in ("total_usd", "llm_usd", "image_usd", "per_post_usd"):
        assert got[key] == pytest.approx(bench["predicted"][key], rel=1e-6), key
    # ... the calls the world really made, step by step (a batch's re-asks aside: they are in the tokens) ...
    recorded = {row["step"]: row for row in bench["rows"]}
    for step in got["steps"]:
        if step["step"] != "post_batch":
            assert step["calls"] == recorded[step["step"]]["recorded_calls"], step["step"]
        if step["kind"] == "image":
            assert recorded[step["step"]]["recorded_sizes"] == [step["size"]]
    # ... within 10 % of what the world was charged, and the budget it got.
    assert bench["recorded"]["total_usd"] == pytest.approx(got["total_usd"], rel=0.10)
    assert got["default_budget_usd"] == pytest.approx(bench["default_budget_usd"]) == pytest.approx(
        bench["world_budget_usd"])
    assert bench["status"] == "completed" and bench["recorded"]["total_usd"] <= got["default_budget_usd"]


def test_default_world_is_affordable(monkeypatch: pytest.MonkeyPatch) -> None:
    got = cost(monkeypatch, "default")
    assert got["total_usd"] <= 0.50 and BENCH["default"]["recorded"]["total_usd"] <= 0.50
    assert got["images"] == 177 and got["llm_calls"] == 179
    gemini = cost(monkeypatch, "gemini")
    assert gemini["image_usd"] == pytest.approx(177 * 0.039)
    assert gemini["total_usd"] > 25 * got["total_usd"]


def test_table_output(monkeypatch: pytest.MonkeyPatch) -> None:
    result = CliRunner().invoke(app, ["cost"])  # 25 / 150 by default; no database, broker or key needed
    assert result.exit_code == 0, result.output
    out = result.output
    assert "25 characters / 150 posts" in out
    for text in ("post_image", "runware:100@1", "512x512", "384x384", "484 + 68 tok", "LLM", "images",
                 "per post", "default budget $1.00", "WORLD_BUDGET_FACTOR"):
        assert text in out, text
    assert f"${BENCH['default']['predicted']['total_usd']:.4f}" in out


def test_explicit_cap_and_unknown_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_BUDGET_USD", "4")
    assert cost(monkeypatch, "default")["default_budget_usd"] == 4.0
    monkeypatch.delenv("WORLD_BUDGET_USD")
    monkeypatch.setenv("WORLD_BUDGET_FACTOR", "10")
    big = json.loads(CliRunner().invoke(app, ["cost", "--users", "100", "--posts", "2000", "--json"]).output)
    assert big["default_budget_usd"] == pytest.approx(round(10 * big["total_usd"] + 0.005, 2), abs=0.011)
    unknown = CliRunner().invoke(app, ["cost", "--image-model", "vendor/new-image"])
    assert unknown.exit_code == 0, unknown.output
    assert "not in the model registry" in unknown.output
    assert CliRunner().invoke(app, ["cost", "--users", "0"]).exit_code == 2
