// SPDX-License-Identifier: MIT
/*
 * tcp_raw: the ceiling for a one-channel migration on this machine. It sends
 * BYTES over one loopback TCP connection from a memory buffer to a reader
 * that discards into a fixed buffer, and reports Gbit/s and the CPU seconds
 * of each side. It also reports memcpy bandwidth, for context: a migration
 * that copies each page once more than needed pays roughly bytes/memcpy_rate.
 *
 * When --file is given the sender transmits that file's contents through a
 * read-only shared mapping (populated and read once before the clock starts), so the
 * source reads as much distinct memory as a migration of the same guest;
 * otherwise it sends one 64 MiB buffer over and over (cache-friendlier, a
 * slightly optimistic bound).
 *
 * With --hugetlb the file is first copied into 2 MiB huge pages (a hugetlb
 * memfd; the pages must be reserved in /proc/sys/vm/nr_hugepages), so the
 * stream is sent from the same kind of memory as a guest on huge pages.
 *
 * Output is one "key=value" per line on stdout, for bench/migrate to parse.
 * Sender and receiver are two threads of this process. By default the socket
 * never leaves 127.0.0.1. The two-host model of bench/migrate gives
 * --src-netns and --dst-netns (names from `ip netns`, namespaces the
 * benchmark made), --addr (the destination's address on the veth between
 * them) and --src-cpu/--dst-cpu: the receiver then listens in the
 * destination's namespace, the sender connects from the source's, and each
 * thread runs on its own CPU, as the two migration processes do.
 */
#define _GNU_SOURCE /* accept4, RUSAGE_THREAD */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <linux/memfd.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define RECV_BUF_BYTES (4u << 20)
#define ANON_BUF_BYTES (64u << 20)
#define MEMCPY_BUF_BYTES (512u << 20)
#define MEMCPY_ROUNDS 5

struct side {
	int fd;
	int cpu; /* pinned to this CPU, or -1 */
	const uint8_t *src; /* sender only */
	uint64_t src_len;   /* sender: bytes in src */
	uint64_t bytes;     /* bytes to send / bytes received */
	size_t chunk_bytes;
	double cpu_s; /* user + system CPU of this thread */
	int err;      /* 0 or -errno */
};

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double thread_cpu_s(void)
{
	struct rusage ru;

	if (getrusage(RUSAGE_THREAD, &ru) < 0)
		return 0;
	return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
	       (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

static int pin_self(int cpu)
{
	cpu_set_t set;

	if (cpu < 0)
		return 0;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	return -pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

/* Receiver thread: reads until EOF into one recycled buffer. */
static void *receiver_main(void *arg)
{
	struct side *rx = arg;
	int pinned = pin_self(rx->cpu);
	double cpu0 = thread_cpu_s();
	uint8_t *buf = malloc(RECV_BUF_BYTES);

	if (pinned < 0) {
		free(buf);
		rx->err = pinned;
		return NULL;
	}

	if (!buf) {
		rx->err = -ENOMEM;
		return NULL;
	}
	for (;;) {
		ssize_t n = recv(rx->fd, buf, RECV_BUF_BYTES, 0);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			rx->err = -errno;
			break;
		}
		if (n == 0)
			break;
		rx->bytes += (uint64_t)n;
	}
	free(buf);
	rx->cpu_s = thread_cpu_s() - cpu0;
	return NULL;
}

/* Sender: walks src in chunk_bytes pieces, wrapping around, until bytes sent. */
static void sender_run(struct side *tx)
{
	double cpu0 = thread_cpu_s();
	uint64_t sent = 0, pos = 0;

	while (sent < tx->bytes) {
		uint64_t want = tx->bytes - sent;
		size_t len = tx->chunk_bytes;
		ssize_t n;

		if (want < len)
			len = (size_t)want;
		if (tx->src_len - pos < len)
			len = (size_t)(tx->src_len - pos);
		n = send(tx->fd, tx->src + pos, len, MSG_NOSIGNAL);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			tx->err = -errno;
			break;
		}
		sent += (uint64_t)n;
		pos += (uint64_t)n;
		if (pos == tx->src_len)
			pos = 0;
	}
	shutdown(tx->fd, SHUT_WR);
	tx->cpu_s = thread_cpu_s() - cpu0;
}

/* Where the two ends live: loopback in this namespace, or a two-host model. */
struct placement {
	const char *src_netns, *dst_netns; /* NULL: this process's namespace */
	struct in_addr addr;		   /* the receiver's address */
};

/* Moves the calling thread into the named network namespace (NULL: stay). */
static int enter_netns(const char *name)
{
	char path[256];
	int fd, ret = 0;

	if (!name)
		return 0;
	if (strchr(name, '/'))
		snprintf(path, sizeof(path), "%s", name);
	else
		snprintf(path, sizeof(path), "/var/run/netns/%s", name);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	if (setns(fd, CLONE_NEWNET) < 0)
		ret = -errno;
	close(fd);
	return ret;
}

static int listen_on(const struct placement *pl, int *port_out)
{
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = 0, .sin_addr = pl->addr};
	socklen_t len = sizeof(sa);
	int fd, ret = enter_netns(pl->dst_netns);

	if (ret < 0)
		return ret;
	fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 1) < 0 ||
	    getsockname(fd, (struct sockaddr *)&sa, &len) < 0) {
		ret = -errno;
		close(fd);
		return ret;
	}
	*port_out = ntohs(sa.sin_port);
	return fd;
}

