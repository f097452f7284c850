/* backend.c: libcurl calls to llama-server, every one with a timeout.
 *
 * One easy handle per call (no shared state between threads). Proxies from
 * the environment are ignored: backends are addressed directly. Redirects
 * are not followed, "Expect: 100-continue" is never sent, and no encoding
 * is asked for, so the bytes of a forwarded response are the backend's own.
 *
 * This module must never keep a backend waiting on an empty POST (slot
 * actions always carry a JSON body), never buffer a forwarded response (it
 * streams into the sink), and never block without a timeout.
 */
#include "backend.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <curl/curl.h>

#include "jscan.h"

#define CONNECT_TIMEOUT_MS 5000u
#define HEADER_MAX 32768u /* bytes of response headers kept for the sink */

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int backend_global_init(void)
{
	return curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK ? 0 : -EIO;
}

void backend_global_cleanup(void)
{
	curl_global_cleanup();
}

void backend_reply_free(struct backend_reply *r)
{
	if (!r)
		return;
	json_decref(r->json);
	memset(r, 0, sizeof(*r));
}

static void set_err(char *buf, size_t len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Formats an error message into buf, truncated to len (only a log line). */
static void set_err(char *buf, size_t len, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(buf, len, fmt, ap);
	va_end(ap);
}

/* Maps a transfer's result to this module's return codes. */
static int rc_of(CURLcode c)
{
	switch (c) {
	case CURLE_OK:
		return 0;
	case CURLE_OPERATION_TIMEDOUT:
		return -ETIMEDOUT;
	case CURLE_COULDNT_CONNECT:
	case CURLE_COULDNT_RESOLVE_HOST:
		return -ECONNREFUSED;
	case CURLE_WRITE_ERROR:
	case CURLE_ABORTED_BY_CALLBACK:
		return -ECANCELED;
	case CURLE_OUT_OF_MEMORY:
		return -ENOMEM;
	default:
		return -EIO;
	}
}

/* The backends' API key header (--backend-api-key-file), or "" for none.
 * Set once before any thread exists. */
static char key_header[BACKEND_KEY_MAX + 32];

int backend_set_api_key(const char *key)
{
	size_t n = key ? strlen(key) : 0;

	if (n == 0) {
		key_header[0] = '\0';
		return 0;
	}
	if (n > BACKEND_KEY_MAX)
		return -EINVAL;
	for (size_t i = 0; i < n; i++)
		if ((unsigned char)key[i] < 0x21 || (unsigned char)key[i] > 0x7e)
			return -EINVAL;
	snprintf(key_header, sizeof(key_header), "Authorization: Bearer %s", key);
	return 0;
}

/* A backend "URL#MODEL" is model MODEL of a llama-server in router mode:
 * url receives the URL part, *model the model (NULL when there is none). */
static int split_base(const char *base, char *url, size_t len, const char **model)
{
	const char *hash = strchr(base, '#');
	size_t n = hash ? (size_t)(hash - base) : strlen(base);

	*model = hash && hash[1] ? hash + 1 : NULL;
	if (n >= len)
		return -EINVAL;
	memcpy(url, base, n);
	url[n] = '\0';
	return 0;
}

const char *backend_model(const char *base)
{
	const char *hash = strchr(base, '#');

	return hash && hash[1] ? hash + 1 : NULL;
}

/* A handle with the options every call shares. NULL when out of memory. */
static CURL *handle_new(const char *url, unsigned timeout_ms, char *errbuf)
{
	CURL *h = curl_easy_init();
	unsigned ct = timeout_ms < CONNECT_TIMEOUT_MS ? timeout_ms : CONNECT_TIMEOUT_MS;

	if (!h)
		return NULL;
	if (curl_easy_setopt(h, CURLOPT_URL, url) != CURLE_OK ||
	    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L) != CURLE_OK ||
	    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, (long)timeout_ms) != CURLE_OK ||
	    curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, (long)ct) != CURLE_OK ||
	    curl_easy_setopt(h, CURLOPT_PROXY, "") != CURLE_OK ||
	    curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 0L) != CURLE_OK ||
	    curl_easy_setopt(h, CURLOPT_TCP_NODELAY, 1L) != CURLE_OK ||
	    curl_easy_setopt(h, CURLOPT_ERRORBUFFER, errbuf) != CURLE_OK) {
		curl_easy_cleanup(h);
		return NULL;
	}
	errbuf[0] = '\0';
	return h;
}

