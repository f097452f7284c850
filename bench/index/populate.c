/* populate.c: fills a kvtierd data directory with many small synthetic blobs
 * for the index_scale benchmark, straight through the daemon's store library
 * (store_put_begin/part/write/finish), because a million gRPC puts take
 * about 20 minutes (measured: ~800 puts/s with the data dir on disk, ~2000/s
 * on tmpfs, one client; this does ~6000/s). The daemon is then started on
 * the directory.
 *
 * The data set (deterministic for a seed):
 * - K namespaces; each has G system prompts (64..192 tokens) whose
 *   popularity follows a Zipf law (s = 1): a few prompts are shared by tens
 *   of thousands of conversations, most by a few;
 * - short conversations: a system prompt, then 1..3 saved turns, each
 *   extending the previous one (128..~550 tokens); every turn is a blob
 *   (the directory is populated without supersession, as kvtierd
 *   --no-supersede would keep them);
 * - D long conversations of 5 turns each (2K..32K tokens): the deep hits;
 * - slot files in llama.cpp's version-2 format (harness.py make_slot's
 *   layout) with one layer of 2-byte K and V rows: 48 + 16 n bytes.
 *
 * It also writes the query file (dataset.h) of 32K-token prompts the lookup
 * driver sends: deep hits, turn hits, system-prompt-only hits and misses,
 * each with the match it expects.
 *
 * Durability of the population itself is of no interest, and LMDB syncs
 * every commit (an fdatasync() and an O_DSYNC write per put): unless --sync
 * is given, this program's own fsync/fdatasync/msync stand in for libc's and
 * return at once, and its open() drops O_SYNC/O_DSYNC. The daemon started
 * afterwards syncs as usual; the caller should sync the data file before
 * measuring anything, so write-back does not run during the measurement.
 *
 * Never run it on a data directory that matters: it is a benchmark tool.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "dataset.h"
#include "kvtier.h"
#include "log.h"
#include "options.h"
#include "store.h"

/* ---- sync stand-ins (see the top of the file) ---- */

static int g_sync; /* 1: the real calls */

int fsync(int fd)
{
	return g_sync ? (int)syscall(SYS_fsync, fd) : 0;
}

int fdatasync(int fd)
{
	return g_sync ? (int)syscall(SYS_fdatasync, fd) : 0;
}

int msync(void *addr, size_t len, int flags)
{
	return g_sync ? (int)syscall(SYS_msync, addr, len, flags) : 0;
}

/* LMDB writes its meta pages through a second descriptor opened O_DSYNC. */
int open(const char *path, int flags, ...)
{
	mode_t mode = 0;

	if (flags & (O_CREAT | O_TMPFILE)) {
		va_list ap;
		va_start(ap, flags);
		mode = va_arg(ap, mode_t);
		va_end(ap);
	}
	if (!g_sync)
		flags &= ~O_SYNC & ~O_DSYNC;
	return (int)syscall(SYS_openat, AT_FDCWD, path, flags, mode);
}

/* ---- data set ---- */

struct params {
	const char *data, *tier, *queries_out;
	uint64_t tier_size;
	uint64_t blobs;
	unsigned namespaces, groups, deep, queries, threads, block;
	uint64_t seed;
};

#define SYS_MIN 64
#define SYS_MAX 192
#define TURN_MAX 3
#define DEEP_TURNS 5
#define CONV_MAX_TOKENS (SYS_MAX + 160 + (TURN_MAX - 1) * 96)
#define QUERY_TOKENS 32768u

static const uint32_t deep_lo[DEEP_TURNS] = {2048, 4096, 8192, 16384, 24576};
static const uint32_t deep_hi[DEEP_TURNS] = {4095, 8191, 16383, 24575, 32767};

struct dataset {
	struct params p;
	int32_t **sys;          /* [ns * groups + g] */
	uint32_t *sys_len;
	double *zipf_cdf;       /* [groups] */
	uint8_t *turns;         /* per short conversation */
	uint64_t n_convs;
};

static uint64_t seed_of(const struct dataset *ds, uint64_t what, uint64_t i)
{
	uint64_t s = ds->p.seed ^ (what * 0x9e3779b97f4a7c15ull) ^ (i * 0xd1b54a32d192ed03ull);

	ds_next(&s);
	return s;
}

