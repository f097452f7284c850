/* tier.c: blob storage on one tier, a flat directory with a capacity (tier.h).
 *
 * Generic code here owns what every kind shares: name checks, capacity
 * reservations, statistics, temporary names, the no-overwrite rename, links
 * in and out, scans. What differs between kinds (how a temporary is created,
 * how bytes are written and read, what "durable" means before and after the
 * rename) sits behind struct tier_ops, so the "disk" kind (io_uring, O_DIRECT)
 * adds one ops table and no new paths through the generic code. Only "tmpfs"
 * exists now.
 *
 * Every file operation is relative to the directory fd opened at tier_open(),
 * so a path swapped under the daemon later cannot redirect it. This module
 * must never include anything from daemon/, never overwrite an existing name
 * (in the tier or in a caller's directory), never follow a symlink when it
 * opens, links or stats a file, and never leave a temporary behind after a
 * call that failed.
 *
 * Locking: the mutex guards the accounting and the statistics only; file
 * operations run unlocked, so a long copy never blocks another writer.
 */
#include "tier.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "kvtier.h"
#include "log.h"

#define TIER_RANDOM_HEX 16                  /* hex characters in a temporary name */
#define TIER_LINK_TMP_PREFIX ".kvtier-tmp-" /* temporaries tier_link_out makes in dirfd */
#define TIER_DST_NAME_MAX 255               /* NAME_MAX: a name in a caller's directory */
#define TIER_COPY_CHUNK (1u << 20)          /* read/write fallback buffer */
#define TIER_TMP_TRIES 8                    /* fresh names tried on EEXIST */

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
};

struct tier {
	const struct tier_ops *ops;
	char *path;           /* as given to tier_open */
	int dir_fd;           /* O_DIRECTORY fd for every *at() call */
	pthread_mutex_t lock; /* guards the fields below */
	uint64_t capacity;    /* bytes */
	uint64_t used;        /* committed bytes */
	uint64_t reserved;    /* bytes held by open writers */
	uint64_t files;       /* committed files */
	uint64_t read_bytes, write_bytes;
	double read_seconds, write_seconds;
};

struct tier_writer {
	struct tier *t;
	int fd;            /* readable: tier_writer_pread works */
	uint64_t reserved; /* the declared size, reserved on the tier */
	uint64_t written;  /* bytes in the file so far */
	char tmp[sizeof(TIER_TMP_PREFIX) + TIER_RANDOM_HEX]; /* temporary name */
};

