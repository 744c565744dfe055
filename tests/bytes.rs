//! Byte-exactness through both pumps (splice and buffer): half-close both ways, large transfers
//! with a slow reader, send-then-close, and resets forwarded as resets (FAILURE-MODES F1, F2).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

/// Client sends 1 MiB and shuts down its write side; the backend replies with a digest after EOF.
fn half_close_client_to_backend(net: u8, splice: &str) {
    let pool = backends(net, 1);
    let t = tether(net, &pool, &["--splice", splice]);
    let mut s = connect_from(client_ip(1), t.addr(), DEADLINE).unwrap();
    send_command(&mut s, "sink").unwrap();
    let sent = write_pattern(&mut s, 1 << 20).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let reply = read_line(&mut s).unwrap();
    assert_eq!(parse_sink_reply(&reply), Some((1 << 20, sent)), "reply {reply:?}");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

/// Backend sends 1 MiB and shuts down its write side; the client reads to EOF, then sends the
/// digest, which must still reach the backend.
fn half_close_backend_to_client(net: u8, splice: &str) {
    let pool = backends(net, 1);
    let t = tether(net, &pool, &["--splice", splice]);
    let mut s = connect_from(client_ip(2), t.addr(), DEADLINE).unwrap();
    send_command(&mut s, &format!("source-then-read {}", 1 << 20)).unwrap();
    let (n, digest) = read_to_end_digest(&mut s, None).unwrap();
    assert_eq!((n, digest), (1 << 20, digest_of_pattern(1 << 20)));
    s.write_all(hex(digest).as_bytes()).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let want = Outcome::ReceivedLine(hex(digest));
    assert!(
        pool[0].wait_for(|log| log.iter().any(|e| e.outcome == want), DEADLINE),
        "backend never received the digest: {:?}",
        pool[0].log()
    );
}

/// 64 MiB each way at once through `echo`, read slowly; tether's memory must stay bounded.
fn large_transfer_with_slow_reader(net: u8, splice: &str) {
    const SIZE: u64 = 64 << 20;
    let pool = backends(net, 1);
    let t = tether(net, &pool, &["--splice", splice]);
    let mut s = connect_from(client_ip(3), t.addr(), DEADLINE).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    send_command(&mut s, "echo").unwrap();
    let mut writer = s.try_clone().unwrap();
    let sent = std::thread::spawn(move || {
        let digest = write_pattern(&mut writer, SIZE);
        let _ = writer.shutdown(Shutdown::Write);
        digest
    });
    // Sample tether's RSS while the transfer runs.
    let done = Arc::new(AtomicBool::new(false));
    let max_rss = Arc::new(AtomicU64::new(0));
    let pid = t.pid();
    let sampler = {
        let (done, max_rss) = (Arc::clone(&done), Arc::clone(&max_rss));
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                    let rss = status
                        .lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
                        .unwrap_or(0);
                    max_rss.fetch_max(rss, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20)); // a sampling period, not a wait
            }
        })
    };
    // Slow for the first 4 MiB (4 KiB reads with pauses: the proxy must hold back), then fast.
    let mut digest = Digest::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let slow = digest.bytes() < 4 << 20;
        let want = if slow { 4096 } else { buf.len() };
        match s.read(&mut buf[..want]) {
            Ok(0) => break,
            Ok(n) => digest.update(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("read failed after {} bytes: {e}", digest.bytes()),
        }
        if slow {
            std::thread::sleep(Duration::from_micros(200)); // slowness, not synchronisation
        }
    }
    done.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let sent = sent.join().unwrap().unwrap();
    assert_eq!(digest.bytes(), SIZE);
    assert_eq!(digest.finish(), sent, "echoed bytes differ from those sent");
    assert_eq!(sent, digest_of_pattern(SIZE));
    // Backpressure: a session holds at most one 64 KiB store per direction; a proxy that kept
    // reading while the client was slow would hold tens of MiB.
    let rss = max_rss.load(Ordering::Relaxed);
    eprintln!("tether RSS peaked at {rss} KiB ({splice})");
    assert!(rss > 0 && rss < 24 * 1024, "tether RSS peaked at {rss} KiB");
}

/// The backend writes N bytes and closes at once: the client gets all N, then EOF.
fn send_then_close_never_truncates(net: u8, splice: &str) {
    let pool = backends(net, 1);
    let t = tether(net, &pool, &["--splice", splice]);
    for round in 0..5 {
        for n in [0u64, 1, 1000, 65_536, (1 << 20) + 7, 8 << 20] {
            let mut s = connect_from(client_ip(4 + round), t.addr(), DEADLINE).unwrap();
            send_command(&mut s, &format!("source {n}")).unwrap();
            let (got, digest) = read_to_end_digest(&mut s, None).unwrap();
            assert_eq!(got, n, "round {round}: truncated");
            assert_eq!(digest, digest_of_pattern(n));
        }
    }
}

/// The backend writes `bye\n` and resets: the client reads `bye\n`, then gets a reset.
fn backend_reset_reaches_client_after_its_data(net: u8, splice: &str) {
    let pool = backends(net, 1);
    let t = tether(net, &pool, &["--splice", splice]);
    for i in 0..5 {
        let mut s = connect_from(client_ip(10 + i), t.addr(), DEADLINE).unwrap();
        send_command(&mut s, "reset").unwrap();
        assert_eq!(read_line(&mut s).unwrap(), "bye");
        let mut rest = Vec::new();
        let err = s.read_to_end(&mut rest).expect_err("a reset, not EOF");
        assert_eq!(err.kind(), ErrorKind::ConnectionReset);
        assert!(rest.is_empty());
    }
}

