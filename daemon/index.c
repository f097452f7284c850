/* index.c: kvtierd's metadata in LMDB (see index.h): blob records, their
 * tokens, the prefix and ends multimaps, and namespaces.
 *
 * Every function runs in its own transaction and ends it before returning:
 * no snapshot outlives a call (a long-lived read transaction would stop
 * LMDB from reusing pages and make the map grow). Commits are durable (no
 * MDB_NOSYNC): a put that returned is on disk. Lookups are the hot path:
 * they read only mapped LMDB pages, compare tokens straight from the mapped
 * values (which need not be 4-byte aligned, hence memcmp and never a cast)
 * and allocate only the chain keys of a query longer than 64 blocks.
 *
 * This module must never read, write or name blob files: it holds metadata
 * only. Keys of the prefix and ends databases are a big-endian namespace id
 * followed by a 32-byte chain key; the block keys themselves are computed
 * by the caller (put, lookup) or here from stored tokens (delete, check).
 */
#include "index.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <lmdb.h>

#include "kvtier.h"
#include "log.h"
#include "policy.h"

#define INDEX_DEFAULT_MAP (64ull << 30) /* sparse: costs address space only */
#define INDEX_MAX_BLOCK 65536u
#define INDEX_MAX_DBS 8
#define INDEX_MAX_READERS 126
#define PKEY_LEN (4 + KEY_LEN) /* be32 ns id || chain key */

const char *const blob_part_suffix[PART_COUNT] = {"", ".tokens.json", ".checkpoints"};

int blob_part_from_suffix(const char *s)
{
	int part = -1;

	if (!s)
		goto out;
	for (int i = 0; i < PART_COUNT; i++) {
		if (strcmp(s, blob_part_suffix[i]) == 0) {
			part = i;
			break;
		}
	}
out:
	return part;
}

struct index {
	MDB_env *env;
	MDB_dbi meta, ns, nsid, blobs, tokens, prefix, ends;
	uint32_t block;
	int readonly;
	char path[PATH_MAX]; /* DIR/index, for messages */
};

/* ---- small helpers ---- */

static void set_err(char *err, size_t errlen, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;

	if (!err || errlen == 0)
		return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

/* Maps an LMDB return code to ours and says what failed: in err when the
 * caller gave a buffer, else in the log. */
static int index_fail(int mrc, const char *op, char *err, size_t errlen)
{
	const char *hint = "";
	int rc;

	switch (mrc) {
	case MDB_MAP_FULL:
		rc = KVTIER_E_FULL;
		hint = " (the index map is full: restart kvtierd with a larger --map-size)";
		break;
	case ENOSPC:
	case EDQUOT:
	case EIO:
	case ENOMEM:
	case EACCES:
	case EPERM:
	case EROFS:
		rc = -mrc;
		break;
	default:
		rc = KVTIER_E_INTERNAL;
		break;
	}
	if (err && errlen)
		set_err(err, errlen, "index: %s: %s%s", op, mdb_strerror(mrc), hint);
	else
		klog(LOG_WARN, "event=index_error op=%s err=\"%s%s\"", op, mdb_strerror(mrc), hint);
	return rc;
}

/* A record of the wrong size: the index is damaged or from another build. */
static int index_corrupt(const char *what, size_t got, size_t want, char *err, size_t errlen)
{
	if (err && errlen)
		set_err(err, errlen,
			"index: %s record has %zu bytes, expected %zu: run kvtier fsck", what,
			got, want);
	else
		klog(LOG_WARN, "event=index_corrupt what=%s bytes=%zu expected=%zu", what, got,
		     want);
	return KVTIER_E_INTERNAL;
}

static int index_readonly(struct index *ix, char *err, size_t errlen)
{
	if (err && errlen)
		set_err(err, errlen, "index %s is open read-only", ix->path);
	else
		klog(LOG_WARN, "event=index_error err=\"write on a read-only index\"");
	return -EROFS;
}

static void be32_put(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)(v >> 24);
	p[1] = (uint8_t)(v >> 16);
	p[2] = (uint8_t)(v >> 8);
	p[3] = (uint8_t)v;
}

