/* fsck.c: offline consistency check of a kvtier data directory (kvtier fsck).
 *
 * The same checks as the daemon's start-up reconcile, reported instead of
 * repaired:
 * 1. the tier list the daemon records in the index meta key "tiers" (one line
 *    per tier: "<index> <kind> <path> <capacity>"); without it no file can
 *    be checked, which is itself a problem;
 * 2. every blob: its tier exists, each part it records is a regular file
 *    "<64 hex id><suffix>" in that tier's directory with the recorded size,
 *    owned by the directory's owner and writable by nobody else, and
 *    (verify_bytes) the CRC-32C of its bytes matches;
 * 3. every entry of every tier directory: leftover temporaries (".tmp-*"),
 *    orphans (a name that is no blob part, or a part no blob records there),
 *    symlinks and other non-regular files;
 * 4. index_check() for the index's own cross-references.
 * "Files checked" counts the part files of step 2 plus the entries of step 3
 * that are not such parts (each file once).
 *
 * It must never change anything: the index is opened read-only, files are
 * opened O_RDONLY and never followed through a symlink. Blobs are read from
 * the index in batches, so no LMDB read transaction stays open while bytes
 * are read.
 */
#include "fsck.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "codec.h"
#include "crc32c.h"
#include "index.h"
#include "keys.h"
#include "kvtier.h"
#include "tier.h"

#define FSCK_MAX_TIERS 16
#define FSCK_BATCH 1024            /* blobs copied out of one read transaction */
#define FSCK_READ_BUF (1u << 20)   /* verify_bytes reads in 1 MiB pieces */
#define FSCK_TIERS_TEXT_MAX (1u << 20)

struct fsck_tier {
	int listed;                /* the tier list names this index */
	char kind[32];
	char *path;                /* as recorded (malloc'd) */
	int dirfd;                 /* -1: directory missing */
	uid_t owner;               /* the directory's owner: kvtierd's user */
};

struct fsck {
	FILE *out;
	struct index *ix;
	int verify;
	int have_tiers;            /* the tier list was found */
	struct fsck_tier tiers[FSCK_MAX_TIERS];
	unsigned long problems, blobs, files;
	uint8_t *buf;              /* verify_bytes only */
	struct blob_meta *batch;   /* FSCK_BATCH records */
	size_t n_batch;
};

static void fsck_problem(struct fsck *c, const char *fmt, ...)
	__attribute__((format(printf, 2, 3)));

static void fsck_problem(struct fsck *c, const char *fmt, ...)
{
	va_list ap;

	fputs("fsck: ", c->out);
	va_start(ap, fmt);
	vfprintf(c->out, fmt, ap);
	va_end(ap);
	fputc('\n', c->out);
	c->problems++;
}

static const char *fsck_part_label(int part)
{
	return part == PART_MAIN ? "main part" : blob_part_suffix[part];
}

/* Parses one line "<index> <kind> <path> <capacity>" (the path may contain
 * spaces: it runs to the last space). Returns 0 or -1 when malformed. */
static int fsck_parse_tier_line(char *line, unsigned *index, char *kind, size_t kind_cap,
				char **path)
{
	char *end, *sp, *last;
	unsigned long v;
	size_t kl;

	errno = 0;
	v = strtoul(line, &end, 10);
	if (end == line || *end != ' ' || errno || v >= FSCK_MAX_TIERS)
		return -1;
	line = end + 1;
	sp = strchr(line, ' ');
	if (!sp)
		return -1;
	kl = (size_t)(sp - line);
	if (kl == 0 || kl >= kind_cap)
		return -1;
	memcpy(kind, line, kl);
	kind[kl] = '\0';
	line = sp + 1;
	last = strrchr(line, ' ');
	if (!last || last == line)
		return -1;
	errno = 0;
	strtoull(last + 1, &end, 10);
	if (end == last + 1 || *end || errno)
		return -1;
	*last = '\0';
	*index = (unsigned)v;
	*path = line;
	return 0;
}

/* Reads the tier list and opens each tier directory. A missing list or a
 * missing directory is a problem; a directory that exists but cannot be read
 * is an error (the check could not run). */
