//! Texts whose judge answers could not be parsed. A text is asked in rounds of
//! `unparseable_budget` calls (back to the queue at once between the calls of a
//! round). When a whole round was unparseable it waits, unlabelled (reward 0), and is
//! asked again in a later round: `unparseable_retry_ms` after the first round,
//! doubling after each further one, for at most `unparseable_retries` later rounds.
//! Only after the last is it stored as unparseable, which never counts as helpful.
//! A parsed answer settles the text whatever came before.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::time::Instant;

/// The longest a text waits between two rounds.
pub const MAX_RETRY_WAIT: Duration = Duration::from_secs(3600);

/// What happens to a text after an unparseable answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Its round is not over: ask again now.
    AskAgain,
    /// The round is over: it waits until then, unlabelled.
    Wait(Instant),
    /// The last round is over: store it as unparseable, with the judge calls it took.
    GiveUp { calls: u32 },
}

/// Judge calls a text has had so far.
#[derive(Debug, Default, Clone, Copy)]
struct Tries {
    calls: u32,
    in_round: u32,
    rounds: u32,
}

pub struct RetryWait {
    budget: u32,
    retries: u32,
    first_wait: Duration,
    /// Texts with at least one unparseable answer that are not settled yet.
    tries: HashMap<String, Tries>,
    /// Waiting texts by when their next round starts (the counter keeps keys unique).
    waiting: BTreeMap<(Instant, u64), String>,
    seq: u64,
}

impl RetryWait {
    /// `budget` calls a round (at least 1), `retries` later rounds, the first
    /// waiting `first_wait`.
    pub fn new(budget: u32, retries: u32, first_wait: Duration) -> Self {
        Self {
            budget: budget.max(1),
            retries,
            first_wait,
            tries: HashMap::new(),
            waiting: BTreeMap::new(),
            seq: 0,
        }
    }

    /// The wait after the `round`-th unparseable round (1-based): doubles each round.
    pub fn wait_after(&self, round: u32) -> Duration {
        let factor = 1u32 << round.saturating_sub(1).min(20);
        self.first_wait
            .checked_mul(factor)
            .map_or(MAX_RETRY_WAIT, |d| d.min(MAX_RETRY_WAIT))
    }

    /// Counts an unparseable answer for `text`, asked at `now`.
    pub fn unparseable(&mut self, text: &str, now: Instant) -> Next {
        let t = self.tries.entry(text.to_string()).or_default();
        t.calls += 1;
        t.in_round += 1;
        if t.in_round < self.budget {
            return Next::AskAgain;
        }
        t.in_round = 0;
        t.rounds += 1;
        let (calls, rounds) = (t.calls, t.rounds);
        if rounds > self.retries {
            self.tries.remove(text);
            return Next::GiveUp { calls };
        }
        let due = now + self.wait_after(rounds);
        self.seq += 1;
        self.waiting.insert((due, self.seq), text.to_string());
        Next::Wait(due)
    }

    /// The judge answered for `text`: the calls it took, this one included; the text
    /// is forgotten.
    pub fn settle(&mut self, text: &str) -> u32 {
        self.tries.remove(text).map_or(0, |t| t.calls) + 1
    }

    /// Forgets `text` without a verdict (it left the service, e.g. shed from the queue).
    pub fn forget(&mut self, text: &str) {
        self.tries.remove(text);
    }

    /// The waiting texts whose next round starts at or before `now`; they stop waiting.
    pub fn take_due(&mut self, now: Instant) -> Vec<String> {
        let mut due = Vec::new();
        while let Some(entry) = self.waiting.first_entry() {
            if entry.key().0 > now {
                break;
            }
            due.push(entry.remove());
        }
        due
    }

    /// When the next waiting text is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.waiting.keys().next().map(|(t, _)| *t)
    }

    /// Texts waiting for a later round.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rounds_back_off_exponentially_and_end() {
        let mut r = RetryWait::new(2, 2, Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(r.unparseable("a", t0), Next::AskAgain);
        assert_eq!(
            r.unparseable("a", t0),
            Next::Wait(t0 + Duration::from_secs(10))
        );
        assert_eq!(r.waiting(), 1);
        assert!(r.take_due(t0 + Duration::from_secs(9)).is_empty());
        tokio::time::sleep(Duration::from_secs(10)).await;
        let t1 = Instant::now();
        assert_eq!(r.take_due(t1), vec!["a".to_string()]);
        assert_eq!(r.waiting(), 0);
        assert_eq!(r.unparseable("a", t1), Next::AskAgain);
        // the second wait is twice the first
        assert_eq!(
            r.unparseable("a", t1),
            Next::Wait(t1 + Duration::from_secs(20))
        );
        assert_eq!(r.next_due(), Some(t1 + Duration::from_secs(20)));
        let t2 = t1 + Duration::from_secs(20);
        assert_eq!(r.take_due(t2), vec!["a".to_string()]);
        assert_eq!(r.unparseable("a", t2), Next::AskAgain);
        // 2 later rounds spent: the sixth call gives up
        assert_eq!(r.unparseable("a", t2), Next::GiveUp { calls: 6 });
        assert_eq!(r.waiting(), 0);
        assert_eq!(r.next_due(), None);
        // and a text that comes back later starts afresh
        assert_eq!(r.settle("a"), 1);
    }

    #[test]
    fn a_parsed_answer_settles_with_every_call_counted() {
        let mut r = RetryWait::new(1, 3, Duration::from_secs(1));
        let now = Instant::now();
        assert!(matches!(r.unparseable("a", now), Next::Wait(_)));
        assert_eq!(r.take_due(now + Duration::from_secs(1)).len(), 1);
        assert_eq!(r.settle("a"), 2);
        assert_eq!(r.settle("b"), 1);
        // no retries: the first round's end is final
        let mut r = RetryWait::new(0, 0, Duration::from_secs(1));
        assert_eq!(r.unparseable("a", now), Next::GiveUp { calls: 1 });
    }

    #[test]
    fn waits_are_capped_and_ordered() {
        let r = RetryWait::new(1, 100, Duration::from_secs(60));
        assert_eq!(r.wait_after(1), Duration::from_secs(60));
        assert_eq!(r.wait_after(3), Duration::from_secs(240));
        assert_eq!(r.wait_after(99), MAX_RETRY_WAIT);
        let mut r = RetryWait::new(1, 5, Duration::from_secs(1));
        let now = Instant::now();
        r.unparseable("late", now + Duration::from_secs(5));
        r.unparseable("early", now);
        r.unparseable("same", now);
        assert_eq!(r.waiting(), 3);
        assert_eq!(
            r.take_due(now + Duration::from_secs(1)),
            vec!["early".to_string(), "same".to_string()]
        );
        r.forget("late");
        assert_eq!(r.take_due(now + Duration::from_secs(60)).len(), 1);
    }
}
