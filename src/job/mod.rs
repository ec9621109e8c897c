//! The job layer: long engine work (training) runs on its own thread and talks to the window or
//! the CLI only through channels — commands in, events out — so the caller never blocks.

pub mod playground;
pub mod scan;
pub mod signals;
pub mod train;

pub use train::{TrainCommand, TrainEvent, TrainJob, TrainJobSpec};

/// The text a worker panicked with (`panic!` gives a `String` or a `&str`), for an error event.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}
