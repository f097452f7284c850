/* slotfile.c: reading llama-server slot files; see slotfile.h.
 *
 * The parser reads the fixed header and the whole token payload (at most
 * 16 MiB: SLOT_MAX_TOKENS words), then tries the known state layouts one
 * after the other ("plans": a sequence of sections, the last one ending at
 * the end of the file). A section is walked through a read callback: the
 * small per-stream, per-cell and per-layer fields are read, the K/V/R/S row
 * data is stepped over by arithmetic, every size is checked with
 * overflow-checked 64-bit arithmetic against the file size before anything
 * is read, and every value is checked for plausibility (a type id, a row
 * size, a layer count). The cell table is read through a 4 KiB read-ahead.
 *
 * A walk that fails on an implausible value or leaves bytes over means "not
 * this layout": the next plan is tried, and a file no plan fits is opaque.
 * A walk that was plausible all along and ran past the end of the file means
 * the file is truncated: that is refused, since a truncated file of a known
 * layout is certainly wrong (a future layout that appends fields leaves
 * bytes over instead).
 *
 * Layout signatures (struct slot_info.layout), integers little-endian:
 *
 * Format 1: the early 2025 KV layout in a version 2 file (as kvtier 0.2
 * wrote it, so namespaces recorded then still match):
 *   [0]      u8  1
 *   [1]      u8  flags: 1 = K entries differ across layers, 2 = V entries do
 *   [2..6)   u32 n_layer
 *   [6..10)  u32 v_trans
 *   [10..22) K entry of layer 0: i32 k_type, u64 k_row_bytes
 *   [22..34) V entry of layer 0 (i32 type, u64 row bytes; or i32 type, u32
 *            el size, u32 n_embd when v_trans is 1)
 *   [34..64) only when flags != 0: the first 30 bytes of
 *            SHA-256(bytes [0..34) || every K entry || every V entry)
 *   layout_len is 34 or 64.
 *
 * Format 2: every other walked layout:
 *   [0]      u8  2
 *   [1]      u8  header version
 *   [2]      u8  token form
 *   [3]      u8  state kind (enum slot_state_kind)
 *   [4]      u8  n_sections
 *   [5]      u8  flags: 1 = M-RoPE cells, 2 = V-less, 4 = entries differ
 *                across layers, streams or sections, 8 = ik_llama.cpp's
 *                layout (versions 3 and 4: flag words after its KV)
 *   [6..10)  u32 n_stream of section 0
 *   [10..14) u32 n_layer of section 0
 *   [14..18) u32 v_trans (s_trans) of section 0
 *   [18..30) first K (R) entry of section 0
 *   [30..42) first V (S) entry of section 0, zero when V-less
 *   [42..64) the first 22 bytes of SHA-256(bytes [0..42) || per section:
 *            kind, cell_ext, v_less, n_stream, v_trans, n_layer, n_k, n_v,
 *            then every entry of its first stream that holds cells)
 *   layout_len is 64.
 *
 * Format 3: an opaque state: [0] 3, [1] header version, [2] token form;
 *   layout_len is 3.
 *
 * The entries are the 12 bytes as the file stores them, so a signature
 * depends on the shape of the state only: not on cell or token counts.
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

#define SLOT_MAX_SEQ_ID 256u
#define SLOT_ENTRY_BYTES 12u    /* one per-layer K or V header */
#define SLOT_CELL_BUF 4096u     /* read-ahead over the cell table */
#define SLOT_MAX_TYPE 64        /* ggml type ids are below this */
#define SLOT_MAX_ROW (1ull << 30)
#define SLOT_MAX_EMBD (1u << 20)
#define SLOT_MAX_EL 256u
#define SLOT_IK_SWAC 0x53574143u /* ik_llama.cpp --swa-compress block ('SWAC') */
#define SLOT_PACKED_VERSION 1u  /* SERVER_TOKENS_STATE_VERSION */

#define LAYOUT_F1 1
#define LAYOUT_F1_FIXED 34
#define LAYOUT_K_MIXED 0x01
#define LAYOUT_V_MIXED 0x02

#define LAYOUT_F2 2
#define LAYOUT_F2_FIXED 42
#define LAYOUT_F2_EXT 0x01
#define LAYOUT_F2_VLESS 0x02
#define LAYOUT_F2_MIXED 0x04
#define LAYOUT_F2_TAIL 0x08    /* ik_llama.cpp's layout (flag words after its KV) */

#define LAYOUT_F3 3
#define LAYOUT_F3_LEN 3

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

/* The forms a section can take. */
enum sec_form { FORM_KVS, FORM_K25, FORM_REC, FORM_IK };

/* How one section of a plan was walked. */
struct sec_walk {
	enum sec_form form;
	uint8_t ext, vless;          /* FORM_KVS variants: cell extension bytes, no V */
	uint32_t n_k;                /* FORM_REC: entries walked (<= n_layer) */
	struct slot_section out;
	uint8_t first_k[SLOT_ENTRY_BYTES], first_v[SLOT_ENTRY_BYTES];
	int have_entries;            /* first_k/first_v are set */
	int mixed;                   /* entries differ across layers or streams */
	int32_t first_pos;           /* position of the first cell (FORM_K25), -1 if none */
};

