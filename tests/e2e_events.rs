//! Live events over WebSocket on the control port, end to end against a
//! real appliance (`consolegate run`): authentication before the upgrade,
//! the protocol (subscribe, ping, errors that keep the connection, 1008
//! for garbage and for the message rate), sessions' lifecycle, a real
//! QEMU's power changes and a power action's progress, anonymous access to
//! the public rooms only, and a subscriber that never reads.
//!
//! The event plane is the control thread's: one IO backend (epoll) is
//! enough; the console sessions the tests open go through it. Every wait
//! is a bounded poll; peers are started and stopped by the test.

mod common;

use std::time::{Duration, Instant};

use common::events::{events, events_small_rcvbuf, try_events, EventsClient as Events, Got};
use common::qemu::{Qemu, QemuOptions, TestQmp};
use common::*;
use serde_json::{json, Value};
use tungstenite::Message;

const IO: &str = "epoll";

fn appliance(extra: &str) -> Appliance {
    set_current_io(IO);
    Appliance::start(
        IO,
        ApplianceOptions {
            extra_toml: extra.to_string(),
            ..ApplianceOptions::default()
        },
    )
}

#[test]
fn refusals_come_before_the_upgrade_as_json() {
    let app = appliance("[events]\nallow_anonymous = false\n");
    let c = app.control;
    let cases: [(&str, Option<&str>, u16, &str); 6] = [
        ("/ws/monitor", None, 401, "unauthorized"),
        (
            "/ws/monitor",
            Some("not-a-token-0123456789abcdef"),
            401,
            "unauthorized",
        ),
        ("/ws/stats", Some(READ_TOKEN), 403, "forbidden"),
        ("/ws/stats", None, 401, "unauthorized"),
        (
            "/ws/server/nope",
            Some(ADMIN_TOKEN),
            404,
            "hypervisor_not_found",
        ),
        (
            "/ws/vm/nope:nothing",
            Some(ADMIN_TOKEN),
            404,
            "vm_not_found",
        ),
    ];
    for (path, token, status, code) in cases {
        match try_events(c, path, token) {
            Ok(_) => panic!("{path} with {token:?} was upgraded"),
            Err((s, body)) => {
                assert_eq!(s, status, "{path}: {body}");
                assert_eq!(body["error"]["code"], code, "{path}: {body}");
            }
        }
    }
    // The query parameter works where a browser cannot set a header.
    let mut by_query = events(c, &format!("/ws/stats?token={ADMIN_TOKEN}"), None);
    let stats = by_query.next_of("stats");
    assert_eq!(stats["data"]["connections_by_room"]["stats"], 1, "{stats}");
    // A plain GET (no upgrade) with a good token: 400, JSON.
    let r = app.api("GET", "/ws/monitor", Some(ADMIN_TOKEN), None);
    r.assert_api_error(400, "bad_request", "GET /ws/monitor without an upgrade");
}

#[test]
fn invalid_messages_keep_the_connection_until_they_persist() {
    let app = appliance("[events]\nmessages_per_s = 1000\n");
    let mut e = events(app.control, "/ws/monitor", Some(ADMIN_TOKEN));
    e.send("{nope");
    let err = e.next_of("error");
    assert_eq!(err["data"]["code"], "invalid_json", "{err}");
    e.send_json(json!({"type": "dance"}));
    let err = e.next_of("error");
    assert_eq!(err["data"]["code"], "unknown_type", "{err}");
    assert!(
        err["data"]["message"].as_str().unwrap().contains("dance"),
        "{err}"
    );
    e.send_json(json!({"type": "subscribe", "data": {"events": ["teleport"]}}));
    let err = e.next_of("error");
    assert_eq!(err["data"]["code"], "unknown_event", "{err}");
    // Still there, still answering.
    e.send_json(json!({"type": "ping", "data": {"timestamp": 42}}));
    let pong = e.next_of("pong");
    assert_eq!(pong["data"]["timestamp"], 42, "{pong}");
    let sub = e.subscribe(json!({"events": ["progress"], "vm_ids": ["a", "b"]}));
    assert_eq!(sub["data"]["events"], json!(["progress"]), "{sub}");
    e.send_json(json!({"type": "unsubscribe", "data": {"vm_ids": ["a"]}}));
    let unsub = e.next_of("unsubscribed");
    assert_eq!(unsub["data"]["vm_ids"], json!(["b"]), "{unsub}");
    // Garbage that persists: closed with 1008.
    for _ in 0..20 {
        if e.ws.send(Message::text("garbage")).is_err() {
            break;
        }
    }
    let (code, reason) = e.expect_close();
    assert_eq!(code, Some(1008), "{reason}");
    assert!(reason.contains("invalid"), "{reason}");
}

