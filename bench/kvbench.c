/* kvbench.c: the measuring tool behind bench/run (DESIGN.md, "Performance,
 * and how it is measured"). Not part of the test suite.
 *
 * Each scenario subcommand measures kvtier and its reference in the same
 * process, alternating them run by run so that drift on a shared machine
 * hits both alike, checks what it measured (byte counts, and the bytes
 * themselves on an untimed first run), and prints one JSON result line per
 * figure on stdout (format: bench/README.md). Everything else goes to
 * stderr. It never starts a server: bench/run and the scenario scripts do,
 * and pass their addresses in.
 *
 *   kvbench mkslot PATH --size SIZE [--seed N]   write a v2 slot file
 *   kvbench freeport                             print a free loopback TCP port
 *   kvbench transfer [options]                   fetch and put of a blob vs raw
 *                                                socket copy, cat and Redis
 *   kvbench stage [options]                      Stage + Release latency
 *   kvbench disk-cold [options]                  cold disk-tier fetch vs fio
 *   kvbench fetch [options] BLOB                 fetch one blob --runs times (to
 *                                                profile a gap; no result line)
 *
 * Slot files are llama.cpp's version-2 layout (tests/integration/harness.py
 * make_slot): 16 layers of f16 K and V rows of 2048 bytes (64 KiB of KV per
 * token, the model DESIGN.md measured; smaller rows below 64 tokens), the
 * payload f16-like values from a counter-based generator, so any byte can be
 * recomputed: a received stream is verified against the generator without
 * keeping the file.
 *
 * It must never leave a process running: every child is waited for, and an
 * alarm() bounds the whole run.
 */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <arpa/inet.h>
#include <time.h>
#include <unistd.h>

#include <hiredis/hiredis.h>

#include "kvtier.h"
#include "options.h"

#define MiB (1024.0 * 1024.0)
#define BENCH_IO_CHUNK (1u << 20)      /* raw socket copy: 1 MiB write() and read() */
#define BENCH_WATCHDOG_S 1800          /* the whole kvbench run, at most */
#define BENCH_MAX_RUNS 100
#define SLOT_LAYERS 16
#define SLOT_ROW_BYTES 2048            /* per token per layer, K and V each */
#define SLOT_TYPE_F16 1
#define SLOT_MIN_TOKENS 64             /* kvtierd's default prefix block */

/* ---- small helpers ---- */

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	fputs("kvbench: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	exit(1);
}

