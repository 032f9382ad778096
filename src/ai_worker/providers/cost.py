"""What a world is predicted to cost before it starts, and the money cap it gets by default.

One source for the calls: the jobs' `predict(plan)` (summed by `JobRegistry.predict`), which says how many
LLM calls and images each step makes. The registry puts a price on them:
- an LLM step: its primary model's prices x the typical prompt / completion tokens of one call of that step
  (`[tokens.<step>]` in models.toml, measured by bench/cost_per_world.py on the provider simulator; a real
  model's replies differ, the simulator counts about 4 characters per token);
- an image step: its primary model's price of one image at the size asked for that step
  (`price_per_image` + `price_per_mpx` x megapixels; the size is the model's `image_sizes` entry for the step,
  else the size the platform gets).
With IMAGE_PROMPT_ENHANCE every image adds one `image_prompt` LLM call. Fallback models, retries and repair
requests are not in the prediction: the default budget's factor is the room for them.

Every function is O(number of steps), whatever the world's size. `ai-worker cost` prints the estimate, and
the worker applies `BudgetPolicy` to it for every world whose task sets no `budget_usd`."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ai_worker.providers.registry import (
    IMAGE_STEPS,
    LLM_STEPS,
    TOKENS_DEFAULT,
    ModelKind,
    ModelRegistry,
    StepTokens,
)
from ai_worker.worlds.plan import Prediction, WorldPlan

if TYPE_CHECKING:
    from ai_worker.config import Settings

# The sizes the platform gets (docs/CONTRACTS.md); what is asked of a provider may differ (`image_sizes`).
DELIVERED_SIZES: Mapping[str, tuple[int, int]] = {
    "world_header": (1024, 512),
    "world_icon": (512, 512),
    "avatar": (512, 512),
    "post_image": (512, 512),
}
ENHANCE_STEP = "image_prompt"
UNATTRIBUTED = "other"  # calls a job predicts without naming their step


@dataclass(frozen=True)
class StepCost:
    """One step of a world: its calls and what they are predicted to cost at the registry's prices."""

    step: str
    kind: ModelKind
    model: str
    calls: int
    unit_usd: float  # one call
    prompt_tokens: int = 0  # per call (LLM steps)
    completion_tokens: int = 0
    size: tuple[int, int] | None = None  # asked of the provider (image steps)

    @property
    def cost_usd(self) -> float:
        return self.calls * self.unit_usd

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "kind": self.kind, "model": self.model, "calls": self.calls,
                "unit_usd": self.unit_usd, "cost_usd": self.cost_usd, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "size": f"{self.size[0]}x{self.size[1]}" if self.size else None}


@dataclass(frozen=True)
class WorldCostEstimate:
    users: int
    posts: int
    steps: tuple[StepCost, ...]

    def _sum(self, kind: ModelKind | None = None) -> float:
        return sum(s.cost_usd for s in self.steps if kind is None or s.kind == kind)

    @property
    def llm_usd(self) -> float:
        return self._sum("llm")

    @property
    def image_usd(self) -> float:
        return self._sum("image")

    @property
    def total_usd(self) -> float:
        return self._sum()

    @property
    def per_post_usd(self) -> float | None:
        return self.total_usd / self.posts if self.posts else None

    def calls(self, kind: ModelKind) -> int:
        return sum(s.calls for s in self.steps if s.kind == kind)

    def as_dict(self) -> dict[str, Any]:
        return {"users": self.users, "posts": self.posts, "steps": [s.as_dict() for s in self.steps],
                "llm_calls": self.calls("llm"), "images": self.calls("image"), "llm_usd": self.llm_usd,
                "image_usd": self.image_usd, "total_usd": self.total_usd, "per_post_usd": self.per_post_usd}


# A registry file without any [tokens.<step>] (one of your own): a generous guess per call, not zero.
UNMEASURED = StepTokens(prompt=2000, completion=1000)