static uint32_t be32_get(const uint8_t *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Key of the prefix and ends databases. */
static void pkey(uint8_t out[PKEY_LEN], uint32_t nsid, const struct key *k)
{
	be32_put(out, nsid);
	memcpy(out + 4, k->b, KEY_LEN);
}

/* Length of a valid namespace name (1..INDEX_NS_MAX bytes), else 0. A C
 * string cannot hold a NUL, so only the length needs checking. */
static size_t ns_len_valid(const char *ns)
{
	size_t n;

	if (!ns)
		return 0;
	n = strnlen(ns, INDEX_NS_MAX + 1);
	return n > INDEX_NS_MAX ? 0 : n;
}

/* Record decoders: the current size, or a version 1 record (shorter: the
 * fields added since read as their defaults). Return 0, or -1 for a size
 * that is neither. */
static int blob_decode(const MDB_val *v, struct blob_meta *m)
{
	if (v->mv_size != sizeof(*m) && v->mv_size != BLOB_REC_V2_SIZE &&
	    v->mv_size != BLOB_REC_V1_SIZE)
		return -1;
	memset(m, 0, sizeof(*m));
	memcpy(m, v->mv_data, v->mv_size);
	if (v->mv_size == BLOB_REC_V1_SIZE) {
		for (int p = 0; p < PART_COUNT; p++)
			m->part_stored[p] = m->part_size[p];
		m->ratio = 1;
	}
	return 0;
}

static int ns_decode(const MDB_val *v, struct ns_rec *r)
{
	if (v->mv_size != sizeof(*r) && v->mv_size != NS_REC_V1_SIZE)
		return -1;
	memset(r, 0, sizeof(*r));
	memcpy(r, v->mv_data, v->mv_size);
	return 0;
}

/* Reads the record of namespace ns. Returns 0, MDB_NOTFOUND, another LMDB
 * code, or KVTIER_E_INTERNAL (wrong size; err says so). */
static int ns_read(struct index *ix, MDB_txn *txn, const char *ns, size_t ns_len,
		   struct ns_rec *rec, char *err, size_t errlen)
{
	MDB_val k = {ns_len, (void *)ns}, v;
	int mrc = mdb_get(txn, ix->ns, &k, &v);

	if (mrc)
		return mrc;
	if (ns_decode(&v, rec))
		return index_corrupt("namespace", v.mv_size, sizeof(*rec), err, errlen);
	return 0;
}

/* Copies the name of namespace id into buf (cap >= 1), NUL-terminated and
 * truncated to cap - 1 bytes. Returns 0 or an LMDB code. */
static int ns_name(struct index *ix, MDB_txn *txn, uint32_t id, char *buf, size_t cap)
{
	uint8_t kb[4];
	MDB_val k = {4, kb}, v;
	size_t n;
	int mrc;

	be32_put(kb, id);
	buf[0] = '\0';
	mrc = mdb_get(txn, ix->nsid, &k, &v);
	if (mrc)
		return mrc;
	n = v.mv_size < cap - 1 ? v.mv_size : cap - 1;
	memcpy(buf, v.mv_data, n);
	buf[n] = '\0';
	return 0;
}

static int meta_get_u32(struct index *ix, MDB_txn *txn, const char *key, uint32_t *val)
{
	MDB_val k = {strlen(key), (void *)key}, v;
	int mrc = mdb_get(txn, ix->meta, &k, &v);

	if (mrc)
		return mrc;
	if (v.mv_size != sizeof(*val))
		return MDB_BAD_VALSIZE;
	memcpy(val, v.mv_data, sizeof(*val));
	return 0;
}

static int meta_put_u32(struct index *ix, MDB_txn *txn, const char *key, uint32_t val)
{
	MDB_val k = {strlen(key), (void *)key}, v = {sizeof(val), &val};

	return mdb_put(txn, ix->meta, &k, &v, 0);
}

/* Reads the record of blob id. Returns 0, MDB_NOTFOUND, another LMDB code
 * or KVTIER_E_INTERNAL (wrong size). */
static int blob_read(struct index *ix, MDB_txn *txn, const struct key *id, struct blob_meta *m,
		     char *err, size_t errlen)
{
	MDB_val k = {KEY_LEN, (void *)id->b}, v;
	int mrc = mdb_get(txn, ix->blobs, &k, &v);

	if (mrc)
		return mrc;
	if (blob_decode(&v, m))
		return index_corrupt("blob", v.mv_size, sizeof(*m), err, errlen);
	return 0;
}

/* Turns the result of one of the readers above into our return code. */
static int read_rc(int mrc, const char *op, char *err, size_t errlen)
{
	if (mrc == MDB_NOTFOUND)
		return KVTIER_E_NOTFOUND;
	if (mrc == KVTIER_E_INTERNAL)
		return mrc;
	return index_fail(mrc, op, err, errlen);
}

/* Deletes one key/value pair, tolerating its absence. */
static int del_pair(MDB_txn *txn, MDB_dbi dbi, void *key, size_t klen, const void *val,
		    size_t vlen)
{
	MDB_val k = {klen, key}, v = {vlen, (void *)val};
	int mrc = mdb_del(txn, dbi, &k, val ? &v : NULL);

	return mrc == MDB_NOTFOUND ? 0 : mrc;
}

/* Removes every entry of blob m: its record, tokens, one prefix pair per
 * full block (chain[0..n/B) are its block keys) and its ends pair. Returns
 * 0 or an LMDB code. */
static int blob_remove(struct index *ix, MDB_txn *txn, const struct blob_meta *m,
		       const struct key *chain)
{
	size_t nb = m->n_tokens / ix->block;
	uint8_t kb[PKEY_LEN];
	struct key id = m->id;
	int mrc;

	mrc = del_pair(txn, ix->blobs, id.b, KEY_LEN, NULL, 0);
	if (!mrc)
		mrc = del_pair(txn, ix->tokens, id.b, KEY_LEN, NULL, 0);
	for (size_t i = 0; !mrc && chain && i < nb; i++) {
		pkey(kb, m->ns_id, &chain[i]);
		mrc = del_pair(txn, ix->prefix, kb, PKEY_LEN, id.b, KEY_LEN);
	}
	if (!mrc && chain && nb > 0) {
		pkey(kb, m->ns_id, &chain[nb - 1]);
		mrc = del_pair(txn, ix->ends, kb, PKEY_LEN, id.b, KEY_LEN);
	}
	return mrc;
}

/* ---- open / close ---- */

static int dbs_open(struct index *ix, MDB_txn *txn, char *err, size_t errlen)
{
	const unsigned c = ix->readonly ? 0 : MDB_CREATE;
	const unsigned dup = MDB_DUPSORT | MDB_DUPFIXED;
	const struct {
		const char *name;
		unsigned flags;
		MDB_dbi *dbi;
	} dbs[] = {
		{"meta", c, &ix->meta},
		{"ns", c, &ix->ns},
		{"nsid", c, &ix->nsid},
		{"blobs", c, &ix->blobs},
		{"tokens", c, &ix->tokens},
		{"prefix", c | dup, &ix->prefix},
		{"ends", c | dup, &ix->ends},
	};
	int rc = 0, mrc;

	for (size_t i = 0; i < sizeof(dbs) / sizeof(dbs[0]); i++) {
		mrc = mdb_dbi_open(txn, dbs[i].name, dbs[i].flags, dbs[i].dbi);
		if (mrc == MDB_NOTFOUND) {
			set_err(err, errlen,
				"%s is not a kvtier index (database \"%s\" is missing): point "
				"--data-dir at a kvtier data directory",
				ix->path, dbs[i].name);
			rc = KVTIER_E_INVALID;
			goto out;
		}
		if (mrc) {
			rc = index_fail(mrc, "opening databases", err, errlen);
			goto out;
		}
	}
out:
	return rc;
}

/* Checks (or, for a new index, writes) the schema and block size. */
static int schema_check(struct index *ix, MDB_txn *txn, uint32_t block_size, char *err,
			size_t errlen)
{
	uint32_t schema = 0, block = 0;
	MDB_stat st;
	int rc = 0, mrc;

	mrc = meta_get_u32(ix, txn, "schema", &schema);
	if (mrc == MDB_NOTFOUND) {
		mrc = mdb_stat(txn, ix->blobs, &st);
		if (mrc) {
			rc = index_fail(mrc, "reading the schema", err, errlen);
			goto out;
		}
		if (ix->readonly || st.ms_entries > 0) {
			set_err(err, errlen,
				"%s has no schema record: it is not a kvtier index, or it is "
				"damaged",
				ix->path);
			rc = KVTIER_E_INVALID;
			goto out;
		}
		block = block_size ? block_size : INDEX_DEFAULT_BLOCK;
		mrc = meta_put_u32(ix, txn, "schema", INDEX_SCHEMA);
		if (!mrc)
			mrc = meta_put_u32(ix, txn, "block_size", block);
		if (!mrc)
			mrc = meta_put_u32(ix, txn, "next_ns", 1);
		if (mrc) {
			rc = index_fail(mrc, "creating the index", err, errlen);
			goto out;
		}
		ix->block = block;
		goto out;
	}
	if (mrc) {
		rc = index_fail(mrc, "reading the schema", err, errlen);
		goto out;
	}
	if (schema >= 1 && schema < INDEX_SCHEMA && !ix->readonly) {
		/* An older schema: its records are read as they are (blob_decode,
		 * ns_decode) and rewritten in the current version when they change.
		 * The new number makes an older binary refuse this index instead of
		 * taking the longer records for damage. */
		mrc = meta_put_u32(ix, txn, "schema", INDEX_SCHEMA);
		if (mrc) {
			rc = index_fail(mrc, "upgrading the schema", err, errlen);
			goto out;
		}
		klog(LOG_INFO, "event=index_upgraded from_schema=%u to_schema=%u", schema,
		     INDEX_SCHEMA);
		schema = INDEX_SCHEMA;
	}
	if (schema != INDEX_SCHEMA && !(schema >= 1 && schema < INDEX_SCHEMA && ix->readonly)) {
		set_err(err, errlen,
			"%s has index schema %u, this kvtierd knows only schema %u: %s", ix->path,
			schema, INDEX_SCHEMA,
			schema > INDEX_SCHEMA ? "it was written by a newer kvtierd; upgrade"
					      : "unknown schema; the index may be damaged");
		rc = KVTIER_E_INVALID;
		goto out;
	}
	mrc = meta_get_u32(ix, txn, "block_size", &block);
	if (mrc || block == 0 || block > INDEX_MAX_BLOCK) {
		set_err(err, errlen, "%s has no valid block size record: the index is damaged",
			ix->path);
		rc = KVTIER_E_INVALID;
		goto out;
	}
	if (block_size && block_size != block) {
		set_err(err, errlen,
			"block size %u disagrees with the %u recorded in %s: the block size is "
			"fixed per data directory (omit it, or use a new data directory)",
			block_size, block, ix->path);
		rc = KVTIER_E_INVALID;
		goto out;
	}
	ix->block = block;
out:
	return rc;
}

int index_open(const char *dir, uint32_t block_size, int readonly, uint64_t map_size,
	       struct index **out, char *err, size_t errlen)
{
	struct index *ix = NULL;
	MDB_txn *txn = NULL;
	struct stat st;
	int rc = 0, mrc;

	*out = NULL;
	if (!dir || !*dir) {
		set_err(err, errlen, "no data directory given");
		rc = KVTIER_E_INVALID;
		goto out;
	}
	if (block_size > INDEX_MAX_BLOCK) {
		set_err(err, errlen, "block size %u is out of range 1..%u", block_size,
			INDEX_MAX_BLOCK);
		rc = KVTIER_E_INVALID;
		goto out;
	}
	ix = calloc(1, sizeof(*ix));
	if (!ix) {
		rc = -ENOMEM;
		goto out;
	}
	ix->readonly = readonly != 0;
	if (snprintf(ix->path, sizeof(ix->path), "%s/index", dir) >= (int)sizeof(ix->path)) {
		set_err(err, errlen, "data directory path is too long: %s", dir);
		rc = -ENAMETOOLONG;
		goto out;
	}
	if (ix->readonly) {
		char data[PATH_MAX + 16];

		snprintf(data, sizeof(data), "%s/data.mdb", ix->path);
		if (stat(data, &st) != 0) {
			rc = -errno;
			if (rc == -ENOENT) {
				set_err(err, errlen,
					"no index at %s: nothing was ever stored in this data "
					"directory, or it is not a kvtier data directory",
					ix->path);
				rc = KVTIER_E_NOTFOUND;
			} else {
				set_err(err, errlen, "cannot read %s: %s", data, strerror(-rc));
			}
			goto out;
		}
	} else if (mkdir(ix->path, 0700) != 0 && errno != EEXIST) {
		rc = -errno;
		set_err(err, errlen, "cannot create %s: %s", ix->path, strerror(-rc));
		goto out;
	}
	mrc = mdb_env_create(&ix->env);
	if (!mrc)
		mrc = mdb_env_set_maxdbs(ix->env, INDEX_MAX_DBS);
	if (!mrc)
		mrc = mdb_env_set_maxreaders(ix->env, INDEX_MAX_READERS);
	if (!mrc)
		mrc = mdb_env_set_mapsize(ix->env, map_size ? map_size : INDEX_DEFAULT_MAP);
	if (!mrc)
		mrc = mdb_env_open(ix->env, ix->path,
				   MDB_NOTLS | (ix->readonly ? MDB_RDONLY : 0), 0600);
	if (mrc) {
		char what[PATH_MAX + 16];

		snprintf(what, sizeof(what), "opening %s", ix->path);
		rc = index_fail(mrc, what, err, errlen);
		goto out;
	}
	mrc = mdb_txn_begin(ix->env, NULL, ix->readonly ? MDB_RDONLY : 0, &txn);
	if (mrc) {
		rc = index_fail(mrc, "beginning the open transaction", err, errlen);
		goto out;
	}
	rc = dbs_open(ix, txn, err, errlen);
	if (!rc)
		rc = schema_check(ix, txn, block_size, err, errlen);
	if (rc)
		goto out;
	/* Commit even when read-only: the named database handles survive only
	 * a committed transaction. */
	mrc = mdb_txn_commit(txn);
	txn = NULL;
	if (mrc) {
		rc = index_fail(mrc, "committing the open transaction", err, errlen);
		goto out;
	}
	*out = ix;
	ix = NULL;
out:
	if (txn)
		mdb_txn_abort(txn);
	if (ix) {
		if (ix->env)
			mdb_env_close(ix->env);
		free(ix);
	}
	return rc;
}

void index_close(struct index *ix)
{
	if (!ix)
		return;
	mdb_env_close(ix->env);
	free(ix);
}

uint32_t index_block_size(const struct index *ix)
{
	return ix->block;
}

/* ---- meta ---- */

int index_meta_get(struct index *ix, const char *key, void *buf, size_t cap, size_t *len)
{
	MDB_txn *txn = NULL;
	MDB_val k, v;
	int rc = 0, mrc;

	if (len)
		*len = 0;
	if (!key || !*key) {
		rc = KVTIER_E_INVALID;
		goto out;
	}
	k.mv_size = strlen(key);
	k.mv_data = (void *)key;
	mrc = mdb_txn_begin(ix->env, NULL, MDB_RDONLY, &txn);
	if (!mrc)
		mrc = mdb_get(txn, ix->meta, &k, &v);
	if (mrc) {
		rc = mrc == MDB_NOTFOUND ? KVTIER_E_NOTFOUND : index_fail(mrc, "meta get", NULL, 0);
		goto out;
	}
	if (buf && cap)
		memcpy(buf, v.mv_data, v.mv_size < cap ? v.mv_size : cap);
	if (len)
		*len = v.mv_size;
out:
	if (txn)
		mdb_txn_abort(txn);
	return rc;
}

int index_meta_put(struct index *ix, const char *key, const void *val, size_t len)
{
	MDB_txn *txn = NULL;
	MDB_val k, v = {len, (void *)val};
	int rc = 0, mrc;

	if (ix->readonly) {
		rc = index_readonly(ix, NULL, 0);
		goto out;
	}
	if (!key || !*key || (int)strlen(key) > mdb_env_get_maxkeysize(ix->env) ||
	    (len && !val)) {
		rc = KVTIER_E_INVALID;
		goto out;
	}
	k.mv_size = strlen(key);
	k.mv_data = (void *)key;
	mrc = mdb_txn_begin(ix->env, NULL, 0, &txn);
	if (!mrc)
		mrc = mdb_put(txn, ix->meta, &k, &v, 0);
	if (!mrc) {
		mrc = mdb_txn_commit(txn);
		txn = NULL;
	}
	if (mrc)
		rc = index_fail(mrc, "meta put", NULL, 0);
out:
	if (txn)
		mdb_txn_abort(txn);
	return rc;
}

/* ---- put ---- */

/* Whether blob `cand_id` (a dup of the ends key at depth d) is a strict
 * prefix of the new blob nm/tokens: sets *yes and, when it is, copies its
 * record to *cm. Returns 0 or an LMDB code. */
static int supersede_candidate(struct index *ix, MDB_txn *txn, const void *cand_id,
			       uint32_t nsid, size_t d, const struct blob_meta *nm,
			       const int32_t *tokens, struct blob_meta *cm, int *yes)
{
	MDB_val k = {KEY_LEN, (void *)cand_id}, v;
	int mrc;

	*yes = 0;
	if (memcmp(cand_id, nm->id.b, KEY_LEN) == 0)
		return 0;
	mrc = mdb_get(txn, ix->blobs, &k, &v);
	if (mrc)
		return mrc == MDB_NOTFOUND ? 0 : mrc; /* dangling: index_check reports it */
	if (blob_decode(&v, cm))
		return 0;
	if (cm->ns_id != nsid || cm->n_tokens >= nm->n_tokens || cm->n_tokens / ix->block != d)
		return 0;
	mrc = mdb_get(txn, ix->tokens, &k, &v);
	if (mrc)
		return mrc == MDB_NOTFOUND ? 0 : mrc;
	if (v.mv_size != (size_t)cm->n_tokens * sizeof(int32_t) ||
	    memcmp(v.mv_data, tokens, v.mv_size) != 0)
		return 0;
	*yes = 1;
	return 0;
}

/* Removes the blobs of namespace nsid that are strict prefixes of the new
 * blob, collecting them in res. Returns 0 or an LMDB code. */
static int put_supersede(struct index *ix, MDB_txn *txn, uint32_t nsid,
			 const struct blob_meta *nm, const int32_t *tokens,
			 const struct key *chain, size_t n_chain, struct index_put_result *res)
{
	MDB_cursor *cur = NULL;
	uint8_t kb[PKEY_LEN];
	MDB_val k, v;
	int mrc;

	mrc = mdb_cursor_open(txn, ix->ends, &cur);
	if (mrc)
		goto out;
	for (size_t d = 1; d <= n_chain && res->n_superseded < INDEX_MAX_SUPERSEDED; d++) {
		size_t first = res->n_superseded;

		pkey(kb, nsid, &chain[d - 1]);
		k.mv_size = PKEY_LEN;
		k.mv_data = kb;
		/* Read-only pass over this depth's dups (no update may happen
		 * while values point into the map), then the deletions. */
		mrc = mdb_cursor_get(cur, &k, &v, MDB_SET_KEY);
		while (mrc == 0 && res->n_superseded < INDEX_MAX_SUPERSEDED) {
			struct blob_meta *cm = &res->superseded[res->n_superseded];
			int yes = 0;

			if (v.mv_size == KEY_LEN) {
				mrc = supersede_candidate(ix, txn, v.mv_data, nsid, d, nm, tokens,
							  cm, &yes);
				if (mrc)
					goto out;
			}
			if (yes)
				res->n_superseded++;
			mrc = mdb_cursor_get(cur, &k, &v, MDB_NEXT_DUP);
		}
		if (mrc && mrc != MDB_NOTFOUND)
			goto out;
		mrc = 0;
		for (size_t i = first; i < res->n_superseded; i++) {
			mrc = blob_remove(ix, txn, &res->superseded[i], chain);
			if (mrc)
				goto out;
		}
	}
out:
	if (cur)
		mdb_cursor_close(cur);
	return mrc;
}

int index_put(struct index *ix, const char *ns, const uint8_t *layout, size_t layout_len,
	      const struct blob_meta *meta, const int32_t *tokens, const struct key *chain,
	      int supersede, struct index_put_result *res, char *err, size_t errlen)
{
	MDB_txn *txn = NULL;
	struct ns_rec rec;
	struct blob_meta m;
	uint8_t kb[PKEY_LEN];
	MDB_val k, v;
	size_t ns_len, n_chain;
	int rc = 0, mrc, ns_new = 0, ns_dirty = 0;

	memset(res, 0, sizeof(*res));
	if (ix->readonly) {
		rc = index_readonly(ix, err, errlen);
		goto out;
	}
	ns_len = ns_len_valid(ns);
	if (!ns_len) {
		set_err(err, errlen, "namespace must be 1 to %d bytes", INDEX_NS_MAX);
		rc = KVTIER_E_INVALID;
		goto out;
	}
	if (!meta || !tokens || !chain || layout_len > SLOT_LAYOUT_MAX || (layout_len && !layout)) {
		set_err(err, errlen, "index_put: bad arguments (layout of %zu bytes, max %d)",
			layout_len, SLOT_LAYOUT_MAX);
		rc = KVTIER_E_INVALID;
		goto out;
	}
	if (meta->n_tokens < ix->block) {
		set_err(err, errlen,
			"blob has %u tokens, fewer than one block of %u: no lookup could ever "
			"match it",
			meta->n_tokens, ix->block);
		rc = KVTIER_E_INVALID;
		goto out;
	}
	n_chain = meta->n_tokens / ix->block;

	mrc = mdb_txn_begin(ix->env, NULL, 0, &txn);
	if (mrc) {
		rc = index_fail(mrc, "put: beginning a transaction", err, errlen);
		goto out;
	}
	mrc = ns_read(ix, txn, ns, ns_len, &rec, err, errlen);
	if (mrc == MDB_NOTFOUND) {
		ns_new = 1;
		memset(&rec, 0, sizeof(rec));
		if (layout_len) {
			rec.layout_len = (uint32_t)layout_len;
			memcpy(rec.layout, layout, layout_len);
		}
	} else if (mrc) {
		rc = read_rc(mrc, "put: reading the namespace", err, errlen);
		goto out;
	} else if (layout_len && rec.layout_len == 0) {
		rec.layout_len = (uint32_t)layout_len;
		memcpy(rec.layout, layout, layout_len);
		ns_dirty = 1;
	} else if (layout_len && (rec.layout_len != layout_len ||
				  memcmp(rec.layout, layout, layout_len) != 0)) {
		char mine[160], theirs[160];
		size_t rl = rec.layout_len <= SLOT_LAYOUT_MAX ? rec.layout_len : SLOT_LAYOUT_MAX;

		slot_layout_describe(layout, layout_len, mine, sizeof(mine));
		slot_layout_describe(rec.layout, rl, theirs, sizeof(theirs));
		set_err(err, errlen,
			"KV layout of this file (%s) differs from namespace %s (%s): it was saved "
			"by another model, or by a server with other KV settings or another "
			"state format",
			mine, ns, theirs);
		rc = KVTIER_E_LAYOUT;
		goto out;
	}

	/* The same id means the same tokens in the same namespace: keep the
	 * stored record and write nothing. */
	mrc = blob_read(ix, txn, &meta->id, &m, err, errlen);
	if (mrc == 0) {
		if (ns_new || m.ns_id != rec.id) {
			char hex[KEY_HEX_LEN + 1];

			set_err(err, errlen,
				"blob %s already exists in another namespace (id %u): the index "
				"is inconsistent, run kvtier fsck",
				key_hex(&meta->id, hex), m.ns_id);
			rc = KVTIER_E_INTERNAL;
			goto out;
		}
		res->deduplicated = 1;
		res->stored = m;
		goto out; /* the abort below writes nothing */
	}
	if (mrc != MDB_NOTFOUND) {
		rc = read_rc(mrc, "put: reading the blob", err, errlen);
		goto out;
	}

	if (ns_new) {
		uint8_t idk[4];
		uint32_t next = 1;

		mrc = meta_get_u32(ix, txn, "next_ns", &next);
		if (mrc == MDB_NOTFOUND) {
			next = 1;
			mrc = 0;
		}
		if (mrc) {
			rc = index_fail(mrc, "put: reading next_ns", err, errlen);
			goto out;
		}
		if (next == 0 || next == UINT32_MAX) {
			set_err(err, errlen, "index: namespace ids exhausted (next_ns=%u)", next);
			rc = KVTIER_E_FULL;
			goto out;
		}
		rec.id = next;
		be32_put(idk, rec.id);
		k.mv_size = 4;
		k.mv_data = idk;
		v.mv_size = ns_len;
		v.mv_data = (void *)ns;
		mrc = mdb_put(txn, ix->nsid, &k, &v, MDB_NOOVERWRITE);
		if (!mrc)
			mrc = meta_put_u32(ix, txn, "next_ns", next + 1);
		if (mrc) {
			rc = index_fail(mrc, "put: creating the namespace", err, errlen);
			goto out;
		}
		ns_dirty = 1;
	}
	if (ns_dirty) {
		k.mv_size = ns_len;
		k.mv_data = (void *)ns;
		v.mv_size = sizeof(rec);
		v.mv_data = &rec;
		mrc = mdb_put(txn, ix->ns, &k, &v, 0);
		if (mrc) {
			rc = index_fail(mrc, "put: writing the namespace", err, errlen);
			goto out;
		}
	}

	m = *meta;
	m.ns_id = rec.id;
	m.rec_version = BLOB_REC_VERSION;
	m.flags &= ~(uint32_t)BLOB_F_LAST_KEY;
	memset(&m.last_key, 0, sizeof(m.last_key));
	if (n_chain) {
		m.last_key = chain[n_chain - 1];
		m.flags |= BLOB_F_LAST_KEY;
	}
	if (supersede) {
		mrc = put_supersede(ix, txn, rec.id, &m, tokens, chain, n_chain, res);
		if (mrc) {
			rc = index_fail(mrc, "put: supersession", err, errlen);
			goto out;
		}
	}

	k.mv_size = KEY_LEN;
	k.mv_data = m.id.b;
	v.mv_size = sizeof(m);
	v.mv_data = &m;
	mrc = mdb_put(txn, ix->blobs, &k, &v, MDB_NOOVERWRITE);
	if (!mrc) {
		v.mv_size = (size_t)m.n_tokens * sizeof(int32_t);
		v.mv_data = (void *)tokens;
		mrc = mdb_put(txn, ix->tokens, &k, &v, 0);
	}
	for (size_t i = 0; !mrc && i < n_chain; i++) {
		pkey(kb, m.ns_id, &chain[i]);
		k.mv_size = PKEY_LEN;
		k.mv_data = kb;
		v.mv_size = KEY_LEN;
		v.mv_data = m.id.b;
		mrc = mdb_put(txn, ix->prefix, &k, &v, MDB_NODUPDATA);
		if (mrc == MDB_KEYEXIST)
			mrc = 0;
		if (!mrc && i == n_chain - 1) {
			mrc = mdb_put(txn, ix->ends, &k, &v, MDB_NODUPDATA);
			if (mrc == MDB_KEYEXIST)
				mrc = 0;
		}
	}
	if (mrc) {
		rc = index_fail(mrc, "put", err, errlen);
		goto out;
	}
	mrc = mdb_txn_commit(txn);
	txn = NULL;
	if (mrc) {
		rc = index_fail(mrc, "put: commit", err, errlen);
		goto out;
	}
	res->stored = m;
out:
	if (txn)
		mdb_txn_abort(txn);
	if (rc)
		res->n_superseded = 0;
	return rc;
}

/* ---- lookup ---- */

/* Index of the first token in [from, to) where the query q and the blob's
 * mapped token array b (any alignment) differ, or `to`. */
static size_t common_until(const int32_t *q, const uint8_t *b, size_t from, size_t to)
{
	size_t i = from;

	while (i + 8 <= to && memcmp(q + i, b + i * sizeof(int32_t), 8 * sizeof(int32_t)) == 0)
		i += 8;
	while (i < to && memcmp(q + i, b + i * sizeof(int32_t), sizeof(int32_t)) == 0)
		i++;
	return i;
}

/* Compares up to INDEX_LOOKUP_CANDIDATES blobs holding block key at depth d
 * with the query and keeps the best in *out. Returns 0 or an LMDB code. */
static int lookup_depth(struct index *ix, MDB_txn *txn, MDB_cursor *cur, const uint8_t *kb,
			size_t d, const int32_t *tokens, size_t n, struct index_match *out)
{
	const size_t base = d * ix->block;
	MDB_val k = {PKEY_LEN, (void *)kb}, v, bk, bv, tv;
	struct blob_meta m;
	size_t seen = 0;
	int mrc;

	mrc = mdb_cursor_get(cur, &k, &v, MDB_SET_KEY);
	for (; mrc == 0 && seen < INDEX_LOOKUP_CANDIDATES;
	     mrc = mdb_cursor_get(cur, &k, &v, MDB_NEXT_DUP), seen++) {
		size_t nt, lim, matched;

		if (v.mv_size != KEY_LEN)
			continue;
		bk.mv_size = KEY_LEN;
		bk.mv_data = v.mv_data;
		/* Tokens first: a candidate that cannot beat the best so far costs
		 * one read, not two. */
		mrc = mdb_get(txn, ix->tokens, &bk, &tv);
		if (mrc == MDB_NOTFOUND)
			continue;
		if (mrc)
			return mrc;
		nt = tv.mv_size / sizeof(int32_t);
		if (nt < base)
			continue;
		/* The first d blocks are equal: their chain keys are. */
		lim = nt < n ? nt : n;
		matched = common_until(tokens, tv.mv_data, base, lim);
		if (out->found && matched < out->matched)
			continue;
		mrc = mdb_get(txn, ix->blobs, &bk, &bv);
		if (mrc == MDB_NOTFOUND)
			continue;
		if (mrc)
			return mrc;
		if (blob_decode(&bv, &m))
			continue;
		if (m.flags & BLOB_F_QUARANTINED)
			continue;
		if (matched > m.n_tokens) /* a record shorter than its tokens: trust the record */
			matched = m.n_tokens;
		if (m.n_tokens < base)
			continue;
		/* Of equal matches the shortest blob: the same gain for fewer bytes,
		 * and the only usable one where the server cannot take a prefix of a
		 * longer one (recurrent and sliding-window states). Then the faster
		 * tier, then the newer. */
		if (!out->found || matched > out->matched ||
		    (matched == out->matched &&
		     (m.n_tokens < out->meta.n_tokens ||
		      (m.n_tokens == out->meta.n_tokens &&
		       (m.tier < out->meta.tier ||
		        (m.tier == out->meta.tier && m.created_ms > out->meta.created_ms)))))) {
			out->found = 1;
			out->matched = (uint32_t)matched;
			out->meta = m;
		}
	}
	return mrc == MDB_NOTFOUND ? 0 : mrc;
}

/* Where a lookup takes its chain keys from: all given (index_lookup), or
 * computed block by block as deep as the search goes (index_lookup_tokens:
 * a 32K-token prompt that matches 300 tokens hashes 8 blocks, not 512). A
 * lazy chain may also be rebased: a depth's key taken from a blob's
 * last_key, after which only the keys from that depth on are known. */
struct chain_src {
	const struct key *given;  /* NULL: lazy */
	const struct key *h0;
	const int32_t *tokens;
	uint32_t block;
	struct key *keys;         /* lazy: keys[d - 1] is known for base <= d <= done */
	size_t base, done;
	uint32_t hashed;          /* blocks hashed */
};

static const struct key *chain_at(struct chain_src *cs, size_t d)
{
	if (cs->given)
		return &cs->given[d - 1];
	if (d < cs->base) {
		/* Below a rebase (only when the deepest blobs are unusable): hash
		 * from the root. */
		cs->base = 1;
		cs->done = 0;
	}
	if (d > cs->done) {
		keys_chain(cs->done ? &cs->keys[cs->done - 1] : cs->h0,
			   cs->tokens + cs->done * cs->block, (d - cs->done) * cs->block, cs->block,
			   cs->keys + cs->done);
		cs->hashed += (uint32_t)(d - cs->done);
		cs->done = d;
	}
	return &cs->keys[d - 1];
}

static void chain_rebase(struct chain_src *cs, size_t d, const struct key *k)
{
	cs->keys[d - 1] = *k;
	cs->base = d;
	cs->done = d;
}

/* Depth d is present: cur is on its first entry (depth_present). When at
 * most INDEX_JUMP_CANDIDATES blobs hold it, returns the deepest full-block
 * depth D > d (D <= n_chain) of one of them whose tokens equal the query's
 * on all its full blocks, with that blob's last_key in *key: the query's
 * chain key at D. Else 0. An LMDB error other than MDB_NOTFOUND goes to
 * *mrc. */
static size_t lookup_jump(struct index *ix, MDB_txn *txn, MDB_cursor *cur, uint32_t nsid,
			  size_t d, const int32_t *tokens, size_t n_chain, struct key *key,
			  int *mrc)
{
	MDB_val k, v, bk, bv, tv;
	struct blob_meta m;
	size_t count = 0, best = 0;

	*mrc = mdb_cursor_count(cur, &count);
	if (*mrc || count > INDEX_JUMP_CANDIDATES)
		goto out;
	*mrc = mdb_cursor_get(cur, &k, &v, MDB_GET_CURRENT);
	for (; *mrc == 0; *mrc = mdb_cursor_get(cur, &k, &v, MDB_NEXT_DUP)) {
		size_t full;

		if (v.mv_size != KEY_LEN)
			continue;
		bk.mv_size = KEY_LEN;
		bk.mv_data = v.mv_data;
		*mrc = mdb_get(txn, ix->blobs, &bk, &bv);
		if (*mrc == MDB_NOTFOUND)
			continue;
		if (*mrc)
			goto out;
		if (blob_decode(&bv, &m) || !(m.flags & BLOB_F_LAST_KEY) || m.ns_id != nsid)
			continue;
		full = m.n_tokens / ix->block;
		if (full <= d || full <= best || full > n_chain)
			continue;
		*mrc = mdb_get(txn, ix->tokens, &bk, &tv);
		if (*mrc == MDB_NOTFOUND)
			continue;
		if (*mrc)
			goto out;
		if (tv.mv_size / sizeof(int32_t) < full * ix->block)
			continue;
		/* The first d blocks are equal: their chain keys are. */
		if (common_until(tokens, tv.mv_data, d * ix->block, full * ix->block) !=
		    full * ix->block)
			continue;
		best = full;
		*key = m.last_key;
	}
out:
	if (*mrc == MDB_NOTFOUND)
		*mrc = 0;
	return *mrc ? 0 : best;
}

/* Is depth d present (a prefix entry for the query's key at d)? 1 (cur is
 * then on its first entry), 0, or -1 with the LMDB code in *mrc. kb
 * receives the key. */
static int depth_present(MDB_cursor *cur, uint32_t nsid, struct chain_src *cs, size_t d,
			 uint8_t *kb, int *mrc)
{
	MDB_val k = {PKEY_LEN, kb}, v;

	pkey(kb, nsid, chain_at(cs, d));
	*mrc = mdb_cursor_get(cur, &k, &v, MDB_SET_KEY);
	if (*mrc == 0)
		return 1;
	if (*mrc == MDB_NOTFOUND) {
		*mrc = 0;
		return 0;
	}
	return -1;
}

static int lookup_run(struct index *ix, const char *ns, const int32_t *tokens, size_t n,
		      struct chain_src *cs, size_t n_chain, struct index_match *out)
{
	MDB_txn *txn = NULL;
	struct ns_rec nsrec;
	MDB_cursor *cur = NULL;
	uint8_t kb[PKEY_LEN];
	MDB_val k, v;
	size_t ns_len, lo, hi, step;
	uint32_t nsid;
	int rc = 0, mrc, pr;

	memset(out, 0, sizeof(*out));
	ns_len = ns_len_valid(ns);
	if (!ns_len || (n && !tokens)) {
		rc = KVTIER_E_INVALID;
		goto out;
	}
	if (n_chain > n / ix->block)
		n_chain = n / ix->block;
	if (n_chain == 0)
		goto out; /* less than a block: nothing can match */
	mrc = mdb_txn_begin(ix->env, NULL, MDB_RDONLY, &txn);
	if (mrc) {
		rc = index_fail(mrc, "lookup: beginning a transaction", NULL, 0);
		goto out;
	}
	k.mv_size = ns_len;
	k.mv_data = (void *)ns;
	mrc = mdb_get(txn, ix->ns, &k, &v);
	if (mrc == MDB_NOTFOUND)
		goto out; /* unknown namespace: a miss */
	if (mrc) {
		rc = index_fail(mrc, "lookup: reading the namespace", NULL, 0);
		goto out;
	}
	if (ns_decode(&v, &nsrec)) {
		rc = index_corrupt("namespace", v.mv_size, sizeof(struct ns_rec), NULL, 0);
		goto out;
	}
	nsid = nsrec.id;
	memcpy(out->ns_pf, nsrec.pf, sizeof(out->ns_pf));
	mrc = mdb_cursor_open(txn, ix->prefix, &cur);
	if (mrc) {
		rc = index_fail(mrc, "lookup: opening a cursor", NULL, 0);
		goto out;
	}

	/* Deepest block present. Presence is monotone: a blob holding block d
	 * holds blocks 1..d-1 under the same keys (the chain). Galloping from
	 * the deepest depth known present (lo) by steps 1, 2, 4, ..., so the
	 * keys computed follow the match, not the query; a depth found present
	 * with few blobs may hand over a deeper one (lookup_jump), after which
	 * the steps start again at 1. Then a binary search between the last
	 * present and the first absent depth. */
	lo = 0;
	hi = n_chain + 1;
	step = 1;
	while (lo < n_chain) {
		size_t p = lo + step <= n_chain ? lo + step : n_chain, jd;
		struct key jk;

		pr = depth_present(cur, nsid, cs, p, kb, &mrc);
		if (pr < 0)
			goto fail_prefix;
		if (!pr) {
			hi = p;
			break;
		}
		lo = p;
		step *= 2;
		if (cs->given || p == n_chain)
			continue;
		jd = lookup_jump(ix, txn, cur, nsid, p, tokens, n_chain, &jk, &mrc);
		if (mrc)
			goto fail_candidates;
		if (jd > cs->done) {
			chain_rebase(cs, jd, &jk);
			out->jumps++;
			lo = jd;
			step = 1;
		}
	}
	while (hi - lo > 1) {
		size_t mid = lo + (hi - lo) / 2;

		pr = depth_present(cur, nsid, cs, mid, kb, &mrc);
		if (pr < 0)
			goto fail_prefix;
		if (pr)
			lo = mid;
		else
			hi = mid;
	}
	/* Blobs at the deepest depth beat any shallower one; go shallower only
	 * when none there is usable (quarantined, damaged). */
	for (size_t d = lo; d >= 1 && !out->found; d--) {
		pkey(kb, nsid, chain_at(cs, d));
		mrc = lookup_depth(ix, txn, cur, kb, d, tokens, n, out);
		if (mrc)
			goto fail_candidates;
	}
	goto out;
fail_prefix:
	rc = index_fail(mrc, "lookup: reading the prefix index", NULL, 0);
	memset(out, 0, sizeof(*out));
	goto out;
fail_candidates:
	rc = index_fail(mrc, "lookup: reading candidates", NULL, 0);
	memset(out, 0, sizeof(*out));
out:
	out->keys_hashed = cs->hashed;
	if (cur)
		mdb_cursor_close(cur);
	if (txn)
		mdb_txn_abort(txn);
	return rc;
}

int index_lookup(struct index *ix, const char *ns, const int32_t *tokens, size_t n,
		 const struct key *chain, size_t n_chain, struct index_match *out)
{
	struct chain_src cs = {.given = chain};

	if (n_chain && !chain) {
		memset(out, 0, sizeof(*out));
		return KVTIER_E_INVALID;
	}
	return lookup_run(ix, ns, tokens, n, &cs, n_chain, out);
}

int index_lookup_tokens(struct index *ix, const char *ns, const int32_t *tokens, size_t n,
			struct index_match *out)
{
	struct key h0, stack_keys[64];
	size_t n_chain = ix->block ? n / ix->block : 0;
	struct chain_src cs = {
	    .h0 = &h0, .tokens = tokens, .block = ix->block, .keys = stack_keys, .base = 1};
	int rc;

	if (n_chain > 64) {
		cs.keys = malloc(n_chain * sizeof(*cs.keys));
		if (!cs.keys)
			return -ENOMEM;
	}
	keys_root(ns ? ns : "", ns ? strlen(ns) : 0, &h0);
	rc = lookup_run(ix, ns, tokens, n, &cs, n_chain, out);
	if (cs.keys != stack_keys)
		free(cs.keys);
	return rc;
}

/* ---- get / delete / update / touch ---- */

int index_get(struct index *ix, const struct key *id, struct blob_meta *out, char *ns,
	      size_t ns_cap)
{
	MDB_txn *txn = NULL;
	int rc = 0, mrc;

	if (ns && ns_cap)
		ns[0] = '\0';
	mrc = mdb_txn_begin(ix->env, NULL, MDB_RDONLY, &txn);
	if (mrc) {
		rc = index_fail(mrc, "get: beginning a transaction", NULL, 0);
		goto out;
	}
	mrc = blob_read(ix, txn, id, out, NULL, 0);
	if (mrc) {
		rc = read_rc(mrc, "get", NULL, 0);
		goto out;
	}
	if (ns && ns_cap) {
		mrc = ns_name(ix, txn, out->ns_id, ns, ns_cap);
		if (mrc == MDB_NOTFOUND)
			klog(LOG_WARN, "event=index_corrupt what=\"unknown namespace id\" ns_id=%u",
			     out->ns_id);
		else if (mrc)
			rc = index_fail(mrc, "get: reading the namespace", NULL, 0);
	}
out:
	if (txn)
		mdb_txn_abort(txn);
	return rc;
}

int index_get_tokens(struct index *ix, const struct key *id, int32_t **tokens, uint32_t *n)
{
	MDB_txn *txn = NULL;
	MDB_val k = {KEY_LEN, (void *)id->b}, v;
	int32_t *t = NULL;
	int rc = 0, mrc;

	*tokens = NULL;
	*n = 0;
	mrc = mdb_txn_begin(ix->env, NULL, MDB_RDONLY, &txn);
	if (!mrc)
		mrc = mdb_get(txn, ix->tokens, &k, &v);
	if (mrc) {
		rc = read_rc(mrc, "get tokens", NULL, 0);
		goto out;
	}
	if (v.mv_size % sizeof(int32_t) || v.mv_size / sizeof(int32_t) > UINT32_MAX) {
		rc = index_corrupt("tokens", v.mv_size, v.mv_size & ~(size_t)3, NULL, 0);
		goto out;
	}
	t = malloc(v.mv_size ? v.mv_size : 1);
	if (!t) {
		rc = -ENOMEM;
		goto out;
	}
	memcpy(t, v.mv_data, v.mv_size);
	*tokens = t;
	*n = (uint32_t)(v.mv_size / sizeof(int32_t));
out:
	if (txn)
		mdb_txn_abort(txn);
	return rc;
}

/* The block keys of a stored blob, from its tokens and namespace name:
 * *chain gets a malloc'd array of m->n_tokens / B keys (caller frees).
 * Returns 0, MDB_NOTFOUND (no tokens or namespace), -ENOMEM or an LMDB
 * code. Values read here are copied: the caller may write afterwards. */
static int blob_chain(struct index *ix, MDB_txn *txn, const struct blob_meta *m,
		      struct key **chain)
{
	MDB_val k = {KEY_LEN, (void *)m->id.b}, v;
	char name[INDEX_NS_MAX + 1];
	int32_t *t = NULL;
	size_t nt, nb;
	struct key h0;
	int rc;

	*chain = NULL;
	rc = ns_name(ix, txn, m->ns_id, name, sizeof(name));
	if (!rc)
		rc = mdb_get(txn, ix->tokens, &k, &v);
	if (rc)
		goto out;
	nt = v.mv_size / sizeof(int32_t);
	if (nt != m->n_tokens) {
		rc = MDB_NOTFOUND;
		goto out;
	}
	nb = nt / ix->block;
	t = malloc(v.mv_size ? v.mv_size : 1);
	*chain = malloc((nb ? nb : 1) * sizeof(**chain));
	if (!t || !*chain) {
		rc = -ENOMEM;
		goto out;
	}
	memcpy(t, v.mv_data, v.mv_size);
	keys_root(name, strlen(name), &h0);
	keys_chain(&h0, t, nt, ix->block, *chain);
out:
	if (rc) {
		free(*chain);
		*chain = NULL;
	}
	free(t);
	return rc;
}

int index_delete(struct index *ix, const struct key *id, struct blob_meta *out)
{
	MDB_txn *txn = NULL;
	struct key *chain = NULL;
	struct blob_meta m;
	int rc = 0, mrc;

	if (ix->readonly) {
		rc = index_readonly(ix, NULL, 0);
		goto out;
	}
	mrc = mdb_txn_begin(ix->env, NULL, 0, &txn);
	if (mrc) {
		rc = index_fail(mrc, "delete: beginning a transaction", NULL, 0);
		goto out;
	}
	mrc = blob_read(ix, txn, id, &m, NULL, 0);
	if (mrc) {
		rc = read_rc(mrc, "delete", NULL, 0);
		goto out;
	}
	mrc = blob_chain(ix, txn, &m, &chain);
	if (mrc == MDB_NOTFOUND) {
		char hex[KEY_HEX_LEN + 1];

		/* Without tokens or namespace the block keys cannot be derived:
		 * drop what is there; index_check reports the leftovers. */
		klog(LOG_WARN,
		     "event=index_corrupt blob=%s what=\"tokens or namespace missing: prefix "
		     "entries left behind\"",
		     key_hex(id, hex));
		mrc = 0;
	}
	if (mrc == -ENOMEM) {
		rc = mrc;
		goto out;
	}
	if (!mrc)
		mrc = blob_remove(ix, txn, &m, chain);
	if (!mrc) {
		mrc = mdb_txn_commit(txn);
		txn = NULL;
	}
	if (mrc) {
		rc = index_fail(mrc, "delete", NULL, 0);
		goto out;
	}
	if (out)
		*out = m;
out:
	if (txn)
		mdb_txn_abort(txn);
	free(chain);
	return rc;
}

/* Writes blob record m (as the current record version) and commits txn,
 * which is NULL afterwards when the commit ran. Returns 0 or an LMDB code. */
static int blob_put_commit(struct index *ix, MDB_txn **txn, struct blob_meta *m)
{
	MDB_val k = {KEY_LEN, m->id.b}, v = {sizeof(*m), m};
	int mrc;

	m->rec_version = BLOB_REC_VERSION;
	mrc = mdb_put(*txn, ix->blobs, &k, &v, 0);
	if (!mrc) {
		mrc = mdb_txn_commit(*txn);
		*txn = NULL;
	}
	return mrc;
}

int index_update(struct index *ix, const struct blob_meta *meta)
{
	MDB_txn *txn = NULL;
	struct blob_meta m;
	int rc = 0, mrc;

	if (ix->readonly) {
		rc = index_readonly(ix, NULL, 0);
		goto out;
	}
	mrc = mdb_txn_begin(ix->env, NULL, 0, &txn);
	if (mrc) {
		rc = index_fail(mrc, "update: beginning a transaction", NULL, 0);
		goto out;
	}
	mrc = blob_read(ix, txn, &meta->id, &m, NULL, 0);
	if (mrc) {
		rc = read_rc(mrc, "update", NULL, 0);
		goto out;
	}
	if (m.ns_id != meta->ns_id || m.n_tokens != meta->n_tokens) {
		klog(LOG_WARN, "event=index_error op=update err=\"ns_id or n_tokens changed\"");
		rc = KVTIER_E_INVALID;
		goto out;
	}
	m = *meta;
	mrc = blob_put_commit(ix, &txn, &m);
	if (mrc)
		rc = index_fail(mrc, "update", NULL, 0);
out:
	if (txn)
		mdb_txn_abort(txn);
	return rc;
}

int index_set_flags(struct index *ix, const struct key *id, uint32_t set, int *had_all)
{
	MDB_txn *txn = NULL;
	struct blob_meta m;
	int rc = 0, mrc;

	if (ix->readonly)
		return index_readonly(ix, NULL, 0);
	mrc = mdb_txn_begin(ix->env, NULL, 0, &txn);
	if (mrc)
		return index_fail(mrc, "flags: beginning a transaction", NULL, 0);
	mrc = blob_read(ix, txn, id, &m, NULL, 0);
	if (mrc) {
		rc = read_rc(mrc, "flags", NULL, 0);
		goto out;
	}
	if (had_all)
		*had_all = (m.flags & set) == set;
	if ((m.flags & set) == set)
		goto out;
	m.flags |= set;
	mrc = blob_put_commit(ix, &txn, &m);
	if (mrc)
		rc = index_fail(mrc, "flags", NULL, 0);
out:
	if (txn)
		mdb_txn_abort(txn);
	return rc;
}

int index_touch(struct index *ix, const struct index_touch *t, size_t n)
{
	MDB_txn *txn = NULL;
	struct blob_meta m;
	MDB_val k, v;
	int rc = 0, mrc = 0;

	if (n == 0)
		goto out;
	if (ix->readonly) {
		rc = index_readonly(ix, NULL, 0);
		goto out;
	}
	mrc = mdb_txn_begin(ix->env, NULL, 0, &txn);
	for (size_t i = 0; !mrc && i < n; i++) {
		mrc = blob_read(ix, txn, &t[i].id, &m, NULL, 0);
		if (mrc == MDB_NOTFOUND || mrc == KVTIER_E_INTERNAL) {
			mrc = 0; /* gone (or damaged: logged) since the hit */
			continue;
		}
		if (mrc)
			break;
		m.hits += t[i].hits;
		if (t[i].last_access_ms > m.last_access_ms)
			m.last_access_ms = t[i].last_access_ms;
		/* A hit recorded before a move carries the old tier's base. */
		if (t[i].gdsf_base > m.gdsf_base && t[i].tier == m.tier)
			m.gdsf_base = t[i].gdsf_base;
		m.rec_version = BLOB_REC_VERSION;
		k.mv_size = KEY_LEN;
		k.mv_data = m.id.b;
		v.mv_size = sizeof(m);
		v.mv_data = &m;
		mrc = mdb_put(txn, ix->blobs, &k, &v, 0);
	}
	if (!mrc) {
		mrc = mdb_txn_commit(txn);
		txn = NULL;
	}
	if (mrc)
		rc = index_fail(mrc, "touch", NULL, 0);
out:
	if (txn)
		mdb_txn_abort(txn);
	return rc;
}

int index_set_placement(struct index *ix, const struct index_placement *pl)
{
	MDB_txn *txn = NULL;
	struct blob_meta m;
	int rc = 0, mrc;

	if (ix->readonly)
		return index_readonly(ix, NULL, 0);
	mrc = mdb_txn_begin(ix->env, NULL, 0, &txn);
	if (mrc)
		return index_fail(mrc, "placement: beginning a transaction", NULL, 0);
	mrc = blob_read(ix, txn, &pl->id, &m, NULL, 0);
	if (mrc) {
		rc = read_rc(mrc, "placement", NULL, 0);
		goto out;
	}
	if (m.tier != pl->from_tier || m.parts != pl->parts ||
	    memcmp(m.part_crc, pl->part_crc, sizeof(m.part_crc)) != 0) {
		rc = KVTIER_E_EXISTS; /* moved, or replaced by other bytes, meanwhile */
		goto out;
	}
	m.rec_version = BLOB_REC_VERSION;
	m.tier = pl->to_tier;
	m.compression = pl->compression;
	m.stored_size = 0;
	for (int p = 0; p < PART_COUNT; p++) {
		m.part_stored[p] = (m.parts & (1u << p)) ? pl->part_stored[p] : 0;
		m.stored_size += m.part_stored[p];
	}
	m.ratio = pl->ratio;
	m.gdsf_base = pl->gdsf_base;
	mrc = blob_put_commit(ix, &txn, &m);
	if (mrc)
		rc = index_fail(mrc, "placement", NULL, 0);
out:
	if (txn)
		mdb_txn_abort(txn);
	return rc;
}

int index_ns_get(struct index *ix, const char *ns, struct ns_rec *out)
{
	MDB_txn *txn = NULL;
	size_t ns_len = ns_len_valid(ns);
	int mrc;

	if (!ns_len)
		return KVTIER_E_INVALID;
	mrc = mdb_txn_begin(ix->env, NULL, MDB_RDONLY, &txn);
	if (mrc)
		return index_fail(mrc, "namespace: beginning a transaction", NULL, 0);
	mrc = ns_read(ix, txn, ns, ns_len, out, NULL, 0);
	mdb_txn_abort(txn);
	return mrc ? read_rc(mrc, "namespace", NULL, 0) : 0;
}

/* ---- walks ---- */

int index_list(struct index *ix, const char *ns, const struct key *after, size_t limit,
	       int (*cb)(void *ctx, const struct blob_meta *m, const char *ns), void *ctx,
	       int *more)
{
	MDB_txn *txn = NULL;
	MDB_cursor *cur = NULL;
	char name[INDEX_NS_MAX + 1] = "";
	uint32_t filter = 0, name_id = 0;
	struct blob_meta m;
	struct ns_rec rec;
	size_t count = 0;
	MDB_val k, v;
	int rc = 0, mrc, filtered = 0;

	if (more)
		*more = 0;
	mrc = mdb_txn_begin(ix->env, NULL, MDB_RDONLY, &txn);
	if (mrc) {
		rc = index_fail(mrc, "list: beginning a transaction", NULL, 0);
		goto out;
	}
	if (ns && *ns) {
		size_t ns_len = ns_len_valid(ns);

		if (!ns_len)
			goto out; /* no such namespace can exist */
		mrc = ns_read(ix, txn, ns, ns_len, &rec, NULL, 0);
		if (mrc == MDB_NOTFOUND)
			goto out;
		if (mrc) {
			rc = read_rc(mrc, "list: reading the namespace", NULL, 0);
			goto out;
		}
		filter = rec.id;
		filtered = 1;
		snprintf(name, sizeof(name), "%s", ns);
		name_id = filter;
	}
	mrc = mdb_cursor_open(txn, ix->blobs, &cur);
	if (mrc) {
		rc = index_fail(mrc, "list: opening a cursor", NULL, 0);
		goto out;
	}
	if (after) {
		k.mv_size = KEY_LEN;
		k.mv_data = (void *)after->b;
		mrc = mdb_cursor_get(cur, &k, &v, MDB_SET_RANGE);
		if (mrc == 0 && k.mv_size == KEY_LEN && memcmp(k.mv_data, after->b, KEY_LEN) == 0)
			mrc = mdb_cursor_get(cur, &k, &v, MDB_NEXT);
	} else {
		mrc = mdb_cursor_get(cur, &k, &v, MDB_FIRST);
	}
	for (; mrc == 0; mrc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		if (blob_decode(&v, &m)) {
			index_corrupt("blob", v.mv_size, sizeof(m), NULL, 0);
			continue;
		}
		if (filtered && m.ns_id != filter)
			continue;
		if (limit && count == limit) {
			if (more)
				*more = 1;
			break;
		}
		if (m.ns_id != name_id || !name[0]) {
			int r = ns_name(ix, txn, m.ns_id, name, sizeof(name));

			if (r && r != MDB_NOTFOUND) {
				mrc = r;
				break;
			}
			name_id = m.ns_id;
		}
		count++;
		rc = cb(ctx, &m, name);
		if (rc)
			goto out;
	}
	if (mrc && mrc != MDB_NOTFOUND)
		rc = index_fail(mrc, "list", NULL, 0);
out:
	if (cur)
		mdb_cursor_close(cur);
	if (txn)
		mdb_txn_abort(txn);
	return rc;
}

int index_ns_list(struct index *ix, int (*cb)(void *ctx, const char *name, const struct ns_rec *r),
		  void *ctx)
{
	MDB_txn *txn = NULL;
	MDB_cursor *cur = NULL;
	char name[INDEX_NS_MAX + 1];
	struct ns_rec rec;
	MDB_val k, v;
	int rc = 0, mrc;

	mrc = mdb_txn_begin(ix->env, NULL, MDB_RDONLY, &txn);
	if (!mrc)
		mrc = mdb_cursor_open(txn, ix->ns, &cur);
	if (mrc) {
		rc = index_fail(mrc, "namespace list", NULL, 0);
		goto out;
	}
	for (mrc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); mrc == 0;
	     mrc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		if (ns_decode(&v, &rec) || k.mv_size > INDEX_NS_MAX) {
			index_corrupt("namespace", v.mv_size, sizeof(rec), NULL, 0);
			continue;
		}
		memcpy(name, k.mv_data, k.mv_size);
		name[k.mv_size] = '\0';
		rc = cb(ctx, name, &rec);
		if (rc)
			goto out;
	}
	if (mrc != MDB_NOTFOUND)
		rc = index_fail(mrc, "namespace list", NULL, 0);
out:
	if (cur)
		mdb_cursor_close(cur);
	if (txn)
		mdb_txn_abort(txn);
	return rc;
}

