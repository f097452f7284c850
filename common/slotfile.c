/* slotfile.c: parsing llama-server slot file headers; see slotfile.h.
 *
 * The parser walks a slot file through a read callback: the fixed header, the
 * token array and, for version 2, the small per-cell and per-layer fields of
 * the KV state, each read at an offset computed from the sizes before it. It
 * never reads K/V row data (it steps over it by arithmetic), checks every size
 * with overflow-checked 64-bit arithmetic against the file size before reading
 * anything, and allocates nothing but the token array it hands back (plus a
 * digest context for the rare model whose layers differ in shape). The cell
 * table is read through a 4 KiB read-ahead on the stack.
 *
 * Layout signature (struct slot_info.layout), all integers little-endian:
 *
 *   [0]      u8  format (1)
 *   [1]      u8  flags: 1 = K entries differ across layers, 2 = V entries do
 *   [2..6)   u32 n_layer
 *   [6..10)  u32 v_trans
 *   [10..22) K entry of layer 0: i32 k_type, u64 k_row_bytes
 *   [22..34) V entry of layer 0: i32 v_type, u64 v_row_bytes (v_trans 0)
 *            or i32 v_type, u32 v_size_el, u32 n_embd_v_gqa (v_trans 1)
 *   [34..64) only when flags != 0: the first 30 bytes of
 *            SHA-256(bytes [0..34) || every K entry || every V entry)
 *
 * The entries are the 12 bytes exactly as the file stores them (the file is
 * little-endian too), so the signature depends on nothing but the KV shape:
 * not on the token or cell count, not on the host. layout_len is 34 or 64 and
 * the rest of layout[] is zero, so comparing layout_len and the bytes, or all
 * SLOT_LAYOUT_MAX bytes, gives the same answer.
 */
#include "slotfile.h"
#include "kvtier.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/evp.h>

#define SLOT_HEADER_BYTES 12u
#define SLOT_MAX_SEQ_ID 256u
#define SLOT_ENTRY_BYTES 12u    /* one per-layer K or V header */
#define SLOT_CELL_BUF 4096u     /* read-ahead over the cell table */

#define LAYOUT_FORMAT 1
#define LAYOUT_FIXED 34
#define LAYOUT_K_MIXED 0x01
#define LAYOUT_V_MIXED 0x02

/* One parse: the source and where to put the error message. */
struct slot_parser {
	slot_read_fn rd;
	void *ctx;
	uint64_t size;
	char *err;
	size_t errlen;
};

/* Read-ahead over the variable-length cell table, so a 32K-cell state costs
 * a few dozen reads instead of one per cell. */
struct slot_cursor {
	uint64_t base;               /* file offset of buf[0] */
	size_t len;                  /* valid bytes in buf */
	uint8_t buf[SLOT_CELL_BUF];
};

static uint32_t get_le32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get_le64(const uint8_t *p)
{
	return (uint64_t)get_le32(p) | (uint64_t)get_le32(p + 4) << 32;
}

static void put_le32(uint8_t *p, uint32_t v)
{
	p[0] = (uint8_t)v;
	p[1] = (uint8_t)(v >> 8);
	p[2] = (uint8_t)(v >> 16);
	p[3] = (uint8_t)(v >> 24);
}

__attribute__((format(printf, 3, 4))) static int slot_fail(struct slot_parser *p, int rc,
							    const char *fmt, ...)
{
	va_list ap;

	if (p->err && p->errlen) {
		va_start(ap, fmt);
		vsnprintf(p->err, p->errlen, fmt, ap);
		va_end(ap);
	}
	return rc;
}

/* Reads len bytes at off, after checking they lie inside the file. */
static int slot_read(struct slot_parser *p, void *buf, size_t len, uint64_t off, const char *what)
{
	uint64_t end;
	int rc;

	if (__builtin_add_overflow(off, (uint64_t)len, &end) || end > p->size)
		return slot_fail(p, KVTIER_E_INVALID,
				 "truncated: %s needs %zu bytes at offset %" PRIu64
				 ", file is %" PRIu64 " bytes",
				 what, len, off, p->size);
	rc = p->rd(p->ctx, buf, len, off);
	if (rc > 0)
		rc = -EIO; /* the callback broke its contract */
	if (rc < 0)
		return slot_fail(p, rc, "read error: %s at offset %" PRIu64 ": %s", what, off,
				 kvtier_strerror(rc));
	return 0;
}

