//! The default state store: one JSON document in a directory, written atomically, guarded by
//! an exclusive lock file.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use super::{Error, LockGuard, State, StateStore};
use crate::fsutil;

const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "lock";

/// A state directory on the local filesystem.
#[derive(Clone, Debug)]
pub struct FileStore {
    dir: PathBuf,
}

struct FileLock {
    _file: File,
}

impl LockGuard for FileLock {}

impl FileStore {
    /// A store in `dir` (created on first save, mode 0700).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The state file's path.
    pub fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    fn io(&self, source: io::Error) -> Error {
        Error::Io {
            location: self.location(),
            source,
        }
    }

    fn read(&self, path: &Path) -> Result<Option<State>, Error> {
        match fs::read(path) {
            Ok(bytes) => State::from_json(&bytes, &path.display().to_string()).map(Some),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(e)),
        }
    }
}

impl StateStore for FileStore {
    fn location(&self) -> String {
        self.dir.display().to_string()
    }

    fn lock(&self) -> Result<Box<dyn LockGuard>, Error> {
        fsutil::ensure_dir(&self.dir, 0o700).map_err(|e| self.io(e))?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join(LOCK_FILE))
            .map_err(|e| self.io(e))?;
        match file.try_lock() {
            Ok(()) => Ok(Box::new(FileLock { _file: file })),
            Err(fs::TryLockError::WouldBlock) => Err(Error::Locked(self.location())),
            Err(fs::TryLockError::Error(e)) => Err(self.io(e)),
        }
    }

    fn load(&self) -> Result<Option<State>, Error> {
        self.read(&self.state_path())
    }

    fn save(&self, state: &State) -> Result<(), Error> {
        fsutil::ensure_dir(&self.dir, 0o700).map_err(|e| self.io(e))?;
        let found = self.read(&self.state_path())?.map_or(0, |s| s.revision);
        if found + 1 != state.revision {
            return Err(Error::Conflict {
                location: self.location(),
                expected: state.revision.saturating_sub(1),
                found,
            });
        }
        fsutil::write_atomic(&self.state_path(), &state.to_json(), 0o600).map_err(|e| self.io(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_and_lock() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path().join("st"));
        assert!(store.load().unwrap().is_none());
        let mut s = State::new();
        s.revision = 1;
        store.save(&s).unwrap();
        // A stale writer (also at revision 1) is refused.
        assert!(matches!(
            store.save(&s),
            Err(Error::Conflict {
                expected: 0,
                found: 1,
                ..
            })
        ));
        s.revision = 2;
        store.save(&s).unwrap();
        assert_eq!(store.load().unwrap().unwrap().revision, 2);

        let guard = store.lock().unwrap();
        assert!(matches!(store.lock(), Err(Error::Locked(_))));
        drop(guard);
        store.lock().unwrap();
    }
}
