//! `shamal whoami`: who the registry commands act as: the subject, client,
//! tenant, groups, roles and expiry of the token they send.

use serde_json::{Value, json};
use shamal_auth::Role;

use crate::client::{CliError, CliResult, LOGIN_HINT, Output, RegistryOpts};
use crate::output::{print_fields, print_json, time};

#[derive(Debug, clap::Args)]
pub struct WhoamiArgs {
    /// The claim holding the roles (dotted paths reach into objects), as
    /// the services' `oidc_roles_claim`.
    #[arg(long, default_value = "roles", value_name = "CLAIM")]
    roles_claim: String,
    /// The claim holding the tenant, as the services' `oidc_tenant_claim`.
    #[arg(long, default_value = "tenant", value_name = "CLAIM")]
    tenant_claim: String,
    /// The claim holding the groups, as the services' `oidc_groups_claim`.
    #[arg(long, default_value = "groups", value_name = "CLAIM")]
    groups_claim: String,
}

/// The values of a claim that is an array of strings or one
/// (space-separated when `split`) string, as the validator reads them.
fn strings(value: Option<&Value>, split: bool) -> Vec<String> {
    match value {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        Some(Value::String(text)) if split => text.split_whitespace().map(str::to_owned).collect(),
        Some(Value::String(text)) => vec![text.clone()],
        _ => Vec::new(),
    }
}

pub async fn run(args: WhoamiArgs, opts: &RegistryOpts) -> CliResult<()> {
    let explicit = opts
        .token
        .as_deref()
        .map(str::trim)
        .filter(|token| !token.is_empty());
    let (token, source) = match explicit {
        Some(token) => (token.to_owned(), "--token / SHAMAL_TOKEN".to_owned()),
        None => match crate::login::stored_access_token().await? {
            Some(token) => (
                token,
                format!(
                    "shamal login ({})",
                    crate::login::credentials_path()?.display()
                ),
            ),
            None => return Err(CliError::Unauthenticated(LOGIN_HINT.to_owned())),
        },
    };
    // Decoded without checking the signature: this is the user's own
    // token, shown to them; the services verify it on every call.
    let (_, claims) = shamal_auth::decode_unverified(&token).map_err(|error| {
        CliError::Unauthenticated(format!(
            "the token ({source}) is not a JWT the services can read: {error}"
        ))
    })?;
    let text = |name: &str| claims.string(name).ok().flatten().map(str::to_owned);
    let subject = text("sub");
    let client_id = text("client_id").or_else(|| text("azp"));
    let tenant = text(&args.tenant_claim);
    let groups = strings(claims.get(&args.groups_claim), false);
    let claimed = strings(claims.get(&args.roles_claim), true);
    let (roles, ignored): (Vec<String>, Vec<String>) = claimed
        .into_iter()
        .partition(|name| Role::from_name(name).is_some());
    let expires_at = claims
        .numeric_date("exp")
        .ok()
        .flatten()
        .map(|exp| exp as i64);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs() as i64);
    let audience = claims.get("aud").cloned().unwrap_or(Value::Null);
    if opts.output == Output::Json {
        print_json(&json!({
            "subject": subject,
            "client_id": client_id,
            "tenant": tenant,
            "groups": groups,
            "roles": roles,
            "ignored_roles": ignored,
            "issuer": text("iss"),
            "audience": audience,
            "expires_at": expires_at,
            "expired": expires_at.is_some_and(|exp| exp <= now),
            "source": source,
        }));
        return Ok(());
    }
    let expiry = match expires_at {
        Some(exp) if exp <= now => format!("{} UTC (expired)", time(&json!(exp * 1000))),
        Some(exp) => format!(
            "{} UTC (in {})",
            time(&json!(exp * 1000)),
            duration(exp - now)
        ),
        None => "-".to_owned(),
    };
    let list = |items: &[String]| {
        if items.is_empty() {
            "-".to_owned()
        } else {
            items.join(", ")
        }
    };
    let mut fields = vec![
        ("subject", subject.unwrap_or_else(|| "-".to_owned())),
        ("client id", client_id.unwrap_or_else(|| "-".to_owned())),
        ("tenant", tenant.unwrap_or_else(|| "-".to_owned())),
        ("groups", list(&groups)),
        ("roles", list(&roles)),
    ];
    if !ignored.is_empty() {
        fields.push(("ignored roles", list(&ignored)));
    }
    fields.push(("issuer", text("iss").unwrap_or_else(|| "-".to_owned())));
    fields.push(("audience", list(&strings(Some(&audience), false))));
    fields.push(("expires", expiry));
    fields.push(("token from", source));
    print_fields(&fields);
    Ok(())
}

/// `1h 5m`, `42s`.
fn duration(seconds: i64) -> String {
    match seconds {
        s if s >= 3600 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m {}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_roles_and_groups_as_the_validator_does() {
        let roles = json!("viewer release-manager");
        assert_eq!(strings(Some(&roles), true), ["viewer", "release-manager"]);
        let groups = json!(["ops", 3, "ml"]);
        assert_eq!(strings(Some(&groups), false), ["ops", "ml"]);
        assert_eq!(strings(Some(&json!("a b")), false), ["a b"]);
        assert!(strings(None, true).is_empty());
        assert_eq!(duration(3725), "1h 2m");
        assert_eq!(duration(61), "1m 1s");
    }
}
