// Command vcsim serves govmomi's vSphere simulator for consolegate's
// end-to-end tests, with what the simulator lacks and the tests need:
//
//   - VirtualMachine.AcquireTicket("webmks"): a single-use ticket for this
//     program's own TLS WebSocket endpoint, wss://127.0.0.1:P/ticket/{ticket},
//     which relays binary WebSocket frames to a real VNC server (-vnc); only
//     for powered-on VMs. The ticket's sslThumbprint is the SHA-1 of that
//     endpoint's self-signed certificate, as an ESXi host gives it.
//   - GET /screen?id=vm-N with the API session cookie: a 1024x768 PNG in the
//     VM's own colour (refused for powered-off VMs), as a host's screenshot
//     facility answers.
//   - Idle API sessions expire after -session-idle-ms (then CurrentTime
//     answers NotAuthenticated), so a client's pool revalidation is tested.
//   - GET /debug/stats (plain http on its own port): logins, logouts, active
//     sessions, AcquireTicket calls... so tests can assert pool economy.
//
// The program is a front: it intercepts the requests above and hands every
// other request, unchanged, to the simulator's own handlers (wrapping the
// simulator's VM objects instead breaks PropertyCollector and ContainerView).
//
// It listens on 127.0.0.1 only, and prints one line when ready:
//
//	VCSIM_READY url=https://127.0.0.1:P/sdk port=P thumbprint=AA:.. thumbprint_sha256=.. webmks_port=Q webmks_thumbprint=AA:.. debug_url=http://127.0.0.1:D
//
// Certificates live in -cert-dir, so a restart on the same -listen address
// presents the same certificate (a pinned client recovers by itself).
package main

import (
	"bufio"
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"encoding/xml"
	"flag"
	"fmt"
	"hash/fnv"
	"image"
	"image/color"
	"image/png"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/mo"
	"github.com/vmware/govmomi/vim25/types"
)

const (
	sessionCookie = "vmware_soap_session"
	// maxRequestBytes bounds a SOAP request body read by the front.
	maxRequestBytes = 4 << 20
	// maxTickets bounds the live tickets kept; the oldest go first.
	maxTickets = 4096
	// ticketTTL: VMware documents webmks tickets as one-time, 30 minutes.
	ticketTTL = 30 * time.Minute
	// maxFrameBytes bounds one WebSocket frame from a client.
	maxFrameBytes = 16 << 20
	// screenWidth/screenHeight: the size of every /screen PNG.
	screenWidth  = 1024
	screenHeight = 768
	// vncDialTimeout bounds the connect to the VNC server behind a ticket.
	vncDialTimeout = 5 * time.Second
)

type stats struct {
	Logins          int64 `json:"logins"`
	Logouts         int64 `json:"logouts"`
	ActiveSessions  int64 `json:"active_sessions"`
	ExpiredSessions int64 `json:"expired_sessions"`
	AcquireTickets  int64 `json:"acquire_tickets"`
	TicketsRedeemed int64 `json:"tickets_redeemed"`
	TicketsRefused  int64 `json:"tickets_refused"`
	Screens         int64 `json:"screens"`
	SdkRequests     int64 `json:"sdk_requests"`
}

type ticket struct {
	vm      string
	expires time.Time
}

