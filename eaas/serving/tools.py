"""Tool calling for chat completions: the request's `tools` / `tool_choice`, the prompt the model
sees, the grammar that forces a call, and the parser that turns output into `tool_calls`.

Parser: hermes-style (Qwen2.5/3, Hermes, many others): the model writes each call as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. When the model's chat template has
no tools block of its own, the tools are described to the model in a system message in the
same hermes form (a compact form of Qwen's wording), assistant `tool_calls` are rendered as
those tags and `tool` messages as `<tool_response>` blocks, so any template can carry a tool
conversation.

tool_choice, as vLLM does it:
- "none": tools are described but never parsed out of the output;
- "auto" (the default with tools): the output is free; `<tool_call>` blocks become tool_calls;
- "required": the output is forced (grammar) to a JSON array of >= 1 {"name", "parameters"};
- {"type": "function", "function": {"name": N}}: forced to N's arguments object (its schema).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from eaas.engine.params import StructuredOutputsParams
from eaas.serving.api_errors import ApiError
from eaas.serving.jsonbody import json_type

__all__ = ["ToolSpec", "parse_tools", "render_tool_messages", "extract_tool_calls"]

MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """The request's tools (name -> parameters schema) and how the output is treated."""

    tools: list[dict]  # as the client sent them (validated)
    schemas: dict[str, dict]  # function name -> its parameters JSON schema
    choice: str  # "none" | "auto" | "required" | "named"
    name: str | None = None  # the forced function when choice == "named"

    def structured_outputs(self) -> StructuredOutputsParams | None:
        """The grammar forcing a call (required / named), else None."""
        if self.choice == "named":
            assert self.name is not None
            return StructuredOutputsParams(json=self.schemas[self.name])
        if self.choice == "required":
            items = [{"type": "object", "properties": {"name": {"const": n}, "parameters": s},
                      "required": ["name", "parameters"], "additionalProperties": False}
                     for n, s in self.schemas.items()]
            return StructuredOutputsParams(json={"type": "array", "minItems": 1,
                                                 "items": {"anyOf": items}})
        return None


def parse_tools(body: dict[str, Any]) -> ToolSpec | None:
    """Validate `tools` and `tool_choice`; None when the request has no tools."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if body.get("functions") is not None:
        raise ApiError(400, "functions (the deprecated form) is not supported; send tools",
                       param="functions")
    if tools is None:
        if choice not in (None, "none"):
            raise ApiError(400, "tool_choice needs tools: send tools, or 'none'",
                           param="tool_choice")
        return None
    if not isinstance(tools, list) or not 1 <= len(tools) <= MAX_TOOLS:
        raise ApiError(400, f"tools must be a list of 1..{MAX_TOOLS} tools, got "
                       f"{json_type(tools)}", param="tools")
    schemas: dict[str, dict] = {}
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not (isinstance(t, dict) and t.get("type") == "function" and isinstance(fn, dict)):
            raise ApiError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}",
                           param="tools")
        name = fn.get("name")
        if not (isinstance(name, str) and _NAME.match(name)):
            raise ApiError(400, f"tools[{i}].function.name={name!r:.60} is not allowed: 1-64 "
                           "characters of letters, digits, '_', '.', '-'", param="tools")
        if name in schemas:
            raise ApiError(400, f"tools[{i}].function.name {name!r} is given twice",
                           param="tools")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ApiError(400, f"tools[{i}].function.parameters must be a JSON schema object",
                           param="tools")
        schemas[name] = params
    if choice is None or choice in ("auto", "none", "required"):
        return ToolSpec(tools, schemas, choice or "auto")
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not (isinstance(choice, dict) and choice.get("type") == "function" and name is not None):
        raise ApiError(400, "tool_choice must be 'none', 'auto', 'required' or {'type': "
                       "'function', 'function': {'name': <a tool's name>}}", param="tool_choice")
    if name not in schemas:
        raise ApiError(400, f"tool_choice names {name!r:.60}, which is not among tools "
                       f"({sorted(schemas)})", param="tool_choice")
    return ToolSpec(tools, schemas, "named", name)


def _tools_system_prompt(tools: list[dict]) -> str:
    listing = "\n".join(json.dumps(t["function"], ensure_ascii=False, separators=(",", ":"))
                        for t in tools)
    return (f"# Tools\nYou may call functions. Signatures:\n<tools>\n{listing}\n</tools>\n"
            "Reply to call one as:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def render_tool_messages(messages: list[dict], raw: list[Any], spec: ToolSpec | None
                         ) -> list[dict]:
    """Messages for a template without tool support: the tools as a system message (merged
    into the first system message), assistant tool_calls as <tool_call> blocks, tool results
    as <tool_response> blocks of a user turn. `raw` are the client's messages (for their
    tool_calls fields)."""
    out: list[dict] = []
    for m, r in zip(messages, raw):
        content = m["content"]
        if m["role"] == "assistant" and isinstance(r.get("tool_calls"), list):
            calls = []
            for c in r["tool_calls"]:
                fn = c.get("function") if isinstance(c, dict) else None
                if not isinstance(fn, dict):
                    raise ApiError(400, "an assistant message's tool_calls must be "
                                   "[{'type': 'function', 'function': {name, arguments}}]",
                                   param="messages")
                args = fn.get("arguments")
                try:
                    args = json.loads(args) if isinstance(args, str) else args
                except ValueError:
                    pass
                calls.append("<tool_call>\n" + json.dumps(
                    {"name": fn.get("name"), "arguments": args}, ensure_ascii=False)
                    + "\n</tool_call>")
            content = "\n".join([content, *calls] if content else calls)
            out.append({"role": "assistant", "content": content})
        elif m["role"] == "tool":
            out.append({"role": "user",
                        "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            out.append(dict(m))
    if spec is not None:
        prompt = _tools_system_prompt(spec.tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _call(name: Any, args: Any) -> dict:
    return {"id": f"chatcmpl-tool-{uuid.uuid4().hex}", "type": "function",
            "function": {"name": str(name), "arguments": json.dumps(args, ensure_ascii=False)
                         if not isinstance(args, str) else args}}


def extract_tool_calls(text: str, spec: ToolSpec | None) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a finished output. Forced calls (named/required) parse the
    whole output as JSON; "auto" finds hermes <tool_call> blocks (the text before the first
    is the content; a block that is not a JSON call stays in the content)."""
    if spec is None or spec.choice == "none":
        return text, []
    if spec.choice == "named":
        try:
            return None, [_call(spec.name, json.loads(text))]
        except ValueError:
            return text, []  # cut short (length): return what there is as content
    if spec.choice == "required":
        try:
            items = json.loads(text)
            return None, [_call(it["name"], it["parameters"]) for it in items]
        except (ValueError, KeyError, TypeError):
            return text, []
    calls = []
    for block in _CALL.findall(text):
        try:
            obj = json.loads(block)
            calls.append(_call(obj["name"], obj.get("arguments", {})))
        except (ValueError, KeyError, TypeError):
            return text, []  # not a well-formed call: leave the text alone
    if not calls:
        return text, []
    content = text[:text.index("<tool_call>")].strip()
    return content or None, calls
