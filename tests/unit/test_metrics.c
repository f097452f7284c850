/* test_metrics.c: the Prometheus exposition of daemon/metrics.c.
 *
 * Includes metrics.c to reach its static helpers, so it needs no store: the
 * RPC families are checked through metrics_render(NULL), the store families
 * through metrics_render_page() with a made-up snapshot. Checks exact counter
 * values, cumulative buckets, HELP/TYPE for every sample, label escaping,
 * "HOST:PORT" parsing, and the HTTP endpoint (200 / 404 / 405) on loopback.
 * When promtool is on PATH, both pages must pass `promtool check metrics`
 * with no lint message. Link with libmicrohttpd, not with metrics.c.
 */
#include "../../daemon/metrics.c"

#include <arpa/inet.h>
#include <sys/wait.h>

#include "check.h"

/* Value of the sample whose name+labels are exactly `series`; CHECKs that
 * it occurs exactly once. */
static double sample(const char *text, const char *series)
{
	size_t sl = strlen(series);
	const char *p = text, *hit = NULL;
	int n = 0;

	while (p && *p) {
		if (strncmp(p, series, sl) == 0 && p[sl] == ' ') {
			hit = p + sl + 1;
			n++;
		}
		p = strchr(p, '\n');
		if (p)
			p++;
	}
	if (n != 1)
		fprintf(stderr, "series %s occurs %d times\n", series, n);
	CHECK_EQ_INT(n, 1);
	return strtod(hit, NULL);
}

static int has_series(const char *text, const char *series)
{
	size_t sl = strlen(series);

	for (const char *p = text; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL)
		if (strncmp(p, series, sl) == 0 && p[sl] == ' ')
			return 1;
	return 0;
}

/* Structural checks without promtool: every line is a comment or a sample;
 * each sample's family has a TYPE (histogram samples through their
 * _bucket/_sum/_count suffix) that came with a HELP before it; no series
 * twice; no empty line. */
