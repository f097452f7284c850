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
import sys

from grpcwire import Raw, f_bytes, f_double, f_varint, grpc, lookup_request, put_request
from harness import Daemon, Skip, check, eq, fixture, run, slot_tokens

BAD_UTF8 = {
    "surrogate U+D800": b"a\xed\xa0\x80b",
    "above U+10FFFF": b"a\xf4\x90\x80\x80b",
    "overlong 2-byte": b"a\xc0\xafb",
    "overlong 3-byte": b"a\xe0\x80\xafb",
    "F5 lead": b"a\xf5\x80\x80\x80b",
}


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


def started_with_chat_a(root, daemons):
    """A started daemon, and the slot file both tests put: path, bytes, tokens."""
    d = Daemon(root)
    daemons.append(d)
    d.start()
    src = fixture("v2/chat-a-turn1.bin")
    return d, src, open(src, "rb").read(), slot_tokens(src)


def test_invalid_utf8_namespace(root, daemons):
    need_grpc()
    d, src, data, toks = started_with_chat_a(root, daemons)
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
    d, src, data, toks = started_with_chat_a(root, daemons)
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
