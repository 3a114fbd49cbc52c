/* The in-kernel fast path: answer a plain UDP query for a name in FP_ANSWERS right here on
 * the pod's veth, and send the response straight back to the pod, without waking the
 * resolver.  It mirrors interceptor/dns/message.py fast_response() byte for byte: the same
 * acceptance rules, the same header bits, the question copied as sent (so the client's case
 * survives), the same precomputed body, the same OPT record.  Anything it does not handle
 * exactly is left untouched for the resolver, which then answers it the careful way.
 *
 * Included by bpf/redirect.c under ENABLE_FASTPATH: the fast path is a stage of the ingress
 * program, not a second tc filter, so one parse serves both and the CNI's filter order is
 * not ours to manage twice.
 */
#ifndef __INTERCEPTOR_FASTPATH_H
#define __INTERCEPTOR_FASTPATH_H

#define DNS_HDR_LEN 12
#define OPT_RR_LEN  11	/* root name, TYPE, CLASS (payload size), TTL, RDLENGTH */
#define FP_MSG_MAX  512 /* largest response built here (the answers are much smaller) */

/* Per-CPU scratch: the lookup key and the response bytes for the UDP checksum.  Both are too
 * big for the 512-byte BPF stack. */
struct fp_scratch {
	struct fp_key key;
	struct ip_addr server;	  /* right after key: together they are FP_CACHE's fp_ckey */
	__u8 msg[FP_MSG_MAX + 4]; /* +4: zero padding to a multiple of 4 for bpf_csum_diff */
	__u32 end;		  /* see __fp_question() */
	__u32 label;		  /* see __fp_label_at() */
};

_Static_assert(__builtin_offsetof(struct fp_scratch, server) ==
		   __builtin_offsetof(struct fp_ckey, server),
	       "fp_scratch must begin with an fp_ckey");

/* What __fp_question() found, for __fp_answer(). */
struct fp_query {
	__u8 hdr[DNS_HDR_LEN];
	__u32 dns_off;
	__u32 dns_len;
	__u32 qend; /* offset just past QTYPE/QCLASS, from the start of the DNS message */
	__u32 edns; /* the query has an OPT record */
	struct udphdr udp;
};

struct pseudo_v4 {
	__be32 saddr;
	__be32 daddr;
	__u8 zero;
	__u8 proto;
	__be16 len;
	struct udphdr udp;
};

struct pseudo_v6 {
	struct ip_addr saddr;
	struct ip_addr daddr;
	__be32 len;
	__u8 zero[3];
	__u8 nexthdr;
	struct udphdr udp;
};

static __always_inline __u16 __csum_fold(__s64 sum)
{
	__u64 s = (__u64)sum & 0xffffffffULL;

	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* Verifier aids.  Each keeps the verifier's view of a value small; none changes the value. */

/* A round trip through memory: the verifier forgets which branch produced the value (it now
 * comes from memory it cannot predict), so it checks what follows once instead of once per
 * path that led here.  volatile: the compiler must not fold the store and the load away. */
static __always_inline __u32 __forget_path(__u32 *slot, __u32 value)
{
	*(volatile __u32 *)slot = value;
	return *(volatile __u32 *)slot;
}

/* Mask a length in BPF assembly (mask = 2^n - 1): clang may otherwise hand a helper a 64-bit
 * copy of the value whose bound the verifier has not seen checked. */
#define __mask_len(len, mask) asm volatile("%0 &= " #mask : "+r"(len))

/* Check that the packet is a plain one-question UDP query and build its lookup key in
 * s->key.  Returns 0, or -FP_FALLTHROUGH with the packet untouched. */
static __always_inline int __fp_question(struct __sk_buff *skb, struct pkt *p, struct fp_scratch *s,
					 struct fp_query *q)
{
	__u8 *hdr = q->hdr;
	__u16 tc[2];
	__u32 dns_off, dns_len, n, end, i;

	dns_off = p->l4_off + sizeof(struct udphdr);
	if (bpf_skb_load_bytes(skb, p->l4_off, &q->udp, sizeof(q->udp)) < 0)
		return -FP_FALLTHROUGH;
	dns_len = bpf_ntohs(q->udp.len) - sizeof(q->udp);
	/* Exactly one DNS message and nothing after it; a name needs >= 1 byte + QTYPE/QCLASS. */
	if (bpf_ntohs(q->udp.len) < sizeof(q->udp) + DNS_HDR_LEN + 5 ||
	    skb->len != dns_off + dns_len)
		return -FP_FALLTHROUGH;
	if (p->family == FAMILY_V4) {
		__u8 vihl;

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &vihl, 1) < 0 || (vihl & 0x0f) != 5)
			return -FP_FALLTHROUGH; /* IP options: not worth rebuilding here */
	}
	if (bpf_skb_load_bytes(skb, dns_off, hdr, DNS_HDR_LEN) < 0)
		return -FP_FALLTHROUGH;
	/* QR=0 and OPCODE=QUERY; QDCOUNT=1, ANCOUNT=NSCOUNT=0, ARCOUNT 0 or 1 (an OPT). */
	if ((hdr[2] & 0xf8) || hdr[4] || hdr[5] != 1 || hdr[6] || hdr[7] || hdr[8] || hdr[9] ||
	    hdr[10] || hdr[11] > 1)
		return -FP_FALLTHROUGH;
	q->edns = hdr[11];
	n = dns_len - DNS_HDR_LEN;
	if (n > FP_NAME_MAX)
		n = FP_NAME_MAX;
	if (n < 1)
		return -FP_FALLTHROUGH;
	if (bpf_skb_load_bytes(skb, dns_off + DNS_HDR_LEN, s->msg, n) < 0)
		return -FP_FALLTHROUGH;
	/* The first zero byte ends the QNAME.  As in fast_response(), a key hit then proves the
	 * bytes before it are one of our names: their labels hold no zero byte, and length
	 * octets (<= 63) are never in 'A'..'Z', so lowercasing cannot alter them. */
	end = FP_NAME_MAX;
	for (i = 0; i < FP_NAME_MAX; i++) {
		if (i >= n)
			break;
		if (s->msg[i] == 0) {
			end = i;
			break;
		}
	}
	/* One of 128 exits of the loop above: forgotten, or the rest of the program is checked
	 * once per name length (about 200k instructions processed otherwise). */
	end = __forget_path(&s->end, end);
	if (end >= FP_NAME_MAX)
		return -FP_FALLTHROUGH; /* longer than any key */
	__builtin_memset(&s->key, 0, sizeof(s->key));
	if (bpf_skb_load_bytes(skb, dns_off + DNS_HDR_LEN, s->key.name, end + 1) < 0)
		return -FP_FALLTHROUGH;
