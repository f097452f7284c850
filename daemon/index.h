/* index.h: kvtierd's metadata in LMDB: blobs, their tokens, the prefix index
 * and namespaces. Never blob bytes.
 *
 * One environment (DIR/index/) with named databases:
 *   meta    "schema" -> u32, "block_size" -> u32, "next_ns" -> u32, "tiers" -> text
 *   ns      namespace name -> struct ns_rec
 *   nsid    u32 id -> namespace name
 *   blobs   blob id (32 bytes) -> struct blob_meta
 *   tokens  blob id -> n_tokens x i32
 *   prefix  be32 ns id || block key -> blob ids (DUPSORT, DUPFIXED)
 *   ends    be32 ns id || key of the blob's last full block -> blob ids
 *           (DUPSORT, DUPFIXED): finds blobs that are prefixes of a new one
 *
 * Records are stored in host byte order (LMDB files are not portable across
 * architectures anyway). Every function opens and ends its own transaction:
 * no transaction outlives a call, so the environment is opened MDB_NOTLS and
 * any thread may call anything. Write functions serialize on LMDB's writer
 * lock; callers must not call them from a gRPC completion-queue thread.
 *
 * Return values: 0 on success, KVTIER_E_NOTFOUND, KVTIER_E_LAYOUT,
 * KVTIER_E_INVALID, KVTIER_E_INTERNAL (an LMDB error; err says which), or
 * -errno. Where a function takes err/errlen, a failure leaves a one-line
 * reason there.
 */
#ifndef KVTIER_INDEX_H
#define KVTIER_INDEX_H

#include <stddef.h>
#include <stdint.h>

#include "keys.h"
#include "slotfile.h"

#define INDEX_SCHEMA 3          /* 3: blob records v3; schemas 1 and 2 are upgraded */
#define INDEX_DEFAULT_BLOCK 64
#define INDEX_NS_MAX 255           /* bytes of a namespace name */
#define INDEX_MAX_SUPERSEDED 64    /* per put; further ones stay */
#define INDEX_LOOKUP_CANDIDATES 64 /* blobs compared at the deepest block: the rest can
                                    * only add < one block of matched tokens */
#define INDEX_JUMP_CANDIDATES 8    /* a depth held by at most this many blobs is checked
                                    * for one whose last_key spares hashing */

enum blob_part { PART_MAIN = 0, PART_TOKENS_JSON = 1, PART_CHECKPOINTS = 2, PART_COUNT = 3 };

/* "" , ".tokens.json", ".checkpoints" */
extern const char *const blob_part_suffix[PART_COUNT];

/* Returns the part whose suffix is s, or -1. */
int blob_part_from_suffix(const char *s);

/* Flags of a blob record. Bits 2-4 and the state field are set at put from
 * the slot file (slot_parse's struct slot_info) and never change; records
 * written before kvtier recorded them have them all 0 (state unknown). */
enum blob_flags {
	BLOB_F_QUARANTINED = 1u << 0,
	BLOB_F_LAST_KEY = 1u << 1, /* last_key holds the chain key of the last full block */
	BLOB_F_OPAQUE = 1u << 2,   /* the state's layout was not walked (SLOT_STATE_OPAQUE) */
	BLOB_F_PACKED = 1u << 3,   /* packed token payload (SLOT_TOKENS_PACKED) */
	BLOB_F_MEDIA = 1u << 4,    /* the payload holds media: tokens indexed only up to
	                            * the first media position (n_tokens < n_tokens_all) */
	BLOB_F_STATE_MASK = 0xfu << 8, /* enum slot_state_kind + 1; 0: not recorded */
};
#define BLOB_F_STATE_SHIFT 8

/* The flags recorded for a slot file parsed into *info. */
static inline uint32_t blob_flags_of_slot(const struct slot_info *info)
{
	uint32_t f = ((info->state_kind + 1u) << BLOB_F_STATE_SHIFT) & BLOB_F_STATE_MASK;

	if (info->state_kind == SLOT_STATE_OPAQUE)
		f |= BLOB_F_OPAQUE;
	if (info->token_form == SLOT_TOKENS_PACKED)
		f |= BLOB_F_PACKED;
	if (info->n_tokens < info->n_tokens_all)
		f |= BLOB_F_MEDIA;
	return f;
}

/* The blob's enum slot_state_kind, or -1 when its record predates it. */
static inline int blob_state_kind(uint32_t flags)
{
	return (int)((flags & BLOB_F_STATE_MASK) >> BLOB_F_STATE_SHIFT) - 1;
}

