/* proxy.c: the HTTP server side of kvtier-llama (libmicrohttpd).
 *
 * Threads: libmicrohttpd runs one thread per connection. For a proxied
 * request that thread collects the body, starts a worker thread running
 * engine_handle(), and waits until the worker has the backend's status and
 * headers (or an error of its own). It then answers with a callback response
 * whose reader pops the chunks the worker pushes, so each chunk goes out as
 * it arrives. The size is the backend's Content-Length when it sent one,
 * else unknown (chunked). A slow client makes the worker wait (at most 4 MiB
 * queued per request), which slows the backend's transfer, not the proxy.
 *
 * Slow clients: a client must send a request's headers and body within
 * --request-timeout-s (counted from the connection's start, or for the next
 * request on a kept-alive connection from the end of the previous one plus
 * --idle-timeout-s), and libmicrohttpd's idle timeout applies while it
 * sends. Only while the proxy itself works on the answer (waits on the
 * backend, streams its answer) is the connection exempt. The deadline is
 * kept by a reaper thread that shuts down the socket of a connection past
 * it, which wakes its libmicrohttpd thread: libmicrohttpd's own timeout is
 * an idle timeout, which a client trickling a byte every few seconds never
 * reaches.
 *
 * Bodies: a request body is held once, in a buffer of its Content-Length
 * (a chunked one grows by half), and the engine reads it in place and
 * forwards it from there. The bytes of all bodies held at once are bounded
 * by --max-inflight-body-bytes: a body over the budget is refused with 503
 * and Retry-After as soon as its headers say how large it is (or, chunked,
 * when it grows past it), and a body over --max-request-size with 413,
 * without reading it. A body is freed as soon as its backend call is over.
 *
 * A request object (struct preq) is shared by the connection thread, the
 * worker and the response; a reference count frees it when all three are
 * done. The raw URI comes from the URI log callback, so the query string is
 * forwarded exactly as the client sent it.
 *
 * This module must never change the bytes of a backend's answer, never
 * buffer a whole streamed answer, and never answer /metrics from a backend.
 */
#include "proxy.h"

#include <errno.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>

#include <jansson.h>
#include <microhttpd.h>

#include "engine.h"
#include "log.h"
#include "metrics.h"

#define QUEUE_MAX (4u << 20) /* bytes queued per request before the worker waits */
#define HEADERS_MAX 128      /* request headers forwarded */
#define WAIT_SLICE_S 1       /* waits wake up this often to look at the client, stopping */
#define REAP_SLICE_MS 250    /* the reaper looks at the deadlines this often */
#define RETRY_AFTER_S "2"    /* Retry-After of a 503 for a full body budget */
#define BODY_MIN_CAP 16384   /* first buffer of a body of unknown length */

/* One client connection, from accept to close (libmicrohttpd's socket
 * context). Listed in proxy.conns under proxy.conn_lock. */
struct pconn {
	struct pconn *prev, *next;
	int fd;
	double deadline; /* the request being received must be in by then (monotonic s) */
	int exempt;      /* the proxy is answering: no deadline */
	int reaped;      /* the socket was shut down for the deadline */
};

struct chunk {
	struct chunk *next;
	size_t len, off;
	char data[];
};

struct proxy {
	struct MHD_Daemon *daemon;
	struct engine *engine;
	struct proxy_config cfg;
	atomic_int stopping;
	pthread_mutex_t lock; /* workers count, body_bytes */
	pthread_cond_t cond;
	unsigned workers;
	size_t body_bytes; /* body bytes reserved by all requests */
	char last_log[256];
	pthread_mutex_t conn_lock; /* conns, reaper_stop */
	pthread_cond_t conn_cond;
	struct pconn *conns;
	int reaper_stop;
	pthread_t reaper;
	int reaper_started;
};

struct preq {
	struct proxy *p;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	int refs;
	int phase; /* 0 new, 1 receiving the body, 2 answered */
	char *uri;
	char method[16];
	enum metrics_endpoint ep;
	char *headers[HEADERS_MAX + 1];
	unsigned n_headers;
	char *body;
	size_t body_len, body_cap;
	size_t reserved; /* bytes of the body budget this request holds */
	int too_big;
	int over_budget; /* a chunked body grew past --max-inflight-body-bytes */
	int key_ok; /* no --api-key-file, or the client sent the key */
	double t_arrival;
	/* filled by the worker */
	int hdr_ready;
	long status;
	int64_t content_length;
	char **resp_headers;
	size_t n_resp, cap_resp;
	int err_ready;
	int err_status;
	char *err_body;
	struct chunk *head, *tail;
	size_t queued;
	int finished;    /* the worker will push nothing more */
	int broken;      /* the transfer broke after the headers */
	uint64_t sent;   /* body bytes handed to libmicrohttpd */
	int delivered;   /* ... all of them: Content-Length reached or end of stream */
	int client_gone; /* the client left before getting the whole answer */
	int fd;          /* the client's socket, to notice it leaving; -1 unknown */
	struct pconn *pc; /* the connection's deadline state, or NULL */
};

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* The connection's state (set up when it was accepted), or NULL. */
static struct pconn *pconn_of(struct MHD_Connection *conn)
{
	const union MHD_ConnectionInfo *ci =
	    conn ? MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT) : NULL;

	return ci ? ci->socket_context : NULL;
}

/* Exempts the connection from the request deadline (the proxy answers), or
 * starts a new deadline for the next request on it. */
