//! How the client talks to a server (timeout, connections): chosen by the
//! caller and checked here, so that nothing in the client reads flags or
//! the environment.

use crate::error::{Error, Result};
use std::time::Duration;

/// How to talk to the server. The caller decides (the command line reads
/// them from its flags or the environment); nothing here reads the
/// environment.
#[derive(Clone, Debug)]
pub struct NbdOptions {
    /// Connect, handshake, and wait for each reply at most this long.
    pub timeout: Duration,
    /// Most connections to open when the server allows several.
    pub max_connections: usize,
}

/// The range `NbdOptions::max_connections` must lie in.
pub const MAX_CONNECTIONS: usize = 16;

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions { timeout: Duration::from_secs(60), max_connections: 4 }
    }
}

impl NbdOptions {
    /// Options from optional values, each refused (not clamped) when out
    /// of range: a timeout in seconds above 0 (at most a day), 1 to 16
    /// connections.
    pub fn new(timeout_seconds: Option<f64>, max_connections: Option<usize>) -> Result<NbdOptions> {
        let mut o = NbdOptions::default();
        if let Some(t) = timeout_seconds {
            if !(t > 0.0 && t <= 86400.0) {
                return Err(Error::InvalidInput(format!(
                    "the NBD timeout must be above 0 and at most 86400 seconds, not {t}"
                )));
            }
            o.timeout = Duration::from_secs_f64(t);
        }
        if let Some(n) = max_connections {
            if !(1..=MAX_CONNECTIONS).contains(&n) {
                return Err(Error::InvalidInput(format!(
                    "the number of NBD connections must be from 1 to {MAX_CONNECTIONS}, not {n}"
                )));
            }
            o.max_connections = n;
        }
        Ok(o)
    }
}
