/* dns-interceptor: steer pod DNS to the node-local resolver by address rewrite, in tc.
 *
 * dnsi_from_pod (host veth ingress = packets the pod sends):
 *   With ENABLE_FASTPATH, a plain UDP query for a name in FP_ANSWERS is answered right here
 *   and sent back out of the veth to the pod (bpf/lib/fastpath.h).  Otherwise:
 *   UDP/TCP to port 53 of a captured server, from the veth's own pod, while the resolver is
 *   alive: record the flow (pod addr, pod port, proto) -> original server in FLOWS, rewrite the
 *   destination to the resolver address.  The node's stack then delivers it locally.
 * dnsi_to_pod (host veth egress = packets to the pod):
 *   UDP/TCP from resolver:53 to a pod flow: rewrite the source back to the server the pod
 *   asked, so the pod's stub resolver accepts the reply.
 *
 * Everything else passes untouched with TC_ACT_UNSPEC, so filters after ours (the CNI's) still
 * run; a packet we rewrote ends classification with TC_ACT_OK.  Helpers return 0 or
 * -REASON_* (lib/metrics.h); only the two entry programs count a reason and choose a verdict.
 * Fail-open: a stale heartbeat or a missing resolver socket means "pass to the original
 * server".
 *
 * Minimum kernel: 5.8 (bpf_sk_lookup_* from tc, 4.20; bounded loops, 5.3; CAP_BPF, 5.8), and
 * 5.11 without CAP_SYS_RESOURCE (BPF memory charged to the cgroup, not RLIMIT_MEMLOCK).
 * docs/kernel.md lists every feature and the version it needs.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#include "lib/maps.h"
#include "lib/metrics.h"
#include "lib/csum.h"

#define DNS_PORT 53

/* Plain tables: the agent pins them itself (interceptor/datapath/loader.py), carrying the
 * previous agent's pinned state over into them.  bcc's own pinning would reopen existing pins
 * by map id, which needs CAP_SYS_ADMIN; the DaemonSet grants only BPF, PERFMON, NET_ADMIN and
 * NET_BIND_SERVICE. */
BPF_TABLE("array", __u32, struct config, CONFIG, 1);
BPF_TABLE("hash", struct capture_key, __u32, CAPTURE, MAX_CAPTURE);
BPF_TABLE("hash", struct pod_key, struct pod_info, PODS, MAX_PODS);
BPF_TABLE("hash", __u32, struct iface_info, IFACES, MAX_PODS);
BPF_TABLE("lru_hash", struct flow_key, struct flow_val, FLOWS, MAX_FLOWS);
BPF_TABLE("percpu_array", __u32, __u64, REASONS, REASON_MAX);
BPF_TABLE("percpu_array", __u32, struct pod_stats, POD_STATS, MAX_PODS);
/* TCP connections each pod holds to the resolver (by pod_id): counted at the SYN, released
 * at the first FIN or RST either way; the agent corrects drift from its own count. */
BPF_TABLE("array", __u32, __u32, TCP_CONNS, MAX_PODS);

/* What the parser found; addresses in network order. */
struct pkt {
	struct ip_addr saddr;
	struct ip_addr daddr;
	__u32 family;
	__u32 l4_off;
	__u16 sport;
	__u16 dport;
	__u8 proto;
	__u8 syn_only; /* TCP SYN without ACK: a new connection */
	__u8 closing;  /* TCP FIN or RST: the connection ends */
};

static __always_inline int __addr_eq(const struct ip_addr *x, const struct ip_addr *y)
{
	/* Not __builtin_memcmp: clang may turn it into a libcall BPF cannot make. */
	return ((x->a[0] ^ y->a[0]) | (x->a[1] ^ y->a[1]) | (x->a[2] ^ y->a[2]) |
		(x->a[3] ^ y->a[3])) == 0;
}

static __always_inline void __count(__u32 reason)
{
	__u64 *v = REASONS.lookup(&reason);

	if (v)
		*v += 1;
}

