/* crc32c.c: CRC-32C (Castagnoli), the checksum over every stored blob; see crc32c.h.
 *
 * Reflected polynomial 0x82F63B78, initial value and final xor ~0, so
 * crc32c(0, "123456789", 9) == 0xE3069283 (the iSCSI / ext4 / RocksDB CRC).
 *
 * Two implementations behind one function pointer chosen once per process:
 *  - x86-64 with SSE4.2: the crc32 instruction, 8 bytes at a time, over three
 *    interleaved streams for long buffers (the instruction has a latency of 3
 *    cycles but a throughput of 1, so three independent chains keep it busy);
 *    the three partial CRCs are joined with a precomputed "append CRC_STRIDE
 *    zero bytes" operator.
 *  - everywhere else, or when KVTIER_CRC32C_SOFTWARE is set to anything but
 *    "" or "0" (for tests): slicing-by-8 tables.
 * Both work on the raw register (no pre/post inversion); crc32c() adds the
 * inversions, which is what makes crc32c(crc32c(0, a), b) == crc32c(0, a || b).
 */
#include "crc32c.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#define CRC32C_HAVE_SSE42 1
#include <nmmintrin.h>
#endif

#define CRC32C_POLY 0x82F63B78u
#define CRC32C_STRIDE 8192u /* bytes per stream in the three-way loop */

typedef uint32_t (*crc32c_fn)(uint32_t crc, const uint8_t *p, size_t len);

static pthread_once_t crc32c_once = PTHREAD_ONCE_INIT;
static crc32c_fn crc32c_impl;
static uint32_t crc32c_table[8][256];      /* slicing-by-8 */
static uint32_t crc32c_shift_table[4][256]; /* append CRC32C_STRIDE zero bytes */

static uint32_t crc32c_load_le32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint32_t crc32c_sw(uint32_t crc, const uint8_t *p, size_t len)
{
	const uint32_t(*t)[256] = (const uint32_t(*)[256])crc32c_table;
	uint32_t lo, hi;

	while (len >= 8) {
		lo = crc32c_load_le32(p) ^ crc;
		hi = crc32c_load_le32(p + 4);
		crc = t[7][lo & 0xff] ^ t[6][(lo >> 8) & 0xff] ^ t[5][(lo >> 16) & 0xff] ^
		      t[4][lo >> 24] ^ t[3][hi & 0xff] ^ t[2][(hi >> 8) & 0xff] ^
		      t[1][(hi >> 16) & 0xff] ^ t[0][hi >> 24];
		p += 8;
		len -= 8;
	}
	while (len--)
		crc = (crc >> 8) ^ t[0][(crc ^ *p++) & 0xff];
	return crc;
}

/* The raw register after CRC32C_STRIDE more zero bytes: linear in crc, so
 * four byte-indexed tables do it. */
static uint32_t crc32c_shift(uint32_t crc)
{
	return crc32c_shift_table[0][crc & 0xff] ^ crc32c_shift_table[1][(crc >> 8) & 0xff] ^
	       crc32c_shift_table[2][(crc >> 16) & 0xff] ^ crc32c_shift_table[3][crc >> 24];
}

#ifdef CRC32C_HAVE_SSE42
static uint64_t crc32c_load64(const uint8_t *p)
{
	uint64_t v;

	memcpy(&v, p, sizeof(v)); /* x86 is little-endian: bytes in memory order */
	return v;
}

__attribute__((target("sse4.2"))) static uint32_t crc32c_hw(uint32_t crc, const uint8_t *p,
							     size_t len)
{
	uint64_t c0 = crc, c1, c2;
	const uint8_t *end;

	while (len && ((uintptr_t)p & 7)) {
		c0 = _mm_crc32_u8((uint32_t)c0, *p++);
		len--;
	}
	while (len >= 3 * CRC32C_STRIDE) {
		c1 = 0;
		c2 = 0;
		for (end = p + CRC32C_STRIDE; p < end; p += 8) {
			c0 = _mm_crc32_u64(c0, crc32c_load64(p));
			c1 = _mm_crc32_u64(c1, crc32c_load64(p + CRC32C_STRIDE));
			c2 = _mm_crc32_u64(c2, crc32c_load64(p + 2 * CRC32C_STRIDE));
		}
		/* Stream 0 is followed by streams 1 and 2, each STRIDE long. */
		c0 = crc32c_shift(crc32c_shift((uint32_t)c0) ^ (uint32_t)c1) ^ (uint32_t)c2;
		p += 2 * CRC32C_STRIDE;
		len -= 3 * CRC32C_STRIDE;
	}
	while (len >= 8) {
		c0 = _mm_crc32_u64(c0, crc32c_load64(p));
		p += 8;
		len -= 8;
	}
	while (len--)
		c0 = _mm_crc32_u8((uint32_t)c0, *p++);
	return (uint32_t)c0;
}
#endif

/* a * b modulo the polynomial, in the reflected bit order (bit 31 is x^0). */
static uint32_t crc32c_gf_mul(uint32_t a, uint32_t b)
{
	uint32_t r = 0;
	int i;

	for (i = 0; i < 32; i++) {
		if (a & (1u << (31 - i)))
			r ^= b;
		b = (b & 1) ? (b >> 1) ^ CRC32C_POLY : b >> 1;
	}
	return r;
}

static void crc32c_init(void)
{
	const char *env = getenv("KVTIER_CRC32C_SOFTWARE");
	uint32_t c, xn = 1u << 31; /* x^0 */
	unsigned i, j, k;

	for (i = 0; i < 256; i++) {
		c = i;
		for (j = 0; j < 8; j++)
			c = (c & 1) ? (c >> 1) ^ CRC32C_POLY : c >> 1;
		crc32c_table[0][i] = c;
	}
	for (i = 0; i < 256; i++)
		for (k = 1; k < 8; k++)
			crc32c_table[k][i] = (crc32c_table[k - 1][i] >> 8) ^
					     crc32c_table[0][crc32c_table[k - 1][i] & 0xff];

	/* x^(8 * STRIDE): appending STRIDE zero bytes multiplies by it. */
	for (i = 0; i < 8 * CRC32C_STRIDE; i++)
		xn = (xn & 1) ? (xn >> 1) ^ CRC32C_POLY : xn >> 1;
	for (k = 0; k < 4; k++)
		for (i = 0; i < 256; i++)
			crc32c_shift_table[k][i] = crc32c_gf_mul(xn, (uint32_t)i << (8 * k));

	crc32c_impl = crc32c_sw;
#ifdef CRC32C_HAVE_SSE42
	__builtin_cpu_init();
	if (!(env && env[0] && strcmp(env, "0") != 0) && __builtin_cpu_supports("sse4.2"))
		crc32c_impl = crc32c_hw;
#else
	(void)env;
#endif
}

uint32_t crc32c(uint32_t crc, const void *buf, size_t len)
{
	pthread_once(&crc32c_once, crc32c_init);
	if (len == 0)
		return crc;
	return ~crc32c_impl(~crc, buf, len);
}