#pragma unroll
	for (i = 0; i < FP_NAME_MAX; i++) {
		__u8 c = s->key.name[i];

		if ((__u8)(c - 'A') < 26)
			s->key.name[i] = c + ('a' - 'A');
	}
	q->qend = DNS_HDR_LEN + end + 1 + 4;
	if (bpf_skb_load_bytes(skb, dns_off + q->qend - 4, tc, sizeof(tc)) < 0)
		return -FP_FALLTHROUGH;
	if (tc[1] != bpf_htons(1))
		return -FP_FALLTHROUGH; /* class IN only */
	s->key.qtype = tc[0];
	q->dns_off = dns_off;
	q->dns_len = dns_len;
	return 0;
}

/* The largest response the client takes: its EDNS payload size (512 to our --max-udp), or
 * 512 without EDNS (RFC 1035 4.2.1).  0, or -FP_FALLTHROUGH for an OPT record we would not
 * answer exactly as the resolver does (DO set, a version, trailing bytes). */
static __always_inline int __fp_size_limit(struct __sk_buff *skb, struct config *cfg,
					   struct fp_query *q, __u32 *limit)
{
	__u8 opt[OPT_RR_LEN];

	if (!q->edns) {
		if (q->qend != q->dns_len)
			return -FP_FALLTHROUGH;
		*limit = 512;
		return 0;
	}
	/* OPT: root owner, TYPE 41, payload size, ext-rcode, version 0, flags, RDLENGTH; its
	 * options are not echoed (the resolver ignores them too). */
	if (bpf_skb_load_bytes(skb, q->dns_off + q->qend, opt, OPT_RR_LEN) < 0)
		return -FP_FALLTHROUGH;
	if (opt[0] || opt[1] || opt[2] != 41 || opt[6])
		return -FP_FALLTHROUGH;
	if (opt[7] & 0x80)
		return -FP_FALLTHROUGH; /* DO: leave DNSSEC-aware clients to the resolver */
	if (q->qend + OPT_RR_LEN + ((opt[9] << 8) | opt[10]) != q->dns_len)
		return -FP_FALLTHROUGH;
	*limit = (opt[3] << 8) | opt[4];
	if (*limit < 512)
		*limit = 512;
	if (*limit > cfg->max_udp)
		*limit = cfg->max_udp;
	return 0;
}

/* Write the DNS response over the query: its header (flags and counts from ``ans``, RD and
 * CD copied), the question as the client sent it (left in place), the body, our OPT.  A
 * cached reply (``verbatim``) keeps its header bits and brings its own OPT in its body. */