static void check_structure(const char *text)
{
	char *copy = strdup(text), *save = NULL, *line;
	char typed[512][128], helped[512][128], types[512][16];
	char **seen = NULL;
	size_t n_typed = 0, n_helped = 0, n_seen = 0;

	CHECK(copy);
	CHECK(strlen(text) > 0 && text[strlen(text) - 1] == '\n');
	for (line = strtok_r(copy, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		char name[128], base[128];
		size_t nl;
		int found = -1;
		if (strncmp(line, "# HELP ", 7) == 0) {
			CHECK(n_helped < 512);
			CHECK(sscanf(line + 7, "%127s", helped[n_helped]) == 1);
			n_helped++;
			continue;
		}
		if (strncmp(line, "# TYPE ", 7) == 0) {
			CHECK(n_typed < 512);
			CHECK(sscanf(line + 7, "%127s %15s", typed[n_typed], types[n_typed]) == 2);
			/* the HELP of this family came right before */
			CHECK(n_helped > 0 && strcmp(helped[n_helped - 1], typed[n_typed]) == 0);
			for (size_t i = 0; i < n_typed; i++)
				CHECK(strcmp(typed[i], typed[n_typed]) != 0);
			n_typed++;
			continue;
		}
		CHECK(line[0] != '#');
		nl = strcspn(line, "{ ");
		CHECK(nl > 0 && nl < sizeof(name));
		memcpy(name, line, nl);
		name[nl] = '\0';
		/* the sample belongs to the family typed last */
		CHECK(n_typed > 0);
		snprintf(base, sizeof(base), "%s", name);
		if (strcmp(typed[n_typed - 1], name) == 0) {
			found = (int)n_typed - 1;
		} else {
			static const char *const sfx[] = {"_bucket", "_sum", "_count"};
			for (int k = 0; k < 3; k++) {
				size_t bl = strlen(name), sl = strlen(sfx[k]);
				if (bl > sl && strcmp(name + bl - sl, sfx[k]) == 0) {
					base[bl - sl] = '\0';
					if (strcmp(typed[n_typed - 1], base) == 0 &&
					    strcmp(types[n_typed - 1], "histogram") == 0)
						found = (int)n_typed - 1;
					break;
				}
			}
		}
		if (found < 0)
			fprintf(stderr, "sample outside its family: %s\n", line);
		CHECK(found >= 0);
		if (strcmp(types[found], "counter") == 0)
			CHECK(nl > 6 && strcmp(name + nl - 6, "_total") == 0);
		/* no series twice */
		{
			size_t sl = strrchr(line, ' ') - line;
			for (size_t i = 0; i < n_seen; i++)
				CHECK(strlen(seen[i]) != sl || strncmp(seen[i], line, sl) != 0);
			seen = realloc(seen, (n_seen + 1) * sizeof(*seen));
			CHECK(seen);
			seen[n_seen] = strndup(line, sl);
			CHECK(seen[n_seen]);
			n_seen++;
		}
	}
	for (size_t i = 0; i < n_seen; i++)
		free(seen[i]);
	free(seen);
	free(copy);
}

/* For each method: buckets in the label order, non-decreasing, and the +Inf
 * bucket equal to _count. */
static void check_histograms(const char *text)
{
	char series[256];

	for (int m = 0; m < RPC_METHOD_COUNT; m++) {
		double prev = 0, v = 0, count;
		for (int b = 0; b < METRICS_BUCKETS; b++) {
			snprintf(series, sizeof(series),
				 "kvtier_rpc_duration_seconds_bucket{method=\"%s\",le=\"%s\"}",
				 rpc_method_names[m], metrics_bucket_labels[b]);
			v = sample(text, series);
			CHECK(v >= prev);
			prev = v;
		}
		snprintf(series, sizeof(series), "kvtier_rpc_duration_seconds_count{method=\"%s\"}",
			 rpc_method_names[m]);
		count = sample(text, series);
		CHECK(count == v);
	}
}

static double bucket(const char *text, const char *method, const char *le)
{
	char series[256];

	snprintf(series, sizeof(series), "kvtier_rpc_duration_seconds_bucket{method=\"%s\",le=\"%s\"}",
		 method, le);
	return sample(text, series);
}

static int promtool_available(void)
{
	return system("command -v promtool >/dev/null 2>&1") == 0;
}

/* promtool check metrics must exit 0 and print nothing (no lint message). */
static void check_promtool(const char *text, const char *what)
{
	char path[] = "/tmp/test_metrics.XXXXXX", outp[] = "/tmp/test_metrics_out.XXXXXX";
	char cmd[256], buf[4096];
	int fd = mkstemp(path), ofd = mkstemp(outp), st;
	size_t n, len = strlen(text);
	FILE *f;

	CHECK(fd >= 0 && ofd >= 0);
	CHECK(write(fd, text, len) == (ssize_t)len);
	close(fd);
	close(ofd);
	snprintf(cmd, sizeof(cmd), "promtool check metrics < %s > %s 2>&1", path, outp);
	st = system(cmd);
	f = fopen(outp, "r");
	CHECK(f);
	n = fread(buf, 1, sizeof(buf) - 1, f);
	buf[n] = '\0';
	fclose(f);
	if (st != 0 || n != 0)
		fprintf(stderr, "promtool on %s (exit %d):\n%s\npage kept in %s\n", what,
			WIFEXITED(st) ? WEXITSTATUS(st) : -1, buf, path);
	CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
	CHECK_EQ_INT(n, 0);
	unlink(path);
	unlink(outp);
}

static char *render_to_string(const struct store_stats *st, const struct store_ns_stats *ns,
			      size_t n)
{
	char *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);

	CHECK(f);
	metrics_render_page(f, st, ns, n);
	CHECK(!ferror(f));
	CHECK(fclose(f) == 0);
	return buf;
}

static char *escaped(const char *v)
{
	char *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);

	CHECK(f);
	metrics_label_value(f, v);
	CHECK(fclose(f) == 0);
	return buf;
}

