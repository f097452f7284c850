/* test_store_map.c: the zero-copy fetch of tmpfs parts (store_fetch_map,
 * store_fetch_check): the bytes are the blob's, references keep the mapping
 * alive after the fetch is closed, a flipped byte is caught before the last
 * chunk, and a file truncated under the mapping is a checksum failure, not a
 * SIGBUS that kills the daemon. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "kvtier.h"
#include "store.h"

#define N_TOKENS 128
#define ROW 4096

static char base[] = "/dev/shm/kvtier-test-map-XXXXXX";

/* A v2 slot file: header, tokens, cells, one layer of K and V rows. */
static size_t make_slot(uint8_t **out)
{
	size_t n = 12 + 4 * N_TOKENS + 4 + 8 * N_TOKENS + 8 + 2 * (12 + (size_t)N_TOKENS * ROW);
	uint8_t *b = calloc(1, n), *p = b;
	uint32_t u;

	CHECK(b);
#define PUT32(v) (u = (uint32_t)(v), memcpy(p, &u, 4), p += 4)
	PUT32(0x67677371);
	PUT32(2);
	PUT32(N_TOKENS);
	for (int i = 0; i < N_TOKENS; i++)
		PUT32(100 + i);
	PUT32(N_TOKENS);
	for (int i = 0; i < N_TOKENS; i++) {
		PUT32(i);
		PUT32(0);
	}
	PUT32(0); /* v_trans */
	PUT32(1); /* n_layer */
	for (int kv = 0; kv < 2; kv++) {
		uint64_t row = ROW;
		PUT32(1);
		memcpy(p, &row, 8);
		p += 8;
		for (size_t i = 0; i < (size_t)N_TOKENS * ROW; i++)
			*p++ = (uint8_t)(i * 31 + kv);
	}
#undef PUT32
	CHECK((size_t)(p - b) == n);
	*out = b;
	return n;
}

static struct store *open_store(void)
{
	struct store_config cfg;
	struct store *s;
	char err[512] = "";

	memset(&cfg, 0, sizeof(cfg));
	snprintf(cfg.data_dir, sizeof(cfg.data_dir), "%s/data", base);
	snprintf(cfg.tiers[0].kind, sizeof(cfg.tiers[0].kind), "tmpfs");
	snprintf(cfg.tiers[0].path, sizeof(cfg.tiers[0].path), "%s/tier", base);
	cfg.tiers[0].capacity = 64u << 20;
	cfg.n_tiers = 1;
	cfg.supersede = 1;
	cfg.lease_default_s = 60;
	cfg.lease_max_s = 60;
	cfg.compress_min_saving = 0.1;
	if (store_open(&cfg, &s, err, sizeof(err))) {
		fprintf(stderr, "store_open: %s\n", err);
		exit(1);
	}
	return s;
}

static struct key put_blob(struct store *s, const uint8_t *b, size_t n)
{
	struct store_put *p;
	struct store_put_result res;
	char err[512] = "";

	CHECK_EQ_INT(store_put_begin(s, "ns", 1, 0, &p, err, sizeof(err)), 0);
	CHECK_EQ_INT(store_put_part(p, PART_MAIN, n, err, sizeof(err)), 0);
	CHECK_EQ_INT(store_put_write(p, b, n, err, sizeof(err)), 0);
	if (store_put_finish(p, &res, err, sizeof(err))) {
		fprintf(stderr, "put: %s\n", err);
		exit(1);
	}
	return res.id;
}

static void tier_file(const struct key *id, char *path, size_t cap)
{
	char hex[KEY_HEX_LEN + 1];

	snprintf(path, cap, "%s/tier/%s", base, key_hex(id, hex));
}

