package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/homecircle/circle/caddymodule/circlenode"
)

// testNode is a circle node (App) provisioned and started in-process.
type testNode struct {
	app  *App
	stop func()
}

// startTestNode provisions and starts a node of the circle of secretFile
// on a loopback port, joining join (gossip addresses).
func startTestNode(t *testing.T, name, secretFile string, join []string, svcs map[string]string) *testNode {
	t.Helper()
	a := &App{
		Name: name, DomainName: "circle.test", SecretFile: secretFile, DataDir: t.TempDir(),
		Listen: freeAddr(t), Join: join, Replicas: 1, Services: svcs,
		SyncTimeout: caddy.Duration(5 * time.Second), AntiEntropyInterval: caddy.Duration(time.Second),
	}
	return startTestApp(t, a)
}

func startTestApp(t *testing.T, a *App) *testNode {
	t.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	if err := a.Provision(ctx); err != nil {
		cancel()
		t.Fatal(err)
	}
	if err := a.Start(); err != nil {
		a.Cleanup()
		cancel()
		t.Fatal(err)
	}
	var once sync.Once
	n := &testNode{app: a, stop: func() {
		once.Do(func() {
			a.Stop()
			a.Cleanup()
			cancel()
		})
	}}
	t.Cleanup(n.stop)
	return n
}

// waitMeshPeers waits until n has a live mesh connection to every peer in
// want and none to the peers in gone.
func waitMeshPeers(t *testing.T, n *testNode, want, gone []string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		peers := n.app.node.Mesh().Peers()
		ok := true
		for _, w := range want {
			ok = ok && slices.Contains(peers, w)
		}
		for _, g := range gone {
			ok = ok && !slices.Contains(peers, g)
		}
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s's mesh peers %v, want %v and not %v", n.app.Name, peers, want, gone)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// nameServer is an HTTP upstream on loopback that answers its name.
func nameServer(t *testing.T, name string) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, name)
	}))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

// serviceClient is an HTTP client whose connections are circle services
// dialed from n (what the circle transport does).
func serviceClient(n *testNode) (*http.Client, *http.Transport) {
	rt := newServiceTransport(n.app.node, 5*time.Second)
	return &http.Client{Transport: rt, Timeout: 15 * time.Second}, rt
}

func getBody(c *http.Client, u string) (string, error) {
	resp, err := c.Get(u)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("status %d: %s", resp.StatusCode, b)
	}
	return string(b), err
}

// TestServiceTransportFailover: a service offered by beta and gamma is
// reached from alpha over the mesh, sticks to the node that answered, fails
// over to the other when that one goes, and fails with a dial error when
// none offers it; alpha's own service is dialed directly.
func TestServiceTransportFailover(t *testing.T) {
	secretFile, _ := writeSecretFile(t)
	beta := startTestNode(t, "beta", secretFile, nil, map[string]string{"echo": nameServer(t, "beta")})
	gamma := startTestNode(t, "gamma", secretFile, []string{beta.app.Listen}, map[string]string{"echo": nameServer(t, "gamma")})
	alpha := startTestNode(t, "alpha", secretFile, []string{beta.app.Listen}, map[string]string{"local": nameServer(t, "alpha")})
	waitMeshPeers(t, alpha, []string{"beta", "gamma"}, nil)

	client, rt := serviceClient(alpha)
	if got, err := getBody(client, "http://local/"); err != nil || got != "alpha" {
		t.Fatalf("local service: %q, %v", got, err)
	}
	first, err := getBody(client, "http://echo:80/")
	if err != nil || (first != "beta" && first != "gamma") {
		t.Fatalf("echo: %q, %v", first, err)
	}
	for range 3 {
		rt.CloseIdleConnections() // a new stream each time
		if got, err := getBody(client, "http://echo/"); err != nil || got != first {
			t.Fatalf("echo again: %q, %v; want the node that answered before, %s", got, err, first)
		}
	}

	byName := map[string]*testNode{"beta": beta, "gamma": gamma}
	other := map[string]string{"beta": "gamma", "gamma": "beta"}[first]
	byName[first].stop()
	waitMeshPeers(t, alpha, nil, []string{first})
	rt.CloseIdleConnections()
	if got, err := getBody(client, "http://echo/"); err != nil || got != other {
		t.Fatalf("after %s left: %q, %v; want %s", first, got, err, other)
	}

	byName[other].stop()
	waitMeshPeers(t, alpha, nil, []string{other})
	rt.CloseIdleConnections()
	_, err = getBody(client, "http://echo/")
	var de reverseproxy.DialError
	if err == nil || !errors.As(err, &de) || !strings.Contains(err.Error(), circlenode.ErrNoServiceNode.Error()) {
		t.Fatalf("no node offers echo: %v, want a dial error (502)", err)
	}
	if _, err := getBody(client, "http://bad_name/"); err == nil || !errors.As(err, &de) {
		t.Fatalf("invalid name: %v", err)
	}
}

