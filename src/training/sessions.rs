//! KV sessions: the decoding cache of a sequence stays on the server between
//! steps, and the client holds only a handle.
//!
//! An unchanged splitlearn_comm client sends `use_cache=true`, takes
//! `present_key_values` from the reply and sends it back as `past_key_values`
//! without looking inside. For a model with sessions on, the reply's
//! `present_key_values` is therefore a handle that the client's codec decodes
//! and re-encodes as it is: [`HANDLE_ENTRIES`] entries with zero elements whose
//! shapes `[0, a, past_len, b]` carry 80 random bits (the `a`s and `b`s, 20 bits
//! each) and the true past length where Hugging Face code reads it (dimension 2
//! of a key). 20 bits a dimension keep the shape's product of non-zero
//! dimensions far below what numpy accepts for an empty array's shape.
//! The bytes per decode step are the new hidden state, whatever the context.
//!
//! The store is bounded in bytes (`--kv-cache-bytes`, least recently used
//! first), sessions idle past `--kv-session-ttl` are dropped, a handle is bound
//! to the token identity that opened it, and a session runs one step at a
//! time. A handle the store does not hold (unknown, evicted, expired, another
//! identity's) is FAILED_PRECONDITION: restart from the prompt. Tensors are
//! only freed on worker threads (the callers of this module).
//!
//! Each session's cache is preallocated with room to grow ([`with_room`]): a
//! key or value is `[batch, kv heads, capacity, head dim]`, of which the first
//! `past_len` positions are valid. A decode step writes its one new position
//! in place, and a batch of decode steps passes every row's own cache to the
//! model as it is, so assembling a batch copies no cache; a cache is copied
//! only when it grows past its capacity (by a quarter plus 64 positions, so
//! rarely) or when a prefill chunk appends many positions.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tch::Tensor;

/// Entries in a handle: two, each with two random dimensions of [`HANDLE_BITS`].
pub const HANDLE_ENTRIES: usize = 2;

/// Random bits in each of a handle's four dimensions.
pub const HANDLE_BITS: u32 = 20;

/// Bytes a session is charged beyond its tensors, so that many tiny sessions
/// are bounded too.
const SESSION_OVERHEAD_BYTES: u64 = 4096;

/// What a session store is started with.
#[derive(Debug, Clone, Copy)]
pub struct SessionConfig {
    /// Most bytes of caches held for all sessions together (`--kv-cache-bytes`).
    pub max_bytes: u64,
    /// A session idle this long is dropped (`--kv-session-ttl`).
    pub ttl: Duration,
    /// Most positions of a prompt computed in one forward (`--kv-prefill-chunk`).
    pub prefill_chunk: i64,
}

/// The unguessable part of a handle: four values of [`HANDLE_BITS`] bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Handle([i32; 4]);

impl Handle {
    /// A handle of chosen values, for tests of what keys on handles.
    #[cfg(test)]
    pub(crate) fn of(words: [i32; 4]) -> Handle {
        Handle(words)
    }

    /// A new random handle (80 bits from the OS generator, via uuid v4).
    pub fn random() -> Handle {
        let b = uuid::Uuid::new_v4().into_bytes();
        let word = |i: usize| {
            let v = u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]);
            // Never 0, so that no dimension of a handle is empty but the first.
            ((v & ((1 << HANDLE_BITS) - 1)).max(1)) as i32
        };
        Handle([word(0), word(1), word(2), word(3)])
    }

    /// The shape of handle entry `i` (its key and its value) for a past length.
    pub fn entry_shape(&self, i: usize, past_len: i64) -> Vec<i64> {
        vec![
            0,
            i64::from(self.0[2 * i]),
            past_len,
            i64::from(self.0[2 * i + 1]),
        ]
    }

    /// Reads a handle from `past_key_values`' (key shape, value shape, bytes)
    /// per entry: None unless it has exactly the handle's form.
    pub fn parse(entries: &[(&[i32], &[i32], usize)]) -> Option<(Handle, i64)> {
        if entries.len() != HANDLE_ENTRIES {
            return None;
        }
        let mut words = [0i32; 4];
        let mut past_len = None;
        for (i, (key, value, bytes)) in entries.iter().enumerate() {
            let &[0, a, len, b] = *key else {
                return None;
            };
            let max = 1 << HANDLE_BITS;
            if key != value
                || *bytes != 0
                || !(1..max).contains(&a)
                || !(1..max).contains(&b)
                || len < 0
            {
                return None;
            }
            if past_len.is_some_and(|l| l != len) {
                return None;
            }
            past_len = Some(len);
            words[2 * i] = a;
            words[2 * i + 1] = b;
        }
        past_len.map(|l| (Handle(words), i64::from(l)))
    }
}

