//! The gRPC API (`shamal.audit.v1.AuditService`).

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use shamal_audit::Event;
use shamal_proto::shamal::audit::v1 as proto;
use shamal_proto::shamal::audit::v1::audit_service_server::AuditService;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::error::AuditError;
use crate::log::{AuditLog, Query};

/// Items an Export buffers ahead of a slow reader.
const EXPORT_BUFFER: usize = 256;

pub struct AuditGrpc {
    log: Arc<AuditLog>,
}

impl AuditGrpc {
    pub fn new(log: Arc<AuditLog>) -> AuditGrpc {
        AuditGrpc { log }
    }
}

type ExportStream = Pin<Box<dyn Stream<Item = Result<proto::ExportItem, Status>> + Send>>;

/// A page token: the last sequence number of the page before (plain
/// decimal; empty for the first page).
fn parse_page_token(token: &str) -> Result<u64, AuditError> {
    if token.is_empty() {
        return Ok(0);
    }
    token.parse::<u64>().map_err(|_| {
        AuditError::invalid(
            "page_token",
            "not a page token of this service (the next_page_token of an earlier page)",
        )
    })
}

#[tonic::async_trait]
impl AuditService for AuditGrpc {
    async fn append(
        &self,
        request: Request<proto::AppendRequest>,
    ) -> Result<Response<proto::AppendResponse>, Status> {
        let events: Vec<Event> = request
            .into_inner()
            .events
            .into_iter()
            .map(Event::from)
            .collect();
        let appended = self.log.append(events).await?;
        Ok(Response::new(proto::AppendResponse {
            appended: appended.appended,
            duplicates: appended.duplicates,
            head_seq: appended.head_seq,
        }))
    }

    async fn query(
        &self,
        request: Request<proto::QueryRequest>,
    ) -> Result<Response<proto::QueryResponse>, Status> {
        let request = request.into_inner();
        let query = Query {
            after_seq: parse_page_token(&request.page_token)?,
            actor: request.actor,
            tenant: request.tenant,
            model: request.model,
            version: request.version,
            action: request.action,
            outcome: request.outcome,
            region: request.region,
            since_ms: request.since_ms,
            until_ms: request.until_ms,
            page_size: request.page_size,
        };
        let page = self.log.query(&query).await?;
        Ok(Response::new(proto::QueryResponse {
            records: page.records.into_iter().map(Into::into).collect(),
            next_page_token: page
                .next_after
                .map(|seq| seq.to_string())
                .unwrap_or_default(),
        }))
    }

    type ExportStream = ExportStream;

    async fn export(
        &self,
        request: Request<proto::ExportRequest>,
    ) -> Result<Response<Self::ExportStream>, Status> {
        let request = request.into_inner();
        // Bad bounds fail the call itself, not the stream.
        if request.since_ms < 0 {
            return Err(
                AuditError::invalid("since_ms", "must not be negative (0 means open)").into(),
            );
        }
        if request.until_ms < 0 {
            return Err(
                AuditError::invalid("until_ms", "must not be negative (0 means open)").into(),
            );
        }
        if request.since_ms > 0 && request.until_ms > 0 && request.until_ms <= request.since_ms {
            return Err(AuditError::invalid("until_ms", "must be after since_ms").into());
        }
        let (sender, receiver) = mpsc::channel(EXPORT_BUFFER);
        let log = self.log.clone();
        tokio::spawn(async move {
            if let Err(error) = log
                .export_into(request.since_ms, request.until_ms, &sender)
                .await
            {
                tracing::warn!(%error, "export failed");
                let _ = sender.send(Err(error)).await;
            }
        });
        let stream = ReceiverStream::new(receiver)
            .map(|item| item.map(proto::ExportItem::from).map_err(Status::from));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn verify(
        &self,
        _request: Request<proto::VerifyRequest>,
    ) -> Result<Response<proto::VerifyResponse>, Status> {
        let verified = self.log.verify().await?;
        Ok(Response::new(proto::VerifyResponse {
            ok: verified.ok,
            records_checked: verified.records_checked,
            checkpoints_checked: verified.checkpoints_checked,
            first_bad_seq: verified.first_bad_seq,
            reason: verified.reason,
        }))
    }

    async fn public_key(
        &self,
        _request: Request<proto::PublicKeyRequest>,
    ) -> Result<Response<proto::PublicKeyResponse>, Status> {
        let key = self.log.public_key();
        Ok(Response::new(proto::PublicKeyResponse {
            public_key: key.to_bytes().to_vec(),
            key_id: key.key_id(),
            pem: key.to_pem(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_are_sequence_numbers() {
        assert_eq!(parse_page_token("").ok(), Some(0));
        assert_eq!(parse_page_token("42").ok(), Some(42));
        let error = parse_page_token("x1").err().map(|error| error.to_string());
        assert!(
            error
                .as_deref()
                .is_some_and(|error| error.starts_with("page_token:")),
            "{error:?}"
        );
    }
}
