//! Identity vouched for by a trusted proxy that terminated TLS.

use std::net::IpAddr;

use crate::error::ConfigError;

/// Header carrying the principal a trusted proxy authenticated.
pub const CLIENT_PRINCIPAL_HEADER: &str = "x-client-principal";

/// Header carrying the SHA-256 thumbprint (hex) of the client certificate a
/// trusted proxy verified.
pub const MTLS_THUMBPRINT_HEADER: &str = "x-mtls-thumbprint";

/// Header carrying the roles of the caller a trusted proxy or forwarding
/// node vouches for, comma-separated (the roles its bearer token carried
/// where it was authenticated). Accepted only alongside
/// [`CLIENT_PRINCIPAL_HEADER`] and from the same trusted senders.
pub const CLIENT_ROLES_HEADER: &str = "x-client-roles";

/// Addresses allowed to send [`CLIENT_PRINCIPAL_HEADER`] and
/// [`MTLS_THUMBPRINT_HEADER`]: single addresses or CIDR blocks. Anyone else
/// sending those headers is refused, never silently ignored, since it is
/// either a misconfiguration or an impersonation attempt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    networks: Vec<(IpAddr, u8)>,
}

impl TrustedProxies {
    /// No trusted proxies: the identity headers are refused from everyone.
    pub fn none() -> Self {
        Self::default()
    }

    /// Parses entries like `10.0.0.0/8`, `192.168.1.7` or `::1/128`, naming
    /// the first bad entry as `trusted_proxies[i]`.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, ConfigError> {
        let mut networks = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            let entry = entry.as_ref().trim();
            let field = || format!("trusted_proxies[{i}]");
            let (addr, prefix) = match entry.split_once('/') {
                Some((addr, prefix)) => (addr, Some(prefix)),
                None => (entry, None),
            };
            let addr: IpAddr = addr
                .parse()
                .map_err(|_| ConfigError::new(field(), format!("{entry:?} is not an IP address or CIDR block")))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let prefix = match prefix {
                None => max,
                Some(p) => p
                    .parse::<u8>()
                    .ok()
                    .filter(|p| *p <= max)
                    .ok_or_else(|| ConfigError::new(field(), format!("prefix length must be 0 to {max}")))?,
            };
            networks.push((normalize(addr), prefix));
        }
        Ok(Self { networks })
    }

    /// True when `addr` falls in one of the trusted networks. IPv4-mapped IPv6
    /// addresses count as their IPv4 address.
    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = normalize(addr);
        self.networks.iter().any(|(network, prefix)| match (network, addr) {
            (IpAddr::V4(n), IpAddr::V4(a)) => same_prefix(&n.octets(), &a.octets(), *prefix),
            (IpAddr::V6(n), IpAddr::V6(a)) => same_prefix(&n.octets(), &a.octets(), *prefix),
            _ => false,
        })
    }

    /// True when no proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
    }
}

fn normalize(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        IpAddr::V4(_) => addr,
    }
}

fn same_prefix(network: &[u8], addr: &[u8], prefix: u8) -> bool {
    let full = usize::from(prefix / 8);
    let rest = prefix % 8;
    if network[..full] != addr[..full] {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    network[full] & mask == addr[full] & mask
}

/// Checks a thumbprint header: 64 hex digits, optionally colon-separated;
/// returns it lowercase without colons.
pub(crate) fn normalize_thumbprint(value: &str) -> Option<String> {
    let hex: String = value.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())).then_some(hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn cidr_blocks_and_single_addresses_match() {
        let proxies =
            TrustedProxies::parse(&["10.0.0.0/8", "192.168.1.7", "fd00::/8", "172.16.0.0/12"]).expect("valid");
        assert!(proxies.contains(ip("10.200.3.4")));
        assert!(proxies.contains(ip("192.168.1.7")));
        assert!(!proxies.contains(ip("192.168.1.8")));
        assert!(proxies.contains(ip("fd12::1")));
        assert!(proxies.contains(ip("172.31.255.255")));
        assert!(!proxies.contains(ip("172.32.0.0")));
        assert!(proxies.contains(ip("::ffff:10.1.1.1")), "IPv4-mapped addresses count as IPv4");
        assert!(!TrustedProxies::none().contains(ip("127.0.0.1")));
    }

    #[test]
    fn bad_entries_name_their_index() {
        let err = TrustedProxies::parse(&["10.0.0.0/8", "not-an-ip"]).expect_err("bad entry");
        assert_eq!(err.field, "trusted_proxies[1]");
        let err = TrustedProxies::parse(&["10.0.0.0/33"]).expect_err("bad prefix");
        assert_eq!(err.field, "trusted_proxies[0]");
    }

    #[test]
    fn thumbprints_are_normalized() {
        let hex = "AB".repeat(32);
        assert_eq!(normalize_thumbprint(&hex), Some("ab".repeat(32)));
        let colons = vec!["ab"; 32].join(":");
        assert_eq!(normalize_thumbprint(&colons), Some("ab".repeat(32)));
        assert_eq!(normalize_thumbprint("abc"), None);
        assert_eq!(normalize_thumbprint(&"zz".repeat(32)), None);
    }
}
