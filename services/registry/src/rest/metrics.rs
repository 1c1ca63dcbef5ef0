//! Request counters and latency of the REST API.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http::Method;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};

#[derive(Clone)]
pub struct HttpMetrics {
    requests: IntCounterVec,
    latency: HistogramVec,
}

impl HttpMetrics {
    pub fn new(registry: &shamal_telemetry::MetricsRegistry) -> prometheus::Result<HttpMetrics> {
        let requests = IntCounterVec::new(
            Opts::new(
                "shamal_registry_http_requests_total",
                "REST requests answered by the registry, by route (method and path template) and status code",
            ),
            &["route", "code"],
        )
        .unwrap_or_else(|error| unreachable!("static metric definition: {error}"));
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "shamal_registry_http_request_duration_seconds",
                "Time to answer a REST request (until the response headers), by route",
            )
            .buckets(shamal_telemetry::LATENCY_BUCKETS.to_vec()),
            &["route"],
        )
        .unwrap_or_else(|error| unreachable!("static metric definition: {error}"));
        Ok(HttpMetrics {
            requests: shamal_telemetry::register(registry, requests)?,
            latency: shamal_telemetry::register(registry, latency)?,
        })
    }
}

/// Records every request under `"<METHOD> <path template>"` (`unmatched`
/// for paths without a route), keeping label values bounded.
pub async fn track(State(metrics): State<HttpMetrics>, request: Request, next: Next) -> Response {
    let method = match *request.method() {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    };
    let route = match request.extensions().get::<MatchedPath>() {
        Some(path) => format!("{method} {}", path.as_str()),
        None => format!("{method} unmatched"),
    };
    let start = Instant::now();
    let response = next.run(request).await;
    metrics
        .requests
        .with_label_values(&[route.as_str(), response.status().as_str()])
        .inc();
    metrics
        .latency
        .with_label_values(&[route.as_str()])
        .observe(start.elapsed().as_secs_f64());
    response
}
