//! The converter's protocol decisions, sans IO: given the bytes a client sent so far, what to answer
//! and whom to connect to (RFC 8803 §3.2, §4). The tokio shell ([`super::serve`]) reads, connects,
//! answers and relays.

use std::net::{IpAddr, SocketAddr};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::wire::{tcp_options, ErrorCode, MessageRepr, Parsed, TlvRepr, WireError};

/// TCP option kinds the converter can honour in a Connect TLV and lists in its Supported TCP
/// Extensions TLV (§4.4): MSS (2), window scale (3), SACK-permitted (4), timestamps (8) and MPTCP
/// (30). Window scale, SACK and timestamps are the kernel's defaults on every upstream SYN; MSS is set
/// with `TCP_MAXSEG`; MPTCP makes the upstream socket an MPTCP one.
pub const SUPPORTED_TCP_OPTIONS: [u8; 5] = [2, 3, 4, 8, 30];

/// TCP Fast Open (34): accepted in a Connect TLV but not acted on (the converter's upstream SYN
/// carries no client data in it; the data follows the handshake).
const TFO_OPTION: u8 = 34;

/// Cookie length: 128 bits of HMAC-SHA256, as long as the largest TFO cookie (RFC 7413 §4.1.1).
pub const COOKIE_LEN: usize = 16;

/// Issues and checks Cookie TLVs (§4.7): an HMAC of the client's address under a secret, so only a
/// client that received the converter's answer at that address can present it (anti-spoofing, like
/// TFO's `IsCookieValid`, RFC 7413 §4.1.2).
#[derive(Clone)]
pub struct CookieJar {
    secret: [u8; 32],
}

impl std::fmt::Debug for CookieJar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CookieJar { .. }")
    }
}

impl CookieJar {
    /// A jar with this secret (shared by every converter of a cluster that should accept each other's
    /// cookies).
    pub fn new(secret: [u8; 32]) -> Self {
        Self { secret }
    }

    fn mac(&self, client: IpAddr) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).expect("any key length");
        let octets = match client.to_canonical() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        mac.update(&octets);
        mac
    }

    /// The cookie of `client`.
    pub fn issue(&self, client: IpAddr) -> [u8; COOKIE_LEN] {
        let tag = self.mac(client).finalize().into_bytes();
        let mut cookie = [0u8; COOKIE_LEN];
        cookie.copy_from_slice(&tag[..COOKIE_LEN]);
        cookie
    }

    /// Whether `opaque` is `client`'s cookie (constant time).
    pub fn check(&self, client: IpAddr, opaque: &[u8]) -> bool {
        opaque.len() == COOKIE_LEN && self.mac(client).verify_truncated_left(opaque).is_ok()
    }
}

/// What the converter requires of requests.
#[derive(Debug, Clone)]
pub struct Policy {
    /// When set, requests must carry a valid Cookie TLV.
    pub cookies: Option<CookieJar>,
}

/// A request to connect, as the client asked in its Connect TLV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// Where to connect.
    pub destination: SocketAddr,
    /// The MSS option the client asked for, if any.
    pub mss: Option<u16>,
    /// Whether the client asked for MPTCP towards the server (option kind 30).
    pub mptcp: bool,
    /// Whether the client sent TCP options: it then gets the server's in an Extended TCP Header TLV.
    pub wants_extended_header: bool,
    /// Whether the client also sent an Info TLV: the answer then lists the supported extensions.
    pub wants_supported: bool,
    /// Length of the Convert message; the bytes after it are the client's early data.
    pub message_len: usize,
}

/// What to do with the bytes received so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The message is not complete: read until `needed` bytes in total.
    NeedMore {
        /// Bytes needed from the start of the connection.
        needed: usize,
    },
    /// Send this message and close: an error, or the answer to an Info-only request.
    Answer(MessageRepr),
    /// Connect upstream, then answer with [`answer_for`] and relay.
    Connect(ConnectRequest),
}

