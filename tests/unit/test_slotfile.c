/* test_slotfile.c: the slot file parser (common/slotfile.c) against the real
 * llama-server files in $KVTIER_FIXTURES and against synthetic files built in
 * memory: every truncation, trailing bytes, bad magic and version, the
 * bounds, sequence ids, layouts whose layers differ, and read errors.
 */
#include "check.h"
#include "kvtier.h"
#include "slotfile.h"

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct membuf {
	const uint8_t *p;
	size_t len;
	int fail_at_call; /* > 0: that call (1-based) returns -EIO */
	int calls;
};

static int mem_read(void *ctx, void *buf, size_t len, uint64_t off)
{
	struct membuf *m = ctx;

	m->calls++;
	if (m->fail_at_call && m->calls == m->fail_at_call)
		return -EIO;
	if (off > m->len || len > m->len - off)
		return -ENODATA;
	memcpy(buf, m->p + off, len);
	return 0;
}

static int parse_mem(const uint8_t *p, size_t len, struct slot_info *info, int32_t **tokens,
		     char *err, size_t errlen)
{
	struct membuf m = { p, len, 0, 0 };

	return slot_parse(mem_read, &m, len, info, tokens, err, errlen);
}

static uint8_t *load(const char *dir, const char *name, size_t *len)
{
	char path[4096];
	uint8_t *buf;
	FILE *f;
	long n;

	snprintf(path, sizeof(path), "%s/%s/%s", fixtures_dir(), dir, name);
	f = fopen(path, "rb");
	if (!f)
		SKIP("fixture %s not found (set KVTIER_FIXTURES)", path);
	CHECK(fseek(f, 0, SEEK_END) == 0);
	n = ftell(f);
	CHECK(n >= 0);
	rewind(f);
	buf = malloc((size_t)n + 16);
	CHECK(buf);
	CHECK(fread(buf, 1, (size_t)n, f) == (size_t)n);
	fclose(f);
	*len = (size_t)n;
	return buf;
}

/* Parses a fixture through slot_parse_fd and checks it against the in-memory parse. */
static void parse_fixture(const char *dir, const char *name, struct slot_info *info,
			  int32_t **tokens, int expect_rc)
{
	char path[4096], err[256], err2[256];
	struct slot_info mi;
	int32_t *mt = NULL;
	uint8_t *buf;
	size_t len;
	int fd, rc;

	buf = load(dir, name, &len);
	snprintf(path, sizeof(path), "%s/%s/%s", fixtures_dir(), dir, name);
	fd = open(path, O_RDONLY);
	CHECK(fd >= 0);
	rc = slot_parse_fd(fd, info, tokens, err, sizeof(err));
	close(fd);
	if (rc != expect_rc)
		fprintf(stderr, "%s/%s: rc %d (%s)\n", dir, name, rc, err);
	CHECK_EQ_INT(rc, expect_rc);
	CHECK_EQ_INT(info->file_size, len);

	rc = parse_mem(buf, len, &mi, &mt, err2, sizeof(err2));
	CHECK_EQ_INT(rc, expect_rc);
	CHECK(memcmp(&mi, info, sizeof(mi)) == 0);
	if (rc == 0) {
		CHECK(mt && tokens && *tokens);
		CHECK(memcmp(mt, *tokens, mi.n_tokens * sizeof(int32_t)) == 0);
	} else {
		CHECK(mt == NULL);
		CHECK(strcmp(err, err2) == 0);
	}
	free(mt);
	free(buf);
}

static int same_layout(const struct slot_info *a, const struct slot_info *b)
{
	return a->has_layout && b->has_layout && a->layout_len == b->layout_len &&
	       memcmp(a->layout, b->layout, sizeof(a->layout)) == 0;
}

static const char *const dirs[] = { "v2", "v2-flash-attn", "v2-q8", "v4-ik" };

