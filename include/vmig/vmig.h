/* SPDX-License-Identifier: MIT */
/*
 * libvmig: the live-migration engine, as seen by a VMM that embeds it.
 *
 * This is the only header a VMM includes. It knows nothing about any one VMM:
 * the embedder registers its guest RAM blocks and a small ops table (stop and
 * start the vCPUs, save and load device state, optionally its own dirty log),
 * and libvmig does pre-copy, post-copy and the statistics.
 *
 * Conventions, for every function here:
 *  - Functions that can fail return 0 or a negative errno. Nothing here calls
 *    exit(), prints, or aborts on bad input. The text of the last error of a
 *    session is kept in the session and returned by vmig_session_error().
 *  - There is no global state: two sessions in one process are independent.
 *  - A session is driven from one control thread (the embedder's main loop).
 *    libvmig runs its own threads for the data path and reports back through
 *    ops->event(), which may be called from any of those threads.
 *  - Names of statuses, parameters and capabilities are QEMU's names; what
 *    QEMU lacks is prefixed "x-vmig-".
 */
#ifndef VMIG_VMIG_H
#define VMIG_VMIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct vmig_session vmig_session;

/* Migration status, as QEMU's MigrationStatus. */
enum vmig_status {
	VMIG_STATUS_NONE = 0,
	VMIG_STATUS_SETUP,
	VMIG_STATUS_CANCELLING,
	VMIG_STATUS_CANCELLED,
	VMIG_STATUS_ACTIVE,
	VMIG_STATUS_POSTCOPY_ACTIVE,
	VMIG_STATUS_POSTCOPY_PAUSED,
	VMIG_STATUS_POSTCOPY_RECOVER,
	VMIG_STATUS_COMPLETED,
	VMIG_STATUS_FAILED,
	VMIG_STATUS_DEVICE,
	VMIG_STATUS_PRE_SWITCHOVER, /* capability "pause-before-switchover" */
	VMIG_STATUS__MAX
};

/* QEMU's spelling of a status ("active", "postcopy-paused", ...). */
const char *vmig_status_name(enum vmig_status status);

/*
 * One block of guest RAM. host must stay mapped for the life of the session.
 * size must be a multiple of the page size (4096). fd is the file that backs
 * the mapping (a memfd) or -1; libvmig never closes it. With an fd, host
 * must be a shared mapping of it (MAP_SHARED): libvmig also reads and
 * writes the pages through fd (a source reads huge pages that way).
 *
 * flags: VMIG_RAM_PREALLOC says the caller has populated the whole block
 * (QEMU's prealloc=on) and wants it to stay populated. An incoming pre-copy
 * migration then writes received pages in place instead of freeing the
 * block first and installing each page anew. With postcopy-ram enabled, a
 * block with an fd stays populated too, on kernels with MINOR userfaultfd
 * faults on shmem (Linux 5.14): pages still missing at the switch are only
 * unmapped from host, and mapped back once written through a second
 * mapping of fd. A block without an fd, or on an older kernel, is freed at
 * the start of an incoming post-copy migration (as QEMU does), for holes to
 * fault on.
 */
#define VMIG_RAM_PREALLOC (1u << 0)

struct vmig_ram_block {
	const char *name;
	void *host;
	uint64_t size;
	int fd;
	uint64_t fd_offset;
	uint32_t flags; /* VMIG_RAM_* */
};

/* What ops->event() reports. */
enum vmig_event_type {
	VMIG_EVENT_STATUS = 1, /* status changed: see status */
	VMIG_EVENT_STOPPED,    /* libvmig stopped the vCPUs (switch-over) */
	VMIG_EVENT_RESUMED,    /* libvmig started the vCPUs */
};

struct vmig_event {
	enum vmig_event_type type;
	enum vmig_status status;
};

/*
 * The embedder's side. All callbacks get the opaque pointer passed to
 * vmig_session_new(). Unless noted, they are called from a libvmig thread
 * and must be thread-safe with respect to the embedder's own main loop.
 */
