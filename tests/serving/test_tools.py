"""The hermes tool-call parser and the tool prompt (eaas/serving/tools.py), without a model."""

from __future__ import annotations

import json

from eaas.serving.tools import ToolSpec, extract_tool_calls, parse_tools, render_tool_messages

TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


def test_auto_parses_hermes_blocks_and_keeps_the_content_before_them():
    spec = parse_tools({"tools": TOOLS})
    text = 'Let me look.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>' \
           '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    content, calls = extract_tool_calls(text, spec)
    assert content == "Let me look."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("f", {"x": 1}), ("f", {})]
    assert all(c["type"] == "function" and c["id"].startswith("chatcmpl-tool-") for c in calls)


def test_malformed_or_absent_calls_stay_text():
    spec = parse_tools({"tools": TOOLS})
    for text in ("no calls here", "<tool_call>{not json}</tool_call>"):
        assert extract_tool_calls(text, spec) == (text, [])
    none = ToolSpec(TOOLS, {"f": {}}, "none")
    text = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    assert extract_tool_calls(text, none) == (text, [])


def test_tool_messages_render_as_hermes_turns():
    spec = parse_tools({"tools": TOOLS, "tool_choice": "required"})
    raw = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "go"},
           {"role": "assistant", "content": None, "tool_calls": [
               {"id": "c1", "type": "function",
                "function": {"name": "f", "arguments": '{"x": 2}'}}]},
           {"role": "tool", "tool_call_id": "c1", "content": "42"}]
    msgs = [{"role": m["role"], "content": m["content"] or ""} for m in raw]
    out = render_tool_messages(msgs, raw, spec)
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.")
    assert '<tools>\n{"name":"f"' in out[0]["content"]
    assert out[2]["content"] == '<tool_call>\n{"name": "f", "arguments": {"x": 2}}\n</tool_call>'
    assert out[3] == {"role": "user", "content": "<tool_response>\n42\n</tool_response>"}
    assert spec.structured_outputs().schema["type"] == "array"
