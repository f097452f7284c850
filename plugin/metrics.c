/* metrics.c: kvtier-llama's counters and the Prometheus page built from them.
 *
 * Recording is a relaxed atomic add: no lock, no allocation, safe from any
 * thread. Rendering reads the atomics one by one (a scrape may see two
 * counters from slightly different instants, as with any Prometheus client)
 * and writes the text format 0.0.4 into an open_memstream buffer.
 *
 * This module must never block a request: nothing here waits, and nothing
 * here knows about HTTP, backends or kvtierd beyond the label values.
 */
#include "metrics.h"

#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef KVTIER_VERSION
#define KVTIER_VERSION "unknown"
#endif

#define METRICS_TTFT_BUCKETS 16 /* 15 finite bounds and +Inf */

static const double ttft_bounds[METRICS_TTFT_BUCKETS - 1] = {
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
};
static const char *const ttft_labels[METRICS_TTFT_BUCKETS] = {
    "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1",
    "2.5",   "5",    "10",    "30",   "60",  "120",  "300", "+Inf",
};

static const char *const endpoint_names[METRICS_EP_COUNT] = {
    "/completion",
    "/v1/completions",
    "/v1/chat/completions",
    "other",
};
static const char *const handling_names[METRICS_HANDLING_COUNT] = {"slot", "passthrough"};
static const char *const restore_names[METRICS_RESTORE_COUNT] = {
    "ok", "failed", "timeout", "ignored", "skipped_small", "skipped_rollback", "skipped_ignored",
    "skipped_server_cache",
    "skipped_invalid",
};
static const char *const save_names[METRICS_SAVE_COUNT] = {"ok", "failed", "timeout", "skipped",
                                                                "answer_lost"};
static const char *const direction_names[METRICS_DIR_COUNT] = {"restore", "save"};
static const char *const kvcall_names[METRICS_KV_COUNT] = {
    "lookup", "stage", "fetch", "adopt", "put", "report", "info",
};
static const char *const refusal_names[METRICS_REFUSED_COUNT] = {"request_timeout",
                                                                  "body_budget"};
static const char *const reset_names[METRICS_RESET_COUNT] = {
    "backend_down",
    "foreign",
    "unexpected_prefill",
};

/* Static storage starts zeroed, a valid state for atomics. */
static struct {
	_Atomic uint64_t requests[METRICS_EP_COUNT][METRICS_HANDLING_COUNT];
	_Atomic uint64_t restores[METRICS_RESTORE_COUNT];
	_Atomic uint64_t saves[METRICS_SAVE_COUNT];
	_Atomic uint64_t bytes[METRICS_DIR_COUNT];
	_Atomic uint64_t kv_errors[METRICS_KV_COUNT];
	_Atomic uint64_t resets[METRICS_RESET_COUNT];
	_Atomic uint64_t prefill_tokens, restored_tokens, failed;
	_Atomic uint64_t refused[METRICS_REFUSED_COUNT];
	_Atomic uint64_t body_bytes;
	_Atomic uint64_t ttft_bucket[2][METRICS_TTFT_BUCKETS]; /* not cumulative */
	_Atomic uint64_t ttft_sum_us[2];
	_Atomic int up[METRICS_MAX_BACKENDS];
	unsigned n_backends;
	char *backend[METRICS_MAX_BACKENDS];
} m;

void metrics_set_backends(const char *const *urls, unsigned n)
{
	if (n > METRICS_MAX_BACKENDS)
		n = METRICS_MAX_BACKENDS;
	for (unsigned i = 0; i < n; i++)
		m.backend[i] = strdup(urls[i]); /* NULL (out of memory) renders as "?" */
	m.n_backends = n;
}

void metrics_request(enum metrics_endpoint ep, enum metrics_handling h)
{
	if ((unsigned)ep < METRICS_EP_COUNT && (unsigned)h < METRICS_HANDLING_COUNT)
		atomic_fetch_add_explicit(&m.requests[ep][h], 1, memory_order_relaxed);
}

void metrics_restore(enum metrics_restore outcome)
{
	if ((unsigned)outcome < METRICS_RESTORE_COUNT)
		atomic_fetch_add_explicit(&m.restores[outcome], 1, memory_order_relaxed);
}

void metrics_save(enum metrics_save outcome)
{
	if ((unsigned)outcome < METRICS_SAVE_COUNT)
		atomic_fetch_add_explicit(&m.saves[outcome], 1, memory_order_relaxed);
}

