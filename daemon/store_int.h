/* store_int.h: the inside of struct store, shared by store.c (puts, fetches,
 * stages, leases, reconcile) and placement.c (cost models, eviction,
 * migration between tiers). Nothing outside those two files includes it.
 *
 * Locks, in the order they may be taken (never the reverse):
 *   move_lock   one migration or eviction pass at a time (placement.c)
 *   commit_lock a blob's files and its index record change together
 *   lease_lock, pin_lock, touch_lock, ns_lock, model_lock, verified_lock:
 *               leaf locks, held for a few instructions, never around I/O
 */
#ifndef KVTIER_STORE_INT_H
#define KVTIER_STORE_INT_H

#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>

#include "codec.h"
#include "policy.h"
#include "store.h"
#include "tier.h"

#define STORE_MAX_NS_COUNTERS 1024
#define STORE_TOUCH_MAX 65536
#define STORE_MAX_LEASES 4096
#define STORE_MAX_PROMOTE 256 /* queued promotion requests */
#define STORE_COPY_CHUNK (1u << 20)
#define STORE_VERIFIED_SLOTS 8192 /* tmpfs parts Stage remembers as checked */
#define STORE_SETTLE_TRIES 20          /* waits for a tier file's time to settle */
#define STORE_SETTLE_NS 1000000        /* 1 ms each (a clock tick is 1-10 ms) */

struct lease {
	struct lease *next;
	char id[33];
	struct key blob;   /* pinned while the lease lives */
	unsigned slot_dir; /* index into slot dir fds */
	char name[256];    /* staged main file name */
	uint32_t parts;    /* parts staged (bit per part) */
	int64_t expires_ms;
};

/* A part on tier 0 whose bytes were checked against its CRC-32C (or written
 * and checksummed by the daemon itself), and the identity of its file then
 * (tier_file_id). Stage hard-links such a part without reading it while
 * its file's identity is unchanged. used == 0: an empty slot. */
struct verified_part {
	struct key id;
	uint32_t part;
	uint32_t crc;
	int used;
	struct tier_file_id fid;
};

/* A tier file whose unlink failed (read-only file system, I/O error): its
 * blob left the index, the file still takes its bytes on the tier, and the
 * background thread retries it every second (store.c, remove_later). */
struct pending_rm {
	struct key id;
	unsigned tier;
	int part;
	uint64_t size; /* as accounted on the tier */
};

#define STORE_MAX_PENDING_RM 65536 /* beyond: left to the next start's reconcile */

struct ns_counter {
	char ns[INDEX_NS_MAX + 1];
	uint64_t lookups, hits, matched;
};

struct pin {
	struct key id;
	unsigned count;
};

/* Placement state of one tier. */
struct tier_place {
	struct cost_model model; /* model_lock */
	double L;                /* GDSF inflation value (model_lock) */
	double lowest_h;         /* lowest resident priority at the last scan */
	int64_t lowest_at_ms;    /* when that scan ran; 0 = never */
	int compresses;          /* blobs moved here are LZ4-encoded when it pays */
	_Atomic uint64_t raw_bytes, stored_bytes; /* blobs on the tier: served vs stored */
	_Atomic uint64_t evictions[STORE_EVICT_REASONS];
	_Atomic uint64_t moved_in_bytes; /* stored bytes migrated into the tier */
	_Atomic uint64_t enospc;
	_Atomic uint64_t fs_limit;     /* bytes the file system held at the last ENOSPC; 0 none */
};

struct store {
	struct store_config cfg;
	struct index *ix;
	struct tier *tiers[STORE_MAX_TIERS];
	unsigned n_tiers;
	int slot_fd[STORE_MAX_SLOT_DIRS];
	char slot_real[STORE_MAX_SLOT_DIRS][PATH_MAX];
	uint32_t block;

	pthread_mutex_t commit_lock; /* file commit + index_put of one blob at a time */

	pthread_mutex_t lease_lock;
	struct lease *leases;

	pthread_mutex_t pin_lock; /* blobs being read or staged: never moved */
	struct pin *pins;
	size_t n_pins, cap_pins;

	pthread_mutex_t verified_lock; /* parts Stage may link unread */
	struct verified_part *verified; /* STORE_VERIFIED_SLOTS, direct-mapped */