struct vmig_vm_ops {
	/*
	 * Stop all vCPUs and return once none of them touches guest RAM. On a
	 * post-copy destination a vCPU may be blocked on a page that has not
	 * arrived (vmig_vcpu_blocked()): it cannot run on, so it counts as
	 * stopped; it must park as soon as its page is in place.
	 */
	int (*stop)(void *opaque);
	/* Let the vCPUs run again. */
	int (*start)(void *opaque);
	/* True if the vCPUs are running (used to decide what to do after a
	 * failed or cancelled migration, and whether to start on arrival). */
	bool (*running)(void *opaque);
	/*
	 * Device and vCPU state, as one opaque blob. save_state writes at most
	 * cap bytes into buf and sets *len; it is called with the vCPUs stopped.
	 * load_state is called on the destination before the vCPUs start.
	 */
	int (*save_state)(void *opaque, void *buf, size_t cap, size_t *len);
	int (*load_state)(void *opaque, const void *buf, size_t len);
	/* Status changes and other events. May be NULL. */
	void (*event)(void *opaque, const struct vmig_event *ev);
	/*
	 * Slow the vCPUs down (capability "auto-converge"): from now on each
	 * vCPU should sleep percent% of the time (0..99; 0 = full speed), as
	 * QEMU's CPU throttle does. Called from libvmig's migration thread;
	 * 0 again when the migration ends. May be NULL: auto-converge is then
	 * refused.
	 */
	void (*throttle)(void *opaque, unsigned percent);
};

/* Create a session. ops is copied. */
int vmig_session_new(vmig_session **out, const struct vmig_vm_ops *ops, void *opaque);
/* Cancel anything running, join libvmig's threads, free everything. */
void vmig_session_free(vmig_session *s);
/*
 * Why the last call on this session from the embedder's thread failed
 * (never NULL; "" if none). Only that thread writes it, so the pointer stays
 * valid until its next call. A migration's own failure is reported in
 * vmig_query()'s error_desc.
 */
const char *vmig_session_error(const vmig_session *s);

/* Register a RAM block. Must be done before migrating; blocks are matched by
 * name and size on the destination. */
int vmig_ram_block_add(vmig_session *s, const struct vmig_ram_block *blk);

/*
 * Capabilities (booleans) and parameters (integers), by QEMU's names:
 *   capabilities: "postcopy-ram", "postcopy-blocktime", "postcopy-preempt",
 *     "multifd", "auto-converge", "x-vmig-verify-memory",
 *     "pause-before-switchover", "zero-copy-send"
 *   parameters: "max-bandwidth" (bytes/s, 0 = unlimited), "downtime-limit"
 *     (ms), "multifd-channels", "cpu-throttle-initial",
 *     "cpu-throttle-increment", "max-cpu-throttle" (percent),
 *     "throttle-trigger-threshold" (percent), "multifd-compression",
 *     "multifd-zstd-level", "multifd-zlib-level", "x-vmig-dirty-tracking" (see below) ...
 * The lists are vmig_capability_names() and vmig_parameter_names(),
 * NULL-terminated. Setting fails with -EBUSY while a migration is running
 * for the ones that cannot change then, and -ENOENT for unknown names.
 */
const char *const *vmig_capability_names(void);
const char *const *vmig_parameter_names(void);
int vmig_capability_set(vmig_session *s, const char *name, bool on);
int vmig_capability_get(const vmig_session *s, const char *name, bool *on);
int vmig_parameter_set(vmig_session *s, const char *name, int64_t value);
int vmig_parameter_get(const vmig_session *s, const char *name, int64_t *value);
/* For a parameter whose values have names (QEMU's enums, such as
 * "multifd-compression"): the names, indexed by value, NULL-terminated.
 * NULL for plain integer parameters. */
const char *const *vmig_parameter_choices(const char *name);

/* Values of "multifd-compression" (QEMU's names: "none", "zlib", "zstd");
 * "multifd-zstd-level" (0..20, default 1) applies to zstd,
 * "multifd-zlib-level" (0..9, default 1) to zlib. */
enum vmig_compression {
	VMIG_COMPRESS_NONE = 0,
	VMIG_COMPRESS_ZLIB = 1,
	VMIG_COMPRESS_ZSTD = 2,
};

