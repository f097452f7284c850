/* placement.c: which tier each blob lives on (docs/policy.md).
 *
 * Decisions come from measurements (policy.h): each tier's restore cost
 * model (a probe at start, then every whole-blob read) and each namespace's
 * prefill model (Report). The value of a blob on a tier is the prefill time
 * it saves minus its restore time from there; priorities are
 * GreedyDual-Size-Frequency over that value per stored byte.
 *
 * - A tier above its high watermark sheds its lowest-priority blobs until it
 *   is under its low watermark: each moves one tier down, or is deleted from
 *   the last tier ("capacity"), or is deleted when restoring it from the next
 *   tier would cost more than prefilling it ("not_worth_restoring", measured
 *   models only: an unknown namespace is admitted).
 * - A whole read from a lower tier asks for a promotion: granted when the
 *   faster tier has room under its high watermark, or when the blob's
 *   priority there beats the lowest resident's (the faster tier then sheds).
 * - Pinned blobs (open fetches, live leases) are never moved or evicted.
 * - A move is crash-safe: copy (verifying the CRC of every served byte),
 *   make durable, rename into place, switch the index record, delete the old
 *   files. A crash in between leaves a second copy the index does not name,
 *   which reconcile removes at the next start.
 *
 * One move or eviction pass at a time (move_lock). The placement thread
 * runs the watermark checks and queued promotions; puts that find tier 0
 * full call placement_make_room() synchronously.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "crc32c.h"
#include "kvtier.h"
#include "log.h"
#include "store_int.h"

#define PROMOTE_RESCAN_MS 10000 /* a faster tier's lowest priority is rescanned after this */
#define SAMPLE_FRAMES 4         /* frames sampled to choose a blob's compression */

/* ---- models ---- */

/* The capacity the watermarks apply to: the configured one, or less when
 * the file system filled up first (placement_note_enospc). */
uint64_t placement_capacity(struct store *s, unsigned t)
{
	uint64_t limit = atomic_load(&s->place[t].fs_limit);
	struct tier_stats st;

	tier_get_stats(s->tiers[t], &st);
	return limit && limit < st.capacity ? limit : st.capacity;
}

static uint64_t tier_mark(struct store *s, unsigned t, int high)
{
	const struct store_tier_config *tc = &s->cfg.tiers[t];

	/* store_open resolved each tier's pair with low < high. */
	return (uint64_t)((high ? tc->high : tc->low) * (double)placement_capacity(s, t));
}

void placement_note_enospc(struct store *s, unsigned t)
{
	struct tier_stats st;
	uint64_t held, old;

	atomic_fetch_add(&s->place[t].enospc, 1);
	tier_get_stats(s->tiers[t], &st);
	held = st.used + st.reserved;
	old = atomic_load(&s->place[t].fs_limit);
	/* What was committed and reserved when the file system said no is what
	 * it holds for us: the watermarks follow that from now on, so the tier
	 * sheds before the next write fails instead of after. */
	if (held && (old == 0 || held < old)) {
		atomic_store(&s->place[t].fs_limit, held);
		klog(LOG_WARN, "event=tier_fs_full tier=%u path=%s configured=%llu effective=%llu "
		     "hint=\"the file system holds less than --tier's SIZE: lower it\"", t,
		     tier_path(s->tiers[t]), (unsigned long long)st.capacity,
		     (unsigned long long)held);
	}
}

static uint64_t tier_load(struct store *s, unsigned t)
{
	struct tier_stats st;

	tier_get_stats(s->tiers[t], &st);
	return st.used + st.reserved;
}

