/* metrics.c: kvtierd's Prometheus endpoint (text format 0.0.4) and the RPC
 * counters behind it.
 *
 * The RPC layer calls metrics_rpc_observe() once per finished call: relaxed
 * C11 atomics, no lock, nothing allocated. Everything else is read at scrape
 * time: store_get_stats()/store_ns_stats() for the store, /proc and
 * getrusage() for the process. The page is built in a growing buffer
 * (open_memstream) and handed to libmicrohttpd, which frees it.
 *
 * Families and their labels:
 * - kvtier_rpc_calls_total{method,code}: code is the gRPC status name. Every
 *   method has its code="OK" series from the start; other codes appear once
 *   they happen (17 codes x 11 methods of zeros would drown the page).
 * - kvtier_rpc_duration_seconds{method}: a histogram per method over all
 *   status codes (the calls counter has the split by code).
 * - store-wide counters and gauges, per tier {tier,kind}, per namespace
 *   {namespace}: only when rendering for a store.
 * - process_*: the standard names the Prometheus client libraries use.
 * metrics_render(NULL) renders only the families that need no store (build
 * info, RPC, process): the unit test uses that.
 *
 * Label values are escaped (backslash, double quote, newline) and kept valid
 * UTF-8: a byte that is not part of a valid UTF-8 sequence is written as the
 * four characters \xNN (backslash escaped), since namespaces are arbitrary
 * bytes and the exposition must parse.
 *
 * This module must never change the store: the endpoint is read-only, every
 * other path is 404, every method but GET and HEAD is 405.
 */
#include "metrics.h"

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <microhttpd.h>

#include "kvtier.h"
#include "log.h"
#include "store.h"
#include "utf8.h"

#ifndef KVTIER_VERSION
#define KVTIER_VERSION "unknown"
#endif

#define METRICS_CONTENT_TYPE "text/plain; version=0.0.4; charset=utf-8"
#define METRICS_STATUS_COUNT 17       /* gRPC status codes 0..16 */
#define METRICS_STATUS_UNKNOWN 2      /* where out-of-range codes are counted */
#define METRICS_BUCKETS 17            /* 16 finite upper bounds and +Inf */
#define METRICS_CONN_LIMIT 32
#define METRICS_CONN_TIMEOUT_S 30

const char *const rpc_method_names[RPC_METHOD_COUNT] = {
	[RPC_INFO] = "Info",   [RPC_LOOKUP] = "Lookup",   [RPC_FETCH] = "Fetch",
	[RPC_PUT] = "Put",     [RPC_STAGE] = "Stage",     [RPC_RELEASE] = "Release",
	[RPC_ADOPT] = "Adopt", [RPC_DELETE] = "Delete",   [RPC_LIST] = "List",
	[RPC_STATS] = "Stats", [RPC_REPORT] = "Report",
};

/* grpc_status_code names, as grpc/status.h spells them. */
static const char *const metrics_status_names[METRICS_STATUS_COUNT] = {
	"OK",
	"CANCELLED",
	"UNKNOWN",
	"INVALID_ARGUMENT",
	"DEADLINE_EXCEEDED",
	"NOT_FOUND",
	"ALREADY_EXISTS",
	"PERMISSION_DENIED",
	"RESOURCE_EXHAUSTED",
	"FAILED_PRECONDITION",
	"ABORTED",
	"OUT_OF_RANGE",
	"UNIMPLEMENTED",
	"INTERNAL",
	"UNAVAILABLE",
	"DATA_LOSS",
	"UNAUTHENTICATED",
};

/* Upper bounds of the latency buckets in seconds; the label text is written
 * exactly as here (not reformatted from the double). */
static const double metrics_bucket_bounds[METRICS_BUCKETS - 1] = {
	0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
	0.05,   0.1,     0.25,   0.5,   1,      2.5,   5,     10,
};
static const char *const metrics_bucket_labels[METRICS_BUCKETS] = {
	"0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05",
	"0.1",    "0.25",    "0.5",    "1",     "2.5",    "5",     "10",   "+Inf",
};

/* The RPC counters. Static storage starts zeroed, a valid state for atomics. */
static struct {
	_Atomic uint64_t calls[RPC_METHOD_COUNT][METRICS_STATUS_COUNT];
	_Atomic uint64_t bucket[RPC_METHOD_COUNT][METRICS_BUCKETS]; /* not cumulative */
	_Atomic uint64_t sum_ns[RPC_METHOD_COUNT];
} metrics_rpc;

/* Connection counters (listener.c) and calls to unknown methods. */
static struct {
	_Atomic uint64_t accepted[CONN_LISTENER_COUNT];
	_Atomic uint64_t refused[CONN_LISTENER_COUNT][CONN_REFUSAL_COUNT];
	_Atomic int64_t waiting;
	_Atomic uint64_t unimplemented;
} metrics_conn;

const char *const metrics_conn_refusal_names[CONN_REFUSAL_COUNT] = {"limit", "exhausted",
								    "silent"};
static const char *const metrics_conn_listener_names[CONN_LISTENER_COUNT] = {"unix", "tcp"};

void metrics_conn_accepted(int listener)
{
	if (listener >= 0 && listener < CONN_LISTENER_COUNT)
		atomic_fetch_add_explicit(&metrics_conn.accepted[listener], 1, memory_order_relaxed);
}

void metrics_conn_refused(int listener, int reason)
{
	if (listener >= 0 && listener < CONN_LISTENER_COUNT && reason >= 0 &&
	    reason < CONN_REFUSAL_COUNT)
		atomic_fetch_add_explicit(&metrics_conn.refused[listener][reason], 1,
					  memory_order_relaxed);
}

