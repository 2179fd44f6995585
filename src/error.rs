//! Two kinds of error: `Fatal` stops the process (bad config, missing model); `ImageError` is recorded
//! for one image (error sidecar + CSV row) and the daemon carries on.

use std::path::PathBuf;

/// A configuration problem: names the key and says why. Exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {reason}")]
pub struct ConfigError {
    pub file: PathBuf,
    pub key: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(file: &std::path::Path, key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError { file: file.to_path_buf(), key: key.into(), reason: reason.into() }
    }
}

/// Errors that stop labeld.
#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("cannot load model {path}: {reason}")]
    Model { path: PathBuf, reason: String },
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    /// A long-lived thread died (a panic outside the per-image boundary, or an unexpected exit).
    #[error("thread {thread} died: {reason}; labeld stops so that its supervisor (systemd) restarts it")]
    ThreadDied { thread: String, reason: String },
    /// `run --once` stopped before every image had a result.
    #[error("stopped before the backlog was labelled ({0}); run it again to label the rest")]
    Unfinished(String),
    #[error("{0}")]
    Other(String),
}

impl Fatal {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Fatal::Io { context: context.into(), source }
    }

    /// 2 for anything the operator fixes in the config or command line, 1 for the rest.
    pub fn exit_code(&self) -> i32 {
        match self {
            Fatal::Config(_) => 2,
            _ => 1,
        }
    }
}

/// Why one image could not be labelled. Recorded, never fatal.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum ImageError {
    #[error("cannot read file: {0}")]
    Read(String),
    /// A passing fault (permissions, I/O, file still changing): retried later, never recorded.
    #[error("cannot read file now: {0} (retried)")]
    Fault(String),
    #[error("file not found (removed before it could be read?)")]
    Vanished,
    #[error("not a regular file ({0}); skipped")]
    NotRegular(&'static str),
    #[error("empty file (0 bytes)")]
    Empty,
    #[error("not a supported image format")]
    UnknownFormat,
    #[error("image is {width}x{height} = {pixels} pixels, over the limit of {limit} pixels ([limits] max_pixels)")]
    TooLarge { width: u32, height: u32, pixels: u64, limit: u64 },
    #[error("cannot decode image: {0}")]
    Decode(String),
    #[error(
        "image is {width}x{height}; scaling its shorter side to {resize} needs {to_width}x{to_height} ({pixels} pixels) in memory, \
         over the limit of {limit} pixels ([limits] max_pixels): its aspect ratio is too extreme"
    )]
    ResizeTooLarge { width: u32, height: u32, resize: u32, to_width: u64, to_height: u64, pixels: u64, limit: u64 },
    #[error("preprocessing crashed on this image ({0}); recorded so that it is not tried again")]
    Crashed(String),
    #[error("the model failed on this image: {0} (the model still works on its test input, so the image is at fault)")]
    ModelRejected(String),
    #[error("cannot preprocess image: {0}")]
    Preprocess(String),
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("not labelled: its batch was stuck in {thread} for over {secs} s (hung worker); not retried, so a bad image cannot stall labeld again after a restart")]
    Hung { thread: String, secs: u64 },
}

/// The text of a panic payload (a `&str` or `String`, as `panic!` makes).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

/// libtorch errors carry a C++ backtrace; operators need the first line. An exception raised inside
/// a TorchScript model comes after the script's traceback: its last line says what the model raised.
pub fn first_line(s: &str) -> String {
    let first = s.lines().next().unwrap_or(s);
    if first.contains("failed in the TorchScript interpreter")
        && let Some(raised) = s.lines().rev().map(str::trim).find(|l| !l.is_empty())
    {
        return raised.to_string();
    }
    first.to_string()
}