void placement_init(struct store *s)
{
	for (unsigned t = 0; t < s->n_tiers; t++) {
		struct tier_place *pl = &s->place[t];
		int disk = strcmp(tier_kind(s->tiers[t]), "disk") == 0;
		/* Guesses, replaced by the probe and then by every read. */
		double fixed = disk ? 200e-6 : 20e-6, bps = disk ? 1e9 : 4e9;
		struct tier_stats st;
		tier_get_stats(s->tiers[t], &st);
		/* A quarter of the tier at most: a tiny tier still gets measured. */
		uint64_t probe =
		    s->cfg.probe_bytes < st.capacity / 4 ? s->cfg.probe_bytes : st.capacity / 4;
		int rc = probe >= 4096 ? tier_probe(s->tiers[t], probe, &fixed, &bps) : -ENOSYS;

		pl->compresses = disk && s->cfg.compress_min_saving < 1;
		cost_model_init(&pl->model, fixed, bps);
		pl->L = 0;
		pl->lowest_h = -INFINITY;
		if (rc == 0)
			klog(LOG_INFO,
			     "event=tier_probe tier=%u kind=%s io=\"%s\" fixed_ms=%.3f "
			     "MBps=%.0f probe_bytes=%llu",
			     t, tier_kind(s->tiers[t]), tier_io_desc(s->tiers[t]),
			     pl->model.fixed_s * 1e3, pl->model.bytes_per_s / 1e6,
			     (unsigned long long)probe);
		else
			klog(rc == -ENOSYS ? LOG_INFO : LOG_WARN,
			     "event=tier_probe_skipped tier=%u reason=\"%s\" fixed_ms=%.3f "
			     "MBps=%.0f hint=\"the model starts from a guess; real reads correct "
			     "it\"",
			     t,
			     rc == -ENOSYS ? "--probe-size 0, or a tier too small to probe"
					   : kvtier_strerror(rc),
			     fixed * 1e3, bps / 1e6);
		if (tier_io_fallback_reason(s->tiers[t])[0])
			klog(LOG_WARN, "event=tier_io_fallback tier=%u io=\"%s\" reason=\"%s\"", t,
			     tier_io_desc(s->tiers[t]), tier_io_fallback_reason(s->tiers[t]));
	}
}

double placement_restore_s(struct store *s, unsigned t, uint64_t bytes)
{
	double v;

	if (t >= s->n_tiers)
		return 0;
	pthread_mutex_lock(&s->model_lock);
	v = cost_model_time(&s->place[t].model, bytes);
	pthread_mutex_unlock(&s->model_lock);
	return v;
}

void placement_observe_read(struct store *s, unsigned t, uint64_t bytes, double seconds)
{
	if (t >= s->n_tiers)
		return;
	pthread_mutex_lock(&s->model_lock);
	cost_model_observe(&s->place[t].model, bytes, seconds);
	pthread_mutex_unlock(&s->model_lock);
}

double placement_base(struct store *s, unsigned t)
{
	double v;

	pthread_mutex_lock(&s->model_lock);
	v = s->place[t].L;
	pthread_mutex_unlock(&s->model_lock);
	return v;
}

static void raise_base(struct store *s, unsigned t, double h)
{
	if (!isfinite(h))
		return;
	pthread_mutex_lock(&s->model_lock);
	if (h > s->place[t].L)
		s->place[t].L = h;
	pthread_mutex_unlock(&s->model_lock);
}

/* Prefill models of every namespace, by id, for one pass. */
struct ns_models {
	struct {
		uint32_t id;
		struct prefill_model pm;
	} * v;
	size_t n, cap;
};

static int ns_models_add(void *ctx, const char *name, const struct ns_rec *r)
{
	struct ns_models *nm = ctx;

	(void)name;
	if (nm->n == nm->cap) {
		size_t cap = nm->cap ? nm->cap * 2 : 16;
		void *v = realloc(nm->v, cap * sizeof(*nm->v));
		if (!v)
			return -ENOMEM;
		nm->v = v;
		nm->cap = cap;
	}
	nm->v[nm->n].id = r->id;
	prefill_from_words(&nm->v[nm->n].pm, r->pf);
	nm->n++;
	return 0;
}

static const struct prefill_model *ns_model(const struct ns_models *nm, uint32_t id)
{
	static const struct prefill_model none;

	for (size_t i = 0; i < nm->n; i++)
		if (nm->v[i].id == id)
			return &nm->v[i].pm;
	return &none;
}

/* Seconds saved by restoring blob m from tier t instead of prefilling it. */
static double blob_value(struct store *s, const struct ns_models *nm, const struct blob_meta *m,
                         unsigned t)
{
	return prefill_seconds(ns_model(nm, m->ns_id), m->n_tokens, s->cfg.assumed_prefill_tps) -
	       placement_restore_s(s, t, blob_raw_bytes(m));
}

/* ---- eviction candidates: the lowest priorities covering `need` bytes ---- */

struct cand {
	struct key id;
	double h;
	uint64_t stored;
	int64_t last_access_ms; /* ties go to the least recently used */
};

