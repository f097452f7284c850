/* proxy.h: kvtier-llama's HTTP side (libmicrohttpd).
 *
 * Serves the plugin's own GET /metrics and hands every other request to the
 * engine, which answers through a per-request queue of chunks: status,
 * headers and body bytes of the backend are passed to the client unchanged
 * and each chunk is sent as soon as it arrives (Server-Sent Events stay
 * live). One thread per connection; each proxied request also gets a worker
 * thread that talks to the backend while the connection's thread sends.
 */
#ifndef KVTIER_PLUGIN_PROXY_H
#define KVTIER_PLUGIN_PROXY_H

#include <stddef.h>

struct engine;

struct proxy_config {
	const char *listen;       /* HOST:PORT ([ADDR]:PORT for IPv6) */
	size_t max_request_bytes; /* larger request bodies get 413 */
	size_t max_inflight_body_bytes; /* bodies held at once; past it 503 + Retry-After */
	unsigned max_connections;
	unsigned idle_timeout_s; /* an idle connection (no byte for this long) is closed */
	unsigned request_timeout_s; /* headers + body must be in within this, or closed */
	unsigned max_connections_per_ip; /* 0: no limit */
	const char *api_key;     /* clients must send it (but for /health); NULL: no check */
};

struct proxy;

/* Starts serving on cfg->listen with engine e (which must outlive the
 * proxy). Returns 0, or a negative error with err set (bad address, port in
 * use). */
int proxy_start(const struct proxy_config *cfg, struct engine *e, struct proxy **out, char *err,
                size_t errlen);

/* Stops accepting, aborts the transfers in flight and waits for the
 * connection threads. */
void proxy_stop(struct proxy *p);

#endif /* KVTIER_PLUGIN_PROXY_H */
