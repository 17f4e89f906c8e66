"""Tool calls through the real `openai` client: tools rendered into the prompt (the template's
own format, or the Hermes default block), tool_choice required / named forced by a grammar so
that even the random base model's arguments validate (jsonschema), auto parsed, streamed deltas
reassembled by the openai stream helper, tool results in the conversation, one-line 400s."""
from __future__ import annotations

import copy

import json
from types import SimpleNamespace

import httpx
import jsonschema
import openai
import pytest
from factory import tiny_llama, tiny_tokenizer
from serve_fixture import ServerThread, shared_setup

from loraforge.serve import protocol as P
from loraforge.serve.api import chat_prompt, create_app
from loraforge.serve.server import build_state
from loraforge.serve.tool_calls import DEFAULT_TOOL_PROMPT, split_output

BASE = "tiny-base"
WEATHER = {"type": "object",
           "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                          "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "unit"], "additionalProperties": False}
CLOCK = {"type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["zone"],
         "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a zone",
                                           "parameters": CLOCK}},
         {"type": "function", "function": {"name": "ping"}}]  # no parameters: arguments {}
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK, "ping": {"type": "object", "properties": {},
                                                                "additionalProperties": False}}
CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def paths():
    return shared_setup()


@pytest.fixture(scope="module")
def server(paths, tmp_path_factory):
    # the serve fixture's base with a longer context: the tool block is long in the tiny tokenizer's tokens
    base = tmp_path_factory.mktemp("long-base")
    tiny_llama(0, 64, context=2048, text=True).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    state = build_state(str(base), str(paths["adapters"]), max_batch=16, max_loaded=2, served_name=BASE)
    with ServerThread(create_app(state)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, tool_choice, seed: int, model: str = BASE, **kwargs):
    return client.chat.completions.create(model=model, messages=CHAT, tools=TOOLS, tool_choice=tool_choice,
                                          temperature=1.0, seed=seed, max_tokens=150, **kwargs)


def check_call(call, names=None):
    assert call.type == "function" and call.id.startswith("call_")
    assert names is None or call.function.name in names
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


# --- forced calls --------------------------------------------------------------------------------------
def test_required_is_valid_20_of_20_on_the_base_model(client):
    names = set()
    for seed in range(20):
        choice = ask(client, "required", seed).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
        assert len(choice.message.tool_calls) == 1
        check_call(choice.message.tool_calls[0], set(SCHEMAS))
        names.add(choice.message.tool_calls[0].function.name)
    assert len(names) > 1  # the model chooses among the tools


def test_named_tool_choice_calls_that_tool(client):
    for seed, model in enumerate([BASE, "alpha", "beta"]):
        named = {"type": "function", "function": {"name": "get_time"}}
        choice = ask(client, named, seed, model=model).choices[0]
        assert choice.finish_reason == "tool_calls"
        assert [c.function.name for c in choice.message.tool_calls] == ["get_time"]
        check_call(choice.message.tool_calls[0])


def test_streamed_tool_call_deltas_reassemble_into_the_whole_call(client):
    whole = ask(client, "required", 5, n=1).choices[0]
    kwargs = {"model": BASE, "messages": CHAT, "tools": TOOLS, "tool_choice": "required", "temperature": 1.0,
              "seed": 5, "max_tokens": 150}
    helper = getattr(client.chat.completions, "stream", None) or client.beta.chat.completions.stream  # older clients
    with helper(**kwargs) as stream:
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    raw = list(client.chat.completions.create(stream=True, **kwargs))
    deltas = [d for chunk in raw for d in chunk.choices[0].delta.tool_calls or []]
    assert deltas[0].id and deltas[0].function.name and deltas[0].index == 0
    assert "".join(d.function.arguments or "" for d in deltas) == whole.message.tool_calls[0].function.arguments


# --- auto -----------------------------------------------------------------------------------------------
def test_auto_parses_a_call_the_model_emitted_and_leaves_text_alone(client):
    emitted = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    forced_text = {"structured_outputs": {"choice": [emitted]}}  # makes the random model emit it
    choice = ask(client, "auto", 1, extra_body=forced_text).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == \
        [("get_time", {"zone": "UTC"})]
    plain = ask(client, "auto", 2, extra_body={"structured_outputs": {"choice": ["It is sunny."]}}).choices[0]
    assert plain.message.content == "It is sunny." and not plain.message.tool_calls
    assert plain.finish_reason == "stop"
    none = ask(client, "none", 1, extra_body=forced_text).choices[0]
    assert none.message.content == emitted and not none.message.tool_calls


UNKNOWN_CALL = '<tool_call>{"name": "nosuch", "arguments": {}}</tool_call>'  # not a tool: stays content
TWO_CALLS = ('Let me check.\n<tool_call>{"name": "ping", "arguments": {}}</tool_call>\n'
             '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>')


