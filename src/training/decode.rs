//! Many KV sessions decoding at once: decode steps of different sessions run
//! as one forward, and prompts run in chunks between decode batches.
//!
//! A decode step (one new position) of a session costs a read of every
//! weight; a batch of them reads the weights once for all rows
//! ([`Training::decode_batch`], the trunk's `decode_batch`), each row attending
//! over its own cache at its own length. A prompt (many positions) of a
//! session is computed in chunks ([`Training::run_chunked`]): between chunks
//! the engine puts the step back in its queue, so decode batches queued
//! meanwhile run first. While sessions are decoding, a chunk is sized to take
//! about three quarters of a decode batch (both are measured as they run), so
//! a long prompt delays each decode step by less than one batch, not by the
//! whole prompt.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prost::bytes::Bytes;
use tch::Tensor;

use super::sessions::{self, Handle};
use super::{SessionRequest, Step, Training, TrainingError, kv};
use crate::codec::{Encoding, RawTensor};
use crate::model::{self, Model};

/// Fewest positions in a chunk while sessions decode: below it, reading the
/// weights dominates and a chunk costs as much as a bigger one
/// (`--kv-prefill-chunk` may set a smaller chunk still).
const MIN_CHUNK: i64 = 8;
/// A chunk while sessions decode but no chunk was measured yet.
const FIRST_CHUNK: i64 = 32;
/// Sessions count as decoding for this long after a decode batch.
const DECODING_WINDOW: Duration = Duration::from_secs(1);

/// What one model's decode batches and prefill chunks took lately, to size chunks.
#[derive(Debug, Default)]
pub(super) struct Pacer {
    /// Moving average of a decode batch's microseconds.
    decode_us: AtomicU64,
    /// When the last decode batch ended (ms since the training epoch, plus one; 0: never).
    decoded_at_ms: AtomicU64,
    /// Moving average of a prefill chunk's nanoseconds per position.
    prefill_ns_per_position: AtomicU64,
}

fn average(a: &AtomicU64, sample: u64) {
    let old = a.load(Ordering::Relaxed);
    let new = if old == 0 {
        sample
    } else {
        (3 * old + sample) / 4
    };
    a.store(new.max(1), Ordering::Relaxed);
}

/// A session step's prompt, partly computed: what the step carries between chunks.
pub struct Prefill {
    handle: Handle,
    /// A step of a session held in the store (taken out for this step), not a new one.
    existing: bool,
    owner: u64,
    /// The step's whole input, `[batch, positions, width]`.
    x: Tensor,
    /// Positions of `x` computed so far.
    done: i64,
    /// The session's cache (with room: [`sessions::append`]) and its valid length.
    cache: Vec<Tensor>,
    past_len: i64,
    /// The chunks' outputs, in order.
    outputs: Vec<Tensor>,
    want_present: bool,
    /// Time spent in the chunks' forwards.
    compute: Duration,
}

/// A session step's progress: its result, or a prompt with chunks left.
pub enum Chunked {
    Done(Result<(RawTensor, Vec<RawTensor>), TrainingError>),
    More(Box<Prefill>),
}

/// One row of a decode batch: a session step of one position.
pub struct DecodeRow<'a> {
    pub hidden: &'a RawTensor,
    pub enc: Encoding,
    pub handle: Handle,
    /// The past length the request's handle says.
    pub sent_len: i64,
    pub owner: u64,
    pub want_present: bool,
}

/// What a decode batch was, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct DecodeBatch {
    /// Rows computed in the one forward.
    pub rows: usize,
    /// Its rows had different past lengths.
    pub mixed: bool,
}

type StepResult = Result<(RawTensor, Vec<RawTensor>), TrainingError>;

/// The reply's `present_key_values` for a session: its handle at `past_len`.
fn handle_reply(handle: Handle, past_len: i64, out: &RawTensor) -> Vec<RawTensor> {
    (0..sessions::HANDLE_ENTRIES)
        .flat_map(|i| {
            let shape = handle.entry_shape(i, past_len);
            let empty = |shape: Vec<i64>| RawTensor {
                data: Bytes::new(),
                shape,
                dtype: out.dtype,
            };
            [empty(shape.clone()), empty(shape)]
        })
        .collect()
}

