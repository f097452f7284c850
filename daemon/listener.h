/* listener.h: kvtierd's own accept loop for the Unix socket and plaintext
 * TCP, handing each connection to gRPC (grpc_server_add_channel_from_fd).
 *
 * Why not gRPC's listener: libgrpc 1.51 (Debian 12) has no connection cap,
 * keeps a silent connection for its 120 s handshake timeout, and stops
 * accepting for good after one accept4() EMFILE (grpc/grpc#16058): about a
 * thousand idle connections took kvtierd down permanently (review D1).
 *
 * This loop:
 *   - refuses (accepts and closes) a connection whose descriptor number
 *     would reach into the descriptors kept for the daemon's own files
 *     (tier files, LMDB, io_uring, metrics), or beyond --max-connections;
 *   - survives EMFILE/ENFILE: a spare descriptor is closed to accept and
 *     close the connection, then the loop backs off briefly;
 *   - hands a connection to gRPC only once it is readable (the client sent
 *     its first bytes), and drops it unread after --handshake-timeout-ms.
 *     Connections added from a descriptor skip gRPC's handshaker, so gRPC's
 *     own handshake timeout never applies to them; once handed over, an idle
 *     connection is closed by gRPC's max-idle filter (--connection-idle-ms).
 *
 * Telling Unix from TCP peers: gRPC names the peer of a channel added from
 * a descriptor "fd:N". With TCP on, Unix connections are moved (F_DUPFD) to
 * descriptor numbers at or above a boundary and TCP connections are only
 * accepted below it, so "fd:N" says which listener N came from even if N
 * was closed and reused meanwhile. TLS (gRPC's own listener) is not handled
 * here: grpc_server_add_channel_from_fd accepts insecure credentials only.
 */
#ifndef KVTIER_LISTENER_H
#define KVTIER_LISTENER_H

#include <stddef.h>

#include <grpc/grpc.h>

struct listener;

struct listener_config {
	const char *unix_path;      /* Unix socket path (mode 0660); NULL for none */
	const char *tcp;            /* plaintext "HOST:PORT"; NULL for none */
	unsigned max_connections;   /* client connections at most (both listeners) */
	unsigned fd_reserve;        /* descriptors below the soft limit never used for clients */
	unsigned handshake_timeout_ms; /* a connection silent this long is dropped unread */
};

/* Binds and listens (nothing is accepted yet). A stale Unix socket file is
 * replaced; any other kind of file at unix_path is an error. Returns 0, or
 * -errno / KVTIER_E_* with err saying what to do. */
int listener_open(const struct listener_config *cfg, struct listener **out, char *err,
		  size_t errlen);

/* Starts the accept thread that hands connections to `server`, which must
 * have been started (grpc_server_start) and must outlive listener_stop().
 * Returns 0 or -errno with err. */
int listener_start(struct listener *l, grpc_server *server, char *err, size_t errlen);

/* 1 if `peer` (from grpc_call_get_peer) is a Unix-socket connection. Only
 * "fd:N" peers this listener handed over, or gRPC's own "unix:" peers,
 * count; anything else (TCP, TLS) is 0. Thread-safe. */
int listener_peer_is_unix(const struct listener *l, const char *peer);

/* Stops the thread, closes the listening sockets and the connections not yet
 * handed over, removes the Unix socket file. Connections already handed to
 * gRPC stay gRPC's. NULL is ignored. */
void listener_stop(struct listener *l);

#endif /* KVTIER_LISTENER_H */
