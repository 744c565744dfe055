//! Stopping one thread of a running process while the others go on: how a test stalls one
//! worker's event loop, as a starved CPU or a slow system call would.

use std::io;
use std::marker::PhantomData;

use nix::sys::ptrace;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// How long a thread may take to show its name.
const NAMED_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

/// One thread held stopped (ptrace(2) `PTRACE_SEIZE` then `PTRACE_INTERRUPT`) until dropped.
/// Only the thread that froze it may release it (a tracer is a thread), so it is neither
/// `Send` nor `Sync`. If the test thread ends first, the kernel releases it.
pub struct FrozenThread {
    tid: Pid,
    _tracer_thread: PhantomData<*const ()>,
}

impl FrozenThread {
    /// Stop the thread named `name` (its `comm`) of process `pid`, and wait until it is stopped.
    /// A thread names itself once it runs (std sets `comm` from the new thread), which may be
    /// after the process said it is ready: its name is looked for until [`NAMED_WITHIN`].
    pub fn freeze(pid: u32, name: &str) -> io::Result<FrozenThread> {
        let mut found = thread_named(pid, name);
        crate::wait_until(NAMED_WITHIN, || {
            found = thread_named(pid, name);
            !matches!(&found, Err(e) if e.kind() == io::ErrorKind::NotFound)
        });
        let tid = found?;
        ptrace::seize(tid, ptrace::Options::empty())?;
        let frozen = FrozenThread { tid, _tracer_thread: PhantomData };
        ptrace::interrupt(tid)?;
        match waitpid(tid, Some(WaitPidFlag::__WALL))? {
            WaitStatus::PtraceEvent(..) | WaitStatus::Stopped(..) => Ok(frozen),
            other => Err(io::Error::other(format!("thread {name} did not stop: {other:?}"))),
        }
    }
}

impl Drop for FrozenThread {
    fn drop(&mut self) {
        let _ = ptrace::detach(self.tid, None);
    }
}

fn thread_named(pid: u32, name: &str) -> io::Result<Pid> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let task = task?;
        if std::fs::read_to_string(task.path().join("comm"))?.trim_end() == name {
            let tid =
                task.file_name().to_string_lossy().parse::<i32>().map_err(io::Error::other)?;
            return Ok(Pid::from_raw(tid));
        }
    }
    Err(io::Error::new(io::ErrorKind::NotFound, format!("no thread {name} in process {pid}")))
}
