//! End-to-end tests of the vSphere backend against govmomi's simulator
//! (served by `tests/support/vcsim/main.go`, which adds webmks tickets for
//! a TLS WebSocket endpoint in front of a real Xvnc, `/screen`, idle
//! session expiry and counters), all on 127.0.0.1 ephemeral ports.
//!
//! Needs Debian's golang-go, golang-github-vmware-govmomi-dev and
//! tigervnc-standalone-server (`make test` installs them).

#[macro_use]
mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::vcsim::{Vcsim, VcsimOptions, USERNAME, VMS};
use common::Xvnc;
use consolegate::hypervisor::model::{
    ConsoleTarget, Hypervisor, HypervisorError, OperationState, PowerAction, PowerState, Progress,
    ThumbnailSize, VmInfo,
};
use consolegate::hypervisor::vsphere::updates::UpdatesStats;
use consolegate::hypervisor::vsphere::{VsphereBackend, VsphereConfig};
use consolegate::pki::{self, Thumbprint, Trust};

/// How long a test waits for the simulator to change state by itself.
const SIM_WAIT: Duration = Duration::from_secs(10);

fn config(sim: &Vcsim) -> VsphereConfig {
    let mut c = VsphereConfig::new("esx1", &sim.url, USERNAME, &sim.password_file());
    c.thumbprint = Some(sim.thumbprint.clone());
    c.pool_size = 3;
    c.acquire_timeout_ms = 5_000;
    c.request_timeout_ms = 5_000;
    c.task_timeout_ms = 20_000;
    c
}

fn backend(sim: &Vcsim) -> VsphereBackend {
    VsphereBackend::new(&config(sim)).expect("vSphere backend")
}

fn with_vm1_off(vnc: Option<&Xvnc>) -> VcsimOptions {
    VcsimOptions {
        vnc: vnc.map(|x| x.addr()),
        powered_off: vec!["DC0_H0_VM1".into()],
        ..VcsimOptions::default()
    }
}

/// The listed VM with this name.
async fn vm_named(backend: &VsphereBackend, name: &str) -> VmInfo {
    let vms = backend.list_vms().await.expect("list VMs");
    vms.into_iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no VM {name} in the list"))
}

fn webmks(target: &ConsoleTarget) -> (String, Option<String>) {
    match target {
        ConsoleTarget::WebMks { url, thumbprint } => (url.clone(), thumbprint.clone()),
        other => panic!("not a webmks target: {other:?}"),
    }
}

/// Polls the simulator's counters until `until` holds.
fn wait_stats(sim: &Vcsim, what: &str, until: impl Fn(&common::vcsim::VcsimStats) -> bool) {
    common::wait_until(SIM_WAIT, what, || {
        let s = sim.stats();
        until(&s).then_some(())
    });
}

/// Opens the ticket's wss URL with a TLS WebSocket client pinned to
/// `pin`, and reads the VNC server's greeting through it.
fn rfb_greeting(url: &str, pin: &str) -> Result<Vec<u8>, String> {
    let rest = url.strip_prefix("wss://").ok_or("not wss")?;
    let (authority, path) = rest.split_at(rest.find('/').ok_or("no path")?);
    let addr: std::net::SocketAddr = authority.parse().map_err(|e| format!("{authority}: {e}"))?;
    let tls = pki::client_config(&Trust::Pinned(Thumbprint::parse(pin).unwrap())).unwrap();
    let mut client =
        common::try_wss_connect(addr, path, &["binary"], tls).map_err(|e| format!("{e:?}"))?;
    assert_eq!(client.protocol.as_deref(), Some("binary"));
    Ok(client.expect_bytes(12, "the RFB version"))
}

