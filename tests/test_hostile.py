"""Hostile and broken input ends in a clean one-line typed error (issue 23): chat templates within a time
and memory budget, session files, HF checkpoints, and the CLI's handling of every error."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from pyggml import chat, template_sandbox
from pyggml.boundedjson import JSONLimitError, json_depth, loads
from pyggml.chat import ChatTemplateError, render_chat
from pyggml.cli import main
from pyggml.convert import ConversionError, convert_hf_to_gguf
from pyggml.session import SessionError, check_writable, session_messages

from test_convert import build_tiny_llama
from test_convert_archs import build, needs_vocab

CMD = [sys.executable, "-m", "pyggml"]
DEEP = 200_000


def one_line(message: str) -> None:
    assert message and "\n" not in message and "Traceback" not in message, message


# ------------------------------------------------------------------------------ bounded JSON
def test_json_depth_ignores_brackets_in_strings():
    assert json_depth(b'{"a": "\\"[[[", "b": [1]}') == 2
    assert json_depth(b'["\\\\", [[1]]]') == 3  # an escaped backslash does not escape the quote after it
    assert json_depth(b'"[[[{{{"') == 0 and json_depth(b"{}") == 1
    assert loads(b'{"k": [[[1]]]}', 100, 4) == {"k": [[[1]]]}
    with pytest.raises(JSONLimitError, match="200000 levels deep"):
        loads(b"[" * DEEP + b"]" * DEEP, 1 << 20, 64)
    with pytest.raises(JSONLimitError, match="more than the 10"):
        loads(b"[1, 2, 3, 4, 5]", 10, 64)


# ------------------------------------------------------------------------------ chat templates
M = [{"role": "user", "content": "hi"}]


@pytest.fixture
def short_budget(monkeypatch):
    monkeypatch.setattr(template_sandbox, "TIME_LIMIT_S", 1.0)


def render_fails(template: str, *phrases: str, seconds: float = 4.0) -> str:
    t0 = time.perf_counter()
    with pytest.raises(ChatTemplateError) as e:
        render_chat(M, template, "<s>", "</s>")
    assert time.perf_counter() - t0 < seconds
    one_line(str(e.value))
    for phrase in phrases:
        assert phrase in str(e.value), (phrase, str(e.value))
    return str(e.value)


@pytest.mark.parametrize("template,phrases", [
    ("a\n{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     ("longer than 1 s", "at line 2")),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}", ("longer than 1 s",)),
    ("\n{{ 9 ** 999999999 }}", ("longer than 1 s",)),
])
def test_template_time_budget(short_budget, template, phrases):
    render_fails(template, *phrases)
    assert render_chat(M, "{{ messages[0].content }}", "", "") == "hi"  # the next render works


@pytest.mark.parametrize("template,phrases", [
    ("{{ '%999999999d'|format(1) }}", ("memory budget", "at line 1")),
    ("\n{{ '%999999999d' % 1 }}", ("memory budget", "at line 2")),
    ("{{ 'a' * 3000000000 }}", ("memory budget",)),
    ("{{ 'a' * 3e9 }}", ("TypeError",)),
    ("{% set ns = namespace(x='ab') %}{% for i in range(60) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}",
     ("memory budget",)),
    ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", ("output exceeds",)),
    ("{{ range(10**12) | list }}", ("Range too big", "at line 1")),
])
def test_template_memory_budget(template, phrases):
    render_fails(template, *phrases)
    assert render_chat(M, "{{ messages[0].content }}", "", "") == "hi"


@pytest.mark.parametrize("template,phrases", [
    ("{{ " + "(" * 100_000 + "1" + ")" * 100_000 + " }}", ("nested too deeply",)),
    ("{{ 1" + "0" * 5000 + " }}", ("cannot be compiled", "ValueError")),
    ("{% for m in messages %}" * 30 + "{% endfor %}" * 30, ("cannot be compiled", "nested blocks")),
    ("x\n{% macro f() %}{{ f() }}{% endmacro %}\n{{ f() }}", ("recursed too deeply", "at line 2")),
    ("{% set ns = namespace(x=[]) %}{% for i in range(100000) %}{% set ns.x = [ns.x] %}{% endfor %}{{ ns.x }}",
     ("recursed too deeply",)),
    ("{{ lipsum(n=10**9) }}", ("undefined",)),
    ("x" * (template_sandbox.MAX_TEMPLATE_CHARS + 1), ("characters",)),
])
def test_template_nesting_and_literals(template, phrases):
    render_fails(template, *phrases)


def test_template_renders_exactly_as_in_process():
    tpl = "{% for m in messages %}[{{ m.role }}|{{ m.content }}]{% endfor %}{{ '\\ud800'|length }}é"
    msgs = [{"role": "user", "content": "a\u0000b\U0001f600"}, {"role": "assistant", "content": "\ud800"}]
    assert render_chat(msgs, tpl, "", "") == chat._render_in_process(tpl, {"messages": msgs, "bos_token": "",
                                                                          "eos_token": "", "add_generation_prompt": True})


def test_template_worker_killed_between_renders_is_restarted():
    render_chat(M, "{{ 1 }}", "", "")
    chat._worker.proc.kill()
    chat._worker.proc.wait()
    assert render_chat(M, "{{ 2 }}", "", "") == "2"


# ------------------------------------------------------------------------------ converter
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("hostile") / "tiny"
    build_tiny_llama(d, sharded=False)
    return d


@pytest.fixture
def tiny(tiny_dir, tmp_path) -> Path:
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    return d


def convert_fails(d: Path, *phrases: str) -> str:
    out = d.parent / "out"
    out.mkdir(exist_ok=True)
    with pytest.raises(ConversionError) as e:
        convert_hf_to_gguf(d, out / "x.gguf", outtype="f32")
    one_line(str(e.value))
    for phrase in phrases:
        assert phrase in str(e.value), (phrase, str(e.value))
    assert list(out.iterdir()) == []
    return str(e.value)


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(changes)
    path.write_text(json.dumps(data))


DEEP_JSON = '{"a": ' + "[" * DEEP + "]" * DEEP + "}"


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json", "special_tokens_map.json"])
def test_deeply_nested_json_files(tiny, name):
    (tiny / name).write_text(DEEP_JSON)
    convert_fails(tiny, name, "levels deep")


def test_deeply_nested_tokenizer_json(tiny):
    (tiny / "tokenizer.model").unlink()
    (tiny / "tokenizer.json").write_text(DEEP_JSON)
    convert_fails(tiny, "tokenizer.json", "levels deep")


@needs_vocab
def test_deeply_nested_generation_config(tmp_path):
    build(tmp_path / "m", "llama31")  # a BPE checkpoint: only its tokenizer path reads generation_config.json
    (tmp_path / "m" / "generation_config.json").write_text(DEEP_JSON)
    convert_fails(tmp_path / "m", "generation_config.json", "levels deep")


def test_deeply_nested_safetensors_header_and_index(tiny):
    header = b'{"a": ' + b"[" * DEEP + b"]" * DEEP + b"}"
    (tiny / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    convert_fails(tiny, "model.safetensors", "levels deep")
    (tiny / "model.safetensors.index.json").write_text(DEEP_JSON)
    convert_fails(tiny, "model.safetensors.index.json", "levels deep")


@pytest.mark.parametrize("field,value", [
    ("rope_theta", "10000"), ("rope_theta", [1.0]), ("rms_norm_eps", "1e-6"), ("rms_norm_eps", None),
    ("architectures", 5), ("architectures", [5]), ("num_hidden_layers", 10**9), ("num_hidden_layers", "2"),
    ("hidden_size", 10**12), ("vocab_size", 2**40), ("tie_word_embeddings", "false"), ("max_position_embeddings", 1e300),
    ("rope_scaling", "linear"), ("num_attention_heads", 0),
])
def test_config_fields_checked(tiny, field, value):
    if value is None:  # NaN, which Python's json reads
        text = (tiny / "config.json").read_text()
        (tiny / "config.json").write_text(text.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": NaN'))
        assert "NaN" in (tiny / "config.json").read_text()
    else:
        edit_json(tiny / "config.json", **{field: value})
    convert_fails(tiny, "config.json", field)


@pytest.mark.parametrize("entry", ["<|im_end|>", 5, ["x"], {"content": 7}, {"content": "x", "special": "yes"}])
def test_added_tokens_decoder_entries_checked(tiny, entry):
    edit_json(tiny / "tokenizer_config.json", added_tokens_decoder={"301": entry})
    convert_fails(tiny, "added_tokens_decoder")


@pytest.mark.parametrize("changes", [
    {"added_tokens_decoder": ["x"]}, {"add_bos_token": "false"}, {"eos_token": ["x"]},
    {"chat_template": [{"name": ["default"], "template": "x"}]}, {"chat_template": 5},
])
def test_tokenizer_config_fields_checked(tiny, changes):
    edit_json(tiny / "tokenizer_config.json", **changes)
    convert_fails(tiny, "tokenizer_config.json", next(iter(changes)))


def safetensors_with(path: Path, entries: dict, data_size: int) -> None:
    header = json.dumps(entries).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(data_size))


def test_safetensors_overlapping_tensors(tiny):
    safetensors_with(tiny / "model.safetensors", {
        "model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]},
        "model.layers.0.input_layernorm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [128, 384]},
    }, 384)
    convert_fails(tiny, "model.safetensors", "overlap")


def test_safetensors_tensor_past_the_data(tiny):
    safetensors_with(tiny / "model.safetensors", {
        "model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [256, 512]},
    }, 384)
    convert_fails(tiny, "model.safetensors", "outside")


# ------------------------------------------------------------------------------ sessions
@pytest.fixture(scope="module")
def model(stories_dir, tmp_path_factory) -> str:
    return str(convert_hf_to_gguf(stories_dir, tmp_path_factory.mktemp("hostile-run") / "s-f32.gguf", outtype="f32"))


@pytest.fixture(scope="module")
def saved_session(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("session") / "chat.session"
    r = CliRunner().invoke(main, ["run", "-m", model, "-n", "4", "--temp", "0", "--session", str(path)], input="Hi\n")
    assert r.exit_code == 0, r.output
    return path


def with_header(src: Path, dst: Path, header: bytes | None = None, **changes) -> Path:
    """A copy of session `src` with its JSON header replaced (or changed), the data kept."""
    raw = src.read_bytes()
    hlen = struct.unpack("<Q", raw[12:20])[0]
    if header is None:
        h = json.loads(raw[20:20 + hlen])
        for k, v in changes.items():
            if k.startswith("extra."):
                h["extra"][k[6:]] = v
            else:
                h[k] = v
        header = json.dumps(h).encode()
    dst.write_bytes(raw[:12] + struct.pack("<Q", len(header)) + header + raw[20 + hlen:])
    return dst


def run_session(model: str, session: Path, stdin: str = "/clear\nHi\n") -> str:
    r = subprocess.run(CMD + ["run", "-m", model, "-n", "2", "--temp", "0", "--session", str(session)], input=stdin,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, r.stderr
    return errors[0]


def test_session_deeply_nested_header(model, saved_session, tmp_path):
    bad = with_header(saved_session, tmp_path / "deep.session", b'{"extra": ' + b"[" * DEEP + b"]" * DEEP + b"}")
    assert "levels deep" in run_session(model, bad)


@pytest.mark.parametrize("changes", [
    {"extra.messages": 5}, {"extra.messages": [1]}, {"extra.messages": [{"role": 1, "content": "x"}]},
    {"extra.messages": [{"role": "user"}]}, {"extra.messages": [{"role": "user", "content": ["x"]}]},
])
def test_session_malformed_messages(model, saved_session, tmp_path, changes):
    bad = with_header(saved_session, tmp_path / "bad.session", **changes)
    assert "extra.messages" in run_session(model, bad)


@pytest.mark.parametrize("changes", [
    {"tokens": "abc"}, {"tokens": [1.5]}, {"tokens": [True]}, {"n_ctx": "4096"}, {"fingerprint": 3},
    {"has_logits": 1}, {"extra": []},
])
def test_session_header_fields_typed(saved_session, tmp_path, changes):
    from pyggml.session import _header_fields

    bad = with_header(saved_session, tmp_path / "bad.session", **changes)
    hlen = struct.unpack("<Q", bad.read_bytes()[12:20])[0]
    with pytest.raises(SessionError, match=next(iter(changes))):
        _header_fields(json.loads(bad.read_bytes()[20:20 + hlen]), bad)
    with pytest.raises(SessionError, match="expected an object"):
        _header_fields([], bad)


def test_session_messages_valid():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert session_messages({"messages": msgs}, "p") == msgs and session_messages({}, "p") == []


def test_session_unwritable_path_fails_before_loading(tmp_path):
    not_a_model = tmp_path / "model.gguf"
    not_a_model.write_bytes(b"not a model")
    blocker = tmp_path / "file"
    blocker.write_text("")
    unwritable = [blocker / "s.session", tmp_path] + ([Path("/proc/pyggml-test.session")] if Path("/proc/self").is_dir() else [])
    for session in unwritable:
        with pytest.raises(SessionError):
            check_writable(session)
        if session.is_dir():
            continue  # click refuses a directory itself (dir_okay=False)
        r = subprocess.run(CMD + ["run", "-m", str(not_a_model), "--session", str(session)], input="Hi\n",
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert "session" in r.stderr and "GGUF" not in r.stderr, r.stderr  # refused before the model was read
    check_writable(tmp_path / "new" / "dir" / "s.session")  # directories are created by the save
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "model.gguf"]  # no temp file left behind


def test_session_saved_atomically(model, saved_session):
    assert saved_session.is_file()
    assert [p.name for p in saved_session.parent.iterdir()] == [saved_session.name]


def test_chat_template_error_in_cli(model, tmp_path):
    evil = tmp_path / "evil.jinja"
    evil.write_text("{% for m in messages %}\n{{ '%999999999d' % 1 }}{% endfor %}")
    r = subprocess.run(CMD + ["run", "-m", model, "--chat-template", str(evil)], input="Hi\n", capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "Error: chat template ran out of its memory budget (512 MiB) at line 2" in r.stderr


# ------------------------------------------------------------------------------ the CLI entry
def cli_raising(exc: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`pyggml [args] inspect F` where reading F raises `exc` (a Python expression)."""
    code = ("import sys, pyggml.gguf\n"
            "def boom(*a, **k):\n"
            f"    raise {exc}\n"
            "pyggml.gguf.GGUFFile = boom\n"
            "from pyggml.cli import main\n"
            "sys.argv = ['pyggml'] + sys.argv[1:]\n"
            "main()\n")
    return subprocess.run([sys.executable, "-c", code, *args, "inspect", __file__], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, **(env or {})))


