//! Labelling on model servers that speak the Open Inference Protocol (KServe v2) over gRPC: Triton,
//! OpenVINO Model Server, MLServer. labeld decodes and preprocesses as always; a batch travels as one
//! ModelInfer request with the exact input tensor in raw contents, and its logits come back.
//!
//! Several servers: each batch goes to the one with the fewest requests outstanding, among those not
//! in back-off. A server that is down, times out, answers with a server-side error, lost the model or
//! refuses the token is a fault: it goes into back-off, the batch moves on to the next server, and
//! with none left the batch fails `Unavailable` (the worker retries it, or labels it locally with
//! `fallback = "local"`). One log line per change of a server's state, never per request.
//!
//! The workers are blocking threads: calls run on a small runtime of this model's own, through
//! `block_on` on the calling worker thread (never on the HTTP server's runtime).

pub mod proto {
    tonic::include_proto!("inference");
}
mod tensor;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};

use super::backend::{Backend, Failure};
use crate::backoff::Backoff;
use crate::config::RemoteConfig;
use crate::error::Fatal;
use crate::metrics::Metrics;
use proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use proto::model_infer_request::InferInputTensor;
use proto::{ModelInferRequest, ModelMetadataRequest, ModelReadyRequest, ServerReadyRequest};
use tensor::Signature;

/// A server that failed is tried again after 0.5 s, doubling to 15 s.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(15);

pub struct RemoteModel {
    servers: Vec<Server>,
    model: String,
    version: String,
    /// The bearer token and its file; read again after a refusal, so a fixed file is used without
    /// waiting for a batch that started before the reload.
    token: Option<(Mutex<MetadataValue<Ascii>>, PathBuf)>,
    timeout: Duration,
    crop: u32,
    classes: usize,
    metrics: Metrics,
    // Last: dropped after the channels that run on it.
    runtime: tokio::runtime::Runtime,
}

struct Server {
    url: String,
    client: GrpcInferenceServiceClient<Channel>,
    outstanding: AtomicUsize,
    state: Mutex<State>,
}

struct State {
    backoff: Backoff,
    /// `None` until the server first answered or failed.
    up: Option<bool>,
    /// The server's model, checked; `None` until its metadata was read.
    signature: Option<Signature>,
}

/// Why a call to one server failed.
enum Trouble {
    /// Down, timed out, a server-side error, the model missing or not ready: try another server.
    Down(String),
    /// UNAUTHENTICATED or PERMISSION_DENIED: the token (or client certificate) is not accepted.
    Refused(String),
    /// The server's model does not take what labeld sends (or give what it expects).
    Mismatch(String),
    /// INVALID_ARGUMENT or a malformed answer for this batch: the worker splits it as for a local model.
    Batch(String),
}

impl RemoteModel {
    /// Connects to every server of `cfg` and checks each one's model against `crop`-sized images and
    /// `classes` labels. A server whose model does not fit is `Fatal`, naming the difference. Servers
    /// that do not answer now are not: labeld starts and the workers retry them (with
    /// `fallback = "local"`, labelling locally meanwhile).
    pub fn connect(cfg: &RemoteConfig, crop: u32, classes: usize, metrics: &Metrics) -> Result<RemoteModel, Fatal> {
        let fatal = |reason: String| Fatal::Other(format!("[remote]: {reason}"));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("remote-io")
            .enable_all()
            .build()
            .map_err(|e| fatal(format!("cannot start the client runtime: {e}")))?;
        let mut servers = Vec::new();
        for s in &cfg.servers {
            let scheme = if s.tls { "https" } else { "http" };
            let host = if s.host.contains(':') { format!("[{}]", s.host) } else { s.host.clone() };
            let mut endpoint = Endpoint::from_shared(format!("{scheme}://{host}:{}", s.port))
                .map_err(|e| fatal(format!("server {}: {e}", s.url)))?
                .connect_timeout(cfg.connect_timeout)
                .timeout(cfg.timeout)
                .tcp_nodelay(true)
                // A server that stops answering on an open connection is noticed between batches too.
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(cfg.timeout);
            if s.tls {
                let mut tls = ClientTlsConfig::new().domain_name(s.host.clone());
                tls = match &cfg.ca_pem {
                    Some(ca) => tls.ca_certificate(Certificate::from_pem(ca)),
                    None => tls.with_native_roots(),
                };
                if let Some((cert, key)) = &cfg.client_auth {
                    tls = tls.identity(Identity::from_pem(cert, &key.0));
                }
                endpoint = endpoint.tls_config(tls).map_err(|e| fatal(format!("server {}: TLS: {e}", s.url)))?;
            }
            let channel = {
                let _entered = runtime.enter();
                endpoint.connect_lazy()
            };
            // Batches of 8 images of 224×224 are 4.8 MB; answers are small.
            let client = GrpcInferenceServiceClient::new(channel).max_decoding_message_size(64 << 20);
            metrics.remote_up(&s.url, false);
            servers.push(Server {
                url: s.url.clone(),
                client,
                outstanding: AtomicUsize::new(0),
                state: Mutex::new(State { backoff: Backoff::new(RETRY_FIRST, RETRY_MAX), up: None, signature: None }),
            });
        }
        let token = match &cfg.token {
            None => None,
            Some((secret, path)) => {
                let value = bearer(&secret.0).ok_or_else(|| fatal(format!("the token in {} cannot be sent as a header", path.display())))?;
                Some((Mutex::new(value), path.clone()))
            }
        };
        let model = RemoteModel {
            servers,
            model: cfg.model.clone(),
            version: cfg.version.clone().unwrap_or_default(),
            token,
            timeout: cfg.timeout,
            crop,
            classes,
            metrics: metrics.clone(),
            runtime,
        };
        let mut answered = 0;
        for s in &model.servers {
            match model.runtime.block_on(model.check(s)) {
                Ok(_) => {
                    answered += 1;
                    model.mark(s, Ok(()));
                }
                Err(Trouble::Mismatch(why)) => {
                    return Err(fatal(format!("server {} model \"{}\" does not fit: {why}", s.url, model.model)));
                }
                Err(t) => model.mark(s, Err(t)),
            }
        }
        if answered == 0 {
            tracing::warn!(
                servers = model.servers.len(),
                "no model server answers at start: labeld starts and retries them with back-off; images wait (or are labelled locally with fallback = \"local\")"
            );
        }
        Ok(model)
    }