static void pconn_set(struct proxy *p, struct pconn *pc, int exempt, double deadline)
{
	if (!pc)
		return;
	pthread_mutex_lock(&p->conn_lock);
	pc->exempt = exempt;
	if (!exempt)
		pc->deadline = deadline;
	pthread_mutex_unlock(&p->conn_lock);
}

/* libmicrohttpd's connection notifications: a new connection gets its
 * first deadline and joins the list; a closed one leaves it (before
 * libmicrohttpd closes its socket, so the reaper never touches a reused fd). */
static void on_connection(void *cls, struct MHD_Connection *conn, void **socket_context,
                          enum MHD_ConnectionNotificationCode code)
{
	struct proxy *p = cls;
	struct pconn *pc = *socket_context;

	if (code == MHD_CONNECTION_NOTIFY_STARTED) {
		const union MHD_ConnectionInfo *ci =
		    MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);

		pc = calloc(1, sizeof(*pc));
		if (!pc)
			return; /* no deadline for it; the idle timeout still applies */
		pc->fd = ci ? ci->connect_fd : -1;
		pc->deadline = now_s() + p->cfg.request_timeout_s;
		pthread_mutex_lock(&p->conn_lock);
		pc->next = p->conns;
		if (p->conns)
			p->conns->prev = pc;
		p->conns = pc;
		pthread_mutex_unlock(&p->conn_lock);
		*socket_context = pc;
		return;
	}
	if (!pc)
		return;
	pthread_mutex_lock(&p->conn_lock);
	if (pc->prev)
		pc->prev->next = pc->next;
	else
		p->conns = pc->next;
	if (pc->next)
		pc->next->prev = pc->prev;
	pthread_mutex_unlock(&p->conn_lock);
	*socket_context = NULL;
	free(pc);
}

/* The reaper: shuts down the socket of every connection still sending its
 * request past the deadline. Its libmicrohttpd thread then sees the socket
 * end and closes the connection. */
static void *reaper_main(void *arg)
{
	struct proxy *p = arg;

	pthread_mutex_lock(&p->conn_lock);
	while (!p->reaper_stop) {
		struct timespec dl;
		double t = now_s();

		for (struct pconn *pc = p->conns; pc; pc = pc->next) {
			if (pc->exempt || pc->reaped || pc->fd < 0 || t < pc->deadline)
				continue;
			pc->reaped = 1;
			shutdown(pc->fd, SHUT_RDWR);
			metrics_client_refused(METRICS_REFUSED_REQUEST_TIMEOUT);
			klog(LOG_WARN,
			     "event=request_timeout fd=%d request_timeout_s=%u action=close "
			     "hint=\"the client did not send its request within "
			     "--request-timeout-s\"",
			     pc->fd, p->cfg.request_timeout_s);
		}
		clock_gettime(CLOCK_MONOTONIC, &dl);
		dl.tv_nsec += REAP_SLICE_MS * 1000000L;
		if (dl.tv_nsec >= 1000000000L) {
			dl.tv_sec++;
			dl.tv_nsec -= 1000000000L;
		}
		pthread_cond_timedwait(&p->conn_cond, &p->conn_lock, &dl);
	}
	pthread_mutex_unlock(&p->conn_lock);
	return NULL;
}

/* Waits on r->cond for at most WAIT_SLICE_S (r->lock held). */
static void wait_slice(struct preq *r)
{
	struct timespec dl;

	clock_gettime(CLOCK_MONOTONIC, &dl);
	dl.tv_sec += WAIT_SLICE_S;
	pthread_cond_timedwait(&r->cond, &r->lock, &dl);
}

/* 1 when the client has closed its end of the connection. Only the
 * connection's own thread may call this (it peeks at the socket). Bytes of a
 * pipelined next request are not a close. */
static int client_left(int fd)
{
	struct pollfd pfd = {.fd = fd, .events = POLLIN | POLLRDHUP};
	char c;

	if (fd < 0 || poll(&pfd, 1, 0) <= 0)
		return 0;
	if (pfd.revents & (POLLERR | POLLHUP | POLLRDHUP | POLLNVAL))
		return 1;
	return (pfd.revents & POLLIN) && recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT) == 0;
}

/* Waits a slice on the connection's thread, and marks the request abandoned
 * when the client went away meanwhile (r->lock held). */
static void wait_slice_conn(struct preq *r)
{
	wait_slice(r);
	if (!r->client_gone && client_left(r->fd)) {
		r->client_gone = 1;
		pthread_cond_broadcast(&r->cond);
		klog(LOG_INFO, "event=client_gone uri=%s action=abort", r->uri);
	}
}

/* Takes n more bytes of the body budget for r. Returns 0, or -1 when
 * that would pass --max-inflight-body-bytes (nothing is taken then). */
static int body_reserve(struct proxy *p, struct preq *r, size_t n)
{
	int ok;

	pthread_mutex_lock(&p->lock);
	ok = n <= p->cfg.max_inflight_body_bytes - p->body_bytes;
	if (ok) {
		p->body_bytes += n;
		r->reserved += n;
		metrics_body_bytes(p->body_bytes);
	}
	pthread_mutex_unlock(&p->lock);
	return ok ? 0 : -1;
}

/* Frees r's body and gives its share of the budget back. The caller owns
 * r->body (the connection thread before the worker starts, the worker
 * after, the last reference at the end). */
static void body_release(struct proxy *p, struct preq *r)
{
	free(r->body);
	r->body = NULL;
	r->body_len = r->body_cap = 0;
	if (!r->reserved)
		return;
	pthread_mutex_lock(&p->lock);
	p->body_bytes -= r->reserved;
	r->reserved = 0;
	metrics_body_bytes(p->body_bytes);
	pthread_mutex_unlock(&p->lock);
}