@pytest.mark.parametrize("exc,message", [
    ("__import__('pyggml.model', fromlist=['x']).ModelError('bad\\nkey \\x1b[2J')", "Error: bad key \\x1b[2J"),
    ("__import__('pyggml.session', fromlist=['x']).SessionError('s')", "Error: s"),
    ("__import__('pyggml.chat', fromlist=['x']).ChatTemplateError('t')", "Error: t"),
    ("__import__('pyggml.convert', fromlist=['x']).ConversionError('c')", "Error: c"),
    ("__import__('pyggml.kvfile', fromlist=['x']).KVFileError('k')", "Error: k"),
    ("PermissionError(13, 'Permission denied', 'f')", "Error: [Errno 13] Permission denied: 'f'"),
    ("MemoryError()", "Error: out of memory"),
])
def test_cli_pyggml_errors_are_one_line(exc, message):
    r = cli_raising(exc)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [message], r.stderr


def test_cli_unexpected_error_hints_at_debug():
    r = cli_raising("TypeError('x is not y')")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.splitlines() == ["Error: unexpected TypeError: x is not y",
                                     "(this is a bug in pyggml; rerun with --debug for the traceback)"]
    for r in (cli_raising("TypeError('x is not y')", "--debug"),
              cli_raising("TypeError('x is not y')", env={"PYGGML_DEBUG": "1"})):
        assert r.returncode == 1 and "Traceback" in r.stderr and "TypeError: x is not y" in r.stderr


def test_cli_debug_shows_traceback_of_a_failed_command(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(20))
    plain = subprocess.run(CMD + ["inspect", str(bad)], capture_output=True, text=True, timeout=60)
    debug = subprocess.run(CMD + ["--debug", "inspect", str(bad)], capture_output=True, text=True, timeout=60)
    assert plain.returncode == debug.returncode == 1
    assert "Traceback" not in plain.stderr and len(plain.stderr.splitlines()) == 1
    assert "Traceback" in debug.stderr and debug.stderr.splitlines()[-1] == plain.stderr.splitlines()[0]


def test_cli_keyboard_interrupt_exits_130_quietly():
    r = cli_raising("KeyboardInterrupt")
    assert r.returncode == 130 and r.stderr == "" and r.stdout == ""
