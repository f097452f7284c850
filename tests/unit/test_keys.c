/* test_keys.c: the prefix key chain (common/keys.c) against fixed known
 * answers and against a deliberately plain reference written here (one
 * SHA256() call over the concatenated bytes), on the real token arrays of
 * the v2 fixtures.
 */
#include "check.h"
#include "keys.h"
#include "kvtier.h"
#include "slotfile.h"

#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/sha.h>

/* SHA-256("kvtier/v1" || ns), the plain way. */
static void ref_root(const char *ns, struct key *out)
{
	uint8_t buf[512];
	size_t n = strlen(ns);

	CHECK(9 + n <= sizeof(buf));
	memcpy(buf, "kvtier/v1", 9);
	memcpy(buf + 9, ns, n);
	SHA256(buf, 9 + n, out->b);
}

/* SHA-256(prev || tokens as le32), the plain way. */
static void ref_step(const struct key *prev, const int32_t *t, size_t n, struct key *out)
{
	uint8_t *buf = malloc(KEY_LEN + 4 * n + 1);
	size_t i;

	CHECK(buf);
	memcpy(buf, prev->b, KEY_LEN);
	for (i = 0; i < n; i++) {
		uint32_t v = (uint32_t)t[i];

		buf[KEY_LEN + 4 * i] = (uint8_t)(v & 0xff);
		buf[KEY_LEN + 4 * i + 1] = (uint8_t)((v >> 8) & 0xff);
		buf[KEY_LEN + 4 * i + 2] = (uint8_t)((v >> 16) & 0xff);
		buf[KEY_LEN + 4 * i + 3] = (uint8_t)((v >> 24) & 0xff);
	}
	SHA256(buf, KEY_LEN + 4 * n, out->b);
	free(buf);
}

static int key_eq(const struct key *a, const struct key *b)
{
	return memcmp(a->b, b->b, KEY_LEN) == 0;
}

static int32_t *load_tokens(const char *name, uint32_t *n)
{
	char path[4096], err[256];
	struct slot_info info;
	int32_t *t = NULL;
	int fd;

	snprintf(path, sizeof(path), "%s/v2/%s", fixtures_dir(), name);
	fd = open(path, O_RDONLY);
	if (fd < 0)
		SKIP("fixture %s not found (set KVTIER_FIXTURES)", path);
	CHECK_EQ_INT(slot_parse_fd(fd, &info, &t, err, sizeof(err)), 0);
	close(fd);
	*n = info.n_tokens;
	return t;
}

static void test_known_answers(void)
{
	struct key h0, h1, r, chain[1];
	int32_t t[64];
	char hex[KEY_HEX_LEN + 1];
	int i;

	/* printf 'kvtier/v1' | sha256sum */
	keys_root("", 0, &h0);
	CHECK(strcmp(key_hex(&h0, hex),
		     "4976cf0b07c9712a157febd521830ba5d7efd0237e7c0baba29dacee60332545") == 0);
	/* printf 'kvtier/v1model-x' | sha256sum */
	keys_root("model-x", 7, &r);
	CHECK(strcmp(key_hex(&r, hex),
		     "10ad93f60f17b10655751118ccf49535f429eea5acdf42e8b3860afde86301d3") == 0);
	/* Python: sha256(h0 + struct.pack('<64i', *[i*1000-7 for i in range(64)])) */
	for (i = 0; i < 64; i++)
		t[i] = i * 1000 - 7;
	keys_step(&h0, t, 64, &h1);
	CHECK(strcmp(key_hex(&h1, hex),
		     "58e6c0be2761de70ce2db6b3e9872589d3a66f819166b299b83ab734579bc097") == 0);
	CHECK_EQ_INT(keys_chain(&h0, t, 64, 64, chain), 1);
	CHECK(key_eq(&chain[0], &h1));
	ref_step(&h0, t, 64, &r);
	CHECK(key_eq(&r, &h1));

	/* out may alias prev. */
	r = h0;
	keys_step(&r, t, 64, &r);
	CHECK(key_eq(&r, &h1));
}