void metrics_conn_waiting(int delta)
{
	atomic_fetch_add_explicit(&metrics_conn.waiting, delta, memory_order_relaxed);
}

void metrics_rpc_unimplemented(void)
{
	atomic_fetch_add_explicit(&metrics_conn.unimplemented, 1, memory_order_relaxed);
}

struct metrics {
	struct MHD_Daemon *daemon;
	struct store *store;
	char last_log[256];            /* MHD's last message, for metrics_start's err */
};

void metrics_rpc_observe(int method, int status, double seconds)
{
	double ns;
	int b = 0;

	if (method < 0 || method >= RPC_METHOD_COUNT)
		return;
	if (status < 0 || status >= METRICS_STATUS_COUNT)
		status = METRICS_STATUS_UNKNOWN;
	if (!(seconds >= 0)) /* negative or NaN: a clock step, count as 0 */
		seconds = 0;
	while (b < METRICS_BUCKETS - 1 && seconds > metrics_bucket_bounds[b])
		b++;
	ns = seconds * 1e9 + 0.5; /* rounded to the nearest nanosecond */
	if (ns > 1e18) /* 31 years: keeps the sum far from wrapping */
		ns = 1e18;
	atomic_fetch_add_explicit(&metrics_rpc.calls[method][status], 1, memory_order_relaxed);
	atomic_fetch_add_explicit(&metrics_rpc.bucket[method][b], 1, memory_order_relaxed);
	atomic_fetch_add_explicit(&metrics_rpc.sum_ns[method], (uint64_t)ns, memory_order_relaxed);
}

/* Writes v as the inside of a quoted label value. */
static void metrics_label_value(FILE *f, const char *v)
{
	const unsigned char *p = (const unsigned char *)v;

	while (*p) {
		size_t n = utf8_seq_len(p, 4); /* stops at the NUL */
		if (n == 0) {
			fprintf(f, "\\\\x%02x", *p);
			p++;
		} else if (*p == '\\') {
			fputs("\\\\", f);
			p++;
		} else if (*p == '"') {
			fputs("\\\"", f);
			p++;
		} else if (*p == '\n') {
			fputs("\\n", f);
			p++;
		} else {
			fwrite(p, 1, n, f);
			p += n;
		}
	}
}

/* Writes a float the way Prometheus parses it: NaN, +Inf, -Inf, else the
 * shortest of %.15g / %.17g that reads back exactly. */
static void metrics_double(FILE *f, double v)
{
	char buf[40];

	if (isnan(v)) {
		fputs("NaN", f);
	} else if (isinf(v)) {
		fputs(v > 0 ? "+Inf" : "-Inf", f);
	} else {
		snprintf(buf, sizeof(buf), "%.15g", v);
		if (strtod(buf, NULL) != v)
			snprintf(buf, sizeof(buf), "%.17g", v);
		fputs(buf, f);
	}
}

