//! The shared store's own thread: a single-threaded runtime for the store's connections and
//! the instance's writer.
//!
//! On the main runtime every hop of a token's trip to the store (the writer's wake, the
//! connection's write and read tasks, the answer back to the writer) waits its turn behind the
//! thousands of subscriber and generation tasks in a worker's queue; here it waits behind a
//! handful, and the kernel wakes this mostly sleeping thread at once.

use std::{io, thread};

use tokio::{runtime::Handle, sync::oneshot};

/// Runs until dropped; its tasks are dropped with it.
pub struct StoreThread {
    handle: Handle,
    stop: Option<oneshot::Sender<()>>,
}

impl StoreThread {
    pub fn start() -> io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        thread::Builder::new()
            .name("tokenfan-store".into())
            .spawn(move || {
                runtime.block_on(async {
                    // A dropped sender ends it too.
                    let _ = stopped.await;
                });
            })?;
        Ok(Self {
            handle,
            stop: Some(stop),
        })
    }

    /// Where the store's tasks are spawned.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

impl Drop for StoreThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
