/* client.c: libkvtier, the C client of kvtierd on the gRPC core C API; see
 * kvtier.h for the contract.
 *
 * A handle is one gRPC channel with the eleven methods registered once.
 * Every call gets its own pluck completion queue (struct kcall) and runs one
 * batch of each kind at a time: unary calls send everything and receive the
 * reply and status in a single batch under a call deadline; the two streams
 * (Put, Fetch) have no call deadline and instead wait at most timeout_ms for
 * each message, cancelling the call when a message makes no progress. The
 * status of a stream is received by a batch started at the beginning, so a
 * daemon that refuses an upload early is noticed before the whole file is
 * sent.
 *
 * This file must never hold a blob whole in memory: Put reads the file in
 * WIRE_CHUNK pieces straight into send buffers framed by hand (wire.h), one
 * message in flight while the next is read; Fetch hands each received slice
 * to a sink without copying it: kvtier_fetch's is the caller's callback,
 * kvtier_fetch_file's writes a temporary file and renames the parts into
 * place only after the daemon's final OK. gRPC status codes become KVTIER_E_* codes only in
 * rc_of_status().
 */
#include "kvtier.h"

#include <assert.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <grpc/byte_buffer.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/slice.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>

#include "kvtier.pb-c.h"
#include "tlsfile.h"
#include "wire.h"

#define CLIENT_DEFAULT_TIMEOUT_MS 60000u
#define CLIENT_ERR_MAX 1024
#define CLIENT_GRACE_MS 2000 /* past a unary call's deadline before we cancel it ourselves */

enum method {
	M_INFO,
	M_LOOKUP,
	M_FETCH,
	M_PUT,
	M_STAGE,
	M_RELEASE,
	M_ADOPT,
	M_DELETE,
	M_LIST,
	M_STATS,
	M_REPORT,
	M_COUNT
};

static const char *const method_path[M_COUNT] = {
    [M_INFO] = "/kvtier.v1.Kvtier/Info",     [M_LOOKUP] = "/kvtier.v1.Kvtier/Lookup",
    [M_FETCH] = "/kvtier.v1.Kvtier/Fetch",   [M_PUT] = "/kvtier.v1.Kvtier/Put",
    [M_STAGE] = "/kvtier.v1.Kvtier/Stage",   [M_RELEASE] = "/kvtier.v1.Kvtier/Release",
    [M_ADOPT] = "/kvtier.v1.Kvtier/Adopt",   [M_DELETE] = "/kvtier.v1.Kvtier/Delete",
    [M_LIST] = "/kvtier.v1.Kvtier/List",     [M_STATS] = "/kvtier.v1.Kvtier/Stats",
    [M_REPORT] = "/kvtier.v1.Kvtier/Report",
};

/* The parts of a blob, in the order the daemon sends them (proto: PartHeader). */
#define PART_COUNT 3
static const char *const part_suffix[PART_COUNT] = {"", ".tokens.json", ".checkpoints"};

struct kvtier_client {
	grpc_channel *channel;
	void *method[M_COUNT];       /* from grpc_channel_register_call */
	char *target;                /* the gRPC target ("unix:/x.sock", "host:port") */
	char *auth;                  /* "Bearer <token>", or NULL */
	char *tls_ca;                /* TLS: the CA file's path (for messages), else NULL */
	char *tls_ca_pem;            /* TLS: its certificates, kept while the channel lives */
	char *tls_name;              /* TLS: the name the certificate must carry */
	unsigned timeout_ms;         /* per call; per message on streams */
	char errmsg[CLIENT_ERR_MAX]; /* message of the last failure */
};

/* Tags of the batches a call can have in flight at once. */
enum tag { TAG_SEND, TAG_RECV, TAG_STATUS, TAG_COUNT };

/* Everything one call owns; call_end() frees it all. */
struct kcall {
	kvtier_client *c;
	const char *what; /* method name for messages */
	grpc_completion_queue *cq;
	grpc_call *call;
	grpc_metadata auth; /* outgoing "authorization", when c->auth is set */
	grpc_metadata_array initial_md;
	grpc_metadata_array trailing_md;
	grpc_status_code status;
	grpc_slice details;
	grpc_byte_buffer *reply; /* the reply of unary calls and Put */
	unsigned pending;        /* bit per enum tag: batch started, not yet plucked */
	int md_sent;             /* SEND_INITIAL_METADATA issued */
	int timed_out;           /* we cancelled the call for lack of progress */
	int status_started;      /* the status batch has been started */
	char tag[TAG_COUNT];     /* addresses used as completion tags */
};

/* ---- errors ---- */

static void set_err(kvtier_client *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void set_err(kvtier_client *c, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(c->errmsg, sizeof(c->errmsg), fmt, ap);
	va_end(ap);
}

/* The one place where gRPC status codes become kvtier error codes. */
static int rc_of_status(grpc_status_code s)
{
	switch (s) {
	case GRPC_STATUS_OK:
		return 0;
	case GRPC_STATUS_INVALID_ARGUMENT:
		return KVTIER_E_INVALID;
	case GRPC_STATUS_FAILED_PRECONDITION:
		return KVTIER_E_LAYOUT;
	case GRPC_STATUS_RESOURCE_EXHAUSTED:
		return KVTIER_E_FULL;
	case GRPC_STATUS_NOT_FOUND:
		return KVTIER_E_NOTFOUND;
	case GRPC_STATUS_UNAUTHENTICATED:
		return KVTIER_E_UNAUTH;
	case GRPC_STATUS_PERMISSION_DENIED:
		return KVTIER_E_DENIED;
	case GRPC_STATUS_DATA_LOSS:
		return KVTIER_E_CORRUPT;
	case GRPC_STATUS_ALREADY_EXISTS:
		return KVTIER_E_EXISTS;
	case GRPC_STATUS_UNAVAILABLE:
		return KVTIER_E_UNAVAILABLE;
	case GRPC_STATUS_DEADLINE_EXCEEDED:
		return KVTIER_E_TIMEOUT;
	default:
		return KVTIER_E_INTERNAL;
	}
}

/* ---- calls ---- */

/* A pluck deadline ms milliseconds from now. */
static gpr_timespec after_ms(int64_t ms)
{
	return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(ms, GPR_TIMESPAN));
}

/* Creates the call for method m. A unary call gets a deadline of timeout_ms;
 * a stream gets none (its messages are timed one by one). Returns 0 or
 * -ENOMEM. call_end() must follow in every case. */
static int call_begin(struct kcall *k, kvtier_client *c, enum method m, int stream)
{
	gpr_timespec deadline;
	int rc = 0;

	memset(k, 0, sizeof(*k));
	k->c = c;
	k->what = method_path[m] + sizeof("/kvtier.v1.Kvtier/") - 1;
	k->details = grpc_empty_slice();
	grpc_metadata_array_init(&k->initial_md);
	grpc_metadata_array_init(&k->trailing_md);
	k->cq = grpc_completion_queue_create_for_pluck(NULL);
	if (!k->cq) {
		rc = -ENOMEM;
		goto out;
	}
	if (stream)
		deadline = gpr_inf_future(GPR_CLOCK_REALTIME);
	else
		deadline = gpr_time_add(gpr_now(GPR_CLOCK_REALTIME),
		                        gpr_time_from_millis((int64_t)c->timeout_ms, GPR_TIMESPAN));
	k->call = grpc_channel_create_registered_call(c->channel, NULL, GRPC_PROPAGATE_DEFAULTS,
	                                              k->cq, c->method[m], deadline, NULL);
	if (!k->call) {
		rc = -ENOMEM;
		goto out;
	}
	if (c->auth) {
		/* Both strings outlive the call: static, and the handle's. */
		k->auth.key = grpc_slice_from_static_string("authorization");
		k->auth.value = grpc_slice_from_static_string(c->auth);
	}
out:
	if (rc)
		set_err(c, "could not create a gRPC call for %s (out of memory)", k->what);
	return rc;
}

/* Starts a batch tagged t from ops[1..n]; ops[0] is a free slot where the
 * first batch of a call gets SEND_INITIAL_METADATA (with the bearer token).
 * Returns 0 or KVTIER_E_INTERNAL. */
static int call_start(struct kcall *k, grpc_op *ops, size_t n, enum tag t)
{
	grpc_op *first = ops + 1;
	grpc_call_error e;
	int rc = 0;

	if (!k->md_sent) {
		memset(&ops[0], 0, sizeof(ops[0]));
		ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
		ops[0].data.send_initial_metadata.count = k->c->auth ? 1 : 0;
		ops[0].data.send_initial_metadata.metadata = k->c->auth ? &k->auth : NULL;
		first = ops;
		n++;
	}
	e = grpc_call_start_batch(k->call, first, n, &k->tag[t], NULL);
	if (e != GRPC_CALL_OK) {
		rc = KVTIER_E_INTERNAL;
		set_err(k->c, "gRPC refused a batch of %s (grpc_call_error %d)", k->what, (int)e);
		goto out;
	}
	k->md_sent = 1;
	k->pending |= 1u << t;
out:
	return rc;
}

