/* dnsblast: a UDP DNS load generator that is not the bottleneck.
 *
 * dnsperf spends about 7 us of client CPU per query here, more than the in-kernel fast path
 * spends answering it, so a benchmark driven by dnsperf measures dnsperf.  dnsblast sends
 * and receives with sendmmsg(2)/recvmmsg(2), 64 queries per system call, from queries
 * encoded once at start, and keeps its books in flat arrays.
 *
 * It takes the dnsperf options the benchmarks use (-s -p -d -l -n -c -T -q -t -Q -v) and
 * prints dnsperf 2.x's "Statistics:" block and, with -v, its per-query lines, so the
 * benchmarks parse either tool's output the same way.  Built by tests/bench/blast.py with
 * the system's C compiler; a test tool, not part of the product.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH	 64
#define MAX_MSG	 512
#define MAX_RESP 4096
#define IDS	 65536

struct query {
	uint8_t wire[MAX_MSG];
	uint16_t len;
	char text[340]; /* "name TYPE" for -v */
};

struct slot {
	uint64_t sent_ns;
	uint32_t query;
	uint8_t busy;
};

struct sock {
	int fd;
	uint16_t next_id;
	uint32_t outstanding;
	struct slot *slots;
};

struct stats {
	uint64_t sent, completed, lost, req_bytes, resp_bytes;
	uint64_t rcodes[16];
	double lat_sum, lat_sq, lat_min, lat_max;
	double *lats; /* -v */
	uint32_t *lat_query;
	uint8_t *lat_rcode;
	uint64_t nlat, cap;
};

static struct query *queries;
static uint32_t nqueries;
static struct sockaddr_storage server;
static socklen_t server_len;
static double duration = 0, timeout_s = 5;
static long runs = 0;
static int clients = 1, threads = 1, outstanding = 100, verbose = 0, offer = 0;
static double rate = 0;

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

static int type_code(const char *t)
{
	static const struct {
		const char *name;
		int code;
	} types[] = {{"A", 1},	    {"NS", 2},	   {"CNAME", 5}, {"SOA", 6},
		     {"PTR", 12},   {"MX", 15},	   {"TXT", 16},	 {"AAAA", 28},
		     {"SRV", 33},   {"NAPTR", 35}, {"DS", 43},	 {"DNSKEY", 48},
		     {"HTTPS", 65}, {"ANY", 255}};

	for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++)
		if (!strcasecmp(t, types[i].name))
			return types[i].code;
	if (!strncasecmp(t, "TYPE", 4))
		return atoi(t + 4);
	return -1;
}

static int encode(struct query *q, const char *name, int type)
{
	uint8_t *p = q->wire;
	const char *label = name;

	memset(p, 0, 12);
	p[2] = 0x01; /* RD */
	p[5] = 1;    /* QDCOUNT */
	p += 12;
	while (*label) {
		const char *dot = strchr(label, '.');
		size_t n = dot ? (size_t)(dot - label) : strlen(label);

		if (n == 0 || n > 63 || p + n + 6 > q->wire + MAX_MSG)
			return -1;
		*p++ = (uint8_t)n;
		memcpy(p, label, n);
		p += n;
		if (!dot)
			break;
		label = dot + 1;
	}
	*p++ = 0;
	*p++ = type >> 8;
	*p++ = type & 0xff;
	*p++ = 0;
	*p++ = 1; /* IN */
	q->len = p - q->wire;
	return 0;
}