/* Copies n (<= 16) bytes at off out of the read-ahead, refilling it as needed. */
static int slot_cursor_get(struct slot_parser *p, struct slot_cursor *c, uint64_t off, void *out,
			   size_t n, const char *what)
{
	uint64_t end;
	size_t want;
	int rc;

	if (off >= c->base && off - c->base <= c->len && c->len - (off - c->base) >= n) {
		memcpy(out, c->buf + (off - c->base), n);
		return 0;
	}
	c->len = 0;
	if (__builtin_add_overflow(off, (uint64_t)n, &end) || end > p->size)
		return slot_read(p, out, n, off, what); /* reports the truncation */
	want = sizeof(c->buf);
	if (p->size - off < want)
		want = (size_t)(p->size - off);
	rc = slot_read(p, c->buf, want, off, what);
	if (rc < 0)
		return rc;
	c->base = off;
	c->len = want;
	memcpy(out, c->buf, n);
	return 0;
}

/* Walks the n_layer K (side 'K') or V (side 'V') entries starting at *offp,
 * stepping over each layer's rows. Sets *offp to the end of the part, copies
 * layer 0's entry to first, sets *mixed when a later entry differs from it,
 * and feeds every entry to md when md is not NULL. */
static int slot_walk_layers(struct slot_parser *p, uint64_t *offp, uint32_t n_cells,
			    uint32_t n_layer, uint32_t v_trans, char side,
			    uint8_t first[SLOT_ENTRY_BYTES], int *mixed, EVP_MD_CTX *md)
{
	uint8_t e[SLOT_ENTRY_BYTES];
	uint64_t off = *offp, row, bytes;
	char what[48];
	uint32_t l;
	int rc;

	*mixed = 0;
	for (l = 0; l < n_layer; l++) {
		snprintf(what, sizeof(what), "layer %" PRIu32 " %c header", l, side);
		rc = slot_read(p, e, sizeof(e), off, what);
		if (rc < 0)
			return rc;
		off += sizeof(e);
		if (side == 'K' || v_trans == 0)
			row = get_le64(e + 4);
		else
			row = (uint64_t)get_le32(e + 4) * get_le32(e + 8); /* el size x n_embd */
		if (__builtin_mul_overflow(row, (uint64_t)n_cells, &bytes) ||
		    __builtin_add_overflow(off, bytes, &off))
			return slot_fail(p, KVTIER_E_INVALID,
					 "malformed state: layer %" PRIu32
					 " %c data size overflows (%" PRIu32 " cells x %" PRIu64
					 " bytes)",
					 l, side, n_cells, row);
		if (off > p->size)
			return slot_fail(p, KVTIER_E_INVALID,
					 "truncated: layer %" PRIu32 " %c data ends at %" PRIu64
					 ", file is %" PRIu64 " bytes",
					 l, side, off, p->size);
		if (l == 0)
			memcpy(first, e, sizeof(e));
		else if (memcmp(first, e, sizeof(e)) != 0)
			*mixed = 1;
		if (md && !EVP_DigestUpdate(md, e, sizeof(e)))
			return slot_fail(p, -ENOMEM, "layout digest failed");
	}
	*offp = off;
	return 0;
}

/* Digest of every layer entry, for layouts whose layers differ. */
static int slot_layout_digest(struct slot_parser *p, uint64_t k_off, uint32_t n_cells,
			      uint32_t n_layer, uint32_t v_trans, struct slot_info *info)
{
	uint8_t first[SLOT_ENTRY_BYTES], md_out[EVP_MAX_MD_SIZE];
	EVP_MD_CTX *md = EVP_MD_CTX_new();
	unsigned int md_len = 0;
	uint64_t off = k_off;
	int mixed, rc;

	if (!md)
		return slot_fail(p, -ENOMEM, "out of memory for the layout digest");
	if (!EVP_DigestInit_ex(md, EVP_sha256(), NULL) ||
	    !EVP_DigestUpdate(md, info->layout, LAYOUT_FIXED)) {
		rc = slot_fail(p, -ENOMEM, "layout digest failed");
		goto out;
	}
	rc = slot_walk_layers(p, &off, n_cells, n_layer, v_trans, 'K', first, &mixed, md);
	if (rc < 0)
		goto out;
	rc = slot_walk_layers(p, &off, n_cells, n_layer, v_trans, 'V', first, &mixed, md);
	if (rc < 0)
		goto out;
	if (!EVP_DigestFinal_ex(md, md_out, &md_len) || md_len < SLOT_LAYOUT_MAX - LAYOUT_FIXED) {
		rc = slot_fail(p, -ENOMEM, "layout digest failed");
		goto out;
	}
	memcpy(info->layout + LAYOUT_FIXED, md_out, SLOT_LAYOUT_MAX - LAYOUT_FIXED);
	info->layout_len = SLOT_LAYOUT_MAX;
out:
	EVP_MD_CTX_free(md);
	return rc;
}