// tcpServer serves handle (on its own goroutine, conn closed after it)
// for every connection to a loopback listener until the test ends, and
// returns the listener's address.
func tcpServer(t *testing.T, handle func(net.Conn)) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { l.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				handle(c)
			}()
		}
	}()
	return l.Addr().String()
}

// countServer is a TCP upstream that reads until EOF, then answers the
// number of bytes it read and closes: it needs half-close to work.
func countServer(t *testing.T) string {
	t.Helper()
	return tcpServer(t, func(c net.Conn) {
		c.SetDeadline(time.Now().Add(10 * time.Second))
		n, _ := io.Copy(io.Discard, c)
		fmt.Fprintf(c, "%d", n)
	})
}

// TestServicesReload: a config reload that changes a service's upstream
// keeps the name served and switches to the new upstream; one that drops
// the service stops offering it. A raw service stream passes half-closes
// both ways.
func TestServicesReload(t *testing.T) {
	secretFile, _ := writeSecretFile(t)
	one, two, count := nameServer(t, "one"), nameServer(t, "two"), countServer(t)
	mk := func(svcs map[string]string) *App {
		return &App{Name: "server", DomainName: "circle.test", SecretFile: secretFile, DataDir: dataDirFor(t, "server"),
			Listen: reloadListen(t), Replicas: 1, Services: svcs}
	}
	s1 := startTestApp(t, mk(map[string]string{"web": one}))
	reader := startTestNode(t, "reader", secretFile, []string{s1.app.Listen}, nil)
	waitMeshPeers(t, reader, []string{"server"}, nil)
	client, rt := serviceClient(reader)
	if got, err := getBody(client, "http://web/"); err != nil || got != "one" {
		t.Fatalf("before the reload: %q, %v", got, err)
	}

	// Reload: Provision and Start the new config, then Stop and Cleanup
	// the old one, as Caddy does.
	s2 := startTestApp(t, mk(map[string]string{"web": two, "count": count}))
	if s2.app.node != s1.app.node {
		t.Fatal("the reload opened a second node")
	}
	s1.stop()
	rt.CloseIdleConnections()
	if got, err := getBody(client, "http://web/"); err != nil || got != "two" {
		t.Fatalf("after the reload: %q, %v", got, err)
	}
	if got := s2.app.node.Services().Current(); len(got) != 2 || got["web"] != two {
		t.Fatalf("offered services %v", got)
	}

	// Half-close through the mesh: the upstream answers after our EOF.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := reader.app.node.DialService(ctx, "count")
	if err != nil {
		t.Fatal(err)
	}
	payload := strings.Repeat("x", 100000)
	if _, err := io.WriteString(c, payload); err != nil {
		t.Fatal(err)
	}
	if err := c.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	b, err := io.ReadAll(c)
	c.Close()
	if err != nil || string(b) != strconv.Itoa(len(payload)) {
		t.Fatalf("count answered %q, %v", b, err)
	}

	// A reload without services stops offering them.
	s3 := startTestApp(t, mk(nil))
	s2.stop()
	rt.CloseIdleConnections()
	if _, err := getBody(client, "http://web/"); err == nil || !strings.Contains(err.Error(), circlenode.ErrNoServiceNode.Error()) {
		t.Fatalf("after removing the service: %v", err)
	}
	if got := s3.app.node.Services().Current(); len(got) != 0 {
		t.Fatalf("offered services %v", got)
	}
}

var (
	reloadMu    sync.Mutex
	reloadAddrs = map[string]string{}
	reloadDirs  = map[string]string{}
)

// reloadListen returns one listen address per test (the reloaded configs
// of a node share it).
func reloadListen(t *testing.T) string {
	reloadMu.Lock()
	defer reloadMu.Unlock()
	if a, ok := reloadAddrs[t.Name()]; ok {
		return a
	}
	a := freeAddr(t)
	reloadAddrs[t.Name()] = a
	return a
}

// dataDirFor returns one data directory per test and node name.
func dataDirFor(t *testing.T, name string) string {
	reloadMu.Lock()
	defer reloadMu.Unlock()
	k := t.Name() + "/" + name
	if d, ok := reloadDirs[k]; ok {
		return d
	}
	d := t.TempDir()
	reloadDirs[k] = d
	return d
}