static void load_queries(const char *path)
{
	FILE *f = fopen(path, "r");
	char line[512], name[300], type[32];
	uint32_t cap = 1024;

	if (!f) {
		fprintf(stderr, "dnsblast: cannot open %s: %s\n", path, strerror(errno));
		exit(1);
	}
	queries = malloc(cap * sizeof(*queries));
	while (fgets(line, sizeof(line), f)) {
		int code;

		if (line[0] == '#' || sscanf(line, "%299s %31s", name, type) != 2)
			continue;
		code = type_code(type);
		if (code < 0) {
			fprintf(stderr, "dnsblast: unknown type %s\n", type);
			exit(1);
		}
		if (nqueries == cap)
			queries = realloc(queries, (cap *= 2) * sizeof(*queries));
		if (encode(&queries[nqueries], name, code) < 0) {
			fprintf(stderr, "dnsblast: bad name %s\n", name);
			exit(1);
		}
		snprintf(queries[nqueries].text, sizeof(queries[nqueries].text), "%s %s", name,
			 type);
		nqueries++;
	}
	fclose(f);
	if (!nqueries) {
		fprintf(stderr, "dnsblast: no queries in %s\n", path);
		exit(1);
	}
}

struct worker {
	pthread_t tid;
	int nsocks;
	struct sock *socks;
	struct stats st;
	uint32_t cursor; /* next query index */
	long passes;
	uint64_t start_ns, stop_ns;
	double rate;
};

static void record(struct worker *w, struct sock *s, const uint8_t *msg, int len, uint64_t t)
{
	uint16_t id;
	struct slot *sl;
	double lat;
	int rc;

	if (len < 12)
		return;
	id = (msg[0] << 8) | msg[1];
	sl = &s->slots[id];
	if (!sl->busy)
		return; /* late (already counted lost) or not ours */
	sl->busy = 0;
	s->outstanding--;
	rc = msg[3] & 0xf;
	lat = (t - sl->sent_ns) / 1e9;
	w->st.completed++;
	w->st.resp_bytes += len;
	w->st.rcodes[rc]++;
	w->st.lat_sum += lat;
	w->st.lat_sq += lat * lat;
	if (lat < w->st.lat_min)
		w->st.lat_min = lat;
	if (lat > w->st.lat_max)
		w->st.lat_max = lat;
	if (verbose) {
		if (w->st.nlat == w->st.cap) {
			w->st.cap = w->st.cap ? w->st.cap * 2 : 65536;
			w->st.lats = realloc(w->st.lats, w->st.cap * sizeof(double));
			w->st.lat_query = realloc(w->st.lat_query, w->st.cap * sizeof(uint32_t));
			w->st.lat_rcode = realloc(w->st.lat_rcode, w->st.cap);
		}
		w->st.lats[w->st.nlat] = lat;
		w->st.lat_query[w->st.nlat] = sl->query;
		w->st.lat_rcode[w->st.nlat++] = rc;
	}
}

/* Count as lost what waited longer than the timeout: a scan of the socket's ids, a few
 * times a second (a queue in send order would stall behind one lost query). */
static void expire(struct worker *w, struct sock *s, uint64_t t)
{
	uint64_t limit = (uint64_t)(timeout_s * 1e9);

	if (!s->outstanding)
		return;
	for (uint32_t id = 0; id < IDS; id++) {
		struct slot *sl = &s->slots[id];

		if (sl->busy && t - sl->sent_ns >= limit) {
			sl->busy = 0;
			s->outstanding--;
			w->st.lost++;
		}
	}
}

