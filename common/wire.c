/* wire.c: hand framing of data-only messages; see wire.h. */
#include "wire.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <grpc/byte_buffer_reader.h>
#include <grpc/slice.h>
#include <protobuf-c/protobuf-c.h>

int wire_buf_new(struct wire_buf *b)
{
	b->mem = malloc(WIRE_HEADROOM + WIRE_CHUNK);
	if (!b->mem) {
		b->data = NULL;
		return -ENOMEM;
	}
	b->data = b->mem + WIRE_HEADROOM;
	return 0;
}

void wire_buf_free(struct wire_buf *b)
{
	free(b->mem);
	b->mem = b->data = NULL;
}

static size_t varint_len(size_t v)
{
	size_t n = 1;
	while (v >= 0x80) {
		v >>= 7;
		n++;
	}
	return n;
}

grpc_byte_buffer *wire_buf_message(struct wire_buf *b, size_t len)
{
	size_t vl = varint_len(len);
	uint8_t *p = b->data - 1 - vl;
	uint8_t *q = p;
	size_t v = len;

	*q++ = 0x0a; /* field 1, wire type 2 */
	while (v >= 0x80) {
		*q++ = (uint8_t)(v | 0x80);
		v >>= 7;
	}
	*q++ = (uint8_t)v;
	/* grpc_slice_new_with_user_data frees `mem` (the allocation) when done. */
	grpc_slice s = grpc_slice_new_with_user_data(p, (size_t)(b->data + len - p), free, b->mem);
	grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
	grpc_slice_unref(s);
	b->mem = b->data = NULL;
	return bb;
}

grpc_byte_buffer *wire_ext_message(const uint8_t *data, size_t len, void (*release)(void *),
				   void *ud)
{
	uint8_t head[WIRE_HEADROOM];
	size_t n = 0, v = len;
	grpc_slice s[2];

	head[n++] = 0x0a; /* field 1, wire type 2 */
	while (v >= 0x80) {
		head[n++] = (uint8_t)(v | 0x80);
		v >>= 7;
	}
	head[n++] = (uint8_t)v;
	s[0] = grpc_slice_from_copied_buffer((const char *)head, n);
	/* gRPC keeps the data slice until the bytes are on the wire, then calls
	 * release(ud): the caller's memory must live until then. */
	s[1] = grpc_slice_new_with_user_data((void *)data, len, release, ud);
	grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(s, 2);
	grpc_slice_unref(s[0]);
	grpc_slice_unref(s[1]);
	return bb;
}

grpc_byte_buffer *wire_pack(const struct ProtobufCMessage *msg)
{
	size_t n = protobuf_c_message_get_packed_size(msg);
	grpc_slice s = grpc_slice_malloc(n);
	protobuf_c_message_pack(msg, GRPC_SLICE_START_PTR(s));
	grpc_byte_buffer *bb = grpc_raw_byte_buffer_create(&s, 1);
	grpc_slice_unref(s);
	return bb;
}

struct ProtobufCMessage *wire_unpack(const struct ProtobufCMessageDescriptor *desc,
				     grpc_byte_buffer *bb)
{
	grpc_byte_buffer_reader r;
	if (!bb || !grpc_byte_buffer_reader_init(&r, bb))
		return NULL;
	grpc_slice s = grpc_byte_buffer_reader_readall(&r);
	grpc_byte_buffer_reader_destroy(&r);
	struct ProtobufCMessage *m =
		protobuf_c_message_unpack(desc, NULL, GRPC_SLICE_LENGTH(s), GRPC_SLICE_START_PTR(s));
	grpc_slice_unref(s);
	return m;
}

static int wire_varint(const uint8_t **p, const uint8_t *end, uint64_t *v)
{
	*v = 0;
	for (unsigned shift = 0; shift < 64 && *p < end; shift += 7) {
		uint8_t b = *(*p)++;
		*v |= (uint64_t)(b & 0x7f) << shift;
		if (!(b & 0x80))
			return 0;
	}
	return -1;
}

/* Walks the serialized message [p, end) of desc: for every string field,
 * refuses a NUL among its wire bytes; recurses into message fields. The
 * bytes were unpacked by protobuf-c already, so they are well-formed; the
 * bounds are checked anyway. Returns 0, or -1 with err filled in. */