/* A request object for raw URI uri, with the MHD side's reference. NULL
 * when out of memory (the request is then refused). */
static struct preq *preq_new(struct proxy *p, const char *uri)
{
	struct preq *r = calloc(1, sizeof(*r));
	pthread_condattr_t ca;

	if (!r)
		return NULL;
	r->uri = strdup(uri ? uri : "/");
	if (!r->uri) {
		free(r);
		return NULL;
	}
	r->p = p;
	r->refs = 1;
	r->fd = -1;
	r->content_length = -1;
	r->t_arrival = now_s();
	pthread_mutex_init(&r->lock, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&r->cond, &ca);
	pthread_condattr_destroy(&ca);
	return r;
}

/* Drops one reference (MHD's, the worker's or the response's); the last
 * one frees the request. */
static void preq_unref(struct preq *r)
{
	int left;

	if (!r)
		return;
	pthread_mutex_lock(&r->lock);
	left = --r->refs;
	pthread_mutex_unlock(&r->lock);
	if (left)
		return;
	while (r->head) {
		struct chunk *c = r->head;

		r->head = c->next;
		free(c);
	}
	for (unsigned i = 0; i < r->n_headers; i++)
		free(r->headers[i]);
	for (size_t i = 0; i < r->n_resp; i++)
		free(r->resp_headers[i]);
	free(r->resp_headers);
	free(r->err_body);
	body_release(r->p, r);
	free(r->uri);
	pthread_cond_destroy(&r->cond);
	pthread_mutex_destroy(&r->lock);
	free(r);
}

/* ---- the engine's sink: called on the worker thread ---- */

/* Keeps one backend response header line (at most 512 of them). */
static int sink_header(void *ctx, const char *line, size_t len)
{
	struct preq *r = ctx;
	char *copy;

	pthread_mutex_lock(&r->lock);
	if (r->n_resp == r->cap_resp) {
		size_t cap = r->cap_resp ? r->cap_resp * 2 : 16;
		char **n = cap <= 512 ? realloc(r->resp_headers, cap * sizeof(*n)) : NULL;

		if (!n) {
			pthread_mutex_unlock(&r->lock);
			return 0; /* too many headers: keep the first 512 */
		}
		r->resp_headers = n;
		r->cap_resp = cap;
	}
	copy = strndup(line, len);
	if (copy)
		r->resp_headers[r->n_resp++] = copy;
	pthread_mutex_unlock(&r->lock);
	return 0;
}

/* The backend's status and headers are complete: wakes the connection
 * thread, which answers with them. */
static int sink_headers_done(void *ctx, long status, int64_t content_length)
{
	struct preq *r = ctx;

	pthread_mutex_lock(&r->lock);
	r->hdr_ready = 1;
	r->status = status;
	r->content_length = content_length;
	pthread_cond_broadcast(&r->cond);
	pthread_mutex_unlock(&r->lock);
	return 0;
}

/* Queues body bytes for the connection thread. Waits while QUEUE_MAX bytes
 * are queued (a slow client slows the backend transfer); -1 when the client
 * is gone or the proxy stopping, which aborts the transfer. */
static int sink_data(void *ctx, const char *data, size_t len)
{
	struct preq *r = ctx;
	struct chunk *c;
	int rc = 0;

	if (len == 0)
		return 0;
	c = malloc(sizeof(*c) + len);
	if (!c)
		return -1;
	c->next = NULL;
	c->len = len;
	c->off = 0;
	memcpy(c->data, data, len);
	pthread_mutex_lock(&r->lock);
	while (r->queued >= QUEUE_MAX && !r->client_gone && !atomic_load(&r->p->stopping))
		wait_slice(r);
	if (r->client_gone || atomic_load(&r->p->stopping)) {
		free(c);
		rc = -1;
	} else {
		if (r->tail)
			r->tail->next = c;
		else
			r->head = c;
		r->tail = c;
		r->queued += len;
		pthread_cond_broadcast(&r->cond);
	}
	pthread_mutex_unlock(&r->lock);
	return rc;
}

/* Polled by the transfer: the client is gone or the proxy is stopping. */
static int sink_should_abort(void *ctx)
{
	struct preq *r = ctx;
	int gone;

	pthread_mutex_lock(&r->lock);
	gone = r->client_gone;
	pthread_mutex_unlock(&r->lock);
	return gone || atomic_load(&r->p->stopping);
}

/* A llama-server style error body: {"error":{"code","message","type"}}. */
static char *error_body(int status, const char *type, const char *message)
{
	json_t *o = json_pack("{s:{s:i, s:s, s:s}}", "error", "code", status, "message", message,
	                      "type", type);
	char *s = o ? json_dumps(o, JSON_COMPACT) : NULL;

	json_decref(o);
	return s;
}

/* The engine's own error answer (no backend answered): kept for the
 * connection thread unless the backend's headers already arrived. */
static void sink_error(void *ctx, int status, const char *type, const char *message)
{
	struct preq *r = ctx;
	char *body = error_body(status, type, message);

	klog(LOG_WARN, "event=request_error uri=%s status=%d message=\"%s\"", r->uri, status,
	     message);
	pthread_mutex_lock(&r->lock);
	if (!r->hdr_ready && !r->err_ready) {
		r->err_ready = 1;
		r->err_status = status;
		r->err_body = body;
		body = NULL;
		pthread_cond_broadcast(&r->cond);
	}
	pthread_mutex_unlock(&r->lock);
	free(body);
}

