//! Who is calling and what they may do.
//!
//! Every call to a Shamal API is made by a [`Principal`]: a service proving
//! its identity with an mTLS certificate ([`ServiceRole`]), a person or an
//! application presenting an OIDC access token ([`User`]), or nobody at all
//! when auth is off ([`Principal::Anonymous`], `shamal up` on loopback).
//! [`rbac`] is the one table that says which [`Permission`]s each role has;
//! deny by default.

pub mod authenticator;
pub mod bearer;
mod cache;
pub mod error;
pub mod http;
mod jwks;
pub mod jwt;
pub mod layer;
pub mod metrics;
pub mod principal;
pub mod rbac;
pub mod security;
pub mod settings;
pub mod validator;

pub use authenticator::{Authenticator, Credentials, Refusal, RefusalObserver};
pub use bearer::{MAX_TOKEN_LEN, bearer_token, parse_authorization};
pub use error::AuthError;
pub use jwt::{Algorithm, decode_unverified};
pub use principal::{Principal, ServiceRole, User};
pub use rbac::{Permission, Role};
pub use settings::{OidcSettings, SettingsError};
pub use validator::{OidcError, TokenValidator};