/* One attempt at a state layout. */
struct walk {
	struct slot_parser *p;
	struct slot_cursor c;
	EVP_MD_CTX *md;              /* fed with the entries when not NULL */
	uint32_t version;            /* the header's */
	int plausible_eof;           /* the walk ran past the end while plausible */
	int later_section;           /* walking a section after the first */
	int sec_known;               /* that later section starts as a real one would */
	uint32_t first_n_stream;     /* n_stream of the first KV section */
	char why[160];               /* why this attempt failed */
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

/* ------------------------------------------------------------------------
 * State walks. They return 0, 1 ("not this layout": w->why says why, and
 * w->plausible_eof whether it was a plausible walk running off the end), or
 * a negative errno (a read error: the parse stops).
 */

__attribute__((format(printf, 2, 3))) static int walk_no(struct walk *w, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(w->why, sizeof(w->why), fmt, ap);
	va_end(ap);
	return 1;
}

/* Past the end of the file while everything read so far was plausible. */
static int walk_eof(struct walk *w, const char *what, uint64_t end)
{
	/* Bytes after a complete section may be anything: running out in a
	 * later section says something only when it began as a real one does
	 * (a KV section with the first one's n_stream, a recurrent one with
	 * its one cell). */
	if (!w->later_section || w->sec_known)
		w->plausible_eof = 1;
	return walk_no(w, "%s ends at %" PRIu64 ", file is %" PRIu64 " bytes", what, end,
		       w->p->size);
}

/* Copies n (<= 16) bytes at off into out, through the read-ahead. */
static int walk_get(struct walk *w, uint64_t off, void *out, size_t n, const char *what)
{
	struct slot_cursor *c = &w->c;
	uint64_t end;
	size_t want;
	int rc;

	if (__builtin_add_overflow(off, (uint64_t)n, &end) || end > w->p->size)
		return walk_eof(w, what, end);
	if (off >= c->base && off - c->base <= c->len && c->len - (off - c->base) >= n) {
		memcpy(out, c->buf + (off - c->base), n);
		return 0;
	}
	c->len = 0;
	want = sizeof(c->buf);
	if (w->p->size - off < want)
		want = (size_t)(w->p->size - off);
	rc = slot_read(w->p, c->buf, want, off, what);
	if (rc < 0)
		return rc;
	c->base = off;
	c->len = want;
	memcpy(out, c->buf, n);
	return 0;
}

static int walk_u32(struct walk *w, uint64_t *off, uint32_t *v, const char *what)
{
	uint8_t b[4];
	int rc = walk_get(w, *off, b, 4, what);

	if (rc)
		return rc;
	*off += 4;
	*v = get_le32(b);
	return 0;
}

/* The cell table of n cells: i32 pos, u32 n_seq_id, ext bytes (M-RoPE: 8 in
 * version 2, 12 since version 3), n_seq_id x i32. */
static int walk_cells(struct walk *w, uint64_t *offp, uint32_t n, int ext, int32_t *first_pos)
{
	uint64_t off = *offp;
	uint8_t b[8];
	uint32_t i, n_seq;
	int32_t pos;
	int rc;

	*first_pos = -1;
	for (i = 0; i < n; i++) {
		rc = walk_get(w, off, b, 8, "the cell table");
		if (rc)
			return rc;
		pos = (int32_t)get_le32(b);
		n_seq = get_le32(b + 4);
		if (pos < 0)
			return walk_no(w, "cell %" PRIu32 " has position %" PRId32, i, pos);
		if (n_seq > SLOT_MAX_SEQ_ID)
			return walk_no(w, "cell %" PRIu32 " has %" PRIu32 " sequence ids, the limit is %u",
				       i, n_seq, SLOT_MAX_SEQ_ID);
		if (i == 0)
			*first_pos = pos;
		if (__builtin_add_overflow(off, 8 + (uint64_t)ext + 4 * (uint64_t)n_seq, &off))
			return walk_no(w, "the cell table overflows");
	}
	if (off > w->p->size)
		return walk_eof(w, "the cell table", off);
	*offp = off;
	return 0;
}

/* One K (or V, R, S) entry and its rows: i32 type, then u64 row bytes, or
 * (trans) u32 element size and u32 n_embd. */
static int walk_entry(struct walk *w, uint64_t *offp, uint32_t n_cells, int trans,
		      uint8_t e[SLOT_ENTRY_BYTES], const char *what)
{
	uint64_t off = *offp, row, bytes;
	int32_t type;
	int rc;

	rc = walk_get(w, off, e, SLOT_ENTRY_BYTES, what);
	if (rc)
		return rc;
	off += SLOT_ENTRY_BYTES;
	type = (int32_t)get_le32(e);
	if (type < 0 || type >= SLOT_MAX_TYPE)
		return walk_no(w, "%s: type %" PRId32 " is not a ggml type", what, type);
	if (!trans) {
		row = get_le64(e + 4);
		if (row == 0 || row > SLOT_MAX_ROW)
			return walk_no(w, "%s: row of %" PRIu64 " bytes", what, row);
	} else {
		uint32_t el = get_le32(e + 4), ne = get_le32(e + 8);
		if (el == 0 || el > SLOT_MAX_EL || ne == 0 || ne > SLOT_MAX_EMBD)
			return walk_no(w, "%s: element of %" PRIu32 " bytes x %" PRIu32, what, el,
				       ne);
		row = (uint64_t)el * ne;
	}
	if (__builtin_mul_overflow(row, (uint64_t)n_cells, &bytes) ||
	    __builtin_add_overflow(off, bytes, &off))
		return walk_no(w, "%s: data size overflows", what);
	if (off > w->p->size)
		return walk_eof(w, what, off);
	if (w->md && !EVP_DigestUpdate(w->md, e, SLOT_ENTRY_BYTES))
		return -ENOMEM;
	*offp = off;
	return 0;
}

/* n entries of one side; records the first and whether they differ. With
 * `absent`, an entry of type -1 and size 0 is a layer without rows
 * (ik_llama.cpp writes one for every layer its cache does not hold). */
static int walk_entries(struct walk *w, uint64_t *offp, uint32_t n_cells, int trans, uint32_t n,
			char side, struct sec_walk *s, uint8_t first[SLOT_ENTRY_BYTES], int absent)
{
	uint8_t e[SLOT_ENTRY_BYTES];
	char what[48];
	uint32_t l;
	int rc;

	for (l = 0; l < n; l++) {
		snprintf(what, sizeof(what), "layer %" PRIu32 " %c header", l, side);
		if (absent) {
			rc = walk_get(w, *offp, e, SLOT_ENTRY_BYTES, what);
			if (rc)
				return rc;
		}
		if (absent && get_le32(e) == 0xffffffffu) {
			if (get_le64(e + 4) != 0)
				return walk_no(w, "%s: absent layer with rows", what);
			*offp += SLOT_ENTRY_BYTES;
			if (w->md && !EVP_DigestUpdate(w->md, e, SLOT_ENTRY_BYTES))
				return -ENOMEM;
		} else {
			rc = walk_entry(w, offp, n_cells, trans, e, what);
		}
		if (rc)
			return rc;
		if (!s->have_entries && l == 0)
			memcpy(first, e, SLOT_ENTRY_BYTES);
		else if (memcmp(first, e, SLOT_ENTRY_BYTES) != 0)
			s->mixed = 1;
	}
	return 0;
}

/* v_trans (s_trans) and n_layer. */
static int walk_trans_layers(struct walk *w, uint64_t *off, uint32_t *trans, uint32_t *n_layer)
{
	int rc = walk_u32(w, off, trans, "v_trans");

	if (rc)
		return rc;
	rc = walk_u32(w, off, n_layer, "n_layer");
	if (rc)
		return rc;
	if (*trans > 1)
		return walk_no(w, "v_trans is %" PRIu32 ", expected 0 or 1", *trans);
	if (*n_layer < 1 || *n_layer > SLOT_MAX_LAYERS)
		return walk_no(w, "n_layer is %" PRIu32 ", expected 1..%u", *n_layer,
			       SLOT_MAX_LAYERS);
	return 0;
}

/* A KV section of llama.cpp since July 2025: u32 n_stream, per stream u32
 * cell_count and, when not 0, cells, v_trans, n_layer, K entries, V entries. */
static int walk_kvs(struct walk *w, uint64_t *offp, struct sec_walk *s)
{
	uint64_t off = *offp;
	uint32_t n_stream, st, n_cells, trans, n_layer;
	uint8_t k0[SLOT_ENTRY_BYTES], v0[SLOT_ENTRY_BYTES];
	int32_t first_pos;
	int rc;

	rc = walk_u32(w, &off, &n_stream, "n_stream");
	if (rc)
		return rc;
	if (n_stream < 1 || n_stream > SLOT_MAX_STREAMS)
		return walk_no(w, "n_stream is %" PRIu32 ", expected 1..%u", n_stream,
			       SLOT_MAX_STREAMS);
	if (!w->later_section)
		w->first_n_stream = n_stream;
	else if (n_stream == w->first_n_stream)
		w->sec_known = 1;
	s->out.kind = SLOT_SEC_KV;
	s->out.cell_ext = s->ext;
	s->out.v_less = s->vless;
	s->out.n_stream = n_stream;
	for (st = 0; st < n_stream; st++) {
		rc = walk_u32(w, &off, &n_cells, "a stream's cell count");
		if (rc)
			return rc;
		if (n_cells == 0)
			continue;
		if (n_cells > SLOT_MAX_TOKENS)
			return walk_no(w, "%" PRIu32 " cells, the limit is %u", n_cells,
				       SLOT_MAX_TOKENS);
		rc = walk_cells(w, &off, n_cells, s->ext, &first_pos);
		if (rc)
			return rc;
		rc = walk_trans_layers(w, &off, &trans, &n_layer);
		if (rc)
			return rc;
		if (s->have_entries && (trans != s->out.v_trans || n_layer != s->out.n_layer))
			s->mixed = 1;
		if (!s->have_entries) {
			s->out.v_trans = trans;
			s->out.n_layer = n_layer;
		}
		/* Only the first stream with cells feeds the digest: a signature
		 * must not depend on which stream a sequence lives in. */
		{
			EVP_MD_CTX *md = w->md;
			if (s->have_entries)
				w->md = NULL;
			rc = walk_entries(w, &off, n_cells, 0, n_layer, 'K', s,
					  s->have_entries ? k0 : s->first_k, 0);
			if (!rc && !s->vless)
				rc = walk_entries(w, &off, n_cells, (int)trans, n_layer, 'V', s,
						  s->have_entries ? v0 : s->first_v, 0);
			w->md = md;
			if (rc)
				return rc;
		}
		if (s->have_entries && (memcmp(k0, s->first_k, SLOT_ENTRY_BYTES) != 0 ||
					(!s->vless &&
					 memcmp(v0, s->first_v, SLOT_ENTRY_BYTES) != 0)))
			s->mixed = 1;
		s->have_entries = 1;
		s->out.n_cells += n_cells;
		s->out.n_k = n_layer;
		s->out.n_v = s->vless ? 0 : n_layer;
	}
	*offp = off;
	return 0;
}

/* A section without n_stream: the early 2025 KV layout (FORM_K25: n_layer K
 * and V entries) or a recurrent one (FORM_REC: s->n_k R and S entries, the
 * recurrent layers of the model). */
static int walk_flat(struct walk *w, uint64_t *offp, struct sec_walk *s)
{
	uint64_t off = *offp;
	uint32_t n_cells, trans, n_layer, n;
	int rc;

	rc = walk_u32(w, &off, &n_cells, "the state's cell count");
	if (rc)
		return rc;
	if (n_cells > SLOT_MAX_TOKENS)
		return walk_no(w, "%" PRIu32 " cells, the limit is %u", n_cells, SLOT_MAX_TOKENS);
	if (s->form == FORM_REC && n_cells == 1)
		w->sec_known = 1;
	rc = walk_cells(w, &off, n_cells, 0, &s->first_pos);
	if (rc)
		return rc;
	rc = walk_trans_layers(w, &off, &trans, &n_layer);
	if (rc)
		return rc;
	n = s->form == FORM_REC && s->n_k ? s->n_k : n_layer;
	if (n > n_layer)
		return walk_no(w, "%" PRIu32 " recurrent layers of %" PRIu32, n, n_layer);
	rc = walk_entries(w, &off, n_cells, 0, n, s->form == FORM_REC ? 'R' : 'K', s, s->first_k,
			  0);
	if (rc)
		return rc;
	rc = walk_entries(w, &off, n_cells, (int)trans, n, s->form == FORM_REC ? 'S' : 'V', s,
			  s->first_v, 0);
	if (rc)
		return rc;
	s->have_entries = 1;
	s->out.kind = s->form == FORM_REC ? SLOT_SEC_RECURRENT : SLOT_SEC_KV;
	s->out.n_stream = 1;
	s->out.n_cells = n_cells;
	s->out.v_trans = trans;
	s->out.n_layer = n_layer;
	s->out.n_k = s->out.n_v = n;
	*offp = off;
	return 0;
}

/* ik_llama.cpp's state (src/llama.cpp write_kv_cache, versions 3 and 4):
 * [u32 'SWAC', 16 bytes], u32 cell_count, cells (i32 pos, u32 n_seq_id,
 * ids), u32 v_state (0 V rows, 1 V transposed, 2 no V), u32 n_layer, n_layer
 * K entries and (v_state < 2) V entries, an absent layer written as type -1
 * and size 0; then u32 qnext_state (version 3+; 1: per layer i32 type, u64
 * row bytes, u32 rows, the rows) and u32 dsa_indexer_state (version 4; its
 * block is not walked: 1 is no known layout). */
static int walk_ik(struct walk *w, uint64_t *offp, struct sec_walk *s)
{
	uint64_t off = *offp;
	uint32_t n_cells, v_state, n_layer, flag, l;
	uint8_t b[4];
	int rc;

	s->ext = 0;
	rc = walk_get(w, off, b, 4, "the state");
	if (rc)
		return rc;
	if (get_le32(b) == SLOT_IK_SWAC) {
		off += 20;
		s->ext = 1; /* recorded as a flag of the section */
	}
	rc = walk_u32(w, &off, &n_cells, "the state's cell count");
	if (rc)
		return rc;
	if (n_cells > SLOT_MAX_TOKENS)
		return walk_no(w, "%" PRIu32 " cells, the limit is %u", n_cells, SLOT_MAX_TOKENS);
	rc = walk_cells(w, &off, n_cells, 0, &s->first_pos);
	if (rc)
		return rc;
	rc = walk_u32(w, &off, &v_state, "v_state");
	if (!rc)
		rc = walk_u32(w, &off, &n_layer, "n_layer");
	if (rc)
		return rc;
	if (v_state > 2)
		return walk_no(w, "v_state is %" PRIu32 ", expected 0..2", v_state);
	if (n_layer < 1 || n_layer > SLOT_MAX_LAYERS)
		return walk_no(w, "n_layer is %" PRIu32 ", expected 1..%u", n_layer,
			       SLOT_MAX_LAYERS);
	rc = walk_entries(w, &off, n_cells, 0, n_layer, 'K', s, s->first_k, 1);
	if (!rc && v_state < 2)
		rc = walk_entries(w, &off, n_cells, (int)v_state, n_layer, 'V', s, s->first_v, 1);
	if (rc)
		return rc;
	rc = walk_u32(w, &off, &flag, "qnext_state");
	if (rc)
		return rc;
	if (flag > 1)
		return walk_no(w, "qnext_state is %" PRIu32, flag);
	for (l = 0; flag && l < n_layer; l++) {
		uint8_t e[16];
		uint64_t row, bytes;
		rc = walk_get(w, off, e, 16, "a qnext state header");
		if (rc)
			return rc;
		off += 16;
		row = get_le64(e + 4);
		if (get_le32(e) == 0xffffffffu)
			continue;
		if ((int32_t)get_le32(e) < 0 || get_le32(e) >= SLOT_MAX_TYPE || row > SLOT_MAX_ROW)
			return walk_no(w, "a qnext state header of type %" PRIu32, get_le32(e));
		bytes = row * get_le32(e + 12);
		if (__builtin_add_overflow(off, bytes, &off) || off > w->p->size)
			return walk_eof(w, "a qnext state", off);
		if (w->md && !EVP_DigestUpdate(w->md, e, 12))
			return -ENOMEM;
	}
	if (w->version >= 4) {
		rc = walk_u32(w, &off, &flag, "dsa_indexer_state");
		if (rc)
			return rc;
		if (flag != 0)
			return walk_no(w, "dsa_indexer_state is %" PRIu32
				       " (its block is not walked)", flag);
	}
	s->have_entries = 1;
	s->out.kind = SLOT_SEC_KV;
	s->out.cell_ext = s->ext;
	s->out.v_less = v_state == 2;
	s->out.n_stream = 1;
	s->out.n_cells = n_cells;
	s->out.v_trans = v_state;
	s->out.n_layer = n_layer;
	s->out.n_k = n_layer;
	s->out.n_v = v_state < 2 ? n_layer : 0;
	*offp = off;
	return 0;
}

static int walk_form(struct walk *w, uint64_t *off, struct sec_walk *s)
{
	switch (s->form) {
	case FORM_KVS:
		return walk_kvs(w, off, s);
	case FORM_IK:
		return walk_ik(w, off, s);
	default:
		return walk_flat(w, off, s);
	}
}

static int walk_section(struct walk *w, uint64_t *off, struct sec_walk *s, int index)
{
	w->later_section = index > 0;
	w->sec_known = 0;
	s->have_entries = 0;
	s->mixed = 0;
	s->first_pos = -1;
	memset(&s->out, 0, sizeof(s->out));
	memset(s->first_k, 0, sizeof(s->first_k));
	memset(s->first_v, 0, sizeof(s->first_v));
	if (w->md) {
		uint8_t d[3 + 5 * 4];
		int rc = walk_form(w, off, s);
		if (rc)
			return rc;
		/* The section's shape after its entries (fed by the walk). */
		d[0] = s->out.kind;
		d[1] = s->out.cell_ext;
		d[2] = s->out.v_less;
		put_le32(d + 3, s->out.n_stream);
		put_le32(d + 7, s->out.v_trans);
		put_le32(d + 11, s->out.n_layer);
		put_le32(d + 15, s->out.n_k);
		put_le32(d + 19, s->out.n_v);
		return EVP_DigestUpdate(w->md, d, sizeof(d)) ? 0 : -ENOMEM;
	}
	return walk_form(w, off, s);
}

/* Plans: the sequences of section forms tried, in this order. */
struct plan {
	const char *name;
	uint8_t n;
	enum sec_form form[3];
	uint8_t min_version, max_version;
};

static const struct plan plans[] = {
	{ "kv", 1, { FORM_KVS }, 2, 4 },
	{ "kv+kv", 2, { FORM_KVS, FORM_KVS }, 2, 4 },
	{ "kv+recurrent", 2, { FORM_KVS, FORM_REC }, 2, 4 },
	{ "kv+kv+recurrent", 3, { FORM_KVS, FORM_KVS, FORM_REC }, 2, 4 },
	{ "flat", 1, { FORM_K25 }, 2, 3 },
	{ "flat+recurrent", 2, { FORM_K25, FORM_REC }, 2, 2 },
	{ "ik", 1, { FORM_IK }, 3, 4 },
};
#define N_PLANS (sizeof(plans) / sizeof(plans[0]))

static int try_section(struct walk *w, const struct plan *pl, int i, uint64_t off,
		       struct sec_walk sw[SLOT_MAX_SECTIONS]);

/* Tries plan sections i.. from off, every variant of each; the chosen
 * variants are left in sw[]. Returns 0 when the plan fits exactly. */
static int try_plan(struct walk *w, const struct plan *pl, int i, uint64_t off,
		    struct sec_walk sw[SLOT_MAX_SECTIONS])
{
	struct sec_walk *s = &sw[i];
	int v, rc;

