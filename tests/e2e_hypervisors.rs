//! End-to-end tests of the appliance's hypervisor layer through its REST API
//! (`consolegate run` with `[[hypervisors]]`): the govmomi vSphere simulator
//! (tests/support/vcsim, whose WebMKS tickets lead to a real Xvnc), a real
//! QEMU behind QMP, and a static Xvnc. Consoles opened by VM id are relayed
//! end to end on both io backends; power actions run to completion through
//! operations; errors carry their documented status and code; a hypervisor
//! that goes away answers 503 and comes back by itself.
//!
//! Each test starts its peers on 127.0.0.1 ephemeral ports in its own temp
//! dir and stops them by PID; every wait is a bounded poll.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::qemu::{Qemu, QemuOptions};
use common::vcsim::{Vcsim, VcsimOptions, USERNAME, VMS};
use common::{
    browser_prerequisites, ctx, rfb_framebuffer, rfb_handshake_none, run_novnc, wait_until,
    ws_connect, Appliance, ApplianceOptions, BrowserRun, CreatedSession, HttpResponse, Xvnc,
    XvncOptions, ADMIN_TOKEN, NOVNC, READ_TOKEN,
};
use serde_json::{json, Value};

backend_tests!(
    vsphere_consoles_power_and_recovery,
    qemu_consoles_and_power,
    novnc_console_beside_thumbnails,
);

/// How long a state change may take to show through the API.
const DEADLINE: Duration = Duration::from_secs(20);
const VSPHERE_POOL_SIZE: u64 = 2;

fn vsphere_toml(sim: &Vcsim) -> String {
    format!(
        "\n[[hypervisors]]\nkind = \"vsphere\"\nid = \"esx1\"\nurl = {:?}\nusername = {USERNAME:?}\n\
         password_file = {:?}\nthumbprint = {:?}\npool_size = {VSPHERE_POOL_SIZE}\n\
         acquire_timeout_ms = 5000\nrequest_timeout_ms = 5000\ntask_timeout_ms = 20000\n\n\
         [cache]\nvm_list_ttl_ms = 200\nnegative_ttl_ms = 100\n",
        sim.url,
        sim.password_file().display().to_string(),
        sim.thumbprint
    )
}

fn console(app: &Appliance, vm: &str) -> HttpResponse {
    app.api(
        "POST",
        &format!("/api/v1/vms/{vm}/console"),
        Some(ADMIN_TOKEN),
        Some(&json!({"user": "alice"}).to_string()),
    )
}

fn open_console(app: &Appliance, vm: &str) -> CreatedSession {
    let r = console(app, vm);
    assert_eq!(r.status, 201, "{}console of {vm}: {r:?}", ctx());
    let v = r.json();
    assert_eq!(v["vm_id"], vm, "{}{v}", ctx());
    CreatedSession::from_json(&v)
}

/// Asserts an API error with its status and code.
fn assert_error(r: &HttpResponse, status: u16, code: &str, what: &str) {
    assert_eq!(r.status, status, "{}{what}: {r:?}", ctx());
    r.assert_json_error(what);
    assert_eq!(r.json()["error"]["code"], code, "{}{what}: {r:?}", ctx());
}

