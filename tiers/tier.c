/* tier.c: blob storage on one tier, a flat directory with a capacity (tier.h).
 *
 * Generic code here owns what every kind shares: name checks, capacity
 * reservations, statistics, temporary names, the no-overwrite rename, links
 * in and out, scans. What differs between kinds (how a temporary is created,
 * how bytes are written and read, what "durable" means before and after the
 * rename) sits behind struct tier_ops: "tmpfs" (plain pread/pwrite) and
 * "disk" (aligned O_DIRECT streams through io_uring, with pread and buffered
 * fallbacks chosen by a probe at tier_open).
 *
 * Every file operation is relative to the directory fd opened at tier_open(),
 * so a path swapped under the daemon later cannot redirect it. This module
 * must never include anything from daemon/, never overwrite an existing name
 * (in the tier or in a caller's directory), never follow a symlink when it
 * opens, links or stats a file, and never leave a temporary behind after a
 * call that failed.
 *
 * Locking: the mutex guards the accounting and the statistics only; file
 * operations run unlocked, so a long copy never blocks another writer. The
 * I/O state of a disk stream (ring, buffers, read-ahead window) belongs to its
 * writer or reader, used by one thread at a time: no ring is ever shared.
 */
#include "tier.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <liburing.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "kvtier.h"
#include "log.h"

#define TIER_RANDOM_HEX 16                  /* hex characters in a temporary name */
#define TIER_DST_NAME_MAX 255               /* NAME_MAX: a name in a caller's directory */
#define TIER_COPY_CHUNK (1u << 20)          /* read/write fallback buffer */
#define TIER_TMP_TRIES 8                    /* fresh names tried on EEXIST */
#define TIER_PROBE_DEFAULT (8u << 20)       /* tier_probe's file, by default */
#define TIER_PROBE_MIN (64u << 10)          /* and at least */
#define TIER_PROBE_SMALL 4096               /* tier_probe's "small read" */

const double tier_hist_le[TIER_HIST_BUCKETS] = { 0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03,
						 0.1,    0.25,   0.5,   1,     2.5,  10 };

/* How a tier moves bytes (tier_io_desc). */
enum tier_move {
	TIER_MOVE_MEMORY = 0,   /* tmpfs: pread/pwrite on page-cache pages */
	TIER_MOVE_URING_DIRECT, /* disk: io_uring, O_DIRECT, depth requests in flight */
	TIER_MOVE_PREAD_DIRECT, /* disk: pread/pwrite, O_DIRECT, one request at a time */
	TIER_MOVE_PREAD,        /* disk: buffered pread/pwrite, fsync on commit */
};

static const char *const tier_move_desc[] = { "memory", "io_uring+O_DIRECT", "pread+O_DIRECT",
					      "pread" };

/* What a kind of tier does differently. Every op returns 0 or -errno unless
 * said otherwise. */
struct tier_ops {
	const char *kind;
	/* Hard links may bring files in (tier_writer_from_file) and out
	 * (tier_link_out): only when the tier stores bytes as they are. */
	int allow_link;
	/* Creates the new file `name` (which must not exist) in the tier
	 * directory and returns in *fd a descriptor for writing and reading. */
	int (*create)(struct tier *t, const char *name, int *fd);
	/* Writes all len bytes at off. */
	int (*write)(struct tier_writer *w, const void *buf, size_t len, uint64_t off);
	/* Reads exactly len bytes at off, all inside what was written. */
	int (*pread)(struct tier_writer *w, void *buf, size_t len, uint64_t off);
	/* Fills the writer with the `size` bytes of the regular file src_fd;
	 * -EIO when the source does not have exactly `size` bytes. */
	int (*copy_in)(struct tier_writer *w, int src_fd, uint64_t size);
	/* Before the rename: makes the file's bytes durable. */
	int (*sync_file)(struct tier_writer *w);
	/* After the rename: makes the new name durable. */
	int (*sync_dir)(struct tier *t);
	/* Opens committed file `name` for reading (never following a symlink). */
	int (*reader_open)(struct tier *t, const char *name, int *fd);
	/* Reads up to len bytes at off: the count, 0 at the end, or -errno. */
	ssize_t (*read)(struct tier_reader *r, void *buf, size_t len, uint64_t off);
	/* Optional. After create: sets up w->io, the writer's private state. */
	int (*writer_init)(struct tier_writer *w);
	/* Optional. Before the writer's fd is closed: waits for its I/O and
	 * frees w->io (whatever state the writer is in). */
	void (*writer_fini)(struct tier_writer *w);
	/* Optional. After reader_open (size: the file's): sets up r->io. */
	int (*reader_init)(struct tier_reader *r, uint64_t size);
	/* Optional. Before the reader's fd is closed: waits for its I/O and
	 * frees r->io. */
	void (*reader_fini)(struct tier_reader *r);
};

struct tier {
	const struct tier_ops *ops;
	char *path;           /* as given to tier_open */
	int dir_fd;           /* O_DIRECTORY fd for every *at() call; a reopen dup2()s the
			       * new directory onto this number, so no caller ever sees it
			       * closed */
	dev_t dir_dev;        /* identity of the directory dir_fd holds (under lock) */
	ino_t dir_ino;
	pthread_mutex_t lock; /* guards the fields below */
	uint64_t capacity;    /* bytes */
	uint64_t used;        /* committed bytes */
	uint64_t reserved;    /* bytes held by open writers */
	uint64_t files;       /* committed files */
	uint64_t read_bytes, write_bytes;
	double read_seconds, write_seconds;
	uint64_t read_ops, write_ops;
	uint64_t read_hist[TIER_HIST_BUCKETS + 1], write_hist[TIER_HIST_BUCKETS + 1];
	double read_hist_sum, write_hist_sum; /* seconds observed */
	/* How bytes move; fixed at tier_open. */
	int move;            /* enum tier_move */
	unsigned depth;      /* disk: requests in flight per stream */
	size_t req_bytes;    /* disk: bytes per request, a multiple of align */
	size_t align;        /* disk: O_DIRECT offset and length alignment */
	size_t mem_align;    /* disk: O_DIRECT buffer alignment (>= 4096) */
	char io_reason[256]; /* why the disk tier is not on io_uring+O_DIRECT, or "" */
};

struct tier_writer {
	struct tier *t;
	int fd;            /* readable: tier_writer_pread works */
	uint64_t reserved; /* the declared size, reserved on the tier */
	uint64_t written;  /* bytes in the file so far */
	double seconds;    /* spent writing so far (the write histogram) */
	void *io;          /* the kind's private state (disk: struct disk_writer) */
	char tmp[sizeof(TIER_TMP_PREFIX) + TIER_RANDOM_HEX]; /* temporary name */
};

struct tier_reader {
	struct tier *t;
	int fd;
	double seconds; /* spent in reads that returned bytes (the read histogram) */
	uint64_t bytes; /* returned so far */
	void *io;       /* the kind's private state (disk: struct disk_reader) */
};

/* ---- helpers shared by every kind ---- */

static double tier_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void tier_lock(const struct tier *t)
{
	/* The mutex is not part of the tier's observable state: const getters lock it too. */
	pthread_mutex_lock((pthread_mutex_t *)&t->lock);
}

static void tier_unlock(const struct tier *t)
{
	pthread_mutex_unlock((pthread_mutex_t *)&t->lock);
}

static void tier_count_write(struct tier *t, uint64_t bytes, double seconds)
{
	tier_lock(t);
	t->write_bytes += bytes;
	t->write_seconds += seconds;
	tier_unlock(t);
}

static void tier_count_read(struct tier *t, uint64_t bytes, double seconds)
{
	tier_lock(t);
	t->read_bytes += bytes;
	t->read_seconds += seconds;
	tier_unlock(t);
}

/* Adds one observation of `seconds` to a histogram (caller holds the lock). */
static void tier_hist_add_locked(uint64_t *hist, double seconds)
{
	unsigned i = 0;

	while (i < TIER_HIST_BUCKETS && seconds > tier_hist_le[i])
		i++;
	hist[i]++;
}

/* One file read (a reader closed, a copy out) that took `seconds`. */
static void tier_observe_read(struct tier *t, double seconds)
{
	tier_lock(t);
	t->read_ops++;
	t->read_hist_sum += seconds;
	tier_hist_add_locked(t->read_hist, seconds);
	tier_unlock(t);
}

/* Checks a name: 1..max bytes, no '/', no leading '.', no control
 * characters, and none of the characters in `extra`. */
static int tier_name_check(const char *name, size_t max, const char *extra)
{
	size_t len;

	if (!name)
		return KVTIER_E_INVALID;
	len = strnlen(name, max + 1);
	if (len == 0 || len > max || name[0] == '.')
		return KVTIER_E_INVALID;
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)name[i];
		if (c == '/' || c < 0x20 || c == 0x7f || (extra && strchr(extra, c)))
			return KVTIER_E_INVALID;
	}
	return 0;
}

static int tier_name_valid(const char *name)
{
	return tier_name_check(name, TIER_NAME_MAX, NULL);
}

/* A name in a caller's directory (llama-server's --slot-save-path): also no
 * ':' (llama-server refuses such file names). */
static int tier_dst_name_valid(const char *name)
{
	return tier_name_check(name, TIER_DST_NAME_MAX, ":");
}

/* Writes prefix + 16 random hex characters into out (size >= prefix + 17). */
static int tier_random_name(char *out, size_t outlen, const char *prefix)
{
	static const char hex[] = "0123456789abcdef";
	unsigned char rnd[TIER_RANDOM_HEX / 2];
	size_t pre = strlen(prefix), got = 0;
	ssize_t n;

	if (outlen < pre + TIER_RANDOM_HEX + 1)
		return -ENAMETOOLONG;
	while (got < sizeof(rnd)) {
		n = getrandom(rnd + got, sizeof(rnd) - got, 0);
		if (n < 0) {
			int err = errno;
			if (err == EINTR)
				continue;
			return -err;
		}
		got += (size_t)n;
	}
	memcpy(out, prefix, pre);
	for (size_t i = 0; i < sizeof(rnd); i++) {
		out[pre + 2 * i] = hex[rnd[i] >> 4];
		out[pre + 2 * i + 1] = hex[rnd[i] & 15];
	}
	out[pre + TIER_RANDOM_HEX] = '\0';
	return 0;
}

/* Creates a fresh file prefix<random> in dir_fd with `flags` (plus
 * O_CREAT|O_EXCL|O_CLOEXEC), mode 0640; the name goes to name[namelen]. */
static int tier_create_tmp(int dir_fd, const char *prefix, int flags, char *name,
			   size_t namelen, int *fd)
{
	int rc = -EEXIST;

	for (int i = 0; i < TIER_TMP_TRIES && rc == -EEXIST; i++) {
		rc = tier_random_name(name, namelen, prefix);
		if (rc)
			break;
		*fd = openat(dir_fd, name, flags | O_CREAT | O_EXCL | O_CLOEXEC, 0640);
		rc = *fd < 0 ? -errno : 0;
	}
	return rc;
}