    /// Whether `s` serves the model, checked: ServerReady, ModelReady, then ModelMetadata against
    /// labeld's images and labels. The result is kept until the server fails.
    async fn check(&self, s: &Server) -> Result<Signature, Trouble> {
        if let Some(sig) = lock(&s.state).signature.clone() {
            return Ok(sig);
        }
        let mut client = s.client.clone();
        let ready = client.server_ready(self.request(ServerReadyRequest {})).await.map_err(|e| trouble(&e))?;
        if !ready.into_inner().ready {
            return Err(Trouble::Down("the server says it is not ready".into()));
        }
        let (name, version) = (self.model.clone(), self.version.clone());
        let ready = client.model_ready(self.request(ModelReadyRequest { name: name.clone(), version: version.clone() })).await;
        if !ready.map_err(|e| trouble(&e))?.into_inner().ready {
            return Err(Trouble::Down(format!("model \"{}\" is not ready there", self.model)));
        }
        let meta = client.model_metadata(self.request(ModelMetadataRequest { name, version })).await.map_err(|e| trouble(&e))?;
        let sig = tensor::check(&meta.into_inner(), self.crop, self.classes).map_err(Trouble::Mismatch)?;
        lock(&s.state).signature = Some(sig.clone());
        Ok(sig)
    }

