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
 * The interface is the same for every kind; the kind only changes how bytes
 * are moved:
 * - "tmpfs" (RAM): plain pread/pwrite, no fsync (nothing survives a reboot
 *   anyway); files may be hard-linked in and out.
 * - "disk" (NVMe/SSD): O_DIRECT with aligned buffers and several requests in
 *   flight per stream through io_uring, so one stream reaches the device's
 *   bandwidth; pread/pwrite (still O_DIRECT) when io_uring is unavailable,
 *   buffered I/O when O_DIRECT is; fsync before and after the rename in every
 *   mode. Never hard-linked (tier_link_out answers -EXDEV).
 *
 * Threads: the tier functions are thread-safe; one writer or reader handle
 * is used by one thread at a time (a disk reader keeps a read-ahead pipeline).
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

/* Latency histograms: upper bounds in seconds (Prometheus "le") of the
 * buckets of tier_stats.read_hist and write_hist; the bucket after the last
 * bound is +Inf. */
#define TIER_HIST_BUCKETS 12
extern const double tier_hist_le[TIER_HIST_BUCKETS];

struct tier_stats {
	uint64_t capacity;      /* bytes */
	uint64_t used;          /* committed bytes */
	uint64_t reserved;      /* bytes held by open writers */
	uint64_t files;         /* committed files */
	uint64_t read_bytes, write_bytes;
	double read_seconds, write_seconds;
	/* One observation per file read (at tier_reader_close of a reader that
	 * returned bytes: the seconds spent reading it) and per file written (at a successful tier_writer_commit:
	 * the seconds spent writing it plus making it durable). Per-bucket
	 * counts, not cumulative: hist[i] counts observations with
	 * tier_hist_le[i-1] < seconds <= tier_hist_le[i]; hist[TIER_HIST_BUCKETS]
	 * those above the last bound. The count of a histogram is its *_ops, its
	 * sum *_hist_sum. */
	uint64_t read_ops, write_ops;
	uint64_t read_hist[TIER_HIST_BUCKETS + 1], write_hist[TIER_HIST_BUCKETS + 1];
	double read_hist_sum, write_hist_sum; /* seconds of all observations */
};

/* How a disk tier moves bytes (tier_options.io_mode). */
enum tier_io_mode {
	TIER_IO_AUTO = 0,  /* io_uring + O_DIRECT when the probe at open says they work */
	TIER_IO_PREAD = 1, /* never io_uring: pread/pwrite (O_DIRECT when it works) */
};

/* Options of tier_open; all zero means the defaults. The tmpfs kind ignores
 * them. Each disk writer or reader holds (queue_depth + 1) aligned buffers
 * of request_bytes (10 MiB with the defaults, rounded up to 2 MiB huge pages;
 * less for files smaller than that), allocated on its first read or write,
 * and its own io_uring. */
struct tier_options {
	int io_mode;          /* enum tier_io_mode */
	unsigned queue_depth; /* requests in flight per stream, 0 = 8; at most 256 */
	size_t request_bytes; /* bytes per request, 0 = 1 MiB (rounded up to the O_DIRECT
			       * alignment); at most 64 MiB */
};

/* Tier files are written mode 0640 and committed read-only (0440): a
 * llama-server in the daemon's group can read a staged hard link (which
 * shares the tier file's inode and mode) but not write through it.
 *
 * Opens (creating if needed, mode 0700) the tier directory `path` of kind
 * `kind` ("tmpfs" or "disk") with `capacity` bytes. Usage starts at 0: the
 * caller accounts existing files with tier_account() while reconciling.
 * opt may be NULL (defaults); it is read during the call only.
 *
 * A disk tier probes how it can move bytes: io_uring_queue_init, then an
 * O_DIRECT write and read of an unnamed temporary file in the directory (and
 * the same through io_uring). The first that works of "io_uring+O_DIRECT",
 * "pread+O_DIRECT" and "pread" (buffered) is used for every stream, and one
 * log line (event=tier_io) says which and why. TIER_IO_PREAD, or
 * KVTIER_NO_IO_URING set to anything but "" or "0" in the environment, skips
 * io_uring.
 * Returns 0, -errno, or KVTIER_E_INVALID for an unknown kind or an option
 * out of range. */
