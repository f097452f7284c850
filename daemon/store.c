/* store.c: the storage core of kvtierd, gluing the index (LMDB) to the tiers.
 *
 * Order of operations is what makes it crash-safe (DESIGN.md, "Crash safety"):
 * bytes first (temporary, durable, renamed into place), metadata second; on
 * delete, metadata first, files second. Whatever a crash leaves between the
 * two steps is repaired by reconcile() at the next start.
 *
 * This file must never talk to the network and never hold a blob in memory:
 * bytes flow through tier writers and readers in caller-sized pieces.
 */
#include "store_int.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "crc32c.h"
#include "kvtier.h"
#include "log.h"
#include "slotfile.h"
#include "tier.h"
#include "utf8.h"

const char *const store_evict_reason_name[STORE_EVICT_REASONS] = {
	"capacity", "not_worth_restoring", "lower_tier_full"};

#define set_err store_set_err

void store_set_err(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (!err || !errlen)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

/* What a message quotes of a caller's string (a path, a lease id): all of it,
 * or its first STORE_ECHO_MAX bytes (cut at a UTF-8 character boundary) and
 * "...", so that a 10 KB argument cannot push the explanation and the advice
 * out of the message. Returns s or buf (which must hold STORE_ECHO_BUF). */
#define STORE_ECHO_MAX 160
#define STORE_ECHO_BUF (STORE_ECHO_MAX + 4)

static const char *store_echo(const char *s, char *buf)
{
	size_t n = STORE_ECHO_MAX;

	if (!s)
		return "(null)";
	if (strnlen(s, n + 1) <= n)
		return s;
	while (n > 0 && ((unsigned char)s[n] & 0xc0) == 0x80)
		n--;
	memcpy(buf, s, n);
	memcpy(buf + n, "...", 4);
	return buf;
}

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t store_now_ms(void)
{
	return now_ms();
}

double store_mono(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int random_hex(char *out, size_t nbytes)
{
	uint8_t buf[32];
	static const char hx[] = "0123456789abcdef";

	if (nbytes > sizeof(buf))
		return -EINVAL;
	if (getrandom(buf, nbytes, 0) != (ssize_t)nbytes)
		return -errno;
	for (size_t i = 0; i < nbytes; i++) {
		out[2 * i] = hx[buf[i] >> 4];
		out[2 * i + 1] = hx[buf[i] & 15];
	}
	out[2 * nbytes] = '\0';
	return 0;
}

static void part_name(const struct key *id, int part, char *out, size_t cap)
{
	char hex[KEY_HEX_LEN + 1];

	snprintf(out, cap, "%s%s", key_hex(id, hex), blob_part_suffix[part]);
}

void store_part_name(const struct key *id, int part, char *out, size_t cap)
{
	part_name(id, part, out, cap);
}

/* ---- pins: blobs being read or staged are never moved ---- */

void store_pin(struct store *s, const struct key *id)
{
	pthread_mutex_lock(&s->pin_lock);
	for (size_t i = 0; i < s->n_pins; i++)
		if (key_equal(&s->pins[i].id, id)) {
			s->pins[i].count++;
			pthread_mutex_unlock(&s->pin_lock);
			return;
		}
	if (s->n_pins == s->cap_pins) {
		size_t cap = s->cap_pins ? s->cap_pins * 2 : 64;
		struct pin *p = realloc(s->pins, cap * sizeof(*p));
		if (!p) {
			/* Without memory the pin is lost; the reader holds its file
			 * descriptors, so a move only costs it nothing worse than a
			 * read of an unlinked file. */
			pthread_mutex_unlock(&s->pin_lock);
			return;
		}
		s->pins = p;
		s->cap_pins = cap;
	}
	s->pins[s->n_pins].id = *id;
	s->pins[s->n_pins].count = 1;
	s->n_pins++;
	pthread_mutex_unlock(&s->pin_lock);
}

void store_unpin(struct store *s, const struct key *id)
{
	pthread_mutex_lock(&s->pin_lock);
	for (size_t i = 0; i < s->n_pins; i++)
		if (key_equal(&s->pins[i].id, id)) {
			if (--s->pins[i].count == 0)
				s->pins[i] = s->pins[--s->n_pins];
			break;
		}
	pthread_mutex_unlock(&s->pin_lock);
}

unsigned store_pin_count(struct store *s, const struct key *id)
{
	unsigned n = 0;

	pthread_mutex_lock(&s->pin_lock);
	for (size_t i = 0; i < s->n_pins && !n; i++)
		if (key_equal(&s->pins[i].id, id))
			n = s->pins[i].count;
	pthread_mutex_unlock(&s->pin_lock);
	return n;
}

int store_pinned(struct store *s, const struct key *id)
{
	return store_pin_count(s, id) > 0;
}

/* A namespace is 1..INDEX_NS_MAX bytes of strict UTF-8 without control
 * characters: it travels in proto3 strings (which every conforming peer
 * checks for valid UTF-8), log lines and metrics labels. A NUL inside the
 * name never reaches here: rpc.c refuses it on the wire (wire_unpack_checked),
 * since a C string would end there. utf8_name_check (common/utf8.c) is the
 * same checker the metrics label escaping uses. */
int store_ns_valid(const char *ns, char *err, size_t errlen)
{
	size_t n = ns ? strlen(ns) : 0, bad;

	if (n == 0 || n > INDEX_NS_MAX) {
		set_err(err, errlen, "namespace must be 1 to %d bytes (got %zu)", INDEX_NS_MAX, n);
		return KVTIER_E_INVALID;
	}
	if (utf8_name_check(ns, n, INDEX_NS_MAX, &bad)) {
		set_err(err, errlen, "namespace must be valid UTF-8 without control characters: "
			"byte 0x%02x at offset %zu is %s (UTF-16 surrogates, overlong forms and code "
			"points above U+10FFFF are refused)", (unsigned char)ns[bad], bad,
			(unsigned char)ns[bad] < 0x20 || ns[bad] == 0x7f ? "a control character"
			: "not part of a valid UTF-8 character");
		return KVTIER_E_INVALID;
	}
	return 0;
}

/* ---- access statistics, flushed in batches by the background thread ---- */

/* A hit: counted for GDSF's frequency, and the blob's priority base moves
 * up to its tier's current inflation value (recency). */
static void touch_blob(struct store *s, const struct key *id, unsigned tier)
{
	double base = tier < s->n_tiers ? placement_base(s, tier) : 0;

	pthread_mutex_lock(&s->touch_lock);
	if (s->n_touch < STORE_TOUCH_MAX) {
		struct index_touch *t = &s->touch[s->n_touch++];
		t->id = *id;
		t->hits = 1;
		t->last_access_ms = now_ms();
		t->gdsf_base = base;
		t->tier = tier;
	}
	pthread_mutex_unlock(&s->touch_lock);
}

static void touch_flush(struct store *s)
{
	struct index_touch *batch;
	size_t n;

	pthread_mutex_lock(&s->touch_lock);
	n = s->n_touch;
	if (n == 0) {
		pthread_mutex_unlock(&s->touch_lock);
		return;
	}
	batch = malloc(n * sizeof(*batch));
	if (batch) {
		memcpy(batch, s->touch, n * sizeof(*batch));
		s->n_touch = 0;
	}
	pthread_mutex_unlock(&s->touch_lock);
	if (!batch)
		return;
	int rc = index_touch(s->ix, batch, n);
	if (rc)
		klog(LOG_WARN, "event=touch_flush_failed n=%zu rc=%d err=\"%s\"", n, rc,
		     kvtier_strerror(rc));
	free(batch);
}

static void ns_count(struct store *s, const char *ns, int hit, uint32_t matched)
{
	pthread_mutex_lock(&s->ns_lock);
	struct ns_counter *c = NULL;
	for (size_t i = 0; i < s->n_ns_counters; i++)
		if (strcmp(s->ns_counters[i].ns, ns) == 0) {
			c = &s->ns_counters[i];
			break;
		}
	if (!c && s->n_ns_counters < STORE_MAX_NS_COUNTERS) {
		c = &s->ns_counters[s->n_ns_counters++];
		snprintf(c->ns, sizeof(c->ns), "%s", ns);
	}
	if (c) {
		c->lookups++;
		c->hits += hit ? 1 : 0;
		c->matched += matched;
	}
	pthread_mutex_unlock(&s->ns_lock);
}

/* ---- leases ---- */

static void lease_unlink(struct store *s, const struct lease *l)
{
	char name[512];

	for (int p = 0; p < PART_COUNT; p++) {
		if (!(l->parts & (1u << p)))
			continue;
		snprintf(name, sizeof(name), "%s%s", l->name, blob_part_suffix[p]);
		if (unlinkat(s->slot_fd[l->slot_dir], name, 0) && errno != ENOENT)
			klog(LOG_WARN, "event=stage_unlink_failed dir=%s name=%s errno=%d",
			     s->slot_real[l->slot_dir], name, errno);
	}
}

static void leases_expire(struct store *s, int all)
{
	int64_t now = now_ms();
	struct lease *dead = NULL;

	pthread_mutex_lock(&s->lease_lock);
	for (struct lease **pp = &s->leases; *pp;) {
		struct lease *l = *pp;
		if (all || l->expires_ms <= now) {
			*pp = l->next;
			l->next = dead;
			dead = l;
		} else {
			pp = &l->next;
		}
	}
	pthread_mutex_unlock(&s->lease_lock);
	while (dead) {
		struct lease *l = dead;
		dead = l->next;
		lease_unlink(s, l);
		store_unpin(s, &l->blob);
		if (!all) {
			klog(LOG_INFO, "event=lease_expired lease=%s name=%s", l->id, l->name);
			atomic_fetch_add(&s->lease_expiries, 1);
		}
		atomic_fetch_sub(&s->active_leases, 1);
		free(l);
	}
}

static void retry_removals(struct store *s);

static void *bg_main(void *arg)
{
	struct store *s = arg;

	pthread_mutex_lock(&s->bg_lock);
	while (!s->bg_stop) {
		struct timespec ts;
		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_sec += 1;
		pthread_cond_timedwait(&s->bg_cond, &s->bg_lock, &ts);
		if (s->bg_stop)
			break;
		pthread_mutex_unlock(&s->bg_lock);
		leases_expire(s, 0);
		touch_flush(s);
		retry_removals(s);
		for (unsigned t = 0; t < s->n_tiers; t++)
			store_tier_check(s, t, NULL, 0);
		pthread_mutex_lock(&s->bg_lock);
	}
	pthread_mutex_unlock(&s->bg_lock);
	return NULL;
}

/* ---- reconcile (crash recovery at start) ---- */

struct bad_blob {
	struct key id;
	unsigned tier;
	uint32_t parts;
};

struct reconcile_ctx {
	struct store *s;
	struct bad_blob *bad;
	size_t n_bad, cap_bad;
	int rc;
};

static int reconcile_blob(void *ctx, const struct blob_meta *m, const char *ns)
{
	struct reconcile_ctx *rc = ctx;
	struct store *s = rc->s;
	char name[KEY_HEX_LEN + 32];
	int ok = m->tier < s->n_tiers;
	uint64_t total = 0;

	for (int p = 0; ok && p < PART_COUNT; p++) {
		uint64_t size;
		if (!(m->parts & (1u << p)))
			continue;
		part_name(&m->id, p, name, sizeof(name));
		if (tier_stat(s->tiers[m->tier], name, &size) || size != m->part_stored[p])
			ok = 0;
		total += size;
	}
	if (ok) {
		int nfiles = 0;
		for (int p = 0; p < PART_COUNT; p++)
			nfiles += (m->parts >> p) & 1;
		tier_account(s->tiers[m->tier], (int64_t)total, nfiles);
		atomic_fetch_add(&s->tier_blobs[m->tier], 1);
		atomic_fetch_add(&s->place[m->tier].raw_bytes, blob_raw_bytes(m));
		atomic_fetch_add(&s->place[m->tier].stored_bytes, total);
		/* GDSF's inflation value is not stored: the largest base a blob
		 * took from its tier is the closest lower bound of it. */
		if (m->gdsf_base > s->place[m->tier].L)
			s->place[m->tier].L = m->gdsf_base;
		return 0;
	}
	if (rc->n_bad == rc->cap_bad) {
		size_t cap = rc->cap_bad ? rc->cap_bad * 2 : 64;
		struct bad_blob *b = realloc(rc->bad, cap * sizeof(*b));
		if (!b)
			return -ENOMEM;
		rc->bad = b;
		rc->cap_bad = cap;
	}
	rc->bad[rc->n_bad].id = m->id;
	rc->bad[rc->n_bad].tier = m->tier;
	rc->bad[rc->n_bad].parts = m->parts;
	rc->n_bad++;
	return 0;
}

/* Parses "<64 hex><known suffix>". Returns the part or -1. */
static int parse_part_name(const char *name, struct key *id)
{
	char hex[KEY_HEX_LEN + 1];

	if (strlen(name) < KEY_HEX_LEN)
		return -1;
	memcpy(hex, name, KEY_HEX_LEN);
	hex[KEY_HEX_LEN] = '\0';
	if (key_from_hex(hex, id))
		return -1;
	return blob_part_from_suffix(name + KEY_HEX_LEN);
}

struct scan_ctx {
	struct store *s;
	unsigned tier;
	char (*victims)[TIER_NAME_MAX + 1];
	size_t n, cap;
};

static int reconcile_scan_entry(void *ctx, const char *name, uint64_t size, int is_regular)
{
	struct scan_ctx *c = ctx;
	struct blob_meta m;
	struct key id;
	int part, keep = 0;

	if (strncmp(name, TIER_TMP_PREFIX, strlen(TIER_TMP_PREFIX)) != 0) {
		part = parse_part_name(name, &id);
		if (part < 0) {
			/* Not a name this daemon creates: never delete what is not ours. */
			klog(LOG_WARN, "event=reconcile_foreign_file tier=%u name=\"%s\" "
			     "action=kept hint=\"a tier directory should hold only kvtier's files\"",
			     c->tier, name);
			return 0;
		}
		keep = is_regular && index_get(c->s->ix, &id, &m, NULL, 0) == 0 &&
		       m.tier == c->tier && (m.parts & (1u << part)) && m.part_stored[part] == size;
	}
	if (keep)
		return 0;
	if (strlen(name) > TIER_NAME_MAX)
		return 0; /* not ours: never created by a tier */
	if (c->n == c->cap) {
		size_t cap = c->cap ? c->cap * 2 : 64;
		void *v = realloc(c->victims, cap * sizeof(*c->victims));
		if (!v)
			return -ENOMEM;
		c->victims = v;
		c->cap = cap;
	}
	snprintf(c->victims[c->n++], TIER_NAME_MAX + 1, "%s", name);
	return 0;
}

/* Staged names look like kvtier-<32 hex>.bin plus a sidecar suffix. */
static int is_stage_name(const char *name)
{
	size_t pre = strlen(STORE_STAGE_PREFIX);

	if (strncmp(name, TIER_OUT_TMP_PREFIX, sizeof(TIER_OUT_TMP_PREFIX) - 1) == 0)
		return 1;
	if (strncmp(name, STORE_STAGE_PREFIX, pre) != 0)
		return 0;
	for (size_t i = 0; i < 32; i++)
		if (!strchr("0123456789abcdef", name[pre + i]) || !name[pre + i])
			return 0;
	if (strncmp(name + pre + 32, ".bin", 4) != 0)
		return 0;
	return blob_part_from_suffix(name + pre + 36) >= 0;
}

static void remove_stale_stages(struct store *s);

static int reconcile(struct store *s, char *err, size_t errlen)
{
	struct reconcile_ctx rc = {.s = s};
	int r;

	r = index_list(s->ix, NULL, NULL, 0, reconcile_blob, &rc, NULL);
	if (r) {
		set_err(err, errlen, "reconcile: reading the index failed: %s", kvtier_strerror(r));
		goto out;
	}
	for (size_t i = 0; i < rc.n_bad; i++) {
		char hex[KEY_HEX_LEN + 1];
		struct blob_meta m;
		klog(LOG_WARN, "event=reconcile_drop_blob blob=%s reason=\"files missing, wrong size or tier gone\"",
		     key_hex(&rc.bad[i].id, hex));
		r = index_delete(s->ix, &rc.bad[i].id, &m);
		if (r && r != KVTIER_E_NOTFOUND) {
			set_err(err, errlen, "reconcile: dropping blob %s failed: %s", hex,
				kvtier_strerror(r));
			goto out;
		}
		s->reconcile_blobs++;
		/* Remaining files of that blob are orphans now: the scan removes them. */
	}
	for (unsigned t = 0; t < s->n_tiers; t++) {
		struct scan_ctx sc = {.s = s, .tier = t};
		r = tier_scan(s->tiers[t], reconcile_scan_entry, &sc);
		for (size_t i = 0; r == 0 && i < sc.n; i++) {
			klog(LOG_WARN, "event=reconcile_remove_file tier=%u name=%s", t, sc.victims[i]);
			if (tier_unlink_raw(s->tiers[t], sc.victims[i]) == 0)
				s->reconcile_files++;
		}
		free(sc.victims);
		if (r) {
			set_err(err, errlen, "reconcile: scanning tier %s failed: %s",
				tier_path(s->tiers[t]), kvtier_strerror(r));
			goto out;
		}
	}
	remove_stale_stages(s);
	r = 0;
out:
	free(rc.bad);
	return r;
}

/* Leases do not survive a restart: remove files staged by a previous run. */
static void remove_stale_stages(struct store *s)
{
	for (unsigned d = 0; d < s->cfg.n_slot_dirs; d++) {
		int fd = openat(s->slot_fd[d], ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		DIR *dir = fd >= 0 ? fdopendir(fd) : NULL;
		struct dirent *de;
		if (!dir) {
			if (fd >= 0)
				close(fd);
			continue;
		}
		while ((de = readdir(dir)))
			if (is_stage_name(de->d_name) && unlinkat(s->slot_fd[d], de->d_name, 0) == 0) {
				klog(LOG_INFO, "event=reconcile_remove_stale_stage dir=%s name=%s",
				     s->slot_real[d], de->d_name);
				s->reconcile_files++;
			}
		closedir(dir);
	}
}

/* ---- the clean-stop record: a start after a clean stop trusts the index ---- */

#define CLEAN_VERSION 1

struct clean_rec {
	uint32_t version;          /* CLEAN_VERSION; 0: the last stop was not clean */
	uint32_t n_tiers;
	char boot_id[40];          /* a reboot empties tmpfs tiers: reconcile then */
	uint64_t used[STORE_MAX_TIERS], files[STORE_MAX_TIERS], blobs[STORE_MAX_TIERS];
	uint64_t raw[STORE_MAX_TIERS], stored[STORE_MAX_TIERS];
	double base[STORE_MAX_TIERS];
};

static void read_boot_id(char *out, size_t cap)
{
	FILE *f = fopen("/proc/sys/kernel/random/boot_id", "re");

	out[0] = '\0';
	if (f) {
		if (!fgets(out, (int)cap, f))
			out[0] = '\0';
		fclose(f);
	}
	out[strcspn(out, "\n")] = '\0';
}

/* Reads and invalidates the record (a crash from now on must reconcile).
 * Returns 1 when the last stop was clean on this boot with these tiers and
 * the counters were restored from it. */
static int clean_start(struct store *s)
{
	struct clean_rec cr, none;
	char boot[40];
	size_t len = 0;
	int ok;

	ok = index_meta_get(s->ix, "clean", &cr, sizeof(cr), &len) == 0 && len == sizeof(cr) &&
	     cr.version == CLEAN_VERSION && cr.n_tiers == s->n_tiers;
	read_boot_id(boot, sizeof(boot));
	ok = ok && boot[0] && strncmp(boot, cr.boot_id, sizeof(cr.boot_id)) == 0;
	memset(&none, 0, sizeof(none));
	if (index_meta_put(s->ix, "clean", &none, sizeof(none)))
		return 0; /* cannot invalidate it: do not trust it either */
	if (!ok || s->cfg.verify_on_start)
		return 0;
	for (unsigned t = 0; t < s->n_tiers; t++) {
		tier_account(s->tiers[t], (int64_t)cr.used[t], (int)cr.files[t]);
		atomic_store(&s->tier_blobs[t], cr.blobs[t]);
		atomic_store(&s->place[t].raw_bytes, cr.raw[t]);
		atomic_store(&s->place[t].stored_bytes, cr.stored[t]);
		s->place[t].L = cr.base[t];
	}
	return 1;
}

/* After a clean stop (no writer open, background threads joined). */
static void clean_stop(struct store *s)
{
	struct clean_rec cr;
	size_t pending;

	pthread_mutex_lock(&s->rm_lock);
	pending = s->n_rm;
	pthread_mutex_unlock(&s->rm_lock);
	if (pending || atomic_load(&s->rm_overflow) || atomic_load(&s->files_missing)) {
		klog(LOG_WARN, "event=clean_stop_skipped files_missing=%d removals_pending=%zu "
		     "reason=\"%s\" next_start=checks_every_file",
		     atomic_load(&s->files_missing), pending,
		     pending || atomic_load(&s->rm_overflow)
			     ? "tier files of deleted blobs could not be removed"
			     : "blob files went missing while kvtierd ran");
		return;
	}
	memset(&cr, 0, sizeof(cr));
	cr.version = CLEAN_VERSION;
	cr.n_tiers = s->n_tiers;
	read_boot_id(cr.boot_id, sizeof(cr.boot_id));
	for (unsigned t = 0; t < s->n_tiers; t++) {
		struct tier_stats st;
		tier_get_stats(s->tiers[t], &st);
		if (st.reserved)
			return; /* a write still open: not clean */
		cr.used[t] = st.used;
		cr.files[t] = st.files;
		cr.blobs[t] = atomic_load(&s->tier_blobs[t]);
		cr.raw[t] = atomic_load(&s->place[t].raw_bytes);
		cr.stored[t] = atomic_load(&s->place[t].stored_bytes);
		cr.base[t] = s->place[t].L;
	}
	if (cr.boot_id[0] && index_meta_put(s->ix, "clean", &cr, sizeof(cr)) == 0)
		klog(LOG_INFO, "event=clean_stop_recorded");
}

/* ---- open / close ---- */

/* The tiers recorded by the previous start must still be there, at the same
 * index and path: blobs are recorded by tier index, so a reordered or moved
 * tier would make the reconcile drop them as missing. Tiers may be added at
 * the end, and capacities may change. */
static int check_tier_list(struct store *s, const char *now, char *err, size_t errlen)
{
	char old[STORE_MAX_TIERS * 4200];
	size_t len = 0;
	int rc = index_meta_get(s->ix, "tiers", old, sizeof(old) - 1, &len);

	if (rc == KVTIER_E_NOTFOUND)
		return 0; /* a new data directory */
	if (rc)
		return rc;
	old[len < sizeof(old) ? len : sizeof(old) - 1] = '\0';
	for (const char *o = old, *n = now; *o; ) {
		const char *oe = strchr(o, '\n'), *ne = strchr(n, '\n');
		unsigned oi, ni;
		char ok[16], nk[16], op[4096], np[4096];
		if (!oe)
			break;
		if (sscanf(o, "%u %15s %4095s", &oi, ok, op) != 3)
			break;
		if (!ne || sscanf(n, "%u %15s %4095s", &ni, nk, np) != 3) {
			set_err(err, errlen, "this data directory has tier %u (%s:%s), which is not in "
				"the configuration; give the same --tier options in the same order, "
				"adding new tiers only at the end", oi, ok, op);
			return KVTIER_E_INVALID;
		}
		if (strcmp(ok, nk) != 0 || strcmp(op, np) != 0) {
			set_err(err, errlen, "tier %u of this data directory is %s:%s, but the "
				"configuration gives %s:%s; blobs are recorded by tier, so give the same "
				"--tier options in the same order (or use a new --data directory)",
				oi, ok, op, nk, np);
			return KVTIER_E_INVALID;
		}
		o = oe + 1;
		n = ne + 1;
	}
	return 0;
}

/* Data, tier and slot directories must be distinct and not inside one
 * another: the reconcile removes files from tiers and slot directories. */
static int check_dirs_disjoint(struct store *s, char *err, size_t errlen)
{
	char paths[1 + STORE_MAX_TIERS + STORE_MAX_SLOT_DIRS][PATH_MAX];
	const char *what[1 + STORE_MAX_TIERS + STORE_MAX_SLOT_DIRS];
	unsigned n = 0;

	if (!realpath(s->cfg.data_dir, paths[n]))
		return 0; /* reported by the opener */
	what[n++] = "--data";
	for (unsigned t = 0; t < s->n_tiers; t++)
		if (realpath(tier_path(s->tiers[t]), paths[n]))
			what[n++] = "--tier";
	for (unsigned d = 0; d < s->cfg.n_slot_dirs; d++) {
		snprintf(paths[n], sizeof(paths[n]), "%s", s->slot_real[d]);
		what[n++] = "--slot-dir";
	}
	for (unsigned i = 0; i < n; i++)
		for (unsigned j = i + 1; j < n; j++) {
			size_t li = strlen(paths[i]), lj = strlen(paths[j]);
			size_t l = li < lj ? li : lj;
			if (strncmp(paths[i], paths[j], l) == 0 &&
			    (li == lj || paths[li < lj ? j : i][l] == '/')) {
				set_err(err, errlen, "%s %s and %s %s overlap: the data, tier and slot "
					"directories must be distinct and not inside one another",
					what[i], paths[i], what[j], paths[j]);
				return KVTIER_E_INVALID;
			}
		}
	return 0;
}

static int mkdir_p(const char *path, mode_t mode)
{
	char buf[PATH_MAX];
	size_t n = strlen(path);

	if (n == 0 || n >= sizeof(buf))
		return -ENAMETOOLONG;
	memcpy(buf, path, n + 1);
	for (char *p = buf + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = '\0';
		if (mkdir(buf, mode) && errno != EEXIST)
			return -errno;
		*p = '/';
	}
	if (mkdir(buf, mode) && errno != EEXIST)
		return -errno;
	return 0;
}

int store_open(const struct store_config *cfg, struct store **out, char *err, size_t errlen)
{
	struct store *s;
	int rc;
	char tiers_text[STORE_MAX_TIERS * 4200];
	size_t tl = 0;

	*out = NULL;
	if (cfg->n_tiers == 0 || cfg->n_tiers > STORE_MAX_TIERS) {
		set_err(err, errlen, "need 1 to %d tiers (--tier KIND:PATH:SIZE)", STORE_MAX_TIERS);
		return KVTIER_E_INVALID;
	}
	s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->cfg = *cfg;
	for (unsigned d = 0; d < STORE_MAX_SLOT_DIRS; d++)
		s->slot_fd[d] = -1;
	pthread_mutex_init(&s->commit_lock, NULL);
	pthread_mutex_init(&s->lease_lock, NULL);
	pthread_mutex_init(&s->touch_lock, NULL);
	pthread_mutex_init(&s->verified_lock, NULL);
	pthread_mutex_init(&s->ns_lock, NULL);
	pthread_mutex_init(&s->pin_lock, NULL);
	pthread_mutex_init(&s->model_lock, NULL);
	pthread_mutex_init(&s->move_lock, NULL);
	pthread_mutex_init(&s->bg_lock, NULL);
	pthread_mutex_init(&s->rm_lock, NULL);
	pthread_mutex_init(&s->dir_lock, NULL);
	pthread_cond_init(&s->bg_cond, NULL);
	pthread_cond_init(&s->placer_cond, NULL);
	if (!(s->cfg.high_watermark > 0 && s->cfg.high_watermark <= 1))
		s->cfg.high_watermark = 0.9;
	if (!(s->cfg.low_watermark > 0 && s->cfg.low_watermark < s->cfg.high_watermark))
		s->cfg.low_watermark = s->cfg.high_watermark * 0.8;
	/* Each tier's own pair, resolved once: a per-tier high below the global
	 * low would otherwise leave low >= high. */
	for (unsigned t = 0; t < s->cfg.n_tiers; t++) {
		struct store_tier_config *tc = &s->cfg.tiers[t];
		if (!(tc->high > 0 && tc->high <= 1))
			tc->high = s->cfg.high_watermark;
		if (!(tc->low > 0 && tc->low < 1))
			tc->low = s->cfg.low_watermark;
		if (tc->low >= tc->high) {
			klog(LOG_WARN, "event=watermarks_adjusted tier=%u high=%.3f low=%.3f new_low=%.3f "
			     "reason=\"low must be below high\"", t, tc->high, tc->low, tc->high * 0.8);
			tc->low = tc->high * 0.8;
		}
	}
	s->touch = calloc(STORE_TOUCH_MAX, sizeof(*s->touch));
	s->ns_counters = calloc(STORE_MAX_NS_COUNTERS, sizeof(*s->ns_counters));
	s->verified = calloc(STORE_VERIFIED_SLOTS, sizeof(*s->verified));
	if (!s->touch || !s->ns_counters || !s->verified) {
		rc = -ENOMEM;
		goto fail;
	}
	rc = mkdir_p(cfg->data_dir, 0700);
	if (rc) {
		set_err(err, errlen, "cannot create data directory %s: %s", cfg->data_dir,
			strerror(-rc));
		goto fail;
	}
	rc = index_open(cfg->data_dir, cfg->block_size, 0, cfg->map_size, &s->ix, err, errlen);
	if (rc)
		goto fail;
	s->block = index_block_size(s->ix);
	for (unsigned t = 0; t < cfg->n_tiers; t++) {
		const struct store_tier_config *tc = &cfg->tiers[t];
		struct tier_options to = {.io_mode = cfg->io_mode,
					  .queue_depth = cfg->io_depth,
					  .request_bytes = (size_t)cfg->io_request_bytes};
		rc = tier_open(tc->kind, tc->path, tc->capacity, &to, &s->tiers[t]);
		if (rc) {
			set_err(err, errlen, "cannot open tier %s:%s: %s", tc->kind, tc->path,
				kvtier_strerror(rc));
			goto fail;
		}
		s->n_tiers++;
		/* Recorded with its absolute path, so fsck works from any directory. */
		char abs[PATH_MAX];
		if (!realpath(tc->path, abs))
			snprintf(abs, sizeof(abs), "%s", tc->path);
		tl += (size_t)snprintf(tiers_text + tl, sizeof(tiers_text) - tl, "%u %s %s %llu\n", t,
				       tc->kind, abs, (unsigned long long)tc->capacity);
	}
	for (unsigned d = 0; d < cfg->n_slot_dirs; d++) {
		if (!realpath(cfg->slot_dirs[d], s->slot_real[d])) {
			rc = -errno;
			set_err(err, errlen, "slot directory %s: %s", cfg->slot_dirs[d],
				strerror(errno));
			goto fail;
		}
		s->slot_fd[d] = open(s->slot_real[d], O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		if (s->slot_fd[d] < 0) {
			rc = -errno;
			set_err(err, errlen, "slot directory %s: %s", cfg->slot_dirs[d],
				strerror(errno));
			goto fail;
		}
	}
	rc = check_dirs_disjoint(s, err, errlen);
	if (rc)
		goto fail;
	rc = check_tier_list(s, tiers_text, err, errlen);
	if (rc)
		goto fail;
	rc = index_meta_put(s->ix, "tiers", tiers_text, tl);
	if (rc) {
		set_err(err, errlen, "cannot record the tier list: %s", kvtier_strerror(rc));
		goto fail;
	}
	/* Models first: reconcile's tallies and the first pass use them. */
	placement_init(s);
	if (clean_start(s)) {
		/* Nothing was half-done at the last stop: the per-file check of
		 * every blob (seconds, and the whole index paged in, at 10^6
		 * blobs) is only needed after a crash or a reboot. */
		remove_stale_stages(s);
		klog(LOG_INFO, "event=start_after_clean_stop checked=stale_stages "
		     "hint=\"kvtier fsck, or --verify-on-start, checks every file\"");
	} else {
		rc = reconcile(s, err, errlen);
		if (rc)
			goto fail;
		klog(LOG_INFO, "event=reconciled removed_files=%llu dropped_blobs=%llu",
		     (unsigned long long)s->reconcile_files,
		     (unsigned long long)s->reconcile_blobs);
	}
	rc = pthread_create(&s->bg, NULL, bg_main, s);
	if (rc) {
		rc = -rc;
		set_err(err, errlen, "cannot start the background thread: %s", strerror(-rc));
		goto fail;
	}
	s->bg_started = 1;
	rc = pthread_create(&s->placer, NULL, placement_main, s);
	if (rc) {
		rc = -rc;
		set_err(err, errlen, "cannot start the placement thread: %s", strerror(-rc));
		goto fail;
	}
	s->placer_started = 1;
	s->opened = 1;
	*out = s;
	return 0;
fail:
	store_close(s);
	return rc;
}

void store_close(struct store *s)
{
	if (!s)
		return;
	atomic_store(&s->stopping, 1);
	if (s->bg_started) {
		pthread_mutex_lock(&s->bg_lock);
		s->bg_stop = 1;
		pthread_cond_signal(&s->bg_cond);
		pthread_cond_signal(&s->placer_cond);
		pthread_mutex_unlock(&s->bg_lock);
		pthread_join(s->bg, NULL);
		if (s->placer_started)
			pthread_join(s->placer, NULL);
	}
	if (s->ix) {
		leases_expire(s, 1);
		touch_flush(s);
		if (s->opened) {
			retry_removals(s);
			clean_stop(s);
		}
	}
	for (unsigned d = 0; d < STORE_MAX_SLOT_DIRS; d++)
		if (s->slot_fd[d] >= 0)
			close(s->slot_fd[d]);
	for (unsigned t = 0; t < s->n_tiers; t++)
		tier_close(s->tiers[t]);
	index_close(s->ix);
	free(s->touch);
	free(s->ns_counters);
	free(s->verified);
	pthread_mutex_destroy(&s->commit_lock);
	pthread_mutex_destroy(&s->lease_lock);
	pthread_mutex_destroy(&s->touch_lock);
	pthread_mutex_destroy(&s->verified_lock);
	pthread_mutex_destroy(&s->ns_lock);
	pthread_mutex_destroy(&s->pin_lock);
	pthread_mutex_destroy(&s->model_lock);
	pthread_mutex_destroy(&s->move_lock);
	pthread_mutex_destroy(&s->bg_lock);
	pthread_mutex_destroy(&s->rm_lock);
	pthread_mutex_destroy(&s->dir_lock);
	free(s->rm);
	pthread_cond_destroy(&s->bg_cond);
	pthread_cond_destroy(&s->placer_cond);
	free(s->pins);
	free(s);
}

uint32_t store_block_size(const struct store *s)
{
	return s->block;
}

const struct store_config *store_config(const struct store *s)
{
	return &s->cfg;
}

/* ---- put ---- */

int store_put_begin(struct store *s, const char *ns, unsigned n_parts, uint64_t reported_size,
		    struct store_put **out, char *err, size_t errlen)
{
	struct store_put *p;
	int rc = store_ns_valid(ns, err, errlen);

	*out = NULL;
	if (rc)
		return rc;
	if (n_parts < 1 || n_parts > PART_COUNT) {
		set_err(err, errlen, "a put has 1 to %d parts (the slot file and its sidecars); "
			"the first message announced %u", PART_COUNT, n_parts);
		return KVTIER_E_INVALID;
	}
	p = calloc(1, sizeof(*p));
	if (!p)
		return -ENOMEM;
	p->s = s;
	p->cur = -1;
	p->crc_known = 1;
	p->n_parts = n_parts;
	p->reported_size = reported_size;
	snprintf(p->ns, sizeof(p->ns), "%s", ns);
	*out = p;
	return 0;
}

static struct store *s_of(struct store_put *p)
{
	return p->s;
}

/* The slot file must have the size its server reported (when it reported
 * one): llama-server writes slot files in place and does not fsync them, so
 * a crash leaves a shorter file whose header still parses. */
static int put_check_reported(const struct store_put *p, uint64_t size, char *err,
			      size_t errlen)
{
	if (!p->reported_size || size == p->reported_size)
		return 0;
	set_err(err, errlen,
		"slot file of %llu bytes, but the server reported %llu bytes for it: a save cut "
		"short (llama-server writes slot files in place, without fsync) or a file "
		"changed since; nothing was stored, save the slot again",
		(unsigned long long)size, (unsigned long long)p->reported_size);
	return KVTIER_E_INVALID;
}

/* Bytes on tier t held by pinned blobs (open Fetches, staged leases), and
 * how many such blobs. */
static uint64_t pinned_bytes(struct store *s, unsigned t, size_t *n)
{
	struct key *ids = NULL;
	size_t k = 0;
	uint64_t bytes = 0;

	*n = 0;
	pthread_mutex_lock(&s->pin_lock);
	if (s->n_pins && (ids = malloc(s->n_pins * sizeof(*ids))) != NULL)
		for (k = 0; k < s->n_pins; k++)
			ids[k] = s->pins[k].id;
	pthread_mutex_unlock(&s->pin_lock);
	for (size_t i = 0; i < k; i++) {
		struct blob_meta m;
		if (index_get(s->ix, &ids[i], &m, NULL, 0) == 0 && m.tier == t) {
			bytes += m.stored_size;
			(*n)++;
		}
	}
	free(ids);
	return bytes;
}

/* The refusal of a part that tier t has no room for: what holds the space
 * (uploads in progress, pinned blobs, files whose removal failed, other
 * blobs) and what a person can do about each. */
static int tier_full_msg(struct store *s, unsigned t, uint64_t need, char *err, size_t errlen)
{
	struct tier_stats st;
	char held[768];
	size_t n_pinned, n_rm, hl = 0;
	uint64_t pinned, rm_bytes, other;

	tier_get_stats(s->tiers[t], &st);
	pinned = pinned_bytes(s, t, &n_pinned);
	n_rm = store_pending_removals(s, &rm_bytes);
	other = st.used > pinned + rm_bytes ? st.used - pinned - rm_bytes : 0;
	held[0] = '\0';
#define HELD(...) (hl += (size_t)snprintf(held + hl, hl < sizeof(held) ? sizeof(held) - hl : 0, \
					  __VA_ARGS__))
	if (st.reserved)
		HELD("; %llu bytes are reserved by uploads in progress (freed when they finish: "
		     "retry in a moment)", (unsigned long long)st.reserved);
	if (pinned)
		HELD("; %llu bytes are %zu blobs pinned by Fetches in progress or staged leases "
		     "(they can move once released: kvtier release, or when the lease expires)",
		     (unsigned long long)pinned, n_pinned);
	if (n_rm)
		HELD("; %llu bytes are %zu files of deleted blobs whose removal failed (see "
		     "event=remove_failed in the log: fix the tier's file system)",
		     (unsigned long long)rm_bytes, n_rm);
	if (other)
		HELD("; %llu bytes are unpinned blobs (evicted or moved down only when that makes "
		     "enough room; delete some with kvtier rm)", (unsigned long long)other);
#undef HELD
	set_err(err, errlen,
		"tier %u (%s:%s) is full: no room for this blob part of %llu bytes, %llu of %llu "
		"bytes in use%s; or raise the tier's capacity (--tier)",
		t, tier_kind(s->tiers[t]), tier_path(s->tiers[t]), (unsigned long long)need,
		(unsigned long long)(st.used + st.reserved), (unsigned long long)st.capacity, held);
	return KVTIER_E_FULL;
}

/* Why a file could not be created on tier 0, said so a person can act:
 * a removed tier directory (reopened here when it was recreated: then the
 * open is tried once more), a read-only file system, or the error. */
static int put_open_failed(struct store_put *p, int part, uint64_t size, int rc, char *err,
			   size_t errlen)
{
	struct store *s = p->s;
	char why[1024];
	int st;

	if (rc == -ENOENT || rc == -ESTALE) {
		st = store_tier_check(s, 0, why, sizeof(why));
		if (st == TIER_DIR_REOPENED || st == TIER_DIR_OK)
			rc = tier_writer_open(s->tiers[0], size, &p->w[part]);
		if (rc && st == TIER_DIR_REMOVED) {
			set_err(err, errlen, "cannot store on tier 0: its %s; nothing was stored", why);
			return -ESTALE;
		}
		if (!rc)
			return 0;
	}
	if (rc == -EROFS) {
		set_err(err, errlen, "cannot create a file on tier 0 (%s:%s): its file system is "
			"read-only (mounted or remounted read-only, perhaps after I/O errors); "
			"remount it read-write; nothing was stored",
			tier_kind(s->tiers[0]), tier_path(s->tiers[0]));
		return rc;
	}
	set_err(err, errlen, "cannot create a file on tier 0 (%s): %s", tier_path(s->tiers[0]),
		kvtier_strerror(rc));
	return rc;
}

/* Refuses a part that cannot fit on tier 0 even with every other blob gone:
 * uploads land on tier 0 only (placement moves blobs down later), so no
 * eviction or demotion could make room for it, and none is tried. `held` is
 * what the same blob's earlier parts already take on tier 0; `what` names
 * the file for the message. Returns 0 or KVTIER_E_INVALID. */
static int put_check_fits(struct store *s, const char *what, uint64_t held, uint64_t size,
			  char *err, size_t errlen)
{
	struct tier_stats st;

	tier_get_stats(s->tiers[0], &st);
	if (size <= st.capacity && held <= st.capacity - size)
		return 0;
	set_err(err, errlen,
		"oversized: %s has %llu bytes%s, more than tier 0 (%s:%s) holds even when empty "
		"(%llu bytes); uploads land on tier 0 only, so nothing was evicted or stored: "
		"raise tier 0's size (--tier %s:%s:SIZE), or lower --max-blob-size (now %llu) "
		"to refuse such files up front",
		what, (unsigned long long)size, held ? " (with the blob's other parts)" : "",
		tier_kind(s->tiers[0]), tier_path(s->tiers[0]), (unsigned long long)st.capacity,
		tier_kind(s->tiers[0]), tier_path(s->tiers[0]),
		(unsigned long long)s->cfg.max_blob_bytes);
	klog(LOG_INFO, "event=put_oversized tier=0 size=%llu held=%llu capacity=%llu",
	     (unsigned long long)size, (unsigned long long)held, (unsigned long long)st.capacity);
	return KVTIER_E_INVALID;
}

static uint64_t put_held(const struct store_put *p)
{
	uint64_t held = 0;

	for (int i = 0; i < PART_COUNT; i++)
		if (p->parts & (1u << i))
			held += p->size[i];
	return held;
}

int store_put_part(struct store_put *p, int part, uint64_t size, char *err, size_t errlen)
{
	struct store *s = p->s;
	int rc;

	if (part < 0 || part >= PART_COUNT) {
		set_err(err, errlen, "unknown blob part");
		return KVTIER_E_INVALID;
	}
	if (p->parts & (1u << part)) {
		set_err(err, errlen, "part \"%s\" sent twice", blob_part_suffix[part]);
		return KVTIER_E_INVALID;
	}
	if (part != PART_MAIN && !(p->parts & 1u)) {
		set_err(err, errlen, "the slot file (part \"\") must come before its sidecars");
		return KVTIER_E_INVALID;
	}
	if (p->cur >= 0 && p->written[p->cur] != p->size[p->cur]) {
		set_err(err, errlen, "truncated upload: part \"%s\" got %llu of %llu bytes",
			blob_part_suffix[p->cur], (unsigned long long)p->written[p->cur],
			(unsigned long long)p->size[p->cur]);
		return KVTIER_E_INVALID;
	}
	if (s->cfg.max_blob_bytes && size > s->cfg.max_blob_bytes) {
		set_err(err, errlen, "oversized: part \"%s\" of %llu bytes exceeds the limit of %llu "
			"(--max-blob-size)", blob_part_suffix[part], (unsigned long long)size,
			(unsigned long long)s->cfg.max_blob_bytes);
		return KVTIER_E_INVALID;
	}
	if (part == PART_MAIN && (rc = put_check_reported(p, size, err, errlen)) != 0)
		return rc;
	{
		char what[64];
		if (part == PART_MAIN)
			snprintf(what, sizeof(what), "the slot file");
		else
			snprintf(what, sizeof(what), "sidecar \"%s\"", blob_part_suffix[part]);
		if ((rc = put_check_fits(s, what, put_held(p), size, err, errlen)) != 0)
			return rc;
	}
	/* Room first where the file system is known to hold less than the
	 * tier's capacity (after an ENOSPC): the reservation alone would pass. */
	{
		struct tier_stats st;
		tier_get_stats(s->tiers[0], &st);
		if (st.used + st.reserved + size > placement_capacity(s, 0))
			placement_make_room(s, 0, size);
	}
	rc = tier_writer_open(s->tiers[0], size, &p->w[part]);
	if (rc == KVTIER_E_FULL && placement_make_room(s, 0, size) == 0)
		rc = tier_writer_open(s->tiers[0], size, &p->w[part]);
	if (rc == KVTIER_E_FULL)
		return tier_full_msg(s, 0, size, err, errlen);
	if (rc)
		rc = put_open_failed(p, part, size, rc, err, errlen);
	if (rc)
		return rc;
	p->parts |= 1u << part;
	p->size[part] = size;
	p->cur = part;
	return 0;
}

/* The fixed header of the slot file, as soon as its 12 bytes are in: the
 * same rule (slot_check_header) as the full parse at finish, which it only
 * fails earlier. */
static int put_check_head(struct store_put *p, char *err, size_t errlen)
{
	uint8_t h[SLOT_HEADER_BYTES];
	struct slot_info info;
	int rc = tier_writer_pread(p->w[PART_MAIN], h, sizeof(h), 0);

	if (rc) {
		set_err(err, errlen, "reading back the slot header failed: %s", kvtier_strerror(rc));
		return rc;
	}
	return slot_check_header(h, p->size[PART_MAIN], &info, err, errlen);
}

int store_put_write(struct store_put *p, const void *buf, size_t len, char *err, size_t errlen)
{
	int part = p->cur, rc;

	if (part < 0) {
		set_err(err, errlen, "data before any part header");
		return KVTIER_E_INVALID;
	}
	if (len > p->size[part] - p->written[part]) {
		set_err(err, errlen, "part \"%s\" has more bytes than the %llu announced",
			blob_part_suffix[part], (unsigned long long)p->size[part]);
		return KVTIER_E_INVALID;
	}
	p->crc[part] = crc32c(p->crc[part], buf, len);
	rc = tier_writer_write(p->w[part], buf, len);
	int evicted = 0;
	if (rc == -ENOSPC) {
		/* The file system is smaller than the configured capacity:
		 * make room and try once more. */
		placement_note_enospc(s_of(p), 0);
		evicted = placement_make_room(s_of(p), 0, p->size[part] - p->written[part]) == 0;
		if (evicted && tier_writer_can_retry(p->w[part]))
			rc = tier_writer_write(p->w[part], buf, len);
	}
	if (rc == -ENOSPC) {
		set_err(err, errlen, "tier 0 (%s) ran out of space on its file system before its "
			"configured capacity; %s; set --tier to a capacity the file system can hold",
			tier_path(p->s->tiers[0]),
			evicted ? "blobs were evicted to make room: retry the upload"
				: "nothing could be evicted (the tier's blobs are pinned, or the "
				  "space is taken by uploads in progress or by other files on that "
				  "file system): free space there, then retry");
		return KVTIER_E_FULL;
	}
	if (rc) {
		set_err(err, errlen, "writing part \"%s\" to tier 0 failed: %s",
			blob_part_suffix[part], kvtier_strerror(rc));
		return rc;
	}
	uint64_t before = p->written[part];
	p->written[part] += len;
	/* Refuse a bad slot file as soon as its first 12 bytes are in, instead of
	 * after the client has streamed gigabytes. */
	if (part == PART_MAIN && before < SLOT_HEADER_BYTES &&
	    p->written[part] >= SLOT_HEADER_BYTES)
		return put_check_head(p, err, errlen);
	return 0;
}

void store_put_abort(struct store_put *p)
{
	if (!p)
		return;
	for (int i = 0; i < PART_COUNT; i++)
		if (p->w[i])
			tier_writer_abort(p->w[i]);
	free(p);
}

static int writer_read(void *ctx, void *buf, size_t len, uint64_t off)
{
	return tier_writer_pread(ctx, buf, len, off);
}

/* CRC of a part written by link or copy (adopt): read it back. */
static int writer_crc(struct tier_writer *w, uint64_t size, uint32_t *crc)
{
	size_t bufsz = 1u << 20;
	uint8_t *buf = malloc(bufsz);
	uint64_t off = 0;
	int rc = 0;

	if (!buf)
		return -ENOMEM;
	*crc = 0;
	while (off < size) {
		size_t n = size - off < bufsz ? (size_t)(size - off) : bufsz;
		rc = tier_writer_pread(w, buf, n, off);
		if (rc)
			break;
		*crc = crc32c(*crc, buf, n);
		off += n;
	}
	free(buf);
	return rc;
}

static void remove_parts(struct store *s, unsigned tier, const struct key *id, uint32_t parts,
			 const uint64_t *stored);
static void verified_remember_put(struct store *s, const struct blob_meta *m);

void store_remove_parts(struct store *s, unsigned tier, const struct blob_meta *m)
{
	remove_parts(s, tier, &m->id, m->parts, m->part_stored);
	atomic_fetch_sub(&s->place[tier].raw_bytes, blob_raw_bytes(m));
	atomic_fetch_sub(&s->place[tier].stored_bytes, m->stored_size);
}

/* Keeps a file whose unlink failed for retry_removals. Its bytes stay
 * accounted on the tier (they still take room there); what no list can
 * hold is left to the next start's reconcile (no clean stop is recorded). */
static void remove_later(struct store *s, unsigned tier, const struct key *id, int part,
			 uint64_t size, const char *name, int err)
{
	int kept = 0;

	atomic_fetch_add(&s->remove_failures, 1);
	pthread_mutex_lock(&s->rm_lock);
	if (s->n_rm == s->cap_rm && s->cap_rm < STORE_MAX_PENDING_RM) {
		size_t cap = s->cap_rm ? s->cap_rm * 2 : 64;
		struct pending_rm *v = realloc(s->rm, cap * sizeof(*v));
		if (v) {
			s->rm = v;
			s->cap_rm = cap;
		}
	}
	if (s->n_rm < s->cap_rm) {
		s->rm[s->n_rm].id = *id;
		s->rm[s->n_rm].tier = tier;
		s->rm[s->n_rm].part = part;
		s->rm[s->n_rm].size = size;
		s->n_rm++;
		kept = 1;
	}
	pthread_mutex_unlock(&s->rm_lock);
	if (!kept)
		atomic_store(&s->rm_overflow, 1);
	klog(LOG_WARN, "event=remove_failed tier=%u name=%s err=\"%s\" action=%s "
	     "hint=\"the file keeps its %llu bytes on the tier until it can be removed; check "
	     "the tier's file system (read-only? I/O errors?)\"",
	     tier, name, kvtier_strerror(err), kept ? "retry_every_second" : "next_start",
	     (unsigned long long)size);
}

void store_remove_file(struct store *s, unsigned tier, const struct key *id, int part,
		       uint64_t stored)
{
	char name[KEY_HEX_LEN + 32];
	int rc;

	part_name(id, part, name, sizeof(name));
	rc = tier_remove(s->tiers[tier], name);
	if (rc == KVTIER_E_NOTFOUND) {
		/* Gone already (removed by hand, or with its directory): what
		 * was counted for it goes too. */
		tier_account(s->tiers[tier], -(int64_t)stored, -1);
		atomic_store(&s->files_missing, 1);
		klog(LOG_WARN, "event=file_missing tier=%u name=%s action=accounted_out", tier, name);
	} else if (rc) {
		remove_later(s, tier, id, part, stored, name, rc);
	}
}

static void remove_parts(struct store *s, unsigned tier, const struct key *id, uint32_t parts,
			 const uint64_t *stored)
{
	/* The blob has left the index, whatever happens to its files. */
	if (parts & (1u << PART_MAIN))
		atomic_fetch_sub(&s->tier_blobs[tier], 1);
	for (int p = 0; p < PART_COUNT; p++)
		if (parts & (1u << p))
			store_remove_file(s, tier, id, p, stored[p]);
}

/* Retries the removals that failed (every second, and at stop). A name the
 * index uses again (the same blob stored anew) is no longer ours to remove. */
static void retry_removals(struct store *s)
{
	struct pending_rm *v = NULL;
	size_t n, keep = 0;

	pthread_mutex_lock(&s->rm_lock);
	n = s->n_rm;
	if (n && (v = malloc(n * sizeof(*v))) != NULL) {
		memcpy(v, s->rm, n * sizeof(*v));
		s->n_rm = 0;
	}
	pthread_mutex_unlock(&s->rm_lock);
	if (!v)
		return;
	for (size_t i = 0; i < n; i++) {
		struct pending_rm *r = &v[i];
		struct blob_meta m;
		char name[KEY_HEX_LEN + 32];
		int rc;
		part_name(&r->id, r->part, name, sizeof(name));
		pthread_mutex_lock(&s->commit_lock);
		if (index_get(s->ix, &r->id, &m, NULL, 0) == 0 && m.tier == r->tier &&
		    (m.parts & (1u << r->part)))
			rc = KVTIER_E_EXISTS;
		else
			rc = tier_remove(s->tiers[r->tier], name);
		if (rc == KVTIER_E_NOTFOUND)
			tier_account(s->tiers[r->tier], -(int64_t)r->size, -1);
		pthread_mutex_unlock(&s->commit_lock);
		if (rc == 0 || rc == KVTIER_E_NOTFOUND || rc == KVTIER_E_EXISTS)
			klog(LOG_INFO, "event=remove_retried tier=%u name=%s result=%s", r->tier, name,
			     rc == 0 ? "removed" : rc == KVTIER_E_NOTFOUND ? "gone" : "in_use_again");
		else
			v[keep++] = *r;
	}
	pthread_mutex_lock(&s->rm_lock);
	for (size_t i = 0; i < keep; i++) {
		if (s->n_rm == s->cap_rm) {
			atomic_store(&s->rm_overflow, 1); /* cannot happen: the list only shrank */
			break;
		}
		s->rm[s->n_rm++] = v[i];
	}
	pthread_mutex_unlock(&s->rm_lock);
	free(v);
}

size_t store_pending_removals(struct store *s, uint64_t *bytes)
{
	size_t n;

	*bytes = 0;
	pthread_mutex_lock(&s->rm_lock);
	n = s->n_rm;
	for (size_t i = 0; i < n; i++)
		*bytes += s->rm[i].size;
	pthread_mutex_unlock(&s->rm_lock);
	return n;
}

/* ---- tier directories removed or replaced while running ---- */

struct missing_ctx {
	struct store *s;
	unsigned tier;
	struct key *ids;
	size_t n, cap;
};

/* 1 when a part of m is missing from its tier. */
static int blob_files_missing(struct store *s, const struct blob_meta *m)
{
	char name[KEY_HEX_LEN + 32];

	for (int p = 0; p < PART_COUNT; p++) {
		uint64_t size;
		if (!(m->parts & (1u << p)))
			continue;
		part_name(&m->id, p, name, sizeof(name));
		if (tier_stat(s->tiers[m->tier], name, &size) == KVTIER_E_NOTFOUND)
			return 1;
	}
	return 0;
}

static int missing_blob(void *ctx, const struct blob_meta *m, const char *ns)
{
	struct missing_ctx *c = ctx;

	(void)ns;
	if (m->tier != c->tier || !blob_files_missing(c->s, m))
		return 0;
	if (c->n == c->cap) {
		size_t cap = c->cap ? c->cap * 2 : 64;
		struct key *v = realloc(c->ids, cap * sizeof(*v));
		if (!v)
			return -ENOMEM;
		c->ids = v;
		c->cap = cap;
	}
	c->ids[c->n++] = m->id;
	return 0;
}

/* Drops the records of tier t's blobs whose files are gone, so Lookup stops
 * offering them and the tier's usage stops counting them. */
static void drop_missing_blobs(struct store *s, unsigned t, const char *reason)
{
	struct missing_ctx c = {.s = s, .tier = t};
	size_t dropped = 0;
	int rc;

	rc = index_list(s->ix, NULL, NULL, 0, missing_blob, &c, NULL);
	for (size_t i = 0; i < c.n; i++) {
		struct blob_meta m;
		char hex[KEY_HEX_LEN + 1];
		int gone = 0;
		pthread_mutex_lock(&s->commit_lock);
		if (index_get(s->ix, &c.ids[i], &m, NULL, 0) == 0 && m.tier == t &&
		    blob_files_missing(s, &m) && index_delete(s->ix, &c.ids[i], &m) == 0) {
			store_remove_parts(s, t, &m);
			gone = 1;
		}
		pthread_mutex_unlock(&s->commit_lock);
		if (gone) {
			dropped++;
			atomic_fetch_add(&s->missing_dropped, 1);
			klog(LOG_WARN, "event=drop_missing_blob blob=%s tier=%u reason=\"%s\"",
			     key_hex(&m.id, hex), t, reason);
		}
	}
	if (rc)
		klog(LOG_WARN, "event=drop_missing_failed tier=%u err=\"%s\" hint=\"restart "
		     "kvtierd: the start checks every file\"", t, kvtier_strerror(rc));
	if (dropped || rc)
		atomic_store(&s->files_missing, 1);
	klog(dropped ? LOG_WARN : LOG_INFO, "event=tier_files_checked tier=%u dropped_blobs=%zu",
	     t, dropped);
	free(c.ids);
}

int store_tier_check(struct store *s, unsigned t, char *why, size_t whylen)
{
	char msg[1024];
	int st, was;

	pthread_mutex_lock(&s->dir_lock);
	msg[0] = '\0';
	st = tier_dir_check(s->tiers[t], msg, sizeof(msg));
	was = atomic_load(&s->dir_state[t]);
	if (st < 0) {
		klog(LOG_WARN, "event=tier_dir_check_failed tier=%u path=%s err=\"%s\"", t,
		     tier_path(s->tiers[t]), kvtier_strerror(st));
		goto out;
	}
	if (st != was && st != TIER_DIR_OK && st != TIER_DIR_REOPENED) {
		atomic_fetch_add(&s->dir_events[t], 1);
		klog(LOG_WARN, "event=%s tier=%u path=%s reason=\"%s\"",
		     st == TIER_DIR_REMOVED ? "tier_dir_removed" : "tier_dir_moved", t,
		     tier_path(s->tiers[t]), msg);
	}
	if (st == TIER_DIR_REOPENED) {
		if (was != TIER_DIR_REMOVED)
			atomic_fetch_add(&s->dir_events[t], 1);
		klog(LOG_WARN, "event=tier_dir_reopened tier=%u path=%s", t, tier_path(s->tiers[t]));
	} else if (st == TIER_DIR_OK && was == TIER_DIR_MOVED) {
		klog(LOG_INFO, "event=tier_dir_back tier=%u path=%s", t, tier_path(s->tiers[t]));
	}
	/* The files of a removed directory are gone with it: drop their records
	 * once when the removal is seen, and after a reopen (a removal and a
	 * recreation between two checks). */
	if ((st == TIER_DIR_REMOVED && was != TIER_DIR_REMOVED) || st == TIER_DIR_REOPENED)
		drop_missing_blobs(s, t, "tier directory removed");
	atomic_store(&s->dir_state[t], st == TIER_DIR_REOPENED ? TIER_DIR_OK : st);
out:
	pthread_mutex_unlock(&s->dir_lock);
	if (why && whylen)
		snprintf(why, whylen, "%s", msg);
	return st;
}

int store_put_finish(struct store_put *p, struct store_put_result *res, char *err,
		     size_t errlen)
{
	struct store *s = p->s;
	struct slot_info info;
	int32_t *tokens = NULL;
	struct key *chain = NULL, h0;
	struct index_put_result *ipr = NULL;
	struct blob_meta meta;
	char hex[KEY_HEX_LEN + 1];
	uint32_t committed = 0;
	int rc, locked = 0;

	memset(res, 0, sizeof(*res));
	if (!(p->parts & 1u)) {
		set_err(err, errlen, "empty upload: no slot file was sent");
		rc = KVTIER_E_INVALID;
		goto out;
	}
	if ((unsigned)__builtin_popcount(p->parts) != p->n_parts) {
		set_err(err, errlen, "truncated upload: %d of the %u announced parts arrived",
			__builtin_popcount(p->parts), p->n_parts);
		rc = KVTIER_E_INVALID;
		goto out;
	}
	for (int i = 0; i < PART_COUNT; i++) {
		if (!(p->parts & (1u << i)))
			continue;
		if (p->written[i] != p->size[i]) {
			set_err(err, errlen, "truncated upload: part \"%s\" got %llu of %llu bytes",
				blob_part_suffix[i], (unsigned long long)p->written[i],
				(unsigned long long)p->size[i]);
			rc = KVTIER_E_INVALID;
			goto out;
		}
		if (!p->crc_known) {
			rc = writer_crc(p->w[i], p->size[i], &p->crc[i]);
			if (rc) {
				set_err(err, errlen, "reading back part \"%s\" failed: %s",
					blob_part_suffix[i], kvtier_strerror(rc));
				goto out;
			}
		}
	}
	rc = put_check_reported(p, p->size[PART_MAIN], err, errlen);
	if (rc)
		goto out;
	rc = slot_parse(writer_read, p->w[PART_MAIN], p->size[PART_MAIN], &info, &tokens, err,
			errlen);
	if (rc)
		goto out;
	if (info.n_tokens < s->block) {
		set_err(err, errlen,
			"slot file has %u tokens, fewer than one block of %u: no lookup could ever "
			"match it", info.n_tokens, s->block);
		rc = KVTIER_E_INVALID;
		goto out;
	}
	chain = malloc(((size_t)info.n_tokens / s->block) * sizeof(*chain));
	ipr = malloc(sizeof(*ipr));
	if (!chain || !ipr) {
		rc = -ENOMEM;
		goto out;
	}
	keys_root(p->ns, strlen(p->ns), &h0);
	keys_chain(&h0, tokens, info.n_tokens, s->block, chain);
	memset(&meta, 0, sizeof(meta)); /* index_put sets rec_version and last_key */
	keys_blob_id(&h0, chain, tokens, info.n_tokens, s->block, &meta.id);
	meta.n_tokens = info.n_tokens;
	meta.version = info.version;
	meta.flags = blob_flags_of_slot(&info);
	meta.tier = 0;
	meta.parts = p->parts;
	for (int i = 0; i < PART_COUNT; i++) {
		meta.part_size[i] = p->size[i];
		meta.part_stored[i] = p->size[i];
		meta.part_crc[i] = p->crc[i];
		meta.stored_size += p->size[i];
	}
	meta.ratio = 1;
	meta.compression = CODEC_RAW;
	meta.gdsf_base = placement_base(s, 0);
	meta.created_ms = meta.last_access_ms = now_ms();
	key_hex(&meta.id, hex);

	pthread_mutex_lock(&s->commit_lock);
	locked = 1;
	{
		struct blob_meta old;
		if (index_get(s->ix, &meta.id, &old, NULL, 0) == 0) {
			res->id = old.id;
			res->deduplicated = 1;
			res->n_tokens = old.n_tokens;
			res->tier = old.tier;
			atomic_fetch_add(&s->dedups, 1);
			klog(LOG_INFO, "event=put_dedup blob=%s ns=\"%s\"", hex, p->ns);
			rc = 0;
			goto out;
		}
	}
	/* Bytes first: sidecars, then the slot file, each renamed into place. */
	for (int i = PART_COUNT - 1; i >= 0; i--) {
		char name[KEY_HEX_LEN + 32];
		if (!(p->parts & (1u << i)))
			continue;
		part_name(&meta.id, i, name, sizeof(name));
		rc = tier_writer_commit(p->w[i], name);
		p->w[i] = NULL;
		if (rc) {
			set_err(err, errlen, "committing %s to tier 0 failed: %s", name,
				kvtier_strerror(rc));
			goto out;
		}
		committed |= 1u << i;
		if (i == PART_MAIN)
			atomic_fetch_add(&s->tier_blobs[0], 1);
	}
	/* Then metadata. */
	/* A blob supersedes the shorter ones it extends only where the server can
	 * restore a prefix of it: not a sliding-window, recurrent, hybrid or
	 * opaque state, whose shorter blob serves an edited next turn. */
	rc = index_put(s->ix, p->ns, info.has_layout ? info.layout : NULL,
		       info.has_layout ? info.layout_len : 0, &meta, tokens, chain,
		       s->cfg.supersede && slot_prefix_restorable(&info), ipr, err, errlen);
	if (rc)
		goto out;
	committed = 0; /* owned by the index now */
	verified_remember_put(s, &meta);
	res->id = meta.id;
	res->n_tokens = meta.n_tokens;
	res->tier = 0;
	res->deduplicated = ipr->deduplicated;
	for (size_t i = 0; i < ipr->n_superseded; i++) {
		const struct blob_meta *old = &ipr->superseded[i];
		char ohex[KEY_HEX_LEN + 1];
		store_remove_parts(s, old->tier, old);
		res->superseded[res->n_superseded++] = old->id;
		klog(LOG_INFO, "event=supersede blob=%s by=%s ns=\"%s\"", key_hex(&old->id, ohex),
		     hex, p->ns);
	}
	atomic_fetch_add(&s->place[0].raw_bytes, meta.stored_size);
	atomic_fetch_add(&s->place[0].stored_bytes, meta.stored_size);
	atomic_fetch_add(&s->supersessions, ipr->n_superseded);
	atomic_fetch_add(&s->puts, 1);
	if (info.state_kind < STORE_STATE_KINDS)
		atomic_fetch_add(&s->puts_state[info.state_kind], 1);
	atomic_fetch_add(&s->put_bytes, meta.stored_size);
	klog(LOG_INFO, "event=put blob=%s ns=\"%s\" tokens=%u bytes=%llu parts=%u superseded=%zu "
	     "version=%u state=%s token_form=%s media_cut=%d",
	     hex, p->ns, meta.n_tokens, (unsigned long long)meta.stored_size, meta.parts,
	     ipr->n_superseded, info.version, slot_state_kind_name(info.state_kind),
	     info.token_form == SLOT_TOKENS_PACKED ? "packed" : "plain",
	     (meta.flags & BLOB_F_MEDIA) != 0);
	rc = 0;
out:
	if (committed)
		remove_parts(s, 0, &meta.id, committed, meta.part_stored);
	if (locked)
		pthread_mutex_unlock(&s->commit_lock);
	if (rc == 0 && !res->deduplicated)
		placement_kick(s);
	if (rc)
		atomic_fetch_add(&s->refused, 1);
	free(tokens);
	free(chain);
	free(ipr);
	store_put_abort(p);
	return rc;
}

/* ---- adopt ---- */

/* Finds the slot dir that is the parent of path; fills base. Returns the
 * index or -1. */
static int slot_dir_of(struct store *s, const char *path, char *base, size_t cap)
{
	char parent[PATH_MAX], real[PATH_MAX];
	const char *slash = strrchr(path, '/');
	size_t plen;

	if (!slash || slash[1] == '\0')
		return -1;
	plen = (size_t)(slash - path);
	if (plen == 0 || plen >= sizeof(parent))
		return -1;
	memcpy(parent, path, plen);
	parent[plen] = '\0';
	if (!realpath(parent, real))
		return -1;
	snprintf(base, cap, "%s", slash + 1);
	for (unsigned d = 0; d < s->cfg.n_slot_dirs; d++)
		if (strcmp(real, s->slot_real[d]) == 0)
			return (int)d;
	return -1;
}

static int name_valid(const char *name)
{
	size_t n = strlen(name);

	if (n == 0 || n > 255 || name[0] == '.')
		return 0;
	for (size_t i = 0; i < n; i++)
		if ((unsigned char)name[i] < 0x20 || name[i] == '/' || name[i] == ':' ||
		    name[i] == 0x7f)
			return 0;
	return 1;
}

/* Why Adopt refused src (tier_writer_from_file said KVTIER_E_DENIED). */
static void adopt_denied_msg(struct store *s, int d, const char *src, const struct tier_take *take,
			     char *err, size_t errlen)
{
	if (take->uid != take->owner)
		set_err(err, errlen,
			"%s belongs to uid %u, not to uid %u, the owner of slot directory %s: "
			"adopt takes only files llama-server saved there (a link to another "
			"user's file is refused); use kvtier put to store a copy of a file "
			"you may read", src, (unsigned)take->uid, (unsigned)take->owner,
			s->slot_real[d]);
	else
		set_err(err, errlen,
			"%s has %lu names (hard links): another name could rewrite the stored "
			"bytes or belongs to someone else, so adopt takes only a file with a "
			"single name, as llama-server saves it; remove the other names, or use "
			"kvtier put to store a copy", src, take->nlink);
}

int store_adopt(struct store *s, const char *ns, const char *path, int keep_source,
		uint64_t reported_size, struct store_put_result *res, char *err, size_t errlen)
{
	struct store_put *p = NULL;
	struct tier_take take;
	struct stat dst;
	char base[512], src[PATH_MAX + 32];
	int d, rc;
	uint32_t present = 0;

	memset(res, 0, sizeof(*res));
	d = slot_dir_of(s, path ? path : "", base, sizeof(base));
	if (d < 0 || !name_valid(base)) {
		char echo[STORE_ECHO_BUF];
		set_err(err, errlen,
			"%s is not a file directly inside a slot directory of this daemon "
			"(--slot-dir); adopt only takes files llama-server saved there",
			store_echo(path, echo));
		return KVTIER_E_DENIED;
	}
	if (fstat(s->slot_fd[d], &dst)) {
		rc = -errno;
		set_err(err, errlen, "slot directory %s: %s", s->slot_real[d], strerror(errno));
		return rc;
	}
	/* Only what the slot directory's owner (llama-server) saved there, with
	 * no other name: a link to someone else's file is not ours to take. */
	take.force_copy = keep_source;
	take.sole = 1;
	take.owner = dst.st_uid;
	rc = store_put_begin(s, ns, PART_COUNT, reported_size, &p, err, errlen);
	if (rc)
		return rc;
	p->crc_known = 0;
	for (int i = 0; i < PART_COUNT; i++) {
		struct stat st;
		uint64_t size;
		snprintf(src, sizeof(src), "%s/%s%s", s->slot_real[d], base, blob_part_suffix[i]);
		if (fstatat(s->slot_fd[d], src + strlen(s->slot_real[d]) + 1, &st,
			    AT_SYMLINK_NOFOLLOW)) {
			if (errno == ENOENT && i != PART_MAIN)
				continue;
			rc = errno == ENOENT ? KVTIER_E_NOTFOUND : -errno;
			set_err(err, errlen, "%s: %s", src, strerror(errno));
			goto fail;
		}
		if (!S_ISREG(st.st_mode)) {
			set_err(err, errlen, "%s is not a regular file (symlinks are refused)", src);
			rc = KVTIER_E_DENIED;
			goto fail;
		}
		if (s->cfg.max_blob_bytes && (uint64_t)st.st_size > s->cfg.max_blob_bytes) {
			set_err(err, errlen, "oversized: %s has %lld bytes, limit %llu", src,
				(long long)st.st_size, (unsigned long long)s->cfg.max_blob_bytes);
			rc = KVTIER_E_INVALID;
			goto fail;
		}
		/* Before taking it (a copy across file systems can be long);
		 * store_put_finish checks the size taken again. */
		if (i == PART_MAIN &&
		    (rc = put_check_reported(p, (uint64_t)st.st_size, err, errlen)) != 0)
			goto fail;
		if ((rc = put_check_fits(s, src, put_held(p), (uint64_t)st.st_size, err,
					 errlen)) != 0)
			goto fail;
		rc = tier_writer_from_file(s->tiers[0], src, &take, &size, &p->w[i]);
		if (rc == KVTIER_E_FULL && placement_make_room(s, 0, (uint64_t)st.st_size) == 0)
			rc = tier_writer_from_file(s->tiers[0], src, &take, &size, &p->w[i]);
		if (rc == KVTIER_E_FULL) {
			rc = tier_full_msg(s, 0, (uint64_t)st.st_size, err, errlen);
			goto fail;
		}
		if (rc == KVTIER_E_DENIED) {
			adopt_denied_msg(s, d, src, &take, err, errlen);
			goto fail;
		}
		if (rc == 0 && take.copy_reason) {
			atomic_fetch_add(&s->adopt_copies, 1);
			klog(LOG_INFO, "event=adopt_copied name=%s reason=\"%s\"", src,
			     take.copy_reason);
		}
		if (rc) {
			set_err(err, errlen, "cannot take %s: %s", src, kvtier_strerror(rc));
			goto fail;
		}
		p->parts |= 1u << i;
		p->size[i] = p->written[i] = size;
		present |= 1u << i;
	}
	p->n_parts = (unsigned)__builtin_popcount(present); /* what the slot dir holds */
	rc = store_put_finish(p, res, err, errlen);
	p = NULL;
	if (rc)
		return rc;
	atomic_fetch_add(&s->adopts, 1);
	if (!keep_source)
		for (int i = 0; i < PART_COUNT; i++) {
			if (!(present & (1u << i)))
				continue;
			snprintf(src, sizeof(src), "%s%s", base, blob_part_suffix[i]);
			if (unlinkat(s->slot_fd[d], src, 0) && errno != ENOENT)
				klog(LOG_WARN, "event=adopt_unlink_failed name=%s errno=%d", src,
				     errno);
		}
	return 0;
fail:
	atomic_fetch_add(&s->refused, 1);
	store_put_abort(p);
	return rc;
}

/* ---- lookup, fetch ---- */

int store_lookup(struct store *s, const char *ns, const int32_t *tokens, size_t n,
		 struct store_match *out, char *err, size_t errlen)
{
	struct index_match m;
	int rc = store_ns_valid(ns, err, errlen);

	memset(out, 0, sizeof(*out));
	if (rc)
		return rc;
	if (n > SLOT_MAX_TOKENS) {
		set_err(err, errlen, "query of %zu tokens exceeds the limit of %u", n,
			SLOT_MAX_TOKENS);
		return KVTIER_E_INVALID;
	}
	/* The index hashes the query's blocks only as deep as the match goes. */
	rc = index_lookup_tokens(s->ix, ns, tokens, n, &m);
	if (rc) {
		set_err(err, errlen, "index lookup failed: %s", kvtier_strerror(rc));
		return rc;
	}
	atomic_fetch_add(&s->lookups, 1);
	ns_count(s, ns, m.found, m.found ? m.matched : 0);
	if (!m.found)
		return 0;
	atomic_fetch_add(&s->hits, 1);
	atomic_fetch_add(&s->matched_tokens, m.matched);
	out->found = 1;
	out->meta = m.meta;
	out->matched = m.matched;
	out->tier_kind = m.meta.tier < s->n_tiers ? tier_kind(s->tiers[m.meta.tier]) : "?";
	out->est_restore_s = placement_restore_s(s, m.meta.tier, blob_raw_bytes(&m.meta));
	{
		/* The model came with the lookup's own read of the namespace. */
		struct prefill_model pm;
		prefill_from_words(&pm, m.ns_pf);
		out->est_prefill_s = prefill_seconds(&pm, m.matched, s->cfg.assumed_prefill_tps);
	}
	touch_blob(s, &m.meta.id, m.meta.tier);
	return 0;
}

/* ---- reading parts (fetch, stage copies, migrations) ---- */

static ssize_t part_src_stored(void *ctx, void *buf, size_t len)
{
	struct part_src *src = ctx;
	ssize_t n = tier_reader_read(src->r, buf, len, src->stored_off);

	if (n > 0)
		src->stored_off += (uint64_t)n;
	return n;
}

int part_src_open(struct store *s, const struct blob_meta *m, int p, struct part_src *src)
{
	char name[KEY_HEX_LEN + 32];
	uint64_t size;
	int rc;

	memset(src, 0, sizeof(*src));
	part_name(&m->id, p, name, sizeof(name));
	rc = tier_reader_open(s->tiers[m->tier], name, &src->r, &size);
	if (rc)
		return rc;
	if (size != m->part_stored[p]) {
		part_src_close(src);
		return KVTIER_E_CORRUPT;
	}
	if (m->compression != CODEC_RAW) {
		rc = codec_dec_new((int)m->compression, m->part_size[p], part_src_stored, src,
				   &src->dec);
		if (rc) {
			part_src_close(src);
			return rc;
		}
	}
	return 0;
}

ssize_t part_src_read(struct part_src *src, void *buf, size_t len, uint64_t off)
{
	ssize_t n;

	if (!src->dec)
		return tier_reader_read(src->r, buf, len, off);
	/* An encoded part decodes in sequence only (the way everything reads). */
	if (off != src->pos)
		return KVTIER_E_INVALID;
	n = codec_dec_read(src->dec, buf, len);
	if (n > 0)
		src->pos += (uint64_t)n;
	return n;
}

void part_src_close(struct part_src *src)
{
	if (src->dec)
		codec_dec_free(src->dec);
	if (src->r)
		tier_reader_close(src->r);
	memset(src, 0, sizeof(*src));
}

int store_fetch_open(struct store *s, const struct key *id, struct store_fetch **out,
		     struct blob_meta *meta, char *err, size_t errlen)
{
	struct store_fetch *f;
	char hex[KEY_HEX_LEN + 1];
	double t0 = store_mono();
	int rc;

	*out = NULL;
	f = calloc(1, sizeof(*f));
	if (!f)
		return -ENOMEM;
	f->s = s;
	/* Pinned and the record read under commit_lock: a move or eviction
	 * either saw the pin (and left the blob alone) or had already switched
	 * the record to the new files before we read it. */
	pthread_mutex_lock(&s->commit_lock);
	store_pin(s, id);
	f->pinned = 1;
	f->meta.id = *id;
	rc = index_get(s->ix, id, meta, NULL, 0);
	pthread_mutex_unlock(&s->commit_lock);
	if (rc) {
		set_err(err, errlen, "no blob %s", key_hex(id, hex));
		store_fetch_close(f);
		return rc;
	}
	if (meta->tier >= s->n_tiers) {
		set_err(err, errlen, "blob %s is on tier %u, which is not configured",
			key_hex(id, hex), meta->tier);
		store_fetch_close(f);
		return KVTIER_E_INTERNAL;
	}
	f->meta = *meta;
	for (int p = 0; p < PART_COUNT; p++) {
		if (!(meta->parts & (1u << p)))
			continue;
		rc = part_src_open(s, meta, p, &f->src[p]);
		if (rc == KVTIER_E_NOTFOUND) {
			/* Deleted or superseded meanwhile is a miss; a file missing
			 * under a record that still names it is damage. */
			struct blob_meta now;
			rc = index_get(s->ix, id, &now, NULL, 0) == 0 && now.tier == meta->tier
				     ? KVTIER_E_CORRUPT
				     : KVTIER_E_NOTFOUND;
		}
		if (rc == KVTIER_E_CORRUPT) {
			/* The next start must check every file; and a removed tier
			 * directory is reported (and its records dropped) now. */
			char why[1024];
			atomic_store(&s->files_missing, 1);
			if (store_tier_check(s, meta->tier, why, sizeof(why)) == TIER_DIR_REMOVED) {
				set_err(err, errlen, "blob %s is lost: tier %u's %s", key_hex(id, hex),
					meta->tier, why);
				store_fetch_close(f);
				return -ESTALE;
			}
		}
		if (rc) {
			char name[KEY_HEX_LEN + 32];
			part_name(id, p, name, sizeof(name));
			set_err(err, errlen,
				"blob %s: file %s on tier %u is missing or has the wrong size (%s); "
				"run kvtier fsck", key_hex(id, hex), name, meta->tier,
				kvtier_strerror(rc));
			store_fetch_close(f);
			return rc;
		}
	}
	f->io_s = store_mono() - t0;
	f->opened = 1;
	atomic_fetch_add(&s->fetches, 1);
	touch_blob(s, id, meta->tier);
	*out = f;
	return 0;
}

/* A stored part whose bytes do not match their checksum is never served:
 * the blob is dropped (metadata, then files) and counted. */
void store_drop_corrupt(struct store *s, const struct blob_meta *bad, int part, const char *during)
{
	char hex[KEY_HEX_LEN + 1];
	struct blob_meta m;

	atomic_fetch_add(&s->checksum_failures, 1);
	klog(LOG_ERROR, "event=checksum_mismatch blob=%s part=\"%s\" tier=%u during=%s "
	     "action=dropped", key_hex(&bad->id, hex), blob_part_suffix[part], bad->tier, during);
	pthread_mutex_lock(&s->commit_lock);
	if (index_get(s->ix, &bad->id, &m, NULL, 0) == 0 && m.tier == bad->tier &&
	    index_delete(s->ix, &bad->id, &m) == 0)
		store_remove_parts(s, m.tier, &m);
	pthread_mutex_unlock(&s->commit_lock);
}

ssize_t store_fetch_read(struct store_fetch *f, int part, void *buf, size_t len, uint64_t off)
{
	double t0 = store_mono();
	ssize_t n;

	if (part < 0 || part >= PART_COUNT || !f->src[part].r)
		return KVTIER_E_INVALID;
	n = part_src_read(&f->src[part], buf, len, off);
	if (n == KVTIER_E_CORRUPT) {
		/* An encoded stream that does not decode is a checksum failure too. */
		store_drop_corrupt(f->s, &f->meta, part, "fetch");
		return n;
	}
	if (n <= 0)
		return n;
	atomic_fetch_add(&f->s->fetch_bytes, (uint64_t)n);
	/* Sequential reads (the way Fetch streams) are checksummed as they go;
	 * the last bytes of a part are only returned once they check out. */
	if (off == f->crc_off[part]) {
		f->crc[part] = crc32c(f->crc[part], buf, (size_t)n);
		f->crc_off[part] += (uint64_t)n;
		if (f->crc_off[part] == f->meta.part_size[part] &&
		    f->crc[part] != f->meta.part_crc[part]) {
			store_drop_corrupt(f->s, &f->meta, part, "fetch");
			return KVTIER_E_CORRUPT;
		}
	}
	f->io_s += store_mono() - t0;
	return n;
}

/* ---- zero-copy fetch of tmpfs parts ---- */

struct store_map {
	struct tier_map m;
};

const uint8_t *store_map_data(const struct store_map *m)
{
	return m->m.data;
}

void store_map_release(void *p)
{
	struct store_map *m = p;

	if (m) {
		tier_unmap(&m->m);
		free(m);
	}
}

/* SIGBUS while reading a mapping (its file was truncated by someone with
 * write access to it) jumps back to the guarded read instead of killing the
 * daemon. Any other SIGBUS keeps its default action. */
static __thread sigjmp_buf *store_bus_jmp;

static void store_on_sigbus(int sig, siginfo_t *si, void *uc)
{
	(void)si;
	(void)uc;
	if (store_bus_jmp)
		siglongjmp(*store_bus_jmp, 1);
	signal(sig, SIG_DFL);
	raise(sig);
}

static void store_bus_install(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = store_on_sigbus;
	sa.sa_flags = SA_SIGINFO | SA_NODEFER;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGBUS, &sa, NULL);
}

static int guarded_crc(uint32_t *crc, const uint8_t *p, size_t n)
{
	static pthread_once_t once = PTHREAD_ONCE_INIT;
	sigjmp_buf jb;
	volatile uint32_t c = *crc;

	pthread_once(&once, store_bus_install);
	if (sigsetjmp(jb, 1)) {
		store_bus_jmp = NULL;
		return -EFAULT;
	}
	store_bus_jmp = &jb;
	c = crc32c(c, p, n);
	store_bus_jmp = NULL;
	*crc = c;
	return 0;
}

int store_fetch_map(struct store_fetch *f, int part, uint64_t off, size_t len,
		    struct store_map **out)
{
	struct part_src *src;
	struct store_map *m;
	double t0 = store_mono(), dt;
	uint32_t crc;
	int rc;

	*out = NULL;
	if (part < 0 || part >= PART_COUNT || !f->src[part].r)
		return KVTIER_E_INVALID;
	src = &f->src[part];
	if (src->dec)
		return -ENOTSUP;
	if (off != f->crc_off[part] || len > f->meta.part_size[part] - off)
		return KVTIER_E_INVALID;
	m = calloc(1, sizeof(*m));
	if (!m)
		return -ENOMEM;
	rc = tier_reader_map(src->r, off, len, &m->m);
	if (rc) {
		free(m);
		return rc;
	}
	crc = f->crc[part];
	if (guarded_crc(&crc, m->m.data, len)) {
		store_map_release(m);
		store_drop_corrupt(f->s, &f->meta, part, "fetch_truncated_file");
		return KVTIER_E_CORRUPT;
	}
	dt = store_mono() - t0;
	f->crc[part] = crc;
	f->crc_off[part] += len;
	f->io_s += dt;
	tier_reader_account(src->r, len, dt);
	atomic_fetch_add(&f->s->fetch_bytes, len);
	if (f->crc_off[part] == f->meta.part_size[part] && crc != f->meta.part_crc[part]) {
		store_map_release(m);
		store_drop_corrupt(f->s, &f->meta, part, "fetch");
		return KVTIER_E_CORRUPT;
	}
	*out = m;
	return 0;
}

void store_fetch_close(struct store_fetch *f)
{
	int complete = 1;

	if (!f)
		return;
	for (int p = 0; p < PART_COUNT; p++) {
		if (f->src[p].r)
			part_src_close(&f->src[p]);
		if ((f->meta.parts & (1u << p)) && f->crc_off[p] != f->meta.part_size[p])
			complete = 0;
	}
	if (f->pinned)
		store_unpin(f->s, &f->meta.id);
	/* A whole blob read is one restore: it teaches the tier's cost model,
	 * and a hit on a lower tier asks the policy about a promotion. */
	if (complete && f->opened) {
		placement_observe_read(f->s, f->meta.tier, blob_raw_bytes(&f->meta), f->io_s);
		if (f->meta.tier > 0)
			placement_want_promote(f->s, &f->meta.id);
	}
	free(f);
}

int store_copy_out(struct store *s, const struct blob_meta *m, int p, int dirfd, const char *dst,
		   double *seconds)
{
	struct part_src src;
	char tmp[64], rnd[17];
	uint8_t *buf = NULL;
	uint64_t off = 0;
	uint32_t crc = 0;
	double t0 = store_mono();
	int rc, fd = -1;

	*seconds = 0;
	rc = part_src_open(s, m, p, &src);
	if (rc)
		return rc;
	buf = malloc(STORE_COPY_CHUNK);
	rc = buf ? random_hex(rnd, 8) : -ENOMEM;
	if (rc)
		goto out;
	snprintf(tmp, sizeof(tmp), TIER_OUT_TMP_PREFIX "%s", rnd);
	fd = openat(dirfd, tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0640);
	if (fd < 0) {
		rc = -errno;
		goto out;
	}
	while (off < m->part_size[p]) {
		ssize_t n = part_src_read(&src, buf, STORE_COPY_CHUNK, off);
		if (n == 0)
			n = KVTIER_E_CORRUPT; /* shorter than recorded */
		if (n < 0) {
			rc = (int)n;
			break;
		}
		crc = crc32c(crc, buf, (size_t)n);
		for (ssize_t w = 0; w < n;) {
			ssize_t k = write(fd, buf + w, (size_t)(n - w));
			if (k < 0 && errno == EINTR)
				continue;
			if (k < 0) {
				rc = -errno;
				break;
			}
			w += k;
		}
		if (rc)
			break;
		off += (uint64_t)n;
	}
	if (rc == 0 && crc != m->part_crc[p])
		rc = KVTIER_E_CORRUPT;
	if (rc == 0 && fchmod(fd, 0440))
		rc = -errno;
	*seconds = store_mono() - t0;
	if (rc == 0)
		rc = tier_rename_noreplace(dirfd, tmp, dirfd, dst);
	if (rc == KVTIER_E_CORRUPT)
		store_drop_corrupt(s, m, p, "stage");
out:
	if (fd >= 0) {
		close(fd);
		if (rc)
			unlinkat(dirfd, tmp, 0);
	}
	free(buf);
	part_src_close(&src);
	return rc;
}

/* ---- parts Stage may link without reading them ---- */

static struct verified_part *verified_slot_locked(struct store *s, const struct key *id, int part)
{
	uint64_t h;

	memcpy(&h, id->b, sizeof(h)); /* ids are hashes: any 8 bytes spread */
	h ^= (uint64_t)(part + 1) * 0x9e3779b97f4a7c15ull;
	return &s->verified[h % STORE_VERIFIED_SLOTS];
}

/* 1 when part p of m was checked while its file had identity *fid. */
static int verified_match(struct store *s, const struct blob_meta *m, int p,
			  const struct tier_file_id *fid)
{
	struct verified_part *v;
	int yes;

	pthread_mutex_lock(&s->verified_lock);
	v = verified_slot_locked(s, &m->id, p);
	yes = v->used && v->part == (uint32_t)p && v->crc == m->part_crc[p] &&
	      memcmp(&v->id, &m->id, sizeof(v->id)) == 0 && tier_file_id_equal(&v->fid, fid);
	pthread_mutex_unlock(&s->verified_lock);
	return yes;
}

/* Records that part p of m had the bytes its CRC says while its file had
 * identity *fid (a slot taken by another part is simply overwritten: that
 * part is checked again at its next stage). */
static void verified_remember(struct store *s, const struct blob_meta *m, int p,
			      const struct tier_file_id *fid)
{
	struct verified_part *v;

	pthread_mutex_lock(&s->verified_lock);
	v = verified_slot_locked(s, &m->id, p);
	v->id = m->id;
	v->part = (uint32_t)p;
	v->crc = m->part_crc[p];
	v->fid = *fid;
	v->used = 1;
	pthread_mutex_unlock(&s->verified_lock);
}

/* After a put or adopt committed m on tier 0: the daemon computed each
 * part's CRC over the bytes in the file (written by itself, or read back
 * once nobody else could write it), so they count as checked. */
static void verified_remember_put(struct store *s, const struct blob_meta *m)
{
	char name[KEY_HEX_LEN + 32];
	struct tier_file_id fid;

	for (int p = 0; p < PART_COUNT; p++) {
		if (!(m->parts & (1u << p)))
			continue;
		part_name(&m->id, p, name, sizeof(name));
		if (tier_file_id(s->tiers[m->tier], name, &fid) == 0 && fid.settled)
			verified_remember(s, m, p, &fid);
	}
}

/* Reads part p of m on its tier and compares its CRC-32C with the index's.
 * pread into a buffer, not a mapping: on tmpfs a mapping costs a page fault
 * per 4 KiB page, several times the copy (0.8 s against 0.18 s of CPU per
 * GiB measured here). Returns 0, KVTIER_E_CORRUPT (bytes differ, file shorter
 * than recorded), KVTIER_E_NOTFOUND or -errno. *seconds: time spent. */
static int store_check_part(struct store *s, const struct blob_meta *m, int p, double *seconds)
{
	struct part_src src;
	uint8_t *buf = NULL;
	uint64_t off = 0, size = m->part_size[p];
	uint32_t crc = 0;
	double t0 = store_mono();
	int rc;

	rc = part_src_open(s, m, p, &src);
	if (rc)
		goto out;
	buf = malloc(STORE_COPY_CHUNK);
	if (!buf)
		rc = -ENOMEM;
	while (rc == 0 && off < size) {
		ssize_t n = part_src_read(&src, buf, STORE_COPY_CHUNK, off);
		if (n == 0)
			n = KVTIER_E_CORRUPT; /* shorter than recorded */
		if (n < 0) {
			rc = (int)n;
			break;
		}
		crc = crc32c(crc, buf, (size_t)n);
		off += (uint64_t)n;
	}
	if (rc == 0 && crc != m->part_crc[p])
		rc = KVTIER_E_CORRUPT;
	part_src_close(&src);
out:
	free(buf);
	*seconds = store_mono() - t0;
	atomic_fetch_add(&s->stage_checks, 1);
	atomic_fetch_add(&s->stage_check_bytes, off);
	return rc;
}

/* Hard-links raw tier-0 part p of m into dirfd as dst, handing out only
 * bytes that match the part's CRC: the file is read and checked unless it
 * was checked before and its identity (inode, size, modification time) has
 * not changed since; a file that changes while it is linked is unlinked
 * and checked again. Returns 0, -EXDEV (no link possible, or the file is
 * being written: copy instead),
 * KVTIER_E_CORRUPT (the blob was dropped), KVTIER_E_EXISTS or another
 * error. *seconds: time spent checking. */
static int stage_link_part(struct store *s, const struct blob_meta *m, int p, int dirfd,
			   const char *dst, double *seconds)
{
	struct tier *t = s->tiers[m->tier];
	struct tier_file_id before, after;
	char name[KEY_HEX_LEN + 32], hex[KEY_HEX_LEN + 1];
	int rc = KVTIER_E_CORRUPT;

	*seconds = 0;
	part_name(&m->id, p, name, sizeof(name));
	for (int attempt = 0; attempt < 2; attempt++) {
		rc = tier_file_id(t, name, &before);
		/* Written within the last clock tick (a put an instant ago):
		 * wait for the tick to pass, a few milliseconds at most. */
		for (int i = 0; rc == 0 && !before.settled && i < STORE_SETTLE_TRIES; i++) {
			struct timespec ts = { 0, STORE_SETTLE_NS };
			nanosleep(&ts, NULL);
			rc = tier_file_id(t, name, &before);
		}
		if (rc)
			return rc;
		if (before.size != m->part_stored[p]) {
			rc = KVTIER_E_CORRUPT;
			break;
		}
		if (!before.settled || !before.own) {
			/* Still being written (a write after a check could keep
			 * its time), or another user can write it (an inode an
			 * older kvtierd adopted as it was: its owner could change
			 * it without a trace, through a mapping). A copy checks
			 * the bytes it hands out. */
			klog(LOG_INFO, "event=stage_copy_untrusted blob=%s part=\"%s\" "
			     "reason=\"%s\"", key_hex(&m->id, hex), blob_part_suffix[p],
			     !before.settled ? "the tier file is being written"
					     : "another user can write the tier file (kvtier fsck)");
			return -EXDEV;
		}
		if (!verified_match(s, m, p, &before)) {
			double sec = 0;
			rc = store_check_part(s, m, p, &sec);
			*seconds += sec;
			klog(LOG_INFO, "event=stage_check blob=%s part=\"%s\" bytes=%llu "
			     "seconds=%.6f ok=%d", key_hex(&m->id, hex), blob_part_suffix[p],
			     (unsigned long long)m->part_size[p], sec, rc == 0);
			if (rc)
				break;
		}
		rc = tier_link_out(t, name, dirfd, dst);
		if (rc)
			return rc;
		/* The name still held the checked inode, unwritten, after the
		 * link: the link is that inode. */
		if (tier_file_id(t, name, &after) == 0 && tier_file_id_equal(&before, &after)) {
			verified_remember(s, m, p, &before);
			return 0;
		}
		klog(LOG_WARN, "event=stage_changed blob=%s part=\"%s\" reason=\"the tier file "
		     "changed while it was linked; checking it again\"", key_hex(&m->id, hex),
		     blob_part_suffix[p]);
		unlinkat(dirfd, dst, 0);
		rc = KVTIER_E_CORRUPT; /* written twice in a row: nobody may write it */
	}
	if (rc == KVTIER_E_CORRUPT)
		store_drop_corrupt(s, m, p, "stage");
	return rc;
}

/* ---- stage / release ---- */

static int slot_dir_index(struct store *s, const char *dir)
{
	char real[PATH_MAX];

	if (!dir || !realpath(dir, real))
		return -1;
	for (unsigned d = 0; d < s->cfg.n_slot_dirs; d++)
		if (strcmp(real, s->slot_real[d]) == 0)
			return (int)d;
	return -1;
}

int store_stage(struct store *s, const struct key *id, const char *dir, unsigned lease_s,
		struct store_stage_result *res, char *err, size_t errlen)
{
	struct blob_meta meta;
	struct lease *l = NULL;
	char hex[KEY_HEX_LEN + 1], src[KEY_HEX_LEN + 32], rnd[33], dst[512];
	int d, rc, copied_any = 0;

	memset(res, 0, sizeof(*res));
	d = slot_dir_index(s, dir);
	if (d < 0) {
		char echo[STORE_ECHO_BUF];
		const char *shown = store_echo(dir, echo);
		set_err(err, errlen,
			"%s is not a slot directory of this daemon; start kvtierd with --slot-dir %s",
			shown, dir ? shown : "DIR");
		return KVTIER_E_DENIED;
	}
	/* Pinned from here on (the lease keeps the pin): no move or eviction
	 * takes the files away between reading the record and linking them.
	 * Only our own promotion may move it (placement_promote_for_stage). */
	pthread_mutex_lock(&s->commit_lock); /* as in store_fetch_open */
	store_pin(s, id);
	rc = index_get(s->ix, id, &meta, NULL, 0);
	pthread_mutex_unlock(&s->commit_lock);
	if (rc) {
		set_err(err, errlen, "no blob %s", key_hex(id, hex));
		goto fail;
	}
	if (meta.tier >= s->n_tiers) {
		set_err(err, errlen, "blob is on an unconfigured tier %u", meta.tier);
		rc = KVTIER_E_INTERNAL;
		goto fail;
	}
	if (atomic_load(&s->active_leases) >= STORE_MAX_LEASES) {
		set_err(err, errlen, "too many active leases (%d): release the ones you no longer "
			"need (kvtier release), or wait for them to expire", STORE_MAX_LEASES);
		rc = KVTIER_E_FULL;
		goto fail;
	}
	/* A blob on a lower tier is promoted first when the policy says so
	 * (then it is linked like any tmpfs blob), else copied out below. */
	if (meta.tier > 0)
		placement_promote_for_stage(s, &meta);
	l = calloc(1, sizeof(*l));
	if (!l) {
		rc = -ENOMEM;
		goto fail;
	}
	l->blob = *id;
	double io_s = 0, check_s = 0;
	for (int attempt = 0;; attempt++) {
		rc = random_hex(rnd, 16);
		if (rc)
			goto fail;
		snprintf(l->name, sizeof(l->name), "%s%s.bin", STORE_STAGE_PREFIX, rnd);
		l->parts = 0;
		for (int p = PART_COUNT - 1; p >= 0; p--) {
			int copied = 0;
			if (!(meta.parts & (1u << p)))
				continue;
			part_name(id, p, src, sizeof(src));
			snprintf(dst, sizeof(dst), "%s%s", l->name, blob_part_suffix[p]);
			rc = -EXDEV;
			if (meta.compression == CODEC_RAW && meta.tier == 0) {
				double sec = 0;
				rc = stage_link_part(s, &meta, p, s->slot_fd[d], dst, &sec);
				check_s += sec;
			}
			if (rc == -EXDEV) {
				/* Encoded, on a lower tier, or no link possible: a
				 * copy through the part's reader, its CRC checked. */
				double sec = 0;
				rc = store_copy_out(s, &meta, p, s->slot_fd[d], dst, &sec);
				io_s += sec;
				copied = 1;
			}
			if (rc)
				break;
			l->parts |= 1u << p;
			copied_any |= copied;
		}
		if (rc == 0)
			break;
		l->slot_dir = (unsigned)d;
		lease_unlink(s, l);
		if (rc == KVTIER_E_CORRUPT) {
			set_err(err, errlen,
				"blob %s failed its checksum: its stored bytes are damaged or were "
				"changed, so it was dropped and nothing of it was staged; treat this "
				"as a miss", key_hex(id, hex));
			goto fail;
		}
		if (rc != KVTIER_E_EXISTS || attempt >= 3) {
			set_err(err, errlen, "staging blob %s into %s failed: %s", key_hex(id, hex),
				s->slot_real[d], kvtier_strerror(rc));
			goto fail;
		}
	}
	if (lease_s == 0)
		lease_s = s->cfg.lease_default_s;
	if (s->cfg.lease_max_s && lease_s > s->cfg.lease_max_s)
		lease_s = s->cfg.lease_max_s;
	rc = random_hex(l->id, 16);
	if (rc)
		goto fail;
	l->slot_dir = (unsigned)d;
	l->expires_ms = now_ms() + (int64_t)lease_s * 1000;
	snprintf(res->lease, sizeof(res->lease), "%s", l->id);
	snprintf(res->filename, sizeof(res->filename), "%s", l->name);
	snprintf(res->path, sizeof(res->path), "%s/%s", s->slot_real[d], l->name);
	res->expires_unix_ms = l->expires_ms;
	res->copied = copied_any;
	res->n_tokens = meta.n_tokens;
	pthread_mutex_lock(&s->lease_lock);
	l->next = s->leases;
	s->leases = l;
	pthread_mutex_unlock(&s->lease_lock);
	atomic_fetch_add(&s->active_leases, 1);
	if (meta.tier > 0)
		placement_observe_read(s, meta.tier, blob_raw_bytes(&meta), io_s);
	atomic_fetch_add(&s->stages, 1);
	if (copied_any)
		atomic_fetch_add(&s->stage_copies, 1);
	touch_blob(s, id, meta.tier);
	klog(LOG_INFO, "event=stage blob=%s dir=%s name=%s lease=%s seconds=%u copied=%d "
	     "check_seconds=%.6f", key_hex(id, hex), s->slot_real[d], l->name, l->id, lease_s,
	     copied_any, check_s);
	return 0;
fail:
	store_unpin(s, id);
	free(l);
	return rc;
}

int store_release(struct store *s, const char *lease, char *err, size_t errlen)
{
	struct lease *l = NULL;

	pthread_mutex_lock(&s->lease_lock);
	for (struct lease **pp = &s->leases; *pp; pp = &(*pp)->next)
		if (strcmp((*pp)->id, lease ? lease : "") == 0) {
			l = *pp;
			*pp = l->next;
			break;
		}
	pthread_mutex_unlock(&s->lease_lock);
	if (!l) {
		char echo[STORE_ECHO_BUF];
		set_err(err, errlen, "no lease %s (released already, or expired)",
			store_echo(lease, echo));
		return KVTIER_E_NOTFOUND;
	}
	lease_unlink(s, l);
	store_unpin(s, &l->blob);
	atomic_fetch_sub(&s->active_leases, 1);
	atomic_fetch_add(&s->releases, 1);
	free(l);
	return 0;
}

/* ---- delete, quarantine, report ---- */

int store_delete(struct store *s, const struct key *id, char *err, size_t errlen)
{
	struct blob_meta m;
	char hex[KEY_HEX_LEN + 1];
	int rc;

	pthread_mutex_lock(&s->commit_lock);
	rc = index_delete(s->ix, id, &m);
	if (rc == 0)
		store_remove_parts(s, m.tier, &m);
	pthread_mutex_unlock(&s->commit_lock);
	if (rc == KVTIER_E_FULL) {
		/* LMDB needs free pages to write even a delete. */
		set_err(err, errlen, "deleting %s failed: the index map is full (MDB_MAP_FULL: "
			"%llu bytes); nothing was deleted; restart kvtierd with a larger --map-size "
			"(the index keeps its data)", key_hex(id, hex),
			(unsigned long long)s->cfg.map_size);
		return rc;
	}
	if (rc) {
		set_err(err, errlen, rc == KVTIER_E_NOTFOUND ? "no blob %s" : "deleting %s failed: %s",
			key_hex(id, hex), kvtier_strerror(rc));
		return rc;
	}
	atomic_fetch_add(&s->deletes, 1);
	klog(LOG_INFO, "event=delete blob=%s", key_hex(id, hex));
	return 0;
}

int store_quarantine(struct store *s, const struct key *id, char *err, size_t errlen)
{
	char hex[KEY_HEX_LEN + 1];
	int rc, had = 0;

	/* One read-modify-write transaction: hits flushed meanwhile are kept. */
	rc = index_set_flags(s->ix, id, BLOB_F_QUARANTINED, &had);
	if (rc == 0 && !had)
		atomic_fetch_add(&s->quarantined, 1);
	if (rc) {
		set_err(err, errlen, rc == KVTIER_E_NOTFOUND ? "no blob %s" : "quarantine of %s failed",
			key_hex(id, hex));
		return rc;
	}
	klog(LOG_WARN, "event=quarantine blob=%s", key_hex(id, hex));
	return 0;
}

/* One prefill report, refitted into a namespace's model words inside the
 * index's write transaction (index_ns_report_prefill). */
struct prefill_report {
	uint32_t prefix, tokens;
	double seconds;
	struct prefill_model pm; /* the model after the report */
};

static void prefill_refit(double pf[8], void *ctx)
{
	struct prefill_report *r = ctx;

	prefill_from_words(&r->pm, pf);
	prefill_observe(&r->pm, r->prefix, r->tokens, r->seconds);
	prefill_to_words(&r->pm, pf);
}

int store_report_prefill(struct store *s, const char *ns, uint32_t prefix, uint32_t tokens,
			 double ms, char *err, size_t errlen)
{
	int rc = store_ns_valid(ns, err, errlen);

	if (rc)
		return rc;
	if (prefill_report_check(tokens, ms, err, errlen)) {
		klog(LOG_WARN, "event=prefill_report_refused ns=\"%s\" tokens=%u ms=%g", ns, tokens,
		     ms);
		return KVTIER_E_INVALID;
	}
	{
		struct prefill_report r = {.prefix = prefix, .tokens = tokens, .seconds = ms / 1000.0};

		rc = index_ns_report_prefill(s->ix, ns, tokens / (ms / 1000.0), 0.2, prefill_refit,
					     &r);
		if (rc == 0)
			klog(LOG_DEBUG, "event=prefill_report ns=\"%s\" prefix=%u tokens=%u ms=%.3f "
			     "a=%.3g b=%.3g", ns, prefix, tokens, ms, r.pm.a, r.pm.b);
	}
	if (rc == KVTIER_E_NOTFOUND)
		set_err(err, errlen, "unknown namespace \"%s\" (no blob was ever stored in it)", ns);
	else if (rc)
		set_err(err, errlen, "recording the report failed: %s", kvtier_strerror(rc));
	return rc;
}

/* ---- list and stats ---- */

struct list_ctx {
	struct store *s;
	int (*cb)(void *, const struct blob_meta *, const char *, const char *);
	void *ctx;
};

static int list_cb(void *ctx, const struct blob_meta *m, const char *ns)
{
	struct list_ctx *c = ctx;

	return c->cb(c->ctx, m, ns, m->tier < c->s->n_tiers ? tier_kind(c->s->tiers[m->tier]) : "?");
}

int store_list(struct store *s, const char *ns, const struct key *after, size_t limit,
	       int (*cb)(void *ctx, const struct blob_meta *m, const char *ns, const char *tier_kind),
	       void *ctx, int *more)
{
	struct list_ctx c = {s, cb, ctx};

	return index_list(s->ix, ns, after, limit, list_cb, &c, more);
}

void store_get_stats(struct store *s, struct store_stats *o)
{
	memset(o, 0, sizeof(*o));
	o->lookups = atomic_load(&s->lookups);
	o->hits = atomic_load(&s->hits);
	o->matched_tokens = atomic_load(&s->matched_tokens);
	o->puts = atomic_load(&s->puts);
	o->put_bytes = atomic_load(&s->put_bytes);
	o->adopts = atomic_load(&s->adopts);
	o->dedups = atomic_load(&s->dedups);
	o->supersessions = atomic_load(&s->supersessions);
	o->refused = atomic_load(&s->refused);
	for (int k = 0; k < STORE_STATE_KINDS; k++)
		o->puts_state[k] = atomic_load(&s->puts_state[k]);
	o->fetches = atomic_load(&s->fetches);
	o->fetch_bytes = atomic_load(&s->fetch_bytes);
	o->stages = atomic_load(&s->stages);
	o->stage_copies = atomic_load(&s->stage_copies);
	o->stage_checks = atomic_load(&s->stage_checks);
	o->stage_check_bytes = atomic_load(&s->stage_check_bytes);
	o->adopt_copies = atomic_load(&s->adopt_copies);
	o->releases = atomic_load(&s->releases);
	o->lease_expiries = atomic_load(&s->lease_expiries);
	o->deletes = atomic_load(&s->deletes);
	o->quarantined = atomic_load(&s->quarantined);
	o->checksum_failures = atomic_load(&s->checksum_failures);
	o->promotions_declined = atomic_load(&s->promotions_declined);
	o->active_leases = atomic_load(&s->active_leases);
	o->reconcile_removed_files = s->reconcile_files;
	o->reconcile_removed_blobs = s->reconcile_blobs;
	o->remove_failures = atomic_load(&s->remove_failures);
	{
		uint64_t bytes;
		o->removals_pending = store_pending_removals(s, &bytes);
	}
	o->missing_dropped = atomic_load(&s->missing_dropped);
	o->n_tiers = s->n_tiers;
	for (unsigned t = 0; t < s->n_tiers; t++) {
		struct tier_stats st;
		struct store_tier_stats *ts = &o->tiers[t];
		tier_get_stats(s->tiers[t], &st);
		ts->index = t;
		ts->kind = tier_kind(s->tiers[t]);
		ts->path = tier_path(s->tiers[t]);
		ts->capacity = st.capacity;
		ts->used = st.used;
		ts->reserved = st.reserved;
		ts->read_bytes = st.read_bytes;
		ts->write_bytes = st.write_bytes;
		ts->read_seconds = st.read_seconds;
		ts->write_seconds = st.write_seconds;
		ts->blobs = atomic_load(&s->tier_blobs[t]);
		ts->io = tier_io_desc(s->tiers[t]);
		ts->io_fallback = tier_io_fallback_reason(s->tiers[t]);
		ts->read_ops = st.read_ops;
		ts->write_ops = st.write_ops;
		memcpy(ts->read_hist, st.read_hist, sizeof(ts->read_hist));
		memcpy(ts->write_hist, st.write_hist, sizeof(ts->write_hist));
		ts->read_hist_sum = st.read_hist_sum;
		ts->write_hist_sum = st.write_hist_sum;
		const struct store_tier_config *tc = &s->cfg.tiers[t];
		ts->high = floor(tc->high * (double)placement_capacity(s, t));
		ts->low = floor(tc->low * (double)placement_capacity(s, t));
		struct tier_place *pl = &s->place[t];
		pthread_mutex_lock(&s->model_lock);
		ts->read_bytes_per_s = pl->model.bytes_per_s;
		ts->read_fixed_s = pl->model.fixed_s;
		ts->model_samples = pl->model.samples;
		ts->gdsf_base = pl->L;
		pthread_mutex_unlock(&s->model_lock);
		ts->raw_bytes = atomic_load(&pl->raw_bytes);
		ts->stored_bytes = atomic_load(&pl->stored_bytes);
		for (int r = 0; r < STORE_EVICT_REASONS; r++)
			ts->evictions[r] = atomic_load(&pl->evictions[r]);
		/* Moves in and out are the tier's column and row of migrations. */
		ts->moved_in = ts->moved_out = 0;
		for (unsigned k = 0; k < s->n_tiers; k++) {
			ts->moved_in += atomic_load(&s->migrations[k][t]);
			ts->moved_out += atomic_load(&s->migrations[t][k]);
		}
		ts->moved_in_bytes = atomic_load(&pl->moved_in_bytes);
		ts->enospc = atomic_load(&pl->enospc);
		ts->dir_missing = atomic_load(&s->dir_state[t]) != TIER_DIR_OK;
		ts->dir_events = atomic_load(&s->dir_events[t]);
		ts->compression_ratio = ts->stored_bytes ? (double)ts->raw_bytes /
								   (double)ts->stored_bytes
							 : 1;
		for (unsigned k = 0; k < s->n_tiers; k++)
			o->migrations[t][k] = atomic_load(&s->migrations[t][k]);
		o->blobs += ts->blobs;
		o->bytes += st.used;
	}
}

struct ns_tally {
	char name[INDEX_NS_MAX + 1];
	uint32_t id;
	struct store_ns_stats st;
};

struct ns_walk {
	struct store *s;
	struct ns_tally *t;
	size_t n, cap;
	int (*cb)(void *, const struct store_ns_stats *);
	void *ctx;
};

static int ns_walk_ns(void *ctx, const char *name, const struct ns_rec *r)
{
	struct ns_walk *w = ctx;

	if (w->n == w->cap) {
		size_t cap = w->cap ? w->cap * 2 : 16;
		void *v = realloc(w->t, cap * sizeof(*w->t));
		if (!v)
			return -ENOMEM;
		w->t = v;
		w->cap = cap;
	}
	struct ns_tally *t = &w->t[w->n++];
	memset(t, 0, sizeof(*t));
	snprintf(t->name, sizeof(t->name), "%s", name);
	snprintf(t->st.ns, sizeof(t->st.ns), "%s", name);
	t->id = r->id;
	t->st.prefill_tps = r->prefill_tps;
	struct prefill_model pm;
	prefill_from_words(&pm, r->pf);
	t->st.prefill_a = pm.a;
	t->st.prefill_b = pm.b;
	t->st.prefill_samples = pm.samples;
	return 0;
}

static int ns_walk_blob(void *ctx, const struct blob_meta *m, const char *ns)
{
	struct ns_walk *w = ctx;

	for (size_t i = 0; i < w->n; i++)
		if (w->t[i].id == m->ns_id) {
			w->t[i].st.blobs++;
			w->t[i].st.bytes += m->stored_size;
			if (m->flags & BLOB_F_OPAQUE)
				w->t[i].st.opaque_blobs++;
			break;
		}
	return 0;
}

int store_ns_stats(struct store *s, int (*cb)(void *ctx, const struct store_ns_stats *n),
		   void *ctx)
{
	struct ns_walk w = {.s = s, .cb = cb, .ctx = ctx};
	int rc = index_ns_list(s->ix, ns_walk_ns, &w);

	if (rc == 0)
		rc = index_list(s->ix, NULL, NULL, 0, ns_walk_blob, &w, NULL);
	if (rc == 0) {
		pthread_mutex_lock(&s->ns_lock);
		for (size_t i = 0; i < w.n; i++)
			for (size_t j = 0; j < s->n_ns_counters; j++)
				if (strcmp(s->ns_counters[j].ns, w.t[i].name) == 0) {
					w.t[i].st.lookups = s->ns_counters[j].lookups;
					w.t[i].st.hits = s->ns_counters[j].hits;
					w.t[i].st.matched_tokens = s->ns_counters[j].matched;
				}
		pthread_mutex_unlock(&s->ns_lock);
		for (size_t i = 0; i < w.n && rc == 0; i++)
			rc = cb(ctx, &w.t[i].st);
	}
	free(w.t);
	return rc;
}

struct models_ctx {
	int (*cb)(void *ctx, const struct store_ns_stats *n);
	void *ctx;
};

static int models_one(void *ctx, const char *name, const struct ns_rec *r)
{
	struct models_ctx *c = ctx;
	struct store_ns_stats n;
	struct prefill_model pm;

	memset(&n, 0, sizeof(n));
	snprintf(n.ns, sizeof(n.ns), "%s", name);
	prefill_from_words(&pm, r->pf);
	n.prefill_tps = r->prefill_tps;
	n.prefill_a = pm.a;
	n.prefill_b = pm.b;
	n.prefill_samples = pm.samples;
	return c->cb(c->ctx, &n);
}

int store_ns_models(struct store *s, int (*cb)(void *ctx, const struct store_ns_stats *n),
		    void *ctx)
{
	struct models_ctx c = {cb, ctx};

	return index_ns_list(s->ix, models_one, &c);
}
