//! Who may call what: bearer tokens with roles, stored as SHA-256 hashes in the config.
//! With no token configured the API is open (loopback development); with any, every call
//! must carry one.
//!
//! Tasks get tokens of their own (`MUSTER_TOKEN`): `mtt.TASK.MAC`, where MAC is an
//! HMAC-SHA256 of the task's name under a key only the controller holds. Such a token is
//! scoped to the task's subtree, whatever the configured tokens are, so a child submitted
//! with it always gets its parent link.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use tonic::{Request, Status};

const TASK_TOKEN_PREFIX: &str = "mtt.";

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
    /// Signs and checks task tokens; set from the controller's data directory.
    pub task_key: Option<TaskKey>,
}

/// Who is calling: a person or program with a role, or a task with its subtree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    /// Set for a task's token: the task whose subtree bounds every call.
    pub task: Option<String>,
}

impl Caller {
    fn person(name: String) -> Caller {
        Caller { name, task: None }
    }
}

/// The controller's secret for task tokens.
#[derive(Clone)]
pub struct TaskKey([u8; 32]);

impl std::fmt::Debug for TaskKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TaskKey(..)")
    }
}

impl TaskKey {
    /// Reads the key from `path`, or makes a new random one there (mode 0600).
    pub fn load_or_create(path: &std::path::Path) -> std::io::Result<TaskKey> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::read(path) {
            Ok(bytes) => {
                let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{} is not a 32-byte key", path.display()),
                    )
                })?;
                Ok(TaskKey(key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key: [u8; 32] = rand::random();
                let tmp = path.with_extension("tmp");
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)?;
                file.write_all(&key)?;
                file.sync_all()?;
                std::fs::rename(&tmp, path)?;
                Ok(TaskKey(key))
            }
            Err(e) => Err(e),
        }
    }

    pub fn from_bytes(key: [u8; 32]) -> TaskKey {
        TaskKey(key)
    }

    fn mac(&self, task: &str) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key size");
        mac.update(b"muster task token v1\0");
        mac.update(task.as_bytes());
        mac
    }

    /// The token a task's attempts get as `MUSTER_TOKEN`.
    pub fn token(&self, task: &str) -> String {
        let tag = self.mac(task).finalize().into_bytes();
        let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        format!("{TASK_TOKEN_PREFIX}{task}.{hex}")
    }

    /// The task a token was made for, if this key made it.
    pub fn verify(&self, token: &str) -> Option<String> {
        let rest = token.strip_prefix(TASK_TOKEN_PREFIX)?;
        let (task, hex) = rest.rsplit_once('.')?;
        let tag = parse_hex(hex)?;
        self.mac(task).verify_slice(&tag).ok()?;
        Some(task.to_string())
    }
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
    /// The caller if the request may do what `need` allows. A task's token passes for
    /// viewer and operator calls; what it may touch is its subtree, checked by the caller
    /// of this function against the tree.
    pub fn identify<T>(&self, request: &Request<T>, need: Role) -> Result<Caller, Status> {
        if let Some(token) = bearer(request)?.filter(|t| t.starts_with(TASK_TOKEN_PREFIX)) {
            let task = self
                .task_key
                .as_ref()
                .and_then(|key| key.verify(token))
                .ok_or_else(|| Status::unauthenticated("unknown task token"))?;
            if need > Role::Operator {
                return Err(Status::permission_denied(format!(
                    "the token of task {task} may only act on its own subtree; this call needs {}",
                    need.as_str()
                )));
            }
            return Ok(Caller {
                name: format!("task:{task}"),
                task: Some(task),
            });
        }
        self.check(request, need).map(Caller::person)
    }

    /// The caller's name if the request may do what `need` allows; task tokens are refused.
    pub fn check<T>(&self, request: &Request<T>, need: Role) -> Result<String, Status> {
        let token = bearer(request)?;
        if token.is_some_and(|t| t.starts_with(TASK_TOKEN_PREFIX)) {
            return Err(Status::permission_denied(
                "a task's token acts only on tasks of its own subtree; this call is about the fleet",
            ));
        }
        if token.is_none() || self.tokens.is_empty() {
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
        let token = token.ok_or_else(|| {
            Status::unauthenticated("no token and no client certificate: send `authorization: Bearer TOKEN` (muster reads MUSTER_TOKEN) or connect with a certificate")
        })?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
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

/// The bearer token of a request, if it carries an authorization header.
fn bearer<T>(request: &Request<T>) -> Result<Option<&str>, Status> {
    let Some(header) = request.metadata().get("authorization") else {
        return Ok(None);
    };
    header
        .to_str()
        .ok()
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })
        .map(|t| Some(t.trim()))
        .ok_or_else(|| Status::unauthenticated("authorization must be `Bearer TOKEN`"))
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
            task_key: None,
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
    fn task_tokens_name_their_task_and_nothing_else() {
        let mut a = auth();
        a.task_key = Some(TaskKey::from_bytes([7; 32]));
        let token = a.task_key.as_ref().unwrap().token("plan.v2");
        let caller = a.identify(&with_token(&token), Role::Operator).unwrap();
        assert_eq!(caller.task.as_deref(), Some("plan.v2"));
        assert_eq!(
            a.identify(&with_token(&token), Role::Admin)
                .unwrap_err()
                .code(),
            tonic::Code::PermissionDenied
        );
        // Calls outside the subtree model (nodes, admin) refuse it outright.
        assert_eq!(
            a.check(&with_token(&token), Role::Viewer)
                .unwrap_err()
                .code(),
            tonic::Code::PermissionDenied
        );
        // Another key's token, a renamed task and a cut MAC are all unknown.
        let other = TaskKey::from_bytes([8; 32]).token("plan.v2");
        let renamed = token.replacen("plan.v2", "plan.v3", 1);
        for bad in [other, renamed, token[..token.len() - 2].to_string()] {
            assert_eq!(
                a.identify(&with_token(&bad), Role::Viewer)
                    .unwrap_err()
                    .code(),
                tonic::Code::Unauthenticated,
                "{bad}"
            );
        }
        // A configured person's token still works through identify.
        assert_eq!(
            a.identify(&with_token("o-token"), Role::Operator)
                .unwrap()
                .task,
            None
        );
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
