//! The vSphere SOAP messages the backend speaks, without IO: request
//! bodies written with quick-xml's writer (so every value is escaped), and
//! responses read with quick-xml's reader into a small bounded element
//! tree, from which the answers (service content, property sets, tickets,
//! task info) and faults are taken.
//!
//! Hostile or broken XML becomes a [`HypervisorError::Protocol`], never a
//! panic: depth and element count are bounded, DTDs and unknown entities
//! are refused. It depends on nothing but the hypervisor model.

use std::io::Cursor;

use quick_xml::events::{BytesEnd, BytesStart, BytesText, Event};
use quick_xml::{Reader, Writer};

use crate::hypervisor::model::{HvResult, HypervisorError, PowerState};

/// Deepest element nesting accepted in a response (vSphere's deepest
/// answers — faults inside task info — are ~10 levels).
pub const MAX_XML_DEPTH: usize = 64;
/// Most elements accepted in one response (a 10 000-VM list page is
/// ~12 elements per VM).
pub const MAX_XML_ELEMENTS: usize = 500_000;

const ENVELOPE_NS: &str = "http://schemas.xmlsoap.org/soap/envelope/";
const XSI_NS: &str = "http://www.w3.org/2001/XMLSchema-instance";
const XSD_NS: &str = "http://www.w3.org/2001/XMLSchema";
const VIM_NS: &str = "urn:vim25";

/// A managed object reference: `<obj type="VirtualMachine">vm-57</obj>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MoRef {
    pub kind: String,
    pub value: String,
}

impl MoRef {
    pub fn new(kind: &str, value: &str) -> MoRef {
        MoRef {
            kind: kind.to_string(),
            value: value.to_string(),
        }
    }

    fn from_element(e: &Element) -> HvResult<MoRef> {
        let kind = e
            .attr("type")
            .ok_or_else(|| protocol(format!("<{}> has no type attribute", e.name)))?;
        Ok(MoRef::new(kind, e.text.trim()))
    }
}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

/// A request body under construction: the envelope, the method element
/// and its `_this` are written by [`Request::new`]; arguments follow in
/// the order the WSDL declares them.
pub struct Request {
    writer: Writer<Cursor<Vec<u8>>>,
    method: String,
}

impl Request {
    pub fn new(method: &str, this: &MoRef) -> Request {
        let mut request = Request {
            writer: Writer::new(Cursor::new(Vec::with_capacity(512))),
            method: method.to_string(),
        };
        request.write(Event::Decl(quick_xml::events::BytesDecl::new(
            "1.0",
            Some("UTF-8"),
            None,
        )));
        request.write(Event::Start(
            BytesStart::new("soapenv:Envelope").with_attributes([
                ("xmlns:soapenv", ENVELOPE_NS),
                ("xmlns:xsd", XSD_NS),
                ("xmlns:xsi", XSI_NS),
            ]),
        ));
        request.write(Event::Start(BytesStart::new("soapenv:Body")));
        request.write(Event::Start(
            BytesStart::new(method).with_attributes([("xmlns", VIM_NS)]),
        ));
        request.moref("_this", this)
    }

    fn write(&mut self, event: Event<'_>) {
        // Writing into a Vec cannot fail.
        let _ = self.writer.write_event(event);
    }

    /// `<name>value</name>`, the value escaped.
    pub fn text(mut self, name: &str, value: &str) -> Request {
        self.write(Event::Start(BytesStart::new(name)));
        self.write(Event::Text(BytesText::new(value)));
        self.write(Event::End(BytesEnd::new(name)));
        self
    }

    /// `<name type="Kind">value</name>`.
    pub fn moref(mut self, name: &str, moref: &MoRef) -> Request {
        self.write(Event::Start(
            BytesStart::new(name).with_attributes([("type", moref.kind.as_str())]),
        ));
        self.write(Event::Text(BytesText::new(&moref.value)));
        self.write(Event::End(BytesEnd::new(name)));
        self
    }