impl Training {
    fn sessions_on(&self, index: usize) -> bool {
        self.config.kv_sessions.get(index).copied().unwrap_or(false)
    }

    /// The decode row a job is, when it can join a decode batch: a session's
    /// step of one position for one sequence, on a model with sessions on
    /// whose trunk decodes in batches. Plain Rust (io threads call it).
    pub fn decode_row<'a>(
        &self,
        index: usize,
        model: &Model,
        step: &Step,
        input: &'a RawTensor,
        enc: Encoding,
    ) -> Option<DecodeRow<'a>> {
        let Step::Kv {
            want_present,
            session:
                Some(SessionRequest {
                    handle: Some((handle, sent_len)),
                    owner,
                }),
            ..
        } = step
        else {
            return None;
        };
        let one = matches!(input.shape[..], [1, 1, w] if w > 0);
        (one && model.kv_batch() && self.sessions_on(index)).then_some(DecodeRow {
            hidden: input,
            enc,
            handle: *handle,
            sent_len: *sent_len,
            owner: *owner,
            want_present: *want_present,
        })
    }

    /// Positions the next prefill chunk of model `index` may take: at most
    /// `--kv-prefill-chunk`; while sessions decode, about 3/4 of a decode batch's time.
    fn chunk_len(&self, index: usize) -> i64 {
        let most = self.config.sessions.prefill_chunk.max(1);
        let Some(p) = self.pacing.get(index) else {
            return most;
        };
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let at = p.decoded_at_ms.load(Ordering::Relaxed);
        if at == 0 || now.saturating_sub(at) > DECODING_WINDOW.as_millis() as u64 {
            return most;
        }
        let per = p.prefill_ns_per_position.load(Ordering::Relaxed);
        if per == 0 {
            return FIRST_CHUNK.min(most);
        }
        let budget_ns = p.decode_us.load(Ordering::Relaxed).saturating_mul(750);
        ((budget_ns / per) as i64).clamp(MIN_CHUNK.min(most), most)
    }

    /// A step as [`Training::run`] runs it, except that a session step of many
    /// positions computes one chunk and returns [`Chunked::More`]; pass that
    /// back as `resume` (with the same step) for the next chunk.
    pub fn run_chunked(
        &self,
        index: usize,
        model: &Model,
        step: &Step,
        input: &RawTensor,
        enc: Encoding,
        resume: Option<Box<Prefill>>,
    ) -> Chunked {
        if let Some(p) = resume {
            return self.prefill_chunk(index, model, enc, p);
        }
        match step {
            Step::Kv {
                past,
                kv_enc,
                want_present,
                session: Some(request),
            } if self.sessions_on(index) => self.session_start(
                index,
                model,
                (input, enc),
                (past, *kv_enc),
                *request,
                *want_present,
            ),
            _ => Chunked::Done(self.run(index, model, step, input, enc)),
        }
    }

    /// A KV step on a model with sessions, all its chunks at once.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn session_step(
        &self,
        index: usize,
        model: &Model,
        hidden: &RawTensor,
        enc: Encoding,
        past: &[RawTensor],
        kv_enc: Encoding,
        request: SessionRequest,
        want_present: bool,
    ) -> StepResult {
        let mut c = self.session_start(
            index,
            model,
            (hidden, enc),
            (past, kv_enc),
            request,
            want_present,
        );
        loop {
            match c {
                Chunked::Done(r) => return r,
                Chunked::More(p) => c = self.prefill_chunk(index, model, enc, p),
            }
        }
    }

    /// Starts a session step: the cache comes out of the store (or a new
    /// session begins), then the first chunk runs.
    fn session_start(
        &self,
        index: usize,
        model: &Model,
        (hidden, enc): (&RawTensor, Encoding),
        (past, kv_enc): (&[RawTensor], Encoding),
        request: SessionRequest,
        want_present: bool,
    ) -> Chunked {
        // Everything that can fail on the request runs before the cache is taken.
        let x = match model::raw_to_tensor(model, hidden, enc) {
            Ok(x) => x,
            Err(e) => return Chunked::Done(Err(e.into())),
        };
        let (handle, existing, cache, past_len) = match request.handle {
            Some((handle, sent_len)) => {
                match self
                    .sessions
                    .take(handle, sent_len, index, request.owner, &self.config.names)
                {
                    Ok(cache) => (handle, true, cache, sent_len),
                    Err(e) => return Chunked::Done(Err(e.into())),
                }
            }
            // A real cache from the client: the step runs as without sessions.
            None if !past.is_empty() => {
                return Chunked::Done(kv(model, hidden, enc, past, kv_enc, want_present));
            }
            None => (Handle::random(), false, Vec::new(), 0),
        };
        self.prefill_chunk(
            index,
            model,
            enc,
            Box::new(Prefill {
                handle,
                existing,
                owner: request.owner,
                x,
                done: 0,
                cache,
                past_len,
                outputs: Vec::new(),
                want_present,
                compute: Duration::ZERO,
            }),
        )
    }

    /// Gives a failed step's session back unchanged (its valid positions are
    /// the ones before the step), so the client may retry it.
    fn give_back(&self, p: Prefill) {
        if p.existing {
            self.sessions.restore(p.handle, p.cache);
        }
    }

    /// Runs the next chunk of a session step; the last one answers it.
    fn prefill_chunk(
        &self,
        index: usize,
        model: &Model,
        enc: Encoding,
        mut p: Box<Prefill>,
    ) -> Chunked {
        let total = p.x.size().get(1).copied().unwrap_or(0);
        let n = (total - p.done).min(self.chunk_len(index)).max(0);
        let started = Instant::now();
        let ran =
            p.x.f_narrow(1, p.done, n)
                .and_then(|part| Ok((part, sessions::views(&p.cache, p.past_len)?)))
                .map_err(|e| TrainingError::Model(model::internal(model, e)))
                .and_then(|(part, past)| Ok(model.forward_kv(&part, past)?));
        let (y, present) = match ran {
            Ok(r) => r,
            Err(e) => {
                self.give_back(*p);
                return Chunked::Done(Err(e));
            }
        };
        // A model served without a warm-up learns here (from an input it
        // accepted) whether later decode steps can batch.
        model.learn_kv_batch(&p.x);
        let end = p.past_len + n;
        let cache = std::mem::take(&mut p.cache);
        p.cache = match sessions::append(cache, &present, p.past_len, end) {
            Ok(c) => c,
            Err(e) => {
                // The cache moved into `append` and is gone: so is the session.
                if p.existing {
                    drop(self.sessions.end(p.handle));
                }
                return Chunked::Done(Err(TrainingError::Model(model::internal(model, e))));
            }
        };
        drop(present);
        let took = started.elapsed();
        p.compute += took;
        if let Some(pacer) = self.pacing.get(index)
            && n > 1
        {
            average(
                &pacer.prefill_ns_per_position,
                took.as_nanos() as u64 / n as u64,
            );
        }
        p.past_len = end;
        p.done += n;
        p.outputs.push(y);
        if p.done < total {
            if p.existing {
                self.sessions.keep_alive(p.handle);
            }
            return Chunked::More(p);
        }
        Chunked::Done(self.finish(index, model, enc, *p, total))
    }

    /// Answers a session step whose positions are all computed.
    fn finish(
        &self,
        index: usize,
        model: &Model,
        enc: Encoding,
        mut p: Prefill,
        positions: i64,
    ) -> StepResult {
        let y = if p.outputs.len() == 1 {
            p.outputs.pop().ok_or_else(|| {
                TrainingError::BadRequest("a KV step needs at least one position".into())
            })
        } else {
            Tensor::f_cat(&p.outputs, 1).map_err(|e| model::internal(model, e).into())
        };
        let out = match y.and_then(|y| Ok(model::from_tensor(model, &y, enc)?)) {
            Ok(out) => out,
            Err(e) => {
                drop(self.sessions.end(p.handle));
                return Err(e);
            }
        };
        self.sessions.count_step(positions, p.compute);
        if !p.want_present {
            drop(self.sessions.end(p.handle));
            return Ok((out, Vec::new()));
        }
        drop(
            self.sessions
                .put(p.handle, index, p.owner, p.cache, p.past_len)?,
        );
        let reply = handle_reply(p.handle, p.past_len, &out);
        Ok((out, reply))
    }

    /// One forward for the decode steps of many sessions of model `index`.
    /// Each row's result is its own: a row whose session cannot run gets its
    /// error and the others run; if the batched forward fails, each row runs
    /// alone, so one bad row cannot fail its neighbours.
    pub fn decode_batch(
        &self,
        index: usize,
        model: &Model,
        rows: &[DecodeRow<'_>],
    ) -> (Vec<StepResult>, DecodeBatch) {
        let mut results: Vec<Option<StepResult>> = rows.iter().map(|_| None).collect();
        // (row, input, cache)
        let mut live: Vec<(usize, Tensor, Vec<Tensor>)> = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            let x = match model::raw_to_tensor(model, r.hidden, r.enc) {
                Ok(x) => x,
                Err(e) => {
                    results[i] = Some(Err(e.into()));
                    continue;
                }
            };
            let cache =
                match self
                    .sessions
                    .take(r.handle, r.sent_len, index, r.owner, &self.config.names)
                {
                    Ok(c) => c,
                    Err(e) => {
                        results[i] = Some(Err(e.into()));
                        continue;
                    }
                };
            match sessions::with_room(cache, r.sent_len, 1) {
                Ok(cache) => live.push((i, x, cache)),
                Err(e) => {
                    drop(self.sessions.end(r.handle));
                    results[i] = Some(Err(model::internal(model, e).into()));
                }
            }
        }
        let mut stats = DecodeBatch::default();
        if !live.is_empty() {
            let started = Instant::now();
            let lengths: Vec<i64> = live.iter().map(|(i, ..)| rows[*i].sent_len).collect();
            let xs: Vec<&Tensor> = live.iter().map(|(_, x, _)| x).collect();
            let caches: Vec<Tensor> = live
                .iter()
                .flat_map(|(.., c)| c.iter().map(Tensor::shallow_clone))
                .collect();
            let ran = Tensor::f_cat(&xs, 0)
                .map_err(|e| model::internal(model, e))
                .and_then(|x| model.forward_kv_batch(&x, caches, lengths.clone()));
            match ran {
                Ok(y) => {
                    let took = started.elapsed();
                    if let Some(pacer) = self.pacing.get(index) {
                        average(&pacer.decode_us, took.as_micros() as u64);
                        pacer.decoded_at_ms.store(
                            self.epoch.elapsed().as_millis() as u64 + 1,
                            Ordering::Relaxed,
                        );
                    }
                    stats = DecodeBatch {
                        rows: live.len(),
                        mixed: lengths.iter().any(|&l| l != lengths[0]),
                    };
                    for (b, (i, _, cache)) in live.into_iter().enumerate() {
                        let r = &rows[i];
                        let answer = y
                            .f_narrow(0, b as i64, 1)
                            .map_err(|e| model::internal(model, e))
                            .and_then(|y| model::from_tensor(model, &y, r.enc));
                        results[i] = Some(self.decoded(index, r, cache, answer, took));
                    }
                }
                Err(e) => {
                    // Nothing was stored: every session is as it was.
                    let alone = live.len() > 1;
                    for (i, _, cache) in live {
                        self.sessions.restore(rows[i].handle, cache);
                        results[i] = Some(if alone {
                            let (mut r, _) = self.decode_batch(index, model, &rows[i..=i]);
                            r.pop().unwrap_or_else(|| Err(e.clone().into()))
                        } else {
                            Err(e.clone().into())
                        });
                    }
                }
            }
        }
        let results = results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(TrainingError::BadRequest(
                        "a decode step was not computed".into(),
                    ))
                })
            })
            .collect();
        (results, stats)
    }

    /// Stores a decoded row's session one position longer and answers it.
    fn decoded(
        &self,
        index: usize,
        r: &DecodeRow<'_>,
        cache: Vec<Tensor>,
        answer: Result<RawTensor, model::ModelError>,
        took: Duration,
    ) -> StepResult {
        let out = match answer {
            Ok(out) => out,
            Err(e) => {
                drop(self.sessions.end(r.handle));
                return Err(e.into());
            }
        };
        self.sessions.count_step(1, took);
        if !r.want_present {
            drop(self.sessions.end(r.handle));
            return Ok((out, Vec::new()));
        }
        let past_len = r.sent_len + 1;
        drop(
            self.sessions
                .put(r.handle, index, r.owner, cache, past_len)?,
        );
        let reply = handle_reply(r.handle, past_len, &out);
        Ok((out, reply))
    }
}

