"""The pure parts of bench/_common.py: registry generation, TOML output, the critical path and the lower
bound, command-count arithmetic, partition assignment from logs, markdown rows."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from ai_worker.providers.registry import default_registry_path, parse_registry
from ai_worker.worlds.plan import WorldPlan


def _load() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "bench" / "_common.py"
    spec = importlib.util.spec_from_file_location("bench_common", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_common"] = module
    spec.loader.exec_module(module)
    return module


bc = _load()


# --- critical path and lower bound ----------------------------------------------------------------


def test_critical_path_of_the_issue_world() -> None:
    # 25/150: description, 3 character batches, 1 post batch (6 posts each), the post, then its image.
    assert bc.critical_path_s(25, 150, 1.0, 2.0) == pytest.approx(6 * 1.0 + 2.0)


def test_critical_path_counts_the_longest_post_chain() -> None:
    # 1 character with 25 posts: description, 1 character batch, 3 post batches, the post, its image.
    assert bc.critical_path_s(1, 25, 1.0, 2.0) == pytest.approx(6.0 + 2.0)
    # the extra post goes to the first character, in the first batch: 11 posts = 2 post batches
    # (1 + 1 + 2 + 1 = 5 LLM), while the last batch (batch 2) has 10 posts (1 + 2 + 1 + 1 = 5 LLM).
    assert bc.critical_path_s(11, 111, 1.0, 2.0) == pytest.approx(5.0 + 2.0)
    assert bc.critical_path_s(11, 120, 1.0, 2.0) == pytest.approx(5.0 + 2.0)  # batch 2's character has 10
    assert bc.critical_path_s(11, 121, 1.0, 2.0) == pytest.approx(6.0 + 2.0)  # ... and here 11 posts


def test_critical_path_without_posts_and_with_slow_world_images() -> None:
    # no posts: the avatar of the last batch (description + 2 batches + image)
    assert bc.critical_path_s(20, 0, 1.0, 2.0) == pytest.approx(3.0 + 2.0)
    # header then icon: 1 LLM + 2 images beat 1 LLM + 1 batch + 1 image when images are slow
    assert bc.critical_path_s(1, 0, 1.0, 10.0) == pytest.approx(1.0 + 20.0)
    # fewer posts than characters: the characters without posts still have an avatar
    assert bc.critical_path_s(12, 3, 1.0, 2.0) == pytest.approx(max(1 + 1 + 1 + 1 + 2, 1 + 2 + 2))


def test_posts_split_like_the_worker() -> None:
    for users, posts in ((3, 10), (10, 3), (7, 7), (25, 150), (500, 5000)):
        plan = WorldPlan(users, posts)
        assert [bc.posts_for(users, posts, i) for i in range(users)] == [plan.posts_for(i) for i in range(users)]


def test_lower_bound_of_the_issue_figures() -> None:
    # 25/150 at 15/10 slots: 179 LLM calls and 177 images -> images bind at 35.4 s.
    b = bc.lower_bound(users=25, posts=150, llm_calls=179, images=177, llm_latency_s=1.0, image_latency_s=2.0,
                       llm_slots=15, image_slots=10)
    assert b.value == pytest.approx(35.4)
    assert b.binding == "image slots"
    assert b.llm_s == pytest.approx(179 / 15)
    assert b.critical_path_s == pytest.approx(8.0)
    # models.toml's 8 / 4 slots: 88.5 s
    assert bc.lower_bound(users=25, posts=150, llm_calls=179, images=177, llm_latency_s=1.0, image_latency_s=2.0,
                          llm_slots=8, image_slots=4).value == pytest.approx(88.5)
    # 2 worker processes with 15/10 each: 17.7 s
    assert bc.lower_bound(users=25, posts=150, llm_calls=179, images=177, llm_latency_s=1.0, image_latency_s=2.0,
                          llm_slots=30, image_slots=20).value == pytest.approx(17.7)


def test_lower_bound_critical_path_binds_with_many_slots() -> None:
    b = bc.lower_bound(users=3, posts=6, llm_calls=11, images=11, llm_latency_s=1.0, image_latency_s=2.0,
                       llm_slots=100, image_slots=100)
    assert b.binding == "critical path"
    assert b.value == pytest.approx(1 + 1 + 1 + 1 + 2)
    with pytest.raises(ValueError):
        bc.lower_bound(users=1, posts=1, llm_calls=1, images=1, llm_latency_s=1, image_latency_s=1,
                       llm_slots=0, image_slots=1)


# --- registry ---------------------------------------------------------------------------------------


def test_bench_registry_strips_rate_limits_and_sets_slots() -> None:
    base = tomllib.loads(default_registry_path().read_text(encoding="utf-8"))
    data = bc.bench_registry(base, llm_slots=15, image_slots=10)
    for model in data["models"].values():
        assert not {"rpm", "tpm", "tpd"} & set(model)
        assert model["max_concurrent"] == (15 if model["kind"] == "llm" else 10)
    assert base["models"]["google/gemini-2.5-flash"]["rpm"] == 600  # the original is untouched
    kept = bc.bench_registry(base, strip_rate_limits=False)
    assert kept["models"]["google/gemini-2.5-flash"]["rpm"] == 600
    assert kept["models"]["google/gemini-2.5-flash"]["max_concurrent"] == 8


def test_dump_toml_round_trips_the_registry() -> None:
    base = tomllib.loads(default_registry_path().read_text(encoding="utf-8"))
    data = bc.bench_registry(base, llm_slots=15, image_slots=10)
    text = bc.dump_toml(data)
    assert tomllib.loads(text) == data
    parse_registry(tomllib.loads(text))  # the worker accepts it
    assert '[models."google/gemini-2.5-flash"]' in text
    odd = {"a": {"b.c": {"x": [1, 2.5, "q\"uote"], "t": True}}, "top": "é"}
    assert tomllib.loads(bc.dump_toml(odd)) == odd


# --- command counts -----------------------------------------------------------------------------


def _doc(*rows: tuple[str, str, int, int, float]) -> dict[str, object]:
    return {"commands": [{"command": c, "collection": coll, "n": n, "failed": f, "ms": ms}
                         for c, coll, n, f, ms in rows]}


def test_counts_merge_diff_and_breakdown() -> None:
    w1 = bc.command_counts(_doc(("find", "tasks", 10, 0, 5.0), ("update", "tasks", 4, 1, 2.0)))
    w2 = bc.command_counts(_doc(("find", "tasks", 5, 0, 1.0), ("insert", "api_requests_history", 3, 0, 3.0)))
    total = bc.merge_counts([w1, w2])
    assert total[("find", "tasks")].n == 15
    assert total[("find", "tasks")].ms == pytest.approx(6.0)
    assert bc.total_commands(total) == 22
    before = bc.merge_counts([bc.command_counts(_doc(("find", "tasks", 2, 0, 0.5), ("createIndexes", "tasks", 3,
                                                                                     0, 1.0)))])
    delta = bc.diff_counts(total, before)
    assert delta[("find", "tasks")].n == 13
    assert ("createIndexes", "tasks") not in delta
    assert bc.by_collection(delta) == {"tasks": 17, "api_requests_history": 3}
    lines = bc.breakdown_lines(delta, tasks=10, markdown=True)
    assert any(line.startswith("| tasks | find | 13 | 1.30 |") for line in lines)
    assert any("**20**" in line and "**2.00**" in line for line in lines)
    assert bc.command_counts(None) == {}


# --- workers' partition assignment from their logs ---------------------------------------------------


def test_current_assignment_and_completeness() -> None:
    events = [
        {"event": "partitions assigned", "partitions": ["t:0", "t:1", "t:2", "t:3", "other:0"]},
        {"event": "task started"},
        {"event": "partitions revoked", "partitions": ["t:0", "t:1", "t:2", "t:3"]},
        {"event": "partitions assigned", "partitions": ["t:0", "t:2"]},
    ]
    assert bc.current_assignment(events, "t") == {0, 2}
    assert bc.assignment_complete([{0, 2}, {1, 3}], 4)
    assert not bc.assignment_complete([{0, 1, 2, 3}, {1, 3}], 4)  # a stale assignment: rebalance not done
    assert not bc.assignment_complete([{0, 1, 2, 3}, set()], 4)  # a worker without partitions yet
    assert not bc.assignment_complete([], 4)
    assert bc.assignment_complete([{0}, set(), set()], 1)  # more workers than partitions


# --- small helpers -------------------------------------------------------------------------------------


def test_insert_row_appends_to_the_right_table() -> None:
    header, sep = "| a | b |", "|---|---|"
    text = bc.insert_row("", header, sep, "| 1 | 2 |")
    assert text == "| a | b |\n|---|---|\n| 1 | 2 |\n"
    text = "# T\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\nprose after\n"
    assert bc.insert_row(text, header, sep, "| 3 | 4 |") == (
        "# T\n\n| a | b |\n|---|---|\n| 1 | 2 |\n| 3 | 4 |\n\nprose after\n")
    assert bc.insert_row("# T\n", "| x |", "|---|", "| 9 |") == "# T\n\n| x |\n|---|\n| 9 |\n"


def test_parsers() -> None:
    assert bc.parse_size("40/400") == (40, 400)
    assert bc.parse_size(" 3 / 6 ") == (3, 6)
    with pytest.raises(ValueError):
        bc.parse_size("40x400")
    assert bc.parse_env_items(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    with pytest.raises(ValueError):
        bc.parse_env_items(["NOVALUE"])


def test_proc_readers_on_this_process() -> None:
    import os

    assert bc.cpu_seconds(os.getpid()) is not None
    assert (bc.status_kb(os.getpid(), "VmHWM") or 0) > 0
    assert bc.cpu_seconds(2**22 + 12345) is None  # no such process