struct membuf {
	char *p;
	size_t len, cap;
	size_t max; /* larger answers abort the call */
	int overflow;
	CURL *h; /* to read the answer's Content-Length */
};

/* A request body sent from pieces (curl read callback): nothing is joined
 * into one buffer. */
struct piece_reader {
	const struct backend_piece *pieces;
	unsigned n;
	unsigned i;  /* current piece */
	size_t off;  /* within it */
	curl_off_t total;
};

static curl_off_t pieces_total(const struct backend_piece *pieces, unsigned n)
{
	curl_off_t t = 0;

	for (unsigned i = 0; i < n; i++)
		t += (curl_off_t)pieces[i].len;
	return t;
}

static size_t pieces_read(char *buf, size_t size, size_t nitems, void *ctx)
{
	struct piece_reader *pr = ctx;
	size_t room = size * nitems, n = 0;

	while (n < room && pr->i < pr->n) {
		const struct backend_piece *pc = &pr->pieces[pr->i];
		size_t k = pc->len - pr->off < room - n ? pc->len - pr->off : room - n;

		memcpy(buf + n, pc->p + pr->off, k);
		n += k;
		pr->off += k;
		if (pr->off == pc->len) {
			pr->i++;
			pr->off = 0;
		}
	}
	return n;
}

/* curl rewinds the body when it must send it again (a reused connection the
 * server had closed). */
static int pieces_seek(void *ctx, curl_off_t offset, int origin)
{
	struct piece_reader *pr = ctx;

	if (origin != SEEK_SET || offset < 0 || offset > pr->total)
		return CURL_SEEKFUNC_CANTSEEK;
	pr->i = 0;
	pr->off = 0;
	while (pr->i < pr->n && (curl_off_t)pr->pieces[pr->i].len <= offset) {
		offset -= (curl_off_t)pr->pieces[pr->i].len;
		pr->i++;
	}
	pr->off = (size_t)offset;
	return CURL_SEEKFUNC_OK;
}

/* Makes h send the pieces as its request body (POST unless the method is
 * set otherwise). */
static CURLcode pieces_setopt(CURL *h, struct piece_reader *pr,
                              const struct backend_piece *pieces, unsigned n)
{
	CURLcode c;

	memset(pr, 0, sizeof(*pr));
	pr->pieces = pieces;
	pr->n = n;
	pr->total = pieces_total(pieces, n);
	c = curl_easy_setopt(h, CURLOPT_POST, 1L);
	if (c == CURLE_OK)
		c = curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, pr->total);
	if (c == CURLE_OK)
		c = curl_easy_setopt(h, CURLOPT_READFUNCTION, pieces_read);
	if (c == CURLE_OK)
		c = curl_easy_setopt(h, CURLOPT_READDATA, pr);
	if (c == CURLE_OK)
		c = curl_easy_setopt(h, CURLOPT_SEEKFUNCTION, pieces_seek);
	if (c == CURLE_OK)
		c = curl_easy_setopt(h, CURLOPT_SEEKDATA, pr);
	return c;
}

/* curl write callback of the JSON calls: appends to the buffer, at most
 * BACKEND_MAX_REPLY bytes (returning short aborts the transfer). */
static size_t membuf_write(char *data, size_t size, size_t nmemb, void *ctx)
{
	struct membuf *b = ctx;
	size_t n = size * nmemb;

	if (n > b->max - b->len) {
		b->overflow = 1;
		return 0; /* aborts the transfer */
	}
	if (b->len + n + 1 > b->cap) {
		curl_off_t cl = -1;
		size_t cap = b->cap ? b->cap : 4096;
		char *p;

		/* The whole answer at once when its length is known. */
		if (!b->cap && b->h &&
		    curl_easy_getinfo(b->h, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &cl) == CURLE_OK &&
		    cl > 0 && (uint64_t)cl <= b->max && (size_t)cl + 1 > cap)
			cap = (size_t)cl + 1;
		while (cap < b->len + n + 1)
			cap = cap / 2 * 3;
		p = realloc(b->p, cap);
		if (!p)
			return 0;
		b->p = p;
		b->cap = cap;
	}
	memcpy(b->p + b->len, data, n);
	b->len += n;
	b->p[b->len] = '\0';
	return n;
}

/* libcurl's progress callback of a call that another thread may end:
 * returning non-zero aborts the transfer (CURLE_ABORTED_BY_CALLBACK). */
static int stop_progress(void *ctx, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal,
                         curl_off_t ulnow)
{
	(void)dltotal;
	(void)dlnow;
	(void)ultotal;
	(void)ulnow;
	return atomic_load((atomic_int *)ctx) != 0;
}

