//! Data residency: the regions a request may be processed in.
//!
//! Up to three policies apply to one inference request, and each can only
//! narrow the others:
//!
//! - the request's own list: request parameter `shamal-allowed-regions` or
//!   header `x-shamal-allowed-regions` (comma-separated region names);
//! - its tenant's default (`shamal-tenant` parameter or `x-shamal-tenant`
//!   header names the tenant; the registry holds the tenants' policies);
//! - the model's policy in the registry.
//!
//! The router sends the request, its retries and its shadow copy only to
//! workers whose declared region is in the intersection. An empty
//! intersection, or no worker in it, is refused with FAILED_PRECONDITION
//! naming the policies; nothing is ever sent elsewhere instead.

use std::collections::{BTreeSet, HashMap};
use std::fmt::Write as _;

use http::HeaderMap;
use shamal_proto::inference::InferParameter;
use shamal_proto::inference::infer_parameter::ParameterChoice;
use shamal_registry_client::names;
use tonic::Status;

/// Request parameter listing the regions a request allows.
pub const REGIONS_PARAMETER: &str = "shamal-allowed-regions";
/// Header (gRPC metadata) listing the regions a request allows.
pub const REGIONS_HEADER: &str = "x-shamal-allowed-regions";
/// Request parameter naming the caller's tenant.
pub const TENANT_PARAMETER: &str = "shamal-tenant";
/// Header (gRPC metadata) naming the caller's tenant.
pub const TENANT_HEADER: &str = "x-shamal-tenant";

/// The regions one request may be processed in, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionPolicy {
    allowed: BTreeSet<String>,
    /// Each policy that applied, for error messages and logs.
    sources: Vec<String>,
}

impl RegionPolicy {
    pub fn allows(&self, region: &str) -> bool {
        self.allowed.contains(region)
    }

    pub fn allowed(&self) -> impl Iterator<Item = &str> {
        self.allowed.iter().map(String::as_str)
    }

    /// The policies that applied, e.g. `request allows [me-central-1];
    /// model 'fraud' allows [me-central-1, me-south-1]`.
    pub fn describe(&self) -> String {
        self.sources.join("; ")
    }
}

fn list(regions: &BTreeSet<String>) -> String {
    let mut text = String::from("[");
    for (index, region) in regions.iter().enumerate() {
        if index > 0 {
            text.push_str(", ");
        }
        text.push_str(region);
    }
    text.push(']');
    text
}

fn text_value<'a>(
    parameters: &'a HashMap<String, InferParameter>,
    headers: &'a HeaderMap,
    parameter: &str,
    header: &str,
) -> Result<Option<(&'a str, &'static str)>, Status> {
    if let Some(choice) = parameters
        .get(parameter)
        .and_then(|value| value.parameter_choice.as_ref())
    {
        return match choice {
            ParameterChoice::StringParam(text) => Ok(Some((text.as_str(), "parameter"))),
            _ => Err(Status::invalid_argument(format!(
                "request parameter '{parameter}' must be a string"
            ))),
        };
    }
    match headers.get(header) {
        Some(value) => value
            .to_str()
            .map(|text| Some((text, "header")))
            .map_err(|_| {
                Status::invalid_argument(format!("header '{header}' must be visible ASCII"))
            }),
        None => Ok(None),
    }
}

/// The regions the request itself allows, when it says.
pub fn requested_regions(
    parameters: &HashMap<String, InferParameter>,
    headers: &HeaderMap,
) -> Result<Option<BTreeSet<String>>, Status> {
    let Some((text, kind)) = text_value(parameters, headers, REGIONS_PARAMETER, REGIONS_HEADER)?
    else {
        return Ok(None);
    };
    let field = if kind == "parameter" {
        format!("request parameter '{REGIONS_PARAMETER}'")
    } else {
        format!("header '{REGIONS_HEADER}'")
    };
    let mut regions = BTreeSet::new();
    for region in text.split(',').map(str::trim) {
        names::check_region(region).map_err(|message| {
            Status::invalid_argument(format!("{field}: {message} (a comma-separated list)"))
        })?;
        regions.insert(region.to_owned());
    }
    Ok(Some(regions))
}

/// The tenant the request names, when it does.
pub fn tenant<'a>(
    parameters: &'a HashMap<String, InferParameter>,
    headers: &'a HeaderMap,
) -> Result<Option<&'a str>, Status> {
    let Some((name, kind)) = text_value(parameters, headers, TENANT_PARAMETER, TENANT_HEADER)?
    else {
        return Ok(None);
    };
    let name = name.trim();
    if !names::is_tenant_name(name) {
        let field = if kind == "parameter" {
            format!("request parameter '{TENANT_PARAMETER}'")
        } else {
            format!("header '{TENANT_HEADER}'")
        };
        return Err(Status::invalid_argument(format!(
            "{field}: '{name}' is not a tenant name ({})",
            names::TENANT_RULE
        )));
    }
    Ok(Some(name))
}

