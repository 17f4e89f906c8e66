"""The HTTP API (FastAPI): OpenAI's completions, chat completions and models endpoints, vLLM's
runtime adapter endpoints, /health and Prometheus /metrics.

Requests turn into engine submissions; the engine thread sends Events back through an asyncio
queue per request. Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import threading
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraforge import LoraError, one_line
from loraforge.data.chat import chat_prompt_ids
from loraforge.serve import protocol as P
from loraforge.serve.adapters import (AdapterForbidden, AdapterLoadFailed, AdapterNotFound, AdapterRegistry,
                                      BadAdapterName, BadAdapterPath, check_name)
from loraforge.serve.constrain import BadConstraint, Constraint, Grammar, GrammarCompiler
from loraforge.serve.engine import (Engine, Event, GenerationFailed, GenerationRequest, QueueFull, SamplingParams,
                                    Sequence, TokenLogprob, sample_seed)
from loraforge.serve.tool_calls import (BadToolMessage, ParsedCall, ToolCallParser, forced_constraint,
                                        split_output, template_takes_tools, template_turns, tool_dicts,
                                        with_tool_prompt)

log = logging.getLogger("loraforge.serve")
DEFAULT_MAX_BODY_BYTES = 8 * 2 ** 20

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 429: "rate_limit_error",
               413: "invalid_request_error", 500: "server_error", 503: "service_unavailable"}


HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def error_response(status: int, message: str, code: str | None = None, param: str | None = None) -> JSONResponse:
    body = P.error_body(message, ERROR_TYPES.get(status, "invalid_request_error"), code, param)
    return JSONResponse(body, status_code=status)


def as_api_error(err: LoraError) -> ApiError:
    """The HTTP status of a loraforge error."""
    if isinstance(err, AdapterNotFound):
        return ApiError(404, str(err), "model_not_found", "model")
    if isinstance(err, AdapterForbidden):
        return ApiError(403, str(err), "path_not_allowed", "lora_path")
    if isinstance(err, QueueFull):
        return ApiError(429, str(err), "queue_full")
    if isinstance(err, AdapterLoadFailed):
        return ApiError(400, str(err), "adapter_load_failed", "model")
    if isinstance(err, GenerationFailed):
        return ApiError(500, str(err), "generation_failed")
    if isinstance(err, BadAdapterPath):
        return ApiError(400, str(err), "invalid_lora_path", "lora_path")
    if isinstance(err, BadAdapterName):
        return ApiError(400, str(err), "invalid_model", "model")
    return ApiError(400, str(err))


@dataclass
class ServeState:
    """What the routes need: the engine, the adapter registry and the served names."""

    engine: Engine
    registry: AdapterRegistry | None
    base_name: str  # the name clients use for the base model (or for the merged model)
    base_root: str  # where the base model came from (/v1/models `root`)
    merged: bool = False  # an adapter is folded into the base: only base_name is served
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies are refused (413) unread
    _grammars: GrammarCompiler | None = field(default=None, init=False, repr=False)
    _grammars_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self):
        self.max_prompt_chars = self.engine.context * longest_token(self.engine.tokenizer)

    def grammars(self) -> GrammarCompiler:
        """The structured-output compiler for this model's tokenizer, made on first use."""
        with self._grammars_lock:
            if self._grammars is None:
                engine = self.engine
                self._grammars = GrammarCompiler(engine.tokenizer, logits_width(engine.model), engine.eos_ids)
            return self._grammars


def logits_width(model) -> int:
    """The vocabulary size of the model's logits (its output embedding's rows)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else int(model.config.vocab_size)


def longest_token(tokenizer) -> int:
    """Characters of the longest vocabulary entry: a text longer than context x this cannot
    fit the context, so it is refused without tokenizing it."""
    try:
        return max(1, max(len(piece) for piece in tokenizer.get_vocab()))
    except (AttributeError, NotImplementedError, TypeError, ValueError):
        return 64


# --- events from the engine thread --------------------------------------------------------------
class EventStream:
    """An asyncio queue fed from the engine thread."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def sink(self, event: Event):
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass

    async def get(self) -> Event:
        return await self.queue.get()


