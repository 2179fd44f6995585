//! `POST /predict`: an image body (raw, or multipart field `file`) → top-k JSON, through the same queue
//! and workers as inbox images. At most `[http] max_uploads` are read or labelled at once, each body
//! at most `[http] max_body_mb` and arriving within `[http] body_timeout_s`, so memory stays bounded.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use tokio::sync::Semaphore;

use super::{HttpState, error};
use crate::config::HttpConfig;
use crate::metrics::Refused;
use crate::job::Upload;
use crate::queue::Pushed;
use crate::shutdown::Shutdown;
use crate::vocab::Status;

/// How long `POST /predict` waits for its result before answering 503.
const PREDICT_TIMEOUT: Duration = Duration::from_secs(60);

/// What a refused client is told to wait, in seconds, before it tries again.
const RETRY_AFTER_S: &str = "1";

/// The bounds every upload is held to; clones share the same permits.
#[derive(Clone)]
pub struct UploadLimits {
    permits: Arc<Semaphore>,
    max_uploads: usize,
    max_body: usize,
    body_timeout: Duration,
}

impl UploadLimits {
    pub fn new(cfg: &HttpConfig) -> Self {
        UploadLimits {
            permits: Arc::new(Semaphore::new(cfg.max_uploads)),
            max_uploads: cfg.max_uploads,
            max_body: cfg.max_body_bytes,
            body_timeout: cfg.body_timeout,
        }
    }

    pub fn max_body(&self) -> usize {
        self.max_body
    }
}

pub async fn predict(state: State<HttpState>, headers: HeaderMap, req: Request) -> Response {
    let answer = answer(state, headers, req).await;
    // The body and its copies are freed now: after a burst, the trimmer gives the pages back.
    crate::memory::busy();
    answer
}

async fn answer(State(s): State<HttpState>, headers: HeaderMap, req: Request) -> Response {
    if !s.health.is_ready() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "not ready yet");
    }
    let limits = &s.uploads;
    // Refused before any of the body is read (a client sending `Expect: 100-continue`, as curl does for
    // large files, then never sends it).
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limits.max_body) {
        s.metrics.http_refused(Refused::TooLarge);
        return error(StatusCode::PAYLOAD_TOO_LARGE, format!("image larger than {} bytes ([http] max_body_mb)", limits.max_body));
    }
    // Held until the reply is built: the body, its copy in the queue and the worker's result.
    let Ok(_permit) = limits.permits.clone().try_acquire_owned() else {
        s.metrics.http_refused(Refused::Busy);
        return busy(req, &s);
    };
    // A stop does not wait for a body still on its way: the client is told at once.
    let read = tokio::select! {
        read = tokio::time::timeout(limits.body_timeout, read_image(req, &headers, &s)) => read,
        _ = s.shutdown.wait() => return stopping(),
    };
    let bytes = match read {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(refused)) => return refused,
        Err(_) => {
            s.metrics.http_refused(Refused::BodyTimeout);
            return body_timed_out(limits.body_timeout);
        }
    };
    if bytes.is_empty() {
        return error(StatusCode::BAD_REQUEST, "empty body: send the image as the request body or as multipart field \"file\"");
    }
    let image: Arc<[u8]> = Arc::from(&bytes[..]);
    drop(bytes); // one copy per upload while it waits for a worker
    label(image, &s).await
}

/// 503 with `Retry-After`, sent at once. A body the client is already sending is read and thrown
/// away a chunk at a time, so it sees this answer rather than a reset connection; one that waits for
/// `100 Continue` is never asked for its body.
fn busy(req: Request, s: &HttpState) -> Response {
    let limits = &s.uploads;
    let waits_for_continue =
        req.headers().get(header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if !waits_for_continue {
        tokio::spawn(discard(req.into_body(), limits.clone(), s.shutdown.clone()));
    }
    let mut r = error(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("busy: {} uploads in progress ([http] max_uploads); retry after {RETRY_AFTER_S} s", limits.max_uploads),
    );
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_S));
    r
}

/// Reads and drops up to `max_body` bytes of `body` within `body_timeout`; past either, or at
/// shutdown, the body is dropped and the connection closes.
async fn discard(mut body: Body, limits: UploadLimits, shutdown: Shutdown) {
    let drain = async {
        let mut seen = 0;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len());
            if seen > limits.max_body {
                break;
            }
        }
    };
    tokio::select! {
        _ = tokio::time::timeout(limits.body_timeout, drain) => {}
        _ = shutdown.wait() => {}
    }
    crate::memory::busy();
}

fn body_timed_out(within: Duration) -> Response {
    let mut r = error(
        StatusCode::REQUEST_TIMEOUT,
        format!("the image did not arrive within {} s ([http] body_timeout_s)", within.as_secs()),
    );
    // The rest of a stalled body is never read: the connection cannot carry another request.
    r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

async fn read_image(req: Request, headers: &HeaderMap, s: &HttpState) -> Result<Bytes, Response> {
    let multipart = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    if multipart {
        image_field(req, s).await
    } else {
        Bytes::from_request(req, s).await.map_err(|e| error(e.status(), e.body_text()))
    }
}

async fn image_field(req: Request, s: &HttpState) -> Result<Bytes, Response> {
    let mut mp = Multipart::from_request(req, s).await.map_err(|e| error(e.status(), e.body_text()))?;
    loop {
        match mp.next_field().await {
            Ok(Some(field)) if field.name() == Some("file") => {
                return field.bytes().await.map_err(|e| error(e.status(), e.body_text()));
            }
            Ok(Some(_)) => continue,
            Ok(None) => return Err(error(StatusCode::BAD_REQUEST, "multipart body has no field named \"file\"")),
            Err(e) => return Err(error(e.status(), e.body_text())),
        }
    }
}

/// 503: labeld is stopping; the upload was not labelled.
fn stopping() -> Response {
    error(StatusCode::SERVICE_UNAVAILABLE, "shutting down")
}

/// Queues the image for a worker and answers with its result.
async fn label(bytes: Arc<[u8]>, s: &HttpState) -> Response {
    let (reply, mut result) = tokio::sync::mpsc::channel(1);
    let upload = Upload { bytes, reply };
    let queue = s.queue.clone();
    let pushed = tokio::task::spawn_blocking(move || queue.push_upload(upload)).await;
    if !matches!(pushed, Ok(Pushed::Queued)) {
        return stopping();
    }
    let waited = tokio::select! {
        r = tokio::time::timeout(PREDICT_TIMEOUT, result.recv()) => r,
        // Workers stop after their current batch: a queued upload would never be answered.
        _ = s.shutdown.wait() => Ok(None),
    };
    match waited {
        Ok(Some(record)) => {
            let code = if record.status == Status::Ok { StatusCode::OK } else { StatusCode::UNPROCESSABLE_ENTITY };
            let mut body = serde_json::to_value(&record).unwrap_or_default();
            if let Some(o) = body.as_object_mut() {
                o.remove("path");
            }
            (code, axum::Json(body)).into_response()
        }
        Ok(None) => stopping(),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "timed out waiting for a worker"),
    }
}
