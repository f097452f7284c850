/* put_cancel: a misbehaving Put client for the tests.
 *
 *   put_cancel ADDRESS NAMESPACE FILE N_PARTS BYTES [status]
 *
 * Opens a Put stream, announces N_PARTS parts and the slot file FILE (its
 * real size), sends its first BYTES bytes (all of them when BYTES is -1),
 * then cancels the call instead of half-closing it, as a client that dies
 * or is killed would. The daemon must store nothing: tests check that with
 * ls and the tier directory. With "status", it half-closes instead and
 * prints the status the daemon answered, as "status=CODE details=TEXT"
 * (a client announcing more than it sends: the CLI cannot). Exit 0 when
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

	if (argc != 6 && !(argc == 7 && strcmp(argv[6], "status") == 0)) {
		fprintf(stderr, "usage: put_cancel ADDRESS NAMESPACE FILE N_PARTS BYTES [status]\n");
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
	if (argc == 7) {
		grpc_metadata_array md, trailing;
		grpc_status_code code = GRPC_STATUS_UNKNOWN;
		grpc_slice details = grpc_empty_slice();
		grpc_op rop[3];
		grpc_metadata_array_init(&md);
		grpc_metadata_array_init(&trailing);
		memset(rop, 0, sizeof(rop));
		rop[0].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
		rop[1].op = GRPC_OP_RECV_INITIAL_METADATA;
		rop[1].data.recv_initial_metadata.recv_initial_metadata = &md;
		rop[2].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
		rop[2].data.recv_status_on_client.trailing_metadata = &trailing;
		rop[2].data.recv_status_on_client.status = &code;
		rop[2].data.recv_status_on_client.status_details = &details;
		/* The close fails on a call the daemon already ended: fine. */
		run_batch(call, cq, rop, 1);
		if (run_batch(call, cq, rop + 1, 2))
			return 1;
		printf("status=%d details=%.*s\n", (int)code, (int)GRPC_SLICE_LENGTH(details),
		       (const char *)GRPC_SLICE_START_PTR(details));
		grpc_slice_unref(details);
		grpc_metadata_array_destroy(&md);
		grpc_metadata_array_destroy(&trailing);
	} else {
		usleep(200000); /* let the daemon take in what was sent */
		grpc_call_cancel(call, NULL);
		printf("sent %lld of %lld bytes, then cancelled\n", want, (long long)st.st_size);
	}
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