static void test_rpc(void)
{
	char *text;

	metrics_rpc_observe(RPC_LOOKUP, 0, 0.00005);  /* le 0.0001 */
	metrics_rpc_observe(RPC_LOOKUP, 0, 0.001);    /* exactly a bound: le 0.001 */
	metrics_rpc_observe(RPC_LOOKUP, 0, 0.003);    /* le 0.005 */
	metrics_rpc_observe(RPC_LOOKUP, 3, 20.0);     /* +Inf only */
	metrics_rpc_observe(RPC_PUT, 3, 0.7);         /* le 1 */
	metrics_rpc_observe(RPC_FETCH, 42, -1.0);     /* bad status: UNKNOWN; bad time: 0 */
	metrics_rpc_observe(-1, 0, 1.0);              /* ignored */
	metrics_rpc_observe(RPC_METHOD_COUNT, 0, 1.0); /* ignored */

	text = metrics_render(NULL);
	CHECK(text);
	check_structure(text);
	check_histograms(text);

	CHECK(sample(text, "kvtier_rpc_calls_total{method=\"Lookup\",code=\"OK\"}") == 3);
	CHECK(sample(text, "kvtier_rpc_calls_total{method=\"Lookup\",code=\"INVALID_ARGUMENT\"}") ==
	      1);
	CHECK(sample(text, "kvtier_rpc_calls_total{method=\"Put\",code=\"INVALID_ARGUMENT\"}") == 1);
	CHECK(sample(text, "kvtier_rpc_calls_total{method=\"Put\",code=\"OK\"}") == 0);
	CHECK(sample(text, "kvtier_rpc_calls_total{method=\"Fetch\",code=\"UNKNOWN\"}") == 1);
	CHECK(sample(text, "kvtier_rpc_calls_total{method=\"Info\",code=\"OK\"}") == 0);
	CHECK(sample(text, "kvtier_rpc_calls_total{method=\"Report\",code=\"OK\"}") == 0);
	CHECK(!has_series(text, "kvtier_rpc_calls_total{method=\"Info\",code=\"INVALID_ARGUMENT\"}"));

	CHECK(bucket(text, "Lookup", "0.0001") == 1);
	CHECK(bucket(text, "Lookup", "0.00025") == 1);
	CHECK(bucket(text, "Lookup", "0.0005") == 1);
	CHECK(bucket(text, "Lookup", "0.001") == 2);
	CHECK(bucket(text, "Lookup", "0.0025") == 2);
	CHECK(bucket(text, "Lookup", "0.005") == 3);
	CHECK(bucket(text, "Lookup", "10") == 3);
	CHECK(bucket(text, "Lookup", "+Inf") == 4);
	CHECK(sample(text, "kvtier_rpc_duration_seconds_count{method=\"Lookup\"}") == 4);
	CHECK(strstr(text, "kvtier_rpc_duration_seconds_sum{method=\"Lookup\"} 20.004050000\n"));
	CHECK(bucket(text, "Put", "0.5") == 0);
	CHECK(bucket(text, "Put", "1") == 1);
	CHECK(strstr(text, "kvtier_rpc_duration_seconds_sum{method=\"Put\"} 0.700000000\n"));
	CHECK(bucket(text, "Fetch", "0.0001") == 1);
	CHECK(strstr(text, "kvtier_rpc_duration_seconds_sum{method=\"Fetch\"} 0.000000000\n"));
	CHECK(bucket(text, "Info", "+Inf") == 0);

	/* no store: no store families */
	CHECK(!strstr(text, "kvtier_lookups_total"));
	CHECK(!strstr(text, "kvtier_tier_"));
	/* process basics */
	CHECK(sample(text, "process_resident_memory_bytes") > 0);
	CHECK(sample(text, "process_open_fds") >= 3);
	CHECK(sample(text, "process_start_time_seconds") > 1.6e9);
	CHECK(sample(text, "process_cpu_seconds_total") >= 0);
	CHECK(strstr(text, "kvtier_build_info{version=\""));

	if (promtool_available())
		check_promtool(text, "metrics_render(NULL)");
	free(text);
}

