/* test_index.c: unit test of daemon/index.c on a fresh temporary directory.
 *
 * Synthetic token arrays stand in for slot files (the counts mirror the
 * fixtures: a 274-token turn, a 334-token next turn, a 268-token chat that
 * shares 225 tokens). Every step asserts on ids, counts, matched tokens and
 * error codes, and index_check must find nothing wrong after each change.
 * A damaged index is made with raw LMDB calls while the index is closed
 * (LMDB forbids opening one environment twice in a process).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <ftw.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <lmdb.h>

#include "check.h"
#include "index.h"
#include "keys.h"
#include "kvtier.h"
#include "slotfile.h"

#define B INDEX_DEFAULT_BLOCK
#define MAXT 1024

struct blob {
	const char *ns;
	int32_t tok[MAXT];
	size_t n;
	struct key chain[MAXT / B];
	struct key id;
};

static int64_t clock_ms = 1000; /* created_ms of the next put: strictly increasing */
static char last_problem[512];

static void blob_make(struct blob *b, const char *ns, const int32_t *tok, size_t n)
{
	struct key h0;

	CHECK(n <= MAXT);
	b->ns = ns;
	memcpy(b->tok, tok, n * sizeof(int32_t));
	b->n = n;
	keys_root(ns, strlen(ns), &h0);
	CHECK_EQ_INT(keys_chain(&h0, tok, n, B, b->chain), n / B);
	keys_blob_id(&h0, b->chain, tok, n, B, &b->id);
}

static int blob_put(struct index *ix, const struct blob *b, const uint8_t *layout,
		    size_t layout_len, unsigned tier, int supersede, struct index_put_result *res,
		    char *err, size_t errlen)
{
	struct blob_meta m;

	memset(&m, 0, sizeof(m));
	m.rec_version = 1;
	m.id = b->id;
	m.n_tokens = (uint32_t)b->n;
	m.version = 2;
	m.tier = tier;
	m.parts = 1;
	m.part_size[PART_MAIN] = 12 + 4 * b->n + 1000;
	m.stored_size = m.part_size[PART_MAIN];
	m.created_ms = m.last_access_ms = clock_ms++;
	err[0] = '\0';
	return index_put(ix, b->ns, layout, layout_len, &m, b->tok, b->chain, supersede, res, err,
			 errlen);
}

static void lookup(struct index *ix, const char *ns, const int32_t *tok, size_t n,
		   struct index_match *m)
{
	struct key h0, chain[MAXT / B];

	CHECK(n <= MAXT);
	keys_root(ns, strlen(ns), &h0);
	CHECK_EQ_INT(keys_chain(&h0, tok, n, B, chain), n / B);
	CHECK_EQ_INT(index_lookup(ix, ns, tok, n, chain, n / B, m), 0);
	/* The lazy chain (exponential then binary search) finds the same. */
	struct index_match lazy;
	CHECK_EQ_INT(index_lookup_tokens(ix, ns, tok, n, &lazy), 0);
	CHECK_EQ_INT(lazy.found, m->found);
	CHECK_EQ_INT(lazy.matched, m->matched);
	CHECK(!m->found || memcmp(lazy.meta.id.b, m->meta.id.b, KEY_LEN) == 0);
}

static int same_id(const struct key *a, const struct key *b)
{
	return memcmp(a->b, b->b, KEY_LEN) == 0;
}

static void report_print(void *ctx, const char *problem)
{
	fprintf(stderr, "index_check: %s\n", problem);
	snprintf(last_problem, sizeof(last_problem), "%s", problem);
}

static void check_clean(struct index *ix)
{
	CHECK_EQ_INT(index_check(ix, report_print, NULL), 0);
}

static int count_cb(void *ctx, const struct blob_meta *m, const char *ns)
{
	(*(size_t *)ctx)++;
	return 0;
}

static size_t count_blobs(struct index *ix, const char *ns)
{
	size_t n = 0;

	CHECK_EQ_INT(index_list(ix, ns, NULL, 0, count_cb, &n, NULL), 0);
	return n;
}

struct page {
	struct key ids[16];
	char ns[16][INDEX_NS_MAX + 1];
	size_t n;
};

static int page_cb(void *ctx, const struct blob_meta *m, const char *ns)
{
	struct page *p = ctx;

	CHECK(p->n < 16);
	p->ids[p->n] = m->id;
	snprintf(p->ns[p->n], sizeof(p->ns[p->n]), "%s", ns);
	p->n++;
	return 0;
}

struct ns_find {
	const char *name;
	struct ns_rec rec;
	int found;
};

static int ns_find_cb(void *ctx, const char *name, const struct ns_rec *r)
{
	struct ns_find *f = ctx;

	if (strcmp(name, f->name) == 0) {
		f->rec = *r;
		f->found = 1;
	}
	return 0;
}

/* A layout signature in the format of slotfile.c: 2 layers of f16, K rows
 * of 64 bytes, V transposed (2 bytes x 32) or not (64 bytes per row). */
static size_t make_layout(uint8_t *l, uint32_t v_trans)
{
	uint64_t k_row = 64, v_row = 64;
	uint32_t f16 = 1, n_layer = 2, el = 2, n_embd = 32;

	memset(l, 0, SLOT_LAYOUT_MAX);
	l[0] = 1;
	memcpy(l + 2, &n_layer, 4);
	memcpy(l + 6, &v_trans, 4);
	memcpy(l + 10, &f16, 4);
	memcpy(l + 14, &k_row, 8);
	memcpy(l + 22, &f16, 4);
	if (v_trans) {
		memcpy(l + 26, &el, 4);
		memcpy(l + 30, &n_embd, 4);
	} else {
		memcpy(l + 26, &v_row, 8);
	}
	return 34;
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	return remove(path);
}

/* Opens the index environment with LMDB directly (the index must be
 * closed) and deletes key `id` from database `db`, or writes a u32 meta. */