static int wire_nul_scan(const ProtobufCMessageDescriptor *desc, const uint8_t *p,
			 const uint8_t *end, int depth, char *err, size_t errlen)
{
	if (depth > 8)
		return 0; /* our messages nest one level; deeper is not ours to judge */
	while (p < end) {
		uint64_t tag, len;
		if (wire_varint(&p, end, &tag))
			return 0;
		switch (tag & 7) {
		case 0:
			if (wire_varint(&p, end, &len))
				return 0;
			break;
		case 1:
			p += 8;
			break;
		case 5:
			p += 4;
			break;
		case 2: {
			if (wire_varint(&p, end, &len) || len > (uint64_t)(end - p))
				return 0;
			const ProtobufCFieldDescriptor *f =
				protobuf_c_message_descriptor_get_field(desc, (unsigned)(tag >> 3));
			const uint8_t *nul = f && f->type == PROTOBUF_C_TYPE_STRING
						     ? memchr(p, 0, len) : NULL;
			if (nul) {
				snprintf(err, errlen,
					 "%s field \"%s\" holds a NUL byte at offset %zu of its %" PRIu64
					 " bytes: strings (namespaces included) must not contain NUL",
					 desc->short_name, f->name, (size_t)(nul - p), len);
				return -1;
			}
			if (f && f->type == PROTOBUF_C_TYPE_MESSAGE &&
			    wire_nul_scan(f->descriptor, p, p + len, depth + 1, err, errlen))
				return -1;
			p += len;
			break;
		}
		default:
			return 0;
		}
	}
	return 0;
}

ProtobufCMessage *wire_unpack_checked(const ProtobufCMessageDescriptor *desc,
				      grpc_byte_buffer *bb, char *err, size_t errlen)
{
	grpc_byte_buffer_reader r;
	if (!bb || !grpc_byte_buffer_reader_init(&r, bb)) {
		snprintf(err, errlen, "malformed %s message", desc->short_name);
		return NULL;
	}
	grpc_slice s = grpc_byte_buffer_reader_readall(&r);
	grpc_byte_buffer_reader_destroy(&r);
	const uint8_t *p = GRPC_SLICE_START_PTR(s);
	size_t n = GRPC_SLICE_LENGTH(s);
	ProtobufCMessage *m = protobuf_c_message_unpack(desc, NULL, n, p);
	if (!m)
		snprintf(err, errlen, "malformed %s message", desc->short_name);
	else if (wire_nul_scan(desc, p, p + n, 0, err, errlen)) {
		protobuf_c_message_free_unpacked(m, NULL);
		m = NULL;
	}
	grpc_slice_unref(s);
	return m;
}

int wire_data_walk(grpc_byte_buffer *bb, int (*sink)(void *ctx, const uint8_t *p, size_t n),
		   void *ctx)
{
	grpc_byte_buffer_reader r;
	grpc_slice s;
	uint8_t head[WIRE_HEADROOM];
	size_t have = 0, total = grpc_byte_buffer_length(bb);
	size_t vlen = 0, hlen = 0;
	int rc = 1;

	if (total == 0)
		return 0;
	/* Peek the tag and varint, which may in principle straddle slices. */
	if (!grpc_byte_buffer_reader_init(&r, bb))
		return 0;
	while (have < sizeof(head) && grpc_byte_buffer_reader_next(&r, &s)) {
		size_t n = GRPC_SLICE_LENGTH(s);
		if (n > sizeof(head) - have)
			n = sizeof(head) - have;
		memcpy(head + have, GRPC_SLICE_START_PTR(s), n);
		have += n;
		grpc_slice_unref(s);
	}
	grpc_byte_buffer_reader_destroy(&r);
	if (have < 2 || head[0] != 0x0a)
		return 0;
	{
		size_t shift = 0, i = 1;
		for (; i < have && shift < 35; i++, shift += 7) {
			vlen |= (size_t)(head[i] & 0x7f) << shift;
			if (!(head[i] & 0x80))
				break;
		}
		if (i >= have || (head[i] & 0x80))
			return 0;
		hlen = i + 1;
	}
	if (hlen + vlen != total)
		return 0; /* more fields follow: not data-only */

	if (!grpc_byte_buffer_reader_init(&r, bb))
		return 0;
	size_t skip = hlen;
	while (grpc_byte_buffer_reader_next(&r, &s)) {
		const uint8_t *p = GRPC_SLICE_START_PTR(s);
		size_t n = GRPC_SLICE_LENGTH(s);
		if (skip) {
			size_t k = skip < n ? skip : n;
			p += k;
			n -= k;
			skip -= k;
		}
		if (n && rc == 1) {
			int x = sink(ctx, p, n);
			if (x < 0)
				rc = x;
		}
		grpc_slice_unref(s);
	}
	grpc_byte_buffer_reader_destroy(&r);
	return rc;
}