/// The listed VM named `name`.
fn vm_named(app: &Appliance, name: &str) -> Value {
    let list = app.get_json("/api/v1/vms");
    list["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("{}no VM {name} in {list}", ctx()))
}

fn id_of(vm: &Value) -> String {
    vm["id"].as_str().unwrap().to_string()
}

/// Runs a power action through the API and polls its operation to the end;
/// returns the finished operation.
fn power(app: &Appliance, vm: &str, action: &str) -> Value {
    let r = app.api(
        "POST",
        &format!("/api/v1/vms/{vm}/power"),
        Some(ADMIN_TOKEN),
        Some(&json!({ "action": action }).to_string()),
    );
    assert_eq!(r.status, 202, "{}power {action} {vm}: {r:?}", ctx());
    let op = r.json();
    let location = r.header("Location").expect("a Location header");
    assert_eq!(
        location,
        format!("/api/v1/operations/{}", op["id"].as_str().unwrap())
    );
    assert_eq!(
        (op["vm"].as_str(), op["action"].as_str()),
        (Some(vm), Some(action))
    );
    wait_until(DEADLINE, "the power operation to finish", || {
        let op = app.get_json(&location);
        matches!(op["state"].as_str(), Some("succeeded" | "failed")).then_some(op)
    })
}

/// Polls `GET /api/v1/vms/{vm}` until its power state is `want`.
fn wait_power(app: &Appliance, vm: &str, want: &str) {
    wait_until(DEADLINE, &format!("{vm} listed {want}"), || {
        (app.get_json(&format!("/api/v1/vms/{vm}"))["power"] == want).then_some(())
    });
}

/// `GET path` with optional extra headers: the status and head (its body
/// left empty), and the raw body (a PNG is not text).
fn get_bytes(addr: SocketAddr, path: &str, extra: &[(&str, &str)]) -> (HttpResponse, Vec<u8>) {
    let mut s = TcpStream::connect(addr).expect("connect to the control port");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAuthorization: Bearer {READ_TOKEN}\r\n"
    );
    for (k, v) in extra {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).expect("read the response");
    let end = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(&all)));
    let head = String::from_utf8_lossy(&all[..end]).into_owned();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let response = HttpResponse {
        status,
        head,
        body: String::new(),
    };
    (response, all[end + 4..].to_vec())
}

/// A thumbnail as a decoded PNG; checks the caching headers and that an
/// `If-None-Match` with its ETag answers 304.
fn thumbnail(app: &Appliance, vm: &str, query: &str) -> image::RgbImage {
    let path = format!("/api/v1/vms/{vm}/thumbnail{query}");
    let (r, body) = get_bytes(app.control, &path, &[]);
    assert_eq!(r.status, 200, "{}{path}: {}", ctx(), r.head);
    assert_eq!(r.header("Content-Type").as_deref(), Some("image/png"));
    let etag = r.header("ETag").expect("an ETag");
    let cache = r.header("Cache-Control").expect("a Cache-Control");
    assert!(cache.starts_with("private, max-age="), "{cache}");
    let (r, body304) = get_bytes(app.control, &path, &[("If-None-Match", &etag)]);
    assert_eq!(r.status, 304, "{}{path} If-None-Match: {}", ctx(), r.head);
    assert!(body304.is_empty());
    image::load_from_memory_with_format(&body, image::ImageFormat::Png)
        .expect("the thumbnail is a PNG")
        .to_rgb8()
}