	pthread_mutex_t touch_lock;
	struct index_touch *touch;
	size_t n_touch;

	pthread_mutex_t ns_lock;
	struct ns_counter *ns_counters;
	size_t n_ns_counters;

	pthread_mutex_t model_lock;  /* tier models, L values */
	struct tier_place place[STORE_MAX_TIERS];

	pthread_mutex_t move_lock;               /* one migration / eviction pass at a time */
	struct key promote_q[STORE_MAX_PROMOTE]; /* under bg_lock */
	size_t n_promote;

	pthread_t bg, placer;
	int bg_started, placer_started;
	pthread_mutex_t bg_lock;
	pthread_cond_t bg_cond, placer_cond;
	int bg_stop;
	int placer_kick;      /* under bg_lock: run a pass now */
	_Atomic int stopping; /* store_close began: long passes stop early */
	int opened;           /* store_open finished: a close records a clean stop */

	_Atomic uint64_t lookups, hits, matched_tokens;
	_Atomic uint64_t puts, put_bytes, adopts, dedups, supersessions, refused;
	_Atomic uint64_t puts_state[STORE_STATE_KINDS]; /* new blobs by enum slot_state_kind */
	_Atomic uint64_t fetches, fetch_bytes, stages, stage_copies, releases, lease_expiries,
	    deletes, quarantined, active_leases;
	uint64_t reconcile_files, reconcile_blobs;
	_Atomic uint64_t tier_blobs[STORE_MAX_TIERS]; /* slot files (part 0) per tier */
	_Atomic uint64_t checksum_failures;
	_Atomic uint64_t stage_checks, stage_check_bytes; /* Stage reads to check a part */
	_Atomic uint64_t adopt_copies; /* adopts copied: the inode could not be made ours */
	_Atomic uint64_t promotions_declined;
	_Atomic uint64_t migrations[STORE_MAX_TIERS][STORE_MAX_TIERS]; /* [from][to] */
	/* Files that went missing at run time (a tier directory removed, a file
	 * deleted by hand) or could not be removed: the index may name files
	 * that are gone, or the tiers hold files no record names, so a stop
	 * must not be recorded as clean (the next start checks every file). */
	_Atomic int files_missing;
	_Atomic int rm_overflow;                     /* a failed removal not kept in rm */
	pthread_mutex_t rm_lock;                     /* leaf: rm, n_rm, cap_rm */
	struct pending_rm *rm;
	size_t n_rm, cap_rm;
	_Atomic uint64_t remove_failures;            /* unlinks that failed */
	_Atomic uint64_t missing_dropped;            /* records dropped: their files were gone */
	pthread_mutex_t dir_lock;                    /* one tier-directory check at a time;
						      * taken before commit_lock */
	_Atomic int dir_state[STORE_MAX_TIERS];      /* enum tier_dir_state, last seen */
	_Atomic uint64_t dir_events[STORE_MAX_TIERS]; /* removals or moves detected */
};

struct store_put {
	struct store *s;
	char ns[INDEX_NS_MAX + 1];
	struct tier_writer *w[PART_COUNT];
	uint64_t size[PART_COUNT];
	uint64_t written[PART_COUNT];
	uint32_t crc[PART_COUNT];
	uint32_t parts;   /* bit per started part */
	int cur;          /* part being written, -1 none */
	int crc_known;    /* crc[] filled while streaming */
	unsigned n_parts; /* parts announced */
	uint64_t reported_size; /* slot file size the server reported; 0: not given */
};

/* Reading one stored part as served bytes: through the decoder when the
 * part is encoded, checking the CRC-32C as the bytes go by. */
struct part_src {
	struct tier_reader *r;
	struct codec_dec *dec; /* NULL for a raw part */
	uint64_t stored_off;   /* next encoded byte to read (dec) */
	uint64_t pos;          /* served bytes returned so far (dec) */
};

struct store_fetch {
	struct store *s;
	struct blob_meta meta;
	struct part_src src[PART_COUNT];
	uint64_t crc_off[PART_COUNT]; /* bytes covered by crc[] (sequential reads) */
	uint32_t crc[PART_COUNT];
	double io_s; /* seconds spent opening and reading */
	int pinned;
	int opened; /* every part opened: a read can count as a restore */
};

