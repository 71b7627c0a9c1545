package integration

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/cookiejar"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// demoBasePort finds a base port for `caddy circle demo` such that every
// port the demo derives from it (base+0..2, +10..12, +20..22, +30..32) is
// free for TCP and UDP on loopback.
func demoBasePort(t *testing.T) int {
	t.Helper()
	free := func(p int) bool {
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			return false
		}
		l.Close()
		u, err := net.ListenPacket("udp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			return false
		}
		u.Close()
		return true
	}
	for try := 0; try < 100; try++ {
		base := 30000 + rand.IntN(20000)
		ok := true
		for _, off := range []int{0, 1, 2, 10, 11, 12, 20, 21, 22, 30, 31, 32} {
			if !free(base + off) {
				ok = false
				break
			}
		}
		if ok {
			return base
		}
	}
	t.Fatal("no free port range for the demo")
	return 0
}

var (
	demoLogin = regexp.MustCompile(`Log in as:\s+(\S+) / (\S+)`)
	demoRoot  = regexp.MustCompile(`Root CA:\s+(\S+)`)
)

// TestDemo runs the README's first command, `caddy circle demo`, as a
// newcomer would: it must print a login and the root CA, the printed login
// must work on one node and open the demo app on another over TLS that
// verifies against the printed root, and Ctrl-C must stop everything and
// remove the demo's files.
// demoRun is a running `caddy circle demo`.
type demoRun struct {
	cmd     *exec.Cmd
	base    int
	printed string     // stdout up to "Press Ctrl-C"
	exited  chan error // receives cmd.Wait's result
	login   []string   // user, password
	root    string     // path of the printed root CA
}

// startDemo runs `caddy circle demo` on free ports and waits until it says
// it is ready.
func startDemo(t *testing.T) *demoRun {
	t.Helper()
	d := &demoRun{base: demoBasePort(t), exited: make(chan error, 1)}
	d.cmd = exec.Command(caddyBin, "circle", "demo", "--base-port", fmt.Sprint(d.base))
	d.cmd.SysProcAttr = dieWithTest()
	home := t.TempDir()
	d.cmd.Env = append(os.Environ(), "HOME="+home, "XDG_DATA_HOME="+filepath.Join(home, "data"),
		"XDG_CONFIG_HOME="+filepath.Join(home, "config"))
	stdout, err := d.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr syncBuffer
	d.cmd.Stderr = &stderr
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var out syncBuffer
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stdout)
		signalled := false
		for sc.Scan() {
			fmt.Fprintln(&out, sc.Text())
			if !signalled && strings.Contains(sc.Text(), "Ctrl-C") {
				close(ready)
				signalled = true
			}
		}
		d.exited <- d.cmd.Wait()
	}()
	t.Cleanup(func() {
		if d.cmd.ProcessState == nil {
			d.cmd.Process.Signal(syscall.SIGKILL)
		}
		if t.Failed() {
			t.Logf("demo stdout:\n%s\ndemo stderr:\n%s", out.String(), tail(stderr.String(), 4000))
		}
	})

	select {
	case <-ready:
	case err := <-d.exited:
		t.Fatalf("demo exited before it was ready: %v", err)
	case <-time.After(90 * time.Second):
		t.Fatal("demo did not become ready within 90 s")
	}
	d.printed = out.String()
	m := demoLogin.FindStringSubmatch(d.printed)
	r := demoRoot.FindStringSubmatch(d.printed)
	if m == nil || r == nil {
		t.Fatalf("demo did not print a login and a root CA:\n%s", d.printed)
	}
	d.login, d.root = m[1:3], r[1]
	return d
}

// adminPortsDown reports an error while any demo admin port answers.
func (d *demoRun) adminPortsDown() error {
	for i := 0; i < 3; i++ {
		if c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", d.base+30+i), time.Second); err == nil {
			c.Close()
			return fmt.Errorf("admin port %d still answers", d.base+30+i)
		}
	}
	return nil
}

// TestDemo runs the README's first command, `caddy circle demo`, as a
// newcomer would: it must print a login and the root CA, the printed login
// must work on one node and open the demo app on another over TLS that
// verifies against the printed root, and Ctrl-C must stop everything and
// remove the demo's files.
func TestDemo(t *testing.T) {
	d := startDemo(t)
	cmd, base, exited := d.cmd, d.base, d.exited
	user, pass, rootPath := d.login[0], d.login[1], d.root
	demoDir := filepath.Dir(rootPath)
	pem, err := os.ReadFile(rootPath)
	if err != nil {
		t.Fatalf("printed root CA: %v", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		t.Fatalf("printed root CA %s holds no certificate", rootPath)
	}

	// A client that trusts only the printed root and resolves every
	// circle.localhost name to loopback, as browsers do.
	jar, _ := cookiejar.New(nil)
	dialer := &net.Dialer{Timeout: 5 * time.Second}
	client := &http.Client{
		Jar:     jar,
		Timeout: 15 * time.Second,
		Transport: &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: pool},
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				_, port, err := net.SplitHostPort(addr)
				if err != nil {
					return nil, err
				}
				return dialer.DialContext(ctx, network, "127.0.0.1:"+port)
			},
		},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}

	// Log in on beta with the printed login...
	body, _ := json.Marshal(map[string]string{"username": user, "password": pass})
	resp, err := client.Post(fmt.Sprintf("https://circle.localhost:%d/api/login", base+1), "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatalf("login on beta: %v", err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("login on beta with the printed credentials: %d", resp.StatusCode)
	}
	// ...and the demo app on gamma and alpha knows who we are.
	for _, port := range []int{base + 2, base} {
		req, _ := http.NewRequest("GET", fmt.Sprintf("https://app.circle.localhost:%d/", port), nil)
		req.Header.Set("Remote-User", "mallory")
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("demo app on port %d: %v", port, err)
		}
		page, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || !regexp.MustCompile(`Remote-User:\s+`+regexp.QuoteMeta(user)).Match(page) ||
			bytes.Contains(page, []byte("mallory")) {
			t.Fatalf("demo app on port %d: %d\n%s", port, resp.StatusCode, page)
		}
	}

	// Ctrl-C stops all three nodes and removes the demo's files.
	cmd.Process.Signal(os.Interrupt)
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("demo exited with %v after Ctrl-C", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("demo still running 30 s after Ctrl-C")
	}
	if _, err := os.Stat(demoDir); !os.IsNotExist(err) {
		t.Errorf("demo directory %s still there after Ctrl-C (%v)", demoDir, err)
	}
	if err := d.adminPortsDown(); err != nil {
		t.Error(err)
	}
}

// TestDemoNodesDieWithIt: when the demo process itself is killed (SIGKILL,
// a closed terminal) and cannot clean up, its three nodes still go away,
// so no orphan keeps the demo's ports.
func TestDemoNodesDieWithIt(t *testing.T) {
	d := startDemo(t)
	d.cmd.Process.Signal(syscall.SIGKILL)
	<-d.exited
	waitFor(t, 15*time.Second, "demo nodes gone after the demo was killed", d.adminPortsDown)
}