/* How a JSON call is made and what comes back. */
struct call {
	const struct backend_piece *body; /* NULL: a GET */
	unsigned n_body;
	size_t max_reply;  /* 0: BACKEND_MAX_REPLY */
	atomic_int *stop;  /* see json_call */
	char **raw;        /* non-NULL: the answer's bytes are handed over here (NUL-terminated,
	                      caller frees) instead of being parsed into r->json */
	size_t *raw_len;
};

/* Runs a GET or a JSON POST and fills r. With c->stop, the call ends with
 * -EALREADY (within about a second) once *stop is non-zero. */
static int json_call_ex(const char *base, const char *path, const struct call *cl,
                        unsigned timeout_ms, struct backend_reply *r)
{
	char url[2048], errbuf[CURL_ERROR_SIZE];
	struct curl_slist *hdrs = NULL, *t;
	struct membuf b = {.max = cl->max_reply ? cl->max_reply : BACKEND_MAX_REPLY};
	struct piece_reader pr;
	atomic_int *stop = cl->stop;
	const void *body = cl->body;
	double t0 = now_s();
	CURL *h = NULL;
	CURLcode c;
	int rc = 0;

	memset(r, 0, sizeof(*r));
	{
		char root[1024];
		const char *model;
		char *esc = NULL;
		int n;

		if (split_base(base, root, sizeof(root), &model)) {
			snprintf(r->err, sizeof(r->err), "URL too long");
			return -EINVAL;
		}
		/* A router takes the model of a GET from the query, of a POST
		 * from the body (backend_post_json adds it). */
		if (model && !body && strcmp(path, "/health") != 0)
			esc = curl_easy_escape(NULL, model, 0);
		n = snprintf(url, sizeof(url), "%s%s%s%s%s", root, path,
		             esc ? (strchr(path, '?') ? "&" : "?") : "", esc ? "model=" : "",
		             esc ? esc : "");
		curl_free(esc);
		if (n < 0 || (size_t)n >= sizeof(url)) {
			snprintf(r->err, sizeof(r->err), "URL too long");
			return -EINVAL;
		}
	}
	h = handle_new(url, timeout_ms, errbuf);
	if (!h) {
		rc = -ENOMEM;
		snprintf(r->err, sizeof(r->err), "out of memory");
		goto out;
	}
	b.h = h;
	t = curl_slist_append(hdrs, "Expect:");
	if (t)
		hdrs = t;
	if (key_header[0]) {
		t = curl_slist_append(hdrs, key_header);
		if (!t) {
			rc = -ENOMEM;
			snprintf(r->err, sizeof(r->err), "out of memory");
			goto out;
		}
		hdrs = t;
	}
	if (body) {
		t = curl_slist_append(hdrs, "Content-Type: application/json");
		if (!t) {
			rc = -ENOMEM;
			snprintf(r->err, sizeof(r->err), "out of memory");
			goto out;
		}
		hdrs = t;
		if (pieces_setopt(h, &pr, cl->body, cl->n_body) != CURLE_OK) {
			rc = -ENOMEM;
			snprintf(r->err, sizeof(r->err), "out of memory");
			goto out;
		}
	}
	if (curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs) != CURLE_OK ||
	    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, membuf_write) != CURLE_OK ||
	    curl_easy_setopt(h, CURLOPT_WRITEDATA, &b) != CURLE_OK ||
	    (stop && (curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L) != CURLE_OK ||
	              curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, stop_progress) != CURLE_OK ||
	              curl_easy_setopt(h, CURLOPT_XFERINFODATA, stop) != CURLE_OK))) {
		rc = -ENOMEM;
		snprintf(r->err, sizeof(r->err), "out of memory");
		goto out;
	}
	c = curl_easy_perform(h);
	r->seconds = now_s() - t0;
	if (c == CURLE_ABORTED_BY_CALLBACK && stop && atomic_load(stop)) {
		rc = -EALREADY;
		set_err(r->err, sizeof(r->err), "%s%s: no answer; its effect was seen", base, path);
		goto out;
	}
	if (c != CURLE_OK) {
		rc = rc_of(c);
		if (b.overflow) {
			rc = -E2BIG;
			set_err(r->err, sizeof(r->err), "%s%s: answer larger than %zu bytes", base,
			        path, b.max);
		} else {
			set_err(r->err, sizeof(r->err), "%s%s: %s", base, path,
			        errbuf[0] ? errbuf : curl_easy_strerror(c));
		}
		if (rc == -ECANCELED)
			rc = -ENOMEM; /* only membuf aborts here */
		goto out;
	}
	curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &r->status);
	if (b.len && !cl->raw)
		r->json = json_loadb(b.p, b.len, JSON_DECODE_ANY, NULL);
	if (r->status != 200)
		snprintf(r->err, sizeof(r->err), "%s%s: HTTP %ld%s%.120s", base, path, r->status,
		         b.len ? ": " : "", b.len ? b.p : "");
	if (cl->raw && rc == 0) {
		if (!b.p)
			b.p = calloc(1, 1);
		*cl->raw = b.p;
		*cl->raw_len = b.len;
		b.p = NULL;
		if (!*cl->raw)
			rc = -ENOMEM;
	}
