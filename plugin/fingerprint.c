/* fingerprint.c: namespaces from a GGUF model file or from a backend's /props.
 *
 * The GGUF reader walks the header (magic, version, counts, metadata
 * key/values, tensor descriptions) through a small buffered reader that feeds
 * every byte to SHA-256, then hashes the file size and 16 samples of 64 KiB
 * spread over the tensor data. A fine-tune of the same shape has the same
 * header almost everywhere; its weights differ, and so do the samples.
 *
 * This module must never read a model file whole (they are tens of GB), nor
 * trust a count or a length from the file before bounding it.
 */
#include "fingerprint.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/evp.h>

#define GGUF_MAGIC 0x46554747u /* "GGUF" little-endian */
#define GGUF_MAX_KV (1u << 20)
#define GGUF_MAX_TENSORS (1u << 20)
#define GGUF_MAX_STRING (64u << 20) /* a chat template or a token: far below */
#define GGUF_MAX_ARRAY (1ull << 32)
#define GGUF_MAX_DIMS 8u
#define GGUF_SAMPLES 16
#define GGUF_SAMPLE_BYTES (64u << 10)
#define LABEL_MAX 48

enum gguf_type {
	GGUF_U8 = 0,
	GGUF_I8,
	GGUF_U16,
	GGUF_I16,
	GGUF_U32,
	GGUF_I32,
	GGUF_F32,
	GGUF_BOOL,
	GGUF_STRING,
	GGUF_ARRAY,
	GGUF_U64,
	GGUF_I64,
	GGUF_F64,
	GGUF_TYPE_COUNT
};

