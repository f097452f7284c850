/* test_tier.c: the tmpfs and disk tiers (tiers/tier.c) through their public
 * contract.
 *
 * Every check runs once per configuration in runs[]: tmpfs under /dev/shm (or
 * /tmp when there is none); disk under /tmp (ext4 here) with io_uring, with
 * the TIER_IO_PREAD option, with KVTIER_NO_IO_URING=1 in the environment; and
 * disk on /dev/shm with small, odd-sized requests and a short queue. Each
 * checks bytes, counts and error codes: commit and read back, accounting,
 * capacity, -EFBIG, no-overwrite commits, temporaries never left behind,
 * name checks, adoption (a hard link on tmpfs, a copy on disk; refusal of
 * symlinks and directories), link-out (and its copy across file systems,
 * skipped with a message when both sides share one), scans, removal, latency
 * histograms, sizes around the alignment and the request size, a 48 MiB file
 * written in odd appends and read back sequentially, in odd sizes and at
 * random offsets, tier_probe, the I/O mode chosen, a writer and a reader
 * handed from thread to thread with requests in flight, and two threads
 * writing at once. As root, -ENOSPC on a 1 MiB tmpfs mounted in a private mount
 * namespace (skipped with a message elsewhere).
 */
#include "tier.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <liburing.h>

#include "check.h"
#include "kvtier.h"

#define MIB (1024u * 1024u)

static char base[256];  /* mkdtemp dir under /dev/shm (or /tmp) */
static char xbase[256]; /* mkdtemp dir under /tmp */

/* One configuration the whole suite runs against. */
struct run {
	const char *name; /* directory names and messages */
	const char *kind;
	int on_tmp;       /* tier under xbase (/tmp), else under base */
	int pass_opt;     /* pass &opt to tier_open (else NULL) */
	int no_uring_env; /* KVTIER_NO_IO_URING=1 around tier_open */
	struct tier_options opt;
};

static const struct run runs[] = {
	{ .name = "tmpfs", .kind = "tmpfs" },
	{ .name = "disk", .kind = "disk", .on_tmp = 1 },
	{ .name = "disk-pread",
	  .kind = "disk",
	  .on_tmp = 1,
	  .pass_opt = 1,
	  .opt = { .io_mode = TIER_IO_PREAD } },
	{ .name = "disk-env", .kind = "disk", .on_tmp = 1, .no_uring_env = 1 },
	{ .name = "disk-small",
	  .kind = "disk",
	  .pass_opt = 1,
	  .opt = { .queue_depth = 3, .request_bytes = 65536 + 4096 } },
};

static const struct run *cur; /* the run in progress */
static char home[400];        /* a directory of the run on the tier's file system */
static char other[400];       /* a directory of the run on another one, or "" */

/* Opens a tier of the current run's kind and options. */
static int run_open(const char *path, uint64_t capacity, struct tier **t)
{
	int rc;

	if (cur->no_uring_env)
		CHECK_EQ_INT(setenv("KVTIER_NO_IO_URING", "1", 1), 0);
	rc = tier_open(cur->kind, path, capacity, cur->pass_opt ? &cur->opt : NULL, t);
	if (cur->no_uring_env)
		CHECK_EQ_INT(unsetenv("KVTIER_NO_IO_URING"), 0);
	return rc;
}

/* Files are hard-linked in and out (tmpfs), not copied (disk). */
static int linkable(void)
{
	return strcmp(cur->kind, "tmpfs") == 0;
}

/* The request size the run's disk tier uses (before rounding to the
 * alignment, which these sizes already are). */
static size_t run_request_bytes(void)
{
	return cur->opt.request_bytes ? cur->opt.request_bytes : MIB;
}

/* Byte i of pattern `seed`: cheap, position-dependent, different per seed. */
static unsigned char pat(unsigned seed, uint64_t i)
{
	return (unsigned char)((i * 131u + seed * 7919u + (i >> 8)) & 0xff);
}

/* noinline: inlined into put_file's loop, gcc 12 -O3 reports a false
 * stringop-overflow (n <= chunk there). */
__attribute__((noinline)) static void fill(unsigned char *buf, size_t len, unsigned seed,
					   uint64_t off)
{
	for (size_t i = 0; i < len; i++)
		buf[i] = pat(seed, off + i);
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
	(void)st;
	(void)ftw;
	if (flag == FTW_DP)
		rmdir(path);
	else
		unlink(path);
	return 0;
}