out:
	if (h)
		curl_easy_cleanup(h);
	curl_slist_free_all(hdrs);
	free(b.p);
	return rc;
}

/* json_call_ex with a body that is one NUL-terminated string (or NULL). */
static int json_call(const char *base, const char *path, const char *body, unsigned timeout_ms,
                     atomic_int *stop, struct backend_reply *r)
{
	struct backend_piece one = {body, body ? strlen(body) : 0};
	struct call cl = {.body = body ? &one : NULL, .n_body = 1, .stop = stop};

	return json_call_ex(base, path, &cl, timeout_ms, r);
}

int backend_get_json(const char *base, const char *path, unsigned timeout_ms,
                     struct backend_reply *r)
{
	return json_call(base, path, NULL, timeout_ms, NULL, r);
}

int backend_post_json(const char *base, const char *path, const json_t *body, unsigned timeout_ms,
                      struct backend_reply *r)
{
	const char *model = backend_model(base);
	char *s = NULL;
	int rc;

	if (model && json_is_object(body) && !json_object_get(body, "model")) {
		json_t *copy = json_copy((json_t *)body);

		if (copy && json_object_set_new(copy, "model", json_string(model)) == 0)
			s = json_dumps(copy, JSON_COMPACT);
		json_decref(copy);
	} else {
		s = json_dumps(body, JSON_COMPACT);
	}
	if (!s) {
		memset(r, 0, sizeof(*r));
		snprintf(r->err, sizeof(r->err), "out of memory");
		return -ENOMEM;
	}
	rc = json_call(base, path, s, timeout_ms, NULL, r);
	free(s);
	return rc;
}

/* Reads the token ids of a /tokenize answer ({"tokens": [1, 2]} or, with
 * with_pieces, [{"id": 1, "piece": ...}]) without a parse tree. */
static int tokens_of(const char *base, const char *raw, size_t len, size_t max_tokens,
                     int32_t **tokens, size_t *n, struct backend_reply *r)
{
	struct jspan root, arr, v, id;
	size_t pos = 0, count = 0, i = 0;
	int32_t *t;

	if (jscan_check(raw, len, &root) || jscan_get(root, "tokens", &arr) != 1 ||
	    jscan_type(arr) != '[') {
		snprintf(r->err, sizeof(r->err), "%s/tokenize: no \"tokens\" array", base);
		return -EPROTO;
	}
	while (jscan_element_next(arr, &pos, &v))
		count++;
	if (count > max_tokens) {
		snprintf(r->err, sizeof(r->err), "%s/tokenize: %zu tokens, more than %zu", base,
		         count, max_tokens);
		return -E2BIG;
	}
	t = malloc((count ? count : 1) * sizeof(*t));
	if (!t)
		return -ENOMEM;
	for (pos = 0; jscan_element_next(arr, &pos, &v); i++) {
		int64_t x;

		if (jscan_type(v) == '{' && jscan_get(v, "id", &id) == 1)
			v = id;
		if (jscan_int(v, 0, INT32_MAX, &x)) {
			free(t);
			snprintf(r->err, sizeof(r->err), "%s/tokenize: token %zu is not an id",
			         base, i);
			return -EPROTO;
		}
		t[i] = (int32_t)x;
	}
	*tokens = t;
	*n = count;
	return 0;
}