static void raw_edit(const char *dir, const char *db, const struct key *id, const char *mkey,
		     uint32_t mval)
{
	char path[4096];
	MDB_env *env;
	MDB_txn *txn;
	MDB_dbi dbi;
	MDB_val k, v;

	snprintf(path, sizeof(path), "%s/index", dir);
	CHECK_EQ_INT(mdb_env_create(&env), 0);
	CHECK_EQ_INT(mdb_env_set_maxdbs(env, 8), 0);
	CHECK_EQ_INT(mdb_env_open(env, path, MDB_NOTLS, 0600), 0);
	CHECK_EQ_INT(mdb_txn_begin(env, NULL, 0, &txn), 0);
	CHECK_EQ_INT(mdb_dbi_open(txn, db, 0, &dbi), 0);
	if (id) {
		k.mv_size = KEY_LEN;
		k.mv_data = (void *)id->b;
		CHECK_EQ_INT(mdb_del(txn, dbi, &k, NULL), 0);
	} else {
		k.mv_size = strlen(mkey);
		k.mv_data = (void *)mkey;
		v.mv_size = sizeof(mval);
		v.mv_data = &mval;
		CHECK_EQ_INT(mdb_put(txn, dbi, &k, &v, 0), 0);
	}
	CHECK_EQ_INT(mdb_txn_commit(txn), 0);
	mdb_env_close(env);
}

/* A prefill refit for index_ns_report_prefill: word i becomes i + 1 if it
 * was 0 (a fresh namespace), counting its calls. */
static void refit_add_index(double pf[8], void *ctx)
{
	for (int i = 0; i < 8; i++) {
		CHECK(pf[i] == 0);
		pf[i] += i + 1;
	}
	(*(int *)ctx)++;
}

/* ---- lookups that jump (index_lookup_tokens and last_key) ---- */

static void raw_blob_v2(const char *dir, const struct key *id);

#define JT 8192 /* tokens of the longest query: 128 blocks */

static uint32_t jseed = 777;

static void fill_random(int32_t *t, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		jseed = jseed * 1103515245u + 12345u;
		t[i] = (int32_t)((jseed >> 8) % 32000);
	}
}

/* Puts tokens[0..n) in namespace ns without supersession. */
static void jput(struct index *ix, const char *ns, const int32_t *tok, size_t n, struct key *id)
{
	static struct key chain[JT / B];
	static struct index_put_result res;
	struct blob_meta m;
	struct key h0;
	char err[256];

	keys_root(ns, strlen(ns), &h0);
	keys_chain(&h0, tok, n, B, chain);
	memset(&m, 0, sizeof(m));
	keys_blob_id(&h0, chain, tok, n, B, &m.id);
	m.n_tokens = (uint32_t)n;
	m.version = 2;
	m.parts = 1;
	m.part_size[PART_MAIN] = m.stored_size = 12 + 4 * n + 1000;
	m.created_ms = m.last_access_ms = clock_ms++;
	CHECK_EQ_INT(index_put(ix, ns, NULL, 0, &m, tok, chain, 0, &res, err, sizeof(err)), 0);
	CHECK(res.stored.flags & BLOB_F_LAST_KEY);
	CHECK(memcmp(res.stored.last_key.b, chain[n / B - 1].b, KEY_LEN) == 0);
	if (id)
		*id = m.id;
}

/* The lazy lookup (galloping, jumps) answers as the one given every key. */
static void jlookup(struct index *ix, const char *ns, const int32_t *tok, size_t n,
		    struct index_match *lazy)
{
	static struct key chain[JT / B];
	struct index_match full;
	struct key h0;

	keys_root(ns, strlen(ns), &h0);
	keys_chain(&h0, tok, n, B, chain);
	CHECK_EQ_INT(index_lookup(ix, ns, tok, n, chain, n / B, &full), 0);
	CHECK_EQ_INT(index_lookup_tokens(ix, ns, tok, n, lazy), 0);
	CHECK_EQ_INT(lazy->found, full.found);
	CHECK_EQ_INT(lazy->matched, full.matched);
	CHECK(!full.found || same_id(&lazy->meta.id, &full.meta.id));
}

