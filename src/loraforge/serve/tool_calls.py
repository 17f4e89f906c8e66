"""Tool calls (OpenAI function tools) in the Hermes / Qwen format.

The model is shown the tools by its chat template when the template takes `tools`; otherwise by
a system-message block (DEFAULT_TOOL_PROMPT) asking for

    <tool_call>
    {"name": <function name>, "arguments": <arguments object>}
    </tool_call>

Output in that format is parsed back into OpenAI `tool_calls` (ToolCallParser; the same parser,
fed as text arrives, yields the streamed deltas). tool_choice "required" and a named function are
forced by a grammar (forced_constraint): exactly one such call whose arguments match the
function's parameters schema.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from loraforge.serve import protocol as P
from loraforge.serve.constrain import Constraint

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"

DEFAULT_TOOL_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


class BadToolMessage(ValueError):
    """A conversation turn about tools that cannot be rendered (arguments that are not JSON)."""


def tool_dicts(tools: list[P.Tool]) -> list[dict]:
    """The tools as OpenAI sends them (what chat templates and the tool prompt show)."""
    return [tool.model_dump(exclude_none=True) for tool in tools]


def template_takes_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders `tools` itself (Qwen2.5, Llama 3.1, Hermes...)."""
    template = getattr(tokenizer, "chat_template", None)
    templates = template.values() if isinstance(template, dict) else [template or ""]
    return any("tools" in text for text in templates)


def call_arguments(call: P.ToolCall, index: int) -> dict:
    try:
        arguments = json.loads(call.function.arguments)
    except ValueError:
        raise BadToolMessage(f"messages.{index}: tool_calls arguments must be a JSON object text") from None
    if not isinstance(arguments, dict):
        raise BadToolMessage(f"messages.{index}: tool_calls arguments must be a JSON object text")
    return arguments


def template_turns(messages: list[P.ChatMessage], own_format: bool) -> list[dict]:
    """The conversation as chat-template turns. own_format: the template renders tool calls and
    tool results itself (HF's shape: arguments as a dict); else they become Hermes text."""
    turns = []
    for index, message in enumerate(messages):
        turn = {"role": message.role, "content": message.text()}
        calls = [(call, call_arguments(call, index)) for call in message.tool_calls or []]
        if own_format:
            if calls:
                turn["tool_calls"] = [{"id": call.id, "type": "function",
                                       "function": {"name": call.function.name, "arguments": arguments}}
                                      for call, arguments in calls]
            if message.tool_call_id is not None:
                turn["tool_call_id"] = message.tool_call_id
            if message.name is not None:
                turn["name"] = message.name
        else:
            blocks = [call_text(call.function.name, arguments) for call, arguments in calls]
            if message.role == "tool":
                blocks, turn["content"] = [], f"{RESPONSE_OPEN}\n{message.text()}\n{RESPONSE_CLOSE}"
            turn["content"] = "\n".join(([turn["content"]] if turn["content"] else []) + blocks)
        turns.append(turn)
    return turns


def with_tool_prompt(turns: list[dict], tools: list[P.Tool]) -> list[dict]:
    """The default for templates without tools: the tool block ends the system message (one
    is added when the conversation has none)."""
    block = DEFAULT_TOOL_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tool_dicts(tools)))
    if turns and turns[0]["role"] == "system":
        return [{**turns[0], "content": f"{turns[0]['content']}\n\n{block}"}] + turns[1:]
    return [{"role": "system", "content": block}] + turns


def call_text(name: str, arguments: dict) -> str:
    return f"{CALL_OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CALL_CLOSE}"


def forced_constraint(tools: list[P.Tool]) -> Constraint:
    """Exactly one call of one of `tools`, its arguments matching the function's parameters."""
    options = [call_schema(tool.function) for tool in tools]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return Constraint("tagged_json", (CALL_OPEN + "\n", schema, "\n" + CALL_CLOSE), "tools")


def call_schema(function: P.FunctionDefinition) -> dict:
    parameters = function.parameters
    if parameters is None:  # a function without parameters: arguments {}
        parameters = {"type": "object", "properties": {}, "additionalProperties": False}
    return {"type": "object", "properties": {"name": {"const": function.name}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


# --- parsing the output ------------------------------------------------------------------------
@dataclass
class ParsedCall:
    name: str
    arguments: str  # a JSON text
    id: str = ""

    def __post_init__(self):
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def as_dict(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class ToolCallParser:
    """Splits generated text, as it arrives, into content and tool calls. feed(text) and
    finish() return what is settled: content strings and ParsedCalls, in order. A
    <tool_call> block that does not hold {"name": <a tool>, "arguments": {...}} stays content;
    whitespace next to a call is dropped (so the parts do not depend on how the text was cut)."""

    def __init__(self, names: set[str]):
        self.names = names
        self.buffer = ""  # text not settled yet
        self.inside = False  # within <tool_call> ... (not closed yet)
        self.pending_space = ""  # trailing whitespace of the content so far, sent once text follows it
        self.after_call = False  # the last settled part is a call

    def feed(self, text: str) -> list[str | ParsedCall]:
        self.buffer += text
        out: list[str | ParsedCall] = []
        while True:
            if self.inside:
                end = self.buffer.find(CALL_CLOSE)
                if end < 0:
                    return out
                block, self.buffer = self.buffer[:end], self.buffer[end + len(CALL_CLOSE):]
                self.inside = False
                out += self._block(block)
            else:
                start = self.buffer.find(CALL_OPEN)
                if start < 0:
                    keep = partial_tail(self.buffer, CALL_OPEN)
                    out += self._content(self.buffer[:len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    return out
                out += self._content(self.buffer[:start])
                self.buffer, self.inside = self.buffer[start + len(CALL_OPEN):], True

    def finish(self) -> list[str | ParsedCall]:
        """What is left at the end: an unclosed call block is content, as generated."""
        rest = (CALL_OPEN if self.inside else "") + self.buffer
        self.buffer, self.inside = "", False
        out = self._content(rest)
        if self.pending_space and not self.after_call:
            out.append(self.pending_space)
        self.pending_space = ""
        return out

    def _content(self, text: str) -> list[str]:
        if self.after_call:
            text = text.lstrip()
        body = text.rstrip()
        if not body:
            self.pending_space += text
            return []
        out, self.pending_space, self.after_call = self.pending_space + body, text[len(body):], False
        return [out]

    def _block(self, block: str) -> list[str | ParsedCall]:
        call = parse_call(block, self.names)
        if call is None:
            return self._content(CALL_OPEN + block + CALL_CLOSE)
        self.pending_space, self.after_call = "", True
        return [call]


def parse_call(block: str, names: set[str]) -> ParsedCall | None:
    try:
        value = json.loads(block)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", {})
    if not isinstance(arguments, dict):
        return None
    return ParsedCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def partial_tail(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker` (may become it: hold it back)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def split_output(text: str, names: set[str]) -> tuple[str | None, list[ParsedCall]]:
    """(content or None, calls) of a whole generated text."""
    parser = ToolCallParser(names)
    parts = parser.feed(text) + parser.finish()
    content = "".join(p for p in parts if isinstance(p, str))
    return content or None, [p for p in parts if isinstance(p, ParsedCall)]
