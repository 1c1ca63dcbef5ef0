//! Extractors whose rejections are JSON errors naming the field at fault
//! (axum's own answer in plain text).

use std::error::Error as _;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, StatusCode, header};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use utoipa::IntoParams;

use super::api_error::ApiError;
use crate::error::RegistryError;

/// Who a write is attributed to when auth is off (with auth on, the
/// token's subject: the header is refused).
pub const ACTOR_HEADER: &str = "x-shamal-actor";

const MAX_ACTOR_CHARS: usize = 256;

/// A JSON request body (`Content-Type: application/json`), every
/// deserialisation error reported with the path of the field at fault.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        check_json_content_type(request.headers())?;
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::from(RegistryError::PayloadTooLarge(format!(
                        "JSON bodies are limited to {} bytes",
                        super::MAX_JSON_BYTES
                    )))
                } else {
                    ApiError::invalid("body", rejection.body_text())
                }
            })?;
        parse_json(&bytes).map(ApiJson)
    }
}

fn check_json_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the body must be JSON, sent with Content-Type: application/json",
        )
        .with_field("content-type"));
    };
    let essence = value
        .to_str()
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let json = essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"));
    if json {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("the body must be JSON (Content-Type: application/json), not '{essence}'"),
        )
        .with_field("content-type"))
    }
}

/// Parses a JSON body into `T`; errors name the field (`splits[1].weight`,
/// `guard_rails.max_error_rate`) or `body` for syntax errors.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid("body", "a JSON object is required"));
    }
    match axum::Json::<T>::from_bytes(bytes) {
        Ok(axum::Json(value)) => Ok(value),
        Err(JsonRejection::JsonDataError(error)) => {
            // axum's error displays as "<path>: <serde_json message>" (path
            // omitted at the top level); the plain message is what
            // serde_json alone says, so what precedes it is the path.
            let with_path = error.source().map(ToString::to_string).unwrap_or_default();
            let plain = serde_json::from_slice::<T>(bytes)
                .err()
                .map(|error| error.to_string())
                .unwrap_or_else(|| with_path.clone());
            let path = with_path
                .strip_suffix(plain.as_str())
                .and_then(|prefix| prefix.strip_suffix(": "))
                .filter(|prefix| !prefix.is_empty() && *prefix != ".");
            let (field, message) = describe(path, &plain);
            Err(ApiError::invalid(&field, message))
        }
        Err(JsonRejection::JsonSyntaxError(error)) => {
            let detail = error
                .source()
                .map(ToString::to_string)
                .unwrap_or_else(|| error.body_text());
            Err(ApiError::invalid(
                "body",
                format!("malformed JSON: {detail}"),
            ))
        }
        Err(other) => Err(ApiError::invalid("body", other.body_text())),
    }
}

/// The field a serde error is about and a message without the position
/// suffix.
fn describe(path: Option<&str>, message: &str) -> (String, String) {
    let message = strip_position(message);
    let named = |prefix: &str| {
        message
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('`').next())
    };
    let field = if let Some(name) = named("missing field `") {
        // Reported at the object that lacks it.
        match path {
            Some(path) => format!("{path}.{name}"),
            None => name.to_owned(),
        }
    } else if let Some(name) = named("unknown field `").or_else(|| named("duplicate field `")) {
        // Reported at the field itself when the path is known.
        path.map_or_else(|| name.to_owned(), str::to_owned)
    } else {
        path.unwrap_or("body").to_owned()
    };
    (field, message.to_owned())
}

fn strip_position(message: &str) -> &str {
    match message.rfind(" at line ") {
        Some(index)
            if message[index..]
                .trim_start_matches(" at line ")
                .split(" column ")
                .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit())) =>
        {
            &message[..index]
        }
        _ => message,
    }
}