/* Waits for batch t until `deadline`. On timeout the call is cancelled and
 * the batch waited for. Returns 0 when the batch succeeded, 1 when it
 * completed but failed (the stream is broken; the status says why), or
 * KVTIER_E_TIMEOUT. */
static int call_wait(struct kcall *k, enum tag t, gpr_timespec deadline)
{
	grpc_event ev = grpc_completion_queue_pluck(k->cq, &k->tag[t], deadline, NULL);
	int rc;

	if (ev.type == GRPC_QUEUE_TIMEOUT) {
		grpc_call_cancel(k->call, NULL);
		k->timed_out = 1;
		grpc_completion_queue_pluck(k->cq, &k->tag[t], gpr_inf_future(GPR_CLOCK_REALTIME),
		                            NULL);
		set_err(k->c,
		        "no answer from kvtierd at %s within %u ms (%s); the call was cancelled",
		        k->c->target, k->c->timeout_ms, k->what);
		rc = KVTIER_E_TIMEOUT;
	} else {
		rc = ev.type == GRPC_OP_COMPLETE && ev.success ? 0 : 1;
	}
	k->pending &= ~(1u << t);
	return rc;
}

/* Starts the batch that receives the final status (and, with want_reply,
 * the reply message). Called after the first send batch, which carried the
 * initial metadata. */
static int call_start_status(struct kcall *k, int want_reply)
{
	grpc_op ops[4];
	size_t n = 0;

	assert(k->md_sent);
	memset(ops, 0, sizeof(ops));
	ops[1 + n].op = GRPC_OP_RECV_INITIAL_METADATA;
	ops[1 + n].data.recv_initial_metadata.recv_initial_metadata = &k->initial_md;
	n++;
	if (want_reply) {
		ops[1 + n].op = GRPC_OP_RECV_MESSAGE;
		ops[1 + n].data.recv_message.recv_message = &k->reply;
		n++;
	}
	ops[1 + n].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
	ops[1 + n].data.recv_status_on_client.trailing_metadata = &k->trailing_md;
	ops[1 + n].data.recv_status_on_client.status = &k->status;
	ops[1 + n].data.recv_status_on_client.status_details = &k->details;
	n++;
	return call_start(k, ops, n, TAG_STATUS);
}

/* Waits for the final status (at most timeout_ms, or until `deadline` when
 * given) and turns it into a return code, with the daemon's message in the
 * handle. */
static int call_status(struct kcall *k, const gpr_timespec *deadline)
{
	kvtier_client *c = k->c;
	int rc = 0;

	if (k->pending & (1u << TAG_STATUS)) {
		rc = call_wait(k, TAG_STATUS, deadline ? *deadline : after_ms(c->timeout_ms));
		if (rc == KVTIER_E_TIMEOUT)
			goto out;
	}
	if (k->timed_out) {
		/* An earlier batch timed out and cancelled the call: the status
		 * is our own CANCELLED, the cause is the timeout. */
		rc = KVTIER_E_TIMEOUT;
		set_err(c, "no answer from kvtierd at %s within %u ms (%s); the call was cancelled",
		        c->target, c->timeout_ms, k->what);
		goto out;
	}
	rc = rc_of_status(k->status);
	if (rc) {
		char *d = grpc_slice_to_c_string(k->details);
		const char *msg = d && d[0] ? d : "(no message)";

		if (rc == KVTIER_E_UNAVAILABLE && c->tls_ca && !strstr(msg, "Connection refused"))
			set_err(c, "kvtierd at %s: %s (over TLS: kvtierd must serve --listen with "
			        "--tls-cert, a certificate signed by a CA in %s that names %s)",
			        c->target, msg, c->tls_ca, c->tls_name);
		else if (rc == KVTIER_E_UNAVAILABLE && strncmp(c->target, "unix:", 5) != 0 &&
		         !strstr(msg, "Connection refused"))
			set_err(c, "kvtierd at %s: %s (if kvtierd serves this port with TLS, "
			        "--tls-cert, connect over TLS with the CA that signed its "
			        "certificate)", c->target, msg);
		else if (rc == KVTIER_E_UNAVAILABLE)
			set_err(c, "kvtierd at %s: %s", c->target, msg);
		else if (rc == KVTIER_E_TIMEOUT)
			set_err(c, "no answer from kvtierd at %s within %u ms (%s: %s)", c->target,
			        c->timeout_ms, k->what, msg);
		else
			set_err(c, "%s", msg);
		gpr_free(d);
	}
out:
	return rc;
}

/* Frees everything the call owns. A batch still in flight (after a local
 * error) is cancelled and waited for first, so the queue is empty when it is
 * destroyed. */
static void call_end(struct kcall *k)
{
	if (k->call && k->pending)
		grpc_call_cancel(k->call, NULL);
	for (int t = 0; t < TAG_COUNT; t++)
		if (k->pending & (1u << t))
			grpc_completion_queue_pluck(k->cq, &k->tag[t],
			                            gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
	k->pending = 0;
	if (k->reply)
		grpc_byte_buffer_destroy(k->reply);
	grpc_metadata_array_destroy(&k->initial_md);
	grpc_metadata_array_destroy(&k->trailing_md);
	grpc_slice_unref(k->details);
	if (k->call)
		grpc_call_unref(k->call);
	if (k->cq) {
		grpc_completion_queue_shutdown(k->cq);
		while (grpc_completion_queue_pluck(k->cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME),
		                                   NULL)
		           .type != GRPC_QUEUE_SHUTDOWN)
			;
		grpc_completion_queue_destroy(k->cq);
	}
	memset(k, 0, sizeof(*k));
}

/* Runs a unary call: sends `req`, unpacks the reply as `desc` into *reply
 * (free with protobuf_c_message_free_unpacked). Returns 0 or an error with
 * the message in the handle. */
static int call_unary(kvtier_client *c, enum method m, const ProtobufCMessage *req,
                      const ProtobufCMessageDescriptor *desc, ProtobufCMessage **reply)
{
	struct kcall k;
	grpc_byte_buffer *send = NULL;
	grpc_op ops[4];
	gpr_timespec deadline;
	int rc;

	*reply = NULL;
	rc = call_begin(&k, c, m, 0);
	if (rc)
		goto out;
	send = wire_pack(req);
	if (!send) {
		rc = -ENOMEM;
		set_err(c, "out of memory packing the %s request", k.what);
		goto out;
	}
	memset(ops, 0, sizeof(ops));
	ops[1].op = GRPC_OP_SEND_MESSAGE;
	ops[1].data.send_message.send_message = send;
	ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
	rc = call_start(&k, ops, 2, TAG_SEND);
	if (rc)
		goto out;
	rc = call_start_status(&k, 1);
	if (rc)
		goto out;
	/* The call deadline ends both batches; the grace only guards against a
	 * gRPC that fails to enforce it. */
	deadline = after_ms((int64_t)c->timeout_ms + CLIENT_GRACE_MS);
	rc = call_wait(&k, TAG_SEND, deadline);
	if (rc == KVTIER_E_TIMEOUT)
		goto out;
	rc = call_status(&k, &deadline);
	if (rc)
		goto out;
	if (!k.reply) {
		rc = KVTIER_E_INTERNAL;
		set_err(c, "kvtierd answered %s with OK but no reply message", k.what);
		goto out;
	}
	*reply = wire_unpack(desc, k.reply);
	if (!*reply) {
		rc = KVTIER_E_INTERNAL;
		set_err(c, "kvtierd sent a malformed %s (is it the same version?)",
		        desc->short_name);
		goto out;
	}
out:
	call_end(&k);
	if (send)
		grpc_byte_buffer_destroy(send);
	return rc;
}

/* ---- helpers ---- */

/* Copies a received string into a fixed field, truncating. */
static void copy_str(char *dst, size_t size, const char *src)
{
	snprintf(dst, size, "%s", src ? src : "");
}

/* A caller passed NULL where something is required: KVTIER_E_INVALID. */
static int arg_missing(kvtier_client *c, const char *what)
{
	if (c)
		set_err(c, "%s", what);
	return KVTIER_E_INVALID;
}

