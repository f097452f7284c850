#!/usr/bin/env python3
"""Namespaces on the wire (reliability review D5, D6), from a client that does
not validate: Debian's python3-grpcio with hand-built protobuf bytes.

- D5: a namespace that is not strict UTF-8 (UTF-16 surrogate ED A0 80, a code
  point above U+10FFFF F4 90 80 80, an overlong form C0 AF / E0 80 AF, an F5
  lead) is refused with INVALID_ARGUMENT by Put, Lookup, Adopt, List and
  Report; nothing is stored; Info, Stats and List still decode in a strict
  client (the strings of their replies are valid UTF-8).
- D6: a namespace with an embedded NUL ("model-A\\0fingerprint-1") is refused
  by Put and Lookup instead of being cut to "model-A"; a blob in "model-A" is
  not found by a Lookup in "model-A\\0fingerprint-2".
"""
import os
import shutil
import struct
import sys

from harness import Daemon, Skip, check, eq, fixture, run, slot_tokens

try:
    import grpc
except ImportError:  # scripts/deps installs python3-grpcio, for Debian's python3
    grpc = None
    DEBIAN_PY = "/usr/bin/python3"
    if os.path.realpath(sys.executable) != os.path.realpath(DEBIAN_PY) and \
            os.access(DEBIAN_PY, os.X_OK):  # e.g. ctest found a pyenv python3 first
        os.execv(DEBIAN_PY, [DEBIAN_PY] + sys.argv)

SVC = "/kvtier.v1.Kvtier/"
BAD_UTF8 = {
    "surrogate U+D800": b"a\xed\xa0\x80b",
    "above U+10FFFF": b"a\xf4\x90\x80\x80b",
    "overlong 2-byte": b"a\xc0\xafb",
    "overlong 3-byte": b"a\xe0\x80\xafb",
    "F5 lead": b"a\xf5\x80\x80\x80b",
}


# ---- protobuf by hand (field numbers from proto/kvtier.proto) ----

def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7f
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def f_bytes(num, b):
    return varint(num << 3 | 2) + varint(len(b)) + b


def f_varint(num, n):
    return varint(num << 3) + varint(n)


def f_double(num, x):
    return varint(num << 3 | 1) + struct.pack("<d", x)


def put_request(ns, data):
    part = f_bytes(1, b"") + f_varint(2, len(data))  # PartHeader{suffix "", size}
    return f_bytes(1, data) + f_bytes(2, part) + f_bytes(3, ns) + f_varint(4, 1)


def lookup_request(ns, tokens):
    return f_bytes(1, ns) + f_bytes(3, struct.pack("<%di" % len(tokens), *tokens))


def fields(buf):
    """(number, wire type, value) of a serialized message's top-level fields."""
    i, out = 0, []
    while i < len(buf):
        tag, i = read_varint(buf, i)
        num, wt = tag >> 3, tag & 7
        if wt == 0:
            v, i = read_varint(buf, i)
        elif wt == 1:
            v, i = buf[i:i + 8], i + 8
        elif wt == 5:
            v, i = buf[i:i + 4], i + 4
        elif wt == 2:
            n, i = read_varint(buf, i)
            v, i = buf[i:i + n], i + n
        else:
            raise AssertionError("wire type %d" % wt)
        out.append((num, wt, v))
    return out


def read_varint(buf, i):
    n = shift = 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7f) << shift
        shift += 7
        if not b & 0x80:
            return n, i


# The string fields of the replies, as a conforming client decodes them:
# {field: "s"} for a string, {field: {...}} for a nested message.
TIER = {2: "s", 3: "s"}
SCHEMA = {
    "Info": {1: "s", 3: TIER, 5: "s", 7: {1: "s"}, 11: "s"},
    "Stats": {11: TIER, 12: {1: "s"}},
    "List": {1: {1: "s", 2: "s", 7: "s", 9: "s", 13: "s", 16: "s", 17: "s"}, 2: "s"},
    "Lookup": {2: "s", 7: "s"},
    "Put": {1: "s"},
}


def strict_decode(buf, schema):
    """Decodes like libprotobuf / Go / Java: a string field that is not valid
    UTF-8 fails the whole reply (bytes.decode is strict: no surrogates, nothing
    above U+10FFFF, no overlong forms). Returns {field: [values]}."""
    out = {}
    for num, wt, v in fields(buf):
        kind = schema.get(num)
        if kind == "s":
            try:
                v = v.decode("utf-8")
            except UnicodeDecodeError as e:
                raise AssertionError("reply field %d is not valid UTF-8 (%s): %r" % (num, e, v))
        elif isinstance(kind, dict):
            v = strict_decode(v, kind)
        out.setdefault(num, []).append(v)
    return out


class Raw:
    """Generic calls on /kvtier.v1.Kvtier/<Method> with raw bytes both ways."""

    def __init__(self, sock):
        self.ch = grpc.insecure_channel("unix:" + sock)

    def unary(self, method, body):
        f = self.ch.unary_unary(SVC + method)  # no (de)serializers: bytes in, bytes out
        return f(body, timeout=30)

    def put(self, body):
        f = self.ch.stream_unary(SVC + "Put")
        return f(iter([body]), timeout=30)

    def call(self, method, body):
        """(status code name, details, reply bytes or None)."""
        try:
            r = self.put(body) if method == "Put" else self.unary(method, body)
            return "OK", "", r
        except grpc.RpcError as e:
            return e.code().name, e.details() or "", None

    def decoded(self, method, body=b""):
        code, msg, r = self.call(method, body)
        eq(code, "OK", "%s from the Python client (%s)" % (method, msg))
        return strict_decode(r, SCHEMA[method])

    def close(self):
        self.ch.close()