/// The client resets: the backend sees a reset, not a clean EOF.
fn client_reset_reaches_backend(net: u8, splice: &str) {
    let pool = backends(net, 1);
    let t = tether(net, &pool, &["--splice", splice]);
    let mut s = connect_from(client_ip(20), t.addr(), DEADLINE).unwrap();
    send_command(&mut s, "await").unwrap();
    assert!(pool[0].wait_for(|log| log.iter().any(|e| e.outcome == Outcome::Started), DEADLINE));
    send_reset(s).unwrap();
    assert!(
        pool[0].wait_for(|log| log.iter().any(|e| e.outcome == Outcome::Reset), DEADLINE),
        "backend log: {:?}",
        pool[0].log()
    );
    assert!(!pool[0].log().iter().any(|e| matches!(e.outcome, Outcome::Eof { .. })));
}

/// Urgent data in the middle of a bulk transfer: splice(2) cannot read past the urgent mark, so
/// a pump that took its `EAGAIN` for "drained" would stall and turn the FIN into a truncation.
/// The urgent byte itself is out of band and not part of the stream (no SO_OOBINLINE).
fn urgent_data_does_not_truncate(net: u8, splice: &str) {
    use nix::sys::socket::{send, MsgFlags};
    use std::os::fd::AsRawFd;
    let pool = backends(net, 1);
    let t = tether(net, &pool, &["--splice", splice]);
    let mut s = connect_from(client_ip(30), t.addr(), DEADLINE).unwrap();
    send_command(&mut s, "sink").unwrap();
    let mut want = Digest::new();
    // Enough bulk ahead of the mark that tether is splicing a backlog when it reaches it.
    let mut buf = vec![0u8; 16 << 20];
    pattern(0, &mut buf);
    want.update(&buf);
    want.update(b"preBCDEF");
    s.write_all(&buf).unwrap();
    s.write_all(b"pre").unwrap();
    send(s.as_raw_fd(), b"A", MsgFlags::MSG_OOB).unwrap();
    s.write_all(b"BCDEF").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let reply = read_line(&mut s).unwrap();
    assert_eq!(parse_sink_reply(&reply), Some((want.bytes(), want.finish())), "reply {reply:?}");
}

/// The backend sends data and resets while the client is still uploading and not reading: the
/// reset is noticed on the upload first, and what tether's kernel already received from the
/// backend must still reach the client before the reset does (F2).
fn reset_after_data_loses_nothing(net: u8, splice: &str) {
    use socket2::{Domain, Socket, Type};
    // More than tether's socket buffers can hold: the backend stops when the pipeline stalls.
    const N: u64 = 64 << 20;
    let pool = backends(net, 1);
    let t = tether(net, &pool, &["--splice", splice]);
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    // A small receive buffer, so most of the reply waits inside tether when the reset comes.
    socket.set_recv_buffer_size(4096).unwrap();
    socket.bind(&std::net::SocketAddr::new(client_ip(31), 0).into()).unwrap();
    socket.connect(&t.addr().into()).unwrap();
    let mut s: std::net::TcpStream = socket.into();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    send_command(&mut s, &format!("source-then-reset {N}")).unwrap();
    let mut upload = s.try_clone().unwrap();
    let uploader = std::thread::spawn(move || {
        let chunk = [7u8; 16 * 1024];
        for _ in 0..4096 {
            if let Err(e) = upload.write_all(&chunk) {
                return Some(e.kind());
            }
        }
        None
    });
    let sent = |log: &[Event]| log.iter().any(|e| e.command.starts_with("source-then-reset"));
    assert!(pool[0].wait_for(sent, DEADLINE), "backend never finished");
    let outcome = pool[0].events_for(&format!("source-then-reset {N}"))[0].outcome.clone();
    let Outcome::Sent { bytes: acked } = outcome else { panic!("backend: {outcome:?}") };
    let mut digest = Digest::new();
    let mut buf = vec![0u8; 64 * 1024];
    let end = loop {
        match s.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => digest.update(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    // Everything tether's kernel acknowledged reached the client, uncorrupted.
    assert!(digest.bytes() >= acked, "got {} of {acked} acknowledged bytes", digest.bytes());
    assert_eq!(digest.finish(), digest_of_pattern(digest.bytes()));
    drop(s);
    // The socket reports a reset once: to the reader, or to the uploader's write if that came
    // first (the reader then sees EOF). Either way the connection ended in a reset.
    let upload_end = uploader.join().unwrap();
    let reset = matches!(&end, Err(e) if e.kind() == ErrorKind::ConnectionReset)
        || matches!(upload_end, Some(ErrorKind::ConnectionReset | ErrorKind::BrokenPipe));
    assert!(reset, "no reset seen: reader {end:?}, uploader {upload_end:?}");
}

macro_rules! both_pumps {
    ($($name:ident: $net_splice:literal, $net_buffer:literal;)*) => {
        mod splice {
            $(#[test] fn $name() { super::$name($net_splice, "auto") })*
        }
        mod buffer {
            $(#[test] fn $name() { super::$name($net_buffer, "off") })*
        }
    };
}

both_pumps! {
    half_close_client_to_backend: 20, 30;
    half_close_backend_to_client: 21, 31;
    large_transfer_with_slow_reader: 22, 32;
    send_then_close_never_truncates: 23, 33;
    backend_reset_reaches_client_after_its_data: 24, 34;
    client_reset_reaches_backend: 25, 35;
    urgent_data_does_not_truncate: 26, 36;
    reset_after_data_loses_nothing: 27, 37;
}