static unsigned zipf_pick(const struct dataset *ds, uint64_t *rng)
{
	double u = (double)(ds_next(rng) >> 11) / 9007199254740992.0;
	unsigned lo = 0, hi = ds->p.groups - 1;

	while (lo < hi) {
		unsigned mid = (lo + hi) / 2;
		if (ds->zipf_cdf[mid] >= u)
			hi = mid;
		else
			lo = mid + 1;
	}
	return lo;
}

/* A short conversation: namespace, system prompt, then its own tokens.
 * Fills tok (CONV_MAX_TOKENS) and len[0..turns) (the turns' lengths). */
static void gen_conv(const struct dataset *ds, uint64_t c, unsigned *ns, int32_t *tok,
		     uint32_t *len, unsigned turns, unsigned *group)
{
	uint64_t r = seed_of(ds, 1, c);
	unsigned g;
	uint32_t ls, n;

	*ns = (unsigned)(ds_next(&r) % ds->p.namespaces);
	g = zipf_pick(ds, &r);
	if (group)
		*group = g;
	ls = ds->sys_len[*ns * ds->p.groups + g];
	memcpy(tok, ds->sys[*ns * ds->p.groups + g], ls * sizeof(int32_t));
	n = ls + ds_range(&r, 64, 160);
	len[0] = n;
	for (unsigned t = 1; t < turns; t++)
		len[t] = len[t - 1] + ds_range(&r, 32, 96);
	for (uint32_t i = ls; i < len[turns - 1]; i++)
		tok[i] = ds_token(&r);
}

/* A long conversation: 5 turns of 2K..32K tokens. tok holds 32767. */
static void gen_deep(const struct dataset *ds, uint64_t d, unsigned *ns, int32_t *tok,
		     uint32_t *len)
{
	uint64_t r = seed_of(ds, 2, d);
	unsigned g;
	uint32_t ls;

	*ns = (unsigned)(d % ds->p.namespaces);
	g = zipf_pick(ds, &r);
	ls = ds->sys_len[*ns * ds->p.groups + g];
	memcpy(tok, ds->sys[*ns * ds->p.groups + g], ls * sizeof(int32_t));
	for (unsigned t = 0; t < DEEP_TURNS; t++)
		len[t] = ds_range(&r, deep_lo[t], deep_hi[t]);
	for (uint32_t i = ls; i < len[DEEP_TURNS - 1]; i++)
		tok[i] = ds_token(&r);
}

static int dataset_init(struct dataset *ds, const struct params *p)
{
	uint64_t left, r = 0;
	double h = 0, acc = 0;
	size_t cap;

	memset(ds, 0, sizeof(*ds));
	ds->p = *p;
	ds->sys = calloc((size_t)p->namespaces * p->groups, sizeof(*ds->sys));
	ds->sys_len = calloc((size_t)p->namespaces * p->groups, sizeof(*ds->sys_len));
	ds->zipf_cdf = calloc(p->groups, sizeof(double));
	if (!ds->sys || !ds->sys_len || !ds->zipf_cdf)
		return -ENOMEM;
	for (unsigned i = 0; i < p->namespaces * p->groups; i++) {
		uint64_t s = seed_of(ds, 3, i);
		ds->sys_len[i] = ds_range(&s, SYS_MIN, SYS_MAX);
		ds->sys[i] = malloc(ds->sys_len[i] * sizeof(int32_t));
		if (!ds->sys[i])
			return -ENOMEM;
		ds->sys[i][0] = 1; /* BOS */
		for (uint32_t j = 1; j < ds->sys_len[i]; j++)
			ds->sys[i][j] = ds_token(&s);
	}
	for (unsigned g = 0; g < p->groups; g++)
		h += 1.0 / (g + 1);
	for (unsigned g = 0; g < p->groups; g++) {
		acc += 1.0 / (g + 1) / h;
		ds->zipf_cdf[g] = acc;
	}
	ds->zipf_cdf[p->groups - 1] = 1.0;
	/* Turns per short conversation until the blob count is reached. */
	left = p->blobs > (uint64_t)p->deep * DEEP_TURNS ? p->blobs - (uint64_t)p->deep * DEEP_TURNS : 0;
	cap = (size_t)left + 1; /* at most one conversation per blob */
	ds->turns = malloc(cap);
	if (!ds->turns)
		return -ENOMEM;
	r = seed_of(ds, 4, 0);
	while (left) {
		unsigned u = (unsigned)(ds_next(&r) % 10), t = u < 3 ? 1 : u < 6 ? 2 : 3;
		if (t > left)
			t = (unsigned)left;
		ds->turns[ds->n_convs++] = (uint8_t)t;
		left -= t;
	}
	return 0;
}

