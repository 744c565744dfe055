//! Keeping a keyed session's datagrams on one worker whatever address they come from.
//!
//! Each worker reads its own `SO_REUSEPORT` socket of a UDP listen address, and the kernel
//! hashes a datagram's 4-tuple to pick the socket. A client whose port or address changes would
//! then land, three times in four with four workers, on a worker that does not hold its flow.
//! For a service with `--udp-session-key`, a classic BPF program on the group picks the socket
//! from the key's bytes instead: the same key, the same socket, from anywhere. A datagram too
//! short to hold the key gets an index past the group's end, which leaves it to the kernel's
//! hash (by address, as without a key). The group has one socket per worker, so the index is
//! the key's hash modulo the worker count.
//!
//! The program runs with the UDP header pulled: absolute loads read the payload, and `len` is
//! the payload's length (net/core/sock_reuseport.c, `run_bpf_filter`).

use nix::libc::sock_filter;

use vocab::SessionKey;

// linux/bpf_common.h and linux/filter.h.
const LD: u16 = 0x00;
const LDX: u16 = 0x01;
const ALU: u16 = 0x04;
const JMP: u16 = 0x05;
const RET: u16 = 0x06;
const MISC: u16 = 0x07;
const W: u16 = 0x00;
const H: u16 = 0x08;
const B: u16 = 0x10;
const IMM: u16 = 0x00;
const ABS: u16 = 0x20;
const LEN: u16 = 0x80;
const MUL: u16 = 0x20;
const RSH: u16 = 0x70;
const MOD: u16 = 0x90;
const XOR: u16 = 0xa0;
const JGE: u16 = 0x30;
const K: u16 = 0x00;
const X: u16 = 0x08;
const RET_A: u16 = 0x10;
const TAX: u16 = 0x00;
const TXA: u16 = 0x80;

/// Multiplier of each round (2^32 / golden ratio, odd).
const MIX: u32 = 0x9e37_79b1;

fn op(code: u16, k: u32) -> sock_filter {
    sock_filter { code, jt: 0, jf: 0, k }
}

/// The key's bytes in the loads the program makes: 4 at a time, then 2, then 1.
fn chunks(key: SessionKey) -> impl Iterator<Item = (u32, u32)> {
    let (mut at, end) = (u32::from(key.offset), key.end() as u32);
    std::iter::from_fn(move || {
        let size = match end - at {
            0 => return None,
            1 => 1,
            2 | 3 => 2,
            _ => 4,
        };
        at += size;
        Some((at - size, size))
    })
}

/// The program that sends a datagram holding `key` to socket `hash(key) % sockets` of the
/// group, and one too short for it to the kernel's choice.
pub fn program(key: SessionKey, sockets: u32) -> Vec<sock_filter> {
    let mut p = vec![
        op(LD | W | LEN, 0),
        sock_filter { code: JMP | JGE | K, jt: 1, jf: 0, k: key.end() as u32 },
        op(RET | K, u32::MAX),
        op(LDX | W | IMM, 0),
    ];
    for (at, size) in chunks(key) {
        let size = match size {
            4 => W,
            2 => H,
            _ => B,
        };
        p.extend([
            op(LD | size | ABS, at),
            op(ALU | XOR | X, 0),
            op(ALU | MUL | K, MIX),
            op(MISC | TAX, 0),
            op(ALU | RSH | K, 16),
            op(ALU | XOR | X, 0),
            op(MISC | TAX, 0),
        ]);
    }
    p.extend([op(MISC | TXA, 0), op(ALU | MOD | K, sockets.max(1)), op(RET | RET_A, 0)]);
    p
}

/// What [`program`] returns for `payload`: the socket index, `None` for the kernel's choice.
#[cfg(test)]
pub fn index(key: SessionKey, sockets: u32, payload: &[u8]) -> Option<u32> {
    let token = key.token(payload)?;
    let mut x = 0u32;
    for (at, size) in chunks(key) {
        let at = (at - u32::from(key.offset)) as usize;
        let word = token[at..at + size as usize].iter().fold(0u32, |w, &b| w << 8 | u32::from(b));
        let a = (word ^ x).wrapping_mul(MIX);
        x = (a >> 16) ^ a;
    }
    Some(x % sockets.max(1))
}

