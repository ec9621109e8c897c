//! The job layer: long engine work (training) runs on its own thread and talks to the window or
//! the CLI only through channels — commands in, events out — so the caller never blocks.

pub mod train;

pub use train::{TrainCommand, TrainEvent, TrainJob, TrainJobSpec};
