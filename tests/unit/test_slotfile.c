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

/* Every fixture folder: what its files must parse as. */
struct folder {
	const char *dir;
	uint32_t version, form, kind, n_sections;
	uint32_t n_stream, v_trans, size_a1;
	int same_tokens;          /* the micro model's tokens (turn 2 extends turn 1) */
	const char *describe;     /* prefix of the layout's description */
};

static const struct folder folders[] = {
	{ "v2", 2, SLOT_TOKENS_PLAIN, SLOT_STATE_KV_2025, 1, 1, 1, 73504, 1,
	  "n_layer=2 v_trans=1 k=f16 64B/row v=f16 2B x 32" },
	{ "v2-flash-attn", 2, SLOT_TOKENS_PLAIN, SLOT_STATE_KV_2025, 1, 1, 0, 73504, 1,
	  "n_layer=2 v_trans=0 k=f16 64B/row v=f16 64B/row" },
	{ "v2-q8", 2, SLOT_TOKENS_PLAIN, SLOT_STATE_KV_2025, 1, 1, 0, 40624, 1,
	  "n_layer=2 v_trans=0 k=q8_0 34B/row v=q8_0 34B/row" },
	{ "v2-2026", 2, SLOT_TOKENS_PLAIN, SLOT_STATE_KV, 1, 2, 1, 74608, 1,
	  "v2 plain kv streams=2 n_layer=2 v_trans=1 k=f16 64B/row v=f16 2B x 32 digest=" },
	{ "v2-2026-kvu", 2, SLOT_TOKENS_PLAIN, SLOT_STATE_KV, 1, 1, 1, 74604, 1,
	  "v2 plain kv streams=1 n_layer=2 v_trans=1 k=f16 64B/row v=f16 2B x 32 digest=" },
	{ "v2-2026-fa", 2, SLOT_TOKENS_PLAIN, SLOT_STATE_KV, 1, 2, 0, 74608, 1,
	  "v2 plain kv streams=2 n_layer=2 v_trans=0 k=f16 64B/row v=f16 64B/row digest=" },
	{ "v2-2026-q8", 2, SLOT_TOKENS_PLAIN, SLOT_STATE_KV, 1, 2, 0, 41728, 1,
	  "v2 plain kv streams=2 n_layer=2 v_trans=0 k=q8_0 34B/row v=q8_0 34B/row digest=" },
	{ "v2-2026-iswa", 2, SLOT_TOKENS_PLAIN, SLOT_STATE_KV, 2, 2, 0, 123108, 0,
	  "v2 plain kv+kv streams=2 n_layer=1 v_trans=0 k=f16 64B/row v=f16 64B/row digest=" },
	{ "v2-2026-iswa-swafull", 2, SLOT_TOKENS_PLAIN, SLOT_STATE_KV, 2, 2, 0, 123108, 0,
	  "v2 plain kv+kv streams=2 n_layer=1" },
	{ "v2-2026-recurrent", 2, SLOT_TOKENS_PLAIN, SLOT_STATE_RECURRENT, 1, 1, 0, 20632, 0,
	  "v2 plain recurrent n_layer=2 s_trans=0 r=f32 1536B/row s=f32 8192B/row" },
	{ "v2-2026-packed", 2, SLOT_TOKENS_PACKED, SLOT_STATE_KV, 1, 2, 0, 74624, 1,
	  "v2 packed kv streams=2 n_layer=2 v_trans=0 k=f16 64B/row v=f16 64B/row digest=" },
	{ "v3-2026-10", 3, SLOT_TOKENS_PLAIN, SLOT_STATE_KV, 1, 2, 0, 74608, 1,
	  "v3 plain kv streams=2 n_layer=2 v_trans=0" },
	{ "v3-2026-10-iswa", 3, SLOT_TOKENS_PLAIN, SLOT_STATE_KV, 2, 2, 0, 123108, 0,
	  "v3 plain kv+kv streams=2 n_layer=1" },
	{ "v3-2026-10-recurrent", 3, SLOT_TOKENS_PLAIN, SLOT_STATE_RECURRENT, 1, 1, 0, 20632, 0,
	  "v3 plain recurrent n_layer=2 s_trans=0" },
	{ "v4-ik", 4, SLOT_TOKENS_PLAIN, SLOT_STATE_KV_2025, 1, 1, 0, 73512, 1,
	  "v4 plain ik streams=1 n_layer=2 v_trans=0 k=f16 64B/row v=f16 64B/row" },
};
#define N_FOLDERS (sizeof(folders) / sizeof(folders[0]))

/* The token words of a file, read here without the parser: the tokens the
 * parser hands back must be exactly these (the packed form's tokens are the
 * words after its count). */
static int32_t *header_tokens(const uint8_t *b, uint32_t *n)
{
	uint32_t words = (uint32_t)b[8] | (uint32_t)b[9] << 8 | (uint32_t)b[10] << 16 |
			 (uint32_t)b[11] << 24, at = 0, i;
	int32_t *w = malloc(4 * (size_t)words + 4);

	CHECK(w);
	memcpy(w, b + 12, 4 * (size_t)words);
	*n = words;
	if (words >= 3 && w[0] == -1) {
		at = 3;
		*n = (uint32_t)w[2];
	}
	for (i = 0; i < *n; i++)
		w[i] = w[at + i];
	return w;
}

