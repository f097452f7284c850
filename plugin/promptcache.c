/* promptcache.c: a model of llama-server's RAM prompt cache; see
 * promptcache.h. The rules are those of llama.cpp's tools/server
 * (server-context.cpp get_available_slot, server-task.cpp
 * server_prompt_cache::alloc, load and update) as of mid-2026.
 */
#include "promptcache.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#define SLOT_PROMPT_SIMILARITY 0.1 /* --slot-prompt-similarity's default */
#define KEEP_TO_UPDATE 0.5         /* a slot keeping less than this consults the cache */
#define KEEP_TO_LOAD 0.25          /* an entry keeping less than this is not loaded */

static size_t common_prefix(const int32_t *a, size_t na, const int32_t *b, size_t nb)
{
	size_t i, n = na < nb ? na : nb;

	for (i = 0; i < n && a[i] == b[i]; i++)
		;
	return i;
}

void pcache_init(struct pcache *pc, uint64_t limit_bytes, double bytes_per_token)
{
	memset(pc, 0, sizeof(*pc));
	pc->limit_bytes = limit_bytes;
	pc->bytes_per_token = bytes_per_token > 1 ? bytes_per_token : 1;
}

void pcache_clear(struct pcache *pc)
{
	for (unsigned i = 0; i < pc->n_entries; i++)
		free(pc->e[i].tokens);
	pc->n_entries = 0;
}

void pcache_remove(struct pcache *pc, int idx)
{
	if (idx < 0 || (unsigned)idx >= pc->n_entries)
		return;
	free(pc->e[idx].tokens);
	memmove(&pc->e[idx], &pc->e[idx + 1], (pc->n_entries - (unsigned)idx - 1) * sizeof(pc->e[0]));
	pc->n_entries--;
}

int pcache_save(struct pcache *pc, const int32_t *tokens, size_t n)
{
	double bytes = 0;
	int32_t *copy;

	if (!pc->limit_bytes || n == 0)
		return 0;
	for (unsigned i = 0; i < pc->n_entries; i++)
		if (common_prefix(pc->e[i].tokens, pc->e[i].n, tokens, n) == n)
			return 0; /* already held whole */
	for (unsigned i = 0; i < pc->n_entries;)
		if (common_prefix(pc->e[i].tokens, pc->e[i].n, tokens, n) == pc->e[i].n)
			pcache_remove(pc, (int)i); /* obsolete: the new one holds it */
		else
			i++;
	if ((double)n * pc->bytes_per_token > (double)pc->limit_bytes)
		return 0; /* over the limit alone: the server skips it */
	copy = malloc(n * sizeof(*copy));
	if (!copy) {
		pcache_clear(pc);
		return -ENOMEM;
	}
	memcpy(copy, tokens, n * sizeof(*copy));
	if (pc->n_entries == PCACHE_MAX_ENTRIES)
		pcache_remove(pc, 0);
	pc->e[pc->n_entries].tokens = copy;
	pc->e[pc->n_entries].n = n;
	pc->n_entries++;
	/* update(): the oldest leave while over the size limit */
	for (unsigned i = 0; i < pc->n_entries; i++)
		bytes += (double)pc->e[i].n * pc->bytes_per_token;
	while (pc->n_entries > 1 && bytes > (double)pc->limit_bytes) {
		bytes -= (double)pc->e[0].n * pc->bytes_per_token;
		pcache_remove(pc, 0);
	}
	return 0;
}

int pcache_consults(const struct pcache *pc, const int32_t *prompt, size_t n,
		    const int32_t *slot_tokens, size_t slot_n)
{
	size_t slot_lcp;
	double f_keep, f_sim;

	/* A pinned slot that is empty never consults the cache (its f_keep is
	 * 0/0); one that shares little with the prompt (below the similarity
	 * threshold f_keep is taken as 0) or would lose most of itself does. */
	if (!pc->limit_bytes || n == 0 || slot_n == 0)
		return 0;
	slot_lcp = common_prefix(slot_tokens, slot_n, prompt, n);
	f_sim = (double)slot_lcp / (double)n;
	f_keep = f_sim > SLOT_PROMPT_SIMILARITY ? (double)slot_lcp / (double)slot_n : 0;
	return f_keep < KEEP_TO_UPDATE;
}

int pcache_choose(const struct pcache *pc, const int32_t *prompt, size_t n,
		  const int32_t *slot_tokens, size_t slot_n, size_t *lcp)
{
	size_t slot_lcp = slot_n ? common_prefix(slot_tokens, slot_n, prompt, n) : 0;
	double keep_best, sim_best;
	int best = -1;

	*lcp = slot_lcp;
	if (!pcache_consults(pc, prompt, n, slot_tokens, slot_n))
		return -1;
	keep_best = (double)slot_lcp / (double)slot_n;
	sim_best = (double)slot_lcp / (double)n;
	for (unsigned i = 0; i < pc->n_entries; i++) {
		size_t l = common_prefix(pc->e[i].tokens, pc->e[i].n, prompt, n);
		double k = (double)l / (double)pc->e[i].n, s = (double)l / (double)n;

		if (k < KEEP_TO_LOAD)
			continue;
		if (keep_best < k && sim_best < s) {
			keep_best = k;
			sim_best = s;
			best = (int)i;
			*lcp = l;
		}
	}
	return best;
}
