/* test_crc32c.c: CRC-32C (common/crc32c.c) against published check values
 * and a bit-at-a-time reference written here, over many lengths and
 * alignments, plus the chaining property.
 *
 * The implementation picks its path once per process, so the test runs its
 * checks on the default path (the SSE4.2 one on x86-64 CPUs that have it),
 * then runs itself again with KVTIER_CRC32C_SOFTWARE=1 for the table path.
 * Both are checked against the same reference, so they agree with each other.
 */
#include "check.h"
#include "crc32c.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define BUF_LEN (256 * 1024 + 64)

static uint32_t ref_crc32c(uint32_t crc, const uint8_t *p, size_t len)
{
	int k;

	crc = ~crc;
	while (len--) {
		crc ^= *p++;
		for (k = 0; k < 8; k++)
			crc = (crc & 1) ? (crc >> 1) ^ 0x82F63B78u : crc >> 1;
	}
	return ~crc;
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t rng(void)
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return rng_state;
}

static void run_checks(const char *mode)
{
	static const size_t lens[] = {
		1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 255, 256, 1000,
		4095, 4096, 8191, 8192, 8193, 24575, 24576, 24577, 24583, 49151, 49152, 49159,
		65536, 100000, 3 * 8192 * 5 + 11, 256 * 1024,
	};
	uint8_t *buf = malloc(BUF_LEN), v[32];
	size_t i, j, a, len, cut;
	uint32_t c;

	CHECK(buf);
	/* Published check values: the catalogue's, and RFC 3720 (iSCSI) B.4. */
	CHECK_EQ_INT(crc32c(0, "123456789", 9), 0xE3069283u);
	memset(v, 0, 32);
	CHECK_EQ_INT(crc32c(0, v, 32), 0x8A9136AAu);
	memset(v, 0xff, 32);
	CHECK_EQ_INT(crc32c(0, v, 32), 0x62A8AB43u);
	for (i = 0; i < 32; i++)
		v[i] = (uint8_t)i;
	CHECK_EQ_INT(crc32c(0, v, 32), 0x46DD794Eu);
	for (i = 0; i < 32; i++)
		v[i] = (uint8_t)(31 - i);
	CHECK_EQ_INT(crc32c(0, v, 32), 0x113FDB5Cu);
	CHECK_EQ_INT(crc32c(0, v, 0), 0);
	CHECK_EQ_INT(crc32c(0x12345678u, NULL, 0), 0x12345678u);

	for (i = 0; i < BUF_LEN; i++)
		buf[i] = (uint8_t)rng();

	/* Every length up to 300 at every alignment, then the long ones. */
	for (a = 0; a < 8; a++)
		for (len = 0; len <= 300; len++)
			CHECK_EQ_INT(crc32c(0, buf + a, len), ref_crc32c(0, buf + a, len));
	for (i = 0; i < sizeof(lens) / sizeof(lens[0]); i++)
		for (a = 0; a < 8; a += (lens[i] > 50000 ? 3 : 1)) {
			len = lens[i];
			CHECK(a + len <= BUF_LEN);
			c = crc32c(0, buf + a, len);
			if (c != ref_crc32c(0, buf + a, len))
				fprintf(stderr, "%s: len %zu align %zu\n", mode, len, a);
			CHECK_EQ_INT(c, ref_crc32c(0, buf + a, len));
			/* A non-zero starting value too. */
			CHECK_EQ_INT(crc32c(0xdeadbeefu, buf + a, len),
				     ref_crc32c(0xdeadbeefu, buf + a, len));
		}

	/* Chaining: any split, including across the three-stream blocks. */
	for (j = 0; j < 200; j++) {
		len = (size_t)(rng() % (BUF_LEN - 8));
		cut = len ? (size_t)(rng() % (len + 1)) : 0;
		a = (size_t)(rng() % 8);
		c = crc32c(0, buf + a, cut);
		c = crc32c(c, buf + a + cut, len - cut);
		CHECK_EQ_INT(c, crc32c(0, buf + a, len));
	}
	c = 0;
	for (i = 0; i < BUF_LEN; i += 1000)
		c = crc32c(c, buf + i, (BUF_LEN - i) < 1000 ? BUF_LEN - i : 1000);
	CHECK_EQ_INT(c, ref_crc32c(0, buf, BUF_LEN));
	free(buf);
	fprintf(stderr, "test_crc32c: %s path ok\n", mode);
}

int main(int argc, char **argv)
{
	int status;
	pid_t pid;

	if (argc > 1 && strcmp(argv[1], "--software") == 0) {
		run_checks("software");
		return 0;
	}
	if (getenv("KVTIER_CRC32C_SOFTWARE")) {
		run_checks("software (from the environment)");
		return 0;
	}
	run_checks("default");

	pid = fork();
	CHECK(pid >= 0);
	if (pid == 0) {
		char *args[] = { argv[0], "--software", NULL };

		setenv("KVTIER_CRC32C_SOFTWARE", "1", 1);
		execv("/proc/self/exe", args);
		perror("execv /proc/self/exe");
		_exit(2);
	}
	CHECK(waitpid(pid, &status, 0) == pid);
	CHECK(WIFEXITED(status));
	CHECK_EQ_INT(WEXITSTATUS(status), 0);
	printf("test_crc32c: ok\n");
	return 0;
}
