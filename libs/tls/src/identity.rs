//! Service identities: the SPIFFE URI a certificate carries.

use std::fmt;

/// The identity a peer's certificate proves:
/// `spiffe://<trust_domain>/<service>/<id>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerIdentity {
    pub trust_domain: String,
    /// The kind of service (`router`, `worker`, `registry`, ...), which the
    /// RBAC table maps to a service role.
    pub service: String,
    /// Which instance (a worker id, a router id).
    pub id: String,
}

impl PeerIdentity {
    pub fn new(trust_domain: &str, service: &str, id: &str) -> PeerIdentity {
        PeerIdentity {
            trust_domain: trust_domain.to_owned(),
            service: service.to_owned(),
            id: id.to_owned(),
        }
    }

    /// Parses `spiffe://<trust-domain>/<service>/<id>`; `None` for any other
    /// shape (another scheme, missing or extra path segments, empty parts).
    pub fn from_uri(uri: &str) -> Option<PeerIdentity> {
        let rest = uri.strip_prefix("spiffe://")?;
        let mut parts = rest.split('/');
        let (trust_domain, service, id) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let sane = |part: &str| {
            !part.is_empty()
                && part.len() <= 255
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        };
        if !(sane(trust_domain) && sane(service) && sane(id)) {
            return None;
        }
        Some(PeerIdentity::new(trust_domain, service, id))
    }

    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/{}/{}",
            self.trust_domain, self.service, self.id
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_uris_round_trip_and_odd_shapes_are_refused() {
        let identity = PeerIdentity::from_uri("spiffe://shamal.local/worker/w-1").unwrap();
        assert_eq!(identity, PeerIdentity::new("shamal.local", "worker", "w-1"));
        assert_eq!(identity.uri(), "spiffe://shamal.local/worker/w-1");
        for bad in [
            "",
            "https://shamal.local/worker/w-1",
            "spiffe://shamal.local/worker",
            "spiffe://shamal.local/worker/w-1/extra",
            "spiffe:///worker/w-1",
            "spiffe://shamal.local//w-1",
            "spiffe://shamal.local/worker/w 1",
        ] {
            assert_eq!(PeerIdentity::from_uri(bad), None, "{bad:?}");
        }
    }
}
