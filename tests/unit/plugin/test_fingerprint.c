/* test_fingerprint.c: the GGUF header reader and the namespaces built from it
 * or from /props. Synthetic GGUF files are written here; the real micro.gguf
 * (KVTIER_MODEL_FILE, or $KVTIER_FIXTURES/models/micro.gguf) is read when
 * present. Exit 0 pass, 1 fail. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fingerprint.h"

static int failures;

#define CHECK(cond)                                                                                \
	do {                                                                                       \
		if (!(cond)) {                                                                     \
			fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);   \
			failures++;                                                                \
		}                                                                                  \
	} while (0)

static void u32(FILE *f, uint32_t v)
{
	fwrite(&v, 4, 1, f); /* the tests run on little-endian hosts, as GGUF is */
}

static void u64(FILE *f, uint64_t v)
{
	fwrite(&v, 8, 1, f);
}

static void str(FILE *f, const char *s)
{
	u64(f, strlen(s));
	fwrite(s, 1, strlen(s), f);
}

/* A GGUF v3 file: architecture, name, embedding length, a token array, one
 * tensor, 32-byte aligned data of data_len bytes filled with `fill`. */
static void write_gguf(const char *path, uint64_t n_kv_claimed, size_t data_len, int fill,
                       int truncate_at)
{
	FILE *f = fopen(path, "wb");
	long pos;

	if (!f) {
		perror(path);
		exit(1);
	}
	u32(f, 0x46554747u);
	u32(f, 3);
	u64(f, 1);            /* tensors */
	u64(f, n_kv_claimed); /* key/values */
	str(f, "general.architecture");
	u32(f, 8);
	str(f, "llama");
	str(f, "general.name");
	u32(f, 8);
	str(f, "tiny test");
	str(f, "llama.embedding_length");
	u32(f, 4);
	u32(f, 64);
	str(f, "tokenizer.ggml.tokens");
	u32(f, 9);
	u32(f, 8);
	u64(f, 3);
	str(f, "a");
	str(f, "b");
	str(f, "c");
	/* tensor info: name, n_dims, dims, type, offset */
	str(f, "w");
	u32(f, 1);
	u64(f, data_len / 2);
	u32(f, 1);
	u64(f, 0);
	pos = ftell(f);
	while (pos % 32) {
		fputc(0, f);
		pos++;
	}
	for (size_t i = 0; i < data_len; i++)
		fputc(fill, f);
	fclose(f);
	if (truncate_at > 0 && truncate(path, truncate_at) != 0)
		perror("truncate");
}

static void test_synthetic(const char *dir)
{
	char p1[512], p2[512], err[256];
	struct gguf_summary a, b;
	struct fingerprint fa, fb;
	struct fingerprint_kv kv = {"f16", "f16", 0}, kv_fa = {"f16", "f16", 1};

	snprintf(p1, sizeof(p1), "%s/a.gguf", dir);
	snprintf(p2, sizeof(p2), "%s/b.gguf", dir);
	write_gguf(p1, 4, 4096, 1, 0);
	CHECK(fingerprint_gguf(p1, &a, err, sizeof(err)) == 0);
	CHECK(a.version == 3 && a.n_kv == 4 && a.n_tensors == 1);
	CHECK(strcmp(a.arch, "llama") == 0 && strcmp(a.name, "tiny test") == 0);
	CHECK(a.n_embd == 64 && a.n_vocab == 3 && a.n_layer == -1 && a.n_ctx_train == -1);
	/* Same header, other weights: another fingerprint. */
	write_gguf(p2, 4, 4096, 2, 0);
	CHECK(fingerprint_gguf(p2, &b, err, sizeof(err)) == 0);
	CHECK(memcmp(a.digest, b.digest, 32) != 0);
	fingerprint_from_gguf(&a, &kv, &fa);
	fingerprint_from_gguf(&b, &kv, &fb);
	CHECK(strcmp(fa.ns, fb.ns) != 0 && strcmp(fa.source, "model-file") == 0);
	CHECK(strncmp(fa.ns, "kvtier-llama/v1/tiny-test/k=f16,v=f16,fa=off/gguf-", 50) == 0);
	/* Same file, flash attention: another namespace. */
	fingerprint_from_gguf(&a, &kv_fa, &fb);
	CHECK(strcmp(fa.ns, fb.ns) != 0 && strstr(fb.ns, "fa=on"));
	/* Deterministic. */
	CHECK(fingerprint_gguf(p1, &b, err, sizeof(err)) == 0 &&
	      memcmp(a.digest, b.digest, 32) == 0);
	/* Malformed files are refused, never trusted. */
	write_gguf(p2, 4, 4096, 1, 60);
	CHECK(fingerprint_gguf(p2, &b, err, sizeof(err)) == -EINVAL && strstr(err, "truncated"));
	write_gguf(p2, 1u << 30, 64, 1, 0);
	CHECK(fingerprint_gguf(p2, &b, err, sizeof(err)) == -EINVAL);
	write_gguf(p2, 9, 64, 1, 0); /* claims more keys than there are */
	CHECK(fingerprint_gguf(p2, &b, err, sizeof(err)) == -EINVAL);
	{
		FILE *f = fopen(p2, "wb");

		fputs("not a gguf file at all", f);
		fclose(f);
	}
	CHECK(fingerprint_gguf(p2, &b, err, sizeof(err)) == -EINVAL && strstr(err, "magic"));
	CHECK(fingerprint_gguf("/nonexistent/x.gguf", &b, err, sizeof(err)) == -ENOENT);
	unlink(p1);
	unlink(p2);
}

