"""Every prompt template renders with exactly the values its job passes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ai_worker.content.prompts import PromptLibrary

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "prompts"

# The keyword arguments each job (or the image prompt enhancer) passes to PromptLibrary.render.
JOB_VALUES: dict[str, tuple[str, ...]] = {
    "world_description": ("user_prompt", "users_count", "posts_count"),
    "character_batch": ("world", "existing", "count"),
    "post_batch": ("world", "character", "existing", "count"),
    "post": ("world", "character", "topic", "angle", "post_number"),
    "image_prompt": ("prompt", "width", "height"),  # images.enhance.PromptEnhancer
}
_PLACEHOLDER = re.compile(r"\$(?:\{\s*)?[_a-zA-Z]")


def _sentinels(name: str) -> dict[str, str]:
    return {key: f"<<{key.upper()}-VALUE>>" for key in JOB_VALUES[name]}


@pytest.fixture
def library() -> PromptLibrary:
    return PromptLibrary(PROMPTS_DIR)


def test_every_prompt_file_is_known() -> None:
    files = sorted(p.stem for p in PROMPTS_DIR.glob("*.md"))
    assert files == sorted(JOB_VALUES)
    assert PromptLibrary(PROMPTS_DIR).names() == files


@pytest.mark.parametrize("name", sorted(JOB_VALUES))
def test_renders_with_job_values_and_uses_every_one(library: PromptLibrary, name: str) -> None:
    values = _sentinels(name)
    prompt = library.render(name, **values)
    assert prompt.system.strip()
    assert prompt.user.strip()
    for text in (prompt.system, prompt.user):
        assert not _PLACEHOLDER.search(text), text
        assert "## system" not in text.lower()
        assert "## user" not in text.lower()
    both = prompt.system + prompt.user
    for key, sentinel in values.items():
        assert sentinel in both, f"{name}: ${key} is passed but not used"


@pytest.mark.parametrize("name", sorted(JOB_VALUES))
def test_missing_value_raises_key_error(library: PromptLibrary, name: str) -> None:
    values = _sentinels(name)
    for key in values:
        partial = {k: v for k, v in values.items() if k != key}
        with pytest.raises(KeyError):
            library.render(name, **partial)


def test_non_string_values_are_rendered(library: PromptLibrary) -> None:
    prompt = library.render("world_description", user_prompt="cats", users_count=12, posts_count=345)
    assert "12" in prompt.user
    assert "345" in prompt.user
    assert "cats" in prompt.user


@pytest.mark.parametrize("name", ["character_batch", "post_batch"])
@pytest.mark.parametrize("count", [1, 7, 10])
def test_batch_prompts_ask_for_exactly_n(library: PromptLibrary, name: str, count: int) -> None:
    values = {**_sentinels(name), "count": count}
    prompt = library.render(name, **values)
    assert f"exactly {count} " in prompt.user


def test_dollar_signs_in_values_are_not_expanded(library: PromptLibrary) -> None:
    prompt = library.render("world_description", user_prompt="a $world of $$ money", users_count=1, posts_count=2)
    assert "a $world of $$ money" in prompt.user


def test_missing_section_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "broken.md").write_text("## system\nonly a system part\n", encoding="utf-8")
    with pytest.raises(ValueError, match="broken"):
        PromptLibrary(tmp_path).render("broken")