int tier_open(const char *kind, const char *path, uint64_t capacity, const struct tier_options *opt,
	      struct tier **out);

/* Closes the tier. Writers and readers must be finished. */
void tier_close(struct tier *t);

const char *tier_kind(const struct tier *t);
const char *tier_path(const struct tier *t);
void tier_get_stats(const struct tier *t, struct tier_stats *out);

/* How bytes move, for logs and Info: "io_uring+O_DIRECT", "pread+O_DIRECT",
 * "pread" (buffered, fsync on commit) for disk; "memory" for tmpfs. Static
 * string, valid for the program's life. */
const char *tier_io_desc(const struct tier *t);

/* Why the disk tier is not on io_uring+O_DIRECT (for example
 * "io_uring_queue_init: Operation not permitted" or "KVTIER_NO_IO_URING=1"),
 * "" when it is, and for tmpfs. Valid until tier_close. */
const char *tier_io_fallback_reason(const struct tier *t);

/* Measures the tier's restore cost model. Writes a probe file of probe_bytes
 * (0 = 8 MiB, at least 64 KiB) under a temporary name through the tier's own
 * write path (reserving its size; removed before returning, whatever the
 * result), makes it durable, then reads it through the tier's read path (on
 * disk O_DIRECT, so from the device; in buffered mode its pages are dropped
 * from the page cache first):
 * *fixed_s      the latency of a small (4 KiB) read including the open
 *               (median of three, at different offsets);
 * *bytes_per_s  probe_bytes / (seconds of one whole sequential read, open
 *               included, less *fixed_s when that leaves more than half).
 * The probe is not counted in the tier's statistics. Both outputs are > 0 on
 * success and untouched on failure. Returns 0, KVTIER_E_FULL when the probe
 * file does not fit (the caller keeps its defaults), -ENOSPC, -EIO (the bytes
 * read back differ) or -errno. */
int tier_probe(struct tier *t, uint64_t probe_bytes, double *fixed_s, double *bytes_per_s);

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

/* How tier_writer_from_file takes a file, and what it found (out fields). */
struct tier_take {
	int force_copy;  /* in: never link (the source name stays in use: a later
	                  * write into it must not change the stored inode) */
	int sole;        /* in: refuse (KVTIER_E_DENIED) a source with more than one
	                  * name, or owned by another user than `owner` */
	uid_t owner;     /* in: the owner `sole` requires */
	int linked;      /* out: 1 hard-linked, 0 copied */
	uid_t uid;       /* out: the source's owner, as opened */
	unsigned long nlink; /* out: its number of names, as opened */
	const char *copy_reason; /* out: why a copy was made where a link was
	                          * allowed (static text), or NULL */
};

/* Starts a new file whose bytes are those of the existing file `src_path`
 * (a regular file, never followed through a symlink): a hard link when on the
 * same file system, the tier allows it and take->force_copy is 0, else a
 * streamed copy. The reserved size is the source's size, returned in *size.
 *
 * A linked inode becomes the tier's own: it is given to the caller's user
 * (fchown, keeping its group, when the process may) and made read-only
 * (0440) before it is kept, and it is kept only when nothing else can write
 * it any more: it must have no other name than the source and the tier's
 * temporary, be owned by the process's user, and no process may hold it open
 * for writing (a read lease, F_SETLEASE, is refused while one does). When
 * one of these cannot be proven the bytes are copied instead (copy_reason
 * says why). The process must ignore SIGIO: a lease held for that check is
 * broken with it.
 *
 * Returns 0, KVTIER_E_FULL, KVTIER_E_INVALID (not a regular file),
 * KVTIER_E_DENIED (take->sole and the source has several names or another
 * owner: take->nlink and take->uid say which), or -errno. */