class SSEResponse(StreamingResponse):
    """A text/event-stream response that always watches for the client going away and then
    calls `on_disconnect` (frees the request's batch row) and stops streaming."""

    def __init__(self, content: AsyncIterator[str], on_disconnect):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_disconnect = on_disconnect

    async def __call__(self, scope, receive, send):
        async with anyio.create_task_group() as group:
            async def watch():
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.on_disconnect()
                group.cancel_scope.cancel()

            group.start_soon(watch)
            try:
                await self.stream_response(send)
            except OSError:  # the connection broke while sending
                self.on_disconnect()
            group.cancel_scope.cancel()


def sse(obj) -> str:
    import json

    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class ApiKeyMiddleware:
    """401 on /v1/*, /tokenize and /detokenize without `Authorization: Bearer <key>` (checked before the body is read)."""

    PROTECTED = ("/v1", "/tokenize", "/detokenize")

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(self.PROTECTED) and not self._allowed(scope):
            response = error_response(401, "missing or invalid API key (send 'Authorization: Bearer <key>')",
                                      "invalid_api_key")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope) -> bool:
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)


class BodyLimitMiddleware:
    """413 for a request body over `limit` bytes, never holding more than `limit` bytes of it.
    The body is read here and replayed to the app. The rest of a body found too long (by its
    Content-Length or once it passes the limit) is read and dropped, up to DRAIN_FACTOR x limit,
    so that the client, still sending, can read the 413 (closing on unread data resets the
    connection); a longer one is answered at once."""

    DRAIN_FACTOR = 4

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            if declared.isdigit() and int(declared) <= self.DRAIN_FACTOR * self.limit:
                await self._drain(receive, 0)
            await self._refuse(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                if more:
                    await self._drain(receive, size)
                await self._refuse(scope, receive, send)
                return
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _drain(self, receive, size: int):
        """Read and drop the rest of the body, up to DRAIN_FACTOR x limit bytes in all."""
        while size <= self.DRAIN_FACTOR * self.limit:
            message = await receive()
            size += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                return

    async def _refuse(self, scope, receive, send):
        response = error_response(413, f"the request body exceeds {self.limit} bytes", "request_too_large")
        response.headers["connection"] = "close"
        await response(scope, receive, send)


def _replay(body: bytes, receive):
    """An ASGI receive that returns `body` first, then whatever the connection sends (disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# --- the app ------------------------------------------------------------------------------------
def create_app(state: ServeState, api_key: str | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.engine.thread is None:
            state.engine.start()
        yield
        await asyncio.to_thread(state.engine.stop)

    app = FastAPI(title="loraforge serve", lifespan=lifespan)
    app.state.serve = state
    app.add_middleware(BodyLimitMiddleware, limit=state.max_body_bytes)
    if api_key:  # added last: runs first, so that a request without the key is refused unread
        app.add_middleware(ApiKeyMiddleware, key=api_key)
    _add_error_handlers(app)
    _add_info_routes(app, state)
    _add_generation_routes(app, state)
    _add_tokenizer_routes(app, state)
    _add_adapter_routes(app, state)
    return app


def _add_error_handlers(app: FastAPI):
    @app.exception_handler(ApiError)
    async def api_error(_, err: ApiError):
        return error_response(err.status, err.message, err.code, err.param)

    @app.exception_handler(LoraError)
    async def lora_error(_, err: LoraError):
        e = as_api_error(err)
        return error_response(e.status, e.message, e.code, e.param)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_, err: RequestValidationError):
        return error_response(400, *describe_validation(err.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, err: StarletteHTTPException):
        if err.status_code == 400 and "parsing the body" in str(err.detail):  # FastAPI's json.loads failed
            return error_response(400, "the request body is not valid JSON (UTF-8)", "invalid_json")
        return error_response(err.status_code, str(err.detail), HTTP_CODES.get(err.status_code))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):
        log.error("unexpected error in %s %s: %s", request.method, request.url.path, type(err).__name__,
                  exc_info=err)
        return error_response(500, "internal server error; the server log has the details", "internal_error")


def describe_validation(errors: list[dict]) -> tuple[str, str, str | None]:
    """(message, code, param) for the first body validation error."""
    first = errors[0] if errors else {"msg": "invalid request body", "loc": ()}
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", "invalid_json", None
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, P.FieldError):
        return str(cause), "invalid_request", cause.param
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = loc[0] if loc else None
    if param == "prompt" and len(loc) > 1:  # no member of the union fits: say what does
        return f"prompt: {P.PROMPT_SHAPES}", "invalid_prompt", param
    where = ".".join(loc) or "body"
    if first.get("type") == "extra_forbidden":
        return f"{where}: this server does not support this field", "unsupported_field", param
    return f"{where}: {first.get('msg', 'invalid value')}", "invalid_request", param


def _add_info_routes(app: FastAPI, state: ServeState):
    @app.get("/health")
    async def health():
        alive = state.engine.thread is not None and state.engine.thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        context = state.engine.context
        cards = [P.model_card(state.base_name, state.base_root, None, context)]
        if state.registry is not None and not state.merged:
            adapters = await asyncio.to_thread(state.registry.available)
            cards += [P.model_card(name, str(path), state.base_name, context) for name, path in adapters.items()]
        return {"object": "list", "data": cards}


# --- generation -----------------------------------------------------------------------------------
def _add_generation_routes(app: FastAPI, state: ServeState):
    # Tokenizing runs in a worker thread: a long prompt never stalls the event loop.
    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, request: Request):
        prompts = await asyncio.to_thread(completion_prompts, state, body.prompt)
        check_choices(body, len(prompts))
        grammar = await asyncio.to_thread(request_grammar, state, body)
        if body.stream:
            return await stream_one(state, request, body, prompts[0].ids, chat=False, grammar=grammar)
        results = await run_rows(state, request, body, [prompt.ids for prompt in prompts], chat=False,
                                 grammar=grammar)
        choices = await asyncio.to_thread(completion_choices, state.engine.tokenizer, body, prompts, results)
        return P.completions(P.new_id("cmpl"), body.model, choices, choices_usage(prompts, results))

    @app.post("/v1/chat/completions")
    async def chat(body: P.ChatRequest, request: Request):
        prompt = await asyncio.to_thread(chat_prompt, state, body.messages, tools=body.tools)
        check_choices(body, 1)
        grammar = await asyncio.to_thread(request_grammar, state, body)
        if body.stream:
            return await stream_one(state, request, body, prompt, chat=True, grammar=grammar)
        results = await run_rows(state, request, body, [prompt], chat=True, grammar=grammar)
        choices = await asyncio.to_thread(chat_choices, state.engine.tokenizer, body, results)
        return P.chat_completions(P.new_id("chatcmpl"), body.model, choices,
                                  choices_usage([Prompt(prompt)], results))


@dataclass
class Prompt:
    """One completions prompt: its token ids, and its text when it was sent as text."""

    ids: list[int]
    text: str | None = None


def completion_prompts(state: ServeState, prompt: str | list[str] | list[int] | list[list[int]]) -> list[Prompt]:
    """The prompts of a completions request: a text, texts, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        return [text_prompt(state, prompt)]
    if not prompt:
        raise ApiError(400, "the prompt is empty", "invalid_prompt", "prompt")
    if len(prompt) > P.MAX_CHOICES and not isinstance(prompt[0], int):
        raise ApiError(400, f"at most {P.MAX_CHOICES} prompts per request", "invalid_prompt", "prompt")
    if isinstance(prompt[0], int):
        return [token_prompt(state, prompt)]
    if isinstance(prompt[0], str):
        return [text_prompt(state, text) for text in prompt]
    return [token_prompt(state, ids) for ids in prompt]


def text_prompt(state: ServeState, text: str) -> Prompt:
    check_prompt_chars(state, len(text), "prompt")
    return Prompt(state.engine.tokenizer(text, add_special_tokens=True)["input_ids"], text)


def token_prompt(state: ServeState, ids: list[int]) -> Prompt:
    if not ids:
        raise ApiError(400, "the prompt is empty", "invalid_prompt", "prompt")
    check_prompt_tokens(state, len(ids))
    check_token_ids(state, ids, "prompt")
    return Prompt(list(ids))


def check_token_ids(state: ServeState, ids: list[int], param: str):
    """Refuse ids outside the vocabulary, and more ids than the context holds."""
    if len(ids) > state.engine.context:
        raise ApiError(400, f"{param}: more than the context's {state.engine.context} tokens", "invalid_tokens",
                       param)
    vocab = state.engine.model.config.vocab_size
    if any(not 0 <= t < vocab for t in ids):
        raise ApiError(400, f"{param}: token ids must be in [0, {vocab})", "invalid_tokens", param)


def check_choices(body: P._Sampling, n_prompts: int):
    """At most MAX_CHOICES choices (prompts x n); a stream carries one choice's text only."""
    if n_prompts * body.n > P.MAX_CHOICES:
        raise ApiError(400, f"{n_prompts} prompts x n = {body.n} exceeds {P.MAX_CHOICES} choices per request",
                       "invalid_n", "n")
    if not body.stream:
        return
    if n_prompts > 1:
        raise ApiError(400, "stream supports one prompt per request", "invalid_prompt", "prompt")
    if body.n > 1:
        raise ApiError(400, "stream supports n = 1 only", "invalid_n", "n")
    for name in ("echo", "logprobs"):
        if getattr(body, name, None) not in (False, None):
            raise ApiError(400, f"{name} is not supported with stream", "unsupported_field", name)


def chat_prompt(state: ServeState, messages: list[P.ChatMessage], add_generation_prompt: bool = True,
                add_special_tokens: bool = False, tools: list[P.Tool] | None = None) -> list[int]:
    """The prompt ids of a chat. Tools go to the template when it renders them, else into the
    system message (serve.tool_calls); tool calls and tool results likewise."""
    tokenizer = state.engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions", "no_chat_template")
    own_format = template_takes_tools(tokenizer)
    try:
        turns = template_turns(messages, own_format)
    except BadToolMessage as err:
        raise ApiError(400, str(err), "invalid_messages", "messages") from None
    extra = {}
    if tools and own_format:
        extra["tools"] = tool_dicts(tools)
    elif tools:
        turns = with_tool_prompt(turns, tools)
    chars = sum(len(t["content"]) + len(t["role"]) + len(json.dumps(t.get("tool_calls", []))) for t in turns) \
        + len(json.dumps(extra.get("tools", [])))  # tool calls count too (templates that render them)
    check_prompt_chars(state, chars, "messages")
    try:  # data.chat: the one home of messages -> ids, shared with the trainer
        return chat_prompt_ids(tokenizer, turns, add_generation_prompt, add_special_tokens, **extra)
    except Exception as err:  # noqa: BLE001 - template errors (e.g. unsupported roles) are the client's
        raise ApiError(400, f"cannot apply the chat template: {one_line(err)}", "invalid_messages",
                       "messages") from None


def check_prompt_chars(state: ServeState, chars: int, param: str):
    """Refuse, before tokenizing, a text too long to fit the context whatever its tokens."""
    if chars > state.max_prompt_chars:
        raise ApiError(400, f"this model's maximum context length is {state.engine.context} tokens, and a prompt "
                            f"of {chars} characters cannot fit it", "context_length_exceeded", param)


def check_prompt_tokens(state: ServeState, n_prompt: int):
    context = state.engine.context
    if n_prompt >= context:
        raise ApiError(400, f"this model's maximum context length is {context} tokens, but the prompt has "
                            f"{n_prompt} tokens", "context_length_exceeded", "prompt")


def resolve_model(state: ServeState, name: str) -> str | None:
    """The adapter a request's `model` names (None: the base model)."""
    if name == state.base_name:
        return None
    if state.merged or state.registry is None:
        raise ApiError(404, f"the model '{name}' does not exist; this server serves '{state.base_name}'",
                       "model_not_found", "model")
    state.registry.path_of(name)  # BadAdapterName -> 400, AdapterNotFound -> 404
    return name


def request_constraint(body: P._Sampling) -> Constraint | None:
    """What the request's output must match: a forced tool call, structured_outputs or
    response_format (at most one of them: the protocol refuses the others)."""
    forced = body.forced_tool() if isinstance(body, P.ChatRequest) else None
    if forced:
        return forced_constraint(forced)
    formats, outputs = body.response_format, body.structured_outputs
    if formats is not None and formats.type != "text" and outputs is not None:
        raise ApiError(400, "give either response_format or structured_outputs, not both", "invalid_request",
                       "structured_outputs")
    if outputs is not None:
        return structured_constraint(outputs)
    if formats is None or formats.type == "text":
        return None
    if formats.type == "json_object":
        return Constraint("json_object", None, "response_format")
    return Constraint("json_schema", schema_value(formats.json_schema.json_schema, "response_format"),
                      "response_format")


def structured_constraint(outputs: P.StructuredOutputs) -> Constraint:
    param = "structured_outputs"
    if outputs.json_ is not None:
        return Constraint("json_schema", schema_value(outputs.json_, param), param)
    if outputs.json_object:
        return Constraint("json_object", None, param)
    if outputs.regex is not None:
        return Constraint("regex", outputs.regex, param)
    if outputs.choice is not None:
        return Constraint("choice", outputs.choice, param)
    return Constraint("grammar", outputs.grammar, param)


def schema_value(schema: dict | bool | str, param: str) -> dict | bool:
    """A JSON schema given as an object (or as JSON text); `false` matches nothing and is refused."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError:
            raise ApiError(400, f"{param}: the JSON schema is not valid JSON", "invalid_structured_output",
                           param) from None
    if schema is False or not isinstance(schema, (dict, bool)):
        raise ApiError(400, f"{param}: the JSON schema must be an object (or true)", "invalid_structured_output",
                       param)
    return schema


def request_grammar(state: ServeState, body: P._Sampling) -> Grammar | None:
    """The compiled constraint of a request (a worker thread: compiling may take a while), None
    without one. Every tool's parameters schema is checked when tools are given."""
    try:
        if isinstance(body, P.ChatRequest) and body.tools:
            state.grammars().compile(forced_constraint(body.tools))
        constraint = request_constraint(body)
        return state.grammars().compile(constraint) if constraint is not None else None
    except BadConstraint as err:
        raise ApiError(400, str(err), "invalid_structured_output", err.param) from None


def sampling_params(state: ServeState, body: P._Sampling, n_prompt: int, chat: bool,
                    grammar: Grammar | None = None) -> SamplingParams:
    context = state.engine.context
    if n_prompt == 0:
        raise ApiError(400, "the prompt is empty", "invalid_prompt", "prompt")
    check_prompt_tokens(state, n_prompt)
    max_tokens = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
    if max_tokens is None:
        max_tokens = context - n_prompt if chat else min(16, context - n_prompt)
    if max_tokens == 0 and not getattr(body, "echo", False):
        raise ApiError(400, "max_tokens must be at least 1 (0 only with echo: scoring the prompt)",
                       "invalid_request", "max_tokens")
    if n_prompt + max_tokens > context:
        raise ApiError(400, f"this model's maximum context length is {context} tokens; the prompt ({n_prompt}) "
                            f"plus max_tokens ({max_tokens}) exceeds it", "context_length_exceeded", "max_tokens")
    logprobs = body.top_count() if chat else body.logprobs
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                          stop=body.stop_list(), seed=body.seed, ignore_eos=body.ignore_eos, logprobs=logprobs,
                          prompt_logprobs=logprobs if not chat and body.echo else None, grammar=grammar)


