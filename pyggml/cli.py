"""The `pyggml` command line. Thin: it parses, calls the library, prints.

Heavy modules (numba, the model, tokenizers) are imported inside the commands that need
them so `pyggml --help` stays instant.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from .cli_options import KV_TYPE, LlamaCppCommand, fail, gpu_layers, int_list, kv_list, kv_options
from .console import FirstRunNotice, TqdmProgress, chat_loop, print_timings, stream


DEBUG_HINT = "(this is a bug in pyggml; rerun with --debug for the traceback)"
MAX_ERROR_CHARS = 2000


def _one_line(text: str) -> str:
    """An error message as one terminal line: lines joined, control characters escaped (messages may
    quote a hostile file), cut to MAX_ERROR_CHARS."""
    text = " ".join(part.strip() for part in str(text).splitlines() if part.strip())
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


def _is_pyggml_error(e: BaseException) -> bool:
    """An error class pyggml defines (GGUFError, ModelError, ConversionError, SessionError ...): a
    message meant for the user, as opposed to a bug."""
    return any(c.__module__.startswith("pyggml.") for c in type(e).__mro__ if issubclass(c, Exception))


class _Main(click.Group):
    """The `pyggml` group: whatever a command raises ends as one line on stderr and exit code 1
    (pyggml's own errors, OSError and MemoryError as their message; anything else as a bug, with a
    hint to rerun with --debug for the traceback); Ctrl-C ends the run quietly with exit code 130."""

    def invoke(self, ctx: click.Context):
        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except click.ClickException as e:
            if debug and e.__context__ is not None:  # a command's fail(str(error)): show the error's traceback
                import traceback

                traceback.print_exception(e.__context__)
            if type(e) is click.ClickException:
                e.message = _one_line(e.message)
            raise
        except KeyboardInterrupt:
            ctx.exit(130)
        except BrokenPipeError:  # the reader went away (`pyggml inspect F | head`): nothing left to say
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
            ctx.exit(1)
        except Exception as e:
            if debug:
                raise
            if _is_pyggml_error(e) or isinstance(e, OSError):
                raise click.ClickException(_one_line(str(e))) from None
            if isinstance(e, MemoryError):
                raise click.ClickException("out of memory") from None
            click.echo(f"Error: unexpected {type(e).__name__}: {_one_line(str(e))}", err=True)
            click.echo(DEBUG_HINT, err=True)
            ctx.exit(1)


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log what the library does.")
@click.option("--debug", is_flag=True, envvar="PYGGML_DEBUG",
              help="Show the traceback of an error (for bug reports); also PYGGML_DEBUG=1.")
def main(verbose: bool, debug: bool) -> None:
    """pyggml: run quantized LLaMA-family models from GGUF files, in pure Python."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--outfile", type=click.Path(dir_okay=False, path_type=Path), help="Output GGUF path.")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"]), default="f16", show_default=True)
def convert(model_dir: Path, outfile: Path | None, outtype: str) -> None:
    """Convert a HuggingFace LLaMA checkpoint directory into one GGUF file."""
    from .convert import ConversionError, convert_hf_to_gguf
    from .gguf import GGUFError

    progress = TqdmProgress("converting")
    try:
        path = convert_hf_to_gguf(model_dir, outfile, outtype=outtype, progress=progress)
    except (ConversionError, GGUFError, OSError) as e:
        fail(str(e))
    finally:
        progress.close()
    click.echo(f"wrote {path} ({path.stat().st_size:,} bytes)")


QUANT_TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "f16", "bf16", "f32"]