static __always_inline struct pod_stats *__pod_stats(struct pod_info *pod)
{
	__u32 id;

	if (!pod)
		return NULL;
	id = pod->pod_id;
	return POD_STATS.lookup(&id);
}

#define NOT_OURS 1 /* __parse: not UDP/TCP over IP (or a fragment); passed, not counted */

/* Parse Ethernet / IPv4 or IPv6 / UDP or TCP.  Returns 0 with *p filled; NOT_OURS for other
 * traffic; -REASON_MALFORMED when a header the packet announces is cut short. */
static __always_inline int __parse(struct __sk_buff *skb, struct pkt *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u32 off = ETH_HLEN;

	if ((void *)(eth + 1) > data_end)
		return -REASON_MALFORMED;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = data + ETH_HLEN;

		if ((void *)(ip + 1) > data_end)
			return -REASON_MALFORMED;
		if (ip->ihl < 5)
			return -REASON_MALFORMED;
		if (ip->frag_off & bpf_htons(0x3fff))
			return NOT_OURS; /* options are fine, fragments are not ours to rewrite */
		p->family = FAMILY_V4;
		p->saddr.a[0] = ip->saddr;
		p->daddr.a[0] = ip->daddr;
		p->proto = ip->protocol;
		off += ip->ihl * 4;
#ifdef ENABLE_IPV6
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = data + ETH_HLEN;

		if ((void *)(ip6 + 1) > data_end)
			return -REASON_MALFORMED;
		p->family = FAMILY_V6;
		__builtin_memcpy(&p->saddr, &ip6->saddr, 16);
		__builtin_memcpy(&p->daddr, &ip6->daddr, 16);
		p->proto = ip6->nexthdr; /* extension headers: not DNS we handle */
		off += sizeof(*ip6);
#endif /* ENABLE_IPV6 */
	} else {
		return NOT_OURS;
	}
	p->l4_off = off;
	if (p->proto == IPPROTO_UDP) {
		struct udphdr *udp = data + off;

		if ((void *)(udp + 1) > data_end)
			return -REASON_MALFORMED;
		p->sport = udp->source;
		p->dport = udp->dest;
		return 0;
	}
#ifdef ENABLE_TCP
	if (p->proto == IPPROTO_TCP) {
		struct tcphdr *tcp = data + off;

		if ((void *)(tcp + 1) > data_end)
			return -REASON_MALFORMED;
		p->sport = tcp->source;
		p->dport = tcp->dest;
		p->syn_only = tcp->syn && !tcp->ack;
		p->closing = tcp->fin || tcp->rst;
		return 0;
	}
#endif /* ENABLE_TCP */
	return NOT_OURS;
}

static __always_inline __u32 __l4_csum_off(struct pkt *p)
{
	return p->l4_off + (p->proto == IPPROTO_UDP ? offsetof(struct udphdr, check)
						    : offsetof(struct tcphdr, check));
}

/* Is a resolver socket there to take this packet?  Looking it up makes fail-open instant
 * when the agent dies (its sockets close with it), rather than after the heartbeat timeout. */
static __always_inline int __resolver_listening(struct __sk_buff *skb, struct pkt *p,
						struct config *cfg)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	__u32 size;

	if (!(cfg->flags & CFG_SK_LOOKUP))
		return 1;
	if (p->family == FAMILY_V4) {
		t.ipv4.saddr = p->saddr.a[0];
		t.ipv4.daddr = cfg->resolver4.a[0];
		t.ipv4.sport = p->sport;
		t.ipv4.dport = bpf_htons(DNS_PORT);
		size = sizeof(t.ipv4);
	} else {
		__builtin_memcpy(t.ipv6.saddr, &p->saddr, 16);
		__builtin_memcpy(t.ipv6.daddr, &cfg->resolver6, 16);
		t.ipv6.sport = p->sport;
		t.ipv6.dport = bpf_htons(DNS_PORT);
		size = sizeof(t.ipv6);
	}
	if (p->proto == IPPROTO_UDP)
		sk = bpf_sk_lookup_udp(skb, &t, size, BPF_F_CURRENT_NETNS, 0);
	else
		sk = bpf_sk_lookup_tcp(skb, &t, size, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 0;
	bpf_sk_release(sk);
	return 1;
}