static void test_escape(void)
{
	char *e;

	e = escaped("plain-ns/1");
	CHECK(strcmp(e, "plain-ns/1") == 0);
	free(e);
	e = escaped("a\"b\\c\nd");
	CHECK(strcmp(e, "a\\\"b\\\\c\\nd") == 0);
	free(e);
	e = escaped("x\xffy\xc3");                     /* invalid bytes, cut sequence */
	CHECK(strcmp(e, "x\\\\xffy\\\\xc3") == 0);
	free(e);
	e = escaped("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"); /* valid UTF-8 stays */
	CHECK(strcmp(e, "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80") == 0);
	free(e);
	e = escaped("\xc0\xaf\xed\xa0\x80"); /* overlong '/', surrogate */
	CHECK(strcmp(e, "\\\\xc0\\\\xaf\\\\xed\\\\xa0\\\\x80") == 0);
	free(e);
}

static void test_store_families(void)
{
	struct store_stats st;
	struct store_ns_stats ns[3];
	char *text;

	memset(&st, 0, sizeof(st));
	memset(ns, 0, sizeof(ns));
	st.blobs = 5;
	st.bytes = 123456789;
	st.lookups = 7;
	st.hits = 4;
	st.matched_tokens = 1096;
	st.puts = 6;
	st.puts_state[SLOT_STATE_KV] = 4;
	st.puts_state[SLOT_STATE_OPAQUE] = 2;
	st.put_bytes = 1ull << 40;
	st.supersessions = 1;
	st.active_leases = 2;
	st.reconcile_removed_files = 3;
	st.n_tiers = 2;
	st.tiers[0] = (struct store_tier_stats){.index = 0, .kind = "tmpfs", .path = "/dev/shm/x",
						.capacity = 67108864, .used = 1000, .blobs = 3,
						.read_bytes = 10, .read_seconds = 0.25,
						.write_seconds = 1e-7, .read_bytes_per_s = 3.5e9};
	st.tiers[1] = (struct store_tier_stats){.index = 1, .kind = "disk", .path = "/var/x",
						.capacity = 1ull << 37, .reserved = 4096,
						.read_fixed_s = NAN};
	snprintf(ns[0].ns, sizeof(ns[0].ns), "ns-test");
	ns[0].blobs = 3;
	ns[0].opaque_blobs = 1;
	ns[0].lookups = 5;
	ns[0].hits = 4;
	ns[0].prefill_tps = 93.75;
	snprintf(ns[1].ns, sizeof(ns[1].ns), "we\"ird\\ns\nx");
	ns[1].blobs = 2;
	snprintf(ns[2].ns, sizeof(ns[2].ns), "bad\xff");
	ns[2].bytes = 1;

	text = render_to_string(&st, ns, 3);
	check_structure(text);
	CHECK(sample(text, "kvtier_blobs") == 5);
	CHECK(sample(text, "kvtier_bytes") == 123456789);
	CHECK(sample(text, "kvtier_lookups_total") == 7);
	CHECK(sample(text, "kvtier_lookup_hits_total") == 4);
	CHECK(sample(text, "kvtier_matched_tokens_total") == 1096);
	CHECK(strstr(text, "\nkvtier_put_bytes_total 1099511627776\n"));
	CHECK(sample(text, "kvtier_active_leases") == 2);
	CHECK(sample(text, "kvtier_reconcile_removed_files_total") == 3);
	CHECK(sample(text, "kvtier_quarantined_total") == 0);
	CHECK(strstr(text, "\nkvtier_tier_capacity_bytes{tier=\"0\",kind=\"tmpfs\"} 67108864\n"));
	CHECK(strstr(text, "\nkvtier_tier_capacity_bytes{tier=\"1\",kind=\"disk\"} 137438953472\n"));
	CHECK(sample(text, "kvtier_tier_reserved_bytes{tier=\"1\",kind=\"disk\"}") == 4096);
	CHECK(strstr(text, "\nkvtier_tier_read_seconds_total{tier=\"0\",kind=\"tmpfs\"} 0.25\n"));
	CHECK(strstr(text, "\nkvtier_tier_write_seconds_total{tier=\"0\",kind=\"tmpfs\"} 1e-07\n"));
	CHECK(strstr(text, "\nkvtier_tier_model_read_fixed_seconds{tier=\"1\",kind=\"disk\"} NaN\n"));
	CHECK(sample(text, "kvtier_tier_blobs{tier=\"0\",kind=\"tmpfs\"}") == 3);
	CHECK(sample(text, "kvtier_namespace_blobs{namespace=\"ns-test\"}") == 3);
	CHECK(sample(text, "kvtier_namespace_opaque_blobs{namespace=\"ns-test\"}") == 1);
	CHECK(sample(text, "kvtier_namespace_opaque_blobs{namespace=\"we\\\"ird\\\\ns\\nx\"}") == 0);
	CHECK(sample(text, "kvtier_puts_by_state_total{state=\"kv\"}") == 4);
	CHECK(sample(text, "kvtier_puts_by_state_total{state=\"opaque\"}") == 2);
	CHECK(sample(text, "kvtier_puts_by_state_total{state=\"kv-2025\"}") == 0);
	CHECK(sample(text, "kvtier_puts_by_state_total{state=\"recurrent\"}") == 0);
	CHECK(sample(text, "kvtier_puts_by_state_total{state=\"hybrid\"}") == 0);
	CHECK(sample(text, "kvtier_namespace_lookups_total{namespace=\"ns-test\"}") == 5);
	CHECK(sample(text, "kvtier_namespace_hits_total{namespace=\"ns-test\"}") == 4);
	CHECK(strstr(text,
		     "\nkvtier_namespace_prefill_tokens_per_second{namespace=\"ns-test\"} 93.75\n"));
	CHECK(sample(text, "kvtier_namespace_blobs{namespace=\"we\\\"ird\\\\ns\\nx\"}") == 2);
	CHECK(sample(text, "kvtier_namespace_bytes{namespace=\"bad\\\\xff\"}") == 1);
	if (promtool_available())
		check_promtool(text, "a page with store families");
	free(text);

	/* no tiers, no namespaces: families stay valid with no samples */
	memset(&st, 0, sizeof(st));
	text = render_to_string(&st, NULL, 0);
	check_structure(text);
	CHECK(sample(text, "kvtier_blobs") == 0);
	if (promtool_available())
		check_promtool(text, "an empty store");
	free(text);
}