    /// Opens `<name>` (with an `xsi:type` when given); close with
    /// [`Request::end`].
    /// The `objectSet` of a property filter over a ContainerView: the
    /// objects the view holds (the view itself skipped).
    pub fn view_object_set(self, view: &MoRef) -> Request {
        self.start("objectSet", None)
            .moref("obj", view)
            .text("skip", "true")
            .start("selectSet", Some("TraversalSpec"))
            .text("name", "traverseEntities")
            .text("type", "ContainerView")
            .text("path", "view")
            .text("skip", "false")
            .end("selectSet")
            .end("objectSet")
    }

    pub fn start(mut self, name: &str, xsi_type: Option<&str>) -> Request {
        let mut start = BytesStart::new(name);
        if let Some(t) = xsi_type {
            start.push_attribute(("xsi:type", t));
        }
        self.write(Event::Start(start));
        self
    }

    pub fn end(mut self, name: &str) -> Request {
        self.write(Event::End(BytesEnd::new(name)));
        self
    }

    pub fn finish(mut self) -> Vec<u8> {
        let method = self.method.clone();
        self.write(Event::End(BytesEnd::new(method.as_str())));
        self.write(Event::End(BytesEnd::new("soapenv:Body")));
        self.write(Event::End(BytesEnd::new("soapenv:Envelope")));
        self.writer.into_inner().into_inner()
    }
}

/// A `RetrievePropertiesEx` of `paths` of one object.
pub fn retrieve_object(collector: &MoRef, object: &MoRef, paths: &[&str]) -> Vec<u8> {
    let mut r = Request::new("RetrievePropertiesEx", collector)
        .start("specSet", None)
        .start("propSet", None)
        .text("type", &object.kind);
    for path in paths {
        r = r.text("pathSet", path);
    }
    r.end("propSet")
        .start("objectSet", None)
        .moref("obj", object)
        .end("objectSet")
        .end("specSet")
        .start("options", None)
        .end("options")
        .finish()
}

/// A `RetrievePropertiesEx` over a ContainerView: `props` of each kind of
/// object the view holds, at most `page_objects` per page.
pub fn retrieve_view(
    collector: &MoRef,
    view: &MoRef,
    props: &[(&str, &[&str])],
    page_objects: usize,
) -> Vec<u8> {
    let mut r = Request::new("RetrievePropertiesEx", collector).start("specSet", None);
    for (kind, paths) in props {
        r = r.start("propSet", None).text("type", kind);
        for path in *paths {
            r = r.text("pathSet", path);
        }
        r = r.end("propSet");
    }
    r.view_object_set(view)
        .end("specSet")
        .start("options", None)
        .text("maxObjects", &page_objects.to_string())
        .end("options")
        .finish()
}

// ---------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------

/// One XML element: its local name, attributes (qualified names), text
/// and children.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Element {
    pub name: String,
    pub attrs: Vec<(String, String)>,
    pub text: String,
    pub children: Vec<Element>,
}

impl Element {
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The descendant at `path` (child names), if any.
    pub fn path(&self, path: &[&str]) -> Option<&Element> {
        path.iter().try_fold(self, |e, name| e.child(name))
    }

    /// The trimmed text of a child.
    pub fn child_text(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.trim())
    }

    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The local part of the `xsi:type` attribute (`xsd:string` → `string`),
    /// or of the first `<prefix>:type` when the XSI namespace has another
    /// prefix; None when it is empty (an empty type names nothing).
    pub fn xsi_type(&self) -> Option<&str> {
        let prefixed_type = |(key, _): &&(String, String)| {
            key.split_once(':')
                .is_some_and(|(_, local)| local == "type")
        };
        let value = self.attr("xsi:type").or_else(|| {
            self.attrs
                .iter()
                .find(prefixed_type)
                .map(|(_, value)| value.as_str())
        })?;
        let local = value.rsplit(':').next().unwrap_or(value).trim();
        (!local.is_empty()).then_some(local)
    }
}

fn protocol(message: String) -> HypervisorError {
    HypervisorError::Protocol(message)
}

fn local_name(qualified: &[u8]) -> String {
    let local = qualified.rsplit(|b| *b == b':').next().unwrap_or(qualified);
    String::from_utf8_lossy(local).into_owned()
}