def step_tokens(tokens: Mapping[str, StepTokens], step: str) -> StepTokens:
    """The typical tokens of one call of `step`: its `[tokens.<step>]`, else `[tokens.default]`, else the
    largest measured figures (an unmeasured step is not assumed cheap), else `UNMEASURED`."""
    found = tokens.get(step) or tokens.get(TOKENS_DEFAULT)
    if found is not None:
        return found
    if not tokens:
        return UNMEASURED
    return StepTokens(prompt=max(t.prompt for t in tokens.values()),
                      completion=max(t.completion for t in tokens.values()))


def _ordered(counts: Mapping[str, int], known: tuple[str, ...]) -> list[str]:
    return [s for s in known if counts.get(s)] + sorted(s for s in counts if s not in known and counts[s])


def predict_world_cost(plan: WorldPlan, prediction: Prediction, models: ModelRegistry, *,
                       enhance: bool = False) -> WorldCostEstimate:
    """The world's predicted cost per step at the registry's prices (see the module docstring)."""
    tokens = models.table.tokens
    llm = dict(prediction.llm_calls_by_step)
    if prediction.unattributed_llm_calls:
        llm[UNATTRIBUTED] = prediction.unattributed_llm_calls
    images = dict(prediction.images_by_step)
    if prediction.unattributed_images:
        images[UNATTRIBUTED] = prediction.unattributed_images
    if enhance:
        llm[ENHANCE_STEP] = llm.get(ENHANCE_STEP, 0) + prediction.images
    steps: list[StepCost] = []
    for step in _ordered(llm, LLM_STEPS):
        model = models.primary(step, "llm")
        t = step_tokens(tokens, step)
        steps.append(StepCost(step=step, kind="llm", model=model.id, calls=llm[step],
                              unit_usd=t.prompt * model.price_in + t.completion * model.price_out,
                              prompt_tokens=t.prompt, completion_tokens=t.completion))
    for step in _ordered(images, IMAGE_STEPS):
        model = models.primary(step, "image")
        delivered = DELIVERED_SIZES.get(step, DELIVERED_SIZES["post_image"])
        size = model.source_size(step, *delivered)
        steps.append(StepCost(step=step, kind="image", model=model.id, calls=images[step],
                              unit_usd=model.image_price(*size), size=size))
    return WorldCostEstimate(users=plan.users, posts=plan.posts, steps=tuple(steps))


@dataclass(frozen=True)
class BudgetPolicy:
    """The money cap of a world whose task sets no `budget_usd`: `cap_usd` (WORLD_BUDGET_USD) when set,
    else `factor` (WORLD_BUDGET_FACTOR) x its predicted cost, at least `floor_usd` (WORLD_BUDGET_MIN_USD),
    rounded up to the cent."""

    cap_usd: float | None = None
    factor: float = 3.0
    floor_usd: float = 1.0

    @classmethod
    def from_settings(cls, settings: Settings) -> BudgetPolicy:
        return cls(cap_usd=settings.world_budget_usd, factor=settings.world_budget_factor,
                   floor_usd=settings.world_budget_min_usd)

    def budget(self, predicted_usd: float) -> float:
        if self.cap_usd is not None:
            return self.cap_usd
        return math.ceil(max(self.floor_usd, self.factor * predicted_usd) * 100 - 1e-6) / 100

    def describe(self) -> str:
        if self.cap_usd is not None:
            return f"WORLD_BUDGET_USD = ${self.cap_usd:g} for every world"
        return (f"{self.factor:g} x predicted (WORLD_BUDGET_FACTOR), at least ${self.floor_usd:.2f} "
                "(WORLD_BUDGET_MIN_USD)")


def default_budget(predict: Callable[[WorldPlan], Prediction], models: ModelRegistry, policy: BudgetPolicy, *,
                   enhance: bool = False) -> Callable[[WorldPlan], float]:
    """The callable `WorldProgress(default_budget=...)` takes: plan -> the world's money cap."""

    def budget(plan: WorldPlan) -> float:
        return policy.budget(predict_world_cost(plan, predict(plan), models, enhance=enhance).total_usd)

    return budget


__all__ = ["DELIVERED_SIZES", "UNMEASURED", "BudgetPolicy", "StepCost", "WorldCostEstimate", "default_budget",
           "predict_world_cost", "step_tokens"]
