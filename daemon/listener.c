/* listener.c: accept loop for the Unix socket and plaintext TCP; see
 * listener.h for why kvtierd accepts connections itself.
 *
 * One thread polls the listening sockets, the connections waiting for their
 * first bytes and an eventfd that listener_stop() writes. It never blocks on
 * anything else and never stops accepting: every failure is counted, logged
 * (at most once per LISTENER_LOG_EVERY_S per listener and reason) and
 * followed by the next poll. This module must not touch the store.
 */
#include "listener.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <grpc/grpc_posix.h>
#include <grpc/grpc_security.h>

#include "kvtier.h"
#include "log.h"
#include "metrics.h"

#define LISTENER_MAX_SOCKETS 8      /* listening sockets (a TCP name may resolve to several) */
#define LISTENER_ACCEPT_BURST 64    /* accepts per socket per poll round */
#define LISTENER_BACKOFF_MS 100     /* pause after EMFILE/ENFILE/ENOMEM */
#define LISTENER_LOG_EVERY_S 10

struct listener_socket {
	int fd;
	int kind;                   /* CONN_UNIX or CONN_TCP */
};

struct listener_waiting {
	int fd;
	int kind;
	int64_t deadline_ms;        /* monotonic; dropped unread after it */
};

struct listener_refusals {
	uint64_t count;             /* since the last log line */
	time_t last_log;
};

struct listener {
	struct listener_config cfg;
	char unix_path[4096];
	struct listener_socket socks[LISTENER_MAX_SOCKETS];
	unsigned n_socks;
	int wake_fd;                /* eventfd: listener_stop() asks the thread to exit */
	int spare_fd;               /* closed to accept-and-close under EMFILE */
	int fd_limit;               /* client connections only below this descriptor number */
	int unix_min_fd;            /* Unix connections at or above, TCP below (0: no TCP) */
	grpc_server *server;
	grpc_server_credentials *creds;
	pthread_t thread;
	int started;
	struct listener_waiting *waiting;
	size_t n_waiting, cap_waiting;
	struct listener_refusals refusals[CONN_LISTENER_COUNT][CONN_REFUSAL_COUNT];
};

static const char *const listener_kind_names[CONN_LISTENER_COUNT] = {"unix", "tcp"};

static void *listener_main(void *arg);

static int64_t listener_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Counts a refused or dropped connection; logs at most once per
 * LISTENER_LOG_EVERY_S per listener and reason, with the count since. */
static void listener_refused(struct listener *l, int kind, int reason, int err)
{
	static const char *const why[CONN_REFUSAL_COUNT] = {
		[CONN_REFUSED_LIMIT] = "connection limit reached: --max-connections, or the open-file "
				       "limit less the descriptors kept for tier files, LMDB, "
				       "io_uring and metrics (see event=listener_fds)",
		[CONN_REFUSED_EXHAUSTED] = "no file descriptor left in the process",
		[CONN_REFUSED_SILENT] = "the client sent nothing within --handshake-timeout-ms",
	};
	static const char *const hint[CONN_REFUSAL_COUNT] = {
		[CONN_REFUSED_LIMIT] = "find the client holding many connections (ss -xp / ss -tnp); "
				       "raise LimitNOFILE or --max-connections if the load is real",
		[CONN_REFUSED_EXHAUSTED] = "raise LimitNOFILE; see process_open_fds in /metrics",
		[CONN_REFUSED_SILENT] = "a client that connects and stays silent is broken or hostile",
	};
	struct listener_refusals *r = &l->refusals[kind][reason];
	time_t now = time(NULL);

	metrics_conn_refused(kind, reason);
	r->count++;
	if (r->last_log && now - r->last_log < LISTENER_LOG_EVERY_S)
		return;
	klog(LOG_WARN,
	     "event=connection_refused listener=%s reason=%s count=%llu fd_limit=%d%s%s "
	     "why=\"%s\" hint=\"%s\"",
	     listener_kind_names[kind], metrics_conn_refusal_names[reason],
	     (unsigned long long)r->count, l->fd_limit, err ? " error=" : "",
	     err ? strerror(err) : "", why[reason], hint[reason]);
	r->count = 0;
	r->last_log = now;
}

