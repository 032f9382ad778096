"""Provider simulator: an OpenAI-compatible HTTP server for demos, integration and chaos tests.

It answers `POST /v1/chat/completions` (also under `/api/v1`, OpenRouter's path) with
- a generated JSON instance of `response_format.json_schema.schema` for structured-output requests,
  deterministic per (model, messages);
- a PNG image in `choices[0].message.images` when `modalities` contains "image";
- plain text otherwise;
with OpenRouter-style usage accounting (`usage.cost`). Faults are injected at configurable rates
(5xx, 429 with Retry-After, malformed JSON, schema-invalid JSON, hangs, image errors), drawn from a
random stream seeded by `config.seed` and the request number, so a run is reproducible.

Runtime control: `POST /_sim/config` (JSON with SimulatorConfig fields) and `GET /_sim/stats`.
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
import random
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ai_worker.images.offline import render_placeholder

_EXACTLY = re.compile(r"exactly (\d+)")
_SIZE = re.compile(r"\b(\d{2,4})\s*[xX\u00d7]\s*(\d{2,4})\b")
_COUNTED_ARRAYS = frozenset({"characters", "posts"})
_MAX_EXACT = 500
_MAX_IMAGE_SIDE = 2048


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
    price_in_per_mtok: float = 0.30
    price_out_per_mtok: float = 2.50
    image_cost: float = 0.039
    seed: int = 0

    def update(self, values: dict[str, Any]) -> None:
        """Set fields from a JSON object; unknown names or wrong types raise ValueError."""
        known = {f.name: f for f in dataclasses.fields(self)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown config field(s): {unknown}")
        parsed: dict[str, Any] = {}
        for name, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number")
            parsed[name] = int(value) if name == "seed" else float(value)
        for name, value in parsed.items():
            setattr(self, name, value)


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
        if key in ("theme", "themes", "interest", "interests", "topic", "angle", "tone"):
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


class ProviderSimulator:
    def __init__(self, config: SimulatorConfig | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.config = config or SimulatorConfig()
        self.host = host
        self.port = port
        self.stats: Counter[str] = Counter()
        self._requests = 0
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def start(self) -> None:
        if self._runner is not None:
            return
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/api/v1/chat/completions", self._chat)
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
        return web.json_response({"stats": dict(self.stats), "config": dataclasses.asdict(self.config)})

    # --- chat completions ----------------------------------------------------------------------

    async def _pause(self, seconds: float) -> bool:
        """Sleep, cut short by stop(); True when the simulator is stopping."""
        if seconds <= 0:
            return self._stopping.is_set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        return self._stopping.is_set()

    async def _chat(self, request: web.Request) -> web.Response:
        self._requests += 1
        number = self._requests
        self.stats["requests"] += 1
        cfg = self.config
        # Draw every fault in a fixed order so one knob does not shift the others' outcomes.
        faults = random.Random(f"{cfg.seed}:{number}")
        draw = {k: faults.random() for k in ("429", "5xx", "hang", "image", "malformed", "invalid")}

        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            self.stats["bad_request"] += 1
            return _error(400, "request body is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            self.stats["bad_request"] += 1
            return _error(400, "messages is required")

        if await self._pause(cfg.latency_ms / 1000.0):
            return _error(503, "simulator stopping")
        if draw["429"] < cfg.error_rate_429:
            self.stats["error_429"] += 1
            return _error(429, "simulated rate limit", headers={"Retry-After": f"{cfg.retry_after_s:g}"})
        if draw["5xx"] < cfg.error_rate_5xx:
            self.stats["error_5xx"] += 1
            return _error(503, "simulated upstream outage")
        if draw["hang"] < cfg.hang_rate:
            self.stats["hang"] += 1
            if await self._pause(cfg.hang_s):
                return _error(503, "simulator stopping")

        modalities = body.get("modalities")
        response_format = body.get("response_format")
        if isinstance(modalities, list) and "image" in modalities:
            self.stats["image"] += 1
            if draw["image"] < cfg.image_error_rate:
                self.stats["image_error"] += 1
                return _error(500, "simulated image generation failure")
            return await self._image_reply(body, number)
        if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
            self.stats["structured"] += 1
            return self._structured_reply(body, number, draw["malformed"], draw["invalid"])
        self.stats["text"] += 1
        return self._text_reply(body, number)

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

    def _token_usage(self, prompt_text: str, content: str) -> dict[str, Any]:
        prompt_tokens = max(1, len(prompt_text) // 4)
        completion_tokens = max(1, len(content) // 4)
        cost = (
            prompt_tokens * self.config.price_in_per_mtok + completion_tokens * self.config.price_out_per_mtok
        ) / 1_000_000
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
            "cost": round(cost, 10),
        }

    def _structured_reply(
        self, body: dict[str, Any], number: int, malformed_draw: float, invalid_draw: float
    ) -> web.Response:
        messages: list[Any] = body["messages"]
        digest = self._digest(body)
        rng = random.Random(int(digest[:16], 16))
        fmt = body["response_format"].get("json_schema")
        schema = fmt.get("schema") if isinstance(fmt, dict) else None
        if not isinstance(schema, dict):
            self.stats["bad_request"] += 1
            return _error(400, "response_format.json_schema.schema is required")
        builder = _InstanceBuilder(schema, _Faker(rng, digest[:6]), _exact_count(messages))
        try:
            instance = builder.build(schema, "value")
        except (ValueError, KeyError) as exc:
            self.stats["bad_request"] += 1
            return _error(400, f"cannot build an instance of the schema: {exc}")

        if invalid_draw < self.config.schema_invalid_rate and isinstance(instance, dict) and instance:
            self.stats["schema_invalid"] += 1
            required = schema.get("required")
            victim = required[0] if isinstance(required, list) and required else next(iter(instance))
            instance.pop(victim, None)
        content = json.dumps(instance, ensure_ascii=False)
        if malformed_draw < self.config.malformed_json_rate:
            self.stats["malformed_json"] += 1
            content = content[: max(1, len(content) // 2)]

        prompt_text = " ".join(_message_text(m) for m in messages)
        return self._completion(
            body,
            number,
            digest,
            {"role": "assistant", "content": content},
            self._token_usage(prompt_text, content),
        )

    def _text_reply(self, body: dict[str, Any], number: int) -> web.Response:
        messages: list[Any] = body["messages"]
        digest = self._digest(body)
        faker = _Faker(random.Random(int(digest[:16], 16)), digest[:6])
        content = f"Simulated reply. {faker.sentences(1, 3)}"
        prompt_text = " ".join(_message_text(m) for m in messages)
        return self._completion(
            body,
            number,
            digest,
            {"role": "assistant", "content": content},
            self._token_usage(prompt_text, content),
        )

    async def _image_reply(self, body: dict[str, Any], number: int) -> web.Response:
        messages: list[Any] = body["messages"]
        digest = self._digest(body)
        prompt = " ".join(
            _message_text(m) for m in messages if isinstance(m, dict) and m.get("role") == "user"
        )
        width, height = _image_size(prompt)
        png = await asyncio.to_thread(render_placeholder, prompt, width, height, "SIMULATED")
        url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        message = {
            "role": "assistant",
            "content": "Here is the generated image.",
            "images": [{"type": "image_url", "image_url": {"url": url}}],
        }
        usage = self._token_usage(prompt, "")
        usage["completion_tokens"] = 1290
        usage["total_tokens"] = usage["prompt_tokens"] + 1290
        usage["cost"] = self.config.image_cost
        return self._completion(body, number, digest, message, usage)


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