static __always_inline int __fp_write_dns(struct __sk_buff *skb, struct config *cfg,
					  struct fp_query *q, struct fp_answer *ans, __u32 body_len,
					  __u32 resp_len, int verbatim)
{
	__u8 *hdr = q->hdr;
	__u8 opt[OPT_RR_LEN];
	int own_opt = q->edns && !verbatim;
	__u16 ar = bpf_htons(bpf_ntohs(ans->ar) + (own_opt ? 1 : 0));

	if (verbatim) { /* a cached reply: its header bits as the upstream set them */
		hdr[2] = ans->flag_hi;
		hdr[3] = ans->flag_lo;
	} else {
		hdr[2] = ans->flag_hi | (hdr[2] & 0x01); /* RD copied (RFC 1035 4.1.1) */
		hdr[3] = ans->flag_lo | (hdr[3] & 0x10); /* CD copied (RFC 6840 5.9) */
	}
	__builtin_memcpy(&hdr[6], &ans->an, 2);
	__builtin_memcpy(&hdr[8], &ans->ns, 2);
	__builtin_memcpy(&hdr[10], &ar, 2);
	if (bpf_skb_change_tail(skb, q->dns_off + resp_len, 0) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, q->dns_off, hdr, DNS_HDR_LEN, 0) < 0)
		return -1;
	if (body_len) { /* empty for a mesh host's NODATA */
		__u64 len = body_len;

		__mask_len(len, 511);
		if (len < 1 || len > FP_BODY_MAX)
			return -1;
		if (bpf_skb_store_bytes(skb, q->dns_off + q->qend, ans->body, len, 0) < 0)
			return -1;
	}
	if (own_opt) {
		__builtin_memset(opt, 0, sizeof(opt));
		opt[2] = 41;
		opt[3] = cfg->max_udp >> 8;
		opt[4] = cfg->max_udp & 0xff;
		if (bpf_skb_store_bytes(skb, q->dns_off + q->qend + body_len, opt, OPT_RR_LEN, 0) <
		    0)
			return -1;
	}
	return 0;
}

/* The checksum of the new DNS message, computed rather than patched: the query's checksum
 * field may hold only a pseudo-header seed (CHECKSUM_PARTIAL). */
static __always_inline int __fp_message_sum(struct __sk_buff *skb, struct fp_scratch *s,
					    struct fp_query *q, __u32 resp_len, __s64 *sum)
{
	__u64 msg_len = resp_len;

	__mask_len(msg_len, 1023);
	if (msg_len < DNS_HDR_LEN || msg_len > FP_MSG_MAX)
		return -1;
	if (bpf_skb_load_bytes(skb, q->dns_off, s->msg, msg_len) < 0)
		return -1;
	s->msg[msg_len] = 0; /* pad to a multiple of 4 */
	s->msg[msg_len + 1] = 0;
	s->msg[msg_len + 2] = 0;
	*sum = bpf_csum_diff(NULL, 0, (__be32 *)s->msg, (msg_len + 3) & ~3ULL, 0);
	return *sum < 0 ? -1 : 0;
}

/* Reverse the IP header (the server the pod asked answers it), set its lengths, and add the
 * UDP pseudo-header (with the reversed ports in ``udp``) to ``sum``. */
static __always_inline int __fp_reverse_ip(struct __sk_buff *skb, struct pkt *p, struct udphdr *udp,
					   __u32 resp_len, __s64 *sum)
{
	if (p->family == FAMILY_V4) {
		struct iphdr ip;
		struct pseudo_v4 ph = {};

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
			return -1;
		__be32 a = ip.saddr;

		ip.saddr = ip.daddr;
		ip.daddr = a;
		ip.tot_len = bpf_htons(sizeof(ip) + sizeof(*udp) + resp_len);
		ip.ttl = 64;
		ip.check = 0;
		ip.check = __csum_fold(bpf_csum_diff(NULL, 0, (__be32 *)&ip, sizeof(ip), 0));
		if (bpf_skb_store_bytes(skb, ETH_HLEN, &ip, sizeof(ip), 0) < 0)
			return -1;
		ph.saddr = ip.saddr;
		ph.daddr = ip.daddr;
		ph.proto = IPPROTO_UDP;
		ph.len = udp->len;
		ph.udp = *udp;
		*sum = bpf_csum_diff(NULL, 0, (__be32 *)&ph, sizeof(ph), *sum);
#ifdef ENABLE_IPV6
	} else {
		struct ipv6hdr ip6;
		struct pseudo_v6 ph = {};

		if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6)) < 0)
			return -1;
		__builtin_memcpy(&ph.saddr, &ip6.daddr, 16);
		__builtin_memcpy(&ph.daddr, &ip6.saddr, 16);
		__builtin_memcpy(&ip6.saddr, &ph.saddr, 16);
		__builtin_memcpy(&ip6.daddr, &ph.daddr, 16);
		ip6.payload_len = udp->len;
		ip6.hop_limit = 64;
		if (bpf_skb_store_bytes(skb, ETH_HLEN, &ip6, sizeof(ip6), 0) < 0)
			return -1;
		ph.len = bpf_htonl(sizeof(*udp) + resp_len);
		ph.nexthdr = IPPROTO_UDP;
		ph.udp = *udp;
		*sum = bpf_csum_diff(NULL, 0, (__be32 *)&ph, sizeof(ph), *sum);