static void fill_tier(struct kvtier_tier *t, const Kvtier__V1__TierInfo *ti)
{
	memset(t, 0, sizeof(*t));
	t->index = ti->index;
	copy_str(t->kind, sizeof(t->kind), ti->kind);
	copy_str(t->path, sizeof(t->path), ti->path);
	t->capacity_bytes = ti->capacity_bytes;
	t->used_bytes = ti->used_bytes;
	t->blobs = ti->blobs;
	t->read_bytes_per_s = ti->read_bytes_per_s;
	t->read_fixed_s = ti->read_fixed_s;
	copy_str(t->io, sizeof(t->io), ti->io);
	copy_str(t->io_fallback, sizeof(t->io_fallback), ti->io_fallback);
	t->model_samples = ti->model_samples;
	t->high_watermark_bytes = ti->high_watermark_bytes;
	t->low_watermark_bytes = ti->low_watermark_bytes;
	t->raw_bytes = ti->raw_bytes;
	t->stored_bytes = ti->stored_bytes;
	t->migrations_in = ti->migrations_in;
	t->migrations_out = ti->migrations_out;
	t->evicted_capacity = ti->evicted_capacity;
	t->evicted_not_worth = ti->evicted_not_worth;
	t->evicted_lower_full = ti->evicted_lower_full;
	t->gdsf_base = ti->gdsf_base;
}

/* Reads exactly len bytes at off, unless the file ends first: returns the
 * count read (< len only at end of file) or -errno. */
static ssize_t pread_full(int fd, uint8_t *buf, size_t len, uint64_t off)
{
	ssize_t rc = 0;
	size_t got = 0;

	while (got < len) {
		ssize_t r = pread(fd, buf + got, len - got, (off_t)(off + got));
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			rc = -errno;
			goto out;
		}
		if (r == 0)
			break;
		got += (size_t)r;
	}
	rc = (ssize_t)got;
out:
	return rc;
}

/* Writes all n bytes (short writes and EINTR retried). Returns 0 or -errno. */
static int write_full(int fd, const uint8_t *p, size_t n)
{
	int rc = 0;

	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0) {
			rc = -errno;
			break;
		}
		p += w;
		n -= (size_t)w;
	}
	return rc;
}

/* ---- open / close ---- */

/* Builds the gRPC target from a kvtier address into *target. Returns 0,
 * KVTIER_E_INVALID for an address that is neither a socket path nor
 * host:port, or -ENOMEM. */
static int target_of(const char *address, char **target)
{
	int rc = 0, r = -1;

	*target = NULL;
	if (!address || !address[0]) {
		rc = KVTIER_E_INVALID;
		goto out;
	}
	for (const char *p = address; *p; p++)
		if ((unsigned char)*p <= ' ' || *p == 0x7f) {
			rc = KVTIER_E_INVALID;
			goto out;
		}
	if (strncmp(address, "unix:", 5) == 0) {
		if (address[5])
			r = asprintf(target, "%s", address);
		else
			rc = KVTIER_E_INVALID;
	} else if (address[0] == '/' || strncmp(address, "./", 2) == 0 ||
	           strncmp(address, "../", 3) == 0) {
		/* A socket path (a relative one too: gRPC takes "unix:relative"). */
		r = asprintf(target, "unix:%s", address);
	} else if (strchr(address, ':')) {
		r = asprintf(target, "%s", address);
	} else {
		rc = KVTIER_E_INVALID; /* neither a path nor host:port */
	}
	if (rc == 0 && r < 0) {
		*target = NULL;
		rc = -ENOMEM;
	}
out:
	return rc;
}

/* The host part of a "host:port" target, for messages: *name is malloc'd. */
static int host_of(const char *target, char **name)
{
	const char *colon = strrchr(target, ':');
	size_t n = colon ? (size_t)(colon - target) : strlen(target);

	if (n >= 2 && target[0] == '[' && target[n - 1] == ']') {
		target++;
		n -= 2;
	}
	*name = strndup(target, n);
	return *name ? 0 : -ENOMEM;
}

/* Sets up the TLS part of handle c from tls: reads the CA file, checks the
 * name, and makes SSL channel credentials into *creds. Returns 0,
 * KVTIER_E_INVALID, -errno, -EBADMSG, -EFBIG or -ENOMEM; err says why. */
static int tls_setup(kvtier_client *c, const struct kvtier_tls *tls,
                     grpc_channel_credentials **creds, char *err, size_t errlen)
{
	const char *name = tls->server_name && tls->server_name[0] ? tls->server_name : NULL;
	int rc = 0;

	if (strncmp(c->target, "unix:", 5) == 0) {
		rc = KVTIER_E_INVALID;
		snprintf(err, errlen, "TLS is for a HOST:PORT address (kvtierd --listen), not the "
		         "Unix socket %s, which needs neither TLS nor a token", c->target + 5);
		goto out;
	}
	if (!tls->ca_file || !tls->ca_file[0]) {
		rc = KVTIER_E_INVALID;
		snprintf(err, errlen, "TLS needs the CA file that signed kvtierd's certificate");
		goto out;
	}
	if (name && (strlen(name) > 253 || strspn(name, "abcdefghijklmnopqrstuvwxyz"
	                                               "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.:")
	                                       != strlen(name))) {
		rc = KVTIER_E_INVALID;
		snprintf(err, errlen, "TLS server name \"%.64s\" is not a host name or an IP "
		         "address", name);
		goto out;
	}
	rc = tlsfile_read_certs("CA file", tls->ca_file, &c->tls_ca_pem, err, errlen);
	if (rc)
		goto out;
	c->tls_ca = strdup(tls->ca_file);
	c->tls_name = NULL;
	if (name)
		c->tls_name = strdup(name);
	else if (host_of(c->target, &c->tls_name))
		c->tls_name = NULL;
	if (!c->tls_ca || !c->tls_name) {
		rc = -ENOMEM;
		goto out;
	}
	*creds = grpc_ssl_credentials_create(c->tls_ca_pem, NULL, NULL, NULL);
	if (!*creds)
		rc = -ENOMEM;
out:
	if (rc == -ENOMEM)
		snprintf(err, errlen, "out of memory");
	return rc;
}

static void client_free(kvtier_client *c)
{
	if (c->channel)
		grpc_channel_destroy(c->channel);
	free(c->auth);
	free(c->target);
	free(c->tls_ca);
	free(c->tls_ca_pem);
	free(c->tls_name);
	free(c);
}

KVTIER_API int kvtier_open(kvtier_client **out, const char *address,
                           const struct kvtier_options *opt)
{
	return kvtier_open_tls(out, address, opt, NULL, NULL, 0);
}

