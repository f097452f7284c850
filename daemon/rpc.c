/* rpc.c: the gRPC service of kvtierd on the gRPC core C API; see rpc.h.
 *
 * Life of a call:
 *   1. For every method, a few requests are pre-posted with
 *      grpc_server_request_registered_call, each bound to a fresh pluck
 *      completion queue. The notification thread gets the new-call event,
 *      re-posts a replacement and queues the call for the worker pool.
 *   2. A worker checks the bearer token (TCP peers), runs the method's
 *      handler, which uses call_batch() to run one batch at a time on the
 *      call's own queue, then sends the status.
 *   3. The worker waits for RECV_CLOSE_ON_SERVER, records the call in the
 *      metrics and frees everything the call owned (one function:
 *      call_free()).
 * This file must not do storage work itself: it decodes, calls the store
 * and encodes. Error codes become gRPC status codes only in status_of().
 */
#include "rpc.h"

#include <errno.h>
#include <malloc.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <grpc/byte_buffer.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include "kvtier.h"
#include "kvtier.pb-c.h"
#include "log.h"
#include "codec.h"
#include "listener.h"
#include "metrics.h"
#include "store.h"
#include "wire.h"

#ifndef KVTIER_VERSION
#define KVTIER_VERSION "0.0.0"
#endif

#define RPC_ERR_MAX 1024
#define RPC_HANDSHAKE_TIMEOUT_MS 10000 /* defaults; main.c's option table says the same */
#define RPC_CONNECTION_IDLE_MS 120000

struct rpc_call;

/* Calls run on two pools: streams (Fetch, Put) can hold a worker for as long
 * as a client keeps them open, so they never take the workers that short
 * calls (Lookup, Stage, ...) need. */
enum rpc_pool_id { POOL_UNARY, POOL_STREAM, POOL_COUNT };

#define RPC_QUEUE_PER_WORKER 16 /* calls waiting per worker before RESOURCE_EXHAUSTED */
#define RPC_PREPOST_UNKNOWN 2   /* requests kept posted for calls to unknown methods */

struct rpc_pool {
	struct rpc_server *srv;
	struct rpc_call *head, *tail;  /* queued calls */
	unsigned len, max_len;
	pthread_cond_t cond;           /* a call was queued, or the server shut down */
	pthread_t *threads;
	unsigned n_threads;
};

struct rpc_method {
	const char *path;
	enum rpc_method_id id;
	grpc_server_register_method_payload_handling payload;
	void (*handler)(struct rpc_call *c);
	unsigned prepost;   /* requests kept posted */
	void *reg;          /* from grpc_server_register_method */
};

/* Everything one call owns. Freed only by call_free(). */
struct rpc_call {
	struct rpc_server *srv;
	struct rpc_method *m;            /* NULL: a call to a method we do not serve */
	grpc_call_details details;       /* its method, when m is NULL */
	struct rpc_call *next;           /* worker queue link */
	grpc_call *call;
	grpc_completion_queue *cq;       /* pluck queue bound to this call */
	gpr_timespec deadline;
	grpc_metadata_array md;
	grpc_byte_buffer *payload;       /* the request of unary / server-streaming calls */
	int close_started;
	int cancelled;                   /* from RECV_CLOSE_ON_SERVER */
	int metadata_sent;
	int status_sent;
	int status;                      /* grpc_status_code sent */
	struct timespec started;
	char tag_op, tag_close, tag_recv; /* addresses used as tags */
};

struct rpc_server {
	struct store *store;
	struct rpc_config cfg;
	char token[256];
	grpc_server *server;
	grpc_completion_queue *cq;       /* notifications (next) */
	struct listener *listener;       /* Unix socket and plaintext TCP */
	pthread_t notify_thread;
	int notify_started;
	struct rpc_pool pools[POOL_COUNT];

	pthread_mutex_t lock;          /* pools, stopping, shutdown_done */
	pthread_cond_t cond;           /* shutdown_done changed (rpc_stop waits here) */
	unsigned active;                 /* calls being run by workers */
	int trim_due;                    /* calls ended since the last malloc_trim */
	int stopping;                    /* no more re-posting, workers drain and exit */
	int shutdown_done;
	char shutdown_tag;
};

static void handle_info(struct rpc_call *c);
static void handle_lookup(struct rpc_call *c);
static void handle_fetch(struct rpc_call *c);
static void handle_put(struct rpc_call *c);
static void handle_stage(struct rpc_call *c);
static void handle_release(struct rpc_call *c);
static void handle_adopt(struct rpc_call *c);
static void handle_delete(struct rpc_call *c);
static void handle_list(struct rpc_call *c);
static void handle_stats(struct rpc_call *c);
static void handle_report(struct rpc_call *c);

#define UNARY GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER
static struct rpc_method methods[RPC_METHOD_COUNT] = {
	{"/kvtier.v1.Kvtier/Info", RPC_INFO, UNARY, handle_info, 2, NULL},
	{"/kvtier.v1.Kvtier/Lookup", RPC_LOOKUP, UNARY, handle_lookup, 8, NULL},
	{"/kvtier.v1.Kvtier/Fetch", RPC_FETCH, UNARY, handle_fetch, 4, NULL},
	{"/kvtier.v1.Kvtier/Put", RPC_PUT, GRPC_SRM_PAYLOAD_NONE, handle_put, 4, NULL},
	{"/kvtier.v1.Kvtier/Stage", RPC_STAGE, UNARY, handle_stage, 4, NULL},
	{"/kvtier.v1.Kvtier/Release", RPC_RELEASE, UNARY, handle_release, 4, NULL},
	{"/kvtier.v1.Kvtier/Adopt", RPC_ADOPT, UNARY, handle_adopt, 4, NULL},
	{"/kvtier.v1.Kvtier/Delete", RPC_DELETE, UNARY, handle_delete, 2, NULL},
	{"/kvtier.v1.Kvtier/List", RPC_LIST, UNARY, handle_list, 2, NULL},
	{"/kvtier.v1.Kvtier/Stats", RPC_STATS, UNARY, handle_stats, 2, NULL},
	{"/kvtier.v1.Kvtier/Report", RPC_REPORT, UNARY, handle_report, 4, NULL},
};

/* The one place where store errors become gRPC status codes. */
static grpc_status_code status_of(int rc)
{
	switch (rc) {
	case 0:
		return GRPC_STATUS_OK;
	case KVTIER_E_INVALID:
		return GRPC_STATUS_INVALID_ARGUMENT;
	case KVTIER_E_LAYOUT:
	case -ESTALE: /* a tier directory removed while running (store_tier_check) */
	case -EROFS:  /* a tier's file system is read-only */
		return GRPC_STATUS_FAILED_PRECONDITION;
	case KVTIER_E_FULL:
	case -ENOSPC:
	case -EDQUOT:
		return GRPC_STATUS_RESOURCE_EXHAUSTED;
	case KVTIER_E_NOTFOUND:
	case -ENOENT:
		return GRPC_STATUS_NOT_FOUND;
	case KVTIER_E_UNAUTH:
		return GRPC_STATUS_UNAUTHENTICATED;
	case KVTIER_E_DENIED:
	case -EACCES:
	case -EPERM:
		return GRPC_STATUS_PERMISSION_DENIED;
	case KVTIER_E_CORRUPT:
		return GRPC_STATUS_DATA_LOSS;
	case KVTIER_E_EXISTS:
		return GRPC_STATUS_ALREADY_EXISTS;
	case KVTIER_E_UNAVAILABLE:
		return GRPC_STATUS_UNAVAILABLE;
	case KVTIER_E_TIMEOUT:
		return GRPC_STATUS_DEADLINE_EXCEEDED;
	default:
		return GRPC_STATUS_INTERNAL;
	}
}

/* ---- batches on the call's own queue ---- */

static gpr_timespec io_deadline(struct rpc_call *c)
{
	gpr_timespec d = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
				      gpr_time_from_millis(c->srv->cfg.io_timeout_ms, GPR_TIMESPAN));
	gpr_timespec cd = gpr_convert_clock_type(c->deadline, GPR_CLOCK_MONOTONIC);
	return gpr_time_cmp(cd, d) < 0 ? cd : d;
}

/* Waits for the batch tagged `tag`. On timeout the call is cancelled (then
 * the batch completes, failed). Returns 0 when the batch succeeded. */
