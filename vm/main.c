// SPDX-License-Identifier: MIT
/*
 * vmig-vm: command line, then the QMP main loop. Options follow QEMU where
 * QEMU has a name (-S, --incoming, --qmp, --object); the guest options
 * (--workload, --dirty-rate, --wss, --fill) are vmig's own.
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "objects.h"
#include "qmp.h"
#include "vm.h"

static struct qmp_server *g_srv; /* for the signal handler only */
static volatile sig_atomic_t g_quit;

static void on_signal(int sig)
{
	(void)sig;
	g_quit = 1;
	if (g_srv)
		qmp_server_stop(g_srv);
}

static void usage(FILE *f)
{
	fprintf(
	    f,
	    "usage: vmig-vm [options]\n"
	    "  --mem SIZE              guest RAM (K/M/G suffixes, powers of 1024; default 512M)\n"
	    "  --vcpus N               vCPU threads (default 1)\n"
	    "  --workload KIND         idle | random | stream | hotset (default idle)\n"
	    "  --dirty-rate RATE       bytes/s written by all vCPUs together (K/M/G; 0 = flat "
	    "out)\n"
	    "  --wss SIZE              working set of random/stream/hotset (default: all RAM;\n"
	    "                          hotset: 90%% of writes go to its first 1/16)\n"
	    "  --fill zero|random|PATH initial RAM contents (default zero)\n"
	    "  --mem-prealloc          allocate all guest RAM at start-up (QEMU's -mem-prealloc)\n"
	    "  --hugetlb               back guest RAM with 2 MiB huge pages (QEMU's\n"
	    "                          memory-backend-memfd,hugetlb=on); reserve them first in\n"
	    "                          /proc/sys/vm/nr_hugepages\n"
	    "  --seed N                seed for --fill random and the workloads\n"
	    "  --qmp unix:PATH         QMP control socket\n"
	    "  --incoming URI          tcp:HOST:PORT | unix:PATH | defer: receive a migration\n"
	    "                          (a URI listens at once; for TLS use defer, then QMP\n"
	    "                          migrate-set-parameters and migrate-incoming)\n"
	    "  --object TYPE,id=ID,... tls-creds-x509,id=ID,endpoint=server|client,dir=DIR\n"
	    "                          [,verify-peer=on|off] | tls-creds-psk,id=ID,\n"
	    "                          endpoint=server|client,dir=DIR[,username=NAME] |\n"
	    "                          authz-simple,id=ID,identity=NAME; repeatable; write a\n"
	    "                          comma inside a value as ',,' (QEMU's -object)\n"
	    "  --dirty-tracking MODE   auto | async | sync (x-vmig-dirty-tracking)\n"
	    "  -S, --paused            do not start the vCPUs (also after an incoming migration)\n"
	    "  -h, --help\n");
}

struct opts {
	struct vm_config cfg;
	const char *qmp;
	const char *incoming;
	int64_t dirty_tracking;
	const char **objects; /* --object arguments, in order (malloc'ed) */
	unsigned nobjects;
};

/* --object: only its syntax now; the objects are created once the VM is. */
static int add_object_opt(struct opts *o, const char *arg)
{
	struct vmig__err err = {{0}};
	const char **list;
	json_t *props;

	if (vm_objects_parse_opt(arg, &props, &err)) {
		fprintf(stderr, "vmig-vm: --object %s: %s\n", arg, err.msg);
		return -1;
	}
	json_decref(props);
	list = realloc(o->objects, (o->nobjects + 1) * sizeof(*list));
	if (!list) {
		fprintf(stderr, "vmig-vm: --object: %s\n", strerror(ENOMEM));
		return -1;
	}
	list[o->nobjects++] = arg;
	o->objects = list;
	return 0;
}