/* ---- slot files and puts ---- */

static size_t slot_size(uint32_t n)
{
	return 48 + 16 * (size_t)n;
}

static void put_le32(uint8_t *p, uint32_t v)
{
	memcpy(p, &v, 4); /* x86-64 and every llama.cpp target are little-endian */
}

static void put_le64(uint8_t *p, uint64_t v)
{
	memcpy(p, &v, 8);
}

/* Writes a version-2 slot file of tokens[0..n) into buf (slot_size(n)). */
static void build_slot(uint8_t *buf, const int32_t *tokens, uint32_t n)
{
	uint8_t *p = buf;

	put_le32(p, 0x67677371u);
	put_le32(p + 4, 2);
	put_le32(p + 8, n);
	p += 12;
	memcpy(p, tokens, (size_t)n * 4);
	p += (size_t)n * 4;
	put_le32(p, n); /* cell_count */
	p += 4;
	for (uint32_t i = 0; i < n; i++, p += 8) {
		put_le32(p, i);     /* pos */
		put_le32(p + 4, 0); /* n_seq_id */
	}
	put_le32(p, 0); /* v_trans */
	put_le32(p + 4, 1); /* n_layer */
	p += 8;
	for (int side = 0; side < 2; side++) {
		put_le32(p, 1);      /* f16 */
		put_le64(p + 4, 2);  /* row bytes: one f16 per cell */
		p += 12;
		for (uint32_t i = 0; i < n; i++, p += 2) {
			uint16_t v = (uint16_t)(tokens[i] * (side ? 31 : 17));
			memcpy(p, &v, 2);
		}
	}
}

struct worker {
	struct dataset *ds;
	struct store *s;
	unsigned id;
	pthread_t th;
	int joined;
	int rc;
	char err[512];
};

static atomic_uint_fast64_t g_done, g_bytes, g_dedup;

static int put_one(struct worker *w, unsigned ns, const int32_t *tok, uint32_t n, uint8_t *buf)
{
	char name[64];
	struct store_put *p = NULL;
	struct store_put_result res;
	size_t sz = slot_size(n);
	int rc;

	snprintf(name, sizeof(name), DATASET_NS_FMT, ns);
	build_slot(buf, tok, n);
	rc = store_put_begin(w->s, name, 1, 0, &p, w->err, sizeof(w->err));
	if (!rc)
		rc = store_put_part(p, PART_MAIN, sz, w->err, sizeof(w->err));
	if (!rc)
		rc = store_put_write(p, buf, sz, w->err, sizeof(w->err));
	if (rc) {
		if (p)
			store_put_abort(p);
		return rc;
	}
	rc = store_put_finish(p, &res, w->err, sizeof(w->err));
	if (rc)
		return rc;
	if (res.deduplicated)
		atomic_fetch_add(&g_dedup, 1);
	atomic_fetch_add(&g_done, 1);
	atomic_fetch_add(&g_bytes, sz);
	return 0;
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	struct dataset *ds = w->ds;
	int32_t *tok = malloc(32768 * sizeof(int32_t));
	uint8_t *buf = malloc(slot_size(32768));
	uint32_t len[DEEP_TURNS];
	unsigned ns;
	int rc = -ENOMEM;

	if (!tok || !buf)
		goto out;
	rc = 0;
	for (uint64_t d = w->id; !rc && d < ds->p.deep; d += ds->p.threads) {
		gen_deep(ds, d, &ns, tok, len);
		for (unsigned t = 0; !rc && t < DEEP_TURNS; t++)
			rc = put_one(w, ns, tok, len[t], buf);
	}
	for (uint64_t c = w->id; !rc && c < ds->n_convs; c += ds->p.threads) {
		gen_conv(ds, c, &ns, tok, len, ds->turns[c], NULL);
		for (unsigned t = 0; !rc && t < ds->turns[c]; t++)
			rc = put_one(w, ns, tok, len[t], buf);
	}
out:
	free(tok);
	free(buf);
	w->rc = rc;
	return NULL;
}

