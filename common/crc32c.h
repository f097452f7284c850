/* crc32c.h: CRC-32C (Castagnoli), the per-blob checksum over the stored bytes.
 * Uses the SSE4.2 instruction when the CPU has it, a table otherwise. */
#ifndef KVTIER_CRC32C_H
#define KVTIER_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* Continues a CRC: start with crc = 0. crc32c(crc32c(0, a), b) == crc32c(0, a||b). */
uint32_t crc32c(uint32_t crc, const void *buf, size_t len);

#endif /* KVTIER_CRC32C_H */
