/* fuzz_slotfile.c: libFuzzer target for the slot file parser (common/slotfile.c).
 *
 * Every input is parsed as a whole slot file, then once more in one of the
 * ways a caller can drive the parser, picked by the input (the reliability
 * review's harness, kept here):
 *  - without a token array, and with a 4-byte error buffer: the same verdict;
 *  - with the file size claimed 1000 bytes larger than the bytes there (the
 *    read callback answers -ENODATA past the real end, as pread's loop does);
 *  - with a read callback that fails with -EIO at one read (which one is
 *    taken from the input), so the read-error paths run;
 *  - slot_check_header() on the first 12 bytes, slot_layout_describe() on
 *    the signature (into a roomy and a tiny buffer), slot_prefix_restorable().
 * The parser's contract (slotfile.h) is asserted after each call: on success
 * n_tokens > 0, the counts nest, the tokens are all >= 0, the signature has
 * a length in 1..SLOT_LAYOUT_MAX; on failure no token array, a NUL-terminated
 * non-empty reason, and a KVTIER_E_INVALID or negative errno code. A broken
 * contract abort()s, which libFuzzer reports as a crash, like ASan and UBSan
 * findings (built with -fno-sanitize-recover).
 *
 * KVTIER_FUZZ_SEEDS=DIR writes a few small seed files into DIR and exits
 * (scripts/fuzz adds them to the fixtures). fuzz_canary.h plants a one-byte
 * heap overflow (KVTIER_FUZZ_CANARY=1) that
 * scripts/fuzz triggers first, to prove that a crash fails the run (a fuzz
 * test that cannot fail is a defect). Build and run: scripts/fuzz slotfile.
 */
#include "slotfile.h"
#include "kvtier.h"
#include "fuzz_canary.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct fuzz_src {
	const uint8_t *p;
	size_t len;       /* bytes that exist; the parser may be told more */
	unsigned fail_at; /* > 0: that read (1-based) returns -EIO */
	unsigned calls;
};

static int fuzz_read(void *ctx, void *buf, size_t len, uint64_t off)
{
	struct fuzz_src *s = ctx;

	s->calls++;
	if (s->fail_at && s->calls == s->fail_at)
		return -EIO;
	if (off > s->len || len > s->len - off)
		return -ENODATA;
	memcpy(buf, s->p + off, len);
	return 0;
}

static void broken(const char *what, const uint8_t *data, size_t size, int rc, const char *err)
{
	fprintf(stderr, "fuzz_slotfile: contract broken: %s (input %zu bytes, rc %d, err \"%s\")\n",
		what, size, rc, err ? err : "");
	abort();
}

#define EXPECT(cond, what)                                                                 \
	do {                                                                                \
		if (!(cond))                                                                \
			broken(what, data, size, rc, err);                                  \
	} while (0)

/* The contract of one slot_parse() call (slotfile.h). */
static void check_parse(const uint8_t *data, size_t size, uint64_t claimed, int rc,
			const struct slot_info *info, const int32_t *tokens, int want_tokens,
			const char *err, size_t errlen)
{
	uint32_t i;

	EXPECT(rc == 0 || rc == KVTIER_E_INVALID || (rc < 0 && rc > -4096),
	       "return code is 0, KVTIER_E_INVALID or a negative errno");
	EXPECT(memchr(err, '\0', errlen) != NULL, "error buffer NUL-terminated");
	if (rc) {
		EXPECT(tokens == NULL, "no token array after a failure");
		EXPECT(errlen < 2 || err[0] != '\0', "a failure says why");
		return;
	}
	EXPECT(info->file_size == claimed, "file_size as given");
	EXPECT(info->n_tokens > 0, "n_tokens > 0 on success");
	EXPECT(info->n_tokens <= info->n_tokens_all, "n_tokens <= n_tokens_all");
	EXPECT(info->n_tokens_all <= info->n_words, "n_tokens_all <= n_words");
	EXPECT(info->n_words <= SLOT_MAX_TOKENS, "n_words within SLOT_MAX_TOKENS");
	EXPECT(info->state_offset == SLOT_HEADER_BYTES + 4ull * info->n_words,
	       "state_offset == 12 + 4 * n_words");
	EXPECT(info->state_offset <= claimed, "state_offset inside the file");
	EXPECT(info->version >= 2 && info->version <= 4, "version 2, 3 or 4");
	EXPECT(info->token_form <= SLOT_TOKENS_PACKED, "token form known");
	EXPECT(info->state_kind <= SLOT_STATE_HYBRID, "state kind known");
	EXPECT(info->n_sections <= SLOT_MAX_SECTIONS, "n_sections <= SLOT_MAX_SECTIONS");
	EXPECT(info->has_layout, "a layout signature on success");
	EXPECT(info->layout_len > 0 && info->layout_len <= SLOT_LAYOUT_MAX,
	       "layout_len in 1..SLOT_LAYOUT_MAX");
	EXPECT(slot_layout_is_opaque(info->layout, info->layout_len) ==
		       (info->state_kind == SLOT_STATE_OPAQUE),
	       "an opaque signature exactly for an opaque state");
	EXPECT(want_tokens == (tokens != NULL), "token array exactly when asked for");
	for (i = 0; tokens && i < info->n_tokens; i++)
		EXPECT(tokens[i] >= 0, "indexed tokens are >= 0");
}