/* ---- queries ---- */

static int write_u32(FILE *f, uint32_t v)
{
	return fwrite(&v, 4, 1, f) == 1 ? 0 : -EIO;
}

static int write_queries(const struct dataset *ds, const char *path)
{
	/* Shares of the query kinds, in tenths of a percent. */
	static const unsigned share[QUERY_KINDS] = {250, 350, 200, 150, 50};
	int32_t *tok = malloc(32768 * sizeof(int32_t)), *q = malloc(QUERY_TOKENS * sizeof(int32_t));
	uint64_t r = seed_of(ds, 5, 0);
	uint32_t len[DEEP_TURNS];
	FILE *f = fopen(path, "wb");
	int rc = 0;

	if (!f || !tok || !q) {
		rc = f ? -ENOMEM : -errno;
		goto out;
	}
	rc = write_u32(f, QFILE_MAGIC) | write_u32(f, ds->p.namespaces) |
	     write_u32(f, ds->p.queries);
	for (unsigned i = 0; !rc && i < ds->p.queries; i++) {
		unsigned kind = 0, acc = 0, pick = (unsigned)((uint64_t)i * 1000 / ds->p.queries);
		unsigned ns = 0;
		uint32_t expected = 0, have = 0;

		while (kind < QUERY_KINDS - 1 && pick >= acc + share[kind])
			acc += share[kind++];
		if (kind == QUERY_DEEP && ds->p.deep == 0)
			kind = QUERY_TURN;
		if ((kind == QUERY_TURN || kind == QUERY_SYSTEM) && ds->n_convs == 0)
			kind = QUERY_MISS;
		switch (kind) {
		case QUERY_DEEP: {
			uint64_t d = ds_next(&r) % ds->p.deep;
			unsigned t = (unsigned)(ds_next(&r) % DEEP_TURNS);
			gen_deep(ds, d, &ns, tok, len);
			/* Half continue a saved turn, half stop inside one. */
			have = (ds_next(&r) & 1) ? len[t] : ds_range(&r, deep_lo[0], len[t]);
			memcpy(q, tok, have * sizeof(int32_t));
			expected = have;
			break;
		}
		case QUERY_TURN: {
			uint64_t c = ds_next(&r) % ds->n_convs;
			unsigned t = (unsigned)(ds_next(&r) % ds->turns[c]);
			gen_conv(ds, c, &ns, tok, len, ds->turns[c], NULL);
			have = len[t];
			memcpy(q, tok, have * sizeof(int32_t));
			expected = have;
			break;
		}
		case QUERY_SYSTEM: {
			/* The system prompt of a stored conversation: popular
			 * prompts come up as often as they are used. */
			uint64_t c = ds_next(&r) % ds->n_convs;
			unsigned g;
			gen_conv(ds, c, &ns, tok, len, ds->turns[c], &g);
			have = ds->sys_len[ns * ds->p.groups + g];
			memcpy(q, ds->sys[ns * ds->p.groups + g], have * sizeof(int32_t));
			expected = have;
			break;
		}
		case QUERY_MISS:
			ns = (unsigned)(ds_next(&r) % ds->p.namespaces);
			q[0] = 1; /* BOS, then nothing any blob has */
			have = 1;
			break;
		default:
			ns = ds->p.namespaces; /* a namespace with no blobs */
			q[0] = 1;
			have = 1;
			break;
		}
		for (uint32_t j = have; j < QUERY_TOKENS; j++)
			q[j] = ds_token(&r);
		rc = write_u32(f, ns) | write_u32(f, kind) | write_u32(f, expected) |
		     write_u32(f, QUERY_TOKENS);
		if (!rc && fwrite(q, sizeof(int32_t), QUERY_TOKENS, f) != QUERY_TOKENS)
			rc = -EIO;
	}
out:
	if (f && fclose(f) && !rc)
		rc = -EIO;
	free(tok);
	free(q);
	return rc;
}

