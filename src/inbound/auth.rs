//! SMTP AUTH credentials: the users file (`name:argon2-hash` per line, managed by
//! `moat user`), verification off the async threads, and failure throttling per address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{Output, PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};

/// Hashes a password for the users file.
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Reads the users file; a missing file means no users.
pub fn read_users(path: &Path) -> std::io::Result<Vec<(String, String)>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(':'))
        .map(|(u, h)| (u.to_string(), h.to_string()))
        .collect())
}

/// Writes the users file atomically, readable by the owner only.
pub fn write_users(path: &Path, users: &[(String, String)]) -> Result<(), String> {
    let mut text =
        String::from("# Moat SMTP AUTH users: name:argon2-hash (managed by `moat user`)\n");
    for (u, h) in users {
        text.push_str(&format!("{u}:{h}\n"));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    crate::tls::write_private(&tmp, text.as_bytes())?;
    // `moat user add` run as root on a server's data dir (owned by the service user) must
    // leave a file the server can read: give it the directory's owner.
    if let Some(dir) = path.parent() {
        use std::os::unix::fs::MetadataExt;
        if let (Ok(d), Ok(f)) = (std::fs::metadata(dir), std::fs::metadata(&tmp))
            && (d.uid(), d.gid()) != (f.uid(), f.gid())
        {
            // Only root can give a file away; anyone else keeps their own file.
            let _ = std::os::unix::fs::chown(&tmp, Some(d.uid()), Some(d.gid()));
        }
    }
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

/// A user name that fits the users file.
pub fn valid_username(name: &str) -> bool {
    !name.is_empty() && name.len() <= 128 && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
}

/// Argon2 working memory (1 KiB blocks), kept by the [`HashPool`] and reused from one check
/// to the next: allocating and freeing it per attempt leaves the freed memory with the
/// allocator of whichever thread ran the hash, and 100 attempts grew the server by 600 MiB
/// with only two running at a time.
pub type HashMemory = Vec<Block>;

/// The most memory a stored hash may ask for (64 MiB; `moat user add` makes 19 MiB ones). A
/// costlier one never matches: the pool's bound is this times its permits.
const MAX_HASH_BLOCKS: usize = 64 * 1024;

/// Verifies credentials against the users file (re-read each time, so `moat user add`
/// takes effect at once), hashing in `memory`. Blocking: argon2 is deliberately slow.
pub fn verify(path: &Path, username: &str, password: &str, memory: &mut HashMemory) -> bool {
    let users = read_users(path).unwrap_or_default();
    let stored = users
        .iter()
        .find(|(u, _)| u == username)
        .map(|(_, h)| h.clone());
    // Unknown users cost as much as known ones, so timing does not reveal who exists.
    const DUMMY: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$Wv1bTPh4xOrRZzFxuxeFQkAwxo2YyI2ExhUDpiHUmDE";
    let hash_text = stored.clone().unwrap_or_else(|| DUMMY.to_string());
    let Ok(hash) = PasswordHash::new(&hash_text) else {
        return false;
    };
    let ok = matches_hash(password.as_bytes(), &hash, memory).unwrap_or(false);
    ok && stored.is_some()
}

/// Hashes `password` with the algorithm, version, parameters and salt of `hash` and compares
/// the result in constant time. `None`: the stored hash is unusable.
fn matches_hash(password: &[u8], hash: &PasswordHash<'_>, memory: &mut HashMemory) -> Option<bool> {
    let algorithm = Algorithm::try_from(hash.algorithm).ok()?;
    let version = match hash.version {
        Some(v) => Version::try_from(v).ok()?,
        None => Version::default(),
    };
    let params = Params::try_from(hash).ok()?;
    let expected = hash.hash?;
    let mut salt_buf = [0u8; 64];
    let salt = hash.salt?.decode_b64(&mut salt_buf).ok()?;
    let blocks = params.block_count();
    if blocks > MAX_HASH_BLOCKS {
        return None;
    }
    if memory.len() < blocks {
        memory.resize(blocks, Block::default());
    }
    let mut out = vec![0u8; expected.len()];
    Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password, salt, &mut out, &mut memory[..blocks])
        .ok()?;
    // `Output` compares in constant time.
    Some(Output::new(&out).ok()? == expected)
}

/// Counts authentication failures per client address over a sliding window.
#[derive(Debug)]
pub struct AuthLimiter {
    max: u32,
    window: Duration,
    failures: Mutex<HashMap<IpAddr, Vec<Instant>>>,
}

impl AuthLimiter {
    pub fn new(max: u32, window: Duration) -> Self {
        AuthLimiter {
            max,
            window,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// True when this address has used up its failures.
    pub fn blocked(&self, ip: IpAddr) -> bool {
        let Ok(mut map) = self.failures.lock() else {
            return true;
        };
        let now = Instant::now();
        let Some(list) = map.get_mut(&ip) else {
            return false;
        };
        list.retain(|t| now.duration_since(*t) < self.window);
        list.len() as u32 >= self.max
    }

    pub fn record_failure(&self, ip: IpAddr) {
        if let Ok(mut map) = self.failures.lock() {
            let now = Instant::now();
            if map.len() > 100_000 {
                map.retain(|_, l| l.iter().any(|t| now.duration_since(*t) < self.window));
            }
            map.entry(ip).or_default().push(now);
        }
    }
}

/// Everything a connection needs to check credentials.
#[derive(Debug)]
pub struct Authenticator {
    pub users_file: PathBuf,
    pub limiter: AuthLimiter,
    pub max_failures_per_connection: u32,
    pub pool: HashPool,
}

/// Bounds password hashing: argon2 costs about 19 MiB and tens of milliseconds per attempt, so
/// unbounded parallel attempts let clients exhaust memory (100 cost 1.6 GiB). At most
/// `permits` hashes run at once, at most `per_address` of them for one client address; an
/// attempt waits up to `wait` for a permit and is otherwise refused for now (`454 4.7.0`).
#[derive(Debug)]
pub struct HashPool {
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    per_address: usize,
    wait: Duration,
    running: Mutex<HashMap<IpAddr, usize>>,
    /// Working memory of finished hashes, one per permit at most, for the next ones.
    memory: Mutex<Vec<HashMemory>>,
}

/// A running hash's slot; dropping it frees the permit and the address's count.
#[derive(Debug)]
pub struct HashSlot<'a> {
    pool: &'a HashPool,
    ip: IpAddr,
    /// The slot's working memory; lent out to the hashing thread and given back.
    pub memory: HashMemory,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl HashPool {
    /// `permits` 0: one per core, at most 8 (8 × 19 MiB).
    pub fn new(permits: usize, per_address: usize, wait: Duration) -> HashPool {
        let permits = if permits == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get().min(8))
        } else {
            permits
        };
        HashPool {
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(permits)),
            per_address: per_address.max(1),
            wait,
            running: Mutex::new(HashMap::new()),
            memory: Mutex::new(Vec::new()),
        }
    }

    /// A slot for one hash from `ip`, or `None` when this address already runs its share or
    /// no permit freed up in time.
    pub async fn slot(&self, ip: IpAddr) -> Option<HashSlot<'_>> {
        {
            let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
            let n = running.entry(ip).or_insert(0);
            if *n >= self.per_address {
                return None;
            }
            *n += 1;
        }
        let permit = tokio::time::timeout(self.wait, self.permits.clone().acquire_owned()).await;
        match permit {
            Ok(Ok(p)) => Some(HashSlot {
                pool: self,
                ip,
                memory: self
                    .memory
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pop()
                    .unwrap_or_default(),
                _permit: p,
            }),
            _ => {
                self.release(ip);
                None
            }
        }
    }

    fn release(&self, ip: IpAddr) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = running.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                running.remove(&ip);
            }
        }
    }
}

