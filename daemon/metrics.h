/* metrics.h: kvtierd's Prometheus endpoint and RPC counters.
 *
 * The RPC layer reports each finished call with metrics_rpc_observe() (lock
 * free: atomics). metrics_start() serves GET /metrics (text format 0.0.4) on
 * a libmicrohttpd thread; the page is rendered from these counters and from
 * store_get_stats()/store_ns_stats() at scrape time. The endpoint is
 * read-only: every other path is 404, every other method 405.
 */
#ifndef KVTIER_METRICS_H
#define KVTIER_METRICS_H

#include <stddef.h>

struct store;

enum rpc_method_id {
	RPC_INFO,
	RPC_LOOKUP,
	RPC_FETCH,
	RPC_PUT,
	RPC_STAGE,
	RPC_RELEASE,
	RPC_ADOPT,
	RPC_DELETE,
	RPC_LIST,
	RPC_STATS,
	RPC_REPORT,
	RPC_METHOD_COUNT
};

/* "Info", "Lookup", ... indexed by enum rpc_method_id. */
extern const char *const rpc_method_names[RPC_METHOD_COUNT];

/* Counts one finished call of `method` with gRPC status code `status`
 * (0..16) that took `seconds`. Thread-safe, never blocks. */
void metrics_rpc_observe(int method, int status, double seconds);

/* Client connections, as the listener (listener.c) sees them. */
enum conn_listener { CONN_UNIX, CONN_TCP, CONN_LISTENER_COUNT };
enum conn_refusal {
	CONN_REFUSED_LIMIT,     /* descriptor cap reached (--max-connections, reserve) */
	CONN_REFUSED_EXHAUSTED, /* accept failed: EMFILE, ENFILE, ENOMEM, ... */
	CONN_REFUSED_SILENT,    /* nothing received within --handshake-timeout-ms */
	CONN_REFUSAL_COUNT
};

/* "limit", "exhausted", "silent", indexed by enum conn_refusal. */
extern const char *const metrics_conn_refusal_names[CONN_REFUSAL_COUNT];

/* A connection was handed to gRPC (listener: enum conn_listener). */
void metrics_conn_accepted(int listener);
/* A connection was closed by kvtierd before gRPC saw it. */
void metrics_conn_refused(int listener, int reason);
/* Connections accepted and waiting for their first bytes: +1 / -1. */
void metrics_conn_waiting(int delta);
/* A call to a method this kvtierd does not serve was answered UNIMPLEMENTED. */
void metrics_rpc_unimplemented(void);

/* Renders the whole exposition into a malloc'd NUL-terminated buffer
 * (caller frees). Returns NULL on allocation failure. s NULL renders only
 * the families that need no store (RPC, process, build info). */
char *metrics_render(struct store *s);

struct metrics;

/* Serves /metrics on "HOST:PORT" (IPv4 or [IPv6]; HOST may be a name that
 * resolves to loopback). Returns 0 or -errno / KVTIER_E_INVALID with err. */
int metrics_start(const char *hostport, struct store *s, struct metrics **out, char *err,
		  size_t errlen);
void metrics_stop(struct metrics *m);

#endif /* KVTIER_METRICS_H */
