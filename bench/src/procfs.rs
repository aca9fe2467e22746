//! What the bench reads from /proc about the processes it measures: process
//! trees (a proxy and everything it forked), their CPU time and their
//! proportional set size, plus a few machine-wide socket counters.
//!
//! Parsing is pure (string in, numbers out) and unit-tested; the readers
//! around it tolerate processes that exit while being read (a vanished
//! process simply contributes nothing).

use std::collections::HashMap;

use serde::Serialize;

/// The fields of `/proc/<pid>/stat` the bench uses. Times are in clock ticks
/// (`USER_HZ`, see [`clock_ticks_per_second`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub state: char,
    pub ppid: u32,
    pub utime: u64,
    pub stime: u64,
    /// Time of waited-for children (grows when a child is reaped).
    pub cutime: u64,
    pub cstime: u64,
    pub num_threads: u64,
}

impl ProcStat {
    /// The process's own CPU time plus that of its reaped children. Summed
    /// over a process tree this is conserved when a member exits and is
    /// reaped by its parent in the tree (its time moves into the parent's
    /// `cutime`/`cstime`), so before/after differences stay correct even
    /// when websockify's per-connection children come and go.
    pub fn total_ticks(&self) -> u64 {
        self.utime + self.stime + self.cutime + self.cstime
    }
}

/// Parses a `/proc/<pid>/stat` line. The command name (field 2) may contain
/// spaces and parentheses, so the fields are counted from the last `)`.
pub fn parse_stat(line: &str) -> Option<ProcStat> {
    let rest = &line[line.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state): field k is f[k - 3].
    let num = |k: usize| f.get(k - 3)?.parse::<u64>().ok();
    let num_i = |k: usize| f.get(k - 3)?.parse::<i64>().ok();
    Some(ProcStat {
        state: f.first()?.chars().next()?,
        ppid: u32::try_from(num(4)?).ok()?,
        utime: num(14)?,
        stime: num(15)?,
        // cutime/cstime are signed in the kernel's format string.
        cutime: num_i(16)?.max(0) as u64,
        cstime: num_i(17)?.max(0) as u64,
        num_threads: num_i(20)?.max(0) as u64,
    })
}

/// `USER_HZ`: the unit of the times in `/proc/<pid>/stat`.
pub fn clock_ticks_per_second() -> u64 {
    rustix::param::clock_ticks_per_second().max(1)
}

pub fn read_stat(pid: u32) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// `pid` and all its live descendants (parent links from every
/// `/proc/N/stat`), `pid` first. Empty when `pid` is gone.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(p) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(st) = read_stat(p) {
                children.entry(st.ppid).or_default().push(p);
            }
        }
    }
    tree_from_links(
        pid,
        &children,
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
    )
}

/// The tree under `root` given parent → children links. Bounded by the
/// number of links (each pid is visited once).
pub fn tree_from_links(root: u32, children: &HashMap<u32, Vec<u32>>, root_alive: bool) -> Vec<u32> {
    if !root_alive {
        return Vec::new();
    }
    let mut out = vec![root];
    let mut seen = std::collections::HashSet::from([root]);
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        if let Some(kids) = children.get(&p) {
            for &k in kids {
                if seen.insert(k) {
                    out.push(k);
                    todo.push(k);
                }
            }
        }
    }
    out
}

/// CPU time of a process tree at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct TreeCpu {
    /// Σ over the tree of utime + stime + cutime + cstime, in seconds.
    pub cpu_s: f64,
    pub processes: usize,
}

pub fn tree_cpu(root: u32) -> TreeCpu {
    let hz = clock_ticks_per_second() as f64;
    let mut ticks = 0u64;
    let mut processes = 0;
    for p in process_tree(root) {
        if let Some(st) = read_stat(p) {
            ticks += st.total_ticks();
            processes += 1;
        }
    }
    TreeCpu {
        cpu_s: ticks as f64 / hz,
        processes,
    }
}

/// CPU seconds of this process alone (its threads, not its children).
pub fn self_cpu_s() -> f64 {
    read_stat(std::process::id()).map_or(0.0, |s| {
        (s.utime + s.stime) as f64 / clock_ticks_per_second() as f64
    })
}

