//! The OpenAPI document, generated from the handlers' annotations.

use utoipa::openapi::path::{HttpMethod, Operation, ParameterBuilder, ParameterIn};
use utoipa::openapi::{
    ContentBuilder, ObjectBuilder, Ref, RefOr, Required, ResponseBuilder, Schema, Type,
};
use utoipa::{Modify, OpenApi};

use super::{
    access, admin, aliases, artifacts, meta, models, placement, residency, rollouts, versions,
    workers,
};
use crate::error::{ErrorBody, ErrorDetail};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Shamal registry API",
        version = "1",
        description = "Models, versions, content-addressed artifacts, aliases, rollouts, workers, placement and data-residency policies.\n\n\
Every error is a JSON `ErrorBody`: `{\"error\": {\"code\", \"message\", \"field\"?, \"current_revision\"?}}`. \
`field` names the request field at fault (`invalid_argument`); `current_revision` comes with a rollout \
`conflict`. Rollout writes carry the `expected_revision` the writer last saw and are refused with 409 \
when it is stale. Writes are attributed to the `x-shamal-actor` header (default `anonymous`)."
    ),
    paths(
        meta::openapi_document,
        models::list_models,
        models::create_model,
        models::get_model,
        versions::list_versions,
        versions::register_version,
        versions::get_version,
        versions::archive_version,
        versions::retry_version,
        artifacts::put_artifact,
        artifacts::get_artifact,
        artifacts::head_artifact,
        aliases::list_aliases,
        aliases::set_alias,
        aliases::delete_alias,
        rollouts::rollout_status,
        rollouts::start_rollout,
        rollouts::set_policy,
        rollouts::shift,
        rollouts::promote,
        rollouts::rollback,
        rollouts::pause,
        rollouts::resume,
        rollouts::history,
        workers::list_workers,
        workers::list_placements,
        placement::get_placement,
        placement::set_placement,
        residency::get_model_residency,
        residency::set_model_residency,
        residency::list_tenant_policies,
        residency::get_tenant_policy,
        residency::set_tenant_policy,
        residency::delete_tenant_policy,
        residency::residency_history,
        access::get_model_access,
        access::set_model_access,
        admin::rekey,
    ),
    components(schemas(ErrorBody, ErrorDetail)),
    modifiers(&CommonResponses),
    tags(
        (name = "models", description = "Named models"),
        (name = "versions", description = "Immutable model versions"),
        (name = "artifacts", description = "Content-addressed artifact bytes"),
        (name = "aliases", description = "Movable names for versions (e.g. `production`)"),
        (name = "rollouts", description = "Traffic policy: canaries, shadows, promotion and rollback"),
        (name = "workers", description = "Workers, their membership state and what they hold"),
        (name = "placement", description = "Placement policy: which workers hold which versions of a model"),
        (name = "residency", description = "Data residency: regions a model's or a tenant's requests may be processed in"),
        (name = "access", description = "Model access: a model limited to listed tenants or groups"),
        (name = "admin", description = "Operations on the registry itself: re-keying artifacts encrypted at rest"),
        (name = "meta", description = "This document"),
    )
)]
struct ApiDoc;

/// The OpenAPI document of the REST API.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let document = ApiDoc::openapi();
    // Timestamps are `Millis` (an i64 alias) in the model, which utoipa
    // files as a schema named `i64`: give it its real name and meaning.
    let Ok(mut json) = serde_json::to_value(&document) else {
        return document;
    };
    let Some(schemas) = json
        .pointer_mut("/components/schemas")
        .and_then(serde_json::Value::as_object_mut)
    else {
        return document;
    };
    if schemas.remove("i64").is_none() {
        return document;
    }
    schemas.insert(
        "Millis".to_owned(),
        serde_json::json!({
            "type": "integer",
            "format": "int64",
            "description": "Milliseconds since the Unix epoch (UTC)."
        }),
    );
    rename_refs(
        &mut json,
        "#/components/schemas/i64",
        "#/components/schemas/Millis",
    );
    serde_json::from_value(json).unwrap_or(document)
}

fn rename_refs(value: &mut serde_json::Value, from: &str, to: &str) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                if key == "$ref" && item.as_str() == Some(from) {
                    *item = serde_json::Value::String(to.to_owned());
                } else {
                    rename_refs(item, from, to);
                }
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                rename_refs(item, from, to);
            }
        }
        _ => {}
    }
}

/// Adds what every operation shares: the 500 response, the 413/415
/// responses of JSON bodies and the actor header of writes.
struct CommonResponses;

fn error_response(description: &str) -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build(),
    )
}

impl Modify for CommonResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.responses.insert(
            "InternalError".to_owned(),
            error_response("Internal error (`internal`); the registry log has the details"),
        );
        components.responses.insert(
            "UnsupportedMediaType".to_owned(),
            error_response("The body is not sent as `application/json` (`unsupported_media_type`)"),
        );
        components.responses.insert(
            "PayloadTooLarge".to_owned(),
            error_response("The JSON body exceeds 1 MiB (`payload_too_large`)"),
        );
        for (_path, item) in openapi.paths.paths.iter_mut() {
            let operations: [(HttpMethod, &mut Option<Operation>); 5] = [
                (HttpMethod::Get, &mut item.get),
                (HttpMethod::Head, &mut item.head),
                (HttpMethod::Post, &mut item.post),
                (HttpMethod::Put, &mut item.put),
                (HttpMethod::Delete, &mut item.delete),
            ];
            for (method, operation) in operations {
                let Some(operation) = operation else { continue };
                let responses = &mut operation.responses.responses;
                responses.insert(
                    "500".to_owned(),
                    RefOr::Ref(Ref::from_response_name("InternalError")),
                );
                let json_body = operation
                    .request_body
                    .as_ref()
                    .is_some_and(|body| body.content.contains_key("application/json"));
                if json_body {
                    responses
                        .entry("413".to_owned())
                        .or_insert_with(|| RefOr::Ref(Ref::from_response_name("PayloadTooLarge")));
                    responses.insert(
                        "415".to_owned(),
                        RefOr::Ref(Ref::from_response_name("UnsupportedMediaType")),
                    );
                }
                if matches!(
                    method,
                    HttpMethod::Post | HttpMethod::Put | HttpMethod::Delete
                ) {
                    let actor = ParameterBuilder::new()
                        .name(super::ACTOR_HEADER)
                        .parameter_in(ParameterIn::Header)
                        .required(Required::False)
                        .description(Some(
                            "Who makes the change, for the audit trail (default `anonymous`)",
                        ))
                        .schema(Some(Schema::Object(
                            ObjectBuilder::new()
                                .schema_type(Type::String)
                                .max_length(Some(256))
                                .build(),
                        )))
                        .build();
                    operation
                        .parameters
                        .get_or_insert_with(Vec::new)
                        .push(actor);
                }
            }
        }
    }
}
