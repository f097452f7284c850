/* kvclient.c: blobs in and out of the slot directory through kvtierd.
 *
 * A pool of libkvtier handles (one per concurrent caller, so kvtier_errmsg
 * belongs to the call that failed), the local/remote decision, the header
 * check of every blob before it can reach a llama-server, and the
 * per-namespace prefill speed behind the break-even.
 *
 * This module must never read a blob whole (stage and adopt are file
 * operations; fetch and put stream inside libkvtier), never let a 0-token or
 * oversized blob stay in the slot directory, and never leave files of its own
 * behind in the slot directory after a failure.
 */
#include "kvclient.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "backend.h"
#include "log.h"
#include "metrics.h"
#include "slotfile.h"

#define POOL_MAX 32
#define NS_MAX 32
#define BACKOFF_S 2.0
#define EMA_WEIGHT 0.2
#define PREFILL_MIN_TOKENS 16 /* smaller prefills say more about overhead than speed */

struct ns_stat {
	char ns[256];
	double tps;     /* prefill tokens per second (EMA); 0 = unknown */
	size_t last_be; /* last break-even computed for the namespace */
};

struct kvclient {
	char address[512];
	char token[256];
	char tls_ca[PATH_MAX];   /* "" = no TLS */
	char tls_name[256];      /* "" = the address's host */
	char slot_dir[PATH_MAX];
	unsigned timeout_ms;
	unsigned floor;
	enum kvclient_mode forced;
	pthread_mutex_t lock;
	kvtier_client *pool[POOL_MAX];
	unsigned n_pool;
	enum kvclient_mode mode;   /* KVCLIENT_AUTO until settled */
	char daemon_dir[PATH_MAX]; /* the daemon's name of the slot directory (local) */
	double down_until;         /* monotonic seconds: skip lookups and reports until then */
	struct ns_stat ns[NS_MAX];
	unsigned n_ns;
};

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

void kvclient_new_name(const char *what, char *buf, size_t len)
{
	static atomic_uint seq;
	uint8_t r[8];

	if (getrandom(r, sizeof(r), 0) != (ssize_t)sizeof(r)) {
		/* No entropy source: time, pid and a counter are still unique here. */
		struct timespec ts;
		uint64_t v;

		clock_gettime(CLOCK_REALTIME, &ts);
		v = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 30) ^
		    ((uint64_t)getpid() << 48) ^ atomic_fetch_add(&seq, 1);
		memcpy(r, &v, sizeof(r));
	}
	snprintf(buf, len, "kvtier-llama-%s-%02x%02x%02x%02x%02x%02x%02x%02x.bin", what, r[0], r[1],
	         r[2], r[3], r[4], r[5], r[6], r[7]);
}

/* Opens a new handle to kvtierd (TLS when configured) into *c. */
static int handle_open(struct kvclient *k, kvtier_client **c, char *err, size_t errlen)
{
	struct kvtier_options opt = {.auth_token = k->token[0] ? k->token : NULL,
	                             .timeout_ms = k->timeout_ms};
	struct kvtier_tls tls = {.ca_file = k->tls_ca,
	                         .server_name = k->tls_name[0] ? k->tls_name : NULL};

	return kvtier_open_tls(c, k->address, &opt, k->tls_ca[0] ? &tls : NULL, err, errlen);
}

/* A handle from the pool, or a new one. NULL when none can be opened. */
static kvtier_client *pool_get(struct kvclient *k)
{
	kvtier_client *c = NULL;
	char err[512];

	pthread_mutex_lock(&k->lock);
	if (k->n_pool)
		c = k->pool[--k->n_pool];
	pthread_mutex_unlock(&k->lock);
	if (!c && handle_open(k, &c, err, sizeof(err)) != 0) {
		/* Only after start (the CA file went away, no memory): once a
		 * minute at most, not once per request. */
		static atomic_long last_log;
		long now = (long)now_s(), last = atomic_load(&last_log);

		if ((last == 0 || now - last >= 60) &&
		    atomic_compare_exchange_strong(&last_log, &last, now))
			klog(LOG_WARN, "event=kvtier_open_failed address=%s error=\"%s\"",
			     k->address, err);
		c = NULL;
	}
	return c;
}

/* Returns handle c to the pool. After UNAVAILABLE (rc) the handle and every
 * idle one are closed instead: a gRPC channel that lost kvtierd retries with
 * a growing back-off (up to minutes) and fails calls fast meanwhile, while a
 * new channel connects at once when kvtierd is back. */
