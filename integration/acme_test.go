package integration

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/homecircle/circle/relay"
	"github.com/homecircle/circle/replicator"
)

// The ACME test runs a real ACME server (pebble, built from the module
// graph: `tool github.com/letsencrypt/pebble/v2/cmd/pebble` in go.mod) that
// really validates, through a DNS server in this process that tells pebble
// which node to validate against. Nodes bind distinct loopback addresses
// (127.0.0.11...) with the same HTTP and HTTPS ports, which are pebble's
// httpPort and tlsPort, like several A records of one name on the internet.

const (
	acmeDomain = "circle.test"
	// shortName gets certificates with a short lifetime, so that they are
	// renewed during the test.
	shortName = "short." + acmeDomain
	// shortLifetime is the lifetime of shortName's certificates. With ARI
	// (pebble offers it), certmagic renews at a random time in the
	// certificate's validity.
	shortLifetime = 40 * time.Second
	// acmeLockTTL is the storage's lock lease in this test.
	acmeLockTTL = 6 * time.Second
)

// acmeNames are the site names of the ACME test circle, one certificate each.
var acmeNames = []string{acmeDomain, "app." + acmeDomain, shortName}

var (
	pebbleOnce sync.Once
	pebbleBin  string
	pebbleDir  string // the pebble module's directory (test certificates)
	pebbleErr  error
)

// buildPebble builds pebble once, next to the caddy binary.
func buildPebble(t *testing.T) {
	t.Helper()
	pebbleOnce.Do(func() {
		// Build first: on a fresh machine that downloads the module, which
		// `go list -m` alone would not (and its Dir would be empty).
		pebbleBin = filepath.Join(filepath.Dir(caddyBin), "pebble")
		build := exec.Command("go", "build", "-o", pebbleBin, "github.com/letsencrypt/pebble/v2/cmd/pebble")
		if b, err := build.CombinedOutput(); err != nil {
			pebbleErr = fmt.Errorf("building pebble: %v: %s", err, b)
			return
		}
		out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "github.com/letsencrypt/pebble/v2").Output()
		if err != nil {
			pebbleErr = fmt.Errorf("locating the pebble module: %v", err)
			return
		}
		pebbleDir = strings.TrimSpace(string(out))
		if pebbleDir == "" {
			pebbleErr = fmt.Errorf("the pebble module is not in the module cache after building it")
		}
	})
	if pebbleErr != nil {
		t.Fatal(pebbleErr)
	}
}

// pebbleCA is a running pebble.
type pebbleCA struct {
	dirURL  string
	mgmt    string // management API base URL
	minica  string // path of the root that signs pebble's own API certificate
	log     *syncBuffer
	roots   *x509.CertPool // pebble's issuing roots
	cmd     *exec.Cmd
	stopped chan struct{}
}