type front struct {
	sim        http.Handler
	vncAddr    string
	idle       time.Duration
	ticketHost string // "address" or "esxi"

	webmksPort       int
	webmksThumbprint string

	mu       sync.Mutex
	sessions map[string]time.Time // cookie value -> last active
	// expireAfter > 0: every session expires once that many more SDK
	// requests have been answered (set by POST /debug/expire-sessions).
	expireAfter int
	tickets     map[string]ticket
	screens     map[string][]byte
	stats       stats
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address of the vSphere API endpoint (https)")
	certDir := flag.String("cert-dir", "", "directory holding (or to hold) the certificates (required)")
	vncAddr := flag.String("vnc", "", "VNC server the webmks tickets relay to, host:port (required)")
	idleMs := flag.Int("session-idle-ms", 0, "expire API sessions idle longer than this (0: never)")
	poweredOff := flag.String("powered-off", "", "comma-separated VM names to power off at start")
	ticketHost := flag.String("ticket-host", "address", "ticket host: 'address' (127.0.0.1) or 'esxi' (the VM's host name, as vCenter gives it)")
	username := flag.String("username", "user", "the only accepted user name")
	password := flag.String("password", "pass", "the only accepted password")
	flag.Parse()
	if *certDir == "" || *vncAddr == "" {
		log.Fatal("-cert-dir and -vnc are required")
	}
	if *ticketHost != "address" && *ticketHost != "esxi" {
		log.Fatal("-ticket-host must be 'address' or 'esxi'")
	}

	model := simulator.VPX()
	if err := model.Create(); err != nil {
		log.Fatalf("simulator model: %v", err)
	}
	// The simulator's own listener (plain http, loopback) is never used by
	// clients: the front calls the simulator's handlers directly.
	model.Service.Listen = &url.URL{Host: "127.0.0.1:0", User: url.UserPassword(*username, *password)}
	inner := model.Service.NewServer()
	powerOff(*poweredOff)

	apiCert := loadOrCreateCert(*certDir, "api")
	webmksCert := loadOrCreateCert(*certDir, "webmks")
	f := &front{
		sim:              model.Service.ServeMux,
		vncAddr:          *vncAddr,
		idle:             time.Duration(*idleMs) * time.Millisecond,
		ticketHost:       *ticketHost,
		webmksThumbprint: thumbprint(sha1.New(), webmksCert.Certificate[0]),
		sessions:         map[string]time.Time{},
		tickets:          map[string]ticket{},
		screens:          map[string][]byte{},
	}

	webmksListener := listenTLS("127.0.0.1:0", webmksCert)
	f.webmksPort = webmksListener.Addr().(*net.TCPAddr).Port
	apiListener := listenTLS(*listen, apiCert)
	debugListener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatalf("debug listener: %v", err)
	}

	webmksMux := http.NewServeMux()
	webmksMux.HandleFunc("/ticket/", f.serveTicket)
	apiMux := http.NewServeMux()
	apiMux.HandleFunc("/sdk", f.serveSDK)
	apiMux.HandleFunc("/screen", f.serveScreen)
	apiMux.Handle("/", f.sim)
	debugMux := http.NewServeMux()
	debugMux.HandleFunc("/debug/stats", f.serveStats)
	debugMux.HandleFunc("/debug/expire-sessions", f.serveExpireAll)

	go serve(webmksListener, webmksMux)
	go serve(apiListener, apiMux)
	go serve(debugListener, debugMux)
	if f.idle > 0 {
		go f.expireIdleSessions()
	}

	apiPort := apiListener.Addr().(*net.TCPAddr).Port
	fmt.Printf("VCSIM_READY url=https://127.0.0.1:%d/sdk port=%d thumbprint=%s thumbprint_sha256=%s webmks_port=%d webmks_thumbprint=%s debug_url=http://%s\n",
		apiPort, apiPort,
		thumbprint(sha1.New(), apiCert.Certificate[0]),
		thumbprint(sha256.New(), apiCert.Certificate[0]),
		f.webmksPort, f.webmksThumbprint, debugListener.Addr())

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
	inner.Close()
	model.Remove() // the simulator's datastore directories
}

func serve(l net.Listener, h http.Handler) {
	server := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	if err := server.Serve(l); err != nil {
		log.Printf("server on %s: %v", l.Addr(), err)
	}
}

func listenTLS(addr string, cert tls.Certificate) net.Listener {
	l, err := tls.Listen("tcp", addr, &tls.Config{Certificates: []tls.Certificate{cert}})
	if err != nil {
		log.Fatalf("listen %s: %v", addr, err)
	}
	return l
}