/// `Key:   123 kB` lines of `/proc/<pid>/smaps_rollup` (or `status`), in KiB.
pub fn parse_kib_fields(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            let mut it = v.split_whitespace();
            let n = it.next()?.parse().ok()?;
            (it.next()? == "kB").then(|| (k.trim().to_string(), n))
        })
        .collect()
}

/// Memory of a process tree at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct TreeMemory {
    /// Σ Pss (proportional set size: shared pages split among sharers), KiB.
    pub pss_kib: u64,
    /// Σ Rss, KiB (counts shared pages once per process; for reference).
    pub rss_kib: u64,
    pub processes: usize,
    pub threads: u64,
    /// Σ open file descriptors.
    pub fds: usize,
}

pub fn tree_memory(root: u32) -> TreeMemory {
    let mut m = TreeMemory::default();
    for p in process_tree(root) {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{p}/smaps_rollup")) else {
            continue;
        };
        let f = parse_kib_fields(&text);
        m.pss_kib += f.get("Pss").copied().unwrap_or(0);
        m.rss_kib += f.get("Rss").copied().unwrap_or(0);
        m.processes += 1;
        m.threads += read_stat(p).map_or(0, |s| s.num_threads);
        m.fds += std::fs::read_dir(format!("/proc/{p}/fd")).map_or(0, |d| d.count());
    }
    m
}

/// Open file descriptors of one process (`/proc/<pid>/fd`); `None` when
/// it is gone or unreadable.
pub fn fd_count(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// What a descriptor's `/proc/<pid>/fd/N` link names, as a kind:
/// `socket`, `pipe`, `anon_inode:[eventfd]` (the inode type kept), or
/// `file`.
pub fn fd_kind(link: &str) -> String {
    if link.starts_with("socket:") {
        "socket".into()
    } else if link.starts_with("pipe:") {
        "pipe".into()
    } else if let Some(kind) = link.strip_prefix("anon_inode:") {
        format!("anon_inode:{kind}")
    } else {
        "file".into()
    }
}

/// Open descriptors of one process by kind (see [`fd_kind`]); empty when
/// it is gone.
pub fn fd_kinds(pid: u32) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    for entry in dir.flatten() {
        if let Ok(link) = std::fs::read_link(entry.path()) {
            *out.entry(fd_kind(&link.to_string_lossy())).or_insert(0) += 1;
        }
    }
    out
}

/// The `kB` fields of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, …), KiB;
/// `None` when the process is gone.
pub fn status_kib(pid: u32) -> Option<HashMap<String, u64>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some(parse_kib_fields(&text))
}

/// The 1-minute load average (`/proc/loadavg`): other work on a shared
/// machine.
pub fn loadavg_1m() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// `some avg10` of `/proc/pressure/cpu`: the share of the last 10 s, in
/// percent, in which some runnable task waited for a CPU.
pub fn parse_cpu_pressure_avg10(text: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with("some"))?
        .split_whitespace()
        .find_map(|f| f.strip_prefix("avg10="))?
        .parse()
        .ok()
}

pub fn cpu_pressure_avg10() -> Option<f64> {
    parse_cpu_pressure_avg10(&std::fs::read_to_string("/proc/pressure/cpu").ok()?)
}

/// Kernel slab memory (`Slab:` in /proc/meminfo), KiB: where socket, file
/// and epoll structures live. Machine-wide, so other work shows up in it.
pub fn slab_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_kib_fields(&text).get("Slab").copied()
}

/// Machine-wide TCP counters from `/proc/net/sockstat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SockStat {
    pub tcp_inuse: u64,
    pub tcp_time_wait: u64,
    pub tcp_orphan: u64,
    /// Pages of memory held by TCP sockets (what `net.ipv4.tcp_mem` limits).
    pub tcp_mem_pages: u64,
}

pub fn parse_sockstat(text: &str) -> Option<SockStat> {
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let get = |name: &str| {
        words
            .windows(2)
            .find(|w| w[0] == name)
            .and_then(|w| w[1].parse().ok())
    };
    Some(SockStat {
        tcp_inuse: get("inuse")?,
        tcp_time_wait: get("tw").unwrap_or(0),
        tcp_orphan: get("orphan").unwrap_or(0),
        tcp_mem_pages: get("mem").unwrap_or(0),
    })
}

