/* utf8.h: the one strict UTF-8 checker of kvtier, shared by the daemon's
 * namespace rule (every RPC that carries a namespace) and the metrics label
 * escaping.
 *
 * Strict means what protobuf (proto3 `string`), Go, Java and Python accept:
 * no overlong forms (C0, C1, E0 80..9F, F0 80..8F), no UTF-16 surrogates
 * (ED A0..BF = U+D800..U+DFFF), nothing above U+10FFFF (F4 90.., F5..FF
 * leads), no stray continuation bytes, no truncated sequences.
 */
#ifndef KVTIER_UTF8_H
#define KVTIER_UTF8_H

#include <stddef.h>

/* Length (1..4) of the valid UTF-8 sequence at s, of which at most avail
 * bytes may be read; 0 if s does not start one (or avail is 0). A NUL byte
 * is a valid 1-byte sequence here; callers that refuse it say so. */
size_t utf8_seq_len(const unsigned char *s, size_t avail);

/* The namespace rule: 1..max bytes of strict UTF-8 with no control
 * character (U+0000..U+001F, U+007F), NUL included. Returns 0 when n bytes
 * at s follow it; else -1 with *bad_off set to the offset of the first bad
 * byte (n when the length is wrong). */
int utf8_name_check(const char *s, size_t n, size_t max, size_t *bad_off);

#endif /* KVTIER_UTF8_H */