int backend_tokenize_json(const char *base, const char *content_json, size_t len,
                          size_t max_tokens, unsigned timeout_ms, int32_t **tokens, size_t *n,
                          struct backend_reply *r)
{
	static const char head[] = "{\"content\":",
	                  tail[] = ",\"add_special\":true,\"parse_special\":true}";
	const char *model = backend_model(base);
	struct backend_piece body[5] = {
	    {head, sizeof(head) - 1}, {content_json, len}, {tail, sizeof(tail) - 1}};
	char *raw = NULL, *mq = NULL;
	size_t raw_len = 0;
	/* An id is at most 10 digits and a separator; pieces are not asked for. */
	size_t max_reply = max_tokens < (BACKEND_MAX_REPLY - 4096) / 24
	                       ? max_tokens * 24 + 4096
	                       : BACKEND_MAX_REPLY;
	struct call cl = {.body = body, .n_body = 3, .max_reply = max_reply, .raw = &raw,
	                  .raw_len = &raw_len};
	int rc;

	*tokens = NULL;
	*n = 0;
	if (model) {
		/* A router takes the model from the body. */
		size_t need = jscan_quote(model, NULL, 0);

		mq = malloc(need);
		if (!mq) {
			memset(r, 0, sizeof(*r));
			snprintf(r->err, sizeof(r->err), "out of memory");
			return -ENOMEM;
		}
		jscan_quote(model, mq, need);
		body[3] = body[2];
		body[2] = (struct backend_piece){",\"model\":", 9};
		body[4] = body[3];
		body[3] = (struct backend_piece){mq, need};
		cl.n_body = 5;
	}
	rc = json_call_ex(base, "/tokenize", &cl, timeout_ms, r);
	free(mq);
	if (rc == -E2BIG)
		snprintf(r->err, sizeof(r->err), "%s/tokenize: more than %zu tokens", base,
		         max_tokens);
	if (rc)
		return rc;
	if (r->status != 200)
		rc = -EPROTO;
	else
		rc = tokens_of(base, raw, raw_len, max_tokens, tokens, n, r);
	free(raw);
	return rc;
}

int backend_tokenize(const char *base, const char *content, unsigned timeout_ms, int32_t **tokens,
                     size_t *n, struct backend_reply *r)
{
	size_t need = jscan_quote(content, NULL, 0);
	char *q = malloc(need);
	int rc;

	*tokens = NULL;
	*n = 0;
	if (!q) {
		memset(r, 0, sizeof(*r));
		snprintf(r->err, sizeof(r->err), "out of memory");
		return -ENOMEM;
	}
	jscan_quote(content, q, need);
	rc = backend_tokenize_json(base, q, need, BACKEND_MAX_TOKENS, timeout_ms, tokens, n, r);
	free(q);
	return rc;
}

int backend_apply_template(const char *base, const char *chat, size_t chat_len,
                           unsigned timeout_ms, char **buf, struct jspan *prompt_json,
                           struct backend_reply *r)
{
	const char *model = backend_model(base);
	struct backend_piece body[4] = {{chat, chat_len}};
	struct call cl = {.body = body, .n_body = 1, .raw = buf, .raw_len = &prompt_json->len};
	struct jspan root, v;
	char *mq = NULL;
	int rc;

	*buf = NULL;
	memset(prompt_json, 0, sizeof(*prompt_json));
	if (jscan_check(chat, chat_len, &root) || jscan_type(root) != '{') {
		memset(r, 0, sizeof(*r));
		snprintf(r->err, sizeof(r->err), "the chat body is not a JSON object");
		return -EINVAL;
	}
	if (model && jscan_get(root, "model", &v) == 0) {
		/* A router takes the model from the body: add it before the last
		 * brace. */
		size_t need = jscan_quote(model, NULL, 0);
		int empty = jscan_member_next(root, &(size_t){0}, &v, &v) == 0;

		mq = malloc(need + 1);
		if (!mq) {
			memset(r, 0, sizeof(*r));
			snprintf(r->err, sizeof(r->err), "out of memory");
			return -ENOMEM;
		}
		jscan_quote(model, mq, need);
		mq[need] = '}';
		body[0].p = root.p;
		body[0].len = root.len - 1;
		body[1].p = empty ? "\"model\":" : ",\"model\":";
		body[1].len = strlen(body[1].p);
		body[2].p = mq;
		body[2].len = need + 1;
		cl.n_body = 3;
	}
	rc = json_call_ex(base, "/apply-template", &cl, timeout_ms, r);
	free(mq);
	if (rc)
		return rc;
	if (r->status == 200 && jscan_check(*buf, prompt_json->len, &root) == 0 &&
	    jscan_get(root, "prompt", &v) == 1 && jscan_type(v) == '"') {
		*prompt_json = v;
		return 0;
	}
	if (r->status == 200)
		snprintf(r->err, sizeof(r->err), "%s/apply-template: no \"prompt\" string", base);
	free(*buf);
	*buf = NULL;
	memset(prompt_json, 0, sizeof(*prompt_json));
	return -EPROTO;
}