static int parse_size_opt(const char *name, const char *arg, uint64_t *out)
{
	if (vmig__parse_size(arg, out)) {
		fprintf(stderr, "vmig-vm: invalid %s '%s' (expected a number with K/M/G suffix)\n",
			name, arg);
		return -1;
	}
	return 0;
}

static int parse_choice(const char *name, const char *arg, const char *const *names, int n)
{
	for (int i = 0; i < n; i++)
		if (!strcmp(arg, names[i]))
			return i;
	fprintf(stderr, "vmig-vm: invalid %s '%s'\n", name, arg);
	return -1;
}

static int parse_one(struct opts *o, int c, const char *arg)
{
	static const char *const workloads[] = {"idle", "random", "stream", "hotset"};
	static const char *const trackers[] = {"auto", "async", "sync"};
	uint64_t v;
	int i;

	switch (c) {
	case 'm':
		return parse_size_opt("--mem", arg, &o->cfg.mem_bytes);
	case 'c':
		if (parse_size_opt("--vcpus", arg, &v) || !v || v > 64) {
			fprintf(stderr, "vmig-vm: --vcpus must be 1..64\n");
			return -1;
		}
		o->cfg.vcpus = (unsigned)v;
		return 0;
	case 'w':
		i = parse_choice("--workload", arg, workloads, 4);
		o->cfg.workload = (enum vm_workload)i;
		return i < 0 ? -1 : 0;
	case 'r':
		return parse_size_opt("--dirty-rate", arg, &o->cfg.dirty_rate);
	case 's':
		return parse_size_opt("--wss", arg, &o->cfg.wss_bytes);
	case 'f':
		if (!strcmp(arg, "zero")) {
			o->cfg.fill = VM_FILL_ZERO;
		} else if (!strcmp(arg, "random")) {
			o->cfg.fill = VM_FILL_RANDOM;
		} else {
			o->cfg.fill = VM_FILL_FILE;
			o->cfg.fill_path = arg;
		}
		return 0;
	case 'e':
		return parse_size_opt("--seed", arg, &o->cfg.seed);
	case 'q':
		o->qmp = arg;
		return 0;
	case 'i':
		o->incoming = arg;
		return 0;
	case 't':
		i = parse_choice("--dirty-tracking", arg, trackers, 3);
		o->dirty_tracking = i;
		return i < 0 ? -1 : 0;
	case 'S':
		o->cfg.start_paused = true;
		return 0;
	case 'p':
		o->cfg.prealloc = true;
		return 0;
	case 'H':
		o->cfg.hugetlb = true;
		return 0;
	case 'o':
		return add_object_opt(o, arg);
	default:
		return -1;
	}
}

static int parse_args(int argc, char **argv, struct opts *o)
{
	static const struct option longopts[] = {
	    {"mem", required_argument, NULL, 'm'},
	    {"vcpus", required_argument, NULL, 'c'},
	    {"workload", required_argument, NULL, 'w'},
	    {"dirty-rate", required_argument, NULL, 'r'},
	    {"wss", required_argument, NULL, 's'},
	    {"fill", required_argument, NULL, 'f'},
	    {"seed", required_argument, NULL, 'e'},
	    {"qmp", required_argument, NULL, 'q'},
	    {"incoming", required_argument, NULL, 'i'},
	    {"dirty-tracking", required_argument, NULL, 't'},
	    {"paused", no_argument, NULL, 'S'},
	    {"mem-prealloc", no_argument, NULL, 'p'},
	    {"hugetlb", no_argument, NULL, 'H'},
	    {"object", required_argument, NULL, 'o'},
	    {"help", no_argument, NULL, 'h'},
	    {0},
	};
	int c;

	o->cfg.mem_bytes = 512ull << 20;
	o->cfg.vcpus = 1;
	while ((c = getopt_long(argc, argv, "Sh", longopts, NULL)) != -1) {
		if (c == 'h') {
			usage(stdout);
			exit(0);
		}
		if (c == '?' || parse_one(o, c, optarg)) {
			usage(stderr);
			return -1;
		}
	}
	if (optind < argc) {
		fprintf(stderr, "vmig-vm: unexpected argument '%s'\n", argv[optind]);
		return -1;
	}
	if (o->cfg.mem_bytes % VMIG_PAGE_SIZE || o->cfg.mem_bytes < (1u << 20)) {
		fprintf(stderr, "vmig-vm: --mem must be a multiple of 4 KiB and at least 1M\n");
		return -1;
	}
	o->cfg.incoming = o->incoming != NULL;
	return 0;
}