static void test_fixture_chains(void)
{
	struct key h0, r0, ca[8], cb[8], id, ref;
	uint32_t na, nb, i;
	int32_t *ta = load_tokens("chat-a-turn1.bin", &na);
	int32_t *tb = load_tokens("chat-b-turn1.bin", &nb);

	CHECK_EQ_INT(na, 274);
	CHECK_EQ_INT(nb, 268);
	keys_root("llama/micro f16", 15, &h0);
	ref_root("llama/micro f16", &r0);
	CHECK(key_eq(&h0, &r0));

	CHECK_EQ_INT(keys_chain(&h0, ta, na, 64, ca), 4);
	CHECK_EQ_INT(keys_chain(&h0, tb, nb, 64, cb), 4);
	/* Each key against the reference, chained by hand. */
	ref = r0;
	for (i = 0; i < 4; i++) {
		ref_step(&ref, ta + 64 * i, 64, &ref);
		CHECK(key_eq(&ca[i], &ref));
	}
	/* 225 shared tokens: 3 full blocks agree, the 4th does not. */
	for (i = 0; i < 3; i++)
		CHECK(key_eq(&ca[i], &cb[i]));
	CHECK(!key_eq(&ca[3], &cb[3]));

	/* Blob ids. */
	keys_blob_id(&h0, ca, ta, 128, 64, &id);
	CHECK(key_eq(&id, &ca[1]));
	keys_blob_id(&h0, ca, ta, 256, 64, &id);
	CHECK(key_eq(&id, &ca[3]));
	keys_blob_id(&h0, ca, ta, na, 64, &id); /* 4 blocks + 18 tokens */
	ref_step(&ca[3], ta + 256, 18, &ref);
	CHECK(key_eq(&id, &ref));
	keys_blob_id(&h0, cb, tb, nb, 64, &id); /* 4 blocks + 12 tokens */
	ref_step(&cb[3], tb + 256, 12, &ref);
	CHECK(key_eq(&id, &ref));
	keys_blob_id(&h0, ca, ta, 30, 64, &id); /* no full block */
	ref_step(&r0, ta, 30, &ref);
	CHECK(key_eq(&id, &ref));
	keys_blob_id(&h0, ca, ta, 0, 64, &id);
	CHECK(key_eq(&id, &h0));

	/* Fewer tokens than a block, or block 0: no keys. */
	CHECK_EQ_INT(keys_chain(&h0, ta, 63, 64, ca), 0);
	CHECK_EQ_INT(keys_chain(&h0, ta, na, 0, ca), 0);
	/* Other block sizes chain the same way. */
	CHECK_EQ_INT(keys_chain(&h0, ta, na, 100, ca), 2);
	ref_step(&r0, ta, 100, &ref);
	CHECK(key_eq(&ca[0], &ref));
	ref_step(&ref, ta + 100, 100, &ref);
	CHECK(key_eq(&ca[1], &ref));

	/* Namespaces never share keys. */
	{
		struct key g0, ga[4], gid;

		keys_root("llama/micro q8_0", 16, &g0);
		CHECK(!key_eq(&g0, &h0));
		CHECK_EQ_INT(keys_chain(&g0, ta, na, 64, ga), 4);
		CHECK_EQ_INT(keys_chain(&h0, ta, na, 64, ca), 4);
		for (i = 0; i < 4; i++)
			CHECK(!key_eq(&ga[i], &ca[i]));
		keys_blob_id(&g0, ga, ta, na, 64, &gid);
		keys_blob_id(&h0, ca, ta, na, 64, &id);
		CHECK(!key_eq(&gid, &id));
		/* ns_len is what counts, not a NUL. */
		keys_root("llama/micro f16 and more", 15, &g0);
		CHECK(key_eq(&g0, &h0));
	}
	free(ta);
	free(tb);
}