async def stream_one(state: ServeState, request: Request, body: P._Sampling, prompt: list[int], chat: bool,
                     grammar: Grammar | None = None):
    """A streamed answer: one choice, as server-sent events."""
    adapter = await asyncio.to_thread(resolve_model, state, body.model)
    params = sampling_params(state, body, len(prompt), chat, grammar)
    stream = EventStream()
    seq = state.engine.submit(GenerationRequest(prompt, adapter, params), stream.sink)  # QueueFull: 429
    first = await first_event(request, stream, state.engine, seq)
    rid = P.new_id("chatcmpl" if chat else "cmpl")
    chunks = chat_sse(stream, first, rid, body) if chat else completion_sse(stream, first, rid, body)
    return SSEResponse(_cancel_at_end(chunks, state.engine, seq), lambda: state.engine.cancel(seq))


async def run_rows(state: ServeState, request: Request, body: P._Sampling, prompts: list[list[int]],
                   chat: bool, grammar: Grammar | None = None) -> list[tuple[str, Event]]:
    """Generate `n` samples of each prompt, all submitted at once so that the engine batches
    them; their (text, done event) in OpenAI's choice order: prompt index x n + sample index.
    Each sample of a constrained request gets its own matcher of `grammar` (serve.engine)."""
    adapter = await asyncio.to_thread(resolve_model, state, body.model)
    params = [sampling_params(state, body, len(prompt), chat, grammar) for prompt in prompts]
    engine, submitted = state.engine, []
    try:
        for prompt, param in zip(prompts, params):
            for i in range(body.n):
                sample = dataclasses.replace(param, seed=sample_seed(param.seed, i))
                stream = EventStream()
                submitted.append((engine.submit(GenerationRequest(prompt, adapter, sample), stream.sink), stream))
        return await asyncio.gather(*(result_of(request, stream, engine, seq) for seq, stream in submitted))
    finally:
        for seq, _ in submitted:
            engine.cancel(seq)  # a no-op for a finished one; frees the others when one failed