struct scan {
	struct store *s;
	unsigned t;
	const struct ns_models *nm;
	uint64_t need;
	struct cand *heap; /* max-heap on h: the victims so far */
	size_t n, cap;
	uint64_t total;  /* stored bytes in the heap */
	double lowest_h; /* lowest priority among blobs left resident */
	int rc;
};

static int cmp_cand(const void *a, const void *b)
{
	const struct cand *x = a, *y = b;

	if (x->h != y->h)
		return x->h < y->h ? -1 : 1;
	return x->last_access_ms < y->last_access_ms ? -1 : x->last_access_ms > y->last_access_ms;
}

static void heap_swap(struct cand *a, struct cand *b)
{
	struct cand t = *a;

	*a = *b;
	*b = t;
}

static void heap_push(struct scan *sc, const struct cand *c)
{
	size_t i = sc->n++;

	sc->heap[i] = *c;
	while (i > 0 && cmp_cand(&sc->heap[(i - 1) / 2], &sc->heap[i]) < 0) {
		heap_swap(&sc->heap[(i - 1) / 2], &sc->heap[i]);
		i = (i - 1) / 2;
	}
}

static struct cand heap_pop(struct scan *sc)
{
	struct cand top = sc->heap[0];
	size_t i = 0;

	sc->heap[0] = sc->heap[--sc->n];
	for (;;) {
		size_t l = 2 * i + 1, r = l + 1, m = i;
		if (l < sc->n && cmp_cand(&sc->heap[l], &sc->heap[m]) > 0)
			m = l;
		if (r < sc->n && cmp_cand(&sc->heap[r], &sc->heap[m]) > 0)
			m = r;
		if (m == i)
			break;
		heap_swap(&sc->heap[m], &sc->heap[i]);
		i = m;
	}
	return top;
}

static int scan_blob(void *ctx, const struct blob_meta *m, const char *ns)
{
	struct scan *sc = ctx;
	struct cand c;

	(void)ns;
	if (m->tier != sc->t || store_pinned(sc->s, &m->id))
		return 0;
	c.id = m->id;
	c.stored = m->stored_size;
	c.last_access_ms = m->last_access_ms;
	c.h = (m->flags & BLOB_F_QUARANTINED)
	          ? -INFINITY
	          : gdsf_priority(m->gdsf_base, m->hits, blob_value(sc->s, sc->nm, m, sc->t),
	                          m->stored_size);
	if (sc->n == sc->cap) {
		size_t cap = sc->cap ? sc->cap * 2 : 256;
		void *v = realloc(sc->heap, cap * sizeof(*sc->heap));
		if (!v)
			return -ENOMEM;
		sc->heap = v;
		sc->cap = cap;
	}
	heap_push(sc, &c);
	sc->total += c.stored;
	/* Keep only the lowest priorities that cover `need`: the rest stay. */
	while (sc->n > 0 && sc->total - sc->heap[0].stored >= sc->need) {
		struct cand out = heap_pop(sc);
		sc->total -= out.stored;
		if (out.h < sc->lowest_h)
			sc->lowest_h = out.h;
		if (sc->need == 0 && sc->n == 0)
			break;
	}
	return 0;
}

/* Scans tier t: the victims (ascending priority) covering `need` bytes and
 * the lowest priority left resident. */
static int scan_tier(struct store *s, unsigned t, const struct ns_models *nm, uint64_t need,
                     struct scan *sc)
{
	int rc;

	memset(sc, 0, sizeof(*sc));
	sc->s = s;
	sc->t = t;
	sc->nm = nm;
	sc->need = need;
	sc->lowest_h = INFINITY;
	rc = index_list(s->ix, NULL, NULL, 0, scan_blob, sc, NULL);
	if (rc) {
		free(sc->heap);
		sc->heap = NULL;
		return rc;
	}
	if (sc->n > 1) /* heap is NULL when nothing was a candidate */
		qsort(sc->heap, sc->n, sizeof(*sc->heap), cmp_cand);
	s->place[t].lowest_h = sc->lowest_h;
	s->place[t].lowest_at_ms = store_now_ms();
	return 0;
}

/* ---- moving one blob ---- */

struct emit_ctx {
	struct tier_writer *w;
};

static int emit_to_writer(void *ctx, const void *buf, size_t len)
{
	struct emit_ctx *e = ctx;

	return tier_writer_write(e->w, buf, len);
}