static void test_hostport(void)
{
	char host[256], port[8], err[256];

	CHECK_EQ_INT(metrics_parse_hostport("127.0.0.1:9477", host, sizeof(host), port,
					    sizeof(port), err, sizeof(err)), 0);
	CHECK(strcmp(host, "127.0.0.1") == 0 && strcmp(port, "9477") == 0);
	CHECK_EQ_INT(metrics_parse_hostport("[::1]:65535", host, sizeof(host), port, sizeof(port),
					    err, sizeof(err)), 0);
	CHECK(strcmp(host, "::1") == 0 && strcmp(port, "65535") == 0);
	CHECK_EQ_INT(metrics_parse_hostport("localhost:1", host, sizeof(host), port, sizeof(port),
					    err, sizeof(err)), 0);
	CHECK(strcmp(host, "localhost") == 0 && strcmp(port, "1") == 0);

	static const char *const bad[] = {"",        "9477",         ":9477",  "host:",
					  "host:0",  "host:65536",   "host:-1", "host:12x",
					  "::1:9477", "[::1]9477",   "[::1",    "[]:9477",
					  "host: 80", "host:99999999999999999999"};
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		err[0] = '\0';
		if (metrics_parse_hostport(bad[i], host, sizeof(host), port, sizeof(port), err,
					   sizeof(err)) != KVTIER_E_INVALID)
			fprintf(stderr, "accepted \"%s\"\n", bad[i]);
		CHECK_EQ_INT(metrics_parse_hostport(bad[i], host, sizeof(host), port, sizeof(port),
						    err, sizeof(err)),
			     KVTIER_E_INVALID);
		CHECK(err[0] != '\0');
	}
}

/* One HTTP/1.0 exchange on 127.0.0.1:port; returns the whole response. */
static char *http(unsigned port, const char *request)
{
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
	char *buf = NULL;
	size_t len = 0, cap = 0;
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	ssize_t n;

	CHECK(fd >= 0);
	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	CHECK(connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0);
	CHECK(write(fd, request, strlen(request)) == (ssize_t)strlen(request));
	for (;;) {
		if (len + 4096 + 1 > cap) {
			cap = cap ? cap * 2 : 65536;
			buf = realloc(buf, cap);
			CHECK(buf);
		}
		n = read(fd, buf + len, cap - len - 1);
		CHECK(n >= 0);
		if (n == 0)
			break;
		len += (size_t)n;
	}
	buf[len] = '\0';
	close(fd);
	return buf;
}