@main.command()
@click.argument("infile", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("rest", nargs=-1, metavar="[OUTFILE] TYPE [NTHREADS]")
@click.option("-o", "--outfile", "outfile_opt", type=click.Path(dir_okay=False, path_type=Path), help="Output path (default: beside the input, type in the name).")
@click.option("--output-tensor-type", type=click.Choice(QUANT_TYPES, case_sensitive=False),
              help="Type of output.weight (default: q8_0 when TYPE is q4_0/q4_1/q5_0/q5_1, else TYPE).")
@click.option("--allow-requantize", is_flag=True, help="Allow re-quantizing tensors that are already quantized.")
def quantize(infile: Path, rest: tuple[str, ...], outfile_opt: Path | None, output_tensor_type: str | None, allow_requantize: bool) -> None:
    """Quantize a GGUF file's weight matrices to TYPE (32-weight blocks, fp16 scales).

    Both `quantize IN TYPE [-o OUT]` and llama-quantize's `quantize IN OUT TYPE [NTHREADS]` work;
    TYPE in any case (q4_0, Q4_0)."""
    args = list(rest)
    if args and args[-1].isdigit():
        args.pop()  # llama-quantize's thread count: pyggml quantizes one tensor at a time
    if len(args) == 1:
        type_name, outfile = args[0], outfile_opt
    elif len(args) == 2:
        outfile, type_name = Path(args[0]), args[1]
    else:
        raise click.UsageError("expected IN TYPE, or llama-quantize's IN OUT TYPE [NTHREADS]")
    if type_name.lower() not in QUANT_TYPES:
        raise click.BadParameter(f"{type_name!r} is not one of {', '.join(QUANT_TYPES)} (any case)", param_hint="TYPE")
    type_name = type_name.lower()
    from .gguf import GGUFError
    from .quant.codecs import QuantError
    from .quantize import QuantizeError, quantize_file

    if output_tensor_type is None and type_name.lower() in ("q4_0", "q4_1", "q5_0", "q5_1"):
        output_tensor_type = "q8_0"
    progress = TqdmProgress("quantizing")
    try:
        r = quantize_file(infile, type_name, outfile, output_type=output_tensor_type,
                          allow_requantize=allow_requantize, progress=progress)
    except (QuantizeError, QuantError, GGUFError, OSError) as e:
        fail(str(e))
    finally:
        progress.close()
    for name, shape, t in r.fallbacks:
        click.echo(f"fallback: {name} {list(shape)}: {shape[-1]} columns are not a multiple of 32, stored as {t.name}")
    click.echo(f"wrote {r.out_path}")
    click.echo(f"  {r.n_tensors} tensors, {r.n_params:,} weights")
    click.echo(f"  size {r.in_bytes / 2**20:,.2f} MiB ({r.in_bits_per_weight:.2f} bpw) -> "
               f"{r.out_bytes / 2**20:,.2f} MiB ({r.bits_per_weight:.2f} bpw) in {r.seconds:.1f} s")


@main.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--max-items", default=6, show_default=True, help="Array items shown before abbreviating.")
@click.option("--no-tensors", is_flag=True, help="Metadata only.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: version, metadata (long arrays cut to --max-items), tensors.")
def inspect(path: Path, max_items: int, no_tensors: bool, as_json: bool) -> None:
    """Show a GGUF file's metadata and tensor table."""
    from .gguf import GGUFError, GGUFFile
    from .inspect import metadata_lines, summary_lines, tensor_lines

    try:
        f = GGUFFile(path)
    except GGUFError as e:
        fail(str(e))
    if as_json:
        import json

        def plain(v):
            if hasattr(v, "tolist"):
                v = v.tolist()
            if isinstance(v, (list, tuple)):
                return [plain(x) for x in v[:max_items]] + (["..."] if len(v) > max_items else [])
            return v

        out = {"version": f.version, "alignment": f.alignment,
               "metadata": {k: plain(v) for k, v in f.metadata.items()}}
        if not no_tensors:
            out["tensors"] = [{"name": t.name, "type": t.ggml_type.name, "shape": list(t.shape), "offset": t.offset,
                               "bytes": t.nbytes} for t in f]
        click.echo(json.dumps(out, indent=1, ensure_ascii=False))
        return
    for line in summary_lines(f) + ["", "metadata:"] + ["  " + s for s in metadata_lines(f, max_items)]:
        click.echo(line)
    if not no_tensors:
        click.echo("\ntensors:")
        for line in tensor_lines(f):
            click.echo("  " + line)


def _version(ctx, _param, value) -> None:
    if value and not ctx.resilient_parsing:
        from . import __version__

        click.echo(f"pyggml {__version__}")
        ctx.exit()


@main.command(cls=LlamaCppCommand)
@click.option("-m", "--model", "model_path", type=click.Path(exists=True, dir_okay=False), help="GGUF model file.")
@click.option("-hf", "-hfr", "--hf-repo", "hf_repo", help="(Not available: pyggml never downloads; pass -m FILE.)")
@click.option("-p", "--prompt", help="Complete this prompt and exit (without it: interactive chat).")
@click.option("-f", "--file", "prompt_file", type=click.Path(exists=True, dir_okay=False), help="Read the prompt from a file.")
@click.option("-e", "--escape", is_flag=True, help="Process escapes (\\n, \\t, ...) in the prompt.")
@click.option("-sys", "--system-prompt", "--system", "system_prompt", help="System prompt for the chat.")
@click.option("-cnv", "--conversation", "conversation", is_flag=True, help="Chat mode (the default without -p).")
@click.option("-no-cnv", "--no-conversation", "no_conversation", is_flag=True, help="Plain completion of -p, no chat template.")
@click.option("-i", "--interactive", is_flag=True, help="Interactive chat (as -cnv).")
@click.option("--chat-template", "chat_template", help="Chat template: a built-in name (llama-2, chatml) or a Jinja file.")
@click.option("-n", "--n-predict", default=-1, show_default=True, help="Tokens to generate (-1 = until done or the context is full).")
@click.option("-c", "--ctx-size", type=int, default=None,
              help="Context size in tokens (0 = the model's trained context; default: 4096 or the trained context if smaller).")
@click.option("-b", "--batch-size", default=512, show_default=True, help="Prompt tokens processed per batch.")
@click.option("--temp", default=0.8, show_default=True, help="Temperature (0 = greedy).")
@click.option("--top-k", default=40, show_default=True)
@click.option("--top-p", default=0.95, show_default=True)
@click.option("--min-p", default=0.05, show_default=True)
@click.option("--repeat-penalty", default=1.0, show_default=True, help="1.0 = off (llama.cpp's default).")
@click.option("--repeat-last-n", default=64, show_default=True)
@click.option("--presence-penalty", default=0.0, show_default=True)
@click.option("--frequency-penalty", default=0.0, show_default=True)
@click.option("-s", "--seed", type=int, default=None, help="RNG seed (default: random).")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores).")
@click.option("-ngl", "--n-gpu-layers", "--gpu-layers", default="0", show_default=True,
              help="Layers to offload to the GPU: N, 'all' or 'auto' (-1 = all).")
