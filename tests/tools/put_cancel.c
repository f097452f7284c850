/* put_cancel: a misbehaving Put client for the tests.
 *
 *   put_cancel ADDRESS NAMESPACE FILE N_PARTS BYTES
 *
 * Opens a Put stream, announces N_PARTS parts and the slot file FILE (its
 * real size), sends its first BYTES bytes (all of them when BYTES is -1),
 * then cancels the call instead of half-closing it, as a client that dies
 * or is killed would. Prints the status it saw. The daemon must store
 * nothing: tests check that with ls and the tier directory. Exit 0 when
 * the script ran, 1 on a local error.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <grpc/byte_buffer.h>
#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>

#include "kvtier.pb-c.h"
#include "wire.h"

static int run_batch(grpc_call *call, grpc_completion_queue *cq, grpc_op *ops, size_t n)
{
	static char tag;
	grpc_event ev;

	if (grpc_call_start_batch(call, ops, n, &tag, NULL) != GRPC_CALL_OK)
		return -1;
	ev = grpc_completion_queue_pluck(cq, &tag, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
	return ev.success ? 0 : -1;
}

int main(int argc, char **argv)
{
	Kvtier__V1__PutRequest q = KVTIER__V1__PUT_REQUEST__INIT;
	Kvtier__V1__PartHeader ph = KVTIER__V1__PART_HEADER__INIT;
	struct stat st;
	grpc_op op[2];
	long long want;
	int fd;

	if (argc != 6) {
		fprintf(stderr, "usage: put_cancel ADDRESS NAMESPACE FILE N_PARTS BYTES\n");
		return 1;
	}
	fd = open(argv[3], O_RDONLY);
	if (fd < 0 || fstat(fd, &st)) {
		perror(argv[3]);
		return 1;
	}
	want = atoll(argv[5]);
	if (want < 0 || want > st.st_size)
		want = st.st_size;
	grpc_init();
	grpc_channel_credentials *cr = grpc_insecure_credentials_create();
	grpc_channel *ch = grpc_channel_create(argv[1], cr, NULL);
	grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
	grpc_call *call = grpc_channel_create_call(
		ch, NULL, 0, cq, grpc_slice_from_static_string("/kvtier.v1.Kvtier/Put"), NULL,
		gpr_inf_future(GPR_CLOCK_REALTIME), NULL);

	ph.suffix = "";
	ph.size = (uint64_t)st.st_size;
	q.part = &ph;
	q.namespace_ = argv[2];
	q.n_parts = (uint32_t)atoi(argv[4]);
	memset(op, 0, sizeof(op));
	op[0].op = GRPC_OP_SEND_INITIAL_METADATA;
	op[1].op = GRPC_OP_SEND_MESSAGE;
	op[1].data.send_message.send_message = wire_pack(&q.base);
	int rc = run_batch(call, cq, op, 2);
	grpc_byte_buffer_destroy(op[1].data.send_message.send_message);
	for (long long off = 0; rc == 0 && off < want;) {
		struct wire_buf b;
		size_t n = want - off < WIRE_CHUNK ? (size_t)(want - off) : WIRE_CHUNK;
		if (wire_buf_new(&b) || pread(fd, b.data, n, off) != (ssize_t)n)
			return 1;
		memset(op, 0, sizeof(op));
		op[0].op = GRPC_OP_SEND_MESSAGE;
		op[0].data.send_message.send_message = wire_buf_message(&b, n);
		rc = run_batch(call, cq, op, 1);
		grpc_byte_buffer_destroy(op[0].data.send_message.send_message);
		off += (long long)n;
	}
	usleep(200000); /* let the daemon take in what was sent */
	grpc_call_cancel(call, NULL);
	printf("sent %lld of %lld bytes, then cancelled\n", want, (long long)st.st_size);
	grpc_call_unref(call);
	grpc_completion_queue_shutdown(cq);
	while (grpc_completion_queue_pluck(cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
	       GRPC_QUEUE_SHUTDOWN)
		;
	grpc_completion_queue_destroy(cq);
	grpc_channel_destroy(ch);
	grpc_channel_credentials_release(cr);
	grpc_shutdown();
	close(fd);
	return 0;
}