// powerOff powers off the named VMs directly in the simulator's inventory.
func powerOff(names string) {
	if names == "" {
		return
	}
	want := map[string]bool{}
	for _, n := range strings.Split(names, ",") {
		want[strings.TrimSpace(n)] = true
	}
	for _, e := range simulator.Map.All("VirtualMachine") {
		vm, ok := e.(*simulator.VirtualMachine)
		if !ok || !want[vm.Name] {
			continue
		}
		off := types.VirtualMachinePowerStatePoweredOff
		simulator.Map.WithLock(vm, func() {
			simulator.Map.Update(vm, []types.PropertyChange{
				{Name: "runtime.powerState", Val: off},
				{Name: "summary.runtime.powerState", Val: off},
			})
		})
		delete(want, vm.Name)
	}
	for n := range want {
		log.Fatalf("-powered-off: no VM named %q", n)
	}
}

// ---------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------

func loadOrCreateCert(dir, name string) tls.Certificate {
	certPath := filepath.Join(dir, name+".crt")
	keyPath := filepath.Join(dir, name+".key")
	if cert, err := tls.LoadX509KeyPair(certPath, keyPath); err == nil {
		return cert
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		log.Fatalf("key: %v", err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	template := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: "vcsim-" + name},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     []string{"localhost"},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
	}
	der, err := x509.CreateCertificate(rand.Reader, template, template, &key.PublicKey, key)
	if err != nil {
		log.Fatalf("certificate: %v", err)
	}
	keyDer, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		log.Fatalf("key: %v", err)
	}
	writeAtomically(certPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	writeAtomically(keyPath, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDer}))
	cert, err := tls.LoadX509KeyPair(certPath, keyPath)
	if err != nil {
		log.Fatalf("load %s: %v", certPath, err)
	}
	return cert
}

func writeAtomically(path string, data []byte) {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		log.Fatalf("write %s: %v", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		log.Fatalf("rename %s: %v", tmp, err)
	}
}

// thumbprint is "AA:BB:..." of a DER certificate, as VMware prints it.
func thumbprint(h interface {
	Write([]byte) (int, error)
	Sum([]byte) []byte
}, der []byte) string {
	_, _ = h.Write(der)
	sum := h.Sum(nil)
	parts := make([]string, len(sum))
	for i, b := range sum {
		parts[i] = fmt.Sprintf("%02X", b)
	}
	return strings.Join(parts, ":")
}

// ---------------------------------------------------------------------------
// Sessions
// ---------------------------------------------------------------------------

func sessionOf(r *http.Request) string {
	if c, err := r.Cookie(sessionCookie); err == nil {
		return strings.Trim(c.Value, `"`)
	}
	return ""
}