@click.option("-fa", "--flash-attn", "flash_attn", is_flag=False, flag_value="on", default=None, metavar="[on|off|auto]",
              help="Accepted for llama.cpp compatibility (pyggml's attention is always fused).")
@click.option("-r", "--reverse-prompt", "stops", multiple=True, help="Stop when this text is generated (repeatable).")
@click.option("--stop", "more_stops", multiple=True, help="Same as -r.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past end-of-generation tokens.")
@click.option("--color", is_flag=True, help="Colour the prompt and the user's input.")
@click.option("--grammar", "grammar_text", help="GBNF grammar constraining the output.")
@click.option("--grammar-file", type=click.Path(exists=True, dir_okay=False), help="File with a GBNF grammar.")
@click.option("-j", "--json-schema", "json_schema", help="JSON schema constraining the output (JSON text or a file).")
@click.option("--kv-file", type=click.Path(dir_okay=False), help="Back the KV cache by this file (default: anonymous memory).")
@kv_options
@click.option("--session", "session_path", type=click.Path(dir_okay=False), help="Load the context from / save it to this file.")
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_version, help="Print the version and exit.")
def run(model_path, hf_repo, prompt, prompt_file, escape, system_prompt, conversation, no_conversation, interactive,
        chat_template, n_predict, ctx_size, batch_size, temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n,
        presence_penalty, frequency_penalty, seed, threads, n_gpu_layers, flash_attn, stops, more_stops, ignore_eos,
        color, grammar_text, grammar_file, json_schema, kv_file, type_k, type_v, session_path) -> None:
    """Run a model: complete a prompt (-p), or chat interactively (llama.cpp's llama-cli flags)."""
    import warnings

    from .api import BackendUnavailableError, ContextFullError, Llama
    from .gguf import GGUFError
    from .grammar import GrammarError, LlamaGrammar
    from .model import ModelError
    from .sampling import SamplingParams
    from .session import SessionError, check_writable, session_messages
    from .tokenizer import TokenizerError

    if hf_repo:
        fail(f"-hf {hf_repo}: pyggml does not download models (there is no network access); "
              "download the GGUF file yourself and pass -m FILE")
    if not model_path:
        fail("missing -m/--model FILE (a GGUF file)")
    if flash_attn not in (None, "on", "off", "auto", "1", "0"):
        fail(f"-fa {flash_attn}: expected on, off or auto")
    if session_path:
        try:
            check_writable(session_path)  # now, not after the generation it would lose
        except SessionError as e:
            fail(str(e))
    stops = list(stops) + list(more_stops)
    try:
        grammar = None
        if grammar_file:
            grammar = LlamaGrammar.from_file(grammar_file)
        elif grammar_text:
            grammar = LlamaGrammar.from_string(grammar_text)
        elif json_schema:
            text = Path(json_schema).read_text(encoding="utf-8") if Path(json_schema).is_file() else json_schema
            grammar = LlamaGrammar.from_json_schema(text)
    except GrammarError as e:
        fail(str(e))
    if ctx_size is None:
        from .gguf import GGUFFile
        from .model import LlamaConfig

        try:
            with GGUFFile(model_path) as f:
                trained = LlamaConfig.from_metadata(f.metadata, model_path).n_ctx_train
        except (GGUFError, ModelError) as e:
            fail(str(e))
        ctx_size = min(4096, trained) if trained else 4096
    template_name = chat_template
    if chat_template and Path(chat_template).is_file():
        template_name = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with FirstRunNotice(type_k, type_v) as first:
                llm = Llama(model_path, n_ctx=ctx_size, n_batch=batch_size, n_threads=threads,
                            n_gpu_layers=gpu_layers(n_gpu_layers), seed=seed if seed is not None else -1,
                            kv_path=kv_file, chat_format=template_name, last_n_tokens_size=repeat_last_n, verbose=False,
                            type_k=type_k, type_v=type_v)
                first.warm_up(llm)
            params = SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                                    repeat_last_n=repeat_last_n, seed=seed, presence_penalty=presence_penalty,
                                    frequency_penalty=frequency_penalty)
        except (GGUFError, ModelError, TokenizerError, BackendUnavailableError, ValueError, OSError) as e:
            fail(str(e))
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    if chat_template and Path(chat_template).is_file():
        llm._template = Path(chat_template).read_text(encoding="utf-8")
    if ignore_eos:
        llm.tokenizer.eog_ids = frozenset()
    extra, history = {}, []
    if session_path and Path(session_path).exists():
        try:
            extra = llm.load_state_file(session_path)
            history = session_messages(extra, session_path)
        except SessionError as e:
            fail(str(e))
        click.echo(f"[session: restored {len(llm.tokens)} tokens from {session_path}]", err=True)
    limit = n_predict if n_predict >= 0 else llm.n_ctx()
    if prompt_file:
        prompt = Path(prompt_file).read_text(encoding="utf-8")
    if prompt is not None and escape:
        prompt = prompt.encode("latin-1", "backslashreplace").decode("unicode_escape")
    chat = prompt is None or conversation or interactive
    try:
        if prompt is not None and not (conversation or interactive):
            from .api import GenerationState

            gen = GenerationState()
            click.echo(click.style(prompt, fg="yellow") if color else prompt, nl=False)
            stream(llm.stream_text(llm.tokenize(prompt), params, limit, stops, gen, grammar=grammar))
            click.echo()
            if llm.context_full:
                click.echo(f"[context full: {llm.n_ctx()} tokens; raise -c/--ctx-size]", err=True)
            print_timings(llm)
        elif chat:
            extra = {"messages": chat_loop(llm, params, limit, system_prompt, stops, history, grammar,
                                       first=prompt, color=color)}
    except (ContextFullError, GrammarError) as e:
        fail(str(e))
    if session_path:
        try:
            llm.save_state_file(session_path, extra)
        except (SessionError, OSError) as e:
            fail(f"cannot save the session: {e}")
        click.echo(f"[session: saved {len(llm.tokens)} tokens to {session_path}]", err=True)