fn error(code: ErrorCode, value: &[u8]) -> Decision {
    Decision::Answer(MessageRepr::new(vec![TlvRepr::error(code, value)]))
}

fn malformed() -> Decision {
    error(ErrorCode::MalformedMessage, &[])
}

/// Decides what a client's first bytes ask for (§3.2, §4.3-§4.8).
pub fn decide(received: &[u8], client: IpAddr, policy: &Policy) -> Decision {
    let (message, len) = match MessageRepr::parse(received) {
        Ok(Parsed::Incomplete { needed }) => return Decision::NeedMore { needed },
        Ok(Parsed::Complete { message, len }) => (message, len),
        Err(e @ WireError::UnsupportedVersion(_)) | Err(e @ WireError::Malformed { .. }) => {
            return Decision::Answer(MessageRepr::new(vec![e.error_tlv()]))
        }
    };
    let mut connect = None;
    let mut info = false;
    let mut cookie = None;
    for tlv in &message.tlvs {
        match tlv {
            TlvRepr::Connect { .. } if connect.is_some() => return malformed(),
            TlvRepr::Connect { .. } => connect = Some(tlv),
            TlvRepr::Info => info = true,
            TlvRepr::Cookie { opaque } => cookie = Some(opaque.as_slice()),
            // Converter-to-client TLVs (§4.4, §4.6, §4.8) and unknown types are not requests.
            other => return error(ErrorCode::UnsupportedMessage, &[other.kind()]),
        }
    }
    if let Some(jar) = &policy.cookies {
        match cookie {
            None => {
                // §4.7: answer Missing Cookie with the client's cookie; it retries with it.
                return Decision::Answer(MessageRepr::new(vec![
                    TlvRepr::error(ErrorCode::MissingCookie, &[]),
                    TlvRepr::cookie(&jar.issue(client)),
                ]));
            }
            Some(opaque) if !jar.check(client, opaque) => {
                return error(ErrorCode::NotAuthorized, &[])
            }
            Some(_) => {}
        }
    }
    let Some(connect) = connect else {
        return if info {
            Decision::Answer(MessageRepr::new(vec![TlvRepr::supported(
                &SUPPORTED_TCP_OPTIONS,
            )]))
        } else {
            malformed()
        };
    };
    let TlvRepr::Connect { options, .. } = connect else {
        unreachable!("matched as Connect above")
    };
    let Some(destination) = connect.destination() else {
        return malformed();
    };
    if destination.port() == 0 || destination.ip().is_unspecified() {
        return malformed();
    }
    let Ok(parsed) = tcp_options(options) else {
        return malformed();
    };
    let mut request = ConnectRequest {
        destination,
        mss: None,
        mptcp: false,
        wants_extended_header: !parsed.is_empty(),
        wants_supported: info,
        message_len: len,
    };
    for option in parsed {
        match option.kind {
            2 if option.data.len() == 2 => {
                request.mss = Some(u16::from_be_bytes([option.data[0], option.data[1]]))
            }
            2 => return malformed(),
            30 => request.mptcp = true,
            3 | 4 | 8 | TFO_OPTION => {}
            kind => return error(ErrorCode::UnsupportedTcpOption, &[kind]),
        }
    }
    Decision::Connect(request)
}

/// The converter's answer once the upstream connection is up: the fixed header, the Extended TCP
/// Header TLV with `server_options` when the client sent options (§4.6), and the Supported TCP
/// Extensions TLV when it sent an Info TLV (§4.4).
pub fn answer_for(request: &ConnectRequest, server_options: &[u8]) -> MessageRepr {
    let mut tlvs = Vec::new();
    if request.wants_extended_header {
        tlvs.push(TlvRepr::extended_tcp_header(server_options));
    }
    if request.wants_supported {
        tlvs.push(TlvRepr::supported(&SUPPORTED_TCP_OPTIONS));
    }
    MessageRepr::new(tlvs)
}