/* Bytes of a scalar of each type (0: not a fixed-size scalar). */
static const unsigned gguf_size[GGUF_TYPE_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

struct reader {
	int fd;
	EVP_MD_CTX *md;
	uint64_t pos, size;
	uint8_t buf[64 << 10];
	size_t have, off; /* bytes in buf, next byte to hand out */
	char *err;
	size_t errlen;
};

/* Writes "what at byte N" into the reader's error and returns rc. */
static int fail(struct reader *r, int rc, const char *what)
{
	snprintf(r->err, r->errlen, "%s at byte %" PRIu64, what, r->pos);
	return rc;
}

/* Copies exactly n bytes into out (NULL: discards them), hashing them.
 * Returns 0, -EINVAL at end of file (a truncated header), or -errno. */
static int rd(struct reader *r, void *out, size_t n)
{
	uint8_t *o = out;

	while (n) {
		if (r->off == r->have) {
			ssize_t got = read(r->fd, r->buf, sizeof(r->buf));

			if (got < 0) {
				if (errno == EINTR)
					continue;
				return fail(r, -errno, "read error");
			}
			if (got == 0)
				return fail(r, -EINVAL, "truncated GGUF header");
			r->have = (size_t)got;
			r->off = 0;
		}
		size_t k = r->have - r->off;

		if (k > n)
			k = n;
		if (EVP_DigestUpdate(r->md, r->buf + r->off, k) != 1)
			return fail(r, -ENOMEM, "SHA-256 failed");
		if (o) {
			memcpy(o, r->buf + r->off, k);
			o += k;
		}
		r->off += k;
		r->pos += k;
		n -= k;
	}
	return 0;
}

static int rd_u32(struct reader *r, uint32_t *v)
{
	uint8_t b[4];
	int rc = rd(r, b, 4);

	*v = (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
	return rc;
}

static int rd_u64(struct reader *r, uint64_t *v)
{
	uint8_t b[8];
	int rc = rd(r, b, 8);

	*v = 0;
	for (int i = 7; i >= 0; i--)
		*v = *v << 8 | b[i];
	return rc;
}

/* Skips n bytes, hashing them; n is first checked against the file size. */
static int skip(struct reader *r, uint64_t n)
{
	if (n > r->size - r->pos)
		return fail(r, -EINVAL, "length past the end of the file");
	return rd(r, NULL, (size_t)n);
}

/* Reads a GGUF string. When out is not NULL, up to cap - 1 bytes are kept
 * there, NUL-terminated; the rest is skipped. */
static int rd_string(struct reader *r, char *out, size_t cap)
{
	uint64_t len;
	int rc = rd_u64(r, &len);

	if (rc)
		return rc;
	if (len > GGUF_MAX_STRING)
		return fail(r, -EINVAL, "string longer than 64 MiB");
	if (len > r->size - r->pos)
		return fail(r, -EINVAL, "string past the end of the file");
	if (!out)
		return skip(r, len);
	size_t keep = len < cap - 1 ? (size_t)len : cap - 1;

	rc = rd(r, out, keep);
	out[keep] = '\0';
	if (rc == 0)
		rc = skip(r, len - keep);
	return rc;
}

/* Reads a scalar integer value of type t as int64 (floats and bools: -1). */
static int rd_int(struct reader *r, uint32_t t, int64_t *v)
{
	uint8_t b[8] = {0};
	uint64_t u = 0;
	int rc;

	if (t >= GGUF_TYPE_COUNT || !gguf_size[t])
		return fail(r, -EINVAL, "bad value type");
	rc = rd(r, b, gguf_size[t]);
	if (rc)
		return rc;
	for (int i = (int)gguf_size[t] - 1; i >= 0; i--)
		u = u << 8 | b[i];
	switch (t) {
	case GGUF_I8:
		*v = (int8_t)u;
		break;
	case GGUF_I16:
		*v = (int16_t)u;
		break;
	case GGUF_I32:
		*v = (int32_t)u;
		break;
	case GGUF_I64:
		*v = (int64_t)u;
		break;
	case GGUF_F32:
	case GGUF_F64:
	case GGUF_BOOL:
		*v = -1;
		break;
	default:
		*v = u > INT64_MAX ? -1 : (int64_t)u;
		break;
	}
	return 0;
}

/* Skips a value of type t; *count_out (may be NULL) receives an array's
 * element count. Arrays nest at most `depth` levels. */
static int skip_value(struct reader *r, uint32_t t, int depth, uint64_t *count_out)
{
	uint32_t et;
	uint64_t n;
	int rc;

	if (t == GGUF_STRING)
		return rd_string(r, NULL, 0);
	if (t != GGUF_ARRAY) {
		if (t >= GGUF_TYPE_COUNT)
			return fail(r, -EINVAL, "bad value type");
		return skip(r, gguf_size[t]);
	}
	if (depth <= 0)
		return fail(r, -EINVAL, "arrays nested too deep");
	rc = rd_u32(r, &et);
	if (rc == 0)
		rc = rd_u64(r, &n);
	if (rc)
		return rc;
	if (et >= GGUF_TYPE_COUNT || n > GGUF_MAX_ARRAY)
		return fail(r, -EINVAL, "bad array");
	if (count_out)
		*count_out = n;
	if (et != GGUF_STRING && et != GGUF_ARRAY) {
		if (n > (r->size - r->pos) / gguf_size[et])
			return fail(r, -EINVAL, "array past the end of the file");
		return skip(r, n * gguf_size[et]);
	}
	for (uint64_t i = 0; i < n; i++) {
		if (r->pos >= r->size)
			return fail(r, -EINVAL, "array past the end of the file");
		rc = skip_value(r, et, depth - 1, NULL);
		if (rc)
			return rc;
	}
	return 0;
}

/* Keys whose value the summary keeps; <arch>.* keys are kept under their
 * suffix with the prefix, and matched against general.architecture at the end
 * (the architecture key may come after them). */
struct kept {
	char prefix[64];
	int64_t v;
	int set;
};

static const char *const arch_suffix[] = {".embedding_length", ".context_length", ".block_count"};
#define N_ARCH_SUFFIX 3

/* Reads one metadata key/value, keeping the values the summary needs
 * (architecture, name, alignment, vocabulary size, <arch>.* numbers). */
static int read_kv(struct reader *r, struct gguf_summary *g, struct kept kept[N_ARCH_SUFFIX],
                   uint32_t *alignment)
{
	char key[256];
	uint32_t t;
	int rc = rd_string(r, key, sizeof(key));

	if (rc == 0)
		rc = rd_u32(r, &t);
	if (rc)
		return rc;
	if (strcmp(key, "general.architecture") == 0 && t == GGUF_STRING)
		return rd_string(r, g->arch, sizeof(g->arch));
	if (strcmp(key, "general.name") == 0 && t == GGUF_STRING)
		return rd_string(r, g->name, sizeof(g->name));
	if (strcmp(key, "general.alignment") == 0 && t != GGUF_STRING && t != GGUF_ARRAY) {
		int64_t v;

		rc = rd_int(r, t, &v);
		if (rc == 0 && (v <= 0 || v > (1 << 20) || (v & (v - 1))))
			return fail(r, -EINVAL, "general.alignment is not a power of two");
		*alignment = (uint32_t)v;
		return rc;
	}
	if (strcmp(key, "tokenizer.ggml.tokens") == 0 && t == GGUF_ARRAY) {
		uint64_t n = 0;

		rc = skip_value(r, t, 2, &n);
		g->n_vocab = (int64_t)n;
		return rc;
	}
	for (int i = 0; i < N_ARCH_SUFFIX; i++) {
		size_t kl = strlen(key), sl = strlen(arch_suffix[i]);

		if (kl > sl && kl - sl < sizeof(kept[i].prefix) &&
		    strcmp(key + kl - sl, arch_suffix[i]) == 0 && t != GGUF_STRING &&
		    t != GGUF_ARRAY && !kept[i].set) {
			memcpy(kept[i].prefix, key, kl - sl);
			kept[i].prefix[kl - sl] = '\0';
			kept[i].set = 1;
			return rd_int(r, t, &kept[i].v);
		}
	}
	return skip_value(r, t, 2, NULL);
}

/* Reads (and hashes) one tensor description: name, dimensions, type,
 * offset. The dimension count is bounded. */
static int read_tensor_info(struct reader *r)
{
	uint32_t n_dims, type;
	uint64_t v;
	int rc = rd_string(r, NULL, 0);

	if (rc == 0)
		rc = rd_u32(r, &n_dims);
	if (rc)
		return rc;
	if (n_dims == 0 || n_dims > GGUF_MAX_DIMS)
		return fail(r, -EINVAL, "tensor with a bad number of dimensions");
	for (uint32_t d = 0; d < n_dims && rc == 0; d++)
		rc = rd_u64(r, &v);
	if (rc == 0)
		rc = rd_u32(r, &type);
	if (rc == 0)
		rc = rd_u64(r, &v); /* offset */
	return rc;
}

/* Hashes GGUF_SAMPLES windows of the tensor data [off, size). */
static int hash_samples(struct reader *r, uint64_t off)
{
	uint64_t len = r->size - off;
	int rc = 0;

	for (int i = 0; i < GGUF_SAMPLES && len; i++) {
		uint64_t at, want;

		if (len <= (uint64_t)GGUF_SAMPLES * GGUF_SAMPLE_BYTES) {
			/* Small data: hash all of it, in sample-sized pieces. */
			at = off + (uint64_t)i * GGUF_SAMPLE_BYTES;
			if (at >= r->size)
				break;
			want = r->size - at < GGUF_SAMPLE_BYTES ? r->size - at : GGUF_SAMPLE_BYTES;
		} else {
			at = off + (len - GGUF_SAMPLE_BYTES) * (uint64_t)i / (GGUF_SAMPLES - 1);
			want = GGUF_SAMPLE_BYTES;
		}
		size_t done = 0;

		while (done < want) {
			ssize_t got =
			    pread(r->fd, r->buf,
			          (size_t)(want - done) < sizeof(r->buf) ? (size_t)(want - done)
			                                                 : sizeof(r->buf),
			          (off_t)(at + done));
			if (got < 0 && errno == EINTR)
				continue;
			if (got <= 0) {
				rc = got < 0 ? -errno : -EINVAL;
				snprintf(r->err, r->errlen,
				         "reading tensor data at %" PRIu64 ": %s", at + done,
				         got < 0 ? strerror(errno) : "short file");
				return rc;
			}
			if (EVP_DigestUpdate(r->md, r->buf, (size_t)got) != 1)
				return fail(r, -ENOMEM, "SHA-256 failed");
			done += (size_t)got;
		}
	}
	return rc;
}

int fingerprint_gguf(const char *path, struct gguf_summary *out, char *err, size_t errlen)
{
	struct reader *r = calloc(1, sizeof(*r));
	struct kept kept[N_ARCH_SUFFIX];
	uint32_t magic, alignment = 32;
	uint8_t le[8];
	struct stat st;
	unsigned mdlen = 0;
	int rc = 0;

	memset(out, 0, sizeof(*out));
	memset(kept, 0, sizeof(kept));
	out->n_embd = out->n_ctx_train = out->n_layer = out->n_vocab = -1;
	snprintf(err, errlen, "ok");
	if (!r) {
		snprintf(err, errlen, "out of memory");
		return -ENOMEM;
	}
	r->fd = -1;
	r->err = err;
	r->errlen = errlen;
	r->md = EVP_MD_CTX_new();
	if (!r->md || EVP_DigestInit_ex(r->md, EVP_sha256(), NULL) != 1) {
		rc = -ENOMEM;
		snprintf(err, errlen, "SHA-256 unavailable");
		goto out;
	}
	r->fd = open(path, O_RDONLY | O_CLOEXEC);
	if (r->fd < 0 || fstat(r->fd, &st) < 0) {
		rc = -errno;
		snprintf(err, errlen, "cannot open %s: %s", path, strerror(errno));
		goto out;
	}
	if (!S_ISREG(st.st_mode)) {
		rc = -EINVAL;
		snprintf(err, errlen, "%s is not a regular file", path);
		goto out;
	}
	r->size = out->file_size = (uint64_t)st.st_size;
	/* The domain and the size first: the same header with other weights of
	 * another size is another model. */
	for (int i = 0; i < 8; i++)
		le[i] = (uint8_t)(r->size >> (8 * i));
	if (EVP_DigestUpdate(r->md, "kvtier-llama/gguf/v1", 20) != 1 ||
	    EVP_DigestUpdate(r->md, le, 8) != 1) {
		rc = -ENOMEM;
		snprintf(err, errlen, "SHA-256 failed");
		goto out;
	}
	rc = rd_u32(r, &magic);
	if (rc)
		goto out;
	if (magic != GGUF_MAGIC) {
		rc = -EINVAL;
		snprintf(err, errlen, "%s is not a GGUF file (bad magic 0x%08x)", path, magic);
		goto out;
	}
	rc = rd_u32(r, &out->version);
	if (rc == 0)
		rc = rd_u64(r, &out->n_tensors);
	if (rc == 0)
		rc = rd_u64(r, &out->n_kv);
	if (rc)
		goto out;
	if (out->version < 2 || out->version > 3) {
		rc = -EINVAL;
		snprintf(err, errlen, "GGUF version %u is not supported (2 or 3)", out->version);
		goto out;
	}
	if (out->n_kv > GGUF_MAX_KV || out->n_tensors > GGUF_MAX_TENSORS) {
		rc = -EINVAL;
		snprintf(err, errlen,
		         "implausible GGUF counts: %" PRIu64 " keys, %" PRIu64 " tensors",
		         out->n_kv, out->n_tensors);
		goto out;
	}
	for (uint64_t i = 0; i < out->n_kv && rc == 0; i++)
		rc = read_kv(r, out, kept, &alignment);
	for (uint64_t i = 0; i < out->n_tensors && rc == 0; i++)
		rc = read_tensor_info(r);
	if (rc)
		goto out;
	{
		uint64_t data = (r->pos + alignment - 1) / alignment * alignment;

		if (data > r->size) {
			rc = -EINVAL;
			snprintf(err, errlen, "tensor data would start past the end of the file");
			goto out;
		}
		rc = hash_samples(r, data);
		if (rc)
			goto out;
	}
	if (EVP_DigestFinal_ex(r->md, out->digest, &mdlen) != 1 || mdlen != 32) {
		rc = -ENOMEM;
		snprintf(err, errlen, "SHA-256 failed");
		goto out;
	}
	for (int i = 0; i < N_ARCH_SUFFIX; i++) {
		if (!kept[i].set || strcmp(kept[i].prefix, out->arch) != 0)
			continue;
		if (i == 0)
			out->n_embd = kept[i].v;
		else if (i == 1)
			out->n_ctx_train = kept[i].v;
		else
			out->n_layer = kept[i].v;
	}
	if (!out->name[0]) {
		const char *base = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;

		snprintf(out->name, sizeof(out->name), "%s", base);
		size_t l = strlen(out->name);
		if (l > 5 && strcmp(out->name + l - 5, ".gguf") == 0)
			out->name[l - 5] = '\0';
	}
out:
	if (r->fd >= 0)
		close(r->fd);
	EVP_MD_CTX_free(r->md);
	free(r);
	return rc;
}

/* A namespace-friendly label: [A-Za-z0-9._-], other bytes as '-', at most
 * LABEL_MAX bytes, "model" when nothing is left. */
static void label_of(const char *s, char *out)
{
	size_t n = 0;

	for (; s && *s && n < LABEL_MAX; s++) {
		unsigned char c = (unsigned char)*s;
		int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		         (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';

		out[n++] = ok ? (char)c : '-';
	}
	out[n] = '\0';
	if (n == 0)
		strcpy(out, "model");
}

/* A KV-settings tag such as "k=f16,v=q8_0,fa=on"; types are labelled too. */
static void kv_tag(const struct fingerprint_kv *kv, char *out, size_t cap)
{
	char k[24], v[24];

	label_of(kv->type_k, k);
	label_of(kv->type_v, v);
	k[16] = v[16] = '\0';
	snprintf(out, cap, "k=%s,v=%s,fa=%s", k, v, kv->flash_attn ? "on" : "off");
}

static void hex20(const uint8_t *d, char *out)
{
	for (int i = 0; i < 10; i++)
		sprintf(out + 2 * i, "%02x", d[i]);
}

void fingerprint_from_gguf(const struct gguf_summary *g, const struct fingerprint_kv *kv,
                           struct fingerprint *out)
{
	char label[LABEL_MAX + 1], tag[64], hex[21];

	label_of(g->name, label);
	kv_tag(kv, tag, sizeof(tag));
	hex20(g->digest, hex);
	memset(out, 0, sizeof(*out));
	snprintf(out->ns, sizeof(out->ns), "kvtier-llama/v1/%s/%s/gguf-%s", label, tag, hex);
	out->source = "model-file";
	snprintf(out->why, sizeof(out->why),
	         "GGUF v%u header and data samples: arch=%s name=\"%s\" size=%" PRIu64
	         " n_layer=%" PRId64 " n_embd=%" PRId64 " n_vocab=%" PRId64 "; KV from options %s",
	         g->version, g->arch[0] ? g->arch : "?", g->name, g->file_size, g->n_layer,
	         g->n_embd, g->n_vocab, tag);
}

/* Appends "key=value\n" for a JSON scalar of obj (missing: "key=-"). */
static void put_field(FILE *f, const char *key, const json_t *obj)
{
	const json_t *v = obj ? json_object_get(obj, key) : NULL;

	if (json_is_integer(v))
		fprintf(f, "%s=%" JSON_INTEGER_FORMAT "\n", key, json_integer_value(v));
	else if (json_is_real(v))
		fprintf(f, "%s=%.17g\n", key, json_real_value(v));
	else if (json_is_string(v))
		fprintf(f, "%s=%s\n", key, json_string_value(v));
	else
		fprintf(f, "%s=-\n", key);
}

int fingerprint_from_props(const json_t *props, const json_t *models,
                           const struct fingerprint_kv *kv, struct fingerprint *out)
{
	const json_t *data = models ? json_object_get(models, "data") : NULL;
	const json_t *m0 = json_is_array(data) ? json_array_get(data, 0) : NULL;
	const json_t *meta = m0 ? json_object_get(m0, "meta") : NULL;
	const char *path = props ? json_string_value(json_object_get(props, "model_path")) : NULL;
	const char *id = m0 ? json_string_value(json_object_get(m0, "id")) : NULL;
	const char *tmpl =
	    props ? json_string_value(json_object_get(props, "chat_template")) : NULL;
	char label[LABEL_MAX + 1], tag[64], hex[21], name[256];
	uint8_t digest[32], tdig[32];
	char *canon = NULL;
	size_t clen = 0;
	unsigned dlen = 0;
	FILE *f;
	int rc = 0;

	memset(out, 0, sizeof(*out));
	out->source = "none";
	if (!path)
		path = id;
	if (!path && !json_is_object(meta)) {
		snprintf(out->why, sizeof(out->why),
		         "neither /props model_path nor /v1/models names the model");
		return -ENODATA;
	}
	{
		const char *base = path ? (strrchr(path, '/') ? strrchr(path, '/') + 1 : path) : "";

		snprintf(name, sizeof(name), "%s", base);
		size_t l = strlen(name);
		if (l > 5 && strcmp(name + l - 5, ".gguf") == 0)
			name[l - 5] = '\0';
	}
	memset(tdig, 0, sizeof(tdig));
	if (tmpl && EVP_Digest(tmpl, strlen(tmpl), tdig, &dlen, EVP_sha256(), NULL) != 1)
		return -ENOMEM;
	f = open_memstream(&canon, &clen);
	if (!f)
		return -ENOMEM;
	fprintf(f, "kvtier-llama/props/v1\nname=%s\ntemplate=", name);
	for (int i = 0; i < 32; i++)
		fprintf(f, "%02x", tmpl ? tdig[i] : 0);
	fputc('\n', f);
	put_field(f, "vocab_type", meta);
	put_field(f, "n_vocab", meta);
	put_field(f, "n_ctx_train", meta);
	put_field(f, "n_embd", meta);
	put_field(f, "n_params", meta);
	put_field(f, "size", meta);
	if (fclose(f) != 0) {
		free(canon);
		return -ENOMEM;
	}
	if (EVP_Digest(canon, clen, digest, &dlen, EVP_sha256(), NULL) != 1)
		rc = -ENOMEM;
	free(canon);
	if (rc)
		return rc;
	label_of(name, label);
	kv_tag(kv, tag, sizeof(tag));
	hex20(digest, hex);
	snprintf(out->ns, sizeof(out->ns), "kvtier-llama/v1/%s/%s/props-%s", label, tag, hex);
	out->source = "props";
	{
		const json_t *ne = meta ? json_object_get(meta, "n_embd") : NULL;
		const json_t *np = meta ? json_object_get(meta, "n_params") : NULL;
		const json_t *sz = meta ? json_object_get(meta, "size") : NULL;

		snprintf(out->why, sizeof(out->why),
		         "/props and /v1/models: model=\"%s\" n_embd=%" JSON_INTEGER_FORMAT
		         " n_params=%" JSON_INTEGER_FORMAT " size=%" JSON_INTEGER_FORMAT
		         " chat_template=%s; KV from options %s (give --model-file for a "
		         "fingerprint of the file itself)",
		         name, json_integer_value(ne), json_integer_value(np),
		         json_integer_value(sz), tmpl ? "hashed" : "absent", tag);
	}
	return 0;
}

int fingerprint_gguf_matches(const struct gguf_summary *g, const json_t *models, char *why,
                             size_t whylen)
{
	const json_t *data = models ? json_object_get(models, "data") : NULL;
	const json_t *m0 = json_is_array(data) ? json_array_get(data, 0) : NULL;
	const json_t *meta = m0 ? json_object_get(m0, "meta") : NULL;
	static const char *const keys[] = {"n_embd", "n_ctx_train", "n_vocab"};
	const int64_t mine[] = {g->n_embd, g->n_ctx_train, g->n_vocab};

	snprintf(why, whylen, "agrees");
	for (int i = 0; i < 3; i++) {
		const json_t *v = meta ? json_object_get(meta, keys[i]) : NULL;

		if (!json_is_integer(v) || mine[i] < 0)
			continue;
		if (json_integer_value(v) != mine[i]) {
			snprintf(why, whylen,
			         "the server reports %s=%" JSON_INTEGER_FORMAT
			         " but the model file "
			         "has %" PRId64,
			         keys[i], json_integer_value(v), mine[i]);
			return 0;
		}
	}
	return 1;
}