static void pool_put_rc(struct kvclient *k, kvtier_client *c, int rc)
{
	kvtier_client *drop[POOL_MAX];
	unsigned n_drop = 0;

	if (!c)
		return;
	pthread_mutex_lock(&k->lock);
	if (rc == KVTIER_E_UNAVAILABLE) {
		while (k->n_pool)
			drop[n_drop++] = k->pool[--k->n_pool];
	} else if (k->n_pool < POOL_MAX) {
		k->pool[k->n_pool++] = c;
		c = NULL;
	}
	pthread_mutex_unlock(&k->lock);
	for (unsigned i = 0; i < n_drop; i++)
		kvtier_close(drop[i]);
	if (c)
		kvtier_close(c);
}

static void pool_put(struct kvclient *k, kvtier_client *c)
{
	pool_put_rc(k, c, 0);
}

/* Starts the back-off when rc says kvtierd is unreachable or too slow. */
static void note_failure(struct kvclient *k, int rc)
{
	if (rc != KVTIER_E_UNAVAILABLE && rc != KVTIER_E_TIMEOUT)
		return;
	pthread_mutex_lock(&k->lock);
	k->down_until = now_s() + BACKOFF_S;
	pthread_mutex_unlock(&k->lock);
}

/* 1 while lookups and reports are skipped after kvtierd failed to answer. */
static int backing_off(struct kvclient *k)
{
	int r;

	pthread_mutex_lock(&k->lock);
	r = now_s() < k->down_until;
	pthread_mutex_unlock(&k->lock);
	return r;
}

/* Removes a slot file and its sidecars; a missing one is not an error. */
static void unlink_parts(const char *path)
{
	static const char *const suffix[] = {"", ".tokens.json", ".checkpoints"};
	char p[PATH_MAX + 32];

	for (int i = 0; i < 3; i++) {
		snprintf(p, sizeof(p), "%s%s", path, suffix[i]);
		if (unlink(p) < 0 && errno != ENOENT)
			klog(LOG_WARN, "event=unlink_failed path=%s error=\"%s\"", p,
			     strerror(errno));
	}
}

/* Settles local or remote with handle c (k->lock not held). Returns 0 when
 * settled, else the error of the Info or probe call. */
