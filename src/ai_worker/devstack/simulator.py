"""Provider simulator: an OpenAI-compatible HTTP server for demos, integration and chaos tests.

It answers `POST /v1/chat/completions` (also under `/api/v1`, OpenRouter's path) with
- a generated JSON instance of `response_format.json_schema.schema` for structured-output requests,
  deterministic per (model, messages);
- a PNG image in `choices[0].message.images` when `modalities` contains "image";
- plain text otherwise;
with OpenRouter-style usage accounting (`usage.cost`). Faults are injected at configurable rates
(5xx, 429 with Retry-After, malformed JSON, schema-invalid JSON, hangs, image errors, batch replies one
item short of the `exactly N` they were asked for), drawn from a random stream seeded by `config.seed` and
the request number, so a run is reproducible.

It also answers Runware's REST API at `POST /runware/v1` (a JSON array holding one `imageInference` task;
see `runware_url`): the PNG is rendered at the requested size, kept in memory (the last 500) and served
from `GET /_sim/files/{imageUUID}.png`, whose URL is the task's `imageURL`; errors use Runware's
`{"errors": [...]}` body.

Per-model knobs (`SimulatorConfig.models`, a `ModelKnobs` per model name) add latency and fault rates on
top of the global ones, override prices (an image may also cost `image_cost_per_mpx` per megapixel of the
size asked, as Runware prices by resolution), and give a model its own rate limit: the simulator remembers
when it accepted (answered 200) each request of the model and answers 429 with a `Retry-After` when
another one would take the last 60 seconds over `rpm_limit` requests or `tpm_limit` tokens. The limit is
checked and the acceptance recorded with no await in between, so concurrent requests cannot slip past it.
Tokens are prompt + completion tokens (len // 4 estimates); Runware requests count no tokens. Per-model
counters, including the largest number of accepted requests (and tokens) seen inside any sliding
60-second window, are in `model_stats()` and `GET /_sim/stats`.

Runtime control: `POST /_sim/config` (JSON with SimulatorConfig fields; `{"models": {"name": {...}}}`
merges knobs into that model's, `{"models": {"name": null}}` removes them) and `GET /_sim/stats`.
Run standalone with `python -m ai_worker.devstack.simulator --port 8089`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import math
import random
import re
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ai_worker.images.offline import render_placeholder
from ai_worker.providers.registry import ModelRegistry

_EXACTLY = re.compile(r"exactly (\d+)")
_SIZE = re.compile(r"\b(\d{2,4})\s*[xX\u00d7]\s*(\d{2,4})\b")
_COUNTED_ARRAYS = frozenset({"characters", "posts"})
_MAX_EXACT = 500
_MAX_IMAGE_SIDE = 2048
_WINDOW_S = 60.0
_MAX_FILES = 500
_RUNWARE_MIN_SIDE = 128
_RUNWARE_MAX_SIDE = 2048
_RUNWARE_STEP = 64
_DEFAULT_MODEL = "simulated"

_KNOB_INTS = frozenset({"rpm_limit", "tpm_limit"})
_KNOB_OPTIONAL = frozenset({"price_in_per_mtok", "price_out_per_mtok", "image_cost"})


@dataclass
class ModelKnobs:
    """Settings of one model, on top of the global ones: latency is added, a request fails when either the
    global or the model's fault rate draws it, and a price left at None uses the global price."""

    latency_ms: float = 0
    error_rate_5xx: float = 0
    error_rate_429: float = 0
    rpm_limit: int = 0  # accepted requests per sliding 60 s; 0 = no limit
    tpm_limit: int = 0  # prompt + completion tokens of accepted requests per sliding 60 s; 0 = no limit
    price_in_per_mtok: float | None = None
    price_out_per_mtok: float | None = None
    image_cost: float | None = None
    image_cost_per_mpx: float = 0  # added per megapixel of the image asked (Runware prices by resolution)