/* May the fast path answer from FP_ANSWERS?  While an agent is alive (fresh heartbeat and a
 * resolver socket), or during a handover grace after a graceful stop (see dnsi_from_pod). */
static __always_inline int __answers_vouched(struct __sk_buff *skb, struct pkt *p,
					     struct config *cfg, __u64 now)
{
	if (now < cfg->grace_until_ns)
		return 1;
	return now - cfg->heartbeat_ns <= cfg->heartbeat_timeout &&
	       __resolver_listening(skb, p, cfg);
}

/* Take one token from a bucket refilled at ``rate`` per second up to ``burst``: 0, or -1
 * when it is empty.  A rate of 0 means no limit.
 *
 * The read-modify-write is not atomic: two CPUs taking a token from the same pod at the same
 * instant may both see the same balance, so a pod can get a few tokens more than its budget
 * under contention.  Accepted: a bucket bounds a flood, it does not meter exactly, and a spin
 * lock per pod on every packet would cost every pod. */
static __always_inline int __bucket_take(__u64 *ts, __u64 *tokens, __u32 rate, __u32 burst,
					 __u64 now)
{
	__u64 cap, have;

	if (!rate)
		return 0;
	cap = (__u64)burst * 1000000000ULL;
	have = *tokens + (now - *ts) * rate;
	if (have > cap)
		have = cap;
	*ts = now;
	if (have < 1000000000ULL) {
		*tokens = have;
		return -1;
	}
	*tokens = have - 1000000000ULL;
	return 0;
}

/* New flows per pod: a flooding pod's excess goes to its own server untouched instead of
 * evicting other pods' flows from the LRU.  0 or -REASON_RATE_LIMITED. */
static __always_inline int __take_token(struct pod_info *pod, struct config *cfg, __u64 now)
{
	if (__bucket_take(&pod->tokens_ts, &pod->tokens, cfg->flow_rate, cfg->flow_burst, now))
		return -REASON_RATE_LIMITED;
	return 0;
}

/* Queries a pod sends the resolver (each UDP query, each TCP connection): one pod cannot take
 * the resolver from the others.  0 or -REASON_QUERY_LIMITED (the query is dropped). */
static __always_inline int __query_budget(struct pod_info *pod, struct config *cfg, __u64 now)
{
	if (__bucket_take(&pod->queries.ts, &pod->queries.tokens, cfg->query_rate, cfg->query_burst,
			  now))
		return -REASON_QUERY_LIMITED;
	return 0;
}

/* A SYN: may the pod open one more TCP connection to the resolver?  Counted once per
 * connection (a retransmitted SYN finds its flow already counted).  0, with the flow marked,
 * or -REASON_TCP_LIMITED (the SYN is dropped; the client's connect times out or retries). */
static __always_inline int __tcp_admit(struct flow_val *fv, struct config *cfg)
{
	__u32 id = fv->pod_id;
	__u32 *n;

	if (fv->flags & FLOW_TCP_COUNTED)
		return 0;
	n = TCP_CONNS.lookup(&id);
	if (!n)
		return 0;
	if (cfg->tcp_conns && *n >= cfg->tcp_conns)
		return -REASON_TCP_LIMITED;
	__sync_fetch_and_add(n, 1);
	fv->flags |= FLOW_TCP_COUNTED;
	return 0;
}

/* A FIN or RST, from either side: the connection no longer counts (once). */
static __always_inline void __tcp_release(struct flow_val *fv)
{
	__u32 id = fv->pod_id;
	__u32 *n;

	if (!(fv->flags & FLOW_TCP_COUNTED))
		return;
	fv->flags &= ~FLOW_TCP_COUNTED;
	n = TCP_CONNS.lookup(&id);
	if (n && *n)
		__sync_fetch_and_add(n, -1);
}

