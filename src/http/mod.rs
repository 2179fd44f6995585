//! The optional HTTP endpoint (`[http] listen`): Prometheus /metrics, /healthz and /readyz,
//! `POST /predict` through the same queue and workers as inbox images, and a status page at `/`.
//! Connections are bounded in `connections`, uploads in `upload`.

mod connections;
pub mod review;
mod upload;

pub use review::Review;
pub use upload::UploadLimits;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::config::HttpConfig;
use crate::error::Fatal;
use crate::health::Health;
use crate::infer::LiveSettings;
use crate::metrics::Metrics;
use crate::queue::QueueSender;
use crate::shutdown::Shutdown;
use crate::sink::recent::Recent;

const PAGE: &str = include_str!("status.html");

#[derive(Clone)]
pub struct HttpState {
    pub metrics: Metrics,
    pub health: Health,
    pub recent: Recent,
    pub queue: QueueSender,
    pub live: LiveSettings,
    pub stall_limit: Duration,
    pub token: Option<Arc<str>>,
    pub shutdown: Shutdown,
    pub uploads: UploadLimits,
    pub review: Review,
}

/// Binds `cfg.listen` (failing to is fatal) and serves until `shutdown`.
pub async fn serve(cfg: &HttpConfig, state: HttpState, shutdown: Shutdown) -> Result<tokio::task::JoinHandle<()>, Fatal> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| Fatal::io(format!("cannot listen on {} ([http] listen)", cfg.listen), e))?;
    let addr = listener.local_addr().map_err(|e| Fatal::io("cannot read the HTTP address", e))?;
    if state.token.is_some() {
        tracing::info!(%addr, "HTTP on: requests need Authorization: Bearer <token> (except /healthz, /readyz)");
    } else {
        tracing::info!(%addr, "HTTP on (loopback, no token)");
    }
    let connections = connections::Connections::new(listener, cfg, state.metrics.clone());
    let app = router(state);
    Ok(tokio::spawn(connections.serve(app, shutdown)))
}

fn router(state: HttpState) -> Router {
    let max_body = state.uploads.max_body();
    let guarded = Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .route("/api/status", get(status))
        .route("/thumb/{id}", get(thumb))
        .route("/api/review", get(review_list))
        .route("/api/labels", get(labels))
        .route("/review/{folder}/{name}", get(review_image).post(review_decide))
        .route("/predict", post(upload::predict))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn_with_state(state.clone(), authorize));
    Router::new().route("/healthz", get(healthz)).route("/readyz", get(readyz)).merge(guarded).with_state(state)
}

/// With a token set, every guarded request must carry it: `Authorization: Bearer <token>`, or
/// `?token=` for a browser opening the status page.
async fn authorize(State(s): State<HttpState>, req: Request, next: Next) -> Response {
    let Some(token) = &s.token else { return next.run(req).await };
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let query = axum::extract::Query::<std::collections::HashMap<String, String>>::try_from_uri(req.uri())
        .ok()
        .and_then(|q| q.0.get("token").cloned());
    if [bearer, query].iter().flatten().any(|t| constant_time_eq(t.as_bytes(), token.as_bytes())) {
        next.run(req).await
    } else {
        let mut r = error(StatusCode::UNAUTHORIZED, "missing or wrong token (Authorization: Bearer <token>)");
        r.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        r
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, axum::Json(json!({ "error": msg.into() }))).into_response()
}

async fn healthz(State(s): State<HttpState>) -> Response {
    match s.health.unhealthy(s.stall_limit, s.metrics.in_flight()) {
        None => (StatusCode::OK, "ok\n").into_response(),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

async fn readyz(State(s): State<HttpState>) -> Response {
    match s.health.not_ready() {
        None => (StatusCode::OK, "ready\n").into_response(),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")).into_response(),
    }
}

async fn metrics(State(s): State<HttpState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        s.metrics.encode(),
    )
        .into_response()
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

async fn status(State(s): State<HttpState>) -> Response {
    let settings = s.live.get();
    axum::Json(json!({
        "model": settings.model.name,
        "precision": settings.model.precision.as_str(),
        "ready": s.health.is_ready(),
        "images_per_s": (s.metrics.images_per_second() * 10.0).round() / 10.0,
        "queue_depth": s.metrics.queue_depth(),
        "in_flight": s.metrics.in_flight(),
        "ok": s.metrics.images("ok"),
        "errors": s.metrics.images("error"),
        "recent": s.recent.list(),
        "drift_svg": s.recent.drift_svg(),
        "mqtt": s.metrics.mqtt().map(|m| m.json()),
        // The page refuses a larger photo itself: a browser still sending a body the server refused
        // sees a reset connection, not the 413.
        "max_body_bytes": s.uploads.max_body(),
    }))
    .into_response()
}

async fn review_list(State(s): State<HttpState>) -> Response {
    let review = s.review.clone();
    match tokio::task::spawn_blocking(move || review.list()).await {
        Ok(items) => axum::Json(json!({ "on": s.review.is_on(), "items": items })).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn labels(State(s): State<HttpState>) -> Response {
    let settings = s.live.get();
    let names: Vec<&str> = (0..settings.labels.len()).map(|i| settings.labels.name(i)).collect();
    axum::Json(json!({ "labels": names })).into_response()
}

async fn review_image(State(s): State<HttpState>, Path((folder, name)): Path<(usize, String)>) -> Response {
    let review = s.review.clone();
    let n = name.clone();
    match tokio::task::spawn_blocking(move || review.image(folder, &n)).await {
        Ok(Ok(bytes)) => {
            let lower = name.to_ascii_lowercase();
            let kind = match lower.rsplit('.').next() {
                Some("png") => "image/png",
                Some("webp") => "image/webp",
                Some("gif") => "image/gif",
                Some("bmp") => "image/bmp",
                Some("tif" | "tiff") => "image/tiff",
                _ => "image/jpeg",
            };
            ([(header::CONTENT_TYPE, kind), (header::CACHE_CONTROL, "max-age=60")], bytes).into_response()
        }
        Ok(Err(e)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// The operator's verdict on one review image: `{"label": "<one of the model's labels>"}`.
async fn review_decide(State(s): State<HttpState>, Path((folder, name)): Path<(usize, String)>, body: axum::body::Bytes) -> Response {
    let Some(label) = serde_json::from_slice::<serde_json::Value>(&body).ok().and_then(|v| v["label"].as_str().map(str::to_string)) else {
        return error(StatusCode::BAD_REQUEST, "send {\"label\": \"...\"}");
    };
    let settings = s.live.get();
    let labels: Vec<String> = (0..settings.labels.len()).map(|i| settings.labels.name(i).to_string()).collect();
    let review = s.review.clone();
    let l = label.clone();
    match tokio::task::spawn_blocking(move || review.decide(folder, &name, &l, &labels)).await {
        Ok(Ok(predicted)) => axum::Json(json!({ "predicted": predicted, "label": label })).into_response(),
        Ok(Err(e)) => error(StatusCode::UNPROCESSABLE_ENTITY, e),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn thumb(State(s): State<HttpState>, Path(id): Path<u64>) -> Response {
    match s.recent.thumb(id) {
        Some(jpeg) => ([(header::CONTENT_TYPE, "image/jpeg"), (header::CACHE_CONTROL, "max-age=3600")], jpeg.to_vec()).into_response(),
        None => error(StatusCode::NOT_FOUND, "no such thumbnail (only the last 50 results have one)"),
    }
}
