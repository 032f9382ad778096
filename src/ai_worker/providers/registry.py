"""The model registry: which provider and model serve each step, their prices, limits and fallbacks.

The table is a TOML file (`models.toml` at the top of the repository, shipped in the wheel; replaced with
MODEL_REGISTRY_FILE). `load_registry` validates it (unknown providers, models, steps or fallbacks are
errors naming the entry); `ModelRegistry.resolve` applies the environment (base URLs, API keys, and the
model choice variables DEFAULT_LLM_MODEL, LLM_MODEL_OVERRIDES, IMAGE_MODEL, IMAGE_PROVIDER, which win over
the file's `steps`) and gives the `ResolvedModels` the LLM client and the image service route through.

LLM models also say how a server takes structured output (`structured_output`), which sampling settings
to send, and how many tokens each step's reply may use:

    max_tokens of a request = min(the model's step_max_tokens[step], else STEP_MAX_TOKENS[step],
                                  the model's max_tokens, else LLM_MAX_TOKENS,
                                  LLM_MAX_TOKENS when the user set it)

so a post does not reserve (rate limits, budgets) or allow 8000 tokens, a model's own limit is never
passed, and an explicit LLM_MAX_TOKENS caps every request of every model.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ai_worker.providers.ratelimit import Limits

ProviderKind = Literal["openai", "runware", "offline"]
ModelKind = Literal["llm", "image"]

# Steps that call an LLM (the request types jobs pass to JobContext.llm) and the ones that make an image.
LLM_STEPS = ("world_description", "character_batch", "post_batch", "post", "image_prompt")
IMAGE_STEPS = ("world_header", "world_icon", "avatar", "post_image")
IMAGE_GROUP = "image"  # a model listing "image" serves every image step not claimed by name
STEP_NAMES = frozenset((*LLM_STEPS, *IMAGE_STEPS, IMAGE_GROUP))

# How many tokens each step's reply may use by default. Sized from what the step returns, with generous
# headroom (replies measured on the provider simulator and on real models: bench/results/real_model.md):
# a world description is the largest single object; a character batch holds up to 10 characters of ~8
# fields; a post batch up to 10 short ideas; a post is a caption, tags and an image prompt.
STEP_MAX_TOKENS: dict[str, int] = {
    "world_description": 4000,
    "character_batch": 6000,
    "post_batch": 2000,
    "post": 1000,
    "image_prompt": 600,
}
DEFAULT_LLM_MAX_TOKENS = 8000  # a model's ceiling when neither the registry nor LLM_MAX_TOKENS says
LLM_MAX_TOKENS_ENV = "LLM_MAX_TOKENS"

StructuredOutput = Literal["auto", "json_schema", "json_object", "prompt"]
SAMPLING_FIELDS = ("temperature", "top_p", "frequency_penalty", "presence_penalty", "repeat_penalty")
_LLM_ONLY_FIELDS = ("step_max_tokens", *SAMPLING_FIELDS)


class RegistryError(ValueError):
    """The registry file is missing or invalid; the message names the file and the entry."""


class ProviderDef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: ProviderKind
    base_url: str | None = None
    base_url_env: str | None = None
    api_key_env: str | None = None
    openrouter_extras: bool | None = None  # send OpenRouter's extra fields; default: when base_url is OpenRouter's


class ModelDef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    provider: str
    kind: ModelKind
    model: str | None = None  # the provider's name for it; default: the table key
    base_url: str | None = None
    base_url_env: str | None = None
    api_key_env: str | None = None
    price_in_per_mtok: float | None = Field(None, ge=0)
    price_out_per_mtok: float | None = Field(None, ge=0)
    price_per_image: float | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, gt=0)  # the model's ceiling for one reply
    step_max_tokens: dict[str, int] = Field(default_factory=dict)  # per LLM step, over STEP_MAX_TOKENS
    # How the server takes structured output: "auto" starts with json_schema and falls back (json_object,
    # then prompt) when the server rejects the mode; the mode that worked is remembered per model.
    structured_output: StructuredOutput = "auto"
    # Sampling, sent only when set. repeat_penalty is a llama.cpp extension (llama-server,
    # llama-cpp-python); OpenAI-style servers may reject or ignore it.
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repeat_penalty: float | None = Field(None, gt=0)
    rpm: int | None = Field(None, ge=0)
    tpm: int | None = Field(None, ge=0)
    tpd: int | None = Field(None, ge=0)
    max_concurrent: int | None = Field(None, ge=0)
    fallbacks: list[str] = Field(default_factory=list)
    steps: list[str] = Field(default_factory=list)
    # --- cost per world (issue #15): price by size, and the size asked of the provider per image step ---
    price_per_mpx: float | None = Field(None, ge=0)  # USD per megapixel asked, added to price_per_image
    image_sizes: dict[str, str] = Field(default_factory=dict)  # image step -> "WxH" asked (delivered size kept)


class Defaults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    llm: str
    image: str


# --- cost per world (issue #15) ---------------------------------------------------------------------
TOKENS_DEFAULT = "default"  # [tokens.default]: LLM steps the table does not measure


class StepTokens(BaseModel):
    """Typical prompt and completion tokens of one LLM call of a step (`[tokens.<step>]`), for predicting a
    world's cost before it starts. Measured by bench/cost_per_world.py on the provider simulator."""

    model_config = ConfigDict(extra="forbid")

    prompt: int = Field(ge=0)
    completion: int = Field(ge=0)