/// Sessions tracked at most per model version by [`Decoders`]; a full table
/// forgets the ones idle for [`FORGET_AFTER`], then tracks no more.
const MAX_TRACKED: usize = 4096;
/// A session that sent no step for this long is forgotten when room is needed.
const FORGET_AFTER: Duration = Duration::from_secs(10);
/// Slack on top of twice a client's usual turn-around before it is given up
/// on for the batch being formed (a fast client's scheduling jitter).
const TURNAROUND_SLACK: Duration = Duration::from_millis(2);

/// The KV sessions of one model version that are decoding, so that a decode
/// batch waits for the sessions about to send their next step and for no
/// one else: a lone session never waits, and many sessions whose clients
/// answer at slightly different times merge into one batch instead of
/// settling into groups that alternate.
///
/// A session is expected once it has been answered and its client took a
/// turn-around before (the time from an answer to its next step): it is
/// expected until twice its usual turn-around (plus 2 ms) has passed since
/// its last answer. The engine updates it under its queue lock (arrivals)
/// and after a decode batch (answers).
#[derive(Debug, Default)]
pub struct Decoders {
    sessions: std::collections::HashMap<Handle, Pace>,
    /// Moving average of a decode batch's duration (forward and replies).
    batch_time: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Pace {
    /// When its last decode step was answered; None while one is queued or computing.
    answered: Option<Instant>,
    /// Moving average of its client's turn-around; zero until one was seen.
    turnaround: Duration,
}

fn blend(old: Duration, sample: Duration) -> Duration {
    if old.is_zero() {
        sample
    } else {
        (old * 3 + sample) / 4
    }
}

impl Decoders {
    /// A decode step of `handle` was queued at `now`.
    pub fn arrived(&mut self, handle: Handle, now: Instant) {
        if !self.sessions.contains_key(&handle) && self.sessions.len() >= MAX_TRACKED {
            self.sessions.retain(|_, p| {
                p.answered
                    .is_none_or(|t| now.saturating_duration_since(t) < FORGET_AFTER)
            });
            if self.sessions.len() >= MAX_TRACKED {
                return;
            }
        }
        let pace = self.sessions.entry(handle).or_insert(Pace {
            answered: None,
            turnaround: Duration::ZERO,
        });
        if let Some(t) = pace.answered.take() {
            pace.turnaround = blend(pace.turnaround, now.saturating_duration_since(t));
        }
    }

