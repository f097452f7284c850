/* lookup.c: drives kvtierd's Lookup (and Info) over libkvtier for the
 * index_scale benchmark. Reads the query file the populator wrote
 * (dataset.h), checks every answer against the match it expects, and prints
 * one JSON object per command on stdout (messages go to stderr).
 *
 *   kvtier_index_lookup latency    --socket S --queries F [--count N] [--warmup W]
 *       one client thread: per-lookup latency, p50/p99/max overall and by kind
 *   kvtier_index_lookup throughput --socket S --queries F --threads T [--seconds X]
 *       T threads, one handle each, back to back for X seconds: lookups/s
 *   kvtier_index_lookup ready      --socket S --queries F --since T0 [--timeout X]
 *       restart timing: T0 is the CLOCK_MONOTONIC time (seconds, e.g. Python's
 *       time.monotonic()) at which kvtierd was exec'd. Waits until the socket
 *       accepts, then until Info succeeds, then runs one hit lookup; prints the
 *       seconds from T0 to each.
 *
 * Exit status: 0 when every call succeeded, 1 on any failed call or answer
 * that was not the expected one (the JSON is printed all the same), 2 for
 * bad usage.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "dataset.h"
#include "kvtier.h"

struct query {
	char ns[64];
	unsigned kind;
	uint32_t expected, n;
	int32_t *tokens;
};

static struct query *g_q;
static unsigned g_nq;
static const char *g_socket;

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static int read_u32(FILE *f, uint32_t *v)
{
	return fread(v, 4, 1, f) == 1 ? 0 : -1;
}

static int load_queries(const char *path)
{
	FILE *f = fopen(path, "rb");
	uint32_t magic, nns, nq;
	int rc = -1;

	if (!f) {
		fprintf(stderr, "kvtier_index_lookup: %s: %s\n", path, strerror(errno));
		return -1;
	}
	if (read_u32(f, &magic) || magic != QFILE_MAGIC || read_u32(f, &nns) || read_u32(f, &nq) ||
	    nq == 0 || nq > 100000)
		goto bad;
	g_q = calloc(nq, sizeof(*g_q));
	if (!g_q)
		goto bad;
	for (unsigned i = 0; i < nq; i++) {
		uint32_t ns;
		struct query *q = &g_q[i];
		if (read_u32(f, &ns) || read_u32(f, &q->kind) || read_u32(f, &q->expected) ||
		    read_u32(f, &q->n) || q->kind >= QUERY_KINDS || q->n > (1u << 22))
			goto bad;
		if (ns < nns)
			snprintf(q->ns, sizeof(q->ns), DATASET_NS_FMT, ns);
		else
			snprintf(q->ns, sizeof(q->ns), "bench/index-scale/unused");
		q->tokens = malloc((size_t)q->n * sizeof(int32_t));
		if (!q->tokens || fread(q->tokens, sizeof(int32_t), q->n, f) != q->n)
			goto bad;
	}
	g_nq = nq;
	rc = 0;
bad:
	if (rc)
		fprintf(stderr, "kvtier_index_lookup: %s: not a query file of the populator\n", path);
	fclose(f);
	return rc;
}

/* 0: the answer is the one the data set implies. A match may run a few
 * tokens past the expected one when the random continuation happens to agree
 * with a stored blob. */
static int check(const struct query *q, const struct kvtier_match *m)
{
	if (q->expected == 0)
		return m->found ? -1 : 0;
	if (!m->found || m->matched_tokens < q->expected || m->matched_tokens > q->expected + 64)
		return -1;
	return 0;
}

static int open_client(kvtier_client **c)
{
	struct kvtier_options o = {.timeout_ms = 10000};
	int rc = kvtier_open(c, g_socket, &o);

	if (rc)
		fprintf(stderr, "kvtier_index_lookup: kvtier_open %s: %s\n", g_socket,
			kvtier_strerror(rc));
	return rc;
}