/* A query to the resolver's own address.  Its flow, if any, must say so: a flow an earlier
 * socket left on the same port for a captured server would have the replies "restored" to
 * that server's address, and the pod would drop them.  A SYN records the connection (for
 * its count, and so that the replies are left alone).  0 or -REASON_*. */
static __always_inline int __direct_flow(struct pkt *p, struct config *cfg, struct pod_info *pod,
					 struct flow_key *fk, __u32 ifindex, __u64 now)
{
	struct flow_val fv = {};
	struct flow_val *have;
	int ret;

	have = FLOWS.lookup(fk);
	if (have && !(have->flags & FLOW_DIRECT)) {
		__tcp_release(have);
		FLOWS.delete(fk);
		have = NULL;
	}
	if (!p->syn_only) {
		if (have && p->closing)
			__tcp_release(have);
		return 0;
	}
	if (have)
		return __tcp_admit(have, cfg);
	fv.orig = p->daddr;
	fv.orig_port = p->dport;
	fv.flags = FLOW_DIRECT;
	fv.ifindex = ifindex;
	fv.pod_id = pod->pod_id;
	fv.created_ns = now;
	ret = __tcp_admit(&fv, cfg);
	if (ret < 0)
		return ret;
	/* No room to remember it: do not count what could never be released. */
	if (FLOWS.update(fk, &fv) < 0)
		__tcp_release(&fv);
	return 0;
}

/* Replace the destination (dst) or source address; 0 or -REASON_CSUM_ERROR. */
static __always_inline int __rewrite(struct __sk_buff *skb, struct pkt *p, int dst,
				     struct ip_addr *from, struct ip_addr *to)
{
	int ret;

	if (p->family == FAMILY_V4)
		ret = __rewrite_v4(skb, dst ? IP_DST_OFF : IP_SRC_OFF, __l4_csum_off(p), p->proto,
				   from->a[0], to->a[0]);
	else
#ifdef ENABLE_IPV6
		ret =
		    __rewrite_v6(skb, dst ? IP6_DST_OFF : IP6_SRC_OFF, __l4_csum_off(p), from, to);
#else
		ret = -1;
#endif /* ENABLE_IPV6 */
	return ret < 0 ? -REASON_CSUM_ERROR : 0;
}

/* The pod behind this packet: the destination must be captured (or the resolver itself,
 * ``direct``) and the source must be the veth's own pod (anti-spoofing).  0 with *pod set,
 * or -REASON_* . */
static __always_inline int __sending_pod(struct pkt *p, struct config *cfg, __u32 ifindex,
					 int direct, struct pod_info **pod)
{
	struct capture_key ck = {};
	struct pod_key pk = {};

	ck.addr = p->daddr;
	ck.family = p->family;
	if (!direct && !(cfg->flags & CFG_CAPTURE_ALL) && !CAPTURE.lookup(&ck))
		return -REASON_NOT_CAPTURED;
	pk.ifindex = ifindex;
	pk.family = p->family;
	pk.addr = p->saddr;
	*pod = PODS.lookup(&pk);
	if (!*pod)
		return IFACES.lookup(&ifindex) ? -REASON_SPOOFED : -REASON_UNKNOWN_POD;
	return 0;
}

/* May this query open a flow to the resolver?  A resolver socket must be there and the pod
 * within its budget; then the flow is recorded.  0 or -REASON_* (the query then goes to the
 * server the pod asked, untouched). */
static __always_inline int __open_flow(struct __sk_buff *skb, struct pkt *p, struct config *cfg,
				       struct pod_info *pod, struct flow_key *fk, __u64 now)
{
	struct flow_val fv = {};
	int ret;