/* Writes all len bytes at off, looping on short writes and EINTR. */
static int tier_pwrite_all(int fd, const void *buf, size_t len, uint64_t off)
{
	const char *p = buf;
	ssize_t n;

	while (len) {
		n = pwrite(fd, p, len, (off_t)off);
		if (n < 0) {
			int err = errno;
			if (err == EINTR)
				continue;
			return -err;
		}
		if (n == 0)
			return -EIO;
		p += n;
		len -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

/* Reads up to len bytes at off, looping on short reads and EINTR; stops
 * early only at the end of the file. Returns the count or -errno. */
static ssize_t tier_pread_full(int fd, void *buf, size_t len, uint64_t off)
{
	char *p = buf;
	size_t got = 0;
	ssize_t n;

	if (len > SSIZE_MAX)
		len = SSIZE_MAX;
	while (got < len) {
		n = pread(fd, p + got, len - got, (off_t)(off + got));
		if (n < 0) {
			int err = errno;
			if (err == EINTR)
				continue;
			return -err;
		}
		if (n == 0)
			break;
		got += (size_t)n;
	}
	return (ssize_t)got;
}

/* Copies exactly `size` bytes of src_fd (from offset 0) into dst_fd (at
 * offset 0): copy_file_range first (in-kernel, reflink where the file system
 * can), read/write where that is not supported. -EIO when the source turns
 * out shorter or longer than `size`. */
static int tier_copy_fd(int src_fd, int dst_fd, uint64_t size)
{
	char *buf = NULL;
	loff_t soff = 0, doff = 0;
	uint64_t done = 0;
	int rc = 0, use_cfr = 1;
	struct stat st;
	ssize_t n;

	while (done < size && use_cfr) {
		size_t want = size - done > (1u << 30) ? (1u << 30) : (size_t)(size - done);
		n = copy_file_range(src_fd, &soff, dst_fd, &doff, want, 0);
		if (n < 0) {
			int err = errno;
			if (err == EINTR)
				continue;
			if (err == EXDEV || err == EINVAL || err == ENOSYS || err == EOPNOTSUPP ||
			    err == EBADF) {
				use_cfr = 0; /* not supported here: fall back from where we are */
				break;
			}
			rc = -err;
			goto out;
		}
		if (n == 0) {
			/* End of the source, or a file system that reports none: let
			 * read/write decide. */
			use_cfr = 0;
			break;
		}
		done += (uint64_t)n;
	}
	if (done < size) {
		buf = malloc(TIER_COPY_CHUNK);
		if (!buf) {
			rc = -ENOMEM;
			goto out;
		}
	}
	while (done < size) {
		size_t want = TIER_COPY_CHUNK;

		if (size - done < want)
			want = (size_t)(size - done);
		n = tier_pread_full(src_fd, buf, want, done);
		if (n < 0) {
			rc = (int)n;
			goto out;
		}
		if ((size_t)n < want) {
			rc = -EIO; /* the source shrank */
			goto out;
		}
		rc = tier_pwrite_all(dst_fd, buf, want, done);
		if (rc)
			goto out;
		done += want;
	}
	if (fstat(src_fd, &st)) {
		rc = -errno;
		goto out;
	}
	if ((uint64_t)st.st_size != size)
		rc = -EIO; /* the source changed size while we copied */
out:
	free(buf);
	return rc;
}

int tier_rename_noreplace(int from_dir, const char *from, int to_dir, const char *to)
{
	int err;

	if (renameat2(from_dir, from, to_dir, to, RENAME_NOREPLACE) == 0)
		return 0;
	err = errno;
	if (err == EEXIST)
		return KVTIER_E_EXISTS;
	if (err != EINVAL && err != ENOSYS)
		return -err;
	if (linkat(from_dir, from, to_dir, to, 0)) {
		err = errno;
		return err == EEXIST ? KVTIER_E_EXISTS : -err;
	}
	if (unlinkat(from_dir, from, 0)) {
		err = errno;
		/* The file is in place; the leftover temporary name is removed by reconcile. */
		klog(LOG_WARN, "event=tier_tmp_unlink_failed name=%s errno=%d", from, err);
	}
	return 0;
}

/* ---- the tmpfs kind ---- */

static int tmpfs_create(struct tier *t, const char *name, int *fd)
{
	*fd = openat(t->dir_fd, name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0640);
	return *fd < 0 ? -errno : 0;
}

static int tmpfs_write(struct tier_writer *w, const void *buf, size_t len, uint64_t off)
{
	return tier_pwrite_all(w->fd, buf, len, off);
}

static int tmpfs_pread(struct tier_writer *w, void *buf, size_t len, uint64_t off)
{
	ssize_t n = tier_pread_full(w->fd, buf, len, off);

	if (n < 0)
		return (int)n;
	return (size_t)n == len ? 0 : -EIO; /* shorter than what we wrote: changed under us */
}

static int tmpfs_copy_in(struct tier_writer *w, int src_fd, uint64_t size)
{
	return tier_copy_fd(src_fd, w->fd, size);
}

/* tmpfs needs no fsync, neither of the file nor of the directory: its pages
 * are the storage. A process crash (kill -9) leaves them in the page cache,
 * complete, and nothing survives a reboot anyway (DESIGN.md, "Crash safety").
 * The disk kind fsyncs the file here and the directory after the rename. */
static int tmpfs_sync_file(struct tier_writer *w)
{
	return 0;
}

static int tmpfs_sync_dir(struct tier *t)
{
	return 0;
}

static int tmpfs_reader_open(struct tier *t, const char *name, int *fd)
{
	/* O_NONBLOCK: a FIFO planted in the directory must not hang the open;
	 * it changes nothing for regular files. */
	*fd = openat(t->dir_fd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK);
	return *fd < 0 ? -errno : 0;
}

static ssize_t tmpfs_read(struct tier_reader *r, void *buf, size_t len, uint64_t off)
{
	return tier_pread_full(r->fd, buf, len, off);
}

static const struct tier_ops tier_ops_tmpfs = {
	.kind = "tmpfs",
	.allow_link = 1,
	.create = tmpfs_create,
	.write = tmpfs_write,
	.pread = tmpfs_pread,
	.copy_in = tmpfs_copy_in,
	.sync_file = tmpfs_sync_file,
	.sync_dir = tmpfs_sync_dir,
	.reader_open = tmpfs_reader_open,
	.read = tmpfs_read,
};

/* ---- the disk kind ----
 *
 * Bytes move in aligned requests of t->req_bytes through O_DIRECT, so they
 * neither pass through nor evict the page cache, with up to t->depth
 * requests in flight per stream on the stream's own io_uring: a single
 * sequential stream keeps the device busy. A writer preallocates its
 * reserved size (ext4 serializes O_DIRECT writes that extend a file), copies
 * appended bytes into aligned buffers and submits each full one; its commit
 * writes the zero-padded last block, waits, truncates to the exact size and
 * fsyncs. A reader keeps a window of requests ahead of the sequential
 * position and serves reads from completed buffers; a small read elsewhere
 * is one synchronous read into a side buffer, a larger one restarts the
 * window with only the blocks it needs. Each has t->depth + 1 buffers: depth
 * in flight while one is filled or served.
 *
 * Modes (t->move), chosen by disk_probe() at tier_open: io_uring+O_DIRECT;
 * pread+O_DIRECT (the same buffers, one synchronous request at a time); or
 * buffered pread/pwrite with the tmpfs helpers plus fsync. A stream whose own
 * ring cannot be set up runs synchronously (logged); a reader whose fd
 * refuses O_DIRECT reads buffered. Streams that fit in one request never set
 * up a ring. Buffers (one pool per stream, on huge pages when it is big
 * enough: see disk_io_pool) and rings are allocated on first use, so a
 * reader opened and closed without reading costs two syscalls. Every request
 * in flight is waited for before its buffer is freed: the kernel writes into
 * it. */

#define DISK_DEPTH_DEFAULT 8        /* requests in flight per stream */
#define DISK_DEPTH_MAX 256          /* bound of tier_options.queue_depth */
#define DISK_REQ_DEFAULT (1u << 20) /* bytes per request */
#define DISK_REQ_MAX (64u << 20)    /* and of request_bytes */
#define DISK_ALIGN_DEFAULT 4096     /* when statx does not tell */
#define DISK_MEM_ALIGN 4096         /* buffers, at least */
#define DISK_SUBMIT_TRIES 1000      /* io_uring_submit answering EAGAIN/EBUSY/EINTR */
#define DISK_HUGE (2u << 20)        /* a transparent huge page on x86-64 and arm64 */
#define DISK_SIDE_MAX (256u << 10)  /* reads this small away from the window: side buffer */

enum disk_req_state { DISK_IDLE = 0, DISK_BUSY, DISK_DONE };

/* One aligned request and its buffer. */
struct disk_req {
	char *buf;    /* io->cap bytes of io->pool, aligned */
	uint64_t off; /* file offset, aligned */
	size_t len;   /* bytes asked for, aligned */
	size_t need;  /* bytes that complete it: len (writes), up to the end of file (reads) */
	size_t done;  /* bytes moved so far */
	int err;      /* -errno of the failure, 0 */
	int state;    /* enum disk_req_state */
};

/* The requests of one stream and, when it has one, its ring. */
struct disk_io {
	struct tier *t;
	int fd;
	int is_write;
	int ring_ok;          /* may set up a ring (io_uring mode, more than one request) */
	int ring_on;          /* the ring is set up */
	int broken;           /* a ring call failed: requests may never complete */
	unsigned n;           /* requests */
	unsigned busy;        /* submitted to the ring, not yet reaped */
	size_t cap;           /* bytes per request buffer, a multiple of t->align */
	struct disk_req *req; /* n of them */
	char *pool;           /* the n buffers, allocated on first use */
	struct io_uring ring;
};

static uint64_t disk_align_up(uint64_t v, size_t a)
{
	return (v + a - 1) / a * a;
}

static uint64_t disk_align_down(uint64_t v, size_t a)
{
	return v / a * a;
}

static int disk_io_init(struct disk_io *io, struct tier *t, int fd, int is_write, unsigned n,
			size_t cap)
{
	io->t = t;
	io->fd = fd;
	io->is_write = is_write;
	io->n = n ? n : 1;
	io->cap = cap;
	io->ring_ok = t->move == TIER_MOVE_URING_DIRECT && io->n > 1;
	io->req = calloc(io->n, sizeof(*io->req));
	return io->req ? 0 : -ENOMEM;
}

/* Gives the stream its buffers if it has none yet: one pool, so that a
 * stream of 1 MiB or more can sit on transparent huge pages. A request buffer
 * in 4 KiB pages is scattered in physical memory, and a 1 MiB request needs
 * 256 segments: over a virtio disk's 254 the block layer splits it in two,
 * which costs throughput on devices that limit requests per second.
 * Physically contiguous buffers go out as one request each (measured on a
 * virtio disk, one cold 1 GiB stream: median 0.8 -> 1.5 GB/s; fio with
 * 4 KiB-page buffers stays near 1.0, with huge pages it matches). */
static int disk_io_pool(struct disk_io *io)
{
	size_t size = (size_t)io->n * io->cap, align = io->t->mem_align;
	void *p;
	int rc;

	if (io->pool)
		return 0;
	if (size >= DISK_HUGE / 2) { /* requests of 1 MiB and more: worth a huge page */
		size = (size_t)disk_align_up(size, DISK_HUGE);
		align = DISK_HUGE > align ? DISK_HUGE : align;
	}
	rc = posix_memalign(&p, align, size);
	if (rc)
		return -rc;
	if (size >= DISK_HUGE)
		madvise(p, size, MADV_HUGEPAGE); /* best effort: THP may be off */
	io->pool = p;
	for (unsigned i = 0; i < io->n; i++)
		io->req[i].buf = io->pool + (size_t)i * io->cap;
	return 0;
}

/* Sets up the stream's ring on first use; a failure leaves the stream
 * synchronous (pread/pwrite, still O_DIRECT). */
static void disk_io_ring(struct disk_io *io)
{
	int rc;

	if (io->ring_on || !io->ring_ok)
		return;
	rc = io_uring_queue_init(io->n, &io->ring, 0);
	if (rc) {
		io->ring_ok = 0;
		klog(LOG_WARN,
		     "event=tier_io_stream_fallback tier=%s mode=pread+O_DIRECT "
		     "reason=\"io_uring_queue_init: %s\"",
		     io->t->path, strerror(-rc));
		return;
	}
	io->ring_on = 1;
}

/* Moves the rest of rq synchronously. */
static void disk_req_sync(struct disk_io *io, struct disk_req *rq)
{
	ssize_t n;
	int err;

	while (rq->done < rq->need) {
		if (io->is_write)
			n = pwrite(io->fd, rq->buf + rq->done, rq->len - rq->done,
				   (off_t)(rq->off + rq->done));
		else
			n = pread(io->fd, rq->buf + rq->done, rq->len - rq->done,
				  (off_t)(rq->off + rq->done));
		if (n < 0) {
			err = errno;
			if (err == EINTR || err == EAGAIN)
				continue;
			rq->err = -err;
			break;
		}
		if (n == 0) {
			rq->err = -EIO; /* a write that moves nothing, or the file shrank */
			break;
		}
		rq->done += (size_t)n;
	}
	rq->state = DISK_DONE;
}

/* Queues (ring) or performs (no ring) the rest of rq; with a ring, the
 * request is only submitted by disk_io_submit(). */
static void disk_req_queue(struct disk_io *io, struct disk_req *rq)
{
	struct io_uring_sqe *sqe;

	rq->state = DISK_BUSY;
	if (!io->ring_on) {
		disk_req_sync(io, rq);
		return;
	}
	/* Never NULL: the stream has n requests, each with at most one entry
	 * queued or in flight, on a ring of n entries. */
	sqe = io_uring_get_sqe(&io->ring);
	if (!sqe) {
		disk_req_sync(io, rq);
		return;
	}
	if (io->is_write)
		io_uring_prep_write(sqe, io->fd, rq->buf + rq->done, (unsigned)(rq->len - rq->done),
				    rq->off + rq->done);
	else
		io_uring_prep_read(sqe, io->fd, rq->buf + rq->done, (unsigned)(rq->len - rq->done),
				   rq->off + rq->done);
	io_uring_sqe_set_data(sqe, rq);
	io->busy++;
}

static int disk_io_reap(struct disk_io *io, int wait);

/* Submits what disk_req_queue() queued. A ring that refuses is broken: the
 * stream fails (its buffers are then never freed, see disk_io_fini). */
static int disk_io_submit(struct disk_io *io)
{
	int rc;

	if (!io->ring_on)
		return 0;
	for (int i = 0; i < DISK_SUBMIT_TRIES; i++) {
		rc = io_uring_submit(&io->ring);
		/* The kernel may take part of the queue (short of requests):
		 * what stays in the ring would never be submitted by a wait. */
		if (rc >= 0 && io_uring_sq_ready(&io->ring) == 0)
			return 0;
		if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY)
			break;
		/* Short of resources: make room by reaping what has finished. */
		if (rc != -EINTR && io->busy && disk_io_reap(io, 0) < 0)
			break;
	}
	io->broken = 1;
	klog(LOG_ERROR, "event=tier_io_ring_failed tier=%s op=submit errno=%d", io->t->path, -rc);
	return rc < 0 ? rc : -EIO;
}

/* Handles the completion of one ring request: short transfers, -EAGAIN and
 * -EINTR are resubmitted (the caller submits), and so is -ECANCELED (the
 * thread that submitted it exited: a stream may move between threads); the
 * rest completes it. */
static void disk_req_complete(struct disk_io *io, struct disk_req *rq, int res)
{
	if (res == -EAGAIN || res == -EINTR || res == -ECANCELED) {
		disk_req_queue(io, rq);
		return;
	}
	if (res < 0) {
		rq->err = res;
	} else if (res == 0) {
		if (rq->done < rq->need)
			rq->err = -EIO; /* a write that moves nothing, or the file shrank */
	} else {
		rq->done += (size_t)res;
		if (rq->done < rq->need) {
			disk_req_queue(io, rq); /* short transfer: the rest */
			return;
		}
	}
	rq->state = DISK_DONE;
}

/* Reaps completions: at least one when `wait` (and some are in flight), else
 * what is there. Returns 0 or the -errno of a broken ring. */
static int disk_io_reap(struct disk_io *io, int wait)
{
	struct io_uring_cqe *cqe;
	int rc, requeued = 0;

	if (!io->ring_on || !io->busy)
		return 0;
	for (;;) {
		rc = wait ? io_uring_wait_cqe(&io->ring, &cqe) : io_uring_peek_cqe(&io->ring, &cqe);
		if (rc == -EINTR && wait)
			continue;
		break;
	}
	if (rc == -EAGAIN && !wait)
		return 0;
	if (rc < 0) {
		io->broken = 1;
		klog(LOG_ERROR, "event=tier_io_ring_failed tier=%s op=wait errno=%d", io->t->path,
		     -rc);
		return rc;
	}
	do {
		struct disk_req *rq = io_uring_cqe_get_data(cqe);
		int res = cqe->res;

		io_uring_cqe_seen(&io->ring, cqe);
		io->busy--;
		disk_req_complete(io, rq, res);
		if (rq->state == DISK_BUSY)
			requeued = 1;
	} while (io_uring_peek_cqe(&io->ring, &cqe) == 0);
	return requeued ? disk_io_submit(io) : 0;
}

/* Waits until rq is no longer in flight. */
static int disk_req_wait(struct disk_io *io, struct disk_req *rq)
{
	int rc;

	while (rq->state == DISK_BUSY) {
		if (io->broken || !io->busy)
			return -EIO; /* !busy: never, a busy request is on the ring */
		rc = disk_io_reap(io, 1);
		if (rc)
			return rc;
	}
	return 0;
}

/* Waits for every request in flight. */
static int disk_io_drain(struct disk_io *io)
{
	int rc;

	while (io->busy) {
		if (io->broken)
			return -EIO;
		rc = disk_io_reap(io, 1);
		if (rc)
			return rc;
	}
	return 0;
}

static void disk_io_fini(struct disk_io *io)
{
	int leak;

	if (!io->req)
		return;
	disk_io_drain(io);
	/* A broken ring may still own requests: their buffers stay allocated
	 * (the kernel may write into them), a leak rather than a corruption. */
	/* Requests still in the submission ring never reached the kernel. */
	leak = io->broken && io->busy > (io->ring_on ? io_uring_sq_ready(&io->ring) : 0);
	if (leak)
		klog(LOG_ERROR,
		     "event=tier_io_leak tier=%s requests=%u reason=\"ring failed with "
		     "requests in flight; their buffers are not freed\"",
		     io->t->path, io->busy);
	if (io->ring_on)
		io_uring_queue_exit(&io->ring);
	if (!leak) {
		free(io->pool);
		free(io->req);
	}
	io->req = NULL;
}

/* -- disk writers -- */

struct disk_writer {
	struct disk_io io;
	struct disk_req *cur; /* the buffer being filled, or NULL */
	size_t fill;          /* bytes in cur */
	uint64_t cur_off;     /* file offset of cur: every byte before it is submitted */
	int err;              /* the first failure: the stream is dead */
	char *bounce;         /* aligned, io.cap bytes: tier_writer_pread */
};

/* Completed requests become idle; the first error sticks. */
static void disk_writer_collect(struct disk_writer *dw)
{
	for (unsigned i = 0; i < dw->io.n; i++) {
		struct disk_req *rq = &dw->io.req[i];

		if (rq->state != DISK_DONE)
			continue;
		if (rq->err && !dw->err)
			dw->err = rq->err;
		rq->state = DISK_IDLE;
	}
}

/* Waits for everything in flight and collects it. */
static int disk_writer_drain(struct disk_writer *dw)
{
	int rc = disk_io_drain(&dw->io);

	disk_writer_collect(dw);
	if (rc && !dw->err)
		dw->err = rc;
	return dw->err;
}

/* Makes dw->cur a free buffer, waiting for a request when all are busy. */
static int disk_writer_next(struct disk_writer *dw)
{
	int rc;

	for (;;) {
		for (unsigned i = 0; i < dw->io.n; i++) {
			struct disk_req *rq = &dw->io.req[i];

			if (rq->state != DISK_IDLE || rq == dw->cur)
				continue;
			rc = disk_io_pool(&dw->io);
			if (rc)
				return rc;
			dw->cur = rq;
			dw->fill = 0;
			return 0;
		}
		rc = disk_io_reap(&dw->io, 1);
		disk_writer_collect(dw);
		if (rc)
			return rc;
		if (dw->err)
			return dw->err;
		if (!dw->io.busy && dw->io.broken)
			return -EIO;
	}
}

/* Writes dw->cur's first len bytes (aligned) at cur_off, in the background
 * when there is a ring. */
static int disk_writer_submit(struct disk_writer *dw, size_t len)
{
	struct disk_req *rq = dw->cur;
	int rc;

	rq->off = dw->cur_off;
	rq->len = len;
	rq->need = len;
	rq->done = 0;
	rq->err = 0;
	dw->cur = NULL;
	dw->fill = 0;
	dw->cur_off += len;
	disk_io_ring(&dw->io);
	disk_req_queue(&dw->io, rq);
	rc = disk_io_submit(&dw->io);
	if (rc == 0)
		rc = disk_io_reap(&dw->io, 0); /* pick up what finished, without waiting */
	disk_writer_collect(dw);
	if (rc && !dw->err)
		dw->err = rc;
	return dw->err;
}

/* Where the next appended bytes go: *p, room for *room of them. */
static int disk_writer_space(struct disk_writer *dw, char **p, size_t *room)
{
	int rc;

	if (dw->err)
		return dw->err;
	if (!dw->cur) {
		rc = disk_writer_next(dw);
		if (rc) {
			if (!dw->err)
				dw->err = rc;
			return rc;
		}
	}
	*p = dw->cur->buf + dw->fill;
	*room = dw->io.cap - dw->fill;
	return 0;
}

/* n bytes were put where disk_writer_space() said: a full buffer goes out. */
static int disk_writer_advance(struct disk_writer *dw, size_t n)
{
	dw->fill += n;
	if (dw->fill < dw->io.cap)
		return 0;
	return disk_writer_submit(dw, dw->io.cap);
}

static int disk_create(struct tier *t, const char *name, int *fd)
{
	int flags = O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC;

	if (t->move != TIER_MOVE_PREAD)
		flags |= O_DIRECT;
	*fd = openat(t->dir_fd, name, flags, 0640);
	return *fd < 0 ? -errno : 0;
}

static int disk_writer_init(struct tier_writer *w)
{
	struct tier *t = w->t;
	struct disk_writer *dw;
	uint64_t nreq;
	size_t cap;
	int rc;

	if (t->move == TIER_MOVE_PREAD)
		return 0; /* buffered: the tmpfs helpers and fsync */
	cap = t->req_bytes;
	if (w->reserved < cap)
		cap = (size_t)disk_align_up(w->reserved ? w->reserved : 1, t->align);
	/* depth in flight plus the one being filled, never more than the file needs */
	nreq = (w->reserved + cap - 1) / cap;
	if (nreq > (uint64_t)t->depth + 1)
		nreq = (uint64_t)t->depth + 1;
	if (t->move != TIER_MOVE_URING_DIRECT)
		nreq = 1;
	dw = calloc(1, sizeof(*dw));
	if (!dw)
		return -ENOMEM;
	rc = disk_io_init(&dw->io, t, w->fd, 1, (unsigned)(nreq ? nreq : 1), cap);
	if (rc) {
		free(dw);
		return rc;
	}
	/* Best effort: with the blocks allocated and the size set, the writes no
	 * longer extend the file, which ext4 serializes; commit truncates to the
	 * exact size. A failure (no room, no support) changes nothing: -ENOSPC
	 * shows up in a write or the commit, as it would without. */
	if (w->reserved)
		(void)fallocate(w->fd, 0, 0, (off_t)disk_align_up(w->reserved, t->align));
	w->io = dw;
	return 0;
}

static void disk_writer_fini(struct tier_writer *w)
{
	struct disk_writer *dw = w->io;

	if (!dw)
		return;
	disk_io_fini(&dw->io);
	free(dw->bounce);
	free(dw);
	w->io = NULL;
}

static int disk_write(struct tier_writer *w, const void *buf, size_t len, uint64_t off)
{
	struct disk_writer *dw = w->io;
	const char *src = buf;
	size_t room, n;
	char *p;
	int rc;

	if (!dw)
		return tier_pwrite_all(w->fd, buf, len, off);
	while (len) {
		rc = disk_writer_space(dw, &p, &room);
		if (rc)
			return rc;
		n = len < room ? len : room;
		memcpy(p, src, n);
		rc = disk_writer_advance(dw, n);
		if (rc)
			return rc;
		src += n;
		len -= n;
	}
	return 0;
}

static int disk_pread(struct tier_writer *w, void *buf, size_t len, uint64_t off)
{
	struct disk_writer *dw = w->io;
	uint64_t end = off + len, file_end, p = off;
	char *dst = buf;
	int rc;

	if (!dw)
		return tmpfs_pread(w, buf, len, off);
	rc = disk_writer_drain(dw);
	if (rc)
		return rc;
	/* [0, cur_off) is in the file, [cur_off, written) in dw->cur. */
	file_end = dw->cur_off;
	while (p < end && p < file_end) {
		uint64_t a = disk_align_down(p, w->t->align);
		uint64_t stop = end < file_end ? end : file_end;
		size_t want = (size_t)(disk_align_up(stop, w->t->align) - a), copy;
		ssize_t n;

		if (want > dw->io.cap)
			want = dw->io.cap;
		if (!dw->bounce) {
			void *b;
			rc = posix_memalign(&b, w->t->mem_align, dw->io.cap);
			if (rc)
				return -rc;
			dw->bounce = b;
		}
		n = tier_pread_full(w->fd, dw->bounce, want, a);
		if (n < 0)
			return (int)n;
		copy = (size_t)((a + want < stop ? a + want : stop) - p);
		if ((uint64_t)n < p - a + copy)
			return -EIO; /* shorter than what we wrote: changed under us */
		memcpy(dst + (p - off), dw->bounce + (p - a), copy);
		p += copy;
	}
	if (p < end) {
		if (!dw->cur || p < dw->cur_off || end > dw->cur_off + dw->fill)
			return -EIO; /* cannot happen: the bytes past cur_off are in cur */
		memcpy(dst + (p - off), dw->cur->buf + (p - dw->cur_off), (size_t)(end - p));
	}
	return 0;
}

static int disk_copy_in(struct tier_writer *w, int src_fd, uint64_t size)
{
	struct disk_writer *dw = w->io;
	uint64_t done = 0;
	struct stat st;
	size_t room, want;
	ssize_t n;
	char *p;
	int rc;

	if (!dw)
		return tier_copy_fd(src_fd, w->fd, size);
	/* Read straight into the aligned buffers: no bounce copy. */
	while (done < size) {
		rc = disk_writer_space(dw, &p, &room);
		if (rc)
			return rc;
		want = size - done < room ? (size_t)(size - done) : room;
		n = tier_pread_full(src_fd, p, want, done);
		if (n < 0)
			return (int)n;
		if ((size_t)n < want)
			return -EIO; /* the source shrank */
		rc = disk_writer_advance(dw, want);
		if (rc)
			return rc;
		done += want;
	}
	if (fstat(src_fd, &st))
		return -errno;
	return (uint64_t)st.st_size == size ? 0 : -EIO; /* the source changed size */
}

/* Durable before the rename in every mode: the padded last block, every
 * write finished, the exact size, fsync. */
static int disk_sync_file(struct tier_writer *w)
{
	struct disk_writer *dw = w->io;
	int rc;

	if (dw) {
		if (dw->err)
			return dw->err;
		if (dw->cur && dw->fill) {
			size_t padded = (size_t)disk_align_up(dw->fill, w->t->align);

			memset(dw->cur->buf + dw->fill, 0, padded - dw->fill);
			rc = disk_writer_submit(dw, padded);
			if (rc)
				return rc;
		}
		rc = disk_writer_drain(dw);
		if (rc)
			return rc;
		/* The padding of the last block goes. */
		if (ftruncate(w->fd, (off_t)w->written))
			return -errno;
	}
	return fsync(w->fd) ? -errno : 0;
}

static int disk_sync_dir(struct tier *t)
{
	return fsync(t->dir_fd) ? -errno : 0;
}

/* -- disk readers -- */

struct disk_reader {
	struct disk_io io;
	uint64_t size;     /* the file's size at open */
	uint64_t end_al;   /* size rounded up to the alignment: no request goes past it */
	unsigned head;     /* index of the window's first request */
	unsigned count;    /* requests in the window, consecutive in the file from head */
	uint64_t win_end;  /* file offset after the window's last request */
	uint64_t ra_end;   /* the window grows up to here (aligned, <= end_al) */
	uint64_t next_off; /* where a sequential read continues */
	char *side;        /* aligned buffer for small reads away from the window */
	size_t side_cap;   /* its size */
};

static int disk_reader_init(struct tier_reader *r, uint64_t size)
{
	struct tier *t = r->t;
	struct disk_reader *dr;
	uint64_t nreq;
	size_t cap;
	int fl, rc, err;

	if (t->move == TIER_MOVE_PREAD || size == 0)
		return 0; /* buffered reads (nothing to read when empty) */
	/* O_DIRECT on the reader's own fd (the open file description is the
	 * reader's); clearing O_NONBLOCK keeps io_uring from answering -EAGAIN
	 * instead of waiting for the device. */
	fl = fcntl(r->fd, F_GETFL);
	if (fl < 0 || fcntl(r->fd, F_SETFL, (fl & ~O_NONBLOCK) | O_DIRECT)) {
		err = errno;
		klog(LOG_DEBUG,
		     "event=tier_io_stream_fallback tier=%s mode=pread reason=\"fcntl "
		     "O_DIRECT: %s\"",
		     t->path, strerror(err));
		return 0;
	}
	cap = t->req_bytes;
	if (disk_align_up(size, t->align) < cap)
		cap = (size_t)disk_align_up(size, t->align);
	/* depth in flight ahead of the one being served, never more than the
	 * file needs */
	nreq = (size + cap - 1) / cap;
	if (nreq > (uint64_t)t->depth + 1)
		nreq = (uint64_t)t->depth + 1;
	if (t->move != TIER_MOVE_URING_DIRECT)
		nreq = 1;
	dr = calloc(1, sizeof(*dr));
	if (!dr)
		return -ENOMEM;
	rc = disk_io_init(&dr->io, t, r->fd, 0, (unsigned)nreq, cap);
	if (rc) {
		free(dr);
		return rc;
	}
	dr->size = size;
	dr->end_al = disk_align_up(size, t->align);
	dr->next_off = 0; /* a read from the start streams */
	r->io = dr;
	return 0;
}

static void disk_reader_fini(struct tier_reader *r)
{
	struct disk_reader *dr = r->io;

	if (!dr)
		return;
	disk_io_fini(&dr->io);
	free(dr->side);
	free(dr);
	r->io = NULL;
}

/* A small read away from the window (a header, an index, a probe): one
 * synchronous aligned read into the side buffer. It neither disturbs the
 * read-ahead nor touches the pool, whose first use faults in (and zeroes)
 * huge pages: 2 MiB cleared for a 4 KiB read tripled its latency. */
static ssize_t disk_read_side(struct tier_reader *r, void *buf, size_t len, uint64_t off)
{
	struct disk_reader *dr = r->io;
	uint64_t a = disk_align_down(off, r->t->align);
	size_t span = (size_t)(disk_align_up(off + len, r->t->align) - a);
	ssize_t n;
	void *p;
	int rc;

	if (span > dr->side_cap) {
		rc = posix_memalign(&p, r->t->mem_align, span);
		if (rc)
			return -rc;
		free(dr->side);
		dr->side = p;
		dr->side_cap = span;
	}
	n = tier_pread_full(r->fd, dr->side, span, a);
	if (n < 0)
		return n;
	if ((uint64_t)n < off + len - a)
		return -EIO; /* shorter than its size at open: changed under us */
	memcpy(buf, dr->side + (off - a), len);
	return (ssize_t)len;
}

/* Empties the window, waiting for its requests. */
static int disk_reader_reset(struct disk_reader *dr, uint64_t off)
{
	int rc = disk_io_drain(&dr->io);

	for (unsigned i = 0; i < dr->io.n; i++)
		dr->io.req[i].state = DISK_IDLE;
	dr->head = 0;
	dr->count = 0;
	dr->win_end = disk_align_down(off, dr->io.t->align);
	dr->ra_end = dr->win_end;
	return rc;
}

/* Drops the window's first request (waiting for it when in flight). */
static int disk_reader_pop(struct disk_reader *dr)
{
	struct disk_req *rq = &dr->io.req[dr->head];
	int rc = disk_req_wait(&dr->io, rq);

	rq->state = DISK_IDLE;
	dr->head = (dr->head + 1) % dr->io.n;
	dr->count--;
	return rc;
}

/* Grows the window up to ra_end with free requests, submitted together. */
static int disk_reader_fill(struct disk_reader *dr)
{
	int queued = 0, rc;

	while (dr->count < dr->io.n && dr->win_end < dr->ra_end) {
		struct disk_req *rq = &dr->io.req[(dr->head + dr->count) % dr->io.n];
		uint64_t len = dr->ra_end - dr->win_end;

		rc = disk_io_pool(&dr->io);
		if (rc)
			return rc;
		if (!dr->io.ring_on && dr->io.ring_ok && dr->ra_end - dr->win_end > dr->io.cap)
			disk_io_ring(&dr->io); /* more than one request: worth a ring */
		rq->off = dr->win_end;
		rq->len = len < dr->io.cap ? (size_t)len : dr->io.cap;
		rq->need = dr->size - rq->off < rq->len ? (size_t)(dr->size - rq->off) : rq->len;
		rq->done = 0;
		rq->err = 0;
		dr->count++;
		dr->win_end += rq->len;
		disk_req_queue(&dr->io, rq);
		queued = 1;
	}
	return queued ? disk_io_submit(&dr->io) : 0;
}

static ssize_t disk_read(struct tier_reader *r, void *buf, size_t len, uint64_t off)
{
	struct disk_reader *dr = r->io;
	char *dst = buf;
	uint64_t span;
	size_t got = 0;
	int seq, rc;

	if (!dr)
		return tier_pread_full(r->fd, buf, len, off);
	if (off >= dr->size || len == 0)
		return 0;
	if (len > dr->size - off)
		len = (size_t)(dr->size - off);
	if (len > SSIZE_MAX)
		len = SSIZE_MAX;
	seq = off == dr->next_off;
	span = disk_align_up(off + len, r->t->align) - disk_align_down(off, r->t->align);
	if (!dr->count || off < dr->io.req[dr->head].off || off >= dr->win_end) {
		if (!seq && span <= DISK_SIDE_MAX) {
			dr->next_off = off + len; /* sequential from here: the window follows */
			return disk_read_side(r, buf, len, off);
		}
		rc = disk_reader_reset(dr, off);
		if (rc)
			goto fail;
	}
	/* Sequential: read ahead to the end of the file; else only this read's
	 * blocks, until the reads turn sequential. */
	if (seq)
		dr->ra_end = dr->end_al;
	else if (dr->ra_end < disk_align_up(off + len, r->t->align))
		dr->ra_end = disk_align_up(off + len, r->t->align);
	while (dr->count) {
		struct disk_req *h = &dr->io.req[dr->head];
		if (h->off + h->len > off)
			break;
		rc = disk_reader_pop(dr); /* wholly before this read */
		if (rc)
			goto fail;
	}
	while (got < len) {
		struct disk_req *h;
		uint64_t p = off + got, avail;
		size_t n;

		rc = disk_reader_fill(dr);
		if (rc)
			goto fail;
		if (!dr->count) {
			rc = -EIO; /* cannot happen: the window covers [off, off + len) */
			goto fail;
		}
		h = &dr->io.req[dr->head];
		rc = disk_req_wait(&dr->io, h);
		if (rc)
			goto fail;
		if (h->err) {
			rc = h->err;
			goto fail;
		}
		avail = h->off + (h->done < h->need ? h->done : h->need);
		if (p < h->off || p >= avail) {
			rc = -EIO; /* cannot happen: p is inside the head request */
			goto fail;
		}
		n = len - got < avail - p ? len - got : (size_t)(avail - p);
		memcpy(dst + got, h->buf + (p - h->off), n);
		got += n;
		if (p + n >= h->off + h->need) {
			rc = disk_reader_pop(dr); /* consumed: it moves to the window's end */
			if (rc)
				goto fail;
		}
	}
	dr->next_off = off + got;
	/* Keep the read-ahead going while the caller works on these bytes. */
	if (dr->ra_end == dr->end_al) {
		rc = disk_reader_fill(dr);
		if (rc)
			goto fail;
	}
	return (ssize_t)got;
fail:
	disk_reader_reset(dr, 0);
	dr->next_off = UINT64_MAX; /* the next read starts afresh */
	return rc;
}

static const struct tier_ops tier_ops_disk = {
	.kind = "disk",
	.allow_link = 0, /* the tier's files are its own: copies in and out */
	.create = disk_create,
	.write = disk_write,
	.pread = disk_pread,
	.copy_in = disk_copy_in,
	.sync_file = disk_sync_file,
	.sync_dir = disk_sync_dir,
	.reader_open = tmpfs_reader_open, /* buffered fd; disk_reader_init makes it O_DIRECT */
	.read = disk_read,
	.writer_init = disk_writer_init,
	.writer_fini = disk_writer_fini,
	.reader_init = disk_reader_init,
	.reader_fini = disk_reader_fini,
};

/* The io_uring half of disk_probe: one write and one read of `blk` bytes at
 * `off` through a ring, compared. Returns 0 or -errno (reason in why). */
static int disk_probe_ring(int fd, char *buf, char *back, size_t blk, uint64_t off, char *why,
			   size_t whylen)
{
	struct io_uring ring;
	struct io_uring_sqe *sqe;
	struct io_uring_cqe *cqe;
	int rc;

	rc = io_uring_queue_init(2, &ring, 0);
	if (rc) {
		snprintf(why, whylen, "io_uring_queue_init: %s", strerror(-rc));
		return rc;
	}
	for (int op = 0; op < 2; op++) {
		const char *name = op == 0 ? "write" : "read";

		sqe = io_uring_get_sqe(&ring);
		if (op == 0)
			io_uring_prep_write(sqe, fd, buf, (unsigned)blk, off);
		else
			io_uring_prep_read(sqe, fd, back, (unsigned)blk, off);
		rc = io_uring_submit(&ring);
		if (rc < 0) {
			snprintf(why, whylen, "io_uring_submit (%s): %s", name, strerror(-rc));
			goto out;
		}
		do
			rc = io_uring_wait_cqe(&ring, &cqe);
		while (rc == -EINTR);
		if (rc < 0) {
			snprintf(why, whylen, "io_uring_wait_cqe (%s): %s", name, strerror(-rc));
			goto out;
		}
		rc = cqe->res;
		io_uring_cqe_seen(&ring, cqe);
		if (rc < 0) {
			snprintf(why, whylen, "io_uring %s: %s", name, strerror(-rc));
			goto out;
		}
		if ((size_t)rc != blk) {
			snprintf(why, whylen, "io_uring %s: short transfer", name);
			rc = -EIO;
			goto out;
		}
	}
	rc = memcmp(buf, back, blk) ? -EIO : 0;
	if (rc)
		snprintf(why, whylen, "io_uring read: bytes differ from those written");
out:
	io_uring_queue_exit(&ring);
	return rc;
}

/* Chooses t->move for a disk tier: O_DIRECT if an unnamed temporary file in
 * the directory opens, writes and reads back with it (also giving the
 * alignment, from statx); io_uring if, on top, a ring can be set up and moves
 * the same bytes (unless want_ring is 0). Reasons for a fallback are
 * appended to t->io_reason. A probe that cannot create a file (read-only
 * directory, no space) keeps the modes it could not disprove. */
static void disk_probe(struct tier *t, int want_ring)
{
	char name[sizeof(TIER_TMP_PREFIX) + TIER_RANDOM_HEX], why[160];
	char *buf = NULL, *back = NULL;
	int fd, rc, direct = 1, ring = want_ring, err;
	size_t blk;
	ssize_t n;

	why[0] = '\0';
	name[0] = '\0';
	t->align = DISK_ALIGN_DEFAULT;
	t->mem_align = DISK_MEM_ALIGN;
	/* Unnamed: nothing to clean up after a crash. */
	fd = openat(t->dir_fd, ".", O_TMPFILE | O_RDWR | O_DIRECT | O_CLOEXEC, 0600);
	if (fd < 0) {
		/* No O_TMPFILE here (or no O_DIRECT: the named file tells). */
		rc = tier_create_tmp(t->dir_fd, TIER_TMP_PREFIX, O_RDWR | O_DIRECT, name,
				     sizeof(name), &fd);
		if (rc == 0 && unlinkat(t->dir_fd, name, 0)) {
			err = errno;
			klog(LOG_WARN, "event=tier_tmp_unlink_failed path=%s/%s errno=%d", t->path,
			     name, err);
		}
		if (rc)
			errno = -rc;
	}
	if (fd < 0) {
		err = errno;
		if (err == EINVAL) {
			direct = 0;
			snprintf(why, sizeof(why), "open O_DIRECT: %s", strerror(err));
		} else {
			klog(LOG_WARN,
			     "event=tier_io_probe_skipped tier=%s reason=\"cannot create a "
			     "probe file: %s\"",
			     t->path, strerror(err));
		}
		goto decide;
	}
#ifdef STATX_DIOALIGN
	{
		struct statx stx;

		if (statx(fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) == 0 &&
		    (stx.stx_mask & STATX_DIOALIGN) && stx.stx_dio_offset_align) {
			size_t a = stx.stx_dio_offset_align;
			if ((a & (a - 1)) == 0 && a <= DISK_REQ_DEFAULT) {
				t->align = a;
				if (stx.stx_dio_mem_align > t->mem_align &&
				    stx.stx_dio_mem_align <= DISK_REQ_DEFAULT)
					t->mem_align = stx.stx_dio_mem_align;
			}
		}
	}
#endif
	blk = t->align > DISK_MEM_ALIGN ? t->align : DISK_MEM_ALIGN;
	if (posix_memalign((void **)&buf, t->mem_align, blk) ||
	    posix_memalign((void **)&back, t->mem_align, blk)) {
		klog(LOG_WARN, "event=tier_io_probe_skipped tier=%s reason=\"out of memory\"",
		     t->path);
		goto decide;
	}
	for (size_t i = 0; i < blk; i++)
		buf[i] = (char)(i * 7 + 1);
	n = pwrite(fd, buf, blk, 0);
	if (n < 0 && errno == EINVAL) {
		direct = 0;
		snprintf(why, sizeof(why), "O_DIRECT write: %s", strerror(EINVAL));
		goto decide;
	}
	if (n != (ssize_t)blk) {
		err = n < 0 ? errno : EIO;
		klog(LOG_WARN, "event=tier_io_probe_skipped tier=%s reason=\"probe write: %s\"",
		     t->path, strerror(err));
		goto decide;
	}
	memset(back, 0, blk);
	n = pread(fd, back, blk, 0);
	if (n != (ssize_t)blk || memcmp(buf, back, blk)) {
		err = n < 0 ? errno : EIO;
		direct = 0;
		snprintf(why, sizeof(why), "O_DIRECT read: %s",
			 n == (ssize_t)blk ? "bytes differ from those written" : strerror(err));
		goto decide;
	}
	if (ring) {
		memset(back, 0, blk);
		rc = disk_probe_ring(fd, buf, back, blk, blk, why, sizeof(why));
		if (rc && rc != -ENOSPC)
			ring = 0;
	}
decide:
	if (fd >= 0)
		close(fd);
	free(buf);
	free(back);
	if (!direct)
		ring = 0;
	t->move = ring ? TIER_MOVE_URING_DIRECT : direct ? TIER_MOVE_PREAD_DIRECT : TIER_MOVE_PREAD;
	if (why[0] && (!ring || !direct)) {
		size_t used = strlen(t->io_reason);
		snprintf(t->io_reason + used, sizeof(t->io_reason) - used, "%s%s", used ? "; " : "",
			 why);
	}
}

/* Kinds by name. */
static const struct tier_ops *const tier_kinds[] = { &tier_ops_tmpfs, &tier_ops_disk };

/* ---- open, close, accounting ---- */

/* mkdir -p: creates every missing component of path with `mode`. */
static int tier_mkdir_p(const char *path, mode_t mode)
{
	char *copy = strdup(path);
	int rc = 0;

	if (!copy)
		return -ENOMEM;
	for (char *p = copy + 1;; p++) {
		char c = *p;
		if (c != '/' && c != '\0')
			continue;
		*p = '\0';
		if (mkdir(copy, mode)) {
			int err = errno;
			struct stat st;
			/* An existing component may answer EACCES or EROFS instead of EEXIST. */
			if (err != EEXIST && (stat(copy, &st) || !S_ISDIR(st.st_mode))) {
				rc = -err;
				break;
			}
		}
		*p = c;
		if (c == '\0')
			break;
		while (p[1] == '/')
			p++;
	}
	free(copy);
	return rc;
}

/* Checks the options and fills the tier's disk settings (defaults for NULL). */
static int tier_set_options(struct tier *t, const struct tier_options *opt)
{
	t->depth = DISK_DEPTH_DEFAULT;
	t->req_bytes = DISK_REQ_DEFAULT;
	if (!opt)
		return 0;
	if (opt->io_mode != TIER_IO_AUTO && opt->io_mode != TIER_IO_PREAD)
		return KVTIER_E_INVALID;
	if (opt->queue_depth > DISK_DEPTH_MAX || opt->request_bytes > DISK_REQ_MAX)
		return KVTIER_E_INVALID;
	if (opt->queue_depth)
		t->depth = opt->queue_depth;
	if (opt->request_bytes)
		t->req_bytes = opt->request_bytes;
	return 0;
}

/* A disk tier: why io_uring is skipped if it is, the probe, one log line. */
static void tier_choose_io(struct tier *t, const struct tier_options *opt)
{
	const char *env = getenv("KVTIER_NO_IO_URING");
	int want_ring = 1, forced = 0;

	if (opt && opt->io_mode == TIER_IO_PREAD) {
		want_ring = 0;
		forced = 1;
		snprintf(t->io_reason, sizeof(t->io_reason), "io_mode=pread requested");
	} else if (env && env[0] && strcmp(env, "0") != 0) {
		want_ring = 0;
		forced = 1;
		snprintf(t->io_reason, sizeof(t->io_reason), "KVTIER_NO_IO_URING=%.32s", env);
	}
	disk_probe(t, want_ring);
	/* Buffer i sits at i * req_bytes in one pool: a multiple of the memory
	 * alignment keeps every buffer aligned for O_DIRECT. */
	t->req_bytes = (size_t)disk_align_up(t->req_bytes,
					     t->align > t->mem_align ? t->align : t->mem_align);
	/* A fallback the operator did not ask for is worth a warning. */
	klog(t->io_reason[0] && (!forced || t->move == TIER_MOVE_PREAD) ? LOG_WARN : LOG_INFO,
	     "event=tier_io tier=%s kind=%s mode=%s depth=%u request_bytes=%zu align=%zu "
	     "reason=\"%s\"",
	     t->path, t->ops->kind, tier_move_desc[t->move],
	     t->move == TIER_MOVE_URING_DIRECT ? t->depth : 1, t->req_bytes, t->align,
	     t->io_reason);
}

int tier_open(const char *kind, const char *path, uint64_t capacity, const struct tier_options *opt,
	      struct tier **out)
{
	const struct tier_ops *ops = NULL;
	struct tier *t = NULL;
	struct stat st;
	int rc;

	if (!out)
		return KVTIER_E_INVALID;
	*out = NULL;
	if (!kind || !path || !path[0])
		return KVTIER_E_INVALID;
	for (size_t i = 0; i < sizeof(tier_kinds) / sizeof(tier_kinds[0]); i++)
		if (strcmp(kind, tier_kinds[i]->kind) == 0)
			ops = tier_kinds[i];
	if (!ops)
		return KVTIER_E_INVALID;

	t = calloc(1, sizeof(*t));
	if (!t)
		return -ENOMEM;
	t->dir_fd = -1;
	t->ops = ops;
	t->capacity = capacity;
	t->move = TIER_MOVE_MEMORY;
	t->align = 1;
	t->mem_align = DISK_MEM_ALIGN;
	rc = tier_set_options(t, opt);
	if (rc)
		goto out;
	t->path = strdup(path);
	if (!t->path) {
		rc = -ENOMEM;
		goto out;
	}
	rc = tier_mkdir_p(path, 0700);
	if (rc)
		goto out;
	t->dir_fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (t->dir_fd < 0) {
		rc = -errno; /* -ENOTDIR: path exists and is not a directory */
		goto out;
	}
	if (fstat(t->dir_fd, &st)) {
		rc = -errno;
		goto out;
	}
	if (!S_ISDIR(st.st_mode)) {
		rc = -ENOTDIR;
		goto out;
	}
	if (st.st_mode & S_IWOTH) {
		/* Anyone could plant names (symlinks, FIFOs, decoys) in it. */
		klog(LOG_ERROR, "event=tier_refused path=%s reason=\"directory is writable by "
		     "everyone; use a private directory (mode 0700)\"", path);
		rc = -EPERM;
		goto out;
	}
	t->dir_dev = st.st_dev;
	t->dir_ino = st.st_ino;
	if (ops == &tier_ops_disk)
		tier_choose_io(t, opt);
	rc = pthread_mutex_init(&t->lock, NULL);
	if (rc) {
		rc = -rc;
		goto out;
	}
	*out = t;
	t = NULL;
out:
	if (t) {
		if (t->dir_fd >= 0)
			close(t->dir_fd);
		free(t->path);
		free(t);
	}
	return rc;
}

void tier_close(struct tier *t)
{
	if (!t)
		return;
	close(t->dir_fd);
	pthread_mutex_destroy(&t->lock);
	free(t->path);
	free(t);
}

const char *tier_kind(const struct tier *t)
{
	return t->ops->kind;
}

const char *tier_path(const struct tier *t)
{
	return t->path;
}

const char *tier_io_desc(const struct tier *t)
{
	return tier_move_desc[t->move];
}

const char *tier_io_fallback_reason(const struct tier *t)
{
	return t->io_reason;
}

void tier_get_stats(const struct tier *t, struct tier_stats *out)
{
	tier_lock(t);
	out->capacity = t->capacity;
	out->used = t->used;
	out->reserved = t->reserved;
	out->files = t->files;
	out->read_bytes = t->read_bytes;
	out->write_bytes = t->write_bytes;
	out->read_seconds = t->read_seconds;
	out->write_seconds = t->write_seconds;
	out->read_ops = t->read_ops;
	out->write_ops = t->write_ops;
	out->read_hist_sum = t->read_hist_sum;
	out->write_hist_sum = t->write_hist_sum;
	memcpy(out->read_hist, t->read_hist, sizeof(out->read_hist));
	memcpy(out->write_hist, t->write_hist, sizeof(out->write_hist));
	tier_unlock(t);
}

void tier_account(struct tier *t, int64_t delta, int files_delta)
{
	uint64_t minus = (uint64_t)0 - (uint64_t)delta; /* |delta| when delta < 0 */

	tier_lock(t);
	if (delta >= 0)
		t->used += (uint64_t)delta;
	else if (minus <= t->used)
		t->used -= minus;
	else
		t->used = 0; /* more removed than accounted: a caller bug, do not wrap */
	if (files_delta >= 0)
		t->files += (uint64_t)files_delta;
	else if ((uint64_t)(-(int64_t)files_delta) <= t->files)
		t->files -= (uint64_t)(-(int64_t)files_delta);
	else
		t->files = 0;
	tier_unlock(t);
}

int tier_reserve(struct tier *t, uint64_t size)
{
	int rc = 0;

	tier_lock(t);
	/* used + reserved + size > capacity, without overflow */
	if (size > t->capacity || t->used + t->reserved > t->capacity - size)
		rc = KVTIER_E_FULL;
	else
		t->reserved += size;
	tier_unlock(t);
	return rc;
}

void tier_unreserve(struct tier *t, uint64_t size)
{
	tier_lock(t);
	t->reserved = size <= t->reserved ? t->reserved - size : 0;
	tier_unlock(t);
}

/* ---- writers ---- */

/* Frees a writer: closes its fd, removes its temporary (when w->tmp names
 * one) and releases what is left of its reservation. */
static void tier_writer_free(struct tier_writer *w)
{
	int err;

	if (w->io && w->t->ops->writer_fini)
		w->t->ops->writer_fini(w); /* waits for its I/O: before the close */
	if (w->fd >= 0)
		close(w->fd);
	if (w->tmp[0] && unlinkat(w->t->dir_fd, w->tmp, 0)) {
		err = errno;
		klog(LOG_WARN, "event=tier_tmp_unlink_failed path=%s/%s errno=%d", w->t->path,
		     w->tmp, err);
	}
	tier_unreserve(w->t, w->reserved);
	free(w);
}

/* Creates the writer's temporary under a fresh random name through the
 * kind's create op, and the kind's private state. On failure w->tmp names
 * the temporary only when it was created (tier_writer_free removes it). */
static int tier_writer_create(struct tier_writer *w)
{
	int rc = -EEXIST;

	for (int i = 0; i < TIER_TMP_TRIES && rc == -EEXIST; i++) {
		rc = tier_random_name(w->tmp, sizeof(w->tmp), TIER_TMP_PREFIX);
		if (rc)
			break;
		rc = w->t->ops->create(w->t, w->tmp, &w->fd);
	}
	if (rc) {
		w->tmp[0] = '\0'; /* not ours: never unlink it */
		return rc;
	}
	return w->t->ops->writer_init ? w->t->ops->writer_init(w) : 0;
}

int tier_writer_open(struct tier *t, uint64_t size, struct tier_writer **out)
{
	struct tier_writer *w;
	int rc;

	*out = NULL;
	w = calloc(1, sizeof(*w));
	if (!w)
		return -ENOMEM;
	w->t = t;
	w->fd = -1;
	rc = tier_reserve(t, size);
	if (rc) {
		free(w);
		return rc;
	}
	w->reserved = size;
	rc = tier_writer_create(w);
	if (rc) {
		tier_writer_free(w);
		return rc;
	}
	*out = w;
	return 0;
}

/* Opens src_path as a regular file, never through a symlink: fd and stat. */
static int tier_open_source(const char *src_path, int *fd, struct stat *st)
{
	int err;

	if (lstat(src_path, st))
		return -errno;
	if (!S_ISREG(st->st_mode))
		return KVTIER_E_INVALID; /* not a regular file (symlink, directory, FIFO...) */
	/* O_NONBLOCK: a FIFO swapped in after the lstat must not hang the open. */
	*fd = open(src_path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
	if (*fd < 0) {
		err = errno;
		return err == ELOOP ? KVTIER_E_INVALID : -err;
	}
	if (fstat(*fd, st)) {
		err = errno;
		close(*fd);
		*fd = -1;
		return -err;
	}
	if (!S_ISREG(st->st_mode)) {
		close(*fd);
		*fd = -1;
		return KVTIER_E_INVALID;
	}
	return 0;
}

/* 0 when no process holds the inode fd refers to open for writing (or
 * mapped through such an open): the kernel refuses a read lease then. 1 when
 * that cannot be shown, with *why set. The lease is given back at once. */
static int tier_no_writers(int fd, const char **why)
{
	int err;

	if (fcntl(fd, F_SETLEASE, F_RDLCK) == 0) {
		(void)fcntl(fd, F_SETLEASE, F_UNLCK);
		return 0;
	}
	err = errno;
	*why = err == EAGAIN ? "the source is open for writing"
			     : "its writers cannot be checked (a file lease was refused)";
	return 1;
}

/* Tries to bring src_path in by a hard link under w->tmp, and makes the
 * inode the tier's own (tier_writer_from_file). Returns 0 when linked (the
 * link is the inode src_fd holds, of the expected size, read-only, owned by
 * this process's user, with no writer and no name but the source's and
 * ours), 1 when a copy is needed instead (*why says why), or an error. */
static int tier_link_in(struct tier_writer *w, const char *src_path, int src_fd,
			const struct stat *src_st, const char **why)
{
	struct tier *t = w->t;
	struct stat st;
	int rc = -EEXIST, err, linked = 0;

	for (int i = 0; i < TIER_TMP_TRIES && rc == -EEXIST; i++) {
		rc = tier_random_name(w->tmp, sizeof(w->tmp), TIER_TMP_PREFIX);
		if (rc)
			goto out;
		/* flags 0: a symlink swapped in is linked as a symlink, never followed */
		rc = linkat(AT_FDCWD, src_path, t->dir_fd, w->tmp, 0) ? -errno : 0;
	}
	if (rc == -EXDEV || rc == -EPERM || rc == -EMLINK) {
		*why = "no hard link possible (another file system, or links refused)";
		rc = 1;
		goto out;
	}
	if (rc)
		goto out;
	linked = 1;
	if (fstatat(t->dir_fd, w->tmp, &st, AT_SYMLINK_NOFOLLOW)) {
		rc = -errno;
		goto out;
	}
	if (st.st_dev != src_st->st_dev || st.st_ino != src_st->st_ino) {
		/* The name was swapped between our open and the link: copy what we opened. */
		klog(LOG_WARN, "event=tier_link_in_swapped src=%s reason=\"source replaced while "
		     "being linked; copying the file that was checked\"", src_path);
		*why = "the source was replaced while being linked";
		rc = 1;
		goto out;
	}
	/* Take the inode away from its former owner first (no new open for
	 * writing can succeed after this), then check that no name and no
	 * writer is left that could still change it. */
	if (st.st_uid != geteuid() && fchown(src_fd, geteuid(), (gid_t)-1)) {
		*why = "the source belongs to another user and this process cannot take it over";
		rc = 1;
		goto out;
	}
	if (fchmod(src_fd, 0440)) {
		rc = -errno;
		goto out;
	}
	if (fstat(src_fd, &st)) {
		rc = -errno;
		goto out;
	}
	if ((uint64_t)st.st_size != w->reserved) {
		rc = -EIO; /* the source changed size meanwhile */
		goto out;
	}
	if (st.st_nlink != 2) {
		*why = "the source got another name while being linked";
		rc = 1;
		goto out;
	}
	rc = tier_no_writers(src_fd, why);
out:
	if (rc && linked && unlinkat(t->dir_fd, w->tmp, 0)) {
		err = errno;
		klog(LOG_WARN, "event=tier_tmp_unlink_failed path=%s/%s errno=%d", t->path, w->tmp,
		     err);
	}
	if (rc)
		w->tmp[0] = '\0'; /* nothing of ours under that name now */
	return rc;
}

/* Whether the file src_fd holds may be linked: 0, or 1 with *why set. Checks
 * what can be checked before anything is changed. */
static int tier_link_in_allowed(const struct tier *t, const struct tier_take *take, int src_fd,
				const struct stat *st, const char **why)
{
	if (!t->ops->allow_link || take->force_copy)
		return 1;
	if (st->st_nlink != 1) {
		*why = "the source has other names";
		return 1;
	}
	return tier_no_writers(src_fd, why);
}

int tier_writer_from_file(struct tier *t, const char *src_path, struct tier_take *take,
			  uint64_t *size, struct tier_writer **out)
{
	struct tier_writer *w = NULL;
	struct stat st;
	const char *why = NULL;
	int rc, src_fd = -1;
	double t0;

	*out = NULL;
	take->linked = 0;
	take->copy_reason = NULL;
	if (!src_path || !src_path[0])
		return KVTIER_E_INVALID;
	rc = tier_open_source(src_path, &src_fd, &st);
	if (rc)
		goto out;
	take->uid = st.st_uid;
	take->nlink = (unsigned long)st.st_nlink;
	if (take->sole && (st.st_nlink != 1 || st.st_uid != take->owner)) {
		rc = KVTIER_E_DENIED;
		goto out;
	}
	w = calloc(1, sizeof(*w));
	if (!w) {
		rc = -ENOMEM;
		goto out;
	}
	w->t = t;
	w->fd = -1;
	rc = tier_reserve(t, (uint64_t)st.st_size);
	if (rc)
		goto out;
	w->reserved = (uint64_t)st.st_size;

	rc = tier_link_in_allowed(t, take, src_fd, &st, &why);
	if (rc == 0)
		rc = tier_link_in(w, src_path, src_fd, &st, &why);
	if (rc == 0) {
		/* The tier file is the inode we hold open: it serves pread. */
		w->fd = src_fd;
		src_fd = -1;
		w->written = w->reserved;
		take->linked = 1;
		goto out;
	}
	if (rc < 0)
		goto out;
	if (t->ops->allow_link && !take->force_copy)
		take->copy_reason = why;

	rc = tier_writer_create(w);
	if (rc)
		goto out;
	t0 = tier_now();
	rc = t->ops->copy_in(w, src_fd, w->reserved);
	if (rc)
		goto out;
	w->seconds += tier_now() - t0;
	tier_count_write(t, w->reserved, tier_now() - t0);
	w->written = w->reserved;
out:
	if (src_fd >= 0)
		close(src_fd);
	if (rc == 0) {
		*size = w->reserved;
		*out = w;
	} else if (w) {
		tier_writer_free(w);
	}
	return rc;
}

/* tier_writer_write without statistics (tier_probe). */
static int tier_writer_append(struct tier_writer *w, const void *buf, size_t len)
{
	int rc;

	if (len == 0)
		return 0;
	if (len > w->reserved - w->written)
		return -EFBIG;
	rc = w->t->ops->write(w, buf, len, w->written);
	if (rc)
		return rc;
	w->written += len;
	return 0;
}

int tier_writer_write(struct tier_writer *w, const void *buf, size_t len)
{
	double t0 = tier_now(), dt;
	int rc;

	rc = tier_writer_append(w, buf, len);
	if (rc || len == 0)
		return rc;
	dt = tier_now() - t0;
	w->seconds += dt;
	tier_count_write(w->t, len, dt);
	return 0;
}

int tier_writer_pread(struct tier_writer *w, void *buf, size_t len, uint64_t off)
{
	if (off > w->written || len > w->written - off)
		return -ENODATA;
	if (len == 0)
		return 0;
	return w->t->ops->pread(w, buf, len, off);
}

uint64_t tier_writer_size(const struct tier_writer *w)
{
	return w->written;
}

int tier_writer_commit(struct tier_writer *w, const char *name)
{
	struct tier *t = w->t;
	double t0 = tier_now(), dt;
	int rc, err;

	rc = tier_name_valid(name);
	if (rc)
		goto out;
	/* Committed files are immutable: read-only, so that an open for writing
	 * through a staged hard link (llama-server saving into that name with
	 * "wb") fails instead of rewriting the stored bytes. */
	if (fchmod(w->fd, 0440)) {
		rc = -errno;
		goto out;
	}
	rc = t->ops->sync_file(w);
	if (rc)
		goto out;
	rc = tier_rename_noreplace(t->dir_fd, w->tmp, t->dir_fd, name);
	if (rc)
		goto out;
	w->tmp[0] = '\0'; /* the temporary name is gone */
	rc = t->ops->sync_dir(t);
	if (rc) {
		/* Not durable: take the name back rather than report a file that may vanish. */
		if (unlinkat(t->dir_fd, name, 0)) {
			err = errno;
			klog(LOG_WARN, "event=tier_unlink_failed path=%s/%s errno=%d", t->path,
			     name, err);
		}
		goto out;
	}
	dt = w->seconds + (tier_now() - t0);
	tier_lock(t);
	t->reserved = w->reserved <= t->reserved ? t->reserved - w->reserved : 0;
	t->used += w->written;
	t->files++;
	t->write_ops++;
	t->write_hist_sum += dt;
	tier_hist_add_locked(t->write_hist, dt);
	tier_unlock(t);
	w->reserved = 0; /* now usage: tier_writer_free must not release it */
out:
	tier_writer_free(w);
	return rc;
}

int tier_writer_can_retry(const struct tier_writer *w)
{
	return w->t->ops == &tier_ops_tmpfs;
}

void tier_writer_abort(struct tier_writer *w)
{
	if (w)
		tier_writer_free(w);
}

/* ---- readers and committed files ---- */

/* tier_reader_open without the name check (tier_probe reads a temporary). */
static int tier_reader_open_name(struct tier *t, const char *name, struct tier_reader **out,
				 uint64_t *size)
{
	struct tier_reader *r = NULL;
	struct stat st;
	int rc, fd = -1;

	*out = NULL;
	rc = t->ops->reader_open(t, name, &fd);
	if (rc) {
		if (rc == -ENOENT)
			rc = KVTIER_E_NOTFOUND;
		else if (rc == -ELOOP)
			rc = KVTIER_E_INVALID; /* a symlink */
		goto out;
	}
	if (fstat(fd, &st)) {
		rc = -errno;
		goto out;
	}
	if (!S_ISREG(st.st_mode)) {
		rc = KVTIER_E_INVALID;
		goto out;
	}
	r = calloc(1, sizeof(*r));
	if (!r) {
		rc = -ENOMEM;
		goto out;
	}
	r->t = t;
	r->fd = fd;
	fd = -1;
	if (t->ops->reader_init) {
		rc = t->ops->reader_init(r, (uint64_t)st.st_size);
		if (rc) {
			close(r->fd);
			free(r);
			goto out;
		}
	}
	if (size)
		*size = (uint64_t)st.st_size;
	*out = r;
out:
	if (fd >= 0)
		close(fd);
	return rc;
}

int tier_reader_open(struct tier *t, const char *name, struct tier_reader **out, uint64_t *size)
{
	int rc;

	*out = NULL;
	rc = tier_name_valid(name);
	if (rc)
		return rc;
	return tier_reader_open_name(t, name, out, size);
}

ssize_t tier_reader_read(struct tier_reader *r, void *buf, size_t len, uint64_t off)
{
	double t0 = tier_now(), dt;
	ssize_t n = r->t->ops->read(r, buf, len, off);

	if (n > 0) {
		dt = tier_now() - t0;
		r->seconds += dt;
		r->bytes += (uint64_t)n;
		tier_count_read(r->t, (uint64_t)n, dt);
	}
	return n;
}

int tier_reader_map(struct tier_reader *r, uint64_t off, size_t len, struct tier_map *m)
{
	long page = sysconf(_SC_PAGESIZE);
	uint64_t start = off - off % (uint64_t)(page > 0 ? page : 4096);
	void *p;

	memset(m, 0, sizeof(*m));
	/* Only where the bytes are memory already: mapping a disk file would
	 * trade the O_DIRECT pipeline for page faults. */
	if (r->t->ops != &tier_ops_tmpfs || len == 0)
		return -ENOTSUP;
	p = mmap(NULL, (size_t)(off - start) + len, PROT_READ, MAP_SHARED, r->fd, (off_t)start);
	if (p == MAP_FAILED)
		return -errno;
	m->base = p;
	m->base_len = (size_t)(off - start) + len;
	m->data = (const uint8_t *)p + (off - start);
	m->len = len;
	return 0;
}

void tier_unmap(struct tier_map *m)
{
	if (m->base)
		munmap(m->base, m->base_len);
	memset(m, 0, sizeof(*m));
}

void tier_reader_account(struct tier_reader *r, uint64_t bytes, double seconds)
{
	r->seconds += seconds;
	r->bytes += bytes;
	tier_count_read(r->t, bytes, seconds);
}

/* Closes without counting (tier_probe). */
static void tier_reader_free(struct tier_reader *r)
{
	if (r->io && r->t->ops->reader_fini)
		r->t->ops->reader_fini(r); /* waits for its I/O: before the close */
	close(r->fd);
	free(r);
}

void tier_reader_close(struct tier_reader *r)
{
	if (!r)
		return;
	if (r->bytes)
		tier_observe_read(r->t, r->seconds);
	tier_reader_free(r);
}

/* ---- the restore cost probe ---- */

/* Byte i of tier_probe's file: varied, so no layer can shortcut it. */
static unsigned char tier_probe_byte(uint64_t i)
{
	return (unsigned char)((i * 2654435761u) >> 13 ^ i >> 20);
}

/* Opens the probe file, reads len bytes at off through the kind's read op
 * (not counted in the statistics) and checks them. Returns the seconds
 * taken in *secs (open included, close excluded). */
static int tier_probe_read(struct tier *t, const char *tmp, unsigned char *buf, size_t bufsz,
			   uint64_t off, uint64_t len, double *secs)
{
	struct tier_reader *r = NULL;
	uint64_t size, done = 0;
	double t0 = tier_now();
	size_t want = 0;
	ssize_t n;
	int rc;

	rc = tier_reader_open_name(t, tmp, &r, &size);
	if (rc)
		return rc;
	while (done < len) {
		want = len - done < bufsz ? (size_t)(len - done) : bufsz;
		n = t->ops->read(r, buf, want, off + done);
		if (n < 0) {
			rc = (int)n;
			goto out;
		}
		if ((size_t)n != want) {
			rc = -EIO; /* shorter than what was written */
			goto out;
		}
		done += want;
	}
	*secs = tier_now() - t0;
	/* Spot-check the last piece read (a full compare of every piece would
	 * be measured too). */
	for (size_t i = 0; i < want; i += 509)
		if (buf[i] != tier_probe_byte(off + done - want + i)) {
			rc = -EIO;
			goto out;
		}
out:
	tier_reader_free(r);
	return rc;
}

static int tier_double_cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

int tier_probe(struct tier *t, uint64_t probe_bytes, double *fixed_s, double *bytes_per_s)
{
	const size_t bufsz = TIER_COPY_CHUNK;
	struct tier_writer *w = NULL;
	unsigned char *buf = NULL;
	double small[3], whole = 0, fixed, d;
	uint64_t done = 0;
	int rc;

	if (probe_bytes == 0)
		probe_bytes = TIER_PROBE_DEFAULT;
	if (probe_bytes < TIER_PROBE_MIN)
		probe_bytes = TIER_PROBE_MIN;
	buf = malloc(bufsz);
	if (!buf)
		return -ENOMEM;
	rc = tier_writer_open(t, probe_bytes, &w);
	if (rc)
		goto out;
	while (done < probe_bytes) {
		size_t n = probe_bytes - done < bufsz ? (size_t)(probe_bytes - done) : bufsz;

		for (size_t i = 0; i < n; i++)
			buf[i] = tier_probe_byte(done + i);
		rc = tier_writer_append(w, buf, n);
		if (rc)
			goto out;
		done += n;
	}
	rc = t->ops->sync_file(w);
	if (rc)
		goto out;
	/* Buffered mode: from the device, not from the pages just written. */
	if (t->move == TIER_MOVE_PREAD)
		posix_fadvise(w->fd, 0, 0, POSIX_FADV_DONTNEED);
	/* Small reads away from offset 0 (a read there starts a read-ahead). */
	for (int i = 0; i < 3; i++) {
		uint64_t off =
		    probe_bytes / 4 * (uint64_t)(i + 1) / TIER_PROBE_SMALL * TIER_PROBE_SMALL;

		rc = tier_probe_read(t, w->tmp, buf, bufsz, off, TIER_PROBE_SMALL, &small[i]);
		if (rc)
			goto out;
	}
	if (t->move == TIER_MOVE_PREAD)
		posix_fadvise(w->fd, 0, 0, POSIX_FADV_DONTNEED);
	rc = tier_probe_read(t, w->tmp, buf, bufsz, 0, probe_bytes, &whole);
	if (rc)
		goto out;
	qsort(small, 3, sizeof(small[0]), tier_double_cmp);
	fixed = small[1] > 1e-9 ? small[1] : 1e-9;
	d = whole - fixed > whole / 2 ? whole - fixed : whole;
	if (d < 1e-9)
		d = 1e-9;
	*fixed_s = fixed;
	*bytes_per_s = (double)probe_bytes / d;
	klog(LOG_DEBUG,
	     "event=tier_probe_done tier=%s mode=%s bytes=%llu fixed_s=%.6f "
	     "whole_s=%.6f bytes_per_s=%.0f",
	     t->path, tier_move_desc[t->move], (unsigned long long)probe_bytes, fixed, whole,
	     *bytes_per_s);
out:
	if (w)
		tier_writer_abort(w); /* removes the probe file, releases the reservation */
	free(buf);
	return rc;
}

/* Stats the tier file `name` without following a symlink: 0 and *st for a
 * regular file; KVTIER_E_NOTFOUND, KVTIER_E_INVALID (a bad name, or not a
 * regular file) or -errno otherwise. */
static int tier_lstat_regular(struct tier *t, const char *name, struct stat *st)
{
	int rc = tier_name_valid(name);

	if (rc)
		return rc;
	if (fstatat(t->dir_fd, name, st, AT_SYMLINK_NOFOLLOW))
		return errno == ENOENT ? KVTIER_E_NOTFOUND : -errno;
	return S_ISREG(st->st_mode) ? 0 : KVTIER_E_INVALID;
}

int tier_stat(struct tier *t, const char *name, uint64_t *size)
{
	struct stat st;
	int rc = tier_lstat_regular(t, name, &st);

	if (rc)
		return rc;
	*size = (uint64_t)st.st_size;
	return 0;
}

int tier_file_id(struct tier *t, const char *name, struct tier_file_id *id)
{
	struct timespec now;
	struct stat st;
	int rc = tier_lstat_regular(t, name, &st);

	if (rc)
		return rc;
	id->dev = (uint64_t)st.st_dev;
	id->ino = (uint64_t)st.st_ino;
	id->size = (uint64_t)st.st_size;
	id->mtime_ns = (int64_t)st.st_mtim.tv_sec * 1000000000 + st.st_mtim.tv_nsec;
	id->own = st.st_uid == geteuid() && !(st.st_mode & (S_IWGRP | S_IWOTH));
	/* The file system stamps writes with the coarse clock (or later). */
	if (clock_gettime(CLOCK_REALTIME_COARSE, &now))
		return -errno;
	id->settled = id->mtime_ns < (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
	return 0;
}

int tier_file_id_equal(const struct tier_file_id *a, const struct tier_file_id *b)
{
	return a->dev == b->dev && a->ino == b->ino && a->size == b->size &&
	       a->mtime_ns == b->mtime_ns;
}

int tier_remove(struct tier *t, const char *name)
{
	struct stat st;
	int rc = tier_lstat_regular(t, name, &st), err;

	if (rc) /* not a regular file: never a committed one, tier_unlink_raw's business */
		return rc;
	if (unlinkat(t->dir_fd, name, 0)) {
		err = errno;
		/* ENOENT: a concurrent remove won, and accounted. */
		return err == ENOENT ? KVTIER_E_NOTFOUND : -err;
	}
	tier_account(t, -(int64_t)st.st_size, -1);
	return 0;
}

int tier_unlink_raw(struct tier *t, const char *name)
{
	/* Temporaries start with '.', so only the structural checks apply. */
	if (!name || !name[0] || strchr(name, '/') || strcmp(name, ".") == 0 ||
	    strcmp(name, "..") == 0)
		return KVTIER_E_INVALID;
	return unlinkat(t->dir_fd, name, 0) ? -errno : 0;
}

int tier_link_out(struct tier *t, const char *name, int dst_dir, const char *dst_name)
{
	int rc, err;

	rc = tier_name_valid(name);
	if (rc)
		return rc;
	rc = tier_dst_name_valid(dst_name);
	if (rc)
		return rc;
	if (!t->ops->allow_link)
		return -EXDEV;
	/* flags 0: a symlink in the tier would be linked as a symlink, not followed */
	if (linkat(t->dir_fd, name, dst_dir, dst_name, 0) == 0)
		return 0;
	err = errno;
	if (err == EEXIST)
		return KVTIER_E_EXISTS;
	if (err == ENOENT)
		return KVTIER_E_NOTFOUND;
	/* Another file system, or links refused: the caller copies (and checks
	 * the bytes it copies). */
	return err == EPERM || err == EMLINK ? -EXDEV : -err;
}

/* Opens path as the tier's new directory and puts it under t->dir_fd's
 * number. Returns 0, or -errno / -EPERM (writable by everyone) / -ENOTDIR. */
static int tier_dir_reopen(struct tier *t)
{
	struct stat st;
	int fd, rc = 0;

	fd = open(t->path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	if (fstat(fd, &st)) {
		rc = -errno;
		goto out;
	}
	if (st.st_mode & S_IWOTH) {
		rc = -EPERM; /* the same rule as tier_open */
		goto out;
	}
	/* Atomic for every thread using the number: an *at() call sees the old
	 * directory or the new one, never a closed or reused descriptor. */
	if (dup2(fd, t->dir_fd) < 0) {
		rc = -errno;
		goto out;
	}
	tier_lock(t);
	t->dir_dev = st.st_dev;
	t->dir_ino = st.st_ino;
	tier_unlock(t);
out:
	close(fd);
	return rc;
}

int tier_dir_check(struct tier *t, char *why, size_t whylen)
{
	struct stat fdst, pst;
	int rc, err = 0, removed;

	if (fstat(t->dir_fd, &fdst))
		return -errno;
	removed = fdst.st_nlink == 0;
	if (stat(t->path, &pst))
		err = errno;
	tier_lock(t);
	rc = !removed && !err && pst.st_dev == t->dir_dev && pst.st_ino == t->dir_ino;
	tier_unlock(t);
	if (rc)
		return TIER_DIR_OK;
	if (!removed) {
		/* Renamed, or another directory mounted or put over the path: ours
		 * still exists and holds the blobs, so kvtierd keeps using it. */
		snprintf(why, whylen, "%s no longer names the directory kvtierd opened at start "
			 "(it was renamed, replaced or mounted over: %s); kvtierd keeps using the "
			 "directory it opened, which still holds the blobs: put it back at %s, or "
			 "restart kvtierd to use what is there now",
			 t->path, err ? strerror(err) : "another directory is there now", t->path);
		return TIER_DIR_MOVED;
	}
	if (err == ENOENT) {
		snprintf(why, whylen, "directory %s was removed while kvtierd was running, with "
			 "every blob file in it; recreate it (mkdir -m 0700 %s) and kvtierd reopens "
			 "it within a second, or restart kvtierd", t->path, t->path);
		return TIER_DIR_REMOVED;
	}
	rc = err ? -err : S_ISDIR(pst.st_mode) ? tier_dir_reopen(t) : -ENOTDIR;
	if (rc == 0) {
		snprintf(why, whylen, "directory %s was removed and recreated; kvtierd reopened it "
			 "(the blob files of the removed directory are lost)", t->path);
		return TIER_DIR_REOPENED;
	}
	snprintf(why, whylen, "directory %s was removed while kvtierd was running, and what is "
		 "at that path now cannot be used: %s; make it a private directory (mkdir -m "
		 "0700 %s) and kvtierd reopens it within a second, or restart kvtierd", t->path,
		 rc == -EPERM ? "it is writable by everyone" : kvtier_strerror(rc), t->path);
	return TIER_DIR_REMOVED;
}

int tier_scan(struct tier *t, int (*cb)(void *ctx, const char *name, uint64_t size, int is_regular),
	      void *ctx)
{
	DIR *dir = NULL;
	struct dirent *de;
	struct stat st;
	int rc = 0, fd, err;

	fd = openat(t->dir_fd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	dir = fdopendir(fd);
	if (!dir) {
		rc = -errno;
		close(fd);
		goto out;
	}
	for (;;) {
		errno = 0;
		de = readdir(dir);
		if (!de) {
			err = errno;
			rc = err ? -err : 0;
			break;
		}
		if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
			continue;
		if (fstatat(t->dir_fd, de->d_name, &st, AT_SYMLINK_NOFOLLOW)) {
			err = errno;
			if (err == ENOENT)
				continue; /* removed since readdir saw it */
			rc = -err;
			break;
		}
		rc = cb(ctx, de->d_name, S_ISREG(st.st_mode) ? (uint64_t)st.st_size : 0,
			S_ISREG(st.st_mode));
		if (rc)
			break;
	}
out:
	if (dir)
		closedir(dir);
	return rc;
}
