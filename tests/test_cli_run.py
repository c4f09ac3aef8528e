"""`pyggml run` as a user drives it: one-shot, piped chat, a pseudo-terminal with Ctrl-C, sessions."""
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

from pyggml.convert import convert_hf_to_gguf

CMD = [sys.executable, "-m", "pyggml"]


@pytest.fixture(scope="module")
def model(stories_dir, tmp_path_factory):
    return str(convert_hf_to_gguf(stories_dir, tmp_path_factory.mktemp("run") / "s-f32.gguf", outtype="f32"))


def test_one_shot_prompt_streams_reference_and_timings(model, stories_dir):
    ref = (stories_dir / "reference_greedy.txt").read_text(encoding="utf-8")
    r = subprocess.run(CMD + ["run", "-m", model, "-p", "Once upon a time", "-n", "252", "--temp", "0", "--repeat-penalty", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout == ref
    assert "prompt eval time" in r.stderr and "tokens per second" in r.stderr and "load time" in r.stderr


def test_piped_chat_and_session_restore(model, tmp_path):
    session = tmp_path / "chat.session"
    args = CMD + ["run", "-m", model, "-n", "12", "--temp", "0", "--session", str(session), "--system", "Be kind."]
    r = subprocess.run(args, input="Hello\nTell me a story\n", capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") >= 2 and "saved" in r.stderr and session.is_file()
    r2 = subprocess.run(args, input="/exit\n", capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0 and "restored" in r2.stderr
    r3 = subprocess.run(CMD + ["run", "-m", model, "-c", "64", "--session", str(session)], input="",
                        capture_output=True, text=True, timeout=300)
    assert r3.returncode == 1 and "context of" in r3.stderr and "Traceback" not in r3.stderr


def test_context_full_message_in_chat(model):
    r = subprocess.run(CMD + ["run", "-m", model, "-c", "48", "--temp", "0"], input="Hi\n", capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "context full" in r.stderr


def _read_until(fd, needle: bytes, timeout: float) -> bytes:
    buf, end = b"", time.time() + timeout
    while needle not in buf and time.time() < end:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_interactive_terminal_ctrl_c_stops_answer_not_program(model):
    pid, fd = pty.fork()
    if pid == 0:  # child: the CLI on a terminal, generating until the context is full
        os.execv(sys.executable, CMD + ["run", "-m", model, "-c", "512", "--temp", "0.8", "--seed", "1"])
    try:
        assert b"> " in _read_until(fd, b"> ", 120)
        os.write(fd, b"Tell me a long story\r")
        _read_until(fd, b"story\r\n", 30)  # the terminal's echo of the line
        _read_until(fd, b" ", 60)  # the answer has started streaming
        os.kill(pid, signal.SIGINT)
        out = _read_until(fd, b"> ", 60)
        assert b"[interrupted]" in out and out.rstrip().endswith(b">")  # back at the prompt
        os.write(fd, b"/exit\r")
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(fd)
