//! Who a request is and what it may do: static bearer tokens and JSON Web
//! Tokens become a [`Principal`] (a role, the user, the VMs it may open);
//! [`Need`] names what an endpoint asks for.
//!
//! Pure checks over immutable data (the verifier is built once at start and
//! shared read-only), so both planes could call them. Must not depend on
//! `crate::control`, `crate::dataplane`, `crate::io`, `crate::plane` or
//! `tokio`: it knows nothing of HTTP beyond the token's text.

pub mod jwt;

pub use crate::config::appliance::Role;
pub use jwt::JwtVerifier;

/// Longest user name (`sub`).
pub const MAX_USER_BYTES: usize = 256;
/// Most entries of a `vms` claim (each is matched per console open).
pub const MAX_VM_PATTERNS: usize = 256;
/// Longest entry of a `vms` claim.
pub const MAX_VM_PATTERN_BYTES: usize = 256;

/// Why a bearer token was refused. Each has a stable kind for the metrics
/// and a message for the caller that says what to fix, never the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the token expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token's issuer is not the one configured")]
    WrongIssuer,
    #[error("the token is not meant for this service (aud)")]
    WrongAudience,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token is not signed with the configured algorithm")]
    WrongAlgorithm,
    #[error("not a well-formed token")]
    Malformed,
    #[error("the token's {0:?} claim is missing or unusable")]
    BadClaim(&'static str),
    #[error("the token grants no known role (viewer, operator, admin)")]
    NoRole,
    #[error("unknown token")]
    Unknown,
}

impl AuthError {
    /// The refusal's kind, as counted (`consolegate_errors_total{cause}`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Expired => "auth_jwt_expired",
            Self::NotYetValid => "auth_jwt_not_yet_valid",
            Self::WrongIssuer => "auth_jwt_wrong_issuer",
            Self::WrongAudience => "auth_jwt_wrong_audience",
            Self::BadSignature => "auth_jwt_bad_signature",
            Self::WrongAlgorithm => "auth_jwt_wrong_algorithm",
            Self::Malformed => "auth_jwt_malformed",
            Self::BadClaim(_) => "auth_jwt_bad_claim",
            Self::NoRole => "auth_jwt_no_role",
            Self::Unknown => "auth_bad_token",
        }
    }
}

/// The VMs a principal may open consoles of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmGrant {
    All,
    /// VM ids or glob patterns (`*` any run of characters, `?` one).
    Patterns(Vec<String>),
}

impl VmGrant {
    /// Whether any of `names` (a VM's id, its native id) is granted.
    pub fn allows(&self, names: &[&str]) -> bool {
        match self {
            Self::All => true,
            Self::Patterns(p) => p
                .iter()
                .any(|pattern| names.iter().any(|n| glob_match(pattern, n))),
        }
    }
}

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub role: Role,
    /// The user (a JWT's `sub`); `None` for a static token (a service).
    pub user: Option<String>,
    pub vms: VmGrant,
}

impl Principal {
    /// A static `[[auth.tokens]]` entry: a service, no user, every VM.
    pub fn service(role: Role) -> Self {
        Self {
            role,
            user: None,
            vms: VmGrant::All,
        }
    }

    /// Sees every session and the appliance's own figures (not only its
    /// user's consoles).
    pub fn sees_all(&self) -> bool {
        self.role != Role::Viewer
    }

    /// May see or end a session of `owner`.
    pub fn owns(&self, owner: &str) -> bool {
        self.sees_all() || self.user.as_deref() == Some(owner)
    }

    pub fn has(&self, need: Need) -> bool {
        use Role::*;
        match need {
            Need::Any => true,
            Need::ReadAll => matches!(self.role, Read | Operator | Admin),
            Need::OpenConsole => matches!(self.role, Viewer | Operator | Admin),
            Need::Operate => matches!(self.role, Operator | Admin),
            Need::Admin => self.role == Admin,
        }
    }
}

/// What an endpoint asks of its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Any principal (what it then sees may be limited to its own).
    Any,
    /// The appliance's figures and every session: read, operator, admin.
    ReadAll,
    /// Open and end (own) consoles: viewer, operator, admin.
    OpenConsole,
    /// Raw targets, any VM, power, any session: operator, admin.
    Operate,
    /// The appliance's own switches: admin.
    Admin,
}

impl Need {
    /// The refusal's message.
    pub fn describe(&self) -> &'static str {
        match self {
            Need::Any => "any role",
            Need::ReadAll => "the read, operator or admin role",
            Need::OpenConsole => "the viewer, operator or admin role",
            Need::Operate => "the operator or admin role",
            Need::Admin => "the admin role",
        }
    }
}

/// Glob match: `*` any run (also empty), `?` exactly one character; every
/// other character literal. Iterative with one backtrack point, so the
/// cost is O(pattern × name) at worst, never exponential.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || (p[pi] != '*' && p[pi] == n[ni])) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("vm-1", "vm-1"));
        assert!(!glob_match("vm-1", "vm-10"));
        assert!(glob_match("vm-*", "vm-10"));
        assert!(glob_match("vm-*", "vm-"));
        assert!(glob_match("*", ""));
        assert!(glob_match("qemu:*-web", "qemu:eu-web"));
        assert!(!glob_match("qemu:*-web", "vsphere:eu-web"));
        assert!(glob_match("vm-?", "vm-7"));
        assert!(!glob_match("vm-?", "vm-77"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("a*b*c", "axxbyy"));
        assert!(glob_match("é*", "été"));
        // Pathological patterns stay cheap (no exponential backtracking).
        let long = "a".repeat(200);
        assert!(!glob_match(
            &format!("{}c", "a*".repeat(100)),
            &format!("{long}b")
        ));
    }

    #[test]
    fn roles_and_ownership() {
        let viewer = Principal {
            role: Role::Viewer,
            user: Some("alice".into()),
            vms: VmGrant::Patterns(vec!["web-*".into()]),
        };
        assert!(viewer.has(Need::OpenConsole) && viewer.has(Need::Any));
        assert!(!viewer.has(Need::ReadAll) && !viewer.has(Need::Operate));
        assert!(viewer.owns("alice") && !viewer.owns("bob"));
        assert!(viewer.vms.allows(&["qemu:web-1", "web-1"]));
        assert!(!viewer.vms.allows(&["qemu:db-1", "db-1"]));
        assert!(!VmGrant::Patterns(Vec::new()).allows(&["x"]));
        let read = Principal::service(Role::Read);
        assert!(read.has(Need::ReadAll) && !read.has(Need::OpenConsole));
        assert!(read.owns("bob"));
        let op = Principal::service(Role::Operator);
        assert!(op.has(Need::Operate) && !op.has(Need::Admin));
        assert!(Principal::service(Role::Admin).has(Need::Admin));
    }
}
