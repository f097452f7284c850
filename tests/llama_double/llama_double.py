#!/usr/bin/env python3
"""llama_double.py: the test double of llama.cpp's llama-server used by kvtier's CI.

It speaks llama-server's HTTP API (the subset kvtier-llama uses) with the real
response shapes, keeps per-slot token caches with llama-server's prefix-reuse
rules, charges a configurable time per prefilled and generated token, and saves
and restores slots to files in the real slot-file format (version 2 for
llama.cpp, version 4 plus `<file>.tokens.json` for ik_llama.cpp), with KV bytes
that are a deterministic function of (layer, position, token id) so that a
restore can be verified.

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
GGML_TYPE_ID = {"f16": 1, "q8_0": 8}
DEFAULT_OAICOMPAT_MODEL = "gpt-3.5-turbo"   # examples/server/utils.hpp
BUILD_INFO = "b0-llamadouble"

# restore failure text of examples/server/server.cpp (SERVER_TASK_TYPE_SLOT_RESTORE)
RESTORE_FAILED = ("Unable to restore slot, no available space in KV cache "
                  "or invalid slot save file")
CTX_EXCEEDED = ("the request exceeds the available context size. "
                "try increasing the context size or enable context shift")

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


def timings_json(prompt_n, prompt_ms, predicted_n, predicted_ms):
    def div(a, b):
        return a / b if b else float("nan")
    return {
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": _num(div(prompt_ms, prompt_n)),
        "prompt_per_second": _num(div(1e3, prompt_ms) * prompt_n if prompt_ms else float("nan")),
        "predicted_n": predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": _num(div(predicted_ms, predicted_n)),
        "predicted_per_second": _num(div(1e3, predicted_ms) * predicted_n if predicted_ms else float("nan")),
    }


class Failure(Exception):
    """A request error answered as {"error":{...}} (llama) or never answered (ik slot actions)."""

    def __init__(self, code, message, etype=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.etype = etype or {400: "invalid_request_error", 404: "not_found_error",
                               500: "server_error", 501: "not_supported_error",
                               503: "unavailable_error"}.get(code, "server_error")

    reason = ""    # why, for the log (the real answer gives no detail)

    def with_reason(self, why):
        self.reason = why
        return self

    def body(self):
        return {"error": {"code": self.code, "message": self.message, "type": self.etype}}


class Crash(Exception):
    pass


# --------------------------------------------------------------------------
# slot file layout

class Layout:
    """The KV layout of the modelled model, and the slot file format."""

    EL_BYTES = {"f16": 2.0, "q8_0": 34.0 / 32.0}

    def __init__(self, flavor, n_layer, kv_bytes_per_token, type_k, type_v, flash_attn):
        self.version = 4 if flavor == "ik" else 2
        self.n_layer = n_layer
        self.type_k, self.type_v = type_k, type_v
        self.v_trans = 0 if flash_attn else 1
        per_el = n_layer * (self.EL_BYTES[type_k] + self.EL_BYTES[type_v])
        e = kv_bytes_per_token / per_el
        if "q8_0" in (type_k, type_v):
            self.n_embd_gqa = max(32, int(round(e / 32.0)) * 32)   # q8_0 blocks of 32
        else:
            self.n_embd_gqa = max(1, int(round(e)))
        self.k_row = self.row_size(type_k)
        self.v_row = self.row_size(type_v)
        self.v_size_el = 2   # only f16 V can be transposed (quantized V needs flash attention)
        self.kv_bytes_per_token = n_layer * (self.k_row + self.v_row)

    def row_size(self, t):
        return self.n_embd_gqa * 2 if t == "f16" else self.n_embd_gqa // 32 * 34

    def fixed_bytes(self):
        return 12 + 4 + 8 + self.n_layer * 12 * 2 + (8 if self.version == 4 else 0)

    def per_token_bytes(self):
        return 4 + 8 + self.kv_bytes_per_token

    def file_size(self, n):
        return self.fixed_bytes() + n * self.per_token_bytes()

    def describe(self):
        return {"version": self.version, "n_layer": self.n_layer, "v_trans": self.v_trans,
                "type_k": self.type_k, "type_v": self.type_v, "n_embd_k_gqa": self.n_embd_gqa,
                "n_embd_v_gqa": self.n_embd_gqa, "k_row_bytes": self.k_row, "v_row_bytes": self.v_row,
                "kv_bytes_per_token": self.kv_bytes_per_token, "fixed_bytes": self.fixed_bytes(),
                "per_token_bytes": self.per_token_bytes()}

    # deterministic KV content: a function of (K or V, layer, position, token id)
    @staticmethod
    def _cell(kind, layer, pos, tok, nbytes):
        h = hashlib.blake2b(struct.pack("<1sIiq", kind, layer, pos, tok), digest_size=32).digest()
        return (h * (nbytes // 32 + 1))[:nbytes]

    def _rows(self, kind, layer, tokens, nbytes):
        cell = self._cell
        return b"".join(cell(kind, layer, i, t, nbytes) for i, t in enumerate(tokens))

    def _v_transposed(self, layer, tokens):
        e = self.n_embd_gqa
        rows = array("H", self._rows(b"V", layer, tokens, e * 2))   # cell-major
        return b"".join(rows[j::e].tobytes() for j in range(e))     # element-major

    def header(self, tokens):
        return struct.pack("<III", LLAMA_STATE_SEQ_MAGIC, self.version, len(tokens)) + \
            array("i", tokens).tobytes()

    def state_parts(self, tokens):
        """The state after the token array, in file order (one layer's rows at a time)."""
        n = len(tokens)
        yield struct.pack("<I", n)                       # cell_count
        meta = array("i", bytes(8 * n))
        meta[0::2] = array("i", range(n))                # i32 pos, u32 n_seq_id = 0
        yield meta.tobytes()
        yield struct.pack("<II", self.v_trans, self.n_layer)
        tk, tv = GGML_TYPE_ID[self.type_k], GGML_TYPE_ID[self.type_v]
        for l in range(self.n_layer):
            yield struct.pack("<iQ", tk, self.k_row)
            yield self._rows(b"K", l, tokens, self.k_row)
        for l in range(self.n_layer):
            if self.v_trans == 0:
                yield struct.pack("<iQ", tv, self.v_row)
                yield self._rows(b"V", l, tokens, self.v_row)
            else:
                yield struct.pack("<iII", tv, self.v_size_el, self.n_embd_gqa)
                yield self._v_transposed(l, tokens)
        if self.version == 4:
            yield bytes(8)                               # the trailing zeros of ik's files

    def parse_head(self, r, capacity):
        """Check a slot file the way llama_state_seq_load_file() does, up to the cell list.
        Returns the header's tokens. Raises Failure (400) or Crash (0-token file)."""
        if r.remaining() < 12:
            r.fail("file shorter than its header")
        magic, version, n = struct.unpack("<III", r.take(12))
        if magic != LLAMA_STATE_SEQ_MAGIC or version != self.version:
            r.fail("unknown (magic, version) for sequence state file: %08x, %08x" % (magic, version))
        if n > capacity:
            r.fail("token count in sequence state file exceeded capacity! %d > %d" % (n, capacity))
        tokens = array("i", r.take(4 * n)).tolist()
        if n == 0:
            raise Crash("restoring a slot file with 0 tokens")
        cell_count, = struct.unpack("<I", r.take(4))
        if cell_count != n:
            r.fail("cell_count %d differs from the token count %d" % (cell_count, n))
        meta = array("i", r.take(8 * cell_count))
        if meta[1::2].count(0) != cell_count:
            r.fail("invalid seq_id-agnostic kv cell")
        if list(meta[0::2]) != list(range(cell_count)):
            r.fail("cell positions are not 0..n-1")
        return tokens

    def parse_body(self, r, tokens, verify):
        """The rest of the state: layout checks, then the KV bytes themselves."""
        take, fail = r.take, r.fail
        # the expected parts are only computed when verifying
        expected = self.state_parts(tokens) if verify else iter(lambda: None, 1)
        next(expected)
        next(expected)                                   # cell_count and cells already checked
        v_trans, n_layer = struct.unpack("<II", take(8))
        next(expected)
        if v_trans != self.v_trans:
            fail("incompatible V transposition")
        if n_layer != self.n_layer:
            fail("mismatched layer count (%d instead of %d)" % (n_layer, self.n_layer))
        n = len(tokens)
        tk, tv = GGML_TYPE_ID[self.type_k], GGML_TYPE_ID[self.type_v]
        for l in range(self.n_layer):
            t, row = struct.unpack("<iQ", take(12))
            next(expected)
            if t != tk:
                fail("mismatched key type (%d != %d, layer %d)" % (t, tk, l))
            if row != self.k_row:
                fail("mismatched key row size (%d != %d, layer %d)" % (row, self.k_row, l))
            rows = take(row * n)
            exp = next(expected)
            if verify and rows != exp:
                fail("K bytes of layer %d are not the ones for these tokens" % l)
        for l in range(self.n_layer):
            if self.v_trans == 0:
                t, row = struct.unpack("<iQ", take(12))
                next(expected)
                if t != tv:
                    fail("mismatched value type (%d != %d, layer %d)" % (t, tv, l))
                if row != self.v_row:
                    fail("mismatched value row size (%d != %d, layer %d)" % (row, self.v_row, l))
                rows = take(row * n)
            else:
                t, el, ne = struct.unpack("<iII", take(12))
                next(expected)
                if t != tv:
                    fail("mismatched value type (%d != %d, layer %d)" % (t, tv, l))
                if el != self.v_size_el:
                    fail("mismatched value element size (%d != %d, layer %d)" % (el, self.v_size_el, l))
                if ne != self.n_embd_gqa:
                    fail("mismatched value size (%d != %d, layer %d)" % (ne, self.n_embd_gqa, l))
                rows = take(el * ne * n)
            exp = next(expected)
            if verify and rows != exp:
                fail("V bytes of layer %d are not the ones for these tokens" % l)
        if self.version == 4:
            take(8)


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

class Slot:
    def __init__(self, sid, n_ctx):
        self.id = sid
        self.n_ctx = n_ctx
        self.tokens = []            # what the slot's KV cache holds (cache_tokens)
        self.busy = False           # processing a completion
        self.in_action = False      # a save/restore/erase is running on it
        self.t_last_used = -1.0
        self.id_task = -1
        self.prompt_text = ""
        self.params = None
        self.n_decoded = 0
        self.n_remaining = -1
        self.last_prompt_n = None
        self.last_tokens_evaluated = None


class Double:
    CONFIG_KEYS = {
        "fail_restore": bool, "save_fails_silently": bool, "hang_slot_actions": bool,
        "ignore_restore": bool, "kv_fragmented": bool, "verify_kv": bool,
        "prefill_ms_per_token": float, "gen_ms_per_token": float,
        "restore_bytes_per_ms": float, "save_bytes_per_ms": float, "wedged": bool,
        "slots_read_ms": float, "lose_slot_answers": bool,
    }

    def __init__(self, args):
        self.args = args
        self.flavor = args.flavor
        flash = args.flash_attn if args.flash_attn is not None else (args.flavor == "ik")
        if args.cache_type_v != "f16" and not flash:
            sys.exit("llama_double: V cache quantization requires flash_attn (as in llama.cpp)")
        self.flash_attn = flash
        self.layout = Layout(args.flavor, args.n_layer, args.kv_bytes_per_token,
                             args.cache_type_k, args.cache_type_v, flash)
        self.n_ctx_slot = args.ctx_size // args.parallel
        self.slots = [Slot(i, self.n_ctx_slot) for i in range(args.parallel)]
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
            "requests_hung", "slots_reads", "slot_answers_lost")}
        self.ik_failed_actions = 0
        self.next_task = 0
        self.stopping = False
        self.model_alias = args.model_name
        self.model_path = args.model

    def count(self, key, n=1):
        with self.cv:
            self.counters[key] += n

    def cfg(self, key):
        with self.cv:
            return self.config[key]

    def model_meta(self):
        n_embd = self.layout.n_embd_gqa * 2
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
        return {
            "id": s.id, "id_task": s.id_task, "n_ctx": s.n_ctx, "speculative": False,
            "is_processing": s.busy, "non_causal": False, "params": self.params_json(s.params),
            "prompt": s.prompt_text,
            "next_token": {"has_next_token": True, "has_new_line": False, "n_remain": s.n_remaining,
                           "n_decoded": s.n_decoded, "stopping_word": ""},
        }

    # ---- slot reservation -------------------------------------------------

    def _pick_idle(self, prompt):
        idle = [s for s in self.slots if not s.busy and not s.in_action]
        if not idle:
            return None
        best, best_len = None, 0
        thr = self.args.slot_prompt_similarity
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

    def acquire_for_completion(self, id_slot, prompt, gone):
        """Wait for the requested slot (or any idle slot); None if the client left."""
        with self.cv:
            while True:
                if id_slot != -1:
                    s = self.slots[id_slot] if 0 <= id_slot < len(self.slots) else None
                    if s is not None and not s.busy and not s.in_action:
                        break
                else:
                    s = self._pick_idle(prompt)
                    if s is not None:
                        break
                self.cv.wait(0.2)
                if gone() or self.stopping:
                    return None
            s.busy = True
            s.id_task = self.next_task
            self.next_task += 1
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

    @property
    def d(self):
        return self.server.double

    # ---- plumbing ---------------------------------------------------------

    def read_body(self):
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
        try:
            return json.loads(body.decode("utf-8") if body else "")
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

    def dispatch(self, method):
        d = self.d
        url = urllib.parse.urlsplit(self.path)
        path, query = url.path, urllib.parse.parse_qs(url.query)
        body = self.read_body() if method == "POST" else b""
        if not path.startswith("/__double/"):
            d.count("requests")
            if d.cfg("wedged"):
                return self.hang("ik server wedged after failed slot actions")
        try:
            route = ROUTES.get((method, path))
            if route is not None:
                return route(self, body, query)
            m = re.fullmatch(r"/slots/([^/]+)", path)
            if method == "POST" and m:
                return self.slot_action(m.group(1), query, body)
            raise Failure(404, "File Not Found")
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

    # ---- simple endpoints -------------------------------------------------

    def h_health(self, body, q):
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

    def h_double_config(self, body, q):
        req = self.parse_json(body)
        if not isinstance(req, dict):
            raise Failure(400, "body must be an object")
        d = self.d
        with d.cv:
            for k, v in req.items():
                if k not in Double.CONFIG_KEYS:
                    raise Failure(400, "unknown config key: %s" % k)
                d.config[k] = Double.CONFIG_KEYS[k](v)
            if "wedged" in req and not req["wedged"]:
                d.ik_failed_actions = 0
            cfg = dict(d.config)
        self.send_json(200, cfg)

    def h_double_state(self, body, q):
        d = self.d
        with_tokens = "tokens" in q
        with d.cv:
            slots = []
            for s in d.slots:
                e = {"id": s.id, "n_ctx": s.n_ctx, "n_tokens": len(s.tokens), "is_processing": s.busy,
                     "garbage": bool(s.tokens) and GARBAGE in s.tokens,
                     "last_prompt_n": s.last_prompt_n, "last_tokens_evaluated": s.last_tokens_evaluated}
                if with_tokens:
                    e["tokens"] = list(s.tokens)
                slots.append(e)
            st = {"flavor": d.flavor, "pid": os.getpid(), "wedged": d.config["wedged"],
                  "ik_failed_actions": d.ik_failed_actions, "config": dict(d.config),
                  "counters": dict(d.counters), "layout": d.layout.describe(),
                  "flash_attn": d.flash_attn, "slots": slots}
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

        if id_slot != -1 and not (0 <= id_slot < len(d.slots)):
            # get_slot_by_id() returns null and the task is deferred for ever
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
            n_prompt = len(prompt)
            if n_prompt == 0:
                # empty prompt: the real server releases the slot and sends an empty result
                with d.cv:
                    slot.tokens = []
                    slot.last_prompt_n, slot.last_tokens_evaluated = 0, 0
                final = self.final_json(oai, slot, "", 0, 0, model, cmpl_id, timings_json(0, 0.0, 0, 0.0),
                                        False, params, prompt, sse is not None, 0)
                if sse is None:
                    return self.send_json(200, final)
                sse("data: " + dumps(final) + "\n\n")
                if oai != "none":
                    sse("data: [DONE]\n\n")
                return sse("")
            if n_prompt >= slot.n_ctx:
                err = Failure(400, CTX_EXCEEDED)
                return self.finish_error(err, oai, sse)
            t0 = time.monotonic()
            # prefix reuse (update_slots: common_lcp, and at least one token is evaluated)
            with d.cv:
                n_past = common_prefix(slot.tokens, prompt) if cache_prompt else 0
                if n_past == n_prompt and n_past > 0:
                    n_past -= 1
                slot.tokens = slot.tokens[:n_past] if cache_prompt else []
                prompt_n = n_prompt - n_past
                slot.last_prompt_n = prompt_n
                slot.last_tokens_evaluated = n_prompt
            # prefill, one n_batch at a time through the shared decode loop
            pos = n_past
            while pos < n_prompt:
                step = min(d.args.batch_size, n_prompt - pos)
                with d.decode_lock:
                    time.sleep(step * d.cfg("prefill_ms_per_token") / 1e3)
                    with d.cv:
                        if cache_prompt:
                            slot.tokens.extend(prompt[pos:pos + step])
                pos += step
                if self.client_gone():
                    cancelled = True
                    return
            d.count("prefilled_tokens", prompt_n)
            t1 = time.monotonic()
            prompt_ms = (t1 - t0) * 1e3
            gen = generate_tokens(prompt, n_gen)
            text = []
            for i, tok in enumerate(gen):
                with d.decode_lock:
                    time.sleep(d.cfg("gen_ms_per_token") / 1e3)
                    with d.cv:
                        if i > 0 and cache_prompt:
                            slot.tokens.append(gen[i - 1])     # the previous token is now decoded
                n_decoded = i + 1
                slot.n_decoded = n_decoded
                piece = piece_bytes(tok).decode("utf-8", "replace")
                text.append(piece)
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
            timings = timings_json(prompt_n, prompt_ms, n_decoded, predicted_ms)
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
        if not body:
            # an empty POST to a slot action never gets an answer from llama-server
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
            if not (0 <= id_slot < len(d.slots)):
                raise Failure(400, "Invalid slot ID")
            slot = d.slots[id_slot]
            d.acquire_for_action(slot)
            try:
                with d.decode_lock:                # runs on the server's decode loop
                    if action == "save":
                        res = self.do_save(slot, filename)
                    elif action == "restore":
                        res = self.do_restore(slot, filename)
                    else:
                        with d.cv:
                            n = len(slot.tokens)
                            slot.tokens = []
                        d.count("erases")
                        res = {"id_slot": slot.id, "n_erased": n}
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

    def do_save(self, slot, filename):
        d = self.d
        lay = d.layout
        t0 = time.monotonic()
        with d.cv:
            tokens = list(slot.tokens)
        path = d.save_dir + filename
        n_written = 0
        if d.cfg("save_fails_silently"):
            d.count("saves_failed")
        else:
            try:
                with open(path, "wb") as f:
                    f.write(lay.header(tokens))
                    for part in lay.state_parts(tokens):
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
        rate = d.cfg("save_bytes_per_ms")
        if rate > 0 and n_written:
            time.sleep(n_written / rate / 1e3)
        return {"id_slot": slot.id, "filename": filename, "n_saved": len(tokens),
                "n_written": n_written, "timings": {"save_ms": (time.monotonic() - t0) * 1e3}}

    def do_restore(self, slot, filename):
        d = self.d
        lay = d.layout
        t0 = time.monotonic()
        path = d.save_dir + filename
        d.count("restores")
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
                tokens = lay.parse_head(r, slot.n_ctx)
                if d.cfg("kv_fragmented"):
                    r.fail("no contiguous run of %d free cells in the KV cache (kv_fragmented)" % len(tokens))
                lay.parse_body(r, tokens, d.cfg("verify_kv"))
            finally:
                if isinstance(data, mmap.mmap):
                    data.close()
        except Failure:
            with d.cv:
                slot.tokens = []                            # a failed restore leaves the slot empty
                d.counters["restores_failed"] += 1
            raise
        n_read = r.off      # what the reader consumed (bytes after the state are not read)
        new_tokens = tokens
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
                slot.tokens = new_tokens
        return {"id_slot": slot.id, "filename": filename, "n_restored": len(tokens),
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


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


def main(argv=None):
    ap = argparse.ArgumentParser(description="test double of llama.cpp's llama-server (see README.md)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080, help="0 picks a free port (printed)")
    ap.add_argument("--slot-save-path", default="", help="directory for slot files")
    ap.add_argument("-np", "--parallel", type=int, default=1)
    ap.add_argument("-c", "--ctx-size", type=int, default=4096, help="total context, shared by the slots")
    ap.add_argument("-b", "--batch-size", type=int, default=2048, help="prefill batch (n_batch)")
    ap.add_argument("--flavor", choices=("llama", "ik"), default="llama")
    ap.add_argument("--kv-bytes-per-token", type=int, default=1024)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--prefill-ms-per-token", type=float, default=0.5)
    ap.add_argument("--gen-ms-per-token", type=float, default=0.2)
    ap.add_argument("--restore-bytes-per-ms", type=float, default=2e6,
                    help="restore speed (default 2e6 = 2 GB/s); 0 = no delay")
    ap.add_argument("--save-bytes-per-ms", type=float, default=2e6)
    ap.add_argument("-m", "--model", default="/models/llama-double-q8_0.gguf", help="reported model_path")
    ap.add_argument("-a", "--alias", "--model-name", dest="model_name", default=None)
    ap.add_argument("-fa", "--flash-attn", dest="flash_attn", action=argparse.BooleanOptionalAction,
                    default=None, help="default: off for llama, on for ik (as the ik fixtures show)")
    ap.add_argument("-ctk", "--cache-type-k", choices=("f16", "q8_0"), default="f16")
    ap.add_argument("-ctv", "--cache-type-v", choices=("f16", "q8_0"), default="f16")
    ap.add_argument("--slots", "--slots-endpoint", dest="slots_endpoint",
                    action=argparse.BooleanOptionalAction, default=False,
                    help="serve GET /slots (llama flavor; ik always serves it)")
    ap.add_argument("--slot-prompt-similarity", type=float, default=0.5)
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
    args = ap.parse_args(argv)
    if args.parallel < 1 or args.ctx_size < args.parallel:
        ap.error("need --parallel >= 1 and -c >= --parallel")

    double = Double(args)
    srv = Server((args.host, args.port), Handler)
    srv.double = double
    host, port = srv.server_address[:2]
    print("listening on http://%s:%d" % (host, port), flush=True)
    try:
        srv.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        double.stopping = True
        srv.server_close()


if __name__ == "__main__":
    main()