/* Parses the version 2 state at info->state_offset: checks that it ends
 * exactly at the end of the file and fills the layout fields of info. */
static int slot_parse_v2_state(struct slot_parser *p, struct slot_info *info)
{
	struct slot_cursor c = { 0, 0, { 0 } };
	uint8_t b[8], k_first[SLOT_ENTRY_BYTES], v_first[SLOT_ENTRY_BYTES];
	uint64_t off = info->state_offset, k_off;
	uint32_t n_cells, n_seq, v_trans, n_layer, i;
	int k_mixed, v_mixed, rc;

	rc = slot_read(p, b, 4, off, "the state's cell count");
	if (rc < 0)
		return rc;
	off += 4;
	n_cells = get_le32(b);
	if (n_cells > SLOT_MAX_TOKENS) {
		rc = slot_fail(p, KVTIER_E_INVALID,
			       "malformed state: %" PRIu32 " cells, the limit is %u", n_cells,
			       SLOT_MAX_TOKENS);
		return rc;
	}
	for (i = 0; i < n_cells; i++) {
		rc = slot_cursor_get(p, &c, off, b, 8, "the cell table");
		if (rc < 0)
			return rc;
		n_seq = get_le32(b + 4);
		if (n_seq > SLOT_MAX_SEQ_ID) {
			rc = slot_fail(p, KVTIER_E_INVALID,
				       "malformed state: cell %" PRIu32 " has %" PRIu32
				       " sequence ids, the limit is %u",
				       i, n_seq, SLOT_MAX_SEQ_ID);
			return rc;
		}
		if (__builtin_add_overflow(off, 8 + 4 * (uint64_t)n_seq, &off)) {
			rc = slot_fail(p, KVTIER_E_INVALID,
				       "malformed state: cell table overflows");
			return rc;
		}
	}
	rc = slot_cursor_get(p, &c, off, b, 8, "v_trans and n_layer");
	if (rc < 0)
		return rc;
	off += 8;
	v_trans = get_le32(b);
	n_layer = get_le32(b + 4);
	if (v_trans > 1) {
		rc = slot_fail(p, KVTIER_E_INVALID, "malformed state: v_trans is %" PRIu32
			       ", expected 0 or 1", v_trans);
		return rc;
	}
	if (n_layer < 1 || n_layer > SLOT_MAX_LAYERS) {
		rc = slot_fail(p, KVTIER_E_INVALID,
			       "malformed state: n_layer is %" PRIu32 ", expected 1..%u", n_layer,
			       SLOT_MAX_LAYERS);
		return rc;
	}

	k_off = off;
	rc = slot_walk_layers(p, &off, n_cells, n_layer, v_trans, 'K', k_first, &k_mixed, NULL);
	if (rc < 0)
		return rc;
	rc = slot_walk_layers(p, &off, n_cells, n_layer, v_trans, 'V', v_first, &v_mixed, NULL);
	if (rc < 0)
		return rc;
	if (off != p->size) {
		rc = slot_fail(p, KVTIER_E_INVALID,
			       "malformed state: %" PRIu64 " trailing bytes (the state ends at %"
			       PRIu64 ", file is %" PRIu64 " bytes)",
			       p->size - off, off, p->size);
		return rc;
	}

	info->has_layout = 1;
	info->n_cells = n_cells;
	info->v_trans = v_trans;
	info->n_layer = n_layer;
	memset(info->layout, 0, sizeof(info->layout));
	info->layout[0] = LAYOUT_FORMAT;
	info->layout[1] =
		(uint8_t)((k_mixed ? LAYOUT_K_MIXED : 0) | (v_mixed ? LAYOUT_V_MIXED : 0));
	put_le32(info->layout + 2, n_layer);
	put_le32(info->layout + 6, v_trans);
	memcpy(info->layout + 10, k_first, SLOT_ENTRY_BYTES);
	memcpy(info->layout + 22, v_first, SLOT_ENTRY_BYTES);
	info->layout_len = LAYOUT_FIXED;
	if (k_mixed || v_mixed)
		return slot_layout_digest(p, k_off, n_cells, n_layer, v_trans, info);
	return 0;
}