static int call_wait(struct rpc_call *c, void *tag)
{
	grpc_event ev = grpc_completion_queue_pluck(c->cq, tag, io_deadline(c), NULL);

	if (ev.type == GRPC_QUEUE_TIMEOUT) {
		grpc_call_cancel_with_status(c->call, GRPC_STATUS_DEADLINE_EXCEEDED,
					     "kvtierd: no progress on this stream within the I/O timeout",
					     NULL);
		ev = grpc_completion_queue_pluck(c->cq, tag, gpr_inf_future(GPR_CLOCK_REALTIME),
						 NULL);
		return -ETIMEDOUT;
	}
	return ev.type == GRPC_OP_COMPLETE && ev.success ? 0 : -EPIPE;
}

static int call_start(struct rpc_call *c, const grpc_op *ops, size_t n, void *tag)
{
	grpc_call_error e = grpc_call_start_batch(c->call, ops, n, tag, NULL);

	if (e != GRPC_CALL_OK) {
		klog(LOG_ERROR, "event=start_batch_failed method=%s error=%d", c->m->path, (int)e);
		return -EPROTO;
	}
	return 0;
}

static int call_batch(struct rpc_call *c, const grpc_op *ops, size_t n)
{
	int rc = call_start(c, ops, n, &c->tag_op);
	return rc ? rc : call_wait(c, &c->tag_op);
}

/* Sends `msg` (may be NULL) and the final status. */
static void call_finish(struct rpc_call *c, grpc_byte_buffer *msg, int rc, const char *detail)
{
	grpc_op ops[3];
	size_t n = 0;
	grpc_slice details = grpc_slice_from_copied_string(detail ? detail : "");

	memset(ops, 0, sizeof(ops));
	if (!c->metadata_sent) {
		ops[n].op = GRPC_OP_SEND_INITIAL_METADATA;
		n++;
		c->metadata_sent = 1;
	}
	if (msg && rc == 0) {
		ops[n].op = GRPC_OP_SEND_MESSAGE;
		ops[n].data.send_message.send_message = msg;
		n++;
	}
	c->status = (int)status_of(rc);
	ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
	ops[n].data.send_status_from_server.status = (grpc_status_code)c->status;
	ops[n].data.send_status_from_server.status_details = rc ? &details : NULL;
	n++;
	if (call_batch(c, ops, n) == 0)
		c->status_sent = 1;
	grpc_slice_unref(details);
	if (msg)
		grpc_byte_buffer_destroy(msg);
	if (rc && rc != KVTIER_E_NOTFOUND)
		klog(LOG_INFO, "event=rpc_error method=%s code=%d msg=\"%s\"", c->m->path, c->status,
		     detail ? detail : "");
}