static void rm_rf(const char *path)
{
	if (path[0])
		nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static pid_t main_pid; /* a forked child's exit must not clean up */

static void cleanup(void)
{
	if (getpid() != main_pid)
		return;
	rm_rf(base);
	rm_rf(xbase);
}

/* Writes a file of `size` bytes of pattern `seed` through a writer, in
 * chunks of `chunk`, and commits it as `name`. */
static void put_file(struct tier *t, const char *name, size_t size, unsigned seed, size_t chunk)
{
	struct tier_writer *w = NULL;
	unsigned char *buf = malloc(chunk ? chunk : 1);
	uint64_t off = 0;

	CHECK(buf);
	CHECK_EQ_INT(tier_writer_open(t, size, &w), 0);
	CHECK(w);
	while (off < size) {
		size_t n = size - off < chunk ? size - off : chunk;
		fill(buf, n, seed, off);
		CHECK_EQ_INT(tier_writer_write(w, buf, n), 0);
		off += n;
		CHECK_EQ_INT(tier_writer_size(w), off);
	}
	CHECK_EQ_INT(tier_writer_commit(w, name), 0);
	free(buf);
}

/* Reads [off, off+len) of committed `name` and compares with the pattern;
 * expects exactly `expect` bytes (short only at the end). */
static void check_read(struct tier *t, const char *name, unsigned seed, uint64_t off, size_t len,
		       ssize_t expect)
{
	struct tier_reader *r = NULL;
	unsigned char *buf = malloc(len + 1), *want = malloc(len + 1);
	uint64_t size = 0;
	ssize_t n;

	CHECK(buf && want);
	CHECK_EQ_INT(tier_reader_open(t, name, &r, &size), 0);
	n = tier_reader_read(r, buf, len, off);
	CHECK_EQ_INT(n, expect);
	fill(want, (size_t)expect, seed, off);
	CHECK(memcmp(buf, want, (size_t)expect) == 0);
	tier_reader_close(r);
	free(buf);
	free(want);
}

/* Compares the whole file at dir_fd/name with pattern `seed` of `size` bytes. */
static void check_file_at(int dir_fd, const char *name, unsigned seed, size_t size)
{
	int fd = openat(dir_fd, name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	unsigned char *buf = malloc(size + 16), *want = malloc(size + 1);
	ssize_t n;

	CHECK(fd >= 0);
	CHECK(buf && want);
	n = pread(fd, buf, size + 16, 0);
	CHECK_EQ_INT(n, size);
	fill(want, size, seed, 0);
	CHECK(memcmp(buf, want, size) == 0);
	close(fd);
	free(buf);
	free(want);
}

static void write_plain_file(const char *path, size_t size, unsigned seed)
{
	unsigned char *buf = malloc(size + 1);
	int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);

	CHECK(buf);
	CHECK(fd >= 0);
	fill(buf, size, seed, 0);
	CHECK_EQ_INT(write(fd, buf, size), size);
	close(fd);
	free(buf);
}

/* ---- scan helpers ---- */

struct scan_seen {
	int n, tmps, regular;
	char names[256][TIER_NAME_MAX + 1];
	uint64_t sizes[256];
};

static int scan_collect(void *ctx, const char *name, uint64_t size, int is_regular)
{
	struct scan_seen *s = ctx;

	if (strncmp(name, TIER_TMP_PREFIX, strlen(TIER_TMP_PREFIX)) == 0)
		s->tmps++;
	if (is_regular)
		s->regular++;
	if (s->n < 256) {
		snprintf(s->names[s->n], sizeof(s->names[0]), "%s", name);
		s->sizes[s->n] = size;
	}
	s->n++;
	return 0;
}

static void scan(struct tier *t, struct scan_seen *s)
{
	memset(s, 0, sizeof(*s));
	CHECK_EQ_INT(tier_scan(t, scan_collect, s), 0);
}

/* Size of `name` in a scan, or -1 when absent. */
static long long scan_size(const struct scan_seen *s, const char *name)
{
	for (int i = 0; i < s->n && i < 256; i++)
		if (strcmp(s->names[i], name) == 0)
			return (long long)s->sizes[i];
	return -1;
}

static int scan_stop(void *ctx, const char *name, uint64_t size, int is_regular)
{
	int *calls = ctx;

	(*calls)++;
	return 42;
}

static void no_temporaries(struct tier *t)
{
	struct scan_seen s;

	scan(t, &s);
	CHECK_EQ_INT(s.tmps, 0);
}

static int dir_has_prefix(const char *path, const char *prefix)
{
	DIR *d = opendir(path);
	struct dirent *de;
	int n = 0;

	CHECK(d);
	while ((de = readdir(d)))
		if (strncmp(de->d_name, prefix, strlen(prefix)) == 0)
			n++;
	closedir(d);
	return n;
}

static void get_stats(struct tier *t, struct tier_stats *st)
{
	memset(st, 0xa5, sizeof(*st));
	tier_get_stats(t, st);
}

static uint64_t hist_sum(const uint64_t *hist)
{
	uint64_t n = 0;

	for (int i = 0; i <= TIER_HIST_BUCKETS; i++)
		n += hist[i];
	return n;
}

/* ---- tests ---- */

static void test_open(void)
{
	char p[512];
	struct tier *t = (struct tier *)1;

	struct tier_options bad_mode = { .io_mode = 2 }, bad_depth = { .queue_depth = 257 },
			    bad_req = { .request_bytes = 64 * MIB + 1 },
			    max = { .queue_depth = 256, .request_bytes = 64 * MIB };

	CHECK_EQ_INT(tier_open("bogus", home, MIB, NULL, &t), KVTIER_E_INVALID);
	CHECK(t == NULL);
	CHECK_EQ_INT(tier_open(NULL, home, MIB, NULL, &t), KVTIER_E_INVALID);
	CHECK_EQ_INT(tier_open(cur->kind, "", MIB, NULL, &t), KVTIER_E_INVALID);
	CHECK_EQ_INT(tier_open(cur->kind, home, MIB, NULL, NULL), KVTIER_E_INVALID);
	/* Options out of range. */
	snprintf(p, sizeof(p), "%s/opts", home);
	CHECK_EQ_INT(tier_open(cur->kind, p, MIB, &bad_mode, &t), KVTIER_E_INVALID);
	CHECK(t == NULL);
	CHECK_EQ_INT(tier_open(cur->kind, p, MIB, &bad_depth, &t), KVTIER_E_INVALID);
	CHECK_EQ_INT(tier_open(cur->kind, p, MIB, &bad_req, &t), KVTIER_E_INVALID);
	CHECK_EQ_INT(tier_open(cur->kind, p, MIB, &max, &t), 0);
	tier_close(t);
	t = NULL;
	/* A path that exists and is not a directory. */
	snprintf(p, sizeof(p), "%s/plain", home);
	write_plain_file(p, 10, 1);
	CHECK(run_open(p, MIB, &t) < 0);
	CHECK(t == NULL);
	/* mkdir -p with mode 0700. */
	snprintf(p, sizeof(p), "%s/deep/er/tier", home);
	CHECK_EQ_INT(run_open(p, MIB, &t), 0);
	{
		struct stat st;
		CHECK_EQ_INT(stat(p, &st), 0);
		CHECK(S_ISDIR(st.st_mode));
		CHECK_EQ_INT(st.st_mode & 0777, 0700);
		CHECK(strcmp(tier_kind(t), cur->kind) == 0);
		CHECK(strcmp(tier_path(t), p) == 0);
	}
	/* The I/O probe leaves nothing behind. */
	CHECK_EQ_INT(dir_has_prefix(p, ".tmp-"), 0);
	tier_close(t);
	/* A directory anyone may write into is refused. */
	snprintf(p, sizeof(p), "%s/open", home);
	CHECK_EQ_INT(mkdir(p, 0700), 0);
	CHECK_EQ_INT(chmod(p, 0777), 0);
	t = NULL;
	CHECK_EQ_INT(run_open(p, MIB, &t), -EPERM);
	CHECK(t == NULL);
}

/* 1 when this process can set up an io_uring and open a file in dir with
 * O_DIRECT: a disk tier there must then take io_uring+O_DIRECT, unless the
 * run forbids it (a kernel or sandbox without io_uring is a fallback, not a
 * failure). */
static int uring_direct_possible(const char *dir)
{
	struct io_uring ring;
	char p[4200];
	int fd, ok;

	if (io_uring_queue_init(4, &ring, 0) < 0)
		return 0;
	io_uring_queue_exit(&ring);
	snprintf(p, sizeof(p), "%s/.probe-direct", dir);
	fd = open(p, O_CREAT | O_RDWR | O_DIRECT | O_CLOEXEC, 0600);
	ok = fd >= 0;
	if (fd >= 0)
		close(fd);
	unlink(p);
	return ok;
}

/* The mode the run asked for, or a reason for the one it got. */
static void test_io_mode(struct tier *t)
{
	const char *desc = tier_io_desc(t), *why = tier_io_fallback_reason(t);

	CHECK(desc && why);
	fprintf(stderr, "note: run %s: io=%s reason=\"%s\"\n", cur->name, desc, why);
	if (strcmp(cur->kind, "tmpfs") == 0) {
		CHECK(strcmp(desc, "memory") == 0);
		CHECK(strcmp(why, "") == 0);
		return;
	}
	CHECK(strcmp(desc, "io_uring+O_DIRECT") == 0 || strcmp(desc, "pread+O_DIRECT") == 0 ||
	      strcmp(desc, "pread") == 0);
	/* Anything but io_uring+O_DIRECT says why. */
	CHECK((strcmp(desc, "io_uring+O_DIRECT") == 0) == (why[0] == '\0'));
	if (cur->no_uring_env) {
		CHECK(strncmp(desc, "io_uring", 8) != 0);
		CHECK(strstr(why, "KVTIER_NO_IO_URING") != NULL);
	}
	if (cur->pass_opt && cur->opt.io_mode == TIER_IO_PREAD) {
		CHECK(strncmp(desc, "io_uring", 8) != 0);
		CHECK(strstr(why, "io_mode=pread") != NULL);
	} else if (!cur->no_uring_env && uring_direct_possible(tier_path(t))) {
		CHECK(strcmp(desc, "io_uring+O_DIRECT") == 0);
	}
}

static const size_t sizes3[3] = { 1000, 65536 + 7, 200003 };
static const char *const names3[3] = { "a.bin", "b.bin", "c.bin" };

static void test_write_read(struct tier *t)
{
	struct tier_stats st;
	uint64_t size = 0;

	put_file(t, names3[0], sizes3[0], 1, 1000);
	put_file(t, names3[1], sizes3[1], 2, 4096);
	put_file(t, names3[2], sizes3[2], 3, 77777);

	for (int i = 0; i < 3; i++) {
		size_t sz = sizes3[i];
		CHECK_EQ_INT(tier_stat(t, names3[i], &size), 0);
		CHECK_EQ_INT(size, sz);
		check_read(t, names3[i], (unsigned)i + 1, 0, sz, (ssize_t)sz);
		check_read(t, names3[i], (unsigned)i + 1, 0, 1, 1);
		check_read(t, names3[i], (unsigned)i + 1, 17, 100, 100);
		check_read(t, names3[i], (unsigned)i + 1, sz / 2, sz / 3, (ssize_t)(sz / 3));
		check_read(t, names3[i], (unsigned)i + 1, sz - 10, 10, 10);
		/* Short only at the end, 0 past it. */
		check_read(t, names3[i], (unsigned)i + 1, sz - 10, 100, 10);
		check_read(t, names3[i], (unsigned)i + 1, sz, 100, 0);
		check_read(t, names3[i], (unsigned)i + 1, sz + 1000, 100, 0);
	}
	CHECK_EQ_INT(tier_stat(t, "missing.bin", &size), KVTIER_E_NOTFOUND);
	{
		struct tier_reader *r = (struct tier_reader *)1;
		CHECK_EQ_INT(tier_reader_open(t, "missing.bin", &r, &size), KVTIER_E_NOTFOUND);
		CHECK(r == NULL);
	}

	get_stats(t, &st);
	CHECK_EQ_INT(st.capacity, MIB);
	CHECK_EQ_INT(st.used, sizes3[0] + sizes3[1] + sizes3[2]);
	CHECK_EQ_INT(st.files, 3);
	CHECK_EQ_INT(st.reserved, 0);
	CHECK_EQ_INT(st.write_bytes, sizes3[0] + sizes3[1] + sizes3[2]);
	CHECK(st.read_bytes > 0);
	CHECK(st.read_seconds >= 0 && st.write_seconds >= 0);
	/* One write observation per commit; one read observation per reader
	 * that returned bytes (6 of the 8 check_reads of each file). */
	CHECK_EQ_INT(st.write_ops, 3);
	CHECK_EQ_INT(st.read_ops, 18);
	CHECK_EQ_INT(hist_sum(st.write_hist), st.write_ops);
	CHECK_EQ_INT(hist_sum(st.read_hist), st.read_ops);
	{
		/* A reader closed without reading is not a file read. */
		struct tier_reader *r = NULL;
		struct tier_stats st2;
		CHECK_EQ_INT(tier_reader_open(t, names3[0], &r, &size), 0);
		tier_reader_close(r);
		tier_reader_close(NULL);
		get_stats(t, &st2);
		CHECK_EQ_INT(st2.read_ops, st.read_ops);
		CHECK_EQ_INT(st2.read_bytes, st.read_bytes);
	}
	for (int i = 1; i < TIER_HIST_BUCKETS; i++)
		CHECK(tier_hist_le[i] > tier_hist_le[i - 1]);
	no_temporaries(t);
}

static void test_full(struct tier *t)
{
	struct tier_writer *w = (struct tier_writer *)1;
	struct tier_stats st, st2;
	uint64_t room;

	get_stats(t, &st);
	room = st.capacity - st.used - st.reserved;
	CHECK_EQ_INT(tier_writer_open(t, room + 1, &w), KVTIER_E_FULL);
	CHECK(w == NULL);
	CHECK_EQ_INT(tier_writer_open(t, UINT64_MAX, &w), KVTIER_E_FULL);
	CHECK_EQ_INT(tier_reserve(t, room + 1), KVTIER_E_FULL);
	get_stats(t, &st2);
	CHECK_EQ_INT(st2.reserved, 0);
	CHECK_EQ_INT(st2.used, st.used);
	no_temporaries(t);

	/* Exactly the room left fits; then nothing more does. */
	CHECK_EQ_INT(tier_reserve(t, room), 0);
	CHECK_EQ_INT(tier_reserve(t, 1), KVTIER_E_FULL);
	CHECK_EQ_INT(tier_writer_open(t, 1, &w), KVTIER_E_FULL);
	tier_unreserve(t, room);
	get_stats(t, &st2);
	CHECK_EQ_INT(st2.reserved, 0);
	CHECK_EQ_INT(tier_writer_open(t, 0, &w), 0); /* an empty file always fits */
	tier_writer_abort(w);
	no_temporaries(t);
}

static void test_efbig_abort(struct tier *t)
{
	struct tier_writer *w = NULL;
	unsigned char buf[16] = { 0 };
	struct tier_stats st;
	struct scan_seen s;

	CHECK_EQ_INT(tier_writer_open(t, 10, &w), 0);
	get_stats(t, &st);
	CHECK_EQ_INT(st.reserved, 10);
	scan(t, &s);
	CHECK_EQ_INT(s.tmps, 1); /* the temporary is visible to a scan (reconcile) */
	CHECK_EQ_INT(tier_writer_write(w, buf, 8), 0);
	CHECK_EQ_INT(tier_writer_write(w, buf, 3), -EFBIG);
	CHECK_EQ_INT(tier_writer_size(w), 8);
	CHECK_EQ_INT(tier_writer_write(w, buf, 2), 0);
	CHECK_EQ_INT(tier_writer_write(w, buf, 1), -EFBIG);
	CHECK_EQ_INT(tier_writer_size(w), 10);
	tier_writer_abort(w);
	tier_writer_abort(NULL);
	get_stats(t, &st);
	CHECK_EQ_INT(st.reserved, 0);
	no_temporaries(t);
}

static void test_commit_exists(struct tier *t)
{
	struct tier_writer *w = NULL;
	struct tier_stats st, st2;
	unsigned char buf[5] = { 9, 9, 9, 9, 9 };

	get_stats(t, &st);
	/* Someone else's reservation, held across both commits: each commit
	 * releases its own reservation exactly once and never another's. */
	CHECK_EQ_INT(tier_reserve(t, 1000), 0);
	CHECK_EQ_INT(tier_writer_open(t, 5, &w), 0);
	CHECK_EQ_INT(tier_writer_write(w, buf, 5), 0);
	CHECK_EQ_INT(tier_writer_commit(w, names3[0]), KVTIER_E_EXISTS);
	get_stats(t, &st2);
	CHECK_EQ_INT(st2.reserved, 1000);
	CHECK_EQ_INT(st2.used, st.used);
	CHECK_EQ_INT(st2.files, st.files);
	no_temporaries(t);
	/* The original is untouched. */
	check_read(t, names3[0], 1, 0, sizes3[0], (ssize_t)sizes3[0]);

	/* A commit may be smaller than its reservation: usage is the real size. */
	CHECK_EQ_INT(tier_writer_open(t, 100, &w), 0);
	CHECK_EQ_INT(tier_writer_write(w, buf, 5), 0);
	CHECK_EQ_INT(tier_writer_commit(w, "short.bin"), 0);
	get_stats(t, &st2);
	CHECK_EQ_INT(st2.reserved, 1000);
	tier_unreserve(t, 1000);
	get_stats(t, &st2);
	CHECK_EQ_INT(st2.reserved, 0);
	CHECK_EQ_INT(st2.used, st.used + 5);
	CHECK_EQ_INT(st2.files, st.files + 1);
	CHECK_EQ_INT(tier_remove(t, "short.bin"), 0);
	get_stats(t, &st2);
	CHECK_EQ_INT(st2.used, st.used);
	CHECK_EQ_INT(st2.files, st.files);
}

static void test_names(struct tier *t)
{
	char longname[TIER_NAME_MAX + 2];
	const char *bad[] = { "", "x/y", "/abs", ".hidden", ".tmp-0123456789abcdef", "..", "a\nb",
			      "tab\there", "del\x7f", longname };
	struct tier_writer *w = NULL;
	struct tier_reader *r = NULL;
	struct tier_stats st, st2;
	uint64_t size;

	memset(longname, 'n', TIER_NAME_MAX + 1);
	longname[TIER_NAME_MAX + 1] = '\0';
	get_stats(t, &st);
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		CHECK_EQ_INT(tier_writer_open(t, 3, &w), 0);
		CHECK_EQ_INT(tier_writer_write(w, "abc", 3), 0);
		CHECK_EQ_INT(tier_writer_commit(w, bad[i]), KVTIER_E_INVALID);
		CHECK_EQ_INT(tier_reader_open(t, bad[i], &r, &size), KVTIER_E_INVALID);
		CHECK_EQ_INT(tier_stat(t, bad[i], &size), KVTIER_E_INVALID);
		CHECK_EQ_INT(tier_remove(t, bad[i]), KVTIER_E_INVALID);
		CHECK_EQ_INT(tier_link_out(t, bad[i], AT_FDCWD, "x"), KVTIER_E_INVALID);
	}
	get_stats(t, &st2);
	CHECK_EQ_INT(st2.reserved, 0);
	CHECK_EQ_INT(st2.used, st.used);
	no_temporaries(t);

	/* TIER_NAME_MAX bytes is fine. */
	longname[TIER_NAME_MAX] = '\0';
	CHECK_EQ_INT(tier_writer_open(t, 3, &w), 0);
	CHECK_EQ_INT(tier_writer_write(w, "abc", 3), 0);
	CHECK_EQ_INT(tier_writer_commit(w, longname), 0);
	CHECK_EQ_INT(tier_stat(t, longname, &size), 0);
	CHECK_EQ_INT(size, 3);
	CHECK_EQ_INT(tier_remove(t, longname), 0);
	CHECK_EQ_INT(tier_remove(t, longname), KVTIER_E_NOTFOUND);
	get_stats(t, &st2);
	CHECK_EQ_INT(st2.used, st.used);
	CHECK_EQ_INT(st2.files, st.files);
}