/* Chooses how a raw blob is stored on a compressing tier from frames
 * sampled across its slot file. */
static int choose_codec(struct store *s, const struct blob_meta *m, int *kind, double *ratio)
{
	uint64_t size = m->part_size[PART_MAIN];
	size_t frames = size / CODEC_FRAME_RAW + (size % CODEC_FRAME_RAW != 0);
	size_t take = frames < SAMPLE_FRAMES ? frames : SAMPLE_FRAMES, n = 0;
	struct part_src src;
	uint8_t *buf;
	int rc;

	*kind = CODEC_RAW;
	*ratio = 1;
	if (size == 0)
		return 0;
	buf = malloc(take * CODEC_FRAME_RAW);
	if (!buf)
		return -ENOMEM;
	rc = part_src_open(s, m, PART_MAIN, &src);
	for (size_t i = 0; rc == 0 && i < take; i++) {
		uint64_t off = (uint64_t)(frames * i / take) * CODEC_FRAME_RAW;
		size_t want = size - off < CODEC_FRAME_RAW ? (size_t)(size - off) : CODEC_FRAME_RAW;
		ssize_t got = part_src_read(&src, buf + n, want, off);
		if (got < 0)
			rc = (int)got;
		else
			n += (size_t)got;
	}
	if (rc == 0)
		rc = codec_choose(buf, n, s->cfg.compress_min_saving, s->cfg.shuffle, kind, ratio);
	part_src_close(&src);
	free(buf);
	return rc;
}

/* Copies part p of m into a new writer on tier `to`, encoded as `kind`,
 * checking the served bytes against the part's CRC. */
static int copy_part(struct store *s, const struct blob_meta *m, int p, unsigned to, int kind,
                     struct tier_writer **wout)
{
	uint64_t size = m->part_size[p], frames = size / CODEC_FRAME_RAW + 1;
	uint64_t reserve = kind == CODEC_RAW ? size : frames * codec_frame_bound(CODEC_FRAME_RAW);
	struct codec_enc *enc = NULL;
	struct part_src src;
	struct emit_ctx ec;
	uint8_t *buf = NULL;
	uint64_t off = 0;
	uint32_t crc = 0;
	int rc;

	*wout = NULL;
	rc = part_src_open(s, m, p, &src);
	if (rc)
		return rc;
	rc = tier_writer_open(s->tiers[to], reserve, &ec.w);
	if (rc)
		goto out_src;
	buf = malloc(STORE_COPY_CHUNK);
	if (!buf)
		rc = -ENOMEM;
	if (rc == 0 && kind != CODEC_RAW)
		rc = codec_enc_new(kind, &enc);
	while (rc == 0 && off < size) {
		ssize_t n = part_src_read(&src, buf, STORE_COPY_CHUNK, off);
		if (n == 0)
			n = KVTIER_E_CORRUPT; /* shorter than its record */
		if (n < 0) {
			rc = (int)n;
			break;
		}
		crc = crc32c(crc, buf, (size_t)n);
		rc = enc ? codec_enc_write(enc, buf, (size_t)n, emit_to_writer, &ec)
		         : tier_writer_write(ec.w, buf, (size_t)n);
		off += (uint64_t)n;
	}
	if (rc == 0 && enc)
		rc = codec_enc_finish(enc, emit_to_writer, &ec);
	if (rc == 0 && crc != m->part_crc[p])
		rc = KVTIER_E_CORRUPT;
	if (rc)
		tier_writer_abort(ec.w);
	else
		*wout = ec.w;
	codec_enc_free(enc);
	free(buf);
out_src:
	part_src_close(&src);
	return rc;
}

/* Moves blob m (a snapshot of its record) to tier `to`. Returns 0 when it
 * moved, KVTIER_E_EXISTS/KVTIER_E_NOTFOUND when the blob changed or went
 * meanwhile (nothing to do), KVTIER_E_FULL or -ENOSPC when `to` has no
 * room, KVTIER_E_CORRUPT when its bytes failed their checksum (dropped). */