    /// `msg` with the bearer token, if one is configured.
    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        if let Some((token, _)) = &self.token {
            r.metadata_mut().insert("authorization", token.lock().unwrap_or_else(|e| e.into_inner()).clone());
        }
        r
    }

    /// One batch on one server.
    async fn infer(&self, s: &Server, data: &[f32], n: usize) -> Result<Vec<f32>, Trouble> {
        let sig = self.check(s).await?;
        let (raw, shape) = tensor::encode(data, n, self.crop, sig.layout);
        let request = ModelInferRequest {
            model_name: self.model.clone(),
            model_version: self.version.clone(),
            inputs: vec![InferInputTensor { name: sig.input.clone(), datatype: "FP32".into(), shape, ..Default::default() }],
            raw_input_contents: vec![raw],
            ..Default::default()
        };
        let answer = s.client.clone().model_infer(self.request(request)).await.map_err(|e| trouble(&e))?;
        tensor::decode(&answer.into_inner(), &sig.output, n, self.classes).map_err(Trouble::Batch)
    }

    /// Records how a call to `s` went: its state, back-off, metrics, and a log line when the state
    /// changes.
    fn mark(&self, s: &Server, outcome: Result<(), Trouble>) {
        let result = match &outcome {
            Ok(()) | Err(Trouble::Batch(_)) => "ok",
            Err(Trouble::Down(_)) => "unavailable",
            Err(Trouble::Refused(_)) => "refused",
            Err(Trouble::Mismatch(_)) => "mismatch",
        };
        self.metrics.remote_request(&s.url, if matches!(outcome, Err(Trouble::Batch(_))) { "invalid" } else { result });
        let mut st = lock(&s.state);
        match outcome {
            Ok(()) | Err(Trouble::Batch(_)) => {
                st.backoff.succeeded();
                if st.up != Some(true) {
                    tracing::info!(server = %s.url, model = %self.model, "model server up");
                    self.metrics.remote_up(&s.url, true);
                }
                st.up = Some(true);
            }
            Err(t) => {
                if let (Trouble::Refused(_), Some((token, path))) = (&t, &self.token) {
                    // The same one line as at start (config::remote): the token, without a newline.
                    let fresh = std::fs::read_to_string(path).ok().and_then(|text| bearer(text.lines().next().unwrap_or_default().trim()));
                    if let Some(fresh) = fresh {
                        *token.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
                    }
                }
                let retry_in = st.backoff.failed(Instant::now());
                // Read again when it answers: the model may have been replaced meanwhile.
                st.signature = None;
                if st.up != Some(false) {
                    let retry_in_ms = retry_in.as_millis() as u64;
                    match t {
                        Trouble::Refused(why) => {
                            let file = self.token.as_ref().map(|(_, p)| p.display().to_string());
                            let file = file.unwrap_or_else(|| "(none set: [remote] token_file)".into());
                            tracing::error!(server = %s.url, token_file = %file, retry_in_ms,
                                "model server refuses labeld's credentials ({why}): check the token in {file} (or the client certificate; read again at each retry); a fault, nothing is recorded for the images");
                        }
                        Trouble::Mismatch(why) => tracing::error!(server = %s.url, model = %self.model, retry_in_ms,
                            "the model on this server no longer fits: {why}; not used until it does"),
                        Trouble::Down(why) | Trouble::Batch(why) => {
                            tracing::warn!(server = %s.url, retry_in_ms, "model server down ({why}); retrying with back-off")
                        }
                    }
                    self.metrics.remote_up(&s.url, false);
                }
                st.up = Some(false);
            }
        }
    }

    /// The server for the next try: fewest requests outstanding among those not in back-off and not
    /// tried for this batch yet.
    fn pick(&self, tried: &[usize]) -> Option<usize> {
        let now = Instant::now();
        (0..self.servers.len())
            .filter(|i| !tried.contains(i) && lock(&self.servers[*i].state).backoff.due(now))
            .min_by_key(|i| self.servers[*i].outstanding.load(Ordering::SeqCst))
    }

    /// Why no server took the batch, server by server.
    fn all_down(&self) -> String {
        let now = Instant::now();
        let states: Vec<String> = self
            .servers
            .iter()
            .map(|s| match lock(&s.state).backoff.next() {
                Some(t) if t > now => format!("{} (retry in {} ms)", s.url, (t - now).as_millis()),
                _ => format!("{} (down)", s.url),
            })
            .collect();
        format!("no model server answers: {}", states.join(", "))
    }
}

impl Backend for RemoteModel {
    fn engine(&self) -> &'static str {
        "remote"
    }

    fn classes(&self) -> usize {
        self.classes
    }

    fn logits(&self, data: &[f32], n: usize) -> Result<Vec<f32>, Failure> {
        let mut tried = Vec::new();
        while let Some(i) = self.pick(&tried) {
            tried.push(i);
            let s = &self.servers[i];
            s.outstanding.fetch_add(1, Ordering::SeqCst);
            // The per-call timeout bounds each call; this bounds the metadata calls before it too.
            let call = async { tokio::time::timeout(self.timeout * 2, self.infer(s, data, n)).await };
            let result = self.runtime.block_on(call).unwrap_or_else(|_| Err(Trouble::Down(format!("no answer within {} ms", self.timeout.as_millis() * 2))));
            s.outstanding.fetch_sub(1, Ordering::SeqCst);
            match result {
                Ok(logits) => {
                    self.mark(s, Ok(()));
                    return Ok(logits);
                }
                Err(Trouble::Batch(why)) => {
                    self.mark(s, Err(Trouble::Batch(why.clone())));
                    return Err(Failure::Model(format!("model server {}: {why}", s.url)));
                }
                Err(t) => self.mark(s, Err(t)),
            }
        }
        Err(Failure::Unavailable(self.all_down()))
    }
}

/// A gRPC status as labeld treats it: only what the server says about this batch is the batch's.
fn trouble(status: &Status) -> Trouble {
    let why = format!("{:?}: {}", status.code(), status.message().lines().next().unwrap_or_default());
    match status.code() {
        Code::InvalidArgument | Code::OutOfRange => Trouble::Batch(why),
        Code::Unauthenticated | Code::PermissionDenied => Trouble::Refused(why),
        _ => Trouble::Down(why),
    }
}

/// `Bearer <token>` as a header value; `None` for an empty token or one a header cannot carry.
fn bearer(token: &str) -> Option<MetadataValue<Ascii>> {
    if token.is_empty() {
        return None;
    }
    MetadataValue::try_from(format!("Bearer {token}")).ok()
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}
