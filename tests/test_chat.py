import pytest

from pyggml.chat import (
    LLAMA2_CHAT_TEMPLATE,
    ChatTemplateError,
    chat_template_of,
    render_chat,
    strip_leading_bos,
)
from pyggml.gguf.constants import Keys

BOS, EOS = "<s>", "</s>"

# HuggingFaceH4/zephyr-7b-beta's tokenizer_config.json chat_template (JSON "\n" decoded). Its
# block tags end lines, so it relies on trim_blocks; its expression lines keep their newline.
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>
'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""

# ChatML as in many Qwen / OpenHermes files (one line, newlines as Jinja string escapes).
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
    " + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CONVO = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "2+2?"},
]


# ---------------------------------------------------------------------------- llama-2 fallback
def test_fallback_system_and_user():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    assert render_chat(msgs, None, BOS, EOS) == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHello [/INST]"


def test_fallback_multi_turn():
    expected = (
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi [/INST] Hello. </s>"
        "<s>[INST] 2+2? [/INST]"
    )
    assert render_chat(CONVO, None, BOS, EOS) == expected
    assert render_chat(CONVO, LLAMA2_CHAT_TEMPLATE, BOS, EOS) == expected


def test_fallback_without_system_strips_content():
    msgs = [{"role": "user", "content": "  Hi  "}, {"role": "assistant", "content": "Yo\n"}]
    assert render_chat(msgs, None, BOS, EOS) == "<s>[INST] Hi [/INST] Yo </s>"


def test_fallback_rejects_non_alternating_roles():
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="alternate"):
        render_chat(msgs, None, BOS, EOS)


# ---------------------------------------------------------------------------- other templates
def test_zephyr_renders_as_transformers_does():
    # the string transformers' apply_chat_template(tokenize=False) gives for this template
    expected = (
        "<|system|>\nYou are terse.</s>\n<|user|>\nHi</s>\n<|assistant|>\nHello.</s>\n"
        "<|user|>\n2+2?</s>\n<|assistant|>\n"
    )
    assert render_chat(CONVO, ZEPHYR, BOS, EOS) == expected
    # lstrip_blocks: indentation before block tags (only) disappears too
    indented = "\n".join("    " + ln if ln.startswith("{%") else ln for ln in ZEPHYR.split("\n"))
    assert indented != ZEPHYR
    assert render_chat(CONVO, indented, BOS, EOS) == expected


def test_add_generation_prompt_toggles_assistant_header():
    on = render_chat(CONVO[:2], CHATML, BOS, EOS, add_generation_prompt=True)
    off = render_chat(CONVO[:2], CHATML, BOS, EOS, add_generation_prompt=False)
    body = "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert off == body
    assert on == body + "<|im_start|>assistant\n"
    assert render_chat(CONVO[:2], ZEPHYR, BOS, EOS, add_generation_prompt=False).endswith("Hi</s>\n")


def test_tojson_does_not_html_escape_and_extra_variables_pass_through():
    tpl = "{{ tools | tojson }}|{{ messages[0] | tojson(indent=1) }}"
    out = render_chat([{"role": "user", "content": "<a & 'b'>"}], tpl, BOS, EOS, tools=[{"name": "é"}])
    assert out == '[{"name": "é"}]|{\n "role": "user",\n "content": "<a & \'b\'>"\n}'


def test_strftime_now_and_loopcontrols():
    tpl = (
        "{{ strftime_now('%Y') | length }}"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}x{% endfor %}"
    )
    assert render_chat(CONVO, tpl, BOS, EOS) == "4x"


# ---------------------------------------------------------------------------------- errors
def test_raise_exception_raises_chat_template_error():
    tpl = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from user') }}{% endif %}"
    with pytest.raises(ChatTemplateError, match="first message must be from user"):
        render_chat(CONVO, tpl, BOS, EOS)


def test_syntax_error_names_the_line():
    with pytest.raises(ChatTemplateError, match="syntax error at line 2"):
        render_chat(CONVO, "ok\n{% for m in messages %}", BOS, EOS)


def test_runtime_error_in_template_is_wrapped():
    with pytest.raises(ChatTemplateError, match="failed to render"):
        render_chat(CONVO, "{{ messages[0]['content'] + 1 }}", BOS, EOS)
    with pytest.raises(ChatTemplateError, match="failed to render"):
        render_chat(CONVO, "{{ nothing.here.at_all }}", BOS, EOS)


@pytest.mark.parametrize(
    "tpl",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{{ raise_exception.__globals__['__builtins__'] }}",
        "{% set _ = messages.append({'role': 'user', 'content': 'injected'}) %}",
        "{% set _ = messages[0].update({'content': 'changed'}) %}",
    ],
)
def test_sandbox_blocks_escapes_and_mutation(tpl):
    msgs = [dict(m) for m in CONVO]
    with pytest.raises(ChatTemplateError, match="sandbox forbids"):
        render_chat(msgs, tpl, BOS, EOS)
    assert msgs == CONVO


# --------------------------------------------------------------------------------- helpers
def test_strip_leading_bos():
    assert strip_leading_bos("<s>[INST] hi", "<s>") == ("[INST] hi", True)
    assert strip_leading_bos("<s><s>x", "<s>") == ("<s>x", True)  # only one
    assert strip_leading_bos("[INST] <s>", "<s>") == ("[INST] <s>", False)
    assert strip_leading_bos("<s>x", "") == ("<s>x", False)


def test_fallback_output_starts_with_bos_once():
    text, had_bos = strip_leading_bos(render_chat(CONVO, None, BOS, EOS), BOS)
    assert had_bos and not text.startswith(BOS)


def test_chat_template_of_metadata():
    assert chat_template_of({Keys.CHAT_TEMPLATE: CHATML}) == CHATML
    assert chat_template_of({}) is None
    assert chat_template_of({Keys.CHAT_TEMPLATE: ""}) is None
    with pytest.raises(ChatTemplateError, match=Keys.CHAT_TEMPLATE):
        chat_template_of({Keys.CHAT_TEMPLATE: 3})