static int settle(struct kvclient *k, kvtier_client *c)
{
	struct kvtier_info info;
	struct kvtier_put_result pr;
	char mine[PATH_MAX], theirs[PATH_MAX], name[96], local[PATH_MAX + 100],
	    remote[PATH_MAX + 100], dir[PATH_MAX] = "";
	enum kvclient_mode mode = KVCLIENT_REMOTE;
	const char *why = "";
	int rc, fd;

	pthread_mutex_lock(&k->lock);
	mode = k->mode;
	pthread_mutex_unlock(&k->lock);
	if (mode != KVCLIENT_AUTO)
		return 0;
	mode = KVCLIENT_REMOTE;
	if (k->forced == KVCLIENT_REMOTE) {
		why = "--kvtier-mode remote";
		goto done;
	}
	rc = kvtier_info(c, &info);
	if (rc) {
		metrics_kvtier_error(METRICS_KV_INFO);
		note_failure(k, rc);
		return rc;
	}
	if (!realpath(k->slot_dir, mine)) {
		why = "the slot directory cannot be resolved here";
		goto done;
	}
	for (unsigned i = 0; i < info.n_slot_dirs && i < 8; i++)
		if (realpath(info.slot_dirs[i], theirs) && strcmp(theirs, mine) == 0) {
			snprintf(dir, sizeof(dir), "%s", info.slot_dirs[i]);
			break;
		}
	if (!dir[0]) {
		if (k->forced == KVCLIENT_LOCAL) {
			/* Trust the operator: the daemon may name the directory otherwise. */
			snprintf(dir, sizeof(dir), "%s", k->slot_dir);
			mode = KVCLIENT_LOCAL;
			why = "--kvtier-mode local";
			goto done;
		}
		why = "kvtierd does not list the slot directory among its --slot-dir";
		goto done;
	}
	if (k->forced == KVCLIENT_LOCAL) {
		mode = KVCLIENT_LOCAL;
		why = "--kvtier-mode local";
		goto done;
	}
	/* Probe: a file that is not a slot file, made here. A daemon that sees
	 * it refuses it as INVALID_ARGUMENT; one on another host cannot find it. */
	kvclient_new_name("probe", name, sizeof(name));
	snprintf(local, sizeof(local), "%s/%s", k->slot_dir, name);
	snprintf(remote, sizeof(remote), "%s/%s", dir, name);
	fd = open(local, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	if (fd < 0) {
		klog(LOG_WARN, "event=kvtier_probe_failed path=%s error=\"%s\"", local,
		     strerror(errno));
		why = "cannot write a probe file into the slot directory";
		goto done;
	}
	if (write(fd, "kvtier-llama probe, not a slot file\n", 36) != 36)
		klog(LOG_WARN, "event=kvtier_probe_write_failed path=%s", local);
	close(fd);
	rc = kvtier_adopt(c, "kvtier-llama-probe", remote, 1, &pr);
	unlink(local);
	if (rc == KVTIER_E_UNAVAILABLE || rc == KVTIER_E_TIMEOUT) {
		note_failure(k, rc);
		return rc;
	}
	if (rc == KVTIER_E_INVALID) {
		mode = KVCLIENT_LOCAL;
		why = "kvtierd lists the slot directory and sees files written here";
	} else {
		why = "kvtierd lists a directory of that name but does not see files written here";
	}
done:
	pthread_mutex_lock(&k->lock);
	if (k->mode == KVCLIENT_AUTO) {
		k->mode = mode;
		snprintf(k->daemon_dir, sizeof(k->daemon_dir), "%s", dir);
		klog(LOG_INFO, "event=kvtier_mode mode=%s address=%s slot_dir=%s reason=\"%s\"",
		     mode == KVCLIENT_LOCAL ? "local" : "remote", k->address, k->slot_dir, why);
	}
	pthread_mutex_unlock(&k->lock);
	return 0;
}

int kvclient_open(const struct kvclient_config *cfg, struct kvclient **out, char *err,
                  size_t errlen)
{
	struct kvclient *k = calloc(1, sizeof(*k));
	kvtier_client *c = NULL;
	int rc = 0;

	*out = NULL;
	if (!k) {
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	pthread_mutex_init(&k->lock, NULL);
	snprintf(k->address, sizeof(k->address), "%s", cfg->address);
	snprintf(k->token, sizeof(k->token), "%s", cfg->token ? cfg->token : "");
	snprintf(k->tls_ca, sizeof(k->tls_ca), "%s", cfg->tls_ca ? cfg->tls_ca : "");
	snprintf(k->tls_name, sizeof(k->tls_name), "%s", cfg->tls_name ? cfg->tls_name : "");
	snprintf(k->slot_dir, sizeof(k->slot_dir), "%s", cfg->slot_dir);
	k->timeout_ms = cfg->timeout_ms;
	k->floor = cfg->break_even_floor ? cfg->break_even_floor : 1;
	k->forced = cfg->mode;
	k->mode = KVCLIENT_AUTO;
	{
		char why[512];

		rc = handle_open(k, &c, why, sizeof(why));
		if (rc && k->tls_ca[0])
			snprintf(err, errlen, "--kvtier %s with --kvtier-tls-ca: %s", cfg->address,
			         why);
		else if (rc)
			snprintf(err, errlen, "--kvtier %s: %s (expected unix:PATH or HOST:PORT)",
			         cfg->address, kvtier_strerror(rc));
		if (rc)
			goto out;
	}
	rc = settle(k, c);
	if (rc)
		klog(LOG_WARN,
		     "event=kvtier_unreachable address=%s error=\"%s\" "
		     "hint=\"requests are served without kvtier until it answers\"",
		     k->address, kvtier_errmsg(c));
	pool_put_rc(k, c, rc);
	rc = 0;
	c = NULL;
	*out = k;
	k = NULL;
out:
	if (c)
		kvtier_close(c);
	if (k) {
		pthread_mutex_destroy(&k->lock);
		free(k);
	}
	return rc;
}

void kvclient_close(struct kvclient *k)
{
	if (!k)
		return;
	for (unsigned i = 0; i < k->n_pool; i++)
		kvtier_close(k->pool[i]);
	pthread_mutex_destroy(&k->lock);
	free(k);
}

const char *kvclient_mode_name(struct kvclient *k)
{
	enum kvclient_mode m;

	pthread_mutex_lock(&k->lock);
	m = k->mode;
	pthread_mutex_unlock(&k->lock);
	return m == KVCLIENT_LOCAL ? "local" : m == KVCLIENT_REMOTE ? "remote" : "unknown";
}

const char *kvclient_slot_dir(struct kvclient *k)
{
	return k->slot_dir;
}

int kvclient_lookup(struct kvclient *k, const char *ns, const int32_t *tokens, size_t n,
                    struct kvtier_match *m)
{
	kvtier_client *c;
	int rc;

	memset(m, 0, sizeof(*m));
	if (backing_off(k))
		return KVTIER_E_UNAVAILABLE;
	c = pool_get(k);
	if (!c)
		return -ENOMEM;
	rc = kvtier_lookup(c, ns, tokens, n, m);
	if (rc) {
		metrics_kvtier_error(METRICS_KV_LOOKUP);
		note_failure(k, rc);
		klog(LOG_WARN, "event=kvtier_lookup_failed ns=%s error=%s message=\"%s\"", ns,
		     kvtier_status_name(rc), kvtier_errmsg(c));
		memset(m, 0, sizeof(*m));
	}
	pool_put_rc(k, c, rc);
	return rc;
}

/* Opens slot_dir/name and checks its header against m and max_tokens. */
static int check_header(struct kvclient *k, const char *name, const struct kvtier_match *m,
                        uint32_t max_tokens, struct kvclient_file *f, char *err, size_t errlen)
{
	char path[PATH_MAX + 300], why[256] = "";
	struct slot_info si;
	struct stat st;
	int fd, rc;

	snprintf(path, sizeof(path), "%s/%s", k->slot_dir, name);
	fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	if (fd < 0) {
		rc = -errno;
		snprintf(err, errlen, "staged file %s is not visible here: %s", path,
		         strerror(errno));
		return rc;
	}
	rc = slot_parse_fd(fd, &si, NULL, why, sizeof(why));
	if (rc == 0 && fstat(fd, &st) == 0)
		f->bytes = (uint64_t)st.st_size;
	close(fd);
	if (rc) {
		snprintf(err, errlen, "blob %s refused before restore: %s", m->blob, why);
		return KVTIER_E_INVALID;
	}
	f->n_tokens = si.n_tokens_all;
	f->version = si.version;
	/* The server loads every token of the payload (media positions too). */
	if (si.n_tokens == 0 || (max_tokens && si.n_tokens_all > max_tokens) ||
	    (m->n_tokens && si.n_tokens != m->n_tokens)) {
		snprintf(err, errlen,
		         "blob %s refused before restore: %u tokens (lookup said %u, slot holds at "
		         "most %u), header version %u",
		         m->blob, si.n_tokens_all, m->n_tokens, max_tokens, si.version);
		return KVTIER_E_INVALID;
	}
	return 0;
}

int kvclient_stage(struct kvclient *k, const struct kvtier_match *m, uint32_t max_tokens,
                   struct kvclient_file *f, char *err, size_t errlen)
{
	kvtier_client *c = pool_get(k);
	enum kvclient_mode mode;
	char dir[PATH_MAX], path[PATH_MAX + 300];
	int rc;

	memset(f, 0, sizeof(*f));
	if (!c) {
		snprintf(err, errlen, "cannot open a kvtier handle");
		return -ENOMEM;
	}
	rc = settle(k, c);
	if (rc) {
		snprintf(err, errlen, "kvtierd: %s", kvtier_errmsg(c));
		goto out;
	}
	pthread_mutex_lock(&k->lock);
	mode = k->mode;
	snprintf(dir, sizeof(dir), "%s", k->daemon_dir);
	pthread_mutex_unlock(&k->lock);
	if (mode == KVCLIENT_LOCAL) {
		struct kvtier_stage st;
		/* The lease outlives the slot action, even one that hangs: kvtierd's
		 * default (300 s) when that is enough, else longer, within its
		 * default maximum (3600 s). */
		unsigned lease = k->timeout_ms / 1000 + 120;

		lease = lease <= 300 ? 0 : lease > 3600 ? 3600 : lease;

		rc = kvtier_stage(c, m->blob, dir, lease, &st);
		if (rc) {
			metrics_kvtier_error(METRICS_KV_STAGE);
			note_failure(k, rc);
			snprintf(err, errlen, "stage of %s failed: %s: %s", m->blob,
			         kvtier_status_name(rc), kvtier_errmsg(c));
			goto out;
		}
		snprintf(f->lease, sizeof(f->lease), "%s", st.lease);
		snprintf(f->name, sizeof(f->name), "%s", st.filename);
		if (!backend_filename_ok(f->name)) {
			snprintf(err, errlen, "kvtierd staged %s under an unsafe name", m->blob);
			rc = KVTIER_E_INTERNAL;
			kvclient_unstage(k, f);
			goto out;
		}
	} else {
		uint64_t size = 0;

		kvclient_new_name("restore", f->name, sizeof(f->name));
		snprintf(path, sizeof(path), "%s/%s", k->slot_dir, f->name);
		f->fetched = 1;
		rc = kvtier_fetch_file(c, m->blob, path, &size);
		if (rc) {
			metrics_kvtier_error(METRICS_KV_FETCH);
			note_failure(k, rc);
			snprintf(err, errlen, "fetch of %s failed: %s: %s", m->blob,
			         kvtier_status_name(rc), kvtier_errmsg(c));
			kvclient_unstage(k, f);
			goto out;
		}
	}
	rc = check_header(k, f->name, m, max_tokens, f, err, errlen);
	if (rc)
		kvclient_unstage(k, f);
out:
	pool_put_rc(k, c, rc);
	return rc;
}

void kvclient_unstage(struct kvclient *k, struct kvclient_file *f)
{
	char path[PATH_MAX + 300];

	if (f->lease[0]) {
		kvtier_client *c = pool_get(k);
		int rc = c ? kvtier_release(c, f->lease) : -ENOMEM;

		/* A failed release only keeps the link until the lease expires. */
		if (rc)
			klog(LOG_WARN,
			     "event=kvtier_release_failed lease=%s error=%s message=\"%s\"",
			     f->lease, kvtier_status_name(rc), c ? kvtier_errmsg(c) : "no handle");
		pool_put(k, c);
		f->lease[0] = '\0';
	}
	if (f->fetched && f->name[0]) {
		snprintf(path, sizeof(path), "%s/%s", k->slot_dir, f->name);
		unlink_parts(path);
		f->fetched = 0;
	}
}

/* Bytes of a slot file and its sidecars. */
static uint64_t parts_size(const char *path)
{
	static const char *const suffix[] = {"", ".tokens.json", ".checkpoints"};
	char p[PATH_MAX + 32];
	struct stat st;
	uint64_t n = 0;

	for (int i = 0; i < 3; i++) {
		if ((size_t)snprintf(p, sizeof(p), "%s%s", path, suffix[i]) >= sizeof(p))
			continue;
		if (stat(p, &st) == 0)
			n += (uint64_t)st.st_size;
	}
	return n;
}

int kvclient_ingest(struct kvclient *k, const char *ns, const char *name, uint64_t reported_size,
                    struct kvtier_put_result *r, uint64_t *bytes, char *err, size_t errlen)
{
	kvtier_client *c = pool_get(k);
	char path[PATH_MAX + 300], remote[PATH_MAX + 300];
	enum kvclient_mode mode;
	int rc;

	memset(r, 0, sizeof(*r));
	snprintf(path, sizeof(path), "%s/%s", k->slot_dir, name);
	*bytes = parts_size(path);
	if (!c) {
		snprintf(err, errlen, "cannot open a kvtier handle");
		unlink_parts(path);
		return -ENOMEM;
	}
	rc = settle(k, c);
	if (rc) {
		snprintf(err, errlen, "kvtierd: %s", kvtier_errmsg(c));
		unlink_parts(path);
		goto out;
	}
	pthread_mutex_lock(&k->lock);
	mode = k->mode;
	snprintf(remote, sizeof(remote), "%s/%s", k->daemon_dir, name);
	pthread_mutex_unlock(&k->lock);
	if (mode == KVCLIENT_LOCAL) {
		rc = kvtier_adopt_sized(c, ns, remote, 0, reported_size, r);
		if (rc) {
			metrics_kvtier_error(METRICS_KV_ADOPT);
			snprintf(err, errlen, "adopt failed: %s: %s", kvtier_status_name(rc),
			         kvtier_errmsg(c));
		}
		/* Adopt removed the names on success; a refused file stays: remove it. */
		unlink_parts(path);
	} else {
		rc = kvtier_put_file_sized(c, ns, path, reported_size, r);
		if (rc) {
			metrics_kvtier_error(METRICS_KV_PUT);
			snprintf(err, errlen, "put failed: %s: %s", kvtier_status_name(rc),
			         kvtier_errmsg(c));
		}
		unlink_parts(path);
	}
	note_failure(k, rc);
out:
	pool_put_rc(k, c, rc);
	return rc;
}

void kvclient_discard(struct kvclient *k, const char *name)
{
	char path[PATH_MAX + 300];

	if (!backend_filename_ok(name))
		return;
	snprintf(path, sizeof(path), "%s/%s", k->slot_dir, name);
	unlink_parts(path);
}

void kvclient_report(struct kvclient *k, const struct kvtier_report *r)
{
	kvtier_client *c;
	int rc;

	if (backing_off(k))
		return;
	c = pool_get(k);
	if (!c)
		return;
	rc = kvtier_report(c, r);
	if (rc) {
		/* NOT_FOUND: no blob was ever stored in the namespace yet. */
		if (rc != KVTIER_E_NOTFOUND)
			metrics_kvtier_error(METRICS_KV_REPORT);
		note_failure(k, rc);
		klog(LOG_DEBUG, "event=kvtier_report_failed ns=%s error=%s message=\"%s\"", r->ns,
		     kvtier_status_name(rc), kvtier_errmsg(c));
	}
	pool_put_rc(k, c, rc);
}

/* The namespace's entry (k->lock held); NULL when the table is full. */
static struct ns_stat *ns_locked(struct kvclient *k, const char *ns)
{
	for (unsigned i = 0; i < k->n_ns; i++)
		if (strcmp(k->ns[i].ns, ns) == 0)
			return &k->ns[i];
	if (k->n_ns == NS_MAX)
		return NULL;
	struct ns_stat *s = &k->ns[k->n_ns++];

	snprintf(s->ns, sizeof(s->ns), "%s", ns);
	s->tps = 0;
	s->last_be = k->floor;
	return s;
}

void kvclient_observe_prefill(struct kvclient *k, const char *ns, uint32_t tokens, double ms)
{
	struct ns_stat *s;
	double tps;

	if (tokens < PREFILL_MIN_TOKENS || !(ms > 0))
		return;
	tps = tokens / (ms / 1000.0);
	pthread_mutex_lock(&k->lock);
	s = ns_locked(k, ns);
	if (s)
		s->tps = s->tps > 0 ? (1 - EMA_WEIGHT) * s->tps + EMA_WEIGHT * tps : tps;
	pthread_mutex_unlock(&k->lock);
}

size_t kvclient_break_even(struct kvclient *k, const char *ns, double est_restore_s)
{
	struct ns_stat *s;
	size_t be = k->floor;

	pthread_mutex_lock(&k->lock);
	s = ns_locked(k, ns);
	if (s) {
		if (est_restore_s > 0 && s->tps > 0) {
			double t = est_restore_s * s->tps;

			be = t > (double)k->floor ? (t < 1e9 ? (size_t)t : (size_t)1e9) : k->floor;
			s->last_be = be;
		} else if (est_restore_s <= 0) {
			be = s->last_be;
		}
	}
	pthread_mutex_unlock(&k->lock);
	return be;
}

unsigned kvclient_sweep(struct kvclient *k, unsigned max_age_s)
{
	DIR *d = opendir(k->slot_dir);
	struct dirent *e;
	struct stat st;
	time_t now = time(NULL);
	unsigned n = 0;

	if (!d)
		return 0;
	while ((e = readdir(d)) != NULL) {
		size_t len = strlen(e->d_name);

		/* Ours, and libkvtier's fetch temporaries (".kvtier-PID-N.tmp")
		 * left by a crash: an active fetch keeps its mtime fresh. */
		if (strncmp(e->d_name, "kvtier-llama-", 13) != 0 &&
		    !(strncmp(e->d_name, ".kvtier-", 8) == 0 && len > 12 &&
		      strcmp(e->d_name + len - 4, ".tmp") == 0))
			continue;
		if (fstatat(dirfd(d), e->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0 ||
		    !S_ISREG(st.st_mode) || now - st.st_mtime < (time_t)max_age_s)
			continue;
		if (unlinkat(dirfd(d), e->d_name, 0) == 0) {
			n++;
			klog(LOG_INFO, "event=sweep_orphan dir=%s name=%s", k->slot_dir, e->d_name);
		}
	}
	closedir(d);
	return n;
}