void metrics_bytes(enum metrics_direction dir, uint64_t bytes)
{
	if ((unsigned)dir < METRICS_DIR_COUNT)
		atomic_fetch_add_explicit(&m.bytes[dir], bytes, memory_order_relaxed);
}

void metrics_kvtier_error(enum metrics_kvcall call)
{
	if ((unsigned)call < METRICS_KV_COUNT)
		atomic_fetch_add_explicit(&m.kv_errors[call], 1, memory_order_relaxed);
}

void metrics_slot_reset(enum metrics_reset reason)
{
	if ((unsigned)reason < METRICS_RESET_COUNT)
		atomic_fetch_add_explicit(&m.resets[reason], 1, memory_order_relaxed);
}

void metrics_prefill_tokens(uint64_t n)
{
	atomic_fetch_add_explicit(&m.prefill_tokens, n, memory_order_relaxed);
}

void metrics_restored_tokens(uint64_t n)
{
	atomic_fetch_add_explicit(&m.restored_tokens, n, memory_order_relaxed);
}

void metrics_request_failed(void)
{
	atomic_fetch_add_explicit(&m.failed, 1, memory_order_relaxed);
}

void metrics_client_refused(enum metrics_refusal reason)
{
	if ((unsigned)reason < METRICS_REFUSED_COUNT)
		atomic_fetch_add_explicit(&m.refused[reason], 1, memory_order_relaxed);
}

void metrics_body_bytes(uint64_t bytes)
{
	atomic_store_explicit(&m.body_bytes, bytes, memory_order_relaxed);
}

void metrics_backend_up(unsigned backend, int up)
{
	if (backend < METRICS_MAX_BACKENDS)
		atomic_store_explicit(&m.up[backend], up ? 1 : 0, memory_order_relaxed);
}

void metrics_ttft(int restored, double seconds)
{
	int r = restored ? 1 : 0, b = 0;
	double us;

	if (!(seconds >= 0))
		seconds = 0;
	while (b < METRICS_TTFT_BUCKETS - 1 && seconds > ttft_bounds[b])
		b++;
	us = seconds * 1e6 + 0.5;
	if (us > 1e15)
		us = 1e15;
	atomic_fetch_add_explicit(&m.ttft_bucket[r][b], 1, memory_order_relaxed);
	atomic_fetch_add_explicit(&m.ttft_sum_us[r], (uint64_t)us, memory_order_relaxed);
}

/* Writes s as a label value: backslash, double quote and newline escaped,
 * other control bytes dropped (a URL given on the command line is the only
 * free-form value here). */
static void put_label(FILE *f, const char *s)
{
	for (; s && *s; s++) {
		unsigned char c = (unsigned char)*s;

		if (c == '\\' || c == '"')
			fprintf(f, "\\%c", c);
		else if (c == '\n')
			fputs("\\n", f);
		else if (c >= 0x20 && c != 0x7f)
			fputc(c, f);
	}
}

static uint64_t ld(_Atomic uint64_t *a)
{
	return atomic_load_explicit(a, memory_order_relaxed);
}

