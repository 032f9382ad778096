"""Optional prompt enhancement (IMAGE_PROMPT_ENHANCE): before an image is generated, the LLM rewrites its
prompt for the image model (step `image_prompt` of the model registry, template `prompts/image_prompt.md`).

It lives here, called from the one place every job generates images (`JobContext.image_upload`), so no
job knows about it. The rewrite is an ordinary LLM call: budgeted, rate limited and recorded like the
others. A failed rewrite is not worth losing the image over: the original prompt is used and a warning
logged, except when the budget refuses the call (the image would be refused as well)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog

from ai_worker.content.schemas import EnhancedImagePrompt
from ai_worker.errors import BudgetExceeded, WorkerError
from ai_worker.providers.history import CallContext

if TYPE_CHECKING:
    from ai_worker.content.prompts import PromptLibrary
    from ai_worker.llm.client import LLMClient

log = structlog.get_logger(__name__)

STEP = "image_prompt"


class PromptEnhancer:
    def __init__(self, llm: LLMClient, prompts: PromptLibrary, *, enabled: bool) -> None:
        self._llm = llm
        self._prompts = prompts
        self.enabled = enabled

    async def __call__(self, prompt: str, width: int, height: int, call: CallContext) -> str:
        if not self.enabled:
            return prompt
        rendered = self._prompts.render(STEP, prompt=prompt, width=width, height=height)
        try:
            result = await self._llm.structured(rendered, EnhancedImagePrompt, call, step=STEP)
        except BudgetExceeded:
            raise
        except WorkerError as exc:
            log.warning("image_prompt_enhance_failed", task_id=call.task_id, error_type=exc.error_type,
                        error=str(exc))
            return prompt
        enhanced: str = result.value.prompt.strip()
        return enhanced or prompt
