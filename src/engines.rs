//! Engine selection: probe io_uring, fall back to the portable engine, honour `--engine` / `FASTSYNC_ENGINE`.

use fastsync_engine::Engine;
use fastsync_fallback::FallbackEngine;

use crate::Error;

/// What the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineChoice {
    /// io_uring when it works here, else the fallback.
    Auto,
    /// io_uring, or an error.
    Uring,
    /// The portable thread-pool engine.
    Fallback,
}

/// The chosen engine and the notes to show with `-v`.
pub struct Selected {
    pub engine: Box<dyn Engine>,
    pub notes: Vec<String>,
}

/// Choose the engine. Forcing `uring` where it cannot run is an error naming the reason.
pub fn select(choice: EngineChoice) -> Result<Selected, Error> {
    match choice {
        EngineChoice::Fallback => Ok(fallback(vec!["engine: fallback (forced)".into()])),
        EngineChoice::Uring => {
            let e = probe_uring().map_err(|source| Error::EngineForced { engine: "uring", source })?;
            let mut notes = vec!["engine: uring (forced)".to_string()];
            notes.extend(e.notes());
            Ok(Selected { engine: e, notes })
        }
        EngineChoice::Auto => match probe_uring() {
            Ok(e) => {
                let mut notes = vec!["engine: uring".to_string()];
                notes.extend(e.notes());
                Ok(Selected { engine: e, notes })
            }
            Err(why) => Ok(fallback(vec![format!("{why}; using the fallback engine")])),
        },
    }
}

fn fallback(notes: Vec<String>) -> Selected {
    Selected { engine: Box::new(FallbackEngine::new()), notes }
}

#[cfg(target_os = "linux")]
fn probe_uring() -> Result<Box<dyn Engine>, fastsync_engine::EngineError> {
    Ok(Box::new(fastsync_uring::UringEngine::probe()?))
}

#[cfg(not(target_os = "linux"))]
fn probe_uring() -> Result<Box<dyn Engine>, fastsync_engine::EngineError> {
    Err(fastsync_engine::EngineError::UringUnavailable { reason: "io_uring exists only on Linux".into() })
}
