/* store.h: kvtierd's storage core: the glue between the index (LMDB) and the
 * tiers. It knows slot files, blobs and leases; it knows nothing of gRPC.
 *
 * Every operation here may block (file I/O, LMDB write transactions): call
 * them from worker threads, never from a completion-queue thread.
 *
 * Return values: 0 on success, or a KVTIER_E_* code or -errno; every
 * function that takes err/errlen leaves a one-line message there a person
 * can act on ("tier tmpfs:/dev/shm/kvtier is full: ...").
 */
#ifndef KVTIER_STORE_H
#define KVTIER_STORE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "index.h"
#include "keys.h"
#include "tier.h"

#define STORE_MAX_TIERS 4
#define STORE_MAX_SLOT_DIRS 8
#define STORE_STAGE_PREFIX "kvtier-"   /* names Stage creates in slot dirs */

struct store_tier_config {
	char kind[16];        /* "tmpfs" or "disk" */
	char path[4096];
	uint64_t capacity;    /* bytes */
	double high, low;     /* watermarks, shares of capacity (0: the global ones) */
};

/* Why a blob left a tier other than by promotion or demotion. */
enum store_evict_reason {
	EVICT_CAPACITY = 0,   /* the last tier passed its high watermark: deleted */
	EVICT_NOT_WORTH,      /* restoring from the next tier costs more than prefill */
	EVICT_LOWER_FULL,     /* the next tier had no room even after its own eviction */
	STORE_EVICT_REASONS
};
extern const char *const store_evict_reason_name[STORE_EVICT_REASONS];

struct store_config {
	char data_dir[4096];
	struct store_tier_config tiers[STORE_MAX_TIERS];
	unsigned n_tiers;
	char slot_dirs[STORE_MAX_SLOT_DIRS][4096];
	unsigned n_slot_dirs;
	uint32_t block_size;          /* 0: recorded, or 64 for a new data dir */
	int supersede;                /* drop blobs that are strict prefixes of a new one */
	uint64_t max_blob_bytes;      /* per part; larger uploads are refused */
	unsigned lease_default_s, lease_max_s;
	uint64_t map_size;            /* LMDB map size, 0 = default */
	/* placement (docs/policy.md) */
	double high_watermark, low_watermark;  /* shares of each tier's capacity */
	double compress_min_saving;   /* store raw when LZ4 saves less (0.10); >= 1: never */
	int shuffle;                  /* enum codec_shuffle_mode (codec.h) */
	double assumed_prefill_tps;   /* prefill speed of a namespace with no reports */
	uint64_t probe_bytes;         /* size of the start-up probe per tier, 0 = none */
	int io_mode;                  /* enum tier_io_mode */
	unsigned io_depth;            /* requests in flight per disk stream */
	uint64_t io_request_bytes;    /* bytes per disk request */
	int verify_on_start;          /* reconcile every file even after a clean stop */
};

struct store;

/* Opens the data directory (creating it), the index and the tiers, then
 * reconciles them (crash recovery): temporaries and files without metadata
 * are removed, metadata whose files are missing or of the wrong size is
 * dropped, stale staged files in the slot directories are removed. What was
 * repaired is logged. */
int store_open(const struct store_config *cfg, struct store **out, char *err, size_t errlen);

/* Flushes access statistics, stops the background thread and frees all.
 * Leases end; staged files are removed. */
void store_close(struct store *s);

uint32_t store_block_size(const struct store *s);

/* Results of put and adopt. */
struct store_put_result {
	struct key id;
	int deduplicated;
	uint32_t n_tokens;
	unsigned tier;
	size_t n_superseded;
	struct key superseded[INDEX_MAX_SUPERSEDED];
};

/* A put in progress: parts are streamed in, then checked and committed. */
struct store_put;

/* Starts a put into namespace ns (1..INDEX_NS_MAX bytes of UTF-8) of
 * n_parts parts (1..PART_COUNT): finish refuses a put that got fewer
 * complete parts, so a stream cut between parts stores nothing.
 * reported_size, when not 0, is the slot file's size as the server that
 * wrote it reported it: a slot file (PART_MAIN) of another size is refused
 * with KVTIER_E_INVALID and both sizes in err (llama-server writes slot files
 * in place without fsync: a crash leaves a shorter file whose header is
 * valid). */
int store_put_begin(struct store *s, const char *ns, unsigned n_parts, uint64_t reported_size,
		    struct store_put **out, char *err, size_t errlen);

/* Starts part `part` (PART_MAIN first, then sidecars, each at most once)
 * of exactly `size` bytes; reserves room on the fastest tier. A PART_MAIN
 * whose size is not the reported size is refused here, before any byte. */
int store_put_part(struct store_put *p, int part, uint64_t size, char *err, size_t errlen);