int slot_parse(slot_read_fn rd, void *ctx, uint64_t file_size, struct slot_info *info,
	       int32_t **tokens_out, char *err, size_t errlen)
{
	struct slot_parser p = { rd, ctx, file_size, err, errlen };
	uint8_t h[SLOT_HEADER_BYTES];
	int32_t *tokens = NULL;
	uint32_t magic, i;
	size_t have;
	int rc;

	if (tokens_out)
		*tokens_out = NULL;
	if (err && errlen)
		err[0] = '\0';
	memset(info, 0, sizeof(*info));
	info->file_size = file_size;

	/* Magic and version first, so a short non-slot file says what it is. */
	have = file_size < SLOT_HEADER_BYTES ? (size_t)file_size : SLOT_HEADER_BYTES;
	if (have < 4) {
		rc = slot_fail(&p, KVTIER_E_INVALID,
			       "truncated: file is %" PRIu64 " bytes, a slot file header needs %u",
			       file_size, SLOT_HEADER_BYTES);
		goto out;
	}
	rc = slot_read(&p, h, have, 0, "the header");
	if (rc < 0)
		goto out;
	magic = get_le32(h);
	if (magic != SLOT_MAGIC) {
		rc = slot_fail(&p, KVTIER_E_INVALID,
			       "bad magic 0x%08" PRIx32 ", expected 0x%08x (\"qsgg\"): not a "
			       "llama-server slot file",
			       magic, SLOT_MAGIC);
		goto out;
	}
	if (have >= 8) {
		info->version = get_le32(h + 4);
		if (info->version != 2 && info->version != 4) {
			rc = slot_fail(&p, KVTIER_E_INVALID,
				       "unsupported version %" PRIu32 ": kvtier reads version 2 "
				       "(llama.cpp) and 4 (ik_llama.cpp)",
				       info->version);
			goto out;
		}
	}
	if (have < SLOT_HEADER_BYTES) {
		rc = slot_fail(&p, KVTIER_E_INVALID,
			       "truncated: file is %" PRIu64 " bytes, a slot file header needs %u",
			       file_size, SLOT_HEADER_BYTES);
		goto out;
	}
	info->n_tokens = get_le32(h + 8);
	if (info->n_tokens > SLOT_MAX_TOKENS) {
		rc = slot_fail(&p, KVTIER_E_INVALID,
			       "oversized: %" PRIu32 " tokens, the limit is %u", info->n_tokens,
			       SLOT_MAX_TOKENS);
		goto out;
	}
	info->state_offset = SLOT_HEADER_BYTES + 4 * (uint64_t)info->n_tokens;
	if (info->state_offset > file_size) {
		rc = slot_fail(&p, KVTIER_E_INVALID,
			       "truncated: file is %" PRIu64 " bytes, its %" PRIu32
			       " tokens need %" PRIu64,
			       file_size, info->n_tokens, info->state_offset);
		goto out;
	}
	if (info->version == 2) {
		rc = slot_parse_v2_state(&p, info);
		if (rc < 0)
			goto out;
	}
	if (info->n_tokens == 0) {
		rc = slot_fail(&p, KVTIER_E_INVALID,
			       "empty slot file (0 tokens): llama-server crashes restoring such a "
			       "file, so it is refused");
		goto out;
	}

	if (tokens_out) {
		tokens = malloc((size_t)info->n_tokens * sizeof(*tokens));
		if (!tokens) {
			rc = slot_fail(&p, -ENOMEM, "out of memory for %" PRIu32 " tokens",
				       info->n_tokens);
			goto out;
		}
		rc = slot_read(&p, tokens, (size_t)info->n_tokens * sizeof(*tokens),
			       SLOT_HEADER_BYTES, "the token array");
		if (rc < 0)
			goto out;
		for (i = 0; i < info->n_tokens; i++)
			tokens[i] = (int32_t)get_le32((const uint8_t *)&tokens[i]);
		*tokens_out = tokens;
		tokens = NULL;
	}
	rc = 0;
out:
	free(tokens);
	return rc;
}