struct tier_reader {
	struct tier *t;
	int fd;
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

/* Renames from (in from_dir) to to (in to_dir) unless `to` exists:
 * renameat2(RENAME_NOREPLACE), or link + unlink where the file system lacks
 * it. Returns 0, KVTIER_E_EXISTS or -errno. */
static int tier_rename_noreplace(int from_dir, const char *from, int to_dir, const char *to)
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

/* Kinds by name; "disk" joins here with its own ops. */
static const struct tier_ops *const tier_kinds[] = { &tier_ops_tmpfs };

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

int tier_open(const char *kind, const char *path, uint64_t capacity, struct tier **out)
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
 * kind's create op. */
static int tier_writer_create(struct tier_writer *w)
{
	int rc = -EEXIST;

	for (int i = 0; i < TIER_TMP_TRIES && rc == -EEXIST; i++) {
		rc = tier_random_name(w->tmp, sizeof(w->tmp), TIER_TMP_PREFIX);
		if (rc)
			break;
		rc = w->t->ops->create(w->t, w->tmp, &w->fd);
	}
	if (rc)
		w->tmp[0] = '\0'; /* not ours: never unlink it */
	return rc;
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

/* Tries to bring src_path in by a hard link under w->tmp. Returns 0 when
 * linked (the link is the inode src_fd holds, of the expected size), 1 when a
 * copy is needed instead, or an error. */
static int tier_link_in(struct tier_writer *w, const char *src_path, int src_fd,
			const struct stat *src_st)
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
		rc = 1; /* other file system, protected_hardlinks, or too many links: copy */
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
		rc = 1;
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
	rc = 0;
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

int tier_writer_from_file(struct tier *t, const char *src_path, int force_copy, uint64_t *size,
			  struct tier_writer **out)
{
	struct tier_writer *w = NULL;
	struct stat st;
	int rc, src_fd = -1;
	double t0;

	*out = NULL;
	if (!src_path || !src_path[0])
		return KVTIER_E_INVALID;
	rc = tier_open_source(src_path, &src_fd, &st);
	if (rc)
		goto out;
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

	rc = t->ops->allow_link && !force_copy ? tier_link_in(w, src_path, src_fd, &st) : 1;
	if (rc == 0) {
		/* The tier file is the inode we hold open: it serves pread. */
		w->fd = src_fd;
		src_fd = -1;
		w->written = w->reserved;
		goto out;
	}
	if (rc < 0)
		goto out;

	rc = tier_writer_create(w);
	if (rc)
		goto out;
	t0 = tier_now();
	rc = t->ops->copy_in(w, src_fd, w->reserved);
	if (rc)
		goto out;
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

int tier_writer_write(struct tier_writer *w, const void *buf, size_t len)
{
	double t0;
	int rc;

	if (len == 0)
		return 0;
	if (len > w->reserved - w->written)
		return -EFBIG;
	t0 = tier_now();
	rc = w->t->ops->write(w, buf, len, w->written);
	if (rc)
		return rc;
	tier_count_write(w->t, len, tier_now() - t0);
	w->written += len;
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
	tier_lock(t);
	t->reserved = w->reserved <= t->reserved ? t->reserved - w->reserved : 0;
	t->used += w->written;
	t->files++;
	tier_unlock(t);
	w->reserved = 0; /* now usage: tier_writer_free must not release it */
out:
	tier_writer_free(w);
	return rc;
}

void tier_writer_abort(struct tier_writer *w)
{
	if (w)
		tier_writer_free(w);
}

/* ---- readers and committed files ---- */

int tier_reader_open(struct tier *t, const char *name, struct tier_reader **out,
		     uint64_t *size)
{
	struct tier_reader *r = NULL;
	struct stat st;
	int rc, fd = -1;

	*out = NULL;
	rc = tier_name_valid(name);
	if (rc)
		goto out;
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
	if (size)
		*size = (uint64_t)st.st_size;
	*out = r;
out:
	if (fd >= 0)
		close(fd);
	return rc;
}

ssize_t tier_reader_read(struct tier_reader *r, void *buf, size_t len, uint64_t off)
{
	double t0 = tier_now();
	ssize_t n = r->t->ops->read(r, buf, len, off);

	if (n > 0)
		tier_count_read(r->t, (uint64_t)n, tier_now() - t0);
	return n;
}

void tier_reader_close(struct tier_reader *r)
{
	if (!r)
		return;
	close(r->fd);
	free(r);
}

int tier_stat(struct tier *t, const char *name, uint64_t *size)
{
	struct stat st;
	int rc, err;

	rc = tier_name_valid(name);
	if (rc)
		return rc;
	if (fstatat(t->dir_fd, name, &st, AT_SYMLINK_NOFOLLOW)) {
		err = errno;
		return err == ENOENT ? KVTIER_E_NOTFOUND : -err;
	}
	if (!S_ISREG(st.st_mode))
		return KVTIER_E_INVALID;
	*size = (uint64_t)st.st_size;
	return 0;
}

int tier_remove(struct tier *t, const char *name)
{
	struct stat st;
	int rc, err;

	rc = tier_name_valid(name);
	if (rc)
		return rc;
	if (fstatat(t->dir_fd, name, &st, AT_SYMLINK_NOFOLLOW)) {
		err = errno;
		return err == ENOENT ? KVTIER_E_NOTFOUND : -err;
	}
	if (!S_ISREG(st.st_mode))
		return KVTIER_E_INVALID; /* never a committed file: tier_unlink_raw's business */
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

/* tier_link_out's fallback: copies committed file `name` into dst_dir under
 * a temporary name, then renames it to dst_name without overwriting.
 * TODO(disk kind): this copies the stored bytes as they are; a kind that
 * stores another form (LZ4 frames) must stream through its read op here. */
static int tier_copy_out(struct tier *t, const char *name, int dst_dir, const char *dst_name)
{
	char tmp[sizeof(TIER_LINK_TMP_PREFIX) + TIER_RANDOM_HEX];
	int rc, err, src_fd = -1, dst_fd = -1;
	struct stat st, dst_st;
	double t0;

	tmp[0] = '\0';
	rc = t->ops->reader_open(t, name, &src_fd);
	if (rc) {
		rc = rc == -ENOENT ? KVTIER_E_NOTFOUND : rc == -ELOOP ? KVTIER_E_INVALID : rc;
		goto out;
	}
	if (fstat(src_fd, &st)) {
		rc = -errno;
		goto out;
	}
	if (!S_ISREG(st.st_mode)) {
		rc = KVTIER_E_INVALID;
		goto out;
	}
	/* Refuse early rather than copy gigabytes for nothing; the rename checks again. */
	if (fstatat(dst_dir, dst_name, &dst_st, AT_SYMLINK_NOFOLLOW) == 0) {
		rc = KVTIER_E_EXISTS;
		goto out;
	}
	err = errno;
	if (err != ENOENT) {
		rc = -err;
		goto out;
	}
	rc = tier_create_tmp(dst_dir, TIER_LINK_TMP_PREFIX, O_WRONLY, tmp, sizeof(tmp), &dst_fd);
	if (rc) {
		tmp[0] = '\0';
		goto out;
	}
	t0 = tier_now();
	rc = tier_copy_fd(src_fd, dst_fd, (uint64_t)st.st_size);
	if (rc)
		goto out;
	/* Bytes that left the tier: they count as reads of it. */
	tier_count_read(t, (uint64_t)st.st_size, tier_now() - t0);
	rc = tier_rename_noreplace(dst_dir, tmp, dst_dir, dst_name);
	if (rc == 0)
		tmp[0] = '\0';
out:
	if (dst_fd >= 0)
		close(dst_fd);
	if (tmp[0] && unlinkat(dst_dir, tmp, 0)) {
		err = errno;
		klog(LOG_WARN, "event=tier_tmp_unlink_failed name=%s errno=%d", tmp, err);
	}
	if (src_fd >= 0)
		close(src_fd);
	return rc;
}

int tier_link_out(struct tier *t, const char *name, int dst_dir, const char *dst_name,
		  int *copied)
{
	int rc, err;

	*copied = 0;
	rc = tier_name_valid(name);
	if (rc)
		return rc;
	rc = tier_dst_name_valid(dst_name);
	if (rc)
		return rc;
	if (t->ops->allow_link) {
		/* flags 0: a symlink in the tier would be linked as a symlink, not followed */
		if (linkat(t->dir_fd, name, dst_dir, dst_name, 0) == 0)
			return 0;
		err = errno;
		if (err == EEXIST)
			return KVTIER_E_EXISTS;
		if (err == ENOENT)
			return KVTIER_E_NOTFOUND;
		if (err != EXDEV && err != EPERM && err != EMLINK)
			return -err;
	}
	/* The staged file is a copy; no chmod either way: a link shares the
	 * tier file's inode, and the copy is made with the same mode 0600. */
	rc = tier_copy_out(t, name, dst_dir, dst_name);
	if (rc == 0)
		*copied = 1;
	return rc;
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
