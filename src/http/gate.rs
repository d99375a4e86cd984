//! Admission for Moat's small HTTP listeners (policy host, admin API): a cap on connections in
//! all and per client address, fairness under a flood of idle connections, and log lines
//! about refused requests that cannot flood the log.
//!
//! A connection is *waiting* from accept until its request head has been read (for HTTPS that
//! includes the TLS handshake), and must get there within the listener's head deadline. When
//! the listener (or one address) is full, the oldest waiting connection is closed to make room
//! for the new one: 512 idle connections that never send a ClientHello then cost a legitimate
//! fetch nothing but a slot it takes from the oldest of them. Connections past their head are
//! never evicted; when every slot is busy with real work, a new connection is refused.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

#[derive(Debug)]
struct Entry {
    ip: IpAddr,
    waiting: bool,
    evict: Arc<Notify>,
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    /// By admission order, so the first waiting entry is the oldest.
    conns: BTreeMap<u64, Entry>,
    per_ip: HashMap<IpAddr, usize>,
}

impl State {
    fn remove(&mut self, id: u64) -> Option<Entry> {
        let e = self.conns.remove(&id)?;
        if let Some(n) = self.per_ip.get_mut(&e.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_ip.remove(&e.ip);
            }
        }
        Some(e)
    }

    /// Closes the oldest waiting connection (of `ip`, when given). False when there is none.
    fn evict_oldest(&mut self, ip: Option<IpAddr>) -> bool {
        let victim = self
            .conns
            .iter()
            .find(|(_, e)| e.waiting && ip.is_none_or(|ip| e.ip == ip))
            .map(|(id, _)| *id);
        match victim.and_then(|id| self.remove(id)) {
            Some(e) => {
                e.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Connection admission for one listener.
#[derive(Debug)]
pub struct Gate {
    max_total: usize,
    max_per_ip: usize,
    state: Mutex<State>,
}

/// One admitted connection; dropping it frees its slot.
#[derive(Debug)]
pub struct Ticket {
    gate: Arc<Gate>,
    id: u64,
    evict: Arc<Notify>,
}

impl Gate {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Gate> {
        Arc::new(Gate {
            max_total: max_total.max(1),
            max_per_ip: max_per_ip.max(1),
            state: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a connection from `ip`, closing the oldest waiting one when full; `None` when
    /// every slot (of the listener or of this address) is busy past its request head.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Ticket> {
        let mut s = self.lock();
        if s.per_ip.get(&ip).copied().unwrap_or(0) >= self.max_per_ip && !s.evict_oldest(Some(ip)) {
            return None;
        }
        if s.conns.len() >= self.max_total && !s.evict_oldest(None) {
            return None;
        }
        let id = s.next;
        s.next += 1;
        let evict = Arc::new(Notify::new());
        s.conns.insert(
            id,
            Entry {
                ip,
                waiting: true,
                evict: evict.clone(),
            },
        );
        *s.per_ip.entry(ip).or_insert(0) += 1;
        Some(Ticket {
            gate: self.clone(),
            id,
            evict,
        })
    }

    /// Connections admitted now.
    pub fn len(&self) -> usize {
        self.lock().conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Ticket {
    /// The request head has been read: this connection is no longer evicted for newcomers.
    pub fn head_done(&self) {
        if let Some(e) = self.gate.lock().conns.get_mut(&self.id) {
            e.waiting = false;
        }
    }

    /// Resolves when a newcomer took this connection's slot.
    pub async fn evicted(&self) {
        self.evict.notified().await
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.gate.lock().remove(self.id);
    }
}

/// Lets through at most `burst` log lines per `period`, then counts what it held back and says
/// how many in the next line it lets through, so refused requests cannot flood the log.
#[derive(Debug)]
pub struct LogLimit {
    burst: u32,
    period: Duration,
    state: Mutex<(Instant, u32, u64)>,
}

impl LogLimit {
    pub fn new(burst: u32, period: Duration) -> LogLimit {
        LogLimit {
            burst,
            period,
            state: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    /// `Some(n)` when a line may be written now, `n` being the lines held back since the last
    /// one; `None` when this one is held back.
    pub fn allow(&self) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if now.duration_since(s.0) >= self.period {
            s.0 = now;
            s.1 = 0;
        }
        if s.1 < self.burst {
            s.1 += 1;
            Some(std::mem::take(&mut s.2))
        } else {
            s.2 += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn oldest_waiting_connection_makes_room() {
        let g = Gate::new(3, 2);
        let a = g.admit(ip(1)).unwrap();
        let b = g.admit(ip(1)).unwrap();
        // Per address: the oldest waiting one of that address goes.
        let c = g.admit(ip(1)).unwrap();
        assert_eq!(g.len(), 2);
        assert!(
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap()
                .block_on(async {
                    tokio::time::timeout(Duration::from_millis(50), a.evicted())
                        .await
                        .is_ok()
                })
        );
        drop(a);
        assert_eq!(g.len(), 2);
        // In all: the oldest waiting one of any address goes.
        b.head_done();
        c.head_done();
        let d = g.admit(ip(2)).unwrap();
        assert_eq!(g.len(), 3);
        let e = g.admit(ip(3)).unwrap();
        assert_eq!(g.len(), 3, "d was waiting and made room");
        // Everyone past the head: refused.
        e.head_done();
        // An evicted ticket's drop frees nothing twice.
        drop(d);
        assert_eq!(g.len(), 3);
        assert!(g.admit(ip(5)).is_none());
        drop(b);
        let f = g.admit(ip(4)).unwrap();
        f.head_done();
        assert!(g.admit(ip(5)).is_none());
        drop((c, e, f));
        assert!(g.is_empty());
    }

    #[test]
    fn log_limit_holds_back_and_counts() {
        let l = LogLimit::new(2, Duration::from_secs(3600));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        let l2 = LogLimit::new(1, Duration::from_millis(1));
        assert_eq!(l2.allow(), Some(0));
        assert_eq!(l2.allow(), None);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(l2.allow(), Some(1));
    }
}
