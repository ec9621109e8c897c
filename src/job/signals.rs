//! Ctrl-C and SIGTERM while a job runs: the first one asks the job to stop and save (a run of
//! hours is not lost to a keystroke or a shutdown); a second one ends the process at once.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_channel::{Receiver, Sender};

static RECEIVED: AtomicUsize = AtomicUsize::new(0);
static CHANNEL: OnceLock<Option<(Sender<()>, Receiver<()>)>> = OnceLock::new();

/// Exit code after a second signal, as shells report a process killed by SIGINT.
const EXIT_ON_SECOND_SIGNAL: i32 = 130;

/// Installs the handler (once per process) and returns a receiver that gets one message at the
/// first SIGINT, SIGTERM or SIGHUP. `None` where no handler could be installed; the default
/// behaviour (the process ends) then stays.
pub fn stop_requests() -> Option<Receiver<()>> {
    let channel = CHANNEL.get_or_init(|| {
        let (tx, rx) = crossbeam_channel::unbounded();
        let sender = tx.clone();
        let installed = ctrlc::set_handler(move || {
            if RECEIVED.fetch_add(1, Ordering::SeqCst) == 0 {
                eprintln!("\nstopping: finishing the current step and saving (press Ctrl-C again to quit at once)");
                let _ = sender.send(());
            } else {
                eprintln!("\nquitting without saving");
                std::process::exit(EXIT_ON_SECOND_SIGNAL);
            }
        });
        installed.ok().map(|()| (tx, rx))
    });
    channel.as_ref().map(|(_, rx)| rx.clone())
}