/* ---- helpers in store.c used by placement.c ---- */

void store_set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
int64_t store_now_ms(void);
double store_mono(void);
void store_part_name(const struct key *id, int part, char *out, size_t cap);
/* Removes a blob's files from a tier and fixes the counters. A file that
 * is gone already is accounted out (and noted: no clean stop); one whose
 * unlink fails is kept for a retry (remove_later). */
void store_remove_parts(struct store *s, unsigned tier, const struct blob_meta *m);
/* Removes one committed file that no index record names (a blob's part, or
 * a migration's copy being undone) the same way: accounted out when already
 * gone, retried every second when the unlink fails. */
void store_remove_file(struct store *s, unsigned tier, const struct key *id, int part,
		       uint64_t stored);
/* Opens part p of blob m for reading served bytes from its tier. */
int part_src_open(struct store *s, const struct blob_meta *m, int p, struct part_src *src);
/* Reads up to len served bytes at off (sequential only for encoded parts). */
ssize_t part_src_read(struct part_src *src, void *buf, size_t len, uint64_t off);
void part_src_close(struct part_src *src);
/* Counts a checksum failure, logs it and drops the blob. */
/* Writes part p of blob m, as served bytes checked against its CRC, to a
 * new file dst in directory dirfd (temporary name, then a rename that never
 * overwrites). Returns 0, KVTIER_E_EXISTS, KVTIER_E_CORRUPT (blob dropped)
 * or -errno. *seconds gets the time spent reading. */
int store_copy_out(struct store *s, const struct blob_meta *m, int p, int dirfd, const char *dst,
                   double *seconds);
void store_drop_corrupt(struct store *s, const struct blob_meta *m, int part, const char *during);
/* Checks tier t's directory (tier_dir_check), logs a change, reopens a
 * recreated one and drops the records whose files went with a removed one.
 * why (may be NULL) gets the tier's message. Never called with commit_lock
 * or move_lock held. Returns an enum tier_dir_state or -errno. */
int store_tier_check(struct store *s, unsigned t, char *why, size_t whylen);
/* Files waiting for a retried removal, and their bytes (rm_lock inside). */
size_t store_pending_removals(struct store *s, uint64_t *bytes);

void store_pin(struct store *s, const struct key *id);
void store_unpin(struct store *s, const struct key *id);
int store_pinned(struct store *s, const struct key *id);
unsigned store_pin_count(struct store *s, const struct key *id);

/* ---- placement.c ---- */

/* Probes every tier and starts the cost models (store_open). */
void placement_init(struct store *s);
/* The placement thread: watermarks, queued promotions. */
void *placement_main(void *arg);
/* Wakes the placement thread (after a put, or a hit on a lower tier). */
void placement_kick(struct store *s);
/* Queues blob id for a promotion decision (a fetch from a lower tier). */
void placement_want_promote(struct store *s, const struct key *id);
/* Makes room for `need` bytes on tier t by demoting or evicting its
 * lowest-priority blobs (below the low watermark if it can). Touches
 * nothing when eviction could not make the bytes fit: `need` above the
 * tier's capacity, or more than its unpinned blobs hold missing. Returns 0
 * when something was freed, KVTIER_E_FULL when nothing could or would be. */
int placement_make_room(struct store *s, unsigned t, uint64_t need);
/* A write to tier t failed with ENOSPC: counts it, and caps the capacity
 * its watermarks apply to at what the tier holds now. */
void placement_note_enospc(struct store *s, unsigned t);
/* The capacity tier t's watermarks apply to (configured, or less after an
 * ENOSPC). */
uint64_t placement_capacity(struct store *s, unsigned t);
/* Feeds the tier's cost model with a real read. */
void placement_observe_read(struct store *s, unsigned t, uint64_t bytes, double seconds);
/* Estimated restore seconds of `bytes` from tier t. */
double placement_restore_s(struct store *s, unsigned t, uint64_t bytes);
/* A stage hit a blob on a lower tier: promotes it (synchronously) when the
 * policy says so. Returns 1 and refreshes *m when it moved, else 0. */
int placement_promote_for_stage(struct store *s, struct blob_meta *m);
/* The GDSF inflation value of tier t now. */
double placement_base(struct store *s, unsigned t);

#endif /* KVTIER_STORE_INT_H */