static void test_fixtures(void)
{
	struct slot_info a1[4], a2[4], b1[4], e[4];
	int32_t *ta1[4], *ta2[4], *tb1[4], *te = NULL;
	char err[256], desc[160];
	int d, fd;

	for (d = 0; d < 4; d++) {
		int v4 = d == 3;

		parse_fixture(dirs[d], "chat-a-turn1.bin", &a1[d], &ta1[d], 0);
		parse_fixture(dirs[d], "chat-a-turn2.bin", &a2[d], &ta2[d], 0);
		parse_fixture(dirs[d], "chat-b-turn1.bin", &b1[d], &tb1[d], 0);
		CHECK_EQ_INT(a1[d].n_tokens, 274);
		CHECK_EQ_INT(a2[d].n_tokens, 334);
		CHECK_EQ_INT(b1[d].n_tokens, 268);
		CHECK_EQ_INT(a1[d].version, v4 ? 4 : 2);
		CHECK_EQ_INT(a2[d].version, v4 ? 4 : 2);
		CHECK_EQ_INT(b1[d].version, v4 ? 4 : 2);
		CHECK_EQ_INT(a1[d].state_offset, 12 + 4 * 274);
		CHECK_EQ_INT(b1[d].state_offset, 12 + 4 * 268);
		CHECK_EQ_INT(a1[d].has_layout, !v4);
		CHECK_EQ_INT(a1[d].file_size, d == 2 ? 40624 : v4 ? 73512 : 73504);
		if (!v4) {
			CHECK_EQ_INT(a1[d].n_cells, 274);
			CHECK_EQ_INT(a2[d].n_cells, 334);
			CHECK_EQ_INT(b1[d].n_cells, 268);
			CHECK_EQ_INT(a1[d].n_layer, 2);
			CHECK_EQ_INT(a1[d].v_trans, d == 0 ? 1 : 0);
			CHECK_EQ_INT(a1[d].layout_len, 34);
			/* Same server configuration, any conversation: one layout. */
			CHECK(same_layout(&a1[d], &a2[d]));
			CHECK(same_layout(&a1[d], &b1[d]));
		} else {
			CHECK_EQ_INT(a1[d].layout_len, 0);
		}
		/* BOS first; turn 2 extends turn 1; chat B shares exactly 225 tokens. */
		CHECK_EQ_INT(ta1[d][0], 1);
		CHECK_EQ_INT(ta1[d][1], 529);
		CHECK(memcmp(ta2[d], ta1[d], 274 * sizeof(int32_t)) == 0);
		CHECK(memcmp(tb1[d], ta1[d], 225 * sizeof(int32_t)) == 0);
		CHECK(tb1[d][225] != ta1[d][225]);
		/* Every server got the same prompt. */
		CHECK(memcmp(ta1[d], ta1[0], 225 * sizeof(int32_t)) == 0);

		/* empty.bin: refused, but described. */
		parse_fixture(dirs[d], "empty.bin", &e[d], &te, KVTIER_E_INVALID);
		CHECK(te == NULL);
		CHECK_EQ_INT(e[d].n_tokens, 0);
		CHECK_EQ_INT(e[d].version, v4 ? 4 : 2);
		if (!v4) {
			CHECK_EQ_INT(e[d].n_cells, 0);
			CHECK(same_layout(&e[d], &a1[d]));
		}
	}
	{
		struct slot_info info;
		uint8_t *buf;
		size_t len;

		buf = load("v2", "empty.bin", &len);
		CHECK_EQ_INT(len, 72);
		CHECK_EQ_INT(parse_mem(buf, len, &info, &te, err, sizeof(err)), KVTIER_E_INVALID);
		CHECK(strncmp(err, "empty slot file (0 tokens)", 26) == 0);
		CHECK(strstr(err, "llama-server crashes"));
		free(buf);
	}

	/* Layouts: v_trans and the KV type are told apart, bytewise. */
	CHECK(!same_layout(&a1[0], &a1[1]));
	CHECK(!same_layout(&a1[0], &a1[2]));
	CHECK(!same_layout(&a1[1], &a1[2]));
	CHECK(memcmp(a1[0].layout, a1[1].layout, SLOT_LAYOUT_MAX) != 0);
	CHECK(memcmp(a1[0].layout, a1[2].layout, SLOT_LAYOUT_MAX) != 0);

	slot_layout_describe(a1[0].layout, a1[0].layout_len, desc, sizeof(desc));
	CHECK(strcmp(desc, "n_layer=2 v_trans=1 k=f16 64B/row v=f16 2B x 32") == 0);
	slot_layout_describe(a1[1].layout, a1[1].layout_len, desc, sizeof(desc));
	CHECK(strcmp(desc, "n_layer=2 v_trans=0 k=f16 64B/row v=f16 64B/row") == 0);
	slot_layout_describe(a1[2].layout, a1[2].layout_len, desc, sizeof(desc));
	CHECK(strcmp(desc, "n_layer=2 v_trans=0 k=q8_0 34B/row v=q8_0 34B/row") == 0);
	slot_layout_describe(a1[0].layout, 3, desc, sizeof(desc));
	CHECK(strcmp(desc, "unknown layout (3 bytes)") == 0);
	slot_layout_describe(a1[0].layout, a1[0].layout_len, desc, 8);
	CHECK(strcmp(desc, "n_layer") == 0);

	/* tokens_out may be NULL. */
	{
		struct slot_info info;
		uint8_t *buf;
		size_t len;

		buf = load("v2", "chat-a-turn1.bin", &len);
		CHECK_EQ_INT(parse_mem(buf, len, &info, NULL, err, sizeof(err)), 0);
		CHECK_EQ_INT(info.n_tokens, 274);
		free(buf);
	}

	/* Not a regular file. */
	fd = open("/dev/null", O_RDONLY);
	CHECK(fd >= 0);
	{
		struct slot_info info;
		int32_t *t = (int32_t *)&fd; /* must come back NULL */

		CHECK_EQ_INT(slot_parse_fd(fd, &info, &t, err, sizeof(err)), KVTIER_E_INVALID);
		CHECK(t == NULL);
		CHECK(strstr(err, "not a regular file"));
	}
	close(fd);
	CHECK(slot_parse_fd(-1, &a1[0], NULL, err, sizeof(err)) == -EBADF);
	CHECK(strncmp(err, "read error", 10) == 0);

	for (d = 0; d < 4; d++) {
		free(ta1[d]);
		free(ta2[d]);
		free(tb1[d]);
	}
}