/* ---- main ---- */

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void usage(FILE *f)
{
	fprintf(f,
		"Usage: kvtier_index_populate --data DIR --tier PATH [OPTION]...\n"
		"Fills a kvtierd data directory (tmpfs tier at PATH) with synthetic blobs for\n"
		"the index_scale benchmark and writes its query file.\n\n"
		"  --data DIR          data directory (must be new or empty)\n"
		"  --tier PATH         tmpfs tier directory\n"
		"  --tier-size SIZE    tier capacity [64G]\n"
		"  --blobs N           blobs in all [1000000]\n"
		"  --namespaces K      [4]\n"
		"  --groups G          system prompts per namespace (Zipf popularity) [1024]\n"
		"  --deep D            long conversations (5 blobs each, 2K..32K tokens) [64]\n"
		"  --queries Q         32K-token queries to write [256]\n"
		"  --queries-out FILE  query file [DIR/../queries.bin]\n"
		"  --threads T         [2]\n"
		"  --block-size B      [64]\n"
		"  --seed S            [1]\n"
		"  --sync              keep LMDB's and the tier's syncs (slow; default: skipped)\n"
		"  --estimate          print the bytes the tier will hold (4 KiB pages) and exit\n");
}

/* Bytes of tmpfs pages the data set's files take, without writing anything. */
static uint64_t estimate_bytes(const struct dataset *ds)
{
	int32_t *tok = malloc(32768 * sizeof(int32_t));
	uint32_t len[DEEP_TURNS];
	uint64_t total = 0;
	unsigned ns;

	if (!tok)
		return 0;
	for (uint64_t d = 0; d < ds->p.deep; d++) {
		gen_deep(ds, d, &ns, tok, len);
		for (unsigned t = 0; t < DEEP_TURNS; t++)
			total += (slot_size(len[t]) + 4095) & ~(uint64_t)4095;
	}
	for (uint64_t c = 0; c < ds->n_convs; c++) {
		gen_conv(ds, c, &ns, tok, len, ds->turns[c], NULL);
		for (unsigned t = 0; t < ds->turns[c]; t++)
			total += (slot_size(len[t]) + 4095) & ~(uint64_t)4095;
	}
	free(tok);
	return total;
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{"data", required_argument, 0, 'd'},       {"tier", required_argument, 0, 't'},
		{"tier-size", required_argument, 0, 'S'},  {"blobs", required_argument, 0, 'n'},
		{"namespaces", required_argument, 0, 'k'}, {"groups", required_argument, 0, 'g'},
		{"deep", required_argument, 0, 'D'},       {"queries", required_argument, 0, 'q'},
		{"queries-out", required_argument, 0, 'o'}, {"threads", required_argument, 0, 'T'},
		{"block-size", required_argument, 0, 'b'}, {"seed", required_argument, 0, 's'},
		{"sync", no_argument, 0, 'y'},             {"estimate", no_argument, 0, 'e'},
		{"help", no_argument, 0, 'h'},             {0, 0, 0, 0}};
	struct params p = {.tier_size = 64ull << 30, .blobs = 1000000, .namespaces = 4,
			   .groups = 1024, .deep = 64, .queries = 256, .threads = 2, .block = 64,
			   .seed = 1};
	struct store_config cfg;
	struct dataset ds;
	struct store *s = NULL;
	struct worker *w = NULL;
	char err[1024] = "", qpath[4200];
	int c, estimate = 0, rc = 1;
	double t0, last;

	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 'd': p.data = optarg; break;
		case 't': p.tier = optarg; break;
		case 'S':
			if (options_parse_size(optarg, &p.tier_size))
				goto bad;
			break;
		case 'n': p.blobs = strtoull(optarg, NULL, 10); break;
		case 'k': p.namespaces = (unsigned)strtoul(optarg, NULL, 10); break;
		case 'g': p.groups = (unsigned)strtoul(optarg, NULL, 10); break;
		case 'D': p.deep = (unsigned)strtoul(optarg, NULL, 10); break;
		case 'q': p.queries = (unsigned)strtoul(optarg, NULL, 10); break;
		case 'o': p.queries_out = optarg; break;
		case 'T': p.threads = (unsigned)strtoul(optarg, NULL, 10); break;
		case 'b': p.block = (unsigned)strtoul(optarg, NULL, 10); break;
		case 's': p.seed = strtoull(optarg, NULL, 10); break;
		case 'y': g_sync = 1; break;
		case 'e': estimate = 1; break;
		case 'h': usage(stdout); return 0;
		default: goto bad;
		}
	}
	if (!p.data || !p.tier || !p.namespaces || !p.groups || !p.threads || p.threads > 64 ||
	    p.block < 16)
		goto bad;
	if (dataset_init(&ds, &p)) {
		fprintf(stderr, "kvtier_index_populate: out of memory\n");
		return 1;
	}
	if (estimate) {
		printf("%" PRIu64 "\n", estimate_bytes(&ds));
		return 0;
	}
	if (p.queries_out)
		snprintf(qpath, sizeof(qpath), "%s", p.queries_out);
	else
		snprintf(qpath, sizeof(qpath), "%s/../queries.bin", p.data);

	log_threshold = LOG_WARN; /* one info line per put would cost more than the put */
	memset(&cfg, 0, sizeof(cfg));
	snprintf(cfg.data_dir, sizeof(cfg.data_dir), "%s", p.data);
	snprintf(cfg.tiers[0].kind, sizeof(cfg.tiers[0].kind), "tmpfs");
	snprintf(cfg.tiers[0].path, sizeof(cfg.tiers[0].path), "%s", p.tier);
	cfg.tiers[0].capacity = p.tier_size;
	cfg.n_tiers = 1;
	cfg.block_size = p.block;
	cfg.supersede = 0;
	cfg.max_blob_bytes = 1ull << 30;
	cfg.lease_default_s = 300;
	cfg.lease_max_s = 3600;
	cfg.high_watermark = 0.9;
	cfg.low_watermark = 0.75;
	cfg.compress_min_saving = 0.10;
	cfg.shuffle = 2;
	cfg.assumed_prefill_tps = 500;
	cfg.io_depth = 8;
	cfg.io_request_bytes = 1u << 20;
	rc = store_open(&cfg, &s, err, sizeof(err));
	if (rc) {
		fprintf(stderr, "kvtier_index_populate: store_open: %s\n",
			err[0] ? err : kvtier_strerror(rc));
		return 1;
	}
	w = calloc(p.threads, sizeof(*w));
	if (!w) {
		rc = -ENOMEM;
		goto out;
	}
	t0 = last = now_s();
	for (unsigned i = 0; i < p.threads; i++) {
		w[i] = (struct worker){.ds = &ds, .s = s, .id = i};
		if (pthread_create(&w[i].th, NULL, worker_main, &w[i])) {
			fprintf(stderr, "kvtier_index_populate: cannot start a thread\n");
			exit(1); /* running threads hold the store: no clean way back */
		}
	}
	for (;;) {
		uint64_t done = atomic_load(&g_done);
		int running = 0;

		for (unsigned i = 0; i < p.threads; i++) {
			if (!w[i].joined)
				w[i].joined = pthread_tryjoin_np(w[i].th, NULL) == 0;
			running |= !w[i].joined;
		}
		if (!running)
			break;
		if (now_s() - last >= 10) {
			last = now_s();
			fprintf(stderr, "populate: %" PRIu64 "/%" PRIu64 " blobs, %.0f/s\n", done,
				p.blobs, done / (last - t0));
		}
		usleep(100000);
	}
	rc = 0;
	for (unsigned i = 0; i < p.threads; i++) {
		if (w[i].rc) {
			fprintf(stderr, "kvtier_index_populate: put failed: %s: %s\n",
				kvtier_strerror(w[i].rc), w[i].err);
			rc = 1;
		}
	}
	if (!rc) {
		double dt = now_s() - t0;
		fprintf(stderr,
			"populate: %" PRIu64 " blobs (%" PRIu64 " deduplicated), %.1f MiB of slot files "
			"in %.1f s (%.0f puts/s)\n",
			(uint64_t)atomic_load(&g_done), (uint64_t)atomic_load(&g_dedup),
			atomic_load(&g_bytes) / 1048576.0, dt, atomic_load(&g_done) / dt);
		int q = write_queries(&ds, qpath);
		if (q) {
			fprintf(stderr, "kvtier_index_populate: writing %s: %s\n", qpath,
				strerror(-q));
			rc = 1;
		}
	}
out:
	t0 = now_s();
	store_close(s);
	if (!rc)
		fprintf(stderr, "populate: store closed in %.1f s\n", now_s() - t0);
	free(w);
	return rc ? 1 : 0;
bad:
	usage(stderr);
	return 2;
}