	if (i == pl->n) {
		if (w->p->size == off)
			return 0;
		return walk_no(w, "%" PRIu64 " trailing bytes after the state (it ends at %" PRIu64
			       ", file is %" PRIu64 " bytes)",
			       w->p->size - off, off, w->p->size);
	}
	s->form = pl->form[i];
	if (s->form == FORM_KVS) {
		/* plain, M-RoPE cells (8 bytes; 12 since version 3), V-less */
		static const uint8_t ext_of[3] = { 0, 8, 12 };
		for (v = 0; v < 6; v++) {
			s->ext = ext_of[v % 3];
			s->vless = (uint8_t)(v / 3);
			if ((rc = try_section(w, pl, i, off, sw)) <= 0)
				return rc;
		}
		return 1;
	}
	if (s->form == FORM_REC) {
		/* every layer recurrent first, then fewer (hybrid models) */
		uint32_t n_layer = SLOT_MAX_LAYERS, k;
		s->n_k = 0;
		if ((rc = try_section(w, pl, i, off, sw)) <= 0)
			return rc;
		/* n_layer of the section, for the partial tries */
		{
			uint8_t b[4];
			uint64_t o = off;
			uint32_t n_cells;
			if (walk_u32(w, &o, &n_cells, "cells") || n_cells > SLOT_MAX_TOKENS)
				return 1;
			if (walk_cells(w, &o, n_cells, 0, &s->first_pos) ||
			    walk_get(w, o + 4, b, 4, "n_layer"))
				return 1;
			n_layer = get_le32(b);
			if (n_layer < 1 || n_layer > SLOT_MAX_LAYERS)
				return 1;
		}
		for (k = n_layer - 1; k >= 1; k--) {
			s->form = FORM_REC;
			s->n_k = k;
			if ((rc = try_section(w, pl, i, off, sw)) <= 0)
				return rc;
		}
		return 1;
	}
	return try_section(w, pl, i, off, sw);
}

/* Section i as its variant now stands, then the rest of the plan. */
static int try_section(struct walk *w, const struct plan *pl, int i, uint64_t off,
		       struct sec_walk sw[SLOT_MAX_SECTIONS])
{
	uint64_t end = off;
	int rc = walk_section(w, &end, &sw[i], i);