static int move_blob(struct store *s, const struct blob_meta *m, unsigned to, unsigned own_pins)
{
	struct tier_writer *w[PART_COUNT] = {0};
	struct index_placement pl;
	char hex[KEY_HEX_LEN + 1], name[KEY_HEX_LEN + 32];
	unsigned from = m->tier;
	uint32_t committed = 0;
	double t0 = store_mono(), ratio = 1;
	int kind = CODEC_RAW, rc = 0;

	key_hex(&m->id, hex);
	if (store_pin_count(s, &m->id) > own_pins)
		return KVTIER_E_EXISTS;
	if (s->place[to].compresses && m->compression == CODEC_RAW)
		rc = choose_codec(s, m, &kind, &ratio);
	else if (s->place[to].compresses)
		kind = (int)m->compression;
	for (int p = 0; rc == 0 && p < PART_COUNT; p++)
		if (m->parts & (1u << p))
			rc = copy_part(s, m, p, to, kind, &w[p]);
	memset(&pl, 0, sizeof(pl));
	pl.id = m->id;
	pl.from_tier = from;
	pl.parts = m->parts;
	memcpy(pl.part_crc, m->part_crc, sizeof(pl.part_crc));
	pl.to_tier = to;
	pl.compression = (uint32_t)kind;
	for (int p = 0; p < PART_COUNT; p++)
		if (w[p])
			pl.part_stored[p] = tier_writer_size(w[p]);
	/* Bytes first. A file of this name already on `to` is never replaced:
	 * it is a put of the same blob made meanwhile (then the record no longer
	 * matches and the move is void), or a crash's leftover that reconcile
	 * removes at the next start. */
	for (int p = PART_COUNT - 1; rc == 0 && p >= 0; p--) {
		if (!w[p])
			continue;
		store_part_name(&m->id, p, name, sizeof(name));
		rc = tier_writer_commit(w[p], name);
		w[p] = NULL;
		if (rc == 0)
			committed |= 1u << p;
	}
	for (int p = 0; p < PART_COUNT; p++)
		if (w[p])
			tier_writer_abort(w[p]);
	if (rc == KVTIER_E_CORRUPT)
		store_drop_corrupt(s, m, PART_MAIN, "migration");
	if (rc)
		goto undo;
	pl.ratio = pl.part_stored[PART_MAIN]
	               ? (double)m->part_size[PART_MAIN] / (double)pl.part_stored[PART_MAIN]
	               : 1;
	pl.gdsf_base = placement_base(s, to);
	/* Then the record, then the old files, unless a reader pinned the blob
	 * during the copy (readers pin and read the record under commit_lock:
	 * one that read the old record before this point holds a pin now). */
	pthread_mutex_lock(&s->commit_lock);
	rc = store_pin_count(s, &m->id) > own_pins ? KVTIER_E_EXISTS
						    : index_set_placement(s->ix, &pl);
	if (rc == 0) {
		uint64_t stored = 0;
		for (int p = 0; p < PART_COUNT; p++)
			stored += pl.part_stored[p];
		store_remove_parts(s, from, m);
		atomic_fetch_add(&s->tier_blobs[to], 1);
		atomic_fetch_add(&s->place[to].raw_bytes, blob_raw_bytes(m));
		atomic_fetch_add(&s->place[to].stored_bytes, stored);
		atomic_fetch_add(&s->place[to].moved_in_bytes, stored);
		atomic_fetch_add(&s->migrations[from][to], 1);
		committed = 0;
		klog(LOG_INFO,
		     "event=migrate blob=%s from=%u to=%u direction=%s bytes=%llu "
		     "stored=%llu compression=%s ratio=%.2f seconds=%.3f",
		     hex, from, to, to > from ? "down" : "up",
		     (unsigned long long)blob_raw_bytes(m), (unsigned long long)stored,
		     codec_name(kind), pl.ratio, store_mono() - t0);
	}
	pthread_mutex_unlock(&s->commit_lock);
undo:
	for (int p = 0; p < PART_COUNT; p++)
		if (committed & (1u << p))
			store_remove_file(s, to, &m->id, p, pl.part_stored[p]);
	if (rc && rc != KVTIER_E_EXISTS && rc != KVTIER_E_NOTFOUND)
		klog(rc == KVTIER_E_FULL || rc == -ENOSPC ? LOG_INFO : LOG_WARN,
		     "event=migrate_failed blob=%s from=%u to=%u err=\"%s\"", hex, from, to,
		     kvtier_strerror(rc));
	if (rc == -ENOSPC)
		placement_note_enospc(s, to);
	return rc;
}

