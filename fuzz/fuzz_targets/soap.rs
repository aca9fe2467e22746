//! Fuzzes the vSphere SOAP response reader (`hypervisor::vsphere::soap`):
//! `parse` of a response body into its bounded element tree, then every
//! reader the backend runs on it: `body_result` (faults: `fault_of`),
//! `map_fault`, `service_content`, `retrieve_result` (property values,
//! missing properties), `returned_moref`, `ticket`, `task_state`,
//! `power_state`.
//!
//! Checks, besides "no panic, no hang":
//! - bounded: the tree is at most `MAX_XML_DEPTH` deep and has at most
//!   `MAX_XML_ELEMENTS` elements, and holds at most 3 bytes of names,
//!   attributes and text per input byte (invalid UTF-8 in a name becomes
//!   U+FFFD; no entity expansion: a DTD or an unknown entity is refused);
//! - a tree with plain XML names, written back as XML (escaped), parses to
//!   the same tree;
//! - faults have a kind; a fault maps to the error its kind documents;
//!   property names are trimmed; a task's progress is at most 100; a ticket
//!   is not empty, nor are its host and thumbprint when present.
//!
//! Input: the response body as the host sends it.
#![no_main]

use consolegate::hypervisor::model::HypervisorError;
use consolegate::hypervisor::vsphere::soap::{
    body_result, map_fault, parse, power_state, retrieve_result, returned_moref, service_content,
    task_state, ticket, Element, TaskState, MAX_XML_DEPTH, MAX_XML_ELEMENTS,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|xml: &[u8]| {
    let Ok(root) = parse(xml) else {
        return;
    };
    let (depth, elements, bytes) = measure(&root);
    assert!(depth <= MAX_XML_DEPTH, "{depth} levels deep");
    assert!(elements <= MAX_XML_ELEMENTS);
    // Invalid UTF-8 in names becomes U+FFFD (3 bytes for 1): at most 3×.
    assert!(
        bytes <= 3 * xml.len(),
        "{bytes} bytes of tree from {} of XML",
        xml.len()
    );

    // The reader is lenient about names (it keeps what quick-xml gives);
    // only trees with XML names can be written back.
    if plain_names(&root) {
        let written = write_back(&root);
        match parse(written.as_bytes()) {
            Ok(again) => assert_eq!(again, root, "the tree written back differs"),
            Err(e) => panic!("the tree written back does not parse: {e}\n{written}"),
        }
    }

    match body_result(&root) {
        Ok(result) => read_result(result),
        Err(fault) => {
            assert!(!fault.kind.is_empty(), "a fault without a kind");
            check_fault_mapping(&fault.kind, &fault.message);
        }
    }
});

/// Depth, element count and bytes of strings of a tree.
fn measure(element: &Element) -> (usize, usize, usize) {
    let mut bytes = element.name.len() + element.text.len();
    bytes += element
        .attrs
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum::<usize>();
    let (mut depth, mut count) = (0, 1);
    for child in &element.children {
        let (d, c, b) = measure(child);
        depth = depth.max(d);
        count += c;
        bytes += b;
    }
    (depth + 1, count, bytes)
}

/// Whether every element name and attribute key is a plain XML name.
fn plain_names(element: &Element) -> bool {
    let plain = |name: &str| {
        name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'))
    };
    plain(&element.name)
        && element.attrs.iter().all(|(key, _)| plain(key))
        && element.children.iter().all(plain_names)
}

/// Writes a tree back as XML: text first, then the children (the reader
/// joins an element's text pieces), everything escaped.
fn write_back(element: &Element) -> String {
    let mut out = String::new();
    write_element(element, &mut out);
    out
}

fn write_element(element: &Element, out: &mut String) {
    out.push('<');
    out.push_str(&element.name);
    for (key, value) in &element.attrs {
        out.push(' ');
        out.push_str(key);
        out.push_str("=\"");
        escape(value, true, out);
        out.push('"');
    }
    out.push('>');
    escape(&element.text, false, out);
    for child in &element.children {
        write_element(child, out);
    }
    out.push_str("</");
    out.push_str(&element.name);
    out.push('>');
}

fn escape(text: &str, attribute: bool, out: &mut String) {
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' if attribute => out.push_str("&quot;"),
            '\r' => out.push_str("&#13;"),
            '\t' | '\n' if attribute => out.push_str(&format!("&#{};", c as u32)),
            c => out.push(c),
        }
    }
}

/// What `map_fault` documents for each kind.
fn check_fault_mapping(kind: &str, message: &str) {
    let fault = consolegate::hypervisor::vsphere::soap::Fault {
        kind: kind.to_owned(),
        message: message.to_owned(),
    };
    let error = map_fault(&fault, Some("vm-42"));
    match kind {
        "NotAuthenticated" => assert!(matches!(error, HypervisorError::SessionExpired)),
        "InvalidLogin" | "NoPermission" => assert!(matches!(error, HypervisorError::Auth(_))),
        "ManagedObjectNotFound" => {
            assert!(matches!(error, HypervisorError::VmNotFound(ref vm) if vm == "vm-42"))
        }
        _ => assert!(!error.to_string().is_empty()),
    }
}

/// Every reader the backend runs on a method's result.
fn read_result(result: &Element) {
    if let Ok((objects, _token)) = retrieve_result(result) {
        for object in &objects {
            for (name, _) in &object.props {
                assert_eq!(name.as_str(), name.trim(), "an untrimmed property name");
            }
            if let Some(state) = object.prop_text("runtime.powerState") {
                let _ = power_state(state);
            }
        }
    }
    let _ = service_content(result);
    let _ = returned_moref(result);
    if let Ok(t) = ticket(result) {
        assert!(!t.ticket.is_empty(), "an empty ticket");
        assert!(t.host.as_ref().is_none_or(|h| !h.is_empty()));
        assert!(t.ssl_thumbprint.as_ref().is_none_or(|h| !h.is_empty()));
    }
    let info = result.child("returnval").unwrap_or(result);
    match task_state(info) {
        Ok(TaskState::Running { percent: Some(p) }) => assert!(p <= 100, "{p} %"),
        Ok(TaskState::Error(fault)) => assert!(!fault.kind.is_empty()),
        _ => {}
    }
}
