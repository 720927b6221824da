//! The label store: an embedded transactional database (redb) keyed by
//! (prompt version, text) for single-text labels and (prompt version, first text,
//! second text) for ranked pairs. Each record keeps the verdict, the judge's raw
//! answer, the judge's id and the time. A batch of labels is committed in one
//! durable transaction before any of it is published, and an existing label is
//! never overwritten, so a crash can lose at most labels nobody has seen yet.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition, TableHandle};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::ServiceError;

const LABELS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("labels");
const PAIRS: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("pairs");

/// One stored verdict of the judge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record<V> {
    /// The parsed verdict, or `None` when the judge's answers could not be parsed
    /// within the budget (counts as 0 reward, never positive).
    #[serde(alias = "helpful")]
    pub verdict: Option<V>,
    /// The judge's raw answer to the request that produced this label.
    pub raw_answer: String,
    /// Which judge answered (`rules:<file>` or `openai:<model>`).
    pub judge: String,
    /// Milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// Judge calls this text took.
    pub attempts: u32,
}

/// A single text's label: `Some(true)` helpful, `Some(false)` not helpful.
pub type LabelRecord = Record<bool>;

/// A ranked pair's preference: 1 when the first text shows more progress, 0 when the
/// second does, 0.5 for a tie.
pub type PairRecord = Record<f32>;

/// A ranked pair of texts, (first, second).
pub type Pair = (String, String);

impl LabelRecord {
    /// The retrieval model's reward for this label.
    pub fn value(&self) -> f32 {
        if self.verdict == Some(true) {
            1.0
        } else {
            0.0
        }
    }
}

pub struct LabelStore {
    db: Database,
    path: PathBuf,
}

impl LabelStore {
    pub fn open(path: &Path) -> Result<Self, ServiceError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let err = |e| store_error(path, e);
        let db = Database::create(path).map_err(|e| err(e.into()))?;
        // Make sure the table exists so readers never see "no such table".
        let txn = db.begin_write().map_err(|e| err(e.into()))?;
        txn.open_table(LABELS).map_err(|e| err(e.into()))?;
        txn.open_table(PAIRS).map_err(|e| err(e.into()))?;
        txn.commit().map_err(|e| err(e.into()))?;
        Ok(Self {
            db,
            path: path.to_path_buf(),
        })
    }

    fn err(&self, e: impl Into<redb::Error>) -> ServiceError {
        store_error(&self.path, e.into())
    }

    pub fn get(
        &self,
        prompt_version: &str,
        text: &str,
    ) -> Result<Option<LabelRecord>, ServiceError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(LABELS).map_err(|e| self.err(e))?;
        let Some(v) = table.get((prompt_version, text)).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        decode(v.value())
            .map(Some)
            .map_err(|source| ServiceError::Record {
                path: self.path.display().to_string(),
                source,
            })
    }

    /// Stores the labels that are not stored yet, in one durable transaction; returns
    /// those it added (an existing label is kept as it is).
    pub fn put_new(
        &self,
        prompt_version: &str,
        labels: Vec<(String, LabelRecord)>,
    ) -> Result<Vec<(String, LabelRecord)>, ServiceError> {
        self.put_new_in::<Labels>(prompt_version, labels)
    }

    /// Every label stored under `prompt_version`.
    pub fn all(&self, prompt_version: &str) -> Result<Vec<(String, LabelRecord)>, ServiceError> {
        self.all_in::<Labels>(prompt_version)
    }

    /// Stores the ranked pairs that are not stored yet, in one durable transaction;
    /// returns those it added.
    pub fn put_new_pairs(
        &self,
        prompt_version: &str,
        pairs: Vec<(Pair, PairRecord)>,
    ) -> Result<Vec<(Pair, PairRecord)>, ServiceError> {
        self.put_new_in::<Pairs>(prompt_version, pairs)
    }

    /// Every ranked pair stored under `prompt_version`.
    pub fn all_pairs(&self, prompt_version: &str) -> Result<Vec<(Pair, PairRecord)>, ServiceError> {
        self.all_in::<Pairs>(prompt_version)
    }

    fn put_new_in<T: Table>(
        &self,
        prompt_version: &str,
        entries: Vec<Entry<T>>,
    ) -> Result<Vec<Entry<T>>, ServiceError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        let mut added = Vec::with_capacity(entries.len());
        {
            let mut table = txn.open_table(T::TABLE).map_err(|e| self.err(e))?;
            for (item, record) in entries {
                let key = T::key(prompt_version, &item);
                if table.get(key).map_err(|e| self.err(e))?.is_some() {
                    continue;
                }
                table
                    .insert(T::key(prompt_version, &item), encode(&record).as_slice())
                    .map_err(|e| self.err(e))?;
                added.push((item, record));
            }
        }
        txn.commit().map_err(|e| self.err(e))?;
        Ok(added)
    }

    fn all_in<T: Table>(&self, prompt_version: &str) -> Result<Vec<Entry<T>>, ServiceError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(T::TABLE).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for entry in table
            .range(T::first(prompt_version)..)
            .map_err(|e| self.err(e))?
        {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            let (pv, item) = T::split(k.value());
            if pv != prompt_version {
                break;
            }
            match decode(v.value()) {
                Ok(r) => out.push((item, r)),
                Err(e) => tracing::warn!(
                    table = T::TABLE.name(),
                    item = ?item,
                    error = %e,
                    "skipping an unreadable record"
                ),
            }
        }
        Ok(out)
    }
}