/* The engine is done passing the backend's answer on: the client's answer
 * ends now (a streamed one gets its last chunk), not when the engine has
 * also reported and saved. */
static void sink_end(void *ctx, int broken)
{
	struct preq *r = ctx;

	pthread_mutex_lock(&r->lock);
	r->finished = 1;
	r->broken = broken != 0;
	pthread_cond_broadcast(&r->cond);
	pthread_mutex_unlock(&r->lock);
}

/* The worker thread of one proxied request: runs the engine, then marks the
 * request finished (with a 502 answer if nothing at all came back). */
static void *worker_main(void *arg)
{
	struct preq *r = arg;
	struct proxy *p = r->p;
	struct engine_sink sink = {.ctx = r,
	                           .on_header = sink_header,
	                           .on_headers_done = sink_headers_done,
	                           .on_data = sink_data,
	                           .should_abort = sink_should_abort,
	                           .on_end = sink_end,
	                           .on_error = sink_error};
	struct engine_request rq = {.endpoint = r->ep,
	                            .method = r->method,
	                            .uri = r->uri,
	                            .headers = r->headers,
	                            .body = r->body,
	                            .body_len = r->body_len,
	                            .t_arrival = r->t_arrival};
	int broken = engine_handle(p->engine, &rq, &sink);

	/* The backend call is over: the body is not needed any more, even if
	 * the client is still reading the answer. */
	body_release(p, r);
	pthread_mutex_lock(&r->lock);
	if (!r->finished) { /* else sink_end ended the answer already */
		r->finished = 1;
		r->broken = broken != 0;
	}
	if (!r->hdr_ready && !r->err_ready) {
		r->err_ready = 1;
		r->err_status = 502;
		r->err_body = error_body(502, "unavailable_error", "the backend gave no answer");
	}
	pthread_cond_broadcast(&r->cond);
	pthread_mutex_unlock(&r->lock);
	preq_unref(r);
	pthread_mutex_lock(&p->lock);
	p->workers--;
	pthread_cond_broadcast(&p->cond);
	pthread_mutex_unlock(&p->lock);
	return NULL;
}

/* ---- the connection thread ---- */

/* libmicrohttpd's content reader: hands out queued chunks as they arrive,
 * waiting (and watching the client) while the queue is empty; the end of the
 * stream, or an error when the transfer broke or the client left. */
static ssize_t reader(void *cls, uint64_t pos, char *buf, size_t max)
{
	struct preq *r = cls;
	ssize_t n;

	pthread_mutex_lock(&r->lock);
	while (!r->head && !r->finished && !r->client_gone && !atomic_load(&r->p->stopping))
		wait_slice_conn(r);
	if (r->head) {
		struct chunk *c = r->head;
		size_t k = c->len - c->off < max ? c->len - c->off : max;

		memcpy(buf, c->data + c->off, k);
		c->off += k;
		r->queued -= k;
		r->sent += k;
		if (r->content_length >= 0 && r->sent >= (uint64_t)r->content_length)
			r->delivered = 1;
		if (c->off == c->len) {
			r->head = c->next;
			if (!r->head)
				r->tail = NULL;
			free(c);
		}
		pthread_cond_broadcast(&r->cond);
		n = (ssize_t)k;
	} else {
		n = r->broken || !r->finished ? MHD_CONTENT_READER_END_WITH_ERROR
		                              : MHD_CONTENT_READER_END_OF_STREAM;
		r->delivered = n == MHD_CONTENT_READER_END_OF_STREAM;
	}
	pthread_mutex_unlock(&r->lock);
	return n;
}

/* libmicrohttpd is done with the response: the client has everything, or
 * it left; in the second case the worker's transfer is aborted. */
static void reader_free(void *cls)
{
	struct preq *r = cls;

	/* With a Content-Length, libmicrohttpd may be done with the answer
	 * before the backend transfer has returned: that is not a client gone. */
	pthread_mutex_lock(&r->lock);
	if (!r->delivered)
		r->client_gone = 1;
	pthread_cond_broadcast(&r->cond);
	pthread_mutex_unlock(&r->lock);
	preq_unref(r);
}

/* 1 for headers that belong to one hop (RFC 9110 7.6.1) or that the proxy
 * sets itself, and so are not passed on in either direction. */
static int hop_header(const char *name, size_t len, int request)
{
	static const char *const both[] = {"connection", "keep-alive",    "proxy-connection",
	                                   "te",         "trailer",       "transfer-encoding",
	                                   "upgrade",    "content-length"};
	static const char *const req[] = {"host", "expect", "accept-encoding",
	                                  "proxy-authorization"};
	static const char *const resp[] = {"date", "proxy-authenticate"};

	for (size_t i = 0; i < sizeof(both) / sizeof(both[0]); i++)
		if (strlen(both[i]) == len && strncasecmp(name, both[i], len) == 0)
			return 1;
	for (size_t i = 0; request && i < sizeof(req) / sizeof(req[0]); i++)
		if (strlen(req[i]) == len && strncasecmp(name, req[i], len) == 0)
			return 1;
	for (size_t i = 0; !request && i < sizeof(resp) / sizeof(resp[0]); i++)
		if (strlen(resp[i]) == len && strncasecmp(name, resp[i], len) == 0)
			return 1;
	return 0;
}