static int listener_add_socket(struct listener *l, int fd, int kind)
{
	if (l->n_socks >= LISTENER_MAX_SOCKETS) {
		close(fd);
		return -ENOSPC;
	}
	l->socks[l->n_socks].fd = fd;
	l->socks[l->n_socks].kind = kind;
	l->n_socks++;
	return 0;
}

static int listener_open_unix(struct listener *l, const char *path, char *err, size_t errlen)
{
	struct sockaddr_un sa;
	struct stat st;
	int fd, rc;

	memset(&sa, 0, sizeof(sa));
	sa.sun_family = AF_UNIX;
	if (strlen(path) >= sizeof(sa.sun_path)) {
		snprintf(err, errlen, "Unix socket path %s is longer than %zu bytes; use a shorter "
			 "--socket path", path, sizeof(sa.sun_path) - 1);
		return KVTIER_E_INVALID;
	}
	memcpy(sa.sun_path, path, strlen(path));
	/* A stale socket from a crashed run would make the bind fail. Only
	 * remove a socket, never another kind of file. */
	if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode))
		unlink(path);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		rc = -errno;
		snprintf(err, errlen, "cannot create a Unix socket: %s", strerror(-rc));
		return rc;
	}
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) || chmod(path, 0660) ||
	    listen(fd, SOMAXCONN)) {
		rc = -errno;
		snprintf(err, errlen, "cannot listen on Unix socket %s: %s (is the directory there "
			 "and writable, and no other file in the way?)", path, strerror(-rc));
		close(fd);
		return rc;
	}
	snprintf(l->unix_path, sizeof(l->unix_path), "%s", path);
	return listener_add_socket(l, fd, CONN_UNIX);
}

/* "HOST:PORT" or "[V6]:PORT"; every address HOST resolves to is bound. */
static int listener_open_tcp(struct listener *l, const char *hostport, char *err, size_t errlen)
{
	char host[256];
	const char *port, *colon = strrchr(hostport, ':');
	struct addrinfo hints, *res = NULL, *ai;
	int rc, bound = 0, last = 0;

	if (!colon || !colon[1] || (size_t)(colon - hostport) >= sizeof(host)) {
		snprintf(err, errlen, "--listen %s: expected HOST:PORT (e.g. 127.0.0.1:7077)",
			 hostport);
		return KVTIER_E_INVALID;
	}
	memcpy(host, hostport, (size_t)(colon - hostport));
	host[colon - hostport] = '\0';
	port = colon + 1;
	if (host[0] == '[') { /* [::1] */
		size_t n = strlen(host);
		if (n < 2 || host[n - 1] != ']') {
			snprintf(err, errlen, "--listen %s: an IPv6 address goes in brackets, "
				 "e.g. [::1]:7077", hostport);
			return KVTIER_E_INVALID;
		}
		memmove(host, host + 1, n - 2);
		host[n - 2] = '\0';
	}
	memset(&hints, 0, sizeof(hints));
	hints.ai_family = AF_UNSPEC;
	hints.ai_socktype = SOCK_STREAM;
	hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
	rc = getaddrinfo(host[0] ? host : NULL, port, &hints, &res);
	if (rc) {
		snprintf(err, errlen, "--listen %s: cannot resolve: %s", hostport, gai_strerror(rc));
		return KVTIER_E_INVALID;
	}
	for (ai = res; ai; ai = ai->ai_next) {
		int one = 1;
		int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
				ai->ai_protocol);
		if (fd < 0) {
			last = errno;
			continue;
		}
		setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
		if (ai->ai_family == AF_INET6) /* "::" and "0.0.0.0" are bound separately */
			setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
		if (bind(fd, ai->ai_addr, ai->ai_addrlen) || listen(fd, SOMAXCONN)) {
			last = errno;
			close(fd);
			continue;
		}
		if (listener_add_socket(l, fd, CONN_TCP) == 0)
			bound++;
	}
	freeaddrinfo(res);
	if (!bound) {
		snprintf(err, errlen, "cannot listen on %s: %s (address in use, or not this "
			 "machine's?)", hostport, strerror(last ? last : EADDRNOTAVAIL));
		return last ? -last : -EADDRNOTAVAIL;
	}
	return 0;
}