struct blob_meta {
	uint32_t rec_version;     /* 3 (1 and 2: written by older builds, read as they are) */
	uint32_t ns_id;
	struct key id;
	uint32_t n_tokens;
	uint32_t version;         /* slot header version */
	uint32_t tier;            /* tier index, 0 = fastest */
	uint32_t parts;           /* bit (1 << part) set for each stored part */
	uint32_t flags;           /* enum blob_flags */
	uint32_t compression;     /* 0 = none */
	uint64_t part_size[PART_COUNT];  /* bytes of each part as served */
	uint32_t part_crc[PART_COUNT];   /* CRC-32C of each part as served */
	uint64_t stored_size;     /* bytes on the tier, all parts */
	int64_t created_ms;       /* unix ms */
	int64_t last_access_ms;
	uint64_t hits;
	/* Record version 2 (kvtier 0.2) appends the fields below; a version 1
	 * record is read with part_stored = part_size and the rest 0. */
	uint64_t part_stored[PART_COUNT]; /* bytes of each part on its tier (encoded) */
	double gdsf_base;         /* its tier's GDSF inflation value at the last access */
	double ratio;             /* raw / stored bytes of the main part (1 = raw) */
	/* Record version 3 appends the chain key of the blob's last full block
	 * (valid with BLOB_F_LAST_KEY): a lookup whose tokens cover the blob's
	 * full blocks takes the query's key at that depth from here instead of
	 * hashing up to it. Older records read without it. */
	struct key last_key;
};
#define BLOB_REC_VERSION 3 /* written by this build; 1 and 2 are read */
#define BLOB_REC_V1_SIZE offsetof(struct blob_meta, part_stored)
#define BLOB_REC_V2_SIZE offsetof(struct blob_meta, last_key)

/* Bytes of all parts as served (raw). */
static inline uint64_t blob_raw_bytes(const struct blob_meta *m)
{
	uint64_t n = 0;

	for (int p = 0; p < PART_COUNT; p++)
		if (m->parts & (1u << p))
			n += m->part_size[p];
	return n;
}

struct ns_rec {
	uint32_t id;
	uint32_t layout_len;      /* 0 = no layout recorded yet */
	uint8_t layout[SLOT_LAYOUT_MAX];
	double prefill_tps;       /* measured prefill tokens/s, 0 = unknown */
	uint64_t prefill_samples;
	/* Version 2 appends the prefill model (policy.h: struct prefill_model);
	 * a version 1 record reads as an empty model. */
	double pf[8];
};
#define NS_REC_V1_SIZE offsetof(struct ns_rec, pf)

struct index;

/* Opens or creates the index under dir/index. block_size 0 means "the one
 * recorded, or INDEX_DEFAULT_BLOCK for a new index"; a non-zero value that
 * disagrees with the recorded one is refused (KVTIER_E_INVALID: the block
 * size is fixed per data directory). readonly opens without writing
 * anything (fsck). map_size is the LMDB map size in bytes (0 = 64 GiB). */
int index_open(const char *dir, uint32_t block_size, int readonly, uint64_t map_size,
	       struct index **out, char *err, size_t errlen);
void index_close(struct index *ix);

uint32_t index_block_size(const struct index *ix);

/* Reads/writes a small value of the meta database (e.g. "tiers"). get copies
 * at most cap bytes into buf and sets *len to the stored length. */
int index_meta_get(struct index *ix, const char *key, void *buf, size_t cap, size_t *len);
int index_meta_put(struct index *ix, const char *key, const void *val, size_t len);

/* Result of index_put(). */
struct index_put_result {
	int deduplicated;                  /* the id existed: nothing was written */
	struct blob_meta stored;           /* the record now in the index */
	size_t n_superseded;
	struct blob_meta superseded[INDEX_MAX_SUPERSEDED]; /* removed from the index */
};

/* Records a new blob in one write transaction:
 * - resolves namespace `ns`, creating it if new; when `layout` is given and
 *   the namespace has a different one recorded: KVTIER_E_LAYOUT and a reason
 *   naming both; when the namespace has none yet, this one is recorded;
 * - if meta->id exists: nothing changes, res->deduplicated = 1;
 * - else stores meta (ns_id filled in), tokens[0..meta->n_tokens), one
 *   prefix entry per chain key (chain has n_tokens / block_size keys) and
 *   the ends entry;
 * - when supersede != 0: every other blob of the namespace whose tokens are
 *   a strict prefix of these is removed from the index and returned in res
 *   (the caller removes their files).
 * meta->n_tokens must be >= block size (KVTIER_E_INVALID otherwise). */
int index_put(struct index *ix, const char *ns, const uint8_t *layout, size_t layout_len,
	      const struct blob_meta *meta, const int32_t *tokens, const struct key *chain,
	      int supersede, struct index_put_result *res, char *err, size_t errlen);

struct index_match {
	int found;
	struct blob_meta meta;
	uint32_t matched;                  /* tokens, token-exact */
	uint32_t keys_hashed;              /* blocks of the query hashed (index_lookup_tokens) */
	uint32_t jumps;                    /* depths taken from a candidate's last_key */
	double ns_pf[8];                   /* the namespace's prefill model words (ns_rec.pf),
					    * read in the same transaction; 0 if unknown */
};

/* Finds the blob of namespace `ns` sharing the longest prefix with
 * tokens[0..n) (chain = the query's n / block_size block keys). Ties go to
 * the lower tier index, then the newer blob. Quarantined blobs are skipped.
 * A miss (including an unknown namespace) is 0 with out->found = 0. Reads
 * only LMDB pages, never blob bytes. */
