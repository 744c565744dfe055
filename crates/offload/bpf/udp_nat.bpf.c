// SPDX-License-Identifier: (MIT OR GPL-2.0)
// tether's UDP offload (issue 13): established flows rewritten at tc ingress.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

// One direction of a flow as it arrives: family 4 or 6, addresses in network order (IPv4 in
// the first 4 bytes), ports in network order.
struct tuple {
    __u8 saddr[16];
    __u8 daddr[16];
    __u16 sport;
    __u16 dport;
    __u8 family;
    __u8 pad[3];
};

// What it becomes, where it goes, and what the program saw of it.
struct nat {
    struct tuple to;
    // 0: delivered on this host (TC_ACT_OK after the rewrite); else the interface the route to
    // `to.daddr` leaves by (user space looked it up: bpf_fib_lookup refuses unless forwarding
    // is enabled on the ingress interface), redirected there with bpf_redirect_neigh.
    __u32 oif;
    __u32 pad;
    __u64 last_seen_ns;
    __u64 packets;
    __u64 bytes;
};

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    // Entries are allocated as user space inserts them (one pair per offloaded flow), not all
    // at load: the map is sized for --max-flows, which may be far above what is used.
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __uint(max_entries, 1024);
    __type(key, struct tuple);
    __type(value, struct nat);
} FLOWS SEC(".maps");

#define L3 ETH_HLEN
#define IP4_CSUM (L3 + __builtin_offsetof(struct iphdr, check))
#define IP4_SRC (L3 + __builtin_offsetof(struct iphdr, saddr))
#define IP6_SRC (L3 + __builtin_offsetof(struct ipv6hdr, saddr))
#define L4_4 (L3 + sizeof(struct iphdr))
#define L4_6 (L3 + sizeof(struct ipv6hdr))

// IPv4: addresses and ports are 12 bytes in a row (no options, the UDP header right after).
// The checksums change by the difference of old and new: the addresses enter the IP header's
// and the UDP pseudo-header's (BPF_F_PSEUDO_HDR: with CHECKSUM_PARTIAL only the pseudo-header
// sum is in the field), the ports the UDP checksum's; a UDP checksum that becomes 0 is sent as
// 0xffff, and one that was 0 (none) stays 0 (BPF_F_MARK_MANGLED_0).
static __always_inline int rewrite4(struct __sk_buff *skb, const struct tuple *from,
                                    const struct tuple *to) {
    const __u32 l4_csum = L4_4 + __builtin_offsetof(struct udphdr, check);
    __u32 old[3], new[3];
    __builtin_memcpy(&old[0], from->saddr, 4);
    __builtin_memcpy(&old[1], from->daddr, 4);
    __builtin_memcpy(&old[2], &from->sport, 4);
    __builtin_memcpy(&new[0], to->saddr, 4);
    __builtin_memcpy(&new[1], to->daddr, 4);
    __builtin_memcpy(&new[2], &to->sport, 4);
    __s64 addrs = bpf_csum_diff(old, 8, new, 8, 0);
    __s64 ports = bpf_csum_diff(&old[2], 4, &new[2], 4, 0);
    if (addrs < 0 || ports < 0)
        return -1;
    if (bpf_l4_csum_replace(skb, l4_csum, 0, addrs, BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0) ||
        bpf_l4_csum_replace(skb, l4_csum, 0, ports, BPF_F_MARK_MANGLED_0) ||
        bpf_l3_csum_replace(skb, IP4_CSUM, 0, addrs, 0))
        return -1;
    return bpf_skb_store_bytes(skb, IP4_SRC, new, 12, 0) ? -1 : 0;
}

static __always_inline int rewrite6(struct __sk_buff *skb, const struct tuple *from,
                                    const struct tuple *to) {
    const __u32 l4_csum = L4_6 + __builtin_offsetof(struct udphdr, check);
    const __u64 pseudo = BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0;
#pragma unroll
    for (int i = 0; i < 16; i += 4) {
        __u32 o, n;
        __builtin_memcpy(&o, from->saddr + i, 4);
        __builtin_memcpy(&n, to->saddr + i, 4);
        if (bpf_l4_csum_replace(skb, l4_csum, o, n, pseudo | 4))
            return -1;
        __builtin_memcpy(&o, from->daddr + i, 4);
        __builtin_memcpy(&n, to->daddr + i, 4);
        if (bpf_l4_csum_replace(skb, l4_csum, o, n, pseudo | 4))
            return -1;
    }
    __u32 old_ports, new_ports;
    __builtin_memcpy(&old_ports, &from->sport, 4);
    __builtin_memcpy(&new_ports, &to->sport, 4);
    if (bpf_l4_csum_replace(skb, l4_csum, old_ports, new_ports, BPF_F_MARK_MANGLED_0 | 4))
        return -1;
    // Addresses and ports are 36 bytes in a row (the UDP header right after), as in `to`.
    return bpf_skb_store_bytes(skb, IP6_SRC, to, 36, 0) ? -1 : 0;
}