/* Dirty-tracking backends, for "x-vmig-dirty-tracking". */
enum vmig_dirty_tracking {
	VMIG_DIRTY_AUTO = 0,       /* best the kernel offers */
	VMIG_DIRTY_UFFD_ASYNC = 1, /* uffd-wp async + PAGEMAP_SCAN (6.7+) */
	VMIG_DIRTY_UFFD_SYNC = 2,  /* synchronous uffd-wp, a fault thread */
};

/*
 * TLS for every connection of a migration (main, return path, urgent,
 * multifd), with QEMU's credential objects. TLS 1.3 only, AEAD ciphers.
 *
 * Credentials are loaded from a directory laid out as QEMU's are, so a set
 * made for QEMU or libvirt works unchanged:
 *   x509: ca-cert.pem, and server-cert.pem + server-key.pem (server) or
 *         client-cert.pem + client-key.pem (client; optional unless the
 *         server verifies peers); ca-crl.pem if present.
 *   psk:  keys.psk, lines "username:hexkey"; a client uses the line of its
 *         username (default "qemu").
 * Files are read and checked when the credentials are made, as QEMU's
 * object-add does (a certificate of this side or of the CA that has
 * expired or is not yet valid is refused there); a failure returns -errno
 * with the reason in err.
 *
 * The credentials are reference-counted: a session keeps a reference while
 * it may use them, so the embedder may drop its own at any time.
 */
typedef struct vmig_tls_creds vmig_tls_creds;

enum vmig_tls_endpoint {
	VMIG_TLS_ENDPOINT_CLIENT = 0, /* the source */
	VMIG_TLS_ENDPOINT_SERVER = 1, /* the destination */
};

struct vmig_tls_creds_opts {
	size_t size; /* sizeof(struct vmig_tls_creds_opts): fields may be added */
	enum vmig_tls_endpoint endpoint;
	const char *dir;
	/* x509: check the peer's certificate (QEMU's verify-peer, default on).
	 * A server then requires a client certificate signed by its CA. */
	bool verify_peer;
	/* psk, client: the line of keys.psk to use (NULL: "qemu") */
	const char *username;
};

int vmig_tls_creds_new_x509(vmig_tls_creds **out, const struct vmig_tls_creds_opts *opts, char *err,
			    size_t errlen);
int vmig_tls_creds_new_psk(vmig_tls_creds **out, const struct vmig_tls_creds_opts *opts, char *err,
			   size_t errlen);
/* Drop a reference (NULL is a no-op). */
void vmig_tls_creds_unref(vmig_tls_creds *creds);

/*
 * Use TLS for the migrations this session starts from now on (vmig_migrate,
 * vmig_incoming, vmig_recover, vmig_resume), as QEMU's parameters
 * tls-creds, tls-hostname and tls-authz:
 *  - creds: NULL turns TLS off. Its endpoint must match the side: client on
 *    the source, server on the destination (checked when the migration
 *    starts).
 *  - hostname (source, x509): the name the destination's certificate must
 *    carry. NULL: the host of a tcp: URI; a unix: URI then checks no name.
 *  - authz_identity (destination): the only peer identity let in, the
 *    client certificate's distinguished name (x509) or the username (psk),
 *    as QEMU's authz-simple. NULL: any peer with valid credentials.
 * The session takes its own reference to creds. -EBUSY while a migration
 * runs.
 */
int vmig_session_set_tls(vmig_session *s, vmig_tls_creds *creds, const char *hostname,
			 const char *authz_identity);

/*
 * Start an outgoing migration to uri ("tcp:HOST:PORT" or "unix:PATH").
 * Returns at once; progress is read with vmig_query() and reported through
 * ops->event().
 *
 * The handover rule (docs/handover.md): exactly one side runs the guest. If
 * the migration fails or is cancelled before the destination could start,
 * the source VM keeps running, unharmed. Once the record that lets the
 * destination start has gone out, the source never restarts its vCPUs by
 * itself: unless the destination reports that it failed without starting,
 * the migration fails with handover_unknown set, the vCPUs stay stopped, and
 * the embedder (an operator, an orchestrator) decides which side runs.
 */
