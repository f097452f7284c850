/* wire.h: framing of bulk-data messages on the gRPC wire, shared by kvtierd
 * and libkvtier.
 *
 * Chunk (Fetch) and PutRequest (Put) both have `bytes data = 1`. A message
 * carrying only data is framed by hand: tag 0x0a, varint length, the bytes.
 * That is valid protobuf, so any gRPC peer can read it, and it lets us send a
 * buffer we filled in place (no packing copy) and consume received slices
 * without unpacking them. Messages with other fields (part headers,
 * namespace) are packed/unpacked with protobuf-c.
 */
#ifndef KVTIER_WIRE_H
#define KVTIER_WIRE_H

#include <stddef.h>
#include <stdint.h>

#include <grpc/byte_buffer.h>

#define WIRE_CHUNK (1u << 20)   /* data bytes per message */
#define WIRE_MAP_CHUNK (4u << 20) /* per message sent from a mapped file (no buffer) */
#define WIRE_HEADROOM 8         /* room for tag + varint before the data */
#define WIRE_MAX_MESSAGE (16u << 20) /* receive limit on both sides */

/* A send buffer: WIRE_HEADROOM bytes of headroom, then up to WIRE_CHUNK data
 * bytes. Allocate with wire_buf_new(); wire_buf_message() hands it to gRPC
 * and gRPC frees it when sent. */
struct wire_buf {
	uint8_t *mem;   /* WIRE_HEADROOM + WIRE_CHUNK bytes */
	uint8_t *data;  /* mem + WIRE_HEADROOM: fill here */
};

/* Returns 0 or -ENOMEM. */
int wire_buf_new(struct wire_buf *b);
void wire_buf_free(struct wire_buf *b);

/* Frames the first `len` data bytes of b as a data-only message and returns
 * a byte buffer that owns b's memory (b is emptied; do not free it). NULL on
 * allocation failure (b is left intact). */
grpc_byte_buffer *wire_buf_message(struct wire_buf *b, size_t len);

/* Frames len bytes at data, which the caller keeps valid until gRPC calls
 * release(ud) (when the message has been written, or dropped), as a
 * data-only message without copying them: a small header slice plus a slice
 * pointing at data. release(ud) is called exactly once in every case: the
 * caller never releases ud itself after this call. */
grpc_byte_buffer *wire_ext_message(const uint8_t *data, size_t len, void (*release)(void *),
				   void *ud);

/* Packs a protobuf-c message into a new byte buffer. NULL on failure. */
struct ProtobufCMessage;
grpc_byte_buffer *wire_pack(const struct ProtobufCMessage *msg);

/* Unpacks a whole byte buffer into a protobuf-c message of `desc`.
 * Returns NULL when it is not valid. Free with protobuf_c_message_free_unpacked. */
struct ProtobufCMessageDescriptor;
struct ProtobufCMessage *wire_unpack(const struct ProtobufCMessageDescriptor *desc,
				     grpc_byte_buffer *bb);

/* wire_unpack that also refuses a string field holding a NUL byte, in the
 * message or in any message nested in it. protobuf-c hands strings over as
 * C strings, so "model-A\0x" would silently become "model-A": the lengths on
 * the wire are the only place the NUL is still visible. On failure returns
 * NULL and writes a sentence for the caller's error into err. */
struct ProtobufCMessage *wire_unpack_checked(const struct ProtobufCMessageDescriptor *desc,
					     grpc_byte_buffer *bb, char *err, size_t errlen);

/* If bb is a data-only message, calls sink for each contiguous run of its
 * data bytes (no copy) and returns 1 (or sink's negative return value, which
 * stops the walk). Returns 0 when bb holds something else (unpack it). */
int wire_data_walk(grpc_byte_buffer *bb, int (*sink)(void *ctx, const uint8_t *p, size_t n),
		   void *ctx);

#endif /* KVTIER_WIRE_H */
