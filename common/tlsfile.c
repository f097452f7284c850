/* tlsfile.c: reading and checking the PEM files of kvtier's TLS (tlsfile.h).
 *
 * OpenSSL parses what gRPC will parse again later; its error queue is
 * cleared after every use so that nothing stale reaches gRPC's own calls on
 * the same thread.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "tlsfile.h"

/* Reads the whole file `path` (at most TLSFILE_MAX bytes) into a
 * NUL-terminated buffer. Returns 0, -errno or -EFBIG. */
static int read_all(const char *path, char **out, size_t *len_out)
{
	char *buf = NULL;
	size_t len = 0;
	struct stat st;
	int fd, rc = 0;

	*out = NULL;
	fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
	if (fd < 0)
		return -errno;
	if (fstat(fd, &st) < 0) {
		rc = -errno;
		goto out;
	}
	if (S_ISDIR(st.st_mode)) {
		rc = -EISDIR;
		goto out;
	}
	buf = malloc(TLSFILE_MAX + 1);
	if (!buf) {
		rc = -ENOMEM;
		goto out;
	}
	for (;;) {
		ssize_t n = read(fd, buf + len, TLSFILE_MAX + 1 - len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			rc = -errno;
			goto out;
		}
		if (n == 0)
			break;
		len += (size_t)n;
		if (len > TLSFILE_MAX) {
			rc = -EFBIG;
			goto out;
		}
	}
	buf[len] = '\0';
	*out = buf;
	*len_out = len;
	buf = NULL;
out:
	free(buf);
	close(fd);
	return rc;
}

/* OpenSSL's reason for the last failure, for a message ("" when none). */
static const char *ssl_reason(void)
{
	unsigned long e = ERR_peek_last_error();
	const char *r = e ? ERR_reason_error_string(e) : NULL;

	return r ? r : "";
}

/* 1 when the last failure of a PEM read only means "no more PEM blocks". */
static int ssl_no_more_pem(void)
{
	unsigned long e = ERR_peek_last_error();

	return e && ERR_GET_LIB(e) == ERR_LIB_PEM && ERR_GET_REASON(e) == PEM_R_NO_START_LINE;
}

/* Parses every certificate of text[0..len). Returns the count (>= 1), 0
 * when there is none, or -1 when certificate number -(*bad) fails to parse
 * (*bad is its 1-based index). *first (may be NULL) receives the first one. */
static int parse_certs(const char *text, size_t len, X509 **first, int *bad)
{
	BIO *bio = BIO_new_mem_buf(text, (int)len);
	int n = 0;

	if (first)
		*first = NULL;
	if (!bio)
		return -1;
	for (;;) {
		X509 *x = PEM_read_bio_X509(bio, NULL, NULL, NULL);
		if (!x) {
			if (!ssl_no_more_pem()) {
				*bad = n + 1;
				n = -1;
			}
			break;
		}
		if (n == 0 && first)
			*first = x;
		else
			X509_free(x);
		n++;
	}
	BIO_free(bio);
	if (n < 0 && first && *first) {
		X509_free(*first);
		*first = NULL;
	}
	return n;
}

/* Reads `path` and checks its certificates; *first (may be NULL) receives
 * the first one (X509_free it). */
static int read_certs(const char *what, const char *path, char **pem, X509 **first, char *err,
		      size_t errlen)
{
	size_t len = 0;
	int rc, bad = 0, n;

	*pem = NULL;
	rc = read_all(path, pem, &len);
	if (rc == -EFBIG) {
		snprintf(err, errlen, "%s %s is larger than %u bytes: it cannot be a PEM "
			 "certificate file", what, path, TLSFILE_MAX);
		goto out;
	}
	if (rc) {
		snprintf(err, errlen, "cannot read %s %s: %s", what, path, strerror(-rc));
		goto out;
	}
	ERR_clear_error();
	n = parse_certs(*pem, len, first, &bad);
	if (n == 0) {
		rc = -EBADMSG;
		snprintf(err, errlen, "%s %s holds no PEM certificate (a block \"-----BEGIN "
			 "CERTIFICATE-----\"): give the certificate itself, PEM-encoded (a DER file "
			 "converts with: openssl x509 -inform der -in FILE -out FILE.pem)", what, path);
	} else if (n < 0) {
		rc = -EBADMSG;
		snprintf(err, errlen, "%s %s: certificate number %d does not parse (%s): check "
			 "it with: openssl x509 -noout -text -in %s", what, path, bad, ssl_reason(),
			 path);
	}
	ERR_clear_error();
out:
	if (rc) {
		free(*pem);
		*pem = NULL;
	}
	return rc;
}

int tlsfile_read_certs(const char *what, const char *path, char **pem, char *err, size_t errlen)
{
	return read_certs(what, path, pem, NULL, err, errlen);
}