	if (!__resolver_listening(skb, p, cfg))
		return -REASON_NO_SOCKET;
	ret = __take_token(pod, cfg, now);
	if (ret < 0)
		return ret;
	fv.orig = p->daddr;
	fv.orig_port = p->dport;
	fv.ifindex = skb->ifindex;
	fv.pod_id = pod->pod_id;
	fv.created_ns = now;
	if (p->syn_only) {
		ret = __tcp_admit(&fv, cfg);
		if (ret < 0)
			return ret;
	}
	if (FLOWS.update(fk, &fv) < 0) {
		__tcp_release(&fv);
		return -REASON_NO_FLOW;
	}
	return 0;
}

#ifdef ENABLE_FASTPATH
#include "lib/fastpath.h"

/* Declared here, not in the header: bcc rewrites map operations in the main file only. */
BPF_F_TABLE("hash", struct fp_key, struct fp_answer, FP_ANSWERS, FP_MAX_ENTRIES, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct fp_name, __u8, FP_OWNERS, FP_MAX_ENTRIES, BPF_F_NO_PREALLOC);
BPF_ARRAY(FP_JUNK, struct fp_junk, 1);
BPF_F_TABLE("hash", struct fp_ckey, struct fp_cached, FP_CACHE, FP_CACHED_ENTRIES,
	    BPF_F_NO_PREALLOC);
BPF_TABLE("percpu_array", __u32, __u64, FP_STATS, FP_RESULT_MAX);
BPF_ARRAY(FP_SCRATCH, struct fp_scratch, 1);

static __always_inline void __fp_count(__u32 result)
{
	__u64 *v = FP_STATS.lookup(&result);

	if (v)
		*v += 1;
}

/* TC_ACT_REDIRECT when answered in the kernel; a negative fp_result otherwise, -FP_LIMITED
 * for a hit over the pod's budget of kernel answers (config answer_rate). */
/* Whether the name's last ``len`` bytes are ``suffix`` (lowercased wire form).  Compared 8
 * bytes at a time, unrolled: a byte loop at an unknown offset is more than the verifier
 * will follow. */
static __always_inline int __fp_ends_with(struct fp_scratch *s, __u8 *suffix, __u32 len)
{
	__u32 start = s->end + 1 - len, j;

#pragma unroll
	for (j = 0; j < FP_NAME_MAX / 8; j++) {
		__u64 off = start + j * 8, a, b, left = len - j * 8;

		if (j * 8 >= len)
			break;
		__mask_len(off, 127);
		a = *(__u64 *)&s->key.name[off]; /* may read past name[]: still in the scratch */
		b = *(__u64 *)&suffix[j * 8];
		if (left < 8) { /* the last word: only its first ``left`` bytes */
			a &= (1ULL << (left * 8)) - 1;
			b &= (1ULL << (left * 8)) - 1;
		}
		if (a != b)
			return 0;
	}
	return 1;
}

/* Whether a label of the name starts at ``target``: the length octets walked from the
 * first.  ``at`` goes through memory each turn, so the verifier follows one state per turn,
 * not one per value. */
static __always_inline int __fp_label_at(struct fp_scratch *s, __u32 target)
{
	__u32 at = 0, j;

	for (j = 0; j < FP_NAME_MAX / 2; j++) { /* a label takes at least two bytes */
		__u64 k;

		at = __forget_path(&s->label, at);
		if (at >= target)
			break;
		k = at;
		__mask_len(k, 127);
		at += s->key.name[k] + 1;
	}
	return at == target;
}

/* The NXDOMAIN for an A or AAAA question below the cluster zone, not below pod.<zone>, whose
 * name does not exist (in neither FP_ANSWERS nor FP_OWNERS), or NULL: the resolver answers
 * (another type, another zone, pod records, a name that exists, or junk answering off).
 * A suffix counts only on a label boundary: "a\007cluster.local" ends in the same bytes as
 * a name below cluster.local without being one.  (A label starting at the zone's suffix
 * also means the name ends on the root label, where the suffix does.) */
