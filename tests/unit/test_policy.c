/* test_policy.c: the placement arithmetic (daemon/policy.c). */
#include <errno.h>
#include <math.h>
#include <string.h>

#include "check.h"
#include "policy.h"

#define NEAR(a, b, rel) (fabs((double)(a) - (double)(b)) <= (rel)*fabs((double)(b)))

static void test_cost_model(void)
{
	struct cost_model m;

	cost_model_init(&m, 0.001, 1e9);
	CHECK(NEAR(cost_model_time(&m, 1000000000), 1.001, 1e-9));
	/* Large reads at 500 MB/s pull the throughput towards it. */
	for (int i = 0; i < 60; i++)
		cost_model_observe(&m, 64u << 20, 0.001 + (64u << 20) / 5e8);
	CHECK(NEAR(m.bytes_per_s, 5e8, 0.01));
	/* Small reads of 4 KiB taking 0.2 ms set the fixed cost. */
	for (int i = 0; i < 60; i++)
		cost_model_observe(&m, 4096, 0.0002 + 4096 / 5e8);
	CHECK(NEAR(m.fixed_s, 0.0002, 0.01));
	CHECK_EQ_INT(m.samples, 120);
	/* Reads in between teach nothing; garbage is ignored. */
	cost_model_observe(&m, 512u << 10, 5.0);
	cost_model_observe(&m, 64u << 20, NAN);
	cost_model_observe(&m, 64u << 20, -1);
	CHECK_EQ_INT(m.samples, 120);
	/* Bad starting values fall back to the defaults: no fixed cost, 1 GB/s,
	 * no samples. */
	cost_model_init(&m, -1, 0);
	CHECK(m.fixed_s == 0);
	CHECK(m.bytes_per_s == 1e9);
	CHECK_EQ_INT(m.samples, 0);
	cost_model_init(&m, NAN, INFINITY);
	CHECK(m.fixed_s == 0);
	CHECK(m.bytes_per_s == 1e9);
	cost_model_init(&m, 0.5, -3e8);
	CHECK(m.fixed_s == 0.5);
	CHECK(m.bytes_per_s == 1e9);
	CHECK(NEAR(cost_model_time(&m, 1000000000), 1.5, 1e-12));
}

static void test_prefill_fit(void)
{
	struct prefill_model m;
	double w[8];
	const double a = 2e-4, b = 1e-8;

	memset(&m, 0, sizeof(m));
	CHECK(!prefill_known(&m));
	CHECK(NEAR(prefill_seconds(&m, 1000, 500), 2.0, 1e-12)); /* the assumed speed */
	CHECK(prefill_tps_at(&m, 0) == 0);
	/* Reports at several depths: T = a k + b (p k + k^2 / 2). */
	for (int i = 0; i < 40; i++) {
		uint32_t p = (uint32_t)(i % 8) * 2048, k = 256 + (uint32_t)(i % 5) * 512;
		double t = a * k + b * ((double)p * k + (double)k * k / 2);
		prefill_observe(&m, p, k, t);
	}
	CHECK(prefill_known(&m));
	CHECK(NEAR(m.a, a, 1e-6));
	CHECK(NEAR(m.b, b, 1e-6));
	CHECK(NEAR(prefill_seconds(&m, 8192, 500), a * 8192 + b * 8192.0 * 8192 / 2, 1e-6));
	CHECK(prefill_tps_at(&m, 0) > prefill_tps_at(&m, 32768)); /* slower when deep */
	/* The model survives the trip through the namespace record. */
	prefill_to_words(&m, w);
	struct prefill_model m2;
	prefill_from_words(&m2, w);
	CHECK(memcmp(&m, &m2, sizeof(m)) == 0);

	/* One depth only: a constant cost per token. */
	memset(&m, 0, sizeof(m));
	for (int i = 0; i < 5; i++)
		prefill_observe(&m, 0, 1000, 0.5);
	CHECK(NEAR(m.a, 0.5 / 1000, 0.05));
	CHECK(m.b >= 0);
	/* Nonsense reports are ignored. */
	prefill_observe(&m, 0, 0, 1);
	prefill_observe(&m, 0, 10, -1);
	prefill_observe(&m, 0, 10, INFINITY);
	CHECK(NEAR(m.samples, 5, 1e-12));
	/* A speed that changes: recent reports weigh more. */
	for (int i = 0; i < 100; i++)
		prefill_observe(&m, 0, 1000, 0.05);
	CHECK(NEAR(m.a, 0.05 / 1000, 0.05));
}

