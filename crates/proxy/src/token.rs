//! The one place that says what a `mio::Token` means.

use mio::Token;

/// Listener tokens are below this; session tokens at and above.
const SESSION_BASE: usize = 1 << 20;

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// Control wants the worker's attention (message or shutdown).
    Waker,
    /// Listener number n of this worker.
    Listener(usize),
    /// The client socket of session n.
    Client(usize),
    /// The backend socket of session n.
    Backend(usize),
}

impl Slot {
    pub fn token(self) -> Token {
        match self {
            Slot::Waker => Token(usize::MAX),
            Slot::Listener(n) => {
                debug_assert!(n < SESSION_BASE);
                Token(n)
            }
            Slot::Client(n) => Token(SESSION_BASE + 2 * n),
            Slot::Backend(n) => Token(SESSION_BASE + 2 * n + 1),
        }
    }

    pub fn from_token(token: Token) -> Slot {
        match token.0 {
            usize::MAX => Slot::Waker,
            n if n < SESSION_BASE => Slot::Listener(n),
            n if (n - SESSION_BASE) % 2 == 0 => Slot::Client((n - SESSION_BASE) / 2),
            n => Slot::Backend((n - SESSION_BASE) / 2),
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
        ] {
            assert_eq!(Slot::from_token(slot.token()), slot);
        }
    }
}
