"""grpcwire.py: raw gRPC calls on kvtierd for tests that send what no conforming
client would (hand-built protobuf bytes: invalid UTF-8, embedded NULs, malformed
messages) and decode replies as strictly as libprotobuf does. Used by
test_namespace_wire.py and test_attack.py.

Debian's python3-grpcio imports only under /usr/bin/python3: when `grpc` is
missing from the interpreter ctest found first (e.g. a pyenv python3), the
importing script is run again under /usr/bin/python3. `grpc` is None when it
is missing there too (the tests then report a skip).
"""
import os
import struct
import sys

try:
    import grpc
except ImportError:  # scripts/deps installs python3-grpcio, for Debian's python3
    grpc = None
    DEBIAN_PY = "/usr/bin/python3"
    if os.path.realpath(sys.executable) != os.path.realpath(DEBIAN_PY) and \
            os.access(DEBIAN_PY, os.X_OK):  # e.g. ctest found a pyenv python3 first
        os.execv(DEBIAN_PY, [DEBIAN_PY] + sys.argv)

from harness import check, eq

SVC = "/kvtier.v1.Kvtier/"
# Fetch sends chunks of up to 4 MiB plus framing: above grpcio's default limit.
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]


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


def channel(sock):
    """A grpcio channel to kvtierd's Unix socket that takes Fetch's chunks."""
    return grpc.insecure_channel("unix:" + sock, options=CHANNEL_OPTIONS)


class Raw:
    """Generic calls on /kvtier.v1.Kvtier/<Method> with raw bytes both ways."""

    def __init__(self, sock=None, timeout=30, ch=None):
        self.ch = ch or channel(sock)  # ch: a channel of the caller's (e.g. intercepted)
        self.timeout = timeout
        self.calls = 0  # calls made through this object (figures)

    def unary(self, method, body, timeout=None):
        self.calls += 1
        f = self.ch.unary_unary(SVC + method)  # no (de)serializers: bytes in, bytes out
        return f(body, timeout=timeout or self.timeout)

    def put(self, body, timeout=None):
        """A Put stream of one message (bytes), or of each message of a list."""
        self.calls += 1
        f = self.ch.stream_unary(SVC + "Put")
        msgs = body if isinstance(body, list) else [body]
        return f(iter(msgs), timeout=timeout or self.timeout)

    def fetch(self, body, timeout=None):
        """The messages of a Fetch stream (bytes each)."""
        self.calls += 1
        f = self.ch.unary_stream(SVC + "Fetch")
        return list(f(body, timeout=timeout or self.timeout))

    def call(self, method, body, timeout=None):
        """(status code name, details, reply bytes or None)."""
        try:
            if method == "Put":
                r = self.put(body, timeout)
            elif method == "Fetch":
                r = self.fetch(body, timeout)
            else:
                r = self.unary(method, body, timeout)
            return "OK", "", r
        except grpc.RpcError as e:
            return e.code().name, e.details() or "", None

    def decoded(self, method, body=b""):
        code, msg, r = self.call(method, body)
        eq(code, "OK", "%s from the Python client (%s)" % (method, msg))
        return strict_decode(r, SCHEMA[method])

    def close(self):
        self.ch.close()
