#!/usr/bin/env python3
"""llama_double.py: the test double of llama.cpp's llama-server used by kvtier's CI.

It speaks llama-server's HTTP API (the subset kvtier-llama uses) with the real
response shapes, keeps per-slot token caches with llama-server's prefix-reuse
rules, charges a configurable time per prefilled and generated token, and saves
and restores slots to files in the real slot-file formats (the Feb 2025 layout,
today's layout with KV streams, sliding-window and recurrent models, the packed
token array of upstream master, ik_llama.cpp's version 4 plus
`<file>.tokens.json`), with KV bytes that are a deterministic function of
(layer, position, token id) so that a restore can be verified.

Standard library only. See README.md beside this file for what is modelled and
what is not.
"""

import argparse
import hashlib
import json
import math
import mmap
import os
import random
import re
import select
import socket
import struct
import sys
import threading
import time
import urllib.parse
from array import array
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# --------------------------------------------------------------------------
# constants shared with the real server

LLAMA_STATE_SEQ_MAGIC = 0x67677371          # "qsgg" on disk
IK_TOKENS_MAGIC = 1819112310                # "vsml", from ik's <file>.tokens.json
GGML_TYPE_ID = {"f32": 0, "f16": 1, "q8_0": 8}
# bytes per block and elements per block (ggml_row_size)
GGML_BLOCK = {"f32": (4, 1), "f16": (2, 1), "q8_0": (34, 32)}
DEFAULT_OAICOMPAT_MODEL = "gpt-3.5-turbo"   # examples/server/utils.hpp
BUILD_INFO = "b0-llamadouble"

# restore failure text of examples/server/server.cpp (SERVER_TASK_TYPE_SLOT_RESTORE)
RESTORE_FAILED = ("Unable to restore slot, no available space in KV cache "
                  "or invalid slot save file")
CTX_EXCEEDED = ("the request exceeds the available context size. "
                "try increasing the context size or enable context shift")
# llama.cpp mid-2026 (tools/server/server-context.cpp update_slots)
CTX_EXCEEDED_2026 = "request (%d tokens) exceeds the available context size (%d tokens), try increasing it"
# upstream master (server-context.cpp SERVER_TASK_TYPE_SLOT_RESTORE): "Unable to restore slot: " + reason
RESTORE_FAILED_UP = "Unable to restore slot: "
EMPTY_JSON = ("[json.exception.parse_error.101] parse error at line 1, column 1: attempting to "
              "parse an empty input; check that the input is not empty")
# server-http.cpp get_public_endpoints: no API key needed (the web UI's assets too)
PUBLIC_PATHS = {"/health", "/v1/health", "/models", "/v1/models", "/"}
TOKENS_NULL = -1                             # LLAMA_TOKEN_NULL, the packed form's marker
SERVER_TOKENS_STATE_VERSION = 1              # upstream server-common.cpp

# --------------------------------------------------------------------------
# tokenizer: byte-level, prefix-stable

BOS, EOS = 1, 2
BYTE_BASE = 3                                # byte b is token b + 3 (3..258)
SPECIALS = {"<|im_start|>": 259, "<|im_end|>": 260}
SPECIAL_TEXT = {v: k for k, v in SPECIALS.items()}
N_VOCAB = 32000                              # ids 261..31999 are valid but have no text
N_CTX_TRAIN = 32768
GARBAGE = -1                                 # an ik slot restored without its sidecar
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")
# generated text: printable ASCII without the characters of the special tokens,
# so re-tokenizing a reply gives back exactly the generated tokens.
_GEN_ALPHABET = [c for c in range(0x20, 0x7F) if chr(c) not in "<>|"]

CHATML_TEMPLATE = (
    "{%- for message in messages -%}\n"
    "  {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "  {{- '<|im_start|>assistant\\n' -}}\n"
    "{%- endif -%}")


def tokenize(text, add_special):
    out = [BOS] if add_special else []
    for part in _SPECIAL_RE.split(text):
        if not part:
            continue
        tid = SPECIALS.get(part)
        if tid is not None:
            out.append(tid)
        else:
            out.extend(b + BYTE_BASE for b in part.encode("utf-8"))
    return out


def piece_bytes(tok):
    if BYTE_BASE <= tok < BYTE_BASE + 256:
        return bytes([tok - BYTE_BASE])
    if tok == BOS:
        return b"<s>"
    if tok == EOS:
        return b"</s>"
    if tok in SPECIAL_TEXT:
        return SPECIAL_TEXT[tok].encode()
    return b""


def detokenize(tokens):
    return b"".join(piece_bytes(t) for t in tokens).decode("utf-8", "replace")


def generate_tokens(prompt, n):
    """n deterministic printable-ASCII tokens, a function of the whole prompt."""
    seed = hashlib.sha256(array("i", prompt).tobytes()).digest()
    out, ctr = [], 0
    while len(out) < n:
        block = hashlib.sha256(seed + ctr.to_bytes(4, "little")).digest()
        ctr += 1
        out.extend(_GEN_ALPHABET[b % len(_GEN_ALPHABET)] + BYTE_BASE for b in block)
    return out[:n]


def common_prefix(a, b):
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def chatml(messages):
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise RuntimeError("Invalid message")
        role = m.get("role") or ""
        if "content" not in m:
            raise RuntimeError("Missing 'content' (ref: https://github.com/ggml-org/llama.cpp/issues/8367)")
        c = m["content"]
        if isinstance(c, str):
            content = c
        elif isinstance(c, list):
            content = "".join("\n" + p["text"] for p in c if isinstance(p, dict) and "text" in p)
        elif c is None:
            content = ""
        else:
            raise RuntimeError("Invalid 'content' type (ref: https://github.com/ggml-org/llama.cpp/issues/8367)")
        out.append("<|im_start|>" + role + "\n" + content + "<|im_end|>\n")
    out.append("<|im_start|>assistant\n")
    return "".join(out)


def validate_filename(name):
    """common/common.cpp fs_validate_filename()."""
    if not isinstance(name, str) or not name:
        return False
    try:
        raw = name.encode("utf-8")          # rejects lone surrogates
    except UnicodeEncodeError:
        return False
    if len(raw) > 255:
        return False
    for ch in name:
        c = ord(ch)
        if (c <= 0x1F or c == 0x7F or 0x80 <= c <= 0x9F or c in (0xFF0E, 0x2215, 0x2216)
                or 0xD800 <= c <= 0xDFFF or c in (0xFFFD, 0xFEFF) or ch in '/\\:*?"<>|'):
            return False
    if name[0] == " " or name[-1] == " " or name[-1] == ".":
        return False
    if ".." in name or name == ".":
        return False
    return True


def dumps(obj):
    # nlohmann::json dump(-1): compact, UTF-8 kept as is
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _num(x):
    # nlohmann serialises NaN and infinities as null
    return None if isinstance(x, float) and (math.isnan(x) or math.isinf(x)) else x


def timings_json(prompt_n, prompt_ms, predicted_n, predicted_ms, cache_n=None):
    def div(a, b):
        return a / b if b else float("nan")
    out = {} if cache_n is None else {"cache_n": cache_n}       # 2026: result_timings::to_json
    out.update({
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": _num(div(prompt_ms, prompt_n)),
        "prompt_per_second": _num(div(1e3, prompt_ms) * prompt_n if prompt_ms else float("nan")),
        "predicted_n": predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": _num(div(predicted_ms, predicted_n)),
        "predicted_per_second": _num(div(1e3, predicted_ms) * predicted_n if predicted_ms else float("nan")),
    })
    return out


