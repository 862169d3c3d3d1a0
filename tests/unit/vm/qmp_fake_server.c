// SPDX-License-Identifier: MIT
/*
 * A QMP server over the fake VM: for developing and checking protocol
 * clients (tests/integration/test_qmp.py, the vmig CLI) without the real VM.
 * Accepts the same options vmig-vm does and ignores all but --qmp and
 * --incoming/-S (which only set the fake's run state).
 */
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "qmp_fakevm.h"
#include "qmp_int.h"

static struct qmp_server *the_server;

static void on_signal(int sig)
{
	if (the_server)
		qmp_server_stop(the_server);
}

int main(int argc, char **argv)
{
	const char *addr = NULL;
	struct vmig__err err;
	bool incoming = false, paused = false;
	int ret;

	fakevm_reset();
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--qmp") && i + 1 < argc)
			addr = argv[++i];
		else if (!strcmp(argv[i], "--incoming") && i + 1 < argc)
			incoming = ++i > 0;
		else if (!strcmp(argv[i], "-S") || !strcmp(argv[i], "--paused"))
			paused = true;
	}
	if (!addr) {
		fprintf(stderr, "usage: %s --qmp unix:PATH [--incoming X] [-S]\n", argv[0]);
		return 2;
	}
	fakevm_get()->runstate = incoming ? VM_RS_INMIGRATE
				 : paused ? VM_RS_PRELAUNCH
					  : VM_RS_RUNNING;
	if (qmp_server_new(&the_server, fakevm_vm(), addr, &err)) {
		fprintf(stderr, "%s\n", err.msg);
		return 1;
	}
	signal(SIGINT, on_signal);
	signal(SIGTERM, on_signal);
	ret = qmp_server_run(the_server);
	qmp_server_free(the_server);
	return ret ? 1 : 0;
}
