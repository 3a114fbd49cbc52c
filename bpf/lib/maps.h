/* Maps and structs shared between bpf/redirect.c and the agent (interceptor/datapath/maps.py).
 * Every struct here has exactly one ctypes mirror in maps.py; tests/unit/test_maps_abi.py
 * compiles this header with the host compiler and checks sizes and offsets against it. */
#ifndef __INTERCEPTOR_MAPS_H
#define __INTERCEPTOR_MAPS_H

#include <linux/types.h>

#define FAMILY_V4 4
#define FAMILY_V6 6

/* An IPv4 address lives in a[0], the rest zero; IPv6 uses all four words. Network order. */
struct ip_addr {
	__u32 a[4];
};

/* CONFIG[0]: written by the agent, read by every packet. */
struct config {
	__u64 heartbeat_ns;	  /* CLOCK_MONOTONIC (bpf_ktime_get_ns) of the agent's last beat */
	__u64 heartbeat_timeout;  /* ns after which the resolver counts as dead: fail open */
	struct ip_addr resolver4; /* resolver IPv4 (a[0]); 0 = no IPv4 capture */
	struct ip_addr resolver6; /* resolver IPv6; all zero = no IPv6 capture */
	__u32 flags;		  /* CFG_* */
	__u32 flow_rate;	  /* new flows per second a pod may open (0: unlimited) */
	__u32 flow_burst;	  /* token bucket depth for flow_rate */
	__u32 max_udp;		  /* our EDNS payload size (the resolver's), for fast-path OPT */
	__u64 grace_until_ns;	  /* handover: the fast path answers until then without an agent */
	__u32 query_rate;   /* queries per second a pod may send the resolver (0: unlimited) */
	__u32 query_burst;  /* token bucket depth for query_rate */
	__u32 answer_rate;  /* queries per second the kernel answers for a pod (0: unlimited) */
	__u32 answer_burst; /* token bucket depth for answer_rate */
	__u32 tcp_conns;    /* TCP connections a pod may hold to the resolver (0: unlimited) */
	__u32 _pad;
};

#define CFG_CAPTURE_ALL (1U << 0) /* any destination on port 53, not only CAPTURE entries */
#define CFG_SK_LOOKUP	(1U << 1) /* also require a live resolver socket (instant fail-open) */
#define CFG_CACHED_BY_SERVER                                                                       \
	(1U << 2) /* FP_CACHE answers depend on the server the pod asked (its key's server) */

/* CAPTURE: DNS server addresses whose traffic is steered to the resolver. */
struct capture_key {
	struct ip_addr addr;
	__u32 family;
};

/* PODS: (host veth ifindex, pod address) of every pod we serve. The pair is the
 * anti-spoofing check: a packet on this veth from any other source creates no state. */
struct pod_key {
	__u32 ifindex;
	__u32 family;
	struct ip_addr addr;
};

/* A token bucket: tokens scaled by 1e9 (token-nanoseconds), refilled from ts on use. */
struct bucket {
	__u64 ts;     /* time of the last refill (ns) */
	__u64 tokens; /* tokens left, times 1e9 */
};

struct pod_info {
	__u32 pod_id;	       /* slot in per-pod counters, assigned by the agent */
	__u32 view;	       /* the pod's namespace's FP_ANSWERS view (0: none, see fp_key) */
	__u64 tokens_ts;       /* new-flow bucket: time of the last refill (ns) */
	__u64 tokens;	       /* new-flow bucket: tokens left, times 1e9 */
	struct bucket queries; /* queries to the resolver (config query_rate) */
	struct bucket answers; /* queries the kernel answers (config answer_rate) */
};

/* IFACES: host veths under management; value is unused (presence = managed). */
struct iface_info {
	__u32 flags;
	__u32 _pad;
};

/* FLOWS: one entry per pod socket talking to a captured server, so that replies get the
 * original server address back and the resolver can forward to the server the pod asked. */
struct flow_key {
	struct ip_addr pod;
	__u16 pod_port; /* network order */
	__u8 proto;	/* IPPROTO_UDP / IPPROTO_TCP */
	__u8 family;
};

struct flow_val {
	struct ip_addr orig; /* the DNS server the pod asked */
	__u16 orig_port;     /* network order */
	__u16 flags;	     /* FLOW_* */
	__u32 ifindex;	     /* host veth the query came in on */
	__u32 pod_id;	     /* the pod's counter slot, so replies need no PODS lookup */
	__u32 _pad2;
	__u64 created_ns;
};

#define FLOW_DIRECT	 (1U << 0) /* to the resolver's own address: nothing to restore */
#define FLOW_TCP_COUNTED (1U << 1) /* a TCP connection counted in TCP_CONNS until FIN or RST */

/* Per-pod counters (PERCPU_ARRAY indexed by pod_info.pod_id). */
struct pod_stats {
	__u64 queries;	  /* DNS packets seen from the pod to a captured address */
	__u64 redirected; /* steered to the resolver */
	__u64 passed;	  /* left untouched (fail-open, rate limit) */
	__u64 replies;	  /* replies whose source was restored */
	__u64 answered;	  /* answered in the kernel by the fast path */
	__u64 direct;	  /* sent to the resolver's own address, delivered as addressed */
	__u64 limited;	  /* dropped: over the pod's query or answer budget */
};