static void test_prefill_report_bounds(void)
{
	char err[512];

	/* Real speeds pass: a CPU at 5 tokens/s, a GPU at 20k tokens/s, the
	 * limits themselves. */
	CHECK_EQ_INT(prefill_report_check(100, 20000, err, sizeof(err)), 0);
	CHECK_EQ_INT(prefill_report_check(4096, 200, err, sizeof(err)), 0);
	CHECK_EQ_INT(prefill_report_check(10000, 1, err, sizeof(err)), 0);      /* 1e7 tokens/s */
	CHECK_EQ_INT(prefill_report_check(1, 60000, err, sizeof(err)), 0);      /* 1 min/token */
	CHECK_EQ_INT(prefill_report_check(1u << 22, 1e6, err, sizeof(err)), 0); /* 4M tokens */
	/* The red team's two reports: 4e12 tokens/s, and 1e301 tokens/s
	 * (which overflows tokens/s to inf when divided). */
	err[0] = '\0';
	CHECK_EQ_INT(prefill_report_check(4294967295u, 0.001, err, sizeof(err)), -EINVAL);
	CHECK(strstr(err, "implausible prefill report") != NULL);
	CHECK_EQ_INT(prefill_report_check(10, 1e-300, err, sizeof(err)), -EINVAL);
	CHECK(strstr(err, "faster than the plausible maximum of (tokens/s) 1e+07") != NULL);
	CHECK(strstr(err, "10 tokens in 1e-300 ms") != NULL);
	CHECK_EQ_INT(prefill_report_check(10001, 1, err, sizeof(err)), -EINVAL);
	CHECK_EQ_INT(prefill_report_check(10, 600001, err, sizeof(err)), -EINVAL);
	CHECK(strstr(err, "slower than the plausible maximum of (ms per token) 60000") != NULL);
	CHECK_EQ_INT(prefill_report_check(0, 10, err, sizeof(err)), -EINVAL);
	CHECK_EQ_INT(prefill_report_check((1u << 22) + 1, 1e6, err, sizeof(err)), -EINVAL);
	CHECK_EQ_INT(prefill_report_check(10, 0, err, sizeof(err)), -EINVAL);
	CHECK_EQ_INT(prefill_report_check(10, -1, err, sizeof(err)), -EINVAL);
	CHECK_EQ_INT(prefill_report_check(10, NAN, err, sizeof(err)), -EINVAL);
	CHECK_EQ_INT(prefill_report_check(10, INFINITY, err, sizeof(err)), -EINVAL);
	CHECK_EQ_INT(prefill_report_check(100000000, 1.1e9, err, sizeof(err)), -EINVAL);
	CHECK_EQ_INT(prefill_report_check(10, 1e-300, NULL, 0), -EINVAL); /* no buffer */
}

/* One plausible outlier (the largest, fastest report the bounds accept)
 * after 20 steady ones moves the model by less than (1 + step) / 2, never by
 * orders of magnitude; a lasting change still wins after some reports. */
