/* test_promptcache.c: the model of llama-server's RAM prompt cache
 * (plugin/promptcache.c) against the rules of server-context.cpp
 * get_available_slot and server-task.cpp server_prompt_cache alloc/load/update,
 * case by case.
 */
#include "check.h"
#include "promptcache.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A prompt: `shared` tokens of a common system prompt, then `own` tokens
 * of conversation c. */
static size_t conv(int32_t *t, size_t shared, size_t own, int c)
{
	for (size_t i = 0; i < shared; i++)
		t[i] = (int32_t)(1000 + i);
	for (size_t i = 0; i < own; i++)
		t[shared + i] = (int32_t)(c * 100000 + i);
	return shared + own;
}

int main(void)
{
	static int32_t a[4000], a2[4000], b[4000], c[4000];
	size_t na, na2, nb, nc, lcp;
	struct pcache pc;
	int idx;

	na = conv(a, 0, 1000, 1);
	memcpy(a2, a, sizeof(a));
	for (size_t i = 0; i < 200; i++) /* a's next turn: a, then 200 more */
		a2[na + i] = (int32_t)(777000 + i);
	na2 = na + 200;
	nb = conv(b, 0, 1500, 2);
	nc = conv(c, 0, 300, 3);

	/* Off: nothing is kept, nothing is consulted. */
	pcache_init(&pc, 0, 1024);
	CHECK_EQ_INT(pcache_save(&pc, a, na), 0);
	CHECK_EQ_INT(pc.n_entries, 0);
	CHECK_EQ_INT(pcache_choose(&pc, a2, na2, b, nb, &lcp), -1);

	pcache_clear(&pc);
	pcache_init(&pc, 1ull << 30, 1024); /* 1 GiB, 1 KiB per token: 1M tokens */
	CHECK_EQ_INT(pcache_save(&pc, a, na), 0);
	CHECK_EQ_INT(pc.n_entries, 1);
	/* An empty pinned slot never consults the cache (f_keep is 0/0). */
	CHECK(!pcache_consults(&pc, a2, na2, NULL, 0));
	CHECK_EQ_INT(pcache_choose(&pc, a2, na2, NULL, 0, &lcp), -1);
	CHECK_EQ_INT(lcp, 0);
	/* A slot holding another conversation does, and a's entry is loaded. */
	CHECK(pcache_consults(&pc, a2, na2, b, nb));
	idx = pcache_choose(&pc, a2, na2, b, nb, &lcp);
	CHECK_EQ_INT(idx, 0);
	CHECK_EQ_INT(lcp, na);
	/* A slot keeping half or more of itself for this prompt does not. */
	CHECK(!pcache_consults(&pc, a2, na2, a, na));
	CHECK_EQ_INT(pcache_choose(&pc, a2, na2, a, na, &lcp), -1);
	CHECK_EQ_INT(lcp, na);
	/* Below the similarity threshold (0.1 of the prompt) f_keep counts as 0. */
	{
		static int32_t s[4000];
		size_t ns = conv(s, 0, 2000, 4);
		memcpy(s, a2, 100 * sizeof(int32_t)); /* 100 of 1200: 0.083 */
		CHECK(pcache_consults(&pc, a2, na2, s, 120));
		memcpy(s, a2, 200 * sizeof(int32_t)); /* 200 of 1200, keeps 200/210 */
		CHECK(!pcache_consults(&pc, a2, na2, s, 210));
		(void)ns;
	}

	/* alloc: a prompt held whole by an entry is not saved again; entries the
	 * new one holds whole go. */
	CHECK_EQ_INT(pcache_save(&pc, a, 500), 0);
	CHECK_EQ_INT(pc.n_entries, 1);
	CHECK_EQ_INT(pcache_save(&pc, a2, na2), 0);
	CHECK_EQ_INT(pc.n_entries, 1);
	CHECK_EQ_INT(pc.e[0].n, na2);
	CHECK_EQ_INT(pcache_save(&pc, b, nb), 0);
	CHECK_EQ_INT(pc.n_entries, 2);

	/* load: an entry keeping less than a quarter of itself is not taken. */
	{
		static int32_t q[4000];
		size_t nq;

		memcpy(q, b, 300 * sizeof(int32_t)); /* shares 300 of b's 1500: 0.2 */
		nq = 300 + conv(q + 300, 0, 100, 5);
		CHECK_EQ_INT(pcache_choose(&pc, q, nq, c, nc, &lcp), -1);
		memcpy(q, b, 400 * sizeof(int32_t)); /* 400 of 1500: 0.27 */
		CHECK_EQ_INT(pcache_choose(&pc, q, 500, c, nc, &lcp), 1);
		CHECK_EQ_INT(lcp, 400);
	}

	/* update: the oldest go while over the size. */
	pcache_clear(&pc);
	pcache_init(&pc, 2500 * 1024, 1024); /* 2,500 tokens */
	CHECK_EQ_INT(pcache_save(&pc, a, na), 0);  /* 1000 */
	CHECK_EQ_INT(pcache_save(&pc, b, nb), 0);  /* 2500 */
	CHECK_EQ_INT(pc.n_entries, 2);
	CHECK_EQ_INT(pcache_save(&pc, c, nc), 0);  /* 2800: a goes */
	CHECK_EQ_INT(pc.n_entries, 2);
	CHECK(pc.e[0].tokens[0] == b[0] && pc.e[1].tokens[0] == c[0]);
	/* A prompt larger than the whole cache is skipped. */
	{
		static int32_t big[4000];
		size_t n = conv(big, 0, 3000, 6);
		CHECK_EQ_INT(pcache_save(&pc, big, n), 0);
		CHECK_EQ_INT(pc.n_entries, 2);
	}
	pcache_remove(&pc, 0);
	CHECK_EQ_INT(pc.n_entries, 1);
	CHECK(pc.e[0].tokens[0] == c[0]);
	pcache_remove(&pc, 5); /* out of range: nothing */
	pcache_remove(&pc, -1);
	CHECK_EQ_INT(pc.n_entries, 1);

	/* At most PCACHE_MAX_ENTRIES: the oldest goes. */
	pcache_clear(&pc);
	pcache_init(&pc, 1ull << 40, 1);
	for (int i = 0; i < PCACHE_MAX_ENTRIES + 5; i++) {
		static int32_t t[10];
		for (int k = 0; k < 10; k++)
			t[k] = i * 100 + k;
		CHECK_EQ_INT(pcache_save(&pc, t, 10), 0);
	}
	CHECK_EQ_INT(pc.n_entries, PCACHE_MAX_ENTRIES);
	CHECK_EQ_INT(pc.e[0].tokens[0], 500);
	pcache_clear(&pc);
	CHECK_EQ_INT(pc.n_entries, 0);
	printf("test_promptcache: ok\n");
	return 0;
}