def parse_size(text: str) -> tuple[int, int]:
    """"WxH" -> (W, H); ValueError when it is not two whole numbers in 64..2048."""
    w, sep, h = text.lower().partition("x")
    if not sep or not w.strip().isdigit() or not h.strip().isdigit():
        raise ValueError(f"size {text!r} is not WIDTHxHEIGHT")
    size = int(w), int(h)
    if not all(64 <= side <= 2048 for side in size):
        raise ValueError(f"size {text!r}: each side must be within 64..2048")
    return size


def _cost_problems(table: RegistryFile) -> list[str]:
    problems = [f"tokens.{step!r}: unknown LLM step (known: {[*LLM_STEPS, TOKENS_DEFAULT]})"
                for step in table.tokens if step not in (*LLM_STEPS, TOKENS_DEFAULT)]
    for name, m in table.models.items():
        if m.kind != "image" and (m.image_sizes or m.price_per_mpx is not None):
            problems.append(f"models.{name!r}: image_sizes and price_per_mpx are for image models")
        for step, size in m.image_sizes.items():
            if step not in IMAGE_STEPS:
                problems.append(f"models.{name!r}.image_sizes: unknown image step {step!r} "
                                f"(known: {list(IMAGE_STEPS)})")
            try:
                parse_size(size)
            except ValueError as exc:
                problems.append(f"models.{name!r}.image_sizes.{step}: {exc}")
    return problems


class RegistryFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    defaults: Defaults
    providers: dict[str, ProviderDef]
    models: dict[str, ModelDef]
    tokens: dict[str, StepTokens] = Field(default_factory=dict)  # cost per world: typical tokens per LLM call

    @model_validator(mode="after")
    def _cost_consistent(self) -> RegistryFile:
        problems = _cost_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _consistent(self) -> RegistryFile:
        problems: list[str] = []
        claimed: dict[str, str] = {}
        for name, m in self.models.items():
            if m.provider not in self.providers:
                problems.append(f"models.{name!r}: unknown provider {m.provider!r}")
            elif (self.providers[m.provider].kind == "runware") and m.kind != "image":
                problems.append(f"models.{name!r}: provider {m.provider!r} only serves images")
            for step, tokens in m.step_max_tokens.items():
                if step not in LLM_STEPS:
                    problems.append(f"models.{name!r}: step_max_tokens: unknown LLM step {step!r} "
                                    f"(known: {list(LLM_STEPS)})")
                elif tokens <= 0:
                    problems.append(f"models.{name!r}: step_max_tokens.{step} must be > 0")
            llm_only = [f for f in _LLM_ONLY_FIELDS if getattr(m, f)]
            if m.structured_output != "auto":
                llm_only.append("structured_output")
            if m.kind == "image" and llm_only:
                problems.append(f"models.{name!r}: {', '.join(llm_only)} only apply to llm models")
            for fb in m.fallbacks:
                if fb not in self.models:
                    problems.append(f"models.{name!r}: unknown fallback {fb!r}")
                elif self.models[fb].kind != m.kind:
                    problems.append(f"models.{name!r}: fallback {fb!r} is not an {m.kind} model")
                elif fb == name:
                    problems.append(f"models.{name!r}: falls back to itself")
            for step in m.steps:
                expected = "llm" if step in LLM_STEPS else "image"
                if step not in STEP_NAMES:
                    problems.append(f"models.{name!r}: unknown step {step!r} (known: {sorted(STEP_NAMES)})")
                elif expected != m.kind:
                    problems.append(f"models.{name!r}: step {step!r} needs an {expected} model")
                elif step in claimed:
                    problems.append(f"step {step!r} is claimed by both {claimed[step]!r} and {name!r}")
                else:
                    claimed[step] = name
        for kind in ("llm", "image"):
            default = getattr(self.defaults, kind)
            if default not in self.models:
                problems.append(f"defaults.{kind}: unknown model {default!r}")
            elif self.models[default].kind != kind:
                problems.append(f"defaults.{kind}: {default!r} is not an {kind} model")
        if problems:
            raise ValueError("; ".join(problems))
        return self


@dataclass(frozen=True)
class FlatDefaults:
    """Prices for models the file does not price (and for models named only in the environment)."""

    price_in_per_mtok: float = 0.30
    price_out_per_mtok: float = 2.50
    price_per_image: float = 0.04
    max_tokens: int = DEFAULT_LLM_MAX_TOKENS  # a model's ceiling when its entry sets none (LLM_MAX_TOKENS)
    # An explicit global cap on every request (LLM_MAX_TOKENS set by the user). None: read it from the
    # environment the registry is resolved against.
    max_tokens_cap: int | None = None


@dataclass(frozen=True)
class ResolvedModel:
    """One model with everything a request needs: where, with which key, at what price, how fast."""

    id: str
    kind: ModelKind
    provider: str
    provider_kind: ProviderKind
    name: str
    base_url: str | None
    api_key: str | None
    api_key_env: str | None
    key_required: bool  # talking to the provider's own base URL (not a replacement)
    price_in_per_mtok: float
    price_out_per_mtok: float
    price_per_image: float
    max_tokens: int  # the ceiling of one reply (the model's max_tokens, LLM_MAX_TOKENS)
    limits: Limits
    max_concurrent: int | None
    fallbacks: tuple[str, ...] = ()
    extras: bool | None = None
    base_url_env: str | None = None
    # cost per world (issue #15): price by size, and the size asked of the provider per image step
    price_per_mpx: float = 0.0
    image_sizes: tuple[tuple[str, tuple[int, int]], ...] = ()  # (step, size asked); a tuple: models are hashable

    def source_size(self, step: str, width: int, height: int) -> tuple[int, int]:
        """The size asked of the provider for an image of `step` delivered at width x height."""
        return dict(self.image_sizes).get(step, (width, height))

    def image_price(self, width: int, height: int) -> float:
        """The registry's price of one image asked at width x height."""
        return self.price_per_image + self.price_per_mpx * width * height / 1e6
    # (step, tokens) pairs: the step's default max_tokens for this model, before the ceiling.
    step_max_tokens: tuple[tuple[str, int], ...] = ()
    structured_output: StructuredOutput = "auto"
    # (field, value) pairs of the sampling settings to send, only the ones the registry sets.
    sampling: tuple[tuple[str, float], ...] = ()

    def max_tokens_for(self, step: str) -> int:
        """max_tokens of a request for `step`: the step's size for this model, within the model's ceiling
        (a step the table does not know gets the ceiling)."""
        return min(dict(self.step_max_tokens).get(step, self.max_tokens), self.max_tokens)

    @property
    def openrouter_extras(self) -> bool:
        """Send OpenRouter's extra request fields (usage accounting, provider.require_parameters)."""
        if self.extras is not None:
            return self.extras
        return self.provider_kind == "openai" and self.base_url is not None and "openrouter.ai" in self.base_url

    @property
    def label(self) -> str:
        """How the history names the provider of a request."""
        if self.provider_kind == "openai" and not self.openrouter_extras:
            return "openai-compatible"
        return self.provider

    @property
    def usable(self) -> bool:
        """False when the provider's own URL would be called without its API key."""
        return not (self.key_required and not self.api_key)

    @property
    def price_in(self) -> float:
        return self.price_in_per_mtok / 1e6

    @property
    def price_out(self) -> float:
        return self.price_out_per_mtok / 1e6