/// The Error TLV for a failed upstream connection (§4.8): a RST is Connection Reset, a timeout or an
/// unreachable host is Destination Unreachable, a local network problem is Network Failure, and running
/// out of sockets is Resource Exceeded.
pub fn connect_error(error: &std::io::Error) -> ErrorCode {
    use std::io::ErrorKind;
    match error.kind() {
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset => ErrorCode::ConnectionReset,
        ErrorKind::TimedOut | ErrorKind::HostUnreachable => ErrorCode::DestinationUnreachable,
        ErrorKind::NetworkUnreachable | ErrorKind::NetworkDown | ErrorKind::AddrNotAvailable => {
            ErrorCode::NetworkFailure
        }
        _ => match error.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                ErrorCode::ResourceExceeded
            }
            _ => ErrorCode::DestinationUnreachable,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::wire::tlv_type;

    fn client() -> IpAddr {
        "10.0.1.2".parse().expect("literal")
    }

    fn open() -> Policy {
        Policy { cookies: None }
    }

    fn request(tlvs: Vec<TlvRepr>) -> Vec<u8> {
        MessageRepr::new(tlvs).to_bytes().expect("emit")
    }

    fn server() -> SocketAddr {
        "10.0.3.2:80".parse().expect("literal")
    }

    fn answered_error(decision: Decision) -> (ErrorCode, Vec<u8>) {
        match decision {
            Decision::Answer(message) => {
                let (code, value) = message.error().expect("an Error TLV");
                (code, value.to_vec())
            }
            other => panic!("not an answer: {other:?}"),
        }
    }

    #[test]
    fn a_connect_request_with_early_data() {
        let mut bytes = request(vec![TlvRepr::connect(server(), &[])]);
        bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
        let Decision::Connect(r) = decide(&bytes, client(), &open()) else {
            panic!()
        };
        assert_eq!(r.destination, server());
        assert_eq!(r.message_len, 24);
        assert!(!r.wants_extended_header && !r.wants_supported && !r.mptcp);
        assert_eq!(
            answer_for(&r, &[]).to_bytes().expect("emit"),
            [1, 1, 0x22, 0x63]
        );
        for cut in 0..24 {
            assert!(matches!(
                decide(&bytes[..cut], client(), &open()),
                Decision::NeedMore { .. }
            ));
        }
    }

    #[test]
    fn tcp_options_are_honoured_or_refused() {
        // MSS 1400, MPTCP (kind 30, a 12-byte MP_CAPABLE), SACK-permitted.
        let options = [2, 4, 5, 0x78, 30, 4, 0x81, 0x00, 4, 2];
        let bytes = request(vec![TlvRepr::connect(server(), &options), TlvRepr::Info]);
        let Decision::Connect(r) = decide(&bytes, client(), &open()) else {
            panic!()
        };
        assert_eq!(
            (r.mss, r.mptcp, r.wants_extended_header),
            (Some(1400), true, true)
        );
        let answer = answer_for(&r, &[2, 4, 5, 0xb4]);
        assert_eq!(answer.tlvs.len(), 2);
        assert_eq!(
            answer.tlvs[0],
            TlvRepr::extended_tcp_header(&[2, 4, 5, 0xb4])
        );
        // TCP-AO (29) cannot be done by a converter.
        let bytes = request(vec![TlvRepr::connect(server(), &[29, 4, 0, 0])]);
        assert_eq!(
            answered_error(decide(&bytes, client(), &open())),
            (ErrorCode::UnsupportedTcpOption, vec![29])
        );
        // A bad option length is malformed.
        let bytes = request(vec![TlvRepr::connect(server(), &[2, 9, 0, 0])]);
        assert_eq!(
            answered_error(decide(&bytes, client(), &open())).0,
            ErrorCode::MalformedMessage
        );
    }

    #[test]
    fn errors_for_bad_requests() {
        let mut bad_version = request(vec![TlvRepr::connect(server(), &[])]);
        bad_version[0] = 7;
        assert_eq!(
            answered_error(decide(&bad_version, client(), &open())),
            (ErrorCode::UnsupportedVersion, vec![1])
        );
        let two = request(vec![
            TlvRepr::connect(server(), &[]),
            TlvRepr::connect(server(), &[]),
        ]);
        assert_eq!(
            answered_error(decide(&two, client(), &open())).0,
            ErrorCode::MalformedMessage
        );
        let from_converter = request(vec![TlvRepr::error(ErrorCode::NetworkFailure, &[])]);
        assert_eq!(
            answered_error(decide(&from_converter, client(), &open())),
            (ErrorCode::UnsupportedMessage, vec![30])
        );
        let empty = request(vec![]);
        assert_eq!(
            answered_error(decide(&empty, client(), &open())).0,
            ErrorCode::MalformedMessage
        );
        let port_zero = request(vec![TlvRepr::connect(
            "10.0.3.2:0".parse().expect("literal"),
            &[],
        )]);
        assert_eq!(
            answered_error(decide(&port_zero, client(), &open())).0,
            ErrorCode::MalformedMessage
        );
    }

    #[test]
    fn info_alone_lists_the_supported_extensions() {
        let Decision::Answer(answer) = decide(&request(vec![TlvRepr::Info]), client(), &open())
        else {
            panic!()
        };
        assert_eq!(
            answer.tlvs,
            vec![TlvRepr::supported(&SUPPORTED_TCP_OPTIONS)]
        );
    }

    #[test]
    fn cookies_are_issued_then_required_and_bound_to_the_client() {
        let jar = CookieJar::new([7; 32]);
        let policy = Policy {
            cookies: Some(jar.clone()),
        };
        let plain = request(vec![TlvRepr::connect(server(), &[])]);
        let Decision::Answer(answer) = decide(&plain, client(), &policy) else {
            panic!()
        };
        assert_eq!(answer.error().map(|e| e.0), Some(ErrorCode::MissingCookie));
        let Some(TlvRepr::Cookie { opaque }) = answer.find(tlv_type::COOKIE) else {
            panic!("{answer:?}")
        };
        let with_cookie = request(vec![
            TlvRepr::cookie(opaque),
            TlvRepr::connect(server(), &[]),
        ]);
        assert!(matches!(
            decide(&with_cookie, client(), &policy),
            Decision::Connect(_)
        ));
        // Another client cannot use it, nor can a forged one pass.
        let other: IpAddr = "10.0.2.2".parse().expect("literal");
        assert_eq!(
            answered_error(decide(&with_cookie, other, &policy)).0,
            ErrorCode::NotAuthorized
        );
        let forged = request(vec![
            TlvRepr::cookie(&[0; COOKIE_LEN]),
            TlvRepr::connect(server(), &[]),
        ]);
        assert_eq!(
            answered_error(decide(&forged, client(), &policy)).0,
            ErrorCode::NotAuthorized
        );
        assert!(jar.check(
            "::ffff:10.0.1.2".parse().expect("literal"),
            &jar.issue(client())
        ));
    }

    #[test]
    fn connect_errors_map_to_rfc_codes() {
        use std::io::{Error, ErrorKind};
        assert_eq!(
            connect_error(&Error::from(ErrorKind::ConnectionRefused)),
            ErrorCode::ConnectionReset
        );
        assert_eq!(
            connect_error(&Error::from(ErrorKind::TimedOut)),
            ErrorCode::DestinationUnreachable
        );
        assert_eq!(
            connect_error(&Error::from_raw_os_error(libc::EHOSTUNREACH)),
            ErrorCode::DestinationUnreachable
        );
        assert_eq!(
            connect_error(&Error::from_raw_os_error(libc::ENETUNREACH)),
            ErrorCode::NetworkFailure
        );
        assert_eq!(
            connect_error(&Error::from_raw_os_error(libc::EMFILE)),
            ErrorCode::ResourceExceeded
        );
    }
}