/* Keeps a request header to forward, except hop-by-hop ones. */
static enum MHD_Result collect_header(void *cls, enum MHD_ValueKind kind, const char *key,
                                      const char *value)
{
	struct preq *r = cls;
	char *line;

	if (!key || hop_header(key, strlen(key), 1) || r->n_headers == HEADERS_MAX)
		return MHD_YES;
	if (asprintf(&line, "%s: %s", key, value ? value : "") < 0)
		return MHD_YES;
	r->headers[r->n_headers++] = line;
	return MHD_YES;
}

/* Compares without leaking where the first difference is. */
static int same_secret(const char *a, const char *b)
{
	size_t la = strlen(a), lb = strlen(b);
	unsigned char d = la != lb;

	for (size_t i = 0; i < la; i++)
		d |= (unsigned char)(a[i] ^ b[i % (lb ? lb : 1)]);
	return d == 0;
}

/* llama-server's rule (tools/server/server-http.cpp): the key in
 * Authorization, with or without "Bearer ", else in X-Api-Key. */
static int client_key_ok(struct MHD_Connection *conn, const char *key)
{
	const char *a = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Authorization");

	if (a && *a) {
		if (strncasecmp(a, "Bearer ", 7) == 0)
			a += 7;
		return same_secret(a, key);
	}
	a = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-Api-Key");
	return a && same_secret(a, key);
}

/* /health and /v1/health answer without the key, as llama-server's do. */
static int is_public_path(const char *uri)
{
	size_t len = strcspn(uri, "?");

	return (len == 7 && strncmp(uri, "/health", 7) == 0) ||
	       (len == 10 && strncmp(uri, "/v1/health", 10) == 0);
}

/* Answers with a buffer (freed by libmicrohttpd when must_free). */
static enum MHD_Result respond_buffer(struct MHD_Connection *conn, unsigned status,
                                      const char *ctype, char *body, size_t len, int must_free)
{
	struct MHD_Response *resp = MHD_create_response_from_buffer(
	    len, body, must_free ? MHD_RESPMEM_MUST_FREE : MHD_RESPMEM_PERSISTENT);
	enum MHD_Result ret;

	if (!resp) {
		if (must_free)
			free(body);
		return MHD_NO;
	}
	if (ctype)
		MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
	ret = MHD_queue_response(conn, status, resp);
	MHD_destroy_response(resp);
	return ret;
}

/* Answers with the proxy's own llama-server style error body. */
static enum MHD_Result respond_error(struct MHD_Connection *conn, unsigned status, const char *type,
                                     const char *message)
{
	char *body = error_body((int)status, type, message);

	metrics_request_failed();
	if (!body)
		return MHD_NO;
	return respond_buffer(conn, status, "application/json; charset=utf-8", body, strlen(body),
	                      1);
}

/* The 503 of a body over the budget: says why, and when to try again. */
static enum MHD_Result respond_over_budget(struct MHD_Connection *conn, struct proxy *p)
{
	struct MHD_Response *resp;
	enum MHD_Result ret;
	char msg[256], *body;

	metrics_client_refused(METRICS_REFUSED_BODY_BUDGET);
	metrics_request_failed();
	snprintf(msg, sizeof(msg),
	         "kvtier-llama holds --max-inflight-body-bytes (%zu bytes) of request bodies "
	         "already; retry in a few seconds",
	         p->cfg.max_inflight_body_bytes);
	klog(LOG_WARN, "event=body_budget_full max_inflight_body_bytes=%zu action=refuse status=503",
	     p->cfg.max_inflight_body_bytes);
	body = error_body(503, "unavailable_error", msg);
	if (!body)
		return MHD_NO;
	resp = MHD_create_response_from_buffer(strlen(body), body, MHD_RESPMEM_MUST_FREE);
	if (!resp) {
		free(body);
		return MHD_NO;
	}
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE,
	                        "application/json; charset=utf-8");
	MHD_add_response_header(resp, MHD_HTTP_HEADER_RETRY_AFTER, RETRY_AFTER_S);
	ret = MHD_queue_response(conn, MHD_HTTP_SERVICE_UNAVAILABLE, resp);
	MHD_destroy_response(resp);
	return ret;
}

/* The 413 of a body over --max-request-size. */
static enum MHD_Result respond_too_big(struct MHD_Connection *conn, struct proxy *p)
{
	char msg[128];

	snprintf(msg, sizeof(msg), "request body larger than --max-request-size (%zu bytes)",
	         p->cfg.max_request_bytes);
	return respond_error(conn, 413, "invalid_request_error", msg);
}

/* The body's declared length (Content-Length), or -1 when it has none
 * (chunked) or an unreadable one. */
static int64_t declared_length(struct MHD_Connection *conn)
{
	const char *v =
	    MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
	char *end;
	unsigned long long n;

	if (!v || *v < '0' || *v > '9')
		return -1;
	errno = 0;
	n = strtoull(v, &end, 10);
	if (errno || *end || n > INT64_MAX)
		return -1;
	return (int64_t)n;
}

/* The managed endpoint a raw URI names (llama-server's aliases included), or
 * METRICS_EP_OTHER. */
static enum metrics_endpoint endpoint_of(const char *uri)
{
	size_t len = strcspn(uri, "?");

#define IS(s) (len == sizeof(s) - 1 && strncmp(uri, s, len) == 0)
	if (IS("/completion") || IS("/completions"))
		return METRICS_EP_COMPLETION;
	if (IS("/v1/completions"))
		return METRICS_EP_V1_COMPLETIONS;
	if (IS("/v1/chat/completions") || IS("/chat/completions"))
		return METRICS_EP_V1_CHAT;
#undef IS
	return METRICS_EP_OTHER;
}