/// Positions a cache of `needed` positions is given room for: a quarter more
/// plus 64, rounded up to 64, so that growing (a copy of the cache) is rare
/// and the memory not yet used is bounded.
pub fn capacity_for(needed: i64) -> i64 {
    let want = needed + needed / 4 + 64;
    (want + 63) / 64 * 64
}

/// The cache with room for `room` more positions after its first `len`: the
/// same tensors when they have it, else new ones of [`capacity_for`] with the
/// valid positions copied.
pub fn with_room(cache: Vec<Tensor>, len: i64, room: i64) -> Result<Vec<Tensor>, tch::TchError> {
    cache
        .into_iter()
        .map(|t| {
            let size = t.size();
            if size.len() != 4 || size[2] >= len + room {
                return Ok(t);
            }
            let grown = Tensor::f_zeros(
                [size[0], size[1], capacity_for(len + room), size[3]],
                (t.kind(), t.device()),
            )?;
            grown
                .f_narrow(2, 0, len)?
                .f_copy_(&t.f_narrow(2, 0, len)?)?;
            Ok(grown)
        })
        .collect()
}

/// Stores positions `from..to` of `present` (a forward's whole cache) in the
/// session's cache, growing it when needed; an empty cache (a new session) is
/// allocated with room to decode.
pub fn append(
    cache: Vec<Tensor>,
    present: &[Tensor],
    from: i64,
    to: i64,
) -> Result<Vec<Tensor>, tch::TchError> {
    if cache.is_empty() {
        return present
            .iter()
            .map(|t| {
                let s = t.size();
                let stored = Tensor::f_zeros(
                    [s[0], s[1], capacity_for(to + 1), s[3]],
                    (t.kind(), t.device()),
                )?;
                stored.f_narrow(2, 0, to)?.f_copy_(&t.f_narrow(2, 0, to)?)?;
                Ok(stored)
            })
            .collect();
    }
    let cache = with_room(cache, from, to - from + 1)?;
    for (stored, t) in cache.iter().zip(present) {
        stored
            .f_narrow(2, from, to - from)?
            .f_copy_(&t.f_narrow(2, from, to - from)?)?;
    }
    Ok(cache)
}

/// The valid first `len` positions of a cache, as views (no copy).
pub fn views(cache: &[Tensor], len: i64) -> Result<Vec<Tensor>, tch::TchError> {
    cache.iter().map(|t| t.f_narrow(2, 0, len)).collect()
}

/// Why a session step cannot run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SessionError {
    #[error(
        "this KV session is not held by the server (unknown, expired after --kv-session-ttl, \
         evicted to stay under --kv-cache-bytes, or the server restarted): restart decoding from \
         the prompt with an empty past_key_values"
    )]
    Unknown,
    #[error(
        "this KV session's past has {held} positions but the request's handle says {sent}: the \
         session moved on (a step was computed whose reply was lost); restart decoding from the prompt"
    )]
    Moved { held: i64, sent: i64 },
    #[error(
        "past_key_values is a KV session handle, but model {model:?} keeps no sessions \
         (--kv-sessions): restart decoding from the prompt"
    )]
    NotEnabled { model: String },
    #[error("a step of this KV session is already running: send one step at a time per session")]
    Busy,
    #[error("this KV session belongs to model {owner:?}, not {requested:?}")]
    WrongModel { owner: String, requested: String },
    #[error(
        "the KV cache of this session takes {bytes} bytes, more than --kv-cache-bytes {limit}; \
         the session was ended"
    )]
    TooLarge { bytes: u64, limit: u64 },
}

