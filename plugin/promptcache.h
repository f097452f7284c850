/* promptcache.h: a model of one llama-server's own RAM prompt cache.
 *
 * Since late 2025 llama-server keeps prompts in RAM (--cache-ram, 8 GiB by
 * default; tools/server/server-task.cpp server_prompt_cache) and, by default
 * (--cache-idle-slots), copies every idle slot into it when a task starts,
 * clearing the slot when the KV cache is unified (the default with
 * --parallel auto). It loads an entry into the slot a task is given when
 * that slot holds something else (get_available_slot: f_keep < 0.5) and the
 * entry keeps at least a quarter of itself and beats the slot.
 *
 * The plugin cannot see that cache, so it keeps this model of it, fed with
 * what it sends: a restore is skipped when the server would load the prefix
 * from its own cache anyway, and a slot cleared by the server is known to be
 * empty. The model errs both ways; the answer's prompt_n corrects it.
 *
 * Not thread-safe: the caller holds its own lock.
 */
#ifndef KVTIER_PLUGIN_PROMPTCACHE_H
#define KVTIER_PLUGIN_PROMPTCACHE_H

#include <stddef.h>
#include <stdint.h>

#define PCACHE_MAX_ENTRIES 64

struct pcache_entry {
	int32_t *tokens;
	size_t n;
};

struct pcache {
	struct pcache_entry e[PCACHE_MAX_ENTRIES]; /* oldest first */
	unsigned n_entries;
	uint64_t limit_bytes;     /* --cache-ram of the server; 0 = the cache is off */
	double bytes_per_token;   /* of the server's state, from the layout probe */
};

/* An empty model; limit_bytes 0 turns it off (every call then does nothing).
 * On a model in use, pcache_clear() first (init forgets its entries). */
void pcache_init(struct pcache *pc, uint64_t limit_bytes, double bytes_per_token);
void pcache_clear(struct pcache *pc);

/* server_prompt_cache::alloc + update: the slot holding tokens is saved (not
 * when an entry already holds all of it; entries it holds wholly go), then
 * the oldest entries leave while the cache is over its size. Returns 0, or
 * -ENOMEM (the model then forgets everything, which only costs restores). */
int pcache_save(struct pcache *pc, const int32_t *tokens, size_t n);

/* get_available_slot + server_prompt_cache::load for a task of prompt
 * (n tokens) pinned to a slot holding slot_tokens (slot_n; 0 = empty):
 * whether the server consults the cache, and which entry it loads.
 * Returns the entry's index and sets *lcp to the prefix it brings, or -1
 * (the slot keeps its own; *lcp is then the slot's common prefix). */
int pcache_choose(const struct pcache *pc, const int32_t *prompt, size_t n,
		  const int32_t *slot_tokens, size_t slot_n, size_t *lcp);

/* Whether a task of prompt pinned to a slot holding slot_tokens makes the
 * server consult (and first save the slot into) its cache: the slot holds
 * something and would keep less than half of it. */
int pcache_consults(const struct pcache *pc, const int32_t *prompt, size_t n,
		    const int32_t *slot_tokens, size_t slot_n);

/* The entry was loaded into a slot (load() removes it), or the model was
 * wrong about it: it goes. */
void pcache_remove(struct pcache *pc, int idx);

#endif /* KVTIER_PLUGIN_PROMPTCACHE_H */