static int is_metrics_path(const char *uri)
{
	size_t len = strcspn(uri, "?");

	return len == 8 && strncmp(uri, "/metrics", 8) == 0;
}

/* Sends the worker's answer: its error, or a callback response carrying the
 * backend's status and headers. */
static enum MHD_Result answer(struct MHD_Connection *conn, struct preq *r)
{
	struct MHD_Response *resp;
	enum MHD_Result ret;
	uint64_t size;
	long status;

	pthread_mutex_lock(&r->lock);
	while (!r->hdr_ready && !r->err_ready && !r->client_gone && !atomic_load(&r->p->stopping))
		wait_slice_conn(r);
	if (!r->hdr_ready) {
		char *body = r->err_body;
		int st = r->err_ready ? r->err_status : 503;

		r->err_body = NULL;
		pthread_mutex_unlock(&r->lock);
		if (!body)
			return respond_error(conn, 503, "unavailable_error",
			                     "kvtier-llama is stopping");
		return respond_buffer(conn, (unsigned)st, "application/json; charset=utf-8", body,
		                      strlen(body), 1);
	}
	status = r->status;
	size = r->content_length >= 0 ? (uint64_t)r->content_length : MHD_SIZE_UNKNOWN;
	r->refs++; /* the response's */
	pthread_mutex_unlock(&r->lock);
	resp = MHD_create_response_from_callback(size, 64 * 1024, reader, r, reader_free);
	if (!resp) {
		reader_free(r);
		return MHD_NO;
	}
	pthread_mutex_lock(&r->lock);
	for (size_t i = 0; i < r->n_resp; i++) {
		char *line = r->resp_headers[i], *colon = strchr(line, ':');
		const char *v;

		if (!colon || colon == line || hop_header(line, (size_t)(colon - line), 0))
			continue;
		*colon = '\0';
		for (v = colon + 1; *v == ' ' || *v == '\t'; v++)
			;
		if (MHD_add_response_header(resp, line, v) != MHD_YES)
			klog(LOG_DEBUG, "event=response_header_dropped name=%s", line);
		*colon = ':';
	}
	pthread_mutex_unlock(&r->lock);
	ret = MHD_queue_response(conn, (unsigned)status, resp);
	MHD_destroy_response(resp);
	return ret;
}

/* The client waits for "100 Continue" before it sends the body. */
static int expects_continue(struct MHD_Connection *conn)
{
	const char *v = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_EXPECT);

	return v && strcasecmp(v, "100-continue") == 0;
}

/* The headers are in: sizes the body. A body of known length is reserved
 * against the budget and allocated once, whole. A request that will be
 * refused (no key, too large, over the budget) keeps nothing: its body is
 * read and dropped, and the refusal sent after it, so that any client reads
 * it; a client that asked for "100 Continue" gets it at once instead and
 * never sends the body. */
static enum MHD_Result body_start(struct MHD_Connection *conn, struct proxy *p, struct preq *r)
{
	int64_t cl = declared_length(conn);

	if (cl > 0 && (uint64_t)cl > p->cfg.max_request_bytes)
		r->too_big = 1;
	else if (r->key_ok && cl > 0 && body_reserve(p, r, (size_t)cl + 1))
		r->over_budget = 1;
	if (!r->key_ok || r->too_big || r->over_budget) {
		if (!expects_continue(conn))
			return MHD_YES;
		r->phase = 2;
		if (!r->key_ok)
			return respond_error(conn, 401, "authentication_error", "Invalid API Key");
		return r->too_big ? respond_too_big(conn, p) : respond_over_budget(conn, p);
	}
	if (cl > 0) {
		r->body = malloc((size_t)cl + 1);
		if (!r->body) {
			body_release(p, r);
			r->over_budget = 1; /* refused as a full budget: retry later */
			return MHD_YES;
		}
		r->body_cap = (size_t)cl + 1;
	}
	return MHD_YES;
}

/* libmicrohttpd's access handler, on the connection's thread: collects the
 * headers and the body (bounded), answers /metrics itself, and for every
 * other request starts a worker and answers with what the worker gets. */
