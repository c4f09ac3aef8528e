"""What the command line shows around the library: progress bars, the first-run notice while the
kernels compile, streamed text, llama.cpp-style timings, and the interactive chat loop of `pyggml run`."""
from __future__ import annotations

import sys

import click

from .cli_options import fail


class TqdmProgress:
    """Adapts a library progress callback (name, index, total) to a tqdm bar."""

    def __init__(self, desc: str):
        self.desc, self.bar = desc, None

    def __call__(self, name: str, index: int, total: int) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.desc, unit="tensor", leave=False, file=sys.stderr, disable=None)
        self.bar.set_postfix_str(name, refresh=False)
        self.bar.n = index
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


FIRST_RUN_NOTICE = "compiling the CPU kernels once; later runs start at once"


class FirstRunNotice:
    """Around loading a model: on a cold numba cache (a fresh install), says once on stderr that the
    kernels are being compiled, with a ticker on a terminal, and warm_up(llm) compiles them before any
    output; on a warm cache it does nothing and costs nothing."""

    shown = False  # once per process

    def __init__(self, type_k: str | None = None, type_v: str | None = None):
        self.kv_types = (type_k, type_v)  # the KV types the helper process compiles attention for

    def __enter__(self) -> "FirstRunNotice":
        from .kernels.jitcache import kernels_cold
        from .kernels.precompile import FirstRun

        self.active = not FirstRunNotice.shown and kernels_cold()
        self.thread = None
        self.compile = FirstRun(*self.kv_types, self.active).__enter__()  # a helper process compiles half
        if self.active:
            import threading
            import time

            FirstRunNotice.shown = True
            self.t0, self.done = time.perf_counter(), threading.Event()
            if sys.stderr.isatty():
                self.thread = threading.Thread(target=self._tick, daemon=True)
                self.thread.start()
            else:
                click.echo(FIRST_RUN_NOTICE, err=True)
        return self

    def _tick(self) -> None:
        import time

        from .kernels.jitcache import n_kernels_ready

        shown = ""
        while True:
            msg = f"\r{FIRST_RUN_NOTICE} [{n_kernels_ready()} kernels ready, {time.perf_counter() - self.t0:.0f} s]"
            if msg != shown:
                click.echo(msg, err=True, nl=False)
                shown = msg
            if self.done.wait(0.5):
                return

    def warm_up(self, llm) -> None:
        self.compile.warm_up(llm)

    def __exit__(self, *exc: object) -> None:
        self.compile.__exit__(*exc)  # a helper still running (a failed load) is stopped
        if self.thread is not None:
            import time

            self.done.set()
            self.thread.join()
            click.echo(f"\r\x1b[K{FIRST_RUN_NOTICE}: done in {time.perf_counter() - self.t0:.0f} s", err=True)


def print_timings(llm) -> None:
    t = llm.timings
    err = lambda s: click.echo(s, err=True)  # noqa: E731
    err("")
    err(f"load time        = {1000 * t.load_s:10.2f} ms")
    if t.prompt_tokens:
        err(f"prompt eval time = {1000 * t.prompt_s:10.2f} ms / {t.prompt_tokens:5d} tokens "
            f"({1000 * t.prompt_s / t.prompt_tokens:8.2f} ms per token, {t.prompt_tps:8.2f} tokens per second)")
    if t.gen_tokens:
        err(f"eval time        = {1000 * t.gen_s:10.2f} ms / {t.gen_tokens:5d} runs   "
            f"({1000 * t.gen_s / t.gen_tokens:8.2f} ms per token, {t.gen_tps:8.2f} tokens per second)")


def stream(pieces, into: list[str] | None = None) -> bool:
    """Print text pieces as they come (and collect them in `into`); Ctrl-C stops this answer only.
    Returns False if interrupted."""
    try:
        for piece in pieces:
            if into is not None:
                into.append(piece)
            click.echo(piece, nl=False)
            sys.stdout.flush()
    except KeyboardInterrupt:
        click.echo("\n[interrupted]", err=True)
        return False
    return True


CHAT_HELP = """commands:
  /help          this text
  /clear         forget the conversation (the system prompt stays)
  /exit, /bye    quit (Ctrl-D too); Ctrl-C stops the current answer"""


def read_line(tty: bool, color: bool) -> str | None:
    """One line of input, with line editing and history (readline) on a terminal; None at end of input."""
    if tty:
        try:
            import readline  # noqa: F401 - importing it gives input() editing and history
        except ImportError:
            pass
        try:
            return input("\x1b[32m> \x1b[0m" if color else "> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line if line else None


def chat_loop(llm, params, limit, system_prompt, stops, history, grammar=None, first=None, color=False) -> list:
    """The interactive loop: a line in, a streamed answer out. When the conversation outgrows the
    context, the oldest turns are dropped (the system prompt stays), as llama.cpp's context shift."""
    from .api import ContextFullError, GenerationState
    from .chat import ChatTemplateError

    messages = list(history or [])
    if not messages and system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    tty = sys.stdin.isatty()
    click.echo("[chat: type a message; /help lists commands; Ctrl-C stops an answer, /exit or Ctrl-D quits]", err=True)
    pending = first
    while True:
        if pending is not None:
            line, pending = pending, None
        else:
            try:
                line = read_line(tty, color)
            except KeyboardInterrupt:
                click.echo()
                break
            if line is None:
                break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit", "/bye"):
            break
        if line in ("/help", "/?"):
            click.echo(CHAT_HELP, err=True)
            continue
        if line == "/clear":
            messages = [m for m in messages if m["role"] == "system"]
            llm.reset()
            click.echo("[chat cleared]", err=True)
            continue
        messages.append({"role": "user", "content": line})
        answer: list[str] = []
        reserve = min(limit, max(16, llm.n_ctx() // 4))  # room kept for the answer when shifting

        def prompt_tokens():
            while True:
                ids = llm.chat_prompt_tokens(messages)
                system = 1 if messages and messages[0]["role"] == "system" else 0
                if len(ids) + reserve <= llm.n_ctx() or len(messages) - system <= 1:
                    return ids
                del messages[system]  # context shift: drop the oldest turn (user + answer), keep the system prompt
                while len(messages) - system > 1 and messages[system]["role"] != "user":
                    del messages[system]
                click.echo("[context shift: dropped the oldest turn]", err=True)

        def turn():  # rendering and prompt processing run inside stream, so Ctrl-C covers them too
            yield from llm.stream_text(prompt_tokens(), params, limit, stops, GenerationState(), grammar=grammar)

        try:
            finished = stream(turn(), answer)
        except ContextFullError as e:
            messages.pop()
            click.echo(f"[context full: {e}; /clear to start over]", err=True)
            continue
        except ChatTemplateError as e:
            fail(str(e))
        click.echo()
        messages.append({"role": "assistant", "content": "".join(answer)})
        if llm.context_full:
            click.echo(f"[context full: the answer was cut at {llm.n_ctx()} tokens]", err=True)
        if not finished:
            continue
        print_timings(llm)
    return messages
