/* kvload: many clients of one kvtierd running a mixed load, with byte checks.
 * Used by tests/integration/test_load.py, tests/integration/test_crash.py and
 * bench/scenarios/memory (one load client for the suite and the bench).
 *
 *   kvload run --socket S --work DIR --log DAEMON_LOG [options]
 *   kvload verify --socket S --work DIR --log DAEMON_LOG --record FILE
 *
 * run: --clients threads, each on its own connection (libkvtier), for
 * --seconds run a mix of put / lookup / get / stage+release / rm (35 / 15 /
 * 25 / 15 / 10 percent; --rm-pct moves rm's share to get). Puts are
 * version-2 slot files it writes itself, every one with tokens no other put
 * has (unless --extend-pct: a put that extends an earlier one, which the
 * daemon supersedes). Every acknowledged put is recorded with the SHA-256 of
 * the bytes sent; every fetched blob and every staged file is hashed and
 * compared with it. At the end, every NOT_FOUND of an acknowledged blob is
 * matched with the daemon's log: an event=evict, event=supersede or
 * event=delete line naming the blob (or an rm of this run) explains it;
 * anything else is an unexplained loss.
 * With --pid, samples the daemon's RssAnon, VmHWM, fds and threads every
 * second (and for --idle seconds after the load); the run stops early when
 * that process is gone (the kill -9 rounds), and --allow-disconnect makes
 * the errors of a daemon killed under the load expected.
 * With --record FILE, appends "put BLOB SHA256 SIZE" for every acknowledged
 * put and "rm BLOB" for every Delete sent (before it is sent).
 *
 * verify: fetches every blob of the record FILE(s) that was not removed by an
 * rm and compares its SHA-256: counts ok, corrupt (bytes differ, or DATA_LOSS),
 * evicted (NOT_FOUND with a log line naming it) and lost (NOT_FOUND without).
 *
 * Output: figures as text on stdout, then one line "json {...}". Exit 0 when
 * there were 0 byte mismatches, 0 unexplained NOT_FOUND (0 lost, 0 corrupt)
 * and 0 unexpected errors; 1 otherwise; 2 for a usage or setup error.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "kvtier.h"

#define SHA_LEN 32
#define N_LAYER 8
#define ROW_BYTES 512           /* 8 KiB of K and V per token: 64..320 tokens, 0.5-2.5 MiB */
#define MAX_TOKENS 4096
#define RECENT 64               /* get/stage/rm pick among the last puts half of the time */

enum op { OP_PUT, OP_LOOKUP, OP_GET, OP_STAGE, OP_RM, OP_COUNT };
static const char *op_name[OP_COUNT] = {"put", "lookup", "get", "stage", "rm"};

struct blob {
	char id[KVTIER_BLOB_ID_LEN + 1];
	uint8_t sha[SHA_LEN];
	uint64_t size;
	int32_t *tokens;        /* NULL in verify mode */
	uint32_t n_tokens;
	int removed;            /* an rm of ours was sent */
	int notfound;           /* a get / stage / rm of it answered NOT_FOUND */
};

static struct {
	const char *socket, *work, *log, *slot_dir, *record, *ns;
	unsigned clients, seconds, idle, min_tokens, max_tokens, extend_pct, rm_pct, seed;
	int pid, allow_disconnect;
} opt = {.ns = "load", .clients = 64, .seconds = 15, .min_tokens = 64, .max_tokens = 320,
	 .rm_pct = 10, .seed = 1};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct blob *blobs;      /* acknowledged puts, in order */
static size_t n_blobs, cap_blobs;
static atomic_int stop;
static atomic_ullong ok[OP_COUNT], notfound[OP_COUNT], full[OP_COUNT], failed[OP_COUNT];
static atomic_ullong mismatches, corrupt, lookup_hits, lookup_misses, superseded_acks;
static atomic_ullong disconnects;
static char first_error[512];

struct sample {
	long rss_anon_kib, hwm_kib, threads, fds;
};
static struct sample peak, last;
static long idle_rss_anon_kib = -1;

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void note_error(const char *fmt, ...)
{
	va_list ap;

	pthread_mutex_lock(&lock);
	if (!first_error[0]) {
		va_start(ap, fmt);
		vsnprintf(first_error, sizeof(first_error), fmt, ap);
		va_end(ap);
	}
	pthread_mutex_unlock(&lock);
}

