/* metrics.h: kvtier-llama's own counters and their Prometheus text page.
 *
 * Every counter is a relaxed C11 atomic: recording never takes a lock and
 * never allocates, so any thread may record at any time. The page is built on
 * demand by metrics_render(). Names and labels are documented in
 * plugin/docs/kvtier-llama.md; the page must pass `promtool check metrics`.
 */
#ifndef KVTIER_PLUGIN_METRICS_H
#define KVTIER_PLUGIN_METRICS_H

#include <stddef.h>
#include <stdint.h>

#define METRICS_MAX_BACKENDS 16

/* Label endpoint= of kvtier_llama_requests_total. */
enum metrics_endpoint {
	METRICS_EP_COMPLETION,     /* /completion */
	METRICS_EP_V1_COMPLETIONS, /* /v1/completions */
	METRICS_EP_V1_CHAT,        /* /v1/chat/completions */
	METRICS_EP_OTHER,          /* every other path, passed to a backend */
	METRICS_EP_COUNT
};

/* Label handling= of kvtier_llama_requests_total. */
enum metrics_handling {
	METRICS_HANDLING_SLOT,        /* slot managed: tokens, slot choice, restore, save */
	METRICS_HANDLING_PASSTHROUGH, /* forwarded untouched (other paths, unsupported prompts) */
	METRICS_HANDLING_COUNT
};

/* Label outcome= of kvtier_llama_restores_total. */
enum metrics_restore {
	METRICS_RESTORE_OK,      /* restored and (when timings came back) used */
	METRICS_RESTORE_FAILED,  /* the server refused it (HTTP error, n_restored 0), or staging
	                            failed */
	METRICS_RESTORE_TIMEOUT, /* the slot action did not answer in --slot-timeout-ms */
	METRICS_RESTORE_IGNORED, /* answered OK, but the prefill shows it was not used */
	METRICS_RESTORE_SKIPPED_SMALL,   /* a match, but not worth more than the break-even */
	METRICS_RESTORE_SKIPPED_ROLLBACK, /* recurrent state: the prompt does not extend the blob */
	METRICS_RESTORE_SKIPPED_IGNORED,  /* the namespace's restores were ignored lately */
	METRICS_RESTORE_SKIPPED_SERVER_CACHE, /* the server's own RAM cache holds the prefix */
	METRICS_RESTORE_SKIPPED_INVALID, /* a match that must not be sent: 0 tokens, > n_ctx, bad
	                                    header */
	METRICS_RESTORE_COUNT
};

/* Label outcome= of kvtier_llama_saves_total. */
enum metrics_save {
	METRICS_SAVE_OK,
	METRICS_SAVE_FAILED,  /* HTTP error, n_written 0, missing file, or kvtierd refused it */
	METRICS_SAVE_TIMEOUT, /* the slot action did not answer in --slot-timeout-ms */
	METRICS_SAVE_SKIPPED, /* not attempted: under the measured break-even, or the queue was full
	                       */
	METRICS_SAVE_ANSWER_LOST, /* stored, but the server wrote the file and never answered */
	METRICS_SAVE_COUNT
};

/* Label direction= of kvtier_llama_bytes_moved_total. */
enum metrics_direction { METRICS_DIR_RESTORE, METRICS_DIR_SAVE, METRICS_DIR_COUNT };

/* Label call= of kvtier_llama_kvtier_errors_total. */
enum metrics_kvcall {
	METRICS_KV_LOOKUP,
	METRICS_KV_STAGE,
	METRICS_KV_FETCH,
	METRICS_KV_ADOPT,
	METRICS_KV_PUT,
	METRICS_KV_REPORT,
	METRICS_KV_INFO,
	METRICS_KV_COUNT
};

/* Label reason= of kvtier_llama_slot_resets_total. */
enum metrics_reset {
	METRICS_RESET_BACKEND_DOWN, /* the backend stopped answering: its slots are forgotten */
	METRICS_RESET_FOREIGN,      /* the slot's task id changed behind the proxy (restart, other
	                               client) */
	METRICS_RESET_UNEXPECTED,   /* a response prefilled far more than the tracked prefix allowed
	                             */
	METRICS_RESET_COUNT
};

/* Label reason= of kvtier_llama_clients_refused_total. */
enum metrics_refusal {
	METRICS_REFUSED_REQUEST_TIMEOUT, /* headers + body not in within --request-timeout-s: closed */
	METRICS_REFUSED_BODY_BUDGET,     /* the body would pass --max-inflight-body-bytes: 503 */
	METRICS_REFUSED_COUNT
};

/* Names the backends (label backend= of kvtier_llama_backend_up); call once
 * at start, before any other thread records. At most METRICS_MAX_BACKENDS;
 * the strings are copied. */
void metrics_set_backends(const char *const *urls, unsigned n);

void metrics_request(enum metrics_endpoint ep, enum metrics_handling h);
void metrics_restore(enum metrics_restore outcome);
void metrics_save(enum metrics_save outcome);
void metrics_bytes(enum metrics_direction dir, uint64_t bytes);
void metrics_kvtier_error(enum metrics_kvcall call);
void metrics_slot_reset(enum metrics_reset reason);
void metrics_prefill_tokens(uint64_t n);  /* timings.prompt_n summed */
void metrics_restored_tokens(uint64_t n); /* matched tokens a restore brought */
void metrics_backend_up(unsigned backend, int up);
void metrics_request_failed(void); /* the proxy answered an error of its own */
void metrics_client_refused(enum metrics_refusal reason);
/* Request body bytes held by the proxy now (kvtier_llama_body_bytes_in_flight). */
void metrics_body_bytes(uint64_t bytes);

/* One time-to-first-token observation in seconds; `restored` says whether a
 * restore ran for the request. Negative or NaN values are recorded as 0. */
void metrics_ttft(int restored, double seconds);

/* Renders the whole page (text format 0.0.4). Returns a malloc'd buffer the
 * caller frees and its length in *len, or NULL when out of memory. */
char *metrics_render(size_t *len);

#endif /* KVTIER_PLUGIN_METRICS_H */
