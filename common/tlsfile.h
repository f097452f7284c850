/* tlsfile.h: reading and checking the PEM files of kvtier's TLS.
 *
 * gRPC takes certificates and keys as PEM text and checks them only when a
 * connection is made (or, for a server, somewhere inside add_http2_port with
 * a one-line log of its own). These functions read the files a person named
 * on the command line and check them with OpenSSL first, so that a missing,
 * unreadable, non-PEM, encrypted or mismatched file is refused at start with
 * a message that names the file and says what to do. kvtierd uses the key
 * pair, libkvtier the CA file.
 *
 * This module never logs and never talks to gRPC: it returns text and words.
 */
#ifndef KVTIER_TLSFILE_H
#define KVTIER_TLSFILE_H

#include <stddef.h>
#include <time.h>

#define TLSFILE_MAX (1u << 20) /* largest PEM file read (a system CA bundle is ~200 KiB) */

/* Reads the PEM certificate(s) of `path` (a CA bundle, or a certificate
 * chain; `what` names it in messages, e.g. "CA file") into *pem: the file's text, NUL-terminated, malloc'd, owned by the
 * caller (free()). The file must hold at least one certificate that OpenSSL
 * parses, and every certificate block in it must parse.
 * Returns 0; -errno when the file cannot be opened or read (-ENOENT,
 * -EACCES, -EISDIR, ...); -EFBIG when it is larger than TLSFILE_MAX;
 * -EBADMSG when it holds no PEM certificate or a broken one. On failure
 * *pem is NULL and err holds a sentence naming `path` and the fault. */
int tlsfile_read_certs(const char *what, const char *path, char **pem, char *err, size_t errlen);

/* What kvtierd logs about its certificate at start. */
struct tlsfile_cert_info {
	char subject[256];  /* the first certificate's subject, one line */
	char not_after[64]; /* its expiry, as OpenSSL prints it */
	int expired;        /* 1: not_after has passed */
	int not_yet_valid;  /* 1: notBefore is still in the future */
	unsigned key_mode;  /* permission bits of the key file (0600 expected) */
};

/* Reads a server's certificate chain (`cert_path`, the server's own
 * certificate first) and its private key (`key_path`), and checks that the
 * key belongs to the first certificate. *cert_pem and *key_pem receive the
 * files' text as tlsfile_read_certs() does (both NULL on failure); the
 * caller frees them (wipe the key first). info (may be NULL) is filled on
 * success; an expired certificate is not an error here (the caller decides).
 * Returns 0, the errors of tlsfile_read_certs() for either file, -EBADMSG
 * for a key file without a usable PEM private key (an encrypted key
 * included: nothing can type its passphrase), or -EKEYREJECTED when the key
 * does not match the certificate. err says which file and what to do. */
int tlsfile_read_key_pair(const char *cert_path, const char *key_path, char **cert_pem,
			  char **key_pem, struct tlsfile_cert_info *info, char *err, size_t errlen);

#endif /* KVTIER_TLSFILE_H */