int backend_filename_ok(const char *name)
{
	size_t len = name ? strlen(name) : 0;

	if (len == 0 || len > 255 || strstr(name, "..") || strchr(name, '/') || strchr(name, ':'))
		return 0;
	for (const char *p = name; *p; p++)
		if ((unsigned char)*p < 0x20 || *p == 0x7f)
			return 0;
	return 1;
}

struct nudge {
	const char *base;
	const struct backend_probe *probe; /* may be NULL */
	atomic_int seen;                   /* the probe saw the action done */
	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t cond;
	int done;
};

/* Every NUDGE_MS until done: GET /slots (which wakes the server's task
 * loop), then, when it was answered, the probe. An answer to a task posted
 * after the action means the loop is past the action (it takes tasks in
 * order), so what the probe sees then is the action's finished effect. */
#define NUDGE_MS 250
static void *nudge_main(void *arg)
{
	struct nudge *n = arg;

	pthread_mutex_lock(&n->lock);
	while (!n->done) {
		struct timespec ts;
		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_nsec += NUDGE_MS * 1000000L;
		if (ts.tv_nsec >= 1000000000L) {
			ts.tv_sec++;
			ts.tv_nsec -= 1000000000L;
		}
		if (pthread_cond_timedwait(&n->cond, &n->lock, &ts) != ETIMEDOUT || n->done)
			break;
		pthread_mutex_unlock(&n->lock);
		struct backend_reply b;
		memset(&b, 0, sizeof(b));
		if (backend_get_json(n->base, "/slots", 2000, &b) == 0 && b.status == 200 &&
		    n->probe && n->probe->done(n->probe->ctx))
			atomic_store(&n->seen, 1);
		backend_reply_free(&b);
		pthread_mutex_lock(&n->lock);
	}
	pthread_mutex_unlock(&n->lock);
	return NULL;
}

int backend_slot_action(const char *base, unsigned id, const char *action, const char *filename,
                        unsigned timeout_ms, const struct backend_probe *probe,
                        struct backend_reply *r)
{
	char path[128];
	json_t *q;
	char *body;
	int rc;

	if (!backend_filename_ok(filename)) {
		memset(r, 0, sizeof(*r));
		snprintf(r->err, sizeof(r->err), "refusing unsafe slot file name");
		return -EINVAL;
	}
	snprintf(path, sizeof(path), "/slots/%u?action=%s", id, action);
	q = json_pack("{s:s}", "filename", filename);
	if (q && backend_model(base))
		json_object_set_new(q, "model", json_string(backend_model(base)));
	body = q ? json_dumps(q, JSON_COMPACT) : NULL;
	json_decref(q);
	if (!body) {
		memset(r, 0, sizeof(*r));
		snprintf(r->err, sizeof(r->err), "out of memory");
		return -ENOMEM;
	}
	/* While the action is pending, nudge the server's task loop and look
	 * for the action's effect. ik_llama.cpp's slot-action handlers post the
	 * task before they register for its result, and a result nobody waits
	 * for is dropped: when the loop is quicker than the HTTP thread, the
	 * action is done and never answered (docs/kvtier-llama.md). The probe
	 * turns that into -EALREADY instead of a wait for timeout_ms. (The
	 * nudge itself came first, for what looked like a lost wake-up.) */
	struct nudge n = {.base = base, .probe = probe};
	atomic_init(&n.seen, 0);
	pthread_mutex_init(&n.lock, NULL);
	pthread_cond_init(&n.cond, NULL);
	int nudging = pthread_create(&n.thread, NULL, nudge_main, &n) == 0;
	rc = json_call(base, path, body, timeout_ms, probe && nudging ? &n.seen : NULL, r);
	if (nudging) {
		pthread_mutex_lock(&n.lock);
		n.done = 1;
		pthread_cond_signal(&n.cond);
		pthread_mutex_unlock(&n.lock);
		pthread_join(n.thread, NULL);
	}
	pthread_cond_destroy(&n.cond);
	pthread_mutex_destroy(&n.lock);
	free(body);
	return rc;
}

/* ---- streamed forward ---- */

struct fwd {
	const struct backend_sink *s;
	struct backend_result *res;
	char *hdr; /* header lines of the current block, NUL-separated */
	size_t hdr_len;
	long status;
	int64_t content_length;
	int chunked;
	int failed; /* a callback aborted */
};