int listener_open(const struct listener_config *cfg, struct listener **out, char *err,
		  size_t errlen)
{
	struct listener *l = calloc(1, sizeof(*l));
	int rc = 0;

	*out = NULL;
	if (!l)
		return -ENOMEM;
	l->cfg = *cfg;
	l->wake_fd = -1;
	l->spare_fd = -1;
	if (cfg->unix_path)
		rc = listener_open_unix(l, cfg->unix_path, err, errlen);
	if (!rc && cfg->tcp)
		rc = listener_open_tcp(l, cfg->tcp, err, errlen);
	if (rc) {
		listener_stop(l);
		return rc;
	}
	*out = l;
	return 0;
}

/* Where client descriptors may go, from the soft limit as it is now (main
 * raised it to the hard limit) and the lowest descriptor free at start. */
static void listener_plan_fds(struct listener *l)
{
	struct rlimit rl;
	long soft = 1024;
	long base = l->spare_fd + 1, limit;

	if (getrlimit(RLIMIT_NOFILE, &rl) == 0)
		soft = rl.rlim_cur == RLIM_INFINITY || rl.rlim_cur > INT32_MAX ? INT32_MAX
									    : (long)rl.rlim_cur;
	limit = soft - (long)l->cfg.fd_reserve;
	if (l->cfg.max_connections && base + (long)l->cfg.max_connections < limit)
		limit = base + (long)l->cfg.max_connections;
	if (limit < base)
		limit = base; /* every connection is refused, and the log says why */
	l->fd_limit = (int)limit;
	l->unix_min_fd = 0;
	if (l->cfg.tcp) /* half for each listener */
		l->unix_min_fd = (int)(base + (limit - base) / 2);
	klog(LOG_INFO,
	     "event=listener_fds soft_limit=%ld reserve=%u first_client_fd=%ld fd_limit=%d "
	     "unix_min_fd=%d max_connections=%u",
	     soft, l->cfg.fd_reserve, base, l->fd_limit, l->unix_min_fd, l->cfg.max_connections);
	if (limit - base < 16)
		klog(LOG_WARN, "event=few_connections allowed=%ld soft_limit=%ld reserve=%u "
		     "hint=\"raise LimitNOFILE (ulimit -n) or lower --workers\"",
		     limit - base, soft, l->cfg.fd_reserve);
}

int listener_start(struct listener *l, grpc_server *server, char *err, size_t errlen)
{
	int rc;

	l->server = server;
	l->creds = grpc_insecure_server_credentials_create();
	l->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	l->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	if (l->wake_fd < 0 || l->spare_fd < 0) {
		rc = -errno;
		snprintf(err, errlen, "cannot start the listener: %s", strerror(-rc));
		return rc;
	}
	listener_plan_fds(l);
	rc = pthread_create(&l->thread, NULL, listener_main, l);
	if (rc) {
		snprintf(err, errlen, "cannot start the listener thread: %s", strerror(rc));
		return -rc;
	}
	l->started = 1;
	return 0;
}

int listener_peer_is_unix(const struct listener *l, const char *peer)
{
	char *end;
	long n;

	if (!peer)
		return 0;
	if (strncmp(peer, "unix:", 5) == 0)
		return 1;
	if (!l || strncmp(peer, "fd:", 3) != 0)
		return 0;
	if (!l->cfg.unix_path)
		return 0;
	if (!l->cfg.tcp)
		return 1; /* every descriptor we hand over is a Unix connection */
	errno = 0;
	n = strtol(peer + 3, &end, 10);
	if (errno || end == peer + 3 || *end)
		return 0;
	return n >= l->unix_min_fd;
}

/* Moves a new connection to where its kind may live (see listener.h);
 * returns the descriptor to keep, or -1 (closed, refused). */