fn start_element(start: &BytesStart<'_>) -> HvResult<Element> {
    let mut element = Element {
        name: local_name(start.name().as_ref()),
        ..Element::default()
    };
    for attr in start.attributes() {
        let attr = attr.map_err(|e| protocol(format!("bad XML attribute: {e}")))?;
        let value = attr
            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
            .map_err(|e| protocol(format!("bad XML attribute value: {e}")))?;
        element.attrs.push((
            String::from_utf8_lossy(attr.key.as_ref()).into_owned(),
            value.into_owned(),
        ));
    }
    Ok(element)
}

/// Parses a whole document into its root element.
pub fn parse(xml: &[u8]) -> HvResult<Element> {
    let mut reader = Reader::from_reader(xml);
    let mut stack: Vec<Element> = Vec::new();
    let mut elements = 0usize;
    loop {
        let event = reader
            .read_event()
            .map_err(|e| protocol(format!("malformed XML: {e}")))?;
        match event {
            Event::Start(start) | Event::Empty(start) if stack.len() >= MAX_XML_DEPTH => {
                let _ = start;
                return Err(protocol(format!("XML nested deeper than {MAX_XML_DEPTH}")));
            }
            Event::Start(start) => {
                elements += 1;
                stack.push(start_element(&start)?);
            }
            Event::Empty(start) => {
                elements += 1;
                let element = start_element(&start)?;
                if let Some(root) = attach(&mut stack, element) {
                    return Ok(root);
                }
            }
            Event::End(_) => {
                let element = stack
                    .pop()
                    .ok_or_else(|| protocol("unbalanced XML end tag".into()))?;
                if let Some(root) = attach(&mut stack, element) {
                    return Ok(root);
                }
            }
            Event::Text(text) => {
                let text = text
                    .xml10_content()
                    .map_err(|e| protocol(format!("bad XML text: {e}")))?;
                push_text(&mut stack, &text);
            }
            Event::CData(data) => {
                let text = data
                    .decode()
                    .map_err(|e| protocol(format!("bad XML CDATA: {e}")))?;
                push_text(&mut stack, &text);
            }
            Event::GeneralRef(reference) => {
                let resolved = resolve_reference(&reference)?;
                push_text(&mut stack, &resolved);
            }
            Event::DocType(_) => return Err(protocol("XML with a DTD is refused".into())),
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) => {}
            Event::Eof => return Err(protocol("XML document ends early".into())),
        }
        if elements > MAX_XML_ELEMENTS {
            return Err(protocol(format!(
                "XML with more than {MAX_XML_ELEMENTS} elements"
            )));
        }
    }
}

/// Adds a finished element to its parent; returns it when it is the root.
fn attach(stack: &mut [Element], element: Element) -> Option<Element> {
    match stack.last_mut() {
        Some(parent) => {
            parent.children.push(element);
            None
        }
        None => Some(element),
    }
}

fn push_text(stack: &mut [Element], text: &str) {
    if let Some(current) = stack.last_mut() {
        current.text.push_str(text);
    }
}

/// `&amp;` and friends, and character references; any other entity is
/// refused (SOAP has no DTD to declare one).
fn resolve_reference(reference: &quick_xml::events::BytesRef<'_>) -> HvResult<String> {
    if let Some(c) = reference
        .resolve_char_ref()
        .map_err(|e| protocol(format!("bad XML character reference: {e}")))?
    {
        return Ok(c.to_string());
    }
    let name = reference
        .decode()
        .map_err(|e| protocol(format!("bad XML entity: {e}")))?;
    quick_xml::escape::resolve_predefined_entity(&name)
        .map(str::to_string)
        .ok_or_else(|| protocol(format!("unknown XML entity &{name};")))
}

/// A SOAP fault: its vSphere type (`NotAuthenticated`) and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub kind: String,
    pub message: String,
}

/// The body's first element, or the fault it carries.
pub fn body_result(root: &Element) -> Result<&Element, Fault> {
    let body = root.child("Body").ok_or_else(|| Fault {
        kind: "Protocol".into(),
        message: "the response has no SOAP Body".into(),
    })?;
    let first = body.children.first().ok_or_else(|| Fault {
        kind: "Protocol".into(),
        message: "the SOAP Body is empty".into(),
    })?;
    if first.name == "Fault" {
        return Err(fault_of(first));
    }
    Ok(first)
}