static void expect_refused(const uint8_t *p, size_t len, const char *prefix)
{
	struct slot_info info;
	int32_t *t = (int32_t *)p; /* must come back NULL */
	char err[256];
	int rc;

	rc = parse_mem(p, len, &info, &t, err, sizeof(err));
	if (rc != KVTIER_E_INVALID || strncmp(err, prefix, strlen(prefix)) != 0)
		fprintf(stderr, "len %zu: rc %d, err \"%s\", expected \"%s...\"\n", len, rc, err,
			prefix);
	CHECK_EQ_INT(rc, KVTIER_E_INVALID);
	CHECK(strncmp(err, prefix, strlen(prefix)) == 0);
	CHECK(t == NULL);
	CHECK(strchr(err, '\n') == NULL);
}

static void put32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
	p[2] = (uint8_t)(v >> 16);
	p[3] = (uint8_t)(v >> 24);
}

static void test_mutations(void)
{
	struct slot_info info;
	int32_t *t = NULL;
	uint8_t *buf, *big, hdr[12];
	char err[256];
	size_t len, cut;

	buf = load("v2", "chat-a-turn1.bin", &len);
	CHECK_EQ_INT(len, 73504);

	/* Every proper prefix of the file is truncated, whatever the cut. */
	for (cut = 0; cut < len; cut++)
		expect_refused(buf, cut, "truncated");
	/* The named ones, with the part that is missing. */
	expect_refused(buf, 0, "truncated: file is 0 bytes, a slot file header needs 12");
	expect_refused(buf, 4, "truncated: file is 4 bytes");
	expect_refused(buf, 11, "truncated: file is 11 bytes");
	expect_refused(buf, 12, "truncated: file is 12 bytes, its 274 tokens need 1108");
	expect_refused(buf, 100, "truncated: file is 100 bytes, its 274 tokens need 1108");
	expect_refused(buf, 12 + 4 * 274, "truncated: the state's cell count");
	expect_refused(buf, 12 + 4 * 274 + 4 + 8 * 100, "truncated: the cell table");
	expect_refused(buf, 73503, "truncated: layer 1 V data ends at 73504");

	/* One byte too many. */
	big = malloc(len + 1);
	CHECK(big);
	memcpy(big, buf, len);
	big[len] = 0;
	expect_refused(big, len + 1, "malformed state: 1 trailing bytes");

	/* Bad magic, at any length that holds it. */
	memcpy(big, buf, len);
	big[0] ^= 0x20;
	expect_refused(big, len, "bad magic 0x67677351");
	expect_refused(big, 4, "bad magic");
	memcpy(big, "GGUF", 4);
	expect_refused(big, len, "bad magic");

	/* Versions other than 2 and 4. */
	memcpy(big, buf, len);
	put32(big + 4, 3);
	expect_refused(big, len, "unsupported version 3");
	expect_refused(big, 8, "unsupported version 3");
	put32(big + 4, 1);
	expect_refused(big, len, "unsupported version 1");
	put32(big + 4, 5);
	expect_refused(big, len, "unsupported version 5");

	/* Token count bounds, checked before anything is allocated. */
	put32(hdr, SLOT_MAGIC);
	put32(hdr + 4, 2);
	put32(hdr + 8, SLOT_MAX_TOKENS + 1);
	expect_refused(hdr, 12, "oversized: 4194305 tokens");
	put32(hdr + 8, UINT32_MAX);
	expect_refused(hdr, 12, "oversized");
	put32(hdr + 4, 4);
	expect_refused(hdr, 12, "oversized");
	put32(hdr + 8, SLOT_MAX_TOKENS);
	expect_refused(hdr, 12, "truncated: file is 12 bytes, its 4194304 tokens need 16777228");

	/* A version-2 header over a version-4 body and the reverse: v4 is
	 * opaque after the tokens, v2 must add up exactly. */
	{
		uint8_t *v4;
		size_t v4len;

		v4 = load("v4-ik", "chat-a-turn1.bin", &v4len);
		CHECK_EQ_INT(parse_mem(v4, v4len, &info, &t, err, sizeof(err)), 0);
		free(t);
		t = NULL;
		put32(v4 + 4, 2);
		expect_refused(v4, v4len, "malformed state");
		put32(v4 + 4, 4);
		/* Version 4 needs only the tokens. */
		CHECK_EQ_INT(parse_mem(v4, 12 + 4 * 274, &info, &t, err, sizeof(err)), 0);
		CHECK_EQ_INT(info.n_tokens, 274);
		CHECK_EQ_INT(info.has_layout, 0);
		free(t);
		t = NULL;
		expect_refused(v4, 12 + 4 * 274 - 1, "truncated: file is 1107 bytes");
		free(v4);

		memcpy(big, buf, len);
		put32(big + 4, 4);
		CHECK_EQ_INT(parse_mem(big, len, &info, &t, err, sizeof(err)), 0);
		CHECK_EQ_INT(info.version, 4);
		free(t);
		t = NULL;
	}

	/* Read errors come back as the callback's errno, whichever read fails. */
	{
		struct membuf m = { buf, len, 0, 0 };
		int n_calls, i, rc;

		CHECK_EQ_INT(slot_parse(mem_read, &m, len, &info, &t, err, sizeof(err)), 0);
		free(t);
		t = NULL;
		n_calls = m.calls;
		CHECK(n_calls > 3 && n_calls < 40); /* the K/V rows are never read */
		for (i = 1; i <= n_calls; i++) {
			struct membuf f = { buf, len, i, 0 };

			rc = slot_parse(mem_read, &f, len, &info, &t, err, sizeof(err));
			CHECK_EQ_INT(rc, -EIO);
			CHECK(t == NULL);
			CHECK(strncmp(err, "read error: ", 12) == 0);
		}
	}
	free(big);
	free(buf);
}