@main.command(cls=LlamaCppCommand)
@click.option("-m", "--model", "models", multiple=True, required=True, type=click.Path(),
              help="GGUF file (repeatable).")
@click.option("-p", "--n-prompt", multiple=True, metavar="N[,N...]", default=["128"], show_default=True, callback=int_list,
              help="Prompt tokens for the pp tests, comma-separated (0 = skip).")
@click.option("-n", "--n-gen", multiple=True, metavar="N[,N...]", default=["64"], show_default=True, callback=int_list,
              help="Generated tokens for the tg tests, comma-separated (0 = skip).")
@click.option("-d", "--n-depth", multiple=True, metavar="N[,N...]", default=["0"], show_default=True, callback=int_list,
              help="Tokens already in the context when pp/tg is measured, comma-separated.")
@click.option("-r", "--repetitions", default=3, show_default=True)
@click.option("-t", "--threads", multiple=True, metavar="N[,N...]", callback=int_list, help="CPU threads, comma-separated (default: all cores).")
@click.option("-ngl", "--n-gpu-layers", multiple=True, metavar="N[,N...]", default=["0"], show_default=True, callback=int_list,
              help="Layers to offload to the GPU, comma-separated (N, all).")
@click.option("-ctk", "--cache-type-k", "types_k", multiple=True, metavar="TYPE[,TYPE...]", default=["f16"], show_default=True,
              callback=kv_list, help="KV cache types of the keys, comma-separated (the names of run's -ctk).")
