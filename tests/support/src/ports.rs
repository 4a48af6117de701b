//! Free loopback ports, and whether a given process is the one listening.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::Mutex;

/// Ports handed out by this process and not yet released, so two instances
/// in the same test binary never get the same port even if the kernel
/// offers it twice.
static RESERVED: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A free port pair (P, P+1) on 127.0.0.1 for swtpm's server and control
/// channel: the TSS "swtpm" TCTI has no control-port parameter and always
/// uses the server port plus one.
///
/// Both listeners are held until the pair is known so the kernel cannot hand
/// out either port meanwhile; another process may still take one before
/// swtpm binds it, which the caller detects and retries.
pub(crate) fn free_port_pair() -> std::io::Result<(u16, u16)> {
    let mut reserved = RESERVED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    // P+1 is busy only rarely; a few dozen tries are plenty.
    for _ in 0..64 {
        let server = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = server.local_addr()?.port();
        let Some(next) = port.checked_add(1) else {
            continue;
        };
        if reserved.contains(&port) || reserved.contains(&next) {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, next)).is_ok() {
            reserved.insert(port);
            reserved.insert(next);
            return Ok((port, next));
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no free pair of consecutive loopback ports found",
    ))
}

/// Releases ports from [`free_port_pair`] once nothing of ours uses them.
pub(crate) fn release(ports: &[u16]) {
    let mut reserved = RESERVED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    for port in ports {
        reserved.remove(port);
    }
}

/// Whether process `pid` holds the socket listening on 127.0.0.1:`port`.
///
/// Connecting alone cannot tell our swtpm from another process that grabbed
/// the port first; the listening socket's inode (from /proc/net/tcp) and the
/// process's open descriptors (/proc/PID/fd) can. `None` if /proc cannot be
/// read (not Linux), so the caller can fall back to a plain connect.
pub(crate) fn listened_by(pid: u32, port: u16) -> Option<bool> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let Some(inode) = listening_inode(&table, port) else {
        return Some(false);
    };
    let wanted = format!("socket:[{inode}]");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|target| target.as_os_str() == wanted.as_str())
    }))
}

/// The inode of the socket listening on 127.0.0.1:`port` in a
/// /proc/net/tcp table.
fn listening_inode(table: &str, port: u16) -> Option<u64> {
    // Addresses are hex in host byte order: 127.0.0.1 is 0100007F here.
    let local = format!("0100007F:{port:04X}");
    const LISTEN: &str = "0A";
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields[..] {
            [_, addr, _, state, _, _, _, _, _, inode, ..] if addr == local && state == LISTEN => {
                inode.parse().ok()
            }
            _ => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_port_pairs_are_consecutive_distinct_and_bindable() {
        let (a, b) = free_port_pair().unwrap();
        assert_eq!(b, a + 1);
        let (c, d) = free_port_pair().unwrap();
        assert_eq!(d, c + 1);
        assert!(![a, b].contains(&c) && ![a, b].contains(&d));
        for port in [a, b, c, d] {
            TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap();
        }
        release(&[a, b, c, d]);
    }

    #[test]
    fn finds_our_own_listener() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(listened_by(std::process::id(), port), Some(true));
        drop(listener);
        assert_eq!(listened_by(std::process::id(), port), Some(false));
    }

    #[test]
    fn parses_proc_net_tcp() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
            0: 0100007F:107E 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 7390 1 0 100 0 0 10 0\n   \
            1: 0100007F:1111 0100007F:9000 01 00000000:00000000 00:00000000 00000000   106        0 7231 1 0 100 0 0 10 0\n";
        assert_eq!(listening_inode(table, 0x107E), Some(7390));
        // Port 0x1111 is only an established connection, not a listener.
        assert_eq!(listening_inode(table, 0x1111), None);
        assert_eq!(listening_inode(table, 80), None);
    }
}