/* Deletes m from its tier unless it moved or is pinned meanwhile. Returns 0
 * when it is gone, else the reason it stayed. */
static int evict_delete(struct store *s, const struct blob_meta *m, int reason, double value)
{
	char hex[KEY_HEX_LEN + 1];
	struct blob_meta cur;
	int rc;

	pthread_mutex_lock(&s->commit_lock);
	rc = index_get(s->ix, &m->id, &cur, NULL, 0);
	if (rc == 0 && cur.tier == m->tier && !store_pinned(s, &m->id)) {
		/* The line goes out before the index delete commits: a crash
		 * between the two then leaves a line for a blob that is still
		 * there, never a blob gone without a line that says why (which
		 * reads as a loss). A failed delete says so right after. */
		klog(LOG_INFO,
		     "event=evict blob=%s tier=%u reason=%s tokens=%u bytes=%llu value_s=%.4f",
		     key_hex(&m->id, hex), m->tier, store_evict_reason_name[reason], m->n_tokens,
		     (unsigned long long)m->stored_size, value);
		rc = index_delete(s->ix, &m->id, &cur);
		if (rc == 0)
			store_remove_parts(s, cur.tier, &cur);
		else
			klog(LOG_WARN, "event=evict_failed blob=%s tier=%u err=\"%s\" kept=1",
			     hex, m->tier, kvtier_strerror(rc));
	} else if (rc == 0) {
		rc = KVTIER_E_EXISTS;
	}
	pthread_mutex_unlock(&s->commit_lock);
	if (rc)
		return rc;
	atomic_fetch_add(&s->place[m->tier].evictions[reason], 1);
	return 0;
}

static int evict_tier(struct store *s, unsigned t, uint64_t need, uint64_t must, int depth);

/* Moves m one tier down, making room there once if needed; deletes it when
 * the next tier would not be worth it or cannot take it. Returns 1 when m
 * left tier t. */
static int demote_or_delete(struct store *s, const struct ns_models *nm, const struct blob_meta *m,
                            int depth)
{
	unsigned t = m->tier;
	const struct prefill_model *pm = ns_model(nm, m->ns_id);
	int rc;

	/* A quarantined blob is never looked up again: not worth a copy. */
	if (t + 1 >= s->n_tiers || (m->flags & BLOB_F_QUARANTINED)) {
		return evict_delete(s, m, EVICT_CAPACITY, blob_value(s, nm, m, t)) == 0;
	}
	if (prefill_known(pm) && blob_value(s, nm, m, t + 1) <= 0) {
		return evict_delete(s, m, EVICT_NOT_WORTH, blob_value(s, nm, m, t + 1)) == 0;
	}
	/* Room first where the file system is known to be smaller than the
	 * tier's capacity: a failed write costs a whole copy. */
	uint64_t load = tier_load(s, t + 1), cap = placement_capacity(s, t + 1);
	if (depth < 2 && load + m->part_size[PART_MAIN] > cap)
		evict_tier(s, t + 1, load + m->part_size[PART_MAIN] - cap, 0, depth + 1);
	rc = move_blob(s, m, t + 1, 0);
	if ((rc == KVTIER_E_FULL || rc == -ENOSPC) && depth < 2) {
		evict_tier(s, t + 1, m->stored_size + m->stored_size / 8 + (1u << 16), 0,
			   depth + 1);
		rc = move_blob(s, m, t + 1, 0);
	}
	if (rc == KVTIER_E_FULL || rc == -ENOSPC) {
		return evict_delete(s, m, EVICT_LOWER_FULL, blob_value(s, nm, m, t)) == 0;
	}
	return rc == 0 || rc == KVTIER_E_CORRUPT || rc == KVTIER_E_NOTFOUND;
}

/* Frees at least `need` stored bytes on tier t (move_lock held). When the
 * blobs that could leave (unpinned, on t) hold fewer than `must` bytes, the
 * pass would not help its caller: nothing is evicted. Returns 0 when
 * something left the tier, KVTIER_E_FULL when nothing could or would. */
