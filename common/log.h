/* log.h: one line per event, key=value fields, level checked before formatting. */
#ifndef KVTIER_LOG_H
#define KVTIER_LOG_H

enum log_level { LOG_ERROR = 0, LOG_WARN = 1, LOG_INFO = 2, LOG_DEBUG = 3 };

extern int log_threshold;

void log_emit(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Parses "error|warn|info|debug". Returns the level or -1. */
int log_level_parse(const char *s);

/* Named klog, not log: <math.h> owns log(). */
#define klog(level, ...)                                                                    \
	do {                                                                                \
		if ((level) <= log_threshold)                                               \
			log_emit((level), __VA_ARGS__);                                     \
	} while (0)

#endif /* KVTIER_LOG_H */
