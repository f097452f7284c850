/* log.c: one line per event on stderr; see log.h.
 *
 *   2026-11-23T14:00:00.123Z level=info <message>
 *
 * The time is UTC with milliseconds. Each line goes out in a single write(2),
 * so lines from several threads never interleave (within PIPE_BUF on a pipe,
 * and always on a file or terminal). Newlines and other control characters in
 * the message become spaces, so one event is always one line. log_emit keeps
 * errno as it found it, so a caller can log a failure and then return -errno.
 */
#include "log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#define LOG_LINE_STACK 1024

int log_threshold = LOG_INFO;

static const char *const log_names[] = { "error", "warn", "info", "debug" };

static void log_write_all(const char *p, size_t len)
{
	ssize_t n;

	while (len) {
		n = write(STDERR_FILENO, p, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return;
		}
		p += n;
		len -= (size_t)n;
	}
}

void log_emit(int level, const char *fmt, ...)
{
	char stack[LOG_LINE_STACK], *line = stack, *big = NULL;
	int saved_errno = errno, hlen, mlen;
	size_t cap = sizeof(stack), len, i;
	struct timespec ts;
	struct tm tm;
	va_list ap;

	if (level < LOG_ERROR)
		level = LOG_ERROR;
	if (level > LOG_DEBUG)
		level = LOG_DEBUG;
	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	hlen = snprintf(stack, cap, "%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ level=%s ",
			tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
			tm.tm_sec, ts.tv_nsec / 1000000, log_names[level]);
	if (hlen < 0 || (size_t)hlen >= cap)
		goto out; /* cannot happen: the prefix is under 60 bytes */

	va_start(ap, fmt);
	mlen = vsnprintf(stack + hlen, cap - (size_t)hlen, fmt, ap);
	va_end(ap);
	if (mlen < 0)
		mlen = 0;
	if ((size_t)hlen + (size_t)mlen + 1 >= cap) {
		/* Longer than the stack buffer: format again on the heap, or
		 * settle for the truncated line when memory is short. */
		big = malloc((size_t)hlen + (size_t)mlen + 2);
		if (big) {
			memcpy(big, stack, (size_t)hlen);
			va_start(ap, fmt);
			vsnprintf(big + hlen, (size_t)mlen + 1, fmt, ap);
			va_end(ap);
			line = big;
		} else {
			mlen = (int)(cap - (size_t)hlen - 2);
		}
	}
	len = (size_t)hlen + (size_t)mlen;
	for (i = (size_t)hlen; i < len; i++)
		if ((unsigned char)line[i] < 0x20 || line[i] == 0x7f)
			line[i] = ' ';
	line[len++] = '\n';
	log_write_all(line, len);
out:
	free(big);
	errno = saved_errno;
}

int log_level_parse(const char *s)
{
	int i;

	if (!s)
		return -1;
	for (i = LOG_ERROR; i <= LOG_DEBUG; i++)
		if (strcasecmp(s, log_names[i]) == 0)
			return i;
	if (strcasecmp(s, "warning") == 0)
		return LOG_WARN;
	return -1;
}