static int connect_to(const struct placement *pl, int port)
{
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
				 .sin_addr = pl->addr};
	int fd, ret = enter_netns(pl->src_netns);

	if (ret < 0)
		return ret;
	fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		ret = -errno;
		close(fd);
		return ret;
	}
	return fd;
}

/* One timed transfer of tx->bytes; prints the results. Returns 0 or -errno. */
static int run_tcp(struct side *tx, const struct placement *pl, int rx_cpu)
{
	struct side rx = {.fd = -1, .cpu = rx_cpu};
	pthread_t thr;
	int lfd, port = 0, ret;
	double t0, t1;

	lfd = listen_on(pl, &port);
	if (lfd < 0)
		return lfd;
	tx->fd = connect_to(pl, port);
	if (tx->fd < 0) {
		ret = tx->fd;
		goto err_listen;
	}
	rx.fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
	if (rx.fd < 0) {
		ret = -errno;
		goto err_tx;
	}
	ret = pin_self(tx->cpu);
	if (ret < 0)
		goto err_rx;
	t0 = now_s();
	ret = -pthread_create(&thr, NULL, receiver_main, &rx);
	if (ret < 0)
		goto err_rx;
	sender_run(tx);
	pthread_join(thr, NULL);
	t1 = now_s();
	ret = tx->err ? tx->err : rx.err;
	if (ret == 0 && rx.bytes != tx->bytes)
		ret = -EPIPE;
	if (ret == 0) {
		printf("tcp_bytes=%" PRIu64 "\n", rx.bytes);
		printf("tcp_seconds=%.6f\n", t1 - t0);
		printf("tcp_gbps=%.3f\n", (double)rx.bytes * 8 / (t1 - t0) / 1e9);
		printf("tcp_sender_cpu_s=%.3f\n", tx->cpu_s);
		printf("tcp_receiver_cpu_s=%.3f\n", rx.cpu_s);
	}
err_rx:
	close(rx.fd);
err_tx:
	close(tx->fd);
err_listen:
	close(lfd);
	return ret;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

/* Median of MEMCPY_ROUNDS copies of a prefaulted 512 MiB buffer, in GB/s. */
static int run_memcpy(void)
{
	double rates[MEMCPY_ROUNDS];
	uint8_t *a, *b;

	a = malloc(MEMCPY_BUF_BYTES);
	b = malloc(MEMCPY_BUF_BYTES);
	if (!a || !b) {
		free(a);
		free(b);
		return -ENOMEM;
	}
	memset(a, 0x5a, MEMCPY_BUF_BYTES);
	memset(b, 0xa5, MEMCPY_BUF_BYTES);
	for (int i = 0; i < MEMCPY_ROUNDS; i++) {
		double t0 = now_s();

		memcpy(i % 2 ? a : b, i % 2 ? b : a, MEMCPY_BUF_BYTES);
		rates[i] = MEMCPY_BUF_BYTES / (now_s() - t0) / 1e9;
	}
	/* Keep the copies observable so the compiler cannot drop them. */
	printf("memcpy_check=%u\n", (unsigned)(a[12345] ^ b[54321]));
	qsort(rates, MEMCPY_ROUNDS, sizeof(rates[0]), cmp_double);
	printf("memcpy_gbytes_per_s=%.3f\n", rates[MEMCPY_ROUNDS / 2]);
	free(a);
	free(b);
	return 0;
}

/*
 * Reads every cache line of the mapping once before the clock starts. The
 * VMs under test copied the same file into guest RAM before migrating, so
 * their source memory was fully touched; right after the file came back
 * from disk, the first pass over it here ran at a third of the speed of
 * later ones, which would understate the ceiling.
 */
static void read_through(const uint8_t *p, uint64_t len)
{
	volatile uint64_t sink;
	uint64_t acc = 0;

	for (uint64_t off = 0; off + 8 <= len; off += 64)
		acc += *(const uint64_t *)(p + off);
	sink = acc;
	(void)sink;
}

/* Copies the len bytes at p into a hugetlb memfd mapping, which replaces it. */
static int to_huge_pages(struct side *tx)
{
	uint64_t len = (tx->src_len + (2u << 20) - 1) & ~((uint64_t)(2u << 20) - 1);
	int fd = memfd_create("tcp_raw", MFD_CLOEXEC | MFD_HUGETLB | MFD_HUGE_2MB);
	void *p;

	if (fd < 0)
		return -errno;
	if (ftruncate(fd, (off_t)len) < 0) {
		int ret = -errno;

		close(fd);
		return ret;
	}
	p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
	close(fd);
	if (p == MAP_FAILED)
		return -errno; /* ENOMEM: not enough huge pages reserved */
	memcpy(p, tx->src, tx->src_len);
	munmap((void *)tx->src, tx->src_len);
	tx->src = p;
	return 0;
}

/* Maps PATH read-only and populated, or allocates a filled anonymous buffer. */
static int map_source(const char *path, struct side *tx)
{
	struct stat st;
	void *p;
	int fd;

	if (!path) {
		uint8_t *buf = malloc(ANON_BUF_BYTES);

		if (!buf)
			return -ENOMEM;
		for (size_t i = 0; i < ANON_BUF_BYTES; i++)
			buf[i] = (uint8_t)(i * 2654435761u >> 13);
		tx->src = buf;
		tx->src_len = ANON_BUF_BYTES;
		return 0;
	}
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	if (fstat(fd, &st) < 0 || st.st_size <= 0) {
		close(fd);
		return -EINVAL;
	}
	p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, 0);
	close(fd);
	if (p == MAP_FAILED)
		return -errno;
	tx->src = p;
	tx->src_len = (uint64_t)st.st_size;
	read_through(tx->src, tx->src_len);
	return 0;
}