// startPebble runs pebble validating on httpPort/tlsPort, resolving names
// through dnsAddr.
func startPebble(t *testing.T, httpPort, tlsPort int, dnsAddr string) *pebbleCA {
	t.Helper()
	buildPebble(t)
	dir := t.TempDir()
	listen, mgmt := freePort(t), freePort(t)
	cfg := map[string]any{"pebble": map[string]any{
		"listenAddress":           fmt.Sprintf("127.0.0.1:%d", listen),
		"managementListenAddress": fmt.Sprintf("127.0.0.1:%d", mgmt),
		"certificate":             filepath.Join(pebbleDir, "test/certs/localhost/cert.pem"),
		"privateKey":              filepath.Join(pebbleDir, "test/certs/localhost/key.pem"),
		"httpPort":                httpPort,
		"tlsPort":                 tlsPort,
		"ocspResponderURL":        "",
		"keyAlgorithm":            "ecdsa",
		"retryAfter":              map[string]int{"authz": 1, "order": 1},
		"profiles": map[string]any{
			"default": map[string]any{"description": "test", "validityPeriod": 7776000},
		},
	}}
	b, _ := json.Marshal(cfg)
	cfgPath := filepath.Join(dir, "pebble.json")
	if err := os.WriteFile(cfgPath, b, 0o600); err != nil {
		t.Fatal(err)
	}
	p := &pebbleCA{
		dirURL:  fmt.Sprintf("https://127.0.0.1:%d/dir", listen),
		mgmt:    fmt.Sprintf("https://127.0.0.1:%d", mgmt),
		minica:  filepath.Join(pebbleDir, "test/certs/pebble.minica.pem"),
		log:     &syncBuffer{},
		stopped: make(chan struct{}),
	}
	cmd := exec.Command(pebbleBin, "-config", cfgPath, "-dnsserver", dnsAddr, "-strict=false")
	cmd.SysProcAttr = dieWithTest()
	// Real validation (PEBBLE_VA_ALWAYS_VALID unset), without random sleeps
	// or rejected nonces, and a new validation for every order.
	cmd.Env = append(os.Environ(), "PEBBLE_VA_NOSLEEP=1", "PEBBLE_WFE_NONCEREJECT=0", "PEBBLE_AUTHZREUSE=0")
	cmd.Stdout, cmd.Stderr = p.log, p.log
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting pebble: %v", err)
	}
	p.cmd = cmd
	go func() { cmd.Wait(); close(p.stopped) }()
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGKILL)
		<-p.stopped
		if t.Failed() {
			t.Logf("---- pebble log ----\n%s", tail(p.log.String(), 8000))
		}
	})

	minica, err := os.ReadFile(p.minica)
	if err != nil {
		t.Fatal(err)
	}
	apiPool := x509.NewCertPool()
	apiPool.AppendCertsFromPEM(minica)
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: apiPool}}}
	waitFor(t, 20*time.Second, "pebble up", func() error {
		resp, err := client.Get(p.mgmt + "/roots/0")
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 {
			return fmt.Errorf("roots: %d", resp.StatusCode)
		}
		p.roots = x509.NewCertPool()
		if !p.roots.AppendCertsFromPEM(body) {
			return fmt.Errorf("no root in %q", body)
		}
		return nil
	})
	return p
}

// orders counts the orders pebble received and, per name, the
// validations it started (PEBBLE_AUTHZREUSE=0: every order of a name gets a
// new authorization, validated once, whose task names the identifier).
func (p *pebbleCA) orders() (total int, perName map[string]int) {
	log := p.log.String()
	total = strings.Count(log, "Added order")
	perName = map[string]int{}
	for _, line := range strings.Split(log, "\n") {
		if _, rest, ok := strings.Cut(line, "Pulled a task from the Tasks queue"); ok {
			if _, v, ok := strings.Cut(rest, `Value:"`); ok {
				name, _, _ := strings.Cut(v, `"`)
				perName[name]++
			}
		}
	}
	return total, perName
}

// checkOrders fails the test unless the circle placed exactly one initial
// order per name: across all node logs one "obtaining certificate" per
// name, and at pebble one order (validation) for each of the long-lived
// names and, for shortName, none beyond its initial one and the renewals
// the nodes logged. Every order but at most one in flight was validated.
func (e *acmeEnv) checkOrders(when string) {
	e.t.Helper()
	e.mu.Lock()
	var logs []string
	for _, n := range e.nodes {
		if n.log != nil {
			logs = append(logs, n.log.String())
		}
	}
	e.mu.Unlock()
	count := func(msg, name string) int {
		c := 0
		for _, l := range logs {
			for _, line := range strings.Split(l, "\n") {
				if strings.Contains(line, `"msg":"`+msg+`"`) && strings.Contains(line, `"identifier":"`+name+`"`) {
					c++
				}
			}
		}
		return c
	}
	total, per := e.pebble.orders()
	validated := 0
	for _, n := range per {
		validated += n
	}
	renewals := count("renewing certificate", shortName)
	e.t.Logf("%s: %d orders at pebble, validations per name %v, %d renewals of %s", when, total, per, renewals, shortName)
	for _, name := range acmeNames {
		if got := count("obtaining certificate", name); got != 1 {
			e.t.Fatalf("%s: %d nodes set out to obtain %s, want exactly one", when, got, name)
		}
		want := 1
		if name == shortName {
			want = 1 + renewals
		}
		if per[name] < 1 || per[name] > want {
			e.t.Fatalf("%s: %d orders for %s, want 1 (plus %d renewals)", when, per[name], name, want-1)
		}
	}
	if total < validated || total > validated+1 {
		e.t.Fatalf("%s: %d orders at pebble but %d validations", when, total, validated)
	}
}