/* Appends bytes to the current part. More than the announced size is
 * KVTIER_E_INVALID. */
int store_put_write(struct store_put *p, const void *buf, size_t len, char *err, size_t errlen);

/* Checks that every part is complete, parses and checks the slot header,
 * computes the keys, makes the files durable and renames them into place,
 * records the blob (layout check, dedup, supersession) and removes the
 * files of superseded blobs. Frees p whatever the result; on failure
 * nothing is left behind. */
int store_put_finish(struct store_put *p, struct store_put_result *res, char *err,
		     size_t errlen);

/* Drops a put: temporaries removed, reservations released, p freed. */
void store_put_abort(struct store_put *p);

/* Takes the file at `path`, directly inside one of the slot directories, and
 * its sidecars (path.tokens.json, path.checkpoints) into namespace ns by
 * link (same file system) or copy; then as store_put_finish. Refuses
 * symlinks, non-regular files and paths outside the slot directories
 * (KVTIER_E_DENIED), and, when reported_size is not 0, a slot file of
 * another size (KVTIER_E_INVALID, as store_put_begin). Unless keep_source,
 * the source names are removed after success (a save into the same name
 * later must not write into our inode); a refused file stays where it is. */
int store_adopt(struct store *s, const char *ns, const char *path, int keep_source,
		uint64_t reported_size, struct store_put_result *res, char *err, size_t errlen);

struct store_match {
	int found;
	struct blob_meta meta;
	uint32_t matched;
	const char *tier_kind;   /* static string */
	double est_restore_s;    /* the tier's cost model for this blob */
	double est_prefill_s;    /* the namespace's prefill model for the matched tokens */
};

/* Longest-prefix lookup (see index_lookup) plus counters. No blob I/O. */
int store_lookup(struct store *s, const char *ns, const int32_t *tokens, size_t n,
		 struct store_match *out, char *err, size_t errlen);

/* Reading a blob's parts. All parts are opened at once, so a concurrent
 * delete or supersession does not cut the stream short. */
struct store_fetch;

int store_fetch_open(struct store *s, const struct key *id, struct store_fetch **out,
		     struct blob_meta *meta, char *err, size_t errlen);

/* Reads up to len bytes of part `part` at offset off. Returns the count (0 at
 * the end of the part) or an error. Reads in sequence from offset 0 are
 * checked against the part's CRC-32C: the read that completes a part whose
 * bytes do not match returns KVTIER_E_CORRUPT (and the blob is dropped), so a
 * caller that streams what it reads never sends a whole corrupt part. */
ssize_t store_fetch_read(struct store_fetch *f, int part, void *buf, size_t len, uint64_t off);

void store_fetch_close(struct store_fetch *f);

/* Zero-copy reading of a raw part on a memory tier (tmpfs): len bytes at
 * off, mapped read-only, checked in sequence like store_fetch_read (the
 * piece that completes a part whose CRC-32C does not match is refused with
 * KVTIER_E_CORRUPT and the blob dropped: do not send it). The map lives on
 * after the fetch is closed until store_map_release (a gRPC slice release
 * fits). Returns 0 and *out, -ENOTSUP when the part
 * cannot be mapped (encoded, on a disk tier, empty: read it with
 * store_fetch_read), KVTIER_E_INVALID out of sequence, KVTIER_E_CORRUPT (also
 * for a file truncated under the mapping: SIGBUS is caught, not fatal). */
struct store_map;
int store_fetch_map(struct store_fetch *f, int part, uint64_t off, size_t len,
		    struct store_map **out);
const uint8_t *store_map_data(const struct store_map *m);
void store_map_release(void *m);

struct store_stage_result {
	char lease[33];
	char filename[256];
	char path[4096 + 256];
	int64_t expires_unix_ms;
	int copied;
	uint32_t n_tokens;
};

/* Makes blob id appear in slot directory `dir` (one of the configured slot
 * dirs, else KVTIER_E_DENIED) under a new name STORE_STAGE_PREFIX<random>.bin,
 * sidecars beside it with their suffixes, with a lease of lease_s seconds
 * (0: default; capped at the maximum). Never overwrites. */
int store_stage(struct store *s, const struct key *id, const char *dir, unsigned lease_s,
		struct store_stage_result *res, char *err, size_t errlen);

/* Ends a lease and removes its staged files. KVTIER_E_NOTFOUND if unknown
 * (already released or expired). */
int store_release(struct store *s, const char *lease, char *err, size_t errlen);

/* Deletes a blob: metadata first, then files. */
int store_delete(struct store *s, const struct key *id, char *err, size_t errlen);

/* Sets or clears the quarantine flag (a quarantined blob is never returned by
 * lookup). */
int store_quarantine(struct store *s, const struct key *id, char *err, size_t errlen);

