"""llama.cpp's llama-cli spellings work in `pyggml run`: multi-letter single-dash options are whole
names (-cnv is not -c nv), GPU/flash-attention flags are accepted, no-network flags say so."""
import subprocess
import sys

import pytest

CMD = [sys.executable, "-m", "pyggml", "run"]


def _run(args, stdin="", timeout=300):
    return subprocess.run(CMD + args, input=stdin, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def model(stories_f32):
    return str(stories_f32)


def test_llama_cpp_chat_spellings(model):
    r = _run(["-m", model, "-cnv", "-sys", "You tell stories.", "-n", "6", "--temp", "0", "-fa", "off", "-ngl", "0"],
             "Hello\n/help\n/bye\nnot read\n")
    assert r.returncode == 0, r.stderr
    assert "/bye" in r.stderr and "Traceback" not in r.stderr  # /help printed the commands
    assert r.stdout.strip()  # one streamed answer


def test_prompt_flags_e_r_ignore_eos_color(model, stories_dir):
    ref = (stories_dir / "reference_greedy.txt").read_text(encoding="utf-8")
    r = _run(["-m", model, "-p", "Once upon a time", "-n", "252", "--temp", "0", "-c", "0", "-fa"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == ref  # default sampling settings + temp 0 = the reference, byte for byte
    r = _run(["-m", model, "-e", "-p", "Once upon\\ta time", "-n", "40", "--temp", "0", "-r", "Lily", "--ignore-eos"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon\ta time") and "Lily" not in r.stdout


@pytest.mark.parametrize("flag", ["-ngl all", "-ngl auto", "-ngl 99", "-fa on", "-fa auto"])
def test_gpu_flags_accepted(model, flag):
    r = _run(["-m", model, "-p", "Hi", "-n", "2", "--temp", "0"] + flag.split())
    assert r.returncode == 0, r.stderr


def test_unknown_and_network_flags_are_clear_errors(model):
    r = _run(["-m", model, "-xyz", "-p", "Hi"])
    assert r.returncode == 2 and "No such option '-xyz'" in r.stderr
    r = _run(["-hf", "org/model-GGUF"])
    assert r.returncode == 1 and "no network" in r.stderr and "Traceback" not in r.stderr
    r = _run(["--version"])
    assert r.returncode == 0 and r.stdout.startswith("pyggml ")
    r = _run(["-m", model, "-c", "2048", "-p", "Hi", "-n", "1"])
    assert r.returncode == 0 and "exceeds the 512" in r.stderr


def test_grammar_and_json_schema_flags(model, tmp_path):
    pytest.importorskip("llguidance")
    r = _run(["-m", model, "-p", "Answer:", "-n", "10", "--grammar", 'root ::= "yes" | "no"'])
    assert r.returncode == 0, r.stderr
    assert r.stdout in ("Answer:yes\n", "Answer:no\n")
    g = tmp_path / "g.gbnf"
    g.write_text('root ::= [0-9] [0-9] "!"\n')
    r = _run(["-m", model, "-p", "N:", "-n", "10", "--grammar-file", str(g)])
    assert r.returncode == 0 and r.stdout[2:5].isascii() and r.stdout.rstrip().endswith("!")
    r = _run(["-m", model, "-p", "J:", "-n", "60", "-s", "1", "--json-schema",
              '{"type":"object","properties":{"a":{"type":"integer","minimum":0,"maximum":9}},"required":["a"],'
              '"additionalProperties":false}'])
    import json
    assert r.returncode == 0 and 0 <= json.loads(r.stdout[2:])["a"] <= 9
    r = _run(["-m", model, "-p", "x", "--grammar", "root ::= ("])
    assert r.returncode == 1 and "grammar" in r.stderr and "Traceback" not in r.stderr


def test_chat_context_shift_keeps_going(model):
    """A chat longer than the context drops its oldest turns instead of refusing the later ones."""
    lines = "".join(f"Tell me about the {w} please\n" for w in ("cat", "dog", "bird", "fish", "tree", "sun"))
    r = _run(["-m", model, "-c", "96", "-n", "20", "--temp", "0", "-sys", "Be brief."], lines)
    assert r.returncode == 0, r.stderr
    assert "context shift" in r.stderr and "/clear to start over" not in r.stderr


def test_inspect_json_and_llama_quantize_order(model, tmp_path):
    import json

    r = subprocess.run([sys.executable, "-m", "pyggml", "inspect", "--json", model], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["version"] == 3 and info["metadata"]["general.architecture"] == "llama"
    assert {t["name"] for t in info["tensors"]} >= {"token_embd.weight", "output_norm.weight"}
    out = tmp_path / "s-q8.gguf"
    r = subprocess.run([sys.executable, "-m", "pyggml", "quantize", model, str(out), "Q8_0", "4"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and out.is_file(), r.stderr
    r = subprocess.run([sys.executable, "-m", "pyggml", "quantize", model, "Q9_9"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Q9_9" in r.stderr