int index_ns_report_prefill(struct index *ix, const char *ns, double tokens_per_s, double alpha,
			    void (*refit)(double pf[8], void *ctx), void *ctx)
{
	MDB_txn *txn = NULL;
	struct ns_rec rec;
	size_t ns_len = ns_len_valid(ns);
	MDB_val k, v;
	int rc = 0, mrc;

	if (ix->readonly) {
		rc = index_readonly(ix, NULL, 0);
		goto out;
	}
	if (!ns_len || !isfinite(tokens_per_s) || tokens_per_s <= 0 || !(alpha > 0) ||
	    alpha > 1) {
		rc = KVTIER_E_INVALID;
		goto out;
	}
	mrc = mdb_txn_begin(ix->env, NULL, 0, &txn);
	if (mrc) {
		rc = index_fail(mrc, "report prefill: beginning a transaction", NULL, 0);
		goto out;
	}
	mrc = ns_read(ix, txn, ns, ns_len, &rec, NULL, 0);
	if (mrc) {
		rc = read_rc(mrc, "report prefill", NULL, 0);
		goto out;
	}
	rec.prefill_tps = prefill_tps_blend(rec.prefill_tps, (double)rec.prefill_samples,
					    tokens_per_s, alpha);
	rec.prefill_samples++;
	if (refit)
		refit(rec.pf, ctx);
	k.mv_size = ns_len;
	k.mv_data = (void *)ns;
	v.mv_size = sizeof(rec);
	v.mv_data = &rec;
	mrc = mdb_put(txn, ix->ns, &k, &v, 0);
	if (!mrc) {
		mrc = mdb_txn_commit(txn);
		txn = NULL;
	}
	if (mrc)
		rc = index_fail(mrc, "report prefill", NULL, 0);
out:
	if (txn)
		mdb_txn_abort(txn);
	return rc;
}

