/* backend.h: calls to one llama-server over HTTP (libcurl).
 *
 * Every call has a timeout, so a backend that never answers (ik_llama.cpp
 * on a failed slot action) costs at most that long. Calls are blocking and
 * thread-safe (one curl easy handle per call). Nothing here keeps state
 * about a backend: the slot table (slots.h) and the engine (engine.h) do.
 *
 * Return values: 0 when the server answered (any HTTP status, see
 * reply->status), -ETIMEDOUT when the timeout passed, -ECONNREFUSED when no
 * connection could be made, -EPROTO when the answer is not what the call
 * expects (not JSON, missing fields), -ENOMEM, -EIO for other transport
 * errors. reply->err always says what happened in words.
 */
#ifndef KVTIER_PLUGIN_BACKEND_H
#define KVTIER_PLUGIN_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "jscan.h"

/* Largest JSON answer read from a backend for the proxy's own calls. */
#define BACKEND_MAX_REPLY (64u << 20)
/* Most token ids read from one /tokenize answer when the caller gives no
 * smaller bound (backend_tokenize). */
#define BACKEND_MAX_TOKENS (1u << 20)

/* A part of a request body: a body is sent from its pieces in order, never
 * joined into one buffer. The bytes stay the caller's. */
struct backend_piece {
	const char *p;
	size_t len;
};

struct backend_reply {
	long status;    /* HTTP status; 0 when there was no answer */
	json_t *json;   /* the body parsed, when it is JSON; owned, see backend_reply_free */
	double seconds; /* wall time of the call */
	char err[256];  /* what failed, or "" */
};

#define BACKEND_KEY_MAX 512

/* The API key every call to a backend carries (llama-server --api-key), as
 * "Authorization: Bearer KEY"; NULL or "" for none. Call before any thread
 * exists. Returns 0, or -EINVAL for a key longer than BACKEND_KEY_MAX or
 * with bytes outside printable ASCII. */
int backend_set_api_key(const char *key);

/* A backend written "URL#MODEL" is model MODEL of a llama-server in router
 * mode (--models-dir): its GETs carry ?model=MODEL, its POSTs "model":
 * MODEL in the body. Returns MODEL, or NULL for a plain backend. */
const char *backend_model(const char *base);

/* Starts libcurl; call once before any thread exists. Returns 0 or -EIO. */
int backend_global_init(void);
void backend_global_cleanup(void);

/* Frees reply->json and clears the reply. */
void backend_reply_free(struct backend_reply *r);

/* GET base+path and parse the body as JSON (reply->json stays NULL when the
 * body is not JSON: that is not an error here). */
int backend_get_json(const char *base, const char *path, unsigned timeout_ms,
                     struct backend_reply *r);

/* POST body (serialized compactly) to base+path with Content-Type
 * application/json, and parse the answer as backend_get_json does. */
int backend_post_json(const char *base, const char *path, const json_t *body, unsigned timeout_ms,
                      struct backend_reply *r);

/* POST /tokenize {"content": CONTENT, "add_special": true, "parse_special":
 * true}, where content_json (len bytes) is the prompt as a JSON string,
 * quotes included, sent as it is (no copy). On success *tokens (malloc'd,
 * caller frees) holds *n token ids. An answer of more than max_tokens ids is
 * -E2BIG (the call stops reading it: the prompt cannot fit a slot); an HTTP
 * error or a malformed answer is -EPROTO with r->err set. */
int backend_tokenize_json(const char *base, const char *content_json, size_t len,
                          size_t max_tokens, unsigned timeout_ms, int32_t **tokens, size_t *n,
                          struct backend_reply *r);

/* backend_tokenize_json for a plain NUL-terminated string, at most
 * BACKEND_MAX_TOKENS ids. */
int backend_tokenize(const char *base, const char *content, unsigned timeout_ms, int32_t **tokens,
                     size_t *n, struct backend_reply *r);

/* POST /apply-template with the chat request body (chat_len bytes, a JSON
 * object: messages, tools and template options all shape the prompt) sent
 * as it is, plus "model" for a router backend. On success *buf (malloc'd,
 * caller frees) holds the answer and *prompt_json is its "prompt" member, a
 * JSON string (quotes included) inside *buf: the prompt the server would
 * tokenize, ready for backend_tokenize_json. */
int backend_apply_template(const char *base, const char *chat, size_t chat_len,
                           unsigned timeout_ms, char **buf, struct jspan *prompt_json,
                           struct backend_reply *r);

/* Tells whether a slot action's effect can be seen (a saved file complete
 * and no longer growing): done(ctx) returns 1 then. It is called from
 * another thread, after the server answered a task posted after the action. */
struct backend_probe {
	int (*done)(void *ctx);
	void *ctx;
};

/* POST /slots/{id}?action={action} {"filename": filename}: always a JSON body,
 * since an empty POST hangs llama-server. `filename` must already be a safe
 * name (see backend_filename_ok). The reply is left in r (status, json).
 * With a probe (may be NULL), a call left unanswered whose effect the probe
 * sees returns -EALREADY (r has no reply) instead of waiting for
 * timeout_ms. */
int backend_slot_action(const char *base, unsigned id, const char *action, const char *filename,
                        unsigned timeout_ms, const struct backend_probe *probe,
                        struct backend_reply *r);

/* 1 when name is acceptable to llama-server as a slot file name: 1..255
 * bytes, no '/', no "..", no ':', no control characters. */
int backend_filename_ok(const char *name);

/* ---- streamed forward ---- */

/* Where a forwarded response goes. Callbacks run on the calling thread. */
struct backend_sink {
	void *ctx;
	/* One raw response header line ("Name: value", CRLF stripped), for the
	 * final response only. Return 0, or -1 to abort the transfer. */
	int (*on_header)(void *ctx, const char *line, size_t len);
	/* The status line and all headers have arrived. content_length is -1
	 * when the backend did not send one. Return 0 or -1 to abort. */
	int (*on_headers_done)(void *ctx, long status, int64_t content_length);
	/* Body bytes, as they arrive. Return 0, or -1 to abort (client gone). */
	int (*on_data)(void *ctx, const char *data, size_t len);
	/* Polled about once a second and between transfers of data (may be
	 * NULL). Return non-zero to abort: the proxy is stopping, or the
	 * client went away. */
	int (*should_abort)(void *ctx);
};

struct backend_request {
	const char *method; /* "GET", "POST", ... */
	const char *base;   /* backend base URL, no trailing '/' */
	const char *uri;    /* path and query as the client sent them */
	char **headers;     /* "Name: value" lines to send; NULL-terminated or NULL */
	const char *body;   /* may be NULL for no body */
	size_t body_len;
	/* When n_pieces > 0, the body is these pieces in order instead (body
	 * and body_len are not used). */
	const struct backend_piece *pieces;
	unsigned n_pieces;
	unsigned timeout_ms; /* whole transfer */
};

struct backend_result {
	long status;      /* HTTP status, 0 when none arrived */
	int headers_done; /* on_headers_done was called */
	int aborted;      /* a sink callback asked to stop */
	double seconds;
	char err[256];
};

/* Sends the request and streams the answer into the sink. Returns 0 when the
 * whole response arrived; -ECONNREFUSED when the backend could not be reached
 * (nothing was sent: the request may be retried elsewhere); -ETIMEDOUT;
 * -ECANCELED when a callback aborted; -EIO for other transport errors. */
int backend_forward(const struct backend_request *q, const struct backend_sink *s,
                    struct backend_result *res);

#endif /* KVTIER_PLUGIN_BACKEND_H */