static void test_prefill_outlier(void)
{
	struct prefill_model m;
	double before, after;

	memset(&m, 0, sizeof(m));
	for (int i = 0; i < 20; i++)
		prefill_observe(&m, 0, 1000, 1.0); /* 1000 tokens/s */
	before = prefill_seconds(&m, 1000, 500);
	CHECK(NEAR(before, 1.0, 1e-6));
	prefill_observe(&m, 0, 1u << 22, (1u << 22) / PREFILL_MAX_TPS); /* 4M tokens at 1e7/s */
	after = prefill_seconds(&m, 1000, 500);
	CHECK(after >= before / ((1 + PREFILL_MAX_STEP) / 2) * 0.999);
	CHECK(after < before);
	prefill_observe(&m, 0, 1u << 22, (1u << 22) / PREFILL_MAX_TPS);
	CHECK(prefill_seconds(&m, 1000, 500) > before / 10); /* two: still under 10x */
	/* Slow outliers likewise. */
	memset(&m, 0, sizeof(m));
	for (int i = 0; i < 20; i++)
		prefill_observe(&m, 0, 1000, 1.0);
	prefill_observe(&m, 0, 1u << 22, (1u << 22) * 60.0);
	CHECK(prefill_seconds(&m, 1000, 500) <= (1 + PREFILL_MAX_STEP) / 2 * 1.001);
	/* A real change (the model moved to a GPU 100x faster) wins. */
	for (int i = 0; i < 200; i++)
		prefill_observe(&m, 0, 1000, 0.01);
	CHECK(NEAR(prefill_seconds(&m, 1000, 500), 0.01, 0.05));
	/* The displayed speed: clamped, then averaged. */
	CHECK(NEAR(prefill_tps_blend(0, 0, 1e7, 0.2), 1e7, 1e-12));  /* first: as is */
	CHECK(NEAR(prefill_tps_blend(1000, 20, 1e7, 0.2), 0.2 * 4000 + 0.8 * 1000, 1e-12));
	CHECK(NEAR(prefill_tps_blend(1000, 20, 1, 0.2), 0.2 * 250 + 0.8 * 1000, 1e-12));
	CHECK(NEAR(prefill_tps_blend(1000, 20, 2000, 0.2), 1200, 1e-12));
}

static void test_gdsf(void)
{
	/* Same value per byte: more hits rank higher; a higher base (later
	 * access) ranks higher; negative value ranks below the base. */
	double cold = gdsf_priority(0, 0, 1.0, 1 << 20);
	double hot = gdsf_priority(0, 5, 1.0, 1 << 20);
	double recent = gdsf_priority(1e-3, 0, 1.0, 1 << 20);
	double big = gdsf_priority(0, 0, 1.0, 64 << 20);
	double useless = gdsf_priority(0, 10, -0.5, 1 << 20);

	const double mib = 1 << 20;

	/* H = L + (hits + 1) * value / bytes. */
	CHECK(NEAR(cold, 1.0 / mib, 1e-12));
	CHECK(NEAR(hot, 6.0 / mib, 1e-12));
	CHECK(NEAR(recent, 1e-3 + 1.0 / mib, 1e-12));
	CHECK(NEAR(big, 1.0 / (64 * mib), 1e-12));
	CHECK(NEAR(useless, -5.5 / mib, 1e-12));
	CHECK(NEAR(gdsf_priority(2.5, 3, 0.25, 4096), 2.5 + 4 * 0.25 / 4096, 1e-12));
	CHECK(NEAR(gdsf_priority(0.125, 1, -4.0, 1024), 0.125 - 8.0 / 1024, 1e-12));
	CHECK(hot > cold);
	CHECK(recent > cold);
	CHECK(big < cold);
	CHECK(useless < 0);
	/* No division by zero: 0 bytes count as 1. */
	CHECK(NEAR(gdsf_priority(0, 0, 1.0, 0), 1.0, 1e-12));
	CHECK(NEAR(gdsf_priority(0.5, 2, 1.0, 0), 3.5, 1e-12));
}

int main(void)
{
	test_cost_model();
	test_prefill_fit();
	test_prefill_report_bounds();
	test_prefill_outlier();
	test_gdsf();
	return 0;
}