static void usage(const char *argv0)
{
	fprintf(stderr,
		"usage: %s [--bytes N] [--file PATH [--hugetlb]] [--chunk N] [--no-memcpy]\n"
		"          [--src-netns NS --dst-netns NS --addr IPV4] [--src-cpu N] [--dst-cpu N]\n"
		"  sends N bytes (default: size of PATH, else 4 GiB) over one TCP stream,\n"
		"  on loopback unless given two namespaces and the receiver's address\n",
		argv0);
}

int main(int argc, char **argv)
{
	/* 256 KiB per send, as vmig's writer: in this testbed 1 MiB sends were
	 * slower (median 12.5 against 16.2 Gbit/s over 4 runs each), the pages
	 * and the socket buffers they are copied to no longer fitting the
	 * core's L2 cache together. */
	struct side tx = {.fd = -1, .cpu = -1, .chunk_bytes = 256u << 10};
	struct placement pl = {.addr = {htonl(INADDR_LOOPBACK)}};
	const char *path = NULL;
	int do_memcpy = 1, hugetlb = 0, rx_cpu = -1, ret;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--bytes") && i + 1 < argc) {
			tx.bytes = strtoull(argv[++i], NULL, 0);
		} else if (!strcmp(argv[i], "--file") && i + 1 < argc) {
			path = argv[++i];
		} else if (!strcmp(argv[i], "--chunk") && i + 1 < argc) {
			tx.chunk_bytes = (size_t)strtoull(argv[++i], NULL, 0);
		} else if (!strcmp(argv[i], "--no-memcpy")) {
			do_memcpy = 0;
		} else if (!strcmp(argv[i], "--hugetlb")) {
			hugetlb = 1;
		} else if (!strcmp(argv[i], "--src-netns") && i + 1 < argc) {
			pl.src_netns = argv[++i];
		} else if (!strcmp(argv[i], "--dst-netns") && i + 1 < argc) {
			pl.dst_netns = argv[++i];
		} else if (!strcmp(argv[i], "--addr") && i + 1 < argc) {
			if (inet_pton(AF_INET, argv[++i], &pl.addr) != 1) {
				usage(argv[0]);
				return 2;
			}
		} else if (!strcmp(argv[i], "--src-cpu") && i + 1 < argc) {
			tx.cpu = atoi(argv[++i]);
		} else if (!strcmp(argv[i], "--dst-cpu") && i + 1 < argc) {
			rx_cpu = atoi(argv[++i]);
		} else {
			usage(argv[0]);
			return 2;
		}
	}
	if (tx.chunk_bytes == 0 || (hugetlb && !path) || !pl.src_netns != !pl.dst_netns) {
		usage(argv[0]);
		return 2;
	}
	ret = map_source(path, &tx);
	if (ret < 0) {
		fprintf(stderr, "tcp_raw: source %s: %s\n", path ? path : "buffer", strerror(-ret));
		return 1;
	}
	if (hugetlb) {
		ret = to_huge_pages(&tx);
		if (ret < 0) {
			fprintf(stderr, "tcp_raw: copy into huge pages: %s\n", strerror(-ret));
			return 1;
		}
		read_through(tx.src, tx.src_len);
	}
	if (tx.bytes == 0)
		tx.bytes = path ? tx.src_len : 4ull << 30;
	ret = run_tcp(&tx, &pl, rx_cpu);
	if (ret < 0) {
		fprintf(stderr, "tcp_raw: transfer failed: %s\n", strerror(-ret));
		return 1;
	}
	if (do_memcpy && run_memcpy() < 0) {
		fprintf(stderr, "tcp_raw: memcpy: out of memory\n");
		return 1;
	}
	fflush(stdout);
	return 0;
}