int main(void)
{
	uint8_t *b;
	size_t n = make_slot(&b);
	struct store *s;
	struct store_fetch *f;
	struct store_map *m;
	struct blob_meta meta;
	struct key id;
	char err[512], path[512];
	struct stats_before {
		uint64_t failures;
	} before;

	CHECK(mkdtemp(base));
	s = open_store();
	id = put_blob(s, b, n);

	/* The bytes through the mappings are the blob's; pieces go in order. */
	CHECK_EQ_INT(store_fetch_open(s, &id, &f, &meta, err, sizeof(err)), 0);
	CHECK_EQ_INT(store_fetch_map(f, PART_MAIN, 1, 10, &m), KVTIER_E_INVALID); /* out of order */
	CHECK(m == NULL);
	struct store_map *kept = NULL;
	for (uint64_t off = 0; off < n; off += 100003) { /* not page-aligned */
		size_t len = n - off < 100003 ? n - off : 100003;
		CHECK_EQ_INT(store_fetch_map(f, PART_MAIN, off, len, &m), 0);
		CHECK(memcmp(store_map_data(m), b + off, len) == 0);
		if (off == 0)
			kept = m;
		else
			store_map_release(m);
	}
	/* A message in flight keeps its piece after the fetch is closed. */
	store_fetch_close(f);
	CHECK(memcmp(store_map_data(kept), b, 100003) == 0);
	store_map_release(kept);

	/* A flipped byte: the piece that completes the part is refused, the
	 * blob dropped (record and file) and the failure counted once. */
	{
		struct store_stats st;
		store_get_stats(s, &st);
		before.failures = st.checksum_failures;
	}
	tier_file(&id, path, sizeof(path));
	CHECK_EQ_INT(chmod(path, 0640), 0);
	{
		int fd = open(path, O_WRONLY);
		uint8_t x = b[n / 2] ^ 1;
		CHECK(fd >= 0);
		CHECK(pwrite(fd, &x, 1, (off_t)(n / 2)) == 1);
		close(fd);
	}
	CHECK_EQ_INT(store_fetch_open(s, &id, &f, &meta, err, sizeof(err)), 0);
	CHECK_EQ_INT(store_fetch_map(f, PART_MAIN, 0, n - 1, &m), 0);
	store_map_release(m);
	CHECK_EQ_INT(store_fetch_map(f, PART_MAIN, n - 1, 1, &m), KVTIER_E_CORRUPT);
	CHECK(m == NULL);
	store_fetch_close(f);
	CHECK_EQ_INT(store_fetch_open(s, &id, &f, &meta, err, sizeof(err)), KVTIER_E_NOTFOUND);
	CHECK(f == NULL);
	CHECK(access(path, F_OK) != 0 && errno == ENOENT);
	{
		struct store_stats st;
		store_get_stats(s, &st);
		CHECK_EQ_INT(st.checksum_failures, before.failures + 1);
	}

	/* Truncated under an open fetch: SIGBUS becomes KVTIER_E_CORRUPT. */
	{
		struct store_stats st;
		store_get_stats(s, &st);
		before.failures = st.checksum_failures;
	}
	id = put_blob(s, b, n);
	CHECK_EQ_INT(store_fetch_open(s, &id, &f, &meta, err, sizeof(err)), 0);
	tier_file(&id, path, sizeof(path));
	CHECK_EQ_INT(chmod(path, 0640), 0);
	CHECK_EQ_INT(truncate(path, 4096), 0);
	CHECK_EQ_INT(store_fetch_map(f, PART_MAIN, 0, n, &m), KVTIER_E_CORRUPT);
	store_fetch_close(f);
	{
		struct store_stats st;
		store_get_stats(s, &st);
		CHECK_EQ_INT(st.checksum_failures, before.failures + 1);
	}
	/* ... and the truncated blob is dropped like the flipped one. */
	CHECK_EQ_INT(store_fetch_open(s, &id, &f, &meta, err, sizeof(err)), KVTIER_E_NOTFOUND);
	CHECK(f == NULL);
	CHECK(access(path, F_OK) != 0 && errno == ENOENT);

	store_close(s);
	free(b);
	{
		char cmd[600];
		snprintf(cmd, sizeof(cmd), "rm -rf '%s'", base);
		CHECK(system(cmd) == 0);
	}
	return 0;
}