static void test_jumps(const char *dir)
{
	static int32_t sys[256], conv[3][JT], q[JT];
	static const size_t turns[3] = {1000, 3000, 6000};
	struct key conv_id[3][3], id;
	struct index *ix = NULL;
	struct index_match m;
	struct blob_meta bm;
	char err[256];

	CHECK_EQ_INT(index_open(dir, 0, 0, 1ull << 30, &ix, err, sizeof(err)), 0);
	/* 40 short chats share a 202-token system prompt (depths 1..3 have more
	 * blobs than a jump looks at); 3 long conversations of 3 turns. */
	fill_random(sys, 202);
	for (int i = 0; i < 40; i++) {
		memcpy(q, sys, 202 * sizeof(int32_t));
		fill_random(q + 202, 100 + (size_t)i * 7);
		jput(ix, "J", q, 302 + (size_t)i * 7, NULL);
	}
	for (int c = 0; c < 3; c++) {
		memcpy(conv[c], sys, 202 * sizeof(int32_t));
		fill_random(conv[c] + 202, JT - 202);
		for (int t = 0; t < 3; t++)
			jput(ix, "J", conv[c], turns[t], &conv_id[c][t]);
	}
	check_clean(ix);

	/* A prompt extending the deepest turn: found, and most of its 93 full
	 * blocks are taken from a blob rather than hashed. */
	memcpy(q, conv[0], 6000 * sizeof(int32_t));
	fill_random(q + 6000, JT - 6000);
	jlookup(ix, "J", q, JT, &m);
	CHECK(m.found && same_id(&m.meta.id, &conv_id[0][2]));
	CHECK_EQ_INT(m.matched, 6000);
	/* Depths 1 and 3 are held by all 43 blobs; at 7 the 6000-token turn
	 * (93 full blocks) gives its key; 94 is hashed to see it absent. */
	CHECK_EQ_INT(m.jumps, 1);
	CHECK_EQ_INT(m.keys_hashed, 8);
	/* Equal to the 3000-token turn and 10 tokens more of its conversation,
	 * then different: the jump is to the 3000-token turn's depth (46), the
	 * 6000-token turn holds 47 (hashed from the jump's key), not 48. */
	memcpy(q, conv[1], JT * sizeof(int32_t));
	q[3010] += 1;
	jlookup(ix, "J", q, JT, &m);
	CHECK(m.found && same_id(&m.meta.id, &conv_id[1][2]));
	CHECK_EQ_INT(m.matched, 3010);
	CHECK_EQ_INT(m.jumps, 1);
	CHECK_EQ_INT(m.keys_hashed, 10);
	/* Diverging inside the deepest turn (token 4500): that turn, 4500. */
	memcpy(q, conv[1], JT * sizeof(int32_t));
	q[4500] += 1;
	jlookup(ix, "J", q, JT, &m);
	CHECK(m.found && same_id(&m.meta.id, &conv_id[1][2]));
	CHECK_EQ_INT(m.matched, 4500);
	/* Exactly a turn; a turn and one token; half a block past a turn. */
	for (size_t extra = 0; extra <= 32; extra += 16) {
		memcpy(q, conv[2], (3000 + extra) * sizeof(int32_t));
		if (extra)
			q[3000 + extra - 1] += 1; /* differs from the 6000-token turn there */
		jlookup(ix, "J", q, 3000 + extra, &m);
		CHECK(m.found);
		CHECK_EQ_INT(m.matched, 3000 + (extra ? extra - 1 : 0));
	}
	/* A turn of exactly 32 blocks (its id is its last key). */
	memcpy(q, conv[2], JT * sizeof(int32_t));
	q[2048] += 1;
	jput(ix, "J", q, 2048, &id);
	q[2100] += 1;
	jlookup(ix, "J", q, JT, &m);
	CHECK(m.found && same_id(&m.meta.id, &id));
	CHECK_EQ_INT(m.matched, 2048);
	CHECK_EQ_INT(m.jumps, 1); /* depths 1, 3, 7 hashed, 32 from its key, 33 hashed */
	CHECK_EQ_INT(m.keys_hashed, 8);
	/* The system prompt and then other tokens: one of the short chats,
	 * which all share exactly the prompt's 202 tokens with this query. */
	memcpy(q, sys, 202 * sizeof(int32_t));
	fill_random(q + 202, JT - 202);
	jlookup(ix, "J", q, JT, &m);
	CHECK(m.found);
	CHECK_EQ_INT(m.matched, 202);
	/* Every query length, on a conversation: the lazy answer is the full one. */
	for (size_t n = 64; n <= JT; n += 61) {
		memcpy(q, conv[0], n * sizeof(int32_t));
		jlookup(ix, "J", q, n, &m);
		CHECK(m.found);
		CHECK_EQ_INT(m.matched, n < 6000 ? n : 6000);
	}
	/* The deepest turn quarantined: the search jumped to its depth, finds it
	 * unusable and goes shallower (keys below the jump hashed afresh). */
	CHECK_EQ_INT(index_get(ix, &conv_id[0][2], &bm, NULL, 0), 0);
	bm.flags |= BLOB_F_QUARANTINED;
	CHECK_EQ_INT(index_update(ix, &bm), 0);
	memcpy(q, conv[0], 6000 * sizeof(int32_t));
	fill_random(q + 6000, JT - 6000);
	jlookup(ix, "J", q, JT, &m);
	CHECK(m.found && same_id(&m.meta.id, &conv_id[0][1]));
	CHECK_EQ_INT(m.matched, 3000);
	CHECK_EQ_INT(m.jumps, 1); /* 8 hashed to reach and pass depth 93, then 92 from the root */
	CHECK_EQ_INT(m.keys_hashed, 100);
	/* A miss, and an unknown namespace. */
	q[0] += 1;
	jlookup(ix, "J", q, JT, &m);
	CHECK_EQ_INT(m.found, 0);
	jlookup(ix, "K", conv[0], JT, &m);
	CHECK_EQ_INT(m.found, 0);
	check_clean(ix);
	index_close(ix);

	/* An index of schema 2: its records (no last_key) read as they are, the
	 * schema moves to 3, and lookups give the same answers (no jump from
	 * the old record). */
	raw_blob_v2(dir, &conv_id[2][2]);
	raw_edit(dir, "meta", NULL, "schema", 2);
	CHECK_EQ_INT(index_open(dir, 0, 0, 1ull << 30, &ix, err, sizeof(err)), 0);
	{
		uint32_t schema = 0;
		size_t len = 0;

		CHECK_EQ_INT(index_meta_get(ix, "schema", &schema, sizeof(schema), &len), 0);
		CHECK_EQ_INT(schema, INDEX_SCHEMA);
	}
	CHECK_EQ_INT(index_get(ix, &conv_id[2][2], &bm, NULL, 0), 0);
	CHECK_EQ_INT(bm.flags & BLOB_F_LAST_KEY, 0);
	check_clean(ix);
	memcpy(q, conv[2], 6000 * sizeof(int32_t));
	fill_random(q + 6000, JT - 6000);
	jlookup(ix, "J", q, JT, &m);
	CHECK(m.found && same_id(&m.meta.id, &conv_id[2][2]));
	CHECK_EQ_INT(m.matched, 6000);
	/* At depth 7 the 3000-token turn gives depth 46; above it only the old
	 * record holds the keys, so they are hashed: 7 + 47..109. */
	CHECK_EQ_INT(m.jumps, 1);
	CHECK_EQ_INT(m.keys_hashed, 70);
	index_close(ix);
}

/* Rewrites the record of blob id as a version 2 record (without last_key),
 * as an older kvtierd wrote it. The index must be closed. */
static void raw_blob_v2(const char *dir, const struct key *id)
{
	char path[4096];
	struct blob_meta m;
	MDB_env *env;
	MDB_txn *txn;
	MDB_dbi dbi;
	MDB_val k = {KEY_LEN, (void *)id->b}, v;

	snprintf(path, sizeof(path), "%s/index", dir);
	CHECK_EQ_INT(mdb_env_create(&env), 0);
	CHECK_EQ_INT(mdb_env_set_maxdbs(env, 8), 0);
	CHECK_EQ_INT(mdb_env_set_mapsize(env, 1ull << 30), 0);
	CHECK_EQ_INT(mdb_env_open(env, path, MDB_NOTLS, 0600), 0);
	CHECK_EQ_INT(mdb_txn_begin(env, NULL, 0, &txn), 0);
	CHECK_EQ_INT(mdb_dbi_open(txn, "blobs", 0, &dbi), 0);
	CHECK_EQ_INT(mdb_get(txn, dbi, &k, &v), 0);
	CHECK_EQ_INT(v.mv_size, sizeof(m));
	memcpy(&m, v.mv_data, sizeof(m));
	m.rec_version = 2;
	m.flags &= ~(uint32_t)BLOB_F_LAST_KEY;
	v.mv_size = BLOB_REC_V2_SIZE;
	v.mv_data = &m;
	CHECK_EQ_INT(mdb_put(txn, dbi, &k, &v, 0), 0);
	CHECK_EQ_INT(mdb_txn_commit(txn), 0);
	mdb_env_close(env);
}

