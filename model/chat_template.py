"""Chat templates, rendered as transformers renders them, in jinja2's sandbox.

The environment matches transformers' `_compile_jinja_template` (trim_blocks, lstrip_blocks,
loop controls, `{% generation %}`, `raise_exception`, `strftime_now`, a `tojson` that does not
escape HTML) and the variables its `apply_chat_template` passes (named special tokens,
`messages` as plain data, `add_generation_prompt`, `tools=None`). A template that fails, or
tries to leave the sandbox, is a ChatTemplateError.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # as transformers aliases them


class ChatTemplateError(ValueError):
    """The chat template is missing, does not compile, or failed on these messages."""


def render(template: jinja2.Template, messages: list[dict], special_tokens: dict[str, str],
           add_generation_prompt: bool, extra: dict[str, Any],
           continue_final_message: bool = False) -> str:
    """The prompt text for `messages`, as transformers' apply_chat_template(tokenize=False).

    `continue_final_message`: the text ends with the last message's content, without the
    end-of-turn the template writes after it, so that the model continues that message (a
    prefilled assistant answer); it excludes `add_generation_prompt`."""
    if not messages:
        raise ChatTemplateError("cannot apply the chat template to an empty message list")
    if continue_final_message and add_generation_prompt:
        raise ChatTemplateError("continue_final_message and add_generation_prompt cannot both "
                                "be true: the first continues the last message, the second "
                                "starts a new one")
    if continue_final_message:
        messages = _tag_final(messages)
    try:
        variables = {**special_tokens, "tools": None, "documents": None, **_plain(extra),
                     "messages": _template_messages(messages),
                     "add_generation_prompt": add_generation_prompt}
        text = template.render(variables)  # a dict: a variable named "self" is no argument
    except jinja2.TemplateError as e:  # raise_exception, sandbox SecurityError, undefined
        raise ChatTemplateError(f"chat template error: {e}") from e
    except RecursionError:  # JSON nested hundreds deep (the body parser allows ~970 levels)
        raise ChatTemplateError("the messages or chat_template_kwargs are nested too deeply "
                                "for the chat template") from None
    except (TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as e:
        raise ChatTemplateError(f"chat template failed on these messages: {e!r}") from e
    return _cut_at_tag(text, messages[-1]["content"]) if continue_final_message else text


# transformers' marker: appended to the final message, rendered, then cut at
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _tag_final(messages: list[dict]) -> list[dict]:
    content = messages[-1].get("content")
    if not isinstance(content, str):  # empty is fine: the prompt ends at the opened turn
        raise ChatTemplateError("continue_final_message needs a final message with text to "
                                "continue")
    return [*messages[:-1], {**messages[-1], "content": content + _CONTINUE_TAG}]


def _cut_at_tag(text: str, tagged: str) -> str:
    """The text up to the tag, as transformers cuts it: where the template trimmed the space
    after it, the text before it is right-stripped too."""
    content = tagged[:-len(_CONTINUE_TAG)]
    if content.strip() not in text or _CONTINUE_TAG.strip() not in text:
        raise ChatTemplateError("continue_final_message: the chat template does not write the "
                                "final message's content as it is, so it cannot be continued")
    at = text.rindex(_CONTINUE_TAG.strip())
    return text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()


def compile_template(source: str) -> jinja2.Template:
    """Compile once, in the sandboxed environment transformers' _compile_jinja_template builds."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_TemplateDict(), namespace=_TemplateNamespace)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e}") from e


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Not jinja's tojson, which escapes HTML characters.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` in templates, without exposing the type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore attributes (a path to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # jinja's signature trick: self in args
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in
    transformers; for serving it renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: jinja2.runtime.Macro) -> str:
        return caller()


def _plain(value: Any) -> Any:
    """Plain JSON-like data (as transformers' _plain_template_data): a template sees no object
    whose methods the sandbox does not know about."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (str, int, float):  # subclasses (enums, ...) back to the base type
        if isinstance(value, base):
            return getattr(base, f"__{base.__name__}__")(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _template_messages(messages: list[dict]) -> list[dict]:
    """Messages as transformers hands them to the template: keys whose value is None dropped,
    reasoning copied to both `thinking` and `reasoning_content`."""
    out = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"a chat message must be an object, got {message!r}")
        message = _plain({k: v for k, v in message.items() if v is not None})
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None),
                         None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out