/// Combines the policies that apply (each `None` when absent) into the
/// regions the request may use; `Ok(None)` when no policy restricts it.
/// FAILED_PRECONDITION when the policies leave no region at all.
pub fn combine(
    requested: Option<BTreeSet<String>>,
    tenant: Option<(&str, &[String])>,
    model: Option<(&str, &[String])>,
) -> Result<Option<RegionPolicy>, Status> {
    let mut allowed: Option<BTreeSet<String>> = None;
    let mut sources = Vec::new();
    let mut narrow = |set: BTreeSet<String>, source: String| {
        allowed = Some(match allowed.take() {
            None => set,
            Some(current) => current.intersection(&set).cloned().collect(),
        });
        sources.push(source);
    };
    if let Some(regions) = requested {
        let source = format!("request allows {}", list(&regions));
        narrow(regions, source);
    }
    if let Some((name, regions)) = tenant.filter(|(_, regions)| !regions.is_empty()) {
        let regions: BTreeSet<String> = regions.iter().cloned().collect();
        let source = format!("tenant '{name}' allows {}", list(&regions));
        narrow(regions, source);
    }
    if let Some((name, regions)) = model.filter(|(_, regions)| !regions.is_empty()) {
        let regions: BTreeSet<String> = regions.iter().cloned().collect();
        let source = format!("model '{name}' allows {}", list(&regions));
        narrow(regions, source);
    }
    let Some(allowed) = allowed else {
        return Ok(None);
    };
    let policy = RegionPolicy { allowed, sources };
    if policy.allowed.is_empty() {
        return Err(Status::failed_precondition(format!(
            "data residency: no region satisfies every policy ({})",
            policy.describe()
        )));
    }
    Ok(Some(policy))
}

/// The refusal when workers serve the model but none in an allowed region.
pub fn no_worker_in_region(model: &str, policy: &RegionPolicy) -> Status {
    let mut message = format!(
        "data residency: no available worker for model '{model}' in an allowed region {}",
        list(&policy.allowed)
    );
    let _ = write!(message, " ({})", policy.describe());
    Status::failed_precondition(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string_parameter(value: &str) -> InferParameter {
        InferParameter {
            parameter_choice: Some(ParameterChoice::StringParam(value.to_owned())),
        }
    }

    fn set(regions: &[&str]) -> BTreeSet<String> {
        regions.iter().map(|region| (*region).to_owned()).collect()
    }

    #[test]
    fn request_regions_come_from_the_parameter_then_the_header() {
        let mut headers = HeaderMap::new();
        headers.insert(REGIONS_HEADER, "me-south-1".parse().unwrap());
        let mut parameters = HashMap::new();
        assert_eq!(
            requested_regions(&parameters, &headers).unwrap(),
            Some(set(&["me-south-1"]))
        );
        parameters.insert(
            REGIONS_PARAMETER.to_owned(),
            string_parameter("me-central-1, me-south-1"),
        );
        assert_eq!(
            requested_regions(&parameters, &headers).unwrap(),
            Some(set(&["me-central-1", "me-south-1"]))
        );
        assert_eq!(
            requested_regions(&HashMap::new(), &HeaderMap::new()).unwrap(),
            None
        );
    }

    #[test]
    fn malformed_regions_and_tenants_name_the_field() {
        let mut parameters = HashMap::new();
        parameters.insert(REGIONS_PARAMETER.to_owned(), string_parameter("a,,b"));
        let status = requested_regions(&parameters, &HeaderMap::new()).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains(REGIONS_PARAMETER), "{status}");

        parameters.insert(
            REGIONS_PARAMETER.to_owned(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(3)),
            },
        );
        let status = requested_regions(&parameters, &HeaderMap::new()).unwrap_err();
        assert!(status.message().contains("must be a string"), "{status}");

        let mut headers = HeaderMap::new();
        headers.insert(TENANT_HEADER, "bad tenant!".parse().unwrap());
        let status = tenant(&HashMap::new(), &headers).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains(TENANT_HEADER), "{status}");
    }

    #[test]
    fn names_follow_the_registrys_rule() {
        // Any tenant the registry stores a policy for (up to 128
        // characters) can be named by a request ...
        let long_tenant = "t".repeat(100);
        let mut headers = HeaderMap::new();
        headers.insert(TENANT_HEADER, long_tenant.parse().unwrap());
        assert_eq!(
            tenant(&HashMap::new(), &headers).unwrap(),
            Some(long_tenant.as_str())
        );
        // ... and a region the registry would refuse is refused here too.
        let mut parameters = HashMap::new();
        parameters.insert(REGIONS_PARAMETER.to_owned(), string_parameter("-east"));
        let status = requested_regions(&parameters, &HeaderMap::new()).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("'-east'"), "{status}");
    }

    #[test]
    fn policies_only_narrow_and_an_empty_intersection_is_refused() {
        assert_eq!(combine(None, None, None).unwrap(), None);
        let tenant_regions = vec!["me-central-1".to_owned(), "me-south-1".to_owned()];
        let model_regions = vec!["me-south-1".to_owned(), "eu-west-1".to_owned()];
        let policy = combine(
            Some(set(&["me-south-1", "me-central-1", "us-east-1"])),
            Some(("acme", &tenant_regions)),
            Some(("fraud", &model_regions)),
        )
        .unwrap()
        .unwrap();
        assert_eq!(policy.allowed().collect::<Vec<_>>(), vec!["me-south-1"]);
        assert!(policy.allows("me-south-1"));
        assert!(!policy.allows("us-east-1"));
        assert!(policy.describe().contains("tenant 'acme'"));
        assert!(policy.describe().contains("model 'fraud'"));

        let status = combine(
            Some(set(&["us-east-1"])),
            None,
            Some(("fraud", &model_regions)),
        )
        .unwrap_err();
        assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        assert!(status.message().contains("model 'fraud'"), "{status}");

        // An empty model policy means "no restriction", not "nowhere".
        let policy = combine(None, None, Some(("open", &[]))).unwrap();
        assert_eq!(policy, None);
    }
}