/* Create the --object objects, in order, as QEMU does with -object. */
static int create_objects(struct vm *vm, const struct opts *o)
{
	struct vmig__err err = {{0}};
	json_t *props;
	int ret;

	for (unsigned i = 0; i < o->nobjects; i++) {
		ret = vm_objects_parse_opt(o->objects[i], &props, &err);
		if (!ret) {
			ret = vm_objects_add(vm_objects(vm), props, &err);
			json_decref(props);
		}
		if (ret) {
			fprintf(stderr, "vmig-vm: --object %s: %s\n", o->objects[i], err.msg);
			return -1;
		}
	}
	return 0;
}

/* The signal handler must not see a freed server. */
static void free_server(void)
{
	struct qmp_server *srv = g_srv;

	g_srv = NULL;
	__atomic_signal_fence(__ATOMIC_SEQ_CST);
	if (srv)
		qmp_server_free(srv);
}

/* Without --qmp, run until a signal. */
static void wait_for_signal(void)
{
	while (!g_quit)
		pause();
}

int main(int argc, char **argv)
{
	struct opts o = {0};
	struct vmig__err err = {{0}};
	struct sigaction sa = {.sa_handler = on_signal};
	struct vm *vm = NULL;
	int ret;

	if (parse_args(argc, argv, &o)) {
		free(o.objects);
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);

	if (vm_create(&vm, &o.cfg, &err)) {
		fprintf(stderr, "vmig-vm: %s\n", err.msg);
		free(o.objects);
		return 1;
	}
	if (create_objects(vm, &o))
		goto fail;
	if (o.dirty_tracking &&
	    vmig_parameter_set(vm_session(vm), "x-vmig-dirty-tracking", o.dirty_tracking)) {
		fprintf(stderr, "vmig-vm: %s\n", vmig_session_error(vm_session(vm)));
		goto fail;
	}
	if (o.qmp && qmp_server_new(&g_srv, vm, o.qmp, &err)) {
		fprintf(stderr, "vmig-vm: %s\n", err.msg);
		goto fail;
	}
	if (o.incoming && strcmp(o.incoming, "defer") && vm_objects_have_tls_creds(vm_objects(vm)))
		fprintf(stderr,
			"vmig-vm: warning: --incoming %s listens at once, before tls-creds can "
			"be set: this migration will not use TLS (use --incoming defer, then "
			"migrate-set-parameters and migrate-incoming)\n",
			o.incoming);
	if (o.incoming && strcmp(o.incoming, "defer") &&
	    (ret = vmig_incoming(vm_session(vm), o.incoming))) {
		fprintf(stderr, "vmig-vm: --incoming %s: %s\n", o.incoming,
			vmig_session_error(vm_session(vm)));
		goto fail;
	}
	ret = g_srv ? qmp_server_run(g_srv) : (wait_for_signal(), 0);
	if (ret)
		fprintf(stderr, "vmig-vm: QMP server: %s\n", strerror(-ret));
	/* Detach the server from the VM's events first (migration threads may
	 * still report), then free it while the VM it points to is alive. */
	vm_set_event_cb(vm, NULL, NULL);
	free_server();
	vm_destroy(vm);
	free(o.objects);
	return ret ? 1 : 0;
fail:
	free_server();
	vm_destroy(vm);
	free(o.objects);
	return 1;
}