/// The value of one series in `/metrics` (`name{labels}`), if present.
fn metric(app: &Appliance, series: &str) -> Option<f64> {
    let text = app.get("/metrics").body;
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Keys named `password` anywhere in `v`.
fn has_password_key(v: &Value) -> bool {
    match v {
        Value::Object(m) => m
            .iter()
            .any(|(k, v)| k == "password" || has_password_key(v)),
        Value::Array(a) => a.iter().any(has_password_key),
        _ => false,
    }
}

// ---------------------------------------------------------------------------
// vSphere (vcsim)
// ---------------------------------------------------------------------------

fn vsphere_consoles_power_and_recovery(io: &str) {
    let xvnc = Xvnc::start_with(XvncOptions {
        width: 400,
        height: 300,
        password: None,
    });
    let mut sim = Vcsim::start(VcsimOptions {
        vnc: Some(xvnc.addr()),
        powered_off: vec!["DC0_H0_VM1".into()],
        ..VcsimOptions::default()
    });
    let app = Appliance::start(
        io,
        ApplianceOptions {
            extra_toml: vsphere_toml(&sim),
            ..ApplianceOptions::default()
        },
    );
    let hypervisors = app.get_json("/api/v1/hypervisors");
    assert_eq!(hypervisors["hypervisors"][0]["id"], "esx1", "{hypervisors}");
    assert_eq!(hypervisors["hypervisors"][0]["kind"], "vsphere");

    // The list: every simulator VM, with its power state.
    let list = app.get_json("/api/v1/vms");
    let mut names: Vec<&str> = list["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    let mut want = VMS.to_vec();
    want.sort_unstable();
    assert_eq!(names, want, "{list}");
    assert_eq!(list["unavailable"], json!([]));
    let on = id_of(&vm_named(&app, "DC0_H0_VM0"));
    let off = vm_named(&app, "DC0_H0_VM1");
    assert_eq!(off["power"], "off", "{off}");
    let off = id_of(&off);
    assert!(on.starts_with("esx1:vm-"), "{on}");
    // The hypervisor's own id resolves too.
    let native = on.strip_prefix("esx1:").unwrap();
    assert_eq!(app.get_json(&format!("/api/v1/vms/{native}"))["id"], on);

    // Consoles: each relayed end to end (browser ws → appliance → wss with
    // the ticket's pinned thumbprint → the simulator → Xvnc), all through
    // at most pool_size API sessions.
    let mut clients = Vec::new();
    for _ in 0..3 {
        let session = open_console(&app, &on);
        let mut c = ws_connect(io, session.addr, &session.path, &[]);
        let init = rfb_handshake_none(&mut c);
        assert_eq!((init.width, init.height), (400, 300), "{}", ctx());
        let frame = rfb_framebuffer(&mut c, init.width, init.height);
        assert_eq!(frame.dimensions(), (400, 300));
        clients.push(c);
    }
    let stats = sim.stats();
    assert_eq!(stats.tickets_redeemed, 3, "{stats:?}");
    // The pool's sessions, plus the one that follows WaitForUpdatesEx.
    assert!(stats.logins <= VSPHERE_POOL_SIZE + 1, "{stats:?}");
    let pooled = metric(
        &app,
        "consolegate_hypervisor_pool_connections{hypervisor=\"esx1\",state=\"total\"}",
    )
    .expect("pool metrics");
    assert!(
        (1.0..=VSPHERE_POOL_SIZE as f64).contains(&pooled),
        "{pooled}"
    );
    let critical = metric(
        &app,
        "consolegate_queue_requests_total{hypervisor=\"esx1\",lane=\"critical\",outcome=\"requested\"}",
    )
    .expect("queue metrics");
    assert!(critical >= 3.0, "{critical}");
    drop(clients);

    // Refusals name the problem.
    assert_error(
        &console(&app, &off),
        409,
        "vm_not_running",
        "console of a powered-off VM",
    );
    assert_error(
        &console(&app, "esx1:vm-nope"),
        404,
        "vm_not_found",
        "console of an unknown VM",
    );
    assert_error(
        &app.get("/api/v1/vms?hypervisor=nohv"),
        404,
        "hypervisor_not_found",
        "the list of an unknown hypervisor",
    );

    // A power action runs to completion, and the VM lists on at once.
    let op = power(&app, &off, "on");
    assert_eq!(op["state"], "succeeded", "{op}");
    assert_eq!(op["progress_percent"], 100, "{op}");
    assert_eq!(app.get_json(&format!("/api/v1/vms/{off}"))["power"], "on");
    let session = open_console(&app, &off);
    let mut c = ws_connect(io, session.addr, &session.path, &[]);
    rfb_handshake_none(&mut c);
    drop(c);

    // Thumbnails: scaled into the box, cached (a second request is not a
    // second screenshot).
    let screens = sim.stats().screens;
    let image = thumbnail(&app, &on, "?width=160&height=120");
    assert_eq!(image.dimensions(), (160, 120));
    assert_eq!(sim.stats().screens, screens + 1);
    let (oversized, _) = get_bytes(
        app.control,
        &format!("/api/v1/vms/{on}/thumbnail?width=5000"),
        &[],
    );
    assert_eq!(oversized.status, 400, "an oversized thumbnail");

    // The simulator goes away: 503 with Retry-After, and the list says
    // which hypervisor is missing; it comes back by itself.
    sim.kill();
    let refused = wait_until(DEADLINE, "a console refused while vcsim is down", || {
        let r = console(&app, &on);
        (r.status == 503).then_some(r)
    });
    assert_error(
        &refused,
        503,
        "hypervisor_unavailable",
        "console while vcsim is down",
    );
    assert!(refused.header("Retry-After").is_some(), "{refused:?}");
    let list = wait_until(DEADLINE, "the list to name esx1 unavailable", || {
        let l = app.get_json("/api/v1/vms");
        (l["unavailable"].as_array().is_some_and(|u| !u.is_empty())).then_some(l)
    });
    assert_eq!(list["unavailable"][0]["hypervisor"], "esx1", "{list}");
    sim.restart();
    let session = wait_until(DEADLINE, "a console once vcsim is back", || {
        let r = console(&app, &on);
        (r.status == 201).then(|| CreatedSession::from_json(&r.json()))
    });
    let mut c = ws_connect(io, session.addr, &session.path, &[]);
    let init = rfb_handshake_none(&mut c);
    assert_eq!((init.width, init.height), (400, 300));
}

// ---------------------------------------------------------------------------
// QEMU
// ---------------------------------------------------------------------------

fn qemu_consoles_and_power(io: &str) {
    let dir = tempfile::Builder::new()
        .prefix("consolegate-qemu-")
        .tempdir()
        .unwrap();
    let mut qemu = Qemu::start(dir.path(), QemuOptions::default());
    qemu.wait_for_text_screen();
    let extra = format!(
        "\n[[hypervisors]]\nkind = \"qemu\"\nid = \"kvm1\"\nreconnect_max_ms = 200\n\
         vms = [{{ id = \"web01\", name = \"web server\", qmp = {:?} }}]\n",
        qemu.backend_qmp.display().to_string()
    );
    let app = Appliance::start(
        io,
        ApplianceOptions {
            extra_toml: extra,
            ..ApplianceOptions::default()
        },
    );
    let vm = vm_named(&app, "web server");
    assert_eq!(
        (vm["id"].as_str(), vm["power"].as_str()),
        (Some("kvm1:web01"), Some("on"))
    );

    // The console: QEMU's display wants a VNC password; the appliance sets a
    // one-time one over QMP and answers VNC authentication itself, so the
    // browser sees security type None and never the password.
    let r = console(&app, "kvm1:web01");
    assert_eq!(r.status, 201, "{r:?}");
    let created = r.json();
    assert!(!has_password_key(&created), "{created}");
    let session = CreatedSession::from_json(&created);
    let listed = app.get_json(&format!("/api/v1/sessions/{}", session.id));
    assert!(!has_password_key(&listed), "{listed}");
    let mut c = ws_connect(io, session.addr, &session.path, &[]);
    let init = rfb_handshake_none(&mut c);
    assert_eq!(
        (init.width, init.height),
        (720, 400),
        "SeaBIOS's text screen"
    );
    // The password was used: a second console gets a fresh one at once.
    let second = open_console(&app, "kvm1:web01");
    let mut c2 = ws_connect(io, second.addr, &second.path, &[]);
    assert_eq!(rfb_handshake_none(&mut c2).width, 720);
    let frame = rfb_framebuffer(&mut c, 720, 400);
    assert_eq!(
        frame.dimensions(),
        (720, 400),
        "the first console still relays"
    );

    // A thumbnail of the live VM leaves both consoles working.
    let image = thumbnail(&app, "kvm1:web01", "");
    assert_eq!(image.width(), 320, "scaled into the 320x240 box");
    assert!(
        (177..=178).contains(&image.height()),
        "{:?}",
        image.dimensions()
    );
    let frame = rfb_framebuffer(&mut c2, 720, 400);
    assert_eq!(
        frame.dimensions(),
        (720, 400),
        "the second console relays after a thumbnail"
    );

    // Power through the API, and changes made behind the appliance's back
    // (the test's own QMP socket) show without polling.
    let op = power(&app, "kvm1:web01", "suspend");
    assert_eq!(
        (op["state"].as_str(), op["progress_percent"].as_u64()),
        (Some("succeeded"), Some(100)),
        "{op}"
    );
    wait_power(&app, "kvm1:web01", "suspended");
    qemu.qmp().execute("cont", json!({})).unwrap();
    wait_power(&app, "kvm1:web01", "on");
    // Off is QEMU's `quit`: the VM is off and has no console.
    let op = power(&app, "kvm1:web01", "off");
    assert_eq!(op["state"], "succeeded", "{op}");
    qemu.wait_exit();
    wait_power(&app, "kvm1:web01", "off");
    assert_error(
        &console(&app, "kvm1:web01"),
        409,
        "vm_not_running",
        "console of a VM that is off",
    );
    assert_error(
        &console(&app, "kvm1:web02"),
        404,
        "vm_not_found",
        "unknown VM",
    );
}

// ---------------------------------------------------------------------------
// A live noVNC console while thumbnails of its VNC server are taken
// ---------------------------------------------------------------------------

/// noVNC in headless Chromium shows an Xvnc's test card through a console
/// opened by VM (a static hypervisor), while another thread takes
/// thumbnails of that same Xvnc (each a size of its own, so each is a real
/// RFB snapshot, not a cache hit): the picture arrives whole, the session
/// ends as the browser closes it, and every thumbnail succeeds.
fn novnc_console_beside_thumbnails(io: &str) {
    let node = browser_prerequisites();
    let xvnc = Xvnc::start_with(XvncOptions {
        width: 640,
        height: 480,
        password: None,
    });
    let card = xvnc.draw_test_card();
    let extra = format!(
        "\n[[hypervisors]]\nkind = \"static\"\nid = \"lab\"\n\
         vms = [{{ id = \"x1\", name = \"build box\", host = \"127.0.0.1\", port = {} }}]\n",
        xvnc.port
    );
    let app = Appliance::start(
        io,
        ApplianceOptions {
            web_dir: Some(PathBuf::from(NOVNC)),
            sessions_toml: "ticket_ttl_ms = 600000\n".into(),
            extra_toml: extra,
            ..ApplianceOptions::default()
        },
    );
    let session = open_console(&app, "lab:x1");
    let stop = Arc::new(AtomicBool::new(false));
    let control = app.control;
    let snapshots = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut taken = Vec::new();
            let mut width = 64;
            while !stop.load(Ordering::Relaxed) && width < 64 + 500 {
                let path = format!("/api/v1/vms/lab:x1/thumbnail?width={width}&height=480");
                let (r, body) = get_bytes(control, &path, &[]);
                taken.push((width, r.status, r.head, body.len()));
                width += 1;
            }
            taken
        })
    };
    let run = run_novnc(
        &node,
        &format!("http://{}", app.console),
        &format!("novnc-beside-thumbnails-{io}"),
        &[BrowserRun::new("none", &card).path(&session.path)],
    );
    stop.store(true, Ordering::Relaxed);
    let taken = snapshots.join().expect("the thumbnail thread");
    assert!(
        taken.len() >= 2,
        "{}only {} thumbnails taken during the browser run ({})",
        ctx(),
        taken.len(),
        run.output
    );
    for (width, status, head, bytes) in &taken {
        assert!(
            *status == 200 && *bytes > 0,
            "{}thumbnail at width {width} beside a live console: {head}",
            ctx()
        );
    }
    let record = app.wait_state(&session.id, "closed", DEADLINE);
    assert!(
        record["bytes_backend_to_browser"].as_u64() > Some(400),
        "{}the console carried (almost) nothing: {record}",
        ctx()
    );
}
