//! The library's typed errors. Each concern owns its error enum; [`Error`] gathers them so
//! that the training loop and the CLI deal with one type. Every message is one line that
//! names what went wrong and, where there is one, what to do about it.

use thiserror::Error;

/// Any error the library returns.
#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Config(#[from] crate::model::ConfigError),
    #[error(transparent)]
    Checkpoint(#[from] crate::model::CheckpointError),
    #[error(transparent)]
    Cuda(#[from] crate::cuda::CudaError),
    #[error(transparent)]
    Report(#[from] crate::report::ReportError),
    /// A NaN or infinity appeared, or the loss blew up; training stops before anything
    /// poisoned is written.
    #[error("training diverged at step {step}: {what}; lower --lr or check the data")]
    Diverged { step: u64, what: String },
    /// Training was interrupted (Ctrl-C / SIGTERM) at a step boundary.
    #[error("interrupted at step {step}")]
    Interrupted { step: u64 },
    #[error("{context}: {source}")]
    Io { context: String, #[source] source: std::io::Error },
    /// A study failed after writing some of its outputs: they are in `kept`.
    #[error("{failed} (what the study wrote is in {})", kept.display())]
    Kept { failed: Box<Error>, kept: std::path::PathBuf },
    /// The checkpoint could not be written where asked, but the trained state was saved to
    /// `rescue` instead; `next` says what to do with it.
    #[error("{failed}; the trained state was saved to {} instead: {next}", rescue.display())]
    Rescued { failed: Box<Error>, rescue: std::path::PathBuf, next: String },
}

impl Error {
    /// Wraps an I/O error with the path or action it concerns.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