#endif /* ENABLE_IPV6 */
	}
	return *sum < 0 ? -1 : 0;
}

/* Back out of the veth it came in on, to the pod: swap the MACs. */
static __always_inline int __fp_reverse_eth(struct __sk_buff *skb)
{
	__u8 eth[2 * ETH_ALEN];
	__u8 mac[ETH_ALEN];

	if (bpf_skb_load_bytes(skb, 0, eth, sizeof(eth)) < 0)
		return -1;
	__builtin_memcpy(mac, eth, ETH_ALEN);
	__builtin_memcpy(eth, eth + ETH_ALEN, ETH_ALEN);
	__builtin_memcpy(eth + ETH_ALEN, mac, ETH_ALEN);
	return bpf_skb_store_bytes(skb, 0, eth, sizeof(eth), 0) < 0 ? -1 : 0;
}

/* A cached reply's TTLs as the resolver's cache serves them at ``now``: each counted down
 * by the whole seconds since it was cached (not below 0), and none past the whole seconds
 * left (interceptor/resolve/cache.py Entry.render). */
static __always_inline int __fp_ttls(struct __sk_buff *skb, struct fp_query *q, struct fp_cached *c,
				     __u32 body_len, __u64 now)
{
	__u64 age = now > c->stored_ns ? (now - c->stored_ns) / 1000000000ULL : 0;
	__u64 left = c->expires_ns > now ? (c->expires_ns - now) / 1000000000ULL : 0;
	__u32 n = c->nttl, i;

#pragma unroll
	for (i = 0; i < FP_TTL_MAX; i++) {
		__u64 ttl, off;
		__be32 v;

		if (i >= n)
			break;
		ttl = c->ttl[i];
		ttl = ttl > age ? ttl - age : 0;
		if (ttl > left)
			ttl = left;
		off = c->ttl_off[i];
		__mask_len(off, 255);
		if (off + 4 > body_len)
			return -1;
		v = bpf_htonl((__u32)ttl);
		if (bpf_skb_store_bytes(skb, q->dns_off + q->qend + off, &v, 4, 0) < 0)
			return -1;
	}
	return 0;
}

/* Turn the query into the response from ``ans`` (``cached``: from FP_CACHE, whose answer it
 * is) and send it back to the pod.  Returns TC_ACT_REDIRECT; -FP_FALLTHROUGH with the packet
 * untouched when the answer cannot be given exactly here; -FP_DROP when the packet was
 * already being rewritten and must be dropped. */
static __always_inline int __fp_answer(struct __sk_buff *skb, struct pkt *p, struct config *cfg,
				       struct fp_scratch *s, struct fp_query *q,
				       struct fp_answer *ans, struct fp_cached *cached, __u64 now)
{
	struct udphdr udp = q->udp;
	__u32 limit, body_len, resp_len;
	__s64 sum;
	__u16 port;

	if (__fp_size_limit(skb, cfg, q, &limit) < 0)
		return -FP_FALLTHROUGH;
	body_len = ans->len;
	if (body_len > FP_BODY_MAX)
		return -FP_FALLTHROUGH;
	resp_len = q->qend + body_len + (q->edns && !cached ? OPT_RR_LEN : 0);
	if (resp_len > limit || resp_len > FP_MSG_MAX)
		return -FP_FALLTHROUGH; /* would need TC: the resolver's job */

	/* From here on the packet is being rewritten: a failure means drop. */
	if (__fp_write_dns(skb, cfg, q, ans, body_len, resp_len, cached != NULL) < 0)
		return -FP_DROP;
	if (cached && __fp_ttls(skb, q, cached, body_len, now) < 0)
		return -FP_DROP;
	if (__fp_message_sum(skb, s, q, resp_len, &sum) < 0)
		return -FP_DROP;
	udp.check = 0;
	udp.len = bpf_htons(sizeof(udp) + resp_len);
	port = udp.source;
	udp.source = udp.dest;
	udp.dest = port;
	if (__fp_reverse_ip(skb, p, &udp, resp_len, &sum) < 0)
		return -FP_DROP;
	udp.check = __csum_fold(sum);
	if (!udp.check)
		udp.check = 0xffff; /* RFC 768: a computed zero is sent as all ones */
	if (bpf_skb_store_bytes(skb, p->l4_off, &udp, sizeof(udp), 0) < 0)
		return -FP_DROP;
	if (__fp_reverse_eth(skb) < 0)
		return -FP_DROP;
	return bpf_redirect(skb->ifindex, 0);
}

#endif /* __INTERCEPTOR_FASTPATH_H */