@click.option("-ctv", "--cache-type-v", "types_v", multiple=True, metavar="TYPE[,TYPE...]", default=["f16"], show_default=True,
              callback=kv_list, help="KV cache types of the values, comma-separated.")
@click.option("-o", "--output", "output", type=click.Choice(["md", "json", "csv"]), default="md", show_default=True,
              help="Output format.")
def bench(models, n_prompt, n_gen, n_depth, repetitions, threads, n_gpu_layers, types_k, types_v, output) -> None:
    """Measure prompt processing and generation speed, as llama-bench: every combination of the
    lists runs; a markdown table, JSON or CSV."""
    from .api import BackendUnavailableError, Llama
    from .bench import FORMATS, bench_model
    from .gguf import GGUFError, GGUFFile
    from .model import ModelError
    from .tokenizer import TokenizerError

    rows, read_bw = [], {}
    try:
        for path in models:  # a bad file fails at once, before any compiling or measuring
            GGUFFile(path).close()
        with FirstRunNotice() as first:
            if first.active:  # compile on the first model, so that no benchmark times the compiler
                with Llama(models[0], n_ctx=16, n_threads=threads[0] if threads else None,
                           n_gpu_layers=n_gpu_layers[0]) as llm:
                    first.warm_up(llm)
        for path in models:
            for ngl in n_gpu_layers:
                for t in threads or [None]:
                    for tk in types_k:
                        for tv in types_v:
                            click.echo(f"benchmarking {path} ...", err=True)
                            rows.append(bench_model(path, n_prompt, n_gen, repetitions, t, ngl, depth=n_depth,
                                                    read_bw=read_bw, type_k=tk, type_v=tv))
    except (GGUFError, ModelError, TokenizerError, BackendUnavailableError, NotImplementedError, ValueError, OSError) as e:
        fail(str(e))
    click.echo(FORMATS[output](rows))


@main.command()
@click.option("-m", "--model", "model_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="GGUF file to measure (the quantized one with --kl-base).")
@click.option("-f", "--file", "text_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Text to score (UTF-8).")
@click.option("-c", "--ctx-size", default=512, show_default=True, help="Tokens per chunk; the second half of each is scored.")
@click.option("-b", "--batch-size", default=512, show_default=True, help="Tokens evaluated per forward pass.")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores).")
@click.option("-ngl", "--n-gpu-layers", "--gpu-layers", default=0, show_default=True, help="Layers to offload to the GPU (-1 = all).")
@click.option("--chunks", "n_chunks", default=-1, show_default=True, help="Chunks to evaluate (-1 = all the text has).")
@click.option("--kl-base", "kl_base", type=click.Path(exists=True, dir_okay=False),
              help="Base model (e.g. f16) to compare against: KL divergence, PPL of both, top-1 agreement.")
@kv_options
@click.option("--kl-base-kv", "kl_base_kv", type=KV_TYPE, default=None,
              help="KV cache type (keys and values) of the --kl-base run (default: -ctk/-ctv). With --kl-base the same file "
                   "measures what a KV cache type costs: --kl-base MODEL --kl-base-kv f32 -ctk q8_0 -ctv q8_0.")