/* FP_ANSWERS: the in-kernel fast path's answers, a copy of the resolver's precomputed table
 * for the names that fit.  The key is the question name exactly as the resolver keys it
 * (lowercased wire form, zero-padded) and the QTYPE; the value is everything of the response
 * that does not come from the query itself.  Mesh hosts that namespaces see differently
 * (ServiceEntry exportTo) have no view-0 entry, only one per namespace (view) that sees
 * them with an address: a pod whose view has none is answered by the resolver. */
#define FP_NAME_MAX 128 /* longer names fall through to the resolver */
#define FP_BODY_MAX 256 /* answer+authority+additional bytes; bigger answers fall through */

struct fp_key {
	__u8 name[FP_NAME_MAX];
	__u16 qtype; /* network order */
	__u16 view;  /* 0: every pod's answer; else only for pods of that view (a namespace) */
};

struct fp_answer {
	__u8 flag_hi; /* header byte 2 before the query's RD bit is or-ed in */
	__u8 flag_lo; /* header byte 3 before the query's CD bit is or-ed in */
	__u16 an;     /* network order */
	__u16 ns;     /* network order */
	__u16 ar;     /* network order, without our OPT record */
	__u16 len;    /* bytes used in body */
	__u16 _pad;
	__u8 body[FP_BODY_MAX];
};

/* FP_OWNERS: every name that exists in the cluster zone outside pod.<zone> (empty
 * non-terminals included), keyed as FP_ANSWERS keys names.  A question below the zone, not
 * below pod.<zone>, for a name in neither map is search-path junk, and the kernel answers
 * it NXDOMAIN exactly as the resolver would.  Pod records are synthesized from the name by
 * the resolver, so they stay there. */
struct fp_name {
	__u8 name[FP_NAME_MAX];
};

/* FP_JUNK[0]: where junk is answered, and with what. */
struct fp_junk {
	__u32 suffix_len;     /* 0: off (autopath answers junk per pod, or the set is partial) */
	__u32 pod_suffix_len; /* 0: no exclusion */
	__u8 suffix[FP_NAME_MAX];     /* the zone, lowercased wire form */
	__u8 pod_suffix[FP_NAME_MAX]; /* "pod.<zone>": left to the resolver */
	struct fp_answer nxdomain;
};

/* FP_CACHE: hot forwarded names from the resolver's cache (A and AAAA), answered in the
 * kernel until the last tenth of their life (then the resolver answers, and refreshes a
 * popular one before it expires).  The key is what the resolver's cache keys an answer by:
 * the name and type, whether the query had EDNS and CD (they change the upstream's reply),
 * and the server the pod asked when that is where the name is forwarded
 * (CFG_CACHED_BY_SERVER; else family 0 and server zero).  The answer is the cached reply
 * verbatim: its header bits and counts as the upstream sent them, its OPT record included,
 * every TTL counted down as the resolver counts it. */
#define FP_TTL_MAX 16 /* TTL fields patched per answer; more: the resolver's */
#define FP_CK_EDNS 1  /* the query has an OPT record */
#define FP_CK_CD   4  /* the query has CD set */

struct fp_ckey {
	__u8 name[FP_NAME_MAX];
	__u16 qtype; /* network order */
	__u8 flags;  /* FP_CK_* */
	__u8 family; /* of server; 0: any server */
	struct ip_addr server;
};

struct fp_cached {
	__u64 stored_ns;  /* CLOCK_MONOTONIC when the reply was cached: TTLs count from here */
	__u64 expires_ns; /* no TTL goes past this */
	__u64 due_ns;	  /* the kernel answers until then (the last tenth is the resolver's) */
	__u32 ttl[FP_TTL_MAX];	   /* each TTL field's value as cached */
	__u16 ttl_off[FP_TTL_MAX]; /* ... and its offset in ans.body */
	__u32 nttl;
	__u32 _pad;
	struct fp_answer ans; /* flags and counts verbatim, body after the question */
};

/* FP_STATS slots (PERCPU_ARRAY).  Keep in step with maps.py FASTPATH_RESULTS. */
enum fp_result {
	FP_HIT = 0,	    /* answered in the kernel */
	FP_MISS = 1,	    /* not in FP_ANSWERS: the resolver answers */
	FP_FALLTHROUGH = 2, /* in scope but unusual (EDNS DO, size, flags, long name...) */
	FP_NXDOMAIN = 3,    /* of the hits: search-path junk answered NXDOMAIN (FP_OWNERS) */
	FP_CACHED = 4,	    /* of the hits: a forwarded name from FP_CACHE */
	FP_RESULT_MAX = 5,
};

/* Not a result (never counted): the fast path had begun rewriting the packet and cannot
 * give it back intact, so the entry program drops it.  The client retries. */
#define FP_DROP FP_RESULT_MAX
/* Not a result either: a hit, but the pod is over its budget of kernel answers. */
#define FP_LIMITED (FP_RESULT_MAX + 1)

#define MAX_PODS    4096
#define MAX_FLOWS   65536
#define MAX_CAPTURE 64
#ifndef FP_MAX_ENTRIES
#define FP_MAX_ENTRIES 65536
#endif
#ifndef FP_CACHED_ENTRIES
#define FP_CACHED_ENTRIES 8192
#endif

#endif /* __INTERCEPTOR_MAPS_H */