static int slot_pread(void *ctx, void *buf, size_t len, uint64_t off)
{
	int fd = *(const int *)ctx;
	uint8_t *p = buf;
	ssize_t n;

	while (len) {
		if (off > (uint64_t)INT64_MAX - len)
			return -EOVERFLOW;
		n = pread(fd, p, len, (off_t)off);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -errno;
		}
		if (n == 0)
			return -ENODATA;
		p += n;
		len -= (size_t)n;
		off += (uint64_t)n;
	}
	return 0;
}

int slot_parse_fd(int fd, struct slot_info *info, int32_t **tokens_out, char *err, size_t errlen)
{
	struct stat st;
	int rc;

	if (tokens_out)
		*tokens_out = NULL;
	memset(info, 0, sizeof(*info));
	if (fstat(fd, &st) < 0) {
		rc = -errno;
		if (err && errlen)
			snprintf(err, errlen, "read error: fstat: %s", kvtier_strerror(rc));
		return rc;
	}
	if (!S_ISREG(st.st_mode)) {
		if (err && errlen)
			snprintf(err, errlen, "not a regular file (mode 0%o)",
				 (unsigned)st.st_mode);
		return KVTIER_E_INVALID;
	}
	return slot_parse(slot_pread, &fd, (uint64_t)st.st_size, info, tokens_out, err, errlen);
}

static const char *slot_type_name(int32_t type, char *buf, size_t len)
{
	switch (type) {
	case 0:
		return "f32";
	case 1:
		return "f16";
	case 2:
		return "q4_0";
	case 3:
		return "q4_1";
	case 6:
		return "q5_0";
	case 7:
		return "q5_1";
	case 8:
		return "q8_0";
	case 30:
		return "bf16";
	default:
		snprintf(buf, len, "type%" PRId32, type);
		return buf;
	}
}

char *slot_layout_describe(const uint8_t *layout, size_t len, char *buf, size_t buflen)
{
	char kt[24], vt[24], v[64], mixed[64] = "";
	uint32_t n_layer, v_trans;
	const uint8_t *k_e, *v_e;
	unsigned flags;

	if (!buf || buflen == 0)
		return buf;
	if (!layout || len < LAYOUT_FIXED || layout[0] != LAYOUT_FORMAT ||
	    (layout[1] != 0 && len < SLOT_LAYOUT_MAX)) {
		snprintf(buf, buflen, "unknown layout (%zu bytes)", len);
		return buf;
	}
	flags = layout[1];
	n_layer = get_le32(layout + 2);
	v_trans = get_le32(layout + 6);
	k_e = layout + 10;
	v_e = layout + 22;
	if (v_trans == 0)
		snprintf(v, sizeof(v), "%" PRIu64 "B/row", get_le64(v_e + 4));
	else
		snprintf(v, sizeof(v), "%" PRIu32 "B x %" PRIu32, get_le32(v_e + 4),
			 get_le32(v_e + 8));
	if (flags)
		snprintf(mixed, sizeof(mixed), " mixed=%s digest=%02x%02x%02x%02x%02x%02x%02x%02x",
			 flags == LAYOUT_K_MIXED   ? "k"
			 : flags == LAYOUT_V_MIXED ? "v"
						   : "kv",
			 layout[34], layout[35], layout[36], layout[37], layout[38], layout[39],
			 layout[40], layout[41]);
	snprintf(buf, buflen,
		 "n_layer=%" PRIu32 " v_trans=%" PRIu32 " k=%s %" PRIu64 "B/row v=%s %s%s", n_layer,
		 v_trans, slot_type_name((int32_t)get_le32(k_e), kt, sizeof(kt)), get_le64(k_e + 4),
		 slot_type_name((int32_t)get_le32(v_e), vt, sizeof(vt)), v, mixed);
	return buf;
}