fn fault_of(fault: &Element) -> Fault {
    let message = fault.child_text("faultstring").unwrap_or("").to_string();
    let detail = fault.child("detail").and_then(|d| d.children.first());
    let kind = detail
        .and_then(|d| {
            d.xsi_type()
                .or_else(|| Some(d.name.strip_suffix("Fault").unwrap_or(&d.name)))
        })
        .filter(|kind| !kind.is_empty())
        .unwrap_or("Unknown")
        .to_string();
    Fault { kind, message }
}

/// How a fault reads to the caller; `vm` names the object of the call.
pub fn map_fault(fault: &Fault, vm: Option<&str>) -> HypervisorError {
    let what = vm.unwrap_or("the object");
    match fault.kind.as_str() {
        "NotAuthenticated" => HypervisorError::SessionExpired,
        "InvalidLogin" | "NoPermission" => HypervisorError::Auth(fault.kind.clone()),
        "ManagedObjectNotFound" => HypervisorError::VmNotFound(what.to_string()),
        "InvalidPowerState" | "InvalidState" | "TaskInProgress" | "ToolsUnavailable" => {
            HypervisorError::InvalidState(format!("{}: {}", fault.kind, fault.message))
        }
        "NotSupported" | "MethodNotFound" => {
            HypervisorError::Unsupported(format!("{}: {}", fault.kind, fault.message))
        }
        _ => protocol(format!("{}: {}", fault.kind, fault.message)),
    }
}

/// The parts of the ServiceContent the backend uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceContent {
    pub root_folder: MoRef,
    pub property_collector: MoRef,
    pub view_manager: MoRef,
    pub session_manager: MoRef,
    /// The PerformanceManager (network rates); None if the server has none.
    pub perf_manager: Option<MoRef>,
    pub api_version: String,
}

pub fn service_content(result: &Element) -> HvResult<ServiceContent> {
    let content = result
        .child("returnval")
        .ok_or_else(|| protocol("RetrieveServiceContent has no returnval".into()))?;
    let moref = |name: &str| {
        content
            .child(name)
            .ok_or_else(|| protocol(format!("the ServiceContent has no {name}")))
            .and_then(MoRef::from_element)
    };
    Ok(ServiceContent {
        root_folder: moref("rootFolder")?,
        property_collector: moref("propertyCollector")?,
        view_manager: moref("viewManager")?,
        session_manager: moref("sessionManager")?,
        perf_manager: content
            .child("perfManager")
            .map(MoRef::from_element)
            .transpose()?,
        api_version: content
            .path(&["about", "apiVersion"])
            .map(|e| e.text.trim().to_string())
            .unwrap_or_default(),
    })
}

/// One object of a property retrieval: its reference and `name → value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectContent {
    pub obj: MoRef,
    pub props: Vec<(String, Element)>,
}

impl ObjectContent {
    pub fn prop(&self, name: &str) -> Option<&Element> {
        self.props.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    pub fn prop_text(&self, name: &str) -> Option<&str> {
        self.prop(name).map(|v| v.text.trim())
    }
}

/// The objects of a `RetrievePropertiesEx` / `Continue…` answer and its
/// continuation token.
pub fn retrieve_result(result: &Element) -> HvResult<(Vec<ObjectContent>, Option<String>)> {
    let Some(returnval) = result.child("returnval") else {
        return Ok((Vec::new(), None)); // nothing matched
    };
    let mut objects = Vec::new();
    for object in returnval.children_named("objects") {
        let obj = object
            .child("obj")
            .ok_or_else(|| protocol("an ObjectContent has no obj".into()))
            .and_then(MoRef::from_element)?;
        missing_properties(object)?;
        let mut props = Vec::new();
        for prop in object.children_named("propSet") {
            if let (Some(name), Some(val)) = (prop.child_text("name"), prop.child("val")) {
                props.push((name.to_string(), val.clone()));
            }
        }
        objects.push(ObjectContent { obj, props });
    }
    let token = returnval.child_text("token").map(str::to_string);
    Ok((objects, token))
}

/// A property the collector could not read: an expired session shows up
/// here (a `NotAuthenticated` per property) rather than as a fault, so it
/// is one; a refused read is `Auth`; other missing properties are absent.
fn missing_properties(object: &Element) -> HvResult<()> {
    for missing in object.children_named("missingSet") {
        let kind = missing
            .path(&["fault", "fault"])
            .and_then(Element::xsi_type)
            .unwrap_or("");
        match kind {
            "NotAuthenticated" => return Err(HypervisorError::SessionExpired),
            "NoPermission" => {
                let path = missing.child_text("path").unwrap_or("");
                return Err(HypervisorError::Auth(format!(
                    "NoPermission to read {path}"
                )));
            }
            _ => {}
        }
    }
    Ok(())
}

/// The moref a method returned (`<returnval type="Task">task-12</returnval>`).
pub fn returned_moref(result: &Element) -> HvResult<MoRef> {
    result
        .child("returnval")
        .ok_or_else(|| protocol(format!("{} has no returnval", result.name)))
        .and_then(MoRef::from_element)
}

pub fn power_state(text: &str) -> PowerState {
    match text.trim() {
        "poweredOn" => PowerState::On,
        "poweredOff" => PowerState::Off,
        "suspended" => PowerState::Suspended,
        _ => PowerState::Unknown,
    }
}

/// A `VirtualMachineTicket` as the host gives it.
#[derive(Clone, PartialEq, Eq)]
pub struct Ticket {
    pub ticket: String,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub ssl_thumbprint: Option<String>,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("ticket", &"<redacted>")
            .field("host", &self.host)
            .field("port", &self.port)
            .finish()
    }
}