KVTIER_API int kvtier_open_tls(kvtier_client **out, const char *address,
                               const struct kvtier_options *opt, const struct kvtier_tls *tls,
                               char *err, size_t errlen)
{
	kvtier_client *c = NULL;
	grpc_channel_credentials *creds = NULL;
	grpc_arg args[5];
	grpc_channel_args cargs;
	char scratch[8];
	int rc = 0, inited = 0;

	if (!err || !errlen) {
		err = scratch;
		errlen = sizeof(scratch);
	}
	err[0] = '\0';
	if (!out) {
		rc = KVTIER_E_INVALID;
		snprintf(err, errlen, "no place for the handle (out is NULL)");
		goto out;
	}
	*out = NULL;
	c = calloc(1, sizeof(*c));
	if (!c) {
		rc = -ENOMEM;
		snprintf(err, errlen, "out of memory");
		goto out;
	}
	c->timeout_ms = opt && opt->timeout_ms ? opt->timeout_ms : CLIENT_DEFAULT_TIMEOUT_MS;
	rc = target_of(address, &c->target);
	if (rc) {
		snprintf(err, errlen, "bad daemon address \"%.200s\": expected unix:PATH, /PATH or "
		         "HOST:PORT", address ? address : "");
		goto out;
	}
	if (opt && opt->auth_token && opt->auth_token[0]) {
		/* A header value: printable ASCII only, or gRPC refuses every call. */
		for (const char *p = opt->auth_token; *p; p++)
			if ((unsigned char)*p < 0x21 || (unsigned char)*p > 0x7e) {
				rc = KVTIER_E_INVALID;
				snprintf(err, errlen, "the token may only hold printable ASCII "
				         "characters without blanks");
				goto out;
			}
		if (asprintf(&c->auth, "Bearer %s", opt->auth_token) < 0) {
			c->auth = NULL;
			rc = -ENOMEM;
			snprintf(err, errlen, "out of memory");
			goto out;
		}
	}
	grpc_init();
	inited = 1;
	memset(args, 0, sizeof(args));
	args[0].type = GRPC_ARG_INTEGER;
	args[0].key = (char *)GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
	args[0].value.integer = (int)WIRE_MAX_MESSAGE;
	args[1].type = GRPC_ARG_INTEGER;
	args[1].key = (char *)GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
	args[1].value.integer = (int)WIRE_MAX_MESSAGE;
	/* A long-lived handle must find a restarted kvtierd within about a
	 * second, not after gRPC's default back-off (up to 120 s). Not
	 * GRPC_ARG_MIN_RECONNECT_BACKOFF_MS: gRPC uses it as the deadline of one
	 * connection attempt (default 20 s), and at 100 ms a daemon slow to send
	 * its first HTTP/2 SETTINGS (a loaded machine, valgrind) failed calls
	 * with "timed out before receiving SETTINGS frame" / "tcp handshaker
	 * shutdown". A refused connect fails at once whatever that deadline. */
	args[2].type = GRPC_ARG_INTEGER;
	args[2].key = (char *)GRPC_ARG_MAX_RECONNECT_BACKOFF_MS;
	args[2].value.integer = 1000;
	args[3].type = GRPC_ARG_INTEGER;
	args[3].key = (char *)GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS;
	args[3].value.integer = 100;
	cargs.num_args = 4;
	cargs.args = args;
	if (tls) {
		/* SSL channel credentials: gRPC sends nothing of a call (its
		 * metadata holds the token) before the handshake has checked the
		 * certificate, and never falls back to plaintext. */
		rc = tls_setup(c, tls, &creds, err, errlen);
		if (rc)
			goto out;
		if (tls->server_name && tls->server_name[0]) {
			args[4].type = GRPC_ARG_STRING;
			args[4].key = (char *)GRPC_SSL_TARGET_NAME_OVERRIDE_ARG;
			args[4].value.string = c->tls_name;
			cargs.num_args = 5;
		}
	} else {
		creds = grpc_insecure_credentials_create();
	}
	if (!creds) {
		rc = -ENOMEM;
		snprintf(err, errlen, "out of memory");
		goto out;
	}
	c->channel = grpc_channel_create(c->target, creds, &cargs);
	if (!c->channel) {
		rc = -ENOMEM;
		snprintf(err, errlen, "out of memory");
		goto out;
	}
	for (int m = 0; m < M_COUNT; m++) {
		c->method[m] = grpc_channel_register_call(c->channel, method_path[m], NULL, NULL);
		if (!c->method[m]) {
			rc = -ENOMEM;
			snprintf(err, errlen, "out of memory");
			goto out;
		}
	}
	*out = c;
	c = NULL;
out:
	if (creds)
		grpc_channel_credentials_release(creds);
	if (c)
		client_free(c);
	if (rc && inited)
		grpc_shutdown();
	return rc;
}

KVTIER_API void kvtier_close(kvtier_client *c)
{
	if (c) {
		client_free(c);
		grpc_shutdown(); /* pairs with kvtier_open's grpc_init() */
	}
}

KVTIER_API const char *kvtier_errmsg(const kvtier_client *c)
{
	return c ? c->errmsg : "no client handle";
}

/* ---- unary methods ---- */

KVTIER_API int kvtier_info(kvtier_client *c, struct kvtier_info *out)
{
	Kvtier__V1__InfoRequest q = KVTIER__V1__INFO_REQUEST__INIT;
	Kvtier__V1__InfoReply *r = NULL;
	int rc;

	if (!c || !out) {
		rc = arg_missing(c, "missing output struct");
		goto out;
	}
	memset(out, 0, sizeof(*out));
	rc = call_unary(c, M_INFO, &q.base, &kvtier__v1__info_reply__descriptor,
	                (ProtobufCMessage **)&r);
	if (rc)
		goto out;
	copy_str(out->version, sizeof(out->version), r->version);
	out->block_size = r->block_size;
	out->supersede = r->supersede;
	out->max_blob_bytes = r->max_blob_bytes;
	for (size_t i = 0; i < r->n_tiers && out->n_tiers < 8; i++)
		fill_tier(&out->tiers[out->n_tiers++], r->tiers[i]);
	for (size_t i = 0; i < r->n_slot_dirs && out->n_slot_dirs < 8; i++)
		copy_str(out->slot_dirs[out->n_slot_dirs++], sizeof(out->slot_dirs[0]),
		         r->slot_dirs[i]);
	out->high_watermark = r->high_watermark;
	out->low_watermark = r->low_watermark;
	out->compress_min_saving = r->compress_min_saving;
	out->assumed_prefill_tps = r->assumed_prefill_tps;
	copy_str(out->shuffle, sizeof(out->shuffle), r->shuffle);
	for (size_t i = 0; i < r->n_namespaces && out->n_namespaces < 32; i++) {
		const Kvtier__V1__NamespaceModel *m = r->namespaces[i];
		struct kvtier_ns_model *d = &out->namespaces[out->n_namespaces++];

		copy_str(d->ns, sizeof(d->ns), m->namespace_);
		d->prefill_tokens_per_s = m->prefill_tokens_per_s;
		d->prefill_s_per_token = m->prefill_s_per_token;
		d->prefill_s_per_token_per_ctx = m->prefill_s_per_token_per_ctx;
		d->samples = m->samples;
	}
out:
	if (r)
		protobuf_c_message_free_unpacked(&r->base, NULL);
	return rc;
}

KVTIER_API int kvtier_lookup(kvtier_client *c, const char *ns, const int32_t *tokens, size_t n,
                             struct kvtier_match *out)
{
	Kvtier__V1__LookupRequest q = KVTIER__V1__LOOKUP_REQUEST__INIT;
	Kvtier__V1__LookupReply *r = NULL;
	int rc;

	if (!c || !ns || !out || (n && !tokens)) {
		rc = arg_missing(c, "missing namespace, tokens or output struct");
		goto out;
	}
	memset(out, 0, sizeof(*out));
	q.namespace_ = (char *)ns;
	/* Fixed-width little-endian tokens: packing 32K varints cost the client
	 * (and unpacking them the daemon) more than the lookup itself. */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	q.tokens_le32.len = n * sizeof(int32_t);
	q.tokens_le32.data = (uint8_t *)tokens;
#else
	q.n_tokens = n;
	q.tokens = (int32_t *)tokens;
#endif
	rc = call_unary(c, M_LOOKUP, &q.base, &kvtier__v1__lookup_reply__descriptor,
	                (ProtobufCMessage **)&r);
	if (rc)
		goto out;
	if (!r->found)
		goto out;
	out->found = 1;
	copy_str(out->blob, sizeof(out->blob), r->blob);
	out->matched_tokens = r->matched_tokens;
	out->n_tokens = r->n_tokens;
	out->size_bytes = r->size_bytes;
	out->tier = r->tier;
	copy_str(out->tier_kind, sizeof(out->tier_kind), r->tier_kind);
	out->est_restore_s = r->est_restore_s;
	out->est_prefill_s = r->est_prefill_s;
out:
	if (r)
		protobuf_c_message_free_unpacked(&r->base, NULL);
	return rc;
}

KVTIER_API int kvtier_adopt(kvtier_client *c, const char *ns, const char *path, int keep_source,
                            struct kvtier_put_result *out)
{
	return kvtier_adopt_sized(c, ns, path, keep_source, 0, out);
}

KVTIER_API int kvtier_adopt_sized(kvtier_client *c, const char *ns, const char *path,
                                  int keep_source, uint64_t reported_size,
                                  struct kvtier_put_result *out)
{
	Kvtier__V1__AdoptRequest q = KVTIER__V1__ADOPT_REQUEST__INIT;
	Kvtier__V1__AdoptReply *r = NULL;
	int rc;

	if (!c || !ns || !path || !out) {
		rc = arg_missing(c, "missing namespace, path or output struct");
		goto out;
	}
	memset(out, 0, sizeof(*out));
	q.namespace_ = (char *)ns;
	q.path = (char *)path;
	q.keep_source = keep_source != 0;
	q.reported_size = reported_size;
	rc = call_unary(c, M_ADOPT, &q.base, &kvtier__v1__adopt_reply__descriptor,
	                (ProtobufCMessage **)&r);
	if (rc)
		goto out;
	copy_str(out->blob, sizeof(out->blob), r->blob);
	out->deduplicated = r->deduplicated;
	out->n_tokens = r->n_tokens;
	out->tier = r->tier;
	out->n_superseded = (unsigned)r->n_superseded;
out:
	if (r)
		protobuf_c_message_free_unpacked(&r->base, NULL);
	return rc;
}