@pytest.mark.parametrize("text,content,calls", [
    ('<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>', None, [("ping", "{}")]),
    (TWO_CALLS, "Let me check.",
     [("ping", "{}"), ("get_time", '{"zone": "CET"}')]),
    (UNKNOWN_CALL, UNKNOWN_CALL, []),
    ('<tool_call>{"name": "ping", "arguments": {', '<tool_call>{"name": "ping", "arguments": {', []),
    ("no calls <tool_ here", "no calls <tool_ here", []),
    ("plain text, its own whitespace kept \n\n", "plain text, its own whitespace kept \n\n", []),
    ('<tool_call>{"name": "ping", "arguments": {}}</tool_call>\n\nDone.', "Done.", [("ping", "{}")]),
])
def test_the_parser_splits_content_and_calls_whole_and_in_pieces(text, content, calls):
    from loraforge.serve.tool_calls import ToolCallParser

    names = set(SCHEMAS)
    got_content, got_calls = split_output(text, names)
    assert got_content == content and [(c.name, c.arguments) for c in got_calls] == calls
    parser, parts = ToolCallParser(names), []
    for ch in text:  # one character at a time, as a stream may cut it
        parts += parser.feed(ch)
    parts += parser.finish()
    assert ("".join(p for p in parts if isinstance(p, str)) or None) == content
    assert [(p.name, p.arguments) for p in parts if not isinstance(p, str)] == calls


# --- the prompt ----------------------------------------------------------------------------------------
def prompt_state(tokenizer):
    return SimpleNamespace(engine=SimpleNamespace(tokenizer=tokenizer, context=4096), max_prompt_chars=10 ** 6)


def messages(raw: list[dict]) -> list[P.ChatMessage]:
    return P.ChatRequest.model_validate({"model": "m", "messages": raw}).messages


CONVERSATION = [
    {"role": "user", "content": "Weather in Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Rome", "unit": "celsius"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "21 C and sunny"},
]


def test_default_tool_prompt_and_tool_turns_in_hermes_format():
    tokenizer = tiny_tokenizer()
    tools = [P.Tool.model_validate(t) for t in TOOLS]
    ids = chat_prompt(prompt_state(tokenizer), messages(CONVERSATION), tools=tools)
    block = DEFAULT_TOOL_PROMPT.format(tools="\n".join(json.dumps(t) for t in TOOLS))
    want = [{"role": "system", "content": block}, {"role": "user", "content": "Weather in Rome?"},
            {"role": "assistant", "content": '<tool_call>\n{"name": "get_weather", "arguments": '
                                             '{"city": "Rome", "unit": "celsius"}}\n</tool_call>'},
            {"role": "tool", "content": "<tool_response>\n21 C and sunny\n</tool_response>"}]
    text = tokenizer.apply_chat_template(want, add_generation_prompt=True, tokenize=False)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_template_that_renders_tools_gets_them_and_the_calls():
    tokenizer = copy.deepcopy(tiny_tokenizer())  # the factory's tokenizer is shared: change a copy
    tokenizer.chat_template = (
        "{{ tools | tojson }}|{% for m in messages %}{{ m.role }}:{{ m.content }}"
        "{% for c in m.tool_calls or [] %}[{{ c.function.name }} {{ c.function.arguments | tojson }}]{% endfor %}"
        "{% if m.tool_call_id %}({{ m.tool_call_id }}){% endif %};{% endfor %}")
    tools = [P.Tool.model_validate(t) for t in TOOLS[:1]]
    ids = chat_prompt(prompt_state(tokenizer), messages(CONVERSATION), tools=tools)
    want = (json.dumps(TOOLS[:1]).replace("<", "\\u003c") + "|user:Weather in Rome?;assistant:"
            '[get_weather {"city": "Rome", "unit": "celsius"}];tool:21 C and sunny(call_1);')
    assert tokenizer.decode(ids) == want


def test_a_conversation_with_tool_results_is_served(client):
    choice = client.chat.completions.create(model="alpha", messages=CONVERSATION, tools=TOOLS, max_tokens=4,
                                            temperature=0.0).choices[0]
    assert choice.finish_reason in ("length", "stop")


# --- bad input ------------------------------------------------------------------------------------------
BAD = [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nosuch"}}}, "tool_choice", "nosuch"),
    ({"tool_choice": "required"}, "tool_choice", "requires tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice", "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools", "name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools", "name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1, 2]}}]}, "tools", "parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}]}, "tools",
     "bogus"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools", "type"),
    ({"tools": TOOLS[:1] * 2}, "tools", "share a name"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "response_format"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages", "tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages", "assistant"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                         "function": {"name": "f", "arguments": "{oops"}}]}]},
     "messages", "JSON"),
]


@pytest.mark.parametrize("extra,param,word", BAD)
def test_bad_tool_requests_are_one_line_400s(server, extra, param, word):
    body = {"model": BASE, "messages": CHAT, "max_tokens": 4, **extra}
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and word in error["message"] and "\n" not in error["message"], error