class Failure(Exception):
    """A request error answered as {"error":{...}} (llama) or never answered (ik slot actions)."""

    def __init__(self, code, message, etype=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.etype = etype or {400: "invalid_request_error", 404: "not_found_error",
                               401: "authentication_error", 500: "server_error",
                               501: "not_supported_error",
                               503: "unavailable_error"}.get(code, "server_error")
        self.extra = {}

    reason = ""    # why, for the log (the real answer gives no detail)

    def with_reason(self, why):
        self.reason = why
        return self

    def body(self):
        e = {"code": self.code, "message": self.message, "type": self.etype}
        e.update(self.extra)
        return {"error": e}


class Crash(Exception):
    pass


# --------------------------------------------------------------------------
# slot file layout

def row_size(t, n_el):
    """ggml_row_size(type, n_el)."""
    b, blk = GGML_BLOCK[t]
    return n_el // blk * b


def seq_digest(tokens):
    """A 64-bit value standing for a whole token sequence (the recurrent state depends on it)."""
    return struct.unpack("<q", hashlib.blake2b(array("i", tokens).tobytes(), digest_size=8).digest())[0]


class Section:
    """One llama_kv_cache: the dense model's, or one of the two of an iswa model."""

    def __init__(self, name, layers, n_swa):
        self.name = name
        self.layers = list(layers)      # global layer indices (llama_kv_cache::layers, il order)
        self.n_swa = n_swa              # 0: no masking (is_masked_swa, LLAMA_SWA_TYPE_NONE)

    def positions(self, n, lo=0):
        """The cells state_write() writes for a sequence at positions 0..n-1: the SWA cache skips
        the masked ones (llama_hparams::is_masked_swa, standard: p1 - p0 >= n_swa)."""
        if n <= 0:
            return range(0)
        first = max(lo, n - self.n_swa) if self.n_swa else lo
        return range(first, n)


class Layout:
    """The memory layout of the modelled model, and the slot file formats.

    fmt 2025: Feb 2025 llama.cpp (and ik_llama.cpp): u32 cell_count, cells (i32 pos, u32 0),
        u32 v_trans, u32 n_layer, K, V.
    fmt 2026: llama.cpp mid-2026, src/llama-kv-cache.cpp state_write: per KV cache u32 n_stream,
        per stream u32 cell_count and (if > 0) cells (i32 pos, u32 1, i32 seq_id), v_trans,
        n_layer, K, V. iswa: two such caches (llama-kv-cache-iswa.cpp state_write: base, then
        SWA). recurrent: src/llama-memory-recurrent.cpp state_write.
    """

    EL_BYTES = {"f16": 2.0, "q8_0": 34.0 / 32.0}

    def __init__(self, *, flavor="llama", fmt=2026, version=2, kind="dense", token_form="plain",
                 n_stream=1, n_layer=2, kv_bytes_per_token=1024, n_embd_k_gqa=None,
                 n_embd_v_gqa=None, type_k="f16", type_v="f16", flash_attn=False, n_swa=128,
                 swa_pattern=6, n_embd_r=384, n_embd_s=2048, n_seq_max=1):
        self.ik = flavor == "ik"
        self.version = 4 if self.ik else version
        self.fmt = 2025 if self.ik else fmt
        self.kind = "dense" if self.ik else kind
        self.token_form = "plain" if self.ik else token_form
        self.n_stream = n_stream
        self.n_layer = n_layer
        self.n_seq_max = n_seq_max
        self.type_k, self.type_v = type_k, type_v
        self.v_trans = 0 if flash_attn else 1
        self.n_swa = n_swa
        if self.kind == "recurrent":
            # mamba: r = (d_conv - 1) * d_inner, s = d_state * d_inner, f32 (llama_memory_recurrent)
            self.n_embd_r, self.n_embd_s = n_embd_r, n_embd_s
            self.r_row, self.s_row = row_size("f32", n_embd_r), row_size("f32", n_embd_s)
            self.sections = []
            self.n_embd_gqa = 0
            self.k_row = self.v_row = 0
            self.kv_bytes_per_token = 0
            return
        if n_embd_k_gqa is None or n_embd_v_gqa is None:
            per_el = n_layer * (self.EL_BYTES[type_k] + self.EL_BYTES[type_v])
            e = kv_bytes_per_token / per_el
            if "q8_0" in (type_k, type_v):
                e = max(32, int(round(e / 32.0)) * 32)      # q8_0 blocks of 32
            else:
                e = max(1, int(round(e)))
            n_embd_k_gqa = e if n_embd_k_gqa is None else n_embd_k_gqa
            n_embd_v_gqa = e if n_embd_v_gqa is None else n_embd_v_gqa
        for t, e in ((type_k, n_embd_k_gqa), (type_v, n_embd_v_gqa)):
            if e % GGML_BLOCK[t][1]:
                raise ValueError("n_embd_gqa %d is not a multiple of the %s block size" % (e, t))
        self.n_embd_k_gqa, self.n_embd_v_gqa = n_embd_k_gqa, n_embd_v_gqa
        self.n_embd_gqa = n_embd_k_gqa
        self.k_row = row_size(type_k, n_embd_k_gqa)
        self.v_row = row_size(type_v, n_embd_v_gqa)
        self.v_size_el = GGML_BLOCK[type_v][0]    # only an unquantized V can be transposed
        self.kv_bytes_per_token = n_layer * (self.k_row + self.v_row)
        if self.kind == "iswa":
            # gemma3: llama_hparams::set_swa_pattern(n): layer il uses SWA iff il % n < n - 1
            swa = [il for il in range(n_layer) if il % swa_pattern < swa_pattern - 1]
            base = [il for il in range(n_layer) if il not in swa]
            self.sections = [Section("base", base, 0), Section("swa", swa, n_swa)]
        else:
            self.sections = [Section("kv", range(n_layer), 0)]

    # ---- sizes ------------------------------------------------------------

    def header_bytes(self, n_words):
        return 12 + 4 * n_words

    def token_words(self, tokens):
        """The i32 words after the header's count: plain tokens, or upstream's packed form
        (server_tokens::serialize: -1, version 1, n, tokens, media-key count 0, padding)."""
        if self.token_form == "packed":
            return [TOKENS_NULL, SERVER_TOKENS_STATE_VERSION, len(tokens)] + list(tokens) + [0]
        return list(tokens)

    def _section_size(self, sec, c):
        size = 4 + 4 * self.n_stream
        if c:
            nl = len(sec.layers)
            v = c * (self.v_row if self.v_trans == 0 else self.v_size_el * self.n_embd_v_gqa)
            size += 12 * c + 8 + nl * (12 + c * self.k_row) + nl * (12 + v)
        return size

    def state_size(self, n, swa_lo=0):
        """Bytes of a sequence's state (llama_state_seq_get_size) when it holds positions 0..n-1."""
        if self.fmt == 2025:
            v = n * (self.v_row if self.v_trans == 0 else self.v_size_el * self.n_embd_v_gqa)
            return (4 + 8 * n + 8 + self.n_layer * (12 + n * self.k_row) + self.n_layer * (12 + v)
                    + (8 if self.version == 4 else 0))
        if self.kind == "recurrent":
            c = 1 if n else 0
            return 4 + 8 * c + 8 + self.n_layer * (24 + c * (self.r_row + self.s_row))
        return sum(self._section_size(sec, len(sec.positions(n, swa_lo if sec.n_swa else 0)))
                   for sec in self.sections)

    def file_size(self, n):
        return self.header_bytes(len(self.token_words([0] * n))) + self.state_size(n)

    def fixed_bytes(self):
        return self.file_size(0)

    def per_token_bytes(self):
        return self.file_size(1) - self.file_size(0) if self.kind == "dense" else None

    def describe(self):
        d = {"version": self.version, "state_format": self.fmt, "model_kind": self.kind,
             "token_form": self.token_form, "n_layer": self.n_layer}
        if self.fmt == 2026 and self.kind != "recurrent":
            d["n_stream"] = self.n_stream
        if self.kind == "recurrent":
            d.update({"r_type": "f32", "s_type": "f32", "n_embd_r": self.n_embd_r,
                      "n_embd_s": self.n_embd_s, "r_row_bytes": self.r_row, "s_row_bytes": self.s_row,
                      "s_trans": 0})
        else:
            d.update({"v_trans": self.v_trans, "type_k": self.type_k, "type_v": self.type_v,
                      "n_embd_k_gqa": self.n_embd_k_gqa, "n_embd_v_gqa": self.n_embd_v_gqa,
                      "k_row_bytes": self.k_row, "v_row_bytes": self.v_row,
                      "kv_bytes_per_token": self.kv_bytes_per_token,
                      "sections": [{"name": s.name, "layers": s.layers, "n_swa": s.n_swa}
                                   for s in self.sections]})
        d["fixed_bytes"] = self.fixed_bytes()
        if self.kind == "dense":
            d["per_token_bytes"] = self.per_token_bytes()
        return d

    # ---- deterministic content ---------------------------------------------
    # each cell's K row and V row is a function of (K or V, layer, position, token id); a recurrent
    # state row of (R or S, layer, position, digest of all tokens up to it)

    @staticmethod
    def _cell(kind, layer, pos, tok, nbytes):
        h = hashlib.blake2b(struct.pack("<1sIiq", kind, layer, pos, tok), digest_size=32).digest()
        return (h * (nbytes // 32 + 1))[:nbytes]

    def _rows(self, kind, layer, tokens, positions, nbytes):
        cell = self._cell
        return b"".join(cell(kind, layer, p, tokens[p] if p < len(tokens) else GARBAGE, nbytes)
                        for p in positions)

    def _v_transposed(self, layer, tokens, positions):
        e = self.n_embd_v_gqa
        rows = array("H", self._rows(b"V", layer, tokens, positions, e * 2))   # cell-major
        return b"".join(rows[j::e].tobytes() for j in range(e))               # element-major

    def _v_block(self, layer, tokens, positions):
        if self.v_trans == 0:
            return self._rows(b"V", layer, tokens, positions, self.v_row)
        return self._v_transposed(layer, tokens, positions)

    def _rec_row(self, kind, layer, tokens, nbytes):
        return self._cell(kind, layer, len(tokens) - 1, seq_digest(tokens), nbytes)

    # ---- writing -------------------------------------------------------------

    def header(self, words):
        return struct.pack("<III", LLAMA_STATE_SEQ_MAGIC, self.version, len(words)) + \
            array("i", words).tobytes()

    def state_parts(self, tokens, seq_id=0, stream=0, swa_lo=0):
        """The state after the token array, in file order: the memory of a sequence whose KV
        cells hold `tokens` at positions 0..n-1 (the SWA cache from swa_lo on)."""
        n = len(tokens)
        tk = GGML_TYPE_ID.get(self.type_k)
        tv = GGML_TYPE_ID.get(self.type_v)
        if self.fmt == 2025:
            yield struct.pack("<I", n)                       # cell_count
            meta = array("i", bytes(8 * n))
            meta[0::2] = array("i", range(n))                # i32 pos, u32 n_seq_id = 0
            yield meta.tobytes()
            yield struct.pack("<II", self.v_trans, self.n_layer)
            for l in range(self.n_layer):
                yield struct.pack("<iQ", tk, self.k_row)
                yield self._rows(b"K", l, tokens, range(n), self.k_row)
            for l in range(self.n_layer):
                if self.v_trans == 0:
                    yield struct.pack("<iQ", tv, self.v_row)
                else:
                    yield struct.pack("<iII", tv, self.v_size_el, self.n_embd_v_gqa)
                yield self._v_block(l, tokens, range(n))
            if self.version == 4:
                yield bytes(8)                               # the trailing zeros of ik's files
            return
        if self.kind == "recurrent":
            c = 1 if n else 0
            yield struct.pack("<I", c)
            if c:
                yield struct.pack("<iI", n - 1, 0)           # the sequence's tail cell, n_seq_id 0
            yield struct.pack("<II", 0, self.n_layer)        # s_trans, n_layer
            for l in range(self.n_layer):
                yield struct.pack("<iQ", GGML_TYPE_ID["f32"], self.r_row)
                if c:
                    yield self._rec_row(b"R", l, tokens, self.r_row)
            for l in range(self.n_layer):
                yield struct.pack("<iQ", GGML_TYPE_ID["f32"], self.s_row)
                if c:
                    yield self._rec_row(b"S", l, tokens, self.s_row)
            return
        for sec in self.sections:
            pos = sec.positions(n, swa_lo if sec.n_swa else 0)
            yield struct.pack("<I", self.n_stream)
            for s in range(self.n_stream):
                c = len(pos) if s == stream else 0
                yield struct.pack("<I", c)
                if not c:
                    continue                                 # "skip empty streams"
                meta = array("i", bytes(12 * c))
                meta[0::3] = array("i", pos)
                meta[1::3] = array("i", [1] * c)
                meta[2::3] = array("i", [seq_id] * c)
                yield meta.tobytes()
                yield struct.pack("<II", self.v_trans, len(sec.layers))
                for l in sec.layers:
                    yield struct.pack("<iQ", tk, self.k_row)
                    yield self._rows(b"K", l, tokens, pos, self.k_row)
                for l in sec.layers:
                    if self.v_trans == 0:
                        yield struct.pack("<iQ", tv, self.v_row)
                    else:
                        yield struct.pack("<iII", tv, self.v_size_el, self.n_embd_v_gqa)
                    yield self._v_block(l, tokens, pos)

    # ---- reading -------------------------------------------------------------

    def read_header(self, r, capacity):
        """llama_context::state_seq_load_file up to the token words. capacity None: upstream's
        first pass (the count is checked against the file's size only)."""
        if r.remaining() < 12:
            r.fail("unexpectedly reached end of file")
        magic, version, n = struct.unpack("<III", r.take(12))
        if magic != LLAMA_STATE_SEQ_MAGIC or version != self.version:
            r.fail("unknown (magic, version) for sequence state file: %08x, %08x" % (magic, version))
        if capacity is None:
            if n > r.remaining() // 4:
                r.fail("token count in sequence state file exceeds the file size! %d > %d"
                       % (n, r.remaining() // 4))
        elif n > capacity:
            r.fail("token count in sequence state file exceeded capacity! %d > %d" % (n, capacity))
        return array("i", r.take(4 * n)).tolist()

    @staticmethod
    def unpack_words(words, has_mtmd=False):
        """Upstream server_tokens::deserialize: a plain list, or the packed form."""
        if not words or words[0] != TOKENS_NULL:
            return list(words)
        pos = [1]

        def read():
            if pos[0] >= len(words):
                raise ValueError("Unexpected end of server tokens state")
            pos[0] += 1
            return words[pos[0] - 1]
        if read() & 0xFFFFFFFF != SERVER_TOKENS_STATE_VERSION:
            raise ValueError("Unsupported server tokens state version")
        n = read() & 0xFFFFFFFF
        if n > len(words) - pos[0]:
            raise ValueError("Unexpected end of server tokens state")
        tokens = words[pos[0]:pos[0] + n]
        pos[0] += n
        n_media = read() & 0xFFFFFFFF
        if n_media and not has_mtmd:
            raise ValueError("Cannot restore media tokens without an mmproj")
        if n_media:
            raise ValueError("Cannot load media chunk from server tokens state")
        if len(words) - pos[0] >= 1:
            raise ValueError("Trailing data in server tokens state")
        return tokens

    def parse_2025(self, r, tokens, verify):
        """The Feb 2025 state (llama_kv_cache_unified::state_read of that time), after the tokens.
        Returns the number of cells."""
        take, fail = r.take, r.fail
        n = len(tokens)
        if n == 0:
            raise Crash("restoring a slot file with 0 tokens")
        cell_count, = struct.unpack("<I", take(4))
        if cell_count != n:
            fail("cell_count %d differs from the token count %d" % (cell_count, n))
        meta = array("i", take(8 * cell_count))
        if meta[1::2].count(0) != cell_count:
            fail("invalid seq_id-agnostic kv cell")
        if list(meta[0::2]) != list(range(cell_count)):
            fail("cell positions are not 0..n-1")
        v_trans, n_layer = struct.unpack("<II", take(8))
        if v_trans != self.v_trans:
            fail("incompatible V transposition")
        if n_layer != self.n_layer:
            fail("mismatched layer count (%d instead of %d)" % (n_layer, self.n_layer))
        self._read_kv(r, range(self.n_layer), tokens, range(n), verify, v_trans)
        if self.version == 4:
            take(8)
        return n

    def _read_kv(self, r, layers, tokens, positions, verify, v_trans):
        """K entries then V entries of one stream (state_read_data)."""
        take, fail = r.take, r.fail
        c = len(positions)
        tk, tv = GGML_TYPE_ID[self.type_k], GGML_TYPE_ID[self.type_v]
        for l in layers:
            t, row = struct.unpack("<iQ", take(12))
            if t != tk:
                fail("mismatched key type (%d != %d, layer %d)" % (tk, t, l))
            if row != self.k_row:
                fail("mismatched key row size (%d != %d, layer %d)" % (self.k_row, row, l))
            rows = take(row * c)
            if verify and rows != self._rows(b"K", l, tokens, positions, self.k_row):
                fail("K bytes of layer %d are not the ones for these tokens" % l)
        for l in layers:
            if v_trans == 0:
                t, row = struct.unpack("<iQ", take(12))
                if t != tv:
                    fail("mismatched value type (%d != %d, layer %d)" % (tv, t, l))
                if row != self.v_row:
                    fail("mismatched value row size (%d != %d, layer %d)" % (self.v_row, row, l))
                rows = take(row * c)
            else:
                t, el, ne = struct.unpack("<iII", take(12))
                if t != tv:
                    fail("mismatched value type (%d != %d, layer %d)" % (tv, t, l))
                if el != self.v_size_el:
                    fail("mismatched value element size (%d != %d, layer %d)" % (self.v_size_el, el, l))
                if ne != self.n_embd_v_gqa:
                    fail("mismatched GQA embedding size (%d != %d, layer %d)" % (self.n_embd_v_gqa, ne, l))
                rows = take(el * ne * c)
            if verify and rows != self._v_block(l, tokens, positions):
                fail("V bytes of layer %d are not the ones for these tokens" % l)

    def parse_2026(self, r, tokens, verify, room):
        """Today's state after the token words (llama_kv_cache::state_read, state_read_meta,
        state_read_data; llama_memory_recurrent::state_read). `tokens` are the header's tokens
        (what the KV bytes are checked against), `room(section, cells)` the free cells the
        destination has for that section. Returns {"cells": base cells, "pos_min": the memory's
        seq_pos_min after the restore (-1 if empty)}."""
        take, fail = r.take, r.fail
        n = len(tokens)
        out = {"cells": 0, "pos_min": -1}
        if self.kind == "recurrent":
            c, = struct.unpack("<I", take(4))
            cells = []
            for _ in range(c):
                pos, n_seq = struct.unpack("<iI", take(8))
                if n_seq != 0:
                    fail("invalid seq_id-agnostic kv cell")
                cells.append(pos)
            if c and c > room(None, c):
                fail("failed to find available cells in kv cache")
            s_trans, n_layer = struct.unpack("<II", take(8))
            if n_layer != self.n_layer:
                fail("mismatched layer count (%d instead of %d)" % (n_layer, self.n_layer))
            if c > self.n_seq_max:
                fail("not enough cells in kv cache to restore state (%d > %d)" % (c, self.n_seq_max))
            if s_trans:
                fail("incompatible s transposition")
            if verify and c and (cells != [n - 1]):
                fail("the recurrent cell is not at the last token's position")
            f32 = GGML_TYPE_ID["f32"]
            for kind, want in ((b"R", self.r_row), (b"S", self.s_row)):
                for l in range(self.n_layer):
                    t, row = struct.unpack("<iQ", take(12))
                    if t != f32:
                        fail("mismatched %s type (%d != %d, layer %d)" % (kind.decode().lower(), f32, t, l))
                    if row != want:
                        fail("mismatched %s row size (%d != %d, layer %d)" % (kind.decode().lower(), want, row, l))
                    rows = take(row * c)
                    if verify and c and rows != self._rec_row(kind, l, tokens, want):
                        fail("%s bytes of layer %d are not the ones for these tokens" % (kind.decode(), l))
            if c:
                # the memory then holds positions 0..pos (n_cells counts positions, not
                # the one recurrent cell)
                out["cells"], out["pos_min"] = cells[-1] + 1, cells[-1]
            return out
        for sec in self.sections:
            n_stream, = struct.unpack("<I", take(4))
            if n_stream != self.n_stream:
                fail("n_stream mismatch (%d in the file, %d here)" % (n_stream, self.n_stream))
            for _ in range(n_stream):
                c, = struct.unpack("<I", take(4))
                if c == 0:
                    continue
                meta = array("i", take(12 * c))   # pos, n_seq_id, seq_id (n_seq_id must be 1)
                if meta[1::3].count(1) != c:
                    fail("invalid seq_id-agnostic kv cell")
                positions = list(meta[0::3])
                if c > room(sec, c):
                    fail("failed to find %d available cells in kv cache" % c)
                v_trans, n_layer = struct.unpack("<II", take(8))
                if n_layer != len(sec.layers):
                    fail("mismatched layer count (%d instead of %d)" % (n_layer, len(sec.layers)))
                if v_trans != self.v_trans:
                    fail("incompatible V transposition")
                if verify and positions != list(sec.positions(n)):
                    fail("%s cell positions are not the ones of the file's tokens" % sec.name)
                self._read_kv(r, sec.layers, tokens, positions, verify, v_trans)
                if sec.n_swa or self.kind == "dense":
                    out["pos_min"] = min(positions)
                if sec is self.sections[0]:
                    out["cells"] = c
        return out


class Reader:
    """Sequential reads over a slot file's bytes; a short read is a failed restore."""

    def __init__(self, data):
        self.data = data
        self.off = 0

    def remaining(self):
        return len(self.data) - self.off

    def fail(self, why):
        raise Failure(400, RESTORE_FAILED).with_reason(why)

    def take(self, k):
        if self.remaining() < k:
            self.fail("unexpectedly reached end of file")
        b = self.data[self.off:self.off + k]
        self.off += k
        return b


# --------------------------------------------------------------------------
# server state

def pad(x, n):
    return (x + n - 1) // n * n


def cmod(a, n):
    """C++ a % n (the sign follows a)."""
    r = abs(a) % n
    return -r if a < 0 else r


class Slot:
    def __init__(self, sid, n_ctx):
        self.id = sid
        self.n_ctx = n_ctx
        self.tokens = []            # what the slot's prompt holds (slot.prompt.tokens)
        self.n_cells = 0            # the positions 0..n_cells-1 its memory holds
        self.pos_min = -1           # llama_memory_seq_pos_min of its memory (-1: empty)
        self.checkpoints = []       # context checkpoints (dicts), 2026
        self.busy = False           # processing a completion
        self.in_action = False      # a save/restore/erase is running on it
        self.prefilling = False
        self.t_last_used = -1.0
        self.id_task = -1
        self.has_task = False       # task or task_prev set (2026 /slots shows more then)
        self.prompt_text = ""
        self.params = None
        self.n_decoded = 0
        self.n_remaining = -1
        self.n_prompt_tokens_processed = 0
        self.n_prompt_tokens_cache = 0
        self.generated = ""
        self.last_prompt_n = None
        self.last_tokens_evaluated = None


class PromptCache:
    """server_prompt_cache (tools/server/server-task.cpp): the RAM prompt cache of --cache-ram."""

    def __init__(self, limit_mib, limit_tokens):
        self.limit_size = 1024 * 1024 * (0 if limit_mib < 0 else limit_mib)   # 0 = no limit
        self.limit_tokens = limit_tokens
        self.states = []            # oldest first: {"tokens", "checkpoints", "n_cells", "pos_min", "data"}

    @staticmethod
    def _size(st):
        return st["data"] + sum(c["size"] for c in st["checkpoints"])

    def size(self):
        return sum(self._size(st) for st in self.states)

    def n_tokens(self):
        return sum(len(st["tokens"]) for st in self.states)

    def alloc(self, tokens, checkpoints, n_cells, pos_min, state_size):
        """server_prompt_cache::alloc: None when the prompt is already held, or too big."""
        for st in self.states:
            if common_prefix(st["tokens"], tokens) == len(tokens):
                return None                     # "prompt is already in the cache, skipping"
        new = state_size + sum(c["size"] for c in checkpoints)
        if self.limit_size > 0 and new > self.limit_size:
            return None                         # "exceeds cache size limit, skipping"
        self.states = [st for st in self.states                 # remove entries it contains
                       if common_prefix(st["tokens"], tokens) != len(st["tokens"])]
        if self.limit_size > 0:
            while self.states and self.size() + new > self.limit_size:
                self.states.pop(0)
        st = {"tokens": list(tokens), "checkpoints": [dict(c) for c in checkpoints],
              "n_cells": n_cells, "pos_min": pos_min, "data": state_size}
        self.states.append(st)
        return st

    def best(self, slot_tokens, new_tokens):
        """server_prompt_cache::load: the entry that keeps more and matches more than the slot."""
        lcp = common_prefix(slot_tokens, new_tokens)
        f_keep_best = lcp / len(slot_tokens) if slot_tokens else -1.0
        f_sim_best = lcp / len(new_tokens) if new_tokens else float("nan")
        best = None
        for st in self.states:
            cur = common_prefix(st["tokens"], new_tokens)
            f_keep = cur / len(st["tokens"])
            f_sim = cur / len(new_tokens) if new_tokens else float("nan")
            if f_keep < 0.25:
                continue                        # "don't trash large prompts"
            if f_keep_best < f_keep and f_sim_best < f_sim:
                f_keep_best, f_sim_best, best = f_keep, f_sim, st
        return best

    def update(self):
        """server_prompt_cache::update: drop the oldest entries beyond the size and token limits."""
        if self.limit_size > 0:
            while self.states and self.size() > self.limit_size:
                self.states.pop(0)
        size_per_token = max(1.0, float(self.size()) / max(1, self.n_tokens()))
        limit_cur = (max(self.limit_tokens, int(self.limit_size / size_per_token))
                     if self.limit_size > 0 else self.limit_tokens)
        if self.limit_tokens > 0:
            while self.states and self.n_tokens() > limit_cur:
                self.states.pop(0)

    def describe(self):
        return [{"n_tokens": len(st["tokens"]), "size": self._size(st),
                 "n_checkpoints": len(st["checkpoints"])} for st in self.states]


class Double:
    """One llama-server (in router mode: one model's child server)."""

    CONFIG_KEYS = {
        "fail_restore": bool, "save_fails_silently": bool, "hang_slot_actions": bool,
        "ignore_restore": bool, "kv_fragmented": bool, "verify_kv": bool,
        "prefill_ms_per_token": float, "gen_ms_per_token": float,
        "restore_bytes_per_ms": float, "save_bytes_per_ms": float, "wedged": bool,
        "slots_read_ms": float, "lose_slot_answers": bool,
    }

    def __init__(self, args, name=None):
        self.args = args
        self.name = name
        self.flavor = args.flavor
        self.era = args.era                              # 2025 or 2026
        self.flash_attn = args.fa
        self.n_slots = args.n_slots
        self.unified = args.unified
        self.n_ctx = args.n_ctx_total
        self.kv_size = args.kv_size                       # cells per KV stream
        self.n_ctx_slot = args.n_ctx_slot
        self.layout = Layout(
            flavor=args.flavor, fmt=args.state_format, version=args.file_version,
            kind=args.model_kind, token_form=args.token_form,
            n_stream=1 if self.unified else self.n_slots, n_layer=args.n_layer,
            kv_bytes_per_token=args.kv_bytes_per_token, n_embd_k_gqa=args.n_embd_k_gqa,
            n_embd_v_gqa=args.n_embd_v_gqa, type_k=args.cache_type_k, type_v=args.cache_type_v,
            flash_attn=self.flash_attn, n_swa=args.n_swa, swa_pattern=args.swa_pattern,
            n_embd_r=args.n_embd_r, n_embd_s=args.n_embd_s, n_seq_max=self.n_slots)
        self.kind = self.layout.kind
        self.upstream = self.layout.token_form == "packed"  # slot actions of upstream master
        self.swa_full = args.swa_full and self.kind == "iswa"
        # server_context::n_swa: 0 with --swa-full or a model without SWA
        self.n_swa_eff = args.n_swa if (self.kind == "iswa" and not self.swa_full) else 0
        # llama_kv_cache_iswa: size_swa = pad(min(size_base, n_swa*(unified ? n_seq : 1) + n_ubatch), 256)
        self.swa_size = self.kv_size if self.swa_full else pad(
            min(self.kv_size, args.n_swa * (self.n_slots if self.unified else 1) + args.ubatch_size), 256)
        # update_slots: checkpoints for memory that cannot be rolled back (recurrent, SWA)
        self.do_checkpoints = (self.era == 2026 and args.ctx_checkpoints > 0
                               and (self.kind == "recurrent" or self.n_swa_eff > 0))
        self.slots = [Slot(i, self.n_ctx_slot) for i in range(self.n_slots)]
        self.cache = (PromptCache(args.cache_ram, self.n_ctx)
                      if self.era == 2026 and args.cache_ram != 0 else None)
        self.cache_idle = self.cache is not None and args.cache_idle_slots
        self.similarity = args.slot_prompt_similarity
        self.cv = threading.Condition()
        self.decode_lock = threading.Lock()     # the server's single decode loop
        self.slots_endpoint = args.slots_endpoint or args.flavor == "ik"
        self.save_dir = args.slot_save_path
        if self.save_dir and not self.save_dir.endswith("/"):
            self.save_dir += "/"
        self.config = {
            "fail_restore": args.fail_restore, "save_fails_silently": args.save_fails_silently,
            "hang_slot_actions": args.hang_slot_actions, "ignore_restore": args.ignore_restore,
            "kv_fragmented": args.kv_fragmented, "verify_kv": not args.no_verify_kv,
            "prefill_ms_per_token": args.prefill_ms_per_token, "gen_ms_per_token": args.gen_ms_per_token,
            "restore_bytes_per_ms": args.restore_bytes_per_ms, "save_bytes_per_ms": args.save_bytes_per_ms,
            "wedged": False, "slots_read_ms": 0.0, "lose_slot_answers": False,
        }
        self.counters = {k: 0 for k in (
            "requests", "completions", "prefilled_tokens", "generated_tokens", "saves",
            "saves_failed", "restores", "restores_failed", "erases", "slot_actions_hung",
            "requests_hung", "slots_reads", "slot_answers_lost", "cache_saves", "cache_loads",
            "idle_slots_cleared", "checkpoints_created", "checkpoints_used", "full_reprocess")}
        self.ik_failed_actions = 0
        self.next_task = 0
        self.stopping = False
        self.model_alias = name or args.model_name
        self.model_path = args.model

    def count(self, key, n=1):
        with self.cv:
            self.counters[key] += n

    def cfg(self, key):
        with self.cv:
            return self.config[key]

    def model_meta(self):
        n_embd = max(1, self.layout.n_embd_gqa) * 2
        n_params = N_VOCAB * n_embd * 2 + self.layout.n_layer * 12 * n_embd * n_embd
        return {"vocab_type": 1, "n_vocab": N_VOCAB, "n_ctx_train": N_CTX_TRAIN,
                "n_embd": n_embd, "n_params": n_params, "size": n_params * 2}

    def params_json(self, p=None):
        p = p or {}
        n_predict = p.get("n_predict", -1)
        return {
            "n_predict": n_predict, "seed": p.get("seed", 4294967295),
            "temperature": p.get("temperature", 0.8), "dynatemp_range": 0.0, "dynatemp_exponent": 1.0,
            "top_k": p.get("top_k", 40), "top_p": p.get("top_p", 0.95), "min_p": p.get("min_p", 0.05),
            "xtc_probability": 0.0, "xtc_threshold": 0.1, "typical_p": 1.0,
            "repeat_last_n": 64, "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "dry_multiplier": 0.0, "dry_base": 1.75, "dry_allowed_length": 2, "dry_penalty_last_n": self.n_ctx_slot,
            "dry_sequence_breakers": ["\n", ":", "\"", "*"], "mirostat": 0, "mirostat_tau": 5.0, "mirostat_eta": 0.1,
            "stop": p.get("stop", []), "max_tokens": n_predict, "n_keep": 0, "n_discard": 0,
            "ignore_eos": False, "stream": p.get("stream", False), "logit_bias": [], "n_probs": 0,
            "min_keep": 0, "grammar": "", "grammar_lazy": False, "grammar_triggers": [], "preserved_tokens": [],
            "chat_format": "Content-only",
            "samplers": ["penalties", "dry", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature"],
            "speculative.n_max": 16, "speculative.n_min": 0, "speculative.p_min": 0.75,
            "timings_per_token": False, "post_sampling_probs": False, "lora": [],
        }

    def slot_json(self, s):
        if self.era == 2026:
            # server_slot::to_json (mid-2026): the task fields only once the slot has had a task
            out = {"id": s.id, "n_ctx": s.n_ctx, "speculative": False, "is_processing": s.busy}
            if s.has_task:
                out.update({
                    "id_task": s.id_task, "n_prompt_tokens": len(s.tokens),
                    "n_prompt_tokens_processed": s.n_prompt_tokens_processed,
                    "n_prompt_tokens_cache": s.n_prompt_tokens_cache,
                    "params": self.params_json(s.params),
                    "next_token": [{"has_next_token": True, "has_new_line": False,
                                    "n_remain": s.n_remaining, "n_decoded": s.n_decoded}],
                    "prompt": s.prompt_text, "generated": s.generated})
            return out
        return {
            "id": s.id, "id_task": s.id_task, "n_ctx": s.n_ctx, "speculative": False,
            "is_processing": s.busy, "non_causal": False, "params": self.params_json(s.params),
            "prompt": s.prompt_text,
            "next_token": {"has_next_token": True, "has_new_line": False, "n_remain": s.n_remaining,
                           "n_decoded": s.n_decoded, "stopping_word": ""},
        }

    # ---- the memory of a slot (call with self.cv held) ---------------------

    def clear(self, s):
        """server_slot::prompt_clear: tokens, checkpoints and memory."""
        s.tokens = []
        s.checkpoints = []
        s.n_cells = 0
        s.pos_min = -1

    def keep_first(self, s, n):
        """slot.prompt.tokens.keep_first(n) and memory_seq_rm(id, n, -1)."""
        s.tokens = s.tokens[:n]
        s.n_cells = min(s.n_cells, n)
        if s.n_cells == 0:
            s.pos_min = -1
        elif self.kind == "recurrent":
            s.pos_min = s.n_cells - 1
        elif s.pos_min > s.n_cells - 1:
            s.pos_min = -1

    def appended(self, s, k):
        """k more positions decoded into the slot's memory."""
        s.n_cells += k
        if self.kind == "recurrent":
            s.pos_min = s.n_cells - 1
        elif self.kind == "iswa" and not self.swa_full:
            # the SWA cache is a ring of swa_size cells: older cells are overwritten
            s.pos_min = max(s.pos_min if s.pos_min >= 0 else 0, s.n_cells - self.swa_size)
        elif s.pos_min < 0:
            s.pos_min = 0

    def swa_lo(self, s):
        return s.pos_min if (self.kind == "iswa" and s.pos_min > 0) else 0

    def saved_pos_min(self, s):
        """seq_pos_min after the slot's state is written and read back (state_write skips the
        SWA-masked cells)."""
        if s.n_cells == 0:
            return -1
        if self.kind == "recurrent":
            return s.n_cells - 1
        if self.kind == "iswa":
            return max(self.swa_lo(s), s.n_cells - self.layout.n_swa)
        return 0

    def kv_tokens(self, s):
        t = s.tokens[:s.n_cells]
        return t + [GARBAGE] * (s.n_cells - len(t))

    def used_cells(self, but=None):
        return sum(o.n_cells for o in self.slots if o is not but)

    def room(self, s, sec):
        """Free cells for slot s in a KV cache section (find_slot), its own cells removed first."""
        if sec is None:                                  # recurrent: one cell per sequence
            return 1
        if sec.n_swa:
            return self.swa_size
        if self.unified:
            return self.n_ctx - self.used_cells(but=s)
        return self.kv_size

    def make_room(self, s, k):
        """Before decoding k more tokens of slot s: with a unified KV cache the other slots share
        the cells; update_slots/decode clears idle slots one by one (try_clear_idle_slots)."""
        if not self.unified or self.kind == "recurrent":
            return
        while self.used_cells() + k > self.n_ctx:
            idle = [o for o in self.slots if o is not s and not o.busy and not o.in_action and o.n_cells]
            if not idle:
                raise Failure(500, "Context size has been exceeded.")
            self.clear(idle[0])
            self.counters["idle_slots_cleared"] += 1

    def state_size(self, s):
        return self.layout.state_size(s.n_cells, self.swa_lo(s))

    def checkpoint_size(self, pos_min, pos_max):
        if self.kind == "recurrent":
            return self.layout.state_size(1)
        sec = self.layout.sections[-1]
        return self.layout._section_size(sec, max(0, pos_max - max(pos_min, 0) + 1))

    # ---- the RAM prompt cache (2026, --cache-ram) ---------------------------

    def prompt_save(self, s):
        """server_slot::prompt_save."""
        if not s.tokens or self.cache is None:
            return False
        st = self.cache.alloc(s.tokens, s.checkpoints, s.n_cells, self.saved_pos_min(s), self.state_size(s))
        if st is None:
            return False
        self.counters["cache_saves"] += 1
        return True

    def prompt_load(self, s, new_tokens):
        """server_slot::prompt_load: take the cached prompt that serves new_tokens better."""
        st = self.cache.best(s.tokens, new_tokens)
        if st is not None:
            self.cache.states.remove(st)
            s.tokens = st["tokens"]
            s.checkpoints = st["checkpoints"]
            s.n_cells = st["n_cells"]
            s.pos_min = st["pos_min"]
            self.counters["cache_loads"] += 1
        return True

    # ---- slot reservation -------------------------------------------------

    def processing(self, s):
        return s.busy or s.in_action

    def slot_by_id(self, id_slot):
        """get_slot_by_id: 2026 wraps an id beyond the slots around (C++ %)."""
        if self.era == 2026:
            i = cmod(id_slot, len(self.slots))
            return self.slots[i] if i >= 0 else None
        return self.slots[id_slot] if 0 <= id_slot < len(self.slots) else None

    def _pick_idle(self, prompt):
        """Feb 2025: the idle slot sharing more than --slot-prompt-similarity of its tokens, else LRU."""
        idle = [s for s in self.slots if not self.processing(s)]
        if not idle:
            return None
        best, best_len = None, 0
        thr = self.similarity
        if thr != 0.0:
            for s in idle:
                if not s.tokens:
                    continue
                lcp = common_prefix(s.tokens, prompt)
                if lcp > best_len and lcp / len(s.tokens) > thr:
                    best, best_len = s, lcp
        if best is None:
            best = min(idle, key=lambda s: s.t_last_used)          # least recently used
        return best

    def _select_2026(self, id_slot, prompt):
        """server_context::get_available_slot (mid-2026): (slot, update_cache)."""
        ret = self.slot_by_id(id_slot) if id_slot != -1 else None
        update = False
        if self.similarity != 0.0:
            f_best = 0.0
            for s in self.slots:
                if id_slot != -1 and s.id != id_slot:
                    continue
                if self.processing(s) or not s.tokens:
                    continue
                lcp = common_prefix(s.tokens, prompt)
                f = lcp / len(prompt) if prompt else 0.0
                if f > f_best and f > self.similarity:
                    f_best, ret = f, s
            if ret is not None and ret.tokens:
                # f_keep < 0.5: "about to lose a large portion of the existing context"
                if (f_best * len(prompt)) / len(ret.tokens) < 0.5:
                    update = True
        if ret is None:
            t_last = -1
            for s in self.slots:
                if self.processing(s):
                    continue
                if ret is None or s.t_last_used <= t_last:
                    t_last, ret = s.t_last_used, s
            if ret is not None:
                update = True
        return ret, update

    def acquire_for_completion(self, id_slot, prompt, gone):
        """Wait for the requested slot (or any idle slot); None if the client left."""
        with self.cv:
            while True:
                if self.era == 2026:
                    s, update = self._select_2026(id_slot, prompt)
                    if s is not None and not self.processing(s):
                        if update and self.cache is not None:
                            self.prompt_save(s)
                            self.prompt_load(s, prompt)
                            self.cache.update()
                        break
                elif id_slot != -1:
                    s = self.slot_by_id(id_slot)
                    if s is not None and not self.processing(s):
                        break
                else:
                    s = self._pick_idle(prompt)
                    if s is not None:
                        break
                self.cv.wait(0.2)                          # deferred: retried when a slot frees
                if gone() or self.stopping:
                    return None
            s.busy = True
            s.has_task = True
            s.id_task = self.next_task
            self.next_task += 1
            if self.cache_idle:
                # process_single_task: idle slots are saved to the prompt cache, and cleared
                # with a unified KV cache [TAG_IDLE_SLOT_CLEAR]
                for o in self.slots:
                    if self.processing(o):
                        continue
                    if self.prompt_save(o):
                        self.cache.update()
                    if self.unified and o.tokens:
                        self.clear(o)
                        self.counters["idle_slots_cleared"] += 1
            return s

    def release(self, s):
        with self.cv:
            s.busy = False
            s.t_last_used = time.monotonic()
            self.cv.notify_all()

    def acquire_for_action(self, s):
        with self.cv:
            while s.busy or s.in_action:
                self.cv.wait()
            s.in_action = True

    def end_action(self, s):
        with self.cv:
            s.in_action = False
            self.cv.notify_all()

    # ---- prompt reuse (update_slots) ------------------------------------------

    def reuse(self, s, prompt, cache_prompt):
        """How many cached tokens the prompt keeps; trims the slot to them. Call with cv held."""
        n_prompt = len(prompt)
        if self.era == 2025:
            n_past = common_prefix(s.tokens, prompt) if cache_prompt else 0
            if n_past == n_prompt and n_past > 0:
                n_past -= 1
            if cache_prompt:
                self.keep_first(s, n_past)
            else:
                self.clear(s)
            return n_past
        # server-context.cpp update_slots, SLOT_STATE_STARTED (mid-2026)
        n_past = common_prefix(s.tokens, prompt) if cache_prompt else 0
        pos_next = n_past
        has_new = n_past < n_prompt
        thold = max(0, pos_next - self.n_swa_eff - (0 if has_new else 1))
        if 0 < n_past <= len(s.tokens):
            if s.pos_min == -1 or s.pos_min >= thold:
                found = None
                for c in reversed(s.checkpoints):
                    if c["pos_max"] > pos_next:
                        continue
                    if c["pos_min"] < thold or c["pos_min"] == 0:
                        found = c
                        break
                if found is not None:
                    pos_next = min(pos_next, max(found["pos_min"] + 1, found["pos_max"]))
                    n_past = min(pos_next, found["n_tokens"])
                    s.pos_min = found["pos_min"]            # the partial state is restored
                    if self.kind == "recurrent":
                        s.n_cells = found["pos_max"] + 1
                    self.counters["checkpoints_used"] += 1
                else:
                    # "forcing full prompt re-processing due to lack of cache data"
                    pos_next = n_past = 0
                    self.counters["full_reprocess"] += 1
        s.checkpoints = [c for c in s.checkpoints if c["pos_max"] <= pos_next]
        if n_past == n_prompt and n_past > 0:
            n_past -= 1                                     # [TAG_PROMPT_LOGITS]
        self.keep_first(s, n_past)
        return n_past

    def next_batch(self, s, n, n_prompt):
        """The tokens of the next prompt batch, and whether a checkpoint is made before it."""
        a = self.args
        step = min(a.batch_size, n_prompt - n)
        if self.do_checkpoints:
            for off in (4 + a.ubatch_size, 4):
                k = n_prompt - min(a.batch_size, off) - n
                if 1 <= k < step:
                    step = k
        if not self.do_checkpoints:
            return step, False
        n_end = n + step
        near_end = n_prompt < n_end + a.ubatch_size
        dc = n_end == n_prompt or near_end
        dc = dc and s.pos_min >= 0
        dc = dc and (not s.checkpoints or near_end
                     or n > s.checkpoints[-1]["n_tokens"] + a.checkpoint_min_step)
        return step, dc

    def create_checkpoint(self, s, n_tokens):
        """server_context::create_checkpoint, before the batch is decoded."""
        a = self.args
        kept, last = [], -1
        for c in s.checkpoints:
            if c["id_task"] != s.id_task and last >= 0 and c["n_tokens"] <= last + a.checkpoint_min_step:
                continue
            last = c["n_tokens"]
            kept.append(c)
        while len(kept) >= a.ctx_checkpoints:
            kept.pop(0)
        pos_max = s.n_cells - 1
        kept.append({"id_task": s.id_task, "n_tokens": n_tokens, "pos_min": s.pos_min,
                     "pos_max": pos_max, "size": self.checkpoint_size(s.pos_min, pos_max)})
        s.checkpoints = kept
        self.counters["checkpoints_created"] += 1


# --------------------------------------------------------------------------
# HTTP

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; without TCP_NODELAY a
    # client that delays its ACKs waits 40 ms for the body (Nagle). A real
    # llama-server (cpp-httplib) does not stall like that.
    disable_nagle_algorithm = True
    server_version = "llama.cpp"

    def version_string(self):
        return "llama.cpp"

    def log_message(self, fmt, *args):
        if self.server.double.args.verbose:
            sys.stderr.write("llama_double: %s - %s\n" % (self.address_string(), fmt % args))

    _d = None

    @property
    def d(self):
        """The server (router mode: the model's child server) this request goes to."""
        return self._d or self.server.double

    # ---- plumbing ---------------------------------------------------------

    def read_body(self):
        """The request body; None for a POST with neither Content-Length nor chunked encoding."""
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            parts = []
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline(65537)
            return b"".join(parts)
        if self.headers.get("Content-Length") is None:
            return None
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def _headers(self, code, ctype, extra=()):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Access-Control-Allow-Origin", self.headers.get("Origin", ""))
        for k, v in extra:
            self.send_header(k, v)

    def send_json(self, code, obj):
        body = dumps(obj).encode("utf-8")
        self._headers(code, "application/json; charset=utf-8", [("Content-Length", str(len(body)))])
        self.end_headers()
        self.wfile.write(body)

    def send_error_json(self, f):
        self.send_json(f.code, f.body())

    def client_gone(self):
        """True when the client closed its end (the real server polls this too)."""
        try:
            r, _, _ = select.select([self.connection], [], [], 0)
            if not r:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def hang(self, why):
        """Never answer: hold the connection until the client gives up."""
        self.d.count("requests_hung")
        if self.d.args.verbose:
            sys.stderr.write("llama_double: not answering %s %s (%s)\n" % (self.command, self.path, why))
        self.close_connection = True
        sock = self.connection
        while not self.d.stopping:
            try:
                r, _, _ = select.select([sock], [], [], 0.25)
                if r and not sock.recv(65536):
                    return
            except (OSError, ValueError):
                return

    def parse_json(self, body):
        if not body:
            raise Failure(500, EMPTY_JSON)
        try:
            return json.loads(body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise Failure(500, "[json.exception.parse_error.101] parse error: %s" % e)

    # ---- routing ----------------------------------------------------------

    def do_OPTIONS(self):
        self._headers(200, "text/html", [("Access-Control-Allow-Credentials", "true"),
                                         ("Access-Control-Allow-Methods", "GET, POST"),
                                         ("Access-Control-Allow-Headers", "*"),
                                         ("Content-Length", "0")])
        self.end_headers()

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def api_key_ok(self, path):
        """server-http.cpp middleware_validate_api_key: every path but the public ones needs a
        key, as "Authorization: Bearer KEY" (or without "Bearer ") or "X-Api-Key: KEY"."""
        keys = self.server.api_keys
        if not keys or path in PUBLIC_PATHS or path.startswith("/__double/"):
            return True
        k = self.headers.get("Authorization") or ""
        if not k:
            k = self.headers.get("X-Api-Key") or ""
        if k.startswith("Bearer "):
            k = k[len("Bearer "):]
        return k in keys

    def dispatch(self, method):
        d = self.d
        url = urllib.parse.urlsplit(self.path)
        path, query = url.path, urllib.parse.parse_qs(url.query)
        body = self.read_body() if method == "POST" else b""
        if not path.startswith("/__double/"):
            d.count("requests")
            if d.cfg("wedged"):
                return self.hang("ik server wedged after failed slot actions")
        if body is None:
            if d.era == 2026:
                # cpp-httplib reads a POST body without a length until the connection closes
                return self.hang("POST without Content-Length")
            body = b""
        try:
            if not self.api_key_ok(path):
                raise Failure(401, "Invalid API Key")
            if self.server.router is not None and not path.startswith("/__double/"):
                return self.server.router.route(self, method, path, query, body)
            return self.route(method, path, query, body)
        except Failure as f:
            self.send_error_json(f)
        except Crash as c:
            sys.stderr.write("llama_double: %s: llama-server aborts here (GGML_ASSERT); exiting 134\n" % c)
            sys.stderr.flush()
            os._exit(134)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # the real exception handler answers 500
            try:
                self.send_error_json(Failure(500, str(e)))
            except OSError:
                self.close_connection = True

    def route(self, method, path, query, body):
        route = ROUTES.get((method, path))
        if route is not None:
            return route(self, body, query)
        m = re.fullmatch(r"/slots/([^/]+)", path)
        if method == "POST" and m:
            return self.slot_action(m.group(1), query, body)
        raise Failure(404, "File Not Found")

    # ---- simple endpoints -------------------------------------------------

    def h_health(self, body, q):
        d = self.d
        if self.server.health_blocks:
            # ik_llama.cpp under load: /health waits for the prompt being processed
            with d.cv:
                while any(s.prefilling for s in d.slots) and not d.stopping:
                    d.cv.wait(0.05)
        self.send_json(200, {"status": "ok"})

    def h_props(self, body, q):
        d = self.d
        with d.cv:
            dgs = d.slot_json(d.slots[0])
        self.send_json(200, {
            "default_generation_settings": dgs,
            "total_slots": len(d.slots),
            "model_path": d.model_path,
            "chat_template": CHATML_TEMPLATE,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "build_info": BUILD_INFO,
        })

    def h_models(self, body, q):
        d = self.d
        self.send_json(200, {"object": "list", "data": [{
            "id": d.model_alias or d.model_path, "object": "model", "created": int(time.time()),
            "owned_by": "llamacpp", "meta": d.model_meta()}]})

    def h_slots(self, body, q):
        d = self.d
        if not d.slots_endpoint:
            raise Failure(501, "This server does not support slots endpoint. Start it with `--slots`")
        # llama-server answers GET /slots from its task loop, between two batches.
        if d.cfg("slots_read_ms") > 0:
            time.sleep(d.cfg("slots_read_ms") / 1e3)
        with d.cv:
            data = [d.slot_json(s) for s in d.slots]
            idle = sum(1 for s in d.slots if not s.busy)
            d.counters["slots_reads"] += 1
        if "fail_on_no_slot" in q and idle == 0:
            raise Failure(503, "no slot available")
        self.send_json(200, data)

    def h_metrics(self, body, q):
        raise Failure(501, "This server does not support metrics endpoint. Start it with `--metrics`")

    def h_tokenize(self, body, q):
        req = self.parse_json(body)
        out = []
        if isinstance(req, dict) and "content" in req:
            toks = self.prompt_tokens(req["content"], bool(req.get("add_special", False)))
            if req.get("with_pieces", False):
                for t in toks:
                    pb = piece_bytes(t)
                    try:
                        piece = pb.decode("utf-8")
                    except UnicodeDecodeError:
                        piece = list(pb)
                    out.append({"id": t, "piece": piece})
            else:
                out = toks
        self.send_json(200, {"tokens": out})

    def h_detokenize(self, body, q):
        req = self.parse_json(body)
        content = ""
        if isinstance(req, dict) and "tokens" in req:
            content = detokenize([int(t) for t in req["tokens"]])
        self.send_json(200, {"content": content})

    def h_apply_template(self, body, q):
        req = self.parse_json(body)
        self.send_json(200, {"prompt": chatml(req["messages"])})

    # ---- the double's own endpoints ----------------------------------------

    def all_doubles(self):
        r = self.server.router
        return [self.server.double] if r is None else r.loaded() or [self.server.double]

    def h_double_config(self, body, q):
        req = self.parse_json(body)
        if not isinstance(req, dict):
            raise Failure(400, "body must be an object")
        for k in req:
            if k not in Double.CONFIG_KEYS:
                raise Failure(400, "unknown config key: %s" % k)
        targets = self.all_doubles()
        if self.server.router is not None:
            self.server.router.config.update(req)           # for models loaded later
        for d in targets:
            with d.cv:
                for k, v in req.items():
                    d.config[k] = Double.CONFIG_KEYS[k](v)
                if "wedged" in req and not req["wedged"]:
                    d.ik_failed_actions = 0
                cfg = dict(d.config)
        self.send_json(200, cfg)

    @staticmethod
    def double_state(d, with_tokens):
        with d.cv:
            slots = []
            for s in d.slots:
                e = {"id": s.id, "n_ctx": s.n_ctx, "n_tokens": len(s.tokens), "is_processing": s.busy,
                     "garbage": bool(s.tokens) and GARBAGE in s.tokens,
                     "last_prompt_n": s.last_prompt_n, "last_tokens_evaluated": s.last_tokens_evaluated,
                     "n_cells": s.n_cells, "pos_min": s.pos_min,
                     "checkpoints": [{k: c[k] for k in ("n_tokens", "pos_min", "pos_max")}
                                     for c in s.checkpoints]}
                if with_tokens:
                    e["tokens"] = list(s.tokens)
                slots.append(e)
            return {"flavor": d.flavor, "pid": os.getpid(), "wedged": d.config["wedged"],
                    "ik_failed_actions": d.ik_failed_actions, "config": dict(d.config),
                    "counters": dict(d.counters), "layout": d.layout.describe(),
                    "flash_attn": d.flash_attn, "state_format": d.era, "n_ctx": d.n_ctx,
                    "kv_unified": d.unified, "n_swa": d.n_swa_eff, "swa_full": d.swa_full,
                    "prompt_cache": None if d.cache is None else d.cache.describe(),
                    "model": d.name, "slots": slots}

    def h_double_state(self, body, q):
        with_tokens = "tokens" in q
        r = self.server.router
        if r is None:
            return self.send_json(200, self.double_state(self.server.double, with_tokens))
        with r.lock:
            models = dict(r.models)
        st = {"router": True, "pid": os.getpid(),
              "models": {k: (self.double_state(v, with_tokens) if v is not None else None)
                         for k, v in models.items()}}
        self.send_json(200, st)

    # ---- completions ------------------------------------------------------

    def prompt_tokens(self, prompt, add_special):
        """tokenize_mixed(): a string, or an array of token ids and strings."""
        if isinstance(prompt, str):
            return tokenize(prompt, add_special)
        if isinstance(prompt, list):
            out, first = [], True
            for p in prompt:
                if isinstance(p, str):
                    out.extend(tokenize(p, add_special and first))
                elif isinstance(p, int) and not isinstance(p, bool):
                    out.append(p)
                else:
                    raise Failure(400, "\"prompt\" must be a string, an list of tokens, a list of mixed strings & tokens, or a list of prompts")
                first = False
            return out
        raise Failure(400, "\"prompt\" must be a string, an list of tokens, a list of mixed strings & tokens, or a list of prompts")

    def h_completion(self, body, q):
        self.completion(self.parse_json(body), "none")

    def h_oai_completion(self, body, q):
        req = self.parse_json(body)
        if "prompt" not in req:
            raise Failure(500, "\"prompt\" is required")
        self.oai_common(req)
        self.completion(req, "completion")

    def h_chat_completion(self, body, q):
        req = self.parse_json(body)
        if "messages" not in req:
            raise Failure(500, "[json.exception.out_of_range.403] key 'messages' not found")
        self.oai_common(req)
        req = dict(req)
        req["prompt"] = chatml(req["messages"])
        self.completion(req, "chat")

    def oai_common(self, req):
        if req.get("n", 1) != 1:
            raise Failure(500, "Only one completion choice is allowed")

    def completion(self, req, oai):
        d = self.d
        if not isinstance(req, dict) or "prompt" not in req:
            raise Failure(400, "[json.exception.out_of_range.403] key 'prompt' not found")
        prompt_json = req["prompt"]
        if isinstance(prompt_json, list) and len(prompt_json) == 1 and isinstance(prompt_json[0], str):
            prompt_json = prompt_json[0]                    # an array holding one prompt
        if isinstance(prompt_json, list) and (
                any(isinstance(p, list) for p in prompt_json)
                or (prompt_json and all(isinstance(p, str) for p in prompt_json))):
            raise Failure(400, "llama_double: one prompt per request (multi-prompt requests are not modelled)")
        prompt = self.prompt_tokens(prompt_json, True)
        if any(t < 0 or t >= N_VOCAB for t in prompt):
            raise Failure(400, "Prompt contains invalid tokens")
        n_predict = req.get("n_predict", req.get("max_tokens", -1))
        if n_predict is None:
            n_predict = -1
        n_predict = int(n_predict)
        n_gen = d.args.n_predict_default if n_predict < 0 else max(1, n_predict)
        stream = bool(req.get("stream", False))
        cache_prompt = req.get("cache_prompt", True)
        cache_prompt = True if cache_prompt is None else bool(cache_prompt)
        id_slot = req.get("id_slot", -1)
        id_slot = -1 if id_slot is None else int(id_slot)
        model = req.get("model") or d.model_alias or DEFAULT_OAICOMPAT_MODEL
        cmpl_id = "chatcmpl-" + "".join(random.choice(
            "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz") for _ in range(32))
        params = {"n_predict": n_predict, "temperature": req.get("temperature", 0.8), "stream": stream,
                  "stop": req.get("stop", []) if isinstance(req.get("stop", []), list) else [req["stop"]]}
        d.count("completions")

        if d.era == 2025 and id_slot != -1 and not (0 <= id_slot < len(d.slots)):
            # get_slot_by_id() returns null and the task is deferred for ever (Feb 2025; since
            # then get_slot_by_id wraps an id beyond the slots around)
            return self.hang("completion for a slot id that does not exist")
        slot = d.acquire_for_completion(id_slot, prompt, self.client_gone)
        if slot is None:
            self.close_connection = True
            return

        sse = None
        if stream:
            self._headers(200, "text/event-stream", [("Transfer-Encoding", "chunked")])
            self.end_headers()

            def sse(text):
                data = text.encode("utf-8")
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

        try:
            self.run_slot(slot, prompt, n_gen, cache_prompt, params, oai, model, cmpl_id, sse)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def run_slot(self, slot, prompt, n_gen, cache_prompt, params, oai, model, cmpl_id, sse):
        d = self.d
        cancelled = False
        n_decoded = 0
        truncated = False
        try:
            slot.params = params
            slot.prompt_text = detokenize(prompt)
            slot.n_decoded = 0
            slot.generated = ""
            n_prompt = len(prompt)
            if n_prompt == 0:
                # empty prompt: the real server releases the slot and sends an empty result
                with d.cv:
                    if d.era == 2025:
                        d.clear(slot)
                    slot.last_prompt_n, slot.last_tokens_evaluated = 0, 0
                final = self.final_json(oai, slot, "", 0, 0, model, cmpl_id,
                                        timings_json(0, 0.0, 0, 0.0, 0 if d.era == 2026 else None),
                                        False, params, prompt, sse is not None, 0)
                if sse is None:
                    return self.send_json(200, final)
                sse("data: " + dumps(final) + "\n\n")
                if oai != "none":
                    sse("data: [DONE]\n\n")
                return sse("")
            if n_prompt >= slot.n_ctx:
                if d.era == 2026:
                    err = Failure(400, CTX_EXCEEDED_2026 % (n_prompt, slot.n_ctx), "exceed_context_size_error")
                    err.extra = {"n_prompt_tokens": n_prompt, "n_ctx": slot.n_ctx}
                else:
                    err = Failure(400, CTX_EXCEEDED)
                return self.finish_error(err, oai, sse)
            t0 = time.monotonic()
            # prefix reuse (update_slots): common prefix, the SWA/recurrent pos_min rule (2026),
            # and at least one token is evaluated
            with d.cv:
                n_past = d.reuse(slot, prompt, cache_prompt)
                prompt_n = n_prompt - n_past
                slot.last_prompt_n = prompt_n
                slot.last_tokens_evaluated = n_prompt
                slot.n_prompt_tokens_cache = n_past
                slot.n_prompt_tokens_processed = 0
                slot.prefilling = True
            keep = cache_prompt or d.era == 2026      # Feb 2025: cache_prompt false keeps nothing
            # prefill, one n_batch at a time through the shared decode loop
            pos = n_past
            try:
                while pos < n_prompt:
                    with d.cv:
                        step, ckpt = d.next_batch(slot, pos, n_prompt)
                    with d.decode_lock:
                        with d.cv:
                            if ckpt:
                                d.create_checkpoint(slot, pos)
                            d.make_room(slot, step)
                        time.sleep(step * d.cfg("prefill_ms_per_token") / 1e3)
                        with d.cv:
                            if keep:
                                slot.tokens.extend(prompt[pos:pos + step])
                                d.appended(slot, step)
                            slot.n_prompt_tokens_processed += step
                    pos += step
                    if self.client_gone():
                        cancelled = True
                        return
            except Failure as f:
                with d.cv:
                    d.clear(slot)
                return self.finish_error(f, oai, sse)
            finally:
                with d.cv:
                    slot.prefilling = False
                    d.cv.notify_all()
            d.count("prefilled_tokens", prompt_n)
            t1 = time.monotonic()
            prompt_ms = (t1 - t0) * 1e3
            gen = generate_tokens(prompt, n_gen)
            text = []
            for i, tok in enumerate(gen):
                with d.decode_lock:
                    if i > 0 and keep:
                        with d.cv:
                            try:
                                d.make_room(slot, 1)
                            except Failure:
                                truncated = True
                                break
                    time.sleep(d.cfg("gen_ms_per_token") / 1e3)
                    with d.cv:
                        if i > 0 and keep:
                            slot.tokens.append(gen[i - 1])     # the previous token is now decoded
                            d.appended(slot, 1)
                n_decoded = i + 1
                slot.n_decoded = n_decoded
                piece = piece_bytes(tok).decode("utf-8", "replace")
                text.append(piece)
                slot.generated += piece
                if sse is not None:
                    sse("data: " + dumps(self.partial_json(oai, slot, piece, tok, n_decoded, n_prompt,
                                                           model, cmpl_id)) + "\n\n")
                if n_prompt + n_decoded - 1 >= slot.n_ctx:      # n_past >= n_ctx
                    truncated = True
                    break
                if self.client_gone():
                    cancelled = True
                    return
            d.count("generated_tokens", n_decoded)
            predicted_ms = (time.monotonic() - t1) * 1e3
            timings = timings_json(prompt_n, prompt_ms, n_decoded, predicted_ms,
                                   n_past if d.era == 2026 else None)
            final = self.final_json(oai, slot, "".join(text), n_decoded, n_prompt, model, cmpl_id,
                                    timings, truncated, params, prompt, sse is not None,
                                    n_prompt + n_decoded - 1)
            if sse is None:
                self.send_json(200, final)
            else:
                sse("data: " + dumps(final) + "\n\n")
                if oai != "none":
                    sse("data: [DONE]\n\n")
                sse("")                                         # last chunk: 0\r\n\r\n
        finally:
            with d.cv:
                slot.n_remaining = -1
            d.release(slot)
            if cancelled:
                self.close_connection = True

    def finish_error(self, err, oai, sse):
        if sse is None:
            self.send_error_json(err)
        else:
            # errors after the stream started are sent as an SSE "error" event
            sse("error: " + dumps(err.body()["error"]) + "\n\n")
            if oai != "none":
                sse("data: [DONE]\n\n")
            sse("")

    def partial_json(self, oai, slot, piece, tok, n_decoded, n_prompt, model, cmpl_id):
        t = int(time.time())
        if oai == "none":
            # send_partial_response() does not set id_slot: real chunks carry -1
            return {"index": 0, "content": piece, "tokens": [tok], "stop": False, "id_slot": -1,
                    "tokens_predicted": n_decoded, "tokens_evaluated": n_prompt}
        if oai == "completion":
            return {"choices": [{"text": piece, "index": 0, "logprobs": None, "finish_reason": None}],
                    "created": t, "model": model, "system_fingerprint": BUILD_INFO,
                    "object": "text_completion", "id": cmpl_id}
        return {"choices": [{"finish_reason": None, "index": 0, "delta": {"content": piece}}],
                "created": t, "id": cmpl_id, "model": model, "system_fingerprint": BUILD_INFO,
                "object": "chat.completion.chunk"}

    def final_json(self, oai, slot, content, n_decoded, n_prompt, model, cmpl_id, timings,
                   truncated, params, prompt, stream, tokens_cached):
        t = int(time.time())
        usage = {"completion_tokens": n_decoded, "prompt_tokens": n_prompt,
                 "total_tokens": n_decoded + n_prompt}
        if oai == "none":
            return {
                "index": 0, "content": "" if stream else content, "tokens": [], "id_slot": slot.id,
                "stop": True, "model": model, "tokens_predicted": n_decoded, "tokens_evaluated": n_prompt,
                "generation_settings": self.d.params_json(params), "prompt": detokenize(prompt),
                "has_new_line": False, "truncated": truncated, "stop_type": "limit", "stopping_word": "",
                "tokens_cached": tokens_cached, "timings": timings,
            }
        if oai == "completion":
            return {"choices": [{"text": "" if stream else content, "index": 0, "logprobs": None,
                                 "finish_reason": "length"}],
                    "created": t, "model": model, "system_fingerprint": BUILD_INFO,
                    "object": "text_completion", "usage": usage, "id": cmpl_id, "timings": timings}
        if stream:
            return {"choices": [{"finish_reason": "length", "index": 0, "delta": {}}],
                    "created": t, "id": cmpl_id, "model": model, "system_fingerprint": BUILD_INFO,
                    "object": "chat.completion.chunk", "usage": usage, "timings": timings}
        return {"choices": [{"finish_reason": "length", "index": 0,
                             "message": {"role": "assistant", "content": content}}],
                "created": t, "model": model, "system_fingerprint": BUILD_INFO,
                "object": "chat.completion", "usage": usage, "id": cmpl_id, "timings": timings}

    # ---- slot actions -----------------------------------------------------

    def slot_action(self, id_str, query, body):
        d = self.d
        if not d.save_dir:
            raise Failure(501, "This server does not support slots action. Start it with `--slot-save-path`")
        if d.cfg("hang_slot_actions"):
            d.count("slot_actions_hung")
            return self.hang("hang_slot_actions")
        if not body and d.era == 2025:
            # an empty POST to a slot action never gets an answer from llama-server (Feb 2025;
            # mid-2026 parses the empty body and answers 500, and erases without reading it)
            d.count("slot_actions_hung")
            return self.hang("slot action without a body")
        try:
            try:
                m = re.match(r"\s*[+-]?\d+", id_str)
                if not m:
                    raise ValueError
                id_slot = int(m.group(0))
            except ValueError:
                raise Failure(400, "Invalid slot ID")
            action = (query.get("action") or [""])[0]
            if action in ("save", "restore"):
                req = self.parse_json(body)
                if not isinstance(req, dict) or "filename" not in req:
                    raise Failure(500, "[json.exception.out_of_range.403] key 'filename' not found")
                filename = req["filename"]
                if not isinstance(filename, str):
                    raise Failure(500, "[json.exception.type_error.302] type must be string")
                if not validate_filename(filename):
                    raise Failure(400, "Invalid filename")
            elif action != "erase":
                raise Failure(400, "Invalid action")
            slot = d.slot_by_id(id_slot)           # 2026: an id beyond the slots wraps around
            if slot is None:
                raise Failure(400, "Invalid slot ID")
            d.acquire_for_action(slot)
            try:
                with d.decode_lock:                # runs on the server's decode loop
                    if action == "save":
                        res = self.do_save(slot, filename, id_slot)
                    elif action == "restore":
                        res = self.do_restore(slot, filename, id_slot)
                    else:
                        with d.cv:
                            n = len(slot.tokens)
                            d.clear(slot)
                        d.count("erases")
                        res = {"id_slot": id_slot, "n_erased": n}
            finally:
                d.end_action(slot)
            if d.cfg("lose_slot_answers"):
                # ik_llama.cpp's handlers post the task before they wait for its result,
                # and a result that comes first is dropped: done, never answered.
                d.count("slot_answers_lost")
                return self.hang("lose_slot_answers: %s done, answer lost" % action)
            self.send_json(200, res)
        except Failure as f:
            if d.flavor == "ik" and f.code != 501:
                # ik_llama.cpp answers no slot-action error: the request hangs, and after a
                # few of those the whole server stops answering.
                with d.cv:
                    d.ik_failed_actions += 1
                    d.counters["slot_actions_hung"] += 1
                    if d.ik_failed_actions >= d.args.ik_wedge_after:
                        d.config["wedged"] = True
                return self.hang("ik: failed slot action (%s%s)" % (
                    f.message, (": " + f.reason) if f.reason else ""))
            if d.args.verbose and f.reason:
                sys.stderr.write("llama_double: slot action failed: %s\n" % f.reason)
            raise

    def do_save(self, slot, filename, id_slot):
        d = self.d
        lay = d.layout
        t0 = time.monotonic()
        with d.cv:
            tokens = list(slot.tokens)
            kv_tokens = tokens if d.era == 2025 else d.kv_tokens(slot)
            swa_lo = d.swa_lo(slot)
        if d.era == 2026 and not d.upstream:
            tokens = [t for t in tokens if t != TOKENS_NULL]     # get_text_tokens()
        words = lay.token_words(tokens)
        path = d.save_dir + filename
        n_written = 0
        if d.cfg("save_fails_silently"):
            d.count("saves_failed")
        else:
            try:
                with open(path, "wb") as f:
                    f.write(lay.header(words))
                    for part in lay.state_parts(kv_tokens, seq_id=slot.id,
                                                stream=0 if d.unified else slot.id, swa_lo=swa_lo):
                        f.write(part)
                    n_written = f.tell()
                if d.flavor == "ik":
                    side = {"has_mtmd": False, "map_idx_to_media": [], "tokens": tokens,
                            "magic": IK_TOKENS_MAGIC, "version": 1}
                    with open(path + ".tokens.json", "w") as f:
                        f.write(dumps(side))
                d.count("saves")
            except OSError as e:
                # llama_state_seq_save_file() catches the error and returns 0
                sys.stderr.write("llama_double: save failed: %s\n" % e)
                n_written = 0
                d.count("saves_failed")
        if n_written == 0 and d.upstream:
            raise Failure(500, "Unable to save slot")     # upstream answers an error instead
        rate = d.cfg("save_bytes_per_ms")
        if rate > 0 and n_written:
            time.sleep(n_written / rate / 1e3)
        return {"id_slot": id_slot, "filename": filename, "n_saved": len(tokens),
                "n_written": n_written, "timings": {"save_ms": (time.monotonic() - t0) * 1e3}}

    def do_restore(self, slot, filename, id_slot):
        d = self.d
        lay = d.layout
        t0 = time.monotonic()
        path = d.save_dir + filename
        d.count("restores")
        info = None
        try:
            if d.cfg("fail_restore"):
                raise Failure(400, RESTORE_FAILED).with_reason("fail_restore switch")
            try:
                with open(path, "rb") as f:                # follows symlinks, like the real server
                    size = os.fstat(f.fileno()).st_size
                    data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            except (OSError, ValueError) as e:
                raise Failure(400, RESTORE_FAILED).with_reason("cannot open %s: %s" % (path, e))
            try:
                r = Reader(data)
                # upstream reads the count first against the file size, then with that capacity
                words = lay.read_header(r, None if d.upstream else slot.n_ctx)
                tokens = words
                if words and words[0] == TOKENS_NULL:
                    try:
                        tokens = lay.unpack_words(words)        # what the KV cells hold
                    except ValueError:
                        pass
                if d.era == 2025 and not words:
                    raise Crash("restoring a slot file with 0 tokens")
                if d.cfg("kv_fragmented"):
                    r.fail("no contiguous run of %d free cells in the KV cache (kv_fragmented)" % len(tokens))
                if d.era == 2025:
                    lay.parse_2025(r, tokens, d.cfg("verify_kv"))
                else:
                    with d.cv:
                        info = lay.parse_2026(r, tokens, d.cfg("verify_kv"),
                                              lambda sec, c: d.room(slot, sec))
            finally:
                if isinstance(data, mmap.mmap):
                    data.close()
            new_tokens = words
            if d.upstream:
                # server_tokens::deserialize, the context check, server_tokens::validate
                try:
                    new_tokens = lay.unpack_words(words)
                except ValueError as e:
                    raise Failure(400, RESTORE_FAILED_UP + str(e)).with_reason(str(e))
                if len(new_tokens) > slot.n_ctx:
                    raise Failure(400, RESTORE_FAILED_UP + "Restored prompt does not fit in the slot context")
                if any(t < 0 or t >= N_VOCAB for t in new_tokens):
                    raise Failure(400, RESTORE_FAILED_UP + "Invalid tokens in slot save file")
        except Failure as f:
            if d.upstream and not f.message.startswith(RESTORE_FAILED_UP):
                f.message = RESTORE_FAILED_UP + "No available space in KV cache or invalid slot save file"
            with d.cv:
                d.clear(slot)                               # a failed restore leaves the slot empty
                d.counters["restores_failed"] += 1
            raise
        n_read = r.off      # what the reader consumed (bytes after the state are not read)
        if d.flavor == "ik":
            try:
                with open(path + ".tokens.json", "rb") as f:
                    side = json.loads(f.read().decode("utf-8"))
                new_tokens = [int(t) for t in side["tokens"]]
            except (OSError, ValueError, KeyError, TypeError):
                # without the sidecar the ik slot believes it holds n_ctx tokens
                new_tokens = [GARBAGE] * slot.n_ctx
        rate = d.cfg("restore_bytes_per_ms")
        if rate > 0:
            time.sleep(n_read / rate / 1e3)
        with d.cv:
            if not d.config["ignore_restore"]:
                slot.tokens = list(new_tokens)
                slot.checkpoints = []
                if info is None:
                    slot.n_cells = len(tokens)
                    slot.pos_min = 0 if tokens else -1
                else:
                    slot.n_cells, slot.pos_min = info["cells"], info["pos_min"]
        return {"id_slot": id_slot, "filename": filename, "n_restored": len(new_tokens) if d.upstream else len(words),
                "n_read": n_read, "timings": {"restore_ms": (time.monotonic() - t0) * 1e3}}


ROUTES = {
    ("GET", "/health"): Handler.h_health,
    ("GET", "/v1/health"): Handler.h_health,
    ("GET", "/props"): Handler.h_props,
    ("GET", "/models"): Handler.h_models,
    ("GET", "/v1/models"): Handler.h_models,
    ("GET", "/slots"): Handler.h_slots,
    ("GET", "/metrics"): Handler.h_metrics,
    ("POST", "/tokenize"): Handler.h_tokenize,
    ("POST", "/detokenize"): Handler.h_detokenize,
    ("POST", "/apply-template"): Handler.h_apply_template,
    ("POST", "/completion"): Handler.h_completion,
    ("POST", "/completions"): Handler.h_completion,
    ("POST", "/v1/completions"): Handler.h_oai_completion,
    ("POST", "/chat/completions"): Handler.h_chat_completion,
    ("POST", "/v1/chat/completions"): Handler.h_chat_completion,
    ("POST", "/__double/config"): Handler.h_double_config,
    ("GET", "/__double/state"): Handler.h_double_state,
}


class Router:
    """Router mode (tools/server/server-models.cpp): one child server per model, started on first
    use (autoload), requests proxied by the "model" of the body (POST) or ?model= (GET)."""

    PROXY_GET = {"/slots", "/metrics", "/props", "/lora-adapters"}
    PROXY_POST = {"/completion", "/completions", "/v1/completions", "/chat/completions",
                  "/v1/chat/completions", "/tokenize", "/detokenize", "/apply-template",
                  "/props", "/infill", "/embedding", "/embeddings", "/v1/embeddings", "/rerank"}

    def __init__(self, args, names):
        self.args = args
        self.models = {n: None for n in names}      # None: not loaded
        self.lock = threading.Lock()
        self.config = {}

    def loaded(self):
        with self.lock:
            return [d for d in self.models.values() if d is not None]

    def load(self, name):
        with self.lock:
            if self.models[name] is None:
                d = Double(self.args, name)
                for k, v in self.config.items():
                    d.config[k] = Double.CONFIG_KEYS[k](v)
                self.models[name] = d
            return self.models[name]

    def unload(self, name):
        with self.lock:
            d, self.models[name] = self.models[name], None
        if d is not None:
            d.stopping = True

    def validate(self, name, autoload):
        """router_validate_model."""
        if not name:
            raise Failure(400, "model name is missing from the request")
        if name not in self.models:
            raise Failure(400, "model '%s' not found" % name)
        if not autoload and self.models[name] is None:
            raise Failure(400, "model is not loaded")
        return self.load(name)

    def autoload(self, query):
        v = (query.get("autoload") or [""])[0]
        return self.args.models_autoload if v == "" else v in ("true", "1")

    def model_list(self):
        t = int(time.time())
        out = []
        with self.lock:
            items = list(self.models.items())
        for name, d in items:
            e = {"id": name, "aliases": [], "tags": [], "object": "model", "owned_by": "llamacpp",
                 "created": t, "status": {"value": "loaded" if d is not None else "unloaded",
                                          "args": ["llama-server", "--alias", name]},
                 "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
                 "source": "models_dir", "can_remove": False}
            if d is not None:
                e["meta"] = d.model_meta()
            out.append(e)
        return {"data": out, "object": "list"}

    def route(self, h, method, path, query, body):
        if method == "GET" and path in ("/health", "/v1/health"):
            return h.send_json(200, {"status": "ok"})
        if method == "GET" and path in ("/models", "/v1/models"):
            return h.send_json(200, self.model_list())
        if method == "GET" and path == "/props" and not (query.get("model") or [""])[0]:
            return h.send_json(200, {
                "role": "router", "max_instances": 4, "models_autoload": self.args.models_autoload,
                "model_alias": "llama-server", "model_path": "none",
                "default_generation_settings": {"params": {}, "n_ctx": 0},
                "build_info": BUILD_INFO, "cors_proxy_enabled": False})
        if method == "POST" and path in ("/models/load", "/models/unload"):
            req = h.parse_json(body)
            name = req.get("model", "") if isinstance(req, dict) else ""
            if name not in self.models:
                raise Failure(404 if path == "/models/load" else 400, "model is not found")
            running = self.models[name] is not None
            if path == "/models/load":
                if running:
                    raise Failure(400, "model is already running")
                self.load(name)
            else:
                if not running:
                    raise Failure(400, "model is not running")
                self.unload(name)
            return h.send_json(200, {"success": True})
        if method == "GET" and path in self.PROXY_GET:
            name = (query.get("model") or [""])[0]
        elif method == "POST" and (path in self.PROXY_POST or re.fullmatch(r"/slots/[^/]+", path)):
            req = h.parse_json(body)                 # an empty or broken body: 500
            name = req.get("model", "") if isinstance(req, dict) else ""
            if not isinstance(name, str):
                name = ""
        else:
            raise Failure(404, "File Not Found")
        h._d = self.validate(name, self.autoload(query))
        return h.route(method, path, query, body)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64
    router = None
    api_keys = ()
    health_blocks = False


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="test double of llama.cpp's llama-server (see README.md)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080, help="0 picks a free port (printed)")
    ap.add_argument("--slot-save-path", default="", help="directory for slot files")
    ap.add_argument("-np", "--parallel", type=int, default=None,
                    help="slots; 2026 default -1 = auto (4 slots, unified KV); 2025 default 1")
    ap.add_argument("-kvu", "--kv-unified", dest="kv_unified", action="store_const", const=True, default=None,
                    help="one KV stream shared by all slots (n_stream 1)")
    ap.add_argument("-no-kvu", "--no-kv-unified", dest="kv_unified", action="store_const", const=False)
    ap.add_argument("-c", "--ctx-size", type=int, default=4096, help="total context, shared by the slots")
    ap.add_argument("-b", "--batch-size", type=int, default=2048, help="prefill batch (n_batch)")
    ap.add_argument("-ub", "--ubatch-size", type=int, default=512, help="n_ubatch (checkpoints, SWA cache size)")
    ap.add_argument("--flavor", choices=("llama", "ik"), default="llama")
    ap.add_argument("--state-format", type=int, choices=(2025, 2026), default=2026,
                    help="slot-file layout and the server generation it comes with")
    ap.add_argument("--file-version", type=int, choices=(2, 3), default=2,
                    help="header version (3: llama.cpp library v0.4.0)")
    ap.add_argument("--token-form", choices=("plain", "packed"), default="plain",
                    help="packed: upstream master's server_tokens::serialize (and its slot actions)")
    ap.add_argument("--model-kind", choices=("dense", "iswa", "recurrent"), default="dense")
    ap.add_argument("--kv-bytes-per-token", type=int, default=1024)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-embd-k-gqa", type=int, default=None, help="K elements per token and layer")
    ap.add_argument("--n-embd-v-gqa", type=int, default=None, help="V elements per token and layer")
    ap.add_argument("--n-swa", type=int, default=128, help="iswa: sliding window")
    ap.add_argument("--swa-pattern", type=int, default=6, help="iswa: every Nth layer is a global one")
    ap.add_argument("--swa-full", action="store_true", help="iswa: full-size SWA cache")
    ap.add_argument("--n-embd-r", type=int, default=384, help="recurrent: f32 elements of an R row")
    ap.add_argument("--n-embd-s", type=int, default=2048, help="recurrent: f32 elements of an S row")
    ap.add_argument("-ctxcp", "--ctx-checkpoints", "--swa-checkpoints", dest="ctx_checkpoints", type=int,
                    default=32, help="context checkpoints per slot (2026, iswa and recurrent)")
    ap.add_argument("-cms", "--checkpoint-min-step", type=int, default=8192)
    ap.add_argument("-cram", "--cache-ram", type=int, default=None,
                    help="RAM prompt cache in MiB (2026 default 8192, -1 no limit, 0 off)")
    ap.add_argument("--cache-idle-slots", dest="cache_idle_slots", action="store_true", default=True)
    ap.add_argument("--no-cache-idle-slots", dest="cache_idle_slots", action="store_false")
    ap.add_argument("--api-key", default=None, help="API key(s), comma-separated")
    ap.add_argument("--router-models", default=None, help="router mode with these models (A,B,...)")
    ap.add_argument("--models-autoload", dest="models_autoload", action="store_true", default=True)
    ap.add_argument("--no-models-autoload", dest="models_autoload", action="store_false")
    ap.add_argument("--health-blocks-during-prefill", action="store_true",
                    help="GET /health waits while a prompt is processed (ik_llama.cpp under load)")
    ap.add_argument("--prefill-ms-per-token", type=float, default=0.5)
    ap.add_argument("--gen-ms-per-token", type=float, default=0.2)
    ap.add_argument("--restore-bytes-per-ms", type=float, default=2e6,
                    help="restore speed (default 2e6 = 2 GB/s); 0 = no delay")
    ap.add_argument("--save-bytes-per-ms", type=float, default=2e6)
    ap.add_argument("-m", "--model", default="/models/llama-double-q8_0.gguf", help="reported model_path")
    ap.add_argument("-a", "--alias", "--model-name", dest="model_name", default=None)
    ap.add_argument("-fa", "--flash-attn", dest="flash_attn", nargs="?", const="on",
                    choices=("on", "off", "auto"), default=None,
                    help="default auto: on (2026); off for the 2025 llama flavor, on for ik")
    ap.add_argument("--no-flash-attn", dest="flash_attn", action="store_const", const="off")
    ap.add_argument("-ctk", "--cache-type-k", choices=("f16", "q8_0"), default="f16")
    ap.add_argument("-ctv", "--cache-type-v", choices=("f16", "q8_0"), default="f16")
    ap.add_argument("--slots", "--slots-endpoint", dest="slots_endpoint", action="store_const",
                    const=True, default=None,
                    help="serve GET /slots (2026 default on; 2025 llama default off; ik always)")
    ap.add_argument("--no-slots", "--no-slots-endpoint", dest="slots_endpoint", action="store_const", const=False)
    ap.add_argument("-sps", "--slot-prompt-similarity", type=float, default=None,
                    help="2026 default 0.1 (of the prompt), 2025 default 0.5 (of the slot's tokens)")
    ap.add_argument("--n-predict-default", type=int, default=16,
                    help="tokens generated when n_predict is absent or -1")
    ap.add_argument("--ik-wedge-after", type=int, default=3,
                    help="ik: failed (hung) slot actions after which the server stops answering")
    ap.add_argument("--no-verify-kv", action="store_true",
                    help="restore any KV bytes of the right layout (e.g. real fixture files)")
    ap.add_argument("--fail-restore", action="store_true")
    ap.add_argument("--save-fails-silently", action="store_true")
    ap.add_argument("--hang-slot-actions", action="store_true")
    ap.add_argument("--ignore-restore", action="store_true")
    ap.add_argument("--kv-fragmented", action="store_true")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args(argv)

    # the server generation: ik_llama.cpp and --state-format 2025 are the Feb 2025 server
    a.era = 2025 if (a.flavor == "ik" or a.state_format == 2025) else 2026
    if a.flavor == "ik":
        a.state_format = 2025
    if a.era == 2025 and a.model_kind != "dense":
        ap.error("--model-kind %s needs --state-format 2026" % a.model_kind)
    if a.era == 2025 and a.token_form == "packed":
        ap.error("--token-form packed needs --state-format 2026")
    # -np: server.cpp, "n_parallel is set to auto, using n_parallel = 4 and kv_unified = true"
    if a.parallel is None:
        a.parallel = -1 if a.era == 2026 else 1
    if a.parallel == 0 or (a.parallel < 0 and a.era == 2025):
        ap.error("invalid value for --parallel")
    a.unified = bool(a.kv_unified) and a.era == 2026
    if a.parallel < 0:
        a.parallel, a.unified = 4, True
    a.n_slots = a.parallel
    if a.ctx_size < a.n_slots:
        ap.error("need -c >= --parallel")
    if a.era == 2026:
        # llama_context: n_ctx padded to 256; n_ctx_seq = n_ctx (unified) or pad(n_ctx / n_seq, 256)
        n_ctx = pad(a.ctx_size, 256)
        if a.unified:
            seq = n_ctx
        else:
            seq = pad(n_ctx // a.n_slots, 256)
            n_ctx = seq * a.n_slots
        a.n_ctx_total, a.kv_size = n_ctx, seq
        a.n_ctx_slot = min(seq, N_CTX_TRAIN)          # "the slot context exceeds the training context"
    else:
        a.n_ctx_total = a.ctx_size
        a.n_ctx_slot = a.kv_size = a.ctx_size // a.n_slots
    if a.flash_attn in (None, "auto"):
        a.fa = a.era == 2026 or a.flavor == "ik"     # -fa auto turns flash attention on here
    else:
        a.fa = a.flash_attn == "on"
    if a.cache_type_v != "f16" and not a.fa:
        ap.error("V cache quantization requires flash_attn (as in llama.cpp)")
    if a.slots_endpoint is None:
        a.slots_endpoint = a.era == 2026
    if a.slot_prompt_similarity is None:
        a.slot_prompt_similarity = 0.1 if a.era == 2026 else 0.5
    if a.cache_ram is None or a.era == 2025:
        a.cache_ram = 8192 if a.era == 2026 else 0
    a.api_keys = [k for k in (a.api_key or "").split(",") if k]
    a.router_names = [m for m in (a.router_models or "").split(",") if m]
    try:
        Layout(flavor=a.flavor, fmt=a.state_format, version=a.file_version, kind=a.model_kind,
               token_form=a.token_form, n_layer=a.n_layer, kv_bytes_per_token=a.kv_bytes_per_token,
               n_embd_k_gqa=a.n_embd_k_gqa, n_embd_v_gqa=a.n_embd_v_gqa, type_k=a.cache_type_k,
               type_v=a.cache_type_v, flash_attn=a.fa)
    except ValueError as e:
        ap.error(str(e))
    return a


def main(argv=None):
    args = parse_args(argv)
    if args.router_names:
        router = Router(args, args.router_names)
        double = Double(args, "router")      # counts the requests; the models are in the router
    else:
        router = None
        double = Double(args)
    srv = Server((args.host, args.port), Handler)
    srv.double = double
    srv.router = router
    srv.api_keys = args.api_keys
    srv.health_blocks = args.health_blocks_during_prefill
    host, port = srv.server_address[:2]
    print("listening on http://%s:%d" % (host, port), flush=True)
    try:
        srv.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        double.stopping = True
        if router is not None:
            for d in router.loaded():
                d.stopping = True
        srv.server_close()


if __name__ == "__main__":
    main()
