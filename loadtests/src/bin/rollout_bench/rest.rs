//! The few calls of the registry's REST API (`/v1`) the benchmark makes, as
//! a release manager's tool makes them.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Writes are attributed to this actor in the rollout history.
const ACTOR: &str = "rollout-bench";

#[derive(Clone)]
pub struct Rest {
    base: String,
    http: reqwest::Client,
}

impl Rest {
    pub fn new(base: impl Into<String>) -> Result<Rest> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .build()
            .context("building the HTTP client")?;
        Ok(Rest {
            base: base.into(),
            http,
        })
    }

    /// Sends one call; a non-2xx answer is an error carrying its body.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value> {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .header("x-shamal-actor", ACTOR);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .with_context(|| format!("{method} {path}: reading the answer"))?;
        if !status.is_success() {
            bail!("{method} {path}: {status}: {text}");
        }
        if text.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).with_context(|| format!("{method} {path}: not JSON: {text}"))
    }

    /// Whether the REST API answers.
    pub async fn up(&self) -> bool {
        self.call(reqwest::Method::GET, "/v1/models", None)
            .await
            .is_ok()
    }

    /// Uploads artifact bytes; returns their sha256.
    pub async fn put_artifact(&self, bytes: Vec<u8>) -> Result<String> {
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let path = format!("/v1/artifacts/{sha256}");
        let response = self
            .http
            .put(format!("{}{path}", self.base))
            .header("x-shamal-actor", ACTOR)
            .header("content-type", "application/octet-stream")
            .body(bytes)
            .send()
            .await
            .with_context(|| format!("PUT {path}"))?;
        let status = response.status();
        if !status.is_success() {
            let text = response.text().await.unwrap_or_default();
            bail!("PUT {path}: {status}: {text}");
        }
        Ok(sha256)
    }

    /// Registers the next version of `model` for an uploaded ONNX artifact.
    pub async fn register_version(&self, model: &str, sha256: &str) -> Result<u64> {
        let version = self
            .call(
                reqwest::Method::POST,
                &format!("/v1/models/{model}/versions"),
                Some(json!({ "sha256": sha256, "format": "onnx" })),
            )
            .await?;
        number(&version, "version")
    }

    /// `registered`, `ready`, `failed` or `archived`, with the reason.
    pub async fn lifecycle(&self, model: &str, version: u64) -> Result<(String, String)> {
        let version = self
            .call(
                reqwest::Method::GET,
                &format!("/v1/models/{model}/versions/{version}"),
                None,
            )
            .await?;
        let text = |field: &str| version[field].as_str().unwrap_or_default().to_owned();
        Ok((text("lifecycle"), text("reason")))
    }

    pub async fn set_alias(&self, model: &str, alias: &str, version: u64) -> Result<()> {
        self.call(
            reqwest::Method::PUT,
            &format!("/v1/models/{model}/aliases/{alias}"),
            Some(json!({ "version": version })),
        )
        .await?;
        Ok(())
    }

    pub async fn delete_alias(&self, model: &str, alias: &str) -> Result<()> {
        self.call(
            reqwest::Method::DELETE,
            &format!("/v1/models/{model}/aliases/{alias}"),
            None,
        )
        .await?;
        Ok(())
    }

    /// Starts a canary of `candidate` at `weight`% against the `production`
    /// alias; returns the new rollout revision.
    pub async fn start_rollout(&self, model: &str, candidate: u64, weight: u32) -> Result<u64> {
        let rollout = self
            .call(
                reqwest::Method::POST,
                &format!("/v1/models/{model}/rollout"),
                Some(json!({ "expected_revision": 0, "candidate": candidate, "weight": weight })),
            )
            .await?;
        number(&rollout, "revision")
    }

    /// Writes a whole policy; returns the new rollout revision.
    pub async fn set_policy(
        &self,
        model: &str,
        expected_revision: u64,
        stable: u64,
        splits: &[(u64, u32)],
    ) -> Result<u64> {
        let splits: Vec<Value> = splits
            .iter()
            .map(|(version, weight)| json!({ "version": version, "weight": weight }))
            .collect();
        let rollout = self
            .call(
                reqwest::Method::PUT,
                &format!("/v1/models/{model}/rollout/policy"),
                Some(json!({
                    "expected_revision": expected_revision,
                    "stable": stable,
                    "splits": splits,
                })),
            )
            .await?;
        number(&rollout, "revision")
    }

    /// Shifts the canary's weight; returns the new rollout revision.
    pub async fn shift(&self, model: &str, expected_revision: u64, weight: u32) -> Result<u64> {
        let rollout = self
            .call(
                reqwest::Method::POST,
                &format!("/v1/models/{model}/rollout/shift"),
                Some(json!({ "expected_revision": expected_revision, "weight": weight })),
            )
            .await?;
        number(&rollout, "revision")
    }

    pub async fn rollback(&self, model: &str, expected_revision: u64) -> Result<()> {
        self.call(
            reqwest::Method::POST,
            &format!("/v1/models/{model}/rollout/rollback"),
            Some(json!({ "expected_revision": expected_revision, "reason": "benchmark over" })),
        )
        .await?;
        Ok(())
    }

    pub async fn archive(&self, model: &str, version: u64) -> Result<()> {
        self.call(
            reqwest::Method::POST,
            &format!("/v1/models/{model}/versions/{version}/archive"),
            None,
        )
        .await?;
        Ok(())
    }

    /// Sets a model's placement policy (`all` or `weighted`); returns the
    /// placement.
    pub async fn set_placement(&self, model: &str, mode: &str) -> Result<Value> {
        self.call(
            reqwest::Method::PUT,
            &format!("/v1/models/{model}/placement"),
            Some(json!({ "mode": mode })),
        )
        .await
    }

    /// A model's placement: policy, and per version its workers.
    pub async fn placement(&self, model: &str) -> Result<Value> {
        self.call(
            reqwest::Method::GET,
            &format!("/v1/models/{model}/placement"),
            None,
        )
        .await
    }

    /// The rollout with the registry's per-version analysis.
    pub async fn rollout_status(&self, model: &str) -> Result<Value> {
        self.call(
            reqwest::Method::GET,
            &format!("/v1/models/{model}/rollout"),
            None,
        )
        .await
    }
}

fn number(value: &Value, field: &str) -> Result<u64> {
    value[field]
        .as_u64()
        .with_context(|| format!("the registry's answer has no numeric {field}: {value}"))
}