// touch marks a session active; false when it is unknown or idle-expired
// (then it is forgotten).
func (f *front) touch(key string) bool {
	if key == "" {
		return false
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	last, ok := f.sessions[key]
	if !ok {
		return false
	}
	now := time.Now()
	if f.idle > 0 && now.Sub(last) > f.idle {
		f.forget(key, true)
		return false
	}
	f.sessions[key] = now
	return true
}

// forget drops a session; the caller holds f.mu.
func (f *front) forget(key string, expired bool) {
	if _, ok := f.sessions[key]; !ok {
		return
	}
	delete(f.sessions, key)
	if expired {
		f.stats.ExpiredSessions++
	}
	f.stats.ActiveSessions = int64(len(f.sessions))
}

func (f *front) expireIdleSessions() {
	tick := f.idle / 4
	if tick < 10*time.Millisecond {
		tick = 10 * time.Millisecond
	}
	for range time.Tick(tick) {
		f.mu.Lock()
		now := time.Now()
		for key, last := range f.sessions {
			if now.Sub(last) > f.idle {
				f.forget(key, true)
			}
		}
		f.mu.Unlock()
	}
}

// ---------------------------------------------------------------------------
// SOAP
// ---------------------------------------------------------------------------

type soapRequest struct {
	method     string
	this       string
	thisType   string
	ticketType string
}

// parseRequest finds the method, its _this and ticketType in a SOAP body.
func parseRequest(body []byte) (soapRequest, error) {
	var req soapRequest
	d := xml.NewDecoder(bytes.NewReader(body))
	depth, bodyDepth, field := 0, -1, ""
	for {
		tok, err := d.Token()
		if err == io.EOF {
			return req, nil
		}
		if err != nil {
			return req, err
		}
		switch t := tok.(type) {
		case xml.StartElement:
			depth++
			switch {
			case bodyDepth < 0 && t.Name.Local == "Body":
				bodyDepth = depth
			case bodyDepth > 0 && depth == bodyDepth+1:
				req.method = t.Name.Local
			case bodyDepth > 0 && depth == bodyDepth+2:
				field = t.Name.Local
				for _, a := range t.Attr {
					if field == "_this" && a.Name.Local == "type" {
						req.thisType = a.Value
					}
				}
			}
		case xml.CharData:
			if bodyDepth > 0 && depth == bodyDepth+2 {
				switch field {
				case "_this":
					req.this += strings.TrimSpace(string(t))
				case "ticketType":
					req.ticketType += strings.TrimSpace(string(t))
				}
			}
		case xml.EndElement:
			depth--
		}
	}
}

func (f *front) serveSDK(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, maxRequestBytes+1))
	if err != nil || len(body) > maxRequestBytes {
		http.Error(w, "request too large or unreadable", http.StatusRequestEntityTooLarge)
		return
	}
	req, _ := parseRequest(body) // a bad body goes on to the simulator, which answers it
	key := sessionOf(r)
	valid := f.touch(key)
	if !valid {
		// An expired or unknown session must not reach the simulator, which
		// would still accept it.
		r.Header.Del("Cookie")
	}
	f.mu.Lock()
	f.stats.SdkRequests++
	f.mu.Unlock()
	if req.method == "AcquireTicket" {
		f.acquireTicket(w, req, valid)
		return
	}
	r.Body = io.NopCloser(bytes.NewReader(body))
	r.ContentLength = int64(len(body))
	rec := httptest.NewRecorder()
	f.sim.ServeHTTP(rec, r)
	if rec.Code == http.StatusOK {
		f.account(req.method, key, valid, rec.Result().Cookies())
	}
	for name, values := range rec.Header() {
		w.Header()[name] = values
	}
	w.WriteHeader(rec.Code)
	_, _ = w.Write(rec.Body.Bytes())
	f.countDownExpiry()
}

// countDownExpiry expires every session when the requests asked for by
// /debug/expire-sessions?after_requests=N have been answered.
func (f *front) countDownExpiry() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.expireAfter <= 0 {
		return
	}
	f.expireAfter--
	if f.expireAfter == 0 {
		for key := range f.sessions {
			f.forget(key, true)
		}
	}
}

// account counts a successful Login or Logout.
func (f *front) account(method, key string, valid bool, cookies []*http.Cookie) {
	f.mu.Lock()
	defer f.mu.Unlock()
	switch method {
	case "Login":
		for _, c := range cookies {
			if c.Name == sessionCookie {
				f.sessions[c.Value] = time.Now()
				f.stats.Logins++
			}
		}
	case "Logout":
		if valid {
			f.forget(key, false)
			f.stats.Logouts++
		}
	}
	f.stats.ActiveSessions = int64(len(f.sessions))
}

type vmState struct {
	name    string
	power   types.VirtualMachinePowerState
	host    string
	cfgFile string
}

// lookupVM reads a VM of the simulator's inventory by its id ("vm-57").
func lookupVM(id string) (vmState, bool) {
	obj := simulator.Map.Get(types.ManagedObjectReference{Type: "VirtualMachine", Value: id})
	vm, ok := obj.(*simulator.VirtualMachine)
	if !ok {
		return vmState{}, false
	}
	var s vmState
	var hostRef *types.ManagedObjectReference
	simulator.Map.WithLock(vm, func() {
		s.name = vm.Name
		s.power = vm.Runtime.PowerState
		hostRef = vm.Runtime.Host
		if vm.Config != nil {
			s.cfgFile = vm.Config.Files.VmPathName
		}
	})
	if hostRef != nil {
		if h, ok := simulator.Map.Get(*hostRef).(*simulator.HostSystem); ok {
			simulator.Map.WithLock(h, func() { s.host = h.Name })
		}
	}
	return s, true
}