// The headers up to the end of the UDP header are in the linear part of the packet.
static __always_inline int pulled(struct __sk_buff *skb, __u32 len) {
    if ((long)skb->data + len <= (long)skb->data_end)
        return 1;
    return bpf_skb_pull_data(skb, len) == 0;
}

// Anything the program does not rewrite goes on as if it were not there: the next tcx program
// (TCX_NEXT), or the next clsact filter, then the stack (tether's sockets, in user space).
#define PASS TC_ACT_UNSPEC

SEC("classifier")
int tether_udp(struct __sk_buff *skb) {
    struct tuple key = {};
    __u32 udp_len;
    // GSO super-packets go to user space whole.
    if (skb->gso_segs > 1)
        return PASS;
    if (skb->protocol == bpf_htons(ETH_P_IP)) {
        if (!pulled(skb, L4_4 + sizeof(struct udphdr)))
            return PASS;
        void *data = (void *)(long)skb->data;
        void *end = (void *)(long)skb->data_end;
        struct iphdr *ip = data + L3;
        struct udphdr *udp = data + L4_4;
        if ((void *)(udp + 1) > end)
            return PASS;
        // Options and fragments stay with user space.
        if (ip->ihl != 5 || ip->protocol != IPPROTO_UDP || (ip->frag_off & bpf_htons(0x3fff)))
            return PASS;
        key.family = 4;
        __builtin_memcpy(key.saddr, &ip->saddr, 4);
        __builtin_memcpy(key.daddr, &ip->daddr, 4);
        key.sport = udp->source;
        key.dport = udp->dest;
        udp_len = bpf_ntohs(udp->len);
    } else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
        if (!pulled(skb, L4_6 + sizeof(struct udphdr)))
            return PASS;
        void *data = (void *)(long)skb->data;
        void *end = (void *)(long)skb->data_end;
        struct ipv6hdr *ip = data + L3;
        struct udphdr *udp = data + L4_6;
        if ((void *)(udp + 1) > end)
            return PASS;
        // Extension headers (fragments included) stay with user space.
        if (ip->nexthdr != IPPROTO_UDP)
            return PASS;
        key.family = 6;
        __builtin_memcpy(key.saddr, &ip->saddr, 16);
        __builtin_memcpy(key.daddr, &ip->daddr, 16);
        key.sport = udp->source;
        key.dport = udp->dest;
        udp_len = bpf_ntohs(udp->len);
    } else {
        return PASS;
    }
    struct nat *nat = bpf_map_lookup_elem(&FLOWS, &key);
    if (!nat)
        return PASS;
    // A copy: user space may replace the entry meanwhile.
    struct tuple to = nat->to;
    __u32 oif = nat->oif;
    // Larger than the way out carries: user space sends it (the stack fragments it).
    if (oif) {
        __u32 mtu = 0;
        if (bpf_check_mtu(skb, oif, &mtu, 0, 0))
            return PASS;
    }
    int err = key.family == 4 ? rewrite4(skb, &key, &to) : rewrite6(skb, &key, &to);
    if (err)
        return TC_ACT_SHOT;
    // CLOCK_MONOTONIC_COARSE: up to a tick behind CLOCK_MONOTONIC, plenty for idle expiry, and
    // cheaper than reading the clock source per packet.
    nat->last_seen_ns = bpf_ktime_get_coarse_ns();
    __sync_fetch_and_add(&nat->packets, 1);
    __sync_fetch_and_add(&nat->bytes, udp_len > 8 ? udp_len - 8 : 0);
    if (!oif)
        return TC_ACT_OK;
    return bpf_redirect_neigh(oif, 0, 0, 0);
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
