"""The command line's option machinery: llama.cpp-style multi-letter options, KV-type and list values,
and the one-line failure every command reports."""
from __future__ import annotations

import click


def fail(message: str) -> None:
    raise click.ClickException(message)


class LlamaCppCommand(click.Command):
    """A command whose multi-letter single-dash options (-ngl, -cnv, -sys, -fa ...) are whole names, as
    llama.cpp spells them; an unknown one is an error naming it, never read as clustered short flags
    (-cnv as -c nv)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        names = {n for p in self.params for n in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}
        takes_value = {n for p in self.params if isinstance(p, click.Option) and not p.is_flag and p.flag_value is None
                       for n in p.opts}
        skip = False
        for a in args:
            if skip:
                skip = False
                continue
            if a == "--":
                break
            name = a.split("=", 1)[0]
            if name in takes_value and "=" not in a:
                skip = True
            elif len(name) > 2 and name[0] == "-" and name[1] != "-" and name[1:].replace("-", "").isalpha() and name not in names:
                raise click.NoSuchOption(name, ctx=ctx)
        return super().parse_args(ctx, args)


class KVTypeParam(click.ParamType):
    """A KV cache type of the registry (model/kvtypes.py), looked up only when the option is used."""

    name = "kv_type"

    def get_metavar(self, param, ctx=None) -> str:
        from .model.kvtypes import KV_TYPES

        return "[" + "|".join(KV_TYPES) + "]"

    def convert(self, value, param, ctx) -> str:
        from .model.kvtypes import KVTypeError, kv_type

        try:
            return kv_type(str(value).strip()).name
        except KVTypeError as e:
            self.fail(str(e), param, ctx)


KV_TYPE = KVTypeParam()


def kv_options(f):
    """-ctk / -ctv, as llama.cpp's."""
    f = click.option("-ctv", "--cache-type-v", "type_v", type=KV_TYPE, default="f16", show_default=True,
                     help="KV cache type of the values.")(f)
    return click.option("-ctk", "--cache-type-k", "type_k", type=KV_TYPE, default="f16", show_default=True,
                        help="KV cache type of the keys.")(f)


def kv_list(ctx, param, values: tuple[str, ...]) -> list[str]:
    """llama-bench's -ctk/-ctv lists: comma-separated, repeatable."""
    return [KV_TYPE.convert(v, param, ctx) for value in values for v in str(value).split(",") if v.strip()]


def gpu_layers(value: str) -> int:
    v = str(value).strip().lower()
    if v in ("all", "auto"):
        return -1
    try:
        return int(v)
    except ValueError:
        raise click.BadParameter(f"{value!r}: use a number of layers, 'all' or 'auto'") from None


def int_list(_ctx, param, values: tuple[str, ...]) -> list[int]:
    """llama-bench's list values: comma-separated, the option repeatable (-p 128,512 -p 1024)."""
    try:
        return [gpu_layers(v) if param.name == "n_gpu_layers" else int(v)
                for value in values for v in str(value).split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{','.join(values)!r}: expected comma-separated numbers") from None