// acmeEnv is the DNS server, pebble and the nodes' addresses of one test.
type acmeEnv struct {
	t                 *testing.T
	httpPort, tlsPort int
	pebble            *pebbleCA
	dnsAddr           string

	mu      sync.Mutex       // guards the following
	nodes   map[string]*node // by name, with their bind address in ips
	ips     map[string]string
	pids    map[string]int
	dead    map[string]bool
	answers []dnsAnswer
	armed   bool      // the next validation of shortName kills the lock holder
	killed  string    // the node killed while holding the lock
	killAt  time.Time // when
	killCh  chan string
}

// dnsAnswer records which node held the issuance lock of a name when
// pebble resolved it, and which node pebble was sent to.
type dnsAnswer struct {
	name, holder, target string
}

func newACMEEnv(t *testing.T) *acmeEnv {
	e := &acmeEnv{
		t: t, nodes: map[string]*node{}, ips: map[string]string{}, pids: map[string]int{},
		dead: map[string]bool{}, killCh: make(chan string, 1),
	}
	e.httpPort, e.tlsPort = freeSharedPort(t), freeSharedPort(t)

	// pebble asks over TCP; UDP on the same port too, for other resolvers.
	var l net.Listener
	var pc net.PacketConn
	for range 50 {
		var err error
		if l, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
		if pc, err = net.ListenPacket("udp", l.Addr().String()); err == nil {
			break
		}
		l.Close()
	}
	if pc == nil {
		t.Fatal("no port for the DNS server")
	}
	e.dnsAddr = l.Addr().String()
	for _, srv := range []*dns.Server{
		{Listener: l, Handler: dns.HandlerFunc(e.serveDNS)},
		{PacketConn: pc, Handler: dns.HandlerFunc(e.serveDNS)},
	} {
		go srv.ActivateAndServe()
		t.Cleanup(func() { srv.Shutdown() })
	}
	if dir := os.Getenv("CIRCLE_TEST_LOGDIR"); dir != "" {
		t.Cleanup(func() {
			e.mu.Lock()
			defer e.mu.Unlock()
			for name, n := range e.nodes {
				if n.log != nil {
					os.WriteFile(filepath.Join(dir, name+".log"), []byte(n.log.String()), 0o644)
				}
			}
			os.WriteFile(filepath.Join(dir, "pebble.log"), []byte(e.pebble.log.String()), 0o644)
		})
	}

	e.pebble = startPebble(t, e.httpPort, e.tlsPort, e.dnsAddr)
	return e
}

// nodeIPs are the loopback addresses the nodes bind, in order.
var nodeIPs = []string{"127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14"}