/* The namespace rule, checked by every call that takes a namespace: 1 to
 * INDEX_NS_MAX bytes of strict UTF-8 without control characters
 * (common/utf8.h). Returns 0, or KVTIER_E_INVALID with err saying which byte
 * is wrong. */
int store_ns_valid(const char *ns, char *err, size_t errlen);

/* Records prefill timings reported by a client: `tokens` prefilled after
 * `prefix` tokens already in the context took `ms` (policy.h: the namespace's
 * prefill model). */
int store_report_prefill(struct store *s, const char *ns, uint32_t prefix, uint32_t tokens,
			 double ms, char *err, size_t errlen);

/* Walks blobs like index_list, adding each blob's tier kind. */
int store_list(struct store *s, const char *ns, const struct key *after, size_t limit,
	       int (*cb)(void *ctx, const struct blob_meta *m, const char *ns, const char *tier_kind),
	       void *ctx, int *more);

struct store_tier_stats {
	unsigned index;
	const char *kind;
	const char *path;
	uint64_t capacity, used, reserved, blobs;
	uint64_t read_bytes, write_bytes;
	double read_seconds, write_seconds;
	double read_bytes_per_s, read_fixed_s;  /* restore cost model */
	uint64_t model_samples;
	const char *io;                  /* tier_io_desc() */
	const char *io_fallback;         /* why not io_uring+O_DIRECT ("" if it is) */
	double high, low;                /* watermarks in bytes */
	double gdsf_base;                /* GDSF inflation value L */
	uint64_t raw_bytes, stored_bytes; /* blobs on the tier, served vs stored */
	uint64_t evictions[STORE_EVICT_REASONS];
	uint64_t moved_in, moved_out, moved_in_bytes, enospc;
	uint64_t dir_missing;            /* 1: the directory was removed or moved (store_tier_check) */
	uint64_t dir_events;             /* removals or moves of the directory detected */
	uint64_t read_ops, write_ops;
	uint64_t read_hist[TIER_HIST_BUCKETS + 1], write_hist[TIER_HIST_BUCKETS + 1];
	double read_hist_sum, write_hist_sum;
	double compression_ratio;        /* raw_bytes / stored_bytes (1 when empty) */
};

struct store_ns_stats {
	char ns[INDEX_NS_MAX + 1];
	uint64_t blobs, bytes, lookups, hits, matched_tokens;
	uint64_t opaque_blobs;        /* blobs whose state layout was not walked (BLOB_F_OPAQUE) */
	double prefill_tps;           /* EMA of reported prefill speeds */
	double prefill_a, prefill_b;  /* model: seconds per token, extra per token of depth */
	double prefill_samples;       /* reports fitted (decayed count is in the fit) */
};

#define STORE_STATE_KINDS (SLOT_STATE_HYBRID + 1) /* enum slot_state_kind values */

struct store_stats {
	uint64_t blobs, bytes;
	uint64_t lookups, hits, matched_tokens;
	uint64_t puts, put_bytes, adopts, dedups, supersessions, refused;
	uint64_t puts_state[STORE_STATE_KINDS]; /* new blobs by enum slot_state_kind */
	uint64_t fetches, fetch_bytes, stages, stage_copies, releases, lease_expiries, deletes;
	uint64_t quarantined, active_leases;
	uint64_t checksum_failures;   /* parts that failed their CRC on read: dropped */
	uint64_t stage_checks, stage_check_bytes; /* parts Stage read to check, and bytes */
	uint64_t adopt_copies;        /* adopts that copied where a link was allowed */
	uint64_t promotions_declined; /* hits on a lower tier the policy left there */
	uint64_t migrations[STORE_MAX_TIERS][STORE_MAX_TIERS]; /* [from][to] */
	uint64_t reconcile_removed_files, reconcile_removed_blobs;
	uint64_t remove_failures;     /* unlinks of deleted blobs' files that failed */
	uint64_t removals_pending;    /* such files waiting for their retry now */
	uint64_t missing_dropped;     /* records dropped at run time: their files were gone */
	unsigned n_tiers;
	struct store_tier_stats tiers[STORE_MAX_TIERS];
};

/* Snapshot of the counters. */
void store_get_stats(struct store *s, struct store_stats *out);

/* Calls cb for each namespace with its counters (blobs/bytes from the
 * index, lookups/hits since start). */
int store_ns_stats(struct store *s, int (*cb)(void *ctx, const struct store_ns_stats *n),
		   void *ctx);

/* Calls cb for each namespace with its prefill model only (cheap: no blob
 * walk; blobs/bytes/lookups are 0). */
int store_ns_models(struct store *s, int (*cb)(void *ctx, const struct store_ns_stats *n),
		    void *ctx);

/* Configuration as running (Info). */
const struct store_config *store_config(const struct store *s);

#endif /* KVTIER_STORE_H */