/* Called by OpenSSL for an encrypted key: refuse instead of prompting. */
static int no_passphrase(char *buf, int size, int rwflag, void *u)
{
	(void)buf;
	(void)size;
	(void)rwflag;
	*(int *)u = 1;
	return -1;
}

/* Parses the private key in text[0..len) (NUL-terminated) into *key.
 * OpenSSL 3 reports a file without any key block as "unsupported" rather
 * than "no start line": the armour is looked for in the text as well. */
static int parse_key(const char *path, const char *text, size_t len, EVP_PKEY **key, char *err,
		     size_t errlen)
{
	BIO *bio = BIO_new_mem_buf(text, (int)len);
	int encrypted = 0, rc = 0;

	*key = NULL;
	if (!bio)
		return -ENOMEM;
	ERR_clear_error();
	*key = PEM_read_bio_PrivateKey(bio, NULL, no_passphrase, &encrypted);
	if (*key)
		goto out;
	rc = -EBADMSG;
	if (encrypted)
		snprintf(err, errlen, "private key file %s is encrypted with a passphrase, which "
			 "kvtierd cannot ask for: store the key unencrypted, readable by kvtierd's "
			 "user only (openssl pkey -in %s -out NEW.key; chmod 600 NEW.key)", path,
			 path);
	else if (ssl_no_more_pem() || !strstr(text, "PRIVATE KEY-----"))
		snprintf(err, errlen, "private key file %s holds no PEM private key (a block "
			 "\"-----BEGIN PRIVATE KEY-----\", or RSA/EC PRIVATE KEY): give the key "
			 "that was made with the certificate", path);
	else
		snprintf(err, errlen, "private key file %s: the key does not parse (%s)", path,
			 ssl_reason());
out:
	ERR_clear_error();
	BIO_free(bio);
	return rc;
}

/* Fills info from the server certificate and the key file's mode. */
static void describe(X509 *x, const char *key_path, struct tlsfile_cert_info *info)
{
	BIO *mem = BIO_new(BIO_s_mem());
	struct stat st;
	char *p;
	long n;

	memset(info, 0, sizeof(*info));
	X509_NAME_oneline(X509_get_subject_name(x), info->subject, (int)sizeof(info->subject));
	if (mem && ASN1_TIME_print(mem, X509_get0_notAfter(x))) {
		n = BIO_get_mem_data(mem, &p);
		if (n > 0)
			snprintf(info->not_after, sizeof(info->not_after), "%.*s", (int)n, p);
	}
	BIO_free(mem);
	info->expired = X509_cmp_current_time(X509_get0_notAfter(x)) < 0;
	info->not_yet_valid = X509_cmp_current_time(X509_get0_notBefore(x)) > 0;
	if (stat(key_path, &st) == 0)
		info->key_mode = (unsigned)(st.st_mode & 07777);
	ERR_clear_error();
}

int tlsfile_read_key_pair(const char *cert_path, const char *key_path, char **cert_pem,
			  char **key_pem, struct tlsfile_cert_info *info, char *err, size_t errlen)
{
	X509 *cert = NULL;
	EVP_PKEY *key = NULL;
	size_t key_len = 0;
	int rc;

	*key_pem = NULL;
	rc = read_certs("certificate file", cert_path, cert_pem, &cert, err, errlen);
	if (rc)
		goto out;
	rc = read_all(key_path, key_pem, &key_len);
	if (rc == -EFBIG) {
		snprintf(err, errlen, "private key file %s is larger than %u bytes: it cannot be a "
			 "PEM key", key_path, TLSFILE_MAX);
		goto out;
	}
	if (rc) {
		snprintf(err, errlen, "cannot read private key file %s: %s", key_path,
			 strerror(-rc));
		goto out;
	}
	rc = parse_key(key_path, *key_pem, key_len, &key, err, errlen);
	if (rc)
		goto out;
	if (X509_check_private_key(cert, key) != 1) {
		rc = -EKEYREJECTED;
		snprintf(err, errlen, "private key file %s does not belong to the certificate in %s "
			 "(the first certificate of the file must be the server's own, and the key "
			 "the one made with it): compare 'openssl x509 -noout -pubkey -in %s' with "
			 "'openssl pkey -pubout -in %s'", key_path, cert_path, cert_path, key_path);
		goto out;
	}
	if (info)
		describe(cert, key_path, info);
out:
	ERR_clear_error();
	EVP_PKEY_free(key);
	X509_free(cert);
	if (rc) {
		free(*cert_pem);
		*cert_pem = NULL;
		if (*key_pem) {
			explicit_bzero(*key_pem, key_len);
			free(*key_pem);
			*key_pem = NULL;
		}
	}
	return rc;
}
