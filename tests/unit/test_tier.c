/* test_tier.c: the tmpfs tier (tiers/tier.c) through its public contract.
 *
 * Works in a fresh directory under /dev/shm (or /tmp when there is none) and
 * checks bytes, counts and error codes: commit and read back, accounting,
 * capacity, -EFBIG, no-overwrite commits, temporaries never left behind,
 * name checks, adoption by hard link (and refusal of symlinks and
 * directories), link-out (and its copy across file systems, skipped with a
 * message when /tmp and the tier share one), scans, removal, and two threads
 * writing at once.
 */
#include "tier.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "kvtier.h"

#define MIB (1024u * 1024u)

static char base[256];  /* mkdtemp dir holding the tier and helper dirs */
static char xbase[256]; /* mkdtemp dir under /tmp (cross-file-system tests) */

/* Byte i of pattern `seed`: cheap, position-dependent, different per seed. */
static unsigned char pat(unsigned seed, uint64_t i)
{
	return (unsigned char)((i * 131u + seed * 7919u + (i >> 8)) & 0xff);
}

static void fill(unsigned char *buf, size_t len, unsigned seed, uint64_t off)
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

static void cleanup(void)
{
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

/* ---- tests ---- */

static void test_open(void)
{
	char p[512];
	struct tier *t = (struct tier *)1;

	CHECK_EQ_INT(tier_open("disk", base, MIB, &t), KVTIER_E_INVALID);
	CHECK(t == NULL);
	CHECK_EQ_INT(tier_open("bogus", base, MIB, &t), KVTIER_E_INVALID);
	/* A path that exists and is not a directory. */
	snprintf(p, sizeof(p), "%s/plain", base);
	write_plain_file(p, 10, 1);
	CHECK(tier_open("tmpfs", p, MIB, &t) < 0);
	CHECK(t == NULL);
	/* mkdir -p with mode 0700. */
	snprintf(p, sizeof(p), "%s/deep/er/tier", base);
	CHECK_EQ_INT(tier_open("tmpfs", p, MIB, &t), 0);
	{
		struct stat st;
		CHECK_EQ_INT(stat(p, &st), 0);
		CHECK(S_ISDIR(st.st_mode));
		CHECK_EQ_INT(st.st_mode & 0777, 0700);
		CHECK(strcmp(tier_kind(t), "tmpfs") == 0);
		CHECK(strcmp(tier_path(t), p) == 0);
	}
	tier_close(t);
	/* A directory anyone may write into is refused. */
	snprintf(p, sizeof(p), "%s/open", base);
	CHECK_EQ_INT(mkdir(p, 0700), 0);
	CHECK_EQ_INT(chmod(p, 0777), 0);
	t = NULL;
	CHECK_EQ_INT(tier_open("tmpfs", p, MIB, &t), -EPERM);
	CHECK(t == NULL);
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
	int copied;

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
		CHECK_EQ_INT(tier_link_out(t, bad[i], AT_FDCWD, "x", &copied), KVTIER_E_INVALID);
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

static void test_from_file(struct tier *t)
{
	char dir[300], src[400], p[400];
	struct tier_writer *w = (struct tier_writer *)1;
	struct tier_stats st, st2;
	struct stat a, b;
	unsigned char got[100], want[100];
	uint64_t size = 0;
	int tfd;

	snprintf(dir, sizeof(dir), "%s/slots", base);
	CHECK_EQ_INT(mkdir(dir, 0700), 0);
	snprintf(src, sizeof(src), "%s/src.bin", dir);
	write_plain_file(src, 3000, 7);
	get_stats(t, &st);

	/* Same file system: a hard link. */
	CHECK_EQ_INT(tier_writer_from_file(t, src, 0, &size, &w), 0);
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
	CHECK_EQ_INT(a.st_nlink, 2);
	tfd = open(tier_path(t), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	CHECK(tfd >= 0);
	CHECK_EQ_INT(fstatat(tfd, "adopted.bin", &b, AT_SYMLINK_NOFOLLOW), 0);
	CHECK(a.st_dev == b.st_dev && a.st_ino == b.st_ino);
	check_file_at(tfd, "adopted.bin", 7, 3000);
	get_stats(t, &st2);
	CHECK_EQ_INT(st2.used, st.used + 3000);
	CHECK_EQ_INT(st2.files, st.files + 1);
	CHECK_EQ_INT(st2.reserved, 0);

	/* force_copy: same file system, but a copy with its own inode. */
	CHECK_EQ_INT(tier_writer_from_file(t, src, 1, &size, &w), 0);
	CHECK_EQ_INT(tier_writer_commit(w, "copied.bin"), 0);
	CHECK_EQ_INT(stat(src, &a), 0);
	CHECK_EQ_INT(a.st_nlink, 2); /* src + adopted.bin only */
	CHECK_EQ_INT(fstatat(tfd, "copied.bin", &b, AT_SYMLINK_NOFOLLOW), 0);
	CHECK(a.st_ino != b.st_ino);
	check_file_at(tfd, "copied.bin", 7, 3000);
	CHECK_EQ_INT(tier_remove(t, "copied.bin"), 0);

	/* A symlink to a regular file is refused, never followed. */
	snprintf(p, sizeof(p), "%s/link.bin", dir);
	CHECK_EQ_INT(symlink(src, p), 0);
	w = (struct tier_writer *)1;
	CHECK_EQ_INT(tier_writer_from_file(t, p, 0, &size, &w), KVTIER_E_INVALID);
	CHECK(w == NULL);
	/* A directory is refused. */
	CHECK_EQ_INT(tier_writer_from_file(t, dir, 0, &size, &w), KVTIER_E_INVALID);
	/* A FIFO is refused (and the call does not hang). */
	snprintf(p, sizeof(p), "%s/fifo", dir);
	CHECK_EQ_INT(mkfifo(p, 0600), 0);
	CHECK_EQ_INT(tier_writer_from_file(t, p, 0, &size, &w), KVTIER_E_INVALID);
	/* A missing file. */
	snprintf(p, sizeof(p), "%s/missing.bin", dir);
	CHECK_EQ_INT(tier_writer_from_file(t, p, 0, &size, &w), -ENOENT);
	/* Too big for the room left: nothing reserved, nothing left behind. */
	snprintf(p, sizeof(p), "%s/huge.bin", dir);
	{
		int fd = open(p, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
		CHECK(fd >= 0);
		CHECK_EQ_INT(ftruncate(fd, 2 * MIB), 0);
		close(fd);
	}
	CHECK_EQ_INT(tier_writer_from_file(t, p, 0, &size, &w), KVTIER_E_FULL);
	CHECK(w == NULL);
	get_stats(t, &st2);
	CHECK_EQ_INT(st2.reserved, 0);
	CHECK_EQ_INT(st2.used, st.used + 3000);
	no_temporaries(t);

	/* Another file system: a copy (the source keeps one link). */
	if (xbase[0]) {
		struct stat xs, ts;
		CHECK_EQ_INT(stat(xbase, &xs), 0);
		CHECK_EQ_INT(fstat(tfd, &ts), 0);
		if (xs.st_dev != ts.st_dev) {
			struct stat c;
			snprintf(p, sizeof(p), "%s/xsrc.bin", xbase);
			write_plain_file(p, 5001, 8);
			CHECK_EQ_INT(tier_writer_from_file(t, p, 0, &size, &w), 0);
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
			fprintf(stderr, "note: %s and the tier share a file system; the copy "
				"path of tier_writer_from_file is not exercised\n", xbase);
		}
	}
	close(tfd);
	get_stats(t, &st2);
	CHECK_EQ_INT(st2.used, st.used + 3000);
	CHECK_EQ_INT(st2.files, st.files + 1);
	no_temporaries(t);
}

static void test_link_out(struct tier *t)
{
	char dir[300];
	struct tier_stats st, st2;
	struct stat a, b;
	int dfd, tfd, copied = -1;

	snprintf(dir, sizeof(dir), "%s/stage", base);
	CHECK_EQ_INT(mkdir(dir, 0700), 0);
	dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	CHECK(dfd >= 0);
	tfd = open(tier_path(t), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	CHECK(tfd >= 0);

	put_file(t, "out.bin", 12345, 11, 1000);
	CHECK_EQ_INT(tier_link_out(t, "out.bin", dfd, "kvtier-out.bin", &copied), 0);
	CHECK_EQ_INT(copied, 0);
	CHECK_EQ_INT(fstatat(dfd, "kvtier-out.bin", &a, AT_SYMLINK_NOFOLLOW), 0);
	CHECK_EQ_INT(fstatat(tfd, "out.bin", &b, AT_SYMLINK_NOFOLLOW), 0);
	CHECK(a.st_dev == b.st_dev && a.st_ino == b.st_ino);
	CHECK_EQ_INT(b.st_nlink, 2);

	/* Never overwrites. */
	copied = -1;
	CHECK_EQ_INT(tier_link_out(t, "b.bin", dfd, "kvtier-out.bin", &copied), KVTIER_E_EXISTS);
	CHECK_EQ_INT(tier_link_out(t, "missing.bin", dfd, "kvtier-new.bin", &copied),
		     KVTIER_E_NOTFOUND);
	CHECK_EQ_INT(tier_link_out(t, "out.bin", dfd, "a:b.bin", &copied), KVTIER_E_INVALID);
	CHECK_EQ_INT(tier_link_out(t, "out.bin", dfd, "x/y.bin", &copied), KVTIER_E_INVALID);
	CHECK_EQ_INT(tier_link_out(t, "out.bin", dfd, ".hidden", &copied), KVTIER_E_INVALID);
	CHECK_EQ_INT(tier_link_out(t, "out.bin", dfd, "", &copied), KVTIER_E_INVALID);
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
	struct stat xs, ts, a, b;
	int xfd, tfd, copied = -1;
	struct tier_stats st, st2;

	if (!xbase[0]) {
		fprintf(stderr, "SKIP part: no /tmp directory for the cross-file-system copy\n");
		return;
	}
	CHECK_EQ_INT(stat(xbase, &xs), 0);
	CHECK_EQ_INT(stat(tier_path(t), &ts), 0);
	if (xs.st_dev == ts.st_dev) {
		fprintf(stderr, "SKIP part: %s and %s are on the same file system; the copy "
			"path of tier_link_out is not exercised\n", xbase, tier_path(t));
		return;
	}
	xfd = open(xbase, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	CHECK(xfd >= 0);
	tfd = open(tier_path(t), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	CHECK(tfd >= 0);
	get_stats(t, &st);
	CHECK_EQ_INT(tier_link_out(t, names3[2], xfd, "kvtier-c.bin", &copied), 0);
	CHECK_EQ_INT(copied, 1);
	check_file_at(xfd, "kvtier-c.bin", 3, sizes3[2]);
	CHECK_EQ_INT(fstatat(xfd, "kvtier-c.bin", &a, AT_SYMLINK_NOFOLLOW), 0);
	CHECK_EQ_INT(fstatat(tfd, names3[2], &b, AT_SYMLINK_NOFOLLOW), 0);
	CHECK(a.st_ino != b.st_ino || a.st_dev != b.st_dev);
	{ /* files are created 0640, less the umask */
		mode_t um = umask(0);
		umask(um);
		CHECK_EQ_INT(a.st_mode & 0777, 0640 & ~um);
	}
	CHECK_EQ_INT(dir_has_prefix(xbase, ".kvtier-tmp-"), 0);
	get_stats(t, &st2);
	CHECK_EQ_INT(st2.read_bytes, st.read_bytes + sizes3[2]);
	CHECK_EQ_INT(st2.used, st.used);

	/* Never overwrites, and leaves no temporary when refusing. */
	copied = -1;
	CHECK_EQ_INT(tier_link_out(t, names3[1], xfd, "kvtier-c.bin", &copied), KVTIER_E_EXISTS);
	CHECK_EQ_INT(tier_link_out(t, "missing.bin", xfd, "kvtier-m.bin", &copied),
		     KVTIER_E_NOTFOUND);
	CHECK_EQ_INT(dir_has_prefix(xbase, ".kvtier-tmp-"), 0);
	check_file_at(xfd, "kvtier-c.bin", 3, sizes3[2]);
	close(tfd);
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

	CHECK_EQ_INT(tier_open("tmpfs", path, capacity, &t), 0);
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
	char p[400];
	int full;

	/* Room for everything: all 100 commit. */
	snprintf(p, sizeof(p), "%s/threads", base);
	full = run_threads(p, 4 * MIB);
	CHECK_EQ_INT(full, 0);
	/* Room for about half: the reservations never overshoot the capacity. */
	snprintf(p, sizeof(p), "%s/threads-tight", base);
	full = run_threads(p, 200000);
	CHECK(full > 0);
}

int main(void)
{
	const char *shm = "/dev/shm";
	struct stat st;
	struct tier *t = NULL;
	char path[300];

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

	test_open();
	snprintf(path, sizeof(path), "%s/tier", base);
	CHECK_EQ_INT(tier_open("tmpfs", path, MIB, &t), 0);
	test_write_read(t);
	test_full(t);
	test_efbig_abort(t);
	test_commit_exists(t);
	test_names(t);
	test_writer_pread(t);
	test_from_file(t);
	test_link_out(t);
	test_link_out_cross_fs(t);
	test_scan(t);
	test_remove_account(t);
	tier_close(t);
	test_threads();
	printf("test_tier: ok\n");
	return 0;
}