int tier_writer_from_file(struct tier *t, const char *src_path, struct tier_take *take,
			  uint64_t *size, struct tier_writer **out);

/* 1 when a tier_writer_write that failed (ENOSPC) may be called again with
 * the same bytes: the kind writes positionally and keeps no error state
 * (tmpfs). A disk writer's errors stick to the stream: 0. */
int tier_writer_can_retry(const struct tier_writer *w);

/* Appends len bytes. On disk the bytes may still be in flight when this
 * returns: a failed write shows up in a later call or in the commit, and
 * from then on every call fails with the same error. Returns 0, -EFBIG past
 * the reserved size, -ENOSPC (abort, make room, write again), -errno. */
int tier_writer_write(struct tier_writer *w, const void *buf, size_t len);

/* Reads back len bytes at off from the file being written (to parse a header
 * after streaming; on disk it first waits for the writes in flight). Returns
 * 0 or -errno (-ENODATA past what was written). */
int tier_writer_pread(struct tier_writer *w, void *buf, size_t len, uint64_t off);

/* Bytes written so far. */
uint64_t tier_writer_size(const struct tier_writer *w);

/* Makes the file durable (disk tier: writes the last block, waits for every
 * write, truncates to the exact size, fsyncs the file), renames it to `name`
 * (which must not exist: KVTIER_E_EXISTS), fsyncs the directory (disk), and
 * frees the writer, whatever the result; on failure (-ENOSPC among others)
 * the temporary is removed and the reservation released. On success the
 * reservation becomes usage. */
int tier_writer_commit(struct tier_writer *w, const char *name);

/* Removes the temporary file, releases the reservation and frees the writer. */
void tier_writer_abort(struct tier_writer *w);

/* Opens committed file `name` for reading; *size gets its size.
 * Returns 0, KVTIER_E_NOTFOUND or -errno. */
int tier_reader_open(struct tier *t, const char *name, struct tier_reader **out,
		     uint64_t *size);

/* Reads up to len bytes at off (any offset and length). Returns the count,
 * short only at the end of the file, 0 at or past the end, or -errno. On
 * disk, a read that continues where the previous one ended (or starts the
 * file) keeps queue_depth requests in flight ahead of it; a read elsewhere is
 * served from what is already buffered or restarts the pipeline with only
 * the blocks it needs. */
ssize_t tier_reader_read(struct tier_reader *r, void *buf, size_t len, uint64_t off);

/* A read-only view of part of a tier file. */
struct tier_map {
	const uint8_t *data; /* the bytes asked for */
	size_t len;
	void *base;          /* the mapping (page-aligned) */
	size_t base_len;
};

/* Maps len bytes at off of reader r's file read-only, on tiers whose bytes
 * are memory already (tmpfs): a zero-copy read. Map pieces, not whole
 * files: mapped pages count in the process's RSS while mapped. The mapping
 * outlives the reader and the file's name; release it with tier_unmap.
 * Accessing it after the file was truncated (only its owner or root can)
 * raises SIGBUS: guard the accesses. Bytes used through the mapping are
 * counted with tier_reader_account. Returns 0, -ENOTSUP (another kind, or
 * len 0) or -errno. */
int tier_reader_map(struct tier_reader *r, uint64_t off, size_t len, struct tier_map *m);
void tier_unmap(struct tier_map *m);
void tier_reader_account(struct tier_reader *r, uint64_t bytes, double seconds);

/* Closes the reader (NULL is fine) and counts it in the read histogram. */
void tier_reader_close(struct tier_reader *r);