    /// A decode batch that took `took` answered these sessions at `now`:
    /// `true` for each one that goes on (its cache is kept), `false` for one
    /// that ended or failed (forgotten).
    pub fn answered(&mut self, rows: &[(Handle, bool)], took: Duration, now: Instant) {
        self.batch_time = blend(self.batch_time, took);
        for &(handle, goes_on) in rows {
            if !goes_on {
                self.sessions.remove(&handle);
            } else if let Some(p) = self.sessions.get_mut(&handle) {
                p.answered = Some(now);
            }
        }
    }

    /// Until when a decode batch being formed at `now` should wait for the
    /// sessions expected to send their next step: the latest such expected
    /// arrival, at most `longest` from now, or at most one decode batch's
    /// time when that is longer (a session that misses a batch waits for the
    /// whole next one, so waiting that long for it costs the others no more
    /// than it saves it). None when no session is expected.
    pub fn expected_until(&self, now: Instant, longest: Duration) -> Option<Instant> {
        let cap = now + longest.max(self.batch_time);
        self.sessions
            .values()
            .filter(|p| !p.turnaround.is_zero())
            .filter_map(|p| {
                let due = p.answered? + p.turnaround * 2 + TURNAROUND_SLACK;
                (due > now).then_some(due)
            })
            .max()
            .map(|due| due.min(cap))
    }

