/* Per-reason packet counters: every path through the programs, happy or not, bumps one. */
#ifndef __INTERCEPTOR_METRICS_H
#define __INTERCEPTOR_METRICS_H

/* Keep in step with interceptor/datapath/maps.py REASONS. */
enum reason {
	REASON_REDIRECTED = 0,	    /* query steered to the resolver */
	REASON_REPLY_RESTORED = 1,  /* reply source rewritten back to the server the pod asked */
	REASON_SPOOFED = 2,	    /* source address is not the veth's pod: no state, passed */
	REASON_UNKNOWN_POD = 3,	    /* veth not managed (or pod opted out): passed */
	REASON_STALE_HEARTBEAT = 4, /* agent heartbeat too old: fail open */
	REASON_NO_SOCKET = 5,	    /* no resolver socket: fail open */
	REASON_RATE_LIMITED = 6,    /* pod over its new-flow budget: passed to its server */
	REASON_NO_FLOW = 7, /* reply or TCP segment without a flow (or no room for one): passed */
	REASON_NOT_CAPTURED = 8, /* port 53 but destination not captured: passed */
	REASON_CSUM_ERROR = 9,	 /* a rewrite helper failed: dropped (state is inconsistent) */
	REASON_MALFORMED = 10,	 /* a pod's packet with truncated headers: passed */
	REASON_DIRECT = 11,	 /* to the resolver's own address, from the veth's pod: delivered */
	REASON_QUERY_LIMITED = 12,  /* over the pod's budget of queries to the resolver: dropped */
	REASON_ANSWER_LIMITED = 13, /* over the pod's budget of kernel answers: dropped */
	REASON_TCP_LIMITED = 14,    /* a SYN over the pod's TCP connection cap: dropped */
	REASON_MAX = 15,
};

#endif /* __INTERCEPTOR_METRICS_H */