/* Writes the # HELP and # TYPE lines of a family. */
static void family(FILE *f, const char *name, const char *type, const char *help)
{
	fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

char *metrics_render(size_t *len)
{
	char *buf = NULL;
	size_t size = 0;
	FILE *f = open_memstream(&buf, &size);

	if (!f)
		return NULL;
	family(f, "kvtier_llama_build_info", "gauge", "Version of kvtier-llama (always 1).");
	fprintf(f, "kvtier_llama_build_info{version=\"%s\"} 1\n", KVTIER_VERSION);

	family(f, "kvtier_llama_requests_total", "counter",
	       "Client requests by endpoint and handling (slot managed or passed through).");
	for (int e = 0; e < METRICS_EP_COUNT; e++)
		for (int h = 0; h < METRICS_HANDLING_COUNT; h++)
			fprintf(
			    f,
			    "kvtier_llama_requests_total{endpoint=\"%s\",handling=\"%s\"} %llu\n",
			    endpoint_names[e], handling_names[h],
			    (unsigned long long)ld(&m.requests[e][h]));

	family(f, "kvtier_llama_request_errors_total", "counter",
	       "Requests the proxy answered with an error of its own (no backend answer).");
	fprintf(f, "kvtier_llama_request_errors_total %llu\n", (unsigned long long)ld(&m.failed));

	family(f, "kvtier_llama_clients_refused_total", "counter",
	       "Client requests the proxy cut off or refused to protect itself, by reason.");
	for (int i = 0; i < METRICS_REFUSED_COUNT; i++)
		fprintf(f, "kvtier_llama_clients_refused_total{reason=\"%s\"} %llu\n",
		        refusal_names[i], (unsigned long long)ld(&m.refused[i]));

	family(f, "kvtier_llama_body_bytes_in_flight", "gauge",
	       "Request body bytes held by the proxy now (bounded by --max-inflight-body-bytes).");
	fprintf(f, "kvtier_llama_body_bytes_in_flight %llu\n", (unsigned long long)ld(&m.body_bytes));

	family(f, "kvtier_llama_restores_total", "counter",
	       "Slot restores from kvtier by outcome; skipped_* were not sent to the backend.");
	for (int i = 0; i < METRICS_RESTORE_COUNT; i++)
		fprintf(f, "kvtier_llama_restores_total{outcome=\"%s\"} %llu\n", restore_names[i],
		        (unsigned long long)ld(&m.restores[i]));

	family(f, "kvtier_llama_saves_total", "counter", "Slot saves into kvtier by outcome.");
	for (int i = 0; i < METRICS_SAVE_COUNT; i++)
		fprintf(f, "kvtier_llama_saves_total{outcome=\"%s\"} %llu\n", save_names[i],
		        (unsigned long long)ld(&m.saves[i]));

	family(f, "kvtier_llama_bytes_moved_total", "counter",
	       "Slot file bytes restored into and saved from the backends.");
	for (int i = 0; i < METRICS_DIR_COUNT; i++)
		fprintf(f, "kvtier_llama_bytes_moved_total{direction=\"%s\"} %llu\n",
		        direction_names[i], (unsigned long long)ld(&m.bytes[i]));

	family(f, "kvtier_llama_prefill_tokens_total", "counter",
	       "Prompt tokens the backends prefilled (timings.prompt_n).");
	fprintf(f, "kvtier_llama_prefill_tokens_total %llu\n",
	        (unsigned long long)ld(&m.prefill_tokens));
	family(f, "kvtier_llama_restored_tokens_total", "counter",
	       "Prompt tokens brought by restores instead of prefill.");
	fprintf(f, "kvtier_llama_restored_tokens_total %llu\n",
	        (unsigned long long)ld(&m.restored_tokens));

	family(f, "kvtier_llama_kvtier_errors_total", "counter",
	       "Calls to kvtierd that failed, by call.");
	for (int i = 0; i < METRICS_KV_COUNT; i++)
		fprintf(f, "kvtier_llama_kvtier_errors_total{call=\"%s\"} %llu\n", kvcall_names[i],
		        (unsigned long long)ld(&m.kv_errors[i]));

	family(f, "kvtier_llama_slot_resets_total", "counter",
	       "Times the proxy forgot what a slot held, by reason.");
	for (int i = 0; i < METRICS_RESET_COUNT; i++)
		fprintf(f, "kvtier_llama_slot_resets_total{reason=\"%s\"} %llu\n", reset_names[i],
		        (unsigned long long)ld(&m.resets[i]));

	family(f, "kvtier_llama_time_to_first_token_seconds", "histogram",
	       "Time from a request's arrival to its first token, with and without a restore.");
	for (int r = 0; r < 2; r++) {
		const char *rl = r ? "true" : "false";
		uint64_t cum = 0;

		for (int b = 0; b < METRICS_TTFT_BUCKETS; b++) {
			cum += ld(&m.ttft_bucket[r][b]);
			fprintf(f,
			        "kvtier_llama_time_to_first_token_seconds_bucket{restored=\"%s\","
			        "le=\"%s\"} %llu\n",
			        rl, ttft_labels[b], (unsigned long long)cum);
		}
		fprintf(f, "kvtier_llama_time_to_first_token_seconds_sum{restored=\"%s\"} %.6f\n",
		        rl, (double)ld(&m.ttft_sum_us[r]) / 1e6);
		fprintf(f, "kvtier_llama_time_to_first_token_seconds_count{restored=\"%s\"} %llu\n",
		        rl, (unsigned long long)cum);
	}

	family(f, "kvtier_llama_backend_up", "gauge",
	       "1 when the backend answers and its slots are in use, else 0.");
	for (unsigned i = 0; i < m.n_backends; i++) {
		fputs("kvtier_llama_backend_up{backend=\"", f);
		put_label(f, m.backend[i] ? m.backend[i] : "?");
		fprintf(f, "\"} %d\n", atomic_load_explicit(&m.up[i], memory_order_relaxed));
	}
	if (fclose(f) != 0) {
		free(buf);
		return NULL;
	}
	*len = size;
	return buf;
}