def perplexity(model_path, text_file, ctx_size, batch_size, threads, n_gpu_layers, n_chunks, kl_base, type_k, type_v,
               kl_base_kv) -> None:
    """Perplexity of a model over a text (as llama.cpp's perplexity tool), or its KL divergence from a base model."""
    import time

    from .api import BackendUnavailableError, Llama
    from .gguf import GGUFError
    from .model import ModelError
    from .perplexity import (KL_CHUNK_HEADER, PerplexityError, kl_chunk_line, kl_divergence, kl_summary,
                             perplexity_summary, read_text_file)
    from .perplexity import perplexity as measure
    from .tokenizer import TokenizerError

    err = lambda s: click.echo(s, err=True)  # noqa: E731
    try:
        text = read_text_file(text_file)
    except (PerplexityError, OSError) as e:
        fail(str(e))

    def on_chunk(result) -> None:
        if result.n_done == 1:
            err(f"perplexity: {result.n_text_tokens} tokens, {result.n_chunks} chunks of {result.n_ctx}, "
                f"batch size {batch_size}")
            if kl_base:
                click.echo(KL_CHUNK_HEADER)
        if kl_base:
            click.echo(kl_chunk_line(result))
        else:
            click.echo(f"[{result.n_done}]{result.ppl().value:.4f},", nl=False)
        sys.stdout.flush()

    try:
        with FirstRunNotice(type_k, type_v) as first:
            llm = Llama(model_path, n_ctx=ctx_size, n_batch=batch_size, n_threads=threads, n_gpu_layers=n_gpu_layers,
                        type_k=type_k, type_v=type_v)
            first.warm_up(llm)
        base_k, base_v = (kl_base_kv, kl_base_kv) if kl_base_kv else (type_k, type_v)
        base = Llama(kl_base, n_ctx=ctx_size, n_batch=batch_size, n_threads=threads, n_gpu_layers=n_gpu_layers,
                     type_k=base_k, type_v=base_v) if kl_base else None
        t0 = time.perf_counter()
        if base is not None:
            result = kl_divergence(llm, base, text, n_chunks=n_chunks, on_chunk=on_chunk)
            lines = kl_summary(result)
        else:
            result = measure(llm, text, n_chunks=n_chunks, on_chunk=on_chunk)
            click.echo()
            lines = perplexity_summary(result)
    except (PerplexityError, GGUFError, ModelError, TokenizerError, BackendUnavailableError, ValueError, OSError) as e:
        fail(str(e))
    for line in lines:
        click.echo(line)
    seconds = time.perf_counter() - t0
    err(f"perplexity: {result.n_done} chunks in {seconds:.2f} s")


@main.command(cls=LlamaCppCommand)
@click.option("-m", "--model", "model_path", required=True, type=click.Path(exists=True, dir_okay=False), help="GGUF model file.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, help="Port to listen on.")
@click.option("-c", "--ctx-size", type=int, default=None, help="Context size (default: the model's, at most 4096; 0 = the model's).")
@click.option("-b", "--batch-size", default=512, show_default=True, help="Prompt tokens processed per batch.")
@click.option("-np", "--parallel", "n_parallel", default=1, show_default=True, help="Slots: requests decoded together; each gets ctx-size / parallel tokens.")
@click.option("-cb/-nocb", "--cont-batching/--no-cont-batching", "cont_batching", default=True, show_default=True,
              help="Continuous batching: the slots' sequences share each forward pass (off: one sequence a pass).")
@click.option("-ngl", "--n-gpu-layers", "--gpu-layers", default="0", show_default=True, help="Layers to offload to the GPU ('all' = every one).")
@click.option("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores).")
@click.option("--api-key", envvar="LLAMA_API_KEY", help="Require this key (Authorization: Bearer KEY); also from LLAMA_API_KEY.")
@click.option("-a", "--alias", help="Model name the API reports (default: the file name).")
@click.option("--chat-template", "chat_template", help="Built-in chat template (llama-2, chatml) instead of the file's.")
@click.option("--max-queue", default=256, show_default=True, help="Requests that may wait for a slot; more are answered 503.")
@kv_options
def serve(model_path, host, port, ctx_size, batch_size, n_parallel, cont_batching, n_gpu_layers, threads, api_key, alias,
          chat_template, max_queue, type_k, type_v) -> None:
    """OpenAI-compatible HTTP server (llama-server's flags and endpoints). Needs pip install "pyggml[server]"."""
    try:
        import starlette  # noqa: F401 - the server extra, imported by serve() only once the model is set
        import uvicorn  # noqa: F401

        from .server.main import ServerSettings
        from .server.main import serve as run_server
    except ImportError as e:
        fail(f"pyggml serve needs the server extra: pip install \"pyggml[server]\" ({e})")
    run_server(ServerSettings(model_path=model_path, host=host, port=port, n_ctx=ctx_size, n_batch=batch_size,
                              n_parallel=n_parallel, n_gpu_layers=gpu_layers(n_gpu_layers), n_threads=threads,
                              api_key=api_key, alias=alias, max_queue=max_queue, cont_batching=cont_batching,
                              chat_format=chat_template, type_k=type_k, type_v=type_v))

if __name__ == "__main__":
    main()