    /// Sessions tracked (for tests and bounds).
    pub fn tracked(&self) -> usize {
        self.sessions.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn handle(i: i32) -> Handle {
        Handle::of([i, 1, 1, 1])
    }

    /// One decode round: every session in `arrivals` (handle, ms after t0)
    /// arrives, then one batch answers them all at `answered_ms`.
    fn round(d: &mut Decoders, t0: Instant, arrivals: &[(i32, u64)], answered_ms: u64) {
        for &(h, at) in arrivals {
            d.arrived(handle(h), t0 + MS * at as u32);
        }
        let rows: Vec<_> = arrivals.iter().map(|&(h, _)| (handle(h), true)).collect();
        d.answered(&rows, MS * 10, t0 + MS * answered_ms as u32);
    }

    #[test]
    fn a_lone_session_is_never_waited_for() {
        let mut d = Decoders::default();
        let t0 = Instant::now();
        round(&mut d, t0, &[(1, 0)], 10);
        round(&mut d, t0, &[(1, 13)], 23);
        // Its own step is the batch: nobody else is expected.
        d.arrived(handle(1), t0 + MS * 26);
        assert_eq!(d.expected_until(t0 + MS * 26, MS * 2), None);
    }

    #[test]
    fn a_batch_waits_for_answered_sessions_until_they_arrive() {
        let mut d = Decoders::default();
        let t0 = Instant::now();
        // Sessions 1 and 2 come back 3 and 8 ms after each answer.
        round(&mut d, t0, &[(1, 0), (2, 0)], 10);
        round(&mut d, t0, &[(1, 13), (2, 18)], 28);
        d.arrived(handle(1), t0 + MS * 31);
        // Session 2 is due 2 x 8 ms + 2 ms after the answer at 28 ms.
        assert_eq!(d.expected_until(t0 + MS * 31, MS * 20), Some(t0 + MS * 46));
        d.arrived(handle(2), t0 + MS * 36);
        assert_eq!(d.expected_until(t0 + MS * 36, MS * 20), None);
    }

    #[test]
    fn a_session_that_stopped_is_given_up_once_its_turnaround_passed() {
        let mut d = Decoders::default();
        let t0 = Instant::now();
        round(&mut d, t0, &[(1, 0), (2, 0)], 10);
        round(&mut d, t0, &[(1, 12), (2, 12)], 20);
        // Session 2 does not come back: due at 20 + 2 x 2 + 2 ms.
        d.arrived(handle(1), t0 + MS * 22);
        assert_eq!(d.expected_until(t0 + MS * 22, MS), Some(t0 + MS * 26));
        assert_eq!(d.expected_until(t0 + MS * 26, MS), None);
    }

    #[test]
    fn the_wait_is_capped_by_the_window_or_one_batch_time() {
        let mut d = Decoders::default();
        let t0 = Instant::now();
        // A slow client: 500 ms from an answer to its next step.
        round(&mut d, t0, &[(1, 0), (2, 0)], 10);
        round(&mut d, t0, &[(1, 11), (2, 510)], 520);
        d.arrived(handle(1), t0 + MS * 521);
        let now = t0 + MS * 521;
        // Batches took 10 ms: the window (2 ms) is shorter, so 10 ms.
        assert_eq!(d.expected_until(now, MS * 2), Some(now + MS * 10));
        assert_eq!(d.expected_until(now, MS * 50), Some(now + MS * 50));
    }

    #[test]
    fn ended_sessions_are_forgotten_and_the_table_is_bounded() {
        let mut d = Decoders::default();
        let t0 = Instant::now();
        round(&mut d, t0, &[(1, 0), (2, 0)], 10);
        d.answered(&[(handle(2), false)], MS, t0 + MS * 11);
        assert_eq!(d.tracked(), 1);
        for i in 0..(MAX_TRACKED as i32 + 10) {
            d.arrived(handle(100 + i), t0);
        }
        assert_eq!(d.tracked(), MAX_TRACKED);
        // Sessions idle past FORGET_AFTER make room.
        let later = t0 + FORGET_AFTER + MS;
        let all: Vec<_> = (0..MAX_TRACKED as i32)
            .map(|i| (handle(100 + i), true))
            .collect();
        d.answered(&all, MS, t0 + MS);
        d.arrived(handle(99), later);
        assert!(d.tracked() < MAX_TRACKED);
    }
}