static int evict_tier(struct store *s, unsigned t, uint64_t need, uint64_t must, int depth)
{
	struct ns_models nm = {0};
	struct scan sc;
	uint64_t freed = 0;
	size_t left = 0;
	int rc;

	rc = index_ns_list(s->ix, ns_models_add, &nm);
	if (rc == 0)
		rc = scan_tier(s, t, &nm, need, &sc);
	if (rc) {
		klog(LOG_WARN, "event=evict_scan_failed tier=%u err=\"%s\"", t,
		     kvtier_strerror(rc));
		free(nm.v);
		return rc;
	}
	/* The scan keeps the candidates covering `need` (need >= must), or all
	 * of them when they cover less: then sc.total is all that could go. */
	if (sc.total < must) {
		klog(LOG_INFO,
		     "event=evict_skip tier=%u must=%llu evictable=%llu candidates=%zu "
		     "reason=would_not_fit",
		     t, (unsigned long long)must, (unsigned long long)sc.total, sc.n);
		free(sc.heap);
		free(nm.v);
		return KVTIER_E_FULL;
	}
	for (size_t i = 0; i < sc.n && freed < need && !atomic_load(&s->stopping); i++) {
		struct blob_meta m;
		if (index_get(s->ix, &sc.heap[i].id, &m, NULL, 0) || m.tier != t ||
		    store_pinned(s, &m.id))
			continue;
		char hex[KEY_HEX_LEN + 1];
		klog(LOG_DEBUG,
		     "event=victim blob=%s tier=%u priority=%.6g base=%.6g hits=%llu "
		     "value_s=%.4f stored=%llu",
		     key_hex(&m.id, hex), t, sc.heap[i].h, m.gdsf_base, (unsigned long long)m.hits,
		     blob_value(s, &nm, &m, t), (unsigned long long)m.stored_size);
		if (demote_or_delete(s, &nm, &m, depth)) {
			freed += m.stored_size;
			raise_base(s, t, sc.heap[i].h);
			left++;
		}
	}
	klog(freed >= need ? LOG_DEBUG : LOG_INFO,
	     "event=evict_pass tier=%u need=%llu freed=%llu blobs=%zu candidates=%zu", t,
	     (unsigned long long)need, (unsigned long long)freed, left, sc.n);
	free(sc.heap);
	free(nm.v);
	return left ? 0 : KVTIER_E_FULL;
}

int placement_make_room(struct store *s, unsigned t, uint64_t need)
{
	uint64_t load, low, cap, must;
	int rc;

	if (t >= s->n_tiers)
		return KVTIER_E_INVALID;
	cap = placement_capacity(s, t);
	if (need > cap) {
		/* Would not fit in the empty tier: evicting could not help. */
		klog(LOG_INFO, "event=evict_skip tier=%u need=%llu capacity=%llu reason=exceeds_tier",
		     t, (unsigned long long)need, (unsigned long long)cap);
		return KVTIER_E_FULL;
	}
	pthread_mutex_lock(&s->move_lock);
	load = tier_load(s, t);
	low = tier_mark(s, t, 0);
	/* The least that must leave for the new bytes to fit at all; less
	 * than that evictable (pins, uploads in progress): evict nothing. */
	must = load + need > cap ? load + need - cap : 0;
	/* Down to the low watermark with the new bytes in, so the next puts
	 * do not each pay for an eviction. */
	if (load + need > low && load + need - low > need)
		need = load + need - low;
	rc = evict_tier(s, t, need, must, 0);
	pthread_mutex_unlock(&s->move_lock);
	return rc;
}

/* ---- promotion ---- */

/* Whether blob m (on tier t > 0) should move to tier t - 1. */
static int should_promote(struct store *s, const struct blob_meta *m)
{
	unsigned up = m->tier - 1;
	uint64_t raw = blob_raw_bytes(m);
	struct ns_models nm = {0};
	double h;
	int yes = 0;

	if (tier_load(s, up) + raw <= tier_mark(s, up, 1))
		return 1; /* room under the high watermark: nothing is displaced */
	if (index_ns_list(s->ix, ns_models_add, &nm) == 0) {
		h = gdsf_priority(placement_base(s, up), m->hits, blob_value(s, &nm, m, up), raw);
		if (store_now_ms() - s->place[up].lowest_at_ms > PROMOTE_RESCAN_MS) {
			struct scan sc;
			if (scan_tier(s, up, &nm, 0, &sc) == 0)
				free(sc.heap);
		}
		yes = h > s->place[up].lowest_h;
	}
	free(nm.v);
	return yes;
}