int index_lookup(struct index *ix, const char *ns, const int32_t *tokens, size_t n,
		 const struct key *chain, size_t n_chain, struct index_match *out);

/* index_lookup computing the query's chain keys itself, only as deep as the
 * search needs them (galloping then binary search over depths). At a depth
 * with few blobs, a blob whose full blocks all equal the query's tokens
 * hands over its last_key: the search goes on from that blob's depth
 * without hashing the blocks below it. The answer is index_lookup's. */
int index_lookup_tokens(struct index *ix, const char *ns, const int32_t *tokens, size_t n,
			struct index_match *out);

/* Copies the record of blob `id`; ns (may be NULL) receives its namespace
 * name (ns_cap >= INDEX_NS_MAX + 1). Returns 0 or KVTIER_E_NOTFOUND. */
int index_get(struct index *ix, const struct key *id, struct blob_meta *out, char *ns,
	      size_t ns_cap);

/* Copies the token array of blob `id` into a malloc'd array (caller frees). */
int index_get_tokens(struct index *ix, const struct key *id, int32_t **tokens, uint32_t *n);

/* Removes blob `id` and all its entries; *out (may be NULL) gets the record
 * as it was. Returns 0 or KVTIER_E_NOTFOUND. */
int index_delete(struct index *ix, const struct key *id, struct blob_meta *out);

/* Replaces the record of an existing blob with *meta (the tests' way to set
 * up a state). The id, ns_id and n_tokens must not change. Returns 0 or
 * KVTIER_E_NOTFOUND. */
int index_update(struct index *ix, const struct blob_meta *meta);

/* Sets the flags `set` on blob id's record, changing nothing else, in one
 * write transaction (access statistics flushed meanwhile are kept).
 * *had_all (may be NULL) tells whether they were all set already. Returns 0
 * or KVTIER_E_NOTFOUND. */
int index_set_flags(struct index *ix, const struct key *id, uint32_t set, int *had_all);

/* A move of a blob between tiers (or a change of its stored form). */
struct index_placement {
	struct key id;
	uint32_t from_tier;       /* the record must still say this tier, */
	uint32_t parts;           /* have these parts, */
	uint32_t part_crc[PART_COUNT]; /* with these CRCs (the bytes copied) */
	uint32_t to_tier;
	uint32_t compression;     /* codec_kind of the stored parts */
	uint64_t part_stored[PART_COUNT];
	double ratio;
	double gdsf_base;
};

/* Records a completed move in one transaction, changing only the placement
 * fields (access statistics flushed meanwhile are kept). KVTIER_E_NOTFOUND
 * if the blob is gone, KVTIER_E_EXISTS if its record no longer says
 * from_tier or describes other bytes (moved, or deleted and put again,
 * meanwhile): the caller removes its new copy. */
int index_set_placement(struct index *ix, const struct index_placement *pl);

struct index_touch {
	struct key id;
	uint64_t hits;            /* added */
	int64_t last_access_ms;   /* kept if newer */
	double gdsf_base;         /* kept if larger (0: unchanged), and only when the */
	uint32_t tier;            /* blob is still on this tier: a base is per tier */
};

/* Applies a batch of access statistics in one write transaction; ids that no
 * longer exist are skipped. */
int index_touch(struct index *ix, const struct index_touch *t, size_t n);

/* Calls cb for each blob in id order, starting after `after` (NULL: from the
 * first), of namespace ns (NULL or "": all), at most `limit` times (0: no
 * limit). *more (may be NULL) is set when blobs remain. The pointers passed
 * to cb are valid only during the call; a non-zero return stops the walk and
 * is returned. The walk runs in one read transaction: cb must not call
 * index write functions. */
int index_list(struct index *ix, const char *ns, const struct key *after, size_t limit,
	       int (*cb)(void *ctx, const struct blob_meta *m, const char *ns), void *ctx,
	       int *more);

/* Calls cb for every namespace. Same rules as index_list(). */
int index_ns_list(struct index *ix, int (*cb)(void *ctx, const char *name, const struct ns_rec *r),
		  void *ctx);

/* Updates a namespace's measured prefill speed (exponential moving average
 * with weight `alpha` for the new sample) and, when refit is not NULL, lets
 * it change the prefill model words (struct ns_rec.pf) as read, in one
 * write transaction (a read-refit-write with no lock of the caller's).
 * KVTIER_E_NOTFOUND if unknown. */
int index_ns_report_prefill(struct index *ix, const char *ns, double tokens_per_s, double alpha,
			    void (*refit)(double pf[8], void *ctx), void *ctx);

/* Reads namespace ns's record. KVTIER_E_NOTFOUND if unknown. */
int index_ns_get(struct index *ix, const char *ns, struct ns_rec *out);

/* Checks the databases against each other without changing anything:
 * prefix/ends entries naming missing blobs, blobs missing their tokens or
 * prefix entries, token counts that disagree, unknown namespace ids. Calls
 * report once per problem with a one-line description; returns the number
 * of problems (>= 0) or an error. */
int index_check(struct index *ix, void (*report)(void *ctx, const char *problem), void *ctx);

#endif /* KVTIER_INDEX_H */