static void test_writer_pread(struct tier *t)
{
	struct tier_writer *w = NULL;
	unsigned char buf[1000], got[300];

	fill(buf, sizeof(buf), 5, 0);
	CHECK_EQ_INT(tier_writer_open(t, 2000, &w), 0);
	CHECK_EQ_INT(tier_writer_write(w, buf, 600), 0);
	CHECK_EQ_INT(tier_writer_pread(w, got, 50, 100), 0);
	CHECK(memcmp(got, buf + 100, 50) == 0);
	CHECK_EQ_INT(tier_writer_write(w, buf + 600, 400), 0);
	CHECK_EQ_INT(tier_writer_pread(w, got, 300, 700), 0);
	CHECK(memcmp(got, buf + 700, 300) == 0);
	CHECK_EQ_INT(tier_writer_pread(w, got, 0, 1000), 0);
	/* Past what was written (though inside the reservation). */
	CHECK_EQ_INT(tier_writer_pread(w, got, 1, 1000), -ENODATA);
	CHECK_EQ_INT(tier_writer_pread(w, got, 10, 995), -ENODATA);
	CHECK_EQ_INT(tier_writer_pread(w, got, 10, UINT64_MAX), -ENODATA);
	CHECK_EQ_INT(tier_writer_commit(w, "pread.bin"), 0);
	check_read(t, "pread.bin", 5, 0, 1000, 1000);
}

/* tier_writer_from_file with only force_copy set. */
static int from_file(struct tier *t, const char *path, int force_copy, uint64_t *size,
		     struct tier_writer **w)
{
	struct tier_take take;

	memset(&take, 0, sizeof(take));
	take.force_copy = force_copy;
	return tier_writer_from_file(t, path, &take, size, w);
}

