"""Prompt templates: one file per step in the top-level `prompts/` folder.

Format: a `## system` section and a `## user` section; `$name` placeholders (string.Template), so JSON
braces in a prompt need no escaping. A missing placeholder value is an error, not a silent blank."""

from __future__ import annotations

import os
import re
from pathlib import Path
from string import Template
from typing import Any

from ai_worker.llm.client import Prompt

_SECTION = re.compile(r"^##\s*(system|user)\s*$", re.MULTILINE | re.IGNORECASE)


def default_prompts_dir() -> Path:
    env = os.environ.get("PROMPTS_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for candidate in (here.parents[3] / "prompts", here.parents[1] / "_prompts"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("prompts directory not found; set PROMPTS_DIR")


class PromptLibrary:
    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or default_prompts_dir()
        self._cache: dict[str, tuple[Template, Template]] = {}

    def _load(self, name: str) -> tuple[Template, Template]:
        if name not in self._cache:
            text = (self.directory / f"{name}.md").read_text(encoding="utf-8")
            parts = _SECTION.split(text)
            sections = {parts[i].lower(): parts[i + 1].strip() for i in range(1, len(parts) - 1, 2)}
            if set(sections) != {"system", "user"}:
                raise ValueError(f"prompt {name!r} needs a '## system' and a '## user' section")
            self._cache[name] = (Template(sections["system"]), Template(sections["user"]))
        return self._cache[name]

    def render(self, name: str, /, **values: Any) -> Prompt:
        system, user = self._load(name)
        strs = {k: str(v) for k, v in values.items()}
        return Prompt(system=system.substitute(strs), user=user.substitute(strs))

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.directory.glob("*.md"))
