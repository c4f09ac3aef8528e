"""Chat templates compiled and rendered in Jinja's immutable sandbox, and the worker process that
renders them under a time and memory budget.

Templates come from model files, i.e. from strangers. The sandbox keeps them away from Python's
internals and from mutating their inputs, but bounds neither time nor memory: `9 ** 10**9`,
`'%999999999d' % 1` and `'a' * 3000000000` are one C call each, which no check between bytecodes can
interrupt. So `chat.render_chat` sends each render to `serve`, a small process of its own whose
address space is capped (RLIMIT_AS), whose render has a deadline (SIGALRM, which stops template loops
with the template line) and which the caller kills when a single C call outlives the deadline.

This module imports nothing of pyggml's, so the worker starts in a few tens of milliseconds.
"""
from __future__ import annotations

import json
import os
import pickle
import signal
import struct
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

# The budget of one render. Real chat templates render in well under a millisecond, into the few MB
# a long context holds, from a template of tens of KB.
TIME_LIMIT_S = 5.0  # wall clock, per render (the caller kills the worker this much plus KILL_GRACE_S later)
KILL_GRACE_S = 2.0
MEMORY_BUDGET = 512 << 20  # bytes of address space the worker may add to what it has after start-up
MAX_TEMPLATE_CHARS = 1 << 20
MAX_OUTPUT_CHARS = 16 << 20
MAX_MESSAGE_CHARS = 300  # error messages are cut to this, on one line

# Worker protocol (pipes, little-endian): the caller sends u64 length + pickle((template, variables,
# time limit, max chars)); the worker answers a status byte + u64 length + UTF-8 text. The answer is
# never pickled: the caller does not unpickle what a process running hostile code sends.
READY, OK, ERROR, ERROR_EXITING = b"R", b"O", b"E", b"X"
LENGTH = struct.Struct("<Q")


class TemplateFailure(Exception):
    """A template failed to compile or render; the message is one line, meant for the user."""


class RenderTimeout(Exception):
    """Raised inside the template's code when the deadline passes (an Exception, so that Jinja
    rewrites the traceback and the template line is known)."""


def _raise_exception(message: str) -> None:
    raise TemplateFailure(f"chat template refused the conversation: {message}")


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # transformers replaces Jinja's tojson, which HTML-escapes <, >, & and ' in its output
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


def _template_line(exc: BaseException) -> int | None:
    """The template line an exception was raised at: Jinja rewrites tracebacks so that template code
    appears as frames of file "<template>" at template line numbers."""
    line, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The template as transformers' apply_chat_template compiles it; TemplateFailure if it cannot be."""
    if len(source) > MAX_TEMPLATE_CHARS:
        raise TemplateFailure(f"chat template is {len(source):,} characters, more than the {MAX_TEMPLATE_CHARS:,} allowed")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals.pop("lipsum", None)  # lipsum(n=10**9) is one long Python loop no template needs
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateFailure(_one_line(f"chat template has a syntax error at line {e.lineno}: {e.message}")) from None
    except RenderTimeout:
        raise TemplateFailure("chat template took too long to compile; stopped") from None
    except RecursionError:
        raise TemplateFailure("chat template cannot be compiled: it is nested too deeply") from None
    except MemoryError:
        raise TemplateFailure("chat template cannot be compiled: out of its memory budget") from None
    except SyntaxError as e:  # the Python Jinja generates breaks one of Python's limits (its line means nothing here)
        raise TemplateFailure(_one_line(f"chat template cannot be compiled: {e.msg}")) from None
    except Exception as e:  # noqa: BLE001 - huge literals (ValueError), Python's own limits (SyntaxError) ...
        raise TemplateFailure(_one_line(f"chat template cannot be compiled: {type(e).__name__}: {e}")) from None


def render(source: str, variables: dict[str, Any], max_chars: int = MAX_OUTPUT_CHARS) -> str:
    """Render `source` with `variables`; TemplateFailure (one line, with the template line when known)
    on any failure, the output cut off at `max_chars`. No time or memory bound of its own: see `serve`."""
    template = compile_template(source)
    pieces, n = [], 0
    try:
        for piece in template.generate(**variables):
            n += len(piece)
            if n > max_chars:
                raise TemplateFailure(f"chat template output exceeds {max_chars:,} characters; stopped")
            pieces.append(piece)
        return "".join(pieces)
    except TemplateFailure:
        raise
    except Exception as e:  # noqa: BLE001 - any failure is template code misbehaving on this input
        line = _template_line(e)
        at = f" at line {line}" if line is not None else ""
        if isinstance(e, SecurityError):
            what = f"chat template attempted an operation the sandbox forbids{at}: {e}"
        elif isinstance(e, RenderTimeout):
            what = f"chat template took longer than {e.args[0]:g} s to render{at}; stopped"
        elif isinstance(e, MemoryError):
            what = f"chat template ran out of its memory budget ({MEMORY_BUDGET >> 20} MiB){at}"
        elif isinstance(e, RecursionError):
            what = f"chat template failed to render{at}: it recursed too deeply"
        elif isinstance(e, jinja2.TemplateError):
            what = f"chat template failed to render{at}: {e}"
        else:
            what = f"chat template failed to render{at}: {type(e).__name__}: {e}"
        raise TemplateFailure(_one_line(what)) from None


# ------------------------------------------------------------------------------ the worker process
def _limit_memory(budget: int) -> None:
    """Cap the address space at its present size plus `budget` (Linux; elsewhere only the deadline holds)."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (size + budget, size + budget))
    except (ImportError, OSError, ValueError):
        pass


def _read_exact(f, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = f.read(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _on_alarm(signum, frame) -> None:
    raise RenderTimeout(_on_alarm.limit)


def serve() -> None:
    """The worker: answer render requests on stdin/stdout until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the caller, which stops us itself
    inp = os.fdopen(os.dup(0), "rb", buffering=0)
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)  # nothing else may write into the answer channel
    _limit_memory(MEMORY_BUDGET)
    signal.signal(signal.SIGALRM, _on_alarm)
    out.write(READY)
    while True:
        head = _read_exact(inp, LENGTH.size)
        if head is None:
            return
        payload = _read_exact(inp, LENGTH.unpack(head)[0])
        if payload is None:
            return
        status, exiting = OK, False
        try:
            try:
                source, variables, time_limit, max_chars = pickle.loads(payload)
                _on_alarm.limit = time_limit
                # fires again every 50 ms after the deadline, in case template code swallowed one
                signal.setitimer(signal.ITIMER_REAL, time_limit, 0.05)
                text = render(source, variables, max_chars)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except TemplateFailure as e:
            status, text = ERROR, str(e)
        except RenderTimeout:
            status, text = ERROR, f"chat template took longer than {_on_alarm.limit:g} s to render; stopped"
        except BaseException as e:  # noqa: BLE001 - e.g. unpicklable variables, or memory spent outside render
            status, text, exiting = ERROR_EXITING, _one_line(f"chat template renderer failed: {type(e).__name__}: {e}"), True
        if status is ERROR and ("memory budget" in text or "recursed too deeply" in text):
            status, exiting = ERROR_EXITING, True  # start the next render in a fresh process
        data = text.encode("utf-8", "surrogatepass")
        out.write(status + LENGTH.pack(len(data)) + data)
        if exiting:
            return


if __name__ == "__main__":
    serve()
