"""Chat prompts: render a GGUF `tokenizer.chat_template` (Jinja2) the way HF transformers does.

Templates come from model files, i.e. from strangers. They run in Jinja's immutable sandbox (no
attribute starting with an underscore, no mutation of the passed-in messages) inside a worker
process with a time and memory budget (template_sandbox.py says why a process: `9 ** 10**9` is one
C call). Every failure, whether a syntax error, a sandbox violation, the budget running out or the
template's own `raise_exception`, surfaces as a one-line `ChatTemplateError`.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import select
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import template_sandbox as sandbox
from .gguf.constants import Keys

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 30.0  # a loaded machine may take seconds to start a Python process

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
    """A chat template failed to compile or render, ran past its time or memory budget, or refused the
    conversation. The message is one line and names the template line when it is known."""


class _Worker:
    """The process rendering templates (template_sandbox.serve), started on first use and restarted
    after a render that killed it or was stopped."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.owner = os.getpid()  # a forked child must not share its parent's worker
        self.lock = threading.Lock()
        self.unavailable = os.name != "posix"  # no select() on pipes elsewhere: render in-process

    def _start(self) -> None:
        code = ("import sys; sys.path[:] = sys.argv[1:2] + [p for p in sys.path if p not in ('', '.')]; "
                "from pyggml.template_sandbox import serve; serve()")
        package_parent = str(Path(__file__).resolve().parent.parent)
        self.proc = subprocess.Popen([sys.executable, "-c", code, package_parent], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, bufsize=0, close_fds=True,
                                     start_new_session=True)  # the terminal's Ctrl-C is for us, not it
        if self._read(1, time.monotonic() + STARTUP_TIMEOUT_S) != sandbox.READY:
            raise OSError("the template worker did not start")

    def stop(self) -> None:
        if self.proc is not None and self.owner == os.getpid():
            self.proc.kill()
            self.proc.wait()
            for f in (self.proc.stdin, self.proc.stdout):
                f.close()
            self.proc = None

    def _read(self, n: int, deadline: float) -> bytes | None:
        """n bytes from the worker, or None if it died or the deadline passed."""
        fd, data = self.proc.stdout.fileno(), b""
        while len(data) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, min(n - len(data), 1 << 20))
            if not chunk:
                return None
            data += chunk
        return data

    def render(self, payload: bytes, time_limit: float, max_chars: int) -> str:
        with self.lock:
            try:
                return self._exchange(payload, time_limit, max_chars)
            except BaseException:
                self.stop()  # stopped, crashed, or interrupted mid-answer: the next render starts afresh
                raise

    def _exchange(self, payload: bytes, time_limit: float, max_chars: int) -> str:
        if self.owner != os.getpid():
            self.proc, self.owner = None, os.getpid()
        for attempt in (0, 1):
            if self.proc is None:
                self._start()
            try:
                self.proc.stdin.write(sandbox.LENGTH.pack(len(payload)) + payload)
                break
            except BrokenPipeError:  # it exited after its last answer
                self.stop()
                if attempt:
                    raise
        deadline = time.monotonic() + time_limit + sandbox.KILL_GRACE_S
        head = self._read(1 + sandbox.LENGTH.size, deadline)
        if head is None:
            if time.monotonic() >= deadline:
                raise ChatTemplateError(f"chat template took longer than {time_limit:g} s to render; stopped")
            raise ChatTemplateError("chat template crashed the renderer (out of memory or stack)")
        status, n = head[:1], sandbox.LENGTH.unpack(head[1:])[0]
        if status not in (sandbox.OK, sandbox.ERROR, sandbox.ERROR_EXITING) or n > 4 * max_chars + 4096:
            raise ChatTemplateError("the chat template renderer sent a malformed answer")
        data = self._read(n, deadline)
        if data is None:
            raise ChatTemplateError(f"chat template took longer than {time_limit:g} s to render; stopped")
        text = data.decode("utf-8", "surrogatepass")
        if status != sandbox.OK:
            if status == sandbox.ERROR_EXITING:
                self.stop()
            raise ChatTemplateError(text)
        return text


_worker = _Worker()
atexit.register(_worker.stop)


def _render_in_process(template: str, variables: dict[str, Any]) -> str:
    try:
        return sandbox.render(template, variables)
    except sandbox.TemplateFailure as e:
        raise ChatTemplateError(str(e)) from None


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
    are passed to the template as transformers' apply_chat_template passes its kwargs. Rendered
    in a worker process within template_sandbox's budget: TIME_LIMIT_S, MEMORY_BUDGET, MAX_OUTPUT_CHARS.
    """
    source = template if template is not None else LLAMA2_CHAT_TEMPLATE
    variables = dict(variables, messages=messages, bos_token=bos_token, eos_token=eos_token,
                     add_generation_prompt=add_generation_prompt)
    if len(source) > sandbox.MAX_TEMPLATE_CHARS:
        raise ChatTemplateError(f"chat template is {len(source):,} characters, more than the "
                                f"{sandbox.MAX_TEMPLATE_CHARS:,} allowed")
    if not _worker.unavailable:
        try:
            payload = pickle.dumps((source, variables, sandbox.TIME_LIMIT_S, sandbox.MAX_OUTPUT_CHARS))
        except Exception as e:  # noqa: BLE001 - whatever pickle refuses
            raise ChatTemplateError(f"chat template variables cannot be passed to the renderer: {e}") from None
        try:
            return _worker.render(payload, sandbox.TIME_LIMIT_S, sandbox.MAX_OUTPUT_CHARS)
        except OSError as e:
            _worker.unavailable = True
            logger.warning("cannot start the chat template worker (%s); rendering without a time or memory budget", e)
    return _render_in_process(source, variables)


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