/* ---- check ---- */

struct check {
	struct index *ix;
	MDB_txn *txn;
	void (*report)(void *ctx, const char *problem);
	void *ctx;
	int problems;
};

static void problem(struct check *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void problem(struct check *c, const char *fmt, ...)
{
	char line[512];
	va_list ap;

	c->problems++;
	if (!c->report)
		return;
	va_start(ap, fmt);
	vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	c->report(c->ctx, line);
}

/* Whether the pair key/id is in a DUPSORT database: sets *present.
 * Returns 0 or an LMDB code. */
static int pair_present(MDB_cursor *cur, const uint8_t *kb, const uint8_t *id, int *present)
{
	MDB_val k = {PKEY_LEN, (void *)kb}, v = {KEY_LEN, (void *)id};
	int mrc = mdb_cursor_get(cur, &k, &v, MDB_GET_BOTH);

	*present = mrc == 0;
	return mrc == MDB_NOTFOUND ? 0 : mrc;
}

/* One blob: record, namespace, tokens, id, prefix and ends entries.
 * tbuf and tcap hold a reusable token buffer. Returns 0 or an LMDB code. */
static int check_blob(struct check *c, MDB_cursor *pc, MDB_cursor *ec, const MDB_val *bk,
		      const MDB_val *bv, int32_t **tbuf, size_t *tcap)
{
	struct index *ix = c->ix;
	char hex[KEY_HEX_LEN + 1], name[INDEX_NS_MAX + 1];
	MDB_val tv;
	struct blob_meta m;
	struct key id, h, last;
	uint8_t kb[PKEY_LEN];
	size_t nt, nb;
	int mrc, have_ns = 1, present;

	if (bk->mv_size != KEY_LEN) {
		problem(c, "blobs: key of %zu bytes (expected %d)", bk->mv_size, KEY_LEN);
		return 0;
	}
	memcpy(id.b, bk->mv_data, KEY_LEN);
	key_hex(&id, hex);
	if (blob_decode(bv, &m)) {
		problem(c, "blob %s: record of %zu bytes, expected %zu", hex, bv->mv_size,
			sizeof(m));
		return 0;
	}
	if (memcmp(m.id.b, id.b, KEY_LEN) != 0)
		problem(c, "blob %s: record names another id", hex);
	if (m.rec_version < 1 || m.rec_version > BLOB_REC_VERSION)
		problem(c, "blob %s: record version %u (expected %u)", hex, m.rec_version,
			BLOB_REC_VERSION);
	if (m.n_tokens < ix->block)
		problem(c, "blob %s: %u tokens, fewer than one block of %u", hex, m.n_tokens,
			ix->block);
	mrc = ns_name(ix, c->txn, m.ns_id, name, sizeof(name));
	if (mrc == MDB_NOTFOUND) {
		problem(c, "blob %s: namespace id %u unknown", hex, m.ns_id);
		have_ns = 0;
	} else if (mrc) {
		return mrc;
	}
	mrc = mdb_get(c->txn, ix->tokens, (MDB_val *)bk, &tv);
	if (mrc == MDB_NOTFOUND) {
		problem(c, "blob %s: tokens missing", hex);
		return 0;
	}
	if (mrc)
		return mrc;
	if (tv.mv_size != (size_t)m.n_tokens * sizeof(int32_t)) {
		problem(c, "blob %s: tokens record holds %zu bytes, record says %u tokens", hex,
			tv.mv_size, m.n_tokens);
		return 0;
	}
	if (!have_ns || m.n_tokens < ix->block)
		return 0;
	nt = m.n_tokens;
	if (nt > *tcap) {
		int32_t *t = realloc(*tbuf, nt * sizeof(int32_t));

		if (!t)
			return ENOMEM;
		*tbuf = t;
		*tcap = nt;
	}
	memcpy(*tbuf, tv.mv_data, tv.mv_size);
	nb = nt / ix->block;
	keys_root(name, strlen(name), &h);
	memset(&last, 0, sizeof(last));
	for (size_t i = 0; i < nb; i++) {
		keys_step(&h, *tbuf + i * ix->block, ix->block, &h);
		pkey(kb, m.ns_id, &h);
		mrc = pair_present(pc, kb, id.b, &present);
		if (mrc)
			return mrc;
		if (!present)
			problem(c, "blob %s: prefix entry for block %zu missing", hex, i + 1);
		last = h;
	}
	pkey(kb, m.ns_id, &last);
	mrc = pair_present(ec, kb, id.b, &present);
	if (mrc)
		return mrc;
	if (!present)
		problem(c, "blob %s: ends entry (block %zu) missing", hex, nb);
	if ((m.flags & BLOB_F_LAST_KEY) && memcmp(m.last_key.b, last.b, KEY_LEN) != 0)
		problem(c, "blob %s: last_key is not the key of block %zu", hex, nb);
	if (nt % ix->block)
		keys_step(&h, *tbuf + nb * ix->block, nt % ix->block, &h);
	if (memcmp(h.b, id.b, KEY_LEN) != 0)
		problem(c, "blob %s: id does not match its tokens and namespace", hex);
	return 0;
}

/* Every entry of a prefix or ends database names an existing blob of the
 * key's namespace. Returns 0 or an LMDB code. */
static int check_multimap(struct check *c, MDB_dbi dbi, const char *dbname)
{
	MDB_cursor *cur = NULL;
	char hex[KEY_HEX_LEN + 1], khex[KEY_HEX_LEN + 1];
	struct blob_meta m;
	struct key id, kk;
	MDB_val k, v, bv;
	uint32_t nsid;
	int mrc;

	mrc = mdb_cursor_open(c->txn, dbi, &cur);
	if (mrc)
		goto out;
	for (mrc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); mrc == 0;
	     mrc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		if (k.mv_size != PKEY_LEN || v.mv_size != KEY_LEN) {
			problem(c, "%s: entry with a key of %zu and a value of %zu bytes", dbname,
				k.mv_size, v.mv_size);
			continue;
		}
		nsid = be32_get(k.mv_data);
		memcpy(kk.b, (const uint8_t *)k.mv_data + 4, KEY_LEN);
		memcpy(id.b, v.mv_data, KEY_LEN);
		mrc = mdb_get(c->txn, c->ix->blobs, &v, &bv);
		if (mrc == MDB_NOTFOUND) {
			problem(c, "%s entry ns=%u key=%s: names missing blob %s", dbname, nsid,
				key_hex(&kk, khex), key_hex(&id, hex));
			continue;
		}
		if (mrc)
			goto out;
		if (blob_decode(&bv, &m))
			continue; /* reported by the blob walk */
		if (m.ns_id != nsid)
			problem(c, "%s entry ns=%u key=%s: blob %s belongs to namespace id %u",
				dbname, nsid, key_hex(&kk, khex), key_hex(&id, hex), m.ns_id);
	}
	if (mrc == MDB_NOTFOUND)
		mrc = 0;
out:
	if (cur)
		mdb_cursor_close(cur);
	return mrc;
}