static void test_from_file(struct tier *t)
{
	char dir[512], src[600], p[600];
	struct tier_writer *w = (struct tier_writer *)1;
	struct tier_stats st, st2;
	struct stat a, b;
	unsigned char got[100], want[100];
	uint64_t size = 0;
	int tfd;

	snprintf(dir, sizeof(dir), "%s/slots", home);
	CHECK_EQ_INT(mkdir(dir, 0700), 0);
	snprintf(src, sizeof(src), "%s/src.bin", dir);
	write_plain_file(src, 3000, 7);
	get_stats(t, &st);

	/* Same file system: a hard link (tmpfs), a copy (disk: never linked). */
	CHECK_EQ_INT(from_file(t, src, 0, &size, &w), 0);
	CHECK_EQ_INT(size, 3000);
	CHECK_EQ_INT(tier_writer_size(w), 3000);
	get_stats(t, &st2);
	CHECK_EQ_INT(st2.reserved, st.reserved + 3000);
	CHECK_EQ_INT(tier_writer_pread(w, got, 100, 2900), 0);
	fill(want, 100, 7, 2900);
	CHECK(memcmp(got, want, 100) == 0);
	CHECK_EQ_INT(tier_writer_write(w, "x", 1), -EFBIG);
	CHECK_EQ_INT(tier_writer_commit(w, "adopted.bin"), 0);
	CHECK_EQ_INT(stat(src, &a), 0);
	CHECK_EQ_INT(a.st_nlink, linkable() ? 2 : 1);
	tfd = open(tier_path(t), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	CHECK(tfd >= 0);
	CHECK_EQ_INT(fstatat(tfd, "adopted.bin", &b, AT_SYMLINK_NOFOLLOW), 0);
	CHECK((a.st_dev == b.st_dev && a.st_ino == b.st_ino) == linkable());
	CHECK_EQ_INT(b.st_mode & 0777, 0440); /* committed read-only */
	check_file_at(tfd, "adopted.bin", 7, 3000);
	get_stats(t, &st2);
	CHECK_EQ_INT(st2.used, st.used + 3000);
	CHECK_EQ_INT(st2.files, st.files + 1);
	CHECK_EQ_INT(st2.reserved, 0);

	/* force_copy: same file system, but a copy with its own inode. */
	CHECK_EQ_INT(from_file(t, src, 1, &size, &w), 0);
	CHECK_EQ_INT(tier_writer_commit(w, "copied.bin"), 0);
	CHECK_EQ_INT(stat(src, &a), 0);
	CHECK_EQ_INT(a.st_nlink, linkable() ? 2 : 1); /* src (+ adopted.bin) only */
	CHECK_EQ_INT(fstatat(tfd, "copied.bin", &b, AT_SYMLINK_NOFOLLOW), 0);
	CHECK(a.st_ino != b.st_ino);
	check_file_at(tfd, "copied.bin", 7, 3000);
	CHECK_EQ_INT(tier_remove(t, "copied.bin"), 0);

	/* A symlink to a regular file is refused, never followed. */
	snprintf(p, sizeof(p), "%s/link.bin", dir);
	CHECK_EQ_INT(symlink(src, p), 0);
	w = (struct tier_writer *)1;
	CHECK_EQ_INT(from_file(t, p, 0, &size, &w), KVTIER_E_INVALID);
	CHECK(w == NULL);
	/* A directory is refused. */
	CHECK_EQ_INT(from_file(t, dir, 0, &size, &w), KVTIER_E_INVALID);
	/* A FIFO is refused (and the call does not hang). */
	snprintf(p, sizeof(p), "%s/fifo", dir);
	CHECK_EQ_INT(mkfifo(p, 0600), 0);
	CHECK_EQ_INT(from_file(t, p, 0, &size, &w), KVTIER_E_INVALID);
	/* A missing file. */
	snprintf(p, sizeof(p), "%s/missing.bin", dir);
	CHECK_EQ_INT(from_file(t, p, 0, &size, &w), -ENOENT);
	/* Too big for the room left: nothing reserved, nothing left behind. */
	snprintf(p, sizeof(p), "%s/huge.bin", dir);
	{
		int fd = open(p, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
		CHECK(fd >= 0);
		CHECK_EQ_INT(ftruncate(fd, 2 * MIB), 0);
		close(fd);
	}
	CHECK_EQ_INT(from_file(t, p, 0, &size, &w), KVTIER_E_FULL);
	CHECK(w == NULL);
	get_stats(t, &st2);
	CHECK_EQ_INT(st2.reserved, 0);
	CHECK_EQ_INT(st2.used, st.used + 3000);
	no_temporaries(t);

	/* Another file system: a copy (the source keeps one link). */
	if (other[0]) {
		struct stat xs, ts;
		CHECK_EQ_INT(stat(other, &xs), 0);
		CHECK_EQ_INT(fstat(tfd, &ts), 0);
		if (xs.st_dev != ts.st_dev) {
			struct stat c;
			snprintf(p, sizeof(p), "%s/xsrc.bin", other);
			write_plain_file(p, 5001, 8);
			CHECK_EQ_INT(from_file(t, p, 0, &size, &w), 0);
			CHECK_EQ_INT(size, 5001);
			CHECK_EQ_INT(tier_writer_pread(w, got, 100, 4901), 0);
			fill(want, 100, 8, 4901);
			CHECK(memcmp(got, want, 100) == 0);
			CHECK_EQ_INT(tier_writer_commit(w, "xadopted.bin"), 0);
			CHECK_EQ_INT(stat(p, &c), 0);
			CHECK_EQ_INT(c.st_nlink, 1);
			check_file_at(tfd, "xadopted.bin", 8, 5001);
			CHECK_EQ_INT(tier_remove(t, "xadopted.bin"), 0);
		} else {
			fprintf(stderr,
				"note: %s and the tier share a file system; the copy "
				"path of tier_writer_from_file is not exercised\n",
				other);
		}
	}
	close(tfd);
	get_stats(t, &st2);
	CHECK_EQ_INT(st2.used, st.used + 3000);
	CHECK_EQ_INT(st2.files, st.files + 1);
	no_temporaries(t);
}

/* tier_writer_from_file's rules: a file with another name or owner is
 * refused when take.sole asks; one open for writing is copied, not linked;
 * and tier_file_id sees a write. */
static void test_from_file_rules(struct tier *t)
{
	char dir[512], src[600], other_name[600];
	struct tier_writer *w = NULL;
	struct tier_take take;
	struct tier_file_id a, b;
	struct stat s1, s2;
	uint64_t size = 0;
	int fd, tfd;

	snprintf(dir, sizeof(dir), "%s/rules", home);
	CHECK_EQ_INT(mkdir(dir, 0700), 0);
	snprintf(src, sizeof(src), "%s/src.bin", dir);
	snprintf(other_name, sizeof(other_name), "%s/src-keep.bin", dir);
	write_plain_file(src, 4000, 9);
	CHECK_EQ_INT(chmod(src, 0644), 0);

	/* Two names: refused, nothing changed. */
	CHECK_EQ_INT(link(src, other_name), 0);
	memset(&take, 0, sizeof(take));
	take.sole = 1;
	take.owner = geteuid();
	CHECK_EQ_INT(tier_writer_from_file(t, src, &take, &size, &w), KVTIER_E_DENIED);
	CHECK(w == NULL);
	CHECK_EQ_INT(take.nlink, 2);
	CHECK_EQ_INT(stat(src, &s1), 0);
	CHECK_EQ_INT(s1.st_mode & 0777, 0644);
	CHECK_EQ_INT(unlink(other_name), 0);
	/* Another owner: refused. */
	take.owner = geteuid() + 1;
	CHECK_EQ_INT(tier_writer_from_file(t, src, &take, &size, &w), KVTIER_E_DENIED);
	CHECK_EQ_INT(take.uid, geteuid());

	/* Open for writing (here by this process): a copy, the source untouched. */
	fd = open(src, O_RDWR | O_CLOEXEC);
	CHECK(fd >= 0);
	take.owner = geteuid();
	CHECK_EQ_INT(tier_writer_from_file(t, src, &take, &size, &w), 0);
	CHECK_EQ_INT(take.linked, 0);
	if (linkable())
		CHECK(take.copy_reason && strstr(take.copy_reason, "open for writing"));
	CHECK_EQ_INT(tier_writer_commit(w, "rules.bin"), 0);
	close(fd);
	CHECK_EQ_INT(stat(src, &s1), 0);
	CHECK_EQ_INT(s1.st_nlink, 1);
	CHECK_EQ_INT(s1.st_mode & 0777, 0644);
	tfd = open(tier_path(t), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	CHECK(tfd >= 0);
	CHECK_EQ_INT(fstatat(tfd, "rules.bin", &s2, AT_SYMLINK_NOFOLLOW), 0);
	CHECK(s2.st_ino != s1.st_ino);
	check_file_at(tfd, "rules.bin", 9, 4000);

	/* Nothing else holds it: linked, and made the tier's (read-only). */
	CHECK_EQ_INT(tier_writer_from_file(t, src, &take, &size, &w), 0);
	CHECK_EQ_INT(take.linked, linkable());
	CHECK_EQ_INT(tier_writer_commit(w, "rules2.bin"), 0);
	CHECK_EQ_INT(stat(src, &s1), 0);
	CHECK_EQ_INT(s1.st_mode & 0777, linkable() ? 0440 : 0644);

	/* tier_file_id: settled after a tick, and a write changes it. */
	CHECK_EQ_INT(tier_file_id(t, "rules.bin", &a), 0);
	for (int i = 0; i < 200 && !a.settled; i++) {
		usleep(1000);
		CHECK_EQ_INT(tier_file_id(t, "rules.bin", &a), 0);
	}
	CHECK(a.settled);
	CHECK_EQ_INT(a.size, 4000);
	CHECK_EQ_INT(tier_file_id(t, "rules.bin", &b), 0);
	CHECK(tier_file_id_equal(&a, &b));
	CHECK_EQ_INT(fchmodat(tfd, "rules.bin", 0640, 0), 0); /* its owner can */
	CHECK_EQ_INT(tier_file_id(t, "rules.bin", &b), 0);
	CHECK(tier_file_id_equal(&a, &b)); /* a chmod is not a write */
	fd = openat(tfd, "rules.bin", O_WRONLY | O_CLOEXEC);
	CHECK(fd >= 0);
	CHECK_EQ_INT(pwrite(fd, "x", 1, 100), 1);
	close(fd);
	CHECK_EQ_INT(tier_file_id(t, "rules.bin", &b), 0);
	CHECK(!tier_file_id_equal(&a, &b));
	CHECK_EQ_INT(tier_file_id(t, "missing.bin", &b), KVTIER_E_NOTFOUND);
	close(tfd);
	CHECK_EQ_INT(tier_remove(t, "rules.bin"), 0);
	CHECK_EQ_INT(tier_remove(t, "rules2.bin"), 0);
	no_temporaries(t);
}

static void test_link_out(struct tier *t)
{
	char dir[512];
	struct tier_stats st, st2;
	struct stat a, b;
	int dfd, tfd, rc;

	snprintf(dir, sizeof(dir), "%s/stage", home);
	CHECK_EQ_INT(mkdir(dir, 0700), 0);
	dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	CHECK(dfd >= 0);
	tfd = open(tier_path(t), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	CHECK(tfd >= 0);

	put_file(t, "out.bin", 12345, 11, 1000);
	get_stats(t, &st);
	rc = tier_link_out(t, "out.bin", dfd, "kvtier-out.bin");
	/* Names are checked first, on every kind. */
	CHECK_EQ_INT(tier_link_out(t, "out.bin", dfd, "a:b.bin"), KVTIER_E_INVALID);
	CHECK_EQ_INT(tier_link_out(t, "out.bin", dfd, "x/y.bin"), KVTIER_E_INVALID);
	CHECK_EQ_INT(tier_link_out(t, "out.bin", dfd, ".hidden"), KVTIER_E_INVALID);
	CHECK_EQ_INT(tier_link_out(t, "out.bin", dfd, ""), KVTIER_E_INVALID);
	/* A link reads nothing; a refusal neither. */
	get_stats(t, &st2);
	CHECK_EQ_INT(st2.read_ops, st.read_ops);
	CHECK_EQ_INT(st2.read_bytes, st.read_bytes);
	CHECK_EQ_INT(dir_has_prefix(dir, ".kvtier-tmp-"), 0);
	if (!linkable()) {
		/* A disk tier is never linked out: the caller copies. */
		CHECK_EQ_INT(rc, -EXDEV);
		CHECK(fstatat(dfd, "kvtier-out.bin", &a, AT_SYMLINK_NOFOLLOW) != 0 && errno == ENOENT);
		CHECK_EQ_INT(fstatat(tfd, "out.bin", &b, AT_SYMLINK_NOFOLLOW), 0);
		CHECK_EQ_INT(b.st_nlink, 1);
		CHECK_EQ_INT(tier_remove(t, "out.bin"), 0);
		close(tfd);
		close(dfd);
		return;
	}
	CHECK_EQ_INT(rc, 0);
	CHECK_EQ_INT(fstatat(dfd, "kvtier-out.bin", &a, AT_SYMLINK_NOFOLLOW), 0);
	CHECK_EQ_INT(fstatat(tfd, "out.bin", &b, AT_SYMLINK_NOFOLLOW), 0);
	CHECK(a.st_dev == b.st_dev && a.st_ino == b.st_ino);
	CHECK_EQ_INT(b.st_nlink, 2);

	/* Never overwrites. */
	CHECK_EQ_INT(tier_link_out(t, "b.bin", dfd, "kvtier-out.bin"), KVTIER_E_EXISTS);
	CHECK_EQ_INT(tier_link_out(t, "missing.bin", dfd, "kvtier-new.bin"), KVTIER_E_NOTFOUND);
	check_file_at(dfd, "kvtier-out.bin", 11, 12345);

	/* The staged link outlives the tier file. */
	get_stats(t, &st);
	CHECK_EQ_INT(tier_remove(t, "out.bin"), 0);
	get_stats(t, &st2);
	CHECK_EQ_INT(st2.used, st.used - 12345);
	CHECK_EQ_INT(st2.files, st.files - 1);
	CHECK_EQ_INT(tier_remove(t, "out.bin"), KVTIER_E_NOTFOUND);
	check_file_at(dfd, "kvtier-out.bin", 11, 12345);
	CHECK_EQ_INT(fstatat(dfd, "kvtier-out.bin", &a, AT_SYMLINK_NOFOLLOW), 0);
	CHECK_EQ_INT(a.st_nlink, 1);
	close(tfd);
	close(dfd);
}

static void test_link_out_cross_fs(struct tier *t)
{
	struct stat xs, ts, a;
	struct tier_stats st, st2;
	int xfd;

	if (!other[0]) {
		fprintf(stderr, "SKIP part: no other directory for the cross-file-system link\n");
		return;
	}
	CHECK_EQ_INT(stat(other, &xs), 0);
	CHECK_EQ_INT(stat(tier_path(t), &ts), 0);
	if (xs.st_dev == ts.st_dev) {
		fprintf(stderr,
			"SKIP part: %s and %s are on the same file system; the cross-file-system "
			"refusal of tier_link_out is not exercised\n",
			other, tier_path(t));
		return;
	}
	xfd = open(other, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	CHECK(xfd >= 0);
	get_stats(t, &st);
	/* Another file system: no link, nothing written there, nothing read. */
	CHECK_EQ_INT(tier_link_out(t, names3[2], xfd, "kvtier-c.bin"), -EXDEV);
	CHECK(fstatat(xfd, "kvtier-c.bin", &a, AT_SYMLINK_NOFOLLOW) != 0 && errno == ENOENT);
	CHECK_EQ_INT(dir_has_prefix(other, ".kvtier-tmp-"), 0);
	get_stats(t, &st2);
	CHECK_EQ_INT(st2.read_bytes, st.read_bytes);
	CHECK_EQ_INT(st2.used, st.used);
	close(xfd);
}

static void test_scan(struct tier *t)
{
	struct scan_seen s;
	struct tier_stats st;
	char p[512];
	int calls = 0;

	scan(t, &s);
	CHECK_EQ_INT(s.tmps, 0);
	for (int i = 0; i < 3; i++)
		CHECK_EQ_INT(scan_size(&s, names3[i]), sizes3[i]);
	CHECK_EQ_INT(scan_size(&s, "adopted.bin"), 3000);
	CHECK_EQ_INT(scan_size(&s, "pread.bin"), 1000);
	CHECK_EQ_INT(scan_size(&s, "out.bin"), -1);
	CHECK_EQ_INT(scan_size(&s, "."), -1);
	CHECK_EQ_INT(scan_size(&s, ".."), -1);
	get_stats(t, &st);
	CHECK_EQ_INT(s.n, st.files);
	CHECK_EQ_INT(s.regular, st.files);
	{
		uint64_t sum = 0;
		for (int i = 0; i < s.n; i++)
			sum += s.sizes[i];
		CHECK_EQ_INT(sum, st.used);
	}

	/* A stray non-file entry shows up as not regular; raw unlink removes an orphan. */
	snprintf(p, sizeof(p), "%s/stray", tier_path(t));
	CHECK_EQ_INT(symlink("/etc/passwd", p), 0);
	scan(t, &s);
	CHECK_EQ_INT(s.n, st.files + 1);
	CHECK_EQ_INT(s.regular, st.files);
	{
		struct tier_reader *r = NULL;
		uint64_t size;
		CHECK_EQ_INT(tier_reader_open(t, "stray", &r, &size), KVTIER_E_INVALID);
		CHECK_EQ_INT(tier_remove(t, "stray"), KVTIER_E_INVALID);
	}
	CHECK_EQ_INT(tier_unlink_raw(t, "stray"), 0);
	CHECK_EQ_INT(tier_unlink_raw(t, "stray"), -ENOENT);
	CHECK_EQ_INT(tier_unlink_raw(t, "../x"), KVTIER_E_INVALID);
	scan(t, &s);
	CHECK_EQ_INT(s.n, st.files);

	/* A non-zero return stops the scan and is returned. */
	CHECK_EQ_INT(tier_scan(t, scan_stop, &calls), 42);
	CHECK_EQ_INT(calls, 1);
}

static void test_remove_account(struct tier *t)
{
	struct tier_stats st, st2;

	get_stats(t, &st);
	CHECK_EQ_INT(tier_remove(t, names3[1]), 0);
	get_stats(t, &st2);
	CHECK_EQ_INT(st2.used, st.used - sizes3[1]);
	CHECK_EQ_INT(st2.files, st.files - 1);
	CHECK_EQ_INT(tier_remove(t, names3[1]), KVTIER_E_NOTFOUND);
	/* tier_account: reconcile adds and removes usage. */
	tier_account(t, 1000, 2);
	get_stats(t, &st2);
	CHECK_EQ_INT(st2.used, st.used - sizes3[1] + 1000);
	CHECK_EQ_INT(st2.files, st.files + 1);
	tier_account(t, -1000, -2);
	get_stats(t, &st2);
	CHECK_EQ_INT(st2.used, st.used - sizes3[1]);
	CHECK_EQ_INT(st2.files, st.files - 1);
}

/* ---- sizes, large files, random offsets ---- */

/* Writes `size` bytes of pattern `seed` in appends cycling through
 * chunks[] (0-terminated), reading the header back with tier_writer_pread
 * as the store does once 12 bytes are in, and a few ranges later on. */
static void put_file_chunks(struct tier *t, const char *name, size_t size, unsigned seed,
			    const size_t *chunks, const unsigned char *want)
{
	struct tier_writer *w = NULL;
	unsigned char *buf, got[4096 + 64];
	size_t max = 0, off = 0, k = 0, checks = 0;

	for (size_t i = 0; chunks[i]; i++)
		if (chunks[i] > max)
			max = chunks[i];
	buf = malloc(max);
	CHECK(buf);
	CHECK_EQ_INT(tier_writer_open(t, size, &w), 0);
	while (off < size) {
		size_t n = chunks[k] < size - off ? chunks[k] : size - off;
		size_t before = off;

		k = chunks[k + 1] ? k + 1 : 0;
		fill(buf, n, seed, off);
		CHECK_EQ_INT(tier_writer_write(w, buf, n), 0);
		off += n;
		CHECK_EQ_INT(tier_writer_size(w), off);
		if (before < 12 && off >= 12) {
			CHECK_EQ_INT(tier_writer_pread(w, got, 12, 0), 0);
			CHECK(memcmp(got, want, 12) == 0);
		}
		/* Now and then: the last bytes written (still buffered), a range
		 * around the middle (on disk by now), and one past the end. */
		if (++checks % 7 == 3) {
			size_t l = off < sizeof(got) ? off : sizeof(got);
			CHECK_EQ_INT(tier_writer_pread(w, got, l, off - l), 0);
			CHECK(memcmp(got, want + off - l, l) == 0);
			l = off / 2 < 4097 ? off / 2 : 4097;
			CHECK_EQ_INT(tier_writer_pread(w, got, l, off / 2 - l / 2), 0);
			CHECK(memcmp(got, want + off / 2 - l / 2, l) == 0);
			CHECK_EQ_INT(tier_writer_pread(w, got, 1, off), -ENODATA);
		}
	}
	CHECK_EQ_INT(tier_writer_commit(w, name), 0);
	free(buf);
}

/* Reads [off, off+len) with one reader, in pieces of `step`, and compares
 * with want (the whole file's bytes, size `size`). */
static void read_steps(struct tier_reader *r, const unsigned char *want, uint64_t size,
		       uint64_t off, uint64_t len, size_t step, unsigned char *buf)
{
	uint64_t end = off + len;

	while (off < end) {
		size_t n = end - off < step ? (size_t)(end - off) : step;
		ssize_t expect = off >= size ? 0 : (ssize_t)(size - off < n ? size - off : n);
		ssize_t got = tier_reader_read(r, buf, n, off);

		if (got != expect) {
			fprintf(stderr, "run %s: read %zu at %llu of %llu: got %zd, want %zd\n",
				cur->name, n, (unsigned long long)off, (unsigned long long)size,
				got, expect);
			exit(1);
		}
		if (expect > 0 && memcmp(buf, want + off, (size_t)expect) != 0) {
			fprintf(stderr, "run %s: read %zu at %llu: bytes differ\n", cur->name, n,
				(unsigned long long)off);
			exit(1);
		}
		if (expect == 0)
			break;
		off += (uint64_t)expect;
	}
}

static void check_whole(struct tier *t, const char *name, const unsigned char *want, uint64_t size,
			size_t step, unsigned char *buf)
{
	struct tier_reader *r = NULL;
	uint64_t got_size = 0;

	CHECK_EQ_INT(tier_reader_open(t, name, &r, &got_size), 0);
	CHECK_EQ_INT(got_size, size);
	read_steps(r, want, size, 0, size + 1, step, buf);
	CHECK_EQ_INT(tier_reader_read(r, buf, 10, size), 0);
	CHECK_EQ_INT(tier_reader_read(r, buf, 10, size + 12345), 0);
	tier_reader_close(r);
}

/* Sizes around the alignment and the request size, each written in its own
 * way and read back whole, in odd steps, at its last byte and past the end. */
static void test_sizes(void)
{
	size_t R = run_request_bytes();
	const size_t sizes[] = { 0,    1,     11, 12,    4095,         4096,
				 4097, R - 1, R,  R + 1, 2 * R + 4097, 5 * R + 3 };
	const size_t ch_a[] = { 1000, 0 }, ch_b[] = { 4097, 1, 65536, 0 }, ch_c[] = { 3 * MIB, 0 },
		     ch_d[] = { 1, 4095, 4096, 12, 0 };
	const size_t *chunkings[] = { ch_a, ch_b, ch_c, ch_d };
	size_t maxsz = 5 * R + 3;
	unsigned char *want = malloc(maxsz + 1), *buf = malloc(maxsz + 4096);
	struct tier_stats st;
	struct tier *t = NULL;
	char path[600], name[64];

	CHECK(want && buf);
	snprintf(path, sizeof(path), "%s/sizes", home);
	CHECK_EQ_INT(run_open(path, 64 * MIB, &t), 0);
	for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
		size_t sz = sizes[i];
		unsigned seed = 40 + (unsigned)i;
		struct tier_reader *r = NULL;
		uint64_t size = 0;

		fill(want, sz, seed, 0);
		snprintf(name, sizeof(name), "size-%zu.bin", sz);
		put_file_chunks(t, name, sz, seed, chunkings[i % 4], want);
		CHECK_EQ_INT(tier_stat(t, name, &size), 0);
		CHECK_EQ_INT(size, sz);
		check_whole(t, name, want, sz, sz + 100, buf); /* one read */
		check_whole(t, name, want, sz, 777, buf);
		check_whole(t, name, want, sz, 65536 + 3, buf);
		if (sz) {
			check_read(t, name, seed, sz - 1, 1, 1);
			check_read(t, name, seed, sz - 1, 4096, 1);
			check_read(t, name, seed, 0, 1, 1);
		}
		check_read(t, name, seed, sz, 1, 0);
		/* Backwards, in pieces that straddle the alignment. */
		CHECK_EQ_INT(tier_reader_open(t, name, &r, &size), 0);
		for (uint64_t end = sz; end > 0;) {
			size_t n = end < 5000 ? (size_t)end : 5000;
			CHECK_EQ_INT(tier_reader_read(r, buf, n, end - n), n);
			CHECK(memcmp(buf, want + end - n, n) == 0);
			end -= n;
			if (sz > 6 * 5000 && end > 3 * 5000 && end < sz - 3 * 5000)
				end = 3 * 5000; /* a few at the end, a few at the start */
		}
		tier_reader_close(r);
		CHECK_EQ_INT(tier_remove(t, name), 0);
	}
	get_stats(t, &st);
	CHECK_EQ_INT(st.used, 0);
	CHECK_EQ_INT(st.files, 0);
	CHECK_EQ_INT(st.reserved, 0);
	CHECK_EQ_INT(st.write_ops, sizeof(sizes) / sizeof(sizes[0]));
	no_temporaries(t);
	tier_close(t);
	free(want);
	free(buf);
}

#define LARGE_SIZE (48 * MIB + 12345)

/* A 48 MiB file written in odd appends, read back sequentially in 1 MiB and
 * odd steps, in small decoder-sized pieces, in one read far larger than the
 * read-ahead, and at random offsets and lengths. */
static void test_large(void)
{
	const size_t chunks[] = { 1, 4095, 65537, MIB - 3, 3, MIB + 4097, 777777, 12, 0 };
	unsigned char *want = malloc(LARGE_SIZE), *buf = malloc(24 * MIB);
	struct tier_reader *r = NULL;
	struct tier_stats st;
	struct tier *t = NULL;
	unsigned seed = 77, rnd = 12345;
	uint64_t size = 0;
	char path[600];

	CHECK(want && buf);
	fill(want, LARGE_SIZE, seed, 0);
	snprintf(path, sizeof(path), "%s/large", home);
	CHECK_EQ_INT(run_open(path, 64 * MIB, &t), 0);
	put_file_chunks(t, "large.bin", LARGE_SIZE, seed, chunks, want);
	get_stats(t, &st);
	CHECK_EQ_INT(st.used, LARGE_SIZE);
	CHECK_EQ_INT(st.reserved, 0);
	no_temporaries(t);

	check_whole(t, "large.bin", want, LARGE_SIZE, MIB, buf); /* the way Fetch streams */
	check_whole(t, "large.bin", want, LARGE_SIZE, 100003, buf);

	CHECK_EQ_INT(tier_reader_open(t, "large.bin", &r, &size), 0);
	CHECK_EQ_INT(size, LARGE_SIZE);
	/* A decoder: a header, then small pieces, then a jump and more pieces. */
	read_steps(r, want, size, 0, 12, 12, buf);
	read_steps(r, want, size, 12, 3 * MIB, 333, buf);
	read_steps(r, want, size, 20 * MIB + 5, 2 * MIB, 4096, buf);
	/* Back into the window just read, and before it. */
	read_steps(r, want, size, 20 * MIB + 1000, 5000, 5000, buf);
	read_steps(r, want, size, 19 * MIB, 5000, 5000, buf);
	/* One read larger than the whole read-ahead window. */
	CHECK_EQ_INT(tier_reader_read(r, buf, 20 * MIB, 12345), 20 * MIB);
	CHECK(memcmp(buf, want + 12345, 20 * MIB) == 0);
	/* Random offsets and lengths, some across the end. */
	for (int i = 0; i < 300; i++) {
		uint64_t off = (uint64_t)rand_r(&rnd) * 7919u % (LARGE_SIZE + 100);
		size_t len = (size_t)rand_r(&rnd) % (i % 10 == 0 ? 3 * MIB : 70000) + 1;
		read_steps(r, want, size, off, len, len, buf);
		if (i % 3 == 0) /* and sometimes carry on sequentially from there */
			read_steps(r, want, size, off + len, 2 * len, len / 2 + 1, buf);
	}
	/* The very end. */
	read_steps(r, want, size, LARGE_SIZE - 5, 100, 100, buf);
	tier_reader_close(r);

	CHECK_EQ_INT(tier_remove(t, "large.bin"), 0);
	no_temporaries(t);
	tier_close(t);
	free(want);
	free(buf);
}

/* tier_probe: sane numbers, nothing left, nothing counted; FULL without room. */
static void test_probe(void)
{
	struct tier_stats st, st2;
	struct tier *t = NULL;
	double fixed = -1, bps = -1;
	char path[600];

	snprintf(path, sizeof(path), "%s/probe", home);
	CHECK_EQ_INT(run_open(path, 64 * MIB, &t), 0);
	put_file(t, "keep.bin", 5000, 3, 1000);
	get_stats(t, &st);
	CHECK_EQ_INT(tier_probe(t, 0, &fixed, &bps), 0);
	fprintf(stderr, "note: run %s: probe (8 MiB, %s): fixed %.1f us, %.2f GB/s\n", cur->name,
		tier_io_desc(t), fixed * 1e6, bps / 1e9);
	CHECK(fixed > 0 && fixed < 10);
	CHECK(bps > 0);
	get_stats(t, &st2);
	CHECK_EQ_INT(st2.used, st.used);
	CHECK_EQ_INT(st2.files, st.files);
	CHECK_EQ_INT(st2.reserved, 0);
	CHECK_EQ_INT(st2.read_bytes, st.read_bytes);
	CHECK_EQ_INT(st2.write_bytes, st.write_bytes);
	CHECK_EQ_INT(st2.read_ops, st.read_ops);
	CHECK_EQ_INT(st2.write_ops, st.write_ops);
	no_temporaries(t);
	CHECK_EQ_INT(dir_has_prefix(path, "."), 2); /* "." and ".." only */
	/* A tiny probe is raised to the minimum and still works. */
	fixed = bps = -1;
	CHECK_EQ_INT(tier_probe(t, 1, &fixed, &bps), 0);
	CHECK(fixed > 0 && bps > 0);
	/* No room: KVTIER_E_FULL, outputs untouched, nothing reserved or left. */
	CHECK_EQ_INT(tier_reserve(t, 64 * MIB - st.used - 4096), 0);
	fixed = bps = -1;
	CHECK_EQ_INT(tier_probe(t, 0, &fixed, &bps), KVTIER_E_FULL);
	CHECK(fixed == -1 && bps == -1);
	tier_unreserve(t, 64 * MIB - st.used - 4096);
	get_stats(t, &st2);
	CHECK_EQ_INT(st2.reserved, 0);
	no_temporaries(t);
	check_read(t, "keep.bin", 3, 0, 5000, 5000);
	tier_close(t);
}

/* -ENOSPC: in a child with its own mount namespace (the mount vanishes with
 * it), a 1 MiB tmpfs holds a disk tier of 64 MiB. Exits 0, 1, or 77 when
 * the mount is not possible. */
static int enospc_child(const char *dir)
{
	unsigned char *buf = malloc(64 * 1024);
	struct tier_writer *w = NULL;
	struct tier_stats st;
	struct tier *t = NULL;
	int rc = 0, private_ns;
	char path[700];

	CHECK(buf);
	private_ns =
	    unshare(CLONE_NEWNS) == 0 && mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) == 0;
	if (mount("tmpfs", dir, "tmpfs", 0, "size=1m,mode=0700")) {
		fprintf(stderr, "SKIP part: ENOSPC test: mount -t tmpfs -o size=1m %s: %s\n", dir,
			strerror(errno));
		return 77;
	}
	snprintf(path, sizeof(path), "%s/tier", dir);
	CHECK_EQ_INT(run_open(path, 64 * MIB, &t), 0);
	fprintf(stderr, "note: run %s: ENOSPC on a 1 MiB tmpfs, io=%s%s\n", cur->name,
		tier_io_desc(t), private_ns ? "" : " (no private mount namespace)");
	/* 4 MiB into 1 MiB: a write or the commit fails with -ENOSPC. */
	CHECK_EQ_INT(tier_writer_open(t, 4 * MIB, &w), 0);
	for (uint64_t off = 0; off < 4 * MIB && rc == 0; off += 64 * 1024) {
		fill(buf, 64 * 1024, 9, off);
		rc = tier_writer_write(w, buf, 64 * 1024);
	}
	if (rc == 0) {
		rc = tier_writer_commit(w, "big.bin");
	} else {
		if (strstr(tier_io_desc(t), "O_DIRECT")) /* the stream stays failed */
			CHECK_EQ_INT(tier_writer_write(w, buf, 1), rc);
		tier_writer_abort(w);
	}
	CHECK_EQ_INT(rc, -ENOSPC);
	get_stats(t, &st);
	CHECK_EQ_INT(st.reserved, 0);
	CHECK_EQ_INT(st.used, 0);
	CHECK_EQ_INT(st.files, 0);
	no_temporaries(t);
	CHECK_EQ_INT(dir_has_prefix(path, "."), 2);
	/* The room is back: a small file fits and reads back. */
	put_file(t, "small.bin", 100000, 10, 4097);
	check_read(t, "small.bin", 10, 0, 100000, 100000);
	tier_close(t);
	if (umount2(dir, MNT_DETACH)) {
		fprintf(stderr, "umount %s: %s\n", dir, strerror(errno));
		return 1;
	}
	free(buf);
	return 0;
}

static void test_enospc(void)
{
	char dir[600];
	int status = 0;
	pid_t pid;

	if (strcmp(cur->kind, "disk") != 0)
		return;
	if (geteuid() != 0) {
		fprintf(stderr, "SKIP part: ENOSPC test needs root to mount a small tmpfs\n");
		return;
	}
	snprintf(dir, sizeof(dir), "%s/enospc", home);
	CHECK_EQ_INT(mkdir(dir, 0700), 0);
	fflush(NULL);
	pid = fork();
	CHECK(pid >= 0);
	if (pid == 0)
		_exit(enospc_child(dir));
	CHECK_EQ_INT(waitpid(pid, &status, 0), pid);
	umount2(dir, MNT_DETACH); /* in case the child had no namespace of its own */
	CHECK(WIFEXITED(status));
	if (WEXITSTATUS(status) == 77)
		return; /* the child said why */
	CHECK_EQ_INT(WEXITSTATUS(status), 0);
}

/* ---- a stream handed between threads ---- */

#define HANDOFF_SIZE (8 * MIB + 4097)

struct handoff {
	struct tier_writer *w;
	struct tier_reader *r;
	const unsigned char *want;
	unsigned char *buf;
	uint64_t from, to; /* the range this thread moves */
	int rc;
};

static void *handoff_write(void *arg)
{
	struct handoff *h = arg;

	h->rc = tier_writer_write(h->w, h->want + h->from, (size_t)(h->to - h->from));
	return NULL; /* exits with writes in flight */
}

static void *handoff_read(void *arg)
{
	struct handoff *h = arg;
	ssize_t n = tier_reader_read(h->r, h->buf, (size_t)(h->to - h->from), h->from);

	h->rc = n == (ssize_t)(h->to - h->from) && memcmp(h->buf, h->want + h->from, (size_t)n) == 0
		    ? 0
		    : -1;
	return NULL; /* exits with read-ahead in flight */
}

/* A writer and a reader used by one thread after another, each thread
 * exiting with requests in flight (gRPC handlers may move a stream between
 * threads): the next thread carries on with the right bytes. */
static void test_thread_handoff(void)
{
	unsigned char *want = malloc(HANDOFF_SIZE), *buf = malloc(HANDOFF_SIZE);
	struct handoff h = { 0 };
	struct tier *t = NULL;
	uint64_t size = 0;
	pthread_t th;
	char path[600];

	CHECK(want && buf);
	fill(want, HANDOFF_SIZE, 21, 0);
	snprintf(path, sizeof(path), "%s/handoff", home);
	CHECK_EQ_INT(run_open(path, 64 * MIB, &t), 0);
	CHECK_EQ_INT(tier_writer_open(t, HANDOFF_SIZE, &h.w), 0);
	h.want = want;
	h.buf = buf;
	for (uint64_t cut = 0; cut < HANDOFF_SIZE;) {
		h.from = cut;
		h.to = cut + 3 * MIB + 5 < HANDOFF_SIZE ? cut + 3 * MIB + 5 : HANDOFF_SIZE;
		CHECK_EQ_INT(pthread_create(&th, NULL, handoff_write, &h), 0);
		CHECK_EQ_INT(pthread_join(th, NULL), 0);
		CHECK_EQ_INT(h.rc, 0);
		cut = h.to;
	}
	CHECK_EQ_INT(tier_writer_commit(h.w, "handoff.bin"), 0);
	CHECK_EQ_INT(tier_reader_open(t, "handoff.bin", &h.r, &size), 0);
	CHECK_EQ_INT(size, HANDOFF_SIZE);
	for (uint64_t cut = 0; cut < HANDOFF_SIZE;) {
		h.from = cut;
		h.to = cut + MIB + 1 < HANDOFF_SIZE ? cut + MIB + 1 : HANDOFF_SIZE;
		CHECK_EQ_INT(pthread_create(&th, NULL, handoff_read, &h), 0);
		CHECK_EQ_INT(pthread_join(th, NULL), 0);
		CHECK_EQ_INT(h.rc, 0);
		cut = h.to;
	}
	tier_reader_close(h.r);
	tier_close(t);
	free(want);
	free(buf);
}

/* ---- concurrency ---- */

#define THREAD_FILES 50

struct worker {
	struct tier *t;
	int id;
	int rc;
	uint64_t sum; /* bytes committed */
	int committed;
	int full;     /* KVTIER_E_FULL answers */
};

static void *worker_run(void *arg)
{
	struct worker *wk = arg;
	unsigned char buf[4096];

	for (int i = 0; i < THREAD_FILES; i++) {
		struct tier_writer *w = NULL;
		size_t size = 1000 + (size_t)i * 97 + (size_t)wk->id * 13;
		size_t half = size / 2;
		char name[64];
		int rc;

		rc = tier_writer_open(wk->t, size, &w);
		if (rc == KVTIER_E_FULL) {
			wk->full++;
			continue;
		}
		if (rc) {
			wk->rc = rc;
			break;
		}
		fill(buf, half, (unsigned)(wk->id * 100 + i), 0);
		rc = tier_writer_write(w, buf, half);
		if (rc == 0) {
			fill(buf, size - half, (unsigned)(wk->id * 100 + i), half);
			rc = tier_writer_write(w, buf, size - half);
		}
		if (rc) {
			tier_writer_abort(w);
			wk->rc = rc;
			break;
		}
		snprintf(name, sizeof(name), "t%d-%d.bin", wk->id, i);
		rc = tier_writer_commit(w, name);
		if (rc) {
			wk->rc = rc;
			break;
		}
		wk->sum += size;
		wk->committed++;
	}
	return NULL;
}

/* Two threads, 50 files each, on a tier of `capacity` bytes. Returns the
 * number of KVTIER_E_FULL answers. */
static int run_threads(const char *path, uint64_t capacity)
{
	struct worker wk[2];
	pthread_t th[2];
	struct tier *t = NULL;
	struct tier_stats st;
	struct scan_seen s;
	int full = 0;

	CHECK_EQ_INT(run_open(path, capacity, &t), 0);
	for (int i = 0; i < 2; i++) {
		memset(&wk[i], 0, sizeof(wk[i]));
		wk[i].t = t;
		wk[i].id = i;
		CHECK_EQ_INT(pthread_create(&th[i], NULL, worker_run, &wk[i]), 0);
	}
	for (int i = 0; i < 2; i++)
		CHECK_EQ_INT(pthread_join(th[i], NULL), 0);
	get_stats(t, &st);
	for (int i = 0; i < 2; i++)
		CHECK_EQ_INT(wk[i].rc, 0);
	CHECK_EQ_INT(st.used, wk[0].sum + wk[1].sum);
	CHECK_EQ_INT(st.files, wk[0].committed + wk[1].committed);
	CHECK_EQ_INT(st.reserved, 0);
	CHECK(st.used <= capacity);
	scan(t, &s);
	CHECK_EQ_INT(s.tmps, 0);
	CHECK_EQ_INT(s.n, st.files);
	for (int i = 0; i < s.n; i++) {
		int id, k;
		CHECK_EQ_INT(sscanf(s.names[i], "t%d-%d.bin", &id, &k), 2);
		CHECK_EQ_INT(s.sizes[i], 1000 + (uint64_t)k * 97 + (uint64_t)id * 13);
	}
	/* Spot-check bytes of one file per thread. */
	for (int i = 0; i < 2; i++) {
		char name[64];
		size_t size = 1000 + (size_t)(THREAD_FILES - 1) * 97 + (size_t)i * 13;
		snprintf(name, sizeof(name), "t%d-%d.bin", i, THREAD_FILES - 1);
		if (scan_size(&s, name) >= 0)
			check_read(t, name, (unsigned)(i * 100 + THREAD_FILES - 1), 0, size,
				   (ssize_t)size);
	}
	full = wk[0].full + wk[1].full;
	CHECK_EQ_INT(wk[0].committed + wk[0].full, THREAD_FILES);
	CHECK_EQ_INT(wk[1].committed + wk[1].full, THREAD_FILES);
	tier_close(t);
	return full;
}

static void test_threads(void)
{
	char p[600];
	int full;

	/* Room for everything: all 100 commit. */
	snprintf(p, sizeof(p), "%s/threads", home);
	full = run_threads(p, 4 * MIB);
	CHECK_EQ_INT(full, 0);
	/* Room for about half: the reservations never overshoot the capacity. */
	snprintf(p, sizeof(p), "%s/threads-tight", home);
	full = run_threads(p, 200000);
	CHECK(full > 0);
}

int main(void)
{
	const char *shm = "/dev/shm";
	struct stat st;
	struct tier *t = NULL;
	char path[600];

	main_pid = getpid();
	if (stat(shm, &st) == 0 && S_ISDIR(st.st_mode) && access(shm, W_OK) == 0)
		snprintf(base, sizeof(base), "%s/test_tier.XXXXXX", shm);
	else
		snprintf(base, sizeof(base), "/tmp/test_tier.XXXXXX");
	if (!mkdtemp(base)) {
		fprintf(stderr, "mkdtemp %s: %s\n", base, strerror(errno));
		return 1;
	}
	snprintf(xbase, sizeof(xbase), "/tmp/test_tier_x.XXXXXX");
	if (!mkdtemp(xbase))
		xbase[0] = '\0';
	atexit(cleanup);
	unsetenv("KVTIER_NO_IO_URING"); /* the runs set it where they mean to */

	for (size_t i = 0; i < sizeof(runs) / sizeof(runs[0]); i++) {
		const char *root, *oroot;

		cur = &runs[i];
		root = cur->on_tmp && xbase[0] ? xbase : base;
		oroot = root == base ? xbase : base;
		snprintf(home, sizeof(home), "%s/%s", root, cur->name);
		CHECK_EQ_INT(mkdir(home, 0700), 0);
		other[0] = '\0';
		if (oroot[0]) {
			snprintf(other, sizeof(other), "%s/%s-x", oroot, cur->name);
			CHECK_EQ_INT(mkdir(other, 0700), 0);
		}

		test_open();
		snprintf(path, sizeof(path), "%s/tier", home);
		CHECK_EQ_INT(run_open(path, MIB, &t), 0);
		test_io_mode(t);
		test_write_read(t);
		test_full(t);
		test_efbig_abort(t);
		test_commit_exists(t);
		test_names(t);
		test_writer_pread(t);
		test_from_file(t);
		test_from_file_rules(t);
		test_link_out(t);
		test_link_out_cross_fs(t);
		test_scan(t);
		test_remove_account(t);
		tier_close(t);
		test_sizes();
		test_large();
		test_probe();
		test_enospc();
		test_thread_handoff();
		test_threads();
		fprintf(stderr, "run %s: ok\n", cur->name);
	}
	printf("test_tier: ok\n");
	return 0;
}