static __always_inline struct fp_answer *__fp_junk(struct fp_scratch *s)
{
	struct fp_junk *junk;
	__u32 zero = 0, len, pod_len;

	if (s->key.qtype != bpf_htons(1) && s->key.qtype != bpf_htons(28))
		return NULL; /* A and AAAA only, as FP_ANSWERS */
	junk = FP_JUNK.lookup(&zero);
	if (!junk)
		return NULL;
	len = junk->suffix_len;
	if (!len || len > FP_NAME_MAX || len > s->end + 1)
		return NULL;
	if (!__fp_ends_with(s, junk->suffix, len) || !__fp_label_at(s, s->end + 1 - len))
		return NULL;
	pod_len = junk->pod_suffix_len;
	if (pod_len && pod_len <= FP_NAME_MAX && pod_len <= s->end + 1 &&
	    __fp_ends_with(s, junk->pod_suffix, pod_len) && __fp_label_at(s, s->end + 1 - pod_len))
		return NULL; /* a pod record's name: synthesized by the resolver */
	if (FP_OWNERS.lookup((struct fp_name *)s->key.name))
		return NULL;
	return &junk->nxdomain;
}

/* The cached reply for the question in s->key, asked of p->daddr with q's EDNS and CD, while
 * the kernel may still give it (before its last tenth); else NULL. */
static __always_inline struct fp_cached *
__fp_cached(struct pkt *p, struct config *cfg, struct fp_scratch *s, struct fp_query *q, __u64 now)
{
	struct fp_ckey *ck = (struct fp_ckey *)&s->key;
	struct fp_cached *c;

	ck->flags = (q->edns ? FP_CK_EDNS : 0) | (q->hdr[3] & 0x10 ? FP_CK_CD : 0);
	if (cfg->flags & CFG_CACHED_BY_SERVER) {
		ck->family = p->family;
		ck->server = p->daddr;
	} else {
		ck->family = 0;
		__builtin_memset(&ck->server, 0, sizeof(ck->server));
	}
	c = FP_CACHE.lookup(ck);
	ck->flags = 0; /* s->key is an fp_key again */
	ck->family = 0;
	if (!c || now >= c->due_ns)
		return NULL;
	return c;
}

static __always_inline int __fastpath(struct __sk_buff *skb, struct pkt *p, struct config *cfg,
				      struct pod_info *pod, __u64 now)
{
	struct fp_query q = {};
	struct fp_scratch *s;
	struct fp_answer *ans;
	struct fp_cached *cached = NULL;
	__u32 zero = 0, kind = FP_HIT;
	int ret;

	s = FP_SCRATCH.lookup(&zero);
	if (!s)
		return -FP_FALLTHROUGH;
	ret = __fp_question(skb, p, s, &q);
	if (ret < 0)
		return ret;
	ans = FP_ANSWERS.lookup(&s->key);
	if (!ans && pod->view) {
		/* A mesh host answered by namespace: the entry of the pod's, if it sees one. */
		s->key.view = (__u16)pod->view;
		ans = FP_ANSWERS.lookup(&s->key);
		s->key.view = 0;
	}
	if (!ans) {
		ans = __fp_junk(s);
		kind = FP_NXDOMAIN;
	}
	if (!ans) {
		cached = __fp_cached(p, cfg, s, &q, now);
		if (!cached)
			return -FP_MISS;
		ans = &cached->ans;
		kind = FP_CACHED;
	}
	if (__bucket_take(&pod->answers.ts, &pod->answers.tokens, cfg->answer_rate,
			  cfg->answer_burst, now))
		return -FP_LIMITED;
	ret = __fp_answer(skb, p, cfg, s, &q, ans, cached, now);
	if (kind != FP_HIT && ret >= 0)
		__fp_count(kind);
	return ret;
}
#endif /* ENABLE_FASTPATH */