static void call_fail(struct rpc_call *c, int rc, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void call_fail(struct rpc_call *c, int rc, const char *fmt, ...)
{
	char msg[RPC_ERR_MAX];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	call_finish(c, NULL, rc, msg);
}

/* Unpacks the request of a unary / server-streaming call, or fails the call.
 * Every request goes through wire_unpack_checked, which refuses a string
 * field with an embedded NUL: protobuf-c would hand the field over cut at
 * the NUL ("model-A\0fp-2" read as "model-A"), and only the wire bytes still
 * show it. The namespace's UTF-8 rule is the store's (store_ns_valid). */
static ProtobufCMessage *call_request(struct rpc_call *c, const ProtobufCMessageDescriptor *d)
{
	char err[RPC_ERR_MAX];
	ProtobufCMessage *m = NULL;

	if (c->payload)
		m = wire_unpack_checked(d, c->payload, err, sizeof(err));
	else
		snprintf(err, sizeof(err), "malformed %s message", d->short_name);
	if (!m)
		call_fail(c, KVTIER_E_INVALID, "%s", err);
	return m;
}

static void call_reply(struct rpc_call *c, const ProtobufCMessage *reply)
{
	grpc_byte_buffer *bb = wire_pack(reply);

	if (!bb) {
		call_fail(c, -ENOMEM, "out of memory packing the reply");
		return;
	}
	call_finish(c, bb, 0, NULL);
}

static int parse_blob(struct rpc_call *c, const char *hex, struct key *id)
{
	if (!hex || key_from_hex(hex, id)) {
		call_fail(c, KVTIER_E_INVALID,
			  "blob id must be 64 hexadecimal characters (as printed by kvtier put/ls), "
			  "got \"%.80s\"", hex ? hex : "");
		return -1;
	}
	return 0;
}

/* ---- handlers ---- */

static void fill_tier(Kvtier__V1__TierInfo *ti, const struct store_tier_stats *ts)
{
	ti->index = ts->index;
	ti->kind = (char *)ts->kind;
	ti->path = (char *)ts->path;
	ti->capacity_bytes = ts->capacity;
	ti->used_bytes = ts->used;
	ti->blobs = ts->blobs;
	ti->read_bytes_per_s = ts->read_bytes_per_s;
	ti->read_fixed_s = ts->read_fixed_s;
	ti->io = (char *)(ts->io ? ts->io : "");
	ti->io_fallback = (char *)(ts->io_fallback ? ts->io_fallback : "");
	ti->model_samples = ts->model_samples;
	ti->high_watermark_bytes = (uint64_t)ts->high;
	ti->low_watermark_bytes = (uint64_t)ts->low;
	ti->raw_bytes = ts->raw_bytes;
	ti->stored_bytes = ts->stored_bytes;
	ti->gdsf_base = ts->gdsf_base;
	ti->migrations_in = ts->moved_in;
	ti->migrations_out = ts->moved_out;
	ti->evicted_capacity = ts->evictions[EVICT_CAPACITY];
	ti->evicted_not_worth = ts->evictions[EVICT_NOT_WORTH];
	ti->evicted_lower_full = ts->evictions[EVICT_LOWER_FULL];
}

struct model_acc {
	Kvtier__V1__NamespaceModel *items;
	char (*names)[INDEX_NS_MAX + 1];
	size_t n, cap;
};

static int model_collect(void *ctx, const struct store_ns_stats *s)
{
	struct model_acc *a = ctx;

	if (a->n == a->cap) {
		size_t cap = a->cap ? a->cap * 2 : 8;
		void *v = realloc(a->items, cap * sizeof(*a->items));
		if (!v)
			return -ENOMEM;
		a->items = v;
		v = realloc(a->names, cap * sizeof(*a->names));
		if (!v)
			return -ENOMEM;
		a->names = v;
		a->cap = cap;
	}
	Kvtier__V1__NamespaceModel *m = &a->items[a->n];
	kvtier__v1__namespace_model__init(m);
	snprintf(a->names[a->n], sizeof(a->names[0]), "%s", s->ns);
	m->prefill_tokens_per_s = s->prefill_tps;
	m->prefill_s_per_token = s->prefill_a;
	m->prefill_s_per_token_per_ctx = s->prefill_b;
	m->samples = s->prefill_samples;
	a->n++;
	return 0;
}

static void handle_info(struct rpc_call *c)
{
	const struct store_config *cfg = store_config(c->srv->store);
	Kvtier__V1__InfoReply r = KVTIER__V1__INFO_REPLY__INIT;
	Kvtier__V1__TierInfo tiers[STORE_MAX_TIERS], *tp[STORE_MAX_TIERS];
	Kvtier__V1__NamespaceModel **mp = NULL;
	char *dirs[STORE_MAX_SLOT_DIRS];
	struct model_acc ma = {0};
	struct store_stats st;
	int rc;

	store_get_stats(c->srv->store, &st);
	r.version = KVTIER_VERSION;
	r.high_watermark = cfg->high_watermark;
	r.low_watermark = cfg->low_watermark;
	r.compress_min_saving = cfg->compress_min_saving;
	r.shuffle = cfg->shuffle == CODEC_SHUFFLE_AUTO     ? "auto"
		    : cfg->shuffle == CODEC_SHUFFLE_ALWAYS ? "on"
							   : "off";
	r.assumed_prefill_tps = cfg->assumed_prefill_tps;
	r.block_size = store_block_size(c->srv->store);
	r.supersede = cfg->supersede;
	r.max_blob_bytes = cfg->max_blob_bytes;
	for (unsigned t = 0; t < st.n_tiers; t++) {
		kvtier__v1__tier_info__init(&tiers[t]);
		fill_tier(&tiers[t], &st.tiers[t]);
		tp[t] = &tiers[t];
	}
	r.n_tiers = st.n_tiers;
	r.tiers = tp;
	for (unsigned d = 0; d < cfg->n_slot_dirs; d++)
		dirs[d] = (char *)cfg->slot_dirs[d];
	r.n_slot_dirs = cfg->n_slot_dirs;
	r.slot_dirs = dirs;
	rc = store_ns_models(c->srv->store, model_collect, &ma);
	mp = calloc(ma.n ? ma.n : 1, sizeof(*mp));
	if (rc || !mp) {
		call_fail(c, rc ? rc : -ENOMEM, "reading the namespace models failed: %s",
			  kvtier_strerror(rc ? rc : -ENOMEM));
		goto out;
	}
	for (size_t i = 0; i < ma.n; i++) {
		ma.items[i].namespace_ = ma.names[i];
		mp[i] = &ma.items[i];
	}
	r.n_namespaces = ma.n;
	r.namespaces = mp;
	call_reply(c, &r.base);
out:
	free(mp);
	free(ma.items);
	free(ma.names);
}

static void handle_lookup(struct rpc_call *c)
{
	Kvtier__V1__LookupRequest *q = (Kvtier__V1__LookupRequest *)call_request(
		c, &kvtier__v1__lookup_request__descriptor);
	Kvtier__V1__LookupReply r = KVTIER__V1__LOOKUP_REPLY__INIT;
	struct store_match m;
	char err[RPC_ERR_MAX] = "", hex[KEY_HEX_LEN + 1];
	int rc;

	const int32_t *tokens = q ? q->tokens : NULL;
	size_t n = q ? q->n_tokens : 0;
	int32_t *conv = NULL;

	if (!q)
		return;
	if (q->tokens_le32.len) {
		if (q->n_tokens || q->tokens_le32.len % 4) {
			call_fail(c, KVTIER_E_INVALID,
				  "tokens_le32 must hold whole 4-byte tokens (%zu bytes) and comes "
				  "instead of tokens, not with them", q->tokens_le32.len);
			goto out;
		}
		n = q->tokens_le32.len / 4;
		/* protobuf-c copies bytes into their own allocation: aligned. */
		tokens = (const int32_t *)(const void *)q->tokens_le32.data;
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
		conv = malloc(n * sizeof(*conv));
		if (!conv) {
			call_fail(c, -ENOMEM, "out of memory");
			goto out;
		}
		for (size_t i = 0; i < n; i++)
			conv[i] = (int32_t)__builtin_bswap32(((const uint32_t *)tokens)[i]);
		tokens = conv;
#endif
	}
	rc = store_lookup(c->srv->store, q->namespace_, tokens, n, &m, err, sizeof(err));
	if (rc) {
		call_fail(c, rc, "%s", err);
		goto out;
	}
	if (m.found) {
		r.found = 1;
		r.blob = key_hex(&m.meta.id, hex);
		r.matched_tokens = m.matched;
		r.n_tokens = m.meta.n_tokens;
		r.size_bytes = blob_raw_bytes(&m.meta); /* as List: all parts, as served */
		r.tier = m.meta.tier;
		r.tier_kind = (char *)m.tier_kind;
		r.est_restore_s = m.est_restore_s;
		r.est_prefill_s = m.est_prefill_s;
	}
	call_reply(c, &r.base);
out:
	free(conv);
	protobuf_c_message_free_unpacked(&q->base, NULL);
}

/* Sends one message and, while it is in flight, lets the caller prepare the
 * next: returns after starting; fetch_sent() waits for it. */
static int send_start(struct rpc_call *c, grpc_byte_buffer *bb)
{
	grpc_op ops[2];
	size_t n = 0;

	memset(ops, 0, sizeof(ops));
	if (!c->metadata_sent) {
		ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
		c->metadata_sent = 1;
	}
	ops[n].op = GRPC_OP_SEND_MESSAGE;
	ops[n].data.send_message.send_message = bb;
	n++;
	return call_start(c, ops, n, &c->tag_op);
}

/* The send buffers of one Fetch from a tier that cannot be mapped (disk),
 * reused message after message: a message points into a free buffer
 * (wire_ext_message) and gRPC hands it back (fetch_buf_release) once the
 * bytes are written. It used to be a fresh 1 MiB allocation per message,
 * freed later on one of gRPC's threads: with glibc's per-thread arenas that
 * churn is what kept hundreds of MiB after a burst (review D15). One message
 * is in flight while the next is read, so two buffers are busy at a time; a
 * third covers gRPC releasing one a little after the send completed. The
 * set lives until the call and every message are done with it (refs). */
#define FETCH_BUFS 3

struct fetch_bufs;

struct fetch_buf {
	struct wire_buf wb;
	atomic_int held;             /* a message in gRPC's hands points here */
	struct fetch_bufs *set;
};

struct fetch_bufs {
	struct fetch_buf b[FETCH_BUFS];
	atomic_int refs;             /* the call's own, plus one per held buffer */
};

static void fetch_bufs_unref(struct fetch_bufs *fb)
{
	if (!fb || atomic_fetch_sub(&fb->refs, 1) != 1)
		return;
	for (int i = 0; i < FETCH_BUFS; i++)
		wire_buf_free(&fb->b[i].wb);
	free(fb);
}

static void fetch_buf_release(void *ud)
{
	struct fetch_buf *b = ud;
	struct fetch_bufs *fb = b->set;

	atomic_store(&b->held, 0);
	fetch_bufs_unref(fb);
}

/* A free buffer of the set (allocated on first use), or NULL when all are
 * held or the allocation failed. */
static struct fetch_buf *fetch_buf_get(struct fetch_bufs *fb)
{
	for (int i = 0; i < FETCH_BUFS; i++) {
		struct fetch_buf *b = &fb->b[i];
		if (atomic_load(&b->held))
			continue;
		if (!b->wb.mem && wire_buf_new(&b->wb))
			return NULL;
		return b;
	}
	return NULL;
}

/* Frames want bytes of b as a message; the message holds b (and the set)
 * until gRPC releases it. */
static grpc_byte_buffer *fetch_buf_message(struct fetch_buf *b, size_t want)
{
	atomic_store(&b->held, 1);
	atomic_fetch_add(&b->set->refs, 1);
	return wire_ext_message(b->wb.data, want, fetch_buf_release, b);
}

static void handle_fetch(struct rpc_call *c)
{
	Kvtier__V1__FetchRequest *q = (Kvtier__V1__FetchRequest *)call_request(
		c, &kvtier__v1__fetch_request__descriptor);
	struct store_fetch *f = NULL;
	struct blob_meta meta;
	struct key id;
	char err[RPC_ERR_MAX] = "";
	grpc_byte_buffer *inflight = NULL, *next = NULL;
	struct wire_buf buf = {0};
	struct fetch_bufs *fb = NULL;
	struct fetch_buf *fbuf = NULL;
	int rc = 0;

	if (!q)
		return;
	if (parse_blob(c, q->blob, &id))
		goto out;
	rc = store_fetch_open(c->srv->store, &id, &f, &meta, err, sizeof(err));
	if (rc) {
		call_fail(c, rc, "%s", err);
		goto out;
	}
	for (int p = 0; p < PART_COUNT && rc == 0; p++) {
		Kvtier__V1__Chunk ch = KVTIER__V1__CHUNK__INIT;
		Kvtier__V1__PartHeader ph = KVTIER__V1__PART_HEADER__INIT;
		uint64_t off = 0;

		if (!(meta.parts & (1u << p)))
			continue;
		int mapped = 1; /* try the zero-copy path until the store says no */

		ph.suffix = (char *)blob_part_suffix[p];
		ph.size = meta.part_size[p];
		ch.part = &ph;
		next = wire_pack(&ch.base);
		/* Pipeline: the previous message is in flight while we read the next. */
		for (;;) {
			if (!next) {
				rc = -ENOMEM;
				break;
			}
			if (inflight) {
				rc = call_wait(c, &c->tag_op);
				grpc_byte_buffer_destroy(inflight);
				inflight = NULL;
				if (rc)
					break;
			}
			rc = send_start(c, next);
			if (rc)
				break;
			inflight = next;
			next = NULL;
			if (off >= meta.part_size[p])
				break;
			/* A mapped piece costs no buffer: larger messages mean fewer
			 * hand-offs between this thread and gRPC's. */
			size_t chunk = mapped ? WIRE_MAP_CHUNK : WIRE_CHUNK;
			size_t want = meta.part_size[p] - off < chunk
					      ? (size_t)(meta.part_size[p] - off)
					      : chunk;
			struct store_map *map = NULL;
			if (mapped) {
				/* tmpfs: the message points into the mapped file. */
				rc = store_fetch_map(f, p, off, want, &map);
				if (rc == -ENOTSUP) {
					mapped = 0;
					want = want < WIRE_CHUNK ? want : WIRE_CHUNK;
					rc = 0;
				}
			}
			if (!map && rc == 0) {
				uint8_t *dst;
				if (!fb) {
					fb = calloc(1, sizeof(*fb));
					if (fb) {
						atomic_init(&fb->refs, 1);
						for (int i = 0; i < FETCH_BUFS; i++)
							fb->b[i].set = fb;
					}
				}
				fbuf = fb ? fetch_buf_get(fb) : NULL;
				if (fbuf) {
					dst = fbuf->wb.data;
				} else { /* every buffer still held: one of its own */
					rc = wire_buf_new(&buf);
					dst = buf.data;
				}
				for (size_t got = 0; rc == 0 && got < want;) {
					ssize_t r = store_fetch_read(f, p, dst + got, want - got,
								     off + got);
					if (r <= 0)
						rc = r < 0 ? (int)r : KVTIER_E_CORRUPT;
					else
						got += (size_t)r;
				}
			}
			if (rc) {
				if (rc == KVTIER_E_CORRUPT)
					snprintf(err, sizeof(err),
						 "blob %s part \"%s\" failed its checksum: it was "
						 "dropped, nothing of it is served; treat this as a miss",
						 q->blob, blob_part_suffix[p]);
				else
					snprintf(err, sizeof(err),
						 "reading blob %s part \"%s\" at %llu failed: %s",
						 q->blob, blob_part_suffix[p], (unsigned long long)off,
						 kvtier_strerror(rc));
				wire_buf_free(&buf);
				break;
			}
			if (map) {
				/* gRPC releases the map once the bytes are written (the
				 * call owns it from here, whatever it returns). */
				next = wire_ext_message(store_map_data(map), want, store_map_release,
							map);
			} else if (fbuf) {
				next = fetch_buf_message(fbuf, want);
				fbuf = NULL;
			} else {
				next = wire_buf_message(&buf, want);
				if (!next)
					wire_buf_free(&buf);
			}
			off += want;
		}
	}
	if (next) /* read ahead but never sent: the loop broke */
		grpc_byte_buffer_destroy(next);
	if (inflight) {
		int w = call_wait(c, &c->tag_op);
		grpc_byte_buffer_destroy(inflight);
		if (!rc)
			rc = w;
	}
	if (rc == -EPIPE || rc == -ETIMEDOUT) {
		/* The client went away or stalled: nobody to tell. */
		c->status = GRPC_STATUS_CANCELLED;
		goto out;
	}
	if (rc)
		call_fail(c, rc, "%s", err[0] ? err : kvtier_strerror(rc));
	else
		call_finish(c, NULL, 0, NULL);
out:
	fetch_bufs_unref(fb); /* freed here or by the last message gRPC releases */
	store_fetch_close(f);
	protobuf_c_message_free_unpacked(&q->base, NULL);
}

struct put_sink {
	struct store_put *p;
	char *err;
	size_t errlen;
	int rc;
};

static int put_sink(void *ctx, const uint8_t *data, size_t n)
{
	struct put_sink *ps = ctx;

	ps->rc = store_put_write(ps->p, data, n, ps->err, ps->errlen);
	return ps->rc ? -1 : 0;
}

static int recv_start(struct rpc_call *c, grpc_byte_buffer **bb)
{
	grpc_op op;

	memset(&op, 0, sizeof(op));
	op.op = GRPC_OP_RECV_MESSAGE;
	op.data.recv_message.recv_message = bb;
	*bb = NULL;
	return call_start(c, &op, 1, &c->tag_recv);
}

static void handle_put(struct rpc_call *c)
{
	struct store_put *p = NULL;
	struct store_put_result res;
	char err[RPC_ERR_MAX] = "";
	grpc_byte_buffer *cur = NULL, *next = NULL;
	int rc = 0, first = 1;

	rc = recv_start(c, &cur);
	if (!rc)
		rc = call_wait(c, &c->tag_recv);
	while (rc == 0 && cur) {
		/* Ask for the next message before consuming this one. */
		rc = recv_start(c, &next);
		if (rc)
			break;
		struct put_sink ps = {p, err, sizeof(err), 0};
		int walked = first ? 0 : wire_data_walk(cur, put_sink, &ps);
		if (walked < 0) {
			rc = ps.rc;
		} else if (walked == 0) {
			/* Checked: a NUL in the namespace or part suffix is refused
			 * (see call_request). */
			Kvtier__V1__PutRequest *q = (Kvtier__V1__PutRequest *)wire_unpack_checked(
				&kvtier__v1__put_request__descriptor, cur, err, sizeof(err));
			if (!q) {
				rc = KVTIER_E_INVALID;
			} else {
				if (first) {
					rc = store_put_begin(c->srv->store, q->namespace_, q->n_parts,
							     q->reported_size, &p, err,
							     sizeof(err));
					if (!rc && !q->part) {
						rc = KVTIER_E_INVALID;
						snprintf(err, sizeof(err),
							 "the first Put message must carry namespace and part");
					}
				}
				if (!rc && q->part) {
					int part = blob_part_from_suffix(q->part->suffix);
					if (part < 0) {
						rc = KVTIER_E_INVALID;
						snprintf(err, sizeof(err),
							 "unknown part suffix \"%.64s\" (known: \"\", "
							 "\".tokens.json\", \".checkpoints\")",
							 q->part->suffix);
					} else {
						rc = store_put_part(p, part, q->part->size, err,
								    sizeof(err));
					}
				}
				if (!rc && q->data.len)
					rc = store_put_write(p, q->data.data, q->data.len, err,
							     sizeof(err));
				protobuf_c_message_free_unpacked(&q->base, NULL);
			}
			first = 0;
		}
		grpc_byte_buffer_destroy(cur);
		cur = NULL;
		int w = call_wait(c, &c->tag_recv);
		cur = next;
		next = NULL;
		if (!rc)
			rc = w;
	}
	if (cur)
		grpc_byte_buffer_destroy(cur);
	if (rc == -EPIPE || rc == -ETIMEDOUT) {
		store_put_abort(p);
		c->status = GRPC_STATUS_CANCELLED;
		return;
	}
	if (rc) {
		store_put_abort(p);
		call_fail(c, rc, "%s", err[0] ? err : kvtier_strerror(rc));
		return;
	}
	if (!p) {
		call_fail(c, KVTIER_E_INVALID, "empty Put stream: nothing was sent");
		return;
	}
	rc = store_put_finish(p, &res, err, sizeof(err));
	if (rc) {
		call_fail(c, rc, "%s", err);
		return;
	}
	Kvtier__V1__PutReply r = KVTIER__V1__PUT_REPLY__INIT;
	char hex[KEY_HEX_LEN + 1], sup[INDEX_MAX_SUPERSEDED][KEY_HEX_LEN + 1];
	char *supp[INDEX_MAX_SUPERSEDED];
	r.blob = key_hex(&res.id, hex);
	r.deduplicated = res.deduplicated;
	r.n_tokens = res.n_tokens;
	r.tier = res.tier;
	for (size_t i = 0; i < res.n_superseded; i++)
		supp[i] = key_hex(&res.superseded[i], sup[i]);
	r.n_superseded = res.n_superseded;
	r.superseded = supp;
	call_reply(c, &r.base);
}

static void handle_stage(struct rpc_call *c)
{
	Kvtier__V1__StageRequest *q = (Kvtier__V1__StageRequest *)call_request(
		c, &kvtier__v1__stage_request__descriptor);
	Kvtier__V1__StageReply r = KVTIER__V1__STAGE_REPLY__INIT;
	struct store_stage_result res;
	char err[RPC_ERR_MAX] = "";
	struct key id;
	int rc;

	if (!q)
		return;
	if (parse_blob(c, q->blob, &id))
		goto out;
	rc = store_stage(c->srv->store, &id, q->directory, q->lease_seconds, &res, err,
			 sizeof(err));
	if (rc) {
		call_fail(c, rc, "%s", err);
		goto out;
	}
	r.lease = res.lease;
	r.filename = res.filename;
	r.path = res.path;
	r.expires_unix_ms = (uint64_t)res.expires_unix_ms;
	r.copied = res.copied;
	r.n_tokens = res.n_tokens;
	call_reply(c, &r.base);
out:
	protobuf_c_message_free_unpacked(&q->base, NULL);
}

static void handle_release(struct rpc_call *c)
{
	Kvtier__V1__ReleaseRequest *q = (Kvtier__V1__ReleaseRequest *)call_request(
		c, &kvtier__v1__release_request__descriptor);
	Kvtier__V1__ReleaseReply r = KVTIER__V1__RELEASE_REPLY__INIT;
	char err[RPC_ERR_MAX] = "";
	int rc;

	if (!q)
		return;
	rc = store_release(c->srv->store, q->lease, err, sizeof(err));
	if (rc)
		call_fail(c, rc, "%s", err);
	else
		call_reply(c, &r.base);
	protobuf_c_message_free_unpacked(&q->base, NULL);
}

static void handle_adopt(struct rpc_call *c)
{
	Kvtier__V1__AdoptRequest *q = (Kvtier__V1__AdoptRequest *)call_request(
		c, &kvtier__v1__adopt_request__descriptor);
	Kvtier__V1__AdoptReply r = KVTIER__V1__ADOPT_REPLY__INIT;
	struct store_put_result res;
	char err[RPC_ERR_MAX] = "", hex[KEY_HEX_LEN + 1];
	char sup[INDEX_MAX_SUPERSEDED][KEY_HEX_LEN + 1];
	char *supp[INDEX_MAX_SUPERSEDED];
	int rc;

	if (!q)
		return;
	rc = store_adopt(c->srv->store, q->namespace_, q->path, q->keep_source, q->reported_size,
			 &res, err, sizeof(err));
	if (rc) {
		call_fail(c, rc, "%s", err);
		goto out;
	}
	r.blob = key_hex(&res.id, hex);
	r.deduplicated = res.deduplicated;
	r.n_tokens = res.n_tokens;
	r.tier = res.tier;
	for (size_t i = 0; i < res.n_superseded; i++)
		supp[i] = key_hex(&res.superseded[i], sup[i]);
	r.n_superseded = res.n_superseded;
	r.superseded = supp;
	call_reply(c, &r.base);
out:
	protobuf_c_message_free_unpacked(&q->base, NULL);
}

static void handle_delete(struct rpc_call *c)
{
	Kvtier__V1__DeleteRequest *q = (Kvtier__V1__DeleteRequest *)call_request(
		c, &kvtier__v1__delete_request__descriptor);
	Kvtier__V1__DeleteReply r = KVTIER__V1__DELETE_REPLY__INIT;
	char err[RPC_ERR_MAX] = "";
	struct key id;
	int rc;

	if (!q)
		return;
	if (parse_blob(c, q->blob, &id))
		goto out;
	rc = store_delete(c->srv->store, &id, err, sizeof(err));
	if (rc)
		call_fail(c, rc, "%s", err);
	else
		call_reply(c, &r.base);
out:
	protobuf_c_message_free_unpacked(&q->base, NULL);
}

struct list_acc {
	Kvtier__V1__BlobInfo **items;
	size_t n, cap;
	struct key last;
};

static char *dupstr(const char *s)
{
	return strdup(s ? s : "");
}

static int list_collect(void *ctx, const struct blob_meta *m, const char *ns,
			const char *tier_kind)
{
	struct list_acc *a = ctx;
	Kvtier__V1__BlobInfo *b;
	char hex[KEY_HEX_LEN + 1];

	if (a->n == a->cap) {
		size_t cap = a->cap ? a->cap * 2 : 64;
		void *v = realloc(a->items, cap * sizeof(*a->items));
		if (!v)
			return -ENOMEM;
		a->items = v;
		a->cap = cap;
	}
	b = calloc(1, sizeof(*b));
	if (!b)
		return -ENOMEM;
	kvtier__v1__blob_info__init(b);
	a->items[a->n++] = b;
	b->blob = dupstr(key_hex(&m->id, hex));
	b->namespace_ = dupstr(ns);
	b->tier_kind = dupstr(tier_kind);
	b->compression = dupstr(codec_name((int)m->compression));
	b->compression_ratio = m->ratio > 0 ? m->ratio : 1;
	if (!b->blob || !b->namespace_ || !b->tier_kind || !b->compression)
		return -ENOMEM;
	b->n_tokens = m->n_tokens;
	b->size_bytes = blob_raw_bytes(m);
	b->stored_bytes = m->stored_size;
	b->tier = m->tier;
	b->version = m->version;
	b->created_unix_ms = m->created_ms;
	b->last_access_unix_ms = m->last_access_ms;
	b->hits = m->hits;
	b->crc32c = m->part_crc[PART_MAIN];
	/* Static strings, not freed by list_acc_free; "" for a record written
	 * before the state was recorded. */
	int kind = blob_state_kind(m->flags);
	b->state = (char *)(kind < 0 ? "" : slot_state_kind_name((uint32_t)kind));
	b->token_form = (char *)(kind < 0 ? "" : (m->flags & BLOB_F_PACKED) ? "packed" : "plain");
	b->media_cut = (m->flags & BLOB_F_MEDIA) != 0;
	b->sidecars = calloc(PART_COUNT, sizeof(char *));
	if (!b->sidecars)
		return -ENOMEM;
	for (int p = 1; p < PART_COUNT; p++)
		if (m->parts & (1u << p))
			b->sidecars[b->n_sidecars++] = dupstr(blob_part_suffix[p]);
	a->last = m->id;
	return 0;
}

static void list_acc_free(struct list_acc *a)
{
	for (size_t i = 0; i < a->n; i++) {
		Kvtier__V1__BlobInfo *b = a->items[i];
		free(b->blob);
		free(b->namespace_);
		free(b->tier_kind);
		free(b->compression);
		for (size_t j = 0; j < b->n_sidecars; j++)
			free(b->sidecars[j]);
		free(b->sidecars);
		free(b);
	}
	free(a->items);
}

static void handle_list(struct rpc_call *c)
{
	Kvtier__V1__ListRequest *q = (Kvtier__V1__ListRequest *)call_request(
		c, &kvtier__v1__list_request__descriptor);
	Kvtier__V1__ListReply r = KVTIER__V1__LIST_REPLY__INIT;
	struct list_acc acc = {0};
	struct key after;
	char next[KEY_HEX_LEN + 1];
	int more = 0, rc;

	if (!q)
		return;
	size_t limit = q->limit ? q->limit : 1000;
	if (limit > 10000)
		limit = 10000;
	if (q->after && q->after[0] && parse_blob(c, q->after, &after))
		goto out;
	if (q->namespace_ && q->namespace_[0]) { /* "" lists every namespace */
		char err[RPC_ERR_MAX];
		rc = store_ns_valid(q->namespace_, err, sizeof(err));
		if (rc) {
			call_fail(c, rc, "%s", err);
			goto out;
		}
	}
	rc = store_list(c->srv->store, q->namespace_, q->after && q->after[0] ? &after : NULL,
			limit, list_collect, &acc, &more);
	if (rc) {
		call_fail(c, rc, "listing blobs failed: %s", kvtier_strerror(rc));
		goto out;
	}
	r.n_blobs = acc.n;
	r.blobs = acc.items;
	r.next = more && acc.n ? key_hex(&acc.last, next) : "";
	call_reply(c, &r.base);
out:
	list_acc_free(&acc);
	protobuf_c_message_free_unpacked(&q->base, NULL);
}

struct ns_acc {
	Kvtier__V1__NamespaceStats *items;
	char (*names)[INDEX_NS_MAX + 1];
	size_t n, cap;
};

static int ns_collect(void *ctx, const struct store_ns_stats *s)
{
	struct ns_acc *a = ctx;

	if (a->n == a->cap) {
		size_t cap = a->cap ? a->cap * 2 : 16;
		void *v1 = realloc(a->items, cap * sizeof(*a->items));
		if (!v1)
			return -ENOMEM;
		a->items = v1;
		void *v2 = realloc(a->names, cap * sizeof(*a->names));
		if (!v2)
			return -ENOMEM;
		a->names = v2;
		a->cap = cap;
	}
	Kvtier__V1__NamespaceStats *n = &a->items[a->n];
	kvtier__v1__namespace_stats__init(n);
	snprintf(a->names[a->n], sizeof(a->names[a->n]), "%s", s->ns);
	n->blobs = s->blobs;
	n->bytes = s->bytes;
	n->lookups = s->lookups;
	n->hits = s->hits;
	n->prefill_tokens_per_s = s->prefill_tps;
	a->n++;
	return 0;
}

static void handle_stats(struct rpc_call *c)
{
	Kvtier__V1__StatsReply r = KVTIER__V1__STATS_REPLY__INIT;
	Kvtier__V1__TierInfo tiers[STORE_MAX_TIERS], *tp[STORE_MAX_TIERS];
	Kvtier__V1__NamespaceStats **np = NULL;
	struct ns_acc acc = {0};
	struct store_stats st;
	int rc;

	store_get_stats(c->srv->store, &st);
	r.blobs = st.blobs;
	r.bytes = st.bytes;
	r.lookups = st.lookups;
	r.hits = st.hits;
	r.matched_tokens = st.matched_tokens;
	r.puts = st.puts;
	r.dedups = st.dedups;
	r.supersessions = st.supersessions;
	r.stages = st.stages;
	r.active_leases = st.active_leases;
	for (unsigned t = 0; t < st.n_tiers; t++) {
		kvtier__v1__tier_info__init(&tiers[t]);
		fill_tier(&tiers[t], &st.tiers[t]);
		tp[t] = &tiers[t];
	}
	r.n_tiers = st.n_tiers;
	r.tiers = tp;
	rc = store_ns_stats(c->srv->store, ns_collect, &acc);
	if (rc) {
		call_fail(c, rc, "collecting namespace statistics failed: %s", kvtier_strerror(rc));
		goto out;
	}
	np = calloc(acc.n ? acc.n : 1, sizeof(*np));
	if (!np) {
		call_fail(c, -ENOMEM, "out of memory");
		goto out;
	}
	for (size_t i = 0; i < acc.n; i++) {
		acc.items[i].namespace_ = acc.names[i];
		np[i] = &acc.items[i];
	}
	r.n_namespaces = acc.n;
	r.namespaces = np;
	call_reply(c, &r.base);
out:
	free(np);
	free(acc.items);
	free(acc.names);
}

static void handle_report(struct rpc_call *c)
{
	Kvtier__V1__ReportRequest *q = (Kvtier__V1__ReportRequest *)call_request(
		c, &kvtier__v1__report_request__descriptor);
	Kvtier__V1__ReportReply r = KVTIER__V1__REPORT_REPLY__INIT;
	char err[RPC_ERR_MAX] = "";
	struct key id;
	int rc = 0;

	if (!q)
		return;
	if (q->blob && q->blob[0]) {
		if (parse_blob(c, q->blob, &id))
			goto out;
		if (q->restore_ignored)
			rc = store_quarantine(c->srv->store, &id, err, sizeof(err));
	}
	if (!rc && (q->prompt_tokens || q->prompt_ms > 0))
		rc = store_report_prefill(c->srv->store, q->namespace_, q->cached_tokens,
					  q->prompt_tokens, q->prompt_ms, err, sizeof(err));
	if (rc)
		call_fail(c, rc, "%s", err);
	else
		call_reply(c, &r.base);
out:
	protobuf_c_message_free_unpacked(&q->base, NULL);
}

/* ---- call lifecycle ---- */

static int post_request(struct rpc_server *srv, struct rpc_method *m)
{
	struct rpc_call *c = calloc(1, sizeof(*c));
	grpc_call_error e;

	if (!c)
		return -ENOMEM;
	c->srv = srv;
	c->m = m;
	grpc_metadata_array_init(&c->md);
	c->cq = grpc_completion_queue_create_for_pluck(NULL);
	e = grpc_server_request_registered_call(
		srv->server, m->reg, &c->call, &c->deadline, &c->md,
		m->payload == GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER ? &c->payload : NULL, c->cq,
		srv->cq, c);
	if (e != GRPC_CALL_OK) {
		klog(LOG_ERROR, "event=request_call_failed method=%s error=%d", m->path, (int)e);
		grpc_completion_queue_shutdown(c->cq);
		grpc_completion_queue_destroy(c->cq);
		grpc_metadata_array_destroy(&c->md);
		free(c);
		return -EPROTO;
	}
	return 0;
}

/* Posts a request for a call to any method not registered (D14: without
 * one, such calls wait unanswered until shutdown). */
static int post_request_unknown(struct rpc_server *srv)
{
	struct rpc_call *c = calloc(1, sizeof(*c));
	grpc_call_error e;

	if (!c)
		return -ENOMEM;
	c->srv = srv;
	grpc_metadata_array_init(&c->md);
	grpc_call_details_init(&c->details);
	c->cq = grpc_completion_queue_create_for_pluck(NULL);
	e = grpc_server_request_call(srv->server, &c->call, &c->details, &c->md, c->cq, srv->cq, c);
	if (e != GRPC_CALL_OK) {
		klog(LOG_ERROR, "event=request_call_failed method=unknown error=%d", (int)e);
		grpc_completion_queue_shutdown(c->cq);
		grpc_completion_queue_destroy(c->cq);
		grpc_call_details_destroy(&c->details);
		grpc_metadata_array_destroy(&c->md);
		free(c);
		return -EPROTO;
	}
	return 0;
}

static void call_free(struct rpc_call *c)
{
	if (c->call)
		grpc_call_unref(c->call);
	if (c->payload)
		grpc_byte_buffer_destroy(c->payload);
	grpc_metadata_array_destroy(&c->md);
	if (!c->m)
		grpc_call_details_destroy(&c->details);
	grpc_completion_queue_shutdown(c->cq);
	while (grpc_completion_queue_pluck(c->cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL)
		       .type != GRPC_QUEUE_SHUTDOWN)
		;
	grpc_completion_queue_destroy(c->cq);
	free(c);
}

static int token_ok(struct rpc_call *c)
{
	const char *tok = c->srv->token;
	char *peer;
	int is_unix, ok = 0;

	if (!tok[0])
		return 1;
	peer = grpc_call_get_peer(c->call);
	is_unix = listener_peer_is_unix(c->srv->listener, peer);
	gpr_free(peer);
	if (is_unix)
		return 1;
	for (size_t i = 0; i < c->md.count; i++) {
		const grpc_metadata *md = &c->md.metadata[i];
		if (grpc_slice_str_cmp(md->key, "authorization") != 0)
			continue;
		size_t tl = strlen(tok), vl = GRPC_SLICE_LENGTH(md->value);
		const uint8_t *v = GRPC_SLICE_START_PTR(md->value);
		if (vl != tl + 7 || memcmp(v, "Bearer ", 7) != 0)
			continue;
		unsigned char diff = 0; /* constant time in the token's length */
		for (size_t j = 0; j < tl; j++)
			diff |= (unsigned char)(v[7 + j] ^ (unsigned char)tok[j]);
		ok = diff == 0;
	}
	return ok;
}

static void call_run(struct rpc_call *c)
{
	grpc_op op;
	struct timespec end;

	clock_gettime(CLOCK_MONOTONIC, &c->started);
	memset(&op, 0, sizeof(op));
	op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
	op.data.recv_close_on_server.cancelled = &c->cancelled;
	c->close_started = call_start(c, &op, 1, &c->tag_close) == 0;

	c->m->handler(c); /* the token was checked before the call was queued */

	if (!c->status_sent && c->status == GRPC_STATUS_OK)
		c->status = GRPC_STATUS_CANCELLED;
	if (c->close_started)
		grpc_completion_queue_pluck(c->cq, &c->tag_close, gpr_inf_future(GPR_CLOCK_REALTIME),
					    NULL);
	if (c->cancelled && c->status == GRPC_STATUS_OK && !c->status_sent)
		c->status = GRPC_STATUS_CANCELLED;
	clock_gettime(CLOCK_MONOTONIC, &end);
	metrics_rpc_observe(c->m->id, c->status,
			    (double)(end.tv_sec - c->started.tv_sec) +
				    (double)(end.tv_nsec - c->started.tv_nsec) / 1e9);
	call_free(c);
}

#define RPC_TRIM_IDLE_MS 1000 /* idle time after calls before memory goes back */

/* Called by an idle worker (srv->lock held) when calls have ended since the
 * last trim and none runs: waits up to RPC_TRIM_IDLE_MS for a call, and if
 * none came, hands the heap's free pages back to the kernel (malloc_trim also
 * releases free pages inside the arenas, not only their tops). After a burst
 * of transfers the freed message buffers would otherwise stay counted in the
 * daemon's RSS until the next burst reused them (review D15). */
static void worker_idle_trim_locked(struct rpc_server *srv, struct rpc_pool *pool)
{
	struct timespec until;

	clock_gettime(CLOCK_REALTIME, &until);
	until.tv_sec += RPC_TRIM_IDLE_MS / 1000;
	until.tv_nsec += (long)(RPC_TRIM_IDLE_MS % 1000) * 1000000L;
	if (until.tv_nsec >= 1000000000L) {
		until.tv_sec++;
		until.tv_nsec -= 1000000000L;
	}
	if (pthread_cond_timedwait(&pool->cond, &srv->lock, &until) != ETIMEDOUT)
		return; /* a call (or the shutdown) came first */
	if (pool->head || srv->active || !srv->trim_due || srv->shutdown_done)
		return;
	srv->trim_due = 0; /* one worker trims; the others go back to waiting */
	pthread_mutex_unlock(&srv->lock);
	malloc_trim(0);
	pthread_mutex_lock(&srv->lock);
}

static void *worker_main(void *arg)
{
	struct rpc_pool *pool = arg;
	struct rpc_server *srv = pool->srv;

	for (;;) {
		struct rpc_call *c;
		pthread_mutex_lock(&srv->lock);
		/* Run until the server has shut down: calls matched before the
		 * shutdown may still be queued after `stopping` is set. */
		while (!pool->head && !srv->shutdown_done) {
			if (srv->trim_due && srv->active == 0)
				worker_idle_trim_locked(srv, pool);
			else
				pthread_cond_wait(&pool->cond, &srv->lock);
		}
		c = pool->head;
		if (!c) { /* shut down and drained */
			pthread_mutex_unlock(&srv->lock);
			return NULL;
		}
		pool->head = c->next;
		if (!pool->head)
			pool->tail = NULL;
		pool->len--;
		srv->active++;
		pthread_mutex_unlock(&srv->lock);
		call_run(c);
		pthread_mutex_lock(&srv->lock);
		srv->active--;
		srv->trim_due = 1;
		pthread_mutex_unlock(&srv->lock);
	}
}

/* Ends a call that will not be run, without blocking (no batch is started):
 * the status goes out with the cancellation. */
static void call_reject(struct rpc_call *c, grpc_status_code code, const char *msg)
{
	grpc_call_cancel_with_status(c->call, code, msg, NULL);
	if (c->m)
		metrics_rpc_observe(c->m->id, (int)code, 0);
	call_free(c);
}

/* Answers a call to a method this kvtierd does not serve, without blocking. */
static void call_unknown(struct rpc_call *c)
{
	char msg[RPC_ERR_MAX];
	int n = (int)GRPC_SLICE_LENGTH(c->details.method);

	if (n > 200)
		n = 200;
	snprintf(msg, sizeof(msg),
		 "kvtierd %s does not serve method %.*s (it serves kvtier.v1.Kvtier: Info, Lookup, "
		 "Fetch, Put, Stage, Release, Adopt, Delete, List, Stats, Report); use a client "
		 "of the same version or upgrade kvtierd",
		 KVTIER_VERSION, n, (const char *)GRPC_SLICE_START_PTR(c->details.method));
	klog(LOG_DEBUG, "event=unknown_method method=\"%.*s\"", n,
	     (const char *)GRPC_SLICE_START_PTR(c->details.method));
	grpc_call_cancel_with_status(c->call, GRPC_STATUS_UNIMPLEMENTED, msg, NULL);
	metrics_rpc_unimplemented();
	call_free(c);
}

static void *notify_main(void *arg)
{
	struct rpc_server *srv = arg;

	for (;;) {
		grpc_event ev = grpc_completion_queue_next(srv->cq, gpr_inf_future(GPR_CLOCK_REALTIME),
							   NULL);
		if (ev.type == GRPC_QUEUE_SHUTDOWN)
			break;
		if (ev.type != GRPC_OP_COMPLETE)
			continue;
		if (ev.tag == &srv->shutdown_tag) {
			pthread_mutex_lock(&srv->lock);
			srv->shutdown_done = 1;
			pthread_cond_broadcast(&srv->cond);
			for (int p = 0; p < POOL_COUNT; p++)
				pthread_cond_broadcast(&srv->pools[p].cond);
			pthread_mutex_unlock(&srv->lock);
			continue;
		}
		struct rpc_call *c = ev.tag;
		if (!ev.success) { /* server shutting down: the request was never matched */
			call_free(c);
			continue;
		}
		pthread_mutex_lock(&srv->lock);
		int stopping = srv->stopping;
		pthread_mutex_unlock(&srv->lock);
		if (!stopping && (c->m ? post_request(srv, c->m) : post_request_unknown(srv)))
			klog(LOG_ERROR, "event=repost_failed method=%s", c->m ? c->m->path : "unknown");
		/* Unauthenticated calls and calls beyond the queue's bound are
		 * refused here, before they can take memory or a worker. */
		if (!token_ok(c)) {
			call_reject(c, GRPC_STATUS_UNAUTHENTICATED,
				    "missing or wrong bearer token: TCP clients must send "
				    "\"authorization: Bearer <token>\" (kvtier --token-file)");
			continue;
		}
		if (!c->m) {
			call_unknown(c);
			continue;
		}
		struct rpc_pool *pool =
			&srv->pools[c->m->id == RPC_FETCH || c->m->id == RPC_PUT ? POOL_STREAM
										: POOL_UNARY];
		pthread_mutex_lock(&srv->lock);
		if (pool->len >= pool->max_len) {
			pthread_mutex_unlock(&srv->lock);
			call_reject(c, GRPC_STATUS_RESOURCE_EXHAUSTED,
				    "kvtierd is busy: too many calls queued; retry shortly");
			continue;
		}
		c->next = NULL;
		if (pool->tail)
			pool->tail->next = c;
		else
			pool->head = c;
		pool->tail = c;
		pool->len++;
		pthread_cond_signal(&pool->cond);
		pthread_mutex_unlock(&srv->lock);
	}
	return NULL;
}

/* The credentials of the --listen port: TLS with the configured key pair
 * (checked by the caller: tlsfile.h), else plaintext. gRPC copies the PEM
 * text. No client certificate is requested; the bearer token authenticates. */
static grpc_server_credentials *listen_credentials(const struct rpc_config *cfg)
{
	grpc_ssl_pem_key_cert_pair pair;

	if (!cfg->tls_cert_pem || !cfg->tls_key_pem)
		return grpc_insecure_server_credentials_create();
	pair.private_key = cfg->tls_key_pem;
	pair.cert_chain = cfg->tls_cert_pem;
	return grpc_ssl_server_credentials_create_ex(NULL, &pair, 1,
						     GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE, NULL);
}

/* Descriptors kept free of client connections for the daemon's own use:
 * each stream worker may hold a tier file, a temporary and an io_uring ring
 * (plus one spare), each short-call worker two files; 64 more cover LMDB,
 * the lock file, gRPC's own descriptors and the metrics endpoint (at most
 * 32 scrapes at once). */
static unsigned rpc_fd_reserve(unsigned workers)
{
	unsigned unary = workers / 4 > 4 ? workers / 4 : 4;
	return 64 + 4 * workers + 2 * unary;
}

/* Sets up where clients connect: the Unix socket and plaintext TCP through
 * listener.c (bound now, accepting after grpc_server_start); a TLS port
 * through gRPC's own listener, since gRPC 1.51 hands a descriptor to a
 * channel with insecure credentials only. A TLS port is protected by the
 * raised descriptor limit and gRPC's handshake timeout
 * (--handshake-timeout-ms), not by the listener's cap. */
static int rpc_listen(struct rpc_server *srv, char *err, size_t errlen)
{
	int tls = srv->cfg.listen && srv->cfg.tls_cert_pem && srv->cfg.tls_key_pem;
	struct listener_config lc = {
		.unix_path = srv->cfg.unix_path,
		.tcp = tls ? NULL : srv->cfg.listen,
		.max_connections = srv->cfg.max_connections,
		.fd_reserve = rpc_fd_reserve(srv->cfg.workers),
		.handshake_timeout_ms = srv->cfg.handshake_timeout_ms,
	};
	int rc = listener_open(&lc, &srv->listener, err, errlen);

	if (rc || !tls)
		return rc;
	grpc_server_credentials *cr = listen_credentials(&srv->cfg);
	int port = grpc_server_add_http2_port(srv->server, srv->cfg.listen, cr);
	grpc_server_credentials_release(cr);
	if (!port) {
		snprintf(err, errlen, "cannot listen on %s with TLS (address in use, or not "
			 "HOST:PORT?)", srv->cfg.listen);
		return KVTIER_E_UNAVAILABLE;
	}
	return 0;
}

int rpc_start(struct store *s, const struct rpc_config *cfg, struct rpc_server **out, char *err,
	      size_t errlen)
{
	struct rpc_server *srv;
	grpc_arg args[5];
	grpc_channel_args chargs = {5, args};
	int rc = 0;

	*out = NULL;
	if (!cfg->unix_path && !cfg->listen) {
		snprintf(err, errlen, "nothing to listen on: give --socket or --listen");
		return KVTIER_E_INVALID;
	}
	if (cfg->listen && (!cfg->auth_token || !cfg->auth_token[0])) {
		snprintf(err, errlen, "--listen needs --auth-token-file: TCP is never served without a token");
		return KVTIER_E_INVALID;
	}
	srv = calloc(1, sizeof(*srv));
	if (!srv)
		return -ENOMEM;
	srv->store = s;
	srv->cfg = *cfg;
	if (cfg->auth_token)
		snprintf(srv->token, sizeof(srv->token), "%s", cfg->auth_token);
	if (!srv->cfg.workers)
		srv->cfg.workers = 16;
	if (!srv->cfg.io_timeout_ms)
		srv->cfg.io_timeout_ms = 60000;
	if (!srv->cfg.handshake_timeout_ms)
		srv->cfg.handshake_timeout_ms = RPC_HANDSHAKE_TIMEOUT_MS;
	if (!srv->cfg.connection_idle_ms)
		srv->cfg.connection_idle_ms = RPC_CONNECTION_IDLE_MS;
	pthread_mutex_init(&srv->lock, NULL);
	pthread_cond_init(&srv->cond, NULL);
	for (int p = 0; p < POOL_COUNT; p++) {
		srv->pools[p].srv = srv;
		pthread_cond_init(&srv->pools[p].cond, NULL);
	}


	args[0].type = GRPC_ARG_INTEGER;
	args[0].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
	args[0].value.integer = WIRE_MAX_MESSAGE;
	args[1].type = GRPC_ARG_INTEGER;
	args[1].key = GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
	args[1].value.integer = WIRE_MAX_MESSAGE;
	/* Applies to connections added from a descriptor too: their channel
	 * stack is built from the server's arguments. */
	args[2].type = GRPC_ARG_INTEGER;
	args[2].key = GRPC_ARG_MAX_CONNECTION_IDLE_MS;
	args[2].value.integer = (int)srv->cfg.connection_idle_ms;
	/* Only gRPC's own listeners (e.g. TLS) run a handshake; ours drop a
	 * silent connection themselves (listener.c). */
	args[3].type = GRPC_ARG_INTEGER;
	args[3].key = GRPC_ARG_SERVER_HANDSHAKE_TIMEOUT_MS;
	args[3].value.integer = (int)srv->cfg.handshake_timeout_ms;
	/* No bandwidth-delay probing on receive: it grows each connection's
	 * window (to megabytes) for every stream, also for a Put that waits in
	 * the queue for a stream worker, so gRPC held up to that much of every
	 * client's upload (review D15: most of the peak at 64 clients). Without
	 * it a stream gets the default 64 KiB until its worker asks for a
	 * message, then the room for that message: buffered uploads are bounded
	 * by workers x messages in flight, not by clients. Measured at 64
	 * clients: peak anonymous memory 129 -> 74 MiB, calls per second the
	 * same; a single 256 MiB Put was within the (large) noise of this
	 * machine. */
	args[4].type = GRPC_ARG_INTEGER;
	args[4].key = GRPC_ARG_HTTP2_BDP_PROBE;
	args[4].value.integer = 0;
	srv->server = grpc_server_create(&chargs, NULL);
	srv->cq = grpc_completion_queue_create_for_next(NULL);
	grpc_server_register_completion_queue(srv->server, srv->cq, NULL);
	for (int i = 0; i < RPC_METHOD_COUNT; i++) {
		methods[i].reg = grpc_server_register_method(srv->server, methods[i].path, NULL,
							    methods[i].payload, 0);
		if (!methods[i].reg) {
			snprintf(err, errlen, "cannot register method %s", methods[i].path);
			rc = KVTIER_E_INTERNAL;
			goto fail;
		}
	}
	rc = rpc_listen(srv, err, errlen);
	if (rc)
		goto fail;
	grpc_server_start(srv->server);
	for (int i = 0; i < RPC_METHOD_COUNT; i++)
		for (unsigned k = 0; k < methods[i].prepost; k++)
			if (post_request(srv, &methods[i])) {
				snprintf(err, errlen, "cannot post requests for %s", methods[i].path);
				rc = KVTIER_E_INTERNAL;
				goto fail_started;
			}
	for (unsigned k = 0; k < RPC_PREPOST_UNKNOWN; k++)
		if (post_request_unknown(srv)) {
			snprintf(err, errlen, "cannot post requests for unknown methods");
			rc = KVTIER_E_INTERNAL;
			goto fail_started;
		}
	for (int p = 0; p < POOL_COUNT; p++) {
		struct rpc_pool *pool = &srv->pools[p];
		unsigned want = p == POOL_STREAM ? srv->cfg.workers
			       : srv->cfg.workers / 4 > 4 ? srv->cfg.workers / 4 : 4;
		pool->max_len = want * RPC_QUEUE_PER_WORKER;
		pool->threads = calloc(want, sizeof(*pool->threads));
		if (!pool->threads) {
			rc = -ENOMEM;
			goto fail_started;
		}
		for (unsigned i = 0; i < want; i++) {
			rc = pthread_create(&pool->threads[i], NULL, worker_main, pool);
			if (rc) {
				rc = -rc;
				snprintf(err, errlen, "cannot start worker threads: %s", strerror(-rc));
				goto fail_started;
			}
			pool->n_threads++;
		}
	}
	rc = pthread_create(&srv->notify_thread, NULL, notify_main, srv);
	if (rc) {
		rc = -rc;
		snprintf(err, errlen, "cannot start the notification thread: %s", strerror(-rc));
		goto fail_started;
	}
	srv->notify_started = 1;
	if (srv->listener) {
		rc = listener_start(srv->listener, srv->server, err, errlen);
		if (rc)
			goto fail_started;
	}
	*out = srv;
	return 0;
fail_started:
	rpc_stop(srv, 0);
	return rc;
fail:
	listener_stop(srv->listener);
	grpc_server_destroy(srv->server);
	grpc_completion_queue_shutdown(srv->cq);
	while (grpc_completion_queue_next(srv->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
	       GRPC_QUEUE_SHUTDOWN)
		;
	grpc_completion_queue_destroy(srv->cq);
	free(srv);
	return rc;
}

void rpc_stop(struct rpc_server *srv, unsigned grace_ms)
{
	struct timespec until;

	if (!srv)
		return;
	/* No connection may be handed to a server that is shutting down. */
	listener_stop(srv->listener);
	srv->listener = NULL;
	pthread_mutex_lock(&srv->lock);
	srv->stopping = 1;
	pthread_mutex_unlock(&srv->lock);
	grpc_server_shutdown_and_notify(srv->server, srv->cq, &srv->shutdown_tag);
	if (!srv->notify_started) { /* nobody to consume the queue: do it here */
		for (;;) {
			grpc_event ev = grpc_completion_queue_next(
				srv->cq, gpr_time_add(gpr_now(GPR_CLOCK_REALTIME),
						      gpr_time_from_millis(100, GPR_TIMESPAN)),
				NULL);
			if (ev.type == GRPC_OP_COMPLETE && ev.tag == &srv->shutdown_tag)
				break;
			if (ev.type == GRPC_OP_COMPLETE)
				call_free(ev.tag);
			if (ev.type == GRPC_QUEUE_TIMEOUT)
				grpc_server_cancel_all_calls(srv->server);
		}
		srv->shutdown_done = 1;
	}
	clock_gettime(CLOCK_REALTIME, &until);
	until.tv_sec += grace_ms / 1000;
	until.tv_nsec += (long)(grace_ms % 1000) * 1000000L;
	if (until.tv_nsec >= 1000000000L) {
		until.tv_sec++;
		until.tv_nsec -= 1000000000L;
	}
	pthread_mutex_lock(&srv->lock);
	while (!srv->shutdown_done &&
	       pthread_cond_timedwait(&srv->cond, &srv->lock, &until) != ETIMEDOUT)
		;
	int done = srv->shutdown_done;
	pthread_mutex_unlock(&srv->lock);
	if (!done) {
		klog(LOG_WARN, "event=shutdown_cancel reason=\"calls still running after %u ms\"",
		     grace_ms);
		grpc_server_cancel_all_calls(srv->server);
		pthread_mutex_lock(&srv->lock);
		while (!srv->shutdown_done)
			pthread_cond_wait(&srv->cond, &srv->lock);
		pthread_mutex_unlock(&srv->lock);
	}
	pthread_mutex_lock(&srv->lock);
	for (int p = 0; p < POOL_COUNT; p++)
		pthread_cond_broadcast(&srv->pools[p].cond);
	pthread_mutex_unlock(&srv->lock);
	for (int p = 0; p < POOL_COUNT; p++)
		for (unsigned i = 0; i < srv->pools[p].n_threads; i++)
			pthread_join(srv->pools[p].threads[i], NULL);
	grpc_completion_queue_shutdown(srv->cq);
	if (srv->notify_started)
		pthread_join(srv->notify_thread, NULL);
	else
		while (grpc_completion_queue_next(srv->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL)
			       .type != GRPC_QUEUE_SHUTDOWN)
			;
	grpc_server_destroy(srv->server);
	grpc_completion_queue_destroy(srv->cq);
	for (int p = 0; p < POOL_COUNT; p++) {
		free(srv->pools[p].threads);
		pthread_cond_destroy(&srv->pools[p].cond);
	}
	pthread_mutex_destroy(&srv->lock);
	pthread_cond_destroy(&srv->cond);
	free(srv);
}