def _parse_knobs(model: str, values: Any) -> dict[str, Any]:
    """Validated ModelKnobs fields from a JSON object; ValueError names the model and field."""
    if not isinstance(values, dict):
        raise ValueError(f"models.{model} must be an object (or null to remove it)")
    known = {f.name for f in dataclasses.fields(ModelKnobs)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown knob(s) for model {model!r}: {unknown}")
    parsed: dict[str, Any] = {}
    for name, value in values.items():
        where = f"models.{model}.{name}"
        if value is None and name in _KNOB_OPTIONAL:
            parsed[name] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{where} must be a number" + (" or null" if name in _KNOB_OPTIONAL else ""))
        if value < 0:
            raise ValueError(f"{where} must not be negative")
        if name in _KNOB_INTS:
            if float(value) != int(value):
                raise ValueError(f"{where} must be a whole number")
            parsed[name] = int(value)
        else:
            parsed[name] = float(value)
    return parsed


_PRICE_KNOBS = {"price_in_per_mtok": None, "price_out_per_mtok": None, "image_cost": None, "image_cost_per_mpx": 0}


def registry_prices(models: ModelRegistry) -> dict[str, dict[str, float]]:
    """Price knobs that make the simulator charge what the model registry says, keyed by the name each model
    is sent under: LLM prices per token; images per image and per megapixel asked."""
    knobs: dict[str, dict[str, float]] = {}
    for model_id, definition in models.table.models.items():
        m = models.model(model_id, definition.kind)
        if m.kind == "llm":
            knobs[m.name] = {"price_in_per_mtok": m.price_in_per_mtok, "price_out_per_mtok": m.price_out_per_mtok}
        else:
            knobs[m.name] = {"image_cost": m.price_per_image, "image_cost_per_mpx": m.price_per_mpx}
    return knobs


def charge_registry_prices(config: SimulatorConfig, models: ModelRegistry) -> None:
    """Set the registry's prices on `config`, leaving any price a model's knobs already set."""
    for name, prices in registry_prices(models).items():
        current = config.models.get(name)
        if current is not None:
            prices = {k: v for k, v in prices.items() if getattr(current, k) == _PRICE_KNOBS[k]}
        config.update({"models": {name: prices}})


def _parse_models(value: Any) -> dict[str, dict[str, Any] | None]:
    if not isinstance(value, dict):
        raise ValueError("models must be an object mapping model names to knobs")
    parsed: dict[str, dict[str, Any] | None] = {}
    for model, knobs in value.items():
        if not isinstance(model, str) or not model:
            raise ValueError("model names must be non-empty strings")
        parsed[model] = None if knobs is None else _parse_knobs(model, knobs)
    return parsed


@dataclass
class SimulatorConfig:
    latency_ms: float = 0
    error_rate_5xx: float = 0
    error_rate_429: float = 0
    retry_after_s: float = 1
    malformed_json_rate: float = 0
    schema_invalid_rate: float = 0
    hang_rate: float = 0
    hang_s: float = 300
    image_error_rate: float = 0
    short_batch_rate: float = 0  # a reply asked for exactly N items holds N - 1 (a real model does this)
    price_in_per_mtok: float = 0.30
    price_out_per_mtok: float = 2.50
    image_cost: float = 0.039
    seed: int = 0
    models: dict[str, ModelKnobs] = field(default_factory=dict)

    def update(self, values: dict[str, Any]) -> None:
        """Set fields from a JSON object; unknown names or wrong types raise ValueError (nothing is changed).

        `models` is merged per model: the knobs given replace that model's, the others keep their values;
        a model mapped to null loses its knobs."""
        known = {f.name: f for f in dataclasses.fields(self)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown config field(s): {unknown}")
        parsed: dict[str, Any] = {}
        models: dict[str, dict[str, Any] | None] = {}
        for name, value in values.items():
            if name == "models":
                models = _parse_models(value)
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number")
            parsed[name] = int(value) if name == "seed" else float(value)
        for name, value in parsed.items():
            setattr(self, name, value)
        for model, knobs in models.items():
            if knobs is None:
                self.models.pop(model, None)
            else:
                self.models[model] = dataclasses.replace(self.models.get(model) or ModelKnobs(), **knobs)

    def knobs(self, model: str) -> ModelKnobs:
        """The model's knobs (all defaults when it has none)."""
        return self.models.get(model) or ModelKnobs()


# --- fake content ------------------------------------------------------------------------------


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_FIRST = _words(
    "aster brin cora dax elin fenn gale hale iris juno kael lira milo nova orin pia quill rhea soren "
    "tamsin ulla vesper wren yara"
)
_LAST = _words(
    "vale thorne marsh reed ashford brook crane dunmore ember frost glen hollow ives kestrel lark moor "
    "north oakes pike rowan sable"
)
_ADJ = _words(
    "quiet amber restless silver ancient windswept bright hidden copper drifting gentle stormy luminous "
    "weathered curious verdant"
)
_NOUN = _words(
    "harbour market lantern archive orchard tower canal workshop garden bridge observatory festival "
    "caravan library forge tide"
)
_VERB = ("gathers", "remembers", "shelters", "watches over", "echoes through", "welcomes", "guards")
_ROLE = _words(
    "cartographer baker archivist ferry_pilot tinkerer herbalist street_musician lamplighter courier "
    "glassblower teacher tidewatcher"
)


class _Faker:
    """Plausible text for a JSON property, chosen from its name; deterministic given the rng."""

    def __init__(self, rng: random.Random, fragment: str) -> None:
        self.rng = rng
        self.fragment = fragment
        self.usernames = 0

    def person(self) -> tuple[str, str]:
        return self.rng.choice(_FIRST), self.rng.choice(_LAST)

    def title(self) -> str:
        return f"{self.rng.choice(_FIRST).title()} {self.rng.choice(_LAST).title()}"

    def phrase(self) -> str:
        return f"{self.rng.choice(_ADJ)} {self.rng.choice(_NOUN)}"

    def sentence(self) -> str:
        rng = self.rng
        text = (
            f"The {rng.choice(_ADJ)} {rng.choice(_NOUN)} {rng.choice(_VERB)} "
            f"the {rng.choice(_ADJ)} {rng.choice(_NOUN)}."
        )
        return text[0].upper() + text[1:]

    def sentences(self, low: int, high: int) -> str:
        return " ".join(self.sentence() for _ in range(self.rng.randint(low, high)))

    def string(self, name: str) -> str:
        key = name.lower()
        if key == "username" or key.endswith("_username") or key == "handle":
            first, last = self.person()
            self.usernames += 1
            return f"{first}_{last}_{self.fragment}{self.usernames}"
        if key == "language":
            return "English"
        if key.endswith("prompt"):
            return (
                f"A detailed illustration of a {self.phrase()} near a {self.phrase()}, "
                "soft natural light, rich colours"
            )
        if key in ("name", "display_name", "title") or key.endswith("_name"):
            return self.title()
        if key in ("tag", "tags", "hashtag"):
            return f"{self.rng.choice(_ADJ)}{self.rng.choice(_NOUN)}"
        if key == "topic":  # 4096 combinations, not 256: a character's 20+ topics rarely repeat, as a model's
            return f"{self.phrase()} by the {self.rng.choice(_NOUN)}"
        if key in ("theme", "themes", "interest", "interests", "angle", "tone"):
            return self.phrase()
        if key in ("occupation", "role", "job"):
            return self.rng.choice(_ROLE).replace("_", " ")
        if key in ("personality", "speaking_style", "style", "mood"):
            return f"{self.rng.choice(_ADJ)}, {self.rng.choice(_ADJ)} and a little {self.rng.choice(_ADJ)}"
        if key in ("caption", "text", "content", "bio"):
            return self.sentences(1, 2)
        return self.sentences(1, 3)


_SINGULAR = {"characters": "character", "posts": "post", "interests": "interest", "themes": "theme"}


class _InstanceBuilder:
    """Builds a JSON value that satisfies a (strict-mode) JSON schema."""

    def __init__(self, root: dict[str, Any], faker: _Faker, exact_n: int | None) -> None:
        self.root = root
        self.faker = faker
        self.exact_n = exact_n

    def _resolve(self, ref: str) -> dict[str, Any]:
        if not ref.startswith("#/"):
            raise ValueError(f"unsupported $ref {ref!r}")
        node: Any = self.root
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        if not isinstance(node, dict):
            raise ValueError(f"$ref {ref!r} is not a schema object")
        return node

    def build(self, schema: Any, name: str = "value", depth: int = 0) -> Any:
        rng = self.faker.rng
        if depth > 12 or not isinstance(schema, dict):
            return None
        if "$ref" in schema:
            return self.build(self._resolve(str(schema["$ref"])), name, depth + 1)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return rng.choice(schema["enum"])
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list) and options:
                real = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
                if not real or (len(real) < len(options) and rng.random() < 0.15):
                    return None
                return self.build(rng.choice(real), name, depth + 1)
        if isinstance(schema.get("allOf"), list) and schema["allOf"]:
            merged: dict[str, Any] = {}
            for part in schema["allOf"]:
                if isinstance(part, dict):
                    merged.update(self._resolve(part["$ref"]) if "$ref" in part else part)
            return self.build(merged, name, depth + 1)

        kind = schema.get("type")
        if isinstance(kind, list):
            non_null = [k for k in kind if k != "null"]
            kind = non_null[0] if non_null else "null"
        if kind is None:
            kind = "object" if "properties" in schema else "array" if "items" in schema else "string"

        if kind == "object":
            props = schema.get("properties")
            if not isinstance(props, dict):
                return {}
            return {prop: self.build(sub, prop, depth + 1) for prop, sub in props.items()}
        if kind == "array":
            count = self._array_length(schema, name)
            item_name = _SINGULAR.get(name, name[:-1] if name.endswith("s") else name)
            return [self.build(schema.get("items", {}), item_name, depth + 1) for _ in range(count)]
        if kind == "string":
            text = self.faker.string(name)
            min_len = schema.get("minLength")
            max_len = schema.get("maxLength")
            if isinstance(min_len, int) and len(text) < min_len:
                text = text + "x" * (min_len - len(text))
            if isinstance(max_len, int) and len(text) > max_len:
                text = text[:max_len]
            return text
        if kind == "integer":
            low = schema.get("minimum", 1)
            high = schema.get("maximum", max(int(low), 100))
            return rng.randint(int(low), int(high))
        if kind == "number":
            low = schema.get("minimum", 0.0)
            high = schema.get("maximum", max(float(low), 100.0))
            return round(rng.uniform(float(low), float(high)), 3)
        if kind == "boolean":
            return rng.random() < 0.5
        return None

    def _array_length(self, schema: dict[str, Any], name: str) -> int:
        if self.exact_n is not None and name in _COUNTED_ARRAYS:
            return self.exact_n
        count = self.faker.rng.randint(2, 4)
        low = schema.get("minItems")
        high = schema.get("maxItems")
        if isinstance(low, int):
            count = max(count, low)
        if isinstance(high, int):
            count = min(count, high)
        return count


def _message_text(message: Any) -> str:
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _exact_count(messages: list[Any]) -> int | None:
    """`exactly N` from the last user message that states it (the repair note does not repeat it)."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            match = _EXACTLY.search(_message_text(message))
            if match:
                return min(int(match.group(1)), _MAX_EXACT)
    return None


def _image_size(prompt: str) -> tuple[int, int]:
    match = _SIZE.search(prompt)
    if not match:
        return 512, 512
    width, height = int(match.group(1)), int(match.group(2))
    return max(16, min(width, _MAX_IMAGE_SIDE)), max(16, min(height, _MAX_IMAGE_SIDE))


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": {"code": status, "message": message}}, status=status, headers=headers)


# (status, Runware-style error code, message, headers) -> the error answer in the endpoint's format.
ErrorReply = Callable[[int, str, str, dict[str, str] | None], web.Response]


def _chat_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return _error(status, message, headers)


def _runware_error(
    status: int,
    code: str,
    message: str,
    task_uuid: str | None = None,
    parameter: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    item: dict[str, Any] = {"code": code, "message": message, "taskType": "imageInference"}
    if parameter is not None:
        item["parameter"] = parameter
    if task_uuid is not None:
        item["taskUUID"] = task_uuid
    return web.json_response({"errors": [item]}, status=status, headers=headers)


class _RunwareInvalid(ValueError):
    def __init__(self, code: str, message: str, parameter: str | None = None, task_uuid: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.parameter = parameter
        self.task_uuid = task_uuid


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def _runware_task(body: Any) -> dict[str, Any]:
    """The one imageInference task of a Runware request body; _RunwareInvalid when it is not acceptable."""
    if not isinstance(body, list):
        raise _RunwareInvalid("invalidRequestBody", "the body must be a JSON array of tasks")
    if len(body) != 1 or not isinstance(body[0], dict):
        raise _RunwareInvalid("invalidRequestBody", "the simulator accepts exactly one task object per request")
    task: dict[str, Any] = body[0]
    task_uuid = task.get("taskUUID")
    if not isinstance(task_uuid, str) or not _is_uuid(task_uuid):
        raise _RunwareInvalid("invalidTaskUUID", "taskUUID must be a UUID string", "taskUUID")
    if task.get("taskType") != "imageInference":
        raise _RunwareInvalid("unsupportedTaskType", "taskType must be imageInference", "taskType", task_uuid)
    prompt = task.get("positivePrompt")
    if not isinstance(prompt, str) or len(prompt.strip()) < 2:
        raise _RunwareInvalid(
            "invalidPositivePrompt",
            "positivePrompt must be a string of 2 or more characters",
            "positivePrompt",
            task_uuid,
        )
    model = task.get("model")
    if not isinstance(model, str) or not model.strip():
        raise _RunwareInvalid("invalidModel", "model must be a non-empty string", "model", task_uuid)
    for side in ("width", "height"):
        value = task.get(side)
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not _RUNWARE_MIN_SIDE <= value <= _RUNWARE_MAX_SIDE
            or value % _RUNWARE_STEP
        ):
            raise _RunwareInvalid(
                f"invalid{side.title()}",
                f"{side} must be a multiple of {_RUNWARE_STEP} between {_RUNWARE_MIN_SIDE} and {_RUNWARE_MAX_SIDE},"
                f" got {value!r}",
                side,
                task_uuid,
            )
    number_results = task.get("numberResults")
    if number_results is not None and (isinstance(number_results, bool) or number_results != 1):
        raise _RunwareInvalid(
            "invalidNumberResults", "the simulator supports numberResults=1 only", "numberResults", task_uuid
        )
    output_type = task.get("outputType")
    if output_type is not None and output_type != "URL":
        raise _RunwareInvalid(
            "unsupportedOutputType", "the simulator supports outputType URL only", "outputType", task_uuid
        )
    output_format = task.get("outputFormat")
    if output_format is not None and (not isinstance(output_format, str) or output_format.upper() != "PNG"):
        raise _RunwareInvalid(
            "unsupportedOutputFormat", "the simulator supports outputFormat PNG only", "outputFormat", task_uuid
        )
    return task


@dataclass
class _ModelState:
    """Counters of one model and the (monotonic time, tokens) of the requests accepted in the last 60 s."""

    counts: Counter[str] = field(default_factory=Counter)
    window: deque[tuple[float, int]] = field(default_factory=deque)
    window_tokens: int = 0
    max_in_60s: int = 0
    max_tokens_in_60s: int = 0

    def prune(self, now: float) -> None:
        """Keep the requests accepted in (now - 60, now]."""
        while self.window and self.window[0][0] <= now - _WINDOW_S:
            _, tokens = self.window.popleft()
            self.window_tokens -= tokens

    def limit_wait(self, knobs: ModelKnobs, now: float, prompt_tokens: int) -> float | None:
        """Seconds until a request of `prompt_tokens` fits the model's limits, or None when it fits now."""
        self.prune(now)
        wait: float | None = None
        if knobs.rpm_limit > 0 and len(self.window) >= knobs.rpm_limit:
            # The request that has to leave the window for one more to fit (the oldest, unless the limit
            # was lowered at runtime).
            wait = self.window[len(self.window) - knobs.rpm_limit][0] + _WINDOW_S - now
        if knobs.tpm_limit > 0 and self.window_tokens + prompt_tokens > knobs.tpm_limit:
            token_wait = _WINDOW_S  # a request larger than the whole limit: try again in a minute
            remaining = self.window_tokens
            for stamp, tokens in self.window:
                remaining -= tokens
                if remaining + prompt_tokens <= knobs.tpm_limit:
                    token_wait = stamp + _WINDOW_S - now
                    break
            wait = token_wait if wait is None else max(wait, token_wait)
        return wait

    def accept(self, now: float, tokens: int) -> None:
        self.prune(now)
        self.window.append((now, tokens))
        self.window_tokens += tokens
        self.counts["ok"] += 1
        self.counts["tokens"] += tokens
        self.max_in_60s = max(self.max_in_60s, len(self.window))
        self.max_tokens_in_60s = max(self.max_tokens_in_60s, self.window_tokens)

    def snapshot(self) -> dict[str, int]:
        counts = self.counts
        return {
            "requests": counts["requests"],
            "ok": counts["ok"],
            "error_429": counts["error_429"],
            "limit_429": counts["limit_429"],
            "error_5xx": counts["error_5xx"],
            "max_in_60s": self.max_in_60s,
            "tokens": counts["tokens"],
            "max_tokens_in_60s": self.max_tokens_in_60s,
        }


@dataclass
class _Call:
    """One request on its way through the fault / latency / limit gate."""

    number: int
    model: str
    draw: dict[str, float]
    prompt_tokens: int
    admitted_at: float = 0.0


# Every request draws these, in this order, so one knob does not shift the others' outcomes.
_DRAWS = ("429", "5xx", "hang", "image", "malformed", "invalid", "model_429", "model_5xx", "short")


class ProviderSimulator:
    def __init__(
        self,
        config: SimulatorConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or SimulatorConfig()
        self.host = host
        self.port = port
        self.stats: Counter[str] = Counter()
        self._clock = clock
        self._requests = 0
        self._models: dict[str, _ModelState] = {}
        self._files: OrderedDict[str, bytes] = OrderedDict()
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    @property
    def runware_url(self) -> str:
        return f"{self.root_url}/runware/v1"

    async def start(self) -> None:
        if self._runner is not None:
            return
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/api/v1/chat/completions", self._chat)
        app.router.add_post("/runware/v1", self._runware)
        app.router.add_get("/_sim/files/{name}", self._get_file)
        app.router.add_post("/_sim/config", self._set_config)
        app.router.add_get("/_sim/config", self._get_config)
        app.router.add_get("/_sim/stats", self._get_stats)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self._runner = runner
        for address in runner.addresses:
            if isinstance(address, tuple) and len(address) >= 2:
                self.port = int(address[1])
                break

    async def stop(self) -> None:
        self._stopping.set()  # releases hanging requests at once
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> ProviderSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def model_stats(self) -> dict[str, dict[str, int]]:
        """Per model: requests, ok, error_429, limit_429, error_5xx, max_in_60s, tokens, max_tokens_in_60s."""
        return {name: state.snapshot() for name, state in sorted(self._models.items())}

    def _model_state(self, model: str) -> _ModelState:
        state = self._models.get(model)
        if state is None:
            state = self._models[model] = _ModelState()
        return state

    # --- control endpoints ---------------------------------------------------------------------

    async def _set_config(self, request: web.Request) -> web.Response:
        try:
            values = await request.json()
            if not isinstance(values, dict):
                raise ValueError("body must be a JSON object")
            self.config.update(values)
        except (ValueError, json.JSONDecodeError) as exc:
            return _error(400, str(exc))
        return web.json_response(dataclasses.asdict(self.config))

    async def _get_config(self, request: web.Request) -> web.Response:
        return web.json_response(dataclasses.asdict(self.config))

    async def _get_stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"stats": dict(self.stats), "config": dataclasses.asdict(self.config), "models": self.model_stats()}
        )

    async def _get_file(self, request: web.Request) -> web.Response:
        data = self._files.get(request.match_info["name"])
        if data is None:
            return _error(404, "no such file")
        return web.Response(body=data, content_type="image/png")

    # --- the gate every provider request goes through ------------------------------------------

    async def _pause(self, seconds: float) -> bool:
        """Sleep, cut short by stop(); True when the simulator is stopping."""
        if seconds <= 0:
            return self._stopping.is_set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        return self._stopping.is_set()

    def _next_call(self) -> tuple[int, dict[str, float]]:
        self._requests += 1
        number = self._requests
        self.stats["requests"] += 1
        faults = random.Random(f"{self.config.seed}:{number}")
        return number, {k: faults.random() for k in _DRAWS}

    async def _gate(self, call: _Call, reply_error: ErrorReply) -> web.Response | None:
        """Latency, injected faults, hangs and the model's own limit: the error answer, or None to go on.

        On None the request is admitted at `call.admitted_at`; the caller must call `_accept` before its
        next await so that concurrent requests see it when they check the limit."""
        cfg = self.config
        knobs = cfg.knobs(call.model)
        state = self._model_state(call.model)
        state.counts["requests"] += 1
        if await self._pause((cfg.latency_ms + knobs.latency_ms) / 1000.0):
            return reply_error(503, "simulatorStopping", "simulator stopping", None)
        draw = call.draw
        if draw["429"] < cfg.error_rate_429 or draw["model_429"] < knobs.error_rate_429:
            self.stats["error_429"] += 1
            state.counts["error_429"] += 1
            return reply_error(
                429, "rateLimitExceeded", "simulated rate limit", {"Retry-After": f"{cfg.retry_after_s:g}"}
            )
        if draw["5xx"] < cfg.error_rate_5xx or draw["model_5xx"] < knobs.error_rate_5xx:
            self.stats["error_5xx"] += 1
            state.counts["error_5xx"] += 1
            return reply_error(503, "serviceUnavailable", "simulated upstream outage", None)
        if draw["hang"] < cfg.hang_rate:
            self.stats["hang"] += 1
            if await self._pause(cfg.hang_s):
                return reply_error(503, "simulatorStopping", "simulator stopping", None)
        # No await from here to _accept: the limit check and the acceptance are one step.
        knobs = self.config.knobs(call.model)  # the config may have changed during the pauses
        now = self._clock()
        wait = state.limit_wait(knobs, now, call.prompt_tokens)
        if wait is not None:
            self.stats["limit_429"] += 1
            state.counts["limit_429"] += 1
            retry_after = max(1, math.ceil(wait))
            return reply_error(
                429,
                "rateLimitExceeded",
                f"rate limit of model {call.model!r} exceeded (rpm {knobs.rpm_limit}, tpm {knobs.tpm_limit})",
                {"Retry-After": str(retry_after)},
            )
        call.admitted_at = now
        return None

    def _accept(self, call: _Call, tokens: int) -> None:
        self._model_state(call.model).accept(call.admitted_at, tokens)

    # --- chat completions ----------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.Response:
        number, draw = self._next_call()
        cfg = self.config

        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.stats["bad_request"] += 1
            return _error(400, "request body is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            self.stats["bad_request"] += 1
            return _error(400, "messages is required")

        raw_model = body.get("model")
        model = raw_model if isinstance(raw_model, str) and raw_model else _DEFAULT_MODEL
        modalities = body.get("modalities")
        response_format = body.get("response_format")
        wants_image = isinstance(modalities, list) and "image" in modalities
        prompt_text = _image_prompt(body["messages"]) if wants_image else _prompt_text(body["messages"])
        call = _Call(number, model, draw, prompt_tokens=_estimate_tokens(prompt_text))
        blocked = await self._gate(call, _chat_error)
        if blocked is not None:
            return blocked

        if wants_image:
            self.stats["image"] += 1
            if draw["image"] < cfg.image_error_rate:
                self.stats["image_error"] += 1
                return _error(500, "simulated image generation failure")
            return await self._image_reply(body, call)
        if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
            self.stats["structured"] += 1
            return self._structured_reply(body, call)
        self.stats["text"] += 1
        return self._text_reply(body, call)

    def _digest(self, body: dict[str, Any]) -> str:
        key = json.dumps({"model": body.get("model"), "messages": body.get("messages")}, sort_keys=True)
        return hashlib.sha256(key.encode("utf-8")).hexdigest()

    def _completion(
        self, body: dict[str, Any], number: int, digest: str, message: dict[str, Any], usage: dict[str, Any]
    ) -> web.Response:
        return web.json_response(
            {
                "id": f"gen-sim-{number}-{digest[:10]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model") or "simulated",
                "provider": "simulator",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": usage,
            }
        )

    def _token_usage(self, prompt_text: str, content: str, model: str) -> dict[str, Any]:
        knobs = self.config.knobs(model)
        price_in = self.config.price_in_per_mtok if knobs.price_in_per_mtok is None else knobs.price_in_per_mtok
        price_out = self.config.price_out_per_mtok if knobs.price_out_per_mtok is None else knobs.price_out_per_mtok
        prompt_tokens = _estimate_tokens(prompt_text)
        completion_tokens = _estimate_tokens(content)
        cost = (prompt_tokens * price_in + completion_tokens * price_out) / 1_000_000
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
            "cost": round(cost, 10),
        }

    def _image_cost(self, model: str, width: int = 0, height: int = 0) -> float:
        """The model's price of one image (its `image_cost`, else the global one) plus its per-megapixel
        price times the size asked."""
        knobs = self.config.knobs(model)
        flat = self.config.image_cost if knobs.image_cost is None else knobs.image_cost
        return flat + knobs.image_cost_per_mpx * width * height / 1e6

    def _structured_reply(self, body: dict[str, Any], call: _Call) -> web.Response:
        messages: list[Any] = body["messages"]
        digest = self._digest(body)
        rng = random.Random(int(digest[:16], 16))
        fmt = body["response_format"].get("json_schema")
        schema = fmt.get("schema") if isinstance(fmt, dict) else None
        if not isinstance(schema, dict):
            self.stats["bad_request"] += 1
            return _error(400, "response_format.json_schema.schema is required")
        exact = _exact_count(messages)
        if exact and call.draw["short"] < self.config.short_batch_rate:
            self.stats["short_batch"] += 1
            exact -= 1
        builder = _InstanceBuilder(schema, _Faker(rng, digest[:6]), exact)
        try:
            instance = builder.build(schema, "value")
        except (ValueError, KeyError) as exc:
            self.stats["bad_request"] += 1
            return _error(400, f"cannot build an instance of the schema: {exc}")

        if call.draw["invalid"] < self.config.schema_invalid_rate and isinstance(instance, dict) and instance:
            self.stats["schema_invalid"] += 1
            required = schema.get("required")
            victim = required[0] if isinstance(required, list) and required else next(iter(instance))
            instance.pop(victim, None)
        content = json.dumps(instance, ensure_ascii=False)
        if call.draw["malformed"] < self.config.malformed_json_rate:
            self.stats["malformed_json"] += 1
            content = content[: max(1, len(content) // 2)]

        usage = self._token_usage(_prompt_text(messages), content, call.model)
        self._accept(call, usage["total_tokens"])
        return self._completion(body, call.number, digest, {"role": "assistant", "content": content}, usage)

    def _text_reply(self, body: dict[str, Any], call: _Call) -> web.Response:
        messages: list[Any] = body["messages"]
        digest = self._digest(body)
        faker = _Faker(random.Random(int(digest[:16], 16)), digest[:6])
        content = f"Simulated reply. {faker.sentences(1, 3)}"
        usage = self._token_usage(_prompt_text(messages), content, call.model)
        self._accept(call, usage["total_tokens"])
        return self._completion(body, call.number, digest, {"role": "assistant", "content": content}, usage)

    async def _image_reply(self, body: dict[str, Any], call: _Call) -> web.Response:
        digest = self._digest(body)
        prompt = _image_prompt(body["messages"])
        width, height = _image_size(prompt)
        usage = self._token_usage(prompt, "", call.model)
        usage["completion_tokens"] = 1290
        usage["total_tokens"] = usage["prompt_tokens"] + 1290
        usage["cost"] = self._image_cost(call.model, width, height)
        self._accept(call, usage["total_tokens"])  # before the render's await
        png = await asyncio.to_thread(render_placeholder, prompt, width, height, "SIMULATED")
        url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        message = {
            "role": "assistant",
            "content": "Here is the generated image.",
            "images": [{"type": "image_url", "image_url": {"url": url}}],
        }
        return self._completion(body, call.number, digest, message, usage)

    # --- Runware -------------------------------------------------------------------------------

    async def _runware(self, request: web.Request) -> web.Response:
        number, draw = self._next_call()
        self.stats["runware"] += 1
        cfg = self.config
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.stats["bad_request"] += 1
            return _runware_error(400, "invalidRequestBody", "request body is not JSON")
        try:
            task = _runware_task(body)
        except _RunwareInvalid as exc:
            self.stats["bad_request"] += 1
            return _runware_error(400, exc.code, str(exc), exc.task_uuid, exc.parameter)

        task_uuid: str = task["taskUUID"]
        prompt: str = task["positivePrompt"]
        width: int = task["width"]
        height: int = task["height"]
        call = _Call(number, str(task["model"]), draw, prompt_tokens=0)

        def reply_error(status: int, code: str, message: str, headers: dict[str, str] | None) -> web.Response:
            return _runware_error(status, code, message, task_uuid, None, headers)

        blocked = await self._gate(call, reply_error)
        if blocked is not None:
            return blocked
        if draw["image"] < cfg.image_error_rate:
            self.stats["image_error"] += 1
            return reply_error(500, "imageGenerationFailed", "simulated image generation failure", None)
        self._accept(call, 0)  # before the render's await
        cost = self._image_cost(call.model, width, height)
        png = await asyncio.to_thread(render_placeholder, prompt, width, height, "SIMULATED")
        image_uuid = str(uuid.UUID(int=random.Random(f"{cfg.seed}:{number}:image").getrandbits(128), version=4))
        name = f"{image_uuid}.png"
        self._files[name] = png
        while len(self._files) > _MAX_FILES:
            self._files.popitem(last=False)
        return web.json_response(
            {
                "data": [
                    {
                        "taskType": "imageInference",
                        "taskUUID": task_uuid,
                        "imageUUID": image_uuid,
                        "imageURL": f"{self._public_root(request)}/_sim/files/{name}",
                        "cost": cost,
                    }
                ]
            }
        )

    def _public_root(self, request: web.Request) -> str:
        """Where clients reach us: our own address, or the Host they used when we listen on all interfaces."""
        if self.host in ("", "0.0.0.0", "::"):
            return f"http://{request.host}"
        return self.root_url


def _estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _prompt_text(messages: list[Any]) -> str:
    return " ".join(_message_text(m) for m in messages)


def _image_prompt(messages: list[Any]) -> str:
    return " ".join(_message_text(m) for m in messages if isinstance(m, dict) and m.get("role") == "user")


async def _serve(host: str, port: int, config: SimulatorConfig) -> None:
    simulator = ProviderSimulator(config, host=host, port=port)
    await simulator.start()
    print(f"provider simulator listening on {simulator.base_url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await simulator.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="OpenAI-compatible provider simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--latency-ms", type=float, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    config = SimulatorConfig(latency_ms=args.latency_ms, seed=args.seed)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port, config))


if __name__ == "__main__":
    main()