// freeSharedPort returns a TCP port free on every node address.
func freeSharedPort(t *testing.T) int {
	t.Helper()
	for range 50 {
		l, err := net.Listen("tcp", nodeIPs[0]+":0")
		if err != nil {
			t.Fatalf("listen: %v", err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		ok := true
		var ls []net.Listener
		for _, ip := range nodeIPs[1:] {
			l2, err := net.Listen("tcp", fmt.Sprintf("%s:%d", ip, port))
			if err != nil {
				ok = false
				break
			}
			ls = append(ls, l2)
		}
		l.Close()
		for _, l2 := range ls {
			l2.Close()
		}
		if ok {
			return port
		}
	}
	t.Fatal("no free shared port")
	return 0
}

// setup makes n an ACME node of the test bound to the next address.
func (e *acmeEnv) setup(n *node) {
	e.mu.Lock()
	ip := nodeIPs[len(e.ips)]
	e.ips[n.name] = ip
	e.nodes[n.name] = n
	e.mu.Unlock()
	n.httpPort, n.httpsPort = e.httpPort, e.tlsPort
	n.caddyfileFn = func(n *node) string { return e.caddyfile(n, ip) }
	n.adaptFn = withLockTTL
}

// withLockTTL sets the storage's lease (JSON only) in an adapted config.
func withLockTTL(t *testing.T, cfgJSON []byte) []byte {
	var cfg map[string]any
	if err := json.Unmarshal(cfgJSON, &cfg); err != nil {
		t.Fatalf("adapted config: %v", err)
	}
	st, ok := cfg["storage"].(map[string]any)
	if !ok || st["module"] != "circle" {
		t.Fatalf("adapted config has no circle storage: %s", cfgJSON)
	}
	st["lock_ttl"] = acmeLockTTL.String()
	st["lock_poll_interval"] = "500ms"
	b, _ := json.Marshal(cfg)
	return b
}

func (e *acmeEnv) caddyfile(n *node, ip string) string {
	var join []string
	for _, p := range n.join {
		join = append(join, fmt.Sprintf("127.0.0.1:%d", p))
	}
	return fmt.Sprintf(`{
	admin 127.0.0.1:%[1]d
	http_port %[2]d
	https_port %[3]d
	default_bind %[4]s
	acme_ca %[5]s
	acme_ca_root %[6]s
	email ops@%[7]s
	renew_interval 1s
	ocsp_stapling off
	storage circle
	circle {
		name %[8]s
		domain %[7]s
		secret_file %[9]s
		data_dir %[10]s
		listen 127.0.0.1:%[11]d
		join %[12]s
		replicas 2
	}
}

%[7]s {
	respond "portal on %[8]s"
}

app.%[7]s {
	respond "app on %[8]s"
}

%[13]s {
	tls {
		issuer acme {
			lifetime %[14]s
		}
	}
	respond "short on %[8]s"
}
`, n.adminPort, n.httpPort, n.httpsPort, ip, e.pebble.dirURL, e.pebble.minica, acmeDomain,
		n.name, n.secretFile, filepath.Join(n.dir, "data"), n.gossip,
		strings.Join(join, " "), shortName, shortLifetime)
}

// launch starts n's process and remembers its pid.
func (e *acmeEnv) launch(n *node) {
	n.launch()
	e.mu.Lock()
	e.pids[n.name] = n.cmd.Process.Pid
	e.mu.Unlock()
}

// serveDNS answers pebble: A records of the test names point at a live
// node that does not hold the name's issuance lock, so pebble validates
// through another node than the one that placed the order.
func (e *acmeEnv) serveDNS(w dns.ResponseWriter, r *dns.Msg) {
	m := new(dns.Msg)
	m.SetReply(r)
	if len(r.Question) == 1 {
		q := r.Question[0]
		name := strings.ToLower(strings.TrimSuffix(q.Name, "."))
		if q.Qtype == dns.TypeA && (name == acmeDomain || strings.HasSuffix(name, "."+acmeDomain)) {
			if ip := e.answer(name); ip != "" {
				m.Answer = append(m.Answer, &dns.A{
					Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 0},
					A:   net.ParseIP(ip),
				})
			}
		}
	}
	w.WriteMsg(m)
}

// answer picks the address pebble gets for name; see serveDNS. When armed,
// a validation of shortName first kills the node holding its lock.
func (e *acmeEnv) answer(name string) string {
	holder := e.lockHolder("issue_cert_" + name)
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.armed && name == shortName && holder != "" && e.killed == "" {
		syscall.Kill(e.pids[holder], syscall.SIGKILL)
		e.dead[holder] = true
		e.killed, e.killAt = holder, time.Now()
		e.killCh <- holder
	}
	// The first other node that serves: a node still starting (its
	// listeners not open yet) is not an A record anyone would publish, and
	// orders may begin before all three nodes are up.
	target, fallback := "", ""
	for _, nm := range []string{"alpha", "beta", "gamma", "delta"} {
		if _, ok := e.ips[nm]; ok && nm != holder && !e.dead[nm] {
			if fallback == "" {
				fallback = nm
			}
			if c, err := net.DialTimeout("tcp", net.JoinHostPort(e.ips[nm], strconv.Itoa(e.tlsPort)), 200*time.Millisecond); err == nil {
				c.Close()
				target = nm
				break
			}
		}
	}
	if target == "" {
		target = fallback
	}
	e.answers = append(e.answers, dnsAnswer{name: name, holder: holder, target: target})
	return e.ips[target]
}

// setDead marks a node as down (not a DNS answer, not asked for locks).
func (e *acmeEnv) setDead(name string, dead bool) {
	e.mu.Lock()
	e.dead[name] = dead
	e.mu.Unlock()
}

// lockHolder asks the live nodes who holds lock name (its lease's owner).
func (e *acmeEnv) lockHolder(lock string) string {
	e.mu.Lock()
	var live []*node
	for nm, n := range e.nodes {
		if !e.dead[nm] {
			live = append(live, n)
		}
	}
	e.mu.Unlock()
	for _, n := range live {
		st, err := n.circleStatus()
		if err != nil {
			continue
		}
		for _, l := range st.Locks {
			if l.Name == lock && !l.Expired {
				owner, _, _ := strings.Cut(l.Owner, "/")
				return owner
			}
		}
	}
	return ""
}

// statusJSON is the part of GET /circle/status the test reads.
type statusJSON struct {
	Certificates []struct {
		Names     []string  `json:"names"`
		Serial    string    `json:"serial"`
		NotAfter  time.Time `json:"not_after"`
		RenewedBy string    `json:"renewed_by"`
		LastError string    `json:"last_error"`
		Problem   string    `json:"problem"`
	} `json:"certificates"`
	Locks []struct {
		Name    string `json:"name"`
		Owner   string `json:"owner"`
		Expired bool   `json:"expired"`
	} `json:"locks"`
}

func (n *node) circleStatus() (statusJSON, error) {
	var st statusJSON
	err := n.admin("GET", "/circle/status", nil, &st)
	return st, err
}

// servedSerial connects to the node's HTTPS address with SNI name, checks
// the chain against pebble's roots and returns the leaf's serial (hex).
func (e *acmeEnv) servedSerial(n *node, name string) (string, error) {
	e.mu.Lock()
	ip := e.ips[n.name]
	e.mu.Unlock()
	d := &net.Dialer{Timeout: 3 * time.Second}
	conn, err := tls.DialWithDialer(d, "tcp", fmt.Sprintf("%s:%d", ip, e.tlsPort), &tls.Config{
		ServerName:         name,
		InsecureSkipVerify: true, // verified below, against pebble's roots
	})
	if err != nil {
		return "", err
	}
	defer conn.Close()
	certs := conn.ConnectionState().PeerCertificates
	if len(certs) == 0 {
		return "", fmt.Errorf("no certificate")
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	leaf := certs[0]
	if _, err := leaf.Verify(x509.VerifyOptions{
		DNSName: name, Roots: e.pebble.roots, Intermediates: inter,
		CurrentTime: leaf.NotBefore.Add(time.Second), // short-lived ones may just have expired
	}); err != nil {
		return "", fmt.Errorf("%s on %s: %v", name, n.name, err)
	}
	return leaf.SerialNumber.Text(16), nil
}

// sameSerial waits until every node in ns serves one certificate for name
// (issued by pebble) and returns its serial; with not, a different one.
func (e *acmeEnv) sameSerial(ns []*node, name, not string, within time.Duration) string {
	e.t.Helper()
	var serial string
	waitFor(e.t, within, "one certificate for "+name+" on every node", func() error {
		serial = ""
		for _, n := range ns {
			s, err := e.servedSerial(n, name)
			if err != nil {
				return err
			}
			if s == not {
				return fmt.Errorf("%s still serves %s", n.name, s)
			}
			if serial != "" && s != serial {
				return fmt.Errorf("serials differ: %s vs %s on %s", serial, s, n.name)
			}
			serial = s
		}
		return nil
	})
	return serial
}

func TestACMECircle(t *testing.T) {
	start := time.Now()
	e := newACMEEnv(t)
	c := newCircle(t, "alpha", "beta", "gamma")
	var nodes []*node
	for _, nm := range c.order {
		e.setup(c.nodes[nm])
		nodes = append(nodes, c.nodes[nm])
	}

	// Three nodes start together.
	for _, n := range nodes {
		e.launch(n)
	}
	for _, n := range nodes {
		n.waitUp()
	}
	serials := map[string]string{}
	for _, name := range acmeNames {
		serials[name] = e.sameSerial(nodes, name, "", 60*time.Second)
	}
	t.Logf("three nodes serve the same certificates after %v", time.Since(start).Round(time.Millisecond))

	// Exactly one order per name.
	e.checkOrders("three nodes started")

	// pebble validated through another node than the one that ordered, and
	// that node answered from the shared storage.
	e.mu.Lock()
	answers := append([]dnsAnswer(nil), e.answers...)
	e.mu.Unlock()
	validated := map[string]bool{}
	for _, a := range answers {
		if a.holder == "" || a.target == "" || a.holder == a.target {
			continue
		}
		if servedDistributed(c.nodes[a.target].log.String(), a.name) {
			validated[a.name] = true
		}
	}
	for _, name := range acmeNames {
		if !validated[name] {
			t.Fatalf("no validation of %s through a node other than the orderer (answers %+v)", name, answers)
		}
	}

	// The status shows the certificates, with the node that obtained them.
	st, err := c.nodes["beta"].circleStatus()
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range acmeNames[:2] {
		found := false
		for _, cert := range st.Certificates {
			if len(cert.Names) == 1 && cert.Names[0] == name && cert.Serial == serials[name] && cert.RenewedBy != "" && cert.Problem == "" {
				found = true
			}
		}
		if !found {
			t.Fatalf("status of beta lacks %s with serial %s: %+v", name, serials[name], st.Certificates)
		}
	}
	out, err := exec.Command(caddyBin, "circle", "status", "--address", fmt.Sprintf("127.0.0.1:%d", c.nodes["gamma"].adminPort)).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "app."+acmeDomain) || !strings.Contains(string(out), "CERTIFICATE") {
		t.Fatalf("caddy circle status: %v\n%s", err, out)
	}

	// A fourth node joins later and serves the certificates without a new order.
	delta := c.addNode("delta", c.secretFile)
	for _, n := range nodes {
		delta.join = append(delta.join, n.gossip)
	}
	e.setup(delta)
	e.launch(delta)
	delta.waitUp()
	for _, name := range acmeNames[:2] {
		if got := e.sameSerial([]*node{delta}, name, "", 20*time.Second); got != serials[name] {
			t.Fatalf("delta serves %s for %s, the circle %s", got, name, serials[name])
		}
	}
	e.sameSerial(append(nodes, delta), shortName, "", 20*time.Second)
	e.checkOrders("delta joined")
	nodes = append(nodes, delta)

	// The node holding the issuance lock of shortName is killed during its
	// next renewal; another takes the lock over and renews.
	e.mu.Lock()
	e.armed = true
	e.mu.Unlock()
	var killed string
	select {
	case killed = <-e.killCh:
	case <-time.After(shortLifetime + 15*time.Second):
		t.Fatal("no renewal of " + shortName + " started")
	}
	e.mu.Lock()
	killAt := e.killAt
	e.mu.Unlock()
	c.nodes[killed].kill()
	var survivors []*node
	for _, n := range nodes {
		if n.name != killed {
			survivors = append(survivors, n)
		}
	}
	old, err := e.servedSerial(survivors[0], shortName)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("killed %s while it held issue_cert_%s (serving %s)", killed, shortName, old)

	var takeover time.Duration
	waitFor(t, 2*acmeLockTTL+5*time.Second, "lock takeover", func() error {
		// A survivor's certmagic took the lock: the lease of the killed
		// holder expired (its acceptors may have withdrawn the grant before
		// the survivor's claim, so "taking over expired lock" is not always
		// logged; certmagic's "lock acquired" always is).
		for _, n := range survivors {
			if ts, ok := logTimeAfter(n.log.String(), killAt, `"lock acquired"`, `"identifier":"`+shortName+`"`); ok {
				takeover = ts.Sub(killAt)
				return nil
			}
		}
		return fmt.Errorf("no survivor took over the lock")
	})
	t.Logf("lock taken over %v after the kill (lease %v)", takeover.Round(time.Millisecond), acmeLockTTL)
	if takeover > 2*acmeLockTTL {
		t.Fatalf("takeover after %v, more than twice the lease %v", takeover, acmeLockTTL)
	}
	renewed := e.sameSerial(survivors, shortName, old, 30*time.Second)
	t.Logf("survivors serve the renewed certificate %s, %v after the kill", renewed, time.Since(killAt).Round(time.Millisecond))
	// The status says which node renewed it: a survivor.
	waitFor(t, 10*time.Second, "status shows the renewal", func() error {
		st, err := survivors[0].circleStatus()
		if err != nil {
			return err
		}
		for _, cert := range st.Certificates {
			if len(cert.Names) == 1 && cert.Names[0] == shortName && cert.Serial == renewed {
				if cert.RenewedBy == "" || cert.RenewedBy == killed {
					return fmt.Errorf("renewed by %q", cert.RenewedBy)
				}
				return nil
			}
		}
		return fmt.Errorf("no %s with serial %s in %+v", shortName, renewed, st.Certificates)
	})
	e.checkOrders("after the renewal")

	// A corrupted certificate record arrives from the circle: it is
	// detected (the status marks it), never served (the nodes keep the
	// valid certificate they hold), and a node that (re)starts obtains the
	// certificate again instead of failing or serving the bad record.
	app := "app." + acmeDomain
	tamper := openTamperNode(t, c.secretFile, survivors)
	crtKey := ""
	waitFor(t, 15*time.Second, "tamper node has the certificate", func() error {
		recs, err := tamper.List("certs", "certificates/")
		if err != nil {
			return err
		}
		for _, r := range recs {
			if strings.HasSuffix(r.Key, "/"+app+"/"+app+".crt") {
				crtKey = r.Key
				return nil
			}
		}
		return fmt.Errorf("no certificate of %s among %d records", app, len(recs))
	})
	rec, err := tamper.Get("certs", crtKey)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	err = tamper.Put(ctx, "certs", crtKey, rec.Value[:len(rec.Value)/2]) // truncated
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, 15*time.Second, "status flags the truncated certificate", func() error {
		for _, n := range survivors {
			st, err := n.circleStatus()
			if err != nil {
				return err
			}
			flagged := false
			for _, cert := range st.Certificates {
				if cert.Problem != "" && strings.Contains(cert.Problem, "corrupted") {
					flagged = true
				}
			}
			if !flagged {
				return fmt.Errorf("%s does not flag it: %+v", n.name, st.Certificates)
			}
		}
		return nil
	})
	for _, n := range survivors {
		if got, err := e.servedSerial(n, app); err != nil || got != serials[app] {
			t.Fatalf("%s serves %s, %v for %s after the corruption; want the valid %s", n.name, got, err, app, serials[app])
		}
	}
	restarted := survivors[0]
	e.setDead(restarted.name, true) // pebble is not sent to it while it restarts
	restarted.kill()
	e.launch(restarted)
	restarted.waitUp()
	e.setDead(restarted.name, false)
	reissued := e.sameSerial([]*node{restarted}, app, serials[app], 30*time.Second)
	waitFor(t, 15*time.Second, "status shows the reissued certificate", func() error {
		st, err := survivors[1].circleStatus()
		if err != nil {
			return err
		}
		for _, cert := range st.Certificates {
			if len(cert.Names) == 1 && cert.Names[0] == app {
				if cert.Problem != "" || cert.Serial != reissued || cert.RenewedBy != restarted.name {
					return fmt.Errorf("status of %s: %+v", app, cert)
				}
				return nil
			}
		}
		return fmt.Errorf("no %s in the status", app)
	})
	t.Logf("truncated certificate of %s detected; %s restarted and obtained %s", app, restarted.name, reissued)
	t.Logf("ACME test took %v", time.Since(start).Round(time.Millisecond))
}

