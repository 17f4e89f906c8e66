"""The OpenAI / vLLM wire format: request bodies (validated strictly: a wrong type is a 400,
never silently coerced) and the JSON objects the server sends back."""
from __future__ import annotations

import re
import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# What one request may ask for (docs/serve.md, "Reliability").
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_MESSAGES = 1024
MAX_PATH_CHARS = 4096
MAX_CHOICES = 128  # choices in one request, prompts x n (each is a batch row)
MAX_LOGPROBS = 20  # top tokens per position (vLLM's bound; OpenAI's is 5)
SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.Generator.manual_seed accepts
MAX_TOOLS = 128
MAX_CHOICE_STRINGS = 1024  # structured_outputs.choice
FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function and schema names

StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


class FieldError(ValueError):
    """A body validation error about one field (its `param` in the OpenAI error)."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


class _Body(BaseModel):
    """A request body; a field this server does not know is refused (400 naming it), never ignored."""

    model_config = ConfigDict(strict=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _text_is_unicode(cls, data):
        """Refuse strings that are not Unicode text (lone surrogates such as "\\ud800", which
        JSON allows but UTF-8 cannot encode), anywhere in the body, extra fields included."""
        where = first_surrogate(data)
        if where is not None:
            raise FieldError(where.split(".")[0] or None,
                             f"{where or 'body'}: a string holds a lone UTF-16 surrogate; send valid Unicode text")
        return data


def first_surrogate(value, where: str = "") -> str | None:
    """The location of the first string (key or value) holding a lone surrogate, or None."""
    if isinstance(value, str):
        return where if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        here = f"{where}.{key}" if where else str(key)
        if isinstance(key, str) and _SURROGATE.search(key):
            return where
        found = first_surrogate(item, here)
        if found is not None:
            return found
    return None


_SURROGATE = re.compile("[\ud800-\udfff]")


class JsonSchemaFormat(_Body):
    """response_format.json_schema: OpenAI's named schema (`strict` is accepted; output always
    matches the schema exactly)."""

    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)
    name: str = Field(pattern=FUNCTION_NAME)
    json_schema: dict | bool = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise FieldError("response_format", "response_format: json_schema is required with (and only with) "
                                                "type 'json_schema'")
        return self


class StructuredOutputs(_Body):
    """vLLM's `structured_outputs`: exactly one of json (a schema), json_object, regex, choice or
    grammar (EBNF / GBNF, as xgrammar reads it)."""

    json_: dict | bool | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1, max_length=MAX_CHOICE_STRINGS)
    grammar: str | None = None
    model_config = ConfigDict(strict=True, extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [name for name in ("json_", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise FieldError("structured_outputs", "structured_outputs: give exactly one of json, json_object, "
                                                   "regex, choice, grammar")
        return self


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: StopString | list[StopString] | None = Field(None, max_length=MAX_STOP_STRINGS)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    n: int = Field(1, ge=1, le=MAX_CHOICES)  # samples per prompt
    stream: bool = False
    stream_options: dict | None = None
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM's extension

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


TokenIds = list[int]
PROMPT_SHAPES = "the prompt must be a string, a list of strings, a list of token ids or a list of token-id lists"


class CompletionRequest(_Sampling):
    prompt: str | list[str] | TokenIds | list[TokenIds]
    max_tokens: int | None = Field(None, ge=0)  # 0: with echo, score the prompt only
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str  # a JSON text, as OpenAI sends it


class ToolCall(_Body):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Body):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a `tool` turn: the call it answers

    @model_validator(mode="after")
    def _tool_fields_fit_the_role(self):
        if self.tool_calls is not None and self.role != "assistant":
            raise FieldError("messages", "messages: tool_calls are allowed in assistant messages only")
        if self.role == "tool" and not self.tool_call_id:
            raise FieldError("messages", "messages: a message with role 'tool' needs its tool_call_id")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class FunctionDefinition(_Body):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments object; None: no arguments
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


TOOL_CHOICES = ("none", "auto", "required")


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = Field(None, min_length=1, max_length=MAX_TOOLS)  # [] is a 400, as at OpenAI
    tool_choice: str | dict | None = None  # "none" | "auto" | "required" | {"type": "function", ...}
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs requires logprobs: true")
        return self

    @model_validator(mode="after")
    def _tool_choice_fits_tools(self):
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) != len(names):
            raise FieldError("tools", "tools: two functions share a name")
        choice = self.tool_choice
        if choice is None:
            return self
        if not self.tools and choice != "none":
            raise FieldError("tool_choice", "tool_choice requires tools")
        if isinstance(choice, str):
            if choice not in TOOL_CHOICES:
                raise FieldError("tool_choice", "tool_choice must be 'none', 'auto', 'required' or "
                                                "{\"type\": \"function\", \"function\": {\"name\": ...}}")
        else:
            name = named_tool(choice)
            if name not in names:
                raise FieldError("tool_choice", f"tool_choice names the function {name!r}, which is not in tools")
        if self.forced_tool() is not None and (self.response_format or self.structured_outputs):
            raise FieldError("tool_choice", "a required or named tool_choice cannot be combined with "
                                            "response_format or structured_outputs")
        return self

    def top_count(self) -> int | None:
        """Top tokens per generated token, or None when logprobs are off."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def tool_mode(self) -> str:
        """'none', 'auto', 'required' or 'named' (OpenAI's default: auto with tools, else none)."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if self.tool_choice is None or self.tool_choice == "auto":
            return "auto"
        return "required" if self.tool_choice == "required" else "named"

    def forced_tool(self) -> list[Tool] | None:
        """The tools one of which the output must call (required: any; named: that one), else None."""
        mode = self.tool_mode()
        if mode == "required":
            return list(self.tools)
        if mode == "named":
            name = named_tool(self.tool_choice)
            return [tool for tool in self.tools if tool.function.name == name]
        return None


def named_tool(choice: dict) -> str:
    """The function name of a tool_choice object; FieldError when it is not OpenAI's shape."""
    function = choice.get("function")
    if choice.get("type") != "function" or set(choice) != {"type", "function"} or not isinstance(function, dict) \
            or set(function) != {"name"} or not isinstance(function["name"], str):
        raise FieldError("tool_choice", "tool_choice must be 'none', 'auto', 'required' or "
                                        "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    return function["name"]


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a `prompt` (special tokens added by default) or chat `messages`
    (the chat template applied, with the assistant prompt by default)."""

    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (vLLM's)
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _prompt_or_messages(self):
        if (self.prompt is None) == (self.messages is None):
            raise FieldError("prompt", "send either prompt or messages")
        return self


class DetokenizeRequest(_Body):
    model: str
    tokens: list[int]


class LoadLoraRequest(_Body):
    lora_name: str
    lora_path: str = Field(min_length=1, max_length=MAX_PATH_CHARS)

    @field_validator("lora_path")
    @classmethod
    def _no_nul(cls, path: str) -> str:
        if "\x00" in path:
            raise FieldError("lora_path", "lora_path holds a NUL byte")
        return path


class UnloadLoraRequest(_Body):
    lora_name: str


# --- responses ---------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, text: str, finish: str | None, use: dict | None) -> dict:
    return completions(rid, model, [completion_choice(0, text, finish, None)], use)


def completions(rid: str, model: str, choices: list[dict], use: dict | None) -> dict:
    out = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model, "choices": choices}
    if use is not None:
        out["usage"] = use
    return out


def completion_choice(index: int, text: str, finish: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def completion_logprobs(tokens: list[str], logprobs: list[float | None], top: list[dict[str, float] | None],
                        start: int) -> dict:
    """OpenAI's (legacy) completions logprobs: per token its text, logprob, top tokens and the
    offset of its text in prompt + completion (`start`: where the first token begins)."""
    offsets = []
    for token in tokens:
        offsets.append(start)
        start += len(token)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_completions(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}


def chat_choice(index: int, text: str | None, finish: str, logprobs: dict | None,
                tool_calls: list[dict] | None = None) -> dict:
    message = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}


def chat_logprob(token: str, logprob: float, top: list[tuple[str, float]]) -> dict:
    """One entry of a chat choice's `logprobs.content` (bytes: the token text's UTF-8)."""
    def item(text: str, value: float) -> dict:
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    return {**item(token, logprob), "top_logprobs": [item(text, value) for text, value in top]}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(rid: str, model: str, obj: str, use: dict) -> dict:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": use}


def model_card(name: str, root: str, parent: str | None, max_len: int) -> dict:
    """One /v1/models entry, with vLLM's `root` (where it comes from) and `parent` (its base)."""
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "loraforge",
            "root": root, "parent": parent, "max_model_len": max_len, "permission": []}


def error_body(message: str, type_: str, code: str | int | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