pub fn sockstat() -> SockStat {
    std::fs::read_to_string("/proc/net/sockstat")
        .ok()
        .and_then(|t| parse_sockstat(&t))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "4242 (python3 (x) y) S 77 4242 4242 0 -1 4194560 1200 3400 0 0 \
                        250 37 12 5 20 0 3 0 123456 1000000 300 18446744073709551615";

    #[test]
    fn parses_stat_fields_even_with_odd_command_names() {
        let s = parse_stat(STAT).unwrap();
        assert_eq!(s.state, 'S');
        assert_eq!(s.ppid, 77);
        assert_eq!((s.utime, s.stime, s.cutime, s.cstime), (250, 37, 12, 5));
        assert_eq!(s.num_threads, 3);
        assert_eq!(s.total_ticks(), 304);
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (a) S 2 3"), None);
    }

    #[test]
    fn reads_our_own_stat() {
        let s = read_stat(std::process::id()).unwrap();
        assert!(s.num_threads >= 1);
        assert!(clock_ticks_per_second() >= 1);
        let t = tree_cpu(std::process::id());
        assert!(t.processes >= 1);
        let m = tree_memory(std::process::id());
        assert!(m.pss_kib > 0 && m.fds > 0, "{m:?}");
        let st = status_kib(std::process::id()).unwrap();
        assert!(st["VmRSS"] > 0 && st["VmHWM"] >= st["VmRSS"], "{st:?}");
        // Other tests open and close descriptors in parallel: no exact count.
        assert!(fd_count(std::process::id()).unwrap() >= 3);
        assert_eq!(fd_count(u32::MAX), None);
        assert!(fd_kinds(std::process::id()).values().sum::<usize>() >= 3);
        assert!(fd_kinds(u32::MAX).is_empty());
        assert_eq!(fd_kind("socket:[12345]"), "socket");
        assert_eq!(fd_kind("pipe:[9]"), "pipe");
        assert_eq!(fd_kind("anon_inode:[io_uring]"), "anon_inode:[io_uring]");
        assert_eq!(fd_kind("/var/log/x.log"), "file");
    }

    #[test]
    fn tree_follows_links_once_and_ignores_cycles() {
        let links: HashMap<u32, Vec<u32>> = [
            (1, vec![10, 20]),
            (10, vec![11]),
            (11, vec![10]), // bogus cycle: must not loop
            (30, vec![31]), // not under 1
        ]
        .into_iter()
        .collect();
        let mut t = tree_from_links(1, &links, true);
        assert_eq!(t[0], 1);
        t.sort_unstable();
        assert_eq!(t, vec![1, 10, 11, 20]);
        assert!(tree_from_links(1, &links, false).is_empty());
    }

    #[test]
    fn parses_smaps_rollup() {
        let text =
            "55d0c0000000-7ffd00000000 ---p 00000000 00:00 0                          [rollup]\n\
                    Rss:               12345 kB\n\
                    Pss:                6789 kB\n\
                    Pss_Anon:           4000 kB\n\
                    Private_Dirty:      3000 kB\n\
                    THPeligible:    0\n";
        let f = parse_kib_fields(text);
        assert_eq!(f["Rss"], 12345);
        assert_eq!(f["Pss"], 6789);
        assert_eq!(f["Pss_Anon"], 4000);
        assert!(!f.contains_key("THPeligible"));
    }

    #[test]
    fn parses_cpu_pressure_and_reads_the_load() {
        let text = "some avg10=12.50 avg60=8.01 avg300=3.00 total=123\n\
                    full avg10=1.00 avg60=0.00 avg300=0.00 total=9\n";
        assert_eq!(parse_cpu_pressure_avg10(text), Some(12.5));
        assert_eq!(parse_cpu_pressure_avg10("full avg10=1.00\n"), None);
        assert!(loadavg_1m().is_some_and(|l| l >= 0.0));
    }

    #[test]
    fn parses_sockstat() {
        let text = "sockets: used 130\n\
                    TCP: inuse 20012 orphan 3 tw 17 alloc 20020 mem 41\n\
                    UDP: inuse 0 mem 0\n";
        let s = parse_sockstat(text).unwrap();
        assert_eq!(
            s,
            SockStat {
                tcp_inuse: 20012,
                tcp_time_wait: 17,
                tcp_orphan: 3,
                tcp_mem_pages: 41
            }
        );
        assert_eq!(parse_sockstat("nothing"), None);
    }
}
