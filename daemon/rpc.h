/* rpc.h: kvtierd's gRPC service (proto/kvtier.proto) on the gRPC core C API.
 *
 * One thread waits on the server's notification completion queue: it only
 * re-posts requests, refuses calls without the right token or beyond the
 * queue's bound (cancel with status: non-blocking), and hands each new call
 * to one of two pools of worker threads (streams, short calls), so
 * no LMDB transaction and no blocking I/O ever runs on a completion-queue
 * thread. Each call is bound to its own pluck completion queue, which the
 * worker running it waits on; streams send or receive one message at a time
 * (gRPC's flow control is the back-pressure), overlapping the next chunk's
 * file I/O with the current message's transfer.
 *
 * Status codes are mapped from store errors in one place (rpc.c,
 * status_of()). Calls from TCP peers must carry "authorization: Bearer
 * <token>" when a token is configured; calls over the Unix socket rely on
 * the socket's file mode (0660). With a key pair the TCP port speaks TLS
 * only (gRPC's SSL server credentials; no client certificate is asked for:
 * the token authenticates the client).
 *
 * Connections on the Unix socket and plaintext TCP are accepted by
 * listener.c, which caps them and survives descriptor exhaustion, and then
 * handed to gRPC; a TLS port is gRPC's own listener (gRPC 1.51 hands a
 * descriptor to a channel with insecure credentials only), protected by the
 * raised descriptor limit and gRPC's handshake timeout. Calls to methods
 * not in the service are answered UNIMPLEMENTED.
 */
#ifndef KVTIER_RPC_H
#define KVTIER_RPC_H

#include <stddef.h>

struct store;
struct rpc_server;

struct rpc_config {
	const char *unix_path;     /* Unix socket path; NULL for none */
	const char *listen;        /* "HOST:PORT" for TCP; NULL for none */
	const char *auth_token;    /* required when listen is set */
	const char *tls_cert_pem;  /* PEM certificate chain for listen, with tls_key_pem: TCP is
				    * then TLS only; NULL: plaintext. Read by rpc_start only. */
	const char *tls_key_pem;   /* its private key (PEM) */
	unsigned workers;          /* threads for streams (Fetch, Put); short calls get
				    * max(4, workers / 4) threads of their own */
	unsigned io_timeout_ms;    /* longest wait for one message of a stream */
	unsigned max_connections;  /* client connections at most; 0: only the fd limit caps */
	unsigned handshake_timeout_ms; /* a connection that sends nothing this long is dropped */
	unsigned connection_idle_ms;   /* a connection without calls this long is closed */
};

/* Binds, starts the threads and serves `s`. On failure nothing is left
 * running and err says why (e.g. the socket is in use). */
int rpc_start(struct store *s, const struct rpc_config *cfg, struct rpc_server **out, char *err,
	      size_t errlen);

/* Stops accepting calls, lets calls in flight finish for up to grace_ms,
 * cancels the rest, joins every thread and frees the server. */
void rpc_stop(struct rpc_server *srv, unsigned grace_ms);

#endif /* KVTIER_RPC_H */