/* The slot file's state kind, token form and media cut are recorded in the
 * blob's flags, and index_put keeps them. */
static void test_slot_flags(const char *dir)
{
	static struct blob f;
	static struct index_put_result res;
	static int32_t T[MAXT];
	struct slot_info si;
	struct blob_meta m;
	struct index *ix = NULL;
	char err[512];

	memset(&si, 0, sizeof(si));
	si.state_kind = SLOT_STATE_KV;
	si.token_form = SLOT_TOKENS_PLAIN;
	si.n_tokens = si.n_tokens_all = 300;
	CHECK_EQ_INT(blob_flags_of_slot(&si), (SLOT_STATE_KV + 1) << BLOB_F_STATE_SHIFT);
	CHECK_EQ_INT(blob_state_kind(blob_flags_of_slot(&si)), SLOT_STATE_KV);
	si.state_kind = SLOT_STATE_OPAQUE;
	si.token_form = SLOT_TOKENS_PACKED;
	si.n_tokens = 100; /* a media position at 100 */
	CHECK_EQ_INT(blob_flags_of_slot(&si), (1u << BLOB_F_STATE_SHIFT) | BLOB_F_OPAQUE |
						      BLOB_F_PACKED | BLOB_F_MEDIA);
	CHECK_EQ_INT(blob_state_kind(blob_flags_of_slot(&si)), SLOT_STATE_OPAQUE);
	si.state_kind = SLOT_STATE_HYBRID;
	CHECK_EQ_INT(blob_state_kind(blob_flags_of_slot(&si)), SLOT_STATE_HYBRID);
	CHECK_EQ_INT(blob_flags_of_slot(&si) & BLOB_F_OPAQUE, 0);
	/* A record written before the state was recorded: unknown. */
	CHECK_EQ_INT(blob_state_kind(0), -1);
	CHECK_EQ_INT(blob_state_kind(BLOB_F_QUARANTINED | BLOB_F_LAST_KEY), -1);

	for (size_t i = 0; i < MAXT; i++)
		T[i] = (int32_t)(i * 7 % 32000);
	CHECK_EQ_INT(index_open(dir, 0, 0, 1ull << 26, &ix, err, sizeof(err)), 0);
	blob_make(&f, "nsF", T, 200);
	memset(&m, 0, sizeof(m));
	m.id = f.id;
	m.n_tokens = 200;
	m.version = 3;
	m.parts = 1;
	m.part_size[PART_MAIN] = m.stored_size = 5000;
	m.flags = blob_flags_of_slot(&si);
	CHECK_EQ_INT(index_put(ix, f.ns, NULL, 0, &m, f.tok, f.chain, 1, &res, err, sizeof(err)),
		     0);
	CHECK_EQ_INT(index_get(ix, &f.id, &m, NULL, 0), 0);
	CHECK_EQ_INT(m.flags & ~(uint32_t)BLOB_F_LAST_KEY, blob_flags_of_slot(&si));
	CHECK_EQ_INT(m.version, 3);
	check_clean(ix);
	index_close(ix);
}