def refused(raw, method, body, *phrases):
    code, msg, _ = raw.call(method, body)
    eq(code, "INVALID_ARGUMENT", "%s status (message %r)" % (method, msg))
    for p in phrases:
        check(p in msg, "%s: expected %r in the message %r" % (method, p, msg))
    return msg


def still_readable(raw, n_blobs):
    """Info, Stats and List decode strictly, and n_blobs blobs are listed."""
    raw.decoded("Info")
    raw.decoded("Stats")
    got = raw.decoded("List", b"")
    eq(len(got.get(1, [])), n_blobs, "blobs listed")
    return got


def need_grpc():
    if grpc is None:
        raise Skip("python3-grpcio is not installed (scripts/deps installs it)")


def test_invalid_utf8_namespace(root, daemons):
    need_grpc()
    d = Daemon(root)
    daemons.append(d)
    d.start()
    src = fixture("v2/chat-a-turn1.bin")
    data = open(src, "rb").read()
    toks = slot_tokens(src)
    staged = os.path.join(d.slot_dir, "adopt-me.bin")
    shutil.copyfile(src, staged)
    raw = Raw(d.sock)
    try:
        for what, ns in BAD_UTF8.items():
            msg = refused(raw, "Put", put_request(ns, data), "namespace", "UTF-8", "offset 1")
            print("  Put %-16s -> INVALID_ARGUMENT %s" % (what, msg))
        ns = BAD_UTF8["surrogate U+D800"]
        refused(raw, "Lookup", lookup_request(ns, toks), "namespace", "UTF-8")
        refused(raw, "Adopt", f_bytes(1, ns) + f_bytes(2, staged.encode()) + f_varint(3, 1),
                "namespace", "UTF-8")
        check(os.path.exists(staged), "refused Adopt left the source file in place")
        refused(raw, "List", f_bytes(1, ns), "namespace", "UTF-8")
        refused(raw, "Report", f_bytes(1, ns) + f_varint(2, 100) + f_double(3, 50.0),
                "namespace", "UTF-8")
        # A control character is refused the same way.
        refused(raw, "Put", put_request(b"a\x01b", data), "namespace", "control character")
        # Nothing stored; every reply still decodes in a strict client.
        still_readable(raw, 0)
        eq(d.ls(), [], "kvtier ls after the refused puts")
        # Valid non-ASCII UTF-8 (2, 3 and 4-byte characters, U+10FFFF) is stored.
        good = "modèle-€-\U0001F600-\U0010FFFF".encode()
        code, msg, _ = raw.call("Put", put_request(good, data))
        eq(code, "OK", "Put in a valid UTF-8 namespace (%s)" % msg)
        got = still_readable(raw, 1)
        eq(got[1][0][2][0], good.decode(), "namespace listed back")
        r = raw.decoded("Lookup", lookup_request(good, toks))
        check(r.get(1) == [1], "Lookup in the valid UTF-8 namespace finds the blob: %r" % r)
    finally:
        raw.close()


def test_nul_in_namespace(root, daemons):
    need_grpc()
    d = Daemon(root)
    daemons.append(d)
    d.start()
    src = fixture("v2/chat-a-turn1.bin")
    data = open(src, "rb").read()
    toks = slot_tokens(src)
    raw = Raw(d.sock)
    try:
        msg = refused(raw, "Put", put_request(b"model-A\x00fingerprint-1", data),
                      "namespace", "NUL")
        print("  Put model-A\\0fingerprint-1 -> INVALID_ARGUMENT %s" % msg)
        still_readable(raw, 0)
        eq(d.ls(), [], "nothing stored (not even under \"model-A\")")
        # A blob in "model-A" is not reachable through "model-A\0fingerprint-2".
        code, msg, _ = raw.call("Put", put_request(b"model-A", data))
        eq(code, "OK", "Put in model-A (%s)" % msg)
        r = raw.decoded("Lookup", lookup_request(b"model-A", toks))
        check(r.get(1) == [1], "Lookup in model-A finds it: %r" % r)
        refused(raw, "Lookup", lookup_request(b"model-A\x00fingerprint-2", toks),
                "namespace", "NUL")
        refused(raw, "List", f_bytes(1, b"model-A\x00x"), "NUL")
        refused(raw, "Report", f_bytes(1, b"model-A\x00x") + f_varint(2, 100) +
                f_double(3, 50.0), "NUL")
        # A NUL in the part suffix (nested PartHeader) is refused too, not read as "".
        part = f_bytes(1, b"\x00../x") + f_varint(2, len(data))
        refused(raw, "Put", f_bytes(1, data) + f_bytes(2, part) + f_bytes(3, b"model-B") +
                f_varint(4, 1), "suffix", "NUL")
        got = still_readable(raw, 1)
        eq(got[1][0][2][0], "model-A", "the one blob's namespace")
    finally:
        raw.close()


if __name__ == "__main__":
    if grpc is None:
        print("SKIP: python3-grpcio is not installed (scripts/deps installs it)")
        sys.exit(77)
    run([test_invalid_utf8_namespace, test_nul_in_namespace])
