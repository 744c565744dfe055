//! The one place that says what a `mio::Token` means.

use mio::Token;

/// The low bits of a token say what it is; the rest is the index.
const TAG_BITS: usize = 3;
const TCP_LISTENER: usize = 0;
const UDP_LISTENER: usize = 1;
const CLIENT: usize = 2;
const BACKEND: usize = 3;
const FLOW: usize = 4;
const PENDING: usize = 5;

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Control wants the worker's attention (message or shutdown).
    Waker,
    /// TCP listener number n of this worker.
    Listener(usize),
    /// UDP listener socket number n of this worker.
    UdpListener(usize),
    /// The client socket of session n.
    Client(usize),
    /// The backend socket of session n.
    Backend(usize),
    /// The backend socket of UDP flow n.
    Flow(usize),
    /// Connection n from a trusted proxy, waiting for its PROXY header.
    Pending(usize),
}

impl Slot {
    pub fn token(self) -> Token {
        let (index, tag) = match self {
            Slot::Waker => return Token(usize::MAX),
            Slot::Listener(n) => (n, TCP_LISTENER),
            Slot::UdpListener(n) => (n, UDP_LISTENER),
            Slot::Client(n) => (n, CLIENT),
            Slot::Backend(n) => (n, BACKEND),
            Slot::Flow(n) => (n, FLOW),
            Slot::Pending(n) => (n, PENDING),
        };
        Token(index << TAG_BITS | tag)
    }

    pub fn from_token(token: Token) -> Slot {
        if token.0 == usize::MAX {
            return Slot::Waker;
        }
        let index = token.0 >> TAG_BITS;
        match token.0 & ((1 << TAG_BITS) - 1) {
            TCP_LISTENER => Slot::Listener(index),
            UDP_LISTENER => Slot::UdpListener(index),
            CLIENT => Slot::Client(index),
            BACKEND => Slot::Backend(index),
            PENDING => Slot::Pending(index),
            // FLOW, and tags never issued (an event cannot carry a token we did not register).
            _ => Slot::Flow(index),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        for slot in [
            Slot::Waker,
            Slot::Listener(0),
            Slot::Listener(7),
            Slot::Client(0),
            Slot::Backend(0),
            Slot::Client(12345),
            Slot::Backend(999_999),
            Slot::UdpListener(3),
            Slot::Flow(0),
            Slot::Flow(77),
            Slot::Pending(0),
            Slot::Pending(4321),
        ] {
            assert_eq!(Slot::from_token(slot.token()), slot);
        }
    }
}
