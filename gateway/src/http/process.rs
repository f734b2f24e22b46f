//! Figures the operating system knows better than the gateway: resident memory and CPU
//! time of this process, and the established TCP connections on the broker's listeners.
//!
//! Read from Linux's `/proc` at scrape time; elsewhere every function returns `None` and
//! the metric is left out.
//!
//! Why `/proc/net/tcp` for connected devices: rumqttd 0.20's `Broker::meters()` does report
//! `total_connections`, but only when the metrics timer is configured and only in an
//! interval that saw a publish, so the figure goes stale while devices are idle; it also
//! counts the gateway's own local links. The kernel's socket table is exact and costs
//! nothing between scrapes.
//!
//! Why not the `procfs` crate: it would replace about 35 lines of parsing (two fields of
//! `statm`/`stat`, two columns of `/proc/net/tcp`) with `procfs`, `procfs-core` and `rustix`
//! in the Pi binary, whose size is tracked; `libc` stays anyway (`statvfs` in the store),
//! and the filter by listener port would still be ours.

use std::collections::HashSet;
use std::net::SocketAddr;

/// Resident set size in bytes.
pub fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

/// User plus system CPU time in seconds.
pub fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 of `rest`.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks > 0).then(|| (utime + stime) as f64 / ticks as f64)
}

fn page_size() -> u64 {
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 {
        size as u64
    } else {
        4096
    }
}

/// Established TCP connections whose local port is one of the listeners' ports.
pub fn established_connections(listeners: &[SocketAddr]) -> Option<u64> {
    let ports: HashSet<u16> = listeners.iter().map(SocketAddr::port).collect();
    let mut found = false;
    let mut count = 0;
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(table) = std::fs::read_to_string(file) else {
            continue;
        };
        found = true;
        count += count_established(&table, &ports);
    }
    found.then_some(count)
}

/// Counts rows of a `/proc/net/tcp` table in state `01` (ESTABLISHED) on one of `ports`.
fn count_established(table: &str, ports: &HashSet<u16>) -> u64 {
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let mut cols = line.split_whitespace();
            let local = cols.nth(1);
            let state = cols.nth(1);
            let port = local
                .and_then(|l| l.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            state == Some("01") && port.is_some_and(|p| ports.contains(&p))
        })
        .count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_established_rows_on_the_listener_ports() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue\n\
   0: 0100007F:075B 00000000:0000 0A 00000000:00000000\n\
   1: 0100007F:075B 0100007F:D431 01 00000000:00000000\n\
   2: 0100007F:D431 0100007F:075B 01 00000000:00000000\n\
   3: 0100007F:075B 0100007F:D432 06 00000000:00000000\n";
        let ports = HashSet::from([1883]);
        assert_eq!(count_established(table, &ports), 1);
    }

    #[test]
    fn sees_its_own_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let before = established_connections(&[addr]).unwrap();
        let _client = std::net::TcpStream::connect(addr).unwrap();
        let _server = listener.accept().unwrap();
        assert_eq!(established_connections(&[addr]).unwrap(), before + 1);
        assert!(resident_memory_bytes().unwrap() > 0);
        assert!(cpu_seconds().is_some());
    }
}
