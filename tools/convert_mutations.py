"""The mutations of tools/fuzz_convert.py: each takes a copy of a base checkpoint and an rng, breaks
one thing in it (safetensors bytes, headers, shards, JSON keys and values, files, tokenizer.model,
config shapes) and returns a one-line description of what it did."""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path

import numpy as np

from hf_checkpoints import read_safetensors, read_tensors, regular, spm_source, write_json, write_raw_safetensors, write_safetensors



# ------------------------------------------------------------------------------ mutations
# Each mutator changes the checkpoint in `d` in place and says what it did; `rng` is the case's only source
# of randomness.
BOUNDARY = (0, 1, 7, 8, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 100 << 20,
            (100 << 20) + 1)
HOSTILE = (None, True, False, 0, -1, 1, 3, 2**31, 2**32 + 1, 2**63, 2**64, -(2**63), 10**30, 1.5, -0.0, 1e308,
           5e-324, float("nan"), float("inf"), float("-inf"), "", "x", "\udcff", "<s>", "\x00", "x" * 100_000,
           [], {}, [1, "a", None], {"content": 5}, {"content": "<s>"}, list(range(1000)))
HOSTILE_TEXT = ("", "\udcff", "\ud800x", "\x00", "x" * 100_000, "<s>", "\u2581", "{{ raise_exception('x') }}",
                "{% for %}", " ", "\n")
RAW_NUMBERS = ("1e999", "-1e999", "NaN", "-Infinity", "Infinity", "-0", "123456789012345678901234567890",
               "18446744073709551616", "-9223372036854775809", "0.1e-400", "9" * 5000, "1" + "0" * 400 + ".5")
# Keys worth hitting on purpose, by file (a random path through tokenizer.json is nearly always a vocab entry).
KEYS = {
    "config.json": ("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
                    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                    "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
                    "tie_word_embeddings", "hidden_act", "bos_token_id", "eos_token_id", "pad_token_id",
                    "sliding_window", "use_sliding_window", "attention_bias", "mlp_bias", "layer_types",
                    "partial_rotary_factor", "logit_scale", "original_max_position_embeddings"),
    "tokenizer_config.json": ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                              "mask_token", "add_bos_token", "add_eos_token", "add_sep_token", "add_prefix_space",
                              "chat_template", "added_tokens_decoder"),
    "tokenizer.json": ("model", "added_tokens", "pre_tokenizer", "normalizer", "post_processor"),
    "generation_config.json": ("eos_token_id", "bos_token_id", "pad_token_id"),
    "special_tokens_map.json": ("bos_token", "eos_token", "unk_token", "pad_token"),
    "model.safetensors.index.json": ("weight_map", "metadata"),
}
SUBKEYS = {  # deeper spots: (path of a container, keys in it)
    "tokenizer.json": ((("model",), ("type", "vocab", "merges", "byte_fallback", "dropout", "unk_token",
                                     "continuing_subword_prefix", "end_of_word_suffix")),
                       (("pre_tokenizer",), ("type", "pretokenizers")),
                       (("pre_tokenizer", "pretokenizers", 0), ("type", "pattern", "behavior", "invert")),
                       (("pre_tokenizer", "pretokenizers", 1), ("type", "add_prefix_space", "use_regex")),
                       (("added_tokens", 0), ("id", "content", "special")),
                       (("post_processor",), ("type", "processors")),
                       (("post_processor", "processors", 1), ("type", "single")),
                       (("post_processor", "processors", 1, "single", 0, "SpecialToken"), ("id",)),
                       (("model", "vocab"), ("a", "the", "\u0120the"))),
    "config.json": ((("rope_scaling",), ("rope_type", "factor", "low_freq_factor", "high_freq_factor",
                                         "original_max_position_embeddings")),),
    "tokenizer_config.json": ((("added_tokens_decoder", "512"), ("content", "special")),),
}


def pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def nested(depth: int):
    v: object = 0
    for _ in range(depth):
        v = [v]
    return v


def hostile_value(rng, old=None):
    """A value to put where `old` was: of the wrong type or range; for text, often text that breaks."""
    r = rng.integers(10)
    if r == 0:
        return nested(int(pick(rng, (40, 63, 65, 100))))
    if isinstance(old, str) and r < 6:
        return pick(rng, HOSTILE_TEXT)
    return pick(rng, HOSTILE)


def files_of(d: Path, pattern: str) -> list[Path]:
    return sorted(p for p in d.glob(pattern) if p.is_file() and not p.is_symlink())