int main(void)
{
	static struct blob a, b, c, d, e, a2, c2, e2, p[5], s1, s2, s3, small;
	static struct index_put_result res;
	static int32_t A[MAXT], tmp[MAXT];
	char dir[] = "/tmp/test_index.XXXXXX", empty[] = "/tmp/test_index_empty.XXXXXX";
	char err[512], d0[160], d1[160];
	uint8_t l0[SLOT_LAYOUT_MAX], l1[SLOT_LAYOUT_MAX];
	size_t l0_len, l1_len;
	struct index *ix = NULL;
	struct index_match m;
	struct blob_meta bm;
	char nsname[INDEX_NS_MAX + 1];
	int32_t *gt = NULL;
	uint32_t gn = 0, seed = 12345;

	CHECK(mkdtemp(dir) != NULL);
	CHECK(mkdtemp(empty) != NULL);
	for (size_t i = 0; i < MAXT; i++) {
		seed = seed * 1103515245u + 12345u;
		A[i] = (int32_t)((seed >> 8) % 32000);
	}
	l0_len = make_layout(l0, 0);
	l1_len = make_layout(l1, 1);

	/* A readonly open of a directory without an index is NOTFOUND. */
	CHECK_EQ_INT(index_open(empty, 0, 1, 0, &ix, err, sizeof(err)), KVTIER_E_NOTFOUND);
	CHECK(ix == NULL);
	CHECK(strstr(err, "no index") != NULL);

	CHECK_EQ_INT(index_open(dir, 0, 0, 1ull << 30, &ix, err, sizeof(err)), 0);
	CHECK_EQ_INT(index_block_size(ix), B);
	check_clean(ix);

	/* Suffixes. */
	CHECK_EQ_INT(blob_part_from_suffix(""), PART_MAIN);
	CHECK_EQ_INT(blob_part_from_suffix(".tokens.json"), PART_TOKENS_JSON);
	CHECK_EQ_INT(blob_part_from_suffix(".checkpoints"), PART_CHECKPOINTS);
	CHECK_EQ_INT(blob_part_from_suffix(".tmp"), -1);
	CHECK_EQ_INT(strcmp(blob_part_suffix[PART_TOKENS_JSON], ".tokens.json"), 0);

	/* a: 274 tokens; lookup of itself is a full match. */
	blob_make(&a, "nsA", A, 274);
	CHECK_EQ_INT(blob_put(ix, &a, NULL, 0, 0, 1, &res, err, sizeof(err)), 0);
	CHECK_EQ_INT(res.deduplicated, 0);
	CHECK_EQ_INT(res.n_superseded, 0);
	CHECK(same_id(&res.stored.id, &a.id));
	CHECK(res.stored.ns_id >= 1);
	check_clean(ix);
	lookup(ix, "nsA", a.tok, a.n, &m);
	CHECK_EQ_INT(m.found, 1);
	CHECK(same_id(&m.meta.id, &a.id));
	CHECK_EQ_INT(m.matched, 274);
	CHECK_EQ_INT(m.meta.n_tokens, 274);

	/* A query sharing 225 tokens matches exactly 225, one sharing 200: 200. */
	memcpy(tmp, A, sizeof(tmp));
	for (size_t i = 225; i < MAXT; i++)
		tmp[i] = A[i] + 100000;
	lookup(ix, "nsA", tmp, 300, &m);
	CHECK_EQ_INT(m.found, 1);
	CHECK(same_id(&m.meta.id, &a.id));
	CHECK_EQ_INT(m.matched, 225);
	for (size_t i = 200; i < MAXT; i++)
		tmp[i] = A[i] + 100000;
	lookup(ix, "nsA", tmp, 260, &m);
	CHECK_EQ_INT(m.found, 1);
	CHECK_EQ_INT(m.matched, 200);
	/* A query longer than the blob matches the whole blob; a shorter one
	 * (partial last block) matches the query. */
	lookup(ix, "nsA", A, 500, &m);
	CHECK_EQ_INT(m.matched, 274);
	lookup(ix, "nsA", A, 150, &m);
	CHECK_EQ_INT(m.matched, 150);
	/* Less than a block, or a first block that differs: a miss. */
	lookup(ix, "nsA", A, 63, &m);
	CHECK_EQ_INT(m.found, 0);
	tmp[0] = A[0] + 1;
	lookup(ix, "nsA", tmp, 200, &m);
	CHECK_EQ_INT(m.found, 0);

	/* Another namespace with the same tokens: a miss (unknown, then known). */
	lookup(ix, "nsB", A, 274, &m);
	CHECK_EQ_INT(m.found, 0);
	for (size_t i = 0; i < 300; i++)
		tmp[i] = A[i] + 50000;
	blob_make(&d, "nsB", tmp, 300);
	CHECK_EQ_INT(blob_put(ix, &d, NULL, 0, 0, 1, &res, err, sizeof(err)), 0);
	lookup(ix, "nsB", A, 274, &m);
	CHECK_EQ_INT(m.found, 0);
	lookup(ix, "nsB", d.tok, d.n, &m);
	CHECK_EQ_INT(m.found, 1);
	CHECK_EQ_INT(m.matched, 300);
	CHECK(res.stored.ns_id != 0);
	check_clean(ix);

	/* Dedup: the same id again writes nothing. */
	CHECK_EQ_INT(count_blobs(ix, NULL), 2);
	CHECK_EQ_INT(blob_put(ix, &a, NULL, 0, 1, 1, &res, err, sizeof(err)), 0);
	CHECK_EQ_INT(res.deduplicated, 1);
	CHECK(same_id(&res.stored.id, &a.id));
	CHECK_EQ_INT(res.stored.tier, 0); /* the stored record, not the new one */
	CHECK_EQ_INT(count_blobs(ix, NULL), 2);
	check_clean(ix);

	/* b: 268 tokens sharing 225 with a is not a prefix: nothing superseded. */
	memcpy(tmp, A, sizeof(tmp));
	for (size_t i = 225; i < MAXT; i++)
		tmp[i] = A[i] + 200000;
	blob_make(&b, "nsA", tmp, 268);
	CHECK_EQ_INT(blob_put(ix, &b, NULL, 0, 0, 1, &res, err, sizeof(err)), 0);
	CHECK_EQ_INT(res.n_superseded, 0);
	CHECK_EQ_INT(index_get(ix, &a.id, &bm, NULL, 0), 0);
	CHECK_EQ_INT(count_blobs(ix, "nsA"), 2);
	lookup(ix, "nsA", b.tok, b.n, &m);
	CHECK(same_id(&m.meta.id, &b.id));
	CHECK_EQ_INT(m.matched, 268);
	check_clean(ix);

	/* c: 334 tokens extending a supersedes a (and not b). */
	blob_make(&c, "nsA", A, 334);
	CHECK_EQ_INT(blob_put(ix, &c, NULL, 0, 0, 1, &res, err, sizeof(err)), 0);
	CHECK_EQ_INT(res.deduplicated, 0);
	CHECK_EQ_INT(res.n_superseded, 1);
	CHECK(same_id(&res.superseded[0].id, &a.id));
	CHECK_EQ_INT(res.superseded[0].n_tokens, 274);
	CHECK_EQ_INT(index_get(ix, &a.id, &bm, NULL, 0), KVTIER_E_NOTFOUND);
	CHECK_EQ_INT(index_get_tokens(ix, &a.id, &gt, &gn), KVTIER_E_NOTFOUND);
	CHECK(gt == NULL);
	CHECK_EQ_INT(index_get(ix, &b.id, &bm, nsname, sizeof(nsname)), 0);
	CHECK_EQ_INT(strcmp(nsname, "nsA"), 0);
	lookup(ix, "nsA", A, 274, &m);
	CHECK_EQ_INT(m.found, 1);
	CHECK(same_id(&m.meta.id, &c.id));
	CHECK_EQ_INT(m.matched, 274);
	CHECK_EQ_INT(index_get_tokens(ix, &c.id, &gt, &gn), 0);
	CHECK_EQ_INT(gn, 334);
	CHECK_EQ_INT(memcmp(gt, A, 334 * sizeof(int32_t)), 0);
	free(gt);
	gt = NULL;
	check_clean(ix);

	/* Supersession at block boundaries: 128 and 130 tokens, then 192. */
	blob_make(&s1, "nsS", A, 128);
	blob_make(&s2, "nsS", A, 130);
	blob_make(&s3, "nsS", A, 192);
	CHECK_EQ_INT(blob_put(ix, &s1, NULL, 0, 0, 1, &res, err, sizeof(err)), 0);
	CHECK_EQ_INT(blob_put(ix, &s2, NULL, 0, 0, 1, &res, err, sizeof(err)), 0);
	CHECK_EQ_INT(res.n_superseded, 1);
	CHECK(same_id(&res.superseded[0].id, &s1.id));
	CHECK_EQ_INT(blob_put(ix, &s1, NULL, 0, 0, 0, &res, err, sizeof(err)), 0);
	CHECK_EQ_INT(res.deduplicated, 0);
	CHECK_EQ_INT(blob_put(ix, &s3, NULL, 0, 0, 1, &res, err, sizeof(err)), 0);
	CHECK_EQ_INT(res.n_superseded, 2);
	CHECK_EQ_INT(count_blobs(ix, "nsS"), 1);
	check_clean(ix);

	/* supersede = 0 keeps both; ties go to the shorter blob (the same gain
	 * for fewer bytes, and the only one a recurrent or sliding-window server
	 * can use), then the lower tier, then the newer. */
	blob_make(&a2, "nsK", A, 274);
	blob_make(&c2, "nsK", A, 334);
	CHECK_EQ_INT(blob_put(ix, &a2, NULL, 0, 0, 0, &res, err, sizeof(err)), 0);
	CHECK_EQ_INT(blob_put(ix, &c2, NULL, 0, 0, 0, &res, err, sizeof(err)), 0);
	CHECK_EQ_INT(res.n_superseded, 0);
	CHECK_EQ_INT(count_blobs(ix, "nsK"), 2);
	lookup(ix, "nsK", A, 274, &m);
	CHECK_EQ_INT(m.matched, 274);
	CHECK(same_id(&m.meta.id, &a2.id)); /* the shorter, though older */
	{
		/* Equal lengths: a 274-token twin of a2 leaving A after 200 tokens. */
		struct blob t2;

		memcpy(tmp, A, sizeof(tmp));
		for (size_t i = 200; i < MAXT; i++)
			tmp[i] = A[i] + 500000;
		blob_make(&t2, "nsK", tmp, 274);
		CHECK_EQ_INT(blob_put(ix, &t2, NULL, 0, 0, 0, &res, err, sizeof(err)), 0);
		tmp[200] = A[200] + 700000; /* a query sharing 200 with all three */
		lookup(ix, "nsK", tmp, 210, &m);
		CHECK_EQ_INT(m.matched, 200);
		CHECK(same_id(&m.meta.id, &t2.id)); /* 274 each, same tier: the newer */
		CHECK_EQ_INT(index_get(ix, &t2.id, &bm, NULL, 0), 0);
		bm.tier = 1;
		CHECK_EQ_INT(index_update(ix, &bm), 0);
		lookup(ix, "nsK", tmp, 210, &m);
		CHECK(same_id(&m.meta.id, &a2.id)); /* the lower tier */
		CHECK_EQ_INT(index_delete(ix, &t2.id, NULL), 0);
	}
	CHECK_EQ_INT(index_get(ix, &c2.id, &bm, NULL, 0), 0);
	bm.tier = 1;
	CHECK_EQ_INT(index_update(ix, &bm), 0);
	lookup(ix, "nsK", A, 274, &m);
	CHECK(same_id(&m.meta.id, &a2.id));
	lookup(ix, "nsK", A, 334, &m);
	CHECK(same_id(&m.meta.id, &c2.id)); /* the longer match first */
	CHECK_EQ_INT(m.matched, 334);
	CHECK_EQ_INT(m.meta.tier, 1);
	bm.n_tokens++;
	CHECK_EQ_INT(index_update(ix, &bm), KVTIER_E_INVALID);
	check_clean(ix);

	/* Quarantined blobs are skipped, down to shallower blocks if needed. */
	memcpy(tmp, A, sizeof(tmp));
	for (size_t i = 128; i < MAXT; i++)
		tmp[i] = A[i] + 300000;
	blob_make(&e2, "nsK", tmp, 200);
	CHECK_EQ_INT(blob_put(ix, &e2, NULL, 0, 0, 0, &res, err, sizeof(err)), 0);
	CHECK_EQ_INT(index_get(ix, &a2.id, &bm, NULL, 0), 0);
	bm.flags |= BLOB_F_QUARANTINED;
	CHECK_EQ_INT(index_update(ix, &bm), 0);
	lookup(ix, "nsK", A, 274, &m);
	CHECK(same_id(&m.meta.id, &c2.id));
	{
		/* index_set_flags changes the flag only: hits counted in the
		 * meantime, the tier and the rest stay as they are. */
		struct index_touch t = {.id = c2.id, .hits = 5};
		struct blob_meta before;
		int had = -1;

		CHECK_EQ_INT(index_get(ix, &c2.id, &before, NULL, 0), 0);
		CHECK_EQ_INT(index_touch(ix, &t, 1), 0);
		CHECK_EQ_INT(index_set_flags(ix, &c2.id, BLOB_F_QUARANTINED, &had), 0);
		CHECK_EQ_INT(had, 0);
		CHECK_EQ_INT(index_set_flags(ix, &c2.id, BLOB_F_QUARANTINED, &had), 0);
		CHECK_EQ_INT(had, 1);
		CHECK_EQ_INT(index_get(ix, &c2.id, &bm, NULL, 0), 0);
		CHECK_EQ_INT(bm.flags, before.flags | BLOB_F_QUARANTINED);
		CHECK_EQ_INT(bm.hits, before.hits + 5);
		CHECK_EQ_INT(bm.tier, 1);
		memset(&t.id, 0xee, sizeof(t.id)); /* no such blob */
		CHECK_EQ_INT(index_set_flags(ix, &t.id, BLOB_F_QUARANTINED, NULL), KVTIER_E_NOTFOUND);
	}
	lookup(ix, "nsK", A, 274, &m);
	CHECK_EQ_INT(m.found, 1);
	CHECK(same_id(&m.meta.id, &e2.id));
	CHECK_EQ_INT(m.matched, 128);
	check_clean(ix);

	/* Layout: a namespace with one refuses another, naming both. */
	blob_make(&e, "nsL", A, 100);
	CHECK_EQ_INT(blob_put(ix, &e, l1, l1_len, 0, 1, &res, err, sizeof(err)), 0);
	blob_make(&e, "nsL", A, 150);
	CHECK_EQ_INT(blob_put(ix, &e, l0, l0_len, 0, 1, &res, err, sizeof(err)),
		     KVTIER_E_LAYOUT);
	slot_layout_describe(l0, l0_len, d0, sizeof(d0));
	slot_layout_describe(l1, l1_len, d1, sizeof(d1));
	CHECK(strcmp(d0, d1) != 0);
	CHECK(strstr(err, d0) != NULL);
	CHECK(strstr(err, d1) != NULL);
	CHECK(strstr(err, "nsL") != NULL);
	CHECK_EQ_INT(index_get(ix, &e.id, &bm, NULL, 0), KVTIER_E_NOTFOUND);
	CHECK_EQ_INT(count_blobs(ix, "nsL"), 1); /* the 100-token one, not superseded */
	/* nsA has no layout: the first one given is recorded, then enforced. */
	blob_make(&e, "nsA", A, 150);
	CHECK_EQ_INT(blob_put(ix, &e, l0, l0_len, 0, 0, &res, err, sizeof(err)), 0);
	{
		struct ns_find f = {.name = "nsA"};

		CHECK_EQ_INT(index_ns_list(ix, ns_find_cb, &f), 0);
		CHECK_EQ_INT(f.found, 1);
		CHECK_EQ_INT(f.rec.layout_len, l0_len);
		CHECK_EQ_INT(memcmp(f.rec.layout, l0, l0_len), 0);
	}
	blob_make(&e, "nsA", A, 160);
	CHECK_EQ_INT(blob_put(ix, &e, l1, l1_len, 0, 0, &res, err, sizeof(err)),
		     KVTIER_E_LAYOUT);
	CHECK_EQ_INT(blob_put(ix, &e, NULL, 0, 0, 0, &res, err, sizeof(err)), 0);
	check_clean(ix);

	/* Bad puts. */
	blob_make(&small, "nsA", A, 63);
	CHECK_EQ_INT(blob_put(ix, &small, NULL, 0, 0, 1, &res, err, sizeof(err)),
		     KVTIER_E_INVALID);
	CHECK(strstr(err, "fewer than one block") != NULL);
	{
		char longname[INDEX_NS_MAX + 2];

		memset(longname, 'x', sizeof(longname) - 1);
		longname[sizeof(longname) - 1] = '\0';
		blob_make(&small, "nsA", A, 100);
		small.ns = longname;
		CHECK_EQ_INT(blob_put(ix, &small, NULL, 0, 0, 1, &res, err, sizeof(err)),
			     KVTIER_E_INVALID);
		small.ns = "";
		CHECK_EQ_INT(blob_put(ix, &small, NULL, 0, 0, 1, &res, err, sizeof(err)),
			     KVTIER_E_INVALID);
	}

	/* Delete removes every entry. */
	CHECK_EQ_INT(index_delete(ix, &b.id, &bm), 0);
	CHECK(same_id(&bm.id, &b.id));
	CHECK_EQ_INT(bm.n_tokens, 268);
	CHECK_EQ_INT(index_get(ix, &b.id, &bm, NULL, 0), KVTIER_E_NOTFOUND);
	CHECK_EQ_INT(index_delete(ix, &b.id, NULL), KVTIER_E_NOTFOUND);
	lookup(ix, "nsA", b.tok, b.n, &m);
	CHECK_EQ_INT(m.found, 1);
	CHECK(!same_id(&m.meta.id, &b.id));
	CHECK_EQ_INT(m.matched, 225);
	check_clean(ix);
	CHECK_EQ_INT(index_delete(ix, &d.id, NULL), 0);
	lookup(ix, "nsB", d.tok, d.n, &m);
	CHECK_EQ_INT(m.found, 0);
	check_clean(ix);

	/* Touch accumulates hits and keeps the newest access time. */
	{
		struct index_touch t[3];

		memset(t, 0, sizeof(t));
		t[0].id = c.id;
		t[0].hits = 3;
		t[0].last_access_ms = 999999;
		t[1].id = b.id; /* deleted: skipped */
		t[1].hits = 7;
		t[2].id = c.id;
		t[2].hits = 2;
		t[2].last_access_ms = 5;
		CHECK_EQ_INT(index_touch(ix, t, 3), 0);
		CHECK_EQ_INT(index_touch(ix, t, 1), 0);
		CHECK_EQ_INT(index_get(ix, &c.id, &bm, NULL, 0), 0);
		CHECK_EQ_INT(bm.hits, 8);
		CHECK_EQ_INT(bm.last_access_ms, 999999);
		CHECK_EQ_INT(index_touch(ix, t, 0), 0);
		/* The GDSF base is kept only from a hit on the tier the blob is on:
		 * a hit recorded before a move carries the old tier's base. */
		CHECK(bm.gdsf_base == 0);
		t[0].hits = 0;
		t[0].gdsf_base = 5.0;
		t[0].tier = bm.tier + 1;
		CHECK_EQ_INT(index_touch(ix, t, 1), 0);
		CHECK_EQ_INT(index_get(ix, &c.id, &bm, NULL, 0), 0);
		CHECK(bm.gdsf_base == 0);
		t[0].tier = bm.tier;
		CHECK_EQ_INT(index_touch(ix, t, 1), 0);
		CHECK_EQ_INT(index_get(ix, &c.id, &bm, NULL, 0), 0);
		CHECK(bm.gdsf_base == 5.0);
		CHECK_EQ_INT(bm.hits, 8);
	}

	/* Paging: limit 2 over 5 blobs visits each once, in id order. */
	for (int i = 0; i < 5; i++) {
		for (size_t j = 0; j < 70; j++)
			tmp[j] = A[j] + 1000 * (i + 1);
		blob_make(&p[i], "nsP", tmp, 70);
		CHECK_EQ_INT(blob_put(ix, &p[i], NULL, 0, 0, 1, &res, err, sizeof(err)), 0);
	}
	{
		struct page all = {.n = 0}, pg;
		const struct key *after = NULL;
		struct key last;
		int more = 0, pages = 0;

		do {
			memset(&pg, 0, sizeof(pg));
			CHECK_EQ_INT(index_list(ix, "nsP", after, 2, page_cb, &pg, &more), 0);
			CHECK(pg.n <= 2);
			for (size_t i = 0; i < pg.n; i++) {
				CHECK_EQ_INT(strcmp(pg.ns[i], "nsP"), 0);
				all.ids[all.n++] = pg.ids[i];
			}
			if (pg.n) {
				last = pg.ids[pg.n - 1];
				after = &last;
			}
			pages++;
			CHECK(pages <= 4);
		} while (more);
		CHECK_EQ_INT(pages, 3);
		CHECK_EQ_INT(all.n, 5);
		for (size_t i = 1; i < all.n; i++)
			CHECK(memcmp(all.ids[i - 1].b, all.ids[i].b, KEY_LEN) < 0);
		for (int i = 0; i < 5; i++) {
			int seen = 0;

			for (size_t j = 0; j < all.n; j++)
				seen += same_id(&all.ids[j], &p[i].id);
			CHECK_EQ_INT(seen, 1);
		}
		/* Unfiltered paging sees every blob, also exactly once. */
		memset(&all, 0, sizeof(all));
		after = NULL;
		do {
			memset(&pg, 0, sizeof(pg));
			CHECK_EQ_INT(index_list(ix, NULL, after, 2, page_cb, &pg, &more), 0);
			for (size_t i = 0; i < pg.n; i++)
				all.ids[all.n++] = pg.ids[i];
			if (pg.n) {
				last = pg.ids[pg.n - 1];
				after = &last;
			}
		} while (more);
		CHECK_EQ_INT(all.n, count_blobs(ix, NULL));
		for (size_t i = 1; i < all.n; i++)
			CHECK(memcmp(all.ids[i - 1].b, all.ids[i].b, KEY_LEN) < 0);
	}
	CHECK_EQ_INT(count_blobs(ix, "nsP"), 5);
	CHECK_EQ_INT(count_blobs(ix, "nsK"), 3);
	CHECK_EQ_INT(count_blobs(ix, "nsNone"), 0);
	CHECK_EQ_INT(count_blobs(ix, ""), count_blobs(ix, NULL));
	CHECK_EQ_INT(count_blobs(ix, NULL), 13);
	check_clean(ix);

	/* Prefill speed: exponential moving average; the refit sees the model
	 * words as stored and its change is written in the same transaction. */
	const double model[8] = {1, 2, 3, 4, 5, 6, 7, 8};
	int refits = 0;
	CHECK_EQ_INT(index_ns_report_prefill(ix, "nsA", 100.0, 0.5, NULL, NULL), 0);
	CHECK_EQ_INT(index_ns_report_prefill(ix, "nsA", 200.0, 0.5, refit_add_index, &refits), 0);
	CHECK_EQ_INT(refits, 1);
	CHECK_EQ_INT(index_ns_report_prefill(ix, "nsNone", 200.0, 0.5, refit_add_index, &refits),
		     KVTIER_E_NOTFOUND);
	CHECK_EQ_INT(index_ns_report_prefill(ix, "nsA", -1.0, 0.5, refit_add_index, &refits),
		     KVTIER_E_INVALID);
	CHECK_EQ_INT(refits, 1);
	{
		struct ns_find f = {.name = "nsA"};
		struct ns_rec got;

		CHECK_EQ_INT(index_ns_list(ix, ns_find_cb, &f), 0);
		CHECK_EQ_INT(f.found, 1);
		CHECK(f.rec.prefill_tps > 149.999 && f.rec.prefill_tps < 150.001);
		CHECK_EQ_INT(f.rec.prefill_samples, 2);
		/* The model words travel with the report, and come back. */
		CHECK_EQ_INT(index_ns_get(ix, "nsA", &got), 0);
		CHECK(memcmp(got.pf, model, sizeof(model)) == 0);
		CHECK_EQ_INT(index_ns_get(ix, "nsNone", &got), KVTIER_E_NOTFOUND);
	}

	/* Meta values. */
	{
		char buf[64];
		size_t len = 0;

		CHECK_EQ_INT(index_meta_put(ix, "tiers", "tmpfs,disk", 10), 0);
		CHECK_EQ_INT(index_meta_get(ix, "tiers", buf, sizeof(buf), &len), 0);
		CHECK_EQ_INT(len, 10);
		CHECK_EQ_INT(memcmp(buf, "tmpfs,disk", 10), 0);
		CHECK_EQ_INT(index_meta_get(ix, "tiers", buf, 4, &len), 0);
		CHECK_EQ_INT(len, 10);
		CHECK_EQ_INT(index_meta_get(ix, "nothing", buf, sizeof(buf), &len),
			     KVTIER_E_NOTFOUND);
	}
	index_close(ix);
	ix = NULL;

	/* Reopen: the block size is fixed; the data survived. */
	CHECK_EQ_INT(index_open(dir, 32, 0, 0, &ix, err, sizeof(err)), KVTIER_E_INVALID);
	CHECK(ix == NULL);
	CHECK(strstr(err, "block size") != NULL);
	CHECK_EQ_INT(index_open(dir, B, 0, 0, &ix, err, sizeof(err)), 0);
	CHECK_EQ_INT(count_blobs(ix, NULL), 13);
	index_close(ix);

	/* Read-only: lookups and walks work, writes are refused. */
	CHECK_EQ_INT(index_open(dir, 0, 1, 0, &ix, err, sizeof(err)), 0);
	CHECK_EQ_INT(index_block_size(ix), B);
	lookup(ix, "nsA", A, 334, &m);
	CHECK(same_id(&m.meta.id, &c.id));
	CHECK_EQ_INT(m.matched, 334);
	CHECK_EQ_INT(blob_put(ix, &b, NULL, 0, 0, 1, &res, err, sizeof(err)), -EROFS);
	CHECK_EQ_INT(index_delete(ix, &c.id, NULL), -EROFS);
	check_clean(ix);
	index_close(ix);
	ix = NULL;

	/* Damage: drop c's tokens behind the index's back; check reports it. */
	raw_edit(dir, "tokens", &c.id, NULL, 0);
	CHECK_EQ_INT(index_open(dir, 0, 0, 0, &ix, err, sizeof(err)), 0);
	last_problem[0] = '\0';
	CHECK(index_check(ix, report_print, NULL) >= 1);
	{
		char hex[KEY_HEX_LEN + 1];

		key_hex(&c.id, hex);
		CHECK(strstr(last_problem, hex) != NULL);
	}
	/* Lookups survive the damage (c is skipped; the prefix still matches e). */
	lookup(ix, "nsA", A, 334, &m);
	CHECK_EQ_INT(m.found, 1);
	CHECK(!same_id(&m.meta.id, &c.id));
	CHECK_EQ_INT(m.matched, 160);
	index_close(ix);
	ix = NULL;

	/* A newer schema is refused with a message. */
	raw_edit(dir, "meta", NULL, "schema", INDEX_SCHEMA + 1);
	CHECK_EQ_INT(index_open(dir, 0, 0, 0, &ix, err, sizeof(err)), KVTIER_E_INVALID);
	CHECK(strstr(err, "newer") != NULL);
	CHECK(ix == NULL);

	CHECK_EQ_INT(nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS), 0);
	CHECK_EQ_INT(nftw(empty, rm_entry, 16, FTW_DEPTH | FTW_PHYS), 0);
	{
		char jdir[] = "/tmp/test_index_jumps.XXXXXX";

		CHECK(mkdtemp(jdir) != NULL);
		test_jumps(jdir);
		CHECK_EQ_INT(nftw(jdir, rm_entry, 16, FTW_DEPTH | FTW_PHYS), 0);
	}
	{
		char fdir[] = "/tmp/test_index_flags.XXXXXX";

		CHECK(mkdtemp(fdir) != NULL);
		test_slot_flags(fdir);
		CHECK_EQ_INT(nftw(fdir, rm_entry, 16, FTW_DEPTH | FTW_PHYS), 0);
	}
	printf("test_index: ok\n");
	return 0;
}