int vmig_migrate(vmig_session *s, const char *uri);
/* Start listening for an incoming migration on uri. Returns at once. */
int vmig_incoming(vmig_session *s, const char *uri);
/*
 * Cancel an outgoing or incoming migration. Refused (-EBUSY) once post-copy
 * runs: the destination then holds the newest state of the guest. After the
 * commit point of a pre-copy migration a cancel only stops the wait for the
 * destination's answer: the outcome is unknown and the vCPUs stay stopped.
 */
int vmig_cancel(vmig_session *s);
/*
 * Capability "pause-before-switchover" (QEMU's): the source stops the vCPUs
 * when pre-copy has converged (or post-copy is requested) and waits in
 * status "pre-switchover", so an orchestrator can get the destination ready
 * (e.g. its disks), until vmig_continue(s, VMIG_STATUS_PRE_SWITCHOVER).
 * vmig_cancel() in that status restarts the vCPUs here.
 */
int vmig_continue(vmig_session *s, enum vmig_status state);
/*
 * Destination only: whether to start the vCPUs (ops->start) once an incoming
 * migration completes. Default true; an embedder started paused (QEMU's -S)
 * sets false. The vCPUs then stay stopped until the embedder starts them.
 */
int vmig_set_autostart(vmig_session *s, bool on);

/*
 * Post-copy (capability "postcopy-ram" on both sides). After vmig_migrate(),
 * vmig_start_postcopy() makes the source stop the vCPUs, send their state
 * and let the destination run at once; pages it touches before they arrive
 * are fetched on demand over a dedicated urgent channel while the rest is
 * pushed in the background. Until that switch, failure semantics are those
 * of pre-copy. After it, a broken connection pauses both sides
 * ("postcopy-paused") without losing anything: vmig_recover() on the
 * destination listens again and vmig_resume() on the source reconnects.
 * vmig_pause() breaks the connection on purpose (QEMU's migrate-pause), in
 * "postcopy-active"; in "postcopy-recover" it gives up the recovery attempt
 * in progress (a peer that never comes or never answers), back to
 * "postcopy-paused" for the next one, as QEMU 8.2 and later allow.
 */
int vmig_start_postcopy(vmig_session *s);
int vmig_pause(vmig_session *s);
int vmig_recover(vmig_session *s, const char *uri);
int vmig_resume(vmig_session *s, const char *uri);

/*
 * Destination: tell libvmig which thread runs vCPU `index`, so post-copy
 * faults are charged to it (postcopy-vcpu-blocktime). Linux thread ids.
 */
#define VMIG_MAX_VCPUS 64
int vmig_vcpu_register(vmig_session *s, unsigned index, int tid);
/* Destination, post-copy: true while vCPU `index` waits for a page that has
 * not arrived. Any thread; for the embedder's ops->stop. */
bool vmig_vcpu_blocked(vmig_session *s, unsigned index);

/*
 * QEMU's calc-dirty-rate and query-dirty-rate: how fast the guest dirties
 * its memory, measured over calc_time_ms (1 s to 60 s), outside any
 * migration (page-sampling also during one).
 *  - page-sampling: hash sample_pages random pages per GiB (128..16384,
 *    default 512) at the start and the end; the share that changed,
 *    times all of RAM, over the time. Cheap, statistical, and blind to a
 *    page rewritten with the same bytes.
 *  - dirty-bitmap: write-protect all of RAM with the dirty tracker and
 *    count the pages written (exact, per 4 KiB; 2 MiB on huge pages).
 * vmig_calc_dirty_rate returns at once; vmig_query_dirty_rate tells the
 * status and, once measured, the rate in MB/s (MiB, as QEMU).
 */
