/* policy.h: the arithmetic of placement (DESIGN.md, "Tiers and placement").
 *
 * Pure functions and small models, no I/O and no locks, so they can be
 * tested exactly and the worked example in docs/policy.md can be reproduced
 * by hand:
 *
 * - a tier's restore cost:   t(bytes)   = fixed_s + bytes / bytes_per_s
 * - a namespace's prefill:   T(n)       = a * n + b * n^2 / 2 seconds for
 *   n tokens from an empty context (each token at depth d costs a + b * d:
 *   attention makes later tokens dearer, so tokens/s falls as contexts grow)
 * - the value of a blob on a tier: value = T(n_tokens) - t(bytes), seconds
 *   saved by restoring instead of recomputing; <= 0 means "not worth it"
 * - GreedyDual-Size-Frequency priority: H = L + frequency * value / bytes,
 *   where L is the tier's inflation value (the H of the last blob evicted
 *   from it), frozen into the blob at its last access. Low H goes first.
 */
#ifndef KVTIER_POLICY_H
#define KVTIER_POLICY_H

#include <stddef.h>
#include <stdint.h>

/* Restore-time model of one tier, fed by a probe at start and every read. */
struct cost_model {
	double fixed_s;     /* seconds per restore regardless of size */
	double bytes_per_s; /* sustained throughput */
	uint64_t samples;   /* reads observed (the probe is not counted) */
};

/* Starts the model from a probe (or a guess when the probe failed). */
void cost_model_init(struct cost_model *m, double fixed_s, double bytes_per_s);

/* Feeds one real read of `bytes` (all parts of a blob, as served) that took
 * `seconds`. Large reads update the throughput, small ones the fixed cost
 * (exponential moving averages, weight COST_ALPHA for the new sample). */
void cost_model_observe(struct cost_model *m, uint64_t bytes, double seconds);

/* Estimated seconds to restore `bytes` from the tier. */
double cost_model_time(const struct cost_model *m, uint64_t bytes);

#define COST_ALPHA 0.2
#define COST_SMALL_BYTES (256u << 10) /* reads up to this size measure fixed_s */
#define COST_LARGE_BYTES (1u << 20)   /* reads from this size measure bytes_per_s */

/* Prefill model of one namespace: a weighted least-squares fit of
 * (a, b) to reported prefills, with older reports decaying by PREFILL_DECAY
 * per new one. Stored as 8 doubles in the namespace record (index.h). */
struct prefill_model {
	double s11, s12, s22, s1y, s2y; /* decayed sums of the normal equations */
	double a, b;                    /* seconds per token; extra per token of depth */
	double samples;
};

#define PREFILL_DECAY 0.95

/* Plausibility of one prefill report (Report): no hardware prefills faster
 * than PREFILL_MAX_TPS tokens/s or slower than PREFILL_MAX_MS_PER_TOKEN, and
 * no prompt is longer than the longest slot file (4M tokens). A report
 * outside these bounds is a client bug or a clock glitch, and is refused. */
#define PREFILL_MAX_TPS 1e7              /* tokens/s: 0.1 microseconds per token */
#define PREFILL_MAX_MS_PER_TOKEN 60000.0 /* a minute per token */
#define PREFILL_MAX_TOKENS (1u << 22)    /* SLOT_MAX_TOKENS */
#define PREFILL_MAX_MS 1e9

/* Robustness of the fit: once a model exists, one report counts at most
 * PREFILL_MAX_STEP times slower or faster than the model predicts for it,
 * and weighs at most as much as all earlier reports together. One outlier
 * then moves the model by less than a factor of (1 + PREFILL_MAX_STEP) / 2,
 * while a real change of speed still wins after a few reports. */
#define PREFILL_MAX_STEP 4.0

/* Checks one report: `tokens` prefilled in `ms` milliseconds. Returns 0, or
 * -EINVAL with a message in err (what is implausible, and the bound). */
int prefill_report_check(uint32_t tokens, double ms, char *err, size_t errlen);

void prefill_from_words(struct prefill_model *m, const double w[8]);
void prefill_to_words(const struct prefill_model *m, double w[8]);

/* Feeds a report: `tokens` were prefilled after `prefix` tokens already in
 * the context (restored or cached) and took `seconds`. Once the model knows
 * something, the report is clamped to PREFILL_MAX_STEP of the prediction
 * and its weight to the history's (see PREFILL_MAX_STEP). */
void prefill_observe(struct prefill_model *m, uint32_t prefix, uint32_t tokens, double seconds);

/* 1 when at least one report was fitted. */
int prefill_known(const struct prefill_model *m);

/* Seconds to prefill n tokens from an empty context (assumed_tps is used
 * when the model is unknown). */
double prefill_seconds(const struct prefill_model *m, uint32_t n, double assumed_tps);

/* Tokens per second when the context is `depth` tokens deep (0 if unknown). */
double prefill_tps_at(const struct prefill_model *m, uint32_t depth);

/* The namespace's displayed speed (an exponential moving average with
 * weight alpha of tokens/s), fed with one report's speed `tps` after
 * `samples` earlier ones. A report is clamped to PREFILL_MAX_STEP of the
 * previous value first. Returns the new value. */
double prefill_tps_blend(double prev, double samples, double tps, double alpha);

/* GDSF priority; frequency is hits + 1 (the save counts as one use). A
 * negative value (restoring costs more than recomputing) gives a priority
 * below L: such blobs go first. */
double gdsf_priority(double base, uint64_t hits, double value_s, uint64_t bytes);

#endif /* KVTIER_POLICY_H */
