/* keys.h: the SHA-256 prefix key chain of DESIGN.md.
 *
 *   h0  = SHA-256("kvtier/v1" || namespace)
 *   h_i = SHA-256(h_{i-1} || tokens of block i as little-endian i32)
 *
 * A blob of n tokens is indexed under its floor(n/B) block keys. Its id is
 * the chain continued over every token: h_{floor(n/B)}, then, when n is not a
 * multiple of B, one more step over the partial last block. So identical
 * tokens in one namespace always give the same id.
 */
#ifndef KVTIER_KEYS_H
#define KVTIER_KEYS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define KEY_LEN 32
#define KEY_HEX_LEN 64

struct key {
	uint8_t b[KEY_LEN];
};

/* h0 of a namespace. */
void keys_root(const char *ns, size_t ns_len, struct key *h0);

/* One chain step: out = SHA-256(prev || tokens[0..n) as le32). out may alias prev. */
void keys_step(const struct key *prev, const int32_t *tokens, size_t n, struct key *out);

/* Fills out[0..n/block) with h_1..h_{n/block}. Returns the count written. */
size_t keys_chain(const struct key *h0, const int32_t *tokens, size_t n, uint32_t block,
		  struct key *out);

/* The blob id of tokens[0..n) given its full-block chain (chain[n/block - 1]
 * is the last full block key, or h0 when there is none). */
void keys_blob_id(const struct key *h0, const struct key *chain, const int32_t *tokens,
		  size_t n, uint32_t block, struct key *id);

/* Lowercase hex, NUL-terminated: out must hold KEY_HEX_LEN + 1 bytes. */
char *key_hex(const struct key *k, char *out);

/* Parses exactly 64 hex characters. Returns 0 or KVTIER_E_INVALID. */
int key_from_hex(const char *s, struct key *k);

static inline int key_equal(const struct key *a, const struct key *b)
{
	return memcmp(a->b, b->b, KEY_LEN) == 0;
}

#endif /* KVTIER_KEYS_H */