KVTIER_API int kvtier_stage(kvtier_client *c, const char *blob, const char *directory,
                            unsigned lease_seconds, struct kvtier_stage *out)
{
	Kvtier__V1__StageRequest q = KVTIER__V1__STAGE_REQUEST__INIT;
	Kvtier__V1__StageReply *r = NULL;
	int rc;

	if (!c || !blob || !directory || !out) {
		rc = arg_missing(c, "missing blob, directory or output struct");
		goto out;
	}
	memset(out, 0, sizeof(*out));
	q.blob = (char *)blob;
	q.directory = (char *)directory;
	q.lease_seconds = lease_seconds;
	rc = call_unary(c, M_STAGE, &q.base, &kvtier__v1__stage_reply__descriptor,
	                (ProtobufCMessage **)&r);
	if (rc)
		goto out;
	copy_str(out->lease, sizeof(out->lease), r->lease);
	copy_str(out->filename, sizeof(out->filename), r->filename);
	copy_str(out->path, sizeof(out->path), r->path);
	out->expires_unix_ms = r->expires_unix_ms;
	out->copied = r->copied;
	out->n_tokens = r->n_tokens;
out:
	if (r)
		protobuf_c_message_free_unpacked(&r->base, NULL);
	return rc;
}

KVTIER_API int kvtier_release(kvtier_client *c, const char *lease)
{
	Kvtier__V1__ReleaseRequest q = KVTIER__V1__RELEASE_REQUEST__INIT;
	ProtobufCMessage *r = NULL;
	int rc;

	if (!c || !lease) {
		rc = arg_missing(c, "missing lease");
		goto out;
	}
	q.lease = (char *)lease;
	rc = call_unary(c, M_RELEASE, &q.base, &kvtier__v1__release_reply__descriptor, &r);
out:
	if (r)
		protobuf_c_message_free_unpacked(r, NULL);
	return rc;
}

KVTIER_API int kvtier_delete(kvtier_client *c, const char *blob)
{
	Kvtier__V1__DeleteRequest q = KVTIER__V1__DELETE_REQUEST__INIT;
	ProtobufCMessage *r = NULL;
	int rc;

	if (!c || !blob) {
		rc = arg_missing(c, "missing blob id");
		goto out;
	}
	q.blob = (char *)blob;
	rc = call_unary(c, M_DELETE, &q.base, &kvtier__v1__delete_reply__descriptor, &r);
out:
	if (r)
		protobuf_c_message_free_unpacked(r, NULL);
	return rc;
}

static void fill_blob_info(struct kvtier_blob_info *b, const Kvtier__V1__BlobInfo *bi)
{
	memset(b, 0, sizeof(*b));
	copy_str(b->blob, sizeof(b->blob), bi->blob);
	copy_str(b->ns, sizeof(b->ns), bi->namespace_);
	b->n_tokens = bi->n_tokens;
	b->version = bi->version;
	b->size_bytes = bi->size_bytes;
	b->stored_bytes = bi->stored_bytes;
	b->tier = bi->tier;
	copy_str(b->tier_kind, sizeof(b->tier_kind), bi->tier_kind);
	copy_str(b->compression, sizeof(b->compression), bi->compression);
	b->compression_ratio = bi->compression_ratio;
	for (size_t i = 0; i < bi->n_sidecars && b->n_sidecars < 2; i++)
		copy_str(b->sidecars[b->n_sidecars++], sizeof(b->sidecars[0]), bi->sidecars[i]);
	b->created_unix_ms = bi->created_unix_ms;
	b->last_access_unix_ms = bi->last_access_unix_ms;
	b->hits = bi->hits;
	b->crc32c = bi->crc32c;
	copy_str(b->state, sizeof(b->state), bi->state);
	copy_str(b->token_form, sizeof(b->token_form), bi->token_form);
	b->media_cut = bi->media_cut != 0;
}

KVTIER_API int kvtier_list(kvtier_client *c, const char *ns,
                           int (*cb)(void *ctx, const struct kvtier_blob_info *b), void *ctx)
{
	Kvtier__V1__ListReply *r = NULL;
	struct kvtier_blob_info info;
	char after[KVTIER_BLOB_ID_LEN + 1] = "";
	int rc = 0;

	if (!c || !cb) {
		rc = arg_missing(c, "missing callback");
		goto out;
	}
	for (;;) {
		Kvtier__V1__ListRequest q = KVTIER__V1__LIST_REQUEST__INIT;

		q.namespace_ = (char *)(ns ? ns : "");
		q.after = after;
		rc = call_unary(c, M_LIST, &q.base, &kvtier__v1__list_reply__descriptor,
		                (ProtobufCMessage **)&r);
		if (rc)
			goto out;
		for (size_t i = 0; i < r->n_blobs; i++) {
			fill_blob_info(&info, r->blobs[i]);
			rc = cb(ctx, &info);
			if (rc)
				goto out;
		}
		if (!r->next || !r->next[0] || r->n_blobs == 0)
			break;
		/* The next page starts after the last id of this one; ids only
		 * grow, which also guards against a daemon that repeats a page. */
		const char *last = r->blobs[r->n_blobs - 1]->blob;
		if (!last || strlen(last) != KVTIER_BLOB_ID_LEN || strcmp(last, after) <= 0) {
			rc = KVTIER_E_INTERNAL;
			set_err(
			    c, "kvtierd sent a List page that does not advance (last id \"%.80s\")",
			    last ? last : "");
			goto out;
		}
		memcpy(after, last, sizeof(after));
		protobuf_c_message_free_unpacked(&r->base, NULL);
		r = NULL;
	}
out:
	if (r)
		protobuf_c_message_free_unpacked(&r->base, NULL);
	return rc;
}

KVTIER_API int kvtier_stats(kvtier_client *c, struct kvtier_stats *out)
{
	Kvtier__V1__StatsRequest q = KVTIER__V1__STATS_REQUEST__INIT;
	Kvtier__V1__StatsReply *r = NULL;
	int rc;

	if (!c || !out) {
		rc = arg_missing(c, "missing output struct");
		goto out;
	}
	memset(out, 0, sizeof(*out));
	rc = call_unary(c, M_STATS, &q.base, &kvtier__v1__stats_reply__descriptor,
	                (ProtobufCMessage **)&r);
	if (rc)
		goto out;
	out->blobs = r->blobs;
	out->bytes = r->bytes;
	out->lookups = r->lookups;
	out->hits = r->hits;
	out->matched_tokens = r->matched_tokens;
	out->puts = r->puts;
	out->dedups = r->dedups;
	out->supersessions = r->supersessions;
	out->stages = r->stages;
	out->active_leases = r->active_leases;
	for (size_t i = 0; i < r->n_tiers && out->n_tiers < 8; i++)
		fill_tier(&out->tiers[out->n_tiers++], r->tiers[i]);
	for (size_t i = 0; i < r->n_namespaces && out->n_namespaces < 32; i++) {
		const Kvtier__V1__NamespaceStats *s = r->namespaces[i];
		struct kvtier_ns_stats *d = &out->namespaces[out->n_namespaces++];

		copy_str(d->ns, sizeof(d->ns), s->namespace_);
		d->blobs = s->blobs;
		d->bytes = s->bytes;
		d->lookups = s->lookups;
		d->hits = s->hits;
		d->prefill_tokens_per_s = s->prefill_tokens_per_s;
	}
out:
	if (r)
		protobuf_c_message_free_unpacked(&r->base, NULL);
	return rc;
}

KVTIER_API int kvtier_report(kvtier_client *c, const struct kvtier_report *rep)
{
	Kvtier__V1__ReportRequest q = KVTIER__V1__REPORT_REQUEST__INIT;
	ProtobufCMessage *r = NULL;
	int rc;

	if (!c || !rep || !rep->ns) {
		rc = arg_missing(c, "missing report or namespace");
		goto out;
	}
	q.namespace_ = (char *)rep->ns;
	q.prompt_tokens = rep->prompt_tokens;
	q.prompt_ms = rep->prompt_ms;
	q.blob = (char *)(rep->blob ? rep->blob : "");
	q.restore_ms = rep->restore_ms;
	q.restored_tokens = rep->restored_tokens;
	q.cached_tokens = rep->cached_tokens;
	q.restore_ignored = rep->restore_ignored != 0;
	rc = call_unary(c, M_REPORT, &q.base, &kvtier__v1__report_reply__descriptor, &r);
out:
	if (r)
		protobuf_c_message_free_unpacked(r, NULL);
	return rc;
}

/* ---- Put ---- */

/* One file of the upload. */
struct put_part {
	int fd;        /* -1: this part is absent */
	uint64_t size; /* st_size when opened: exactly this much is sent */
	char *path;
};

/* Opens path for reading. A sidecar that does not exist, or is not a
 * regular file, is absent (fd -1, returns 0); the slot file must exist and be
 * regular. O_NONBLOCK keeps a FIFO from blocking the open. */