/* CPU seconds this process has used (all threads). */
static double cpu_s(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
	       ru.ru_stime.tv_usec / 1e6;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

/* Nearest-rank percentile of sorted v[0..n). */
static double pct(const double *v, size_t n, double p)
{
	size_t i;

	if (!n)
		return NAN;
	i = (size_t)ceil(p / 100.0 * (double)n);
	return v[i ? i - 1 : 0];
}

/* ---- latency ---- */

static int cmd_latency(unsigned count, unsigned warmup)
{
	kvtier_client *c;
	struct kvtier_match m;
	double *lat = malloc(count * sizeof(double)), *kl = malloc(count * sizeof(double));
	unsigned *kind = malloc(count * sizeof(unsigned));
	unsigned errors = 0, wrong[QUERY_KINDS] = {0}, per[QUERY_KINDS] = {0};
	uint64_t matched_sum = 0;
	double cpu0;
	int rc;

	if (!lat || !kl || !kind || open_client(&c))
		return 1;
	for (unsigned i = 0; i < warmup; i++)
		(void)kvtier_lookup(c, g_q[i % g_nq].ns, g_q[i % g_nq].tokens, g_q[i % g_nq].n, &m);
	cpu0 = cpu_s();
	for (unsigned i = 0; i < count; i++) {
		/* A prime stride mixes the kinds without a fixed order. */
		const struct query *q = &g_q[(uint64_t)i * 7919 % g_nq];
		double t0 = now_s();
		rc = kvtier_lookup(c, q->ns, q->tokens, q->n, &m);
		lat[i] = (now_s() - t0) * 1e3;
		kind[i] = q->kind;
		per[q->kind]++;
		if (rc) {
			if (errors++ < 5)
				fprintf(stderr, "lookup failed: %s: %s\n", kvtier_strerror(rc),
					kvtier_errmsg(c));
		} else if (check(q, &m)) {
			if (wrong[q->kind]++ < 3)
				fprintf(stderr,
					"unexpected answer (%s): expected %u tokens, got found=%d "
					"matched=%u n_tokens=%u\n",
					query_kind_name[q->kind], q->expected, m.found,
					m.matched_tokens, m.n_tokens);
		}
		matched_sum += m.found ? m.matched_tokens : 0;
	}
	cpu0 = cpu_s() - cpu0;
	kvtier_close(c);
	printf("{\"count\": %u, \"errors\": %u, \"client_cpu_s\": %.3f", count, errors, cpu0);
	for (unsigned k = 0; k < QUERY_KINDS; k++) {
		size_t n = 0;
		for (unsigned i = 0; i < count; i++)
			if (kind[i] == k)
				kl[n++] = lat[i];
		qsort(kl, n, sizeof(double), cmp_double);
		printf(", \"%s\": {\"count\": %u, \"wrong\": %u, \"p50_ms\": %.4f, \"p99_ms\": %.4f}",
		       query_kind_name[k], per[k], wrong[k], n ? pct(kl, n, 50) : 0,
		       n ? pct(kl, n, 99) : 0);
	}
	qsort(lat, count, sizeof(double), cmp_double);
	{
		unsigned w = 0;
		for (unsigned k = 0; k < QUERY_KINDS; k++)
			w += wrong[k];
		printf(", \"wrong\": %u, \"mean_matched\": %.1f, \"p50_ms\": %.4f, \"p90_ms\": %.4f, "
		       "\"p99_ms\": %.4f, \"max_ms\": %.4f}\n",
		       w, (double)matched_sum / count, pct(lat, count, 50), pct(lat, count, 90),
		       pct(lat, count, 99), lat[count - 1]);
		rc = errors || w;
	}
	free(lat);
	free(kl);
	free(kind);
	return rc;
}

/* ---- throughput ---- */

struct tp_thread {
	pthread_t th;
	unsigned id;
	double seconds;
	uint64_t done, errors, wrong;
	int rc;
};

static pthread_barrier_t g_barrier;
static atomic_int g_open_failed;

static void *tp_main(void *arg)
{
	struct tp_thread *t = arg;
	kvtier_client *c = NULL;
	struct kvtier_match m;
	unsigned i = t->id * 7919u;
	double start;
	int ok = open_client(&c) == 0;

	/* Connect and warm up before the clock starts. */
	for (unsigned w = 0; ok && w < 20; w++)
		(void)kvtier_lookup(c, g_q[(i + w) % g_nq].ns, g_q[(i + w) % g_nq].tokens,
				    g_q[(i + w) % g_nq].n, &m);
	if (!ok)
		atomic_store(&g_open_failed, 1);
	pthread_barrier_wait(&g_barrier);
	if (!ok)
		return NULL;
	start = now_s();
	while (now_s() - start < t->seconds) {
		const struct query *q = &g_q[i++ % g_nq];
		int rc = kvtier_lookup(c, q->ns, q->tokens, q->n, &m);
		if (rc)
			t->errors++;
		else if (check(q, &m))
			t->wrong++;
		t->done++;
	}
	kvtier_close(c);
	return NULL;
}

static int cmd_throughput(unsigned threads, double seconds)
{
	struct tp_thread *t = calloc(threads, sizeof(*t));
	uint64_t done = 0, errors = 0, wrong = 0;
	double start, elapsed, cpu0;

	if (!t)
		return 1;
	pthread_barrier_init(&g_barrier, NULL, threads + 1);
	for (unsigned i = 0; i < threads; i++) {
		t[i].id = i;
		t[i].seconds = seconds;
		if (pthread_create(&t[i].th, NULL, tp_main, &t[i])) {
			fprintf(stderr, "kvtier_index_lookup: cannot start thread %u\n", i);
			exit(1);
		}
	}
	pthread_barrier_wait(&g_barrier);
	start = now_s();
	cpu0 = cpu_s();
	for (unsigned i = 0; i < threads; i++)
		pthread_join(t[i].th, NULL);
	elapsed = now_s() - start;
	cpu0 = cpu_s() - cpu0;
	for (unsigned i = 0; i < threads; i++) {
		done += t[i].done;
		errors += t[i].errors;
		wrong += t[i].wrong;
	}
	printf("{\"threads\": %u, \"lookups\": %" PRIu64 ", \"seconds\": %.3f, \"per_s\": %.1f, "
	       "\"client_cpu_s\": %.3f, \"errors\": %" PRIu64 ", \"wrong\": %" PRIu64 "}\n",
	       threads, done, elapsed, done / elapsed, cpu0, errors, wrong);
	free(t);
	return errors || wrong || atomic_load(&g_open_failed);
}

/* ---- ready (restart) ---- */

static int socket_accepts(const char *path)
{
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	int fd, ok;

	if (strncmp(path, "unix:", 5) == 0)
		path += 5;
	if (strlen(path) >= sizeof(a.sun_path))
		return 0;
	strcpy(a.sun_path, path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return 0;
	ok = connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0;
	close(fd);
	return ok;
}

static int cmd_ready(double since, double timeout)
{
	struct kvtier_info *info = malloc(sizeof(*info));
	struct kvtier_match m;
	kvtier_client *c = NULL;
	double t_conn, t_info, t_lookup;
	const struct query *q = NULL;
	int rc = 1;

	for (unsigned i = 0; i < g_nq && !q; i++)
		if (g_q[i].expected)
			q = &g_q[i];
	if (!info || !q)
		goto out;
	while (!socket_accepts(g_socket)) {
		if (now_s() - since > timeout) {
			fprintf(stderr, "kvtier_index_lookup: %s not accepting after %.0f s\n",
				g_socket, timeout);
			goto out;
		}
		usleep(1000);
	}
	t_conn = now_s() - since;
	/* A fresh handle per try: a channel's reconnect back-off would add
	 * its own delay to the measurement. */
	for (;;) {
		if (open_client(&c))
			goto out;
		rc = kvtier_info(c, info);
		if (rc == 0)
			break;
		kvtier_close(c);
		c = NULL;
		if (now_s() - since > timeout) {
			fprintf(stderr, "kvtier_index_lookup: Info still failing after %.0f s: %s\n",
				timeout, kvtier_strerror(rc));
			rc = 1;
			goto out;
		}
		usleep(1000);
	}
	t_info = now_s() - since;
	rc = kvtier_lookup(c, q->ns, q->tokens, q->n, &m);
	t_lookup = now_s() - since;
	if (rc) {
		fprintf(stderr, "kvtier_index_lookup: first lookup failed: %s: %s\n",
			kvtier_strerror(rc), kvtier_errmsg(c));
		rc = 1;
		goto out;
	}
	printf("{\"connect_s\": %.4f, \"info_s\": %.4f, \"lookup_s\": %.4f, \"lookup_ok\": %s, "
	       "\"blobs_tier0\": %" PRIu64 "}\n",
	       t_conn, t_info, t_lookup, check(q, &m) ? "false" : "true", info->tiers[0].blobs);
	rc = check(q, &m) ? 1 : 0;
out:
	if (c)
		kvtier_close(c);
	free(info);
	return rc;
}

static void usage(FILE *f)
{
	fprintf(f, "Usage: kvtier_index_lookup latency|throughput|ready --socket PATH --queries FILE\n"
		   "         [--count N] [--warmup N] [--threads T] [--seconds X] [--since T0]\n"
		   "         [--timeout X]\n");
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{"socket", required_argument, 0, 'S'},  {"queries", required_argument, 0, 'q'},
		{"count", required_argument, 0, 'n'},   {"warmup", required_argument, 0, 'w'},
		{"threads", required_argument, 0, 't'}, {"seconds", required_argument, 0, 's'},
		{"since", required_argument, 0, 'a'},   {"timeout", required_argument, 0, 'T'},
		{"help", no_argument, 0, 'h'},          {0, 0, 0, 0}};
	const char *cmd, *qfile = NULL;
	unsigned count = 2000, warmup = 200, threads = 2;
	double seconds = 3, since = -1, timeout = 60;
	int c;

	if (argc < 2) {
		usage(stderr);
		return 2;
	}
	cmd = argv[1];
	optind = 2;
	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 'S': g_socket = optarg; break;
		case 'q': qfile = optarg; break;
		case 'n': count = (unsigned)strtoul(optarg, NULL, 10); break;
		case 'w': warmup = (unsigned)strtoul(optarg, NULL, 10); break;
		case 't': threads = (unsigned)strtoul(optarg, NULL, 10); break;
		case 's': seconds = strtod(optarg, NULL); break;
		case 'a': since = strtod(optarg, NULL); break;
		case 'T': timeout = strtod(optarg, NULL); break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (!g_socket || !qfile || !count || !threads || threads > 256) {
		usage(stderr);
		return 2;
	}
	if (load_queries(qfile))
		return 1;
	if (strcmp(cmd, "latency") == 0)
		return cmd_latency(count, warmup);
	if (strcmp(cmd, "throughput") == 0)
		return cmd_throughput(threads, seconds);
	if (strcmp(cmd, "ready") == 0 && since >= 0)
		return cmd_ready(since, timeout);
	usage(stderr);
	return 2;
}
