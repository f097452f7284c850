/* engine.h: what kvtier-llama does with a request, and the backends' state.
 *
 * For a completion or chat request the engine works out the tokens the slot
 * will hold (/apply-template, /tokenize), picks a slot (slots.h), restores
 * kvtier's best match into it when that beats the slot's own prefix by the
 * break-even, forwards the request with id_slot and cache_prompt, passes the
 * answer to the sink as it arrives, then verifies and reports the timings and
 * queues a save of the slot. Every other request is forwarded untouched.
 *
 * A restore that fails, hangs or is ignored never fails the request: the
 * request is then served by plain prefill and the outcome is counted.
 *
 * In the background the engine polls the backends' health (a backend that
 * stops answering has its slots forgotten; one that comes back is examined
 * again), runs the save jobs, and sweeps orphaned files from the slot
 * directory.
 */
#ifndef KVTIER_PLUGIN_ENGINE_H
#define KVTIER_PLUGIN_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "fingerprint.h"
#include "kvclient.h"
#include "metrics.h"

struct engine_config {
	const char *const *backends; /* base URLs, no trailing '/' */
	unsigned n_backends;
	const char *kvtier_address; /* "unix:PATH" or "HOST:PORT" */
	const char *kvtier_token;   /* or NULL */
	const char *kvtier_tls_ca;   /* TLS to kvtierd: its CA file, or NULL */
	const char *kvtier_tls_name; /* the name its certificate carries, or NULL */
	enum kvclient_mode kvtier_mode;
	const char *slot_dir;   /* the backends' --slot-save-path */
	const char *model_file; /* or NULL */
	struct fingerprint_kv kv;
	const char *ns_override;  /* --namespace, or NULL */
	unsigned break_even;      /* floor, tokens */
	unsigned timeout_ms;      /* forwarded requests */
	unsigned slot_timeout_ms; /* slot actions and the other short calls */
	unsigned health_ms;       /* backend health poll interval */
	unsigned slot_check_ms;   /* GET /slots before relying on a slot idle this long; 0 always */
	unsigned save_workers;    /* threads running saves */
	unsigned server_cache_ram_mib; /* the backends' --cache-ram; 0 = off (promptcache.h) */
	int server_cache_idle_slots;   /* the backends' --cache-idle-slots */
};

/* Where the answer to a request goes (implemented by the proxy). Callbacks
 * run on the thread that called engine_handle(). */
struct engine_sink {
	void *ctx;
	/* A backend response header line, then the end of the headers, then body
	 * bytes as they arrive: see struct backend_sink. Return -1 to abort. */
	int (*on_header)(void *ctx, const char *line, size_t len);
	int (*on_headers_done)(void *ctx, long status, int64_t content_length);
	int (*on_data)(void *ctx, const char *data, size_t len);
	/* Non-zero when the client is gone or the proxy is stopping. */
	int (*should_abort)(void *ctx);
	/* The backend's answer has been passed on whole (broken = 0) or broke
	 * after its headers went out (broken = 1): the client's answer can end
	 * now, while the engine reports and saves. Called at most once, only
	 * after on_headers_done; nothing is passed on after it. May be NULL. */
	void (*on_end)(void *ctx, int broken);
	/* No backend answered: the proxy answers itself with this status and a
	 * llama-server style error body. Called at most once, and only when no
	 * header was passed on. */
	void (*on_error)(void *ctx, int status, const char *type, const char *message);
};

struct engine_request {
	enum metrics_endpoint endpoint;
	const char *method;   /* "POST", "GET", ... */
	const char *uri;      /* path and query as the client sent them */
	char *const *headers; /* "Name: value" lines to forward, NULL-terminated */
	const char *body;
	size_t body_len;
	double t_arrival; /* CLOCK_MONOTONIC seconds when the request arrived */
};

struct engine;

/* Opens kvtierd's client, reads the model file (if any), examines every
 * backend (one log line each: namespace and why) and starts the health and
 * save threads. A backend that does not answer is not an error: it is retried
 * in the background. Returns 0, or a negative error with err set (bad
 * --kvtier address, unreadable --model-file, out of memory). */
int engine_start(const struct engine_config *cfg, struct engine **out, char *err, size_t errlen);

/* Makes requests in flight end soon: transfers abort, slot waits end. Call
 * before stopping the proxy; engine_stop() afterwards. */
void engine_begin_stop(struct engine *e);

/* Stops the background threads after the queued saves finished (each is
 * bounded by its timeouts) and frees the engine. Requests must be over. */
void engine_stop(struct engine *e);

/* Serves one request to completion: the answer goes to the sink. Blocks
 * for as long as the request takes (bounded by the configured timeouts).
 * Returns 0 when the answer went to the sink whole (whatever its status, or
 * an on_error answer), -1 when the transfer broke after the headers were
 * passed on (the client must see an incomplete response). */
int engine_handle(struct engine *e, const struct engine_request *rq,
                  const struct engine_sink *sink);

#endif /* KVTIER_PLUGIN_ENGINE_H */