static void metrics_family(FILE *f, const char *name, const char *type, const char *help)
{
	fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void metrics_single_u64(FILE *f, const char *name, const char *type, const char *help,
			       uint64_t v)
{
	metrics_family(f, name, type, help);
	fprintf(f, "%s %" PRIu64 "\n", name, v);
}

static void metrics_single_double(FILE *f, const char *name, const char *type, const char *help,
				  double v)
{
	metrics_family(f, name, type, help);
	fprintf(f, "%s ", name);
	metrics_double(f, v);
	fputc('\n', f);
}

static void metrics_render_info(FILE *f)
{
	metrics_family(f, "kvtier_build_info", "gauge", "Always 1; the version of kvtierd.");
	fputs("kvtier_build_info{version=\"", f);
	metrics_label_value(f, KVTIER_VERSION);
	fputs("\"} 1\n", f);
}

static void metrics_render_rpc(FILE *f)
{
	static const char calls[] = "kvtier_rpc_calls_total";
	static const char dur[] = "kvtier_rpc_duration_seconds";

	metrics_family(f, calls, "counter", "Finished RPC calls by method and gRPC status code.");
	for (int m = 0; m < RPC_METHOD_COUNT; m++)
		for (int c = 0; c < METRICS_STATUS_COUNT; c++) {
			uint64_t v = atomic_load_explicit(&metrics_rpc.calls[m][c],
							  memory_order_relaxed);
			if (v == 0 && c != 0)
				continue;
			fprintf(f, "%s{method=\"%s\",code=\"%s\"} %" PRIu64 "\n", calls,
				rpc_method_names[m], metrics_status_names[c], v);
		}

	metrics_family(f, dur, "histogram",
		       "Duration of finished RPC calls by method, all status codes, in seconds.");
	for (int m = 0; m < RPC_METHOD_COUNT; m++) {
		uint64_t cum = 0, sum_ns;
		/* _count is the +Inf bucket as read here, so the two always agree
		 * even while calls finish during the scrape. */
		for (int b = 0; b < METRICS_BUCKETS; b++) {
			cum += atomic_load_explicit(&metrics_rpc.bucket[m][b], memory_order_relaxed);
			fprintf(f, "%s_bucket{method=\"%s\",le=\"%s\"} %" PRIu64 "\n", dur,
				rpc_method_names[m], metrics_bucket_labels[b], cum);
		}
		sum_ns = atomic_load_explicit(&metrics_rpc.sum_ns[m], memory_order_relaxed);
		fprintf(f, "%s_sum{method=\"%s\"} %" PRIu64 ".%09" PRIu64 "\n", dur,
			rpc_method_names[m], sum_ns / 1000000000u, sum_ns % 1000000000u);
		fprintf(f, "%s_count{method=\"%s\"} %" PRIu64 "\n", dur, rpc_method_names[m], cum);
	}
}

static void metrics_render_conn(FILE *f)
{
	static const char acc[] = "kvtier_connections_accepted_total";
	static const char ref[] = "kvtier_connections_refused_total";
	int64_t waiting = atomic_load_explicit(&metrics_conn.waiting, memory_order_relaxed);

	metrics_family(f, acc, "counter",
		       "Client connections handed to gRPC, by listener (unix, tcp).");
	for (int l = 0; l < CONN_LISTENER_COUNT; l++)
		fprintf(f, "%s{listener=\"%s\"} %" PRIu64 "\n", acc, metrics_conn_listener_names[l],
			atomic_load_explicit(&metrics_conn.accepted[l], memory_order_relaxed));
	metrics_family(f, ref, "counter",
		       "Client connections closed by kvtierd before gRPC saw them, by listener "
		       "and reason: limit (descriptor cap), exhausted (accept failed, e.g. "
		       "EMFILE), silent (nothing sent within --handshake-timeout-ms).");
	for (int l = 0; l < CONN_LISTENER_COUNT; l++)
		for (int r = 0; r < CONN_REFUSAL_COUNT; r++)
			fprintf(f, "%s{listener=\"%s\",reason=\"%s\"} %" PRIu64 "\n", ref,
				metrics_conn_listener_names[l], metrics_conn_refusal_names[r],
				atomic_load_explicit(&metrics_conn.refused[l][r],
						     memory_order_relaxed));
	metrics_single_u64(f, "kvtier_connections_waiting", "gauge",
			   "Client connections accepted and waiting for their first bytes.",
			   waiting > 0 ? (uint64_t)waiting : 0);
	metrics_single_u64(f, "kvtier_rpc_unimplemented_total", "counter",
			   "Calls to a method this kvtierd does not serve (answered UNIMPLEMENTED).",
			   atomic_load_explicit(&metrics_conn.unimplemented, memory_order_relaxed));
}

/* One family per row, read from a struct by offset: keeps the long lists of
 * counters below in tables instead of code. */
struct metrics_field {
	const char *name;
	const char *type;
	const char *help;
	size_t off;
	int is_double;
};

#define METRICS_U64(st, field, name, type, help) {name, type, help, offsetof(st, field), 0}
#define METRICS_DBL(st, field, name, type, help) {name, type, help, offsetof(st, field), 1}

static const struct metrics_field metrics_store_fields[] = {
	METRICS_U64(struct store_stats, lookups, "kvtier_lookups_total", "counter",
		    "Lookups since start."),
	METRICS_U64(struct store_stats, hits, "kvtier_lookup_hits_total", "counter",
		    "Lookups that found a blob since start."),
	METRICS_U64(struct store_stats, matched_tokens, "kvtier_matched_tokens_total", "counter",
		    "Tokens matched by lookup hits since start."),
	METRICS_U64(struct store_stats, puts, "kvtier_puts_total", "counter",
		    "New blobs stored by Put or Adopt since start (not counting deduplicated ones)."),
	METRICS_U64(struct store_stats, put_bytes, "kvtier_put_bytes_total", "counter",
		    "Bytes of blobs stored since start."),
	METRICS_U64(struct store_stats, adopts, "kvtier_adopts_total", "counter",
		    "Blobs taken in by Adopt since start."),
	METRICS_U64(struct store_stats, dedups, "kvtier_dedups_total", "counter",
		    "Puts whose content was already stored since start."),
	METRICS_U64(struct store_stats, supersessions, "kvtier_supersessions_total", "counter",
		    "Blobs dropped because a new blob extends them since start."),
	METRICS_U64(struct store_stats, refused, "kvtier_refused_total", "counter",
		    "Puts and adopts refused (bad file, layout mismatch, full) since start."),
	METRICS_U64(struct store_stats, fetches, "kvtier_fetches_total", "counter",
		    "Fetch streams opened since start."),
	METRICS_U64(struct store_stats, fetch_bytes, "kvtier_fetch_bytes_total", "counter",
		    "Bytes served by Fetch since start."),
	METRICS_U64(struct store_stats, stages, "kvtier_stages_total", "counter",
		    "Blobs staged into slot directories since start."),
	METRICS_U64(struct store_stats, stage_copies, "kvtier_stage_copies_total", "counter",
		    "Stages that had to copy instead of hard-linking since start."),
	METRICS_U64(struct store_stats, stage_checks, "kvtier_stage_checks_total", "counter",
		    "Parts a hard-link Stage read to check their CRC-32C since start."),
	METRICS_U64(struct store_stats, stage_check_bytes, "kvtier_stage_check_bytes_total",
		    "counter", "Bytes those checks read since start."),
	METRICS_U64(struct store_stats, adopt_copies, "kvtier_adopt_copies_total", "counter",
		    "Adopts that copied a file they could have linked since start."),
	METRICS_U64(struct store_stats, releases, "kvtier_releases_total", "counter",
		    "Leases released by clients since start."),
	METRICS_U64(struct store_stats, lease_expiries, "kvtier_lease_expiries_total", "counter",
		    "Leases that timed out since start."),
	METRICS_U64(struct store_stats, deletes, "kvtier_deletes_total", "counter",
		    "Blobs deleted since start."),
	METRICS_U64(struct store_stats, quarantined, "kvtier_quarantined_total", "counter",
		    "Blobs quarantined since start."),
	METRICS_U64(struct store_stats, checksum_failures, "kvtier_checksum_failures_total",
		    "counter", "Blob parts that failed their checksum on read (dropped) since start."),
	METRICS_U64(struct store_stats, promotions_declined, "kvtier_promotions_declined_total",
		    "counter", "Hits on a lower tier that the policy left there (value too low)."),
	METRICS_U64(struct store_stats, reconcile_removed_files,
		    "kvtier_reconcile_removed_files_total", "counter",
		    "Files removed by the start-up reconcile (temporaries, orphans, stale stages)."),
	METRICS_U64(struct store_stats, reconcile_removed_blobs,
		    "kvtier_reconcile_removed_blobs_total", "counter",
		    "Index records dropped by the start-up reconcile (files missing or wrong)."),
	METRICS_U64(struct store_stats, remove_failures, "kvtier_remove_failures_total", "counter",
		    "Removals of deleted blobs' files that failed (each is retried) since start."),
	METRICS_U64(struct store_stats, removals_pending, "kvtier_removals_pending", "gauge",
		    "Files of deleted blobs whose removal failed and waits for a retry now."),
	METRICS_U64(struct store_stats, missing_dropped, "kvtier_missing_blobs_dropped_total",
		    "counter", "Blobs dropped while running because their files were gone."),
	METRICS_U64(struct store_stats, active_leases, "kvtier_active_leases", "gauge",
		    "Leases held now."),
	METRICS_U64(struct store_stats, blobs, "kvtier_blobs", "gauge", "Blobs stored now."),
	METRICS_U64(struct store_stats, bytes, "kvtier_bytes", "gauge",
		    "Bytes of blobs stored now, all tiers."),
};

static const struct metrics_field metrics_tier_fields[] = {
	METRICS_U64(struct store_tier_stats, capacity, "kvtier_tier_capacity_bytes", "gauge",
		    "Configured capacity of the tier in bytes."),
	METRICS_U64(struct store_tier_stats, used, "kvtier_tier_used_bytes", "gauge",
		    "Bytes of committed files on the tier."),
	METRICS_U64(struct store_tier_stats, reserved, "kvtier_tier_reserved_bytes", "gauge",
		    "Bytes reserved on the tier by writes in progress."),
	METRICS_U64(struct store_tier_stats, blobs, "kvtier_tier_blobs", "gauge",
		    "Blobs stored on the tier."),
	METRICS_U64(struct store_tier_stats, read_bytes, "kvtier_tier_read_bytes_total",
		    "counter", "Bytes read from the tier since start."),
	METRICS_U64(struct store_tier_stats, write_bytes, "kvtier_tier_written_bytes_total",
		    "counter", "Bytes written to the tier since start."),
	METRICS_DBL(struct store_tier_stats, read_seconds, "kvtier_tier_read_seconds_total",
		    "counter", "Time spent reading from the tier since start, in seconds."),
	METRICS_DBL(struct store_tier_stats, write_seconds, "kvtier_tier_write_seconds_total",
		    "counter", "Time spent writing to the tier since start, in seconds."),
	METRICS_DBL(struct store_tier_stats, read_bytes_per_s,
		    "kvtier_tier_model_read_bytes_per_second", "gauge",
		    "Measured read throughput of the tier's restore model (0: not measured yet)."),
	METRICS_DBL(struct store_tier_stats, read_fixed_s, "kvtier_tier_model_read_fixed_seconds",
		    "gauge", "Measured fixed cost per read of the tier's restore model, in seconds."),
	METRICS_U64(struct store_tier_stats, model_samples, "kvtier_tier_model_samples_total",
		    "counter", "Real reads the tier's restore model learned from since start."),
	METRICS_DBL(struct store_tier_stats, high, "kvtier_tier_high_watermark_bytes", "gauge",
		    "Usage above which the tier sheds its lowest-value blobs."),
	METRICS_DBL(struct store_tier_stats, low, "kvtier_tier_low_watermark_bytes", "gauge",
		    "Usage that shedding brings the tier back under."),
	METRICS_U64(struct store_tier_stats, raw_bytes, "kvtier_tier_raw_bytes", "gauge",
		    "Bytes of the blobs on the tier as served (before compression)."),
	METRICS_U64(struct store_tier_stats, stored_bytes, "kvtier_tier_stored_bytes", "gauge",
		    "Bytes of the blobs on the tier as stored (after compression)."),
	METRICS_DBL(struct store_tier_stats, compression_ratio, "kvtier_tier_compression_ratio",
		    "gauge", "Raw over stored bytes of the blobs on the tier (1: uncompressed)."),
	METRICS_DBL(struct store_tier_stats, gdsf_base, "kvtier_tier_gdsf_base", "gauge",
		    "GreedyDual-Size-Frequency inflation value L of the tier (docs/policy.md)."),
	METRICS_U64(struct store_tier_stats, moved_in, "kvtier_tier_migrations_in_total",
		    "counter", "Blobs moved onto the tier from another tier."),
	METRICS_U64(struct store_tier_stats, moved_out, "kvtier_tier_migrations_out_total",
		    "counter", "Blobs moved off the tier to another tier."),
	METRICS_U64(struct store_tier_stats, enospc, "kvtier_tier_enospc_total", "counter",
		    "Writes to the tier that hit ENOSPC (its file system filled before its capacity)."),
	METRICS_U64(struct store_tier_stats, dir_missing, "kvtier_tier_dir_missing", "gauge",
		    "1 while the tier's directory is removed, or its path names another directory."),
	METRICS_U64(struct store_tier_stats, dir_events, "kvtier_tier_dir_lost_total", "counter",
		    "Times the tier's directory was found removed or moved since start."),
};

static const struct metrics_field metrics_ns_fields[] = {
	METRICS_U64(struct store_ns_stats, lookups, "kvtier_namespace_lookups_total", "counter",
		    "Lookups per namespace since start."),
	METRICS_U64(struct store_ns_stats, hits, "kvtier_namespace_hits_total", "counter",
		    "Lookup hits per namespace since start."),
	METRICS_U64(struct store_ns_stats, matched_tokens,
		    "kvtier_namespace_matched_tokens_total", "counter",
		    "Tokens matched by lookup hits per namespace since start."),
	METRICS_U64(struct store_ns_stats, blobs, "kvtier_namespace_blobs", "gauge",
		    "Blobs stored per namespace."),
	METRICS_U64(struct store_ns_stats, bytes, "kvtier_namespace_bytes", "gauge",
		    "Bytes of blobs stored per namespace."),
	METRICS_U64(struct store_ns_stats, opaque_blobs, "kvtier_namespace_opaque_blobs", "gauge",
		    "Blobs stored per namespace whose state layout kvtier did not walk (opaque)."),
	METRICS_DBL(struct store_ns_stats, prefill_tps,
		    "kvtier_namespace_prefill_tokens_per_second", "gauge",
		    "Measured prefill speed per namespace as reported by clients (0: unknown)."),
	METRICS_DBL(struct store_ns_stats, prefill_a, "kvtier_namespace_prefill_seconds_per_token",
		    "gauge", "Prefill model: seconds per token at depth 0 (0: no reports)."),
	METRICS_DBL(struct store_ns_stats, prefill_b,
		    "kvtier_namespace_prefill_seconds_per_token_per_depth", "gauge",
		    "Prefill model: extra seconds per token for each token already in the context."),
};

#define METRICS_NELEM(a) (sizeof(a) / sizeof((a)[0]))

static void metrics_field_value(FILE *f, const struct metrics_field *fd, const void *base)
{
	const char *p = (const char *)base + fd->off;

	if (fd->is_double) {
		double v;
		memcpy(&v, p, sizeof(v));
		metrics_double(f, v);
	} else {
		uint64_t v;
		memcpy(&v, p, sizeof(v));
		fprintf(f, "%" PRIu64, v);
	}
}

static void metrics_render_tier_hist(FILE *f, const char *name, const char *help,
				     const struct store_stats *st, unsigned n_tiers, int reads)
{
	metrics_family(f, name, "histogram", help);
	for (unsigned t = 0; t < n_tiers; t++) {
		const struct store_tier_stats *ts = &st->tiers[t];
		const uint64_t *h = reads ? ts->read_hist : ts->write_hist;
		uint64_t cum = 0;
		for (int b = 0; b <= TIER_HIST_BUCKETS; b++) {
			cum += h[b];
			fprintf(f, "%s_bucket{tier=\"%u\",kind=\"", name, t);
			metrics_label_value(f, ts->kind ? ts->kind : "");
			fputs("\",le=\"", f);
			if (b < TIER_HIST_BUCKETS)
				metrics_double(f, tier_hist_le[b]);
			else
				fputs("+Inf", f);
			fprintf(f, "\"} %" PRIu64 "\n", cum);
		}
		fprintf(f, "%s_sum{tier=\"%u\",kind=\"", name, t);
		metrics_label_value(f, ts->kind ? ts->kind : "");
		fputs("\"} ", f);
		metrics_double(f, reads ? ts->read_hist_sum : ts->write_hist_sum);
		fprintf(f, "\n%s_count{tier=\"%u\",kind=\"", name, t);
		metrics_label_value(f, ts->kind ? ts->kind : "");
		fprintf(f, "\"} %" PRIu64 "\n", cum);
	}
}

/* The store's families from a snapshot: st, and ns[0..n_ns) per namespace. */
static void metrics_render_store(FILE *f, const struct store_stats *st,
				 const struct store_ns_stats *ns, size_t n_ns)
{
	unsigned n_tiers = st->n_tiers < STORE_MAX_TIERS ? st->n_tiers : STORE_MAX_TIERS;

	for (size_t i = 0; i < METRICS_NELEM(metrics_store_fields); i++) {
		const struct metrics_field *fd = &metrics_store_fields[i];
		metrics_family(f, fd->name, fd->type, fd->help);
		fprintf(f, "%s ", fd->name);
		metrics_field_value(f, fd, st);
		fputc('\n', f);
	}
	for (size_t i = 0; i < METRICS_NELEM(metrics_tier_fields); i++) {
		const struct metrics_field *fd = &metrics_tier_fields[i];
		metrics_family(f, fd->name, fd->type, fd->help);
		for (unsigned t = 0; t < n_tiers; t++) {
			fprintf(f, "%s{tier=\"%u\",kind=\"", fd->name, st->tiers[t].index);
			metrics_label_value(f, st->tiers[t].kind ? st->tiers[t].kind : "");
			fputs("\"} ", f);
			metrics_field_value(f, fd, &st->tiers[t]);
			fputc('\n', f);
		}
	}
	metrics_family(f, "kvtier_puts_by_state_total", "counter",
		       "New blobs stored by Put or Adopt since start, by the slot file's state layout.");
	for (uint32_t k = 0; k < STORE_STATE_KINDS; k++)
		fprintf(f, "kvtier_puts_by_state_total{state=\"%s\"} %" PRIu64 "\n",
			slot_state_kind_name(k), st->puts_state[k]);
	metrics_family(f, "kvtier_evictions_total", "counter",
		       "Blobs deleted from a tier by the placement policy, by reason.");
	for (unsigned t = 0; t < n_tiers; t++)
		for (int r = 0; r < STORE_EVICT_REASONS; r++) {
			fprintf(f, "kvtier_evictions_total{tier=\"%u\",kind=\"", t);
			metrics_label_value(f, st->tiers[t].kind ? st->tiers[t].kind : "");
			fprintf(f, "\",reason=\"%s\"} %" PRIu64 "\n", store_evict_reason_name[r],
				st->tiers[t].evictions[r]);
		}
	metrics_family(f, "kvtier_migrations_total", "counter",
		       "Blobs moved between tiers (direction up: towards the fastest).");
	for (unsigned a = 0; a < n_tiers; a++)
		for (unsigned b = 0; b < n_tiers; b++)
			if (a != b)
				fprintf(f, "kvtier_migrations_total{from=\"%u\",to=\"%u\","
					   "direction=\"%s\"} %" PRIu64 "\n", a, b,
					b < a ? "up" : "down", st->migrations[a][b]);
	metrics_render_tier_hist(f, "kvtier_tier_read_duration_seconds",
				 "Seconds spent reading one file from the tier (one per restore, "
				 "copy or migration source).", st, n_tiers, 1);
	metrics_render_tier_hist(f, "kvtier_tier_write_duration_seconds",
				 "Seconds spent writing and syncing one file on the tier.", st,
				 n_tiers, 0);
	for (size_t i = 0; i < METRICS_NELEM(metrics_ns_fields); i++) {
		const struct metrics_field *fd = &metrics_ns_fields[i];
		metrics_family(f, fd->name, fd->type, fd->help);
		for (size_t k = 0; k < n_ns; k++) {
			fprintf(f, "%s{namespace=\"", fd->name);
			metrics_label_value(f, ns[k].ns);
			fputs("\"} ", f);
			metrics_field_value(f, fd, &ns[k]);
			fputc('\n', f);
		}
	}
}

/* Reads "<size> <resident> ..." (pages) from /proc/self/statm. */
static int metrics_statm(uint64_t *vsize, uint64_t *rss)
{
	FILE *f = fopen("/proc/self/statm", "re");
	unsigned long long v, r;
	long page = sysconf(_SC_PAGESIZE);
	int rc = -1;

	if (!f)
		goto out;
	if (fscanf(f, "%llu %llu", &v, &r) != 2 || page <= 0)
		goto out;
	*vsize = (uint64_t)v * (uint64_t)page;
	*rss = (uint64_t)r * (uint64_t)page;
	rc = 0;
out:
	if (f)
		fclose(f);
	return rc;
}

/* Counts /proc/self/fd, not counting the descriptor of the listing itself. */
static int metrics_open_fds(uint64_t *n)
{
	DIR *d = opendir("/proc/self/fd");
	struct dirent *de;
	uint64_t count = 0;
	int own, rc = -1;

	if (!d)
		goto out;
	own = dirfd(d);
	while ((de = readdir(d))) {
		if (de->d_name[0] == '.')
			continue;
		if (atoi(de->d_name) != own)
			count++;
	}
	*n = count;
	rc = 0;
out:
	if (d)
		closedir(d);
	return rc;
}

/* Process start in unix seconds: starttime (field 22 of /proc/self/stat, in
 * clock ticks after boot) plus btime of /proc/stat. */
static int metrics_start_time(double *out)
{
	char buf[1024], *p;
	FILE *f = NULL;
	unsigned long long start_ticks = 0, btime = 0;
	long tck = sysconf(_SC_CLK_TCK);
	size_t len;
	int rc = -1, field;

	f = fopen("/proc/self/stat", "re");
	if (!f)
		goto out;
	len = fread(buf, 1, sizeof(buf) - 1, f);
	buf[len] = '\0';
	fclose(f);
	f = NULL;
	p = strrchr(buf, ')'); /* the command name may contain spaces and ')' */
	if (!p)
		goto out;
	p++;
	for (field = 3; field <= 22; field++) {
		char *end;
		while (*p == ' ')
			p++;
		if (field == 22) {
			start_ticks = strtoull(p, &end, 10);
			if (end == p)
				goto out;
			break;
		}
		p = strchr(p, ' ');
		if (!p)
			goto out;
	}
	f = fopen("/proc/stat", "re");
	if (!f)
		goto out;
	while (fgets(buf, sizeof(buf), f))
		if (sscanf(buf, "btime %llu", &btime) == 1)
			break;
	if (btime == 0 || tck <= 0)
		goto out;
	*out = (double)btime + (double)start_ticks / (double)tck;
	rc = 0;
out:
	if (f)
		fclose(f);
	return rc;
}

/* The standard process_* families; each is left out when it cannot be read. */
static void metrics_render_process(FILE *f)
{
	struct rusage ru;
	struct rlimit rl;
	uint64_t vsize, rss, fds;
	double start;

	if (getrusage(RUSAGE_SELF, &ru) == 0)
		metrics_single_double(f, "process_cpu_seconds_total", "counter",
				      "Total user and system CPU time spent in seconds.",
				      (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
					      (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) /
						      1e6);
	if (metrics_statm(&vsize, &rss) == 0) {
		metrics_single_u64(f, "process_resident_memory_bytes", "gauge",
				   "Resident memory size in bytes.", rss);
		metrics_single_u64(f, "process_virtual_memory_bytes", "gauge",
				   "Virtual memory size in bytes.", vsize);
	}
	if (metrics_open_fds(&fds) == 0)
		metrics_single_u64(f, "process_open_fds", "gauge", "Number of open file descriptors.",
				   fds);
	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY)
		metrics_single_u64(f, "process_max_fds", "gauge",
				   "Maximum number of open file descriptors.", (uint64_t)rl.rlim_cur);
	if (metrics_start_time(&start) == 0)
		metrics_single_double(f, "process_start_time_seconds", "gauge",
				      "Start time of the process since unix epoch in seconds.", start);
}

/* The whole page. st NULL: only the families that need no store. */
static void metrics_render_page(FILE *f, const struct store_stats *st,
				const struct store_ns_stats *ns, size_t n_ns)
{
	metrics_render_info(f);
	metrics_render_rpc(f);
	metrics_render_conn(f);
	if (st)
		metrics_render_store(f, st, ns, n_ns);
	metrics_render_process(f);
}

struct metrics_ns_vec {
	struct store_ns_stats *v;
	size_t n, cap;
};

static int metrics_collect_ns(void *ctx, const struct store_ns_stats *n)
{
	struct metrics_ns_vec *vec = ctx;

	if (vec->n == vec->cap) {
		size_t cap = vec->cap ? vec->cap * 2 : 16;
		struct store_ns_stats *v = realloc(vec->v, cap * sizeof(*v));
		if (!v)
			return -ENOMEM;
		vec->v = v;
		vec->cap = cap;
	}
	vec->v[vec->n++] = *n;
	return 0;
}

char *metrics_render(struct store *s)
{
	struct metrics_ns_vec vec = {0};
	struct store_stats st;
	char *buf = NULL;
	size_t len = 0;
	FILE *f = NULL;
	int ok = 0, r;

	if (s) {
		memset(&st, 0, sizeof(st));
		store_get_stats(s, &st);
		r = store_ns_stats(s, metrics_collect_ns, &vec);
		if (r == -ENOMEM)
			goto out;
		if (r) {
			/* Leave the namespace series out rather than show a part. */
			klog(LOG_WARN, "event=metrics_ns_stats_failed error=\"%s\"",
			     kvtier_strerror(r));
			vec.n = 0;
		}
	}
	f = open_memstream(&buf, &len);
	if (!f)
		goto out;
	metrics_render_page(f, s ? &st : NULL, vec.v, vec.n);
	ok = !ferror(f);
out:
	if (f && fclose(f) != 0)
		ok = 0;
	if (!ok) {
		free(buf);
		buf = NULL;
	}
	free(vec.v);
	return buf;
}

/* libmicrohttpd's messages go to our log (and the last one to metrics_start's
 * err when the daemon does not start). */
static void metrics_mhd_log(void *cls, const char *fmt, va_list ap)
{
	struct metrics *m = cls;
	size_t n;

	vsnprintf(m->last_log, sizeof(m->last_log), fmt, ap);
	n = strlen(m->last_log);
	while (n > 0 && (m->last_log[n - 1] == '\n' || m->last_log[n - 1] == '\r'))
		m->last_log[--n] = '\0';
	klog(LOG_WARN, "event=metrics_http msg=\"%s\"", m->last_log);
}

static enum MHD_Result metrics_handle(void *cls, struct MHD_Connection *conn, const char *url,
				      const char *method, const char *version,
				      const char *upload_data, size_t *upload_data_size,
				      void **con_cls)
{
	static const char not_found[] = "not found: the only path here is /metrics\n";
	static const char not_allowed[] = "method not allowed: /metrics is read-only (GET, HEAD)\n";
	static const char failed[] = "rendering the metrics failed (out of memory)\n";
	struct metrics *m = cls;
	struct MHD_Response *resp = NULL;
	enum MHD_Result r = MHD_NO;
	unsigned code;
	char *body;

	if (strcmp(url, "/metrics") != 0) {
		code = MHD_HTTP_NOT_FOUND;
		resp = MHD_create_response_from_buffer(sizeof(not_found) - 1, (void *)not_found,
						       MHD_RESPMEM_PERSISTENT);
	} else if (strcmp(method, MHD_HTTP_METHOD_GET) != 0 &&
		   strcmp(method, MHD_HTTP_METHOD_HEAD) != 0) {
		code = MHD_HTTP_METHOD_NOT_ALLOWED;
		resp = MHD_create_response_from_buffer(sizeof(not_allowed) - 1, (void *)not_allowed,
						       MHD_RESPMEM_PERSISTENT);
		if (resp && MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW, "GET, HEAD") != MHD_YES)
			goto out;
	} else if ((body = metrics_render(m->store)) == NULL) {
		code = MHD_HTTP_INTERNAL_SERVER_ERROR;
		resp = MHD_create_response_from_buffer(sizeof(failed) - 1, (void *)failed,
						       MHD_RESPMEM_PERSISTENT);
	} else {
		code = MHD_HTTP_OK;
		resp = MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
		if (!resp) {
			free(body);
			goto out;
		}
		if (MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE,
					    METRICS_CONTENT_TYPE) != MHD_YES)
			goto out;
	}
	if (!resp)
		goto out;
	if (code != MHD_HTTP_OK &&
	    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE,
				    "text/plain; charset=utf-8") != MHD_YES)
		goto out;
	r = MHD_queue_response(conn, code, resp);
