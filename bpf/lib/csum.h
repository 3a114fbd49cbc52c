/* Address rewriting with incremental checksum updates (RFC 1624). */
#ifndef __INTERCEPTOR_CSUM_H
#define __INTERCEPTOR_CSUM_H

#define IP_CSUM_OFF (ETH_HLEN + offsetof(struct iphdr, check))
#define IP_SRC_OFF  (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP_DST_OFF  (ETH_HLEN + offsetof(struct iphdr, daddr))
#define IP6_SRC_OFF (ETH_HLEN + offsetof(struct ipv6hdr, saddr))
#define IP6_DST_OFF (ETH_HLEN + offsetof(struct ipv6hdr, daddr))

/* Replace the IPv4 address at addr_off and fix the IP and L4 (pseudo-header) checksums.
 * A UDP checksum of zero means "none" over IPv4 and must stay zero (BPF_F_MARK_MANGLED_0). */
static __always_inline int __rewrite_v4(struct __sk_buff *skb, int addr_off, __u32 l4_csum_off,
					__u8 proto, __be32 from, __be32 to)
{
	__u64 l4flags = BPF_F_PSEUDO_HDR | sizeof(to);

	if (proto == IPPROTO_UDP)
		l4flags |= BPF_F_MARK_MANGLED_0;
	if (bpf_l4_csum_replace(skb, l4_csum_off, from, to, l4flags) < 0)
		return -1;
	if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, from, to, sizeof(to)) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, addr_off, &to, sizeof(to), 0) < 0)
		return -1;
	return 0;
}

#ifdef ENABLE_IPV6
/* IPv6 has no header checksum; only the L4 pseudo-header sum changes. */
static __always_inline int __rewrite_v6(struct __sk_buff *skb, int addr_off, __u32 l4_csum_off,
					struct ip_addr *from, struct ip_addr *to)
{
	__s64 diff = bpf_csum_diff((__be32 *)from, 16, (__be32 *)to, 16, 0);

	if (diff < 0)
		return -1;
	if (bpf_l4_csum_replace(skb, l4_csum_off, 0, diff, BPF_F_PSEUDO_HDR) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, addr_off, to, 16, 0) < 0)
		return -1;
	return 0;
}
#endif /* ENABLE_IPV6 */

#endif /* __INTERCEPTOR_CSUM_H */
