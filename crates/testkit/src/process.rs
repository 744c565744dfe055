//! A harness for the `tether` process: start, wait until ready, signal, measure, stop.
//!
//! The child's stdout and stderr are captured line by line by one thread each. They are Unix
//! stream sockets rather than pipes: when the child has exited, [`Tether`] shuts its end down,
//! which still delivers what was queued and then wakes the reading thread even if a grandchild
//! (a shell's `sleep`, say) keeps the other end open.

use std::ffi::OsStr;
use std::fs;
use std::io::{self, BufRead, BufReader, ErrorKind};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::journal::Journal;

/// How long [`Tether::start`] waits for `ready`: binding is instant, but the binary may be
/// started while cargo still links other tests on the same 2 cores.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Tether`]'s Drop waits after SIGTERM before it sends SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(5);

/// The line the binary prints once all its listeners are bound.
const READY_LINE: &str = "ready";
/// Prefix of the line the binary prints per listener, before [`READY_LINE`].
const LISTENING_PREFIX: &str = "listening tcp ";
const LISTENING_UDP_PREFIX: &str = "listening udp ";
/// Pause between two `try_wait`s while waiting for an exit.
const EXIT_POLL: Duration = Duration::from_millis(10);

/// A running `tether` process. Dropping it sends SIGTERM, waits up to [`TERM_GRACE`], then
/// sends SIGKILL; a test that is panicking also gets the process's stderr printed.
pub struct Tether {
    process: Process,
    addrs: Vec<SocketAddr>,
    udp_addrs: Vec<SocketAddr>,
}

/// What [`run_to_exit`] saw.
#[derive(Debug)]
pub struct Exit {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// A child process with captured output.
struct Process {
    program: PathBuf,
    child: Child,
    /// Set once the child is reaped; from then on its pid may belong to another process.
    status: Option<ExitStatus>,
    stdout: Capture,
    stderr: Capture,
}

/// One captured output stream: our end of the socket, and the thread reading it into lines.
struct Capture {
    lines: Arc<Journal<String>>,
    ours: UnixStream,
    reader: Option<JoinHandle<()>>,
}

/// `args` with active health probes turned off (`--health-check off`) unless they choose a
/// probe themselves or use a config file. Probes are real connections: tests that read their
/// backends' logs would see them among the clients' sessions.
pub fn no_probes<S: AsRef<str>>(args: &[S]) -> Vec<String> {
    let mut out: Vec<String> = args.iter().map(|a| a.as_ref().to_string()).collect();
    if !out.iter().any(|a| a == "--health-check" || a == "--config") {
        out.extend(["--health-check".to_string(), "off".to_string()]);
    }
    out
}

impl Tether {
    /// Starts `bin` with `args` and waits up to [`READY_TIMEOUT`] for its `ready` line,
    /// recording the address of every `listening tcp <addr>` line before it.
    ///
    /// If the process exits, closes stdout, or prints a bad listening line first, or the
    /// deadline passes, it is stopped and the error carries its stderr.
    pub fn start<I, S>(bin: &Path, args: I) -> io::Result<Tether>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut command = Command::new(bin);
        command.args(args);
        Tether::start_command(command)
    }

    /// [`Tether::start`] for a prepared command (to set environment variables, say); its
    /// stdin, stdout and stderr are replaced.
    pub fn start_command(command: Command) -> io::Result<Tether> {
        let mut process = Process::spawn(command)?;
        let ready = process
            .stdout
            .lines
            .wait_for(|lines| lines.iter().any(|line| line.trim() == READY_LINE), READY_TIMEOUT);
        let parsed = if ready { listening_addrs(&process.stdout.lines.snapshot()) } else { None };
        match parsed {
            Some(Ok((addrs, udp_addrs))) => Ok(Tether { process, addrs, udp_addrs }),
            Some(Err(bad)) => Err(process.fail(&format!("printed a bad listening line {bad:?}"))),
            None => Err(process.fail(&format!("did not print `{READY_LINE}`"))),
        }
    }