static int fsck_load_tiers(struct fsck *c)
{
	char *text = NULL, *line, *save = NULL;
	size_t cap = 64 * 1024, len = 0;
	unsigned lineno = 0;
	int rc;

	text = malloc(cap + 1);
	if (!text) {
		rc = -ENOMEM;
		goto out;
	}
	rc = index_meta_get(c->ix, "tiers", text, cap, &len);
	if (rc == 0 && len > cap && len <= FSCK_TIERS_TEXT_MAX) {
		char *t = realloc(text, len + 1);
		if (!t) {
			rc = -ENOMEM;
			goto out;
		}
		text = t;
		cap = len;
		rc = index_meta_get(c->ix, "tiers", text, cap, &len);
	}
	if (rc == KVTIER_E_NOTFOUND) {
		fsck_problem(c, "the index records no tier list (meta key \"tiers\"): kvtierd "
				"never started on this data directory; tier files were not checked");
		rc = 0;
		goto out;
	}
	if (rc) {
		fprintf(c->out, "fsck: cannot read the tier list from the index: %s\n",
			kvtier_strerror(rc));
		goto out;
	}
	if (len > cap) {
		fsck_problem(c, "the tier list in the index is %zu bytes, more than %zu: tier "
				"files were not checked", len, (size_t)FSCK_TIERS_TEXT_MAX);
		goto out;
	}
	text[len] = '\0';
	c->have_tiers = 1;
	for (line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		struct fsck_tier *t;
		char kind[sizeof(t->kind)], *path;
		unsigned index;

		lineno++;
		if (fsck_parse_tier_line(line, &index, kind, sizeof(kind), &path) != 0) {
			fsck_problem(c, "tier list line %u is malformed: \"%s\"", lineno, line);
			continue;
		}
		t = &c->tiers[index];
		if (t->listed) {
			fsck_problem(c, "tier list names tier %u twice", index);
			continue;
		}
		memcpy(t->kind, kind, sizeof(kind));
		t->path = strdup(path);
		if (!t->path) {
			rc = -ENOMEM;
			goto out;
		}
		t->listed = 1;
		t->dirfd = open(t->path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		if (t->dirfd >= 0) {
			struct stat ds;
			t->owner = fstat(t->dirfd, &ds) == 0 ? ds.st_uid : geteuid();
		}
		if (t->dirfd < 0) {
			int e = errno;
			if (e != ENOENT && e != ENOTDIR) {
				fprintf(c->out, "fsck: cannot read tier %u directory %s: %s\n", index,
					t->path, strerror(e));
				rc = -e;
				goto out;
			}
			fsck_problem(c, "tier %u (%s) directory %s %s%s", index, t->kind, t->path,
				     e == ENOENT ? "does not exist" : "is not a directory",
				     t->path[0] != '/' ? " (the path is relative: run fsck from "
							 "kvtierd's working directory)" : "");
		}
	}
	rc = 0;
out:
	free(text);
	return rc;
}

struct fsck_src {
	int fd;
	uint64_t off;
};

/* Encoded bytes in sequence, for the decoder. */
static ssize_t fsck_src_read(void *ctx, void *buf, size_t len)
{
	struct fsck_src *src = ctx;
	ssize_t n;

	do
		n = pread(src->fd, buf, len, (off_t)src->off);
	while (n < 0 && errno == EINTR);
	if (n < 0)
		return -errno;
	src->off += (uint64_t)n;
	return n;
}

/* Reads a part back through the decoder (CODEC_RAW reads through, checking
 * the size) and compares the CRC-32C of the bytes as served. */
static void fsck_verify_part(struct fsck *c, const struct fsck_tier *t, const char *name,
			     const char *hex, int part, uint64_t size, uint32_t want, int codec)
{
	uint32_t crc = 0;
	uint64_t off = 0;
	int fd = openat(t->dirfd, name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC), rc;
	struct fsck_src src = {fd, 0};
	struct codec_dec *dec = NULL;

	if (fd < 0) {
		fsck_problem(c, "blob %s: cannot open %s/%s to verify it: %s", hex, t->path, name,
			     strerror(errno));
		goto out;
	}
	rc = codec_dec_new(codec, size, fsck_src_read, &src, &dec);
	if (rc) {
		fsck_problem(c, "blob %s: %s/%s: %s", hex, t->path, name,
			     rc == KVTIER_E_INVALID ? "unknown compression" : kvtier_strerror(rc));
		goto out;
	}
	while (off < size) {
		size_t want_len = size - off < FSCK_READ_BUF ? (size_t)(size - off) : FSCK_READ_BUF;
		ssize_t n = codec_dec_read(dec, c->buf, want_len);

		if (n == KVTIER_E_CORRUPT) {
			fsck_problem(c, "blob %s: %s %s/%s does not read back as %" PRIu64 " bytes "
					"of %s: the bytes are damaged", hex, fsck_part_label(part),
				     t->path, name, size, codec_name(codec));
			goto out;
		}
		if (n < 0) {
			fsck_problem(c, "blob %s: reading %s/%s failed at byte %" PRIu64 ": %s",
				     hex, t->path, name, off, kvtier_strerror((int)n));
			goto out;
		}
		if (n == 0) { /* the decoder says the part is whole: it is not */
			fsck_problem(c, "blob %s: %s/%s ended at byte %" PRIu64 " while reading it",
				     hex, t->path, name, off);
			goto out;
		}
		crc = crc32c(crc, c->buf, (size_t)n);
		off += (uint64_t)n;
	}
	if (crc != want)
		fsck_problem(c, "blob %s: %s %s/%s fails its checksum (CRC-32C %08" PRIx32
				", the index says %08" PRIx32 "): the bytes are damaged",
			     hex, fsck_part_label(part), t->path, name, crc, want);
out:
	codec_dec_free(dec);
	if (fd >= 0)
		close(fd);
}

static void fsck_blob(struct fsck *c, const struct blob_meta *m)
{
	char hex[KEY_HEX_LEN + 1], name[KEY_HEX_LEN + 32];
	const struct fsck_tier *t;
	uint64_t sum_meta = 0, sum_files = 0;
	int files_ok = 1;

	c->blobs++;
	key_hex(&m->id, hex);
	if (m->rec_version < 1 || m->rec_version > BLOB_REC_VERSION)
		fsck_problem(c, "blob %s: record version %" PRIu32 ", this fsck knows 1 to %d", hex,
			     m->rec_version, BLOB_REC_VERSION);
	if (m->compression > CODEC_LZ4_SHUFFLE)
		fsck_problem(c, "blob %s: unknown compression %" PRIu32, hex, m->compression);
	if (m->parts & ~((1u << PART_COUNT) - 1))
		fsck_problem(c, "blob %s: unknown parts recorded (mask 0x%" PRIx32 ")", hex,
			     m->parts);
	if (!(m->parts & (1u << PART_MAIN)))
		fsck_problem(c, "blob %s: has no main part", hex);
	for (int p = 0; p < PART_COUNT; p++)
		if (m->parts & (1u << p))
			sum_meta += m->part_stored[p];
	if (m->stored_size != sum_meta)
		fsck_problem(c, "blob %s: stored size %" PRIu64 " is not the sum of its parts (%"
				PRIu64 ")", hex, m->stored_size, sum_meta);
	if (!c->have_tiers)
		return;
	if (m->tier >= FSCK_MAX_TIERS || !c->tiers[m->tier].listed) {
		fsck_problem(c, "blob %s: recorded on tier %" PRIu32 ", which is not in the tier "
				"list", hex, m->tier);
		return;
	}
	t = &c->tiers[m->tier];
	for (int p = 0; p < PART_COUNT; p++) {
		struct stat st;

		if (!(m->parts & (1u << p)))
			continue;
		snprintf(name, sizeof(name), "%s%s", hex, blob_part_suffix[p]);
		c->files++;
		if (t->dirfd < 0) {
			fsck_problem(c, "blob %s: %s %s/%s is missing (no tier directory)", hex,
				     fsck_part_label(p), t->path, name);
			files_ok = 0;
			continue;
		}
		if (fstatat(t->dirfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
			int e = errno;
			fsck_problem(c, "blob %s: %s %s/%s %s", hex, fsck_part_label(p), t->path,
				     name, e == ENOENT ? "is missing" : strerror(e));
			files_ok = 0;
			continue;
		}
		if (!S_ISREG(st.st_mode)) {
			fsck_problem(c, "blob %s: %s %s/%s is %s, not a regular file", hex,
				     fsck_part_label(p), t->path, name,
				     S_ISLNK(st.st_mode) ? "a symlink" : "something else");
			files_ok = 0;
			continue;
		}
		sum_files += (uint64_t)st.st_size;
		if (st.st_uid != t->owner || (st.st_mode & (S_IWGRP | S_IWOTH)))
			fsck_problem(c, "blob %s: %s %s/%s is owned by uid %u with mode %04o: "
				     "another user than the tier directory's owner (uid %u) can "
				     "change the stored bytes (an Adopt by an older kvtierd keeps "
				     "llama-server's inode as it was); Stage copies such a file "
				     "instead of linking it: to close it, chown %u and chmod 0440 it",
				     hex, fsck_part_label(p), t->path, name, (unsigned)st.st_uid,
				     (unsigned)(st.st_mode & 07777), (unsigned)t->owner,
				     (unsigned)t->owner);
		if ((uint64_t)st.st_size != m->part_stored[p]) {
			fsck_problem(c, "blob %s: %s %s/%s has %lld bytes, the index says %" PRIu64,
				     hex, fsck_part_label(p), t->path, name, (long long)st.st_size,
				     m->part_stored[p]);
			continue;
		}
		if (c->verify)
			fsck_verify_part(c, t, name, hex, p, m->part_size[p], m->part_crc[p],
					 (int)m->compression);
	}
	if (files_ok && sum_files != m->stored_size)
		fsck_problem(c, "blob %s: its files hold %" PRIu64 " bytes, the index says %" PRIu64
				" stored", hex, sum_files, m->stored_size);
}

static int fsck_collect(void *ctx, const struct blob_meta *m, const char *ns)
{
	struct fsck *c = ctx;

	c->batch[c->n_batch++] = *m;
	return 0;
}

static int fsck_blobs(struct fsck *c)
{
	struct key last;
	int more = 0, first = 1, rc;

	do {
		c->n_batch = 0;
		more = 0;
		rc = index_list(c->ix, NULL, first ? NULL : &last, FSCK_BATCH, fsck_collect, c,
				&more);
		if (rc) {
			fprintf(c->out, "fsck: reading the blobs from the index failed: %s\n",
				kvtier_strerror(rc));
			goto out;
		}
		for (size_t i = 0; i < c->n_batch; i++)
			fsck_blob(c, &c->batch[i]);
		if (c->n_batch)
			last = c->batch[c->n_batch - 1].id;
		first = 0;
	} while (more && c->n_batch > 0);
	rc = 0;
out:
	return rc;
}

/* Is name "<64 lowercase hex><known suffix>"? Returns the part, else -1. */
static int fsck_parse_part_name(const char *name, struct key *id)
{
	char hex[KEY_HEX_LEN + 1];
	int part;

	for (int i = 0; i < KEY_HEX_LEN; i++)
		if (!((name[i] >= '0' && name[i] <= '9') || (name[i] >= 'a' && name[i] <= 'f')))
			return -1;
	part = blob_part_from_suffix(name + KEY_HEX_LEN);
	if (part < 0)
		return -1;
	memcpy(hex, name, KEY_HEX_LEN);
	hex[KEY_HEX_LEN] = '\0';
	if (key_from_hex(hex, id) != 0)
		return -1;
	return part;
}

/* Checks one directory entry; the files blobs record were checked already.
 * Returns 0 or an index error (the check cannot go on). */
static int fsck_entry(struct fsck *c, unsigned tier, const char *name)
{
	const struct fsck_tier *t = &c->tiers[tier];
	char why[160];
	struct blob_meta m;
	struct stat st;
	struct key id;
	const char *what;
	int part, rc = 0;

	if (strncmp(name, TIER_TMP_PREFIX, strlen(TIER_TMP_PREFIX)) == 0) {
		c->files++;
		fsck_problem(c, "tier %u: leftover temporary %s/%s (a write in progress, or left "
				"by a crash; kvtierd removes it at start)", tier, t->path, name);
		goto out;
	}
	part = fsck_parse_part_name(name, &id);
	if (part < 0) {
		snprintf(why, sizeof(why), "not a blob file name");
	} else {
		rc = index_get(c->ix, &id, &m, NULL, 0);
		if (rc == KVTIER_E_NOTFOUND) {
			snprintf(why, sizeof(why), "no blob with this id in the index");
			rc = 0;
		} else if (rc) {
			fprintf(c->out, "fsck: reading blob %.64s from the index failed: %s\n", name,
				kvtier_strerror(rc));
			goto out;
		} else if (m.tier != tier) {
			snprintf(why, sizeof(why), "its blob is recorded on tier %" PRIu32, m.tier);
		} else if (!(m.parts & (1u << part))) {
			snprintf(why, sizeof(why), "its blob records no %s", fsck_part_label(part));
		} else {
			goto out; /* a part of a blob: checked from the blob's side */
		}
	}
	if (fstatat(t->dirfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
		if (errno == ENOENT)
			goto out; /* gone meanwhile (kvtierd is running) */
		what = "entry";
	} else if (S_ISLNK(st.st_mode)) {
		what = "symlink";
	} else if (!S_ISREG(st.st_mode)) {
		what = "non-regular file";
	} else {
		what = "file";
	}
	c->files++;
	fsck_problem(c, "tier %u: orphan %s %s/%s: %s", tier, what, t->path, name, why);
out:
	return rc;
}

static int fsck_scan_tier(struct fsck *c, unsigned tier)
{
	const struct fsck_tier *t = &c->tiers[tier];
	struct dirent *de;
	DIR *dir = NULL;
	int fd, rc = 0;

	fd = openat(t->dirfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd >= 0)
		dir = fdopendir(fd);
	if (!dir) {
		rc = -errno;
		fprintf(c->out, "fsck: cannot list tier %u directory %s: %s\n", tier, t->path,
			strerror(-rc));
		if (fd >= 0)
			close(fd);
		goto out;
	}
	for (;;) {
		errno = 0;
		de = readdir(dir);
		if (!de) {
			if (errno) {
				rc = -errno;
				fprintf(c->out, "fsck: listing tier %u directory %s failed: %s\n",
					tier, t->path, strerror(-rc));
			}
			break;
		}
		if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
			continue;
		rc = fsck_entry(c, tier, de->d_name);
		if (rc)
			break;
	}
	closedir(dir);
out:
	return rc;
}

static void fsck_index_report(void *ctx, const char *problem)
{
	fsck_problem(ctx, "index: %s", problem);
}

int fsck_run(const char *data_dir, int verify_bytes, FILE *out, unsigned long *problems)
{
	struct fsck c;
	char err[512] = "";
	int rc;

	memset(&c, 0, sizeof(c));
	c.out = out;
	c.verify = verify_bytes;
	for (unsigned t = 0; t < FSCK_MAX_TIERS; t++)
		c.tiers[t].dirfd = -1;
	if (problems)
		*problems = 0;

	rc = index_open(data_dir, 0, 1, 0, &c.ix, err, sizeof(err));
	if (rc) {
		fprintf(out, "fsck: cannot open index in %s: %s\n", data_dir,
			err[0] ? err : kvtier_strerror(rc));
		c.ix = NULL;
		goto out;
	}
	c.batch = malloc(FSCK_BATCH * sizeof(*c.batch));
	c.buf = verify_bytes ? malloc(FSCK_READ_BUF) : NULL;
	if (!c.batch || (verify_bytes && !c.buf)) {
		rc = -ENOMEM;
		fprintf(out, "fsck: out of memory\n");
		goto out;
	}
	rc = fsck_load_tiers(&c);
	if (rc)
		goto out;
	rc = fsck_blobs(&c);
	if (rc)
		goto out;
	for (unsigned t = 0; t < FSCK_MAX_TIERS; t++) {
		if (!c.tiers[t].listed || c.tiers[t].dirfd < 0)
			continue;
		rc = fsck_scan_tier(&c, t);
		if (rc)
			goto out;
	}
	rc = index_check(c.ix, fsck_index_report, &c);
	if (rc < 0) {
		fprintf(out, "fsck: checking the index failed: %s\n", kvtier_strerror(rc));
		goto out;
	}
	fprintf(out, "fsck: %lu blobs, %lu files checked, %lu problems\n", c.blobs, c.files,
		c.problems);
	rc = 0;
out:
	if (problems)
		*problems = c.problems;
	for (unsigned t = 0; t < FSCK_MAX_TIERS; t++) {
		if (c.tiers[t].dirfd >= 0)
			close(c.tiers[t].dirfd);
		free(c.tiers[t].path);
	}
	free(c.buf);
	free(c.batch);
	if (c.ix)
		index_close(c.ix);
	return rc;
}
