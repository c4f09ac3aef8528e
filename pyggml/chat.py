"""Chat prompts: render a GGUF `tokenizer.chat_template` (Jinja2) the way HF transformers does.

Templates come from model files, i.e. from strangers, so they run in Jinja's immutable sandbox:
no attribute starting with an underscore, no mutation of the passed-in messages. Every failure,
whether a syntax error, a sandbox violation or the template's own `raise_exception`, surfaces as
`ChatTemplateError`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from .gguf.constants import Keys

logger = logging.getLogger(__name__)

# Llama-2 chat format, as in the Llama-2-chat tokenizer_config.json, used when a file has no template:
#   <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {assistant} </s><s>[INST] {user} [/INST]
# The format has no assistant header, so add_generation_prompt changes nothing.
LLAMA2_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content'] -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_message = none -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}"
    "{%- endif -%}"
    "{%- if loop.index0 == 0 and system_message is not none -%}"
    "{%- set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] -%}"
    "{%- else -%}"
    "{%- set content = message['content'] -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- bos_token + '[INST] ' + content.strip() + ' [/INST]' -}}"
    "{%- else -%}"
    "{{- ' ' + content.strip() + ' ' + eos_token -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


class ChatTemplateError(ValueError):
    """A chat template failed to compile or render, or refused the conversation."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template refused the conversation: {message}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # transformers replaces Jinja's tojson, which HTML-escapes <, >, & and ' in its output
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from None


def render_chat(
    messages: list[dict[str, Any]],
    template: str | None,
    bos_token: str,
    eos_token: str,
    add_generation_prompt: bool = True,
    **variables: Any,
) -> str:
    """Render `messages` ([{"role": ..., "content": ...}, ...]) with a Jinja chat template.

    `template` None (the file has none) uses the Llama-2 format. Extra `variables` (tools, ...)
    are passed to the template as transformers' apply_chat_template passes its kwargs.
    """
    compiled = _compile(template if template is not None else LLAMA2_CHAT_TEMPLATE)
    try:
        return compiled.render(
            messages=messages,
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except ChatTemplateError:
        raise
    except SecurityError as e:
        raise ChatTemplateError(f"chat template attempted an operation the sandbox forbids: {e}") from None
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed to render: {e}") from None
    except Exception as e:  # noqa: BLE001 - any other failure is template code misbehaving on this input
        raise ChatTemplateError(f"chat template failed to render: {type(e).__name__}: {e}") from None


def chat_template_of(metadata: Mapping[str, Any] | Any) -> str | None:
    """The chat template stored in GGUF metadata (a GGUFFile or its metadata dict), or None."""
    template = metadata.get(Keys.CHAT_TEMPLATE)
    if template is not None and not isinstance(template, str):
        raise ChatTemplateError(f"{Keys.CHAT_TEMPLATE} must be a string, got {type(template).__name__}")
    return template or None


def strip_leading_bos(text: str, bos_token: str) -> tuple[str, bool]:
    """Remove one leading `bos_token` from rendered text; returns (text, had_bos).

    Templates that write bos_token themselves would otherwise get a second BOS when the runtime
    also prepends the BOS id: strip it here, then prepend the id once if had_bos or add_bos.
    """
    if bos_token and text.startswith(bos_token):
        return text[len(bos_token):], True
    return text, False