static int listener_place_fd(struct listener *l, int fd, int kind)
{
	if (kind == CONN_UNIX && fd < l->unix_min_fd) {
		int moved = fcntl(fd, F_DUPFD_CLOEXEC, l->unix_min_fd);
		int saved = errno;
		close(fd);
		if (moved < 0) {
			listener_refused(l, kind, saved == EMFILE || saved == EINVAL
							   ? CONN_REFUSED_LIMIT : CONN_REFUSED_EXHAUSTED,
					 saved);
			return -1;
		}
		fd = moved;
		fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
	}
	if (fd >= l->fd_limit || (kind == CONN_TCP && l->unix_min_fd && fd >= l->unix_min_fd)) {
		close(fd);
		listener_refused(l, kind, CONN_REFUSED_LIMIT, 0);
		return -1;
	}
	return fd;
}

static int listener_wait_add(struct listener *l, int fd, int kind)
{
	if (l->n_waiting == l->cap_waiting) {
		size_t cap = l->cap_waiting ? l->cap_waiting * 2 : 64;
		struct listener_waiting *w = realloc(l->waiting, cap * sizeof(*w));
		if (!w)
			return -ENOMEM;
		l->waiting = w;
		l->cap_waiting = cap;
	}
	l->waiting[l->n_waiting].fd = fd;
	l->waiting[l->n_waiting].kind = kind;
	l->waiting[l->n_waiting].deadline_ms = listener_now_ms() + l->cfg.handshake_timeout_ms;
	l->n_waiting++;
	metrics_conn_waiting(1);
	return 0;
}

/* Accepts up to a burst from one listening socket. Returns 1 when the loop
 * should back off (out of descriptors or memory), else 0. */
static int listener_accept(struct listener *l, struct listener_socket *s)
{
	for (int i = 0; i < LISTENER_ACCEPT_BURST; i++) {
		int fd = accept4(s->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0) {
			int e = errno;
			if (e == EAGAIN || e == EWOULDBLOCK)
				return 0;
			if (e == EINTR || e == ECONNABORTED || e == EPROTO || e == EPERM)
				continue;
			if (e == EMFILE || e == ENFILE) {
				/* Take the connection off the queue with the spare
				 * descriptor, so the client is told instead of waiting. */
				if (l->spare_fd >= 0) {
					close(l->spare_fd);
					fd = accept4(s->fd, NULL, NULL, SOCK_CLOEXEC);
					if (fd >= 0)
						close(fd);
					l->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
				}
				listener_refused(l, s->kind, CONN_REFUSED_EXHAUSTED, e);
				return 1;
			}
			listener_refused(l, s->kind, CONN_REFUSED_EXHAUSTED, e); /* ENOBUFS, ENOMEM */
			return 1;
		}
		fd = listener_place_fd(l, fd, s->kind);
		if (fd < 0)
			continue;
		if (s->kind == CONN_TCP) {
			int one = 1;
			setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		}
		if (listener_wait_add(l, fd, s->kind)) {
			close(fd);
			listener_refused(l, s->kind, CONN_REFUSED_EXHAUSTED, ENOMEM);
			return 1;
		}
	}
	return 0;
}

static void listener_wait_remove(struct listener *l, size_t i)
{
	l->waiting[i] = l->waiting[--l->n_waiting];
	metrics_conn_waiting(-1);
}

/* Hands readable connections to gRPC, drops the silent ones past their
 * deadline and the ones the client closed. `pfd` holds one entry per
 * waiting connection, in order. Returns the next deadline (ms) or -1. */