/// The path parameters of a route, decoded; bad UTF-8 names the parameter.
pub struct PathParams(Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for PathParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        use axum::extract::path::ErrorKind;
        use axum::extract::rejection::PathRejection;
        match Path::<Vec<(String, String)>>::from_request_parts(parts, state).await {
            Ok(Path(params)) => Ok(PathParams(params)),
            Err(PathRejection::FailedToDeserializePathParams(error)) => match error.kind() {
                ErrorKind::InvalidUtf8InPathParam { key } => {
                    Err(ApiError::invalid(key, "is not valid UTF-8"))
                }
                ErrorKind::ParseErrorAtKey { key, .. }
                | ErrorKind::DeserializeError { key, .. } => {
                    Err(ApiError::invalid(key, error.body_text()))
                }
                _ => Err(ApiError::invalid("path", error.body_text())),
            },
            Err(other) => Err(ApiError::invalid("path", other.body_text())),
        }
    }
}

impl PathParams {
    /// A string parameter (empty when the route has none of that name).
    pub fn get(&self, key: &str) -> &str {
        self.0
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value.as_str())
            .unwrap_or_default()
    }

    pub fn name(&self) -> &str {
        self.get("name")
    }

    /// The `{version}` parameter: a version number.
    pub fn version(&self) -> Result<u64, ApiError> {
        let text = self.get("version");
        if !text.is_empty() && text.bytes().all(|byte| byte.is_ascii_digit()) {
            text.parse::<u64>().map_err(|_| {
                ApiError::invalid("version", format!("version {text} is out of range"))
            })
        } else {
            Err(ApiError::invalid(
                "version",
                format!("must be a version number (a positive integer), not '{text}'"),
            ))
        }
    }
}

/// `?page_size=&page_token=` of list endpoints; unknown or repeated
/// parameters are refused. Every list endpoint documents its paging with
/// this one struct (`params(PageQuery)`). The extractor parses the query by
/// hand rather than through `Deserialize`, so that each error names the
/// parameter at fault and an empty `page_token` means the first page.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Items per page (default 50)
    #[param(minimum = 1, maximum = 500)]
    pub page_size: Option<u32>,
    /// `next_page_token` of the previous page
    pub page_token: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for PageQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let pairs = Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
            .map_err(|rejection| ApiError::invalid("query", rejection.body_text()))?
            .0;
        let mut query = PageQuery::default();
        let mut seen_size = false;
        let mut seen_token = false;
        for (key, value) in pairs {
            match key.as_str() {
                "page_size" => {
                    if std::mem::replace(&mut seen_size, true) {
                        return Err(ApiError::invalid("page_size", "is given more than once"));
                    }
                    let size = value.trim().parse::<u32>().map_err(|_| {
                        ApiError::invalid(
                            "page_size",
                            format!("must be an integer between 1 and 500, not '{value}'"),
                        )
                    })?;
                    query.page_size = Some(size);
                }
                "page_token" => {
                    if std::mem::replace(&mut seen_token, true) {
                        return Err(ApiError::invalid("page_token", "is given more than once"));
                    }
                    if !value.is_empty() {
                        query.page_token = Some(value);
                    }
                }
                other => {
                    return Err(ApiError::invalid(
                        other,
                        "unknown query parameter (expected page_size or page_token)",
                    ));
                }
            }
        }
        Ok(query)
    }
}

/// `?include_gone=` of the worker list; unknown parameters are refused.
#[derive(Debug, Default)]
pub struct WorkersQuery {
    pub include_gone: bool,
}

impl<S: Send + Sync> FromRequestParts<S> for WorkersQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let pairs = Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
            .map_err(|rejection| ApiError::invalid("query", rejection.body_text()))?
            .0;
        let mut query = WorkersQuery::default();
        for (key, value) in pairs {
            match key.as_str() {
                "include_gone" => {
                    query.include_gone = match value.as_str() {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => {
                            return Err(ApiError::invalid(
                                "include_gone",
                                format!("must be true or false, not '{value}'"),
                            ));
                        }
                    };
                }
                other => {
                    return Err(ApiError::invalid(
                        other,
                        "unknown query parameter (expected include_gone)",
                    ));
                }
            }
        }
        Ok(query)
    }
}

