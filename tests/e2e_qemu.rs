//! End-to-end tests of the hypervisor backends against real peers: a real
//! `qemu-system-x86_64` (TCG, SeaBIOS's 720×400 text screen) behind the
//! QEMU backend, with a second QMP socket for the test itself; TigerVNC's
//! `Xvnc` behind the RFB snapshot and the static backend.
//!
//! Each test starts its own peers in its own temp dir on loopback, and
//! stops them by PID. Every wait is a bounded poll. Needs Debian's
//! qemu-system-x86, tigervnc-standalone-server and tigervnc-tools
//! (`bash scripts/install-deps.sh test`).

#[macro_use]
mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::qemu::{lit_pixels, Qemu, QemuOptions, QemuVnc, Viewer, XvncNotShared};
use common::Xvnc;
use consolegate::hypervisor::model::{
    ConsoleTarget, Hypervisor, HypervisorError, OperationState, PowerAction, PowerState, Progress,
    Thumbnail, ThumbnailSize, VmInfo,
};
use consolegate::hypervisor::qemu::{QemuBackend, QemuConfig, QemuVmConfig};
use consolegate::hypervisor::snapshot::{self, SnapshotLimits};
use consolegate::hypervisor::static_targets::{StaticBackend, StaticConfig, StaticVmConfig};
use serde_json::json;

const VM: &str = "web01";
/// How long a state change may take to show.
const DEADLINE: Duration = Duration::from_secs(10);
/// The thumbnail box of the tests.
const BOX: ThumbnailSize = ThumbnailSize {
    max_width: 320,
    max_height: 240,
};

/// A QEMU, the backend on its first QMP socket, and the private
/// screendump directory.
struct Setup {
    qemu: Qemu,
    backend: QemuBackend,
    screendumps: tempfile::TempDir,
    _dir: tempfile::TempDir,
}

