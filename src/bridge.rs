//! Runs async client code to completion from synchronous callers, whether or not the caller is
//! itself inside an async runtime: jobs go to a dedicated thread that owns a small runtime.
//!
//! The state store and root backend traits are synchronous (they are called rarely, from the
//! CLI and from the rotation executor), while the Kubernetes and Vault clients are async.
//! Blocking on a runtime from inside another runtime panics; handing the work to a thread of
//! its own does not.

use std::sync::Mutex;
use std::sync::mpsc;
use std::time::Duration;

type Job = Box<dyn FnOnce(&tokio::runtime::Runtime) + Send>;

/// A thread with a runtime of its own.
pub struct Bridge {
    tx: Mutex<mpsc::Sender<Job>>,
}

impl Bridge {
    /// Starts the thread, named `name`.
    pub fn new(name: &str) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let _ = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                while let Ok(job) = rx.recv() {
                    job(&rt);
                }
            });
        Self { tx: Mutex::new(tx) }
    }

    /// Runs `fut` on the bridge's thread and waits for it, at most `limit`. `None` when the
    /// thread is gone or the limit passed.
    pub fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
        limit: Duration,
    ) -> Option<T> {
        let (reply, answer) = mpsc::channel();
        let job: Job = Box::new(move |rt| {
            let _ = reply.send(rt.block_on(fut));
        });
        self.tx.lock().ok()?.send(job).ok()?;
        answer.recv_timeout(limit).ok()
    }
}
