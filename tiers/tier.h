/* tier.h: blob storage on one tier (a directory with a capacity).
 *
 * A tier stores named files ("parts" of blobs) in one flat directory and
 * knows nothing about the index, the RPC layer or slot files: the caller
 * decides names and records metadata. It guarantees:
 * - a file appears under its final name only when complete: writers write a
 *   temporary name (".tmp-*"), and commit makes it durable where the tier
 *   needs that (disk: fsync of file and directory), then renames it into
 *   place without overwriting;
 * - capacity is enforced by reservations: a writer reserves its declared
 *   size before writing and the reservation becomes usage on commit;
 * - readers are positional (pread-like) so several can share a file.
 *
 * The interface is the same for every kind ("tmpfs" now, "disk" later): the
 * kind only changes how bytes are moved. All functions are thread-safe.
 * Return values: 0 or a count on success, a negative errno on a system error,
 * KVTIER_E_FULL when a reservation does not fit, KVTIER_E_NOTFOUND for a
 * missing name, KVTIER_E_EXISTS when a target name is taken.
 */
#ifndef KVTIER_TIER_H
#define KVTIER_TIER_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define TIER_NAME_MAX 128
#define TIER_TMP_PREFIX ".tmp-"

struct tier;
struct tier_writer;
struct tier_reader;

struct tier_stats {
	uint64_t capacity;      /* bytes */
	uint64_t used;          /* committed bytes */
	uint64_t reserved;      /* bytes held by open writers */
	uint64_t files;         /* committed files */
	uint64_t read_bytes, write_bytes;
	double read_seconds, write_seconds;
};

/* Tier files are written mode 0640 and committed read-only (0440): a
 * llama-server in the daemon's group can read a staged hard link (which
 * shares the tier file's inode and mode) but not write through it.
 *
 * Opens (creating if needed, mode 0700) the tier directory `path` of kind
 * `kind` ("tmpfs") with `capacity` bytes. Usage starts at 0: the caller
 * accounts existing files with tier_account() while reconciling.
 * Returns 0, -errno, or KVTIER_E_INVALID for an unknown kind. */
int tier_open(const char *kind, const char *path, uint64_t capacity, struct tier **out);

/* Closes the tier. Writers and readers must be finished. */
void tier_close(struct tier *t);

const char *tier_kind(const struct tier *t);
const char *tier_path(const struct tier *t);
void tier_get_stats(const struct tier *t, struct tier_stats *out);

/* Adds (delta > 0) or removes (delta < 0) committed usage for an existing
 * file of `delta` bytes: used when reconciling at start and by callers that
 * drop files with tier_remove(). files_delta adjusts the file count. */
void tier_account(struct tier *t, int64_t delta, int files_delta);

/* Reserves `size` bytes for a file about to be written. Returns 0 or
 * KVTIER_E_FULL (nothing reserved). */
int tier_reserve(struct tier *t, uint64_t size);
void tier_unreserve(struct tier *t, uint64_t size);

/* Starts a new file under a fresh temporary name, reserving `size` bytes
 * (the exact size the file will have; writing more fails with -EFBIG).
 * Returns 0, KVTIER_E_FULL or -errno. */
int tier_writer_open(struct tier *t, uint64_t size, struct tier_writer **out);

/* Starts a new file whose bytes are those of the existing file `src_path`
 * (a regular file, never followed through a symlink): a hard link when on the
 * same file system, the tier allows it and force_copy is 0, else a streamed
 * copy (force_copy when the source name stays in use: a later write into it
 * must not change the stored inode). The reserved
 * size is the source's size, returned in *size. Returns 0, KVTIER_E_FULL,
 * KVTIER_E_INVALID (not a regular file), or -errno. */
int tier_writer_from_file(struct tier *t, const char *src_path, int force_copy, uint64_t *size,
			  struct tier_writer **out);

/* Appends len bytes. Returns 0, -EFBIG past the reserved size, -errno. */
int tier_writer_write(struct tier_writer *w, const void *buf, size_t len);

/* Reads back len bytes at off from the file being written (to parse a header
 * after streaming). Returns 0 or -errno (-ENODATA past what was written). */
int tier_writer_pread(struct tier_writer *w, void *buf, size_t len, uint64_t off);

/* Bytes written so far. */
uint64_t tier_writer_size(const struct tier_writer *w);

/* Makes the file durable (disk tier), renames it to `name` (which must not
 * exist: KVTIER_E_EXISTS) and frees the writer, whatever the result; on
 * failure the temporary is removed and the reservation released. On success
 * the reservation becomes usage. */
int tier_writer_commit(struct tier_writer *w, const char *name);

/* Removes the temporary file, releases the reservation and frees the writer. */
void tier_writer_abort(struct tier_writer *w);

/* Opens committed file `name` for reading; *size gets its size.
 * Returns 0, KVTIER_E_NOTFOUND or -errno. */
int tier_reader_open(struct tier *t, const char *name, struct tier_reader **out,
		     uint64_t *size);

/* Reads up to len bytes at off. Returns the count (0 at end) or -errno. */
ssize_t tier_reader_read(struct tier_reader *r, void *buf, size_t len, uint64_t off);

void tier_reader_close(struct tier_reader *r);

/* Size of committed file `name`. Returns 0, KVTIER_E_NOTFOUND or -errno. */
int tier_stat(struct tier *t, const char *name, uint64_t *size);

/* Removes committed file `name` and subtracts its size from usage.
 * Returns 0, KVTIER_E_NOTFOUND or -errno. */
int tier_remove(struct tier *t, const char *name);

/* Makes `name` appear as `dst_name` in directory dirfd: a hard link when
 * possible, else a copy written to a temporary name in dirfd and renamed.
 * Never overwrites: KVTIER_E_EXISTS when dst_name exists. *copied tells
 * which happened. Returns 0, KVTIER_E_NOTFOUND, KVTIER_E_EXISTS or -errno. */
int tier_link_out(struct tier *t, const char *name, int dirfd, const char *dst_name,
		  int *copied);

/* Calls cb for every entry of the tier directory (temporaries included,
 * "." and ".." excluded) with its name and size. A non-zero return from cb
 * stops the scan and is returned. */
int tier_scan(struct tier *t, int (*cb)(void *ctx, const char *name, uint64_t size, int is_regular),
	      void *ctx);

/* Removes an entry by name without touching usage (reconcile: temporaries
 * and orphans). Returns 0 or -errno. */
int tier_unlink_raw(struct tier *t, const char *name);

#endif /* KVTIER_TIER_H */