func TestUnmarshalCircleServices(t *testing.T) {
	for _, tc := range []struct {
		name    string
		input   string
		want    map[string]string
		wantErr string
	}{
		{name: "two services", input: "circle {\n service forgejo 127.0.0.1:3000\n service photos-2 localhost:8080\n}",
			want: map[string]string{"forgejo": "127.0.0.1:3000", "photos-2": "localhost:8080"}},
		{name: "ipv6 upstream", input: "circle {\n service wiki [::1]:8000\n}", want: map[string]string{"wiki": "[::1]:8000"}},
		{name: "duplicate", input: "circle {\n service a 127.0.0.1:1\n service a 127.0.0.1:2\n}", wantErr: "service a specified more than once"},
		{name: "uppercase name", input: "circle {\n service Forgejo 127.0.0.1:3000\n}", wantErr: `service name "Forgejo"`},
		{name: "name too long", input: "circle {\n service " + strings.Repeat("a", 64) + " 127.0.0.1:3000\n}", wantErr: "service name"},
		{name: "dot in name", input: "circle {\n service a.b 127.0.0.1:3000\n}", wantErr: "service name"},
		{name: "no port", input: "circle {\n service a 127.0.0.1\n}", wantErr: "want host:port"},
		{name: "bad port", input: "circle {\n service a 127.0.0.1:http\n}", wantErr: "port"},
		{name: "no host", input: "circle {\n service a :3000\n}", wantErr: "with a host"},
		{name: "missing upstream", input: "circle {\n service a\n}", wantErr: "service takes a name and an upstream"},
		{name: "extra argument", input: "circle {\n service a 127.0.0.1:1 x\n}", wantErr: "service takes a name and an upstream"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseGlobalCircle(caddyfile.NewTestDispenser(tc.input), nil)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			raw, _ := json.Marshal(got)
			var out struct {
				Value struct {
					Services map[string]string `json:"services"`
				}
			}
			if err := json.Unmarshal(raw, &out); err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(out.Value.Services) != fmt.Sprint(tc.want) {
				t.Fatalf("services %v, want %v", out.Value.Services, tc.want)
			}
		})
	}
}

// TestCaddyfileCircleTransport: `transport circle` inside reverse_proxy
// adapts to the circle transport module.
func TestCaddyfileCircleTransport(t *testing.T) {
	input := `{
	circle {
		name a
		domain circle.test
		secret_file /s
		service forgejo 127.0.0.1:3000
	}
}
git.circle.test {
	reverse_proxy forgejo {
		transport circle {
			dial_timeout 3s
		}
	}
}
`
	out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(input), nil)
	if err != nil {
		t.Fatal(err)
	}
	s := string(out)
	for _, want := range []string{`"protocol":"circle"`, `"dial_timeout":3000000000`, `"dial":"forgejo:80"`, `"services":{"forgejo":"127.0.0.1:3000"}`} {
		if !strings.Contains(s, want) {
			t.Fatalf("adapted config lacks %s:\n%s", want, s)
		}
	}
	bad := strings.Replace(input, "dial_timeout 3s", "dial_timeout soon", 1)
	if _, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(bad), nil); err == nil || !strings.Contains(err.Error(), "dial_timeout") {
		t.Fatalf("bad dial_timeout: %v", err)
	}
}

// holdServer is a TCP upstream that never answers: it reports each
// accepted conn's end (the proxy closed it) on the returned channel.
func holdServer(t *testing.T) (string, <-chan error) {
	t.Helper()
	ended := make(chan error, 16)
	release := make(chan struct{})
	addr := tcpServer(t, func(c net.Conn) {
		c.SetReadDeadline(time.Now().Add(20 * time.Second))
		_, err := io.Copy(io.Discard, c) // returns when the proxy closes its side
		ended <- err
		<-release // never answer, keep our side open
	})
	t.Cleanup(func() { close(release) }) // runs before tcpServer's cleanup waits for handlers (LIFO)
	return addr, ended
}

// TestServiceStreamsEnd: a proxied stream whose upstream never answers
// ends when the client closes it, and does not hold up the serving node's
// shutdown either.
func TestServiceStreamsEnd(t *testing.T) {
	secretFile, _ := writeSecretFile(t)
	hold, ended := holdServer(t)
	server := startTestNode(t, "server", secretFile, nil, map[string]string{"hold": hold})
	reader := startTestNode(t, "reader", secretFile, []string{server.app.Listen}, nil)
	waitMeshPeers(t, reader, []string{"server"}, nil)
	dial := func() net.Conn {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := reader.app.node.DialService(ctx, "hold")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Write([]byte("hello")); err != nil {
			t.Fatal(err)
		}
		return c
	}

	// The client closes: the upstream conn is closed (EOF there).
	c := dial()
	c.Close()
	select {
	case err := <-ended:
		if err != nil {
			t.Fatalf("upstream conn ended with %v, want EOF", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the upstream conn outlived the client's stream")
	}

	// The client half-closes and waits; the serving node shuts down.
	c = dial()
	defer c.Close()
	if err := c.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-ended: // the half-close reached the upstream as EOF
		if err != nil {
			t.Fatalf("upstream after half-close: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the half-close did not reach the upstream")
	}
	done := make(chan struct{})
	go func() { server.stop(); close(done) }()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		t.Fatal("the serving node's shutdown hangs on a proxied stream")
	}
	// The client's stream ends too (with an error, or EOF).
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadAll(c); err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("the client's stream outlived the serving node")
	}
}