/* A synthetic version-2 file, built in memory with zeroed KV rows. */
struct synth {
	uint32_t n_tokens, n_cells, v_trans, n_layer;
	uint32_t seq_every;             /* cell i gets i % seq_every sequence ids (0: none) */
	int32_t k_type[4], v_type[4];
	uint64_t k_row[4], v_row[4];    /* v_trans 0 */
	uint32_t v_el[4], v_embd[4];    /* v_trans 1 */
};

static uint8_t *synth_build(const struct synth *s, size_t *len)
{
	size_t cap = 1 << 20, n = 0;
	uint8_t *b = calloc(1, cap);
	uint32_t i, l, j;

	CHECK(b);
#define EMIT(bytes)                                                                         \
	do {                                                                                \
		CHECK(n + (bytes) <= cap);                                                  \
		n += (bytes);                                                               \
	} while (0)
#define EMIT32(v)                                                                           \
	do {                                                                                \
		EMIT(4);                                                                    \
		put32(b + n - 4, (uint32_t)(v));                                            \
	} while (0)
#define EMIT64(v)                                                                           \
	do {                                                                                \
		EMIT32((uint64_t)(v));                                                      \
		EMIT32((uint64_t)(v) >> 32);                                                \
	} while (0)
	EMIT32(SLOT_MAGIC);
	EMIT32(2);
	EMIT32(s->n_tokens);
	for (i = 0; i < s->n_tokens; i++)
		EMIT32((int32_t)(i * 7919u) - 1000); /* some negative */
	EMIT32(s->n_cells);
	for (i = 0; i < s->n_cells; i++) {
		uint32_t ns = s->seq_every ? i % s->seq_every : 0;

		EMIT32(i);
		EMIT32(ns);
		for (j = 0; j < ns; j++)
			EMIT32(j);
	}
	EMIT32(s->v_trans);
	EMIT32(s->n_layer);
	for (l = 0; l < s->n_layer; l++) {
		EMIT32(s->k_type[l]);
		EMIT64(s->k_row[l]);
		EMIT(s->n_cells * s->k_row[l]);
	}
	for (l = 0; l < s->n_layer; l++) {
		EMIT32(s->v_type[l]);
		if (s->v_trans == 0) {
			EMIT64(s->v_row[l]);
			EMIT(s->n_cells * s->v_row[l]);
		} else {
			EMIT32(s->v_el[l]);
			EMIT32(s->v_embd[l]);
			EMIT((size_t)s->n_cells * s->v_el[l] * s->v_embd[l]);
		}
	}
#undef EMIT64
#undef EMIT32
#undef EMIT
	*len = n;
	return b;
}