static uint64_t rng_next(uint64_t *s)
{
	/* splitmix64: reproducible from --seed, no shared state between threads */
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static void hex_of(const uint8_t *b, size_t n, char *out)
{
	for (size_t i = 0; i < n; i++)
		sprintf(out + 2 * i, "%02x", b[i]);
}

/* ---- the daemon's log: which blob ids it says it removed ---- */

static char (*explained)[KVTIER_BLOB_ID_LEN + 1];
static size_t n_explained;
static unsigned long long log_evict, log_supersede, log_delete;

static int cmp_id(const void *a, const void *b)
{
	return memcmp(a, b, KVTIER_BLOB_ID_LEN);
}

/* Reads every "event=evict|supersede|delete blob=ID" line of the log. */
static int log_load(void)
{
	static const char *events[] = {"event=evict ", "event=supersede ", "event=delete "};
	char line[4096];
	size_t cap = 0;
	FILE *f;

	free(explained);
	explained = NULL;
	n_explained = 0;
	log_evict = log_supersede = log_delete = 0;
	f = fopen(opt.log, "r");
	if (!f) {
		fprintf(stderr, "kvload: cannot read the daemon log %s: %s\n", opt.log,
			strerror(errno));
		return -1;
	}
	while (fgets(line, sizeof(line), f)) {
		int ev = -1;
		for (int i = 0; i < 3; i++)
			if (strstr(line, events[i]))
				ev = i;
		if (ev < 0)
			continue;
		const char *b = strstr(line, " blob=");
		if (!b || strlen(b + 6) < KVTIER_BLOB_ID_LEN)
			continue;
		if (n_explained == cap) {
			cap = cap ? 2 * cap : 1024;
			void *v = realloc(explained, cap * sizeof(*explained));
			if (!v) {
				fclose(f);
				return -1;
			}
			explained = v;
		}
		memcpy(explained[n_explained], b + 6, KVTIER_BLOB_ID_LEN);
		explained[n_explained++][KVTIER_BLOB_ID_LEN] = 0;
		*(ev == 0 ? &log_evict : ev == 1 ? &log_supersede : &log_delete) += 1;
	}
	fclose(f);
	if (n_explained)
		qsort(explained, n_explained, sizeof(*explained), cmp_id);
	return 0;
}

static int log_explains(const char *id)
{
	return n_explained && bsearch(id, explained, n_explained, sizeof(*explained), cmp_id);
}

/* ---- the daemon's resources (/proc/PID) ---- */

static int sample_take(struct sample *s)
{
	char path[64], line[256];
	FILE *f;
	DIR *d;
	struct dirent *e;

	memset(s, 0, sizeof(*s));
	snprintf(path, sizeof(path), "/proc/%d/status", opt.pid);
	f = fopen(path, "r");
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f)) {
		sscanf(line, "RssAnon: %ld", &s->rss_anon_kib);
		sscanf(line, "VmHWM: %ld", &s->hwm_kib);
		sscanf(line, "Threads: %ld", &s->threads);
		if (strncmp(line, "State:", 6) == 0 && strchr(line, 'Z'))
			s->threads = 0;     /* a zombie: gone */
	}
	fclose(f);
	if (!s->threads)
		return -1;
	snprintf(path, sizeof(path), "/proc/%d/fd", opt.pid);
	d = opendir(path);
	if (d) {
		while ((e = readdir(d)))
			if (e->d_name[0] != '.')
				s->fds++;
		closedir(d);
	}
	return 0;
}

static void sample_fold(const struct sample *s)
{
	last = *s;
	if (s->rss_anon_kib > peak.rss_anon_kib)
		peak.rss_anon_kib = s->rss_anon_kib;
	if (s->hwm_kib > peak.hwm_kib)
		peak.hwm_kib = s->hwm_kib;
	if (s->threads > peak.threads)
		peak.threads = s->threads;
	if (s->fds > peak.fds)
		peak.fds = s->fds;
}

/* ---- one client ---- */

struct client {
	unsigned no;
	uint64_t rng;
	kvtier_client *c;
	char src[4096];
	int32_t tokens[MAX_TOKENS];
	uint32_t n_last;             /* tokens of this client's last acknowledged put */
	int32_t last[MAX_TOKENS];
	unsigned long seq;
	uint8_t *chunk;
};

static int is_disconnect(int rc)
{
	return rc == KVTIER_E_UNAVAILABLE || rc == KVTIER_E_TIMEOUT || rc == KVTIER_E_INTERNAL ||
	       rc == -ECANCELED || rc == -EPIPE || rc == -ECONNRESET;
}

/* Counts a failed call: NOT_FOUND and RESOURCE_EXHAUSTED are answers the
 * load expects; anything else is an error (or a disconnect, when expected). */