static void test_fixtures(void)
{
	static const char *const files[] = { "chat-a-turn1.bin", "chat-a-turn2.bin",
					     "chat-b-turn1.bin" };
	static const uint32_t n_tok[] = { 274, 334, 268 };
	struct slot_info info[N_FOLDERS][3], e[N_FOLDERS];
	int32_t *tok[N_FOLDERS][3], *te = NULL, *micro = NULL;
	char err[256], desc[200];
	size_t d, f, g;
	int fd;

	for (d = 0; d < N_FOLDERS; d++) {
		const struct folder *fo = &folders[d];

		for (f = 0; f < 3; f++) {
			struct slot_info *in = &info[d][f];
			uint32_t nh;
			size_t len;
			uint8_t *raw = load(fo->dir, files[f], &len);
			int32_t *ht = header_tokens(raw, &nh);

			parse_fixture(fo->dir, files[f], in, &tok[d][f], 0);
			CHECK_EQ_INT(in->version, fo->version);
			CHECK_EQ_INT(in->token_form, fo->form);
			CHECK_EQ_INT(in->state_kind, fo->kind);
			CHECK_EQ_INT(in->n_sections, fo->n_sections);
			CHECK_EQ_INT(in->sec[0].n_stream, fo->n_stream);
			CHECK_EQ_INT(in->v_trans, fo->v_trans);
			CHECK_EQ_INT(in->n_tokens, n_tok[f]);
			CHECK_EQ_INT(in->n_tokens_all, n_tok[f]);
			CHECK_EQ_INT(in->n_media, 0);
			CHECK_EQ_INT(in->n_words, n_tok[f] + (fo->form == SLOT_TOKENS_PACKED ? 4 : 0));
			CHECK_EQ_INT(in->state_offset, 12 + 4 * (uint64_t)in->n_words);
			CHECK_EQ_INT(in->has_layout, 1);
			/* Exactly the tokens of the file's header. */
			CHECK_EQ_INT(nh, in->n_tokens);
			CHECK(memcmp(ht, tok[d][f], nh * sizeof(int32_t)) == 0);
			if (f == 0)
				CHECK_EQ_INT(in->file_size, fo->size_a1);
			/* A state's sections hold the tokens' cells (the sliding-window
			 * section only the window); a recurrent state one cell. */
			if (fo->kind == SLOT_STATE_RECURRENT)
				CHECK_EQ_INT(in->n_cells, 1);
			else
				CHECK_EQ_INT(in->n_cells, n_tok[f]);
			if (fo->n_sections == 2)
				CHECK_EQ_INT(in->sec[1].n_cells, 128);
			/* Same configuration, any conversation: one layout. */
			if (f)
				CHECK(same_layout(in, &info[d][0]));
			free(ht);
			free(raw);
		}
		slot_layout_describe(info[d][0].layout, info[d][0].layout_len, desc, sizeof(desc));
		if (strncmp(desc, fo->describe, strlen(fo->describe)) != 0)
			fprintf(stderr, "%s: \"%s\"\n", fo->dir, desc);
		CHECK(strncmp(desc, fo->describe, strlen(fo->describe)) == 0);

		/* BOS first; chat B shares exactly 225 tokens with chat A; turn 2
		 * extends turn 1 where the model repeats itself (micro). */
		CHECK_EQ_INT(tok[d][0][0], 1);
		CHECK_EQ_INT(tok[d][0][1], 529);
		CHECK(memcmp(tok[d][2], tok[d][0], 225 * sizeof(int32_t)) == 0);
		CHECK(tok[d][2][225] != tok[d][0][225]);
		CHECK(memcmp(tok[d][1], tok[d][0], 259 * sizeof(int32_t)) == 0);
		CHECK_EQ_INT(memcmp(tok[d][1], tok[d][0], 274 * sizeof(int32_t)) == 0,
			     fo->same_tokens);
		if (fo->same_tokens) {
			if (!micro)
				micro = tok[d][0];
			CHECK(memcmp(tok[d][0], micro, 274 * sizeof(int32_t)) == 0);
		}

		/* empty.bin: refused as empty, but its shape is reported. */
		parse_fixture(fo->dir, "empty.bin", &e[d], &te, KVTIER_E_INVALID);
		CHECK(te == NULL);
		CHECK_EQ_INT(e[d].n_tokens, 0);
		CHECK_EQ_INT(e[d].version, fo->version);
		CHECK_EQ_INT(e[d].token_form, fo->form);
		CHECK_EQ_INT(e[d].n_words, fo->form == SLOT_TOKENS_PACKED ? 4 : 0);
		CHECK_EQ_INT(e[d].n_sections, fo->n_sections);
		CHECK_EQ_INT(e[d].sec[0].n_stream, fo->n_stream);
		CHECK_EQ_INT(e[d].n_cells, 0);
	}
	{
		struct slot_info in;
		uint8_t *buf;
		size_t len;

		buf = load("v2", "empty.bin", &len);
		CHECK_EQ_INT(len, 72);
		CHECK_EQ_INT(parse_mem(buf, len, &in, &te, err, sizeof(err)), KVTIER_E_INVALID);
		CHECK(strncmp(err, "empty slot file (0 tokens)", 26) == 0);
		CHECK(strstr(err, "llama-server crashes"));
		free(buf);
		buf = load("v2-2026-packed", "empty.bin", &len);
		CHECK_EQ_INT(len, 40);
		CHECK_EQ_INT(parse_mem(buf, len, &in, &te, err, sizeof(err)), KVTIER_E_INVALID);
		CHECK(strncmp(err, "empty slot file (0 tokens)", 26) == 0);
		free(buf);
	}

	/* Layouts a server cannot load into each other differ; the ones it can
	 * share a signature. Pairs of folders: */
	for (d = 0; d < N_FOLDERS; d++)
		for (g = d + 1; g < N_FOLDERS; g++) {
			int same = !strcmp(folders[d].dir, "v2-2026-iswa") &&
				   !strcmp(folders[g].dir, "v2-2026-iswa-swafull");
			if (same_layout(&info[d][0], &info[g][0]) != same)
				fprintf(stderr, "%s vs %s\n", folders[d].dir, folders[g].dir);
			CHECK_EQ_INT(same_layout(&info[d][0], &info[g][0]), same);
		}
	/* The early 2025 layout keeps kvtier 0.2's signature (namespaces then). */
	CHECK_EQ_INT(info[0][0].layout_len, 34);
	CHECK_EQ_INT(info[0][0].layout[0], 1);
	slot_layout_describe(info[0][0].layout, 3, desc, sizeof(desc));
	CHECK(strcmp(desc, "unknown layout (3 bytes)") == 0);
	slot_layout_describe(info[0][0].layout, info[0][0].layout_len, desc, 8);
	CHECK(strcmp(desc, "n_layer") == 0);

	/* tokens_out may be NULL. */
	{
		struct slot_info in;
		uint8_t *buf;
		size_t len;

		buf = load("v2-2026-packed", "chat-a-turn1.bin", &len);
		CHECK_EQ_INT(parse_mem(buf, len, &in, NULL, err, sizeof(err)), 0);
		CHECK_EQ_INT(in.n_tokens, 274);
		free(buf);
	}

	/* Not a regular file. */
	fd = open("/dev/null", O_RDONLY);
	CHECK(fd >= 0);
	{
		struct slot_info in;
		int32_t *t = (int32_t *)&fd; /* must come back NULL */

		CHECK_EQ_INT(slot_parse_fd(fd, &in, &t, err, sizeof(err)), KVTIER_E_INVALID);
		CHECK(t == NULL);
		CHECK(strstr(err, "not a regular file"));
	}
	close(fd);
	CHECK(slot_parse_fd(-1, &info[0][0], NULL, err, sizeof(err)) == -EBADF);
	CHECK(strncmp(err, "read error", 10) == 0);

	for (d = 0; d < N_FOLDERS; d++)
		for (f = 0; f < 3; f++)
			free(tok[d][f]);
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

static void expect_opaque(const uint8_t *p, size_t len, uint32_t n_tokens)
{
	struct slot_info info;
	int32_t *t = NULL;
	char err[256], desc[64];
	int rc = parse_mem(p, len, &info, &t, err, sizeof(err));

	if (rc != 0 || info.state_kind != SLOT_STATE_OPAQUE)
		fprintf(stderr, "len %zu: rc %d (%s), kind %u, expected an opaque state\n", len, rc,
			err, info.state_kind);
	CHECK_EQ_INT(rc, 0);
	CHECK_EQ_INT(info.state_kind, SLOT_STATE_OPAQUE);
	CHECK_EQ_INT(info.n_tokens, n_tokens);
	CHECK_EQ_INT(info.n_sections, 0);
	CHECK(slot_layout_is_opaque(info.layout, info.layout_len));
	slot_layout_describe(info.layout, info.layout_len, desc, sizeof(desc));
	CHECK(strstr(desc, " opaque"));
	free(t);
}

/* Every proper prefix of a fixture is refused as truncated, except a cut at
 * a section boundary, which reads as another, shorter layout (or, 1-3 bytes
 * later, as an opaque one): its signature then differs from the file's, and
 * the namespace's recorded layout refuses it (and the size the server
 * reported, before that). `step` > 1 samples
 * the rows, every byte of the metadata is cut. */
static void check_prefixes(const char *dir, size_t step, int max_boundaries)
{
	struct slot_info full, info;
	int32_t *t = NULL;
	char err[256];
	size_t len, cut;
	int boundaries = 0, rc;
	uint8_t *buf = load(dir, "chat-a-turn1.bin", &len);

	CHECK_EQ_INT(parse_mem(buf, len, &full, &t, err, sizeof(err)), 0);
	free(t);
	t = NULL;
	for (cut = 0; cut < len; cut++) {
		if (step > 1 && cut > full.state_offset + 4096 && cut + 64 < len && cut % step)
			continue;
		rc = parse_mem(buf, cut, &info, &t, err, sizeof(err));
		if (rc == 0) {
			/* a whole section, or a whole section and 1-3 bytes */
			CHECK(!same_layout(&info, &full));
			boundaries++;
			free(t);
			t = NULL;
			continue;
		}
		if (rc != KVTIER_E_INVALID || strncmp(err, "truncated", 9) != 0)
			fprintf(stderr, "%s cut at %zu: rc %d (%s)\n", dir, cut, rc, err);
		CHECK_EQ_INT(rc, KVTIER_E_INVALID);
		CHECK(strncmp(err, "truncated", 9) == 0);
		CHECK(t == NULL);
	}
	CHECK(boundaries <= max_boundaries);
	free(buf);
}

static void test_mutations(void)
{
	struct slot_info info;
	int32_t *t = NULL;
	uint8_t *buf, *big, hdr[12];
	char err[256];
	size_t len;

	check_prefixes("v2", 1, 0);
	check_prefixes("v2-2026-recurrent", 1, 0);
	check_prefixes("v2-2026", 13, 0);
	check_prefixes("v2-2026-kvu", 13, 0);
	check_prefixes("v2-2026-packed", 13, 0);
	check_prefixes("v2-2026-iswa", 1, 4); /* the base section alone, +1..3 bytes */
	check_prefixes("v3-2026-10", 13, 0);
	check_prefixes("v3-2026-10-recurrent", 1, 0);
	check_prefixes("v4-ik", 13, 0);

	buf = load("v2", "chat-a-turn1.bin", &len);
	CHECK_EQ_INT(len, 73504);
	/* The named ones, with the part that is missing. */
	expect_refused(buf, 0, "truncated: file is 0 bytes, a slot file header needs 12");
	expect_refused(buf, 4, "truncated: file is 4 bytes");
	expect_refused(buf, 11, "truncated: file is 11 bytes");
	expect_refused(buf, 12, "truncated: file is 12 bytes, its 274 tokens need 1108");
	expect_refused(buf, 100, "truncated: file is 100 bytes, its 274 tokens need 1108");
	expect_refused(buf, 12 + 4 * 274, "truncated: the file ends after its tokens");
	expect_refused(buf, 12 + 4 * 274 + 4 + 8 * 100, "truncated: flat layout: the cell table");
	expect_refused(buf, 73503, "truncated: flat layout: layer 1 V header ends at 73504");

	/* Bytes over: no known layout, stored opaque (a future layout may
	 * append fields; the server's reported size guards against junk). */
	big = malloc(len + 64);
	CHECK(big);
	memcpy(big, buf, len);
	memset(big + len, 0, 64);
	expect_opaque(big, len + 1, 274);
	expect_opaque(big, len + 64, 274);

	/* Bad magic, at any length that holds it. */
	memcpy(big, buf, len);
	big[0] ^= 0x20;
	expect_refused(big, len, "bad magic 0x67677351");
	expect_refused(big, 4, "bad magic");
	memcpy(big, "GGUF", 4);
	expect_refused(big, len, "bad magic");

	/* Versions other than 2, 3 and 4. */
	memcpy(big, buf, len);
	put32(big + 4, 1);
	expect_refused(big, len, "unsupported version 1");
	expect_refused(big, 8, "unsupported version 1");
	put32(big + 4, 5);
	expect_refused(big, len, "unsupported version 5");
	put32(big + 4, 0);
	expect_refused(big, len, "unsupported version 0");
	/* Version 3 of llama.cpp never wrote the early 2025 KV layout; ik's
	 * version 3 did, with a qnext_state word after it: here it is missing. */
	put32(big + 4, 3);
	expect_refused(big, len, "truncated: ik layout: qnext_state ends at 73508");
	memset(big + len, 0, 4);
	CHECK_EQ_INT(parse_mem(big, len + 4, &info, &t, err, sizeof(err)), 0);
	CHECK_EQ_INT(info.state_kind, SLOT_STATE_KV_2025);
	CHECK(info.layout[5] & 0x08); /* ik's layout */
	free(t);
	t = NULL;

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
	CHECK_EQ_INT(slot_check_header(hdr, 12, &info, err, sizeof(err)), KVTIER_E_INVALID);
	CHECK(strncmp(err, "truncated: file is 12 bytes", 27) == 0);
	put32(hdr + 8, 0);
	CHECK_EQ_INT(slot_check_header(hdr, 100, &info, err, sizeof(err)), KVTIER_E_INVALID);
	CHECK(strncmp(err, "empty slot file (0 tokens)", 26) == 0);
	put32(hdr + 8, 5);
	CHECK_EQ_INT(slot_check_header(hdr, 100, &info, err, sizeof(err)), 0);
	CHECK_EQ_INT(info.version, 4);
	CHECK_EQ_INT(info.n_words, 5);
	CHECK_EQ_INT(info.state_offset, 32);

	/* Negative tokens other than -1 (a media position) do not exist. */
	memcpy(big, buf, len);
	put32(big + 12 + 4 * 10, (uint32_t)-2);
	expect_refused(big, len, "malformed token payload: token 10 is -2");
	/* A -1 in a plain list: a media position; the text before it is kept. */
	put32(big + 12 + 4 * 10, (uint32_t)-1);
	CHECK_EQ_INT(parse_mem(big, len, &info, &t, err, sizeof(err)), 0);
	CHECK_EQ_INT(info.n_tokens, 10);
	CHECK_EQ_INT(info.n_tokens_all, 274);
	CHECK_EQ_INT(info.n_media, 1);
	CHECK_EQ_INT(info.state_kind, SLOT_STATE_KV_2025);
	free(t);
	t = NULL;

	/* ik's version 4 and llama.cpp's layouts under each other's numbers. */
	{
		uint8_t *v4;
		size_t v4len;

		v4 = load("v4-ik", "chat-a-turn1.bin", &v4len);
		put32(v4 + 4, 2); /* ik's 8 extra bytes: no llama.cpp layout */
		expect_opaque(v4, v4len, 274);
		put32(v4 + 4, 4);
		expect_refused(v4, 12 + 4 * 274, "truncated: the file ends after its tokens");
		expect_refused(v4, 12 + 4 * 274 - 1, "truncated: file is 1107 bytes");
		free(v4);

		memcpy(big, buf, len); /* an early 2025 file under version 4: ik's */
		put32(big + 4, 4);     /* layout short of its 8 last bytes */
		expect_refused(big, len, "truncated: ik layout: qnext_state ends at 73508");
		memset(big + len, 0, 8);
		CHECK_EQ_INT(parse_mem(big, len + 8, &info, &t, err, sizeof(err)), 0);
		CHECK_EQ_INT(info.state_kind, SLOT_STATE_KV_2025);
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
		EMIT32((int32_t)((i * 7919u) % 32000));
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
			CHECK_EQ_INT(t[i], (int32_t)((i * 7919u) % 32000));
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
		expect_opaque(bb, blen, 274);
		put32(bb + 12 + 4 * 274, SLOT_MAX_TOKENS + 1);
		expect_opaque(bb, blen, 274);
		free(bb);
	}
	{
		size_t blen;
		uint8_t *bb = synth_build(&base, &blen);
		size_t vt = 12 + 4 * 274 + 4 + 8 * 274;

		put32(bb + vt, 2); /* v_trans */
		expect_opaque(bb, blen, 274);
		put32(bb + vt, 1);
		put32(bb + vt + 4, 0); /* n_layer */
		expect_opaque(bb, blen, 274);
		put32(bb + vt + 4, SLOT_MAX_LAYERS + 1);
		expect_opaque(bb, blen, 274);
		put32(bb + vt + 4, 2);
		put32(bb + vt + 8, 64); /* K type */
		expect_opaque(bb, blen, 274);
		put32(bb + vt + 8, 1);
		put32(bb + vt + 12, 0); /* K row bytes */
		expect_opaque(bb, blen, 274);
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
		put32(bb + k0 + 8, 0x40000000u); /* k_row_bytes 2^62: no row is that long */
		expect_opaque(bb, blen, 2);
		put32(bb + k0 + 4, 0x40000000u); /* 1 GiB x 4 cells: far past the end */
		put32(bb + k0 + 8, 0);
		expect_refused(bb, blen, "truncated: flat layout: layer 0 K header ends at");
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

#define SLOT_IK_SWAC_TEST 0x53574143u /* 'SWAC' */

/* A growing buffer for the layouts of today's llama.cpp. */
struct gb {
	uint8_t *b;
	size_t n, cap;
};

static void gb_put(struct gb *g, const void *p, size_t n)
{
	if (g->n + n > g->cap) {
		g->cap = (g->n + n) * 2 + 4096;
		g->b = realloc(g->b, g->cap);
		CHECK(g->b);
	}
	if (p)
		memcpy(g->b + g->n, p, n);
	else
		memset(g->b + g->n, 0, n);
	g->n += n;
}

static void gb32(struct gb *g, uint32_t v)
{
	uint8_t b[4];

	put32(b, v);
	gb_put(g, b, 4);
}

static void gb64(struct gb *g, uint64_t v)
{
	gb32(g, (uint32_t)v);
	gb32(g, (uint32_t)(v >> 32));
}

static void gb_header(struct gb *g, uint32_t version, uint32_t n_tokens)
{
	gb32(g, SLOT_MAGIC);
	gb32(g, version);
	gb32(g, n_tokens);
	for (uint32_t i = 0; i < n_tokens; i++)
		gb32(g, 100 + i);
}

/* One KV stream as llama_kv_cache::state_write writes it. */
static void gb_kv_stream(struct gb *g, uint32_t n_cells, int ext, int vless, uint32_t n_layer,
			 uint32_t v_trans, uint64_t k_row)
{
	gb32(g, n_cells);
	if (!n_cells)
		return;
	for (uint32_t i = 0; i < n_cells; i++) {
		gb32(g, i);
		gb32(g, 1);
		if (ext)
			gb_put(g, NULL, 8);
		gb32(g, 0);
	}
	gb32(g, v_trans);
	gb32(g, n_layer);
	for (uint32_t l = 0; l < n_layer; l++) {
		gb32(g, 1);
		gb64(g, k_row);
		gb_put(g, NULL, n_cells * k_row);
	}
	for (uint32_t l = 0; !vless && l < n_layer; l++) {
		gb32(g, 1);
		if (v_trans) {
			gb32(g, 2);
			gb32(g, 32);
			gb_put(g, NULL, n_cells * 64);
		} else {
			gb64(g, 64);
			gb_put(g, NULL, n_cells * 64);
		}
	}
}

/* A recurrent section: n_rec of n_layer layers hold R and S rows. */
static void gb_recurrent(struct gb *g, uint32_t pos, uint32_t n_layer, uint32_t n_rec)
{
	gb32(g, 1);
	gb32(g, pos);
	gb32(g, 0);
	gb32(g, 0);
	gb32(g, n_layer);
	for (uint32_t l = 0; l < n_rec; l++) {
		gb32(g, 0);
		gb64(g, 96);
		gb_put(g, NULL, 96);
	}
	for (uint32_t l = 0; l < n_rec; l++) {
		gb32(g, 0);
		gb64(g, 512);
		gb_put(g, NULL, 512);
	}
}

static void expect_kind(struct gb *g, uint32_t kind, uint32_t n_sections, struct slot_info *out)
{
	int32_t *t = NULL;
	char err[256];
	int rc = parse_mem(g->b, g->n, out, &t, err, sizeof(err));

	if (rc || out->state_kind != kind || out->n_sections != n_sections)
		fprintf(stderr, "rc %d (%s) kind %u sections %u, expected kind %u sections %u\n",
			rc, err, out->state_kind, out->n_sections, kind, n_sections);
	CHECK_EQ_INT(rc, 0);
	CHECK_EQ_INT(out->state_kind, kind);
	CHECK_EQ_INT(out->n_sections, n_sections);
	CHECK(t && t[0] == 100);
	free(t);
	g->n = 0;
}

/* Layouts the fixtures do not cover: M-RoPE cells, V-less caches, hybrid
 * models with attention and recurrent layers, several streams with cells. */
static void test_layouts(void)
{
	struct slot_info a, b, c;
	struct gb g = { NULL, 0, 0 };
	char desc[200];

	gb_header(&g, 2, 20);
	gb32(&g, 1);
	gb_kv_stream(&g, 20, 0, 0, 3, 0, 64);
	expect_kind(&g, SLOT_STATE_KV, 1, &a);
	CHECK(!a.sec[0].cell_ext && !a.sec[0].v_less);

	gb_header(&g, 2, 20); /* M-RoPE: 8 more bytes per cell */
	gb32(&g, 1);
	gb_kv_stream(&g, 20, 1, 0, 3, 0, 64);
	expect_kind(&g, SLOT_STATE_KV, 1, &b);
	CHECK(b.sec[0].cell_ext);
	CHECK(!same_layout(&a, &b));
	slot_layout_describe(b.layout, b.layout_len, desc, sizeof(desc));
	CHECK(strstr(desc, " mrope"));

	gb_header(&g, 3, 20); /* V-less (MLA) */
	gb32(&g, 1);
	gb_kv_stream(&g, 20, 0, 1, 3, 0, 64);
	expect_kind(&g, SLOT_STATE_KV, 1, &c);
	CHECK(c.sec[0].v_less);
	CHECK_EQ_INT(c.sec[0].n_v, 0);
	slot_layout_describe(c.layout, c.layout_len, desc, sizeof(desc));
	CHECK(strstr(desc, "v=none"));

	gb_header(&g, 2, 20); /* both */
	gb32(&g, 1);
	gb_kv_stream(&g, 20, 1, 1, 2, 0, 64);
	expect_kind(&g, SLOT_STATE_KV, 1, &c);
	CHECK(c.sec[0].cell_ext && c.sec[0].v_less);

	gb_header(&g, 2, 30); /* two streams holding cells (a whole-context save) */
	gb32(&g, 2);
	gb_kv_stream(&g, 10, 0, 0, 3, 0, 64);
	gb_kv_stream(&g, 20, 0, 0, 3, 0, 64);
	expect_kind(&g, SLOT_STATE_KV, 1, &c);
	CHECK_EQ_INT(c.sec[0].n_cells, 30);
	CHECK_EQ_INT(c.sec[0].n_stream, 2);

	gb_header(&g, 2, 30); /* streams of different shapes: still walked, marked mixed */
	gb32(&g, 2);
	gb_kv_stream(&g, 10, 0, 0, 3, 0, 64);
	gb_kv_stream(&g, 20, 0, 0, 3, 0, 128);
	expect_kind(&g, SLOT_STATE_KV, 1, &c);
	slot_layout_describe(c.layout, c.layout_len, desc, sizeof(desc));
	CHECK(strstr(desc, " mixed"));

	gb_header(&g, 2, 40); /* hybrid: attention layers, then 5 of 8 layers recurrent */
	gb32(&g, 1);
	gb_kv_stream(&g, 40, 0, 0, 3, 0, 64);
	gb_recurrent(&g, 39, 8, 5);
	expect_kind(&g, SLOT_STATE_HYBRID, 2, &a);
	CHECK_EQ_INT(a.sec[1].kind, SLOT_SEC_RECURRENT);
	CHECK_EQ_INT(a.sec[1].n_layer, 8);
	CHECK_EQ_INT(a.sec[1].n_k, 5);
	slot_layout_describe(a.layout, a.layout_len, desc, sizeof(desc));
	CHECK(strncmp(desc, "v2 plain kv+recurrent streams=1 n_layer=3", 41) == 0);

	gb_header(&g, 2, 40); /* the same with 6 recurrent layers: another layout */
	gb32(&g, 1);
	gb_kv_stream(&g, 40, 0, 0, 3, 0, 64);
	gb_recurrent(&g, 39, 8, 6);
	expect_kind(&g, SLOT_STATE_HYBRID, 2, &b);
	CHECK_EQ_INT(b.sec[1].n_k, 6);
	CHECK(!same_layout(&a, &b));

	gb_header(&g, 3, 40); /* hybrid with a sliding window: kv, kv, recurrent */
	gb32(&g, 1);
	gb_kv_stream(&g, 40, 0, 0, 1, 0, 64);
	gb32(&g, 1);
	gb_kv_stream(&g, 16, 0, 0, 2, 0, 64);
	gb_recurrent(&g, 39, 6, 3);
	expect_kind(&g, SLOT_STATE_HYBRID, 3, &c);
	slot_layout_describe(c.layout, c.layout_len, desc, sizeof(desc));
	CHECK(strncmp(desc, "v3 plain kv+kv+recurrent", 24) == 0);

	/* llama.cpp v3 writes 12 bytes of cell extension (x, y, tok). */
	gb_header(&g, 3, 20);
	gb32(&g, 1);
	gb32(&g, 20);
	for (uint32_t i = 0; i < 20; i++) {
		gb32(&g, i);
		gb32(&g, 1);
		gb_put(&g, NULL, 12);
		gb32(&g, 0);
	}
	gb32(&g, 0);
	gb32(&g, 2);
	for (int l = 0; l < 4; l++) {
		gb32(&g, 1);
		gb64(&g, 64);
		gb_put(&g, NULL, 20 * 64);
	}
	expect_kind(&g, SLOT_STATE_KV, 1, &c);
	CHECK_EQ_INT(c.sec[0].cell_ext, 12);

	/* ik_llama.cpp version 4: no V (MLA), an absent layer, a qnext block,
	 * then the DSA word. */
	gb_header(&g, 4, 20);
	gb32(&g, SLOT_IK_SWAC_TEST);
	gb_put(&g, NULL, 16);
	gb32(&g, 20);
	for (uint32_t i = 0; i < 20; i++) {
		gb32(&g, i);
		gb32(&g, 0);
	}
	gb32(&g, 2); /* v_state: no V */
	gb32(&g, 3);
	gb32(&g, 1);
	gb64(&g, 96);
	gb_put(&g, NULL, 20 * 96);
	gb32(&g, 0xffffffffu); /* absent layer */
	gb64(&g, 0);
	gb32(&g, 1);
	gb64(&g, 96);
	gb_put(&g, NULL, 20 * 96);
	gb32(&g, 1); /* qnext_state: per layer type, row, rows */
	for (int l = 0; l < 3; l++) {
		gb32(&g, l == 1 ? 0xffffffffu : 0);
		gb64(&g, l == 1 ? 0 : 256);
		gb32(&g, l == 1 ? 0 : 2);
		if (l != 1)
			gb_put(&g, NULL, 512);
	}
	{
		size_t dsa_at = g.n;
		uint8_t *copy;
		size_t n;

		gb32(&g, 0); /* dsa_indexer_state */
		n = g.n;
		copy = malloc(n);
		CHECK(copy);
		memcpy(copy, g.b, n);
		expect_kind(&g, SLOT_STATE_KV_2025, 1, &a);
		CHECK(a.sec[0].v_less);
		CHECK_EQ_INT(a.v_trans, 2);
		slot_layout_describe(a.layout, a.layout_len, desc, sizeof(desc));
		CHECK(strncmp(desc, "v4 plain ik streams=1 n_layer=3", 31) == 0);
		/* A DSA indexer block is not walked: opaque. */
		put32(copy + dsa_at, 1);
		gb_put(&g, copy, n);
		gb_put(&g, NULL, 64);
		expect_kind(&g, SLOT_STATE_OPAQUE, 0, &b);
		/* Without its last word: truncated. */
		gb_put(&g, copy, n - 4);
		{
			int32_t *t = NULL;
			char err[256];
			CHECK_EQ_INT(parse_mem(g.b, g.n, &b, &t, err, sizeof(err)), KVTIER_E_INVALID);
			CHECK(strstr(err, "dsa_indexer_state"));
		}
		g.n = 0;
		free(copy);
	}

	/* An unknown section after a known one: opaque, not refused. */
	gb_header(&g, 2, 20);
	gb32(&g, 1);
	gb_kv_stream(&g, 20, 0, 0, 3, 0, 64);
	gb32(&g, 0xfeedu);
	gb64(&g, 7);
	expect_kind(&g, SLOT_STATE_OPAQUE, 0, &c);
	free(g.b);
}

/* The packed token payload, written as server_tokens::serialize does:
 * -1, 1, n, tokens (-1 at media positions), key count, keys, per key a byte
 * vector (u32 size, bytes), zero padding to 4 bytes. */
static void packed_build(struct gb *g, const int32_t *tok, uint32_t n, const uint32_t *keys,
			 uint32_t n_keys, const uint32_t *chunk_len, int pad_byte)
{
	struct gb w = { NULL, 0, 0 };
	size_t pad;

	gb32(&w, (uint32_t)-1);
	gb32(&w, 1);
	gb32(&w, n);
	for (uint32_t i = 0; i < n; i++)
		gb32(&w, (uint32_t)tok[i]);
	gb32(&w, n_keys);
	for (uint32_t i = 0; i < n_keys; i++)
		gb32(&w, keys[i]);
	for (uint32_t i = 0; i < n_keys; i++) {
		gb32(&w, chunk_len[i]);
		gb_put(&w, NULL, chunk_len[i]);
		memset(w.b + w.n - chunk_len[i], 0xa5, chunk_len[i]);
	}
	pad = (4 - w.n % 4) % 4;
	gb_put(&w, NULL, pad);
	if (pad && pad_byte)
		w.b[w.n - 1] = (uint8_t)pad_byte;
	gb32(g, SLOT_MAGIC);
	gb32(g, 2);
	gb32(g, (uint32_t)(w.n / 4));
	gb_put(g, w.b, w.n);
	gb32(g, 1); /* one stream */
	gb_kv_stream(g, n, 0, 0, 2, 0, 64);
	free(w.b);
}

static void test_packed(void)
{
	int32_t tok[12] = { 1, 529, 29989, 326, -1, -1, -1, 77, 78, -1, -1, 80 };
	uint32_t keys[2] = { 4, 9 }, lens[2] = { 10, 7 };
	struct slot_info info;
	struct gb g = { NULL, 0, 0 };
	int32_t *t = NULL;
	char err[256];

	/* Text, an image, text, an image: the text before the first is indexed. */
	packed_build(&g, tok, 12, keys, 2, lens, 0);
	CHECK_EQ_INT(parse_mem(g.b, g.n, &info, &t, err, sizeof(err)), 0);
	CHECK_EQ_INT(info.token_form, SLOT_TOKENS_PACKED);
	CHECK_EQ_INT(info.n_tokens_all, 12);
	CHECK_EQ_INT(info.n_tokens, 4);
	CHECK_EQ_INT(info.n_media, 2);
	CHECK_EQ_INT(info.n_words, 3 + 12 + 1 + 2 + (4 + 10 + 4 + 7 + 3) / 4);
	CHECK_EQ_INT(info.state_kind, SLOT_STATE_KV);
	CHECK(memcmp(t, tok, 4 * sizeof(int32_t)) == 0);
	free(t);
	t = NULL;
	g.n = 0;

	/* Text only, no media: every token. */
	packed_build(&g, tok, 4, NULL, 0, NULL, 0);
	CHECK_EQ_INT(parse_mem(g.b, g.n, &info, &t, err, sizeof(err)), 0);
	CHECK_EQ_INT(info.n_tokens, 4);
	CHECK_EQ_INT(info.n_words, 3 + 4 + 1);
	free(t);
	t = NULL;
	g.n = 0;

	/* An image first: nothing to index. */
	{
		int32_t img[4] = { -1, -1, 5, 6 };
		uint32_t k0 = 0, l0 = 4;

		packed_build(&g, img, 4, &k0, 1, &l0, 0);
		expect_refused(g.b, g.n, "empty slot file (0 tokens before the first media chunk)");
		g.n = 0;
	}
	/* What does not parse is refused. */
	packed_build(&g, tok, 12, keys, 2, lens, 0x11); /* padding not zero */
	expect_refused(g.b, g.n, "malformed token payload: padding is not zero");
	g.n = 0;
	{
		uint32_t bad[2] = { 5, 9 }; /* media positions before the first chunk */
		packed_build(&g, tok, 12, bad, 2, lens, 0);
		expect_refused(g.b, g.n, "malformed token payload: media position 4 before");
		g.n = 0;
		bad[0] = 3; /* a key on a text token */
		packed_build(&g, tok, 12, bad, 2, lens, 0);
		expect_refused(g.b, g.n, "malformed token payload: media key 3");
		g.n = 0;
	}
	packed_build(&g, tok, 4, NULL, 0, NULL, 0);
	put32(g.b + 16, 2); /* format version */
	expect_refused(g.b, g.n, "malformed token payload: packed form version 2");
	put32(g.b + 16, 1);
	put32(g.b + 20, 5); /* n past the words */
	expect_refused(g.b, g.n, "malformed token payload: 5 tokens in a packed payload of 8");
	put32(g.b + 20, 3); /* n one short: a word left over */
	expect_refused(g.b, g.n, "malformed token payload");
	g.n = 0;
	{
		int32_t neg[4] = { 1, 2, -7, 4 };
		packed_build(&g, neg, 4, NULL, 0, NULL, 0);
		expect_refused(g.b, g.n, "malformed token payload: token 2 is -7");
		g.n = 0;
	}
	free(g.b);
}

int main(void)
{
	test_fixtures();
	test_mutations();
	test_synthetic();
	test_layouts();
	test_packed();
	printf("test_slotfile: ok\n");
	return 0;
}
