//! Inbound mail: listeners, the per-connection task, AUTH and the Received stamp.

pub mod auth;
pub mod connection;
pub mod received;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Connection counts, total and per client address.
#[derive(Debug, Default)]
pub struct ConnCounter {
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

/// Releases a connection slot when dropped.
#[derive(Debug)]
pub struct ConnGuard {
    counter: Arc<ConnCounter>,
    ip: IpAddr,
}

impl ConnCounter {
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Takes a slot, or says which limit is reached.
    pub fn acquire(
        self: &Arc<Self>,
        ip: IpAddr,
        max_total: usize,
        max_ip: usize,
    ) -> Result<ConnGuard, &'static str> {
        let Ok(mut map) = self.per_ip.lock() else {
            return Err("internal error");
        };
        if self.total.load(Ordering::Acquire) >= max_total {
            return Err("Too many connections, try again later");
        }
        let n = map.entry(ip).or_insert(0);
        if *n >= max_ip {
            return Err("Too many connections from your address, try again later");
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::AcqRel);
        Ok(ConnGuard {
            counter: self.clone(),
            ip,
        })
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if let Ok(mut map) = self.counter.per_ip.lock() {
            if let Some(n) = map.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&self.ip);
                }
            }
            self.counter.total.fetch_sub(1, Ordering::AcqRel);
        }
    }
}