/* A free loopback port, or 0 when no loopback TCP is possible here. */
static unsigned free_port(void)
{
	struct sockaddr_in sa = {.sin_family = AF_INET};
	socklen_t sl = sizeof(sa);
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	unsigned port = 0;

	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (fd < 0)
		return 0;
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0 &&
	    getsockname(fd, (struct sockaddr *)&sa, &sl) == 0)
		port = ntohs(sa.sin_port);
	close(fd);
	return port;
}

static void test_http(void)
{
	struct metrics *m = NULL, *m2 = NULL;
	char addr[64], err[256];
	unsigned port;
	char *r;
	const char *body;

	err[0] = '\0';
	CHECK_EQ_INT(metrics_start("no-port-here", NULL, &m, err, sizeof(err)), KVTIER_E_INVALID);
	CHECK(m == NULL && err[0]);
	err[0] = '\0';
	CHECK(metrics_start("host.invalid:9477", NULL, &m, err, sizeof(err)) != 0);
	CHECK(m == NULL && err[0]);

	port = free_port();
	if (port == 0)
		SKIP("no loopback TCP here: the HTTP endpoint was not tested");
	snprintf(addr, sizeof(addr), "127.0.0.1:%u", port);
	err[0] = '\0';
	if (metrics_start(addr, NULL, &m, err, sizeof(err)) != 0)
		fprintf(stderr, "metrics_start(%s): %s\n", addr, err);
	CHECK(m != NULL);

	/* the port is taken now: a second endpoint must fail with a message */
	err[0] = '\0';
	CHECK(metrics_start(addr, NULL, &m2, err, sizeof(err)) != 0);
	CHECK(m2 == NULL && err[0]);

	metrics_rpc_observe(RPC_STATS, 0, 0.01);
	r = http(port, "GET /metrics HTTP/1.0\r\n\r\n");
	CHECK(strncmp(r, "HTTP/1.0 200", 12) == 0 || strncmp(r, "HTTP/1.1 200", 12) == 0);
	CHECK(strcasestr(r, "\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
	body = strstr(r, "\r\n\r\n");
	CHECK(body);
	body += 4;
	CHECK(strncmp(body, "# HELP ", 7) == 0);
	check_structure(body);
	CHECK(sample(body, "kvtier_rpc_calls_total{method=\"Stats\",code=\"OK\"}") == 1);
	free(r);

	r = http(port, "GET /metrics?x=1 HTTP/1.0\r\n\r\n");
	CHECK(strncmp(r + 9, "200", 3) == 0);
	free(r);

	r = http(port, "HEAD /metrics HTTP/1.0\r\n\r\n");
	CHECK(strncmp(r + 9, "200", 3) == 0);
	body = strstr(r, "\r\n\r\n");
	CHECK(body && body[4] == '\0');
	free(r);

	r = http(port, "GET /other HTTP/1.0\r\n\r\n");
	CHECK(strncmp(r + 9, "404", 3) == 0);
	free(r);
	r = http(port, "GET / HTTP/1.0\r\n\r\n");
	CHECK(strncmp(r + 9, "404", 3) == 0);
	free(r);

	r = http(port, "POST /metrics HTTP/1.0\r\nContent-Length: 1\r\n\r\nx");
	CHECK(strncmp(r + 9, "405", 3) == 0);
	CHECK(strcasestr(r, "\r\nAllow: GET, HEAD\r\n"));
	free(r);
	r = http(port, "DELETE /metrics HTTP/1.0\r\n\r\n");
	CHECK(strncmp(r + 9, "405", 3) == 0);
	free(r);

	metrics_stop(m);
	metrics_stop(NULL);
}

int main(void)
{
	test_escape();
	test_hostport();
	test_rpc();
	test_store_families();
	test_http();
	if (!promtool_available())
		fprintf(stderr, "note: promtool not on PATH: the promtool check was not run\n");
	printf("test_metrics: ok\n");
	return 0;
}