/* Namespaces: ns and nsid agree, ids are below next_ns. */
static int check_namespaces(struct check *c)
{
	struct index *ix = c->ix;
	MDB_cursor *cur = NULL;
	char name[INDEX_NS_MAX + 1], other[INDEX_NS_MAX + 1];
	uint32_t next = 0;
	struct ns_rec rec;
	MDB_val k, v, rv;
	int mrc;

	mrc = meta_get_u32(ix, c->txn, "next_ns", &next);
	if (mrc == MDB_NOTFOUND || mrc == MDB_BAD_VALSIZE) {
		problem(c, "meta: next_ns record missing or malformed");
		next = UINT32_MAX;
	} else if (mrc) {
		goto out;
	}
	mrc = mdb_cursor_open(c->txn, ix->ns, &cur);
	if (mrc)
		goto out;
	for (mrc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); mrc == 0;
	     mrc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		size_t kl = k.mv_size < INDEX_NS_MAX ? k.mv_size : INDEX_NS_MAX;

		memcpy(name, k.mv_data, kl);
		name[kl] = '\0';
		if (ns_decode(&v, &rec)) {
			problem(c, "namespace \"%s\": record of %zu bytes, expected %zu", name,
				v.mv_size, sizeof(rec));
			continue;
		}
		if (rec.id == 0 || rec.id >= next)
			problem(c, "namespace \"%s\": id %u outside 1..%u", name, rec.id,
				next - 1);
		if (rec.layout_len > SLOT_LAYOUT_MAX)
			problem(c, "namespace \"%s\": layout of %u bytes", name, rec.layout_len);
		mrc = ns_name(ix, c->txn, rec.id, other, sizeof(other));
		if (mrc == MDB_NOTFOUND)
			problem(c, "namespace \"%s\": id %u missing from nsid", name, rec.id);
		else if (mrc)
			goto out;
		else if (strcmp(other, name) != 0)
			problem(c, "namespace \"%s\": id %u maps back to \"%s\"", name, rec.id,
				other);
	}
	if (mrc != MDB_NOTFOUND)
		goto out;
	mdb_cursor_close(cur);
	cur = NULL;
	mrc = mdb_cursor_open(c->txn, ix->nsid, &cur);
	if (mrc)
		goto out;
	for (mrc = mdb_cursor_get(cur, &k, &v, MDB_FIRST); mrc == 0;
	     mrc = mdb_cursor_get(cur, &k, &v, MDB_NEXT)) {
		if (k.mv_size != 4) {
			problem(c, "nsid: key of %zu bytes", k.mv_size);
			continue;
		}
		mrc = mdb_get(c->txn, ix->ns, &v, &rv);
		if (mrc == MDB_NOTFOUND)
			problem(c, "nsid %u: its namespace record is missing",
				be32_get(k.mv_data));
		else if (mrc)
			goto out;
	}
	if (mrc == MDB_NOTFOUND)
		mrc = 0;