def choices_usage(prompts: list[Prompt], results: list[tuple[str, Event]]) -> dict:
    """Usage as OpenAI counts it: each prompt once, every choice's completion tokens."""
    return P.usage(sum(len(prompt.ids) for prompt in prompts), sum(last.completion_tokens for _, last in results))


async def result_of(request: Request, stream: EventStream, engine: Engine, seq: Sequence) -> tuple[str, Event]:
    return await collect(request, stream, engine, seq, await first_event(request, stream, engine, seq))


def completion_choices(tokenizer, body: P.CompletionRequest, prompts: list[Prompt],
                       results: list[tuple[str, Event]]) -> list[dict]:
    choices = []
    for index, (text, last) in enumerate(results):
        prompt = prompts[index // body.n]
        prompt_text = prompt.text if prompt.text is not None else tokenizer.decode(prompt.ids)
        logprobs = None
        if body.logprobs is not None:
            logprobs = logprobs_of(tokenizer, last.logprobs, start=0 if body.echo else len(prompt_text))
        choices.append(P.completion_choice(index, prompt_text + text if body.echo else text, last.finish_reason,
                                           logprobs))
    return choices


def chat_choices(tokenizer, body: P.ChatRequest, results: list[tuple[str, Event]]) -> list[dict]:
    def piece(token: int) -> str:
        return tokenizer.decode([token])

    choices = []
    for index, (text, last) in enumerate(results):
        logprobs = None
        if body.logprobs:  # one entry per generated token
            logprobs = {"content": [P.chat_logprob(piece(e.token), e.logprob,
                                                   [(piece(t), lp) for t, lp in e.top.items()])
                                    for e in last.logprobs]}
        content, calls = (text, []) if body.tool_mode() == "none" else split_output(text, tool_names(body))
        choices.append(P.chat_choice(index, content, tool_finish(last.finish_reason, calls), logprobs,
                                     [call.as_dict() for call in calls]))
    return choices


def tool_names(body: P.ChatRequest) -> set[str]:
    return {tool.function.name for tool in body.tools or []}


def tool_finish(reason: str | None, calls: list) -> str | None:
    """OpenAI's finish_reason: "tool_calls" when the model called tools and stopped on its own."""
    return "tool_calls" if calls and reason == "stop" else reason


def logprobs_of(tokenizer, entries: list[TokenLogprob], start: int) -> dict:
    """The completions `logprobs` object of engine entries; a token's text is its decoded id."""
    def piece(token: int) -> str:
        return tokenizer.decode([token])

    def top_by_text(top: dict[int, float]) -> dict[str, float]:
        """Tokens whose texts are equal (byte pieces of one character) share a key: the likeliest keeps it."""
        out: dict[str, float] = {}
        for token, logprob in top.items():  # most likely first
            out.setdefault(piece(token), logprob)
        return out

    tops = [None if e.top is None else top_by_text(e.top) for e in entries]
    return P.completion_logprobs([piece(e.token) for e in entries], [e.logprob for e in entries], tops, start)


async def next_event(request: Request, stream: EventStream, engine: Engine, seq: Sequence) -> Event:
    """The next event; cancels the request when the client disconnects while waiting."""
    while True:
        try:
            return await asyncio.wait_for(stream.get(), timeout=1.0)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                engine.cancel(seq)
                raise ApiError(499, "client closed the request") from None


async def first_event(request: Request, stream: EventStream, engine: Engine, seq: Sequence) -> Event:
    """Wait for the first event, so that a request that fails before its first token (e.g. its
    adapter cannot be loaded) gets a proper HTTP error even when it asked for a stream."""
    event = await next_event(request, stream, engine, seq)
    if event.kind == "error":
        err = event.error
        raise as_api_error(err) if isinstance(err, LoraError) else ApiError(500, "generation failed",
                                                                            "generation_failed")
    return event


async def collect(request, stream, engine, seq, event: Event) -> tuple[str, Event]:
    parts = []
    while event.kind == "delta":
        parts.append(event.text)
        event = await next_event(request, stream, engine, seq)
    if event.kind == "error":
        err = event.error
        raise as_api_error(err) if isinstance(err, LoraError) else ApiError(500, "generation failed",
                                                                            "generation_failed")
    return "".join(parts), event


async def _cancel_at_end(chunks: AsyncIterator[str], engine: Engine, seq: Sequence) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        engine.cancel(seq)  # a no-op when it finished; frees the row when the client left


async def completion_sse(stream: EventStream, event: Event, rid: str, body: P._Sampling) -> AsyncIterator[str]:
    while event.kind == "delta":
        yield sse(P.completion(rid, body.model, event.text, None, None))
        event = await stream.get()
    if event.kind == "error":
        yield sse(P.error_body(str(event.error), "server_error", "generation_failed"))
        return
    yield sse(P.completion(rid, body.model, "", event.finish_reason, None))
    if body.include_usage():
        use = P.usage(event.prompt_tokens, event.completion_tokens)
        yield sse(P.usage_chunk(rid, body.model, "text_completion", use))
    yield "data: [DONE]\n\n"


async def chat_sse(stream: EventStream, event: Event, rid: str, body: P._Sampling) -> AsyncIterator[str]:
    """Chat chunks; with tools, text deltas go through the tool-call parser: content streams as
    it settles, each call as two deltas (id + name, then its arguments) once it closes."""
    tools = ToolCallParser(tool_names(body)) if body.tool_mode() != "none" else None
    calls = 0
    yield sse(P.chat_chunk(rid, body.model, {"role": "assistant", "content": ""}, None))
    while event.kind == "delta":
        for part in tools.feed(event.text) if tools else [event.text]:
            for delta in chat_deltas(part, calls):
                yield sse(P.chat_chunk(rid, body.model, delta, None))
            calls += isinstance(part, ParsedCall)
        event = await stream.get()
    if event.kind == "error":
        yield sse(P.error_body(str(event.error), "server_error", "generation_failed"))
        return
    for part in tools.finish() if tools else []:
        for delta in chat_deltas(part, calls):
            yield sse(P.chat_chunk(rid, body.model, delta, None))
        calls += isinstance(part, ParsedCall)
    yield sse(P.chat_chunk(rid, body.model, {}, tool_finish(event.finish_reason, [None] * calls)))
    if body.include_usage():
        use = P.usage(event.prompt_tokens, event.completion_tokens)
        yield sse(P.usage_chunk(rid, body.model, "chat.completion.chunk", use))
    yield "data: [DONE]\n\n"


def chat_deltas(part: str | ParsedCall, index: int) -> list[dict]:
    """The chunk deltas of settled content, or of tool call number `index` (OpenAI's shape)."""
    if isinstance(part, str):
        return [{"content": part}]
    head = {"index": index, "id": part.id, "type": "function", "function": {"name": part.name, "arguments": ""}}
    return [{"tool_calls": [head]}, {"tool_calls": [{"index": index, "function": {"arguments": part.arguments}}]}]


# --- the tokenizer (vLLM's endpoints) ----------------------------------------------------------------
def _add_tokenizer_routes(app: FastAPI, state: ServeState):
    @app.post("/tokenize")
    async def tokenize(body: P.TokenizeRequest):
        await asyncio.to_thread(resolve_model, state, body.model)
        tokens = await asyncio.to_thread(tokenize_body, state, body)
        return {"count": len(tokens), "max_model_len": state.engine.context, "tokens": tokens}

    @app.post("/detokenize")
    async def detokenize(body: P.DetokenizeRequest):
        await asyncio.to_thread(resolve_model, state, body.model)
        check_token_ids(state, body.tokens, "tokens")
        return {"prompt": await asyncio.to_thread(state.engine.tokenizer.decode, body.tokens)}


def tokenize_body(state: ServeState, body: P.TokenizeRequest) -> list[int]:
    if body.messages is not None:
        return chat_prompt(state, body.messages, body.add_generation_prompt, bool(body.add_special_tokens))
    check_prompt_chars(state, len(body.prompt), "prompt")
    special = True if body.add_special_tokens is None else body.add_special_tokens
    return state.engine.tokenizer(body.prompt, add_special_tokens=special)["input_ids"]


# --- runtime adapters (vLLM's endpoints) ------------------------------------------------------------
def _add_adapter_routes(app: FastAPI, state: ServeState):
    @app.post("/v1/load_lora_adapter")
    async def load_lora(body: P.LoadLoraRequest):
        _check_runtime_adapters(state, body.lora_name)
        with adapter_route_errors():
            await asyncio.to_thread(state.registry.register, body.lora_name, body.lora_path)
            try:  # read and check it now: a broken adapter is refused here, not on its first request
                await asyncio.wrap_future(state.engine.call(lambda: preload(state.engine, body.lora_name)))
            except BaseException:
                state.registry.unregister(body.lora_name)
                raise
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(body: P.UnloadLoraRequest):
        _check_runtime_adapters(state, body.lora_name)
        with adapter_route_errors():
            await asyncio.to_thread(state.registry.unregister, body.lora_name)
        await asyncio.wrap_future(state.engine.call(lambda: state.engine.adapters.retire(body.lora_name)))
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


@contextmanager
def adapter_route_errors():
    """LoraErrors of the runtime adapter routes, pointing at their fields (lora_name, lora_path)."""
    try:
        yield
    except AdapterLoadFailed as err:
        raise ApiError(400, str(err), "adapter_load_failed", "lora_path") from None
    except LoraError as err:
        api = as_api_error(err)
        raise ApiError(api.status, api.message, api.code, "lora_name" if api.param == "model" else api.param) from None


def _check_runtime_adapters(state: ServeState, name: str):
    if state.merged or state.registry is None or state.engine.adapters is None:
        raise ApiError(400, "this server serves one merged model; runtime adapters are disabled", "adapters_disabled")
    if name == state.base_name:
        raise ApiError(400, f"'{name}' is the base model's name", "invalid_model", "lora_name")
    try:
        check_name(name)
    except BadAdapterName as err:
        raise ApiError(400, str(err), "invalid_model", "lora_name") from None


def preload(engine: Engine, name: str):
    """Engine thread: read and check adapter `name` (config, weights, shapes, finite values),
    bringing it into a slot when one is free of running requests."""
    if engine.adapters.acquire(name) is not None:
        engine.adapters.release(name)
    else:  # every slot is busy, or an older copy of `name` is still running: check the files only
        engine.adapters.check(name)