static int synth_parse(const struct synth *s, struct slot_info *info, char *err, size_t errlen)
{
	int32_t *t = NULL;
	size_t len;
	uint8_t *b = synth_build(s, &len);
	uint32_t i;
	int rc;

	rc = parse_mem(b, len, info, &t, err, errlen);
	if (rc == 0) {
		CHECK_EQ_INT(info->n_tokens, s->n_tokens);
		CHECK_EQ_INT(info->file_size, len);
		for (i = 0; i < s->n_tokens; i++)
			CHECK_EQ_INT(t[i], (int32_t)(i * 7919u) - 1000);
	} else {
		CHECK(t == NULL);
	}
	free(t);
	free(b);
	return rc;
}

static void test_synthetic(void)
{
	struct synth s, base = {
		.n_tokens = 274, .n_cells = 274, .v_trans = 1, .n_layer = 2,
		.k_type = { 1, 1 }, .k_row = { 64, 64 },
		.v_type = { 1, 1 }, .v_el = { 2, 2 }, .v_embd = { 32, 32 },
	};
	struct slot_info fx, a, b, c;
	char err[256], desc[160];
	int32_t *t = NULL;
	uint8_t *buf;
	size_t len;

	/* The builder makes what llama-server makes: same size, same layout. */
	buf = load("v2", "chat-a-turn1.bin", &len);
	CHECK_EQ_INT(parse_mem(buf, len, &fx, &t, err, sizeof(err)), 0);
	free(t);
	free(buf);
	CHECK_EQ_INT(synth_parse(&base, &a, err, sizeof(err)), 0);
	CHECK_EQ_INT(a.file_size, 73504);
	CHECK(same_layout(&a, &fx));

	/* Cells need not equal tokens; sequence ids are stepped over. */
	s = base;
	s.n_tokens = 10;
	s.n_cells = 12;
	s.seq_every = 5;
	CHECK_EQ_INT(synth_parse(&s, &b, err, sizeof(err)), 0);
	CHECK_EQ_INT(b.n_cells, 12);
	CHECK(same_layout(&a, &b));
	s.n_cells = 600; /* cell table longer than the read-ahead */
	s.seq_every = 9;
	CHECK_EQ_INT(synth_parse(&s, &b, err, sizeof(err)), 0);
	CHECK_EQ_INT(b.n_cells, 600);
	s.n_cells = 0;
	CHECK_EQ_INT(synth_parse(&s, &b, err, sizeof(err)), 0);
	CHECK(same_layout(&a, &b));

	/* Bounds on the state. */
	s = base;
	s.n_cells = 3;
	s.seq_every = 300;
	CHECK_EQ_INT(synth_parse(&s, &b, err, sizeof(err)), 0); /* at most 2 ids */
	{
		size_t blen;
		uint8_t *bb;

		s.seq_every = 0;
		bb = synth_build(&s, &blen);
		put32(bb + 12 + 4 * 274 + 4 + 8 * 2 + 4, 257); /* cell 2's n_seq_id */
		expect_refused(bb, blen, "malformed state: cell 2 has 257 sequence ids");
		put32(bb + 12 + 4 * 274 + 4 + 8 * 2 + 4, 256);
		expect_refused(bb, blen, "truncated"); /* allowed, but the ids are not there */
		put32(bb + 12 + 4 * 274, SLOT_MAX_TOKENS + 1);
		expect_refused(bb, blen, "malformed state: 4194305 cells");
		free(bb);
	}
	s = base;
	s.v_trans = 2;
	CHECK_EQ_INT(synth_parse(&s, &b, err, sizeof(err)), KVTIER_E_INVALID);
	CHECK(strncmp(err, "malformed state: v_trans is 2", 29) == 0);
	s = base;
	s.n_layer = 0;
	CHECK_EQ_INT(synth_parse(&s, &b, err, sizeof(err)), KVTIER_E_INVALID);
	CHECK(strncmp(err, "malformed state: n_layer is 0", 29) == 0);
	{
		size_t blen;
		uint8_t *bb = synth_build(&base, &blen);

		put32(bb + 12 + 4 * 274 + 4 + 8 * 274 + 4, SLOT_MAX_LAYERS + 1);
		expect_refused(bb, blen, "malformed state: n_layer is 1025");
		free(bb);
	}

	/* Sizes that overflow 64 bits are refused, not wrapped. */
	s = base;
	s.n_tokens = 2;
	s.n_cells = 4;
	s.k_row[0] = 0;
	s.k_row[1] = 0;
	{
		size_t blen;
		uint8_t *bb = synth_build(&s, &blen);
		size_t k0 = 12 + 4 * 2 + 4 + 8 * 4 + 8;

		put32(bb + k0 + 4, 0);
		put32(bb + k0 + 8, 0x40000000u); /* k_row_bytes 2^62, x 4 cells */
		expect_refused(bb, blen, "malformed state: layer 0 K data size overflows");
		put32(bb + k0 + 8, 0x3fffffffu); /* fits, but far past the end */
		expect_refused(bb, blen, "truncated: layer 0 K data ends at");
		free(bb);
	}

	/* v_trans 0 with a type kvtier has no name for. */
	s = base;
	s.v_trans = 0;
	s.k_type[0] = s.k_type[1] = 12;
	s.v_type[0] = s.v_type[1] = 12;
	s.k_row[0] = s.k_row[1] = 18;
	s.v_row[0] = s.v_row[1] = 18;
	CHECK_EQ_INT(synth_parse(&s, &b, err, sizeof(err)), 0);
	slot_layout_describe(b.layout, b.layout_len, desc, sizeof(desc));
	CHECK(strcmp(desc, "n_layer=2 v_trans=0 k=type12 18B/row v=type12 18B/row") == 0);

	/* Layers that differ: layer 0 alone cannot tell these apart. */
	s = base;
	s.n_layer = 3;
	s.k_type[2] = s.v_type[2] = 1;
	s.k_row[2] = 64;
	s.v_el[2] = 2;
	s.v_embd[2] = 32;
	CHECK_EQ_INT(synth_parse(&s, &a, err, sizeof(err)), 0);
	CHECK_EQ_INT(a.layout_len, 34);
	s.k_row[1] = 128;
	CHECK_EQ_INT(synth_parse(&s, &b, err, sizeof(err)), 0);
	CHECK_EQ_INT(b.layout_len, SLOT_LAYOUT_MAX);
	CHECK(!same_layout(&a, &b));
	slot_layout_describe(b.layout, b.layout_len, desc, sizeof(desc));
	CHECK(strncmp(desc, "n_layer=3 v_trans=1 k=f16 64B/row v=f16 2B x 32 mixed=k digest=",
		      63) == 0);
	CHECK_EQ_INT(strlen(desc), 63 + 16);
	s.n_tokens = 100; /* same shape, other size: same signature */
	s.n_cells = 100;
	CHECK_EQ_INT(synth_parse(&s, &c, err, sizeof(err)), 0);
	CHECK(same_layout(&b, &c));
	s.k_row[1] = 64; /* the odd layer moves */
	s.k_row[2] = 128;
	CHECK_EQ_INT(synth_parse(&s, &c, err, sizeof(err)), 0);
	CHECK(!same_layout(&b, &c));
	CHECK(!same_layout(&a, &c));
	s.k_row[2] = 64; /* V differs instead */
	s.v_embd[1] = 64;
	CHECK_EQ_INT(synth_parse(&s, &c, err, sizeof(err)), 0);
	CHECK(!same_layout(&a, &c));
	CHECK(!same_layout(&b, &c));
	slot_layout_describe(c.layout, c.layout_len, desc, sizeof(desc));
	CHECK(strstr(desc, " mixed=v digest="));
	s.k_row[1] = 128;
	CHECK_EQ_INT(synth_parse(&s, &c, err, sizeof(err)), 0);
	slot_layout_describe(c.layout, c.layout_len, desc, sizeof(desc));
	CHECK(strstr(desc, " mixed=kv digest="));
	CHECK(!same_layout(&b, &c));
}

int main(void)
{
	test_fixtures();
	test_mutations();
	test_synthetic();
	printf("test_slotfile: ok\n");
	return 0;
}