enum vmig_dirty_rate_mode {
	VMIG_DIRTY_RATE_PAGE_SAMPLING = 0,
	VMIG_DIRTY_RATE_DIRTY_BITMAP = 1,
};
enum vmig_dirty_rate_status {
	VMIG_DIRTY_RATE_UNSTARTED = 0,
	VMIG_DIRTY_RATE_MEASURING = 1,
	VMIG_DIRTY_RATE_MEASURED = 2,
};
struct vmig_dirty_rate {
	enum vmig_dirty_rate_status status;
	enum vmig_dirty_rate_mode mode;
	int64_t start_time; /* when the last measurement started, s since the epoch */
	int64_t calc_time_ms;
	uint64_t sample_pages; /* per GiB, page-sampling */
	int64_t dirty_rate;    /* MB/s, once measured */
};
int vmig_calc_dirty_rate(vmig_session *s, int64_t calc_time_ms, enum vmig_dirty_rate_mode mode,
			 uint64_t sample_pages);
int vmig_query_dirty_rate(vmig_session *s, struct vmig_dirty_rate *out);

/* Post-copy fault latency buckets: bucket i counts faults that took
 * [2^i, 2^(i+1)) microseconds (bucket 0 also takes anything faster). */
#define VMIG_LATENCY_BUCKETS 26

/* Statistics, QEMU's query-migrate fields. Byte counts are bytes. */
struct vmig_stats {
	enum vmig_status status;
	bool is_source;
	int64_t total_time_ms;     /* since start; frozen at the end */
	int64_t setup_time_ms;
	int64_t downtime_ms;       /* valid once completed */
	int64_t expected_downtime_ms;
	uint64_t downtime_us;      /* same as downtime_ms, finer */
	unsigned cpu_throttle_percentage; /* auto-converge: current vCPU throttle */
	struct {
		uint64_t transferred;      /* bytes on the wire, all channels */
		uint64_t remaining;        /* dirty bytes still to send */
		uint64_t total;            /* guest RAM size */
		uint64_t duplicate;        /* zero pages */
		uint64_t normal;           /* pages sent whole */
		uint64_t normal_bytes;
		uint64_t dirty_sync_count;
		double mbps;               /* recent throughput, Mbit/s */
		uint64_t dirty_pages_rate; /* pages/s dirtied, last round */
		uint64_t pages_per_second;
		uint64_t precopy_bytes;
		uint64_t downtime_bytes;
		uint64_t postcopy_bytes;
		uint64_t postcopy_requests;
		uint64_t page_size;
		uint64_t multifd_bytes;
		uint64_t dirty_sync_missed_zero_copy;
	} ram;
	/* Destination, post-copy (QEMU's postcopy-blocktime and, as QEMU 10.1
	 * reports them, postcopy-latency*). */
	struct {
		bool valid;                 /* capability postcopy-blocktime was on */
		uint64_t blocktime_ms;      /* time all vCPUs were blocked at once */
		unsigned nvcpus;
		uint64_t vcpu_blocktime_ms[VMIG_MAX_VCPUS];
		uint64_t faults;            /* page faults that had to wait */
		uint64_t requests;          /* of which fetched from the source */
		uint64_t latency_ns;        /* mean wait of all faults */
		uint64_t vcpu_latency_ns[VMIG_MAX_VCPUS];
		uint64_t non_vcpu_latency_ns;
		uint64_t latency_dist[VMIG_LATENCY_BUCKETS];
		uint64_t latency_p50_ns;    /* over the last 65536 faults */
		uint64_t latency_p99_ns;
	} postcopy;
	char error_desc[256];
	/*
	 * Source, failed: the final record had gone out when the connection
	 * failed, so the destination may be running. The vCPUs here stay
	 * stopped; start exactly one side.
	 */
	bool handover_unknown;
	/*
	 * Destination, failed after its vCPUs started in post-copy: some pages
	 * never arrived. The vCPUs are stopped and guest RAM stays registered
	 * with userfaultfd, so nothing ever reads a page that is missing; the
	 * source holds the only complete copy. Never start this side.
	 */
	bool ram_incomplete;
	/* Destination: connections to the incoming port dropped before their
	 * preamble was valid (strays, other versions, other sessions), and the
	 * reason the last one was dropped. The migration goes on waiting. */
	uint64_t rejected_connections;
	char last_rejection[128];
};

int vmig_query(vmig_session *s, struct vmig_stats *out);

#ifdef __cplusplus
}
#endif
#endif /* VMIG_VMIG_H */
