/* errors.c: kvtier_strerror(), one namer for both error ranges (kvtier.h).
 *
 * 0 is "success", KVTIER_E_* codes have short fixed names, negative errno
 * values get the C library's description. Every string returned is static
 * and never rewritten, so the function is safe from any thread (strerror()
 * is not; glibc's strerrordesc_np() is, and a small table covers the rest).
 */
#include "kvtier.h"

#include <errno.h>
#include <string.h>

static const char *const kvtier_error_names[] = {
	[KVTIER_E_INVALID - KVTIER_E_FIRST] = "invalid argument or malformed slot file",
	[KVTIER_E_LAYOUT - KVTIER_E_FIRST] = "a precondition failed: KV layout mismatch, or a tier "
					   "that needs an operator",
	[KVTIER_E_FULL - KVTIER_E_FIRST] = "no room: a tier or the index map is full",
	[KVTIER_E_NOTFOUND - KVTIER_E_FIRST] = "no such blob, lease or file",
	[KVTIER_E_UNAUTH - KVTIER_E_FIRST] = "missing or wrong bearer token",
	[KVTIER_E_DENIED - KVTIER_E_FIRST] = "path outside the allowed slot directories",
	[KVTIER_E_CORRUPT - KVTIER_E_FIRST] = "stored bytes failed their checksum",
	[KVTIER_E_EXISTS - KVTIER_E_FIRST] = "target already exists",
	[KVTIER_E_UNAVAILABLE - KVTIER_E_FIRST] = "daemon unreachable or shutting down",
	[KVTIER_E_TIMEOUT - KVTIER_E_FIRST] = "deadline exceeded",
	[KVTIER_E_INTERNAL - KVTIER_E_FIRST] = "internal error",
};

#if defined(__GLIBC__) && defined(__GLIBC_PREREQ)
#if __GLIBC_PREREQ(2, 32)
#define ERRORS_HAVE_STRERRORDESC_NP 1 /* glibc: thread-safe, static strings */
#endif
#endif

#ifndef ERRORS_HAVE_STRERRORDESC_NP
/* Without strerrordesc_np: the errno values kvtier code actually returns. */
static const char *errno_name(int e)
{
	switch (e) {
	case EPERM:
		return "Operation not permitted";
	case ENOENT:
		return "No such file or directory";
	case EINTR:
		return "Interrupted system call";
	case EIO:
		return "Input/output error";
	case EBADF:
		return "Bad file descriptor";
	case EAGAIN:
		return "Resource temporarily unavailable";
	case ENOMEM:
		return "Cannot allocate memory";
	case EACCES:
		return "Permission denied";
	case EEXIST:
		return "File exists";
	case EXDEV:
		return "Invalid cross-device link";
	case ENOTDIR:
		return "Not a directory";
	case EISDIR:
		return "Is a directory";
	case EINVAL:
		return "Invalid argument";
	case EMFILE:
		return "Too many open files";
	case EFBIG:
		return "File too large";
	case ENOSPC:
		return "No space left on device";
	case EROFS:
		return "Read-only file system";
	case EPIPE:
		return "Broken pipe";
	case ERANGE:
		return "Numerical result out of range";
	case ENAMETOOLONG:
		return "File name too long";
	case ENOSYS:
		return "Function not implemented";
	case ENOTEMPTY:
		return "Directory not empty";
	case ELOOP:
		return "Too many levels of symbolic links";
	case ENODATA:
		return "No data available";
	case EOVERFLOW:
		return "Value too large for defined data type";
	case EOPNOTSUPP:
		return "Operation not supported";
	case ECONNREFUSED:
		return "Connection refused";
	case ETIMEDOUT:
		return "Connection timed out";
	case ECANCELED:
		return "Operation canceled";
	default:
		return NULL;
	}
}
#endif

KVTIER_API const char *kvtier_strerror(int rc)
{
	const char *s = NULL;

	if (rc == 0)
		return "success";
	if (rc >= KVTIER_E_FIRST && rc <= KVTIER_E_LAST)
		return kvtier_error_names[rc - KVTIER_E_FIRST];
	if (rc < 0 && rc > -4096) {
#ifdef ERRORS_HAVE_STRERRORDESC_NP
		s = strerrordesc_np(-rc);
#else
		s = errno_name(-rc);
#endif
	}
	return s ? s : "unknown error";
}

KVTIER_API const char *kvtier_status_name(int rc)
{
	static const char *const names[] = {
		[KVTIER_E_INVALID - KVTIER_E_FIRST] = "INVALID_ARGUMENT",
		[KVTIER_E_LAYOUT - KVTIER_E_FIRST] = "FAILED_PRECONDITION",
		[KVTIER_E_FULL - KVTIER_E_FIRST] = "RESOURCE_EXHAUSTED",
		[KVTIER_E_NOTFOUND - KVTIER_E_FIRST] = "NOT_FOUND",
		[KVTIER_E_UNAUTH - KVTIER_E_FIRST] = "UNAUTHENTICATED",
		[KVTIER_E_DENIED - KVTIER_E_FIRST] = "PERMISSION_DENIED",
		[KVTIER_E_CORRUPT - KVTIER_E_FIRST] = "DATA_LOSS",
		[KVTIER_E_EXISTS - KVTIER_E_FIRST] = "ALREADY_EXISTS",
		[KVTIER_E_UNAVAILABLE - KVTIER_E_FIRST] = "UNAVAILABLE",
		[KVTIER_E_TIMEOUT - KVTIER_E_FIRST] = "DEADLINE_EXCEEDED",
		[KVTIER_E_INTERNAL - KVTIER_E_FIRST] = "INTERNAL",
	};

	if (rc == 0)
		return "OK";
	if (rc >= KVTIER_E_FIRST && rc <= KVTIER_E_LAST)
		return names[rc - KVTIER_E_FIRST];
	return "INTERNAL";
}