fn setup(options: QemuOptions) -> Setup {
    let dir = tempfile::Builder::new()
        .prefix("consolegate-qemu-")
        .tempdir()
        .unwrap();
    let prelaunch = options.prelaunch;
    let qemu = Qemu::start(dir.path(), options);
    if !prelaunch {
        qemu.wait_for_text_screen();
    }
    // Private to this user, as the appliance makes it.
    let screendumps = tempfile::tempdir().unwrap();
    std::fs::set_permissions(screendumps.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let backend = start_backend(&qemu, screendumps.path());
    Setup {
        qemu,
        backend,
        screendumps,
        _dir: dir,
    }
}

fn start_backend(qemu: &Qemu, screendumps: &Path) -> QemuBackend {
    let vm = QemuVmConfig {
        id: VM.into(),
        name: Some("web server".into()),
        qmp: qemu.backend_qmp.clone(),
    };
    let config = QemuConfig {
        reconnect_max_ms: 200,
        ..QemuConfig::new("kvm1", vec![vm])
    };
    QemuBackend::start(config, screendumps).unwrap()
}

/// Polls the backend's listed state (its memory, not QEMU) until `want`.
async fn wait_power(backend: &QemuBackend, want: PowerState) -> VmInfo {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let info = backend.vm(VM).await.unwrap();
        if info.power == want {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "VM still {:?} after {DEADLINE:?}, expected {want:?}",
            info.power
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `f` holds, yielding to the runtime in between.
async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn decode(thumbnail: &Thumbnail) -> image::RgbImage {
    let img = image::load_from_memory_with_format(&thumbnail.png, image::ImageFormat::Png)
        .expect("the thumbnail is a PNG")
        .to_rgb8();
    assert_eq!(img.dimensions(), (thumbnail.width, thumbnail.height));
    img
}

fn vnc_password(target: &ConsoleTarget) -> String {
    match target {
        ConsoleTarget::Vnc {
            password: Some(password),
            ..
        } => password.clone(),
        other => panic!("not a VNC target with a password: {other:?}"),
    }
}

#[tokio::test]
async fn qemu_console_password_works_for_one_login_then_expires() {
    let s = setup(QemuOptions::default());
    let info = wait_power(&s.backend, PowerState::On).await;
    assert_eq!(
        (info.name.as_str(), info.hypervisor.as_str()),
        ("web server", "kvm1")
    );
    let console = s.backend.console(VM).await.unwrap();
    assert!(console.one_time);
    match &console.target {
        ConsoleTarget::Vnc { host, port, .. } => {
            assert_eq!((host.as_str(), *port), ("127.0.0.1", s.qemu.vnc_port))
        }
        other => panic!("{other:?}"),
    }
    let password = vnc_password(&console.target);
    assert_eq!(password.len(), 8);
    let addr = s.qemu.vnc_addr();
    assert!(Viewer::connect(addr, Some("wrong-pw"), true).is_err());
    let mut first = Viewer::connect(addr, Some(&password), true).expect("login with the password");
    assert_eq!((first.width, first.height), (720, 400));
    s.backend.console_used(VM).await.unwrap();
    let refused = Viewer::connect(addr, Some(&password), true)
        .err()
        .expect("a second login with a used password must fail");
    assert!(refused.contains("failed"), "{refused}");
    // The first viewer keeps its session.
    assert!(first.full_update().unwrap() >= 1);
    // The next console has a new password, which works.
    let again = vnc_password(&s.backend.console(VM).await.unwrap().target);
    assert_ne!(again, password);
    Viewer::connect(addr, Some(&again), true).expect("login with the new password");
    s.backend.console_used(VM).await.unwrap();
    assert!(first.full_update().unwrap() >= 1);
    assert_eq!(s.backend.commands_sent(VM, "set_password"), Some(2));
}

#[tokio::test]
async fn qemu_console_is_refused_without_a_password_protected_display() {
    let open = setup(QemuOptions {
        vnc: QemuVnc::NoPassword,
        prelaunch: false,
        ..QemuOptions::default()
    });
    let headless = setup(QemuOptions {
        vnc: QemuVnc::Without,
        prelaunch: false,
        ..QemuOptions::default()
    });
    wait_power(&open.backend, PowerState::On).await;
    let e = open.backend.console(VM).await.unwrap_err();
    assert!(
        matches!(&e, HypervisorError::Unsupported(m) if m.contains("not password-protected") && m.contains("password=on")),
        "{e}"
    );
    assert_eq!(open.backend.commands_sent(VM, "set_password"), Some(0));
    wait_power(&headless.backend, PowerState::On).await;
    let e = headless.backend.console(VM).await.unwrap_err();
    assert!(
        matches!(&e, HypervisorError::Unsupported(m) if m.contains("no VNC display") && m.contains("-vnc")),
        "{e}"
    );
    // Thumbnails need no VNC display: screendump reads the graphics card.
    let thumbnail = headless.backend.thumbnail(VM, BOX).await.unwrap();
    assert_eq!((thumbnail.width, thumbnail.height), (320, 177));
}

#[tokio::test]
async fn qemu_thumbnail_is_the_guest_screen_scaled_by_screendump_or_rfb() {
    let s = setup(QemuOptions::default());
    wait_power(&s.backend, PowerState::On).await;
    let dumped = s.backend.thumbnail(VM, BOX).await.unwrap();
    // 720×400 into 320×240.
    assert_eq!((dumped.width, dumped.height), (320, 177));
    let dumped_img = decode(&dumped);
    assert!(lit_pixels(&dumped_img) > 100, "SeaBIOS's text should show");
    assert_eq!(s.backend.commands_sent(VM, "screendump"), Some(1));
    assert_eq!(s.backend.commands_sent(VM, "set_password"), Some(0));
    // The file was read and removed.
    assert_eq!(std::fs::read_dir(s.screendumps.path()).unwrap().count(), 0);

    // Without its directory screendump fails: the RFB snapshot takes over.
    let screendumps = s.screendumps.path().to_path_buf();
    std::fs::remove_dir(&screendumps).unwrap();
    let snapped = s.backend.thumbnail(VM, BOX).await.unwrap();
    assert_eq!((snapped.width, snapped.height), (320, 177));
    assert_eq!(s.backend.commands_sent(VM, "screendump"), Some(2));
    assert_eq!(s.backend.commands_sent(VM, "set_password"), Some(1));
    // Both show the same screen (the blinking cursor aside).
    let snapped_img = decode(&snapped);
    let differing = dumped_img
        .pixels()
        .zip(snapped_img.pixels())
        .filter(|(a, b)| a.0.iter().zip(b.0).any(|(x, y)| x.abs_diff(y) > 24))
        .count();
    let total = (snapped.width * snapped.height) as usize;
    assert!(
        differing * 20 < total,
        "{differing} of {total} pixels differ"
    );
    std::fs::create_dir(&screendumps).unwrap();
}

#[tokio::test]
async fn qemu_power_state_follows_events_from_another_client_without_polling() {
    let s = setup(QemuOptions::default());
    wait_power(&s.backend, PowerState::On).await;
    let mut changes = s.backend.subscribe();
    let polls_before = s.backend.commands_sent(VM, "query-status").unwrap();
    assert_eq!(polls_before, 1, "one query-status at connect");
    // The test's own QMP socket, not the backend's.
    let mut qmp = s.qemu.qmp();
    qmp.execute("stop", json!({})).unwrap();
    wait_power(&s.backend, PowerState::Suspended).await;
    qmp.execute("cont", json!({})).unwrap();
    wait_power(&s.backend, PowerState::On).await;
    assert_eq!(
        s.backend.commands_sent(VM, "query-status"),
        Some(polls_before),
        "the backend polled"
    );
    for (old, new) in [
        (PowerState::On, PowerState::Suspended),
        (PowerState::Suspended, PowerState::On),
    ] {
        let change = tokio::time::timeout(DEADLINE, changes.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (change.hypervisor.as_str(), change.vm_id.as_str()),
            ("kvm1", VM)
        );
        assert_eq!((change.old, change.new), (old, new));
    }
}

/// Runs a power action; returns its result and the progress it reported.
async fn power(
    backend: &QemuBackend,
    action: PowerAction,
) -> (Result<(), HypervisorError>, Vec<Progress>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    let result = backend
        .power(
            VM,
            action,
            Box::new(move |progress| sink.lock().unwrap().push(progress)),
        )
        .await;
    let seen = seen.lock().unwrap().clone();
    (result, seen)
}

fn assert_progressed_to_100(action: PowerAction, progress: &[Progress]) {
    let percents: Vec<u8> = progress.iter().map(|p| p.percent).collect();
    assert_eq!(percents, [0, 50, 100], "{action:?}: {progress:?}");
    assert_eq!(
        progress.last().unwrap().state,
        OperationState::Succeeded,
        "{action:?}: {progress:?}"
    );
}

#[tokio::test]
async fn qemu_power_actions_run_to_completion_with_progress() {
    // -S: QEMU waits before the first instruction, which lists as off.
    let mut s = setup(QemuOptions {
        vnc: QemuVnc::Password,
        prelaunch: true,
        ..QemuOptions::default()
    });
    wait_power(&s.backend, PowerState::Off).await;
    let steps = [
        (PowerAction::On, PowerState::On),
        (PowerAction::Suspend, PowerState::Suspended),
        (PowerAction::On, PowerState::On),
        (PowerAction::Reset, PowerState::On),
        // SeaBIOS ignores the ACPI button: still on, but the press is done.
        (PowerAction::Shutdown, PowerState::On),
    ];
    for (action, after) in steps {
        let (result, progress) = power(&s.backend, action).await;
        result.unwrap_or_else(|e| panic!("{action:?}: {e}"));
        assert_progressed_to_100(action, &progress);
        assert_eq!(
            s.backend.vm(VM).await.unwrap().power,
            after,
            "after {action:?}"
        );
    }
    assert_eq!(s.backend.commands_sent(VM, "system_reset"), Some(2));
    // Already on: done at once.
    let (result, progress) = power(&s.backend, PowerAction::On).await;
    result.unwrap();
    assert_eq!(progress.len(), 1);
    assert_eq!(progress[0].percent, 100);

    // Off is `quit`: QEMU exits, the VM is off, and on cannot restart it.
    let (result, progress) = power(&s.backend, PowerAction::Off).await;
    result.unwrap();
    assert_progressed_to_100(PowerAction::Off, &progress);
    s.qemu.wait_exit();
    assert_eq!(s.backend.vm(VM).await.unwrap().power, PowerState::Off);
    let (result, progress) = power(&s.backend, PowerAction::On).await;
    let e = result.unwrap_err();
    assert!(
        matches!(&e, HypervisorError::InvalidState(m) if m.contains("does not start QEMU")),
        "{e}"
    );
    assert_eq!(progress.last().unwrap().state, OperationState::Failed);
    assert!(matches!(
        s.backend.console(VM).await,
        Err(HypervisorError::VmNotRunning(_))
    ));
    assert!(matches!(
        s.backend.thumbnail(VM, BOX).await,
        Err(HypervisorError::VmNotRunning(_))
    ));

    // Started again (by whatever manages it), it is picked up by itself.
    s.qemu.restart();
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (result, _) = power(&s.backend, PowerAction::On).await;
        match result {
            Ok(()) => break,
            Err(e) => assert!(Instant::now() < deadline, "QEMU not picked up again: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_power(&s.backend, PowerState::On).await;
}

#[tokio::test]
async fn qemu_killed_is_unreachable_then_picked_up_again_when_restarted() {
    let mut s = setup(QemuOptions::default());
    wait_power(&s.backend, PowerState::On).await;
    s.backend.validate().await.unwrap();
    s.qemu.kill();
    wait_power(&s.backend, PowerState::Unknown).await;
    let unreachable = |e: HypervisorError| {
        assert!(matches!(e, HypervisorError::Unreachable(_)), "{e}");
        assert_eq!(e.status(), 503);
    };
    unreachable(s.backend.console(VM).await.unwrap_err());
    unreachable(s.backend.thumbnail(VM, BOX).await.unwrap_err());
    unreachable(power(&s.backend, PowerAction::Suspend).await.0.unwrap_err());
    unreachable(s.backend.validate().await.unwrap_err());

    s.qemu.restart();
    wait_power(&s.backend, PowerState::On).await;
    s.backend.validate().await.unwrap();
    let password = vnc_password(&s.backend.console(VM).await.unwrap().target);
    Viewer::connect(s.qemu.vnc_addr(), Some(&password), true).expect("login after the restart");
    s.backend.console_used(VM).await.unwrap();
    assert_eq!(s.backend.commands_sent(VM, "query-status"), Some(4));
}

// ---------------------------------------------------------------------------
// RFB snapshots of a live TigerVNC
// ---------------------------------------------------------------------------

fn limits() -> SnapshotLimits {
    SnapshotLimits::default()
}

/// A viewer on its own thread asking for full updates until told to stop;
/// it ends with an error if the server disconnects it.
struct LiveViewer {
    updates: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<Result<u64, String>>,
}

/// Bounds the viewer's loop, whatever the test does.
const VIEWER_MAX_UPDATES: u64 = 100_000;

impl LiveViewer {
    fn start(addr: std::net::SocketAddr) -> LiveViewer {
        let updates = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopped) = (Arc::clone(&updates), Arc::clone(&stop));
        let thread = thread::spawn(move || {
            let mut viewer = Viewer::connect(addr, None, true)?;
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stopped.load(Ordering::SeqCst) && Instant::now() < deadline {
                viewer.full_update()?;
                if count.fetch_add(1, Ordering::SeqCst) >= VIEWER_MAX_UPDATES {
                    break;
                }
            }
            Ok(count.load(Ordering::SeqCst))
        });
        LiveViewer {
            updates,
            stop,
            thread,
        }
    }

    fn updates(&self) -> u64 {
        self.updates.load(Ordering::SeqCst)
    }

    async fn wait_for_more_than(&self, seen: u64) {
        wait_for("the viewer's next update", || {
            self.updates() > seen || self.thread.is_finished()
        })
        .await;
        assert!(!self.thread.is_finished(), "the viewer stopped early");
    }

    fn finish(self) -> Result<u64, String> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

#[tokio::test]
async fn snapshots_of_xvnc_leave_a_live_viewer_connected_and_served() {
    let xvnc = XvncNotShared::start();
    let viewer = LiveViewer::start(xvnc.addr());
    viewer.wait_for_more_than(0).await;
    let size = ThumbnailSize {
        max_width: 160,
        max_height: 160,
    };
    for _ in 0..5 {
        let seen = viewer.updates();
        let thumbnail = snapshot::snapshot("127.0.0.1", xvnc.port, None, size, &limits())
            .await
            .unwrap();
        // 320×240 into 160×160.
        assert_eq!((thumbnail.width, thumbnail.height), (160, 120));
        decode(&thumbnail);
        viewer.wait_for_more_than(seen).await;
    }
    let updates = viewer.finish().expect("the viewer was disconnected");
    assert!(updates > 5, "{updates}");
}

/// The control for the test above: on this Xvnc a client that is not
/// shared does disconnect the viewer, so that test can fail.
#[tokio::test]
async fn a_non_shared_client_would_disconnect_the_viewer() {
    let xvnc = XvncNotShared::start();
    let viewer = LiveViewer::start(xvnc.addr());
    viewer.wait_for_more_than(0).await;
    let _intruder = Viewer::connect(xvnc.addr(), None, false).unwrap();
    wait_for("the viewer to be disconnected", || {
        viewer.thread.is_finished()
    })
    .await;
    let e = viewer.finish().unwrap_err();
    assert!(!e.is_empty());
}

#[tokio::test]
async fn snapshot_of_xvnc_with_a_password() {
    let xvnc = Xvnc::with_password("xvnc-pw");
    let size = ThumbnailSize {
        max_width: 160,
        max_height: 120,
    };
    let thumbnail = snapshot::snapshot("127.0.0.1", xvnc.port, Some("xvnc-pw"), size, &limits())
        .await
        .unwrap();
    assert_eq!((thumbnail.width, thumbnail.height), (160, 120));
    // -retro draws the X weave: not one flat colour.
    let img = decode(&thumbnail);
    let first = img.get_pixel(0, 0).0;
    assert!(img.pixels().any(|p| p.0 != first));
    let e = snapshot::snapshot("127.0.0.1", xvnc.port, Some("wrong"), size, &limits())
        .await
        .unwrap_err();
    assert!(matches!(e, HypervisorError::Auth(_)), "{e}");
    let e = snapshot::snapshot("127.0.0.1", xvnc.port, None, size, &limits())
        .await
        .unwrap_err();
    assert!(matches!(e, HypervisorError::Auth(_)), "{e}");
}

#[tokio::test]
async fn static_backend_lists_opens_and_thumbnails_xvnc() {
    let xvnc = Xvnc::with_password("static-pw");
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("x1.password");
    common::write_private(&password_file, "static-pw\n");
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let target = |id: &str, port: u16| StaticVmConfig {
        id: id.into(),
        name: None,
        host: "127.0.0.1".into(),
        port,
        password: None,
        password_file: Some(password_file.clone()),
    };
    let backend = StaticBackend::new(StaticConfig {
        id: "lab".into(),
        vms: vec![target("x1", xvnc.port), target("gone", closed)],
        probe_timeout_ms: 500,
        snapshot_timeout_ms: 5_000,
        max_concurrent: 4,
    })
    .unwrap();
    let vms = backend.list_vms().await.unwrap();
    let powers: Vec<_> = vms.iter().map(|vm| (vm.id.as_str(), vm.power)).collect();
    assert_eq!(
        powers,
        [("x1", PowerState::On), ("gone", PowerState::Unknown)]
    );
    let console = backend.console("x1").await.unwrap();
    assert!(!console.one_time);
    let password = vnc_password(&console.target);
    assert_eq!(password, "static-pw");
    let viewer = Viewer::connect(xvnc.addr(), Some(&password), true).expect("login");
    assert_eq!((viewer.width, viewer.height), (320, 240));
    backend.console_used("x1").await.unwrap();
    let size = ThumbnailSize {
        max_width: 160,
        max_height: 160,
    };
    let thumbnail = backend.thumbnail("x1", size).await.unwrap();
    assert_eq!((thumbnail.width, thumbnail.height), (160, 120));
    decode(&thumbnail);
    let e = backend
        .power("x1", PowerAction::Off, Box::new(|_| {}))
        .await
        .unwrap_err();
    assert!(matches!(e, HypervisorError::Unsupported(_)), "{e}");
}