int dnsi_from_pod(struct __sk_buff *skb)
{
	struct pkt p = {};
	struct flow_key fk = {};
	struct flow_val *have;
	struct pod_info *pod = NULL;
	struct pod_stats *ps;
	struct config *cfg;
	struct ip_addr *resolver;
	__u32 zero = 0, ifindex = skb->ifindex;
	__u64 now;
	int ret, direct;

	ret = __parse(skb, &p);
	if (ret < 0)
		__count(-ret);
	if (ret || p.dport != bpf_htons(DNS_PORT))
		return TC_ACT_UNSPEC;
	cfg = CONFIG.lookup(&zero);
	if (!cfg)
		return TC_ACT_UNSPEC;
	resolver = p.family == FAMILY_V4 ? &cfg->resolver4 : &cfg->resolver6;
	if (!(resolver->a[0] | resolver->a[1] | resolver->a[2] | resolver->a[3]))
		return TC_ACT_UNSPEC; /* no resolver address for this family */
	/* A pod may also ask the resolver's own address (a NodeLocal-style client): delivered as
	 * addressed, with the same anti-spoofing and budgets as a captured query. */
	direct = __addr_eq(&p.daddr, resolver);
	ret = __sending_pod(&p, cfg, ifindex, direct, &pod);
	if (ret < 0) {
		__count(-ret);
		/* A forged source would get the resolver's answer: not ours to deliver. */
		return direct && ret == -REASON_SPOOFED ? TC_ACT_SHOT : TC_ACT_UNSPEC;
	}
	if (!pod)
		return TC_ACT_UNSPEC; /* cannot happen; the verifier wants to see it */
	ps = __pod_stats(pod);
	if (ps)
		ps->queries += 1;

	now = bpf_ktime_get_ns();
	fk.pod = p.saddr;
	fk.pod_port = p.sport;
	fk.proto = p.proto;
	fk.family = p.family;
	if (direct) {
		if (p.proto == IPPROTO_UDP || p.syn_only) {
			ret = __query_budget(pod, cfg, now);
			if (ret < 0) {
				__count(-ret);
				goto limited;
			}
		}
		ret = __direct_flow(&p, cfg, pod, &fk, ifindex, now);
		if (ret < 0) {
			__count(-ret);
			goto limited;
		}
		__count(REASON_DIRECT);
		if (ps)
			ps->direct += 1;
		return TC_ACT_UNSPEC;
	}
#ifdef ENABLE_FASTPATH
	/* Answers only while the agent is alive: its heartbeat and its resolver socket vouch
	 * for the answer map, so a killed agent fails open at once here too.  The exception is
	 * a handover: an agent that stopped gracefully for its successor (a DaemonSet rollout)
	 * vouches for the map until grace_until_ns, so names only we know (mesh hosts) keep
	 * resolving while no agent runs; everything else fails open as usual. */
	if (p.proto == IPPROTO_UDP && __answers_vouched(skb, &p, cfg, now)) {
		ret = __fastpath(skb, &p, cfg, pod, now);
		if (ret >= 0) {
			__fp_count(FP_HIT);
			if (ps)
				ps->answered += 1;
			return ret;
		}
		if (ret == -FP_DROP) {
			__count(REASON_CSUM_ERROR);
			return TC_ACT_SHOT;
		}
		if (ret == -FP_LIMITED) {
			__count(REASON_ANSWER_LIMITED);
			goto limited;
		}
		__fp_count(-ret);
	}
#endif /* ENABLE_FASTPATH */
	if (p.proto == IPPROTO_TCP && !p.syn_only) {
		/* A segment of a connection: follow the decision taken at its SYN. */
		have = FLOWS.lookup(&fk);
		if (!have || !__addr_eq(&have->orig, &p.daddr)) {
			__count(REASON_NO_FLOW);
			return TC_ACT_UNSPEC;
		}
		if (p.closing)
			__tcp_release(have);
		goto rewrite;
	}
	if (now - cfg->heartbeat_ns > cfg->heartbeat_timeout) {
		__count(REASON_STALE_HEARTBEAT);
		goto pass;
	}
	ret = __query_budget(pod, cfg, now);
	if (ret < 0) {
		__count(-ret);
		goto limited;
	}
	/* A socket that keeps asking the same server (the common case for long-lived clients)
	 * already has its flow: its LRU position is refreshed by the lookup, and the flow token
	 * and the map update are only paid for new flows.  The socket check is not: without it
	 * a long-lived socket's queries would go to a killed resolver until the heartbeat
	 * times out (a second of a busy pod's queries lost), not to its own server at once. */
	have = FLOWS.lookup(&fk);
	if (have && __addr_eq(&have->orig, &p.daddr) && have->ifindex == ifindex) {
		if (!__resolver_listening(skb, &p, cfg)) {
			__count(REASON_NO_SOCKET);
			goto pass;
		}
		if (p.syn_only) { /* the same port again: a new connection */
			ret = __tcp_admit(have, cfg);
			if (ret < 0) {
				__count(-ret);
				goto limited;
			}
		}
		goto rewrite;
	}
	ret = __open_flow(skb, &p, cfg, pod, &fk, now);
	if (ret == -REASON_TCP_LIMITED) {
		__count(-ret);
		goto limited;
	}
	if (ret < 0) {
		__count(-ret);
		goto pass;
	}
rewrite:
	ret = __rewrite(skb, &p, 1, &p.daddr, resolver);
	if (ret < 0) {
		__count(-ret);
		return TC_ACT_SHOT;
	}
	__count(REASON_REDIRECTED);
	if (ps)
		ps->redirected += 1;
	return TC_ACT_OK;
pass:
	if (p.syn_only) {
		/* A connection that is not steered must not meet the flow an earlier connection
		 * left on the same port (one reset by a killed resolver leaves no TIME_WAIT, so
		 * the port comes back at once): its next segments would follow that flow to the
		 * resolver and be reset. */
		have = FLOWS.lookup(&fk);
		if (have) {
			__tcp_release(have);
			FLOWS.delete(&fk);
		}
	}
	if (ps)
		ps->passed += 1;
	return TC_ACT_UNSPEC;
limited:
	if (ps)
		ps->limited += 1;
	return TC_ACT_SHOT;
}

