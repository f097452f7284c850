/* dataset.h: the synthetic data set of the index_scale benchmark, shared by
 * the populator (kvtier_index_populate) and the lookup driver
 * (kvtier_index_lookup) through a query file.
 *
 * Query file (written by the populator, read by the lookup driver), all
 * little-endian:
 *   u32 magic QFILE_MAGIC, u32 n_namespaces, u32 n_queries,
 *   then per query: u32 ns (index; n_namespaces = a namespace nobody uses),
 *   u32 kind (enum query_kind), u32 expected (tokens the best blob should
 *   match; 0 = a miss), u32 n, n x i32 tokens.
 * Namespace i is named "bench/index-scale/ns-<i>".
 */
#ifndef KVTIER_BENCH_DATASET_H
#define KVTIER_BENCH_DATASET_H

#include <stdint.h>
#include <stdio.h>

#define QFILE_MAGIC 0x6b767131u /* "1qvk" */
#define DATASET_NS_FMT "bench/index-scale/ns-%u"
#define DATASET_VOCAB 151936u  /* Qwen2's vocabulary size: realistic varint lengths */

enum query_kind {
	QUERY_DEEP = 0,    /* extends a long conversation (2K..32K tokens matched) */
	QUERY_TURN,        /* extends a short conversation's turn (128..~600 matched) */
	QUERY_SYSTEM,      /* shares only a system prompt with stored blobs */
	QUERY_MISS,        /* shares nothing */
	QUERY_OTHER_NS,    /* a namespace with no blobs */
	QUERY_KINDS
};

static const char *const query_kind_name[QUERY_KINDS] = {"deep", "turn", "system", "miss",
							 "other_ns"};

/* splitmix64: a fast deterministic generator, good enough for token ids. */
static inline uint64_t ds_next(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* Uniform in [lo, hi]. */
static inline uint32_t ds_range(uint64_t *s, uint32_t lo, uint32_t hi)
{
	return lo + (uint32_t)(ds_next(s) % ((uint64_t)hi - lo + 1));
}

static inline int32_t ds_token(uint64_t *s)
{
	return (int32_t)(3 + ds_next(s) % (DATASET_VOCAB - 3));
}

#endif /* KVTIER_BENCH_DATASET_H */