out:
	if (resp)
		MHD_destroy_response(resp);
	return r;
}

/* Splits "HOST:PORT" or "[V6]:PORT" into host and port (1..65535). */
static int metrics_parse_hostport(const char *hp, char *host, size_t hostcap, char *port,
				  size_t portcap, char *err, size_t errlen)
{
	const char *h, *colon, *p;
	size_t hl;
	unsigned long v;
	char *end;
	int rc = KVTIER_E_INVALID;

	if (!hp || !*hp)
		goto bad;
	if (hp[0] == '[') {
		const char *rb = strchr(hp, ']');
		if (!rb || rb[1] != ':')
			goto bad;
		h = hp + 1;
		hl = (size_t)(rb - h);
		colon = rb + 1;
	} else {
		colon = strrchr(hp, ':');
		if (!colon)
			goto bad;
		h = hp;
		hl = (size_t)(colon - hp);
		if (memchr(h, ':', hl)) {
			snprintf(err, errlen, "write an IPv6 address in brackets: [ADDR]:PORT");
			goto out;
		}
	}
	if (hl == 0 || hl >= hostcap)
		goto bad;
	p = colon + 1;
	errno = 0;
	v = strtoul(p, &end, 10);
	if (*p < '0' || *p > '9' || *end || errno || v < 1 || v > 65535 || strlen(p) >= portcap) {
		snprintf(err, errlen, "port must be 1 to 65535 (got \"%s\")", p);
		goto out;
	}
	memcpy(host, h, hl);
	host[hl] = '\0';
	snprintf(port, portcap, "%lu", v);
	rc = 0;
	goto out;
bad:
	snprintf(err, errlen, "expected HOST:PORT or [IPV6]:PORT, e.g. 127.0.0.1:9477 (got \"%s\")",
		 hp ? hp : "");
out:
	return rc;
}