static void *run(void *arg)
{
	struct worker *w = arg;
	struct mmsghdr out[BATCH], in[BATCH];
	struct iovec oiov[BATCH], iiov[BATCH];
	static __thread uint8_t obuf[BATCH][MAX_MSG], ibuf[BATCH][MAX_RESP];
	uint64_t t, last_expire = 0;
	int per_sock = outstanding / w->nsocks > 0 ? outstanding / w->nsocks : 1;
	int sending = 1;

	for (int i = 0; i < BATCH; i++) {
		oiov[i].iov_base = obuf[i];
		iiov[i].iov_base = ibuf[i];
		iiov[i].iov_len = MAX_RESP;
		memset(&out[i], 0, sizeof(out[i]));
		memset(&in[i], 0, sizeof(in[i]));
		out[i].msg_hdr.msg_iov = &oiov[i];
		out[i].msg_hdr.msg_iovlen = 1;
		in[i].msg_hdr.msg_iov = &iiov[i];
		in[i].msg_hdr.msg_iovlen = 1;
	}
	w->st.lat_min = 1e9;
	w->start_ns = now_ns();
	while (offer) {
		/* -O: only send, as fast as the sockets take it; replies are not read (they are
		 * dropped when the socket's buffer is full).  What the client can offer. */
		t = now_ns();
		if (t - w->start_ns >= (uint64_t)(duration * 1e9))
			break;
		for (int k = 0; k < w->nsocks; k++) {
			struct sock *s = &w->socks[k];
			int sent;

			for (int n = 0; n < BATCH; n++) {
				struct query *q = &queries[w->cursor];

				memcpy(obuf[n], q->wire, q->len);
				obuf[n][0] = s->next_id >> 8;
				obuf[n][1] = s->next_id++ & 0xff;
				oiov[n].iov_len = q->len;
				if (++w->cursor == nqueries)
					w->cursor = 0;
			}
			sent = sendmmsg(s->fd, out, BATCH, MSG_DONTWAIT);
			if (sent > 0)
				w->st.sent += sent;
		}
	}
	for (; !offer;) {
		int progress = 0, busy = 0;

		t = now_ns();
		if (sending && duration > 0 && t - w->start_ns >= (uint64_t)(duration * 1e9))
			sending = 0;
		for (int k = 0; k < w->nsocks; k++) {
			struct sock *s = &w->socks[k];
			int want = sending ? per_sock - (int)s->outstanding : 0, n = 0, sent;

			if (want > BATCH)
				want = BATCH;
			if (want > 0 && w->rate > 0) {
				double allowed = w->rate * (t - w->start_ns) / 1e9 - w->st.sent;

				if (want > allowed)
					want = allowed > 0 ? (int)allowed : 0;
			}
			for (; n < want && sending; n++) {
				struct query *q = &queries[w->cursor];

				while (s->slots[s->next_id].busy)
					s->next_id++;
				memcpy(obuf[n], q->wire, q->len);
				obuf[n][0] = s->next_id >> 8;
				obuf[n][1] = s->next_id & 0xff;
				oiov[n].iov_len = q->len;
				s->slots[s->next_id].query = w->cursor;
				s->next_id++;
				if (++w->cursor == nqueries) {
					w->cursor = 0;
					if (runs && ++w->passes >= runs)
						sending = 0;
				}
			}
			if (n > 0) {
				/* Timed from before the call: an answer made in the kernel (the fast
				 * path) is made during it. */
				t = now_ns();
				sent = sendmmsg(s->fd, out, n, MSG_DONTWAIT);
				if (sent < 0)
					sent = 0;
				for (int i = 0; i < sent; i++) {
					uint16_t id = (obuf[i][0] << 8) | obuf[i][1];

					s->slots[id].busy = 1;
					s->slots[id].sent_ns = t;
					w->st.req_bytes += oiov[i].iov_len;
				}
				/* unsent ones give their ids back: never marked busy */
				s->outstanding += sent;
				w->st.sent += sent;
				progress |= sent > 0;
			}
			n = recvmmsg(s->fd, in, BATCH, MSG_DONTWAIT, NULL);
			if (n > 0) {
				t = now_ns();
				for (int i = 0; i < n; i++)
					record(w, s, ibuf[i], in[i].msg_len, t);
				progress = 1;
			}
			busy |= s->outstanding > 0;
		}
		if (t - last_expire > 100000000ULL) {
			for (int k = 0; k < w->nsocks; k++)
				expire(w, &w->socks[k], t);
			last_expire = t;
		}
		if (!sending && !busy)
			break;
		if (!progress) {
			/* Nothing to send or read: wait for a reply, or until the next query is due
			 * at a fixed rate.  Never a sleep that a reply cannot cut short (it would
			 * add to every latency), never a spin (it would take the CPU the server
			 * needs when they share it). */
			struct pollfd pf[64];
			struct timespec ts = {0, 1000000}; /* 1 ms: timeouts, the end of the run */
			int np = w->nsocks < 64 ? w->nsocks : 64;

			for (int k = 0; k < np; k++) {
				pf[k].fd = w->socks[k].fd;
				pf[k].events = POLLIN;
			}
			if (w->rate > 0 && sending) {
				uint64_t due = w->start_ns + (uint64_t)((w->st.sent + 1) * 1e9 / w->rate);

				t = now_ns();
				ts.tv_nsec = due > t ? (long)(due - t < 1000000 ? due - t : 1000000) : 0;
			}
			ppoll(pf, np, &ts, NULL);
		}
	}
	w->stop_ns = now_ns();
	return NULL;
}