	return rc ? rc : try_plan(w, pl, i + 1, end, sw);
}

/* Replays the chosen variants with a digest, for a format 2 signature. */
static int replay_plan(struct walk *w, const struct plan *pl, uint64_t off,
		       struct sec_walk sw[SLOT_MAX_SECTIONS])
{
	int rc;

	for (int i = 0; i < pl->n; i++) {
		rc = walk_section(w, &off, &sw[i], i);
		if (rc)
			return rc < 0 ? rc : -EIO; /* the same walk succeeded before */
	}
	return 0;
}

/* A walk that feeds a digest (its context is the caller's to free). */
static int digest_walk(struct walk *w, struct slot_parser *p, const struct slot_info *info)
{
	memset(w, 0, sizeof(*w));
	w->p = p;
	w->version = info->version;
	w->md = EVP_MD_CTX_new();
	return w->md ? 0 : -ENOMEM;
}

/* Ends a signature: the digest's first bytes after its `fixed` ones. */
static int layout_digest_end(EVP_MD_CTX *md, struct slot_info *info, size_t fixed)
{
	uint8_t out[EVP_MAX_MD_SIZE];
	unsigned int len = 0;

	if (!EVP_DigestFinal_ex(md, out, &len) || len < SLOT_LAYOUT_MAX - fixed)
		return -ENOMEM;
	memcpy(info->layout + fixed, out, SLOT_LAYOUT_MAX - fixed);
	info->layout_len = SLOT_LAYOUT_MAX;
	return 0;
}

/* Format 1 signature, as kvtier 0.2 computed it. */
static int layout_f1(struct slot_parser *p, uint64_t state_off, struct sec_walk *s,
		     struct slot_info *info)
{
	struct walk w;
	uint64_t off = state_off;
	int k_mixed = 0, v_mixed = 0, rc = 0;