    /// The TCP listener addresses, in the order the binary printed them.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The UDP listener addresses, in the order the binary printed them.
    pub fn udp_addrs(&self) -> &[SocketAddr] {
        &self.udp_addrs
    }

    /// The first UDP listener address.
    ///
    /// # Panics
    ///
    /// The admin interface's address, from the `admin http://ADDR/` line.
    ///
    /// # Panics
    ///
    /// If tether printed no such line (started without `--admin`).
    pub fn admin(&self) -> SocketAddr {
        self.stdout_lines()
            .iter()
            .find_map(|l| l.strip_prefix("admin http://")?.trim_end_matches('/').parse().ok())
            .expect("tether printed no `admin http://ADDR/` line")
    }

    /// The address peers connect to (`peers ADDR`, with `--peer-listen`).
    pub fn peer_addr(&self) -> SocketAddr {
        self.stdout_lines()
            .iter()
            .find_map(|l| l.strip_prefix("peers ")?.trim().parse().ok())
            .expect("tether printed no `peers ADDR` line")
    }

    /// If the binary printed `ready` without a `listening udp` line.
    pub fn udp_addr(&self) -> SocketAddr {
        *self.udp_addrs.first().expect("tether printed no `listening udp` line before `ready`")
    }

    /// The first listener address.
    ///
    /// # Panics
    ///
    /// If the binary printed `ready` without a `listening tcp` line.
    pub fn addr(&self) -> SocketAddr {
        *self.addrs.first().expect("tether printed no `listening tcp` line before `ready`")
    }

    pub fn pid(&self) -> u32 {
        self.process.child.id()
    }

    /// Sends `signal` to the process; an error (ESRCH) once it has exited.
    pub fn signal(&mut self, signal: Signal) -> io::Result<()> {
        self.process.signal(signal)
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.process.wait_exit(timeout)
    }

    /// Stdout lines so far, `listening` and `ready` included.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.process.stdout.lines.snapshot()
    }

    /// Stderr so far, one line per line. Complete once [`Tether::wait_exit`] returned a status.
    pub fn stderr_text(&self) -> String {
        self.process.stderr.text()
    }

    /// Waits up to `timeout` until some stdout line satisfies `pred`.
    pub fn wait_stdout(&self, mut pred: impl FnMut(&str) -> bool, timeout: Duration) -> bool {
        self.process.stdout.lines.wait_for(|lines| lines.iter().any(|l| pred(l)), timeout)
    }

    /// Waits up to `timeout` until some stderr line satisfies `pred`.
    pub fn wait_stderr(&self, mut pred: impl FnMut(&str) -> bool, timeout: Duration) -> bool {
        self.process.stderr.lines.wait_for(|lines| lines.iter().any(|l| pred(l)), timeout)
    }

    /// Resident set size in KiB (`VmRSS` in /proc/PID/status, proc(5)).
    pub fn rss_kib(&self) -> io::Result<u64> {
        self.process.status_field("VmRSS:")
    }

    /// Peak resident set size in KiB (`VmHWM` in /proc/PID/status, proc(5)).
    pub fn peak_rss_kib(&self) -> io::Result<u64> {
        self.process.status_field("VmHWM:")
    }

    /// Number of threads (`Threads` in /proc/PID/status).
    pub fn threads(&self) -> io::Result<u64> {
        self.process.status_field("Threads:")
    }

    /// CPU time used so far, user plus system, in clock ticks (`utime` + `stime`, fields 14
    /// and 15 of /proc/PID/stat, proc(5); usually 100 ticks per second).
    pub fn cpu_ticks(&self) -> io::Result<u64> {
        let stat = fs::read_to_string(self.process.proc_path("stat")?)?;
        // Field 2, the command name, is in parentheses and may hold spaces: count after it.
        let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let field = |i: usize| -> io::Result<u64> {
            fields.get(i).and_then(|f| f.parse().ok()).ok_or_else(|| {
                io::Error::new(ErrorKind::InvalidData, format!("bad /proc stat: {stat}"))
            })
        };
        // after_name starts at field 3 (state): utime (14) is index 11, stime (15) index 12.
        Ok(field(11)? + field(12)?)
    }

    /// Number of open file descriptors (entries of /proc/PID/fd), to catch leaks.
    pub fn fd_count(&self) -> io::Result<usize> {
        Ok(fs::read_dir(self.process.proc_path("fd")?)?.count())
    }
}