/* Parses "HTTP/1.1 200 OK": the status code, or 0. */
static long status_of_line(const char *line, size_t len)
{
	const char *sp = memchr(line, ' ', len);
	long v = 0;

	if (len < 12 || strncmp(line, "HTTP/", 5) != 0 || !sp)
		return 0;
	for (sp++; sp < line + len && *sp >= '0' && *sp <= '9'; sp++)
		v = v * 10 + (*sp - '0');
	return v;
}

/* Collects one header block; hands it to the sink at its blank line when its
 * status is final (1xx blocks are dropped). */
static size_t fwd_header(char *data, size_t size, size_t nmemb, void *ctx)
{
	struct fwd *f = ctx;
	size_t n = size * nmemb, len = n;

	while (len && (data[len - 1] == '\n' || data[len - 1] == '\r'))
		len--;
	if (len > 5 && strncmp(data, "HTTP/", 5) == 0) {
		f->status = status_of_line(data, len);
		f->hdr_len = 0;
		f->content_length = -1;
		f->chunked = 0;
		return n;
	}
	if (len == 0) {
		if (f->status >= 100 && f->status < 200) {
			f->hdr_len = 0;
			return n;
		}
		for (size_t off = 0; off < f->hdr_len;) {
			size_t l = strlen(f->hdr + off);

			if (f->s->on_header && f->s->on_header(f->s->ctx, f->hdr + off, l)) {
				f->failed = 1;
				return 0;
			}
			off += l + 1;
		}
		f->res->status = f->status;
		f->res->headers_done = 1;
		if (f->s->on_headers_done &&
		    f->s->on_headers_done(f->s->ctx, f->status,
		                          f->chunked ? -1 : f->content_length)) {
			f->failed = 1;
			return 0;
		}
		return n;
	}
	if (len >= 15 && strncasecmp(data, "Content-Length:", 15) == 0) {
		char *end;
		long long v = strtoll(data + 15, &end, 10);

		f->content_length = v >= 0 ? v : -1;
	}
	if (len >= 18 && strncasecmp(data, "Transfer-Encoding:", 18) == 0)
		f->chunked = 1;
	if (f->hdr_len + len + 1 > HEADER_MAX)
		return n; /* an absurd header block: drop the rest of its lines */
	char *p = realloc(f->hdr, f->hdr_len + len + 1);
	if (!p)
		return 0;
	f->hdr = p;
	memcpy(f->hdr + f->hdr_len, data, len);
	f->hdr[f->hdr_len + len] = '\0';
	f->hdr_len += len + 1;
	return n;
}

/* curl write callback of a forward: body bytes go to the sink as they come. */
static size_t fwd_write(char *data, size_t size, size_t nmemb, void *ctx)
{
	struct fwd *f = ctx;
	size_t n = size * nmemb;

	if (f->s->on_data && f->s->on_data(f->s->ctx, data, n)) {
		f->failed = 1;
		return 0;
	}
	return n;
}

/* 1 when the NULL-terminated list of "Name: value" lines has header name. */
static int has_header(char **headers, const char *name)
{
	size_t len = strlen(name);

	for (size_t i = 0; headers && headers[i]; i++)
		if (strncasecmp(headers[i], name, len) == 0 && headers[i][len] == ':')
			return 1;
	return 0;
}

/* curl progress callback of a forward (about once a second, and as data
 * moves): aborts when the sink says the client is gone or we are stopping. */
static int fwd_progress(void *ctx, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal,
                        curl_off_t ulnow)
{
	struct fwd *f = ctx;

	if (f->s->should_abort && f->s->should_abort(f->s->ctx)) {
		f->failed = 1;
		return 1;
	}
	return 0;
}

int backend_forward(const struct backend_request *q, const struct backend_sink *s,
                    struct backend_result *res)
{
	char url[8192], errbuf[CURL_ERROR_SIZE];
	struct curl_slist *hdrs = NULL, *t;
	struct fwd f = {.s = s, .res = res, .content_length = -1};
	struct piece_reader pr;
	double t0 = now_s();
	CURL *h = NULL;
	CURLcode c = CURLE_OK;
	int rc = 0;