/// Counters for metrics and GetServiceInfo; gauges say so.
#[derive(Debug, Default)]
pub struct SessionStats {
    /// Gauge: sessions held.
    pub open: AtomicU64,
    /// Gauge: bytes of their caches, as the store counts them.
    pub bytes: AtomicU64,
    pub created: AtomicU64,
    pub evicted: AtomicU64,
    pub expired: AtomicU64,
    /// Sessions the client ended (a step with use_cache=false).
    pub ended: AtomicU64,
    /// Positions computed by session steps (prefill and decode).
    pub tokens: AtomicU64,
    /// Decode steps (one new position) and their total seconds.
    pub decode_steps: AtomicU64,
    pub decode_micros: AtomicU64,
}

impl SessionStats {
    /// (event label, count) pairs, as `splitserve_kv_session_events_total` names them.
    pub fn events(&self) -> [(&'static str, u64); 4] {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        [
            ("created", load(&self.created)),
            ("evicted", load(&self.evicted)),
            ("expired", load(&self.expired)),
            ("ended", load(&self.ended)),
        ]
    }
}

struct Session {
    /// The model index (engine order) that computed it.
    model: usize,
    /// The token identity that opened it (0 without authentication).
    owner: u64,
    /// `[key_0, value_0, ...]`; None while a step holds it.
    cache: Option<Vec<Tensor>>,
    past_len: i64,
    bytes: u64,
    last_used: Instant,
    tick: u64,
}

#[derive(Default)]
struct Store {
    sessions: HashMap<Handle, Session>,
    /// tick -> handle, least recently used first.
    lru: BTreeMap<u64, Handle>,
    next_tick: u64,
    bytes: u64,
}

impl Store {
    fn remove(&mut self, h: &Handle) -> Option<Session> {
        let s = self.sessions.remove(h)?;
        self.lru.remove(&s.tick);
        self.bytes -= s.bytes;
        Some(s)
    }

    fn touch(&mut self, h: Handle) {
        let tick = self.next_tick;
        if let Some(s) = self.sessions.get_mut(&h) {
            self.lru.remove(&s.tick);
            s.tick = tick;
            s.last_used = Instant::now();
            self.lru.insert(tick, h);
            self.next_tick += 1;
        }
    }
}

/// The sessions of an engine's models.
pub struct Sessions {
    config: SessionConfig,
    store: Mutex<Store>,
    stats: SessionStats,
}

fn lock(m: &Mutex<Store>) -> MutexGuard<'_, Store> {
    // Every critical section leaves the store consistent between statements.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn cache_bytes(cache: &[Tensor]) -> u64 {
    SESSION_OVERHEAD_BYTES
        + cache
            .iter()
            .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as u64)
            .sum::<u64>()
}

impl Sessions {
    pub fn new(config: SessionConfig) -> Sessions {
        Sessions {
            config,
            store: Mutex::new(Store::default()),
            stats: SessionStats::default(),
        }
    }

    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    fn publish(&self, store: &Store) {
        self.stats
            .open
            .store(store.sessions.len() as u64, Ordering::Relaxed);
        self.stats.bytes.store(store.bytes, Ordering::Relaxed);
    }

    /// Takes a session's cache out for one step. `names` names models for messages.
    pub fn take(
        &self,
        handle: Handle,
        sent_len: i64,
        model: usize,
        owner: u64,
        names: &[String],
    ) -> Result<Vec<Tensor>, SessionError> {
        let mut store = lock(&self.store);
        let Some(s) = store.sessions.get_mut(&handle) else {
            return Err(SessionError::Unknown);
        };
        // Another identity's handle reads as unknown: it says nothing about it.
        if s.owner != owner {
            return Err(SessionError::Unknown);
        }
        if s.model != model {
            let name = |i: usize| names.get(i).cloned().unwrap_or_default();
            return Err(SessionError::WrongModel {
                owner: name(s.model),
                requested: name(model),
            });
        }
        if s.past_len != sent_len {
            return Err(SessionError::Moved {
                held: s.past_len,
                sent: sent_len,
            });
        }
        let cache = s.cache.take().ok_or(SessionError::Busy)?;
        store.touch(handle);
        Ok(cache)
    }