#[tokio::test]
async fn login_list_and_logout_match_the_simulator() {
    let sim = Vcsim::start(with_vm1_off(None));
    let backend = backend(&sim);
    assert_eq!(sim.stats().logins, 0, "the pool is lazy");
    backend.validate().await.expect("login and CurrentTime");
    let vms = backend.list_vms().await.expect("list");
    let names: Vec<&str> = vms.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, VMS);
    for vm in &vms {
        let want = if vm.name == "DC0_H0_VM1" {
            PowerState::Off
        } else {
            PowerState::On
        };
        assert_eq!(vm.power, want, "{vm:?}");
        assert_eq!(vm.hypervisor, "esx1");
        assert_eq!(vm.id, format!("esx1:{}", vm.native_id));
        assert!(vm.native_id.starts_with("vm-"), "{vm:?}");
        let host = vm.host.as_deref().expect("a host");
        let prefix = if vm.name.starts_with("DC0_H0") {
            "DC0_H0"
        } else {
            "DC0_C0_H"
        };
        assert!(host.starts_with(prefix), "{vm:?}");
        // One VM read alone says the same.
        assert_eq!(&backend.vm(&vm.native_id).await.unwrap(), vm);
    }
    let stats = sim.stats();
    assert_eq!((stats.logins, stats.active_sessions), (1, 1), "{stats:?}");
    let pool = backend.stats();
    assert_eq!(
        (pool.logins, pool.total_connections, pool.reachable),
        (1, 1, Some(true))
    );
    backend.shutdown().await;
    let stats = sim.stats();
    assert_eq!((stats.logouts, stats.active_sessions), (1, 0), "{stats:?}");
}

#[tokio::test]
async fn concurrent_consoles_use_at_most_pool_size_sessions() {
    let xvnc = Xvnc::start();
    let sim = Vcsim::start(with_vm1_off(Some(&xvnc)));
    let backend = Arc::new(backend(&sim));
    let vm = vm_named(&backend, "DC0_H0_VM0").await.native_id;
    const CONSOLES: usize = 12;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONSOLES {
        let (backend, vm) = (backend.clone(), vm.clone());
        tasks.spawn(async move { backend.console(&vm).await });
    }
    let mut urls = std::collections::HashSet::new();
    while let Some(result) = tasks.join_next().await {
        let console = result.unwrap().expect("a console");
        let (url, pin) = webmks(&console.target);
        assert_eq!(pin.as_deref(), Some(sim.webmks_thumbprint.as_str()));
        urls.insert(url);
    }
    assert_eq!(urls.len(), CONSOLES, "a fresh ticket per console");
    let stats = sim.stats();
    assert_eq!(stats.acquire_tickets, CONSOLES as u64);
    assert!(stats.logins <= 3, "{} logins for pool_size 3", stats.logins);
    let pool = backend.stats();
    assert!(pool.total_connections <= 3, "{pool:?}");
    assert_eq!(pool.active_connections, 0);
    backend.shutdown().await;
    wait_stats(&sim, "every session logged out", |s| {
        s.active_sessions == 0 && s.logouts == s.logins
    });
}

#[tokio::test]
async fn a_session_the_simulator_expired_is_revalidated_and_replaced() {
    let sim = Vcsim::start(VcsimOptions {
        session_idle_ms: 300,
        ..VcsimOptions::default()
    });
    let backend = backend(&sim);
    backend.list_vms().await.expect("first list");
    assert_eq!(sim.stats().logins, 1);
    // The simulator forgets the idle session by itself.
    wait_stats(&sim, "the idle session to expire", |s| {
        s.expired_sessions == 1 && s.active_sessions == 0
    });
    let vms = backend.list_vms().await.expect("list after the expiry");
    assert_eq!(vms.len(), VMS.len());
    let stats = sim.stats();
    assert_eq!(stats.logins, 2, "{stats:?}");
    let pool = backend.stats();
    assert_eq!(
        (pool.reconnects, pool.logins, pool.total_connections),
        (1, 2, 1),
        "{pool:?}"
    );
    // And once more through the debug endpoint, for any call.
    assert_eq!(sim.expire_sessions(), 1);
    backend
        .validate()
        .await
        .expect("validate after a forced expiry");
    assert_eq!(backend.stats().reconnects, 2);
}

