//! Who may call what: bearer tokens with roles, stored as SHA-256 hashes in the config.
//! With no token configured the API is open (loopback development); with any, every call
//! must carry one.

use sha2::{Digest, Sha256};
use tonic::{Request, Status};

/// What a caller may do. Each operator role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Read and watch.
    Viewer,
    /// Submit, stop, restart, ack, resolve.
    Operator,
    /// Nodes and configuration.
    Admin,
    /// A node agent's session; nothing else.
    Node,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            "node" => Some(Role::Node),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::Node => "node",
        }
    }

    fn allows(self, need: Role) -> bool {
        match (self, need) {
            (Role::Node, Role::Node) => true,
            (Role::Node, _) | (_, Role::Node) => false,
            (have, need) => have >= need,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Token {
    pub name: String,
    pub role: Role,
    pub sha256: [u8; 32],
}

#[derive(Debug, Clone, Default)]
pub struct Auth {
    pub tokens: Vec<Token>,
    /// Client certificates are verified against a CA: a certificate's common name
    /// `ROLE:NAME` is an identity, and a caller needs a token or a certificate.
    pub mtls: bool,
}

/// The common name of the client certificate a TLS peer presented, if any.
pub fn peer_common_name<T>(request: &Request<T>) -> Option<String> {
    let certs = request.peer_certs()?;
    let der = certs.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    Some(cn)
}

impl Auth {
    /// The caller's name if the request may do what `need` allows.
    pub fn check<T>(&self, request: &Request<T>, need: Role) -> Result<String, Status> {
        let header = request.metadata().get("authorization");
        if header.is_none() || self.tokens.is_empty() {
            if let Some(cn) = peer_common_name(request).filter(|_| self.mtls) {
                return check_certificate(&cn, need);
            }
            if self.tokens.is_empty() && !self.mtls {
                return Ok(request.remote_addr().map_or_else(
                    || "anonymous".to_string(),
                    |a| format!("anonymous@{}", a.ip()),
                ));
            }
        }
        let header = header.ok_or_else(|| {
            Status::unauthenticated("no token and no client certificate: send `authorization: Bearer TOKEN` (muster reads MUSTER_TOKEN) or connect with a certificate")
        })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer TOKEN`"))?;
        let digest: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        // Compare every stored hash in full, so timing says nothing about which matched.
        let mut found = None;
        for t in &self.tokens {
            let same = t
                .sha256
                .iter()
                .zip(digest.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
            if same && found.is_none() {
                found = Some(t);
            }
        }
        let token = found.ok_or_else(|| Status::unauthenticated("unknown token"))?;
        if !token.role.allows(need) {
            return Err(Status::permission_denied(format!(
                "{} has role {}; this call needs {}",
                token.name,
                token.role.as_str(),
                need.as_str()
            )));
        }
        Ok(token.name.clone())
    }
}

/// A verified client certificate's `ROLE:NAME` as a caller.
fn check_certificate(cn: &str, need: Role) -> Result<String, Status> {
    let (role, name) = cn.split_once(':').ok_or_else(|| {
        Status::permission_denied(format!("certificate {cn:?} names no role (ROLE:NAME)"))
    })?;
    let role = Role::parse(role).ok_or_else(|| {
        Status::permission_denied(format!("certificate {cn:?} names an unknown role"))
    })?;
    if !role.allows(need) {
        return Err(Status::permission_denied(format!(
            "{name} has role {}; this call needs {}",
            role.as_str(),
            need.as_str()
        )));
    }
    Ok(name.to_string())
}

/// Hex SHA-256 of a token, as the config stores it.
pub fn hash_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn parse_hex(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth {
            mtls: false,
            tokens: vec![
                Token {
                    name: "vera".into(),
                    role: Role::Viewer,
                    sha256: parse_hex(&hash_hex("v-token")).unwrap(),
                },
                Token {
                    name: "otto".into(),
                    role: Role::Operator,
                    sha256: parse_hex(&hash_hex("o-token")).unwrap(),
                },
            ],
        }
    }

    fn with_token(token: &str) -> Request<()> {
        let mut r = Request::new(());
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        r
    }

    #[test]
    fn roles_allow_what_they_include() {
        let a = auth();

        assert_eq!(
            a.check(&with_token("o-token"), Role::Viewer).unwrap(),
            "otto"
        );
        assert_eq!(
            a.check(&with_token("v-token"), Role::Operator)
                .unwrap_err()
                .code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            a.check(&with_token("nope"), Role::Viewer)
                .unwrap_err()
                .code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            a.check(&Request::new(()), Role::Viewer).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            a.check(&with_token("o-token"), Role::Node)
                .unwrap_err()
                .code(),
            tonic::Code::PermissionDenied
        );
    }
}