/* slot_parse() through fuzz_read, checked; returns rc, fills *info and, when
 * reads is not NULL, the number of reads it made. */
static int parse(const uint8_t *data, size_t size, uint64_t claimed, unsigned fail_at,
		 struct slot_info *info, int want_tokens, char *err, size_t errlen,
		 unsigned *reads)
{
	struct fuzz_src s = { data, size, fail_at, 0 };
	int32_t *tokens = NULL;
	int rc;

	memset(err, 'x', errlen); /* the parser must terminate what it writes */
	rc = slot_parse(fuzz_read, &s, claimed, info, want_tokens ? &tokens : NULL, err, errlen);
	check_parse(data, size, claimed, rc, info, tokens, want_tokens, err, errlen);
	if (reads)
		*reads = s.calls;
	if (tokens && rc == 0 && info->n_tokens) /* ASan: the array holds n_tokens ids */
		(void)*(volatile int32_t *)&tokens[info->n_tokens - 1];
	free(tokens);
	return rc;
}

static void check_layout_describe(const struct slot_info *info)
{
	char big[512], tiny[7];

	slot_layout_describe(info->layout, info->layout_len, big, sizeof(big));
	if (memchr(big, '\0', sizeof(big)) == NULL)
		abort();
	slot_layout_describe(info->layout, info->layout_len, tiny, sizeof(tiny));
	if (memchr(tiny, '\0', sizeof(tiny)) == NULL)
		abort();
	if (slot_state_kind_name(info->state_kind) == NULL)
		abort();
	(void)slot_prefix_restorable(info);
}

/* ---- small seeds (KVTIER_FUZZ_SEEDS=DIR) ----
 * The fixtures are real but 20-130 KB: mutations spread thin over them. A
 * few files of tens of bytes (plain and packed token payloads, media, an
 * opaque state, the early-2025 KV layout) let the header and token payload
 * paths be explored in a short run too. */

struct seed {
	uint8_t b[256];
	size_t n;
};

static void seed_u32(struct seed *s, uint32_t v)
{
	s->b[s->n++] = (uint8_t)v;
	s->b[s->n++] = (uint8_t)(v >> 8);
	s->b[s->n++] = (uint8_t)(v >> 16);
	s->b[s->n++] = (uint8_t)(v >> 24);
}

static void seed_u64(struct seed *s, uint64_t v)
{
	seed_u32(s, (uint32_t)v);
	seed_u32(s, (uint32_t)(v >> 32));
}

static void seed_save(const char *dir, const char *name, const struct seed *s)
{
	char path[4096];
	FILE *f;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	f = fopen(path, "wb");
	if (!f || fwrite(s->b, 1, s->n, f) != s->n || fclose(f) != 0) {
		fprintf(stderr, "fuzz_slotfile: cannot write seed %s\n", path);
		exit(1);
	}
}

/* The early-2025 KV state of n cells, 1 layer, f16 rows of 4 bytes. */
static void seed_kv2025(struct seed *s, uint32_t n)
{
	uint32_t i;

	seed_u32(s, n);
	for (i = 0; i < n; i++) {
		seed_u32(s, i); /* pos */
		seed_u32(s, 1); /* n_seq_id */
		seed_u32(s, 0); /* seq id */
	}
	seed_u32(s, 0); /* v_trans */
	seed_u32(s, 1); /* n_layer */
	seed_u32(s, 1); /* K: type f16 */
	seed_u64(s, 4);
	for (i = 0; i < 4 * n; i++)
		s->b[s->n++] = (uint8_t)(i * 7);
	seed_u32(s, 1); /* V */
	seed_u64(s, 4);
	for (i = 0; i < 4 * n; i++)
		s->b[s->n++] = (uint8_t)(i * 11);
}