@dataclass
class ModelChoice:
    """The model-choice variables of the environment (they win over the file's `steps`)."""

    default_llm_model: str | None = None
    llm_model_overrides: Mapping[str, str] = field(default_factory=dict)
    image_model: str | None = None
    image_provider: str | None = None


def default_registry_path() -> Path:
    env = os.environ.get("MODEL_REGISTRY_FILE")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for candidate in (here.parents[3] / "models.toml", here.parents[1] / "_models.toml"):
        if candidate.is_file():
            return candidate
    raise RegistryError("models.toml not found; set MODEL_REGISTRY_FILE")


def load_registry(path: Path | str | None = None) -> RegistryFile:
    target = Path(path) if path is not None else default_registry_path()
    try:
        data = tomllib.loads(target.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RegistryError(f"cannot read model registry {target}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise RegistryError(f"model registry {target} is not valid TOML: {exc}") from None
    return parse_registry(data, source=str(target))


def parse_registry(data: Mapping[str, object], source: str = "<registry>") -> RegistryFile:
    try:
        return RegistryFile.model_validate(data)
    except ValidationError as exc:
        details = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}" for err in exc.errors()[:8]
        )
        raise RegistryError(f"invalid model registry {source}: {details}") from None


class ModelRegistry:
    """The file, resolved against the environment: step -> chain of `ResolvedModel` (primary first)."""

    def __init__(
        self,
        table: RegistryFile,
        *,
        choice: ModelChoice | None = None,
        env: Mapping[str, str] | None = None,
        flat: FlatDefaults | None = None,
    ) -> None:
        self.table = table
        self.choice = choice or ModelChoice()
        self._env = dict(os.environ if env is None else env)
        self._flat = flat or FlatDefaults()
        self._models: dict[str, ResolvedModel] = {}
        self._steps = self._assign_steps()

    # --- building -------------------------------------------------------------------------------
    @classmethod
    def single(
        cls,
        *,
        base_url: str,
        api_key: str | None,
        model: str,
        kind: ModelKind = "llm",
        overrides: Mapping[str, str] | None = None,
        flat: FlatDefaults | None = None,
        provider_kind: ProviderKind = "openai",
        openrouter_extras: bool | None = None,
        model_fields: Mapping[str, Any] | None = None,
    ) -> ModelRegistry:
        """One provider, `model` for every step of its kind (tools and tests); `model_fields` are more
        fields of its registry entry (structured_output, sampling, step_max_tokens, ...)."""
        name = "offline" if provider_kind == "offline" else "openrouter" if openrouter_extras else "main"
        table = RegistryFile.model_construct(
            defaults=Defaults(llm=model, image=model),
            providers={name: ProviderDef(kind=provider_kind, base_url=base_url, api_key_env="MAIN_API_KEY",
                                         openrouter_extras=openrouter_extras)},
            models={model: ModelDef(provider=name, kind=kind, **dict(model_fields or {}))},
        )
        env = {"MAIN_API_KEY": api_key} if api_key else {}
        choice = ModelChoice(llm_model_overrides=dict(overrides or {}))
        return cls(table, choice=choice, env=env, flat=flat)

    def _assign_steps(self) -> dict[str, str]:
        table, choice = self.table, self.choice
        steps: dict[str, str] = {}
        for name, m in table.models.items():
            for step in m.steps:
                steps[step] = name
        group = steps.pop(IMAGE_GROUP, table.defaults.image)
        for step in LLM_STEPS:
            steps.setdefault(step, table.defaults.llm)
            if choice.default_llm_model:
                steps[step] = choice.default_llm_model
            if step in choice.llm_model_overrides:
                steps[step] = choice.llm_model_overrides[step]
        image_model = self._image_model_from_env()
        for step in IMAGE_STEPS:
            steps.setdefault(step, group)
            if image_model:
                steps[step] = image_model
        return steps

    def _image_model_from_env(self) -> str | None:
        choice = self.choice
        if choice.image_provider == "offline":
            return next((n for n, m in self.table.models.items() if self._provider_kind(m) == "offline"), "offline")
        if choice.image_model:
            return choice.image_model
        if choice.image_provider:
            if self.table.models[self.table.defaults.image].provider == choice.image_provider:
                return None
            for name, m in self.table.models.items():
                if m.kind == "image" and m.provider == choice.image_provider:
                    return name
            raise RegistryError(f"IMAGE_PROVIDER={choice.image_provider}: the registry has no image model of it")
        return None

    def _provider_kind(self, m: ModelDef) -> ProviderKind:
        return self.table.providers[m.provider].kind

    def _definition(self, model_id: str, kind: ModelKind) -> ModelDef:
        known = self.table.models.get(model_id)
        if known is not None:
            return known
        if model_id == "offline":
            return ModelDef(provider="offline", kind="image", model="offline-renderer", price_per_image=0.0)
        # Named only in the environment: the provider of the default model of its kind, flat prices.
        wanted = self.choice.image_provider if kind == "image" and self.choice.image_provider else None
        provider = wanted or self.table.models[getattr(self.table.defaults, kind)].provider
        return ModelDef(provider=provider, kind=kind)

    def model(self, model_id: str, kind: ModelKind = "llm") -> ResolvedModel:
        cached = self._models.get(model_id)
        if cached is not None:
            return cached
        m = self._definition(model_id, kind)
        provider = self.table.providers.get(m.provider) or ProviderDef(kind="offline")
        flat = self._flat
        default_url = m.base_url or provider.base_url
        base_url = self._env_value(m.base_url_env) or m.base_url or self._env_value(provider.base_url_env) \
            or provider.base_url
        key_env = m.api_key_env or provider.api_key_env
        resolved = ResolvedModel(
            id=model_id,
            kind=m.kind,
            provider=m.provider,
            provider_kind=provider.kind,
            name=m.model or model_id,
            base_url=base_url,
            api_key=self._env_value(key_env),
            api_key_env=key_env,
            key_required=key_env is not None and base_url is not None and base_url == default_url,
            price_in_per_mtok=flat.price_in_per_mtok if m.price_in_per_mtok is None else m.price_in_per_mtok,
            price_out_per_mtok=flat.price_out_per_mtok if m.price_out_per_mtok is None else m.price_out_per_mtok,
            price_per_image=(0.0 if provider.kind == "offline" or m.price_per_mpx is not None else flat.price_per_image)
            if m.price_per_image is None else m.price_per_image,
            max_tokens=self._ceiling(m),
            limits=Limits(rpm=m.rpm or None, tpm=m.tpm or None, tpd=m.tpd or None),
            max_concurrent=m.max_concurrent or None,
            fallbacks=tuple(m.fallbacks),
            extras=provider.openrouter_extras,
            base_url_env=m.base_url_env or provider.base_url_env,
            price_per_mpx=m.price_per_mpx or 0.0,
            image_sizes=tuple((step, parse_size(size)) for step, size in m.image_sizes.items()),
            step_max_tokens=tuple({**STEP_MAX_TOKENS, **m.step_max_tokens}.items()) if m.kind == "llm" else (),
            structured_output=m.structured_output,
            sampling=tuple((f, float(v)) for f in SAMPLING_FIELDS if (v := getattr(m, f)) is not None),
        )
        self._models[model_id] = resolved
        return resolved

    def _ceiling(self, m: ModelDef) -> int:
        """The most tokens one reply of the model may use: its own max_tokens, else LLM_MAX_TOKENS (default
        8000); an explicit LLM_MAX_TOKENS caps even a model's own value (the environment wins)."""
        ceiling = m.max_tokens or self._flat.max_tokens
        cap = self.max_tokens_cap
        return min(ceiling, cap) if cap is not None else ceiling

    @property
    def max_tokens_cap(self) -> int | None:
        """LLM_MAX_TOKENS when the user set it (explicitly, or in the environment), else None."""
        if self._flat.max_tokens_cap is not None:
            return self._flat.max_tokens_cap
        for name, value in self._env.items():  # variable names are case-insensitive, as in Settings
            if name.upper() == LLM_MAX_TOKENS_ENV and value.strip():
                try:
                    cap = int(value.strip())
                except ValueError:
                    return None  # Settings rejects it with a message naming the variable
                return cap if cap > 0 else None
        return None

    def _env_value(self, name: str | None) -> str | None:
        if not name:
            return None
        value = self._env.get(name)
        return value if value else None

    # --- queries --------------------------------------------------------------------------------
    def primary(self, step: str, kind: ModelKind = "llm") -> ResolvedModel:
        """The model that serves `step` first. A step the table does not know (tools, tests) gets the
        default model of `kind`."""
        if step in self._steps:
            return self.model(self._steps[step], "image" if step in IMAGE_STEPS else "llm")
        if kind == "image":
            return self.model(self._steps[IMAGE_STEPS[-1]], "image")
        return self.model(self.choice.default_llm_model or self.table.defaults.llm)

    def chain(self, step: str, kind: ModelKind = "llm") -> list[ResolvedModel]:
        """The primary then its usable fallbacks (each once; one whose API key is missing is left out); a
        model named only in the environment has none."""
        first = self.primary(step, kind)
        chain = [first]
        for fb in first.fallbacks:
            candidate = self.model(fb, first.kind)
            if candidate.usable and candidate.id not in {c.id for c in chain}:
                chain.append(candidate)
        return chain

    def assignments(self) -> dict[str, list[str]]:
        """step -> model ids of its chain, for `ai-worker models list` and the startup log."""
        return {step: [m.id for m in self.chain(step)] for step in (*LLM_STEPS, *IMAGE_STEPS)}

    def missing_keys(self, steps: tuple[str, ...] = (*LLM_STEPS, *IMAGE_STEPS)) -> list[str]:
        """Primaries of `steps` that talk to their provider's own URL with its API key unset."""
        users: dict[str, list[str]] = {}
        for step in steps:
            m = self.primary(step)
            if not m.usable:
                users.setdefault(m.id, []).append(step)
        problems = []
        for mid, used_by in users.items():
            m = self.model(mid)
            where = f" or point {m.base_url_env} at another endpoint" if m.base_url_env else ""
            problems.append(f"{m.api_key_env} is required for model {mid!r} at {m.base_url} "
                            f"(steps: {', '.join(used_by)}): set it{where}")
        return problems
