"""WorldPlan: the split of posts over characters; the jobs' predictions (summed by the registry) against a walk
of the pipeline."""

from __future__ import annotations

import math

import pytest

from ai_worker.jobs import build_registry
from ai_worker.worlds.plan import WorldPlan

REGISTRY = build_registry()

USERS = range(1, 31)
POSTS = range(0, 101)


def _brute_force_tasks(users: int, posts: int) -> int:
    """Walk the pipeline the way the jobs spawn it, counting every task."""
    plan = WorldPlan(users=users, posts=posts)
    tasks = 1  # init_world_creation
    tasks += 1  # generate_world_description
    tasks += 1  # generate_world_image
    remaining = users
    while remaining > 0:  # generate_character_batch, 10 characters each
        tasks += 1
        remaining -= min(10, remaining)
    for i in range(users):
        tasks += 1  # generate_character
        tasks += 1  # generate_character_avatar
        left = plan.posts_for(i)
        while left > 0:  # generate_post_batch, 10 ideas each
            tasks += 1
            left -= min(10, left)
    total_posts = sum(plan.posts_for(i) for i in range(users))
    tasks += total_posts  # generate_post
    tasks += total_posts  # generate_post_image
    return tasks


def test_posts_for_sums_to_posts() -> None:
    for users in USERS:
        for posts in POSTS:
            plan = WorldPlan(users=users, posts=posts)
            shares = [plan.posts_for(i) for i in range(users)]
            assert sum(shares) == posts, (users, posts, shares)
            assert max(shares) - min(shares) <= 1, (users, posts, shares)
            assert all(s >= 0 for s in shares)


def test_every_character_posts_when_posts_at_least_users() -> None:
    for users in USERS:
        for posts in range(users, 101):
            plan = WorldPlan(users=users, posts=posts)
            assert all(plan.posts_for(i) >= 1 for i in range(users)), (users, posts)


def test_fewer_posts_than_users_go_to_the_first_characters() -> None:
    plan = WorldPlan(users=7, posts=3)
    assert [plan.posts_for(i) for i in range(7)] == [1, 1, 1, 0, 0, 0, 0]


def test_predicted_tasks_matches_brute_force() -> None:
    for users in USERS:
        for posts in POSTS:
            assert REGISTRY.predict(WorldPlan(users, posts)).tasks == _brute_force_tasks(users, posts), (users, posts)


def test_predicted_tasks_formula_for_a_known_case() -> None:
    # 10 users, 50 posts: 3 world + 1 batch + 10 characters + 10 avatars + 10 post batches + 50 + 50.
    assert REGISTRY.predict(WorldPlan(10, 50)).tasks == 3 + 1 + 10 + 10 + 10 + 50 + 50
    # 3 users, 25 posts -> 9, 8, 8 posts: one post batch each.
    assert REGISTRY.predict(WorldPlan(3, 25)).tasks == 3 + 1 + 3 + 3 + 3 + 25 + 25
    # 1 user, 25 posts -> ceil(25/10) = 3 post batches.
    assert REGISTRY.predict(WorldPlan(1, 25)).tasks == 3 + 1 + 1 + 1 + 3 + 25 + 25


@pytest.mark.parametrize(("users", "posts"), [(1, 0), (11, 0), (30, 100), (12, 5)])
def test_predicted_llm_calls_and_images(users: int, posts: int) -> None:
    plan = WorldPlan(users, posts)
    post_batches = sum(math.ceil(plan.posts_for(i) / 10) for i in range(users))
    assert REGISTRY.predict(plan).llm_calls == 1 + math.ceil(users / 10) + post_batches + posts
    assert REGISTRY.predict(plan).images == 2 + users + posts


def test_post_batches_is_constant_time_and_exact() -> None:
    for users in USERS:
        for posts in POSTS:
            plan = WorldPlan(users, posts)
            assert plan.post_batches() == sum(math.ceil(plan.posts_for(i) / 10) for i in range(users))
    huge = WorldPlan(10**9, 10**12)  # would take minutes if it looped over characters
    assert huge.post_batches() == 10**9 * 100