static void note(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void note(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	fputs("kvbench: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void sleep_ms(unsigned ms)
{
	struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};

	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

/* "256M", "1G", "4096": bytes (K, M, G, T are powers of 1024). */
static uint64_t parse_size(const char *s)
{
	uint64_t v;

	if (options_parse_size(s, &v) || v == 0)
		die("bad size \"%s\" (expected e.g. 256M or 1G)", s);
	return v;
}

/* A human name of a size for scenario names: "1 MiB", "256 MiB", "1 GiB". */
static void size_name(char *out, size_t cap, uint64_t bytes)
{
	if (bytes >= (1ull << 30) && bytes % (1ull << 30) == 0)
		snprintf(out, cap, "%" PRIu64 " GiB", bytes >> 30);
	else if (bytes >= (1ull << 20))
		snprintf(out, cap, "%.0f MiB", (double)bytes / MiB);
	else
		snprintf(out, cap, "%" PRIu64 " B", bytes);
}

static int write_full(int fd, const void *buf, size_t n)
{
	const uint8_t *p = buf;

	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0)
			return -errno;
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

static char *read_first_line(const char *path)
{
	FILE *f = fopen(path, "r");
	char *line = NULL;
	size_t cap = 0;
	ssize_t n;

	if (!f)
		die("cannot open %s: %s", path, strerror(errno));
	n = getline(&line, &cap, f);
	fclose(f);
	if (n <= 0)
		die("%s is empty", path);
	while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
		line[--n] = '\0';
	return line;
}

static void *xmalloc(size_t n)
{
	void *p = malloc(n);

	if (!p)
		die("out of memory (%zu bytes)", n);
	return p;
}

/* ---- statistics and result lines ---- */

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

static double median(const double *v, int n)
{
	double s[BENCH_MAX_RUNS];

	if (n <= 0 || n > BENCH_MAX_RUNS)
		return NAN;
	memcpy(s, v, (size_t)n * sizeof(double));
	qsort(s, (size_t)n, sizeof(double), cmp_double);
	return n % 2 ? s[n / 2] : (s[n / 2 - 1] + s[n / 2]) / 2;
}

/* The q-quantile (0..1) of v[0..n), nearest rank. Sorts v. */
static double quantile_sort(double *v, int n, double q)
{
	int i;

	qsort(v, (size_t)n, sizeof(double), cmp_double);
	i = (int)ceil(q * n) - 1;
	if (i < 0)
		i = 0;
	if (i >= n)
		i = n - 1;
	return v[i];
}

static void minmax(const double *v, int n, double *lo, double *hi)
{
	*lo = INFINITY;
	*hi = -INFINITY;
	for (int i = 0; i < n; i++) {
		if (v[i] < *lo)
			*lo = v[i];
		if (v[i] > *hi)
			*hi = v[i];
	}
}

static void json_string(const char *s)
{
	putchar('"');
	for (; s && *s; s++) {
		if (*s == '"' || *s == '\\')
			printf("\\%c", *s);
		else if ((unsigned char)*s < 0x20)
			printf("\\u%04x", *s);
		else
			putchar(*s);
	}
	putchar('"');
}

static void json_number(double v)
{
	if (isnan(v) || isinf(v))
		fputs("null", stdout);
	else
		printf("%.6g", v);
}

/* One figure: kvtier's per-run values and the reference's (NULL: none). */
struct result {
	const char *scenario;
	const char *unit;            /* GB/s, ms, MiB, s, 1/s */
	int higher_is_better;
	const double *kv;            /* per run */
	const double *ref;           /* per run, or NULL */
	int runs;
	const char *reference_name;  /* NULL with no reference */
	const char *target;          /* "≥ 0.8 × ref", "≤ 1 ms", NULL: none */
	double target_ratio;         /* NAN: none */
	double target_abs;           /* NAN: none */
	const char *note;            /* NULL or a remark for the report */
};

static void emit(const struct result *r)
{
	double lo, hi;

	printf("{\"scenario\": ");
	json_string(r->scenario);
	printf(", \"unit\": ");
	json_string(r->unit);
	printf(", \"kvtier\": ");
	json_number(median(r->kv, r->runs));
	printf(", \"reference\": ");
	if (r->ref)
		json_number(median(r->ref, r->runs));
	else
		fputs("null", stdout);
	printf(", \"reference_name\": ");
	if (r->reference_name)
		json_string(r->reference_name);
	else
		fputs("null", stdout);
	printf(", \"higher_is_better\": %s, \"target\": ", r->higher_is_better ? "true" : "false");
	if (r->target)
		json_string(r->target);
	else
		fputs("null", stdout);
	printf(", \"target_ratio\": ");
	json_number(r->target_ratio);
	printf(", \"target_abs\": ");
	json_number(r->target_abs);
	minmax(r->kv, r->runs, &lo, &hi);
	printf(", \"runs\": %d, \"spread\": [", r->runs);
	json_number(lo);
	printf(", ");
	json_number(hi);
	printf("]");
	if (r->ref) {
		minmax(r->ref, r->runs, &lo, &hi);
		printf(", \"reference_spread\": [");
		json_number(lo);
		printf(", ");
		json_number(hi);
		printf("]");
	}
	if (r->note) {
		printf(", \"note\": ");
		json_string(r->note);
	}
	printf("}\n");
	fflush(stdout);
}

static double gbps(uint64_t bytes, double seconds)
{
	return (double)bytes / seconds / 1e9;
}

/* ---- slot files: llama.cpp v2 layout, f16-like payload ---- */

struct slot_shape {
	uint32_t n_tokens;
	uint32_t n_layer;
	uint64_t row_bytes; /* per token per layer, K and V each */
	uint64_t seed;
};

/* Produces the bytes of a slot file in order, or from any position. */
struct slotgen {
	struct slot_shape sh;
	uint8_t *head;      /* magic .. n_layer */
	size_t head_len;
	uint64_t payload;   /* bytes of rows per K or V block: n_tokens * row_bytes */
	uint64_t total;     /* file size */
	uint64_t pos;       /* next byte slotgen_read produces */
};

static uint64_t splitmix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ull;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
	return x ^ (x >> 31);
}

/* Four f16-like values from 64 random bits: random sign and mantissa, an
 * exponent of 12..14 (magnitudes 1/8 .. 1), like K/V activations. */
static uint64_t f16x4(uint64_t r)
{
	uint64_t x = r & 0x83ff83ff83ff83ffull;
	uint64_t a = (r >> 10) & 0x0001000100010001ull;
	uint64_t b = (r >> 11) & 0x0001000100010001ull;

	return x | ((0x000c000c000c000cull + a + b) << 10);
}

static uint64_t payload_word(const struct slotgen *g, uint64_t block, uint64_t word)
{
	return f16x4(splitmix64((g->sh.seed * 0x100000001b3ull) ^ (block << 44) ^ word));
}

static void put_le32(uint8_t *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static void put_le64(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

/* A shape of about `bytes` bytes. Below SLOT_MIN_TOKENS tokens of the
 * default model (the daemon refuses a file shorter than one prefix block),
 * the rows shrink instead: a smaller model with the same number of layers. */
static struct slot_shape slot_shape_of(uint64_t bytes, uint64_t seed)
{
	struct slot_shape sh = {.n_layer = SLOT_LAYERS, .row_bytes = SLOT_ROW_BYTES, .seed = seed};
	uint64_t per_token = 2ull * sh.n_layer * sh.row_bytes;

	sh.n_tokens = (uint32_t)((bytes + per_token / 2) / per_token);
	if (sh.n_tokens < SLOT_MIN_TOKENS) {
		sh.n_tokens = SLOT_MIN_TOKENS;
		sh.row_bytes = bytes / (2ull * sh.n_layer * SLOT_MIN_TOKENS) / 8 * 8;
		if (sh.row_bytes < 8)
			sh.row_bytes = 8;
	}
	return sh;
}

static void slotgen_init(struct slotgen *g, const struct slot_shape *sh)
{
	uint8_t *p;
	uint32_t n = sh->n_tokens;

	memset(g, 0, sizeof(*g));
	g->sh = *sh;
	g->head_len = 12 + 4ull * n + 4 + 8ull * n + 8;
	g->head = p = xmalloc(g->head_len);
	put_le32(p, 0x67677371); /* "qsgg" */
	put_le32(p + 4, 2);
	put_le32(p + 8, n);
	p += 12;
	for (uint32_t i = 0; i < n; i++, p += 4) {
		/* Token ids of a ~150k vocabulary; the first differs per seed, so
		 * no blob of another seed is a prefix of this one. */
		uint32_t t = i == 0 ? (uint32_t)(1 + sh->seed % 1000)
		                    : (uint32_t)(1 + splitmix64(sh->seed * 7919 + i) % 150000);
		put_le32(p, t);
	}
	put_le32(p, n); /* cell_count */
	p += 4;
	for (uint32_t i = 0; i < n; i++, p += 8) {
		put_le32(p, i); /* pos */
		put_le32(p + 4, 0); /* n_seq_id, as tests/integration/harness.py */
	}
	put_le32(p, 0);            /* v_trans */
	put_le32(p + 4, sh->n_layer);
	g->payload = (uint64_t)n * sh->row_bytes;
	g->total = g->head_len + 2ull * sh->n_layer * (12 + g->payload);
}

static void slotgen_free(struct slotgen *g)
{
	free(g->head);
	g->head = NULL;
}

/* Fills buf with the next len bytes of the file (fewer at its end); returns
 * the count. */
static size_t slotgen_read(struct slotgen *g, uint8_t *buf, size_t len)
{
	size_t done = 0;

	while (done < len && g->pos < g->total) {
		size_t n;

		if (g->pos < g->head_len) {
			n = g->head_len - g->pos;
			if (n > len - done)
				n = len - done;
			memcpy(buf + done, g->head + g->pos, n);
		} else {
			uint64_t off = g->pos - g->head_len, bsize = 12 + g->payload;
			uint64_t block = off / bsize, w = off % bsize;

			if (w < 12) {
				uint8_t d[12];
				put_le32(d, SLOT_TYPE_F16);
				put_le64(d + 4, g->sh.row_bytes);
				n = 12 - w;
				if (n > len - done)
					n = len - done;
				memcpy(buf + done, d + w, n);
			} else {
				uint64_t q = w - 12, left = g->payload - q;
				uint8_t *dst = buf + done;

				n = left < len - done ? (size_t)left : len - done;
				/* an unaligned head, whole words, an unaligned tail */
				size_t i = 0;
				while (i < n && (q + i) % 8) {
					uint64_t v = payload_word(g, block, (q + i) / 8);
					dst[i] = (uint8_t)(v >> (8 * ((q + i) % 8)));
					i++;
				}
				for (; i + 8 <= n; i += 8) {
					uint64_t v = payload_word(g, block, (q + i) / 8);
					put_le64(dst + i, v);
				}
				for (; i < n; i++) {
					uint64_t v = payload_word(g, block, (q + i) / 8);
					dst[i] = (uint8_t)(v >> (8 * ((q + i) % 8)));
				}
			}
		}
		g->pos += n;
		done += n;
	}
	return done;
}

/* Writes the slot file of shape sh to path; returns its size. */
static uint64_t slot_write(const char *path, const struct slot_shape *sh)
{
	struct slotgen g;
	uint8_t *buf = xmalloc(BENCH_IO_CHUNK);
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	uint64_t total;

	if (fd < 0)
		die("cannot create %s: %s", path, strerror(errno));
	slotgen_init(&g, sh);
	for (;;) {
		size_t n = slotgen_read(&g, buf, BENCH_IO_CHUNK);
		int rc;

		if (n == 0)
			break;
		rc = write_full(fd, buf, n);
		if (rc)
			die("writing %s: %s", path, strerror(-rc));
	}
	if (close(fd) < 0)
		die("writing %s: %s", path, strerror(errno));
	total = g.total;
	slotgen_free(&g);
	free(buf);
	return total;
}

/* ---- the kvtier side ---- */

/* kvtier_fetch's sink: counts each part's bytes and, when `gen` is set,
 * compares the slot file's bytes with the generator's. */
struct sink {
	uint64_t bytes[3];
	unsigned parts_begun;   /* bit per part */
	struct slotgen *gen;    /* NULL: count only */
	uint8_t *vbuf;
	size_t vcap;
	int mismatch;           /* the bytes differed */
	uint64_t mismatch_at;
};

static int sink_cb(void *ctx, int part, const void *buf, size_t len)
{
	struct sink *s = ctx;

	if (part < 0 || part > 2)
		return 1;
	if (!buf) {
		s->parts_begun |= 1u << part;
		return 0;
	}
	if (s->gen && part == KVTIER_PART_SLOT) {
		if (s->vcap < len) {
			free(s->vbuf);
			s->vbuf = xmalloc(len);
			s->vcap = len;
		}
		if (slotgen_read(s->gen, s->vbuf, len) != len || memcmp(s->vbuf, buf, len)) {
			s->mismatch = 1;
			s->mismatch_at = s->bytes[part];
			return 2;
		}
	}
	s->bytes[part] += len;
	return 0;
}

static kvtier_client *kv_open(const char *address, const char *token_file)
{
	struct kvtier_options o = {.timeout_ms = 120000};
	struct kvtier_info *info = xmalloc(sizeof(*info));
	kvtier_client *c;
	char *token = NULL;
	int rc;

	if (token_file)
		o.auth_token = token = read_first_line(token_file);
	rc = kvtier_open(&c, address, &o);
	if (rc)
		die("kvtier_open %s: %s", address, kvtier_strerror(rc));
	/* The first call connects: keep that out of every timed call. */
	rc = kvtier_info(c, info);
	if (rc)
		die("kvtierd at %s does not answer Info: %s: %s", address, kvtier_strerror(rc),
		    kvtier_errmsg(c));
	free(info);
	free(token);
	return c;
}

/* Fetches blob into a counting sink (verifying against shape sh when not
 * NULL); dies unless exactly `size` slot-file bytes arrived. Returns seconds. */
static double kv_fetch(kvtier_client *c, const char *blob, uint64_t size,
                       const struct slot_shape *sh, const char *what)
{
	struct sink s = {0};
	struct slotgen g;
	double t0, t;
	int rc;

	if (sh) {
		slotgen_init(&g, sh);
		s.gen = &g;
	}
	t0 = now_s();
	rc = kvtier_fetch(c, blob, sink_cb, &s);
	t = now_s() - t0;
	if (s.mismatch)
		die("%s: fetched bytes differ from the slot file at offset %" PRIu64, what,
		    s.mismatch_at);
	if (rc)
		die("%s: kvtier_fetch %s: %s: %s", what, blob, kvtier_strerror(rc), kvtier_errmsg(c));
	if (s.bytes[0] != size || !(s.parts_begun & 1u))
		die("%s: fetched %" PRIu64 " bytes of the slot file, expected %" PRIu64, what,
		    s.bytes[0], size);
	if (sh) {
		slotgen_free(&g);
		free(s.vbuf);
	}
	return t;
}

/* The namespace of a shape: a namespace holds one KV layout (the daemon
 * refuses another), as one model's would. */
static const char *shape_ns(const struct slot_shape *sh)
{
	static char ns[64];

	snprintf(ns, sizeof(ns), "kvbench-l%u-r%" PRIu64, sh->n_layer, sh->row_bytes);
	return ns;
}

/* Puts path; dies unless it stored a new blob of sh's tokens (and, when
 * blob_inout is not empty, with that id). Returns seconds. */
static double kv_put(kvtier_client *c, const char *path, const struct slot_shape *sh,
                     char *blob_inout, const char *what)
{
	struct kvtier_put_result r;
	const char *ns = shape_ns(sh);
	double t0 = now_s(), t;
	int rc = kvtier_put_file(c, ns, path, &r);

	t = now_s() - t0;
	if (rc)
		die("%s: kvtier_put_file %s: %s: %s", what, path, kvtier_strerror(rc),
		    kvtier_errmsg(c));
	if (r.n_tokens != sh->n_tokens)
		die("%s: the daemon indexed %u tokens, the file has %u", what, r.n_tokens,
		    sh->n_tokens);
	if (blob_inout[0] && strcmp(blob_inout, r.blob))
		die("%s: the same file got blob id %s, before %s", what, r.blob, blob_inout);
	if (r.deduplicated)
		die("%s: the put was deduplicated: the blob was not deleted before", what);
	memcpy(blob_inout, r.blob, sizeof(r.blob));
	return t;
}

static void kv_delete(kvtier_client *c, const char *blob)
{
	int rc = kvtier_delete(c, blob);

	if (rc && rc != KVTIER_E_NOTFOUND)
		die("kvtier_delete %s: %s: %s", blob, kvtier_strerror(rc), kvtier_errmsg(c));
}

/* What kvtier_list says about one blob. */
struct blob_probe {
	const char *blob;
	int found;
	struct kvtier_blob_info info;
};

static int probe_cb(void *ctx, const struct kvtier_blob_info *b)
{
	struct blob_probe *p = ctx;

	if (strcmp(b->blob, p->blob) == 0) {
		p->found = 1;
		p->info = *b;
	}
	return 0;
}

static int kv_probe(kvtier_client *c, const char *blob, struct kvtier_blob_info *out)
{
	struct blob_probe p = {.blob = blob};
	int rc = kvtier_list(c, NULL, probe_cb, &p);

	if (rc)
		die("kvtier_list: %s: %s", kvtier_strerror(rc), kvtier_errmsg(c));
	if (p.found)
		*out = p.info;
	return p.found;
}

/* ---- references ---- */

/* The raw socket copy: a child preads `file` 1 MiB at a time and write()s it
 * to a socket of the kind kvtierd serves on (Unix stream socket, or loopback
 * TCP), the parent read()s 1 MiB at a time and discards. Timed from the
 * parent's "go" to EOF, so connection setup and fork are outside. Returns
 * seconds; dies unless `size` bytes arrived. */
static double raw_copy(int tcp, const char *file, const char *sockpath, uint64_t size)
{
	struct sockaddr_un un = {.sun_family = AF_UNIX};
	struct sockaddr_in in = {.sin_family = AF_INET};
	socklen_t inlen = sizeof(in);
	uint8_t *buf = xmalloc(BENCH_IO_CHUNK);
	uint64_t got = 0;
	double t0, t;
	int lfd, cfd, status;
	pid_t pid;

	memset(buf, 0, BENCH_IO_CHUNK); /* fault the pages in before timing */
	lfd = socket(tcp ? AF_INET : AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (lfd < 0)
		die("socket: %s", strerror(errno));
	if (tcp) {
		in.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		if (bind(lfd, (struct sockaddr *)&in, sizeof(in)) < 0 ||
		    getsockname(lfd, (struct sockaddr *)&in, &inlen) < 0)
			die("bind 127.0.0.1:0: %s", strerror(errno));
	} else {
		if (strlen(sockpath) >= sizeof(un.sun_path))
			die("socket path %s is too long", sockpath);
		strcpy(un.sun_path, sockpath);
		unlink(sockpath);
		if (bind(lfd, (struct sockaddr *)&un, sizeof(un)) < 0)
			die("bind %s: %s", sockpath, strerror(errno));
	}
	if (listen(lfd, 1) < 0)
		die("listen: %s", strerror(errno));
	fflush(NULL);
	pid = fork();
	if (pid < 0)
		die("fork: %s", strerror(errno));
	if (pid == 0) {
		int fd = socket(tcp ? AF_INET : AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		int src = open(file, O_RDONLY | O_CLOEXEC);
		uint64_t off = 0;
		char go;

		if (fd < 0 || src < 0)
			_exit(2);
		if (connect(fd, tcp ? (struct sockaddr *)&in : (struct sockaddr *)&un,
		            tcp ? sizeof(in) : sizeof(un)) < 0)
			_exit(3);
		if (read(fd, &go, 1) != 1)
			_exit(4);
		while (off < size) {
			size_t want = size - off < BENCH_IO_CHUNK ? (size_t)(size - off)
			                                           : BENCH_IO_CHUNK;
			ssize_t r = pread(src, buf, want, (off_t)off);
			if (r < 0 && errno == EINTR)
				continue;
			if (r <= 0)
				_exit(5);
			if (write_full(fd, buf, (size_t)r))
				_exit(6);
			off += (uint64_t)r;
		}
		_exit(0);
	}
	cfd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
	if (cfd < 0)
		die("accept: %s", strerror(errno));
	close(lfd);
	if (!tcp)
		unlink(sockpath);
	t0 = now_s();
	if (write(cfd, "g", 1) != 1)
		die("raw copy: cannot start the writer: %s", strerror(errno));
	for (;;) {
		ssize_t r = read(cfd, buf, BENCH_IO_CHUNK);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0)
			die("raw copy: read: %s", strerror(errno));
		if (r == 0)
			break;
		got += (uint64_t)r;
	}
	t = now_s() - t0;
	close(cfd);
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	if (!WIFEXITED(status) || WEXITSTATUS(status))
		die("raw copy: the writer failed (status %d)", status);
	if (got != size)
		die("raw copy: %" PRIu64 " bytes arrived, expected %" PRIu64, got, size);
	free(buf);
	return t;
}

/* Runs argv with stdout to `out_fd` (or /dev/null when < 0) and stdin from
 * /dev/null; returns its exit status or dies. */
static int run_child(char *const argv[], int out_fd)
{
	int status;
	pid_t pid;

	fflush(NULL);
	pid = fork();
	if (pid < 0)
		die("fork: %s", strerror(errno));
	if (pid == 0) {
		int null = open("/dev/null", O_RDWR);
		if (null < 0)
			_exit(126);
		dup2(null, 0);
		dup2(out_fd >= 0 ? out_fd : null, 1);
		execvp(argv[0], argv);
		_exit(127);
	}
	while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
		;
	if (!WIFEXITED(status))
		die("%s was killed by signal %d", argv[0], WTERMSIG(status));
	return WEXITSTATUS(status);
}

/* `cat FILE > /dev/null`, timed from fork to exit. Returns seconds. */
static double cat_file(const char *file)
{
	char *argv[] = {"cat", (char *)file, NULL};
	double t0 = now_s();
	int rc = run_child(argv, -1);

	if (rc)
		die("cat %s exited with %d", file, rc);
	return now_s() - t0;
}

static redisContext *redis_open(int port, const char *sock)
{
	struct timeval tv = {.tv_sec = 120};
	redisContext *r = sock ? redisConnectUnix(sock) : redisConnect("127.0.0.1", port);
	redisReply *rep;

	if (!r || r->err)
		die("cannot connect to redis-server at %s%s%d: %s", sock ? sock : "127.0.0.1",
		    sock ? "" : ":", sock ? 0 : port, r ? r->errstr : "out of memory");
	redisSetTimeout(r, tv);
	rep = redisCommand(r, "PING");
	if (!rep || rep->type != REDIS_REPLY_STATUS)
		die("redis-server does not answer PING");
	freeReplyObject(rep);
	return r;
}

/* SET key to data[0..len); returns seconds. */
static double redis_set(redisContext *r, const char *key, const void *data, size_t len)
{
	const char *argv[3] = {"SET", key, data};
	size_t argl[3] = {3, strlen(key), len};
	double t0 = now_s(), t;
	redisReply *rep = redisCommandArgv(r, 3, argv, argl);

	t = now_s() - t0;
	if (!rep || rep->type != REDIS_REPLY_STATUS || strcmp(rep->str, "OK"))
		die("redis SET of %zu bytes failed: %s", len,
		    rep && rep->str ? rep->str : r->errstr);
	freeReplyObject(rep);
	return t;
}

static void redis_del(redisContext *r, const char *key)
{
	redisReply *rep = redisCommand(r, "DEL %s", key);

	if (!rep || rep->type != REDIS_REPLY_INTEGER)
		die("redis DEL failed: %s", rep && rep->str ? rep->str : r->errstr);
	freeReplyObject(rep);
}

/* GET key into memory (then discarded); dies unless `len` bytes came back,
 * and, with sh, unless they are the slot file's. Returns seconds. */
static double redis_get(redisContext *r, const char *key, size_t len, const struct slot_shape *sh)
{
	double t0 = now_s(), t;
	redisReply *rep = redisCommand(r, "GET %s", key);

	t = now_s() - t0;
	if (!rep || rep->type != REDIS_REPLY_STRING)
		die("redis GET failed: %s", rep && rep->str ? rep->str : r->errstr);
	if ((size_t)rep->len != len)
		die("redis GET returned %zu bytes, expected %zu", (size_t)rep->len, len);
	if (sh) {
		struct slotgen g;
		uint8_t *buf = xmalloc(BENCH_IO_CHUNK);
		size_t off = 0;

		slotgen_init(&g, sh);
		while (off < len) {
			size_t n = slotgen_read(&g, buf, BENCH_IO_CHUNK);
			if (n == 0 || memcmp(buf, rep->str + off, n))
				die("redis GET returned other bytes than were SET (near %zu)", off);
			off += n;
		}
		slotgen_free(&g);
		free(buf);
	}
	freeReplyObject(rep);
	return t;
}

/* Redis GET and SET in its own protocol (RESP) on hiredis's connection: the
 * value moves between the socket and a 1 MiB buffer (GET, then discarded) or
 * the mapped file (SET) with 1 MiB read()/write(), as in the raw socket copy
 * and as kvtier_fetch into a sink. hiredis's redisCommand (redis_get and
 * redis_set) copies the value through its buffers, and a SET memmoves the
 * unsent rest after every partial write: that measures hiredis as much as
 * Redis, so both are reported, each against the target. */
static double resp_get(redisContext *r, const char *key, uint64_t len, const struct slot_shape *sh)
{
	uint8_t *buf = xmalloc(BENCH_IO_CHUNK), *vbuf = NULL;
	char cmd[256];
	size_t have = 0, hl = 0;
	uint64_t got = 0, want = len + 2; /* the value and its CRLF */
	struct slotgen g;
	double t0, t;
	int n = snprintf(cmd, sizeof(cmd), "*2\r\n$3\r\nGET\r\n$%zu\r\n%s\r\n", strlen(key), key);

	if (sh) {
		slotgen_init(&g, sh);
		vbuf = xmalloc(BENCH_IO_CHUNK);
	}
	memset(buf, 0, BENCH_IO_CHUNK);
	t0 = now_s();
	if (write_full(r->fd, cmd, (size_t)n))
		die("redis GET: write: %s", strerror(errno));
	for (;;) {
		uint8_t *data;
		size_t dn;
		ssize_t k = read(r->fd, buf + have, BENCH_IO_CHUNK - have);

		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			die("redis GET: %s after %" PRIu64 " bytes", k ? strerror(errno) : "EOF", got);
		have += (size_t)k;
		if (!hl) { /* the header "$<len>\r\n" */
			uint8_t *e = memchr(buf, '\n', have);
			if (!e) {
				if (have > 64)
					die("redis GET: no reply header");
				continue;
			}
			if (buf[0] != '$' || strtoull((char *)buf + 1, NULL, 10) != len)
				die("redis GET: reply %.*s, expected a bulk string of %" PRIu64 " bytes",
				    (int)(e - buf), buf, len);
			hl = (size_t)(e - buf) + 1;
			data = buf + hl;
			dn = have - hl;
		} else {
			data = buf;
			dn = have;
		}
		if (sh && got < len) {
			size_t cmpn = got + dn > len ? (size_t)(len - got) : dn;
			if (slotgen_read(&g, vbuf, cmpn) != cmpn || memcmp(vbuf, data, cmpn))
				die("redis GET returned other bytes than were SET (near %" PRIu64 ")",
				    got);
		}
		got += dn;
		have = 0;
		if (got >= want)
			break;
	}
	t = now_s() - t0;
	if (got != want)
		die("redis GET: %" PRIu64 " bytes after the header, expected %" PRIu64, got, want);
	if (sh) {
		slotgen_free(&g);
		free(vbuf);
	}
	free(buf);
	return t;
}

static double resp_set(redisContext *r, const char *key, const uint8_t *data, uint64_t len)
{
	char cmd[256], reply[8];
	size_t have = 0;
	uint64_t off = 0;
	double t0, t;
	int n = snprintf(cmd, sizeof(cmd), "*3\r\n$3\r\nSET\r\n$%zu\r\n%s\r\n$%" PRIu64 "\r\n",
	                 strlen(key), key, len);

	t0 = now_s();
	if (write_full(r->fd, cmd, (size_t)n))
		die("redis SET: write: %s", strerror(errno));
	while (off < len) {
		size_t k = len - off < BENCH_IO_CHUNK ? (size_t)(len - off) : BENCH_IO_CHUNK;
		if (write_full(r->fd, data + off, k))
			die("redis SET: write: %s", strerror(errno));
		off += k;
	}
	if (write_full(r->fd, "\r\n", 2))
		die("redis SET: write: %s", strerror(errno));
	while (have < 5) {
		ssize_t k = read(r->fd, reply + have, 5 - have);
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			die("redis SET: no reply: %s", k ? strerror(errno) : "EOF");
		have += (size_t)k;
	}
	t = now_s() - t0;
	if (memcmp(reply, "+OK\r\n", 5))
		die("redis SET: reply %.5s, expected +OK", reply);
	return t;
}

/* ---- options shared by the scenarios ---- */

struct opts {
	const char *socket;      /* kvtierd's Unix socket */
	const char *tcp;         /* kvtierd's host:port */
	const char *token_file;
	int redis_port;
	const char *redis_socket;
	const char *work;        /* scratch directory on tmpfs */
	const char *slot_dir;
	const char *tier_dir;    /* kvtierd's tmpfs tier directory (for cat) */
	const char *disk_dir;    /* disk-cold: the disk tier's directory */
	const char *fio_dir;     /* disk-cold: fio's file, same file system */
	uint64_t size;
	const char *sizes;
	int runs;
	int iters;
	int io_depth;
	const char *io_request_size;
};

static const char *env_or(const char *name, const char *dflt)
{
	const char *v = getenv(name);

	return v && v[0] ? v : dflt;
}

static void parse_opts(int argc, char **argv, struct opts *o)
{
	enum { O_SOCKET = 256, O_TCP, O_TOKEN, O_RPORT, O_RSOCK, O_WORK, O_SLOT, O_TIER, O_DISK,
	       O_FIO, O_SIZE, O_SIZES, O_RUNS, O_ITERS, O_DEPTH, O_REQ };
	static const struct option lo[] = {
		{"socket", required_argument, NULL, O_SOCKET},
		{"tcp", required_argument, NULL, O_TCP},
		{"token-file", required_argument, NULL, O_TOKEN},
		{"redis-port", required_argument, NULL, O_RPORT},
		{"redis-socket", required_argument, NULL, O_RSOCK},
		{"work", required_argument, NULL, O_WORK},
		{"slot-dir", required_argument, NULL, O_SLOT},
		{"tier-dir", required_argument, NULL, O_TIER},
		{"disk-dir", required_argument, NULL, O_DISK},
		{"fio-dir", required_argument, NULL, O_FIO},
		{"size", required_argument, NULL, O_SIZE},
		{"sizes", required_argument, NULL, O_SIZES},
		{"runs", required_argument, NULL, O_RUNS},
		{"iters", required_argument, NULL, O_ITERS},
		{"io-depth", required_argument, NULL, O_DEPTH},
		{"io-request-size", required_argument, NULL, O_REQ},
		{NULL, 0, NULL, 0},
	};
	const char *quick = env_or("KVTIER_BENCH_QUICK", "0");
	int opt;

	o->socket = env_or("KVTIER_SOCKET", NULL);
	o->tcp = env_or("KVTIER_TCP_ADDR", NULL);
	o->token_file = env_or("KVTIER_TOKEN_FILE", NULL);
	o->redis_port = atoi(env_or("REDIS_PORT", "0"));
	o->redis_socket = env_or("REDIS_SOCKET", NULL);
	o->work = env_or("KVTIER_BENCH_SHM", NULL);
	o->slot_dir = env_or("KVTIER_SLOT_DIR", NULL);
	o->tier_dir = env_or("KVTIER_TMPFS_TIER", NULL);
	o->disk_dir = NULL;
	o->fio_dir = NULL;
	o->size = 0;
	o->sizes = NULL;
	o->runs = atoi(env_or("KVTIER_BENCH_RUNS", "5"));
	o->iters = strcmp(quick, "1") == 0 ? 20 : 200;
	o->io_depth = atoi(env_or("KVTIER_BENCH_IO_DEPTH", "8"));
	o->io_request_size = env_or("KVTIER_BENCH_IO_REQUEST_SIZE", "1M");
	while ((opt = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		switch (opt) {
		case O_SOCKET: o->socket = optarg; break;
		case O_TCP: o->tcp = optarg; break;
		case O_TOKEN: o->token_file = optarg; break;
		case O_RPORT: o->redis_port = atoi(optarg); break;
		case O_RSOCK: o->redis_socket = optarg; break;
		case O_WORK: o->work = optarg; break;
		case O_SLOT: o->slot_dir = optarg; break;
		case O_TIER: o->tier_dir = optarg; break;
		case O_DISK: o->disk_dir = optarg; break;
		case O_FIO: o->fio_dir = optarg; break;
		case O_SIZE: o->size = parse_size(optarg); break;
		case O_SIZES: o->sizes = optarg; break;
		case O_RUNS: o->runs = atoi(optarg); break;
		case O_ITERS: o->iters = atoi(optarg); break;
		case O_DEPTH: o->io_depth = atoi(optarg); break;
		case O_REQ: o->io_request_size = optarg; break;
		default: die("unknown option (see the top of bench/kvbench.c)");
		}
	}
	if (o->runs < 1 || o->runs > BENCH_MAX_RUNS)
		die("--runs %d: expected 1..%d", o->runs, BENCH_MAX_RUNS);
	if (o->iters < 1 || o->iters > 100000)
		die("--iters %d: expected 1..100000", o->iters);
}

static void need(const char *v, const char *what)
{
	if (!v)
		die("missing %s (bench/run exports it)", what);
}

/* Finds the file named `blob` under dir (the tier's file of that blob). */
static char found_path[4096];
static const char *find_name;

static int find_cb(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
	if (type == FTW_F && strcmp(path + ftw->base, find_name) == 0 && S_ISREG(st->st_mode)) {
		snprintf(found_path, sizeof(found_path), "%s", path);
		return 1;
	}
	return 0;
}

static const char *find_blob_file(const char *dir, const char *blob)
{
	found_path[0] = '\0';
	find_name = blob;
	nftw(dir, find_cb, 16, FTW_PHYS);
	return found_path[0] ? found_path : NULL;
}

/* ---- transfer: fetch and put of one blob ---- */

static int cmd_transfer(int argc, char **argv)
{
	struct opts o;
	struct slot_shape sh;
	char src[4096], rawsock[4096], blob[KVTIER_BLOB_ID_LEN + 1] = "", name[32], sc[160],
		rn[160], nt[512];
	const char *key = "kvbench:blob", *tier_file;
	uint64_t size;
	kvtier_client *ku, *kt;
	redisContext *ru, *rt;
	void *map;
	int fd, n;

	parse_opts(argc, argv, &o);
	need(o.socket, "--socket");
	need(o.tcp, "--tcp");
	need(o.token_file, "--token-file");
	need(o.work, "--work");
	need(o.tier_dir, "--tier-dir");
	need(o.redis_socket, "--redis-socket");
	if (!o.redis_port)
		die("missing --redis-port (bench/run exports REDIS_PORT)");
	if (!o.size)
		o.size = 256ull << 20;
	n = o.runs;
	sh = slot_shape_of(o.size, 1);
	snprintf(src, sizeof(src), "%s/transfer-src.bin", o.work);
	snprintf(rawsock, sizeof(rawsock), "%s/raw.sock", o.work);
	size_name(name, sizeof(name), o.size);
	size = slot_write(src, &sh);
	note("transfer: slot file %s: %u tokens, %" PRIu64 " bytes", src, sh.n_tokens, size);

	ku = kv_open(o.socket, NULL);
	kt = kv_open(o.tcp, o.token_file);
	ru = redis_open(0, o.redis_socket);
	rt = redis_open(o.redis_port, NULL);
	fd = open(src, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		die("open %s: %s", src, strerror(errno));
	map = mmap(NULL, size, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, 0);
	if (map == MAP_FAILED)
		die("mmap %s: %s", src, strerror(errno));
	close(fd);

	/* Untimed first round: every path moves the right bytes. */
	kv_put(ku, src, &sh, blob, "put (check)");
	kv_fetch(ku, blob, size, &sh, "fetch over the Unix socket (check)");
	kv_fetch(kt, blob, size, &sh, "fetch over TCP (check)");
	resp_set(ru, key, map, size);
	resp_get(ru, key, size, &sh);
	resp_get(rt, key, size, &sh);
	redis_del(ru, key);
	redis_set(rt, key, map, size);
	redis_get(ru, key, size, &sh);
	raw_copy(0, src, rawsock, size);
	raw_copy(1, src, rawsock, size);
	tier_file = find_blob_file(o.tier_dir, blob);
	if (!tier_file)
		die("no file named %s under the tmpfs tier %s (for the cat reference)", blob,
		    o.tier_dir);
	note("transfer: blob %s, tier file %s", blob, tier_file);

	enum { F_U, F_T, RAW_U, RAW_T, CAT, GET_U, GET_T, HGET_U, HGET_T, PUT_U, PUT_T, SET_U,
	       SET_T, HSET_U, HSET_T, NFIG };
	static double fig[NFIG][BENCH_MAX_RUNS];
	for (int i = 0; i < n; i++) {
		/* Fetch: each kvtier figure next to its references. */
		fig[RAW_U][i] = gbps(size, raw_copy(0, tier_file, rawsock, size));
		fig[F_U][i] = gbps(size, kv_fetch(ku, blob, size, NULL, "fetch over the Unix socket"));
		fig[CAT][i] = gbps(size, cat_file(tier_file));
		fig[GET_U][i] = gbps(size, resp_get(ru, key, size, NULL));
		fig[HGET_U][i] = gbps(size, redis_get(ru, key, size, NULL));
		fig[RAW_T][i] = gbps(size, raw_copy(1, tier_file, rawsock, size));
		fig[F_T][i] = gbps(size, kv_fetch(kt, blob, size, NULL, "fetch over TCP"));
		fig[GET_T][i] = gbps(size, resp_get(rt, key, size, NULL));
		fig[HGET_T][i] = gbps(size, redis_get(rt, key, size, NULL));
		/* Put: a new blob each time (deleted first, untimed), against a
		 * SET of a deleted key. */
		kv_delete(ku, blob);
		fig[PUT_U][i] = gbps(size, kv_put(ku, src, &sh, blob, "put over the Unix socket"));
		redis_del(ru, key);
		fig[SET_U][i] = gbps(size, resp_set(ru, key, map, size));
		redis_del(ru, key);
		fig[HSET_U][i] = gbps(size, redis_set(ru, key, map, size));
		kv_delete(ku, blob);
		fig[PUT_T][i] = gbps(size, kv_put(kt, src, &sh, blob, "put over TCP"));
		redis_del(rt, key);
		fig[SET_T][i] = gbps(size, resp_set(rt, key, map, size));
		redis_del(rt, key);
		fig[HSET_T][i] = gbps(size, redis_set(rt, key, map, size));
		tier_file = find_blob_file(o.tier_dir, blob); /* the put made a new file */
		if (!tier_file)
			die("no file named %s under %s after the put", blob, o.tier_dir);
		note("transfer: run %d/%d (GB/s): fetch unix %.2f tcp %.2f; raw unix %.2f tcp %.2f; "
		     "cat %.2f; GET unix %.2f tcp %.2f (hiredis %.2f %.2f); put unix %.2f tcp %.2f; "
		     "SET unix %.2f tcp %.2f (hiredis %.2f %.2f)",
		     i + 1, n, fig[F_U][i], fig[F_T][i], fig[RAW_U][i], fig[RAW_T][i], fig[CAT][i],
		     fig[GET_U][i], fig[GET_T][i], fig[HGET_U][i], fig[HGET_T][i], fig[PUT_U][i],
		     fig[PUT_T][i], fig[SET_U][i], fig[SET_T][i], fig[HSET_U][i], fig[HSET_T][i]);
	}

	struct result r = {.unit = "GB/s", .higher_is_better = 1, .runs = n, .target_abs = NAN,
	                   .note = nt};
	const char *sock_kind[2] = {"Unix socket", "loopback TCP"};
	for (int k = 0; k < 2; k++) {
		snprintf(nt, sizeof(nt),
		         "%u-token v2 slot file (%" PRIu64 " bytes, f16-like); kvtier: "
		         "kvtier_fetch into a counting sink",
		         sh.n_tokens, size);
		r.kv = fig[k ? F_T : F_U];
		snprintf(sc, sizeof(sc), "fetch %s tmpfs, %s: vs raw socket copy", name, sock_kind[k]);
		snprintf(rn, sizeof(rn), "raw %s copy, tier file: pread + write 1 MiB -> read 1 MiB",
		         sock_kind[k]);
		r.scenario = sc;
		r.reference_name = rn;
		r.ref = fig[k ? RAW_T : RAW_U];
		r.target = "≥ 0.8 × ref";
		r.target_ratio = 0.8;
		emit(&r);
		snprintf(sc, sizeof(sc), "fetch %s tmpfs, %s: vs cat", name, sock_kind[k]);
		r.reference_name = "cat TIER_FILE > /dev/null";
		r.ref = fig[CAT];
		r.target = "≥ 0.5 × ref";
		r.target_ratio = 0.5;
		emit(&r);
		/* Redis twice: through hiredis's redisCommand (the usual C
		 * client), and in RESP with 1 MiB reads (Redis itself). */
		r.target = "≥ 1.5 × ref";
		r.target_ratio = 1.5;
		snprintf(sc, sizeof(sc), "fetch %s tmpfs, %s: vs Redis GET (hiredis)", name,
		         sock_kind[k]);
		snprintf(rn, sizeof(rn), "Redis GET over %s, hiredis redisCommand (reply in memory)",
		         sock_kind[k]);
		r.reference_name = rn;
		r.ref = fig[k ? HGET_T : HGET_U];
		emit(&r);
		snprintf(sc, sizeof(sc), "fetch %s tmpfs, %s: vs Redis GET (RESP)", name,
		         sock_kind[k]);
		snprintf(rn, sizeof(rn),
		         "Redis GET over %s, RESP on hiredis's socket, value read 1 MiB at a time "
		         "and discarded",
		         sock_kind[k]);
		r.ref = fig[k ? GET_T : GET_U];
		emit(&r);
	}
	snprintf(nt, sizeof(nt),
	         "kvtier_put_file of a tmpfs file; blob and key deleted before each run (untimed)");
	for (int k = 0; k < 2; k++) {
		r.kv = fig[k ? PUT_T : PUT_U];
		r.target = "≥ 1.5 × ref";
		r.target_ratio = 1.5;
		snprintf(sc, sizeof(sc), "put %s, %s: vs Redis SET (hiredis)", name, sock_kind[k]);
		snprintf(rn, sizeof(rn), "Redis SET over %s, hiredis redisCommandArgv from memory",
		         sock_kind[k]);
		r.scenario = sc;
		r.reference_name = rn;
		r.ref = fig[k ? HSET_T : HSET_U];
		emit(&r);
		snprintf(sc, sizeof(sc), "put %s, %s: vs Redis SET (RESP)", name, sock_kind[k]);
		snprintf(rn, sizeof(rn),
		         "Redis SET over %s, RESP on hiredis's socket, value written 1 MiB at a time "
		         "from memory",
		         sock_kind[k]);
		r.ref = fig[k ? SET_T : SET_U];
		emit(&r);
	}

	kv_delete(ku, blob);
	redis_del(ru, key);
	munmap(map, size);
	unlink(src);
	redisFree(ru);
	redisFree(rt);
	kvtier_close(ku);
	kvtier_close(kt);
	return 0;
}

/* ---- stage: hard-link hand-off latency ---- */

static int cmd_stage(int argc, char **argv)
{
	struct opts o;
	kvtier_client *c;
	char sizes_copy[256], *save = NULL, *tok;
	int n;

	parse_opts(argc, argv, &o);
	need(o.socket, "--socket");
	need(o.work, "--work");
	need(o.slot_dir, "--slot-dir");
	n = o.runs;
	snprintf(sizes_copy, sizeof(sizes_copy), "%s", o.sizes ? o.sizes : "1M,256M,1G");
	c = kv_open(o.socket, NULL);
	double *lat = xmalloc(sizeof(double) * (size_t)o.iters);
	uint64_t seed = 100;
	for (tok = strtok_r(sizes_copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
		uint64_t want = parse_size(tok), size;
		struct slot_shape sh = slot_shape_of(want, seed++);
		char src[4096], blob[KVTIER_BLOB_ID_LEN + 1] = "", name[32], sc[160], nt[256];
		double p50[BENCH_MAX_RUNS], p99[BENCH_MAX_RUNS];
		int copied = 0;

		size_name(name, sizeof(name), want);
		snprintf(src, sizeof(src), "%s/stage-src.bin", o.work);
		size = slot_write(src, &sh);
		kv_put(c, src, &sh, blob, "stage: put");
		unlink(src);
		for (int r = 0; r < n; r++) {
			for (int i = 0; i < o.iters; i++) {
				struct kvtier_stage st;
				struct stat sb;
				double t0 = now_s();
				int rc = kvtier_stage(c, blob, o.slot_dir, 0, &st);

				lat[i] = (now_s() - t0) * 1e3;
				if (rc)
					die("kvtier_stage %s: %s: %s", blob, kvtier_strerror(rc),
					    kvtier_errmsg(c));
				if (stat(st.path, &sb) < 0 || (uint64_t)sb.st_size != size)
					die("the staged file %s is missing or not %" PRIu64 " bytes",
					    st.path, size);
				copied += st.copied != 0;
				rc = kvtier_release(c, st.lease);
				if (rc)
					die("kvtier_release %s: %s: %s", st.lease, kvtier_strerror(rc),
					    kvtier_errmsg(c));
				if (access(st.path, F_OK) == 0)
					die("the staged file %s is still there after Release", st.path);
			}
			p99[r] = quantile_sort(lat, o.iters, 0.99);
			p50[r] = quantile_sort(lat, o.iters, 0.50);
			note("stage %s: run %d/%d: p50 %.3f ms, p99 %.3f ms", name, r + 1, n, p50[r],
			     p99[r]);
		}
		snprintf(nt, sizeof(nt),
		         "%d Stage calls per run (Release after each, untimed); %s", o.iters,
		         copied ? "SOME STAGES COPIED instead of linking" : "all hard links");
		snprintf(sc, sizeof(sc), "stage %s tmpfs blob, p50", name);
		struct result res = {.scenario = sc, .unit = "ms", .higher_is_better = 0,
		                     .kv = p50, .runs = n, .target = "≤ 1 ms",
		                     .target_ratio = NAN, .target_abs = 1.0, .note = nt};
		emit(&res);
		snprintf(sc, sizeof(sc), "stage %s tmpfs blob, p99", name);
		res.kv = p99;
		res.target = NULL;
		res.target_abs = NAN;
		emit(&res);
		kv_delete(c, blob);
	}
	free(lat);
	kvtier_close(c);
	return 0;
}

/* ---- disk-cold: a disk-tier blob out of the page cache vs fio ---- */

static int fadvise_cb(const char *path, const struct stat *st, int type, struct FTW *ftw)
{
	(void)st;
	(void)ftw;
	if (type == FTW_F) {
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd >= 0) {
			fdatasync(fd);
			posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
			close(fd);
		}
	}
	return 0;
}

/* Drops the page cache (drop_caches when permitted; DONTNEED on every file
 * under the directories in any case). Returns the method used. */
static const char *drop_page_cache(const char *dir1, const char *dir2)
{
	int fd, ok = 0;

	sync();
	fd = open("/proc/sys/vm/drop_caches", O_WRONLY | O_CLOEXEC);
	if (fd >= 0) {
		ok = write(fd, "1", 1) == 1;
		close(fd);
	}
	nftw(dir1, fadvise_cb, 16, FTW_PHYS);
	nftw(dir2, fadvise_cb, 16, FTW_PHYS);
	return ok ? "drop_caches" : "posix_fadvise DONTNEED";
}

/* fio sequential read of `file`; returns GB/s from its terse output (read
 * bytes and runtime), after checking it read `bytes`. */
static double fio_read(const char *file, uint64_t bytes, int depth, const char *bs, int write)
{
	char sz[32], dep[32], fname[4200], bsa[64], out[4096];
	char *argv[] = {"fio", "--name=kvbench", fname, write ? "--rw=write" : "--rw=read", bsa,
	                dep, "--ioengine=io_uring", "--direct=1", sz,
	                "--output-format=terse", "--terse-version=3", NULL};
	ssize_t got = 0, r;
	FILE *f;
	int rc;

	snprintf(fname, sizeof(fname), "--filename=%s", file);
	snprintf(bsa, sizeof(bsa), "--bs=%s", bs);
	snprintf(dep, sizeof(dep), "--iodepth=%d", depth);
	snprintf(sz, sizeof(sz), "--size=%" PRIu64, bytes);
	f = tmpfile();
	if (!f)
		die("tmpfile: %s", strerror(errno));
	rc = run_child(argv, fileno(f));
	if (rc)
		die("fio exited with %d (run: fio %s %s %s --ioengine=io_uring --direct=1 %s)", rc,
		    fname, bsa, dep, sz);
	rewind(f);
	while ((r = (ssize_t)fread(out + got, 1, sizeof(out) - 1 - (size_t)got, f)) > 0)
		got += r;
	fclose(f);
	out[got] = '\0';
	if (write)
		return 0;
	/* terse v3: 1 version; 2 fio version; 3 job; 4 group; 5 error;
	 * 6 read KiB; 7 read KiB/s; 8 read IOPS; 9 read runtime ms */
	char *field[10] = {0}, *save = NULL, *p = strtok_r(out, ";", &save);
	for (int i = 1; p && i <= 9; i++, p = strtok_r(NULL, ";", &save))
		field[i] = p;
	if (!field[9] || strcmp(field[5], "0"))
		die("cannot read fio's terse output (error field %s)", field[5] ? field[5] : "?");
	double kib = atof(field[6]), ms = atof(field[9]);
	if (kib * 1024 < (double)bytes - 1024 * 1024 || ms <= 0)
		die("fio read %.0f KiB in %.0f ms, expected %" PRIu64 " bytes", kib, ms, bytes);
	return kib * 1024 / (ms / 1e3) / 1e9;
}

/* Read requests completed and sectors read by the block device holding
 * `dir` (/sys/dev/block/MAJ:MIN/stat, fields 1 and 3): how a stream reached
 * the device. 0 when not available. Other I/O on the device counts too. */
static int dev_reads(const char *dir, uint64_t *reqs, uint64_t *sectors)
{
	char path[128];
	struct stat st;
	unsigned long long v[3];
	FILE *fp;
	int ok;

	*reqs = *sectors = 0;
	if (stat(dir, &st) < 0)
		return 0;
	snprintf(path, sizeof(path), "/sys/dev/block/%u:%u/stat", major(st.st_dev),
	         minor(st.st_dev));
	fp = fopen(path, "r");
	if (!fp)
		return 0;
	ok = fscanf(fp, "%llu %llu %llu", &v[0], &v[1], &v[2]) == 3;
	fclose(fp);
	if (ok) {
		*reqs = v[0];
		*sectors = v[2];
	}
	return ok;
}

static int cmd_disk_cold(int argc, char **argv)
{
	struct opts o;
	struct kvtier_info *info = xmalloc(sizeof(*info));
	struct kvtier_blob_info bi;
	struct slot_shape sh, sh2;
	char src[4096], fio_file[4096], blob[KVTIER_BLOB_ID_LEN + 1] = "",
		blob2[KVTIER_BLOB_ID_LEN + 1] = "", name[32], sc[160], rn[256], nt[768];
	const char *method = NULL, *use = blob;
	const struct slot_shape *use_sh = &sh;
	uint64_t size, fio_bytes, req;
	kvtier_client *c;
	double t_end;
	int n, rc, on_disk = 0;

	parse_opts(argc, argv, &o);
	need(o.socket, "--socket");
	need(o.work, "--work");
	need(o.disk_dir, "--disk-dir");
	need(o.fio_dir, "--fio-dir");
	if (!o.size)
		o.size = 1ull << 30;
	n = o.runs;
	req = parse_size(o.io_request_size);
	size_name(name, sizeof(name), o.size);
	c = kv_open(o.socket, NULL);
	rc = kvtier_info(c, info);
	if (rc)
		die("Info: %s", kvtier_errmsg(c));
	if (info->n_tiers < 2 || strcmp(info->tiers[1].kind, "disk"))
		die("the daemon at %s has no disk tier as its second tier", o.socket);
	note("disk-cold: disk tier %s, io %s%s%s", info->tiers[1].path, info->tiers[1].io,
	     info->tiers[1].io_fallback[0] ? ", fallback: " : "", info->tiers[1].io_fallback);

	sh = slot_shape_of(o.size, 7);
	snprintf(src, sizeof(src), "%s/disk-src.bin", o.work);
	size = slot_write(src, &sh);
	/* fio's file first, so both files are written well before either is
	 * read: the same size rounded up to the request size, same fs. */
	fio_bytes = (size + req - 1) / req * req;
	snprintf(fio_file, sizeof(fio_file), "%s/fio.dat", o.fio_dir);
	fio_read(fio_file, fio_bytes, o.io_depth, o.io_request_size, 1);
	kv_put(c, src, &sh, blob, "disk-cold: put");
	unlink(src);
	/* The tmpfs tier's high watermark is below the blob's size, so the
	 * placement thread moves it down. If it has not after a while, a
	 * second blob pushes it down (a put that finds tier 0 full makes room). */
	t_end = now_s() + 60;
	for (int pushed = 0; !on_disk;) {
		struct kvtier_blob_info b2;

		if (kv_probe(c, blob, &bi) && bi.tier == 1) {
			on_disk = 1;
			break;
		}
		if (pushed && kv_probe(c, blob2, &b2) && b2.tier == 1) {
			use = blob2;
			use_sh = &sh2;
			bi = b2;
			on_disk = 1;
			break;
		}
		if (now_s() > t_end) {
			if (pushed)
				die("no blob reached the disk tier within 60 s of the second put");
			note("disk-cold: not moved down after 60 s; putting a second blob");
			sh2 = slot_shape_of(o.size, 8);
			slot_write(src, &sh2);
			kv_put(c, src, &sh2, blob2, "disk-cold: second put");
			unlink(src);
			pushed = 1;
			t_end = now_s() + 60;
		}
		sleep_ms(200);
	}
	note("disk-cold: blob %s on tier %u (%s): %" PRIu64 " bytes stored as %" PRIu64
	     " (%s)",
	     use, bi.tier, bi.tier_kind, bi.size_bytes, bi.stored_bytes, bi.compression);
	if (bi.size_bytes != size)
		die("the disk blob is %" PRIu64 " bytes, expected %" PRIu64, bi.size_bytes, size);

	/* Untimed check: the cold read returns the slot file's bytes. */
	method = drop_page_cache(o.disk_dir, o.fio_dir);
	kv_fetch(c, use, size, use_sh, "disk-cold fetch (check)");

	double kv[BENCH_MAX_RUNS], ref[BENCH_MAX_RUNS];
	uint64_t dreq[2] = {0, 0}, dsec[2] = {0, 0};
	int have_dev = 1;
	for (int i = 0; i < n; i++) {
		/* Who goes first alternates: a device warming up or a host
		 * flushing behind the VM favours neither side. */
		for (int k = 0; k < 2; k++) {
			int is_fio = (k + i) % 2 == 1;
			uint64_t r0, s0, r1, s1;

			drop_page_cache(o.disk_dir, o.fio_dir);
			have_dev &= dev_reads(o.disk_dir, &r0, &s0);
			if (is_fio) {
				ref[i] = fio_read(fio_file, fio_bytes, o.io_depth, o.io_request_size,
				                  0);
			} else {
				if (!kv_probe(c, use, &bi) || bi.tier != 1)
					die("blob %s left the disk tier (now tier %u): the figure "
					    "would not be a disk read",
					    use, bi.tier);
				kv[i] = gbps(size, kv_fetch(c, use, size, NULL, "disk-cold fetch"));
			}
			have_dev &= dev_reads(o.disk_dir, &r1, &s1);
			dreq[is_fio] += r1 - r0;
			dsec[is_fio] += s1 - s0;
		}
		note("disk-cold: run %d/%d: kvtier %.3f GB/s, fio %.3f GB/s", i + 1, n, kv[i],
		     ref[i]);
	}
	if (!kv_probe(c, use, &bi) || bi.tier != 1)
		note("disk-cold: the blob was promoted after the last run (not measured)");

	snprintf(sc, sizeof(sc), "disk-tier cold fetch %s, Unix socket: vs fio", name);
	snprintf(rn, sizeof(rn),
	         "fio --rw=read --bs=%s --iodepth=%d --ioengine=io_uring --direct=1, same fs",
	         o.io_request_size, o.io_depth);
	snprintf(nt, sizeof(nt),
	         "page cache dropped before each run (%s); daemon: --io-depth %d "
	         "--io-request-size %s, io %s%s%s, blob stored %s",
	         method, o.io_depth, o.io_request_size, info->tiers[1].io,
	         info->tiers[1].io_fallback[0] ? " (" : "", info->tiers[1].io_fallback[0]
	                                                ? info->tiers[1].io_fallback : "",
	         bi.compression);
	if (info->tiers[1].io_fallback[0])
		strncat(nt, ")", sizeof(nt) - strlen(nt) - 1);
	if (have_dev && dreq[0] && dreq[1]) {
		/* A request split by the device's segment limit shows here. */
		size_t used = strlen(nt);
		snprintf(nt + used, sizeof(nt) - used,
		         "; device reads per run: kvtier %.0f of %.0f KiB (%.0f MiB), fio %.0f of "
		         "%.0f KiB (%.0f MiB)",
		         (double)dreq[0] / n, (double)dsec[0] * 512 / 1024 / (double)dreq[0],
		         (double)dsec[0] * 512 / MiB / n, (double)dreq[1] / n,
		         (double)dsec[1] * 512 / 1024 / (double)dreq[1],
		         (double)dsec[1] * 512 / MiB / n);
	}
	struct result r = {.scenario = sc, .unit = "GB/s", .higher_is_better = 1, .kv = kv,
	                   .ref = ref, .runs = n, .reference_name = rn,
	                   .target = "≥ 0.9 × ref", .target_ratio = 0.9, .target_abs = NAN,
	                   .note = nt};
	emit(&r);
	kv_delete(c, blob);
	if (blob2[0])
		kv_delete(c, blob2);
	unlink(fio_file);
	free(info);
	kvtier_close(c);
	return 0;
}

/* ---- fetch: one blob, N times, for profiling a gap ---- */

static int cmd_fetch(int argc, char **argv)
{
	struct opts o;
	struct kvtier_blob_info bi;
	const char *addr, *blob;
	kvtier_client *c;

	parse_opts(argc, argv, &o);
	if (optind >= argc)
		die("usage: kvbench fetch [--socket PATH | --tcp HOST:PORT --token-file F] "
		    "[--runs N] BLOB");
	blob = argv[optind];
	addr = o.tcp && !o.socket ? o.tcp : o.socket;
	need(addr, "--socket or --tcp");
	c = kv_open(addr, addr == o.tcp ? o.token_file : NULL);
	if (!kv_probe(c, blob, &bi))
		die("no blob %s", blob);
	for (int i = 0; i < o.runs; i++) {
		double t = kv_fetch(c, blob, bi.size_bytes, NULL, "fetch");
		note("fetch %d/%d: %" PRIu64 " bytes in %.3f s: %.3f GB/s", i + 1, o.runs,
		     bi.size_bytes, t, gbps(bi.size_bytes, t));
	}
	kvtier_close(c);
	return 0;
}

/* ---- small commands ---- */

static int cmd_mkslot(int argc, char **argv)
{
	uint64_t want = 0, seed = 1, size;
	const char *path = NULL;
	struct slot_shape sh;

	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--size") == 0 && i + 1 < argc)
			want = parse_size(argv[++i]);
		else if (strcmp(argv[i], "--seed") == 0 && i + 1 < argc)
			seed = strtoull(argv[++i], NULL, 10);
		else if (!path)
			path = argv[i];
		else
			die("mkslot: unexpected %s", argv[i]);
	}
	if (!path || !want)
		die("usage: kvbench mkslot PATH --size SIZE [--seed N]");
	sh = slot_shape_of(want, seed);
	size = slot_write(path, &sh);
	printf("%" PRIu64 "\n", size);
	return 0;
}

static int cmd_freeport(void)
{
	struct sockaddr_in in = {.sin_family = AF_INET};
	socklen_t len = sizeof(in);
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

	in.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (fd < 0 || bind(fd, (struct sockaddr *)&in, sizeof(in)) < 0 ||
	    getsockname(fd, (struct sockaddr *)&in, &len) < 0)
		die("cannot find a free port on 127.0.0.1: %s", strerror(errno));
	printf("%d\n", ntohs(in.sin_port));
	close(fd);
	return 0;
}

int main(int argc, char **argv)
{
	const char *cmd = argc > 1 ? argv[1] : "";

	alarm(BENCH_WATCHDOG_S); /* default action: terminate; children are waited for */
	signal(SIGPIPE, SIG_IGN);
	if (strcmp(cmd, "mkslot") == 0)
		return cmd_mkslot(argc - 1, argv + 1);
	if (strcmp(cmd, "freeport") == 0)
		return cmd_freeport();
	if (strcmp(cmd, "transfer") == 0)
		return cmd_transfer(argc - 1, argv + 1);
	if (strcmp(cmd, "stage") == 0)
		return cmd_stage(argc - 1, argv + 1);
	if (strcmp(cmd, "disk-cold") == 0)
		return cmd_disk_cold(argc - 1, argv + 1);
	if (strcmp(cmd, "fetch") == 0)
		return cmd_fetch(argc - 1, argv + 1);
	fprintf(stderr, "usage: kvbench mkslot|freeport|transfer|stage|disk-cold|fetch [options]\n"
	                "(bench/run drives it; see bench/README.md)\n");
	return 2;
}