/* What tier_dir_check found. */
enum tier_dir_state {
	TIER_DIR_OK = 0,   /* the path names the directory the tier uses */
	TIER_DIR_REMOVED,  /* the directory was removed (with its files) and nothing
			    * usable is at the path yet: every file call fails */
	TIER_DIR_REOPENED, /* it was removed and a new directory is at the path now: the
			    * tier uses the new one from this call on (the caller
			    * accounts out the files that were lost, tier_account) */
	TIER_DIR_MOVED,    /* the directory still exists but the path names something
			    * else (renamed, replaced, mounted over): the tier keeps using
			    * the directory it has, which holds its files */
};

/* Checks that the tier's directory is still the one at its path: its link
 * count (0 once removed) and the path's device and inode against the open
 * descriptor's. A removed directory is replaced by the one now at the path
 * when there is one (a private directory, as tier_open requires). Cheap (two
 * stats); safe to call from any thread while other calls run. Returns an
 * enum tier_dir_state with why (not for TIER_DIR_OK) saying what happened
 * and what to do, or -errno when the open directory cannot be examined. */
int tier_dir_check(struct tier *t, char *why, size_t whylen);

/* Size of committed file `name`. Returns 0, KVTIER_E_NOTFOUND or -errno. */
int tier_stat(struct tier *t, const char *name, uint64_t *size);

/* What identifies the bytes of a committed file without reading them: a
 * write (write, truncate, fallocate, copy_file_range) changes the
 * modification time, which only the file's owner or root can set back.
 * File times may be coarse (one clock tick): a write in the same tick as the
 * last one can leave the time as it was. So an identity is `settled` only
 * when the time is older than the coarse clock read after the stat: any
 * later write then gets a later time. */
struct tier_file_id {
	uint64_t dev, ino;
	uint64_t size;
	int64_t mtime_ns;
	int settled; /* 1: a later write changes mtime_ns (not compared) */
	int own;     /* 1: owned by this process's user, no write permission for
	              * group or others: nobody else can write or chmod it (not
	              * compared) */
};

/* Fills *id for committed file `name`. Returns 0, KVTIER_E_NOTFOUND,
 * KVTIER_E_INVALID (not a regular file) or -errno. */
int tier_file_id(struct tier *t, const char *name, struct tier_file_id *id);

/* 1 when a and b are the same bytes of the same inode by tier_file_id. */
int tier_file_id_equal(const struct tier_file_id *a, const struct tier_file_id *b);

/* Removes committed file `name` and subtracts its size from usage.
 * Returns 0, KVTIER_E_NOTFOUND or -errno. */
int tier_remove(struct tier *t, const char *name);

/* Makes `name` appear as `dst_name` in directory dirfd as a hard link.
 * Never overwrites: KVTIER_E_EXISTS when dst_name exists. -EXDEV when no
 * link can be made (a disk tier, another file system, links refused): the
 * caller then copies the bytes through a reader, checking them. Returns 0,
 * KVTIER_E_NOTFOUND, KVTIER_E_EXISTS, KVTIER_E_INVALID or -errno. */
int tier_link_out(struct tier *t, const char *name, int dirfd, const char *dst_name);

/* Temporaries a caller writes into a directory before tier_rename_noreplace
 * (e.g. a staged copy): reconcile removes leftovers with this prefix. */
#define TIER_OUT_TMP_PREFIX ".kvtier-tmp-"

/* Renames from (in from_dir) to `to` (in to_dir) unless `to` exists:
 * renameat2(RENAME_NOREPLACE), or link + unlink where the file system lacks
 * it. Returns 0, KVTIER_E_EXISTS or -errno. */
int tier_rename_noreplace(int from_dir, const char *from, int to_dir, const char *to);

/* Calls cb for every entry of the tier directory (temporaries included,
 * "." and ".." excluded) with its name and size. A non-zero return from cb
 * stops the scan and is returned. */
int tier_scan(struct tier *t, int (*cb)(void *ctx, const char *name, uint64_t size, int is_regular),
	      void *ctx);

/* Removes an entry by name without touching usage (reconcile: temporaries
 * and orphans). Returns 0 or -errno. */
int tier_unlink_raw(struct tier *t, const char *name);

#endif /* KVTIER_TIER_H */