#[test]
fn over_the_message_rate_closes_with_1008() {
    let app = appliance("[events]\nmessages_per_s = 5\n");
    let mut e = events(app.control, "/ws/monitor", Some(ADMIN_TOKEN));
    for i in 0..30 {
        if e.ws
            .send(Message::text(
                json!({"type": "ping", "data": {"n": i}}).to_string(),
            ))
            .is_err()
        {
            break;
        }
    }
    let (code, reason) = e.expect_close();
    assert_eq!(code, Some(1008), "{reason}");
    assert!(reason.contains("rate"), "{reason}");
}

#[test]
fn a_console_session_opening_and_closing_reaches_a_subscriber() {
    let app = appliance("");
    let mut admin = events(app.control, "/ws/monitor", Some(ADMIN_TOKEN));
    admin.subscribe(json!({"events": ["session_opened", "session_closed"]}));
    let s = app.create_demo("alice");
    let mut browser = ws_connect(IO, s.addr, &s.path, &["binary"]);
    let init = rfb_handshake_none(&mut browser);
    assert!(init.width > 0);
    let opened = admin.next_where("session_opened", |d| d["session_id"] == s.id.as_str());
    assert_eq!(opened["data"]["user"], "alice", "{opened}");
    assert_eq!(opened["data"]["reason"], "opened", "{opened}");
    browser.close();
    let closed = admin.next_where("session_closed", |d| d["session_id"] == s.id.as_str());
    let d = &closed["data"];
    assert_eq!(d["user"], "alice", "{closed}");
    // The RFB handshake was relayed; the registry's reconcile may close the
    // record before the worker's report (with its figures) arrives.
    assert!(
        d["bytes"].as_u64().unwrap() > 0
            || d["reason"]
                .as_str()
                .unwrap()
                .contains("report has not arrived"),
        "{closed}"
    );
    assert!(
        d["duration_ms"].is_u64() && d["reason"].is_string(),
        "{closed}"
    );
    // A pending session revoked through the API ends with its reason.
    let pending = app.create_demo("bob");
    app.delete(&pending.id);
    let revoked = admin.next_where("session_closed", |d| d["session_id"] == pending.id.as_str());
    assert_eq!(
        revoked["data"]["reason"], "revoked through the API",
        "{revoked}"
    );
}

fn qemu_appliance(qemu: &Qemu) -> Appliance {
    appliance(&format!(
        "\n[events]\nallow_anonymous = true\nvm_refresh_interval_ms = 0\n\
         \n[[hypervisors]]\nkind = \"qemu\"\nid = \"kvm1\"\nreconnect_max_ms = 200\n\
         vms = [{{ id = \"web01\", name = \"web server\", qmp = {:?} }}]\n",
        qemu.backend_qmp.display().to_string()
    ))
}

fn status_change(e: &mut Events, old: &str, new: &str) -> Value {
    e.next_where("vm_status_changed", |d| {
        d["old_status"] == old && d["new_status"] == new
    })
}