#[tokio::test]
async fn keepalive_keeps_an_idle_session_from_expiring() {
    // The simulator forgets sessions idle for 1.2 s; keep-alive validates
    // idle ones every 300 ms (passes every 150 ms).
    let sim = Vcsim::start(VcsimOptions {
        session_idle_ms: 1_200,
        ..VcsimOptions::default()
    });
    let mut c = config(&sim);
    c.keepalive_interval_ms = 300;
    let backend = VsphereBackend::new(&c).unwrap();
    backend.validate().await.expect("login");
    let keepalive = backend.spawn_keepalive();
    let base = sim.stats().sdk_requests;
    // 8 keep-alive calls, each at least 300 ms after the previous use, span
    // more than 2 s: the idle timeout would have passed without them. (An
    // async poll: the keep-alive task runs on this thread.)
    let deadline = Instant::now() + SIM_WAIT;
    while sim.stats().sdk_requests < base + 8 {
        assert!(
            Instant::now() < deadline,
            "keep-alive calls: {:?}",
            sim.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = sim.stats();
    assert_eq!(
        (stats.expired_sessions, stats.active_sessions),
        (0, 1),
        "{stats:?}"
    );
    assert_eq!(backend.stats().logins, 1);
    backend.shutdown().await;
    keepalive.await.unwrap();
    assert_eq!(sim.stats().active_sessions, 0);
}

#[tokio::test]
async fn a_call_that_meets_not_authenticated_is_retried_once_on_a_new_session() {
    let sim = Vcsim::start(VcsimOptions::default());
    let backend = backend(&sim);
    let vm = vm_named(&backend, "DC0_H0_VM0").await;
    // The checkout's CurrentTime passes; the session dies right after it.
    assert_eq!(sim.expire_sessions_after(1), 1);
    let again = backend
        .vm(&vm.native_id)
        .await
        .expect("retried on a new session");
    assert_eq!(again, vm);
    let stats = sim.stats();
    assert_eq!((stats.logins, stats.expired_sessions), (2, 1), "{stats:?}");
    let pool = backend.stats();
    // Not a stale checkout (validation passed): a discarded session.
    assert_eq!(
        (pool.reconnects, pool.logins, pool.total_connections),
        (0, 2, 1),
        "{pool:?}"
    );
}

#[tokio::test]
async fn a_ticket_reaches_the_vnc_server_once_pinned_to_its_thumbprint() {
    let xvnc = Xvnc::start();
    let sim = Vcsim::start(with_vm1_off(Some(&xvnc)));
    let backend = backend(&sim);
    let vm = vm_named(&backend, "DC0_C0_RP0_VM0").await;
    let console = backend.console(&vm.native_id).await.expect("console");
    assert!(!console.one_time);
    let (url, pin) = webmks(&console.target);
    assert!(
        url.starts_with(&format!("wss://127.0.0.1:{}/ticket/", sim.webmks_port)),
        "{url}"
    );
    let pin = pin.expect("the ticket's sslThumbprint");
    assert_eq!(pin, sim.webmks_thumbprint);
    // A client pinned to another certificate is refused by TLS.
    let err = rfb_greeting(&url, &sim.thumbprint).unwrap_err();
    assert!(err.contains("certificate"), "{err}");
    assert_eq!(sim.stats().tickets_redeemed, 0);
    // The right pin reaches Xvnc through the relay.
    let console = backend.console(&vm.native_id).await.expect("console");
    let (url, pin) = webmks(&console.target);
    let greeting = rfb_greeting(&url, pin.as_deref().unwrap()).expect("the ticket's endpoint");
    assert!(greeting.starts_with(b"RFB 003.00"), "{greeting:?}");
    // Tickets are single-use.
    let again = rfb_greeting(&url, pin.as_deref().unwrap()).unwrap_err();
    assert!(again.contains("404"), "{again}");
    let stats = sim.stats();
    assert_eq!(
        (stats.tickets_redeemed, stats.acquire_tickets),
        (1, 2),
        "{stats:?}"
    );
}

#[tokio::test]
async fn tickets_naming_an_esxi_host_go_through_the_host_map() {
    let xvnc = Xvnc::start();
    let sim = Vcsim::start(VcsimOptions {
        vnc: Some(xvnc.addr()),
        ticket_host_esxi: true,
        ..VcsimOptions::default()
    });
    let plain = backend(&sim);
    let vm = vm_named(&plain, "DC0_H0_VM0").await;
    let host = vm.host.clone().unwrap();
    let (url, _) = webmks(&plain.console(&vm.native_id).await.unwrap().target);
    assert_eq!(
        url.split('/').nth(2),
        Some(format!("{host}:{}", sim.webmks_port).as_str())
    );
    let mut mapped = config(&sim);
    mapped.host_map = BTreeMap::from([(host, "127.0.0.1".to_string())]);
    let mapped = VsphereBackend::new(&mapped).unwrap();
    let (url, pin) = webmks(&mapped.console(&vm.native_id).await.unwrap().target);
    assert!(
        url.starts_with(&format!("wss://127.0.0.1:{}/", sim.webmks_port)),
        "{url}"
    );
    let greeting = rfb_greeting(&url, &pin.unwrap()).expect("the mapped host");
    assert!(greeting.starts_with(b"RFB 003.00"), "{greeting:?}");
}

#[tokio::test]
async fn power_actions_report_progress_and_change_the_state() {
    let sim = Vcsim::start(with_vm1_off(None));
    let backend = backend(&sim);
    let vm = vm_named(&backend, "DC0_H0_VM0").await.native_id;
    let steps = [
        (PowerAction::Off, PowerState::Off),
        (PowerAction::On, PowerState::On),
        (PowerAction::Reset, PowerState::On),
        (PowerAction::Suspend, PowerState::Suspended),
        (PowerAction::On, PowerState::On),
        (PowerAction::Shutdown, PowerState::Off),
    ];
    for (action, want) in steps {
        let seen: Arc<Mutex<Vec<Progress>>> = Arc::default();
        let sink = seen.clone();
        let started = Instant::now();
        backend
            .power(&vm, action, Box::new(move |p| sink.lock().unwrap().push(p)))
            .await
            .unwrap_or_else(|e| panic!("{action:?}: {e}"));
        let seen = seen.lock().unwrap().clone();
        let last = seen.last().expect("progress reported");
        assert_eq!(
            (last.state, last.percent),
            (OperationState::Succeeded, 100),
            "{action:?}: {seen:?}"
        );
        assert!(
            seen.windows(2).all(|w| w[0].percent <= w[1].percent),
            "{seen:?}"
        );
        assert_eq!(
            backend.vm(&vm).await.unwrap().power,
            want,
            "after {action:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{action:?} took {:?}",
            started.elapsed()
        );
    }
    // Powering off a VM that is off fails with the host's reason, reported
    // too.
    let seen: Arc<Mutex<Vec<Progress>>> = Arc::default();
    let sink = seen.clone();
    let err = backend
        .power(
            &vm,
            PowerAction::Off,
            Box::new(move |p| sink.lock().unwrap().push(p)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, HypervisorError::InvalidState(_)), "{err}");
    assert_eq!(err.status(), 409);
    assert_eq!(
        seen.lock().unwrap().last().unwrap().state,
        OperationState::Failed
    );
}

#[tokio::test]
async fn powered_off_and_unknown_vms_are_named() {
    let sim = Vcsim::start(with_vm1_off(None));
    let backend = backend(&sim);
    let off = vm_named(&backend, "DC0_H0_VM1").await.native_id;
    let size = ThumbnailSize {
        max_width: 320,
        max_height: 240,
    };
    let err = backend.console(&off).await.unwrap_err();
    assert!(
        matches!(err, HypervisorError::VmNotRunning(ref v) if *v == off),
        "{err}"
    );
    assert_eq!(err.status(), 409);
    let err = backend.thumbnail(&off, size).await.unwrap_err();
    assert!(matches!(err, HypervisorError::VmNotRunning(_)), "{err}");
    for unknown in ["vm-424242", "not even an id"] {
        let err = backend.console(unknown).await.unwrap_err();
        assert!(
            matches!(err, HypervisorError::VmNotFound(ref v) if v == unknown),
            "{err}"
        );
        assert_eq!(err.status(), 404);
        let err = backend.vm(unknown).await.unwrap_err();
        assert!(matches!(err, HypervisorError::VmNotFound(_)), "{err}");
        let err = backend.thumbnail(unknown, size).await.unwrap_err();
        assert!(matches!(err, HypervisorError::VmNotFound(_)), "{err}");
        let err = backend
            .power(unknown, PowerAction::Off, Box::new(|_| {}))
            .await
            .unwrap_err();
        assert!(matches!(err, HypervisorError::VmNotFound(_)), "{err}");
    }
    assert_eq!(
        sim.stats().acquire_tickets,
        0,
        "no ticket for an off or unknown VM"
    );
}

#[tokio::test]
async fn the_api_certificate_is_checked_never_skipped() {
    let sim = Vcsim::start(VcsimOptions::default());
    // Pinned to another certificate (the WebMKS endpoint's).
    let mut wrong = config(&sim);
    wrong.thumbprint = Some(sim.webmks_thumbprint.clone());
    let err = VsphereBackend::new(&wrong)
        .unwrap()
        .list_vms()
        .await
        .unwrap_err();
    assert!(
        matches!(err, HypervisorError::Certificate(ref m) if m.contains("cert_mismatch")),
        "{err}"
    );
    assert_eq!(err.code(), "hypervisor_cert_mismatch");
    // No pin: the system roots do not know the simulator's certificate.
    let mut roots = config(&sim);
    roots.thumbprint = None;
    let err = VsphereBackend::new(&roots)
        .unwrap()
        .validate()
        .await
        .unwrap_err();
    assert!(
        matches!(err, HypervisorError::Certificate(ref m) if m.contains("cert_untrusted")),
        "{err}"
    );
    // The SHA-256 pin works as well as the SHA-1 one.
    let mut sha256 = config(&sim);
    sha256.thumbprint = Some(sim.thumbprint_sha256.clone());
    VsphereBackend::new(&sha256)
        .unwrap()
        .validate()
        .await
        .expect("SHA-256 pin");
    assert_eq!(sim.stats().logins, 1, "only the right pin logged in");
    // A wrong password is a refused login, not a retry loop.
    let wrong_password = sim.password_file().with_file_name("wrong");
    common::write_private(&wrong_password, "nope\n");
    let mut bad = config(&sim);
    bad.password_file = wrong_password;
    let err = VsphereBackend::new(&bad)
        .unwrap()
        .validate()
        .await
        .unwrap_err();
    assert!(matches!(err, HypervisorError::Auth(_)), "{err}");
}

#[tokio::test]
async fn the_pool_recovers_by_itself_when_the_simulator_comes_back() {
    let mut sim = Vcsim::start(VcsimOptions::default());
    let backend = backend(&sim);
    backend.list_vms().await.expect("list");
    sim.kill();
    let err = backend.list_vms().await.unwrap_err();
    assert!(matches!(err, HypervisorError::Unreachable(_)), "{err}");
    assert_eq!((err.status(), err.retry_after_s().is_some()), (503, true));
    assert_eq!(backend.stats().reachable, Some(false));
    sim.restart();
    let vms = backend.list_vms().await.expect("list after the restart");
    assert_eq!(vms.len(), VMS.len());
    let pool = backend.stats();
    assert_eq!(pool.reachable, Some(true));
    assert_eq!((pool.logins, pool.total_connections), (2, 1), "{pool:?}");
    assert_eq!(
        sim.stats().logins,
        1,
        "one login on the restarted simulator"
    );
}

#[tokio::test]
async fn thumbnails_decode_to_the_scaled_size() {
    let sim = Vcsim::start(VcsimOptions::default());
    let backend = backend(&sim);
    let vm = vm_named(&backend, "DC0_H0_VM0").await.native_id;
    for (max_width, max_height, want) in [(320, 240, (320, 240)), (100, 100, (100, 75))] {
        let size = ThumbnailSize {
            max_width,
            max_height,
        };
        let thumb = backend.thumbnail(&vm, size).await.expect("thumbnail");
        assert_eq!((thumb.width, thumb.height), want);
        let image = image::load_from_memory_with_format(&thumb.png, image::ImageFormat::Png)
            .expect("a PNG");
        assert_eq!((image.width(), image.height()), want);
    }
    let other = vm_named(&backend, "DC0_H0_VM1").await.native_id;
    let a = backend
        .thumbnail(
            &vm,
            ThumbnailSize {
                max_width: 64,
                max_height: 48,
            },
        )
        .await
        .unwrap();
    let b = backend
        .thumbnail(
            &other,
            ThumbnailSize {
                max_width: 64,
                max_height: 48,
            },
        )
        .await
        .unwrap();
    assert_ne!(a.png, b.png, "each VM has its own screen");
    assert_eq!(sim.stats().screens, 4);
}

/// Polls the follower's figures until `until` holds (bounded).
async fn wait_updates(
    backend: &VsphereBackend,
    what: &str,
    until: impl Fn(&UpdatesStats) -> bool,
) -> UpdatesStats {
    let deadline = Instant::now() + SIM_WAIT;
    loop {
        let stats = backend
            .updates_stats()
            .expect("the backend follows updates");
        if until(&stats) {
            return stats;
        }
        assert!(Instant::now() < deadline, "{what}: still {stats:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_update_follower_reports_its_session_its_updates_and_its_losses() {
    let mut sim = Vcsim::start(with_vm1_off(None));
    let mut c = config(&sim);
    c.follow_updates = true;
    c.updates_max_wait_s = 1;
    c.updates_reconnect_max_ms = 200;
    let backend = VsphereBackend::new(&c).expect("vSphere backend");
    let before = backend.updates_stats().expect("following is configured");
    assert!(!before.following, "{before:?}");
    assert_eq!((before.updates_received, before.errors), (0, 0));
    assert_eq!(
        (before.last_update_unix_ms, before.session.logins),
        (None, 0)
    );
    backend.spawn_updates();
    // The inventory's first UpdateSet: following, on one session.
    let read = wait_updates(&backend, "the inventory read", |u| {
        u.following && u.updates_received >= 1
    })
    .await;
    assert_eq!((read.errors, read.session.logins), (0, 1), "{read:?}");
    assert_eq!(
        read.session.active_connections, 1,
        "its session is checked out"
    );
    let first_at = read.last_update_unix_ms.expect("a time of the last update");
    // A power change on the host: one more UpdateSet, one change reported.
    let vm = vm_named(&backend, "DC0_H0_VM1").await.native_id;
    backend
        .power(&vm, PowerAction::On, Box::new(|_| {}))
        .await
        .expect("power on");
    let changed = wait_updates(&backend, "the power change", |u| {
        u.changes_reported > read.changes_reported
    })
    .await;
    assert!(
        changed.updates_received > read.updates_received,
        "{changed:?}"
    );
    assert!(
        changed.last_update_unix_ms.unwrap() >= first_at,
        "{changed:?}"
    );
    // The host goes away: lost, counted, with its reason; back: following
    // again on a new session.
    sim.kill();
    let lost = wait_updates(&backend, "the loss", |u| !u.following && u.errors >= 1).await;
    assert!(lost.last_error.is_some(), "{lost:?}");
    sim.restart();
    // Following is set when the new session's first wait is sent; its
    // first UpdateSet (the whole inventory again) comes after.
    let back = wait_updates(&backend, "following again", |u| {
        u.following && u.session.logins >= 2 && u.updates_received > changed.updates_received
    })
    .await;
    assert!(back.errors >= lost.errors, "{back:?}");
}
