/* fsck.h: offline consistency check of a kvtier data directory.
 *
 * Opens the index read-only and compares it with the tier directories it
 * records: blobs whose files are missing or have the wrong size, files with
 * no blob, leftover temporaries, and the index's own cross-references
 * (index_check). With verify_bytes, every part is read back and its CRC-32C
 * compared. It never changes anything. Safe to run while kvtierd runs (LMDB
 * readers do not block the writer), but then in-flight temporaries of
 * running puts are reported too: stop the daemon for a clean verdict.
 */
#ifndef KVTIER_FSCK_H
#define KVTIER_FSCK_H

#include <stdio.h>

/* Writes one line per problem to `out` (and a summary line), and sets
 * *problems to their number. Returns 0 when the check ran (whatever it
 * found), or a negative error when it could not (no index in data_dir,
 * unreadable directory), with a message written to `out`. */
int fsck_run(const char *data_dir, int verify_bytes, FILE *out, unsigned long *problems);

#endif /* KVTIER_FSCK_H */
