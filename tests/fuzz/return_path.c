// SPDX-License-Identifier: MIT
/*
 * Fuzz target for the source's return-path reader: the input is what a
 * hostile destination sends back on the migration connection.
 */
#include <stdint.h>
#include <stdlib.h>

#include "stream/stream.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct vmig__reader *r = malloc(sizeof(*r));
	struct vmig__err err = {{0}};

	if (!r)
		return 0;
	vmig__reader_init_mem(r, data, size);
	for (;;) {
		uint8_t type, payload[256];
		size_t len;

		if (vmig__rp_read(r, &type, payload, sizeof(payload), &len, &err))
			break;
	}
	free(r);
	return 0;
}
