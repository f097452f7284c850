/* keys.c: the SHA-256 prefix key chain; see keys.h and DESIGN.md "Prefix keys".
 *
 * Every key the daemon indexes or looks up comes from here, so the hashing
 * must be exact (tokens as little-endian i32 on any host) and fast (a
 * 32K-token lookup hashes 512 blocks on the hot path). One OpenSSL digest
 * context is reused for all the blocks of a call, with the SHA-256
 * implementation fetched once per process, so the cost is the hashing itself.
 *
 * The key functions cannot fail by contract; if OpenSSL cannot allocate its
 * few hundred bytes of context the process is out of memory and aborts with a
 * message rather than hand back a wrong key.
 */
#include "keys.h"
#include "kvtier.h"
#include "log.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#define KEYS_DOMAIN "kvtier/v1"
#define KEYS_CONV_TOKENS 256 /* tokens converted to le32 per digest update */

static pthread_once_t keys_once = PTHREAD_ONCE_INIT;
static EVP_MD *keys_fetched_md; /* never freed: lives as long as the process */

static void keys_md_init(void)
{
	keys_fetched_md = EVP_MD_fetch(NULL, "SHA256", NULL);
}

/* The SHA-256 implementation, fetched once: an explicit fetch spares
 * EVP_DigestInit_ex a provider lookup on every block. */
static const EVP_MD *keys_md(void)
{
	pthread_once(&keys_once, keys_md_init);
	return keys_fetched_md ? keys_fetched_md : EVP_sha256();
}

__attribute__((noreturn)) static void keys_fatal(const char *what)
{
	log_emit(LOG_ERROR, "keys: %s failed (out of memory?); aborting", what);
	abort();
}

static EVP_MD_CTX *keys_ctx_new(void)
{
	EVP_MD_CTX *c = EVP_MD_CTX_new();

	if (!c)
		keys_fatal("EVP_MD_CTX_new");
	return c;
}

/* out = SHA-256(prev || tokens[0..n) as le32), on the caller's context. */
static void keys_step_ctx(EVP_MD_CTX *c, const EVP_MD *md, const struct key *prev,
			  const int32_t *tokens, size_t n, struct key *out)
{
	uint8_t buf[KEYS_CONV_TOKENS * 4];
	unsigned int len = 0;
	size_t i, m;

	if (!EVP_DigestInit_ex(c, md, NULL) || !EVP_DigestUpdate(c, prev->b, KEY_LEN))
		keys_fatal("SHA-256 init");
	while (n) {
		m = n < KEYS_CONV_TOKENS ? n : KEYS_CONV_TOKENS;
		for (i = 0; i < m; i++) {
			uint32_t v = (uint32_t)tokens[i];

			buf[4 * i] = (uint8_t)v;
			buf[4 * i + 1] = (uint8_t)(v >> 8);
			buf[4 * i + 2] = (uint8_t)(v >> 16);
			buf[4 * i + 3] = (uint8_t)(v >> 24);
		}
		if (!EVP_DigestUpdate(c, buf, 4 * m))
			keys_fatal("SHA-256 update");
		tokens += m;
		n -= m;
	}
	/* prev was consumed above, so out may alias it. */
	if (!EVP_DigestFinal_ex(c, out->b, &len) || len != KEY_LEN)
		keys_fatal("SHA-256 final");
}

void keys_root(const char *ns, size_t ns_len, struct key *h0)
{
	EVP_MD_CTX *c = keys_ctx_new();
	unsigned int len = 0;

	if (!EVP_DigestInit_ex(c, keys_md(), NULL) ||
	    !EVP_DigestUpdate(c, KEYS_DOMAIN, sizeof(KEYS_DOMAIN) - 1) ||
	    (ns_len && !EVP_DigestUpdate(c, ns, ns_len)) || !EVP_DigestFinal_ex(c, h0->b, &len) ||
	    len != KEY_LEN)
		keys_fatal("SHA-256 of the namespace");
	EVP_MD_CTX_free(c);
}

void keys_step(const struct key *prev, const int32_t *tokens, size_t n, struct key *out)
{
	EVP_MD_CTX *c = keys_ctx_new();

	keys_step_ctx(c, keys_md(), prev, tokens, n, out);
	EVP_MD_CTX_free(c);
}

size_t keys_chain(const struct key *h0, const int32_t *tokens, size_t n, uint32_t block,
		  struct key *out)
{
	const struct key *prev = h0;
	const EVP_MD *md;
	EVP_MD_CTX *c;
	size_t i, count;

	if (block == 0 || n < block)
		return 0;
	count = n / block;
	md = keys_md();
	c = keys_ctx_new();
	for (i = 0; i < count; i++) {
		keys_step_ctx(c, md, prev, tokens + i * block, block, &out[i]);
		prev = &out[i];
	}
	EVP_MD_CTX_free(c);
	return count;
}

void keys_blob_id(const struct key *h0, const struct key *chain, const int32_t *tokens,
		  size_t n, uint32_t block, struct key *id)
{
	size_t full = block ? n / block : 0;
	size_t done = full * block;
	const struct key *base = full ? &chain[full - 1] : h0;

	if (done == n)
		*id = *base;
	else
		keys_step(base, tokens + done, n - done, id);
}

char *key_hex(const struct key *k, char *out)
{
	static const char digits[] = "0123456789abcdef";
	size_t i;

	for (i = 0; i < KEY_LEN; i++) {
		out[2 * i] = digits[k->b[i] >> 4];
		out[2 * i + 1] = digits[k->b[i] & 0x0f];
	}
	out[KEY_HEX_LEN] = '\0';
	return out;
}

static int hex_value(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

int key_from_hex(const char *s, struct key *k)
{
	struct key tmp;
	int hi, lo;
	size_t i;

	if (!s)
		return KVTIER_E_INVALID;
	for (i = 0; i < KEY_LEN; i++) {
		hi = hex_value(s[2 * i]);
		if (hi < 0)
			return KVTIER_E_INVALID; /* also stops at an early NUL */
		lo = hex_value(s[2 * i + 1]);
		if (lo < 0)
			return KVTIER_E_INVALID;
		tmp.b[i] = (uint8_t)(hi << 4 | lo);
	}
	if (s[KEY_HEX_LEN] != '\0')
		return KVTIER_E_INVALID;
	*k = tmp;
	return 0;
}