#[cfg(test)]
mod tests {
    use std::net::{SocketAddr, UdpSocket};
    use std::time::{Duration, Instant};

    use socket2::{Domain, Protocol, Socket, Type};

    use super::*;

    #[test]
    fn loads_cover_the_key_once() {
        for len in 1..=SessionKey::MAX_LEN {
            let key = SessionKey { offset: 3, len };
            let mut next = 3;
            for (at, size) in chunks(key) {
                assert_eq!(at, next);
                next += size;
            }
            assert_eq!(next, 3 + u32::from(len));
        }
    }

    /// Four sockets of one group, the program attached: every datagram of one key reaches one
    /// socket whatever port it comes from, the one [`index`] names; keys spread over the
    /// sockets; short datagrams are left to the kernel's hash.
    #[test]
    fn a_key_reaches_one_socket_from_any_port() {
        const N: usize = 4;
        let key = SessionKey { offset: 2, len: 6 };
        let mut at: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let group: Vec<UdpSocket> = (0..N)
            .map(|_| {
                let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
                s.set_reuse_port(true).unwrap();
                s.bind(&at.into()).unwrap();
                let s: UdpSocket = s.into();
                at = s.local_addr().unwrap();
                s.set_nonblocking(true).unwrap();
                s
            })
            .collect();
        crate::sys::attach_reuseport_cbpf(&group[0], &program(key, N as u32)).unwrap();
        // Which socket each datagram reached, by its first byte (a datagram number).
        let receive = |count: usize| -> Vec<usize> {
            let mut got = vec![usize::MAX; count];
            let (mut seen, deadline) = (0, Instant::now() + Duration::from_secs(20));
            let mut buf = [0u8; 64];
            while seen < count && Instant::now() < deadline {
                for (i, s) in group.iter().enumerate() {
                    while let Ok(n) = s.recv(&mut buf) {
                        assert!(n > 0);
                        got[usize::from(buf[0])] = i;
                        seen += 1;
                    }
                }
            }
            assert_eq!(seen, count, "datagrams lost on loopback");
            got
        };
        // One key from 32 ports of 8 addresses.
        let token = *b"tok-42";
        let mut n = 0u8;
        for ip in 0..8 {
            for _ in 0..4 {
                let from = UdpSocket::bind((format!("127.0.3.{}", ip + 1), 0)).unwrap();
                let mut d = vec![n, 0];
                d.extend_from_slice(&token);
                d.extend_from_slice(b"payload");
                from.send_to(&d, at).unwrap();
                n += 1;
            }
        }
        let got = receive(usize::from(n));
        let want = index(key, N as u32, &[[0, 0].as_slice(), &token].concat()).unwrap();
        assert!(got.iter().all(|&i| i == want as usize), "one key reached sockets {got:?}");
        // 40 keys from one port: more than one socket gets some.
        let from = UdpSocket::bind(("127.0.3.1", 0)).unwrap();
        for k in 0..40u8 {
            from.send_to(&[k, 0, k, k ^ 0x5a, 7, 7, 7, 7], at).unwrap();
        }
        let got = receive(40);
        for (k, &i) in got.iter().enumerate() {
            let k = k as u8;
            assert_eq!(Some(i as u32), index(key, N as u32, &[k, 0, k, k ^ 0x5a, 7, 7, 7, 7]));
        }
        assert!(got.iter().any(|&i| i != got[0]), "40 keys all on socket {}", got[0]);
        // Short datagrams (7 bytes: the key ends at 8) from 40 ports: the kernel's hash spreads
        // them, as it does datagrams of a service without a key.
        for k in 0..40u8 {
            UdpSocket::bind(("127.0.3.1", 0)).unwrap().send_to(&[k, 0, 1, 2, 3, 4, 5], at).unwrap();
        }
        let got = receive(40);
        assert!(got.iter().any(|&i| i != got[0]), "40 ports all on socket {}", got[0]);
    }
}