static int put_open(kvtier_client *c, struct put_part *p, int required)
{
	struct stat st;
	int rc = 0;

	p->fd = open(p->path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
	if (p->fd < 0) {
		rc = -errno;
		if (!required && rc == -ENOENT)
			rc = 0;
		else
			set_err(c, "cannot open %s: %s", p->path, kvtier_strerror(rc));
		goto out;
	}
	if (fstat(p->fd, &st) < 0) {
		rc = -errno;
		set_err(c, "cannot stat %s: %s", p->path, kvtier_strerror(rc));
		goto out;
	}
	if (!S_ISREG(st.st_mode)) {
		if (required) {
			rc = KVTIER_E_INVALID;
			set_err(c, "%s is not a regular file", p->path);
		}
		close(p->fd); /* read-only: nothing to report */
		p->fd = -1;
		goto out;
	}
	p->size = (uint64_t)st.st_size;
out:
	return rc;
}

/* Waits for the message in flight, then frees it. Returns 0, 1 (the stream
 * broke: ask the status) or KVTIER_E_TIMEOUT. */
static int put_wait(struct kcall *k, grpc_byte_buffer **inflight)
{
	int rc = 0;

	if (*inflight) {
		rc = call_wait(k, TAG_SEND, after_ms(k->c->timeout_ms));
		grpc_byte_buffer_destroy(*inflight);
		*inflight = NULL;
	}
	return rc;
}

/* Sends bb after the message in flight has gone; bb is in flight afterwards
 * (or freed on failure). Between messages, looks whether the daemon has
 * already ended the call (a refused header), so a refused upload stops early.
 * Returns 0, 1 (stream ended: ask the status), or an error. */
static int put_send(struct kcall *k, grpc_byte_buffer **inflight, grpc_byte_buffer *bb)
{
	grpc_op ops[2];
	int rc = put_wait(k, inflight);

	if (rc == 0 && (k->pending & (1u << TAG_STATUS))) {
		grpc_event ev = grpc_completion_queue_pluck(k->cq, &k->tag[TAG_STATUS],
		                                            gpr_time_0(GPR_CLOCK_MONOTONIC), NULL);
		if (ev.type == GRPC_OP_COMPLETE) {
			k->pending &= ~(1u << TAG_STATUS);
			rc = 1;
		}
	}
	if (rc)
		goto out;
	memset(ops, 0, sizeof(ops));
	ops[1].op = GRPC_OP_SEND_MESSAGE;
	ops[1].data.send_message.send_message = bb;
	rc = call_start(k, ops, 1, TAG_SEND);
	if (rc)
		goto out;
	*inflight = bb;
	bb = NULL;
	/* The first send carried the initial metadata; now ask for the status,
	 * so a refusal is seen while the rest is still being sent. */
	if (!k->status_started) {
		k->status_started = 1;
		rc = call_start_status(k, 1);
	}
out:
	if (bb)
		grpc_byte_buffer_destroy(bb);
	return rc;
}

/* Sends one part: its header message, then its bytes in WIRE_CHUNK pieces,
 * reading the next piece while the previous one is on its way. */
static int put_part_send(struct kcall *k, grpc_byte_buffer **inflight, const char *ns,
                         unsigned n_parts, uint64_t reported_size, int part, struct put_part *p)
{
	Kvtier__V1__PutRequest q = KVTIER__V1__PUT_REQUEST__INIT;
	Kvtier__V1__PartHeader ph = KVTIER__V1__PART_HEADER__INIT;
	struct wire_buf buf = {0};
	grpc_byte_buffer *bb;
	uint64_t off = 0;
	int rc;

	ph.suffix = (char *)part_suffix[part];
	ph.size = p->size;
	q.part = &ph;
	if (ns) { /* the first message: namespace, number of parts, reported size */
		q.namespace_ = (char *)ns;
		q.n_parts = n_parts;
		q.reported_size = reported_size;
	}
	bb = wire_pack(&q.base);
	if (!bb) {
		rc = -ENOMEM;
		set_err(k->c, "out of memory");
		goto out;
	}
	rc = put_send(k, inflight, bb);
	while (rc == 0 && off < p->size) {
		size_t want = p->size - off < WIRE_CHUNK ? (size_t)(p->size - off) : WIRE_CHUNK;
		ssize_t got;

		rc = wire_buf_new(&buf);
		if (rc) {
			set_err(k->c, "out of memory for a send buffer");
			break;
		}
		got = pread_full(p->fd, buf.data, want, off);
		if (got < 0) {
			rc = (int)got;
			set_err(k->c, "reading %s at offset %llu failed: %s", p->path,
			        (unsigned long long)off, kvtier_strerror(rc));
			break;
		}
		if ((size_t)got < want) {
			rc = KVTIER_E_INVALID;
			set_err(k->c,
			        "%s shrank while it was being sent (%llu bytes announced, "
			        "end of file at %llu); nothing was stored",
			        p->path, (unsigned long long)p->size,
			        (unsigned long long)(off + (uint64_t)got));
			break;
		}
		bb = wire_buf_message(&buf, want);
		if (!bb) {
			rc = -ENOMEM;
			set_err(k->c, "out of memory framing a message");
			break;
		}
		off += want;
		rc = put_send(k, inflight, bb);
	}
out:
	wire_buf_free(&buf);
	return rc;
}

KVTIER_API int kvtier_put_file(kvtier_client *c, const char *ns, const char *path,
                               struct kvtier_put_result *out)
{
	return kvtier_put_file_sized(c, ns, path, 0, out);
}

KVTIER_API int kvtier_put_file_sized(kvtier_client *c, const char *ns, const char *path,
                                     uint64_t reported_size, struct kvtier_put_result *out)
{
	struct put_part parts[PART_COUNT];
	Kvtier__V1__PutReply *r = NULL;
	grpc_byte_buffer *inflight = NULL;
	struct kcall k;
	grpc_op ops[2];
	int rc = 0, begun = 0;

	for (int i = 0; i < PART_COUNT; i++) {
		parts[i].fd = -1;
		parts[i].size = 0;
		parts[i].path = NULL;
	}
	if (!c || !ns || !path || !out) {
		rc = arg_missing(c, "missing namespace, path or output struct");
		goto out;
	}
	memset(out, 0, sizeof(*out));
	/* Open everything first: a local problem shows before anything is sent. */
	for (int i = 0; i < PART_COUNT; i++) {
		if (asprintf(&parts[i].path, "%s%s", path, part_suffix[i]) < 0) {
			parts[i].path = NULL;
			rc = -ENOMEM;
			set_err(c, "out of memory");
			goto out;
		}
		rc = put_open(c, &parts[i], i == 0);
		if (rc)
			goto out;
	}
	rc = call_begin(&k, c, M_PUT, 1);
	begun = 1;
	if (rc)
		goto out;
	unsigned n_parts = 0;
	for (int i = 0; i < PART_COUNT; i++)
		n_parts += parts[i].fd >= 0;
	for (int i = 0; i < PART_COUNT && rc == 0; i++)
		if (parts[i].fd >= 0)
			rc = put_part_send(&k, &inflight, i == 0 ? ns : NULL, n_parts,
			                   reported_size, i, &parts[i]);
	if (rc == 0)
		rc = put_wait(&k, &inflight);
	if (rc == 0) {
		memset(ops, 0, sizeof(ops));
		ops[1].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
		rc = call_start(&k, ops, 1, TAG_SEND);
		if (rc == 0)
			rc = call_wait(&k, TAG_SEND, after_ms(c->timeout_ms));
	}
	if (rc < 0)
		goto out; /* a local error or a timeout: call_end cancels the call */
	/* rc is 0, or 1 when the stream broke: either way the status tells. */
	rc = call_status(&k, NULL);
	if (rc)
		goto out;
	if (!k.reply) {
		rc = KVTIER_E_INTERNAL;
		set_err(c, "kvtierd answered Put with OK but no reply message");
		goto out;
	}
	r = (Kvtier__V1__PutReply *)wire_unpack(&kvtier__v1__put_reply__descriptor, k.reply);
	if (!r) {
		rc = KVTIER_E_INTERNAL;
		set_err(c, "kvtierd sent a malformed PutReply (is it the same version?)");
		goto out;
	}
	copy_str(out->blob, sizeof(out->blob), r->blob);
	out->deduplicated = r->deduplicated;
	out->n_tokens = r->n_tokens;
	out->tier = r->tier;
	out->n_superseded = (unsigned)r->n_superseded;
out:
	if (r)
		protobuf_c_message_free_unpacked(&r->base, NULL);
	if (begun)
		call_end(&k); /* after a local error: cancels, collects the send in flight */
	if (inflight)
		grpc_byte_buffer_destroy(inflight);
	for (int i = 0; i < PART_COUNT; i++) {
		if (parts[i].fd >= 0)
			close(parts[i].fd);
		free(parts[i].path);
	}
	return rc;
}

/* ---- Fetch ---- */

/* One Fetch stream. The parts of a blob arrive in order, each announced by a
 * header with its size, and their bytes go to a sink: kvtier_fetch's sink is
 * the caller's callback, kvtier_fetch_file's writes temporary files that are
 * renamed into place after the daemon's final OK. */
struct fetch {
	kvtier_client *c;
	const char *blob;
	int cur; /* part being received, -1 before the first header */
	struct {
		int seen;           /* its header arrived */
		uint64_t size, got; /* bytes announced and received */
	} part[PART_COUNT];
	/* Called with (part, NULL, 0) when a part begins, then with its bytes
	 * in order (never with len 0). Returns 0, or a negative code with the
	 * handle's message set, which cancels the call. */
	int (*sink)(void *ctx, int part, const void *buf, size_t len);
	void *ctx;
};

/* Checks that the part being received got all its announced bytes. */
static int fetch_part_done(struct fetch *f)
{
	int rc = 0;

	if (f->cur >= 0 && f->part[f->cur].got != f->part[f->cur].size) {
		rc = KVTIER_E_INTERNAL;
		set_err(f->c, "blob %s part \"%s\": kvtierd announced %llu bytes but sent %llu",
		        f->blob, part_suffix[f->cur], (unsigned long long)f->part[f->cur].size,
		        (unsigned long long)f->part[f->cur].got);
	}
	return rc;
}

/* Starts the part announced by header ph. */
static int fetch_part_begin(struct fetch *f, const Kvtier__V1__PartHeader *ph)
{
	int part = -1, rc;

	/* Only the known suffixes: the suffix becomes part of a file name. */
	for (int i = 0; i < PART_COUNT; i++)
		if (ph->suffix && strcmp(ph->suffix, part_suffix[i]) == 0)
			part = i;
	if (part < 0 || f->part[part].seen) {
		rc = KVTIER_E_INTERNAL;
		set_err(f->c, "kvtierd sent %s part \"%.64s\"",
		        part < 0 ? "an unknown" : "a repeated", ph->suffix ? ph->suffix : "");
		goto out;
	}
	rc = fetch_part_done(f);
	if (rc)
		goto out;
	f->cur = part;
	f->part[part].seen = 1;
	f->part[part].size = ph->size;
	f->part[part].got = 0;
	rc = f->sink(f->ctx, part, NULL, 0);
out:
	return rc;
}

/* Hands received bytes of the current part to the sink (wire_data_walk's
 * sink), after checking they are within what the part announced. */
static int fetch_data(void *ctx, const uint8_t *data, size_t n)
{
	struct fetch *f = ctx;
	int rc = 0;

	if (f->cur < 0) {
		rc = KVTIER_E_INTERNAL;
		set_err(f->c, "kvtierd sent data before any part header");
		goto out;
	}
	if (n > f->part[f->cur].size - f->part[f->cur].got) {
		rc = KVTIER_E_INTERNAL;
		set_err(f->c,
		        "blob %s part \"%s\": kvtierd sent more than the %llu bytes it announced",
		        f->blob, part_suffix[f->cur], (unsigned long long)f->part[f->cur].size);
		goto out;
	}
	if (n == 0)
		goto out;
	rc = f->sink(f->ctx, f->cur, data, n);
	if (rc)
		goto out;
	f->part[f->cur].got += n;
out:
	return rc;
}

/* Handles one received message: data-only messages go straight to the sink,
 * anything else is a Chunk (a part header, maybe with data). */
static int fetch_message(struct fetch *f, grpc_byte_buffer *bb)
{
	Kvtier__V1__Chunk *ch = NULL;
	int rc = wire_data_walk(bb, fetch_data, f);

	if (rc != 0) {
		rc = rc < 0 ? rc : 0; /* 1: it was data, and the sink has it */
		goto out;
	}
	ch = (Kvtier__V1__Chunk *)wire_unpack(&kvtier__v1__chunk__descriptor, bb);
	if (!ch) {
		rc = KVTIER_E_INTERNAL;
		set_err(f->c, "kvtierd sent a malformed Chunk (is it the same version?)");
		goto out;
	}
	if (ch->part)
		rc = fetch_part_begin(f, ch->part);
	if (rc == 0 && ch->data.len)
		rc = fetch_data(f, ch->data.data, ch->data.len);
out:
	if (ch)
		protobuf_c_message_free_unpacked(&ch->base, NULL);
	return rc;
}

/* Runs the Fetch call for f->blob, handing every part to f->sink. Returns 0
 * only when the daemon ended the stream with OK, every announced byte
 * arrived and the slot file was among the parts. */
static int fetch_stream(struct fetch *f)
{
	Kvtier__V1__FetchRequest q = KVTIER__V1__FETCH_REQUEST__INIT;
	kvtier_client *c = f->c;
	struct kcall k;
	grpc_byte_buffer *req = NULL, *cur = NULL, *next = NULL;
	grpc_op ops[4];
	int rc, w;

	rc = call_begin(&k, c, M_FETCH, 1);
	if (rc)
		goto out;
	q.blob = (char *)f->blob;
	req = wire_pack(&q.base);
	if (!req) {
		rc = -ENOMEM;
		set_err(c, "out of memory packing the request");
		goto out;
	}
	memset(ops, 0, sizeof(ops));
	ops[1].op = GRPC_OP_SEND_MESSAGE;
	ops[1].data.send_message.send_message = req;
	ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
	rc = call_start(&k, ops, 2, TAG_SEND);
	if (rc == 0)
		rc = call_start_status(&k, 0);
	if (rc)
		goto out;
	w = call_wait(&k, TAG_SEND, after_ms(c->timeout_ms));
	if (w == KVTIER_E_TIMEOUT) {
		rc = w;
		goto out;
	}
	/* Receive one message ahead: the next is asked for before this one is
	 * handed to the sink. A failed send (w == 1) shows up as the end of the
	 * stream. */
	memset(ops, 0, sizeof(ops));
	ops[1].op = GRPC_OP_RECV_MESSAGE;
	ops[1].data.recv_message.recv_message = &cur;
	rc = call_start(&k, ops, 1, TAG_RECV);
	if (rc == 0)
		rc = call_wait(&k, TAG_RECV, after_ms(c->timeout_ms));
	while (rc == 0 && cur) {
		memset(ops, 0, sizeof(ops));
		ops[1].op = GRPC_OP_RECV_MESSAGE;
		ops[1].data.recv_message.recv_message = &next;
		rc = call_start(&k, ops, 1, TAG_RECV);
		if (rc)
			break;
		rc = fetch_message(f, cur);
		grpc_byte_buffer_destroy(cur);
		cur = NULL;
		if (rc)
			break; /* call_end cancels the call and collects the receive */
		rc = call_wait(&k, TAG_RECV, after_ms(c->timeout_ms));
		cur = next;
		next = NULL;
	}
	if (rc < 0)
		goto out;
	/* End of stream (cur == NULL), or a failed receive (rc == 1): the
	 * status says whether all was sent. */
	rc = call_status(&k, NULL);
	if (rc)
		goto out;
	rc = fetch_part_done(f);
	if (rc == 0 && !f->part[0].seen) {
		rc = KVTIER_E_INTERNAL;
		set_err(c, "kvtierd ended blob %s without its slot file", f->blob);
	}
out:
	call_end(&k);
	if (cur)
		grpc_byte_buffer_destroy(cur);
	if (next)
		grpc_byte_buffer_destroy(next);
	if (req)
		grpc_byte_buffer_destroy(req);
	return rc;
}

/* One Fetch of blob into sink(ctx, ...): f is the caller's, for the part
 * sizes it records. */
static int fetch_run(struct fetch *f, kvtier_client *c, const char *blob,
                     int (*sink)(void *, int, const void *, size_t), void *ctx)
{
	memset(f, 0, sizeof(*f));
	f->c = c;
	f->blob = blob;
	f->cur = -1;
	f->sink = sink;
	f->ctx = ctx;
	return fetch_stream(f);
}

/* kvtier_fetch's sink: the caller's callback, whose non-zero return stops
 * the stream. */
struct fetch_cb {
	kvtier_client *c;
	int (*cb)(void *ctx, int part, const void *buf, size_t len);
	void *ctx;
	int stopped; /* cb's non-zero return, or 0 */
};

static int fetch_cb_sink(void *ctx, int part, const void *buf, size_t len)
{
	struct fetch_cb *u = ctx;
	int r = u->cb(u->ctx, part, buf, len);

	if (r == 0)
		return 0;
	u->stopped = r;
	set_err(u->c, "the fetch was stopped by its callback (it returned %d)", r);
	return -ECANCELED;
}

KVTIER_API int kvtier_fetch(kvtier_client *c, const char *blob,
                            int (*cb)(void *ctx, int part, const void *buf, size_t len),
                            void *ctx)
{
	struct fetch_cb u = {.c = c, .cb = cb, .ctx = ctx};
	struct fetch f;
	int rc;

	if (!c || !blob || !cb) {
		rc = arg_missing(c, "missing blob id or callback");
		goto out;
	}
	rc = fetch_run(&f, c, blob, fetch_cb_sink, &u);
	if (u.stopped)
		rc = u.stopped;
out:
	return rc;
}

/* kvtier_fetch_file's sink: one temporary file per part. */
struct fetch_file {
	kvtier_client *c;
	struct {
		char *final; /* path + suffix */
		char *tmp;   /* temporary beside it; NULL until created */
		int fd;
	} part[PART_COUNT];
};

/* Creates the temporary file of part i in the directory of its final name,
 * named so it cannot collide with another writer (O_EXCL; hidden; short, so a
 * long final name does not make it too long). */
static int fetch_tmp_create(struct fetch_file *ff, int i)
{
	static atomic_uint seq;
	const char *final = ff->part[i].final;
	const char *slash = strrchr(final, '/');
	int dirlen = slash ? (int)(slash - final) : -1;
	int rc = -EEXIST;

	for (int tries = 0; tries < 100 && rc == -EEXIST; tries++) {
		unsigned n = atomic_fetch_add(&seq, 1);
		char *tmp;
		int r;

		if (dirlen < 0)
			r = asprintf(&tmp, ".kvtier-%ld-%u.tmp", (long)getpid(), n);
		else
			r = asprintf(&tmp, "%.*s/.kvtier-%ld-%u.tmp", dirlen, final,
			             (long)getpid(), n);
		if (r < 0) {
			rc = -ENOMEM;
			set_err(ff->c, "out of memory");
			goto out;
		}
		ff->part[i].fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
		if (ff->part[i].fd >= 0) {
			ff->part[i].tmp = tmp;
			rc = 0;
			goto out;
		}
		rc = -errno;
		free(tmp);
	}
	set_err(ff->c, "cannot create a temporary file beside %s: %s", final,
	        kvtier_strerror(rc));
out:
	return rc;
}

static int fetch_file_sink(void *ctx, int part, const void *buf, size_t len)
{
	struct fetch_file *ff = ctx;
	int rc;

	if (!buf)
		return fetch_tmp_create(ff, part); /* the part begins */
	rc = write_full(ff->part[part].fd, buf, len);
	if (rc)
		set_err(ff->c, "writing %s failed: %s", ff->part[part].tmp, kvtier_strerror(rc));
	return rc;
}

/* Makes the received parts durable and renames them into place: sidecars
 * first, then the slot file, so a reader that sees the new slot file also
 * sees its sidecars. A sidecar of an earlier file at `path` that this blob
 * does not have is removed, so it cannot be paired with the new slot file. */
static int fetch_commit(struct fetch *f, struct fetch_file *ff)
{
	int rc = 0;

	for (int i = 0; i < PART_COUNT; i++) {
		if (!f->part[i].seen)
			continue;
		rc = fdatasync(ff->part[i].fd) < 0 ? -errno : 0;
		if (close(ff->part[i].fd) < 0 && !rc)
			rc = -errno;
		ff->part[i].fd = -1;
		if (rc) {
			set_err(f->c, "writing %s failed: %s", ff->part[i].tmp, kvtier_strerror(rc));
			goto out;
		}
	}
	for (int j = 1; j <= PART_COUNT; j++) {
		int i = j % PART_COUNT; /* 1, 2, then 0: the slot file last */
		const char *final = ff->part[i].final;

		if (!f->part[i].seen) {
			if (unlink(final) < 0 && errno != ENOENT) {
				rc = -errno;
				set_err(f->c, "cannot remove the stale sidecar %s: %s", final,
				        kvtier_strerror(rc));
				goto out;
			}
			continue;
		}
		if (rename(ff->part[i].tmp, final) < 0) {
			rc = -errno;
			set_err(f->c, "cannot rename %s to %s: %s", ff->part[i].tmp, final,
			        kvtier_strerror(rc));
			goto out;
		}
		free(ff->part[i].tmp);
		ff->part[i].tmp = NULL;
	}
out:
	return rc;
}

/* Refuses target names that could not be renamed over (a directory, a
 * name ending in '/') before anything is received or renamed: otherwise
 * the sidecars, renamed first, could land while the slot file fails. */
static int fetch_check_targets(struct fetch_file *ff)
{
	struct stat st;
	int rc = 0;

	for (int i = 0; i < PART_COUNT && rc == 0; i++) {
		const char *name = ff->part[i].final;
		size_t len = strlen(name);

		if (name[len - 1] == '/' || (lstat(name, &st) == 0 && S_ISDIR(st.st_mode))) {
			rc = -EISDIR;
			set_err(ff->c, "%s is a directory: give the name of the file to write",
			        name);
		}
	}
	return rc;
}

/* kvtier_fetch_fd's sink: the slot file into the descriptor, the sidecars
 * nowhere. */
struct fetch_fd {
	kvtier_client *c;
	int fd;
};

static int fetch_fd_sink(void *ctx, int part, const void *buf, size_t len)
{
	struct fetch_fd *ff = ctx;
	int rc;

	if (!buf || part != 0)
		return 0;
	rc = write_full(ff->fd, buf, len);
	if (rc)
		set_err(ff->c, "writing the slot file failed: %s", kvtier_strerror(rc));
	return rc;
}

KVTIER_API int kvtier_fetch_fd(kvtier_client *c, const char *blob, int fd, uint64_t *size_out)
{
	struct fetch_fd ff = {c, fd};
	struct fetch f;
	int rc;

	if (size_out)
		*size_out = 0;
	if (!c || !blob || fd < 0)
		return arg_missing(c, "missing blob id or descriptor");
	rc = fetch_run(&f, c, blob, fetch_fd_sink, &ff);
	if (rc == 0 && size_out)
		*size_out = f.part[0].size;
	return rc;
}

KVTIER_API int kvtier_fetch_file(kvtier_client *c, const char *blob, const char *path,
                                 uint64_t *size_out)
{
	struct fetch_file ff;
	struct fetch f;
	struct stat st;
	int rc = 0;

	/* A device, FIFO, socket or terminal is written to in place: renaming a
	 * temporary over it would replace it (as root, /dev/null became a file
	 * every program then wrote into). */
	if (c && blob && path && path[0] && stat(path, &st) == 0 && !S_ISREG(st.st_mode) &&
	    !S_ISDIR(st.st_mode)) {
		int fd = open(path, O_WRONLY | O_CLOEXEC | O_NOCTTY);

		if (fd < 0) {
			rc = -errno;
			set_err(c, "cannot open %s: %s", path, kvtier_strerror(rc));
			return rc;
		}
		rc = kvtier_fetch_fd(c, blob, fd, size_out);
		if (close(fd) < 0 && rc == 0) {
			rc = -errno;
			set_err(c, "writing %s failed: %s", path, kvtier_strerror(rc));
		}
		return rc;
	}

	memset(&ff, 0, sizeof(ff));
	ff.c = c;
	for (int i = 0; i < PART_COUNT; i++)
		ff.part[i].fd = -1;
	if (!c || !blob || !path || !path[0]) {
		rc = arg_missing(c, "missing blob id or path");
		goto out;
	}
	if (size_out)
		*size_out = 0;
	for (int i = 0; i < PART_COUNT; i++)
		if (asprintf(&ff.part[i].final, "%s%s", path, part_suffix[i]) < 0) {
			ff.part[i].final = NULL;
			rc = -ENOMEM;
			set_err(c, "out of memory");
			goto out;
		}
	rc = fetch_check_targets(&ff);
	if (rc)
		goto out;
	rc = fetch_run(&f, c, blob, fetch_file_sink, &ff);
	if (rc)
		goto out;
	rc = fetch_commit(&f, &ff);
	if (rc)
		goto out;
	if (size_out)
		*size_out = f.part[0].size;
out:
	for (int i = 0; i < PART_COUNT; i++) {
		if (ff.part[i].fd >= 0)
			close(ff.part[i].fd);
		if (ff.part[i].tmp)
			unlink(ff.part[i].tmp); /* best effort: the error already reported matters more */
		free(ff.part[i].tmp);
		free(ff.part[i].final);
	}
	return rc;
}