static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn, const char *url,
                                  const char *method, const char *version, const char *upload_data,
                                  size_t *upload_size, void **con_cls)
{
	struct proxy *p = cls;
	struct preq *r = *con_cls;
	pthread_t th;
	pthread_attr_t attr;

	if (!r) /* the URI log callback ran out of memory */
		return MHD_NO;
	if (r->phase == 0) {
		r->phase = 1;
		/* The body comes under the idle timeout and the request
		 * deadline, like the headers: no exemption before the proxy
		 * has the whole request. */
		r->pc = pconn_of(conn);
		snprintf(r->method, sizeof(r->method), "%s", method);
		r->ep = endpoint_of(r->uri);
		{
			const union MHD_ConnectionInfo *ci =
			    MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);

			r->fd = ci ? ci->connect_fd : -1;
		}
		MHD_get_connection_values(conn, MHD_HEADER_KIND, collect_header, r);
		r->key_ok = !p->cfg.api_key || !strcmp(method, "OPTIONS") ||
		            is_public_path(r->uri) || client_key_ok(conn, p->cfg.api_key);
		return body_start(conn, p, r);
	}
	if (*upload_size) {
		size_t n = *upload_size;

		*upload_size = 0;
		if (!r->key_ok || r->too_big || r->over_budget)
			return MHD_YES; /* refused: dropped as it comes */
		if (n > p->cfg.max_request_bytes - r->body_len) {
			r->too_big = 1;
			body_release(p, r);
			return MHD_YES;
		}
		if (r->body_len + n + 1 > r->body_cap) {
			/* No Content-Length (chunked): grow by half, within the
			 * request's limit and the budget. */
			size_t cap = r->body_cap ? r->body_cap : BODY_MIN_CAP;
			char *b;

			while (cap < r->body_len + n + 1)
				cap += cap / 2;
			if (cap > p->cfg.max_request_bytes + 1)
				cap = p->cfg.max_request_bytes + 1;
			if (body_reserve(p, r, cap - r->body_cap)) {
				r->over_budget = 1;
				return MHD_YES;
			}
			b = realloc(r->body, cap);
			if (!b) {
				r->over_budget = 1;
				return MHD_YES;
			}
			r->body = b;
			r->body_cap = cap;
		}
		memcpy(r->body + r->body_len, upload_data, n);
		r->body_len += n;
		r->body[r->body_len] = '\0';
		return MHD_YES;
	}
	if (r->phase == 2)
		return MHD_YES;
	r->phase = 2;
	if (!r->key_ok)
		return respond_error(conn, 401, "authentication_error", "Invalid API Key");
	if (is_metrics_path(r->uri)) {
		size_t len = 0;
		char *page;

		if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0)
			return respond_error(conn, 405, "invalid_request_error",
			                     "/metrics is read-only (GET, HEAD)");
		page = metrics_render(&len);
		if (!page)
			return respond_error(conn, 500, "server_error", "out of memory");
		return respond_buffer(conn, 200, "text/plain; version=0.0.4; charset=utf-8", page,
		                      len, 1);
	}
	if (r->too_big)
		return respond_too_big(conn, p);
	if (r->over_budget) {
		body_release(p, r);
		return respond_over_budget(conn, p);
	}
	if (atomic_load(&p->stopping))
		return respond_error(conn, 503, "unavailable_error", "kvtier-llama is stopping");
	/* The request is in: from here the proxy works on the answer, which
	 * may take as long as --timeout-ms allows (a long completion). */
	MHD_set_connection_option(conn, MHD_CONNECTION_OPTION_TIMEOUT, 0u);
	pconn_set(p, r->pc, 1, 0);
	pthread_mutex_lock(&r->lock);
	r->refs++; /* the worker's */
	pthread_mutex_unlock(&r->lock);
	pthread_mutex_lock(&p->lock);
	p->workers++;
	pthread_mutex_unlock(&p->lock);
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	if (pthread_create(&th, &attr, worker_main, r) != 0) {
		pthread_attr_destroy(&attr);
		pthread_mutex_lock(&p->lock);
		p->workers--;
		pthread_mutex_unlock(&p->lock);
		preq_unref(r);
		return respond_error(conn, 503, "unavailable_error",
		                     "cannot start a thread for the request");
	}
	pthread_attr_destroy(&attr);
	return answer(conn, r);
}

/* URI log callback: the request object is born here, with the raw URI. */
static void *on_uri(void *cls, const char *uri, struct MHD_Connection *conn)
{
	return preq_new(cls, uri);
}

/* The request is over: the idle timeout applies again, a worker still
 * producing is told the client is gone, the MHD side's reference is dropped. */
static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
	struct proxy *p = cls;
	struct preq *r = *con_cls;

	*con_cls = NULL;
	if (conn) {
		/* The next request on this connection: idle for at most
		 * --idle-timeout-s, then --request-timeout-s to send it. */
		MHD_set_connection_option(conn, MHD_CONNECTION_OPTION_TIMEOUT,
		                          p->cfg.idle_timeout_s);
		pconn_set(p, r && r->pc ? r->pc : pconn_of(conn), 0,
		          now_s() + p->cfg.idle_timeout_s + p->cfg.request_timeout_s);
	}
	if (!r)
		return;
	pthread_mutex_lock(&r->lock);
	/* Whatever is still being produced has nowhere to go. */
	if (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK || !r->delivered)
		r->client_gone = 1;
	pthread_cond_broadcast(&r->cond);
	pthread_mutex_unlock(&r->lock);
	preq_unref(r);
}

/* libmicrohttpd's messages, as log lines; the last one is kept for errors. */
static void on_mhd_log(void *cls, const char *fmt, va_list ap)
{
	struct proxy *p = cls;
	size_t n;

	vsnprintf(p->last_log, sizeof(p->last_log), fmt, ap);
	n = strlen(p->last_log);
	while (n > 0 && (p->last_log[n - 1] == '\n' || p->last_log[n - 1] == '\r'))
		p->last_log[--n] = '\0';
	klog(LOG_WARN, "event=http msg=\"%s\"", p->last_log);
}

/* Splits HOST:PORT or [ADDR]:PORT. Returns 0 or -EINVAL. */
static int split_hostport(const char *hp, char *host, size_t hostcap, char *port, size_t portcap)
{
	const char *h = hp, *colon;
	size_t hl;

	if (!hp || !*hp)
		return -EINVAL;
	if (hp[0] == '[') {
		const char *rb = strchr(hp, ']');

		if (!rb || rb[1] != ':')
			return -EINVAL;
		h = hp + 1;
		hl = (size_t)(rb - h);
		colon = rb + 1;
	} else {
		colon = strrchr(hp, ':');
		if (!colon)
			return -EINVAL;
		hl = (size_t)(colon - hp);
		if (memchr(h, ':', hl))
			return -EINVAL;
	}
	if (hl == 0 || hl >= hostcap || strlen(colon + 1) == 0 || strlen(colon + 1) >= portcap)
		return -EINVAL;
	for (const char *c = colon + 1; *c; c++)
		if (*c < '0' || *c > '9')
			return -EINVAL;
	memcpy(host, h, hl);
	host[hl] = '\0';
	snprintf(port, portcap, "%s", colon + 1);
	return 0;
}