def json_paths(obj, prefix=(), limit: int = 4000) -> list[tuple]:
    """Paths (tuples of keys / indices) to every value inside `obj`, breadth first, at most `limit`."""
    out, queue = [], [(prefix, obj)]
    while queue and len(out) < limit:
        path, node = queue.pop(0)
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            out.append((*path, k))
            queue.append(((*path, k), v))
    return out


def container_at(obj, path: tuple):
    for k in path[:-1]:
        obj = obj[k]
    return obj


def mutate_json_value(d: Path, rng, delete: bool) -> str:
    files = files_of(d, "*.json")
    path = pick(rng, files)
    obj = json.loads(path.read_bytes())
    name = path.name
    if not isinstance(obj, (dict, list)):
        return f"{name}: top level is not a container, unchanged"
    r = rng.integers(3)
    target = None
    if r == 0 and name in KEYS:
        target = (pick(rng, KEYS[name]),)
    elif r == 1 and name in SUBKEYS:
        where, keys = pick(rng, SUBKEYS[name])
        try:
            if isinstance(container_at(obj, (*where, None)), dict):
                target = (*where, pick(rng, keys))
        except (KeyError, IndexError, TypeError):
            pass
    if target is None:
        paths = json_paths(obj)
        if not paths:
            return f"{name}: empty, unchanged"
        target = pick(rng, paths)
    parent = container_at(obj, target)
    if delete:
        if isinstance(parent, dict):
            parent.pop(target[-1], None)
        else:
            del parent[target[-1]]
        what = f"deleted {list(target)}"
    else:
        old = parent.get(target[-1]) if isinstance(parent, dict) else parent[target[-1]]
        value = hostile_value(rng, old)
        parent[target[-1]] = value
        what = f"{list(target)} = {_short(value)}"
    path.write_text(json.dumps(obj))
    return f"{name}: {what}"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 50 else text[:40] + f"... ({len(text)} chars)"


def m_json_delete(d: Path, rng) -> str:
    """A key deleted from a JSON file (or an element from a list)."""
    return mutate_json_value(d, rng, delete=True)


def m_json_type(d: Path, rng) -> str:
    """A value replaced by one of the wrong type or range (null, bools, huge / negative / NaN numbers,
    lone surrogates, long strings, deep nesting)."""
    return mutate_json_value(d, rng, delete=False)


def m_json_number(d: Path, rng) -> str:
    """A number written as a literal json.loads reads oddly: 1e999 (inf), NaN, 5000 digits, -0."""
    path = pick(rng, files_of(d, "*.json"))
    text = path.read_text()
    numbers = [m for m in re.finditer(r'(?<=[:\[,] )-?\d+(\.\d+)?([eE][-+]?\d+)?|(?<=[:\[,])-?\d+(\.\d+)?', text)]
    literal = pick(rng, RAW_NUMBERS)
    if not numbers:
        return f"{path.name}: no numbers, unchanged"
    m = pick(rng, numbers)
    path.write_text(text[: m.start()] + literal + text[m.end() :])
    return f"{path.name}: number {m.group()!r} at char {m.start()} -> {_short(literal)}"