static void test_long_chain(void)
{
	const size_t n = 32768;
	int32_t *t = malloc(n * sizeof(*t));
	struct key *c = malloc((n / 64) * sizeof(*c));
	struct key h0, ref;
	size_t i;

	CHECK(t && c);
	for (i = 0; i < n; i++)
		t[i] = (int32_t)((i * 2654435761u) % 32000u) - (i % 97 == 0 ? 40000 : 0);
	keys_root("long", 4, &h0);
	CHECK_EQ_INT(keys_chain(&h0, t, n, 64, c), 512);
	ref_root("long", &ref);
	for (i = 0; i < 512; i++) {
		ref_step(&ref, t + 64 * i, 64, &ref);
		CHECK(key_eq(&c[i], &ref));
	}
	/* One step over more than the conversion buffer. */
	keys_step(&h0, t, 1000, &h0);
	ref_root("long", &ref);
	ref_step(&ref, t, 1000, &ref);
	CHECK(key_eq(&h0, &ref));
	free(c);
	free(t);
}

static void test_hex(void)
{
	static const char good[] =
		"00ff10aB9C7e0123456789abcdefABCDEF00112233445566778899aabbccddee";
	char hex[KEY_HEX_LEN + 1], bad[80];
	struct key k, k2, keep;
	int i;

	for (i = 0; i < KEY_LEN; i++)
		k.b[i] = (uint8_t)(i * 37 + 5);
	key_hex(&k, hex);
	CHECK_EQ_INT(strlen(hex), 64);
	for (i = 0; i < 64; i++)
		CHECK((hex[i] >= '0' && hex[i] <= '9') || (hex[i] >= 'a' && hex[i] <= 'f'));
	CHECK_EQ_INT(key_from_hex(hex, &k2), 0);
	CHECK(key_eq(&k, &k2));

	CHECK_EQ_INT(key_from_hex(good, &k2), 0);
	CHECK_EQ_INT(k2.b[0], 0x00);
	CHECK_EQ_INT(k2.b[1], 0xff);
	CHECK_EQ_INT(k2.b[3], 0xab);
	CHECK_EQ_INT(k2.b[4], 0x9c);
	CHECK_EQ_INT(k2.b[31], 0xee);
	key_hex(&k2, hex);
	CHECK(strcmp(hex, "00ff10ab9c7e0123456789abcdefabcdef00112233445566778899aabbccddee") == 0);

	/* Refused: wrong length, bad characters; *k untouched. */
	keep = k2;
	CHECK_EQ_INT(key_from_hex(NULL, &k2), KVTIER_E_INVALID);
	CHECK_EQ_INT(key_from_hex("", &k2), KVTIER_E_INVALID);
	memcpy(bad, good, 63);
	bad[63] = '\0';
	CHECK_EQ_INT(key_from_hex(bad, &k2), KVTIER_E_INVALID);
	memcpy(bad, good, 64);
	bad[64] = '0';
	bad[65] = '\0';
	CHECK_EQ_INT(key_from_hex(bad, &k2), KVTIER_E_INVALID);
	bad[64] = '\n';
	CHECK_EQ_INT(key_from_hex(bad, &k2), KVTIER_E_INVALID);
	for (i = 0; i < 64; i++) {
		memcpy(bad, good, 65);
		bad[i] = i % 3 == 0 ? 'g' : i % 3 == 1 ? ' ' : 'x';
		CHECK_EQ_INT(key_from_hex(bad, &k2), KVTIER_E_INVALID);
	}
	memcpy(bad, good, 65);
	bad[10] = '\0';
	CHECK_EQ_INT(key_from_hex(bad, &k2), KVTIER_E_INVALID);
	CHECK(key_eq(&k2, &keep));
}

int main(void)
{
	test_known_answers();
	test_fixture_chains();
	test_long_chain();
	test_hex();
	printf("test_keys: ok\n");
	return 0;
}