// openTamperNode joins the circle from the test process as a bare
// replicator node (no storage, so nobody waits for it), to write records
// as any member could.
func openTamperNode(t *testing.T, secretFile string, peers []*node) *replicator.Node {
	t.Helper()
	b, err := os.ReadFile(secretFile)
	if err != nil {
		t.Fatal(err)
	}
	secret, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	// The circle's gossip and replication run over the QUIC mesh: the
	// tamper node needs one too.
	conn, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	mesh, err := relay.NewMesh(relay.MeshConfig{Name: "tamper", Secret: secret, Conn: conn})
	if err != nil {
		conn.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { mesh.Close() })
	tr, err := mesh.Transport()
	if err != nil {
		t.Fatal(err)
	}
	cfg := replicator.DefaultConfig()
	cfg.Name = "tamper"
	cfg.DataDir = t.TempDir()
	cfg.Secret = secret
	cfg.BindAddr = conn.LocalAddr().String()
	cfg.Transport = tr
	cfg.Replicas = 1
	cfg.AntiEntropyInterval = time.Second
	for _, p := range peers {
		cfg.Join = append(cfg.Join, fmt.Sprintf("127.0.0.1:%d", p.gossip))
	}
	n, err := replicator.Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

// servedDistributed reports whether a node's log shows it answered a
// challenge for name from the shared storage (HTTP-01 or TLS-ALPN-01).
func servedDistributed(log, name string) bool {
	for _, line := range strings.Split(log, "\n") {
		if strings.Contains(line, "served key authentication") &&
			(strings.Contains(line, `"identifier":"`+name+`"`) || strings.Contains(line, `"server_name":"`+name+`"`)) &&
			strings.Contains(line, `"distributed":true`) {
			return true
		}
	}
	return false
}

// logTime returns the time of the first JSON log line containing all of
// the given strings.
func logTime(log string, contains ...string) (time.Time, bool) {
	return logTimeAfter(log, time.Time{}, contains...)
}

// logTimeAfter is logTime for the first such line logged after after.
func logTimeAfter(log string, after time.Time, contains ...string) (time.Time, bool) {
next:
	for _, line := range strings.Split(log, "\n") {
		for _, s := range contains {
			if !strings.Contains(line, s) {
				continue next
			}
		}
		var l struct {
			TS float64 `json:"ts"`
		}
		if json.Unmarshal([]byte(line), &l) != nil || l.TS == 0 {
			continue
		}
		sec := int64(l.TS)
		if ts := time.Unix(sec, int64((l.TS-float64(sec))*1e9)); ts.After(after) {
			return ts, true
		}
	}
	return time.Time{}, false
}