static void test_props(void)
{
	struct fingerprint_kv kv = {"q8_0", "q8_0", 1};
	struct fingerprint f1, f2;
	json_t *props = json_pack("{s:s, s:s}", "model_path", "/models/m-Q4_K_M.gguf",
	                          "chat_template", "{{ messages }}");
	json_t *models = json_pack("{s:[{s:s, s:{s:i, s:i, s:i}}]}", "data", "id", "m", "meta",
	                           "n_vocab", 32000, "n_embd", 4096, "n_ctx_train", 8192);
	json_t *props2 = json_pack("{s:s, s:s}", "model_path", "/other/dir/m-Q4_K_M.gguf",
	                           "chat_template", "{{ other }}");
	struct gguf_summary g;
	char why[256];

	CHECK(fingerprint_from_props(props, models, &kv, &f1) == 0);
	CHECK(strcmp(f1.source, "props") == 0);
	CHECK(strncmp(f1.ns, "kvtier-llama/v1/m-Q4_K_M/k=q8_0,v=q8_0,fa=on/props-", 51) == 0);
	CHECK(fingerprint_from_props(props, models, &kv, &f2) == 0 && strcmp(f1.ns, f2.ns) == 0);
	/* Another template: another model as far as the plugin can tell. */
	CHECK(fingerprint_from_props(props2, models, &kv, &f2) == 0 && strcmp(f1.ns, f2.ns) != 0);
	CHECK(fingerprint_from_props(NULL, NULL, &kv, &f2) == -ENODATA && f2.ns[0] == '\0' &&
	      strcmp(f2.source, "none") == 0);
	memset(&g, 0, sizeof(g));
	g.n_embd = 4096;
	g.n_ctx_train = 8192;
	g.n_vocab = 32000;
	CHECK(fingerprint_gguf_matches(&g, models, why, sizeof(why)) == 1);
	g.n_embd = 64;
	CHECK(fingerprint_gguf_matches(&g, models, why, sizeof(why)) == 0 && strstr(why, "n_embd"));
	json_decref(props);
	json_decref(props2);
	json_decref(models);
}

static void test_real_model(void)
{
	const char *path = getenv("KVTIER_MODEL_FILE"), *fx = getenv("KVTIER_FIXTURES");
	char buf[1024], err[256];
	struct gguf_summary g;

	if (path && !path[0])
		path = NULL;
	if (!path && fx && fx[0]) {
		snprintf(buf, sizeof(buf), "%s/models/micro.gguf", fx);
		path = buf;
	}
	/* The model is in the tree (tests/fixtures/llama-slots/models): its
	 * absence is a broken checkout, not a reason to pass. */
	if (!path || access(path, R_OK) != 0) {
		fprintf(stderr, "test_fingerprint: %s: not readable (KVTIER_FIXTURES or "
			"KVTIER_MODEL_FILE)\n", path ? path : "no micro.gguf");
		exit(1);
	}
	CHECK(fingerprint_gguf(path, &g, err, sizeof(err)) == 0);
	CHECK(strcmp(g.arch, "llama") == 0 && g.n_layer == 2 && g.n_embd == 64 &&
	      g.n_vocab == 32000 && g.n_ctx_train == 32768);
}

int main(void)
{
	char dir[] = "/tmp/kvtier-fp-XXXXXX";

	if (!mkdtemp(dir)) {
		perror("mkdtemp");
		return 1;
	}
	test_synthetic(dir);
	test_props();
	test_real_model();
	rmdir(dir);
	if (failures) {
		fprintf(stderr, "%d check(s) failed\n", failures);
		return 1;
	}
	printf("test_fingerprint: ok\n");
	return 0;
}