	memset(info->layout, 0, sizeof(info->layout));
	info->layout[0] = LAYOUT_F1;
	put_le32(info->layout + 2, s->out.n_layer);
	put_le32(info->layout + 6, s->out.v_trans);
	memcpy(info->layout + 10, s->first_k, SLOT_ENTRY_BYTES);
	memcpy(info->layout + 22, s->first_v, SLOT_ENTRY_BYTES);
	info->layout_len = LAYOUT_F1_FIXED;
	if (!s->mixed)
		return 0;

	/* Which side differs, and the digest of every entry. */
	if (digest_walk(&w, p, info))
		return slot_fail(p, -ENOMEM, "out of memory for the layout digest");
	{
		struct sec_walk k = *s;
		uint64_t o = off;
		uint32_t n_cells, l, trans;
		uint8_t e[SLOT_ENTRY_BYTES];
		int32_t fp;

		if (!EVP_DigestInit_ex(w.md, EVP_sha256(), NULL)) {
			rc = -ENOMEM;
			goto out;
		}
		/* layout[1] is part of the digested bytes: set it first. */
		rc = walk_u32(&w, &o, &n_cells, "cells");
		if (!rc)
			rc = walk_cells(&w, &o, n_cells, 0, &fp);
		if (!rc)
			rc = walk_trans_layers(&w, &o, &trans, &l);
		for (l = 0; !rc && l < 2 * k.out.n_layer; l++) {
			int side_v = l >= k.out.n_layer;
			rc = walk_entry(&w, &o, n_cells, side_v ? (int)trans : 0, e, "entry");
			if (!rc && memcmp(e, side_v ? k.first_v : k.first_k, SLOT_ENTRY_BYTES))
				*(side_v ? &v_mixed : &k_mixed) = 1;
		}
		if (rc) {
			rc = rc < 0 ? rc : -EIO;
			goto out;
		}
		info->layout[1] = (uint8_t)((k_mixed ? LAYOUT_K_MIXED : 0) |
					    (v_mixed ? LAYOUT_V_MIXED : 0));
		/* Now the digest: fixed bytes, then every entry, K then V. */
		EVP_MD_CTX_reset(w.md);
		if (!EVP_DigestInit_ex(w.md, EVP_sha256(), NULL) ||
		    !EVP_DigestUpdate(w.md, info->layout, LAYOUT_F1_FIXED)) {
			rc = -ENOMEM;
			goto out;
		}
		o = off;
		w.c.len = 0;
		rc = walk_u32(&w, &o, &n_cells, "cells");
		if (!rc) {
			EVP_MD_CTX *md = w.md;
			w.md = NULL;
			rc = walk_cells(&w, &o, n_cells, 0, &fp);
			if (!rc)
				rc = walk_trans_layers(&w, &o, &trans, &l);
			w.md = md;
		}
		for (l = 0; !rc && l < 2 * k.out.n_layer; l++)
			rc = walk_entry(&w, &o, n_cells, l >= k.out.n_layer ? (int)trans : 0, e,
					"entry");
		if (rc) {
			rc = rc < 0 ? rc : -EIO;
			goto out;
		}
		rc = layout_digest_end(w.md, info, LAYOUT_F1_FIXED);
	}
out:
	EVP_MD_CTX_free(w.md);
	if (rc < 0)
		return slot_fail(p, rc, "layout digest failed: %s", kvtier_strerror(rc));
	return 0;
}

/* Format 2 signature: fixed fields, then a digest over the replayed walk. */
static int layout_f2(struct slot_parser *p, const struct plan *pl, struct sec_walk *sw,
		     struct slot_info *info)
{
	uint8_t flags = 0;
	struct walk w;
	int rc = 0;

	for (int i = 0; i < pl->n; i++) {
		if (sw[i].out.cell_ext)
			flags |= LAYOUT_F2_EXT;
		if (sw[i].out.v_less)
			flags |= LAYOUT_F2_VLESS;
		if (sw[i].mixed)
			flags |= LAYOUT_F2_MIXED;
		if (i && sw[i].have_entries && sw[0].have_entries &&
		    (memcmp(sw[i].first_k, sw[0].first_k, SLOT_ENTRY_BYTES) ||
		     memcmp(sw[i].first_v, sw[0].first_v, SLOT_ENTRY_BYTES)))
			flags |= LAYOUT_F2_MIXED;
	}
	if (pl->form[0] == FORM_IK)
		flags |= LAYOUT_F2_TAIL;
	memset(info->layout, 0, sizeof(info->layout));
	info->layout[0] = LAYOUT_F2;
	info->layout[1] = (uint8_t)(info->version > 255 ? 255 : info->version);
	info->layout[2] = (uint8_t)info->token_form;
	info->layout[3] = (uint8_t)info->state_kind;
	info->layout[4] = pl->n;
	info->layout[5] = flags;
	put_le32(info->layout + 6, sw[0].out.n_stream);
	put_le32(info->layout + 10, sw[0].out.n_layer);
	put_le32(info->layout + 14, sw[0].out.v_trans);
	memcpy(info->layout + 18, sw[0].first_k, SLOT_ENTRY_BYTES);
	memcpy(info->layout + 30, sw[0].first_v, SLOT_ENTRY_BYTES);

