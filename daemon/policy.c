/* policy.c: the arithmetic of placement (policy.h). */
#include "policy.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

void cost_model_init(struct cost_model *m, double fixed_s, double bytes_per_s)
{
	m->fixed_s = fixed_s >= 0 && isfinite(fixed_s) ? fixed_s : 0;
	m->bytes_per_s = bytes_per_s > 0 && isfinite(bytes_per_s) ? bytes_per_s : 1e9;
	m->samples = 0;
}

void cost_model_observe(struct cost_model *m, uint64_t bytes, double seconds)
{
	if (!(seconds >= 0) || !isfinite(seconds))
		return;
	if (bytes >= COST_LARGE_BYTES) {
		double io = seconds - m->fixed_s;
		/* A read faster than the fixed cost says the fixed cost is too
		 * high, not that throughput is infinite: use the whole time. */
		double bps = (double)bytes / (io > seconds * 0.1 ? io : seconds);
		m->bytes_per_s = COST_ALPHA * bps + (1 - COST_ALPHA) * m->bytes_per_s;
	} else if (bytes <= COST_SMALL_BYTES) {
		double fixed = seconds - (double)bytes / m->bytes_per_s;
		if (fixed < 0)
			fixed = 0;
		m->fixed_s = COST_ALPHA * fixed + (1 - COST_ALPHA) * m->fixed_s;
	} else {
		return; /* in between: both terms matter, neither is isolated */
	}
	m->samples++;
}

double cost_model_time(const struct cost_model *m, uint64_t bytes)
{
	return m->fixed_s + (double)bytes / m->bytes_per_s;
}

void prefill_from_words(struct prefill_model *m, const double w[8])
{
	m->s11 = w[0];
	m->s12 = w[1];
	m->s22 = w[2];
	m->s1y = w[3];
	m->s2y = w[4];
	m->a = w[5];
	m->b = w[6];
	m->samples = w[7];
}

void prefill_to_words(const struct prefill_model *m, double w[8])
{
	w[0] = m->s11;
	w[1] = m->s12;
	w[2] = m->s22;
	w[3] = m->s1y;
	w[4] = m->s2y;
	w[5] = m->a;
	w[6] = m->b;
	w[7] = m->samples;
}

int prefill_report_check(uint32_t tokens, double ms, char *err, size_t errlen)
{
	const char *why = NULL;
	double bound = 0;

	/* Compared as products, never as a quotient: 10 tokens in 1e-300 ms
	 * would overflow tokens/s to inf. */
	if (tokens == 0 || tokens > PREFILL_MAX_TOKENS) {
		why = "the token count must be 1 to";
		bound = PREFILL_MAX_TOKENS;
	} else if (!(ms > 0) || !(ms <= PREFILL_MAX_MS)) {
		why = "the time must be above 0 and at most (ms)";
		bound = PREFILL_MAX_MS;
	} else if ((double)tokens > ms * (PREFILL_MAX_TPS / 1000.0)) {
		why = "that is faster than the plausible maximum of (tokens/s)";
		bound = PREFILL_MAX_TPS;
	} else if (ms > (double)tokens * PREFILL_MAX_MS_PER_TOKEN) {
		why = "that is slower than the plausible maximum of (ms per token)";
		bound = PREFILL_MAX_MS_PER_TOKEN;
	}
	if (!why)
		return 0;
	if (err && errlen)
		snprintf(err, errlen,
			 "implausible prefill report: %u tokens in %g ms; %s %g; the report was "
			 "not recorded (check how the client measures prompt tokens and time)",
			 tokens, ms, why, bound);
	return -EINVAL;
}

void prefill_observe(struct prefill_model *m, uint32_t prefix, uint32_t tokens, double seconds)
{
	double x1 = tokens, x2 = (double)prefix * tokens + (double)tokens * tokens / 2, y = seconds;
	double det;

	if (tokens == 0 || !(seconds > 0) || !isfinite(seconds))
		return;
	if (prefill_known(m)) {
		/* One outlier must not swing the model by orders of magnitude:
		 * clamp it near the prediction, and cap its weight (x1^2 in the
		 * sums: a report of millions of tokens would otherwise outweigh
		 * every other) at the history's. Scaling x1, x2 and y by c keeps
		 * the report on its line y = a x1 + b x2 and weighs it c^2. */
		double pred = m->a * x1 + m->b * x2;
		double hist = PREFILL_DECAY * m->s11;
		if (pred > 0 && isfinite(pred)) {
			if (y > pred * PREFILL_MAX_STEP)
				y = pred * PREFILL_MAX_STEP;
			else if (y < pred / PREFILL_MAX_STEP)
				y = pred / PREFILL_MAX_STEP;
		}
		if (hist > 0 && x1 * x1 > hist) {
			double c = sqrt(hist / (x1 * x1));
			x1 *= c;
			x2 *= c;
			y *= c;
		}
	}
	m->s11 = PREFILL_DECAY * m->s11 + x1 * x1;
	m->s12 = PREFILL_DECAY * m->s12 + x1 * x2;
	m->s22 = PREFILL_DECAY * m->s22 + x2 * x2;
	m->s1y = PREFILL_DECAY * m->s1y + x1 * y;
	m->s2y = PREFILL_DECAY * m->s2y + x2 * y;
	m->samples += 1;
	/* Two unknowns need reports at different depths; with one depth (or a
	 * fit that makes depth cheaper, which attention never does) fall back
	 * to a constant cost per token. */
	det = m->s11 * m->s22 - m->s12 * m->s12;
	if (det > 1e-6 * m->s11 * m->s22) {
		double a = (m->s1y * m->s22 - m->s2y * m->s12) / det;
		double b = (m->s2y * m->s11 - m->s1y * m->s12) / det;
		if (a > 0 && b >= 0) {
			m->a = a;
			m->b = b;
			return;
		}
	}
	/* y ~ a' * x1 with the depth of each report folded in: a' = sum(x1 y) / sum(x1^2). */
	m->a = m->s1y / m->s11;
	m->b = 0;
	if (!(m->a > 0))
		m->a = 1e-9;
}

int prefill_known(const struct prefill_model *m)
{
	return m->samples > 0 && m->a > 0;
}

double prefill_seconds(const struct prefill_model *m, uint32_t n, double assumed_tps)
{
	if (!prefill_known(m))
		return assumed_tps > 0 ? (double)n / assumed_tps : 0;
	return m->a * n + m->b * (double)n * n / 2;
}

double prefill_tps_at(const struct prefill_model *m, uint32_t depth)
{
	if (!prefill_known(m))
		return 0;
	return 1.0 / (m->a + m->b * depth);
}

double prefill_tps_blend(double prev, double samples, double tps, double alpha)
{
	if (!(samples > 0) || !(prev > 0) || !isfinite(prev))
		return tps;
	if (tps > prev * PREFILL_MAX_STEP)
		tps = prev * PREFILL_MAX_STEP;
	else if (tps < prev / PREFILL_MAX_STEP)
		tps = prev / PREFILL_MAX_STEP;
	return alpha * tps + (1 - alpha) * prev;
}

double gdsf_priority(double base, uint64_t hits, double value_s, uint64_t bytes)
{
	return base + (double)(hits + 1) * value_s / (double)(bytes ? bytes : 1);
}