int proxy_start(const struct proxy_config *cfg, struct engine *e, struct proxy **out, char *err,
                size_t errlen)
{
	struct addrinfo hints, *res = NULL, *ai;
	struct sockaddr_storage addr;
	struct proxy *p = NULL;
	char host[256], port[8];
	unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION |
	                 MHD_USE_POLL | MHD_USE_ERROR_LOG;
	int rc, saved;

	*out = NULL;
	if (split_hostport(cfg->listen, host, sizeof(host), port, sizeof(port))) {
		snprintf(err, errlen, "--listen %s: expected HOST:PORT or [ADDR]:PORT",
		         cfg->listen);
		return -EINVAL;
	}
	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_NUMERICSERV | AI_PASSIVE;
	rc = getaddrinfo(host, port, &hints, &res);
	if (rc) {
		snprintf(err, errlen, "--listen %s: cannot resolve \"%s\": %s", cfg->listen, host,
		         gai_strerror(rc));
		return -EINVAL;
	}
	for (ai = res; ai; ai = ai->ai_next)
		if ((ai->ai_family == AF_INET || ai->ai_family == AF_INET6) &&
		    ai->ai_addrlen <= sizeof(addr))
			break;
	if (!ai) {
		snprintf(err, errlen, "--listen %s: no IPv4 or IPv6 address", cfg->listen);
		rc = -EINVAL;
		goto out;
	}
	memset(&addr, 0, sizeof(addr));
	memcpy(&addr, ai->ai_addr, ai->ai_addrlen);
	if (ai->ai_family == AF_INET6)
		flags |= MHD_USE_IPv6;
	p = calloc(1, sizeof(*p));
	if (!p) {
		snprintf(err, errlen, "out of memory");
		rc = -ENOMEM;
		goto out;
	}
	p->engine = e;
	p->cfg = *cfg;
	pthread_mutex_init(&p->lock, NULL);
	pthread_cond_init(&p->cond, NULL);
	pthread_mutex_init(&p->conn_lock, NULL);
	{
		pthread_condattr_t ca;

		pthread_condattr_init(&ca);
		pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
		pthread_cond_init(&p->conn_cond, &ca);
		pthread_condattr_destroy(&ca);
	}
	errno = 0;
	p->daemon = MHD_start_daemon(
	    flags, (uint16_t)atoi(port), NULL, NULL, on_request, p, MHD_OPTION_EXTERNAL_LOGGER,
	    on_mhd_log, p, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&addr,
	    MHD_OPTION_URI_LOG_CALLBACK, on_uri, p, MHD_OPTION_NOTIFY_COMPLETED, on_completed, p,
	    MHD_OPTION_NOTIFY_CONNECTION, on_connection, p, MHD_OPTION_CONNECTION_LIMIT,
	    cfg->max_connections, MHD_OPTION_PER_IP_CONNECTION_LIMIT,
	    cfg->max_connections_per_ip, MHD_OPTION_CONNECTION_TIMEOUT, cfg->idle_timeout_s,
	    MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)(256 * 1024), MHD_OPTION_END);
	saved = errno;
	if (!p->daemon) {
		snprintf(err, errlen, "cannot serve HTTP on %s: %s", cfg->listen,
		         p->last_log[0] ? p->last_log
		         : saved        ? strerror(saved)
		                        : "libmicrohttpd failed");
		rc = saved ? -saved : -EIO;
		goto fail;
	}
	rc = pthread_create(&p->reaper, NULL, reaper_main, p);
	if (rc) {
		snprintf(err, errlen, "cannot start the request deadline thread: %s",
		         strerror(rc));
		MHD_stop_daemon(p->daemon);
		rc = -rc;
		goto fail;
	}
	p->reaper_started = 1;
	*out = p;
	rc = 0;
out:
	freeaddrinfo(res);
	return rc;
fail:
	pthread_cond_destroy(&p->conn_cond);
	pthread_mutex_destroy(&p->conn_lock);
	pthread_cond_destroy(&p->cond);
	pthread_mutex_destroy(&p->lock);
	free(p);
	goto out;
}

void proxy_stop(struct proxy *p)
{
	if (!p)
		return;
	atomic_store(&p->stopping, 1);
	if (p->reaper_started) {
		pthread_mutex_lock(&p->conn_lock);
		p->reaper_stop = 1;
		pthread_cond_broadcast(&p->conn_cond);
		pthread_mutex_unlock(&p->conn_lock);
		pthread_join(p->reaper, NULL);
	}
	MHD_stop_daemon(p->daemon);
	/* Workers end within a second or so: their transfers see `stopping`. */
	pthread_mutex_lock(&p->lock);
	while (p->workers) {
		struct timespec dl;

		clock_gettime(CLOCK_REALTIME, &dl);
		dl.tv_sec += WAIT_SLICE_S;
		pthread_cond_timedwait(&p->cond, &p->lock, &dl);
	}
	pthread_mutex_unlock(&p->lock);
	pthread_cond_destroy(&p->conn_cond);
	pthread_mutex_destroy(&p->conn_lock);
	pthread_cond_destroy(&p->cond);
	pthread_mutex_destroy(&p->lock);
	free(p);
}
