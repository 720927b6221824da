//! Atomic checkpoints: weights as safetensors with the training position in the
//! metadata, written to a temp file, fsynced and renamed into place, so a crash at
//! any moment leaves the previous checkpoint intact. Loading takes the newest file
//! that parses, so even a damaged newest file does not stop a resume.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::ModelError;
use crate::model::{payload_version, read_metadata};

const PREFIX: &str = "checkpoint-";
const SUFFIX: &str = ".safetensors";

/// How many checkpoints a run keeps.
pub const KEEP: usize = 3;

/// Writes `bytes` to `path` atomically (temp file, fsync, rename, fsync of the folder).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// Path of the checkpoint for `version` in `dir`.
pub fn checkpoint_path(dir: &Path, version: u64) -> PathBuf {
    dir.join(format!("{PREFIX}{version:010}{SUFFIX}"))
}

/// Writes a checkpoint and removes all but the newest [`KEEP`].
pub fn save(dir: &Path, version: u64, bytes: &[u8]) -> Result<PathBuf, ModelError> {
    let path = checkpoint_path(dir, version);
    write_atomic(&path, bytes)?;
    let all = list(dir)?;
    for old in all.iter().rev().skip(KEEP) {
        let _ = fs::remove_file(old);
    }
    Ok(path)
}

/// Checkpoint files in `dir`, oldest first.
pub fn list(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let mut out: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(PREFIX) && n.ends_with(SUFFIX))
            })
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    out.sort();
    Ok(out)
}

/// A checkpoint read back from disk.
pub struct Loaded {
    pub path: PathBuf,
    pub version: u64,
    pub metadata: HashMap<String, String>,
    pub bytes: Vec<u8>,
}

/// Reads one checkpoint file.
pub fn load_file(path: &Path) -> Result<Loaded, ModelError> {
    let bytes = fs::read(path)?;
    let bad = |message: String| ModelError::Checkpoint {
        path: path.display().to_string(),
        message,
    };
    let metadata = read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let version = payload_version(&metadata).map_err(|e| bad(e.to_string()))?;
    Ok(Loaded {
        path: path.to_path_buf(),
        version,
        metadata,
        bytes,
    })
}

/// The newest checkpoint in `dir` that parses, or None when there is none.
pub fn load_latest(dir: &Path) -> Result<Option<Loaded>, ModelError> {
    for path in list(dir)?.iter().rev() {
        match load_file(path) {
            Ok(l) => return Ok(Some(l)),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "skipping unreadable checkpoint")
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ActorCritic;

    #[test]
    fn keeps_the_newest_and_skips_damaged_files() {
        let dir = std::env::temp_dir().join(format!("spur-ckpt-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let m = ActorCritic::new(4, 2, &[8], tch::Device::Cpu);
        for v in 1..=5 {
            save(&dir, v, &m.to_safetensors(v, &HashMap::new()).unwrap()).unwrap();
        }
        assert_eq!(list(&dir).unwrap().len(), KEEP);
        assert_eq!(load_latest(&dir).unwrap().unwrap().version, 5);
        // A torn newest file (as a crash mid-write without rename would never leave,
        // but a disk fault could) falls back to the previous checkpoint.
        fs::write(checkpoint_path(&dir, 6), b"garbage").unwrap();
        assert_eq!(load_latest(&dir).unwrap().unwrap().version, 5);
        let _ = fs::remove_dir_all(&dir);
    }
}
