// SPDX-License-Identifier: MIT
/*
 * Fuzz target for the QMP server: framing, JSON parsing, negotiation,
 * argument checking, every command and the human monitor, against a fake VM
 * (vm/qmp_fakevm.c) so no input can touch files or sockets.
 *
 * Input layout: byte 0 picks the size of the chunks the rest is fed in (so
 * objects split across reads are covered); the rest is what a client sends.
 * Half of the inputs start with a negotiated session, so the commands behind
 * qmp_capabilities are reached without the fuzzer having to find it.
 */
#include <stddef.h>
#include <stdint.h>

#include "qmp_fakevm.h"
#include "qmp_int.h"

#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const char negotiate[] = "{\"execute\":\"qmp_capabilities\"}";
	struct qmp_server *srv;
	struct qmp_client *c;
	size_t chunk;

	if (size < 1)
		return 0;
	fakevm_reset();
	if (qmp__server_new_detached(&srv, fakevm_vm()))
		return 0;
	if (qmp__client_new_detached(srv, &c)) {
		qmp_server_free(srv);
		return 0;
	}
	chunk = (data[0] & 0x7f) + 1;
	if (data[0] & 0x80)
		qmp__client_feed(c, negotiate, sizeof(negotiate) - 1);
	data++;
	size--;
	while (size) {
		size_t n = size < chunk ? size : chunk;

		if (qmp__client_feed(c, data, n))
			break;
		qmp__server_flush_events(srv);
		qmp__client_output_clear(c);
		data += n;
		size -= n;
	}
	qmp__server_flush_events(srv);
	qmp_server_free(srv);
	return 0;
}