int dnsi_to_pod(struct __sk_buff *skb)
{
	struct pkt p = {};
	struct flow_key fk = {};
	struct flow_val *fv;
	struct config *cfg;
	struct ip_addr *resolver;
	__u32 zero = 0;

	int ret;

	ret = __parse(skb, &p);
	if (ret || p.sport != bpf_htons(DNS_PORT))
		return TC_ACT_UNSPEC; /* malformed replies are the pod's stack's business */
	cfg = CONFIG.lookup(&zero);
	if (!cfg)
		return TC_ACT_UNSPEC;
	resolver = p.family == FAMILY_V4 ? &cfg->resolver4 : &cfg->resolver6;
	if (!__addr_eq(&p.saddr, resolver))
		return TC_ACT_UNSPEC; /* not from our resolver */
	fk.pod = p.daddr;
	fk.pod_port = p.dport;
	fk.proto = p.proto;
	fk.family = p.family;
	fv = FLOWS.lookup(&fk);
	if (!fv) {
		__count(REASON_NO_FLOW);
		return TC_ACT_UNSPEC;
	}
	if (p.closing)
		__tcp_release(fv);
	if (fv->flags & FLOW_DIRECT)
		return TC_ACT_UNSPEC; /* the pod asked the resolver itself: already its address */
	struct ip_addr orig = fv->orig;

	ret = __rewrite(skb, &p, 0, resolver, &orig);
	if (ret < 0) {
		__count(-ret);
		return TC_ACT_SHOT;
	}
	__count(REASON_REPLY_RESTORED);
	__u32 pod_id = fv->pod_id;
	struct pod_stats *ps = POD_STATS.lookup(&pod_id);

	if (ps)
		ps->replies += 1;
	return TC_ACT_OK;
}