static void write_seeds(const char *dir)
{
	struct seed s;

	s.n = 0; /* plain tokens, opaque state */
	seed_u32(&s, SLOT_MAGIC), seed_u32(&s, 2), seed_u32(&s, 3);
	seed_u32(&s, 10), seed_u32(&s, 11), seed_u32(&s, 12), seed_u32(&s, 0xabababab);
	seed_save(dir, "tiny-plain-opaque", &s);

	s.n = 0; /* plain tokens, the early-2025 KV layout */
	seed_u32(&s, SLOT_MAGIC), seed_u32(&s, 2), seed_u32(&s, 2);
	seed_u32(&s, 10), seed_u32(&s, 11);
	seed_kv2025(&s, 2);
	seed_save(dir, "tiny-plain-kv2025", &s);

	s.n = 0; /* packed, no media */
	seed_u32(&s, SLOT_MAGIC), seed_u32(&s, 2), seed_u32(&s, 6);
	seed_u32(&s, (uint32_t)-1), seed_u32(&s, 1), seed_u32(&s, 2);
	seed_u32(&s, 10), seed_u32(&s, 11), seed_u32(&s, 0);
	seed_kv2025(&s, 2);
	seed_save(dir, "tiny-packed", &s);

	s.n = 0; /* packed, one media chunk of 5 bytes at position 1 */
	seed_u32(&s, SLOT_MAGIC), seed_u32(&s, 2), seed_u32(&s, 11);
	seed_u32(&s, (uint32_t)-1), seed_u32(&s, 1), seed_u32(&s, 3);
	seed_u32(&s, 10), seed_u32(&s, (uint32_t)-1), seed_u32(&s, 12);
	seed_u32(&s, 1), seed_u32(&s, 1); /* one key: position 1 */
	seed_u32(&s, 5);
	memcpy(s.b + s.n, "media\0\0\0", 8), s.n += 8; /* 5 bytes + zero padding */
	seed_u32(&s, 0xabababab);
	seed_save(dir, "tiny-packed-media", &s);

	s.n = 0; /* the header only */
	seed_u32(&s, SLOT_MAGIC), seed_u32(&s, 4), seed_u32(&s, 0);
	seed_save(dir, "tiny-empty-v4", &s);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
	const char *dir = getenv("KVTIER_FUZZ_SEEDS");

	fuzz_canary_init();
	if (dir && *dir) {
		write_seeds(dir);
		exit(0);
	}
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct slot_info info, again;
	char err[256], small[4];
	unsigned calls, fail_at;
	int rc, rc2;

	if (fuzz_canary(data, size))
		return 0;
	rc = parse(data, size, size, 0, &info, 1, err, sizeof(err), &calls);
	if (rc == 0)
		check_layout_describe(&info);

	/* The header check agrees with the whole parse on a file it accepts. */
	if (size >= SLOT_HEADER_BYTES) {
		struct slot_info h;
		char herr[128];
		int hrc = slot_check_header(data, size, &h, herr, sizeof(herr));
		if (rc == 0 && (hrc != 0 || h.n_words != info.n_words || h.version != info.version))
			broken("slot_check_header accepts what slot_parse accepts", data, size, hrc,
			       herr);
	}

	/* One second parse, picked by the input (each costs as much as the first;
	 * over a run every input shape meets all three). */
	switch (size ? (data[size / 2] ^ (uint8_t)size) % 3 : 0) {
	case 0: /* without the token array, with a 4-byte reason: the same verdict */
		rc2 = parse(data, size, size, 0, &again, 0, small, sizeof(small), NULL);
		if (rc2 != rc)
			broken("same verdict with and without tokens / a small error buffer", data,
			       size, rc2, err);
		if (rc == 0 &&
		    (again.n_tokens != info.n_tokens || again.layout_len != info.layout_len ||
		     memcmp(again.layout, info.layout, info.layout_len) != 0))
			broken("same tokens and signature without the token array", data, size, rc,
			       err);
		break;
	case 1: /* claimed longer than it is: reads past the real end fail as pread's
		 * would (row data is stepped over, not read, so it may still parse) */
		(void)parse(data, size, (uint64_t)size + 1000, 0, &again, 1, err, sizeof(err),
			    NULL);
		break;
	default: /* a read error at one of the reads the first parse made */
		if (!calls)
			break;
		fail_at = 1 + (unsigned)((data[size / 3] + size) % calls);
		rc2 = parse(data, size, size, fail_at, &again, 1, err, sizeof(err), NULL);
		if (rc2 == 0)
			broken("a failed read must fail the parse", data, size, rc2, err);
		break;
	}
	return 0;
}