static int64_t listener_service_waiting(struct listener *l, const struct pollfd *pfd, size_t n)
{
	int64_t now = listener_now_ms(), next = -1;

	/* Walk backwards: listener_wait_remove moves the last entry into i. */
	for (size_t i = n; i-- > 0;) {
		struct listener_waiting *w = &l->waiting[i];
		if (pfd[i].revents & POLLIN) {
			int fd = w->fd, kind = w->kind;
			listener_wait_remove(l, i);
			grpc_server_add_channel_from_fd(l->server, fd, l->creds);
			metrics_conn_accepted(kind);
		} else if (pfd[i].revents & (POLLHUP | POLLERR | POLLNVAL)) {
			close(w->fd);
			listener_wait_remove(l, i);
		} else if (now >= w->deadline_ms) {
			int kind = w->kind;
			close(w->fd);
			listener_wait_remove(l, i);
			listener_refused(l, kind, CONN_REFUSED_SILENT, 0);
		}
	}
	for (size_t i = 0; i < l->n_waiting; i++)
		if (next < 0 || l->waiting[i].deadline_ms < next)
			next = l->waiting[i].deadline_ms;
	return next;
}

static void *listener_main(void *arg)
{
	struct listener *l = arg;
	struct pollfd *pfd = NULL;
	size_t cap = 0;
	int64_t backoff_until = 0, next_deadline = -1;

	for (;;) {
		size_t n = 0, want = 1 + l->n_socks + l->n_waiting;
		int64_t now = listener_now_ms();
		int timeout = -1, accepting = now >= backoff_until;

		if (l->spare_fd < 0) /* lost to a race under EMFILE: take it back when we can */
			l->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
		if (want > cap) {
			struct pollfd *p = realloc(pfd, want * sizeof(*p));
			if (!p) { /* keep serving the waiting ones with what we have */
				struct timespec ts = {0, LISTENER_BACKOFF_MS * 1000000L};
				nanosleep(&ts, NULL);
				continue;
			}
			pfd = p;
			cap = want;
		}
		for (size_t i = 0; i < l->n_waiting; i++)
			pfd[n++] = (struct pollfd){.fd = l->waiting[i].fd, .events = POLLIN};
		pfd[n++] = (struct pollfd){.fd = l->wake_fd, .events = POLLIN};
		for (unsigned i = 0; i < l->n_socks; i++)
			pfd[n++] = (struct pollfd){.fd = accepting ? l->socks[i].fd : -1,
						   .events = POLLIN};
		if (next_deadline >= 0)
			timeout = (int)(next_deadline > now ? next_deadline - now : 0);
		if (!accepting && (timeout < 0 || backoff_until - now < timeout))
			timeout = (int)(backoff_until - now);
		if (poll(pfd, n, timeout) < 0 && errno != EINTR) {
			klog(LOG_ERROR, "event=listener_poll_failed error=\"%s\"", strerror(errno));
			struct timespec ts = {0, LISTENER_BACKOFF_MS * 1000000L};
			nanosleep(&ts, NULL);
			continue;
		}
		if (pfd[l->n_waiting].revents & POLLIN)
			break;
		size_t n_waiting = l->n_waiting; /* accepts below append after these */
		for (unsigned i = 0; i < l->n_socks; i++)
			if ((pfd[n_waiting + 1 + i].revents & POLLIN) &&
			    listener_accept(l, &l->socks[i]))
				backoff_until = listener_now_ms() + LISTENER_BACKOFF_MS;
		next_deadline = listener_service_waiting(l, pfd, n_waiting);
	}
	free(pfd);
	return NULL;
}

void listener_stop(struct listener *l)
{
	if (!l)
		return;
	if (l->started) {
		uint64_t one = 1;
		if (write(l->wake_fd, &one, sizeof(one)) < 0)
			klog(LOG_ERROR, "event=listener_wake_failed error=\"%s\"", strerror(errno));
		pthread_join(l->thread, NULL);
	}
	for (size_t i = 0; i < l->n_waiting; i++) {
		close(l->waiting[i].fd);
		metrics_conn_waiting(-1);
	}
	free(l->waiting);
	for (unsigned i = 0; i < l->n_socks; i++)
		close(l->socks[i].fd);
	if (l->unix_path[0]) {
		struct stat st;
		if (lstat(l->unix_path, &st) == 0 && S_ISSOCK(st.st_mode))
			unlink(l->unix_path);
	}
	if (l->wake_fd >= 0)
		close(l->wake_fd);
	if (l->spare_fd >= 0)
		close(l->spare_fd);
	if (l->creds)
		grpc_server_credentials_release(l->creds);
	free(l);
}