/// Who a write is attributed to: with auth on, the authenticated
/// principal (the token's subject and client, or a service's identity),
/// and a request that also names an actor in `x-shamal-actor` is refused
/// rather than silently re-attributed; with auth off, that header (empty
/// when absent: the registry records `anonymous`).
pub struct Actor(pub String);

impl<S: Send + Sync> FromRequestParts<S> for Actor {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let principal = parts.extensions.get::<shamal_auth::Principal>();
        if let Some(principal) = principal
            && *principal != shamal_auth::Principal::Anonymous
        {
            if parts.headers.contains_key(ACTOR_HEADER) {
                return Err(ApiError::invalid(
                    ACTOR_HEADER,
                    "cannot be set when auth is on: changes are attributed to the caller's token",
                ));
            }
            return Ok(Actor(principal.actor()));
        }
        let Some(value) = parts.headers.get(ACTOR_HEADER) else {
            return Ok(Actor(String::new()));
        };
        let text = std::str::from_utf8(value.as_bytes())
            .map_err(|_| ApiError::invalid(ACTOR_HEADER, "must be UTF-8 text"))?
            .trim();
        if text.chars().count() > MAX_ACTOR_CHARS || text.chars().any(char::is_control) {
            return Err(ApiError::invalid(
                ACTOR_HEADER,
                format!("must be at most {MAX_ACTOR_CHARS} printable characters"),
            ));
        }
        Ok(Actor(text.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::model::{SetPolicy, StartRollout};

    fn field_of<T: DeserializeOwned>(json: &str) -> (String, String) {
        let error = parse_json::<T>(json.as_bytes()).err().unwrap();
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        (
            error.body.error.field.unwrap_or_default(),
            error.body.error.message,
        )
    }

    #[test]
    fn json_errors_name_the_field() {
        let (field, message) =
            field_of::<StartRollout>(r#"{"expected_revision": 0, "candidate": "x", "weight": 5}"#);
        assert_eq!(field, "candidate");
        assert!(message.contains("invalid type"), "{message}");
        assert!(!message.contains("line"), "{message}");
        let (field, _) = field_of::<StartRollout>(r#"{"expected_revision": 0, "weight": 5}"#);
        assert_eq!(field, "candidate");
        let (field, _) = field_of::<StartRollout>(
            r#"{"expected_revision": 0, "candidate": 2, "weight": 5, "bogus": 1}"#,
        );
        assert_eq!(field, "bogus");
        let (field, _) = field_of::<StartRollout>(
            r#"{"expected_revision": 0, "candidate": 2, "weight": 5, "guard_rails": {"max_error_rate": "high"}}"#,
        );
        assert_eq!(field, "guard_rails.max_error_rate");
        let (field, _) = field_of::<StartRollout>(
            r#"{"expected_revision": 0, "candidate": 2, "weight": 5, "shadow": {"percent": 5}}"#,
        );
        assert_eq!(field, "shadow.version");
        let (field, _) = field_of::<SetPolicy>(
            r#"{"expected_revision": 0, "stable": 1, "splits": [{"version": 1, "weight": 50}, {"version": 2, "weight": -1}]}"#,
        );
        assert_eq!(field, "splits[1].weight");
        let (field, message) = field_of::<StartRollout>(r#"{"expected_revision": 0,"#);
        assert_eq!(field, "body");
        assert!(message.contains("malformed JSON"), "{message}");
        let (field, _) = field_of::<StartRollout>("[1, 2]");
        assert_eq!(field, "body");
        let (field, _) = field_of::<StartRollout>("");
        assert_eq!(field, "body");
        let (field, _) = field_of::<StartRollout>(
            r#"{"expected_revision": 0, "candidate": 2, "weight": 5} trailing"#,
        );
        assert_eq!(field, "body");
    }
}