func (f *front) acquireTicket(w http.ResponseWriter, req soapRequest, valid bool) {
	if !valid {
		writeFault(w, "NotAuthenticated", "The session is not authenticated.", "")
		return
	}
	if req.thisType != "VirtualMachine" {
		writeFault(w, "MethodNotFound", "AcquireTicket is only served for a VirtualMachine", "")
		return
	}
	if req.ticketType != "webmks" {
		writeFault(w, "InvalidArgument", "only the webmks ticket type is served",
			"<invalidProperty>ticketType</invalidProperty>")
		return
	}
	vm, ok := lookupVM(req.this)
	if !ok {
		writeFault(w, "ManagedObjectNotFound", "The object has already been deleted or has not been completely created",
			fmt.Sprintf(`<obj type="VirtualMachine">%s</obj>`, escape(req.this)))
		return
	}
	if vm.power != types.VirtualMachinePowerStatePoweredOn {
		writeFault(w, "InvalidPowerState", "The attempted operation cannot be performed in the current state",
			fmt.Sprintf("<requestedState>poweredOn</requestedState><existingState>%s</existingState>", vm.power))
		return
	}
	var raw [16]byte
	_, _ = rand.Read(raw[:])
	t := hex.EncodeToString(raw[:])
	f.mu.Lock()
	f.dropOldTickets()
	f.tickets[t] = ticket{vm: req.this, expires: time.Now().Add(ticketTTL)}
	f.stats.AcquireTickets++
	f.mu.Unlock()
	host := "127.0.0.1"
	if f.ticketHost == "esxi" && vm.host != "" {
		host = vm.host
	}
	inner := fmt.Sprintf("<returnval><ticket>%s</ticket><cfgFile>%s</cfgFile><host>%s</host><port>%d</port><sslThumbprint>%s</sslThumbprint></returnval>",
		t, escape(vm.cfgFile), escape(host), f.webmksPort, f.webmksThumbprint)
	writeEnvelope(w, http.StatusOK, `<AcquireTicketResponse xmlns="urn:vim25">`+inner+`</AcquireTicketResponse>`)
}

// dropOldTickets keeps the ticket map bounded; the caller holds f.mu.
func (f *front) dropOldTickets() {
	now := time.Now()
	for k, t := range f.tickets {
		if now.After(t.expires) {
			delete(f.tickets, k)
		}
	}
	for k := range f.tickets {
		if len(f.tickets) < maxTickets {
			break
		}
		delete(f.tickets, k)
	}
}

func escape(s string) string {
	var b bytes.Buffer
	_ = xml.EscapeText(&b, []byte(s))
	return b.String()
}

func writeEnvelope(w http.ResponseWriter, status int, body string) {
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	w.WriteHeader(status)
	fmt.Fprintf(w, `<?xml version="1.0" encoding="UTF-8"?>`+
		`<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">`+
		`<soapenv:Body>%s</soapenv:Body></soapenv:Envelope>`, body)
}

// writeFault answers a SOAP fault the way the simulator and hosts do:
// HTTP 500, faultstring, and the fault's type in detail.
func writeFault(w http.ResponseWriter, kind, message, detail string) {
	writeEnvelope(w, http.StatusInternalServerError, fmt.Sprintf(
		`<soapenv:Fault><faultcode>ServerFaultCode</faultcode><faultstring>%s</faultstring>`+
			`<detail><%sFault xmlns="urn:vim25" xsi:type="%s">%s</%sFault></detail></soapenv:Fault>`,
		escape(message), kind, kind, detail, kind))
}

// ---------------------------------------------------------------------------
// Screenshots
// ---------------------------------------------------------------------------

func (f *front) serveScreen(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		http.Error(w, "GET only", http.StatusMethodNotAllowed)
		return
	}
	if !f.touch(sessionOf(r)) {
		http.Error(w, "not authenticated", http.StatusUnauthorized)
		return
	}
	id := r.URL.Query().Get("id")
	vm, ok := lookupVM(id)
	if !ok {
		http.Error(w, "no such VM", http.StatusNotFound)
		return
	}
	if vm.power != types.VirtualMachinePowerStatePoweredOn {
		http.Error(w, "the VM is not powered on", http.StatusConflict)
		return
	}
	f.mu.Lock()
	img, ok := f.screens[vm.name]
	f.stats.Screens++
	f.mu.Unlock()
	if !ok {
		img = renderScreen(vm.name)
		f.mu.Lock()
		f.screens[vm.name] = img
		f.mu.Unlock()
	}
	w.Header().Set("Content-Type", "image/png")
	_, _ = w.Write(img)
}

