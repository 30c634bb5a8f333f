//! What a process spends, read from `/proc`: the figures the tests bound.
//!
//! Owns: [`status_bytes`] (a `Vm*` line of `/proc/PID/status`), [`rss_bytes`]
//! and [`cpu_seconds`]; and [`server_unread_bytes`], what a server process
//! has not yet read of a connection (`/proc/net/tcp`), for a test that must
//! know the server holds a request. Must not touch: the process it reads. Every test
//! that bounds one of these reads it for a server process of its own
//! (`ProcessServer`), never for the test binary, whose other tests run
//! beside it.

/// Field `name` (e.g. `"VmRSS:"`, `"VmHWM:"`, `"VmSize:"`) of
/// `/proc/PID/status`, in bytes.
pub fn status_bytes(pid: u32, name: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
}

/// Resident memory of process `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    status_bytes(pid, "VmRSS:")
}

/// User plus system CPU time process `pid` has used, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')').expect("comm in /proc/PID/stat") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / per_second
}

/// Bytes the kernel holds unread for the server side of the TCP connection
/// from `client` to `server` (its receive queue in `/proc/net/tcp`, or
/// `tcp6`); `None` while no such socket is listed. 0 means the server's
/// process accepted the connection and read all the client sent so far; a
/// connection still in the listener's backlog holds its bytes there.
pub fn server_unread_bytes(server: std::net::SocketAddr, client: std::net::SocketAddr) -> Option<u64> {
    let (local, remote) = (format!(":{:04X}", server.port()), format!(":{:04X}", client.port()));
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|table| {
        let text = std::fs::read_to_string(table).ok()?;
        text.lines().skip(1).find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(l), Some(r), Some(queues)) = (fields.get(1), fields.get(2), fields.get(4)) else {
                return None;
            };
            if !(l.ends_with(&local) && r.ends_with(&remote)) {
                return None;
            }
            let (_, rx) = queues.split_once(':')?;
            u64::from_str_radix(rx, 16).ok()
        })
    })
}