/// A table of the store: its key under a prompt version, and what it records.
trait Table {
    /// What a record is about: a text, or a pair of texts.
    type Item: std::fmt::Debug;
    type Verdict: Serialize + DeserializeOwned;
    type Key: redb::Key + 'static;
    const TABLE: TableDefinition<'static, Self::Key, &'static [u8]>;

    fn key<'a>(prompt_version: &'a str, item: &'a Self::Item) -> KeyOf<'a, Self::Key>;
    /// The smallest key under `prompt_version`.
    fn first(prompt_version: &str) -> KeyOf<'_, Self::Key>;
    /// A stored key as its prompt version and item.
    fn split<'a>(key: KeyOf<'a, Self::Key>) -> (&'a str, Self::Item);
}

type KeyOf<'a, K> = <K as redb::Value>::SelfType<'a>;

/// One stored record of table `T` and what it is about.
type Entry<T> = (<T as Table>::Item, Record<<T as Table>::Verdict>);

/// Single-text labels.
struct Labels;

impl Table for Labels {
    type Item = String;
    type Verdict = bool;
    type Key = (&'static str, &'static str);
    const TABLE: TableDefinition<'static, Self::Key, &'static [u8]> = LABELS;

    fn key<'a>(prompt_version: &'a str, text: &'a String) -> (&'a str, &'a str) {
        (prompt_version, text)
    }

    fn first(prompt_version: &str) -> (&str, &str) {
        (prompt_version, "")
    }

    fn split<'a>(key: KeyOf<'a, Self::Key>) -> (&'a str, String) {
        let (pv, text) = key;
        (pv, text.to_string())
    }
}

/// Ranked pairs.
struct Pairs;

impl Table for Pairs {
    type Item = Pair;
    type Verdict = f32;
    type Key = (&'static str, &'static str, &'static str);
    const TABLE: TableDefinition<'static, Self::Key, &'static [u8]> = PAIRS;

    fn key<'a>(prompt_version: &'a str, (a, b): &'a Pair) -> (&'a str, &'a str, &'a str) {
        (prompt_version, a, b)
    }

    fn first(prompt_version: &str) -> (&str, &str, &str) {
        (prompt_version, "", "")
    }

    fn split<'a>(key: KeyOf<'a, Self::Key>) -> (&'a str, Pair) {
        let (pv, a, b) = key;
        (pv, (a.to_string(), b.to_string()))
    }
}

fn store_error(path: &Path, source: redb::Error) -> ServiceError {
    ServiceError::Store {
        path: path.display().to_string(),
        source: Box::new(source),
    }
}

fn decode<V: DeserializeOwned>(bytes: &[u8]) -> Result<Record<V>, serde_json::Error> {
    serde_json::from_slice(bytes)
}

fn encode<V: Serialize>(record: &Record<V>) -> Vec<u8> {
    serde_json::to_vec(record).expect("a label record always serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record<V>(h: Option<V>) -> Record<V> {
        Record {
            verdict: h,
            raw_answer: "1: helpful".into(),
            judge: "test".into(),
            unix_ms: 1,
            attempts: 1,
        }
    }

    #[test]
    fn labels_survive_reopening_and_are_never_overwritten() {
        let dir = std::env::temp_dir().join(format!("spur-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("labels.redb");
        {
            let s = LabelStore::open(&path).unwrap();
            let added = s
                .put_new(
                    "v1",
                    vec![("a".into(), record(Some(true))), ("b".into(), record(None))],
                )
                .unwrap();
            assert_eq!(added.len(), 2);
            let added = s
                .put_new("v1", vec![("a".into(), record(Some(false)))])
                .unwrap();
            assert!(added.is_empty());
            s.put_new("v2", vec![("a".into(), record(Some(false)))])
                .unwrap();
        }
        let s = LabelStore::open(&path).unwrap();
        assert_eq!(s.get("v1", "a").unwrap().unwrap().verdict, Some(true));
        assert_eq!(s.get("v2", "a").unwrap().unwrap().verdict, Some(false));
        assert!(s.get("v1", "zzz").unwrap().is_none());
        let all: Vec<String> = s.all("v1").unwrap().into_iter().map(|(t, _)| t).collect();
        assert_eq!(all, vec!["a".to_string(), "b".to_string()]);
        let pair = ("a".to_string(), "b".to_string());
        let added = s
            .put_new_pairs("v1", vec![(pair.clone(), record(Some(1.0f32)))])
            .unwrap();
        assert_eq!(added.len(), 1);
        assert!(s
            .put_new_pairs("v1", vec![(pair.clone(), record(Some(0.0f32)))])
            .unwrap()
            .is_empty());
        drop(s);
        let s = LabelStore::open(&path).unwrap();
        let pairs = s.all_pairs("v1").unwrap();
        assert_eq!(pairs.len(), 1);
        assert_eq!(pairs[0].0, pair);
        assert_eq!(pairs[0].1.verdict, Some(1.0));
        assert!(s.all_pairs("v2").unwrap().is_empty());
        // records written before the field was renamed still read
        let old: LabelRecord = serde_json::from_str(
            r#"{"helpful":true,"raw_answer":"","judge":"j","unix_ms":1,"attempts":1}"#,
        )
        .unwrap();
        assert_eq!(old.verdict, Some(true));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
