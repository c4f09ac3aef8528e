"""The `pyggml` command line. Thin: it parses, calls the library, prints.

Heavy modules (numba, the model, tokenizers) are imported inside the commands that need
them so `pyggml --help` stays instant.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import click


class _TqdmProgress:
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


def _fail(message: str) -> None:
    raise click.ClickException(message)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log what the library does.")
def main(verbose: bool) -> None:
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

    progress = _TqdmProgress("converting")
    try:
        path = convert_hf_to_gguf(model_dir, outfile, outtype=outtype, progress=progress)
    except (ConversionError, GGUFError, OSError) as e:
        _fail(str(e))
    finally:
        progress.close()
    click.echo(f"wrote {path} ({path.stat().st_size:,} bytes)")


@main.command()
@click.argument("infile", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("type_name", metavar="TYPE", type=click.Choice(["q4_0", "q5_0", "q8_0", "f16", "bf16", "f32"], case_sensitive=False))
@click.option("-o", "--outfile", type=click.Path(dir_okay=False, path_type=Path), help="Output path (default: beside the input, type in the name).")
@click.option("--output-tensor-type", type=click.Choice(["q4_0", "q5_0", "q8_0", "f16", "bf16", "f32"], case_sensitive=False),
              help="Type of output.weight (default: q8_0 when TYPE is q4_0/q5_0, else TYPE).")
@click.option("--allow-requantize", is_flag=True, help="Allow re-quantizing tensors that are already quantized.")
def quantize(infile: Path, type_name: str, outfile: Path | None, output_tensor_type: str | None, allow_requantize: bool) -> None:
    """Quantize a GGUF file's weight matrices to TYPE (32-weight blocks, fp16 scales)."""
    from .gguf import GGUFError
    from .quant.codecs import QuantError
    from .quantize import QuantizeError, quantize_file

    if output_tensor_type is None and type_name.lower() in ("q4_0", "q5_0"):
        output_tensor_type = "q8_0"
    progress = _TqdmProgress("quantizing")
    try:
        r = quantize_file(infile, type_name, outfile, output_type=output_tensor_type,
                          allow_requantize=allow_requantize, progress=progress)
    except (QuantizeError, QuantError, GGUFError, OSError) as e:
        _fail(str(e))
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
def inspect(path: Path, max_items: int, no_tensors: bool) -> None:
    """Show a GGUF file's metadata and tensor table."""
    from .gguf import GGUFError, GGUFFile
    from .inspect import metadata_lines, summary_lines, tensor_lines

    try:
        f = GGUFFile(path)
    except GGUFError as e:
        _fail(str(e))
    for line in summary_lines(f) + ["", "metadata:"] + ["  " + s for s in metadata_lines(f, max_items)]:
        click.echo(line)
    if not no_tensors:
        click.echo("\ntensors:")
        for line in tensor_lines(f):
            click.echo("  " + line)


if __name__ == "__main__":
    main()