static void usage(void)
{
	fprintf(stderr, "usage: dnsblast -s server [-p port] -d file [-l secs | -n runs] [-c sockets] "
			"[-T threads] [-q outstanding] [-t timeout] [-Q rate] [-v] [-O]\n"
			"  -O: offer only (send as fast as possible, read nothing)\n");
	exit(2);
}

int main(int argc, char **argv)
{
	const char *host = NULL, *file = NULL;
	int port = 53, opt;
	struct worker *ws;
	struct stats tot = {.lat_min = 1e9};
	uint64_t start, stop;
	static const char *names[16] = {"NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP",
					"REFUSED", "YXDOMAIN", "YXRRSET", "NXRRSET",  "NOTAUTH",
					"NOTZONE"};

	while ((opt = getopt(argc, argv, "s:p:d:l:n:c:T:q:t:Q:vO")) != -1) {
		switch (opt) {
		case 's': host = optarg; break;
		case 'p': port = atoi(optarg); break;
		case 'd': file = optarg; break;
		case 'l': duration = atof(optarg); break;
		case 'n': runs = atol(optarg); break;
		case 'c': clients = atoi(optarg); break;
		case 'T': threads = atoi(optarg); break;
		case 'q': outstanding = atoi(optarg); break;
		case 't': timeout_s = atof(optarg); break;
		case 'Q': rate = atof(optarg); break;
		case 'v': verbose = 1; break;
		case 'O': offer = 1; break;
		default: usage();
		}
	}
	if (!host || !file || (duration <= 0 && runs <= 0) || clients < 1 || threads < 1 ||
	    (offer && duration <= 0))
		usage();
	if (clients < threads)
		clients = threads;
	memset(&server, 0, sizeof(server));
	if (inet_pton(AF_INET, host, &((struct sockaddr_in *)&server)->sin_addr) == 1) {
		((struct sockaddr_in *)&server)->sin_family = AF_INET;
		((struct sockaddr_in *)&server)->sin_port = htons(port);
		server_len = sizeof(struct sockaddr_in);
	} else if (inet_pton(AF_INET6, host, &((struct sockaddr_in6 *)&server)->sin6_addr) == 1) {
		((struct sockaddr_in6 *)&server)->sin6_family = AF_INET6;
		((struct sockaddr_in6 *)&server)->sin6_port = htons(port);
		server_len = sizeof(struct sockaddr_in6);
	} else {
		fprintf(stderr, "dnsblast: -s needs an IP address\n");
		return 2;
	}
	load_queries(file);
	ws = calloc(threads, sizeof(*ws));
	for (int i = 0; i < threads; i++) {
		struct worker *w = &ws[i];

		w->nsocks = clients / threads + (i < clients % threads);
		w->socks = calloc(w->nsocks, sizeof(struct sock));
		w->cursor = (uint32_t)((uint64_t)nqueries * i / threads);
		w->rate = rate / threads;
		for (int k = 0; k < w->nsocks; k++) {
			struct sock *s = &w->socks[k];
			int buf = 4 << 20;

			s->fd = socket(server.ss_family, SOCK_DGRAM, 0);
			if (s->fd < 0 || connect(s->fd, (struct sockaddr *)&server, server_len) < 0) {
				fprintf(stderr, "dnsblast: socket: %s\n", strerror(errno));
				return 1;
			}
			setsockopt(s->fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof(buf));
			setsockopt(s->fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof(buf));
			s->slots = calloc(IDS, sizeof(struct slot));
			s->next_id = (uint16_t)(rand() & 0xffff);
		}
	}
	start = now_ns();
	for (int i = 0; i < threads; i++)
		pthread_create(&ws[i].tid, NULL, run, &ws[i]);
	for (int i = 0; i < threads; i++)
		pthread_join(ws[i].tid, NULL);
	stop = now_ns();
	for (int i = 0; i < threads; i++) {
		struct stats *st = &ws[i].st;

		for (int k = 0; k < ws[i].nsocks; k++) {
			struct sock *s = &ws[i].socks[k];

			st->lost += s->outstanding; /* never answered */
		}
		tot.sent += st->sent;
		tot.completed += st->completed;
		tot.lost += st->lost;
		tot.req_bytes += st->req_bytes;
		tot.resp_bytes += st->resp_bytes;
		tot.lat_sum += st->lat_sum;
		tot.lat_sq += st->lat_sq;
		if (st->lat_min < tot.lat_min)
			tot.lat_min = st->lat_min;
		if (st->lat_max > tot.lat_max)
			tot.lat_max = st->lat_max;
		for (int r = 0; r < 16; r++)
			tot.rcodes[r] += st->rcodes[r];
		if (verbose)
			for (uint64_t j = 0; j < st->nlat; j++)
				printf("> %s %s %.6f\n", names[st->lat_rcode[j]] ? names[st->lat_rcode[j]] : "OTHER",
				       queries[st->lat_query[j]].text, st->lats[j]);
	}
	{
		double secs = (stop - start) / 1e9;
		double n = tot.completed ? (double)tot.completed : 1;
		double avg = tot.lat_sum / n;
		double var = tot.lat_sq / n - avg * avg;
		int first = 1;

		printf("Statistics:\n\n");
		printf("  Queries sent:         %lu\n", (unsigned long)tot.sent);
		printf("  Queries completed:    %lu (%.2f%%)\n", (unsigned long)tot.completed,
		       tot.sent ? 100.0 * tot.completed / tot.sent : 0);
		printf("  Queries lost:         %lu (%.2f%%)\n\n", (unsigned long)tot.lost,
		       tot.sent ? 100.0 * tot.lost / tot.sent : 0);
		printf("  Response codes:       ");
		for (int r = 0; r < 16; r++) {
			if (!tot.rcodes[r])
				continue;
			printf("%s%s %lu (%.2f%%)", first ? "" : ", ", names[r] ? names[r] : "OTHER",
			       (unsigned long)tot.rcodes[r], 100.0 * tot.rcodes[r] / n);
			first = 0;
		}
		printf("\n  Average packet size:  request %lu, response %lu\n",
		       (unsigned long)(tot.sent ? tot.req_bytes / tot.sent : 0),
		       (unsigned long)(tot.completed ? tot.resp_bytes / tot.completed : 0));
		printf("  Run time (s):         %.6f\n", secs);
		printf("  Queries per second:   %.6f\n", tot.completed / secs);
		printf("  Queries sent per second: %.6f\n\n", tot.sent / secs);
		printf("  Average Latency (s):  %.6f (min %.6f, max %.6f)\n", avg,
		       tot.completed ? tot.lat_min : 0, tot.lat_max);
		printf("  Latency StdDev (s):   %.6f\n", var > 0 ? sqrt(var) : 0);
	}
	return 0;
}