#[test]
fn qemu_power_changes_and_progress_reach_subscribers_anonymous_see_only_public_events() {
    let dir = tempfile::tempdir().unwrap();
    let qemu = Qemu::start(dir.path(), QemuOptions::default());
    qemu.wait_for_text_screen();
    let app = qemu_appliance(&qemu);
    // The fleet knows the VM's state once it listed it.
    let vm = app.get_json("/api/v1/vms/kvm1:web01");
    assert_eq!(vm["power"], "on", "{vm}");
    let mut room = events(app.control, "/ws/vm/kvm1:web01", Some(ADMIN_TOKEN));
    let mut server = events(app.control, "/ws/server/kvm1", Some(READ_TOKEN));
    let mut anonymous = events(app.control, "/ws/monitor", None);
    anonymous.send_json(json!({"type": "subscribe", "data": {"events": ["session_opened"]}}));
    let refused = anonymous.next_of("error");
    assert_eq!(refused["data"]["code"], "event_not_allowed", "{refused}");
    assert!(try_events(app.control, "/ws/stats", None).is_err());

    // A QMP `stop` from outside the appliance.
    let mut qmp: TestQmp = qemu.qmp();
    qmp.execute("stop", json!({})).unwrap();
    for e in [&mut room, &mut server, &mut anonymous] {
        let change = status_change(e, "on", "suspended");
        assert_eq!(change["data"]["vm_id"], "kvm1:web01", "{change}");
        assert_eq!(change["data"]["server_id"], "kvm1", "{change}");
        assert_eq!(change["data"]["vm_name"], "web server", "{change}");
    }
    qmp.execute("cont", json!({})).unwrap();
    for e in [&mut room, &mut server, &mut anonymous] {
        status_change(e, "suspended", "on");
    }

    // A power action through the REST API: progress to 100 %.
    let r = app.api(
        "POST",
        "/api/v1/vms/kvm1:web01/power",
        Some(ADMIN_TOKEN),
        Some(r#"{"action":"off"}"#),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let op = r.json()["id"].as_str().unwrap().to_string();
    let done = room.next_where("progress", |d| {
        d["operation_id"] == op.as_str() && d["status"] != "queued" && d["status"] != "running"
    });
    assert_eq!(done["data"]["status"], "succeeded", "{done}");
    assert_eq!(done["data"]["progress_percent"], 100, "{done}");
    assert_eq!(done["data"]["operation_type"], "off", "{done}");
    let change = room.next_where("vm_status_changed", |d| d["old_status"] == "on");
    assert_ne!(change["data"]["new_status"], "on", "{change}");
    // The anonymous monitor saw the change but never the progress.
    anonymous.next_where("vm_status_changed", |d| d["old_status"] == "on");
    anonymous.none_of("progress", Duration::from_millis(500));
    // A failing power action ends with an error status.
    let r = app.api(
        "POST",
        "/api/v1/vms/kvm1:web01/power",
        Some(ADMIN_TOKEN),
        Some(r#"{"action":"on"}"#),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let op = r.json()["id"].as_str().unwrap().to_string();
    let end = room.next_where("progress", |d| {
        d["operation_id"] == op.as_str() && d["status"] != "queued" && d["status"] != "running"
    });
    assert!(
        end["data"]["status"] == "succeeded" || end["data"]["status"] == "failed",
        "{end}"
    );
    if end["data"]["status"] == "succeeded" {
        assert_eq!(end["data"]["progress_percent"], 100, "{end}");
    }
}

/// `count` demo sessions of `user` created, then closed in one call: one
/// `session_closed` each, in a burst.
fn open_then_close_all(app: &Appliance, user: &str, count: usize) {
    for _ in 0..count {
        app.create_demo(user);
    }
    let r = app.api(
        "POST",
        &format!("/api/v1/users/{user}/close-sessions"),
        Some(ADMIN_TOKEN),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

/// One subscriber never reads; 100 others must get every event promptly,
/// and the appliance's memory must stay bounded. The events are made
/// large (a long user name) and many (1.2 MiB), so they overflow what the
/// kernel buffers for the stuck one (the control port's 256 KiB send
/// buffer, doubled), and it must lose events rather than hold them.
#[test]
fn a_subscriber_that_never_reads_delays_nobody_and_holds_bounded_memory() {
    const READERS: usize = 100;
    const BATCH: usize = 50;
    const BATCHES: usize = 60;
    const EVENTS: usize = BATCH * BATCHES;
    // Above a batch: a burst of events must not overflow a reader.
    const QUEUE: usize = 4 * BATCH;
    raise_nofile();
    let app = appliance(&format!(
        "[events]\nsubscriber_queue_events = {QUEUE}\nstats_interval_ms = 200\n\n\
         [viewers]\nmax_sessions_per_user = {}\n",
        BATCH * 2
    ));
    let user = format!("load-{}", "u".repeat(200));
    let pid = app.pid();
    let rss_before = rss_bytes(pid).unwrap();
    // The stuck one: a tiny receive buffer, never read.
    let stuck = {
        let mut e = events_small_rcvbuf(app.control, "/ws/monitor", ADMIN_TOKEN, 4096);
        e.subscribe(json!({"events": ["session_closed"]}));
        e
    };
    let mut readers: Vec<Events> = (0..READERS)
        .map(|_| {
            let mut e = events(app.control, "/ws/monitor", Some(ADMIN_TOKEN));
            e.subscribe(json!({"events": ["session_closed"]}));
            e
        })
        .collect();
    let started = Instant::now();
    // Each batch: sessions created, then closed at once (one call), one
    // `session_closed` each; the readers are read between batches, so none
    // of them falls behind.
    let mut received = vec![0usize; READERS];
    for batch in 0..BATCHES {
        open_then_close_all(&app, &user, BATCH);
        for (i, reader) in readers.iter_mut().enumerate() {
            while received[i] < (batch + 1) * BATCH {
                let m = reader.next_of("session_closed");
                assert_eq!(m["data"]["user"], user.as_str());
                received[i] += 1;
            }
        }
    }
    let elapsed = started.elapsed();
    assert!(received.iter().all(|n| *n == EVENTS), "{received:?}");
    // Bounded time: the stuck subscriber does not hold the others up
    // (the REST calls dominate).
    assert!(elapsed < Duration::from_secs(120), "took {elapsed:?}");
    let rss_after = rss_bytes(pid).unwrap();
    let growth = rss_after.saturating_sub(rss_before);
    assert!(
        growth < 48 * 1024 * 1024,
        "RSS grew by {growth} bytes ({rss_before} → {rss_after})"
    );
    // The stuck one lost events (counted), and holds at most its queue.
    let mut stats = events(app.control, "/ws/stats", Some(ADMIN_TOKEN));
    let figures = stats.next_of("stats");
    let d = &figures["data"];
    assert!(d["events_dropped_total"].as_u64().unwrap() > 0, "{figures}");
    assert!(
        d["max_subscriber_lag_events"].as_u64().unwrap() <= QUEUE as u64,
        "{figures}"
    );
    // Its send stays stuck: the appliance lets it go (the readers stay).
    wait_until(
        Duration::from_secs(40),
        "the stuck subscriber to be dropped",
        || {
            let m = stats.next_of("stats");
            (m["data"]["connections_by_room"]["monitor"] == READERS).then_some(())
        },
    );
    drop(stuck);
}

/// A subscriber that reads late: while it does not read, what its socket
/// does not take waits in its queue (the fan-out writes straight to the
/// sockets, and queues only the rest), and beyond the queue events are
/// dropped. When it reads again it gets whole events, in the order they
/// were published, then a `lagged` notice whose count accounts exactly
/// for the events it lost.
#[test]
fn a_late_reader_gets_whole_events_in_order_then_lagged_notices_with_the_count() {
    const BATCH: usize = 50;
    const BATCHES: usize = 30;
    const EVENTS: usize = BATCH * BATCHES;
    const QUEUE: usize = 8;
    raise_nofile();
    let app = appliance(&format!(
        "[events]\nsubscriber_queue_events = {QUEUE}\n\n\
         [viewers]\nmax_sessions_per_user = {}\n",
        BATCH * 2
    ));
    let user = format!("late-{}", "u".repeat(200));
    let mut late = events_small_rcvbuf(app.control, "/ws/monitor", ADMIN_TOKEN, 4096);
    late.subscribe(json!({"events": ["session_closed"]}));
    // A reader that keeps up, to know when every event was published.
    let mut witness = events(app.control, "/ws/monitor", Some(ADMIN_TOKEN));
    witness.subscribe(json!({"events": ["session_closed"]}));
    let mut published = Vec::with_capacity(EVENTS);
    for _ in 0..BATCHES {
        open_then_close_all(&app, &user, BATCH);
        for _ in 0..BATCH {
            let m = witness.next_of("session_closed");
            published.push(m["data"]["session_id"].as_str().unwrap().to_string());
        }
    }
    // Now read until it is quiet: whole events in publishing order, and
    // `lagged` notices (one when the queue first overflowed, one for what
    // was dropped after it) that account for the rest.
    let (mut got, mut dropped, mut notices) = (Vec::new(), 0, 0);
    loop {
        match late.read(Duration::from_secs(2)) {
            Got::Message(m) if m["type"] == "session_closed" => {
                assert_eq!(notices, 0, "an event after a lagged notice: {m}");
                got.push(m["data"]["session_id"].as_str().unwrap().to_string());
            }
            Got::Message(m) if m["type"] == "lagged" => {
                notices += 1;
                dropped += m["data"]["dropped"].as_u64().unwrap() as usize;
            }
            Got::Timeout => break,
            other => panic!("after {} events: {other:?}", got.len()),
        }
    }
    assert!(
        dropped > 0 && !got.is_empty() && (1..=2).contains(&notices),
        "got {}, dropped {dropped} in {notices} notices",
        got.len()
    );
    assert_eq!(
        got.len() + dropped,
        EVENTS,
        "every event either arrives or is counted"
    );
    assert_eq!(
        got[..],
        published[..got.len()],
        "the first events, in order"
    );
    // It caught up: it keeps its connection.
    late.send_json(json!({"type": "ping", "data": {"timestamp": 7}}));
    assert_eq!(late.next_of("pong")["data"]["timestamp"], 7);
}