impl Drop for Tether {
    fn drop(&mut self) {
        self.process.terminate();
        if thread::panicking() {
            eprintln!(
                "--- stderr of {} (pid {}) ---\n{}",
                self.process.program.display(),
                self.pid(),
                self.stderr_text()
            );
        }
    }
}

/// Runs `bin` with `args` until it exits, for bad-flag tests; a `TimedOut` error (with its
/// stderr) if it is still running after `timeout`, when it is killed.
pub fn run_to_exit<I, S>(bin: &Path, args: I, timeout: Duration) -> io::Result<Exit>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = Command::new(bin);
    command.args(args);
    let mut process = Process::spawn(command)?;
    match process.wait_exit(timeout) {
        Some(status) => {
            Ok(Exit { status, stdout: process.stdout.text(), stderr: process.stderr.text() })
        }
        None => {
            let status = process.kill();
            Err(io::Error::new(
                ErrorKind::TimedOut,
                format!(
                    "{} still running after {timeout:?}, killed ({status:?}); stderr:\n{}",
                    process.program.display(),
                    process.stderr.text()
                ),
            ))
        }
    }
}

/// TCP and UDP listener addresses.
type Listening = (Vec<SocketAddr>, Vec<SocketAddr>);

/// Parses the `listening tcp|udp <addr>` lines before `ready`; the bad line as error.
fn listening_addrs(lines: &[String]) -> Option<Result<Listening, String>> {
    let (mut tcp, mut udp) = (Vec::new(), Vec::new());
    for line in lines {
        let line = line.trim();
        if line == READY_LINE {
            return Some(Ok((tcp, udp)));
        }
        let (list, addr) = if let Some(addr) = line.strip_prefix(LISTENING_PREFIX) {
            (&mut tcp, addr)
        } else if let Some(addr) = line.strip_prefix(LISTENING_UDP_PREFIX) {
            (&mut udp, addr)
        } else {
            continue;
        };
        match addr.trim().parse() {
            Ok(addr) => list.push(addr),
            Err(_) => return Some(Err(line.to_owned())),
        }
    }
    None
}

impl Process {
    fn spawn(mut command: Command) -> io::Result<Process> {
        let program = PathBuf::from(command.get_program());
        let (stdout, child_stdout) = Capture::start("stdout")?;
        let (stderr, child_stderr) = Capture::start("stderr")?;
        command.stdin(Stdio::null()).stdout(child_stdout).stderr(child_stderr);
        let child = command.spawn().map_err(|e| {
            io::Error::new(e.kind(), format!("cannot start {}: {e}", program.display()))
        })?;
        // The command holds our copies of the child's ends; they must close for the child's
        // exit to read as EOF.
        drop(command);
        Ok(Process { program, child, status: None, stdout, stderr })
    }

    fn nix_pid(&self) -> io::Result<Pid> {
        let pid = i32::try_from(self.child.id()).map_err(io::Error::other)?;
        Ok(Pid::from_raw(pid))
    }

