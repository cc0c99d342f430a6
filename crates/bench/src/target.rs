//! What is measured: a moe.v1 gRPC endpoint or an upstream llama-server, loopback only.

use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::str::FromStr;

/// The endpoint under load. Only loopback addresses are accepted: this tool generates load and
/// must never be pointed at someone else's server by accident.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `moe.v1.Inference/Generate` of a worker or gateway.
    Grpc { addr: SocketAddr },
    /// llama-server's `POST /completion` with SSE streaming.
    LlamaServer { addr: SocketAddr },
}

impl Target {
    pub fn addr(&self) -> SocketAddr {
        match self {
            Target::Grpc { addr } | Target::LlamaServer { addr } => *addr,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Target::Grpc { .. } => "grpc",
            Target::LlamaServer { .. } => "llama-server",
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.kind(), self.addr())
    }
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (scheme, rest) = s.split_once("://").ok_or_else(|| {
            format!("{s:?}: expected grpc://HOST:PORT or llama-server://HOST:PORT")
        })?;
        let hostport = rest.trim_end_matches('/');
        let addr = hostport
            .to_socket_addrs()
            .map_err(|e| format!("{hostport:?}: {e}"))?
            .next()
            .ok_or_else(|| format!("{hostport:?}: no address"))?;
        if !is_loopback(addr.ip()) {
            return Err(format!(
                "{hostport:?} is not a loopback address; moe-bench only loads local servers"
            ));
        }
        match scheme {
            "grpc" => Ok(Target::Grpc { addr }),
            "llama-server" => Ok(Target::LlamaServer { addr }),
            other => Err(format!(
                "unknown scheme {other:?}: use grpc or llama-server"
            )),
        }
    }
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_loopback_targets_of_both_kinds() {
        let g: Target = "grpc://127.0.0.1:50061".parse().unwrap();
        assert_eq!(g.kind(), "grpc");
        let l: Target = "llama-server://[::1]:8080/".parse().unwrap();
        assert_eq!(l.addr().port(), 8080);
    }

    #[test]
    fn refuses_non_loopback_and_unknown_schemes() {
        assert!("grpc://10.1.2.3:50061".parse::<Target>().is_err());
        assert!("http://127.0.0.1:8080".parse::<Target>().is_err());
        assert!("127.0.0.1:8080".parse::<Target>().is_err());
    }
}
