//! Waiting for SIGINT or SIGTERM in a tool that runs until told to stop (`tether-bench
//! backend`).

use std::io;

use nix::sys::signal::{SigSet, Signal};

/// SIGINT and SIGTERM, blocked in the calling thread and in every thread it starts afterwards,
/// so they wait for [`StopSignals::wait`] instead of killing the process mid-session.
#[derive(Debug)]
pub struct StopSignals {
    set: SigSet,
}

impl StopSignals {
    /// Blocks SIGINT and SIGTERM; call before starting any thread (a thread inherits the signal
    /// mask of the thread that starts it, pthread_sigmask(3)).
    pub fn block() -> io::Result<StopSignals> {
        let mut set = SigSet::empty();
        set.add(Signal::SIGINT);
        set.add(Signal::SIGTERM);
        set.thread_block()?;
        Ok(StopSignals { set })
    }

    /// Waits for one of the signals (sigwait(3)) and returns it.
    pub fn wait(&self) -> io::Result<Signal> {
        Ok(self.set.wait()?)
    }
}

#[cfg(test)]
mod tests {
    use std::thread;

    use nix::sys::signal::raise;

    use super::*;

    #[test]
    fn a_blocked_signal_is_returned_by_wait() {
        // In a thread of its own: the mask must not leak into the test harness's threads.
        thread::spawn(|| {
            let signals = StopSignals::block().unwrap();
            // raise(3) signals the calling thread, where SIGTERM is blocked: it stays pending.
            raise(Signal::SIGTERM).unwrap();
            assert_eq!(signals.wait().unwrap(), Signal::SIGTERM);
        })
        .join()
        .unwrap();
    }
}