    fn signal(&mut self, signal: Signal) -> io::Result<()> {
        // A reaped pid may already name another process: never signal past the exit.
        if self.status.is_none() {
            if let Some(status) = self.child.try_wait()? {
                self.exited(status);
            }
        }
        if self.status.is_some() {
            return Err(io::Error::from(nix::errno::Errno::ESRCH));
        }
        kill(self.nix_pid()?, signal).map_err(io::Error::from)
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.status {
                return Some(status);
            }
            match self.child.try_wait() {
                Ok(Some(status)) => self.exited(status),
                Ok(None) if Instant::now() < deadline => thread::sleep(EXIT_POLL),
                Ok(None) => return None,
                Err(e) => {
                    log::warn!("wait for {}: {e}", self.program.display());
                    return None;
                }
            }
        }
    }

    /// Records the exit and finishes the captures: everything the child wrote is queued by now.
    fn exited(&mut self, status: ExitStatus) {
        self.status = Some(status);
        self.stdout.finish();
        self.stderr.finish();
    }

    /// SIGKILL and reap.
    fn kill(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Err(e) = self.child.kill() {
                log::warn!("kill {}: {e}", self.program.display());
            }
            match self.child.wait() {
                Ok(status) => self.exited(status),
                Err(e) => log::warn!("wait for {}: {e}", self.program.display()),
            }
        }
        self.stdout.finish();
        self.stderr.finish();
        self.status
    }

    /// SIGTERM, up to [`TERM_GRACE`] to exit, then SIGKILL. Idempotent.
    fn terminate(&mut self) -> Option<ExitStatus> {
        if self.signal(Signal::SIGTERM).is_ok() && self.wait_exit(TERM_GRACE).is_some() {
            return self.status;
        }
        self.kill()
    }

    /// Stops the process and returns an error saying `what` went wrong, with its stderr.
    fn fail(&mut self, what: &str) -> io::Error {
        let status = self.terminate();
        io::Error::other(format!(
            "{} {what} within {READY_TIMEOUT:?} (exit: {status:?}); stdout:\n{}stderr:\n{}",
            self.program.display(),
            self.stdout.text(),
            self.stderr.text()
        ))
    }

    fn proc_path(&self, file: &str) -> io::Result<PathBuf> {
        if self.status.is_some() {
            return Err(io::Error::from(nix::errno::Errno::ESRCH));
        }
        Ok(PathBuf::from(format!("/proc/{}/{file}", self.child.id())))
    }

    /// A `Key: value [kB]` number from /proc/PID/status.
    fn status_field(&self, key: &str) -> io::Result<u64> {
        let status = fs::read_to_string(self.proc_path("status")?)?;
        status
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .and_then(|value| value.split_whitespace().next())
            .and_then(|value| value.parse().ok())
            .ok_or_else(|| io::Error::new(ErrorKind::NotFound, format!("no {key} in {status}")))
    }
}

impl Capture {
    /// Starts capturing; returns the capture and the child's end to pass as its stdio.
    fn start(label: &str) -> io::Result<(Capture, Stdio)> {
        let (ours, theirs) = UnixStream::pair()?;
        let lines = Arc::new(Journal::new());
        let reader = thread::Builder::new().name(format!("capture {label}")).spawn({
            let stream = ours.try_clone()?;
            let lines = Arc::clone(&lines);
            move || read_lines(stream, &lines)
        })?;
        let capture = Capture { lines, ours, reader: Some(reader) };
        Ok((capture, Stdio::from(OwnedFd::from(theirs))))
    }

    /// Lets the reader take what is queued, then ends it. Idempotent.
    fn finish(&mut self) {
        if let Some(reader) = self.reader.take() {
            // Reads after shutdown(2) still return queued data, then EOF (unix(7) stream
            // sockets keep the receive queue), so nothing the child wrote is lost.
            let _ = self.ours.shutdown(Shutdown::Both);
            if reader.join().is_err() {
                log::error!("output capture thread panicked");
            }
        }
    }

    /// The lines so far, each ended by `\n`.
    fn text(&self) -> String {
        self.lines.with(|lines| lines.iter().map(|line| format!("{line}\n")).collect())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.finish();
    }
}

fn read_lines(stream: UnixStream, lines: &Journal<String>) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                lines.push(text.trim_end_matches(['\n', '\r']).to_owned());
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    lines.close();
}

#[cfg(test)]
mod tests {
    use super::*;

    const SH: &str = "/bin/sh";

    fn fake(script: &str) -> io::Result<Tether> {
        Tether::start(Path::new(SH), ["-c", script])
    }