    /// Puts a session's cache back after a step (or stores a new session),
    /// evicting the least recently used idle sessions to stay within the budget.
    /// Returns the evicted caches, to be dropped by the caller outside the lock.
    pub fn put(
        &self,
        handle: Handle,
        model: usize,
        owner: u64,
        cache: Vec<Tensor>,
        past_len: i64,
    ) -> Result<Vec<Vec<Tensor>>, SessionError> {
        let bytes = cache_bytes(&cache);
        let mut store = lock(&self.store);
        let is_new = !store.sessions.contains_key(&handle);
        let old = store.remove(&handle);
        let mut dropped: Vec<Vec<Tensor>> = old.and_then(|s| s.cache).into_iter().collect();
        if bytes > self.config.max_bytes {
            self.publish(&store);
            return Err(SessionError::TooLarge {
                bytes,
                limit: self.config.max_bytes,
            });
        }
        while store.bytes + bytes > self.config.max_bytes {
            // Sessions in the middle of a step are not evicted; the rest in LRU order.
            let victim = store
                .lru
                .values()
                .copied()
                .find(|h| store.sessions.get(h).is_some_and(|s| s.cache.is_some()));
            let Some(victim) = victim else { break };
            if let Some(s) = store.remove(&victim) {
                dropped.extend(s.cache);
                self.stats.evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
        let tick = store.next_tick;
        store.next_tick += 1;
        store.lru.insert(tick, handle);
        store.bytes += bytes;
        store.sessions.insert(
            handle,
            Session {
                model,
                owner,
                cache: Some(cache),
                past_len,
                bytes,
                last_used: Instant::now(),
                tick,
            },
        );
        if is_new {
            self.stats.created.fetch_add(1, Ordering::Relaxed);
        }
        self.publish(&store);
        Ok(dropped)
    }

    /// Ends a session (the client asked for no cache, or its step failed for good).
    pub fn end(&self, handle: Handle) -> Option<Vec<Tensor>> {
        let mut store = lock(&self.store);
        let s = store.remove(&handle);
        self.publish(&store);
        if s.is_some() {
            self.stats.ended.fetch_add(1, Ordering::Relaxed);
        }
        s.and_then(|s| s.cache)
    }

    /// Gives a cache back unchanged after a step that failed.
    pub fn restore(&self, handle: Handle, cache: Vec<Tensor>) {
        let mut store = lock(&self.store);
        if let Some(s) = store.sessions.get_mut(&handle) {
            s.cache = Some(cache);
        }
    }

    /// Marks a session used now: a prefill computed in chunks calls it between
    /// chunks, so that its session (taken, not idle) does not expire.
    pub fn keep_alive(&self, handle: Handle) {
        lock(&self.store).touch(handle);
    }

    /// Drops sessions idle past the TTL; returns their caches (worker threads drop them).
    /// A session taken by a step and not touched for the TTL is dropped too: its
    /// step was abandoned (a chunked prefill whose client left), and a step that
    /// does finish later stores it again.
    pub fn expire(&self) -> Vec<Vec<Tensor>> {
        let mut store = lock(&self.store);
        let now = Instant::now();
        let expired: Vec<Handle> = store
            .sessions
            .iter()
            .filter(|(_, s)| now.duration_since(s.last_used) > self.config.ttl)
            .map(|(h, _)| *h)
            .collect();
        let mut dropped = Vec::new();
        for h in expired {
            if let Some(s) = store.remove(&h) {
                dropped.extend(s.cache);
                self.stats.expired.fetch_add(1, Ordering::Relaxed);
            }
        }
        if !dropped.is_empty() {
            self.publish(&store);
        }
        dropped
    }

    /// Counts a step's positions; a one-position step is a decode step.
    pub fn count_step(&self, positions: i64, took: Duration) {
        self.stats
            .tokens
            .fetch_add(positions.max(0) as u64, Ordering::Relaxed);
        if positions == 1 {
            self.stats.decode_steps.fetch_add(1, Ordering::Relaxed);
            self.stats
                .decode_micros
                .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes(h: &Handle, len: i64) -> Vec<Vec<i32>> {
        (0..HANDLE_ENTRIES)
            .map(|i| h.entry_shape(i, len).iter().map(|&d| d as i32).collect())
            .collect()
    }

    #[test]
    fn a_handle_round_trips_through_its_shapes_and_nothing_else_parses() {
        let h = Handle::random();
        assert_ne!(h, Handle::random());
        let s = shapes(&h, 17);
        let entries: Vec<(&[i32], &[i32], usize)> =
            s.iter().map(|x| (x.as_slice(), x.as_slice(), 0)).collect();
        assert_eq!(Handle::parse(&entries), Some((h, 17)));
        // A real cache (data present), a third entry, mismatched lengths: not a handle.
        let with_data: Vec<_> = s.iter().map(|x| (x.as_slice(), x.as_slice(), 4)).collect();
        assert_eq!(Handle::parse(&with_data), None);
        assert_eq!(Handle::parse(&entries[..1]), None);
        let other = shapes(&h, 18);
        assert_eq!(
            Handle::parse(&[entries[0], (&other[1], &other[1], 0)]),
            None
        );
    }

    #[test]
    fn the_store_evicts_least_recently_used_and_binds_owners() {
        let one = || vec![Tensor::zeros([256], (tch::Kind::Float, tch::Device::Cpu))];
        let per = cache_bytes(&one());
        let s = Sessions::new(SessionConfig {
            max_bytes: 2 * per,
            ttl: Duration::from_secs(60),
            prefill_chunk: 512,
        });
        let names = vec!["m".to_string()];
        let (a, b, c) = (Handle::random(), Handle::random(), Handle::random());
        s.put(a, 0, 7, one(), 1).unwrap();
        s.put(b, 0, 7, one(), 1).unwrap();
        // a is used again, so b is the least recently used when c arrives.
        let cache = s.take(a, 1, 0, 7, &names).unwrap();
        assert_eq!(s.take(a, 1, 0, 7, &names).unwrap_err(), SessionError::Busy);
        s.put(a, 0, 7, cache, 2).unwrap();
        s.put(c, 0, 7, one(), 1).unwrap();
        assert_eq!(
            s.take(b, 1, 0, 7, &names).unwrap_err(),
            SessionError::Unknown
        );
        assert_eq!(s.stats().evicted.load(Ordering::Relaxed), 1);
        // Another identity cannot use a's handle; a stale length is refused.
        assert_eq!(
            s.take(a, 2, 0, 8, &names).unwrap_err(),
            SessionError::Unknown
        );
        assert!(matches!(
            s.take(a, 1, 0, 7, &names).unwrap_err(),
            SessionError::Moved { held: 2, sent: 1 }
        ));
        assert!(s.take(a, 2, 0, 7, &names).is_ok());
        // A cache larger than the whole budget is refused.
        let big = vec![Tensor::zeros([4096], (tch::Kind::Float, tch::Device::Cpu))];
        assert!(matches!(
            s.put(Handle::random(), 0, 7, big, 1).unwrap_err(),
            SessionError::TooLarge { .. }
        ));
    }

    #[test]
    fn a_cache_grows_rarely_and_keeps_its_valid_positions() {
        let t = Tensor::arange(2 * 3 * 4, (tch::Kind::Float, tch::Device::Cpu)).view([1, 2, 3, 4]);
        // Room enough: the same storage, nothing copied.
        let same = with_room(vec![t.shallow_clone()], 2, 1).unwrap();
        assert_eq!(same[0].data_ptr(), t.data_ptr());
        let grown = with_room(vec![t.shallow_clone()], 3, 1).unwrap();
        assert_eq!(grown[0].size(), [1, 2, capacity_for(4), 4]);
        assert_eq!(
            views(&grown, 3).unwrap()[0],
            t,
            "the valid positions are copied as they were"
        );
        // Growing from a decode step's length by one gives room for many more.
        assert!(capacity_for(4) >= 64 && capacity_for(1000) >= 1250);
        assert_eq!(capacity_for(1000) % 64, 0);
    }
}