/* own_pins: pins the caller holds on m (a stage holds one). */
static int promote(struct store *s, const struct blob_meta *m, unsigned own_pins)
{
	int rc = move_blob(s, m, m->tier - 1, own_pins);

	if (rc == KVTIER_E_FULL || rc == -ENOSPC) {
		evict_tier(s, m->tier - 1, blob_raw_bytes(m), 0, 1);
		rc = move_blob(s, m, m->tier - 1, own_pins);
	}
	return rc;
}

int placement_promote_for_stage(struct store *s, struct blob_meta *m)
{
	struct blob_meta cur;
	int moved = 0;

	/* A Stage runs on the short-call pool that Lookup shares: it never
	 * waits for a placement pass holding move_lock (many disk copies), it
	 * copies the blob out instead. */
	if (pthread_mutex_trylock(&s->move_lock) != 0) {
		atomic_fetch_add(&s->promotions_declined, 1);
		return 0;
	}
	/* The stage holds one pin; anyone else's (a fetch, another lease) keeps
	 * the blob where it is, and the stage copies it out instead. */
	if (index_get(s->ix, &m->id, &cur, NULL, 0) == 0 && cur.tier > 0 &&
	    store_pin_count(s, &cur.id) <= 1) {
		if (should_promote(s, &cur)) {
			moved = promote(s, &cur, 1) == 0;
		} else {
			atomic_fetch_add(&s->promotions_declined, 1);
		}
	}
	if (moved)
		moved = index_get(s->ix, &m->id, m, NULL, 0) == 0;
	pthread_mutex_unlock(&s->move_lock);
	return moved;
}

void placement_kick(struct store *s)
{
	pthread_mutex_lock(&s->bg_lock);
	s->placer_kick = 1;
	pthread_cond_signal(&s->placer_cond);
	pthread_mutex_unlock(&s->bg_lock);
}

void placement_want_promote(struct store *s, const struct key *id)
{
	pthread_mutex_lock(&s->bg_lock);
	int dup = 0;
	for (size_t i = 0; i < s->n_promote && !dup; i++)
		dup = key_equal(&s->promote_q[i], id);
	if (!dup && s->n_promote < STORE_MAX_PROMOTE)
		s->promote_q[s->n_promote++] = *id;
	s->placer_kick = 1;
	pthread_cond_signal(&s->placer_cond);
	pthread_mutex_unlock(&s->bg_lock);
}

/* ---- the placement thread ---- */

static void placement_pass(struct store *s)
{
	struct key q[STORE_MAX_PROMOTE];
	size_t nq;

	for (unsigned t = 0; t < s->n_tiers; t++) {
		uint64_t load = tier_load(s, t), high = tier_mark(s, t, 1),
		         low = tier_mark(s, t, 0);
		if (load <= high || load <= low)
			continue;
		pthread_mutex_lock(&s->move_lock);
		evict_tier(s, t, load - low, 0, 0);
		pthread_mutex_unlock(&s->move_lock);
	}
	pthread_mutex_lock(&s->bg_lock);
	nq = s->n_promote;
	memcpy(q, s->promote_q, nq * sizeof(*q));
	s->n_promote = 0;
	pthread_mutex_unlock(&s->bg_lock);
	for (size_t i = 0; i < nq; i++) {
		struct blob_meta m;
		pthread_mutex_lock(&s->move_lock);
		if (index_get(s->ix, &q[i], &m, NULL, 0) == 0 && m.tier > 0 &&
		    !store_pinned(s, &m.id)) {
			if (should_promote(s, &m))
				promote(s, &m, 0);
			else
				atomic_fetch_add(&s->promotions_declined, 1);
		}
		pthread_mutex_unlock(&s->move_lock);
	}
}

void *placement_main(void *arg)
{
	struct store *s = arg;

	pthread_mutex_lock(&s->bg_lock);
	while (!s->bg_stop) {
		if (!s->placer_kick) {
			struct timespec ts;
			clock_gettime(CLOCK_REALTIME, &ts);
			ts.tv_sec += 1;
			pthread_cond_timedwait(&s->placer_cond, &s->bg_lock, &ts);
		}
		if (s->bg_stop)
			break;
		s->placer_kick = 0;
		pthread_mutex_unlock(&s->bg_lock);
		placement_pass(s);
		pthread_mutex_lock(&s->bg_lock);
	}
	pthread_mutex_unlock(&s->bg_lock);
	return NULL;
}