impl Drop for HashSlot<'_> {
    fn drop(&mut self) {
        let memory = std::mem::take(&mut self.memory);
        if !memory.is_empty() {
            self.pool
                .memory
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(memory);
        }
        self.pool.release(self.ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_file_takes_the_data_dirs_owner() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let path = data.join("users");
        let me = std::fs::metadata(&data).unwrap().uid();
        // As root the directory can belong to a service user, as it does under systemd.
        let owner = if me == 0 { 65534 } else { me };
        if me == 0 {
            std::os::unix::fs::chown(&data, Some(owner), Some(owner)).unwrap();
        }
        write_users(&path, &[("alice".into(), "hash".into())]).unwrap();
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!(m.uid(), owner);
        if me == 0 {
            assert_eq!(m.gid(), owner);
        }
        assert_eq!(m.mode() & 0o777, 0o600);
    }

    #[test]
    fn users_roundtrip_and_verify() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        let mut memory = HashMemory::new();
        assert!(
            !verify(&path, "alice", "pw", &mut memory),
            "no file, no users"
        );
        write_users(&path, &[("alice".into(), hash_password("s3cret").unwrap())]).unwrap();
        assert!(verify(&path, "alice", "s3cret", &mut memory));
        assert!(!verify(&path, "alice", "wrong", &mut memory));
        assert!(!verify(&path, "bob", "s3cret", &mut memory));
        // The memory is kept for the next check, at the hash's size.
        assert_eq!(memory.len(), 19456);
        // Other parameters and algorithms are honoured, in the same memory.
        let other = Argon2::new(
            Algorithm::Argon2i,
            Version::V0x10,
            Params::new(4096, 3, 2, Some(24)).unwrap(),
        );
        let salt = SaltString::generate(&mut OsRng);
        let text = other.hash_password(b"pw2", &salt).unwrap().to_string();
        write_users(&path, &[("bob".into(), text)]).unwrap();
        assert!(verify(&path, "bob", "pw2", &mut memory));
        assert!(!verify(&path, "bob", "pw3", &mut memory));
        // A hash asking for more memory than the bound never matches.
        let costly = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(66 * 1024, 1, 1, None).unwrap(),
        );
        let text = costly.hash_password(b"pw", &salt).unwrap().to_string();
        write_users(&path, &[("carol".into(), text)]).unwrap();
        assert!(!verify(&path, "carol", "pw", &mut memory));
        assert_eq!(memory.len(), 19456);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn limiter_blocks_after_max() {
        let l = AuthLimiter::new(2, Duration::from_secs(60));
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        assert!(!l.blocked(ip));
        l.record_failure(ip);
        assert!(!l.blocked(ip));
        l.record_failure(ip);
        assert!(l.blocked(ip));
        assert!(!l.blocked("127.0.0.10".parse().unwrap()));
    }

    #[tokio::test]
    async fn hash_pool_bounds_parallel_hashing() {
        let pool = HashPool::new(2, 1, Duration::from_millis(50));
        let (a, b, c) = (
            "127.0.0.1".parse().unwrap(),
            "127.0.0.2".parse().unwrap(),
            "127.0.0.3".parse().unwrap(),
        );
        let s1 = pool.slot(a).await.unwrap();
        // One address gets its share only.
        assert!(pool.slot(a).await.is_none());
        let s2 = pool.slot(b).await.unwrap();
        // All permits busy: refused after the wait.
        assert!(pool.slot(c).await.is_none());
        drop(s1);
        let s3 = pool.slot(c).await.unwrap();
        drop((s2, s3));
        assert!(pool.slot(a).await.is_some());
    }

    #[test]
    fn usernames() {
        assert!(valid_username("alice@example.com"));
        assert!(!valid_username("a:b") && !valid_username("") && !valid_username("a b"));
    }
}