def m_json_text(d: Path, rng) -> str:
    """The JSON text itself broken (or chat_template.jinja's): invalid UTF-8, truncated, empty, not JSON,
    deep nesting, another top level type, a BOM, UTF-16, duplicate keys, trailing garbage."""
    path = pick(rng, files_of(d, "*.json") + files_of(d, "*.jinja"))
    raw = path.read_bytes()
    kind = int(rng.integers(11))
    at = int(rng.integers(len(raw) + 1))
    if kind == 0:
        bad = pick(rng, (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf", b"\x80"))
        new, what = raw[:at] + bad + raw[at:], f"invalid UTF-8 {bad!r} at byte {at}"
    elif kind == 1:
        new, what = raw[:at], f"truncated to {at} bytes"
    elif kind == 2:
        new, what = b"", "emptied"
    elif kind == 3:
        new, what = pick(rng, (b"not json", b"\x00" * 64, b"{'a': 1}", b"<html></html>")), "not JSON"
    elif kind == 4:
        depth = int(pick(rng, (65, 1000, 200_000)))
        new, what = b'{"a": ' + b"[" * depth + b"]" * depth + b"}", f"nested {depth} deep"
    elif kind == 5:
        new = pick(rng, (b"[]", b'"text"', b"1", b"null", b"[" + raw + b"]"))
        what = f"top level {new[:12]!r}"
    elif kind == 6:
        new, what = b"\xef\xbb\xbf" + raw, "UTF-8 BOM"
    elif kind == 7:
        new, what = raw.decode().encode("utf-16"), "UTF-16"
    elif kind == 8:
        key = pick(rng, KEYS.get(path.name, ("x",)))
        dup = json.dumps({key: hostile_value(rng)})[1:-1].encode()
        new, what = (raw.rstrip()[:-1] + b", " + dup + b"}") if raw.rstrip().endswith(b"}") else raw, f"duplicate {key}"
    elif kind == 9:
        new, what = raw + pick(rng, (b"}", b"garbage", b"\x00", b"{}")), "trailing garbage"
    else:
        new, what = raw[:at] + b"\x00" + raw[at:], f"NUL at byte {at}"
    path.write_bytes(new)
    return f"{path.name}: {what}"


def _shard(d: Path, rng) -> Path:
    shards = files_of(d, "*.safetensors")
    if not shards:
        raise FileNotFoundError(f"{d}: no safetensors file to mutate")
    return pick(rng, shards)


def m_st_bytes(d: Path, rng) -> str:
    """Bytes of a safetensors header (length field included) flipped, or an 8-byte window set to a boundary integer."""
    path = _shard(d, rng)
    raw = bytearray(path.read_bytes())
    end = 8 + struct.unpack("<Q", raw[:8])[0]
    if rng.integers(2):
        spots = sorted(int(rng.integers(end)) for _ in range(int(rng.integers(1, 6))))
        for at in spots:
            raw[at] ^= 1 << int(rng.integers(8))
        what = f"bits flipped at bytes {spots}"
    else:
        at, value = int(rng.integers(end - 8)), pick(rng, BOUNDARY)
        raw[at : at + 8] = value.to_bytes(8, "little")
        what = f"bytes {at}..{at + 8} = {value}"
    path.write_bytes(bytes(raw))
    return f"{path.name}: {what}"


def m_st_length(d: Path, rng) -> str:
    """The u64 header length set to a boundary value (0, off by one, past the end, 2^63, 2^64-1 ...)."""
    path = _shard(d, rng)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    value = pick(rng, (*BOUNDARY, n - 1, n + 1, n - 8, n + 8, len(raw) - 8, len(raw) - 7, len(raw)))
    path.write_bytes(struct.pack("<Q", value) + raw[8:])
    return f"{path.name}: header length {n} -> {value}"


def m_st_truncate(d: Path, rng) -> str:
    """A safetensors file cut short: in the length field, the header, or the tensor data (or by one byte)."""
    path = _shard(d, rng)
    raw = path.read_bytes()
    end = 8 + struct.unpack("<Q", raw[:8])[0]
    at = int(pick(rng, (rng.integers(8), rng.integers(8, end), rng.integers(end, len(raw)), len(raw) - 1, end)))
    path.write_bytes(raw[:at])
    return f"{path.name}: truncated to {at} of {len(raw)} bytes (header ends at {end})"


def _entry_mutation(entry: dict, header: dict, name: str, data_size: int, rng) -> str:
    field = pick(rng, ("dtype", "shape", "data_offsets", "delete", "entry", "extra"))
    begin, end = entry["data_offsets"]
    if field == "dtype":
        entry["dtype"] = pick(rng, ("F64", "I32", "U8", "BOOL", "F8_E4M3", "BF16", "F16", "F32", "f32", "Q4_0", "",
                                    5, None, ["F32"]))
        return f"dtype -> {entry['dtype']!r}"
    if field == "shape":
        shape = list(entry["shape"])
        options = [shape[::-1], shape + [1], [1] + shape, shape[:-1], [], [0] * len(shape), [-1] + shape[1:],
                   [2**62, 2**62], [2**64], [1.5] * len(shape), ["64"], [[64]], None, "64", [True] * len(shape),
                   [shape[0] + 1] + shape[1:], [2**31] * 3, [10**30]]
        entry["shape"] = pick(rng, options)
        return f"shape {shape} -> {_short(entry['shape'])}"
    if field == "data_offsets":
        others = [t["data_offsets"] for k, t in header.items() if k not in (name, "__metadata__")]
        other = pick(rng, others) if others else [0, 0]
        options = [[end, begin], [begin + 2, end + 2], [begin - 2, end - 2], [begin, end + data_size], [-1, end - begin - 1],
                   [0, end - begin], other, [begin], [begin, end, end], [float(begin), float(end)],
                   [str(begin), str(end)], [begin, 2**64], [2**63, 2**63 + end - begin], None, {},
                   [data_size - (end - begin) + 1, data_size + 1], [True, end]]
        entry["data_offsets"] = pick(rng, options)
        return f"data_offsets [{begin}, {end}] -> {_short(entry['data_offsets'])}"
    if field == "delete":
        key = pick(rng, ("dtype", "shape", "data_offsets"))
        del entry[key]
        return f"{key} deleted"
    if field == "entry":
        header[name] = hostile_value(rng)
        return f"entry -> {_short(header[name])}"
    entry[pick(rng, ("extra", "dtype2"))] = hostile_value(rng)
    return "extra field"


def m_st_field(d: Path, rng) -> str:
    """One tensor's header entry changed: dtype, shape, data_offsets, a field deleted, the entry replaced."""
    path = _shard(d, rng)
    header, data = read_safetensors(path)
    names = [k for k in header if k != "__metadata__"]
    name = pick(rng, names)
    what = _entry_mutation(header[name], header, name, len(data), rng)
    write_raw_safetensors(path, json.dumps(header).encode(), data)
    return f"{path.name}: tensor {name!r}: {what}"


def m_st_header_text(d: Path, rng) -> str:
    """A safetensors header that is not UTF-8 JSON of the expected form (keeping the length consistent)."""
    path = _shard(d, rng)
    header, data = read_safetensors(path)
    text = json.dumps(header).encode()
    kind = int(rng.integers(8))
    if kind == 0:
        at = int(rng.integers(len(text)))
        new, what = text[:at] + b"\xff\xfe" + text[at:], f"invalid UTF-8 at byte {at}"
    elif kind == 1:
        new, what = text[: int(rng.integers(len(text)))], "truncated JSON"
    elif kind == 2:
        new, what = b"[" * 100_000 + b"]" * 100_000, "nested 100000 deep"
    elif kind == 3:
        new = pick(rng, (b"[]", b"null", b"1", b'"x"', b"{}", b"", b"\x00" * 16))
        what = f"header {new[:16]!r}"
    elif kind == 4:  # a name duplicated textually: json keeps the last, which points elsewhere
        names = [k for k in header if k != "__metadata__"]
        a, b = pick(rng, names), pick(rng, names)
        new, what = text[:-1] + b", " + json.dumps({a: header[b]})[1:-1].encode() + b"}", f"{a!r} again, as {b!r}"
    elif kind == 5:
        new, what = text.replace(b'"F', b'"\\u0000F', 1), "NUL in a dtype"
    elif kind == 6:
        new, what = text.replace(b"[", b"[NaN, ", 1), "NaN in a shape"
    else:
        meta = hostile_value(rng)
        header["__metadata__"] = meta
        new, what = json.dumps(header).encode(), f"__metadata__ = {_short(meta)}"
    write_raw_safetensors(path, new, data)
    return f"{path.name}: {what}"


def m_st_tensor(d: Path, rng) -> str:
    """A tensor consistently rewritten: another shape, another dtype, NaN/inf data, renamed, dropped,
    duplicated under another name or layer spelling, emptied, or the data section cut (the header still
    claiming it)."""
    path = _shard(d, rng)
    meta, tensors = read_tensors(path)
    name = pick(rng, list(tensors))
    dtype, raw, shape = tensors[name]
    kind = int(rng.integers(9))
    what = ""
    if kind == 0:
        new_shape = pick(rng, ([shape[0] + 1, *shape[1:]], [max(shape[0] - 1, 0), *shape[1:]], shape[::-1] + [1]))
        n = int(np.prod(new_shape)) * len(raw) // max(int(np.prod(shape)), 1)
        tensors[name] = (dtype, (raw * 2)[:n], new_shape)
        what = f"shape {shape} -> {new_shape}"
    elif kind == 1:
        new = pick(rng, ("F64", "I32", "I8", "U8", "F8_E5M2", "BOOL", "I64"))
        size = {"F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "F8_E5M2": 1, "BOOL": 1}[new]
        n = int(np.prod(shape)) * size
        tensors[name] = (new, (raw * 8)[:n], shape)
        what = f"dtype {dtype} -> {new}"
    elif kind == 2:
        fill = pick(rng, (np.nan, np.inf, -np.inf, 3e38, 1e-45))
        arr = np.full(len(raw) // {"F32": 4, "F16": 2, "BF16": 2}[dtype], fill, np.float32)
        raw = arr.tobytes() if dtype == "F32" else (arr.astype(np.float16).tobytes() if dtype == "F16"
                                                    else (arr.view(np.uint32) >> 16).astype(np.uint16).tobytes())
        tensors[name] = (dtype, raw, shape)
        what = f"data all {fill}"
    elif kind == 3:
        new_name = pick(rng, ("model.layers.2.mlp.up_proj.weight", "model.layers.99999999999999999999.mlp.up_proj.weight",
                              "model.layers.-1.mlp.up_proj.weight", "model.layers.0.mlp.upp_proj.weight", "",
                              "model.layers.０.mlp.up_proj.weight", "lm_head.weight\n", "transformer.wte.weight"))
        tensors[new_name] = tensors.pop(name)
        what = f"renamed to {new_name!r}"
    elif kind == 4:
        del tensors[name]
        what = "dropped"
    elif kind == 5:
        other = pick(rng, ("lm_head.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight",
                           "model.embed_tokens.weight"))
        tensors[other] = tensors[name]
        what = f"copied as {other!r}"
    elif kind == 6:
        what = "data section cut short"
    elif kind == 7 and name.startswith("model.layers."):  # the same layer spelled another way
        layer = name.split(".")[2]
        alias = pick(rng, ("0" + layer, "\uff10" if layer == "0" else "\uff11", "1" * 5000, layer + " "))
        new_name = name.replace(f".{layer}.", f".{alias}.", 1)
        tensors[new_name] = tensors[name] if rng.integers(2) else tensors.pop(name)
        what = f"also as layer {_short(alias)}"
    elif kind == 8:
        tensors[name] = (dtype, b"", [*shape[:-1], 0])
        what = "made empty"
    else:
        return f"{path.name}: unchanged (tensor {name!r} is no layer tensor)"
    cut = int(rng.integers(1, 64)) if kind == 6 else 0
    write_safetensors(path, tensors, meta, cut)
    return f"{path.name}: tensor {name!r} {what}"


def m_shards(d: Path, rng) -> str:
    """How the weights are split: duplicate tensors across shards, the index pointing elsewhere or at
    odd names, shards missing, no index (every *.safetensors read), a FIFO among the shards."""
    index = d / "model.safetensors.index.json"
    shards = files_of(d, "*.safetensors")
    kind = int(rng.integers(8))
    if kind == 0:  # a tensor of one shard also written into another
        src = pick(rng, shards)
        tensors = read_tensors(src)[1]
        name = pick(rng, list(tensors))
        extra = d / "model-extra.safetensors" if len(shards) == 1 else pick(rng, [s for s in shards if s != src])
        meta, more = read_tensors(extra) if extra.is_file() else (None, {})
        write_safetensors(extra, more | {name: tensors[name]}, meta)
        if rng.integers(2) and index.is_file():
            index.unlink()
            return f"{name!r} in {src.name} and {extra.name}, no index"
        if len(shards) == 1 and rng.integers(2):
            src.rename(d / "model-00001.safetensors")
            return f"{name!r} in {src.name} (renamed model-00001) and {extra.name}"
        return f"{name!r} in {src.name} and {extra.name}"
    if kind == 1:
        if index.is_file():
            index.unlink()
        if (d / "model.safetensors").is_file() and rng.integers(2):
            (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
        return "no index (shards found by glob)"
    if kind == 2:
        if index.is_file():
            index.unlink()
        for s in shards:
            s.rename(d / f"{s.stem}.bin")
        return "weights renamed *.bin"
    if kind == 3:
        if index.is_file():
            index.unlink()
        if (d / "model.safetensors").is_file():
            (d / "model.safetensors").rename(d / "model-00001.safetensors")
        os.mkfifo(d / "model-00002.safetensors")
        return "no index, a FIFO named model-00002.safetensors"
    if kind == 4:
        s = pick(rng, shards)
        s.unlink()
        return f"{s.name} deleted"
    if index.exists() or index.is_symlink():
        regular(index)
    else:  # the single-file bases get an index to break
        weights = {n: "model.safetensors" for n in read_tensors(d / "model.safetensors")[1]}
        write_json(index, {"metadata": {}, "weight_map": weights})
    obj = json.loads(regular(index).read_text())
    name = pick(rng, list(obj["weight_map"]))
    if kind == 5:
        target = pick(rng, ("../config.json", "/etc/passwd", "", ".", "..", "sub/x.safetensors", "missing.safetensors",
                            "config.json", "tokenizer.model", "model.safetensors.index.json", "dir.safetensors",
                            "model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors", "\x00", "a" * 300))
        if target == "dir.safetensors":
            (d / target).mkdir()
        obj["weight_map"][name] = target
        what = f"index sends {name!r} to {target!r}"
    elif kind == 6:
        del obj["weight_map"][name]
        what = f"index lacks {name!r}"
    else:
        obj["weight_map"][pick(rng, ("model.layers.7.mlp.up_proj.weight", "lm_head.weight", "x"))] = obj["weight_map"][name]
        what = "index names a tensor the shard lacks"
    write_json(index, obj)
    return what


def m_files(d: Path, rng) -> str:
    """A file missing, or a directory / dangling symlink / symlink loop / FIFO / empty file / huge sparse
    file in its place."""
    path = pick(rng, sorted(p for p in d.iterdir() if p.is_file()))
    kind = int(rng.integers(7))
    path.unlink()
    if kind == 0:
        return f"{path.name} deleted"
    if kind == 1:
        path.mkdir()
        return f"{path.name} is a directory"
    if kind == 2:
        path.symlink_to(d / "nowhere")
        return f"{path.name} is a dangling symlink"
    if kind == 3:
        path.symlink_to(path.name)
        return f"{path.name} is a symlink to itself"
    if kind == 4:
        os.mkfifo(path)
        return f"{path.name} is a FIFO"
    if kind == 5:
        path.touch()
        return f"{path.name} is empty"
    size = int(pick(rng, (64 << 20, 300 << 20)))
    with open(path, "wb") as f:
        f.truncate(size)
    return f"{path.name} is {size >> 20} MiB of zeros (sparse)"


def m_spm(d: Path, rng) -> str:
    """tokenizer.model bytes flipped, truncated, overlong varints inserted, or zeroed (or, in a BPE base,
    stories260K's 512-piece one dropped in)."""
    path = d / "tokenizer.model"
    if not path.is_file():
        spm = spm_source()
        if spm is None:
            return "no tokenizer.model, unchanged"
        shutil.copyfile(spm / "tokenizer.model", path)
        if rng.integers(2):
            return "a 512-piece tokenizer.model added"
    raw = bytearray(path.read_bytes())
    kind = int(rng.integers(5))
    if kind == 0:
        spots = sorted(int(rng.integers(len(raw))) for _ in range(int(rng.integers(1, 9))))
        for at in spots:
            raw[at] = int(rng.integers(256))
        what = f"bytes set at {spots}"
    elif kind == 1:
        at = int(rng.integers(len(raw)))
        raw, what = raw[:at], f"truncated to {at} bytes"
    elif kind == 2:
        at = int(rng.integers(len(raw)))
        raw[at:at] = b"\xff" * int(rng.integers(1, 12))
        what = f"0xff run at byte {at}"
    elif kind == 3:
        at = int(rng.integers(len(raw) - 8))
        raw[at : at + 8] = pick(rng, BOUNDARY).to_bytes(8, "little")
        what = f"boundary integer at byte {at}"
    else:
        raw = bytearray(len(raw))
        what = "all zero"
    path.write_bytes(bytes(raw))
    return f"tokenizer.model: {what}"


def m_config_shapes(d: Path, rng) -> str:
    """config.json numbers changed so that the tensors no longer match (or the tokenizer no longer fits)."""
    path = d / "config.json"
    config = json.loads(regular(path).read_text())
    key = pick(rng, ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "vocab_size", "head_dim", "max_position_embeddings", "tie_word_embeddings"))
    old = config.get(key, 16 if key == "head_dim" else 1)
    if key == "tie_word_embeddings":
        config[key] = not old
    else:
        config[key] = int(pick(rng, (old - 1, old + 1, old * 2, old // 2, 1, 0, 3, 513, 1 << 22, (1 << 22) + 1, 2**40)))
    write_json(path, config)
    return f"config.json: {key} {old} -> {config[key]}"


MUTATORS = (m_st_bytes, m_st_length, m_st_truncate, m_st_field, m_st_header_text, m_st_tensor, m_shards,
            m_json_delete, m_json_type, m_json_number, m_json_text, m_files, m_spm, m_config_shapes)