static void count_fail(struct client *cl, enum op op, int rc, const char *blob)
{
	if (rc == KVTIER_E_NOTFOUND) {
		atomic_fetch_add(&notfound[op], 1);
		return;
	}
	if (rc == KVTIER_E_FULL) {
		atomic_fetch_add(&full[op], 1);
		return;
	}
	if (rc == KVTIER_E_CORRUPT) {
		atomic_fetch_add(&corrupt, 1);
		note_error("%s %s: DATA_LOSS: %s", op_name[op], blob ? blob : "",
			   kvtier_errmsg(cl->c));
		return;
	}
	if (opt.allow_disconnect && is_disconnect(rc)) {
		atomic_fetch_add(&disconnects, 1);
		return;
	}
	atomic_fetch_add(&failed[op], 1);
	note_error("%s %s: %s: %s", op_name[op], blob ? blob : "", kvtier_status_name(rc),
		   kvtier_errmsg(cl->c));
}

static int write_all(int fd, const void *p, size_t n, EVP_MD_CTX *md)
{
	const uint8_t *b = p;

	EVP_DigestUpdate(md, p, n);
	while (n) {
		ssize_t w = write(fd, b, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		b += w;
		n -= (size_t)w;
	}
	return 0;
}

/* Writes a version-2 slot file (tests/integration/harness.py make_slot's
 * layout) of the tokens in cl->tokens to cl->src; its SHA-256 into sha. */
static int slot_write(struct client *cl, uint32_t n, uint8_t *sha, uint64_t *size)
{
	EVP_MD_CTX *md = EVP_MD_CTX_new();
	uint32_t hdr[3] = {0x67677371u, 2, n};
	int rc = -EIO, fd;
	int compressible = (int)(rng_next(&cl->rng) & 1);

	if (!md)
		return -ENOMEM;
	EVP_DigestInit_ex(md, EVP_sha256(), NULL);
	fd = open(cl->src, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (fd < 0) {
		rc = -errno;
		goto out;
	}
	*size = 0;
#define W(p, len)                                                \
	do {                                                     \
		if ((rc = write_all(fd, (p), (len), md)))        \
			goto out;                                \
		*size += (len);                                  \
	} while (0)
	W(hdr, sizeof(hdr));
	W(cl->tokens, 4 * (size_t)n);
	W(&n, 4);
	for (uint32_t i = 0; i < n; i++) {
		int32_t cell[2] = {(int32_t)i, 0};
		W(cell, sizeof(cell));
	}
	uint32_t vt[2] = {0, N_LAYER};
	W(vt, sizeof(vt));
	for (int kv = 0; kv < 2; kv++) {
		for (int l = 0; l < N_LAYER; l++) {
			struct __attribute__((packed)) {
				int32_t type;
				uint64_t row;
			} lh = {1, ROW_BYTES};
			W(&lh, sizeof(lh));
			size_t left = (size_t)n * ROW_BYTES;
			while (left) {
				size_t k = left < 65536 ? left : 65536;
				uint64_t *q = (uint64_t *)cl->chunk;
				for (size_t j = 0; j < k / 8; j++)
					q[j] = compressible ? (j & 0xff) * 0x0101010101010101ull ^
								      (rng_next(&cl->rng) & 0xff)
							    : rng_next(&cl->rng);
				W(cl->chunk, k);
				left -= k;
			}
		}
	}
#undef W
	EVP_DigestFinal_ex(md, sha, NULL);
	rc = 0;
out:
	if (fd >= 0)
		close(fd);
	EVP_MD_CTX_free(md);
	return rc;
}

static void do_put(struct client *cl)
{
	struct kvtier_put_result res;
	uint8_t sha[SHA_LEN];
	uint64_t size = 0;
	uint32_t n, k = 0;
	int rc;

	n = opt.min_tokens + (uint32_t)(rng_next(&cl->rng) % (opt.max_tokens - opt.min_tokens + 1));
	if (cl->n_last && cl->n_last + 64 <= MAX_TOKENS &&
	    rng_next(&cl->rng) % 100 < opt.extend_pct) {
		/* Extends this client's last put: the daemon supersedes that one. */
		memcpy(cl->tokens, cl->last, 4 * (size_t)cl->n_last);
		k = cl->n_last;
		if (n < k + 64)
			n = k + 64;
		if (n > MAX_TOKENS)
			n = MAX_TOKENS;
	} else {
		/* A first block no other put has: client, sequence, seed. */
		cl->tokens[0] = (int32_t)(cl->no + 1);
		cl->tokens[1] = (int32_t)(cl->seq++ & 0x7fffffff);
		cl->tokens[2] = (int32_t)(opt.seed & 0x7fffffff);
		k = 3;
	}
	for (uint32_t i = k; i < n; i++)
		cl->tokens[i] = (int32_t)(1 + rng_next(&cl->rng) % 32000);
	rc = slot_write(cl, n, sha, &size);
	if (rc) {
		atomic_fetch_add(&failed[OP_PUT], 1);
		note_error("writing %s: %s", cl->src, strerror(-rc));
		return;
	}
	rc = kvtier_put_file(cl->c, opt.ns, cl->src, &res);
	if (rc) {
		count_fail(cl, OP_PUT, rc, NULL);
		return;
	}
	atomic_fetch_add(&ok[OP_PUT], 1);
	atomic_fetch_add(&superseded_acks, res.n_superseded);
	memcpy(cl->last, cl->tokens, 4 * (size_t)n);
	cl->n_last = n;
	int32_t *t = malloc(4 * (size_t)n);
	pthread_mutex_lock(&lock);
	if (n_blobs == cap_blobs) {
		size_t cap = cap_blobs ? 2 * cap_blobs : 1024;
		void *v = realloc(blobs, cap * sizeof(*blobs));
		if (!v) {
			pthread_mutex_unlock(&lock);
			free(t);
			return;
		}
		blobs = v;
		cap_blobs = cap;
	}
	struct blob *b = &blobs[n_blobs++];
	memset(b, 0, sizeof(*b));
	memcpy(b->id, res.blob, sizeof(b->id));
	memcpy(b->sha, sha, SHA_LEN);
	b->size = size;
	b->tokens = t;
	b->n_tokens = t ? n : 0;
	if (t)
		memcpy(t, cl->tokens, 4 * (size_t)n);
	pthread_mutex_unlock(&lock);
}

/* A random acknowledged blob (index), recent ones half of the time; -1 when
 * there is none yet. */
static long pick(struct client *cl)
{
	size_t n;
	long i;

	pthread_mutex_lock(&lock);
	n = n_blobs;
	pthread_mutex_unlock(&lock);
	if (!n)
		return -1;
	if (rng_next(&cl->rng) & 1 && n > RECENT)
		i = (long)(n - RECENT + rng_next(&cl->rng) % RECENT);
	else
		i = (long)(rng_next(&cl->rng) % n);
	return i;
}

static void blob_copy(long i, struct blob *out)
{
	pthread_mutex_lock(&lock);
	*out = blobs[i];
	pthread_mutex_unlock(&lock);
}

static void mark_notfound(long i)
{
	pthread_mutex_lock(&lock);
	blobs[i].notfound = 1;
	pthread_mutex_unlock(&lock);
}

struct hasher {
	EVP_MD_CTX *md;
	uint64_t n;
};

static int hash_cb(void *ctx, int part, const void *buf, size_t len)
{
	struct hasher *h = ctx;

	if (part == KVTIER_PART_SLOT && buf) {
		EVP_DigestUpdate(h->md, buf, len);
		h->n += len;
	}
	return 0;
}

/* Fetches blob id and compares it with sha: 0 equal, 1 differs, or the
 * client's error code. */
static int fetch_compare(kvtier_client *c, const char *id, const uint8_t *sha, uint64_t size)
{
	struct hasher h = {EVP_MD_CTX_new(), 0};
	uint8_t got[SHA_LEN];
	int rc;

	if (!h.md)
		return -ENOMEM;
	EVP_DigestInit_ex(h.md, EVP_sha256(), NULL);
	rc = kvtier_fetch(c, id, hash_cb, &h);
	if (rc == 0) {
		EVP_DigestFinal_ex(h.md, got, NULL);
		rc = h.n != size || memcmp(got, sha, SHA_LEN) ? 1 : 0;
	}
	EVP_MD_CTX_free(h.md);
	return rc;
}

static int file_sha(const char *path, uint8_t *sha, uint64_t *size, uint8_t *buf, size_t cap)
{
	EVP_MD_CTX *md = EVP_MD_CTX_new();
	int fd = open(path, O_RDONLY | O_CLOEXEC), rc = 0;
	ssize_t r;

	*size = 0;
	if (!md || fd < 0) {
		rc = fd < 0 ? -errno : -ENOMEM;
		goto out;
	}
	EVP_DigestInit_ex(md, EVP_sha256(), NULL);
	while ((r = read(fd, buf, cap)) > 0) {
		EVP_DigestUpdate(md, buf, (size_t)r);
		*size += (uint64_t)r;
	}
	if (r < 0)
		rc = -errno;
	else
		EVP_DigestFinal_ex(md, sha, NULL);
out:
	if (fd >= 0)
		close(fd);
	EVP_MD_CTX_free(md);
	return rc;
}

static void do_get(struct client *cl)
{
	struct blob b;
	long i = pick(cl);
	int rc;

	if (i < 0)
		return;
	blob_copy(i, &b);
	rc = fetch_compare(cl->c, b.id, b.sha, b.size);
	if (rc == 1) {
		atomic_fetch_add(&mismatches, 1);
		note_error("get %s: the bytes differ from what was put", b.id);
	} else if (rc == 0) {
		atomic_fetch_add(&ok[OP_GET], 1);
	} else {
		if (rc == KVTIER_E_NOTFOUND)
			mark_notfound(i);
		count_fail(cl, OP_GET, rc, b.id);
	}
}

static void do_stage(struct client *cl)
{
	struct kvtier_stage st;
	struct blob b;
	uint8_t sha[SHA_LEN];
	uint64_t size;
	long i = pick(cl);
	int rc;

	if (i < 0 || !opt.slot_dir)
		return;
	blob_copy(i, &b);
	rc = kvtier_stage(cl->c, b.id, opt.slot_dir, 60, &st);
	if (rc) {
		if (rc == KVTIER_E_NOTFOUND)
			mark_notfound(i);
		count_fail(cl, OP_STAGE, rc, b.id);
		return;
	}
	rc = file_sha(st.path, sha, &size, cl->chunk, 65536);
	if (rc) {
		atomic_fetch_add(&failed[OP_STAGE], 1);
		note_error("reading staged %s: %s", st.path, strerror(-rc));
	} else if (size != b.size || memcmp(sha, b.sha, SHA_LEN)) {
		atomic_fetch_add(&mismatches, 1);
		note_error("stage %s: the staged file %s differs from what was put", b.id, st.path);
	} else {
		atomic_fetch_add(&ok[OP_STAGE], 1);
	}
	rc = kvtier_release(cl->c, st.lease);
	if (rc)
		count_fail(cl, OP_STAGE, rc, b.id);
}

static void do_lookup(struct client *cl)
{
	struct kvtier_match m;
	struct blob b;
	long i = pick(cl);
	int rc;

	if (i < 0)
		return;
	blob_copy(i, &b);
	if (!b.tokens)
		return;
	rc = kvtier_lookup(cl->c, opt.ns, b.tokens, b.n_tokens, &m);
	if (rc) {
		count_fail(cl, OP_LOOKUP, rc, NULL);
		return;
	}
	atomic_fetch_add(&ok[OP_LOOKUP], 1);
	atomic_fetch_add(m.found ? &lookup_hits : &lookup_misses, 1);
}

static FILE *record_f;

static void do_rm(struct client *cl)
{
	struct blob b;
	long i = pick(cl);
	int rc;

	if (i < 0)
		return;
	pthread_mutex_lock(&lock);
	blobs[i].removed = 1; /* before the call: a kill can cut it after the commit */
	b = blobs[i];
	if (record_f) {
		fprintf(record_f, "rm %s\n", b.id);
		fflush(record_f);
	}
	pthread_mutex_unlock(&lock);
	rc = kvtier_delete(cl->c, b.id);
	if (rc == 0)
		atomic_fetch_add(&ok[OP_RM], 1);
	else
		count_fail(cl, OP_RM, rc, b.id);
}

static void *client_main(void *arg)
{
	struct client *cl = arg;
	struct kvtier_options o = {NULL, 30000};
	char addr[4200];

	snprintf(addr, sizeof(addr), "unix:%s", opt.socket);
	if (kvtier_open(&cl->c, addr, &o)) {
		note_error("client %u: kvtier_open failed", cl->no);
		return NULL;
	}
	while (!atomic_load(&stop)) {
		unsigned r = (unsigned)(rng_next(&cl->rng) % 100);
		/* put 35, lookup 15, get 25 (+ 10 - rm), stage 15, rm --rm-pct (10) */
		if (r < 35)
			do_put(cl);
		else if (r < 50)
			do_lookup(cl);
		else if (r < 75)
			do_get(cl);
		else if (r < 90)
			do_stage(cl);
		else if (r < 100 - opt.rm_pct)
			do_get(cl);
		else
			do_rm(cl);
	}
	kvtier_close(cl->c);
	unlink(cl->src);
	return NULL;
}

/* ---- run and verify ---- */

static int record_put(const struct blob *b)
{
	char sha[2 * SHA_LEN + 1];

	hex_of(b->sha, SHA_LEN, sha);
	return fprintf(record_f, "put %s %s %" PRIu64 "\n", b->id, sha, b->size) < 0 ? -1 : 0;
}

static unsigned long long sum(atomic_ullong *a)
{
	unsigned long long s = 0;
	for (int i = 0; i < OP_COUNT; i++)
		s += a[i];
	return s;
}

static int cmd_run(void)
{
	struct client *cl = calloc(opt.clients, sizeof(*cl));
	pthread_t *th = calloc(opt.clients, sizeof(*th));
	struct sample s;
	double t0, t1, end;
	unsigned long long nf_acked = 0, nf_log = 0, nf_rm = 0, unexplained = 0;
	int daemon_gone = 0, rc = 0;

	if (!cl || !th)
		return 2;
	if (opt.record && !(record_f = fopen(opt.record, "a"))) {
		fprintf(stderr, "kvload: cannot open %s: %s\n", opt.record, strerror(errno));
		return 2;
	}
	if (opt.pid && sample_take(&s) == 0)
		sample_fold(&s);
	t0 = now_s();
	for (unsigned i = 0; i < opt.clients; i++) {
		cl[i].no = i;
		cl[i].rng = opt.seed * 0x100000001b3ull + i;
		cl[i].chunk = malloc(65536);
		snprintf(cl[i].src, sizeof(cl[i].src), "%s/kvload-%u.bin", opt.work, i);
		if (!cl[i].chunk || pthread_create(&th[i], NULL, client_main, &cl[i])) {
			fprintf(stderr, "kvload: cannot start client %u\n", i);
			atomic_store(&stop, 1);
			opt.clients = i;
			rc = 2;
			break;
		}
	}
	end = t0 + opt.seconds;
	while (!atomic_load(&stop) && now_s() < end) {
		usleep(200000);
		if (opt.pid) {
			static double next;
			if (now_s() >= next) {
				next = now_s() + 1.0;
				if (sample_take(&s) == 0) {
					sample_fold(&s);
				} else {
					daemon_gone = 1;
					break;
				}
			}
		}
	}
	atomic_store(&stop, 1);
	for (unsigned i = 0; i < opt.clients; i++) {
		pthread_join(th[i], NULL);
		free(cl[i].chunk);
	}
	t1 = now_s();
	if (opt.pid && !daemon_gone) {
		if (sample_take(&s) == 0)
			sample_fold(&s);
		for (unsigned i = 0; i < opt.idle; i++) {
			sleep(1);
			if (sample_take(&s) == 0)
				sample_fold(&s);
		}
		if (sample_take(&s) == 0) {
			sample_fold(&s);
			idle_rss_anon_kib = s.rss_anon_kib;
		}
	}
	if (log_load())
		return 2;
	for (size_t i = 0; i < n_blobs; i++) {
		struct blob *b = &blobs[i];
		if (record_f && record_put(b))
			rc = 2;
		if (!b->notfound)
			continue;
		nf_acked++;
		if (log_explains(b->id))
			nf_log++;
		else if (b->removed)
			nf_rm++;
		else {
			unexplained++;
			if (unexplained <= 5)
				printf("unexplained NOT_FOUND: blob %s (acknowledged put, no "
				       "event=evict/supersede/delete line, no rm of ours)\n",
				       b->id);
		}
	}
	if (record_f && fclose(record_f))
		rc = 2;
	printf("clients=%u seconds=%.1f ops=%llu%s\n", opt.clients, t1 - t0,
	       sum(ok) + sum(notfound) + sum(full) + sum(failed) + mismatches + corrupt,
	       daemon_gone ? " (the daemon went away: run cut short)" : "");
	printf("put ok=%llu resource_exhausted=%llu superseded_by_acked=%llu\n", ok[OP_PUT],
	       full[OP_PUT], superseded_acks);
	printf("lookup hit=%llu miss=%llu\n", lookup_hits, lookup_misses);
	printf("get ok=%llu not_found=%llu\n", ok[OP_GET], notfound[OP_GET]);
	printf("stage ok=%llu not_found=%llu resource_exhausted=%llu (each ok one released)\n",
	       ok[OP_STAGE], notfound[OP_STAGE], full[OP_STAGE]);
	printf("rm ok=%llu not_found=%llu\n", ok[OP_RM], notfound[OP_RM]);
	printf("byte_mismatches=%llu data_loss=%llu errors=%llu disconnects=%llu\n", mismatches,
	       corrupt, sum(failed), disconnects);
	printf("not_found_blobs=%llu explained_by_log=%llu explained_by_own_rm=%llu "
	       "unexplained=%llu (log: evict=%llu supersede=%llu delete=%llu)\n",
	       nf_acked, nf_log, nf_rm, unexplained, log_evict, log_supersede, log_delete);
	if (first_error[0])
		printf("first error: %s\n", first_error);
	if (opt.pid)
		printf("daemon pid=%d peak RssAnon=%.1f MiB VmHWM=%.1f MiB fds=%ld threads=%ld; "
		       "after %u s idle RssAnon=%.1f MiB\n",
		       opt.pid, peak.rss_anon_kib / 1024.0, peak.hwm_kib / 1024.0, peak.fds,
		       peak.threads, opt.idle, idle_rss_anon_kib / 1024.0);
	printf("json {\"clients\": %u, \"seconds\": %.1f, \"put_ok\": %llu, \"put_full\": %llu, "
	       "\"lookup_hit\": %llu, \"lookup_miss\": %llu, \"get_ok\": %llu, "
	       "\"get_not_found\": %llu, \"stage_ok\": %llu, \"stage_not_found\": %llu, "
	       "\"rm_ok\": %llu, \"rm_not_found\": %llu, \"mismatches\": %llu, "
	       "\"data_loss\": %llu, \"errors\": %llu, \"disconnects\": %llu, "
	       "\"not_found_blobs\": %llu, \"unexplained\": %llu, \"log_evict\": %llu, "
	       "\"log_supersede\": %llu, \"log_delete\": %llu, \"daemon_gone\": %d, "
	       "\"peak_rss_anon_kib\": %ld, \"peak_hwm_kib\": %ld, \"peak_fds\": %ld, "
	       "\"peak_threads\": %ld, \"idle_rss_anon_kib\": %ld}\n",
	       opt.clients, t1 - t0, ok[OP_PUT], full[OP_PUT], lookup_hits, lookup_misses,
	       ok[OP_GET], notfound[OP_GET], ok[OP_STAGE], notfound[OP_STAGE], ok[OP_RM],
	       notfound[OP_RM], mismatches, corrupt, sum(failed), disconnects, nf_acked,
	       unexplained, log_evict, log_supersede, log_delete, daemon_gone,
	       peak.rss_anon_kib, peak.hwm_kib, peak.fds, peak.threads, idle_rss_anon_kib);
	for (size_t i = 0; i < n_blobs; i++)
		free(blobs[i].tokens);
	free(blobs);
	free(explained);
	free(cl);
	free(th);
	if (rc)
		return rc;
	return mismatches || corrupt || unexplained || sum(failed) ? 1 : 0;
}

static int unhex(const char *s, uint8_t *out, size_t n)
{
	for (size_t i = 0; i < n; i++) {
		unsigned v;
		if (sscanf(s + 2 * i, "%2x", &v) != 1)
			return -1;
		out[i] = (uint8_t)v;
	}
	return 0;
}

static int cmd_verify(void)
{
	char line[512], addr[4200];
	struct kvtier_options o = {NULL, 30000};
	kvtier_client *c;
	unsigned long long n_ok = 0, n_evicted = 0, n_lost = 0, n_corrupt = 0, n_removed = 0;
	unsigned long long n_err = 0;
	FILE *f = fopen(opt.record, "r");

	if (!f) {
		fprintf(stderr, "kvload: cannot read %s: %s\n", opt.record, strerror(errno));
		return 2;
	}
	while (fgets(line, sizeof(line), f)) {
		char id[128], sha[128];
		unsigned long long size;
		struct blob *b = NULL;

		if (sscanf(line, "put %127s %127s %llu", id, sha, &size) == 3 &&
		    strlen(id) == KVTIER_BLOB_ID_LEN) {
			if (n_blobs == cap_blobs) {
				cap_blobs = cap_blobs ? 2 * cap_blobs : 1024;
				blobs = realloc(blobs, cap_blobs * sizeof(*blobs));
				if (!blobs)
					return 2;
			}
			b = &blobs[n_blobs++];
			memset(b, 0, sizeof(*b));
			memcpy(b->id, id, sizeof(b->id));
			b->size = size;
			if (unhex(sha, b->sha, SHA_LEN))
				return 2;
		}
	}
	fclose(f);
	/* rm lines are written as the calls go, put lines at the end of a run:
	 * a second pass catches an rm written before its put. */
	f = fopen(opt.record, "r");
	while (f && fgets(line, sizeof(line), f)) {
		char id[128];
		if (sscanf(line, "rm %127s", id) == 1)
			for (size_t i = 0; i < n_blobs; i++)
				if (strcmp(blobs[i].id, id) == 0)
					blobs[i].removed = 1;
	}
	if (f)
		fclose(f);
	snprintf(addr, sizeof(addr), "unix:%s", opt.socket);
	if (kvtier_open(&c, addr, &o))
		return 2;
	for (size_t i = 0; i < n_blobs; i++) {
		struct blob *b = &blobs[i];
		int dup = 0;
		for (size_t j = 0; j < i && !dup; j++)
			dup = strcmp(blobs[j].id, b->id) == 0;
		if (dup)
			continue;
		if (b->removed) {
			n_removed++;
			continue;
		}
		int rc = fetch_compare(c, b->id, b->sha, b->size);
		if (rc == 0) {
			n_ok++;
		} else if (rc == 1 || rc == KVTIER_E_CORRUPT) {
			n_corrupt++;
			printf("corrupt: blob %s (%s)\n", b->id,
			       rc == 1 ? "bytes differ from what was put" : kvtier_errmsg(c));
		} else if (rc == KVTIER_E_NOTFOUND) {
			b->notfound = 1; /* judged below, with the log as it is after the fetches */
		} else {
			n_err++;
			printf("error: blob %s: %s: %s\n", b->id, kvtier_status_name(rc),
			       kvtier_errmsg(c));
		}
	}
	kvtier_close(c);
	/* The fetches themselves move blobs (a read promotes, which demotes or
	 * evicts others): read the log once they are done. */
	if (log_load())
		return 2;
	for (size_t i = 0; i < n_blobs; i++) {
		if (!blobs[i].notfound)
			continue;
		if (log_explains(blobs[i].id)) {
			n_evicted++;
		} else {
			n_lost++;
			printf("lost: blob %s (acknowledged put, NOT_FOUND, no "
			       "event=evict/supersede/delete line in %s)\n",
			       blobs[i].id, opt.log);
		}
	}
	free(explained);
	printf("verify acked=%zu ok=%llu evicted=%llu removed_by_rm=%llu lost=%llu corrupt=%llu "
	       "errors=%llu\n",
	       n_blobs, n_ok, n_evicted, n_removed, n_lost, n_corrupt, n_err);
	printf("json {\"acked\": %zu, \"ok\": %llu, \"evicted\": %llu, \"removed\": %llu, "
	       "\"lost\": %llu, \"corrupt\": %llu, \"errors\": %llu}\n",
	       n_blobs, n_ok, n_evicted, n_removed, n_lost, n_corrupt, n_err);
	free(blobs);
	return n_lost || n_corrupt || n_err ? 1 : 0;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: kvload run --socket PATH --work DIR --log DAEMON_LOG [--slot-dir DIR]\n"
		"              [--clients N] [--seconds S] [--ns NAME] [--tokens MIN-MAX]\n"
		"              [--extend-pct P] [--rm-pct P (0-10)] [--seed N] [--pid PID [--idle S]]\n"
		"              [--allow-disconnect] [--record FILE]\n"
		"       kvload verify --socket PATH --log DAEMON_LOG --record FILE\n");
}

int main(int argc, char **argv)
{
	int verify;

	if (argc < 2 || (strcmp(argv[1], "run") && strcmp(argv[1], "verify"))) {
		usage();
		return 2;
	}
	verify = strcmp(argv[1], "verify") == 0;
	for (int i = 2; i < argc; i++) {
		const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
		if (strcmp(a, "--allow-disconnect") == 0) {
			opt.allow_disconnect = 1;
			continue;
		}
		if (!v) {
			usage();
			return 2;
		}
		i++;
		if (!strcmp(a, "--socket"))
			opt.socket = v;
		else if (!strcmp(a, "--work"))
			opt.work = v;
		else if (!strcmp(a, "--log"))
			opt.log = v;
		else if (!strcmp(a, "--slot-dir"))
			opt.slot_dir = v;
		else if (!strcmp(a, "--record"))
			opt.record = v;
		else if (!strcmp(a, "--ns"))
			opt.ns = v;
		else if (!strcmp(a, "--clients"))
			opt.clients = (unsigned)atoi(v);
		else if (!strcmp(a, "--seconds"))
			opt.seconds = (unsigned)atoi(v);
		else if (!strcmp(a, "--idle"))
			opt.idle = (unsigned)atoi(v);
		else if (!strcmp(a, "--rm-pct"))
			opt.rm_pct = (unsigned)atoi(v);
		else if (!strcmp(a, "--extend-pct"))
			opt.extend_pct = (unsigned)atoi(v);
		else if (!strcmp(a, "--seed"))
			opt.seed = (unsigned)atoi(v);
		else if (!strcmp(a, "--pid"))
			opt.pid = atoi(v);
		else if (!strcmp(a, "--tokens")) {
			if (sscanf(v, "%u-%u", &opt.min_tokens, &opt.max_tokens) != 2) {
				usage();
				return 2;
			}
		} else {
			usage();
			return 2;
		}
	}
	if (!opt.socket || !opt.log || (verify ? !opt.record : !opt.work) || opt.clients < 1 ||
	    opt.clients > 1024 || opt.seconds > 3600 || opt.min_tokens < 64 ||
	    opt.max_tokens < opt.min_tokens || opt.max_tokens > MAX_TOKENS - 64 || opt.rm_pct > 10 ||
	    opt.extend_pct > 100) {
		usage();
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);
	setvbuf(stdout, NULL, _IOLBF, 0);
	return verify ? cmd_verify() : cmd_run();
}