	if (digest_walk(&w, p, info))
		return slot_fail(p, -ENOMEM, "out of memory for the layout digest");
	if (!EVP_DigestInit_ex(w.md, EVP_sha256(), NULL) ||
	    !EVP_DigestUpdate(w.md, info->layout, LAYOUT_F2_FIXED)) {
		rc = -ENOMEM;
		goto out;
	}
	rc = replay_plan(&w, pl, info->state_offset, sw);
	if (rc == 0)
		rc = layout_digest_end(w.md, info, LAYOUT_F2_FIXED);
out:
	EVP_MD_CTX_free(w.md);
	if (rc < 0)
		return slot_fail(p, rc, "layout digest failed: %s", kvtier_strerror(rc));
	return 0;
}

static void layout_f3(struct slot_info *info)
{
	memset(info->layout, 0, sizeof(info->layout));
	info->layout[0] = LAYOUT_F3;
	info->layout[1] = (uint8_t)(info->version > 255 ? 255 : info->version);
	info->layout[2] = (uint8_t)info->token_form;
	info->layout_len = LAYOUT_F3_LEN;
}

/* A section without n_stream is either the early 2025 KV layout or a
 * recurrent state: they are walked alike. A recurrent state keeps one cell,
 * at the last position, whatever the token count; a KV cache one cell per
 * token. Version 3 came long after KV sections gained n_stream, so there a
 * flat section is recurrent, or nothing known. Returns the kind, or
 * SLOT_STATE_OPAQUE for "not this layout". */
static uint32_t flat_kind(const struct slot_info *info, const struct sec_walk *s)
{
	int one = s->out.n_cells == 1 && info->n_tokens_all >= 2 &&
		  (uint32_t)s->first_pos == info->n_tokens_all - 1;

	if (one || (info->version == 3 && s->out.n_cells == 0))
		return SLOT_STATE_RECURRENT;
	return info->version == 3 ? SLOT_STATE_OPAQUE : SLOT_STATE_KV_2025;
}

/* Walks the state after the token payload: fills the state fields and the
 * layout signature of info. Returns 0 (also for an opaque state), or
 * KVTIER_E_INVALID for a truncated file, or a negative errno. */
static int parse_state(struct slot_parser *p, struct slot_info *info)
{
	struct sec_walk sw[SLOT_MAX_SECTIONS];
	char trunc_why[200] = "";
	struct walk w;
	const struct plan *pl = NULL;
	size_t i;
	int rc;

	if (info->state_offset == p->size)
		return slot_fail(p, KVTIER_E_INVALID,
				 "truncated: the file ends after its tokens, with no state");
	for (i = 0; i < N_PLANS; i++) {
		if (info->version < plans[i].min_version || info->version > plans[i].max_version)
			continue;
		memset(&w, 0, sizeof(w));
		w.p = p;
		w.version = info->version;
		memset(sw, 0, sizeof(sw));
		rc = try_plan(&w, &plans[i], 0, info->state_offset, sw);
		if (rc < 0)
			return rc;
		if (rc == 0 && plans[i].n == 1 && plans[i].form[0] == FORM_K25 &&
		    flat_kind(info, &sw[0]) == SLOT_STATE_OPAQUE)
			continue; /* walks, but is no layout this version writes */
		if (rc == 0) {
			pl = &plans[i];
			break;
		}
		if (w.plausible_eof && !trunc_why[0])
			snprintf(trunc_why, sizeof(trunc_why), "%s layout: %s", plans[i].name,
				 w.why);
	}
	if (!pl) {
		if (trunc_why[0])
			return slot_fail(p, KVTIER_E_INVALID, "truncated: %s", trunc_why);
		info->state_kind = SLOT_STATE_OPAQUE;
		info->n_sections = 0;
		layout_f3(info);
		info->has_layout = 1;
		return 0;
	}

	info->n_sections = pl->n;
	for (i = 0; i < pl->n; i++)
		info->sec[i] = sw[i].out;
	info->n_cells = sw[0].out.n_cells;
	info->v_trans = sw[0].out.v_trans;
	info->n_layer = sw[0].out.n_layer;
	if (pl->form[0] == FORM_K25 && pl->n == 1) {
		info->state_kind = flat_kind(info, &sw[0]);
		if (info->state_kind == SLOT_STATE_RECURRENT)
			sw[0].out.kind = info->sec[0].kind = SLOT_SEC_RECURRENT;
	} else if (pl->form[0] == FORM_IK) {
		info->state_kind = SLOT_STATE_KV_2025;
	} else if (pl->form[pl->n - 1] == FORM_REC) {
		info->state_kind = SLOT_STATE_HYBRID;
	} else {
		info->state_kind = SLOT_STATE_KV;
	}
	info->has_layout = 1;
	if (info->state_kind == SLOT_STATE_KV_2025 && info->version == 2)
		return layout_f1(p, info->state_offset, &sw[0], info);
	return layout_f2(p, pl, sw, info);
}

/* ------------------------------------------------------------------------
 * Header and token payload.
 */

/* The fixed header; h holds min(12, file_size) bytes of the file, zero
 * padded. Magic, then version, then size, so a short file says what it is. */
static int check_header(struct slot_parser *p, const uint8_t h[SLOT_HEADER_BYTES],
			struct slot_info *info, int allow_empty)
{
	uint64_t file_size = p->size;

	if (file_size >= 4 && get_le32(h) != SLOT_MAGIC)
		return slot_fail(p, KVTIER_E_INVALID,
				 "bad magic 0x%08" PRIx32 ", expected 0x%08x (\"qsgg\"): not a "
				 "llama-server slot file",
				 get_le32(h), SLOT_MAGIC);
	if (file_size >= 8) {
		info->version = get_le32(h + 4);
		if (info->version < 2 || info->version > 4)
			return slot_fail(p, KVTIER_E_INVALID,
					 "unsupported version %" PRIu32 ": kvtier reads versions 2 "
					 "and 3 (llama.cpp) and 4 (ik_llama.cpp)",
					 info->version);
	}
	if (file_size < SLOT_HEADER_BYTES)
		return slot_fail(p, KVTIER_E_INVALID,
				 "truncated: file is %" PRIu64
				 " bytes, a slot file header needs %u",
				 file_size, SLOT_HEADER_BYTES);
	info->n_words = get_le32(h + 8);
	if (info->n_words > SLOT_MAX_TOKENS)
		return slot_fail(p, KVTIER_E_INVALID,
				 "oversized: %" PRIu32 " tokens, the limit is %u", info->n_words,
				 SLOT_MAX_TOKENS);
	info->state_offset = SLOT_HEADER_BYTES + 4 * (uint64_t)info->n_words;
	if (info->state_offset > file_size)
		return slot_fail(p, KVTIER_E_INVALID,
				 "truncated: file is %" PRIu64 " bytes, its %" PRIu32
				 " tokens need %" PRIu64,
				 file_size, info->n_words, info->state_offset);
	if (info->n_words == 0 && !allow_empty)
		return slot_fail(p, KVTIER_E_INVALID,
				 "empty slot file (0 tokens): llama-server crashes restoring such "
				 "a file, so it is refused");
	return 0;
}

int slot_check_header(const uint8_t h[SLOT_HEADER_BYTES], uint64_t file_size,
		      struct slot_info *info, char *err, size_t errlen)
{
	struct slot_parser p = { NULL, NULL, file_size, err, errlen };
	uint8_t b[SLOT_HEADER_BYTES] = { 0 };