static int metrics_is_loopback(const struct sockaddr *sa)
{
	if (sa->sa_family == AF_INET) {
		const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
		return (ntohl(in->sin_addr.s_addr) >> 24) == 127;
	}
	if (sa->sa_family == AF_INET6) {
		const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
		return IN6_IS_ADDR_LOOPBACK(&in6->sin6_addr) ||
		       (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr) && in6->sin6_addr.s6_addr[12] == 127);
	}
	return 0;
}

int metrics_start(const char *hostport, struct store *s, struct metrics **out, char *err,
		  size_t errlen)
{
	struct addrinfo hints, *res = NULL, *ai;
	struct sockaddr_storage addr;
	struct metrics *m = NULL;
	char host[256], port[8];
	unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO | MHD_USE_ERROR_LOG;
	int rc, saved;

	*out = NULL;
	if (errlen)
		err[0] = '\0';
	rc = metrics_parse_hostport(hostport, host, sizeof(host), port, sizeof(port), err, errlen);
	if (rc)
		goto out;
	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_NUMERICSERV;
	rc = getaddrinfo(host, port, &hints, &res);
	if (rc) {
		saved = errno;
		snprintf(err, errlen, "cannot resolve \"%s\": %s", host,
			 rc == EAI_SYSTEM ? strerror(saved) : gai_strerror(rc));
		rc = rc == EAI_SYSTEM && saved ? -saved : KVTIER_E_INVALID;
		res = NULL;
		goto out;
	}
	for (ai = res; ai; ai = ai->ai_next)
		if ((ai->ai_family == AF_INET || ai->ai_family == AF_INET6) &&
		    ai->ai_addrlen <= sizeof(addr))
			break;
	if (!ai) {
		snprintf(err, errlen, "\"%s\" has no IPv4 or IPv6 address", host);
		rc = KVTIER_E_INVALID;
		goto out;
	}
	memset(&addr, 0, sizeof(addr));
	memcpy(&addr, ai->ai_addr, ai->ai_addrlen);
	if (ai->ai_family == AF_INET6)
		flags |= MHD_USE_IPv6;
	if (!metrics_is_loopback((struct sockaddr *)&addr))
		klog(LOG_WARN, "event=metrics_not_loopback addr=%s "
			       "msg=\"the metrics endpoint is reachable from other hosts\"",
		     hostport);

	m = calloc(1, sizeof(*m));
	if (!m) {
		rc = -ENOMEM;
		goto out;
	}
	m->store = s;
	errno = 0;
	m->daemon = MHD_start_daemon(flags, (uint16_t)atoi(port), NULL, NULL, metrics_handle, m,
				     MHD_OPTION_EXTERNAL_LOGGER, metrics_mhd_log, m,
				     MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&addr,
				     MHD_OPTION_CONNECTION_LIMIT, (unsigned)METRICS_CONN_LIMIT,
				     MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)METRICS_CONN_TIMEOUT_S,
				     MHD_OPTION_END);
	saved = errno;
	if (!m->daemon) {
		rc = saved ? -saved : KVTIER_E_INTERNAL;
		snprintf(err, errlen, "cannot serve HTTP on %s: %s", hostport,
			 m->last_log[0] ? m->last_log : saved ? strerror(saved) : "libmicrohttpd failed");
		goto out;
	}
	klog(LOG_INFO, "event=metrics_listening addr=%s", hostport);
	*out = m;
	m = NULL;
	rc = 0;
out:
	free(m);
	if (res)
		freeaddrinfo(res);
	return rc;
}

void metrics_stop(struct metrics *m)
{
	if (!m)
		return;
	MHD_stop_daemon(m->daemon);
	free(m);
}