pub fn ticket(result: &Element) -> HvResult<Ticket> {
    let t = result
        .child("returnval")
        .ok_or_else(|| protocol("AcquireTicket has no returnval".into()))?;
    let ticket = t
        .child_text("ticket")
        .filter(|s| !s.is_empty())
        .ok_or_else(|| protocol("the ticket is empty".into()))?
        .to_string();
    let port = match t.child_text("port") {
        Some(p) => Some(
            p.parse::<u16>()
                .map_err(|_| protocol(format!("ticket port {p:?} is not a port")))?,
        ),
        None => None,
    };
    let non_empty = |name: &str| {
        t.child_text(name)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    Ok(Ticket {
        ticket,
        host: non_empty("host"),
        port,
        ssl_thumbprint: non_empty("sslThumbprint"),
    })
}

/// Where a task stands (`TaskInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskState {
    Queued,
    Running { percent: Option<u8> },
    Success,
    Error(Fault),
}

pub fn task_state(info: &Element) -> HvResult<TaskState> {
    let state = info
        .child_text("state")
        .ok_or_else(|| protocol("TaskInfo has no state".into()))?;
    Ok(match state {
        "queued" => TaskState::Queued,
        "running" => TaskState::Running {
            percent: info
                .child_text("progress")
                .and_then(|p| p.parse::<u32>().ok())
                .map(|p| p.min(100) as u8),
        },
        "success" => TaskState::Success,
        "error" => {
            let error = info.child("error");
            let kind = error
                .and_then(|e| e.child("fault"))
                .and_then(|f| f.xsi_type().map(str::to_string))
                .unwrap_or_else(|| "Unknown".to_string());
            let message = error
                .and_then(|e| e.child_text("localizedMessage"))
                .unwrap_or("")
                .to_string();
            TaskState::Error(Fault { kind, message })
        }
        other => return Err(protocol(format!("unknown task state {other:?}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(body: &str) -> Vec<u8> {
        format!(
            r#"<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:xsd="http://www.w3.org/2001/XMLSchema"><soapenv:Body>{body}</soapenv:Body></soapenv:Envelope>"#
        )
        .into_bytes()
    }

    #[test]
    fn requests_escape_values_and_read_back() {
        let body = Request::new("Login", &MoRef::new("SessionManager", "ha-sessionmgr"))
            .text("userName", "svc<&>\"user")
            .text("password", "p&ss]]>")
            .finish();
        let root = parse(&body).unwrap();
        let login = body_result(&root).unwrap();
        assert_eq!(login.name, "Login");
        assert_eq!(
            login.child("_this").unwrap().attr("type"),
            Some("SessionManager")
        );
        assert_eq!(login.child_text("userName"), Some("svc<&>\"user"));
        assert_eq!(login.child_text("password"), Some("p&ss]]>"));
    }

    #[test]
    fn a_view_retrieval_has_the_wsdl_order() {
        let body = retrieve_view(
            &MoRef::new("PropertyCollector", "pc"),
            &MoRef::new("ContainerView", "v1"),
            &[("VirtualMachine", &["name", "runtime.powerState"])],
            1000,
        );
        let root = parse(&body).unwrap();
        let spec = body_result(&root).unwrap().child("specSet").unwrap();
        let names: Vec<&str> = spec.children.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["propSet", "objectSet"]);
        let select = spec.path(&["objectSet", "selectSet"]).unwrap();
        assert_eq!(select.xsi_type(), Some("TraversalSpec"));
        assert_eq!(select.child_text("path"), Some("view"));
    }

    #[test]
    fn faults_name_their_type_and_map_to_errors() {
        let not_auth = envelope(
            r#"<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring></faultstring><detail><NotAuthenticatedFault xmlns="urn:vim25" xsi:type="NotAuthenticated"><object type="ServiceInstance">ServiceInstance</object></NotAuthenticatedFault></detail></soapenv:Fault>"#,
        );
        let fault = body_result(&parse(&not_auth).unwrap()).unwrap_err();
        assert_eq!(fault.kind, "NotAuthenticated");
        assert!(matches!(
            map_fault(&fault, None),
            HypervisorError::SessionExpired
        ));
        // Without xsi:type, the element name says it.
        let login = envelope(
            r#"<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>Cannot complete login due to an incorrect user name or password.</faultstring><detail><InvalidLoginFault xmlns="urn:vim25"/></detail></soapenv:Fault>"#,
        );
        let fault = body_result(&parse(&login).unwrap()).unwrap_err();
        assert_eq!(fault.kind, "InvalidLogin");
        assert!(matches!(map_fault(&fault, None), HypervisorError::Auth(_)));
        // Found by the soap fuzz target: an empty `<prefix>:type` before
        // the real xsi:type gave a fault with an empty kind. An empty type
        // names nothing: xsi:type wins, then the element name, then
        // "Unknown".
        let empty_type = envelope(
            r#"<soapenv:Fault><faultcode>Se</faultcode><faultstring>x</faultstring><detail><ManagedObjectNotFoundFault xmlnxsi:type="" xsi:type="ManagedObjectNotFound"><obj type="VirtualMachine">vm-1</obj></ManagedObjectNotFoundFault></detail></soapenv:Fault>"#,
        );
        let fault = body_result(&parse(&empty_type).unwrap()).unwrap_err();
        assert_eq!(fault.kind, "ManagedObjectNotFound");
        for (detail, kind) in [
            (r#"<InvalidLoginFault xsi:type=" "/>"#, "InvalidLogin"),
            (r#"<InvalidLoginFault xsi:type="xsd:"/>"#, "InvalidLogin"),
            (r#"<Fault/>"#, "Unknown"),
            (r#"<Fault xsi:type=""/>"#, "Unknown"),
        ] {
            let xml = envelope(&format!(
                "<soapenv:Fault><faultstring>x</faultstring><detail>{detail}</detail></soapenv:Fault>"
            ));
            let fault = body_result(&parse(&xml).unwrap()).unwrap_err();
            assert_eq!(fault.kind, kind, "{detail}");
        }
        let missing = Fault {
            kind: "ManagedObjectNotFound".into(),
            message: String::new(),
        };
        match map_fault(&missing, Some("vm-9")) {
            HypervisorError::VmNotFound(vm) => assert_eq!(vm, "vm-9"),
            other => panic!("{other:?}"),
        }
        let state = Fault {
            kind: "InvalidPowerState".into(),
            message: "x".into(),
        };
        assert_eq!(map_fault(&state, None).status(), 409);
    }

    #[test]
    fn property_results_tickets_and_tasks_are_read() {
        let xml = envelope(
            r#"<RetrievePropertiesExResponse xmlns="urn:vim25"><returnval><token>t1</token><objects><obj type="VirtualMachine">vm-1</obj><propSet><name>name</name><val xsi:type="xsd:string">web &amp; db</val></propSet><propSet><name>runtime.powerState</name><val xsi:type="VirtualMachinePowerState">poweredOn</val></propSet><propSet><name>runtime.host</name><val type="HostSystem" xsi:type="ManagedObjectReference">host-7</val></propSet></objects></returnval></RetrievePropertiesExResponse>"#,
        );
        let root = parse(&xml).unwrap();
        let (objects, token) = retrieve_result(body_result(&root).unwrap()).unwrap();
        assert_eq!(token.as_deref(), Some("t1"));
        assert_eq!(objects[0].obj, MoRef::new("VirtualMachine", "vm-1"));
        assert_eq!(objects[0].prop_text("name"), Some("web & db"));
        assert_eq!(
            power_state(objects[0].prop_text("runtime.powerState").unwrap()),
            PowerState::On
        );
        assert_eq!(
            objects[0].prop("runtime.host").unwrap().attr("type"),
            Some("HostSystem")
        );

        // An expired session: the object, each property missing.
        let xml = envelope(
            r#"<RetrievePropertiesExResponse xmlns="urn:vim25"><returnval><objects><obj type="VirtualMachine">vm-1</obj><missingSet><path>name</path><fault><fault xsi:type="NotAuthenticated"><object type="VirtualMachine">vm-1</object><privilegeId>System.Read</privilegeId></fault><localizedMessage></localizedMessage></fault></missingSet></objects></returnval></RetrievePropertiesExResponse>"#,
        );
        let root = parse(&xml).unwrap();
        assert!(matches!(
            retrieve_result(body_result(&root).unwrap()),
            Err(HypervisorError::SessionExpired)
        ));

        let xml = envelope(
            r#"<AcquireTicketResponse xmlns="urn:vim25"><returnval><ticket>abc123</ticket><cfgFile>[ds] a/a.vmx</cfgFile><port>0</port><sslThumbprint>AA:BB</sslThumbprint></returnval></AcquireTicketResponse>"#,
        );
        let t = ticket(body_result(&parse(&xml).unwrap()).unwrap()).unwrap();
        assert_eq!(
            (t.ticket.as_str(), t.host.as_deref(), t.port),
            ("abc123", None, Some(0))
        );
        assert!(!format!("{t:?}").contains("abc123"));

        let info = parse(
            br#"<info><state>error</state><error><fault xsi:type="InvalidPowerState"/><localizedMessage>already on</localizedMessage></error></info>"#,
        )
        .unwrap();
        assert_eq!(
            task_state(&info).unwrap(),
            TaskState::Error(Fault {
                kind: "InvalidPowerState".into(),
                message: "already on".into()
            })
        );
        let running =
            parse(b"<info><state>running</state><progress>250</progress></info>").unwrap();
        assert_eq!(
            task_state(&running).unwrap(),
            TaskState::Running { percent: Some(100) }
        );
    }

    #[test]
    fn hostile_xml_is_an_error_not_a_panic() {
        let deep = "<a>".repeat(MAX_XML_DEPTH + 1);
        let cases: Vec<Vec<u8>> = vec![
            b"".to_vec(),
            b"<a>".to_vec(),
            b"</a>".to_vec(),
            b"<a><b></a>".to_vec(),
            b"<!DOCTYPE a [<!ENTITY x \"y\">]><a>&x;</a>".to_vec(),
            b"<a>&unknown;</a>".to_vec(),
            b"<a>&#xFFFFFFFF;</a>".to_vec(),
            b"<a b=\"&bad;\"/>".to_vec(),
            deep.into_bytes(),
            vec![0xff, 0xfe, 0x00],
        ];
        for case in cases {
            assert!(
                parse(&case).is_err(),
                "{:?}",
                String::from_utf8_lossy(&case)
            );
        }
        let no_body = parse(b"<Envelope/>").unwrap();
        assert!(body_result(&no_body).is_err());
        assert!(
            ticket(&parse(b"<r><returnval><ticket></ticket></returnval></r>").unwrap()).is_err()
        );
        assert!(ticket(
            &parse(b"<r><returnval><ticket>t</ticket><port>99999</port></returnval></r>").unwrap()
        )
        .is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_parser() {
        use proptest::prelude::*;
        proptest!(ProptestConfig::with_cases(512), |(bytes in proptest::collection::vec(any::<u8>(), 0..512))| {
            let _ = parse(&bytes);
        });
    }
}
