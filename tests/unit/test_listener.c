/* test_listener.c: the accept loop survives running out of descriptors (review D1).
 *
 * The process fills every descriptor its soft limit allows; a client (a forked child, with
 * its own descriptor table) then connects: each connection must be taken off the queue and
 * closed (the client sees EOF, counted as "exhausted"), not left waiting. Once descriptors
 * are free again, a connection that sends the HTTP/2 preface is handed to gRPC, which
 * answers with its SETTINGS frame: the loop never stopped accepting. gRPC's own listener
 * (1.51) stops for good after one EMFILE.
 */
#include "../../daemon/listener.c"

#include <sys/wait.h>

#include "check.h"

#define CLIENTS 5

/* listener.c reports to metrics.c; count here instead. */
const char *const metrics_conn_refusal_names[CONN_REFUSAL_COUNT] = {"limit", "exhausted",
								    "silent"};
static _Atomic unsigned long n_accepted, n_refused[CONN_REFUSAL_COUNT];

void metrics_conn_accepted(int listener)
{
	(void)listener;
	n_accepted++;
}

void metrics_conn_refused(int listener, int reason)
{
	(void)listener;
	n_refused[reason]++;
}

void metrics_conn_waiting(int delta)
{
	(void)delta;
}

static int client_connect(const char *path)
{
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa))) {
		if (fd >= 0)
			close(fd);
		return -1;
	}
	return fd;
}

/* 1 if the server closed fd within ms (EOF or reset), 0 if it sent bytes, -1 on timeout. */
static int client_wait(int fd, int ms)
{
	struct pollfd p = {.fd = fd, .events = POLLIN};
	char buf[256];
	ssize_t n;

	if (poll(&p, 1, ms) != 1)
		return -1;
	n = recv(fd, buf, sizeof(buf), 0);
	return n > 0 ? 0 : 1;
}

static void wait_byte(int fd)
{
	char c;
	CHECK(read(fd, &c, 1) == 1);
}

/* The child: phase 1 connects CLIENTS times and expects each closed; phase 2 sends the
 * HTTP/2 preface and expects gRPC's SETTINGS. Exit code: 0 or the failing phase. */
static int client_main(const char *path, int go, int done)
{
	static const char preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
				      "\x00\x00\x00\x04\x00\x00\x00\x00\x00";
	char ok = 'y', bad = 'n';
	int fd, closed = 0;

	wait_byte(go);
	for (int i = 0; i < CLIENTS; i++) {
		fd = client_connect(path);
		if (fd >= 0 && client_wait(fd, 5000) == 1)
			closed++;
		if (fd >= 0)
			close(fd);
	}
	if (write(done, closed == CLIENTS ? &ok : &bad, 1) != 1)
		return 3;
	if (closed != CLIENTS) {
		fprintf(stderr, "child: %d of %d connections closed under EMFILE\n", closed,
			CLIENTS);
		return 1;
	}
	wait_byte(go);
	fd = client_connect(path);
	if (fd < 0 || write(fd, preface, sizeof(preface) - 1) != (ssize_t)sizeof(preface) - 1 ||
	    client_wait(fd, 5000) != 0) {
		fprintf(stderr, "child: no HTTP/2 answer after the descriptors were freed\n");
		return 2;
	}
	close(fd);
	return 0;
}

int main(void)
{
	char dir[] = "/tmp/kvtier-listener-XXXXXX", path[128], err[256] = "";
	int go[2], done[2], fillers[4096], n_fill = 0, status;
	struct listener_config cfg = {.max_connections = 1000, .fd_reserve = 4,
				      .handshake_timeout_ms = 2000};
	struct listener *l;
	struct rlimit rl;
	grpc_server *server;
	grpc_completion_queue *cq;
	char tag, c;
	pid_t pid;

	CHECK(mkdtemp(dir));
	snprintf(path, sizeof(path), "%s/s.sock", dir);
	cfg.unix_path = path;
	CHECK(pipe2(go, O_CLOEXEC) == 0 && pipe2(done, O_CLOEXEC) == 0);
	pid = fork();
	CHECK(pid >= 0);
	if (pid == 0) {
		close(go[1]); /* so that a parent that died is an EOF here */
		close(done[0]);
		_exit(client_main(path, go[0], done[1]));
	}
	close(go[0]);
	close(done[1]);

	grpc_init();
	server = grpc_server_create(NULL, NULL);
	cq = grpc_completion_queue_create_for_next(NULL);
	grpc_server_register_completion_queue(server, cq, NULL);
	grpc_server_start(server);
	/* A small soft limit keeps the fill short. */
	CHECK(getrlimit(RLIMIT_NOFILE, &rl) == 0);
	rl.rlim_cur = 256;
	if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < rl.rlim_cur)
		rl.rlim_cur = rl.rlim_max;
	CHECK(setrlimit(RLIMIT_NOFILE, &rl) == 0);
	if (listener_open(&cfg, &l, err, sizeof(err)))
		SKIP("cannot listen on %s: %s", path, err);
	CHECK(listener_start(l, server, err, sizeof(err)) == 0);

	/* Phase 1: no descriptor left in the process. */
	for (;;) {
		int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
		if (fd < 0)
			break;
		CHECK(n_fill < (int)(sizeof(fillers) / sizeof(fillers[0])));
		fillers[n_fill++] = fd;
	}
	CHECK(errno == EMFILE);
	c = 'g';
	CHECK(write(go[1], &c, 1) == 1);
	CHECK(read(done[0], &c, 1) == 1);
	CHECK(c == 'y');
	/* The loop counts a refusal just after closing it: give it a moment (bounded). */
	for (int i = 0; i < 100 && n_refused[CONN_REFUSED_EXHAUSTED] < CLIENTS; i++)
		usleep(50 * 1000);
	CHECK(n_refused[CONN_REFUSED_EXHAUSTED] >= CLIENTS);

	/* Phase 2: descriptors free again; a real connection reaches gRPC. */
	while (n_fill)
		close(fillers[--n_fill]);
	c = 'g';
	CHECK(write(go[1], &c, 1) == 1);
	CHECK(waitpid(pid, &status, 0) == pid);
	CHECK(WIFEXITED(status));
	CHECK_EQ_INT(WEXITSTATUS(status), 0);
	for (int i = 0; i < 100 && n_accepted < 1; i++) /* counted after the hand-over */
		usleep(50 * 1000);
	CHECK(n_accepted >= 1);
	printf("under EMFILE: %lu connections refused (exhausted), then %lu handed to gRPC\n",
	       (unsigned long)n_refused[CONN_REFUSED_EXHAUSTED], (unsigned long)n_accepted);

	listener_stop(l);
	grpc_server_shutdown_and_notify(server, cq, &tag);
	grpc_server_cancel_all_calls(server);
	while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).tag != &tag)
		;
	grpc_server_destroy(server);
	grpc_completion_queue_shutdown(cq);
	while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
	       GRPC_QUEUE_SHUTDOWN)
		;
	grpc_completion_queue_destroy(cq);
	grpc_shutdown();
	rmdir(dir);
	return 0;
}