    #[test]
    fn start_records_listeners_and_drop_kills_promptly() {
        let script = "echo listening tcp 127.0.0.1:1; echo listening tcp [::1]:2; \
                      echo starting >&2; echo ready; exec sleep 30";
        let mut tether = fake(script).unwrap();
        assert_eq!(tether.addr(), "127.0.0.1:1".parse().unwrap());
        assert_eq!(tether.addrs().len(), 2);
        assert!(tether.wait_stderr(|line| line == "starting", Duration::from_secs(10)));
        assert!(tether.rss_kib().unwrap() > 0);
        tether.cpu_ticks().unwrap();
        assert!(tether.threads().unwrap() >= 1);
        assert!(tether.fd_count().unwrap() >= 3);
        assert!(tether.wait_exit(Duration::from_millis(50)).is_none());
        let start = Instant::now();
        drop(tether);
        assert!(start.elapsed() < Duration::from_secs(3), "drop took {:?}", start.elapsed());
    }

    #[test]
    fn drop_is_prompt_while_a_grandchild_holds_the_output() {
        // The shell forks `sleep`, which inherits stdout and stderr and outlives the shell.
        let tether = fake("sleep 30 & echo grandchild $!; echo ready; wait").unwrap();
        let grandchild = tether
            .stdout_lines()
            .iter()
            .find_map(|line| line.strip_prefix("grandchild ")?.parse::<i32>().ok())
            .expect("no grandchild pid");
        let start = Instant::now();
        drop(tether);
        let took = start.elapsed();
        // The harness does not reach grandchildren; the test that made this one ends it.
        kill(Pid::from_raw(grandchild), Signal::SIGKILL).unwrap();
        assert!(took < Duration::from_secs(3), "drop took {took:?}");
    }

    #[test]
    fn early_exit_is_an_error_with_stderr() {
        let error = match fake("echo listening tcp 127.0.0.1:1; echo 'bad flag --x' >&2; exit 2") {
            Ok(_) => panic!("a fake that exits became ready"),
            Err(e) => e.to_string(),
        };
        assert!(error.contains("bad flag --x"), "{error}");
        assert!(error.contains("did not print `ready`"), "{error}");
    }

    #[test]
    fn bad_listening_line_is_an_error() {
        let error = fake("echo listening tcp nowhere; echo ready; exec sleep 30").err().unwrap();
        assert!(error.to_string().contains("nowhere"), "{error}");
    }

    #[test]
    fn missing_binary_is_an_error() {
        let error = Tether::start(Path::new("/nonexistent/tether"), [""; 0]).err().unwrap();
        assert_eq!(error.kind(), ErrorKind::NotFound, "{error}");
    }

    #[test]
    fn signal_and_wait_exit() {
        let mut tether = fake(
            "trap 'echo got term >&2; exit 3' TERM; echo ready; \
                               while :; do sleep 0.05; done",
        )
        .unwrap();
        assert!(tether.addrs().is_empty());
        tether.signal(Signal::SIGTERM).unwrap();
        let status = tether.wait_exit(Duration::from_secs(10)).expect("fake did not exit");
        assert_eq!(status.code(), Some(3));
        assert_eq!(tether.stderr_text(), "got term\n");
        assert!(tether.signal(Signal::SIGTERM).is_err());
        assert!(tether.rss_kib().is_err());
    }

    #[test]
    fn run_to_exit_captures_output() {
        let exit = run_to_exit(
            Path::new(SH),
            ["-c", "echo out; echo err >&2; exit 4"],
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(exit.status.code(), Some(4));
        assert_eq!(exit.stdout, "out\n");
        assert_eq!(exit.stderr, "err\n");
    }

    #[test]
    fn run_to_exit_kills_on_timeout() {
        let start = Instant::now();
        let error = run_to_exit(
            Path::new(SH),
            ["-c", "echo waiting >&2; exec sleep 30"],
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert_eq!(error.kind(), ErrorKind::TimedOut);
        assert!(error.to_string().contains("waiting"), "{error}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