out:
	if (cur)
		mdb_cursor_close(cur);
	return mrc;
}

int index_check(struct index *ix, void (*report)(void *ctx, const char *problem), void *ctx)
{
	struct check c = {.ix = ix, .report = report, .ctx = ctx};
	MDB_cursor *bc = NULL, *pc = NULL, *ec = NULL, *tc = NULL;
	char hex[KEY_HEX_LEN + 1];
	int32_t *tbuf = NULL;
	size_t tcap = 0;
	MDB_val k, v, bv;
	struct key id;
	int rc = 0, mrc;

	mrc = mdb_txn_begin(ix->env, NULL, MDB_RDONLY, &c.txn);
	if (mrc)
		goto out;
	mrc = check_namespaces(&c);
	if (mrc)
		goto out;
	mrc = mdb_cursor_open(c.txn, ix->blobs, &bc);
	if (!mrc)
		mrc = mdb_cursor_open(c.txn, ix->prefix, &pc);
	if (!mrc)
		mrc = mdb_cursor_open(c.txn, ix->ends, &ec);
	if (!mrc)
		mrc = mdb_cursor_open(c.txn, ix->tokens, &tc);
	if (mrc)
		goto out;
	for (mrc = mdb_cursor_get(bc, &k, &v, MDB_FIRST); mrc == 0;
	     mrc = mdb_cursor_get(bc, &k, &v, MDB_NEXT)) {
		mrc = check_blob(&c, pc, ec, &k, &v, &tbuf, &tcap);
		if (mrc)
			goto out;
	}
	if (mrc != MDB_NOTFOUND)
		goto out;
	mrc = check_multimap(&c, ix->prefix, "prefix");
	if (!mrc)
		mrc = check_multimap(&c, ix->ends, "ends");
	if (mrc)
		goto out;
	for (mrc = mdb_cursor_get(tc, &k, &v, MDB_FIRST); mrc == 0;
	     mrc = mdb_cursor_get(tc, &k, &v, MDB_NEXT)) {
		if (k.mv_size != KEY_LEN) {
			problem(&c, "tokens: key of %zu bytes", k.mv_size);
			continue;
		}
		mrc = mdb_get(c.txn, ix->blobs, &k, &bv);
		if (mrc == MDB_NOTFOUND) {
			memcpy(id.b, k.mv_data, KEY_LEN);
			problem(&c, "tokens of blob %s: no blob record", key_hex(&id, hex));
		} else if (mrc) {
			goto out;
		}
	}
	if (mrc == MDB_NOTFOUND)
		mrc = 0;
out:
	if (mrc)
		rc = mrc == ENOMEM ? -ENOMEM : index_fail(mrc, "check", NULL, 0);
	else
		rc = c.problems;
	if (tc)
		mdb_cursor_close(tc);
	if (ec)
		mdb_cursor_close(ec);
	if (pc)
		mdb_cursor_close(pc);
	if (bc)
		mdb_cursor_close(bc);
	if (c.txn)
		mdb_txn_abort(c.txn);
	free(tbuf);
	return rc;
}