// renderScreen draws a VM's "screen": its own colour (from its name) with
// a light band and stripes, so a thumbnail has structure to scale.
func renderScreen(name string) []byte {
	h := fnv.New32a()
	_, _ = h.Write([]byte(name))
	sum := h.Sum32()
	base := color.RGBA{R: uint8(sum), G: uint8(sum >> 8), B: uint8(sum >> 16), A: 255}
	img := image.NewRGBA(image.Rect(0, 0, screenWidth, screenHeight))
	for y := 0; y < screenHeight; y++ {
		for x := 0; x < screenWidth; x++ {
			c := base
			if y < 48 {
				c = color.RGBA{R: 240, G: 240, B: 240, A: 255}
			} else if (x/32+y/32)%2 == 0 {
				c = color.RGBA{R: base.R / 2, G: base.G / 2, B: base.B / 2, A: 255}
			}
			img.SetRGBA(x, y, c)
		}
	}
	var out bytes.Buffer
	if err := png.Encode(&out, img); err != nil {
		log.Fatalf("png: %v", err)
	}
	return out.Bytes()
}

// ---------------------------------------------------------------------------
// WebMKS endpoint: a TLS WebSocket relayed to the VNC server
// ---------------------------------------------------------------------------

func (f *front) serveTicket(w http.ResponseWriter, r *http.Request) {
	t := strings.TrimPrefix(r.URL.Path, "/ticket/")
	f.mu.Lock()
	tk, ok := f.tickets[t]
	delete(f.tickets, t) // single use, whatever happens next
	if !ok || time.Now().After(tk.expires) {
		f.stats.TicketsRefused++
		f.mu.Unlock()
		http.Error(w, "unknown, used or expired ticket", http.StatusNotFound)
		return
	}
	f.mu.Unlock()
	if vm, ok := lookupVM(tk.vm); !ok || vm.power != types.VirtualMachinePowerStatePoweredOn {
		http.Error(w, "the VM is not powered on", http.StatusConflict)
		return
	}
	key := r.Header.Get("Sec-WebSocket-Key")
	if !strings.EqualFold(r.Header.Get("Upgrade"), "websocket") || key == "" ||
		r.Header.Get("Sec-WebSocket-Version") != "13" {
		http.Error(w, "a WebSocket upgrade is expected", http.StatusBadRequest)
		return
	}
	vnc, err := net.DialTimeout("tcp", f.vncAddr, vncDialTimeout)
	if err != nil {
		http.Error(w, "VNC server unreachable", http.StatusBadGateway)
		return
	}
	hj, ok := w.(http.Hijacker)
	if !ok {
		vnc.Close()
		http.Error(w, "no hijack", http.StatusInternalServerError)
		return
	}
	conn, rw, err := hj.Hijack()
	if err != nil {
		vnc.Close()
		return
	}
	f.mu.Lock()
	f.stats.TicketsRedeemed++
	f.mu.Unlock()
	accept := sha1.Sum([]byte(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
	head := "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Accept: " + base64.StdEncoding.EncodeToString(accept[:]) + "\r\n"
	if offersBinary(r.Header.Values("Sec-WebSocket-Protocol")) {
		head += "Sec-WebSocket-Protocol: binary\r\n"
	}
	_, _ = rw.WriteString(head + "\r\n")
	_ = rw.Flush()
	relay(conn, rw.Reader, vnc)
}

func offersBinary(headers []string) bool {
	for _, h := range headers {
		for _, p := range strings.Split(h, ",") {
			if strings.TrimSpace(p) == "binary" {
				return true
			}
		}
	}
	return false
}

// wsWriter serialises frames from the two relay directions.
type wsWriter struct {
	mu   sync.Mutex
	conn net.Conn
}

func (w *wsWriter) frame(opcode byte, payload []byte) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	head := []byte{0x80 | opcode}
	switch n := len(payload); {
	case n < 126:
		head = append(head, byte(n))
	case n < 65536:
		head = append(head, 126, byte(n>>8), byte(n))
	default:
		var l [8]byte
		binary.BigEndian.PutUint64(l[:], uint64(n))
		head = append(append(head, 127), l[:]...)
	}
	if _, err := w.conn.Write(append(head, payload...)); err != nil {
		return err
	}
	return nil
}

func relay(conn net.Conn, in *bufio.Reader, vnc net.Conn) {
	out := &wsWriter{conn: conn}
	done := make(chan struct{}, 2)
	go func() { // VNC -> browser: one binary frame per read
		buf := make([]byte, 64<<10)
		for {
			n, err := vnc.Read(buf)
			if n > 0 && out.frame(2, buf[:n]) != nil {
				break
			}
			if err != nil {
				_ = out.frame(8, []byte{0x03, 0xe8}) // 1000: the VNC server closed
				break
			}
		}
		done <- struct{}{}
	}()
	go func() { // browser -> VNC
		readFrames(in, out, vnc)
		done <- struct{}{}
	}()
	<-done
	conn.Close()
	vnc.Close()
	<-done
}

// readFrames reads masked client frames and writes their data to the VNC
// server; it answers pings and ends on close or a protocol error.
func readFrames(in *bufio.Reader, out *wsWriter, vnc net.Conn) {
	for {
		var head [2]byte
		if _, err := io.ReadFull(in, head[:]); err != nil {
			return
		}
		opcode, masked := head[0]&0x0f, head[1]&0x80 != 0
		length := uint64(head[1] & 0x7f)
		switch length {
		case 126:
			var l [2]byte
			if _, err := io.ReadFull(in, l[:]); err != nil {
				return
			}
			length = uint64(binary.BigEndian.Uint16(l[:]))
		case 127:
			var l [8]byte
			if _, err := io.ReadFull(in, l[:]); err != nil {
				return
			}
			length = binary.BigEndian.Uint64(l[:])
		}
		if !masked || length > maxFrameBytes {
			_ = out.frame(8, []byte{0x03, 0xea}) // 1002
			return
		}
		var mask [4]byte
		if _, err := io.ReadFull(in, mask[:]); err != nil {
			return
		}
		payload := make([]byte, length)
		if _, err := io.ReadFull(in, payload); err != nil {
			return
		}
		for i := range payload {
			payload[i] ^= mask[i%4]
		}
		switch opcode {
		case 0, 2: // continuation, binary
			if _, err := vnc.Write(payload); err != nil {
				return
			}
		case 8:
			_ = out.frame(8, payload)
			return
		case 9:
			_ = out.frame(10, payload)
		case 10:
		default: // text frames and unknown opcodes
			_ = out.frame(8, []byte{0x03, 0xeb}) // 1003
			return
		}
	}
}

// ---------------------------------------------------------------------------
// Debug endpoints
// ---------------------------------------------------------------------------

func (f *front) serveStats(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	s := f.stats
	s.ActiveSessions = int64(len(f.sessions))
	f.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(s)
}

// serveExpireAll expires every API session now (POST), or, with
// ?after_requests=N, once N more SDK requests have been answered (so a
// session can pass its validation and expire before the next call).
func (f *front) serveExpireAll(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		http.Error(w, "POST only", http.StatusMethodNotAllowed)
		return
	}
	after := 0
	if v := r.URL.Query().Get("after_requests"); v != "" {
		if _, err := fmt.Sscanf(v, "%d", &after); err != nil || after < 0 {
			http.Error(w, "after_requests must be a count", http.StatusBadRequest)
			return
		}
	}
	f.mu.Lock()
	n := len(f.sessions)
	if after > 0 {
		f.expireAfter = after
	} else {
		for key := range f.sessions {
			f.forget(key, true)
		}
	}
	f.mu.Unlock()
	fmt.Fprintf(w, "{\"expired\":%d}\n", n)
}

// Keep the mo import for the entity lookups' types.
var _ mo.Reference = (*simulator.VirtualMachine)(nil)