	if (err && errlen)
		err[0] = '\0';
	memset(info, 0, sizeof(*info));
	info->file_size = file_size;
	memcpy(b, h, file_size < SLOT_HEADER_BYTES ? (size_t)file_size : SLOT_HEADER_BYTES);
	return check_header(&p, b, info, 0);
}

/* The packed payload of words w[0..n): -1, version, n, tokens, media keys,
 * media chunks, zero padding. Sets n_tokens_all, n_media and *tok_at
 * (the index in w of the first token). Returns 0 or KVTIER_E_INVALID. */
static int parse_packed(struct slot_parser *p, const int32_t *w, uint32_t n_words,
			struct slot_info *info, uint32_t *tok_at)
{
	uint64_t bytes = 4 * (uint64_t)n_words, pos;
	const uint8_t *b = (const uint8_t *)w;
	uint32_t n, n_keys, i, prev = 0;

	if (n_words < 4)
		return slot_fail(p, KVTIER_E_INVALID,
				 "malformed token payload: packed form of %" PRIu32
				 " words, it needs at least 4",
				 n_words);
	if ((uint32_t)w[1] != SLOT_PACKED_VERSION)
		return slot_fail(p, KVTIER_E_INVALID,
				 "malformed token payload: packed form version %" PRIu32
				 ", kvtier reads version %u",
				 (uint32_t)w[1], SLOT_PACKED_VERSION);
	n = (uint32_t)w[2];
	if (n > n_words - 4)
		return slot_fail(p, KVTIER_E_INVALID,
				 "malformed token payload: %" PRIu32
				 " tokens in a packed payload of %" PRIu32 " words",
				 n, n_words);
	*tok_at = 3;
	info->n_tokens_all = n;
	n_keys = (uint32_t)w[3 + n];
	if (n_keys > SLOT_MAX_MEDIA || n_keys > n)
		return slot_fail(p, KVTIER_E_INVALID,
				 "malformed token payload: %" PRIu32 " media chunks for %" PRIu32
				 " tokens",
				 n_keys, n);
	pos = 4 * (4 + (uint64_t)n + n_keys);
	if (pos > bytes)
		return slot_fail(p, KVTIER_E_INVALID,
				 "malformed token payload: %" PRIu32 " media keys past its end",
				 n_keys);
	for (i = 0; i < n_keys; i++) {
		uint32_t key = (uint32_t)w[4 + n + i];
		if (key >= n || (i && key <= prev) || w[3 + key] != -1)
			return slot_fail(p, KVTIER_E_INVALID,
					 "malformed token payload: media key %" PRIu32
					 " is not the start of a media position",
					 key);
		prev = key;
	}
	for (i = 0; n_keys && i < n; i++)
		if (w[3 + i] == -1) {
			if (i != (uint32_t)w[4 + n])
				return slot_fail(p, KVTIER_E_INVALID,
						 "malformed token payload: media position %" PRIu32
						 " before the first media chunk (%" PRIu32 ")",
						 i, (uint32_t)w[4 + n]);
			break;
		}
	for (i = 0; i < n_keys; i++) {
		uint32_t len;
		if (bytes - pos < 4)
			return slot_fail(p, KVTIER_E_INVALID,
					 "malformed token payload: media chunk %" PRIu32
					 " past its end",
					 i);
		len = get_le32(b + pos);
		pos += 4;
		if (len == 0 || len > bytes - pos)
			return slot_fail(p, KVTIER_E_INVALID,
					 "malformed token payload: media chunk %" PRIu32 " of %" PRIu32
					 " bytes, %" PRIu64 " left",
					 i, len, bytes - pos);
		pos += len;
	}
	if (bytes - pos >= 4)
		return slot_fail(p, KVTIER_E_INVALID,
				 "malformed token payload: %" PRIu64 " bytes after the media chunks",
				 bytes - pos);
	for (; pos < bytes; pos++)
		if (b[pos] != 0)
			return slot_fail(p, KVTIER_E_INVALID,
					 "malformed token payload: padding is not zero");
	info->n_media = n_keys;
	return 0;
}

int slot_parse(slot_read_fn rd, void *ctx, uint64_t file_size, struct slot_info *info,
	       int32_t **tokens_out, char *err, size_t errlen)
{
	struct slot_parser p = { rd, ctx, file_size, err, errlen };
	uint8_t h[SLOT_HEADER_BYTES];
	int32_t *words = NULL;
	uint32_t i, tok_at = 0, cut;
	size_t have;
	int rc;

	if (tokens_out)
		*tokens_out = NULL;
	if (err && errlen)
		err[0] = '\0';
	memset(info, 0, sizeof(*info));
	info->file_size = file_size;

	have = file_size < SLOT_HEADER_BYTES ? (size_t)file_size : SLOT_HEADER_BYTES;
	memset(h, 0, sizeof(h));
	if (have >= 4) {
		rc = slot_read(&p, h, have, 0, "the header");
		if (rc < 0)
			goto out;
	}
	/* A 0-word file is walked all the same (its shape is reported), then
	 * refused below. */
	rc = check_header(&p, h, info, 1);
	if (rc)
		goto out;

	if (info->n_words) {
		words = malloc((size_t)info->n_words * sizeof(*words));
		if (!words) {
			rc = slot_fail(&p, -ENOMEM, "out of memory for %" PRIu32 " tokens",
				       info->n_words);
			goto out;
		}
		rc = slot_read(&p, words, (size_t)info->n_words * sizeof(*words),
			       SLOT_HEADER_BYTES, "the token array");
		if (rc < 0)
			goto out;
		for (i = 0; i < info->n_words; i++)
			words[i] = (int32_t)get_le32((const uint8_t *)&words[i]);
	}
	if (info->n_words && words[0] == -1) {
		info->token_form = SLOT_TOKENS_PACKED;
		rc = parse_packed(&p, words, info->n_words, info, &tok_at);
		if (rc)
			goto out;
	} else {
		info->token_form = SLOT_TOKENS_PLAIN;
		info->n_tokens_all = info->n_words;
	}
	/* The tokens a lookup keys on: up to the first media position. */
	cut = info->n_tokens_all;
	for (i = 0; i < info->n_tokens_all; i++) {
		int32_t t = words[tok_at + i];
		if (t == -1) {
			if (cut == info->n_tokens_all)
				cut = i;
			if (info->token_form == SLOT_TOKENS_PLAIN)
				info->n_media++;
		} else if (t < 0) {
			rc = slot_fail(&p, KVTIER_E_INVALID,
				       "malformed token payload: token %" PRIu32 " is %" PRId32, i, t);
			goto out;
		}
	}
	info->n_tokens = cut;

	rc = parse_state(&p, info);
	if (rc)
		goto out;
	if (info->n_tokens == 0) {
		rc = slot_fail(&p, KVTIER_E_INVALID,
			       info->n_tokens_all
				       ? "empty slot file (0 tokens before the first media chunk): "
					 "nothing a lookup could match, so it is refused"
				       : "empty slot file (0 tokens): llama-server crashes restoring "
					 "such a file, so it is refused");
		goto out;
	}
	if (tokens_out) {
		if (tok_at)
			memmove(words, words + tok_at, (size_t)info->n_tokens * sizeof(*words));
		*tokens_out = words;
		words = NULL;
	}
	rc = 0;
out:
	free(words);
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

/* ------------------------------------------------------------------------
 * Names.
 */

const char *slot_state_kind_name(uint32_t kind)
{
	switch (kind) {
	case SLOT_STATE_OPAQUE:
		return "opaque";
	case SLOT_STATE_KV_2025:
		return "kv-2025";
	case SLOT_STATE_KV:
		return "kv";
	case SLOT_STATE_RECURRENT:
		return "recurrent";
	case SLOT_STATE_HYBRID:
		return "hybrid";
	default:
		return "unknown";
	}
}

int slot_prefix_restorable(const struct slot_info *info)
{
	return info->state_kind == SLOT_STATE_KV_2025 ||
	       (info->state_kind == SLOT_STATE_KV && info->n_sections == 1);
}

int slot_layout_is_opaque(const uint8_t *layout, size_t len)
{
	return layout && len == LAYOUT_F3_LEN && layout[0] == LAYOUT_F3;
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

/* "k=f16 64B/row v=f16 2B x 32" from two entries. */
static void describe_entries(const uint8_t *k_e, const uint8_t *v_e, uint32_t v_trans,
			     int v_less, char k_side, char v_side, char *buf, size_t buflen)
{
	char kt[24], vt[24], v[64];

	if (v_less) {
		snprintf(buf, buflen, "%c=%s %" PRIu64 "B/row %c=none", k_side,
			 slot_type_name((int32_t)get_le32(k_e), kt, sizeof(kt)), get_le64(k_e + 4),
			 v_side);
		return;
	}
	if (v_trans == 0)
		snprintf(v, sizeof(v), "%" PRIu64 "B/row", get_le64(v_e + 4));
	else
		snprintf(v, sizeof(v), "%" PRIu32 "B x %" PRIu32, get_le32(v_e + 4),
			 get_le32(v_e + 8));
	snprintf(buf, buflen, "%c=%s %" PRIu64 "B/row %c=%s %s", k_side,
		 slot_type_name((int32_t)get_le32(k_e), kt, sizeof(kt)), get_le64(k_e + 4), v_side,
		 slot_type_name((int32_t)get_le32(v_e), vt, sizeof(vt)), v);
}

static const char *form_name(uint32_t f)
{
	return f == SLOT_TOKENS_PACKED ? "packed" : f == SLOT_TOKENS_PLAIN ? "plain" : "form?";
}

char *slot_layout_describe(const uint8_t *layout, size_t len, char *buf, size_t buflen)
{
	char ent[160], mixed[64] = "";

	if (!buf || buflen == 0)
		return buf;
	if (layout && len == LAYOUT_F3_LEN && layout[0] == LAYOUT_F3) {
		snprintf(buf, buflen, "v%u %s opaque", layout[1], form_name(layout[2]));
		return buf;
	}
	if (layout && len == SLOT_LAYOUT_MAX && layout[0] == LAYOUT_F2) {
		uint32_t kind = layout[3], n_sec = layout[4], flags = layout[5];
		int rec = kind == SLOT_STATE_RECURRENT;
		const char *secs = (flags & LAYOUT_F2_TAIL) ? "ik"
				   : kind == SLOT_STATE_HYBRID ? (n_sec > 2 ? "kv+kv+recurrent"
									  : "kv+recurrent")
				   : kind == SLOT_STATE_KV && n_sec == 2 ? "kv+kv"
									 : slot_state_kind_name(kind);

		describe_entries(layout + 18, layout + 30, get_le32(layout + 14),
				 (flags & LAYOUT_F2_VLESS) != 0, rec ? 'r' : 'k', rec ? 's' : 'v',
				 ent, sizeof(ent));
		if (flags & LAYOUT_F2_MIXED)
			snprintf(mixed, sizeof(mixed), " mixed");
		char streams[24] = "";

		if (!rec)
			snprintf(streams, sizeof(streams), " streams=%" PRIu32, get_le32(layout + 6));
		snprintf(buf, buflen,
			 "v%u %s %s%s n_layer=%" PRIu32 " %s=%" PRIu32
			 " %s%s%s digest=%02x%02x%02x%02x%02x%02x%02x%02x",
			 layout[1], form_name(layout[2]), secs, streams,
			 get_le32(layout + 10), rec ? "s_trans" : "v_trans", get_le32(layout + 14),
			 ent, (flags & LAYOUT_F2_EXT) ? " mrope" : "", mixed, layout[42],
			 layout[43], layout[44], layout[45], layout[46], layout[47], layout[48],
			 layout[49]);
		return buf;
	}
	if (!layout || len < LAYOUT_F1_FIXED || layout[0] != LAYOUT_F1 ||
	    (layout[1] != 0 && len < SLOT_LAYOUT_MAX)) {
		snprintf(buf, buflen, "unknown layout (%zu bytes)", len);
		return buf;
	}
	describe_entries(layout + 10, layout + 22, get_le32(layout + 6), 0, 'k', 'v', ent,
			 sizeof(ent));
	if (layout[1])
		snprintf(mixed, sizeof(mixed), " mixed=%s digest=%02x%02x%02x%02x%02x%02x%02x%02x",
			 layout[1] == LAYOUT_K_MIXED   ? "k"
			 : layout[1] == LAYOUT_V_MIXED ? "v"
						       : "kv",
			 layout[34], layout[35], layout[36], layout[37], layout[38], layout[39],
			 layout[40], layout[41]);
	snprintf(buf, buflen, "n_layer=%" PRIu32 " v_trans=%" PRIu32 " %s%s", get_le32(layout + 2),
		 get_le32(layout + 6), ent, mixed);
	return buf;
}