	memset(res, 0, sizeof(*res));
	{
		char root[1024];
		const char *model;

		if (split_base(q->base, root, sizeof(root), &model) ||
		    (size_t)snprintf(url, sizeof(url), "%s%s", root, q->uri) >= sizeof(url)) {
			rc = -EINVAL;
			snprintf(res->err, sizeof(res->err), "URL too long");
			goto out;
		}
	}
	h = handle_new(url, q->timeout_ms, errbuf);
	if (!h) {
		rc = -ENOMEM;
		snprintf(res->err, sizeof(res->err), "out of memory");
		goto out;
	}
	for (size_t i = 0; q->headers && q->headers[i]; i++) {
		/* The client's key is the plugin's (--api-key-file); the backends
		 * get theirs. */
		if (key_header[0] && (strncasecmp(q->headers[i], "Authorization:", 14) == 0 ||
		                      strncasecmp(q->headers[i], "X-Api-Key:", 10) == 0))
			continue;
		t = curl_slist_append(hdrs, q->headers[i]);
		if (!t) {
			rc = -ENOMEM;
			goto out;
		}
		hdrs = t;
	}
	/* No 100-continue round trip. */
	t = curl_slist_append(hdrs, "Expect:");
	if (!t) {
		rc = -ENOMEM;
		goto out;
	}
	hdrs = t;
	if (key_header[0]) {
		t = curl_slist_append(hdrs, key_header);
		if (!t) {
			rc = -ENOMEM;
			goto out;
		}
		hdrs = t;
	}
	if (strcmp(q->method, "GET") == 0) {
		c = curl_easy_setopt(h, CURLOPT_HTTPGET, 1L);
	} else if (strcmp(q->method, "HEAD") == 0) {
		c = curl_easy_setopt(h, CURLOPT_NOBODY, 1L);
	} else if (q->body_len == 0 && strcmp(q->method, "POST") != 0 &&
	           strcmp(q->method, "PUT") != 0 && strcmp(q->method, "PATCH") != 0) {
		/* OPTIONS, DELETE, ...: no body, as the client sent none. */
		c = curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, q->method);
	} else {
		if (strcmp(q->method, "POST") != 0)
			c = curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, q->method);
		if (c == CURLE_OK && q->n_pieces) {
			c = pieces_setopt(h, &pr, q->pieces, q->n_pieces);
		} else if (c == CURLE_OK) {
			c = curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE,
			                     (curl_off_t)q->body_len);
			if (c == CURLE_OK)
				c = curl_easy_setopt(h, CURLOPT_POSTFIELDS,
				                     q->body ? q->body : "");
		}
		/* curl would add a form Content-Type when the client sent none. */
		if (c == CURLE_OK && !has_header(q->headers, "Content-Type")) {
			t = curl_slist_append(hdrs, "Content-Type:");
			if (!t) {
				rc = -ENOMEM;
				goto out;
			}
			hdrs = t;
		}
	}
	if (c == CURLE_OK)
		c = curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
	if (c == CURLE_OK)
		c = curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, fwd_header);
	if (c == CURLE_OK)
		c = curl_easy_setopt(h, CURLOPT_HEADERDATA, &f);
	if (c == CURLE_OK)
		c = curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, fwd_write);
	if (c == CURLE_OK)
		c = curl_easy_setopt(h, CURLOPT_WRITEDATA, &f);
	if (c == CURLE_OK && s->should_abort) {
		c = curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, fwd_progress);
		if (c == CURLE_OK)
			c = curl_easy_setopt(h, CURLOPT_XFERINFODATA, &f);
		if (c == CURLE_OK)
			c = curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
	}
	if (c != CURLE_OK) {
		rc = -ENOMEM;
		snprintf(res->err, sizeof(res->err), "curl setup failed: %s",
		         curl_easy_strerror(c));
		goto out;
	}
	c = curl_easy_perform(h);
	if (c != CURLE_OK) {
		rc = rc_of(c);
		if (f.failed) {
			rc = -ECANCELED;
			res->aborted = 1;
		}
		set_err(res->err, sizeof(res->err), "%s%s: %s", q->base, q->uri,
		        f.failed    ? "aborted (client gone)"
		        : errbuf[0] ? errbuf
		                    : curl_easy_strerror(c));
		goto out;
	}
	if (!res->headers_done) {
		/* A response without a blank line after its headers cannot happen
		 * with curl; treat it as a transport error all the same. */
		rc = -EIO;
		snprintf(res->err, sizeof(res->err), "%s%s: no response headers", q->base, q->uri);
	}
out:
	res->seconds = now_s() - t0;
	if (rc == -ENOMEM && !res->err[0])
		snprintf(res->err, sizeof(res->err), "out of memory");
	if (h)
		curl_easy_cleanup(h);
	curl_slist_free_all(hdrs);
	free(f.hdr);
	return rc;
}
